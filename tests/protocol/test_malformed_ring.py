"""Hostile guest input on the virtqueues: answered without a crash.

Each test breaks queue 1 (a request queue) in one way, then checks that the
daemon is alive, that its log names the problem, and that it still answers on
another request queue (a broken queue may stay broken).  FUSE-level lies in an
otherwise valid chain must get an error reply on the same queue.
"""

from __future__ import annotations

import os
import stat
import time

import pytest

from protocol import fuse
from tests.frontend import (DESC, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
                            Buffer)
from tests.fuse_client import next_unique

from .conftest import assert_serving

Op = fuse.Opcode
IH = fuse.fuse_in_header.size


def getattr_header(length: int | None = None, nodeid: int = 1, unique: int | None = None) -> bytes:
    return fuse.fuse_in_header.pack(len=IH + 16 if length is None else length, opcode=Op.GETATTR,
                                    unique=next_unique() if unique is None else unique, nodeid=nodeid)


def drain(q, seconds: float = 0.5):
    """Collect whatever the daemon completes on a (possibly broken) queue."""
    time.sleep(seconds)
    return q.poll_used()


def check_survived(fe, daemon, pattern: str, broken: int = 1, log_timeout: float = 5.0) -> str:
    line = daemon.wait_log(pattern, log_timeout)
    assert_serving(fe, daemon, avoid=broken)
    daemon.assert_no_traceback()
    return line


# ---------------------------------------------------------------------------
# Descriptor-level violations
# ---------------------------------------------------------------------------

ADDR_CASES = {
    # name: (readable buffer, writable buffer) -- one of them is bad
    "readable-beyond-end": lambda m: (Buffer(m.gpa_end + 0x10000, IH + 16, False, owned=False), None),
    "readable-straddles-end": lambda m: (Buffer(m.gpa_end - 8, IH + 16, False, owned=False), None),
    "readable-below-base": lambda m: (Buffer(m.gpa_base - 0x1000, IH + 16, False, owned=False), None),
    "readable-wraps-u64": lambda m: (Buffer(2**64 - 16, IH + 16, False, owned=False), None),
    "readable-huge-len": lambda m: (Buffer(m.gpa_base + 0x1000, 0xFFFFFFFF, False, owned=False), None),
    "writable-beyond-end": lambda m: (None, Buffer(m.gpa_end + 0x1000, 200, True, owned=False)),
    "writable-uva-not-gpa": lambda m: (None, Buffer(m.uva_base + 0x2000, 200, True, owned=False)),
}


@pytest.mark.parametrize("case", sorted(ADDR_CASES))
def test_descriptor_outside_guest_memory(client, fe, daemon, case):
    q = fe.queues[1]
    bad_r, bad_w = ADDR_CASES[case](fe.mem)
    readable = [bad_r] if bad_r else [getattr_header(), fuse.fuse_getattr_in.pack()]
    writable = [bad_w] if bad_w else [16, fuse.fuse_attr_out.size]
    daemon.mark()
    q.add(readable, writable, indirect=False)
    q.kick()
    check_survived(fe, daemon, r"(?i)(address|addr|guest memory|outside|not mapped|unmapped|translat|range)")


def test_indirect_entry_outside_guest_memory(client, fe, daemon):
    q = fe.queues[1]
    daemon.mark()
    q.add([Buffer(fe.mem.gpa_end + 0x4000, IH + 16, False, owned=False)], [16, 200], indirect=True)
    q.kick()
    check_survived(fe, daemon, r"(?i)(address|addr|guest memory|outside|not mapped|unmapped|translat|range)")


def test_descriptor_loop(client, fe, daemon):
    q = fe.queues[1]
    a, b, c = q.reserve_slots(3)
    hdr = fe.mem.put(getattr_header())
    args = fe.mem.put(fuse.fuse_getattr_in.pack())
    daemon.mark()
    q.add_raw_chain([  # all device-readable, so only the loop is wrong
        (a, hdr, IH, VRING_DESC_F_NEXT, b),
        (b, args, 16, VRING_DESC_F_NEXT, c),
        (c, args, 16, VRING_DESC_F_NEXT, a),  # back to the head
    ])
    q.kick()
    check_survived(fe, daemon, r"(?i)(loop|cycle|too long|too many|exceed|longer than)")


def test_descriptor_self_loop(client, fe, daemon):
    q = fe.queues[1]
    (a,) = q.reserve_slots(1)
    hdr = fe.mem.put(getattr_header())
    daemon.mark()
    q.add_raw_chain([(a, hdr, IH, VRING_DESC_F_NEXT, a)])
    q.kick()
    check_survived(fe, daemon, r"(?i)(loop|cycle|too long|too many|exceed|longer than)")


def test_indirect_table_loop(client, fe, daemon):
    q = fe.queues[1]
    (a,) = q.reserve_slots(1)
    hdr = fe.mem.put(getattr_header())
    table = (DESC.pack(hdr, IH, VRING_DESC_F_NEXT, 1)
             + DESC.pack(hdr, 16, VRING_DESC_F_NEXT, 0))
    tgpa = fe.mem.put(table)
    daemon.mark()
    q.add_raw_chain([(a, tgpa, len(table), VRING_DESC_F_INDIRECT, 0)])
    q.kick()
    check_survived(fe, daemon, r"(?i)(loop|cycle|too long|too many|exceed|longer than)")


def test_next_index_out_of_range(client, fe, daemon):
    q = fe.queues[1]
    (a,) = q.reserve_slots(1)
    hdr = fe.mem.put(getattr_header())
    daemon.mark()
    q.add_raw_chain([(a, hdr, IH, VRING_DESC_F_NEXT, q.size + 7)])
    q.kick()
    check_survived(fe, daemon, r"(?i)(next|index|range|descriptor)")


@pytest.mark.parametrize("length", [20, 0, 8, 16 * 65536 + 16], ids=["len20", "len0", "len8", "huge"])
def test_indirect_table_bad_length(client, fe, daemon, length):
    q = fe.queues[1]
    (a,) = q.reserve_slots(1)
    hdr = fe.mem.put(getattr_header())
    out = fe.mem.alloc(256)
    table = (DESC.pack(hdr, IH, VRING_DESC_F_NEXT, 1)
             + DESC.pack(out, 256, VRING_DESC_F_WRITE, 0))
    tgpa = fe.mem.put(table)
    daemon.mark()
    q.add_raw_chain([(a, tgpa, length, VRING_DESC_F_INDIRECT, 0)])
    q.kick()
    check_survived(fe, daemon, r"(?i)(indirect|length|len|size|table)")


def test_nested_indirect(client, fe, daemon):
    q = fe.queues[1]
    (a,) = q.reserve_slots(1)
    hdr = fe.mem.put(getattr_header())
    inner = fe.mem.put(DESC.pack(hdr, IH, 0, 0))
    outer = fe.mem.put(DESC.pack(inner, 16, VRING_DESC_F_INDIRECT, 0))
    daemon.mark()
    q.add_raw_chain([(a, outer, 16, VRING_DESC_F_INDIRECT, 0)])
    q.kick()
    check_survived(fe, daemon, r"(?i)(indirect|nested)")


def test_indirect_with_next_flag(client, fe, daemon):
    """INDIRECT and NEXT together (the driver MUST NOT): refused or handled, no crash."""
    q = fe.queues[1]
    a, b = q.reserve_slots(2)
    hdr = fe.mem.put(getattr_header())
    out = fe.mem.alloc(256)
    table = DESC.pack(hdr, IH, 0, 0)
    tgpa = fe.mem.put(table)
    daemon.mark()
    q.add_raw_chain([(a, tgpa, 16, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, b),
                     (b, out, 256, VRING_DESC_F_WRITE, 0)])
    q.kick()
    time.sleep(0.5)
    assert_serving(fe, daemon, avoid=1)
    daemon.assert_no_traceback()


def test_readable_after_writable(client, fe, daemon):
    """A device-readable buffer after a writable one breaks the chain's layout."""
    q = fe.queues[1]
    a, b, c = q.reserve_slots(3)
    hdr = fe.mem.put(getattr_header())
    out = fe.mem.alloc(256)
    args = fe.mem.put(fuse.fuse_getattr_in.pack())
    daemon.mark()
    q.add_raw_chain([(a, hdr, IH, VRING_DESC_F_NEXT, b),
                     (b, out, 256, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, c),
                     (c, args, 16, 0, 0)])
    q.kick()
    time.sleep(0.5)
    assert_serving(fe, daemon, avoid=1)
    daemon.assert_no_traceback()


def test_head_index_out_of_range(client, fe, daemon):
    q = fe.queues[1]
    daemon.mark()
    q.put_avail(q.size + 3)
    q.kick()
    check_survived(fe, daemon, r"(?i)(head|index|range|descriptor)")


def test_avail_idx_jumps_past_ring_size(client, fe, daemon):
    q = fe.queues[1]
    daemon.mark()
    q.set_avail_idx(q.avail_idx + q.size + 1)
    q.kick()
    check_survived(fe, daemon, r"(?i)(avail|index|idx)")


def test_zero_length_chain_buffers(client, fe, daemon):
    """Zero-length descriptors are legal but useless: no crash."""
    q = fe.queues[1]
    hdr = getattr_header()
    q.add([b"", hdr, b"", fuse.fuse_getattr_in.pack()], [0, 16, fuse.fuse_attr_out.size])
    q.kick()
    time.sleep(0.3)
    q.poll_used()
    assert_serving(fe, daemon, avoid=1)
    daemon.assert_no_traceback()


# ---------------------------------------------------------------------------
# FUSE-level lies inside a well-formed chain: error reply on the same queue
# ---------------------------------------------------------------------------

def _raw_getattr(client, q, length: int, extra: bytes = b""):
    u = next_unique()
    head = q.add([getattr_header(length, unique=u), fuse.fuse_getattr_in.pack() + extra],
                 [16, fuse.fuse_attr_out.size])
    q.kick()
    used = q.wait_used(5.0)
    assert [x.id for x in used] == [head]
    return u, used[0]


@pytest.mark.parametrize("delta", [4096, 1, -(IH + 16) + 8], ids=["big", "big1", "below-header"])
def test_fuse_len_lies(client, fe, daemon, delta):
    """fuse_in_header.len bigger than the chain (or below the header size): EINVAL."""
    q = fe.queues[1]
    daemon.mark()
    u, used = _raw_getattr(client, q, IH + 16 + delta)
    oh = fuse.fuse_out_header.unpack_from(used.written)
    assert used.len == 16 and oh.len == 16, "a lying length must not get a normal reply"
    assert oh.unique == u
    assert oh.error < 0
    daemon.wait_log(r"(?i)(len|length|size|short|truncat|malformed)")
    # Same queue keeps working.
    client.getattr(1)
    daemon.assert_no_traceback()


@pytest.mark.parametrize("cut", [1, 28, 80], ids=["cut1", "cut28", "cut80"])
def test_fuse_len_shorter_than_args(client, fe, daemon, shared_dir, cut):
    """fuse_in_header.len smaller than the chain, cutting into fixed-size args: the
    daemon must go by len (not read past it) and refuse the truncated request."""
    (shared_dir / "m").write_text("x")
    daemon.chown(shared_dir / "m")
    os.chmod(shared_dir / "m", 0o644)
    e = client.lookup(1, "m")
    args = fuse.fuse_setattr_in.pack(valid=int(fuse.SetattrValid.MODE), mode=0o100600)
    daemon.mark()
    err, payload = client.request(Op.SETATTR, e.nodeid, args, fuse.fuse_attr_out.size,
                                  length=IH + len(args) - cut)
    assert err != 0, "SETATTR with truncated args succeeded"
    assert stat.S_IMODE(client.getattr(e.nodeid).attr.mode) == 0o644
    daemon.assert_no_traceback()


def test_lookup_len_cuts_name(client, fe, daemon, shared_dir):
    (shared_dir / "abcdef").write_text("x")
    daemon.mark()
    err, _ = client.request(Op.LOOKUP, 1, b"abcdef\0", fuse.fuse_entry_out.size, length=IH + 3)
    assert err != 0
    err, _ = client.request(Op.LOOKUP, 1, b"abcdef", fuse.fuse_entry_out.size)  # no NUL
    assert err != 0
    err, _ = client.request(Op.LOOKUP, 1, b"abc\0def\0", fuse.fuse_entry_out.size)  # trailing junk
    assert err != 0
    assert client.lookup(1, "abcdef").attr.size == 1
    daemon.assert_no_traceback()


def test_truncated_in_header(client, fe, daemon):
    q = fe.queues[1]
    daemon.mark()
    head = q.add([getattr_header()[:20]], [16, 200])
    q.kick()
    used = drain(q, 0.5)
    for x in used:
        if x.id == head:
            assert x.len == 0, "no reply possible without a full header (no unique)"
    check_survived(fe, daemon, r"(?i)(header|short|truncat|too small)")


def test_truncated_args(client, fe, daemon):
    """The header's len matches the chain, but the args are missing: EINVAL."""
    err, payload = client.request(Op.WRITE, 1, fuse.fuse_write_in.pack(size=10)[:12], fuse.fuse_write_out.size)
    assert err != 0
    err, _ = client.request(Op.MKDIR, 1, b"\x01", fuse.fuse_entry_out.size)
    assert err != 0
    client.getattr(1)
    daemon.assert_no_traceback()


def test_write_size_larger_than_data(client, fe, daemon, shared_dir):
    e, o = client.create(1, "w")
    args = fuse.fuse_write_in.pack(fh=o.fh, offset=0, size=1 << 20)
    err, _ = client.request(Op.WRITE, e.nodeid, args, fuse.fuse_write_out.size, extra_readable=[b"x" * 100])
    assert err != 0, "WRITE claiming more data than the request holds must fail"
    assert (shared_dir / "w").stat().st_size == 0
    client.release(e.nodeid, o.fh)
    daemon.assert_no_traceback()


def test_read_reply_larger_than_writable(client, fe, daemon, shared_dir):
    """READ asking for more than the writable space: never write past the buffers."""
    (shared_dir / "r").write_bytes(b"y" * 20000)
    e = client.lookup(1, "r")
    o = client.open(e.nodeid, os.O_RDONLY)
    q = fe.queues[1]
    area = fe.mem.alloc(16 + 1000 + 4096)
    fe.mem.fill(area, 16 + 1000 + 4096, 0xAB)
    u = next_unique()
    hdr = fuse.fuse_in_header.pack(len=IH + fuse.fuse_read_in.size, opcode=Op.READ, unique=u,
                                   nodeid=e.nodeid)
    args = fuse.fuse_read_in.pack(fh=o.fh, offset=0, size=20000, flags=os.O_RDONLY)
    head = q.add([hdr, args], [Buffer(area, 16, True, owned=False),
                               Buffer(area + 16, 1000, True, owned=False)])
    q.kick()
    used = q.wait_used(5.0)
    assert used[0].id == head and used[0].len <= 1016
    assert fe.mem.read(area + 1016, 4096) == b"\xab" * 4096, "daemon wrote past the chain"
    oh = fuse.fuse_out_header.unpack_from(fe.mem.read(area, 16))
    assert oh.unique == u and oh.len == used[0].len
    if oh.error == 0:
        assert fe.mem.read(area + 16, oh.len - 16) == b"y" * (oh.len - 16)
    fe.mem.free(area, 16 + 1000 + 4096)
    client.release(e.nodeid, o.fh, os.O_RDONLY)
    daemon.assert_no_traceback()


def test_no_writable_buffer_for_reply(client, fe, daemon):
    q = fe.queues[1]
    daemon.mark()
    head = q.add([getattr_header(), fuse.fuse_getattr_in.pack()], [])
    q.kick()
    used = q.wait_used(5.0)
    assert used[0].id == head and used[0].len == 0
    daemon.wait_log(r"(?i)(room|writable|reply)")
    client.getattr(1)


def test_reply_space_smaller_than_reply(client, fe, daemon):
    err, payload = client.request(Op.GETATTR, 1, fuse.fuse_getattr_in.pack(), 8)
    assert err != 0 and payload == b""
    client.getattr(1)


def test_total_extlen_lies(client, fe, daemon):
    err, _ = client.request(Op.GETATTR, 1, fuse.fuse_getattr_in.pack(), fuse.fuse_attr_out.size,
                            total_extlen=100)
    assert err != 0
    client.getattr(1)


def test_forget_malformed_on_hiprio(client, fe, daemon):
    """Short FORGET / lying len on hiprio: completed, no crash, queue keeps working."""
    hq = fe.queues[0]
    daemon.mark()
    hq.submit([fuse.fuse_in_header.pack(len=IH + 8, opcode=Op.FORGET, unique=next_unique(), nodeid=5)], [])
    hq.submit([fuse.fuse_in_header.pack(len=IH + 800, opcode=Op.FORGET, unique=next_unique(), nodeid=5)
               + b"\1" + bytes(7)], [])
    hq.submit([b"\0" * 10], [])
    hq.submit([fuse.fuse_in_header.pack(len=IH + 8, opcode=Op.GETATTR, unique=next_unique(), nodeid=1)
               + bytes(8)], [])  # a replying opcode on hiprio with no reply space
    client.forget(1 << 30, 1)
    client.getattr(1)
    assert daemon.alive()
    daemon.assert_no_traceback()
