"""FUSE ABI sizes and flag values, against Linux include/uapi/linux/fuse.h (7.38)."""

import struct

import pytest

from protocol import fuse
from protocol.wire import all_structs

# Sizes as the kernel lays the structs out (x86_64 and every other arch: the
# ABI has explicit padding everywhere).
SIZES = {
    "fuse_attr": 88, "fuse_kstatfs": 80, "fuse_file_lock": 24,
    "fuse_in_header": 40, "fuse_out_header": 16, "fuse_entry_out": 128,
    "fuse_forget_in": 8, "fuse_forget_one": 16, "fuse_batch_forget_in": 8,
    "fuse_getattr_in": 16, "fuse_attr_out": 104, "fuse_mknod_in": 16,
    "fuse_mkdir_in": 8, "fuse_rename_in": 8, "fuse_rename2_in": 16,
    "fuse_link_in": 8, "fuse_setattr_in": 88, "fuse_open_in": 8,
    "fuse_create_in": 16, "fuse_open_out": 16, "fuse_release_in": 24,
    "fuse_flush_in": 24, "fuse_read_in": 40, "fuse_write_in": 40,
    "fuse_write_out": 8, "fuse_statfs_out": 80, "fuse_fsync_in": 16,
    "fuse_setxattr_in": 16, "fuse_getxattr_in": 8, "fuse_getxattr_out": 8,
    "fuse_lk_in": 48, "fuse_lk_out": 24, "fuse_access_in": 8,
    "fuse_init_in": 64, "fuse_init_out": 64, "fuse_interrupt_in": 8,
    "fuse_bmap_in": 16, "fuse_bmap_out": 8, "fuse_ioctl_in": 32,
    "fuse_poll_in": 24, "fuse_fallocate_in": 32, "fuse_lseek_in": 24,
    "fuse_lseek_out": 8, "fuse_copy_file_range_in": 56, "fuse_syncfs_in": 8,
    "fuse_dirent": 24, "fuse_direntplus": 152,
    "fuse_ext_header": 8, "fuse_secctx_header": 8, "fuse_secctx": 8,
}


def test_every_struct_has_a_size_check():
    assert {s.name for s in all_structs(vars(fuse))} == set(SIZES)


@pytest.mark.parametrize("name,size", sorted(SIZES.items()))
def test_struct_size(name, size):
    assert getattr(fuse, name).size == size


def test_compat_sizes():
    assert fuse.COMPAT_INIT_IN_SIZE == 16
    assert fuse.COMPAT_SETXATTR_IN_SIZE == 8


def test_opcodes():
    expected = {
        "LOOKUP": 1, "FORGET": 2, "GETATTR": 3, "SETATTR": 4, "READLINK": 5, "SYMLINK": 6,
        "MKNOD": 8, "MKDIR": 9, "UNLINK": 10, "RMDIR": 11, "RENAME": 12, "LINK": 13,
        "OPEN": 14, "READ": 15, "WRITE": 16, "STATFS": 17, "RELEASE": 18, "FSYNC": 20,
        "SETXATTR": 21, "GETXATTR": 22, "LISTXATTR": 23, "REMOVEXATTR": 24, "FLUSH": 25,
        "INIT": 26, "OPENDIR": 27, "READDIR": 28, "RELEASEDIR": 29, "FSYNCDIR": 30,
        "GETLK": 31, "SETLK": 32, "SETLKW": 33, "ACCESS": 34, "CREATE": 35,
        "INTERRUPT": 36, "BMAP": 37, "DESTROY": 38, "IOCTL": 39, "POLL": 40,
        "NOTIFY_REPLY": 41, "BATCH_FORGET": 42, "FALLOCATE": 43, "READDIRPLUS": 44,
        "RENAME2": 45, "LSEEK": 46, "COPY_FILE_RANGE": 47, "SETUPMAPPING": 48,
        "REMOVEMAPPING": 49, "SYNCFS": 50, "TMPFILE": 51, "STATX": 52,
    }
    assert {op.name: op.value for op in fuse.Opcode} == expected


def test_init_flags():
    F = fuse.InitFlag
    assert F.ASYNC_READ == 1 and F.DONT_MASK == 1 << 6 and F.DO_READDIRPLUS == 1 << 13
    assert F.WRITEBACK_CACHE == 1 << 16 and F.POSIX_ACL == 1 << 20
    assert F.MAX_PAGES == 1 << 22 and F.HANDLE_KILLPRIV_V2 == 1 << 28
    assert F.SETXATTR_EXT == 1 << 29 and F.INIT_EXT == 1 << 30
    assert F.SECURITY_CTX == 1 << 32 and F.HAS_RESEND == 1 << 39


def test_setattr_and_open_flags():
    V = fuse.SetattrValid
    assert (V.MODE, V.UID, V.GID, V.SIZE, V.ATIME, V.MTIME, V.FH) == (1, 2, 4, 8, 16, 32, 64)
    assert (V.ATIME_NOW, V.MTIME_NOW, V.LOCKOWNER, V.CTIME, V.KILL_SUIDGID) == (
        1 << 7, 1 << 8, 1 << 9, 1 << 10, 1 << 11)
    O = fuse.OpenFlag
    assert (O.DIRECT_IO, O.KEEP_CACHE, O.NONSEEKABLE, O.CACHE_DIR) == (1, 2, 4, 8)
    assert fuse.WRITE_KILL_SUIDGID == 4 and fuse.GETATTR_FH == 1


def test_nested_round_trip():
    attr = fuse.fuse_attr.pack(ino=5, mode=0o100644, uid=1234)
    raw = fuse.fuse_entry_out.pack(nodeid=9, attr=fuse.fuse_attr.unpack(attr))
    e = fuse.fuse_entry_out.unpack(raw)
    assert e.nodeid == 9 and e.attr.ino == 5 and e.attr.uid == 1234
    assert e.attr.mode == 0o100644


def test_dirent_align():
    assert [fuse.dirent_align(n) for n in (0, 1, 8, 25, 32)] == [0, 8, 8, 32, 32]


def test_flat_field_orders_used_by_the_server():
    """server.py packs these replies positionally: the order must not drift."""
    attr = ("ino", "size", "blocks", "atime", "mtime", "ctime", "atimensec", "mtimensec",
            "ctimensec", "mode", "nlink", "uid", "gid", "rdev", "blksize", "flags")
    assert fuse.fuse_attr.flat_fields == attr
    assert fuse.fuse_entry_out.flat_fields == (
        "nodeid", "generation", "entry_valid", "attr_valid", "entry_valid_nsec",
        "attr_valid_nsec") + tuple(f"attr.{n}" for n in attr)
    assert fuse.fuse_attr_out.flat_fields == (
        "attr_valid", "attr_valid_nsec", "dummy") + tuple(f"attr.{n}" for n in attr)
    assert fuse.fuse_out_header.flat_fields == ("len", "error", "unique")
    assert fuse.fuse_direntplus.flat_fields == tuple(
        f"entry_out.{n}" for n in fuse.fuse_entry_out.flat_fields) + tuple(
        f"dirent.{n}" for n in ("ino", "off", "namelen", "type"))


def test_server_attr_encoding_matches_keyword_packing():
    from vfsd.fsapi import Attr, Entry
    from vfsd.server import FuseServer
    a = Attr(ino=7, size=1 << 40, blocks=9, atime_ns=-1_500_000_000, mtime_ns=2, ctime_ns=3,
             mode=0o20644, nlink=2, uid=1, gid=2, rdev=__import__("os").makedev(300, 70000),
             blksize=4096)
    srv = FuseServer(fs=None)
    got = fuse.fuse_entry_out.unpack(srv._entry(Entry(5, 0, a)))
    # the reference: keyword packing, times as two's-complement u64, rdev as
    # the kernel's new_encode_dev(300, 70000)
    want = fuse.fuse_attr.unpack(fuse.fuse_attr.pack(
        ino=7, size=1 << 40, blocks=9, atime=(-2) & ((1 << 64) - 1), atimensec=500_000_000,
        mtime=0, mtimensec=2, ctime=0, ctimensec=3, mode=0o20644, nlink=2, uid=1, gid=2,
        rdev=(70000 & 0xFF) | (300 << 8) | ((70000 & ~0xFF) << 12), blksize=4096))
    assert got.attr == want and got.nodeid == 5
    assert fuse.fuse_attr_out.unpack(srv._attr_out(a)).attr == want
    # FUSE_ATTR_SUBMOUNT only once FUSE_SUBMOUNTS is negotiated, for entries and attrs alike
    sub = a._replace(submount=True)
    assert fuse.fuse_attr_out.unpack(srv._attr_out(sub)).attr.flags == 0
    srv.flags = fuse.InitFlag.SUBMOUNTS
    assert fuse.fuse_entry_out.unpack(srv._entry(Entry(5, 0, sub))).attr.flags == 1


def test_flat_unpack_from_and_pack_into():
    # the arguments inside a longer buffer (a name follows), and a reply
    # header packed into a slice of guest memory
    args = fuse.fuse_mkdir_in.pack(mode=0o755, umask=0o22) + b"d\0"
    assert fuse.fuse_mkdir_in.flat_unpack_from(memoryview(args)) == (0o755, 0o22)
    assert fuse.fuse_mkdir_in.flat_unpack_from(b"xx" + args, 2) == (0o755, 0o22)
    with pytest.raises(struct.error):
        fuse.fuse_mkdir_in.flat_unpack_from(args[:7])
    buf = bytearray(20)
    fuse.fuse_out_header.flat_pack_into(memoryview(buf)[4:], 0, 16, -2, 99)
    assert fuse.fuse_out_header.unpack(bytes(buf[4:])) == (16, -2, 99)
    assert buf[:4] == b"\0" * 4
