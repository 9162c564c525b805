#!/usr/bin/env python3
"""A POSIX filesystem conformance table, run inside a test guest (python3, standard library).

    python3 posix_suite.py BASE_DIR [--only NAME[,NAME...]] > results.json

BASE_DIR must not exist yet; its parent is on the filesystem under test.  Every case runs in a
fresh directory of its own and records what happened as a list of ``[label, value]`` steps:
the return value of each call (normalised: no inode numbers, no block counts, no times unless
the case is about times) or ``"E<ERRNO NAME>"``, and snapshots of the objects it touched
(type, permission bits, uid, gid, nlink and size of non-directories, device numbers, every
xattr the caller can list with its value).  The host side (tests/vm/test_conformance.py) runs
this on the vfsd share and on a guest-local reference filesystem in the same boot and requires
the two JSON documents to agree.

Each case runs in one or more *variants*:

  root   as uid 0, in a directory owned by root
  user   as uid 1000 (groups 1000 and 2000), in a directory owned by 1000:1000
  x      as root, orchestrating several users (forked children with setresuid/setgroups)

The guest's fs.protected_{symlinks,hardlinks,fifos,regular} sysctls are set to 1 first.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import signal
import stat
import struct
import sys
import time
import traceback

UMASK = 0o022
USER = 1000         # the ordinary users of the test guest (tests/vm/guest.py GUEST_USERS)
OTHER = 1001
GROUP = 2000        # a supplementary group of USER in the "user" variant
CASE_TIMEOUT = 20   # seconds per case (a hang is recorded, the suite goes on)

libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_SYMLINK_FOLLOW = 0x400
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
O_TMPFILE = getattr(os, "O_TMPFILE", 0o20200000)
MiB = 1 << 20
GiB = 1 << 30

libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
libc.syncfs.argtypes = [ctypes.c_int]
libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                        ctypes.c_int]
libc.getxattr.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
libc.getxattr.restype = ctypes.c_ssize_t
libc.listxattr.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
libc.listxattr.restype = ctypes.c_ssize_t


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(Timespec),
                           ctypes.c_int]


def _check(ret):
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


libc.fchmodat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_int]


def lchmod(path, mode):
    """fchmodat(AT_SYMLINK_NOFOLLOW) (Python's os.chmod refuses follow_symlinks=False)."""
    return _check(libc.fchmodat(AT_FDCWD, os.fsencode(path), mode, AT_SYMLINK_NOFOLLOW))


def renameat2(old, new, flags):
    return _check(libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags))


def fallocate(fd, mode, offset, length):
    return _check(libc.fallocate(fd, mode, offset, length))


def syncfs(fd):
    return _check(libc.syncfs(fd))


def link_fd(fd, new):
    """linkat(/proc/self/fd/N, AT_SYMLINK_FOLLOW): name an O_TMPFILE file."""
    return _check(libc.linkat(AT_FDCWD, f"/proc/self/fd/{fd}".encode(), AT_FDCWD,
                              os.fsencode(new), AT_SYMLINK_FOLLOW))


def utimens(path, atime, mtime, follow=True):
    """utimensat with (sec, nsec) pairs; nsec may be UTIME_NOW / UTIME_OMIT."""
    ts = (Timespec * 2)(Timespec(*atime), Timespec(*mtime))
    return _check(libc.utimensat(AT_FDCWD, os.fsencode(path), ts,
                                 0 if follow else AT_SYMLINK_NOFOLLOW))


def getxattr_size(path, name, size):
    """getxattr with a buffer of `size` bytes (0: ask for the length)."""
    buf = ctypes.create_string_buffer(max(size, 1))
    return _check(libc.getxattr(os.fsencode(path), os.fsencode(name),
                                buf if size else None, size))


def listxattr_size(path, size):
    buf = ctypes.create_string_buffer(max(size, 1))
    return _check(libc.listxattr(os.fsencode(path), buf if size else None, size))


# ------------------------------------------------------------------------------------------
# POSIX ACLs in their xattr form

ACL_TAGS = {"u": 0x01, "U": 0x02, "g": 0x04, "G": 0x08, "m": 0x10, "o": 0x20}
ACL_NAMES = {v: k for k, v in ACL_TAGS.items()}
ACL_UNDEFINED = 0xFFFFFFFF


def acl(text):
    """'u::rw,u:1234:rw,g::r,m::rw,o::' -> system.posix_acl_* xattr value (version 2)."""
    entries = []
    for item in text.split(","):
        kind, qual, perms = item.split(":")
        tag = ACL_TAGS[kind.upper() if qual else kind]
        bits = (4 if "r" in perms else 0) | (2 if "w" in perms else 0) | (1 if "x" in perms else 0)
        entries.append((tag, int(qual) if qual else ACL_UNDEFINED, bits))
    entries.sort()
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, i, p in entries)


def acl_text(value):
    if len(value) < 4 or (len(value) - 4) % 8:
        return "bad-acl:" + value.hex()
    out = [f"v{struct.unpack_from('<I', value)[0]}"]
    for off in range(4, len(value), 8):
        tag, perm, qid = struct.unpack_from("<HHI", value, off)
        rwx = "".join(c if perm & b else "-" for c, b in (("r", 4), ("w", 2), ("x", 1)))
        name = ACL_NAMES.get(tag, f"?{tag}").lower()
        out.append(f"{name}:{'' if qid == ACL_UNDEFINED else qid}:{rwx}")
    return ",".join(out)


def caps_v2(permitted, effective=True):
    """A security.capability value (VFS_CAP_REVISION_2)."""
    return struct.pack("<IIIII", 0x02000000 | (1 if effective else 0), permitted & 0xFFFFFFFF,
                       0, permitted >> 32, 0)


CAP_NET_RAW = 1 << 13


# ------------------------------------------------------------------------------------------
# recording

TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
         stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket", stat.S_IFCHR: "chardev",
         stat.S_IFBLK: "blockdev"}


def err_name(e):
    if e.errno == errno.EOPNOTSUPP:     # errorcode[95] is "ENOTSUP", its alias
        return "EOPNOTSUPP"
    return errno.errorcode.get(e.errno, f"errno{e.errno}")


def norm(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, bytes):
        return show_bytes(v)
    if isinstance(v, (list, tuple)):
        return [norm(x) for x in v]
    if isinstance(v, dict):
        return {str(k): norm(x) for k, x in v.items()}
    if isinstance(v, os.stat_result):
        return "stat_result"
    return repr(v)


def show_bytes(b):
    if len(b) > 64:
        return f"<{len(b)} bytes sha256:{hashlib.sha256(b).hexdigest()[:16]}>"
    try:
        s = b.decode("ascii")
        if s.isprintable():
            return "'" + s + "'"
    except UnicodeDecodeError:
        pass
    return "hex:" + b.hex()


def show_xattr(name, value):
    if name.startswith("system.posix_acl_"):
        return acl_text(value)
    return show_bytes(value)


def snapshot(path, follow=False, xattrs=True):
    st = os.stat(path, follow_symlinks=follow)
    kind = stat.S_IFMT(st.st_mode)
    d = {"type": TYPES.get(kind, oct(kind)), "perm": oct(stat.S_IMODE(st.st_mode)),
         "uid": st.st_uid, "gid": st.st_gid}
    if kind != stat.S_IFDIR:
        d["nlink"] = st.st_nlink
        d["size"] = st.st_size
    if kind in (stat.S_IFCHR, stat.S_IFBLK):
        d["rdev"] = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    if xattrs:
        try:
            names = sorted(os.listxattr(path, follow_symlinks=follow))
        except OSError as e:
            d["xattrs"] = err_name(e)
        else:
            xs = {}
            for n in names:
                try:
                    xs[n] = show_xattr(n, os.getxattr(path, n, follow_symlinks=follow))
                except OSError as e:
                    xs[n] = err_name(e)
            d["xattrs"] = xs
    return d


class T:
    """A case's recorder: t.do(label, fn, *args) calls fn and records its result."""

    def __init__(self, variant, prefix=""):
        self.variant = variant
        self.prefix = prefix
        self.log = []

    @property
    def root(self):
        return os.geteuid() == 0

    def note(self, label, value):
        self.log.append([self.prefix + label, norm(value)])

    def do(self, label, fn, *args, **kw):
        try:
            v = fn(*args, **kw)
        except OSError as e:
            self.note(label, err_name(e))
            return None
        self.note(label, "ok" if v is None else v)
        return v if v is not None else True

    def open(self, label, path, flags, mode=0o666):
        """open + close: records "ok" or the errno (never a descriptor number)."""
        return self.do(label, lambda: os.close(os.open(path, flags, mode)))

    def st(self, path, label=None, follow=False, xattrs=True):
        try:
            v = snapshot(path, follow, xattrs)
        except OSError as e:
            v = err_name(e)
        self.note(label or f"stat {path}", v)
        return v

    def read(self, path, label=None):
        def rd():
            with open(path, "rb") as f:
                return f.read()
        return self.do(label or f"read {path}", rd)

    def write(self, path, data, flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode=0o666,
              label=None):
        def wr():
            fd = os.open(path, flags, mode)
            try:
                return os.write(fd, data)
            finally:
                os.close(fd)
        return self.do(label or f"write {path}", wr)

    def as_user(self, uid, fn, gid=None, groups=None, umask=UMASK, label=None):
        """Runs fn(T) in a forked child with uid/gid/groups; its steps are appended here."""
        gid = uid if gid is None else gid
        groups = [gid] if groups is None else list(groups)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(r)
                os.setgroups(groups)
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
                os.umask(umask)
                signal.alarm(CASE_TIMEOUT)
                sub = T(self.variant, prefix=f"{self.prefix}[{label or uid}] ")
                try:
                    fn(sub)
                except BaseException:  # noqa: BLE001 - recorded for the host to see
                    sub.note("crash", traceback.format_exc(limit=3).splitlines()[-1])
                data = json.dumps(sub.log).encode()
                while data:
                    data = data[os.write(w, data):]
            except BaseException:  # noqa: BLE001
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        chunks = []
        while True:
            b = os.read(r, 65536)
            if not b:
                break
            chunks.append(b)
        os.close(r)
        os.waitpid(pid, 0)
        try:
            self.log.extend(json.loads(b"".join(chunks) or b"[]"))
        except ValueError:
            self.note("child-output", "unparsable")


CASES = {}


def case(*variants):
    def deco(fn):
        CASES[fn.__name__.removeprefix("case_")] = (fn, variants)
        return fn
    return deco


def mkfile(path, data=b"", mode=0o644):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, mode)


# ------------------------------------------------------------------------------------------
# the cases: generic ones (root, user)

@case("root", "user")
def case_chmod(t):
    mkfile("f")
    for m in (0, 0o7777, 0o4755, 0o2755, 0o2745, 0o1755, 0o644):
        t.do(f"chmod {m:o}", os.chmod, "f", m)
        t.st("f", f"after chmod {m:o}")
    os.mkdir("d")
    t.do("chmod d 3777", os.chmod, "d", 0o3777)
    t.st("d")
    os.symlink("f", "l")
    t.do("chmod via symlink 600", os.chmod, "l", 0o600)
    t.st("f", "target after chmod via symlink")
    t.st("l")
    t.do("lchmod symlink", lchmod, "l", 0o644)
    t.do("lchmod file", lchmod, "f", 0o640)
    fd = os.open("f", os.O_RDONLY)
    t.do("fchmod 640", os.fchmod, fd, 0o640)
    os.close(fd)
    t.st("f")
    t.do("chmod missing", os.chmod, "missing", 0o644)


@case("root", "user")
def case_chown(t):
    me = os.geteuid()
    for name, mode in (("f", 0o6755), ("g", 0o2745), ("h", 0o4700)):
        mkfile(name, b"data")
        os.chmod(name, mode)
    os.mkdir("d")
    os.chmod("d", 0o6755)
    os.symlink("f", "l")
    if t.root:
        t.do("chown f 1234:5678", os.chown, "f", 1234, 5678)
        t.do("chown g -1:42", os.chown, "g", -1, 42)
        t.do("chown h 0:0 (same owner)", os.chown, "h", 0, 0)
        t.do("chown d 7:7", os.chown, "d", 7, 7)
        t.do("lchown l 7:8", os.chown, "l", 7, 8, follow_symlinks=False)
        t.do("chown via symlink 9:10", os.chown, "l", 9, 10)
        t.do("chown 2^32-2", os.chown, "h", 0xFFFFFFFE, 0xFFFFFFFE)
    else:
        t.do("chown f to self", os.chown, "f", me, -1)
        t.do("chown f to other", os.chown, "f", OTHER, -1)
        t.do("chgrp f to supplementary group", os.chown, "f", -1, GROUP)
        t.do("chgrp g to foreign group", os.chown, "g", -1, 3000)
        t.do("chgrp g to own group", os.chown, "g", -1, me)
        t.do("chown h -1:-1", os.chown, "h", -1, -1)
        t.do("chgrp d to supplementary group", os.chown, "d", -1, GROUP)
        t.do("lchgrp l", os.chown, "l", -1, GROUP, follow_symlinks=False)
    fd = os.open("g", os.O_RDONLY)
    t.do("fchown g -1:-1", os.fchown, fd, -1, -1)
    os.close(fd)
    for n in ("f", "g", "h", "d", "l"):
        t.st(n)


@case("root", "user")
def case_mkdir(t):
    t.do("mkdir 777", os.mkdir, "a", 0o777)
    t.do("mkdir 7777", os.mkdir, "b", 0o7777)
    t.do("mkdir 0", os.mkdir, "c", 0)
    t.do("mkdir existing", os.mkdir, "a")
    t.do("mkdir missing parent", os.mkdir, "nope/x")
    mkfile("f")
    t.do("mkdir under file", os.mkdir, "f/x")
    t.do("mkdir name 255", os.mkdir, "n" * 255)
    t.do("mkdir name 256", os.mkdir, "n" * 256)
    t.do("mkdir in mode-0 dir", os.mkdir, "c/x")
    os.mkdir("ro", 0o555)
    t.do("mkdir in 555 dir", os.mkdir, "ro/x")
    for n in ("a", "b", "c", "ro/x"):
        t.st(n)
    t.do("listdir", lambda: sorted(n if len(n) < 20 else f"{n[0]}*{len(n)}"
                                   for n in os.listdir(".")))


@case("root", "user")
def case_mkfifo(t):
    t.do("mkfifo", os.mkfifo, "p", 0o666)
    t.do("mkfifo 600", os.mkfifo, "q", 0o600)
    t.do("mkfifo existing", os.mkfifo, "p")
    t.st("p")
    t.st("q")
    t.open("open write nonblock without reader", "p", os.O_WRONLY | os.O_NONBLOCK)

    def pipe_round_trip():
        r = os.open("p", os.O_RDONLY | os.O_NONBLOCK)
        w = os.open("p", os.O_WRONLY)
        os.write(w, b"through the fifo")
        data = os.read(r, 100)
        os.close(w)
        eof = os.read(r, 100)
        os.close(r)
        return [data, eof]
    t.do("pipe round trip", pipe_round_trip)
    t.st("p", "after use")


@case("root", "user")
def case_mknod(t):
    t.do("mknod chr 1:3", os.mknod, "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    t.do("mknod chr 1:5", os.mknod, "zero", stat.S_IFCHR | 0o640, os.makedev(1, 5))
    t.do("mknod blk 7:0", os.mknod, "loop", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    t.do("mknod blk 259:65536", os.mknod, "big", stat.S_IFBLK | 0o600, os.makedev(259, 65536))
    t.do("mknod whiteout 0:0", os.mknod, "wh", stat.S_IFCHR, 0)
    t.do("mknod fifo", os.mknod, "fifo", stat.S_IFIFO | 0o644)
    t.do("mknod socket", os.mknod, "sock", stat.S_IFSOCK | 0o755)
    t.do("mknod regular", os.mknod, "reg", stat.S_IFREG | 0o4755)
    t.do("mknod regular (type 0)", os.mknod, "reg0", 0o640)
    t.do("mknod dir", os.mknod, "dir", stat.S_IFDIR | 0o755)
    t.do("mknod existing", os.mknod, "fifo", stat.S_IFIFO | 0o644)
    for n in ("null", "zero", "loop", "big", "wh", "fifo", "sock", "reg", "reg0", "dir"):
        t.st(n)

    def use_devices():
        with open("null", "r+b", buffering=0) as f:
            w = f.write(b"gone")
            r = f.read(10)
        with open("zero", "rb", buffering=0) as f:
            z = f.read(8)
        return [w, r, z]
    t.do("use null and zero", use_devices)
    t.open("open socket node", "sock", os.O_RDONLY)
    t.st("null", "null after use")


@case("root", "user")
def case_open(t):
    mkfile("f", b"0123456789")
    os.mkdir("d")
    os.symlink("f", "l")
    os.symlink("dangling-target", "dl")
    t.do("O_CREAT new 0600", lambda: os.close(os.open("n1", os.O_CREAT | os.O_WRONLY, 0o600)))
    t.do("O_CREAT new 4777", lambda: os.close(os.open("n2", os.O_CREAT | os.O_WRONLY, 0o4777)))
    t.open("O_CREAT|O_EXCL existing", "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    t.open("O_CREAT|O_EXCL dangling symlink", "dl", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    t.do("O_CREAT via dangling symlink",
         lambda: os.close(os.open("dl", os.O_CREAT | os.O_WRONLY, 0o640)))
    t.st("dangling-target")
    t.do("O_CREAT existing keeps data",
         lambda: os.close(os.open("f", os.O_CREAT | os.O_RDONLY, 0o600)))
    t.read("f")
    t.write("f", b"abc", os.O_WRONLY | os.O_TRUNC, label="O_TRUNC write")
    t.read("f")

    def append():
        fd = os.open("f", os.O_WRONLY | os.O_APPEND)
        os.lseek(fd, 0, os.SEEK_SET)
        n = os.write(fd, b"XYZ")
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        os.close(fd)
        return [n, pos]
    t.do("O_APPEND after seek 0", append)
    t.read("f")
    t.open("O_DIRECTORY on file", "f", os.O_RDONLY | os.O_DIRECTORY)
    t.do("O_DIRECTORY on dir", lambda: os.close(os.open("d", os.O_RDONLY | os.O_DIRECTORY)))
    t.open("O_DIRECTORY via symlink to file", "l", os.O_RDONLY | os.O_DIRECTORY)
    t.open("O_NOFOLLOW on symlink", "l", os.O_RDONLY | os.O_NOFOLLOW)
    t.do("O_NOFOLLOW on file", lambda: os.close(os.open("f", os.O_RDONLY | os.O_NOFOLLOW)))

    def opath():
        fd = os.open("l", os.O_PATH | os.O_NOFOLLOW)
        st = os.fstat(fd)
        os.close(fd)
        return TYPES[stat.S_IFMT(st.st_mode)]
    t.do("O_PATH|O_NOFOLLOW on symlink", opath)
    t.open("O_WRONLY on dir", "d", os.O_WRONLY)
    t.open("O_RDWR|O_CREAT on dir", "d", os.O_RDWR | os.O_CREAT)
    t.open("open missing", "missing", os.O_RDONLY)
    t.open("open missing/x", "missing/x", os.O_RDONLY)
    t.open("open f/x", "f/x", os.O_RDONLY)
    t.open("O_CREAT name 256", "n" * 256, os.O_CREAT | os.O_WRONLY)
    t.do("O_NOATIME own file", lambda: os.close(os.open("f", os.O_RDONLY | os.O_NOATIME)))
    os.chmod("f", 0o444)
    t.do("O_WRONLY on 0444 file", lambda: os.close(os.open("f", os.O_WRONLY)))
    t.do("O_RDONLY|O_TRUNC on 0444 file", lambda: os.close(os.open("f", os.O_RDONLY | os.O_TRUNC)))
    os.mkdir("ro", 0o555)
    t.do("O_CREAT in 0555 dir", lambda: os.close(os.open("ro/x", os.O_CREAT | os.O_WRONLY)))

    def wrong_direction():
        fd = os.open("n1", os.O_WRONLY)
        try:
            return os.read(fd, 1)
        finally:
            os.close(fd)
    t.do("read from O_WRONLY fd", wrong_direction)
    for n in ("f", "n1", "n2", "ro/x"):
        t.st(n)


@case("root", "user")
def case_tmpfile(t):
    def tmp_and_link(name, flags=0):
        fd = os.open(".", O_TMPFILE | os.O_RDWR | flags, 0o640)
        try:
            os.write(fd, b"anonymous")
            st = os.fstat(fd)
            r = [TYPES[stat.S_IFMT(st.st_mode)], oct(stat.S_IMODE(st.st_mode)), st.st_nlink,
                 st.st_uid, st.st_gid, sorted(os.listdir("."))]
            link_fd(fd, name)
            r.append(os.fstat(fd).st_nlink)
            return r
        finally:
            os.close(fd)
    t.do("O_TMPFILE then linkat", tmp_and_link, "named")
    t.st("named")
    t.read("named")
    t.do("O_TMPFILE|O_EXCL then linkat", tmp_and_link, "never", os.O_EXCL)
    t.open("O_TMPFILE on a file", "named", O_TMPFILE | os.O_RDWR, 0o600)
    t.open("O_TMPFILE read-only", ".", O_TMPFILE | os.O_RDONLY, 0o600)
    t.do("listdir", lambda: sorted(os.listdir(".")))


@case("root", "user")
def case_rename(t):
    for n in ("a", "b", "c", "x", "y"):
        mkfile(n, n.encode())
    for n in ("d1", "d2", "d3", "full", "full/sub"):
        os.mkdir(n)
    mkfile("full/f")
    t.do("rename a -> a2", os.rename, "a", "a2")
    t.do("rename b over c", os.rename, "b", "c")
    t.read("c")
    t.do("rename missing", os.rename, "missing", "z")
    t.do("rename d1 -> d1b", os.rename, "d1", "d1b")
    t.do("rename d1b over empty d2", os.rename, "d1b", "d2")
    t.do("rename d2 over non-empty", os.rename, "d2", "full")
    t.do("rename file over dir", os.rename, "c", "d3")
    t.do("rename dir over file", os.rename, "d3", "c")
    t.do("rename dir into itself", os.rename, "full", "full/sub/inner")
    t.do("rename . ", os.rename, ".", "dot")
    os.link("x", "x2")
    t.do("rename hard link onto its twin", os.rename, "x", "x2")
    t.st("x")
    t.st("x2")
    t.do("NOREPLACE onto existing", renameat2, "y", "c", RENAME_NOREPLACE)
    t.do("NOREPLACE onto new", renameat2, "y", "y2", RENAME_NOREPLACE)
    t.do("EXCHANGE file and dir", renameat2, "y2", "d3", RENAME_EXCHANGE)
    t.st("y2")
    t.st("d3")
    t.read("d3")
    t.do("EXCHANGE with missing", renameat2, "c", "missing", RENAME_EXCHANGE)
    t.do("NOREPLACE|EXCHANGE", renameat2, "c", "d3", RENAME_NOREPLACE | RENAME_EXCHANGE)
    t.do("WHITEOUT", renameat2, "c", "c-moved", RENAME_WHITEOUT)
    t.st("c")
    t.st("c-moved")
    t.do("WHITEOUT|NOREPLACE onto existing", renameat2, "c-moved", "x2",
         RENAME_WHITEOUT | RENAME_NOREPLACE)
    t.do("unlink whiteout", os.unlink, "c")
    t.do("listdir", lambda: sorted(os.listdir(".")))


@case("root", "user")
def case_rmdir_unlink(t):
    os.mkdir("e")
    os.mkdir("ne")
    mkfile("ne/f")
    mkfile("f", b"still readable")
    t.do("rmdir empty", os.rmdir, "e")
    t.do("rmdir non-empty", os.rmdir, "ne")
    t.do("rmdir file", os.rmdir, "f")
    t.do("rmdir .", os.rmdir, ".")
    t.do("rmdir missing", os.rmdir, "e")
    t.do("unlink dir", os.unlink, "ne")
    t.do("unlink missing", os.unlink, "missing")

    def unlink_open():
        fd = os.open("f", os.O_RDONLY)
        os.unlink("f")
        st = os.fstat(fd)
        data = os.pread(fd, 100, 0)
        os.close(fd)
        return [st.st_nlink, data, os.path.exists("f")]
    t.do("unlink while open", unlink_open)
    os.mkdir("ro")
    mkfile("ro/f")
    os.chmod("ro", 0o555)
    t.do("unlink in 0555 dir", os.unlink, "ro/f")
    t.do("listdir", lambda: sorted(os.listdir(".")))


@case("root", "user")
def case_symlink(t):
    mkfile("target", b"T")
    os.mkdir("dir")
    mkfile("dir/inner", b"I")
    t.do("symlink", os.symlink, "target", "l")
    t.st("l")
    t.do("readlink", os.readlink, "l")
    t.read("l", "read via symlink")
    t.do("symlink existing", os.symlink, "x", "l")
    t.do("symlink 4095", os.symlink, "a" * 4095, "long")
    t.do("readlink 4095", lambda: len(os.readlink("long")))
    t.st("long")
    t.do("symlink 4096", os.symlink, "a" * 4096, "toolong")
    t.do("symlink to dir", os.symlink, "dir", "ld")
    t.read("ld/inner", "read through dir symlink")
    t.do("dangling", os.symlink, "nowhere", "dl")
    t.do("stat dangling", os.stat, "dl")
    os.symlink("loop2", "loop1")
    os.symlink("loop1", "loop2")
    t.open("open loop", "loop1", os.O_RDONLY)
    t.do("readlink on file", os.readlink, "target")
    t.do("symlink absolute", os.symlink, "/proc/self", "abs")
    t.do("readlink absolute", os.readlink, "abs")
    t.do("symlink with odd bytes", os.symlink, b"a\nb\xff/../c", b"odd")
    t.do("readlink odd", lambda: os.readlink(b"odd"))
    t.do("listdir types", lambda: sorted(
        (e.name[:20], e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False),
         e.is_symlink(), e.inode() == os.lstat(e.name).st_ino)
        for e in os.scandir(".")))


@case("root", "user")
def case_truncate(t):
    mkfile("f", bytes(range(100)))
    t.do("truncate 10", os.truncate, "f", 10)
    t.read("f")
    t.do("truncate 5000", os.truncate, "f", 5000)
    t.do("content", lambda: hashlib.sha256(open("f", "rb").read()).hexdigest()[:16])
    t.st("f")
    t.do("truncate -1", os.truncate, "f", -1)
    fd = os.open("f", os.O_RDONLY)
    t.do("ftruncate read-only fd", os.ftruncate, fd, 1)
    os.close(fd)
    fd = os.open("f", os.O_RDWR)
    t.do("ftruncate 3", os.ftruncate, fd, 3)
    os.close(fd)
    t.st("f")
    os.mkdir("d")
    t.do("truncate dir", os.truncate, "d", 0)
    t.do("truncate missing", os.truncate, "missing", 0)
    os.chmod("f", 0o444)
    t.do("truncate 0444 file", os.truncate, "f", 0)
    t.st("f")
    os.mkfifo("p")
    t.do("truncate fifo", os.truncate, "p", 0)


@case("root", "user")
def case_link(t):
    mkfile("f", b"shared")
    t.do("link", os.link, "f", "g")
    t.do("same inode", lambda: os.stat("f").st_ino == os.stat("g").st_ino)
    t.st("f")
    t.do("chmod via g", os.chmod, "g", 0o600)
    t.do("setxattr via g", os.setxattr, "g", "user.shared", b"1")
    t.write("g", b"changed", os.O_WRONLY | os.O_TRUNC, label="write via g")
    t.st("f", "f after changes via g")
    t.read("f")
    t.do("link existing", os.link, "f", "g")
    os.mkdir("d")
    t.do("link dir", os.link, "d", "d2")
    t.do("link missing", os.link, "missing", "m2")
    os.symlink("f", "s")
    t.do("link symlink itself", os.link, "s", "s2", follow_symlinks=False)
    t.st("s2")
    t.do("link following symlink", os.link, "s", "h", follow_symlinks=True)
    t.st("h")
    t.do("rename g -> g2", os.rename, "g", "g2")
    t.do("unlink f", os.unlink, "f")
    t.st("g2")
    t.st("h")
    os.mkfifo("p")
    t.do("link fifo", os.link, "p", "p2")
    t.st("p2")
    if t.root:
        os.mknod("c", stat.S_IFCHR | 0o644, os.makedev(1, 3))
        t.do("link chardev", os.link, "c", "c2")
        t.do("chown via one link", os.chown, "c2", 5, 6)
        t.st("c")


@case("root", "user")
def case_utimens(t):
    mkfile("f")
    os.symlink("f", "l")
    t.do("set ns times", os.utime, "f", ns=(1234567890_123456789, 987654321_987654321))
    t.do("times", lambda: [os.stat("f").st_atime_ns, os.stat("f").st_mtime_ns])
    t.do("omit atime", utimens, "f", (0, UTIME_OMIT), (1000, 5))
    t.do("times", lambda: [os.stat("f").st_atime_ns, os.stat("f").st_mtime_ns])
    t.do("omit both", utimens, "f", (7, UTIME_OMIT), (8, UTIME_OMIT))
    t.do("times", lambda: [os.stat("f").st_atime_ns, os.stat("f").st_mtime_ns])
    t.do("now", utimens, "f", (0, UTIME_NOW), (0, UTIME_NOW))
    t.do("times near now", lambda: [abs(os.stat("f").st_atime - time.time()) < 300,
                                    abs(os.stat("f").st_mtime - time.time()) < 300])
    t.do("pre-1970", os.utime, "f", ns=(-31536000_500000000, -1))
    t.do("times", lambda: [os.stat("f").st_atime_ns, os.stat("f").st_mtime_ns])
    t.do("year 2242", os.utime, "f", ns=((1 << 33) * 10**9, (1 << 33) * 10**9 + 1))
    t.do("times", lambda: [os.stat("f").st_atime_ns, os.stat("f").st_mtime_ns])
    t.do("lutimes symlink", os.utime, "l", ns=(5_000000001, 6_000000002),
         follow_symlinks=False)
    t.do("symlink times", lambda: [os.lstat("l").st_atime_ns, os.lstat("l").st_mtime_ns])
    t.do("target untouched", lambda: os.stat("f").st_mtime_ns == (1 << 33) * 10**9 + 1)
    t.do("bad nsec", utimens, "f", (0, 1_000_000_000), (0, 0))
    fd = os.open("f", os.O_RDONLY)
    t.do("futimens", os.utime, fd, ns=(11, 22))
    os.close(fd)
    t.do("times", lambda: [os.stat("f").st_atime_ns, os.stat("f").st_mtime_ns])

    def mtime_moves_on_write():
        os.utime("f", ns=(0, 0))
        with open("f", "ab") as fh:
            fh.write(b"x")
        return os.stat("f").st_mtime_ns > 0
    t.do("write updates mtime", mtime_moves_on_write)


@case("root", "user")
def case_xattr_user(t):
    mkfile("f")
    os.mkdir("d")
    os.symlink("f", "l")
    os.mkfifo("p")
    t.do("get missing", os.getxattr, "f", "user.a")
    t.do("set", os.setxattr, "f", "user.a", b"value")
    t.do("get", os.getxattr, "f", "user.a")
    t.do("set empty", os.setxattr, "f", "user.empty", b"")
    t.do("get empty", os.getxattr, "f", "user.empty")
    t.do("set binary", os.setxattr, "f", "user.bin", b"\0\1\2\xff\0")
    t.do("get binary", os.getxattr, "f", "user.bin")
    t.do("XATTR_CREATE existing", os.setxattr, "f", "user.a", b"x", os.XATTR_CREATE)
    t.do("XATTR_CREATE new", os.setxattr, "f", "user.c", b"c", os.XATTR_CREATE)
    t.do("XATTR_REPLACE missing", os.setxattr, "f", "user.nope", b"x", os.XATTR_REPLACE)
    t.do("XATTR_REPLACE existing", os.setxattr, "f", "user.a", b"replaced", os.XATTR_REPLACE)
    t.do("CREATE|REPLACE", os.setxattr, "f", "user.a", b"x",
         os.XATTR_CREATE | os.XATTR_REPLACE)
    t.do("get replaced", os.getxattr, "f", "user.a")
    t.do("list", lambda: sorted(os.listxattr("f")))
    t.do("remove", os.removexattr, "f", "user.c")
    t.do("remove missing", os.removexattr, "f", "user.c")
    t.do("get removed", os.getxattr, "f", "user.c")
    t.do("value 1000", os.setxattr, "f", "user.v1000", b"v" * 1000)
    t.do("get 1000", lambda: len(os.getxattr("f", "user.v1000")))
    t.do("value 65537", os.setxattr, "f", "user.huge", b"h" * 65537)
    t.do("name 255", os.setxattr, "f", "user." + "n" * 250, b"1")
    t.do("get name 255", os.getxattr, "f", "user." + "n" * 250)
    t.do("name 256", os.setxattr, "f", "user." + "n" * 251, b"1")
    t.do("get name 256", os.getxattr, "f", "user." + "n" * 251)
    t.do("empty suffix", os.setxattr, "f", "user.", b"1")
    t.do("no namespace", os.setxattr, "f", "plain", b"1")
    t.do("unknown namespace", os.setxattr, "f", "os2.x", b"1")
    t.do("system.foo", os.setxattr, "f", "system.foo", b"1")
    t.do("get system.foo", os.getxattr, "f", "system.foo")
    t.do("getxattr size 0", getxattr_size, "f", "user.a", 0)
    t.do("getxattr small buffer", getxattr_size, "f", "user.a", 3)
    t.do("getxattr exact buffer", getxattr_size, "f", "user.a", 8)
    t.do("listxattr size 0", listxattr_size, "f", 0)
    t.do("listxattr small buffer", listxattr_size, "f", 5)
    t.do("on dir", os.setxattr, "d", "user.dir", b"d")
    t.do("get on dir", os.getxattr, "d", "user.dir")
    t.do("on symlink (nofollow)", os.setxattr, "l", "user.s", b"s", follow_symlinks=False)
    t.do("get on symlink (nofollow)", os.getxattr, "l", "user.s", follow_symlinks=False)
    t.do("list symlink (nofollow)", lambda: sorted(os.listxattr("l", follow_symlinks=False)))
    t.do("via symlink (follow)", os.setxattr, "l", "user.via", b"v")
    t.do("on fifo", os.setxattr, "p", "user.p", b"p")
    t.do("get on fifo", os.getxattr, "p", "user.p")
    t.do("list fifo", lambda: sorted(os.listxattr("p")))
    t.do("on missing", os.setxattr, "missing", "user.a", b"1")
    fd = os.open("f", os.O_RDONLY)
    t.do("fsetxattr on O_RDONLY fd", os.setxattr, fd, "user.fd", b"1")
    t.do("fgetxattr", os.getxattr, fd, "user.fd")
    os.close(fd)
    os.chmod("f", 0o444)
    t.do("set on 0444 file", os.setxattr, "f", "user.ro", b"1")
    os.chmod("f", 0o200)
    t.do("get on 0200 file", os.getxattr, "f", "user.a")
    t.do("list on 0200 file", lambda: sorted(os.listxattr("f")))
    os.chmod("f", 0o644)
    t.st("f")
    t.st("d")


@case("root", "user")
def case_xattr_reserved_names(t):
    """Names a vfsd escapes or reserves must behave like any other name in the guest."""
    mkfile("f")
    names = ["user.o", "user.o.x", "user.o.o", "user.origin", "user.o.trusted.x",
             "user.o.security.capability", "user.o.system.posix_acl_access", "user.oo",
             "user.vfsd", "user.x.o"]
    for n in names:
        t.do(f"get {n} before", os.getxattr, "f", n)
        t.do(f"remove {n} before", os.removexattr, "f", n)
        t.do(f"REPLACE {n} before", os.setxattr, "f", n, b"r", os.XATTR_REPLACE)
        t.do(f"set {n}", os.setxattr, "f", n, n.encode(), os.XATTR_CREATE)
    t.do("list", lambda: sorted(os.listxattr("f")))
    t.do("listxattr size 0", listxattr_size, "f", 0)
    for n in names:
        t.do(f"get {n}", os.getxattr, "f", n)
    for n in names[::2]:
        t.do(f"remove {n}", os.removexattr, "f", n)
    t.do("list after removing", lambda: sorted(os.listxattr("f")))
    t.st("f")
    # Long names: vfsd escapes some names into longer host names (user.o.X -> user.o.o.X,
    # trusted.X -> user.o.trusted.X); those that no longer fit in 255 bytes are refused.
    mkfile("long")
    t.do("set user.o 253-byte name", os.setxattr, "long", "user.o." + "a" * 246, b"1")
    t.do("get user.o 253-byte name", os.getxattr, "long", "user.o." + "a" * 246)
    t.do("set user.o 255-byte name", os.setxattr, "long", "user.o." + "a" * 248, b"1")
    t.do("get user.o 255-byte name", os.getxattr, "long", "user.o." + "a" * 248)
    t.do("remove user.o 255-byte name", os.removexattr, "long", "user.o." + "a" * 248)
    t.do("set trusted 247-byte name", os.setxattr, "long", "trusted." + "a" * 239, b"1")
    t.do("set trusted 255-byte name", os.setxattr, "long", "trusted." + "a" * 247, b"1")
    t.do("get trusted 255-byte name", os.getxattr, "long", "trusted." + "a" * 247)
    t.do("list long names", lambda: sorted(f"{n[:10]}*{len(n)}" for n in os.listxattr("long")))


@case("root", "user")
def case_xattr_privileged(t):
    mkfile("f", b"#!/bin/sh\n")
    os.mkdir("d")
    os.symlink("f", "l")
    os.mkfifo("p")
    t.do("set trusted.a", os.setxattr, "f", "trusted.a", b"T")
    t.do("get trusted.a", os.getxattr, "f", "trusted.a")
    t.do("set trusted.overlay.opaque on dir", os.setxattr, "d", "trusted.overlay.opaque", b"y")
    t.do("set trusted on symlink", os.setxattr, "l", "trusted.l", b"L", follow_symlinks=False)
    t.do("get trusted on symlink", os.getxattr, "l", "trusted.l", follow_symlinks=False)
    t.do("set trusted on fifo", os.setxattr, "p", "trusted.p", b"P")
    t.do("get trusted on fifo", os.getxattr, "p", "trusted.p")
    t.do("set security.test", os.setxattr, "f", "security.test", b"label")
    t.do("get security.test", os.getxattr, "f", "security.test")
    t.do("set security.test on symlink", os.setxattr, "l", "security.test", b"sl",
         follow_symlinks=False)
    t.do("get security.test on symlink", os.getxattr, "l", "security.test",
         follow_symlinks=False)
    t.do("set security.capability garbage", os.setxattr, "f", "security.capability", b"junk")
    t.do("set security.capability", os.setxattr, "f", "security.capability",
         caps_v2(CAP_NET_RAW))
    t.do("get security.capability", os.getxattr, "f", "security.capability")
    t.do("remove trusted.a", os.removexattr, "f", "trusted.a")
    t.do("remove trusted.a again", os.removexattr, "f", "trusted.a")
    t.do("trusted XATTR_REPLACE missing", os.setxattr, "f", "trusted.zz", b"1",
         os.XATTR_REPLACE)
    t.do("list f", lambda: sorted(os.listxattr("f")))
    t.do("list d", lambda: sorted(os.listxattr("d")))
    t.do("list l", lambda: sorted(os.listxattr("l", follow_symlinks=False)))
    t.do("list p", lambda: sorted(os.listxattr("p")))


@case("root", "user")
def case_sparse_seek(t):
    fd = os.open("s", os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(fd, b"A" * MiB, 0)
    os.pwrite(fd, b"B" * MiB, 8 * MiB)
    os.ftruncate(fd, 16 * MiB)
    os.fsync(fd)
    t.do("size", lambda: os.fstat(fd).st_size)
    for label, off, whence in (("DATA 0", 0, os.SEEK_DATA), ("HOLE 0", 0, os.SEEK_HOLE),
                               ("DATA 1M", MiB, os.SEEK_DATA), ("HOLE 8M", 8 * MiB, os.SEEK_HOLE),
                               ("DATA 9M", 9 * MiB, os.SEEK_DATA),
                               ("HOLE 9M", 9 * MiB, os.SEEK_HOLE),
                               ("DATA 16M", 16 * MiB, os.SEEK_DATA),
                               ("HOLE 16M", 16 * MiB, os.SEEK_HOLE),
                               ("DATA 17M", 17 * MiB, os.SEEK_DATA),
                               ("END 0", 0, os.SEEK_END), ("SET -1", -1, os.SEEK_SET)):
        t.do(f"lseek {label}", os.lseek, fd, off, whence)
    t.do("read in hole", lambda: os.pread(fd, 4, 4 * MiB))
    t.do("read at 8M", lambda: os.pread(fd, 4, 8 * MiB))
    t.do("sparse on disk", lambda: os.fstat(fd).st_blocks * 512 < 8 * MiB)
    os.close(fd)


@case("root", "user")
def case_large_file(t):
    fd = os.open("big", os.O_RDWR | os.O_CREAT, 0o644)
    off = 5 * GiB + 1
    t.do("pwrite at 5 GiB + 1", os.pwrite, fd, b"end of a big file", off)
    t.do("size", lambda: os.fstat(fd).st_size)
    t.do("pread at 5 GiB + 1", os.pread, fd, 17, off)
    t.do("pread at 4 GiB", os.pread, fd, 8, 4 * GiB)
    t.do("pread across 4 GiB boundary", lambda: os.pread(fd, 8, 4 * GiB - 4))
    t.do("lseek DATA 0", os.lseek, fd, 0, os.SEEK_DATA)
    t.do("lseek HOLE 0", os.lseek, fd, 0, os.SEEK_HOLE)
    t.do("sparse on disk", lambda: os.fstat(fd).st_blocks * 512 < 16 * MiB)
    t.do("ftruncate 4 GiB + 3", os.ftruncate, fd, 4 * GiB + 3)
    t.do("size", lambda: os.fstat(fd).st_size)
    t.do("truncate 2^40", os.ftruncate, fd, 1 << 40)
    t.do("size", lambda: os.fstat(fd).st_size)
    os.close(fd)
    t.st("big")


@case("root", "user")
def case_fallocate(t):
    data = bytes(range(256)) * (4 * MiB // 256)
    mkfile("f", data)
    fd = os.open("f", os.O_RDWR)
    t.do("allocate beyond EOF", fallocate, fd, 0, 4 * MiB, MiB)
    t.do("size", lambda: os.fstat(fd).st_size)
    t.do("KEEP_SIZE beyond EOF", fallocate, fd, FALLOC_FL_KEEP_SIZE, 5 * MiB, MiB)
    t.do("size", lambda: os.fstat(fd).st_size)
    t.do("PUNCH_HOLE without KEEP_SIZE", fallocate, fd, FALLOC_FL_PUNCH_HOLE, 0, MiB)
    t.do("PUNCH_HOLE|KEEP_SIZE 1M..2M", fallocate, fd,
         FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, MiB, MiB)
    t.do("read punched", lambda: os.pread(fd, 4, MiB + 10))
    t.do("read around", lambda: [os.pread(fd, 2, MiB - 2), os.pread(fd, 2, 2 * MiB)])
    t.do("lseek HOLE 0", os.lseek, fd, 0, os.SEEK_HOLE)
    t.do("lseek DATA 1M", os.lseek, fd, MiB, os.SEEK_DATA)
    t.do("size", lambda: os.fstat(fd).st_size)
    t.do("bad length", fallocate, fd, 0, 0, 0)
    t.do("negative offset", fallocate, fd, 0, -1, 10)
    t.do("unknown mode bit", fallocate, fd, 0x1000, 0, 10)
    # Modes the guest's FUSE client (Linux 6.1) does not pass on; see test_conformance.py.
    t.do("ZERO_RANGE", fallocate, fd, FALLOC_FL_ZERO_RANGE, 0, 4096)
    t.do("COLLAPSE_RANGE", fallocate, fd, FALLOC_FL_COLLAPSE_RANGE, 0, MiB)
    t.do("INSERT_RANGE", fallocate, fd, FALLOC_FL_INSERT_RANGE, 0, MiB)
    os.close(fd)
    fd = os.open("f", os.O_RDONLY)
    t.do("on O_RDONLY fd", fallocate, fd, 0, 0, 4096)
    os.close(fd)
    os.mkdir("d")
    fd = os.open("d", os.O_RDONLY)
    t.do("on a directory", fallocate, fd, 0, 0, 4096)
    os.close(fd)
    t.st("f")


@case("root", "user")
def case_copy_sync(t):
    src_data = hashlib.sha256(b"seed").digest() * 4000       # 128000 bytes
    mkfile("src", src_data)
    mkfile("dst", b"D" * 100)
    s = os.open("src", os.O_RDONLY)
    d = os.open("dst", os.O_RDWR)
    t.do("copy_file_range", os.copy_file_range, s, d, 50000, 1000, 4096)
    t.do("copy_file_range past EOF", os.copy_file_range, s, d, 100, 200000, 0)
    t.do("copy to O_RDONLY", os.copy_file_range, d, s, 10, 0, 0)
    t.do("dst", lambda: [os.fstat(d).st_size,
                         hashlib.sha256(os.pread(d, 1 << 20, 0)).hexdigest()[:16]])
    t.do("fsync", os.fsync, d)
    t.do("fdatasync", os.fdatasync, d)
    t.do("syncfs", syncfs, d)
    os.close(s)
    os.close(d)
    dfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    t.do("fsync dir", os.fsync, dfd)
    os.close(dfd)
    t.st("dst")


@case("root", "user")
def case_readdir(t):
    """d_type and inode numbers from READDIR(PLUS) must match what stat says."""
    mkfile("reg")
    os.mkdir("dir")
    os.symlink("reg", "sym")
    os.mkfifo("fifo")
    os.mknod("sock", stat.S_IFSOCK | 0o644)
    os.mknod("wh", stat.S_IFCHR, 0)                  # a whiteout: allowed to anyone
    if t.root:
        os.mknod("chr", stat.S_IFCHR | 0o644, os.makedev(1, 3))
        os.mknod("blk", stat.S_IFBLK | 0o644, os.makedev(7, 0))
    os.link("reg", "hard")

    def types():
        out = []
        for e in sorted(os.scandir("."), key=lambda e: e.name):
            st = os.lstat(e.name)
            out.append([e.name, e.is_dir(follow_symlinks=False),
                        e.is_file(follow_symlinks=False), e.is_symlink(),
                        TYPES[stat.S_IFMT(st.st_mode)], e.inode() == st.st_ino])
        return out
    t.do("scandir", types)
    os.mkdir("many")
    names = [f"{i:04d}-" + "x" * (i % 200) for i in range(300)]
    for n in names:
        os.close(os.open(os.path.join("many", n), os.O_CREAT | os.O_WRONLY, 0o644))
    t.do("300 entries", lambda: sorted(os.listdir("many")) == names)

    def unlink_while_listing():
        seen = 0
        with os.scandir("many") as it:
            for i, e in enumerate(it):
                if i % 2 == 0:
                    os.unlink(os.path.join("many", e.name))
                seen += 1
        return [seen >= 150, len(os.listdir("many"))]
    t.do("unlink while listing", unlink_while_listing)
    t.do("listdir file", os.listdir, "reg")


@case("root", "user")
def case_mmap(t):
    import mmap
    mkfile("m", b"\0" * 8192)

    def shared_mapping():
        fd = os.open("m", os.O_RDWR)
        try:
            mm = mmap.mmap(fd, 8192, mmap.MAP_SHARED)
            mm[100:105] = b"hello"
            mm[5000:5003] = b"abc"
            mm.flush()
            seen = [os.pread(fd, 5, 100), os.pread(fd, 3, 5000)]
            os.pwrite(fd, b"WORLD", 100)
            seen.append(mm[100:105])
            mm.close()
        finally:
            os.close(fd)
        with open("m", "rb") as f:
            seen.append(hashlib.sha256(f.read()).hexdigest()[:16])
        return seen
    t.do("MAP_SHARED write, pread, pwrite, read back", shared_mapping)

    def private_mapping():
        fd = os.open("m", os.O_WRONLY)
        os.pwrite(fd, b"WORLD", 100)
        os.close(fd)
        with open("m", "rb") as f:
            mm = mmap.mmap(f.fileno(), 8192, mmap.MAP_PRIVATE, mmap.PROT_READ)
            v = mm[100:105]
            mm.close()
            return v
    t.do("MAP_PRIVATE read", private_mapping)
    t.st("m")


# ------------------------------------------------------------------------------------------
# cross-user cases (run as root, with forked users)

def _users(t, steps, uid, groups=None, **kw):
    t.as_user(uid, steps, groups=groups, **kw)


@case("x")
def case_permissions(t):
    mkfile("f", b"secret")
    os.chown("f", USER, GROUP)
    os.chmod("f", 0o640)
    os.mkdir("d711")
    mkfile("d711/inside", b"in")
    os.chmod("d711/inside", 0o644)
    os.chmod("d711", 0o711)
    os.mkdir("d600")
    mkfile("d600/inside")
    os.chmod("d600", 0o600)
    os.mkdir("mine")
    os.chown("mine", USER, USER)

    def stranger(u):
        u.read("f", "read 0640 file as stranger")
        u.write("f", b"x", os.O_WRONLY, label="write 0640 as stranger")
        u.do("list 0711 dir", os.listdir, "d711")
        u.read("d711/inside", "read inside 0711 dir")
        u.do("stat inside 0600 dir", os.stat, "d600/inside")
        u.do("chmod foreign file", os.chmod, "f", 0o777)
        u.do("utime foreign file explicit", os.utime, "f", (1, 1))
        u.do("utime foreign file now", os.utime, "f")
        u.do("mkdir in foreign dir", os.mkdir, "mine/x")
        u.do("access R_OK", os.access, "f", os.R_OK)
    _users(t, stranger, OTHER)

    def group_member(u):
        u.read("f", "read 0640 file as group member")
        u.write("f", b"x", os.O_WRONLY, label="write 0640 as group member")
        u.do("access W_OK", os.access, "f", os.W_OK)
    _users(t, group_member, OTHER, groups=[OTHER, GROUP])

    def owner(u):
        u.write("f", b"owner", os.O_WRONLY | os.O_TRUNC, label="write as owner")
        u.do("chmod 0 own", os.chmod, "f", 0)
        u.read("f", "read own 0000 file")
        u.do("chmod 640 own", os.chmod, "f", 0o640)
        u.do("utime own file explicit", os.utime, "f", (1, 1))
    _users(t, owner, USER)
    t.read("f", "root reads")
    os.chmod("f", 0o666)

    def stranger2(u):
        u.do("utime 0666 foreign file now", os.utime, "f")
        u.do("utime 0666 foreign file explicit", os.utime, "f", (2, 2))
        u.do("utime 0666 foreign file UTIME_NOW pair", utimens, "f", (0, UTIME_NOW),
             (0, UTIME_NOW))
    _users(t, stranger2, OTHER)
    t.st("f")


@case("x")
def case_sticky(t):
    os.mkdir("t")
    os.chmod("t", 0o1777)
    os.mkdir("u")                      # sticky, world-writable, owned by OTHER
    os.chown("u", OTHER, OTHER)
    os.chmod("u", 0o1777)

    def creator(u):
        for d in ("t", "u"):
            u.write(f"{d}/a", b"a", label=f"create {d}/a")
            u.do(f"mkdir {d}/adir", os.mkdir, f"{d}/adir")
            u.write(f"{d}/keep", b"k", label=f"create {d}/keep")
    _users(t, creator, USER)

    def intruder(u):
        u.write("t/b", b"b", label="create t/b")
        u.do("unlink foreign in sticky", os.unlink, "t/a")
        u.do("rename foreign in sticky", os.rename, "t/a", "t/a2")
        u.do("rmdir foreign in sticky", os.rmdir, "t/adir")
        u.do("rename own over foreign", os.rename, "t/b", "t/keep")
        u.do("EXCHANGE own with foreign", renameat2, "t/b", "t/keep", RENAME_EXCHANGE)
        u.open("write foreign (0644)", "t/a", os.O_WRONLY)
        u.do("setxattr on sticky dir", os.setxattr, "t", "user.x", b"1")
        u.do("dir owner unlinks foreign", os.unlink, "u/a")
        u.do("dir owner rmdirs foreign", os.rmdir, "u/adir")
        u.do("dir owner setxattr on own sticky dir", os.setxattr, "u", "user.x", b"1")
        u.do("unlink own", os.unlink, "t/b")
    _users(t, intruder, OTHER)

    def owner(u):
        u.do("owner renames own", os.rename, "t/a", "t/a3")
        u.do("owner unlinks own", os.unlink, "t/a3")
    _users(t, owner, USER)
    t.do("root unlinks foreign", os.unlink, "t/keep")
    t.do("listdir t", lambda: sorted(os.listdir("t")))
    t.do("listdir u", lambda: sorted(os.listdir("u")))
    t.st("t")
    t.st("u")


@case("x")
def case_protected_links(t):
    """fs.protected_symlinks/hardlinks/regular/fifos = 1: they depend on truthful owners."""
    os.mkdir("t")
    os.chmod("t", 0o1777)
    os.mkdir("u")
    os.chown("u", OTHER, OTHER)
    os.chmod("u", 0o1777)
    mkfile("target", b"target data")
    os.chmod("target", 0o666)
    mkfile("private", b"private")
    os.chown("private", USER, USER)
    os.chmod("private", 0o600)
    mkfile("readonly", b"ro")
    os.chown("readonly", USER, USER)
    os.chmod("readonly", 0o644)

    def user(u):
        u.do("symlink in sticky dir", os.symlink, "../target", "t/ln")
        u.do("symlink in u", os.symlink, "../target", "u/ln")
        u.read("t/ln", "owner follows own symlink")
        u.write("t/reg", b"r", label="create t/reg")
        u.do("mkfifo t/fifo", os.mkfifo, "t/fifo", 0o666)
        u.do("chmod t/reg 666", os.chmod, "t/reg", 0o666)
    _users(t, user, USER)
    t.st("t/ln")

    def other(u):
        u.read("t/ln", "stranger follows symlink in sticky dir")
        u.read("u/ln", "dir owner follows a stranger's symlink in own sticky dir")
        u.do("symlink in own sticky dir", os.symlink, "../target", "u/own")
        u.do("hardlink to unreadable foreign file", os.link, "private", "t/pl")
        u.do("hardlink to read-only foreign file", os.link, "readonly", "t/rl")
        u.do("hardlink to 0666 root file", os.link, "target", "t/tl")
        u.open("O_CREAT existing foreign regular in sticky dir", "t/reg",
             os.O_WRONLY | os.O_CREAT)
        u.do("O_WRONLY existing foreign regular in sticky dir",
             lambda: os.close(os.open("t/reg", os.O_WRONLY)))
        u.open("O_CREAT existing foreign fifo in sticky dir", "t/fifo",
             os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK)
    _users(t, other, OTHER)

    def user2(u):
        u.read("u/own", "follow a symlink owned by the sticky dir's owner")
    _users(t, user2, USER)
    t.read("t/ln", "root follows foreign symlink in sticky dir")
    t.do("listdir t", lambda: sorted(os.listdir("t")))


@case("x")
def case_setgid_dir(t):
    os.mkdir("g")
    os.chown("g", 0, GROUP)
    os.chmod("g", 0o2775)
    os.mkdir("h")
    os.chown("h", USER, GROUP)          # USER owns it but is not in GROUP below
    os.chmod("h", 0o2777)

    def member(u):
        u.write("g/f", b"f", label="create file")
        u.do("mkdir", os.mkdir, "g/d", 0o755)
        u.do("mkfifo", os.mkfifo, "g/p")
        u.do("symlink", os.symlink, "f", "g/l")
        u.do("create 2755 file", lambda: os.close(os.open("g/sg", os.O_CREAT | os.O_WRONLY,
                                                          0o2755)))
        u.do("mkdir in inherited dir", os.mkdir, "g/d/dd")
        u.do("tmpfile", lambda: link_fd(os.open("g", O_TMPFILE | os.O_RDWR, 0o600), "g/tmp"))
    _users(t, member, USER, groups=[USER, GROUP])

    def nonmember(u):
        u.do("create 2755 file as non-member", lambda: os.close(
            os.open("h/sg", os.O_CREAT | os.O_WRONLY, 0o2755)))
        u.do("mknod 2755 fifo as non-member", os.mknod, "h/fifo", stat.S_IFIFO | 0o2755)
        u.do("create 2745 file as non-member", lambda: os.close(
            os.open("h/sg2", os.O_CREAT | os.O_WRONLY, 0o2745)))
        u.do("mkdir 2755 as non-member", os.mkdir, "h/d", 0o2755)
        u.do("chmod own dir g+s as non-member", os.chmod, "h", 0o2777)
        u.do("chmod own file g+s as non-member", os.chmod, "h/sg", 0o2755)
    _users(t, nonmember, USER, groups=[USER])
    t.do("mknod as root", os.mknod, "g/c", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    t.do("mkdir as root", os.mkdir, "g/rd")
    for n in ("g/f", "g/d", "g/p", "g/l", "g/sg", "g/d/dd", "g/tmp", "g/c", "g/rd", "h",
              "h/sg", "h/fifo", "h/sg2", "h/d"):
        t.st(n)


@case("x")
def case_killpriv(t):
    """write/truncate/chown by a non-root user clear setuid/setgid and file capabilities."""
    specs = {  # name: (mode, owner, group)
        "w": (0o6777, USER, GROUP), "tr": (0o6777, USER, GROUP), "otr": (0o6777, USER, GROUP),
        "ow": (0o6777, USER, GROUP), "root-w": (0o6777, USER, GROUP),
        "sgid-nox": (0o2666, USER, GROUP), "chgrp": (0o6775, OTHER, GROUP),
        "root-chown": (0o6755, USER, GROUP), "root-chown-nox": (0o2745, USER, GROUP),
        "fa": (0o6777, USER, GROUP), "cfr": (0o6777, USER, GROUP),
        "chmod": (0o6777, USER, GROUP),
    }
    for n, (mode, uid, gid) in specs.items():
        mkfile(n, b"0123456789")
        os.chown(n, uid, gid)
        os.chmod(n, mode)
        t.do(f"setcap {n}", os.setxattr, n, "security.capability", caps_v2(CAP_NET_RAW))
    os.mkdir("d")
    os.chown("d", USER, GROUP)
    os.chmod("d", 0o6777)

    def other(u):
        u.write("w", b"x", os.O_WRONLY, label="write w")
        u.do("truncate tr", os.truncate, "tr", 2)
        u.do("O_TRUNC open otr", lambda: os.close(os.open("otr", os.O_WRONLY | os.O_TRUNC)))
        u.write("ow", b"", os.O_WRONLY, label="open for write, write nothing")
        u.write("sgid-nox", b"x", os.O_WRONLY, label="write sgid without group exec")
        fd = os.open("fa", os.O_RDWR)
        u.do("fallocate fa", fallocate, fd, 0, 0, 8192)
        os.close(fd)
        s = os.open("w", os.O_RDONLY)
        d = os.open("cfr", os.O_WRONLY)
        u.do("copy_file_range into cfr", os.copy_file_range, s, d, 4, 0, 0)
        os.close(s)
        os.close(d)
        u.write("d/new", b"n", label="create in 6777 dir")
    _users(t, other, OTHER, groups=[OTHER])

    def owner(u):
        u.do("chgrp by owner", os.chown, "chgrp", -1, GROUP)
    _users(t, owner, OTHER, groups=[OTHER, GROUP])

    def owner_chmod(u):
        u.do("chmod 6777 by owner keeps caps", os.chmod, "chmod", 0o6777)
    _users(t, owner_chmod, USER, groups=[USER, GROUP])
    t.write("root-w", b"x", os.O_WRONLY, label="write by root")
    t.do("chown by root", os.chown, "root-chown", 1, 1)
    t.do("chown by root (sgid without group exec)", os.chown, "root-chown-nox", 1, 1)
    for n in list(specs) + ["d", "d/new"]:
        t.st(n)


@case("x")
def case_acl(t):
    A = "system.posix_acl_access"
    D = "system.posix_acl_default"
    mkfile("f", b"acl")
    os.chown("f", USER, USER)
    os.chmod("f", 0o640)
    t.do("set access ACL u:1234:rw", os.setxattr, "f", A, acl("u::rw,u:1234:rw,g::r,m::rw,o::"))
    t.st("f", "after setfacl")

    def u1234(u):
        u.write("f", b"1234", os.O_WRONLY, label="named user writes")
        u.read("f", "named user reads")
    _users(t, u1234, 1234)

    def u1235(u):
        u.write("f", b"1235", os.O_WRONLY, label="other user writes")
        u.read("f", "other user reads")
    _users(t, u1235, 1235)
    t.do("chmod 600 (mask ---)", os.chmod, "f", 0o600)
    t.st("f", "after chmod 600")
    _users(t, u1234, 1234, label="1234 after chmod")
    t.do("chmod 660 (mask rw-)", os.chmod, "f", 0o660)
    t.do("set group entry g:2000:r", os.setxattr, "f", A, acl("u::rw,g::-,G:2000:r,m::r,o::"))
    t.st("f", "after group entry")

    def gmember(u):
        u.read("f", "group-entry member reads")
        u.write("f", b"g", os.O_WRONLY, label="group-entry member writes")
    _users(t, gmember, 1500, groups=[1500, GROUP])
    t.do("set minimal ACL", os.setxattr, "f", A, acl("u::rw,g::r,o::r"))
    t.st("f", "after minimal ACL")
    t.do("get minimal ACL", os.getxattr, "f", A)
    t.do("set ACL again", os.setxattr, "f", A, acl("u::rw,u:1234:r,g::r,m::r,o::"))
    t.do("remove access ACL", os.removexattr, "f", A)
    t.st("f", "after removexattr")
    t.do("set ACL without mask", os.setxattr, "f", A, acl("u::rw,u:1234:r,g::r,o::"))
    t.do("set ACL garbage", os.setxattr, "f", A, b"\x02\0\0\0\x01")
    t.do("set ACL bad version", os.setxattr, "f", A, b"\x01\0\0\0")
    t.do("set default ACL on file", os.setxattr, "f", D, acl("u::rw,g::r,o::"))
    t.do("get default ACL on file", os.getxattr, "f", D)

    def owner(u):
        u.do("owner sets ACL", os.setxattr, "f", A, acl("u::rw,u:1234:rw,g::r,m::rw,o::"))
    _users(t, owner, USER)

    def stranger(u):
        u.do("non-owner sets ACL", os.setxattr, "f", A, acl("u::rwx,g::rwx,o::rwx"))
        u.do("non-owner reads ACL", os.getxattr, "f", A)
    _users(t, stranger, OTHER)
    t.do("ACL with XATTR_CREATE over an ACL", os.setxattr, "f", A,
         acl("u::rw,u:1234:rw,g::r,m::rw,o::"), os.XATTR_CREATE)
    t.do("ACL with XATTR_REPLACE", os.setxattr, "f", A,
         acl("u::rw,u:1234:r,g::r,m::r,o::"), os.XATTR_REPLACE)
    t.do("chown keeps the ACL", os.chown, "f", 77, 88)
    t.st("f", "after chown")
    # directory ACLs: search and list through a named entry
    os.mkdir("priv", 0o700)
    mkfile("priv/inside", b"inside")
    os.chmod("priv/inside", 0o604)
    t.do("dir ACL u:1234:rx", os.setxattr, "priv", A, acl("u::rwx,u:1234:rx,g::-,m::rx,o::"))

    def dir_reader(u):
        u.do("list via named entry", os.listdir, "priv")
        u.read("priv/inside", "read through named entry")
        u.write("priv/new", b"n", label="create without w in the ACL")
    _users(t, dir_reader, 1234)
    _users(t, dir_reader, 1235)
    # setting an ACL as an owner outside the file's group drops setgid (ACL_KILL_SGID)
    mkfile("sg", b"")
    os.chown("sg", USER, GROUP)
    os.chmod("sg", 0o2770)

    def sg_owner(u):
        u.do("owner outside group sets ACL", os.setxattr, "sg", A,
             acl("u::rwx,u:1234:r,g::rwx,m::rwx,o::"))
    _users(t, sg_owner, USER, groups=[USER])
    t.st("sg")

    # default ACLs and inheritance (umask 022 must not apply under a default ACL)
    os.mkdir("dd")
    t.do("set default ACL", os.setxattr, "dd", D, acl("u::rwx,u:1234:rwx,g::rx,m::rwx,o::"))
    t.do("set default ACL on dir again (same)", os.setxattr, "dd", D,
         acl("u::rwx,u:1234:rwx,g::rx,m::rwx,o::"))
    t.st("dd")
    t.write("dd/f", b"inherit", label="create 0666 file under default ACL")
    t.do("create 0600 file under default ACL",
         lambda: os.close(os.open("dd/f600", os.O_CREAT | os.O_WRONLY, 0o600)))
    t.do("mkdir 0777 under default ACL", os.mkdir, "dd/sub", 0o777)
    t.do("mkfifo under default ACL", os.mkfifo, "dd/p", 0o666)
    t.do("symlink under default ACL", os.symlink, "f", "dd/l")
    t.do("mknod under default ACL", os.mknod, "dd/c", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    t.do("tmpfile under default ACL", lambda: link_fd(
        os.open("dd", O_TMPFILE | os.O_RDWR, 0o644), "dd/tmp"))
    t.write("dd/sub/g", b"deeper", label="create in inherited subdir")
    for n in ("dd/f", "dd/f600", "dd/sub", "dd/p", "dd/l", "dd/c", "dd/tmp", "dd/sub/g"):
        t.st(n)

    def u1234_dd(u):
        u.write("dd/f", b"x", os.O_WRONLY, label="named user writes inherited file")
        u.write("dd/sub/mine", b"m", label="named user creates in inherited subdir")
    _users(t, u1234_dd, 1234)
    t.st("dd/sub/mine")

    # a minimal default ACL: the umask is still ignored
    os.mkdir("dm")
    t.do("set minimal default ACL", os.setxattr, "dm", D, acl("u::rwx,g::rwx,o::rwx"))

    def umask077(u):
        u.write("dm/f", b"", label="create 0666 with umask 077 under minimal default ACL")
        u.do("mkdir with umask 077", os.mkdir, "dm/d", 0o777)
    _users(t, umask077, 0, umask=0o077, label="root umask 077")
    t.st("dm/f")
    t.st("dm/d")
    # no default ACL: the umask applies
    os.mkdir("nd")

    def umask027(u):
        u.write("nd/f", b"", label="create 0666 with umask 027, no default ACL")
        u.do("mkdir with umask 027", os.mkdir, "nd/d", 0o777)
    _users(t, umask027, 0, umask=0o027, label="root umask 027")
    t.st("nd/f")
    t.st("nd/d")
    t.do("remove default ACL", os.removexattr, "dd", D)
    t.write("dd/after", b"", label="create after removing default ACL")
    t.st("dd/after")
    t.st("dd")


@case("x")
def case_xattr_visibility(t):
    """Who may see which xattr namespaces."""
    mkfile("f", b"x")
    os.chmod("f", 0o644)
    os.setxattr("f", "user.u", b"u")
    os.setxattr("f", "trusted.t", b"t")
    os.setxattr("f", "security.s", b"s")
    os.setxattr("f", "security.capability", caps_v2(CAP_NET_RAW))

    def user(u):
        u.do("get trusted as user", os.getxattr, "f", "trusted.t")
        u.do("set trusted as user", os.setxattr, "f", "trusted.t", b"no")
        u.do("remove trusted as user", os.removexattr, "f", "trusted.t")
        u.do("get security as user", os.getxattr, "f", "security.s")
        u.do("set security as user", os.setxattr, "f", "security.s", b"no")
        u.do("get capability as user", os.getxattr, "f", "security.capability")
        u.do("set capability as user", os.setxattr, "f", "security.capability",
             caps_v2(CAP_NET_RAW))
        u.do("get user.u as user", os.getxattr, "f", "user.u")
        u.do("set user.u as non-owner", os.setxattr, "f", "user.u", b"no")
    _users(t, user, OTHER)

    def user_list(u):
        u.do("list as user", lambda: sorted(os.listxattr("f")))
        u.do("listxattr size 0 as user", listxattr_size, "f", 0)
    _users(t, user_list, OTHER, label="lister")
    t.do("list as root", lambda: sorted(os.listxattr("f")))
    t.st("f")


# ------------------------------------------------------------------------------------------
# driver

def _prepare(base):
    for name in ("protected_symlinks", "protected_hardlinks", "protected_fifos",
                 "protected_regular"):
        try:
            with open(f"/proc/sys/fs/{name}", "w") as f:
                f.write("1\n")
        except OSError:
            pass
    os.umask(UMASK)
    os.mkdir(base, 0o755)
    os.chmod(base, 0o755)


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def run(base, only=None):
    _prepare(base)
    signal.signal(signal.SIGALRM, _alarm)
    results = {}
    t0 = time.monotonic()
    for name, (fn, variants) in CASES.items():
        if only and name not in only:
            continue
        for variant in variants:
            key = f"{name}@{variant}"
            d = os.path.join(base, key)
            os.mkdir(d, 0o755)
            if variant == "user":
                os.chown(d, USER, USER)
            os.chdir(d)
            t = T(variant)
            start = time.monotonic()
            if variant == "user":
                def body(u, fn=fn):
                    fn(u)
                t.as_user(USER, body, groups=[USER, GROUP], label="user")
                # the steps carry a "[user] " prefix; drop it: the key says who ran them
                t.log = [[lbl.removeprefix("[user] "), v] for lbl, v in t.log]
            else:
                signal.alarm(CASE_TIMEOUT)
                try:
                    fn(t)
                except _Timeout:
                    t.note("crash", f"timeout after {CASE_TIMEOUT}s")
                except BaseException:  # noqa: BLE001 - recorded, the suite goes on
                    t.note("crash", traceback.format_exc(limit=3).splitlines()[-1])
                finally:
                    signal.alarm(0)
            os.chdir(base)
            results[key] = t.log
            sys.stderr.write(f"posix_suite: {key} {time.monotonic() - start:.2f}s\n")
    return {"base": base, "seconds": round(time.monotonic() - t0, 1), "cases": results}


def main(argv):
    if len(argv) < 2:
        sys.stderr.write(__doc__)
        return 2
    only = None
    if len(argv) > 3 and argv[2] == "--only":
        only = set(argv[3].split(","))
    out = run(os.path.abspath(argv[1]), only)
    json.dump(out, sys.stdout, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
