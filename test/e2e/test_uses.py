"""SPEC §1, the three main uses, end to end with real filesystems:
mkfs + loop-mount a partition file and find the files again after a remount;
`dd if=fs.img of=MNT/disk-part2 bs=1M` (no conv=notrunc) checked on the server
by independent clients; xfs loop-mounted, vfat checked with mtools."""
import os

from nbdfs_test.data import MiB, SECTOR, image, nbd_read, read_file, sfdisk_json, sparse_file
from nbdfs_test.mounts import losetup_detach, umount
from nbdfs_test.polling import run


def _part(img, number):
    for p in sfdisk_json(img)["partitions"]:
        if p["number"] == number:
            return p["start"] * SECTOR, p["size"] * SECTOR
    raise AssertionError(f"no partition {number} in {img}")


def test_mkfs_loop_mount_remount(tmp_path, server, mount, loopdev, loopmount):
    img = image(tmp_path / "disk.img", 64 * MiB, "label: gpt\nsize=24M\nsize=24M\n")
    srv = server("file", img, log=False)

    m = mount(srv.uri(), opts=["-P"])
    part = m / "disk-part2"
    run(["mkfs.ext4", "-q", "-F", part])
    dev = loopdev(part)
    d = loopmount(dev)
    payload = os.urandom(300 * 1024)
    with open(os.path.join(d, "hello.txt"), "w") as f:
        f.write("hello nbdfs\n")
    os.mkdir(os.path.join(d, "sub"))
    with open(os.path.join(d, "sub", "blob"), "wb") as f:
        f.write(payload)
    umount(d)
    losetup_detach(dev)
    m.unmount()

    # Same long-running server, a fresh mount: the files are still there.
    m2 = mount(srv.uri(), opts=["-P"])
    d2 = loopmount(m2 / "disk-part2")
    with open(os.path.join(d2, "hello.txt")) as f:
        assert f.read() == "hello nbdfs\n"
    with open(os.path.join(d2, "sub", "blob"), "rb") as f:
        assert f.read() == payload
    # partition 1 was never touched
    start1, size1 = _part(img, 1)
    assert nbd_read(srv.uri(), start1, 64 * 1024) == bytes(64 * 1024)


def test_dd_filesystem_image_onto_partition(tmp_path, server, mount, loopmount, nbdkit):
    img = image(tmp_path / "disk.img", 64 * MiB, "label: gpt\nsize=16M\nsize=32M\n")
    srv = server("file", img, log=False)

    # A small ext4 image with content, smaller than the partition.
    content = tmp_path / "content"
    content.mkdir()
    (content / "a.txt").write_text("from dd\n")
    (content / "rand").write_bytes(os.urandom(200 * 1024))
    fsimg = sparse_file(tmp_path / "fs.img", 20 * MiB)
    run(["mkfs.ext4", "-q", "-F", "-d", content, fsimg])
    want = read_file(fsimg)

    m = mount(srv.uri(), opts=["-P"])
    r = run(["dd", f"if={fsimg}", f"of={m / 'disk-part2'}", "bs=1M"], check=False)
    assert r.returncode == 0, r.stderr.decode()
    # the device keeps its size: dd's O_TRUNC is ignored
    start, size = _part(img, 2)
    assert os.path.getsize(m / "disk-part2") == size

    # Oracle 1: the export range, read by nbdcopy straight from the server, at
    # the moment dd returned (close flushes).
    assert nbd_read(srv.uri(), start, len(want)) == want
    # Oracle 2: nbdkit's own partition filter on the same image file.
    other = nbdkit("-r", "--filter=partition", "file", img, "partition=2")
    assert nbd_read(other.uri(), 0, len(want)) == want
    # Partition 1 and the bytes after the image are untouched.
    assert nbd_read(srv.uri(), start + len(want), 4096) == bytes(4096)

    d = loopmount(m / "disk-part2")
    assert open(os.path.join(d, "a.txt")).read() == "from dd\n"
    assert open(os.path.join(d, "rand"), "rb").read() == (content / "rand").read_bytes()


def test_xfs_loop_mounted(tmp_path, server, mount, loopmount):
    # mkfs.xfs wants more than 300 MB; the image is sparse.
    img = image(tmp_path / "disk.img", 320 * MiB, "label: gpt\nsize=305M\n")
    srv = server("file", img, log=False)
    m = mount(srv.uri(), opts=["-P"])
    run(["mkfs.xfs", "-q", "-f", m / "disk-part1"], timeout=300)
    d = loopmount(m / "disk-part1")
    data = os.urandom(128 * 1024)
    with open(os.path.join(d, "x.bin"), "wb") as f:
        f.write(data)
    umount(d)
    d = loopmount(m / "disk-part1")
    assert open(os.path.join(d, "x.bin"), "rb").read() == data
    # the superblock is where the server has the partition
    start, _ = _part(img, 1)
    assert nbd_read(srv.uri(), start, 4) == b"XFSB"


def test_vfat_with_mtools(tmp_path, server, mount):
    img = image(tmp_path / "disk.img", 32 * MiB, "label: dos\nsize=8M, type=c\nsize=16M, type=c\n")
    srv = server("file", img, log=False)
    m = mount(srv.uri(), opts=["-P"])
    part = m / "disk-part2"
    run(["mkfs.vfat", "-n", "NBDFS", part])
    src = tmp_path / "note.txt"
    src.write_text("vfat via nbdfs\n")
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    run(["mcopy", "-i", part, src, "::/NOTE.TXT"], env=env)
    out = run(["mdir", "-i", part, "::/"], env=env).stdout.decode()
    assert "NOTE" in out and "NBDFS" in out
    m.unmount()

    # Independently of nbdfs: mtools straight on the image file at the partition offset.
    start, _ = _part(img, 2)
    back = tmp_path / "back.txt"
    run(["mcopy", "-i", f"{img}@@{start}", "::/NOTE.TXT", back], env=env)
    assert back.read_text() == "vfat via nbdfs\n"


def test_loop_direct_io_on_partition(tmp_path, server, mount, loopdev, loopmount):
    """losetup --direct-io=on: the loop device's I/O reaches nbdfs as O_DIRECT."""
    img = image(tmp_path / "disk.img", 48 * MiB, "label: dos\nsize=40M\n")
    srv = server("file", img, log=False)
    m = mount(srv.uri(), opts=["-P"])
    run(["mkfs.ext4", "-q", "-F", m / "disk-part1"])
    dev = loopdev(m / "disk-part1", direct_io=True)
    with open(f"/sys/block/{os.path.basename(dev)}/loop/dio") as f:
        assert f.read().strip() == "1", "the loop device fell back to buffered I/O"
    d = loopmount(dev)
    data = os.urandom(512 * 1024)
    with open(os.path.join(d, "dio.bin"), "wb") as f:
        f.write(data)
    umount(d)
    losetup_detach(dev)
    d = loopmount(m / "disk-part1")
    assert open(os.path.join(d, "dio.bin"), "rb").read() == data


def test_exports_as_files_cp_cmp_qemu_img(tmp_path, server, mount):
    """SPEC §1: anything that reads files (cp, cmp, qemu-img) works on an export."""
    img = image(tmp_path / "disk.img", 8 * MiB, "label: gpt\nsize=2M\n")
    with open(img, "r+b") as f:
        f.seek(3 * MiB)
        f.write(os.urandom(MiB))
    srv = server("file", img, log=False)
    m = mount(srv.uri())
    copy = tmp_path / "copy.img"
    run(["cp", m / "disk", copy])
    assert read_file(copy) == nbd_read(srv.uri())
    run(["cmp", m / "disk", img])
    info = run(["qemu-img", "info", "--output=json", "-f", "raw", m / "disk"]).stdout.decode()
    assert '"virtual-size": 8388608' in info
    out = tmp_path / "out.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", m / "disk", out], timeout=300)
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", m / "disk", out], timeout=300)


def test_no_libnbd_in_the_product(nbdfs_bin):
    """SPEC §1: its own NBD client core, no libnbd."""
    out = run(["ldd", nbdfs_bin]).stdout.decode()
    assert "libnbd" not in out, out
    assert "libfuse3" in out
