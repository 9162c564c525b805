"""The FUSE server over the passthrough filesystem, in process (no transport).

Requests are real FUSE bytes fed through `Reader`/`Writer`, so the decoding,
the dispatch, the records on the host and the replies are all exercised.
"""

import errno
import os
import stat

import pytest

from protocol import fuse
from protocol.buffers import Reader, Writer
from vfsd import ownership
from vfsd.passthrough import PassthroughFs
from vfsd.server import FuseServer

UID, GID = 1234, 5678


class Session:
    def __init__(self, root):
        self.fs = PassthroughFs(str(root))
        self.server = FuseServer(self.fs)
        self.unique = 0
        err, body = self.call(fuse.Opcode.INIT, 0, fuse.fuse_init_in.pack(
            major=7, minor=38, max_readahead=65536, flags=0xFFFFFFFF, flags2=0))
        assert err == 0
        self.init = fuse.fuse_init_out.unpack(body[:64])

    def call(self, opcode, nodeid, args=b"", out=1 << 16, uid=UID, gid=GID, extra=()):
        self.unique += 1
        payload = args + b"".join(extra)
        hdr = fuse.fuse_in_header.pack(len=40 + len(payload), opcode=opcode,
                                       unique=self.unique, nodeid=nodeid, uid=uid, gid=gid)
        buf = bytearray(out)
        n = self.server.handle(Reader([memoryview(hdr + payload)]), Writer([memoryview(buf)]))
        if n == 0:
            return None, b""
        oh = fuse.fuse_out_header.unpack(bytes(buf[:16]))
        assert oh.unique == self.unique and oh.len == n
        return -oh.error, bytes(buf[16:n])

    def ok(self, *a, **kw):
        err, body = self.call(*a, **kw)
        assert err == 0, os.strerror(err)
        return body

    def entry(self, body):
        return fuse.fuse_entry_out.unpack(body[:128])


@pytest.fixture
def s(tmp_path):
    (tmp_path / "share").mkdir()
    return Session(tmp_path / "share")


def record(path):
    return ownership.decode(os.getxattr(path, "user.o", follow_symlinks=False))


def test_init_negotiates(s):
    assert s.init.major == 7 and s.init.minor == 38
    assert s.init.flags & fuse.InitFlag.DO_READDIRPLUS
    assert s.init.max_write >= 4096


def test_request_before_init_is_eio(tmp_path):
    srv = FuseServer(PassthroughFs(str(tmp_path)))
    hdr = fuse.fuse_in_header.pack(len=40, opcode=fuse.Opcode.GETATTR, unique=1, nodeid=1)
    buf = bytearray(256)
    n = srv.handle(Reader([memoryview(hdr)]), Writer([memoryview(buf)]))
    assert fuse.fuse_out_header.unpack(bytes(buf[:16])).error == -errno.EIO and n == 16


def test_create_write_read_and_record(s, tmp_path):
    body = s.ok(fuse.Opcode.CREATE, 1, fuse.fuse_create_in.pack(
        flags=os.O_RDWR, mode=stat.S_IFREG | 0o4755), extra=[b"f\0"])
    e = s.entry(body)
    fh = fuse.fuse_open_out.unpack(body[128:144]).fh
    assert e.attr.uid == UID and e.attr.gid == GID and e.attr.mode == stat.S_IFREG | 0o4755
    data = os.urandom(10000)
    w = s.ok(fuse.Opcode.WRITE, e.nodeid, fuse.fuse_write_in.pack(fh=fh, size=len(data)),
             extra=[data])
    assert fuse.fuse_write_out.unpack(w).size == len(data)
    r = s.ok(fuse.Opcode.READ, e.nodeid, fuse.fuse_read_in.pack(fh=fh, size=20000))
    assert r == data
    host = tmp_path / "share" / "f"
    st = os.stat(host)
    assert st.st_uid == os.getuid() and not st.st_mode & (stat.S_ISUID | stat.S_ISGID)
    assert record(host) == ownership.Record(UID, GID, stat.S_IFREG | 0o4755)
    assert host.read_bytes() == data


def test_setattr_chown_chmod_lands_in_record(s, tmp_path):
    e = s.entry(s.ok(fuse.Opcode.MKDIR, 1, fuse.fuse_mkdir_in.pack(mode=0o755), extra=[b"d\0"]))
    V = fuse.SetattrValid
    body = s.ok(fuse.Opcode.SETATTR, e.nodeid, fuse.fuse_setattr_in.pack(
        valid=V.UID | V.GID | V.MODE, uid=42, gid=43, mode=stat.S_IFDIR | 0o1777))
    a = fuse.fuse_attr_out.unpack(body).attr
    assert (a.uid, a.gid, a.mode) == (42, 43, stat.S_IFDIR | 0o1777)
    assert record(tmp_path / "share" / "d") == ownership.Record(42, 43, stat.S_IFDIR | 0o1777)
    assert not os.stat(tmp_path / "share" / "d").st_mode & stat.S_ISVTX


def test_special_files_are_regular_on_host(s, tmp_path):
    rdev = (4 << 8) | 5  # new_encode_dev(4, 5)
    e = s.entry(s.ok(fuse.Opcode.MKNOD, 1, fuse.fuse_mknod_in.pack(
        mode=stat.S_IFCHR | 0o620, rdev=rdev), extra=[b"tty5\0"]))
    assert stat.S_ISCHR(e.attr.mode) and e.attr.rdev == rdev
    e2 = s.entry(s.ok(fuse.Opcode.SYMLINK, 1, extra=[b"ln\0", b"../../etc/passwd\0"]))
    assert stat.S_ISLNK(e2.attr.mode) and e2.attr.uid == UID
    assert s.ok(fuse.Opcode.READLINK, e2.nodeid) == b"../../etc/passwd"
    for name in ("tty5", "ln"):
        assert stat.S_ISREG(os.lstat(tmp_path / "share" / name).st_mode)
    # chown -h on the guest symlink lands in its record
    s.ok(fuse.Opcode.SETATTR, e2.nodeid, fuse.fuse_setattr_in.pack(
        valid=fuse.SetattrValid.UID, uid=7))
    assert record(tmp_path / "share" / "ln").uid == 7


def test_host_files_show_default_owner(s, tmp_path):
    p = tmp_path / "share" / "hostfile"
    p.write_text("x")
    os.chmod(p, 0o6755)
    e = s.entry(s.ok(fuse.Opcode.LOOKUP, 1, extra=[b"hostfile\0"]))
    assert e.attr.uid == os.getuid() and e.attr.mode == stat.S_IFREG | 0o755


@pytest.mark.parametrize("name", [b"..", b".", b"a/b", b"", b"../../etc"])
def test_bad_names_rejected(s, name):
    err, _ = s.call(fuse.Opcode.LOOKUP, 1, extra=[name + b"\0"])
    assert err == errno.EINVAL


def test_name_without_nul_and_lying_lengths(s):
    assert s.call(fuse.Opcode.LOOKUP, 1, extra=[b"abc"])[0] == errno.EINVAL
    hdr = fuse.fuse_in_header.pack(len=4000, opcode=fuse.Opcode.LOOKUP, unique=9, nodeid=1)
    buf = bytearray(256)
    s.server.handle(Reader([memoryview(hdr + b"x\0")]), Writer([memoryview(buf)]))
    assert fuse.fuse_out_header.unpack(bytes(buf[:16])).error == -errno.EINVAL
    # a WRITE whose size exceeds the data it carries
    err, _ = s.call(fuse.Opcode.WRITE, 1, fuse.fuse_write_in.pack(fh=1, size=1 << 20),
                    extra=[b"short"])
    assert err == errno.EINVAL


def test_unknown_opcode_enosys(s):
    assert s.call(999, 1)[0] == errno.ENOSYS
    assert s.call(fuse.Opcode.GETLK, 1, b"\0" * 48)[0] == errno.ENOSYS


def test_readdir_and_readdirplus(s):
    for n in (b"a", b"b", b"c"):
        s.ok(fuse.Opcode.MKNOD, 1, fuse.fuse_mknod_in.pack(mode=stat.S_IFIFO | 0o644),
             extra=[n + b"\0"])
    fh = fuse.fuse_open_out.unpack(s.ok(fuse.Opcode.OPENDIR, 1, fuse.fuse_open_in.pack())).fh
    body = s.ok(fuse.Opcode.READDIR, 1, fuse.fuse_read_in.pack(fh=fh, size=4096))
    names, off = {}, 0
    while off < len(body):
        d = fuse.fuse_dirent.unpack_from(body, off)
        names[body[off + 24:off + 24 + d.namelen]] = d.type
        off += fuse.dirent_align(24 + d.namelen)
    assert names == {b".": 4, b"..": 4, b"a": 1, b"b": 1, b"c": 1}  # DT_FIFO from records
    body = s.ok(fuse.Opcode.READDIRPLUS, 1, fuse.fuse_read_in.pack(fh=fh, size=4096))
    d = fuse.fuse_direntplus.unpack_from(body, 0)
    assert d.dirent.namelen == 1
    s.ok(fuse.Opcode.RELEASEDIR, 1, fuse.fuse_release_in.pack(fh=fh))


def test_rename_link_unlink_forget(s, tmp_path):
    e = s.entry(s.ok(fuse.Opcode.MKNOD, 1, fuse.fuse_mknod_in.pack(mode=stat.S_IFREG | 0o600),
                     extra=[b"x\0"]))
    s.ok(fuse.Opcode.RENAME, 1, fuse.fuse_rename_in.pack(newdir=1), extra=[b"x\0y\0"])
    l = s.entry(s.ok(fuse.Opcode.LINK, 1, fuse.fuse_link_in.pack(oldnodeid=e.nodeid),
                     extra=[b"z\0"]))
    assert l.nodeid == e.nodeid and l.attr.nlink == 2
    s.ok(fuse.Opcode.UNLINK, 1, extra=[b"y\0"])
    assert s.call(fuse.Opcode.FORGET, e.nodeid, fuse.fuse_forget_in.pack(nlookup=2))[0] is None
    assert s.call(fuse.Opcode.GETATTR, e.nodeid, fuse.fuse_getattr_in.pack())[0] == errno.EBADF
    assert sorted(os.listdir(tmp_path / "share")) == ["z"]


def test_statfs(s):
    st = fuse.fuse_statfs_out.unpack(s.ok(fuse.Opcode.STATFS, 1)).st
    assert st.bsize > 0 and st.namelen == 255
