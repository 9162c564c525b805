"""The `vfsd` command line (virtiofsd's spelling where the option exists there)."""

from __future__ import annotations

import argparse
import json
import sys

from .config import CACHE_TIMEOUTS, Config
from .ownership import IdMap

# What libvirt reads from --print-capabilities (QEMU docs/interop/vhost-user.json,
# "fs" backends): separate-options means libvirt may pass --shared-dir etc.
CAPABILITIES = {"type": "fs", "features": ["separate-options"]}

LOG_LEVELS = ("error", "warn", "info", "debug", "trace", "off")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vfsd",
        description="virtio-fs daemon (vhost-user backend) for QEMU that runs as an ordinary "
                    "user: the guest's owners, modes and device nodes are kept in a user.* "
                    "xattr record on each host file, which stays owned by the daemon's user.",
    )
    p.add_argument("--shared-dir", metavar="DIR",
                   help="directory to share with the guest (required unless "
                        "--print-capabilities)")
    sock = p.add_mutually_exclusive_group()
    sock.add_argument("--socket-path", metavar="PATH",
                      help="create a vhost-user listening socket at PATH (a stale socket file "
                           "is replaced; the socket is mode 0600)")
    sock.add_argument("--socket", dest="socket_path", metavar="PATH",
                      help=argparse.SUPPRESS)  # deprecated virtiofsd alias of --socket-path
    sock.add_argument("--fd", type=int, metavar="N",
                      help="serve the already listening socket inherited as file descriptor N "
                           "(how libvirt starts vhost-user backends)")
    p.add_argument("--thread-pool-size", type=int, default=0, metavar="N",
                   help="handle requests on a pool of N threads (0: on each queue's own "
                        "thread; default 0)")
    p.add_argument("--cache", choices=sorted(CACHE_TIMEOUTS), default="auto",
                   help="guest caching: never (no caching, direct I/O), metadata (cache "
                        "attributes and names only), auto (1 s timeouts), always (cache "
                        "everything, for shares nobody else changes); default auto")
    p.add_argument("--readonly", action="store_true",
                   help="refuse every change to the share (EROFS)")
    p.add_argument("--no-readdirplus", dest="readdirplus", action="store_false",
                   help="do not offer READDIRPLUS to the guest")
    p.add_argument("--writeback", action="store_true",
                   help="let the guest use a writeback page cache")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                   help="log verbosity on stderr (default info)")
    p.add_argument("--print-capabilities", action="store_true",
                   help="print the vhost-user backend capabilities JSON (for libvirt) and exit")
    own = p.add_argument_group("guest ownership")
    own.add_argument("--record-name", default="user.o", metavar="XATTR",
                     help="name of the user.* xattr that holds each inode's guest owner, mode "
                          "and device number (default user.o; a guest's own use of the name "
                          "is escaped one level, e.g. user.o.o)")
    own.add_argument("--translate-uid", action="append", default=[], metavar="SPEC",
                     help="virtiofsd id translation TYPE:SOURCE:TARGET:COUNT (TYPE guest, host, "
                          "map, squash-guest, squash-host, forbid-guest); in vfsd the host-to-"
                          "guest direction gives the owner shown for host files without a "
                          "record. Repeatable. Default: identity")
    own.add_argument("--translate-gid", action="append", default=[], metavar="SPEC",
                     help="as --translate-uid, for group ids")
    own.add_argument("--uid-map", action="append", default=[], metavar=":NS:HOST:COUNT:",
                     help="virtiofsd namespace id map; in vfsd (which needs no user namespace) "
                          "it acts as the equivalent host-to-guest translation")
    own.add_argument("--gid-map", action="append", default=[], metavar=":NS:HOST:COUNT:",
                     help="as --uid-map, for group ids")
    return p


def parse_args(argv: list[str] | None = None) -> Config | None:
    """Returns the Config, or None when the request was served already
    (--print-capabilities).  Exits with status 2 on usage errors."""
    p = build_parser()
    a = p.parse_args(argv)
    if a.print_capabilities:
        print(json.dumps(CAPABILITIES, indent=2))
        return None
    if not a.shared_dir:
        p.error("--shared-dir is required")
    if a.socket_path is None and a.fd is None:
        p.error("one of --socket-path or --fd is required")
    if a.thread_pool_size < 0:
        p.error("--thread-pool-size must be >= 0")
    try:
        uidmap = IdMap.parse(a.translate_uid + a.uid_map)
        gidmap = IdMap.parse(a.translate_gid + a.gid_map)
    except ValueError as e:
        p.error(str(e))
    if not a.record_name.startswith("user.") or len(a.record_name) <= len("user."):
        p.error("--record-name must be a user.* xattr name, e.g. user.o")
    return Config(shared_dir=a.shared_dir, socket_path=a.socket_path, fd=a.fd,
                  thread_pool_size=a.thread_pool_size, log_level=a.log_level, cache=a.cache,
                  readonly=a.readonly, readdirplus=a.readdirplus, writeback=a.writeback,
                  record_name=a.record_name, uidmap=uidmap, gidmap=gidmap)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    if config is None:
        return 0
    from .daemon import run  # imported late: --help/--print-capabilities stay light
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
