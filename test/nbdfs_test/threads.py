"""Blocking calls on a thread, under a deadline: a Call runs fn() on a daemon
thread and records its value or errno, how long it took, and its thread id, so
a test can see which system call the thread is blocked in
(/proc/self/task/TID/syscall) while a server is stopped or gone, and join it
with a bound.  A call that never returns fails the test at join(); being a
daemon thread, it cannot keep pytest alive (the mount's teardown aborts it)."""
import threading
import time

import pytest

from nbdfs_test.polling import wait_for

# x86_64 system call numbers of the calls the tests block in
SYSCALLS = {
    "read": 0, "write": 1, "close": 3, "lseek": 8, "pread64": 17, "pwrite64": 18, "readv": 19,
    "writev": 20, "fsync": 74, "fdatasync": 75, "setxattr": 188, "lsetxattr": 189,
    "fsetxattr": 190, "getxattr": 191, "preadv": 295, "pwritev": 296, "preadv2": 327,
    "pwritev2": 328,
}
READS = ("read", "pread64", "readv", "preadv", "preadv2")
WRITES = ("write", "pwrite64", "writev", "pwritev", "pwritev2")


def syscall_of(proc):
    """The system call number /proc/PROC is in (PROC: a pid, or self/task/TID),
    or None when it runs in user space or is gone."""
    try:
        with open(f"/proc/{proc}/syscall") as f:
            first = f.read().split()[0]
    except (OSError, IndexError):
        return None
    return int(first) if first.isdigit() else None


def in_syscall(proc, *names):
    """True when /proc/PROC is in one of the named system calls."""
    return syscall_of(proc) in {SYSCALLS[n] for n in names}


class Call:
    """Call(fn, *args).start() runs fn(*args) on a thread.  After join():
    .value (its return value), .errno (an OSError's errno, else None),
    .error (any exception), .dt (seconds it took)."""

    def __init__(self, fn, *args, name=None):
        self.fn = fn
        self.args = args
        self.name = name or getattr(fn, "__name__", "call")
        self.tid = None
        self.value = None
        self.errno = None
        self.error = None
        self.dt = None
        self.t0 = None
        self._started = threading.Event()
        self._th = threading.Thread(target=self._run, name=self.name, daemon=True)

    def _run(self):
        self.tid = threading.get_native_id()
        self.t0 = time.monotonic()
        self._started.set()
        try:
            self.value = self.fn(*self.args)
        except OSError as e:
            self.errno = e.errno
            self.error = e
        except BaseException as e:  # noqa: B902 - reported by join()
            self.error = e
        finally:
            self.dt = time.monotonic() - self.t0

    def start(self):
        self._th.start()
        if not self._started.wait(30):
            pytest.fail(f"{self.name}: thread did not start")
        return self

    def done(self):
        return self.dt is not None

    def wait(self, timeout):
        """Waits up to timeout s without judging (for clean-up); True if done."""
        self._th.join(timeout)
        return not self._th.is_alive()

    def join(self, timeout):
        """Waits up to timeout s; fails the test if the call is still blocked.
        An exception other than OSError is re-raised here."""
        self._th.join(timeout)
        if self._th.is_alive():
            pytest.fail(f"{self.name} still blocked {timeout}s after it was joined "
                        f"(syscall {self.syscall()})")
        if self.error is not None and self.errno is None:
            raise self.error
        return self

    def syscall(self):
        """The system call number the thread is in, or None (running, or gone)."""
        return syscall_of(f"self/task/{self.tid}")

    def in_syscall(self, *names):
        return not self.done() and in_syscall(f"self/task/{self.tid}", *names)

    def wait_blocked_in(self, *names, timeout=20):
        """Waits until the thread sits in one of the named system calls."""
        wait_for(lambda: self.in_syscall(*names), timeout=timeout,
                 what=f"{self.name} to block in {'/'.join(names)}")
        return self


def bounded(fn, *args, timeout=30, name=None):
    """Runs fn(*args) on a thread and joins it within timeout: returns the
    finished Call (.value, .errno, .dt).  For a call that must not hang."""
    return Call(fn, *args, name=name).start().join(timeout)
