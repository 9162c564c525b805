"""Unit and property tests for vfsd.ownership (design/ownership.md)."""

import errno
import hashlib
import hmac
import os
import stat
import struct

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vfsd.ownership import (
    DEFAULT_RECORD_NAME, FLAG_TAG, MAX_ID, OVERFLOW_ID, RECORD_FORMAT_VERSION, RECORD_SIZE,
    TAG_SIZE, XATTR_NAME_MAX, IdMap, Record, RecordError, XattrNames, decode,
    default_record, dev_major, dev_minor, encode, host_mode_for, host_type_for, makedev,
)

KEY = b"k" * 32
OTHER_KEY = b"K" * 32
ALL_TYPES = [stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR,
             stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK]
DEVICES = [stat.S_IFCHR, stat.S_IFBLK]


# ---------------------------------------------------------------------------
# Record and codec
# ---------------------------------------------------------------------------

def header(version=1, flags=0, reserved=0, uid=1000, gid=100, mode=stat.S_IFREG | 0o644,
           major=0, minor=0):
    return struct.pack("<BBHIIIII", version, flags, reserved, uid, gid, mode, major, minor)


@st.composite
def records(draw):
    kind = draw(st.sampled_from(ALL_TYPES))
    major = minor = 0
    if kind in DEVICES:
        major = draw(st.integers(0, 0xFFFFFFFF))
        minor = draw(st.integers(0, 0xFFFFFFFF))
    return Record(draw(st.integers(0, MAX_ID)), draw(st.integers(0, MAX_ID)),
                  kind | draw(st.integers(0, 0o7777)), major, minor)


def test_constants():
    assert RECORD_FORMAT_VERSION == 1
    assert RECORD_SIZE == 24
    assert TAG_SIZE == 32
    assert DEFAULT_RECORD_NAME == b"user.o"


def test_layout_is_little_endian_and_fixed():
    rec = Record(0x01020304, 0x0A0B0C0D, stat.S_IFCHR | 0o4755, 0x11, 0x22)
    data = encode(rec)
    assert data == (b"\x01\x00\x00\x00" + b"\x04\x03\x02\x01" + b"\x0d\x0c\x0b\x0a"
                    + struct.pack("<I", stat.S_IFCHR | 0o4755)
                    + b"\x11\x00\x00\x00" + b"\x22\x00\x00\x00")


@given(records())
def test_round_trip(rec):
    assert decode(encode(rec)) == rec
    signed = encode(rec, KEY)
    assert len(signed) == RECORD_SIZE + TAG_SIZE and signed[1] == FLAG_TAG
    assert decode(signed, KEY) == rec
    assert decode(signed) == rec          # keyless: the tag is not checked


def test_mac_layout():
    rec = Record(1, 2, stat.S_IFREG | 0o600)
    data = encode(rec, KEY, name=b"user.o")
    want = hmac.new(KEY, data[:24] + b"user.o", hashlib.sha256).digest()
    assert data[24:] == want


def test_helpers():
    rec = Record(5, 6, stat.S_IFBLK | 0o2660, 8, 1)
    assert rec.file_type == stat.S_IFBLK
    assert rec.perm == 0o2660
    assert rec.rdev == os.makedev(8, 1)
    assert rec.with_owner(uid=7) == Record(7, 6, stat.S_IFBLK | 0o2660, 8, 1)
    assert rec.with_owner(gid=9).gid == 9 and rec.with_owner(gid=9).uid == 5
    assert rec.with_mode(0o600).mode == stat.S_IFBLK | 0o600
    assert rec.with_mode(stat.S_IFBLK | 0o1777).mode == stat.S_IFBLK | 0o1777
    with pytest.raises(ValueError):
        rec.with_mode(stat.S_IFREG | 0o600)


def test_derived_records_are_shared_and_still_checked():
    rec = Record(5, 6, stat.S_IFREG | 0o644)
    # unchanged: the record itself; the same change twice: one shared record
    assert rec.with_owner() is rec and rec.with_owner(5, 6) is rec
    assert rec.with_mode(0o644) is rec and rec.without_suid_sgid() is rec
    other = Record(1, 1, stat.S_IFREG | 0o600)
    assert rec.with_owner(7, 8) is other.with_owner(7, 8).with_mode(0o644)
    assert rec.with_owner(7, 8) == Record(7, 8, stat.S_IFREG | 0o644)
    for bad in (-1, 0xFFFFFFFF, 5.0, "5", 2 ** 40):
        with pytest.raises(ValueError):
            rec.with_owner(uid=bad)
    with pytest.raises(ValueError):
        rec.with_owner(gid=6.0)      # equal to the current gid, but not an id


@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF))
def test_makedev_round_trip(major, minor):
    dev = makedev(major, minor)
    assert (dev_major(dev), dev_minor(dev)) == (major, minor)


@given(st.integers(0, 0x7FFFFFFF), st.integers(0, 0x7FFFFFFF))
def test_makedev_matches_os(major, minor):    # os.makedev takes C ints
    assert makedev(major, minor) == os.makedev(major, minor)


def test_without_suid_sgid():
    f = Record(0, 0, stat.S_IFREG | 0o6755)
    assert f.without_suid_sgid().perm == 0o0755
    # setgid without group-exec is mandatory locking, not privilege: Linux keeps it
    assert Record(0, 0, stat.S_IFREG | 0o6744).without_suid_sgid().perm == 0o2744
    d = Record(0, 0, stat.S_IFDIR | 0o3775)
    assert d.without_suid_sgid() == d


@pytest.mark.parametrize("kwargs", [
    dict(uid=-1), dict(uid=0xFFFFFFFF), dict(gid=1 << 32),
    dict(mode=0o644),                          # no type
    dict(mode=0o160000 | 0o644),               # not a Linux type
    dict(mode=0o1000000 | stat.S_IFREG),       # bits above S_IFMT
    dict(mode=stat.S_IFREG, rdev_major=1),     # rdev on a non-device
    dict(mode=stat.S_IFCHR, rdev_minor=1 << 32),
])
def test_record_invariants(kwargs):
    args = dict(uid=0, gid=0, mode=stat.S_IFREG | 0o644) | kwargs
    with pytest.raises(ValueError):
        Record(**args)


@pytest.mark.parametrize("data", [
    b"",
    header()[:23],                             # short
    header() + b"\0",                          # long, no tag flag
    header(flags=FLAG_TAG),                    # tag flag but no tag
    header(flags=FLAG_TAG) + b"\0" * 31,       # short tag
    header(version=0),
    header(version=2),
    header(version=2)[:5],                     # unknown version wins over length
    header(flags=0x02),
    header(flags=0x80),
    header(reserved=1),
    header(mode=0o644),                        # no S_IFMT
    header(mode=0o160000 | 0o644),             # invalid S_IFMT
    header(mode=0o10000000 | stat.S_IFREG),    # bits outside S_IFMT|07777
    header(uid=0xFFFFFFFF),
    header(gid=0xFFFFFFFF),
    header(major=1),                           # rdev on a regular file
    header(mode=stat.S_IFDIR | 0o755, minor=3),
])
def test_strict_parse(data):
    with pytest.raises(RecordError):
        decode(data)
    assert issubclass(RecordError, ValueError)


def test_device_record_decodes():
    rec = decode(header(mode=stat.S_IFCHR | 0o666, major=1, minor=3))
    assert rec.rdev == os.makedev(1, 3)


def test_mac_failures():
    rec = Record(0, 0, stat.S_IFREG | 0o4755)
    signed = encode(rec, KEY)
    with pytest.raises(RecordError, match="not signed"):
        decode(encode(rec), KEY)                # unsigned record, key configured
    with pytest.raises(RecordError, match="verify"):
        decode(signed, OTHER_KEY)               # wrong key
    with pytest.raises(RecordError, match="verify"):
        decode(signed, KEY, name=b"user.o.o")   # moved to another record name
    for i in range(len(signed)):                # any flipped bit: header or tag
        bad = bytearray(signed)
        bad[i] ^= 0x01
        with pytest.raises(RecordError):
            decode(bytes(bad), KEY)
    # an attacker re-signing with the wrong key cannot forge
    forged = encode(Record(0, 0, stat.S_IFREG | 0o6755), OTHER_KEY)
    with pytest.raises(RecordError):
        decode(forged, KEY)


def test_mac_same_name_verifies():
    rec = Record(3, 4, stat.S_IFDIR | 0o2775)
    data = encode(rec, KEY, name=b"user.vfsd")
    assert decode(data, KEY, name=b"user.vfsd") == rec


@pytest.mark.parametrize("key", [b"", b"short"])
def test_weak_keys_refused(key):
    rec = Record(0, 0, stat.S_IFREG)
    with pytest.raises(ValueError):
        encode(rec, key)
    with pytest.raises(ValueError):
        decode(encode(rec, KEY), key)


# ---------------------------------------------------------------------------
# Id maps (virtiofsd --translate-uid / --uid-map syntax)
# ---------------------------------------------------------------------------

def test_identity():
    m = IdMap.parse([])
    assert m.is_identity
    for i in (0, 1, 1000, MAX_ID):
        assert m.host_to_guest(i) == i and m.guest_to_host(i) == i


def test_host_and_squash_host():
    m = IdMap.parse(["host:1000:0:10", "squash-host:2000:99:5"])
    assert m.host_to_guest(1000) == 0 and m.host_to_guest(1009) == 9
    assert m.host_to_guest(1010) == 1010          # outside: identity
    assert m.host_to_guest(999) == 999
    assert [m.host_to_guest(i) for i in range(1999, 2006)] == [1999] + [99] * 5 + [2005]
    assert m.guest_to_host(0) == 0                # host-only maps leave g->h alone


def test_guest_and_squash_guest_only_affect_guest_to_host():
    m = IdMap.parse(["guest:0:1000:10", "squash-guest:100:5000:100"])
    assert m.host_to_guest(1000) == 1000          # no visible effect on ownership
    assert m.guest_to_host(3) == 1003
    assert m.guest_to_host(150) == 5000
    assert m.guest_to_host(200) == 200


def test_map_is_bidirectional():
    m = IdMap.parse(["map:0:1000:1"])
    assert m.host_to_guest(1000) == 0 and m.guest_to_host(0) == 1000
    assert m.host_to_guest(0) == 0                # not mapped back: identity


def test_forbid_guest():
    m = IdMap.parse(["forbid-guest:0:1000", "map:1000:1000:1", "forbid-guest:1001:4294966294"])
    assert m.guest_to_host(0) is None and m.guest_to_host(999) is None
    assert m.guest_to_host(1000) == 1000
    assert m.guest_to_host(MAX_ID) is None
    assert m.host_to_guest(5) == 5


def test_virtiofsd_readme_example():
    # README: run as 1001:100, squash all guest ids, show the daemon's files as 1000
    uids = IdMap.parse(["squash-guest:0:1001:4294967295", "host:1001:1000:1"])
    assert uids.host_to_guest(1001) == 1000
    assert uids.host_to_guest(0) == 0
    assert uids.guest_to_host(0) == 1001 and uids.guest_to_host(MAX_ID) == 1001


def test_type_case_and_separator_as_virtiofsd():
    m = IdMap.parse(["HOST/1000/0/1", "Squash-Host,5,6,1"])
    assert m.host_to_guest(1000) == 0 and m.host_to_guest(5) == 6


def test_uid_map_namespace():
    m = IdMap.parse([":0:100000:65536:"])
    assert m.host_to_guest(100000) == 0 and m.host_to_guest(165535) == 65535
    assert m.host_to_guest(1000) == OVERFLOW_ID   # unmapped in a user namespace
    assert m.guest_to_host(0) == 100000
    assert m.guest_to_host(65536) is None
    m = IdMap.parse([":0:1000:1:", "/1/100000/10/"])
    assert m.host_to_guest(1000) == 0 and m.host_to_guest(100003) == 4


def test_uid_map_composes_with_translate():
    # translate's "host" side is the namespace view, as in virtiofsd
    m = IdMap.parse([":0:1000:1:", "host:0:500:1", "forbid-guest:7:1"])
    assert m.host_to_guest(1000) == 500
    assert m.host_to_guest(4) == OVERFLOW_ID
    assert m.guest_to_host(0) == 1000
    assert m.guest_to_host(7) is None


@pytest.mark.parametrize("spec, match", [
    ("", "empty"),
    ("bogus:1:2:3", "unknown type"),
    ("host", "missing fields"),
    ("host:1:2", "takes 3 numbers"),
    ("host:1:2:3:4", "takes 3 numbers"),
    ("forbid-guest:1:2:3", "takes 2 numbers"),
    ("host:1:2:", "not a decimal"),
    ("host:a:2:3", "not a decimal"),
    ("host: 1:2:3", "not a decimal"),
    ("host:1_0:2:3", "not a decimal"),
    ("host:-1:2:3", "not a decimal"),
    ("host:1:2:4294967296", "32 bits"),
    ("host:0:0:0", "count is 0"),
    ("host:4294967295:0:1", "goes past"),          # 0xFFFFFFFF is not an id
    ("host:4294967000:0:1000", "goes past"),       # source overflow
    ("host:0:4294967000:1000", "goes past"),       # target overflow
    ("map:4294967000:0:1000", "goes past"),
    ("forbid-guest:4294967295:1", "goes past"),
    ("squash-host:0:4294967295:5", "not a valid id"),
    ("squash-guest:0:1:4294967296", "32 bits"),
    (":0:1000:1", "same delimiter"),
    (":0:1000:", "expected :namespace_id"),
    (":0:1000:1:2:", "expected :namespace_id"),
    (":", "same delimiter"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        IdMap.parse([spec])


@pytest.mark.parametrize("specs", [
    ["host:10:0:10", "host:19:100:1"],
    ["host:10:0:10", "squash-host:5:0:6"],
    ["host:10:0:10", "map:0:15:1"],                # map's host side overlaps
    ["guest:0:0:10", "forbid-guest:9:1"],
    ["forbid-guest:0:999", "map:1000:1000:1", "forbid-guest:1001:1999",
     "map:2000:2000:1"],                            # virtiofsd issue 198's first try
    [":0:1000:10:", ":5:2000:10:"],                # namespace ranges overlap
    [":0:1000:10:", ":100:1005:1:"],               # host ranges overlap
])
def test_overlaps_rejected(specs):
    with pytest.raises(ValueError, match="overlaps"):
        IdMap.parse(specs)


def test_adjacent_ranges_ok():
    m = IdMap.parse(["host:10:0:10", "host:20:100:10", "host:0:50:10", "guest:0:0:10",
                     "map:10:200:5"])
    assert [m.host_to_guest(i) for i in (0, 9, 10, 19, 20, 29, 30)] == \
        [50, 59, 0, 9, 100, 109, 30]


def test_bad_ids_refused():
    m = IdMap.parse([])
    for bad in (-1, 0xFFFFFFFF, 1 << 32):
        with pytest.raises(ValueError):
            m.host_to_guest(bad)
        with pytest.raises(ValueError):
            m.guest_to_host(bad)


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(1, 50), st.integers(0, 1000)),
                max_size=8),
       st.integers(0, 300))
def test_host_ranges_against_model(ranges, probe):
    specs, model = [], {}
    for base, count, target in ranges:
        if any(h in model for h in range(base, base + count)):
            continue
        specs.append(f"host:{base}:{target}:{count}")
        model.update({base + i: target + i for i in range(count)})
    assert IdMap.parse(specs).host_to_guest(probe) == model.get(probe, probe)


# ---------------------------------------------------------------------------
# Default attributes and host modes
# ---------------------------------------------------------------------------

def test_default_record():
    uids = IdMap.parse(["host:1000:0:1"])
    gids = IdMap.parse(["squash-host:0:7:65536"])
    rec = default_record(1000, 100, stat.S_IFREG | 0o6755, uids, gids)
    assert rec == Record(0, 7, stat.S_IFREG | 0o755)
    assert default_record(5, 6, stat.S_IFDIR | 0o1777) == Record(5, 6, stat.S_IFDIR | 0o1777)
    assert default_record(5, 6, stat.S_IFDIR | 0o3777).perm == 0o1777   # sticky stays
    dev = default_record(0, 0, stat.S_IFCHR | 0o666, host_rdev=os.makedev(1, 3))
    assert (dev.rdev_major, dev.rdev_minor) == (1, 3)
    assert default_record(0, 0, stat.S_IFREG | 0o644, host_rdev=123).rdev == 0
    with pytest.raises(ValueError):
        default_record(0, 0, 0o644)


@given(st.sampled_from(ALL_TYPES), st.integers(0, 0o7777))
def test_default_record_never_setid(kind, perm):
    rec = default_record(1, 2, kind | perm)
    assert rec.file_type == kind
    assert rec.perm == perm & 0o1777


def test_host_mode_examples():
    assert host_mode_for(stat.S_IFREG | 0o000) == 0o600
    assert host_mode_for(stat.S_IFREG | 0o6777) == 0o755
    assert host_mode_for(stat.S_IFREG | 0o640) == 0o640
    assert host_mode_for(stat.S_IFDIR | 0o1777) == 0o755
    assert host_mode_for(stat.S_IFDIR | 0o000) == 0o700
    assert host_mode_for(stat.S_IFLNK | 0o777) == 0o644
    assert host_mode_for(stat.S_IFCHR | 0o620) == 0o600
    with pytest.raises(ValueError):
        host_mode_for(0o644)


@given(st.sampled_from(ALL_TYPES), st.integers(0, 0o7777))
def test_host_mode_invariants(kind, perm):
    host = host_mode_for(kind | perm)
    assert host & ~0o777 == 0                        # no type, no setid, no sticky
    assert host & 0o022 == 0                         # no group/other write
    need = 0o700 if kind == stat.S_IFDIR else 0o600
    assert host & need == need
    assert host_type_for(kind | perm) == (stat.S_IFDIR if kind == stat.S_IFDIR
                                          else stat.S_IFREG)


# ---------------------------------------------------------------------------
# Xattr names
# ---------------------------------------------------------------------------

X = XattrNames()


@pytest.mark.parametrize("guest, host", [
    (b"user.o", b"user.o.o"),
    (b"user.o.x", b"user.o.o.x"),
    (b"user.o.o", b"user.o.o.o"),
    (b"user.o.trusted.x", b"user.o.o.trusted.x"),
    (b"user.origin", b"user.origin"),
    (b"user.oo", b"user.oo"),
    (b"user.foo", b"user.foo"),
    (b"user.x.o", b"user.x.o"),
    (b"trusted.overlay.opaque", b"user.o.trusted.overlay.opaque"),
    (b"security.capability", b"user.o.security.capability"),
    (b"security.selinux", b"user.o.security.selinux"),
    (b"system.posix_acl_access", b"user.o.system.posix_acl_access"),
    (b"system.posix_acl_default", b"user.o.system.posix_acl_default"),
])
def test_xattr_table(guest, host):
    assert X.guest_to_host(guest) == host
    assert X.host_to_guest(host) == guest


def test_xattr_other_marker():
    v = XattrNames("user.vfsd")
    assert v.marker == b"vfsd" and v.record_name == b"user.vfsd"
    assert v.guest_to_host(b"user.vfsd") == b"user.vfsd.vfsd"
    assert v.guest_to_host(b"user.vfsd.x") == b"user.vfsd.vfsd.x"
    assert v.guest_to_host(b"user.o") == b"user.o"
    assert v.guest_to_host(b"trusted.a") == b"user.vfsd.trusted.a"
    deep = XattrNames(b"user.a.b")
    assert deep.guest_to_host(b"user.a.b.c") == b"user.a.b.b.c"
    assert deep.guest_to_host(b"user.a.c") == b"user.a.c"


@pytest.mark.parametrize("host", [
    b"user.o",                                  # the record itself
    b"user.o.trusted", b"user.o.trusted.",      # not produced by any guest name
    b"user.o.system.foo", b"user.o.system.posix_acl_access.x",
    b"user.o.future", b"user.o.oo",             # rest of the reserved tree
    b"trusted.foo", b"security.selinux",        # the host's own, not the guest's
    b"system.posix_acl_access", b"system.nfs4_acl", b"user.", b"",
])
def test_hidden_host_names(host):
    assert X.host_to_guest(host) is None


@pytest.mark.parametrize("guest, code", [
    (b"", errno.ERANGE),
    (b"user." + b"a" * 251, errno.ERANGE),      # 256 bytes
    (b"user.o." + b"a" * 247, errno.ERANGE),    # 254 -> 256 once escaped
    (b"trusted." + b"a" * 241, errno.ERANGE),   # 249 -> 256 under user.o.
    (b"system.foo", errno.EOPNOTSUPP),
    (b"system.posix_acl_access.x", errno.EOPNOTSUPP),
    (b"os2.foo", errno.EOPNOTSUPP),
    (b"user", errno.EOPNOTSUPP),
    (b"trusted", errno.EOPNOTSUPP),
    (b"user.", errno.EINVAL),
    (b"trusted.", errno.EINVAL),
    (b"security.", errno.EINVAL),
    (b"user.a\0b", errno.EINVAL),
])
def test_xattr_errors(guest, code):
    with pytest.raises(OSError) as exc:
        X.guest_to_host(guest)
    assert exc.value.errno == code


def test_xattr_length_limit_exact():
    name = b"user.o." + b"a" * 246                 # 253 -> 255 escaped: fits
    assert len(X.guest_to_host(name)) == XATTR_NAME_MAX


@pytest.mark.parametrize("bad", ["trusted.o", "user", "user.", "user..o", "user.o.",
                                 "user.trusted", "user.x.security", "user.system",
                                 "security.o", "o", "user.a\0"])
def test_bad_record_names(bad):
    with pytest.raises(ValueError):
        XattrNames(bad)


def test_filter_list():
    host = [b"user.o", b"user.foo", b"user.o.o", b"security.selinux",
            b"user.o.security.capability", b"user.o.future", b"user.o.o.o.x"]
    assert X.filter_list(host) == [b"user.foo", b"user.o", b"security.capability",
                                   b"user.o.o.x"]


# --- properties -------------------------------------------------------------

_PREFIXES = [b"user.", b"trusted.", b"security.", b"system.", b"user.o", b"user.o.",
             b"user.o.o.", b"user.vfsd", b"user.vfsd.", b"user.o.x", b"user.o.x.",
             b"user.o.trusted.", b"user.o.system.", b"user.o.security.",
             b"system.posix_acl_access", b"system.posix_acl_default", b""]
_COMPONENTS = [b"user", b"trusted", b"security", b"system", b"o", b"oo", b"origin",
               b"x", b"posix_acl_access", b"posix_acl_default", b"vfsd", b"", b"overlay"]


@st.composite
def xattr_names(draw):
    """Names that hit every rule: a namespace-ish prefix and components (often
    nothing more), or arbitrary bytes."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=40))
    prefix = draw(st.sampled_from(_PREFIXES))
    parts = draw(st.lists(st.sampled_from(_COMPONENTS), max_size=5))
    tail = draw(st.binary(max_size=4)) if kind == 1 else b""
    return prefix + b".".join(parts) + tail


RECORD_NAMES = [XattrNames(), XattrNames("user.vfsd"), XattrNames("user.o.x")]


def _maybe(f, name):
    try:
        return f(name)
    except OSError:
        return None


@settings(max_examples=500)
@given(xattr_names(), st.sampled_from(RECORD_NAMES))
def test_round_trip_and_never_reserved(guest, names):
    host = _maybe(names.guest_to_host, guest)
    assume(host is not None)
    assert names.host_to_guest(host) == guest
    assert host != names.record_name
    assert len(host) <= XATTR_NAME_MAX


@settings(max_examples=500)
@given(xattr_names(), st.sampled_from(RECORD_NAMES))
def test_host_to_guest_is_partial_inverse(host, names):
    guest = names.host_to_guest(host)
    if guest is not None:
        assert names.guest_to_host(guest) == host


@settings(max_examples=300)
@given(xattr_names(), xattr_names(), st.sampled_from(RECORD_NAMES))
def test_injective(a, b, names):
    ha, hb = _maybe(names.guest_to_host, a), _maybe(names.guest_to_host, b)
    assume(ha is not None and hb is not None)
    assert (ha == hb) == (a == b)


def _through(levels, name):
    """A name set at the innermost guest, mapped out through ``levels`` daemons
    (levels[0] is the outermost, the one talking to the real host)."""
    for names in reversed(levels):
        name = names.guest_to_host(name)
    return name


def _back(levels, name):
    for names in levels:
        name = names.host_to_guest(name)
        if name is None:
            return None
    return name


def test_nested_records_land_at_escaped_names():
    levels = [XattrNames(), XattrNames(), XattrNames()]
    # the record of the daemon at depth k (0 = outermost) is R in its own host view
    for k in range(3):
        assert _through(levels[:k], b"user.o") == b"user.o" + b".o" * k
    # each daemon sees only its own guest's names: the inner records are hidden
    assert _back(levels[:1], b"user.o") is None
    assert _back(levels[:1], b"user.o.o") == b"user.o"
    assert _back(levels[:2], b"user.o.o") is None
    # a guest at depth 3 with trusted.*: R.trusted at level 2, escaped twice outward
    assert _through(levels, b"trusted.x") == b"user.o.o.o.trusted.x"
    assert _back(levels, b"user.o.o.o.trusted.x") == b"trusted.x"


@settings(max_examples=300)
@given(xattr_names(), xattr_names())
def test_nesting_composes_injectively(a, b):
    levels = [XattrNames(), XattrNames(), XattrNames()]
    ha, hb = _maybe(lambda n: _through(levels, n), a), _maybe(lambda n: _through(levels, n), b)
    assume(ha is not None and hb is not None)
    assert _back(levels, ha) == a
    assert (ha == hb) == (a == b)
    # no guest name, at any depth, reaches an outer daemon's record or reserved tree
    for k in range(1, 4):
        assert _back(levels[:k], ha) is not None
