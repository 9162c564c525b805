"""One validated configuration, built from the command line by `vfsd.cli`."""

from __future__ import annotations

from dataclasses import dataclass, field

from .ownership import IdMap

# --cache: how long the guest may trust what it was told (virtiofsd's modes).
CACHE_TIMEOUTS = {"never": 0.0, "metadata": 86400.0, "auto": 1.0, "always": 86400.0}


@dataclass
class Config:
    shared_dir: str
    socket_path: str | None = None
    fd: int | None = None
    thread_pool_size: int = 0
    num_request_queues: int = 16  # most queues we accept (GET_QUEUE_NUM - 1)
    log_level: str = "info"
    cache: str = "auto"
    readonly: bool = False
    readdirplus: bool = True
    writeback: bool = False
    record_name: str = "user.o"
    uidmap: IdMap = field(default_factory=IdMap)
    gidmap: IdMap = field(default_factory=IdMap)

    @property
    def timeout(self) -> float:
        return CACHE_TIMEOUTS[self.cache]
