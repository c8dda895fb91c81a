"""SHA-256 hex digests of bytes, files, directories and JSON values: the content hashes in
curate markers and manifests, release manifests, the ``sha256`` column and run-job's change
detection. Files are read through a file-system object (``transforms.files.atomic.LOCAL`` by
default, Beam ``FileSystems`` for curate's remote paths: ``capfilt.pipeline.files``)."""
from __future__ import annotations

import hashlib
import json
import os

from capfilt.transforms.files.atomic import LOCAL, Files

_BLOCK = 1 << 20


def bytes_sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data`` (the ``sha256`` column of an image, as img2dataset computes it)."""
    return hashlib.sha256(bytes(data)).hexdigest()


def file_sha256(path: str | os.PathLike, fs: Files = LOCAL) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with fs.open(os.fspath(path)) as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def dir_sha256(path: str | os.PathLike, files: list[str] | None = None, fs: Files = LOCAL) -> str:
    """Hex SHA-256 over a directory: every file's path relative to ``path`` ('/'-separated) and
    the hex SHA-256 of its bytes, by folder and then name (renaming or editing a file changes
    it). ``files``: the relative paths (``local_files`` of a local directory by default; a
    remote prefix lists its own, ``capfilt.pipeline.files.list_files``), read through ``fs``."""
    root = os.fspath(path)
    digest = hashlib.sha256()
    for rel in local_files(root) if files is None else files:
        digest.update(rel.encode("utf-8") + b"\0")
        full = os.path.join(root, *rel.split("/")) if fs is LOCAL else root.rstrip("/") + "/" + rel
        digest.update(file_sha256(full, fs).encode("ascii"))
    return digest.hexdigest()


def local_files(root: str | os.PathLike) -> list[str]:
    """The files below local ``root``, relative and '/'-separated, in :func:`ordered` order."""
    out = []
    for folder, _dirs, names in os.walk(root):
        rel = os.path.relpath(folder, root)
        for name in names:
            out.append(name if rel == "." else "/".join(rel.split(os.sep) + [name]))
    return ordered(out)


def ordered(rel_paths) -> list[str]:
    """Relative paths sorted by folder, then by name (``sorted(os.walk(root))`` order: the
    folder strings sort as the walk's root paths do)."""
    return sorted(rel_paths, key=lambda p: (p.rpartition("/")[0], p.rpartition("/")[2]))


def json_sha256(obj) -> str:
    """Hex SHA-256 of ``obj`` as JSON with sorted keys: equal values give equal digests."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
