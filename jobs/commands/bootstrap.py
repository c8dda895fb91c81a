"""`capfilt bootstrap` — BLIP's CapFilt bootstrap rounds from a YAML config (jobs/bootstrap/)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from capfilt.jobs import options

DESCRIPTION = (
    "Run BLIP's CapFilt bootstrap from a YAML config. Round 0 (ablation 'none'): synthetic world "
    "(or the config's data), pretrain on web + human, evaluate on test. Round r >= 1: finetune the "
    "previous model into a captioner and a filter on the human split, curate the web split with them "
    "and a CLIP ranker, pretrain a NEW model on curated + human, evaluate. Round 1 runs each ablation "
    "of BLIP's Table 1 (filter only, captioner only, capfilt); later rounds continue from the capfilt "
    "model. Writes OUT/report.json and OUT/report.md; a re-run skips finished stages."
)

log = logging.getLogger(__name__)


@dataclass
class BootstrapRun:
    """The options of `capfilt bootstrap` (None: the config's value)."""

    config: Path = field(metadata={
        "help": "YAML config (sizes, models, thresholds, seeds, steps); see jobs/configs/demo.yaml", "type": Path})
    out: Path = field(metadata={"help": "output directory (re-runs skip finished stages)", "type": Path})
    rounds: int | None = field(default=None, metadata={
        "help": "bootstrap rounds after round 0 (default: the config's `rounds`)"})
    ablations: str | None = field(default=None, metadata={
        "help": "comma list overriding the config's ablations (none,filter,captioner,capfilt)"})
    force: bool = field(default=False, metadata={"help": "re-run every stage, even finished ones"})
    threads: int | None = field(default=None, metadata={
        "help": "torch threads for training and evaluation (default: the config's `threads`, else torch's "
                "default); 1 is fastest on a machine shared with other jobs"})
    jobs: int | None = field(default=None, metadata={
        "help": "independent stages (a round's ablations, its two finetunes, round 0 beside the CLIP ranker) "
                "run in this many processes at once (default: the config's `jobs`, else 1); keep jobs x "
                "threads <= the CPU cores"})


def add_arguments(parser) -> None:
    options.add_arguments(parser, BootstrapRun)


def add_arguments(parser) -> None:
    options.add_arguments(parser, BootstrapRun)


def run(args) -> int:
    return bootstrap(options.from_args(BootstrapRun, args))


def bootstrap(opts: BootstrapRun) -> int:
    """Run the bootstrap of `opts` (`capfilt bootstrap` and `capfilt demo`) and print where its report is."""
    from capfilt.jobs.bootstrap.config import load_bootstrap_config
    from capfilt.jobs.cli import UsageError

    try:
        config = load_bootstrap_config(opts.config)
        if opts.rounds is not None:
            config.rounds = opts.rounds
        if opts.ablations is not None:
            config.ablations = [a.strip() for a in opts.ablations.split(",") if a.strip()]
        if opts.jobs is not None:
            config.jobs = opts.jobs
        config.validate()
    except ValueError as exc:
        raise UsageError("bootstrap", str(exc)) from exc
    threads = opts.threads if opts.threads is not None else config.threads
    if threads is not None:
        import torch

        if threads < 1:
            raise UsageError("bootstrap", f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    cores = os.cpu_count() or 1
    if config.jobs > 1 and config.jobs * (threads or cores) > cores:
        log.warning("%d jobs x %s torch threads on %d cores: the processes will compete for cores "
                    "(set --threads so that jobs x threads <= cores)", config.jobs, threads or "all", cores)
    opts.out.mkdir(parents=True, exist_ok=True)
    from capfilt.jobs.bootstrap.rounds import Bootstrap

    Bootstrap(config, opts.out, force=opts.force, threads=threads, jobs=config.jobs).run()
    print(f"report: {opts.out / 'report.md'} (data: {opts.out / 'report.json'})")
    return 0
