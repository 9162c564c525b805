"""A small vhost-user *front-end* in Python: it plays QEMU and the guest's virtio driver.

It drives a vhost-user back-end (the vfsd daemon, or any other) over its unix socket
without QEMU, so protocol tests can exercise the real daemon process:

* `Frontend(socket_path)` connects like QEMU does and sends vhost-user messages
  (`send()` / `recv()` / `request()` for raw access, one method per message for
  convenience), negotiates features (`negotiate()`), shares one memfd as guest
  memory (`set_mem_table()`) and sets up split virtqueues (`setup_queue()`).
  `setup()` does the whole QEMU-like start sequence in one call.
* `GuestMemory` is the memfd, mapped here too, with a small allocator.  Guest
  physical addresses (descriptor addresses) start at `gpa_base`; the "user
  addresses" the front-end tells the back-end for the rings start at `uva_base`.
  The two differ on purpose so a back-end that mixes them up fails.
* `DriverQueue` is the driver side of a split virtqueue: add a chain of readable
  and writable buffers (direct or through an indirect table), kick, wait on the
  call eventfd with a timeout, collect used elements.  Its low-level methods write
  arbitrary (malicious) descriptors, avail entries and indices.

Written from the vhost-user spec (QEMU docs/interop/vhost-user.rst) and the
virtio 1.x split-virtqueue layout; it shares no code with the back-end library in
`protocol/`, so a misreading there is not mirrored here.
"""

from __future__ import annotations

import array
import enum
import mmap
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

# ---------------------------------------------------------------------------
# Protocol constants
# ---------------------------------------------------------------------------


class Req(enum.IntEnum):
    """Front-end -> back-end message types (vhost-user.rst).

    Written out here from the spec, not imported from `protocol.vhost_user`: the
    test front-end is an independent reading of the wire protocol, so a wrong
    number in the library shows up as a failing test instead of agreeing with
    itself.
    """

    NONE = 0
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_SLAVE_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


# Messages that always carry a reply, whatever REPLY_ACK says.
REPLY_REQUESTS = frozenset({
    Req.GET_FEATURES, Req.GET_PROTOCOL_FEATURES, Req.GET_VRING_BASE,
    Req.GET_QUEUE_NUM, Req.GET_CONFIG, Req.GET_MAX_MEM_SLOTS, Req.GET_STATUS,
    Req.IOTLB_MSG, Req.POSTCOPY_END, Req.GET_INFLIGHT_FD,
})


class ProtocolFeature(enum.IntFlag):
    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    SLAVE_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    SLAVE_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16


#: What QEMU 7.2 acks for vhost-user-fs (VHOST_USER_PROTOCOL_FEATURE_MASK, minus
#: CONFIG which it drops for devices without a config notifier).
QEMU_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ | ProtocolFeature.LOG_SHMFD | ProtocolFeature.RARP | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.MTU | ProtocolFeature.SLAVE_REQ | ProtocolFeature.CROSS_ENDIAN
    | ProtocolFeature.CRYPTO_SESSION | ProtocolFeature.PAGEFAULT | ProtocolFeature.SLAVE_SEND_FD
    | ProtocolFeature.HOST_NOTIFIER | ProtocolFeature.INFLIGHT_SHMFD | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.CONFIGURE_MEM_SLOTS | ProtocolFeature.STATUS)

# Virtio / vhost feature bits (u64).
F_NOTIFY_ON_EMPTY = 1 << 24
F_LOG_ALL = 1 << 26
F_RING_INDIRECT_DESC = 1 << 28
F_RING_EVENT_IDX = 1 << 29
F_PROTOCOL_FEATURES = 1 << 30  # VHOST_USER_F_PROTOCOL_FEATURES
F_VERSION_1 = 1 << 32
F_ACCESS_PLATFORM = 1 << 33
F_RING_PACKED = 1 << 34

# Header flags.
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3

VRING_NOFD_MASK = 1 << 8
VRING_IDX_MASK = 0xFF

HEADER = struct.Struct("<III")  # request, flags, size
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")  # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log
MEM_HDR = struct.Struct("<II")  # nregions, padding
MEM_REGION = struct.Struct("<QQQQ")  # guest_addr, size, user_addr, mmap_offset
MEM_REG_MSG = struct.Struct("<QQQQQ")  # padding, then one region (ADD/REM_MEM_REG)
MAX_MEM_REGIONS = 8

# Split ring layout (virtio 1.x, 2.7).
DESC = struct.Struct("<QIHH")  # addr, len, flags, next
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
USED_ELEM = struct.Struct("<II")  # id, len


class VhostUserError(Exception):
    """The back-end broke the vhost-user protocol (or nacked a request)."""


class Timeout(VhostUserError):
    """Nothing arrived within the timeout: the back-end is hung or ignored us."""


class Disconnected(VhostUserError):
    """The back-end closed the connection."""


# ---------------------------------------------------------------------------
# Guest memory
# ---------------------------------------------------------------------------


@dataclass
class Region:
    """One guest memory region: `size` bytes at `gpa` (guest) / `uva` (front-end
    user address), backed by `fd` at `fd_offset`, mapped here at `map[map_off:]`."""

    gpa: int
    size: int
    uva: int
    fd: int
    fd_offset: int
    map: mmap.mmap
    map_off: int

    def table_entry(self) -> tuple[int, int, int, int]:
        """(guest_addr, size, user_addr, mmap_offset) as SET_MEM_TABLE carries it."""
        return (self.gpa, self.size, self.uva, self.fd_offset)


class GuestMemory:
    """Guest RAM: memfd-backed regions, mapped locally, with a first-fit allocator.

    By default one region of `size` bytes at `gpa_base`/`uva_base`.  With
    `regions=N` the one memfd is split into N equal regions separated by holes in
    both address spaces (like QEMU's RAM below and above 4 GiB), each sent with
    its own mmap offset; `add_region()` hot-plugs a region with its own memfd.
    Addresses from `alloc()` are guest physical addresses (GPAs) and never cross
    a region boundary; `uva(gpa)` gives the matching user address for ring setup.
    """

    def __init__(self, size: int = 16 << 20, gpa_base: int = 0x1_0000_0000,
                 uva_base: int = 0x7F00_0000_0000, name: str = "vfsd-test-guest", *,
                 regions: int = 1, gpa_hole: int = 0x4000_0000, uva_hole: int = 0x10_0000_0000):
        part = size // regions
        if size % mmap.PAGESIZE or part % mmap.PAGESIZE:
            raise ValueError("size (and each region) must be page-aligned")
        self.size = size
        self.gpa_base = gpa_base
        self.uva_base = uva_base
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._lock = threading.Lock()
        self.regions: list[Region] = []
        self._free: list[tuple[int, int]] = []  # (gpa, size), sorted
        self._pinned: list[tuple[int, int]] = []  # (gpa, size): rings, never to be reused
        self._extra: list[tuple[int, mmap.mmap]] = []  # hot-plugged fds and maps
        for i in range(regions):
            self._add(Region(gpa_base + i * (part + gpa_hole), part, uva_base + i * (part + uva_hole),
                             self.fd, i * part, self.map, i * part),
                      skip_first_page=i == 0)

    def _add(self, r: Region, skip_first_page: bool = False) -> None:
        self.regions.append(r)
        # Keep the first page of guest RAM unallocated (a back-end reading address
        # 0 of the table by mistake reads zeros), and 16 bytes at each region's end
        # so free blocks of neighbouring regions never coalesce.
        start = r.gpa + (mmap.PAGESIZE if skip_first_page else 0)
        with self._lock:
            self._free.append((start, r.gpa + r.size - 16 - start))
            self._free.sort()

    def add_region(self, size: int, gpa: int | None = None, uva: int | None = None,
                   name: str = "vfsd-test-hotplug") -> Region:
        """A new region with its own memfd (memory hot-plug); not yet sent."""
        last = max(self.regions, key=lambda r: r.gpa)
        gpa = last.gpa + last.size + 0x4000_0000 if gpa is None else gpa
        uva = max(r.uva + r.size for r in self.regions) + 0x10_0000_0000 if uva is None else uva
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._extra.append((fd, m))
        r = Region(gpa, size, uva, fd, 0, m, 0)
        self._add(r)
        return r

    def remove_region(self, r: Region) -> None:
        """Forget a region locally (after REM_MEM_REG): nothing is allocated there again."""
        with self._lock:
            self.regions.remove(r)
            self._free = [(g, n) for g, n in self._free if not r.gpa <= g < r.gpa + r.size]

    # -- address translation ------------------------------------------------
    def find(self, gpa: int, length: int = 0) -> Region:
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.gpa + r.size:
                return r
        raise ValueError(f"GPA {gpa:#x}+{length} outside guest memory")

    def uva(self, gpa: int) -> int:
        r = self.find(gpa)
        return gpa - r.gpa + r.uva

    def _loc(self, gpa: int, length: int) -> tuple[mmap.mmap, int]:
        r = self.find(gpa, length)
        return r.map, r.map_off + gpa - r.gpa

    @property
    def gpa_end(self) -> int:
        """End of the highest region (the first address above all guest RAM)."""
        return max(r.gpa + r.size for r in self.regions)

    def hole_gpa(self) -> int | None:
        """An address in the hole between two regions, if there is one."""
        rs = sorted(self.regions, key=lambda r: r.gpa)
        for a, b in zip(rs, rs[1:]):
            if a.gpa + a.size < b.gpa:
                return a.gpa + a.size + (b.gpa - a.gpa - a.size) // 2
        return None

    # -- access -------------------------------------------------------------
    def read(self, gpa: int, length: int) -> bytes:
        m, off = self._loc(gpa, length)
        return bytes(m[off:off + length])

    def write(self, gpa: int, data: bytes) -> None:
        m, off = self._loc(gpa, len(data))
        m[off:off + len(data)] = data

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        self.write(gpa, bytes([byte]) * length)

    def read_u16(self, gpa: int) -> int:
        m, off = self._loc(gpa, 2)
        return struct.unpack_from("<H", m, off)[0]

    def write_u16(self, gpa: int, value: int) -> None:
        m, off = self._loc(gpa, 2)
        struct.pack_into("<H", m, off, value & 0xFFFF)

    # -- allocation ---------------------------------------------------------
    def alloc(self, length: int, align: int = 16, region: Region | None = None) -> int:
        """Allocate `length` bytes (at least 1), returning a zero-filled GPA range
        (in `region` if given)."""
        length = max(1, length)
        with self._lock:
            for i, (start, size) in enumerate(self._free):
                if region is not None and not region.gpa <= start < region.gpa + region.size:
                    continue
                aligned = (start + align - 1) // align * align
                pad = aligned - start
                if size >= pad + length:
                    pieces = []
                    if pad:
                        pieces.append((start, pad))
                    rest = size - pad - length
                    if rest:
                        pieces.append((aligned + length, rest))
                    self._free[i:i + 1] = pieces
                    break
            else:
                raise MemoryError(f"guest memory exhausted allocating {length} bytes")
            self._check_unpinned(aligned, length, "allocated")
        self.write(aligned, bytes(length))
        return aligned

    def alloc_ring(self, length: int, align: int) -> int:
        """`alloc` for a ring: a range the allocator must never hand out (or take
        back) again, since the zero-fill of a new allocation there would be a
        driver scribbling over its own ring, which the back-end rightly calls
        broken."""
        gpa = self.alloc(length, align)
        with self._lock:
            self._pinned.append((gpa, length))
        return gpa

    def _check_unpinned(self, gpa: int, length: int, what: str) -> None:
        for start, size in self._pinned:
            if gpa < start + size and start < gpa + length:
                raise AssertionError(f"test front-end bug: {what} 0x{gpa:x}+{length} overlaps "
                                     f"a ring at 0x{start:x}+{size}")

    def free(self, gpa: int, length: int) -> None:
        length = max(1, length)
        with self._lock:
            if not any(r.gpa <= gpa < r.gpa + r.size for r in self.regions):
                return
            self._check_unpinned(gpa, length, "freed")
            for start, size in self._free:
                if gpa < start + size and start < gpa + length:
                    raise AssertionError(f"test front-end bug: 0x{gpa:x}+{length} freed twice "
                                         f"(free block 0x{start:x}+{size})")
            self._free.append((gpa, length))
            self._free.sort()
            merged: list[tuple[int, int]] = []
            for start, size in self._free:
                if merged and merged[-1][0] + merged[-1][1] == start:
                    merged[-1] = (merged[-1][0], merged[-1][1] + size)
                else:
                    merged.append((start, size))
            self._free = merged

    def put(self, data: bytes, align: int = 16, region: Region | None = None) -> int:
        gpa = self.alloc(len(data), align, region)
        self.write(gpa, data)
        return gpa

    def close(self) -> None:
        for m in [self.map] + [m for _, m in self._extra]:
            try:
                m.close()
            except BufferError:
                pass
        for fd in [self.fd] + [fd for fd, _ in self._extra]:
            try:
                os.close(fd)
            except OSError:
                pass

    def region(self) -> tuple[int, int, int, int]:
        """The first region as (guest_addr, size, user_addr, mmap_offset)."""
        return self.regions[0].table_entry()

    def table(self) -> tuple[list[tuple[int, int, int, int]], list[int]]:
        """All regions and their fds, for SET_MEM_TABLE."""
        rs = sorted(self.regions, key=lambda r: r.gpa)
        return [r.table_entry() for r in rs], [r.fd for r in rs]


# ---------------------------------------------------------------------------
# Driver-side split virtqueue
# ---------------------------------------------------------------------------


@dataclass
class Buffer:
    gpa: int
    length: int
    writable: bool
    owned: bool = True  # allocated by the queue (freed on completion)


@dataclass
class Chain:
    head: int
    buffers: list[Buffer]
    descs: list[int]  # descriptor-table slots used (direct) or [head] (indirect)
    indirect_gpa: int | None = None
    indirect_len: int = 0


@dataclass
class Used:
    """One used element, with the chain it completes (if it was ours)."""

    id: int
    len: int
    chain: Chain | None = None
    data: list[bytes] = field(default_factory=list)  # contents of writable buffers

    @property
    def written(self) -> bytes:
        """The first `len` bytes written into the chain's writable buffers."""
        out = b"".join(self.data)
        return out[:self.len]


class DriverQueue:
    """The guest driver's view of one split virtqueue.

    The descriptor table, avail and used rings live in guest memory; `kick_fd`
    and `call_fd` are eventfds handed to the back-end with SET_VRING_KICK/CALL.
    """

    def __init__(self, mem: GuestMemory, index: int, size: int = 128):
        if size < 1 or size > 32768 or size & (size - 1):
            raise ValueError("queue size must be a power of two <= 32768")
        self.mem = mem
        self.index = index
        self.size = size
        self.desc_gpa = mem.alloc_ring(16 * size, 16)
        self.avail_gpa = mem.alloc_ring(6 + 2 * size, 2)
        self.used_gpa = mem.alloc_ring(6 + 8 * size, 4)
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.free_descs: list[int] = list(range(size))
        self.avail_idx = 0  # driver's shadow of avail->idx
        self.avail_written = [0] * size  # what this driver stored in each avail ring entry
        self.last_used = 0  # next used index the driver reads
        self.inflight: dict[int, Chain] = {}
        self.lock = threading.RLock()
        self.stash: list[Used] = []  # used elements collected while waiting for another

    # -- raw ring access (also for writing malicious content) -------------------
    def write_desc(self, slot: int, addr: int, length: int, flags: int = 0, next: int = 0) -> None:
        """Write descriptor `slot` (no checks on the values: they may be hostile)."""
        data = DESC.pack(addr & (2**64 - 1), length & 0xFFFFFFFF, flags & 0xFFFF, next & 0xFFFF)
        self.mem.write(self.desc_gpa + 16 * (slot % self.size), data)

    def read_desc(self, slot: int) -> tuple[int, int, int, int]:
        return DESC.unpack(self.mem.read(self.desc_gpa + 16 * slot, 16))

    def put_avail(self, head: int, publish: bool = True) -> None:
        """Append `head` to the avail ring (any value, even out of range)."""
        with self.lock:
            self.mem.write_u16(self.avail_gpa + 4 + 2 * (self.avail_idx % self.size), head)
            self.avail_written[self.avail_idx % self.size] = head & 0xFFFF
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
            if publish:
                self.publish()

    def publish(self) -> None:
        """Store the shadow avail index into avail->idx (after the ring entries)."""
        self.mem.write_u16(self.avail_gpa + 2, self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        """Write avail->idx directly (e.g. jump it forward by more than the size)."""
        with self.lock:
            self.avail_idx = value & 0xFFFF
            self.mem.write_u16(self.avail_gpa + 2, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write_u16(self.avail_gpa, flags)

    def used_idx(self) -> int:
        return self.mem.read_u16(self.used_gpa + 2)

    def used_flags(self) -> int:
        return self.mem.read_u16(self.used_gpa)

    def used_elem(self, i: int) -> tuple[int, int]:
        return USED_ELEM.unpack(self.mem.read(self.used_gpa + 4 + 8 * (i % self.size), 8))

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    # -- chains ------------------------------------------------------------------
    def add(self, readable: Sequence[bytes | Buffer] = (), writable: Sequence[int | Buffer] = (),
            indirect: bool = False, publish: bool = True) -> int:
        """Queue one chain: readable buffers (bytes are copied into fresh guest
        memory), then writable buffers (sizes, zero-filled).  Returns the head id.

        Pre-built `Buffer`s are used as they are (e.g. one pointing outside guest
        memory).  With `indirect`, one descriptor points at an indirect table."""
        bufs: list[Buffer] = []
        for r in readable:
            if isinstance(r, Buffer):
                bufs.append(r)
            else:
                data = bytes(r)
                bufs.append(Buffer(self.mem.put(data), len(data), False))
        for w in writable:
            if isinstance(w, Buffer):
                bufs.append(w)
            else:
                bufs.append(Buffer(self.mem.alloc(w), w, True))
        if not bufs:
            raise ValueError("a chain needs at least one buffer")
        with self.lock:
            if indirect:
                table = b"".join(
                    DESC.pack(b.gpa, b.length,
                              (VRING_DESC_F_WRITE if b.writable else 0)
                              | (VRING_DESC_F_NEXT if i + 1 < len(bufs) else 0),
                              i + 1 if i + 1 < len(bufs) else 0)
                    for i, b in enumerate(bufs))
                table_gpa = self.mem.put(table, 16)
                head = self._take(1)[0]
                self.write_desc(head, table_gpa, len(table), VRING_DESC_F_INDIRECT, 0)
                chain = Chain(head, bufs, [head], table_gpa, len(table))
            else:
                slots = self._take(len(bufs))
                for i, (slot, b) in enumerate(zip(slots, bufs)):
                    last = i + 1 == len(bufs)
                    flags = (VRING_DESC_F_WRITE if b.writable else 0) | (0 if last else VRING_DESC_F_NEXT)
                    self.write_desc(slot, b.gpa, b.length, flags, 0 if last else slots[i + 1])
                head = slots[0]
                chain = Chain(head, bufs, slots)
            self.inflight[head] = chain
            self.put_avail(head, publish)
            return head

    def _take(self, n: int) -> list[int]:
        if len(self.free_descs) < n:
            raise MemoryError(f"queue {self.index}: {n} descriptors wanted, {len(self.free_descs)} free")
        # Freed slots go to the back, so chains soon use scattered, non-consecutive slots.
        slots = self.free_descs[:n]
        del self.free_descs[:n]
        return slots

    def add_raw_chain(self, slots_and_descs: Iterable[tuple[int, int, int, int, int]]) -> int:
        """Write raw descriptors [(slot, addr, len, flags, next), ...] and make the
        first slot available.  No bookkeeping: the chain is not tracked."""
        items = list(slots_and_descs)
        with self.lock:
            for slot, addr, length, flags, nxt in items:
                self.write_desc(slot, addr, length, flags, nxt)
            self.put_avail(items[0][0])
            return items[0][0]

    def reserve_slots(self, n: int) -> list[int]:
        """Take descriptor slots out of the free list for hand-written chains."""
        with self.lock:
            return self._take(n)

    # -- completion --------------------------------------------------------------
    def wait_call(self, timeout: float) -> bool:
        """Wait for the call eventfd; True if it fired (and consume it)."""
        r, _, _ = select.select([self.call_fd], [], [], max(0.0, timeout))
        if not r:
            return False
        try:
            os.eventfd_read(self.call_fd)
        except BlockingIOError:
            pass
        return True

    def poll_used(self) -> list[Used]:
        """Collect every new used element, free their chains, return them."""
        out: list[Used] = []
        with self.lock:
            idx = self.used_idx()
            while self.last_used != idx:
                uid, ulen = self.used_elem(self.last_used)
                self.last_used = (self.last_used + 1) & 0xFFFF
                chain = self.inflight.pop(uid, None)
                used = Used(uid, ulen, chain)
                if chain is not None:
                    used.data = [self.mem.read(b.gpa, b.length) for b in chain.buffers
                                 if b.writable and b.owned]
                    self._release(chain)
                out.append(used)
        return out

    def _release(self, chain: Chain) -> None:
        for b in chain.buffers:
            if b.owned:
                self.mem.free(b.gpa, b.length)
        if chain.indirect_gpa is not None:
            self.mem.free(chain.indirect_gpa, chain.indirect_len)
        self.free_descs.extend(chain.descs)

    def wait_used(self, timeout: float = 5.0, count: int = 1) -> list[Used]:
        """Wait until at least `count` used elements arrived; raise Timeout if not.

        Also checks that the back-end signalled the call eventfd for them (with
        EVENT_IDX not negotiated and NO_INTERRUPT clear, it must)."""
        deadline = time.monotonic() + timeout
        got: list[Used] = self.stash
        self.stash = []
        while True:
            got.extend(self.poll_used())
            if len(got) >= count:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                # The avail ring as this driver wrote it against what guest memory
                # holds now: unless a test held entries back (publish=False) or wrote
                # the ring by hand, a difference means something else wrote over it.
                changed = sum(self.mem.read_u16(self.avail_gpa + 4 + 2 * i) != v
                              for i, v in enumerate(self.avail_written))
                raise Timeout(f"queue {self.index}: {len(got)}/{count} used elements after {timeout}s "
                              f"(used idx {self.used_idx()}, avail idx {self.avail_idx}, "
                              f"in memory {self.mem.read_u16(self.avail_gpa + 2)}; {changed} of "
                              f"the {self.size} avail entries differ from what this driver wrote)")
            # Poll the ring too: a missed notification must not hang the test, it
            # is checked separately by tests that care.
            self.wait_call(min(left, 0.05))

    def submit(self, readable: Sequence[bytes | Buffer] = (), writable: Sequence[int | Buffer] = (),
               indirect: bool = False, timeout: float = 5.0) -> Used:
        """add + kick + wait for this chain's used element."""
        head = self.add(readable, writable, indirect)
        self.kick()
        deadline = time.monotonic() + timeout
        pending: list[Used] = []
        try:
            while True:
                for u in self.wait_used(max(0.0, deadline - time.monotonic())):
                    if u.id == head and u.chain is not None:
                        return u
                    pending.append(u)
        finally:
            self.stash.extend(pending)

    def close(self) -> None:
        for fd in (self.kick_fd, self.call_fd):
            try:
                os.close(fd)
            except OSError:
                pass


# ---------------------------------------------------------------------------
# The front-end
# ---------------------------------------------------------------------------


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    def u64(self) -> int:
        if len(self.payload) != 8:
            raise VhostUserError(f"reply to {self.request}: expected u64 payload, got {len(self.payload)} bytes")
        return U64.unpack(self.payload)[0]


class Frontend:
    """A vhost-user front-end connected to a back-end's unix socket."""

    def __init__(self, socket_path: str | os.PathLike | None = None, *, sock: socket.socket | None = None,
                 timeout: float = 5.0, connect_timeout: float = 10.0, mem_size: int = 16 << 20,
                 gpa_base: int = 0x1_0000_0000, uva_base: int = 0x7F00_0000_0000,
                 mem_regions: int = 1):
        self.timeout = timeout
        if sock is None:
            sock = self._connect(os.fspath(socket_path), connect_timeout)
        self.sock = sock
        self.mem = GuestMemory(mem_size, gpa_base, uva_base, regions=mem_regions)
        self.max_mem_slots: int | None = None
        self.features = 0  # acked virtio features
        self.offered_features: int | None = None
        self.protocol_features = 0  # acked protocol features
        self.offered_protocol_features: int | None = None
        self.queue_num: int | None = None
        self.queues: dict[int, DriverQueue] = {}
        self.ack = True  # use NEED_REPLY on no-reply messages once REPLY_ACK is negotiated
        self.closed = False

    @staticmethod
    def _connect(path: str, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(path)
                return s
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    # -- raw messages ------------------------------------------------------------
    def send_bytes(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send raw bytes (a whole, or deliberately broken, message) with fds."""
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        sent = self.sock.sendmsg([data], anc)
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *,
             need_reply: bool = False, flags: int | None = None, size: int | None = None) -> None:
        """Send one message.  `flags`/`size` override the header fields verbatim."""
        if flags is None:
            flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
        if size is None:
            size = len(payload)
        self.send_bytes(HEADER.pack(request, flags, size) + payload, fds)

    def _recv_exact(self, n: int, deadline: float, fds: list[int]) -> bytes:
        buf = b""
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout(f"no reply from back-end (got {len(buf)}/{n} bytes)")
            self.sock.settimeout(left)
            try:
                data, anc, _flags, _ = self.sock.recvmsg(n - len(buf), socket.CMSG_SPACE(4 * 8))
            except socket.timeout:
                raise Timeout(f"no reply from back-end (got {len(buf)}/{n} bytes)") from None
            except ConnectionResetError:
                raise Disconnected("back-end reset the connection") from None
            for level, typ, cdata in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(cdata[:len(cdata) - len(cdata) % 4])
                    fds.extend(a)
            if not data:
                raise Disconnected("back-end closed the connection")
            buf += data
        return buf

    def recv(self, timeout: float | None = None) -> Message:
        """Read one message (header first, then exactly `size` payload bytes)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        fds: list[int] = []
        hdr = self._recv_exact(HEADER.size, deadline, fds)
        request, flags, size = HEADER.unpack(hdr)
        if size > 4096:
            raise VhostUserError(f"reply to {request} claims a {size}-byte payload")
        payload = self._recv_exact(size, deadline, fds) if size else b""
        return Message(request, flags, payload, fds)

    def expect_reply(self, request: int, timeout: float | None = None) -> Message:
        msg = self.recv(timeout)
        if msg.request != request:
            raise VhostUserError(f"reply for request {msg.request}, expected {request}")
        if msg.flags & VERSION_MASK != VERSION:
            raise VhostUserError(f"reply to {request} has version {msg.flags & VERSION_MASK}")
        if not msg.flags & FLAG_REPLY:
            raise VhostUserError(f"reply to {request} lacks the REPLY flag (flags {msg.flags:#x})")
        return msg

    def no_reply_within(self, seconds: float = 0.3) -> bool:
        """True if nothing arrives on the socket for `seconds` (and it's still open)."""
        r, _, _ = select.select([self.sock], [], [], seconds)
        return not r

    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features & ProtocolFeature.REPLY_ACK)

    def request(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *,
                need_reply: bool | None = None, check: bool = True) -> Message | None:
        """Send a message and read its reply if it has one.

        For messages without a reply of their own, `need_reply` (default: REPLY_ACK
        negotiated and `self.ack`) asks for the REPLY_ACK u64; with `check`, a
        non-zero ack raises VhostUserError."""
        has_reply = request in REPLY_REQUESTS
        if need_reply is None:
            need_reply = self.ack and self.reply_ack and not has_reply
        self.send(request, payload, fds, need_reply=need_reply)
        if has_reply or need_reply:
            msg = self.expect_reply(request)
            if need_reply and not has_reply and check and msg.u64() != 0:
                raise VhostUserError(f"back-end nacked {Req(request).name if request in Req._value2member_map_ else request}: {msg.u64():#x}")
            return msg
        return None

    # -- one method per message -------------------------------------------------
    def get_features(self) -> int:
        f = self.request(Req.GET_FEATURES).u64()
        self.offered_features = f
        return f

    def set_features(self, features: int, **kw) -> None:
        self.request(Req.SET_FEATURES, U64.pack(features), **kw)
        self.features = features

    def get_protocol_features(self) -> int:
        f = self.request(Req.GET_PROTOCOL_FEATURES).u64()
        self.offered_protocol_features = f
        return f

    def set_protocol_features(self, features: int, **kw) -> None:
        # The ack (if any) for this message is governed by the features it sets;
        # do not ask for one here unless told to.
        kw.setdefault("need_reply", False)
        self.request(Req.SET_PROTOCOL_FEATURES, U64.pack(features), **kw)
        self.protocol_features = features

    def get_queue_num(self) -> int:
        self.queue_num = self.request(Req.GET_QUEUE_NUM).u64()
        return self.queue_num

    def set_owner(self, **kw) -> None:
        self.request(Req.SET_OWNER, **kw)

    def reset_owner(self, **kw) -> None:
        self.request(Req.RESET_OWNER, **kw)

    def set_mem_table(self, regions: Sequence[tuple[int, int, int, int]] | None = None,
                      fds: Sequence[int] | None = None, **kw) -> None:
        if regions is None:
            regions, fds = self.mem.table()
        payload = MEM_HDR.pack(len(regions), 0) + b"".join(MEM_REGION.pack(*r) for r in regions)
        self.request(Req.SET_MEM_TABLE, payload, list(fds or ()), **kw)

    def get_max_mem_slots(self) -> int:
        self.max_mem_slots = self.request(Req.GET_MAX_MEM_SLOTS).u64()
        return self.max_mem_slots

    def add_mem_reg(self, region: Region | tuple[int, int, int, int], fd: int | None = None, **kw) -> None:
        entry = region.table_entry() if isinstance(region, Region) else region
        if fd is None and isinstance(region, Region):
            fd = region.fd
        self.request(Req.ADD_MEM_REG, MEM_REG_MSG.pack(0, *entry), [] if fd is None else [fd], **kw)

    def rem_mem_reg(self, region: Region | tuple[int, int, int, int], **kw) -> None:
        entry = region.table_entry() if isinstance(region, Region) else region
        self.request(Req.REM_MEM_REG, MEM_REG_MSG.pack(0, *entry), [], **kw)

    def map_memory(self) -> None:
        """Share guest memory as QEMU 7.2 does: ADD_MEM_REG per region when
        CONFIGURE_MEM_SLOTS is negotiated, else one SET_MEM_TABLE."""
        if self.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS:
            for r in sorted(self.mem.regions, key=lambda r: r.gpa):
                self.add_mem_reg(r)
        else:
            self.set_mem_table()

    def set_vring_num(self, index: int, num: int, **kw) -> None:
        self.request(Req.SET_VRING_NUM, VRING_STATE.pack(index, num), **kw)

    def set_vring_base(self, index: int, base: int, **kw) -> None:
        self.request(Req.SET_VRING_BASE, VRING_STATE.pack(index, base), **kw)

    def get_vring_base(self, index: int) -> tuple[int, int]:
        msg = self.request(Req.GET_VRING_BASE, VRING_STATE.pack(index, 0))
        if len(msg.payload) != VRING_STATE.size:
            raise VhostUserError(f"GET_VRING_BASE reply has {len(msg.payload)} bytes")
        return VRING_STATE.unpack(msg.payload)

    def set_vring_addr(self, index: int, desc_uva: int, used_uva: int, avail_uva: int,
                       flags: int = 0, log: int = 0, **kw) -> None:
        self.request(Req.SET_VRING_ADDR, VRING_ADDR.pack(index, flags, desc_uva, used_uva, avail_uva, log), **kw)

    def set_vring_kick(self, index: int, fd: int | None, **kw) -> None:
        self._set_vring_fd(Req.SET_VRING_KICK, index, fd, **kw)

    def set_vring_call(self, index: int, fd: int | None, **kw) -> None:
        self._set_vring_fd(Req.SET_VRING_CALL, index, fd, **kw)

    def set_vring_err(self, index: int, fd: int | None, **kw) -> None:
        self._set_vring_fd(Req.SET_VRING_ERR, index, fd, **kw)

    def _set_vring_fd(self, req: Req, index: int, fd: int | None, **kw) -> None:
        value = index & VRING_IDX_MASK
        if fd is None:
            value |= VRING_NOFD_MASK
        self.request(req, U64.pack(value), [] if fd is None else [fd], **kw)

    def set_vring_enable(self, index: int, enable: bool = True, **kw) -> None:
        self.request(Req.SET_VRING_ENABLE, VRING_STATE.pack(index, int(enable)), **kw)

    # -- sequences -------------------------------------------------------------
    def negotiate(self, want_features: int = F_VERSION_1 | F_PROTOCOL_FEATURES | F_RING_INDIRECT_DESC,
                  want_protocol: int = QEMU_PROTOCOL_FEATURES) -> None:
        """What QEMU does at vhost_dev_init + vhost_dev_start (features part):
        GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS,
        SET_OWNER, SET_FEATURES (the wanted bits the back-end offered)."""
        offered = self.get_features()
        if offered & F_PROTOCOL_FEATURES:
            pf = self.get_protocol_features()
            self.set_protocol_features(pf & want_protocol)
            if self.protocol_features & ProtocolFeature.MQ:
                self.get_queue_num()
            if self.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS:
                self.get_max_mem_slots()
        self.set_owner()
        self.set_features(offered & want_features)

    def setup_queue(self, index: int, size: int = 128, enable: bool = True) -> DriverQueue:
        q = DriverQueue(self.mem, index, size)
        self.set_vring_num(index, size)
        self.set_vring_base(index, 0)
        self.set_vring_addr(index, self.mem.uva(q.desc_gpa), self.mem.uva(q.used_gpa),
                            self.mem.uva(q.avail_gpa))
        self.set_vring_kick(index, q.kick_fd)
        self.set_vring_call(index, q.call_fd)
        old = self.queues.pop(index, None)
        if old is not None:
            old.close()
        self.queues[index] = q
        if enable and self.features & F_PROTOCOL_FEATURES:
            self.set_vring_enable(index, True)
        return q

    def setup(self, num_queues: int = 2, queue_size: int = 128, **negotiate_kw) -> list[DriverQueue]:
        """Negotiate, share memory, and start `num_queues` queues (0 = hiprio)."""
        self.negotiate(**negotiate_kw)
        self.map_memory()
        qs = [self.setup_queue(i, queue_size, enable=False) for i in range(num_queues)]
        if self.features & F_PROTOCOL_FEATURES:
            for i in range(num_queues):
                self.set_vring_enable(i, True)
        return qs

    def sync(self) -> None:
        """Round-trip a message so everything sent before has been processed."""
        self.get_features()

    def is_open(self, wait: float = 0.0) -> bool:
        """False if the back-end has closed the socket."""
        r, _, _ = select.select([self.sock], [], [], wait)
        if not r:
            return True
        try:
            data = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return bool(data)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass
        for q in self.queues.values():
            q.close()
        self.mem.close()

    def __enter__(self) -> "Frontend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
