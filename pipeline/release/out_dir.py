"""Where a release is written: what an existing --out may be, and the staging swap.

A release is built in ``.NAME.partial`` beside ``out`` and renamed over it at the end, the old
release parked as ``.NAME.old`` for the moment of the swap, so a failed or killed build never
leaves half a release in ``out``. Those two side names may hold only what a build left there
(the staging marker, or a finished release); anything else is refused rather than deleted.
``model.out_dirs.staged_dir`` does the same for model directories, but a release needs its own
marker and fixed side names to tell its leftovers from a user's files after a kill -9.
"""
from __future__ import annotations

import glob as globlib
import shutil
from pathlib import Path

from capfilt.pipeline.release import manifest as release_manifest

# Written into the staging directory so that a later build knows a leftover `.NAME.partial`
# is its own and may delete it; removed just before the rename into place.
STAGE_MARKER = ".capfilt-release-partial"


def _ours(path: Path) -> bool:
    """A directory this build may delete: a staging leftover, a finished release, or an empty
    directory (a build killed between creating its staging directory and marking it)."""
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return True
    return (path / STAGE_MARKER).is_file() or release_manifest.is_release_dir(path)


def _remove(path: Path) -> None:
    if path.is_symlink():
        path.unlink()  # the link only; whatever it points at is not ours to delete
    else:
        shutil.rmtree(path)


def check_out(out: Path, overwrite: bool, decontaminate: str | None) -> None:
    """Refuse an --out this build must not replace: anything without --overwrite; with it,
    anything but an empty directory or a capfilt release (manifest.json `format`)."""
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise ValueError(f"release output {out} exists; pass --overwrite to replace it")
    if not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory; --overwrite only replaces a release")
    if any(out.iterdir()) and not release_manifest.is_release_dir(out):
        raise ValueError(f"--out {out} is not empty and not a capfilt release (its manifest.json has no "
                         f"format {release_manifest.FORMAT}); --overwrite only replaces a release: "
                         f"choose another --out or empty {out} yourself")
    for side in (out.parent / f".{out.name}.partial", out.parent / f".{out.name}.old"):
        _check_side(side, out)
    if decontaminate:  # the eval set is read before the swap would delete it
        inside = [f for f in globlib.glob(decontaminate, recursive=True)
                  if out.resolve() in Path(f).resolve().parents]
        if inside:
            raise ValueError(f"--decontaminate file {inside[0]} is inside --out {out}, which the release replaces")


def _check_side(side: Path, out: Path) -> None:
    """The staging and old-release names beside ``out`` may only hold what a build left there."""
    if (side.exists() or side.is_symlink()) and not _ours(side):
        raise ValueError(f"{side} is in the way of --out {out} and was not left by a release build; move it away")


def stage_dir(out: Path) -> Path:
    """Create the staging directory beside ``out``. Called before any expensive work, so an
    unwritable --out fails at once with a ValueError naming the path."""
    stage = out.parent / f".{out.name}.partial"
    try:
        if stage.exists() or stage.is_symlink():
            _check_side(stage, out)
            _remove(stage)  # left by a crashed build; never a finished release
        stage.mkdir(parents=True)
        (stage / STAGE_MARKER).write_text("staging directory of `capfilt release`; safe to delete\n")
        (stage / "shards").mkdir()
    except OSError as err:
        raise ValueError(f"cannot write the release to --out {out}: creating {stage} failed "
                         f"({err.strerror or err})") from err
    return stage


def swap_into_place(stage: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old"
    if old.exists() or old.is_symlink():
        _remove(old)  # check_out confirmed it is a release (a crash between the renames below)
    if out.exists() or out.is_symlink():
        out.rename(old)
    (stage / STAGE_MARKER).unlink()
    stage.rename(out)
    if old.exists() or old.is_symlink():
        _remove(old)
