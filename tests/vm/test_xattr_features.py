"""What guest xattrs buy an unprivileged vfsd: features shown working inside a real guest.

One guest boot (module fixture) exercises, on the vfsd share:

- POSIX ACLs enforced by the guest kernel (setfacl/getfacl, a named user may write, another
  may not; default ACLs inherited by new files and directories);
- file capabilities (setcap/getcap; the kernel grants them at exec; a write by another user
  clears them, as a local filesystem does);
- an overlayfs inside the guest whose upper and work directories are on the share (it needs
  trusted.overlay.* xattrs and whiteouts): create, delete, rename, opaque directories, copy-up;
- SELinux-style security.* labels stored and read back.

The daemon runs with --xattr --posix-acl (both off by default, as in virtiofsd).  Each test
then checks the host side: files owned by the daemon's user, the guest's
trusted.*/security.*/ACL xattrs stored under the reserved names (user.o.trusted.*,
user.o.security.*, user.o.system.posix_acl_*), and no real trusted.*/security.*/system.* xattr
on any host file.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import struct
from pathlib import Path

import pytest

from tests.daemon import Daemon, workdir
from tests.vm.guest import extra_modules, host_tool_files, require_guest, run_guest
from vfsd import ownership

#: Runs a command as uid:gid (no supplementary groups): python3 /as UID GID CMD...
AS = """import os, sys
uid, gid = int(sys.argv[1]), int(sys.argv[2])
os.setgroups([]); os.setresgid(gid, gid, gid); os.setresuid(uid, uid, uid)
os.execvp(sys.argv[3], sys.argv[3:])
"""

SCRIPT = r"""
cd /mnt
as() { python3 /as "$@"; }
res() { if [ "$1" = 0 ]; then echo "$2 ok"; else echo "$2 denied"; fi; }

echo "== acl"
echo data > acl
chmod 640 acl
setfacl -m u:1234:rw acl; echo "setfacl rc=$?"
getfacl -cn acl | sed 's/^/facl: /'
echo "mode $(stat -c %a acl)"
as 1234 1234 sh -c 'echo w1234 >> /mnt/acl' 2>/dev/null; res $? write-1234
as 1235 1235 sh -c 'echo w1235 >> /mnt/acl' 2>/dev/null; res $? write-1235
as 1235 1235 cat /mnt/acl >/dev/null 2>&1; res $? read-1235
echo "content $(cat acl | tr '\n' ' ')"
mkdir dacl
setfacl -d -m u:1234:rwx,g::rx,o::- dacl; echo "setfacl-d rc=$?"
getfacl -cn dacl | sed 's/^/dfacl: /'
touch dacl/new
mkdir dacl/sub
touch dacl/sub/deeper
getfacl -cn dacl/new | cut -f1 | sed 's/^/newfacl: /'
getfacl -cn dacl/sub | sed 's/^/subfacl: /'
getfacl -cn dacl/sub/deeper | cut -f1 | sed 's/^/deeperfacl: /'
echo "newmode $(stat -c %a dacl/new) submode $(stat -c %a dacl/sub)"
as 1234 1234 sh -c 'echo x > /mnt/dacl/new' 2>/dev/null; res $? inherit-write-1234
as 1235 1235 sh -c 'echo x > /mnt/dacl/new' 2>/dev/null; res $? inherit-write-1235
as 1234 1234 sh -c 'echo x > /mnt/dacl/sub/deeper' 2>/dev/null; res $? deeper-write-1234

echo "== caps"
mkdir capdir
cp /bin/busybox capdir/busybox        # busybox runs argv[1] as the applet only under this name
chmod 755 capdir/busybox
as 1000 1000 /mnt/capdir/busybox ping -c 1 -W 2 127.0.0.1 >/dev/null 2>&1; res $? ping-without-cap
setcap cap_net_raw+ep capdir/busybox; echo "setcap rc=$?"
echo "getcap $(getcap capdir/busybox)"
as 1000 1000 /mnt/capdir/busybox ping -c 1 -W 2 127.0.0.1 >/dev/null 2>&1; res $? ping-with-cap
echo "capeff $(as 1000 1000 /mnt/capdir/busybox grep CapEff /proc/self/status | cut -f2)"
printf '#!/bin/sh\n' > capfile
chmod 757 capfile
setcap cap_net_raw,cap_sys_time+ep capfile; echo "setcap2 rc=$?"
echo "getcap2 $(getcap capfile)"
as 1001 1001 sh -c 'echo "# appended" >> /mnt/capfile'; res $? nonowner-write
echo "getcap-after-write [$(getcap capfile)]"
printf '#!/bin/sh\n' > capfile3
setcap cap_net_raw+ep capfile3
chmod 4777 capfile3
as 1001 1001 sh -c ': > /mnt/capfile3'; res $? nonowner-truncate
echo "getcap-after-truncate [$(getcap capfile3)] mode $(stat -c %a capfile3)"

echo "== overlay"
OVL=lowerdir=/mnt/ov/lower,upperdir=/mnt/ov/upper,workdir=/mnt/ov/work
mkdir -p ov/lower/d ov/lower/e ov/upper ov/work /merged
echo lower-a > ov/lower/a
echo lower-b > ov/lower/b
chown 1234:5678 ov/lower/b
chmod 640 ov/lower/b
setfattr -n user.keep -v kept ov/lower/b
echo x > ov/lower/d/x
echo y > ov/lower/e/y
dmesg -c >/dev/null
mount -t overlay overlay -o "$OVL" /merged
echo "mount rc=$?"
dmesg | grep -i overlay | sed 's/^/dmesg: /'
echo "merged-a $(cat /merged/a)"
echo upper-new > /merged/new
echo modified >> /merged/b
rm /merged/a
rm -r /merged/d
mkdir /merged/d
echo fresh > /merged/d/n
mv /merged/new /merged/new2
mv /merged/e /merged/e2
echo "listing $(ls /merged | tr '\n' ' ')"
echo "listing-d $(ls /merged/d | tr '\n' ' ')"
echo "merged-b $(cat /merged/b | tr '\n' ' ')"
echo "merged-b-owner $(stat -c '%u:%g %a' /merged/b)"
echo "merged-b-keep $(getfattr -n user.keep --only-values /merged/b)"
umount /merged
echo "upper-a $(stat -c '%F %t:%T %a' ov/upper/a)"
echo "upper-e $(stat -c '%F %t:%T' ov/upper/e)"
echo "upper-d-opaque $(getfattr -n trusted.overlay.opaque --only-values ov/upper/d)"
echo "upper-b $(cat ov/upper/b | tr '\n' ' ')"
echo "upper-b-owner $(stat -c '%u:%g %a' ov/upper/b)"
echo "lower-b $(cat ov/lower/b | tr '\n' ' ')"
getfattr -d -m - ov/upper/d ov/upper/b 2>/dev/null | sed 's/^/upperx: /'
mount -t overlay overlay -o "$OVL" /merged
echo "remount rc=$?"
echo "relisting $(ls /merged | tr '\n' ' ')"
echo "relisting-d $(ls /merged/d | tr '\n' ' ')"
umount /merged

echo "== labels"
echo labelled > lab
setfattr -n security.test -v x lab; echo "setfattr rc=$?"
setfattr -n security.selinux -v system_u:object_r:etc_t:s0 lab; echo "selinux rc=$?"
echo "security.test $(getfattr -n security.test --only-values lab)"
echo "security.selinux $(getfattr -n security.selinux --only-values lab)"
getfattr -d -m - lab 2>/dev/null | sed 's/^/labx: /'
setfattr -x security.test lab; echo "remove rc=$?"
echo "after-remove [$(getfattr -n security.test --only-values lab 2>&1)]"
setfattr -n security.test -v again lab
echo "== end"
"""


@pytest.fixture(scope="module")
def features():
    require_guest()
    with workdir() as work:
        daemon = Daemon(work / "share", work / "run" / "vfsd.sock",
                        extra_args=["--xattr", "--posix-acl"]).start()
        try:
            files, load = extra_modules("overlay")
            files.update(host_tool_files("/usr/sbin/setcap", "/usr/sbin/getcap"))
            files["/as"] = AS
            r = run_guest(load + SCRIPT, socket_path=daemon.socket_path, python=True,
                          files=files, timeout=300)
            daemon.stop()
            r.daemon_log = daemon.log_text()
            yield daemon, r, work / "share"
        finally:
            daemon.stop()


def section(r, name: str) -> dict[str, list[str]]:
    """The guest's "key rest" lines between '== name' and the next '==' line."""
    out: dict[str, list[str]] = {}
    inside = False
    for line in r.output.splitlines():
        if line.startswith("== "):
            inside = line == f"== {name}"
            continue
        if inside and line.strip():
            key, _, rest = line.partition(" ")
            out.setdefault(key, []).append(rest)
    return out


def one(sec: dict, key: str, r) -> str:
    assert key in sec, f"no {key!r} line in the guest output\n{r.explain()}"
    return sec[key][0].strip()


def host_xattrs(path: Path) -> dict[str, bytes]:
    return {n: os.getxattr(path, n, follow_symlinks=False)
            for n in os.listxattr(path, follow_symlinks=False)}


def check_host_file(path: Path, daemon, reserved: set[str], r) -> dict[str, bytes]:
    """Owned by the daemon, a record, the reserved names present, no privileged xattr."""
    st = os.lstat(path)
    why = f"{path}\n{r.explain()}"
    assert (st.st_uid, st.st_gid) == (daemon.uid, daemon.gid), why
    assert stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode), why
    assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX), why
    xs = host_xattrs(path)
    assert "user.o" in xs, (xs, why)
    ownership.decode(xs["user.o"])
    assert reserved <= set(xs), (sorted(xs), why)
    real = [n for n in xs if not n.startswith("user.")]
    assert not real, (f"privileged xattrs on the host file: {real}", why)
    return xs


def test_guest_ran(features):
    daemon, r, share = features
    assert r.status == 0 and "== end" in r.output, r.explain()


def test_posix_acls_enforced_by_the_guest(features):
    daemon, r, share = features
    s = section(r, "acl")
    assert one(s, "setfacl", r) == "rc=0", r.explain()
    assert "user:1234:rw-" in s["facl:"], r.explain()
    assert "mask::rw-" in s["facl:"], r.explain()
    assert one(s, "mode", r) == "660", r.explain()          # group bits show the mask
    assert one(s, "write-1234", r) == "ok", r.explain()
    assert one(s, "write-1235", r) == "denied", r.explain()
    assert one(s, "read-1235", r) == "denied", r.explain()
    assert one(s, "content", r) == "data w1234", r.explain()
    # default ACLs: inherited by new files (access ACL) and directories (access + default)
    assert one(s, "setfacl-d", r) == "rc=0", r.explain()
    assert "default:user:1234:rwx" in s["dfacl:"], r.explain()
    assert "user:1234:rwx" in s["newfacl:"], r.explain()      # effective rw- via the mask
    assert "mask::rw-" in s["newfacl:"], r.explain()
    assert "default:user:1234:rwx" in s["subfacl:"], r.explain()
    assert "user:1234:rwx" in s["deeperfacl:"], r.explain()
    assert one(s, "newmode", r).split() == ["660", "submode", "770"], r.explain()
    assert one(s, "inherit-write-1234", r) == "ok", r.explain()
    assert one(s, "inherit-write-1235", r) == "denied", r.explain()
    assert one(s, "deeper-write-1234", r) == "ok", r.explain()
    # host: ACLs under the reserved names; the host file's own ACL/mode untouched
    xs = check_host_file(share / "acl", daemon, {"user.o.system.posix_acl_access"}, r)
    assert xs["user.o.system.posix_acl_access"][:4] == struct.pack("<I", 2), r.explain()
    check_host_file(share / "dacl", daemon, {"user.o.system.posix_acl_default"}, r)
    check_host_file(share / "dacl" / "sub", daemon, {"user.o.system.posix_acl_access",
                                                     "user.o.system.posix_acl_default"}, r)
    check_host_file(share / "dacl" / "new", daemon, {"user.o.system.posix_acl_access"}, r)
    for p in (share / "acl", share / "dacl"):
        with pytest.raises(OSError) as e:
            os.getxattr(p, "system.posix_acl_access")
        assert e.value.errno in (errno.ENODATA, errno.EOPNOTSUPP), r.explain()


def test_file_capabilities(features):
    daemon, r, share = features
    s = section(r, "caps")
    assert one(s, "setcap", r) == "rc=0", r.explain()
    assert one(s, "getcap", r) == "capdir/busybox cap_net_raw=ep", r.explain()
    # the guest kernel grants the capability at exec (raw ICMP socket for ping)
    assert one(s, "ping-without-cap", r) == "denied", r.explain()
    assert one(s, "ping-with-cap", r) == "ok", r.explain()
    assert one(s, "capeff", r) == f"{1 << 13:016x}", r.explain()     # CAP_NET_RAW only
    assert one(s, "getcap2", r) == "capfile cap_net_raw,cap_sys_time=ep", r.explain()
    assert one(s, "nonowner-write", r) == "ok", r.explain()
    assert one(s, "getcap-after-write", r) == "[]", r.explain()     # killed by the write
    assert one(s, "nonowner-truncate", r) == "ok", r.explain()
    assert one(s, "getcap-after-truncate", r) == "[] mode 777", r.explain()
    xs = check_host_file(share / "capdir" / "busybox", daemon, {"user.o.security.capability"}, r)
    assert xs["user.o.security.capability"][:4] == struct.pack("<I", 0x02000001), r.explain()
    for name in ("capfile", "capfile3"):
        xs = check_host_file(share / name, daemon, set(), r)
        assert "user.o.security.capability" not in xs, (name, sorted(xs), r.explain())
    # the host binary carries no real capability and no setuid
    assert os.stat(share / "capfile3").st_mode & 0o7000 == 0, r.explain()


def test_overlayfs_with_upper_on_the_share(features):
    daemon, r, share = features
    s = section(r, "overlay")
    dmesg = "\n".join(s.get("dmesg:", []))
    assert one(s, "mount", r) == "rc=0", r.explain()
    assert one(s, "merged-a", r) == "lower-a", r.explain()
    assert one(s, "listing", r).split() == ["b", "d", "e2", "new2"], r.explain()
    assert one(s, "listing-d", r).split() == ["n"], r.explain()      # opaque: no lower x
    assert one(s, "merged-b", r) == "lower-b modified", r.explain()  # copy-up kept the data
    assert one(s, "merged-b-owner", r) == "1234:5678 640", r.explain()
    assert one(s, "merged-b-keep", r) == "kept", r.explain()
    # the upper layer as the guest sees it: whiteouts, the opaque marker
    assert one(s, "upper-a", r) == "character special file 0:0 0", r.explain()
    assert one(s, "upper-e", r) == "character special file 0:0", r.explain()
    assert one(s, "upper-d-opaque", r) == "y", r.explain()
    assert one(s, "upper-b", r) == "lower-b modified", r.explain()
    assert one(s, "upper-b-owner", r) == "1234:5678 640", r.explain()
    assert one(s, "lower-b", r) == "lower-b", r.explain()
    assert one(s, "remount", r) == "rc=0", r.explain()
    assert one(s, "relisting", r).split() == ["b", "d", "e2", "new2"], r.explain()
    assert one(s, "relisting-d", r).split() == ["n"], r.explain()
    assert "does not support" not in dmesg and "falling back" not in dmesg, \
        f"overlayfs had to degrade:\n{dmesg}\n{r.explain()}"
    # host: whiteouts are regular files whose record says char 0:0; opaque marker reserved
    up = share / "ov" / "upper"
    for name in ("a", "e"):
        xs = check_host_file(up / name, daemon, set(), r)
        rec = ownership.decode(xs["user.o"])
        assert rec.file_type == stat.S_IFCHR and rec.rdev == 0, (name, rec, r.explain())
        assert os.path.getsize(up / name) == 0, r.explain()
    xs = check_host_file(up / "d", daemon, {"user.o.trusted.overlay.opaque"}, r)
    assert xs["user.o.trusted.overlay.opaque"] == b"y", r.explain()
    xs = check_host_file(up / "b", daemon, {"user.keep"}, r)
    assert xs["user.keep"] == b"kept", r.explain()
    assert ownership.decode(xs["user.o"]).uid == 1234, r.explain()
    assert (up / "b").read_bytes() == b"lower-b\nmodified\n", r.explain()
    assert (share / "ov" / "lower" / "b").read_bytes() == b"lower-b\n", r.explain()


def test_security_labels(features):
    daemon, r, share = features
    s = section(r, "labels")
    assert one(s, "setfattr", r) == "rc=0", r.explain()
    assert one(s, "selinux", r) == "rc=0", r.explain()
    assert one(s, "security.test", r) == "x", r.explain()
    assert one(s, "security.selinux", r) == "system_u:object_r:etc_t:s0", r.explain()
    labx = s.get("labx:", [])
    assert any(line.startswith("security.test=") for line in labx), r.explain()
    assert not any(line.startswith("user.o") for line in labx), r.explain()   # record hidden
    assert one(s, "remove", r) == "rc=0", r.explain()
    assert "No such attribute" in one(s, "after-remove", r), r.explain()
    xs = check_host_file(share / "lab", daemon, {"user.o.security.test",
                                                "user.o.security.selinux"}, r)
    assert xs["user.o.security.test"] == b"again", r.explain()
    assert xs["user.o.security.selinux"].rstrip(b"\0") == b"system_u:object_r:etc_t:s0", r.explain()


def test_no_privileged_xattr_anywhere_on_the_host(features):
    """Every host object under the share: owned by the daemon user, only user.* xattrs."""
    daemon, r, share = features
    seen = 0
    for dirpath, dirnames, filenames in os.walk(share):
        for n in [*dirnames, *filenames]:
            p = Path(dirpath) / n
            st = os.lstat(p)
            assert (st.st_uid, st.st_gid) == (daemon.uid, daemon.gid), (p, r.explain())
            assert stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode), (p, r.explain())
            real = [x for x in os.listxattr(p, follow_symlinks=False)
                    if not x.startswith("user.")]
            assert not real, (p, real, r.explain())
            seen += 1
    assert seen > 20, r.explain()


DEFAULT_SCRIPT = r"""
cd /mnt
echo data > f
for i in 1 2; do
  setfattr -n user.x -v 1 f 2>&1; echo "setfattr$i rc=$?"
  getfattr -n user.x f 2>&1; echo "getfattr$i rc=$?"
  getfattr -d -m - f 2>&1; echo "list$i rc=$?"
done
setfacl -m u:1234:rw f 2>&1; echo "setfacl rc=$?"
chmod 640 f; chown 1234:5678 f; stat -c 'owner %u:%g %a' f
"""


def test_default_daemon_gives_the_guest_no_xattrs(vfsd):
    """No --xattr (virtiofsd's default): the guest's xattr requests get ENOSYS, so its kernel
    answers "Operation not supported" and stops asking; no ACLs either.  The ownership
    records are kept all the same."""
    r = run_guest(DEFAULT_SCRIPT, socket_path=vfsd.socket_path, timeout=180)
    assert r.status == 0, r.explain()
    out = r.output
    for step in ("setfattr1", "getfattr1", "setfattr2", "getfattr2", "setfacl"):
        assert f"{step} rc=0" not in out, (step, r.explain())
    assert out.count("Operation not supported") >= 5, r.explain()
    assert "owner 1234:5678 640" in out, r.explain()
    # each xattr request reached the daemon at most once: after the first ENOSYS the guest
    # kernel answers by itself
    log = vfsd.log_text()
    seen = {op: len(re.findall(rf"\b{op} unique=", log))
            for op in ("GETXATTR", "SETXATTR", "LISTXATTR", "REMOVEXATTR")}
    assert all(n <= 1 for n in seen.values()), (seen, r.explain())
    assert seen["SETXATTR"] == 1 and seen["GETXATTR"] == 1, (seen, r.explain())
    f = vfsd.shared_dir / "f"
    assert sorted(os.listxattr(f)) == ["user.o"], r.explain()
    rec = ownership.decode(os.getxattr(f, "user.o"))
    assert (rec.uid, rec.gid, rec.perm) == (1234, 5678, 0o640), rec
