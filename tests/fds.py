"""This process's file descriptors, for tests that check nothing leaks or stays open."""

from __future__ import annotations

import os


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def open_fds() -> int:
    """How many fds this process has open (the listing's own fd included)."""
    return len(os.listdir("/proc/self/fd"))
