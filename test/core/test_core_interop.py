"""NBD client core vs the other real servers: qemu-nbd and nbd-server.
Round trip (write/read/flush/list) checked against the backing file."""
import os

import pytest

from nbdfs_test.core import run_cli

KiB = 1024
MiB = 1024 * 1024


def make_image(path, size=4 * MiB):
    data = bytearray(os.urandom(size))
    path.write_bytes(data)
    return data


def roundtrip(uri, image, data, list_expect):
    res = run_cli(uri, "info")
    assert res.returncode == 0, res
    i = res.info()
    assert i["size"] == str(len(data)), i
    assert i["read_write"] == "1"
    assert i["alive"] == "1"

    res = run_cli(uri, "read", 0, len(data))
    assert res.returncode == 0, res
    assert res.stdout == bytes(data)

    new = os.urandom(192 * KiB)
    off = MiB + 512
    res = run_cli(uri, "write", off, len(new), "flush", "read", off - 512, len(new) + 1024,
                  input=new)
    assert res.returncode == 0, res
    data[off:off + len(new)] = new
    assert res.stdout == bytes(data[off - 512:off + len(new) + 512])
    with open(image, "rb") as f:
        assert f.read() == bytes(data), "the write did not reach the backing file"

    res = run_cli(uri, "zero", 2 * MiB, 64 * KiB, "flush", "expect", 2 * MiB, 64 * KiB, 0)
    assert res.returncode == 0, res
    data[2 * MiB:2 * MiB + 64 * KiB] = bytes(64 * KiB)
    with open(image, "rb") as f:
        assert f.read() == bytes(data)

    res = run_cli(uri, "list")
    assert res.returncode == 0, res
    names = [line.split("\t") for line in res.text.splitlines()]
    assert list_expect in names, names
    return data


def test_qemu_nbd_roundtrip(qemu_nbd, tmp_path):
    img = tmp_path / "disk.img"
    data = make_image(img)
    srv = qemu_nbd(img, name="disk", description="qemu disk")
    roundtrip(srv.uri(), img, data, ["disk", "qemu disk"])
    res = run_cli(srv.uri(), "info")
    assert res.info()["protocol"] == "newstyle-fixed"
    assert res.info()["structured_replies"] == "1"
    assert res.info()["export_name"] == "disk"


@pytest.mark.parametrize("cmd", ["extents", "aio-extents"], ids=["sync", "aio"])
def test_qemu_nbd_block_status_and_stress(qemu_nbd, tmp_path, cmd):
    img = tmp_path / "sparse.img"
    with open(img, "wb") as f:
        f.truncate(2 * MiB)
        f.seek(MiB)
        f.write(os.urandom(64 * KiB))
    srv = qemu_nbd(img, name="sparse")
    res = run_cli(srv.uri(), cmd, 0, 2 * MiB)
    assert res.returncode == 0, res
    ext = [tuple(int(x) for x in line.split()[:3]) for line in res.text.splitlines()
           if line[:1].isdigit()]
    assert ext and ext[0][0] == 0 and sum(e[1] for e in ext) == 2 * MiB, ext
    for off, length, flags in ext:
        if off <= MiB < off + length:
            assert flags & 1 == 0, ext
        if off + length <= 512 * KiB:
            assert flags & 2, ext   # reads as zero
    res = run_cli(srv.uri(), "stress", 4, 500, 6, timeout=600)
    assert res.returncode == 0, res
    assert "failures=0 mismatches=0" in res.text


def test_qemu_nbd_read_only(qemu_nbd, tmp_path):
    img = tmp_path / "ro.img"
    data = make_image(img, MiB)
    srv = qemu_nbd(img, name="ro", extra=["-r"])
    res = run_cli(srv.uri(), "info", "read", 0, 4096, "write", 0, 512, input=bytes(512),
                  opts=["-k"])
    assert res.returncode == 1, res
    assert res.info()["read_write"] == "0"
    assert "write 0 512: EROFS" in res.stderr, res
    assert res.stdout.endswith(bytes(data[:4096]))


def test_nbd_server_roundtrip(nbd_server, tmp_path):
    img = tmp_path / "disk.img"
    data = make_image(img)
    srv = nbd_server({"disk": img}, export_lines=["flush = true", "fua = true", "trim = true"])
    roundtrip(srv.uri(), img, data, ["disk", ""])
    res = run_cli(srv.uri(), "info", "flush", "trim", 0, 4096)
    assert res.returncode == 0, res
    assert res.info()["can_flush"] == "1"
    assert res.info()["protocol"] == "newstyle-fixed"


def test_nbd_server_tcp_and_several_exports(nbd_server, tmp_path):
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    da = make_image(a, MiB)
    db = make_image(b, 2 * MiB)
    srv = nbd_server({"first": a, "second": b}, tcp=True)
    res = run_cli(srv.uri("second"), "info", "read", 0, 4096)
    assert res.returncode == 0, res
    assert res.info()["size"] == str(2 * MiB)
    assert res.stdout.endswith(bytes(db[:4096]))
    res = run_cli(srv.uri("first"), "read", MiB - 4096, 4096)
    assert res.returncode == 0, res
    assert res.stdout == bytes(da[-4096:])
    res = run_cli(srv.uri(), "list")
    assert res.returncode == 0, res
    names = sorted(line.split("\t")[0] for line in res.text.splitlines())
    assert names == ["first", "second"]
    res = run_cli(srv.uri("third"), "info")
    assert res.returncode == 1 and "NO_EXPORT" in res.stderr, res


def test_nbd_server_stress(nbd_server, tmp_path):
    img = tmp_path / "disk.img"
    make_image(img, 2 * MiB)
    srv = nbd_server({"disk": img}, export_lines=["flush = true"])
    res = run_cli(srv.uri(), "stress", 4, 500, 7, opts=["--connections", "1"], timeout=600)
    assert res.returncode == 0, res
    assert "failures=0 mismatches=0" in res.text


def test_qemu_nbd_tls_x509(qemu_nbd, tmp_path, x509):
    """qemu-nbd as a TLS server (it skips close_notify at the end: the core
    must treat that as a clean end)."""
    img = tmp_path / "tls.img"
    data = make_image(img, MiB)
    srv = qemu_nbd(img, name="disk", extra=[
        "--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={x509.server},verify-peer=off",
        "--tls-creds", "tls0"])
    uri = f"nbds+unix:///disk?socket={srv.sock}&tls-hostname=localhost"
    new = os.urandom(65536)
    res = run_cli(uri, "info", "write", 0, len(new), "flush", "read", 0, MiB, input=new,
                  opts=["--tls-certificates", x509.client])
    assert res.returncode == 0, res
    assert res.info()["tls"] == "1"
    data[:len(new)] = new
    assert res.stdout.endswith(bytes(data))
    assert "warning" not in res.stderr.lower(), res.stderr
    res = run_cli(uri, "list", opts=["--tls-certificates", x509.client])
    assert res.returncode == 0, res
    res = run_cli(srv.uri(), "info")
    assert res.returncode == 1 and "TLS_REQUIRED" in res.stderr, res


def test_qemu_nbd_tls_psk(qemu_nbd, tmp_path, psk_file):
    img = tmp_path / "psk.img"
    data = make_image(img, MiB)
    keydir = tmp_path / "pskdir"
    keydir.mkdir()
    (keydir / "keys.psk").write_text(open(psk_file).read())
    srv = qemu_nbd(img, name="disk", extra=[
        "--object", f"tls-creds-psk,id=tls0,endpoint=server,dir={keydir}",
        "--tls-creds", "tls0"])
    res = run_cli(f"nbds+unix://alice@/disk?socket={srv.sock}", "info", "read", 0, 4096,
                  opts=["--tls-psk", psk_file])
    assert res.returncode == 0, res
    assert res.info()["tls"] == "1"
    assert res.stdout.endswith(bytes(data[:4096]))
