"""Guest benchmark: the same workload in one TCG guest per backend, timed inside the guest.

Backends
  vfsd       this daemon, unprivileged (user vfsd-test when run as root), records on,
             its defaults (--cache auto, --thread-pool-size 0, --poll-max-us 300 (add
             vfsd:--poll-max-us=0 for a vfsd that does not poll), log level info; no guest
             xattrs and no POSIX ACLs, as virtiofsd: add them with vfsd:--posix-acl)
  virtiofsd  the C virtiofsd QEMU 7.2 ships (/usr/lib/qemu/virtiofsd), as root,
             -o source=DIR -o cache=auto (its defaults otherwise: thread pool 0, no xattr)
  9p         QEMU's 9p, -virtfs local,security_model=mapped-xattr (ownership in user.virtfs.*
             xattrs, vfsd's closest relative); guest mount -t 9p -o trans=virtio,version=9p2000.L
             with the kernel's defaults (cache=none, msize 128 KiB)
  tmpfs      the guest's own tmpfs: the floor (what the emulated guest costs by itself)

Every backend boots the same kernel: Debian's generic linux-image-amd64 (the cloud kernel the
tests use has no 9p modules), so kernel differences do not enter the comparison.  Same guest
(1 vCPU, 1 GiB), same initramfs, the workload's tarball in the guest's RAM (/bench/src.tar).

Phases (seconds by the guest's CLOCK_MONOTONIC, read from /proc/timer_list: to the
nanosecond, shown to the millisecond; where a guest kernel has no timer_list, /proc/uptime's
10 ms steps; caches dropped with `echo 3 > /proc/sys/vm/drop_caches` before the phases marked
*; host page cache left warm):
  create     N small files: `echo x > small/fI`
  stat*      N `[ -f small/fI ]` (a LOOKUP each: shell builtin, no fork)
  ls*        `ls -ln small` (READDIRPLUS or READDIR+GETATTR)
  rm         `rm -r small`
  untar      `tar xf src.tar` (~2000 files, ~20 MB, nested dirs, owner 1000:1000)
  readback*  `find src -type f | xargs cat | wc -c` (checked against the archive)
  chown+chmod `chown -R 1234:5678 src; chmod -R o-rwx src`
  rm tree    `rm -r src`
  write      `dd if=/dev/zero of=big bs=1M count=128` (no fsync: the path to the host's
             page cache, not the host disk)
  read*      `dd if=big of=/dev/null bs=1M`

The last rows are each daemon's CPU over the whole run (every process of its session, from
/proc/PID/stat), split into user time (its own code: the interpreter, for vfsd) and system time
(the kernel's work for its syscalls).  The very last is the CPU time the hypervisor took from
this machine during each run (/proc/stat's steal): a run that lost seconds to the host's other
tenants is slower for it, whichever backend it ran.

--interrupts counts the guest's interrupts per phase from its /proc/interrupts, read at each
mark outside the phase's clock: for virtio-fs, those of the hiprio queue (FORGETs) and of the
request queues, a figure that does not depend on how busy the host is.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

from tests.vm.guest import GuestFile, Kernel, find_kernel, run_guest

from .common import (VIRTIOFSD, BenchDaemon, CVirtiofsd, add_host_fs_option, add_steal_options,
                     fmt_table, host_share, make_workdir, median_ratio, note, session_cpu_times,
                     source_at, steal_seconds, within_steal)
from .tarball import make_tarball

BACKENDS = ("vfsd", "virtiofsd", "9p", "tmpfs")
PHASES = [("create", "create N small files"), ("stat", "stat N files by name*"),
          ("ls", "ls -ln the N files*"), ("rm_small", "rm the N files"),
          ("untar", "untar the source tree"), ("readback", "read the tree back*"),
          ("chown", "chown -R + chmod -R"), ("rm_tree", "rm -r the tree"),
          ("write", "write big file"), ("read", "read big file*")]

SIZES = {  # small files, tarball files, tarball bytes, big file MiB
    "full": (2000, 2000, 20 << 20, 128),
    "quick": (500, 500, 5 << 20, 32),
}

# The shell functions every workload script starts with (busybox sh in the guest).
PRELUDE = r"""
# The phase clock: CLOCK_MONOTONIC in ns from /proc/timer_list's "now at N nsecs" (its third
# line; ~0.25 ms a reading in a TCG guest, the same for every backend), else /proc/uptime's
# 10 ms steps.  A shell builtin either way: a fork per mark would cost more than a phase.
if [ -r /proc/timer_list ]; then
  clock() { { read _; read _; read _ _ t _; } < /proc/timer_list; t=${t}ns; }
else
  clock() { read t _ < /proc/uptime; }
fi
mark() { clock; echo "@T $1 $t"; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
fail() { echo "@FAIL $*"; exit 1; }
"""

# The workload, phase by phase (in the working directory): the phase, whether the guest's
# caches are dropped first, what runs before its clock starts, what is timed, and the checks
# after its clock stops.  `bench guest` runs it once per boot, `bench paired` on two mounts
# of one boot, phase by phase.
STEPS = [
    ("create", False, "mkdir small || fail mkdir small",
     "i=0; while [ $i -lt @N@ ]; do echo x > small/f$i || fail create $i; i=$((i+1)); done",
     ""),
    ("stat", True, "",
     "i=0; while [ $i -lt @N@ ]; do [ -f small/f$i ] || fail stat $i; i=$((i+1)); done", ""),
    ("ls", True, "", "ls -ln small > /dev/null || fail ls", ""),
    ("rm_small", False, "", "rm -r small || fail rm small", ""),
    ("untar", False, "", "tar xf /bench/src.tar || fail untar", ""),
    ("readback", True, "", "n=$(find src -type f | xargs cat | wc -c)",
     '[ "$n" = "@BYTES@" ] || fail readback read $n bytes, expected @BYTES@\n'
     'set -- $(ls -ln @SAMPLE@); [ "$3:$4" = "@OWNER@" ] || fail untar owner $3:$4'),
    ("chown", False, "", "chown -R 1234:5678 src || fail chown\nchmod -R o-rwx src || fail chmod",
     'set -- $(ls -ln @SAMPLE@); [ "$3:$4" = 1234:5678 ] || fail chown result $1 $3:$4'),
    ("rm_tree", False, "", "rm -r src || fail rm tree", ""),
    ("write", False, "", "dd if=/dev/zero of=big bs=1M count=@BIG@ 2>/dev/null || fail write",
     ""),
    ("read", True, "", "dd if=big of=/dev/null bs=1M 2>/dev/null || fail read",
     'set -- $(ls -ln big); [ "$5" = "$((@BIG@ * 1048576))" ] || fail big size $5\nrm -f big'),
]
assert [s[0] for s in STEPS] == [p for p, _ in PHASES]


def step_lines(step: tuple, suffix: str = "", settle: str = "") -> list[str]:
    """One phase of the workload as script lines; its marks are named phase+suffix, and
    `settle` runs just before its clock starts (after any drop)."""
    name, drop, before, body, after = step
    return [x for x in (before, "drop" if drop else "", settle, f"mark {name}{suffix}", body,
                        f"mark {name}{suffix}.end", after) if x]


SCRIPT = (PRELUDE + "W=/mnt/vfsd-bench\n@MOUNT@\n"
          "grep -E ' /mnt ' /proc/mounts | sed 's/^/@MOUNTINFO /'\n"
          "rm -rf $W; mkdir $W || fail mkdir; cd $W || fail cd\n"
          + "\n".join(line for step in STEPS for line in step_lines(step))
          + '\ncd /\necho "@DONE"\n')

MOUNTS = {
    "vfsd": "",          # /init mounts the virtio-fs tag at /mnt
    "virtiofsd": "",
    "9p": "mount -t 9p -o trans=virtio,version=9p2000.L t9 /mnt || fail mount 9p",
    "tmpfs": "mount -t tmpfs -o size=600m tmpfs /mnt || fail mount tmpfs",
}


def bench_kernel() -> tuple[Kernel, str]:
    """The newest non-cloud /boot/vmlinuz-* whose modules have virtiofs and 9p."""
    candidates = []
    for image in Path("/boot").glob("vmlinuz-*"):
        version = image.name.removeprefix("vmlinuz-")
        if "cloud" in version:
            continue
        dep = Path("/lib/modules") / version / "modules.dep"
        if not dep.exists():
            continue
        text = dep.read_text()
        if "/virtiofs.ko" in text and "/9p.ko" in text and "/9pnet_virtio.ko" in text:
            candidates.append(Kernel(version, image, dep.parent))
    if candidates:
        candidates.sort(key=lambda k: [int(p) if p.isdigit() else p
                                       for p in re.split(r"[.\-+~]", k.version)])
        return candidates[-1], "generic kernel with 9p (same kernel for every backend)"
    k = find_kernel()
    return k, ("no kernel with 9p modules (apt-get install linux-image-amd64): "
               f"using {k.version}; the 9p backend is skipped")


#: A request's opcode in the debug log of each daemon: vfsd's `FuseServer` and the C
#: virtiofsd's `-d` ("unique: 5, opcode: LOOKUP (1), nodeid: 1, ...").
REQUEST_LINE = {"vfsd": r"vfsd\.server: ([A-Z_0-9]+) unique=",
                "virtiofsd": r"unique: \d+, opcode: ([A-Z_0-9]+) \("}
# vfsd's READDIRPLUS batches made ahead (vfsd/readahead.py), used or dropped and why;
# counted per phase as "ahead: used", "ahead: dropped: a change", ... (not requests)
AHEAD_LINE = r"vfsd\.readahead: READDIRPLUS fh=\d+ offset=\d+: batch made ahead (used|dropped: .*)"
AHEAD = "ahead: "


def count_requests(log: str, script: str, daemon: str = "vfsd") -> tuple[dict, dict]:
    """Requests by opcode in a daemon's debug log, in all and per phase.  In counting mode
    every `mark` and `drop` in the script does one `sync` (a SYNCFS request), so the log is
    cut at the SYNCFS lines and the cuts are matched to the script's marks in order."""
    from collections import Counter
    if daemon == "vfsd":
        ops = [op or AHEAD + ahead for op, ahead in
               re.findall(f"{REQUEST_LINE[daemon]}|{AHEAD_LINE}", log, re.M)]
    else:
        ops = re.findall(REQUEST_LINE[daemon], log, re.M)
    ops = [o for o in ops if o not in ("FORGET", "BATCH_FORGET")]   # (vfsd does not log them)
    total = Counter(o for o in ops if o != "SYNCFS")
    steps = re.findall(r"^(?:mark (\S+)|(drop))$", script, re.M)
    steps = [m or "drop" for m, _ in steps]
    segments: list[Counter] = [Counter()]
    for o in ops:
        if o == "SYNCFS":
            segments.append(Counter())
        else:
            segments[-1][o] += 1
    per_phase = {}
    for i, step in enumerate(steps):
        if step.endswith(".end") or step == "drop":
            continue
        try:
            j = steps.index(step + ".end", i)
        except ValueError:
            continue
        c = Counter()
        for seg in segments[i + 1:j + 1]:
            c.update(seg)
        per_phase[step] = dict(c.most_common())
    return dict(total.most_common()), per_phase


def profile_report(prof: Path, top: int) -> str:
    """bench.profile's tables for a daemon profiled through a whole guest run (requests =
    calls of FuseServer.handle_views, which every chain goes through; `handle` only
    serves the requests it hands over)."""
    import pstats
    from . import profile as P
    st = pstats.Stats(str(prof))
    key = P.find(st, "vfsd/server", "handle_views")
    n = st.stats[key][1] if key else 1
    r = P.analyse(prof, n, top)
    return "\n".join([
        f"vfsd under cProfile through the whole guest workload: {n:,} FUSE requests "
        f"(FORGETs included), ring worker busy {r['busy']:.1f} s "
        f"({1e6 * r['busy'] / n:.0f} µs per request, profiler overhead included)",
        "Most self time:", fmt_table(["function", "calls/req", "µs/req", "% of busy"], r["self"]),
        "Most cumulative time:",
        fmt_table(["function", "calls/req", "µs/req", "% of busy"], r["cum"]),
        "Self time by kind of work:", fmt_table(["kind", "µs/req", "% of busy"], r["cats"])])


MARK = 'mark() { clock; echo "@T $1 $t"; }'
# --interrupts: the guest's virtio interrupt counts at each mark ("@I NAME <a line of
# /proc/interrupts>"), read before a phase's clock starts and after it stops.
IRQ_MARK = ("irqs() { grep -E ' virtio[0-9]+-' /proc/interrupts | sed \"s/^/@I $1 /\"; }\n"
            'mark() { case $1 in *.end) @SYNC@clock; echo "@T $1 $t"; irqs $1;; '
            '*) irqs $1; @SYNC@clock; echo "@T $1 $t";; esac; }')


def mark_function(count_requests: bool, interrupts: bool) -> str:
    """The script's `mark`: with `count_requests` a SYNCFS before each (which cuts vfsd's
    debug log into phases), with `interrupts` the guest's interrupt counts beside it."""
    sync = "sync; " if count_requests else ""
    if interrupts:
        return IRQ_MARK.replace("@SYNC@", sync)
    return MARK.replace("{ clock;", "{ " + sync + "clock;")


def parse_interrupts(output: str) -> dict[str, dict[str, int]]:
    """Per phase, the guest's interrupts by virtqueue kind ("hiprio", "requests", summed
    over the CPUs and the request queues) between its two marks (--interrupts)."""
    at: dict[str, dict[str, int]] = {}
    for m in re.finditer(r"^@I (\S+)\s+\d+:((?:\s+\d+)+)\s.*?virtio\d+-([a-z]+)", output,
                         re.M):
        kinds = at.setdefault(m.group(1), {})
        kinds[m.group(3)] = kinds.get(m.group(3), 0) + sum(map(int, m.group(2).split()))
    out = {}
    for p, _ in PHASES:
        start, end = at.get(p), at.get(p + ".end")
        if start is not None and end is not None:
            out[p] = {k: end[k] - start.get(k, 0) for k in end if k != "config"}
    return out


def parse_marks(output: str, suffix: str = "") -> dict[str, float]:
    """Seconds per phase from the script's marks: "@T NAME 12345ns" (/proc/timer_list) or
    "@T NAME 12.34" (/proc/uptime, where the guest has no timer_list); NAME is the phase
    and `suffix` (see step_lines), then ".end" for the mark that stops its clock."""
    t = {}
    for m in re.finditer(r"^@T (\S+) ([0-9.]+)(ns)?$", output, re.M):
        t[m.group(1)] = int(m.group(2)) / 1e9 if m.group(3) else float(m.group(2))
    return {p: round(t[p + suffix + ".end"] - t[p + suffix], 4) for p, _ in PHASES
            if p + suffix in t and p + suffix + ".end" in t}


class SessionCpu:
    """Samples the CPU time (user and system) of every process in session `sid` (the daemon
    and any child, e.g. virtiofsd's sandboxed worker) every 0.2 s, keeping the last sums:
    a child that exits takes its times with it, so the samples are the record."""

    def __init__(self, sid: int):
        import threading
        self.sid, self._stop = sid, threading.Event()
        self.user = self.system = 0.0
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _sample(self) -> None:
        user, system = session_cpu_times(self.sid)
        self.user, self.system = max(self.user, user), max(self.system, system)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def stop(self) -> dict[str, float]:
        """{"daemon_cpu": user+system, "daemon_user": ..., "daemon_sys": ...}, rounded."""
        self._sample()
        self._stop.set()
        self._t.join()
        return {"daemon_cpu": round(self.user + self.system, 2),
                "daemon_user": round(self.user, 2), "daemon_sys": round(self.system, 2)}


def run_backend(backend: str, kernel: Kernel, script: str, files: dict, workdir: Path,
                timeout: float, vfsd_args: list[str] = (), count: bool = False,
                profile_top: int = 0, virtiofsd_args: list[str] = (),
                host_fs: str = "disk", pin: tuple[set[int], set[int]] | None = None,
                source_root: Path | None = None) -> dict:
    with host_share(workdir / f"share-{backend}", host_fs) as share:
        return _run_backend(backend, kernel, script, files, share, workdir, timeout,
                            vfsd_args, count, profile_top, virtiofsd_args, pin, source_root)


@contextlib.contextmanager
def _affinity(cpus: set[int] | None):
    """Run the block with this thread's CPU affinity set to `cpus` (None: unchanged):
    the processes it starts inherit it, with every thread they make."""
    if not cpus:
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


@contextlib.contextmanager
def _started(ctx, cpus: set[int] | None):
    """`with ctx:`, the process it starts (a daemon) started on `cpus`."""
    with _affinity(cpus):
        entered = ctx.__enter__()
    try:
        yield entered
    finally:
        ctx.__exit__(None, None, None)


def _guest_on(d, pin: tuple[set[int], set[int]] | None, script: str, common: dict,
              info: dict):
    """Boot the guest against started daemon `d` (QEMU on the pinned CPUs, if any); the
    daemon's CPU over the run goes into `info`."""
    mon = SessionCpu(d.pid)
    with _affinity(pin and pin[1]):
        r = run_guest(script, socket_path=d.socket_path, **common)
    info.update(mon.stop())
    return r


def pin_split(spec: str | None) -> tuple[set[int], set[int]] | None:
    """--pin: (the daemon's CPUs, QEMU's CPUs), apart; None without --pin."""
    if spec is None:
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if spec == "auto":
        if len(cpus) < 2:
            raise ValueError("--pin needs at least 2 CPUs")
        return {cpus[-1]}, set(cpus[:-1])
    daemon, _, qemu = spec.partition("/")
    try:
        split = ({int(c) for c in daemon.split(",")}, {int(c) for c in qemu.split(",")})
    except ValueError:
        raise ValueError(f"--pin {spec!r}: expected DAEMON_CPUS/QEMU_CPUS, e.g. 1/0") from None
    if not (split[0] | split[1]) <= set(cpus):
        raise ValueError(f"--pin {spec!r}: this process may only use CPUs {cpus}")
    return split


def _run_backend(backend: str, kernel: Kernel, script: str, files: dict, share: Path,
                 workdir: Path, timeout: float, vfsd_args, count: bool, profile_top: int,
                 virtiofsd_args, pin: tuple[set[int], set[int]] | None = None,
                 source_root: Path | None = None) -> dict:
    os.chmod(share, 0o755)
    common = dict(files=files, mem="1G", kernel=kernel, timeout=timeout)
    t0 = time.monotonic()
    steal0 = steal_seconds()
    info: dict = {"backend": backend}
    if backend == "vfsd":
        prof = workdir / "run" / "vfsd-guest.prof" if profile_top else None
        if prof is not None:
            prof.parent.mkdir(exist_ok=True)
            if prof.exists():
                prof.unlink()
        d = BenchDaemon(workdir, share,
                        [*vfsd_args, *(["--log-level", "debug"] if count else [])],
                        profile=prof, source_root=source_root)
        with _started(d, pin and pin[0]):
            r = _guest_on(d, pin, script, common, info)
            rc = d.wait_exit(20)
            info["daemon_exit"] = rc
            info["polling"] = d.polling()
            if count:
                info["requests"], info["phase_requests"] = count_requests(d.d.log_text(),
                                                                          script)
            if prof is not None and prof.exists():
                info["profile"] = profile_report(prof, profile_top)
            if r.status != 0:
                r.daemon_log = d.d.log_text()
    elif backend == "virtiofsd":
        d = CVirtiofsd(workdir, share, [*virtiofsd_args, *(["-d"] if count else [])])
        with _started(d, pin and pin[0]):
            r = _guest_on(d, pin, script, common, info)
            info["daemon_exit"] = d.wait_exit(20)
        if count:
            info["requests"], info["phase_requests"] = count_requests(
                d.log_path.read_text(errors="replace"), script, "virtiofsd")
        if r.status != 0:
            r.daemon_log = d.log_path.read_text(errors="replace")
    elif backend == "9p":
        r = run_guest(script, extra_qemu_args=[
            "-virtfs", f"local,path={share},mount_tag=t9,security_model=mapped-xattr"],
            **common)
    elif backend == "tmpfs":
        r = run_guest(script, **common)
    else:
        raise ValueError(backend)
    info["wall"] = round(time.monotonic() - t0, 1)
    info["steal"] = round(steal_seconds() - steal0, 2)
    info["status"] = r.status
    info["phases"] = parse_marks(r.output)
    if r.shutdown_hung:
        # The phases stand (the guest timed them); the wall time has the grace in it.
        info["shutdown_hung"] = r.shutdown_stage
        info["shutdown_explain"] = r.explain(40)   # console and QEMU's stderr, for later
        note(f"guest: {backend}: the guest's shutdown hung {r.shutdown_stage}; QEMU was "
             f"killed {r.duration:.0f} s after it started")
    if "\n@I " in r.output:
        info["interrupts"] = parse_interrupts(r.output)
    m = re.search(r"^@MOUNTINFO (.*)$", r.output, re.M)
    info["mount"] = m.group(1) if m else None
    if r.status != 0 or "@DONE" not in r.output:
        info["error"] = r.explain()
        note(f"guest: {backend} FAILED\n{r.explain()[-6000:]}")
    return info


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench guest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma-separated, from " + ",".join(BACKENDS) + "; 'vfsd:OPTIONS' is "
                        "vfsd with extra options (e.g. 'vfsd:--xattr --posix-acl'), "
                        "'virtiofsd:OPTIONS' the same for the C virtiofsd (e.g. "
                        "'virtiofsd:-o xattr -o posix_acl'), to compare settings; "
                        "'vfsd@REV' (or 'vfsd@REV:OPTIONS') is vfsd's code at git revision "
                        "REV, to compare code (e.g. --backends vfsd@HEAD,vfsd,virtiofsd: "
                        "the last commit against the working tree)")
    p.add_argument("--reference", default=None,
                   help="the backend the ratio columns divide by (default: the first "
                        "virtiofsd backend)")
    p.add_argument("--quick", action="store_true",
                   help="500 small files, 500-file 5 MB tree, 32 MiB file (under 3 minutes)")
    p.add_argument("--repeat", type=int, default=1,
                   help="boot each backend this many times (interleaved, every other round "
                        "in reverse order); the table shows medians")
    p.add_argument("--vfsd-args", default="",
                   help="extra vfsd options, e.g. '--thread-pool-size 4' or '--cache always'")
    p.add_argument("--count-requests", action="store_true",
                   help="run vfsd with --log-level debug (the C virtiofsd with -d) and print "
                        "how many FUSE requests of each kind the workload sent to each, per "
                        "phase (the logging slows the daemons down)")
    p.add_argument("--interrupts", action="store_true",
                   help="also count the guest's virtio interrupts per phase (hiprio and "
                        "request queues; read at each mark, outside the phases' clocks)")
    p.add_argument("--profile", type=int, metavar="TOP", default=0,
                   help="run vfsd under cProfile (all threads) and print its TOP functions "
                        "for the whole workload (the profiler slows vfsd 2-3x)")
    add_host_fs_option(p)
    p.add_argument("--pin", nargs="?", const="auto", metavar="DAEMON/QEMU",
                   help="start vfsd and the C virtiofsd on their own CPUs and QEMU on the "
                        "others (e.g. '1/0'; alone: the last CPU for the daemon, the rest for "
                        "QEMU), so the daemon never waits for the emulated vCPU's host CPU "
                        "nor shares its caches; 9p and tmpfs have no daemon and run unpinned")
    add_steal_options(p, "run")
    p.add_argument("--json", metavar="FILE", help="also write every run's figures as JSON")
    a = p.parse_args(argv)
    try:
        pin = pin_split(a.pin)
    except ValueError as e:
        p.error(str(e))
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    for b in backends:
        base, _, rev = b.partition(":")[0].partition("@")
        if base not in BACKENDS or (":" in b and base not in ("vfsd", "virtiofsd")) or (
                rev and base != "vfsd"):
            p.error(f"unknown backend {b!r} (vfsd:OPTIONS runs vfsd with extra options, "
                    f"vfsd@REV vfsd's code at a git revision)")
    if a.host_fs != "disk" and os.geteuid() != 0:
        p.error(f"--host-fs {a.host_fs} mounts a filesystem per run: run as root")
    if os.geteuid() != 0 and any(b.startswith(("virtiofsd", "9p")) for b in backends):
        note("guest: virtiofsd and 9p need root; skipping them")
        backends = [b for b in backends if not b.startswith(("virtiofsd", "9p"))]
    if not os.access(VIRTIOFSD, os.X_OK) and any(b.startswith("virtiofsd") for b in backends):
        note(f"guest: {VIRTIOFSD} missing (apt-get install qemu-system-common); skipped")
        backends = [b for b in backends if not b.startswith("virtiofsd")]
    if a.reference is not None and a.reference not in backends:
        p.error(f"--reference {a.reference!r} is not one of the backends run")
    kernel, why = bench_kernel()
    if "9p" in backends and "amd64" in kernel.version and "cloud" in kernel.version:
        backends.remove("9p")
    nsmall, tfiles, tbytes, big = SIZES["quick" if a.quick else "full"]
    tar, facts = make_tarball(tfiles, tbytes)
    assert MARK in SCRIPT
    script = SCRIPT.replace(MARK, mark_function(a.count_requests, a.interrupts))
    for k, v in (("@N@", nsmall), ("@BYTES@", facts["regular_bytes"]), ("@BIG@", big),
                 ("@SAMPLE@", facts["sample"]), ("@OWNER@", "1000:1000")):
        script = script.replace(k, str(v))
    files = {"/bench/src.tar": GuestFile(tar.read_bytes())}
    timeout = 300 if a.quick else 600
    note(f"guest: kernel {kernel.version} ({why}); {nsmall} small files, tree of "
         f"{facts['files']} files + {facts['dirs']} dirs + {facts['symlinks']} symlinks "
         f"({facts['regular_bytes'] / 2**20:.1f} MiB), {big} MiB file")
    workdir = make_workdir()
    runs: dict[str, list[dict]] = {b: [] for b in backends}
    retried: dict[str, int] = {}   # runs thrown away for --max-steal, by backend
    try:
        sources = {}   # vfsd@REV: the vfsd and protocol packages at REV
        for b in backends:
            rev = b.partition(":")[0].partition("@")[2]
            if rev and rev not in sources:
                sources[rev] = source_at(rev, workdir / f"src-{len(sources)}")
        for rep in range(a.repeat):
            # Every other round in reverse order: what a run leaves on the host's
            # filesystem (thousands of just-deleted inodes) changes what the next
            # run's file creations cost there (2-3x on this ext4; docs/performance.md),
            # so no backend always comes first.
            for b in (backends if rep % 2 == 0 else backends[::-1]):
                note(f"guest: {b} (run {rep + 1}/{a.repeat})")
                name, _, extra = b.partition(":")
                base, _, rev = name.partition("@")
                vfsd_args = shlex.split(a.vfsd_args) + (shlex.split(extra)
                                                         if base == "vfsd" else [])
                def run():
                    info = run_backend(base, kernel, script.replace("@MOUNT@", MOUNTS[base]),
                                       files, workdir, timeout, vfsd_args,
                                       a.count_requests, a.profile,
                                       shlex.split(extra) if base == "virtiofsd" else [],
                                       a.host_fs, pin, sources.get(rev))
                    info["script_ok"] = "error" not in info
                    note(f"guest: {b}: {info['wall']} s wall, {info['steal']} s stolen by "
                         f"the host, phases {info['phases']}")
                    if info.get("polling"):
                        note(f"guest: {b}: ring polling: {info['polling']}")
                    return info

                info, thrown = within_steal(run, a.max_steal, a.retries, f"guest: {b}")
                if thrown:
                    retried[b] = retried.get(b, 0) + thrown
                runs[b].append(info)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    pinned = pin and (",".join(map(str, sorted(pin[0]))) + ", QEMU on CPU "
                      + ",".join(map(str, sorted(pin[1]))))
    print(report(runs, backends, dict(kernel=kernel.version, small=nsmall, **facts,
                                      big_mib=big, repeat=a.repeat, host_fs=a.host_fs,
                                      pin=pinned),
                 a.reference))
    if a.vfsd_args:
        print(f"(vfsd ran with {a.vfsd_args})")
    if a.max_steal is not None:
        print(f"(runs with more than {a.max_steal:g}% steal run again: "
              + (", ".join(f"{b} {n}x" for b, n in retried.items()) or "none was") + ")")
    shares = {b: [m.group(1) for r in runs[b]
                  if (m := re.search(r"\((\d+%)\) ended by polling", r.get("polling") or ""))]
              for b in backends}
    if any(shares.values()):
        print("(waits for the guest's next request that polling ended, run by run: "
              + "; ".join(f"{b} {', '.join(v)}" for b, v in shares.items() if v) + ")")
    if any(r.get("interrupts") for rs in runs.values() for r in rs):
        print("\n" + interrupts_report(runs, backends, nsmall))
    for b in backends:
        for r in runs[b][:1]:
            if r.get("profile"):
                print(f"\n{b}: " + r["profile"])
            if r.get("requests"):
                reqs = {k: v for k, v in r["requests"].items() if not k.startswith(AHEAD)}
                print(f"\nFUSE requests the workload sent to {b} ({sum(reqs.values()):,} in "
                      "all, FORGETs not logged): " + ", ".join(f"{k} {v:,}"
                                                              for k, v in reqs.items()))
                ahead = {k[len(AHEAD):]: v for k, v in r["requests"].items() if k not in reqs}
                rows = []
                for ph, label in PHASES:
                    c = r.get("phase_requests", {}).get(ph)
                    if c is not None:
                        n = {k: v for k, v in c.items() if not k.startswith(AHEAD)}
                        made = ", ".join(f"{k[len(AHEAD):]} {v:,}" for k, v in c.items()
                                         if k not in n)
                        rows.append([label.replace("N", str(nsmall)), sum(n.values()), ", ".join(
                            f"{k} {v:,}" for k, v in list(n.items())[:6])]
                                    + ([made] if ahead else []))
                if rows:
                    print(fmt_table(["phase", "requests", "most frequent"]
                                    + (["READDIRPLUS batches made ahead"] if ahead else []),
                                    rows, "lrl" + ("l" if ahead else "")))
    if a.json:
        Path(a.json).write_text(json.dumps(dict(kernel=kernel.version, facts=facts,
                                                small=nsmall, big_mib=big, host_fs=a.host_fs,
                                                pin=a.pin, runs=runs),
                                           indent=1))
    return 0 if all(i["script_ok"] for rs in runs.values() for i in rs) else 1


def interrupts_report(runs: dict, backends: list[str], nsmall: int) -> str:
    """--interrupts: the guest's interrupts per phase and backend, hiprio + request queues
    (medians of the runs)."""
    rows = []
    for ph, label in PHASES:
        row = [label.replace("N", str(nsmall))]
        for b in backends:
            got = [r["interrupts"][ph] for r in runs[b] if ph in r.get("interrupts", {})]
            if not got:
                row.append("-")
                continue
            kinds = sorted({k for g in got for k in g}, key=lambda k: (k != "hiprio", k))
            row.append(" + ".join(f"{k} {round(statistics.median(g.get(k, 0) for g in got)):,}"
                                  for k in kinds))
        rows.append(row)
    return ("Guest interrupts per phase (virtio queues; medians of the runs):\n"
            + fmt_table(["phase", *backends], rows, "l" * (1 + len(backends))))


def _seconds(x: float | None) -> str:
    """A phase's seconds to the millisecond the guest's clock gives, under 10 s."""
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


def report(runs: dict, backends: list[str], facts: dict, ref: str | None = None) -> str:
    med: dict[str, dict[str, float | None]] = {}
    for b in backends:
        ok = [r for r in runs[b] if r["script_ok"]]
        med[b] = {}
        for ph, _ in PHASES:
            vals = [r["phases"][ph] for r in ok if ph in r["phases"]]
            med[b][ph] = statistics.median(vals) if vals else None
        tot = [sum(r["phases"].values()) for r in ok]
        med[b]["total"] = statistics.median(tot) if tot else None
        for key in ("cpu", "user", "sys"):
            vals = [r[f"daemon_{key}"] for r in ok if f"daemon_{key}" in r]
            med[b][key] = statistics.median(vals) if vals else None
        vals = [r["steal"] for r in ok if "steal" in r]
        med[b]["steal"] = statistics.median(vals) if vals else None
    if ref is None:
        ref = next((b for b in backends if b.partition(":")[0] == "virtiofsd"), None)
    hdr = ["phase"] + [f"{b} s" for b in backends]
    if ref:
        hdr += [f"{b} / {ref}" for b in backends if b != ref]
    rows = []
    labels = dict(PHASES, total="total", cpu="daemon CPU over the whole run (s)",
                  user="  of which user (the daemon's code)", sys="  of which system (syscalls)",
                  steal="CPU the host took from this machine (steal, s)")
    for ph in [p for p, _ in PHASES] + ["total", "cpu", "user", "sys", "steal"]:
        label = labels[ph].replace("N", str(facts["small"]))
        if ph == "write" or ph == "read":
            label += f" ({facts['big_mib']} MiB)"
        timed = ph in dict(PHASES) or ph == "total"
        row = [label] + [_seconds(med[b][ph]) if timed else med[b][ph] for b in backends]
        if ref:
            for b in backends:
                if b == ref:
                    continue
                x, y = med[b][ph], med[ref][ph]
                # (two decimals: the targets are 1.0x and 1.2x, and 1.24x is not 1.2x)
                row.append(f"{x / y:.2f}x" if x is not None and y else "-")
        rows.append(row)
    title = (f"Guest benchmark (TCG, 1 vCPU, kernel {facts['kernel']}; seconds, lower is "
             f"better; median of {facts['repeat']}; * = guest caches dropped first; "
             f"share on {facts.get('host_fs', 'disk')}"
             + (f"; daemons on CPU {facts['pin']}" if facts.get("pin") else "") + ")")
    return title + "\n" + fmt_table(hdr, rows) + _round_ratios(runs, backends, ref, facts["small"])


def _round_ratios(runs: dict, backends: list[str], ref: str | None, nsmall: int) -> str:
    """Each round's phases against the reference's in the same round: the spread the
    medians hide.  A round's runs are made back to back, so they share the machine's mood
    more than runs of different rounds do; the ratio of two medians can pair a slow run of
    one backend with a fast run of the other (`bench paired` takes the same view)."""
    if not ref or len(runs[ref]) < 2:
        return ""

    def secs(phases: dict, ph: str) -> float | None:
        return sum(phases.values()) if ph == "total" else phases.get(ph)

    keys = [p for p, _ in PHASES] + ["total"]
    hdr, cols = ["phase"], []
    for b in backends:
        if b == ref:
            continue
        pairs = [(x["phases"], y["phases"]) for x, y in zip(runs[b], runs[ref])
                 if x["script_ok"] and y["script_ok"]]
        col = []
        for ph in keys:
            ratios = [secs(x, ph) / secs(y, ph) for x, y in pairs if secs(x, ph) and secs(y, ph)]
            col.append(f"{median_ratio(ratios):.2f}x ({', '.join(f'{r:.2f}' for r in ratios)})"
                       if ratios else "-")
        hdr.append(f"{b} / {ref}")
        cols.append(col)
    labels = [label.replace("N", str(nsmall)) for _, label in PHASES] + ["total"]
    rows = [[label, *(c[i] for c in cols)] for i, label in enumerate(labels)]
    return ("\n\nRound by round (each run against the reference's run of the same round; "
            "the median of the rounds' ratios, in log, then each round's):\n"
            + fmt_table(hdr, rows, "l" * len(hdr)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
