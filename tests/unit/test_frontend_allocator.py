"""The test front-end's guest memory allocator refuses to corrupt itself: a range freed
twice, or a ring handed out again, fails the test at that spot instead of zeroing a ring
under a running back-end (which the back-end would rightly call a broken queue)."""

import pytest

from tests.frontend import DriverQueue, GuestMemory, Timeout


@pytest.fixture
def mem():
    m = GuestMemory(1 << 20)
    yield m
    m.close()


def test_a_range_freed_twice_is_refused(mem):
    gpa = mem.alloc(64)
    mem.free(gpa, 64)
    with pytest.raises(AssertionError, match="freed twice"):
        mem.free(gpa + 16, 16)


def test_a_ring_is_never_freed_nor_handed_out_again(mem):
    q = DriverQueue(mem, 1, 8)
    with pytest.raises(AssertionError, match="overlaps a ring"):
        mem.free(q.avail_gpa, 6 + 2 * 8)
    blocks = list(mem._free)
    mem._free.append((q.used_gpa, 16))  # a corrupt free list, as a stray free would leave it
    mem._free.sort()
    with pytest.raises(AssertionError, match="overlaps a ring"):
        mem.alloc(16, 4)
    mem._free = blocks


def test_freed_memory_is_reused_and_zeroed(mem):
    gpa = mem.put(b"x" * 100)
    mem.free(gpa, 100)
    assert mem.alloc(100) == gpa and mem.read(gpa, 100) == bytes(100)


def test_a_timeout_says_whether_the_avail_ring_still_holds_what_was_written(mem):
    q = DriverQueue(mem, 1, 8)
    q.add([b"request"], [16])
    q.add([b"request"], [16])  # head 2: an entry that reads differently once cleared
    with pytest.raises(Timeout, match=r"avail idx 2, in memory 2; 0 of the 8 avail entries"):
        q.wait_used(timeout=0.01)
    mem.write(q.avail_gpa, bytes(6 + 2 * 8))  # the ring's memory cleared under the driver
    with pytest.raises(Timeout, match=r"avail idx 2, in memory 0; 1 of the 8 avail entries"):
        q.wait_used(timeout=0.01)
