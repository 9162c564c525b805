"""vfsd as a process: virtiofsd's command lines and the vhost-user backend conventions.

Each test starts the real daemon with an exact command line (as the unprivileged test user
when the suite runs as root) and checks what a script or libvirt written for virtiofsd would
see: a FUSE round trip through the Python frontend for the typical command lines (the C
virtiofsd's ``-o`` form, the Rust one's long options, libvirt's ``--fd`` launches), the pid
file beside the socket, prompt exit on signals and on frontend disconnect, clear errors and
exit status 1 for a missing share, a filesystem without user xattrs and unusable socket
paths, --socket-group, --rlimit-nofile, --syslog, -V, -d, -f.
"""

from __future__ import annotations

import fcntl
import grp
import json
import logging
import logging.handlers
import os
import pwd
import resource
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.daemon import _drop_cmd, test_user, unprivileged_python
from tests.frontend import Frontend
from tests.fuse_client import FuseClient

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------
# running vfsd with an exact command line
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runas():
    """(uid, gid, command prefix, python, PYTHONPATH) for running vfsd as the test user."""
    who = test_user()
    if who is None:
        pytest.skip("cannot create the unprivileged test user")
    uid, gid, _ = who
    drop = _drop_cmd(uid, gid)
    if not drop:
        yield uid, gid, [], sys.executable, str(REPO)
        return
    code = tempfile.mkdtemp(prefix="vfsd-code-")
    os.chmod(code, 0o755)
    for pkg in ("vfsd", "protocol"):
        shutil.copytree(REPO / pkg, os.path.join(code, pkg),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for dirpath, dirnames, filenames in os.walk(code):
        for n in dirnames:
            os.chmod(os.path.join(dirpath, n), 0o755)
        for n in filenames:
            os.chmod(os.path.join(dirpath, n), 0o644)
    # cli.version() reads pyproject.toml next to the packages when vfsd is not installed
    shutil.copy(REPO / "pyproject.toml", os.path.join(code, "pyproject.toml"))
    os.chmod(os.path.join(code, "pyproject.toml"), 0o644)
    yield uid, gid, drop, unprivileged_python(uid, gid), code
    shutil.rmtree(code, ignore_errors=True)


class Vfsd:
    """One vfsd process started with `args` (everything after the program name)."""

    def __init__(self, runas, args, *, log: Path, pass_fds=(), nofile=None):
        uid, gid, drop, python, pythonpath = runas
        self.uid, self.gid = uid, gid
        self.args = [str(a) for a in args]
        self.command = [*drop, python, "-m", "vfsd", *self.args]
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONHOME", "PYTHONSTARTUP", "PYTHONPATH")}
        env.update(PYTHONPATH=pythonpath, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
        self.log_path = log
        self._log = open(log, "ab", buffering=0)
        self._log.write(f"### {shlex.join(self.command)}\n".encode())

        def preexec():
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env, cwd="/",
                                     pass_fds=tuple(pass_fds), start_new_session=True,
                                     preexec_fn=preexec if nofile is not None else None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float = 10.0) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def wait_for(self, path: Path, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            rc = self.proc.poll()
            assert rc is None, f"vfsd exited {rc} before {path} appeared:\n{self.text()}"
            assert time.monotonic() < deadline, f"no {path} after {timeout}s:\n{self.text()}"
            time.sleep(0.05)

    def wait_log(self, needle: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            assert self.proc.poll() is None, f"vfsd exited:\n{self.text()}"
            assert time.monotonic() < deadline, f"log never said {needle!r}:\n{self.text()}"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def work(vfsd_workdir, runas):
    """A share and a socket directory that belong to the daemon's user."""
    uid, gid = runas[0], runas[1]
    share = vfsd_workdir / "share"
    run = vfsd_workdir / "run"
    share.mkdir()
    run.mkdir()
    if os.geteuid() == 0:
        os.chown(share, uid, gid)
        os.chown(run, uid, gid)
    return vfsd_workdir


@pytest.fixture
def start(runas, work, request):
    started: list[Vfsd] = []

    def start(args, **kw) -> Vfsd:
        v = Vfsd(runas, args, log=work / f"vfsd{len(started)}.log", **kw)
        started.append(v)
        return v

    yield start
    for v in started:
        v.stop()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for v in started:
            rep.sections.append((f"vfsd {shlex.join(v.args)}", v.text()[-4000:]))


def round_trip(sock_path: Path, share: Path, name: str = "hello") -> None:
    """Connect like QEMU, FUSE INIT, create + write + read back a file; check the host side
    (content and ownership record); disconnect."""
    fe = Frontend(sock_path, timeout=5.0)
    try:
        fe.setup(num_queues=2)
        c = FuseClient(fe, queue=1)
        c.init()
        data = os.urandom(3000)
        e, o = c.create(1, name)
        assert c.write(e.nodeid, o.fh, 0, data) == len(data)
        c.release(e.nodeid, o.fh)
        e2 = c.lookup(1, name)
        o2 = c.open(e2.nodeid, os.O_RDONLY)
        assert c.read(e2.nodeid, o2.fh, 0, 4096) == data
        c.release(e2.nodeid, o2.fh, os.O_RDONLY)
    finally:
        fe.close()
    assert (share / name).read_bytes() == data
    assert len(os.getxattr(share / name, "user.o")) >= 24


def listening_socket(path: Path) -> socket.socket:
    """What libvirt does before starting virtiofsd with --fd: bind + listen, fd inheritable."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    s.set_inheritable(True)
    return s


# ---------------------------------------------------------------------------
# command lines written for virtiofsd
# ---------------------------------------------------------------------------

def test_c_virtiofsd_command_line(start, work):
    """The C virtiofsd's spelling (field notes; QEMU <= 7.2 docs)."""
    sock = work / "run" / "vfsd.sock"
    v = start([f"--socket-path={sock}", "-o", f"source={work / 'share'}", "-o", "cache=auto",
               "-o", "xattr"])
    v.wait_for(sock)
    round_trip(sock, work / "share")
    assert v.wait(10) == 0, v.text()
    assert not sock.exists() and not Path(f"{sock}.pid").exists()
    assert "deprecated" in v.text()  # the -o form is noted, as virtiofsd does


def test_rust_virtiofsd_command_line(start, work):
    sock = work / "run" / "vfsd.sock"
    v = start(["--socket-path", sock, "--shared-dir", work / "share", "--cache", "auto",
               "--sandbox", "none", "--thread-pool-size", "2", "--announce-submounts",
               "--inode-file-handles=never", "--seccomp", "none", "--log-level", "debug"])
    v.wait_for(sock)
    round_trip(sock, work / "share")
    assert v.wait(10) == 0, v.text()
    assert "Traceback" not in v.text()


def test_libvirt_separate_options_with_inherited_fd(start, work):
    """libvirt (>= 9.x, with separate-options) binds the socket, passes it as --fd and the
    XML's settings as long options; QEMU then connects to libvirt's socket path."""
    sock = work / "run" / "libvirt-fs0.sock"
    lsock = listening_socket(sock)
    fd = lsock.fileno()
    v = start([f"--fd={fd}", "--shared-dir", work / "share", "--cache", "never", "--sandbox",
               "chroot", "--xattr", "--thread-pool-size=2", "--rlimit-nofile=4096"],
              pass_fds=[fd])
    lsock.close()
    v.wait_log("waiting for the frontend")
    round_trip(sock, work / "share")
    assert v.wait(10) == 0, v.text()
    assert "--sandbox=chroot" in v.text()   # says what it does instead
    assert sock.exists()                    # libvirt's socket: not vfsd's to remove


def test_libvirt_legacy_options_with_comma_in_path(start, work, runas):
    """libvirt 9.0's form: --fd=N -o source=DIR,cache=...,xattr,...; commas in DIR doubled."""
    share = work / "share,with,commas"
    share.mkdir()
    if os.geteuid() == 0:
        os.chown(share, runas[0], runas[1])
    sock = work / "run" / "fs0.sock"
    lsock = listening_socket(sock)
    fd = lsock.fileno()
    escaped = str(share).replace(",", ",,")
    v = start([f"--fd={fd}", "-o", f"source={escaped},cache=always,sandbox=chroot,xattr,"
               "no_flock,no_posix_lock", "--thread-pool-size=1"], pass_fds=[fd])
    lsock.close()
    v.wait_log("waiting for the frontend")
    assert f"sharing {share} " in v.text()
    round_trip(sock, share)
    assert v.wait(10) == 0, v.text()


# ---------------------------------------------------------------------------
# process conventions
# ---------------------------------------------------------------------------

def test_pid_file_locked_and_second_daemon_refused(start, work):
    sock = work / "run" / "vfsd.sock"
    pid_file = Path(f"{sock}.pid")
    v = start(["--socket-path", sock, "--shared-dir", work / "share"])
    v.wait_for(sock)
    assert pid_file.read_text() == f"{v.pid}\n"
    assert stat.S_IMODE(os.stat(pid_file).st_mode) == 0o600
    with open(pid_file) as f:
        with pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    ino = os.stat(sock).st_ino
    second = start(["--socket-path", sock, "--shared-dir", work / "share"])
    assert second.wait(10) == 1
    assert f"is locked: another daemon (pid {v.pid})" in second.text()
    assert os.stat(sock).st_ino == ino, "the second daemon replaced the first one's socket"
    round_trip(sock, work / "share")    # the first one still serves
    assert v.wait(10) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_while_waiting_exits_promptly(start, work, sig):
    sock = work / "run" / "vfsd.sock"
    v = start(["--socket-path", sock, "--shared-dir", work / "share"])
    v.wait_for(sock)
    v.wait_log("waiting for the frontend")
    t0 = time.monotonic()
    os.kill(v.pid, sig)
    assert v.wait(5) == 0, v.text()
    assert time.monotonic() - t0 < 3
    assert f"terminated by {sig.name}" in v.text()
    assert not sock.exists() and not Path(f"{sock}.pid").exists()


def test_sigterm_while_serving_exits_promptly(start, work):
    sock = work / "run" / "vfsd.sock"
    v = start(["--socket-path", sock, "--shared-dir", work / "share", "--thread-pool-size=2"])
    v.wait_for(sock)
    fe = Frontend(sock, timeout=5.0)
    try:
        fe.setup(num_queues=2)
        c = FuseClient(fe, queue=1)
        c.init()
        c.getattr(1)
        t0 = time.monotonic()
        os.kill(v.pid, signal.SIGTERM)
        assert v.wait(5) == 0, v.text()
        assert time.monotonic() - t0 < 3
        assert not fe.is_open(wait=1.0)
    finally:
        fe.close()
    assert not sock.exists()


def test_sigterm_while_exiting_after_the_frontend_left_is_still_a_clean_exit(start, work):
    """What a test harness or an orchestrator does: the frontend goes, and the daemon gets
    SIGTERM while it is exiting by itself.  (Before, that exited 1, or died by the signal.)"""
    sock = work / "run" / "vfsd.sock"
    codes = []
    for i in range(5):
        v = start(["--socket-path", sock, "--shared-dir", work / "share"])
        v.wait_for(sock)
        fe = Frontend(sock, timeout=5.0)
        fe.setup(num_queues=2)
        FuseClient(fe, queue=1).init()
        fe.close()
        deadline = time.monotonic() + 10
        while "frontend disconnected; exiting" not in v.text():  # (as soon as it says so)
            assert time.monotonic() < deadline, v.text()
            time.sleep(0.0005)
        try:
            os.kill(v.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass  # gone already
        codes.append(v.wait(5))
        assert "Traceback" not in v.text(), v.text()
    assert codes == [0] * 5


def test_missing_shared_dir(start, work):
    sock = work / "run" / "vfsd.sock"
    v = start(["--socket-path", sock, "--shared-dir", work / "nonexistent"])
    assert v.wait(10) == 1
    assert f"shared directory {work / 'nonexistent'}: No such file or directory" in v.text()
    assert not sock.exists() and not Path(f"{sock}.pid").exists()


def test_shared_dir_is_a_file(start, work):
    f = work / "share" / "file"
    f.write_text("x")
    v = start(["--socket-path", work / "run" / "s", "-o", f"source={f}"])
    assert v.wait(10) == 1
    assert "not a directory" in v.text()


def test_filesystem_without_user_xattrs(work, runas):
    """A ramfs (no xattr support at all) in a private mount namespace: a real filesystem
    that cannot hold records.  vfsd must refuse it before creating its socket."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) to mount a ramfs in a private namespace")
    uid, gid, drop, python, pythonpath = runas
    mnt = work / "ramfs"
    mnt.mkdir()
    sock = work / "run" / "vfsd.sock"
    vfsd = shlex.join([*drop, python, "-m", "vfsd", "--socket-path", str(sock),
                       "--shared-dir", str(mnt)])
    script = (f"mount -t ramfs none {shlex.quote(str(mnt))} && "
              f"chown {uid}:{gid} {shlex.quote(str(mnt))} && "
              f"PYTHONPATH={shlex.quote(pythonpath)} exec {vfsd}")
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=30, cwd="/")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "does not support user.* extended attributes" in r.stderr, r.stderr
    assert not sock.exists()


def test_socket_directory_missing(start, work):
    sock = work / "nodir" / "vfsd.sock"
    v = start(["--socket-path", sock, "--shared-dir", work / "share"])
    assert v.wait(10) == 1
    assert f"{work / 'nodir'} does not exist" in v.text()


def test_socket_path_too_long(start, work):
    sock = work / "run" / ("x" * 120)
    v = start(["--socket-path", sock, "--shared-dir", work / "share"])
    assert v.wait(10) == 1
    assert "too long" in v.text()


def test_socket_path_is_a_regular_file(start, work, runas):
    sock = work / "run" / "vfsd.sock"
    sock.write_text("not a socket")
    v = start(["--socket-path", sock, "--shared-dir", work / "share"])
    assert v.wait(10) == 1
    assert f"cannot listen on {sock}" in v.text()
    assert sock.read_text() == "not a socket"
    assert not Path(f"{sock}.pid").exists()


def test_socket_directory_not_writable(start, work, runas):
    if runas[0] == 0:
        pytest.skip("the daemon runs as root")
    ro = work / "ro"
    ro.mkdir(mode=0o755)   # root's (or the test user's own, read-only) directory
    if os.geteuid() != 0:
        os.chmod(ro, 0o555)
    v = start(["--socket-path", ro / "vfsd.sock", "--shared-dir", work / "share"])
    assert v.wait(10) == 1
    assert "Permission denied" in v.text()


def test_socket_group(start, work, runas):
    sock = work / "run" / "vfsd.sock"
    group = grp.getgrgid(runas[1]).gr_name
    v = start(["--socket-path", sock, "--shared-dir", work / "share", "--socket-group", group])
    v.wait_for(sock)
    st = os.stat(sock)
    assert st.st_gid == runas[1]
    assert stat.S_IMODE(st.st_mode) == 0o660
    round_trip(sock, work / "share")
    assert v.wait(10) == 0


def test_socket_group_unknown_or_not_a_member(start, work, runas):
    sock = work / "run" / "vfsd.sock"
    v = start(["--socket-path", sock, "--shared-dir", work / "share",
               "--socket-group", "no-such-group-vfsd"])
    assert v.wait(10) == 1
    assert "--socket-group=no-such-group-vfsd: no such group" in v.text()
    if runas[0] != 0 and 0 not in os.getgrouplist(pwd.getpwuid(runas[0]).pw_name, runas[1]):
        v2 = start(["--socket-path", sock, "--shared-dir", work / "share",
                    "--socket-group", grp.getgrgid(0).gr_name])
        assert v2.wait(10) == 1
        assert "must be a member" in v2.text()
        assert not sock.exists() and not Path(f"{sock}.pid").exists()


def _limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no Max open files line")


def test_rlimit_nofile_explicit(start, work):
    sock = work / "run" / "vfsd.sock"
    v = start(["--socket-path", sock, "--shared-dir", work / "share", "--rlimit-nofile=4321"])
    v.wait_for(sock)
    assert _limits(v.pid) == (4321, 4321)


def test_rlimit_nofile_default_raises_soft_limit(start, work):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip(f"hard limit {hard} leaves nothing to raise")
    sock = work / "run" / "vfsd.sock"
    v = start(["--socket-path", sock, "--shared-dir", work / "share"], nofile=(1024, hard))
    v.wait_for(sock)
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    target = min(1_000_000, nr_open)
    new_soft, new_hard = _limits(v.pid)
    if v.uid == 0:
        assert new_soft == target
    else:   # an ordinary user cannot go above its hard limit
        assert new_soft == min(target, hard) and new_hard == hard


def test_rlimit_nofile_above_nr_open_fails(start, work):
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    v = start(["--socket-path", work / "run" / "s", "--shared-dir", work / "share",
               f"--rlimit-nofile={nr_open + 1}"])
    assert v.wait(10) == 1
    assert "cannot be increased above" in v.text()


def test_syslog_falls_back_to_stderr_without_dev_log(start, work):
    if os.path.exists("/dev/log"):
        pytest.skip("/dev/log exists here (the in-process syslog test covers the handler)")
    sock = work / "run" / "vfsd.sock"
    v = start(["--socket-path", sock, "--shared-dir", work / "share", "--syslog"])
    v.wait_for(sock)
    assert "cannot log to syslog" in v.text()


def test_syslog_handler_sends_to_the_socket(tmp_path):
    from vfsd import daemon
    addr = str(tmp_path / "log")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(addr)
    rx.settimeout(5)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        handler = daemon.setup_logging("info", syslog=True, address=addr)
        assert isinstance(handler, logging.handlers.SysLogHandler)
        logging.getLogger("vfsd").info("hello syslog")
        msg = rx.recv(4096).decode()
        assert msg.startswith("<14>") and "vfsd[" in msg and "hello syslog" in msg  # user.info
    finally:
        root.removeHandler(daemon._handler)
        daemon._handler.close()
        daemon._handler = None
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        rx.close()


def test_debug_and_foreground_flags(start, work):
    sock = work / "run" / "vfsd.sock"
    v = start(["-f", "-d", "--socket-path", sock, "--shared-dir", work / "share"])
    v.wait_for(sock)
    round_trip(sock, work / "share")
    assert v.wait(10) == 0
    text = v.text()
    assert " DEBUG " in text
    assert "-f has no effect" in text and "-d is deprecated" in text


def test_version_and_capabilities(runas, tmp_path):
    uid, gid, drop, python, pythonpath = runas
    env = dict(os.environ, PYTHONPATH=pythonpath)
    r = subprocess.run([*drop, python, "-m", "vfsd", "-V"], capture_output=True, text=True,
                       env=env, cwd="/", timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("vfsd ") and "unknown" not in r.stdout
    r = subprocess.run([*drop, python, "-m", "vfsd", "--print-capabilities"],
                       capture_output=True, text=True, env=env, cwd="/", timeout=30)
    assert r.returncode == 0, r.stderr
    caps = json.loads(r.stdout)
    descriptor = json.loads((REPO / "qemu-configs" / "50-vfsd.json").read_text())
    assert caps == {"type": "fs", "features": descriptor["features"]}


def test_fd_that_is_not_a_listening_socket(start, work):
    r, w = os.pipe()
    unbound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        cases = [(r, "not a usable socket"), (unbound.fileno(), "not a listening socket"),
                 (1000, "not a usable socket")]
        for fd, message in cases:
            v = start([f"--fd={fd}", "--shared-dir", work / "share"],
                      pass_fds=[fd] if fd != 1000 else [])
            assert v.wait(10) == 1, v.text()
            assert message in v.text() and "Traceback" not in v.text(), v.text()
    finally:
        os.close(r)
        os.close(w)
        unbound.close()
