"""The job file of `capfilt run-job`: read, check and turn into the argv of each step.

Everything is checked before any step runs, the way each step checks it: unknown keys, options
the step's own parser does not know (Beam's and img2dataset's parsers included), option values
the step would refuse, options run-job sets itself, and model paths that do not exist. Paths
are relative to the job file.
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
RESERVED = {"input", "out", "overwrite", "captioner", "filter", "clip", "url_list", "output_folder"}
INGEST_KEYS = {"options"}
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


def _flags(options: dict, where: str, false_as_value: bool = False) -> list[str]:
    """{"num_captions": 4, "no_filter": True} -> ["--num-captions", "4", "--no-filter"].

    ``false_as_value``: for img2dataset options, whose booleans take a value and may default to
    true, False is passed as ``false`` (not dropped), None as ``none`` and lists comma-joined,
    the spelling `capfilt ingest` parses.
    """
    argv = []
    for key, value in sorted(options.items()):
        if key in RESERVED:
            raise JobError(EXIT_CONFIG, f"{where}.{key}: set by run-job itself; remove it from the job file")
        flag = "--" + key.replace("_", "-")
        if isinstance(value, list) and false_as_value:
            argv += [flag, ",".join(str(v) for v in value)]
        elif value is True:
            argv.append(flag)
        elif value is False and false_as_value:
            argv += [flag, "false"]
        elif value is None and false_as_value:
            argv += [flag, "none"]
        elif value not in (False, None):
            argv += [flag, str(value)]
    return argv


def _path(base: Path, value, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise JobError(EXIT_CONFIG, f"{where}: expected a path or glob, got {value!r}")
    return value if Path(value).is_absolute() else str(base / value)


def _model(base: Path, value, where: str) -> str:
    """A local model path made absolute against the job file, else a hub id / open_clip spec as
    written. A spec written as a path that is not there is a config error (``model.specs``
    says which specs are paths, relative to the job file's directory)."""
    from capfilt.model.specs import ModelSpec

    if not isinstance(value, str) or not value:
        raise JobError(EXIT_CONFIG, f"{where}: expected a model id or directory, got {value!r}")
    spec = ModelSpec.parse(value, base=base)
    if not spec.local:
        return value
    if spec.path.exists():
        return str(spec)
    raise JobError(EXIT_CONFIG, f"{where}: model path {value!r} does not exist (looked for {spec.path}; "
                                f"relative paths are relative to the job file)")


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
    models = dict(_section(job.get("models"), "models"))
    if set(models) - {"captioner", "filter", "clip"}:
        raise JobError(EXIT_CONFIG, f"models: unknown kinds {sorted(set(models) - {'captioner', 'filter', 'clip'})}")
    models = {kind: _model(base, spec, f"models.{kind}") for kind, spec in models.items()}
    curate_argv, beam = _curate_argv(job.get("curate"), models)
    release = job.get("release", {})
    release_argv = None
    if release is not False:
        release = dict(_section(None if release is True else release, "release"))  # true: the defaults
        bad = set(release) - RELEASE_KEYS
        if bad:
            raise JobError(EXIT_CONFIG, f"release: unknown keys {sorted(bad)} (allowed: {sorted(RELEASE_KEYS)})")
        if release.get("decontaminate"):
            release["decontaminate"] = _path(base, release["decontaminate"], "release.decontaminate")
        clip = release.pop("clip", None) or models.get("clip")
        release_argv = _flags(release, "release") + (["--clip", _model(base, clip, "release.clip")] if clip else [])
        _check_options("release", release_argv)
        release_config(["x"], Path("y"), release_argv)  # value checks (thresholds, ...)
    ingest_argv, output_format = _ingest_argv(job.get("ingest"))
    return Job(
        path=path, root=root, name=job.get("name") or path.stem,
        shards=_path(base, inputs["shards"], "inputs.shards") if "shards" in inputs else None,
        url_lists=_path(base, inputs["url_lists"], "inputs.url_lists") if "url_lists" in inputs else None,
        ingest_argv=ingest_argv, raw_ext=".tar" if output_format == "webdataset" else ".parquet",
        models=models, curate_argv=curate_argv, beam_argv=beam, release_argv=release_argv,
    )


def _section(value, where: str) -> dict:
    """A job-file section: a mapping, or empty (``curate:`` with nothing under it)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise JobError(EXIT_CONFIG, f"{where}: expected a mapping of options, got {value!r}")
    return value


def _curate_argv(section, models: dict) -> tuple[list[str], list[str]]:
    """(curate options, Beam options), checked as `capfilt curate` would check them: its parser,
    the CurateConfig it builds (value ranges), and Beam's parsers for ``beam_options``."""
    from capfilt.jobs.commands import curate as curate_cmd

    curate = dict(_section(section, "curate"))
    beam = curate.pop("beam_options", None) or []
    if not isinstance(beam, list):
        raise JobError(EXIT_CONFIG, f"curate.beam_options: expected a list like [\"--runner=DirectRunner\"], "
                                    f"got {beam!r}")
    beam = [str(x) for x in beam]
    argv = _flags(curate, "curate") + [a for k in ("captioner", "filter", "clip") if k in models
                                       for a in (f"--{k}", models[k])]
    args = _check_options("curate", argv)
    try:
        curate_cmd.config_from_args(args)
    except ValueError as err:
        raise JobError(EXIT_CONFIG, f"curate: {err}") from err
    _check_beam(beam)
    return argv, beam


def _check_beam(beam: list[str]) -> None:
    from capfilt.pipeline.curate.options import _reject_unknown

    try:
        _reject_unknown(beam)
    except ValueError as err:
        raise JobError(EXIT_CONFIG, f"curate.beam_options: {err}") from err


def _ingest_argv(section) -> tuple[list[str], str]:
    """(`capfilt ingest` options, its output format) from the ``ingest`` section. The options
    under ``ingest.options`` are ingest's own (output_format, url_col, ...) or img2dataset's,
    checked with ingest's parser and the img2dataset option parser it uses."""
    section = _section(section, "ingest")
    bad = set(section) - INGEST_KEYS
    if bad:
        raise JobError(EXIT_CONFIG, f"ingest: unknown keys {sorted(bad)} (allowed: {sorted(INGEST_KEYS)}; "
                                    f"img2dataset options such as image_size go under ingest.options)")
    options = _section(section.get("options"), "ingest.options")
    argv = _flags(options, "ingest.options", false_as_value=True)
    args = _check_options("ingest", argv, known_only=False)
    if args.extra:  # img2dataset options (importing img2dataset only when there are some)
        from capfilt.pipeline.ingest.download import check_download_options, parse_img2dataset_options

        try:
            check_download_options(parse_img2dataset_options(args.extra))
        except ValueError as err:
            raise JobError(EXIT_CONFIG, f"ingest.options: {err}") from err
    return argv, args.output_format


def _check_options(command: str, argv: list[str], known_only: bool = True) -> argparse.Namespace:
    """Parse a step's options with its own parser now, so a typo fails before any work.
    ``known_only=False``: leave the options it does not declare in ``.extra`` (ingest hands
    them to img2dataset)."""
    from capfilt.jobs.cli import parse_options

    required = ["--url-list", "x", "--out", "y"] if command == "ingest" else ["--input", "x", "--out", "y"]
    try:
        args, unknown = parse_options(command, required + argv)
    except ValueError as err:
        raise JobError(EXIT_CONFIG, f"{command}: bad option in the job file ({err})") from err
    if unknown and known_only:
        hint = "; Beam options go under curate.beam_options" if command == "curate" else ""
        raise JobError(EXIT_CONFIG, f"{command}: unknown options {unknown} in the job file{hint}")
    args.extra = unknown
    return args


def release_config(curated: list[str], out: Path, release_argv: list[str]):
    """The ReleaseConfig `capfilt release` would build from these options."""
    from capfilt.jobs import cli
    from capfilt.jobs.commands import release as release_cmd

    argv = ["release", "--input", *curated, "--out", str(out)] + release_argv
    try:
        return release_cmd.config_from_args(cli.build_parser().parse_args(argv))
    except ValueError as err:
        raise JobError(EXIT_CONFIG, f"release: {err}") from err
