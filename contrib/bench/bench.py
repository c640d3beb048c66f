#!/usr/bin/python3
"""Benchmark nbdfs against nbdfuse and the raw NBD limit (fio's nbd engine, nbdcopy).

One run starts `nbdkit memory 1G` on a Unix socket (filled with random data),
mounts it through nbdfs (export file and a split partition file, plus a loop
device over the partition file) and through nbdfuse (file, plus a loop device),
runs the same workloads through each of them and through fio's nbd ioengine
straight at the export, and prints one table with medians over --reps runs,
the ratios nbdfs/nbdfuse and nbdfs/limit, and the issues' goals as PASS/MISS.
The scale workload (scale.py: `nbdfs -a` over 10,000 exports under
RLIMIT_NOFILE 1024) runs first and has a table of its own. Only the servers
and mounts the selected workloads (--only) need are started.

Standard library only. Needs root (loop devices, drop_caches), fio, nbdkit,
nbdcopy, nbdfuse, fusermount3, losetup. Everything it starts (servers, mounts,
loop devices, fio/dd) is ended in a finally block, also on SIGINT/SIGTERM.

    /usr/bin/python3 contrib/bench/bench.py [--quick] [--build DIR]
        [--runtime S] [--reps N] [--out FILE] [--json FILE] [--only REGEX]
        [--scale-exports N]

--quick (1 rep of 1 s per run, 1000 exports in the scale workload, about 2
minutes) is the CI smoke run. Speed is never asserted. Exit status: 0 when
every run worked; 1 when a run failed, nbdfs is missing (see --build,
--no-nbdfs) or did not mount, or a mount, loop device or process was left
behind; 2 when a tool or root is missing; 130 when interrupted (after cleaning
up).
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True    # no root-owned __pycache__ in the source tree
from benchlib import (GiB, MiB, Interrupted, Resources, _child_signals,  # noqa: E402
                      ctx_delta, ctx_switches, drop_caches, fmt, fmt_ratio, leftovers, log,
                      median, mounted, nthreads, proc_cpu, proc_minflt, proc_status, ratio,
                      reset_hwm, run, start_daemon, start_nbdkit, wait_started, wait_until)
import scale  # noqa: E402

SRC_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPORT_SIZE = GiB
SPLIT_SECTORS = 2048            # nbdfs disk-part1 = first 1 MiB, disk-part2 = the rest
LIBFUSE_MEMFILE_SRC = "/work/shared/bench/fuse_memfile.c"


# ---------------------------------------------------------------- setup

def make_random_file(path, size):
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MiB)
            f.write(os.urandom(n))
            left -= n


class Target:
    """One way of reaching the export: a file (FUSE, loop device) or raw NBD;
    or an in-memory FUSE file with no NBD behind it (server None)."""

    def __init__(self, name, kind, path=None, server=None, daemon=None, loop_over=None,
                 hold_open=None, only_kind=None):
        self.name = name          # row label
        self.kind = kind          # 'file' or 'raw'
        self.path = path
        self.server = server      # Server, or None
        # 'fio' or 'dd': the target serves only the workloads of that kind
        self.only_kind = only_kind
        self.daemon = daemon      # Popen of the FUSE daemon, or None
        # A loop device over this file is attached for each run and detached
        # after it, so that it never holds an alias of the other rows open.
        self.loop_over = loop_over
        # A file of the same export held open (buffered) during the run.
        self.hold_open = hold_open

    @property
    def daemon_pid(self):
        return self.daemon.pid if self.daemon else None

    def size(self):
        if self.kind == "raw":
            return EXPORT_SIZE
        with open(self.path, "rb") as f:
            return f.seek(0, os.SEEK_END)


def mount_nbdfuse(res, workdir, server, tag):
    mnt = os.path.join(workdir, f"nbdfuse-{tag}")
    os.mkdir(mnt)
    pidfile = os.path.join(workdir, f"nbdfuse-{tag}.pid")
    logpath = os.path.join(workdir, f"nbdfuse-{tag}.log")
    cmd = ["nbdfuse", "-P", pidfile, os.path.join(mnt, "nbd"), server.uri]
    proc = start_daemon(res, cmd, logpath, mnt)
    wait_started(proc, "nbdfuse", cmd, logpath, lambda: os.path.exists(pidfile) and mounted(mnt),
                 30, f"nbdfuse {tag} to mount")
    log(f"nbdfuse {tag}: pid {proc.pid} at {mnt}")
    return proc, os.path.join(mnt, "nbd")


def mount_nbdfs(res, workdir, nbdfs, server, tag, opts=()):
    """Mounts with -f (we own the pid) and split=disk:2048; returns (proc, mnt)."""
    mnt = os.path.join(workdir, f"nbdfs-{tag}")
    os.mkdir(mnt)
    logpath = os.path.join(workdir, f"nbdfs-{tag}.log")
    cmd = [nbdfs, "-f", "-o", f"split=disk:{SPLIT_SECTORS}"]
    for o in opts:
        cmd += ["-o", o]
    cmd += [server.uri, mnt]
    proc = start_daemon(res, cmd, logpath, mnt)
    try:
        wait_started(proc, "nbdfs", cmd, logpath,
                     lambda: mounted(mnt) and os.path.exists(os.path.join(mnt, "disk-part2")),
                     30, f"nbdfs {tag} to mount with disk and disk-part2", tail=800)
    except Exception:
        res.unmount(mnt)
        Resources._kill(proc)
        raise
    log(f"nbdfs {tag}: pid {proc.pid} at {mnt}: {os.listdir(mnt)}")
    return proc, mnt


FLOOR = "floor(memfile)"          # nbdfs's own FUSE request layer, no NBD behind it
LIBFUSE_FLOOR = "libfuse-memfile"  # libfuse 3.14's loop, no NBD behind it
MEMFILE_NAME = "disk"


def mount_memfile(res, workdir, tag, cmd, mnt):
    """Starts an in-memory FUSE file server in the foreground (cmd holds mnt);
    ready when mnt/disk exists. Returns (proc, path of the file)."""
    os.mkdir(mnt)
    logpath = os.path.join(workdir, f"{tag}.log")
    proc = start_daemon(res, cmd, logpath, mnt)
    path = os.path.join(mnt, MEMFILE_NAME)
    try:
        wait_started(proc, tag, cmd, logpath, lambda: mounted(mnt) and os.path.exists(path), 60,
                     f"{tag} to serve {path}")
    except Exception:
        res.stop_daemon(proc, mnt)
        raise
    log(f"{tag}: pid {proc.pid}: {' '.join(cmd)}")
    return proc, path


def memfile_cmd(binary, direct, mnt):
    """nbdfs-memfile's contract: nbdfs-memfile [--direct-io] SIZE MOUNTPOINT."""
    return [binary] + (["--direct-io"] if direct else []) + [str(EXPORT_SIZE), mnt]


def libfuse_memfile_cmd(binary, direct, mnt):
    """fuse_memfile.c: MNT -f -o size=BYTES[,direct_io]."""
    return [binary, mnt, "-f", "-o", f"size={EXPORT_SIZE}" + (",direct_io" if direct else "")]


def build_libfuse_memfile(src, workdir):
    """Compiles fuse_memfile.c into workdir; returns the binary's path."""
    flags = run(["pkg-config", "--cflags", "--libs", "fuse3"]).stdout.split()
    out = os.path.join(workdir, "libfuse-memfile")
    run(["cc", "-O2", "-o", out, src] + flags, timeout=180)
    return out


def attach_loop(res, path, quiet=False):
    dev = run(["losetup", "--direct-io=on", "-f", "--show", path], timeout=30).stdout.strip()
    res.loops.append(dev)
    dio = run(["losetup", "-n", "-O", "DIO", "-l", dev], check=False).stdout.strip()
    if not quiet:
        log(f"loop {dev} over {path} (direct I/O: {dio})")
    return dev, dio == "1"


def detach_loop(res, dev, backing):
    """Detaches and waits until the loop device has let go of its file."""
    res.detach(dev)

    def gone():
        out = run(["losetup", "-n", "-O", "NAME,BACK-FILE", "-l"], check=False).stdout
        return not any(line.split(None, 1)[0] == dev and backing in line
                       for line in out.splitlines() if line.strip())
    wait_until(gone, 30, f"{dev} to detach")


# ---------------------------------------------------------------- workloads

class Workload:
    def __init__(self, wid, label, kind, rw=None, bs=None, qd=None, delay=False,
                 loop=False, metric="MB/s"):
        self.id, self.label, self.kind = wid, label, kind
        self.rw, self.bs, self.qd = rw, bs, qd
        self.delay = delay        # runs against the delayed server
        self.loop = loop          # also runs on the loop devices
        self.metric = metric      # primary metric for ratios: MB/s or IOPS


WORKLOADS = [
    Workload("seqread-1M-qd16", "seq read 1M direct qd16", "fio", "read", "1M", 16, loop=True),
    Workload("seqwrite-1M-qd16", "seq write 1M direct qd16", "fio", "write", "1M", 16, loop=True),
    Workload("seqread-1M-qd1", "seq read 1M direct qd1", "fio", "read", "1M", 1),
    Workload("seqwrite-1M-qd1", "seq write 1M direct qd1", "fio", "write", "1M", 1),
    Workload("dd-read-1M", "dd bs=1M read (buffered)", "dd", "read", 1 * MiB),
    Workload("dd-write-1M", "dd bs=1M write (buffered)", "dd", "write", 1 * MiB),
    Workload("dd-write-4k", "dd bs=4k write (buffered)", "dd", "write", 4096),
    Workload("randread-4k-qd1", "rand read 4k direct qd1", "fio", "randread", "4k", 1,
             loop=True, metric="IOPS"),
    Workload("randwrite-4k-qd1", "rand write 4k direct qd1", "fio", "randwrite", "4k", 1,
             loop=True, metric="IOPS"),
    Workload("randread-4k-qd32", "rand read 4k direct qd32", "fio", "randread", "4k", 32,
             loop=True, metric="IOPS"),
    Workload("randwrite-4k-qd32", "rand write 4k direct qd32", "fio", "randwrite", "4k", 32,
             loop=True, metric="IOPS"),
    Workload("delay-randread-4k-qd32", "rand read 4k qd32, server +1ms", "fio", "randread",
             "4k", 32, delay=True, metric="IOPS"),
]


# Write rows also run on the export file while a partition file is held open.
ALIAS_ROWS = ("seqwrite-1M-qd16", "dd-write-4k", "randwrite-4k-qd32")


class Bench:
    def __init__(self, args, res, workdir, srcfile):
        self.args, self.res, self.workdir, self.srcfile = args, res, workdir, srcfile
        self.loops_seen = set()
        self.no_dio = set()

    def _spawn(self, cmd, **kw):
        p = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_child_signals, **kw)
        self.res.workers.append(p)
        return p

    def _reap(self, p):
        if p in self.res.workers:
            self.res.workers.remove(p)

    @staticmethod
    def _communicate(p, timeout, what):
        """p.communicate() within timeout; past it, p is killed and
        RuntimeError(what) raised."""
        try:
            return p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            Resources._kill(p, signal.SIGKILL, 5)
            raise RuntimeError(what)

    def run_fio(self, w, t, size):
        out = os.path.join(self.workdir, "fio.json")
        if os.path.exists(out):
            os.unlink(out)
        cmd = ["fio", f"--name={w.id}", f"--rw={w.rw}", f"--bs={w.bs}", f"--iodepth={w.qd}",
               "--time_based=1", f"--runtime={self.args.runtime}", "--norandommap=1",
               "--randrepeat=0", "--output-format=json", f"--output={out}"]
        if t.kind == "raw":
            cmd += ["--ioengine=nbd", f"--uri={t.server.uri}"]
        else:
            size -= size % MiB
            cmd += ["--ioengine=libaio", "--direct=1", f"--filename={t.path}",
                    f"--size={size}", "--fallocate=none", "--invalidate=1",
                    "--allow_file_create=0"]
        p = self._spawn(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _, err = self._communicate(p, self.args.runtime + 60, "fio timed out")
        finally:
            self._reap(p)
        if p.returncode != 0:
            raise RuntimeError(f"fio exit {p.returncode}: {err.decode(errors='replace')[-300:]}")
        with open(out) as f:
            d = json.load(f)
        j = d["jobs"][0]
        if j.get("error"):
            raise RuntimeError(f"fio job error {j['error']}")
        side = j["write"] if w.rw in ("write", "randwrite") else j["read"]
        pct = side.get("clat_ns", {}).get("percentile", {})
        nbytes = j["read"]["io_bytes"] + j["write"]["io_bytes"]
        secs = side["runtime"] / 1000.0 if side.get("runtime") else self.args.runtime
        return {
            "bytes": nbytes,
            "secs": secs,
            "mbs": side["bw_bytes"] / 1e6,
            "iops": side["iops"],
            "p50_us": pct["50.000000"] / 1e3 if "50.000000" in pct else None,
            "p99_us": pct["99.000000"] / 1e3 if "99.000000" in pct else None,
            "ios": side["total_ios"] if "total_ios" in side else None,
        }

    def run_dd(self, w, t, size):
        """Buffered dd, bounded by --runtime (SIGINT makes dd print what it did).
        Writes are timed up to an fsync of the file (data on the server)."""
        bs = w.bs
        count = size // bs
        drop_caches()
        if w.rw == "read":
            cmd = ["dd", f"if={t.path}", "of=/dev/null", f"bs={bs}", f"count={count}"]
        else:
            cmd = ["dd", f"if={self.srcfile}", f"of={t.path}", f"bs={bs}",
                   f"count={count}", "conv=notrunc"]
        t0 = time.monotonic()
        p = self._spawn(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            try:
                p.wait(timeout=self.args.runtime)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGINT)
            _, err = self._communicate(p, 60, "dd did not stop")
        finally:
            self._reap(p)
        if w.rw == "write":
            fd = os.open(t.path, os.O_WRONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        secs = time.monotonic() - t0
        err = err.decode(errors="replace")
        m = re.search(r"^(\d+) bytes", err, re.M)
        if not m:
            raise RuntimeError(f"dd: {err.strip()[-300:]}")
        nbytes = int(m.group(1))
        if p.returncode not in (0, -signal.SIGINT, 130) and nbytes < count * bs:
            raise RuntimeError(f"dd exit {p.returncode}: {err.strip()[-300:]}")
        return {"bytes": nbytes, "secs": secs, "mbs": nbytes / secs / 1e6,
                "iops": nbytes / bs / secs, "p50_us": None, "p99_us": None,
                "ios": nbytes // bs}

    def run_nbdcopy(self, w, t):
        """The raw sequential limit for dd rows: nbdcopy of the whole export."""
        if w.rw == "read":
            cmd = ["nbdcopy", t.server.uri, "null:"]
        else:
            cmd = ["nbdcopy", self.srcfile, t.server.uri]
        t0 = time.monotonic()
        p = self._spawn(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _, err = self._communicate(p, 120, "nbdcopy timed out")
        finally:
            self._reap(p)
        secs = time.monotonic() - t0
        if p.returncode != 0:
            raise RuntimeError(f"nbdcopy exit {p.returncode}: {err.decode(errors='replace')}")
        return {"bytes": EXPORT_SIZE, "secs": secs, "mbs": EXPORT_SIZE / secs / 1e6,
                "iops": None, "p50_us": None, "p99_us": None, "ios": None}

    def measure(self, w, t):
        dev = held = None
        try:
            if t.loop_over:
                dev, dio = attach_loop(self.res, t.loop_over, quiet=True)
                self.loops_seen.add(dev)
                if not dio:
                    self.no_dio.add(t.name)
                t.path = dev
            if t.hold_open:
                held = os.open(t.hold_open, os.O_RDONLY)
            return self._measure(w, t)
        finally:
            if held is not None:
                os.close(held)
            if dev:
                detach_loop(self.res, dev, t.loop_over)
                t.path = None

    def _measure(self, w, t):
        dpid, spid = t.daemon_pid, t.server.pid if t.server else None
        size = t.size()
        if dpid:
            reset_hwm(dpid)
            ctx0 = ctx_switches(dpid)
            flt0 = proc_minflt(dpid)
        d0, s0 = proc_cpu(dpid), proc_cpu(spid)
        if w.kind == "fio":
            r = self.run_fio(w, t, size)
        elif t.kind == "raw":
            r = self.run_nbdcopy(w, t)
        else:
            r = self.run_dd(w, t, size)
        d1, s1 = proc_cpu(dpid), proc_cpu(spid)
        gib = r["bytes"] / GiB if r["bytes"] else None
        r["daemon_cpu_gib"] = (d1 - d0) / gib if dpid and gib and d0 is not None \
            and d1 is not None else None
        r["nbdkit_cpu_gib"] = (s1 - s0) / gib if gib and s0 is not None \
            and s1 is not None else None
        # the same CPU per request (fio's requests; dd's bs blocks), in us
        n = r.get("ios")
        r["daemon_us_per_io"] = (d1 - d0) / n * 1e6 if dpid and n and d0 is not None \
            and d1 is not None else None
        r["nbdkit_us_per_io"] = (s1 - s0) / n * 1e6 if n and s0 is not None \
            and s1 is not None else None
        if dpid:
            hwm = proc_status(dpid, "VmHWM")
            r["rss_mib"] = hwm / 1024 if hwm else None
            ctx1 = ctx_switches(dpid)
            ios = r.get("ios")
            flt1 = proc_minflt(dpid)
            if flt0 is not None and flt1 is not None and ios:
                r["minflt_per_io"] = (flt1 - flt0) / ios
            if ctx0 is not None and ctx1 is not None and ios:
                vol, inv = ctx_delta(ctx0, ctx1)
                r["vcs_per_io"] = vol / ios
                r["ivcs_per_io"] = inv / ios
            r["threads"] = nthreads(dpid)
            r["new_threads"] = len(set(ctx1 or {}) - set(ctx0 or {}))
        return r


# ---------------------------------------------------------------- report

def primary(w, r):
    if not r:
        return None
    return r.get("iops") if w.metric == "IOPS" else r.get("mbs")


def version_lines(nbdfs):
    def first(cmd):
        try:
            out = run(cmd, timeout=10, check=False)
            text = (out.stdout or out.stderr).strip().splitlines()
            return text[0] if text else "?"
        except (OSError, subprocess.TimeoutExpired):
            return "not found"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "?"
    commit = first(["git", "-C", SRC_DIR, "describe", "--always", "--dirty"])
    lines = [
        f"date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}",
        f"kernel: {platform.release()}  cpu: {cpu} x {os.cpu_count()}  "
        f"mem: {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') // GiB} GiB",
        f"nbdfs: {commit} ({nbdfs if nbdfs else 'not built'})",
        f"nbdkit: {first(['nbdkit', '--version'])}  nbdfuse: {first(['nbdfuse', '--version'])}"
        f"  nbdcopy: {first(['nbdcopy', '--version'])}",
        f"fio: {first(['fio', '--version'])}  {first(['fusermount3', '-V'])}"
        f"  python: {platform.python_version()}",
    ]
    return lines


GOALS_DOC = """goals (ratios are of medians; #10: issue 10, the FUSE side of every request;
#9: issue 9, one event loop per core; G6, G7: kept from the first goals):
  #10a dd bs=4k buffered write            nbdfs >= 1.5 x nbdfuse (neither with writeback)
  #10b dd bs=1M buffered write and read   nbdfs >= 1.5 x nbdfuse
  #10c O_DIRECT 1M qd16 read and write    nbdfs >= 0.9 x raw (fio nbd engine)
  #10d 4k randread qd1 p50                nbdfs <= 1.05 x floor (floor(memfile) p50 + raw p50)
  #10e daemon CPU s/GiB, sequential reads nbdfs <= 0.5 x nbdfuse
  #10f peak RSS of the daemon             nbdfs <= nbdfuse
  #10g loop (--direct-io=on) over a partition file vs the file   >= 0.85 on every row
  #9a  4k rand read and write qd32 IOPS   nbdfs >= 0.6 x raw
  #9b  4k rand read and write qd32        daemon CPU per request <= 10 us
  #9c  4k rand read and write qd32        nbdkit CPU per request serving nbdfs <= 1.3 x serving raw
  #9   scale                              the targets in the scale table
  G6   4k randread qd32, server +1ms      nbdfs >= 0.90 x raw
  G7   partition file vs export file      >= 0.95 on every row"""

NBDFS_ROWS = ("nbdfs", "nbdfs-part2", "nbdfs-loop", "nbdfs-alias")
QD32_ROWS = ("randread-4k-qd32", "randwrite-4k-qd32")


def qd1_floor(results, wid):
    """(floor p50 us, which memfile) of a qd1 fio workload: the in-memory FUSE
    file's p50 + raw NBD's p50; libfuse's file stands in while nbdfs's is absent."""
    raw = results.get((wid, "raw"))
    for name in (FLOOR, LIBFUSE_FLOOR):
        mem = results.get((wid, name))
        if mem and raw and mem.get("p50_us") is not None and raw.get("p50_us") is not None:
            return mem["p50_us"] + raw["p50_us"], name, mem["p50_us"], raw["p50_us"]
    return None


def evaluate(results, scale_lines=()):
    """Returns (goal notes per (workload id, target), list of summary lines).
    A goal whose workloads did not run is left out; scale_lines (the scale
    workload's summary) go after the other #9 goals."""
    notes = {}
    summary = []
    ran = {wid for wid, _ in results}

    def get(wid, tname):
        return results.get((wid, tname))

    def add(key, text):
        notes.setdefault(key, []).append(text)

    def verdict(v, op, limit):
        return "PASS" if (v >= limit if op == ">=" else v <= limit) else "MISS"

    def check(gid, v, op, limit, key, what, unit=""):
        if key[0] not in ran:
            return
        if v is None:
            add(key, f"{gid} n/a")
            summary.append(f"{gid} {what}: n/a")
            return
        vd = verdict(v, op, limit)
        shown = f"{v:.2f}x " if unit == "x" else f"{v:.1f}{unit} " if unit else ""
        add(key, f"{gid} {shown}{op}{limit:g}{unit} {vd}")
        summary.append(f"{gid} {what}: {v:.2f}{unit} ({op} {limit:g}{unit}) {vd}")

    w_by_id = {w.id: w for w in WORKLOADS}

    def tput(wid, tname):
        return primary(w_by_id[wid], get(wid, tname))

    def val(wid, tname, k):
        r = get(wid, tname)
        return r.get(k) if r else None

    check("#10a", ratio(tput("dd-write-4k", "nbdfs"), tput("dd-write-4k", "nbdfuse")), ">=",
          1.5, ("dd-write-4k", "nbdfs"), "dd-write-4k nbdfs/nbdfuse")
    for wid in ("dd-write-1M", "dd-read-1M"):
        check("#10b", ratio(tput(wid, "nbdfs"), tput(wid, "nbdfuse")), ">=", 1.5,
              (wid, "nbdfs"), f"{wid} nbdfs/nbdfuse")
    for wid in ("seqread-1M-qd16", "seqwrite-1M-qd16"):
        check("#10c", ratio(tput(wid, "nbdfs"), tput(wid, "raw")), ">=", 0.9,
              (wid, "nbdfs"), f"{wid} nbdfs/raw")
    # the qd1 floor beside every nbdfs row of a qd1 fio workload; the goal on one
    for w in WORKLOADS:
        if w.kind != "fio" or w.qd != 1 or w.id not in ran:
            continue
        fl = qd1_floor(results, w.id)
        for tname in NBDFS_ROWS:
            p50 = val(w.id, tname, "p50_us")
            if fl and p50 is not None:
                add((w.id, tname), f"floor {fl[0]:.1f}us: {p50 / fl[0]:.2f}x")
    wid = "randread-4k-qd1"
    if wid in ran:
        fl = qd1_floor(results, wid)
        p50 = val(wid, "nbdfs", "p50_us")
        if fl is None or p50 is None:
            add((wid, "nbdfs"), "#10d n/a")
            summary.append(f"#10d {wid} p50 nbdfs/floor: n/a (needs nbdfs, raw(fio nbd) and "
                           f"{FLOOR} or {LIBFUSE_FLOOR} rows)")
        else:
            v = p50 / fl[0]
            vd = verdict(v, "<=", 1.05)
            stand_in = f" [{LIBFUSE_FLOOR} stands in for {FLOOR}]" if fl[1] != FLOOR else ""
            add((wid, "nbdfs"), f"#10d <=1.05 {vd}")
            summary.append(f"#10d {wid} p50 nbdfs {p50:.1f} us / floor {fl[0]:.1f} us "
                           f"({fl[1]} {fl[2]:.1f} + raw {fl[3]:.1f}): {v:.2f} (<= 1.05) "
                           f"{vd}{stand_in}")
    for wid in ("seqread-1M-qd16", "seqread-1M-qd1", "dd-read-1M"):
        check("#10e", ratio(val(wid, "nbdfs", "daemon_cpu_gib"),
                            val(wid, "nbdfuse", "daemon_cpu_gib")), "<=", 0.5,
              (wid, "nbdfs"), f"{wid} daemon CPU s/GiB nbdfs/nbdfuse")
    peaks = {}
    for (wid, tname), r in results.items():
        base = {"nbdfs": "nbdfs", "nbdfs-part2": "nbdfs", "nbdfs-loop": "nbdfs",
                "nbdfs-alias": "nbdfs",
                "nbdfuse": "nbdfuse", "nbdfuse-loop": "nbdfuse"}.get(tname)
        if base and r.get("rss_mib_max") is not None and not w_by_id[wid].delay:
            peaks[base] = max(peaks.get(base, 0), r["rss_mib_max"])
    v = ratio(peaks.get("nbdfs"), peaks.get("nbdfuse"))
    if v is not None:
        summary.append(f"#10f peak RSS nbdfs {peaks['nbdfs']:.1f} MiB / nbdfuse "
                       f"{peaks['nbdfuse']:.1f} MiB: {v:.2f} (<= 1) {verdict(v, '<=', 1)}")
    elif peaks:
        summary.append("#10f peak RSS nbdfs/nbdfuse: n/a")
    for wid in QD32_ROWS:
        check("#9a", ratio(tput(wid, "nbdfs"), tput(wid, "raw")), ">=", 0.6,
              (wid, "nbdfs"), f"{wid} IOPS nbdfs/raw")
        check("#9b", val(wid, "nbdfs", "daemon_us_per_io"), "<=", 10, (wid, "nbdfs"),
              f"{wid} nbdfs daemon CPU per request", unit="us")
        check("#9c", ratio(val(wid, "nbdfs", "nbdkit_us_per_io"),
                           val(wid, "raw", "nbdkit_us_per_io")), "<=", 1.3, (wid, "nbdfs"),
              f"{wid} nbdkit CPU per request serving nbdfs/serving raw", unit="x")
    summary += scale_lines
    wid = "delay-randread-4k-qd32"
    check("G6", ratio(tput(wid, "nbdfs"), tput(wid, "raw")), ">=", 0.90,
          (wid, "nbdfs"), f"{wid} nbdfs/raw")
    for gid, tname, base, limit in (("#10g", "nbdfs-loop", "nbdfs-part2", 0.85),
                                    ("G7", "nbdfs-part2", "nbdfs", 0.95)):
        worst, n, npass = None, 0, 0
        for w in WORKLOADS:
            r = ratio(tput(w.id, tname), tput(w.id, base))
            if r is None:
                continue
            ok = r >= limit
            n += 1
            npass += ok
            add((w.id, tname), f"{gid} >={limit:g} {'PASS' if ok else 'MISS'}")
            if worst is None or r < worst[0]:
                worst = (r, w.id)
        if worst is not None:
            summary.append(f"{gid} {tname}/{base} worst row {worst[1]}: {worst[0]:.2f} "
                           f"(>= {limit:g}, {npass} of {n} rows pass) "
                           f"{'PASS' if worst[0] >= limit else 'MISS'}")
    wb = [f"{wid} {ratio(tput(wid, 'nbdfs-wb'), tput(wid, 'nbdfuse')):.2f}x"
          for wid in ("dd-read-1M", "dd-write-1M", "dd-write-4k")
          if ratio(tput(wid, "nbdfs-wb"), tput(wid, "nbdfuse")) is not None]
    if wb:
        summary.append("(info) nbdfs -o writeback over nbdfuse: " + ", ".join(wb))
    return notes, summary


def cpu_per_request(results):
    """Lines of the CPU-per-request block for the 4 KiB qd32 rows (issue 9)."""
    vias = ("nbdfs", "nbdfuse", FLOOR, LIBFUSE_FLOOR, "raw")
    lines = []
    for wid in QD32_ROWS:
        raw = results.get((wid, "raw"))
        raw_k = raw.get("nbdkit_us_per_io") if raw else None
        for tname in vias:
            r = results.get((wid, tname))
            if not r:
                continue
            d, k = r.get("daemon_us_per_io"), r.get("nbdkit_us_per_io")
            to_raw = fmt_ratio(ratio(k, raw_k)) if tname != "raw" else "-"
            via = "raw(fio nbd)" if tname == "raw" else tname
            lines.append(f"  {wid:18} {via:16} {fmt(d):>7} {fmt(k):>7} {to_raw:>9}")
    if not lines:
        return []
    return ["CPU per request at 4 KiB qd32 (us of user+sys CPU, all threads, over fio's "
            "requests; clock ticks of 10 ms, so short runs are coarse):",
            f"  {'workload':18} {'via':16} {'daemon':>7} {'nbdkit':>7} {'k / raw':>9}"] + lines


def report(results, errors, scale_out, header, notes_extra, runtime, reps):
    notes, summary = evaluate(results, scale.summary(scale_out, os.cpu_count()))
    cols = ["workload", "via", "MB/s", "IOPS", "p50 us", "p99 us", "dCPU s/GiB",
            "kCPU s/GiB", "RSS MiB", "/nbdfuse", "/limit", "/base", "goals"]
    rows = []
    order = ["nbdfs", "nbdfs-part2", "nbdfs-loop", "nbdfs-wb", "nbdfs-alias", "nbdfuse",
             "nbdfuse-loop", FLOOR, LIBFUSE_FLOOR, "raw"]
    base_of = {"nbdfs-part2": "nbdfs", "nbdfs-loop": "nbdfs-part2", "nbdfs-wb": "nbdfs",
               "nbdfs-alias": "nbdfs", "nbdfuse-loop": "nbdfuse"}
    for w in WORKLOADS:
        for tname in order:
            key = (w.id, tname)
            if key not in results and key not in errors:
                continue
            r = results.get(key)
            if r is None:
                rows.append([w.id, tname, "ERR: " + errors[key][:60]] + [""] * 10)
                continue
            via = tname
            if tname == "raw":
                via = "raw(nbdcopy)" if w.kind == "dd" else "raw(fio nbd)"
            mine = primary(w, r)
            to_fuse = to_lim = to_base = None
            if tname == "nbdfs":
                to_fuse = ratio(mine, primary(w, results.get((w.id, "nbdfuse"))))
                to_lim = ratio(mine, primary(w, results.get((w.id, "raw"))))
            if tname in base_of:
                to_base = ratio(mine, primary(w, results.get((w.id, base_of[tname]))))
            rows.append([
                w.id, via, fmt(r.get("mbs")), fmt(r.get("iops")) if w.metric == "IOPS"
                or w.kind == "fio" else "-",
                fmt(r.get("p50_us")), fmt(r.get("p99_us")), fmt(r.get("daemon_cpu_gib"), 2),
                fmt(r.get("nbdkit_cpu_gib"), 2), fmt(r.get("rss_mib_max")),
                fmt_ratio(to_fuse), fmt_ratio(to_lim), fmt_ratio(to_base),
                "; ".join(notes.get(key, [])),
            ])
    widths = [max(len(str(x)) for x in [c] + [row[i] for row in rows if len(row) > i])
              for i, c in enumerate(cols)]
    widths[2] = min(widths[2], 10)
    out = []
    out += header
    if rows:
        out.append(f"export: nbdkit memory 1G over a Unix socket, random data; runtime "
                   f"{runtime}s per run, median of {reps} rep(s)")
    out += notes_extra
    out.append("")

    def line(vals):
        return "| " + " | ".join(str(v).ljust(widths[i]) if i < 2 or i == len(cols) - 1
                                 else str(v).rjust(widths[i]) for i, v in enumerate(vals)) + " |"
    if rows:
        out.append(line(cols))
        out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for row in rows:
            if row[2].startswith("ERR"):
                out.append(f"| {row[0].ljust(widths[0])} | {row[1].ljust(widths[1])} | "
                           f"{row[2]} |")
            else:
                out.append(line(row))
        out.append("")
        out.append("columns: MB/s = 10^6 bytes/s; p50/p99 = fio completion latency (clat); "
                   "dCPU/kCPU = CPU seconds (user+sys, all threads) of the FUSE daemon / nbdkit "
                   "per GiB moved; RSS = peak VmHWM of the daemon during the run; /nbdfuse and "
                   "/limit = nbdfs over nbdfuse and over raw (MB/s, or IOPS for 4k rows); "
                   "/base = part2 over the export file, loop over the file under it, nbdfs-wb "
                   "and nbdfs-alias over nbdfs.")
        out.append("")
    sc = scale.report(scale_out, os.cpu_count(), reps)
    if sc:
        out += sc
        out.append("")
    out.append(GOALS_DOC)
    out.append("")
    out.append("result:")
    out += ["  " + s for s in summary]
    cpu = cpu_per_request(results)
    if cpu:
        out.append("")
        out += cpu
    prof = []
    for w in WORKLOADS:
        for tname in order:
            r = results.get((w.id, tname))
            if r and r.get("vcs_per_io") is not None:
                prof.append(f"  {w.id:24} {tname:15} vol ctxsw/IO {r['vcs_per_io']:6.2f}  "
                            f"invol/IO {r.get('ivcs_per_io', 0):5.2f}  threads "
                            f"{fmt(r.get('threads'), 0)} (+{fmt(r.get('new_threads'), 0)} "
                            f"new)  minflt/IO {fmt(r.get('minflt_per_io'), 1)}")
    if prof:
        out.append("")
        out.append("daemon profile per I/O (dd: per bs block): context switches (threads "
                   "alive at the end of the run: a lower bound), threads at the end (+ created "
                   "during the run), minor page faults:")
        out += prof
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- main

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="1 rep of ~1 s per workload, 1000 exports in the scale workload "
                         "(CI smoke run; no speed assertions)")
    ap.add_argument("--build", default=os.environ.get("NBDFS_BUILD_DIR",
                                                      os.path.join(SRC_DIR, "build")),
                    help="meson build dir holding src/nbdfs (default $NBDFS_BUILD_DIR "
                         "or SRC/build)")
    ap.add_argument("--runtime", type=float, default=None, help="seconds per run (default 5)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3)")
    ap.add_argument("--out", help="also write the report to FILE")
    ap.add_argument("--json", help="write all raw results as JSON to FILE")
    ap.add_argument("--only", help="regex: run only the workloads whose id matches "
                                   "(scale and scale-delay-open are workloads too)")
    ap.add_argument("--scale-exports", type=int, default=None, metavar="N",
                    help=f"exports of the scale workload (default {scale.EXPORTS_FULL}, "
                         f"{scale.EXPORTS_QUICK} with --quick)")
    ap.add_argument("--memfile", default=None, metavar="PATH",
                    help="nbdfs's in-memory FUSE file (the floor rows; default "
                         "BUILD/contrib/bench/nbdfs-memfile; rows skipped when absent)")
    ap.add_argument("--libfuse-memfile", default=None, metavar="PATH",
                    help="C source of an in-memory libfuse file, compiled at start for the "
                         f"libfuse-memfile rows (default {LIBFUSE_MEMFILE_SRC} if it "
                         "exists; '' skips them)")
    ap.add_argument("--no-nbdfs", action="store_true", help="skip nbdfs")
    ap.add_argument("--no-nbdfuse", action="store_true", help="skip nbdfuse")
    ap.add_argument("--no-loop", action="store_true", help="skip the loop device rows")
    ap.add_argument("--no-writeback", action="store_true",
                    help="skip the informative nbdfs -o writeback dd rows")
    a = ap.parse_args(argv)
    if a.runtime is None:
        a.runtime = 1 if a.quick else 5
    if a.reps is None:
        a.reps = 1 if a.quick else 3
    if a.runtime < 1 or a.reps < 1:
        ap.error("--runtime must be >= 1 and --reps >= 1")
    if a.memfile is None:
        a.memfile = os.path.join(a.build, "contrib", "bench", "nbdfs-memfile")
    if a.libfuse_memfile is None:
        a.libfuse_memfile = LIBFUSE_MEMFILE_SRC if os.path.exists(LIBFUSE_MEMFILE_SRC) else ""
    if a.scale_exports is not None and a.scale_exports < scale.READERS:
        ap.error(f"--scale-exports must be >= {scale.READERS}")
    a.runtime = int(a.runtime)
    return a


def setup_io(args, res, workdir, tools, workloads, notes_extra, failures):
    """Starts the servers and mounts the selected workloads need; returns
    (targets, delay_targets, srcfile)."""
    nbdfs = tools["nbdfs"]
    need_delay = any(w.delay for w in workloads)
    need_dd = any(w.kind == "dd" for w in workloads)
    need_loop = not args.no_loop and any(w.loop for w in workloads)
    srcfile = os.path.join(workdir, "random.img")
    make_random_file(srcfile, EXPORT_SIZE)
    # -t 64: enough server threads that the server never caps qd32 + multi-conn
    main_srv = start_nbdkit(res, workdir, "main", ["memory", "1G"])
    servers = [main_srv]
    delay_srv = None
    if need_delay:
        delay_srv = start_nbdkit(res, workdir, "delay",
                                 ["--filter=delay", "memory", "1G", "delay-read=1ms"])
        servers.append(delay_srv)
    for srv in servers:
        run(["nbdcopy", srcfile, srv.uri], timeout=300)
    log("exports filled with random data")

    def not_started(name, verb, e):
        """A FUSE daemon that would not start: logged, a failure, its rows skipped."""
        log(f"{name} does not {verb}: {e}")
        failures.append(f"{name} did not {verb}: {e}")
        notes_extra.append(f"{name}: did not {verb} ({str(e)[:200]}); rows skipped")

    targets, delay_targets = [], {}
    if nbdfs:
        try:
            proc, mnt = mount_nbdfs(res, workdir, nbdfs, main_srv, "main")
            targets.append(Target("nbdfs", "file", os.path.join(mnt, "disk"),
                                  main_srv, proc))
            part2 = os.path.join(mnt, "disk-part2")
            targets.append(Target("nbdfs-part2", "file", part2, main_srv, proc))
            if need_loop:
                targets.append(Target("nbdfs-loop", "file", None, main_srv, proc,
                                      loop_over=part2))
            targets.append(Target("nbdfs-alias", "file", os.path.join(mnt, "disk"),
                                  main_srv, proc, hold_open=part2))
            notes_extra.append("nbdfs-alias: the export file written while disk-part2 is "
                               "held open (alias coherence at work), write rows only")
            if need_dd and not args.no_writeback:
                proc, mnt = mount_nbdfs(res, workdir, nbdfs, main_srv, "wb", ["writeback"])
                targets.append(Target("nbdfs-wb", "file", os.path.join(mnt, "disk"),
                                      main_srv, proc))
                notes_extra.append("nbdfs-wb: a second nbdfs mount with -o writeback "
                                   "(kernel writeback cache), dd rows only, for information")
            if delay_srv:
                proc, mnt = mount_nbdfs(res, workdir, nbdfs, delay_srv, "delay")
                delay_targets["nbdfs"] = Target("nbdfs", "file", os.path.join(mnt, "disk"),
                                                delay_srv, proc)
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            not_started("nbdfs", "mount", e)
            targets = [t for t in targets if not t.name.startswith("nbdfs")]
            delay_targets.pop("nbdfs", None)
    if tools["nbdfuse"]:
        try:
            proc, path = mount_nbdfuse(res, workdir, main_srv, "main")
            targets.append(Target("nbdfuse", "file", path, main_srv, proc))
            if need_loop:
                targets.append(Target("nbdfuse-loop", "file", None, main_srv, proc,
                                      loop_over=path))
            if delay_srv:
                proc, path = mount_nbdfuse(res, workdir, delay_srv, "delay")
                delay_targets["nbdfuse"] = Target("nbdfuse", "file", path, delay_srv, proc)
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            not_started("nbdfuse", "mount", e)
            targets = [t for t in targets if not t.name.startswith("nbdfuse")]
            delay_targets.pop("nbdfuse", None)
    floors = ((FLOOR, tools["memfile"], memfile_cmd),
              (LIBFUSE_FLOOR, tools["libfuse_memfile"], libfuse_memfile_cmd))
    for name, binary, make_cmd in floors:
        if not binary:
            continue
        # fio rows open O_DIRECT, and nbdfs answers such an open with
        # FOPEN_DIRECT_IO: so does the floor's fio instance; dd rows are
        # buffered, through an instance without it.
        for kind, direct in (("fio", True), ("dd", False)):
            if not any(w.kind == kind and not w.delay for w in workloads):
                continue
            tag = f"{'memfile' if name == FLOOR else 'libfuse-memfile'}-{kind}"
            mnt = os.path.join(workdir, tag)
            try:
                proc, path = mount_memfile(res, workdir, tag, make_cmd(binary, direct, mnt), mnt)
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                not_started(name, "start", e)
                break
            targets.append(Target(name, "file", path, None, proc, only_kind=kind))
    targets.append(Target("raw", "raw", server=main_srv))
    if delay_srv:
        delay_targets["raw"] = Target("raw", "raw", server=delay_srv)
    if not tools["fio_nbd"]:
        notes_extra.append("raw: fio has no nbd engine here; fio raw rows skipped")
    return targets, delay_targets, srcfile


def plan_io(workloads, targets, delay_targets, fio_nbd):
    """[(workload, target)] of one repetition."""
    plan = []
    for w in workloads:
        if w.delay:
            ts = [delay_targets[k] for k in ("nbdfs", "nbdfuse", "raw") if k in delay_targets]
        else:
            ts = [t for t in targets if w.loop or not t.name.endswith("-loop")]
            if w.kind == "dd":
                ts = [t for t in ts if not t.name.endswith("-loop")]
            else:
                ts = [t for t in ts if t.name != "nbdfs-wb"]
            if w.rw not in ("write", "randwrite") or w.id not in ALIAS_ROWS:
                ts = [t for t in ts if t.name != "nbdfs-alias"]
            ts = [t for t in ts if t.only_kind in (None, w.kind)]
        ts = [t for t in ts if not (t.kind == "raw" and w.kind == "fio" and not fio_nbd)]
        plan += [(w, t) for t in ts]
    return plan


def rotated(plan, rep):
    """The plan with each workload's targets rotated by @rep.  The first
    buffered run of a workload pays for page-cache pages that have not been
    touched for a while (here: 0.87 to 0.93 GB/s and 2.5x the daemon's CPU
    in kernel memcpy, then 1.6 GB/s for the same read right after; most
    likely guest memory the VM's host took back), so the first target of a
    fixed order always lost.  Rotated, the first turn moves from target to
    target, and a median of three drops it."""
    out, group = [], []
    for w, t in plan + [(None, None)]:
        if group and (w is None or w.id != group[0][0].id):
            k = rep % len(group)
            out += group[k:] + group[:k]
            group = []
        if w is not None:
            group.append((w, t))
    return out


MEDIAN_KEYS = ("mbs", "iops", "p50_us", "p99_us", "daemon_cpu_gib", "nbdkit_cpu_gib",
               "daemon_us_per_io", "nbdkit_us_per_io", "rss_mib", "vcs_per_io", "ivcs_per_io",
               "threads", "new_threads", "minflt_per_io")


def run_io(args, res, workdir, tools, workloads, notes_extra, failures, errors, raw_runs):
    """The fio and dd workloads; fills errors and raw_runs; returns the medians."""
    targets, delay_targets, srcfile = setup_io(args, res, workdir, tools, workloads,
                                               notes_extra, failures)
    bench = Bench(args, res, workdir, srcfile)
    plan = plan_io(workloads, targets, delay_targets, tools["fio_nbd"])
    log(f"{len(plan)} runs x {args.reps} rep(s) x ~{args.runtime}s")
    # Reps are interleaved (rep 1 of everything, then rep 2...), so a
    # noisy neighbour hurts every target alike rather than one of them.
    for rep in range(args.reps):
        for w, t in rotated(plan, rep):
            key = (w.id, t.name)
            try:
                r = bench.measure(w, t)
            except (RuntimeError, OSError, ValueError, KeyError) as e:
                log(f"rep {rep + 1} {w.id} via {t.name}: FAILED: {e}")
                errors[key] = str(e)
                continue
            raw_runs.setdefault(key, []).append(r)
            p = primary(w, r)
            log(f"rep {rep + 1} {w.id:24} {t.name:13} {fmt(p)} {w.metric}")
    for name in ("nbdfs-loop", "nbdfuse-loop"):
        if any(t.name == name for t in targets):
            notes_extra.append(f"{name}: losetup --direct-io=on over "
                               f"{'disk-part2' if name == 'nbdfs-loop' else 'the file'}, "
                               "attached for each run only; direct I/O "
                               f"{'OFF (losetup fell back)' if name in bench.no_dio else 'on'}")
    results = {}
    for key, runs in raw_runs.items():
        m = {k: median([r.get(k) for r in runs]) for k in MEDIAN_KEYS}
        rss = [r.get("rss_mib") for r in runs if r.get("rss_mib") is not None]
        m["rss_mib_max"] = max(rss) if rss else None
        m["n"] = len(runs)
        results[key] = m
    return results


def find_floors(args, workdir, tools, notes_extra):
    """The in-memory FUSE files: nbdfs-memfile if built, libfuse's compiled now."""
    if os.access(args.memfile, os.X_OK):
        tools["memfile"] = args.memfile
        notes_extra.append(f"{FLOOR}: {args.memfile} [--direct-io] {EXPORT_SIZE} MNT: one "
                           "file in memory served by nbdfs's FUSE request layer, no NBD "
                           "behind it; --direct-io for the fio rows (as nbdfs does for "
                           "O_DIRECT opens), without for the dd rows")
    else:
        log(f"no nbdfs-memfile at {args.memfile}: {FLOOR} rows skipped")
        notes_extra.append(f"{FLOOR}: rows skipped, no {args.memfile} (--memfile PATH)")
    if not args.libfuse_memfile:
        return
    try:
        tools["libfuse_memfile"] = build_libfuse_memfile(args.libfuse_memfile, workdir)
        notes_extra.append(f"{LIBFUSE_FLOOR}: {args.libfuse_memfile} (cc -O2, libfuse "
                           f"{run(['pkg-config', '--modversion', 'fuse3']).stdout.strip()}), "
                           "the same file through libfuse's multi-threaded loop; "
                           "-o direct_io for the fio rows")
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        log(f"{LIBFUSE_FLOOR}: does not build: {e}")
        notes_extra.append(f"{LIBFUSE_FLOOR}: rows skipped, {args.libfuse_memfile} does not "
                           f"build ({str(e)[:200]})")


def finite(v):
    """v with infinities (a daemon that did not stop in time) as null, for JSON."""
    if isinstance(v, float) and v == float("inf"):
        return None
    if isinstance(v, dict):
        return {k: finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [finite(x) for x in v]
    return v


def main(argv):
    args = parse_args(argv)
    for tool in ("fio", "nbdkit", "nbdcopy", "dd", "losetup", "fusermount3"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} not found", file=sys.stderr)
            return 2
    if os.geteuid() != 0:
        print("bench: needs root (loop devices, drop_caches)", file=sys.stderr)
        return 2
    nbdfs = os.path.join(args.build, "src", "nbdfs")
    missing_nbdfs = None
    if args.no_nbdfs or not os.access(nbdfs, os.X_OK):
        if not args.no_nbdfs:
            missing_nbdfs = f"no nbdfs at {nbdfs} (--build DIR; --no-nbdfs to skip it)"
            log(f"{missing_nbdfs}: nbdfs rows skipped, exit status will be 1")
        nbdfs = None
    enghelp = run(["fio", "--enghelp"], check=False).stdout
    fio_nbd = bool(re.search(r"^\s*nbd\s*$", enghelp, re.M))
    if not fio_nbd:
        log("this fio has no nbd ioengine: raw rows come from nbdcopy only")
    tools = {"nbdfs": nbdfs, "fio_nbd": fio_nbd,
             "nbdfuse": not args.no_nbdfuse and shutil.which("nbdfuse") is not None,
             "memfile": None, "libfuse_memfile": None}
    workloads = [w for w in WORKLOADS if not args.only or re.search(args.only, w.id)]
    scale_ids = [i for i in scale.SCALE_IDS if not args.only or re.search(args.only, i)]

    res = Resources()
    interrupted = []

    def on_signal(signum, frame):
        if not interrupted:
            interrupted.append(signum)
            raise Interrupted(signum)
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM,
                                                      signal.SIGHUP)}
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    workdir = tempfile.mkdtemp(prefix="nbdfs-bench.", dir=base)
    res.dirs.append(workdir)
    results, errors, notes_extra, failures = {}, {}, [], []
    scale_out = None
    if missing_nbdfs:
        failures.append(missing_nbdfs)
        notes_extra.append(f"nbdfs: {missing_nbdfs}")
    raw_runs = {}
    header = version_lines(nbdfs)
    rc = 0
    try:
        log(f"workdir {workdir}")
        if workloads:
            find_floors(args, workdir, tools, notes_extra)
        if scale_ids and nbdfs:
            scale_out = scale.run_scale(args, res, workdir, nbdfs, scale_ids)
            for case, msg in scale_out["errors"].items():
                failures.append(f"{case}: {msg}")
        elif scale_ids:
            notes_extra.append("scale: needs nbdfs; skipped")
        if workloads:
            results = run_io(args, res, workdir, tools, workloads, notes_extra, failures,
                             errors, raw_runs)
    except Interrupted as e:
        log(f"interrupted by signal {e.args[0]}: cleaning up")
        rc = 130
    except Exception as e:            # report, clean up, exit non-zero
        log(f"error: {type(e).__name__}: {e}")
        rc = 1
    finally:
        for s in old:
            signal.signal(s, signal.SIG_IGN)
        try:
            res.release()
        finally:
            left = leftovers(workdir)
        for s, h in old.items():
            signal.signal(s, h)
    if left:
        log(f"LEFT BEHIND: {left}")
        rc = rc or 1
    else:
        log("cleanup complete: no mount, loop device or process left")
    if rc == 130:
        return rc
    if errors or failures:
        rc = rc or 1
        log(f"exit 1: {len(errors)} run(s) failed" + (f"; {failures[0][:200]}" if failures else ""))
    text = report(results, errors, scale_out, header, notes_extra, args.runtime, args.reps)
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "notes": notes_extra,
                       "runs": {f"{k[0]} {k[1]}": v for k, v in raw_runs.items()},
                       "medians": {f"{k[0]} {k[1]}": v for k, v in results.items()},
                       "errors": {f"{k[0]} {k[1]}": v for k, v in errors.items()},
                       "scale": finite(scale_out)},
                      f, indent=1)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
