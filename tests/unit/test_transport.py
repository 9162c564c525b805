"""VirtioFsDevice: what it tells the ring layer, and what it hands the FUSE server."""

from __future__ import annotations

import struct
import threading

import pytest

from protocol.fuse import Opcode
from protocol.virtqueue import DescriptorChain
from vfsd.transport import HIPRIO_QUEUE, POOLED, VirtioFsDevice


class Server:
    def __init__(self):
        self.calls = []

    def handle_views(self, readable, writable, readable_len, writable_len):
        self.calls.append((readable_len, writable_len, threading.current_thread()))
        data = b"".join(readable)
        n = min(len(data), writable_len)
        pos = 0
        for w in writable:
            k = min(len(w), n - pos)
            w[:k] = data[pos:pos + k]
            pos += k
        return n

    def reset(self):
        pass


class Vring:
    def __init__(self, index):
        self.index = index
        self.done = threading.Event()
        self.completed = []

    def complete(self, chain, written):
        self.completed.append((chain.head, written))
        self.done.set()


def chain(data: bytes, wsize: int) -> tuple[DescriptorChain, bytearray]:
    out = bytearray(wsize)
    views = [memoryview(data[:3]), memoryview(data[3:])]
    return DescriptorChain(5, views, [memoryview(out)], len(data), wsize), out


def test_inline_without_a_pool():
    srv = Server()
    dev = VirtioFsDevice(srv)
    assert dev.completes_async is False  # the ring may skip in-flight bookkeeping
    c, out = chain(b"request", 4)
    assert dev.handle_chain(Vring(1), c) == 4
    assert out == b"requ"
    assert srv.calls[0][:2] == (7, 4)


def request(opcode: int, size: int = 64) -> bytes:
    """A fuse_in_header (len, opcode, ...) and zeros: what the transport peeks at."""
    return struct.pack("<II", size, opcode).ljust(size, b"\0")


def fuse_chain(opcode: int, wsize: int = 16, head_size: int = 40):
    data = request(opcode)
    out = bytearray(wsize)
    views = [memoryview(data[:head_size]), memoryview(data[head_size:])]
    return DescriptorChain(5, views, [memoryview(out)], len(data), wsize), out


@pytest.mark.parametrize("opcode", sorted(POOLED))
def test_the_pool_takes_what_may_wait_on_the_disk(opcode):
    srv = Server()
    dev = VirtioFsDevice(srv, thread_pool_size=2)
    try:
        assert dev.completes_async is True
        c, out = fuse_chain(opcode)
        v = Vring(1)
        assert dev.handle_chain(v, c) is None
        assert v.done.wait(3)
        assert v.completed == [(5, 16)] and out == request(opcode)[:16]
        assert srv.calls[0][2] is not threading.current_thread()
    finally:
        dev._pool.shutdown(wait=True)


@pytest.mark.parametrize("opcode, queue, head_size", [
    (Opcode.GETATTR, 1, 40), (Opcode.LOOKUP, 1, 40), (Opcode.READDIRPLUS, 2, 40),
    (Opcode.SETXATTR, 1, 40),
    (Opcode.FORGET, HIPRIO_QUEUE, 40),
    (Opcode.READ, HIPRIO_QUEUE, 40),   # the hiprio queue is always served inline
    (Opcode.READ, 1, 6),               # no opcode in the first buffer: the server judges it
])
def test_the_rest_is_answered_inline_even_with_a_pool(opcode, queue, head_size):
    srv = Server()
    dev = VirtioFsDevice(srv, thread_pool_size=2)
    try:
        c, out = fuse_chain(opcode, head_size=head_size)
        assert dev.handle_chain(Vring(queue), c) == 16
        assert srv.calls[0][2] is threading.current_thread()
    finally:
        dev._pool.shutdown(wait=True)
