"""The stage records of `capfilt bootstrap`: which stages finished, with which command and inputs.

A bootstrap is a chain of CLI stages (synth, pretrain, finetune, curate, evaluate) that takes
minutes to hours; a re-run must skip what finished, redo what changed and resume what was cut
short. No library schedules whole CLI commands with these rules (Beam schedules elements inside
one pipeline, torch none), so they live here, in a marker file per stage
(``OUT/stages/<name>.json``).
"""
from __future__ import annotations

import logging
import shutil
import time
import uuid
from pathlib import Path

from capfilt.transforms.files import atomic

log = logging.getLogger(__name__)


class Stages:
    """Runs named stages once.

    A finished stage leaves ``OUT/stages/<name>.json`` with its key (the command), the stamps
    of the stages it read from, and a stamp of its own. It is skipped when all of these still
    match and its outputs exist; otherwise it runs again: from scratch when it had finished
    before (its command or an input changed), resuming when it was interrupted and says it can.
    """

    def __init__(self, out: Path, force: bool = False):
        self.out = out
        self.force = force
        self.dry = False  # only skip: a stage that would run raises WouldRun instead (Bootstrap._parallel)
        self.records: list[dict] = []
        self.stamps: dict[str, str] = {}
        (out / "stages").mkdir(parents=True, exist_ok=True)

    def _marker(self, name: str) -> Path:
        return self.out / "stages" / (name.replace("/", "__") + ".json")

    def run(self, name: str, key, outputs: list[Path], work, out_dir: Path | None = None,
            resumable: bool = False, deps: tuple[str, ...] = ()) -> float:
        """Run `work(resume)` unless stage `name` already finished with the same `key` and
        inputs (`deps`, names of earlier stages) and its `outputs` exist. Returns the stage's
        seconds (those of the earlier run when skipped)."""
        unknown = [d for d in deps if d not in self.stamps]
        if unknown:
            raise RuntimeError(f"stage {name} depends on {unknown}, which have not run")
        key = {"key": key, "deps": {d: self.stamps[d] for d in deps}}
        marker = self._marker(name)
        done = _read_marker(marker)
        if done and done["key"] == key and all(p.exists() for p in outputs) and not self.force:
            log.info("[%s] already done (%.0f s), skipped", name, done["seconds"])
            self.stamps[name] = done["stamp"]
            self.records.append({"stage": name, "seconds": done["seconds"], "skipped": True})
            return done["seconds"]
        if self.dry:
            raise WouldRun(name)
        resume = False
        if out_dir is not None and out_dir.exists():
            if done is not None or self.force or not resumable:
                shutil.rmtree(out_dir)  # a different command or input, or not resumable: start clean
            else:
                resume = True  # interrupted before its marker: continue where it stopped
        marker.unlink(missing_ok=True)
        log.info("[%s] %s", name, "resuming" if resume else "running")
        start = time.perf_counter()
        work(resume)
        seconds = time.perf_counter() - start
        missing = [str(p) for p in outputs if not p.exists()]
        if missing:
            raise RuntimeError(f"stage {name} finished without writing {missing}")
        self.stamps[name] = uuid.uuid4().hex
        write_record(marker, {"key": key, "stamp": self.stamps[name], "seconds": seconds})
        log.info("[%s] done in %.0f s", name, seconds)
        self.records.append({"stage": name, "seconds": seconds, "skipped": False})
        return seconds


def write_record(path: Path, data: dict) -> None:
    """The bootstrap's records (stage markers, configs and evaluation results), indented, keys
    in insertion order, written whole (``transforms.files.atomic``): a kill never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, data, indent=2)


_UNREADABLE = object()


def _read_marker(marker: Path) -> dict | None:
    """A stage's done marker, or None when there is none or it cannot be read (cut short, or
    edited by hand): the stage then runs again."""
    if not marker.is_file():
        return None
    done = atomic.read_json(marker, default=_UNREADABLE)
    if done is _UNREADABLE:
        log.warning("%s is not a readable stage marker: the stage runs again", marker)
        return None
    return done if isinstance(done, dict) and {"key", "stamp", "seconds"} <= set(done) else None


class WouldRun(Exception):
    """Raised by ``Stages.run`` in dry mode for a stage that is not done yet."""
