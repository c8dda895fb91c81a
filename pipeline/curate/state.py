"""The state of a curate output directory: done markers, settings, staging, the run record.

Layout of ``--out``::

    shards/part-<shard>.parquet    curated rows of input shard <shard>
    errors/part-<shard>.parquet    error rows of input shard <shard>
    _state/<shard>.json            done marker: input (path, size, sha256, rows), outputs
                                   (name, size, sha256, rows), counts, the device/precision
                                   each model stage ran with; written last, by the launcher
    _state/settings.json           the settings that decide rows (refused if they change
                                   while a shard is done); also what marks a curate output
    _staging/<run>/receipts/       what the workers wrote for each shard (sizes, sha256s,
                                   counts), turned into markers once the pipeline succeeded
    stats.json  manifest.json      the run record
    .lock                          held while a run works here (local directories)

The workers write each shard's two files under their final names (no rename: object stores
have none that is atomic) and its receipt; the launcher checks the receipts and writes the
markers. A file in ``shards/`` or ``errors/`` that no marker names is a killed run's and is
deleted by the next run; readers (release, run-job) read only the files the markers (and the
manifest built from them) name. A done marker counts only while its two output files exist
with the recorded size: a deleted or truncated output makes its shard pending again instead
of silently missing from the totals. The launcher reads listings, markers and receipts, never
a data byte.

Paths go through Beam's ``FileSystems`` so the layout works on any filesystem Beam knows;
the lock only where the directory is local.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import shutil

from apache_beam.io.filesystems import FileSystems

from capfilt.pipeline.curate.record import check_identity, code_version, comparable, model_record, settings_diff
from capfilt.pipeline.curate.sinks import ShardTarget
from capfilt.pipeline.curate.sources import ShardInfo, output_name
from capfilt.pipeline.files import BEAM, file_sha256, listed_size
from capfilt.transforms.files import atomic, locks, outputs

LOG = logging.getLogger(__name__)
LOCK_NAME = ".lock"


def _same_path(path: str) -> str:
    """A spelling of `path` shared by its other spellings (relative, symlinked) where it is local."""
    return path if "://" in path else os.path.realpath(path)


def _join(*parts: str) -> str:
    return FileSystems.join(*parts)


def read_json(path: str):
    return atomic.read_json(path, BEAM)


def write_json(path: str, obj) -> None:
    """Written whole or not at all (``transforms.files.atomic``), on any file system Beam knows."""
    atomic.write_json(path, obj, BEAM, indent=2, sort_keys=True, end="\n")


def settings_record(cfg, local_runner: bool = True, hashes: dict | None = None) -> dict:
    """What decides the rows: the settings and each model's content hash (call
    :func:`check_models` first). The precision is resolved here only for a `local_runner`
    (``CurateConfig.fingerprint``)."""
    return {
        "settings": cfg.fingerprint(resolve=local_runner),
        "models": {
            "captioner": model_record(cfg.captioner if cfg.use_captioner else None, hashes),
            "filter": model_record(cfg.filter if cfg.use_filter else None, hashes),
            "clip": model_record(cfg.clip, hashes),
        },
    }


def manifest(cfg, settings: dict, markers: list[dict]) -> dict:
    markers = sorted(markers, key=lambda m: m["shard_id"])
    return {
        "code_version": code_version(),
        "models": settings["models"],
        "settings": settings["settings"],
        "thresholds": {"itm_threshold": cfg.itm_threshold if cfg.use_filter else None, "keep_top": cfg.keep_top},
        "seeds": {"run_seed": cfg.seed, "per_sample": "capfilt.transforms.seeding.sample_seed(run_seed, key, index)"},
        "round": cfg.round,
        "inputs": [m["input"] for m in markers],
        "outputs": [o for m in markers for o in (m["curated"], m["errors"])],
        "ran_on": ran_on(markers),
    }


def ran_on(markers: list[dict]) -> dict:
    """{model stage: sorted "device/precision" values} over the done shards, as the workers
    that curated them resolved --device and --precision."""
    out: dict[str, set] = {}
    for marker in markers:
        for stage, used in marker.get("ran_on", {}).items():
            out.setdefault(stage, set()).update(used)
    return {stage: sorted(used) for stage, used in sorted(out.items())}


class OutStore:
    """Reads and updates one ``--out`` directory (see the module docstring)."""

    def __init__(self, out: str):
        self.out = out
        self.local = "://" not in out
        self.shards_dir = _join(out, "shards")
        self.errors_dir = _join(out, "errors")
        self.state_dir = _join(out, "_state")
        self.staging_root = _join(out, "_staging")
        self.settings_path = _join(self.state_dir, "settings.json")
        self._output_problems: dict[str, str | None] = {}  # shard id -> why its outputs are bad

    @contextlib.contextmanager
    def locked(self):
        """Hold ``--out/.lock`` for the run. A directory this call created is removed again
        when the run fails before writing anything in it (a refused run leaves no trace)."""
        if not self.local:
            yield
            return
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ValueError(f"--out {self.out} exists and is not a directory")
        created = not os.path.exists(self.out)
        try:
            os.makedirs(self.out, exist_ok=True)
            lock = locks.acquire(os.path.join(self.out, LOCK_NAME))
        except locks.Busy as err:
            raise locks.Busy(err.path, f"{self.out}: another curate run is working in this directory") from None
        except OSError as err:
            raise ValueError(f"--out {self.out}: cannot create the output directory ({err})") from err
        try:
            try:
                yield
            finally:
                lock.release()
        except BaseException:
            if created and not self._holds_files():
                shutil.rmtree(self.out, ignore_errors=True)
            raise

    def _holds_files(self) -> bool:
        """Whether the local --out holds any file besides the lock (empty folders do not count)."""
        for _root, _dirs, files in os.walk(self.out):
            if any(name != LOCK_NAME for name in files):
                return True
        return False

    def check_is_curate_output(self) -> None:
        """Refuse a non-empty --out that no curate run wrote (no ``_state/settings.json``),
        whatever the flags: cleaning up a killed run, or ``--overwrite``, would delete its
        files. The message names what it is (``transforms.files.outputs``)."""
        if self.local and os.path.exists(self.out) and not os.path.isdir(self.out):
            return  # locked() refuses it, naming the path
        if not self._has(self.out):
            return
        if self.local:
            names = os.listdir(self.out)
        else:
            prefix = self.out.rstrip("/") + "/"  # an object store has keys, no folders
            names = {m.path[len(prefix):].split("/")[0] for m in self._matches(prefix + "**")} - {""}
        outputs.check_own(self.out, outputs.CURATE, "curate", names, BEAM, ignore=(LOCK_NAME,))

    def _ensure(self, path: str) -> None:
        if self.local and not os.path.isdir(path):
            FileSystems.mkdirs(path)  # object stores have no folders: a key's prefix is enough

    def _has(self, folder: str) -> bool:
        """Whether a folder exists: locally a directory; on object stores, any key below it."""
        if self.local:
            return os.path.isdir(folder)
        return bool(FileSystems.match([_join(folder, "**")], limits=[1])[0].metadata_list)

    def _list(self, pattern: str) -> list[str]:
        return sorted(m.path for m in self._matches(pattern))

    @staticmethod
    def _matches(pattern: str) -> list:
        return FileSystems.match([pattern])[0].metadata_list

    def remove(self, path: str) -> None:
        """Delete a file or a folder with everything in it (on object stores: every key below)."""
        if FileSystems.exists(path):
            FileSystems.delete([path])
        elif not self.local:
            below = self._list(_join(path, "**"))
            if below:
                FileSystems.delete(below)

    def reset(self) -> None:
        """--overwrite: delete everything a previous run wrote but ``_state/settings.json``,
        which the run replaces next (``save_settings``): until then it marks --out as a curate
        output, so a run killed in between is not refused as another command's directory."""
        markers = [p for p in self._list(_join(self.state_dir, "*")) if p != self.settings_path]
        for path in (self.shards_dir, self.errors_dir, *markers, self.staging_root,
                     _join(self.out, "stats.json"), _join(self.out, "manifest.json")):
            self.remove(path)

    # -- settings and markers ----------------------------------------------------------------
    def check_settings(self, settings: dict, done: dict) -> None:
        """Refuse settings other than the stored ones while any shard is done (``done``: the
        intact markers). Without a done shard there are no rows to mix with: a run that failed
        before finishing a shard (a model that did not load) must not lock out its retry."""
        path = self.settings_path
        if not done or not FileSystems.exists(path):
            return
        old, new = comparable(read_json(path)), comparable(settings)
        if old != new:
            diff = settings_diff(old, new)
            raise ValueError(
                f"{self.out} was curated with other settings ({'; '.join(diff)}); "
                f"pass --overwrite to start again, or use another --out"
            )

    def save_settings(self, settings: dict) -> None:
        path = self.settings_path
        if FileSystems.exists(path) and comparable(read_json(path)) == comparable(settings):
            return  # unchanged: no write (a re-run with nothing to do changes no file)
        self._ensure(self.state_dir)
        write_json(path, settings)  # differs only when no shard is done (check_settings)

    def markers(self) -> dict[str, dict]:
        if not self._has(self.state_dir):
            return {}
        out = {}
        for path in self._list(_join(self.state_dir, "*.json")):
            if posixpath.basename(path) == "settings.json":
                continue
            marker = read_json(path)
            out[marker["shard_id"]] = marker
        return out

    def output_problem(self, marker: dict) -> str | None:
        """Why a done shard's output files cannot be trusted, or None when they are intact:
        both exist with the marker's size (its sha256 for markers without sizes)."""
        shard_id = marker["shard_id"]
        if shard_id not in self._output_problems:
            self._output_problems[shard_id] = self._find_output_problem(marker)
        return self._output_problems[shard_id]

    def _find_output_problem(self, marker: dict) -> str | None:
        for kind, folder in (("curated", self.shards_dir), ("errors", self.errors_dir)):
            record = marker[kind]
            path = _join(folder, record["name"])
            found = FileSystems.match([path])[0].metadata_list
            if not found:
                return f"{path} is missing"
            if "size" in record:
                if found[0].size_in_bytes != record["size"]:
                    return f"{path} has {found[0].size_in_bytes} bytes, its done marker says {record['size']}"
            elif file_sha256(path) != record["sha256"]:
                return f"{path} does not match the sha256 in its done marker"
        return None

    def intact(self, markers: dict) -> dict:
        """The markers whose outputs are intact; the others are logged and will be redone
        (``clean_incomplete`` deletes them with their remaining files)."""
        out = {}
        for shard_id, marker in markers.items():
            problem = self.output_problem(marker)
            if problem:
                LOG.warning("shard %s is no longer done: %s; it will be curated again", shard_id, problem)
            else:
                out[shard_id] = marker
        return out

    def without_renamed(self, markers: dict, shards: list[ShardInfo]) -> dict:
        """The markers minus those of an input that is now curated under another shard id.

        Shard ids come from file names, and from the path below the common folder once two
        inputs share a name (``pipeline.curate.sources.shard_ids``): when ``raw/b/00000.parquet``
        arrives, ``raw/a/00000.parquet`` turns from ``00000`` into ``a_00000``. Its old outputs
        would count it twice beside the new ones, so its marker is dropped (``clean_incomplete``
        then deletes its files) and the input is curated again under its new id."""
        ids = {_same_path(shard.path): shard.shard_id for shard in shards}
        out = {}
        for shard_id, marker in markers.items():
            new_id = ids.get(_same_path(marker["input"]["path"]))
            if new_id is not None and new_id != shard_id:
                LOG.warning("input %s was curated as shard %s and is shard %s now (another input of the "
                            "same name arrived): it will be curated again under the new name",
                            marker["input"]["path"], shard_id, new_id)
                continue
            out[shard_id] = marker
        return out

    def is_done(self, shard: ShardInfo, markers: dict) -> bool:
        marker = markers.get(shard.shard_id)
        if marker is None or self.output_problem(marker):
            return False
        if marker["input"]["size"] != shard.size:
            raise ValueError(
                f"{shard.path} has {shard.size} bytes but was curated into {self.out} with "
                f"{marker['input']['size']}; the input changed: pass --overwrite or use another --out"
            )
        return True

    def completed_files(self, markers: dict) -> tuple[list[str], list[str]]:
        """The curated and error files of the done shards ``markers`` (kept by the run as it
        commits them: re-reading every marker before each pipeline would cost O(shards²) reads)."""
        return ([_join(self.shards_dir, m["curated"]["name"]) for m in markers.values()],
                [_join(self.errors_dir, m["errors"]["name"]) for m in markers.values()])

    def clean_incomplete(self, markers: dict) -> None:
        """Delete what a killed run left (staging, outputs without a marker, temp files) and
        the markers not in ``markers`` (those whose outputs were found broken)."""
        self.remove(self.staging_root)
        keep = {m[kind]["name"] for m in markers.values() for kind in ("curated", "errors")}
        keep_markers = {f"{shard_id}.json" for shard_id in markers} | {"settings.json"}
        for folder in (self.shards_dir, self.errors_dir, self.state_dir):
            if not self._has(folder):
                continue
            for path in self._list(_join(folder, "*")):
                name = posixpath.basename(path)
                kept = keep_markers if folder == self.state_dir else keep
                stray = atomic.is_temp(name) or name not in kept
                if stray:
                    FileSystems.delete([path])
        for record in ("stats.json", "manifest.json"):  # the run record's temp files (write_json)
            for path in self._list(_join(self.out, f"{record}{atomic.TEMP_INFIX}*")):
                FileSystems.delete([path])

    # -- one shard ------------------------------------------------------------------------
    def staging_dir(self, run_id: str) -> str:
        path = _join(self.staging_root, run_id)
        self._ensure(path)
        return path

    def target(self, staging: str, shard: ShardInfo) -> ShardTarget:
        """Where the pipeline writes a shard: its files under their final names (nothing is
        renamed: on object stores a rename is a copy) and its receipt in the run's staging."""
        name = output_name(shard.shard_id)
        return ShardTarget(shard, _join(self.shards_dir, name), _join(self.errors_dir, name),
                           _join(staging, "receipts", f"{shard.shard_id}.json"))

    def commit(self, target: ShardTarget) -> dict:
        """Turn a shard's receipt into its done marker, after checking the receipt against
        the shard as planned and the two files against the receipt (their listed sizes: no
        data byte is read here). The marker is written last: before it, the files count as
        left by a killed run."""
        shard = target.shard
        if not FileSystems.exists(target.receipt):
            raise RuntimeError(f"shard {shard.path}: the pipeline finished but left no receipt of its "
                               f"outputs ({target.receipt})")
        receipt = read_json(target.receipt)
        counts = receipt["counts"]
        check_identity(counts, f"shard {shard.path} (receipt)")
        if counts["input_rows"] != shard.num_rows or receipt["input"]["size"] != shard.size:
            raise RuntimeError(f"shard {shard.path}: its receipt records {counts['input_rows']} rows and "
                               f"{receipt['input']['size']} bytes, the run planned {shard.num_rows} and {shard.size}")
        for kind, path in (("curated", target.curated), ("errors", target.errors)):
            listed = listed_size(path)
            if listed != receipt[kind]["size"]:
                raise RuntimeError(f"{path}: {'missing' if listed is None else f'{listed} bytes'} after the "
                                   f"pipeline, its receipt says {receipt[kind]['size']} bytes")
        marker = {key: receipt[key] for key in ("shard_id", "input", "curated", "errors", "counts", "ran_on")}
        write_json(_join(self.state_dir, f"{shard.shard_id}.json"), marker)
        self._output_problems.pop(shard.shard_id, None)
        return marker

    # -- the run record -------------------------------------------------------------------
    def last_run(self) -> dict | None:
        path = _join(self.out, "stats.json")
        return read_json(path).get("this_run") if FileSystems.exists(path) else None

    def last_code_version(self) -> str | None:
        """The code version of the last run that curated rows here (manifest.json)."""
        path = _join(self.out, "manifest.json")
        return read_json(path).get("code_version") if FileSystems.exists(path) else None

    def write_record(self, stats: dict, manifest_: dict) -> None:
        """stats.json and manifest.json, each rewritten only when its content changed (a
        re-run with nothing to do changes no file)."""
        for name, obj in (("stats.json", stats), ("manifest.json", manifest_)):
            path = _join(self.out, name)
            if FileSystems.exists(path) and read_json(path) == json.loads(json.dumps(obj)):
                continue
            write_json(path, obj)
