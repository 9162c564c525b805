"""Cursors over scatter-gather buffers (the descriptor chain of one request).

A request arrives as a list of device-readable `memoryview`s and leaves as a
list of device-writable ones; a virtio driver may cut them anywhere, so a
header can straddle two descriptors.  `Reader` and `Writer` hide that: small
headers are copied, bulk data is handed out as zero-copy views for
`os.preadv`/`os.pwritev`.
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate, islice
from typing import Sequence


class BufferError_(ValueError):
    """A request asked for more bytes than its buffers hold."""


def _take(views: Sequence[memoryview], index: int, offset: int, n: int
          ) -> tuple[list[memoryview], int, int]:
    """Slice `n` bytes starting at (index, offset); returns views and new position."""
    out: list[memoryview] = []
    if offset == 0 and n > 0:
        # Whole buffers first, found without a Python loop: bulk data is page
        # after page (Linux gives each page of a READ or WRITE a descriptor
        # of its own), up to 256 of them.
        ends = list(accumulate(map(len, islice(views, index, None))))
        whole = bisect_right(ends, n)
        if whole:
            out = list(islice(views, index, index + whole))  # (empty ones do no harm)
            index += whole
            n -= ends[whole - 1]
    while n > 0:
        if index >= len(views):
            raise BufferError_("buffer exhausted")
        v = views[index]
        avail = len(v) - offset
        if avail <= 0:
            index, offset = index + 1, 0
            continue
        k = min(avail, n)
        out.append(v[offset:offset + k])
        n -= k
        offset += k
        if offset == len(v):
            index, offset = index + 1, 0
    return out, index, offset


class Reader:
    """Consumes device-readable buffers front to back."""

    __slots__ = ("_views", "_index", "_offset", "remaining")

    def __init__(self, views: Sequence[memoryview], limit: int | None = None,
                 total: int | None = None):
        # Views are byte views (memoryview of guest memory or of bytes): len()
        # counts bytes.  `total`, if given, is their summed length (a
        # descriptor chain knows it already).
        self._views = views
        self._index = 0
        self._offset = 0
        if total is None:
            total = sum(map(len, views))
        self.remaining = total if limit is None else min(total, limit)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Reader":
        return cls([memoryview(data)])

    def limit(self, n: int) -> None:
        """Never hand out more than `n` further bytes (the request's own length)."""
        if n < self.remaining:  # (min(remaining, max(n, 0)) without two calls)
            self.remaining = n if n > 0 else 0

    def take_tail(self, n: int) -> bytes:
        """Copy the last `n` of the remaining bytes and stop short of them (for
        trailers such as FUSE extension headers that follow the arguments)."""
        if n > self.remaining:
            raise BufferError_(f"wanted a {n}-byte tail, {self.remaining} left")
        start = self.remaining - n  # offset of the tail from the cursor
        index, offset = self._index, self._offset
        skip, index, offset = _take(self._views, index, offset, start)
        tail, _, _ = _take(self._views, index, offset, n)
        self.remaining -= n
        return b"".join(tail)

    def views(self, n: int) -> list[memoryview]:
        """The next `n` bytes as zero-copy views."""
        if n > self.remaining:
            raise BufferError_(f"wanted {n} bytes, {self.remaining} left")
        out, self._index, self._offset = _take(self._views, self._index, self._offset, n)
        self.remaining -= n
        return out

    def read(self, n: int) -> bytes:
        """The next `n` bytes, copied (for headers and names)."""
        # Fast path: the bytes sit in the current buffer (the usual case; Linux
        # gives the header and each argument a buffer of its own, so they often
        # fill it exactly).
        views = self._views
        index = self._index
        if n <= self.remaining and index < len(views):
            v, off = views[index], self._offset
            end = off + n
            size = len(v)
            if end < size:
                self._offset = end
                self.remaining -= n
                return bytes(v[off:end])
            if end == size:  # the rest of this buffer: the next read starts on the next
                self._index, self._offset = index + 1, 0
                self.remaining -= n
                return bytes(v[off:] if off else v)
        parts = self.views(n)
        return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)

    def read_rest(self) -> bytes:
        return self.read(self.remaining)


class Writer:
    """Fills device-writable buffers front to back and counts what it wrote."""

    __slots__ = ("_views", "_index", "_offset", "capacity", "written")

    def __init__(self, views: Sequence[memoryview], capacity: int | None = None):
        self._views = views  # byte views, as for Reader
        self._index = 0
        self._offset = 0
        # `capacity`, if given, is the views' summed length (as Reader's `total`)
        self.capacity = sum(map(len, views)) if capacity is None else capacity
        self.written = 0

    @property
    def room(self) -> int:
        return self.capacity - self.written

    def views(self, n: int) -> list[memoryview]:
        """Reserve the next `n` bytes and return them as views to fill in place."""
        if n > self.capacity - self.written:
            raise BufferError_(f"reply of {n} bytes does not fit in {self.room}")
        views = self._views
        index = self._index
        if index < len(views):  # fast path: inside the current buffer
            v, off = views[index], self._offset
            end = off + n
            size = len(v)
            if end < size:
                self._offset = end
                self.written += n
                return [v[off:end]]
            if end == size:  # the rest of this buffer (Linux gives the reply
                # header and each reply argument a buffer of their own)
                self._index, self._offset = index + 1, 0
                self.written += n
                return [v[off:] if off else v]
        out, self._index, self._offset = _take(views, index, self._offset, n)
        self.written += n
        return out

    def write(self, data: bytes | bytearray | memoryview) -> None:
        views = self.views(len(data))
        if len(views) == 1:
            views[0][:] = data
            return
        pos = 0
        for v in views:
            k = len(v)
            v[:] = data[pos:pos + k]
            pos += k
