"""Silence what native code prints on the process's stdout and stderr file descriptors.

Python-level redirection does not reach C++ writes such as the profiler's `USDT:` lines, which
would otherwise land in the middle of the progress bar; this swaps the descriptors themselves.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def silenced_fds() -> Iterator[None]:
    """Send file descriptors 1 and 2 to /dev/null for the duration of the block."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(fd) for fd in (1, 2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            os.dup2(devnull, fd)
        yield
    finally:
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)
