"""Second and third real servers: qemu-nbd and nbd-server, through the basic
flow of SPEC §1 (mount, read, write, `dd` onto a partition, -P, loop-mount)."""
import errno
import os

import pytest

from nbdfs_test.data import (MiB, SECTOR, errno_of, image, nbd_read, read_file, sfdisk_json,
                             sparse_file)
from nbdfs_test.mounts import umount
from nbdfs_test.polling import run


def _flow(tmp_path, uri, img, mount, loopmount):
    m = mount(uri, opts=["-P"])
    files = m.files()
    exp = [f for f in files if "-part" not in f]
    assert len(exp) == 1, files
    disk = exp[0]
    assert files == [disk, f"{disk}-part1", f"{disk}-part2"]
    assert os.path.getsize(m / disk) == os.path.getsize(img)
    t = sfdisk_json(img)
    p2 = [p for p in t["partitions"] if p["number"] == 2][0]
    assert os.path.getsize(m / f"{disk}-part2") == p2["size"] * SECTOR

    # unaligned write through the export file, checked by an independent client
    with open(m / disk, "r+b") as f:
        f.seek(3 * MiB + 3)
        f.write(b"unaligned!")
    assert nbd_read(uri, 3 * MiB, 16) == b"\0\0\0unaligned!\0\0\0"

    # dd a filesystem image onto partition 2 (no conv=notrunc)
    content = tmp_path / "content"
    content.mkdir()
    (content / "f.txt").write_text("server test\n")
    fsimg = sparse_file(tmp_path / "fs.img", 8 * MiB)
    run(["mkfs.ext4", "-q", "-F", "-d", content, fsimg])
    r = run(["dd", f"if={fsimg}", f"of={m / (disk + '-part2')}", "bs=1M"], check=False)
    assert r.returncode == 0, r.stderr.decode()
    want = read_file(fsimg)
    assert nbd_read(uri, p2["start"] * SECTOR, len(want)) == want

    d = loopmount(m / f"{disk}-part2")
    assert open(os.path.join(d, "f.txt")).read() == "server test\n"
    with open(os.path.join(d, "g.txt"), "w") as f:
        f.write("written through the loop device\n")
    umount(d)
    d = loopmount(m / f"{disk}-part2")
    assert open(os.path.join(d, "g.txt")).read() == "written through the loop device\n"
    return m


def _img(tmp_path):
    return image(tmp_path / "disk.img", 32 * MiB, "label: gpt\nsize=4M\nsize=16M\n")


def test_qemu_nbd(tmp_path, server, mount, loopmount):
    img = _img(tmp_path)
    srv = server.qemu_nbd(img)
    _flow(tmp_path, srv.uri(), img, mount, loopmount)


def test_qemu_nbd_named_export_read_only(tmp_path, server, mount):
    img = _img(tmp_path)
    srv = server.qemu_nbd(img, "-x", "vm1", "-r")
    m = mount(srv.uri("vm1"), opts=["-P"])
    assert m.files() == ["vm1", "vm1-part1", "vm1-part2"]
    import stat
    assert stat.S_IMODE(os.stat(m / "vm1").st_mode) == 0o444
    assert read_file(m / "vm1", 0, 4096) == read_file(img, 0, 4096)


def test_nbd_server(tmp_path, server, mount, loopmount):
    img = _img(tmp_path)
    srv = server.nbd_server(img, name="disk")
    _flow(tmp_path, srv.uri(), img, mount, loopmount)


def test_nbd_server_all_exports(tmp_path, server, mount):
    img = _img(tmp_path)
    srv = server.nbd_server(img, name="exp1")
    m = mount(srv.uri(), opts=["-a"])
    assert m.files() == ["exp1"]
    assert os.path.getsize(m / "exp1") == 32 * MiB


@pytest.mark.parametrize("variant", [["-o"], ["--mask-handshake=0"], ["--no-sr"],
                                     ["--mask-handshake=2"]],
                         ids=["oldstyle", "newstyle-not-fixed", "no-structured-replies",
                              "no-zeroes"])
def test_protocol_variants_mount(server, mount, variant):
    srv = server(*variant, "memory", "2M")
    m = mount(srv.uri())
    assert m.files() == ["disk"]
    # nbdkit 1.32 in oldstyle mode advertises SEND_FLUSH (eflags 0xd6d) yet
    # rejects NBD_CMD_FLUSH with EINVAL (libnbd's nbdcopy --flush fails the
    # same way): there the server's error must come back, not be hidden.
    oldstyle = variant == ["-o"]
    fd = os.open(m / "disk", os.O_RDWR)
    try:
        assert os.pwrite(fd, b"variant", 1001) == 7
        if oldstyle:
            assert errno_of(os.fsync, fd) == errno.EINVAL
        else:
            os.fsync(fd)       # the server advertises FLUSH: it must be sent
            assert srv.log.requests("Flush"), "no NBD_CMD_FLUSH reached the server"
    finally:
        if oldstyle:
            errno_of(os.close, fd)
        else:
            os.close(fd)
    assert read_file(m / "disk", 1000, 9) == b"\0variant\0"
    assert nbd_read(srv.uri(), 1001, 7) == b"variant"
