"""GuestMemory: bounds, translation, real memfd mappings, immutability."""

from __future__ import annotations

import mmap
import os

import pytest

from protocol.memory import GuestMemory, GuestMemoryError, MemoryRegion
from tests.fds import is_open

A = 0x1000_0000
UVA = 0x7F00_0000_0000


@pytest.fixture
def two_regions():
    """Two adjacent regions plus one after a gap."""
    a, b, c = bytearray(0x1000), bytearray(0x1000), bytearray(0x1000)
    mem = GuestMemory.from_buffers([(A, a, UVA), (A + 0x1000, b, UVA + 0x10000),
                                    (A + 0x4000, c, UVA + 0x20000)])
    return mem, a, b, c


def test_views_inside_one_region(two_regions):
    mem, a, _, _ = two_regions
    a[0x10:0x14] = b"abcd"
    (v,) = mem.views(A + 0x10, 4)
    assert bytes(v) == b"abcd"
    v[:] = b"WXYZ"  # a view, not a copy
    assert a[0x10:0x14] == b"WXYZ"


def test_views_span_adjacent_regions(two_regions):
    mem, a, b, _ = two_regions
    a[-2:] = b"ab"
    b[:3] = b"cde"
    views = mem.views(A + 0xFFE, 5)
    assert [bytes(v) for v in views] == [b"ab", b"cde"]


def test_whole_region_and_exact_end(two_regions):
    mem, *_ = two_regions
    assert sum(len(v) for v in mem.views(A, 0x2000)) == 0x2000
    assert len(mem.views(A + 0x1FFF, 1)[0]) == 1


@pytest.mark.parametrize("gpa,length", [
    (A - 1, 1),            # below
    (A - 1, 2),            # starts below, ends inside
    (A + 0x2000, 1),       # in the gap
    (A + 0x1F00, 0x200),   # runs from region 2 into the gap
    (A + 0x5000, 1),       # past the last region
    (A + 0x4FFF, 2),       # straddles the end
    (A, 0x10000),          # far too long
    ((1 << 64) - 1, 2),    # wraps
    (-1, 1),
    (A, -1),
])
def test_views_outside_guest_memory(two_regions, gpa, length):
    mem, *_ = two_regions
    with pytest.raises(GuestMemoryError):
        mem.views(gpa, length)


def test_zero_length_touches_nothing(two_regions):
    mem, *_ = two_regions
    assert mem.views(0xDEAD_0000, 0) == []


def test_contiguous_view(two_regions):
    mem, a, _, _ = two_regions
    assert len(mem.view(A + 0x800, 0x800)) == 0x800
    with pytest.raises(GuestMemoryError, match="crosses the end"):
        mem.view(A + 0x800, 0x801)  # would need two regions
    with pytest.raises(GuestMemoryError):
        mem.view(A + 0x3000, 1)
    with pytest.raises(GuestMemoryError):
        mem.view(A, 0)


def test_readonly_views(two_regions):
    mem, a, b, _ = two_regions
    a[-2:] = b"ab"
    b[:3] = b"cde"
    for gpa, length in ((A + 0x10, 4), (A + 0xFFE, 5)):  # one region; two regions
        views = mem.views(gpa, length, readonly=True)
        assert all(v.readonly for v in views)
        assert not any(v.readonly for v in mem.views(gpa, length))
        with pytest.raises(TypeError):
            views[0][:1] = b"x"
    assert b"".join(mem.views(A + 0xFFE, 5, readonly=True)) == b"abcde"


def test_main_span_is_the_largest_region():
    small, large = bytearray(0x1000), bytearray(0x3000)
    mem = GuestMemory.from_buffers([(A, small), (A + 0x10000, large)])
    lo, hi, view, ro = mem.main_span
    assert (lo, hi) == (A + 0x10000, A + 0x13000)
    assert len(view) == len(ro) == 0x3000 and ro.readonly and not view.readonly
    view[:2] = b"hi"
    assert large[:2] == b"hi" and bytes(ro[:2]) == b"hi"
    lo, hi, *_ = GuestMemory.empty().main_span
    assert not lo <= 0 < hi  # no address is in the span of empty memory


def test_uva_to_gpa(two_regions):
    mem, *_ = two_regions
    assert mem.uva_to_gpa(UVA + 0x10, 16) == A + 0x10
    assert mem.uva_to_gpa(UVA + 0x10000, 0x1000) == A + 0x1000
    assert mem.uva_to_gpa(UVA + 0x20FF0, 16) == A + 0x4FF0
    with pytest.raises(GuestMemoryError):
        mem.uva_to_gpa(UVA + 0xFF0, 32)  # the uva range is not contiguous
    with pytest.raises(GuestMemoryError):
        mem.uva_to_gpa(A, 1)  # a GPA is not a UVA


def test_overlapping_regions_rejected():
    with pytest.raises(GuestMemoryError, match="overlap"):
        GuestMemory.from_buffers([(A, bytearray(0x2000)), (A + 0x1000, bytearray(0x1000))])


def test_zero_sized_region_rejected():
    with pytest.raises(GuestMemoryError, match="size 0"):
        GuestMemory.from_buffers([(A, bytearray(0))])


def test_readonly_buffer_rejected():
    with pytest.raises(GuestMemoryError):
        GuestMemory.from_buffers([(A, b"\0" * 16)])


def _memfd(size: int, fill: bytes = b"") -> int:
    fd = os.memfd_create("vfsd-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if fill:
        os.pwrite(fd, fill, 0)
    return fd


def test_map_memfd_with_unaligned_offset_and_fd_closed():
    page = mmap.PAGESIZE
    pattern = bytes(range(256)) * (3 * page // 256)
    fd = _memfd(3 * page, pattern)
    region = MemoryRegion(A, page, UVA, page + 0x123)  # offset not page-aligned
    mem = GuestMemory.map_regions([(region, fd)])
    assert not is_open(fd), "the region fd must be closed once mapped"
    (v,) = mem.views(A, 16)
    assert bytes(v) == pattern[page + 0x123:page + 0x123 + 16]
    assert mem.regions == (region,)


def test_map_shared_is_visible_to_other_mappings():
    size = mmap.PAGESIZE
    fd = _memfd(size)
    dup = os.dup(fd)
    other = mmap.mmap(dup, size)
    mem = GuestMemory.map_regions([(MemoryRegion(A, size, UVA, 0), fd)])
    mem.views(A + 5, 3)[0][:] = b"xyz"
    assert other[5:8] == b"xyz"
    other[100:102] = b"hi"
    assert bytes(mem.views(A + 100, 2)[0]) == b"hi"
    other.close()
    os.close(dup)


def test_map_failure_closes_fd():
    fd = os.open("/dev/null", os.O_RDONLY)
    with pytest.raises(GuestMemoryError, match="cannot map"):
        GuestMemory.map_regions([(MemoryRegion(A, 4096, UVA, 0), fd)])
    assert not is_open(fd)


def test_with_and_without_region_share_mappings():
    page = mmap.PAGESIZE
    fd1, fd2 = _memfd(page), _memfd(page)
    r1 = MemoryRegion(A, page, UVA, 0)
    r2 = MemoryRegion(A + page, page, UVA + page, 0)
    m1 = GuestMemory.map_regions([(r1, fd1)])
    m2 = m1.with_region(r2, fd2)
    assert not is_open(fd2)
    assert len(m1) == 1 and len(m2) == 2  # immutable: m1 unchanged
    m2.views(A, 1)[0][0] = 0x42
    assert m1.views(A, 1)[0][0] == 0x42  # the same mapping, not a remap
    assert [len(v) for v in m2.views(A + page - 1, 2)] == [1, 1]
    m3 = m2.without_region(MemoryRegion(A + page, page, UVA + page, 12345))  # offset ignored
    assert m3.regions == (r1,)
    with pytest.raises(GuestMemoryError, match="no such memory region"):
        m3.without_region(r2)
    with pytest.raises(GuestMemoryError, match="overlap"):
        m3.with_region(MemoryRegion(A + 16, page, UVA + 0x100000, 0), _memfd(page))


def test_views_outlive_dropped_memory():
    """Dropping a GuestMemory never invalidates views a device still holds."""
    page = mmap.PAGESIZE
    mem = GuestMemory.map_regions([(MemoryRegion(A, page, UVA, 0), _memfd(page))])
    (v,) = mem.views(A, 4)
    del mem
    v[:] = b"live"
    assert bytes(v) == b"live"
