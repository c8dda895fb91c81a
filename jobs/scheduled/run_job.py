"""`capfilt run-job JOB.yaml` — a scheduled ingest → curate → release job, run incrementally.

Each step is the ordinary command, called in this process with config objects
(``options.Call``), and runs only when its inputs changed since the last run:

* **ingest** (URL lists only): a list file is downloaded into ``ROOT/raw/<list name>/`` when it
  is new or its SHA-256 changed (the old download is replaced);
* **curate**: runs when there are raw shards it has not seen. Curate itself skips the shards
  it finished (and re-curates one whose output name changed because another shard of its
  name arrived); when a seen shard changed or vanished, or the curate settings or model files
  changed, or (URL lists) the list's curate output was made from an earlier download, it runs
  with ``--overwrite``;
* **release**: rebuilt when the curated shards' hashes, the eval files' hashes or the release
  settings differ from the last ``ROOT/release/manifest.json``.

A run with nothing new calls no step and writes no file. What the job has seen is kept in
``ROOT/run-job-state.json`` (rewritten only when it changes); a lock file keeps two runs of one
job apart. Exit codes: see ``EXIT_CODES`` and docs/scheduling.md.

Crash safety. A run can be killed anywhere (kill -9, a lost machine), so the state file is
written atomically (temporary file, fsync, rename) at every step boundary, never only at the
end: a record is dropped before the work it describes starts and written back once that work
is finished. So a re-run never trusts a half-done download, and does not download a list
again that was finished (img2dataset writes rows in completion order: a second download of
the same list differs in bytes from the first, and curate rightly refuses to resume over a
changed input). ``curated_from`` records, per URL list, which download of the list its curate
output directory was made from; a curate output from an earlier download (or of unknown
origin, as left by a version that lost its state on a kill) is curated again with
``--overwrite``, one from the current download is resumed.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob as globlib
import json
import logging
import shutil
import sys
from pathlib import Path

from capfilt.jobs import options
from capfilt.jobs.options import Call
from capfilt.jobs.scheduled.job_file import (
    EXIT_ACCOUNTING, EXIT_BUSY, EXIT_CODES, EXIT_CONFIG, EXIT_OK, EXIT_STEP, Job, JobError, check_environment,
    load_job, release_config,
)
from capfilt.transforms.files import atomic, locks
from capfilt.transforms.files.hashing import file_sha256, json_sha256
DESCRIPTION = """\
Run the job described by JOB.yaml: ingest (for URL lists) -> curate -> release, each step only
when its inputs changed since the last run (new raw shards, changed settings or models, new
curated shards or eval files). A second run with nothing new does nothing and changes no file.
JOB.yaml holds `name`, `output_root`, `inputs` (`shards` or `url_lists`), `models` (captioner,
filter, clip) and one section per step (`ingest.options`, `curate`, `release`) whose keys are
that command's options with _ for -; paths are relative to the job file. A typo in a key is a
config error naming the closest known key.

exit codes:
""" + "\n".join(f"  {k}  {v}" for k, v in EXIT_CODES.items())
STATE_FILE, LOCK_FILE = "run-job-state.json", ".run-job.lock"
log = logging.getLogger("capfilt.run_job")


@dataclasses.dataclass
class RunJobOptions:
    job: Path = dataclasses.field(metadata={
        "help": "the job file (paths in it are relative to it)", "positional": True, "flag": "JOB.yaml",
        "type": Path})
    dry_run: bool = dataclasses.field(default=False, metadata={"help": "say which steps would run, run none"})
    allow_process_environment: bool = dataclasses.field(default=False, metadata={
        "help": "let the job file's curate.beam_options start Beam's SDK workers by running a command "
                "(--environment_type PROCESS, the subprocess harness); without it a job file cannot make "
                "run-job execute a program"})


def add_arguments(parser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    options.add_arguments(parser, RunJobOptions)


# -- fingerprints ---------------------------------------------------------------------------
def _sha256(path: Path, cache: dict) -> str:
    """SHA-256 of a file, reusing the last run's value while its size and mtime are unchanged."""
    st = path.stat()
    hit = cache.get(str(path))
    if hit and hit["size"] == st.st_size and hit["mtime_ns"] == st.st_mtime_ns:
        return hit["sha256"]
    digest = file_sha256(path)
    cache[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    return digest


def _recorded(curated: Path) -> list[dict]:
    """The shards a curate output's manifest.json records (none before its first run)."""
    from capfilt.pipeline.release.manifest import recorded_shards

    return recorded_shards(curated) if (curated / "manifest.json").is_file() else []


def _model_stamp(spec: str) -> list:
    """Cheap change detector for a model: its files' names, sizes and mtimes (hub ids: the id)."""
    from capfilt.model.specs import ModelSpec

    path = ModelSpec.parse(spec).path
    if path is None or not path.exists():
        return [spec]
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [spec] + [[str(p.relative_to(path) if path.is_dir() else p.name), p.stat().st_size, p.stat().st_mtime_ns]
                     for p in files]


# -- steps ----------------------------------------------------------------------------------
def call(step) -> int:
    """Run one step in this process: ``step()`` gives its ``Call`` (its configs are built here,
    so that a value the step refuses is its error too). Returns the step's exit code; its error
    is printed the way `capfilt` prints it."""
    from capfilt.jobs.cli import error_line, exit_code

    command = "?"
    try:
        step = step()
        command = step.command
        log.info("run-job: capfilt %s", " ".join(step))
        return step.run()
    except Exception as exc:  # noqa: BLE001 - any error of a step is that step's exit code
        print(error_line(command, exc), file=sys.stderr)
        return exit_code(exc)


def _failed(code: int, what: str) -> JobError:
    """The JobError for a step that exited with ``code``. A step's exit 2 is its own config or
    usage error (an option it refuses, a URL list without the caption column, a shard with a
    missing column): retrying cannot fix it, so it is run-job's config error (2), not a step
    failure (3) that a scheduler would retry."""
    if code == EXIT_CONFIG:
        return JobError(EXIT_CONFIG, f"{what} failed: the step refused its options or input (its exit 2)")
    return JobError(EXIT_STEP, f"{what} failed")


def _files(pattern: str, what: str, ext: str | None = None) -> list[Path]:
    found = sorted(Path(p) for p in globlib.glob(pattern, recursive=True) if Path(p).is_file())
    if ext:
        found = [p for p in found if p.name.endswith(ext)]
    if not found:
        raise JobError(EXIT_CONFIG, f"{what} {pattern!r} matches no file")
    return found


def _has_files(path: Path) -> bool:
    """Whether ``path`` is a directory holding any file (a killed run may leave empty folders)."""
    return path.is_dir() and any(p.is_file() for p in path.rglob("*"))


def ingest_step(job: Job, state, dry: bool) -> list[str]:
    from capfilt.pipeline.ingest.download import IngestConfig

    if not job.url_lists:
        return []
    done, ran = state.setdefault("ingest", {}), []
    for lst in _files(job.url_lists, "inputs.url_lists"):
        out = job.root / "raw" / lst.stem
        sha = _sha256(lst, state.setdefault("hashes", {}))
        if done.get(str(lst)) == sha and out.is_dir():
            continue
        ran.append(f"ingest {lst.name}")
        if dry:
            continue
        # Forget the old download before deleting it: a run killed during the new download must
        # not find its half-written directory recorded as done. A curate output already there
        # was made from an earlier download (or a killed one): it is curated again with
        # --overwrite; an absent one will be made from this download only.
        unit = f"list:{lst.stem}"
        fresh = not _has_files(job.root / "curated" / lst.stem)
        done.pop(str(lst), None)
        state.get("curated_from", {}).pop(unit, None)
        _checkpoint(job, state)
        if out.exists():
            shutil.rmtree(out)  # the list changed (or its download was lost): replace it
        code = call(lambda: Call("ingest", (options.pick(IngestConfig, job.ingest, url_list=str(lst), out=str(out)),),
                                 tuple(job.img2dataset_argv)))
        if code != 0:
            raise _failed(code, f"ingest of {lst}")
        done[str(lst)] = sha
        if fresh:
            state.setdefault("curated_from", {})[unit] = sha
        _checkpoint(job, state)
    return ran


def curate_units(job: Job) -> list[tuple[str, str, Path]]:
    """(state name, input glob, curate --out) per curate run. In URL-list mode each list's
    download is curated into its own directory: img2dataset names every download's shards
    00000.parquet, ..., and one curate output cannot hold two input shards of the same name."""
    if job.shards:
        return [("shards", job.shards, job.root / "curated")]
    lists = _files(job.url_lists, "inputs.url_lists")
    return [(f"list:{p.stem}", str(job.root / "raw" / p.stem / f"*{job.raw_ext}"), job.root / "curated" / p.stem)
            for p in lists]


def _downloads(job: Job, state) -> dict[str, str]:
    """URL-list mode: {curate unit name: recorded SHA-256 of the list whose finished download
    it reads}; empty in shards mode."""
    if job.shards:
        return {}
    done = state.get("ingest", {})
    return {f"list:{p.stem}": done[str(p)] for p in _files(job.url_lists, "inputs.url_lists") if str(p) in done}


def curate_step(job: Job, state, dry: bool) -> list[str]:
    from capfilt.pipeline.curate.options import CurateConfig

    signature = json_sha256([job.curate_argv, job.beam_argv] + [_model_stamp(m) for m in job.models.values()])
    ran, record = [], state.setdefault("curate", {})
    downloads = _downloads(job, state)
    for name, pattern, out in curate_units(job):
        shards = _files(pattern, "inputs.shards" if job.shards else "ingested raw shards")
        now = {str(p): _sha256(p, state.setdefault("hashes", {})) for p in shards}
        seen = record.get(name, {}) if (out / "stats.json").is_file() else {}
        changed = [p for p, h in seen.get("inputs", {}).items() if now.get(p) != h]
        download = downloads.get(name)
        # URL lists: an output whose files may come from another download of the list must not
        # be resumed. It is known to match when it was started on this download (curated_from),
        # or when its last finished curate read exactly these shard hashes.
        stale = (download is not None and state.get("curated_from", {}).get(name) != download
                 and not (seen and not changed) and _has_files(out))
        overwrite = stale or (bool(seen) and (seen.get("signature") != signature or bool(changed)))
        new = [p for p in now if p not in seen.get("inputs", {})]
        if not overwrite and not new:
            continue
        why = ("settings or models changed" if seen.get("signature") not in (None, signature) else
               f"{len(changed)} seen shard(s) changed or vanished" if changed else
               "its output is from an earlier download" if stale else f"{len(new)} new shard(s)")
        label = f"curate{'' if job.shards else ' ' + out.name} ({why})"
        ran.append(label)
        if dry:
            continue
        code = call(lambda: Call("curate", (CurateConfig(inputs=(pattern,), out=str(out), overwrite=overwrite,
                                                         **job.curate),), tuple(job.beam_argv)))
        if code != 0:
            raise _failed(code, f"curate into {out}")
        _check_curate(out, shards)
        record[name] = {"signature": signature, "inputs": now}
        if download is not None:
            state.setdefault("curated_from", {})[name] = download
        _checkpoint(job, state)
    return ran


def _check_curate(out: Path, shards: list[Path]) -> None:
    import pyarrow.parquet as pq

    try:
        stats = json.loads((out / "stats.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise JobError(EXIT_ACCOUNTING, f"{out}/stats.json missing or unreadable after curate ({err})") from err
    n, k, d, e = (stats.get(x) for x in ("input_rows", "kept", "dropped", "errors"))
    if None in (n, k, d, e) or n != k + d + e:
        raise JobError(EXIT_ACCOUNTING, f"{out}/stats.json: input_rows {n} != kept {k} + dropped {d} + errors {e}")
    if all(p.suffix == ".parquet" for p in shards):
        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in shards)
        if rows != n:
            raise JobError(EXIT_ACCOUNTING, f"{out}/stats.json counts {n} input rows, the raw shards hold {rows}")


def release_step(job: Job, state, dry: bool) -> list[str]:
    if job.release is None:
        return []
    from capfilt.jobs.commands import release as release_cmd
    from capfilt.pipeline.release.manifest import AccountingError, check_counts

    curated = [str(out) for _, _, out in curate_units(job)]
    out = job.root / "release"
    cfg = release_config(curated, out, job.release)
    cache = state.setdefault("hashes", {})
    want = {
        # the shards each curate output's manifest names, with the sha256 their writers recorded:
        # no byte is read here, and a file no marker names is never taken for a change
        "shards": [[d, f"shards/{s['name']}", s["sha256"]] for d in curated for s in _recorded(Path(d))],
        "eval": [_sha256(Path(f), cache) for f in sorted(globlib.glob(cfg.decontaminate, recursive=True))]
        if cfg.decontaminate else None,
        "settings": json.loads(json.dumps(cfg.settings())),
    }
    try:
        m = json.loads((out / "manifest.json").read_text())
        have = {"shards": [[i["dir"], s["name"], s["sha256"]] for i in m["inputs"] for s in i["shards"]],
                "eval": [f["sha256"] for f in m["eval_set"]["files"]] if m.get("eval_set") else None,
                "settings": m["settings"]}
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        have = None
    if have == want:
        return []
    if dry:
        return ["release"]
    code = call(lambda: Call("release", (dataclasses.replace(cfg, overwrite=True),)))
    if code == release_cmd.EXIT_ACCOUNTING:
        raise JobError(EXIT_ACCOUNTING, "release counts do not reconcile")
    if code != 0:
        raise _failed(code, "release")
    try:
        check_counts(json.loads((out / "manifest.json").read_text()))
    except AccountingError as err:
        raise JobError(EXIT_ACCOUNTING, str(err)) from err
    return ["release"]


def _applies(step, job: Job) -> bool:
    """Whether the job has the step at all: ingest only for URL lists, release unless false."""
    if step is ingest_step:
        return job.url_lists is not None
    if step is release_step:
        return job.release is not None
    return True


# -- the command ----------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with locks.hold(root / LOCK_FILE, busy=lambda: JobError(EXIT_BUSY, f"another run-job holds {root / LOCK_FILE}")):
        yield


def _save_state(path: Path, state: dict) -> None:
    """Write the state atomically: a run killed while writing leaves the previous file whole."""
    # unchanged: a run with nothing to do writes no file
    atomic.write_json(path, state, indent=2, sort_keys=True, end="\n", only_if_changed=True)


def _checkpoint(job: Job, state: dict) -> None:
    """Persist the state now, at a step boundary: a killed run runs no ``finally``."""
    _save_state(job.root / STATE_FILE, state)


def run(args) -> int:
    job = load_job(Path(args.job))
    check_environment(job.beam_argv, args.allow_process_environment)
    with _locked(job.root):
        state_path = job.root / STATE_FILE
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        done = []
        try:
            for step in (ingest_step, curate_step, release_step):
                if args.dry_run and done:  # an earlier step would change this one's inputs
                    if _applies(step, job):
                        done.append(step.__name__.removesuffix("_step"))
                    continue
                done += step(job, state, args.dry_run)
        finally:
            if not args.dry_run:
                _save_state(state_path, state)
    verb = "would run" if args.dry_run else "ran"
    print(f"run-job {job.name}: " + (f"{verb}: " + ", ".join(done) if done else "nothing to do"))
    return EXIT_OK
