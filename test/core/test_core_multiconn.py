"""NBD client core vs nbdkit: multi-conn and concurrency (the `stress`
command checks every read against an in-memory model)."""
import re

from nbdfs_test.core import run_cli

MiB = 1024 * 1024


def connects(logfile):
    return len(re.findall(r"connection=\d+ Connect ", open(logfile).read()))


def test_multi_conn_default(nbdkit, tmp_path):
    """memory advertises CAN_MULTI_CONN: the default opens several connections."""
    log = str(tmp_path / "log")
    srv = nbdkit("--filter=log", "memory", "1M", f"logfile={log}")
    res = run_cli(srv.uri(), "info")
    assert res.returncode == 0, res
    i = res.info()
    assert i["can_multi_conn"] == "1"
    assert int(i["connections"]) > 1
    assert connects(log) >= int(i["connections"])


def test_multi_conn_explicit(nbdkit, tmp_path):
    log = str(tmp_path / "log")
    srv = nbdkit("--filter=log", "memory", "1M", f"logfile={log}")
    res = run_cli(srv.uri(), "info", "fill", 0, "1M", 0x11, "flush", "expect", 0, "1M", 0x11,
                  opts=["--connections", "3"])
    assert res.returncode == 0, res
    assert res.info()["connections"] == "3"
    assert connects(log) == 3
    # The requests really spread over the connections.
    used = set(re.findall(r"connection=(\d+) (?:Read|Write) ", open(log).read()))
    assert len(used) > 1, used


def test_multi_conn_disabled(nbdkit, tmp_path):
    """Without CAN_MULTI_CONN, N > 1 gives one connection and a warning."""
    log = str(tmp_path / "log")
    srv = nbdkit("--filter=log", "--filter=multi-conn", "memory", "1M",
                 "multi-conn-mode=disable", f"logfile={log}")
    res = run_cli(srv.uri(), "info", "read", 0, 4096, opts=["--connections", "4"])
    assert res.returncode == 0, res
    i = res.info()
    assert i["can_multi_conn"] == "0"
    assert i["connections"] == "1"
    assert "warning" in res.stderr.lower(), res.stderr
    assert connects(log) == 1
    res = run_cli(srv.uri(), "info")
    assert res.info()["connections"] == "1"


def test_multi_conn_second_connection_refused(nbdkit):
    """The server advertises multi-conn but refuses a 2nd connection (limit
    filter): the handle still works on the connection it has."""
    srv = nbdkit("--filter=limit", "memory", "1M", "limit=1")
    res = run_cli(srv.uri(), "info", "fill", 0, 4096, 3, "expect", 0, 4096, 3)
    assert res.returncode == 0, res
    assert res.info()["connections"] == "1"
    assert "warning" in res.stderr.lower(), res.stderr


def test_stress_multi_conn(nbdkit):
    srv = nbdkit("memory", "4M")
    res = run_cli(srv.uri(), "info", "stress", 8, 2000, 1, timeout=600)
    assert res.returncode == 0, res
    assert int(res.info()["connections"]) > 1
    assert "failures=0 mismatches=0 reentrant=0 double_done=0" in res.text, res


def test_stress_single_connection(nbdkit):
    srv = nbdkit("memory", "4M")
    res = run_cli(srv.uri(), "info", "stress", 8, 2000, 2, opts=["--connections", "1"],
                  timeout=600)
    assert res.returncode == 0, res
    assert res.info()["connections"] == "1"
    assert "failures=0 mismatches=0 reentrant=0 double_done=0" in res.text, res


def test_stress_simple_replies(nbdkit):
    srv = nbdkit("--no-sr", "memory", "2M")
    res = run_cli(srv.uri(), "stress", 4, 1000, 3, opts=["--connections", "2"], timeout=600)
    assert res.returncode == 0, res
    assert "failures=0 mismatches=0" in res.text, res


def test_stress_4096_blocks(nbdkit):
    srv = nbdkit("--filter=blocksize-policy", "memory", "2M", "blocksize-minimum=4096",
                 "blocksize-maximum=64K", "blocksize-error-policy=error")
    res = run_cli(srv.uri(), "stress", 4, 1000, 4, timeout=600)
    assert res.returncode == 0, res
    assert "failures=0 mismatches=0" in res.text, res


def test_stress_large_requests_single_connection(nbdkit):
    """Multi-MiB writes and reads in flight together on one connection (the
    write-payload vs unread-replies deadlock hazard)."""
    srv = nbdkit("memory", "16M")
    res = run_cli(srv.uri(), "stress", 4, 40, 9,
                  opts=["--connections", "1", "--stress-max-len", str(4 * MiB)], timeout=600)
    assert res.returncode == 0, res
    assert "failures=0 mismatches=0 reentrant=0 double_done=0" in res.text, res


def test_stress_server_killed(nbdkit, tmp_path):
    """The server dies under load: every request completes (no hang, no
    crash) with ENOTCONN."""
    from nbdfs_test.core import kill_server_under_stress
    log = tmp_path / "log"
    srv = nbdkit("--filter=log", "memory", "4M", f"logfile={log}")
    rc, err = kill_server_under_stress(srv, log, [srv.uri(), "stress", 8, 100000, 11])
    assert rc == 1, (rc, err[-3000:])
    names = set(re.findall(r": (E[A-Z0-9]+)\b", err))
    assert names == {"ENOTCONN"}, err[-3000:]


def test_stress_with_request_timeout_armed(nbdkit):
    """A request timeout that never fires must not disturb a busy handle."""
    srv = nbdkit("memory", "4M")
    res = run_cli(srv.uri(), "stress", 8, 1000, 12, opts=["--timeout-ms", "60000"], timeout=600)
    assert res.returncode == 0, res
    assert "failures=0 mismatches=0 reentrant=0 double_done=0" in res.text, res


def test_stress_one_request_in_flight(nbdkit):
    """max_in_flight=1: every caller waits for the single slot; no deadlock."""
    srv = nbdkit("memory", "2M")
    res = run_cli(srv.uri(), "stress", 8, 300, 14,
                  opts=["--max-in-flight", "1", "--connections", "1"], timeout=600)
    assert res.returncode == 0, res
    assert "failures=0 mismatches=0 reentrant=0 double_done=0" in res.text, res
