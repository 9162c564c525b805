"""Shared pieces of the benchmarks: work directories, starting the daemon, process figures.

The daemon is started with tests/daemon.py's `Daemon` (as the unprivileged user `vfsd-test`
when run as root, exactly as the test suite runs it), with the product's default log level
(`--log-level info`; the test helper asks for debug).  With `profile=PATH` it runs under
cProfile with every thread profiled (see `_PROFILE_MAIN`).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.daemon import Daemon

REPO = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: The C virtiofsd QEMU 7.2 ships (Debian: qemu-system-common), the reference daemon.
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"

# Runs vfsd.cli.main with a cProfile.Profile in every thread but the main one: `python -m
# cProfile` only sees the main thread, which in vfsd only reads vhost-user control messages -
# every FUSE request is served on a ring worker or pool thread.  One profiler per thread
# (threading.Thread.run is wrapped before anything starts a thread), merged into one pstats
# file when main() returns (the daemon exits by itself when the frontend disconnects, or on
# SIGTERM).  The main thread's start-up (imports, argument parsing) stays out of the figures.
_PROFILE_MAIN = r'''
import cProfile, os, sys, threading

OUT = os.environ["VFSD_BENCH_PROFILE"]
_profilers = []
_orig_run = threading.Thread.run


def _run(self):
    p = cProfile.Profile()
    _profilers.append((self.name, p))
    p.enable()
    try:
        _orig_run(self)
    finally:
        p.disable()


threading.Thread.run = _run


def _dump():
    import pstats

    class _Snap:
        def __init__(self, prof):
            prof.snapshot_stats()
            self.stats = prof.stats

        def create_stats(self):
            pass

    merged = None
    for _name, p in list(_profilers):
        s = pstats.Stats(_Snap(p))
        if merged is None:
            merged = s
        else:
            merged.add(s)
    if merged is not None:
        merged.dump_stats(OUT)


from vfsd.cli import main  # noqa: E402

try:
    rc = main()
finally:
    _dump()
sys.exit(rc)
'''


def make_workdir(prefix: str = "vfsd-bench-") -> Path:
    """A directory under /tmp the unprivileged daemon user can search."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(d, 0o755)
    return d


def source_at(rev: str, dest: Path) -> Path:
    """The vfsd and protocol packages as of git revision `rev`, extracted under `dest` (a
    source root for BenchDaemon), to compare the daemon's code at two revisions."""
    import subprocess
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "vfsd", "protocol"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def _profiling_source(tmp: Path, source_root: Path = REPO) -> Path:
    """A copy of the vfsd and protocol packages plus vfsd/_bench_profile.py (the profiling
    entry point) to hand to Daemon as its source root."""
    src = tmp / "src"
    if src.exists():
        shutil.rmtree(src)
    for pkg in ("vfsd", "protocol"):
        shutil.copytree(source_root / pkg, src / pkg,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (src / "vfsd" / "_bench_profile.py").write_text(_PROFILE_MAIN)
    return src


class BenchDaemon:
    """vfsd serving `share` on `workdir/run/vfsd.sock`, unprivileged."""

    def __init__(self, workdir: Path, share: Path, args: list[str] | tuple[str, ...] = (),
                 profile: Path | None = None, chown_shared: bool = True,
                 source_root: Path | None = None):
        """source_root: where the vfsd and protocol packages come from (default: this
        checkout; see source_at)."""
        self.workdir = workdir
        self.share = share
        self.profile = profile
        extra = ["--log-level", "info", *args]
        kw = {} if source_root is None else dict(source_root=source_root)
        if profile is not None:
            # written by the daemon's user: keep it in the socket's directory, which is its own
            assert profile.parent == workdir / "run", profile
            kw = dict(source_root=_profiling_source(workdir, source_root or REPO),
                      module="vfsd._bench_profile")
            os.environ["VFSD_BENCH_PROFILE"] = str(profile)
        log = workdir / "vfsd.log"     # one daemon's log at a time (Daemon appends)
        if log.exists():
            log.unlink()
        self.d = Daemon(share, workdir / "run" / "vfsd.sock", extra_args=extra,
                        chown_shared=chown_shared, log_path=log, **kw)

    def __enter__(self) -> "BenchDaemon":
        self.d.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self.d.proc.pid

    @property
    def socket_path(self) -> Path:
        return self.d.socket_path

    def wait_exit(self, timeout: float = 30.0) -> int | None:
        """Wait for the daemon to exit by itself (after the frontend disconnected)."""
        try:
            return self.d.proc.wait(timeout)
        except Exception:
            return None

    def stop(self) -> int | None:
        rc = self.d.stop()
        os.environ.pop("VFSD_BENCH_PROFILE", None)
        return rc

    def log_tail(self, n: int = 40) -> str:
        return self.d.log_tail(n)

    def polling(self) -> str | None:
        """How the ring worker's polling fitted the guest's pace: the figures vfsd logs
        when the queues stop (`protocol.vhost_user.PollFigures`), one line per time they
        stopped, or None (no polling, an older vfsd, or the queues still run)."""
        lines = re.findall(r"ring polling this session: (.*)$", self.d.log_text(), re.M)
        return " / ".join(lines) or None


def small_files(directory: Path, n: int) -> None:
    """`directory` (made) with files f0..f{n-1} of 2 bytes, each with an ownership record
    (1000:1000, 0644), as the guest's own files would have."""
    from vfsd import ownership
    directory.mkdir(parents=True)
    record = ownership.encode(ownership.Record(1000, 1000, 0o100644), name=b"user.o")
    for i in range(n):
        p = directory / f"f{i}"
        p.write_bytes(b"x\n")
        os.setxattr(p, "user.o", record)


def backend_daemon(backend: str, workdir: Path, share: Path, sources: dict | None = None):
    """The daemon (not started) for a backend spec: "virtiofsd[:OPTIONS]" is the C
    virtiofsd, "vfsd[@REV][:OPTIONS]" vfsd (its code at REV from `sources`, see source_at)."""
    import shlex
    name, _, extra = backend.partition(":")
    base, _, rev = name.partition("@")
    if base == "virtiofsd":
        return CVirtiofsd(workdir, share, shlex.split(extra))
    return BenchDaemon(workdir, share, shlex.split(extra),
                       source_root=(sources or {}).get(rev))


class CVirtiofsd:
    """The C virtiofsd serving `share` on `workdir/virtiofsd.sock` (as root, its defaults but
    `-o cache=auto`, as vfsd's): the reference the benchmarks compare with.  It serves from a
    sandboxed child process, so its CPU is the whole session's (`session_cpu_seconds`)."""

    def __init__(self, workdir: Path, share: Path, args: list[str] | tuple[str, ...] = ()):
        self.socket_path = workdir / "virtiofsd.sock"
        self.log_path = workdir / "virtiofsd.log"
        self.argv = [VIRTIOFSD, f"--socket-path={self.socket_path}", "-o", f"source={share}",
                     "-o", "cache=auto", *args]
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def available() -> str | None:
        """None if it can run here, else why not."""
        if not os.access(VIRTIOFSD, os.X_OK):
            return f"{VIRTIOFSD} missing (apt-get install qemu-system-common)"
        if os.geteuid() != 0:
            return "the C virtiofsd needs root"
        return None

    def __enter__(self) -> "CVirtiofsd":
        if self.socket_path.exists():
            self.socket_path.unlink()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while not self.socket_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("virtiofsd did not start: " + self.log_tail())
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return session_cpu_seconds(self.proc.pid)

    def wait_exit(self, timeout: float = 30.0) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        return None if self.proc is None else self.proc.returncode

    def polling(self) -> str | None:
        return None   # (the C daemon does not poll)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def session_cpu_times(sid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of every living process in session `sid` (a daemon and its
    children): user time is the daemon's own code (Python's, for vfsd), system time the
    syscalls it makes, so the two tell interpreter cost from kernel work."""
    user = system = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:
            user += int(fields[11])
            system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def session_cpu_seconds(sid: int) -> float:
    """utime + stime of every living process in session `sid`."""
    return sum(session_cpu_times(sid))


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads, living and dead), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def steal_seconds() -> float:
    """CPU time the hypervisor gave to others while this machine's CPUs wanted it (the
    steal column of /proc/stat, summed over CPUs): what a run lost to the host's other
    tenants, which no median removes when it hits one backend's run and not another's."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) / CLK_TCK if len(fields) > 8 else 0.0


HOST_FS = ("disk", "tmpfs", "ext4")


def add_host_fs_option(p) -> None:
    """--host-fs, for a benchmark whose daemons serve a share made per run or boot."""
    p.add_argument("--host-fs", choices=HOST_FS, default="disk",
                   help="what each shared directory lives on: 'disk', a directory under /tmp "
                        "(default: this host's ext4, which has no journal); 'tmpfs', a fresh "
                        "tmpfs (Linux 6.6 for user xattrs on it); 'ext4', a fresh ext4 with a "
                        "journal on a loop device, the host filesystem most hosts have. Both "
                        "fresh ones are made per run, need root, and spare a run the price "
                        "that the runs before it put on new inodes (docs/performance.md)")


@contextlib.contextmanager
def host_share(share: Path, host_fs: str):
    """`share` made (an empty directory, mode 0755) on the host filesystem `host_fs` names
    for the block, and removed after it."""
    share.mkdir(parents=True)
    image = share.with_name(share.name + ".ext4")
    mounted = False
    try:
        if host_fs == "tmpfs":
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g,mode=0755", "vfsd-bench",
                            str(share)], check=True)
            mounted = True
        elif host_fs == "ext4":
            # Without a journal, ext4's inode allocator passes over every inode deleted in
            # the last minutes (recently_deleted()), at up to ~1 ms per new file here after
            # a run's deletions; with one (the usual host) it does not.  The inode tables
            # are written now, not by a lazy-init thread during the run.
            with open(image, "wb") as f:
                f.truncate(2 << 30)
            subprocess.run(["mkfs.ext4", "-q", "-F", "-E",
                            "lazy_itable_init=0,lazy_journal_init=0", str(image)], check=True)
            subprocess.run(["mount", "-o", "loop", str(image), str(share)], check=True)
            mounted = True
            (share / "lost+found").rmdir()
        elif host_fs != "disk":
            raise ValueError(f"unknown host filesystem {host_fs!r}")
        os.chmod(share, 0o755)
        yield share
    finally:
        if mounted:
            subprocess.run(["umount", str(share)], check=False)
        shutil.rmtree(share, ignore_errors=True)
        image.unlink(missing_ok=True)


def add_steal_options(p, what: str) -> None:
    """--max-steal and --retries, for a benchmark that boots guests: `what` is what it repeats
    (a run, a boot)."""
    p.add_argument("--max-steal", type=float, metavar="PERCENT",
                   help=f"repeat a {what} (up to --retries times) when the host took more "
                        f"than PERCENT of this machine's CPU time during it (steal): such a "
                        f"{what} measures the neighbours (seen here: 28%% of a vfsd run, which "
                        f"took twice as long as the quiet ones); the last try is kept whatever "
                        f"its steal")
    p.add_argument("--retries", type=int, default=2,
                   help="tries after the first for --max-steal (2)")


def within_steal(run, max_steal: float | None, retries: int, label: str) -> tuple[dict, int]:
    """`run()`'s figures (a dict with "wall" and "steal" seconds), tried again while the
    steal is over `max_steal` percent, at most `retries` times; and how many tries were
    thrown away."""
    thrown = 0
    while True:
        info = run()
        # (steal is summed over the CPUs: a share of all of their time)
        stolen = 100 * info["steal"] / (max(info["wall"], 0.1) * (os.cpu_count() or 1))
        if max_steal is None or stolen <= max_steal or thrown >= retries:
            return info, thrown
        note(f"{label}: {stolen:.0f}% of the machine's CPU stolen, over --max-steal: "
             "run again")
        thrown += 1


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, ... (kB) and Threads from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k.startswith("Vm") or k in ("Threads", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0])
    return out


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def median_ratio(ratios: list[float]) -> float:
    """The median of ratios, taken in log space: for an even count, the geometric mean of the
    middle two.  The plain median averages them, which leans above 1 when the rounds swing
    both ways (0.5x and 2x give 1.25x) and makes a/b's median differ from 1/(b/a)'s; the
    creating phases swing that much on this host's share (docs/performance.md)."""
    return math.exp(statistics.median(math.log(r) for r in ratios))


def fmt_table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A Markdown table (right-aligned numbers), readable as plain text too."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(r):
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w)
                                 for c, w, a in zip(r, widths, align)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2))
                         for w, a in zip(widths, align)) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _fmt(c) -> str:
    if c is None:
        return "-"
    if isinstance(c, float):
        if c >= 100:
            return f"{c:,.0f}"
        if c >= 10:
            return f"{c:.1f}"
        return f"{c:.2f}"
    if isinstance(c, int):
        return f"{c:,}"
    return str(c)


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def busy_processes() -> list[str]:
    """Other QEMU guests and vfsd daemons running on this machine (they skew every figure)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if cmd and (cmd[0].endswith(b"qemu-system-x86_64") or b"vfsd" in cmd[:3]
                    or cmd[0].endswith(b"virtiofsd")):
            out.append(f"{pid} {os.path.basename(cmd[0]).decode(errors='replace')}")
    return out


def quiet_machine(wait: float = 0.0, threshold: float = 0.6) -> str:
    """Wait up to `wait` seconds for the machine to be idle (1-minute load average under
    `threshold`, no other QEMU or vfsd running); returns a line describing the load, which the
    benchmarks print with their figures."""
    deadline = time.monotonic() + wait
    while True:
        la, others = loadavg(), busy_processes()
        if (la < threshold and not others) or time.monotonic() >= deadline:
            break
        time.sleep(5)
    msg = f"load average {la:.2f} at start"
    if others:
        msg += (f"; WARNING: {len(others)} other QEMU/vfsd processes running "
                f"({', '.join(others[:4])}...)")
    elif la >= threshold:
        msg += " (WARNING: machine busy)"
    return msg
