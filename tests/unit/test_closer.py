"""FdCloser: the fds of forgotten nodes are closed on its thread, in order, none lost."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from tests.fds import is_open
from vfsd import closer as closer_mod
from vfsd.closer import FdCloser
from vfsd.fsapi import Ctx
from vfsd.passthrough import PassthroughFs


def pipes(n: int) -> list[int]:
    fds = []
    for _ in range(n):
        fds += os.pipe()
    return fds


def test_fds_are_closed_on_the_closers_thread(monkeypatch):
    closed_by = []
    real_close = os.close

    def close(fd):
        closed_by.append((fd, threading.current_thread().name))
        real_close(fd)

    monkeypatch.setattr(closer_mod.os, "close", close)
    c = FdCloser(name="test-closer")
    fds = pipes(3)
    c.close_later(fds)
    c.drain()
    assert closed_by == [(fd, "test-closer") for fd in fds]   # in order, not on this thread
    assert not any(map(is_open, fds))


def test_nothing_handed_over_starts_no_thread():
    c = FdCloser(name="never-started")
    c.close_later([])
    assert not c._running
    assert "never-started" not in [t.name for t in threading.enumerate()]


def test_idle_thread_ends_and_the_next_hand_over_starts_another(monkeypatch):
    monkeypatch.setattr(closer_mod, "IDLE_SECONDS", 0.05)
    c = FdCloser(name="idle-closer")
    c.close_later(pipes(1))
    c.drain()
    for t in [t for t in threading.enumerate() if t.name == "idle-closer"]:
        t.join(5)
    assert not c._running
    assert "idle-closer" not in [t.name for t in threading.enumerate()]
    fds = pipes(1)
    c.close_later(fds)
    c.drain()
    assert not any(map(is_open, fds))


def test_a_failed_close_is_logged_and_the_rest_still_closed(caplog):
    c = FdCloser()
    r, w = os.pipe()
    os.close(r)                       # a number that is no longer open: EBADF
    with caplog.at_level(logging.ERROR, logger="vfsd.closer"):
        c.close_later([r, w])
        c.drain()
    assert not is_open(w)
    assert f"closing fd {r} of a forgotten node failed" in caplog.text


def test_hand_overs_racing_the_idle_exit_lose_nothing(monkeypatch):
    # The thread ends when idle while hand-overs keep arriving from several
    # threads: every fd must still be closed, by one thread at a time.
    monkeypatch.setattr(closer_mod, "IDLE_SECONDS", 0.0005)
    c = FdCloser()
    handed: list[int] = []
    lock = threading.Lock()

    def producer():
        for i in range(200):
            fds = pipes(1)
            with lock:
                handed.extend(fds)
            c.close_later(fds)
            if i % 50 == 0:
                threading.Event().wait(0.002)   # let the thread go idle now and then

    threads = [threading.Thread(target=producer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(handed) == 1600
    # No drain(): it would start a thread for an item stranded by a lost race.
    deadline = time.monotonic() + 10
    while any(map(is_open, handed)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [fd for fd in handed if is_open(fd)] == []


def test_an_item_put_as_the_idle_wait_times_out_is_still_served(monkeypatch):
    # The race of test_hand_overs_racing_the_idle_exit_lose_nothing, made certain:
    # the wait times out although a hand-over has just put its fds.
    c = FdCloser()
    real = c._queue
    timed_out = []

    class LateQueue:
        def put(self, item):
            real.put(item)

        def empty(self):
            return real.empty()

        def get(self, timeout=None):
            if not timed_out:
                timed_out.append(True)
                raise closer_mod.queue.Empty
            return real.get(timeout=timeout)

    c._queue = LateQueue()
    fds = pipes(1)
    c.close_later(fds)
    deadline = time.monotonic() + 10
    while any(map(is_open, fds)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert timed_out and not any(map(is_open, fds))


@pytest.fixture
def fs(tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    f = PassthroughFs(str(share))
    yield f
    f.close()


def test_forget_of_an_unlinked_file_frees_it_off_the_callers_thread(fs, tmp_path, monkeypatch):
    ctx = Ctx(0, 0, 1)
    (tmp_path / "share" / "gone").write_bytes(b"x" * 8192)
    e = fs.lookup(ctx, 1, b"gone")
    fd = fs._inode(e.nodeid).fd
    fs.unlink(ctx, 1, b"gone")
    closing_threads = []
    real_close = os.close

    def close(n):
        if n == fd:
            closing_threads.append(threading.current_thread().name)
        real_close(n)

    monkeypatch.setattr(closer_mod.os, "close", close)
    fs.forget(e.nodeid, 1)
    fs.closer.drain()
    assert closing_threads == ["vfsd-closer"]
    assert not is_open(fd)
