"""NBD client core vs nbdkit: TLS (PSK and X.509 made at test time), peer
verification, and the TLS refusals (nbds:// vs --tls=off, plaintext vs
--tls=require)."""
import os
import re

import pytest

from nbdfs_test.core import run_cli

MiB = 1024 * 1024


def kind(res, name):
    return re.search(rf"nbdc-cli: \w+: {name}: ", res.stderr) is not None


def psk_uri(srv, user="alice"):
    return f"nbds+unix://{user}@/?socket={srv.sock}"


def test_tls_psk(nbdkit, psk_file):
    srv = nbdkit("--tls=require", f"--tls-psk={psk_file}", "memory", "1M")
    data = os.urandom(65536)
    res = run_cli(psk_uri(srv), "info", "write", 0, len(data), "flush", "read", 0, len(data),
                  input=data, opts=["--tls-psk", psk_file])
    assert res.returncode == 0, res
    i = res.info()
    assert i["tls"] == "1"
    assert i["size"] == str(MiB)
    assert res.stdout.endswith(data)


def test_tls_psk_file_in_uri(nbdkit, psk_file):
    srv = nbdkit("--tls=require", f"--tls-psk={psk_file}", "memory", "1M")
    res = run_cli(f"nbds+unix://alice@/?socket={srv.sock}&tls-psk-file={psk_file}", "info")
    assert res.returncode == 0, res
    assert res.info()["tls"] == "1"


def test_tls_psk_list(nbdkit, psk_file):
    srv = nbdkit("--tls=require", f"--tls-psk={psk_file}", "--filter=exportname", "memory", "1M",
                 "exportname-list=explicit", "exportname=a", "exportname=b")
    res = run_cli(psk_uri(srv), "list", opts=["--tls-psk", psk_file])
    assert res.returncode == 0, res
    assert [line.split("\t")[0] for line in res.text.splitlines()] == ["a", "b"]


def test_tls_psk_stress(nbdkit, psk_file):
    srv = nbdkit("--tls=require", f"--tls-psk={psk_file}", "memory", "2M")
    res = run_cli(psk_uri(srv), "stress", 4, 500, 5, opts=["--tls-psk", psk_file], timeout=600)
    assert res.returncode == 0, res
    assert "failures=0 mismatches=0" in res.text


def test_tls_psk_wrong_key(nbdkit, psk_file, tmp_path):
    srv = nbdkit("--tls=require", f"--tls-psk={psk_file}", "memory", "1M")
    wrong = tmp_path / "wrong.psk"
    wrong.write_text(f"alice:{os.urandom(32).hex()}\n")
    res = run_cli(psk_uri(srv), "info", opts=["--tls-psk", str(wrong)], timeout=60)
    assert res.returncode == 1, res
    assert kind(res, "TLS"), res


def test_tls_psk_unknown_user(nbdkit, psk_file):
    srv = nbdkit("--tls=require", f"--tls-psk={psk_file}", "memory", "1M")
    res = run_cli(psk_uri(srv, "bob"), "info", opts=["--tls-psk", psk_file], timeout=60)
    assert res.returncode == 1, res
    assert kind(res, "TLS"), res


def test_plaintext_against_tls_require(nbdkit, psk_file):
    srv = nbdkit("--tls=require", f"--tls-psk={psk_file}", "memory", "1M")
    res = run_cli(srv.uri(), "info")
    assert res.returncode == 1, res
    assert kind(res, "TLS_REQUIRED"), res
    res = run_cli(srv.uri(), "list")
    assert res.returncode == 1, res
    assert kind(res, "TLS_REQUIRED"), res


def test_nbds_against_tls_off(nbdkit, psk_file):
    """nbds:// requires TLS: the server's refusal of STARTTLS is a clear TLS
    error, never a silent plaintext session."""
    srv = nbdkit("--tls=off", "memory", "1M")
    res = run_cli(psk_uri(srv), "info", opts=["--tls-psk", psk_file], timeout=60)
    assert res.returncode == 1, res
    assert kind(res, "TLS"), res
    res = run_cli(psk_uri(srv), "list", opts=["--tls-psk", psk_file], timeout=60)
    assert res.returncode == 1, res
    assert kind(res, "TLS"), res


@pytest.mark.parametrize("variant", ["-o", "--mask-handshake=0"], ids=["oldstyle", "non-fixed"])
def test_nbds_against_old_servers(nbdkit, psk_file, variant):
    """Servers that cannot do STARTTLS: nbds:// fails with TLS."""
    srv = nbdkit(variant, "memory", "1M")
    res = run_cli(psk_uri(srv), "info", opts=["--tls-psk", psk_file], timeout=60)
    assert res.returncode == 1, res
    assert kind(res, "TLS"), res


def test_tls_x509_tcp(nbdkit, x509):
    """nbds://127.0.0.1:PORT with a CA, a server certificate for 127.0.0.1 and
    localhost, and a client certificate the server verifies."""
    srv = nbdkit("--tls=require", f"--tls-certificates={x509.server}", "--tls-verify-peer",
                 "memory", "1M", tcp=True)
    data = os.urandom(8192)
    uri = f"nbds://127.0.0.1:{srv.port}/"
    res = run_cli(uri, "info", "write", 0, 8192, "read", 0, 8192, input=data,
                  opts=["--tls-certificates", x509.client])
    assert res.returncode == 0, res
    assert res.info()["tls"] == "1"
    assert res.stdout.endswith(data)
    res = run_cli(uri, "list", opts=["--tls-certificates", x509.client])
    assert res.returncode == 0, res


def test_tls_x509_unix_hostname(nbdkit, x509):
    srv = nbdkit("--tls=require", f"--tls-certificates={x509.server}", "memory", "1M")
    uri = f"nbds+unix:///?socket={srv.sock}&tls-hostname=localhost"
    res = run_cli(uri, "info", opts=["--tls-certificates", x509.client])
    assert res.returncode == 0, res
    assert res.info()["tls"] == "1"


def test_tls_x509_wrong_ca(nbdkit, x509):
    srv = nbdkit("--tls=require", f"--tls-certificates={x509.server}", "memory", "1M", tcp=True)
    uri = f"nbds://127.0.0.1:{srv.port}/"
    res = run_cli(uri, "info", opts=["--tls-certificates", x509.wrong], timeout=60)
    assert res.returncode == 1, res
    assert kind(res, "TLS"), res
    # Without peer verification the same credentials connect (the server
    # does not ask for a client certificate here).
    res = run_cli(uri, "info", opts=["--tls-certificates", x509.wrong, "--no-verify"], timeout=60)
    assert res.returncode == 0, res
    assert res.info()["tls"] == "1"


def test_tls_x509_wrong_hostname(nbdkit, x509):
    srv = nbdkit("--tls=require", f"--tls-certificates={x509.server}", "memory", "1M")
    uri = f"nbds+unix:///?socket={srv.sock}&tls-hostname=wrong.example"
    res = run_cli(uri, "info", opts=["--tls-certificates", x509.client], timeout=60)
    assert res.returncode == 1, res
    assert kind(res, "TLS"), res
    res = run_cli(uri, "info", opts=["--tls-certificates", x509.client, "--tls-hostname",
                                     "localhost"], timeout=60)
    assert res.returncode == 0, res


def test_tls_x509_client_cert_required(nbdkit, x509):
    """--tls-verify-peer: a client whose certificate the server's CA did not
    sign is refused."""
    srv = nbdkit("--tls=require", f"--tls-certificates={x509.server}", "--tls-verify-peer",
                 "memory", "1M", tcp=True)
    uri = f"nbds://127.0.0.1:{srv.port}/"
    res = run_cli(uri, "info", opts=["--tls-certificates", x509.wrong, "--no-verify"], timeout=60)
    assert res.returncode == 1, res
    assert kind(res, "TLS") or kind(res, "HANDSHAKE") or kind(res, "CONNECT"), res


def test_tls_verify_peer_uri_parameter(nbdkit, x509):
    srv = nbdkit("--tls=require", f"--tls-certificates={x509.server}", "memory", "1M", tcp=True)
    base = f"nbds://127.0.0.1:{srv.port}/?tls-certificates={x509.wrong}"
    res = run_cli(base + "&tls-verify-peer=false", "info", timeout=60)
    assert res.returncode == 0, res
    res = run_cli(base + "&tls-verify-peer=1", "info", timeout=60)
    assert res.returncode == 1 and kind(res, "TLS"), res


def test_tls_server_killed_under_load(nbdkit, psk_file, tmp_path):
    """TLS connections die under load: ENOTCONN everywhere, no crash/hang."""
    from nbdfs_test.core import kill_server_under_stress
    log = tmp_path / "log"
    srv = nbdkit("--tls=require", f"--tls-psk={psk_file}", "--filter=log", "memory", "4M",
                 f"logfile={log}")
    rc, err = kill_server_under_stress(
        srv, log, ["--tls-psk", psk_file, psk_uri(srv), "stress", 8, 100000, 13])
    assert rc == 1, (rc, err[-3000:])
    assert set(re.findall(r": (E[A-Z0-9]+)\b", err)) == {"ENOTCONN"}, err[-3000:]
