"""Beam's ``FileSystems`` as the file-system object of ``transforms.files`` (atomic writes,
hashes), so curate's state and hashes work on every path Beam knows (local, ``s3://``,
``gs://``) through the one implementation. On object stores a rename is a copy and a delete,
not atomic: curate's done markers, not renames, decide what is final (DESIGN.md, "Runners")."""
from __future__ import annotations

from apache_beam.io.filesystems import FileSystems

from capfilt.transforms.files import hashing


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


BEAM = BeamFiles()


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file on any file system Beam knows."""
    return hashing.file_sha256(path, BEAM)
