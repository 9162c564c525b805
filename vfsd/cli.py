"""The `vfsd` command line: virtiofsd's (1.13) options and spellings, plus vfsd's own.

Every virtiofsd option is accepted - ``--opt=value`` and ``--opt value``, the deprecated
``--socket``, ``-d`` and ``-f``, and the legacy ``-o key=value,...`` form (vfsd.legacy_options)
- so a script or libvirt domain written for virtiofsd runs vfsd unchanged.  Each one either
does what it does in virtiofsd or has a documented vfsd meaning (docs/virtiofsd-compat.md);
one that cannot apply is refused with a clear message rather than ignored.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import (DEFAULT_POLL_MAX_US, INODE_FILE_HANDLES, LOG_LEVELS, MIGRATION_MODES,
                     MIGRATION_ON_ERROR, SANDBOX_MODES, SECCOMP_ACTIONS, Config, ConfigError,
                     check_tag, parse_modcaps, parse_xattrmap)
from .legacy_options import LegacyOptionError, apply_legacy_options
from .ownership import IdMap

# What libvirt reads from --print-capabilities (QEMU docs/interop/vhost-user.json,
# "fs" backends): separate-options means libvirt may pass --shared-dir etc.  vfsd does not
# list virtiofsd's "migrate-precopy": it cannot hand its state to another instance.
CAPABILITIES = {"type": "fs", "features": ["separate-options"]}

#: --cache also takes "none", the legacy spelling of "never" (-o cache=none).
CACHE_CHOICES = ("auto", "always", "never", "metadata", "none")

DOCS = "docs/virtiofsd-compat.md"


def version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version as dist_version
        try:
            return dist_version("vfsd")
        except PackageNotFoundError:
            pass
        import tomllib
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        with open(pyproject, "rb") as f:
            return tomllib.load(f)["project"]["version"]
    except Exception:  # noqa: BLE001 - a version string is not worth failing for
        return "unknown"


def _lower(s: str) -> str:
    return s.lower()


def _nonneg_int(s: str) -> int:
    try:
        v = int(s, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vfsd", allow_abbrev=False,
        usage="vfsd --shared-dir DIR (--socket-path PATH | --fd N) [OPTIONS]\n"
              "       vfsd --print-capabilities | -V | -h",
        description="virtio-fs daemon (vhost-user backend) for QEMU that runs as an ordinary "
                    "user: the guest's owners, modes and device nodes are kept in a user.* "
                    "xattr record on each host file, which stays owned by the daemon's user. "
                    "It takes virtiofsd's options (including the legacy -o form).",
        epilog=f"What vfsd does with each virtiofsd option: {DOCS}.")
    A = p.add_argument
    A("-V", "--version", action="version", version=f"vfsd {version()}")
    A("--print-capabilities", action="store_true",
      help="print the vhost-user backend capabilities JSON (for libvirt) and exit")

    g = p.add_argument_group("share and socket")
    G = g.add_argument
    G("--shared-dir", metavar="DIR",
      help="directory to share with the guest (or -o source=DIR)")
    G("--socket-path", metavar="PATH",
      help="create the vhost-user listening socket at PATH (a stale socket is replaced; mode "
           "0600) and a locked pid file PATH.pid")
    G("--socket", dest="socket_alias", metavar="PATH",
      help="deprecated alias of --socket-path")
    G("--fd", type=_nonneg_int, metavar="N",
      help="serve the listening socket inherited as file descriptor N (how libvirt starts "
           "vhost-user backends)")
    G("--socket-group", metavar="GROUP",
      help="give the socket to GROUP and make it group-accessible (mode 0660); the daemon's "
           "user must be a member")
    G("--tag", metavar="TAG",
      help="virtio-fs tag (checked; the guest sees the tag set on QEMU's vhost-user-fs-pci "
           "device, see " + DOCS + ")")
    G("--thread-pool-size", type=_nonneg_int, default=0, metavar="N",
      help="serve requests that may wait on the host's disk (data, syncs, creating and "
           "removing names) on a pool of N threads, the rest inline on the one thread that "
           "serves every queue (0: everything on that thread; default 0)")
    G("--poll-max-us", type=_nonneg_int, default=DEFAULT_POLL_MAX_US, metavar="US",
      help="after serving requests, watch the queues for the guest's next request for up to "
           "US microseconds before sleeping: saves a wake-up per request, at the price of CPU "
           "while the guest is busy with the share (the window adapts to the guest's pace, "
           "and a guest that pauses longer is not polled for; 0: never poll; default "
           f"{DEFAULT_POLL_MAX_US})")
    G("--readonly", action="store_true", help="refuse every change to the share (EROFS)")

    g = p.add_argument_group("what the guest gets")
    G = g.add_argument
    G("--cache", type=_lower, choices=CACHE_CHOICES, default="auto",
      help="guest caching: never (no caching, direct I/O; 'none' is accepted too), metadata "
           "(attributes and names only), auto (1 s timeouts), always (cache everything, for "
           "shares nobody else changes); default auto")
    G("--xattr", dest="xattr", action="store_const", const=True, default=None,
      help="guest extended attributes (default off, as in virtiofsd; the ownership records "
           "are kept either way)")
    G("--no-xattr", dest="xattr", action="store_const", const=False,
      help="no guest extended attributes (the default; overridden by the options that imply "
           "--xattr)")
    G("--posix-acl", dest="posix_acl", action="store_const", const=True, default=None,
      help="POSIX ACLs enforced by the guest kernel (default off, as in virtiofsd, also with "
           "--xattr; implies --xattr)")
    G("--no-posix-acl", dest="posix_acl", action="store_const", const=False,
      help="no POSIX ACL support (the default)")
    G("--xattrmap", metavar="MAP",
      help="virtiofsd's xattr name mapping rules, e.g. ':prefix:all::user.virtiofs.::bad:all:::' "
           "(implies --xattr)")
    G("--security-label", action="store_true",
      help="accept security labels from the guest at file creation (implies --xattr)")
    G("--no-readdirplus", dest="readdirplus", action="store_false",
      help="do not offer READDIRPLUS (it is never offered with --cache=never)")
    G("--no-readdirplus-readahead", dest="readdirplus_readahead", action="store_false",
      help="make each READDIRPLUS reply when it is asked for, not the next one of a listing "
           "while the guest reads the last (vfsd's own; see " + DOCS + ")")
    G("--writeback", action="store_true", help="let the guest use a writeback page cache")
    G("--allow-direct-io", action="store_true",
      help="honour O_DIRECT from guest applications (default: dropped)")
    G("--allow-mmap", action="store_true",
      help="with --cache=never or metadata, let the guest mmap shared files")
    G("--killpriv-v2", dest="killpriv_v2", action="store_const", const=True, default=True,
      help="FUSE_HANDLE_KILLPRIV_V2: the daemon, not the guest kernel, clears setuid/setgid "
           "and capabilities on writes, truncates and chowns (the default; virtiofsd's is off)")
    G("--no-killpriv-v2", dest="killpriv_v2", action="store_const", const=False,
      help="no KILLPRIV_V2: the guest kernel clears them, at a GETATTR more per chown")
    G("--announce-submounts", dest="announce_submounts", action="store_const", const=True,
      default=True, help="tell the guest which directories are mount points (the default)")
    G("--no-announce-submounts", dest="announce_submounts", action="store_const",
      const=False, help="do not tell the guest about mount points")
    G("--preserve-noatime", action="store_true",
      help="keep O_NOATIME from guest opens (default: dropped, as in virtiofsd)")

    g = p.add_argument_group("process (virtiofsd's; see " + DOCS + " for vfsd's meaning)")
    G = g.add_argument
    G("--log-level", type=_lower, choices=LOG_LEVELS, default="info",
      help="log verbosity (default info)")
    G("-d", dest="compat_debug", action="store_true",
      help="deprecated: same as --log-level debug")
    G("--syslog", action="store_true", help="log to syslog (facility user) instead of stderr")
    G("-f", dest="compat_foreground", action="store_true",
      help="no effect: vfsd always runs in the foreground")
    G("--rlimit-nofile", type=_nonneg_int, metavar="N",
      help="set RLIMIT_NOFILE to N (0: leave it); default: raise the soft limit towards "
           "min(1000000, fs.nr_open), as far as the hard limit allows")
    G("--sandbox", type=_lower, choices=SANDBOX_MODES, default=None,
      help="namespace (virtiofsd's default), chroot or none: vfsd creates no namespace and "
           "does no chroot (it is unprivileged); with namespace or chroot it relies on its own "
           "confinement to the share, and says so in the log")
    G("--seccomp", type=_lower, choices=SECCOMP_ACTIONS, default=None,
      help="none, kill (virtiofsd's default), log or trap: vfsd installs no syscall filter; "
           "anything but none sets no_new_privs instead")
    G("--modcaps", metavar="CAPS",
      help="virtiofsd's capability changes, e.g. +sys_admin:-chown: checked; vfsd uses no "
           "capabilities, so there is nothing to change")
    G("--inode-file-handles", type=_lower, choices=INODE_FILE_HANDLES, default=None,
      help="never or prefer: vfsd always refers to inodes by O_PATH descriptors; mandatory is "
           "refused (file handles need CAP_DAC_READ_SEARCH)")
    G("--migration-mode", type=_lower, choices=MIGRATION_MODES, default="find-paths",
      help="checked; vfsd offers no migration of its state (no migrate-precopy)")
    G("--migration-on-error", type=_lower, choices=MIGRATION_ON_ERROR, default="abort",
      help="checked; no effect (see --migration-mode)")
    G("--migration-verify-handles", action="store_true", help="no effect (see --migration-mode)")
    G("--migration-confirm-paths", action="store_true", help="no effect (see --migration-mode)")
    G("-o", dest="compat_options", action="append", metavar="OPT[,OPT...]",
      help="legacy virtiofsd options: source=DIR, cache=auto|always|none|metadata, xattr, "
           "no_xattr, posix_acl, timeout=SECONDS, writeback, no_readdirplus, ... (',,' is a "
           "literal comma)")
    G("--daemonize", action="store_true", help=argparse.SUPPRESS)  # C virtiofsd: refused

    own = p.add_argument_group("guest ownership (vfsd)")
    O = own.add_argument
    O("--record-name", default="user.o", metavar="XATTR",
      help="name of the user.* xattr that holds each inode's guest owner, mode and device "
           "number (default user.o; a guest's own use of the name is escaped one level, e.g. "
           "user.o.o)")
    O("--translate-uid", action="append", default=[], metavar="SPEC",
      help="virtiofsd id translation TYPE:SOURCE:TARGET:COUNT (TYPE guest, host, map, "
           "squash-guest, squash-host, forbid-guest); in vfsd the host-to-guest direction gives "
           "the owner shown for host files without a record. Repeatable. Default: identity")
    O("--translate-gid", action="append", default=[], metavar="SPEC",
      help="as --translate-uid, for group ids")
    O("--uid-map", action="append", default=[], metavar=":NS:HOST:COUNT:",
      help="virtiofsd namespace id map; in vfsd (which needs no user namespace) it acts as "
           "the equivalent host-to-guest translation")
    O("--gid-map", action="append", default=[], metavar=":NS:HOST:COUNT:",
      help="as --uid-map, for group ids")
    return p


def parse_args(argv: list[str] | None = None) -> Config | None:
    """Returns the Config, or None when the request was served already
    (--print-capabilities).  Exits with status 2 on usage errors."""
    p = build_parser()
    a = p.parse_args(argv)
    notes: list[tuple[str, str]] = []
    if a.compat_options:
        try:
            apply_legacy_options(a, a.compat_options, notes)
        except LegacyOptionError as e:
            p.error(str(e))
        notes.append(("info", "the legacy -o option form is deprecated in virtiofsd (vfsd "
                              "accepts it): e.g. --cache auto instead of -o cache=auto"))
    if a.print_capabilities:
        print(json.dumps(CAPABILITIES, indent=2))
        return None
    if a.daemonize:
        p.error("--daemonize: vfsd never daemonizes (a vhost-user backend stays in the "
                "foreground); start it in the background from your shell or service manager")

    # -- share and socket ----------------------------------------------------------------
    if not a.shared_dir:
        p.error('missing "--shared-dir" or "-o source" option')
    socket_path = a.socket_path
    if a.socket_alias is not None:
        if socket_path is not None and socket_path != a.socket_alias:
            p.error("--socket and --socket-path name different sockets")
        socket_path = a.socket_alias
        notes.append(("warn", "--socket is deprecated: use --socket-path"))
    if socket_path is None and a.fd is None:
        p.error("one of --socket-path or --fd is required")
    if socket_path is not None and a.fd is not None:
        p.error("--fd cannot be used with --socket-path (or --socket)")
    if socket_path == "":
        p.error("--socket-path must not be empty")
    if a.socket_group is not None and a.fd is not None:
        p.error("--socket-group cannot be used with --fd (the socket is not vfsd's to change)")
    try:
        tag = check_tag(a.tag) if a.tag is not None else None
        xattrmap = parse_xattrmap(a.xattrmap) if a.xattrmap is not None else None
        modcaps = parse_modcaps(a.modcaps) if a.modcaps is not None else ()
    except ConfigError as e:
        p.error(str(e))

    # -- xattrs: off unless asked for, as in virtiofsd.  --posix-acl, --security-label and
    # --xattrmap imply --xattr; ACLs need --posix-acl (--xattr alone does not turn them on).
    posix_acl = bool(a.posix_acl)
    xattr = bool(a.xattr) or posix_acl or a.security_label or xattrmap is not None

    # -- process ---------------------------------------------------------------------------
    log_level = "debug" if a.compat_debug else a.log_level
    if a.compat_debug:
        notes.append(("warn", "-d is deprecated: use --log-level debug"))
    if a.compat_foreground:
        notes.append(("info", "-f has no effect: vfsd always runs in the foreground"))
    cache = "never" if a.cache == "none" else a.cache
    ifh = a.inode_file_handles or "never"
    if ifh == "mandatory":
        p.error("--inode-file-handles=mandatory: vfsd never uses file handles "
                "(open_by_handle_at needs CAP_DAC_READ_SEARCH, which an unprivileged daemon "
                "does not have); use never or prefer")
    if ifh == "fallback":
        notes.append(("warn", "--inode-file-handles=fallback is deprecated: use prefer"))
    if a.migration_mode == "file-handles":
        for opt in ("migration_confirm_paths", "migration_verify_handles"):
            if getattr(a, opt):
                p.error(f"cannot use --{opt.replace('_', '-')} with "
                        "--migration-mode=file-handles (because it is unnecessary)")

    # -- ownership (vfsd) ------------------------------------------------------------------
    try:
        uidmap = IdMap.parse(a.translate_uid + a.uid_map)
        gidmap = IdMap.parse(a.translate_gid + a.gid_map)
    except ValueError as e:
        p.error(str(e))
    if not a.record_name.startswith("user.") or len(a.record_name) <= len("user."):
        p.error("--record-name must be a user.* xattr name, e.g. user.o")

    return Config(
        shared_dir=a.shared_dir, socket_path=socket_path, fd=a.fd,
        socket_group=a.socket_group, tag=tag, thread_pool_size=a.thread_pool_size,
        poll_max_us=a.poll_max_us,
        log_level=log_level, syslog=a.syslog, cache=cache,
        timeout=getattr(a, "timeout", None), readonly=a.readonly, readdirplus=a.readdirplus,
        readdirplus_readahead=a.readdirplus_readahead,
        writeback=a.writeback, xattr=xattr, posix_acl=posix_acl, xattrmap=xattrmap,
        security_label=a.security_label, killpriv_v2=a.killpriv_v2,
        announce_submounts=a.announce_submounts, allow_direct_io=a.allow_direct_io,
        allow_mmap=a.allow_mmap, preserve_noatime=a.preserve_noatime,
        sandbox=a.sandbox, seccomp=a.seccomp, modcaps=modcaps, rlimit_nofile=a.rlimit_nofile,
        inode_file_handles="prefer" if ifh == "fallback" else ifh,
        migration_mode=a.migration_mode, migration_on_error=a.migration_on_error,
        migration_verify_handles=a.migration_verify_handles,
        migration_confirm_paths=a.migration_confirm_paths,
        record_name=a.record_name, uidmap=uidmap, gidmap=gidmap, notes=notes)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    if config is None:
        return 0
    from .daemon import run  # imported late: --help/--print-capabilities stay light
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
