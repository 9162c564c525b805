"""A FUSE client over virtio-fs queues, laid out the way Linux virtio_fs.c does it.

Each request is one descriptor chain: readable buffers `fuse_in_header`, each
input argument (and WRITE data), then writable buffers `fuse_out_header` and the
reply argument(s) (and READ data).  Queue 0 (hiprio) carries FORGET (and
INTERRUPT) with no reply; queues 1.. carry everything else.  With
VIRTIO_RING_F_INDIRECT_DESC negotiated the kernel puts multi-buffer chains in an
indirect table; `FuseClient.indirect` chooses (default: as negotiated).

`request()` is the raw call: it returns `Reply(error, payload)` where `error` is a
*positive* errno (0 on success) and `payload` the bytes after the out header.
The typed helpers raise `FuseError` on an error reply and return the reply
structs from `protocol.fuse` (namedtuples).  Any reply that breaks the FUSE
protocol (length mismatch, wrong unique, positive error) raises
`FuseProtocolError`: that is a daemon bug, not a filesystem error.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import threading
from typing import NamedTuple, Sequence

from protocol import fuse

from .frontend import F_RING_INDIRECT_DESC, Buffer, DriverQueue, Frontend, Timeout

Op = fuse.Opcode
IF = fuse.InitFlag

#: What a Linux 6.1 virtio-fs mount offers in FUSE_INIT (fs/fuse/inode.c
#: fuse_send_init, plus SUBMOUNTS which virtiofs enables), minus nothing.
LINUX_6_1_INIT_FLAGS = (
    IF.ASYNC_READ | IF.POSIX_LOCKS | IF.ATOMIC_O_TRUNC | IF.EXPORT_SUPPORT | IF.BIG_WRITES
    | IF.DONT_MASK | IF.SPLICE_WRITE | IF.SPLICE_MOVE | IF.SPLICE_READ | IF.FLOCK_LOCKS
    | IF.HAS_IOCTL_DIR | IF.AUTO_INVAL_DATA | IF.DO_READDIRPLUS | IF.READDIRPLUS_AUTO
    | IF.ASYNC_DIO | IF.WRITEBACK_CACHE | IF.NO_OPEN_SUPPORT | IF.PARALLEL_DIROPS
    | IF.HANDLE_KILLPRIV | IF.POSIX_ACL | IF.ABORT_ERROR | IF.MAX_PAGES | IF.CACHE_SYMLINKS
    | IF.NO_OPENDIR_SUPPORT | IF.EXPLICIT_INVAL_DATA | IF.HANDLE_KILLPRIV_V2
    | IF.SETXATTR_EXT | IF.INIT_EXT | IF.SECURITY_CTX | IF.SUBMOUNTS
)

_unique_lock = threading.Lock()
_unique = itertools.count(2, 2)  # the kernel steps by 2 (odd = interrupt)


def next_unique() -> int:
    with _unique_lock:
        return next(_unique)


class FuseError(OSError):
    """The daemon answered with an error (errno in `.errno`)."""

    def __init__(self, err: int, opcode: int):
        super().__init__(err, f"{os.strerror(err)} (FUSE op {opcode})")
        self.opcode = opcode


class FuseProtocolError(AssertionError):
    """The daemon's reply breaks the FUSE protocol."""


class Reply(tuple):
    """(error, payload), with `.header` (fuse_out_header) and `.used_len`."""

    def __new__(cls, error: int, payload: bytes, header=None, used_len: int = 0):
        self = super().__new__(cls, (error, payload))
        self.header = header
        self.used_len = used_len
        return self

    @property
    def error(self) -> int:
        return self[0]

    @property
    def payload(self) -> bytes:
        return self[1]


class DirEntry(NamedTuple):
    ino: int
    off: int
    type: int
    name: bytes


def _name(name: str | bytes) -> bytes:
    if isinstance(name, str):
        name = os.fsencode(name)
    return name + b"\0"


def parse_dirents(buf: bytes) -> list[DirEntry]:
    out = []
    pos = 0
    hs = fuse.fuse_dirent.size
    while pos + hs <= len(buf):
        d = fuse.fuse_dirent.unpack_from(buf, pos)
        name = buf[pos + hs:pos + hs + d.namelen]
        if len(name) != d.namelen:
            raise FuseProtocolError(f"dirent at {pos} runs past the reply ({d.namelen} byte name)")
        out.append(DirEntry(d.ino, d.off, d.type, bytes(name)))
        pos += fuse.dirent_align(hs + d.namelen)
    if pos < len(buf) and any(buf[pos:]):
        raise FuseProtocolError(f"{len(buf) - pos} trailing bytes after the last dirent")
    return out


class FuseClient:
    """FUSE requests over a `Frontend`'s queues (call `init()` first)."""

    def __init__(self, frontend: Frontend, queue: int = 1, hiprio: int = 0, *,
                 timeout: float = 5.0, indirect: bool | None = None,
                 uid: int = 0, gid: int = 0, pid: int | None = None):
        self.fe = frontend
        self.queue_index = queue
        self.hiprio_index = hiprio
        self.timeout = timeout
        self.indirect = bool(frontend.features & F_RING_INDIRECT_DESC) if indirect is None else indirect
        self.uid, self.gid = uid, gid
        self.pid = os.getpid() if pid is None else pid
        self.init_out = None
        self.minor = fuse.KERNEL_MINOR_VERSION

    @property
    def queue(self) -> DriverQueue:
        return self.fe.queues[self.queue_index]

    @property
    def hiprio(self) -> DriverQueue:
        return self.fe.queues[self.hiprio_index]

    # -- raw -------------------------------------------------------------------
    def in_header(self, opcode: int, nodeid: int, body_len: int, unique: int | None = None,
                  length: int | None = None, **kw) -> bytes:
        return fuse.fuse_in_header.pack(
            len=fuse.fuse_in_header.size + body_len if length is None else length,
            opcode=opcode, unique=next_unique() if unique is None else unique, nodeid=nodeid,
            uid=kw.get("uid", self.uid), gid=kw.get("gid", self.gid), pid=kw.get("pid", self.pid),
            total_extlen=kw.get("total_extlen", 0))

    def request(self, opcode: int, nodeid: int = 0, args: bytes | Sequence[bytes] = b"",
                out_size: int | Sequence[int] = 0, *, extra_readable: Sequence[bytes | Buffer] = (),
                queue: int | None = None, indirect: bool | None = None, timeout: float | None = None,
                header: bytes | None = None, length: int | None = None, check: bool = True,
                **hdr_kw) -> Reply:
        """Send one request and wait for its reply.

        `args` (one bytes or a list, one readable buffer each) follow the in
        header, then `extra_readable` (e.g. WRITE data).  `out_size` is the reply
        argument space (an int, or a list of sizes = several writable buffers);
        the out header gets its own 16-byte buffer first.  `header` replaces the
        packed fuse_in_header verbatim; `length` overrides its `len` field.
        """
        if isinstance(args, (bytes, bytearray, memoryview)):
            args = [bytes(args)] if args else []
        body_len = sum(len(a) for a in args) + sum(
            (b.length if isinstance(b, Buffer) else len(b)) for b in extra_readable)
        unique = next_unique()
        if header is None:
            header = self.in_header(opcode, nodeid, body_len, unique, length, **hdr_kw)
        else:
            unique = fuse.fuse_in_header.unpack_from(header).unique if len(header) >= 16 else unique
        outs = [out_size] if isinstance(out_size, int) else list(out_size)
        outs = [s for s in outs if s]
        writable = [fuse.fuse_out_header.size] + outs
        q = self.fe.queues[self.queue_index if queue is None else queue]
        used = q.submit([header, *args, *extra_readable], writable,
                        indirect=self.indirect if indirect is None else indirect,
                        timeout=self.timeout if timeout is None else timeout)
        return self._parse(opcode, unique, used, check)

    def _parse(self, opcode: int, unique: int, used, check: bool) -> Reply:
        data = b"".join(used.data)
        if used.len < fuse.fuse_out_header.size:
            raise FuseProtocolError(f"op {opcode}: used len {used.len} < out header")
        if used.len > len(data):
            raise FuseProtocolError(f"op {opcode}: used len {used.len} > writable space {len(data)}")
        oh = fuse.fuse_out_header.unpack_from(data)
        if check:
            if oh.len != used.len:
                raise FuseProtocolError(f"op {opcode}: out header len {oh.len} != used len {used.len}")
            if oh.unique != unique:
                raise FuseProtocolError(f"op {opcode}: reply unique {oh.unique} != {unique}")
            if oh.error > 0 or oh.error <= -4096:
                raise FuseProtocolError(f"op {opcode}: bad error value {oh.error}")
            if oh.error and oh.len != fuse.fuse_out_header.size:
                raise FuseProtocolError(f"op {opcode}: error reply with {oh.len - 16} payload bytes")
        return Reply(-oh.error, data[fuse.fuse_out_header.size:used.len], oh, used.len)

    def call(self, opcode: int, nodeid: int, args=b"", out_size=0, **kw) -> bytes:
        """`request()` that raises FuseError on an error reply and returns the payload."""
        err, payload = self.request(opcode, nodeid, args, out_size, **kw)
        if err:
            raise FuseError(err, opcode)
        return payload

    def send_hiprio(self, opcode: int, nodeid: int, args: bytes, *, wait: bool = True,
                    timeout: float | None = None, **hdr_kw):
        """Queue a no-reply request on the hiprio queue as one readable buffer
        (in header + args, as virtio_fs.c does).  Waits for its used element."""
        hdr = self.in_header(opcode, nodeid, len(args), **hdr_kw)
        q = self.hiprio
        if not wait:
            head = q.add([hdr + args])
            q.kick()
            return head
        return q.submit([hdr + args], [], timeout=self.timeout if timeout is None else timeout)

    # -- typed helpers -----------------------------------------------------------
    def init(self, minor: int = 38, flags: int = LINUX_6_1_INIT_FLAGS, max_readahead: int = 131072,
             major: int = fuse.KERNEL_VERSION):
        args = fuse.fuse_init_in.pack(major=major, minor=minor, max_readahead=max_readahead,
                                      flags=flags & 0xFFFFFFFF, flags2=flags >> 32)
        payload = self.call(Op.INIT, 0, args, fuse.fuse_init_out.size)
        if len(payload) < fuse.fuse_init_out.size:
            payload = payload + bytes(fuse.fuse_init_out.size - len(payload))
        self.init_out = fuse.fuse_init_out.unpack_from(payload)
        self.minor = min(minor, self.init_out.minor)
        return self.init_out

    def lookup(self, parent: int, name: str | bytes):
        """fuse_entry_out; a reply with nodeid 0 (a name that is not there, which
        the kernel caches for entry_valid) raises ENOENT, as the kernel does."""
        e = fuse.fuse_entry_out.unpack_from(
            self._exact(Op.LOOKUP, self.call(Op.LOOKUP, parent, _name(name), fuse.fuse_entry_out.size),
                        fuse.fuse_entry_out.size))
        if e.nodeid == 0:
            raise FuseError(errno.ENOENT, Op.LOOKUP)
        return e

    def getattr(self, nodeid: int, fh: int | None = None):
        args = fuse.fuse_getattr_in.pack(getattr_flags=0 if fh is None else fuse.GETATTR_FH,
                                         fh=fh or 0)
        return fuse.fuse_attr_out.unpack_from(
            self._exact(Op.GETATTR, self.call(Op.GETATTR, nodeid, args, fuse.fuse_attr_out.size),
                        fuse.fuse_attr_out.size))

    def mkdir(self, parent: int, name: str | bytes, mode: int = 0o755, umask: int = 0o022):
        args = [fuse.fuse_mkdir_in.pack(mode=mode | stat.S_IFDIR, umask=umask), _name(name)]
        return fuse.fuse_entry_out.unpack_from(
            self._exact(Op.MKDIR, self.call(Op.MKDIR, parent, args, fuse.fuse_entry_out.size),
                        fuse.fuse_entry_out.size))

    def create(self, parent: int, name: str | bytes, flags: int = os.O_RDWR | os.O_CREAT | os.O_EXCL,
               mode: int = 0o644, umask: int = 0o022):
        args = [fuse.fuse_create_in.pack(flags=flags, mode=mode | stat.S_IFREG, umask=umask), _name(name)]
        payload = self.call(Op.CREATE, parent, args,
                            [fuse.fuse_entry_out.size, fuse.fuse_open_out.size])
        self._exact(Op.CREATE, payload, fuse.fuse_entry_out.size + fuse.fuse_open_out.size)
        return (fuse.fuse_entry_out.unpack_from(payload),
                fuse.fuse_open_out.unpack_from(payload, fuse.fuse_entry_out.size))

    def open(self, nodeid: int, flags: int = os.O_RDWR):
        payload = self.call(Op.OPEN, nodeid, fuse.fuse_open_in.pack(flags=flags), fuse.fuse_open_out.size)
        return fuse.fuse_open_out.unpack_from(self._exact(Op.OPEN, payload, fuse.fuse_open_out.size))

    def opendir(self, nodeid: int, flags: int = os.O_RDONLY | os.O_DIRECTORY):
        payload = self.call(Op.OPENDIR, nodeid, fuse.fuse_open_in.pack(flags=flags), fuse.fuse_open_out.size)
        return fuse.fuse_open_out.unpack_from(self._exact(Op.OPENDIR, payload, fuse.fuse_open_out.size))

    def read(self, nodeid: int, fh: int, offset: int, size: int, *, chunk: int | None = None,
             indirect: bool | None = None, flags: int = os.O_RDWR) -> bytes:
        """READ `size` bytes; with `chunk`, the reply space is split into several
        writable descriptors of that size (as the kernel does with pages)."""
        args = fuse.fuse_read_in.pack(fh=fh, offset=offset, size=size, flags=flags)
        return self.call(Op.READ, nodeid, args, _split(size, chunk), indirect=indirect)

    def write(self, nodeid: int, fh: int, offset: int, data: bytes, *, chunk: int | None = None,
              indirect: bool | None = None, flags: int = os.O_RDWR) -> int:
        args = fuse.fuse_write_in.pack(fh=fh, offset=offset, size=len(data), flags=flags)
        pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)] if chunk else [data]
        payload = self.call(Op.WRITE, nodeid, args, fuse.fuse_write_out.size,
                            extra_readable=[p for p in pieces if p], indirect=indirect)
        return fuse.fuse_write_out.unpack_from(self._exact(Op.WRITE, payload, fuse.fuse_write_out.size)).size

    def release(self, nodeid: int, fh: int, flags: int = os.O_RDWR, opcode: int = Op.RELEASE) -> None:
        self.call(opcode, nodeid, fuse.fuse_release_in.pack(fh=fh, flags=flags), 0)

    def releasedir(self, nodeid: int, fh: int) -> None:
        self.release(nodeid, fh, os.O_RDONLY | os.O_DIRECTORY, Op.RELEASEDIR)

    def readdir(self, nodeid: int, fh: int, offset: int = 0, size: int = 4096) -> list[DirEntry]:
        args = fuse.fuse_read_in.pack(fh=fh, offset=offset, size=size, flags=os.O_RDONLY | os.O_DIRECTORY)
        return parse_dirents(self.call(Op.READDIR, nodeid, args, size))

    def listdir(self, nodeid: int, size: int = 4096) -> list[DirEntry]:
        """OPENDIR + READDIR until empty + RELEASEDIR."""
        fh = self.opendir(nodeid).fh
        out: list[DirEntry] = []
        offset = 0
        try:
            for _ in range(10000):
                batch = self.readdir(nodeid, fh, offset, size)
                if not batch:
                    return out
                out.extend(batch)
                offset = batch[-1].off
            raise FuseProtocolError("READDIR never ends")
        finally:
            self.releasedir(nodeid, fh)

    def unlink(self, parent: int, name: str | bytes) -> None:
        self.call(Op.UNLINK, parent, _name(name), 0)

    def rmdir(self, parent: int, name: str | bytes) -> None:
        self.call(Op.RMDIR, parent, _name(name), 0)

    def forget(self, nodeid: int, nlookup: int = 1, wait: bool = True):
        """FORGET on the hiprio queue: no reply, but the chain must be returned."""
        return self.send_hiprio(Op.FORGET, nodeid, fuse.fuse_forget_in.pack(nlookup=nlookup), wait=wait)

    @staticmethod
    def _exact(opcode: int, payload: bytes, size: int) -> bytes:
        if len(payload) != size:
            raise FuseProtocolError(f"op {opcode}: reply payload {len(payload)} bytes, expected {size}")
        return payload


def _split(size: int, chunk: int | None) -> list[int]:
    if not chunk:
        return [size]
    return [min(chunk, size - i) for i in range(0, size, chunk)]


__all__ = ["FuseClient", "FuseError", "FuseProtocolError", "Reply", "DirEntry", "parse_dirents",
           "LINUX_6_1_INIT_FLAGS", "Timeout", "next_unique"]
