"""Device life cycle as QEMU drives it: guest reboot (rings stopped with
GET_VRING_BASE, restarted fresh, FUSE INIT again), RESET_DEVICE, and
restarting a ring where it stopped (migration-style)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from protocol import fuse

from tests.frontend import Frontend, ProtocolFeature, Req
from tests.fuse_client import FuseClient


def stop_all(fe: Frontend) -> dict[int, int]:
    """vhost_dev_stop: GET_VRING_BASE on every queue (this stops the rings)."""
    bases = {}
    for i in sorted(fe.queues):
        index, num = fe.get_vring_base(i)
        assert index == i
        bases[i] = num
    return bases


def restart_fresh(fe: Frontend, n: int) -> None:
    """vhost_dev_start after a guest reset: features again, new rings at base 0."""
    fe.set_features(fe.features)
    for i in range(n):
        fe.setup_queue(i, 64, enable=False)
    for i in range(n):
        fe.set_vring_enable(i, True)


def test_guest_reboot_reinit(client, fe, daemon, shared_dir):
    e, o = client.create(1, "before")
    client.write(e.nodeid, o.fh, 0, b"one")
    client.release(e.nodeid, o.fh)
    n = len(fe.queues)
    bases = stop_all(fe)
    assert bases[1] == fe.queues[1].avail_idx
    restart_fresh(fe, n)
    c2 = FuseClient(fe, queue=1)
    out = c2.init()
    assert out.major == 7
    e2 = c2.lookup(1, "before")
    o2 = c2.open(e2.nodeid)
    assert c2.read(e2.nodeid, o2.fh, 0, 100) == b"one"
    c2.release(e2.nodeid, o2.fh)
    assert daemon.alive()
    daemon.assert_no_traceback()


def test_reboot_twice_and_disconnect(client, fe, daemon):
    n = len(fe.queues)
    for _ in range(2):
        stop_all(fe)
        restart_fresh(fe, n)
        c = FuseClient(fe, queue=1)
        c.init()
        c.getattr(1)
    fe.close()
    assert daemon.wait(5.0) == 0


def test_reset_device(client, fe, daemon):
    if not fe.protocol_features & ProtocolFeature.RESET_DEVICE:
        pytest.skip("RESET_DEVICE not negotiated")
    n = len(fe.queues)
    stop_all(fe)
    fe.request(Req.RESET_DEVICE)
    # After a reset everything is set up again, as at first start.
    # The table replaces whatever memory the back-end kept or dropped.
    fe.set_mem_table()
    restart_fresh(fe, n)
    c = FuseClient(fe, queue=1)
    c.init()
    c.getattr(1)
    daemon.assert_no_traceback()


def test_ring_resumes_where_it_stopped(client, fe, daemon):
    """Stop a ring mid-life and restart it on the same memory at the returned base
    (what QEMU does across migration or a vhost restart): nothing is replayed."""
    for _ in range(3):
        client.getattr(1)
    q = fe.queues[1]
    index, base = fe.get_vring_base(1)
    assert base == q.avail_idx == q.last_used
    # Restart the same ring (same addresses, same fds) at `base`.
    fe.set_vring_num(1, q.size)
    fe.set_vring_base(1, base)
    fe.set_vring_addr(1, fe.mem.uva(q.desc_gpa), fe.mem.uva(q.used_gpa), fe.mem.uva(q.avail_gpa))
    fe.set_vring_kick(1, q.kick_fd)
    fe.set_vring_call(1, q.call_fd)
    fe.set_vring_enable(1, True)
    for _ in range(3):
        client.getattr(1)
    assert fe.get_vring_base(1) == (1, base + 3)


def test_requests_queued_while_stopped_are_served_after_restart(client, fe, daemon):
    q = fe.queues[1]
    index, base = fe.get_vring_base(1)
    heads = [q.add([client.in_header(3, 1, 16), bytes(16)], [16, 104]) for _ in range(3)]
    q.kick()
    time.sleep(0.3)
    early = q.poll_used()
    assert not early, "a stopped ring was processed"
    fe.set_vring_num(1, q.size)
    fe.set_vring_base(1, base)
    fe.set_vring_addr(1, fe.mem.uva(q.desc_gpa), fe.mem.uva(q.used_gpa), fe.mem.uva(q.avail_gpa))
    fe.set_vring_kick(1, q.kick_fd)
    fe.set_vring_call(1, q.call_fd)
    fe.set_vring_enable(1, True)
    used = q.wait_used(5.0, count=3)
    assert sorted(u.id for u in used) == sorted(heads)


def test_kick_before_enable_is_served_on_enable(fe, daemon):
    """QEMU may kick (or the guest may queue) before SET_VRING_ENABLE arrives."""
    fe.set_vring_enable(1, False)
    c = FuseClient(fe, queue=1)
    q = fe.queues[1]
    q.add([c.in_header(fuse.Opcode.INIT, 0, 64), fuse.fuse_init_in.pack(major=7, minor=38)],
          [16, 64])
    q.kick()
    time.sleep(0.2)
    early = q.poll_used()
    fe.set_vring_enable(1, True)
    used = early or q.wait_used(5.0)
    assert len(used) == 1


def _daemon_threads(daemon) -> int:
    """Threads of the daemon's Python process (setpriv execs it; runuser may fork it)."""
    pid = daemon.impl.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    if children:
        pid = int(children[0])
    return len(os.listdir(f"/proc/{pid}/task"))


def _wait_threads(daemon, n: int) -> int:
    # (a joined thread's OS thread may take a moment to be reaped)
    deadline = time.monotonic() + 5.0
    while (count := _daemon_threads(daemon)) != n and time.monotonic() < deadline:
        time.sleep(0.01)
    return count


def test_one_thread_serves_every_ring(client, fe, daemon, shared_dir):
    """hiprio and the request queues are served by one worker thread, which is gone once
    every ring is stopped and back on restart.  Also with a thread pool (test_fuse_threadpool
    runs this again): the pool's threads stay, the rings get no thread of their own."""
    (shared_dir / "f").write_bytes(b"x")
    daemon.chown(shared_dir / "f")
    # Requests that go to the pool when there is one (the pool's threads are started
    # before the count below, and nothing after it goes to the pool).
    c, o = client.create(1, "g")
    client.write(c.nodeid, o.fh, 0, b"pooled")
    client.release(c.nodeid, o.fh)
    e = client.lookup(1, "f")
    client.forget(e.nodeid)   # on hiprio
    client.getattr(1)
    n = len(fe.queues)
    assert n >= 2
    running = _daemon_threads(daemon)
    stop_all(fe)
    assert _wait_threads(daemon, running - 1) == running - 1, \
        f"{n} rings stopped, expected one thread fewer than {running}"
    restart_fresh(fe, n)
    c = FuseClient(fe, queue=1)
    c.init()
    e = c.lookup(1, "f")
    c.forget(e.nodeid)
    c.getattr(1)
    assert _daemon_threads(daemon) == running
    daemon.assert_no_traceback()
