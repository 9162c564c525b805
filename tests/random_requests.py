"""Random FUSE requests for the tests that throw them at the daemon.

`RandomRequests` builds each request for its opcode: the argument struct with
each field mostly a value that means something for it (a live node id, an
open handle, a mode, an offset, open flags), otherwise one from the edges of
its range or random bits; names mostly plain, some hostile (`..`, `/`, NUL,
too long); then a few requests cut short, padded, given a lying
fuse_in_header.len, an unknown opcode, an unmappable uid or a bogus extension
length.  It learns node ids and handles from the replies (and drops what it
forgets or releases), to aim later requests at them, and checks that every
reply is well-formed.  About one request in six succeeds, so the requests
reach well past the checks at the door.  The server-level test (tests/unit/
test_server_fuzz.py) and the process-level one (tests/protocol/
test_random_requests.py) share it.
"""

from __future__ import annotations

import os
import random
import stat

from protocol import fuse

O = fuse.Opcode

# opcode -> (argument struct or None, what follows it)
SHAPES = {
    O.LOOKUP: (None, 1), O.FORGET: (fuse.fuse_forget_in, 0),
    O.GETATTR: (fuse.fuse_getattr_in, 0), O.SETATTR: (fuse.fuse_setattr_in, 0),
    O.READLINK: (None, 0), O.SYMLINK: (None, 2), O.MKNOD: (fuse.fuse_mknod_in, 1),
    O.MKDIR: (fuse.fuse_mkdir_in, 1), O.UNLINK: (None, 1), O.RMDIR: (None, 1),
    O.RENAME: (fuse.fuse_rename_in, 2), O.LINK: (fuse.fuse_link_in, 1),
    O.OPEN: (fuse.fuse_open_in, 0), O.READ: (fuse.fuse_read_in, 0),
    O.WRITE: (fuse.fuse_write_in, "data"), O.STATFS: (None, 0),
    O.RELEASE: (fuse.fuse_release_in, 0), O.FSYNC: (fuse.fuse_fsync_in, 0),
    O.SETXATTR: (fuse.fuse_setxattr_in, "xattr"), O.GETXATTR: (fuse.fuse_getxattr_in, 1),
    O.LISTXATTR: (fuse.fuse_getxattr_in, 0), O.REMOVEXATTR: (None, 1),
    O.FLUSH: (fuse.fuse_flush_in, 0), O.INIT: (fuse.fuse_init_in, 0),
    O.OPENDIR: (fuse.fuse_open_in, 0), O.READDIR: (fuse.fuse_read_in, 0),
    O.RELEASEDIR: (fuse.fuse_release_in, 0), O.FSYNCDIR: (fuse.fuse_fsync_in, 0),
    O.GETLK: (fuse.fuse_lk_in, 0), O.SETLK: (fuse.fuse_lk_in, 0),
    O.SETLKW: (fuse.fuse_lk_in, 0), O.ACCESS: (fuse.fuse_access_in, 0),
    O.CREATE: (fuse.fuse_create_in, 1), O.INTERRUPT: (fuse.fuse_interrupt_in, 0),
    O.BMAP: (fuse.fuse_bmap_in, 0), O.DESTROY: (None, 0), O.IOCTL: (fuse.fuse_ioctl_in, 0),
    O.POLL: (fuse.fuse_poll_in, 0), O.BATCH_FORGET: (fuse.fuse_batch_forget_in, "forgets"),
    O.FALLOCATE: (fuse.fuse_fallocate_in, 0), O.READDIRPLUS: (fuse.fuse_read_in, 0),
    O.RENAME2: (fuse.fuse_rename2_in, 2), O.LSEEK: (fuse.fuse_lseek_in, 0),
    O.COPY_FILE_RANGE: (fuse.fuse_copy_file_range_in, 0),
    O.SYNCFS: (fuse.fuse_syncfs_in, 0), O.TMPFILE: (fuse.fuse_create_in, 1),
    O.STATX: (None, 0),
}
NAMES = [b"a", b"b", b"c", b"d", b"f", b"sub", b"out", b"lnk"]
HOSTILE_NAMES = [b".", b"..", b"/etc", b"a/b", b"../outside", b"", b"x" * 255, b"x" * 256,
                 b"\xff\xfe", b"a\0b"]
XATTR_NAMES = [b"user.o", b"user.o.o", b"user.x", b"trusted.x", b"security.capability",
               b"system.posix_acl_access", b"system.posix_acl_default", b"user", b""]
MODES = [0, 0o644, 0o4755, stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755, stat.S_IFCHR | 0o644,
         stat.S_IFBLK | 0o600, stat.S_IFIFO | 0o644, stat.S_IFSOCK | 0o755,
         stat.S_IFLNK | 0o777]
BITS = {"B": 8, "H": 16, "I": 32, "i": 32, "Q": 64, "q": 64}
INIT = fuse.fuse_init_in.pack(major=7, minor=38, max_readahead=65536, flags=0xFFFFFFFF,
                              flags2=0xFFFFFFFF)
#: How often each opcode comes: what a guest sends most, most; what ends the
#: session (and the node ids learnt so far with it) rarely.
WEIGHTS = {op: 1.0 for op in SHAPES} | {
    op: 3.0 for op in (O.LOOKUP, O.GETATTR, O.SETATTR, O.CREATE, O.MKDIR, O.MKNOD, O.SYMLINK,
                       O.OPEN, O.READ, O.WRITE, O.OPENDIR, O.READDIR, O.READDIRPLUS,
                       O.RENAME, O.RENAME2, O.UNLINK, O.RMDIR, O.LINK, O.SETXATTR,
                       O.GETXATTR, O.LISTXATTR, O.REMOVEXATTR, O.RELEASE, O.FORGET,
                       O.FALLOCATE, O.COPY_FILE_RANGE, O.TMPFILE)} | {
    O.DESTROY: 0.1, O.INIT: 0.3}
_OPS, _WEIGHTS = list(WEIGHTS), list(WEIGHTS.values())
#: Values a field is drawn from most of the time, by its name (fuse.h's).
OFFSETS = [0, 1, 4095, 4096, 5000, 1 << 20]
OPEN_FLAGS = [os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_RDWR | os.O_TRUNC,
              os.O_WRONLY | os.O_APPEND, os.O_RDWR | os.O_EXCL | os.O_CREAT,
              os.O_RDONLY | os.O_DIRECTORY, os.O_RDWR | os.O_NOFOLLOW, os.O_RDWR | os.O_SYNC]
FIELD_VALUES = {
    "mode": MODES, "offset": OFFSETS, "off_in": OFFSETS, "off_out": OFFSETS, "size": OFFSETS,
    "length": OFFSETS, "len": OFFSETS, "flags": OPEN_FLAGS, "nlookup": [1, 1, 2],
    "valid": [int(v) for v in fuse.SetattrValid] + [
        fuse.SetattrValid.UID | fuse.SetattrValid.GID, fuse.SetattrValid.SIZE
        | fuse.SetattrValid.FH, fuse.SetattrValid.ATIME | fuse.SetattrValid.MTIME],
    "uid": [0, 1000, 1234], "gid": [0, 1000, 5678], "whence": [0, 1, 2, 3, 4],
    "mask": [0, 1, 2, 4, 7], "umask": [0, 0o22, 0o77],
}
_NODE_FIELDS = ("oldnodeid", "newdir", "nodeid_out", "nodeid")
_FH_FIELDS = ("fh", "fh_in", "fh_out")


class RandomRequests:
    def __init__(self, seed: int):
        self.r = random.Random(seed)
        self.nodes, self.fhs = [1], [0]
        self.stale: list[int] = []   # ids forgotten, or of a session that ended
        self.lookups: dict[int, int] = {}   # node id -> lookups the daemon counts
        # Set by a DESTROY that went through: the session is over, and every
        # request gets EIO until an INIT, which the caller sends, as a guest
        # does (the random INITs mostly carry a wrong major).
        self.destroyed = False

    def value(self, name: str, code: str) -> int:
        """Mostly a value that means something for a field of this name (a live
        node id, an open handle, a mode, an offset); otherwise one from the
        edges of the field's range, or random bits."""
        r, bits = self.r, BITS[code]
        pick = r.random()
        if pick < 0.7 and name in _FH_FIELDS:
            v = r.choice(self.fhs)
        elif pick < 0.7 and name in _NODE_FIELDS:
            v = r.choice(self.nodes)
        elif pick < 0.7 and name in FIELD_VALUES:
            v = r.choice(FIELD_VALUES[name])
        elif pick < 0.8:
            v = r.choice(self.nodes + self.fhs + [0, 1])
        elif pick < 0.9:
            v = (1 << bits) - r.choice([1, 2]) if r.random() < 0.5 else 1 << (bits - 1)
        else:
            v = r.getrandbits(bits)
        v &= (1 << bits) - 1
        return v - (1 << bits) if code.islower() and v >= 1 << (bits - 1) else v

    def fields(self, struct) -> list:
        out = []
        for name, code in struct.fields:
            if isinstance(code, str):
                out.append(self.r.randbytes(int(code[:-1])) if code.endswith("s")
                           else self.value(name, code))
            else:
                out += self.fields(code)
        return out

    def name(self, xattr: bool = False) -> bytes:
        r = self.r
        pick = r.random()
        name = r.choice(HOSTILE_NAMES if pick < 0.2 else XATTR_NAMES if xattr or pick < 0.25
                        else NAMES)
        return name + (b"\0" if r.random() < 0.97 else b"")

    def request(self, unique: int) -> tuple[int, bytes]:
        """(opcode, fuse_in_header + arguments) of the next request."""
        r = self.r
        if r.random() < 0.03:
            opcode, args = r.choice([0, 7, 53, 4096, 0xFFFFFFFF]), r.randbytes(r.randrange(64))
        else:
            opcode = r.choices(_OPS, _WEIGHTS)[0]
            struct, tail = SHAPES[opcode]
            values = self.fields(struct) if struct else []
            data = r.randbytes(r.choice([0, 1, 100, 4096, 70000])) if tail == "data" else \
                r.randbytes(r.choice([0, 1, 4, 28, 44])) if tail == "xattr" else b""
            if data and r.random() < 0.8:   # mostly the size the data has
                values[struct.flat_fields.index("size")] = len(data)
            args = struct.flat_pack(*values) if struct else b""
            if tail == "data":
                args += data
            elif tail == "xattr":
                args += self.name(xattr=True) + data
            elif tail == "forgets":
                forgets = [(r.choice(self.nodes + [99999]), r.choice([1, 2, 1 << 63]))
                           for _ in range(r.randrange(4))]
                args = fuse.fuse_batch_forget_in.pack(
                    count=len(forgets) if r.random() < 0.9 else r.choice([0, 3, 1 << 31]))
                for node, n in forgets:
                    args += fuse.fuse_forget_one.pack(nodeid=node, nlookup=n)
                    self._forget(node, n)
            else:
                xattr = opcode in (O.GETXATTR, O.REMOVEXATTR)
                args += b"".join(self.name(xattr) for _ in range(tail))
            if args and r.random() < 0.04:
                args = args[:r.randrange(len(args))]
            elif r.random() < 0.03:
                args += r.randbytes(r.randrange(1, 40))
        length = 40 + len(args)
        if r.random() < 0.03:
            length = r.choice([0, 39, length - 1, length + 1, 0xFFFFFFFF])
        uid, gid = (0xFFFFFFFF, 0) if r.random() < 0.02 else (r.choice([0, 1000]), 1000)
        nodeid = (r.choice(self.nodes) if r.random() < 0.85 else
                  r.choice(self.stale + [0, 999999, 1 << 63, (1 << 64) - 1]))
        header = fuse.fuse_in_header.pack(
            len=length, opcode=opcode, unique=unique, nodeid=nodeid,
            uid=uid, gid=gid, pid=1, total_extlen=r.choice([0, 1, 3]) if r.random() < 0.03 else 0)
        # What the daemon will let go of (if the request is well-formed) is no
        # longer aimed at, but at times still, as stale.
        if opcode == O.FORGET and len(args) >= 8:
            self._forget(nodeid, int.from_bytes(args[:8], "little"))
        elif opcode in (O.RELEASE, O.RELEASEDIR) and len(args) >= 8:
            fh = int.from_bytes(args[:8], "little")
            if fh in self.fhs[1:]:
                self.fhs.remove(fh)
        return opcode, header + args

    def _forget(self, nodeid: int, n: int) -> None:
        left = self.lookups.get(nodeid, 0) - n
        self.lookups[nodeid] = left
        if left <= 0 and nodeid != 1 and nodeid in self.nodes:
            self.nodes.remove(nodeid)
            self.stale = (self.stale + [nodeid])[-50:]

    def room(self) -> int:
        """Writable bytes for a reply: mostly enough, sometimes too few."""
        return self.r.choice([4096, 4096, 65536 + 4096, 200, 16, 15])

    def check_reply(self, opcode: int, unique: int, room: int, reply: bytes) -> None:
        """`reply` (the bytes the daemon wrote) is a well-formed answer, or there
        is rightly none; node ids and handles in a success are remembered."""
        if not reply:
            # Only what gets no reply, or what has no room for one (logged), is
            # left unanswered: the guest would wait for the rest forever.
            assert opcode in fuse.NO_REPLY or room < 16, (opcode, room)
            return
        assert 16 <= len(reply) <= room
        oh = fuse.fuse_out_header.unpack(reply[:16])
        assert (oh.len, oh.unique) == (len(reply), unique) and -4096 < oh.error <= 0, oh
        if oh.error == 0:
            if opcode in (O.DESTROY, O.INIT):   # a new session knows none of them
                self.stale = (self.stale + self.nodes[1:])[-50:]
                self.nodes, self.fhs, self.lookups = [1], [0], {}
            self.destroyed |= opcode == O.DESTROY
            self._remember(opcode, reply[16:])

    def _remember(self, opcode, body: bytes) -> None:
        entry, opened = fuse.fuse_entry_out.size, fuse.fuse_open_out.size
        if opcode in (O.LOOKUP, O.MKNOD, O.MKDIR, O.SYMLINK, O.LINK, O.CREATE, O.TMPFILE) \
                and len(body) >= entry:
            node = fuse.fuse_entry_out.unpack(body[:entry]).nodeid
            if node:   # (0: a negative entry)
                self.lookups[node] = self.lookups.get(node, 0) + 1
                if node not in self.nodes:
                    self.nodes.append(node)
            body = body[entry:]
        if opcode in (O.OPEN, O.OPENDIR, O.CREATE, O.TMPFILE) and len(body) >= opened:
            self.fhs.append(fuse.fuse_open_out.unpack(body[:opened]).fh)


def snapshot(top) -> dict:
    """Every name under `top` with what a change would move."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            xattrs = {} if stat.S_ISLNK(st.st_mode) else {
                x: os.getxattr(path, x) for x in os.listxattr(path)}
            out[path] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, xattrs)
    return out


def outside_and_share(top, owner: tuple[int, int] | None = None) -> tuple:
    """`top`/share (made if missing) with a file, a directory, a symlink to
    `top`/outside and one to /etc/passwd; `top`/outside with a file carrying a
    record-named xattr.  With `owner` (uid, gid), all of it belongs to that
    user, the daemon's: a way out of the share would find the outside
    writable.  Returns (share, outside)."""
    share, outside = top / "share", top / "outside"
    (share / "sub").mkdir(parents=True, exist_ok=True)
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    os.setxattr(outside / "secret", "user.o", b"not a record")
    (share / "f").write_bytes(b"data" * 1000)
    (share / "out").symlink_to("../outside")
    (share / "lnk").symlink_to("/etc/passwd")
    if owner is not None:
        for path in (share, share / "sub", share / "f", share / "out", share / "lnk",
                     outside, outside / "secret"):
            os.lchown(path, *owner)
    return share, outside
