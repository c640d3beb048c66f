"""SPEC §3, the mount: file sizes, modes, owners, st_blksize, partition file
naming (MBR primaries and logicals, no file for the extended partition, GPT
entry index + 1 with gaps, nested partitions) and start/size against sfdisk."""
import os
import stat

import pytest

from nbdfs_test.data import (MiB, SECTOR, getx, image, read_file, set_partition, sfdisk,
                             sfdisk_json, sparse_file)
from nbdfs_test.polling import run


def test_size_is_export_size(nbdkit, mount):
    a = nbdkit("memory", str(5 * MiB + 4096))
    b = nbdkit("pattern", "3M")
    m = mount(f"a={a.uri()}", f"b={b.uri()}")
    assert os.path.getsize(m / "a") == 5 * MiB + 4096
    assert os.path.getsize(m / "b") == 3 * MiB
    st = os.stat(m / "a")
    assert stat.S_ISREG(st.st_mode)
    assert st.st_nlink >= 1


def test_modes_rw_and_read_only_export(nbdkit, mount):
    rw = nbdkit("memory", "1M")
    ro = nbdkit("-r", "memory", "1M")
    m = mount(f"rw={rw.uri()}", f"ro={ro.uri()}")
    assert stat.S_IMODE(os.stat(m / "rw").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(m / "ro").st_mode) == 0o444
    st = os.stat(m.path)
    assert stat.S_ISDIR(st.st_mode)


def test_owner_is_mounting_user(nbdkit, mount):
    m = mount(nbdkit("memory", "1M").uri())
    st = os.stat(m / "disk")
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())


def test_blksize_default_4096(nbdkit, mount):
    m = mount(nbdkit("memory", "1M").uri())
    assert os.stat(m / "disk").st_blksize == 4096


def test_blksize_is_servers_preferred(tmp_path, nbdkit, mount):
    img = image(tmp_path / "d.img", 8 * MiB, "label: gpt\nsize=2M\n")
    srv = nbdkit("--filter=blocksize-policy", "file", img, "blocksize-minimum=512",
                 "blocksize-preferred=65536", "blocksize-maximum=1048576")
    m = mount(srv.uri(), opts=["-P"])
    assert os.stat(m / "disk").st_blksize == 65536
    assert os.stat(m / "disk-part1").st_blksize == 65536


MBR_WITH_LOGICALS = """label: dos
size=4M, type=83
size=4M, type=82
size=4M, type=83
size=30M, type=5
size=4M, type=83
size=6M, type=c
size=4M, type=83
"""


def _check_against_sfdisk(m, parent, img, base_sector=0):
    t = sfdisk_json(img)
    want = {}
    for p in t["partitions"]:
        if t["label"] == "dos" and p["type"] in ("5", "f", "85"):
            continue
        want[f"{parent}-part{p['number']}"] = p
    have = {f for f in m.files() if f.startswith(parent + "-part")
            and "-part" not in f[len(parent) + 5:]}
    assert have == set(want), (sorted(have), sorted(want))
    for name, p in want.items():
        assert os.path.getsize(m / name) == p["size"] * SECTOR, name
        assert getx(m / name, "user.nbdfs.start") == str(base_sector + p["start"]), name
        assert getx(m / name, "user.nbdfs.sectors") == str(p["size"]), name
    return want


def test_mbr_primary_and_logical_numbering(tmp_path, nbdkit, mount):
    img = image(tmp_path / "mbr.img", 56 * MiB, MBR_WITH_LOGICALS)
    m = mount(nbdkit("file", img).uri(), opts=["-P"])
    assert m.files() == ["disk", "disk-part1", "disk-part2", "disk-part3", "disk-part5",
                         "disk-part6", "disk-part7"]
    _check_against_sfdisk(m, "disk", img)
    # the extended container (entry 4) has no file of its own
    assert not os.path.exists(m / "disk-part4")
    assert getx(m / "disk", "user.nbdfs.partition") == "mbr"
    # the bytes are the right ones
    t = sfdisk_json(img)
    p5 = [p for p in t["partitions"] if p["number"] == 5][0]
    with open(m / "disk-part5", "r+b") as f:
        f.write(b"LOGICAL5")
    assert read_file(m / "disk", p5["start"] * SECTOR, 8) == b"LOGICAL5"
    assert read_file(img, p5["start"] * SECTOR, 8) == b"LOGICAL5"


def test_gpt_numbering_with_gap(tmp_path, nbdkit, mount):
    img = sparse_file(tmp_path / "gpt.img", 32 * MiB)
    run(["sgdisk", "-n", "1:2048:+4M", "-n", "3:0:+4M", "-c", "3:three", "-n", "6:0:+2M", img])
    m = mount(nbdkit("file", img).uri(), opts=["-P"])
    assert m.files() == ["disk", "disk-part1", "disk-part3", "disk-part6"]
    _check_against_sfdisk(m, "disk", img)
    assert getx(m / "disk-part3", "user.nbdfs.label") == "three"
    assert getx(m / "disk", "user.nbdfs.partition") == "gpt"


def test_nested_partition(tmp_path, nbdkit, mount):
    img = image(tmp_path / "outer.img", 48 * MiB, "label: gpt\nsize=8M\nsize=32M\n")
    t = sfdisk_json(img)
    p2 = [p for p in t["partitions"] if p["number"] == 2][0]
    inner = image(tmp_path / "inner.img", p2["size"] * SECTOR, "label: dos\nsize=10M\nsize=10M\n")
    run(["dd", f"if={inner}", f"of={img}", "bs=512", f"seek={p2['start']}", "conv=notrunc,sparse",
         "status=none"])
    m = mount(nbdkit("file", img).uri(), opts=["-P"])
    assert m.files() == ["disk", "disk-part1", "disk-part2"]
    # -P scans the exports; the nested table is read on request
    set_partition(m / "disk-part2", "auto")
    assert m.files() == ["disk", "disk-part1", "disk-part2", "disk-part2-part1", "disk-part2-part2"]
    assert getx(m / "disk-part2", "user.nbdfs.partition") == "mbr"
    ti = sfdisk_json(inner)
    for p in ti["partitions"]:
        name = f"disk-part2-part{p['number']}"
        assert os.path.getsize(m / name) == p["size"] * SECTOR
        # start is the sector within the export, not within the parent
        assert getx(m / name, "user.nbdfs.start") == str(p2["start"] + p["start"])
    with open(m / "disk-part2-part2", "r+b") as f:
        f.write(b"NESTED")
    off = (p2["start"] + ti["partitions"][1]["start"]) * SECTOR
    assert read_file(m / "disk", off, 6) == b"NESTED"
    assert read_file(m / "disk-part2", ti["partitions"][1]["start"] * SECTOR, 6) == b"NESTED"


def test_partition_files_next_to_parent_for_each_export(tmp_path, nbdkit, mount):
    a = image(tmp_path / "a.img", 8 * MiB, "label: gpt\nsize=2M\n")
    b = image(tmp_path / "b.img", 8 * MiB, "label: dos\nsize=2M\nsize=2M\n")
    m = mount(f"a={nbdkit('file', a).uri()}", f"b={nbdkit('file', b).uri()}", opts=["-P"])
    assert m.files() == ["a", "a-part1", "b", "b-part1", "b-part2"]


@pytest.mark.parametrize("how", ["option", "server-minimum"])
def test_4096_sector_gpt(tmp_path, nbdkit, mount, how):
    """GPT written for 4096-byte sectors, read with sector_size=4096 or with a
    server whose minimum block size is 4096 (the default sector size then)."""
    img = sparse_file(tmp_path / "g4k.img", 32 * MiB)
    dev = None
    # sfdisk on a file uses 512; write the table through a loop device with 4K sectors
    r = run(["losetup", "-f", "--show", "-b", "4096", img])
    dev = r.stdout.decode().strip()
    try:
        sfdisk(dev, "label: gpt\nsize=8M\nsize=8M\n")
        t = sfdisk_json(dev)
    finally:
        run(["losetup", "-d", dev])
    if how == "option":
        m = mount(nbdkit("file", img).uri(), opts=["-P", "-o", "sector_size=4096"])
    else:
        m = mount(nbdkit("--filter=blocksize-policy", "file", img, "blocksize-minimum=4096",
                         "blocksize-error-policy=error").uri(), opts=["-P"])
    assert m.files() == ["disk", "disk-part1", "disk-part2"]
    for p in t["partitions"]:
        name = f"disk-part{p['number']}"
        assert os.path.getsize(m / name) == p["size"] * 4096
        assert getx(m / name, "user.nbdfs.start") == str(p["start"])
        assert getx(m / name, "user.nbdfs.sector_size") == "4096"


def test_sectors_are_whole_sectors(nbdkit, mount):
    a = nbdkit("memory", "1000")
    b = nbdkit("memory", str(MiB + 100))
    m = mount(f"a={a.uri()}", f"b={b.uri()}")
    assert getx(m / "a", "user.nbdfs.sectors") == "1"
    assert os.path.getsize(m / "a") == 1000
    assert getx(m / "b", "user.nbdfs.sectors") == "2048"
    assert os.path.getsize(m / "b") == MiB + 100


def test_split_counts_in_the_sector_size(nbdkit, mount):
    m = mount(nbdkit("memory", "1M").uri(), opts=["-o", "sector_size=4096,split=disk:3"])
    assert os.path.getsize(m / "disk-part1") == 3 * 4096
    assert os.path.getsize(m / "disk-part2") == MiB - 3 * 4096
    assert getx(m / "disk-part2", "user.nbdfs.start") == "3"


def test_namespace_is_fixed(nbdkit, mount):
    """The files are the exports and partitions: nothing can be created,
    removed or renamed (as with device nodes of disks)."""
    m = mount(nbdkit("memory", "1M").uri(), opts=["-o", "split=disk:8"])
    before = m.files()
    attempts = [
        lambda: open(m / "new", "w").close(),
        lambda: os.mkdir(m / "dir"),
        lambda: os.unlink(m / "disk-part1"),
        lambda: os.rename(m / "disk", m / "other"),
        lambda: os.symlink("disk", m / "link"),
        lambda: os.link(m / "disk", m / "hard"),
        lambda: os.rmdir(m.path),
        lambda: os.chmod(m / "disk", 0o777),
    ]
    for i, fn in enumerate(attempts):
        try:
            fn()
        except OSError:
            continue
        if i == len(attempts) - 1:
            continue    # chmod may be accepted and ignored
        raise AssertionError(f"namespace operation {i} succeeded")
    assert m.files() == before
    assert stat.S_IMODE(os.stat(m / "disk").st_mode) in (0o644, 0o777)


def test_mmap_read(nbdkit, mount):
    import mmap
    from nbdfs_test.data import pattern_bytes
    m = mount(nbdkit("pattern", "1M").uri())
    with open(m / "disk", "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        try:
            assert len(mm) == MiB
            assert mm[123456:123556] == pattern_bytes(123456, 100)
        finally:
            mm.close()


def test_ls_and_df(nbdkit, mount):
    m = mount(nbdkit("memory", "1M").uri())
    out = run(["ls", "-l", m.path]).stdout.decode()
    assert "disk" in out and "1048576" in out
    run(["df", m.path])
    run(["stat", "-f", m.path])


def _all_readable_unique(m):
    files = m.files()
    assert len(files) == len(set(files)), files
    for f in files:
        st = os.stat(m / f)
        with open(m / f, "rb") as fh:
            fh.read(min(st.st_size, 4096))
    return files


def test_partition_name_colliding_with_an_export(tmp_path, nbdkit, mount):
    """An export called disk-part1 next to an export disk with a table: no
    crash, no two entries with one name; either a clear start-up failure or
    a mount where every listed file works."""
    img = image(tmp_path / "d.img", 8 * MiB, "label: gpt\nsize=2M\n")
    a = nbdkit("file", img)
    b = nbdkit("pattern", "1M")
    m = mount(f"disk={a.uri()}", f"disk-part1={b.uri()}", opts=["-P"], check=False)
    if m.rc != 0:
        assert not m.mounted()
        assert m.stderr.strip()
        return
    files = _all_readable_unique(m)
    assert "disk" in files and "disk-part1" in files


def test_runtime_split_colliding_with_an_export(nbdkit, mount):
    import errno as e_
    from nbdfs_test.data import errno_of, set_partition
    a = nbdkit("memory", "1M")
    b = nbdkit("pattern", "1M")
    m = mount(f"a={a.uri()}", f"a-part1={b.uri()}")
    err = errno_of(set_partition, m / "a", "100")
    files = _all_readable_unique(m)
    if err is None:
        assert "a-part1" in files
    else:
        assert err in (e_.EEXIST, e_.EINVAL, e_.EBUSY)
        assert files == ["a", "a-part1"]
    # the export a-part1 still shows its own bytes under some name
    from nbdfs_test.data import pattern_bytes
    assert any(read_file(m / f, 0, 16) == pattern_bytes(0, 16) for f in files)


def test_all_exports_collision_across_servers(nbdkit, mount):
    a = nbdkit("--filter=exportname", "memory", "1M", "exportname-list=explicit",
               "exportname=x", "exportname=y")
    b = nbdkit("--filter=exportname", "memory", "1M", "exportname-list=explicit",
               "exportname=x", "exportname=z")
    m = mount(a.uri(), b.uri(), opts=["-a"], check=False)
    assert m.rc != 0 and not m.mounted(), "two exports named x mounted"
    lines = [l for l in m.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and a.sock in lines[0] and b.sock in lines[0], m.stderr
