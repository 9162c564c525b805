"""FuseServer.handle_views: requests laid out as Linux's virtio-fs lays them
out are served straight from the buffers; every other shape, and every
request while requests are logged, goes through `handle`.  Both must give the
same answer, bad input included (test_server_fs.py runs its whole suite
through both)."""

import errno
import logging
import os
import stat

import pytest

from protocol import fuse
from protocol.buffers import Reader, Writer
from vfsd.passthrough import PassthroughFs
from vfsd.server import FuseServer

UID, GID = 1234, 5678


def header(opcode, nodeid, nargs, unique=7, length=None, total_extlen=0):
    return fuse.fuse_in_header.pack(len=40 + nargs if length is None else length,
                                    opcode=opcode, unique=unique, nodeid=nodeid, uid=UID,
                                    gid=GID, pid=1, total_extlen=total_extlen)


class Server:
    def __init__(self, root):
        self.fs = PassthroughFs(str(root))
        self.server = FuseServer(self.fs)
        init = fuse.fuse_init_in.pack(major=7, minor=38, max_readahead=65536,
                                      flags=0xFFFFFFFF, flags2=0)
        assert self.one_buffer(header(fuse.Opcode.INIT, 0, len(init)) + init)[0] == 0

    def one_buffer(self, request: bytes, out: int = 4096):
        """Through `handle`, the request in one buffer: (errno, reply args, used len)."""
        buf = bytearray(out)
        n = self.server.handle(Reader([memoryview(request)]), Writer([memoryview(buf)]))
        return self._parse(buf, n)

    def views(self, readable: list[bytes], out_sizes=(16, 4096), readable_len=None):
        """Through `handle_views`, one view per item: (errno, reply args, used len)."""
        r = [memoryview(bytearray(b)) for b in readable]
        bufs = [bytearray(k) for k in out_sizes]
        n = self.server.handle_views(r, [memoryview(b) for b in bufs],
                                     sum(map(len, readable)) if readable_len is None
                                     else readable_len, sum(out_sizes))
        return self._parse(b"".join(bufs), n)

    @staticmethod
    def _parse(buf, n):
        if n == 0:
            return None, b"", 0
        oh = fuse.fuse_out_header.unpack(bytes(buf[:16]))
        assert oh.len == n and oh.unique == 7
        return -oh.error, bytes(buf[16:n]), n


@pytest.fixture
def srv(tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    (share / "f").write_bytes(b"data")
    server = Server(share)
    yield server
    server.fs.close()


def lookup_parts(name=b"f\0", **kw):
    return [header(fuse.Opcode.LOOKUP, 1, len(name), **kw), name]


def test_linux_layout_answers_as_one_buffer(srv):
    hdr, name = lookup_parts()
    one = srv.one_buffer(hdr + name)
    assert one[0] == 0 and srv.views([hdr, name]) == one
    node = fuse.fuse_entry_out.unpack(one[1]).nodeid
    args = fuse.fuse_getattr_in.pack()
    hdr = header(fuse.Opcode.GETATTR, node, len(args))
    assert srv.views([hdr, args]) == srv.one_buffer(hdr + args)


def test_header_split_across_buffers_goes_through_handle(srv):
    hdr, name = lookup_parts()
    err, body, _ = srv.views([hdr[:24], hdr[24:] + name])
    assert err == 0 and fuse.fuse_entry_out.unpack(body).attr.size == 4
    err, body, _ = srv.views([hdr + name])   # header and arguments in one buffer
    assert err == 0 and fuse.fuse_entry_out.unpack(body).attr.size == 4


def test_reply_header_split_goes_through_handle(srv):
    err, body, n = srv.views(lookup_parts(), out_sizes=(8, 8, 4096))
    assert err == 0 and n == 16 + fuse.fuse_entry_out.size


def test_header_len_beyond_the_buffers_is_einval(srv):
    hdr, name = lookup_parts(length=4000)
    assert srv.views([hdr, name])[0] == errno.EINVAL
    assert srv.views([hdr, name], readable_len=4000)[0] == errno.EINVAL


def test_header_len_short_of_the_buffers_reads_only_len(srv):
    # The request is what fuse_in_header.len says; a longer chain is cut to it.
    hdr, name = lookup_parts(b"f\0garbage", length=42)
    err, body, _ = srv.views([hdr, name])
    assert err == 0 and fuse.fuse_entry_out.unpack(body).attr.size == 4
    # buffers past the length are not part of the request
    hdr, name = lookup_parts()
    assert srv.views([hdr, name, b"junk"])[0] == 0
    # but without the cut the name would carry trailing bytes: EINVAL
    hdr, name = lookup_parts(b"f\0garbage")
    assert srv.views([hdr, name])[0] == errno.EINVAL


@pytest.mark.parametrize("name", [b"a/b\0", b"..\0", b"\0", b"f", b"f\0\0x"])
def test_bad_names_rejected(srv, name):
    assert srv.views(lookup_parts(name))[0] == errno.EINVAL
    assert not os.path.exists("a")


def test_short_arguments_are_einval(srv, caplog):
    hdr = header(fuse.Opcode.SETATTR, 1, 10)
    with caplog.at_level(logging.WARNING, "vfsd.server"):
        assert srv.views([hdr, b"\0" * 10])[0] == errno.EINVAL
    assert "SETATTR unique=7 nodeid=1: malformed request" in caplog.text
    assert srv.one_buffer(hdr + b"\0" * 10)[0] == errno.EINVAL


def test_reply_larger_than_its_buffer_is_eio(srv, caplog):
    with caplog.at_level(logging.WARNING, "vfsd.server"):
        assert srv.views(lookup_parts(), out_sizes=(16, 100)) == (errno.EIO, b"", 16)
        assert srv.views(lookup_parts(), out_sizes=(16,)) == (errno.EIO, b"", 16)
    assert "LOOKUP unique=7: reply of 128 bytes does not fit in 100; EIO" in caplog.text
    # a reply without arguments needs no second buffer
    args = fuse.fuse_release_in.pack(fh=12345)
    assert srv.views([header(fuse.Opcode.RELEASE, 1, len(args)), args],
                     out_sizes=(16,))[0] == errno.EBADF


def test_filesystem_bug_is_eio_and_logged(srv, caplog, monkeypatch):
    def broken(*a):
        raise RuntimeError("bug")
    monkeypatch.setattr(srv.fs, "getattr", broken)
    args = fuse.fuse_getattr_in.pack()
    with caplog.at_level(logging.ERROR, "vfsd.server"):
        assert srv.views([header(fuse.Opcode.GETATTR, 1, len(args)), args])[0] == errno.EIO
    assert "GETATTR unique=7 nodeid=1: internal error" in caplog.text


def test_extensions_go_through_handle(srv):
    # A CREATE with a security context (7.38 extension) keeps it: the context
    # reaches the filesystem only through `handle`'s dispatch.
    seen = []
    create = srv.fs.create
    srv.fs.create = lambda ctx, *a: seen.append(ctx.secctx) or create(ctx, *a)
    srv.server.flags |= fuse.InitFlag.SECURITY_CTX
    name = b"sec\0"
    ctx = fuse.fuse_secctx.pack(size=3) + b"security.test\0" + b"lbl"
    size = 8 + len(ctx) + (-(8 + len(ctx)) % 8)
    ext = (fuse.fuse_secctx_header.pack(size=size, nr_secctx=1) + ctx).ljust(size, b"\0")
    args = fuse.fuse_create_in.pack(flags=os.O_RDWR, mode=stat.S_IFREG | 0o644) + name + ext
    hdr = header(fuse.Opcode.CREATE, 1, len(args), total_extlen=len(ext) // 8)
    srv.views([hdr, args])
    assert seen == [((b"security.test", b"lbl"),)]


def test_requests_are_logged_when_debugging(srv, caplog):
    args = fuse.fuse_getattr_in.pack()
    with caplog.at_level(logging.DEBUG, "vfsd.server"):
        assert srv.views([header(fuse.Opcode.GETATTR, 1, len(args)), args])[0] == 0
    assert "GETATTR unique=7 nodeid=1 uid=1234 gid=5678 pid=1" in caplog.text


def test_before_init_goes_through_handle(tmp_path):
    server = FuseServer(PassthroughFs(str(tmp_path)))
    args = fuse.fuse_getattr_in.pack()
    out = bytearray(256)
    n = server.handle_views([memoryview(header(fuse.Opcode.GETATTR, 1, len(args))),
                             memoryview(args)], [memoryview(out)[:16], memoryview(out)[16:]],
                            56, 256)
    assert n == 16 and fuse.fuse_out_header.unpack(bytes(out[:16])).error == -errno.EIO


def test_forget_in_one_buffer(srv):
    hdr, name = lookup_parts()
    node = fuse.fuse_entry_out.unpack(srv.views([hdr, name])[1]).nodeid
    assert srv.fs._inode(node) is not None
    args = fuse.fuse_forget_in.pack(nlookup=1)
    assert srv.views([header(fuse.Opcode.FORGET, node, len(args)) + args], out_sizes=()) == \
        (None, b"", 0)
    with pytest.raises(OSError):
        srv.fs._inode(node)


def test_batch_forget_count_beyond_the_request_forgets_nothing(srv, caplog):
    hdr, name = lookup_parts()
    node = fuse.fuse_entry_out.unpack(srv.views([hdr, name])[1]).nodeid
    args = fuse.fuse_batch_forget_in.pack(count=3) + fuse.fuse_forget_one.pack(
        nodeid=node, nlookup=1)
    with caplog.at_level(logging.WARNING, "vfsd.server"):
        srv.views([header(fuse.Opcode.BATCH_FORGET, 0, len(args)) + args], out_sizes=())
    assert "BATCH_FORGET count 3 exceeds the request" in caplog.text
    assert srv.fs._inode(node) is not None
