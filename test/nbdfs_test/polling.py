"""Deadlines: poll for a condition, wait for a process to end, end a process
we started (by pid, escalating to SIGKILL), run a command for a bounded time.
Nothing here sleeps for a fixed time in place of waiting for a condition."""
import signal
import subprocess
import time

import pytest


def wait_for(cond, timeout=30.0, interval=0.02, what="condition"):
    """Polls cond() until it returns a true value; fails the test at the deadline.
    what may be a callable, called then (to describe the state at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what() if callable(what) else what}")
        time.sleep(interval)


def pid_alive(pid):
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            # a zombie has exited; its parent (not us) has yet to reap it
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def ppid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def wait_pid_exit(pid, timeout=30.0):
    """True when pid has exited within timeout (we need not be its parent)."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def kill_and_wait(proc, sig=signal.SIGTERM, timeout=10):
    """Ends a process we started (by pid), escalating to SIGKILL."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.send_signal(sig)
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=timeout)


def stop_all(procs):
    """Ends every server process a fixture started and closes its stderr pipe."""
    for p in procs:
        kill_and_wait(p)
        if p.stderr:
            p.stderr.close()


def run(cmd, check=True, timeout=120, **kw):
    """subprocess.run with text output captured and a bounded time."""
    r = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=timeout, **kw)
    if check and r.returncode != 0:
        pytest.fail(f"command failed ({r.returncode}): {' '.join(map(str, cmd))}\n"
                    f"stdout: {r.stdout.decode(errors='replace')}\n"
                    f"stderr: {r.stderr.decode(errors='replace')}")
    return r
