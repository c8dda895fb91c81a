"""Options of one curate run: :class:`CurateConfig` (ours) and Beam's ``PipelineOptions``.

Our options live in a dataclass so that the graph, the handlers and the run record read one
validated object; Beam's options are passed through untouched, so the same command runs on
the local runner, Dataflow, Flink or Spark. Two things are added on the Beam side:

* the runner defaults to ``FnApiRunner`` named explicitly: Beam's own default on a machine
  without a runner configured tries to download the Prism binary;
* arguments that no Beam options class knows are an error, not a warning. Everything our
  parser does not recognise ends up here, so a mistyped capfilt option (``--num-caption``)
  would otherwise be silently dropped.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    StandardOptions,
    WorkerOptions,
)

from capfilt.pipeline.curate.precision import DEFAULT_CLIP_MARGIN, DEFAULT_ITM_MARGIN, PRECISIONS, resolve_precision
from capfilt.transforms.image import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE
from capfilt.transforms.text import DEFAULT_MAX_WORDS

DEFAULT_RUNNER = "FnApiRunner"
# Runners that execute in (or next to) this process: the progress line can read their
# per-worker counters from a local directory.
LOCAL_RUNNERS = ("FnApiRunner", "DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner")


@dataclass(frozen=True)
class CurateConfig:
    """Everything `capfilt curate` needs besides Beam's own options.

    Fields that change the curated rows (models, sampling, thresholds, seed, round, ablations,
    decode limits, precision) form the run's fingerprint (:meth:`fingerprint`); the others (batch size,
    grouping, progress) only change how fast the rows are produced.
    """

    inputs: tuple[str, ...]
    out: str
    captioner: str | None = None
    filter: str | None = None
    clip: str | None = None
    # Sampling (BLIP defaults; BLIP-2 sampled 10 captions per image).
    num_captions: int = 10
    prompt: str = "a picture of "
    top_p: float = 0.9
    max_length: int = 30
    min_length: int = 10
    repetition_penalty: float = 1.1
    # Selection.
    itm_threshold: float = 0.5
    keep_top: int = 2
    seed: int = 0
    round: int = 0
    no_synthetic: bool = False
    no_filter: bool = False
    no_images: bool = False
    # Decode limits and caption cleaning (transforms.image / transforms.text).
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE
    max_aspect: float = DEFAULT_MAX_ASPECT
    max_words: int = DEFAULT_MAX_WORDS
    # Execution.
    batch_size: int = 8
    device: str = "auto"
    precision: str = "auto"  # pipeline.precision: auto, fp32, bf16, bf16-checked
    itm_margin: float = DEFAULT_ITM_MARGIN  # bf16-checked: ITM scores this close to the threshold get fp32
    clip_margin: float = DEFAULT_CLIP_MARGIN  # bf16-checked: CLIP error assumed per score
    share_model_across_processes: bool = False
    torch_threads: int | None = None  # per worker process; None: torch's default
    shards_per_pipeline: int = 8
    overwrite: bool = False
    progress_every: float = 5.0
    extra: dict = field(default_factory=dict)

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
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        _check_range("--itm-margin", self.itm_margin, 0.0, 1.0)
        _check_range("--clip-margin", self.clip_margin, 0.0, 2.0)
        if self.progress_every <= 0:
            raise ValueError(f"--progress-every must be > 0 seconds, got {self.progress_every}")

    @property
    def use_captioner(self) -> bool:
        return not self.no_synthetic

    @property
    def use_filter(self) -> bool:
        return not self.no_filter

    def fingerprint(self) -> dict:
        """The settings that decide the curated rows (written to the manifest and compared
        when a run resumes into an existing --out)."""
        keys = (
            "captioner", "filter", "clip", "num_captions", "prompt", "top_p", "max_length",
            "min_length", "repetition_penalty", "itm_threshold", "keep_top", "seed", "round",
            "no_synthetic", "no_filter", "no_images", "max_pixels", "min_side", "max_aspect",
            "max_words",
        )
        fp = {k: getattr(self, k) for k in keys}
        # Resolved, not as asked: "auto" means bf16-checked on one machine and fp32 on another,
        # and a resume must not mix their rows (bf16 scores differ in the last digits; plain
        # bf16 also changes captions). The margins decide which bf16 scores are redone in fp32.
        fp["precision"] = resolve_precision(self.precision, self.device)
        checked = fp["precision"] == "bf16-checked"
        fp["itm_margin"] = self.itm_margin if checked and self.use_filter else None
        fp["clip_margin"] = self.clip_margin if checked else None
        if self.no_synthetic:  # sampling settings are irrelevant without a captioner
            for k in ("captioner", "num_captions", "prompt", "top_p", "max_length", "min_length",
                      "repetition_penalty"):
                fp[k] = None
        if self.no_filter:
            fp["filter"] = None
            fp["itm_threshold"] = None
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


def runner_name(options: PipelineOptions) -> str:
    runner = options.view_as(StandardOptions).runner
    return runner if isinstance(runner, str) else type(runner).__name__


def is_local_runner(options: PipelineOptions) -> bool:
    return runner_name(options) in LOCAL_RUNNERS


def num_workers(options: PipelineOptions) -> int:
    """Worker processes/threads of a local run: Beam reads ``--direct_num_workers 0`` as one
    per CPU core (and leaves it unset as one)."""
    workers = options.view_as(DirectOptions).direct_num_workers
    if workers is None:
        return 1
    return int(workers) if int(workers) > 0 else (os.cpu_count() or 1)


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
