"""A real guest on a vfsd share, daemon unprivileged: POSIX ownership kept in records.

The guest (QEMU TCG, Debian kernel, busybox) creates every kind of object and
sets owners and modes the host user could never set; the host sees only
files owned by the daemon's user, with records saying what the guest set.
Then the daemon restarts and a fresh guest boots: it sees the same.
"""

from __future__ import annotations

import hashlib
import os
import stat

from tests.vm.guest import run_guest
from vfsd import ownership

STAT = "stat -c '%n|%f|%u|%g|%a|%t|%T|%s|%h'"
NAMES = ["file", "hardlink", "dir", "dir/child", "dir/sub", "tmp", "tmp/userfile", "symlink",
         "fifo", "chardev", "blockdev", "sock", "data", "hostfile", "copy"]

CREATE = f"""
set -e
cd /mnt
echo hello > file
chown 1234:5678 file
chmod 4755 file
mkdir dir
chown 2000:3000 dir
chmod 2775 dir
echo child > dir/child
mkdir dir/sub
mkdir tmp
chmod 1777 tmp
su -s /bin/sh user -c 'echo mine > /mnt/tmp/userfile'
ln file hardlink
ln -s file symlink
chown -h 4321:8765 symlink
mkfifo fifo
chown 7:8 fifo
chmod 640 fifo
mknod chardev c 1 3
mknod blockdev b 8 1
chown 0:6 blockdev
ln -sf /mnt/sock /dev/log
syslogd -n -O /dev/null &
sleep 1
kill $! ; wait $! || true
test -S sock
dd if=/dev/urandom of=data bs=65536 count=32 2>/dev/null
cp hostfile copy
echo "md5 data $(md5sum data | cut -d' ' -f1)"
echo "md5 hostfile $(md5sum hostfile | cut -d' ' -f1)"
echo "read symlink $(cat symlink)"
echo "readlink $(readlink symlink)"
"""

SHOW = f"""
set -e
cd /mnt
for n in {' '.join(NAMES)}; do {STAT} "$n"; done
echo "read file $(cat file)"
"""


def parse_stats(output: str) -> dict[str, dict]:
    out = {}
    for line in output.splitlines():
        parts = line.split("|")
        if len(parts) != 9:
            continue
        name, rawmode, uid, gid, perm, major, minor, size, nlink = parts
        out[name] = dict(mode=int(rawmode, 16), uid=int(uid), gid=int(gid),
                         perm=int(perm, 8), rdev=(int(major, 16), int(minor, 16)),
                         size=int(size), nlink=int(nlink))
    return out


def values(output: str, key: str) -> str:
    for line in output.splitlines():
        if line.startswith(key + " "):
            return line[len(key) + 1:]
    raise AssertionError(f"no {key!r} line in guest output:\n{output}")


EXPECTED = {  # name: (type, uid, gid, perm)
    "file": (stat.S_IFREG, 1234, 5678, 0o4755),
    "hardlink": (stat.S_IFREG, 1234, 5678, 0o4755),
    "dir": (stat.S_IFDIR, 2000, 3000, 0o2775),
    "dir/child": (stat.S_IFREG, 0, 3000, 0o644),  # group from the setgid parent
    "dir/sub": (stat.S_IFDIR, 0, 3000, 0o2755),  # and subdirectories inherit setgid
    "tmp": (stat.S_IFDIR, 0, 0, 0o1777),
    "tmp/userfile": (stat.S_IFREG, 1000, 1000, 0o644),
    "symlink": (stat.S_IFLNK, 4321, 8765, 0o777),
    "fifo": (stat.S_IFIFO, 7, 8, 0o640),
    "chardev": (stat.S_IFCHR, 0, 0, 0o644),
    "blockdev": (stat.S_IFBLK, 0, 6, 0o644),
    "sock": (stat.S_IFSOCK, 0, 0, None),  # mode follows syslogd's umask
    "data": (stat.S_IFREG, 0, 0, 0o644),
    "copy": (stat.S_IFREG, 0, 0, 0o644),
}


def check_guest_view(stats: dict[str, dict]) -> None:
    for name, (kind, uid, gid, perm) in EXPECTED.items():
        s = stats[name]
        assert stat.S_IFMT(s["mode"]) == kind, (name, oct(s["mode"]))
        assert (s["uid"], s["gid"]) == (uid, gid), (name, s)
        if perm is not None:
            assert s["perm"] == perm, (name, oct(s["perm"]))
    assert stats["chardev"]["rdev"] == (1, 3) and stats["blockdev"]["rdev"] == (8, 1)
    assert stats["file"]["nlink"] == 2 and stats["hardlink"]["nlink"] == 2
    assert stats["symlink"]["size"] == len("file")


def test_guest_ownership_survives_restart_and_reboot(start_vfsd, vfsd_workdir):
    share = vfsd_workdir / "share"
    share.mkdir()
    host_data = os.urandom(300_000)
    (share / "hostfile").write_bytes(host_data)
    daemon = start_vfsd(share)
    assert daemon.uid != 0 or os.getuid() != 0, "the daemon must run unprivileged"

    r = run_guest(CREATE + SHOW, socket_path=daemon.socket_path, timeout=300)
    assert r.status == 0, r.explain()
    stats = parse_stats(r.output)
    check_guest_view(stats)
    assert values(r.output, "read symlink") == "hello"
    assert values(r.output, "readlink") == "file"
    assert values(r.output, "read file") == "hello"
    assert stats["hostfile"]["uid"] == daemon.uid  # host files: the default owner

    # -- the host side ------------------------------------------------------
    for name in NAMES:
        p = share / name
        st = os.lstat(p)
        assert st.st_uid == daemon.uid and st.st_gid == daemon.gid, name
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX), (name, oct(st.st_mode))
        assert stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode), name  # never special
        assert st.st_mode & 0o600 == 0o600, name
    for name, (kind, uid, gid, perm) in EXPECTED.items():
        rec = ownership.decode(os.getxattr(share / name, "user.o"))
        assert (rec.file_type, rec.uid, rec.gid) == (kind, uid, gid), name
        if perm is not None:
            assert rec.perm == perm, name
    assert ownership.decode(os.getxattr(share / "chardev", "user.o")).rdev == os.makedev(1, 3)
    assert (share / "symlink").read_bytes() == b"file"
    assert (share / "file").read_bytes() == b"hello\n"
    assert os.stat(share / "file").st_ino == os.stat(share / "hardlink").st_ino
    assert hashlib.md5((share / "data").read_bytes()).hexdigest() == values(r.output, "md5 data")
    assert values(r.output, "md5 hostfile") == hashlib.md5(host_data).hexdigest()
    assert (share / "copy").read_bytes() == host_data

    # -- restart the daemon, boot a fresh guest ------------------------------
    assert daemon.stop() == 0
    daemon2 = start_vfsd(share)
    r2 = run_guest(SHOW, socket_path=daemon2.socket_path, timeout=300)
    assert r2.status == 0, r2.explain()
    stats2 = parse_stats(r2.output)
    check_guest_view(stats2)
    for name in NAMES:
        a, b = stats[name], stats2[name]
        assert (a["mode"], a["uid"], a["gid"], a["rdev"], a["size"]) == (
            b["mode"], b["uid"], b["gid"], b["rdev"], b["size"]), name


def test_guest_reboot_on_one_connection(guest, vfsd):
    """Two guest sessions against one daemon process: a second INIT resets the session."""
    r = guest("set -e; cd /mnt; mkdir a; chown 11:12 a; touch a/b; chmod 600 a/b; "
              "cd /; umount /mnt; mount -t virtiofs myfs /mnt; " + STAT + " /mnt/a /mnt/a/b")
    assert r.status == 0, r.explain()
    stats = parse_stats(r.output)
    assert (stats["/mnt/a"]["uid"], stats["/mnt/a"]["gid"]) == (11, 12)
    assert stats["/mnt/a/b"]["perm"] == 0o600


def test_unprivileged_guest_user_cannot_chown(guest):
    """The guest kernel enforces ownership from what vfsd reports."""
    r = guest("cd /mnt; touch f; chown 1000 f; "
              "su -s /bin/sh user -c 'chown 1001 /mnt/f' && echo chown-ok || echo chown-denied; "
              "su -s /bin/sh other -c 'echo x > /mnt/f' && echo write-ok || echo write-denied; "
              "su -s /bin/sh user -c 'echo x > /mnt/f' && echo owner-write-ok")
    assert r.status == 0, r.explain()
    assert "chown-denied" in r.output and "write-denied" in r.output
    assert "owner-write-ok" in r.output
