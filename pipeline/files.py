"""Beam's ``FileSystems`` as the file-system object of ``transforms.files`` (atomic writes,
hashes), so curate's state and hashes work on every path Beam knows (local, ``s3://``,
``gs://``) through the one implementation.

Object stores have no atomic rename (Beam's rename there is a copy and a delete), but an object
appears whole when its upload is closed: a remote file is written once under its final name,
never to a temporary name and renamed. Local files are written to a temporary name and renamed
(``os.replace``). Either way a reader sees a whole file or none; what is *final* is decided by
curate's done markers, which name each file's size and sha256 (docs/curate.md, "Other runners").

:func:`written` is a stream that hashes and counts the bytes on their way out, so a worker
that writes a file knows its checksum without reading it back.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
from typing import Iterator

from apache_beam.io.filesystems import FileSystems

from capfilt.transforms.files import atomic, hashing


def is_remote(path: str) -> bool:
    """Whether ``path`` is a URL (``s3://``, ``gs://``, ...) rather than a local path."""
    return "://" in str(path)


class BeamFiles:
    """``open``/``create``/``rename``/``exists``/``delete`` on Beam ``FileSystems``, uncompressed."""

    def open(self, path: str):
        return FileSystems.open(path, compression_type="uncompressed")

    def create(self, path: str):
        return FileSystems.create(path, compression_type="uncompressed")

    def rename(self, src: str, dst: str) -> None:
        FileSystems.rename([src], [dst])

    def exists(self, path: str) -> bool:
        return FileSystems.exists(path)

    def delete(self, path: str) -> None:
        FileSystems.delete([path])

    def renames_atomically(self, path: str) -> bool:
        """Only local renames are atomic; an object is written under its final name instead."""
        return not is_remote(path)


BEAM = BeamFiles()


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file on any file system Beam knows."""
    return hashing.file_sha256(path, BEAM)


def dir_sha256(path: str) -> str:
    """``transforms.files.hashing.dir_sha256`` of a directory (a prefix) on any file system."""
    return hashing.dir_sha256(path, list_files(path), BEAM)


def list_files(root: str) -> list[str]:
    """Every file below ``root`` as a path relative to it ('/'-separated), in the order of
    ``hashing.dir_sha256`` (by folder, then name)."""
    if not is_remote(root):
        return hashing.local_files(root)
    prefix = root.rstrip("/") + "/"
    found = FileSystems.match([prefix + "**"])[0].metadata_list
    rel = [m.path[len(prefix):] for m in found if not m.path.endswith("/")]
    return hashing.ordered(rel)


def listed_size(path: str) -> int | None:
    """A file's size in bytes from the file system's listing, None when it is not there."""
    found = FileSystems.match([path])[0].metadata_list
    return found[0].size_in_bytes if found else None


class _Counting(io.RawIOBase):
    """A write-only stream that passes bytes on and keeps their sha256 and count."""

    def __init__(self, raw):
        super().__init__()
        self._raw = raw
        self._digest = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)
        self._raw.write(data)
        self._digest.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()


@contextlib.contextmanager
def written(path: str) -> Iterator[_Counting]:
    """A stream whose bytes become the file ``path`` once the block ends without an error;
    read ``.size`` and ``.sha256`` after the block. On an error nothing is left at ``path``
    (locally the temporary file is removed; remotely the partial object is deleted). An error
    that names no file (a full disk) names ``path``."""
    with atomic.naming(path):
        yield from _written(path)


def _written(path: str) -> Iterator[_Counting]:
    if not is_remote(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = atomic.temp_name(path)
        try:
            with atomic.LOCAL.create(tmp) as f:
                stream = _Counting(f)
                yield stream
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        return
    f = FileSystems.create(path, compression_type="uncompressed")
    stream = _Counting(f)
    try:
        yield stream
    except BaseException:
        with contextlib.suppress(Exception):
            f.close()
        with contextlib.suppress(Exception):
            FileSystems.delete([path])
        raise
    f.close()  # the object appears, whole, here
