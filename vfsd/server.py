"""The FUSE session: INIT negotiation, request decoding, dispatch, replies.

This is the only module that sees FUSE bytes.  A transport hands it one
request as the device-readable and device-writable buffers of a descriptor
chain (`handle_views`), or as a `Reader` and a `Writer` over them (`handle`);
it calls one method of the filesystem per opcode with typed arguments and
encodes the typed reply.  Filesystem errors arrive as
`OSError(errno)` and leave as `fuse_out_header.error = -errno`; anything else
that escapes is a bug, logged with the opcode and unique id and answered EIO.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import struct
import threading
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Sequence

from protocol import fuse
from protocol.buffers import BufferError_, Reader, Writer

from .fsapi import NOW, Attr, Ctx, Entry, SetAttr, new_ctx
from .grace import DeferredClose
from .readahead import ReaddirplusReadahead, Spoiled

log = logging.getLogger(__name__)

NAME_MAX = 255
_U64 = (1 << 64) - 1
_NO_ID = 0xFFFFFFFF  # (uid_t)-1
_NO_ENTRY = (0,) * len(fuse.fuse_entry_out.flat_fields)
_PAD = [b"\0" * n for n in range(8)]   # a dirent's padding to FUSE_DIRENT_ALIGN


def _s64(v: int) -> int:
    """A u64 field carrying a signed value: fuse_attr/fuse_setattr_in times
    (before 1970 negative), fuse_lseek_in.offset (lseek(2)'s off_t)."""
    return v - (1 << 64) if v >= 1 << 63 else v


def _loff(v: int) -> int:
    """A file offset or length from a u64 field: the guest kernel's loff_t,
    which its VFS never lets go negative before a filesystem sees it
    (rw_verify_area, vfs_fallocate, do_truncate, generic_copy_file_checks).
    One at 2^63 or above would reach the host negative, where preadv2(2) and
    pwritev2(2) take -1 as "the fd's own position": EINVAL, which the guest's
    VFS and the host give any other negative offset."""
    if v >= 1 << 63:
        raise OSError(errno.EINVAL, f"offset or length {v} is negative as loff_t")
    return v


PATH_MAX = 4096
IN_HEADER = fuse.fuse_in_header.size
OUT_HEADER = fuse.fuse_out_header.size
# fuse_in_header as a plain tuple (every request: no namedtuple built), and
# the positions of its fields in fuse_in_header.flat_fields order.
_unpack_in_header = fuse.fuse_in_header.flat_unpack
(_LEN, _OPCODE, _UNIQUE, _NODEID, _UID, _GID, _PID, _TOTAL_EXTLEN) = (
    fuse.fuse_in_header.flat_fields.index(f) for f in
    ("len", "opcode", "unique", "nodeid", "uid", "gid", "pid", "total_extlen"))
_pack_out_header = fuse.fuse_out_header.flat_pack
_pack_out_header_into = fuse.fuse_out_header.flat_pack_into
_unpack_in_header_from = fuse.fuse_in_header.flat_unpack_from
_pack_entry_out = fuse.fuse_entry_out.flat_pack
_DEBUG = logging.DEBUG
_IDLE = DeferredClose.IDLE

NO_REPLY = fuse.NO_REPLY

# Opcodes that change nothing a directory listing shows (names, attributes,
# the guest's owner and mode); every other request moves the server's
# change mark, which spoils a READDIRPLUS batch made ahead (vfsd.readahead).
# OPEN truncates nothing: ATOMIC_O_TRUNC is not offered, so the guest sends a
# SETATTR for O_TRUNC (and the filesystem drops the flag).  A READ may move the
# host's atime (under relatime at most once a day, or after a write); a batch
# made before it shows the atime of before, the one exception to the rule.
_UNCHANGING = frozenset({
    fuse.Opcode.LOOKUP, fuse.Opcode.FORGET, fuse.Opcode.BATCH_FORGET, fuse.Opcode.GETATTR,
    fuse.Opcode.READLINK, fuse.Opcode.OPEN, fuse.Opcode.READ, fuse.Opcode.STATFS,
    fuse.Opcode.RELEASE, fuse.Opcode.FSYNC, fuse.Opcode.GETXATTR, fuse.Opcode.LISTXATTR,
    fuse.Opcode.FLUSH, fuse.Opcode.OPENDIR, fuse.Opcode.READDIR, fuse.Opcode.RELEASEDIR,
    fuse.Opcode.FSYNCDIR, fuse.Opcode.GETLK, fuse.Opcode.ACCESS, fuse.Opcode.INTERRUPT,
    fuse.Opcode.READDIRPLUS, fuse.Opcode.LSEEK, fuse.Opcode.SYNCFS,
})

#: The longest a READDIRPLUS batch made ahead may wait for its request, and the
#: part of the entry and attribute timeouts it may take at most (vfsd.readahead).
READAHEAD_MAX_AGE = 0.05
READAHEAD_TIMEOUT_SHARE = 0.1


# The flag words as plain ints for tests made on every request: `int & IntFlag`
# builds an enum member each time (about a microsecond in 3.11).
_V = SimpleNamespace(**{m.name: int(m) for m in fuse.SetattrValid})
_F = SimpleNamespace(**{m.name: int(m) for m in fuse.InitFlag})
_FOPEN_NOFLUSH = int(fuse.OpenFlag.NOFLUSH)


def _op_name(opcode: int) -> str:
    """The opcode's name for a log line (the number if fuse.h has none)."""
    try:
        return fuse.Opcode(opcode).name
    except ValueError:
        return str(opcode)


@dataclass(frozen=True)
class SessionOptions:
    """What the server tells the guest kernel about caching and features."""

    entry_timeout: float = 1.0
    attr_timeout: float = 1.0
    direct_io: bool = False  # cache=never: FOPEN_DIRECT_IO on every open
    keep_cache: bool = False  # cache=always: FOPEN_KEEP_CACHE / FOPEN_CACHE_DIR
    readdirplus: bool = True
    # Make the next READDIRPLUS batch of a listing while the guest reads the
    # last (vfsd.readahead); only with nonzero entry and attribute timeouts.
    readdirplus_readahead: bool = True
    writeback: bool = False
    max_write: int = 1 << 20
    max_pages: int = 256
    xattr: bool = True  # guest xattrs (GETXATTR & co.); records exist regardless
    posix_acl: bool = True  # FUSE_POSIX_ACL: the guest kernel enforces ACLs (needs xattr)
    security_label: bool = False  # FUSE_SECURITY_CTX: labels set atomically at creation
    killpriv_v2: bool = False  # FUSE_HANDLE_KILLPRIV_V2: the server clears suid/sgid/caps
    announce_submounts: bool = False  # FUSE_SUBMOUNTS: mount points inside the share
    allow_mmap: bool = False  # FUSE_DIRECT_IO_ALLOW_MMAP with cache=never


class ProtocolError(Exception):
    """A request that does not parse; answered EINVAL."""


# What decoding a malformed request raises (answered EINVAL, logged as malformed).
_MALFORMED = (ProtocolError, BufferError_, struct.error, UnicodeError)


def _split_seconds(t: float) -> tuple[int, int]:
    sec = int(t)
    return sec, int((t - sec) * 1e9)


class FuseServer:
    def __init__(self, fs, options: SessionOptions | None = None):
        self.fs = fs
        self.opts = options or SessionOptions()
        self.initialized = False
        self.proto_minor = 0
        self.flags = 0  # negotiated InitFlag bits
        self._lock = threading.Lock()
        self._file_open_flags = self._open_flags(is_dir=False)
        self._dir_open_flags = self._open_flags(is_dir=True)
        self._entry_valid = _split_seconds(self.opts.entry_timeout)
        self._attr_valid = _split_seconds(self.opts.attr_timeout)
        # Moved (to a value never used before) after every request that may
        # change the share, before its reply: see _UNCHANGING.
        self.change_mark = 0
        self._change_marks = itertools.count(1)
        max_age = min(READAHEAD_MAX_AGE, READAHEAD_TIMEOUT_SHARE * self.opts.entry_timeout,
                      READAHEAD_TIMEOUT_SHARE * self.opts.attr_timeout)
        # Every request, and every READDIRPLUS batch made ahead, is bracketed
        # for the filesystem's grace: it closes fds that a running request may
        # still use only after that request (vfsd/grace.py).
        self._grace = getattr(fs, "grace", None) or DeferredClose()
        self._readahead = (ReaddirplusReadahead(self._plus_batch, self._forget_nodes,
                                                lambda: self.change_mark, max_age,
                                                self._batch_ahead)
                           if self.opts.readdirplus and self.opts.readdirplus_readahead
                           and max_age > 0 else None)
        # LOOKUP of a name that is not there: fuse_entry_out with nodeid 0 is
        # ENOENT "but with valid timeout" (fs/fuse/dir.c, fuse_lookup_name), a
        # negative dentry the guest keeps as long as a positive one.
        self._negative_entry = (fuse.fuse_entry_out.pack(
            entry_valid=self._entry_valid[0], entry_valid_nsec=self._entry_valid[1])
            if self.opts.entry_timeout > 0 else None)
        # Handlers of requests whose arguments are fixed structs and names:
        # they get the arguments as one bytes-like object, and `handle_views`
        # can serve them straight from the guest's buffers.  The guest kernel
        # sends these most (a tar, chown -R or rm -r: LOOKUP, GETATTR,
        # SETATTR, FORGET, RELEASE, UNLINK, CREATE, OPEN), and the no-reply
        # ones must be here too (`_no_reply`).
        self._last_ctx = new_ctx((0, 0, 0, ()))  # handle_views: the last caller's Ctx
        self._arg_handlers: dict[int, Callable[[Ctx | None, int, bytes | memoryview],
                                               bytes | None]] = {
            fuse.Opcode.LOOKUP: self._lookup,
            fuse.Opcode.FORGET: self._forget,
            fuse.Opcode.BATCH_FORGET: self._batch_forget,
            fuse.Opcode.INTERRUPT: self._interrupt,
            fuse.Opcode.GETATTR: self._getattr,
            fuse.Opcode.SETATTR: self._setattr,
            fuse.Opcode.MKDIR: self._mkdir,
            fuse.Opcode.UNLINK: self._unlink,
            fuse.Opcode.RMDIR: self._rmdir,
            fuse.Opcode.OPEN: self._open,
            fuse.Opcode.CREATE: self._create,
            fuse.Opcode.RELEASE: self._release,
            fuse.Opcode.FLUSH: self._flush,
            fuse.Opcode.OPENDIR: self._opendir,
            fuse.Opcode.RELEASEDIR: self._releasedir,
            fuse.Opcode.ACCESS: self._access,
        }
        # The rest read their arguments through the Reader (data, directory
        # listings, variable layouts) or write the reply through the Writer.
        self._handlers: dict[int, Callable[[Ctx, int, Reader, Writer], bytes | int | None]] = {
            fuse.Opcode.READLINK: self._readlink,
            fuse.Opcode.SYMLINK: self._symlink,
            fuse.Opcode.MKNOD: self._mknod,
            fuse.Opcode.RENAME: self._rename,
            fuse.Opcode.RENAME2: self._rename2,
            fuse.Opcode.LINK: self._link,
            fuse.Opcode.READ: self._read,
            fuse.Opcode.WRITE: self._write,
            fuse.Opcode.STATFS: self._statfs,
            fuse.Opcode.FSYNC: self._fsync,
            fuse.Opcode.READDIR: self._readdir,
            fuse.Opcode.READDIRPLUS: self._readdirplus,
            fuse.Opcode.FSYNCDIR: self._fsyncdir,
            fuse.Opcode.FALLOCATE: self._fallocate,
            fuse.Opcode.LSEEK: self._lseek,
            fuse.Opcode.COPY_FILE_RANGE: self._copy_file_range,
            fuse.Opcode.SYNCFS: self._syncfs,
            fuse.Opcode.TMPFILE: self._tmpfile,
            fuse.Opcode.DESTROY: self._destroy,
        }

    # ------------------------------------------------------------------
    # Entry point
    # ------------------------------------------------------------------
    def handle_views(self, readable: Sequence[memoryview], writable: Sequence[memoryview],
                     readable_len: int, writable_len: int) -> int:
        """Serve one request held in a descriptor chain's buffers (byte views,
        with their summed lengths); returns the number of bytes written.

        Linux's virtio-fs lays a request out as fuse_in_header in a buffer of
        its own, then the arguments in one buffer, then any data pages, and
        the reply as fuse_out_header in a buffer of its own, then the reply
        arguments in one buffer (fs/fuse/virtio_fs.c, virtio_fs_enqueue_req;
        a FORGET on the hiprio queue is one buffer, header and arguments).
        A request of that shape for an `_arg_handlers` opcode is served
        straight from those buffers; anything else, and every request while
        requests are logged, goes through `handle`, which takes any layout.
        The result is the same either way: this only skips the cursors and
        the general dispatch, which with the daemon's caches cold between
        requests cost a third of a GETATTR's CPU (docs/performance.md).
        """
        # (DeferredClose.enter and .leave, inlined: this runs per request)
        grace = self._grace
        try:
            slot = grace.local.slot
        except AttributeError:
            slot = grace.new_slot()
        slot.epoch = grace.epoch
        try:
            r0 = readable[0] if readable else b""
            if len(r0) >= IN_HEADER and self.initialized:
                if len(r0) > IN_HEADER:
                    args = r0[IN_HEADER:]
                else:
                    args = readable[1] if len(readable) > 1 else b""
                h = _unpack_in_header_from(r0)
                length, opcode, unique, nodeid, uid, gid, pid, total_extlen, _ = h
                handler = self._arg_handlers.get(opcode)
                # The arguments must be all of the request by fuse_in_header.len
                # (else `handle` judges the length; buffers past it are ignored
                # either way), and extensions carry what only `_dispatch` reads.
                if (handler is not None and length == IN_HEADER + len(args)
                        and not total_extlen and not log.isEnabledFor(_DEBUG)):
                    if opcode in NO_REPLY:
                        self._no_reply(handler, opcode, h, args)
                        return 0
                    if 1 <= len(writable) <= 2 and len(writable[0]) == OUT_HEADER:
                        # The reply: its arguments go to the second writable
                        # buffer, the header to the first.  (Here, not in a
                        # method of its own: a call is a sizeable part of a
                        # request's CPU; docs/performance.md.)
                        # The caller is most often the one of the previous
                        # request (one process at work): its Ctx is reused.
                        ctx = self._last_ctx
                        if ctx[2] != pid or ctx[0] != uid or ctx[1] != gid:
                            self._last_ctx = ctx = new_ctx((uid, gid, pid, ()))
                        try:
                            body = handler(ctx, nodeid, args)
                            n = len(body)
                            room = len(writable[1]) if len(writable) == 2 else 0
                            if n > room:
                                error, n = self._no_room(opcode, h, n, room), 0
                            else:
                                if n:
                                    writable[1][:n] = body
                                error = 0
                        except Exception as e:
                            error, n = self._error(e, opcode, h), 0
                        if opcode not in _UNCHANGING:
                            self.change_mark = next(self._change_marks)
                        _pack_out_header_into(writable[0], 0, OUT_HEADER + n, -error, unique)
                        return OUT_HEADER + n
            return self._serve(Reader(readable, None, readable_len),
                               Writer(writable, writable_len))
        finally:
            slot.epoch = _IDLE
            if grace.retired:
                grace.reclaim()

    def handle(self, reader: Reader, writer: Writer) -> int:
        """Serve one request; returns the number of bytes written to `writer`."""
        self._grace.enter()
        try:
            return self._serve(reader, writer)
        finally:
            self._grace.leave()

    def _serve(self, reader: Reader, writer: Writer) -> int:
        """`handle`, inside the request's bracket.

        This runs once per request, so it works on the plain header tuple and
        looks the handler up by the raw opcode; names are only made for logs.
        """
        total = reader.remaining
        if total < IN_HEADER:
            log.warning("request of %d bytes is shorter than fuse_in_header; dropped", total)
            return 0
        h = _unpack_in_header(reader.read(IN_HEADER))
        opcode = h[_OPCODE]
        if opcode in NO_REPLY:
            self._dispatch_no_reply(opcode, h, reader, total)
            return 0
        if writer.room < OUT_HEADER:
            log.warning("%s unique=%d: no room for a reply (%d writable bytes); dropped",
                        _op_name(opcode), h[_UNIQUE], writer.room)
            return 0
        header_views = writer.views(OUT_HEADER)
        try:
            body = self._dispatch(opcode, h, reader, writer, total)
            error = 0
        except Exception as e:
            body, error = b"", self._error(e, opcode, h)
        if opcode not in _UNCHANGING:
            self.change_mark = next(self._change_marks)
        if error:
            length = OUT_HEADER
        elif body.__class__ is int:  # data already placed in the writer
            length = OUT_HEADER + body
        elif len(body) > writer.room:
            error, length = self._no_room(opcode, h, len(body), writer.room), OUT_HEADER
        else:
            if body:
                writer.write(body)
            length = OUT_HEADER + len(body)
        out = _pack_out_header(length, -error, h[_UNIQUE])
        if len(header_views) == 1:  # the guest's header buffer is one piece (usual)
            header_views[0][:] = out
        else:
            pos = 0
            for v in header_views:
                v[:] = out[pos:pos + len(v)]
                pos += len(v)
        return length

    @staticmethod
    def _error(e: Exception, opcode: int, h: tuple) -> int:
        """The errno answering a request that raised `e` (from its except block)."""
        if isinstance(e, OSError):
            return e.errno or errno.EIO
        if isinstance(e, _MALFORMED):
            log.warning("%s unique=%d nodeid=%d: malformed request: %s",
                        _op_name(opcode), h[_UNIQUE], h[_NODEID], e)
            return errno.EINVAL
        log.exception("%s unique=%d nodeid=%d: internal error",
                      _op_name(opcode), h[_UNIQUE], h[_NODEID])
        return errno.EIO

    @staticmethod
    def _no_room(opcode: int, h: tuple, size: int, room: int) -> int:
        log.warning("%s unique=%d: reply of %d bytes does not fit in %d; EIO",
                    _op_name(opcode), h[_UNIQUE], size, room)
        return errno.EIO

    def _bound(self, h: tuple, reader: Reader, total: int) -> bytes:
        """Trust neither the chain nor fuse_in_header.len alone (lying lengths).
        Returns the 7.38 extension area, which follows the arguments."""
        length = h[_LEN]
        if length > total or length < IN_HEADER:
            raise ProtocolError(f"fuse_in_header.len {length} but request holds {total} bytes")
        reader.limit(length - IN_HEADER)
        extlen = h[_TOTAL_EXTLEN]
        if not extlen:
            return b""
        ext = extlen * 8
        if ext > reader.remaining:
            raise ProtocolError(f"total_extlen {ext} exceeds the request")
        return reader.take_tail(ext)

    def _secctx(self, ext: bytes) -> tuple[tuple[bytes, bytes], ...]:
        """The security contexts in a request's extensions (FUSE_SECURITY_CTX)."""
        if not ext or not self.flags & _F.SECURITY_CTX:
            return ()
        out = []
        off = 0
        while off < len(ext):
            hdr = fuse.fuse_ext_header.unpack_from(ext, off)
            if hdr.size < fuse.fuse_ext_header.size or off + hdr.size > len(ext):
                raise ProtocolError(f"extension of {hdr.size} bytes at {off}")
            if hdr.type <= fuse.MAX_NR_SECCTX:  # a fuse_secctx_header
                pos, end = off + fuse.fuse_secctx_header.size, off + hdr.size
                for _ in range(hdr.type):
                    sc = fuse.fuse_secctx.unpack_from(ext, pos)
                    pos += fuse.fuse_secctx.size
                    nul = ext.find(b"\0", pos, end)
                    if nul < 0 or nul + 1 + sc.size > end:
                        raise ProtocolError("malformed security context")
                    out.append((ext[pos:nul], ext[nul + 1:nul + 1 + sc.size]))
                    pos = fuse.dirent_align(nul + 1 + sc.size)
            off += hdr.size
        return tuple(out)

    def _dispatch(self, opcode: int, h: tuple, reader: Reader, writer: Writer, total: int):
        ext = self._bound(h, reader, total)
        handler = self._arg_handlers.get(opcode)
        by_args = handler is not None
        if not by_args:
            handler = self._handlers.get(opcode)
        if handler is None or not self.initialized:
            if opcode == fuse.Opcode.INIT:
                return self._init(reader)
            if not self.initialized:
                # libfuse and virtiofsd answer EIO to anything before INIT.
                raise OSError(errno.EIO, "request before INIT")
            if log.isEnabledFor(logging.DEBUG):
                log.debug("opcode %s unique=%d: not implemented (ENOSYS)",
                          _op_name(opcode), h[_UNIQUE])
            raise OSError(errno.ENOSYS, "not implemented")
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s unique=%d nodeid=%d uid=%d gid=%d pid=%d len=%d",
                      _op_name(opcode), h[_UNIQUE], h[_NODEID], h[_UID], h[_GID], h[_PID],
                      h[_LEN])
        ctx = Ctx(h[_UID], h[_GID], h[_PID], self._secctx(ext)) if ext else \
            Ctx(h[_UID], h[_GID], h[_PID])
        if by_args:
            return handler(ctx, h[_NODEID], reader.read_rest())
        return handler(ctx, h[_NODEID], reader, writer)

    def _dispatch_no_reply(self, opcode: int, h: tuple, reader: Reader, total: int) -> None:
        try:
            self._bound(h, reader, total)
            args = reader.read_rest()
        except _MALFORMED as e:
            log.warning("%s unique=%d: malformed request: %s", _op_name(opcode), h[_UNIQUE], e)
            return
        if self.initialized:
            self._no_reply(self._arg_handlers[opcode], opcode, h, args)

    @staticmethod
    def _no_reply(handler, opcode: int, h: tuple, args) -> None:
        """Run a request that gets no reply: its failures can only be logged."""
        try:
            # (no caller context: forgetting and interrupting act for nobody;
            # the guest sends thousands of FORGETs, one chain each)
            handler(None, h[_NODEID], args)
        except _MALFORMED as e:
            log.warning("%s unique=%d: malformed request: %s", _op_name(opcode), h[_UNIQUE], e)
        except OSError as e:
            log.debug("%s unique=%d: %s", _op_name(opcode), h[_UNIQUE], e)
        except Exception:
            log.exception("%s unique=%d: internal error", _op_name(opcode), h[_UNIQUE])

    # ------------------------------------------------------------------
    # Encoding helpers
    # ------------------------------------------------------------------
    def _attr_values(self, a: Attr) -> tuple:
        """fuse_attr in flat_pack order (fuse_attr.flat_fields).  FUSE_ATTR_SUBMOUNT
        only goes out when the guest negotiated FUSE_SUBMOUNTS."""
        # (one unpacking, not a lookup per field: this runs for every reply
        # with attributes, and for each READDIRPLUS entry)
        ino, size, blocks, atime_ns, mtime_ns, ctime_ns, mode, nlink, uid, gid, dev, blksize, \
            submount = a
        asec, ans = divmod(atime_ns, 1_000_000_000)
        msec, mns = divmod(mtime_ns, 1_000_000_000)
        csec, cns = divmod(ctime_ns, 1_000_000_000)
        if dev:  # glibc's dev_t to the 32 bits fuse_attr.rdev holds (Linux new_encode_dev)
            major, minor = (dev >> 8) & 0xFFF, (dev & 0xFF) | ((dev >> 12) & 0xFFF00)
            dev = ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF
        return (ino, size, blocks, asec & _U64, msec & _U64, csec & _U64, ans, mns, cns,
                mode, nlink, uid, gid, dev, blksize,
                fuse.ATTR_SUBMOUNT if submount and self.flags & _F.SUBMOUNTS else 0)

    def _entry(self, e: Entry) -> bytes:
        """fuse_entry_out (also the head of each fuse_direntplus: _readdirplus)."""
        ev, av = self._entry_valid, self._attr_valid
        return _pack_entry_out(e[0], e[1], ev[0], av[0], ev[1], av[1], *self._attr_values(e[2]))

    def _attr_out(self, a: Attr) -> bytes:
        return fuse.fuse_attr_out.flat_pack(self._attr_valid[0], self._attr_valid[1], 0,
                                            *self._attr_values(a))

    def _open_out(self, o, is_dir: bool) -> bytes:
        """fuse_open_out: the filesystem's FOPEN_* flags plus the cache policy's."""
        flags = o.open_flags | (self._dir_open_flags if is_dir else self._file_open_flags)
        if o.noflush:
            flags |= _FOPEN_NOFLUSH
        return fuse.fuse_open_out.flat_pack(o.fh, flags, 0)

    def _open_flags(self, is_dir: bool) -> int:
        flags = 0
        if self.opts.direct_io and not is_dir:
            flags |= fuse.OpenFlag.DIRECT_IO
        if self.opts.keep_cache:
            flags |= fuse.OpenFlag.CACHE_DIR if is_dir else fuse.OpenFlag.KEEP_CACHE
        return int(flags)

    # ------------------------------------------------------------------
    # Session
    # ------------------------------------------------------------------
    def _init(self, reader: Reader) -> bytes:
        n = reader.remaining
        if n < fuse.COMPAT_INIT_IN_SIZE:
            raise ProtocolError(f"fuse_init_in of {n} bytes")
        raw = reader.read(min(n, fuse.fuse_init_in.size)).ljust(fuse.fuse_init_in.size, b"\0")
        arg = fuse.fuse_init_in.unpack(raw)
        if arg.major != fuse.KERNEL_VERSION:
            log.error("INIT: guest speaks FUSE %d.%d; only major %d is supported",
                      arg.major, arg.minor, fuse.KERNEL_VERSION)
            raise OSError(errno.EPROTO, "unsupported FUSE major")
        if arg.minor < fuse.MIN_MINOR_VERSION:
            log.error("INIT: guest speaks FUSE 7.%d; vfsd needs at least 7.%d",
                      arg.minor, fuse.MIN_MINOR_VERSION)
            raise OSError(errno.EPROTO, "FUSE minor too old")
        offered = arg.flags
        if offered & fuse.InitFlag.INIT_EXT and n >= fuse.fuse_init_in.size:
            offered |= arg.flags2 << 32
        F = fuse.InitFlag
        wanted = (F.ASYNC_READ | F.PARALLEL_DIROPS | F.MAX_PAGES | F.BIG_WRITES
                  | F.AUTO_INVAL_DATA | F.INIT_EXT)
        if self.opts.readdirplus:
            wanted |= F.DO_READDIRPLUS | F.READDIRPLUS_AUTO
        if self.opts.writeback:
            wanted |= F.WRITEBACK_CACHE
        if self.opts.xattr and self.opts.posix_acl:
            # The guest kernel enforces ACLs and hands us the umask
            # (DONT_MASK) so that default ACLs can replace it; SETXATTR_EXT
            # carries FUSE_SETXATTR_ACL_KILL_SGID.
            wanted |= F.POSIX_ACL | F.DONT_MASK | F.SETXATTR_EXT
        if self.opts.killpriv_v2:
            wanted |= F.HANDLE_KILLPRIV_V2
        if self.opts.security_label and self.opts.xattr and arg.minor >= 38:
            # Only the 7.38 form (an extension counted in total_extlen) is
            # understood; 7.36/37 kernels append the context unannounced.
            wanted |= F.SECURITY_CTX
        if self.opts.announce_submounts:
            wanted |= F.SUBMOUNTS
        if self.opts.allow_mmap:
            wanted |= F.DIRECT_IO_ALLOW_MMAP
        flags = int(wanted) & offered
        minor = min(arg.minor, fuse.KERNEL_MINOR_VERSION)
        if self.initialized:
            # A rebooted guest starts a new session on the same device
            # without DESTROY: forget everything the old one held.
            log.info("INIT on a live session: resetting it")
            self._end_listings()
            self.fs.destroy()
        with self._lock:
            self.flags = flags
            self.proto_minor = minor
            self.initialized = True
            self._install_xattr_handlers(bool(self.opts.xattr))
        log.info("INIT: guest FUSE 7.%d, replying 7.%d; flags offered %#x, accepted %#x",
                 arg.minor, minor, offered, flags)
        return fuse.fuse_init_out.pack(
            major=fuse.KERNEL_VERSION, minor=minor,
            max_readahead=arg.max_readahead, flags=flags & 0xFFFFFFFF,
            flags2=flags >> 32,
            max_write=self.opts.max_write, time_gran=1,
            max_pages=self.opts.max_pages if flags & F.MAX_PAGES else 0,
        )

    def _install_xattr_handlers(self, on: bool) -> None:
        ops = {fuse.Opcode.GETXATTR: self._getxattr, fuse.Opcode.SETXATTR: self._setxattr,
               fuse.Opcode.LISTXATTR: self._listxattr,
               fuse.Opcode.REMOVEXATTR: self._removexattr}
        for op, fn in ops.items():
            if on:
                self._handlers[op] = fn
            else:  # xattrs off (the default, as in virtiofsd): ENOSYS, and the guest
                # kernel stops asking
                self._handlers.pop(op, None)

    def _server_kills_caps(self) -> bool:
        """Whether file capabilities must be dropped here on every write: with
        HANDLE_KILLPRIV_V2 the guest kernel leaves it to us, and its direct-I/O
        write path (cache=never) never drops them."""
        return bool(self.flags & _F.HANDLE_KILLPRIV_V2) or self.opts.direct_io

    def _v2_kill(self, ctx: Ctx) -> dict:
        """fallocate/copy_file_range under HANDLE_KILLPRIV_V2 carry no kill flag:
        clear suid/sgid for callers without CAP_FSETID (approximated as
        non-root: FUSE does not send capabilities) and capabilities always."""
        if not self.flags & _F.HANDLE_KILLPRIV_V2:
            return {}
        return dict(kill_suidgid=ctx.uid != 0, kill_caps=True)

    def _end_listings(self) -> None:
        if self._readahead is not None:
            self._readahead.drop_all()

    def _umask(self, umask: int) -> int:
        """The umask the filesystem must apply: only with DONT_MASK, else the
        guest kernel has applied it already."""
        return umask if self.flags & _F.DONT_MASK else 0

    def working_elsewhere(self) -> bool:
        """Whether the server is doing work on a thread of its own now (a
        READDIRPLUS batch made ahead), which a thread that keeps the GIL busy
        would hold up."""
        return self._readahead is not None and self._readahead.making > 0

    def reset(self) -> None:
        """The device was reset or the frontend left: end the session."""
        with self._lock:
            was, self.initialized = self.initialized, False
        if was:
            self._end_listings()
            self.fs.destroy()

    def _destroy(self, ctx, nodeid, reader, writer) -> bytes:
        with self._lock:
            self.initialized = False
        self._end_listings()
        self.fs.destroy()
        log.info("DESTROY: session ended by the guest")
        return b""

    def _interrupt(self, ctx, nodeid, args) -> None:
        # Requests here run to completion (host syscalls cannot be cancelled),
        # so an interrupt only means the guest stops waiting; nothing to do.
        arg = fuse.fuse_interrupt_in.unpack_from(args)
        log.debug("INTERRUPT of unique=%d (requests are not interruptible)", arg.unique)

    # ------------------------------------------------------------------
    # Nodes
    # ------------------------------------------------------------------
    # `args` (of the `_arg_handlers`) may be a view of guest memory, which the
    # guest can change at any time: each field is read from it once (struct
    # unpacking, or one copy of a name) and checked after that.
    def _lookup(self, ctx, nodeid, args) -> bytes:
        name = _parse_name(args)
        try:
            return self._entry(self.fs.lookup(ctx, nodeid, name))
        except FileNotFoundError:
            if self._negative_entry is None:
                raise
            return self._negative_entry

    def _forget(self, ctx, nodeid, args) -> None:
        (nlookup,) = fuse.fuse_forget_in.flat_unpack_from(args)
        self.fs.forget(nodeid, nlookup)

    def _batch_forget(self, ctx, nodeid, args) -> None:
        count, _ = fuse.fuse_batch_forget_in.flat_unpack_from(args)
        one, start = fuse.fuse_forget_one, fuse.fuse_batch_forget_in.size
        if start + count * one.size > len(args):
            raise ProtocolError(f"BATCH_FORGET count {count} exceeds the request")
        self.fs.batch_forget([one.unpack_from(args, start + i * one.size)
                              for i in range(count)])

    def _getattr(self, ctx, nodeid, args) -> bytes:
        fh = None
        if len(args) >= fuse.fuse_getattr_in.size:
            flags, _, afh = fuse.fuse_getattr_in.flat_unpack_from(args)
            if flags & fuse.GETATTR_FH:
                fh = afh
        return self._attr_out(self.fs.getattr(ctx, nodeid, fh))

    def _setattr(self, ctx, nodeid, args) -> bytes:
        # fuse_setattr_in as a plain tuple: tar and chown -R send thousands
        (v, _, fh, size, _, atime, mtime, _, atimensec, mtimensec, _, mode, _, uid, gid,
         _) = fuse.fuse_setattr_in.flat_unpack_from(args)
        V = _V
        if (uid == _NO_ID or gid == _NO_ID) and (
                v & V.UID and uid == _NO_ID or v & V.GID and gid == _NO_ID):
            # chown(2)'s "leave unchanged", which the guest's VFS turns into no
            # ATTR_UID/ATTR_GID before any filesystem sees it: never an owner.
            raise OSError(errno.EINVAL, "SETATTR to owner or group (u32)-1")
        if v & V.ATIME:
            atime = NOW if v & V.ATIME_NOW else _s64(atime) * 1_000_000_000 + atimensec
        else:
            atime = None
        if v & V.MTIME:
            mtime = NOW if v & V.MTIME_NOW else _s64(mtime) * 1_000_000_000 + mtimensec
        else:
            mtime = None
        changes = SetAttr(  # (positional, in SetAttr's field order)
            mode & 0o7777 if v & V.MODE else None,
            uid if v & V.UID else None,
            gid if v & V.GID else None,
            _loff(size) if v & V.SIZE else None,
            atime, mtime,
            fh if v & V.FH else None,
            # HANDLE_KILLPRIV_V2: the server clears suid/sgid/caps on chown
            # itself, and on truncate when the kernel flags it.
            bool(v & V.KILL_SUIDGID) or bool(
                self.flags & _F.HANDLE_KILLPRIV_V2 and v & (V.UID | V.GID)))
        return self._attr_out(self.fs.setattr(ctx, nodeid, changes))

    def _readlink(self, ctx, nodeid, reader, writer) -> bytes:
        return self.fs.readlink(ctx, nodeid)

    def _symlink(self, ctx, nodeid, reader, writer) -> bytes:
        name, target = _parse_strings(reader.read_rest(), 2)
        check_name(name)
        if len(target) >= PATH_MAX:
            raise OSError(errno.ENAMETOOLONG, "symlink target too long")
        if not target:
            raise OSError(errno.ENOENT, "empty symlink target")
        return self._entry(self.fs.symlink(ctx, nodeid, name, target))

    def _mknod(self, ctx, nodeid, reader, writer) -> bytes:
        a = fuse.fuse_mknod_in.unpack(reader.read(fuse.fuse_mknod_in.size))
        name = _parse_name(reader.read_rest())
        # fuse_mknod_in.rdev is new_encode_dev(): major in bits 8-19, minor
        # in bits 0-7 and 20-31.
        rdev = os.makedev((a.rdev & 0xFFF00) >> 8, (a.rdev & 0xFF) | ((a.rdev >> 12) & 0xFFF00))
        return self._entry(self.fs.mknod(ctx, nodeid, name, a.mode, rdev, self._umask(a.umask)))

    def _mkdir(self, ctx, nodeid, args) -> bytes:
        a = fuse.fuse_mkdir_in.unpack_from(args)
        name = _parse_name(args[fuse.fuse_mkdir_in.size:])
        return self._entry(self.fs.mkdir(ctx, nodeid, name, a.mode, self._umask(a.umask)))

    def _unlink(self, ctx, nodeid, args) -> bytes:
        self.fs.unlink(ctx, nodeid, _parse_name(args))
        return b""

    def _rmdir(self, ctx, nodeid, args) -> bytes:
        self.fs.rmdir(ctx, nodeid, _parse_name(args))
        return b""

    def _rename(self, ctx, nodeid, reader, writer) -> bytes:
        a = fuse.fuse_rename_in.unpack(reader.read(fuse.fuse_rename_in.size))
        old, new = _parse_names(reader.read_rest(), 2)
        self.fs.rename(ctx, nodeid, old, a.newdir, new, 0)
        return b""

    def _rename2(self, ctx, nodeid, reader, writer) -> bytes:
        a = fuse.fuse_rename2_in.unpack(reader.read(fuse.fuse_rename2_in.size))
        old, new = _parse_names(reader.read_rest(), 2)
        self.fs.rename(ctx, nodeid, old, a.newdir, new, a.flags)
        return b""

    def _link(self, ctx, nodeid, reader, writer) -> bytes:
        a = fuse.fuse_link_in.unpack(reader.read(fuse.fuse_link_in.size))
        name = _parse_name(reader.read_rest())
        return self._entry(self.fs.link(ctx, a.oldnodeid, nodeid, name))

    def _statfs(self, ctx, nodeid, reader, writer) -> bytes:
        s = self.fs.statfs(ctx, nodeid)
        return fuse.fuse_statfs_out.pack(st=dict(
            blocks=s.blocks, bfree=s.bfree, bavail=s.bavail, files=s.files, ffree=s.ffree,
            bsize=s.bsize, namelen=s.namelen, frsize=s.frsize))

    def _access(self, ctx, nodeid, args) -> bytes:
        a = fuse.fuse_access_in.unpack_from(args)
        self.fs.access(ctx, nodeid, a.mask)
        return b""

    # ------------------------------------------------------------------
    # Files
    # ------------------------------------------------------------------
    def _open(self, ctx, nodeid, args) -> bytes:
        a = fuse.fuse_open_in.unpack_from(args)
        return self._open_out(self.fs.open(ctx, nodeid, a.flags), is_dir=False)

    def _create(self, ctx, nodeid, args) -> bytes:
        a = fuse.fuse_create_in.unpack_from(args)
        name = _parse_name(args[fuse.fuse_create_in.size:])
        return self._entry_open(*self.fs.create(ctx, nodeid, name, a.mode,
                                                self._umask(a.umask), a.flags))

    def _entry_open(self, entry: Entry, o) -> bytes:
        """CREATE/TMPFILE reply: fuse_entry_out then fuse_open_out."""
        return self._entry(entry) + self._open_out(o, is_dir=False)

    def _tmpfile(self, ctx, nodeid, reader, writer) -> bytes:
        # FUSE_TMPFILE (7.37) carries fuse_create_in and a name the kernel
        # makes up; the object stays unnamed until a LINK.
        a = fuse.fuse_create_in.unpack(reader.read(fuse.fuse_create_in.size))
        return self._entry_open(*self.fs.tmpfile(ctx, nodeid, a.mode, self._umask(a.umask),
                                                 a.flags))

    def _read(self, ctx, nodeid, reader, writer) -> int:
        a = fuse.fuse_read_in.unpack(reader.read(fuse.fuse_read_in.size))
        size = min(a.size, writer.room)
        views = writer.views(size) if size else []
        return self.fs.read(ctx, nodeid, a.fh, _loff(a.offset), views)

    def _write(self, ctx, nodeid, reader, writer) -> bytes:
        a = fuse.fuse_write_in.unpack(reader.read(fuse.fuse_write_in.size))
        if a.size > reader.remaining:
            raise ProtocolError(f"WRITE of {a.size} bytes carries only {reader.remaining}")
        views = reader.views(a.size) if a.size else []
        kill = bool(a.write_flags & fuse.WRITE_KILL_SUIDGID)
        n = self.fs.write(ctx, nodeid, a.fh, _loff(a.offset), views, kill_suidgid=kill,
                          kill_caps=kill or self._server_kills_caps())
        return fuse.fuse_write_out.flat_pack(n, 0)  # size, padding

    def _release(self, ctx, nodeid, args) -> bytes:
        a = fuse.fuse_release_in.unpack_from(args)
        self.fs.release(ctx, nodeid, a.fh)
        return b""

    def _flush(self, ctx, nodeid, args) -> bytes:
        a = fuse.fuse_flush_in.unpack_from(args)
        self.fs.flush(ctx, nodeid, a.fh)
        return b""

    def _fsync(self, ctx, nodeid, reader, writer) -> bytes:
        a = fuse.fuse_fsync_in.unpack(reader.read(fuse.fuse_fsync_in.size))
        self.fs.fsync(ctx, nodeid, a.fh, bool(a.fsync_flags & fuse.FSYNC_FDATASYNC))
        return b""

    # ------------------------------------------------------------------
    # Directories
    # ------------------------------------------------------------------
    def _opendir(self, ctx, nodeid, args) -> bytes:
        a = fuse.fuse_open_in.unpack_from(args)
        return self._open_out(self.fs.opendir(ctx, nodeid, a.flags), is_dir=True)

    @staticmethod
    def _read_in(reader, writer):
        """READDIR(PLUS)'s fuse_read_in, and the reply bytes it leaves room for."""
        a = fuse.fuse_read_in.unpack(reader.read(fuse.fuse_read_in.size))
        return a, min(a.size, writer.room)

    def _readdir(self, ctx, nodeid, reader, writer) -> bytes:
        a, room = self._read_in(reader, writer)
        if self._readahead is not None:
            # (READDIRPLUS_AUTO: the guest may go on with plain READDIR)
            self._readahead.drop(a.fh)
        out = bytearray()
        hdr = fuse.fuse_dirent.size
        for d in self.fs.readdir(ctx, nodeid, a.fh, a.offset):
            reclen = fuse.dirent_align(hdr + len(d.name))
            if len(out) + reclen > room:
                break
            out += fuse.fuse_dirent.flat_pack(d.ino, d.off, len(d.name), d.type)
            out += d.name
            out += _PAD[reclen - hdr - len(d.name)]
        return bytes(out)

    def _readdirplus(self, ctx, nodeid, reader, writer) -> bytes:
        a, room = self._read_in(reader, writer)
        if self._readahead is None:
            return self._plus_batch(ctx, nodeid, a.fh, a.offset, room, [])[0]
        return self._readahead.reply(ctx, nodeid, a.fh, a.offset, room)

    def _plus_batch(self, ctx, nodeid: int, fh: int, offset: int, room: int,
                    nodes: list[int], mark: int | None = None) -> tuple[bytes, int | None]:
        """A READDIRPLUS reply of at most `room` bytes from `offset` on, and the
        offset after its last entry (None if the listing ended in it).

        Each record is fuse_entry_out + fuse_dirent + name, packed as one
        fuse_direntplus; an entry is looked up only once it is known to fit (a
        lookup counts for the guest's FORGET), and the node id of each entry
        looked up goes to `nodes` (for the readahead to drop them unsent).  With a
        `mark` (made ahead), it stops as soon as the change mark moves from it."""
        out = bytearray()
        hdr = fuse.fuse_direntplus.size
        pack, lookup = fuse.fuse_direntplus.flat_pack, self.fs.lookup
        attr_values, looked_up = self._attr_values, nodes.append
        (entry_valid, entry_nsec), (attr_valid, attr_nsec) = self._entry_valid, self._attr_valid
        # (fuse_entry_out's fields, as _entry packs them, are packed here: this
        # runs per entry, and each call on the way is a sizeable part of it)
        for name, d_ino, d_type, d_off in self.fs.readdir(ctx, nodeid, fh, offset, plus=True):
            namelen = len(name)
            reclen = (hdr + namelen + 7) & ~7   # fuse.dirent_align, inlined
            if len(out) + reclen > room:
                # the entry is not sent, so it is not looked up either
                return bytes(out), offset if out else None
            if mark is not None and self.change_mark != mark:
                raise Spoiled
            entry = None
            if name != b"." and name != b"..":
                try:
                    entry = lookup(ctx, nodeid, name, d_ino)
                except OSError:
                    entry = None  # vanished since listed: plain entry
            if entry is None:  # nodeid 0: the kernel links nothing for it
                out += pack(*_NO_ENTRY, d_ino, d_off, namelen, d_type)
            else:
                child, generation, attr = entry
                looked_up(child)
                out += pack(child, generation, entry_valid, attr_valid, entry_nsec, attr_nsec,
                            *attr_values(attr), d_ino, d_off, namelen, (attr.mode >> 12) & 0xF)
            out += name
            out += _PAD[reclen - hdr - namelen]
            offset = d_off
        return bytes(out), None

    def _batch_ahead(self, *args) -> tuple[bytes, int | None]:
        """`_plus_batch` on the readahead's thread: a request of its own."""
        self._grace.enter()
        try:
            return self._plus_batch(*args)
        finally:
            self._grace.leave()

    def _forget_nodes(self, nodes: list[int]) -> None:
        """Take back the lookups of a READDIRPLUS batch that was not sent, as
        the guest's BATCH_FORGET would (one table lock for all of them)."""
        one = fuse.fuse_forget_one.tuple
        self.fs.batch_forget([one(node, 1) for node in nodes])

    # ------------------------------------------------------------------
    # Extended attributes
    # ------------------------------------------------------------------
    @staticmethod
    def _sized_reply(data: bytes, size: int) -> bytes:
        """getxattr/listxattr: size 0 asks for the length, a short buffer is ERANGE."""
        if size == 0:
            return fuse.fuse_getxattr_out.pack(size=len(data))
        if len(data) > size:
            raise OSError(errno.ERANGE, "buffer too small")
        return data

    def _getxattr(self, ctx, nodeid, reader, writer) -> bytes:
        a = fuse.fuse_getxattr_in.unpack(reader.read(fuse.fuse_getxattr_in.size))
        name = _parse_strings(reader.read_rest(), 1)[0]
        return self._sized_reply(self.fs.getxattr(ctx, nodeid, name), a.size)

    def _listxattr(self, ctx, nodeid, reader, writer) -> bytes:
        a = fuse.fuse_getxattr_in.unpack(reader.read(fuse.fuse_getxattr_in.size))
        names = self.fs.listxattr(ctx, nodeid)
        return self._sized_reply(b"".join(n + b"\0" for n in names), a.size)

    def _setxattr(self, ctx, nodeid, reader, writer) -> bytes:
        # Without SETXATTR_EXT the kernel sends the 8-byte compat struct.
        ext = bool(self.flags & _F.SETXATTR_EXT)
        raw = reader.read(fuse.fuse_setxattr_in.size if ext else fuse.COMPAT_SETXATTR_IN_SIZE)
        a = fuse.fuse_setxattr_in.unpack(raw.ljust(fuse.fuse_setxattr_in.size, b"\0"))
        rest = reader.read(reader.remaining)
        end = rest.find(b"\0")
        if end < 0:
            raise ProtocolError("xattr name is not NUL-terminated")
        name, value = rest[:end], rest[end + 1:]
        if len(value) != a.size:
            raise ProtocolError(f"SETXATTR says {a.size} value bytes, carries {len(value)}")
        if a.flags & ~(os.XATTR_CREATE | os.XATTR_REPLACE):
            # setxattr(2) refuses other flags (fs/xattr.c) before any
            # filesystem sees them; nor would they fit the host call's C int.
            raise OSError(errno.EINVAL, f"setxattr flags {a.flags:#x}")
        self.fs.setxattr(ctx, nodeid, name, value, a.flags,
                         acl_kill_sgid=bool(a.setxattr_flags & fuse.SETXATTR_ACL_KILL_SGID))
        return b""

    def _removexattr(self, ctx, nodeid, reader, writer) -> bytes:
        self.fs.removexattr(ctx, nodeid, _parse_strings(reader.read_rest(), 1)[0])
        return b""

    # ------------------------------------------------------------------
    # File space, copies, sync
    # ------------------------------------------------------------------
    def _fallocate(self, ctx, nodeid, reader, writer) -> bytes:
        a = fuse.fuse_fallocate_in.unpack(reader.read(fuse.fuse_fallocate_in.size))
        self.fs.fallocate(ctx, nodeid, a.fh, _loff(a.offset), _loff(a.length), a.mode,
                          **self._v2_kill(ctx))
        return b""

    def _lseek(self, ctx, nodeid, reader, writer) -> bytes:
        a = fuse.fuse_lseek_in.unpack(reader.read(fuse.fuse_lseek_in.size))
        return fuse.fuse_lseek_out.pack(
            # (lseek(2)'s offset is signed, and for SEEK_DATA/SEEK_HOLE the
            # guest passes the caller's on as it is: the host answers for it)
            offset=self.fs.lseek(ctx, nodeid, a.fh, _s64(a.offset), a.whence))

    def _copy_file_range(self, ctx, nodeid, reader, writer) -> bytes:
        a = fuse.fuse_copy_file_range_in.unpack(reader.read(fuse.fuse_copy_file_range_in.size))
        n = self.fs.copy_file_range(ctx, a.fh_in, _loff(a.off_in), a.fh_out, _loff(a.off_out),
                                    min(a.len, 0xFFFFFFFF), a.flags, **self._v2_kill(ctx))
        return fuse.fuse_write_out.pack(size=n)  # fuse_write_out.size is a u32

    def _syncfs(self, ctx, nodeid, reader, writer) -> bytes:
        self.fs.syncfs(ctx, nodeid)
        return b""

    def _releasedir(self, ctx, nodeid, args) -> bytes:
        a = fuse.fuse_release_in.unpack_from(args)
        if self._readahead is not None:
            self._readahead.drop(a.fh)
        self.fs.releasedir(ctx, nodeid, a.fh)
        return b""

    def _fsyncdir(self, ctx, nodeid, reader, writer) -> bytes:
        a = fuse.fuse_fsync_in.unpack(reader.read(fuse.fuse_fsync_in.size))
        self.fs.fsyncdir(ctx, nodeid, a.fh, bool(a.fsync_flags & fuse.FSYNC_FDATASYNC))
        return b""


# ----------------------------------------------------------------------
# Name parsing: the guest's names are untrusted bytes.
# ----------------------------------------------------------------------
def _parse_strings(data, count: int) -> list[bytes]:
    """`count` NUL-terminated strings that fill `data`, the rest of the request.

    Names and targets are always the final arguments of a request, so the
    remainder must be exactly `s1\0 s2\0`; anything else is a lying length.
    """
    data = bytes(data)  # one copy: a view of guest memory can change under the checks
    # (the one-name requests, the frequent ones, go through _parse_name)
    parts = data.split(b"\0")
    if len(parts) < count + 1:
        raise ProtocolError("string argument is not NUL-terminated")
    if any(parts[count:]):
        raise ProtocolError("trailing bytes after the string arguments")
    return parts[:count]


def _parse_names(data, count: int) -> list[bytes]:
    """`count` single-component names filling `data`, the rest of the request."""
    names = _parse_strings(data, count)
    for name in names:
        check_name(name)
    return names


def _parse_name(data) -> bytes:
    """`_parse_names(data, 1)[0]` in one call: LOOKUP, CREATE, UNLINK, ... name
    one node each, and the checks' calls were a tenth of a LOOKUP's CPU.  The
    tests are those of `_parse_strings` and `check_name`, which are called to
    raise the precise error when one fails."""
    data = bytes(data)  # one copy: a view of guest memory can change under the checks
    end = data.find(b"\0")
    if end < 0 or (end + 1 < len(data) and data[end + 1:].strip(b"\0")):
        _parse_strings(data, 1)
    name = data[:end]
    if not name or name == b"." or name == b".." or b"/" in name or len(name) > NAME_MAX:
        check_name(name)
    return name


def check_name(name: bytes) -> None:
    """A guest name must be one path component: never '', '.', '..', or contain '/'."""
    if not name or name in (b".", b".."):
        raise OSError(errno.EINVAL, "invalid name")
    if b"/" in name:
        raise OSError(errno.EINVAL, "name contains '/'")
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "name too long")
