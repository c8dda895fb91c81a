"""One process at a time in a directory: an exclusive lock on a local file, not waited for
(except by :func:`waited`).

``filelock`` holds an OS lock (``flock`` on POSIX, falling back to a lock file where the file
system has none); the kernel releases it when its holder dies, so a killed run leaves nothing to
clean up. The lock file stays in place after release: deleting a locked file would let two
processes lock two different files of one name.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import filelock


class Busy(Exception):
    """Another process holds the lock at ``path`` (`message`: the holder's own words for it).
    ``capfilt`` exits 5 on it: not a failure, and retrying later may succeed."""

    def __init__(self, path: str, message: str | None = None):
        super().__init__(message or f"{path} is locked by another process")
        self.path = path


def acquire(path: str | os.PathLike) -> filelock.BaseFileLock:
    """Take the lock at ``path`` (its folder must exist) and return it held; the caller calls
    ``release()``. :class:`Busy` when another process holds it; OSError when it cannot be created."""
    lock = filelock.FileLock(os.fspath(path), thread_local=False)
    try:
        lock.acquire(blocking=False)
    except filelock.Timeout:
        raise Busy(os.fspath(path)) from None
    return lock


@contextlib.contextmanager
def hold(path: str | os.PathLike, busy: Callable[[], BaseException] | None = None) -> Iterator[None]:
    """Hold the lock at ``path`` for the block (see :func:`acquire`). When another process
    holds it, ``busy()`` is raised if given (the caller's own message), else :class:`Busy`."""
    try:
        lock = acquire(path)
    except Busy:
        if busy is None:
            raise
        raise busy() from None
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def waited(path: str | os.PathLike) -> Iterator[None]:
    """Hold the lock at ``path`` for the block, waiting for another holder to finish (a
    shared cache filled once per machine, where waiting is right and ``Busy`` is not)."""
    with filelock.FileLock(os.fspath(path), thread_local=False):
        yield
