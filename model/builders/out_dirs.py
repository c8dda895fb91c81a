"""Model directories written whole or not at all: `capfilt convert` and `capfilt models init`
build into a hidden sibling directory that replaces the output only when everything was written,
so a failed run leaves no half-written model (a config beside missing weights) behind."""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from glob import escape as glob_escape
from pathlib import Path

from capfilt.transforms.files.procs import pid_alive


def check_output_dir(out: Path, overwrite: bool, what: str = "output directory") -> None:
    """ValueError when ``out`` is a file, or a non-empty directory and not ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{what} {out} is a file, not a directory")
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise ValueError(f"{what} {out} is not empty (pass overwrite=True / --overwrite to replace it)")


@contextlib.contextmanager
def staged_dir(out: str | Path, replace: bool = True):
    """Yield a new sibling directory of ``out`` to write into. When the block succeeds it becomes
    ``out``: an existing ``out`` is replaced when ``replace``, else the staged entries are moved
    into it (replacing same-named ones). When the block raises, the sibling is deleted and
    ``out`` is left as it was, so a failed run leaves nothing half-written behind."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output directory {out} is a file, not a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise ValueError(f"cannot create output directory {out}: a parent is a file ({exc})") from exc
    _remove_dead_leftovers(out)
    # a hidden name in the same directory: the final rename stays on one filesystem
    stage = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if not out.exists():
        stage.rename(out)
    elif not any(out.iterdir()):
        out.rmdir()
        stage.rename(out)
    elif replace:
        old = stage.with_name(stage.name.replace(".partial-", ".old-"))
        out.rename(old)  # out is never missing for long, and old stays whole until the swap is done
        stage.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        for entry in stage.iterdir():
            target = out / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
        stage.rmdir()


def _remove_dead_leftovers(out: Path) -> None:
    """Delete the staging (and parked old) siblings of ``out`` that a killed run left: their
    name carries the writer's pid, and a pid that is no longer alive will not finish them. A
    live pid's sibling is another run at work and stays."""
    for kind in ("partial", "old"):
        for path in out.parent.glob(f".{glob_escape(out.name)}.{kind}-*-*"):
            pid = path.name[len(f".{out.name}.{kind}-"):].split("-")[0]
            if pid.isdigit() and not pid_alive(int(pid)) and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
