"""Files written whole or not at all: write a temporary name beside the target, then rename.

A reader sees the old file or the new one, never half of one. The temporary name is
``NAME.tmp-PID-XXXXXXXX``: a writer killed before its rename (kill -9 runs no cleanup) leaves
one behind, which the next local write of the same file deletes once process PID is gone.

The steps go through a small file-system object (``open``, ``create``, ``rename``, ``exists``,
``delete``; optionally ``renames_atomically(path)``: where it says no, an object store, the file
is written once under its own name, since an object appears whole when closed) so that the one algorithm serves local files (:data:`LOCAL`, on ``os``) and the
remote-capable Beam ``FileSystems`` that curate uses (``capfilt.pipeline.files.BEAM``); this
layer imports no Beam. No library offers this over both: ``os.replace`` is the whole primitive
locally, and Beam has rename but no atomic write.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from typing import IO, Any, Iterator, Protocol

from capfilt.transforms.files.procs import pid_alive

TEMP_INFIX = ".tmp-"
_TEMP = re.compile(r"\.tmp-(\d+)-[0-9a-f]{8}")
_RAISE = object()


class Files(Protocol):
    """What the atomic writes and the file hashes need of a file system."""

    def open(self, path: str) -> IO[bytes]: ...
    def create(self, path: str) -> contextlib.AbstractContextManager[IO[bytes]]: ...
    def rename(self, src: str, dst: str) -> None: ...  # replaces dst
    def exists(self, path: str) -> bool: ...
    def delete(self, path: str) -> None: ...


class LocalFiles:
    """Local paths through ``os``. A created file is fsynced before it is closed, so a rename
    never lands on disk before the data it names (a power loss keeps the old file)."""

    def open(self, path: str) -> IO[bytes]:
        return open(path, "rb")

    @contextlib.contextmanager
    def create(self, path: str) -> Iterator[IO[bytes]]:
        with open(path, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())

    def rename(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def delete(self, path: str) -> None:
        os.remove(path)


LOCAL = LocalFiles()


def temp_name(path: str | os.PathLike) -> str:
    """The temporary name this process writes ``path`` under."""
    return f"{os.fspath(path)}{TEMP_INFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def is_temp(name: str) -> bool:
    """Whether file name ``name`` is an atomic write's temporary name (of any writer)."""
    return TEMP_INFIX in name


def dead_temps(path: str | os.PathLike) -> list[str]:
    """The temporary files of local ``path`` whose writer's process is gone."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return []
    out = []
    for other in sorted(names):
        match = _TEMP.fullmatch(other[len(name):]) if other.startswith(name) else None
        if match and int(match[1]) > 0 and not pid_alive(int(match[1])):
            out.append(os.path.join(folder, other))
    return out


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Errors of writing ``path`` name it: an OSError that names no file (``write(2)`` on a
    full disk, ENOSPC, names none) is raised again as the same kind of error naming ``path``."""
    try:
        yield
    except OSError as err:
        if err.filename is not None or err.errno is None:
            raise
        raise OSError(err.errno, err.strerror or str(err), os.fspath(path)) from err  # the subclass of its errno


def write_bytes(path: str | os.PathLike, data: bytes, fs: Files = LOCAL) -> None:
    """Write ``data`` to ``path`` whole or not at all (see the module docstring)."""
    with naming(path):
        _write_bytes(os.fspath(path), data, fs)


def _write_bytes(path: str, data: bytes, fs: Files) -> None:
    if not getattr(fs, "renames_atomically", lambda _p: True)(path):
        # an object store: no atomic rename, but an object appears whole when it is closed
        with fs.create(path) as f:
            f.write(data)
        return
    if fs is LOCAL:
        for stale in dead_temps(path):
            with contextlib.suppress(OSError):
                os.remove(stale)
    tmp = temp_name(path)
    try:
        with fs.create(tmp) as f:
            f.write(data)
        fs.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            if fs.exists(tmp):
                fs.delete(tmp)
        raise


def write_text(path: str | os.PathLike, text: str, fs: Files = LOCAL, only_if_changed: bool = False) -> bool:
    """Write ``text`` (UTF-8) atomically. With ``only_if_changed`` a file that already holds
    exactly this text is left alone (a run with nothing to do changes no file). Returns
    whether it wrote."""
    data = text.encode("utf-8")
    if only_if_changed and fs.exists(os.fspath(path)):
        with fs.open(os.fspath(path)) as f:
            if f.read() == data:
                return False
    write_bytes(path, data, fs)
    return True


def write_json(path: str | os.PathLike, obj: Any, fs: Files = LOCAL, *, indent: int | None = None,
               sort_keys: bool = False, end: str = "", only_if_changed: bool = False) -> bool:
    """``json.dumps(obj, indent=, sort_keys=) + end`` written atomically (see :func:`write_text`)."""
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + end, fs, only_if_changed)


def read_json(path: str | os.PathLike, fs: Files = LOCAL, default: Any = _RAISE) -> Any:
    """The JSON document at ``path``. With a ``default``, a missing or unreadable file (not
    JSON, not UTF-8) gives ``default`` instead of raising."""
    path = os.fspath(path)
    try:
        with fs.open(path) as f:
            return json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        if default is _RAISE:
            raise
        return default
