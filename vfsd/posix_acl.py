"""POSIX ACLs in their xattr form, and the mode arithmetic Linux does with them.

Pure: no I/O.  With FUSE_POSIX_ACL the guest kernel enforces ACLs but leaves
to the server what a local filesystem's kernel would do (fs/fuse/acl.c:
"Fuse userspace is responsible for updating access permissions in the inode"):
keep the mode and the access ACL in step (`update_mode`, `chmod`), and give
new objects the parent's default ACL (`create_masq`).  vfsd stores ACLs under
reserved names, so no host kernel does this for it; the rules below follow
Linux fs/posix_acl.c so that the guest sees what ext4 would show.

Wire format (include/uapi/linux/posix_acl_xattr.h): a u32 version (2), then
entries of u16 e_tag, u16 e_perm, u32 e_id, all little-endian.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

POSIX_ACL_XATTR_VERSION = 2
ACCESS = b"system.posix_acl_access"
DEFAULT = b"system.posix_acl_default"

ACL_USER_OBJ = 0x01
ACL_USER = 0x02
ACL_GROUP_OBJ = 0x04
ACL_GROUP = 0x08
ACL_MASK = 0x10
ACL_OTHER = 0x20
ACL_UNDEFINED_ID = 0xFFFFFFFF

_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
_TAGS = (ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER)


@dataclass(frozen=True)
class AclEntry:
    tag: int
    perm: int
    id: int = ACL_UNDEFINED_ID


def parse(value: bytes) -> list[AclEntry]:
    """Decode an ACL xattr value; OSError(EINVAL) if it is not one."""
    if len(value) < _HEADER.size or (len(value) - _HEADER.size) % _ENTRY.size:
        raise OSError(errno.EINVAL, "malformed POSIX ACL")
    if _HEADER.unpack_from(value)[0] != POSIX_ACL_XATTR_VERSION:
        raise OSError(errno.EOPNOTSUPP, "unknown POSIX ACL version")
    entries = [AclEntry(*_ENTRY.unpack_from(value, off))
               for off in range(_HEADER.size, len(value), _ENTRY.size)]
    for e in entries:
        if e.tag not in _TAGS or e.perm & ~7:
            raise OSError(errno.EINVAL, "malformed POSIX ACL entry")
    return entries


def encode(entries: list[AclEntry]) -> bytes:
    return _HEADER.pack(POSIX_ACL_XATTR_VERSION) + b"".join(
        _ENTRY.pack(e.tag, e.perm, e.id) for e in entries)


def equiv_mode(entries: list[AclEntry], mode: int) -> tuple[int, bool]:
    """posix_acl_equiv_mode(): the permission bits an ACL implies (keeping the
    rest of `mode`), and whether the ACL says nothing more than those bits."""
    perm = 0
    equivalent = True
    for e in entries:
        if e.tag == ACL_USER_OBJ:
            perm |= e.perm << 6
        elif e.tag == ACL_GROUP_OBJ:
            perm |= e.perm << 3
        elif e.tag == ACL_OTHER:
            perm |= e.perm
        elif e.tag == ACL_MASK:
            perm = (perm & ~0o070) | (e.perm << 3)
            equivalent = False
        else:
            equivalent = False
    return (mode & ~0o777) | perm, equivalent


def chmod(entries: list[AclEntry], mode: int) -> list[AclEntry]:
    """__posix_acl_chmod(): the access ACL after chmod(mode).  The group bits
    land in the mask entry when there is one, else in the owning group's."""
    has_mask = any(e.tag == ACL_MASK for e in entries)
    out = []
    for e in entries:
        if e.tag == ACL_USER_OBJ:
            e = AclEntry(e.tag, (mode >> 6) & 7, e.id)
        elif e.tag == ACL_OTHER:
            e = AclEntry(e.tag, mode & 7, e.id)
        elif e.tag == ACL_MASK or (e.tag == ACL_GROUP_OBJ and not has_mask):
            e = AclEntry(e.tag, (mode >> 3) & 7, e.id)
        out.append(e)
    return out


def create_masq(default: list[AclEntry], mode: int) -> tuple[int, list[AclEntry] | None]:
    """posix_acl_create_masq(): a new object's mode and access ACL from its
    parent's default ACL and the requested mode (umask is not applied when a
    default ACL exists).  Returns (mode, None) when the ACL is equivalent to
    the mode and need not be stored."""
    mask_i = group_i = None
    equivalent = True
    out = list(default)
    for i, e in enumerate(out):
        if e.tag == ACL_USER_OBJ:
            p = e.perm & ((mode >> 6) & 7)
            out[i] = AclEntry(e.tag, p, e.id)
            mode &= (p << 6) | ~0o700
        elif e.tag == ACL_OTHER:
            p = e.perm & (mode & 7)
            out[i] = AclEntry(e.tag, p, e.id)
            mode &= p | ~0o007
        elif e.tag == ACL_GROUP_OBJ:
            group_i = i
        elif e.tag == ACL_MASK:
            mask_i = i
            equivalent = False
        else:
            equivalent = False
    i = mask_i if mask_i is not None else group_i
    if i is None:
        raise OSError(errno.EIO, "default ACL without a group entry")
    p = out[i].perm & ((mode >> 3) & 7)
    out[i] = AclEntry(out[i].tag, p, out[i].id)
    mode &= (p << 3) | ~0o070
    return mode, (None if equivalent else out)
