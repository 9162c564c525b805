"""Instructions per request: vfsd's pieces counted by valgrind (callgrind), in process.

Time on these machines swings 10-30% between runs (docs/performance.md), which hides a change
of a few per cent in the daemon's per-request CPU.  The number of instructions the CPU runs
for a request does not swing: each case here runs a request (or a ring's pop and push) N and
5N times in a child interpreter under `valgrind --tool=callgrind`, and the difference of the
two totals divided by 4N is the cost of one, with nothing of the start-up in it.  User-space
instructions only (the kernel's part of a syscall is not counted: an fstat is ~4,600 here,
most of it building os.stat_result).  Fewer instructions is fewer cache lines too, which is
what a request costs on the CPU the emulated guest has just cooled.

    python3 -m bench instructions [--compare REV[,REV...]] [--cases NAME,...] [--n N]

`--compare` adds columns for vfsd's code at git revisions (e.g. HEAD for the last commit
against the working tree).  Needs valgrind (apt-get install valgrind); ~1-2 min per revision.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .common import REPO, fmt_table, make_workdir, small_files, source_at

# Each case: (name, label, setup, statement, per): `setup` runs once, `statement` N times,
# and the figure is instructions per statement divided by `per`.  The setup sees `ROOT`
# (a share of 2000 files with records, made once per run) and the helpers in _PRELUDE.
CASES = [
    ("ring", "ring: pop() + push() of a GETATTR's chain (indirect table of 4)", "ring()",
     "one_chain()", 1),
    ("request", "GETATTR, the whole path: ring, device, server, filesystem, notification",
     "request()", "one_request()", 1),
    ("getattr", "GETATTR (FuseServer.handle_views + PassthroughFs)", "server()",
     "hv(getattr_req, w, 56, 8192)", 1),
    ("lookup-live", "LOOKUP of a live node", "server()", "hv(lookup_req, w, 43, 8192)", 1),
    ("lookup-new", "LOOKUP of a node not live + its FORGET", "server()", "lookup_new()", 1),
    ("setattr", "SETATTR: chown (a new record each time)", "server()", "chown()", 1),
    ("open-release", "OPEN + RELEASE of a file", "server()", "open_release()", 1),
    ("readdirplus", "READDIRPLUS, per entry (2000 entries not live, then forgotten)",
     "server()", "readdirplus_pass()", 2000),
]

_PRELUDE = r'''
import collections, itertools, os, struct
from protocol import fuse

HDR = struct.Struct("<IIQQIIIHH")   # fuse_in_header, flat
F = collections.namedtuple("F", "nodeid nlookup")


def _queue():
    """A queue of 256 in 1 MiB of guest memory whose head 0 is a GETATTR's chain: an
    indirect table of 4 (header | arguments | reply header | reply, as Linux lays it
    out).  Returns the queue, the memory, the request's offset in it and `offer()`,
    which has the driver offer head 0 again."""
    from protocol.memory import GuestMemory
    from protocol.virtqueue import (VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
                                    VIRTQ_DESC_F_WRITE, Virtqueue)
    size, base = 256, 0x10000
    buf = bytearray(1 << 20)
    mem = GuestMemory.from_buffers([(base, buf)])
    desc, avail, used = base, base + 16 * size, base + 16 * size + 4096
    data, table = base + 0x10000, base + 0x12000
    d = struct.Struct("<QIHH")
    d.pack_into(buf, 0, table, 64, VIRTQ_DESC_F_INDIRECT, 0)
    t = table - base
    d.pack_into(buf, t, data, 40, VIRTQ_DESC_F_NEXT, 1)
    d.pack_into(buf, t + 16, data + 64, 16, VIRTQ_DESC_F_NEXT, 2)
    d.pack_into(buf, t + 32, data + 128, 16, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 3)
    d.pack_into(buf, t + 48, data + 256, 104, VIRTQ_DESC_F_WRITE, 0)
    vq = Virtqueue(mem, size, desc, avail, used, 0)
    idx = avail - base + 2
    n = [0]

    def offer():
        n[0] = (n[0] + 1) & 0xFFFF
        struct.pack_into("<H", buf, idx, n[0])

    return vq, buf, data - base, offer


def ring():
    global one_chain
    vq, _, _, offer = _queue()

    def one_chain():
        offer()
        vq.push(vq.pop().head, 16)


def request():
    """A GETATTR through the ring worker's drain of one kick: pop, the device's
    handle_chain, the server, the filesystem, push, the call eventfd's signal."""
    import types
    from bench.components import InProcess
    from protocol.vhost_user import Vring
    from vfsd.transport import VirtioFsDevice
    global one_request
    vq, buf, at, offer = _queue()
    ip = InProcess(ROOT)
    d = struct.unpack_from("<Q", ip.call(fuse.Opcode.LOOKUP, 1, b"small\0"), 16)[0]
    node = struct.unpack_from("<Q", ip.call(fuse.Opcode.LOOKUP, d, b"f1\0"), 16)[0]
    HDR.pack_into(buf, at, 56, fuse.Opcode.GETATTR, 9, node, 0, 0, 1, 0, 0)
    v = Vring(types.SimpleNamespace(device=VirtioFsDevice(ip.srv)), 1)
    v._vq, v.enabled, v.call_fd = vq, True, os.eventfd(0, os.EFD_NONBLOCK)

    def one_request():
        offer()
        v._drain()
        if buf[at + 128 + 4:at + 128 + 8] != bytes(4):   # fuse_out_header.error
            raise RuntimeError("the GETATTR failed")


def server():
    from bench.components import InProcess
    from vfsd.fsapi import Ctx
    global hv, w, getattr_req, lookup_req, lookup_new, chown, open_release, readdirplus_pass
    ip = InProcess(ROOT)
    fs, srv, hv = ip.fs, ip.srv, ip.srv.handle_views
    out = bytearray(8192)
    w = [memoryview(out)[:16], memoryview(out)[16:]]
    d = struct.unpack_from("<Q", ip.call(fuse.Opcode.LOOKUP, 1, b"small\0"), 16)[0]
    node = struct.unpack_from("<Q", ip.call(fuse.Opcode.LOOKUP, d, b"f1\0"), 16)[0]
    getattr_req = [memoryview(HDR.pack(56, fuse.Opcode.GETATTR, 9, node, 0, 0, 1, 0, 0)),
                   memoryview(bytes(16))]
    lookup_req = [memoryview(HDR.pack(43, fuse.Opcode.LOOKUP, 9, d, 0, 0, 1, 0, 0)),
                  memoryview(b"f1\0")]
    names = itertools.cycle([b"f%d\0" % i for i in range(2, 2000)])
    forget = fuse.fuse_forget_in.pack(nlookup=1)

    def lookup_new():
        name = next(names)
        hv([memoryview(HDR.pack(40 + len(name), fuse.Opcode.LOOKUP, 9, d, 0, 0, 1, 0, 0)),
            memoryview(name)], w, 40 + len(name), 8192)
        child = struct.unpack_from("<Q", out, 16)[0]
        hv([memoryview(HDR.pack(48, fuse.Opcode.FORGET, 9, child, 0, 0, 1, 0, 0) + forget)],
           [], 48, 0)

    sa = fuse.fuse_setattr_in
    owners = itertools.cycle([memoryview(sa.pack(valid=(1 << 1) | (1 << 2), uid=u, gid=u))
                              for u in (1234, 5678)])
    sa_hdr = memoryview(HDR.pack(40 + sa.size, fuse.Opcode.SETATTR, 9, node, 0, 0, 1, 0, 0))

    def chown():
        hv([sa_hdr, next(owners)], w, 40 + sa.size, 8192)

    open_req = [memoryview(HDR.pack(48, fuse.Opcode.OPEN, 9, node, 0, 0, 1, 0, 0)),
                memoryview(fuse.fuse_open_in.pack(flags=os.O_RDONLY))]
    rel_hdr = memoryview(HDR.pack(64, fuse.Opcode.RELEASE, 9, node, 0, 0, 1, 0, 0))

    def open_release():
        hv(open_req, w, 48, 8192)
        fh = struct.unpack_from("<Q", out, 16)[0]
        hv([rel_hdr, memoryview(fuse.fuse_release_in.pack(fh=fh))], w, 64, 8192)

    rin = struct.Struct("<QQIIQII")   # fuse_read_in, flat
    entry, tail = struct.Struct("<Q"), struct.Struct("<QQII")
    rw = [memoryview(out)[:16], memoryview(out)[16:16 + 4096]]

    def readdirplus_pass():
        o = ip.call(fuse.Opcode.OPENDIR, d, fuse.fuse_open_in.pack(flags=os.O_RDONLY))
        fh = struct.unpack_from("<Q", o, 16)[0]
        off, nodes = 0, []
        while True:
            n = hv([memoryview(HDR.pack(80, fuse.Opcode.READDIRPLUS, 9, d, 0, 0, 1, 0, 0)),
                    memoryview(rin.pack(fh, off, 4096, 0, 0, 0, 0))], rw, 80, 4096 + 16)
            if n <= 16:
                break
            pos = 16
            while pos < n:
                nodes.append(entry.unpack_from(out, pos)[0])
                _, off, namelen, _ = tail.unpack_from(out, pos + 128)
                pos += (128 + 24 + namelen + 7) & ~7
        ip.call(fuse.Opcode.RELEASEDIR, d, fuse.fuse_release_in.pack(fh=fh))
        fs.batch_forget([F(c, 1) for c in nodes if c and c != node])
'''

_CHILD = r'''
import sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]   # the daemon's code first, then the bench's
ROOT = sys.argv[3]
exec(compile(sys.argv[4], "prelude", "exec"))
exec(compile(sys.argv[5], "setup", "exec"))
code = compile("for _ in range(%d):\n    %s\n" % (int(sys.argv[7]), sys.argv[6]), "case", "exec")
exec(code)
'''


def count(source: Path, root: Path, setup: str, stmt: str, n: int) -> int:
    """Instructions of the child run (callgrind's total)."""
    with_out = root.parent / "callgrind.out"
    r = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={with_out}",
                        sys.executable, "-c", _CHILD, str(source), str(REPO), str(root),
                        _PRELUDE, setup, stmt, str(n)], capture_output=True, text=True)
    m = re.search(r"Collected : (\d+)", r.stderr)
    if r.returncode != 0 or m is None:
        raise RuntimeError(f"callgrind run failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return int(m.group(1))


def per_request(source: Path, root: Path, setup: str, stmt: str, per: int, n: int) -> float:
    return (count(source, root, setup, stmt, 5 * n) - count(source, root, setup, stmt, n)) \
        / (4 * n * per)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench instructions", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", default="", metavar="REV[,REV...]",
                   help="also count vfsd's code at these git revisions")
    p.add_argument("--cases", default="", help="comma-separated, from "
                   + ",".join(c[0] for c in CASES) + " (default: all)")
    p.add_argument("--n", type=int, default=400,
                   help="requests per short run (the long run makes 5x as many; default 400; "
                        "READDIRPLUS passes: N/200)")
    a = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("bench instructions: valgrind is missing (apt-get install valgrind)")
        return 2
    wanted = [c.strip() for c in a.cases.split(",") if c.strip()]
    unknown = set(wanted) - {c[0] for c in CASES}
    if unknown:
        p.error(f"unknown cases {sorted(unknown)}")
    cases = [c for c in CASES if not wanted or c[0] in wanted]
    revs = [r.strip() for r in a.compare.split(",") if r.strip()]
    workdir = make_workdir()
    try:
        root = workdir / "share"
        small_files(root / "small", 2000)
        sources = {"worktree": REPO}
        for i, rev in enumerate(revs):
            sources[rev] = source_at(rev, workdir / f"src-{i}")
        rows = []
        for name, label, setup, stmt, per in cases:
            n = max(1, a.n // 200) if per > 1 else a.n
            row: list = [label]
            for src in sources.values():
                row.append(round(per_request(src, root, setup, stmt, per, n)))
            rows.append(row)
            print(f"instructions: {name} done", file=sys.stderr, flush=True)
        hdr = ["case (instructions per request, user space)", *sources]
        print(fmt_table(hdr, rows))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
