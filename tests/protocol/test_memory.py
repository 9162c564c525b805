"""Guest memory layouts: SET_MEM_TABLE vs ADD_MEM_REG, several regions with holes,
hot-plug and unplug, and malformed region messages."""

from __future__ import annotations

import os

import pytest

from protocol import fuse
from tests.frontend import (MEM_REG_MSG, Buffer, Frontend, ProtocolFeature, Req)
from tests.fuse_client import FuseClient, next_unique

from .conftest import assert_serving

Op = fuse.Opcode
IH = fuse.fuse_in_header.size
BASIC = ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK


def start(fe: Frontend, want_protocol=None, nq: int = 3):
    if want_protocol is None:
        fe.negotiate()
    else:
        fe.negotiate(want_protocol=want_protocol)
    fe.map_memory()
    nq = max(2, min(nq, fe.queue_num or 2))
    for i in range(nq):
        fe.setup_queue(i, 64, enable=False)
    for i in range(nq):
        fe.set_vring_enable(i, True)
    c = FuseClient(fe, queue=1)
    c.init()
    return c


def write_read_via(c: FuseClient, fe: Frontend, region, size: int = 3 * 4096 + 7) -> None:
    """CREATE, WRITE and READ with the data buffers placed in `region`."""
    e, o = c.create(1, f"r{next_unique()}")
    data = os.urandom(size)
    wgpa = fe.mem.put(data, region=region)
    args = fuse.fuse_write_in.pack(fh=o.fh, offset=0, size=size, flags=os.O_RDWR)
    payload = c.call(Op.WRITE, e.nodeid, args, fuse.fuse_write_out.size,
                     extra_readable=[Buffer(wgpa, size, False, owned=True)])
    assert fuse.fuse_write_out.unpack_from(payload).size == size
    rgpa = fe.mem.alloc(size, region=region)
    u = next_unique()
    q = c.queue
    hdr = fuse.fuse_in_header.pack(len=IH + fuse.fuse_read_in.size, opcode=Op.READ, unique=u,
                                   nodeid=e.nodeid)
    head = q.add([hdr, fuse.fuse_read_in.pack(fh=o.fh, offset=0, size=size, flags=os.O_RDWR)],
                 [16, Buffer(rgpa, size, True, owned=False)], indirect=c.indirect)
    q.kick()
    used = q.wait_used(5.0)
    assert used[0].id == head and used[0].len == 16 + size
    assert fe.mem.read(rgpa, size) == data
    fe.mem.free(rgpa, size)
    c.release(e.nodeid, o.fh)


# ---------------------------------------------------------------------------


def test_offers_configure_mem_slots_or_not(frontend):
    """Informational: which memory protocol QEMU 7.2 will use with this daemon."""
    frontend.get_features()
    pf = frontend.get_protocol_features()
    if pf & ProtocolFeature.CONFIGURE_MEM_SLOTS:
        frontend.set_protocol_features(pf & (BASIC | ProtocolFeature.CONFIGURE_MEM_SLOTS))
        assert frontend.get_max_mem_slots() >= 8


@pytest.mark.parametrize("mode", ["set_mem_table", "add_mem_reg"])
def test_two_regions_with_hole(daemon, mode):
    with Frontend(daemon.socket_path, mem_regions=2) as fe:
        want = BASIC if mode == "set_mem_table" else BASIC | ProtocolFeature.CONFIGURE_MEM_SLOTS
        fe.negotiate(want_protocol=want)
        if mode == "add_mem_reg" and not fe.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS:
            pytest.skip("daemon does not offer CONFIGURE_MEM_SLOTS")
        fe.map_memory()
        lo, hi = sorted(fe.mem.regions, key=lambda r: r.gpa)
        fe.setup_queue(0, 64)
        fe.setup_queue(1, 64)  # rings in the low region
        c = FuseClient(fe, queue=1)
        c.init()
        write_read_via(c, fe, hi)
        write_read_via(c, fe, lo)
        if (fe.queue_num or 2) > 2:
            # A queue whose rings sit in the high region.
            ballast = [(fe.mem.alloc(n, 1, region=lo), n) for g, n in list(fe.mem._free)
                       if lo.gpa <= g < lo.gpa + lo.size]
            q2 = fe.setup_queue(2, 64)
            assert hi.gpa <= q2.desc_gpa < hi.gpa + hi.size
            c2 = FuseClient(fe, queue=2)
            c2.getattr(1)
            write_read_via(c2, fe, hi)
            for g, n in ballast:
                fe.mem.free(g, n)
        assert daemon.alive()


def test_descriptor_in_region_hole(daemon):
    with Frontend(daemon.socket_path, mem_regions=2) as fe:
        start(fe)
        q = fe.queues[1]
        hole = fe.mem.hole_gpa()
        daemon.mark()
        q.add([Buffer(hole, IH + 16, False, owned=False)], [16, 200])
        q.kick()
        daemon.wait_log(r"(?i)(address|guest memory|outside|translat|range)")
        assert_serving(fe, daemon, avoid=1)


@pytest.fixture
def slots_fe(daemon):
    fe = Frontend(daemon.socket_path)
    c = start(fe, BASIC | ProtocolFeature.CONFIGURE_MEM_SLOTS)
    if not fe.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS:
        fe.close()
        pytest.skip("daemon does not offer CONFIGURE_MEM_SLOTS")
    yield fe, c
    fe.close()


def test_hotplug_region(slots_fe, daemon):
    fe, c = slots_fe
    r = fe.mem.add_region(4 << 20)
    fe.add_mem_reg(r)
    write_read_via(c, fe, r)
    c.getattr(1)


def test_unplug_region_then_use_it(slots_fe, daemon):
    fe, c = slots_fe
    r = fe.mem.add_region(1 << 20)
    fe.add_mem_reg(r)
    write_read_via(c, fe, r)
    fe.rem_mem_reg(r)
    gpa = r.gpa + 4096
    fe.mem.remove_region(r)
    q = fe.queues[1]
    daemon.mark()
    q.add([c.in_header(Op.GETATTR, 1, 16), bytes(16)], [16, Buffer(gpa, 200, True, owned=False)])
    q.kick()
    daemon.wait_log(r"(?i)(address|guest memory|outside|translat|range)")
    assert_serving(fe, daemon, avoid=1)
    daemon.assert_no_traceback()


def _nack(fe, req, payload, fds=()):
    fe.send(req, payload, list(fds), need_reply=True)
    return fe.expect_reply(req).u64()


def test_add_mem_reg_malformed(slots_fe, daemon):
    fe, c = slots_fe
    r0 = fe.mem.regions[0]
    extra = os.memfd_create("extra", os.MFD_CLOEXEC)
    os.ftruncate(extra, 1 << 20)
    try:
        far = r0.gpa + (64 << 30)
        cases = {
            "no fd": (MEM_REG_MSG.pack(0, far, 1 << 20, far, 0), []),
            "two fds": (MEM_REG_MSG.pack(0, far, 1 << 20, far, 0), [extra, extra]),
            "overlaps existing": (MEM_REG_MSG.pack(0, r0.gpa + 4096, 1 << 20, far, 0), [extra]),
            "beyond fd size": (MEM_REG_MSG.pack(0, far, 64 << 20, far, 0), [extra]),
            "zero size": (MEM_REG_MSG.pack(0, far, 0, far, 0), [extra]),
            "offset beyond fd": (MEM_REG_MSG.pack(0, far, 4096, far, 2 << 20), [extra]),
            "gpa wraps": (MEM_REG_MSG.pack(0, 2**64 - 4096, 1 << 20, far, 0), [extra]),
            "short payload": (MEM_REG_MSG.pack(0, far, 1 << 20, far, 0)[:24], [extra]),
        }
        results = {}
        for name, (payload, fds) in cases.items():
            daemon.mark()
            results[name] = _nack(fe, Req.ADD_MEM_REG, payload, fds)
        accepted = [n for n, v in results.items() if v == 0]
        assert not accepted, f"accepted bad ADD_MEM_REG: {accepted}"
    finally:
        os.close(extra)
    fe.sync()
    c.getattr(1)
    write_read_via(c, fe, r0)
    daemon.assert_no_traceback()


def test_rem_mem_reg_unknown_region(slots_fe, daemon):
    fe, c = slots_fe
    r0 = fe.mem.regions[0]
    assert _nack(fe, Req.REM_MEM_REG, MEM_REG_MSG.pack(0, r0.gpa + (32 << 30), 4096, 0, 0)) != 0
    assert _nack(fe, Req.REM_MEM_REG, MEM_REG_MSG.pack(0, r0.gpa, r0.size // 2, r0.uva, 0)) != 0
    c.getattr(1)
    daemon.assert_no_traceback()


def test_more_regions_than_slots(slots_fe, daemon):
    fe, c = slots_fe
    slots = fe.max_mem_slots or fe.get_max_mem_slots()
    assert 1 <= slots <= 512
    added = 0
    acks = []
    for i in range(slots + 2):
        r = fe.mem.add_region(4096, name=f"slot{i}")
        ack = _nack(fe, Req.ADD_MEM_REG, MEM_REG_MSG.pack(0, *r.table_entry()), [r.fd])
        acks.append(ack)
        if ack:
            fe.mem.remove_region(r)
        else:
            added += 1
    assert added == slots - 1, f"{slots} slots, region 0 + {added} more accepted: {acks}"
    c.getattr(1)
    daemon.assert_no_traceback()


def test_rings_in_memory_table_replacement(fe, daemon):
    """QEMU re-sends the table (e.g. a memory hotplug without CONFIGURE_MEM_SLOTS):
    the rings keep working through the new mapping."""
    c = FuseClient(fe, queue=1)
    c.init()
    for _ in range(3):
        fe.set_mem_table()
        c.getattr(1)
        write_read_via(c, fe, fe.mem.regions[0], 8192)
    assert daemon.alive()
