"""Process life cycle: validate, listen, serve one frontend, exit.

vhost-user backend conventions (QEMU docs/interop/vhost-user.rst, "Backend program
conventions") and virtiofsd's habits, which libvirt and scripts rely on:

* never daemonize; log to stderr (or syslog with --syslog);
* serve the socket given by --socket-path (created here, with a pid file
  ``<socket-path>.pid`` that is flock()ed while the daemon runs, as virtiofsd does, so a
  second daemon on the same socket fails instead of stealing it) or the listening socket
  inherited as --fd (libvirt);
* check everything that can be checked before the socket appears: a missing shared
  directory, one whose filesystem cannot hold ``user.*`` xattrs, or an unusable socket
  path is an error message and exit status 1;
* serve one frontend connection and exit 0 when it goes away, or on SIGTERM, SIGINT or
  SIGHUP (removing the socket and pid file it created).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import grp
import logging
import logging.handlers
import os
import resource
import signal
import socket
import stat
import sys

from protocol.vhost_user import VhostUserBackend, accept_one, listen_unix

from .config import Config
from .passthrough import PassthroughFs
from .xattrmap import XattrMap
from .server import FuseServer, SessionOptions
from .transport import VirtioFsDevice

log = logging.getLogger("vfsd")

_LEVELS = {"error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO,
           "debug": logging.DEBUG, "trace": logging.DEBUG, "off": logging.CRITICAL + 1}

#: virtiofsd's default target for RLIMIT_NOFILE (limits.rs: DEFAULT_NOFILE).
DEFAULT_NOFILE = 1_000_000
#: sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
SYSLOG_ADDRESS = "/dev/log"
PR_SET_NO_NEW_PRIVS = 38


class StartupError(Exception):
    """A problem found before serving: logged as an error, exit status 1."""


class Terminated(Exception):
    pass


# ---------------------------------------------------------------------------
# logging
# ---------------------------------------------------------------------------

_handler: logging.Handler | None = None


def setup_logging(level: str, syslog: bool = False, *,
                  address: str = SYSLOG_ADDRESS) -> logging.Handler:
    """Log at `level` to stderr, or to syslog (facility user, as virtiofsd; if that cannot be
    reached, to stderr with a warning).  Replaces the handler an earlier call installed."""
    global _handler
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
        _handler.close()
    problem = None
    handler: logging.Handler
    if syslog:
        try:
            _probe_syslog(address)   # SysLogHandler itself only complains at the first message
            handler = logging.handlers.SysLogHandler(
                address=address, facility=logging.handlers.SysLogHandler.LOG_USER)
            handler.setFormatter(logging.Formatter(
                "vfsd[%(process)d]: %(levelname)s %(name)s: %(message)s"))
        except OSError as e:
            problem = f"cannot log to syslog at {address} ({e.strerror or e}); logging to stderr"
            syslog = False
    if not syslog:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s vfsd[%(process)d] %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(_LEVELS[level])
    _handler = handler
    if problem:
        log.warning("%s", problem)
    return handler


def _probe_syslog(address: str) -> None:
    """Raises OSError unless a syslog daemon listens on the unix socket `address`."""
    last: OSError | None = None
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        s = socket.socket(socket.AF_UNIX, kind)
        try:
            s.connect(address)
            return
        except OSError as e:
            last = e
        finally:
            s.close()
    raise last


def _on_signal(signum, frame):
    raise Terminated(signal.Signals(signum).name)


# ---------------------------------------------------------------------------
# pieces of start-up, each testable on its own
# ---------------------------------------------------------------------------

def session_options(config: Config) -> SessionOptions:
    t = config.entry_timeout
    return SessionOptions(entry_timeout=t, attr_timeout=t,
                          direct_io=config.cache == "never",
                          keep_cache=config.cache == "always",
                          readdirplus=config.effective_readdirplus,
                          readdirplus_readahead=config.readdirplus_readahead,
                          writeback=config.writeback,
                          xattr=config.xattr, posix_acl=config.posix_acl and config.xattr,
                          security_label=config.security_label,
                          killpriv_v2=config.killpriv_v2,
                          announce_submounts=config.announce_submounts,
                          allow_mmap=config.allow_mmap)


def check_shared_dir(path: str) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        raise StartupError(f"shared directory {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"shared directory {path}: not a directory")


def fd_budget(limit: int) -> int:
    """How many of the guest's inodes may hold an O_PATH fd at once under an
    RLIMIT_NOFILE of `limit`.  The rest of the limit is for what else takes
    fds: the guest's open files and directories (a handle each), the fds
    closed over the budget but not yet released (vfsd/grace.py, a sixteenth
    of the budget at a time), the vrings' eventfds, guest memory, sockets."""
    return max(limit - max(limit // 4, 128), 16)


#: PassthroughFs keyword arguments that map to options: name -> (value from the Config,
#: the value that needs no support).  Each is passed when the filesystem takes it; a build
#: whose filesystem lacks one says so, or refuses the option where ignoring it would serve
#: the guest something else than asked (see filesystem()).
def filesystem(config: Config, fs_class=PassthroughFs, budget: int | None = None):
    """The PassthroughFs for `config`, checked for user.* xattr support;
    `budget`: its fd budget (PassthroughFs's `fd_budget`)."""
    kwargs = dict(fd_budget=budget, record_name=config.record_name, uidmap=config.uidmap,
                  gidmap=config.gidmap, readonly=config.readonly,
                  posix_acl=config.posix_acl and config.xattr,
                  allow_direct_io=config.allow_direct_io,
                  preserve_noatime=config.preserve_noatime,
                  xattrmap=XattrMap(config.xattrmap) if config.xattrmap else None,
                  writeback=config.writeback)
    try:
        fs = fs_class(config.shared_dir, **kwargs)
    except OSError as e:
        raise StartupError(f"shared directory {config.shared_dir}: {e.strerror or e}") from None
    try:
        fs.check_xattr_support()
    except OSError as e:
        raise StartupError(f"shared directory {config.shared_dir}: {e.strerror or e}") from None
    return fs


def setup_rlimit_nofile(requested: int | None) -> int:
    """virtiofsd's --rlimit-nofile: N sets soft and hard limit to N; 0 leaves the limit;
    unset raises the soft limit to min(1000000, fs.nr_open) if it is lower - as far as the
    hard limit allows an unprivileged process (virtiofsd likewise falls back to the hard
    limit).  Returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if requested == 0:
        return soft
    try:
        with open("/proc/sys/fs/nr_open") as f:
            nr_open = int(f.read())
    except (OSError, ValueError):
        nr_open = DEFAULT_NOFILE
    if requested is not None:
        if requested > nr_open:
            raise StartupError(f"--rlimit-nofile={requested}: cannot be increased above "
                               f"{nr_open} (fs.nr_open)")
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (requested, requested))
        except (OSError, ValueError) as e:
            raise StartupError(f"--rlimit-nofile={requested}: cannot set the limit "
                               f"(hard limit {hard}): {getattr(e, 'strerror', None) or e}") from None
        return requested
    target = min(DEFAULT_NOFILE, nr_open)
    if soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(target, hard)))
        return target
    except (OSError, ValueError):
        pass
    new = hard if hard != resource.RLIM_INFINITY else target
    if new > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            log.debug("RLIMIT_NOFILE soft limit raised to the hard limit %d", new)
            return new
        except (OSError, ValueError) as e:
            log.warning("cannot raise RLIMIT_NOFILE from %d: %s", soft, e)
    return soft


def apply_process_options(config: Config) -> None:
    """virtiofsd's sandboxing options, mapped to what an unprivileged vfsd does (and said so
    in the log, never silently); see docs/virtiofsd-compat.md."""
    confinement = ("every guest path is resolved one checked name component at a time "
                   "from O_PATH descriptors with O_NOFOLLOW, so nothing outside the shared "
                   "directory is reachable")
    if config.sandbox in ("namespace", "chroot"):
        log.info("--sandbox=%s: vfsd runs unprivileged and creates no namespace nor chroot; "
                 "it confines itself to the share instead: %s", config.sandbox, confinement)
    elif config.sandbox is None:
        log.debug("no --sandbox: confined to the share by path resolution (%s)", confinement)
    if config.seccomp != "none":
        _set_no_new_privs()
        msg = ("installs no seccomp syscall filter (the Python runtime's syscalls are not a "
               "fixed set); no_new_privs is set instead")
        if config.seccomp is None:
            log.debug("vfsd %s", msg)
        else:
            log.info("--seccomp=%s: vfsd %s", config.seccomp, msg)
    if config.modcaps:
        log.info("--modcaps=%s: vfsd neither uses nor manages capabilities; nothing changed",
                 ":".join(a + n for a, n in config.modcaps))
    if os.geteuid() == 0:
        log.warning("running as root: vfsd needs no privileges; run it as an ordinary user")
    if config.inode_file_handles == "prefer":
        log.info("--inode-file-handles=prefer: vfsd refers to inodes by O_PATH descriptors "
                 "(file handles need CAP_DAC_READ_SEARCH)")
    if (config.migration_mode, config.migration_on_error) != ("find-paths", "abort") or \
            config.migration_verify_handles or config.migration_confirm_paths:
        log.info("--migration-*: vfsd does not offer migration of its state (no "
                 "migrate-precopy capability); these options have no effect")
    if config.tag is not None:
        log.info("--tag=%s: vfsd does not offer the device configuration space; the guest "
                 "sees the tag set on QEMU's vhost-user-fs-pci device", config.tag)


def _set_no_new_privs() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_NO_NEW_PRIVS): %s", os.strerror(ctypes.get_errno()))


class PidFile:
    """``<socket-path>.pid``, created mode 0600 and flock()ed (LOCK_EX | LOCK_NB) as long as
    the daemon runs; holds the pid.  Taken before the socket is touched, so a second daemon
    for the same socket fails instead of replacing the first one's socket."""

    def __init__(self, path: str):
        self.path = path
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as e:
                raise StartupError(f"cannot create pid file {path}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                other = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise StartupError(
                        f"{path} is locked: another daemon (pid {other or '?'}) serves this "
                        "socket") from None
                raise StartupError(f"cannot lock pid file {path}: {e.strerror}") from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # removed or replaced by its previous owner meanwhile: again
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1


def create_socket(config: Config) -> tuple[socket.socket, PidFile]:
    """--socket-path: checks, pid file, listening socket, --socket-group."""
    path = config.socket_path
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise StartupError(f"socket path {path} is too long ({len(os.fsencode(path))} bytes; "
                           f"a unix socket path has at most {MAX_SOCKET_PATH})")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise StartupError(f"socket path {path}: {parent} does not exist or is not a directory")
    gid = None
    if config.socket_group is not None:
        gid = _group_id(config.socket_group)
    pid_file = PidFile(path + ".pid")
    try:
        try:
            listener = listen_unix(path)
        except OSError as e:
            raise StartupError(f"cannot listen on {path}: {e.strerror or e}") from None
        if gid is not None:
            try:
                os.chown(path, -1, gid)
                os.chmod(path, 0o660)
            except OSError as e:
                listener.close()
                _unlink(path)
                raise StartupError(
                    f"--socket-group={config.socket_group}: cannot give {path} to group "
                    f"{gid}: {e.strerror} (the daemon's user must be a member of the group)"
                ) from None
    except BaseException:
        pid_file.release()
        raise
    return listener, pid_file


def _group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise StartupError(f"--socket-group={name}: no such group") from None


def inherited_socket(fd: int) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise StartupError(f"--fd={fd}: not a usable socket: {e.strerror}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise StartupError(f"--fd={fd} is not a unix stream socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise StartupError(f"--fd={fd} is not a listening socket (the frontend connects to "
                           "it: bind and listen before passing it)")
    return sock


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            log.debug("could not remove %s: %s", path, e)


# ---------------------------------------------------------------------------
# the daemon
# ---------------------------------------------------------------------------

def run(config: Config) -> int:
    setup_logging(config.log_level, config.syslog)
    for level, message in config.notes:
        log.log(_LEVELS.get(level, logging.INFO), "%s", message)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    listener = None
    pid_file = None
    created_socket = False
    try:
        check_shared_dir(config.shared_dir)
        limit = setup_rlimit_nofile(config.rlimit_nofile)
        budget = fd_budget(limit)
        log.debug("RLIMIT_NOFILE %d: at most %d inodes hold an fd", limit, budget)
        if limit < 100_000:
            # One O_PATH fd per inode the guest holds, up to the budget; past
            # it the oldest are closed and reopened by name when used (a
            # `find` over a large tree gets there).
            log.info("RLIMIT_NOFILE is %d: past %d inodes held by the guest, vfsd closes the "
                     "fds of the oldest and reopens them by name when the guest uses them; "
                     "raise the hard limit (LimitNOFILE=, ulimit -Hn) to avoid that",
                     limit, budget)
        apply_process_options(config)
        fs = filesystem(config, budget=budget)
        server = FuseServer(fs, session_options(config))
        device = VirtioFsDevice(server, num_request_queues=config.num_request_queues,
                                thread_pool_size=config.thread_pool_size)
        if config.fd is not None:
            listener = inherited_socket(config.fd)
        else:
            listener, pid_file = create_socket(config)
            created_socket = True
        log.info("sharing %s as uid %d gid %d, records in %s; waiting for the frontend on %s",
                 config.shared_dir, os.getuid(), os.getgid(), config.record_name,
                 config.socket_path or f"fd {config.fd}")
        conn = accept_one(listener)
        listener.close()
        log.info("frontend connected")
        VhostUserBackend(device, poll_max_us=config.poll_max_us).serve_connection(conn)
        log.info("frontend disconnected; exiting")
        return 0
    except StartupError as e:
        log.error("%s", e)
        return 1
    except Terminated as e:
        log.info("terminated by %s", e)
        return 0
    finally:
        # Leaving anyway: a termination signal from now on (an orchestrator stopping a
        # daemon whose frontend just left) would turn a clean exit into an error - a
        # Terminated outside this function, or, once the interpreter's teardown has put
        # the default action back, death by the signal.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if created_socket:
            _unlink(config.socket_path)
        if pid_file is not None:
            pid_file.release()
