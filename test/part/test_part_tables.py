"""The partition table reader against tables written by real tools.

part-dump (test/unit/part/part-dump.c) prints what part_table_read() finds in
an image; these tests compare it with
  - sfdisk --json and sgdisk -i (the tools that wrote the tables),
  - libblkid (partx --show), a third parser, and the kernel's own partition
    scan (a loop device with -P: sysfs start/size) where the running kernel
    has partition parsers (some VM kernels have none: then partx stands in),
  - nbdkit's partition filter (size, and the very bytes of each partition),
on MBR disks with logical partitions, GPT disks, damaged GPTs, and 4096-byte
sector disks (sfdisk/sgdisk on a 4K loop device).  Loop devices and servers
are released in `finally`.
"""
import json
import os
import re
import shutil
import subprocess

import pytest

from nbdfs_test.build import build_path
from nbdfs_test.polling import wait_for

PART_DUMP = build_path("test", "unit", "part", "part-dump")
MiB = 1 << 20
EXTENDED = {0x05, 0x0F, 0x85}


# ---- helpers ---------------------------------------------------------------

def run(*args, input=None):
    return subprocess.run([str(a) for a in args], check=True, capture_output=True,
                          input=input, text=True).stdout


def sparse_image(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def part_dump(img, sector_size=512, expect_table=True):
    """Runs part-dump; returns {kind, sector_size, used_backup, disk_guid,
    entries: {number: {...}}, warnings: [...]} or {error: ...}."""
    assert os.path.exists(PART_DUMP), f"build part-dump first ({PART_DUMP})"
    p = subprocess.run([PART_DUMP, "--sector-size", str(sector_size), str(img)],
                       capture_output=True, text=True)
    if p.returncode == 1:
        assert not expect_table, p.stdout
        m = re.match(r"error (\S+) (.*)", p.stdout)
        return {"error": m.group(1), "message": m.group(2)}
    assert p.returncode == 0, p.stderr
    out = {"entries": {}, "warnings": []}
    for line in p.stdout.splitlines():
        if line.startswith("table "):
            f = line.split()
            out.update(kind=f[1], sector_size=int(f[3]), used_backup=f[5] == "1",
                       disk_guid=f[7])
        elif line.startswith("entry "):
            m = re.match(r"entry (\d+) start (\d+) sectors (\d+) mbr_type 0x(\w+) type (\S+) "
                         r"uuid (\S+) label (.*)$", line)
            n = int(m.group(1))
            out["entries"][n] = dict(start=int(m.group(2)), sectors=int(m.group(3)),
                                     mbr_type=int(m.group(4), 16), type=m.group(5),
                                     uuid=m.group(6), label=m.group(7))
        elif line.startswith("warning "):
            out["warnings"].append(line[len("warning "):])
    assert expect_table, out
    return out


def sfdisk_table(dev):
    """sfdisk --json: {number: (start, size, type)} without extended
    partitions, plus the table's label/id/sectorsize."""
    pt = json.loads(run("sfdisk", "--json", dev))["partitiontable"]
    parts = {}
    for p in pt.get("partitions", []):
        number = int(re.search(r"(\d+)$", p["node"][len(pt["device"]):]).group(1))
        if pt["label"] == "dos" and int(p["type"], 16) in EXTENDED:
            continue
        parts[number] = p
    return pt, parts


def sgdisk_info(img, number):
    text = run("sgdisk", "-i", number, img)
    field = lambda name: re.search(rf"^{name}: (.*)$", text, re.M).group(1)  # noqa: E731
    return dict(first=int(field("First sector").split()[0]),
                last=int(field("Last sector").split()[0]),
                type=field("Partition GUID code").split()[0].lower(),
                uuid=field("Partition unique GUID").lower(),
                name=field("Partition name").strip("'"))


def kernel_partitions(loop, sector_size):
    """The kernel's partitions of a loop device from sysfs, in sectors of
    @sector_size: {number: (start, sectors)}."""
    name = os.path.basename(loop)
    base = f"/sys/class/block/{name}"
    parts = {}
    for d in os.listdir(base):
        if not d.startswith(name + "p"):
            continue
        with open(f"{base}/{d}/partition") as f:
            n = int(f.read())
        with open(f"{base}/{d}/start") as f:
            start = int(f.read()) * 512 // sector_size
        with open(f"{base}/{d}/size") as f:
            size = int(f.read()) * 512 // sector_size
        parts[n] = (start, size)
    return parts


@pytest.fixture
def loop():
    """attach(img, sector_size) -> /dev/loopN with partition scanning;
    every loop device is detached at teardown."""
    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control"):
        pytest.skip("loop devices need root")
    attached = []

    def attach(img, sector_size=512):
        dev = run("losetup", "-f", "--show", "-P", "-b", sector_size, img).strip()
        attached.append(dev)
        return dev

    try:
        yield attach
    finally:
        for dev in attached:
            subprocess.run(["losetup", "-d", dev], check=False)


def blkid_partitions(dev, sector_size):
    """libblkid's partitions (partx --show; it counts in 512-byte units)."""
    parts = {}
    for line in run("partx", "-s", "-g", "-o", "NR,START,SECTORS", dev).splitlines():
        n, start, size = (int(x) for x in line.split())
        parts[n] = (start * 512 // sector_size, size * 512 // sector_size)
    return parts


def assert_kernel_agrees(loop_dev, sector_size, ours, extended_numbers=()):
    """libblkid and (where it parses tables) the kernel see what we see."""
    want = {n: (e["start"], e["sectors"]) for n, e in ours["entries"].items()}
    blkid = {n: v for n, v in blkid_partitions(loop_dev, sector_size).items()
             if n not in extended_numbers}
    assert blkid == want
    if want and not kernel_partitions(loop_dev, sector_size):
        print(f"the kernel ({os.uname().release}) shows no partitions of {loop_dev}: "
              "no partition parsers built in; libblkid was the oracle")
        return

    def kernel():
        k = {n: v for n, v in kernel_partitions(loop_dev, sector_size).items()
             if n not in extended_numbers}
        return k if k == want else None

    try:
        wait_for(kernel, timeout=10, what="the kernel's partitions to match")
    except BaseException:
        print("kernel:", kernel_partitions(loop_dev, sector_size), "ours:", want)
        raise


MBR_SCRIPT = """label: dos
unit: sectors
2048,8192,83
10240,8192,7
18432,,5
,4096,83
,4096,c
,4096,82
"""

GPT_ARGS = ["-n", "1:2048:+2M", "-t", "1:ef00", "-c", "1:EFI system",
            "-n", "2:0:+4M", "-t", "2:8300", "-c", "2:root \u00e9t\u00e9",
            "-n", "5:0:+3M", "-t", "5:8200", "-c", "5:swap",
            "-n", "7:0:0", "-t", "7:8302", "-c", "7:home"]


def assert_same_as_sfdisk(dev, ours, sector_size=512):
    pt, parts = sfdisk_table(dev)
    assert pt["sectorsize"] == sector_size
    assert sorted(ours["entries"]) == sorted(parts)
    for n, p in parts.items():
        e = ours["entries"][n]
        assert (e["start"], e["sectors"]) == (p["start"], p["size"]), n
        if pt["label"] == "dos":
            assert e["mbr_type"] == int(p["type"], 16)
        else:
            assert e["type"] == p["type"].lower()
            assert e["uuid"] == p["uuid"].lower()
            assert e["label"] == p.get("name", "")
    if pt["label"] == "gpt":
        assert ours["disk_guid"] == pt["id"].lower()
    return pt


# ---- MBR -------------------------------------------------------------------

def test_sfdisk_mbr_logicals(tmp_path, loop):
    img = sparse_image(tmp_path / "mbr.img", 32 * MiB)
    run("sfdisk", "-q", img, input=MBR_SCRIPT)
    ours = part_dump(img)
    assert ours["kind"] == "mbr" and ours["warnings"] == []
    assert sorted(ours["entries"]) == [1, 2, 5, 6, 7]
    assert [ours["entries"][n]["mbr_type"] for n in (1, 2, 5, 6, 7)] == [0x83, 7, 0x83, 0xC, 0x82]
    assert_same_as_sfdisk(img, ours)
    assert_kernel_agrees(loop(img), 512, ours, extended_numbers=(3,))


def test_sfdisk_mbr_4096(tmp_path, loop):
    """sfdisk on a 4096-byte-sector loop device: MBR in 4K units."""
    img = sparse_image(tmp_path / "mbr4k.img", 64 * MiB)
    dev = loop(img, 4096)
    run("sfdisk", "-q", dev, input="label: dos\nunit: sectors\n256,2048,83\n2304,,5\n"
        ",1024,83\n,1024,83\n,1024,83\n")
    run("blockdev", "--flushbufs", dev)
    ours = part_dump(img, 4096)
    assert ours["kind"] == "mbr" and ours["sector_size"] == 4096 and ours["warnings"] == []
    assert sorted(ours["entries"]) == [1, 5, 6, 7]
    assert_same_as_sfdisk(dev, ours, 4096)
    assert_kernel_agrees(dev, 4096, ours, extended_numbers=(2,))
    # The same bytes read with 512-byte sectors describe other sectors:
    # nothing may be taken for granted there, but nothing may crash either.
    other = part_dump(img, 512)
    assert other["kind"] == "mbr"


# ---- GPT -------------------------------------------------------------------

def test_sgdisk_gpt(tmp_path, loop):
    img = sparse_image(tmp_path / "gpt.img", 32 * MiB)
    run("sgdisk", *GPT_ARGS, img)
    ours = part_dump(img)
    assert ours["kind"] == "gpt" and ours["warnings"] == [] and not ours["used_backup"]
    assert sorted(ours["entries"]) == [1, 2, 5, 7]
    assert_same_as_sfdisk(img, ours)
    for n, e in ours["entries"].items():
        info = sgdisk_info(img, n)
        assert (e["start"], e["start"] + e["sectors"] - 1) == (info["first"], info["last"])
        assert (e["type"], e["uuid"], e["label"]) == (info["type"], info["uuid"], info["name"])
    assert ours["entries"][2]["label"] == "root \u00e9t\u00e9"
    assert_kernel_agrees(loop(img), 512, ours)


@pytest.mark.parametrize("where", ["primary-header", "primary-entries", "backup-header"])
def test_sgdisk_gpt_damaged(tmp_path, loop, where):
    """One damaged copy: the other is used, with a warning; the kernel
    (which also falls back) shows the same partitions."""
    img = sparse_image(tmp_path / "gpt.img", 32 * MiB)
    run("sgdisk", *GPT_ARGS, img)
    good = part_dump(img)
    last = 32 * MiB // 512 - 1
    offset = {"primary-header": 512 + 24,          # my_lba
              "primary-entries": 1024 + 32,        # entry 1 first LBA
              "backup-header": last * 512 + 8}[where]
    with open(img, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))
    ours = part_dump(img)
    assert ours["entries"] == good["entries"]
    assert len(ours["warnings"]) == 1, ours["warnings"]
    if where == "backup-header":
        assert not ours["used_backup"]
        assert ours["warnings"][0].startswith(f"GPT: backup header at LBA {last} is damaged")
    else:
        assert ours["used_backup"]
        what = "header CRC mismatch" if where == "primary-header" else \
            "partition entries CRC mismatch"
        assert ours["warnings"][0] == f"GPT: primary {what}, using backup at LBA {last}"
    assert_kernel_agrees(loop(img), 512, ours)


def test_sgdisk_gpt_4096(tmp_path, loop):
    """sgdisk on a 4096-byte-sector loop device: GPT at byte 4096, LBAs in 4K."""
    img = sparse_image(tmp_path / "gpt4k.img", 64 * MiB)
    dev = loop(img, 4096)
    run("sgdisk", "-n", "1:256:+8M", "-t", "1:ef00", "-c", "1:boot",
        "-n", "3:0:+16M", "-c", "3:data", "-n", "4:0:0", "-c", "4:rest", dev)
    run("blockdev", "--flushbufs", dev)
    ours = part_dump(img, 4096)
    assert ours["kind"] == "gpt" and ours["sector_size"] == 4096 and ours["warnings"] == []
    assert sorted(ours["entries"]) == [1, 3, 4]
    assert ours["entries"][1] == dict(ours["entries"][1], start=256, sectors=2048)
    assert_same_as_sfdisk(dev, ours, 4096)
    assert_kernel_agrees(dev, 4096, ours)
    # Read with the wrong sector size the GPT is not found.
    wrong = part_dump(img, 512, expect_table=False)
    assert wrong["error"] == "no_table" and "no valid GPT" in wrong["message"]


# ---- nbdkit's partitioning plugin and partition filter ----------------------

def make_files(tmp_path, sizes):
    files = []
    for i, size in enumerate(sizes, 1):
        f = tmp_path / f"p{i}.bin"
        f.write_bytes(bytes([0x30 + i]) * size)
        files.append(str(f))
    return files


@pytest.mark.parametrize("kind", ["mbr", "gpt"])
def test_nbdkit_partitioning(tmp_path, nbdkit, kind):
    """A disk built by nbdkit's partitioning plugin (6 files: for MBR three
    primaries and logicals 5, 6, 7), copied with nbdcopy; every partition's
    size and bytes must match what nbdkit's partition filter serves."""
    sizes = [64 * 1024, 100 * 1024, 3 * 512, 200 * 1024, 512, 40 * 1024]
    files = make_files(tmp_path, sizes)
    srv = nbdkit("partitioning", *files, f"partition-type={kind}")
    disk = str(tmp_path / "disk.img")
    run("nbdcopy", srv.uri(), disk)
    ours = part_dump(disk)
    assert ours["kind"] == kind and ours["warnings"] == []
    numbers = [1, 2, 3, 5, 6, 7] if kind == "mbr" else [1, 2, 3, 4, 5, 6]
    assert sorted(ours["entries"]) == numbers
    assert_same_as_sfdisk(disk, ours)
    data = open(disk, "rb").read()
    for n, f, size in zip(numbers, files, sizes):
        e = ours["entries"][n]
        assert e["sectors"] == (size + 511) // 512
        part = nbdkit("-r", "--filter=partition", "file", disk, f"partition={n}")
        assert int(run("nbdinfo", "--size", part.uri()).strip()) == e["sectors"] * 512
        out = str(tmp_path / f"part{n}.out")
        run("nbdcopy", part.uri(), out)
        got = open(out, "rb").read()
        assert got == data[e["start"] * 512:(e["start"] + e["sectors"]) * 512]
        assert got[:size] == open(f, "rb").read()
        part.kill()


# ---- not tables ------------------------------------------------------------

@pytest.mark.parametrize("mkfs", [["mkfs.vfat"], ["mkfs.vfat", "-F", "32"], ["mkfs.ext4", "-q"]])
def test_whole_device_filesystem(tmp_path, mkfs):
    if shutil.which(mkfs[0]) is None:
        pytest.fail(f"{mkfs[0]} is not installed")
    img = sparse_image(tmp_path / "fs.img", 64 * MiB)
    run(*mkfs, img)
    got = part_dump(img, expect_table=False)
    assert got["error"] == "no_table"
    assert "FAT boot sector" in got["message"] or "no MBR signature" in got["message"]


def test_zeroed_and_tiny(tmp_path):
    img = sparse_image(tmp_path / "zero.img", MiB)
    got = part_dump(img, expect_table=False)
    assert got == {"error": "no_table",
                   "message": "partition table: no MBR signature (0x55AA) in sector 0"}
    tiny = sparse_image(tmp_path / "tiny.img", 100)
    got = part_dump(tiny, expect_table=False)
    assert "device too small (100 bytes" in got["message"]
