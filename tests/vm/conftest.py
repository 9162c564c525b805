"""VM tests: every test here is marked `vm` and skipped when QEMU, a kernel or busybox-static
is missing.  Fixtures:

    vfsd           a started vfsd (unprivileged) serving vfsd.shared_dir
    guest          guest(script, **run_guest kwargs) -> GuestResult, with the vfsd device
                   mounted at /mnt (a failing test's report includes the daemon log)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.guest import GuestResult, require_guest, run_guest

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.vm)


@pytest.fixture(autouse=True)
def _require_guest_tools():
    require_guest()


@pytest.fixture
def vfsd(start_vfsd):
    return start_vfsd()


@pytest.fixture
def guest(vfsd):
    def run(script: str, **kw) -> GuestResult:
        kw.setdefault("socket_path", vfsd.socket_path)
        return run_guest(script, **kw)   # a failing test's report carries the daemon log
    return run
