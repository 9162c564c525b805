"""The FUSE and hostile-ring tests again, with requests served on a thread pool
(`--thread-pool-size`, as libvirt passes it): completions come out of order and
from other threads than the one ring worker, which still serves every queue."""

from __future__ import annotations

import pytest

from .test_fuse import (test_create_write_read, test_forget_on_hiprio,  # noqa: F401
                        test_large_write_and_read, test_many_requests_in_flight, test_readdir,
                        test_two_request_queues_concurrently, test_unknown_opcode_is_enosys)
from .test_lifecycle import (test_guest_reboot_reinit,  # noqa: F401
                             test_one_thread_serves_every_ring)
from .test_malformed_ring import (test_descriptor_outside_guest_memory,  # noqa: F401
                                  test_fuse_len_lies, test_truncated_in_header)


@pytest.fixture
def daemon_args():
    return ("--thread-pool-size", "4")
