"""VirtioFsDevice: what it tells the ring layer, and what it hands the FUSE server."""

from __future__ import annotations

import threading

from protocol.virtqueue import DescriptorChain
from vfsd.transport import HIPRIO_QUEUE, VirtioFsDevice


class Server:
    def __init__(self):
        self.calls = []

    def handle(self, reader, writer):
        self.calls.append((reader.remaining, writer.capacity, threading.current_thread()))
        data = reader.read(reader.remaining)
        writer.write(data[:writer.capacity])
        return min(len(data), writer.capacity)

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


def test_pool_completes_later_except_on_the_hiprio_queue():
    srv = Server()
    dev = VirtioFsDevice(srv, thread_pool_size=2)
    try:
        assert dev.completes_async is True
        c, out = chain(b"pooled", 16)
        v = Vring(1)
        assert dev.handle_chain(v, c) is None
        assert v.done.wait(3)
        assert v.completed == [(5, 6)] and out[:6] == b"pooled"
        c, _ = chain(b"forget", 0)
        assert dev.handle_chain(Vring(HIPRIO_QUEUE), c) == 0  # inline
        assert srv.calls[-1][2] is threading.current_thread()
    finally:
        dev._pool.shutdown(wait=True)
