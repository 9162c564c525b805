"""POSIX ACL arithmetic against what Linux fs/posix_acl.c does."""

import errno

import pytest

from vfsd import posix_acl as pa

E = pa.AclEntry


def minimal(u, g, o):
    return [E(pa.ACL_USER_OBJ, u), E(pa.ACL_GROUP_OBJ, g), E(pa.ACL_OTHER, o)]


def test_round_trip_and_wire_format():
    acl = [E(pa.ACL_USER_OBJ, 7), E(pa.ACL_USER, 6, 1000), E(pa.ACL_GROUP_OBJ, 5),
           E(pa.ACL_MASK, 7), E(pa.ACL_OTHER, 0)]
    raw = pa.encode(acl)
    assert raw[:4] == b"\x02\0\0\0" and len(raw) == 4 + 8 * 5
    assert raw[12:20] == b"\x02\0\x06\0\xe8\x03\0\0"  # ACL_USER, rw, uid 1000
    assert pa.parse(raw) == acl


@pytest.mark.parametrize("raw,err", [(b"", errno.EINVAL), (b"\x02\0\0\0\x01", errno.EINVAL),
                                     (b"\x01\0\0\0", errno.EOPNOTSUPP),
                                     (b"\x02\0\0\0" + b"\x40\0\x07\0\0\0\0\0", errno.EINVAL),
                                     (b"\x02\0\0\0" + b"\x01\0\x08\0\0\0\0\0", errno.EINVAL)])
def test_malformed(raw, err):
    with pytest.raises(OSError) as ei:
        pa.parse(raw)
    assert ei.value.errno == err


def test_equiv_mode():
    assert pa.equiv_mode(minimal(6, 4, 0), 0o104777) == (0o104640, True)
    acl = minimal(7, 7, 5) + [E(pa.ACL_MASK, 1)]
    assert pa.equiv_mode(acl, 0o100000) == (0o100715, False)


def test_chmod_updates_mask_not_group():
    acl = minimal(7, 7, 5) + [E(pa.ACL_USER, 7, 5), E(pa.ACL_MASK, 7)]
    out = {e.tag: e.perm for e in pa.chmod(acl, 0o640)}
    assert out == {pa.ACL_USER_OBJ: 6, pa.ACL_GROUP_OBJ: 7, pa.ACL_OTHER: 0,
                   pa.ACL_USER: 7, pa.ACL_MASK: 4}
    assert {e.tag: e.perm for e in pa.chmod(minimal(7, 7, 7), 0o751)} == {
        pa.ACL_USER_OBJ: 7, pa.ACL_GROUP_OBJ: 5, pa.ACL_OTHER: 1}


def test_create_masq():
    mode, acl = pa.create_masq(minimal(7, 5, 5), 0o666)
    assert mode == 0o644 and acl is None
    default = minimal(7, 5, 0) + [E(pa.ACL_USER, 7, 1234), E(pa.ACL_MASK, 7)]
    mode, acl = pa.create_masq(default, 0o2666)
    assert mode == 0o2660
    assert {(e.tag, e.id): e.perm for e in acl}[(pa.ACL_MASK, pa.ACL_UNDEFINED_ID)] == 6
