"""READDIRPLUS readahead (vfsd/readahead.py) under a real guest kernel.

A guest `ls -ln` of a long directory gets most of its READDIRPLUS replies made ahead, and
each shows the right size and owner.  A guest that removes names while it reads a listing
must not get an entry for any of them from a reply made before the removal (it would link
the name to the removed inode): the daemon drops that reply (its log says why), and none of
the names is there for the guest afterwards.
"""

from __future__ import annotations

import os
import re

from vfsd import ownership
from tests.vm.guest import run_guest

N = 400  # ~16 replies of 4 KiB

SCRIPT = r"""
set -e
echo 3 > /proc/sys/vm/drop_caches
ls -ln /mnt/long > /tmp/listing
echo "files $(grep -c '^-' /tmp/listing)"
# every entry: size = the number in its name, owner = the record's 1234:5678
echo "wrong $(awk '$1 ~ /^-/ && ($5 != substr($9, 2) || $3 != 1234 || $4 != 5678)' /tmp/listing | wc -l)"
echo 3 > /proc/sys/vm/drop_caches
python3 /readdir_remove.py
"""

# A reader that stats each entry as it reads it (as `ls -l` does; without that, a
# READDIRPLUS_AUTO guest goes on with plain READDIR after the first reply), and that removes
# every name it has not read yet while it is halfway through (after four replies: the fifth
# is being made ahead by then); then it checks each name the listing goes on to give.
READDIR_REMOVE = r"""
import os
d = "/mnt/gone"
every = {f"f{i}" for i in range(@N@)}
it = os.scandir(d)
seen = []
while len(seen) < 90:
    e = next(it)
    if e.name.startswith("f"):
        os.lstat(e.path)
        seen.append(e.name)
for name in every - set(seen):
    os.unlink(os.path.join(d, name))
rest = [e.name for e in it if e.name.startswith("f")]
alive = [n for n in rest if os.path.lexists(os.path.join(d, n))]
print("read", len(seen), "then", len(rest), "alive", len(alive), alive[:3])
"""


def test_a_long_listing_is_made_ahead_and_a_removal_shows(start_vfsd):
    daemon = start_vfsd(extra_args=["--log-level", "debug"])
    record = ownership.encode(ownership.Record(1234, 5678, 0o100644), name=b"user.o")
    owner = daemon.shared_dir.stat()  # the daemon's user: the guest removes names in gone/
    for sub in ("long", "gone"):
        d = daemon.shared_dir / sub
        d.mkdir()
        for i in range(N):
            (d / f"f{i}").write_bytes(b"x" * i)
            os.setxattr(d / f"f{i}", "user.o", record)
        for p in (d, *d.iterdir()):
            os.chown(p, owner.st_uid, owner.st_gid)
    r = run_guest(SCRIPT, socket_path=daemon.socket_path, python=True, timeout=300,
                  files={"readdir_remove.py": READDIR_REMOVE.replace("@N@", str(N))})
    assert r.status == 0, r.explain()
    assert f"files {N}\n" in r.output and "wrong 0\n" in r.output, r.explain()
    assert "alive 0 []" in r.output, r.explain()
    log = daemon.log_text()
    listing = "\n".join(line for line in log.splitlines()
                        if re.search(r"vfsd\.readahead|(READDIR|OPENDIR)\w* unique", line))
    used = log.count("batch made ahead used")
    assert used >= 10, f"{used} READDIRPLUS replies made ahead and used:\n{listing}"
    assert "batch made ahead dropped: a change" in log, listing
