# SPDX-License-Identifier: LGPL-2.1-or-later
"""The contract in the repository: the man page nbdfs(1) renders without
warnings and names every option `nbdfs --help` names (so the two cannot
drift), has every section the contract needs; the bash completion knows every
option too and completes as bash would; every README link resolves inside the
repository; LICENSE is the license meson declares."""
import os
import re
import shutil
import subprocess

import pytest

from nbdfs_test import build as top
from nbdfs_test.build import build_path
from nbdfs_test.polling import run

SRC = top.SRC_DIR


def _help(nbdfs_bin):
    r = run([nbdfs_bin, "--help"], timeout=30)
    return r.stdout.decode()


def help_options(text):
    """Every option --help names: ('-f', '--foreground', ...) and the -o names
    ('ro', 'timeout', 'allow_other', ...)."""
    # the option lines (indented, beginning with a dash) and the usage lines
    lines = "\n".join(l for l in text.splitlines()
                      if re.match(r"\s+-", l) or l.lstrip().startswith(("usage: nbdfs", "nbdfs ")))
    dashed = set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", lines))
    dashed.discard("-o")
    onames = set()
    for m in re.finditer(r"-o ([^\s]+)", lines):
        for item in m.group(1).split(","):
            name = item.split("=", 1)[0]
            if name:
                onames.add(name)
    return dashed, onames


def _render_man(page):
    """`man -l PAGE` as plain ASCII text, lines too long to break or hyphenate;
    returns (text, stderr)."""
    if shutil.which("man") is None:
        pytest.fail("man is not installed (contrib/install-deps.sh installs man-db)")
    env = dict(os.environ, LC_ALL="C", LANG="C", MANWIDTH="1000", MANPAGER="cat", PAGER="cat")
    r = subprocess.run(["man", "--warnings", "-l", page], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, env=env, timeout=60)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    # strip overstrike formatting, should the pager path keep it
    text = re.sub(r".\x08", "", r.stdout.decode(errors="replace"))
    return text, r.stderr.decode(errors="replace")


@pytest.fixture(scope="module")
def man_text():
    page = build_path("doc", "nbdfs.1")
    if not os.path.exists(page):
        pytest.fail(f"the man page was not built: {page} (rst2man comes with python3-docutils; "
                    "contrib/install-deps.sh installs it)")
    text, err = _render_man(page)
    return text, err


def test_man_page_renders_without_warnings(man_text):
    text, err = man_text
    assert err.strip() == "", f"man --warnings -l: {err}"
    assert text.startswith("NBDFS(1)"), text[:200]


def test_man_page_names_every_option_of_help(nbdfs_bin, man_text):
    text, _ = man_text
    dashed, onames = help_options(_help(nbdfs_bin))
    assert {"--log", "--json", "--version", "io_timeout", "idle_timeout", "fsname"} <= \
        dashed | onames, "the --help parser lost options"
    missing = [o for o in sorted(dashed) if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", text)]
    missing += [f"-o {o}" for o in sorted(onames)
                if not re.search(rf"-o {re.escape(o)}(?![\w-])", text)]
    assert not missing, f"options in --help but not in nbdfs(1): {missing}"


def test_man_page_has_the_whole_contract(man_text):
    text, _ = man_text
    headings = re.findall(r"^([A-Z][A-Z /-]+)$", text, re.M)
    for h in ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "THE MOUNT", "PARTITIONS",
              "EXTENDED ATTRIBUTES", "I/O SEMANTICS", "SERVER LOSS", "STOPPING", "EXIT STATUS",
              "ENVIRONMENT", "FILES", "EXAMPLES", "SEE ALSO", "SCALE"]:
        assert h in headings, f"nbdfs(1) has no {h} section (has {headings})"
    for xattr in ["partition", "start", "sectors", "sector_size", "export", "uri", "type",
                  "uuid", "label", "state", "stats"]:
        assert f"user.nbdfs.{xattr}" in text
    for ref in ["nbdkit(1)", "nbdinfo(1)", "losetup(8)", "mount.fuse3(8)"]:
        assert ref in text, f"SEE ALSO lacks {ref}"
    for word in ["losetup", "dd if=", "fuse.nbdfs", "systemctl", "NOTIFY_SOCKET", "READY=1",
                 "STOPPING=1", "idle_timeout", "io_timeout", "replayed", "EIO", "10,000"]:
        assert word in text, f"nbdfs(1) never mentions {word!r}"


def test_man_page_version_is_the_project_version(man_text):
    text, _ = man_text
    version = re.search(r"version: '([^']+)'", open(os.path.join(SRC, "meson.build")).read())
    assert version.group(1) in text.strip().splitlines()[-1], text.strip().splitlines()[-1]


def test_completion_knows_every_option_of_help(nbdfs_bin):
    comp = open(os.path.join(SRC, "contrib", "nbdfs.bash-completion")).read()
    dashed, onames = help_options(_help(nbdfs_bin))
    missing = [o for o in sorted(dashed) if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", comp)]
    missing += [f"-o {o}" for o in sorted(onames) if not re.search(rf"\b{re.escape(o)}\b", comp)]
    assert not missing, f"options in --help but not in the bash completion: {missing}"


def _complete(line):
    """What the completion offers for `line` (cursor at its end), with the
    words split as bash splits them (COMP_WORDBREAKS: '=' and ':' are words
    of their own)."""
    words = []
    for w in line.split(" "):
        words += [p for p in re.split(r"([=:]+)", w) if p != ""] or [""]
    script = (
        "source /usr/share/bash-completion/bash_completion\n"
        f"source {os.path.join(SRC, 'contrib', 'nbdfs.bash-completion')}\n"
        'COMP_LINE=$1; COMP_POINT=${#1}; shift; COMP_WORDS=("$@")\n'
        "COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMPREPLY=()\n"
        "_nbdfs; printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    r = subprocess.run(["bash", "-c", script, "bash", line] + words, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=30)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return [l for l in r.stdout.decode().splitlines() if l]


@pytest.mark.parametrize("line, want", [
    ("nbdfs -o ro,io_t", "ro,io_timeout="),
    ("nbdfs -o idle", "idle_timeout="),
    ("nbdfs -o fsn", "fsname="),
    ("nbdfs -o sector_size=4", "4096"),
    ("nbdfs --io-t", "--io-timeout="),
    ("nbdfs --log=sy", "syslog"),
    ("nbdfs --js", "--json"),
    ("nbdfs --vers", "--version"),
    ("nbdfs --tls-verify-peer=o", "on"),
])
def test_completion_completes_as_bash_would(line, want):
    if not os.path.exists("/usr/share/bash-completion/bash_completion"):
        pytest.fail("bash-completion is not installed (contrib/install-deps.sh installs it)")
    got = _complete(line)
    assert want in got, f"{line!r}: {got}"


def test_readme_links_resolve_inside_the_repo():
    readme = open(os.path.join(SRC, "README.md")).read()
    anchors = set()
    for h in re.findall(r"^#+ (.+)$", readme, re.M):
        a = re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        anchors.add(a)
    links = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", readme)
    assert links, "README.md has no links"
    bad = []
    for target in links:
        if re.match(r"^[a-z]+:", target):
            bad.append(f"{target}: outside the repository")
        elif target.startswith("#"):
            if target[1:] not in anchors:
                bad.append(f"{target}: no such heading")
        elif not os.path.exists(os.path.join(SRC, target.split("#")[0])):
            bad.append(f"{target}: no such file")
    assert not bad, bad
    assert "doc/nbdfs.1.rst" in links and "LICENSE" in links


def test_license_is_the_one_meson_declares():
    meson = open(os.path.join(SRC, "meson.build")).read()
    assert re.search(r"license: 'LGPL-2.1-or-later'", meson)
    text = open(os.path.join(SRC, "LICENSE")).read()
    assert "GNU LESSER GENERAL PUBLIC LICENSE" in text and "Version 2.1, February 1999" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a stub
