#!/usr/bin/env python3
"""Set up and boot a demo guest on a vfsd share.

    python3 tools/demo.py                 # scripted: the guest chowns a file, the host looks
    python3 tools/demo.py --interactive   # a shell in the guest on this terminal (Ctrl-A X quits)
    python3 tools/demo.py --interactive -- --posix-acl   # ... with guest xattrs and ACLs

Makes a temporary shared directory, starts vfsd on it as an unprivileged user (the system user
'vfsd-test' when run as root, else you), boots a small QEMU guest (TCG, a few seconds) that
mounts the share at /mnt, and shows both sides: in the guest the file belongs to 1234:5678 and
is setuid; on the host it belongs to the daemon's user, with the guest's view kept in the
user.o extended attribute.

vfsd runs with its defaults, which are virtiofsd's: the guest gets no extended attributes and
no POSIX ACLs (the ownership records are kept regardless).  Extra vfsd options go after
``--``: ``-- --posix-acl`` (implies ``--xattr``) lets you try setfattr/getfattr and
setfacl/getfacl on the share in ``--interactive``.

Needs qemu-system-x86, a Debian kernel (linux-image-cloud-amd64) and busybox-static.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.daemon import Daemon, DaemonError  # noqa: E402
from tests.vm.guest import guest_requirements, interactive_guest, run_guest  # noqa: E402

GUEST_SCRIPT = r"""
set -e
cd /mnt
echo 'hello from the guest' > hello.txt
chown 1234:5678 hello.txt
chmod 4755 hello.txt
mkdir -p docs && chown 1000:1000 docs
mknod null-dev c 1 3
echo '$ ls -ln /mnt'
ls -ln /mnt
"""


def say(text: str = "") -> None:
    print(text, flush=True)


def host_view(share: Path, record_name: str) -> None:
    say(f"\n== on the host: ls -ln {share}")
    subprocess.run(["ls", "-ln", str(share)])
    try:
        from vfsd import ownership
    except Exception:  # noqa: BLE001 - decoding is a nicety
        ownership = None
    for p in sorted(share.iterdir()):
        say(f"\n== record of {p.name} ({record_name})")
        if shutil.which("getfattr"):
            subprocess.run(["getfattr", "--absolute-names", "-d", "-m", "-", "-e", "hex", str(p)])
        try:
            raw = os.getxattr(p, record_name, follow_symlinks=False)
        except OSError as e:
            say(f"   no record ({e.strerror})")
            continue
        if not shutil.which("getfattr"):
            say(f"   {record_name}=0x{raw.hex()}")
        if ownership is not None:
            try:
                r = ownership.decode(raw)
                dev = f" rdev={r.rdev_major}:{r.rdev_minor}" if r.rdev_major or r.rdev_minor else ""
                say(f"   decoded: uid={r.uid} gid={r.gid} mode={r.mode:#o}{dev}")
            except Exception as e:  # noqa: BLE001
                say(f"   (cannot decode: {e})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--interactive", action="store_true",
                    help="give a shell in the guest instead of running the scripted demo")
    ap.add_argument("--share", type=Path,
                    help="share this directory (default: a new temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--privileged", action="store_true",
                    help="run vfsd as the current user even when that is root")
    ap.add_argument("--python", action="store_true", help="put python3 in the guest")
    ap.add_argument("vfsd_args", nargs="*", help="extra vfsd arguments (after --)")
    a = ap.parse_args(argv)

    missing = guest_requirements()
    if missing:
        say("cannot boot a guest here:\n  " + "\n  ".join(missing))
        return 2

    work = Path(tempfile.mkdtemp(prefix="vfsd-demo-"))
    os.chmod(work, 0o711)
    share = a.share.absolute() if a.share else work / "share"
    daemon = Daemon(share, work / "run" / "vfsd.sock", unprivileged=not a.privileged,
                    extra_args=a.vfsd_args, log_path=work / "vfsd.log",
                    chown_shared=a.share is None)
    record_name = "user.o"
    if "--record-name" in a.vfsd_args:
        record_name = a.vfsd_args[a.vfsd_args.index("--record-name") + 1]
    rc = 0
    try:
        try:
            daemon.start()
        except DaemonError as e:
            say(str(e))
            return 1
        say(f"== vfsd runs as {daemon.user} (uid {daemon.uid}, gid {daemon.gid}), "
            f"pid {daemon.proc.pid}")
        say(f"   {shlex.join(daemon.command)}")
        say(f"   share {share}, socket {daemon.socket_path}, log {daemon.log_path}")
        if a.interactive:
            say("== booting the guest; the share is at /mnt. Exit the shell (or Ctrl-A X) "
                "to stop.")
            interactive_guest(None, socket_path=daemon.socket_path, python=a.python)
            host_view(share, record_name)
        else:
            say("== booting the guest (QEMU, TCG) and running:")
            say("   " + GUEST_SCRIPT.strip().replace("\n", "\n   "))
            r = run_guest(GUEST_SCRIPT, socket_path=daemon.socket_path, timeout=240,
                          python=a.python)
            if r.status != 0:
                r.daemon_log = daemon.log_text()
                say(r.explain())
                rc = 1
            else:
                say(f"\n== in the guest ({r.duration:.1f}s for the whole boot):")
                say(r.output.rstrip("\n"))
            host_view(share, record_name)
    finally:
        code = daemon.stop()
        say(f"\n== vfsd exited with status {code}")
        if code not in (0, None) and rc == 0:
            say(daemon.describe(30))
        if a.keep or a.share:
            say(f"   kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
