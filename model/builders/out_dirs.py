"""Model directories written whole or not at all: `capfilt convert` and `capfilt models init`
build into a hidden sibling directory that replaces the output only when everything was written,
so a failed run leaves no half-written model (a config beside missing weights) behind."""
from __future__ import annotations

import contextlib
from pathlib import Path

from capfilt.transforms.files import modes, outputs
from capfilt.transforms.files.staging import Staging


def check_output_dir(out: Path, overwrite: bool, what: str = "output directory", merge: bool = False,
                     command: str = "this command") -> None:
    """ValueError when ``out`` is a file, or a non-empty directory that is not a model
    directory (``transforms.files.outputs``: named, whatever the flags), or a non-empty model
    directory and not ``overwrite``. ``merge``: a non-empty ``out`` is written into as it is
    (the library default of ``init_model``, for directories its caller owns)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{what} {out} is a file, not a directory")
    if merge and not overwrite or not out.is_dir():
        return
    outputs.check_own(out, outputs.MODEL, command, what=what)
    if not overwrite and any(out.iterdir()):
        raise ValueError(f"{what} {out} is not empty (pass overwrite=True / --overwrite to replace it)")


@contextlib.contextmanager
def staged_dir(out: str | Path, replace: bool = True):
    """Yield a new sibling directory of ``out`` to write into. When the block succeeds it becomes
    ``out``: an existing ``out`` is replaced when ``replace``, else the staged entries are moved
    into it (replacing same-named ones). When the block raises, the sibling is deleted and
    ``out`` is left as it was, so a failed run leaves nothing half-written behind. Siblings that
    killed runs left (their pid is gone) are deleted first (`transforms.files.staging`)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output directory {out} is a file, not a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise ValueError(f"cannot create output directory {out}: a parent is a file ({exc})") from exc
    staging = Staging(out)  # no marker: `.NAME.partial-PID-X` beside a model directory is ours
    staging.clean_leftovers()
    stage = staging.create()
    try:
        yield stage
        modes.respect_umask(stage)  # safetensors writes its files 0600, whatever the umask
    except BaseException:
        staging.discard()
        raise
    staging.swap(replace=replace)
