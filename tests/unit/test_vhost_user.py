"""vhost-user back-end: wire structs, and the back-end driven over a socketpair.

The test plays QEMU with raw messages (header + payload + SCM_RIGHTS fds), a
memfd as guest RAM and eventfds for kick/call/err; `RingDriver` (from
test_virtqueue) plays the guest driver.  Every wait has a timeout.
"""

from __future__ import annotations

import array
import logging
import mmap
import os
import queue
import random
import re
import select
import socket
import stat
import struct
import threading
import time

import pytest

from protocol import vhost_user as vu
from protocol.vhost_user import (ProtocolFeature, Request, VhostUserBackend, VhostUserDevice,
                                 accept_one, listen_unix)
from tests.fds import open_fds
from tests.unit.test_virtqueue import RingDriver

TIMEOUT = 3.0
GPA = 0x1_0000_0000
UVA = 0x7F00_0000_0000
MEM_SIZE = 1 << 20
VERSION, REPLY, NEED_REPLY = 0x1, 0x4, 0x8

F_VERSION_1 = 1 << 32
F_INDIRECT = 1 << 28
F_EVENT_IDX = 1 << 29
F_PROTOCOL = 1 << 30


# -- wire structs ----------------------------------------------------------------------


def test_wire_struct_sizes():
    assert vu.HEADER.size == 12
    assert vu.U64.size == 8
    assert vu.VRING_STATE.size == 8
    assert vu.VRING_ADDR.size == 40
    assert vu.MEMORY_REGION.size == 32
    assert vu.MEMORY_HEADER.size == 8
    assert vu.MEMORY_TABLE_MAX_SIZE == 8 + 8 * 32
    assert vu.MEM_REG_MSG.size == 8 + 32


def test_vring_addr_field_order():
    """struct vhost_vring_addr: desc, used, avail, log (used before avail)."""
    raw = struct.pack("<IIQQQQ", 1, 0, 0x10, 0x20, 0x30, 0x40)
    a = vu.VRING_ADDR.unpack(raw)
    assert (a.desc_user_addr, a.used_user_addr, a.avail_user_addr, a.log_guest_addr) == \
        (0x10, 0x20, 0x30, 0x40)


def test_constants_from_the_spec():
    assert vu.VIRTIO_F_VERSION_1 == 32
    assert vu.VHOST_USER_F_PROTOCOL_FEATURES == 30
    assert vu.VIRTIO_RING_F_INDIRECT_DESC == 28
    assert vu.VIRTIO_RING_F_EVENT_IDX == 29
    assert Request.SET_VRING_KICK == 12 and Request.GET_MAX_MEM_SLOTS == 36
    assert Request.SET_BACKEND_REQ_FD == 21 and Request.RESET_DEVICE == 34
    assert ProtocolFeature.REPLY_ACK == 1 << 3
    assert ProtocolFeature.CONFIGURE_MEM_SLOTS == 1 << 15


# -- a test device -----------------------------------------------------------------------


class EchoDevice(VhostUserDevice):
    """Copies the readable bytes into the writable buffers.

    Requests starting with RAISE make it raise, HOLD keeps the chain for the
    test to complete, ASYNC completes from another thread."""

    def __init__(self, num_queues: int = 2, device_features: int = 0):
        self.num_queues = num_queues
        self.device_features = device_features
        self.seen: queue.Queue = queue.Queue()
        self.held: queue.Queue = queue.Queue()
        self.resets = 0

    @staticmethod
    def echo(chain, data: bytes) -> int:
        n = 0
        for v in chain.writable:
            k = min(len(v), len(data) - n)
            v[:k] = data[n:n + k]
            n += k
        return n

    def handle_chain(self, vring, chain):
        data = b"".join(bytes(v) for v in chain.readable)
        self.seen.put((vring.index, chain.head, data))
        if data.startswith(b"RAISE"):
            raise RuntimeError("simulated device bug")
        if data.startswith(b"HOLD"):
            self.held.put((vring, chain, data))
            return None
        if data.startswith(b"ASYNC"):
            threading.Thread(target=lambda: vring.complete(chain, self.echo(chain, data))).start()
            return None
        return self.echo(chain, data)

    def reset(self):
        self.resets += 1


# -- the harness (a raw vhost-user front-end) -------------------------------------------


def wait_fd(fd: int, timeout: float = TIMEOUT) -> bool:
    """Wait for an eventfd to fire; consume it."""
    r, _, _ = select.select([fd], [], [], timeout)
    if r:
        os.read(fd, 8)
        return True
    return False


class Harness:
    def __init__(self, device: VhostUserDevice | None = None, drain_timeout: float = 2.0,
                 poll_max_us: float = 0):
        self.device = device or EchoDevice()
        self.fe, be = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.fe.settimeout(TIMEOUT)
        self.backend = VhostUserBackend(self.device, drain_timeout=drain_timeout,
                                        poll_max_us=poll_max_us)
        self.thread = threading.Thread(target=self.backend.serve_connection, args=(be,),
                                       daemon=True)
        self.thread.start()
        self.memfd = os.memfd_create("vfsd-test-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, MEM_SIZE)
        self.map = mmap.mmap(self.memfd, MEM_SIZE)
        self.fds: list[int] = [self.memfd]
        self.rings: dict[int, tuple[RingDriver, int, int, int]] = {}

    # raw messages
    def send(self, request: int, payload: bytes = b"", fds=(), *, need_reply=False,
             flags: int | None = None, size: int | None = None) -> None:
        if flags is None:
            flags = VERSION | (NEED_REPLY if need_reply else 0)
        hdr = struct.pack("<III", request, flags, len(payload) if size is None else size)
        anc = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
               if fds else [])
        self.fe.sendmsg([hdr + payload], anc)

    def recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.fe.recv(n - len(buf))
            if not chunk:
                raise EOFError("back-end closed the connection")
            buf += chunk
        return buf

    def recv(self, expect: int) -> bytes:
        request, flags, size = struct.unpack("<III", self.recv_exact(12))
        assert request == expect, f"reply to {request}, expected {expect}"
        assert flags == VERSION | REPLY, f"reply flags 0x{flags:x}"
        return self.recv_exact(size)

    def get_u64(self, request: int, **kw) -> int:
        self.send(request, **kw)
        payload = self.recv(request)
        assert len(payload) == 8
        return struct.unpack("<Q", payload)[0]

    def ack(self, request: int, payload: bytes = b"", fds=()) -> int:
        """Send with NEED_REPLY; the REPLY_ACK value (0 = success)."""
        self.send(request, payload, fds, need_reply=True)
        payload = self.recv(request)
        assert len(payload) == 8
        return struct.unpack("<Q", payload)[0]

    def ok(self, request: int, payload: bytes = b"", fds=()) -> None:
        assert self.ack(request, payload, fds) == 0, f"{Request(request).name} nacked"

    def no_reply(self, seconds: float = 0.2) -> bool:
        r, _, _ = select.select([self.fe], [], [], seconds)
        return not r

    def expect_close(self) -> None:
        """The back-end ends the connection: EOF here, serve_connection returns."""
        self.fe.settimeout(TIMEOUT)
        assert self.fe.recv(1) == b""
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()

    # set-up like QEMU 7.2
    def negotiate(self, features: int = F_VERSION_1 | F_INDIRECT | F_PROTOCOL) -> None:
        offered = self.get_u64(Request.GET_FEATURES)
        assert offered & features == features
        if features & F_PROTOCOL:
            pf = self.get_u64(Request.GET_PROTOCOL_FEATURES)
            self.send(Request.SET_PROTOCOL_FEATURES, struct.pack("<Q", pf))
            assert self.get_u64(Request.GET_QUEUE_NUM) == self.device.num_queues
            assert self.get_u64(Request.GET_MAX_MEM_SLOTS) >= 8
        self.ok(Request.SET_OWNER)
        self.ok(Request.SET_FEATURES, struct.pack("<Q", features))

    def set_mem_table(self) -> None:
        self.ok(Request.SET_MEM_TABLE, struct.pack("<IIQQQQ", 1, 0, GPA, MEM_SIZE, UVA, 0),
                [self.memfd])

    def uva(self, gpa: int) -> int:
        return gpa - GPA + UVA

    def setup_ring(self, index: int, size: int = 8, enable: bool = True, base: int = 0,
                   driver: RingDriver | None = None):
        """QEMU's per-ring start sequence; a new ring is zeroed, as a driver does."""
        d = driver
        if d is None:
            d = RingDriver(self.map, GPA, size, ring_offset=0x40000 * index)
            d.write(d.desc_gpa, bytes(d.used_gpa + 6 + 8 * size - d.desc_gpa))
        if base:
            d.set_avail_idx(base)
            d.set_used_idx(base)
        kick, call, err = (os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(3))
        self.fds += [kick, call, err]
        self.ok(Request.SET_VRING_CALL, struct.pack("<Q", index), [call])
        self.ok(Request.SET_VRING_ERR, struct.pack("<Q", index), [err])
        self.ok(Request.SET_VRING_NUM, struct.pack("<II", index, size))
        self.ok(Request.SET_VRING_BASE, struct.pack("<II", index, base))
        self.ok(Request.SET_VRING_ADDR, struct.pack("<IIQQQQ", index, 0, self.uva(d.desc_gpa),
                                                    self.uva(d.used_gpa), self.uva(d.avail_gpa), 0))
        self.ok(Request.SET_VRING_KICK, struct.pack("<Q", index), [kick])
        if enable:
            self.ok(Request.SET_VRING_ENABLE, struct.pack("<II", index, 1))
        self.rings[index] = (d, kick, call, err)
        return d, kick, call, err

    def start(self, queues=(0, 1)) -> None:
        self.negotiate()
        self.set_mem_table()
        for i in queues:
            self.setup_ring(i)

    def request(self, index: int, data: bytes, wsize: int = 64, indirect=False,
                expect_call=True) -> tuple[int, bytes]:
        """Queue one chain, kick, wait for the call and the used element."""
        d, kick, call, _ = self.rings[index]
        before = d.used_idx()
        head, (w,) = d.add([data], [wsize], indirect=indirect)
        os.eventfd_write(kick, 1)
        if expect_call:
            assert wait_fd(call), f"queue {index}: no call notification"
        deadline = time.monotonic() + TIMEOUT
        while d.used_idx() == before:
            assert time.monotonic() < deadline, f"queue {index}: nothing used"
            time.sleep(0.005)
        uid, ulen = d.used_elem(before)
        assert uid == head
        return ulen, d.read(w, ulen)

    def close(self) -> None:
        self.fe.close()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "serve_connection did not return after hang-up"
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def h():
    harness = Harness()
    yield harness
    harness.close()


# -- negotiation ---------------------------------------------------------------------------


def test_get_features(h):
    f = h.get_u64(Request.GET_FEATURES)
    assert f & F_VERSION_1 and f & F_INDIRECT and f & F_PROTOCOL
    assert not f & F_EVENT_IDX
    assert f == F_VERSION_1 | F_INDIRECT | F_PROTOCOL


def test_device_features_offered_but_not_unsupported_ones():
    h = Harness(EchoDevice(device_features=(1 << 0) | F_EVENT_IDX | (1 << 34)))
    try:
        f = h.get_u64(Request.GET_FEATURES)
        assert f & 1 and not f & F_EVENT_IDX and not f & (1 << 34)
    finally:
        h.close()


def test_protocol_features(h):
    h.get_u64(Request.GET_FEATURES)
    pf = h.get_u64(Request.GET_PROTOCOL_FEATURES)
    assert pf == (ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK
                  | ProtocolFeature.CONFIGURE_MEM_SLOTS | ProtocolFeature.RESET_DEVICE)
    assert h.ack(Request.SET_PROTOCOL_FEATURES, struct.pack("<Q", pf)) == 0
    assert h.backend.acked_protocol_features == pf
    assert h.get_u64(Request.GET_QUEUE_NUM) == 2
    assert h.get_u64(Request.GET_MAX_MEM_SLOTS) == 32
    # Not offered -> refused.
    assert h.ack(Request.SET_PROTOCOL_FEATURES,
                 struct.pack("<Q", ProtocolFeature.BACKEND_REQ)) != 0
    assert h.ack(Request.SET_FEATURES, struct.pack("<Q", F_EVENT_IDX)) != 0


def test_need_reply_on_a_replying_message_gives_one_reply(h):
    assert h.get_u64(Request.GET_FEATURES, need_reply=True) & F_VERSION_1
    assert h.no_reply()


def test_no_ack_without_need_reply(h):
    h.send(Request.SET_OWNER)
    assert h.no_reply()
    assert h.get_u64(Request.GET_QUEUE_NUM) == 2  # still in step


def test_backend_req_fd_is_accepted_and_closed(h):
    a, b = socket.socketpair()
    try:
        assert h.ack(Request.SET_BACKEND_REQ_FD, b"", [b.fileno()]) == 0
        b.close()
        a.settimeout(TIMEOUT)
        assert a.recv(1) == b""  # the back-end's copy was closed too
    finally:
        a.close()


# -- the data path ------------------------------------------------------------------------


def test_kick_reaches_device_and_reply_lands_in_used_ring(h):
    h.start()
    assert h.request(1, b"hello virtqueue") == (15, b"hello virtqueue")
    assert h.device.seen.get(timeout=TIMEOUT)[0] == 1
    assert h.request(1, b"indirect too", indirect=True) == (12, b"indirect too")
    assert h.request(0, b"queue zero") == (10, b"queue zero")


def test_get_vring_base_returns_the_index(h):
    h.start()
    for i in range(3):
        h.request(1, b"x%d" % i)
    h.send(Request.GET_VRING_BASE, struct.pack("<II", 1, 0))
    assert struct.unpack("<II", h.recv(Request.GET_VRING_BASE)) == (1, 3)
    # The ring is stopped now: a kick is not processed.
    d, kick, call, _ = h.rings[1]
    d.add([b"after stop"], [16])
    os.eventfd_write(kick, 1)
    assert not wait_fd(call, 0.2)
    assert d.used_idx() == 3


def test_restart_after_get_vring_base_continues_from_base(h):
    h.start()
    h.request(1, b"one")
    assert get_vring_base(h, 1) == 1
    restart_ring(h, 1, 1)
    assert h.request(1, b"two") == (3, b"two")


def test_ring_base_near_wrap(h):
    h.negotiate()
    h.set_mem_table()
    h.setup_ring(1, size=4, base=0xFFFE)
    for i in range(4):
        assert h.request(1, b"w%d" % i) == (2, b"w%d" % i)
    h.send(Request.GET_VRING_BASE, struct.pack("<II", 1, 0))
    assert struct.unpack("<II", h.recv(Request.GET_VRING_BASE)) == (1, 2)


def test_buffers_queued_before_the_kick_fd_are_processed(h):
    h.negotiate()
    h.set_mem_table()
    d = RingDriver(h.map, GPA, 8, ring_offset=0x40000)
    d.add([b"early"], [8])
    _, _, call, _ = h.setup_ring(1, driver=d)
    assert wait_fd(call)
    assert d.used_elem(0) == (0, 5)


def test_async_completion(h):
    h.start()
    assert h.request(1, b"ASYNC reply") == (11, b"ASYNC reply")


def test_device_exception_completes_with_zero_and_ring_keeps_going(h, caplog):
    h.start()
    with caplog.at_level(logging.ERROR, logger="protocol.vhost_user"):
        assert h.request(1, b"RAISE please") == (0, b"")
    assert any("device failed on descriptor chain" in r.getMessage() and r.exc_info
               for r in caplog.records)
    assert h.request(1, b"still alive") == (11, b"still alive")


def test_malformed_ring_breaks_only_that_queue(h, caplog):
    h.start()
    d, kick, call, err = h.rings[1]
    with caplog.at_level(logging.ERROR, logger="protocol.vhost_user"):
        slot = d.take_descs(1)[0]
        d.write_desc(slot, GPA + MEM_SIZE + 0x1000, 64, 2)  # writable, outside memory
        d.put_avail(slot)
        os.eventfd_write(kick, 1)
        assert wait_fd(err), "err eventfd not signalled for a broken queue"
    msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(m.startswith("queue 1: broken: descriptor") and "outside guest memory" in m
               and hex(GPA + MEM_SIZE + 0x1000) in m for m in msgs), msgs
    assert h.backend.vrings[1].broken
    # Queue 1 stays broken (logged once) ...
    d.add([b"more"], [8])
    os.eventfd_write(kick, 1)
    assert not wait_fd(call, 0.2)
    assert sum("broken" in r.getMessage() for r in caplog.records) == 1
    # ... and queue 0 keeps serving.
    assert h.request(0, b"fine") == (4, b"fine")


def break_by_avail_jump(h, index):
    """Make ring `index` jump its avail index past the queue size: it breaks (2.7.6)."""
    d, kick, _, err = h.rings[index]
    d.set_avail_idx(100)
    os.eventfd_write(kick, 1)
    assert wait_fd(err)
    assert "jumped" in h.backend.vrings[index].broken


def test_avail_index_jump_breaks_queue(h):
    h.start()
    break_by_avail_jump(h, 1)


def test_disabled_ring_is_not_processed_until_enabled(h):
    h.negotiate()
    h.set_mem_table()
    d, kick, call, _ = h.setup_ring(1, enable=False)
    d.add([b"wait"], [8])
    os.eventfd_write(kick, 1)
    assert not wait_fd(call, 0.2)
    h.ok(Request.SET_VRING_ENABLE, struct.pack("<II", 1, 1))
    assert wait_fd(call)
    assert d.used_elem(0) == (0, 4)
    h.ok(Request.SET_VRING_ENABLE, struct.pack("<II", 1, 0))
    d.add([b"again"], [8])
    os.eventfd_write(kick, 1)
    assert not wait_fd(call, 0.2)


def test_without_a_kick_fd_the_ring_is_polled(h):
    h.negotiate()
    h.set_mem_table()
    d, kick, call, _ = h.setup_ring(1)
    h.ok(Request.SET_VRING_KICK, struct.pack("<Q", 1 | 0x100))  # NOFD: no kick fd
    d.add([b"unkicked"], [16])
    assert wait_fd(call), "a ring without a kick fd was not polled"
    assert d.used_elem(0) == (0, 8)


def test_many_kicks_are_each_seen(h):
    """Each kick wakes the worker again, although its eventfd is never read
    (edge-triggered: every write to an eventfd is an edge)."""
    h.start()
    for i in range(50):
        data = b"kick %d" % i
        assert h.request(1, data) == (len(data), data)


def test_a_kick_fd_that_cannot_be_polled_stops_the_ring(h, caplog, tmp_path):
    """A regular file is no eventfd: epoll refuses it.  The ring is logged and
    left unserved; the worker and the other rings go on."""
    h.start()
    f = os.open(tmp_path / "not-an-eventfd", os.O_RDWR | os.O_CREAT)
    h.fds.append(f)
    with caplog.at_level(logging.ERROR, logger="protocol.vhost_user"):
        h.ok(Request.SET_VRING_KICK, struct.pack("<Q", 1), [f])
        wait_until(lambda: any("kick fd" in m.getMessage() and "cannot be polled"
                               in m.getMessage() for m in caplog.records),
                   "no error logged for the file")
    assert h.backend.vrings[1]._kick_failed
    d, _, call, _ = h.rings[1]
    d.add([b"not served"], [16])
    assert not wait_fd(call, 0.2)
    assert h.request(0, b"queue 0 goes on") == (15, b"queue 0 goes on")


def test_hang_up_on_the_kick_fd_stops_the_ring(h, caplog):
    h.negotiate()
    h.set_mem_table()
    h.setup_ring(1)
    r, w = os.pipe()
    h.fds.append(w)
    with caplog.at_level(logging.ERROR, logger="protocol.vhost_user"):
        h.ok(Request.SET_VRING_KICK, struct.pack("<Q", 1), [r])
        os.close(w)
        deadline = time.monotonic() + TIMEOUT
        while not any("kick fd failed" in m.getMessage() for m in caplog.records):
            assert time.monotonic() < deadline, "kick fd hang-up not noticed"
            time.sleep(0.01)
    # The ring stays started, unserved (its kick fd is gone), until it is stopped.
    v = h.backend.vrings[1]
    assert v.started and v._kick_failed
    d, _, call, _ = h.rings[1]
    d.add([b"not served"], [16])
    assert not wait_fd(call, 0.2)
    worker = h.backend._shared_worker.thread
    h.send(Request.GET_VRING_BASE, struct.pack("<II", 1, 0))
    assert struct.unpack("<II", h.recv(Request.GET_VRING_BASE)) == (1, 0)
    # It was the last ring: the worker is gone with it.
    assert not worker.is_alive() and h.backend._shared_worker.thread is None


def test_without_protocol_features_rings_start_enabled(h):
    h.negotiate(features=F_VERSION_1 | F_INDIRECT)
    h.set_mem_table()
    h.setup_ring(1, enable=False)
    assert h.request(1, b"no enable needed") == (16, b"no enable needed")


def test_get_vring_base_waits_for_in_flight_chains(h):
    h.start()
    d, kick, call, _ = h.rings[1]
    d.add([b"HOLD me"], [16])
    os.eventfd_write(kick, 1)
    vring, chain, data = h.device.held.get(timeout=TIMEOUT)
    h.send(Request.GET_VRING_BASE, struct.pack("<II", 1, 0))
    assert h.no_reply(0.2), "GET_VRING_BASE answered while a chain was in flight"
    vring.complete(chain, EchoDevice.echo(chain, data))
    assert struct.unpack("<II", h.recv(Request.GET_VRING_BASE)) == (1, 1)
    assert d.used_elem(0) == (0, 7)
    vring.complete(chain, 7)  # a second completion is ignored, not pushed again
    assert d.used_idx() == 1


def test_call_fd_can_change_while_running(h):
    h.start()
    new_call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    h.fds.append(new_call)
    h.ok(Request.SET_VRING_CALL, struct.pack("<Q", 1), [new_call])
    d, kick, old_call, err = h.rings[1]
    h.rings[1] = (d, kick, new_call, err)
    assert h.request(1, b"to the new fd") == (13, b"to the new fd")
    assert not wait_fd(old_call, 0)


# -- memory changes ----------------------------------------------------------------------


def test_add_and_remove_memory_region_while_running(h):
    h.start()
    assert h.request(1, b"before") == (6, b"before")
    extra = os.memfd_create("extra", os.MFD_CLOEXEC)
    os.ftruncate(extra, 0x10000)
    h.fds.append(extra)
    gpa2, uva2 = GPA + 0x1000_0000, UVA + 0x1000_0000
    region = struct.pack("<QQQQQ", 0, gpa2, 0x10000, uva2, 0)
    h.ok(Request.ADD_MEM_REG, region, [extra])
    assert len(h.backend.memory) == 2
    # A chain whose writable buffer lives in the new region.
    d, kick, call, _ = h.rings[1]
    d.write_desc(0, d.put(b"new region"), 10, 1, 1)
    d.write_desc(1, gpa2 + 0x100, 32, 2)
    d.put_avail(0)
    os.eventfd_write(kick, 1)
    assert wait_fd(call)
    assert d.used_elem(1) == (0, 10)
    assert os.pread(extra, 10, 0x100) == b"new region"
    h.ok(Request.REM_MEM_REG, region)
    assert len(h.backend.memory) == 1
    assert h.ack(Request.REM_MEM_REG, region) != 0  # gone already
    assert h.request(1, b"after") == (5, b"after")


def test_set_mem_table_replaces_memory_while_running(h):
    h.start()
    h.request(1, b"one")
    h.set_mem_table()  # same layout, new mapping: rings re-translated and resumed
    assert h.request(1, b"two") == (3, b"two")


def test_ring_addresses_outside_memory_are_nacked(h):
    h.negotiate()
    h.set_mem_table()
    h.ok(Request.SET_VRING_NUM, struct.pack("<II", 1, 8))
    for desc, used, avail in ((UVA + MEM_SIZE, UVA, UVA), (UVA, UVA + MEM_SIZE - 8, UVA),
                              (UVA, UVA, GPA)):
        assert h.ack(Request.SET_VRING_ADDR,
                     struct.pack("<IIQQQQ", 1, 0, desc, used, avail, 0)) != 0


def test_ring_outside_memory_does_not_start(h, caplog):
    """Addresses set before the memory table, which then does not cover them."""
    h.negotiate()
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    h.fds.append(kick)
    h.ok(Request.SET_VRING_NUM, struct.pack("<II", 1, 8))
    h.ok(Request.SET_VRING_ADDR, struct.pack("<IIQQQQ", 1, 0, UVA + MEM_SIZE, UVA, UVA, 0))
    h.ok(Request.SET_VRING_KICK, struct.pack("<Q", 1), [kick])
    with caplog.at_level(logging.ERROR, logger="protocol.vhost_user"):
        h.set_mem_table()
    assert not h.backend.vrings[1].started
    assert any("queue 1: cannot start" in r.getMessage() for r in caplog.records)


# -- resets and hang-up ----------------------------------------------------------------------


def test_reset_device_stops_rings_and_keeps_memory(h):
    h.start()
    h.request(1, b"x")
    h.ok(Request.RESET_DEVICE)
    assert h.device.resets == 1
    assert not any(v.started for v in h.backend.vrings)
    assert len(h.backend.memory) == 1  # QEMU does not resend unchanged regions
    # Re-initialise the rings (a guest reboot) without a new memory table.
    h.ok(Request.SET_FEATURES, struct.pack("<Q", F_VERSION_1 | F_INDIRECT | F_PROTOCOL))
    for i in (0, 1):
        h.setup_ring(i)
    assert h.request(1, b"after reset") == (11, b"after reset")


def test_hang_up_resets_device_and_closes_fds():
    before = open_fds()
    h = Harness()
    h.start()
    h.request(1, b"bye")
    h.close()
    assert h.device.resets == 1
    assert h.backend.memory is not None and len(h.backend.memory) == 0
    h.map.close()
    assert open_fds() <= before + 1, "fds leaked after the connection ended"


def test_hang_up_with_chain_in_flight_does_not_hang():
    h = Harness(drain_timeout=0.3)
    h.start()
    d, kick, _, _ = h.rings[1]
    d.add([b"HOLD forever"], [8])
    os.eventfd_write(kick, 1)
    h.device.held.get(timeout=TIMEOUT)
    worker = h.backend._shared_worker.thread
    t = time.monotonic()
    h.close()
    assert time.monotonic() - t < 2.0
    assert not worker.is_alive() and h.backend._shared_worker.thread is None


# -- a device that answers inline (no in-flight bookkeeping) --------------------------------


class InlineDevice(EchoDevice):
    """EchoDevice that declares it never completes later (`completes_async` False), as
    vfsd without a thread pool.  "LEN x" requests return the bad length x; KEEP requests
    are echoed and their chain kept for the test; BLOCK requests wait until the test sets
    `gate`, SLOW ones take 50 ms.  `threads` records which thread served which queue."""

    completes_async = False
    lengths = {b"LEN -1": -1, b"LEN big": 1 << 40, b"LEN str": "3", b"LEN float": 2.0,
               b"LEN none": None, b"LEN true": True}

    def __init__(self, num_queues: int = 2):
        super().__init__(num_queues)
        self.threads: list[tuple[int, threading.Thread]] = []
        self.blocked = threading.Event()
        self.gate = threading.Event()

    def handle_chain(self, vring, chain):
        self.threads.append((vring.index, threading.current_thread()))
        data = b"".join(bytes(v) for v in chain.readable)
        if data.startswith(b"BLOCK"):
            self.blocked.set()
            self.gate.wait(2 * TIMEOUT)
        elif data.startswith(b"SLOW"):
            self.blocked.set()
            time.sleep(0.05)
        if data in self.lengths:
            self.echo(chain, data)
            return self.lengths[data]
        if data.startswith(b"KEEP"):
            self.held.put((vring, chain, data))
        return super().handle_chain(vring, chain)


@pytest.fixture
def hi():
    harness = Harness(InlineDevice())
    yield harness
    harness.close()


def test_inline_device_round_trips_and_notifies_once_per_batch(hi):
    hi.start()
    assert hi.request(1, b"hello") == (5, b"hello")
    assert hi.request(1, b"indirect", indirect=True) == (8, b"indirect")
    time.sleep(0.1)  # let the worker go back to waiting for a kick
    d, kick, call, _ = hi.rings[1]
    before = d.used_idx()
    for i in range(5):
        d.add([b"batch %d" % i], [16], publish=False)
    d.set_avail_idx(d.avail_idx)
    os.eventfd_write(kick, 1)
    r, _, _ = select.select([call], [], [], TIMEOUT)
    assert r, "no call notification"
    time.sleep(0.1)  # (a notification per chain would have been written by now)
    assert os.eventfd_read(call) == 1, "more than one call notification for one batch"
    assert d.used_idx() == (before + 5) & 0xFFFF
    assert [d.used_elem(before + i)[1] for i in range(5)] == [7] * 5
    assert hi.backend.vrings[1].inflight == 0


@pytest.mark.parametrize("data,used,message", [
    (b"LEN -1", 0, "using 0"),
    (b"LEN str", 0, "using 0"),
    (b"LEN float", 0, "using 0"),
    (b"LEN big", 16, "clamping"),
    (b"LEN none", 0, "answering it empty"),
])
def test_inline_device_bad_lengths_are_corrected(hi, caplog, data, used, message):
    hi.start()
    with caplog.at_level(logging.ERROR, logger="protocol.vhost_user"):
        ulen, _ = hi.request(1, data, wsize=16)
    assert ulen == used
    assert any(message in r.getMessage() for r in caplog.records), caplog.records
    assert hi.request(1, b"LEN true", wsize=16)[0] == 1  # a bool is an int
    assert hi.request(1, b"next") == (4, b"next")


def test_inline_device_exception_answers_empty_and_keeps_serving(hi, caplog):
    hi.start()
    with caplog.at_level(logging.ERROR, logger="protocol.vhost_user"):
        assert hi.request(1, b"RAISE") == (0, b"")
    assert any("device failed on descriptor chain" in r.getMessage() for r in caplog.records)
    assert hi.request(1, b"again") == (5, b"again")


def test_inline_device_late_completion_is_refused(hi, caplog):
    hi.start()
    assert hi.request(1, b"KEEP") == (4, b"KEEP")
    vring, chain, _ = hi.device.held.get(timeout=TIMEOUT)
    d = hi.rings[1][0]
    with caplog.at_level(logging.WARNING, logger="protocol.vhost_user"):
        vring.complete(chain, 2)
    assert any("not in flight" in r.getMessage() for r in caplog.records)
    assert d.used_idx() == 1


def test_inline_device_stop_and_restart(hi):
    hi.start()
    for i in range(3):
        hi.request(1, b"x%d" % i)
    assert get_vring_base(hi, 1) == 3
    restart_ring(hi, 1, 3)
    assert hi.request(1, b"after") == (5, b"after")


def test_inline_device_malformed_ring_breaks_the_queue(hi):
    hi.start()
    d, kick, _, err = hi.rings[1]
    d.set_avail_idx(100)
    os.eventfd_write(kick, 1)
    assert wait_fd(err)
    assert "jumped" in hi.backend.vrings[1].broken
    assert hi.request(0, b"queue zero") == (10, b"queue zero")


# -- one worker thread for all the rings, of any device ---------------------------------------


class PoolDevice(InlineDevice):
    """InlineDevice that declares `completes_async`, as vfsd with --thread-pool-size: most
    requests are answered inline, ASYNC ones completed from another thread, HOLD ones
    when the test completes them."""

    completes_async = True


@pytest.fixture(params=[InlineDevice, PoolDevice], ids=["inline", "async"])
def device_cls(request):
    return request.param


@pytest.fixture
def hs(device_cls):
    harness = Harness(device_cls())
    yield harness
    harness.close()


@pytest.fixture
def ha():
    harness = Harness(PoolDevice())
    yield harness
    harness.close()


def get_vring_base(h: Harness, index: int) -> int:
    h.send(Request.GET_VRING_BASE, struct.pack("<II", index, 0))
    got, base = struct.unpack("<II", h.recv(Request.GET_VRING_BASE))
    assert got == index
    return base


def restart_ring(h: Harness, index: int, base: int) -> None:
    """Start a stopped ring again where it stopped, with its kick fd (as after migration)."""
    h.ok(Request.SET_VRING_BASE, struct.pack("<II", index, base))
    h.ok(Request.SET_VRING_KICK, struct.pack("<Q", index), [h.rings[index][1]])


def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def the_one_worker(h) -> threading.Thread:
    """The thread that served both rings' requests, checked to be the backend's shared one."""
    assert {i for i, _ in h.device.threads} == {0, 1}
    threads = {t for _, t in h.device.threads}
    assert len(threads) == 1, threads
    (worker,) = threads
    assert worker is h.backend._shared_worker.thread and worker.name == "vhost-user-rings"
    return worker


def test_one_worker_rings_share_one_thread(hs):
    hs.start()
    for i in (0, 1, 0, 1):
        assert hs.request(i, b"queue %d" % i) == (7, b"queue %d" % i)
    worker = the_one_worker(hs)
    assert worker is not hs.thread and worker is not threading.current_thread()
    assert all(v.started and v._shared is hs.backend._shared_worker for v in hs.backend.vrings)


def test_async_device_rings_share_one_thread(ha):
    """A device that completes chains later, from other threads (vfsd with a thread pool),
    is served by the same one worker as an inline device: no thread per ring."""
    ha.start()
    for i in (0, 1, 0, 1):
        assert ha.request(i, b"ASYNC %d" % i) == (7, b"ASYNC %d" % i)   # completed elsewhere
        assert ha.request(i, b"inline %d" % i) == (8, b"inline %d" % i)
    the_one_worker(ha)
    names = {t.name for t in threading.enumerate()}
    assert not any(n.startswith("vhost-user-vq") for n in names), names
    assert all(v.inflight == 0 for v in ha.backend.vrings)


def test_async_device_get_vring_base_waits_for_its_chains_while_the_other_ring_is_served(ha):
    """GET_VRING_BASE of one ring of an async device does not answer before that ring's
    chains in flight are completed; the worker serves the other ring meanwhile."""
    ha.start()
    ha.request(0, b"zero")
    worker = ha.backend._shared_worker.thread
    d1, kick1, call1, _ = ha.rings[1]
    for i in range(2):
        d1.add([b"HOLD %d" % i], [16], publish=False)
    d1.set_avail_idx(d1.avail_idx)
    os.eventfd_write(kick1, 1)
    held = [ha.device.held.get(timeout=TIMEOUT) for _ in range(2)]
    assert ha.backend.vrings[1].inflight == 2
    ha.send(Request.GET_VRING_BASE, struct.pack("<II", 1, 0))
    assert ha.no_reply(0.2), "GET_VRING_BASE answered while chains were in flight"
    # Out of the worker already, but waiting: queue 0 goes on, on the same thread.
    assert not ha.backend.vrings[1].started
    ha.device.threads.clear()
    for i in range(3):
        assert ha.request(0, b"ASYNC %d" % i) == (7, b"ASYNC %d" % i)
        assert ha.request(0, b"inline %d" % i) == (8, b"inline %d" % i)
    assert {t for _, t in ha.device.threads} == {worker}
    assert {i for i, _ in ha.device.threads} == {0}
    assert ha.no_reply(0), "GET_VRING_BASE answered while chains were in flight"
    # Completed out of order, from this thread; the reply comes after the last one.
    vring, chain, data = held[1]
    vring.complete(chain, EchoDevice.echo(chain, data))
    assert ha.no_reply(0.1)
    vring, chain, data = held[0]
    vring.complete(chain, EchoDevice.echo(chain, data))
    assert struct.unpack("<II", ha.recv(Request.GET_VRING_BASE)) == (1, 2)
    assert d1.used_idx() == 2
    assert sorted(d1.used_elem(i)[1] for i in range(2)) == [6, 6]
    assert wait_fd(call1)
    # Started again where it stopped, on the same worker.
    restart_ring(ha, 1, 2)
    assert ha.request(1, b"ASYNC again") == (11, b"ASYNC again")
    assert ha.request(1, b"again") == (5, b"again")
    assert ha.backend._shared_worker.thread is worker


def test_async_device_stop_gives_up_on_chains_in_flight_after_the_timeout(caplog):
    """A chain that is never completed does not hold GET_VRING_BASE beyond the drain
    timeout: the stop logs it, abandons it, and the other ring is served throughout."""
    h = Harness(PoolDevice(), drain_timeout=0.3)
    try:
        h.start()
        worker = h.backend._shared_worker.thread
        d1, kick1, _, _ = h.rings[1]
        d1.add([b"HOLD forever"], [16])
        os.eventfd_write(kick1, 1)
        vring, chain, _ = h.device.held.get(timeout=TIMEOUT)
        with caplog.at_level(logging.WARNING, logger="protocol.vhost_user"):
            t = time.monotonic()
            h.send(Request.GET_VRING_BASE, struct.pack("<II", 1, 0))
            assert h.request(0, b"ASYNC meanwhile") == (15, b"ASYNC meanwhile")
            assert struct.unpack("<II", h.recv(Request.GET_VRING_BASE)) == (1, 1)
            assert 0.25 < time.monotonic() - t < 2.0
            assert any("queue 1: 1 request(s) still in flight after 0.3s; abandoning them"
                       in r.getMessage() for r in caplog.records), caplog.records
            assert vring.inflight == 0
            vring.complete(chain, 3)   # too late: refused, nothing pushed
            assert any("not in flight" in r.getMessage() for r in caplog.records)
        assert d1.used_idx() == 0
        assert h.request(0, b"after") == (5, b"after")
        assert h.backend._shared_worker.thread is worker and worker.is_alive()
        assert {t for _, t in h.device.threads} == {worker}
    finally:
        h.close()


def test_async_device_hang_up_waits_for_chains_in_flight_then_no_thread_is_left():
    """Disconnect with a chain in flight: the teardown waits for its completion (pushed to
    the used ring), then the worker is gone."""
    h = Harness(PoolDevice())
    h.start()
    d1, kick1, _, _ = h.rings[1]
    d1.add([b"HOLD late"], [16])
    os.eventfd_write(kick1, 1)
    vring, chain, data = h.device.held.get(timeout=TIMEOUT)
    worker = h.backend._shared_worker.thread
    threading.Timer(0.2, lambda: vring.complete(chain, EchoDevice.echo(chain, data))).start()
    t = time.monotonic()
    h.close()
    assert time.monotonic() - t >= 0.15, "the teardown did not wait for the chain in flight"
    assert d1.used_elem(0) == (0, 9)
    assert not worker.is_alive() and h.backend._shared_worker.thread is None
    assert not any(t.name.startswith("vhost-user") for t in threading.enumerate())


def test_one_worker_serves_lower_queues_first(device_cls):
    """Rings kicked while the worker is busy are drained hiprio (queue 0) first."""
    h = Harness(device_cls(num_queues=3))
    try:
        h.start(queues=(0, 1, 2))
        d2, kick2, _, _ = h.rings[2]
        d2.add([b"BLOCK"], [8])
        os.eventfd_write(kick2, 1)
        assert h.device.blocked.wait(TIMEOUT)
        for i in (1, 0):  # the request queue is kicked before hiprio
            d, kick, _, _ = h.rings[i]
            d.add([b"on %d" % i], [8])
            os.eventfd_write(kick, 1)
        time.sleep(0.05)
        h.device.gate.set()
        assert [h.device.seen.get(timeout=TIMEOUT)[0] for _ in range(3)] == [2, 0, 1]
    finally:
        h.device.gate.set()
        h.close()


def test_one_worker_stopping_one_ring_leaves_the_other_served(hs):
    hs.start()
    for i in range(3):
        hs.request(0, b"hiprio %d" % i)
    hs.request(1, b"request")
    worker = hs.backend._shared_worker.thread
    assert get_vring_base(hs, 0) == 3
    assert not hs.backend.vrings[0].started and hs.backend.vrings[1].started
    d0, kick0, call0, _ = hs.rings[0]
    head, _ = d0.add([b"while stopped"], [16])
    os.eventfd_write(kick0, 1)
    assert hs.request(1, b"still served") == (12, b"still served")
    assert not wait_fd(call0, 0.2)
    assert d0.used_idx() == 3
    assert hs.backend._shared_worker.thread is worker
    # Started again where it stopped: the chain queued meanwhile is served.
    restart_ring(hs, 0, 3)
    assert wait_fd(call0)
    assert d0.used_elem(3) == (head, 13)
    assert hs.backend._shared_worker.thread is worker
    assert {t for _, t in hs.device.threads} == {worker}


def test_one_worker_get_vring_base_while_the_worker_is_busy_on_another_ring(hs):
    """The stop is taken up after the request in progress on the other ring, not after
    that ring's whole backlog, and the backlog is served afterwards."""
    hs.start()
    hs.request(0, b"hiprio")
    d1, kick1, call1, _ = hs.rings[1]
    for i in range(7):
        d1.add([b"SLOW %d" % i], [8], indirect=True, publish=False)
    d1.set_avail_idx(d1.avail_idx)
    os.eventfd_write(kick1, 1)
    assert hs.device.blocked.wait(TIMEOUT)
    assert get_vring_base(hs, 0) == 1
    assert d1.used_idx() < 7, "the stop waited for another ring's whole batch"
    wait_until(lambda: d1.used_idx() == 7, "queue 1: backlog not served after the stop")
    assert [d1.used_elem(i)[1] for i in range(7)] == [6] * 7
    assert hs.request(1, b"after") == (5, b"after")


def test_one_worker_disable_and_enable_one_ring(hs):
    hs.start()
    hs.ok(Request.SET_VRING_ENABLE, struct.pack("<II", 0, 0))
    d0, kick0, call0, _ = hs.rings[0]
    head, _ = d0.add([b"while disabled"], [16])
    os.eventfd_write(kick0, 1)
    assert hs.request(1, b"queue 1") == (7, b"queue 1")
    assert not wait_fd(call0, 0.2)
    assert d0.used_idx() == 0
    hs.ok(Request.SET_VRING_ENABLE, struct.pack("<II", 0, 1))
    assert wait_fd(call0), "enabling the ring did not process what queued meanwhile"
    assert d0.used_elem(0) == (head, 14)
    assert hs.request(0, b"enabled") == (7, b"enabled")
    assert hs.request(1, b"and 1") == (5, b"and 1")
    assert len({t for _, t in hs.device.threads}) == 1


def test_one_worker_ring_without_kick_fd_is_polled_next_to_a_kicked_one(hs):
    hs.start()
    hs.ok(Request.SET_VRING_KICK, struct.pack("<Q", 0 | 0x100))  # NOFD: no kick fd
    d0, _, call0, _ = hs.rings[0]
    d0.add([b"unkicked"], [16])
    assert wait_fd(call0), "a ring without a kick fd was not polled"
    assert d0.used_elem(0)[1] == 8
    assert hs.request(1, b"kicked") == (6, b"kicked")
    d0.add([b"again"], [16])
    assert wait_fd(call0)
    assert d0.used_elem(1)[1] == 5


def test_one_worker_new_kick_fd_replaces_the_old_one(hs):
    hs.start()
    d1, old_kick, call1, err1 = hs.rings[1]
    new_kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    hs.fds.append(new_kick)
    hs.ok(Request.SET_VRING_KICK, struct.pack("<Q", 1), [new_kick])
    hs.rings[1] = (d1, new_kick, call1, err1)
    assert hs.request(1, b"new kick") == (8, b"new kick")
    # The chain may have been served by the drain that follows the restart, leaving the
    # kick unread: the worker would then drain queue 1 once more (harmless) and serve the
    # chain below.  Take the kick away, and let any drain in progress end.
    time.sleep(0.05)
    try:
        os.read(new_kick, 8)
    except BlockingIOError:
        pass
    time.sleep(0.05)
    d1.add([b"old"], [8])
    os.eventfd_write(old_kick, 1)  # the back-end's copy was closed: nothing watches it
    assert not wait_fd(call1, 0.2)
    assert hs.request(0, b"zero") == (4, b"zero")


def test_one_worker_kick_fd_hang_up_stops_only_that_ring(hs, caplog):
    hs.negotiate()
    hs.set_mem_table()
    hs.setup_ring(0)
    hs.setup_ring(1)
    r, w = os.pipe()
    hs.fds += [r, w]
    with caplog.at_level(logging.ERROR, logger="protocol.vhost_user"):
        hs.ok(Request.SET_VRING_KICK, struct.pack("<Q", 0), [r])
        os.close(w)
        wait_until(lambda: any("queue 0: kick fd failed" in m.getMessage()
                               for m in caplog.records), "kick fd hang-up not noticed")
    assert hs.request(1, b"others go on") == (12, b"others go on")
    assert hs.backend.vrings[0].started  # unserved until stopped or given a new kick fd
    assert hs.backend.vrings[0]._kick_failed
    # A new kick fd restarts it.
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    hs.fds.append(kick)
    hs.ok(Request.SET_VRING_KICK, struct.pack("<Q", 0), [kick])
    d0, _, call0, err0 = hs.rings[0]
    hs.rings[0] = (d0, kick, call0, err0)
    assert hs.request(0, b"back") == (4, b"back")


def test_one_worker_broken_ring_leaves_the_other_served(hs):
    hs.start()
    break_by_avail_jump(hs, 0)
    for i in range(3):
        assert hs.request(1, b"fine %d" % i) == (6, b"fine %d" % i)


def test_one_worker_leaves_with_the_last_ring_and_comes_back(hs):
    hs.start()
    hs.request(0, b"zero")
    hs.request(1, b"one")
    shared = hs.backend._shared_worker
    worker = shared.thread
    for _ in range(20):
        assert worker.is_alive()
        assert (get_vring_base(hs, 1), get_vring_base(hs, 0)) == (1, 1)
        # GET_VRING_BASE of the last ring returns after the thread is gone.
        assert shared.thread is None and not worker.is_alive()
        restart_ring(hs, 1, 1)
        worker = shared.thread
        assert worker is not None
        restart_ring(hs, 0, 1)
        assert shared.thread is worker
    hs.request(1, b"two")
    hs.request(0, b"two")


def test_one_worker_ring_restarts_and_toggles_under_traffic_on_another_ring(hs):
    """Queue 0 is stopped, restarted, disabled and enabled over and over while another
    thread keeps queue 1 busy: no deadlock, nothing lost, bases right, one thread."""
    hs.start()
    d1, kick1, _, _ = hs.rings[1]
    stop, served, errors = threading.Event(), [0], []
    # (An async device completes queue 1's chains from other threads.)
    payload = b"ASYNC t" if hs.device.completes_async else b"traffic"
    rd, wr = d1.put(payload), d1.alloc(8)

    def traffic():
        try:
            while not stop.is_set():
                before = d1.used_idx()
                d1.write_desc(0, rd, 7, 1, 1)   # NEXT -> 1
                d1.write_desc(1, wr, 8, 2)      # WRITE
                d1.put_avail(0)
                os.eventfd_write(kick1, 1)
                deadline = time.monotonic() + TIMEOUT
                while d1.used_idx() == before:
                    assert time.monotonic() < deadline, "queue 1 stalled"
                    time.sleep(0.0002)
                assert d1.used_elem(before) == (0, 7)
                served[0] += 1
        except BaseException as e:  # reported by the test thread
            errors.append(e)

    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    try:
        for i in range(25):
            assert hs.request(0, b"n%d" % i) == (1 + len(str(i)), b"n%d" % i)
            assert get_vring_base(hs, 0) == i + 1
            restart_ring(hs, 0, i + 1)
            hs.ok(Request.SET_VRING_ENABLE, struct.pack("<II", 0, 0))
            hs.ok(Request.SET_VRING_ENABLE, struct.pack("<II", 0, 1))
            assert not errors, errors
    finally:
        stop.set()
        t.join(2 * TIMEOUT)
    assert not errors, errors
    assert served[0] > 25
    assert len({t for _, t in hs.device.threads}) == 1


def test_one_worker_set_mem_table_while_running(hs):
    hs.start()
    assert hs.request(1, b"one") == (3, b"one")
    hs.set_mem_table()  # rings stopped, memory swapped, rings started again
    assert hs.request(1, b"two") == (3, b"two")
    assert hs.request(0, b"zero") == (4, b"zero")


def test_one_worker_is_gone_after_disconnect(device_cls):
    before = open_fds()
    h = Harness(device_cls())
    h.start()
    h.request(0, b"bye")
    h.request(1, b"bye")
    worker = h.backend._shared_worker.thread
    assert worker.is_alive()
    h.close()
    assert not worker.is_alive(), "the ring worker outlived the connection"
    assert h.backend._shared_worker.thread is None
    h.map.close()
    assert open_fds() <= before + 1, "fds leaked after the connection ended"


def test_one_worker_hang_up_while_the_worker_is_busy(device_cls):
    """Disconnect while a request runs: teardown waits for it, then the thread is gone."""
    h = Harness(device_cls())
    h.start()
    d1, kick1, _, _ = h.rings[1]
    d1.add([b"BLOCK"], [8])
    os.eventfd_write(kick1, 1)
    assert h.device.blocked.wait(TIMEOUT)
    worker = h.backend._shared_worker.thread
    threading.Timer(0.2, h.device.gate.set).start()
    h.close()
    assert not worker.is_alive()
    assert d1.used_elem(0)[1] == 5


# -- coalesced notifications (VhostUserDevice.coalesced_queues) ------------------------------


def coalesced(device: VhostUserDevice, monkeypatch, seconds: float) -> Harness:
    """A started harness whose queue 0 is coalesced, with held notifications due after
    `seconds`.  Its rings have 8 entries: a held notification covers at most 8 // 4 = 2."""
    monkeypatch.setattr(vu, "COALESCE_SECONDS", seconds)
    device.coalesced_queues = frozenset({0})
    harness = Harness(device)
    harness.start()
    return harness


@pytest.fixture
def hc(device_cls, monkeypatch):
    """Held notifications due after a minute: what sends one is the ring's fill, a stop,
    or nothing."""
    harness = coalesced(device_cls(), monkeypatch, 60.0)
    yield harness
    harness.close()


def used_after(h: Harness, index: int, data: bytes) -> None:
    """Offer one chain, kick, wait for its used element (not for a notification)."""
    h.request(index, data, expect_call=False)


def test_coalesced_ring_holds_the_notification_until_a_quarter_of_it_is_used(hc):
    _, _, call, _ = hc.rings[0]
    used_after(hc, 0, b"forget 1")
    assert not wait_fd(call, 0.2), "notified for one chain of a ring of 8"
    used_after(hc, 0, b"forget 2")
    assert wait_fd(call), "no notification once 2 of 8 were used"
    assert not wait_fd(call, 0.1), "notified twice"


def test_coalesced_ring_leaves_the_other_rings_notified_at_once(hc):
    _, _, call0, _ = hc.rings[0]
    used_after(hc, 0, b"forget")
    for i in range(3):
        assert hc.request(1, b"request %d" % i) == (9, b"request %d" % i)  # notified
    assert not wait_fd(call0, 0.1)


def test_coalesced_ring_sends_its_held_notification_when_stopped(hc):
    _, _, call, _ = hc.rings[0]
    used_after(hc, 0, b"forget")
    assert not wait_fd(call, 0.1)
    assert get_vring_base(hc, 0) == 1
    assert wait_fd(call, 0), "GET_VRING_BASE replied before the held notification"


def test_coalesced_ring_notification_is_sent_when_due(device_cls, monkeypatch):
    h = coalesced(device_cls(), monkeypatch, 0.05)
    try:
        _, _, call, _ = h.rings[0]
        for i in range(3):   # each one held, then sent by the worker on its own
            t0 = time.monotonic()
            used_after(h, 0, b"forget %d" % i)
            assert wait_fd(call), f"held notification {i} never sent"
            assert time.monotonic() - t0 >= 0.05
    finally:
        h.close()


def test_coalesced_ring_completion_from_another_thread_notifies_at_once(monkeypatch):
    device = PoolDevice()
    h = coalesced(device, monkeypatch, 60.0)
    try:
        d, kick, call, _ = h.rings[0]
        used_after(h, 0, b"forget")    # held
        d.add([b"HOLD"], [8])
        os.eventfd_write(kick, 1)
        vring, chain, _ = device.held.get(timeout=TIMEOUT)
        wait_until(lambda: not vring._batching, "the worker's batch to end")
        assert not wait_fd(call, 0.1)
        vring.complete(chain, 4)       # a pool thread's completion: not held
        assert wait_fd(call), "no notification for a completion outside the worker"
        assert d.used_idx() == 2
        assert vring._held == 0        # that notification covered the held one too
    finally:
        h.close()


# -- malformed messages ----------------------------------------------------------------------


def test_bad_payload_size_is_nacked(h):
    h.send(Request.SET_FEATURES, b"\0" * 4, need_reply=True)
    assert struct.unpack("<Q", h.recv(Request.SET_FEATURES))[0] != 0
    h.send(Request.SET_VRING_NUM, b"\0" * 12, need_reply=True)
    assert struct.unpack("<Q", h.recv(Request.SET_VRING_NUM))[0] != 0
    assert h.get_u64(Request.GET_QUEUE_NUM) == 2  # still in step


@pytest.mark.parametrize("flags", [0x0, 0x2, 0x3, VERSION | REPLY, 0x2 | NEED_REPLY])
def test_bad_version_or_reply_flag_is_dropped(h, caplog, flags):
    with caplog.at_level(logging.ERROR, logger="protocol.vhost_user"):
        h.send(Request.SET_FEATURES, struct.pack("<Q", F_VERSION_1), flags=flags)
        assert h.no_reply()
        assert h.get_u64(Request.GET_QUEUE_NUM) == 2  # framing kept, still in step
    assert h.backend.acked_features == 0
    assert any("dropped" in r.getMessage() for r in caplog.records)


def test_oversize_payload_closes_connection(h):
    h.send(Request.SET_FEATURES, size=1 << 20)
    h.expect_close()


def test_truncated_payload_closes_connection(h):
    h.send(Request.SET_FEATURES, b"\0" * 4, size=8)
    h.fe.shutdown(socket.SHUT_WR)
    h.expect_close()


def test_truncated_header_closes_connection(h):
    h.fe.sendall(b"\x01\x00\x00")
    h.fe.shutdown(socket.SHUT_WR)
    h.expect_close()


def test_unknown_request_with_need_reply_is_nacked(h):
    assert h.ack(99) != 0
    assert h.ack(Request.SET_LOG_BASE, b"\0" * 16) != 0
    h.send(98)
    assert h.no_reply()
    assert h.get_u64(Request.GET_QUEUE_NUM) == 2


def test_unsupported_request_with_mandatory_reply_gets_failure_not_silence(h):
    h.send(Request.GET_CONFIG, b"\0" * 12)
    assert struct.unpack("<Q", h.recv(Request.GET_CONFIG))[0] != 0


def test_vring_index_out_of_range(h):
    assert h.ack(Request.SET_VRING_NUM, struct.pack("<II", 2, 8)) != 0
    assert h.ack(Request.SET_VRING_ENABLE, struct.pack("<II", 200, 1)) != 0
    ev = os.eventfd(0, os.EFD_CLOEXEC)
    h.fds.append(ev)
    assert h.ack(Request.SET_VRING_CALL, struct.pack("<Q", 7), [ev]) != 0
    assert h.ack(Request.SET_VRING_KICK, struct.pack("<Q", 0x1_0000), [ev]) != 0
    # GET_VRING_BASE always has a reply: a failure u64 (not silence, not a hang-up).
    h.send(Request.GET_VRING_BASE, struct.pack("<II", 9, 0))
    assert struct.unpack("<Q", h.recv(Request.GET_VRING_BASE))[0] != 0
    h.send(Request.GET_VRING_BASE, struct.pack("<I", 1))
    assert struct.unpack("<Q", h.recv(Request.GET_VRING_BASE))[0] != 0
    assert h.get_u64(Request.GET_QUEUE_NUM) == 2


def test_invalid_ring_parameters_are_nacked(h):
    for num in (0, 3, 65536):
        assert h.ack(Request.SET_VRING_NUM, struct.pack("<II", 1, num)) != 0
    assert h.ack(Request.SET_VRING_BASE, struct.pack("<II", 1, 0x10000)) != 0
    assert h.ack(Request.SET_VRING_ENABLE, struct.pack("<II", 1, 2)) != 0
    assert h.ack(Request.SET_VRING_ADDR, struct.pack("<IIQQQQ", 1, 1, 0, 0, 0, 0)) != 0


def test_fd_count_mismatches_are_nacked_and_fds_closed(h):
    ev = os.eventfd(0, os.EFD_CLOEXEC)
    h.fds.append(ev)
    before = open_fds()
    table = struct.pack("<IIQQQQ", 1, 0, GPA, MEM_SIZE, UVA, 0)
    assert h.ack(Request.SET_MEM_TABLE, table) != 0                      # no fd
    assert h.ack(Request.SET_MEM_TABLE, table, [h.memfd, ev]) != 0       # one too many
    assert h.ack(Request.SET_VRING_CALL, struct.pack("<Q", 1 | 0x100), [ev]) != 0  # NOFD + fd
    assert h.ack(Request.ADD_MEM_REG, struct.pack("<QQQQQ", 0, GPA, 4096, UVA, 0)) != 0
    # Messages that take no fd: the fd is closed, the message still handled.
    assert h.get_u64(Request.GET_FEATURES, fds=[ev]) & F_VERSION_1
    assert h.ack(Request.SET_OWNER, b"", [ev, ev]) == 0
    assert open_fds() == before, "received fds were not closed"


def test_bad_memory_table_is_nacked(h):
    ev = os.eventfd(0, os.EFD_CLOEXEC)
    h.fds.append(ev)
    # nregions says 2, payload carries 1
    assert h.ack(Request.SET_MEM_TABLE, struct.pack("<IIQQQQ", 2, 0, GPA, MEM_SIZE, UVA, 0),
                 [h.memfd]) != 0
    # nregions 9
    assert h.ack(Request.SET_MEM_TABLE, struct.pack("<II", 9, 0) + b"\0" * 32 * 9) != 0
    # an fd that cannot be mapped
    assert h.ack(Request.SET_MEM_TABLE, struct.pack("<IIQQQQ", 1, 0, GPA, MEM_SIZE, UVA, 0),
                 [ev]) != 0
    # zero-sized region
    assert h.ack(Request.SET_MEM_TABLE, struct.pack("<IIQQQQ", 1, 0, GPA, 0, UVA, 0),
                 [h.memfd]) != 0
    assert len(h.backend.memory) == 0
    h.set_mem_table()
    assert len(h.backend.memory) == 1


# -- socket helpers -------------------------------------------------------------------------


def test_listen_unix_mode_stale_socket_and_accept(tmp_path):
    path = tmp_path / "vfsd.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # leaves a dead socket file behind
    lsock = listen_unix(path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(str(path))
        conn = accept_one(lsock)
        conn.sendall(b"hi")
        assert c.recv(2) == b"hi"
        conn.close()
        c.close()
    finally:
        lsock.close()


def test_listen_unix_refuses_to_delete_a_regular_file(tmp_path):
    path = tmp_path / "not-a-socket"
    path.write_text("precious")
    with pytest.raises(FileExistsError):
        listen_unix(path)
    assert path.read_text() == "precious"


def test_device_must_declare_queues():
    class NoQueues(VhostUserDevice):
        def handle_chain(self, vring, chain):
            return 0

    with pytest.raises(ValueError):
        VhostUserBackend(NoQueues())


# -- random messages ----------------------------------------------------------------------


def random_message(r, h: Harness) -> tuple[int, bytes, list[int]]:
    """A request (now and then an unknown one), a payload shaped for it with
    values from the edges and from this harness's memory, and fds of any kind."""
    def v(bits):
        return r.choice([0, 1, 8, 256, 32768, 1 << (bits - 1), (1 << bits) - 1,
                         r.getrandbits(bits), GPA, UVA, MEM_SIZE]) & ((1 << bits) - 1)

    def ring():
        return r.randrange(3) if r.random() < 0.8 else v(32)

    request = r.choice(list(Request)) if r.random() < 0.95 else r.choice([0, 44, 0xFFFFFFFF])
    if r.random() < 0.1:
        payload = r.randbytes(r.randrange(300))
    elif request == Request.SET_MEM_TABLE:
        n = r.choice([0, 1, 2, 9, 0xFFFFFFFF])
        payload = struct.pack("<II", n, 0) + b"".join(
            struct.pack("<QQQQ", r.choice([GPA, v(64)]), r.choice([MEM_SIZE, v(64)]),
                        r.choice([UVA, v(64)]), r.choice([0, v(64)]))
            for _ in range(min(n, 9) if r.random() < 0.8 else r.randrange(3)))
    elif request in (Request.ADD_MEM_REG, Request.REM_MEM_REG):
        payload = struct.pack("<QQQQQ", 0, r.choice([GPA + MEM_SIZE, v(64)]),
                              r.choice([4096, v(64)]), v(64), r.choice([0, v(64)]))
    elif request == Request.SET_VRING_ADDR:
        payload = struct.pack("<IIQQQQ", ring(), v(32), v(64), v(64), v(64), v(64))
    elif request in (Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.SET_VRING_ENABLE,
                     Request.GET_VRING_BASE, Request.VRING_KICK):
        payload = struct.pack("<II", ring(), v(32))
    elif request in (Request.GET_CONFIG, Request.SET_CONFIG):
        payload = struct.pack("<III", v(32), v(32), v(32)) + r.randbytes(r.choice([0, 4, 256]))
    else:
        payload = struct.pack("<Q", ring() if r.random() < 0.5 else v(64))
    pick = r.random()
    fds = ([] if pick < 0.6 else [os.eventfd(0, os.EFD_NONBLOCK)] if pick < 0.75
           else [os.dup(h.memfd)] if pick < 0.85 else [os.open("/dev/null", os.O_RDWR)]
           if pick < 0.9 else [os.eventfd(0) for _ in range(r.randrange(2, 5))])
    return request, payload, fds


@pytest.mark.parametrize("seed", range(4))
def test_random_messages_get_exactly_one_reply_each(seed, caplog):
    """Random messages, all with NEED_REPLY, to a back-end that was set up (its
    rings kicked now and then) or not: each gets exactly one reply, for its
    request, and nothing is an internal error.  (Whether fds are left open is
    not asked here: a memory region's mapping lives as long as a view of it,
    protocol/memory.py, and the log records pytest keeps hold some through the
    tracebacks of the exceptions they carry.)"""
    r = random.Random(seed)
    for _ in range(10):
        h = Harness()
        try:
            if r.random() < 0.7:
                h.start()
            for _ in range(150):
                request, payload, fds = random_message(r, h)
                try:
                    h.send(request, payload, fds, need_reply=True)
                finally:
                    for fd in fds:
                        os.close(fd)
                got, flags, size = struct.unpack("<III", h.recv_exact(12))
                assert (got, flags) == (request, VERSION | REPLY)
                h.recv_exact(size)
                assert h.no_reply(0), f"a second reply to {request!r}"
                for _, kick, _, _ in h.rings.values():
                    if r.random() < 0.1:
                        os.eventfd_write(kick, 1)
        finally:
            h.close()
            h.map.close()
    assert not [rec for rec in caplog.records if rec.exc_info
                or "internal error" in rec.getMessage()]


# -- polling the rings (poll_max_us) ---------------------------------------------------------

POLL_MAX_US = 1_000_000   # one second: the window is whatever the test's pace makes it
PACE = 0.02               # seconds between the requests that set the window


def paced_requests(h: Harness, n: int = 14) -> None:
    """Kicked requests PACE apart: each wait is longer than the window until it has grown
    past PACE (8 µs doubled 12 times is 33 ms), and shorter than the most."""
    for i in range(n):
        data = b"paced %d" % i
        assert h.request(1, data) == (len(data), data)
        time.sleep(PACE)


def after_a_pause(h: Harness, data: bytes) -> None:
    """A kicked request after a pause longer than the window: the worker was asleep, so
    the kick is not left over (a kick for a chain already served by polling wakes the
    next wait, which then serves whatever is queued)."""
    time.sleep(0.3)
    assert h.request(1, data) == (len(data), data)


def kick_and_answer(h: Harness) -> None:
    """The kick that the chains queued without one were waiting for: they are answered."""
    os.eventfd_write(h.rings[1][1], 1)
    assert wait_fd(h.rings[1][2])


@pytest.fixture
def hp():
    """A back-end that polls, with a device that answers inline (vfsd without a pool)."""
    harness = Harness(InlineDevice(), poll_max_us=POLL_MAX_US)
    yield harness
    harness.close()


def unkicked(h: Harness, data: bytes, timeout: float) -> bool:
    """Queue a chain on ring 1 without kicking: whether it is answered within `timeout`.
    (Queued 5 ms from now: a chain queued while the worker is still in its drain, as this
    thread can when it takes the GIL from it, is served by the drain.)"""
    d, _, call, _ = h.rings[1]
    time.sleep(0.005)
    before = d.used_idx()
    d.add([data], [64])
    answered = wait_fd(call, timeout)
    assert answered == (d.used_idx() != before)
    return answered


@pytest.mark.parametrize("device_cls", [InlineDevice, PoolDevice], ids=["inline", "async"])
@pytest.mark.parametrize("poll_max_us", [POLL_MAX_US, 0], ids=["polling", "not polling"])
def test_polling_answers_a_chain_queued_soon_after_a_reply_without_a_kick(device_cls,
                                                                           poll_max_us):
    """With polling, the worker watches the rings for a while after serving chains, so a
    chain the driver queues then is served without its kick (which the driver still
    sends; this one never comes).  Without polling it waits for the kick."""
    h = Harness(device_cls(), poll_max_us=poll_max_us)
    try:
        h.start()
        paced_requests(h)
        after_a_pause(h, b"last kicked")
        assert unkicked(h, b"unkicked", PACE / 2 if poll_max_us else 0.3) == bool(poll_max_us)
        if not poll_max_us:
            kick_and_answer(h)
    finally:
        h.close()


def test_a_disabled_rings_waiting_chain_does_not_end_polling(hp):
    hp.start()
    hp.ok(Request.SET_VRING_ENABLE, struct.pack("<II", 0, 0))
    d0, kick0, call0, _ = hp.rings[0]
    d0.add([b"waits"], [8])
    os.eventfd_write(kick0, 1)
    paced_requests(hp)
    after_a_pause(hp, b"last kicked")
    assert unkicked(hp, b"unkicked", PACE / 2)
    assert not wait_fd(call0, 0)   # still waiting, unserved


def test_polling_ends_with_its_window(hp):
    """The worker sleeps once the window has passed: a chain queued later without a kick
    waits for its kick."""
    hp.start()
    paced_requests(hp)
    hp.request(1, b"last kicked")
    time.sleep(0.3)   # past the window (~33 ms), far below the most (1 s)
    assert not unkicked(hp, b"late", 0.3)
    kick_and_answer(hp)


def test_no_polling_while_a_chain_is_in_flight():
    """Polling holds the GIL, which the threads completing chains need: while one is in
    flight, the worker sleeps instead."""
    h = Harness(PoolDevice(), poll_max_us=POLL_MAX_US)
    try:
        h.start()
        paced_requests(h)
        time.sleep(0.3)  # (see after_a_pause)
        d, kick, call, _ = h.rings[1]
        d.add([b"HOLD"], [64])
        os.eventfd_write(kick, 1)
        vring, chain, _ = h.device.held.get(timeout=TIMEOUT)
        assert not unkicked(h, b"behind the held one", 0.3)
        vring.complete(chain, 0)
        assert wait_fd(call)
        os.eventfd_write(kick, 1)
        assert wait_fd(call)
        assert d.used_idx() == 14 + 2
    finally:
        h.close()


class BusyElsewhereDevice(InlineDevice):
    """InlineDevice whose `working_elsewhere` the test sets."""

    elsewhere = False

    def working_elsewhere(self) -> bool:
        return self.elsewhere


def test_no_polling_while_the_device_works_on_other_threads():
    device = BusyElsewhereDevice()
    h = Harness(device, poll_max_us=POLL_MAX_US)
    try:
        h.start()
        paced_requests(h)
        device.elsewhere = True
        after_a_pause(h, b"last kicked")
        assert not unkicked(h, b"unkicked", 0.3)
        device.elsewhere = False
        kick_and_answer(h)
    finally:
        h.close()


def test_stopping_a_ring_while_the_worker_polls(hp):
    """A ring stopped (GET_VRING_BASE) during a polling window is let go at once."""
    hp.start()
    paced_requests(hp)
    hp.request(1, b"last kicked")
    t = time.monotonic()
    assert get_vring_base(hp, 1) == 15
    assert time.monotonic() - t < PACE
    restart_ring(hp, 1, 15)
    assert hp.request(1, b"again") == (5, b"again")


@pytest.mark.parametrize("window,gap,expected", [
    (0, 50_000, vu.POLL_MIN_NS),            # a wait within the most: start polling
    (8_000, 50_000, 16_000),                # still too short: double
    (200_000, 50_000, 200_000),             # the chain came within the window: keep it
    (200_000, 250_000, 300_000),            # doubled, but never past the most
    (300_000, 900_000, 150_000),            # a longer pause than the most: halve
    (12_000, 900_000, 0),                   # ... to nothing below POLL_MIN_NS
    (0, 900_000, 0),
])
def test_the_window_adapts_to_the_guests_pace(window, gap, expected):
    assert vu._adapt_window(window, gap, 300_000) == expected


def test_poll_figures_sort_each_wait_by_how_its_chain_came():
    f = vu.PollFigures()
    assert f.summary(300_000) is None   # no chain followed a served one: nothing to log
    f.note(found=True, polled=True, paused=False)
    f.note(found=False, polled=True, paused=False)
    f.note(found=False, polled=False, paused=False)
    f.note(found=False, polled=True, paused=True)    # a pause counts as one, polled or not
    f.note(found=False, polled=False, paused=True)
    f.polling_ns = 1_500_000_000
    assert (f.found, f.after_window, f.not_polling, f.after_pause) == (1, 1, 1, 2)
    assert f.summary(300_000) == (
        "ring polling this session: of 5 waits for a chain after serving, 1 (20%) ended by "
        "polling, 1 after the window, 1 while not polling, 2 after a pause longer than "
        "300 us; 1.50 s spent polling")


def test_the_worker_logs_how_polling_went_when_the_rings_stop(caplog):
    """Each chain that follows a served one is one wait of the figures: all but the
    first of the 16, and but one more when the rings' start-up still wakes the worker
    (a control change ends the wait without a chain).  The unkicked chain was found by
    polling; the kicked ones 20 ms apart came after a window still growing from 8 µs."""
    h = Harness(InlineDevice(), poll_max_us=POLL_MAX_US)
    try:
        with caplog.at_level(logging.INFO, logger="protocol.vhost_user"):
            h.start()
            paced_requests(h)
            after_a_pause(h, b"last kicked")
            assert unkicked(h, b"unkicked", PACE / 2)
            for i in (0, 1):
                get_vring_base(h, i)
            wait_until(lambda: any("ring polling" in r.getMessage() for r in caplog.records),
                       "no polling figures logged when the rings stopped")
    finally:
        h.close()
    (line,) = [r.getMessage() for r in caplog.records if "ring polling" in r.getMessage()]
    m = re.search(r"of (\d+) waits .*?, (\d+) \(\d+%\) ended by polling, (\d+) after the "
                  r"window, (\d+) while not polling, (\d+) after a pause", line)
    assert m, line
    waits, found, after_window, not_polling, after_pause = map(int, m.groups())
    assert waits == found + after_window + not_polling + after_pause
    assert 14 + 1 + 1 - 2 <= waits <= 14 + 1 + 1 - 1, line
    assert found >= 1 and after_window >= 1, line


def test_a_worker_that_never_polls_logs_no_polling_figures(caplog):
    h = Harness(InlineDevice(), poll_max_us=0)
    try:
        with caplog.at_level(logging.INFO, logger="protocol.vhost_user"):
            h.start()
            paced_requests(h, 3)
            for i in (0, 1):
                get_vring_base(h, i)
            wait_until(lambda: h.backend._shared_worker.thread is None,
                       "the worker did not end when the rings stopped")
    finally:
        h.close()
    assert not any("ring polling" in r.getMessage() for r in caplog.records)
