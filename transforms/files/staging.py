"""Directories written whole or not at all: built beside the target, renamed into place.

A run writes into a side directory next to ``out`` (same file system, so the final rename is
atomic) and swaps it in only once everything is written; a failed run deletes it and leaves
``out`` as it was. Side names::

    .NAME.partial-PID-XXXXXXXX   the new directory (unique: runs of one out may overlap)
    .NAME.old-PID-XXXXXXXX       the previous out, parked for the moment of the swap
    .NAME.partial / .NAME.old    the same with fixed names (one build at a time)

With ``inner``, the new directory is ``STAGE/<inner>`` and the previous out is parked as
``STAGE/old``, so everything a kill can leave is in one side directory.

A kill -9 runs no cleanup, so the next run recognises what a dead run left: a side directory
of this ``out``'s name that is ours (it holds ``marker`` or :data:`DELETING`, or the name alone
claims it when there is no marker, or ``owned(path)`` says so, or it is empty: killed before it
was marked or after it was emptied) and whose writer is gone (its pid, in unique names). A
parked previous ``out`` goes back into place when ``out`` is missing (a kill between the two
renames of the swap); the rest is deleted. Side directories that are not ours are never deleted.

Deleting a side directory is not atomic: a kill part-way through leaves some of its files,
possibly without the marker or the manifest that claimed it. So a side directory is first
claimed for deletion (the :data:`DELETING` file is written into it), its other entries are
deleted, and that file goes last; whatever state a kill leaves, the directory is either
claimed or empty, and the next run finishes the deletion (it never puts such a directory back
as ``out``). No library does this swap (``shutil`` and ``tempfile`` have no rename-into-place
of a directory nor leftover recognition).
"""
from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable

from capfilt.transforms.files.procs import pid_alive

# Written into a side directory before it is deleted, and deleted last (see the module docstring).
DELETING = ".capfilt-deleting"


def _present(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _doomed(path: Path) -> bool:
    return (path / DELETING).is_file()


def _remove(path: Path) -> None:
    """Delete side entry ``path``: a link or file at once (whatever a link points at is not ours
    to delete); a directory claimed first, its claim deleted last."""
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    claim = path / DELETING
    if not claim.is_file():
        claim.write_text("being deleted by a capfilt staging swap; safe to delete\n")
    for entry in path.iterdir():
        if entry.name == DELETING:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    claim.unlink()
    path.rmdir()


class Staging:
    """One staged write of directory ``out`` (see the module docstring).

    ``marker``: a file name written into the new side directory that claims it (removed before
    the swap when the side directory itself becomes ``out``); ``note``: its text. ``unique``:
    pid and random suffix in the side names. ``inner``: build in ``STAGE/<inner>``, park inside.
    ``owned``: also claims a side directory (e.g. a finished release)."""

    def __init__(self, out: str | Path, *, marker: str | None = None, note: str = "", unique: bool = True,
                 inner: str | None = None, owned: Callable[[Path], bool] | None = None):
        if marker is not None and unique and inner is None:
            # the swap removes the marker and parks out unmarked beside it: a kill there would
            # leave side directories nothing claims
            raise ValueError("a marker with unique side names needs inner")
        self.out = Path(out)
        self.marker, self.note, self.unique, self.inner, self.owned = marker, note, unique, inner, owned
        suffix = f"-{os.getpid()}-{uuid.uuid4().hex[:8]}" if unique else ""
        self.stage = self.side("partial", suffix)
        self.content = self.stage / inner if inner else self.stage  # what becomes out
        self.parked = self.stage / "old" if inner else self.side("old", suffix)

    def side(self, kind: str, suffix: str = "") -> Path:
        return self.out.parent / f".{self.out.name}.{kind}{suffix}"

    # -- what other runs left --------------------------------------------------------------
    def ours(self, path: Path) -> bool:
        """Whether side directory ``path`` was left by a run of this kind (not its liveness)."""
        if path.is_symlink() or not path.is_dir():
            return False
        if self.marker is None or (path / self.marker).is_file() or _doomed(path) or not any(path.iterdir()):
            return True
        return self.owned is not None and self.owned(path)

    def _sides(self) -> list[Path]:
        """Side entries of ``out``'s name left by runs that are gone (unique names: their pid;
        fixed names: any present), parked ones first (a parked out is restored first)."""
        if self.unique:
            pattern = re.compile(rf"\.{re.escape(self.out.name)}\.(old|partial)-(\d+)-[0-9a-f]{{8}}")
            found = []
            if self.out.parent.is_dir():
                for path in self.out.parent.iterdir():
                    match = pattern.fullmatch(path.name)  # not a glob: the name may hold [ or *
                    if match and int(match[2]) > 0 and not pid_alive(int(match[2])):
                        found.append((match[1], path))
            return [path for _kind, path in sorted(found)]
        return [path for path in (self.side("old"), self.side("partial")) if _present(path)]

    def foreign(self) -> list[Path]:
        """Side entries of fixed name that are in the way: present and not ours."""
        return [path for path in (self.side("partial"), self.side("old"))
                if not self.unique and _present(path) and not self.ours(path)]

    def clean_leftovers(self) -> list[Path]:
        """Put back a previous ``out`` that a killed swap parked, and delete the side
        directories that dead runs left. Returns the deleted ones."""
        removed = []
        for path in self._sides():
            if not self.ours(path):
                continue
            if self.inner:
                parked = path / "old"
            else:
                parked = path if path.name.startswith(f".{self.out.name}.old") else None
            # a side directory claimed for deletion is never put back: part of it may be gone
            if (parked is not None and parked.is_dir() and not (_doomed(path) or _doomed(parked))
                    and not _present(self.out)):
                parked.rename(self.out)
            if _present(path):
                _remove(path)
                removed.append(path)
        return removed

    # -- this run ----------------------------------------------------------------------------
    def create(self, error: str | None = None) -> Path:
        """Make the new side directory (and its parent) and mark it; returns where to write.
        When that fails: ValueError ``"<error>: creating <stage> failed (<why>)"`` given an
        ``error``, else the OSError."""
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.stage.mkdir()
            if self.marker is not None:
                (self.stage / self.marker).write_text(self.note)
            if self.inner:
                self.content.mkdir()
        except OSError as err:
            if error is None:
                raise
            raise ValueError(f"{error}: creating {self.stage} failed ({err.strerror or err})") from err
        return self.content

    def swap(self, replace: bool = True) -> None:
        """Make the new directory ``out``. A non-empty ``out`` is parked and deleted after the
        swap when ``replace`` (put back if the rename fails); otherwise the new entries are moved
        into it, replacing same-named ones."""
        if self.marker is not None and not self.inner:
            (self.stage / self.marker).unlink()
        occupied = self.out.is_symlink() or (self.out.exists() and any(self.out.iterdir()))
        if occupied and not replace:
            for entry in self.content.iterdir():
                target = self.out / entry.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(entry, target)
            self.content.rmdir()
            return
        if occupied:
            if _present(self.parked):
                _remove(self.parked)  # fixed names: an earlier build's, claimed by the caller's checks
            self.out.rename(self.parked)
        try:
            self.content.replace(self.out)  # rename(2) also replaces an empty directory
        except BaseException:
            if _present(self.parked) and not _present(self.out):
                self.parked.rename(self.out)  # the previous out goes back
            raise
        if _present(self.parked):
            _remove(self.parked)

    def discard(self) -> None:
        """Delete what this run staged (nothing once the swap is done)."""
        if self.stage.is_dir() and not self.stage.is_symlink():
            try:
                _remove(self.stage)
            except OSError:
                shutil.rmtree(self.stage, ignore_errors=True)
