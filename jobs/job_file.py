"""The job file of `capfilt run-job`: read, check and turn into the argv of each step.

Everything is checked before any step runs: unknown keys, options the step's own parser does
not know, option values the step would refuse, and options run-job sets itself. Paths are
relative to the job file.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

EXIT_CONFIG = 2  # the exit code of run-job for an invalid job file


class JobError(Exception):
    """Stops the job with ``code``."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


TOP_KEYS = {"name", "output_root", "inputs", "models", "ingest", "curate", "release"}
# Options a job may not set: run-job decides them.
RESERVED = {"input", "out", "overwrite", "captioner", "filter", "clip", "url_list"}
RELEASE_KEYS = {"dedup_threshold", "decontaminate", "decontaminate_threshold", "rows_per_shard",
                "webdataset", "index", "clip", "seed", "batch_size", "no_report"}


@dataclass
class Job:
    """A checked job file. ``*_argv`` are the step options (release_argv None: no release)."""

    path: Path
    root: Path  # output_root
    name: str
    shards: str | None  # glob of raw shards, or
    url_lists: str | None  # glob of URL list files to ingest
    ingest_argv: list[str]
    raw_ext: str  # extension of ingested shards
    models: dict
    curate_argv: list[str]
    beam_argv: list[str]
    release_argv: list[str] | None


def _flags(options: dict, where: str) -> list[str]:
    """{"num_captions": 4, "no_filter": True} -> ["--num-captions", "4", "--no-filter"]."""
    argv = []
    for key, value in sorted(options.items()):
        if key in RESERVED:
            raise JobError(EXIT_CONFIG, f"{where}.{key}: set by run-job itself; remove it from the job file")
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value not in (False, None):
            argv += [flag, str(value)]
    return argv


def _path(base: Path, value, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise JobError(EXIT_CONFIG, f"{where}: expected a path or glob, got {value!r}")
    return value if Path(value).is_absolute() else str(base / value)


def _model(base: Path, value, where: str) -> str:
    """A local model path relative to the job file, else a hub id / open_clip NAME:PRETRAINED."""
    if not isinstance(value, str) or not value:
        raise JobError(EXIT_CONFIG, f"{where}: expected a model id or directory, got {value!r}")
    prefix, rest = ("local-dir:", value[10:]) if value.startswith("local-dir:") else ("", value)
    return prefix + str(base / rest) if (base / rest).exists() else value


def load_job(path: Path) -> Job:
    """Read and check the job file; returns it with paths resolved and step argv built."""
    import yaml

    try:
        job = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise JobError(EXIT_CONFIG, f"{path}: cannot read the job file ({err})") from err
    if not isinstance(job, dict):
        raise JobError(EXIT_CONFIG, f"{path}: expected a mapping at the top level")
    unknown = set(job) - TOP_KEYS
    if unknown:
        raise JobError(EXIT_CONFIG, f"{path}: unknown keys {sorted(unknown)} (allowed: {sorted(TOP_KEYS)})")
    base = path.resolve().parent
    if "output_root" not in job:
        raise JobError(EXIT_CONFIG, f"{path}: output_root is required")
    root = Path(_path(base, job["output_root"], "output_root"))
    inputs = job.get("inputs") or {}
    if not isinstance(inputs, dict) or len(set(inputs) & {"shards", "url_lists"}) != 1 or set(inputs) - {"shards", "url_lists"}:
        raise JobError(EXIT_CONFIG, f"{path}: inputs needs exactly one of 'shards' (glob of raw shards) "
                                    f"or 'url_lists' (glob of URL list files)")
    models = dict(job.get("models") or {})
    if set(models) - {"captioner", "filter", "clip"}:
        raise JobError(EXIT_CONFIG, f"models: unknown kinds {sorted(set(models) - {'captioner', 'filter', 'clip'})}")
    models = {kind: _model(base, spec, f"models.{kind}") for kind, spec in models.items()}
    curate = dict(job.get("curate") or {})
    beam = [str(x) for x in curate.pop("beam_options", []) or []]
    curate_argv = _flags(curate, "curate") + [a for k in ("captioner", "filter", "clip") if k in models
                                               for a in (f"--{k}", models[k])]
    _check_options("curate", curate_argv)
    release = job.get("release", {})
    release_argv = None
    if release is not False:
        release = dict(release or {})
        bad = set(release) - RELEASE_KEYS
        if bad:
            raise JobError(EXIT_CONFIG, f"release: unknown keys {sorted(bad)} (allowed: {sorted(RELEASE_KEYS)})")
        if release.get("decontaminate"):
            release["decontaminate"] = _path(base, release["decontaminate"], "release.decontaminate")
        clip = release.pop("clip", None) or models.get("clip")
        release_argv = _flags(release, "release") + (["--clip", _model(base, clip, "release.clip")] if clip else [])
        _check_options("release", release_argv)
        release_config(["x"], Path("y"), release_argv)  # value checks (thresholds, ...)
    ingest_opts = (job.get("ingest") or {}).get("options") or {}
    return Job(
        path=path, root=root, name=job.get("name") or path.stem,
        shards=_path(base, inputs["shards"], "inputs.shards") if "shards" in inputs else None,
        url_lists=_path(base, inputs["url_lists"], "inputs.url_lists") if "url_lists" in inputs else None,
        ingest_argv=_flags(ingest_opts, "ingest.options"),
        raw_ext=".tar" if ingest_opts.get("output_format") == "webdataset" else ".parquet",
        models=models, curate_argv=curate_argv, beam_argv=beam, release_argv=release_argv,
    )


def _check_options(command: str, argv: list[str]) -> None:
    """Parse a step's options with its own parser now, so a typo fails before any work."""
    module = __import__(f"jobs.{command}", fromlist=["add_arguments"])
    parser = argparse.ArgumentParser(prog=f"capfilt {command}", add_help=False, exit_on_error=False)
    module.add_arguments(parser)
    try:
        _, unknown = parser.parse_known_args(["--input", "x", "--out", "y"] + argv)
    except (argparse.ArgumentError, SystemExit) as err:
        raise JobError(EXIT_CONFIG, f"{command}: bad option in the job file ({err})") from err
    if unknown:
        raise JobError(EXIT_CONFIG, f"{command}: unknown options {unknown} in the job file")


def release_config(curated: list[str], out: Path, release_argv: list[str]):
    """The ReleaseConfig `capfilt release` would build from these options."""
    from jobs import cli, release as release_cmd

    argv = ["release", "--input", *curated, "--out", str(out)] + release_argv
    try:
        return release_cmd.config_from_args(cli.build_parser().parse_args(argv))
    except ValueError as err:
        raise JobError(EXIT_CONFIG, f"release: {err}") from err
