"""Nesting: the guest's use of the record name is escaped one level, and the host-level record
can be neither seen nor touched from the guest.

One boot (tests/vm/conformance/nesting_guest.py in the guest):

- a file whose record the host wrote (owner 1234:5678, mode 0640): every spelling of the
  record's name (and of the reserved tree) fails to read, replace or remove anything; the
  guest's own ``user.o`` (a forged record granting setuid root) lands at ``user.o.o``; the host
  record is byte-for-byte unchanged and the owner the guest sees never moves (also after a
  daemon restart and a fresh boot);
- the guest writes ``user.o``, ``user.o.x`` and ``trusted.overlay.opaque``: the host shows
  ``user.o.o``, ``user.o.o.x`` and ``user.o.trusted.overlay.opaque``;
- an actual nested vfsd: the daemon's FUSE server and filesystem (in process, no vhost-user
  transport) serve a directory of the share from inside the guest, as the unprivileged guest
  user 1000.  Its own guest's records and xattrs land on the host one more level down
  (``user.o.o``, ``user.o.o.trusted.x``, ``user.o.o.o``), and mapping the host names back
  through two ``ownership.XattrNames`` levels gives exactly what each level's guest set.

The outer daemon runs with ``--xattr`` (guest xattrs are off by default, as in virtiofsd): the
nested daemon keeps its records in guest xattrs.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from tests.vm.guest import run_guest
from vfsd import ownership

HERE = Path(__file__).resolve().parent
GUEST = HERE / "conformance" / "nesting_guest.py"
REPO = HERE.parents[1]
X = ownership.XattrNames()
HOST_RECORD = ownership.Record(1234, 5678, stat.S_IFREG | 0o640)
#: The outer daemon's options: guest xattrs (for the nested daemon's records and the escaping).
OUTER_ARGS = ["--xattr"]


def guest_package_files() -> dict[str, str]:
    """vfsd and protocol (the working tree's) for /nest in the guest."""
    files = {}
    for pkg in ("vfsd", "protocol"):
        for p in sorted((REPO / pkg).rglob("*.py")):
            files[f"/nest/{p.relative_to(REPO)}"] = p.read_text()
    return files


def host_xattrs(path: Path) -> dict[str, bytes]:
    return {n: os.getxattr(path, n, follow_symlinks=False)
            for n in os.listxattr(path, follow_symlinks=False)}


def back(levels: int, host_name: str) -> str | None:
    """The name a guest `levels` daemons down sees for a host xattr name (None: hidden)."""
    name = host_name.encode()
    for _ in range(levels):
        name = X.host_to_guest(name)
        if name is None:
            return None
    return name.decode()


def test_nesting(start_vfsd, vfsd_workdir):
    share = vfsd_workdir / "share"
    share.mkdir()
    rec = share / "rec"
    rec.write_text("host\n")
    record_bytes = ownership.encode(HOST_RECORD)
    os.setxattr(rec, "user.o", record_bytes)
    daemon = start_vfsd(share, extra_args=OUTER_ARGS)
    files = guest_package_files()
    files["/nest/nesting_guest.py"] = GUEST.read_text()
    r = run_guest("PYTHONPATH=/nest python3 /nest/nesting_guest.py /mnt", python=True,
                  socket_path=daemon.socket_path, files=files, timeout=300)
    why = r.explain() + "\n--- daemon log tail ---\n" + daemon.log_tail(60)
    assert r.status == 0, why
    try:
        out = json.loads(r.output)
    except ValueError:
        raise AssertionError("the guest printed no JSON\n" + why) from None
    for part in ("untouchable", "nest", "nested"):
        crash = out[part].get("crash")
        assert not crash, f"{part} crashed in the guest:\n{crash}\n{why}"

    # -- 1. the host-level record: invisible and untouchable -----------------------------
    u = out["untouchable"]
    guest_owner = [1234, 5678, "0o640"]
    assert u["owner before"] == guest_owner, why
    assert u["list"] == [], why                              # nothing listed, not even user.o
    leaks = {k: v for k, v in u.items()
             if k.startswith(("get ", "remove ", "replace ")) and "via" not in k
             and not k.startswith(("get user.o", "remove user.o"))
             and v not in ("ENODATA", "EOPNOTSUPP", "EINVAL", "ERANGE", "EPERM")}
    assert not leaks, f"the guest reached something through these spellings: {leaks}\n{why}"
    # a read of the record's name never yields the record's bytes
    assert all(v != "value:" + record_bytes.hex() for v in u.values()), why
    assert u["get 'user.o'"] == "ENODATA" and u["remove 'user.o'"] == "ENODATA", why
    assert u["replace 'user.o'"] == "ENODATA", why
    # the guest's own user.o: a forged record granting setuid root, stored one level down
    assert u["create user.o"] == "ok", why
    assert u["owner with guest user.o"] == guest_owner, why
    assert u["list with guest user.o"] == ["user.o"], why
    assert u["remove user.o"] == "ok" and u["remove user.o again"] == "ENODATA", why
    assert u["recreate user.o"] == "ok", why
    assert u["chmod 600"] == "ok" and u["chmod 640"] == "ok", why
    assert u["owner after"] == guest_owner, why
    assert u["list after"] == ["user.o"], why
    assert u["get user.o via hard link"].startswith("value:01000000"), why  # the guest's own
    assert "user.o" not in u["share root list"], why
    assert u["share root get user.o"] == "ENODATA", why
    xs = host_xattrs(rec)
    assert ownership.decode(xs["user.o"]) == HOST_RECORD, why       # untouched (chmod back)
    assert xs["user.o"][:24] == record_bytes[:24], why
    forged = ownership.decode(xs["user.o.o"])                         # the guest's, escaped
    assert forged.uid == 0 and forged.perm == 0o4755, (forged, why)
    assert set(xs) == {"user.o", "user.o.o"}, (sorted(xs), why)
    assert rec.read_text() == "host\n", why
    st = os.stat(rec)
    assert (st.st_uid, st.st_gid) == (daemon.uid, daemon.gid) and not st.st_mode & 0o7000, why

    # -- 2. the guest's own user.o, user.o.x and trusted.overlay.opaque -----------------
    n = out["nest"]
    assert [n["set user.o"], n["set user.o.x"], n["set trusted.overlay.opaque"]] == \
        ["ok", "ok", "ok"], why
    assert n["list"] == ["trusted.overlay.opaque", "user.o", "user.o.x"], why
    assert n["get user.o"] == "value:" + b"guest-o".hex(), why
    assert n["get user.o.x"] == "value:" + b"guest-o-x".hex(), why
    assert n["get trusted.overlay.opaque"] == "value:" + b"y".hex(), why
    xs = host_xattrs(share / "nest")
    assert xs["user.o.o"] == b"guest-o", (sorted(xs), why)
    assert xs["user.o.o.x"] == b"guest-o-x", (sorted(xs), why)
    assert xs["user.o.trusted.overlay.opaque"] == b"y", (sorted(xs), why)
    rec_n = ownership.decode(xs["user.o"])                            # the daemon's record
    assert (rec_n.uid, rec_n.gid, rec_n.file_type) == (0, 0, stat.S_IFREG), (rec_n, why)
    assert set(xs) == {"user.o", "user.o.o", "user.o.o.x", "user.o.trusted.overlay.opaque"}, why
    assert not any(k.startswith("trusted.") for k in xs), why

    # -- 3. a nested vfsd serving /mnt/inner as guest user 1000 -------------------------
    v = out["nested"]
    assert v["init"] == 0, why
    assert v["inner create f"] == [4321, 8765, oct(stat.S_IFREG | 0o4755)], why
    assert v["inner mknod dev"] == [4321, 8765, oct(stat.S_IFCHR | 0o620)], why
    for k in ("inner set trusted.x", "inner set user.o", "inner set security.capability"):
        assert v[k] == "ok", (k, why)
    assert v["inner replace user.o.o"] == "ENODATA", why
    assert v["inner list"] == ["security.capability", "trusted.x", "user.o"], why
    assert v["inner get trusted.x"] == "value:" + b"T".hex(), why
    assert v["inner get user.o"] == "value:" + b"inner-guest-o".hex(), why
    assert v["inner get user.o.o"] == "ENODATA", why
    assert v["inner getattr f"] == [4321, 8765, oct(stat.S_IFREG | 0o4755)], why
    # the outer guest sees the nested daemon's files: owned by 1000, safe host modes, and
    # the nested daemon's record and reserved names as ordinary (escaped) xattrs
    ov = v["outer view"]
    assert ov["f"]["owner"] == [1000, 1000, "0o755"], why
    assert ov["dev"]["owner"][:2] == [1000, 1000] and ov["dev"]["type"] == stat.S_IFREG, why
    assert sorted(ov["f"]["xattrs"]) == ["user.o", "user.o.o", "user.o.security.capability",
                                        "user.o.trusted.x"], why
    inner_rec = ownership.decode(bytes.fromhex(ov["f"]["xattrs"]["user.o"]))
    assert inner_rec == ownership.Record(4321, 8765, stat.S_IFREG | 0o4755), (inner_rec, why)
    # the host: each level one escape further down
    host_f = share / "inner" / "f"
    xs = host_xattrs(host_f)
    assert set(xs) == {"user.o", "user.o.o", "user.o.o.o", "user.o.o.trusted.x",
                       "user.o.o.security.capability"}, (sorted(xs), why)
    assert ownership.decode(xs["user.o"]).uid == 1000, why            # the outer record
    assert ownership.decode(xs["user.o.o"]) == ownership.Record(
        4321, 8765, stat.S_IFREG | 0o4755), why                        # the nested one
    assert xs["user.o.o.o"] == b"inner-guest-o" and xs["user.o.o.trusted.x"] == b"T", why
    dev = ownership.decode(host_xattrs(share / "inner" / "dev")["user.o.o"])
    assert dev.file_type == stat.S_IFCHR and (dev.rdev_major, dev.rdev_minor) == (1, 3), why
    # mapping host names back through the levels gives what each level's guest set
    assert {back(1, k) for k in xs} == {None, "user.o", "user.o.o", "user.o.trusted.x",
                                        "user.o.security.capability"}, why
    assert {back(2, k) for k in xs} - {None} == {"user.o", "trusted.x",
                                                  "security.capability"}, why
    assert back(2, "user.o.o") is None and back(1, "user.o") is None, why

    # -- after a daemon restart and a fresh boot: the same owner, the same xattrs ---------
    assert daemon.stop() == 0, why
    d2 = start_vfsd(share, extra_args=OUTER_ARGS)
    r2 = run_guest("stat -c '%u:%g %a' /mnt/rec; getfattr --absolute-names -m - /mnt/rec; "
                   "getfattr --absolute-names -d -m - /mnt/nest",
                   socket_path=d2.socket_path, timeout=120)
    why2 = r2.explain() + "\n--- daemon log tail ---\n" + d2.log_tail(40)
    assert r2.status == 0, why2
    lines = r2.output.splitlines()
    assert lines[0] == "1234:5678 640", why2
    assert "user.o" in lines and "user.o.o" not in lines, why2
    assert 'user.o="guest-o"' in lines and 'user.o.x="guest-o-x"' in lines, why2
    assert 'trusted.overlay.opaque="y"' in lines, why2
    assert ownership.decode(host_xattrs(rec)["user.o"]) == HOST_RECORD, why
