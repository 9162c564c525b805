"""Fixtures for protocol tests: the real vfsd daemon process + a Python front-end.

Every test gets its own daemon (it serves one connection and exits 0 when the
front-end disconnects), its own shared directory, and a front-end that has
done (or not) the QEMU-like setup.  Every wait has a timeout.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.daemon import Daemon, workdir as daemon_workdir
from tests.frontend import Frontend, ProtocolFeature
from tests.fuse_client import FuseClient

#: Queues the tests want: hiprio + up to two request queues.
WANT_QUEUES = 3


def _proc(d: Daemon) -> subprocess.Popen:
    """The daemon's process."""
    if d.proc is None:
        raise RuntimeError("daemon not started")
    return d.proc


def daemon_returncode(d):
    return _proc(d).poll()


def daemon_wait(d, timeout: float):
    """Wait for exit; returns the code or None if still running."""
    try:
        return _proc(d).wait(timeout)
    except subprocess.TimeoutExpired:
        return None


class DaemonHandle:
    """Wraps tests.daemon.Daemon with the few helpers protocol tests use."""

    def __init__(self, impl, shared_dir: Path, socket_path: Path):
        self.impl = impl
        self.shared_dir = shared_dir
        self.socket_path = socket_path
        self._mark = 0

    def log(self) -> str:
        return self.impl.log_text()

    @property
    def uid(self) -> int:
        return getattr(self.impl, "uid", os.getuid())

    @property
    def gid(self) -> int:
        return getattr(self.impl, "gid", os.getgid())

    def chown(self, path) -> None:
        """Give a test-made host file to the daemon's user (as the share's own files are)."""
        os.lchown(path, self.uid, self.gid)

    def mark(self) -> None:
        """Remember the current end of the log; `log_since_mark()` reads after it."""
        self._mark = len(self.log())

    def log_since_mark(self) -> str:
        return self.log()[self._mark:]

    def wait_log(self, pattern: str, timeout: float = 5.0, since_mark: bool = True) -> str:
        """Wait until the log (after the mark) matches `pattern`; returns the match's line."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_since_mark() if since_mark else self.log()
            m = rx.search(text)
            if m:
                start = text.rfind("\n", 0, m.start()) + 1
                end = text.find("\n", m.end())
                return text[start:end if end >= 0 else len(text)]
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon log never matched {pattern!r}; new log lines:\n{text[-4000:]}")
            time.sleep(0.05)

    @property
    def returncode(self):
        return daemon_returncode(self.impl)

    def alive(self) -> bool:
        return self.returncode is None

    def wait(self, timeout: float):
        return daemon_wait(self.impl, timeout)

    def assert_no_traceback(self):
        text = self.log()
        assert "Traceback (most recent call last)" not in text, "unhandled exception in daemon:\n" + text[-6000:]


@pytest.fixture
def workdir():
    """A directory the unprivileged daemon user can search (pytest's tmp_path is 0700)."""
    with daemon_workdir("vfsd-proto-") as d:
        yield d


@pytest.fixture
def shared_dir(workdir):
    d = workdir / "share"
    d.mkdir()
    os.chmod(d, 0o755)
    return d


@pytest.fixture
def daemon_args():
    """Override in a test module to pass extra command-line arguments."""
    return ()


@pytest.fixture
def unprivileged():
    """Run the daemon as an ordinary user (the product's claim); override to False."""
    return True


@pytest.fixture
def daemon(workdir, shared_dir, daemon_args, unprivileged, request):
    sock = workdir / "run" / "vfsd.sock"
    impl = Daemon(shared_dir, sock, unprivileged=unprivileged, extra_args=tuple(daemon_args))
    impl.start()
    handle = DaemonHandle(impl, shared_dir, sock)
    yield handle
    impl.stop()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
    if rep.when == "call" and rep.failed and "daemon" in item.funcargs:
        rep.sections.append(("vfsd log", item.funcargs["daemon"].log()[-8000:]))


@pytest.fixture
def frontend(daemon):
    """Connected, nothing negotiated."""
    fe = Frontend(daemon.socket_path, timeout=5.0)
    yield fe
    fe.close()


def queues_to_use(fe: Frontend) -> int:
    n = fe.queue_num if fe.queue_num is not None else 2
    return max(2, min(n, WANT_QUEUES))


@pytest.fixture
def fe(frontend):
    """Negotiated like QEMU, memory shared, hiprio + request queues started."""
    frontend.negotiate()
    frontend.map_memory()
    n = queues_to_use(frontend)
    for i in range(n):
        frontend.setup_queue(i, 128, enable=False)
    for i in range(n):
        frontend.set_vring_enable(i, True)
    return frontend


@pytest.fixture
def client(fe):
    """A FuseClient on queue 1 after FUSE_INIT."""
    c = FuseClient(fe, queue=1)
    c.init()
    return c


def request_queues(fe: Frontend) -> list[int]:
    return sorted(i for i in fe.queues if i != 0)


def assert_serving(fe: Frontend, daemon: DaemonHandle, avoid: int | None = None, timeout: float = 5.0):
    """The daemon still answers FUSE on some request queue other than `avoid`
    (or, with only one request queue, completes a FORGET on hiprio)."""
    assert daemon.alive(), f"daemon died (rc={daemon.returncode}):\n{daemon.log()[-4000:]}"
    others = [i for i in request_queues(fe) if i != avoid]
    if others:
        c = FuseClient(fe, queue=others[0], timeout=timeout)
        a = c.getattr(1)
        assert a.attr.ino != 0 or a.attr.mode != 0
    else:
        c = FuseClient(fe, queue=avoid or 1, timeout=timeout)
        c.forget(1 << 40, 1)  # unknown node: must still be completed
    assert daemon.alive()


__all__ = ["assert_serving", "request_queues", "queues_to_use", "ProtocolFeature"]
