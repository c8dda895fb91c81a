"""The job file of `capfilt run-job`: read, check and turn into the options of each step.

Everything is checked before any step runs, the way each step checks it: unknown keys, options
the step's config classes do not have (Beam's and img2dataset's parsers check theirs), option
values the step would refuse, options run-job sets itself, and model paths that do not exist.
Paths are relative to the job file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from capfilt.jobs import options

EXIT_OK, EXIT_CONFIG, EXIT_STEP, EXIT_ACCOUNTING, EXIT_BUSY = 0, 2, 3, 4, 5
EXIT_CODES = {
    EXIT_OK: "success, including 'nothing to do'",
    EXIT_CONFIG: "the job file is invalid, or a step refused its options or input (the message names which)",
    EXIT_STEP: "a step (ingest, curate or release) failed",
    EXIT_ACCOUNTING: "a step's counts do not reconcile (curate identity or release counts)",
    EXIT_BUSY: "another run of this job holds its lock",
}


class JobError(Exception):
    """Stops the job with ``code`` (jobs.cli reads ``exit_code``); the message ends with what
    the code means."""

    def __init__(self, code: int, message: str):
        super().__init__(f"{message} (exit {code}: {EXIT_CODES[code]})")
        self.code = self.exit_code = code


TOP_KEYS = {"name", "output_root", "inputs", "models", "ingest", "curate", "release"}
# Options a job may not set: run-job decides them.
RESERVED = {"input", "out", "overwrite", "captioner", "filter", "clip", "url_list", "output_folder"}
INGEST_KEYS = {"options"}


@dataclass
class Job:
    """A checked job file. ``ingest``, ``curate`` and ``release`` hold each step's checked
    options by config field (release None: no release); ``*_argv`` are the same options as a
    command line (logs, and the curate settings' fingerprint), except ``img2dataset_argv`` and
    ``beam_argv``, which are other tools' options in their own syntax."""

    path: Path
    root: Path  # output_root
    name: str
    shards: str | None  # glob of raw shards, or
    url_lists: str | None  # glob of URL list files to ingest
    ingest: dict  # IngestConfig fields
    ingest_argv: list[str]
    img2dataset_argv: list[str]
    raw_ext: str  # extension of ingested shards
    models: dict
    curate: dict  # CurateConfig fields, models included
    curate_argv: list[str]
    beam_argv: list[str]
    release: dict | None  # ReleaseConfig fields
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
    curate, curate_argv, beam = _curate_options(job.get("curate"), models)
    release = job.get("release", {})
    release_options = release_argv = None
    if release is not False:
        release = dict(_section(None if release is True else release, "release"))  # true: the defaults
        if release.get("decontaminate"):
            release["decontaminate"] = _path(base, release["decontaminate"], "release.decontaminate")
        clip = release.pop("clip", None) or models.get("clip")
        if clip:
            release["clip"] = _model(base, clip, "release.clip")
        release_options = _release_options(release)
        release_argv = _flags({k: v for k, v in release.items() if k != "clip"}, "release") + (
            ["--clip", release["clip"]] if clip else [])
    ingest, ingest_argv, img2dataset_argv = _ingest_options(job.get("ingest"))
    return Job(
        path=path, root=root, name=job.get("name") or path.stem,
        shards=_path(base, inputs["shards"], "inputs.shards") if "shards" in inputs else None,
        url_lists=_path(base, inputs["url_lists"], "inputs.url_lists") if "url_lists" in inputs else None,
        ingest=ingest, ingest_argv=ingest_argv, img2dataset_argv=img2dataset_argv,
        raw_ext=".tar" if ingest.get("output_format") == "webdataset" else ".parquet",
        models=models, curate=curate, curate_argv=curate_argv, beam_argv=beam,
        release=release_options, release_argv=release_argv,
    )


def _section(value, where: str) -> dict:
    """A job-file section: a mapping, or empty (``curate:`` with nothing under it)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise JobError(EXIT_CONFIG, f"{where}: expected a mapping of options, got {value!r}")
    return value


def _curate_options(section, models: dict) -> tuple[dict, list[str], list[str]]:
    """(curate options by CurateConfig field, the same as a command line, Beam options),
    checked as `capfilt curate` checks them: CurateConfig's fields and value ranges, and
    Beam's parsers for ``beam_options``."""
    from capfilt.pipeline.curate.options import CurateConfig

    curate = dict(_section(section, "curate"))
    beam = curate.pop("beam_options", None) or []
    if not isinstance(beam, list):
        raise JobError(EXIT_CONFIG, f"curate.beam_options: expected a list like [\"--runner=DirectRunner\"], "
                                    f"got {beam!r}")
    beam = [str(x) for x in beam]
    argv = _flags(curate, "curate") + [a for k in ("captioner", "filter", "clip") if k in models
                                       for a in (f"--{k}", models[k])]
    values = _checked("curate", curate, CurateConfig, "; Beam options go under curate.beam_options")
    values.update(models)
    try:
        CurateConfig(inputs=("x",), out="y", **values)
    except ValueError as err:
        raise JobError(EXIT_CONFIG, f"curate: {err}") from err
    _check_beam(beam)
    return values, argv, beam


def _checked(command: str, mapping: dict, cls, hint: str = "") -> dict:
    """`mapping`'s values by field of `cls`, checked as the step's parser would check them."""
    try:
        values, unknown = options.check_mapping(mapping, cls)
    except ValueError as err:
        raise JobError(EXIT_CONFIG, f"{command}: bad option in the job file ({err})") from err
    if unknown:
        raise JobError(EXIT_CONFIG, f"{command}: unknown options {options.flags(unknown)} in the job file"
                       f"{options.did_you_mean(unknown, options.by_name(cls))}{hint}")
    return values


def _check_beam(beam: list[str]) -> None:
    from capfilt.pipeline.curate.options import _reject_unknown

    try:
        _reject_unknown(beam)
    except ValueError as err:
        raise JobError(EXIT_CONFIG, f"curate.beam_options: {err}") from err


def check_environment(beam: list[str], allowed: bool) -> None:
    """Refuse ``curate.beam_options`` that make Beam run a command (``--environment_type
    PROCESS``, the subprocess harness, a ``process_command`` environment option) unless the
    operator passed ``--allow-process-environment`` on run-job's command line. A job file is
    data a scheduler reads; the commands it may start are the operator's decision."""
    from capfilt.pipeline.curate.options import command_environment

    what = command_environment(beam)
    if what and not allowed:
        raise JobError(EXIT_CONFIG, f"curate.beam_options: {what} makes Beam run a command on this machine; a job "
                                    f"file may not ask for that (pass --allow-process-environment to run-job to "
                                    f"allow it)")


def _ingest_options(section) -> tuple[dict, list[str], list[str]]:
    """(`capfilt ingest`'s own options by IngestConfig field, every option as a command line,
    img2dataset's options) from the ``ingest`` section. The options under ``ingest.options``
    are ingest's own (output_format, url_col, ...) or img2dataset's, checked with IngestConfig's
    fields and the img2dataset option parser `capfilt ingest` uses."""
    from capfilt.pipeline.ingest.download import IngestConfig

    section = _section(section, "ingest")
    bad = set(section) - INGEST_KEYS
    if bad:
        raise JobError(EXIT_CONFIG, f"ingest: unknown keys {sorted(bad)} (allowed: {sorted(INGEST_KEYS)}; "
                                    f"img2dataset options such as image_size go under ingest.options)")
    given = _section(section.get("options"), "ingest.options")
    argv = _flags(given, "ingest.options", false_as_value=True)
    try:
        own, other = options.check_mapping(given, IngestConfig)
    except ValueError as err:
        raise JobError(EXIT_CONFIG, f"ingest: bad option in the job file ({err})") from err
    extra = _flags(other, "ingest.options", false_as_value=True)
    if extra:  # img2dataset options (importing img2dataset only when there are some)
        from capfilt.pipeline.ingest.download import check_download_options, parse_img2dataset_options

        try:
            check_download_options(parse_img2dataset_options(extra))
        except ValueError as err:
            raise JobError(EXIT_CONFIG, f"ingest.options: {err}") from err
    return own, argv, extra


def _release_options(release: dict) -> dict:
    """The release section's options by ReleaseConfig field, value-checked by ReleaseConfig."""
    from capfilt.pipeline.release.build import ReleaseConfig

    allowed = set(options.by_name(ReleaseConfig)) - {"input", "out", "overwrite"}
    bad = set(release) - allowed
    if bad:
        raise JobError(EXIT_CONFIG, f"release: unknown keys {sorted(bad)} (allowed: {sorted(allowed)})")
    values = _checked("release", release, ReleaseConfig)
    release_config(["x"], Path("y"), values)  # value checks (thresholds, ...)
    return values


def release_config(curated: list[str], out: Path, release: dict):
    """The ReleaseConfig of the job's release step."""
    from capfilt.pipeline.release.build import ReleaseConfig

    try:
        return ReleaseConfig(inputs=curated, out=out, **release)
    except ValueError as err:
        raise JobError(EXIT_CONFIG, f"release: {err}") from err
