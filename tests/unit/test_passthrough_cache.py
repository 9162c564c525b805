"""What the passthrough filesystem remembers per live node to save host syscalls
(records, absent reserved xattrs, interned records), and what keeps it right:
the daemon's own writes update it, host-side edits show once the node is
forgotten (docs/ownership.md, Host representation)."""

import collections
import errno
import fcntl
import os
import stat

import pytest

from tests.fds import open_fds
from vfsd import ownership
from vfsd import posix_acl as pa
from vfsd.fsapi import NOW, Ctx, SetAttr
from vfsd.passthrough import PassthroughFs

CTX = Ctx(1234, 5678, 1)
CAPS = b"security.capability"
HOST_ACCESS = "user.o.system.posix_acl_access"
Forget = collections.namedtuple("Forget", "nodeid nlookup")


@pytest.fixture
def share(tmp_path):
    d = tmp_path / "share"
    d.mkdir()
    return d


@pytest.fixture
def fs(share):
    f = PassthroughFs(str(share))
    yield f
    f.close()


def counted(monkeypatch, *names: str) -> collections.Counter:
    """Counts of the calls of these os functions made through the os module."""
    counts = collections.Counter()
    for fn in names:
        real = getattr(os, fn)

        def wrapper(*a, _real=real, _fn=fn, **kw):
            counts[_fn] += 1
            return _real(*a, **kw)
        monkeypatch.setattr(os, fn, wrapper)
    return counts


@pytest.fixture
def calls(monkeypatch):
    """Counts of os.getxattr / os.removexattr calls."""
    return counted(monkeypatch, "getxattr", "removexattr")


def acl(*entries):
    return pa.encode([pa.AclEntry(*e) for e in entries])


ACL = acl((pa.ACL_USER_OBJ, 6), (pa.ACL_USER, 6, 1234), (pa.ACL_GROUP_OBJ, 4),
          (pa.ACL_MASK, 6), (pa.ACL_OTHER, 0))


def enodata(fs, nodeid, name):
    with pytest.raises(OSError) as e:
        fs.getxattr(CTX, nodeid, name)
    return e.value.errno == errno.ENODATA


def host_file(share, name, rec=ownership.Record(1000, 1000, 0o100644)):
    p = share / name
    p.write_bytes(b"x")
    os.setxattr(p, "user.o", ownership.encode(rec))
    return p


def test_new_objects_answer_acl_and_caps_reads_without_syscalls(fs, calls):
    e, o = fs.create(CTX, 1, b"f", 0o644, 0o022, os.O_RDWR)
    fs.release(CTX, e.nodeid, o.fh)
    d = fs.mkdir(CTX, 1, b"d", 0o755, 0)
    s = fs.symlink(CTX, 1, b"l", b"target")
    n = fs.mknod(CTX, 1, b"p", stat.S_IFIFO | 0o644, 0, 0)
    calls.clear()
    for nodeid in (e.nodeid, d.nodeid, s.nodeid, n.nodeid):
        for name in (pa.ACCESS, pa.DEFAULT, CAPS):
            assert enodata(fs, nodeid, name)
    assert calls["getxattr"] == 0


def test_absence_is_learned_once_per_live_node(fs, share, calls):
    p = host_file(share, "h")
    e = fs.lookup(CTX, 1, b"h")
    calls.clear()
    assert enodata(fs, e.nodeid, pa.ACCESS) and calls["getxattr"] == 1
    assert enodata(fs, e.nodeid, pa.ACCESS) and calls["getxattr"] == 1
    # A host-side edit of the daemon's reserved tree, like one of the record,
    # shows once the guest has forgotten the node.
    os.setxattr(p, HOST_ACCESS, ACL)
    assert enodata(fs, e.nodeid, pa.ACCESS)
    fs.forget(e.nodeid, 1)
    e = fs.lookup(CTX, 1, b"h")
    assert fs.getxattr(CTX, e.nodeid, pa.ACCESS) == ACL


def test_a_forgotten_node_looked_up_again_needs_no_record_read(fs, share, calls):
    host_file(share, "h")
    e = fs.lookup(CTX, 1, b"h")
    assert enodata(fs, e.nodeid, pa.ACCESS)
    fs.forget(e.nodeid, 1)
    calls.clear()
    again = fs.lookup(CTX, 1, b"h")
    assert again.nodeid != e.nodeid
    assert (again.attr.uid, again.attr.gid, again.attr.mode) == (1000, 1000, 0o100644)
    assert enodata(fs, again.nodeid, pa.ACCESS)    # the known absence came back too
    assert calls["getxattr"] == 0


def test_a_record_the_guest_wrote_survives_the_forget(fs, share, calls):
    host_file(share, "h")
    e = fs.lookup(CTX, 1, b"h")
    fs.setattr(CTX, e.nodeid, SetAttr(uid=7, gid=8, mode=0o640))
    fs.forget(e.nodeid, 1)
    calls.clear()
    again = fs.lookup(CTX, 1, b"h")
    assert (again.attr.uid, again.attr.gid, again.attr.mode) == (7, 8, 0o100640)
    assert calls["getxattr"] == 0


def test_the_guests_writes_and_utimens_keep_a_record_checked(fs, share, calls):
    # `echo x > f` (CREATE, WRITE), a tar's utimens, a truncate: each moves
    # the ctime, and the daemon knows each move is its own.
    e, o = fs.create(CTX, 1, b"f", 0o644, 0o022, os.O_RDWR)
    fs.write(CTX, e.nodeid, o.fh, 0, [b"x\n"])
    fs.release(CTX, e.nodeid, o.fh)
    host_file(share, "h")
    h = fs.lookup(CTX, 1, b"h")
    o = fs.open(CTX, h.nodeid, os.O_WRONLY)
    fs.write(CTX, h.nodeid, o.fh, 0, [b"abc", b"def"])
    fs.setattr(CTX, h.nodeid, SetAttr(atime_ns=10**9, mtime_ns=2 * 10**9))
    fs.setattr(CTX, h.nodeid, SetAttr(size=2, fh=o.fh))
    fs.release(CTX, h.nodeid, o.fh)
    before = {n: os.stat(share / n).st_ctime_ns for n in ("f", "h")}
    fs.forget(e.nodeid, 1)
    fs.forget(h.nodeid, 1)
    calls.clear()
    for name, uid in ((b"f", 1234), (b"h", 1000)):
        a = fs.lookup(CTX, 1, name).attr
        assert a.uid == uid
    assert calls["getxattr"] == 0
    assert before == {n: os.stat(share / n).st_ctime_ns for n in ("f", "h")}


NEW = ownership.encode(ownership.Record(42, 43, 0o100600))


@pytest.mark.parametrize("when", ["while live", "after the forget"])
@pytest.mark.parametrize("edit", ["record", "mode", "data", "replaced"])
def test_any_host_change_makes_a_forgotten_node_read_its_record_again(fs, share, when, edit):
    p = host_file(share, "h")
    e = fs.lookup(CTX, 1, b"h")

    def change():
        if edit == "record":
            os.setxattr(p, "user.o", NEW)
        elif edit == "mode":             # a change that leaves the record alone
            os.chmod(p, 0o604)
            os.setxattr(p, "user.o", NEW)
            os.chmod(p, 0o644)
        elif edit == "data":
            os.setxattr(p, "user.o", NEW)
            p.write_bytes(b"more")
        else:                            # a new inode under the name
            host_file(share, "h.new", ownership.Record(42, 43, 0o100600))
            os.rename(share / "h.new", p)
    if when == "while live":
        change()
        # later looks at the node bless nothing: a GETATTR, a chown to the
        # owner it has (no record written), a utimens
        fs.getattr(CTX, e.nodeid, None)
        fs.setattr(CTX, e.nodeid, SetAttr(uid=1000, gid=1000))
        fs.setattr(CTX, e.nodeid, SetAttr(atime_ns=NOW, mtime_ns=NOW))
        fs.setattr(CTX, e.nodeid, SetAttr(size=3))
        o = fs.open(CTX, e.nodeid, os.O_WRONLY)
        fs.write(CTX, e.nodeid, o.fh, 0, [b"abc"])
        fs.release(CTX, e.nodeid, o.fh)
        fs.forget(e.nodeid, 1)
    else:
        fs.forget(e.nodeid, 1)
        change()
    a = fs.lookup(CTX, 1, b"h").attr
    assert (a.uid, a.gid, a.mode) == (42, 43, 0o100600)


def test_coarse_timestamps_do_not_trust_a_recent_ctime(fs, share, calls):
    fs._fine_ctime = False               # as on a filesystem without multigrain ctime
    host_file(share, "h")                # changed just now
    fs.forget(fs.lookup(CTX, 1, b"h").nodeid, 1)
    calls.clear()
    fs.forget(fs.lookup(CTX, 1, b"h").nodeid, 1)
    assert calls["getxattr"] == 1
    os.utime(share / "h", ns=(0, 0))     # (utime moves ctime to now too)
    st = os.stat(share / "h")
    assert fs._seen(st.st_ctime_ns - 10**9) is not None
    assert fs._seen(st.st_ctime_ns) is None


def test_the_forgotten_records_are_bounded_and_dropped_at_unmount(fs, share, monkeypatch):
    monkeypatch.setattr("vfsd.passthrough._MAX_FORGOTTEN", 3)
    for n in "abcde":
        host_file(share, n)
        fs.forget(fs.lookup(CTX, 1, n.encode()).nodeid, 1)
    keys = [(os.stat(share / n).st_dev, os.stat(share / n).st_ino) for n in "cde"]
    assert list(fs._forgotten) == keys   # the oldest went first
    fs.lookup(CTX, 1, b"d")
    assert len(fs._forgotten) == 2       # taken by the live node again
    fs.destroy()
    assert not fs._forgotten


def test_plain_user_xattrs_are_never_remembered_absent(fs, share):
    p = host_file(share, "h")
    e = fs.lookup(CTX, 1, b"h")
    assert enodata(fs, e.nodeid, b"user.comment")
    os.setxattr(p, "user.comment", b"set on the host")
    assert fs.getxattr(CTX, e.nodeid, b"user.comment") == b"set on the host"


def test_daemon_writes_keep_the_absence_right(fs, share):
    e, o = fs.create(CTX, 1, b"f", 0o644, 0o022, os.O_RDWR)
    for name, value in ((CAPS, b"\1\0\0\2caps"), (b"trusted.overlay.opaque", b"y")):
        assert enodata(fs, e.nodeid, name)
        fs.setxattr(CTX, e.nodeid, name, value, 0)
        assert fs.getxattr(CTX, e.nodeid, name) == value
        fs.removexattr(CTX, e.nodeid, name)
        assert enodata(fs, e.nodeid, name)
        fs.setxattr(CTX, e.nodeid, name, value, 0)
        assert fs.getxattr(CTX, e.nodeid, name) == value
    # the access ACL: set (not equivalent to a mode), then chmod rewrites it
    fs.setxattr(CTX, e.nodeid, pa.ACCESS, ACL, 0)
    assert fs.getxattr(CTX, e.nodeid, pa.ACCESS) == ACL
    assert fs.setattr(CTX, e.nodeid, SetAttr(mode=0o640)).mode & 0o777 == 0o640
    got = {x.tag: x.perm for x in pa.parse(fs.getxattr(CTX, e.nodeid, pa.ACCESS))}
    assert got[pa.ACL_MASK] == 4
    # a write that must drop capabilities removes them
    fs.write(CTX, e.nodeid, o.fh, 0, [b"data"], kill_caps=True)
    assert CAPS.decode() not in " ".join(os.listxattr(share / "f"))
    assert enodata(fs, e.nodeid, CAPS)


def test_kill_caps_costs_one_removexattr_until_caps_are_set_again(fs, calls):
    e, o = fs.create(CTX, 1, b"f", 0o644, 0o022, os.O_RDWR)
    fs.setxattr(CTX, e.nodeid, CAPS, b"caps", 0)
    calls.clear()
    for _ in range(3):
        fs.write(CTX, e.nodeid, o.fh, 0, [b"x"], kill_caps=True)
    assert calls["removexattr"] == 1 and enodata(fs, e.nodeid, CAPS)
    fs.setxattr(CTX, e.nodeid, CAPS, b"caps", 0)
    fs.setattr(CTX, e.nodeid, SetAttr(uid=1, kill_suidgid=True))
    assert calls["removexattr"] == 2 and enodata(fs, e.nodeid, CAPS)


def test_a_kill_that_clears_nothing_writes_no_record(fs, share):
    """Under KILLPRIV_V2 a truncate by any caller without CAP_FSETID carries
    FATTR_KILL_SUIDGID: a host file without a record keeps having none, while a
    record with setuid loses the bit."""
    plain = share / "plain"
    plain.write_bytes(b"data")
    e = fs.lookup(CTX, 1, b"plain")
    assert fs.setattr(CTX, e.nodeid, SetAttr(size=0, kill_suidgid=True)).size == 0
    assert plain.stat().st_size == 0 and "user.o" not in os.listxattr(plain)
    suid = host_file(share, "suid", ownership.Record(1000, 1000, 0o104755))
    e = fs.lookup(CTX, 1, b"suid")
    assert fs.setattr(CTX, e.nodeid, SetAttr(size=0, kill_suidgid=True)).mode == 0o100755
    assert ownership.decode(os.getxattr(suid, "user.o")) == ownership.Record(1000, 1000, 0o100755)
    # a chown to the values shown still gives the plain file a record
    e = fs.lookup(CTX, 1, b"plain")
    a = fs.getattr(CTX, e.nodeid, None)
    fs.setattr(CTX, e.nodeid, SetAttr(uid=a.uid, gid=a.gid, kill_suidgid=True))
    assert "user.o" in os.listxattr(plain)


def test_a_read_overtaken_by_a_write_is_not_remembered(fs):
    e, _ = fs.create(CTX, 1, b"f", 0o644, 0o022, os.O_RDWR)
    ino = fs._inode(e.nodeid)
    name = fs._host_xattr(b"trusted.x")
    gen = fs._xgen                       # a read of trusted.x starts, finds nothing...
    fs.setxattr(CTX, e.nodeid, b"trusted.x", b"1", 0)   # ...a write completes meanwhile
    fs._xabsent_add(ino, name, gen)      # the read must not record its stale answer
    assert fs.getxattr(CTX, e.nodeid, b"trusted.x") == b"1"
    gen = fs._xgen
    fs._xabsent_add(ino, fs._host_xattr(b"trusted.y"), gen)
    assert fs._host_xattr(b"trusted.y") in ino.xabsent


def test_default_acl_of_the_parent_follows_its_changes(fs, calls):
    d = fs.mkdir(CTX, 1, b"d", 0o755, 0)
    calls.clear()
    fs.mknod(CTX, d.nodeid, b"plain", stat.S_IFREG | 0o666, 0, 0o022)
    assert calls["getxattr"] == 0        # the new directory has no default ACL
    fs.setxattr(CTX, d.nodeid, pa.DEFAULT, ACL, 0)
    f = fs.mknod(CTX, d.nodeid, b"inherits", stat.S_IFREG | 0o666, 0, 0o077)
    assert f.attr.mode & 0o777 == 0o660  # from the default ACL, umask ignored
    assert pa.parse(fs.getxattr(CTX, f.nodeid, pa.ACCESS))
    sub = fs.mkdir(CTX, d.nodeid, b"sub", 0o777, 0)
    assert fs.getxattr(CTX, sub.nodeid, pa.DEFAULT) == ACL
    assert enodata(fs, fs.lookup(CTX, d.nodeid, b"plain").nodeid, pa.ACCESS)


def test_guest_change_of_a_host_symlink_starts_with_no_reserved_xattrs(fs, share):
    os.symlink("target", share / "ln")
    e = fs.lookup(CTX, 1, b"ln")
    fs.setxattr(CTX, e.nodeid, b"trusted.t", b"v", 0)   # materializes it
    assert fs.getxattr(CTX, e.nodeid, b"trusted.t") == b"v"
    assert enodata(fs, e.nodeid, CAPS) and enodata(fs, e.nodeid, pa.ACCESS)
    assert fs.readlink(CTX, e.nodeid) == b"target"


def test_nodes_with_the_same_record_share_one_record_object(fs, share):
    rec = ownership.Record(1000, 1000, 0o100644)
    host_file(share, "a", rec)
    host_file(share, "b", rec)
    (share / "bad").write_bytes(b"x")
    os.setxattr(share / "bad", "user.o", b"\1\0\0\0garbage")
    a, b = (fs.lookup(CTX, 1, n) for n in (b"a", b"b"))
    assert (a.attr.uid, a.attr.gid, a.attr.mode) == (1000, 1000, 0o100644)
    assert fs._inode(a.nodeid).record is fs._inode(b.nodeid).record
    bad = fs.lookup(CTX, 1, b"bad")
    assert bad.attr.uid == os.getuid()   # an invalid record still shows the default owner


def test_batch_forget_closes_what_is_forgotten_and_nothing_else(fs, share):
    for n in "abc":
        host_file(share, n)
    before = open_fds()
    ids = [fs.lookup(CTX, 1, n).nodeid for n in (b"a", b"b", b"c")]
    fs.lookup(CTX, 1, b"a")              # a: two lookups
    assert open_fds() == before + 3
    fs.batch_forget([Forget(ids[0], 1), Forget(ids[1], 1), Forget(999, 1), Forget(1, 5)])
    fs.closer.drain()                    # closed on the closer's thread
    assert open_fds() == before + 2           # a still live, b closed, unknown and root ignored
    assert fs.getattr(CTX, ids[0], None).size == 1
    with pytest.raises(OSError):
        fs.getattr(CTX, ids[1], None)
    fs.batch_forget([Forget(ids[0], 1), Forget(ids[2], 1)])
    fs.closer.drain()
    assert open_fds() == before
    assert fs.getattr(CTX, 1, None)      # the root stays


@pytest.mark.parametrize("atime, mtime", [
    (1_500_000_000_123_456_789, 1_600_000_000_987_654_321),
    (-1_500_000_000, 5),                 # before 1970
    (NOW, None), (None, 7_000_000_000)])
def test_setattr_times(fs, share, atime, mtime):
    p = host_file(share, "t")
    e = fs.lookup(CTX, 1, b"t")
    old = os.stat(p)
    a = fs.setattr(CTX, e.nodeid, SetAttr(atime_ns=atime, mtime_ns=mtime))
    st = os.stat(p)
    for want, got, was in ((atime, st.st_atime_ns, old.st_atime_ns),
                           (mtime, st.st_mtime_ns, old.st_mtime_ns)):
        if want is None:
            assert got == was
        elif want != NOW:
            assert got == want
    assert (a.atime_ns, a.mtime_ns) == (st.st_atime_ns, st.st_mtime_ns)
    assert (a.uid, a.mode) == (1000, 0o100644)


def test_open_create_and_lookup_replies(fs, share):
    e, o = fs.create(CTX, 1, b"new", 0o640, 0, os.O_WRONLY)
    st = os.stat(share / "new")
    assert (e.attr.ino, e.attr.nlink, e.attr.size) == (st.st_ino, 1, 0)
    assert (e.attr.uid, e.attr.gid, e.attr.mode) == (1234, 5678, stat.S_IFREG | 0o640)
    assert fs.write(CTX, e.nodeid, o.fh, 0, [b"abc"]) == 3
    # The creating fd is the handle (no reopen): O_RDWR whatever the guest asked,
    # as its own kernel checks each guest fd's mode (and with the writeback cache
    # it reads pages through write-only opens).
    back = bytearray(3)
    assert fs.read(CTX, e.nodeid, o.fh, 0, [back]) == 3 and back == b"abc"
    fs.release(CTX, e.nodeid, o.fh)
    e2, o2 = fs.create(CTX, 1, b"app", 0o600, 0, os.O_WRONLY | os.O_APPEND)
    assert fcntl.fcntl(fs._handles[o2.fh].fd, fcntl.F_GETFL) & os.O_APPEND
    fs.release(CTX, e2.nodeid, o2.fh)
    e3, o3 = fs.create(CTX, 1, b"syn", 0o600, 0, os.O_WRONLY | os.O_SYNC)
    fl = fcntl.fcntl(fs._handles[o3.fh].fd, fcntl.F_GETFL)
    assert fl & os.O_SYNC == os.O_SYNC and fl & os.O_ACCMODE == os.O_WRONLY  # reopened
    fs.release(CTX, e3.nodeid, o3.fh)
    assert stat.S_IMODE(os.stat(share / "app").st_mode) == 0o600
    d = fs.mkdir(CTX, 1, b"dir", 0o755, 0)
    with pytest.raises(IsADirectoryError):
        fs.open(CTX, d.nodeid, os.O_RDONLY)
    s = fs.symlink(CTX, 1, b"sym", b"x")
    with pytest.raises(OSError) as err:
        fs.open(CTX, s.nodeid, os.O_RDONLY)
    assert err.value.errno == errno.ELOOP
    o2 = fs.open(CTX, e.nodeid, os.O_RDONLY)
    buf = bytearray(3)
    assert fs.read(CTX, e.nodeid, o2.fh, 0, [buf]) == 3 and buf == b"abc"


@pytest.mark.parametrize("host_chmod", [None, 0o640])
def test_the_host_mode_follows_the_record_a_setattr_writes(fs, share, host_chmod):
    """The host inode's mode comes from the record (ownership.host_mode_for); a
    node with a record of its own is chowned without an fstat first, so the mode
    is checked from the one after."""
    p = host_file(share, "h")
    os.chmod(p, 0o644)
    e = fs.lookup(CTX, 1, b"h")
    if host_chmod is not None:
        os.chmod(p, host_chmod)          # behind the daemon's back
    a = fs.setattr(CTX, e.nodeid, SetAttr(mode=0o751))
    assert a.mode == 0o100751 and stat.S_IMODE(os.stat(p).st_mode) == 0o751
    a = fs.setattr(CTX, e.nodeid, SetAttr(uid=5, mode=0o700))
    assert (a.uid, a.mode) == (5, 0o100700) and stat.S_IMODE(os.stat(p).st_mode) == 0o700
    assert a.ctime_ns == os.stat(p).st_ctime_ns   # the reply shows the host after the chmod


def test_a_chmod_costs_one_host_chmod_and_one_fstat(fs, share, monkeypatch):
    """The host mode a chmod's record asks for is known before the fstat the
    reply needs, so the host chmod goes first (not fstat, chmod, fstat)."""
    p = host_file(share, "h")
    os.chmod(p, 0o644)
    e = fs.lookup(CTX, 1, b"h")
    n = counted(monkeypatch, "fstat", "chmod")
    a = fs.setattr(CTX, e.nodeid, SetAttr(mode=0o640))
    assert n == {"fstat": 1, "chmod": 1}
    assert a.mode == 0o100640 and stat.S_IMODE(os.stat(p).st_mode) == 0o640
    assert a.ctime_ns == os.stat(p).st_ctime_ns
    n.clear()
    a = fs.setattr(CTX, e.nodeid, SetAttr(mode=0o6640))   # setuid/setgid: the host mode stays
    assert n == {"fstat": 1} and a.mode == 0o106640
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o640


@pytest.fixture
def opens(monkeypatch):
    """Counts of os.open / os.stat calls."""
    return counted(monkeypatch, "open", "stat")


def test_a_live_node_is_found_by_one_stat_without_opening_it(fs, share, opens):
    (share / "f").write_bytes(b"abc")
    first = fs.lookup(CTX, 1, b"f")
    again = fs.lookup(CTX, 1, b"f")   # (the last lookup here found a new node: opened)
    assert again.nodeid == first.nodeid
    opens.clear()
    third = fs.lookup(CTX, 1, b"f")   # the last one found a live node: a stat finds it
    assert third.nodeid == first.nodeid and third.attr.size == 3
    assert (opens["open"], opens["stat"]) == (0, 1)   # no open (nor close)
    os.link(share / "f", share / "hard")
    assert fs.lookup(CTX, 1, b"hard").nodeid == first.nodeid   # same host inode, same node
    assert opens["open"] == 0
    fs.forget(first.nodeid, 3)
    assert fs._inode(first.nodeid)   # four lookups: still live after three forgotten
    fs.forget(first.nodeid, 1)
    with pytest.raises(OSError):
        fs._inode(first.nodeid)


def test_after_a_new_node_the_next_lookup_opens_without_a_stat_first(fs, share, opens):
    for n in ("a", "b", "c"):
        (share / n).write_bytes(b"x")
    fs.lookup(CTX, 1, b"a")   # a new node: the directory's names are not live
    opens.clear()
    fs.lookup(CTX, 1, b"b")
    assert (opens["open"], opens["stat"]) == (1, 0)   # (drop_caches, find: no stat first)
    with pytest.raises(FileNotFoundError):
        fs.lookup(CTX, 1, b"missing")   # a miss changes nothing
    opens.clear()
    fs.lookup(CTX, 1, b"c")
    assert (opens["open"], opens["stat"]) == (1, 0)


def test_a_name_replaced_on_the_host_names_the_new_inode(fs, share):
    (share / "f").write_bytes(b"old")
    old = fs.lookup(CTX, 1, b"f")
    (share / "g").write_bytes(b"newer")
    os.rename(share / "g", share / "f")
    new = fs.lookup(CTX, 1, b"f")
    assert new.nodeid != old.nodeid and new.attr.size == 5
    assert fs.getattr(CTX, old.nodeid, None).size == 3   # the old node is the old inode
    with pytest.raises(FileNotFoundError):
        fs.lookup(CTX, 1, b"gone")


def test_a_listed_entry_that_is_not_live_is_opened_at_once(fs, share, opens):
    (share / "f").write_bytes(b"abc")
    ino = os.stat(share / "f").st_ino
    opens.clear()
    e = fs.lookup(CTX, 1, b"f", listed_ino=ino)
    assert (opens["open"], opens["stat"]) == (1, 0)   # READDIRPLUS of a new entry: no stat first
    assert fs.lookup(CTX, 1, b"f", listed_ino=ino).nodeid == e.nodeid
    assert (opens["open"], opens["stat"]) == (1, 1)   # live: the stat, no open
    # A stale listing (the name now names another inode) still finds the right one.
    (share / "g").write_bytes(b"newer")
    os.rename(share / "g", share / "f")
    assert fs.lookup(CTX, 1, b"f", listed_ino=ino).attr.size == 5
