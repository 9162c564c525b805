"""Run the real vfsd daemon for a test, as an unprivileged host user.

    with Daemon(share, workdir / "vfsd.sock") as d:      # starts it, waits for the socket
        run_guest(script, socket_path=d.socket_path)
    print(d.returncode, d.log_text())

When the tests run as root (CI, these machines) the daemon runs as the system user
``vfsd-test`` (created on first use) via ``setpriv``; that user cannot read /root, so the
``vfsd`` and ``protocol`` packages are copied to a world-readable temporary directory and the
interpreter is one that user can execute (this one if it can, else /usr/bin/python3).  The
shared directory is chowned to that user and the socket's directory is created for it; every
directory above them must be searchable by it (the ``vfsd_workdir`` fixture makes such a place).
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def workdir(prefix: str = "vfsd-test-") -> Iterator[Path]:
    """A fresh directory that the unprivileged daemon user (and libvirt's QEMU user) can
    reach (pytest's tmp_path lives under a 0700 directory): put shared directories and
    sockets here.  Removed afterwards unless VFSD_TEST_KEEP=1."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(d, 0o711)
    try:
        yield d
    finally:
        if os.environ.get("VFSD_TEST_KEEP", "") in ("", "0"):
            shutil.rmtree(d, ignore_errors=True)
        else:
            print(f"\nkept {d}")
TEST_USER = "vfsd-test"
PACKAGES = ("vfsd", "protocol")
FALLBACK_PYTHON = "/usr/bin/python3"

__all__ = ["Daemon", "DaemonError", "TEST_USER", "test_user", "unprivileged_python"]


class DaemonError(RuntimeError):
    pass


def test_user() -> tuple[int, int, str] | None:
    """(uid, gid, name) the daemon runs as: as root, the system user 'vfsd-test' (created if
    missing); otherwise the current user.  None when running as root and it cannot be created."""
    if os.geteuid() != 0:
        return os.getuid(), os.getgid(), pwd.getpwuid(os.getuid()).pw_name
    try:
        pw = pwd.getpwnam(TEST_USER)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        r = subprocess.run([useradd, "--system", "--no-create-home", "--user-group",
                            "--shell", "/usr/sbin/nologin", TEST_USER],
                           capture_output=True, text=True)
        try:
            pw = pwd.getpwnam(TEST_USER)   # also covers a concurrent useradd that won the race
        except KeyError:
            sys.stderr.write(f"tests/daemon.py: useradd {TEST_USER} failed: {r.stderr}\n")
            return None
    return pw.pw_uid, pw.pw_gid, pw.pw_name


test_user.__test__ = False  # not a pytest test, even when imported into a test module

_python_for: dict[int, str] = {}


def _drop_cmd(uid: int, gid: int) -> list[str]:
    if os.geteuid() != 0 or uid == os.geteuid():
        return []
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
    runuser = shutil.which("runuser")
    if runuser:
        name = pwd.getpwuid(uid).pw_name
        return [runuser, "-u", name, "--"]
    raise DaemonError("need setpriv or runuser (util-linux) to drop to the test user")


def unprivileged_python(uid: int, gid: int) -> str:
    """An interpreter (>= 3.11) the user uid:gid can run: sys.executable, else /usr/bin/python3."""
    if uid in _python_for:
        return _python_for[uid]
    tried = []
    for py in dict.fromkeys([sys.executable, FALLBACK_PYTHON]):
        if not py or not os.path.exists(py):
            continue
        # The interpreter must start *and* find its own standard library: a pyenv build under
        # an unreadable /root may otherwise fall back to another installation's stdlib.
        r = subprocess.run([*_drop_cmd(uid, gid), py, "-c",
                            "import sys, ctypes, mmap, socket, selectors, threading, logging, "
                            "argparse; print(sys.prefix); sys.exit(sys.version_info < (3, 11))"],
                           capture_output=True, text=True, cwd="/")
        prefix = r.stdout.strip()
        expected = sys.prefix if py == sys.executable else prefix
        if r.returncode == 0 and prefix == expected:
            _python_for[uid] = py
            return py
        tried.append(f"{py}: rc={r.returncode} prefix={prefix!r} {r.stderr.strip()[-200:]}")
    raise DaemonError(f"no Python >= 3.11 that uid {uid} can run; tried: " + "; ".join(tried))


def _searchable_by(path: Path, uid: int, gid: int) -> Path | None:
    """The first directory above `path` that uid:gid cannot search (x permission), or None."""
    if uid == 0:
        return None
    for d in reversed(path.parents):
        try:
            st = d.stat()
        except FileNotFoundError:
            return None          # we create the rest (mode 0755)
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return d
    return None


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.lchown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            os.lchown(os.path.join(dirpath, n), uid, gid)


class Daemon:
    """The vfsd process serving `shared_dir` on the vhost-user socket `socket_path`."""

    def __init__(self, shared_dir: Path | str, socket_path: Path | str, *,
                 unprivileged: bool = True, extra_args: Iterable[str] = (),
                 log_path: Path | str | None = None, chown_shared: bool = True,
                 source_root: Path | str = REPO, module: str = "vfsd") -> None:
        self.shared_dir = Path(shared_dir).absolute()
        self.socket_path = Path(socket_path).absolute()
        self.unprivileged = unprivileged
        self.extra_args = [str(a) for a in extra_args]
        self.log_path = Path(log_path) if log_path else self.socket_path.with_name(
            self.socket_path.name + ".log")
        self.chown_shared = chown_shared
        self.source_root = Path(source_root)
        self.module = module
        self.proc: subprocess.Popen | None = None
        self.command: list[str] = []
        self.uid, self.gid, self.user = os.getuid(), os.getgid(), None
        self._code_dir: str | None = None
        self._log_file = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> "Daemon":
        if self.proc is not None:
            raise DaemonError("daemon already started")
        if self.unprivileged:
            who = test_user()
            if who is None:
                raise DaemonError(f"cannot create the unprivileged user {TEST_USER}")
            self.uid, self.gid, self.user = who
        else:
            self.user = pwd.getpwuid(os.getuid()).pw_name
        self._prepare_dirs()
        drop = _drop_cmd(self.uid, self.gid)
        python = unprivileged_python(self.uid, self.gid) if drop else sys.executable
        self._code_dir = self._copy_code() if drop else None
        pythonpath = self._code_dir or str(self.source_root)
        self.command = [*drop, python, "-m", self.module,
                        "--socket-path", str(self.socket_path),
                        "--shared-dir", str(self.shared_dir),
                        "--log-level", "debug", *self.extra_args]
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONHOME", "PYTHONSTARTUP", "PYTHONPATH")}
        env.update(PYTHONPATH=pythonpath, PYTHONFAULTHANDLER="1", PYTHONDONTWRITEBYTECODE="1",
                   PYTHONUNBUFFERED="1")
        if drop:
            env.update(HOME="/", USER=self.user, LOGNAME=self.user)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab", buffering=0)
        self._log_file.write(f"### {shlex.join(self.command)}\n".encode())
        try:
            self.socket_path.unlink()
        except FileNotFoundError:
            pass
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                     stdout=self._log_file, stderr=subprocess.STDOUT,
                                     cwd=self._code_dir or str(self.source_root), env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self._socket_ready():
                return self
            rc = self.proc.poll()
            if rc is not None:
                self._cleanup()
                raise DaemonError(f"vfsd exited with status {rc} before its socket appeared\n"
                                  + self.describe())
            if time.monotonic() > deadline:
                self.stop()
                raise DaemonError(f"vfsd did not create {self.socket_path} within {timeout}s\n"
                                  + self.describe())
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (then SIGABRT for a traceback, then SIGKILL); returns the exit code (negative:
        killed by that signal), None if it was never started."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGABRT, 3.0),
                              (signal.SIGKILL, 10.0)):
                try:
                    self.proc.send_signal(sig)
                except ProcessLookupError:
                    pass
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    if sig == signal.SIGTERM:
                        self._note(f"did not exit {timeout}s after SIGTERM; sending SIGABRT")
        self._cleanup()
        return self.proc.returncode

    def _cleanup(self) -> None:
        if self._code_dir:
            shutil.rmtree(self._code_dir, ignore_errors=True)
            self._code_dir = None
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "Daemon":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- state ----------------------------------------------------------------------------

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def accepted_init(self) -> tuple[str, int] | None:
        """The daemon's INIT log line and the FUSE flags it accepted, or None
        before the guest's INIT."""
        m = re.search(r"INIT: .* accepted (0x[0-9a-f]+)", self.log_text())
        return (m.group(0), int(m.group(1), 16)) if m else None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 50) -> str:
        return "\n".join(self.log_text().rstrip("\n").splitlines()[-lines:])

    def describe(self, lines: int = 50) -> str:
        """Command, user, state and the tail of the log: for failure messages."""
        state = ("not started" if self.proc is None else
                 "running" if self.proc.poll() is None else f"exited {self.proc.returncode}")
        return (f"vfsd ({state}) as {self.user} ({self.uid}:{self.gid}): "
                f"{shlex.join(self.command)}\n--- {self.log_path} (last {lines} lines) ---\n"
                + self.log_tail(lines))

    # -- helpers --------------------------------------------------------------------------

    def _note(self, msg: str) -> None:
        if self._log_file:
            self._log_file.write(f"### tests/daemon.py: {msg}\n".encode())

    def _socket_ready(self) -> bool:
        try:
            return stat.S_ISSOCK(os.stat(self.socket_path).st_mode)
        except FileNotFoundError:
            return False

    def _prepare_dirs(self) -> None:
        for p in (self.shared_dir, self.socket_path):
            bad = _searchable_by(p, self.uid, self.gid)
            if bad is not None:
                raise DaemonError(
                    f"{bad} (mode {stat.filemode(bad.stat().st_mode)}) is not searchable by "
                    f"{self.user} (uid {self.uid}), so the daemon cannot reach {p}; put the "
                    "share and socket under the vfsd_workdir fixture (or another place that "
                    "user can reach)")
        self.shared_dir.mkdir(parents=True, exist_ok=True)
        sock_dir = self.socket_path.parent
        created = not sock_dir.exists()
        sock_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0 and self.uid != 0:
            if self.chown_shared:
                _chown_tree(self.shared_dir, self.uid, self.gid)
            st = sock_dir.stat()
            sticky_shared = st.st_mode & stat.S_ISVTX and st.st_mode & stat.S_IWOTH
            if (created or st.st_uid == 0) and not sticky_shared and sock_dir != Path("/"):
                os.chown(sock_dir, self.uid, self.gid)

    def _copy_code(self) -> str:
        code = tempfile.mkdtemp(prefix="vfsd-code-")
        os.chmod(code, 0o755)
        for pkg in PACKAGES:
            src = self.source_root / pkg
            if src.is_dir():
                shutil.copytree(src, os.path.join(code, pkg),
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for dirpath, dirnames, filenames in os.walk(code):
            for n in dirnames:
                os.chmod(os.path.join(dirpath, n), 0o755)
            for n in filenames:
                os.chmod(os.path.join(dirpath, n), 0o644)
        return code
