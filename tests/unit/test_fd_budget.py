"""The fd budget: past it, nodes give up their O_PATH fds and are reopened by name.

Real FUSE requests through the server (vfsd/passthrough.py, "The fd budget"), on a
filesystem with a small budget, so that a few dozen lookups are already past it.
"""

import errno
import logging
import os
import threading

import pytest

from protocol import fuse
from vfsd import ownership
from vfsd.daemon import fd_budget
from vfsd.grace import DeferredClose
from vfsd.passthrough import PassthroughFs

from .test_server_fs import Session

Op = fuse.Opcode
BUDGET = 16


@pytest.fixture(params=["reader", "views"])
def s(tmp_path, request):
    root = tmp_path / "share"
    root.mkdir()
    session = Session(root, request.param, fs=PassthroughFs(str(root), fd_budget=BUDGET))
    session.root = root
    yield session
    session.close()


def lookup(s, parent, name):
    return s.entry(s.ok(Op.LOOKUP, parent, name.encode() + b"\0"))


def getattr_(s, nodeid):
    return fuse.fuse_attr_out.unpack(s.ok(Op.GETATTR, nodeid, fuse.fuse_getattr_in.pack())[:104])


def fill(s, count, prefix="f"):
    """`count` host files in the share's root, each looked up (and held)."""
    nodes = {}
    for i in range(count):
        name = f"{prefix}{i}"
        (s.root / name).write_bytes(name.encode())
        nodes[name] = lookup(s, 1, name)
    return nodes


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def drained(s):
    s.fs.closer.drain()
    return s


def test_budget_from_rlimit():
    assert fd_budget(20000) == 15000
    assert fd_budget(300) == 172
    assert fd_budget(100) == 16


def test_nodes_past_the_budget_keep_answering(s):
    before = open_fds()
    nodes = fill(s, 8 * BUDGET)
    assert s.fs.evictions > 0
    assert s.fs._open_node_fds <= BUDGET
    # the evicted fds are closed once the request that evicted them ended
    assert open_fds() - before <= BUDGET and s.fs.grace.pending == 0
    for name, e in nodes.items():
        a = getattr_(s, e.nodeid)
        assert a.attr.ino == (s.root / name).stat().st_ino
    assert s.fs.reopens > 0 and s.fs.stale == 0
    assert s.fs._open_node_fds <= BUDGET + 1
    # data through a reopened node: OPEN goes by the node's fd
    first = nodes["f0"]
    fh = fuse.fuse_open_out.unpack(s.ok(Op.OPEN, first.nodeid,
                                        fuse.fuse_open_in.pack(flags=os.O_RDONLY))[:16]).fh
    data = s.ok(Op.READ, first.nodeid, fuse.fuse_read_in.pack(fh=fh, offset=0, size=100))
    assert data == b"f0"
    s.ok(Op.RELEASE, first.nodeid, fuse.fuse_release_in.pack(fh=fh))


def test_a_guest_change_through_an_evicted_node_lands_on_its_host_file(s):
    nodes = fill(s, 4 * BUDGET)
    e = nodes["f1"]
    assert s.fs._by_id[e.nodeid].evicted is not None
    s.ok(Op.SETATTR, e.nodeid, fuse.fuse_setattr_in.pack(valid=fuse.SetattrValid.MODE,
                                                         mode=0o100600))
    assert ownership.decode(os.getxattr(s.root / "f1", "user.o")).mode == 0o100600


def test_evicted_nodes_follow_the_guests_renames(s):
    (s.root / "d").mkdir()
    (s.root / "d" / "sub").mkdir()
    (s.root / "d" / "sub" / "file").write_bytes(b"x")
    d = lookup(s, 1, "d")
    sub = lookup(s, d.nodeid, "sub")
    f = lookup(s, sub.nodeid, "file")
    (s.root / "e").mkdir()
    e = lookup(s, 1, "e")
    fill(s, 4 * BUDGET)
    assert all(s.fs._by_id[n.nodeid].evicted is not None for n in (d, sub, f))
    # move the file, then its directory's parent: the file is reopened through both
    s.ok(Op.RENAME, sub.nodeid, fuse.fuse_rename_in.pack(newdir=e.nodeid), extra=[b"file\0moved\0"])
    s.ok(Op.RENAME, 1, fuse.fuse_rename_in.pack(newdir=e.nodeid), extra=[b"d\0d2\0"])
    fill(s, 4 * BUDGET, prefix="g")
    assert getattr_(s, f.nodeid).attr.ino == (s.root / "e" / "moved").stat().st_ino
    assert getattr_(s, sub.nodeid).attr.ino == (s.root / "e" / "d2" / "sub").stat().st_ino
    assert s.fs.stale == 0


def test_a_chain_of_evicted_directories_is_reopened_from_the_nearest_open_one(s):
    (s.root / "a" / "b" / "c").mkdir(parents=True)
    (s.root / "a" / "b" / "c" / "leaf").write_bytes(b"leaf")
    a = lookup(s, 1, "a")
    b = lookup(s, a.nodeid, "b")
    c = lookup(s, b.nodeid, "c")
    leaf = lookup(s, c.nodeid, "leaf")
    fill(s, 4 * BUDGET)
    assert all(s.fs._by_id[n.nodeid].evicted is not None for n in (a, b, c, leaf))
    assert getattr_(s, leaf.nodeid).attr.size == 4
    assert all(s.fs._by_id[n.nodeid].evicted is None for n in (a, b, c, leaf))


def test_a_name_changed_on_the_host_makes_the_evicted_node_stale(s, caplog):
    nodes = fill(s, 4 * BUDGET)
    e = nodes["f2"]
    assert s.fs._by_id[e.nodeid].evicted is not None
    os.rename(s.root / "f2", s.root / "elsewhere")
    (s.root / "f2").write_bytes(b"another file")
    with caplog.at_level(logging.WARNING, logger="vfsd.passthrough"):
        assert s.call(Op.GETATTR, e.nodeid, fuse.fuse_getattr_in.pack())[0] == errno.ESTALE
        assert s.call(Op.GETATTR, e.nodeid, fuse.fuse_getattr_in.pack())[0] == errno.ESTALE
    assert len([r for r in caplog.records if "stale" in r.getMessage()]) == 1
    # the name itself is looked up afresh: another node, the new file
    fresh = lookup(s, 1, "f2")
    assert fresh.nodeid != e.nodeid and fresh.attr.size == len(b"another file")


def test_an_inode_number_reused_by_another_inode_is_not_the_evicted_node(s):
    """What the file handle guards: a LOOKUP that finds an evicted node's host inode
    number takes the node only if the inode opened by that name has its handle."""
    nodes = fill(s, 4 * BUDGET)
    e = nodes["f3"]
    ino = s.fs._by_id[e.nodeid]
    assert ino.evicted is not None
    ino.evicted = (s.fs, b"\x01\x00\x00\x00" + b"\xff" * 8)  # as a freed and reused number
    again = lookup(s, 1, "f3")
    assert again.nodeid != e.nodeid and s.fs.stale == 1
    assert s.call(Op.GETATTR, e.nodeid, fuse.fuse_getattr_in.pack())[0] == errno.ESTALE
    assert getattr_(s, again.nodeid).attr.ino == (s.root / "f3").stat().st_ino
    s.call(Op.FORGET, e.nodeid, fuse.fuse_forget_in.pack(nlookup=1))


def test_a_lookup_of_an_evicted_node_gives_the_same_node_back(s):
    nodes = fill(s, 4 * BUDGET)
    e = nodes["f4"]
    assert s.fs._by_id[e.nodeid].evicted is not None
    assert lookup(s, 1, "f4").nodeid == e.nodeid
    assert s.fs._by_id[e.nodeid].nlookup == 2 and s.fs._by_id[e.nodeid].evicted is None


def test_open_and_hard_linked_files_keep_their_fds(s):
    (s.root / "open").write_bytes(b"o")
    (s.root / "linked").write_bytes(b"l")
    os.link(s.root / "linked", s.root / "link2")
    op = lookup(s, 1, "open")
    ln = lookup(s, 1, "linked")
    fh = fuse.fuse_open_out.unpack(s.ok(Op.OPEN, op.nodeid,
                                        fuse.fuse_open_in.pack(flags=os.O_RDONLY))[:16]).fh
    fill(s, 8 * BUDGET)
    assert s.fs._by_id[op.nodeid].evicted is None
    assert s.fs._by_id[ln.nodeid].evicted is None
    # open and unlinked: still answers GETATTR without its handle
    s.ok(Op.UNLINK, 1, b"open\0")
    assert getattr_(s, op.nodeid).attr.nlink == 0
    s.ok(Op.RELEASE, op.nodeid, fuse.fuse_release_in.pack(fh=fh))
    s.ok(Op.UNLINK, 1, b"linked\0")
    assert getattr_(s, ln.nodeid).attr.nlink == 1


def test_a_node_evicted_before_its_handle_is_counted_is_opened_again_and_kept(s):
    """An OPEN opens its handle, then counts it on the node; another thread's
    eviction in between leaves a node with a handle but no fd, which the count
    opens again and keeps open."""
    nodes = fill(s, 4 * BUDGET)
    e = nodes["f0"]
    ino = s.fs._by_id[e.nodeid]
    assert ino.evicted is not None
    fh = s.fs._new_handle(os.open(s.root / "f0", os.O_RDONLY | os.O_CLOEXEC), e.nodeid)
    assert ino.evicted is None and ino.opened == 1
    fill(s, 4 * BUDGET, prefix="g")
    assert ino.evicted is None and s.fs.stale == 0
    s.ok(Op.RELEASE, e.nodeid, fuse.fuse_release_in.pack(fh=fh))
    assert ino.opened == 0


def test_forgetting_evicted_nodes_closes_nothing_twice(s):
    nodes = fill(s, 6 * BUDGET)
    before = open_fds()
    for e in nodes.values():
        s.call(Op.FORGET, e.nodeid, fuse.fuse_forget_in.pack(nlookup=1))
    drained(s)
    assert s.fs._open_node_fds == 0 and len(s.fs._by_id) == 1
    assert open_fds() <= before


def test_fds_closed_over_the_budget_wait_for_running_requests():
    grace = DeferredClose()
    busy, retired, done = threading.Event(), threading.Event(), threading.Event()

    def request():
        grace.enter()
        busy.set()
        retired.wait(5)
        done.wait(5)
        grace.leave()

    t = threading.Thread(target=request)
    t.start()
    busy.wait(5)
    fd = os.open("/", os.O_PATH)
    grace.enter()  # the evicting request
    grace.retire([fd])
    grace.leave()
    retired.set()
    assert grace.pending == 1
    os.fstat(fd)  # still open: the other request began before it was retired
    # a request that begins now does not hold it back
    grace.enter()
    done.set()
    t.join(5)
    assert grace.pending == 0
    with pytest.raises(OSError):
        os.fstat(fd)
    grace.leave()


def test_threads_using_nodes_while_others_evict_them_get_the_right_inodes(tmp_path):
    """As with --thread-pool-size: requests on several threads reopen and evict
    each other's nodes; every answer is still the node's own inode."""
    root = tmp_path / "share"
    root.mkdir()
    fs = PassthroughFs(str(root), fd_budget=BUDGET)
    sessions = [Session(root, "views", fs=fs)] + [Session(root, "reader", fs=fs)
                                                 for _ in range(3)]
    s = sessions[0]
    s.root = root
    nodes = fill(s, 10 * BUDGET)
    want = {e.nodeid: (root / name).stat().st_ino for name, e in nodes.items()}
    ids = sorted(want)
    failures = []

    def worker(session, seed):
        for i in range(600):
            nodeid = ids[(seed * 7919 + i * 31) % len(ids)]
            err, body = session.call(Op.GETATTR, nodeid, fuse.fuse_getattr_in.pack())
            if err:
                failures.append((nodeid, os.strerror(err)))
            elif fuse.fuse_attr_out.unpack(body[:104]).attr.ino != want[nodeid]:
                failures.append((nodeid, "another inode"))

    threads = [threading.Thread(target=worker, args=(x, n)) for n, x in enumerate(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures
    assert fs.evictions > 10 * BUDGET and fs.stale == 0
    s.close()


def test_forgotten_nodes_are_not_kept_for_the_budget(s):
    """The order of opened fds drops the nodes the guest forgot, evictions or not;
    and is not kept at all while less than half the budget is in use."""
    fill(s, BUDGET // 2, prefix="few")
    assert s.fs._fd_order is None
    for round_ in range(250):  # 1,750 nodes, never more than 7 more at once
        for name, e in fill(s, BUDGET // 2 - 1, prefix=f"r{round_}-").items():
            s.call(Op.FORGET, e.nodeid, fuse.fuse_forget_in.pack(nlookup=1))
    assert s.fs.evictions == 0
    assert len(s.fs._fd_order) <= 1024 + 2 * BUDGET
