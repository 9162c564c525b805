"""Closing fds that requests on other threads may still be using, once they cannot be.

When vfsd closes the O_PATH fd of a node the guest still holds (to stay under its fd
budget, vfsd/passthrough.py), another thread may be in the middle of a request that read
the node's fd number a moment before: a pool thread between `parent.fd` and its unlinkat,
the readahead thread between two lookups.  Closed at once, the number could be reused by
the next open(2), and that request would then act on whatever got it.  So such fds are
retired here and closed only after every thread that was in a request when they were
retired has finished that request (quiescent-state-based reclamation): a request begun
later reads the node's fd afresh and no longer finds the old number.

Each request is bracketed by `enter` and `leave` on the thread serving it (FuseServer
does that for every request, and for each READDIRPLUS batch made ahead).  A thread that
never entered counts as idle.  The thread that finds fds closable closes them itself,
at once: they are O_PATH fds of inodes that (but for a rare unlink since) have a name, a
fraction of a µs each, and the point of closing them is that the fd limit is near; a
hand-over to the closer's thread (vfsd/closer.py) would keep them open for as long as the
request threads keep the GIL from it.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import threading

log = logging.getLogger(__name__)

_IDLE = sys.maxsize


class _Slot:
    """One thread's: the epoch its current request began in, or IDLE."""

    __slots__ = ("epoch",)

    def __init__(self):
        self.epoch = _IDLE


class DeferredClose:
    """Retired fds, each batch stamped with the epoch it was retired in.

    `enter` and `leave` bracket a request.  The per-request path may do what
    they do inline (FuseServer.handle_views): take the thread's slot
    (`local.slot`, or `new_slot()` the first time), set its `epoch` to
    `epoch`, and at the end to IDLE, then `reclaim()` if `retired` holds
    anything.  (A thread-local slot costs half of a dict keyed by
    threading.get_ident; this runs on every request.)"""

    IDLE = _IDLE

    def __init__(self):
        self.epoch = 0
        self.local = threading.local()
        self._slots: list[_Slot] = []
        self.retired: collections.deque[tuple[int, list[int]]] = collections.deque()
        self._lock = threading.Lock()

    def new_slot(self) -> _Slot:
        """This thread's slot, made and registered (idle)."""
        slot = self.local.slot = _Slot()
        with self._lock:
            self._slots.append(slot)
        return slot

    def enter(self) -> None:
        try:
            slot = self.local.slot
        except AttributeError:
            slot = self.new_slot()
        slot.epoch = self.epoch

    def leave(self) -> None:
        self.local.slot.epoch = _IDLE
        if self.retired:
            self.reclaim()

    def retire(self, fds: list[int]) -> None:
        """Close `fds` once no request that began before this call is still running.
        The caller has already made them unreachable for requests beginning after it."""
        if not fds:
            return
        with self._lock:
            self.retired.append((self.epoch, fds))
            self.epoch += 1
            bracketed = bool(self._slots)
        if not bracketed:  # no request has ever been bracketed (an embedding, a test)
            self.reclaim()

    def close_all(self) -> None:
        """Close every retired fd now: only when no request can be running."""
        with self._lock:
            ready = [fd for _, fds in self.retired for fd in fds]
            self.retired.clear()
        _close(ready)

    @property
    def pending(self) -> int:
        """How many retired fds are still open."""
        with self._lock:
            return sum(len(fds) for _, fds in self.retired)

    def reclaim(self) -> None:
        """Close the retired fds no running request can hold."""
        with self._lock:
            # A request that entered in epoch e read node fds after every batch
            # stamped below e was made unreachable; one stamped e or later may
            # have been read by it.  (A dead thread's slot stays, idle: threads
            # that serve requests are few and long-lived.)
            oldest = min((slot.epoch for slot in self._slots), default=_IDLE)
            ready: list[int] = []
            while self.retired and self.retired[0][0] < oldest:
                ready += self.retired.popleft()[1]
        _close(ready)


def _close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError as e:  # EBADF would be a bookkeeping bug of ours
            log.error("closing fd %d of an evicted node failed: %s", fd, e)
