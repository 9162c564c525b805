"""A vhost-user back-end: the control plane (one unix socket) and the vrings.

Spec: QEMU docs/interop/vhost-user.rst ("the spec" below); virtqueue layout
in `protocol.virtqueue`.  Checked against what QEMU 7.2's
hw/virtio/vhost-user.c sends to a vhost-user-fs back-end:

    GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
    GET_MAX_MEM_SLOTS, SET_OWNER, SET_VRING_CALL/ERR, SET_FEATURES,
    SET_MEM_TABLE or ADD_MEM_REG/REM_MEM_REG, then per ring SET_VRING_NUM,
    SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_ENABLE 1;
    to stop: SET_VRING_ENABLE 0, GET_VRING_BASE; RESET_DEVICE on reset.

This module knows nothing about filesystems: a `VhostUserDevice` gets every
descriptor chain through `handle_chain`.

Threads: `serve_connection` runs the control plane in the caller's thread.
One worker thread per back-end (`_SharedWorker`) serves every started ring,
whatever the device: it waits on all their kick eventfds, pops chains and
hands them to the device.  Under the GIL a thread per ring buys no
parallelism, only thread wake-ups and GIL hand-overs between the ring
threads (measured with vfsd's thread pool and two request queues: a third
fewer LOOKUPs per second than with the one worker; see `_SharedWorker`).
A device that may complete chains later (`completes_async`) does so from
any thread with `Vring.complete` (vfsd's pool threads, which is where
blocking work belongs: the worker must not wait on one ring while others
are kicked).  Used-ring updates and notifications are serialised per ring
by the ring's lock (or, for a device that answers every chain inline, by
being done by the worker alone).

Byte order: the spec says "All numbers are in the machine native byte
order"; `WireStruct` is little-endian, so this module refuses big-endian
hosts (as does the virtqueue code).
"""

from __future__ import annotations

import abc
import array
import enum
import errno
import logging
import os
import select
import socket
import stat
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .memory import GuestMemory, GuestMemoryError, MemoryRegion
from .virtqueue import MAX_QUEUE_SIZE, DescriptorChain, Virtqueue, VirtqueueError
from .wire import WireStruct

log = logging.getLogger(__name__)

if sys.byteorder != "little":  # pragma: no cover - see module docstring
    raise ImportError("protocol.vhost_user supports little-endian hosts only")

__all__ = [
    "Request", "ProtocolFeature", "VhostUserDevice", "VhostUserBackend", "Vring",
    "listen_unix", "accept_one", "DescriptorChain",
    "VIRTIO_F_VERSION_1", "VIRTIO_RING_F_INDIRECT_DESC", "VIRTIO_RING_F_EVENT_IDX",
    "VHOST_USER_F_PROTOCOL_FEATURES",
]

# ---------------------------------------------------------------------------
# Protocol vocabulary
# ---------------------------------------------------------------------------


class Request(enum.IntEnum):
    """Front-end message types ("Front-end message types" in the spec)."""

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
    SET_BACKEND_REQ_FD = 21   # formerly SET_SLAVE_REQ_FD
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
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class ProtocolFeature(enum.IntFlag):
    """VHOST_USER_PROTOCOL_F_* as masks ("Protocol features" in the spec)."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19


# Virtio / vhost feature bit numbers.
VHOST_F_LOG_ALL = 26
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VHOST_USER_F_PROTOCOL_FEATURES = 30
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_NOTIFICATION_DATA = 38
VIRTIO_F_RING_RESET = 40

#: What the ring layer implements (offered on top of the device's own bits).
TRANSPORT_FEATURES = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC)
                      | (1 << VHOST_USER_F_PROTOCOL_FEATURES))
#: Bits a device must not offer through us: the ring layer does not do them.
#: EVENT_IDX needs a store->load fence Python lacks; packed rings are not
#: implemented; IN_ORDER forbids out-of-order completion (the thread pool does
#: that); ACCESS_PLATFORM needs IOTLB messages; NOTIFICATION_DATA and
#: RING_RESET change kick and reset semantics; LOG_ALL needs dirty logging.
UNSUPPORTED_FEATURES = ((1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_F_RING_PACKED)
                        | (1 << VIRTIO_F_IN_ORDER) | (1 << VIRTIO_F_ACCESS_PLATFORM)
                        | (1 << VIRTIO_F_NOTIFICATION_DATA) | (1 << VIRTIO_F_RING_RESET)
                        | (1 << VHOST_F_LOG_ALL))

#: Exactly what is implemented below.
SUPPORTED_PROTOCOL_FEATURES = (ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK
                               | ProtocolFeature.CONFIGURE_MEM_SLOTS
                               | ProtocolFeature.RESET_DEVICE)

# Header flags ("Header" in the spec).
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3

# SET_VRING_KICK/CALL/ERR payload: "Bits (0-7) of the payload contain the vring
# index. Bit 8 is the invalid FD flag."
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8
# SET_VRING_ADDR flags: VHOST_VRING_F_LOG.
VHOST_VRING_F_LOG = 1 << 0

#: Largest payload accepted; every message QEMU 7.2 sends to us is <= 264 bytes.
MAX_PAYLOAD = 4096
#: SET_MEM_TABLE carries at most VHOST_MEMORY_BASELINE_NREGIONS regions.
MAX_MEM_TABLE_REGIONS = 8
#: Reported by GET_MAX_MEM_SLOTS (as libvhost-user does; each slot is one mmap).
DEFAULT_MAX_MEM_SLOTS = 32
#: File descriptors one message may carry (room beyond 8 to detect excess).
MAX_FDS = 16
#: vring index is 8 bits in SET_VRING_KICK/CALL/ERR.
MAX_QUEUES = 256

# ---------------------------------------------------------------------------
# Wire structs (each defined once; sizes checked in tests/unit/test_vhost_user.py)
# ---------------------------------------------------------------------------

HEADER = WireStruct("VhostUserHeader", [("request", "I"), ("flags", "I"), ("size", "I")])
U64 = WireStruct("u64", [("value", "Q")])
VRING_STATE = WireStruct("vhost_vring_state", [("index", "I"), ("num", "I")])
VRING_ADDR = WireStruct("vhost_vring_addr", [
    ("index", "I"), ("flags", "I"), ("desc_user_addr", "Q"), ("used_user_addr", "Q"),
    ("avail_user_addr", "Q"), ("log_guest_addr", "Q")])
MEMORY_REGION = WireStruct("VhostUserMemoryRegion", [
    ("guest_phys_addr", "Q"), ("memory_size", "Q"), ("userspace_addr", "Q"),
    ("mmap_offset", "Q")])
MEMORY_HEADER = WireStruct("VhostUserMemory", [("nregions", "I"), ("padding", "I")])
MEM_REG_MSG = WireStruct("VhostUserMemRegMsg", [("padding", "Q"), ("region", MEMORY_REGION)])

#: Full SET_MEM_TABLE payload with all 8 regions (QEMU's VhostUserMemory).
MEMORY_TABLE_MAX_SIZE = MEMORY_HEADER.size + MAX_MEM_TABLE_REGIONS * MEMORY_REGION.size

_EVENTFD_ONE = struct.pack("=Q", 1)

#: A coalesced ring's held notification (`VhostUserDevice.coalesced_queues`) is
#: sent at most this many seconds after the first chain it covers was pushed...
COALESCE_SECONDS = 0.02
#: ... or as soon as this fraction of the ring is used but not yet notified, so
#: the driver, which reclaims descriptors on the notification, keeps at least
#: three quarters of its ring free.
COALESCE_RING_FRACTION = 4
#: The shortest polling window worth a turn (`_adapt_window`).
POLL_MIN_NS = 8_000


class PollFigures:
    """How well polling fitted the guest's pace over one run of the ring worker,
    logged when it ends: for each wait after a drain that served chains, how the
    next chain came.  An operator reads from it whether the most (the back-end's
    `poll_max_us`, vfsd's `--poll-max-us`) suits the guest (most chains found
    by polling), is too short (many came after the window or while the window
    had shrunk to nothing), or is spent on a guest that pauses (many came after
    a pause longer than the most)."""

    __slots__ = ("found", "after_window", "not_polling", "after_pause", "polling_ns")

    def __init__(self) -> None:
        self.found = 0          # found by polling: no sleep, no wake-up
        self.after_window = 0   # came after the window, within the most
        self.not_polling = 0    # came within the most while the window was nothing
        self.after_pause = 0    # came after a pause longer than the most
        self.polling_ns = 0     # time spent watching the rings

    def note(self, found: bool, polled: bool, paused: bool) -> None:
        if found:
            self.found += 1
        elif paused:
            self.after_pause += 1
        elif polled:
            self.after_window += 1
        else:
            self.not_polling += 1

    def summary(self, poll_max_ns: int) -> str | None:
        """The log line's text; None if no chain followed a served one."""
        waits = self.found + self.after_window + self.not_polling + self.after_pause
        if not waits:
            return None
        return (f"ring polling this session: of {waits} waits for a chain after serving, "
                f"{self.found} ({100 * self.found / waits:.0f}%) ended by polling, "
                f"{self.after_window} after the window, {self.not_polling} while not polling, "
                f"{self.after_pause} after a pause longer than {poll_max_ns // 1000} us; "
                f"{self.polling_ns / 1e9:.2f} s spent polling")


#: Requests whose reply is mandatory ("Communication" in the spec, plus those
#: defined with a reply payload).  NEED_REPLY on them changes nothing.
_REPLYING = frozenset({
    Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_VRING_BASE,
    Request.GET_QUEUE_NUM, Request.GET_MAX_MEM_SLOTS, Request.GET_CONFIG,
    Request.GET_INFLIGHT_FD, Request.GET_STATUS, Request.IOTLB_MSG, Request.POSTCOPY_ADVISE,
    Request.POSTCOPY_END, Request.CREATE_CRYPTO_SESSION, Request.GET_SHARED_OBJECT,
    Request.SET_DEVICE_STATE_FD, Request.CHECK_DEVICE_STATE,
})


def _req_name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


# ---------------------------------------------------------------------------
# Device interface
# ---------------------------------------------------------------------------


class VhostUserDevice(abc.ABC):
    """What a vhost-user device implements on top of this library."""

    #: Reported by GET_QUEUE_NUM; queue indexes >= this are rejected.
    num_queues: int
    #: Extra virtio feature bits (device-specific) offered by GET_FEATURES.
    device_features: int = 0
    #: Whether `handle_chain` may return None and complete the chain later
    #: (`Vring.complete`).  A device that always answers inline sets this to
    #: False: its rings then skip the in-flight bookkeeping and the ring lock
    #: per chain (only the worker touches the used ring).  Either way one
    #: worker thread serves all the rings (`_SharedWorker`).  Read at the start
    #: of each batch of chains; change it only while the device is not running.
    completes_async: bool = True
    #: Queues whose used-buffer notifications may be held back and sent for
    #: several chains at once.  2.7.7.2: without EVENT_IDX the device "SHOULD"
    #: notify after writing the used ring, but nothing says how soon; each
    #: notification costs the driver an interrupt.  Only for a queue whose
    #: chains the driver does not wait on (virtio-fs's hiprio queue: FORGETs,
    #: which have no reply): the held notification only delays the driver's
    #: reclaiming of descriptors, by at most `COALESCE_SECONDS`, and never
    #: lets the ring run more than a `COALESCE_RING_FRACTION`th short.  Applies
    #: to the chains answered inline (`handle_chain` returning a length) and
    #: to completions during the worker's batch; a `Vring.complete` from
    #: another thread notifies at once.
    coalesced_queues: frozenset[int] = frozenset()

    @abc.abstractmethod
    def handle_chain(self, vring: "Vring", chain: DescriptorChain) -> int | None:
        """Handle one request.

        Return the number of bytes written into `chain.writable` (the library
        puts it on the used ring and notifies), or None to complete it later,
        from any thread, with `vring.complete(chain, written)` (only if
        `completes_async`).  Called from the back-end's one worker thread,
        which serves every ring: while it runs, no other ring is served, so
        work that may block for long belongs on another thread (return None).
        """

    def working_elsewhere(self) -> bool:
        """Whether the device is running work of its own on other threads now,
        besides the chains it completes later (which the ring layer counts).
        The worker does not poll the rings meanwhile (`_SharedWorker`): polling
        holds the GIL, and that work would wait for it."""
        return False

    def reset(self) -> None:
        """Device reset (RESET_DEVICE, RESET_OWNER, disconnect); rings are stopped."""


class _Fail(Exception):
    """A request could not be carried out (answered with a non-zero REPLY_ACK)."""


class _Fatal(Exception):
    """The connection cannot continue (framing lost, or a mandatory reply impossible)."""


@dataclass
class _Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return _req_name(self.request)

    def take_fd(self) -> int | None:
        return self.fds.pop(0) if self.fds else None

    def close_fds(self) -> None:
        while self.fds:
            _close(self.fds.pop())


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


# ---------------------------------------------------------------------------
# Vrings
# ---------------------------------------------------------------------------


class Vring:
    """One virtqueue's vhost-user state; while started, a member of the
    backend's `_SharedWorker` (the one thread that serves every ring).

    States (spec, "Ring states"): stopped until a kick fd arrives
    (SET_VRING_KICK), stopped again by GET_VRING_BASE; independently enabled or
    disabled.  A started but disabled ring is left alone: its buffers stay in
    the available ring until it is enabled (processing "without side effects"
    is impossible for a filesystem, so nothing is processed).  Stopping one
    ring (`_stop`) takes it out of the worker and waits for its chains in
    flight; the worker goes on serving the other rings meanwhile.
    """

    def __init__(self, backend: "VhostUserBackend", index: int):
        self.index = index
        self._backend = backend
        # Configuration from the front-end.
        self.size = 0
        self.desc_uva = self.avail_uva = self.used_uva = None
        self.base = 0                 # last_avail_idx to start from / at stop
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.kick_received = False    # SET_VRING_KICK seen since the last stop
        self.enabled = False
        self.broken: str | None = None
        # Runtime.
        self._vq: Virtqueue | None = None
        self._lock = threading.Lock()              # used ring*, call/err fds, in-flight
        # (*the worker of an inline device pushes without it: see _drain)
        self._idle = threading.Condition(self._lock)
        self._inflight: dict[int, DescriptorChain] = {}
        self._shared: _SharedWorker | None = None  # the backend's worker, while started
        self._kick_failed = False                  # the worker gave up the kick fd
        # Leave the drain loop after the current chain: the worker is wanted by
        # the control thread (_SharedWorker.remove: this or another ring stops).
        self._stopping = False
        self._batching = False
        self._notify_pending = False
        # Notification coalescing (device.coalesced_queues): the most used
        # elements a held notification may cover (0: not coalesced), how many
        # it covers now, and since when (the worker sends it when due).
        self._coalesce_max = 0
        self._held = 0
        self._held_since = 0.0

    def __repr__(self) -> str:
        return (f"<Vring {self.index} size={self.size} started={self.started} "
                f"enabled={self.enabled} broken={self.broken!r}>")

    @property
    def started(self) -> bool:
        return self._shared is not None

    @property
    def inflight(self) -> int:
        with self._lock:
            return len(self._inflight)

    # -- completion (any thread) ------------------------------------------------
    def complete(self, chain: DescriptorChain, written: int) -> None:
        """Put `chain` on the used ring with `written` bytes and notify the driver.

        For chains the device took asynchronously (`handle_chain` returned None,
        `completes_async`); any other chain is not in flight, and is refused.
        """
        with self._lock:
            if self._inflight.pop(id(chain), None) is not chain:
                log.warning("queue %d: completion of descriptor chain %d that is not in "
                            "flight (completed twice, or after a reset); ignored",
                            self.index, chain.head)
                return
            try:
                vq = self._vq
                if vq is None or self.broken:
                    return
                if written.__class__ is not int or not 0 <= written <= chain.writable_len:
                    written = self._checked_written(chain, written)
                try:
                    vq.push(chain.head, written)
                except VirtqueueError as e:
                    self._mark_broken_locked(str(e))
                    return
                if vq.needs_notify():
                    if self._batching:
                        self._notify_pending = True   # once, at the end of the batch
                    else:
                        # Not the worker's: only the worker sends held
                        # notifications, so this one goes now, for them too.
                        self._held = 0
                        self._signal_locked(self.call_fd, "call")
            finally:
                if not self._inflight:
                    self._idle.notify_all()

    # -- internals (lock held) -----------------------------------------------------
    def _notify_locked(self, pushed: int) -> None:
        """The used-buffer notification for `pushed` new used elements: sent
        now, or held if the ring is coalesced and the held ones are few
        enough (the worker then sends it when due: `_flush_held`)."""
        if self._coalesce_max:
            held = self._held + pushed
            if held < self._coalesce_max:
                if not self._held:
                    self._held_since = time.monotonic()
                self._held = held
                return
            self._held = 0
        self._signal_locked(self.call_fd, "call")

    def _flush_held(self) -> None:
        """Send the held notification, if any (the worker, when it is due; a stop)."""
        with self._lock:
            if self._held:
                self._held = 0
                self._signal_locked(self.call_fd, "call")

    def _signal_locked(self, fd: int | None, what: str) -> None:
        if fd is None:
            return
        try:
            os.write(fd, _EVENTFD_ONE)
        except BlockingIOError:
            pass  # counter saturated: the other side has a notification pending anyway
        except OSError as e:
            log.warning("queue %d: cannot signal the %s eventfd: %s", self.index, what, e)

    def _mark_broken_locked(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
            log.error("queue %d: broken: %s", self.index, reason)
            self._signal_locked(self.err_fd, "error")

    def _mark_broken(self, reason: str) -> None:
        with self._lock:
            self._mark_broken_locked(reason)

    def _set_fd(self, attr: str, fd: int | None) -> None:
        with self._lock:
            old = getattr(self, attr)
            setattr(self, attr, fd)
        _close(old)

    # -- worker ------------------------------------------------------------------
    def _wake(self) -> None:
        if self._shared is not None:
            self._shared.wake()

    def _drain(self) -> None:
        """Pop and dispatch every available chain; notify once afterwards.

        Called by the worker (`_SharedWorker`).  Done here for a device that
        answers every chain inline (`completes_async` False), the per-request
        path of vfsd without a thread pool: the worker is then the only thread
        that touches the used ring, so chains are pushed without the ring lock
        and without in-flight bookkeeping (`_stop` waits until the worker has
        let go of the ring before it takes the ring away).  The lock is taken
        once per batch, to signal the call eventfd (the control thread may
        swap that fd).  Other devices go through `_drain_async`.
        """
        vq = self._vq
        if vq is None or not self.enabled or self.broken:
            return
        device = self._backend.device
        # (In-flight chains left from an asynchronous phase are completed under
        # the lock: keep to the locked path until they are all back.)
        if getattr(device, "completes_async", True) or self._inflight:
            self._drain_async(vq, device)
            return
        handle, pop, push = device.handle_chain, vq.pop, vq.push
        pushed = False
        first = vq.used_idx if self._coalesce_max else 0   # (counted for coalescing only)
        try:
            while self.enabled and not self._stopping and not self.broken:
                try:
                    chain = pop()
                except VirtqueueError as e:
                    self._mark_broken(str(e))
                    return
                if chain is None:
                    return
                try:
                    written = handle(self, chain)
                except Exception:
                    # A device bug: answer the request empty and keep serving.
                    log.exception("queue %d: device failed on descriptor chain %d",
                                  self.index, chain.head)
                    written = 0
                if written.__class__ is not int or not 0 <= written <= chain.writable_len:
                    written = self._checked_written(chain, written, inline=True)
                try:
                    push(chain.head, written)
                except VirtqueueError as e:
                    self._mark_broken(str(e))
                    return
                pushed = True
        finally:
            if pushed:
                # 2.7.7 "Used Buffer Notification", once for the batch: the driver
                # sees every element pushed so far (see Virtqueue.needs_notify).
                with self._lock:
                    if self._coalesce_max:
                        self._notify_locked((vq.used_idx - first) & 0xFFFF)
                    else:
                        self._signal_locked(self.call_fd, "call")

    def _drain_async(self, vq: Virtqueue, device: VhostUserDevice) -> None:
        """`_drain` for a device that may complete chains later, from any thread.

        Each chain is registered in flight (under the ring lock) before the
        device sees it, so `_stop` can wait for it and `complete` can refuse
        strangers; completions during the batch defer their notification to
        the end of the batch.
        """
        with self._lock:
            self._batching = True
            first = vq.used_idx
        try:
            while self.enabled and not self._stopping and not self.broken:
                try:
                    chain = vq.pop()
                except VirtqueueError as e:
                    self._mark_broken(str(e))
                    return
                if chain is None:
                    return
                with self._lock:
                    self._inflight[id(chain)] = chain
                try:
                    written = device.handle_chain(self, chain)
                except Exception:
                    # A device bug: answer the request empty and keep serving.
                    log.exception("queue %d: device failed on descriptor chain %d",
                                  self.index, chain.head)
                    written = 0
                if written is not None:
                    self.complete(chain, written)
        finally:
            with self._lock:
                self._batching = False
                if self._notify_pending:
                    self._notify_pending = False
                    self._notify_locked((vq.used_idx - first) & 0xFFFF)

    def _checked_written(self, chain: DescriptorChain, written, inline: bool = False) -> int:
        """`written` made a valid used length for `chain` (0..writable_len), logged if not.

        2.7.8: the used length is "the total length of the descriptor chain
        which was written to", so it cannot exceed the writable buffers.
        """
        if written is None and inline:
            # The device said it answers inline (completes_async False), so
            # nothing would ever complete this chain: answer it empty now.  A
            # later vring.complete() of it is refused as not in flight.
            log.error("queue %d: device returned no length for chain %d although it "
                      "does not complete chains asynchronously; answering it empty",
                      self.index, chain.head)
            return 0
        if not isinstance(written, int) or written < 0:
            log.error("queue %d: device reported %r bytes written for chain %d; "
                      "using 0", self.index, written, chain.head)
            return 0
        if written > chain.writable_len:
            log.error("queue %d: device reported %d bytes written for chain %d, "
                      "which has only %d writable bytes; clamping", self.index,
                      written, chain.head, chain.writable_len)
            return chain.writable_len
        return written

    # -- life cycle (control thread) ----------------------------------------------
    def _try_start(self, mem: GuestMemory | None) -> None:
        """Hand the ring to the worker if it has been kicked and is fully configured."""
        if self.started or not self.kick_received or self.broken:
            return
        missing = [what for what, ok in (("memory table", mem is not None and len(mem)),
                                         ("queue size", self.size),
                                         ("ring addresses", self.desc_uva is not None))
                   if not ok]
        if missing:
            log.warning("queue %d: kicked but not configured (no %s); not started yet",
                        self.index, ", ".join(missing))
            return
        try:
            vq = Virtqueue(mem, self.size,
                           mem.uva_to_gpa(self.desc_uva, 16 * self.size),
                           mem.uva_to_gpa(self.avail_uva, 4 + 2 * self.size),
                           mem.uva_to_gpa(self.used_uva, 4 + 8 * self.size),
                           self.base)
        except (VirtqueueError, GuestMemoryError) as e:
            # Not "broken": the next memory table may well make it valid.
            log.error("queue %d: cannot start: %s", self.index, e)
            return
        self._vq = vq
        self._stopping = False
        log.debug("queue %d: started (size %d, avail idx %d, used idx %d, %s)", self.index,
                  self.size, vq.last_avail_idx, vq.used_idx,
                  "enabled" if self.enabled else "disabled")
        self._kick_failed = False
        self._coalesce_max = (max(1, self.size // COALESCE_RING_FRACTION)
                              if self.index in getattr(self._backend.device,
                                                       "coalesced_queues", ()) else 0)
        self._shared = self._backend._shared_worker
        self._shared.add(self)

    def _stop(self, timeout: float) -> None:
        """Take the ring from the worker, wait for in-flight chains (at most
        `timeout` seconds), remember last_avail_idx.  The other rings are
        served meanwhile."""
        shared = self._shared
        if shared is None:
            return
        shared.remove(self)   # returns once the worker has let go of the ring
        self._shared = None
        self._flush_held()    # the worker will not send it now
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error("queue %d: %d request(s) still in flight after %.1fs; "
                              "abandoning them", self.index, len(self._inflight), timeout)
                    self._inflight.clear()
                    break
                self._idle.wait(min(left, 5.0))
                if self._inflight and left > 5.0:
                    log.warning("queue %d: waiting for %d request(s) in flight", self.index,
                                len(self._inflight))
            vq, self._vq = self._vq, None
        if vq is not None:
            self.base = vq.last_avail_idx
        log.debug("queue %d: stopped at avail idx %d", self.index, self.base)

    def _set_enabled(self, enabled: bool) -> None:
        self.enabled = enabled
        if enabled:
            self._wake()  # process whatever was queued while disabled

    def _reset(self, timeout: float) -> None:
        self._stop(timeout)
        for attr in ("kick_fd", "call_fd", "err_fd"):
            self._set_fd(attr, None)
        self.size = 0
        self.desc_uva = self.avail_uva = self.used_uva = None
        self.base = 0
        self.kick_received = False
        self.enabled = False
        self.broken = None


class _SharedWorker:
    """The one thread that serves every started ring of a back-end.

    Popping a chain and answering it (or handing it over) is Python work that
    holds the GIL, so a thread per ring buys no parallelism: it only adds a
    thread wake-up per kick and GIL hand-overs between the ring threads (on
    virtio-fs, per FORGET batch on the hiprio queue, and with several request
    queues per request).  That holds for a device that completes chains later
    (`completes_async`) too: what it runs on other threads (vfsd's pool) is
    what releases the GIL; what it answers inline is cheap.  With vfsd's pool
    of 4 and two request queues, a thread per ring served 16,600 LOOKUPs and
    43,500 GETATTRs per second, this one thread 24,100 and 51,700
    (docs/performance.md).

    This thread polls the kick fd of every member ring and a control eventfd,
    and drains the rings whose kick fired, lowest queue index first:
    virtio-fs's hiprio queue is 0 (virtio spec 5.11.2), so FORGETs go before
    requests kicked with them.  A ring without a kick fd (NOFD) is drained
    every 10 ms; a ring whose kick fd fails stays a member (started) but is
    no longer drained, until it is stopped or given a new kick fd; a broken
    ring is skipped by its own drain.  Neither stops the other rings.

    Members change only from the control thread ("Ring states" in the spec:
    a ring starts when kicked and configured, stops at GET_VRING_BASE);
    `remove` returns once the thread has let go of the ring (then
    `Vring._stop` waits for that ring's chains in flight, while this thread
    serves the others).  The thread exits when it finds no member left and
    `add` starts a new one; both are decided under `_lock`, so a ring added
    while the last one is being removed is never left without a thread, and
    none is left once every ring has stopped (disconnect, reset).

    It also sends the notifications that the drains of a coalesced ring held
    back (`VhostUserDevice.coalesced_queues`), when they are due: its wait for
    kicks ends then at the latest.

    A drain is not cut short by another ring's kick: it ends when its ring is
    empty.  A driver that reclaims buffers on the used-buffer notification
    (2.7.7), sent at the end of the batch, as Linux's virtio-fs does, cannot
    refill the ring past its size meanwhile.

    With `poll_max_ns`, a wait that follows a drain which served chains
    first watches the available rings for up to a window (`_poll_rings`),
    and sleeps in epoll only if nothing came: a guest that waits for each
    reply before it sends the next request gets its next one served without
    this thread's wake-up (tens of µs on a virtual machine).  The window
    adapts to the guest's pace (`_adapt_window`), up to `poll_max_ns`.  The
    driver still kicks (no VRING_USED_F_NO_NOTIFY: turning it off again
    safely needs a store->load fence, see `Virtqueue.needs_notify`); the
    kick of a chain served by polling wakes the next wait, which finds the
    rings empty and is not followed by polling.
    """

    def __init__(self, name: str = "vhost-user-rings", *, poll_max_ns: int = 0,
                 working_elsewhere: Callable[[], bool] = lambda: False):
        self.name = name
        self.poll_max_ns = poll_max_ns
        self._working_elsewhere = working_elsewhere
        self._lock = threading.Lock()
        self._picked_up = threading.Condition(self._lock)   # _seen moved
        self._rings: dict[int, Vring] = {}     # members, by queue index
        self._version = 0                      # bumped by each change of members
        self._seen = 0                         # the version the thread serves
        self._thread: threading.Thread | None = None
        self._ctl_fd: int | None = None        # the thread's eventfd: members changed, wake

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    # -- control thread ---------------------------------------------------------
    def add(self, vring: Vring) -> None:
        with self._lock:
            self._rings[vring.index] = vring
            self._version += 1
            if self._thread is None:
                self._ctl_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                self._thread = threading.Thread(target=self._run, args=(self._ctl_fd,),
                                                name=self.name, daemon=True)
                self._thread.start()
            else:
                self._signal_locked()

    def remove(self, vring: Vring) -> None:
        """Take `vring` out; return once the thread no longer touches it."""
        with self._lock:
            if self._rings.pop(vring.index, None) is None:
                return
            thread = self._thread
            if thread is None:
                return
            self._version += 1
            version = self._version
            # Every drain loop ends after its current chain (Vring._drain), so
            # the thread picks the change up after one request, not a batch of
            # another ring; it clears the flag of the rings it keeps.
            vring._stopping = True
            for v in self._rings.values():
                v._stopping = True
            self._signal_locked()
            while self._seen < version and self._thread is thread:
                self._picked_up.wait()
            exited = self._thread is not thread
        if exited:
            thread.join()   # it found no ring left; only its return was left to do

    def wake(self) -> None:
        """Drain every member ring soon (e.g. one was enabled)."""
        with self._lock:
            self._signal_locked()

    def _signal_locked(self) -> None:
        if self._ctl_fd is not None:
            try:
                os.write(self._ctl_fd, _EVENTFD_ONE)
            except OSError:
                pass  # saturated: a wake-up is pending anyway

    # -- the thread ---------------------------------------------------------------
    def _pick_up(self, ctl: int) -> list[Vring] | None:
        """The member rings to serve, by queue index; None: none left, the thread ends."""
        with self._lock:
            try:
                os.read(ctl, 8)  # reset the eventfd counter
            except BlockingIOError:
                pass
            if not self._rings:
                self._exit_locked(ctl)
                return None
            for v in self._rings.values():
                v._stopping = False   # (set by `remove` to cut drain loops short)
            self._seen = self._version
            self._picked_up.notify_all()
            return sorted((v for v in self._rings.values() if not v._kick_failed),
                          key=_ring_index)

    def _exit_locked(self, ctl: int) -> None:
        self._thread = self._ctl_fd = None
        _close(ctl)
        self._picked_up.notify_all()

    def _run(self, ctl: int) -> None:
        index = _ring_index
        epollin, failed = select.EPOLLIN, select.EPOLLERR | select.EPOLLHUP
        # Kicks are edge-triggered: the eventfd's counter is never read, as
        # each write to an eventfd wakes its epoll waiters whatever the count
        # (the read per kick was a syscall per request, ~1.5 µs of it).  The
        # ring is drained until empty after every wake-up, so a kick that
        # came during a drain is served then, or by the drain it wakes.
        kick_events = epollin | select.EPOLLET
        poll_max = self.poll_max_ns
        window = 0          # ns the next wait polls the rings for before it sleeps
        idle_since = 0      # perf_counter_ns at the end of the last drain that served a chain
        changed = True
        poller: select.epoll | None = None
        held: list[Vring] = []   # rings whose drain held a notification back
        figures = PollFigures()
        clock = time.perf_counter_ns
        try:
            while True:
                found = polled = False   # (whether this wait's chains were found by polling)
                if changed:
                    changed = False
                    serving = self._pick_up(ctl)
                    if serving is None:
                        if poll_max:
                            line = figures.summary(poll_max)
                            if line:
                                log.info("%s", line)
                        return
                    if poller is not None:
                        poller.close()
                    poller = select.epoll()
                    poller.register(ctl, epollin)
                    kicks: dict[int, Vring] = {}
                    # Without a kick fd (NOFD flag), the spec says to poll the ring.
                    unkicked = [v for v in serving if v.kick_fd is None]
                    for v in serving:
                        if v.kick_fd is None:
                            continue
                        try:
                            poller.register(v.kick_fd, kick_events)
                        except OSError as e:  # EPERM: a regular file is no kick fd
                            log.error("queue %d: kick fd %d cannot be polled (%s); "
                                      "stopping the ring", v.index, v.kick_fd, e.strerror)
                            v._kick_failed = True
                            continue
                        kicks[v.kick_fd] = v
                    poll = poller.poll
                    timeout = 0.01 if unkicked else -1
                    # Buffers may have been queued before a ring started, while it
                    # was disabled, or behind a drain cut short by `remove`.
                    ready = [v for v in serving if not v._kick_failed]
                    # (A ring taken out sent its held notification: Vring._stop.)
                    held = [v for v in held if v in serving]
                else:
                    wait = timeout
                    if held:   # wake when the oldest held notification is due
                        due = max(0.0, min(v._held_since for v in held) + COALESCE_SECONDS
                                  - time.monotonic())
                        wait = due if wait < 0 else min(wait, due)
                    ready = []
                    if idle_since and window:
                        budget = window if wait < 0 else min(window, int(wait * 1e9))
                        began = clock()
                        ready = self._poll_rings(serving, idle_since + budget)
                        figures.polling_ns += clock() - began
                        polled = True
                        if ready:
                            found = True
                            wait = 0.0   # (take a control change with them)
                        elif wait > 0:
                            wait = max(0.0, wait - budget / 1e9)
                    for fd, ev in poll(wait):
                        if fd == ctl:
                            changed = True
                        elif ev & epollin:
                            if kicks[fd] not in ready:   # (polling found it already)
                                ready.append(kicks[fd])
                        elif ev & failed:
                            v = kicks.pop(fd)
                            log.error("queue %d: kick fd failed (poll events 0x%x); "
                                      "stopping the ring", v.index, ev)
                            poller.unregister(fd)
                            v._kick_failed = True  # started but unserved until stopped
                    if held:
                        _flush_due(held)
                    if changed:
                        continue  # take the change first; then every ring is drained
                    if unkicked:
                        ready += unkicked
                    if len(ready) > 1:
                        ready.sort(key=index)
                served = False
                for v in ready:
                    # (with polling: whether the drain serves chains, and how long
                    # the first of them kept the worker waiting)
                    vq = v._vq if poll_max else None
                    if vq is not None:
                        before = vq.last_avail_idx
                        if idle_since and not served and vq.avail_idx() != before:
                            gap = clock() - idle_since
                            figures.note(found, polled, gap > poll_max)
                            window = _adapt_window(window, gap, poll_max)
                    try:
                        v._drain()
                    except Exception:  # one ring's failure is not the others'
                        log.exception("queue %d: worker failed", v.index)
                        v._mark_broken("internal error in the ring worker")
                    if vq is not None and vq.last_avail_idx != before:
                        served = True
                    if v._held and v not in held:
                        held.append(v)
                if poll_max:
                    # Only a drain that served chains is followed by polling: a
                    # kick that came while the rings were polled wakes the next
                    # wait at once and finds them empty.
                    idle_since = clock() if served else 0
        except Exception:  # never let the worker die silently
            log.exception("ring worker failed")
            with self._lock:
                for v in self._rings.values():
                    v._mark_broken("internal error in the ring worker")
                self._exit_locked(ctl)
        finally:
            if poller is not None:
                poller.close()

    def _poll_rings(self, rings: list[Vring], until_ns: int) -> list[Vring]:
        """Busy-poll the available rings of `rings` until `until_ns`
        (perf_counter_ns): the rings the driver offered chains to meanwhile,
        or [] (none; or a control change wants the thread, or other threads
        of the device have work).

        Polling holds the GIL but for a moment per turn (`sched_yield` lets it
        and the CPU go), and a thread waiting for the GIL gets it only after
        the switch interval (5 ms) when its holder takes it back at once.  So
        there is no polling while chains are in flight on the device's pool or
        the device works on other threads (`VhostUserDevice.working_elsewhere`):
        the worker then sleeps in epoll, without the GIL.  A control message
        waits for the turn to end (at most `poll_max_ns`)."""
        clock, yield_, elsewhere = time.perf_counter_ns, os.sched_yield, self._working_elsewhere
        version = self._version
        while True:
            if self._version != version or elsewhere():
                return []
            found = []
            for v in rings:
                vq = v._vq
                if vq is None:
                    continue
                if v._inflight:
                    return []
                # (a disabled or broken ring's chains wait, so they end no polling)
                if vq.avail_idx() != vq.last_avail_idx and v.enabled and not v.broken:
                    found.append(v)
            if found or clock() >= until_ns:
                return found
            yield_()


def _adapt_window(window: int, gap: int, poll_max: int) -> int:
    """The next polling window (ns) after a wait of `gap` ns for the next chain.

    Polling saves the sleep and the wake-up only when the next chain comes
    within the window; otherwise it is CPU spent for nothing.  So the window
    doubles (up to `poll_max`) while the chains come later than it but within
    `poll_max`, and halves (to nothing, below `POLL_MIN_NS`) when they come
    later than `poll_max`: a guest that pauses between requests for longer
    than that is not polled for."""
    if gap <= window:
        return window
    if gap <= poll_max:
        return min(poll_max, max(2 * window, POLL_MIN_NS))
    window //= 2
    return window if window >= POLL_MIN_NS else 0


def _ring_index(vring: Vring) -> int:
    return vring.index


def _flush_due(held: list[Vring]) -> None:
    """Send the held notifications that are due; keep in `held` the rings still holding one."""
    now = time.monotonic()
    for v in list(held):
        if v._held and now >= v._held_since + COALESCE_SECONDS:
            v._flush_held()
        if not v._held:
            held.remove(v)


# ---------------------------------------------------------------------------
# The back-end
# ---------------------------------------------------------------------------


class VhostUserBackend:
    """Serves one vhost-user front-end connection for a `VhostUserDevice`.

    `poll_max_us`: the longest the worker polls the rings after serving
    chains before it sleeps (0: it never polls; see `_SharedWorker`)."""

    def __init__(self, device: VhostUserDevice, *, max_mem_slots: int = DEFAULT_MAX_MEM_SLOTS,
                 drain_timeout: float = 30.0, poll_max_us: float = 0):
        n = getattr(device, "num_queues", None)
        if not isinstance(n, int) or not 1 <= n <= MAX_QUEUES:
            raise ValueError(f"device.num_queues must be an int in 1..{MAX_QUEUES}, not {n!r}")
        self.device = device
        self.max_mem_slots = max_mem_slots
        self.drain_timeout = drain_timeout
        extra = getattr(device, "device_features", 0) or 0
        if extra & UNSUPPORTED_FEATURES:
            log.warning("device offers feature bits 0x%x that the ring layer does not "
                        "implement; not offering them", extra & UNSUPPORTED_FEATURES)
        self.offered_features = (TRANSPORT_FEATURES | extra) & ~UNSUPPORTED_FEATURES
        self.offered_protocol_features = int(SUPPORTED_PROTOCOL_FEATURES)
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.owner = False
        self.memory: GuestMemory = GuestMemory.empty()
        self.vrings = [Vring(self, i) for i in range(n)]
        # serves every started ring
        self._shared_worker = _SharedWorker(
            poll_max_ns=int(poll_max_us * 1000),
            working_elsewhere=getattr(device, "working_elsewhere", lambda: False))
        self._sock: socket.socket | None = None
        self._handlers: dict[int, Callable[[_Message], bytes | None]] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.SET_OWNER: self._set_owner,
            Request.RESET_OWNER: self._reset_owner,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.ADD_MEM_REG: self._add_mem_reg,
            Request.REM_MEM_REG: self._rem_mem_reg,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            Request.RESET_DEVICE: self._reset_device,
        }

    # -- connection loop -----------------------------------------------------------
    def serve_connection(self, sock: socket.socket) -> None:
        """Serve the front-end on connected `sock` until it hangs up; closes `sock`.

        Malformed framing (bad version, oversize or truncated message) is
        logged and ends the connection; every other error is answered (REPLY_ACK)
        and serving goes on.  On return all rings are stopped, fds closed,
        guest memory dropped and `device.reset()` called.
        """
        self._sock = sock
        try:
            while True:
                msg = self._recv_message()
                if msg is None:
                    break
                try:
                    if not self._dispatch(msg):
                        break
                finally:
                    msg.close_fds()
        finally:
            self._teardown()
            self._sock = None
            try:
                sock.close()
            except OSError:
                pass

    serve = serve_connection

    def _recv_exact(self, n: int, fds: list[int]) -> bytes | None:
        """n bytes (collecting SCM_RIGHTS fds), or None at EOF before any byte."""
        buf = bytearray()
        space = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
        while len(buf) < n:
            try:
                data, anc, flags, _ = self._sock.recvmsg(n - len(buf), space,
                                                         socket.MSG_CMSG_CLOEXEC)
            except InterruptedError:
                continue
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(cdata[:len(cdata) - len(cdata) % a.itemsize])
                    fds.extend(a)
            if flags & socket.MSG_CTRUNC:
                raise _Fatal(f"more than {MAX_FDS} file descriptors on one message")
            if not data:
                if buf:
                    raise _Fatal(f"connection closed in the middle of a message "
                                 f"({len(buf)} of {n} bytes)")
                return None
            buf += data
        return bytes(buf)

    def _recv_message(self) -> _Message | None:
        fds: list[int] = []
        try:
            hdr = self._recv_exact(HEADER.size, fds)
            if hdr is None:
                log.info("front-end hung up")
                return None
            request, flags, size = HEADER.unpack(hdr)
            if size > MAX_PAYLOAD:
                raise _Fatal(f"{_req_name(request)}: payload of {size} bytes exceeds "
                             f"{MAX_PAYLOAD}")
            payload = b""
            if size:
                payload = self._recv_exact(size, fds)
                if payload is None:
                    raise _Fatal(f"{_req_name(request)}: connection closed before the "
                                 f"{size}-byte payload")
        except (ConnectionResetError, BrokenPipeError):
            log.info("front-end reset the connection")
        except _Fatal as e:
            log.error("vhost-user protocol error: %s; closing the connection", e)
        except OSError as e:
            log.error("vhost-user socket error: %s; closing the connection", e)
        else:
            return _Message(request, flags, payload, fds)
        for fd in fds:
            _close(fd)
        return None

    def _dispatch(self, msg: _Message) -> bool:
        """Handle one message; False ends the connection."""
        log.debug("received %s flags=0x%x size=%d fds=%d", msg.name, msg.flags,
                  len(msg.payload), len(msg.fds))
        # "Lower 2 bits are the version (currently 0x01)"; the reply bit is for
        # back-end -> front-end only.  The framing (size) is still intact, so
        # such a message is dropped, unanswered, and the connection goes on.
        if msg.flags & VERSION_MASK != VERSION:
            log.error("%s: unsupported protocol version %d (flags 0x%x); message dropped",
                      msg.name, msg.flags & VERSION_MASK, msg.flags)
            return True
        if msg.flags & FLAG_REPLY:
            log.error("%s: the front-end sent a message flagged as a reply (flags 0x%x); "
                      "message dropped", msg.name, msg.flags)
            return True
        need_reply = bool(msg.flags & FLAG_NEED_REPLY)
        has_reply = msg.request in _REPLYING
        handler = self._handlers.get(msg.request)
        reply: bytes | None = None
        ok = True
        try:
            if handler is None:
                log.warning("unsupported request %s (flags 0x%x, %d-byte payload, %d fds); "
                            "%s", msg.name, msg.flags, len(msg.payload), len(msg.fds),
                            "answering failure" if need_reply or has_reply else "ignored")
                ok = False
            else:
                reply = handler(msg)
        except _Fatal as e:
            log.error("%s: %s; closing the connection", msg.name, e)
            return False
        except _Fail as e:
            log.error("%s failed: %s", msg.name, e)
            ok = False
        except Exception:
            log.exception("%s: internal error", msg.name)
            ok = False
        if msg.fds:
            if ok:
                log.warning("%s: closing %d unexpected file descriptor(s)", msg.name,
                            len(msg.fds))
            msg.close_fds()
        if reply is not None:
            return self._send_reply(msg.request, reply)
        if has_reply or need_reply:
            # REPLY_ACK: "The payload should be set to zero on success or non-zero
            # on failure".  A request that must have a reply but could not make
            # one gets the same u64, so the front-end fails instead of hanging.
            # (Answered whether or not REPLY_ACK was negotiated: a front-end that
            # asks is waiting.)
            return self._send_reply(msg.request, U64.pack(value=0 if ok else 1))
        return True

    def _send_reply(self, request: int, payload: bytes) -> bool:
        data = HEADER.pack(request=request, flags=VERSION | FLAG_REPLY, size=len(payload)) + payload
        try:
            self._sock.sendall(data)
        except OSError as e:
            log.info("cannot reply to %s (%s); front-end gone", _req_name(request), e)
            return False
        return True

    def _teardown(self) -> None:
        for v in self.vrings:
            v._reset(self.drain_timeout)
        self.memory = GuestMemory.empty()
        self.acked_features = self.acked_protocol_features = 0
        self.owner = False
        self._device_reset()

    def _device_reset(self) -> None:
        try:
            self.device.reset()
        except Exception:
            log.exception("device reset failed")

    # -- payload helpers -------------------------------------------------------------
    @staticmethod
    def _payload(msg: _Message, ws: WireStruct):
        if len(msg.payload) != ws.size:
            raise _Fail(f"payload is {len(msg.payload)} bytes, expected {ws.size}")
        return ws.unpack(msg.payload)

    @staticmethod
    def _no_payload(msg: _Message) -> None:
        if msg.payload:
            log.warning("%s: ignoring an unexpected %d-byte payload", msg.name,
                        len(msg.payload))

    def _u64(self, msg: _Message) -> int:
        return self._payload(msg, U64).value

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise _Fail(f"vring index {index} out of range (device has {len(self.vrings)} "
                        f"queues)")
        return self.vrings[index]

    def _reply_u64(self, value: int) -> bytes:
        return U64.pack(value=value)

    # -- features ----------------------------------------------------------------------
    def _get_features(self, msg: _Message) -> bytes:
        self._no_payload(msg)
        return self._reply_u64(self.offered_features)

    def _set_features(self, msg: _Message) -> None:
        features = self._u64(msg)
        extra = features & ~self.offered_features
        if extra:
            raise _Fail(f"front-end acked features 0x{extra:x} that were not offered")
        self.acked_features = features
        log.debug("virtio features acked: 0x%x", features)
        if not features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            # "Ring states": "If VHOST_USER_F_PROTOCOL_FEATURES has not been
            # negotiated, the ring starts directly in the enabled state."  (And
            # SET_FEATURES never disables a ring: it is also sent at runtime.)
            for v in self.vrings:
                v._set_enabled(True)

    def _get_protocol_features(self, msg: _Message) -> bytes:
        self._no_payload(msg)
        return self._reply_u64(self.offered_protocol_features)

    def _set_protocol_features(self, msg: _Message) -> None:
        features = self._u64(msg)
        extra = features & ~self.offered_protocol_features
        if extra:
            raise _Fail(f"front-end acked protocol features 0x{extra:x} that were not offered")
        self.acked_protocol_features = features
        log.debug("protocol features acked: %r", ProtocolFeature(features))

    def _get_queue_num(self, msg: _Message) -> bytes:
        self._no_payload(msg)
        return self._reply_u64(len(self.vrings))

    def _get_max_mem_slots(self, msg: _Message) -> bytes:
        self._no_payload(msg)
        return self._reply_u64(self.max_mem_slots)

    def _set_owner(self, msg: _Message) -> None:
        self._no_payload(msg)
        # "Issued when a new connection is established ... a session start flag."
        self.owner = True

    def _reset_owner(self, msg: _Message) -> None:
        # Deprecated; the spec recommends "either ignore this message, or use it
        # to disable all rings".  We stop and reset the rings and the device.
        self._no_payload(msg)
        self._reset_rings()

    def _reset_device(self, msg: _Message) -> None:
        # "disable all rings and reset all internal device state to the initial
        # state, ready to be reinitialized. The back-end retains ownership".
        self._no_payload(msg)
        self._reset_rings()

    def _reset_rings(self) -> None:
        # The memory table and the negotiated protocol features are kept: they
        # are connection state that QEMU does not send again (with
        # CONFIGURE_MEM_SLOTS it only sends regions that changed since the last
        # table, and protocol features only at connection set-up).
        for v in self.vrings:
            v._reset(self.drain_timeout)
        self.acked_features = 0
        self._device_reset()

    def _set_backend_req_fd(self, msg: _Message) -> None:
        # BACKEND_REQ is not offered, so no back-end channel is used: accept and
        # close the socket (the front-end may send it anyway).
        self._no_payload(msg)
        fd = msg.take_fd()
        if fd is None:
            raise _Fail("no file descriptor")
        _close(fd)

    # -- memory ------------------------------------------------------------------------
    def _swap_memory(self, new: GuestMemory) -> None:
        """Install `new`: pause running rings (waiting for in-flight chains, whose
        views point into the old mappings), swap, re-translate, resume."""
        running = [v for v in self.vrings if v.started]
        for v in running:
            v._stop(self.drain_timeout)
        self.memory = new
        log.info("guest memory: %d region(s)%s", len(new),
                 "".join(f"\n  {r.describe()}" for r in new.regions))
        for v in self.vrings:
            v._try_start(new)

    def _set_mem_table(self, msg: _Message) -> None:
        p = msg.payload
        if len(p) < MEMORY_HEADER.size:
            raise _Fail(f"payload is {len(p)} bytes, too short for a memory table")
        n = MEMORY_HEADER.unpack_from(p).nregions
        if not 1 <= n <= MAX_MEM_TABLE_REGIONS:
            raise _Fail(f"{n} memory regions (1..{MAX_MEM_TABLE_REGIONS} allowed)")
        if len(p) != MEMORY_HEADER.size + n * MEMORY_REGION.size:
            raise _Fail(f"payload is {len(p)} bytes, expected "
                        f"{MEMORY_HEADER.size + n * MEMORY_REGION.size} for {n} regions")
        if len(msg.fds) != n:
            raise _Fail(f"{len(msg.fds)} file descriptors for {n} regions")
        regions = [MemoryRegion(*MEMORY_REGION.unpack_from(p, MEMORY_HEADER.size
                                                           + i * MEMORY_REGION.size))
                   for i in range(n)]
        fds, msg.fds = msg.fds, []
        try:
            new = GuestMemory.map_regions(list(zip(regions, fds)))
        except GuestMemoryError as e:
            raise _Fail(str(e)) from None
        self._swap_memory(new)

    def _mem_reg(self, msg: _Message) -> MemoryRegion:
        return MemoryRegion(*self._payload(msg, MEM_REG_MSG).region)

    def _add_mem_reg(self, msg: _Message) -> None:
        region = self._mem_reg(msg)
        if len(msg.fds) != 1:
            raise _Fail(f"{len(msg.fds)} file descriptors (exactly one expected)")
        if len(self.memory) >= self.max_mem_slots:
            raise _Fail(f"all {self.max_mem_slots} memory slots are in use")
        fd = msg.take_fd()
        try:
            new = self.memory.with_region(region, fd)
        except GuestMemoryError as e:
            raise _Fail(str(e)) from None
        self._swap_memory(new)

    def _rem_mem_reg(self, msg: _Message) -> None:
        region = self._mem_reg(msg)
        # "If a file descriptor is passed, the back-end MUST close it without
        # using it otherwise."
        msg.close_fds()
        try:
            new = self.memory.without_region(region)
        except GuestMemoryError as e:
            raise _Fail(str(e)) from None
        self._swap_memory(new)

    # -- vrings ------------------------------------------------------------------------
    def _set_vring_num(self, msg: _Message) -> None:
        st = self._payload(msg, VRING_STATE)
        v = self._vring(st.index)
        if v.started:
            raise _Fail(f"queue {v.index} is running; stop it first")
        n = st.num
        if n == 0 or n > MAX_QUEUE_SIZE or n & (n - 1):
            raise _Fail(f"queue {v.index}: invalid size {n} (a power of two up to "
                        f"{MAX_QUEUE_SIZE})")
        v.size = n

    def _set_vring_addr(self, msg: _Message) -> None:
        a = self._payload(msg, VRING_ADDR)
        v = self._vring(a.index)
        if a.flags & VHOST_VRING_F_LOG:
            raise _Fail(f"queue {v.index}: used-ring logging requested, but dirty logging is "
                        f"not supported")
        # The addresses are front-end virtual addresses (no IOMMU), translated
        # through the memory table when the ring starts ("Memory access").
        # QEMU sends the table first, so check them now when we can.
        if len(self.memory):
            n = v.size or 1
            for what, uva, length in (("descriptor table", a.desc_user_addr, 16 * n),
                                      ("available ring", a.avail_user_addr, 4 + 2 * n),
                                      ("used ring", a.used_user_addr, 4 + 8 * n)):
                try:
                    self.memory.uva_to_gpa(uva, length)
                except GuestMemoryError:
                    raise _Fail(f"queue {v.index}: {what} address 0x{uva:x} (+{length}) is "
                                f"not in guest memory") from None
        running = v.started
        if running:  # e.g. re-sent at runtime: pause, update, resume
            v._stop(self.drain_timeout)
        v.desc_uva, v.used_uva, v.avail_uva = (a.desc_user_addr, a.used_user_addr,
                                               a.avail_user_addr)
        v._try_start(self.memory)

    def _set_vring_base(self, msg: _Message) -> None:
        st = self._payload(msg, VRING_STATE)
        v = self._vring(st.index)
        if v.started:
            raise _Fail(f"queue {v.index} is running; stop it first")
        if st.num > 0xFFFF:
            raise _Fail(f"queue {v.index}: base {st.num} does not fit a 16-bit ring index")
        v.base = st.num

    def _get_vring_base(self, msg: _Message) -> bytes:
        # On a bad index or size the generic failure reply (u64 1) goes out:
        # same size as a vring state, and the error is in the log.
        st = self._payload(msg, VRING_STATE)
        v = self._vring(st.index)
        # "stop ring upon receiving VHOST_USER_GET_VRING_BASE"
        v._stop(self.drain_timeout)
        v.kick_received = False
        if v.broken:
            log.info("queue %d: stopped; clearing its broken state", v.index)
            v.broken = None
        return VRING_STATE.pack(index=v.index, num=v.base)

    def _vring_file(self, msg: _Message) -> tuple[Vring, int | None]:
        value = self._u64(msg)
        if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise _Fail(f"reserved bits set in 0x{value:x}")
        v = self._vring(value & VRING_IDX_MASK)
        nofd = bool(value & VRING_NOFD_MASK)
        if nofd:
            if msg.fds:
                raise _Fail(f"queue {v.index}: invalid-FD flag set but a file descriptor "
                            f"was passed")
            return v, None
        if len(msg.fds) != 1:
            raise _Fail(f"queue {v.index}: {len(msg.fds)} file descriptors (one expected)")
        return v, msg.take_fd()

    def _set_vring_kick(self, msg: _Message) -> None:
        v, fd = self._vring_file(msg)
        if v.started:
            v._stop(self.drain_timeout)
        if fd is None:
            log.warning("queue %d: no kick fd; polling the ring", v.index)
        v._set_fd("kick_fd", fd)
        # "The back-end must start ring upon receiving a kick"
        v.kick_received = True
        v._try_start(self.memory)

    def _set_vring_call(self, msg: _Message) -> None:
        v, fd = self._vring_file(msg)
        v._set_fd("call_fd", fd)   # may change while the ring runs (irqfd masking)

    def _set_vring_err(self, msg: _Message) -> None:
        v, fd = self._vring_file(msg)
        v._set_fd("err_fd", fd)

    def _set_vring_enable(self, msg: _Message) -> None:
        st = self._payload(msg, VRING_STATE)
        v = self._vring(st.index)
        if st.num not in (0, 1):
            raise _Fail(f"queue {v.index}: enable value {st.num} is not 0 or 1")
        log.debug("queue %d: %s", v.index, "enabled" if st.num else "disabled")
        v._set_enabled(bool(st.num))


# ---------------------------------------------------------------------------
# Socket helpers
# ---------------------------------------------------------------------------


def listen_unix(path: str | os.PathLike) -> socket.socket:
    """A listening AF_UNIX stream socket at `path`, mode 0600 (backlog 1).

    A stale socket left by an earlier run is removed first; any other kind of
    file at `path` is an error (FileExistsError) rather than silently deleted.
    """
    path = os.fspath(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # A socket file is created with mode 0777 & ~umask: 0o177 gives 0600,
        # so only our user may connect (and there is no window before a chmod).
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        sock.listen(1)
    except BaseException:
        sock.close()
        raise
    return sock


def accept_one(listen_sock: socket.socket) -> socket.socket:
    """Wait for one front-end connection and return it."""
    while True:
        try:
            conn, _ = listen_sock.accept()
            break
        except InterruptedError:
            continue
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        log.info("front-end connected (pid %d, uid %d, gid %d)", pid, uid, gid)
    except OSError:
        log.info("front-end connected")
    return conn
