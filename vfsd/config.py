"""One validated configuration, built from the command line by `vfsd.cli`.

The option values follow virtiofsd (current upstream, 1.13); docs/virtiofsd-compat.md says
what vfsd does with each.  Everything here is pure: parsing and validation, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .ownership import IdMap

# --cache: how long the guest may trust what it was told (virtiofsd's modes).
CACHE_TIMEOUTS = {"never": 0.0, "metadata": 86400.0, "auto": 1.0, "always": 86400.0}

LOG_LEVELS = ("error", "warn", "info", "debug", "trace", "off")
SANDBOX_MODES = ("namespace", "chroot", "none")
SECCOMP_ACTIONS = ("none", "kill", "log", "trap")
# "fallback" is virtiofsd's deprecated alias of "prefer".
INODE_FILE_HANDLES = ("never", "prefer", "fallback", "mandatory")
MIGRATION_MODES = ("find-paths", "file-handles")
MIGRATION_ON_ERROR = ("abort", "guest-error")

#: --poll-max-us: the longest the ring worker watches the queues for the guest's next
#: request before it sleeps.  A sleeping thread's wake-up costs ~40 µs on the project's
#: (virtual) machines, and a TCG guest's next request comes 100-300 µs after a reply.
#: Against no polling, windows of 100, 200 and 300 µs took 1.01x, 0.90x and 0.78-0.85x
#: of the time, and 600 µs took 0.99x of 300's for 1.2x its CPU (docs/performance.md,
#: "At bc7041a").
DEFAULT_POLL_MAX_US = 300

#: virtio-fs tag: at most 36 bytes (virtio spec 5.11.4, struct virtio_fs_config).
MAX_TAG_LEN = 36

# Capability names (linux/capability.h, CAP_ prefix dropped, lower case), for --modcaps.
CAPABILITIES = frozenset("""
chown dac_override dac_read_search fowner fsetid kill setgid setuid setpcap
linux_immutable net_bind_service net_broadcast net_admin net_raw ipc_lock ipc_owner
sys_module sys_rawio sys_chroot sys_ptrace sys_pacct sys_admin sys_boot sys_nice
sys_resource sys_time sys_tty_config mknod lease audit_write audit_control setfcap
mac_override mac_admin syslog wake_alarm block_suspend audit_read perfmon bpf
checkpoint_restore""".split())


class ConfigError(ValueError):
    """An option value that does not parse; the message names the option."""


# ---------------------------------------------------------------------------
# --xattrmap
# ---------------------------------------------------------------------------

XATTRMAP_TYPES = ("prefix", "ok", "bad", "unsupported", "map")
XATTRMAP_SCOPES = ("all", "client", "server")


@dataclass(frozen=True)
class XattrRule:
    """One --xattrmap rule, as virtiofsd's documentation defines it.

    type: "prefix" (client names get `prepend` put in front; server names starting with
    `prepend` lose it), "ok" (pass unchanged), "bad" (client: EPERM; server: hidden) or
    "unsupported" (client: ENOTSUP; server: hidden).  scope: "client" (matches client names
    starting with `key`), "server" (server names starting with `prepend`) or "all".  The
    first matching rule applies.  A `:map:KEY:PREPEND:` rule is expanded into the rules it
    stands for (see parse_xattrmap)."""
    type: str
    scope: str
    key: str
    prepend: str


def parse_xattrmap(text: str) -> tuple[XattrRule, ...]:
    """Parses virtiofsd's xattrmap syntax: rules ``<d>type<d>scope<d>key<d>prepend<d>`` where
    ``<d>`` is any delimiter character the rule starts with (each rule may use its own),
    optionally separated by whitespace; ``<d>map<d>key<d>prepend<d>`` is shorthand for
    ``prefix/all/key/prepend`` + ``bad/all/prepend/key`` (only with a non-empty key) + a
    terminator (``ok`` with a key, ``bad`` without) and may only be the last rule."""
    rules: list[XattrRule] = []
    s = text.strip()
    i, n = 0, len(s)
    while i < n:
        if s[i].isspace():
            i += 1
            continue
        number = len(rules) + 1
        delim = s[i]
        i += 1
        fields: list[str] = []
        want = None
        while want is None or len(fields) < want:
            j = s.find(delim, i)
            if j < 0:
                raise ConfigError(f"--xattrmap rule {number}: incomplete rule (each field "
                                  f"must end with the delimiter {delim!r})")
            fields.append(s[i:j])
            i = j + 1
            if len(fields) == 1:
                if fields[0] not in XATTRMAP_TYPES:
                    raise ConfigError(f"--xattrmap rule {number}: unknown type {fields[0]!r} "
                                      f"(expected one of {', '.join(XATTRMAP_TYPES)})")
                want = 3 if fields[0] == "map" else 4
        if fields[0] == "map":
            _, key, prepend = fields
            if s[i:].strip():
                raise ConfigError(f"--xattrmap rule {number}: a map rule must be the last rule")
            rules.append(XattrRule("prefix", "all", key, prepend))
            if key:
                rules.append(XattrRule("bad", "all", prepend, key))
            rules.append(XattrRule("ok" if key else "bad", "all", "", ""))
            break
        type_, scope, key, prepend = fields
        if scope not in XATTRMAP_SCOPES:
            raise ConfigError(f"--xattrmap rule {number}: unknown scope {scope!r} "
                              f"(expected one of {', '.join(XATTRMAP_SCOPES)})")
        rules.append(XattrRule(type_, scope, key, prepend))
    if not rules:
        raise ConfigError("--xattrmap: no rules given")
    return tuple(rules)


# ---------------------------------------------------------------------------
# --modcaps, --tag
# ---------------------------------------------------------------------------

def parse_modcaps(text: str) -> tuple[tuple[str, str], ...]:
    """``+sys_admin:-chown`` -> (("+", "sys_admin"), ("-", "chown")); names are
    case-insensitive, with or without the ``cap_`` prefix."""
    out = []
    for item in text.split(":"):
        if not item:
            raise ConfigError("--modcaps: empty entry (expected (+|-)capability:...)")
        action, name = item[0], item[1:].lower()
        if action not in "+-":
            raise ConfigError(f"--modcaps: {item!r} must start with + or -")
        name = name.removeprefix("cap_")
        if name not in CAPABILITIES:
            raise ConfigError(f"--modcaps: unknown capability {item[1:]!r}")
        out.append((action, name))
    return tuple(out)


def check_tag(tag: str) -> str:
    if not tag or len(tag.encode()) > MAX_TAG_LEN:
        raise ConfigError(f"--tag must be 1 to {MAX_TAG_LEN} bytes long")
    return tag


# ---------------------------------------------------------------------------
# The configuration
# ---------------------------------------------------------------------------

@dataclass
class Config:
    shared_dir: str
    socket_path: str | None = None
    fd: int | None = None
    socket_group: str | None = None      # chgrp the socket to this group, mode 0660
    tag: str | None = None               # accepted and checked; the tag is QEMU's (see docs)
    thread_pool_size: int = 0
    poll_max_us: int = DEFAULT_POLL_MAX_US   # busy-poll the queues after serving (adaptive)
    num_request_queues: int = 16  # most queues we accept (GET_QUEUE_NUM - 1)
    # logging
    log_level: str = "info"
    syslog: bool = False
    # what the guest is offered
    cache: str = "auto"
    timeout: float | None = None         # legacy -o timeout=SECONDS; None: from --cache
    readonly: bool = False
    readdirplus: bool = True             # also off with cache=never, as in virtiofsd
    readdirplus_readahead: bool = True   # vfsd's own (vfsd/readahead.py)
    writeback: bool = False
    # Guest xattrs and POSIX ACLs: off unless asked for (--xattr, --posix-acl), as in
    # virtiofsd.  These are the daemon's (command line) defaults; the library-level ones,
    # vfsd.server.SessionOptions and PassthroughFs(posix_acl=...), stay on.
    xattr: bool = False                  # guest xattrs; the ownership records exist regardless
    posix_acl: bool = False              # needs xattr (--posix-acl implies --xattr)
    xattrmap: tuple[XattrRule, ...] | None = None
    security_label: bool = False
    # On, unlike virtiofsd (see docs/virtiofsd-compat.md): vfsd clears the bits in its own
    # record, not through the host kernel, and the guest then skips a GETATTR per chown.
    killpriv_v2: bool = True
    announce_submounts: bool = True      # as virtiofsd 1.13 (default on)
    allow_direct_io: bool = False
    allow_mmap: bool = False
    preserve_noatime: bool = False
    # process
    sandbox: str | None = None           # None: not given (virtiofsd's default: namespace)
    seccomp: str | None = None           # None: not given (virtiofsd's default: kill)
    modcaps: tuple[tuple[str, str], ...] = ()
    rlimit_nofile: int | None = None     # None: raise the soft limit (virtiofsd's default)
    inode_file_handles: str = "never"    # vfsd always uses O_PATH fds
    migration_mode: str = "find-paths"
    migration_on_error: str = "abort"
    migration_verify_handles: bool = False
    migration_confirm_paths: bool = False
    # ownership
    record_name: str = "user.o"
    uidmap: IdMap = field(default_factory=IdMap)
    gidmap: IdMap = field(default_factory=IdMap)
    #: (level, message) for the daemon to log once logging is set up: deprecated
    #: spellings and the like, found while parsing the command line.
    notes: list[tuple[str, str]] = field(default_factory=list)

    @property
    def entry_timeout(self) -> float:
        return CACHE_TIMEOUTS[self.cache] if self.timeout is None else self.timeout

    @property
    def effective_readdirplus(self) -> bool:
        # virtiofsd: "readdirplus = match cache { Never => false, _ => !no_readdirplus }"
        return self.readdirplus and self.cache != "never"
