"""Fixtures shared by every test directory (keep this small)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture
def vfsd_workdir() -> Path:
    """A fresh directory that the unprivileged daemon user can reach (pytest's tmp_path lives
    under a 0700 directory): put shared directories and sockets for tests.daemon.Daemon here.
    Removed afterwards unless VFSD_TEST_KEEP=1."""
    d = Path(tempfile.mkdtemp(prefix="vfsd-test-"))
    os.chmod(d, 0o711)
    yield d
    if os.environ.get("VFSD_TEST_KEEP", "") in ("", "0"):
        shutil.rmtree(d, ignore_errors=True)
    else:
        print(f"\nkept {d}")


@pytest.fixture
def start_vfsd(vfsd_workdir, request):
    """start_vfsd(shared_dir=None, **Daemon kwargs) -> started tests.daemon.Daemon, as the
    unprivileged test user unless unprivileged=False; stopped after the test, and its log is
    added to the report of a failing test."""
    from tests.daemon import Daemon

    started: list[Daemon] = []

    def start(shared_dir: Path | str | None = None, **kw) -> Daemon:
        n = len(started)
        share = Path(shared_dir) if shared_dir else vfsd_workdir / f"share{n or ''}"
        sock = vfsd_workdir / f"run{n or ''}" / "vfsd.sock"
        d = Daemon(share, sock, **kw)
        started.append(d)
        return d.start()

    request.node.vfsd_daemons = started
    yield start
    for d in started:
        d.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and rep.when in ("call", "setup"):
        for i, d in enumerate(getattr(item, "vfsd_daemons", ())):
            rep.sections.append((f"vfsd daemon {i}", d.describe(80)))
