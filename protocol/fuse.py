"""The FUSE kernel ABI, as Linux `include/uapi/linux/fuse.h` defines it.

Every struct is written down once, with the kernel's name, and
`tests/unit/test_fuse_abi.py` checks its size against the `*_SIZE` constants
and layouts of fuse.h.  Nothing here knows about files or virtqueues: it is
the vocabulary both the transport and the server speak.

Protocol history that matters here (fuse.h changelog):
  7.23  fuse_init_out grows to 64 bytes (time_gran, max_pages, ...)
  7.28  FUSE_MAX_PAGES; 7.31 map_alignment / FUSE_MAP_ALIGNMENT (DAX)
  7.33  FUSE_HANDLE_KILLPRIV_V2, FUSE_SETXATTR_EXT, open_flags in open/create
  7.36  FUSE_INIT_EXT: flags2 in init_in/init_out, fuse_init_in grows to 64 bytes
  7.38  fuse_in_header.total_extlen (extension headers after the args)
"""

from __future__ import annotations

import enum

from .wire import WireStruct

KERNEL_VERSION = 7
#: The highest minor version this library lays structs out for.
KERNEL_MINOR_VERSION = 38
#: The oldest minor vfsd accepts from a guest kernel (virtio-fs arrived in 7.31).
MIN_MINOR_VERSION = 31

ROOT_ID = 1
#: fuse.h: "The read buffer is required to be at least 8k"
MIN_READ_BUFFER = 8192


class Opcode(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2  # no reply
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42  # no reply
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52


#: Requests that get no reply at all (fuse.h: FORGET, BATCH_FORGET; an
#: INTERRUPT is answered through the request it interrupts).
NO_REPLY = frozenset({Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT})


class InitFlag(enum.IntFlag):
    """fuse_init_in/out `flags`, with `flags2` shifted up by 32 (FUSE_INIT_EXT)."""

    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    FILE_OPS = 1 << 2
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    SPLICE_WRITE = 1 << 7
    SPLICE_MOVE = 1 << 8
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10
    HAS_IOCTL_DIR = 1 << 11
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    NO_OPEN_SUPPORT = 1 << 17
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    POSIX_ACL = 1 << 20
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    NO_OPENDIR_SUPPORT = 1 << 24
    EXPLICIT_INVAL_DATA = 1 << 25
    MAP_ALIGNMENT = 1 << 26
    SUBMOUNTS = 1 << 27
    HANDLE_KILLPRIV_V2 = 1 << 28
    SETXATTR_EXT = 1 << 29
    INIT_EXT = 1 << 30
    INIT_RESERVED = 1 << 31
    # flags2 (7.36)
    SECURITY_CTX = 1 << 32
    HAS_INODE_DAX = 1 << 33
    CREATE_SUPP_GROUP = 1 << 34
    HAS_EXPIRE_ONLY = 1 << 35
    DIRECT_IO_ALLOW_MMAP = 1 << 36
    PASSTHROUGH = 1 << 37
    NO_EXPORT_SUPPORT = 1 << 38
    HAS_RESEND = 1 << 39


class SetattrValid(enum.IntFlag):
    """fuse_setattr_in.valid (FATTR_*)."""

    MODE = 1 << 0
    UID = 1 << 1
    GID = 1 << 2
    SIZE = 1 << 3
    ATIME = 1 << 4
    MTIME = 1 << 5
    FH = 1 << 6
    ATIME_NOW = 1 << 7
    MTIME_NOW = 1 << 8
    LOCKOWNER = 1 << 9
    CTIME = 1 << 10
    KILL_SUIDGID = 1 << 11


class OpenFlag(enum.IntFlag):
    """fuse_open_out.open_flags (FOPEN_*)."""

    DIRECT_IO = 1 << 0
    KEEP_CACHE = 1 << 1
    NONSEEKABLE = 1 << 2
    CACHE_DIR = 1 << 3
    STREAM = 1 << 4
    NOFLUSH = 1 << 5
    PARALLEL_DIRECT_WRITES = 1 << 6
    PASSTHROUGH = 1 << 7


# Assorted request flag words (fuse.h, one constant per named bit).
GETATTR_FH = 1 << 0  # fuse_getattr_in.getattr_flags
RELEASE_FLUSH = 1 << 0  # fuse_release_in.release_flags
RELEASE_FLOCK_UNLOCK = 1 << 1
WRITE_CACHE = 1 << 0  # fuse_write_in.write_flags
WRITE_LOCKOWNER = 1 << 1
WRITE_KILL_SUIDGID = 1 << 2
READ_LOCKOWNER = 1 << 1  # fuse_read_in.read_flags
FSYNC_FDATASYNC = 1 << 0  # fuse_fsync_in.fsync_flags
OPEN_KILL_SUIDGID = 1 << 0  # fuse_open_in/fuse_create_in.open_flags
SETXATTR_ACL_KILL_SGID = 1 << 0  # fuse_setxattr_in.setxattr_flags
LK_FLOCK = 1 << 0  # fuse_lk_in.lk_flags
ATTR_SUBMOUNT = 1 << 0  # fuse_attr.flags: a mount point (with FUSE_SUBMOUNTS)


# ---------------------------------------------------------------------------
# Structs.  Names and field names follow fuse.h exactly.
# ---------------------------------------------------------------------------
u64, u32, i32, u16 = "Q", "I", "i", "H"

fuse_attr = WireStruct("fuse_attr", [
    ("ino", u64), ("size", u64), ("blocks", u64),
    ("atime", u64), ("mtime", u64), ("ctime", u64),
    ("atimensec", u32), ("mtimensec", u32), ("ctimensec", u32),
    ("mode", u32), ("nlink", u32), ("uid", u32), ("gid", u32), ("rdev", u32),
    ("blksize", u32), ("flags", u32),
])

fuse_kstatfs = WireStruct("fuse_kstatfs", [
    ("blocks", u64), ("bfree", u64), ("bavail", u64), ("files", u64), ("ffree", u64),
    ("bsize", u32), ("namelen", u32), ("frsize", u32), ("padding", u32),
    ("spare", "24s"),
])

fuse_file_lock = WireStruct("fuse_file_lock", [
    ("start", u64), ("end", u64), ("type", u32), ("pid", u32),
])

fuse_in_header = WireStruct("fuse_in_header", [
    ("len", u32), ("opcode", u32), ("unique", u64), ("nodeid", u64),
    ("uid", u32), ("gid", u32), ("pid", u32),
    ("total_extlen", u16),  # 7.38: extension length in units of 8 bytes
    ("padding", u16),
])

fuse_out_header = WireStruct("fuse_out_header", [
    ("len", u32), ("error", i32), ("unique", u64),
])

fuse_entry_out = WireStruct("fuse_entry_out", [
    ("nodeid", u64), ("generation", u64), ("entry_valid", u64), ("attr_valid", u64),
    ("entry_valid_nsec", u32), ("attr_valid_nsec", u32),
    ("attr", fuse_attr),
])

fuse_forget_in = WireStruct("fuse_forget_in", [("nlookup", u64)])
fuse_forget_one = WireStruct("fuse_forget_one", [("nodeid", u64), ("nlookup", u64)])
fuse_batch_forget_in = WireStruct("fuse_batch_forget_in", [("count", u32), ("dummy", u32)])

fuse_getattr_in = WireStruct("fuse_getattr_in", [
    ("getattr_flags", u32), ("dummy", u32), ("fh", u64),
])

fuse_attr_out = WireStruct("fuse_attr_out", [
    ("attr_valid", u64), ("attr_valid_nsec", u32), ("dummy", u32), ("attr", fuse_attr),
])

fuse_mknod_in = WireStruct("fuse_mknod_in", [
    ("mode", u32), ("rdev", u32), ("umask", u32), ("padding", u32),
])
fuse_mkdir_in = WireStruct("fuse_mkdir_in", [("mode", u32), ("umask", u32)])
fuse_rename_in = WireStruct("fuse_rename_in", [("newdir", u64)])
fuse_rename2_in = WireStruct("fuse_rename2_in", [
    ("newdir", u64), ("flags", u32), ("padding", u32),
])
fuse_link_in = WireStruct("fuse_link_in", [("oldnodeid", u64)])

fuse_setattr_in = WireStruct("fuse_setattr_in", [
    ("valid", u32), ("padding", u32),
    ("fh", u64), ("size", u64), ("lock_owner", u64),
    ("atime", u64), ("mtime", u64), ("ctime", u64),
    ("atimensec", u32), ("mtimensec", u32), ("ctimensec", u32),
    ("mode", u32), ("unused4", u32), ("uid", u32), ("gid", u32), ("unused5", u32),
])

fuse_open_in = WireStruct("fuse_open_in", [("flags", u32), ("open_flags", u32)])
fuse_create_in = WireStruct("fuse_create_in", [
    ("flags", u32), ("mode", u32), ("umask", u32), ("open_flags", u32),
])
fuse_open_out = WireStruct("fuse_open_out", [
    ("fh", u64), ("open_flags", u32), ("backing_id", i32),
])
fuse_release_in = WireStruct("fuse_release_in", [
    ("fh", u64), ("flags", u32), ("release_flags", u32), ("lock_owner", u64),
])
fuse_flush_in = WireStruct("fuse_flush_in", [
    ("fh", u64), ("unused", u32), ("padding", u32), ("lock_owner", u64),
])
fuse_read_in = WireStruct("fuse_read_in", [
    ("fh", u64), ("offset", u64), ("size", u32), ("read_flags", u32),
    ("lock_owner", u64), ("flags", u32), ("padding", u32),
])
fuse_write_in = WireStruct("fuse_write_in", [
    ("fh", u64), ("offset", u64), ("size", u32), ("write_flags", u32),
    ("lock_owner", u64), ("flags", u32), ("padding", u32),
])
fuse_write_out = WireStruct("fuse_write_out", [("size", u32), ("padding", u32)])
fuse_statfs_out = WireStruct("fuse_statfs_out", [("st", fuse_kstatfs)])
fuse_fsync_in = WireStruct("fuse_fsync_in", [
    ("fh", u64), ("fsync_flags", u32), ("padding", u32),
])

# 7.33: with FUSE_SETXATTR_EXT the kernel sends the 16-byte form, else the
# first 8 bytes (FUSE_COMPAT_SETXATTR_IN_SIZE).
fuse_setxattr_in = WireStruct("fuse_setxattr_in", [
    ("size", u32), ("flags", u32), ("setxattr_flags", u32), ("padding", u32),
])
COMPAT_SETXATTR_IN_SIZE = 8
fuse_getxattr_in = WireStruct("fuse_getxattr_in", [("size", u32), ("padding", u32)])
fuse_getxattr_out = WireStruct("fuse_getxattr_out", [("size", u32), ("padding", u32)])

fuse_lk_in = WireStruct("fuse_lk_in", [
    ("fh", u64), ("owner", u64), ("lk", fuse_file_lock), ("lk_flags", u32), ("padding", u32),
])
fuse_lk_out = WireStruct("fuse_lk_out", [("lk", fuse_file_lock)])
fuse_access_in = WireStruct("fuse_access_in", [("mask", u32), ("padding", u32)])

# 7.36: fuse_init_in grew from 16 bytes to 64 (flags2 + unused); older
# kernels send only the first 16 bytes.
fuse_init_in = WireStruct("fuse_init_in", [
    ("major", u32), ("minor", u32), ("max_readahead", u32), ("flags", u32),
    ("flags2", u32), ("unused", "44s"),
])
COMPAT_INIT_IN_SIZE = 16
fuse_init_out = WireStruct("fuse_init_out", [
    ("major", u32), ("minor", u32), ("max_readahead", u32), ("flags", u32),
    ("max_background", u16), ("congestion_threshold", u16),
    ("max_write", u32), ("time_gran", u32),
    ("max_pages", u16), ("map_alignment", u16),
    ("flags2", u32), ("max_stack_depth", u32), ("unused", "24s"),
])

fuse_interrupt_in = WireStruct("fuse_interrupt_in", [("unique", u64)])
fuse_bmap_in = WireStruct("fuse_bmap_in", [("block", u64), ("blocksize", u32), ("padding", u32)])
fuse_bmap_out = WireStruct("fuse_bmap_out", [("block", u64)])
fuse_ioctl_in = WireStruct("fuse_ioctl_in", [
    ("fh", u64), ("flags", u32), ("cmd", u32), ("arg", u64),
    ("in_size", u32), ("out_size", u32),
])
fuse_poll_in = WireStruct("fuse_poll_in", [
    ("fh", u64), ("kh", u64), ("flags", u32), ("events", u32),
])
fuse_fallocate_in = WireStruct("fuse_fallocate_in", [
    ("fh", u64), ("offset", u64), ("length", u64), ("mode", u32), ("padding", u32),
])
fuse_lseek_in = WireStruct("fuse_lseek_in", [
    ("fh", u64), ("offset", u64), ("whence", u32), ("padding", u32),
])
fuse_lseek_out = WireStruct("fuse_lseek_out", [("offset", u64)])
fuse_copy_file_range_in = WireStruct("fuse_copy_file_range_in", [
    ("fh_in", u64), ("off_in", u64), ("nodeid_out", u64), ("fh_out", u64),
    ("off_out", u64), ("len", u64), ("flags", u64),
])
fuse_syncfs_in = WireStruct("fuse_syncfs_in", [("padding", u64)])

# Directory entries: name follows the header, each record padded to 8 bytes
# (FUSE_DIRENT_ALIGN).  fuse_direntplus = fuse_entry_out + fuse_dirent.
fuse_dirent = WireStruct("fuse_dirent", [
    ("ino", u64), ("off", u64), ("namelen", u32), ("type", u32),
])
fuse_direntplus = WireStruct("fuse_direntplus", [
    ("entry_out", fuse_entry_out), ("dirent", fuse_dirent),
])


# 7.38 request extensions (after the arguments, total_extlen * 8 bytes).  A
# security context extension is a fuse_secctx_header whose second word, in the
# position of fuse_ext_header.type, is the number of contexts (types 0..31).
fuse_ext_header = WireStruct("fuse_ext_header", [("size", u32), ("type", u32)])
fuse_secctx_header = WireStruct("fuse_secctx_header", [("size", u32), ("nr_secctx", u32)])
fuse_secctx = WireStruct("fuse_secctx", [("size", u32), ("padding", u32)])
MAX_NR_SECCTX = 31
EXT_GROUPS = 32


def dirent_align(n: int) -> int:
    """FUSE_DIRENT_ALIGN: records in a READDIR reply are 8-byte aligned."""
    return (n + 7) & ~7
