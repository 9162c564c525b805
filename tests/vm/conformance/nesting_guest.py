#!/usr/bin/env python3
"""Runs inside a test guest whose /mnt is a vfsd share (tests/vm/test_nesting.py).

    python3 nesting_guest.py /mnt > result.json      (vfsd and protocol on PYTHONPATH)

1. `rec` was given a record by the host (owner 1234:5678, mode 0640).  The guest must not be
   able to see, read, replace or remove that record by any spelling of its name, and the
   owner it shows must not move while the guest plays with its own `user.o`.
2. On `nest` the guest writes `user.o`, `user.o.x` and `trusted.overlay.opaque`; the host
   checks where they landed.
3. A nested vfsd: the daemon's own FUSE server and filesystem (vfsd.server.FuseServer over
   vfsd.passthrough.PassthroughFs, fed FUSE requests in process: no vhost-user transport)
   serve /mnt/inner, running as the ordinary guest user 1000.  Its guest (FUSE requests with
   uid 4321) creates files and devices and sets trusted.*, security.capability and user.o;
   the outer guest and the host see each level escaped once more.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
import sys
import traceback

out: dict = {}


def err(e: OSError) -> str:
    if e.errno == errno.EOPNOTSUPP:
        return "EOPNOTSUPP"
    return errno.errorcode.get(e.errno, str(e.errno))


def attempt(fn, *a, **kw):
    try:
        v = fn(*a, **kw)
    except OSError as e:
        return err(e)
    if isinstance(v, bytes):
        return "value:" + v.hex()
    return "ok" if v is None else v


def owner(path):
    st = os.lstat(path)
    return [st.st_uid, st.st_gid, oct(stat.S_IMODE(st.st_mode))]


#: Every spelling that could conceivably reach the host-level record `user.o` (or the
#: daemon's reserved tree) if the escaping were wrong.
SPELLINGS = [b"user.o", b"user.o.", b"user.O", b"USER.o", b"user.o ", b" user.o", b"user..o",
             b"user./o", b"user.o/", b"user.o\n", b"user.o.o", b"user.o.o.", b"user.o.o.o",
             b"user.o.trusted", b"user.o.trusted.x", b"user.o.system",
             b"user.o.system.posix_acl_access", b"user.o.security.capability",
             b"user.o.future", b"trusted.o", b"trusted.user.o", b"security.o", b"system.o",
             b"system.user.o", b"os2.o", b"o", b"user", b"user.", b"trusted.", b"user.o" * 42]


def untouchable(base):
    p = os.path.join(base, "rec")
    r: dict = {"owner before": owner(p), "list": attempt(lambda: sorted(os.listxattr(p)))}
    for name in SPELLINGS:
        key = name.decode("latin-1")[:40]
        r[f"get {key!r}"] = attempt(os.getxattr, p, name)
        r[f"remove {key!r}"] = attempt(os.removexattr, p, name)
        r[f"replace {key!r}"] = attempt(os.setxattr, p, name, b"X", os.XATTR_REPLACE)
    # the guest's own user.o: created (escaped), read back, removed; the record stays put
    forged = struct.pack("<BBHIIIII", 1, 0, 0, 0, 0, stat.S_IFREG | 0o4755, 0, 0)
    r["create user.o"] = attempt(os.setxattr, p, b"user.o", forged, os.XATTR_CREATE)
    r["owner with guest user.o"] = owner(p)
    r["get user.o"] = attempt(os.getxattr, p, b"user.o")
    r["list with guest user.o"] = attempt(lambda: sorted(os.listxattr(p)))
    r["remove user.o"] = attempt(os.removexattr, p, b"user.o")
    r["remove user.o again"] = attempt(os.removexattr, p, b"user.o")
    r["recreate user.o"] = attempt(os.setxattr, p, b"user.o", forged, os.XATTR_CREATE)
    r["chmod 600"] = attempt(os.chmod, p, 0o600)     # the record itself may change only so
    r["chmod 640"] = attempt(os.chmod, p, 0o640)
    r["owner after"] = owner(p)
    r["list after"] = attempt(lambda: sorted(os.listxattr(p)))
    os.link(p, os.path.join(base, "rec-link"))
    r["get user.o via hard link"] = attempt(os.getxattr, os.path.join(base, "rec-link"),
                                            b"user.o")
    os.unlink(os.path.join(base, "rec-link"))
    r["share root list"] = attempt(lambda: sorted(os.listxattr(base)))
    r["share root get user.o"] = attempt(os.getxattr, base, b"user.o")
    return r


def nest(base):
    p = os.path.join(base, "nest")
    with open(p, "w") as f:
        f.write("nest\n")
    r = {"set user.o": attempt(os.setxattr, p, b"user.o", b"guest-o"),
         "set user.o.x": attempt(os.setxattr, p, b"user.o.x", b"guest-o-x"),
         "set trusted.overlay.opaque": attempt(os.setxattr, p, b"trusted.overlay.opaque", b"y"),
         "list": attempt(lambda: sorted(os.listxattr(p)))}
    for n in (b"user.o", b"user.o.x", b"trusted.overlay.opaque"):
        r[f"get {n.decode()}"] = attempt(os.getxattr, p, n)
    r["owner"] = owner(p)
    return r


# ------------------------------------------------------------------------------------------
# a nested vfsd, in process

def nested(base):
    from protocol import fuse
    from protocol.buffers import Reader, Writer
    from vfsd.passthrough import PassthroughFs
    from vfsd.server import FuseServer

    inner_dir = os.path.join(base, "inner")
    os.mkdir(inner_dir)
    os.chown(inner_dir, 1000, 1000)
    rd, wr = os.pipe()
    pid = os.fork()
    if pid:
        os.close(wr)
        data = b""
        while chunk := os.read(rd, 65536):
            data += chunk
        os.waitpid(pid, 0)
        r = json.loads(data or b'{"crash": "no output"}')
        r["outer view"] = outer_view(inner_dir)
        return r
    os.close(rd)
    r: dict = {}
    try:
        os.setgroups([])
        os.setresgid(1000, 1000, 1000)
        os.setresuid(1000, 1000, 1000)
        server = FuseServer(PassthroughFs(inner_dir))
        unique = [0]
        UID, GID = 4321, 8765

        def call(opcode, nodeid, args=b"", extra=(), uid=UID, gid=GID):
            unique[0] += 1
            payload = args + b"".join(extra)
            hdr = fuse.fuse_in_header.pack(len=40 + len(payload), opcode=opcode,
                                           unique=unique[0], nodeid=nodeid, uid=uid, gid=gid)
            buf = bytearray(1 << 16)
            n = server.handle(Reader([memoryview(hdr + payload)]), Writer([memoryview(buf)]))
            oh = fuse.fuse_out_header.unpack(bytes(buf[:16]))
            return -oh.error, bytes(buf[16:n])

        def ok(*a, **kw):
            e, body = call(*a, **kw)
            if e:
                raise OSError(e, os.strerror(e))
            return body

        def name(n):
            return [n + b"\0"]

        def attr(body):
            a = fuse.fuse_entry_out.unpack(body[:fuse.fuse_entry_out.size]).attr
            return [a.uid, a.gid, oct(a.mode)]

        e, body = call(fuse.Opcode.INIT, 0, fuse.fuse_init_in.pack(
            major=7, minor=38, max_readahead=65536, flags=0xFFFFFFFF, flags2=0))
        r["init"] = e
        O = fuse.Opcode
        body = ok(O.CREATE, 1, fuse.fuse_create_in.pack(flags=os.O_RDWR,
                                                         mode=stat.S_IFREG | 0o4755), name(b"f"))
        f = fuse.fuse_entry_out.unpack(body[:fuse.fuse_entry_out.size]).nodeid
        r["inner create f"] = attr(body)
        body = ok(O.MKNOD, 1, fuse.fuse_mknod_in.pack(mode=stat.S_IFCHR | 0o620,
                                                       rdev=(1 << 8) | 3), name(b"dev"))
        r["inner mknod dev"] = attr(body)

        def setx(n, v, flags=0):
            e, _ = call(O.SETXATTR, f, fuse.fuse_setxattr_in.pack(size=len(v), flags=flags),
                        [n + b"\0", v])
            return errno.errorcode.get(e, "ok") if e else "ok"

        def getx(n):
            e, b = call(O.GETXATTR, f, fuse.fuse_getxattr_in.pack(size=4096), name(n))
            return errno.errorcode.get(e, str(e)) if e else "value:" + b.hex()

        caps = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
        r["inner set trusted.x"] = setx(b"trusted.x", b"T")
        r["inner set user.o"] = setx(b"user.o", b"inner-guest-o")
        r["inner set security.capability"] = setx(b"security.capability", caps)
        r["inner replace user.o.o"] = setx(b"user.o.o", b"?", os.XATTR_REPLACE)
        e, b = call(O.LISTXATTR, f, fuse.fuse_getxattr_in.pack(size=4096))
        r["inner list"] = sorted(x.decode() for x in b.split(b"\0") if x) if not e else e
        for n in (b"trusted.x", b"user.o", b"user.o.o", b"security.capability"):
            r[f"inner get {n.decode()}"] = getx(n)
        body = ok(O.GETATTR, f, fuse.fuse_getattr_in.pack())
        a = fuse.fuse_attr_out.unpack(body).attr
        r["inner getattr f"] = [a.uid, a.gid, oct(a.mode)]
    except BaseException:  # noqa: BLE001 - reported to the host
        r["crash"] = traceback.format_exc()
    os.write(wr, json.dumps(r).encode())
    os._exit(0)


def outer_view(inner_dir):
    v = {}
    for n in ("f", "dev"):
        p = os.path.join(inner_dir, n)
        v[n] = {"owner": owner(p), "type": stat.S_IFMT(os.lstat(p).st_mode),
                "xattrs": {x: os.getxattr(p, x).hex() for x in sorted(os.listxattr(p))}}
    return v


def main():
    base = sys.argv[1]
    for part in (untouchable, nest, nested):
        try:
            out[part.__name__] = part(base)
        except BaseException:  # noqa: BLE001 - reported to the host
            out[part.__name__] = {"crash": traceback.format_exc()}
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
