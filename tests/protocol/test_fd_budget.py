"""A guest that holds more inodes than the daemon may have fds: the real daemon, run with
`--rlimit-nofile 300` (a budget of 172 node fds), serves 492 held nodes, reopening those
whose fds it closed."""

from __future__ import annotations

import os

import pytest

from protocol import fuse
from tests.fuse_client import FuseError

Op = fuse.Opcode
DIRS, FILES = 12, 40


@pytest.fixture
def daemon_args():
    return ("--rlimit-nofile", "300", "--thread-pool-size", "2")


def _fd_count(daemon) -> int | None:
    try:
        return len(os.listdir(f"/proc/{daemon.impl.proc.pid}/fd"))
    except PermissionError:  # another user's daemon, and this test not root
        return None


def test_guest_holds_more_inodes_than_the_fd_limit(daemon, client):
    share = daemon.shared_dir
    for d in range(DIRS):
        (share / f"d{d}").mkdir()
        daemon.chown(share / f"d{d}")
        for f in range(FILES):
            p = share / f"d{d}" / f"f{f}"
            p.write_bytes(b"%d/%d" % (d, f))
            daemon.chown(p)
    held = {}
    for d in range(DIRS):
        de = client.lookup(1, f"d{d}")
        held[f"d{d}"] = de.nodeid
        for f in range(FILES):
            held[f"d{d}/f{f}"] = client.lookup(de.nodeid, f"f{f}").nodeid
    count = _fd_count(daemon)
    assert count is None or count < 300, count
    # every node answers as its own host inode, the oldest ones (evicted first) included
    for path, nodeid in held.items():
        assert client.getattr(nodeid).attr.ino == (share / path).stat().st_ino, path
    # the guest's changes through evicted nodes: data, a rename, an unlink
    first = held["d0/f0"]
    fh = client.open(first, os.O_RDONLY).fh
    assert client.read(first, fh, 0, 64) == b"0/0"
    client.release(first, fh)
    client.call(Op.RENAME, held["d0"], fuse.fuse_rename_in.pack(newdir=held["d1"]) + b"f1\0moved\0")
    client.unlink(held["d2"], "f2")
    with pytest.raises(FuseError):
        client.lookup(held["d2"], "f2")
    for path, nodeid in held.items():
        if path != "d2/f2":
            client.getattr(nodeid)
    assert client.getattr(held["d0/f1"]).attr.ino == (share / "d1" / "moved").stat().st_ino
    count = _fd_count(daemon)
    assert count is None or count < 300, count
    log = daemon.log()
    assert "Too many open files" not in log and "is stale" not in log
    assert "past 172 inodes held by the guest" in log
    assert "the guest holds more than 172 inodes: closing the fds" in log
    daemon.assert_no_traceback()
