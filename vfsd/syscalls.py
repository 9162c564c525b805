"""Linux syscalls that Python's `os` module does not expose the way vfsd needs.

Each wrapper raises `OSError(errno)` like `os` does.  Only the passthrough
filesystem calls these.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_SYMLINK_FOLLOW = 0x400
AT_EMPTY_PATH = 0x1000

RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2

# utimensat(2): tv_nsec values that mean "now" and "leave alone".
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


def _check(ret: int) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _path(p: str | bytes) -> bytes:
    return os.fsencode(p)


_libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]


def linkat(olddirfd: int, oldpath: str | bytes, newdirfd: int, newpath: str | bytes,
           flags: int = 0) -> None:
    """linkat(2).  `os.link` without a directory fd calls link(2), which cannot
    pass AT_SYMLINK_FOLLOW: what links an O_TMPFILE (or O_PATH) fd through
    /proc/self/fd/N."""
    _check(_libc.linkat(olddirfd, _path(oldpath), newdirfd, _path(newpath), flags))


def link_fd(fd: int, newdirfd: int, newname: str | bytes) -> None:
    """Give the inode behind `fd` a name (works for O_TMPFILE files unprivileged)."""
    if newdirfd == AT_FDCWD:
        linkat(AT_FDCWD, f"/proc/self/fd/{fd}", newdirfd, newname, AT_SYMLINK_FOLLOW)
    else:
        # With a dst_dir_fd, os.link makes this same linkat(AT_FDCWD, path,
        # newdirfd, name, AT_SYMLINK_FOLLOW) call, without ctypes' overhead.
        os.link(b"/proc/self/fd/%d" % fd, _path(newname), dst_dir_fd=newdirfd)


_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]


def renameat2(olddirfd: int, oldname: str | bytes, newdirfd: int, newname: str | bytes,
              flags: int = 0) -> None:
    _check(_libc.renameat2(olddirfd, _path(oldname), newdirfd, _path(newname), flags))


class _timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_timespec), ctypes.c_int]


def utimensat(dirfd: int, path: str | bytes, atime: int | None | str, mtime: int | None | str,
              flags: int = 0) -> None:
    """Set times in nanoseconds; None leaves a time alone, "now" sets it to now."""

    def ts(v: int | None | str) -> _timespec:
        if v is None:
            return _timespec(0, UTIME_OMIT)
        if v == "now":
            return _timespec(0, UTIME_NOW)
        return _timespec(*divmod(int(v), 1_000_000_000))

    times = (_timespec * 2)(ts(atime), ts(mtime))
    _check(_libc.utimensat(dirfd, _path(path), times, flags))


_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _check(_libc.fallocate(fd, mode, offset, length))


_libc.syncfs.argtypes = [ctypes.c_int]


def syncfs(fd: int) -> None:
    _check(_libc.syncfs(fd))


def proc_fd(fd: int) -> str:
    """The magic link that reopens (or names, for *xattr calls) an O_PATH fd."""
    return f"/proc/self/fd/{fd}"


RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_SYS_openat2 = 437  # x86_64 and the generic syscall table alike


class _open_how(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc.syscall.restype = ctypes.c_long


def openat2(dirfd: int, path: str | bytes, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2) (Linux 5.6): `resolve` confines the walk, e.g. RESOLVE_BENEATH
    keeps every component (.., symlinks) below `dirfd`."""
    how = _open_how(flags, mode, resolve)
    return _check(_libc.syscall(ctypes.c_long(_SYS_openat2), ctypes.c_int(dirfd),
                                ctypes.c_char_p(_path(path)), ctypes.byref(how),
                                ctypes.c_size_t(ctypes.sizeof(how))))


# name_to_handle_at(2): struct file_handle is handle_bytes (u32), handle_type
# (int), then f_handle; MAX_HANDLE_SZ is 128 (include/linux/exportfs.h).
MAX_HANDLE_SZ = 128
_libc.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p,
                                    ctypes.POINTER(ctypes.c_int), ctypes.c_int]


def file_handle_of(fd: int) -> bytes:
    """The exportable handle of the inode behind `fd` (name_to_handle_at with
    AT_EMPTY_PATH), as handle_type and f_handle bytes.  It names one inode
    for its lifetime: its generation is in it, so an inode freed and its
    number reused gets another.  Unprivileged (only open_by_handle_at needs
    CAP_DAC_READ_SEARCH); EOPNOTSUPP where the filesystem cannot export."""
    buf = ctypes.create_string_buffer(8 + MAX_HANDLE_SZ)
    buf[0:4] = MAX_HANDLE_SZ.to_bytes(4, "little")
    mount_id = ctypes.c_int()
    _check(_libc.name_to_handle_at(fd, b"", buf, ctypes.byref(mount_id), AT_EMPTY_PATH))
    size = int.from_bytes(buf[0:4], "little")
    return buf.raw[4:8 + size]
