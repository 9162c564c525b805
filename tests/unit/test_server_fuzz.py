"""Random FUSE requests against the server over a real share, in process.

Each request is built for its opcode (the argument struct with its fields
drawn from values that break things: 0, the node ids and handles handed out
so far, the top of each field's range, random bits), then sometimes cut short,
padded, given a lying fuse_in_header.len, an unknown opcode, or an unmappable
uid.  Requests go through both entry points (`handle` and `handle_views`).

What must hold for every one: no exception leaves the server, the reply is a
well-formed fuse_out_header (its len the bytes written, an errno in range,
the request's unique), no "internal error" is logged (an exception the
server did not expect: each one found here was a guest-controlled value the
code let through to a host call), nothing outside the share changes, and
the server still answers a plain LOOKUP afterwards.  The seeds are fixed, so
a failure names the request that caused it and reproduces.
"""

import errno
import logging
import os
import random
import stat

import pytest

from protocol import fuse
from protocol.buffers import Reader, Writer
from vfsd.cli import parse_args
from vfsd.daemon import filesystem, session_options
from vfsd.server import NO_REPLY, FuseServer

O = fuse.Opcode
REQUESTS = 1500  # per seed and entry point: ~1 s

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
NAMES = [b"a", b"b", b"d", b"f", b"sub", b"out", b"lnk", b".", b"..", b"/etc", b"a/b",
         b"../outside", b"", b"x" * 255, b"x" * 256, b"\xff\xfe", b"a\0b", b"user.o",
         b"user.o.o", b"user.x", b"trusted.x", b"security.capability",
         b"system.posix_acl_access", b"system.posix_acl_default"]
MODES = [0, 0o644, 0o4755, stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755, stat.S_IFCHR | 0o644,
         stat.S_IFBLK | 0o600, stat.S_IFIFO | 0o644, stat.S_IFSOCK | 0o755,
         stat.S_IFLNK | 0o777]
BITS = {"B": 8, "H": 16, "I": 32, "i": 32, "Q": 64, "q": 64}
INIT = fuse.fuse_init_in.pack(major=7, minor=38, max_readahead=65536, flags=0xFFFFFFFF,
                              flags2=0xFFFFFFFF)


class Fuzzer:
    def __init__(self, seed: int, share: str, layout: str, options: tuple[str, ...] = ()):
        """`options`: vfsd's command line options for the filesystem and session."""
        self.r = random.Random(seed)
        config = parse_args(["--shared-dir", share, "--socket-path", "/nonexistent", *options])
        self.server = FuseServer(filesystem(config), session_options(config))
        self.layout = layout
        self.nodes, self.fhs = [1], [0]
        self.unique = 0
        assert self.call(O.INIT, 0, INIT)[0] == 0

    def call(self, opcode, nodeid, args=b"") -> tuple[int, bytes]:
        """A well-formed request with room for any reply: (errno, reply arguments)."""
        self.unique += 1
        hdr = fuse.fuse_in_header.pack(len=40 + len(args), opcode=opcode, unique=self.unique,
                                       nodeid=nodeid)
        out = bytearray(4096)
        n = self.server.handle(Reader([memoryview(hdr + args)]), Writer([memoryview(out)]))
        return -fuse.fuse_out_header.unpack(bytes(out[:16])).error, bytes(out[16:n])

    def value(self, code: str) -> int:
        r, bits = self.r, BITS[code]
        pick = r.random()
        if pick < 0.3:
            v = r.choice(self.nodes + self.fhs + [0, 1])
        elif pick < 0.5:
            v = r.choice(MODES + [4096, 1 << 20, os.O_RDWR | os.O_CREAT | os.O_TRUNC])
        elif pick < 0.7:
            v = (1 << bits) - r.choice([1, 2]) if r.random() < 0.5 else 1 << (bits - 1)
        else:
            v = r.getrandbits(bits)
        v &= (1 << bits) - 1
        return v - (1 << bits) if code.islower() and v >= 1 << (bits - 1) else v

    def fields(self, struct) -> list:
        out = []
        for _, code in struct.fields:
            if isinstance(code, str):
                out.append(self.r.randbytes(int(code[:-1])) if code.endswith("s")
                           else self.value(code))
            else:
                out += self.fields(code)
        return out

    def name(self) -> bytes:
        return self.r.choice(NAMES) + (b"\0" if self.r.random() < 0.9 else b"")

    def request(self) -> tuple:
        r = self.r
        if r.random() < 0.03:
            opcode, args = r.choice([0, 7, 53, 4096, 0xFFFFFFFF]), r.randbytes(r.randrange(64))
        else:
            opcode = r.choice(list(SHAPES))
            struct, tail = SHAPES[opcode]
            args = struct.flat_pack(*self.fields(struct)) if struct else b""
            if tail == "data":
                args += r.randbytes(r.choice([0, 1, 100, 4096, 70000]))
            elif tail == "xattr":
                args += self.name() + r.randbytes(r.choice([0, 1, 4, 28, 44]))
            elif tail == "forgets":
                args = fuse.fuse_batch_forget_in.pack(count=r.choice([0, 1, 3, 1 << 31]))
                for _ in range(r.randrange(4)):
                    args += fuse.fuse_forget_one.pack(nodeid=r.choice(self.nodes + [99999]),
                                                      nlookup=r.choice([1, 2, 1 << 63]))
            else:
                args += b"".join(self.name() for _ in range(tail))
            if args and r.random() < 0.1:
                args = args[:r.randrange(len(args))]
            elif r.random() < 0.05:
                args += r.randbytes(r.randrange(1, 40))
        nodeid = r.choice(self.nodes + [0, 1, 1, 999999, 1 << 63, (1 << 64) - 1])
        length = 40 + len(args)
        if r.random() < 0.05:
            length = r.choice([0, 39, length - 1, length + 1, 0xFFFFFFFF])
        return opcode, nodeid, args, length

    def send(self, opcode, nodeid, args, length=None) -> None:
        r = self.r
        self.unique += 1
        uid, gid = (0xFFFFFFFF, 0) if r.random() < 0.02 else (r.choice([0, 1000]), 1000)
        hdr = fuse.fuse_in_header.pack(
            len=40 + len(args) if length is None else length, opcode=opcode, unique=self.unique,
            nodeid=nodeid, uid=uid, gid=gid, pid=1,
            total_extlen=r.choice([0, 1, 3]) if r.random() < 0.03 else 0)
        room = r.choice([4096, 4096, 65536 + 4096, 200, 16, 15])
        if self.layout == "reader":
            out = bytearray(room)
            n = self.server.handle(Reader([memoryview(hdr + args)]), Writer([memoryview(out)]))
        else:   # as Linux's virtio-fs lays a request out
            readable = [memoryview(bytearray(hdr))] + ([memoryview(bytearray(args))] if args
                                                       else [])
            bufs = [bytearray(16), bytearray(room)] if room > 16 else [bytearray(room)]
            n = self.server.handle_views(readable, [memoryview(b) for b in bufs],
                                         len(hdr) + len(args), sum(map(len, bufs)))
            out = b"".join(bufs)
        if not n:
            # Only what gets no reply, or what has no room for one (logged), is
            # left unanswered: the guest would wait for the rest forever.
            assert opcode in NO_REPLY or room < 16, (opcode, room)
            return
        assert 16 <= n <= len(out)
        oh = fuse.fuse_out_header.unpack(bytes(out[:16]))
        assert (oh.len, oh.unique) == (n, self.unique) and -4096 < oh.error <= 0, oh
        if oh.error == 0:
            self.remember(opcode, bytes(out[16:n]))

    def remember(self, opcode, body: bytes) -> None:
        """Node ids and handles handed out, to aim later requests at them."""
        entry = fuse.fuse_entry_out.size
        if opcode in (O.LOOKUP, O.MKNOD, O.MKDIR, O.SYMLINK, O.LINK) and len(body) >= entry:
            self.nodes.append(fuse.fuse_entry_out.unpack(body[:entry]).nodeid)
        elif opcode in (O.OPEN, O.OPENDIR) and len(body) >= fuse.fuse_open_out.size:
            self.fhs.append(fuse.fuse_open_out.unpack(body[:fuse.fuse_open_out.size]).fh)
        elif opcode in (O.CREATE, O.TMPFILE) and len(body) >= entry + fuse.fuse_open_out.size:
            self.nodes.append(fuse.fuse_entry_out.unpack(body[:entry]).nodeid)
            self.fhs.append(fuse.fuse_open_out.unpack(
                body[entry:entry + fuse.fuse_open_out.size]).fh)


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


# Option sets that open other paths: guest xattrs, ACLs and labels; records
# under a nesting name with id translations; a read-only share; the writeback
# cache; cache=never.
OPTIONS = {
    "defaults": (),
    "xattr-acl": ("--posix-acl", "--security-label"),
    "mapped": ("--xattr", "--record-name", "user.o.o", "--translate-uid", "forbid-guest:5:10",
               "--translate-gid", "squash-host:0:100:65536"),
    "readonly": ("--readonly", "--xattr"),
    "writeback": ("--writeback", "--cache", "always", "--no-killpriv-v2"),
    "never": ("--cache", "never", "--no-readdirplus", "--allow-direct-io"),
}


@pytest.mark.parametrize("layout", ["reader", "views"])
@pytest.mark.parametrize("seed,options", enumerate(OPTIONS, start=1))
def test_random_requests(tmp_path, caplog, seed, options, layout):
    share, outside = tmp_path / "share", tmp_path / "outside"
    (share / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    os.setxattr(outside / "secret", "user.o", b"not a record")
    (share / "f").write_bytes(b"data" * 1000)
    (share / "out").symlink_to("../outside")
    (share / "lnk").symlink_to("/etc/passwd")
    before = snapshot(outside)
    fz = Fuzzer(seed, str(share), layout, OPTIONS[options])
    caplog.set_level(logging.WARNING)
    seen = 0
    for i in range(REQUESTS):
        req = fz.request()
        try:
            fz.send(*req)
        except Exception as e:
            raise AssertionError(f"seed {seed}, request {i}: {req!r:.300}") from e
        internal = [rec.getMessage() for rec in caplog.records[seen:]
                    if rec.exc_info or "internal error" in rec.getMessage()]
        assert not internal, f"seed {seed}, request {i}: {req!r:.300}: {internal[0]}"
        seen = len(caplog.records)
    assert snapshot(outside) == before
    assert sorted(os.listdir(tmp_path)) == ["outside", "share"]
    # Still serving: a LOOKUP of a file it did not make.  (The fuzzer may have
    # sent a DESTROY, after which the guest sends INIT again, or renamed the
    # file away.)
    fz.call(O.INIT, 0, INIT)
    assert fz.call(O.LOOKUP, 1, b"f\0")[0] in (0, errno.ENOENT)
