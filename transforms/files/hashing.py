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


def dir_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 over a local directory: every file's path relative to ``path`` and the hex
    SHA-256 of its bytes, in walk order with names sorted (renaming or editing a file changes it)."""
    digest = hashlib.sha256()
    for root, _dirs, files in sorted(os.walk(path)):
        for name in sorted(files):
            full = os.path.join(root, name)
            digest.update(os.path.relpath(full, path).encode("utf-8") + b"\0")
            digest.update(file_sha256(full).encode("ascii"))
    return digest.hexdigest()


def json_sha256(obj) -> str:
    """Hex SHA-256 of ``obj`` as JSON with sorted keys: equal values give equal digests."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
