"""Feeds FUSE requests from virtqueues to the FUSE server.

One virtio-fs device (virtio spec 5.11): queue 0 is the high-priority queue
(FORGET, INTERRUPT), queues 1..N carry requests.  Each descriptor chain is one
request: device-readable buffers hold fuse_in_header and arguments,
device-writable buffers receive fuse_out_header and the reply, both used in
place (zero-copy): the FUSE server gets the chain's buffers themselves.
"""

from __future__ import annotations

import logging
import struct
from concurrent.futures import ThreadPoolExecutor

from protocol.fuse import Opcode
from protocol.vhost_user import VhostUserDevice

log = logging.getLogger(__name__)

HIPRIO_QUEUE = 0

# What goes to the thread pool (--thread-pool-size): requests that may wait on
# the host's disk - data, syncs, and the namespace changes a journalling
# filesystem writes (creating a file costs 0.1-0.9 ms on these machines).
# Their syscalls release the GIL, so on a pool they overlap.  Everything else
# (LOOKUP, GETATTR, READDIR, xattrs, ...) is served from the host's caches in
# less time than a hand-over to a pool thread costs, so it is answered inline.
POOLED = frozenset({
    Opcode.READ, Opcode.WRITE, Opcode.FSYNC, Opcode.FSYNCDIR, Opcode.SYNCFS,
    Opcode.FALLOCATE, Opcode.COPY_FILE_RANGE, Opcode.LSEEK,
    Opcode.CREATE, Opcode.TMPFILE, Opcode.MKNOD, Opcode.MKDIR, Opcode.SYMLINK,
    Opcode.LINK, Opcode.UNLINK, Opcode.RMDIR, Opcode.RENAME, Opcode.RENAME2,
})
_OPCODE = struct.Struct("<I")  # fuse_in_header.opcode, at offset 4


def _opcode(chain) -> int | None:
    """The request's opcode, if its first buffer holds it (Linux puts the whole
    fuse_in_header in one); else None, and the server judges the request."""
    views = chain.readable
    if views and len(views[0]) >= 8:
        return _OPCODE.unpack_from(views[0], 4)[0]
    return None


class VirtioFsDevice(VhostUserDevice):
    """vhost-user-fs: hands every chain to the FUSE server, inline or on a pool."""

    device_features = 0  # virtio-fs defines no feature bits of its own (5.11.3)
    # The hiprio queue's chains are FORGETs (and INTERRUPTs): nothing in the
    # guest waits for them.  Linux's virtio-fs takes the notification only to
    # free the forget requests (virtio_fs_hiprio_done_work, on a kworker), so
    # one per FORGET - a guest `rm` sends one per file, a cache drop thousands -
    # is an interrupt and a kworker run in the guest for nothing.
    coalesced_queues = frozenset({HIPRIO_QUEUE})

    def __init__(self, server, *, num_request_queues: int = 1, thread_pool_size: int = 0):
        self.server = server
        self.num_queues = 1 + num_request_queues
        self._pool = (ThreadPoolExecutor(thread_pool_size, thread_name_prefix="vfsd-pool")
                      if thread_pool_size > 0 else None)
        # Without a pool every request is answered inline by the ring worker
        # (one thread for every queue, with or without a pool), which lets the
        # ring layer skip its in-flight bookkeeping.
        self.completes_async = self._pool is not None
        self._handle = server.handle_views   # bound once: handle_chain runs per request

    def handle_chain(self, vring, chain):
        # The hiprio queue only carries FORGET/INTERRUPT: cheap and replyless,
        # and handling them inline keeps them ahead of queued requests.
        # The guest kernel never has two requests in flight whose order
        # matters (it waits for the first one's reply): the assumption of any
        # pool, so answering some inline while others run on it is safe too.
        if (self._pool is None or vring.index == HIPRIO_QUEUE
                or _opcode(chain) not in POOLED):
            return self._handle(chain.readable, chain.writable, chain.readable_len,
                                chain.writable_len)
        self._pool.submit(self._run_async, vring, chain)
        return None

    def _run_async(self, vring, chain) -> None:
        written = 0
        try:
            written = self._handle(chain.readable, chain.writable, chain.readable_len,
                                   chain.writable_len)
        except Exception:  # the server logs its own; this is a last resort
            log.exception("queue %d: request failed outside the FUSE server", vring.index)
        finally:
            vring.complete(chain, written)

    def working_elsewhere(self) -> bool:
        return self.server.working_elsewhere()

    def reset(self) -> None:
        log.info("device reset: ending the FUSE session")
        self.server.reset()
