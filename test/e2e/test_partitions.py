"""SPEC §4, partitions on request: -P, split=FILE:SECTORS (nested, of a table
partition), user.nbdfs.partition auto/SECTORS/none at run time and its read
values, EBUSY/EINVAL rules, rescan after a new table, the read-only
attributes against sgdisk/sfdisk, ro mounts, and hostile tables."""
import errno
import os
import struct
import subprocess
import zlib

import pytest

from nbdfs_test.data import (MiB, SECTOR, errno_of, getx, image, nbd_read, opened, read_file,
                             set_partition, setx, sfdisk_json, sparse_file)
from nbdfs_test.polling import run

GPT2 = "label: gpt\nsize=4M, name=first\nsize=8M, name=second\n"


def _files(m):
    return m.files()


# ---------------------------------------------------------------- at mount time

def test_P_scans_tables(tmp_path, nbdkit, mount):
    img = image(tmp_path / "d.img", 16 * MiB, GPT2)
    m = mount(nbdkit("file", img).uri(), opts=["-P"])
    assert _files(m) == ["disk", "disk-part1", "disk-part2"]


def test_partitions_auto_option(tmp_path, nbdkit, mount):
    img = image(tmp_path / "d.img", 16 * MiB, GPT2)
    m = mount(nbdkit("file", img).uri(), opts=["-o", "partitions=auto"])
    assert _files(m) == ["disk", "disk-part1", "disk-part2"]


def test_no_partitions_without_P(tmp_path, nbdkit, mount):
    img = image(tmp_path / "d.img", 16 * MiB, GPT2)
    m = mount(nbdkit("file", img).uri())
    assert _files(m) == ["disk"]
    assert getx(m / "disk", "user.nbdfs.partition") == "none"


def test_P_on_export_without_table(nbdkit, mount):
    m = mount(nbdkit("memory", "8M").uri(), opts=["-P"])
    assert m.rc == 0
    assert _files(m) == ["disk"]
    assert getx(m / "disk", "user.nbdfs.partition") == "none"


def test_split_at_mount(nbdkit, mount):
    m = mount(nbdkit("pattern", "4M").uri(), opts=["-o", "split=disk:2048"])
    assert _files(m) == ["disk", "disk-part1", "disk-part2"]
    assert os.path.getsize(m / "disk-part1") == 2048 * SECTOR
    assert os.path.getsize(m / "disk-part2") == 4 * MiB - 2048 * SECTOR
    assert getx(m / "disk", "user.nbdfs.partition") == "split:2048"
    assert getx(m / "disk-part2", "user.nbdfs.start") == "2048"
    from nbdfs_test.data import pattern_bytes
    assert read_file(m / "disk-part2", 0, 64) == pattern_bytes(2048 * SECTOR, 64)
    assert read_file(m / "disk-part1", 2048 * SECTOR - 8, 100) == pattern_bytes(2048 * SECTOR - 8, 8)


def test_split_nested_and_repeated(nbdkit, mount):
    m = mount(nbdkit("memory", "4M").uri(),
              opts=["-o", "split=disk:1024", "-o", "split=disk-part2:2048"])
    assert _files(m) == ["disk", "disk-part1", "disk-part2", "disk-part2-part1", "disk-part2-part2"]
    assert os.path.getsize(m / "disk-part2-part1") == 2048 * SECTOR
    assert getx(m / "disk-part2-part2", "user.nbdfs.start") == str(1024 + 2048)
    assert os.path.getsize(m / "disk-part2-part2") == 4 * MiB - (1024 + 2048) * SECTOR


def test_split_of_a_table_partition(tmp_path, nbdkit, mount):
    img = image(tmp_path / "d.img", 16 * MiB, GPT2)
    m = mount(nbdkit("file", img).uri(), opts=["-P", "-o", "split=disk-part2:100"])
    assert "disk-part2-part1" in _files(m) and "disk-part2-part2" in _files(m)
    p2 = [p for p in sfdisk_json(img)["partitions"] if p["number"] == 2][0]
    assert getx(m / "disk-part2-part2", "user.nbdfs.start") == str(p2["start"] + 100)
    assert os.path.getsize(m / "disk-part2-part1") == 100 * SECTOR


def test_split_at_the_end_gives_empty_part2(nbdkit, mount):
    m = mount(nbdkit("memory", "1M").uri(), opts=["-o", "split=disk:2048"])
    assert os.path.getsize(m / "disk-part1") == MiB
    assert os.path.getsize(m / "disk-part2") == 0
    assert read_file(m / "disk-part2") == b""


def test_split_beyond_end_at_mount_fails(nbdkit, mount):
    m = mount(nbdkit("memory", "1M").uri(), opts=["-o", "split=disk:4096"], check=False)
    assert m.rc != 0 and not m.mounted()
    assert "disk" in m.stderr


def test_split_of_unknown_file_at_mount_fails(nbdkit, mount):
    m = mount(nbdkit("memory", "1M").uri(), opts=["-o", "split=nosuch:16"], check=False)
    assert m.rc != 0 and not m.mounted()
    assert "nosuch" in m.stderr


# ---------------------------------------------------------------- at run time

def test_setfattr_auto_split_none(tmp_path, nbdkit, mount):
    img = image(tmp_path / "d.img", 16 * MiB, GPT2)
    m = mount(nbdkit("file", img).uri())
    run(["setfattr", "-n", "user.nbdfs.partition", "-v", "auto", m / "disk"])
    assert _files(m) == ["disk", "disk-part1", "disk-part2"]
    assert getx(m / "disk", "user.nbdfs.partition") == "gpt"
    # a split replaces the table view
    run(["setfattr", "-n", "user.nbdfs.partition", "-v", "1000", m / "disk"])
    assert _files(m) == ["disk", "disk-part1", "disk-part2"]
    assert os.path.getsize(m / "disk-part1") == 1000 * SECTOR
    assert getx(m / "disk", "user.nbdfs.partition") == "split:1000"
    run(["setfattr", "-n", "user.nbdfs.partition", "-v", "none", m / "disk"])
    assert _files(m) == ["disk"]
    assert getx(m / "disk", "user.nbdfs.partition") == "none"
    out = run(["getfattr", "-d", m / "disk"]).stdout.decode()
    assert 'user.nbdfs.partition="none"' in out


def test_getfattr_dump_of_partition(tmp_path, nbdkit, mount):
    img = image(tmp_path / "d.img", 16 * MiB, GPT2)
    m = mount(nbdkit("file", img).uri(), opts=["-P"])
    out = run(["getfattr", "-d", m / "disk-part1"]).stdout.decode()
    for k in ("partition", "start", "sectors", "sector_size", "export", "uri", "type", "uuid",
              "label"):
        assert f"user.nbdfs.{k}=" in out, out


def test_partitioning_writes_nothing(tmp_path, server, mount):
    img = image(tmp_path / "d.img", 16 * MiB, GPT2)
    before = read_file(img)
    srv = server("file", img)
    m = mount(srv.uri())
    for v in ("auto", "none", "2048", "none", "auto"):
        set_partition(m / "disk", v)
    set_partition(m / "disk-part2", "100")
    set_partition(m / "disk-part2", "none")
    assert srv.log.requests("Write") == [] and srv.log.requests("Zero") == []
    assert srv.log.requests("Trim") == []
    assert read_file(img) == before


def test_mbr_value(tmp_path, nbdkit, mount):
    img = image(tmp_path / "d.img", 16 * MiB, "label: dos\nsize=4M\n")
    m = mount(nbdkit("file", img).uri(), opts=["-P"])
    assert getx(m / "disk", "user.nbdfs.partition") == "mbr"
    assert getx(m / "disk-part1", "user.nbdfs.partition") == "none"


def test_split_values_on_partition_and_nested_none(nbdkit, mount):
    m = mount(nbdkit("memory", "4M").uri())
    set_partition(m / "disk", "4096")
    set_partition(m / "disk-part2", "10")
    assert getx(m / "disk-part2", "user.nbdfs.partition") == "split:10"
    assert "disk-part2-part2" in m.files()
    # none on the top removes the whole subtree
    set_partition(m / "disk", "none")
    assert m.files() == ["disk"]


# ---------------------------------------------------------------- EBUSY / EINVAL

def test_ebusy_while_partition_open(tmp_path, nbdkit, mount):
    img = image(tmp_path / "d.img", 16 * MiB, GPT2)
    m = mount(nbdkit("file", img).uri(), opts=["-P"])
    with opened(m / "disk-part1", os.O_RDONLY):
        for v in ("none", "auto", "100"):
            assert errno_of(set_partition, m / "disk", v) == errno.EBUSY, v
        # checked before anything else: a malformed value is still EBUSY
        assert errno_of(set_partition, m / "disk", "garbage") == errno.EBUSY
        assert _files(m) == ["disk", "disk-part1", "disk-part2"]
    set_partition(m / "disk", "none")
    assert _files(m) == ["disk"]


def test_ebusy_while_grandchild_open(nbdkit, mount):
    m = mount(nbdkit("memory", "4M").uri(), opts=["-o", "split=disk:2048",
                                                  "-o", "split=disk-part2:100"])
    with open(m / "disk-part2-part2", "rb"):
        assert errno_of(set_partition, m / "disk", "none") == errno.EBUSY
        assert errno_of(set_partition, m / "disk-part2", "none") == errno.EBUSY
        # a sibling's children are not busy
        set_partition(m / "disk-part1", "10")
        set_partition(m / "disk-part1", "none")
    set_partition(m / "disk", "none")
    assert m.files() == ["disk"]


def test_open_export_file_itself_is_not_busy(tmp_path, nbdkit, mount):
    img = image(tmp_path / "d.img", 16 * MiB, GPT2)
    m = mount(nbdkit("file", img).uri())
    with open(m / "disk", "rb"):
        set_partition(m / "disk", "auto")
        set_partition(m / "disk", "none")


def test_einval_split_beyond_end(nbdkit, mount):
    m = mount(nbdkit("memory", "1M").uri())
    assert errno_of(set_partition, m / "disk", "2049") == errno.EINVAL
    assert m.files() == ["disk"]
    set_partition(m / "disk", "2048")   # exactly the end: allowed, part2 empty
    assert os.path.getsize(m / "disk-part2") == 0


@pytest.mark.parametrize("value", ["12abc", "-5", "", "auto2", "auto\n", "0x10", "1e3", "none please",
                                   "99999999999999999999999999"])
def test_einval_malformed(nbdkit, mount, value):
    m = mount(nbdkit("memory", "1M").uri())
    assert errno_of(set_partition, m / "disk", value) == errno.EINVAL
    assert m.files() == ["disk"]
    assert getx(m / "disk", "user.nbdfs.partition") == "none"


def test_einval_auto_without_table(nbdkit, mount):
    m = mount(nbdkit("memory", "8M").uri())
    assert errno_of(set_partition, m / "disk", "auto") == errno.EINVAL
    assert m.files() == ["disk"]


def test_einval_reason_logged(nbdkit, mount):
    m = mount(nbdkit("memory", "8M").uri(), foreground=True)
    assert errno_of(set_partition, m / "disk", "auto") == errno.EINVAL
    assert errno_of(set_partition, m / "disk", "99999") == errno.EINVAL
    log = m.log()
    assert "disk" in log and len([l for l in log.splitlines() if l.strip()]) >= 2, log


# ---------------------------------------------------------------- rescan

def test_rescan_after_sgdisk_on_mounted_export(nbdkit, mount):
    m = mount(nbdkit("memory", "32M").uri(), opts=["-P"])
    assert m.files() == ["disk"]
    run(["sgdisk", "-n", "1:2048:+4M", "-n", "2:0:+6M", "-c", "2:data", m / "disk"])
    set_partition(m / "disk", "auto")
    assert m.files() == ["disk", "disk-part1", "disk-part2"]
    assert os.path.getsize(m / "disk-part2") == 6 * MiB
    assert getx(m / "disk-part2", "user.nbdfs.label") == "data"
    # a new table (dd or sgdisk writes it), then rescan: the view follows
    run(["sgdisk", "-Z", m / "disk"])
    run(["sgdisk", "-n", "1:4096:+2M", "-n", "2:0:+2M", "-n", "3:0:+2M", m / "disk"])
    set_partition(m / "disk", "auto")
    assert m.files() == ["disk", "disk-part1", "disk-part2", "disk-part3"]
    assert getx(m / "disk-part1", "user.nbdfs.start") == "4096"
    assert os.path.getsize(m / "disk-part2") == 2 * MiB


def test_rescan_after_dd_of_new_table(tmp_path, nbdkit, mount):
    m = mount(nbdkit("memory", "16M").uri())
    tbl = image(tmp_path / "t.img", 16 * MiB, "label: dos\nsize=3M\nsize=3M\n")
    run(["dd", f"if={tbl}", f"of={m / 'disk'}", "bs=512", "count=1", "status=none"])
    set_partition(m / "disk", "auto")
    assert m.files() == ["disk", "disk-part1", "disk-part2"]
    assert os.path.getsize(m / "disk-part1") == 3 * MiB


# ---------------------------------------------------------------- read-only attributes

def _sgdisk_info(img, n):
    out = run(["sgdisk", "-i", str(n), img]).stdout.decode()
    info = {}
    for line in out.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            info[k.strip()] = v.strip()
    return info


def test_attributes_gpt_against_sgdisk(tmp_path, nbdkit, mount):
    img = image(tmp_path / "d.img", 16 * MiB, GPT2)
    srv = nbdkit("file", img)
    m = mount(srv.uri(), opts=["-P"])
    for n in (1, 2):
        info = _sgdisk_info(img, n)
        f = m / f"disk-part{n}"
        assert getx(f, "user.nbdfs.type").upper() == info["Partition GUID code"].split()[0].upper()
        assert getx(f, "user.nbdfs.uuid").upper() == info["Partition unique GUID"].upper()
        assert getx(f, "user.nbdfs.start") == info["First sector"].split()[0]
        assert getx(f, "user.nbdfs.sectors") == str(int(info["Last sector"].split()[0])
                                                      - int(info["First sector"].split()[0]) + 1)
        assert getx(f, "user.nbdfs.label") == info["Partition name"].strip("'")
        assert getx(f, "user.nbdfs.sector_size") == "512"
        assert getx(f, "user.nbdfs.export") == ""
        assert getx(f, "user.nbdfs.uri") == srv.uri()
    assert getx(m / "disk", "user.nbdfs.start") == "0"
    assert getx(m / "disk", "user.nbdfs.sectors") == str(16 * MiB // SECTOR)
    assert getx(m / "disk", "user.nbdfs.uri") == srv.uri()
    # an export and a split have no table attributes
    for a in ("user.nbdfs.type", "user.nbdfs.uuid", "user.nbdfs.label"):
        assert errno_of(getx, m / "disk", a) == errno.ENODATA


def test_attributes_mbr_against_sfdisk(tmp_path, nbdkit, mount):
    img = image(tmp_path / "d.img", 16 * MiB, "label: dos\nsize=4M, type=83\nsize=4M, type=c\n")
    m = mount(nbdkit("file", img).uri(), opts=["-P"])
    for p in sfdisk_json(img)["partitions"]:
        f = m / f"disk-part{p['number']}"
        assert int(getx(f, "user.nbdfs.type"), 16) == int(p["type"], 16)
        assert getx(f, "user.nbdfs.start") == str(p["start"])
        assert getx(f, "user.nbdfs.sectors") == str(p["size"])
        assert errno_of(getx, f, "user.nbdfs.uuid") == errno.ENODATA


def test_attributes_are_read_only(tmp_path, nbdkit, mount):
    img = image(tmp_path / "d.img", 16 * MiB, GPT2)
    m = mount(nbdkit("file", img).uri(), opts=["-P"])
    for a in ("start", "sectors", "sector_size", "export", "uri", "type", "uuid", "label"):
        before = getx(m / "disk-part1", f"user.nbdfs.{a}")
        assert errno_of(setx, m / "disk-part1", f"user.nbdfs.{a}", "1") is not None, a
        assert getx(m / "disk-part1", f"user.nbdfs.{a}") == before
    assert errno_of(os.removexattr, m / "disk-part1", "user.nbdfs.start") is not None


def test_listxattr(tmp_path, nbdkit, mount):
    img = image(tmp_path / "d.img", 16 * MiB, GPT2)
    m = mount(nbdkit("file", img).uri(), opts=["-P"])
    names = set(os.listxattr(m / "disk-part1"))
    assert {"user.nbdfs.partition", "user.nbdfs.start", "user.nbdfs.sectors",
            "user.nbdfs.sector_size", "user.nbdfs.export", "user.nbdfs.uri", "user.nbdfs.type",
            "user.nbdfs.uuid", "user.nbdfs.label"} <= names


def test_uri_attribute_has_no_secrets(tmp_path, nbdkit, mount):
    psk = tmp_path / "k.psk"
    run(["psktool", "-u", "alice", "-p", psk])
    key = psk.read_text().strip().split(":", 1)[1]
    srv = nbdkit("--tls=require", f"--tls-psk={psk}", "memory", "1M")
    uri = f"nbds+unix://alice@/?socket={srv.sock}&tls-psk-file={psk}"
    m = mount(uri, opts=["-o", f"tls-psk={psk}"])
    for name in os.listxattr(m / "disk"):
        v = os.getxattr(m / "disk", name).decode(errors="replace")
        assert key not in v
    u = getx(m / "disk", "user.nbdfs.uri")
    assert u.startswith("nbds+unix://") and srv.sock in u


# ---------------------------------------------------------------- read-only mounts

def test_partitioning_on_ro_mount(tmp_path, server, mount):
    img = image(tmp_path / "d.img", 16 * MiB, GPT2)
    srv = server("file", img)
    m = mount(srv.uri(), opts=["-o", "ro"])
    set_partition(m / "disk", "auto")
    assert m.files() == ["disk", "disk-part1", "disk-part2"]
    set_partition(m / "disk-part2", "8")
    assert "disk-part2-part2" in m.files()
    import stat
    assert stat.S_IMODE(os.stat(m / "disk-part2-part1").st_mode) == 0o444
    assert srv.log.requests("Write") == []


def test_partitioning_read_only_export(tmp_path, nbdkit, mount):
    img = image(tmp_path / "d.img", 16 * MiB, GPT2)
    m = mount(nbdkit("-r", "file", img).uri(), opts=["-P"])
    assert m.files() == ["disk", "disk-part1", "disk-part2"]


# ---------------------------------------------------------------- hostile tables

def test_mbr_entry_beyond_disk_refused_others_present(tmp_path, nbdkit, mount):
    img = image(tmp_path / "d.img", 32 * MiB, "label: dos\nsize=4M\nsize=20M\nsize=4M\n")
    # the server shows only 16 MiB: partition 2 (ends at ~25M) and 3 lie outside
    srv = nbdkit("--filter=truncate", "file", img, "truncate=16M")
    m = mount(srv.uri(), opts=["-P"], foreground=True)
    assert m.files() == ["disk", "disk-part1"]
    assert m.log().strip(), "no reason logged for the refused entries"


def _gpt_patch(img, entry_index, first=None, last=None, hdr_last_usable=None):
    """Rewrites a GPT entry (and header field) in img, fixing both CRCs in the
    primary and the backup: a table valid in form but hostile in content."""
    with open(img, "r+b") as f:
        f.seek(SECTOR)
        hdr = bytearray(f.read(92))
        alt = struct.unpack_from("<Q", hdr, 32)[0]
        for hlba in (1, alt):
            f.seek(hlba * SECTOR)
            h = bytearray(f.read(92))
            assert h[:8] == b"EFI PART"
            hsize = struct.unpack_from("<I", h, 12)[0]
            elba, n, esz = struct.unpack_from("<QII", h, 72)
            f.seek(elba * SECTOR)
            ents = bytearray(f.read(n * esz))
            o = entry_index * esz
            if first is not None:
                struct.pack_into("<Q", ents, o + 32, first)
            if last is not None:
                struct.pack_into("<Q", ents, o + 40, last)
            f.seek(elba * SECTOR)
            f.write(ents)
            if hdr_last_usable is not None:
                struct.pack_into("<Q", h, 48, hdr_last_usable)
            struct.pack_into("<I", h, 88, zlib.crc32(ents) & 0xffffffff)
            struct.pack_into("<I", h, 16, 0)
            struct.pack_into("<I", h, 16, zlib.crc32(bytes(h[:hsize])) & 0xffffffff)
            f.seek(hlba * SECTOR)
            f.write(h)


def test_gpt_entry_beyond_disk_refused_others_present(tmp_path, nbdkit, mount):
    img = image(tmp_path / "d.img", 16 * MiB, "label: gpt\nsize=2M\nsize=2M\nsize=2M\n")
    _gpt_patch(img, 1, last=10 ** 12)       # entry 2 ends far outside the disk
    m = mount(nbdkit("file", img).uri(), opts=["-P"], foreground=True)
    assert m.files() == ["disk", "disk-part1", "disk-part3"]
    assert "2" in m.log()


def test_gpt_entry_outside_usable_range_refused(tmp_path, nbdkit, mount):
    img = image(tmp_path / "d.img", 16 * MiB, "label: gpt\nsize=2M\nsize=2M\n")
    # entry 1 starts on the primary header's own LBA (before first usable)
    _gpt_patch(img, 0, first=1)
    m = mount(nbdkit("file", img).uri(), opts=["-P"])
    assert m.files() == ["disk", "disk-part2"]


def test_gpt_backup_used_when_primary_damaged(tmp_path, nbdkit, mount):
    img = image(tmp_path / "d.img", 16 * MiB, GPT2)
    with open(img, "r+b") as f:
        f.seek(SECTOR + 16)     # the primary header's CRC field
        f.write(b"\0\0\0\0")
    m = mount(nbdkit("file", img).uri(), opts=["-P"])
    assert m.files() == ["disk", "disk-part1", "disk-part2"]


def test_mbr_logical_chain_loop_terminates(tmp_path, nbdkit, mount):
    img = image(tmp_path / "d.img", 32 * MiB,
                "label: dos\nsize=2M\nsize=20M, type=5\nsize=2M\nsize=2M\nsize=2M\n")
    t = sfdisk_json(img)
    ext = [p for p in t["partitions"] if p["type"] == "5"][0]
    logicals = sorted((p for p in t["partitions"] if p["number"] >= 5), key=lambda p: p["start"])
    # the last EBR's link entry points back at the first EBR (relative start 0)
    with open(img, "r+b") as f:
        # EBR of the last logical sits before it; find it by scanning back to 0x55AA
        last = logicals[-1]["start"]
        ebr = last - 1
        while ebr > ext["start"]:
            f.seek(ebr * SECTOR + 510)
            if f.read(2) == b"\x55\xaa":
                break
            ebr -= 1
        f.seek(ebr * SECTOR + 446 + 16)
        f.write(struct.pack("<BBBBBBBBII", 0, 0, 0, 0, 0x05, 0, 0, 0, 0, 2048))
    m = mount(nbdkit("file", img).uri(), opts=["-P"], timeout=60)
    files = m.files()
    assert "disk-part1" in files and "disk-part5" in files
    assert len(files) < 20


def test_mbr_overlapping_and_zero_size_entries(tmp_path, nbdkit, mount):
    img = image(tmp_path / "d.img", 16 * MiB, "label: dos\nsize=4M\nsize=4M\n")
    with open(img, "r+b") as f:
        # entry 3: start 0 (overlaps the MBR itself) size 100; entry 4: size 0
        f.seek(446 + 2 * 16)
        f.write(struct.pack("<BBBBBBBBII", 0, 0, 0, 0, 0x83, 0, 0, 0, 0, 100))
        f.write(struct.pack("<BBBBBBBBII", 0, 0, 0, 0, 0x83, 0, 0, 0, 4096, 0))
    m = mount(nbdkit("file", img).uri(), opts=["-P"])
    files = m.files()
    assert "disk-part1" in files and "disk-part2" in files
    assert "disk-part4" not in files
    for f in files:
        assert os.path.getsize(m / f) <= 16 * MiB


def _corrupt_entries(img, which):
    """Flips a byte inside the GPT entry array of the primary and/or backup
    (without fixing the CRC)."""
    with open(img, "r+b") as f:
        f.seek(SECTOR)
        h = f.read(92)
        alt = struct.unpack_from("<Q", h, 32)[0]
        for hlba in ((1,) if which == "primary" else (1, alt)):
            f.seek(hlba * SECTOR)
            hh = f.read(92)
            elba = struct.unpack_from("<Q", hh, 72)[0]
            f.seek(elba * SECTOR + 56)      # inside entry 1's name
            b = f.read(1)
            f.seek(elba * SECTOR + 56)
            f.write(bytes([b[0] ^ 0xff]))


def test_gpt_entry_crc_checked_backup_used(tmp_path, nbdkit, mount):
    img = image(tmp_path / "d.img", 16 * MiB, GPT2)
    _corrupt_entries(img, "primary")
    m = mount(nbdkit("file", img).uri(), opts=["-P"])
    assert m.files() == ["disk", "disk-part1", "disk-part2"]
    assert getx(m / "disk-part1", "user.nbdfs.label") == "first"


def test_gpt_both_copies_bad_no_table(tmp_path, nbdkit, mount):
    img = image(tmp_path / "d.img", 16 * MiB, "label: gpt\nsize=4M\n")
    _corrupt_entries(img, "both")
    m = mount(nbdkit("file", img).uri(), opts=["-P"])
    assert m.files() == ["disk"]
    assert errno_of(set_partition, m / "disk", "auto") == errno.EINVAL


def test_nested_entry_beyond_its_parent_refused(tmp_path, nbdkit, mount):
    """A table inside disk-part2 whose second entry runs past the end of
    disk-part2 (though still inside the export): refused, the first stays."""
    img = image(tmp_path / "outer.img", 64 * MiB, "label: gpt\nsize=16M\nsize=8M\n")
    p2 = [p for p in sfdisk_json(img)["partitions"] if p["number"] == 2][0]
    inner = image(tmp_path / "inner.img", 32 * MiB, "label: dos\nsize=2M\nsize=20M\n")
    with open(inner, "rb") as f:
        mbr = f.read(SECTOR)
    with open(img, "r+b") as f:
        f.seek(p2["start"] * SECTOR)
        f.write(mbr)
    m = mount(nbdkit("file", img).uri(), opts=["-P"])
    set_partition(m / "disk-part2", "auto")
    assert [f for f in m.files() if f.startswith("disk-part2-")] == ["disk-part2-part1"]
    assert os.path.getsize(m / "disk-part2-part1") == 2 * MiB


def test_ebusy_while_loop_device_holds_partition(tmp_path, nbdkit, mount, loopdev):
    img = image(tmp_path / "d.img", 16 * MiB, GPT2)
    m = mount(nbdkit("file", img).uri(), opts=["-P"])
    dev = loopdev(m / "disk-part2")
    assert errno_of(set_partition, m / "disk", "none") == errno.EBUSY
    assert errno_of(set_partition, m / "disk", "auto") == errno.EBUSY
    from nbdfs_test.mounts import losetup_detach
    losetup_detach(dev)
    from nbdfs_test.polling import wait_for

    def released():
        return errno_of(set_partition, m / "disk", "none") is None
    wait_for(released, timeout=10, what="the partitions to be free after losetup -d")
    assert m.files() == ["disk"]


def test_repartition_races_with_opens(tmp_path, nbdkit, mount):
    """One thread opens and reads partition files while another replaces and
    removes the partitions: every call ends in success, EBUSY or ENOENT, the
    daemon survives, and the final state is consistent."""
    import threading
    img = image(tmp_path / "d.img", 16 * MiB, GPT2)
    m = mount(nbdkit("file", img).uri(), opts=["-P"])
    stop = threading.Event()
    bad = []

    def opener():
        while not stop.is_set():
            for name in ("disk-part1", "disk-part2"):
                try:
                    with open(m / name, "rb") as f:
                        f.read(4096)
                except OSError as e:
                    if e.errno not in (errno.ENOENT, errno.ESTALE):
                        bad.append(("open", name, e.errno))

    th = [threading.Thread(target=opener) for _ in range(2)]
    for t in th:
        t.start()
    try:
        for i in range(150):
            v = ("none", "auto", "2048", "auto")[i % 4]
            e = errno_of(set_partition, m / "disk", v)
            if e not in (None, errno.EBUSY):
                bad.append(("setfattr", v, e))
    finally:
        stop.set()
        for t in th:
            t.join(timeout=60)
    assert not any(t.is_alive() for t in th)
    assert not bad, bad[:10]
    set_partition(m / "disk", "auto")
    assert m.files() == ["disk", "disk-part1", "disk-part2"]
    assert getx(m / "disk-part1", "user.nbdfs.label") == "first"
