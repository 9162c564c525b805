"""A guest boots on vfsd started the way libvirt starts vhost-user-fs backends.

libvirt binds the socket itself and passes it with --fd.  Debian's libvirt 9.0
then uses the legacy `-o source=...` form (tests/vm/test_libvirt.py runs the
real libvirt); libvirt >= 10 reads `separate-options` from --print-capabilities
and passes long options instead.  This test launches vfsd with exactly that
argv, unprivileged, on an inherited listening socket, and boots a guest on it
with QEMU, so both launch forms are proven with a real guest.
"""

from __future__ import annotations

import os
import stat

from tests.protocol.test_process import Vfsd, listening_socket, runas  # noqa: F401 (fixture)
from tests.vm.guest import run_guest
from vfsd import ownership


def test_guest_on_separate_options_fd_launch(runas, vfsd_workdir):  # noqa: F811
    uid, gid = runas[0], runas[1]
    share, run = vfsd_workdir / "share", vfsd_workdir / "run"
    share.mkdir()
    run.mkdir()
    if os.geteuid() == 0:
        os.chown(share, uid, gid)
        os.chown(run, uid, gid)
    sock = run / "libvirt-fs0.sock"
    lsock = listening_socket(sock)
    v = Vfsd(runas, [f"--fd={lsock.fileno()}", "--shared-dir", share, "--xattr",
                     "--cache", "auto", "--sandbox", "chroot", "--thread-pool-size=2",
                     "--rlimit-nofile=4096"],
             log=vfsd_workdir / "vfsd.log", pass_fds=[lsock.fileno()])
    lsock.close()
    try:
        v.wait_log("waiting for the frontend")
        r = run_guest("set -e; cd /mnt; echo hi > f; chown 4242:4343 f; chmod 2750 f; "
                      "stat -c '%u %g %a' f", socket_path=sock, timeout=240)
        assert r.status == 0, r.explain() + "\n" + v.text()[-3000:]
        assert "4242 4343 2750" in r.output
        assert v.wait(20) == 0, v.text()[-3000:]
    finally:
        v.stop()
    st = os.stat(share / "f")
    assert st.st_uid == uid and not st.st_mode & (stat.S_ISUID | stat.S_ISGID)
    rec = ownership.decode(os.getxattr(share / "f", "user.o"))
    assert (rec.uid, rec.gid, rec.perm) == (4242, 4343, 0o2750)
