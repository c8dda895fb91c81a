"""Options of one curate run: :class:`CurateConfig` (ours) and Beam's ``PipelineOptions``.

Our options live in a dataclass so that the graph, the handlers and the run record read one
validated object; Beam's options are passed through untouched, so the same command runs on
the local runner, Dataflow, Flink or Spark. Two things are added on the Beam side:

* the runner defaults to ``FnApiRunner`` named explicitly: Beam's own default on a machine
  without a runner configured tries to download the Prism binary;
* a runner named by its full class path (``--runner my.module.MyRunner``) has its module
  imported first, so that the options classes it declares are known;
* arguments that no Beam options class knows are an error, not a warning. Everything our
  parser does not recognise ends up here, so a mistyped capfilt option (``--num-caption``)
  would otherwise be silently dropped.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from dataclasses import dataclass, field

from apache_beam.options.pipeline_options import (
    DebugOptions,
    DirectOptions,
    PipelineOptions,
    StandardOptions,
    WorkerOptions,
)

from capfilt.model.inference.captioner import CaptionConfig
from capfilt.model.tokens import ITM_FIRST_TOKENS
from capfilt.pipeline.curate.precision import DEFAULT_CLIP_MARGIN, DEFAULT_ITM_MARGIN, PRECISIONS, resolve_precision
from capfilt.transforms.image import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, DRAFT_SIDE
from capfilt.transforms.text import DEFAULT_MAX_WORDS

DEFAULT_RUNNER = "FnApiRunner"
# The groups `capfilt curate --help` lists the options in.
IO, CAPFILT, CHECKS = "input and output", "CapFilt", "input checks"
MODELS = "models (a hub id or a local directory; CLIP also NAME:PRETRAINED)"
RUN = "execution (plus any Beam pipeline option)"


def _opt(group: str, help: str, **more) -> dict:
    return {"group": group, "help": help, **more}

# Runners that execute in (or next to) this process: the progress line can read their
# per-worker counters from a local directory.
LOCAL_RUNNERS = ("FnApiRunner", "DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner")


@dataclass(frozen=True)
class CurateConfig:
    """Everything `capfilt curate` needs besides Beam's own options; the fields with a ``help``
    are the command's options (jobs/options.py derives its parser from them).

    Fields that change the curated rows (models, sampling, thresholds, seed, round, ablations,
    decode limits, precision) form the run's fingerprint (:meth:`fingerprint`); the others (batch size,
    grouping, progress, model sharing) only change how fast the rows are produced.
    """

    inputs: tuple[str, ...] = field(metadata=_opt(
        IO, "raw shards: a glob of .parquet or .tar files (repeatable)", flag="--input", action="append",
        metavar="GLOB"))
    out: str = field(metadata=_opt(IO, "output directory", metavar="DIR"))
    captioner: str | None = field(default=None, metadata=_opt(
        MODELS, "BLIP captioning model (not needed with --no-synthetic)", metavar="M"))
    filter: str | None = field(default=None, metadata=_opt(
        MODELS, "BLIP or BLIP-2 ITM model (not needed with --no-filter)", metavar="M"))
    clip: str | None = field(default=None, metadata=_opt(MODELS, "open_clip ranker", metavar="M"))
    # Sampling (BLIP's defaults are the captioner's; BLIP-2 sampled 10 captions per image).
    num_captions: int = field(default=10, metadata=_opt(CAPFILT, "synthetic captions per image", metavar="N"))
    prompt: str = field(default=CaptionConfig.prompt, metadata=_opt(
        CAPFILT, "captioner prompt (stripped from the output)"))
    top_p: float = field(default=CaptionConfig.top_p, metadata=_opt(CAPFILT, "nucleus sampling mass", metavar="P"))
    top_k: int = field(default=CaptionConfig.top_k, metadata=_opt(
        CAPFILT, "captioner: sample among the K most probable tokens, before the top-p cut; 0 turns it off "
        "(50: transformers 4.15's default, which BLIP's sampling kept)", metavar="K"))
    max_length: int = field(default=CaptionConfig.max_length, metadata=_opt(
        CAPFILT, "caption tokens, prompt included"))
    min_length: int = field(default=CaptionConfig.min_length, metadata=_opt(
        CAPFILT, "caption tokens, prompt included"))
    repetition_penalty: float = field(default=CaptionConfig.repetition_penalty, metadata=_opt(
        CAPFILT, "captioner: transformers' repetition penalty on tokens already in the caption (prompt "
        "included): 1 is none, > 1 discourages repeats; must be > 0 (BLIP: 1.1)", metavar="R"))
    # Selection.
    itm_threshold: float = field(default=0.5, metadata=_opt(
        CAPFILT, "a caption passes the filter when its ITM p(match) >= T", metavar="T"))
    itm_first_token: str = field(default="enc", metadata=_opt(
        CAPFILT, "BLIP filter: the token its ITM text starts with. enc: [ENC], as BLIP trained and scored "
        "(when the filter's vocabulary has no [ENC], [CLS], with a warning); cls: [CLS], as transformers' "
        "BlipForImageTextRetrieval feeds it. BLIP-2 filters read [CLS] either way", choices=ITM_FIRST_TOKENS))
    keep_top: int = field(default=2, metadata=_opt(
        CAPFILT, "keep the K passing captions with the highest CLIP cosine", metavar="K"))
    seed: int = field(default=0, metadata=_opt(
        CAPFILT, "run seed; caption i of key k samples with sample_seed(S, k, i)", metavar="S"))
    round: int = field(default=0, metadata=_opt(IO, "bootstrap round written to every row"))
    no_synthetic: bool = field(default=False, metadata=_opt(CAPFILT, "ablation: no captioner, web captions only"))
    no_filter: bool = field(default=False, metadata=_opt(CAPFILT, "ablation: no ITM filter, rank every candidate"))
    no_images: bool = field(default=False, metadata=_opt(
        IO, "leave the jpg column null in curated shards (key/url/sha256 reference the input)"))
    # Decode limits and caption cleaning (transforms.image / transforms.text).
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata=_opt(CHECKS, "larger images are errors"))
    min_side: int = field(default=DEFAULT_MIN_SIDE, metadata=_opt(CHECKS, "smaller images are errors"))
    max_aspect: float = field(default=DEFAULT_MAX_ASPECT, metadata=_opt(CHECKS, "longer/shorter side limit"))
    max_words: int = field(default=DEFAULT_MAX_WORDS, metadata=_opt(
        CHECKS, "web captions are cut to this many words"))
    # Execution.
    batch_size: int = field(default=8, metadata=_opt(RUN, "images per model call", metavar="B"))
    device: str = field(default="auto", metadata=_opt(MODELS, "auto, cpu or cuda[:N]"))
    precision: str = field(default="auto", metadata=_opt(  # pipeline.precision
        MODELS, "fp32; bf16 (all models, fastest, decisions may change); bf16-checked (captioner fp32, "
        "filter and ranker bf16, images whose decision a bf16 error could flip are scored again in fp32); "
        "auto (default): bf16-checked where the hardware has native bf16, else fp32. Measured: plain "
        "bf16 changed 12-25 %% of the selected captions, bf16-checked none", choices=PRECISIONS))
    itm_margin: float = field(default=DEFAULT_ITM_MARGIN, metadata=_opt(  # ITM scores this close get fp32
        MODELS, "bf16-checked: ITM scores within E of --itm-threshold are recomputed in fp32", metavar="E"))
    clip_margin: float = field(default=DEFAULT_CLIP_MARGIN, metadata=_opt(  # CLIP error assumed per score
        MODELS, "bf16-checked: CLIP rankings with neighbours within 2E are recomputed in fp32", metavar="E"))
    # Beam's ModelHandler options for several SDK worker processes on one GPU (docs/curate.md).
    share_model_across_processes: bool = field(default=False, metadata=_opt(
        RUN, "one copy of each model per machine, served to all its worker processes (Beam's "
        "multi_process_shared) instead of one per process; copies: --model-copies"))
    model_copies: int | None = field(default=None, metadata=_opt(
        RUN, "N copies of each model per machine, shared by its worker processes in turn (implies "
        "--share-model-across-processes; default 1 when shared)", metavar="N"))
    large_model: bool = field(default=False, metadata=_opt(
        RUN, "Beam's large_model: each model fits once per machine, so one shared copy serves every "
        "worker process (as --share-model-across-processes; refuses --model-copies above 1)"))
    torch_threads: int | None = field(default=None, metadata=_opt(  # None: torch's default
        RUN, "torch threads per worker process (default: cores / workers)"))
    shards_per_pipeline: int = field(default=8, metadata=_opt(
        RUN, "input shards per Beam pipeline (the unit of resume after a crash)"))
    overwrite: bool = field(default=False, metadata=_opt(
        IO, "delete OUT's previous curate output first (default: resume, skipping done shards); a "
        "directory another command wrote is refused even so"))
    progress_every: float = field(default=5.0, metadata=_opt(
        RUN, "seconds between progress lines", metavar="SECONDS"))
    extra: dict = field(default_factory=dict)
    # Set by the launcher, not by a flag: SDK processes per worker machine as the runner's
    # options say (torch threads default to each one's share of the cores, on the worker).
    worker_processes: int | None = None

    def __post_init__(self):
        if not self.inputs:
            raise ValueError("--input: at least one glob is needed")
        if not self.out:
            raise ValueError("--out: an output directory is needed")
        if not self.no_synthetic and not self.captioner:
            raise ValueError("--captioner is required unless --no-synthetic is given")
        if not self.no_filter and not self.filter:
            raise ValueError("--filter is required unless --no-filter is given")
        if not self.clip:
            raise ValueError("--clip is required (the ranker always runs)")
        _check_range("--num-captions", self.num_captions, 0 if self.no_synthetic else 1, 1000)
        _check_range("--top-p", self.top_p, 0.0, 1.0)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"--top-k must be an integer >= 0 (0: off), got {self.top_k!r}")
        if self.itm_first_token not in ITM_FIRST_TOKENS:
            raise ValueError(f"--itm-first-token must be one of {', '.join(ITM_FIRST_TOKENS)}, "
                             f"got {self.itm_first_token!r}")
        _check_range("--itm-threshold", self.itm_threshold, 0.0, 1.0)
        _check_range("--keep-top", self.keep_top, 1, 1000)
        _check_range("--batch-size", self.batch_size, 1, 100_000)
        _check_range("--shards-per-pipeline", self.shards_per_pipeline, 1, 100_000)
        _check_range("--round", self.round, 0, 2**31 - 1)
        _check_range("--max-words", self.max_words, 1, 100_000)
        # Out-of-range values would not fail here but turn every row into an error row (decode
        # limits) or every caption into garbage (sampling), and the run would still exit 0.
        _check_min("--max-length", self.max_length, 1)
        _check_min("--min-length", self.min_length, 0)
        if self.min_length > self.max_length:
            raise ValueError(f"--min-length {self.min_length} exceeds --max-length {self.max_length}")
        if isinstance(self.repetition_penalty, bool) or not self.repetition_penalty > 0:
            raise ValueError(f"--repetition-penalty must be > 0, got {self.repetition_penalty!r}")
        _check_min("--max-pixels", self.max_pixels, 1)
        _check_min("--min-side", self.min_side, 1)
        _check_min("--max-aspect", self.max_aspect, 1)  # longer side / shorter side is never below 1
        if self.torch_threads is not None:
            _check_min("--torch-threads", self.torch_threads, 1)
        if self.model_copies is not None:
            _check_range("--model-copies", self.model_copies, 1, 1000)
            if self.large_model and self.model_copies > 1:
                raise ValueError(f"--model-copies {self.model_copies} with --large-model: a large model is loaded "
                                 f"once per machine; drop one of the two")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        _check_range("--itm-margin", self.itm_margin, 0.0, 1.0)
        _check_range("--clip-margin", self.clip_margin, 0.0, 2.0)
        if self.progress_every <= 0:
            raise ValueError(f"--progress-every must be > 0 seconds, got {self.progress_every}")

    @property
    def shares_models(self) -> bool:
        """Whether each model is loaded once (or ``--model-copies`` times) per machine and served
        to every worker process, as Beam's ``ModelHandler`` decides from the three options."""
        return self.share_model_across_processes or self.large_model or self.model_copies is not None

    def model_sharing(self) -> dict:
        """How the models are held (not a row setting: the fingerprint leaves it out), for the
        run record: ``{"per": "process"}`` or ``{"per": "machine", "copies": N}``."""
        if not self.shares_models:
            return {"per": "process"}
        return {"per": "machine", "copies": self.model_copies or 1}

    @property
    def use_captioner(self) -> bool:
        return not self.no_synthetic

    @property
    def use_filter(self) -> bool:
        return not self.no_filter

    def absolute(self) -> "CurateConfig":
        """The same run with every local path (input globs, --out, model paths) absolute: Beam
        workers run in their own processes and working directories. URLs stay as written."""
        from capfilt.model.specs import absolute_spec

        def path(p: str) -> str:
            return p if "://" in p else os.path.abspath(os.path.expanduser(p))

        def model(spec: str | None) -> str | None:
            return None if spec is None else absolute_spec(spec)

        return self.replace(inputs=tuple(path(p) for p in self.inputs), out=path(self.out),
                            captioner=model(self.captioner), filter=model(self.filter), clip=model(self.clip))

    def fingerprint(self, resolve: bool = True) -> dict:
        """The settings that decide the curated rows (written to the manifest and compared
        when a run resumes into an existing --out). ``resolve``: the launcher runs where the
        workers do (a local runner), so "auto" precision is resolved here; else it is recorded
        as asked and the workers decide."""
        keys = (
            "captioner", "filter", "clip", "num_captions", "prompt", "top_p", "top_k", "max_length",
            "min_length", "repetition_penalty", "itm_threshold", "itm_first_token", "keep_top", "seed",
            "round", "no_synthetic", "no_filter", "no_images", "max_pixels", "min_side", "max_aspect",
            "max_words",
        )
        fp = {k: getattr(self, k) for k in keys}
        # Resolved, not as asked: "auto" means bf16-checked on one machine and fp32 on another,
        # and a resume must not mix their rows (bf16 scores differ in the last digits; plain
        # bf16 also changes captions). The margins decide which bf16 scores are redone in fp32.
        fp["decode_draft_side"] = DRAFT_SIDE  # large JPEGs are decoded reduced to at least this side
        fp["precision"] = resolve_precision(self.precision, self.device) if resolve else self.precision
        checked = fp["precision"] in ("bf16-checked", "auto")
        fp["itm_margin"] = self.itm_margin if checked and self.use_filter else None
        fp["clip_margin"] = self.clip_margin if checked else None
        if self.no_synthetic:  # sampling settings are irrelevant without a captioner
            for k in ("captioner", "num_captions", "prompt", "top_p", "top_k", "max_length", "min_length",
                      "repetition_penalty"):
                fp[k] = None
        if self.no_filter:
            fp["filter"] = None
            fp["itm_threshold"] = None
            fp["itm_first_token"] = None
        return fp

    def replace(self, **changes) -> "CurateConfig":
        return dataclasses.replace(self, **changes)


def _check_range(name: str, value, lo, hi) -> None:
    if isinstance(value, bool) or not (lo <= value <= hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")


def _check_min(name: str, value, lo) -> None:
    if isinstance(value, bool) or not value >= lo:  # `not >=` also rejects NaN
        raise ValueError(f"{name} must be >= {lo}, got {value!r}")


def make_pipeline_options(beam_args: list[str] | None) -> PipelineOptions:
    """Beam options from pass-through arguments, with the runner named explicitly.

    Raises ValueError listing any argument that no Beam options class declares.
    """
    args = list(beam_args or [])
    _import_runner_module(args)
    _reject_unknown(args)
    options = PipelineOptions(args)
    std = options.view_as(StandardOptions)
    if not std.runner:
        std.runner = DEFAULT_RUNNER
    worker = options.view_as(WorkerOptions)
    if not worker.default_sdk_harness_log_level:
        # Worker processes log every bundle at INFO; the progress line says what matters.
        worker.default_sdk_harness_log_level = "WARNING"
    return options


# Beam environments that start SDK workers by running a command on this machine.
_COMMAND_ENVIRONMENTS = ("PROCESS", "BEAM:ENV:PROCESS:V1", "BEAM:ENV:HARNESS_SUBPROCESS_PYTHON:V1")


def command_environment(beam_args: list[str]) -> str | None:
    """The Beam option among `beam_args` that makes Beam run a command to start its SDK workers
    (``--environment_type PROCESS``, the subprocess harness, a ``process_command`` environment
    option), or None."""
    opts = PipelineOptions(list(beam_args)).get_all_options(drop_default=True)
    kind = str(opts.get("environment_type") or "")
    if kind.upper() in _COMMAND_ENVIRONMENTS:
        return f"--environment_type {kind}"
    return next((str(o) for o in opts.get("environment_options") or [] if str(o).startswith("process_command")),
                None)


def make_runner(options: PipelineOptions):
    """A new instance of the ``--runner`` of `options` (a name Beam knows or a full class
    path); ValueError naming it when it cannot be created. Called before --out is touched,
    so a refused runner leaves no trace."""
    from apache_beam.runners.runner import PipelineRunner, create_runner

    runner = options.view_as(StandardOptions).runner
    if isinstance(runner, PipelineRunner):
        return runner
    try:
        return create_runner(runner)
    except Exception as err:  # unknown name, failed import, a constructor that raises
        message = " ".join(str(err).split())
        raise ValueError(f"--runner {runner}: cannot create it ({type(err).__name__}: {message})") from err


def runner_name(options: PipelineOptions) -> str:
    """The runner's class name (a full class path without its module)."""
    runner = options.view_as(StandardOptions).runner
    return runner.rsplit(".", 1)[-1] if isinstance(runner, str) else type(runner).__name__


def is_local_runner(options: PipelineOptions) -> bool:
    return runner_name(options) in LOCAL_RUNNERS


def num_workers(options: PipelineOptions) -> int:
    """Worker processes/threads of a local run: Beam reads ``--direct_num_workers 0`` as one
    per CPU core (and leaves it unset as one)."""
    workers = options.view_as(DirectOptions).direct_num_workers
    if workers is None:
        return 1
    return int(workers) if int(workers) > 0 else (os.cpu_count() or 1)


PER_CORE = -1  # processes_per_machine: one SDK process per core


def processes_per_machine(options: PipelineOptions) -> int | None:
    """SDK worker processes per worker machine, as far as the runner's options say: the local
    runners' ``--direct_num_workers``; the portable runners' (Flink, Spark, the job service)
    ``--sdk_worker_parallelism`` (0 or unset: one process, or the runner's choice); Dataflow
    starts one Python process per vCPU (:data:`PER_CORE`). None: unknown (torch keeps its
    default)."""
    from apache_beam.options.pipeline_options import PortableOptions

    name = runner_name(options)
    if name in LOCAL_RUNNERS:
        return num_workers(options)
    if name in ("DataflowRunner", "TestDataflowRunner"):
        return None if options.view_as(DebugOptions).lookup_experiment("no_use_multiple_sdk_containers") else PER_CORE
    parallelism = options.view_as(PortableOptions).sdk_worker_parallelism
    return int(parallelism) if parallelism and int(parallelism) > 0 else 1


def _import_runner_module(args: list[str]) -> None:
    """Import the module of a runner named by its full class path, so that the options
    classes it declares are registered before :func:`_reject_unknown` reads them."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--runner")
    runner = parser.parse_known_args(args)[0].runner
    if not runner or "." not in runner:
        return
    module = runner.rsplit(".", 1)[0]
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise ValueError(f"--runner {runner}: cannot import {module} ({err})") from err


def _reject_unknown(args: list[str]) -> None:
    """Parse `args` with every registered Beam options class; raise on leftovers."""
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    seen = {}
    for cls in PipelineOptions.__subclasses__():
        seen.setdefault(str(cls), cls)
    for cls in seen.values():
        cls._add_argparse_args(parser)  # the hook every options class implements
    _, unknown = parser.parse_known_args(args)
    if unknown:
        raise ValueError(
            f"unrecognized arguments: {' '.join(unknown)} (neither a capfilt curate option "
            f"nor a Beam pipeline option; see `capfilt curate --help`)"
        )
