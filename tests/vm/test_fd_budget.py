"""A guest that holds many more inodes than the daemon may have fds.

vfsd runs with `--rlimit-nofile 300` (a budget of 172 node fds): the guest makes 1,020
objects and keeps them in its caches, then walks, reads, chowns and renames them.  Past
the budget the daemon closes the fds of the nodes it opened longest ago and reopens them by
name when the guest uses them (vfsd/passthrough.py, "The fd budget"); the guest sees none
of it: no EMFILE, no ESTALE, every file's data and owner as written.
"""

from __future__ import annotations

import os
import re

from vfsd import ownership
from tests.vm.guest import run_guest

SCRIPT = r"""
set -e
mkdir /mnt/t
for d in $(seq 0 19); do
  mkdir /mnt/t/d$d
  for f in $(seq 0 49); do echo "$d/$f" > /mnt/t/d$d/f$f; done
done
echo "objects $(find /mnt/t | wc -l)"
# the oldest nodes were evicted first: read everything back, oldest first
bad=0
for d in $(seq 0 19); do
  for f in $(seq 0 49); do [ "$(cat /mnt/t/d$d/f$f)" = "$d/$f" ] || bad=$((bad+1)); done
done
echo "bad $bad"
chown -R 1234:5678 /mnt/t/d0
mv /mnt/t/d1 /mnt/t/moved
mv /mnt/t/d2/f0 /mnt/t/d3/from-d2
echo "owners $(ls -ln /mnt/t/d0 | awk '$3 == 1234 && $4 == 5678' | wc -l)"
echo "moved $(cat /mnt/t/moved/f49) $(cat /mnt/t/d3/from-d2)"
echo 3 > /proc/sys/vm/drop_caches
echo "again $(find /mnt/t -type f | wc -l) $(cat /mnt/t/d*/f* /mnt/t/moved/* | wc -l)"
"""


def test_guest_holds_more_inodes_than_the_daemon_has_fds(start_vfsd):
    daemon = start_vfsd(extra_args=["--rlimit-nofile", "300"])
    r = run_guest(SCRIPT, socket_path=daemon.socket_path, timeout=600)
    assert r.status == 0, r.explain()
    out = r.output
    assert "objects 1021\n" in out and "bad 0\n" in out, r.explain()
    assert "owners 50\n" in out and "moved 1/49 2/0\n" in out, r.explain()
    assert "again 1000 1000\n" in out, r.explain()
    log = daemon.log_text()
    assert "the guest holds more than 172 inodes: closing the fds" in log, daemon.describe(80)
    assert re.search(r"fd budget this session: \d+ fds closed, \d+ reopened, 0 nodes stale",
                     log), daemon.describe(80)
    for bad in ("Too many open files", "is stale", "Traceback"):
        assert bad not in log, daemon.describe(80)
    # the host files carry what the guest did through nodes reopened by name
    share = daemon.shared_dir / "t"
    rec = ownership.decode(os.getxattr(share / "d0" / "f7", "user.o"))
    assert (rec.uid, rec.gid) == (1234, 5678)
    assert (share / "moved" / "f49").read_bytes() == b"1/49\n"
