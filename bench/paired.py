"""Two daemons in one guest, phase by phase: `bench guest`'s workload with the comparison
made seconds apart instead of minutes.

`bench guest` boots a guest per backend, so two backends' runs are a minute or more apart,
and on a shared machine the host's other tenants change in that time (steal, and caches and
memory bandwidth that no counter shows): the same daemon's total moves by 20-60% from run to
run.  Here one guest gets both daemons, each on a virtio-fs device of its own (the first
mounted at /mnt, the second at /mnt2), and runs each phase of the workload on one mount and
then on the other before going on to the next phase, so the two timings of a phase are taken
within seconds of each other, in the same guest.  Which daemon goes first alternates from
phase to phase and from round to round, and which device is attached first from round to
round.  The report's "second / first" column says how much the turn itself lengthened a
phase (the daemons' difference cancelled): on this host a new file costs more right after a
removal, and a 128 MiB write more on host memory not reused lately.

Before each timed phase the guest waits `--settle` seconds (after its cache drop, if the
phase has one): a drop evicts both mounts' inodes, and the FORGETs it sends to the daemon
that is not being timed must not run during the other's phase.  `bench guest` has no such
pause, so its stat and `ls -ln` phases include serving the FORGETs of their own drop.

    python3 -m bench paired [--backends vfsd,virtiofsd] [--rounds 4] [--quick] [--settle S]
                            [--max-steal PERCENT [--retries N]] [--host-fs disk|tmpfs|ext4]

Both daemons of a boot meet the same slow minutes of the host, but those minutes cost more
to the daemon that spends more CPU per request, in the phases in which the guest waits for
one request at a time.  `--max-steal` repeats a boot in which the host took more than
PERCENT of this machine's CPU, as `bench guest --max-steal` repeats a run.  `--host-fs`
puts both shares of each boot on a fresh tmpfs or a fresh ext4 with a journal, as for
`bench guest`; on this host's journal-less root filesystem the daemon that creates files
first after a removal pays for the deleted inodes (docs/performance.md).

Backends: vfsd, vfsd:OPTIONS, vfsd@REV[:OPTIONS], virtiofsd, virtiofsd:OPTIONS (two of them;
the second is the reference of the ratios).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path

from tests.vm.guest import GuestFile, run_guest

from .common import (VIRTIOFSD, add_host_fs_option, add_steal_options, backend_daemon, fmt_table,
                     host_share, make_workdir, median_ratio, note, source_at, steal_seconds,
                     within_steal)
from .guest import (PHASES, PRELUDE, SIZES, STEPS, SessionCpu, _seconds, bench_kernel,
                    parse_marks, step_lines)
from .tarball import make_tarball

SECOND_TAG = "bench2"
MOUNT_POINTS = ("/mnt", "/mnt2")


def turn(order: list, k: int) -> list:
    """Who runs phase number `k` in which turn: `order` in the even phases, reversed in the
    odd ones (the one rule both the script and the report's "second / first" follow)."""
    return order if k % 2 == 0 else order[::-1]


def paired_script(order: list[int], settle: float) -> str:
    """The workload on both mounts, phase by phase; the marks of mount i end in "#i".
    `order`: which mount goes first in the first phase (alternating after it)."""
    lines = [PRELUDE,
             f"mkdir -p {MOUNT_POINTS[1]}",
             f"mount -t virtiofs {SECOND_TAG} {MOUNT_POINTS[1]} || fail mount {SECOND_TAG}"]
    for i, mnt in enumerate(MOUNT_POINTS):
        lines.append(f"W{i}={mnt}/vfsd-bench; rm -rf $W{i}; mkdir $W{i} || fail mkdir $W{i}")
    settle_line = f"usleep {int(settle * 1e6)}" if settle > 0 else ""
    for k, step in enumerate(STEPS):
        for i in turn(order, k):
            lines.append(f"cd $W{i} || fail cd $W{i}")
            lines += step_lines(step, f"#{i}", settle_line)
    lines += ["cd /", 'echo "@DONE"']
    return "\n".join(lines) + "\n"


def one_boot(backends: list[str], rnd: int, kernel, files: dict, script_for, workdir: Path,
             sources: dict, timeout: float, host_fs: str = "disk") -> dict:
    """One guest with both daemons; returns each backend's phases and CPU."""
    # Which daemon's device is the first (mounted by /init at /mnt) alternates by round.
    attach = backends if rnd % 2 == 0 else backends[::-1]
    daemons = {}   # started, in attach order
    with contextlib.ExitStack() as stack:
        for i, b in enumerate(attach):
            wd = workdir / f"b{i}"
            if wd.exists():
                shutil.rmtree(wd)
            wd.mkdir()
            os.chmod(wd, 0o755)
            share = stack.enter_context(host_share(wd / "share", host_fs))
            daemons[b] = stack.enter_context(backend_daemon(b, wd, share, sources))
        mons = {b: SessionCpu(d.pid) for b, d in daemons.items()}
        second = str(daemons[attach[1]].socket_path).replace(",", ",,")
        # Which mount the first phase runs on: over four rounds each daemon goes first in
        # every phase twice, once attached first and once second.
        order = [0, 1] if rnd % 4 in (0, 3) else [1, 0]
        steal0 = steal_seconds()
        t0 = time.monotonic()
        r = run_guest(script_for(order), socket_path=daemons[attach[0]].socket_path,
                      files=files, mem="1G", kernel=kernel, timeout=timeout,
                      extra_qemu_args=["-chardev", f"socket,id=second,path={second}",
                                       "-device", f"vhost-user-fs-pci,chardev=second,"
                                                  f"tag={SECOND_TAG}"])
        wall, steal = time.monotonic() - t0, steal_seconds() - steal0
        cpu = {b: m.stop() for b, m in mons.items()}
    polling = {b: d.polling() for b, d in daemons.items()}   # (logged as the queues stopped)
    ok = r.status == 0 and "@DONE" in r.output
    if not ok:
        note(f"paired: round {rnd + 1} FAILED\n{r.explain()[-6000:]}")
    elif r.shutdown_hung:   # (the phases stand: the guest timed them)
        note(f"paired: round {rnd + 1}: the guest's shutdown hung {r.shutdown_stage}")
    phases = [parse_marks(r.output, f"#{i}") for i in range(2)]
    return {"ok": ok, "wall": round(wall, 1), "steal": round(steal, 2),
            "attach": attach, "order": [attach[i] for i in order],
            "shutdown_hung": r.shutdown_stage if r.shutdown_hung else None,
            "shutdown_explain": r.explain(40) if r.shutdown_hung else None,
            "runs": {b: dict(phases=phases[i], polling=polling[b], **cpu[b])
                     for i, b in enumerate(attach)}}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench paired", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="vfsd,virtiofsd",
                   help="two of: vfsd, vfsd:OPTIONS, vfsd@REV[:OPTIONS], virtiofsd, "
                        "virtiofsd:OPTIONS; the second is the reference (vfsd,virtiofsd)")
    p.add_argument("--rounds", type=int, default=4,
                   help="boots (4: each daemon first in each phase twice, and attached "
                        "first twice)")
    p.add_argument("--quick", action="store_true", help="bench guest's --quick workload")
    p.add_argument("--settle", type=float, default=0.5,
                   help="seconds the guest waits before each timed phase (0.5)")
    add_steal_options(p, "boot")
    add_host_fs_option(p)
    p.add_argument("--json", metavar="FILE", help="also write every round's figures as JSON")
    a = p.parse_args(argv)
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    if len(backends) != 2 or len(set(backends)) != 2:
        p.error("--backends needs two different backends")
    for b in backends:
        name = b.partition(":")[0]
        base, _, rev = name.partition("@")
        if base not in ("vfsd", "virtiofsd") or (rev and base != "vfsd"):
            p.error(f"unknown backend {b!r}")
        if base == "virtiofsd" and (os.geteuid() != 0 or not os.access(VIRTIOFSD, os.X_OK)):
            p.error(f"{b}: the C virtiofsd needs root and {VIRTIOFSD}")
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    if a.host_fs != "disk" and os.geteuid() != 0:
        p.error(f"--host-fs {a.host_fs} mounts a filesystem per boot: run as root")
    kernel, why = bench_kernel()
    nsmall, tfiles, tbytes, big = SIZES["quick" if a.quick else "full"]
    tar, facts = make_tarball(tfiles, tbytes)
    values = {"@N@": nsmall, "@BYTES@": facts["regular_bytes"], "@BIG@": big,
              "@SAMPLE@": facts["sample"], "@OWNER@": "1000:1000"}

    def script_for(order: list[int]) -> str:
        script = paired_script(order, a.settle)
        for k, v in values.items():
            script = script.replace(k, str(v))
        return script

    files = {"/bench/src.tar": GuestFile(tar.read_bytes())}
    note(f"paired: kernel {kernel.version} ({why}); {nsmall} small files, tree of "
         f"{facts['files']} files ({facts['regular_bytes'] / 2**20:.1f} MiB), {big} MiB file; "
         f"{' and '.join(backends)} in one guest, phase by phase; shares on {a.host_fs}")
    workdir = make_workdir()
    rounds = []
    retried = 0   # boots thrown away for --max-steal
    try:
        sources = {}
        for b in backends:
            rev = b.partition(":")[0].partition("@")[2]
            if rev and rev not in sources:
                sources[rev] = source_at(rev, workdir / f"src-{len(sources)}")
        for rnd in range(a.rounds):
            def boot():
                info = one_boot(backends, rnd, kernel, files, script_for, workdir, sources,
                                1200 if not a.quick else 600, a.host_fs)
                note(f"paired: round {rnd + 1}/{a.rounds}: {info['wall']} s wall, "
                     f"{info['steal']} s stolen by the host; first: {info['order'][0]}; " +
                     "; ".join(f"{b} {sum(info['runs'][b]['phases'].values()):.2f} s"
                               for b in backends))
                for b in backends:
                    if info["runs"][b]["polling"]:
                        note(f"paired: round {rnd + 1}: {b}: ring polling: "
                             f"{info['runs'][b]['polling']}")
                return info

            # A boot made again keeps its round's attach order and phase order.
            info, thrown = within_steal(boot, a.max_steal, a.retries,
                                        f"paired: round {rnd + 1}")
            retried += thrown
            rounds.append(info)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(report(rounds, backends, nsmall, big))
    if a.max_steal is not None:
        print(f"(boots with more than {a.max_steal:g}% steal made again: "
              f"{retried or 'none was'})")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(kernel=kernel.version, facts=facts,
                                                small=nsmall, big_mib=big, settle=a.settle,
                                                host_fs=a.host_fs,
                                                rounds=rounds), indent=1))
    return 0 if all(r["ok"] for r in rounds) else 1


def order_effect(rounds: list[dict], k: int, ph: str, a: str, ref: str) -> str:
    """How much slower phase `ph` ran on the mount that ran it second, as a factor: the
    geometric mean of a/ref in the boots where `a` went second over that where it went
    first, square-rooted, which cancels the daemons' own ratio (each boot's a/ref is that
    ratio times the turn's factor, or divided by it).  On this host the turn matters in
    some phases: a new file costs more right after a removal, and a 128 MiB write costs
    more on host memory not reused lately (docs/performance.md).  `k`: the phase's number
    in the script."""
    groups: dict[bool, list[float]] = {True: [], False: []}
    for r in rounds:
        x, y = r["runs"][a]["phases"].get(ph), r["runs"][ref]["phases"].get(ph)
        if x and y:
            groups[turn(r["order"], k)[0] == a].append(math.log(x / y))
    if not groups[True] or not groups[False]:
        return "-"
    half = (statistics.fmean(groups[False]) - statistics.fmean(groups[True])) / 2
    return f"{math.exp(half):.2f}x"


def report(rounds: list[dict], backends: list[str], nsmall: int, big: int) -> str:
    ok = [r for r in rounds if r["ok"]]
    a, ref = backends
    rows = []
    for k, (ph, label) in enumerate(PHASES + [("total", "total")]):
        label = label.replace("N", str(nsmall))
        if ph in ("write", "read"):
            label += f" ({big} MiB)"

        def secs(r, b):
            phases = r["runs"][b]["phases"]
            return sum(phases.values()) if ph == "total" else phases.get(ph)

        pairs = [(secs(r, a), secs(r, ref)) for r in ok]
        pairs = [(x, y) for x, y in pairs if x is not None and y]
        if not pairs:
            rows.append([label, "-", "-", "-", "-"])
            continue
        mx, my = statistics.median(x for x, _ in pairs), statistics.median(y for _, y in pairs)
        ratios = sorted(x / y for x, y in pairs)
        rows.append([label, _seconds(mx), _seconds(my), f"{median_ratio(ratios):.2f}x",
                     f"{ratios[0]:.2f}-{ratios[-1]:.2f}",
                     order_effect(ok, k, ph, a, ref) if ph != "total" else ""])
    for key, label in (("daemon_cpu", "daemon CPU over the boot (s)"),
                       ("daemon_user", "  of which user"), ("daemon_sys", "  of which system")):
        mx = statistics.median(r["runs"][a][key] for r in ok) if ok else None
        my = statistics.median(r["runs"][ref][key] for r in ok) if ok else None
        rows.append([label, mx, my, f"{mx / my:.2f}x" if mx is not None and my else "-", "", ""])
    steal = [r["steal"] for r in ok]
    title = (f"Paired guest benchmark: {a} and {ref} in one TCG guest, each phase on one "
             f"then the other; medians of {len(ok)} boots (steal per boot: "
             + (", ".join(f"{s:.1f}" for s in steal) or "-") + " s); * = caches dropped first")
    return title + "\n" + fmt_table(
        ["phase", f"{a} s", f"{ref} s", f"{a} / {ref} (median of the rounds' ratios, in log)",
         "rounds' ratios, min-max", "second / first"], rows) + (
        "\n(second / first: how many times as long a phase took on the mount that ran it "
        "second, the daemons' own difference taken out; 1.00x when the turn does not matter)")
