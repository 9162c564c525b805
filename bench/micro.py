"""Host microbenchmark: FUSE requests through the Python vhost-user frontend (no VM) against
the real daemon, next to the same operations done with direct syscalls in this process.

Figures per operation:
  * rate and mean latency with one request in flight (depth 1: one guest thread doing
    syscalls one after another),
  * rate with `depth` requests in flight per kick (several guest threads, or readahead),
  * daemon CPU per request (utime+stime of the daemon process over the run / requests): the
    daemon's own cost, independent of the frontend's,
  * the same operation by direct syscalls here ("plain": what a program on the host does;
    "vfsd's syscalls": the sequence vfsd's passthrough makes for it, so the difference to the
    FUSE figure is the price of Python, decoding, dispatch and the ring, not of the design).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

from protocol import fuse
from tests.frontend import Buffer
from vfsd import ownership

from . import client as C
from .common import BenchDaemon, CVirtiofsd, cpu_seconds, fmt_table, make_workdir, note

RECORD = ownership.encode(ownership.Record(1000, 1000, 0o100644), name=b"user.o")
DIR_RECORD = ownership.encode(ownership.Record(1000, 1000, 0o40755), name=b"user.o")
MiB = 1 << 20


@dataclasses.dataclass
class Figure:
    ops: int = 0            # operations (files for CREATE+SETATTR+RELEASE)
    requests: int = 0       # FUSE requests
    seconds: float = 0.0
    cpu: float = 0.0        # daemon CPU seconds
    bytes: int = 0

    def add(self, other: "Figure") -> None:
        self.ops += other.ops
        self.requests += other.requests
        self.seconds += other.seconds
        self.cpu += other.cpu
        self.bytes += other.bytes

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    @property
    def mbps(self) -> float:
        return self.bytes / MiB / self.seconds if self.seconds else 0.0

    @property
    def us_per_op(self) -> float:
        return 1e6 * self.seconds / self.ops if self.ops else 0.0

    @property
    def cpu_us_per_req(self) -> float:
        return 1e6 * self.cpu / self.requests if self.requests else 0.0


# ---------------------------------------------------------------------------------------------
# the share


def make_share(share: Path, nfiles: int, big: int) -> None:
    """share/files/f000000.. (4 KiB each, with records) and share/big (`big` bytes)."""
    files = share / "files"
    files.mkdir(parents=True)
    os.setxattr(files, "user.o", DIR_RECORD)
    block = (b"0123456789abcdef" * 256)
    for i in range(nfiles):
        fd = os.open(files / f"f{i:06d}", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
        os.write(fd, block)
        os.setxattr(fd, "user.o", RECORD)
        os.close(fd)
    with open(share / "big", "wb") as f:
        chunk = os.urandom(MiB)
        for _ in range(big // MiB):
            f.write(chunk)
    os.setxattr(share / "big", "user.o", RECORD)
    (share / "new").mkdir()
    os.setxattr(share / "new", "user.o", DIR_RECORD)


# ---------------------------------------------------------------------------------------------
# FUSE side


class Bench:
    def __init__(self, sess: C.Session, pid: int, depth: int, min_time: float, nfiles: int,
                 big: int, queue: int = 1, cpu: Callable[[], float] | None = None,
                 share: Path | None = None):
        self.sess, self.pid, self.depth, self.min_time = sess, pid, depth, min_time
        # the daemon's CPU seconds so far (the C virtiofsd's are its session's)
        self.cpu = cpu or (lambda: cpu_seconds(pid))
        self.share = share
        self.nfiles, self.big = nfiles, big
        self.pipe = sess.pipe(queue, depth, in_cap=1024, out_cap=4096 + 512)
        c = sess.client
        self.files_node = c.lookup(1, b"files").nodeid
        self.new_node = c.lookup(1, b"new").nodeid
        self.big_node = c.lookup(1, b"big").nodeid
        self.names = [b"f%06d" % i for i in range(nfiles)]
        self._ctr = 0

    # one measured step: returns Figure for what it did (time and CPU around it only)
    def _timed(self, fn) -> Figure:
        c0 = self.cpu()
        t0 = time.perf_counter()
        ops, reqs, nbytes = fn()
        t1 = time.perf_counter()
        return Figure(ops, reqs, t1 - t0, self.cpu() - c0, nbytes)

    def _loop(self, step, untimed=None, min_time: float | None = None) -> Figure:
        total = Figure()
        deadline = self.min_time if min_time is None else min_time
        while total.seconds < deadline:
            total.add(self._timed(step))
            if untimed:
                untimed()
        return total

    def _batches(self, reqs: list[C.Request], want_payload=False) -> list:
        out = []
        for i in range(0, len(reqs), self.depth):
            out.extend(self.pipe.run(reqs[i:i + self.depth], want_payload))
        return out

    @staticmethod
    def _ok(results) -> None:
        for err, _ in results:
            if err:
                raise OSError(err, f"FUSE request failed: {os.strerror(err)}")

    def forget(self, items: list[tuple[int, int]]) -> None:
        for i in range(0, len(items), 200):
            chunk = items[i:i + 200]
            self.pipe.hiprio_post(fuse.Opcode.BATCH_FORGET, 0, C.batch_forget_args(chunk))
        self.pipe.hiprio_drain()

    # -- operations ---------------------------------------------------------------------------
    def enosys(self) -> Figure:
        n = 256

        def step():
            res = self._batches([C.enosys() for _ in range(n)])
            assert all(e == 38 for e, _ in res), res[:3]
            return n, n, 0
        return self._loop(step)

    def lookup_new(self) -> Figure:
        """LOOKUP of nodes that are not live, whose inodes changed since they were forgotten
        (the daemon must read the record)."""
        return self._lookup_forgotten(touch=True)

    def lookup_again(self) -> Figure:
        """LOOKUP of forgotten nodes that did not change (vfsd kept their record)."""
        return self._lookup_forgotten(touch=False)

    def _lookup_forgotten(self, touch: bool) -> Figure:
        chunk = 1000
        state = {"nodes": [], "names": []}

        def step():
            i = self._ctr % self.nfiles
            names = [self.names[(i + k) % self.nfiles] for k in range(chunk)]
            self._ctr += chunk
            res = self._batches([C.lookup(self.files_node, nm) for nm in names], True)
            self._ok(res)
            state["nodes"] = [C.entry_nodeid(p) for _, p in res]
            state["names"] = names
            return chunk, chunk, 0

        def forget():
            # each node was looked up once in this step (chunk <= nfiles): forget them all
            self.forget([(n, 1) for n in state["nodes"]])
            if touch:  # a host-side change: the inode's ctime moves
                dfd = os.open(self.share / "files", os.O_PATH | os.O_DIRECTORY)
                try:
                    for nm in state["names"]:
                        os.utime(nm, dir_fd=dfd)
                finally:
                    os.close(dfd)
        return self._loop(step, forget)

    def lookup_live(self) -> Figure:
        n = 256
        name = self.names[0]
        count = [0]

        def step():
            res = self._batches([C.lookup(self.files_node, name) for _ in range(n)], True)
            self._ok(res)
            count[0] += n
            self._node0 = C.entry_nodeid(res[0][1])
            return n, n, 0
        f = self._loop(step)
        self.forget([(self._node0, count[0])])
        return f

    def getattr(self) -> Figure:
        n = 256
        res = self._batches([C.lookup(self.files_node, nm) for nm in self.names[:16]], True)
        nodes = [C.entry_nodeid(p) for _, p in res]

        def step():
            self._ok(self._batches([C.getattr_(nodes[k % 16]) for k in range(n)]))
            return n, n, 0
        f = self._loop(step)
        self.forget([(x, 1) for x in nodes])
        return f

    def chown(self) -> Figure:
        """SETATTR uid+gid of live nodes, each time to another owner (chown -R)."""
        n = 256
        res = self._batches([C.lookup(self.files_node, nm) for nm in self.names[:16]], True)
        nodes = [C.entry_nodeid(p) for _, p in res]
        turn = [0]

        def step():
            turn[0] += 1
            owner = 2000 + turn[0] % 2
            self._ok(self._batches([C.setattr_owner(nodes[k % 16], owner, owner)
                                    for k in range(n)]))
            return n, n, 0
        f = self._loop(step)
        self.forget([(x, 1) for x in nodes])
        return f

    def create_setattr(self) -> Figure:
        n = 128
        made: list[tuple[bytes, int]] = []

        def step():
            base = self._ctr
            self._ctr += n
            names = [b"c%08d" % (base + k) for k in range(n)]
            res = self._batches([C.create(self.new_node, nm) for nm in names], True)
            self._ok(res)
            nodes = [C.entry_nodeid(p) for _, p in res]
            fhs = [C.open_fh(p, fuse.fuse_entry_out.size) for _, p in res]
            self._ok(self._batches([C.setattr_owner(nd, 1234, 5678) for nd in nodes]))
            self._ok(self._batches([C.release(nd, fh) for nd, fh in zip(nodes, fhs)]))
            made.extend(zip(names, nodes))
            return n, 3 * n, 0

        def cleanup():
            if len(made) >= 1024:
                self._cleanup(made)
        f = self._loop(step, cleanup)
        self._cleanup(made)
        return f

    def _cleanup(self, made: list) -> None:
        self._ok(self._batches([C.unlink(self.new_node, nm) for nm, _ in made]))
        self.forget([(nd, 1) for _, nd in made])
        made.clear()

    def remove(self) -> Figure:
        """`rm` of files the guest has looked up, as the guest sends it: per file a GETATTR
        of the directory (the guest re-checks its permission there after every UNLINK), the
        UNLINK, and the FORGET of the removed node on the hiprio queue (one FORGET each, as
        its inode eviction sends them).  Per file; the files (one block each, as the guest
        workload's) are made on the host and looked up between passes, untimed."""
        chunk = 200
        d = self.new_node
        state = {"made": []}

        def make():
            self.pipe.hiprio_drain()  # the last pass's FORGETs, untimed
            base = self._ctr
            self._ctr += chunk
            names = [b"r%08d" % (base + k) for k in range(chunk)]
            dfd = os.open(self.share / "new", os.O_PATH | os.O_DIRECTORY)
            try:
                for nm in names:
                    fd = os.open(nm, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644, dir_fd=dfd)
                    os.write(fd, b"x\n")
                    os.close(fd)
            finally:
                os.close(dfd)
            res = self._batches([C.lookup(d, nm) for nm in names], True)
            self._ok(res)
            state["made"] = [(nm, C.entry_nodeid(p)) for nm, (_, p) in zip(names, res)]

        def step():
            made = state["made"]
            for nm, node in made:
                self._ok(self.pipe.run([C.getattr_(d)]))
                self._ok(self.pipe.run([C.unlink(d, nm)]))
                self.pipe.hiprio_post(fuse.Opcode.FORGET, node,
                                      fuse.fuse_forget_in.pack(nlookup=1))
            return len(made), 3 * len(made), 0
        make()
        f = self._loop(step, make)
        self.pipe.hiprio_drain()
        for nm, node in state["made"]:
            os.unlink(self.share / "new" / os.fsdecode(nm))
        self.forget([(node, 1) for _, node in state["made"]])
        return f

    def readdirplus(self, think_us: float = 0.0) -> Figure:
        """`ls -l` of a directory the guest has not cached: OPENDIR, READDIRPLUS replies of
        4 KiB through all of `files` (each entry looked up), RELEASEDIR; then every node
        the listing looked up is forgotten, untimed.  Per entry (CPU too); the replies
        follow one another, as the guest kernel's do, `think_us` per entry apart (a busy
        wait on this CPU, as a TCG guest's own work is)."""
        state = {"nodes": []}

        def step():
            err, p = self.pipe.run([C.opendir(self.files_node)], True)[0]
            if err:
                raise OSError(err, "OPENDIR")
            fh, offset, entries, nodes = C.open_fh(p), 0, 0, state["nodes"]
            while True:
                err, p = self.pipe.run([C.readdirplus(self.files_node, fh, offset)], True)[0]
                if err:
                    raise OSError(err, "READDIRPLUS")
                listed = C.direntplus(p)
                if not listed:
                    break
                for nodeid, offset, _name in listed:
                    if nodeid:
                        nodes.append(nodeid)
                entries += len(listed)
                if think_us:
                    until = time.perf_counter() + think_us * 1e-6 * len(listed)
                    while time.perf_counter() < until:
                        pass
            self._ok(self.pipe.run([C.releasedir(self.files_node, fh)]))
            return entries, entries, 0

        def forget():
            self.forget([(n, 1) for n in state["nodes"]])
            state["nodes"] = []
        return self._loop(step, forget)

    def readdirplus_guest(self) -> Figure:
        """readdirplus with the guest's own work between the replies: 40 µs per entry, about
        what a TCG guest's `ls -ln` takes per entry besides the daemon (0.11-0.15 s for 2,000
        entries with the C virtiofsd, docs/performance.md).  What vfsd's READDIRPLUS
        readahead hides shows here: the wall time per entry, the wait included."""
        return self.readdirplus(think_us=GUEST_US_PER_ENTRY)

    def _open(self, node: int) -> int:
        err, p = self.pipe.run([C.open_(node)], True)[0]
        if err:
            raise OSError(err, "OPEN")
        return C.open_fh(p)

    def read4k(self) -> Figure:
        n = 256
        res = self._batches([C.lookup(self.files_node, self.names[1])], True)
        node = C.entry_nodeid(res[0][1])
        fh = self._open(node)

        def step():
            res = self._batches([C.read(node, fh, 0, 4096) for _ in range(n)])
            self._ok(res)
            return n, n, n * 4096
        f = self._loop(step)
        self._ok(self.pipe.run([C.release(node, fh)]))
        self.forget([(node, 1)])
        return f

    def _bulk_buffers(self, size: int, fill: bool) -> list[Buffer]:
        mem = self.sess.fe.mem
        bufs = []
        for _ in range(self.depth):
            gpa = mem.alloc(size, 4096)
            if fill:
                mem.write(gpa, os.urandom(size))
            bufs.append(Buffer(gpa, size, not fill, owned=False))
        return bufs

    def read1m(self) -> Figure:
        bufs = self._bulk_buffers(MiB, fill=False)
        fh = self._open(self.big_node)
        nchunks = self.big // MiB
        pos = [0]

        def step():
            reqs = []
            for k in range(self.depth):
                reqs.append(C.read(self.big_node, fh, (pos[0] % nchunks) * MiB, MiB, bufs[k]))
                pos[0] += 1
            res = self.pipe.run(reqs)
            self._ok(res)
            return len(reqs), len(reqs), len(reqs) * MiB
        f = self._loop(step)
        self._ok(self.pipe.run([C.release(self.big_node, fh)]))
        return f

    def write1m(self) -> Figure:
        bufs = self._bulk_buffers(MiB, fill=True)
        res = self.pipe.run([C.create(self.new_node, b"bigw")], True)
        self._ok(res)
        node = C.entry_nodeid(res[0][1])
        fh = C.open_fh(res[0][1], fuse.fuse_entry_out.size)
        nchunks = self.big // MiB
        pos = [0]

        def step():
            reqs = []
            for k in range(self.depth):
                reqs.append(C.write(node, fh, (pos[0] % nchunks) * MiB, bufs[k]))
                pos[0] += 1
            self._ok(self.pipe.run(reqs))
            return len(reqs), len(reqs), len(reqs) * MiB
        f = self._loop(step)
        self._ok(self.pipe.run([C.release(node, fh)]))
        self._ok(self.pipe.run([C.unlink(self.new_node, b"bigw")]))
        self.forget([(node, 1)])
        return f


GUEST_US_PER_ENTRY = 40.0  # readdirplus_guest

FUSE_OPS = [  # key, label, method, unit
    ("enosys", "round trip (ENOSYS: decode+dispatch+reply)", "enosys", "req/s"),
    ("lookup_new", "LOOKUP, new node (reads the record)", "lookup_new", "req/s"),
    ("lookup_again", "LOOKUP, forgotten node, unchanged (record kept)", "lookup_again",
     "req/s"),
    ("lookup_live", "LOOKUP, node already live", "lookup_live", "req/s"),
    ("getattr", "GETATTR", "getattr", "req/s"),
    ("chown", "SETATTR uid,gid (chown)", "chown", "req/s"),
    ("create", "CREATE+SETATTR(uid,gid)+RELEASE", "create_setattr", "files/s"),
    ("readdirplus", "READDIRPLUS of a directory, per entry (ls -l)", "readdirplus",
     "entries/s"),
    ("readdirplus_guest", "the same, 40 µs per entry apart (a guest's own work)",
     "readdirplus_guest", "entries/s"),
    ("remove", "GETATTR(dir)+UNLINK+FORGET (rm), per file", "remove", "files/s"),
    ("read4k", "READ 4 KiB", "read4k", "req/s"),
    ("read1m", "READ 1 MiB", "read1m", "MB/s"),
    ("write1m", "WRITE 1 MiB", "write1m", "MB/s"),
]


# ---------------------------------------------------------------------------------------------
# direct syscalls


def _proc(fd: int) -> bytes:
    return b"/proc/self/fd/%d" % fd


def direct(share: Path, key: str, min_time: float, nfiles: int, big: int) -> dict:
    """{variant: Figure} for the direct-syscall equivalents of FUSE op `key`."""
    files = os.fsencode(share / "files")
    dfd = os.open(files, os.O_PATH | os.O_DIRECTORY)
    names = [b"f%06d" % i for i in range(nfiles)]
    out = {}

    def loop(fn, per=256, nbytes=0):
        f = Figure()
        while f.seconds < min_time:
            t0 = time.perf_counter()
            fn(per)
            f.add(Figure(per, per, time.perf_counter() - t0, 0.0, per * nbytes))
        return f

    try:
        if key in ("lookup_new", "lookup_live", "lookup_again"):
            def plain(n):
                for i in range(n):
                    os.stat(names[i % nfiles], dir_fd=dfd, follow_symlinks=False)

            def vfsd_new(n):
                for i in range(n):
                    fd = os.open(names[i % nfiles], os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 dir_fd=dfd)
                    os.fstat(fd)
                    os.getxattr(_proc(fd), "user.o")
                    os.close(fd)

            def vfsd_live(n):
                for i in range(n):
                    fd = os.open(names[0], os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 dir_fd=dfd)
                    os.fstat(fd)
                    os.close(fd)
            out["plain"] = loop(plain)
            out["vfsd"] = loop(vfsd_new if key == "lookup_new" else vfsd_live)
        elif key == "getattr":
            fd = os.open(names[0], os.O_PATH | os.O_NOFOLLOW, dir_fd=dfd)

            def plain(n):
                for _ in range(n):
                    os.fstat(fd)
            out["plain"] = loop(plain)
            out["vfsd"] = out["plain"]
            os.close(fd)
        elif key == "chown":
            fd = os.open(names[0], os.O_PATH | os.O_NOFOLLOW, dir_fd=dfd)
            turn = [0]

            def plain(n):
                for _ in range(n):
                    turn[0] += 1
                    os.chown(names[0], 2000 + turn[0] % 2, 2000 + turn[0] % 2, dir_fd=dfd,
                             follow_symlinks=False)

            def vfsd(n):
                for _ in range(n):   # passthrough.setattr of a node whose record is known
                    os.setxattr(_proc(fd), "user.o", RECORD)
                    os.fstat(fd)
            out["plain"] = loop(plain)
            out["vfsd"] = loop(vfsd)
            os.close(fd)
        elif key == "create":
            nd = os.open(share / "new", os.O_PATH | os.O_DIRECTORY)
            ctr = [0]
            made = []

            def plain(n):
                for _ in range(n):
                    nm = b"p%08d" % ctr[0]
                    ctr[0] += 1
                    fd = os.open(nm, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o644,
                                 dir_fd=nd)
                    os.close(fd)
                    made.append(nm)

            def vfsd(n):
                # passthrough.create + setattr(uid, gid) + release, syscall for syscall
                # (defaults: no ACLs; the parent's record is known, the umask strips
                # nothing, the creating fd is the handle, the new node's record is known)
                for _ in range(n):
                    nm = b"v%08d" % ctr[0]
                    ctr[0] += 1
                    fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o644,
                                 dir_fd=nd)
                    os.setxattr(fd, "user.o", RECORD)
                    _linkat(fd, nd, nm)
                    pfd = os.open(_proc(fd), os.O_PATH | os.O_CLOEXEC)   # _adopt_new
                    os.fstat(pfd)                                  # serves the reply too
                    os.setxattr(_proc(pfd), "user.o", RECORD)      # SETATTR: _store_record
                    os.fstat(pfd)                                  # reply attr
                    os.close(fd)                                   # RELEASE
                    os.close(pfd)                                  # FORGET
                    made.append(nm)
            out["plain"] = loop(plain, 128)
            for nm in made:
                os.unlink(nm, dir_fd=nd)
            made.clear()
            out["vfsd"] = loop(vfsd, 128)
            for nm in made:
                os.unlink(nm, dir_fd=nd)
            os.close(nd)
        elif key == "readdirplus":
            def plain(n):  # ls -l: the listing, an lstat per entry
                done = 0
                while done < n:
                    for d in os.scandir(files):
                        d.stat(follow_symlinks=False)
                        done += 1

            def vfsd(n):  # the listing, then LOOKUP's syscalls per entry (record read)
                done = 0
                while done < n:
                    for nm in os.listdir(files):
                        fd = os.open(nm, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                        os.fstat(fd)
                        os.getxattr(_proc(fd), "user.o")
                        os.close(fd)
                        done += 1
            out["plain"] = loop(plain, nfiles)
            out["vfsd"] = loop(vfsd, nfiles)
        elif key == "read4k":
            fd = os.open(names[1], os.O_RDONLY, dir_fd=dfd)
            buf = memoryview(bytearray(4096))

            def plain(n):
                for _ in range(n):
                    os.preadv(fd, [buf], 0)
            out["plain"] = loop(plain, nbytes=4096)
            out["vfsd"] = out["plain"]
            os.close(fd)
        elif key in ("read1m", "write1m"):
            import mmap
            m = mmap.mmap(-1, MiB)
            mv = memoryview(m)
            m.write(os.urandom(MiB))
            path = share / ("big" if key == "read1m" else "bigw-direct")
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            nchunks = big // MiB
            pos = [0]

            def plain(n):
                for _ in range(n):
                    off = (pos[0] % nchunks) * MiB
                    pos[0] += 1
                    if key == "read1m":
                        os.preadv(fd, [mv], off)
                    else:
                        os.pwritev(fd, [mv], off)
            out["plain"] = loop(plain, 16, MiB)
            out["vfsd"] = out["plain"]
            os.close(fd)
            mv.release()
            m.close()
            if key == "write1m":
                os.unlink(path)
    finally:
        os.close(dfd)
    return out


def _linkat(fd: int, dirfd: int, name: bytes) -> None:
    from vfsd import syscalls
    syscalls.link_fd(fd, dirfd, name)


# ---------------------------------------------------------------------------------------------
# runs


def run_fuse(workdir: Path, share: Path, *, args=(), depth: int, min_time: float,
             nfiles: int, big: int, ops: list[str], queues: int = 1,
             profile: Path | None = None, source_root: Path | None = None,
             reference: bool = False) -> dict[str, Figure]:
    """One daemon; every op in `ops` at `depth`.  With queues=2, each op runs on both request
    queues at once (one frontend thread per queue) and the figures are summed.  `reference`:
    the C virtiofsd instead of vfsd (`args` are then its options)."""
    results: dict[str, Figure] = {}
    daemon = (CVirtiofsd(workdir, share, args) if reference else
              BenchDaemon(workdir, share, args, profile=profile, source_root=source_root))
    with daemon as d:
        cpu = d.cpu_seconds if reference else (lambda: cpu_seconds(d.pid))
        sess = C.Session(d.socket_path, request_queues=queues)
        try:
            benches = [Bench(sess, d.pid, depth, min_time, nfiles, big, queue=q + 1, cpu=cpu,
                             share=share)
                       for q in range(queues)]
            for key, _label, meth, _unit in FUSE_OPS:
                if key not in ops:
                    continue
                if queues == 1:
                    results[key] = getattr(benches[0], meth)()
                    continue
                figs: list[Figure | BaseException] = [None] * queues

                def work(i):
                    try:
                        figs[i] = getattr(benches[i], meth)()
                    except BaseException as e:  # noqa: BLE001
                        figs[i] = e
                c0, t0 = cpu(), time.perf_counter()
                ts = [threading.Thread(target=work, args=(i,)) for i in range(queues)]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
                wall, used = time.perf_counter() - t0, cpu() - c0
                for f in figs:
                    if isinstance(f, BaseException):
                        raise f
                total = Figure(sum(f.ops for f in figs), sum(f.requests for f in figs),
                               wall, used, sum(f.bytes for f in figs))
                results[key] = total
        finally:
            sess.close()
        rc = d.wait_exit(30)
        if rc != 0:
            name = "virtiofsd" if reference else "vfsd"
            note(f"{name} exit status {rc} after disconnect\n{d.log_tail()}")
    return results


def main(argv: list[str]) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python3 -m bench micro", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short runs (about 1 minute)")
    p.add_argument("--depth", type=int, default=16, help="requests in flight (default 16)")
    p.add_argument("--time", type=float, help="seconds per figure (default 1.5, quick 0.4)")
    p.add_argument("--files", type=int, default=5000, help="files in the share (default 5000)")
    p.add_argument("--no-variants", action="store_true",
                   help="skip the thread-pool / request-queue comparison")
    p.add_argument("--compare", metavar="REV[,REV...]",
                   help="instead: the daemon's code at these git revisions (and 'worktree' for "
                        "this checkout) side by side, at depth --depth, alternating --rounds "
                        "times; medians of rate and daemon CPU per request")
    p.add_argument("--rounds", type=int, default=3, help="rounds for --compare (3)")
    p.add_argument("--reference", action="store_true",
                   help="also run the FUSE ops against the C virtiofsd (as root, -o cache=auto) "
                        "and print the two daemons side by side")
    p.add_argument("--ops", metavar="OP[,OP...]",
                   help="only these FUSE operations (" + ",".join(k for k, *_ in FUSE_OPS) + ")")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    a = p.parse_args(argv)
    keys = [k for k, *_ in FUSE_OPS]
    if a.ops:
        unknown = set(a.ops.split(",")) - set(keys)
        if unknown:
            p.error(f"--ops: unknown {', '.join(sorted(unknown))}")
        keys = [k for k in keys if k in a.ops.split(",")]
    if a.reference and CVirtiofsd.available():
        p.error(f"--reference: {CVirtiofsd.available()}")
    if a.compare:
        return compare(a.compare.split(","), a.rounds, a.depth, a.time or (0.4 if a.quick
                                                                              else 1.0),
                       a.files, keys)
    min_time = a.time or (0.4 if a.quick else 1.5)
    big = 64 * MiB
    workdir = make_workdir()
    share = workdir / "share"
    try:
        note(f"micro: making the share ({a.files} files, {big // MiB} MiB file) in {workdir}")
        make_share(share, a.files, big)
        note("micro: FUSE ops at depth 1")
        d1 = run_fuse(workdir, share, depth=1, min_time=min_time, nfiles=a.files, big=big,
                      ops=keys)
        note(f"micro: FUSE ops at depth {a.depth}")
        dn = run_fuse(workdir, share, depth=a.depth, min_time=min_time, nfiles=a.files,
                      big=big, ops=keys)
        note("micro: direct syscalls")
        dr = {k: direct(share, k, min_time, a.files, big) for k in keys if k != "enosys"}
        print(report_main(d1, dn, dr, a.depth))
        ref = {}
        if a.reference:
            note(f"micro: the C virtiofsd, at depth 1 and at depth {a.depth}")
            ref = {depth: run_fuse(workdir, share, depth=depth, min_time=min_time,
                                   nfiles=a.files, big=big, ops=keys, reference=True)
                   for depth in (1, a.depth)}
            print()
            print(report_reference(d1, dn, ref[1], ref[a.depth], a.depth))
        variants = {}
        if not a.no_variants:
            vops = ["enosys", "getattr", "lookup_new", "read4k", "read1m"]
            for label, args, queues in (("pool 0, 1 queue", [], 1),
                                        ("pool 4, 1 queue", ["--thread-pool-size", "4"], 1),
                                        ("pool 0, 2 queues", [], 2),
                                        ("pool 4, 2 queues", ["--thread-pool-size", "4"], 2)):
                note(f"micro: variant {label}")
                variants[label] = run_fuse(workdir, share, args=args, depth=a.depth,
                                           min_time=min_time, nfiles=a.files, big=big,
                                           ops=vops, queues=queues)
            print()
            print(report_variants(variants, a.depth))
        if a.json:
            dump = {"depth1": d1, "depthN": dn, "direct": dr, "variants": variants,
                    "virtiofsd": ref}
            Path(a.json).write_text(json.dumps(dump, default=_jsonable, indent=1))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def compare(revs: list[str], rounds: int, depth: int, min_time: float, nfiles: int,
            keys: list[str]) -> int:
    """The FUSE ops `keys` against the daemon's code at several revisions, interleaved."""
    import statistics
    from .common import source_at
    big = 64 * MiB
    workdir = make_workdir()
    try:
        make_share(workdir / "share", nfiles, big)
        roots = {}
        for rev in revs:
            roots[rev] = None if rev == "worktree" else source_at(rev, workdir / f"src-{rev}")
        got: dict[str, dict[str, list[Figure]]] = {r: {k: [] for k in keys} for r in revs}
        for rnd in range(rounds):
            for rev in revs:
                note(f"micro: {rev} (round {rnd + 1}/{rounds})")
                res = run_fuse(workdir, workdir / "share", depth=depth, min_time=min_time,
                               nfiles=nfiles, big=big, ops=keys, source_root=roots[rev])
                for k in keys:
                    got[rev][k].append(res[k])
        rows = []
        for key, label, _m, unit in FUSE_OPS:
            if key not in keys:
                continue
            row = [label, unit]
            for rev in revs:
                figs = got[rev][key]
                row.append(statistics.median(_value(f, unit) for f in figs))
                row.append(statistics.median(f.cpu_us_per_req for f in figs))
            rows.append(row)
        hdr = ["operation", "unit"]
        for rev in revs:
            hdr += [f"{rev} rate", f"{rev} CPU µs/req"]
        print(f"Daemon code by revision (depth {depth}, median of {rounds} alternating rounds)")
        print(fmt_table(hdr, rows))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _jsonable(o):
    if isinstance(o, Figure):
        return dict(dataclasses.asdict(o), rate=o.rate, mbps=o.mbps)
    raise TypeError(type(o))


def _value(f: Figure | None, unit: str) -> float | None:
    if f is None:
        return None
    return f.mbps if unit == "MB/s" else f.rate


def report_main(d1, dn, dr, depth: int) -> str:
    rows = []
    for key, label, _m, unit in FUSE_OPS:
        if key not in d1:
            continue
        a, b = d1.get(key), dn.get(key)
        plain = dr.get(key, {}).get("plain")
        same = dr.get(key, {}).get("vfsd")
        vb = _value(b, unit)
        ratio = (f"{_value(plain, unit) / vb:.1f}x" if plain and vb else "-")
        rows.append([label, unit, _value(a, unit), a.us_per_op if a else None,
                     vb, b.cpu_us_per_req if b else None,
                     _value(plain, unit),
                     _value(same, unit) if same is not plain else "same" if plain else "-",
                     ratio])
    hdr = ["operation", "unit", "vfsd d=1", "µs/op d=1", f"vfsd d={depth}",
           f"daemon CPU µs/req d={depth}", "direct: plain", "direct: vfsd's syscalls",
           f"plain / vfsd d={depth}"]
    return ("Host microbenchmark (Python frontend -> vfsd, no VM; direct = same op by "
            "syscalls in one Python process)\n" + fmt_table(hdr, rows))


def report_reference(d1, dn, r1, rn, depth: int) -> str:
    """vfsd next to the C virtiofsd, same frontend, same share, same requests."""
    rows = []
    for key, label, _m, unit in FUSE_OPS:
        a, b, ra, rb = d1.get(key), dn.get(key), r1.get(key), rn.get(key)
        if a is None or ra is None:
            continue
        rows.append([label, a.us_per_op, ra.us_per_op, f"{a.us_per_op / ra.us_per_op:.2f}x",
                     a.cpu_us_per_req, ra.cpu_us_per_req,
                     b.cpu_us_per_req if b else None, rb.cpu_us_per_req if rb else None])
    hdr = ["operation", "µs/op d=1: vfsd", "virtiofsd", "vfsd / virtiofsd",
           "daemon CPU µs/req d=1: vfsd", "virtiofsd", f"d={depth}: vfsd", "virtiofsd"]
    return ("vfsd next to the C virtiofsd (the same frontend, share and requests; virtiofsd "
            "as root, -o cache=auto; its CPU is its whole session's)\n"
            + fmt_table(hdr, rows))


def report_variants(variants: dict, depth: int) -> str:
    keys = [k for k, *_ in FUSE_OPS if any(k in v for v in variants.values())]
    labels = {k: (lab, unit) for k, lab, _m, unit in FUSE_OPS}
    rows = []
    for name, res in variants.items():
        row = [name]
        for k in keys:
            f = res.get(k)
            row.append(None if f is None else
                       f"{_value(f, labels[k][1]):,.0f} ({f.cpu_us_per_req:.0f} µs)")
        rows.append(row)
    hdr = ["config"] + [f"{labels[k][0].split(' (')[0].split(',')[0]} {labels[k][1]}"
                        for k in keys]
    return (f"Thread pool and request queues (depth {depth} per queue; in brackets: daemon "
            "CPU per request)\n" + fmt_table(hdr, rows, "l" + "r" * len(keys)))
