"""The typed contract between the FUSE server and a filesystem.

The server decodes FUSE bytes into these, calls one filesystem method per
opcode, and encodes what comes back; the filesystem never sees protocol bytes
and raises `OSError(errno)` for every failure.

The types are named tuples: immutable like frozen dataclasses, and built per
request (a reply's Attr, the caller's Ctx) at a quarter of the cost.
"""

from __future__ import annotations

import functools
from typing import NamedTuple


class Ctx(NamedTuple):
    """Who asks: the requesting guest process, from fuse_in_header."""

    uid: int
    gid: int
    pid: int
    # FUSE_SECURITY_CTX: (xattr name, value) labels for an object this
    # request creates, e.g. (b"security.selinux", b"system_u:...")
    secctx: tuple[tuple[bytes, bytes], ...] = ()


class Attr(NamedTuple):
    """What the guest sees of an inode (becomes fuse_attr)."""

    ino: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    mode: int  # S_IFMT | 07777, as the guest sees it
    nlink: int
    uid: int
    gid: int
    rdev: int  # Linux dev_t (os.makedev encoding)
    blksize: int
    submount: bool = False  # a mount point inside the share (FUSE_ATTR_SUBMOUNT)


class Entry(NamedTuple):
    """A looked-up name: the node id the guest will use and its attributes."""

    nodeid: int
    generation: int
    attr: Attr


# Builders for the types made on every request, taking every field in order
# as one tuple: `new_attr((ino, size, ...))` is `Attr(ino, size, ...)` without
# the named tuple's generated __new__, a Python frame that binds each field by
# name and costs twice the tuple itself (docs/performance.md).  No defaults:
# the tuple must hold every field.
new_ctx = functools.partial(tuple.__new__, Ctx)
new_attr = functools.partial(tuple.__new__, Attr)
new_entry = functools.partial(tuple.__new__, Entry)


class StatFs(NamedTuple):
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    bsize: int
    namelen: int
    frsize: int


class DirEntry(NamedTuple):
    """One directory entry; `off` is the cookie that resumes after it."""

    name: bytes
    ino: int
    type: int  # DT_* value
    off: int


new_dirent = functools.partial(tuple.__new__, DirEntry)


class Opened(NamedTuple):
    """An open file or directory handle, with FOPEN_* flags for the guest."""

    fh: int
    open_flags: int = 0
    # The handle's FLUSH does nothing, so the guest need not send one on each
    # close(2) (FOPEN_NOFLUSH, FUSE 7.35; the kernel still flushes with the
    # writeback cache on, to push its dirty pages).
    noflush: bool = False


# Marker for "set this time to the current time" in SetAttr.
NOW = "now"


class SetAttr(NamedTuple):
    """The changes of one SETATTR; a field left None is not changed."""

    mode: int | None = None  # permission bits only (07777)
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | str | None = None  # int, NOW or None
    mtime_ns: int | str | None = None
    fh: int | None = None
    kill_suidgid: bool = False  # FATTR_KILL_SUIDGID (HANDLE_KILLPRIV_V2)
