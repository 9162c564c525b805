"""Feeds FUSE requests from virtqueues to the FUSE server.

One virtio-fs device (virtio spec 5.11): queue 0 is the high-priority queue
(FORGET, INTERRUPT), queues 1..N carry requests.  Each descriptor chain is one
request: device-readable buffers hold fuse_in_header and arguments,
device-writable buffers receive fuse_out_header and the reply, both used in
place (zero-copy) through `protocol.buffers`.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from protocol.buffers import Reader, Writer
from protocol.vhost_user import VhostUserDevice

log = logging.getLogger(__name__)

HIPRIO_QUEUE = 0


class VirtioFsDevice(VhostUserDevice):
    """vhost-user-fs: hands every chain to the FUSE server, inline or on a pool."""

    device_features = 0  # virtio-fs defines no feature bits of its own (5.11.3)

    def __init__(self, server, *, num_request_queues: int = 1, thread_pool_size: int = 0):
        self.server = server
        self.num_queues = 1 + num_request_queues
        self._pool = (ThreadPoolExecutor(thread_pool_size, thread_name_prefix="vfsd-pool")
                      if thread_pool_size > 0 else None)
        # Without a pool every request is answered inline by the ring's worker,
        # which lets the ring layer skip its in-flight bookkeeping.
        self.completes_async = self._pool is not None
        self._handle = server.handle   # bound once: handle_chain runs per request

    def handle_chain(self, vring, chain):
        # The hiprio queue only carries FORGET/INTERRUPT: cheap and replyless,
        # and handling them inline keeps them ahead of queued requests.  (The
        # chain knows its byte counts, so Reader/Writer need not sum the views.)
        if self._pool is None or vring.index == HIPRIO_QUEUE:
            return self._handle(Reader(chain.readable, None, chain.readable_len),
                                Writer(chain.writable, chain.writable_len))
        self._pool.submit(self._run_async, vring, chain)
        return None

    def _run_async(self, vring, chain) -> None:
        written = 0
        try:
            written = self._handle(Reader(chain.readable, None, chain.readable_len),
                                   Writer(chain.writable, chain.writable_len))
        except Exception:  # the server logs its own; this is a last resort
            log.exception("queue %d: request failed outside the FUSE server", vring.index)
        finally:
            vring.complete(chain, written)

    def reset(self) -> None:
        log.info("device reset: ending the FUSE session")
        self.server.reset()
