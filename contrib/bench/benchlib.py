"""Helpers of the nbdfs benchmark: commands, polling, /proc counters, the
resources of a run (released in one place, also on signals), FUSE daemons,
nbdkit servers and number formatting. Standard library only; used by bench.py
and scale.py."""

import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

MiB = 1 << 20
GiB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Interrupted(BaseException):
    """Raised from the signal handler so that finally blocks run."""


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _child_signals():
    # A shell that starts us in the background ignores SIGINT, and ignored
    # signals survive exec: give children the default actions back, so that
    # dd really stops (and prints its statistics) on SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run(cmd, timeout=60, check=True, **kw):
    """Runs a short helper command; returns CompletedProcess (text)."""
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=timeout, preexec_fn=_child_signals, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {p.returncode}: {p.stderr.strip()}")
    return p


def wait_until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def log_end(path, chars):
    """The last chars characters of a log file."""
    with open(path, errors="replace") as f:
        return f.read()[-chars:]


def wait_started(proc, name, cmd, logpath, cond, timeout, what, tail=600):
    """wait_until(cond) for a process just started with its output in logpath;
    a RuntimeError with the command and the end of that log if it exits first."""
    def ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited {proc.returncode}: {' '.join(cmd)}: "
                               f"{log_end(logpath, tail)}")
        return cond()
    wait_until(ready, timeout, what)


def mounted(path):
    """True if path is a mountpoint in /proc/mounts (octal escapes decoded)."""
    with open("/proc/mounts") as f:
        for line in f:
            mp = line.split()[1].encode().decode("unicode_escape")
            if mp == path:
                return True
    return False


# ---------------------------------------------------------------- resources

class Resources:
    """Everything this run started, released in reverse dependency order:
    workers (fio, dd) -> loop devices -> FUSE mounts -> daemons -> servers."""

    def __init__(self):
        self.workers = []     # Popen
        self.loops = []       # /dev/loopN
        self.mounts = []      # mountpoints
        self.daemons = []     # Popen (nbdfs, nbdfuse)
        self.servers = []     # Popen (nbdkit)
        # Mountpoints of daemons that detached (nbdfs without -f): not our
        # children, so they are found by the mountpoint in their argv.
        self.detached = []
        self.dirs = []

    @staticmethod
    def _kill(p, sig=signal.SIGTERM, timeout=10):
        if p.poll() is not None:
            return
        try:
            p.send_signal(sig)
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log(f"pid {p.pid} does not die (stuck in the kernel?)")

    def unmount(self, mp):
        for args in (["-u"], ["-uz"]):
            if not mounted(mp):
                break
            try:
                run(["fusermount3"] + args + [mp], timeout=30, check=False)
            except subprocess.TimeoutExpired:
                log(f"fusermount3 {' '.join(args)} {mp} timed out")
            if args == ["-u"] and mounted(mp):
                # busy (a loop device still releasing the file): retry briefly
                deadline = time.monotonic() + 5
                while mounted(mp) and time.monotonic() < deadline:
                    time.sleep(0.1)
                    run(["fusermount3", "-u", mp], timeout=30, check=False)
        if mp in self.mounts:
            self.mounts.remove(mp)

    def detach(self, dev):
        run(["losetup", "-d", dev], timeout=30, check=False)
        if dev in self.loops:
            self.loops.remove(dev)

    def stop_daemon(self, proc, mp):
        """Unmounts mp and ends its daemon proc now (one case of a run is over)."""
        self.unmount(mp)
        self._kill(proc)
        self.unmount(mp)                  # a daemon that died leaves an ENOTCONN mount
        if proc in self.daemons:
            self.daemons.remove(proc)

    def stop_detached(self, mp):
        """Unmounts mp and ends the detached daemon serving it, if still there."""
        self.unmount(mp)
        for pid in pids_with_arg(mp):
            kill_pid(pid)
        self.unmount(mp)
        if mp in self.detached:
            self.detached.remove(mp)

    def stop_server(self, proc):
        self._kill(proc)
        if proc in self.servers:
            self.servers.remove(proc)

    def release(self):
        """Releases everything; may be called again (each list is emptied)."""
        for p in self.workers:
            self._kill(p, signal.SIGKILL, timeout=5)
        for dev in reversed(list(self.loops)):
            self.detach(dev)
        for mp in reversed(list(self.mounts)):
            self.unmount(mp)
        for p in reversed(self.daemons):
            self._kill(p)
        for mp in list(self.detached):
            self.stop_detached(mp)
        for mp in list(self.mounts):      # a daemon that died leaves ENOTCONN mounts
            self.unmount(mp)
        for p in reversed(self.servers):
            self._kill(p)
        for p in self.workers + self.daemons + self.servers:
            for s in (p.stdout, p.stderr):
                if s:
                    s.close()
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)
        for lst in (self.workers, self.loops, self.mounts, self.daemons, self.servers,
                    self.detached, self.dirs):
            lst.clear()


def processes():
    """(pid, [argv bytes]) of every other process on the machine."""
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                yield int(d), f.read().split(b"\0")
        except OSError:
            continue


def pids_with_arg(arg):
    """Pids of the processes that have arg (a path unique to this run) as one of
    their arguments."""
    want = os.fsencode(arg)
    return [pid for pid, args in processes() if want in args]


def proc_stat(pid):
    """The fields of /proc/PID/stat after the command name (the state first),
    or None when there is no such process."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def pid_alive(pid):
    """True while pid exists and is not a zombie."""
    fields = proc_stat(pid)
    return bool(fields) and fields[0] != "Z"


def kill_pid(pid, timeout=10):
    """SIGTERM, then SIGKILL after timeout, for a process that is not our child."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not pid_alive(pid):
            return
    log(f"pid {pid} does not die (stuck in the kernel?)")


def leftovers(workdir):
    """Mounts, loop devices and processes of this run still present (should be
    none): every server, daemon and worker has a path under workdir in its argv."""
    left = []
    with open("/proc/mounts") as f:
        for line in f:
            mp = line.split()[1]
            if mp.startswith(workdir):
                left.append(f"mount {mp}")
    out = run(["losetup", "-a"], check=False).stdout
    for line in out.splitlines():
        if workdir in line:
            left.append(f"loop {line}")
    want = os.fsencode(workdir)
    for pid, args in processes():
        if pid_alive(pid) and any(want in a for a in args):
            left.append(f"process {pid}: {b' '.join(args).decode(errors='replace')[:120]}")
    return left


def start_daemon(res, cmd, logpath, mnt):
    """Starts a FUSE daemon in a session of its own, its stdout and stderr in
    logpath; res owns it and its mountpoint mnt from now on."""
    with open(logpath, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=logf, start_new_session=True,
                                preexec_fn=_child_signals)
    res.daemons.append(proc)
    res.mounts.append(mnt)
    return proc


# ---------------------------------------------------------------- /proc

def proc_cpu(pid):
    """utime+stime of a whole process (all threads), in seconds."""
    fields = proc_stat(pid)
    try:
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (TypeError, IndexError, ValueError):
        return None


def proc_minflt(pid):
    """Minor page faults of a whole process (all threads, live and dead)."""
    fields = proc_stat(pid)
    try:
        return int(fields[7])
    except (TypeError, IndexError, ValueError):
        return None


def proc_status(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def reset_hwm(pid):
    """Resets VmHWM to the current RSS (clear_refs 5), so each run has its own peak."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def ctx_switches(pid):
    """{tid: (voluntary, involuntary)} context switches of the live threads.
    Linux keeps no per-process total readable from outside (dead threads'
    counts go to signal_struct), so deltas are a lower bound when the daemon's
    threads come and go."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        vol = inv = 0
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        vol = int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        inv = int(line.split()[1])
        except OSError:
            continue
        out[tid] = (vol, inv)
    return out


def ctx_delta(before, after):
    vol = inv = 0
    for tid, (v, i) in after.items():
        v0, i0 = before.get(tid, (0, 0))
        vol += max(0, v - v0)
        inv += max(0, i - i0)
    return vol, inv


def proc_sockets(pid):
    """Number of the open fds of pid that are sockets."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    n = 0
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                n += 1
        except OSError:
            pass
    return n


def proc_nofile(pid):
    """(soft, hard) RLIMIT_NOFILE of pid as strings, from /proc/PID/limits."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    return tuple(line.split()[3:5])
    except OSError:
        pass
    return None


def nthreads(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None


def drop_caches():
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
    except OSError as e:
        log(f"cannot drop caches: {e}")


# ---------------------------------------------------------------- servers

class Server:
    def __init__(self, proc, sock, name):
        self.proc, self.sock, self.name = proc, sock, name

    @property
    def uri(self):
        return f"nbd+unix:///?socket={self.sock}"

    @property
    def pid(self):
        return self.proc.pid


def start_nbdkit(res, workdir, name, extra=(), threads=64):
    """nbdkit -f on a Unix socket in workdir; its messages go to NAME.nbdkit.log
    there (a pipe nobody reads would block a chatty server once it is full).
    threads is nbdkit's -t: worker threads per connection, started with it."""
    sock = os.path.join(workdir, f"{name}.sock")
    logpath = os.path.join(workdir, f"{name}.nbdkit.log")
    cmd = ["nbdkit", "-f", "--exit-with-parent", "-t", str(threads), "-U", sock] + list(extra)
    with open(logpath, "ab") as logf:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=logf,
                                start_new_session=True, preexec_fn=_child_signals)
    res.servers.append(proc)
    wait_started(proc, "nbdkit", cmd, logpath, lambda: os.path.exists(sock), 30, f"nbdkit {name}")
    log(f"nbdkit {name}: pid {proc.pid}: {' '.join(cmd[3:])}")
    return Server(proc, sock, name)


# ---------------------------------------------------------------- numbers

def median(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v, nd=1):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.{nd}f}"


def fmt_ratio(v):
    return "-" if v is None else f"{v:.2f}x"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b
