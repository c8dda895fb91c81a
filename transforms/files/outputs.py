"""What wrote a directory: the mark each capfilt command leaves in its output.

A command replaces (``--overwrite``) or writes into only an output of its own; anything else is
refused, whatever the flags, with a message naming what the directory is. The marks:

==========  ======================================================  ==============================
kind        mark (relative to the directory)                        written by
==========  ======================================================  ==============================
curate      ``_state/settings.json``                                ``capfilt curate``
release     ``manifest.json`` whose ``format`` is ``capfilt-release/N``  ``capfilt release``
ingest      ``.capfilt-ingest/``, or img2dataset's ``NNNNN_stats.json``  ``capfilt ingest``, img2dataset
synth       ``synth_config.json``                                   ``capfilt synth``
model       ``config.json`` with ``architectures``, ``open_clip_config.json`` or ``tower.json``
                                                                    ``models init``, ``convert``,
                                                                    training exports
training    ``checkpoints/``, ``RUN_log.jsonl`` or ``RUN_summary.json``  ``pretrain``, ``finetune``
bootstrap   ``stages/`` with ``report.json``                        ``capfilt bootstrap``
run-job     ``run-job-state.json``                                  ``capfilt run-job``
==========  ======================================================  ==============================

The marks are checked in this order, the first found wins (a curate output also holds a
``manifest.json``, without a release ``format``). Reads go through a file-system object
(``exists``, ``open``: ``transforms.files.atomic.Files``) so that a curate output on object
storage is recognised the same way.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Iterable

from capfilt.transforms.files import atomic

CURATE, RELEASE, INGEST, SYNTH, MODEL, TRAINING, BOOTSTRAP, RUN_JOB = (
    "curate", "release", "ingest", "synth", "model", "training", "bootstrap", "run-job")
RELEASE_FORMAT = "capfilt-release/"  # the prefix of a release manifest's `format`
INGEST_DIR = ".capfilt-ingest"
# What one command's --out must be to be written into or replaced: "an empty directory or ...".
OWN = {CURATE: "a curate output", RELEASE: "a release", INGEST: "an ingest output", SYNTH: "a synthetic world",
       MODEL: "a model directory", TRAINING: "a training run's output"}
_IMG2DATASET_STATS = re.compile(r"\d{5,}_stats\.json")
_SHOWN = 5


@dataclass(frozen=True)
class Found:
    kind: str  # one of the kinds above
    what: str  # "a capfilt release (manifest.json format capfilt-release/1)"


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if "://" in root else os.path.join(root, name)


def _json(path: str, fs) -> dict:
    data = atomic.read_json(path, fs, default=None) if fs.exists(path) else None
    return data if isinstance(data, dict) else {}


def local_names(root: str | os.PathLike) -> list[str]:
    """The entries directly in local directory ``root`` (none when it is not a directory)."""
    try:
        return sorted(os.listdir(root))
    except OSError:
        return []


def identify(root: str | os.PathLike, names: Iterable[str] | None = None, fs: atomic.Files = atomic.LOCAL) -> Found | None:
    """Which capfilt command wrote directory ``root`` (see the module docstring); None when no
    mark is there. ``names``: the entries directly in ``root`` (listed here for a local one)."""
    root = os.fspath(root)
    names = set(local_names(root) if names is None else names)
    if fs.exists(_join(root, "_state/settings.json")):
        return Found(CURATE, "a capfilt curate output (it has _state/settings.json)")
    if "manifest.json" in names:
        fmt = str(_json(_join(root, "manifest.json"), fs).get("format", ""))
        if fmt.startswith(RELEASE_FORMAT):
            return Found(RELEASE, f"a capfilt release (manifest.json format {fmt})")
    if INGEST_DIR in names:
        return Found(INGEST, f"a capfilt ingest output (it has {INGEST_DIR}/)")
    stats = sorted(n for n in names if _IMG2DATASET_STATS.fullmatch(n))
    if stats:
        return Found(INGEST, f"an img2dataset download (it has {stats[0]})")
    if "synth_config.json" in names:
        return Found(SYNTH, "a synthetic world of capfilt synth (it has synth_config.json)")
    if "config.json" in names:
        arch = (_json(_join(root, "config.json"), fs).get("architectures") or [None])[0]
        if arch:
            return Found(MODEL, f"a model directory ({arch})")
    for name, what in (("open_clip_config.json", "an open_clip model directory"),
                       ("tower.json", "a BLIP-2 Q-Former directory")):
        if name in names:
            return Found(MODEL, f"{what} (it has {name})")
    runs = sorted(n for n in names if n.endswith(("_log.jsonl", "_summary.json")))
    if runs or "checkpoints" in names:
        return Found(TRAINING, f"a pretrain or finetune output (it has {(runs or ['checkpoints/'])[0]})")
    if "stages" in names and "report.json" in names:
        return Found(BOOTSTRAP, "a capfilt bootstrap output (it has stages/ and report.json)")
    if "run-job-state.json" in names:
        return Found(RUN_JOB, "a capfilt run-job root (it has run-job-state.json)")
    return None


def check_own(out: str | os.PathLike, kind: str, command: str, names: Iterable[str] | None = None,
              fs: atomic.Files = atomic.LOCAL, ignore: Iterable[str] = (), what: str = "--out",
              unmarked_ok: bool = False) -> None:
    """Refuse a non-empty directory ``out`` that is not an output of ``kind``, whatever the
    flags: ValueError naming what it is (or a few of its entries when nothing of ours wrote it).
    ``names``: its entries (listed here for a local one); ``ignore``: entries that do not
    count (a lock file); ``what``: how the message calls ``out``; ``unmarked_ok``: a directory
    with no mark passes (the caller checks its entries itself)."""
    out = os.fspath(out)
    names = sorted(set(local_names(out) if names is None else names) - set(ignore))
    if not names:
        return
    found = identify(out, names, fs)
    if found is not None and found.kind == kind:
        return
    if found is not None:
        raise ValueError(f"{what} {out} is {found.what}, not {OWN[kind]}; {command} writes only into an "
                         f"empty directory or {OWN[kind]}, whatever the flags: choose another {what}")
    if unmarked_ok:
        return
    shown = ", ".join(names[:_SHOWN]) + (", ..." if len(names) > _SHOWN else "")
    raise ValueError(f"{what} {out} is not empty ({shown}) and no capfilt command wrote it; {command} writes "
                     f"only into an empty directory or {OWN[kind]}, whatever the flags: choose another {what}")
