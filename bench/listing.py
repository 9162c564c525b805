"""`ls -ln` of one long directory in a TCG guest, timed in the guest to the microsecond (or,
with `--stat`, an lstat of each of its files by name: a LOOKUP each).

`bench guest` times its ~0.15 s `ls -ln` phase once per boot, and this machine's noise
between boots is larger than the difference between 0.12 s and 0.16 s.  Here each backend's
guest boots once per round, and lists the same directory of N files
(each with an ownership record) several times, after dropping its caches each time, with
Python's perf_counter around each `ls -ln`.  The first listing of a boot is left out of the
figures: it is the daemon's first meeting with every record (later ones find the records it
kept of the nodes the guest forgot).  Rounds alternate the backends.

    python3 -m bench listing [--backends vfsd,vfsd:--no-readdirplus-readahead,virtiofsd]
                             [--files 2000] [--rounds 3] [--lists 7] [--stat]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics

from .common import (VIRTIOFSD, backend_daemon, fmt_table, make_workdir, note,
                     small_files)

GUEST = r"""
import os, subprocess, time
names = ["/mnt/d/f%d" % i for i in range(@FILES@)]
for i in range(@LISTS@):
    subprocess.run("sync; echo 3 > /proc/sys/vm/drop_caches", shell=True, check=True)
    t = time.perf_counter()
    if @STAT@:
        for name in names:
            os.lstat(name)
    else:
        subprocess.run("ls -ln /mnt/d > /dev/null", shell=True, check=True)
    print("LIST %.6f" % (time.perf_counter() - t))
"""


def one_boot(backend: str, workdir, files: int, lists: int, stat: bool = False) -> list[float]:
    from tests.vm.guest import run_guest
    base = backend.partition(":")[0]
    share = workdir / "share"
    if share.exists():
        shutil.rmtree(share)
    small_files(share / "d", files)
    script = GUEST.replace("@LISTS@", str(lists)).replace("@FILES@", str(files)).replace(
        "@STAT@", str(stat))
    ctx = backend_daemon(backend, workdir, share)
    with ctx as d:
        r = run_guest("python3 /t.py", socket_path=d.socket_path, python=True, timeout=600,
                      files={"t.py": script})
    times = [float(line.split()[1]) for line in r.output.splitlines()
             if line.startswith("LIST ")]
    if r.status != 0 or len(times) != lists:
        raise RuntimeError(f"{backend}: the guest failed:\n{r.explain()}")
    if base == "vfsd":  # what the readahead did (vfsd logs it when the session ends)
        for line in ctx.d.log_text().splitlines():
            if "READDIRPLUS readahead this session" in line:
                note(f"listing: {backend}: {line.split(': ', 1)[1]}")
    polling = ctx.polling()
    if polling:
        note(f"listing: {backend}: ring polling: {polling}")
    return times[1:]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench listing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="vfsd,vfsd:--no-readdirplus-readahead,virtiofsd",
                   help="comma-separated: vfsd, vfsd:OPTIONS, virtiofsd, virtiofsd:OPTIONS")
    p.add_argument("--files", type=int, default=2000, help="files in the directory (2000)")
    p.add_argument("--rounds", type=int, default=3, help="boots per backend (3)")
    p.add_argument("--lists", type=int, default=7,
                   help="listings per boot, the first left out (7)")
    p.add_argument("--stat", action="store_true",
                   help="instead of ls -ln, lstat each file by name (a LOOKUP each)")
    a = p.parse_args(argv)
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    for b in backends:
        if b.partition(":")[0] not in ("vfsd", "virtiofsd"):
            p.error(f"unknown backend {b!r}")
    if any(b.startswith("virtiofsd") for b in backends) and (
            os.geteuid() != 0 or not os.access(VIRTIOFSD, os.X_OK)):
        note("listing: the C virtiofsd needs root and " + VIRTIOFSD + "; skipped")
        backends = [b for b in backends if not b.startswith("virtiofsd")]
    if a.lists < 2:
        p.error("--lists must be at least 2 (the first is left out)")
    workdir = make_workdir()
    times: dict[str, list[float]] = {b: [] for b in backends}
    try:
        for rnd in range(a.rounds):
            for b in backends if rnd % 2 == 0 else reversed(backends):
                t = one_boot(b, workdir, a.files, a.lists, a.stat)
                times[b] += t
                note(f"listing: {b} (round {rnd + 1}/{a.rounds}): "
                     + " ".join(f"{x:.3f}" for x in t))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ref = next((b for b in backends if b == "virtiofsd"), None)
    rows = []
    for b in backends:
        med = statistics.median(times[b])
        row = [b, f"{med:.3f}", f"{min(times[b]):.3f}", f"{1e6 * med / a.files:.0f}"]
        if ref:
            row.append(f"{med / statistics.median(times[ref]):.2f}x")
        rows.append(row)
    what = "lstat of each" if a.stat else "ls -ln"
    print(f"{what} of {a.files} files in a TCG guest, caches dropped before each; "
          f"{a.rounds} boots x {a.lists - 1} listings per backend")
    print(fmt_table(["backend", "median s", "min s", "µs per entry"]
                    + ([f"median / {ref}"] if ref else []), rows))
    return 0
