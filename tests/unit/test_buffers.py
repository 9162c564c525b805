"""Reader and Writer over scatter-gather views: straddling, exact fits, limits."""

from __future__ import annotations

import pytest

from protocol.buffers import BufferError_, Reader, Writer


def mv(*parts: bytes) -> list[memoryview]:
    return [memoryview(bytearray(p)) for p in parts]


def test_read_within_across_and_exactly_filling_buffers():
    r = Reader(mv(b"0123456789", b"abcd", b"XY"))
    assert r.remaining == 16
    assert r.read(3) == b"012"
    assert r.read(7) == b"3456789"  # exactly the rest of the first buffer
    assert (r._index, r._offset) == (1, 0)
    assert r.read(4) == b"abcd"     # exactly the whole second buffer
    assert r.read(2) == b"XY"
    assert r.remaining == 0
    with pytest.raises(BufferError_):
        r.read(1)


def test_read_straddling_and_views():
    r = Reader(mv(b"ab", b"cd", b"ef"))
    assert r.read(3) == b"abc"
    assert [bytes(v) for v in r.views(3)] == [b"d", b"ef"]
    assert r.read(0) == b""


def test_limit_and_take_tail():
    r = Reader(mv(b"header", b"args+tail"))
    r.limit(100)
    assert r.remaining == 15  # a larger limit changes nothing
    r.limit(13)
    assert r.remaining == 13
    assert r.take_tail(3) == b"+ta"
    assert r.read_rest() == b"headerargs"
    r.limit(-5)
    assert r.remaining == 0


def test_known_total():
    views = mv(b"abc", b"de")
    assert Reader(views, None, 5).remaining == 5
    assert Reader(views, 4, 5).remaining == 4
    assert Writer(views, 5).capacity == 5


def test_writer_exact_fits_and_straddles():
    a, b, c = bytearray(16), bytearray(8), bytearray(4)
    w = Writer([memoryview(a), memoryview(b), memoryview(c)])
    assert w.capacity == 28 and w.room == 28
    (hdr,) = w.views(16)          # exactly the first buffer (a reply header)
    assert len(hdr) == 16 and (w._index, w._offset) == (1, 0)
    w.write(b"12345678")          # exactly the second
    w.write(b"ab")
    w.write(b"cd")                # the rest of the third
    assert w.written == 28 and w.room == 0
    hdr[:2] = b"OK"
    assert a[:2] == b"OK" and b == b"12345678" and c == b"abcd"
    with pytest.raises(BufferError_):
        w.views(1)


def test_writer_write_across_buffers():
    a, b = bytearray(3), bytearray(5)
    w = Writer([memoryview(a), memoryview(b)])
    w.write(b"x")
    w.write(memoryview(b"yzuvw"))
    assert a == b"xyz" and b == b"uvw\0\0" and w.written == 6
    with pytest.raises(BufferError_):
        w.write(b"123")


def test_views_of_whole_pages_are_the_buffers_themselves():
    # A WRITE's data: page after page, each a buffer of its own; the views handed
    # out are those buffers (no copies, no new slices), then a part of the next.
    pages = mv(b"h" * 8, *(bytes([65 + i]) * 4096 for i in range(5)), b"tail")
    r = Reader(pages)
    assert r.read(8) == b"h" * 8
    got = r.views(3 * 4096 + 100)
    assert got[:3] == pages[1:4] and all(g is p for g, p in zip(got, pages[1:4]))
    assert bytes(got[3]) == b"D" * 100 and (r._index, r._offset) == (4, 100)
    assert [bytes(v) for v in r.views(3996 + 4096 + 4)] == [b"D" * 3996, b"E" * 4096, b"tail"]
    assert r.remaining == 0


def test_views_over_empty_buffers_and_past_the_end():
    r = Reader(mv(b"ab", b"", b"cd", b""), limit=None)
    assert b"".join(map(bytes, r.views(4))) == b"abcd"
    r = Reader(mv(b"ab", b"cd"), None, 10)   # a total that lies about the buffers
    with pytest.raises(BufferError_):
        r.views(5)
