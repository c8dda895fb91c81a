"""Where a release is written: what an existing --out may be, and the staging swap.

A release is built in ``.NAME.partial`` beside ``out`` and renamed over it at the end, the old
release parked as ``.NAME.old`` for the moment of the swap, so a failed or killed build never
leaves half a release in ``out``. Those two side names may hold only what a build left there
(the staging marker, or a finished release); anything else is refused rather than deleted.
The swap is ``transforms.files.staging``'s, with fixed side names and a marker: one build at a
time per --out, and its leftovers told from a user's files after a kill -9.
"""
from __future__ import annotations

import glob as globlib
from pathlib import Path

from capfilt.pipeline.release import manifest as release_manifest
from capfilt.transforms.files import outputs
from capfilt.transforms.files.staging import Staging

# Written into the staging directory so that a later build knows a leftover `.NAME.partial`
# is its own and may delete it; removed just before the rename into place.
STAGE_MARKER = ".capfilt-release-partial"


def _staging(out: Path) -> Staging:
    """``.NAME.partial`` (marked) and ``.NAME.old`` beside ``out``; a finished release there is
    a build's too (killed after the marker was removed, or parked during the swap)."""
    return Staging(out, marker=STAGE_MARKER, note="staging directory of `capfilt release`; safe to delete\n",
                   unique=False, owned=release_manifest.is_release_dir)


def check_release_out(out: Path, overwrite: bool, decontaminate: str | None) -> None:
    """Refuse an --out this build must not replace: a directory another command wrote (or
    that holds files no capfilt command wrote), whatever the flags, naming what it is
    (``transforms.files.outputs``); an earlier release or an empty directory without --overwrite."""
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory; --overwrite only replaces a release")
    outputs.check_own(out, outputs.RELEASE, "release")
    if not overwrite:
        raise ValueError(f"release output {out} exists; pass --overwrite to replace it")
    _check_sides(out)
    if decontaminate:  # the eval set is read before the swap would delete it
        inside = [f for f in globlib.glob(decontaminate, recursive=True)
                  if out.resolve() in Path(f).resolve().parents]
        if inside:
            raise ValueError(f"--decontaminate file {inside[0]} is inside --out {out}, which the release replaces")


def _check_sides(out: Path) -> None:
    """The staging and old-release names beside ``out`` may only hold what a build left there."""
    for side in _staging(out).foreign():
        raise ValueError(f"{side} is in the way of --out {out} and was not left by a release build; move it away")


def stage_dir(out: Path) -> Path:
    """Create the staging directory beside ``out``. Called before any expensive work, so an
    unwritable --out fails at once with a ValueError naming the path."""
    _check_sides(out)
    staging = _staging(out)
    error = f"cannot write the release to --out {out}"
    try:
        staging.clean_leftovers()  # left by a crashed build; a parked release goes back first
    except OSError as err:
        raise ValueError(f"{error}: creating {staging.stage} failed ({err.strerror or err})") from err
    stage = staging.create(error)
    try:
        (stage / "shards").mkdir()
    except OSError as err:
        raise ValueError(f"{error}: creating {stage} failed ({err.strerror or err})") from err
    return stage


def swap_into_place(stage: Path, out: Path) -> None:
    """Rename the finished ``stage`` (from :func:`stage_dir`) over ``out``."""
    _staging(out).swap()


def discard_stage(out: Path) -> None:
    """Delete a failed build's staging directory (claimed first, so a kill meanwhile leaves
    something the next build recognises)."""
    _staging(out).discard()
