"""--writeback: the guest's page cache holds dirty pages and writes them back later.

Under the writeback cache the guest kernel reads a page through a write-only open to fill
the part a write does not cover, and writes dirty pages of an O_APPEND file back at their
own offsets: the host fds must be read-write and without O_APPEND (as in virtiofsd), or
the first fails with EBADF and the second lands data at the host file's end.
"""

from __future__ import annotations


from protocol import fuse
from tests.vm.guest import run_guest

SCRIPT = """
set -e
cd /mnt
printf '0123456789abcdef' > f
sync; echo 3 > /proc/sys/vm/drop_caches
# write-only open, a write inside the first page: the kernel reads the page first
printf 'XY' | dd of=f bs=1 seek=4 conv=notrunc 2>/dev/null
# appends through O_APPEND, then a write back of the dirty pages
printf 'tail1' >> f
printf 'tail2' >> f
sync
echo "guest $(cat f)"
echo 3 > /proc/sys/vm/drop_caches
echo "reread $(cat f)"
"""


def test_writeback_cache_write_only_and_append(start_vfsd):
    daemon = start_vfsd(extra_args=["--writeback"])
    r = run_guest(SCRIPT, socket_path=daemon.socket_path, timeout=300)
    assert r.status == 0, r.explain()
    want = "0123XY6789abcdeftail1tail2"
    assert f"guest {want}" in r.output and f"reread {want}" in r.output, r.explain()
    assert (daemon.shared_dir / "f").read_text() == want
    # the guest really took the writeback cache (INIT's accepted flags)
    init = daemon.accepted_init()
    assert init and init[1] & fuse.InitFlag.WRITEBACK_CACHE, daemon.log_text()[-3000:]
