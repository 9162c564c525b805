"""Process life cycle: validate, listen, serve one frontend, exit.

vhost-user backend conventions (QEMU docs/interop/vhost-user.rst, "Backend
program conventions"): never daemonize, serve the socket given by
--socket-path or --fd, exit when the frontend goes away.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import stat
import sys

from protocol.vhost_user import VhostUserBackend, accept_one, listen_unix

from .config import Config
from .passthrough import PassthroughFs
from .server import FuseServer, SessionOptions
from .transport import VirtioFsDevice

log = logging.getLogger("vfsd")

_LEVELS = {"error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO,
           "debug": logging.DEBUG, "trace": logging.DEBUG, "off": logging.CRITICAL + 1}


def setup_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=_LEVELS[level],
                        format="%(asctime)s vfsd[%(process)d] %(levelname)s %(name)s: "
                               "%(message)s")


class Terminated(Exception):
    pass


def _on_signal(signum, frame):
    raise Terminated(signal.Signals(signum).name)


def session_options(config: Config) -> SessionOptions:
    t = config.timeout
    return SessionOptions(entry_timeout=t, attr_timeout=t,
                          direct_io=config.cache == "never",
                          keep_cache=config.cache == "always",
                          readdirplus=config.readdirplus, writeback=config.writeback)


def _listening_socket(config: Config) -> socket.socket:
    if config.fd is not None:
        try:
            sock = socket.socket(fileno=config.fd)
        except OSError as e:
            raise SystemExit(f"vfsd: --fd {config.fd}: not a usable socket: {e.strerror}")
        if sock.family != socket.AF_UNIX:
            raise SystemExit(f"vfsd: --fd {config.fd} is not a unix socket")
        return sock
    try:
        return listen_unix(config.socket_path)
    except OSError as e:
        raise SystemExit(f"vfsd: cannot listen on {config.socket_path}: {e.strerror}")


def run(config: Config) -> int:
    setup_logging(config.log_level)
    try:
        st = os.stat(config.shared_dir)
    except OSError as e:
        print(f"vfsd: shared directory {config.shared_dir}: {e.strerror}", file=sys.stderr)
        return 1
    if not stat.S_ISDIR(st.st_mode):
        print(f"vfsd: shared directory {config.shared_dir}: not a directory", file=sys.stderr)
        return 1
    fs = PassthroughFs(config.shared_dir, record_name=config.record_name,
                       uidmap=config.uidmap, gidmap=config.gidmap, readonly=config.readonly)
    try:
        fs.check_xattr_support()
    except OSError as e:
        print(f"vfsd: shared directory {config.shared_dir}: {e.strerror or e}", file=sys.stderr)
        return 1
    server = FuseServer(fs, session_options(config))
    device = VirtioFsDevice(server, num_request_queues=config.num_request_queues,
                            thread_pool_size=config.thread_pool_size)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        listener = _listening_socket(config)
        log.info("sharing %s as uid %d gid %d, records in %s; waiting for the frontend on %s",
                 config.shared_dir, os.getuid(), os.getgid(), config.record_name,
                 config.socket_path or f"fd {config.fd}")
        conn = accept_one(listener)
        listener.close()
        log.info("frontend connected")
        VhostUserBackend(device).serve_connection(conn)
        log.info("frontend disconnected; exiting")
        return 0
    except Terminated as e:
        log.info("terminated by %s", e)
        return 0
    finally:
        if config.socket_path:
            try:
                os.unlink(config.socket_path)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    log.debug("could not remove %s: %s", config.socket_path, e)
