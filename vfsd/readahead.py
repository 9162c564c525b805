"""READDIRPLUS readahead: the next batch of a listing, made while the guest reads the last.

A READDIRPLUS reply looks every entry it carries up: an open and an fstat each, and the
Python around them, ~20 µs an entry on these machines, so ~0.5 ms for the ~25 entries of a
4 KiB reply (docs/performance.md), all of it while the guest waits.  Between two
READDIRPLUS of one listing the guest then spends longer than that linking the entries into
its dcache and handing them to its reader, while the daemon has nothing to do.  So after a
reply that filled its buffer (the listing goes on), the batch the guest will ask for next
(same node and handle, the offset where this one ended, the same size) is made on a thread
of its own, and the next READDIRPLUS of the handle takes it if it is still what that request
would have been answered:

- no request that may change the share was answered since the batch was started (`mark`,
  which the server moves after each such request, before its reply): the guest saw that
  reply before it asked again, so a batch made earlier must not hide the change from it
  (a name it unlinked, a size it changed);
- the batch is at most `max_age` seconds old.  Changes made on the host are not ordered
  with the guest's requests, and a batch that waited a small part of the attribute
  timeout is as current as what the guest caches from it for that timeout anyway;
- the request is the one the batch was made for.

Any request of the handle takes its batch out, used or not.  A batch that is not used is
dropped, and so are the lookups it made (`forget`): the guest never got those entries, so it
will never FORGET them.

Only a reader seen to read quietly gets readahead: one that sent no change between its last
two READDIRPLUS of the handle (so never the first batch after the one at offset 0).  A reader
that changes the directory as it goes (`chown -R`, `rm -r`: each entry as it is read) would
spoil every batch, and worse, each of its requests would wait for the batch's thread at
every switch of the GIL while the batch is being made.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

log = logging.getLogger(__name__)

#: make(ctx, nodeid, fh, offset, room, nodes, mark) -> (reply, next offset or None at the
#: end); appends the node id of each entry it looks up to `nodes`, also when it raises.
#: With a mark (a batch made ahead) it raises Spoiled once the change mark is another.
MakeBatch = Callable[[object, int, int, int, int, list, "int | None"],
                     tuple[bytes, "int | None"]]


class Spoiled(Exception):
    """A change was answered while the batch was being made: it would only be dropped,
    and stopping at once gives the GIL back to the requests."""


class _Batch:
    __slots__ = ("request", "mark", "born", "done", "reply", "next_offset", "nodes")

    def __init__(self, request: tuple[int, int, int, int], mark: int):
        self.request = request  # (nodeid, fh, offset, room)
        self.mark = mark
        self.born = time.monotonic()  # before its first lookup: the age of its oldest part
        self.done = threading.Event()
        self.reply: bytes | None = None  # None: making it failed or stopped
        self.next_offset: int | None = None
        self.nodes: list[int] = []


class ReaddirplusReadahead:
    """Answers READDIRPLUS, with the batch made ahead where it may; see the module."""

    def __init__(self, make: MakeBatch, forget: Callable[[list[int]], None],
                 mark: Callable[[], int], max_age: float, make_ahead: MakeBatch | None = None):
        """`make_ahead`: `make` as called on the readahead's own thread, if that
        needs anything more than a call from a request does."""
        self._make = make
        self._make_ahead = make_ahead or make
        self._forget = forget
        self._mark = mark
        self.max_age = max_age
        self._lock = threading.Lock()
        self._batches: dict[int, _Batch] = {}  # by fh: at most one per handle
        self._last_mark: dict[int, int] = {}  # by fh: the mark after its last reply
        self._pool: ThreadPoolExecutor | None = None
        self.making = 0  # batches being made now (on the readahead thread)
        # this session's figures, logged when it ends: replies made ahead, used, and
        # dropped by reason
        self.made = self.used = 0
        self.dropped: collections.Counter[str] = collections.Counter()

    def reply(self, ctx, nodeid: int, fh: int, offset: int, room: int) -> bytes:
        """The READDIRPLUS reply for (fh, offset, room): the batch made ahead if it fits
        the rules, else one made now; and the next batch begun if the reader is quiet."""
        mark = self._mark()
        quiet = self._last_mark.get(fh) == mark
        made = self._take(nodeid, fh, offset, room, mark)
        out, next_offset = made or self._make(ctx, nodeid, fh, offset, room, [], None)
        # (the guest serializes the READDIRPLUS of a handle: no lock needed for its entry)
        self._last_mark[fh] = self._mark()
        if quiet and next_offset is not None:
            self._start(ctx, nodeid, fh, next_offset, room)
        return out

    def _start(self, ctx, nodeid: int, fh: int, offset: int, room: int) -> None:
        with self._lock:
            if fh in self._batches:
                return
            batch = _Batch((nodeid, fh, offset, room), self._mark())
            self._batches[fh] = batch
            self.made += 1
            self.making += 1
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="vfsd-readahead")
            pool = self._pool
        try:
            pool.submit(self._run, ctx, batch)
        except RuntimeError:  # the interpreter is shutting down: no batch
            self._made(batch)

    def _run(self, ctx, batch: _Batch) -> None:
        nodeid, fh, offset, room = batch.request
        try:
            batch.reply, batch.next_offset = self._make_ahead(ctx, nodeid, fh, offset, room,
                                                              batch.nodes, batch.mark)
        except Spoiled:
            pass
        except Exception as e:  # the request itself will meet (and report) it
            log.debug("READDIRPLUS fh=%d offset=%d: making a batch ahead failed: %s", fh,
                      offset, e)
        finally:
            self._made(batch)

    def _made(self, batch: _Batch) -> None:
        with self._lock:
            self.making -= 1
        batch.done.set()

    def _take(self, nodeid: int, fh: int, offset: int, room: int, mark: int
              ) -> tuple[bytes, int | None] | None:
        """The reply (and next offset) made ahead for this request, its lookups now the
        guest's; None if there is none fit to send (then it is dropped)."""
        with self._lock:
            batch = self._batches.pop(fh, None)
        if batch is None:
            return None
        batch.done.wait()
        if batch.mark != mark:
            why = "a change"
        elif batch.reply is None:
            why = "making it failed"
        elif batch.request != (nodeid, fh, offset, room):
            why = "another request"
        elif time.monotonic() - batch.born > self.max_age:
            why = "too old"
        else:
            log.debug("READDIRPLUS fh=%d offset=%d: batch made ahead used", fh, offset)
            self.used += 1
            return batch.reply, batch.next_offset
        self._drop(batch, why)
        return None

    def drop(self, fh: int) -> None:
        """The handle is released or read another way: drop its batch."""
        with self._lock:
            batch = self._batches.pop(fh, None)
            self._last_mark.pop(fh, None)  # the number may name another handle next
        if batch is not None:
            self._drop(batch, "the listing ended")

    def drop_all(self) -> None:
        """The session ends: drop every batch (before the filesystem forgets its nodes)."""
        with self._lock:
            batches, self._batches = list(self._batches.values()), {}
            self._last_mark.clear()
        for batch in batches:
            self._drop(batch, "the session ended")
        if self.made:
            log.info("READDIRPLUS readahead this session: %d replies made ahead, %d used, "
                     "%d dropped (%s)", self.made, self.used, sum(self.dropped.values()),
                     ", ".join(f"{why}: {n}" for why, n in self.dropped.most_common())
                     or "none")
        self.made = self.used = 0
        self.dropped.clear()

    def _drop(self, batch: _Batch, why: str) -> None:
        batch.done.wait()  # (a batch still being made may look up more)
        # (the operator's view of how well readahead does: bench guest
        # --count-requests counts these lines per phase)
        log.debug("READDIRPLUS fh=%d offset=%d: batch made ahead dropped: %s", batch.request[1],
                  batch.request[2], why)
        self.dropped[why] += 1
        if batch.nodes:
            self._forget(batch.nodes)
