"""Per-request costs of vfsd's pieces, timed in this process (no profiler, no frontend, no
wake-ups): the ring (pop a chain, push it back), the FUSE server + passthrough filesystem for
one request (`FuseServer.handle` over in-memory buffers), and the small steps inside them,
each next to a cheaper way to do the same thing so that a suggestion comes with its gain.

Run under the daemon's interpreter (`python3 -m bench` re-executes itself with it).
"""

from __future__ import annotations

import bisect
import inspect
import os
import resource
import shutil
import struct
import time

from protocol import fuse
from protocol.buffers import Reader, Writer
from protocol.memory import GuestMemory
from protocol.virtqueue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, Virtqueue
from vfsd import ownership
from vfsd.fsapi import Attr, Ctx, Entry
from vfsd.passthrough import PassthroughFs
from vfsd.server import FuseServer, SessionOptions

from .common import fmt_table, make_workdir


def per_call(fn, min_time: float = 0.2, repeat: int = 3) -> float:
    """Mean µs per call of fn(): the best of `repeat` runs of about `min_time` seconds."""
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t0 >= min_time / 4:
            break
        n *= 2
    n *= 4
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return 1e6 * best


# -- ring ---------------------------------------------------------------------------------------

def ring_cost(size: int = 256) -> float:
    """µs for pop() + push() of one 2-descriptor chain (request buffer, reply buffer), the
    chains on the ring already (what one request costs the ring worker besides the server)."""
    buf = bytearray(1 << 20)
    mem = GuestMemory.from_buffers([(0x10000, buf)])
    desc, avail, used = 0x10000, 0x10000 + 16 * size, 0x10000 + 16 * size + 4096
    data = 0x10000 + 64 * 1024
    d = struct.Struct("<QIHH")
    d.pack_into(buf, 0, data, 64, VIRTQ_DESC_F_NEXT, 1)
    d.pack_into(buf, 16, data + 4096, 4096, VIRTQ_DESC_F_WRITE, 0)
    a = avail - 0x10000
    struct.pack_into("<HH", buf, a, 0, size)
    for i in range(size):
        struct.pack_into("<H", buf, a + 4 + 2 * i, 0)

    def run():
        vq = Virtqueue(mem, size, desc, avail, used, 0)
        for _ in range(size):
            c = vq.pop()
            vq.push(c.head, 16)
    return per_call(run) / size


# -- server + filesystem -------------------------------------------------------------------------

def daemon_fs_options() -> dict:
    """What the daemon passes PassthroughFs beyond the share on this machine, as far as the
    code measured knows it (`bench instructions --compare` runs older code too): the fd
    budget its RLIMIT_NOFILE gives (the soft limit raised to the hard one)."""
    if "fd_budget" not in inspect.signature(PassthroughFs).parameters:
        return {}
    from vfsd.daemon import fd_budget
    return {"fd_budget": fd_budget(resource.getrlimit(resource.RLIMIT_NOFILE)[1])}


class InProcess:
    """A FuseServer over a PassthroughFs on a scratch directory, fed from bytearrays."""

    def __init__(self, root: str):
        self.fs = PassthroughFs(root, **daemon_fs_options())
        self.srv = FuseServer(self.fs, SessionOptions())
        self.out = bytearray(8192)
        init = fuse.fuse_init_in.pack(major=7, minor=38, max_readahead=131072,
                                      flags=0xFFFFFFFF, flags2=0)
        self.call(fuse.Opcode.INIT, 0, init)

    def request(self, opcode: int, nodeid: int, args: bytes) -> bytes:
        return fuse.fuse_in_header.pack(len=40 + len(args), opcode=opcode, unique=2,
                                         nodeid=nodeid, uid=0, gid=0, pid=1) + args

    def call(self, opcode, nodeid, args=b""):
        req = self.request(opcode, nodeid, args)
        n = self.srv.handle(Reader([memoryview(req)]), Writer([memoryview(self.out)[:16],
                                                               memoryview(self.out)[16:]]))
        return bytes(self.out[:n])

    def timer(self, opcode, nodeid, args=b"", views=False):
        """One request, served through `handle` (Reader/Writer, the request in one
        buffer) or, with `views`, through `handle_views` laid out as Linux lays it
        out (header | arguments; reply header | reply arguments), as the transport
        hands chains over."""
        req = memoryview(self.request(opcode, nodeid, args))
        out = memoryview(self.out)
        o1, o2 = out[:16], out[16:]
        if views:
            readable = [req[:40], req[40:]] if len(req) > 40 else [req]
            writable, rlen, wlen = [o1, o2], len(req), len(out)
            handle_views = self.srv.handle_views

            def run():
                handle_views(readable, writable, rlen, wlen)
            return run
        handle = self.srv.handle

        def run():
            handle(Reader([req]), Writer([o1, o2]))
        return run


def main(argv: list[str]) -> int:
    wd = make_workdir()
    try:
        root = wd / "share"
        root.mkdir()
        rec = ownership.encode(ownership.Record(1000, 1000, 0o100644), name=b"user.o")
        for i in range(3):
            p = root / f"f{i}"
            p.write_bytes(os.urandom(4096))
            os.setxattr(p, "user.o", rec)
        ip = InProcess(str(root))
        reply = ip.call(fuse.Opcode.LOOKUP, 1, b"f0\0")
        node = struct.unpack_from("<Q", reply, 16)[0]
        ip.call(fuse.Opcode.LOOKUP, 1, b"f1\0")
        opened = ip.call(fuse.Opcode.OPEN, node, fuse.fuse_open_in.pack(flags=os.O_RDWR))
        fh = struct.unpack_from("<Q", opened, 16)[0]

        rows = []
        ring = ring_cost()
        rows.append(["ring: pop() + push() of one chain", ring, ""])
        handle = {}
        for label, op, nd, args in (
                ("ENOSYS (GETLK)", fuse.Opcode.GETLK, 1, bytes(fuse.fuse_lk_in.size)),
                ("GETATTR", fuse.Opcode.GETATTR, node, fuse.fuse_getattr_in.pack()),
                ("LOOKUP, live node", fuse.Opcode.LOOKUP, 1, b"f1\0"),
                ("READ 4 KiB", fuse.Opcode.READ, node,
                 fuse.fuse_read_in.pack(fh=fh, size=4096))):
            us = per_call(ip.timer(op, nd, args))
            handle[label] = us
            lean = per_call(ip.timer(op, nd, args, views=True))
            rows.append([f"FuseServer.handle: {label}", us,
                         f"handle_views, Linux's layout: {lean:.2f} µs"])

        # pieces, each with a cheaper equivalent
        st = os.stat(root / "f0")
        attr = Attr(st.st_ino, st.st_size, st.st_blocks, st.st_atime_ns, st.st_mtime_ns,
                    st.st_ctime_ns, 0o100644, 1, 1000, 1000, 0, 4096)
        entry = Entry(node, 0, attr)
        srv = ip.srv
        attr_out = struct.Struct("<QIIQQQQQQIIIIIIIIII")   # fuse_attr_out, flat
        small = struct.Struct("<QII")                      # fuse_open_out

        def fast_attr_out(a=attr):
            asec, ans = divmod(a.atime_ns, 1_000_000_000)
            msec, mns = divmod(a.mtime_ns, 1_000_000_000)
            csec, cns = divmod(a.ctime_ns, 1_000_000_000)
            return attr_out.pack(1, 0, 0, a.ino, a.size, a.blocks, asec, msec, csec, ans, mns,
                                 cns, a.mode, a.nlink, a.uid, a.gid, 0, a.blksize, 0)
        assert fast_attr_out() == srv._attr_out(attr), "fast_attr_out differs"
        dplus = fuse.fuse_direntplus._struct

        def kw_direntplus():
            fields = dict(zip(fuse.fuse_attr.flat_fields, srv._attr_values(entry.attr)))
            return fuse.fuse_direntplus.pack(
                entry_out=dict(nodeid=entry.nodeid, generation=entry.generation,
                               entry_valid=srv._entry_valid[0], attr_valid=srv._attr_valid[0],
                               entry_valid_nsec=srv._entry_valid[1],
                               attr_valid_nsec=srv._attr_valid[1], attr=fields),
                dirent=dict(ino=5, off=3, namelen=2, type=8))

        ev, av = srv._entry_valid, srv._attr_valid

        def flat_direntplus():
            return dplus.pack(entry.nodeid, entry.generation, ev[0], av[0], ev[1], av[1],
                              *srv._attr_values(entry.attr), 5, 3, 2, 8)
        assert kw_direntplus() == flat_direntplus()
        hdr_bytes = ip.request(fuse.Opcode.GETATTR, 5, fuse.fuse_getattr_in.pack())[:40]
        in_hdr = struct.Struct("<IIQQIIIHH")
        # guest memory: views() as the ring uses it, and a one-region fast path
        gbuf = bytearray(1 << 20)
        gmem = GuestMemory.from_buffers([(0x100000, gbuf)])
        starts = [r.guest_phys_addr for r in gmem.regions]
        ends = [r.guest_phys_addr + r.memory_size for r in gmem.regions]
        bufs = [memoryview(gbuf)]

        def fast_views(gpa=0x100400, length=4096):
            i = bisect.bisect_right(starts, gpa) - 1
            if i >= 0 and gpa + length <= ends[i]:
                off = gpa - starts[i]
                return [bufs[i][off:off + length]]
            return gmem.views(gpa, length)
        rec_bytes = ownership.encode(ownership.Record(1000, 1000, 0o100644), name=b"user.o")
        interned: dict = {}

        def interned_decode(b=rec_bytes):
            r = interned.get(b)
            if r is None:
                r = interned[b] = ownership.decode(b, None, name=b"user.o")
            return r
        pieces = [
            ("encode fuse_attr_out: FuseServer._attr_out (flat_pack)",
             lambda: srv._attr_out(attr), "one struct.Struct.pack, values inline",
             fast_attr_out),
            ("encode one READDIRPLUS entry: fuse_direntplus.pack(entry_out=dict, dirent=dict)",
             kw_direntplus, "flat struct pack of the same values", flat_direntplus),
            ("encode fuse_open_out / fuse_write_out: WireStruct.pack(fh=..., ...)",
             lambda: fuse.fuse_open_out.pack(fh=3, open_flags=0),
             "struct.Struct.pack(3, 0, 0)", lambda: small.pack(3, 0, 0)),
            ("decode fuse_in_header: WireStruct.unpack (namedtuple)",
             lambda: fuse.fuse_in_header.unpack(hdr_bytes),
             "struct.Struct.unpack_from (plain tuple)", lambda: in_hdr.unpack_from(hdr_bytes)),
            ("opcode: fuse.Opcode(h.opcode) (enum lookup)", lambda: fuse.Opcode(3),
             "dict lookup of the handler by int", lambda: srv._handlers.get(3)),
            ("GuestMemory.views(gpa, 4096) (each descriptor of each chain)",
             lambda: gmem.views(0x100400, 4096), "bisect + one-region fast path", fast_views),
            ("Reader([view]) + Writer([view, view]) construction",
             lambda: (Reader([memoryview(hdr_bytes)]),
                      Writer([memoryview(ip.out)[:16], memoryview(ip.out)[16:]])),
             "-", None),
            ("ownership.decode(record) (each LOOKUP of a new node)",
             lambda: ownership.decode(rec_bytes, None, name=b"user.o"),
             "dict of already-decoded records (interning)", interned_decode),
            ("PassthroughFs.getattr (fstat + cached record + Attr)",
             lambda: ip.fs.getattr(Ctx(0, 0, 1), node, None), "os.fstat alone",
             lambda fd=ip.fs._inode(node).fd: os.fstat(fd)),
        ]
        for label, fn, alt_label, alt in pieces:
            us = per_call(fn)
            alt_us = per_call(alt) if alt else None
            rows.append([label, us, f"{alt_label}: {alt_us:.2f} µs" if alt else ""])
        print("Component costs in this process (µs per call, daemon's interpreter; no "
              "profiler)")
        print(fmt_table(["piece", "µs", "cheaper equivalent"], rows, "lrl"))
        return 0
    finally:
        shutil.rmtree(wd, ignore_errors=True)
