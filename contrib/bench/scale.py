"""The scale workload of the benchmark (issue 9's targets): `nbdfs -a` over
nbdkit's file plugin serving a directory of N sparse files, the daemon under
RLIMIT_NOFILE 1024/1024 (systemd's default). Measures the mount, the idle
daemon (threads, RSS, sockets, CPU), ls -l, 100 exports read at once and the
unmount; then a second server that takes 50 ms to open each export
(`--filter=delay delay-open=50ms`) serving 200 exports: the mount.

Every daemon is unmounted and ended at the end of its case, also when the
case fails; servers at the end of the workload (and by Resources on signals)."""

import os
import resource
import subprocess
import threading
import time

from benchlib import (MiB, Resources, _child_signals, fmt, log, median, mounted, pid_alive,
                      proc_cpu, proc_nofile, proc_sockets, proc_status, run, start_nbdkit,
                      wait_until, CLK_TCK)

SCALE_IDS = ("scale", "scale-delay-open")
EXPORTS_FULL, EXPORTS_QUICK = 10000, 1000
FILE_SIZE = 16 * MiB                  # sparse: costs no memory
NOFILE = 1024
READERS = 100
READ_SIZE = 64 * 1024
DELAY_EXPORTS = 200
DELAY_OPEN = "50ms"
IDLE_SECS = 2
MOUNT_TIMEOUT = 120                   # a bound on a broken mount, not a target
# nbdkit starts -t worker threads for every connection, each with a stack
# mapping: at 64 a thousand connections pass vm.max_map_count (65530) and
# nbdkit stops accepting. One thread a connection still serves the readers in
# parallel (each reads its own export).
SERVER_THREADS = 1
STOP_TIMEOUT = 30


def _child_nofile():
    _child_signals()
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


def make_sparse_dir(path, n):
    os.mkdir(path)
    width = len(str(n - 1))
    for i in range(n):
        with open(os.path.join(path, f"e{i:0{width}d}"), "wb") as f:
            f.truncate(FILE_SIZE)


def count_entries(mnt):
    """Entries listed by mnt once it is a mountpoint, else 0."""
    if not mounted(mnt):
        return 0
    try:
        return len(os.listdir(mnt))
    except OSError:
        return 0


def log_tail(path, lines=2):
    """The last lines of a log, on one line."""
    if not path:
        return ""
    try:
        with open(path, errors="replace") as f:
            tail = f.read()[-8192:].splitlines()[-lines:]
    except OSError:
        return ""
    return " / ".join(x.strip()[:240] for x in tail)


class Scale:
    def __init__(self, res, workdir, nbdfs):
        self.res, self.workdir, self.nbdfs = res, workdir, nbdfs
        self.logs = {}                # mountpoint -> the daemon's log

    def _paths(self, tag):
        mnt = os.path.join(self.workdir, tag)
        os.makedirs(mnt, exist_ok=True)
        return mnt, os.path.join(self.workdir, f"{tag}.log")

    def start_fg(self, server, tag, n):
        """nbdfs -f -a; returns (proc, mnt, seconds until the mount lists n files)."""
        mnt, logpath = self._paths(tag)
        self.logs[mnt] = logpath
        cmd = [self.nbdfs, "-f", "-a", server.uri, mnt]
        with open(logpath, "ab") as logf:
            t0 = time.monotonic()
            proc = subprocess.Popen(cmd, stdout=logf, stderr=logf, start_new_session=True,
                                    preexec_fn=_child_nofile)
        self.res.daemons.append(proc)
        self.res.mounts.append(mnt)
        seen = [0]

        def ready():
            if proc.poll() is not None:
                raise RuntimeError(f"nbdfs -a exited {proc.returncode}: {log_tail(logpath)}")
            seen[0] = count_entries(mnt)
            return seen[0] >= n
        try:
            wait_until(ready, MOUNT_TIMEOUT, f"nbdfs -a to list {n} files")
        except RuntimeError as e:
            self.res.stop_daemon(proc, mnt)
            raise RuntimeError(f"{e} (listed {seen[0]})") from None
        return proc, mnt, time.monotonic() - t0

    def stop_fg(self, proc, mnt, r, key):
        """fusermount3 -u, then waits for the daemon to exit: r[key] = seconds
        (infinity when it is still running after STOP_TIMEOUT)."""
        t0 = time.monotonic()
        p = run(["fusermount3", "-u", mnt], timeout=STOP_TIMEOUT, check=False)
        if p.returncode != 0:
            raise RuntimeError(f"fusermount3 -u: {p.stderr.strip()}")
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            r[key] = float("inf")
            raise RuntimeError(f"nbdfs still running {STOP_TIMEOUT} s after fusermount3 -u; "
                               f"its log ends: {log_tail(self.logs.get(mnt))}") from None
        r[key] = time.monotonic() - t0
        self.res.stop_daemon(proc, mnt)       # bookkeeping only: both are gone
        if proc.returncode != 0:
            raise RuntimeError(f"nbdfs exited {proc.returncode} after unmount: "
                               f"{log_tail(self.logs.get(mnt))}")

    def idle(self, pid, r):
        """The idle daemon right after the mount: nothing has been opened yet."""
        r["threads"] = proc_status(pid, "Threads")
        rss = proc_status(pid, "VmRSS")
        r["rss_mib"] = rss / 1024 if rss is not None else None
        r["sockets"] = proc_sockets(pid)
        r["nofile"] = proc_nofile(pid)
        c0 = proc_cpu(pid)
        time.sleep(IDLE_SECS)
        c1 = proc_cpu(pid)
        r["idle_cpu_s"] = c1 - c0 if c0 is not None and c1 is not None else None

    @staticmethod
    def ls_l(mnt, r):
        """What ls -l asks for every file: readdir, then lstat of each entry."""
        t0 = time.monotonic()
        n = 0
        with os.scandir(mnt) as it:
            for e in it:
                e.stat(follow_symlinks=False)
                n += 1
        r["ls_l_s"] = time.monotonic() - t0
        r["ls_l_files"] = n

    @staticmethod
    def readers(mnt, r):
        """READERS threads, each reading READ_SIZE bytes of its own export, all at once."""
        names = sorted(os.listdir(mnt))
        step = max(1, len(names) // READERS)
        paths = [os.path.join(mnt, x) for x in names[::step][:READERS]]
        barrier = threading.Barrier(len(paths) + 1)
        errs, oks = [], []

        def read_one(path):
            try:
                barrier.wait(timeout=30)
                fd = os.open(path, os.O_RDONLY)
                try:
                    data = os.pread(fd, READ_SIZE, 0)
                finally:
                    os.close(fd)
                if len(data) == READ_SIZE:
                    oks.append(path)
                else:
                    errs.append(f"{os.path.basename(path)}: read {len(data)} bytes")
            except (OSError, threading.BrokenBarrierError) as e:
                errs.append(f"{os.path.basename(path)}: {e}")
        threads = [threading.Thread(target=read_one, args=(p,), daemon=True) for p in paths]
        for t in threads:
            t.start()
        barrier.wait(timeout=30)
        t0 = time.monotonic()
        deadline = t0 + 60
        for t in threads:
            t.join(timeout=max(0, deadline - time.monotonic()))
        r["read_s"] = time.monotonic() - t0
        r["read_ok"] = len(oks)
        r["read_n"] = len(paths)
        hung = sum(t.is_alive() for t in threads)
        if hung:
            errs.append(f"{hung} reader(s) still blocked after 60 s")
        r["read_errors"] = errs[:3]

    def case_main(self, server, n, r):
        """Mount in the foreground, the idle daemon, ls -l, readers, unmount."""
        proc, mnt, r["mount_fg_s"] = self.start_fg(server, "scale-fg", n)
        try:
            self.idle(proc.pid, r)
            self.ls_l(mnt, r)
            self.readers(mnt, r)
            r["sockets_after"] = proc_sockets(proc.pid)
            r["threads_after"] = proc_status(proc.pid, "Threads")
            self.stop_fg(proc, mnt, r, "umount_s")
        finally:
            self.res.stop_daemon(proc, mnt)

    def case_background(self, server, n, r):
        """nbdfs -a without -f: the command returns once the mount is ready."""
        mnt, logpath = self._paths("scale-bg")
        pidfile = os.path.join(self.workdir, "scale-bg.pid")
        if os.path.exists(pidfile):
            os.unlink(pidfile)
        cmd = [self.nbdfs, "-a", "--pidfile", pidfile, f"--log={logpath}", server.uri, mnt]
        self.res.mounts.append(mnt)
        self.res.detached.append(mnt)
        try:
            t0 = time.monotonic()
            p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 start_new_session=True, preexec_fn=_child_nofile)
            self.res.workers.append(p)
            try:
                _, err = p.communicate(timeout=MOUNT_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"nbdfs -a (background) did not return in "
                                   f"{MOUNT_TIMEOUT} s") from None
            finally:
                Resources._kill(p, timeout=5)
                self.res.workers.remove(p)
                p.stderr.close()
            r["mount_bg_s"] = time.monotonic() - t0
            if p.returncode != 0:
                raise RuntimeError(f"nbdfs -a (background) exit {p.returncode}: "
                                   f"{err.decode(errors='replace').strip()[-300:]} "
                                   f"{log_tail(logpath)}")
            r["bg_listed"] = count_entries(mnt)
            with open(pidfile) as f:
                pid = int(f.read().split()[0])
            # coreutils ls -l on a fresh mount: lstat and the xattrs it asks
            # for (ACLs, SELinux label) of every file
            t1 = time.monotonic()
            run(["ls", "-l", mnt], timeout=MOUNT_TIMEOUT)
            r["ls_l_coreutils_s"] = time.monotonic() - t1
            t2 = time.monotonic()
            q = run(["fusermount3", "-u", mnt], timeout=STOP_TIMEOUT, check=False)
            if q.returncode != 0:
                raise RuntimeError(f"fusermount3 -u: {q.stderr.strip()}")
            try:
                wait_until(lambda: not pid_alive(pid), STOP_TIMEOUT,
                           "the background nbdfs to exit after fusermount3 -u")
            except RuntimeError as e:
                r["umount_bg_s"] = float("inf")
                raise RuntimeError(f"{e}; its log ends: {log_tail(logpath)}") from None
            r["umount_bg_s"] = time.monotonic() - t2
        finally:
            self.res.stop_detached(mnt)

    def case_delay(self, server, n, r):
        proc, mnt, r["delay_mount_s"] = self.start_fg(server, "scale-delay", n)
        try:
            self.stop_fg(proc, mnt, r, "delay_umount_s")
        finally:
            self.res.stop_daemon(proc, mnt)


def exports_for(args):
    if args.scale_exports:
        return args.scale_exports
    return EXPORTS_QUICK if args.quick else EXPORTS_FULL


def run_scale(args, res, workdir, nbdfs, ids):
    """Runs the selected scale cases args.reps times. Returns a dict: n, reps
    (list of per-rep dicts), medians, errors ({case: message})."""
    n = exports_for(args)
    out = {"n": n, "delay_n": DELAY_EXPORTS, "reps": [], "errors": {}, "medians": {}}
    servers = []
    try:
        sc = Scale(res, workdir, nbdfs)
        main_srv = delay_srv = None
        if "scale" in ids:
            d = os.path.join(workdir, "scale-dir")
            make_sparse_dir(d, n)
            main_srv = start_nbdkit(res, workdir, "scale", ["file", f"dir={d}"],
                                    threads=SERVER_THREADS)
            servers.append(main_srv)
        if "scale-delay-open" in ids:
            d = os.path.join(workdir, "scale-delay-dir")
            make_sparse_dir(d, DELAY_EXPORTS)
            delay_srv = start_nbdkit(res, workdir, "scale-delay",
                                     ["--filter=delay", "file", f"dir={d}",
                                      f"delay-open={DELAY_OPEN}"], threads=SERVER_THREADS)
            servers.append(delay_srv)
        cases = []
        if main_srv:
            cases += [("scale", sc.case_main, main_srv, n),
                      ("scale-bg", sc.case_background, main_srv, n)]
        if delay_srv:
            cases.append(("scale-delay-open", sc.case_delay, delay_srv, DELAY_EXPORTS))
        for rep in range(args.reps):
            r = {}
            for name, fn, srv, count in cases:
                try:
                    fn(srv, count, r)
                except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as e:
                    log(f"rep {rep + 1} {name}: FAILED: {e}")
                    out["errors"].setdefault(name, str(e))
                log(f"rep {rep + 1} {name}: " + ", ".join(
                    f"{k} {fmt(v, 2)}" for k, v in fn_keys(r, name)))
            out["reps"].append(r)
    finally:
        for s in reversed(servers):
            res.stop_server(s.proc)
    for s in servers:
        tail = log_tail(os.path.join(workdir, f"{s.name}.nbdkit.log"), 1)
        if tail:
            out.setdefault("server_log", []).append(f"nbdkit {s.name}'s log ends: {tail}")
    keys = {k for r in out["reps"] for k, v in r.items() if isinstance(v, (int, float))}
    for k in keys:
        out["medians"][k] = median([r.get(k) for r in out["reps"]])
    for k in ("read_ok",):            # the worst rep counts
        vals = [r[k] for r in out["reps"] if k in r]
        if vals:
            out["medians"][k] = min(vals)
    errs = [e for r in out["reps"] for e in r.get("read_errors", [])]
    out["read_errors"] = errs[:3]
    nofile = [r["nofile"] for r in out["reps"] if r.get("nofile")]
    out["nofile"] = nofile[0] if nofile else None
    return out


CASE_KEYS = {
    "scale": ("mount_fg_s", "threads", "rss_mib", "sockets", "idle_cpu_s", "ls_l_s", "read_ok",
              "read_s", "umount_s"),
    "scale-bg": ("mount_bg_s", "bg_listed", "ls_l_coreutils_s", "umount_bg_s"),
    "scale-delay-open": ("delay_mount_s", "delay_umount_s"),
}


def fn_keys(r, name):
    return [(k, r[k]) for k in CASE_KEYS[name] if k in r]


def goals(n, ncpu):
    """(key, what, target text, check) of issue 9's scale targets; check None = info."""
    tmax = 2 * ncpu + 8
    tick = 1 / CLK_TCK
    return [
        ("mount_fg_s", f"mount returns: nbdfs -f -a, until the mount lists {n} files (s)",
         "< 3", lambda v: v < 3),
        ("mount_bg_s", "mount returns: nbdfs -a in the background, the command's wall time (s)",
         "< 3", lambda v: v < 3),
        ("bg_listed", "  files listed when the background command returned", f"{n}",
         lambda v: v == n),
        ("threads", "idle daemon: threads", f"<= {tmax} (2 x {ncpu} CPUs + 8)",
         lambda v: v <= tmax),
        ("rss_mib", "idle daemon: RSS (MiB)", "< 100", lambda v: v < 100),
        ("sockets", "idle daemon: sockets before a file is opened (any socket counts)", "0",
         lambda v: v == 0),
        ("idle_cpu_s", f"idle daemon: CPU (user+sys) over {IDLE_SECS} s (s)",
         f"~0 (<= {tick:g}, one tick)", lambda v: v <= tick + 1e-9),
        ("ls_l_s", "ls -l of the mount: scandir + lstat of every file (s)", "< 1",
         lambda v: v < 1),
        ("ls_l_coreutils_s", "  coreutils ls -l (also asks for xattrs), fresh background mount (s)",
         "(info)", None),
        ("read_ok", f"{READERS} exports read at once, {READ_SIZE // 1024} KiB each: reads ok",
         f"{READERS} of {READERS}", lambda v: v == READERS),
        ("read_s", "  wall time of the reads (s)", "(info)", None),
        ("sockets_after", "  sockets after the reads", "(info)", None),
        ("threads_after", "  threads after the reads", "(info)", None),
        ("umount_s", "unmount: fusermount3 -u until the daemon exits (s)", "< 2",
         lambda v: v < 2),
        ("umount_bg_s", "  unmount of the background mount (s)", "(info)", None),
        ("delay_mount_s", f"{DELAY_EXPORTS} exports, delay-open={DELAY_OPEN}: mount returns "
         "(-f, until listed) (s)", "< 2", lambda v: v < 2),
        ("delay_umount_s", "  unmount of those (s)", "(info)", None),
    ]


def evaluate(scale, ncpu):
    """[(key, what, value text, target, verdict)] and the count of PASS/MISS."""
    rows = []
    n = scale["n"]
    m = scale["medians"]
    for key, what, target, check in goals(n, ncpu):
        v = m.get(key)
        if v is None:
            continue
        if key == "read_ok":
            vtext = f"{v:.0f} of {m.get('read_n', READERS):.0f}"
        elif key in ("threads", "sockets", "sockets_after", "threads_after", "bg_listed"):
            vtext = f"{v:.0f}"
        elif v == float("inf"):
            vtext = f"> {STOP_TIMEOUT}"
        else:
            vtext = f"{v:.2f}"
        verdict = "info" if check is None else ("PASS" if check(v) else "MISS")
        rows.append((key, what, vtext, target, verdict))
    return rows


def report(scale, ncpu, reps):
    """The scale section of the report: lines."""
    if not scale:
        return []
    n = scale["n"]
    out = [f"## scale (issue 9): nbdfs -a over `nbdkit file dir=` ({n} sparse files; "
           f"{DELAY_EXPORTS} behind --filter=delay delay-open={DELAY_OPEN}), "
           f"RLIMIT_NOFILE {NOFILE}/{NOFILE}, median of {reps} rep(s)"]
    if n != EXPORTS_FULL:
        out.append(f"(the targets are for {EXPORTS_FULL} exports; this run has {n})")
    if scale.get("nofile"):
        out.append(f"the daemon's RLIMIT_NOFILE as it ran: soft {scale['nofile'][0]}, "
                   f"hard {scale['nofile'][1]}")
    out.append("")
    rows = evaluate(scale, ncpu)
    cols = ("measure", "value", "target", "")
    w = [max([len(cols[i])] + [len(r[i + 1]) for r in rows]) for i in range(4)]

    def line(vals):
        return "| " + " | ".join(str(v).rjust(w[i]) if i == 1 else str(v).ljust(w[i])
                                 for i, v in enumerate(vals)) + " |"
    out.append(line(cols))
    out.append("|" + "|".join("-" * (x + 2) for x in w) + "|")
    for r in rows:
        out.append(line(r[1:]))
    for case, msg in scale["errors"].items():
        out.append(f"{case}: ERR: {msg[:600]}")
    for line in scale.get("server_log", []):
        out.append(line)
    if scale.get("read_errors"):
        out.append("read errors: " + "; ".join(scale["read_errors"]))
    return out


def summary(scale, ncpu):
    """One line for the goals list."""
    if not scale:
        return []
    rows = [r for r in evaluate(scale, ncpu) if r[4] != "info"]
    miss = [r[0] for r in rows if r[4] == "MISS"]
    line = (f"#9 scale ({scale['n']} exports): {len(rows) - len(miss)} of {len(rows)} "
            f"PASS" + (f"; MISS: {', '.join(miss)}" if miss else ""))
    if scale["errors"]:
        line += f"; FAILED: {', '.join(scale['errors'])}"
    return [line + " (see the scale table)"]
