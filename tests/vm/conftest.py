"""VM tests: every test here is marked `vm` and skipped when QEMU, a kernel or busybox-static
is missing.  Fixtures:

    vfsd           a started vfsd (unprivileged) serving vfsd.shared_dir
    guest          guest(script, **run_guest kwargs) -> GuestResult, with the vfsd device
                   mounted at /mnt (a failing test's report includes the daemon log)

Every guest a test boots must also shut down: one that QEMU had to be killed for after its
script ended (guest.SHUTDOWN_GRACE) fails the test, whatever the test asserted of the script.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm import guest as _guest
from tests.vm.guest import GuestResult, require_guest, run_guest

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.vm)


@pytest.fixture(autouse=True)
def _require_guest_tools():
    require_guest()


@pytest.fixture(autouse=True)
def _guests_shut_down():
    # A daemon that stops answering at the guest's umount, or when QEMU stops the device
    # (GET_VRING_BASE), hangs QEMU's exit; most tests only look at the script's status.
    first = len(_guest.shutdown_hangs)
    yield
    hung = _guest.shutdown_hangs[first:]
    del _guest.shutdown_hangs[first:]
    if hung:
        pytest.fail("a guest's shutdown hung after its script ended:\n" +
                    "\n\n".join(r.explain(20) for r in hung), pytrace=False)


@pytest.fixture
def vfsd(start_vfsd):
    return start_vfsd()


@pytest.fixture
def guest(vfsd):
    def run(script: str, **kw) -> GuestResult:
        kw.setdefault("socket_path", vfsd.socket_path)
        return run_guest(script, **kw)   # a failing test's report carries the daemon log
    return run
