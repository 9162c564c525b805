"""Random FUSE requests against the server over a real share, in process.

The requests come from tests/random_requests.py and go through both entry
points (`handle` with the request in one buffer, `handle_views` laid out as
Linux's virtio-fs lays it out), under several option sets given through the
real command line.  What must hold for every one: no exception leaves the
server, the reply is well-formed and every request that needs one gets one, no
"internal error" is logged (an exception the server did not expect: each one
found here was a guest-controlled value the code let through to a host call),
nothing outside the share changes, and the server still answers a plain
LOOKUP afterwards.  The seeds are fixed, so a failure names the request that
caused it and reproduces.  Closing the filesystem afterwards closes every fd
the requests made it open.
"""

import errno
import logging
import os

import pytest

from tests.fds import open_fds
from tests.random_requests import INIT, O, RandomRequests, outside_and_share, snapshot

from .test_server_fs import Session

REQUESTS = 1500  # per seed and entry point: ~0.1 s

# Option sets that open other paths: guest xattrs, ACLs and labels; records
# under a nesting name with id translations; a read-only share; the writeback
# cache; cache=never.
OPTIONS = {
    "defaults": (),
    "xattr-acl": ("--posix-acl", "--security-label"),
    "mapped": ("--xattr", "--record-name", "user.o.o", "--translate-uid", "forbid-guest:5:10",
               "--translate-gid", "squash-host:0:100:65536"),
    "readonly": ("--readonly", "--xattr"),
    "writeback": ("--writeback", "--cache", "always", "--no-killpriv-v2"),
    "never": ("--cache", "never", "--no-readdirplus", "--allow-direct-io"),
}


@pytest.mark.parametrize("layout", ["reader", "views"])
@pytest.mark.parametrize("seed,options", enumerate(OPTIONS, start=1))
def test_random_requests(tmp_path, caplog, seed, options, layout):
    share, outside = outside_and_share(tmp_path)
    before, fds = snapshot(outside), open_fds()
    s = Session(share, layout, OPTIONS[options])
    try:
        serve_random_requests(s, seed, caplog)
    finally:
        s.close()
    assert snapshot(outside) == before
    assert sorted(os.listdir(tmp_path)) == ["outside", "share"]
    assert open_fds() == fds   # every fd the requests made the filesystem open is closed


def serve_random_requests(s: Session, seed: int, caplog) -> None:
    # INIT again, offering every feature of flags2 too (FUSE_SECURITY_CTX & co.)
    assert s.call(O.INIT, 0, INIT)[0] == 0
    gen = RandomRequests(seed)
    caplog.set_level(logging.WARNING)
    seen = 0
    for i in range(REQUESTS):
        s.unique += 1
        opcode, request = gen.request(s.unique)
        room = gen.room()
        where = f"seed {seed}, request {i} ({opcode!r}): {request!r:.300}"
        try:
            gen.check_reply(opcode, s.unique, room, s.raw(request, room))
        except Exception as e:
            raise AssertionError(where) from e
        if gen.destroyed:
            gen.destroyed = False
            assert s.call(O.INIT, 0, INIT)[0] == 0
        internal = [rec.getMessage() for rec in caplog.records[seen:]
                    if rec.exc_info or "internal error" in rec.getMessage()]
        assert not internal, f"{where}: {internal[0]}"
        seen = len(caplog.records)
    # Still serving: a LOOKUP of a file it did not make (unless the requests
    # renamed it away).
    assert s.call(O.LOOKUP, 1, b"f\0")[0] in (0, errno.ENOENT)
