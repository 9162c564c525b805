"""Daemon memory: RSS (VmRSS, VmHWM from /proc/PID/status) and open fds while N files are
looked up through the frontend and live, and after they were all forgotten (BATCH_FORGET on
the hiprio queue), twice over by default (`--passes N`: each later pass shows whether memory
is reused or leaks).

vfsd keeps one O_PATH fd per live node up to its fd budget (the limit less a quarter), and
past it closes the oldest and reopens them by name when used.  An unprivileged daemon can
raise its soft limit only up to the hard limit it inherits; this benchmark raises its own
hard limit (as root) so the daemon inherits room for N (one fd per node, none closed),
unless --inherit-limit, which keeps this machine's limit: then `--window N` past it shows
the budget at work (with all N live, a GETATTR of each, oldest first, shows what reopening
costs).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import time
from pathlib import Path

from protocol import fuse
from vfsd import ownership

from . import client as C
from .common import (BenchDaemon, cpu_seconds, fmt_table, make_workdir, note, open_fds,
                     proc_status)

RECORD = ownership.encode(ownership.Record(1000, 1000, 0o100644), name=b"user.o")
DIR_RECORD = ownership.encode(ownership.Record(1000, 1000, 0o40755), name=b"user.o")
PER_DIR = 1000


def make_share(share: Path, n: int) -> list[tuple[bytes, list[bytes]]]:
    share.mkdir()
    layout = []
    for d in range((n + PER_DIR - 1) // PER_DIR):
        dname = b"d%03d" % d
        dpath = os.path.join(os.fsencode(share), dname)
        os.mkdir(dpath)
        os.setxattr(dpath, "user.o", DIR_RECORD)
        names = []
        dfd = os.open(dpath, os.O_PATH | os.O_DIRECTORY)
        for i in range(min(PER_DIR, n - d * PER_DIR)):
            nm = b"f%05d" % i
            fd = os.open(nm, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644, dir_fd=dfd)
            os.setxattr(fd, "user.o", RECORD)
            os.close(fd)
            names.append(nm)
        os.close(dfd)
        layout.append((dname, names))
    return layout


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=100_000, help="files to look up (100000)")
    p.add_argument("--depth", type=int, default=64, help="LOOKUPs in flight (64)")
    p.add_argument("--passes", type=int, default=2,
                   help="passes over all the files, each looking them up and forgetting them "
                        "(2; more show whether RSS levels off)")
    p.add_argument("--window", type=int,
                   help="most files live at once (default: all, or what the fd limit allows "
                        "with one fd each; given, even past the limit: vfsd's fd budget)")
    p.add_argument("--inherit-limit", action="store_true",
                   help="do not raise the hard RLIMIT_NOFILE the daemon inherits")
    a = p.parse_args(argv)
    if a.passes < 1:
        p.error("--passes must be at least 1")
    n = a.files
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if not a.inherit_limit and hard < n + 1000:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, n + 10_000))
        except (OSError, ValueError) as e:
            note(f"memory: cannot raise the hard fd limit ({e}); the daemon inherits {hard}")
    workdir = make_workdir()
    try:
        note(f"memory: making {n} files in {workdir}")
        layout = make_share(workdir / "share", n)
        with BenchDaemon(workdir, workdir / "share") as d:
            pid = d.pid
            sess = C.Session(d.socket_path, mem_size=64 << 20)
            pipe = sess.pipe(1, a.depth, in_cap=256, out_cap=256)
            rows = []

            def sample(what, t=None):
                st = proc_status(pid)
                rows.append([what, st["VmRSS"] / 1024, st["VmHWM"] / 1024, open_fds(pid),
                             st["Threads"], t])
                return st

            base = sample("after INIT (nothing looked up)")
            limit, soft_limit = _daemon_nofile(pid)
            window = n if a.window is None else a.window
            if soft_limit is not None and a.window is None:
                window = min(window, soft_limit - 500)
            dirs = []
            for dname, _ in layout:
                err, pl = pipe.run([C.lookup(1, dname)], True)[0]
                if err:
                    raise OSError(err, f"LOOKUP {dname!r}")
                dirs.append(C.entry_nodeid(pl))
            todo = [(dn, nm) for dn, (_, names) in zip(dirs, layout) for nm in names]
            figures = {}

            def lookups(items):
                """LOOKUP each; returns (node ids, first failure or None)."""
                nodes, failed = [], None
                for i in range(0, len(items), a.depth):
                    res = pipe.run([C.lookup(dn, nm) for dn, nm in items[i:i + a.depth]], True)
                    for j, (err, pl) in enumerate(res):
                        if err:
                            failed = failed or (i + j, os.strerror(err))
                        else:
                            nodes.append(C.entry_nodeid(pl))
                    if failed:
                        break
                return nodes, failed

            def forget(nodes):
                items = [(x, 1) for x in nodes]
                for i in range(0, len(items), 500):
                    pipe.hiprio_post(fuse.Opcode.BATCH_FORGET, 0,
                                     C.batch_forget_args(items[i:i + 500]))
                # every FORGET completed is one served (vfsd pushes its used element
                # after the handler); their fds are closed by vfsd's closer thread soon after
                pipe.hiprio_drain()
                deadline, last = time.monotonic() + 5, open_fds(pid)
                while time.monotonic() < deadline:
                    time.sleep(0.02)
                    now = open_fds(pid)
                    if now >= last:
                        break
                    last = now

            for rnd in range(1, a.passes + 1):
                t0, c0 = time.perf_counter(), cpu_seconds(pid)
                looked = 0
                for w in range(0, len(todo), window):
                    nodes, failed = lookups(todo[w:w + window])
                    if failed:
                        raise OSError(f"LOOKUP failed at {w + failed[0]}: {failed[1]}")
                    looked += len(nodes)
                    if rnd == 1 and w == 0:
                        st = sample(f"{len(nodes):,} files live (peak)")
                        figures["per_node"] = (st["VmRSS"] - base["VmRSS"]) * 1024 / len(nodes)
                        figures["live"] = len(nodes)
                        if soft_limit is not None and len(nodes) >= soft_limit:
                            # past the fd limit: the oldest nodes' fds were closed, and a
                            # GETATTR of each, oldest first, reopens them (by name)
                            t1 = time.perf_counter()
                            for i in range(0, len(nodes), a.depth):
                                for err, _ in pipe.run([C.getattr_(x)
                                                        for x in nodes[i:i + a.depth]]):
                                    if err:
                                        raise OSError(err, "GETATTR of a live node")
                            sample("GETATTR of each live node, oldest first",
                                   time.perf_counter() - t1)
                    forget(nodes)
                dt, cpu = time.perf_counter() - t0, cpu_seconds(pid) - c0
                figures.setdefault("rate", looked / dt)
                figures.setdefault("cpu_us", 1e6 * cpu / looked)
                sample(f"pass {rnd}: all {looked:,} looked up and forgotten"
                       + (f" ({window:,} live at a time)" if window < len(todo) else ""), dt)
            if window < len(todo):
                # how far does one go without forgetting?  (the fd limit)
                nodes, failed = lookups(todo)
                sample(f"no FORGET: {len(nodes):,} live, then "
                       + (f"LOOKUP {failed[0] + 1:,} failed: {failed[1]}" if failed else "ok"))
                figures["failed"] = failed
                forget(nodes)
            forget(dirs)
            sample("end: everything forgotten")
            sess.close()
            d.wait_exit(30)
        print(f"Daemon memory ({n:,} files looked up then forgotten; daemon RLIMIT_NOFILE "
              f"{limit})")
        print(fmt_table(["state", "VmRSS MiB", "VmHWM (peak) MiB", "open fds", "threads",
                         "phase s"], rows))
        print(f"\nper live node: {figures['per_node']:,.0f} bytes of RSS "
              f"(measured with {figures['live']:,} live; "
              f"{figures['per_node'] * n / 2**20:,.0f} MiB for {n:,}); "
              f"LOOKUP {figures['rate']:,.0f}/s at depth {a.depth}, "
              f"{figures['cpu_us']:.0f} µs daemon CPU each (with FORGETs)")
        if figures.get("failed"):
            i, why = figures["failed"]
            print(f"Without FORGETs, LOOKUP number {i + 1:,} failed with {why}: one O_PATH fd "
                  f"per live node, and the hard fd limit is {limit.split()[-1]}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _daemon_nofile(pid: int) -> tuple[str, int | None]:
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    parts = line.split()
                    soft = int(parts[3]) if parts[3].isdigit() else None
                    return f"soft {parts[3]}, hard {parts[4]}", soft
    except OSError:
        pass
    return "?", None
