"""The guest sees a POSIX filesystem on vfsd: the same behaviour as on a local filesystem.

One guest boot (module fixture) runs tests/vm/conformance/posix_suite.py (as root, as ordinary
users, and as root orchestrating several users) in a fresh directory on each of three vfsd
shares - --xattr --posix-acl (the suite covers xattrs and ACLs, which are off by default, as in
virtiofsd), the same plus --no-killpriv-v2, and plus --cache never; each daemon unprivileged, each
its own vhost-user-fs device - and in a fresh directory on a guest-local ext4 (an image made
here with mkfs.ext4, attached as a virtio disk; 4 KiB blocks and 256-byte inodes like a usual
host ext4, so both have nanosecond times and 4 KiB hole granularity).
test_posix_conformance[target] requires every step of every case on that share to give the
same result as on the ext4, except the differences listed in ALLOWED (and the target's own
list), each with its reason.

ext4 rather than tmpfs: the guest kernel (Debian 6.1) has no user.* xattrs on tmpfs.

While debugging: VFSD_CONFORMANCE_ONLY=acl,killpriv runs only those cases;
VFSD_CONFORMANCE_DUMP=DIR keeps each filesystem's JSON results; -rA shows the allowed
differences of passing runs.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from protocol import fuse
from tests.daemon import Daemon, workdir
from tests.vm.guest import extra_modules, require_guest, run_guest

SUITE = Path(__file__).resolve().parent / "conformance" / "posix_suite.py"
BEGIN, END = "@@CONF-BEGIN@@", "@@CONF-END@@"

ANY = object()   # an allowed difference whose vfsd value is not pinned down

#: (case key, step label) -> (why vfsd may differ from the local filesystem there, the value
#: vfsd must give instead, or ANY).  The step is still run and shown (-rA prints them).  A
#: variant of vfsd (see TARGETS) may add its own entries.  Keep this short and explained.
ALLOWED: dict[tuple[str, str], tuple[str, object]] = {
    # The guest's FUSE client (fuse_file_fallocate in Linux 6.1) refuses every fallocate mode
    # except KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE with EOPNOTSUPP before asking the daemon;
    # ext4 implements COLLAPSE_RANGE and INSERT_RANGE too.
    **{(f"fallocate@{v}", m): ("the guest FUSE client has no COLLAPSE/INSERT_RANGE",
                               "EOPNOTSUPP")
       for v in ("root", "user") for m in ("COLLAPSE_RANGE", "INSERT_RANGE")},
    # listxattr on FUSE returns the daemon's list unfiltered: the guest kernel does not hide
    # trusted.* names from unprivileged callers as ext4's list handler does (reading them is
    # still refused, ENODATA, by the VFS).  The daemon cannot know the caller's capabilities.
    ("xattr_visibility@x", "[lister] list as user"):
        ("FUSE listxattr does not hide trusted.* from unprivileged callers",
         ["security.capability", "security.s", "trusted.t", "user.u"]),
    ("xattr_visibility@x", "[lister] listxattr size 0 as user"):
        ("the same list's size, with \"trusted.t\\0\"", 48),
    # Escaping makes some guest names longer on the host (docs/ownership.md, "Guest xattrs and
    # nesting"): user.o.<248 bytes> becomes user.o.o.<248> (257 bytes) and trusted.<247>
    # becomes user.o.trusted.<247> (262), over XATTR_NAME_MAX.  vfsd refuses to set them
    # (ERANGE, never a truncated name); such an xattr cannot exist, so reading or removing it
    # finds nothing (ENODATA).
    **{(f"xattr_reserved_names@{v}", "set user.o 255-byte name"):
       ("escaped name over 255 bytes", "ERANGE") for v in ("root", "user")},
    **{(f"xattr_reserved_names@{v}", "get user.o 255-byte name"):
       ("the escaped name cannot exist", "ENODATA") for v in ("root", "user")},
    **{(f"xattr_reserved_names@{v}", "remove user.o 255-byte name"):
       ("the escaped name cannot exist", "ENODATA") for v in ("root", "user")},
    ("xattr_reserved_names@root", "set trusted 255-byte name"):
        ("escaped name over 255 bytes", "ERANGE"),
    ("xattr_reserved_names@root", "get trusted 255-byte name"):
        ("the escaped name cannot exist", "ENODATA"),
    ("xattr_reserved_names@root", "list long names"):
        ("the two long names above are missing", ["trusted.aa*247", "user.o.aaa*253"]),
}

#: What every target runs with: the suite's xattr, ACL, capability and kill-priv cases need
#: guest xattrs and POSIX ACLs, which vfsd (like virtiofsd) only gives when asked.
FEATURES = ["--xattr", "--posix-acl"]

#: The vfsd configurations the suite runs against: (guest mount point, virtio-fs tag, extra
#: daemon arguments, extra allowed differences).
TARGETS = {
    # The default: HANDLE_KILLPRIV_V2, the daemon clears setuid/setgid/capabilities itself.
    "vfsd": ("/mnt", "myfs", [*FEATURES], {}),
    # Without it the guest kernel clears them (virtiofsd's default).
    "vfsd-no-killpriv-v2": ("/kp", "kp", [*FEATURES, "--no-killpriv-v2"], {}),
    # cache=never: FOPEN_DIRECT_IO, another write path in the guest's FUSE client.
    "vfsd-cache-never": ("/nc", "nc", [*FEATURES, "--cache", "never"], {}),
}
# Without KILLPRIV_V2 the guest's FUSE client clears setgid on write/truncate itself
# (fuse_setattr, Linux 6.1) and only together with group-execute, the pre-6.2 rule; the local
# filesystem uses the kernel's current rule (setattr_should_drop_sgid: also when the writer
# is not in the file's group).  The daemon is never asked.
TARGETS["vfsd-no-killpriv-v2"][3][("killpriv@x", "stat sgid-nox")] = (
    "guest FUSE client keeps setgid without group-exec (pre-6.2 rule)", ANY)
# HANDLE_KILLPRIV_V2 and chown(f, -1, -1): the VFS asks to drop setuid, but the 6.1 FUSE
# client strips the kill bits (fuse_setattr) and sends a SETATTR that names no attribute and
# carries no kill flag (fuse_do_setattr adds FATTR_KILL_SUIDGID only to a uid/gid change or
# a truncate).  The daemon does not read a kill into a request that asks for none; keeping
# setuid there gives no one anything, since the owner does not change.
for _name in ("vfsd", "vfsd-cache-never"):
    TARGETS[_name][3][("chown@user", "stat h")] = (
        "chown(-1, -1) under killpriv_v2 reaches the daemon as an empty SETATTR", ANY)
# With FOPEN_DIRECT_IO the 6.1 FUSE client refuses shared writable mappings (fuse_file_mmap:
# ENODEV; FUSE_DIRECT_IO_ALLOW_MMAP only exists from Linux 6.6 on).
for _v in ("root", "user"):
    TARGETS["vfsd-cache-never"][3][
        (f"mmap@{_v}", "MAP_SHARED write, pread, pwrite, read back")] = (
        "no shared mmap with direct I/O in the 6.1 FUSE client", "ENODEV")


def make_ext4(path: Path, size_mb: int = 64) -> None:
    mkfs = shutil.which("mkfs.ext4") or next(
        (p for p in ("/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4") if os.path.exists(p)), None)
    if not mkfs:
        pytest.skip("mkfs.ext4 missing (apt-get install e2fsprogs; tools/setup does)")
    with open(path, "wb") as f:
        f.truncate(size_mb << 20)
    # no metadata_csum: the guest would need the crc32c module for it
    subprocess.run([mkfs, "-q", "-F", "-b", "4096", "-I", "256", "-O", "^metadata_csum",
                    "-E", "root_owner=0:0", str(path)], check=True, capture_output=True)


def guest_script(only: str | None = None) -> tuple[str, dict]:
    files, load = extra_modules("virtio_blk")
    files["/conf/posix_suite.py"] = SUITE.read_text()
    sel = f" --only {only}" if only else ""
    script = load + """
for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
mkdir -p /ext4 && mount -t ext4 /dev/vda /ext4 || { echo 'cannot mount the ext4 disk'; exit 98; }
"""
    for name, (mnt, tag, _args, _allowed) in TARGETS.items():
        if mnt != "/mnt":
            script += f"mkdir -p {mnt} && mount -t virtiofs {tag} {mnt} || exit 98\n"
    for name, mnt in [(n, t[0]) for n, t in TARGETS.items()] + [("ext4", "/ext4")]:
        script += f"""
python3 /conf/posix_suite.py {mnt}/conformance{sel} > /tmp/{name}.json 2>/tmp/{name}.err
echo "{BEGIN} {name} rc=$?"; cat /tmp/{name}.json; echo "{END}"
echo "--- suite stderr ({name}) ---"; tail -n 60 /tmp/{name}.err
"""
    script += "umount /ext4\n" + "".join(f"umount {t[0]}\n" for t in TARGETS.values()
                                         if t[0] != "/mnt")
    return script, files


def section(output: str, name: str) -> tuple[int | None, dict | None]:
    start = output.find(f"{BEGIN} {name} rc=")
    if start < 0:
        return None, None
    line_end = output.index("\n", start)
    rc = int(output[start:line_end].rsplit("rc=", 1)[1])
    end = output.find(END, line_end)
    body = output[line_end + 1:end if end >= 0 else None].strip()
    try:
        return rc, json.loads(body)
    except ValueError:
        return rc, None


def compare(vfsd: dict, ref: dict, allowed_extra: dict) -> tuple[list[str], list[str]]:
    """(unexpected differences, allowed differences), as readable lines."""
    allowed_map = {**ALLOWED, **allowed_extra}
    bad, allowed = [], []
    for key in sorted(set(vfsd["cases"]) | set(ref["cases"])):
        a = vfsd["cases"].get(key)
        b = ref["cases"].get(key)
        if a is None or b is None:
            bad.append(f"{key}: missing on {'vfsd' if a is None else 'ext4'}")
            continue
        la = [lbl for lbl, _ in a]
        lb = [lbl for lbl, _ in b]
        if la != lb:
            diff = "\n    ".join(difflib.unified_diff(lb, la, "ext4", "vfsd", lineterm="", n=1))
            bad.append(f"{key}: different steps (a crash or a hang?)\n    {diff}")
        da, db = dict(a), dict(b)
        for lbl in dict.fromkeys(la + lb):
            va, vb = da.get(lbl, "<absent>"), db.get(lbl, "<absent>")
            if va == vb:
                continue
            line = f"{key} | {lbl}\n      vfsd: {json.dumps(va)}\n      ext4: {json.dumps(vb)}"
            why, want = allowed_map.get((key, lbl), (None, None))
            if why and (want is ANY or want == va):
                allowed.append(line + f"\n      allowed: {why}")
            elif why:
                bad.append(line + f"\n      (allowed to differ only as {json.dumps(want)}: "
                           f"{why})")
            else:
                bad.append(line)
    return bad, allowed


@pytest.fixture(scope="module")
def conformance_run():
    """One boot: the suite on every TARGETS share and on the guest's ext4 disk."""
    require_guest()
    daemons: dict[str, Daemon] = {}
    with workdir() as work:
        try:
            image = work / "ref-ext4.img"
            make_ext4(image)
            for i, (name, (_m, _t, args, _a)) in enumerate(TARGETS.items()):
                daemons[name] = Daemon(work / f"share{i}", work / f"run{i}" / "vfsd.sock",
                                       extra_args=args).start()
            qemu_args = ["-drive", f"file={image},if=virtio,format=raw"]
            for i, (name, (mnt, tag, _args, _a)) in enumerate(TARGETS.items()):
                if mnt != "/mnt":
                    path = str(daemons[name].socket_path).replace(",", ",,")
                    qemu_args += ["-chardev", f"socket,id=vfsx{i},path={path}",
                                  "-device", f"vhost-user-fs-pci,chardev=vfsx{i},tag={tag}"]
            script, files = guest_script(os.environ.get("VFSD_CONFORMANCE_ONLY"))  # "acl,mmap"
            r = run_guest(script, socket_path=daemons["vfsd"].socket_path, python=True,
                          files=files, extra_qemu_args=qemu_args, timeout=400)
            for d in daemons.values():
                d.stop()
            results = {name: section(r.output, name) for name in [*TARGETS, "ext4"]}
            dump = os.environ.get("VFSD_CONFORMANCE_DUMP")     # a directory: keep the results
            if dump:
                os.makedirs(dump, exist_ok=True)
                for name, (_rc, doc) in results.items():
                    with open(os.path.join(dump, f"{name}.json"), "w") as f:
                        json.dump(doc, f, indent=1, sort_keys=True)
            yield daemons, r, results
        finally:
            for d in daemons.values():
                d.stop()


@pytest.mark.parametrize("target", list(TARGETS))
def test_posix_conformance(conformance_run, target):
    """The suite's results on the vfsd share (in configuration `target`) equal those on the
    guest's local ext4, up to ALLOWED and the target's own allowed differences."""
    daemons, r, results = conformance_run
    daemon = daemons[target]
    rc, doc = results[target]
    ref_rc, ref = results["ext4"]
    assert r.status == 0 and ref_rc == 0 and ref is not None, \
        "the suite did not run to the end on the guest's ext4:\n" + r.explain(tail=40)
    assert rc == 0 and doc is not None, (
        f"the suite did not run to the end on {target}:\n" + r.explain(tail=40)
        + f"\n--- {target} daemon log tail ---\n" + daemon.log_tail(60))
    # The guest took HANDLE_KILLPRIV_V2 where the target's settings offer it (the default),
    # so the kill-priv cases below ran on the path the target names.
    init = daemon.accepted_init()
    assert init, f"no INIT in the {target} daemon's log:\n" + daemon.log_tail(20)
    took_v2 = bool(init[1] & fuse.InitFlag.HANDLE_KILLPRIV_V2)
    assert took_v2 == ("--no-killpriv-v2" not in TARGETS[target][2]), init[0]
    extra = TARGETS[target][3]
    bad, allowed = compare(doc, ref, extra)
    print(f"\n{target}: {sum(len(c) for c in ref['cases'].values())} steps in "
          f"{len(ref['cases'])} case runs; {doc['seconds']}s (ext4 {ref['seconds']}s); "
          f"{len(bad)} differences, {len(allowed)} allowed")
    for line in allowed:
        print("  " + line)
    seen = {tuple(line.split("\n")[0].split(" | ", 1)) for line in allowed + bad}
    stale = sorted(k for k in {**ALLOWED, **extra} if k[0] in ref["cases"] and k not in seen)
    if stale:
        print(f"  allow-list entries that no longer differ: {stale}")
    if bad:
        pytest.fail(f"{len(bad)} steps differ between the {target} share and the guest's "
                    "ext4:\n" + "\n".join(bad) + f"\n--- {target} daemon log tail ---\n"
                    + daemon.log_tail(60), pytrace=False)
