"""Malformed vhost-user messages from the front-end: answered without a crash.

For a message whose framing is intact (the header's size matches the bytes
sent) the daemon must stay connected: nack it when NEED_REPLY asks (REPLY_ACK is
negotiated by the fixtures), log it, and keep serving FUSE on the rings.  Only
when the framing itself is lost (a size it cannot read) may it close the
connection, and then it must exit promptly without a traceback.
"""

from __future__ import annotations

import os
import struct
import time

import pytest

from tests.frontend import (HEADER, MEM_REGION, U64, VERSION, VRING_STATE, Disconnected, Req,
                            Timeout)
from tests.fuse_client import FuseClient

from .conftest import _proc


def fuse_still_works(fe):
    c = FuseClient(fe, queue=1)
    c.getattr(1)


def send_bad(fe, daemon, request, payload=b"", fds=(), *, need_reply=True, flags=None,
             size=None, pattern=None, may_close=False, require_nack=True):
    """Send one bad message; check the daemon's answer; return 'alive' or 'closed'."""
    daemon.mark()
    fe.send(request, payload, fds, need_reply=need_reply, flags=flags, size=size)
    try:
        msg = fe.recv(2.0)
    except Timeout:
        msg = None
    except (Disconnected, ConnectionError):
        msg = "closed"
    if msg == "closed" or not fe.is_open(0.05):
        assert may_close, f"daemon closed the connection on a recoverable message:\n{daemon.log_since_mark()}"
        rc = daemon.wait(5.0)
        assert rc is not None, "daemon closed the connection but did not exit"
        assert rc >= 0, f"daemon killed by signal {-rc}"
        daemon.assert_no_traceback()
        if pattern:
            daemon.wait_log(pattern)
        return "closed"
    if msg is not None:
        assert msg.request == request, f"reply for {msg.request}, sent {request}"
        if need_reply and require_nack:
            assert msg.u64() != 0, "malformed message acked as success"
    elif need_reply and require_nack:
        pytest.fail(f"no reply to a NEED_REPLY message; log:\n{daemon.log_since_mark()}")
    fe.sync()
    fuse_still_works(fe)
    assert daemon.alive()
    daemon.assert_no_traceback()
    if pattern:
        daemon.wait_log(pattern)
    return "alive"


# ---------------------------------------------------------------------------


def test_payload_too_small(client, fe, daemon):
    send_bad(fe, daemon, Req.SET_FEATURES, b"\0" * 4, pattern=r"(?i)(size|length|payload|short)")


def test_vring_state_too_small(client, fe, daemon):
    send_bad(fe, daemon, Req.SET_VRING_NUM, struct.pack("<I", 1), pattern=r"(?i)(size|length|payload|short)")


def test_vring_addr_too_small(client, fe, daemon):
    send_bad(fe, daemon, Req.SET_VRING_ADDR, b"\1\0\0\0" + bytes(20),
             pattern=r"(?i)(size|length|payload|short)")


def test_payload_size_beyond_max(client, fe, daemon):
    """A size nobody can honour (256 MiB): the framing is lost; closing is fine."""
    outcome = send_bad(fe, daemon, Req.SET_FEATURES, b"", size=0x1000_0000, need_reply=False,
                       may_close=True, require_nack=False, pattern=r"(?i)(size|length|payload|large|big)")
    assert outcome == "closed"


@pytest.mark.parametrize("flags", [0x0, 0x2, 0x3], ids=["v0", "v2", "v3"])
def test_bad_version(client, fe, daemon, flags):
    """A header with another protocol version: the spec lets the back-end close the
    connection; either way it names the problem and does not crash."""
    send_bad(fe, daemon, Req.GET_FEATURES, b"", flags=flags, need_reply=False, may_close=True,
             require_nack=False, pattern=r"(?i)version")


def test_reply_flag_from_frontend(client, fe, daemon):
    """A message with the REPLY bit set, sent to the back-end."""
    fe.send(Req.GET_FEATURES, b"", flags=VERSION | 0x4)
    try:
        msg = fe.recv(1.0)
        assert msg.request == Req.GET_FEATURES
    except Timeout:
        pass
    fe.sync()
    fuse_still_works(fe)
    daemon.assert_no_traceback()


def test_unknown_request_with_need_reply(client, fe, daemon):
    send_bad(fe, daemon, 200, b"\0" * 8, pattern=r"(?i)(unknown|unsupported|unhandled|not implemented|200)")


def test_unknown_request_without_need_reply(client, fe, daemon):
    daemon.mark()
    fe.send(250, b"xyz", need_reply=False)
    try:  # no reply is expected; a nack is tolerated
        while not fe.no_reply_within(0.3):
            fe.recv(0.5)
    except Timeout:
        pass
    fe.sync()
    fuse_still_works(fe)
    daemon.wait_log(r"(?i)(unknown|unsupported|unhandled|not implemented|250)")


def test_request_not_negotiated(client, fe, daemon):
    """Messages gated on protocol features not negotiated (CONFIG, STATUS, INFLIGHT)."""
    for req, payload in ((Req.GET_CONFIG, struct.pack("<III", 0, 8, 0) + bytes(8)),
                         (Req.SET_STATUS, U64.pack(0xF)),
                         (Req.GET_MAX_MEM_SLOTS, b"")):
        fe.send(req, payload, need_reply=True)
        try:
            msg = fe.recv(1.0)
            assert msg.request == req
        except Timeout:
            pass
    fe.sync()
    fuse_still_works(fe)
    daemon.assert_no_traceback()


@pytest.mark.parametrize("req", [Req.SET_VRING_NUM, Req.SET_VRING_BASE, Req.SET_VRING_ENABLE])
def test_vring_index_out_of_range(client, fe, daemon, req):
    num = 1 if req == Req.SET_VRING_ENABLE else 64
    send_bad(fe, daemon, req, VRING_STATE.pack(200, num), pattern=r"(?i)(index|queue|vring|range)")


def test_vring_addr_index_out_of_range(client, fe, daemon):
    q = fe.queues[1]
    payload = struct.pack("<IIQQQQ", 1000, 0, fe.mem.uva(q.desc_gpa), fe.mem.uva(q.used_gpa),
                          fe.mem.uva(q.avail_gpa), 0)
    send_bad(fe, daemon, Req.SET_VRING_ADDR, payload, pattern=r"(?i)(index|queue|vring|range)")


@pytest.mark.parametrize("req", [Req.SET_VRING_KICK, Req.SET_VRING_CALL, Req.SET_VRING_ERR])
def test_vring_fd_index_out_of_range(client, fe, daemon, req):
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        send_bad(fe, daemon, req, U64.pack(0xFF), [efd], pattern=r"(?i)(index|queue|vring|range)")
    finally:
        os.close(efd)


def test_get_vring_base_index_out_of_range(client, fe, daemon):
    """GET_VRING_BASE must be answered with a vring state; for a queue that does not
    exist there is none to give, so closing the connection is allowed too."""
    send_bad(fe, daemon, Req.GET_VRING_BASE, VRING_STATE.pack(77, 0), need_reply=False,
             may_close=True, require_nack=False, pattern=r"(?i)(index|queue|vring|range)")


def test_vring_kick_without_fd_or_nofd_flag(client, fe, daemon):
    send_bad(fe, daemon, Req.SET_VRING_KICK, U64.pack(1), [], pattern=r"(?i)(fd|descriptor)")


@pytest.mark.parametrize("num", [0, 100, 65536, 1 << 31], ids=["zero", "not-pow2", "too-big", "huge"])
def test_vring_num_invalid(client, fe, daemon, num):
    # Queue 3 (if offered) or a fresh index: never touch the running queue 1.
    index = 3 if (fe.queue_num or 2) > 3 else 0
    send_bad(fe, daemon, Req.SET_VRING_NUM, VRING_STATE.pack(index, num),
             pattern=r"(?i)(size|num|queue|power)")


def test_vring_addr_outside_memory(client, fe, daemon):
    """Ring addresses outside guest memory: refused at SET_VRING_ADDR, or (checked
    when the ring starts) at SET_VRING_KICK; the other queues keep working."""
    index = 3 if (fe.queue_num or 2) > 3 else 0
    daemon.mark()
    acks = []
    for req, payload, fds in (
            (Req.SET_VRING_NUM, VRING_STATE.pack(index, 64), []),
            (Req.SET_VRING_ADDR, struct.pack("<IIQQQQ", index, 0, 0xDEAD_0000, 0xBEEF_0000,
                                             0xCAFE_0000, 0), []),
            (Req.SET_VRING_KICK, U64.pack(index), [os.eventfd(0, os.EFD_CLOEXEC)])):
        fe.send(req, payload, fds, need_reply=True)
        for fd in fds:
            os.close(fd)
        acks.append((req.name, fe.expect_reply(req).u64()))
    assert acks[0][1] == 0
    assert acks[1][1] != 0 or acks[2][1] != 0, f"bad ring addresses accepted: {acks}"
    daemon.wait_log(r"(?i)(address|addr|memory|map|translat|range)")
    fe.sync()
    fuse_still_works(fe)
    daemon.assert_no_traceback()


def _mem_table(regions):
    return struct.pack("<II", len(regions), 0) + b"".join(MEM_REGION.pack(*r) for r in regions)


def test_mem_table_no_fd(client, fe, daemon):
    send_bad(fe, daemon, Req.SET_MEM_TABLE, _mem_table([fe.mem.region()]), [],
             pattern=r"(?i)(fd|descriptor|region)")


def test_mem_table_too_many_fds(client, fe, daemon):
    extra = os.memfd_create("extra", os.MFD_CLOEXEC)
    try:
        send_bad(fe, daemon, Req.SET_MEM_TABLE, _mem_table([fe.mem.region()]), [fe.mem.fd, extra],
                 pattern=r"(?i)(fd|descriptor|region)")
    finally:
        os.close(extra)


def test_mem_table_nregions_exceeds_payload(client, fe, daemon):
    payload = struct.pack("<II", 3, 0) + MEM_REGION.pack(*fe.mem.region())
    send_bad(fe, daemon, Req.SET_MEM_TABLE, payload, [fe.mem.fd],
             pattern=r"(?i)(region|size|length|payload)")


def test_mem_table_too_many_regions(client, fe, daemon):
    regions = [fe.mem.region()] * 9
    fds = [fe.mem.fd] * 9
    outcome = send_bad(fe, daemon, Req.SET_MEM_TABLE, _mem_table(regions), fds[:8],
                       pattern=r"(?i)(region|fd|descriptor|many)")
    assert outcome == "alive"


def test_mem_table_region_beyond_fd_size(client, fe, daemon):
    """A region bigger than its memfd would SIGBUS on access: refuse it up front."""
    g, s, u, o = fe.mem.region()
    send_bad(fe, daemon, Req.SET_MEM_TABLE, _mem_table([(g, s * 4, u, o)]), [fe.mem.fd],
             pattern=r"(?i)(size|region|fd|file|beyond|exceed)")


def test_mem_table_zero_regions(client, fe, daemon):
    """Zero regions with no fds: allowed or refused, but the rings must not use freed memory."""
    daemon.mark()
    fe.send(Req.SET_MEM_TABLE, _mem_table([]), [], need_reply=True)
    msg = fe.expect_reply(Req.SET_MEM_TABLE)
    if msg.u64() == 0:
        # Accepted: memory is gone; restore it and carry on.
        fe.set_mem_table()
    fe.sync()
    fuse_still_works(fe)
    daemon.assert_no_traceback()


def test_mem_table_overlapping_regions(client, fe, daemon):
    g, s, u, o = fe.mem.region()
    half = s // 2
    # Refusing is better, but QEMU never sends this: only survival is required.
    send_bad(fe, daemon, Req.SET_MEM_TABLE, _mem_table([(g, s, u, 0), (g + half, half, u + s, half)]),
             [fe.mem.fd, fe.mem.fd], require_nack=False)


def test_fds_on_messages_without_fds_are_closed(client, fe, daemon):
    """Stray fds (on GET_FEATURES etc.) must be closed, not leaked."""
    pid = _proc(daemon.impl).pid

    def nfds():
        return len(os.listdir(f"/proc/{pid}/fd"))

    fe.sync()
    before = nfds()
    for _ in range(20):
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        fe.send(Req.GET_FEATURES, b"", [efd])
        os.close(efd)
        fe.expect_reply(Req.GET_FEATURES)
    for _ in range(5):
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        fe.send(250, b"", [efd], need_reply=True)
        os.close(efd)
        try:
            fe.recv(1.0)
        except Timeout:
            pass
    fe.sync()
    time.sleep(0.2)
    after = nfds()
    assert after <= before + 2, f"daemon fd count grew {before} -> {after}"
    fuse_still_works(fe)


def test_resetting_vring_fds_replaces_and_closes_old(client, fe, daemon):
    """QEMU re-sends SET_VRING_CALL (masking): the old fd is closed, the new one used."""
    pid = _proc(daemon.impl).pid
    fe.sync()
    before = len(os.listdir(f"/proc/{pid}/fd"))
    q = fe.queues[1]
    for _ in range(10):
        newcall = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        fe.set_vring_call(1, newcall)
        os.close(q.call_fd)
        q.call_fd = newcall
    fe.sync()
    fuse_still_works(fe)
    after = len(os.listdir(f"/proc/{pid}/fd"))
    assert after <= before + 1, f"daemon fd count grew {before} -> {after}"
    # The last call fd is the one signalled.
    c = FuseClient(fe, queue=1)
    q.add([c.in_header(3, 1, 16), bytes(16)], [16, 104])
    q.kick()
    assert q.wait_call(5.0)
    q.poll_used()


def test_truncated_header_then_disconnect(fe, daemon):
    fe.send_bytes(HEADER.pack(Req.SET_FEATURES, VERSION, 8)[:6])
    time.sleep(0.2)
    fe.close()
    rc = daemon.wait(5.0)
    assert rc is not None, "daemon did not exit after a disconnect mid-header"
    assert rc == 0, f"exit status {rc}"
    daemon.assert_no_traceback()


def test_truncated_payload_then_disconnect(fe, daemon):
    fe.send_bytes(HEADER.pack(Req.SET_FEATURES, VERSION, 8) + b"\0\0\0")
    time.sleep(0.2)
    fe.close()
    rc = daemon.wait(5.0)
    assert rc == 0, f"exit status {rc}"
    daemon.assert_no_traceback()


def test_disconnect_with_requests_in_flight(client, fe, daemon):
    q = fe.queues[1]
    c = FuseClient(fe, queue=1)
    for _ in range(20):
        q.add([c.in_header(3, 1, 16), bytes(16)], [16, 104])
    q.kick()
    fe.close()
    rc = daemon.wait(5.0)
    assert rc == 0, f"exit status {rc}"
    daemon.assert_no_traceback()


def test_sigterm_exits_promptly(client, fe, daemon):
    p = _proc(daemon.impl)
    p.terminate()
    rc = daemon.wait(5.0)
    assert rc is not None, "daemon ignored SIGTERM"
    assert rc == 0
    daemon.assert_no_traceback()
