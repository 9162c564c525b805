"""Random FUSE requests through the real daemon process, on its rings.

The requests of tests/random_requests.py, each in a descriptor chain whose
readable part is cut at random points (the header split across buffers, the
arguments in pieces), in an indirect table or not, with the reply's room in
one to three buffers; eight chains in flight at a time on a request queue,
FORGETs and BATCH_FORGETs on hiprio too.  Afterwards every chain has come
back with a well-formed reply (or rightly none), the daemon is alive and
serving, its log has no traceback and no internal error, and nothing outside
the share has changed.  With the daemon's defaults, with a thread pool (whose
workers complete chains out of order, from other threads) and with guest
xattrs and ACLs.
"""

from __future__ import annotations

import pytest

from tests.fuse_client import next_unique
from tests.random_requests import O, RandomRequests, outside_and_share, snapshot

from .conftest import assert_serving

REQUESTS = 1500
IN_FLIGHT = 8
HIPRIO = (O.FORGET, O.BATCH_FORGET)


@pytest.fixture(params=[(), ("--thread-pool-size", "2"), ("--xattr", "--posix-acl")],
                ids=["defaults", "thread-pool", "xattr-acl"])
def daemon_args(request):
    return request.param


def pieces(r, data: bytes) -> list[bytes]:
    """`data` cut at up to three random points (no empty piece)."""
    cuts = sorted({r.randrange(1, len(data)) for _ in range(r.randrange(4))}) if len(data) > 1 \
        else []
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


def rooms(r, room: int) -> list[int]:
    """`room` writable bytes as Linux lays them out (16 for fuse_out_header,
    then the rest), in one buffer, or cut in three."""
    shape = r.randrange(3)
    if shape == 0 and room > 16:
        return [16, room - 16]
    if shape == 1 or room < 3:
        return [room]
    a = r.randrange(1, room - 1)
    b = r.randrange(a + 1, room)
    return [a, b - a, room - b]


def test_random_requests_on_the_rings(fe, client, daemon, workdir):
    """(`client` has sent Linux's FUSE_INIT on queue 1, and sends it again after
    a DESTROY among the random requests, as a guest does.)"""
    share, outside = outside_and_share(workdir, (daemon.uid, daemon.gid))
    before = snapshot(outside)
    gen = RandomRequests(7)
    r = gen.r
    request_q, hiprio = fe.queues[1], fe.queues[0]
    pending: dict[int, tuple] = {}   # head -> (opcode, unique, room, request number, bytes)

    def complete_pending() -> None:
        request_q.kick()
        for u in request_q.wait_used(count=len(pending)):
            opcode, uniq, room, j, request = pending.pop(u.id)
            try:
                gen.check_reply(opcode, uniq, room, u.written)
            except AssertionError as e:
                raise AssertionError(f"request {j} ({opcode!r}): {request!r:.300}") from e
        if gen.destroyed:
            gen.destroyed = False
            client.init()

    for i in range(REQUESTS):
        unique = next_unique()
        opcode, request = gen.request(unique)
        if opcode in HIPRIO and r.random() < 0.5:
            # virtio_fs.c: header and arguments in one buffer, no reply buffer
            hiprio.add([request], [], indirect=r.random() < 0.3)
            hiprio.kick()
            assert [u.len for u in hiprio.wait_used(count=1)] == [0]
            continue
        room = gen.room()
        head = request_q.add(pieces(r, request), rooms(r, room), indirect=r.random() < 0.7)
        pending[head] = (opcode, unique, room, i, request)
        if len(pending) >= IN_FLIGHT:
            complete_pending()
    complete_pending()
    assert not pending
    assert_serving(fe, daemon)
    daemon.assert_no_traceback()
    assert "internal error" not in daemon.log()
    assert snapshot(outside) == before
