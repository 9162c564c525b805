"""A lean, pipelined FUSE client for benchmarks, on tests/frontend.py's vhost-user frontend.

`tests/fuse_client.FuseClient` allocates and copies guest memory for every request and waits
for each reply before sending the next: right for tests, but then the frontend costs more than
the daemon.  Here every in-flight slot has fixed request/reply buffers in guest memory (the
descriptors point at them; nothing is allocated per request), bulk READ/WRITE data stays in
guest memory (never copied out), and `Pipe.run()` puts up to `depth` requests on the ring
before one kick, as the guest kernel does when several processes issue requests.
"""

from __future__ import annotations

import os
import struct
import threading
import time

from protocol import fuse
from tests.frontend import Buffer, Frontend
from tests.fuse_client import FuseClient

IN_HDR = struct.Struct("<IIQQIIIHH")     # fuse_in_header
OUT_HDR = struct.Struct("<IiQ")          # fuse_out_header
Op = fuse.Opcode

_unique_lock = threading.Lock()
_unique = [1 << 32]
_hiprio_lock = threading.Lock()


def _next_unique(n: int = 1) -> int:
    with _unique_lock:
        u = _unique[0]
        _unique[0] += 2 * n
    return u


class Request:
    """One FUSE request: opcode, node, argument bytes, reply space; `data` is an optional
    pre-filled guest buffer (WRITE payload: readable; READ target: writable)."""

    __slots__ = ("opcode", "nodeid", "args", "out_size", "data", "uid", "gid")

    def __init__(self, opcode: int, nodeid: int, args: bytes = b"", out_size: int = 0,
                 data: Buffer | None = None, uid: int = 0, gid: int = 0):
        self.opcode, self.nodeid, self.args, self.out_size = opcode, nodeid, args, out_size
        self.data, self.uid, self.gid = data, uid, gid


class Session:
    """Frontend + FUSE INIT: hiprio queue 0 and `request_queues` request queues."""

    def __init__(self, socket_path, *, request_queues: int = 1, queue_size: int = 256,
                 mem_size: int = 256 << 20, timeout: float = 60.0):
        self.fe = Frontend(socket_path, timeout=timeout, mem_size=mem_size)
        fe = self.fe
        fe.negotiate()
        fe.map_memory()
        n = 1 + request_queues
        if fe.queue_num is not None and fe.queue_num < n:
            raise RuntimeError(f"daemon offers {fe.queue_num} queues, {n} wanted")
        for i in range(n):
            fe.setup_queue(i, queue_size, enable=False)
        for i in range(n):
            fe.set_vring_enable(i, True)
        self.client = FuseClient(fe, queue=1, timeout=timeout)
        self.init_out = self.client.init()
        self.timeout = timeout

    def pipe(self, queue: int = 1, depth: int = 1, in_cap: int = 1024,
             out_cap: int = 4096) -> "Pipe":
        return Pipe(self.fe, queue, depth, in_cap, out_cap, self.timeout)

    def close(self) -> None:
        self.fe.close()


class Pipe:
    def __init__(self, fe: Frontend, queue: int, depth: int, in_cap: int, out_cap: int,
                 timeout: float):
        self.fe, self.mem = fe, fe.mem
        self.q = fe.queues[queue]
        self.depth = depth
        self.timeout = timeout
        self.slots = [(self.mem.alloc(in_cap, 64), self.mem.alloc(out_cap, 64))
                      for _ in range(depth)]
        self.in_cap, self.out_cap = in_cap, out_cap
        self.pid = os.getpid()

    def run(self, reqs: list[Request], want_payload: bool = False) -> list[tuple[int, bytes]]:
        """Send `reqs` (at most `depth`) with one kick, wait for all; returns (errno, payload)
        per request in order (payload empty unless `want_payload`)."""
        n = len(reqs)
        if n > self.depth:
            raise ValueError(f"{n} requests > depth {self.depth}")
        mem, q = self.mem, self.q
        u0 = _next_unique(n)
        heads = {}
        for i, r in enumerate(reqs):
            in_gpa, out_gpa = self.slots[i]
            body = len(r.args) + (r.data.length if r.data is not None and not r.data.writable
                                  else 0)
            hdr = IN_HDR.pack(IN_HDR.size + body, r.opcode, u0 + 2 * i, r.nodeid,
                              r.uid, r.gid, self.pid, 0, 0)
            msg = hdr + r.args
            if len(msg) > self.in_cap or 16 + r.out_size > self.out_cap:
                raise ValueError("request or reply larger than the slot")
            mem.write(in_gpa, msg)
            # Laid out as Linux's virtio-fs lays requests out (virtio_fs_enqueue_req): the
            # header, the arguments, then data pages; the reply header, its arguments, pages.
            readable = [Buffer(in_gpa, IN_HDR.size, False, owned=False)]
            if r.args:
                readable.append(Buffer(in_gpa + IN_HDR.size, len(r.args), False, owned=False))
            writable = [Buffer(out_gpa, 16, True, owned=False)]
            if r.out_size:
                writable.append(Buffer(out_gpa + 16, r.out_size, True, owned=False))
            if r.data is not None:
                (writable if r.data.writable else readable).append(r.data)
            heads[q.add(readable, writable, publish=False)] = i
        q.publish()
        q.kick()
        used = q.wait_used(self.timeout, count=n)
        if len(used) != n:
            raise RuntimeError(f"{len(used)} completions for {n} requests")
        out: list[tuple[int, bytes]] = [(0, b"")] * n
        for u in used:
            i = heads[u.id]
            out_gpa = self.slots[i][1]
            length, err, unique = OUT_HDR.unpack(mem.read(out_gpa, 16))
            if unique != u0 + 2 * i:
                raise RuntimeError(f"reply unique {unique}, expected {u0 + 2 * i}")
            payload = b""
            if want_payload and not err:
                payload = mem.read(out_gpa + 16, min(length, 16 + reqs[i].out_size) - 16)
            out[i] = (-err, payload)
        return out

    def hiprio(self, opcode: int, nodeid: int, args: bytes) -> None:
        """A replyless request (FORGET, BATCH_FORGET) on queue 0; waits for its completion."""
        hq = self.fe.queues[0]
        request = self._replyless(opcode, nodeid, args)
        # DriverQueue.submit is not safe for two waiters on one queue (one can stash the
        # other's completion after it stopped looking): one hiprio request at a time.
        with _hiprio_lock:
            hq.submit([request], [], timeout=self.timeout)

    def _replyless(self, opcode: int, nodeid: int, args: bytes) -> bytes:
        return IN_HDR.pack(IN_HDR.size + len(args), opcode, _next_unique(), nodeid, 0, 0,
                           self.pid, 0, 0) + args

    def hiprio_post(self, opcode: int, nodeid: int, args: bytes) -> None:
        """A replyless request on queue 0 sent as the guest sends it: made available and
        kicked, its completion not waited for (Linux frees a FORGET when its used buffer
        comes back, in `virtio_fs_hiprio_done_work`; nothing waits on it).  vfsd holds
        the notification for the hiprio queue back up to 20 ms (`coalesced_queues`), so
        waiting for each completion would time that timer, not the daemon.  Completed
        chains are collected here; `hiprio_drain` waits for the rest."""
        hq = self.fe.queues[0]
        chain = [self._replyless(opcode, nodeid, args)]
        with _hiprio_lock:
            hq.poll_used()
            while not hq.free_descs:  # every descriptor out: wait for the device to give one back
                hq.stash.clear()
                hq.wait_used(self.timeout)
            hq.add(chain, [])
            hq.kick()

    def hiprio_drain(self) -> None:
        """Wait until every request `hiprio_post` sent is completed."""
        hq = self.fe.queues[0]
        deadline = time.monotonic() + self.timeout
        with _hiprio_lock:
            while hq.inflight:
                hq.stash.clear()  # posted requests' completions: nobody waits for them
                hq.wait_used(max(0.0, deadline - time.monotonic()))


# -- argument builders ------------------------------------------------------------------------

def name_arg(name: bytes) -> bytes:
    return name + b"\0"


def lookup(parent: int, name: bytes) -> Request:
    return Request(Op.LOOKUP, parent, name_arg(name), fuse.fuse_entry_out.size)


def getattr_(node: int) -> Request:
    return Request(Op.GETATTR, node, fuse.fuse_getattr_in.pack(), fuse.fuse_attr_out.size)


def create(parent: int, name: bytes, mode: int = 0o644, umask: int = 0o022,
           flags: int = os.O_RDWR | os.O_CREAT | os.O_EXCL) -> Request:
    return Request(Op.CREATE, parent,
                   fuse.fuse_create_in.pack(flags=flags, mode=0o100000 | mode, umask=umask)
                   + name_arg(name), fuse.fuse_entry_out.size + fuse.fuse_open_out.size)


def setattr_owner(node: int, uid: int, gid: int) -> Request:
    V = fuse.SetattrValid
    return Request(Op.SETATTR, node,
                   fuse.fuse_setattr_in.pack(valid=int(V.UID | V.GID), uid=uid, gid=gid),
                   fuse.fuse_attr_out.size)


def release(node: int, fh: int, flags: int = os.O_RDWR) -> Request:
    return Request(Op.RELEASE, node, fuse.fuse_release_in.pack(fh=fh, flags=flags), 0)


def open_(node: int, flags: int = os.O_RDWR) -> Request:
    return Request(Op.OPEN, node, fuse.fuse_open_in.pack(flags=flags), fuse.fuse_open_out.size)


def read(node: int, fh: int, offset: int, size: int, target: Buffer | None = None) -> Request:
    args = fuse.fuse_read_in.pack(fh=fh, offset=offset, size=size, flags=os.O_RDWR)
    if target is not None:
        return Request(Op.READ, node, args, 0, data=target)
    return Request(Op.READ, node, args, size)


def write(node: int, fh: int, offset: int, data: Buffer) -> Request:
    args = fuse.fuse_write_in.pack(fh=fh, offset=offset, size=data.length, flags=os.O_RDWR)
    return Request(Op.WRITE, node, args, fuse.fuse_write_out.size, data=data)


def opendir(node: int) -> Request:
    return Request(Op.OPENDIR, node, fuse.fuse_open_in.pack(flags=os.O_RDONLY | os.O_DIRECTORY),
                   fuse.fuse_open_out.size)


def readdirplus(node: int, fh: int, offset: int, size: int = 4096) -> Request:
    """A listing reply of `size` bytes (Linux asks for one page at a time)."""
    return Request(Op.READDIRPLUS, node, fuse.fuse_read_in.pack(fh=fh, offset=offset, size=size),
                   size)


def releasedir(node: int, fh: int) -> Request:
    return Request(Op.RELEASEDIR, node, fuse.fuse_release_in.pack(fh=fh), 0)


def direntplus(payload: bytes) -> list[tuple[int, int, bytes]]:
    """(nodeid, offset, name) of each fuse_direntplus in a READDIRPLUS reply."""
    out, pos, size = [], 0, fuse.fuse_direntplus.size
    while pos + size <= len(payload):
        nodeid = struct.unpack_from("<Q", payload, pos)[0]
        _ino, off, namelen, _type = fuse.fuse_dirent.flat_unpack_from(
            payload, pos + fuse.fuse_entry_out.size)
        out.append((nodeid, off, payload[pos + size:pos + size + namelen]))
        pos += fuse.dirent_align(size + namelen)
    return out


def unlink(parent: int, name: bytes) -> Request:
    return Request(Op.UNLINK, parent, name_arg(name), 0)


def enosys(node: int = 1) -> Request:
    """GETLK, which vfsd does not implement: the cheapest full round trip (decode, dispatch,
    error reply) - the transport's own cost."""
    return Request(Op.GETLK, node, bytes(fuse.fuse_lk_in.size), fuse.fuse_lk_out.size)


def batch_forget_args(items: list[tuple[int, int]]) -> bytes:
    return fuse.fuse_batch_forget_in.pack(count=len(items)) + b"".join(
        fuse.fuse_forget_one.pack(nodeid=n, nlookup=k) for n, k in items)


def entry_nodeid(payload: bytes) -> int:
    return struct.unpack_from("<Q", payload, 0)[0]


def open_fh(payload: bytes, offset: int = 0) -> int:
    return struct.unpack_from("<Q", payload, offset)[0]
