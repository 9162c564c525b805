"""READDIRPLUS readahead: the batch made ahead, and what spoils it.

First `ReaddirplusReadahead` alone with a stand-in batch maker, then through the FUSE
server over the passthrough filesystem, where a batch made ahead must answer exactly what
the request would have got, and leave no lookup behind when it is not sent.
"""

import logging
import stat
import threading
import time

import pytest

from protocol import fuse
from vfsd.readahead import ReaddirplusReadahead
from vfsd.server import FuseServer, SessionOptions

from .test_server_fs import Session

CTX = object()


class Maker:
    """Stands in for FuseServer._plus_batch: records the calls, looks up two nodes per
    batch (offset + 100 and + 101), and says where the next batch begins (offset + 2)."""

    def __init__(self, fail: bool = False, gate: threading.Event | None = None):
        self.calls, self.threads, self.fail, self.gate = [], [], fail, gate

    def __call__(self, ctx, nodeid, fh, offset, room, nodes, mark):
        self.calls.append((fh, offset, mark is not None))
        self.threads.append(threading.current_thread().name)
        if mark is not None and self.gate is not None:
            self.gate.wait(5)
        nodes += [offset + 100, offset + 101]
        if self.fail and mark is not None:
            raise OSError(5, "boom")
        return b"reply@%d" % offset, offset + 2


class Marks:
    def __init__(self):
        self.value = 0

    def __call__(self):
        return self.value


def readahead(maker, max_age=10.0):
    forgotten, marks = [], Marks()
    ra = ReaddirplusReadahead(maker, forgotten.extend, marks, max_age)
    return ra, forgotten, marks


def made_ahead(ra, fh):
    batch = ra._batches.get(fh)
    if batch is not None:
        assert batch.done.wait(5)
    return batch


def test_a_quiet_reader_gets_each_batch_made_ahead_on_a_thread_of_its_own():
    maker = Maker()
    ra, forgotten, _ = readahead(maker)
    assert ra.reply(CTX, 7, 3, 0, 4096) == b"reply@0"
    assert made_ahead(ra, 3) is None  # the first reply: the reader is not known yet
    assert ra.reply(CTX, 7, 3, 2, 4096) == b"reply@2"
    assert made_ahead(ra, 3).request == (7, 3, 4, 4096)  # no change between the two
    assert ra.reply(CTX, 7, 3, 4, 4096) == b"reply@4"
    made_ahead(ra, 3)
    assert maker.calls == [(3, 0, False), (3, 2, False), (3, 4, True), (3, 6, True)]
    assert maker.threads[2].startswith("vfsd-readahead")
    assert forgotten == []  # the guest got every lookup made
    assert (ra.made, ra.used, sum(ra.dropped.values())) == (2, 1, 0)


def test_a_batch_being_made_is_counted_until_it_is_made():
    """`making` tells the ring worker not to poll meanwhile (it would hold the GIL up)."""
    gate = threading.Event()
    ra, _, _ = readahead(Maker(gate=gate))
    ra.reply(CTX, 7, 3, 0, 4096)
    assert ra.making == 0
    ra.reply(CTX, 7, 3, 2, 4096)
    assert ra.making == 1
    gate.set()
    made_ahead(ra, 3)
    assert ra.making == 0


def test_the_end_of_the_listing_is_not_read_ahead():
    def make(ctx, nodeid, fh, offset, room, nodes, mark):
        return b"last", None
    ra, _, _ = readahead(make)
    ra.reply(CTX, 7, 3, 0, 4096)
    ra.reply(CTX, 7, 3, 2, 4096)
    assert made_ahead(ra, 3) is None


@pytest.mark.parametrize("request_", [(8, 3, 4, 4096), (7, 3, 6, 4096), (7, 3, 4, 2048)])
def test_a_batch_for_another_request_is_dropped_with_its_lookups(request_):
    maker = Maker()
    ra, forgotten, _ = readahead(maker)
    ra.reply(CTX, 7, 3, 0, 4096)
    ra.reply(CTX, 7, 3, 2, 4096)
    made_ahead(ra, 3)
    assert ra.reply(CTX, *request_) == b"reply@%d" % request_[2]
    assert forgotten == [104, 105]
    assert maker.calls[3] == (3, request_[2], False)


def test_a_change_spoils_the_batch_and_stops_readahead_until_the_reader_is_quiet_again():
    gate = threading.Event()
    maker = Maker(gate=gate)
    ra, forgotten, marks = readahead(maker)
    ra.reply(CTX, 7, 3, 0, 4096)
    ra.reply(CTX, 7, 3, 2, 4096)
    marks.value = 1  # a request changed the share while the batch was being made
    gate.set()
    assert ra.reply(CTX, 7, 3, 4, 4096) == b"reply@4"
    assert forgotten == [104, 105] and ra.dropped == {"a change": 1}
    assert made_ahead(ra, 3) is None  # not quiet: nothing made ahead
    assert ra.reply(CTX, 7, 3, 6, 4096) == b"reply@6"  # quiet again since the last reply
    assert made_ahead(ra, 3).request == (7, 3, 8, 4096)


def test_a_reader_that_changes_things_between_batches_gets_no_readahead():
    maker = Maker()
    ra, forgotten, marks = readahead(maker)
    for offset in range(0, 20, 2):
        ra.reply(CTX, 7, 3, offset, 4096)
        marks.value += 1  # e.g. `rm -r`: an unlink of each entry read
    assert made_ahead(ra, 3) is None
    assert all(not ahead for _, _, ahead in maker.calls) and forgotten == []


def test_an_old_batch_is_dropped():
    ra, forgotten, _ = readahead(Maker(), max_age=0.01)
    ra.reply(CTX, 7, 3, 0, 4096)
    ra.reply(CTX, 7, 3, 2, 4096)
    made_ahead(ra, 3)
    time.sleep(0.05)
    assert ra.reply(CTX, 7, 3, 4, 4096) == b"reply@4"
    assert forgotten == [104, 105]


def test_a_failed_batch_gives_back_what_it_looked_up():
    ra, forgotten, _ = readahead(Maker(fail=True))
    ra.reply(CTX, 7, 3, 0, 4096)
    ra.reply(CTX, 7, 3, 2, 4096)
    made_ahead(ra, 3)
    assert ra.reply(CTX, 7, 3, 4, 4096) == b"reply@4"  # made again, now
    assert forgotten == [104, 105]


def test_drop_and_drop_all_wait_for_the_batch_and_forget_it():
    gate = threading.Event()
    ra, forgotten, _ = readahead(Maker(gate=gate))
    for fh in (3, 4):
        ra.reply(CTX, 7, fh, 0, 4096)
        ra.reply(CTX, 7, fh, 2, 4096)
    threading.Timer(0.05, gate.set).start()
    ra.drop(3)
    assert forgotten == [104, 105]
    ra.drop_all()
    assert forgotten == [104, 105, 104, 105]
    assert ra._batches == {} and ra._last_mark == {}
    assert ra.made == ra.used == 0 and not ra.dropped  # the next session counts afresh


def test_the_session_figures_are_logged_when_it_ends(caplog):
    ra, _, marks = readahead(Maker())
    for offset in (0, 2, 4):  # made ahead: the replies at 4 (used) and 6
        ra.reply(CTX, 7, 3, offset, 4096)
    marks.value = 1
    ra.reply(CTX, 7, 3, 6, 4096)  # its batch is dropped
    with caplog.at_level(logging.INFO, logger="vfsd.readahead"):
        ra.drop_all()
    assert "2 replies made ahead, 1 used, 1 dropped (a change: 1)" in caplog.text


# ---------------------------------------------------------------------------
# Through the server, over the passthrough filesystem
# ---------------------------------------------------------------------------

N_FILES = 120  # ~5 READDIRPLUS replies of 4 KiB


def make_share(root):
    root.mkdir()
    for i in range(N_FILES):
        (root / f"file-{i:04d}").write_bytes(b"x" * i)


#: Sessions of the running test, closed after it (their node fds would pile
#: up over the suite otherwise).
_sessions: list = []


@pytest.fixture(autouse=True)
def close_sessions():
    yield
    while _sessions:
        _sessions.pop().close()


def session(root, layout, readahead=True):
    s = Session(root, layout)
    _sessions.append(s)
    s.server = FuseServer(s.fs, SessionOptions(readdirplus_readahead=readahead))
    if readahead:
        # A batch older than max_age (50 ms) is dropped and made again with fresh node
        # ids; on a loaded CI machine that happens, and these tests compare node ids.
        # Age is tested on its own (test_an_old_batch_is_dropped).
        s.server._readahead.max_age = 60.0
    s.unique = 0
    assert s.call(fuse.Opcode.INIT, 0, fuse.fuse_init_in.pack(
        major=7, minor=38, max_readahead=65536, flags=0xFFFFFFFF, flags2=0))[0] == 0
    return s


def parse_plus(body):
    """[(name, nodeid, size, mode, next offset)] of a READDIRPLUS reply."""
    out, off = [], 0
    while off < len(body):
        d = fuse.fuse_direntplus.unpack_from(body, off)
        hs = fuse.fuse_direntplus.size
        name = bytes(body[off + hs:off + hs + d.dirent.namelen])
        a = d.entry_out.attr
        out.append((name, d.entry_out.nodeid, a.size, a.mode, d.dirent.off))
        off += fuse.dirent_align(hs + d.dirent.namelen)
    return out


def read_plus(s, fh, offset):
    return parse_plus(s.ok(fuse.Opcode.READDIRPLUS, 1,
                           fuse.fuse_read_in.pack(fh=fh, offset=offset, size=4096)))


def opendir(s):
    return fuse.fuse_open_out.unpack(s.ok(fuse.Opcode.OPENDIR, 1, fuse.fuse_open_in.pack())).fh


def list_all(s, fh):
    batches, offset = [], 0
    while True:
        batch = read_plus(s, fh, offset)
        if not batch:
            return batches
        batches.append(batch)
        offset = batch[-1][4]


def wait_made_ahead(s, fh):
    batch = made_ahead(s.server._readahead, fh)
    assert batch is not None, "no batch made ahead"
    return batch


def forget_all(s, batches):
    for batch in batches:
        for name, node, *_ in batch:
            if node:
                s.call(fuse.Opcode.FORGET, node, fuse.fuse_forget_in.pack(nlookup=1))


@pytest.fixture(params=["reader", "views"])
def layout(request):
    return request.param


def test_a_listing_is_the_same_with_and_without_readahead(tmp_path, layout):
    make_share(tmp_path / "a")
    make_share(tmp_path / "b")
    with_ra, without = session(tmp_path / "a", layout), session(tmp_path / "b", layout, False)
    fh_a, fh_b = opendir(with_ra), opendir(without)
    got, want = list_all(with_ra, fh_a), list_all(without, fh_b)
    assert len(got) >= 4
    assert got == want  # names, node ids, sizes, modes, offsets: batch by batch
    ra = with_ra.server._readahead
    assert ra.used >= len(got) - 2 and not ra.dropped  # every batch after the 2nd made ahead
    assert sorted(e[0] for b in got for e in b) == sorted(
        [b".", b".."] + [b"file-%04d" % i for i in range(N_FILES)])
    for s, fh in ((with_ra, fh_a), (without, fh_b)):
        s.ok(fuse.Opcode.RELEASEDIR, 1, fuse.fuse_release_in.pack(fh=fh))
    forget_all(with_ra, got)
    assert set(with_ra.fs._by_id) == {1}  # every lookup accounted for


def read_two(s, fh):
    """The first two batches of a listing (after them, the reader is known to be quiet)."""
    first = read_plus(s, fh, 0)
    return [first, read_plus(s, fh, first[-1][4])]


def test_the_next_batch_is_made_before_it_is_asked_for(tmp_path, layout):
    make_share(tmp_path / "share")
    s = session(tmp_path / "share", layout)
    fh = opendir(s)
    got = read_two(s, fh)
    ahead = wait_made_ahead(s, fh)
    assert ahead.request[2] == got[-1][-1][4] and ahead.reply
    sent = sum(1 for b in got for e in b if e[1])
    assert len(s.fs._by_id) > 1 + sent  # its entries are looked up already
    assert read_plus(s, fh, got[-1][-1][4]) == parse_plus(ahead.reply)


def test_an_unsent_batch_leaves_no_lookup_behind(tmp_path, layout):
    make_share(tmp_path / "share")
    s = session(tmp_path / "share", layout)
    fh = opendir(s)
    got = read_two(s, fh)
    wait_made_ahead(s, fh)
    s.ok(fuse.Opcode.RELEASEDIR, 1, fuse.fuse_release_in.pack(fh=fh))  # the reader stopped
    forget_all(s, got)
    assert set(s.fs._by_id) == {1}


def test_a_change_by_the_guest_shows_in_the_next_batch(tmp_path, layout):
    """The guest unlinks a name of the next batch, and truncates another (open(O_TRUNC)
    without ATOMIC_O_TRUNC: a SETATTR), after the batch was made ahead: the reply must be
    the one made after those changes."""
    make_share(tmp_path / "share")
    s = session(tmp_path / "share", layout)
    fh = opendir(s)
    got = read_two(s, fh)
    ahead = parse_plus(wait_made_ahead(s, fh).reply)
    gone, cut = ahead[3][0], ahead[5][0]
    assert ahead[3][1] and ahead[5][2] > 0
    s.ok(fuse.Opcode.UNLINK, 1, gone + b"\0")
    node = s.entry(s.ok(fuse.Opcode.LOOKUP, 1, cut + b"\0")).nodeid
    s.ok(fuse.Opcode.SETATTR, node,
         fuse.fuse_setattr_in.pack(valid=fuse.SetattrValid.SIZE, size=0))
    third = read_plus(s, fh, got[-1][-1][4])
    by_name = {e[0]: e for e in third}
    assert by_name[gone][1] == 0  # listed (the listing is a snapshot), but no entry
    assert by_name[cut][2] == 0
    assert stat.S_ISREG(by_name[cut][3])
    # the reader changed things between two batches: nothing is made ahead
    assert s.server._readahead._batches.get(fh) is None


def test_no_readahead_without_timeouts():
    s = FuseServer(None, SessionOptions(entry_timeout=0.0, attr_timeout=0.0))
    assert s._readahead is None
    s = FuseServer(None, SessionOptions(readdirplus=False))
    assert s._readahead is None
    s = FuseServer(None, SessionOptions(attr_timeout=86400.0, entry_timeout=86400.0))
    assert s._readahead.max_age == 0.05
