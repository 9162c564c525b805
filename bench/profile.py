"""Where the daemon's time goes: the micro benchmark's operations, each against its own daemon
running under cProfile in every thread (bench/common.py: `python -m cProfile` alone profiles
only the main thread, which serves no FUSE request), then per operation the functions with the
most self time and the most cumulative time, as a share of the ring worker's busy time
(`Vring._drain`: popping chains, serving them, pushing used elements, notifying) and per
request.

cProfile's own overhead inflates Python-heavy code (each Python call costs ~0.3-1 µs more),
so the absolute times are about 1.5-2x the unprofiled daemon CPU per request (see `micro`);
the ranking and the call counts are what to read.  `--py-spy` samples the unprofiled daemon
instead (needs `pip install py-spy` and ptrace rights).
"""

from __future__ import annotations

import argparse
import os
import pstats
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from . import micro
from .common import fmt_table, make_workdir, note

OPS = ["enosys", "lookup_new", "getattr", "create", "read4k", "read1m"]
BUSY = ("virtqueue", "_drain")   # the worker's busy time: everything a request costs
#: waiting, not working (blocked in poll for a kick, in a lock, in a queue)
IDLE = ("'poll' of", "recvmsg", "acquire", "sleep", "select.select", "accept",
        "threading:wait", "queue:get", "_run", "threading:run", "threading:_bootstrap")

CATEGORIES = [  # (label, predicate on (file, func) of the key) - first match wins
    ("host syscalls (os/posix builtins)",
     lambda f, fn: f == "~" and ("posix." in fn or "method getxattr" in fn)),
    ("ring: pop, chain walk, guest-memory views, push, notify",
     lambda f, fn: any(m in f for m in ("protocol/virtqueue", "protocol/memory",
                                         "protocol/vhost_user"))),
    ("Reader/Writer cursors (protocol.buffers)", lambda f, fn: "protocol/buffers" in f),
    ("struct packing/unpacking (protocol.wire, struct, namedtuple)",
     lambda f, fn: "protocol/wire" in f or "_struct" in fn or "<string>" in f
     or "__new__" in fn and f == "~" or "collections/__init__" in f),
    ("FUSE server (vfsd.server)", lambda f, fn: "vfsd/server" in f),
    ("filesystem logic (vfsd.passthrough, ownership, fsapi, dataclasses)",
     lambda f, fn: any(m in f for m in ("vfsd/passthrough", "vfsd/ownership", "vfsd/fsapi",
                                         "vfsd/syscalls", "dataclasses", "<string>"))),
    ("transport glue (vfsd.transport)", lambda f, fn: "vfsd/transport" in f),
    ("enum (Opcode(...), flag tests)", lambda f, fn: "enum.py" in f),
    ("logging", lambda f, fn: "logging" in f),
    ("other builtins (len, isinstance, bytes, ...)", lambda f, fn: f == "~"),
    ("other Python", lambda f, fn: True),
]


def short(key) -> str:
    filename, line, func = key
    if filename == "~":
        return func.replace("<built-in method ", "").replace("<method ", "").rstrip(">")
    parts = Path(filename).with_suffix("").parts
    mod = ".".join(parts[-2:]) if len(parts) >= 2 else parts[-1]
    return f"{mod}:{func}"


def find(stats: pstats.Stats, module_part: str, func: str):
    for key in stats.stats:
        if key[2] == func and module_part in key[0]:
            return key
    return None


def analyse(prof: Path, requests: int, top: int) -> dict:
    st = pstats.Stats(str(prof))
    drain = find(st, "vhost_user", "_drain")
    busy = st.stats[drain][3] if drain else None
    rows_self, rows_cum = [], []
    entries = []
    for key, (cc, nc, tt, ct, callers) in st.stats.items():
        name = short(key)
        if any(i in name for i in IDLE):
            continue
        if key[0].endswith("threading.py") or "concurrent" in key[0]:
            continue
        entries.append((key, name, nc, tt, ct))
    for key, name, nc, tt, ct in sorted(entries, key=lambda e: -e[3])[:top]:
        rows_self.append([name, nc / requests, 1e6 * tt / requests,
                          f"{100 * tt / busy:.1f}%" if busy else "-"])
    for key, name, nc, tt, ct in sorted(entries, key=lambda e: -e[4]):
        if key == drain or name.endswith(":_run"):
            continue
        rows_cum.append([name, nc / requests, 1e6 * ct / requests,
                         f"{100 * ct / busy:.1f}%" if busy else "-"])
        if len(rows_cum) >= top:
            break
    cats = defaultdict(float)
    for key, name, nc, tt, ct in entries:
        for label, pred in CATEGORIES:
            if pred(key[0], key[2]):
                cats[label] += tt
                break
    rows_cat = [[label, 1e6 * cats[label] / requests,
                 f"{100 * cats[label] / busy:.1f}%" if busy else "-"]
                for label, _ in CATEGORIES if cats.get(label)]
    return dict(busy=busy, requests=requests, self=rows_self, cum=rows_cum, cats=rows_cat,
                entries=entries)


def _below(st: pstats.Stats, root) -> set:
    """Functions called (transitively) from `root`, per the callers table."""
    children = defaultdict(set)
    for key, (_cc, _nc, _tt, _ct, callers) in st.stats.items():
        for caller in callers:
            children[caller].add(key)
    seen = {root}
    todo = [root]
    while todo:
        k = todo.pop()
        for c in children.get(k, ()):
            if c not in seen:
                seen.add(c)
                todo.append(c)
    return seen


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated: " + ",".join(OPS))
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--keep", metavar="DIR", help="copy the .prof files here")
    p.add_argument("--py-spy", action="store_true",
                   help="sample the unprofiled daemon with py-spy instead of cProfile")
    a = p.parse_args(argv)
    ops = a.ops.split(",")
    min_time = 0.5 if a.quick else 2.0
    nfiles, big = (2000, 32 << 20) if a.quick else (5000, 64 << 20)
    workdir = make_workdir()
    try:
        micro.make_share(workdir / "share", nfiles, big)
        (workdir / "run").mkdir()
        for op in ops:
            label = next(lab for k, lab, *_ in micro.FUSE_OPS if k == op)
            if a.py_spy:
                _py_spy(workdir, op, label, a.depth, min_time, nfiles, big, a.keep)
                continue
            prof = workdir / "run" / f"vfsd-{op}.prof"
            note(f"profile: {op}")
            res = micro.run_fuse(workdir, workdir / "share", depth=a.depth, min_time=min_time,
                                 nfiles=nfiles, big=big, ops=[op], profile=prof)
            for _ in range(100):
                if prof.exists():
                    break
                time.sleep(0.1)
            if not prof.exists():
                note(f"profile: {prof} was not written (see {workdir}/vfsd.log)")
                continue
            if a.keep:
                os.makedirs(a.keep, exist_ok=True)
                shutil.copy(prof, a.keep)
            fig = res[op]
            r = analyse(prof, fig.requests, a.top)
            print(f"\n### {label}: {fig.requests:,} requests at depth {a.depth} "
                  f"({fig.rate:,.0f} ops/s under the profiler); worker busy "
                  f"{1e6 * r['busy'] / fig.requests:.0f} µs per request\n")
            print("Most self time (the function's own code, callees excluded):")
            print(fmt_table(["function", "calls/req", "µs/req", "% of busy"], r["self"]))
            print("\nMost cumulative time (callees included):")
            print(fmt_table(["function", "calls/req", "µs/req", "% of busy"], r["cum"]))
            print("\nSelf time by kind of work:")
            print(fmt_table(["kind", "µs/req", "% of busy"], r["cats"]))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _py_spy(workdir, op, label, depth, min_time, nfiles, big, keep) -> None:
    """Run the op against an unprofiled daemon while py-spy samples it (collapsed stacks)."""
    from .common import BenchDaemon
    from . import client as C
    spy = shutil.which("py-spy")
    if not spy:
        raise SystemExit("py-spy not found (pip install py-spy)")
    out = workdir / f"{op}.folded"
    with BenchDaemon(workdir, workdir / "share") as d:
        sess = C.Session(d.socket_path)
        b = micro.Bench(sess, d.pid, depth, min_time, nfiles, big, share=workdir / "share")
        proc = subprocess.Popen([spy, "record", "--pid", str(d.pid), "--rate", "500",
                                 "--format", "raw", "--output", str(out), "--nonblocking",
                                 "--threads"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        time.sleep(1.0)
        meth = next(m for k, _l, m, _u in micro.FUSE_OPS if k == op)
        fig = getattr(b, meth)()
        proc.send_signal(2)
        proc.wait(30)
        sess.close()
        d.wait_exit(30)
    if keep:
        os.makedirs(keep, exist_ok=True)
        shutil.copy(out, keep)
    _report_folded(out, label, fig, 15)


def _report_folded(path: Path, label: str, fig, top: int) -> None:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks, over
    the samples that are inside Vring._drain (busy)."""
    self_count, incl = defaultdict(int), defaultdict(int)
    busy = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if not any("_drain" in f for f in frames):
            continue
        n = int(n)
        busy += n
        i = next(k for k, f in enumerate(frames) if "_drain" in f)
        below = frames[i + 1:]
        for f in set(below):
            incl[_frame(f)] += n
        if below:
            self_count[_frame(below[-1])] += n
    print(f"\n### {label} (py-spy, {busy} busy samples, {fig.rate:,.0f} ops/s while sampled)")
    rows = [[f, f"{100 * c / busy:.1f}%", f"{100 * incl[f] / busy:.1f}%"]
            for f, c in sorted(self_count.items(), key=lambda kv: -kv[1])[:top]]
    print(fmt_table(["function (innermost Python frame)", "self % of busy",
                     "incl. % of busy"], rows))


def _frame(f: str) -> str:
    # "func (path/module.py:line)" -> "module:func"
    name, _, where = f.partition(" (")
    mod = Path(where.split(":")[0]).stem if where else "?"
    return f"{mod}:{name}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
