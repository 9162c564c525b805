"""The FUSE server over the passthrough filesystem, in process (no transport).

Requests are real FUSE bytes, so the decoding, the dispatch, the records on
the host and the replies are all exercised.  Every test runs twice: with the
request in one buffer through `handle` (Reader/Writer), and laid out as Linux's
virtio-fs lays it out through `handle_views`, which serves the common opcodes
straight from the buffers.
"""

import errno
import fcntl
import logging
import os
import stat

import pytest

from protocol import fuse
from protocol.buffers import Reader, Writer
from vfsd import ownership
from vfsd.cli import parse_args
from vfsd.daemon import filesystem, session_options
from vfsd.fsapi import Ctx
from vfsd.passthrough import PassthroughFs
from vfsd import server as server_mod
from vfsd.server import FuseServer

UID, GID = 1234, 5678


class Session:
    def __init__(self, root, layout="reader", options: tuple[str, ...] | None = None,
                 fs: PassthroughFs | None = None):
        """`options`: vfsd's command line for the filesystem and the session
        (None: PassthroughFs's and FuseServer's own defaults); `fs`: the
        filesystem to serve, made by the caller."""
        if fs is not None:
            self.fs = fs
            self.server = FuseServer(self.fs)
        elif options is None:
            self.fs = PassthroughFs(str(root))
            self.server = FuseServer(self.fs)
        else:
            config = parse_args(["--shared-dir", str(root), "--socket-path", "/nonexistent",
                                 *options])
            self.fs = filesystem(config)
            self.server = FuseServer(self.fs, session_options(config))
        self.layout = layout
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
        # (views: a replyless request comes as one buffer on the hiprio queue)
        reply = self.raw(hdr + payload, 0 if self.layout == "views"
                         and opcode in fuse.NO_REPLY else out)
        if not reply:
            return None, b""
        oh = fuse.fuse_out_header.unpack(reply[:16])
        assert oh.unique == self.unique and oh.len == len(reply)
        return -oh.error, reply[16:]

    def raw(self, request: bytes, room: int) -> bytes:
        """`request` (fuse_in_header and the rest, whatever its fields say) with
        `room` bytes for the reply: the bytes the server wrote."""
        buf = bytearray(room)
        if self.layout == "reader":
            n = self.server.handle(Reader([memoryview(request)]), Writer([memoryview(buf)]))
        elif not room:   # as virtio_fs.c sends a request on the hiprio queue
            n = self.server.handle_views([memoryview(request)], [], len(request), 0)
        else:  # virtio_fs_enqueue_req: header | arguments, reply header | reply arguments
            readable = [memoryview(request[:40])] + (
                [memoryview(request[40:])] if len(request) > 40 else [])
            writable = ([memoryview(buf)[:16], memoryview(buf)[16:]] if room > 16
                        else [memoryview(buf)])
            n = self.server.handle_views(readable, writable, len(request), room)
        return bytes(buf[:n])

    def close(self):
        """Unmount (DESTROY ends the session's listings too) and close the fds."""
        if self.server.initialized:
            self.call(fuse.Opcode.DESTROY, 1)
        self.fs.close()

    def ok(self, *a, **kw):
        err, body = self.call(*a, **kw)
        assert err == 0, os.strerror(err)
        return body

    def entry(self, body):
        return fuse.fuse_entry_out.unpack(body[:128])


@pytest.fixture(params=["reader", "views"])
def s(tmp_path, request):
    (tmp_path / "share").mkdir()
    session = Session(tmp_path / "share", request.param)
    yield session
    session.close()   # (the node fds would pile up over the suite otherwise)


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


NAME_CASES = [b"a\0", b"a\0\0\0", b"a\0b", b"a\0\0b", b"a", b"", b"\0", b".\0", b"..\0",
              b"...\0", b"a/b\0", b"/\0", b"x" * 255 + b"\0", b"x" * 256 + b"\0", b"\xff\xfe\0"]


@pytest.mark.parametrize("data", NAME_CASES)
def test_parse_name_is_parse_names_of_one(data):
    """_parse_name, the one-name fast path, accepts and refuses exactly what
    _parse_names(data, 1) does, with the same error."""
    def outcome(fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - the exception is the outcome compared
            return type(e), getattr(e, "errno", None), str(e)
    want = outcome(lambda: server_mod._parse_names(data, 1)[0])
    assert outcome(lambda: server_mod._parse_name(data)) == want
    assert outcome(lambda: server_mod._parse_name(memoryview(data))) == want


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
    plus, off = {}, 0
    while off < len(body):
        d = fuse.fuse_direntplus.unpack_from(body, off)
        name = body[off + fuse.fuse_direntplus.size:
                    off + fuse.fuse_direntplus.size + d.dirent.namelen]
        plus[name] = (d.dirent.type, stat.S_IFMT(d.entry_out.attr.mode))
        off += fuse.dirent_align(fuse.fuse_direntplus.size + d.dirent.namelen)
    # the type of each looked-up entry comes from its record, as in READDIR
    assert {n: t for n, (t, _) in plus.items()} == names
    assert all(m == stat.S_IFIFO for n, (_, m) in plus.items() if n not in (b".", b".."))
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


# ----------------------------------------------------------------------------
# Issue 3: xattrs through the escaping map, ACLs, whiteouts, tmpfiles, space
# ----------------------------------------------------------------------------
def setxattr(s, nodeid, name, value, flags=0, setxattr_flags=0):
    return s.call(fuse.Opcode.SETXATTR, nodeid, fuse.fuse_setxattr_in.pack(
        size=len(value), flags=flags, setxattr_flags=setxattr_flags),
        extra=[name + b"\0", value])[0]


def getxattr(s, nodeid, name, size=4096):
    return s.call(fuse.Opcode.GETXATTR, nodeid, fuse.fuse_getxattr_in.pack(size=size),
                  extra=[name + b"\0"])


def listxattr(s, nodeid, size=4096):
    err, body = s.call(fuse.Opcode.LISTXATTR, nodeid, fuse.fuse_getxattr_in.pack(size=size))
    return err, body


def mkfile(s, name, mode=0o644):
    return s.entry(s.ok(fuse.Opcode.MKNOD, 1, fuse.fuse_mknod_in.pack(mode=stat.S_IFREG | mode),
                        extra=[name + b"\0"]))


def test_xattr_names_are_escaped_on_the_host(s, tmp_path):
    e = mkfile(s, b"f")
    host = tmp_path / "share" / "f"
    for name, value in [(b"user.o", b"nested record"), (b"user.o.x", b"1"),
                        (b"trusted.overlay.opaque", b"y"), (b"security.selinux", b"lbl"),
                        (b"user.plain", b"p")]:
        assert setxattr(s, e.nodeid, name, value) == 0, name
        err, body = getxattr(s, e.nodeid, name)
        assert err == 0 and body == value
    on_host = set(os.listxattr(host))
    assert on_host == {"user.o", "user.o.o", "user.o.o.x", "user.o.trusted.overlay.opaque",
                       "user.o.security.selinux", "user.plain"}
    assert ownership.decode(os.getxattr(host, "user.o")).uid == UID  # the real record intact
    err, body = listxattr(s, e.nodeid)
    assert sorted(body.split(b"\0")[:-1]) == sorted(
        [b"user.o", b"user.o.x", b"trusted.overlay.opaque", b"security.selinux", b"user.plain"])
    err, body = listxattr(s, e.nodeid, size=0)
    assert fuse.fuse_getxattr_out.unpack(body).size == len(listxattr(s, e.nodeid)[1])
    assert listxattr(s, e.nodeid, size=5)[0] == errno.ERANGE
    assert getxattr(s, e.nodeid, b"user.plain", size=0)[1] == fuse.fuse_getxattr_out.pack(size=1)
    assert getxattr(s, e.nodeid, b"user.nope")[0] == errno.ENODATA
    assert getxattr(s, e.nodeid, b"system.foo")[0] == errno.EOPNOTSUPP
    assert setxattr(s, e.nodeid, b"user." + b"a" * 251, b"") == errno.ERANGE  # 256 bytes
    assert setxattr(s, e.nodeid, b"user.plain", b"q", flags=os.XATTR_CREATE) == errno.EEXIST
    assert setxattr(s, e.nodeid, b"user.new", b"q", flags=os.XATTR_REPLACE) == errno.ENODATA
    assert s.call(fuse.Opcode.REMOVEXATTR, e.nodeid, extra=[b"user.o\0"])[0] == 0
    assert "user.o.o" not in os.listxattr(host) and "user.o" in os.listxattr(host)


def test_setxattr_lying_size(s):
    e = mkfile(s, b"f")
    err, _ = s.call(fuse.Opcode.SETXATTR, e.nodeid, fuse.fuse_setxattr_in.pack(size=100),
                    extra=[b"user.a\0", b"short"])
    assert err == errno.EINVAL


def acl(*entries):
    from vfsd import posix_acl as pa
    return pa.encode([pa.AclEntry(*e) for e in entries])


def test_access_acl_sets_mode_and_chmod_updates_acl(s, tmp_path):
    from vfsd import posix_acl as pa
    e = mkfile(s, b"f", 0o644)
    value = acl((pa.ACL_USER_OBJ, 6), (pa.ACL_USER, 6, 1234), (pa.ACL_GROUP_OBJ, 4),
                (pa.ACL_MASK, 6), (pa.ACL_OTHER, 0))
    assert setxattr(s, e.nodeid, pa.ACCESS, value) == 0
    a = fuse.fuse_attr_out.unpack(s.ok(fuse.Opcode.GETATTR, e.nodeid)).attr
    assert a.mode & 0o777 == 0o660  # group bits from the mask
    s.ok(fuse.Opcode.SETATTR, e.nodeid, fuse.fuse_setattr_in.pack(
        valid=fuse.SetattrValid.MODE, mode=0o640))
    got = pa.parse(getxattr(s, e.nodeid, pa.ACCESS)[1])
    assert {x.tag: x.perm for x in got}[pa.ACL_MASK] == 4
    # an ACL equivalent to the mode is not stored; it just sets the mode
    assert setxattr(s, e.nodeid, pa.ACCESS, acl((pa.ACL_USER_OBJ, 7), (pa.ACL_GROUP_OBJ, 5),
                                                 (pa.ACL_OTHER, 1))) == 0
    assert getxattr(s, e.nodeid, pa.ACCESS)[0] == errno.ENODATA
    a = fuse.fuse_attr_out.unpack(s.ok(fuse.Opcode.GETATTR, e.nodeid)).attr
    assert a.mode & 0o777 == 0o751


def test_default_acl_inherited_and_umask(s):
    from vfsd import posix_acl as pa
    d = s.entry(s.ok(fuse.Opcode.MKDIR, 1, fuse.fuse_mkdir_in.pack(mode=0o777, umask=0o022),
                     extra=[b"d\0"]))
    assert d.attr.mode & 0o777 == 0o755  # DONT_MASK: the server applied the umask
    default = acl((pa.ACL_USER_OBJ, 7), (pa.ACL_USER, 7, 1234), (pa.ACL_GROUP_OBJ, 5),
                  (pa.ACL_MASK, 7), (pa.ACL_OTHER, 5))
    assert setxattr(s, d.nodeid, pa.DEFAULT, default) == 0
    f = s.entry(s.ok(fuse.Opcode.MKNOD, d.nodeid, fuse.fuse_mknod_in.pack(
        mode=stat.S_IFREG | 0o666, umask=0o077), extra=[b"f\0"]))
    assert f.attr.mode & 0o777 == 0o664  # umask ignored, mask limits group
    got = {(x.tag, x.id): x.perm for x in pa.parse(getxattr(s, f.nodeid, pa.ACCESS)[1])}
    assert got[(pa.ACL_USER, 1234)] == 7 and got[(pa.ACL_MASK, pa.ACL_UNDEFINED_ID)] == 6
    sub = s.entry(s.ok(fuse.Opcode.MKDIR, d.nodeid, fuse.fuse_mkdir_in.pack(mode=0o777),
                       extra=[b"sub\0"]))
    assert getxattr(s, sub.nodeid, pa.DEFAULT)[1] == default


def test_rename_whiteout(s, tmp_path):
    mkfile(s, b"a")
    s.ok(fuse.Opcode.RENAME2, 1, fuse.fuse_rename2_in.pack(newdir=1, flags=4),
         extra=[b"a\0b\0"])
    w = s.entry(s.ok(fuse.Opcode.LOOKUP, 1, extra=[b"a\0"]))
    assert stat.S_ISCHR(w.attr.mode) and w.attr.rdev == 0
    assert stat.S_ISREG(os.lstat(tmp_path / "share" / "a").st_mode)
    assert (tmp_path / "share" / "b").exists()


def test_tmpfile_then_link(s, tmp_path):
    body = s.ok(fuse.Opcode.TMPFILE, 1, fuse.fuse_create_in.pack(
        flags=os.O_RDWR | os.O_TMPFILE, mode=stat.S_IFREG | 0o600), extra=[b"tmp\0"])
    e = s.entry(body)
    assert e.attr.nlink == 0 and os.listdir(tmp_path / "share") == []
    s.ok(fuse.Opcode.LINK, 1, fuse.fuse_link_in.pack(oldnodeid=e.nodeid), extra=[b"named\0"])
    assert record(tmp_path / "share" / "named").uid == UID


def test_fallocate_lseek_copy_file_range_syncfs(s, tmp_path):
    body = s.ok(fuse.Opcode.CREATE, 1, fuse.fuse_create_in.pack(
        flags=os.O_RDWR, mode=stat.S_IFREG | 0o644), extra=[b"sparse\0"])
    e, fh = s.entry(body), fuse.fuse_open_out.unpack(body[128:144]).fh
    big = 5 << 30  # past 4 GiB
    s.ok(fuse.Opcode.WRITE, e.nodeid, fuse.fuse_write_in.pack(fh=fh, offset=big, size=4),
         extra=[b"tail"])
    s.ok(fuse.Opcode.WRITE, e.nodeid, fuse.fuse_write_in.pack(fh=fh, offset=0, size=4096),
         extra=[b"d" * 4096])
    blocks = os.stat(tmp_path / "share" / "sparse").st_blocks
    s.ok(fuse.Opcode.FALLOCATE, e.nodeid, fuse.fuse_fallocate_in.pack(
        fh=fh, offset=1 << 20, length=1 << 20, mode=0))
    assert os.stat(tmp_path / "share" / "sparse").st_blocks >= blocks + 2048
    off = fuse.fuse_lseek_out.unpack(s.ok(fuse.Opcode.LSEEK, e.nodeid, fuse.fuse_lseek_in.pack(
        fh=fh, offset=8192, whence=os.SEEK_DATA))).offset
    assert off >= big - 4096 and off <= big
    hole = fuse.fuse_lseek_out.unpack(s.ok(fuse.Opcode.LSEEK, e.nodeid, fuse.fuse_lseek_in.pack(
        fh=fh, offset=0, whence=os.SEEK_HOLE))).offset
    assert hole == 4096
    body2 = s.ok(fuse.Opcode.CREATE, 1, fuse.fuse_create_in.pack(
        flags=os.O_RDWR, mode=stat.S_IFREG | 0o644), extra=[b"copy\0"])
    fh2 = fuse.fuse_open_out.unpack(body2[128:144]).fh
    n = fuse.fuse_write_out.unpack(s.ok(fuse.Opcode.COPY_FILE_RANGE, e.nodeid,
                                        fuse.fuse_copy_file_range_in.pack(
        fh_in=fh, off_in=big, fh_out=fh2, off_out=0, len=4))).size
    assert n == 4 and (tmp_path / "share" / "copy").read_bytes() == b"tail"
    assert os.stat(tmp_path / "share" / "sparse").st_size == big + 4
    s.ok(fuse.Opcode.SYNCFS, 1, fuse.fuse_syncfs_in.pack())


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_guest_chown_of_host_special_file(s, tmp_path, kind):
    p = tmp_path / "share" / "sub"
    p.mkdir()
    if kind == "symlink":
        os.symlink("../target", p / "x")
    else:
        os.mkfifo(p / "x")
    d = s.entry(s.ok(fuse.Opcode.LOOKUP, 1, extra=[b"sub\0"]))
    e = s.entry(s.ok(fuse.Opcode.LOOKUP, d.nodeid, extra=[b"x\0"]))
    a = fuse.fuse_attr_out.unpack(s.ok(fuse.Opcode.SETATTR, e.nodeid, fuse.fuse_setattr_in.pack(
        valid=fuse.SetattrValid.UID | fuse.SetattrValid.GID, uid=77, gid=88))).attr
    assert (a.uid, a.gid) == (77, 88)
    assert stat.S_IFMT(a.mode) == (stat.S_IFLNK if kind == "symlink" else stat.S_IFIFO)
    assert stat.S_ISREG(os.lstat(p / "x").st_mode) and record(p / "x").uid == 77
    if kind == "symlink":
        assert s.ok(fuse.Opcode.READLINK, e.nodeid) == b"../target"
    assert sorted(os.listdir(p)) == ["x"]  # no temporary names left behind
    a2 = fuse.fuse_attr_out.unpack(s.ok(fuse.Opcode.GETATTR, e.nodeid)).attr
    assert a2.uid == 77


@pytest.mark.parametrize("timeout", [1.5, 0.0])
def test_lookup_of_a_missing_name_is_a_negative_entry_while_entries_are_cached(tmp_path,
                                                                                timeout):
    # fs/fuse/dir.c fuse_lookup_name: "Zero nodeid is same as -ENOENT, but with
    # valid timeout"; with no entry caching (cache=never) it is a plain ENOENT.
    from vfsd.server import SessionOptions
    (tmp_path / "share").mkdir()
    s = Session(tmp_path / "share", "views")
    s.server = FuseServer(s.fs, SessionOptions(entry_timeout=timeout, attr_timeout=timeout))
    assert s.call(fuse.Opcode.INIT, 0, fuse.fuse_init_in.pack(major=7, minor=38))[0] == 0
    err, body = s.call(fuse.Opcode.LOOKUP, 1, b"missing\0")
    if timeout:
        assert err == 0
        e = s.entry(body)
        assert (e.nodeid, e.entry_valid, e.entry_valid_nsec) == (0, 1, 500_000_000)
        assert e.attr.ino == 0 and e.attr.mode == 0
    else:
        assert err == errno.ENOENT and body == b""
    assert s.call(fuse.Opcode.LOOKUP, 1, b"a/b\0")[0] == errno.EINVAL  # still refused
    assert s.call(fuse.Opcode.LOOKUP, 99, b"x\0")[0] == errno.EBADF   # unknown parent


def test_security_ctx_extension_labels_new_files(tmp_path):
    from vfsd.server import SessionOptions
    (tmp_path / "share").mkdir()
    s = Session.__new__(Session)
    s.fs = PassthroughFs(str(tmp_path / "share"))
    s.server = FuseServer(s.fs, SessionOptions(security_label=True))
    s.unique, s.layout = 0, "reader"
    assert s.call(fuse.Opcode.INIT, 0, fuse.fuse_init_in.pack(
        major=7, minor=38, flags=fuse.InitFlag.INIT_EXT,
        flags2=fuse.InitFlag.SECURITY_CTX >> 32))[0] == 0
    label = b"system_u:object_r:tmp_t:s0\0"
    entry = fuse.fuse_secctx.pack(size=len(label)) + b"security.selinux\0" + label
    entry += b"\0" * (fuse.dirent_align(len(entry)) - len(entry))
    ext = fuse.fuse_secctx_header.pack(size=8 + len(entry), nr_secctx=1) + entry
    args = fuse.fuse_mknod_in.pack(mode=stat.S_IFREG | 0o644) + b"lbl\0"
    args += b"\0" * (fuse.dirent_align(len(args)) - len(args))
    s.unique += 1
    payload = args + ext
    hdr = fuse.fuse_in_header.pack(len=40 + len(payload), opcode=fuse.Opcode.MKNOD,
                                   unique=s.unique, nodeid=1, uid=UID, gid=GID,
                                   total_extlen=len(ext) // 8)
    buf = bytearray(4096)
    n = s.server.handle(Reader([memoryview(hdr + payload)]), Writer([memoryview(buf)]))
    assert fuse.fuse_out_header.unpack(bytes(buf[:16])).error == 0, bytes(buf[:16])
    assert os.getxattr(tmp_path / "share" / "lbl", "user.o.security.selinux") == label


def test_file_opens_say_noflush_and_directory_opens_do_not(s):
    """FLUSH does nothing here, so every file open and create tells the guest not to
    send one on each close(2) (FOPEN_NOFLUSH); directories have no FLUSH at all."""
    body = s.ok(fuse.Opcode.CREATE, 1, fuse.fuse_create_in.pack(
        flags=os.O_RDWR, mode=stat.S_IFREG | 0o644), extra=[b"nf\0"])
    created = fuse.fuse_open_out.unpack(body[128:144])
    assert created.open_flags & fuse.OpenFlag.NOFLUSH
    node = s.entry(body).nodeid
    opened = fuse.fuse_open_out.unpack(s.ok(fuse.Opcode.OPEN, node,
                                            fuse.fuse_open_in.pack(flags=os.O_RDONLY)))
    assert opened.open_flags & fuse.OpenFlag.NOFLUSH
    d = fuse.fuse_open_out.unpack(s.ok(fuse.Opcode.OPENDIR, 1,
                                       fuse.fuse_open_in.pack(flags=os.O_RDONLY)))
    assert not d.open_flags & fuse.OpenFlag.NOFLUSH
    # a guest that sends FLUSH anyway (writeback cache) still gets an answer
    s.ok(fuse.Opcode.FLUSH, node, fuse.fuse_flush_in.pack(fh=opened.fh))


@pytest.mark.parametrize("writeback", [False, True])
def test_open_flags_under_the_writeback_cache(tmp_path, writeback):
    """With the writeback cache the guest reads through write-only opens and writes dirty
    pages of O_APPEND files back at their offsets, so the host fd is O_RDWR without
    O_APPEND (as virtiofsd does); without it the guest's flags go through as they are."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "f").write_bytes(b"0123456789")
    fs = PassthroughFs(str(share), writeback=writeback)
    ctx = Ctx(0, 0, 1)
    node = fs.lookup(ctx, 1, b"f").nodeid
    o = fs.open(ctx, node, os.O_WRONLY | os.O_APPEND)
    fl = fcntl.fcntl(fs._handles[o.fh].fd, fcntl.F_GETFL)
    assert (fl & os.O_ACCMODE, bool(fl & os.O_APPEND)) == (
        (os.O_RDWR, False) if writeback else (os.O_WRONLY, True))
    # a dirty page written back at its own offset lands there, not at the end
    assert fs.write(ctx, node, o.fh, 2, [b"ab"]) == 2
    assert (share / "f").read_bytes() == (b"01ab456789" if writeback else b"0123456789ab")
    fs.release(ctx, node, o.fh)
    fs.close()


# Wire fields wider than what they stand for: u64 offsets that are the guest's
# loff_t, u32 flags that are a C int, u32 ids where (u32)-1 is "no id".  The
# guest's kernel never sends the top values; a misbehaving guest gets a clear
# errno for each (what the guest's own VFS or the host would answer), nothing
# changes on the host, and the log shows no internal error.
NEG = 1 << 63          # the first u64 that is negative as loff_t
NO_ID = 0xFFFFFFFF     # (uid_t)-1
SV = fuse.SetattrValid


def test_fields_out_of_range_get_an_errno_and_change_nothing(s, tmp_path, caplog):
    host = tmp_path / "share" / "f"
    body = s.ok(fuse.Opcode.CREATE, 1, fuse.fuse_create_in.pack(
        flags=os.O_RDWR, mode=stat.S_IFREG | 0o644), extra=[b"f\0"], out=4096)
    node = s.entry(body).nodeid
    fh = fuse.fuse_open_out.unpack(body[fuse.fuse_entry_out.size:][:16]).fh
    assert s.call(fuse.Opcode.WRITE, node, fuse.fuse_write_in.pack(fh=fh, size=4),
                  extra=[b"data"])[0] == 0
    before = os.stat(host), record(host)

    def err(opcode, args, extra=(), **kw):
        return s.call(opcode, node, args, extra=extra, **kw)[0]

    for off in (NEG, (1 << 64) - 1):
        assert err(fuse.Opcode.READ, fuse.fuse_read_in.pack(fh=fh, offset=off, size=4)) \
            == errno.EINVAL   # (as -1 the host would read at the fd's own position)
        assert err(fuse.Opcode.WRITE, fuse.fuse_write_in.pack(fh=fh, offset=off, size=4),
                   [b"XXXX"]) == errno.EINVAL
        assert err(fuse.Opcode.FALLOCATE, fuse.fuse_fallocate_in.pack(
            fh=fh, offset=off, length=1)) == errno.EINVAL
        assert err(fuse.Opcode.FALLOCATE, fuse.fuse_fallocate_in.pack(
            fh=fh, offset=0, length=off)) == errno.EINVAL
        for field in ("off_in", "off_out"):
            assert err(fuse.Opcode.COPY_FILE_RANGE, fuse.fuse_copy_file_range_in.pack(
                fh_in=fh, nodeid_out=node, fh_out=fh, len=1, **{field: off})) == errno.EINVAL
        assert err(fuse.Opcode.SETATTR, fuse.fuse_setattr_in.pack(
            valid=SV.SIZE, size=off)) == errno.EINVAL
    # lseek(2)'s offset is signed: SEEK_DATA from -5 is the host's to answer
    assert err(fuse.Opcode.LSEEK, fuse.fuse_lseek_in.pack(
        fh=fh, offset=(1 << 64) - 5, whence=os.SEEK_DATA)) == errno.ENXIO
    # chown's "unchanged" id is no owner; the size in the same request stays too
    for valid, ids in ((SV.UID, dict(uid=NO_ID)), (SV.GID, dict(gid=NO_ID)),
                       (SV.UID | SV.GID | SV.SIZE, dict(uid=7, gid=NO_ID, size=0))):
        assert err(fuse.Opcode.SETATTR, fuse.fuse_setattr_in.pack(valid=valid, **ids)) \
            == errno.EINVAL
    for flags in (1 << 31, NO_ID, 4):   # setxattr(2) knows XATTR_CREATE|XATTR_REPLACE only
        assert err(fuse.Opcode.SETXATTR, fuse.fuse_setxattr_in.pack(size=1, flags=flags),
                   [b"user.a\0", b"x"]) == errno.EINVAL
    after = os.stat(host), record(host)
    assert (after[0].st_size, after[0].st_mtime_ns, after[1]) == \
        (before[0].st_size, before[0].st_mtime_ns, before[1])
    assert host.read_bytes() == b"data" and "user.a" not in os.listxattr(host)

    # fuse_in_header ids: the guest's fuse sends no request as (u32)-1 (EOVERFLOW)
    for uid, gid in ((NO_ID, GID), (UID, NO_ID)):
        for opcode, args, extra in (
                (fuse.Opcode.MKDIR, fuse.fuse_mkdir_in.pack(mode=0o755), [b"d\0"]),
                (fuse.Opcode.MKNOD, fuse.fuse_mknod_in.pack(mode=stat.S_IFIFO | 0o644),
                 [b"p\0"]),
                (fuse.Opcode.CREATE, fuse.fuse_create_in.pack(
                    flags=os.O_RDWR, mode=stat.S_IFREG | 0o644), [b"c\0"]),
                (fuse.Opcode.SYMLINK, b"", [b"l\0", b"f\0"]),
                (fuse.Opcode.TMPFILE, fuse.fuse_create_in.pack(
                    flags=os.O_RDWR, mode=stat.S_IFREG | 0o644), [b"t\0"])):
            assert s.call(opcode, 1, args, extra=extra, uid=uid, gid=gid)[0] == errno.EOVERFLOW
    assert os.listdir(tmp_path / "share") == ["f"]

    # bit 31 is no open flag: dropped, as open(2) drops it
    for opcode, nodeid, args, extra in (
            (fuse.Opcode.OPEN, node, fuse.fuse_open_in.pack(flags=(1 << 31) | os.O_RDONLY), ()),
            (fuse.Opcode.CREATE, 1, fuse.fuse_create_in.pack(
                flags=(1 << 31) | os.O_RDWR, mode=stat.S_IFREG | 0o644), [b"g\0"]),
            (fuse.Opcode.TMPFILE, 1, fuse.fuse_create_in.pack(
                flags=NO_ID & ~os.O_ACCMODE | os.O_RDWR, mode=stat.S_IFREG | 0o644), [b"t\0"])):
        assert s.call(opcode, nodeid, args, extra=extra, out=4096)[0] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
