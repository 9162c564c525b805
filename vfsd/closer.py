"""Closing the fds of forgotten nodes on a thread of their own.

The last close of a host inode's fd is where the host frees an unlinked
file: ext4 truncates it, frees its blocks and journals that, tens of µs
(docs/performance.md).  A guest's `rm` sends the FORGET of each file right
after its UNLINK, and the ring worker serves the hiprio queue first, so a
close done there sits in front of the guest's next request.  The C virtiofsd
serves FORGETs on the hiprio queue's own thread, beside the request queue's;
vfsd keeps one ring worker (the GIL makes more of them contend) and hands
the closing to this thread instead: `os.close` releases the GIL, so the
host's work overlaps with the next request.

The thread starts on the first hand-over and ends after a few idle seconds,
so a filesystem object never left behind by its user keeps a thread alive.
"""

from __future__ import annotations

import logging
import os
import queue
import threading

log = logging.getLogger(__name__)

#: Seconds without work after which the thread ends (the next hand-over starts another).
IDLE_SECONDS = 5.0


class FdCloser:
    """Closes the fds handed to `close_later`, in order, on one thread."""

    def __init__(self, name: str = "vfsd-closer"):
        self.name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # lists of fds, or Events
        self._lock = threading.Lock()
        self._running = False

    def close_later(self, fds: list[int]) -> None:
        """Close `fds` soon; the caller must not use them any more."""
        if not fds:
            return
        self._queue.put(fds)
        if not self._running:
            self._start()

    def drain(self) -> None:
        """Return once every fd handed over so far is closed."""
        done = threading.Event()
        self._queue.put(done)
        if not self._running:
            self._start()
        done.wait()

    def _start(self) -> None:
        with self._lock:
            if self._running:
                return
            self._running = True
        threading.Thread(target=self._run, name=self.name, daemon=True).start()

    def _run(self) -> None:
        get, close = self._queue.get, os.close
        while True:
            try:
                item = get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    # A hand-over puts, then reads _running: one that read True
                    # put before this check, which then sees its item; one that
                    # reads False starts the next thread once this one is done
                    # (never two consuming: `drain` relies on the order).
                    self._running = False
                    if self._queue.empty():
                        return
                    self._running = True
                continue
            if isinstance(item, threading.Event):
                item.set()
                continue
            for fd in item:
                try:
                    close(fd)
                except OSError as e:  # EBADF would be a bookkeeping bug of ours
                    log.error("closing fd %d of a forgotten node failed: %s", fd, e)
