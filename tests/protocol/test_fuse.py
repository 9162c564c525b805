"""FUSE over the virtqueues of the real daemon: requests laid out as Linux virtio_fs.c does."""

from __future__ import annotations

import errno
import os
import stat
import threading

import pytest

from protocol import fuse
from tests.fuse_client import (LINUX_6_1_INIT_FLAGS, FuseClient, FuseError, next_unique)

from .conftest import assert_serving, request_queues

Op = fuse.Opcode


def test_init(fe):
    c = FuseClient(fe, queue=1)
    out = c.init(minor=38, flags=LINUX_6_1_INIT_FLAGS)
    assert out.major == 7
    assert 31 <= out.minor <= 38
    assert out.max_write >= 4096
    # Only flags the guest offered may be accepted.
    accepted = out.flags | (out.flags2 << 32 if out.flags & fuse.InitFlag.INIT_EXT else 0)
    assert accepted & ~int(LINUX_6_1_INIT_FLAGS) == 0, f"accepted flags not offered: {accepted:#x}"


def test_init_old_minor_gets_compatible_reply(fe):
    """A 7.31 guest (first with virtio-fs) sends the 16-byte init_in."""
    c = FuseClient(fe, queue=1)
    args = fuse.fuse_init_in.pack(major=7, minor=31, max_readahead=65536,
                                  flags=int(fuse.InitFlag.ASYNC_READ | fuse.InitFlag.BIG_WRITES))
    err, payload = c.request(Op.INIT, 0, args[:fuse.COMPAT_INIT_IN_SIZE], fuse.fuse_init_out.size)
    assert err == 0
    out = fuse.fuse_init_out.unpack_from(payload + bytes(64 - len(payload)))
    assert out.major == 7 and out.minor == 31


def test_request_before_init_is_refused(fe):
    c = FuseClient(fe, queue=1)
    err, _ = c.request(Op.GETATTR, 1, fuse.fuse_getattr_in.pack(), fuse.fuse_attr_out.size)
    assert err != 0


def test_lookup_and_getattr_host_file(client, shared_dir, daemon):
    p = shared_dir / "hello.txt"
    p.write_bytes(b"hello, world\n")
    os.chmod(p, 0o640)
    daemon.chown(p)
    st = os.stat(p)
    e = client.lookup(1, "hello.txt")
    assert e.nodeid not in (0, 1)
    assert e.attr.size == 13
    assert stat.S_ISREG(e.attr.mode)
    assert stat.S_IMODE(e.attr.mode) == 0o640
    assert e.attr.mtime == int(st.st_mtime)
    a = client.getattr(e.nodeid)
    assert a.attr.size == 13 and a.attr.mode == e.attr.mode and a.attr.ino == e.attr.ino
    # A second lookup gives the same node id.
    assert client.lookup(1, "hello.txt").nodeid == e.nodeid


def test_lookup_foreign_unreadable_file(client, shared_dir, daemon):
    """A host file the daemon's user cannot read (another owner, 0640) can still be
    looked up and stat'ed: LOOKUP/GETATTR need no read access to the file."""
    if daemon.uid == 0:
        pytest.skip("daemon runs as root")
    p = shared_dir / "foreign.txt"
    p.write_bytes(b"abc")
    os.chmod(p, 0o640)
    os.lchown(p, 0, 0)
    e = client.lookup(1, "foreign.txt")
    assert e.attr.size == 3 and stat.S_ISREG(e.attr.mode)
    client.getattr(e.nodeid)


def test_lookup_missing_is_enoent(client):
    with pytest.raises(FuseError) as ei:
        client.lookup(1, "does-not-exist")
    assert ei.value.errno == errno.ENOENT


def test_getattr_root(client, shared_dir):
    a = client.getattr(1)
    assert stat.S_ISDIR(a.attr.mode)
    assert a.attr.ino != 0


@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_create_write_read(client, shared_dir, indirect):
    client.indirect = indirect
    entry, opened = client.create(1, "new.bin", mode=0o600)
    assert stat.S_ISREG(entry.attr.mode) and entry.attr.size == 0
    data = os.urandom(3 * 4096 + 123)
    assert client.write(entry.nodeid, opened.fh, 0, data) == len(data)
    assert client.read(entry.nodeid, opened.fh, 0, len(data)) == data
    # Multi-descriptor write and read (page-sized buffers like the kernel's).
    assert client.write(entry.nodeid, opened.fh, len(data), data, chunk=4096) == len(data)
    back = client.read(entry.nodeid, opened.fh, 0, 2 * len(data) + 500, chunk=4096)
    assert back == data + data  # short read at EOF
    # Odd-sized, unaligned pieces too.
    assert client.read(entry.nodeid, opened.fh, 1000, 10000, chunk=333) == (data + data)[1000:11000]
    client.release(entry.nodeid, opened.fh)
    assert (shared_dir / "new.bin").read_bytes() == data + data
    assert stat.S_IMODE(client.getattr(entry.nodeid).attr.mode) == 0o600


def test_open_existing_and_read(client, shared_dir):
    payload = bytes(range(256)) * 64
    (shared_dir / "f").write_bytes(payload)
    e = client.lookup(1, "f")
    o = client.open(e.nodeid, os.O_RDONLY)
    assert client.read(e.nodeid, o.fh, 0, 1 << 16, chunk=4096, flags=os.O_RDONLY) == payload
    assert client.read(e.nodeid, o.fh, len(payload), 4096, flags=os.O_RDONLY) == b""
    client.release(e.nodeid, o.fh, os.O_RDONLY)


def test_large_write_and_read(client, shared_dir):
    """A max_write-sized transfer through an indirect table of pages."""
    size = min(client.init_out.max_write, 256 * 1024)
    data = os.urandom(size)
    entry, opened = client.create(1, "big")
    assert client.write(entry.nodeid, opened.fh, 0, data, chunk=4096, indirect=True) == size
    assert client.read(entry.nodeid, opened.fh, 0, size, chunk=4096, indirect=True) == data
    client.release(entry.nodeid, opened.fh)
    assert (shared_dir / "big").read_bytes() == data


def test_mkdir(client, shared_dir):
    e = client.mkdir(1, "sub", 0o750)
    assert stat.S_ISDIR(e.attr.mode)
    assert (shared_dir / "sub").is_dir()
    assert stat.S_IMODE(e.attr.mode) == 0o750
    # Nested: create inside the new directory.
    e2, o2 = client.create(e.nodeid, "inner.txt")
    client.release(e2.nodeid, o2.fh)
    assert (shared_dir / "sub" / "inner.txt").is_file()
    with pytest.raises(FuseError) as ei:
        client.mkdir(1, "sub")
    assert ei.value.errno == errno.EEXIST


def test_readdir(client, shared_dir):
    names = {f"file{i:03d}" for i in range(60)}
    for n in names:
        (shared_dir / n).write_text(n)
    (shared_dir / "adir").mkdir()
    # Small buffers force several READDIR rounds with offsets.
    entries = client.listdir(1, size=512)
    got = [e.name.decode() for e in entries]
    assert len(got) == len(set(got)), "duplicate entries across READDIR rounds"
    assert names | {"adir"} <= set(got)
    assert set(got) - {".", ".."} == names | {"adir"}
    kinds = {e.name.decode(): e.type for e in entries}
    assert kinds["adir"] == stat.S_IFDIR >> 12
    assert kinds["file000"] == stat.S_IFREG >> 12


def test_unlink(client, shared_dir):
    (shared_dir / "gone").write_text("x")
    client.lookup(1, "gone")
    client.unlink(1, "gone")
    assert not (shared_dir / "gone").exists()
    with pytest.raises(FuseError) as ei:
        client.lookup(1, "gone")
    assert ei.value.errno == errno.ENOENT
    with pytest.raises(FuseError) as ei:
        client.unlink(1, "gone")
    assert ei.value.errno == errno.ENOENT


def test_forget_on_hiprio(client, fe, daemon, shared_dir):
    (shared_dir / "f").write_text("x")
    e = client.lookup(1, "f")
    client.lookup(1, "f")
    used = client.forget(e.nodeid, 2)
    assert used.len == 0, "FORGET has no reply: the device writes nothing"
    # FORGET of an unknown node and of the root are harmless.
    client.forget(1 << 50, 1)
    client.forget(1, 1)
    # Still serving; the name can be looked up again.
    assert client.lookup(1, "f").attr.size == 1
    assert daemon.alive()


def test_forget_many_then_lookup(client, shared_dir):
    (shared_dir / "g").write_text("abc")
    ids = [client.lookup(1, "g").nodeid for _ in range(10)]
    assert len(set(ids)) == 1
    for _ in range(10):
        client.forget(ids[0], 1)
    assert client.lookup(1, "g").attr.size == 3


def test_unknown_opcode_is_enosys(client):
    for opcode in (999, 4095, Op.SETUPMAPPING):
        err, payload = client.request(opcode, 1, b"\0" * 16, 64)
        assert err == errno.ENOSYS, (opcode, err)
        assert payload == b""


@pytest.mark.parametrize("daemon_args,xattr,acl", [
    ((), False, False),                    # virtiofsd's defaults: neither
    (("--xattr",), True, False),           # --xattr alone: no ACLs
    (("--posix-acl",), True, True),        # implies --xattr
    (("-o", "xattr"), True, False),
    (("--posix-acl", "--no-posix-acl"), False, False),
], ids=["default", "xattr", "posix-acl", "o-xattr", "no-posix-acl"])
def test_guest_xattr_defaults(client, shared_dir, daemon_args, xattr, acl):
    """Without --xattr the guest gets ENOSYS for every xattr request (and its kernel stops
    asking); FUSE_POSIX_ACL only with --posix-acl.  The ownership record is kept either way."""
    F = fuse.InitFlag
    flags = client.init_out.flags | (client.init_out.flags2 << 32)
    assert bool(flags & F.POSIX_ACL) == acl and bool(flags & F.DONT_MASK) == acl
    e, o = client.create(1, "f", mode=0o640)
    client.release(e.nodeid, o.fh)
    want = (lambda err: err == 0) if xattr else (lambda err: err == errno.ENOSYS)
    get = client.request(Op.GETXATTR, e.nodeid, fuse.fuse_getxattr_in.pack(size=64)
                         + b"user.x\0", 64)
    assert get.error == (errno.ENODATA if xattr else errno.ENOSYS), get.error
    acl_get = client.request(Op.GETXATTR, e.nodeid, fuse.fuse_getxattr_in.pack(size=64)
                             + b"system.posix_acl_access\0", 64)
    assert acl_get.error == (errno.ENODATA if xattr else errno.ENOSYS), acl_get.error
    ext = bool(flags & F.SETXATTR_EXT)
    set_in = fuse.fuse_setxattr_in.pack(size=3, flags=0)
    if not ext:
        set_in = set_in[:fuse.COMPAT_SETXATTR_IN_SIZE]
    put = client.request(Op.SETXATTR, e.nodeid, [set_in, b"user.x\0", b"abc"])
    assert want(put.error), put.error
    lst = client.request(Op.LISTXATTR, e.nodeid, fuse.fuse_getxattr_in.pack(size=4096), 4096)
    assert want(lst.error), lst.error
    assert (b"user.x\0" in lst.payload) == xattr and b"user.o\0" not in lst.payload
    rm = client.request(Op.REMOVEXATTR, e.nodeid, b"user.x\0")
    assert want(rm.error), rm.error
    host = os.listxattr(shared_dir / "f")
    assert "user.o" in host and "user.x" not in host      # the record, nothing else left


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../outside", "/etc", "sub/../../outside"])
def test_bad_names_are_refused(client, shared_dir, workdir, name):
    tmp_path = workdir
    outside = workdir / "outside"
    outside.mkdir(exist_ok=True)
    os.chmod(outside, 0o777)  # writable by the daemon's user: only vfsd's checks stop an escape
    (outside / "secret").write_text("secret")
    (shared_dir / "sub").mkdir(exist_ok=True)
    sub = client.lookup(1, "sub").nodeid
    before = sorted(p.name for p in tmp_path.iterdir())
    for parent in (1, sub):
        for op in ("lookup", "mkdir", "create", "unlink"):
            with pytest.raises(FuseError) as ei:
                if op == "lookup":
                    client.lookup(parent, name)
                elif op == "mkdir":
                    client.mkdir(parent, name)
                elif op == "create":
                    client.create(parent, name)
                else:
                    client.unlink(parent, name)
            assert ei.value.errno in (errno.EINVAL, errno.EPERM, errno.EACCES, errno.ENOENT), (op, name)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "something appeared outside the share"
    assert (outside / "secret").read_text() == "secret"
    assert sorted(p.name for p in shared_dir.iterdir()) == ["sub"]
    assert list((shared_dir / "sub").iterdir()) == []


def test_symlink_out_of_share_not_followed(client, shared_dir, workdir):
    outside = workdir / "outside2"
    outside.mkdir()
    os.chmod(outside, 0o777)
    (outside / "secret").write_text("secret")
    os.symlink(str(outside), shared_dir / "link")
    e = client.lookup(1, "link")
    assert stat.S_ISLNK(e.attr.mode)
    for name in ("secret", "new"):
        with pytest.raises(FuseError):
            client.lookup(e.nodeid, name)
    with pytest.raises(FuseError):
        client.create(e.nodeid, "new")
    assert sorted(os.listdir(outside)) == ["secret"]


def test_two_request_queues_concurrently(client, fe, shared_dir, daemon):
    qs = request_queues(fe)
    assert len(qs) >= 2, f"daemon offers {fe.queue_num} queues: need 2 request queues"
    errors: list[BaseException] = []

    def worker(qi: int):
        try:
            c = FuseClient(fe, queue=qi, timeout=10.0)
            for i in range(25):
                name = f"q{qi}-{i}"
                data = os.urandom(5000 + i)
                e, o = c.create(1, name)
                assert c.write(e.nodeid, o.fh, 0, data, chunk=4096) == len(data)
                assert c.read(e.nodeid, o.fh, 0, 8192, chunk=2048) == data[:8192]
                c.release(e.nodeid, o.fh)
                c.getattr(e.nodeid)
        except BaseException as ex:  # noqa: BLE001 - reported below
            errors.append(ex)

    threads = [threading.Thread(target=worker, args=(qi,)) for qi in qs[:2]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "worker hung"
    assert not errors, errors
    assert len(list(shared_dir.iterdir())) == 50


def test_many_requests_in_flight(client, fe):
    """Fill the ring with outstanding requests, then collect them all."""
    q = fe.queues[1]
    uniques = {}
    for _ in range(30):  # 4 descriptors each: 120 of the 128
        u = next_unique()
        hdr = fuse.fuse_in_header.pack(len=40 + 16, opcode=Op.GETATTR, unique=u, nodeid=1)
        head = q.add([hdr, fuse.fuse_getattr_in.pack()], [16, fuse.fuse_attr_out.size], indirect=False)
        uniques[head] = u
    q.kick()
    used = q.wait_used(10.0, count=30)
    assert sorted(x.id for x in used) == sorted(uniques)
    for x in used:
        oh = fuse.fuse_out_header.unpack_from(x.written)
        assert oh.unique == uniques[x.id] and oh.error == 0 and oh.len == x.len
    assert len(q.free_descs) == q.size


def test_still_serving_after_errors(client, fe, daemon):
    for _ in range(3):
        with pytest.raises(FuseError):
            client.lookup(1, "nope")
    assert_serving(fe, daemon)
