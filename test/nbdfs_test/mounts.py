"""Mounts and loop devices: what /proc/self/mounts says, our nbdfs daemons,
the Mount handle, the per-test cleanup stack, and the teardown steps the
e2e fixtures push onto it (unmount, detach, and a report of what was left)."""
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from nbdfs_test.data import file_text
from nbdfs_test.polling import kill_and_wait, run, wait_for, wait_pid_exit


def _unescape_mount(s):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mounts():
    """(source, mountpoint, fstype, options) of every mount, from /proc/self/mounts.
    Unlike os.path.ismount this also sees a FUSE mount whose daemon died."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            p = line.split()
            if len(p) >= 4:
                out.append((_unescape_mount(p[0]), _unescape_mount(p[1]), p[2], p[3]))
    return out


def is_mounted(path):
    path = os.path.realpath(path)
    return any(m[1] == path for m in mounts())


def mount_entry(path):
    path = os.path.realpath(path)
    for m in mounts():
        if m[1] == path:
            return m
    return None


def find_daemon_pids(binary, mnt):
    """Pids of nbdfs processes running `binary ... mnt` (our own, found by
    their unique mountpoint; used only where no pidfile is available)."""
    mnt = os.path.realpath(mnt)
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if not argv:
            continue
        if os.path.basename(argv[0]) != os.path.basename(binary):
            continue
        # Absolute arguments are compared as strings: resolving another
        # daemon's paths could hang on its mount if that one is stuck.
        if mnt in argv or any(os.path.normpath(a) == mnt for a in argv[1:] if a.startswith("/")) \
                or any(os.path.realpath(a) == mnt for a in argv[1:] if a.startswith(".")):
            pids.append(int(d))
    return pids


def need_fuse():
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing")
    if shutil.which("fusermount3") is None:
        pytest.skip("fusermount3 is missing")


def need_root():
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices, mount)")


class CleanupStack:
    """Mounts and loop devices (phase 0) are released last-in first-out, then
    servers (phase 1): a server restarted during a test still outlives the
    mount that uses it, so no unmount waits for an absent server."""

    def __init__(self):
        self.items = []      # (phase, description, callable)
        self.problems = []   # leftovers found at teardown

    def push(self, what, fn, phase=0):
        self.items.append((phase, what, fn))

    def unwind(self):
        for phase in (0, 1):
            todo = [i for i in self.items if i[0] == phase]
            self.items = [i for i in self.items if i[0] != phase]
            for _, what, fn in reversed(todo):
                try:
                    fn()
                except Exception as e:  # keep unwinding: every resource gets its chance
                    self.problems.append(f"{what}: cleanup raised {type(e).__name__}: {e}")


class Mount:
    """A running nbdfs mount. .path, .pid, .proc (foreground only), .log()."""

    def __init__(self, fixture, path, cmd, errpath, pid=None, proc=None):
        self._fx = fixture
        self.path = str(path)
        self.cmd = cmd
        self.errpath = errpath
        self.pid = pid
        self.proc = proc

    def __truediv__(self, name):
        return os.path.join(self.path, name)

    def file(self, name):
        return os.path.join(self.path, name)

    def files(self):
        return sorted(os.listdir(self.path))

    def log(self):
        """What nbdfs wrote to stderr (before daemonizing, or all of it with -f)."""
        return file_text(self.errpath)

    def mounted(self):
        return is_mounted(self.path)

    def unmount(self, timeout=60.0, lazy=False):
        """fusermount3 -u (-uz if lazy), then waits for the daemon to exit.
        Returns the daemon's exit status where we know it (foreground), else None."""
        r = subprocess.run(["fusermount3", "-uz" if lazy else "-u", self.path],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
        if r.returncode != 0:
            pytest.fail(f"fusermount3 -u {self.path} failed: {r.stderr.decode(errors='replace')}")
        return self.wait_exit(timeout)

    def wait_exit(self, timeout=60.0):
        if self.proc is not None:
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pytest.fail(f"nbdfs pid {self.proc.pid} did not exit within {timeout}s")
        if self.pid and not wait_pid_exit(self.pid, timeout):
            pytest.fail(f"nbdfs pid {self.pid} did not exit within {timeout}s")
        return None


def close_own_fds_under(path):
    """Closes this process's fds on files under path (or on path itself): a test
    that failed while holding a file open (its frame lives on in the traceback)
    must not keep a mount busy."""
    path = os.path.realpath(path)
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target == path or target.startswith(path + "/"):
            try:
                os.close(int(fd))
            except OSError:
                pass


def cleanup_mount(stack, m, binary):
    close_own_fds_under(m.path)
    pids = set()
    if m.pid:
        pids.add(m.pid)
    if m.proc is not None:
        pids.add(m.proc.pid)
    if is_mounted(m.path):
        pids.update(find_daemon_pids(binary, m.path))
        r = subprocess.run(["fusermount3", "-u", m.path], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=60)
        if r.returncode != 0 or is_mounted(m.path):
            subprocess.run(["fusermount3", "-uz", m.path], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=60)
    if is_mounted(m.path):
        stack.problems.append(f"nbdfs mount {m.path} still mounted after fusermount3 -u/-uz")
    for pid in pids:
        if not wait_pid_exit(pid, 60):
            stack.problems.append(f"nbdfs pid {pid} ({m.path}) still running 60s after unmount: killed")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            wait_pid_exit(pid, 10)
    if m.proc is not None:
        kill_and_wait(m.proc)


def loop_backing(dev):
    name = os.path.basename(dev)
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def detach_loop(stack, dev):
    if loop_backing(dev) is None:
        return
    close_own_fds_under(dev)
    subprocess.run(["losetup", "-d", dev], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    deadline = time.monotonic() + 30
    while loop_backing(dev) is not None:
        if time.monotonic() > deadline:
            stack.problems.append(f"loop device {dev} still attached to {loop_backing(dev)}")
            return
        time.sleep(0.05)


def umount_loop(stack, mnt):
    if not is_mounted(mnt):
        return
    close_own_fds_under(mnt)
    subprocess.run(["umount", mnt], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    if is_mounted(mnt):
        subprocess.run(["umount", "-l", mnt], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=60)
    if is_mounted(mnt):
        stack.problems.append(f"loop mount {mnt} still mounted")


def umount(mnt):
    """Unmounts a loop mount now (the fixture's teardown then has nothing to do)."""
    run(["umount", mnt], timeout=120)


def losetup_detach(dev, timeout=30):
    """Detaches a loop device now and waits until the kernel released it."""
    run(["losetup", "-d", dev], timeout=60)
    wait_for(lambda: loop_backing(dev) is None, timeout=timeout, what=f"{dev} to detach")
