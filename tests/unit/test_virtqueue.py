"""Split virtqueue: round trips and every malformed ring the device must refuse."""

from __future__ import annotations

import mmap
import random
import signal
import struct

import pytest

from protocol.memory import GuestMemory
from protocol.virtqueue import (MAX_INDIRECT_DESCRIPTORS, VIRTQ_DESC, VIRTQ_DESC_F_INDIRECT,
                                VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_USED_ELEM,
                                DescriptorChain, Virtqueue, VirtqueueError)

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT

GPA = 0x10_0000


class RingDriver:
    """The driver side of a split ring, laid out in a writable buffer at `gpa_base`.

    Written from the virtio spec's layout (2.7), independently of
    protocol.virtqueue; used by the vhost-user tests too.
    """

    def __init__(self, buf, gpa_base: int, size: int, ring_offset: int = 0):
        self.buf = buf
        self.base = gpa_base
        self.size = size
        off = ring_offset
        self.desc_gpa = gpa_base + off
        self.avail_gpa = self.desc_gpa + 16 * size
        self.used_gpa = (self.avail_gpa + 6 + 2 * size + 3) // 4 * 4
        self._heap = (self.used_gpa + 6 + 8 * size + 4095) // 4096 * 4096
        self.avail_idx = 0
        self._next_desc = 0

    # raw memory
    def write(self, gpa: int, data: bytes) -> None:
        off = gpa - self.base
        assert 0 <= off and off + len(data) <= len(self.buf)
        self.buf[off:off + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        off = gpa - self.base
        return bytes(self.buf[off:off + n])

    def alloc(self, n: int, align: int = 16) -> int:
        gpa = (self._heap + align - 1) // align * align
        self._heap = gpa + max(n, 1)
        assert self._heap - self.base <= len(self.buf), "test ring heap exhausted"
        return gpa

    def put(self, data: bytes) -> int:
        gpa = self.alloc(len(data))
        self.write(gpa, data)
        return gpa

    # ring pieces
    def write_desc(self, slot: int, addr: int, length: int, flags: int = 0, nxt: int = 0,
                   table: int | None = None) -> None:
        base = self.desc_gpa if table is None else table
        self.write(base + 16 * slot, struct.pack("<QIHH", addr, length, flags, nxt))

    def put_avail(self, head: int, publish: bool = True) -> None:
        self.write(self.avail_gpa + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            self.set_avail_idx(self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.write(self.avail_gpa + 2, struct.pack("<H", self.avail_idx))

    def set_used_idx(self, value: int) -> None:
        self.write(self.used_gpa + 2, struct.pack("<H", value & 0xFFFF))

    def used_idx(self) -> int:
        return struct.unpack("<H", self.read(self.used_gpa + 2, 2))[0]

    def used_elem(self, i: int) -> tuple[int, int]:
        return struct.unpack("<II", self.read(self.used_gpa + 4 + 8 * (i % self.size), 8))

    def take_descs(self, n: int) -> list[int]:
        out = [(self._next_desc + k) % self.size for k in range(n)]
        self._next_desc = (self._next_desc + n) % self.size
        return out

    def add(self, readable=(), writable=(), indirect: bool = False, publish: bool = True):
        """Queue a chain of readable (bytes) then writable (sizes) buffers.

        Returns (head, [gpa of each writable buffer])."""
        bufs = [(self.put(r), len(r), 0) for r in readable]
        wgpas = []
        for n in writable:
            g = self.alloc(n)
            wgpas.append(g)
            bufs.append((g, n, WRITE))
        if indirect:
            table = self.alloc(16 * len(bufs))
            for i, (g, n, f) in enumerate(bufs):
                last = i == len(bufs) - 1
                self.write_desc(i, g, n, f | (0 if last else NEXT), 0 if last else i + 1, table)
            (head,) = self.take_descs(1)
            self.write_desc(head, table, 16 * len(bufs), INDIRECT)
        else:
            slots = self.take_descs(len(bufs))
            for i, ((g, n, f), s) in enumerate(zip(bufs, slots)):
                last = i == len(bufs) - 1
                self.write_desc(s, g, n, f | (0 if last else NEXT), 0 if last else slots[i + 1])
            head = slots[0]
        self.put_avail(head, publish)
        return head, wgpas


def make(size=8, buf_size=1 << 20, last_avail_idx=0):
    buf = bytearray(buf_size)
    d = RingDriver(buf, GPA, size)
    mem = GuestMemory.from_buffers([(GPA, buf)])
    vq = Virtqueue(mem, size, d.desc_gpa, d.avail_gpa, d.used_gpa, last_avail_idx)
    return d, vq


def data(views) -> bytes:
    return b"".join(bytes(v) for v in views)


# -- layouts ------------------------------------------------------------------------


def test_wire_sizes():
    assert VIRTQ_DESC.size == 16
    assert VIRTQ_USED_ELEM.size == 8


# -- round trips ---------------------------------------------------------------------


def test_empty_ring_pops_nothing():
    _, vq = make()
    assert vq.pop() is None
    assert vq.last_avail_idx == 0 and vq.used_idx == 0


def test_direct_round_trip():
    d, vq = make()
    head, (w1, w2) = d.add([b"hello ", b"world"], [4, 8])
    chain = vq.pop()
    assert isinstance(chain, DescriptorChain)
    assert chain.head == head
    assert data(chain.readable) == b"hello world"
    assert chain.readable_len == 11 and chain.writable_len == 12
    assert [len(v) for v in chain.writable] == [4, 8]
    assert all(v.readonly for v in chain.readable)
    assert not any(v.readonly for v in chain.writable)
    chain.writable[0][:] = b"ABCD"
    chain.writable[1][:2] = b"EF"
    assert vq.pop() is None
    vq.push(chain.head, 6)
    assert d.used_idx() == 1
    assert d.used_elem(0) == (head, 6)
    assert d.read(w1, 4) == b"ABCD" and d.read(w2, 2) == b"EF"
    assert vq.last_avail_idx == 1
    assert vq.needs_notify() is True


def test_views_are_zero_copy():
    d, vq = make()
    _, (w,) = d.add([b"x"], [4])
    chain = vq.pop()
    d.write(w, b"guest")  # a later driver write shows through the view
    assert bytes(chain.writable[0]) == b"gues"


def test_several_chains_in_order_and_out_of_order_completion():
    d, vq = make(size=8)
    heads = [d.add([bytes([i])], [1])[0] for i in range(4)]
    chains = [vq.pop() for _ in range(4)]
    assert [c.head for c in chains] == heads
    assert [data(c.readable) for c in chains] == [b"\0", b"\1", b"\2", b"\3"]
    assert vq.pop() is None
    for c in reversed(chains):
        vq.push(c.head, 1)
    assert d.used_idx() == 4
    assert [d.used_elem(i)[0] for i in range(4)] == list(reversed(heads))


def test_avail_idx_is_reread_after_running_dry():
    d, vq = make()
    d.add([b"a"], [])
    assert vq.pop() is not None and vq.pop() is None
    d.add([b"b"], [])
    assert data(vq.pop().readable) == b"b"


def test_unpublished_entries_are_not_consumed():
    d, vq = make()
    d.add([b"a"], [], publish=False)
    assert vq.pop() is None


def test_index_wraps_at_2_16():
    buf = bytearray(1 << 20)
    d = RingDriver(buf, GPA, 8)
    d.set_avail_idx(0xFFFE)
    d.set_used_idx(0xFFFE)
    mem = GuestMemory.from_buffers([(GPA, buf)])
    vq = Virtqueue(mem, 8, d.desc_gpa, d.avail_gpa, d.used_gpa, 0xFFFE)
    assert vq.used_idx == 0xFFFE  # read from the guest's used ring
    for i in range(4):
        d.add([bytes([i])], [2])
    got = []
    for _ in range(4):
        c = vq.pop()
        got.append(data(c.readable))
        vq.push(c.head, 2)
    assert got == [b"\0", b"\1", b"\2", b"\3"]
    assert vq.last_avail_idx == 2 and d.used_idx() == 2 and vq.pop() is None


def test_indirect_chain():
    d, vq = make()
    head, (w,) = d.add([b"in", b"direct"], [5], indirect=True)
    chain = vq.pop()
    assert chain.head == head
    assert data(chain.readable) == b"indirect"
    assert chain.writable_len == 5
    chain.writable[0][:] = b"12345"
    vq.push(head, 5)
    assert d.read(w, 5) == b"12345" and d.used_elem(0) == (head, 5)


def test_direct_descriptors_then_one_indirect():
    """2.7.5.3.2: "zero or more normal chained descriptors followed by a single
    descriptor with flags&VIRTQ_DESC_F_INDIRECT" is valid."""
    d, vq = make()
    a = d.put(b"first")
    table = d.alloc(32)
    d.write_desc(0, d.put(b"second"), 6, NEXT, 1, table)
    w = d.alloc(3)
    d.write_desc(1, w, 3, WRITE, 0, table)
    d.write_desc(0, a, 5, NEXT, 1)
    d.write_desc(1, table, 32, INDIRECT | WRITE)  # WRITE on a table pointer is ignored
    d.put_avail(0)
    chain = vq.pop()
    assert data(chain.readable) == b"firstsecond" and chain.writable_len == 3


def test_zero_length_descriptor_is_skipped():
    d, vq = make()
    d.write_desc(0, d.put(b"ab"), 2, NEXT, 1)
    d.write_desc(1, 0xDEAD_0000_0000, 0, NEXT, 2)  # no bytes: address never used
    d.write_desc(2, d.alloc(4), 4, WRITE)
    d.put_avail(0)
    chain = vq.pop()
    assert data(chain.readable) == b"ab" and len(chain.readable) == 1
    assert chain.writable_len == 4


def test_buffer_spanning_two_regions():
    a, b = bytearray(0x10000), bytearray(0x10000)
    d = RingDriver(a, GPA, 4)
    mem = GuestMemory.from_buffers([(GPA, a), (GPA + 0x10000, b)])
    vq = Virtqueue(mem, 4, d.desc_gpa, d.avail_gpa, d.used_gpa)
    a[-3:] = b"abc"
    b[:4] = b"defg"
    d.write_desc(0, GPA + 0x10000 - 3, 7)
    d.put_avail(0)
    chain = vq.pop()
    assert [bytes(v) for v in chain.readable] == [b"abc", b"defg"]
    assert chain.readable_len == 7


def test_loop_back_to_a_readable_descriptor_is_reported_as_a_loop():
    d, vq = make(size=8)
    d.write_desc(0, d.put(b"a"), 1, NEXT, 1)
    d.write_desc(1, d.alloc(4), 4, WRITE | NEXT, 2)
    d.write_desc(2, d.alloc(4), 4, WRITE | NEXT, 0)
    d.put_avail(0)
    pop_error(vq, "loops back to descriptor 0")


def test_full_length_direct_chain_is_allowed():
    d, vq = make(size=4)
    d.add([b"a", b"b", b"c"], [1])
    assert vq.pop().readable_len == 3


# -- configuration errors -------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 3, 6, 65536, 32768 * 2, -4])
def test_bad_queue_size(size):
    buf = bytearray(1 << 20)
    mem = GuestMemory.from_buffers([(GPA, buf)])
    with pytest.raises(VirtqueueError, match="queue size"):
        Virtqueue(mem, size, GPA, GPA + 0x1000, GPA + 0x2000)


def test_max_queue_size_is_accepted():
    buf = bytearray(1 << 20)
    mem = GuestMemory.from_buffers([(GPA, buf)])
    Virtqueue(mem, 32768, GPA, GPA + 0x80000, GPA + 0x90000)


def test_ring_outside_memory():
    buf = bytearray(0x4000)
    mem = GuestMemory.from_buffers([(GPA, buf)])
    with pytest.raises(VirtqueueError, match="not in guest memory"):
        Virtqueue(mem, 256, GPA, GPA + 0x1000, GPA + 0x3ff0)  # used ring runs off the end


def test_misaligned_ring():
    buf = bytearray(0x4000)
    mem = GuestMemory.from_buffers([(GPA, buf)])
    with pytest.raises(VirtqueueError, match="aligned"):
        Virtqueue(mem, 4, GPA + 8, GPA + 0x1000, GPA + 0x2000)
    with pytest.raises(VirtqueueError, match="aligned"):
        Virtqueue(mem, 4, GPA, GPA + 0x1001, GPA + 0x2000)
    with pytest.raises(VirtqueueError, match="aligned"):
        Virtqueue(mem, 4, GPA, GPA + 0x1000, GPA + 0x2002)


# -- malformed rings --------------------------------------------------------------------


def pop_error(vq, match):
    with pytest.raises(VirtqueueError, match=match):
        vq.pop()


def test_avail_idx_jump_beyond_queue_size():
    d, vq = make(size=8)
    d.set_avail_idx(9)
    pop_error(vq, "jumped")


def test_avail_idx_going_backwards_is_a_jump():
    d, vq = make(size=8, last_avail_idx=5)
    d.set_avail_idx(4)
    pop_error(vq, "jumped")


class _IdxChangesOnce:
    """avail->idx as a driver still writing it shows it: `first`, then `then`."""

    def __init__(self, ring, first, then):
        self.ring, self.reads = ring, [first, then]

    def __getitem__(self, i):
        if i != 1:
            return self.ring[i]
        return self.reads.pop(0) if len(self.reads) > 1 else self.reads[0]


def test_avail_idx_jump_says_what_a_second_read_saw():
    d, vq = make(size=8, last_avail_idx=5)
    vq._avail16 = _IdxChangesOnce(vq._avail16, 0, 6)
    pop_error(vq, r"jumped from 5 to 0: 65531 new entries in a queue of size 8 "
                  r"\(read again: 6\)$")
    d, vq = make(size=8)
    d.set_avail_idx(9)
    with pytest.raises(VirtqueueError) as e:
        vq.pop()
    assert "(" not in str(e.value)  # the same value twice, the used ring as stored: no note


def test_avail_idx_jump_says_when_the_rings_read_as_cleared():
    d, vq = make(size=8)
    for _ in range(10):  # every used slot stored once at least
        head, _ = d.add([b"x"], [8])
        assert vq.pop().head == head
        vq.push(head, 16)
    d.set_avail_idx(0x8000)
    d.write(d.used_gpa, bytes(4 + 8 * 8))  # as if the memory under the rings had been cleared
    pop_error(vq, r"jumped from 10 to 32768: 32758 new entries in a queue of size 8 "
                  r"\(8 of the last 8 used elements read as zeros: was the rings' memory "
                  r"cleared\?\)$")


def test_head_out_of_range():
    d, vq = make(size=8)
    d.put_avail(8)
    pop_error(vq, "descriptor 8, beyond the queue size")


def test_next_out_of_range():
    d, vq = make(size=8)
    d.write_desc(0, d.put(b"a"), 1, NEXT, 8)
    d.put_avail(0)
    pop_error(vq, "links to descriptor 8")


def test_loop_in_descriptor_chain():
    d, vq = make(size=8)
    g = d.put(b"a")
    d.write_desc(0, g, 1, NEXT, 1)
    d.write_desc(1, g, 1, NEXT, 0)
    d.put_avail(0)
    pop_error(vq, "chain at head 0 loops back to descriptor 0 after 2 descriptors")


def test_self_loop_in_indirect_table():
    d, vq = make()
    table = d.alloc(32)
    g = d.put(b"a")
    d.write_desc(0, g, 1, NEXT, 1, table)
    d.write_desc(1, g, 1, NEXT, 1, table)
    d.write_desc(0, table, 32, INDIRECT)
    d.put_avail(0)
    pop_error(vq, "indirect table of head 0 loops back to descriptor 1")


@pytest.mark.parametrize("length", [0, 8, 24, 17])
def test_indirect_table_length_not_multiple_of_16(length):
    d, vq = make()
    d.write_desc(0, d.alloc(64), length, INDIRECT)
    d.put_avail(0)
    pop_error(vq, "not a non-zero multiple of 16")


def test_indirect_table_too_long():
    d, vq = make(buf_size=1 << 20)
    n = MAX_INDIRECT_DESCRIPTORS + 1
    d.write_desc(0, d.alloc(16 * n), 16 * n, INDIRECT)
    d.put_avail(0)
    pop_error(vq, f"{n} entries is longer than")


def test_indirect_table_longer_than_queue_is_accepted():
    """Linux sizes indirect tables by the scatter list, which may exceed the ring."""
    d, vq = make(size=4)
    d.add([bytes([i]) for i in range(10)], [1] * 6, indirect=True)
    c = vq.pop()
    assert c.readable_len == 10 and c.writable_len == 6


def test_nested_indirect():
    d, vq = make()
    inner = d.alloc(16)
    d.write_desc(0, d.put(b"a"), 1, 0, 0, inner)
    outer = d.alloc(16)
    d.write_desc(0, inner, 16, INDIRECT, 0, outer)
    d.write_desc(0, outer, 16, INDIRECT)
    d.put_avail(0)
    pop_error(vq, "nested indirect")


def test_indirect_with_next():
    d, vq = make()
    table = d.alloc(16)
    d.write_desc(0, d.put(b"a"), 1, 0, 0, table)
    d.write_desc(0, table, 16, INDIRECT | NEXT, 1)
    d.write_desc(1, d.put(b"b"), 1)
    d.put_avail(0)
    pop_error(vq, "both INDIRECT and NEXT")


def test_readable_after_writable():
    d, vq = make()
    d.write_desc(0, d.alloc(4), 4, WRITE | NEXT, 1)
    d.write_desc(1, d.put(b"late"), 4)
    d.put_avail(0)
    pop_error(vq, "device-readable but follows a device-writable")


def test_readable_after_writable_in_indirect_table():
    d, vq = make()
    table = d.alloc(32)
    d.write_desc(0, d.alloc(4), 4, WRITE | NEXT, 1, table)
    d.write_desc(1, d.put(b"late"), 4, 0, 0, table)
    d.write_desc(0, table, 32, INDIRECT)
    d.put_avail(0)
    pop_error(vq, "follows a device-writable")


def test_readable_after_zero_length_writable():
    d, vq = make()
    d.write_desc(0, d.alloc(4), 0, WRITE | NEXT, 1)
    d.write_desc(1, d.put(b"late"), 4)
    d.put_avail(0)
    pop_error(vq, "follows a device-writable")


@pytest.mark.parametrize("addr_off,length", [
    (1 << 20, 1),            # just past the end
    ((1 << 20) - 4, 8),      # straddles the end
    (-0x1000, 16),           # below the region
    (None, 16),              # wraps 2^64
])
def test_buffer_outside_guest_memory(addr_off, length):
    d, vq = make()
    addr = (1 << 64) - 8 if addr_off is None else GPA + addr_off
    d.write_desc(0, addr, length)
    d.put_avail(0)
    pop_error(vq, "points outside guest memory")


def test_writable_buffer_outside_guest_memory_in_indirect_table():
    d, vq = make()
    table = d.alloc(16)
    d.write_desc(0, 0x9000_0000, 64, WRITE, 0, table)
    d.write_desc(0, table, 16, INDIRECT)
    d.put_avail(0)
    pop_error(vq, r"descriptor 0 in the indirect table of head 0 .* points outside guest "
                  r"memory \(gpa 0x90000000, len 64\)")


def test_buffer_in_gap_between_regions():
    a, b = bytearray(0x10000), bytearray(0x10000)
    d = RingDriver(a, GPA, 4)
    mem = GuestMemory.from_buffers([(GPA, a), (GPA + 0x20000, b)])
    vq = Virtqueue(mem, 4, d.desc_gpa, d.avail_gpa, d.used_gpa)
    d.write_desc(0, GPA + 0xFFF0, 0x20)  # runs into the hole
    d.put_avail(0)
    pop_error(vq, "outside guest memory")


def test_indirect_table_outside_guest_memory():
    d, vq = make()
    d.write_desc(0, GPA + (1 << 20) - 16, 32, INDIRECT)
    d.put_avail(0)
    pop_error(vq, "indirect table at gpa")


def test_chain_longer_than_4gib():
    try:
        big = mmap.mmap(-1, (1 << 31) + 4096)  # lazily allocated, never touched
    except (OSError, ValueError, OverflowError):
        pytest.skip("cannot reserve 2 GiB of address space here")
    ring = bytearray(0x10000)
    d = RingDriver(ring, GPA, 4)
    mem = GuestMemory.from_buffers([(GPA, ring), (1 << 40, big)])
    vq = Virtqueue(mem, 4, d.desc_gpa, d.avail_gpa, d.used_gpa)
    for i in range(3):
        d.write_desc(i, 1 << 40, (1 << 31) + 1, NEXT if i < 2 else 0, i + 1)
    d.put_avail(0)
    pop_error(vq, "longer than 2\\^32 bytes")
    del vq, mem


def test_push_checks_head():
    _, vq = make(size=8)
    with pytest.raises(VirtqueueError):
        vq.push(8, 0)
    with pytest.raises(VirtqueueError):
        vq.push(0, 1 << 32)


def test_error_messages_name_the_descriptor():
    d, vq = make()
    d.write_desc(0, d.put(b"a"), 1, NEXT, 5)
    d.write_desc(5, 0xABC0_0000, 7, 0)
    d.put_avail(0)
    pop_error(vq, r"descriptor 5 \(chain head 0\) points outside guest memory "
                  r"\(gpa 0xabc00000, len 7\)")


# -- loops found by counting, reported by name ---------------------------------------------
# The walk counts descriptors instead of remembering them (a chain in one table has at
# most as many distinct descriptors as the table); the loop is located when reported.


def test_loop_at_the_end_of_a_long_direct_chain():
    d, vq = make(size=64)
    g = d.put(b"a")
    for i in range(40):
        d.write_desc(i, g, 1, NEXT, i + 1 if i < 39 else 20)
    d.put_avail(0)
    pop_error(vq, "chain at head 0 loops back to descriptor 20 after 40 descriptors")


def test_loop_through_writable_descriptors_only():
    d, vq = make(size=8)
    d.write_desc(0, d.put(b"a"), 1, NEXT, 1)
    for i in (1, 2, 3):
        d.write_desc(i, d.alloc(4), 4, WRITE | NEXT, i + 1 if i < 3 else 1)
    d.put_avail(0)
    pop_error(vq, "chain at head 0 loops back to descriptor 1 after 4 descriptors")


def test_loop_in_an_indirect_table_longer_than_the_queue():
    d, vq = make(size=4)
    table = d.alloc(16 * 16)
    g = d.put(b"a")
    for i in range(10):
        d.write_desc(i, g, 1, NEXT, i + 1 if i < 9 else 3, table)
    d.write_desc(0, table, 16 * 16, INDIRECT)
    d.put_avail(0)
    pop_error(vq, "indirect table of head 0 loops back to descriptor 3 after 10 descriptors")


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 0, 2, 1], [2, 3, 1, 0]])
def test_chain_through_every_descriptor_of_the_ring_is_not_a_loop(order):
    d, vq = make(size=4)
    for k, slot in enumerate(order):
        last = k == len(order) - 1
        d.write_desc(slot, d.put(bytes([k])), 1, 0 if last else NEXT, 0 if last else order[k + 1])
    d.put_avail(order[0])
    c = vq.pop()
    assert data(c.readable) == b"\0\1\2\3"


def test_chain_through_every_entry_of_an_indirect_table_is_not_a_loop():
    d, vq = make(size=2)
    table = d.alloc(16 * 5)
    order = [0, 3, 1, 4, 2]  # the table's first entry is index 0 (2.7.5.3.2)
    for k, slot in enumerate(order):
        last = k == len(order) - 1
        d.write_desc(slot, d.put(bytes([k])), 1, 0 if last else NEXT,
                     0 if last else order[k + 1], table)
    d.write_desc(0, table, 16 * 5, INDIRECT)
    d.put_avail(0)
    assert data(vq.pop().readable) == b"\0\1\2\3\4"


def test_loop_is_reported_before_the_2_32_limit_it_would_reach():
    """Each pass round the loop adds bytes: the loop is the error, as it was first."""
    try:
        big = mmap.mmap(-1, (1 << 31) + 4096)  # lazily allocated, never touched
    except (OSError, ValueError, OverflowError):
        pytest.skip("cannot reserve 2 GiB of address space here")
    ring = bytearray(0x10000)
    d = RingDriver(ring, GPA, 8)
    mem = GuestMemory.from_buffers([(GPA, ring), (1 << 40, big)])
    vq = Virtqueue(mem, 8, d.desc_gpa, d.avail_gpa, d.used_gpa)
    d.write_desc(0, 1 << 40, 1 << 30, NEXT, 1)
    d.write_desc(1, 1 << 40, 1 << 30, NEXT, 0)
    d.put_avail(0)
    pop_error(vq, "chain at head 0 loops back to descriptor 0 after 2 descriptors")
    del vq, mem


# -- views ---------------------------------------------------------------------------------


def assert_views(chain):
    for v in chain.readable:
        assert v.readonly
        with pytest.raises(TypeError):
            v[:1] = b"x"
    for v in chain.writable:
        assert not v.readonly
        v[:1] = b"x"


@pytest.mark.parametrize("indirect", [False, True])
def test_readable_views_are_read_only_and_writable_ones_writable(indirect):
    d, vq = make()
    d.add([b"one", b"two"], [3, 5], indirect=indirect)
    c = vq.pop()
    assert data(c.readable) == b"onetwo" and [len(v) for v in c.writable] == [3, 5]
    assert_views(c)


def test_views_outside_the_main_region_and_across_regions():
    """The walk slices the largest region inline; other buffers go through GuestMemory."""
    small, large = bytearray(0x1000), bytearray(0x40000)
    d = RingDriver(large, GPA, 8, ring_offset=0x1000)
    mem = GuestMemory.from_buffers([(GPA - 0x1000, small), (GPA, large)])
    vq = Virtqueue(mem, 8, d.desc_gpa, d.avail_gpa, d.used_gpa)
    small[-4:] = b"abcd"
    large[:2] = b"ef"
    d.write_desc(0, GPA - 0x1000 + 0x10, 8, NEXT, 1)  # in the small region: readable
    d.write_desc(1, GPA - 4, 6, NEXT, 2)              # across both: readable
    d.write_desc(2, GPA - 0x1000 + 0x100, 4, WRITE)   # in the small region: writable
    d.put_avail(0)
    c = vq.pop()
    assert [bytes(v) for v in c.readable] == [bytes(8), b"abcd", b"ef"]
    assert c.readable_len == 14 and c.writable_len == 4
    assert_views(c)
    assert small[0x100:0x101] == b"x"


# -- random rings ----------------------------------------------------------------------


def random_ring(r, size: int):
    """A ring in the larger of two memory regions with a gap between them, its
    descriptor table, indirect tables, avail entries and index all random:
    addresses inside either region, in the gap, across a region's end, at the
    top of the address space; lengths up to 2^32-1; flags with unknown bits;
    next fields past the table; loops; avail idx leaps past the ring size."""
    small, large = bytearray(0x1000), bytearray(0x20000)
    d = RingDriver(large, GPA, size, ring_offset=0x1000)
    mem = GuestMemory.from_buffers([(GPA - 0x3000, small), (GPA, large)])
    vq = Virtqueue(mem, size, d.desc_gpa, d.avail_gpa, d.used_gpa)
    tables = [d.alloc(16 * 8) for _ in range(3)]

    def addr():
        return r.choice([GPA - 0x3000 + r.randrange(0x1000), GPA + 0x8000 + r.randrange(0x1000),
                         GPA - 0x2000 + r.randrange(0x1000), GPA - 0x2004, GPA + 0x20000 - 8,
                         r.choice(tables), 0, (1 << 64) - 16, r.getrandbits(64)])

    def desc():
        flags = r.choice([0, NEXT, WRITE, NEXT | WRITE, INDIRECT, INDIRECT | NEXT,
                          INDIRECT | WRITE, r.getrandbits(16)])
        length = r.choice([0, 1, 8, 16, 16 * r.randrange(1, 9), 4096, 0xFFFFFFFF,
                           r.getrandbits(32)])
        return addr(), length, flags, r.choice([r.randrange(size), r.randrange(size),
                                                size, r.getrandbits(16)])

    for slot in range(size):
        d.write_desc(slot, *desc())
    for table in tables:
        for slot in range(8):
            d.write_desc(slot, *desc(), table=table)
    for _ in range(r.randrange(1, size + 1)):
        d.put_avail(r.choice([r.randrange(size), r.randrange(size), size, 0xFFFF]),
                    publish=False)
    d.set_avail_idx(d.avail_idx if r.random() < 0.9 else r.getrandbits(16))
    return vq, (small, large)


@pytest.mark.parametrize("seed", range(4))
def test_random_rings_pop_chains_or_break_cleanly(seed):
    """Whatever the driver wrote, pop() gives a chain whose views lie in guest
    memory and add up to its lengths, or None, or VirtqueueError; it never
    raises anything else, never loops, never hands out more than the rules allow."""
    r = random.Random(seed)
    outcomes = set()

    def stuck(*_):
        raise AssertionError("pop() did not return: it walks a loop")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(60)   # (the 400 rings take well under a second)
    try:
        walk_random_rings(r, outcomes)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert outcomes == {"broken", "empty", "chain"}   # the rings reached every outcome


def walk_random_rings(r, outcomes: set) -> None:
    for _ in range(400):
        size = r.choice([1, 2, 8, 16])
        vq, memory = random_ring(r, size)
        for _ in range(size + 2):
            try:
                chain = vq.pop()
            except VirtqueueError:
                outcomes.add("broken")
                break
            if chain is None:
                outcomes.add("empty")
                break
            outcomes.add("chain")
            assert 0 <= chain.head < size
            assert chain.readable_len == sum(map(len, chain.readable))
            assert chain.writable_len == sum(map(len, chain.writable))
            assert len(chain.readable) + len(chain.writable) <= size + MAX_INDIRECT_DESCRIPTORS
            assert all(any(v.obj is m for m in memory) for v in chain.readable + chain.writable)
            assert_views(chain)
            vq.push(chain.head, r.choice([0, chain.writable_len]))
