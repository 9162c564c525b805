"""Fixtures shared by every test directory (keep this small)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def vfsd_workdir() -> Path:
    """tests.daemon.workdir(): where shared directories and sockets for Daemon go."""
    from tests.daemon import workdir

    with workdir() as d:
        yield d


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
