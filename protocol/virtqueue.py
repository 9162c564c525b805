"""The device side of a virtio split virtqueue (virtio 1.1+, 2.7 "Split Virtqueues").

Layout in guest memory (all fields little-endian, VIRTIO_F_VERSION_1):

    descriptor table  16 * size, align 16   struct virtq_desc {le64 addr; le32 len;
                                                               le16 flags; le16 next}
    available ring    4 + 2 * size, align 2  {le16 flags; le16 idx; le16 ring[size]}
    used ring         4 + 8 * size, align 4  {le16 flags; le16 idx;
                                              {le32 id; le32 len} ring[size]}

(The trailing used_event / avail_event words exist only with
VIRTIO_F_EVENT_IDX, which this library never offers.)

Everything read from the rings is driver-controlled and checked before use;
a violation raises `VirtqueueError` and the caller treats the queue as broken.

Memory ordering.  Python has no memory fence.  The two orderings the device
needs are: read avail->idx *before* the ring entries and descriptors it
covers (2.7.13 "Supplying Buffers": the driver's barrier pairs with ours), and
write a used element *before* used->idx (2.7.8 device requirement: "The
device MUST set len prior to updating the used idx").  x86 (TSO) never
reorders loads with older loads or stores with older stores, so there they
hold by construction; elsewhere `libatomic`'s `atomic_thread_fence` is called
through ctypes when available.  The store-then-load ordering that
notification suppression would need is deliberately not relied on: see
`Virtqueue.needs_notify`.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import sys
from dataclasses import dataclass

from .memory import GuestMemory, GuestMemoryError
from .wire import WireStruct

log = logging.getLogger(__name__)

__all__ = ["DescriptorChain", "Virtqueue", "VirtqueueError", "VIRTQ_DESC", "VIRTQ_USED_ELEM",
           "VIRTQ_DESC_F_NEXT", "VIRTQ_DESC_F_WRITE", "VIRTQ_DESC_F_INDIRECT",
           "MAX_QUEUE_SIZE", "MAX_INDIRECT_DESCRIPTORS"]

# 2.7.5 "The Virtqueue Descriptor Table"
VIRTQ_DESC = WireStruct("virtq_desc", [("addr", "Q"), ("len", "I"), ("flags", "H"), ("next", "H")])
# 2.7.8 "The Virtqueue Used Ring"
VIRTQ_USED_ELEM = WireStruct("virtq_used_elem", [("id", "I"), ("len", "I")])

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1

#: 2.7: "Queue Size value is always a power of 2. The maximum Queue Size value is 32768."
MAX_QUEUE_SIZE = 32768
#: Entries allowed in one indirect table.  The spec says a chain must not be
#: longer than the queue size (2.7.5.3.1), but Linux's virtio_ring sizes
#: indirect tables by the request's scatter list, which can exceed a small ring;
#: QEMU and libvhost-user accept up to VIRTQUEUE_MAX_SIZE (1024) entries, and
#: so do we (or the queue size, if larger).  More is refused as hostile.
MAX_INDIRECT_DESCRIPTORS = 1024
#: 2.7.5.2: "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in total"
MAX_CHAIN_BYTES = 1 << 32

_AVAIL_HDR = 4   # flags, idx
_USED_HDR = 4    # flags, idx
_unpack_desc = VIRTQ_DESC._struct.unpack_from  # (table, offset) -> (addr, len, flags, next)


def _make_fence():
    """A full memory fence where the host needs one for the orderings above."""
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86"):
        return None  # TSO: load->load and store->store orders already hold
    try:
        lib = ctypes.CDLL("libatomic.so.1")
        fn = lib.atomic_thread_fence
        fn.argtypes = [ctypes.c_int]
        fn.restype = None
    except (OSError, AttributeError):
        log.warning("no libatomic atomic_thread_fence on this %s host: virtqueue "
                    "updates are not fenced", platform.machine())
        return None
    seq_cst = 5  # __ATOMIC_SEQ_CST
    return lambda: fn(seq_cst)


_fence = _make_fence()


class VirtqueueError(Exception):
    """The driver broke the virtqueue rules; the queue cannot be used any more."""


def _where(head: int, in_table: bool) -> str:
    """Where a descriptor is, for error messages: "" for the ring's own table."""
    return f" in the indirect table of head {head}" if in_table else ""


@dataclass(slots=True, eq=False)
class DescriptorChain:
    """One request: a descriptor chain popped from the available ring.

    `readable` are the device-readable buffers in order (read-only views),
    `writable` the device-writable ones in order (writable views).  Views are
    slices of guest memory, valid until the chain is completed.  (The lists
    have no default: one is built per request, and a default factory makes
    every construction dearer.)
    """

    head: int
    readable: list[memoryview]
    writable: list[memoryview]
    readable_len: int = 0
    writable_len: int = 0


class Virtqueue:
    """A split virtqueue over `GuestMemory`, used from one thread at a time.

    `pop()` is the device's consumer side; `push()` its producer side.  The
    caller serialises `push()` (a lock per ring) and owns notification.
    """

    __slots__ = ("mem", "size", "desc_gpa", "avail_gpa", "used_gpa", "_mask", "_desc",
                 "_avail16", "_used16", "_used_ring", "_last_avail", "_shadow_avail",
                 "_used_idx", "_indirect_max", "_indirect_bytes", "_main_span")

    def __init__(self, mem: GuestMemory, size: int, desc_gpa: int, avail_gpa: int,
                 used_gpa: int, last_avail_idx: int = 0):
        if sys.byteorder != "little":  # ring fields are read through native casts
            raise VirtqueueError("this virtqueue implementation needs a little-endian host")
        if not isinstance(size, int) or size <= 0 or size > MAX_QUEUE_SIZE or size & (size - 1):
            raise VirtqueueError(f"invalid queue size {size}: must be a power of two "
                                 f"between 1 and {MAX_QUEUE_SIZE} (virtio 2.7)")
        # 2.7 "Virtqueues" driver requirement: each part aligned as in the table.
        for name, gpa, align in (("descriptor table", desc_gpa, 16),
                                 ("available ring", avail_gpa, 2), ("used ring", used_gpa, 4)):
            if gpa % align:
                raise VirtqueueError(f"{name} at gpa 0x{gpa:x} is not {align}-byte aligned")
        self.mem = mem
        self.size = size
        self.desc_gpa, self.avail_gpa, self.used_gpa = desc_gpa, avail_gpa, used_gpa
        self._mask = size - 1
        try:
            self._desc = mem.view(desc_gpa, VIRTQ_DESC.size * size)
            # Native 16/32-bit casts give single aligned loads/stores of idx
            # fields that the other side updates concurrently.
            self._avail16 = mem.view(avail_gpa, _AVAIL_HDR + 2 * size).cast("H")
            used = mem.view(used_gpa, _USED_HDR + VIRTQ_USED_ELEM.size * size)
        except GuestMemoryError as e:
            raise VirtqueueError(f"ring is not in guest memory: {e}") from None
        self._used16 = used[:_USED_HDR].cast("H")
        self._used_ring = used[_USED_HDR:].cast("I")
        self._last_avail = last_avail_idx & 0xFFFF
        self._shadow_avail = self._last_avail
        # The used index is the device's own counter, but it starts from what
        # the guest's used ring holds (the ring may be re-started mid-life).
        self._used_idx = self._used16[1]
        self._indirect_max = max(MAX_INDIRECT_DESCRIPTORS, size)
        self._indirect_bytes = VIRTQ_DESC.size * self._indirect_max
        self._main_span = mem.main_span  # (first gpa, end gpa, view, read-only view)

    # -- state ----------------------------------------------------------------
    @property
    def last_avail_idx(self) -> int:
        """Next available-ring index the device will consume (GET_VRING_BASE)."""
        return self._last_avail

    @property
    def used_idx(self) -> int:
        return self._used_idx

    def avail_idx(self) -> int:
        """The driver's current avail->idx (as published in guest memory)."""
        return self._avail16[1]

    # -- consuming --------------------------------------------------------------
    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None if the driver has offered nothing new.

        This runs once per request, so the chain walk is inlined here and the
        common cases (direct descriptors, or one indirect table, with buffers
        inside the main memory region) cost no further call; the rest (other
        regions, errors) is left to helpers.  Every rule is still checked.
        """
        last = self._last_avail
        if last == self._shadow_avail:
            idx = self._avail16[1]
            if _fence is not None:
                _fence()  # read the entries only after the idx that covers them
            # 2.7.6: avail idx only moves forward, by at most the ring size
            # (the driver cannot have more chains out than descriptors).
            pending = (idx - last) & 0xFFFF
            if pending > self.size:
                raise self._jump_error(last, idx, pending)
            self._shadow_avail = idx
            if pending == 0:
                return None
        head = self._avail16[2 + (last & self._mask)]
        table_len = self.size
        if head >= table_len:
            raise VirtqueueError(f"available ring entry {last} names descriptor "
                                 f"{head}, beyond the queue size {table_len}")

        # Walk the chain (2.7.5 "The Virtqueue Descriptor Table").
        lo, hi, rw, ro = self._main_span  # buffers inside [lo, hi) are sliced inline
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        rlen = wlen = 0
        table = self._desc
        first = i = head        # first descriptor of the table being walked, current one
        in_table = False        # walking an indirect table (not the ring's own)
        n = 0                   # descriptors walked in the current table
        seen_writable = False
        unpack = _unpack_desc
        while True:
            addr, length, flags, nxt = unpack(table, i << 4)
            n += 1
            if flags & VIRTQ_DESC_F_INDIRECT:
                # Linux's virtio_ring puts every request of more than one
                # buffer in an indirect table (INDIRECT_DESC is offered), so
                # this is the usual case.  Inline: a table that breaks no rule
                # (a non-zero multiple of 16-byte entries, not too many, not
                # nested, no NEXT) inside the main region; anything else goes
                # to the helper, which checks each rule in turn.
                if (in_table or flags & VIRTQ_DESC_F_NEXT or not length or length & 15
                        or length > self._indirect_bytes
                        or not (lo <= addr and addr + length <= hi)):
                    table = self._indirect_table(i, addr, length, flags, head, in_table)
                else:
                    table = ro[addr - lo:addr - lo + length]
                # 2.7.5.3.2: the device ignores WRITE on the descriptor that
                # refers to a table; the table's first entry is index 0.
                table_len = length >> 4  # entries of 16 bytes
                in_table = True
                first = i = n = 0
                continue
            if flags & VIRTQ_DESC_F_WRITE:
                seen_writable = True
                if length:  # a zero-length buffer is legal and contributes no bytes
                    if lo <= addr and addr + length <= hi:
                        off = addr - lo
                        writable.append(rw[off:off + length])
                    else:
                        writable += self._views(addr, length, False, i, head, in_table)
                    wlen += length
                    if rlen + wlen > MAX_CHAIN_BYTES:
                        raise self._too_long(table, first, n, head, in_table)
            else:
                # 2.7.4.2: "The driver MUST place any device-writable descriptor
                # elements after any device-readable descriptor elements."
                if seen_writable:
                    raise self._chain_error(
                        table, first, n, head, in_table,
                        f"descriptor {i}{_where(head, in_table)} (chain head {head}) is "
                        f"device-readable but follows a device-writable one")
                if length:
                    # Slices of the read-only base view are read-only: the
                    # device must not write into driver-readable buffers.
                    if lo <= addr and addr + length <= hi:
                        off = addr - lo
                        readable.append(ro[off:off + length])
                    else:
                        readable += self._views(addr, length, True, i, head, in_table)
                    rlen += length
                    if rlen > MAX_CHAIN_BYTES:  # (no writable bytes yet: see above)
                        raise self._too_long(table, first, n, head, in_table)
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if nxt >= table_len:
                raise VirtqueueError(f"descriptor {i}{_where(head, in_table)} (chain head "
                                     f"{head}) links to descriptor {nxt}, beyond the table "
                                     f"size {table_len}")
            # 2.7.5.2: a chain must be shorter than 2^32 bytes, "this implies that
            # loops in the descriptor chain are forbidden"; and 2.7.5.3.1: no chain
            # longer than the queue size.  A chain within one table can only have
            # table_len distinct descriptors, so one more step means a loop.  (A
            # counter instead of a set of visited descriptors: this runs for
            # every descriptor; the loop is located when reporting it.)
            if n >= table_len:
                raise self._chain_error(
                    table, first, n + 1, head, in_table,
                    f"descriptor chain at head {head}{_where(head, in_table)} is longer "
                    f"than its table of {table_len} descriptors")
            i = nxt
        self._last_avail = (last + 1) & 0xFFFF
        return DescriptorChain(head, readable, writable, rlen, wlen)

    def _jump_error(self, last: int, idx: int, pending: int) -> VirtqueueError:
        """The error for an avail idx that moved by more than the ring size.

        The rings are read once more for the operator.  An avail idx that reads
        differently now says the driver was still writing there (memory it
        reused, or a torn store).  Most of the used elements this device stored
        last reading as zeros (a stored one is all zeros only for descriptor 0
        completed with nothing written) say the memory under the rings was
        cleared: a driver that set the queue up afresh without resetting the
        device, or memory lost under both.
        Either way it is not a wrong index published by a working driver."""
        again = self._avail16[1]
        ring, used = self._used_ring, self._used_idx
        stored = min(used, self.size)
        slots = (2 * ((used - i) & self._mask) for i in range(1, stored + 1))
        zeros = sum(1 for j in slots if not ring[j] and not ring[j + 1])
        notes = ([f"read again: {again}"] if again != idx else []) + (
            [f"{zeros} of the last {stored} used elements read as zeros: was the "
             f"rings' memory cleared?"] if zeros > stored // 2 else [])
        return VirtqueueError(f"available index jumped from {last} to {idx}: {pending} new "
                              f"entries in a queue of size {self.size}"
                              + (f" ({'; '.join(notes)})" if notes else ""))

    def _indirect_table(self, i: int, addr: int, length: int, flags: int, head: int,
                        in_table: bool) -> memoryview:
        """The table that descriptor `i` refers to, every rule checked (the
        cases `pop` does not inline: errors, a table outside the main region)."""
        if in_table:
            # 2.7.5.3.1: "MUST NOT set the VIRTQ_DESC_F_INDIRECT flag within
            # an indirect descriptor (ie. only one table per descriptor)"
            raise VirtqueueError(f"descriptor {i}{_where(head, in_table)} is a nested "
                                 f"indirect table")
        if flags & VIRTQ_DESC_F_NEXT:
            # 2.7.5.3.1: "MUST NOT set both VIRTQ_DESC_F_INDIRECT and
            # VIRTQ_DESC_F_NEXT"
            raise VirtqueueError(f"descriptor {i} (chain head {head}) has both INDIRECT "
                                 f"and NEXT set")
        # struct indirect_descriptor_table { struct virtq_desc desc[len / 16]; }
        if length == 0 or length % VIRTQ_DESC.size:
            raise VirtqueueError(f"descriptor {i} (chain head {head}): indirect table "
                                 f"length {length} is not a non-zero multiple of 16")
        n = length // VIRTQ_DESC.size
        if n > self._indirect_max:
            raise VirtqueueError(f"descriptor {i} (chain head {head}): indirect table of "
                                 f"{n} entries is longer than {self._indirect_max}")
        try:
            return self.mem.view(addr, length)
        except GuestMemoryError as e:
            raise VirtqueueError(f"descriptor {i} (chain head {head}): indirect table "
                                 f"at gpa 0x{addr:x} len {length}: {e}") from None

    def _views(self, addr: int, length: int, readonly: bool, i: int, head: int,
               in_table: bool) -> list[memoryview]:
        """Views of a buffer outside the main region (another region, or across two)."""
        try:
            return self.mem.views(addr, length, readonly)
        except GuestMemoryError:
            raise VirtqueueError(f"descriptor {i}{_where(head, in_table)} (chain head {head}) "
                                 f"points outside guest memory (gpa 0x{addr:x}, "
                                 f"len {length})") from None

    @classmethod
    def _too_long(cls, table: memoryview, first: int, steps: int, head: int,
                  in_table: bool) -> VirtqueueError:
        # 2.7.5.2: "Drivers MUST NOT add a descriptor chain longer than 2^32
        # bytes in total"
        return cls._chain_error(table, first, steps, head, in_table,
                                f"descriptor chain at head {head} is longer than 2^32 bytes")

    @staticmethod
    def _chain_error(table: memoryview, first: int, steps: int, head: int, in_table: bool,
                     message: str) -> VirtqueueError:
        """The error for a chain found bad at its `steps`-th descriptor of `table`.

        If the chain loops within those steps, the loop is reported instead of
        `message`: the loop is the driver's real mistake, and the chain broke
        the other rule only by coming round again.  Re-walked from `first`
        (error path only; the walk itself keeps no set of visited descriptors).
        """
        table_len = len(table) // VIRTQ_DESC.size
        visited: set[int] = set()
        i = first
        for _ in range(steps):
            if i in visited:
                return VirtqueueError(f"descriptor chain at head {head}"
                                      f"{_where(head, in_table)} loops back to descriptor "
                                      f"{i} after {len(visited)} descriptors")
            visited.add(i)
            _, _, flags, nxt = _unpack_desc(table, i << 4)
            if not flags & VIRTQ_DESC_F_NEXT or nxt >= table_len:
                break  # (only if the driver rewrote the chain meanwhile)
            i = nxt
        return VirtqueueError(message)

    # -- producing -----------------------------------------------------------------
    def push(self, head: int, written_len: int) -> None:
        """Return chain `head` to the driver, `written_len` bytes having been written.

        The element is stored before used->idx (2.7.8.2: "The device MUST set
        len prior to updating the used idx").  The caller serialises pushes.
        """
        if not 0 <= head < self.size:
            raise VirtqueueError(f"pushing descriptor {head}, beyond the queue size {self.size}")
        if not 0 <= written_len <= 0xFFFFFFFF:
            raise VirtqueueError(f"used length {written_len} does not fit 32 bits")
        idx = self._used_idx
        ring = self._used_ring
        slot = 2 * (idx & self._mask)
        ring[slot] = head
        ring[slot + 1] = written_len
        if _fence is not None:
            _fence()
        self._used_idx = idx = (idx + 1) & 0xFFFF
        self._used16[1] = idx

    def needs_notify(self) -> bool:
        """Whether to signal the driver after pushing.  Always True.

        2.7.7.2: without EVENT_IDX, with avail->flags NO_INTERRUPT set the device
        "SHOULD NOT" notify - a hint, not a rule.  Honouring it safely needs a
        store->load fence between writing used->idx and reading the flag (the
        driver clears the flag, fences, then re-checks used->idx); without one,
        an interrupt the driver is waiting for can be lost and the guest hangs.
        So the flag is ignored, and callers notify once per drained batch.
        """
        return True
