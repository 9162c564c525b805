"""Guest ownership kept in host xattrs: record codec, id maps, xattr name mapping.

Pure: no I/O and no syscalls.  This module is the only place that knows the record
format (architecture.md, "Layers"); the behaviour it implements is the contract in
design/ownership.md, whose section names the comments below cite as "ownership.md §...".

Record format, version 1 (ownership.md §The record)
----------------------------------------------------
One xattr per host inode, named ``R`` (default ``user.o``), little-endian::

    offset size field
         0    1 version      RECORD_FORMAT_VERSION (= 1)
         1    1 flags        bit 0 FLAG_TAG: a 32-byte tag follows; other bits must be 0
         2    2 reserved     must be 0
         4    4 uid          guest uid (0 .. 0xFFFFFFFE)
         8    4 gid          guest gid (0 .. 0xFFFFFFFE)
        12    4 mode         S_IFMT type bits | 07777 permission bits, nothing else
        16    4 rdev_major   device major (char/block devices only, else 0)
        20    4 rdev_minor   device minor (char/block devices only, else 0)
        24   32 tag          only if FLAG_TAG: HMAC-SHA256, see below

So a record is exactly 24 bytes (no tag) or 56 bytes (tag).

Authentication tag (ownership.md §Authenticity of records)
    ``tag = HMAC-SHA256(key, header || name)`` where ``header`` is the 24 bytes above
    exactly as stored (so version, flags with FLAG_TAG set, reserved, ids, mode and rdev
    are all covered) and ``name`` is the xattr name the record is stored under (default
    ``b"user.o"``).  The header has a fixed length, so the concatenation is unambiguous.
    Binding the name means a record signed for one record name (one daemon
    configuration / nesting level) does not verify under another.  The tag does NOT
    bind the record to an inode: ``cp -a`` / ``rsync -X`` copies of a tree stay valid,
    and conversely anyone who can write host xattrs can copy a signed record from one
    file onto another of theirs.  The key must be used for records only.

Strictness: :func:`decode` raises :class:`RecordError` (a ``ValueError``) for anything
but a well-formed record: wrong length, unknown version, unknown flag bits or nonzero
reserved field, an invalid file type or mode bits outside S_IFMT|07777, an id of
0xFFFFFFFF, a device number on a non-device, and - when a key is given - a missing or
non-verifying tag.  The caller treats every RecordError as "no valid record" (default
owner, ownership.md §Host representation) and logs it once per inode.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import hmac
import os
import stat
import struct
from dataclasses import dataclass

__all__ = [
    "RECORD_FORMAT_VERSION", "RECORD_SIZE", "TAG_SIZE", "FLAG_TAG", "MIN_KEY_SIZE",
    "DEFAULT_RECORD_NAME", "MAX_ID", "OVERFLOW_ID", "XATTR_NAME_MAX",
    "Record", "RecordError", "encode", "decode", "makedev", "dev_major", "dev_minor",
    "IdMap", "default_record", "host_mode_for", "host_type_for", "XattrNames",
]

# ---------------------------------------------------------------------------
# Record codec
# ---------------------------------------------------------------------------

RECORD_FORMAT_VERSION = 1
RECORD_SIZE = 24                      # header without the tag
TAG_SIZE = 32                         # HMAC-SHA256 digest
FLAG_TAG = 0x01
_KNOWN_FLAGS = FLAG_TAG
MIN_KEY_SIZE = 16                     # refuse empty/toy keys (b"" is falsy: a classic bug)
DEFAULT_RECORD_NAME = b"user.o"

_HEADER = struct.Struct("<BBHIIIII")
assert _HEADER.size == RECORD_SIZE

MAX_ID = 0xFFFFFFFE                   # (u32)-1 means "unchanged" in chown: never an owner
_U32 = 0xFFFFFFFF
_PERM_BITS = 0o7777
_S_IFMT = 0o170000
_VALID_TYPES = frozenset({
    stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR,
    stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK,
})
_DEVICE_TYPES = frozenset({stat.S_IFCHR, stat.S_IFBLK})


class RecordError(ValueError):
    """A record xattr that is not a valid record; the caller treats it as absent."""


def makedev(major: int, minor: int) -> int:
    """Linux (glibc) 64-bit dev_t encoding, the same as ``os.makedev`` on Linux."""
    return (((major & 0x00000FFF) << 8) | ((major & 0xFFFFF000) << 32)
            | (minor & 0x000000FF) | ((minor & 0xFFFFFF00) << 12))


def dev_major(dev: int) -> int:
    """Major number of a Linux dev_t (inverse of :func:`makedev`)."""
    return ((dev >> 8) & 0x00000FFF) | ((dev >> 32) & 0xFFFFF000)


def dev_minor(dev: int) -> int:
    """Minor number of a Linux dev_t (inverse of :func:`makedev`)."""
    return (dev & 0x000000FF) | ((dev >> 12) & 0xFFFFFF00)


def _check_id(value: int, what: str) -> None:
    if not isinstance(value, int) or not 0 <= value <= MAX_ID:
        raise ValueError(f"{what} {value!r} is not a valid id (0..{MAX_ID})")


@dataclass(frozen=True)
class Record:
    """The guest's view of one inode: owner, type, permission bits, device number.

    Invariants (checked on construction, ValueError otherwise): uid/gid in 0..MAX_ID;
    mode is one valid S_IFMT type plus 07777 bits and nothing else; rdev only on
    char/block devices, major and minor each u32.
    """

    uid: int
    gid: int
    mode: int
    rdev_major: int = 0
    rdev_minor: int = 0

    def __post_init__(self) -> None:
        _check_id(self.uid, "uid")
        _check_id(self.gid, "gid")
        if not isinstance(self.mode, int) or self.mode & ~(_S_IFMT | _PERM_BITS):
            raise ValueError(f"mode {self.mode!r} has bits outside S_IFMT|07777")
        if stat.S_IFMT(self.mode) not in _VALID_TYPES:
            raise ValueError(f"mode {self.mode:#o} has no valid file type")
        for what, v in (("rdev_major", self.rdev_major), ("rdev_minor", self.rdev_minor)):
            if not isinstance(v, int) or not 0 <= v <= _U32:
                raise ValueError(f"{what} {v!r} is not a u32")
        if (self.rdev_major or self.rdev_minor) and self.file_type not in _DEVICE_TYPES:
            raise ValueError("a device number on something that is not a device")

    @property
    def file_type(self) -> int:
        """The S_IFMT bits."""
        return stat.S_IFMT(self.mode)

    @property
    def perm(self) -> int:
        """The 12 permission bits (07777)."""
        return self.mode & _PERM_BITS

    @property
    def rdev(self) -> int:
        """Device number as a Linux dev_t (``os.makedev`` encoding); 0 for non-devices."""
        return makedev(self.rdev_major, self.rdev_minor)

    def with_owner(self, uid: int | None = None, gid: int | None = None) -> Record:
        """chown: a copy with uid and/or gid replaced (None = unchanged).

        Kill-priv is a separate step (:meth:`without_suid_sgid`), because whether it
        applies depends on the request flags (ownership.md §Semantics)."""
        uid = self.uid if uid is None else uid
        gid = self.gid if gid is None else gid
        return self._with(uid, gid, self.mode)

    def with_mode(self, mode: int) -> Record:
        """chmod: a copy with the 07777 bits taken from ``mode``; the type never changes.

        ``mode`` may carry S_IFMT bits (FUSE SETATTR sends the full i_mode); they must
        then equal this record's type."""
        kind = stat.S_IFMT(mode)
        if kind and kind != self.file_type:
            raise ValueError(f"chmod cannot change the file type ({mode:#o})")
        return self._with(self.uid, self.gid, self.file_type | (mode & _PERM_BITS))

    def without_suid_sgid(self) -> Record:
        """Kill-priv as Linux does it (ownership.md §Semantics, kill-priv): clear setuid,
        and setgid only together with group-exec (setgid without it marks mandatory
        locking, not privilege); directories keep theirs."""
        if self.file_type == stat.S_IFDIR:
            return self
        kill = stat.S_ISUID | (stat.S_ISGID if self.mode & stat.S_IXGRP else 0)
        return self._with(self.uid, self.gid, self.mode & ~kill)

    def _with(self, uid: int, gid: int, mode: int) -> Record:
        """A copy with these ids and mode: this very record when nothing changes
        (records are immutable; a guest `chown -R` mostly re-sets what is there),
        else a new one, checked like any other (cheaper than dataclasses.replace)."""
        if type(uid) is not int or type(gid) is not int or type(self) is not Record:
            # (1.0 == 1: only exact ints may match a checked record)
            return type(self)(uid, gid, mode, self.rdev_major, self.rdev_minor)
        if uid == self.uid and gid == self.gid and mode == self.mode:
            return self
        key = (uid, gid, mode, self.rdev_major, self.rdev_minor)
        rec = _derived.get(key)
        if rec is None:
            rec = Record(*key)
            if len(_derived) >= _MAX_DERIVED:
                _derived.clear()
            _derived[key] = rec
        return rec


# Records made by with_owner/with_mode/without_suid_sgid, by value: a `chown -R`
# or an untar gives thousands of files the same owner and mode, and a checked
# Record is immutable, so one object serves them all.  Bounded (the guest picks
# the values).
_derived: dict[tuple[int, int, int, int, int], Record] = {}
_MAX_DERIVED = 1024


def _check_key(key: bytes) -> None:
    if not isinstance(key, (bytes, bytearray)) or len(key) < MIN_KEY_SIZE:
        raise ValueError(f"a record key must be at least {MIN_KEY_SIZE} bytes")


def _tag(key: bytes, header: bytes, name: bytes) -> bytes:
    # ownership.md §Authenticity: a standard primitive (stdlib HMAC-SHA256), covering
    # every header byte plus the record name; see the module docstring.
    return hmac.new(key, header + name, hashlib.sha256).digest()


def encode(record: Record, key: bytes | None = None, *,
           name: bytes = DEFAULT_RECORD_NAME) -> bytes:
    """Serialize ``record``: 24 bytes, or 56 with an HMAC tag when ``key`` is given.

    ``name`` is the xattr name the record will be stored under (bound by the tag)."""
    flags = 0 if key is None else FLAG_TAG
    header = _HEADER.pack(RECORD_FORMAT_VERSION, flags, 0, record.uid, record.gid,
                          record.mode, record.rdev_major, record.rdev_minor)
    if key is None:
        return header
    _check_key(key)
    return header + _tag(key, header, name)


def decode(data: bytes, key: bytes | None = None, *,
           name: bytes = DEFAULT_RECORD_NAME) -> Record:
    """Parse a record strictly; raise :class:`RecordError` if it is not a valid one.

    With ``key``: the record must carry a tag and the tag must verify for ``name``.
    Without a key: a tag, if present, is not checked (running keyless trusts every
    record on the share; ownership.md §Authenticity)."""
    data = bytes(data)
    if not data:
        raise RecordError("empty record")
    if data[0] != RECORD_FORMAT_VERSION:
        raise RecordError(f"unknown record version {data[0]}")
    if len(data) < RECORD_SIZE:
        raise RecordError(f"record too short ({len(data)} bytes)")
    version, flags, reserved, uid, gid, mode, major, minor = _HEADER.unpack_from(data)
    if flags & ~_KNOWN_FLAGS:
        raise RecordError(f"unknown record flags {flags:#04x}")
    if reserved:
        raise RecordError(f"reserved field is {reserved:#06x}, not 0")
    expected = RECORD_SIZE + (TAG_SIZE if flags & FLAG_TAG else 0)
    if len(data) != expected:
        raise RecordError(f"record is {len(data)} bytes, expected {expected}")
    if key is not None:
        _check_key(key)
        if not flags & FLAG_TAG:
            raise RecordError("record is not signed but a key is configured")
        header = data[:RECORD_SIZE]
        if not hmac.compare_digest(data[RECORD_SIZE:], _tag(key, header, name)):
            raise RecordError("record tag does not verify")
    try:
        return Record(uid, gid, mode, major, minor)
    except ValueError as exc:
        raise RecordError(str(exc)) from None


# ---------------------------------------------------------------------------
# Id maps (ownership.md §Host representation: default owner)
# ---------------------------------------------------------------------------

OVERFLOW_ID = 65534     # the kernel's default overflowuid/overflowgid ("nobody")

_TRANSLATE_FIELDS = {
    "guest": 3, "host": 3, "squash-guest": 3, "squash-host": 3, "map": 3, "forbid-guest": 2,
}


@dataclass(frozen=True)
class _Entry:
    start: int          # first source id
    end: int            # one past the last source id
    target: int | None  # first target id (1:1), the single target (squash), None (forbid)
    squash: bool
    spec: str

    def apply(self, ident: int) -> int | None:
        if self.target is None:
            return None
        return self.target if self.squash else self.target + (ident - self.start)


class _RangeTable:
    """Non-overlapping source ranges, looked up by bisection."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._entries: list[_Entry] = []

    def __bool__(self) -> bool:
        return bool(self._entries)

    def add(self, entry: _Entry, direction: str) -> None:
        i = bisect.bisect_right(self._starts, entry.start)
        for other in self._entries[max(i - 1, 0):i + 1]:
            if entry.start < other.end and other.start < entry.end:
                raise ValueError(f"id map {entry.spec!r}: {direction} range "
                                 f"[{entry.start}, {entry.end}) overlaps {other.spec!r}")
        self._starts.insert(i, entry.start)
        self._entries.insert(i, entry)

    def find(self, ident: int) -> _Entry | None:
        i = bisect.bisect_right(self._starts, ident) - 1
        if i >= 0 and ident < self._entries[i].end:
            return self._entries[i]
        return None


def _parse_u32(text: str, spec: str) -> int:
    # Digits only: int() would also take " 1", "1_000" and "+1".
    if not text or not text.isascii() or not text.isdigit():
        raise ValueError(f"id map {spec!r}: {text!r} is not a decimal number")
    value = int(text)
    if value > _U32:
        raise ValueError(f"id map {spec!r}: {value} does not fit in 32 bits")
    return value


def _range(base: int, count: int, spec: str, what: str) -> tuple[int, int]:
    if count == 0:
        raise ValueError(f"id map {spec!r}: count is 0")
    if base + count > _U32:       # ids stop at MAX_ID; so does virtiofsd's checked_add
        raise ValueError(f"id map {spec!r}: {what} range [{base}, {base + count}) "
                         f"goes past {MAX_ID}")
    return base, base + count


class IdMap:
    """One direction-aware uid (or gid) map, parsed from virtiofsd's option syntax.

    vfsd never changes host ownership: every host file belongs to the daemon's user and
    the guest's owner lives in the record.  So the map matters for one thing only: the
    *default owner* shown for host objects that have no (valid) record, i.e.
    :meth:`host_to_guest`.  With no specs it is the identity, as in virtiofsd.

    ``--translate-uid`` / ``--translate-gid`` specs (virtiofsd >= 1.13 syntax
    ``<type>:<a>:<b>:<count>``; the type is case-insensitive and, as in virtiofsd, the
    first character after it is the separator, ``:`` normally).  A source range is
    ``[base, base + count)``; within one direction source ranges must not overlap;
    ids outside every range map to themselves.  Meaning in vfsd:

    - ``host:<host base>:<guest base>:<count>`` - host ids ``host base + i`` are shown to
      the guest as ``guest base + i``.
    - ``squash-host:<host base>:<guest id>:<count>`` - host ids in the range are all
      shown as ``guest id``.
    - ``map:<guest base>:<host base>:<count>`` - both ``host`` and ``guest`` at once.
    - ``guest:<guest base>:<host base>:<count>`` and
      ``squash-guest:<guest base>:<host id>:<count>`` - guest-to-host only.  They only
      feed :meth:`guest_to_host`; the host id is never used for ownership, so they have
      no visible effect.  Accepted so virtiofsd command lines keep working.
    - ``forbid-guest:<guest base>:<count>`` - :meth:`guest_to_host` gives None for these
      guest ids; the server refuses (EPERM) to create objects as, or chown to, them, as
      virtiofsd does.

    ``--uid-map`` / ``--gid-map`` specs (``:namespace_id:host_id:count:``; any
    non-alphanumeric delimiter, first and last character).  virtiofsd applies these
    through a user namespace it enters; vfsd needs no namespace but reproduces what
    that namespace would show: host ids ``host_id + i`` appear as ``namespace_id + i``
    and, once any such spec is given, every other host id appears as OVERFLOW_ID
    (65534), and guest ids outside the namespace ranges have no host id.  Translate
    specs then apply on top, their "host" side being the namespace view - the same
    composition as virtiofsd.  Namespace ranges must not overlap, nor their host ranges.
    """

    def __init__(self) -> None:
        self._g2h = _RangeTable()     # translate, guest -> (namespace) host
        self._h2g = _RangeTable()     # translate, (namespace) host -> guest
        self._ns_by_ns = _RangeTable()    # user-namespace map keyed by namespace id
        self._ns_by_host = _RangeTable()  # the same entries keyed by host id

    @property
    def is_identity(self) -> bool:
        return not (self._g2h or self._h2g or self._ns_by_ns)

    @classmethod
    def parse(cls, specs: list[str] | tuple[str, ...] = ()) -> IdMap:
        """Build a map from translate and/or uid-map specs (told apart by their first
        character: a type name, or a delimiter).  ValueError, naming the spec, on bad
        syntax, a range past 0xFFFFFFFE, a zero count, or overlapping ranges."""
        idmap = cls()
        for spec in specs:
            if not isinstance(spec, str) or not spec:
                raise ValueError(f"id map {spec!r}: empty")
            if spec[0].isalnum() or spec[0] in "-_":
                idmap._add_translate(spec)
            else:
                idmap._add_namespace(spec)
        return idmap

    def _add_translate(self, spec: str) -> None:
        n = 0
        while n < len(spec) and spec[n].isascii() and (spec[n].isalnum() or spec[n] in "-_"):
            n += 1
        kind = spec[:n].lower()
        if kind not in _TRANSLATE_FIELDS:
            raise ValueError(f"id map {spec!r}: unknown type {kind!r} (expected one of "
                             f"{', '.join(_TRANSLATE_FIELDS)})")
        if n == len(spec):
            raise ValueError(f"id map {spec!r}: missing fields")
        fields = [_parse_u32(f, spec) for f in spec[n + 1:].split(spec[n])]
        if len(fields) != _TRANSLATE_FIELDS[kind]:
            raise ValueError(f"id map {spec!r}: {kind} takes {_TRANSLATE_FIELDS[kind]} "
                             f"numbers, got {len(fields)}")
        if kind == "forbid-guest":
            start, end = _range(fields[0], fields[1], spec, "guest")
            self._g2h.add(_Entry(start, end, None, False, spec), "guest")
            return
        a, b, count = fields
        squash = kind.startswith("squash-")
        if squash:
            if b > MAX_ID:
                raise ValueError(f"id map {spec!r}: target id {b} is not a valid id")
        else:
            _range(b, count, spec, "target")
        start, end = _range(a, count, spec, "source")
        if kind in ("guest", "squash-guest", "map"):
            self._g2h.add(_Entry(start, end, b, squash, spec), "guest")
        if kind in ("host", "squash-host"):
            self._h2g.add(_Entry(start, end, b, squash, spec), "host")
        if kind == "map":
            self._h2g.add(_Entry(b, b + count, a, False, spec), "host")

    def _add_namespace(self, spec: str) -> None:
        delim = spec[0]
        if len(spec) < 2 or spec[-1] != delim:
            raise ValueError(f"id map {spec!r}: a uid/gid-map must start and end with the "
                             f"same delimiter, as in ':0:1000:1:'")
        fields = [_parse_u32(f, spec) for f in spec[1:-1].split(delim)]
        if len(fields) != 3:
            raise ValueError(f"id map {spec!r}: expected :namespace_id:host_id:count:")
        ns, host, count = fields
        ns_start, ns_end = _range(ns, count, spec, "namespace")
        h_start, h_end = _range(host, count, spec, "host")
        self._ns_by_ns.add(_Entry(ns_start, ns_end, host, False, spec), "namespace")
        self._ns_by_host.add(_Entry(h_start, h_end, ns, False, spec), "host")

    def host_to_guest(self, host_id: int) -> int:
        """The guest id shown for a host id (the default owner of a record-less object)."""
        _check_id(host_id, "host id")
        ident = host_id
        if self._ns_by_host:
            entry = self._ns_by_host.find(ident)
            ident = OVERFLOW_ID if entry is None else entry.apply(ident)
        entry = self._h2g.find(ident)
        return ident if entry is None else entry.apply(ident)

    def guest_to_host(self, guest_id: int) -> int | None:
        """The host id for a guest id, or None if the guest may not use that id
        (forbid-guest, or outside the uid-map ranges).  Not used for ownership."""
        _check_id(guest_id, "guest id")
        ident: int | None = guest_id
        entry = self._g2h.find(guest_id)
        if entry is not None:
            ident = entry.apply(guest_id)
        if ident is not None and self._ns_by_ns:
            entry = self._ns_by_ns.find(ident)
            ident = None if entry is None else entry.apply(ident)
        return ident


# ---------------------------------------------------------------------------
# Host objects and host modes (ownership.md §Host representation)
# ---------------------------------------------------------------------------

def default_record(host_uid: int, host_gid: int, host_mode: int,
                   uidmap: IdMap | None = None, gidmap: IdMap | None = None, *,
                   host_rdev: int = 0) -> Record:
    """What the guest sees for a host object without a valid record: host ids through
    the id maps (identity for None), the host type and permission bits minus setuid and
    setgid (the sticky bit stays), and for host devices their device number."""
    uid = uidmap.host_to_guest(host_uid) if uidmap is not None else host_uid
    gid = gidmap.host_to_guest(host_gid) if gidmap is not None else host_gid
    kind = stat.S_IFMT(host_mode)
    if kind not in _VALID_TYPES:
        raise ValueError(f"host mode {host_mode:#o} has no valid file type")
    # never setuid/setgid: a host file must not grant guest privilege just by existing.
    perm = host_mode & _PERM_BITS & ~(stat.S_ISUID | stat.S_ISGID)
    major = minor = 0
    if kind in _DEVICE_TYPES:
        major, minor = dev_major(host_rdev), dev_minor(host_rdev)
    return Record(uid, gid, kind | perm, major, minor)


def host_type_for(guest_mode: int) -> int:
    """S_IFMT of the host inode that stores a guest object: directories stay
    directories; everything else is a regular file, because Linux refuses user.*
    xattrs on symlinks, FIFOs, sockets and device nodes and the daemon must never open
    a host special file.  A guest symlink is a regular file holding its target (the
    9p mapped-xattr choice), so lchown works and its owner is reported truthfully."""
    kind = stat.S_IFMT(guest_mode)
    if kind not in _VALID_TYPES:
        raise ValueError(f"guest mode {guest_mode:#o} has no valid file type")
    return stat.S_IFDIR if kind == stat.S_IFDIR else stat.S_IFREG


def host_mode_for(guest_mode: int) -> int:
    """Permission bits for the host inode of a guest object (no type bits).

    Never setuid/setgid/sticky and never group/other write on the host; the daemon's
    user can always read and write (directories: also search):
    regular files ``(guest & 0o755) | 0o600``, directories ``(guest & 0o755) | 0o700``,
    and stand-in files for symlinks, devices, FIFOs and sockets
    ``(guest & 0o644) | 0o600`` - no exec bits on a file whose content is a symlink
    target (or nothing)."""
    kind = stat.S_IFMT(guest_mode)
    if kind not in _VALID_TYPES:
        raise ValueError(f"guest mode {guest_mode:#o} has no valid file type")
    if kind == stat.S_IFDIR:
        return (guest_mode & 0o755) | 0o700
    if kind == stat.S_IFREG:
        return (guest_mode & 0o755) | 0o600
    return (guest_mode & 0o644) | 0o600


# ---------------------------------------------------------------------------
# Xattr names (ownership.md §Guest xattrs and nesting)
# ---------------------------------------------------------------------------

XATTR_NAME_MAX = 255
_RESERVED_PREFIXES = (b"trusted.", b"security.")
_SYSTEM_ACLS = (b"system.posix_acl_access", b"system.posix_acl_default")
_RESERVED_MARKERS = (b"trusted", b"security", b"system")


def _xattr_error(code: int, name: bytes, why: str) -> OSError:
    return OSError(code, f"{os.strerror(code)}: xattr name {name!r} {why}")


class XattrNames:
    """Guest <-> host xattr names for record name ``R`` (default ``user.o``).

    Let ``m`` be the last component of R (``o`` for ``user.o``, ``vfsd`` for
    ``user.vfsd``), the *escape marker*.  Guest -> host:

    ============================================  =========================================
    guest name                                    host name
    ============================================  =========================================
    ``R``, ``R.<rest>`` (the guest's own R)       ``R.m``, ``R.m.<rest>`` (one more level)
    ``trusted.<x>``, ``security.<x>``             ``R.trusted.<x>``, ``R.security.<x>``
    ``system.posix_acl_access`` / ``_default``    ``R.system.posix_acl_access`` / ``_default``
    other ``user.<x>``                            unchanged
    anything else (``system.foo``, ``os2.x``...)  OSError(EOPNOTSUPP), as Linux does
    ============================================  =========================================

    Matching is on component boundaries (``user.origin`` is not under ``user.o``).  The
    whole ``R.*`` tree belongs to the daemon: the record ``R`` itself, the escapes
    ``R.m[.*]``, the sub-namespace ``R.trusted.*``, ``R.security.*``, ``R.system.*`` that
    carries the guest's privileged xattrs, and every other ``R.*`` name, which is
    reserved and hidden.  Since ``m`` is never ``trusted``, ``security`` or ``system``,
    escapes and the sub-namespace cannot collide (guest ``user.o.trusted.x`` is host
    ``user.o.o.trusted.x``, not ``user.o.trusted.x``), so the map is injective, and
    :meth:`host_to_guest` is exactly its partial inverse.  It composes: a vfsd nested in
    the guest with the same R keeps its record at host ``R`` + ``.m`` * depth.

    Errors from :meth:`guest_to_host` (the server replies with the errno):
    EOPNOTSUPP for a namespace the guest cannot use; EINVAL for an empty suffix
    (``user.``, ``trusted.``) or a NUL byte, as the kernel does; ERANGE for an empty
    name or one longer than XATTR_NAME_MAX (255) before or after escaping - never a
    truncated name.
    """

    def __init__(self, record_name: bytes | str = DEFAULT_RECORD_NAME) -> None:
        if isinstance(record_name, str):
            record_name = record_name.encode()
        r = bytes(record_name)
        parts = r.split(b".")
        if (not r.startswith(b"user.") or len(parts) < 2 or not all(parts)
                or b"\0" in r or len(r) > XATTR_NAME_MAX):
            raise ValueError(f"record name {r!r} must be user.<name>[.<name>...]")
        if parts[-1] in _RESERVED_MARKERS:
            # the escape marker would collide with the reserved sub-namespace
            raise ValueError(f"record name {r!r} must not end in {parts[-1]!r}")
        self.record_name = r
        self.marker = parts[-1]
        self._under = r + b"."                      # prefix of the daemon's R.* tree
        self._escape = self._under + self.marker    # R.m

    def __repr__(self) -> str:
        return f"XattrNames({self.record_name!r})"

    def guest_to_host(self, name: bytes) -> bytes:
        """Host xattr name for a guest name; OSError(errno) if there is none."""
        name = bytes(name)
        if not name or len(name) > XATTR_NAME_MAX:
            raise _xattr_error(errno.ERANGE, name, "is empty or too long")
        if b"\0" in name:
            raise _xattr_error(errno.EINVAL, name, "contains NUL")
        r = self.record_name
        if name == r or name.startswith(self._under):
            host = self._escape + name[len(r):]         # one more level (§nesting)
        elif name.startswith(_RESERVED_PREFIXES) or name in _SYSTEM_ACLS:
            if name.endswith(b"."):                      # trusted. / security.
                raise _xattr_error(errno.EINVAL, name, "has an empty suffix")
            host = self._under + name                    # reserved sub-namespace
        elif name.startswith(b"user."):
            if name == b"user.":
                raise _xattr_error(errno.EINVAL, name, "has an empty suffix")
            host = name
        else:
            raise _xattr_error(errno.EOPNOTSUPP, name, "is in an unsupported namespace")
        if len(host) > XATTR_NAME_MAX:
            raise _xattr_error(errno.ERANGE, name, "is too long once escaped")
        return host

    def host_to_guest(self, name: bytes) -> bytes | None:
        """Guest name for a host name, or None if the guest must not see it (the
        record, the reserved tree, host-level trusted/security/system xattrs)."""
        name = bytes(name)
        if not name.startswith(self._under):
            # user.* outside R is shared as is; the host's own trusted.*, security.*
            # and system.* are not the guest's (its own live under R.).
            guest = name
        elif name == self._escape or name.startswith(self._escape + b"."):
            guest = self.record_name + name[len(self._escape):]
        else:
            guest = name[len(self._under):]
            if not (guest.startswith(_RESERVED_PREFIXES) or guest in _SYSTEM_ACLS):
                return None                              # the daemon's reserved names
        # Partial inverse by construction: accept only what guest_to_host produces.
        try:
            return guest if self.guest_to_host(guest) == name else None
        except OSError:
            return None

    def filter_list(self, host_names: list[bytes]) -> list[bytes]:
        """listxattr: the guest names of ``host_names``, hidden ones dropped, in order.
        The reply size must be computed from this list (ownership.md: after filtering)."""
        out = []
        for host in host_names:
            guest = self.host_to_guest(host)
            if guest is not None:
                out.append(guest)
        return out
