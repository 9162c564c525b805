"""Guest memory shared by a vhost-user front-end: address translation and views.

The front-end (QEMU) describes guest RAM as regions, each with a guest physical
address (GPA), a size, the front-end's own virtual address for it (UVA) and an
offset into a file descriptor that backs it (vhost-user.rst, "Memory access",
"Memory regions description").  Descriptor addresses in the rings are GPAs;
the ring addresses in SET_VRING_ADDR are UVAs.

Each region is mapped once (MAP_SHARED, read/write) and every buffer handed to
a device is a `memoryview` slice of that mapping: no copies.  A `GuestMemory`
is immutable; SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG build a new one (an
added or removed region leaves the other mappings shared, not remapped).

Mappings are never closed explicitly: a live memoryview keeps an mmap from
closing (BufferError), so the mapping goes away when the last view of it is
dropped.  (CPython 3.11's mmap keeps a private dup of the fd for its lifetime;
the fd we were given is closed right after mapping.)

Every GPA range is checked explicitly: Python slicing silently clamps, so a
forgotten check would turn a hostile address into a short buffer instead of an
error.
"""

from __future__ import annotations

import bisect
import mmap
import os
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple, Sequence

__all__ = ["GuestMemory", "GuestMemoryError", "MemoryRegion"]

_U64_LIMIT = 1 << 64


class GuestMemoryError(Exception):
    """An address range is not (entirely) backed by guest memory, or a region is bad."""


class MemoryRegion(NamedTuple):
    """One region as the front-end describes it (VhostUserMemoryRegion)."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    def describe(self) -> str:
        return (f"gpa 0x{self.guest_phys_addr:x}..0x{self.guest_phys_addr + self.memory_size:x} "
                f"({self.memory_size} bytes) uva 0x{self.userspace_addr:x} "
                f"offset 0x{self.mmap_offset:x}")


@dataclass(frozen=True)
class _Mapped:
    """A region plus the view of exactly its bytes (the mmap stays alive through it)."""

    region: MemoryRegion
    buf: memoryview

    @property
    def gpa(self) -> int:
        return self.region.guest_phys_addr

    @property
    def size(self) -> int:
        return self.region.memory_size

    @property
    def uva(self) -> int:
        return self.region.userspace_addr


def _check_region(r: MemoryRegion) -> None:
    if r.memory_size <= 0:
        raise GuestMemoryError(f"memory region with size 0: {r.describe()}")
    for name, base in (("guest", r.guest_phys_addr), ("user", r.userspace_addr)):
        if base < 0 or base + r.memory_size > _U64_LIMIT:
            raise GuestMemoryError(f"memory region {name} address range wraps: {r.describe()}")
    if r.mmap_offset < 0 or r.mmap_offset + r.memory_size > _U64_LIMIT:
        raise GuestMemoryError(f"memory region mmap offset out of range: {r.describe()}")


def _map_fd(region: MemoryRegion, fd: int) -> _Mapped:
    """mmap `region` from `fd` (which the caller still owns)."""
    _check_region(region)
    # mmap(2) needs a page-aligned offset; map from the page below and slice.
    gran = mmap.ALLOCATIONGRANULARITY
    start = region.mmap_offset - region.mmap_offset % gran
    delta = region.mmap_offset - start
    try:
        m = mmap.mmap(fd, region.memory_size + delta, flags=mmap.MAP_SHARED,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
    except (OSError, ValueError, OverflowError) as e:
        raise GuestMemoryError(f"cannot map memory region {region.describe()}: {e}") from None
    view = memoryview(m)
    return _Mapped(region, view[delta:delta + region.memory_size])


class GuestMemory:
    """An immutable set of non-overlapping guest memory regions."""

    __slots__ = ("_maps", "_starts", "_spans", "main_span")

    def __init__(self, mapped: Iterable[_Mapped] = ()):
        maps = sorted(mapped, key=lambda m: m.gpa)
        for a, b in zip(maps, maps[1:]):
            if a.gpa + a.size > b.gpa:
                raise GuestMemoryError(f"memory regions overlap: {a.region.describe()} and "
                                       f"{b.region.describe()}")
        self._maps: tuple[_Mapped, ...] = tuple(maps)
        self._starts = [m.gpa for m in maps]
        # (first gpa, end gpa, writable view, read-only view) per region, for the
        # per-descriptor fast path.  The read-only view is made once here, so
        # device-readable buffers are slices of it (a slice of a read-only view
        # is read-only) instead of a toreadonly() per buffer.
        self._spans = tuple((m.gpa, m.gpa + m.size, m.buf, m.buf.toreadonly()) for m in maps)
        #: The largest region's span, or an empty one (a range no buffer is inside)
        #: without memory.  The virtqueue inlines the "buffer inside this region"
        #: case, which is every buffer when the guest has one region (QEMU sends
        #: one for a memfd-backed guest) and nearly every one otherwise.
        self.main_span: tuple[int, int, memoryview | None, memoryview | None] = max(
            self._spans, key=lambda s: s[1] - s[0], default=(1, 0, None, None))

    # -- construction -------------------------------------------------------
    @classmethod
    def empty(cls) -> "GuestMemory":
        return cls()

    @classmethod
    def map_regions(cls, regions: Sequence[tuple[MemoryRegion, int]]) -> "GuestMemory":
        """Map each (region, fd); every fd is closed, whether mapping succeeds or not."""
        try:
            return cls(_map_fd(r, fd) for r, fd in regions)
        finally:
            for _, fd in regions:
                _close(fd)

    @classmethod
    def from_buffers(cls, regions: Iterable[tuple[Any, ...]]) -> "GuestMemory":
        """Guest memory over writable Python buffers (bytearray, mmap) for tests.

        Each item is `(gpa, buffer)` or `(gpa, buffer, uva)`; the region size is
        the buffer's length and the UVA defaults to the GPA.
        """
        out = []
        for item in regions:
            gpa, buf = item[0], item[1]
            view = memoryview(buf).cast("B")
            if view.readonly:
                raise GuestMemoryError("guest memory buffers must be writable")
            uva = item[2] if len(item) > 2 else gpa
            region = MemoryRegion(gpa, len(view), uva, 0)
            _check_region(region)
            out.append(_Mapped(region, view))
        return cls(out)

    def with_region(self, region: MemoryRegion, fd: int) -> "GuestMemory":
        """A copy plus one newly mapped region (ADD_MEM_REG); `fd` is always closed."""
        try:
            new = _map_fd(region, fd)
        finally:
            _close(fd)
        return GuestMemory(self._maps + (new,))

    def without_region(self, region: MemoryRegion) -> "GuestMemory":
        """A copy without the region matching GPA, UVA and size (REM_MEM_REG).

        vhost-user.rst, REM_MEM_REG: "identified by its guest address, user
        address and size. The mmap offset is ignored."
        """
        keep = [m for m in self._maps
                if not (m.gpa == region.guest_phys_addr and m.size == region.memory_size
                        and m.uva == region.userspace_addr)]
        if len(keep) == len(self._maps):
            raise GuestMemoryError(f"no such memory region to remove: {region.describe()}")
        return GuestMemory(keep)

    # -- inspection ---------------------------------------------------------
    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        return tuple(m.region for m in self._maps)

    def __len__(self) -> int:
        return len(self._maps)

    def __repr__(self) -> str:
        return f"<GuestMemory {len(self._maps)} regions: " + "; ".join(
            m.region.describe() for m in self._maps) + ">"

    # -- translation --------------------------------------------------------
    def _find(self, gpa: int) -> int:
        """Index of the region containing `gpa`, or -1."""
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and gpa < self._maps[i].gpa + self._maps[i].size:
            return i
        return -1

    def views(self, gpa: int, length: int, readonly: bool = False) -> list[memoryview]:
        """Writable (or, with `readonly`, read-only) views of [gpa, gpa+length),
        split where regions meet.

        Raises GuestMemoryError unless every byte is guest memory.  A zero
        length gives no views (and touches nothing).
        """
        # Fast path: the buffer lies inside one region (a guest has one or two).
        if length > 0 and gpa >= 0:
            for start, stop, buf, robuf in self._spans:
                if start <= gpa and gpa + length <= stop:
                    off = gpa - start
                    return [(robuf if readonly else buf)[off:off + length]]
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"bad guest memory range: gpa 0x{gpa:x} len {length}")
        if length == 0:
            return []
        end = gpa + length
        if end > _U64_LIMIT:
            raise GuestMemoryError(f"guest memory range wraps: gpa 0x{gpa:x} len {length}")
        i = self._find(gpa)
        out: list[memoryview] = []
        cur = gpa
        while True:
            if i < 0 or i >= len(self._maps) or not (
                    self._maps[i].gpa <= cur < self._maps[i].gpa + self._maps[i].size):
                raise GuestMemoryError(
                    f"outside guest memory: gpa 0x{gpa:x} len {length} "
                    f"(0x{cur:x} is not in any region)")
            m = self._maps[i]
            off = cur - m.gpa
            take = min(end - cur, m.size - off)
            out.append((self._spans[i][3] if readonly else m.buf)[off:off + take])
            cur += take
            if cur >= end:
                return out
            i += 1

    def view(self, gpa: int, length: int) -> memoryview:
        """One contiguous writable view of [gpa, gpa+length) inside a single region.

        For ring structures and indirect tables, which the device reads as one
        array (QEMU and libvhost-user likewise require them to map contiguously).
        """
        if length <= 0 or gpa < 0 or gpa + length > _U64_LIMIT:
            raise GuestMemoryError(f"bad guest memory range: gpa 0x{gpa:x} len {length}")
        i = self._find(gpa)
        if i < 0:
            raise GuestMemoryError(f"outside guest memory: gpa 0x{gpa:x} len {length}")
        m = self._maps[i]
        off = gpa - m.gpa
        if off + length > m.size:
            raise GuestMemoryError(
                f"range crosses the end of its memory region: gpa 0x{gpa:x} len {length} "
                f"(region ends at 0x{m.gpa + m.size:x})")
        return m.buf[off:off + length]

    def uva_to_gpa(self, uva: int, length: int = 1) -> int:
        """Translate a front-end virtual address range (wholly in one region) to a GPA.

        vhost-user.rst, "Memory access": "User addresses map to the vhost memory
        region containing that user address."
        """
        if length < 0 or uva < 0 or uva + length > _U64_LIMIT:
            raise GuestMemoryError(f"bad user address range: uva 0x{uva:x} len {length}")
        for m in self._maps:
            if m.uva <= uva and uva + length <= m.uva + m.size:
                return m.gpa + (uva - m.uva)
        raise GuestMemoryError(f"user address range uva 0x{uva:x} len {length} is not inside "
                               f"any memory region")


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
