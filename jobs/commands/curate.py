"""`capfilt curate` — run one CapFilt round over raw shards as a Beam pipeline.

    capfilt curate --input 'raw/*.parquet' --out curated \\
        --captioner Salesforce/blip-image-captioning-large --filter Salesforce/blip-itm-large-coco \\
        --clip ViT-L-14:openai [--num-captions 10] [--keep-top 2] [Beam options]

Every option this command does not know is handed to Beam (``--runner``,
``--direct_num_workers``, ``--direct_running_mode``, Dataflow/Flink/Spark options, ...); an
option Beam does not know either is an error. See docs/curate.md.
"""
from __future__ import annotations

import logging

from capfilt.jobs import options

DESCRIPTION = (
    "Curate img2dataset shards (parquet or webdataset tars) with BLIP's CapFilt: decode and "
    "validate each image, sample N synthetic captions (BLIP captioner), score the web and "
    "synthetic captions with the ITM filter, rank the passing ones by CLIP cosine and keep the "
    "top K. Writes OUT/shards/*.parquet (every decoded image, kept or dropped, with all scores), "
    "OUT/errors/*.parquet (every row that could not be curated, with the reason), "
    "OUT/stats.json and OUT/manifest.json. Re-running into the same OUT skips finished input "
    "shards. Unknown options are passed to Beam; the default runner is FnApiRunner "
    "(e.g. add --direct_num_workers 2 --direct_running_mode multi_processing)."
)


def add_arguments(parser) -> None:
    from capfilt.pipeline.curate.options import MODELS, CurateConfig

    parser.set_defaults(_accepts_extra=True)  # Beam pipeline options pass through
    groups = options.add_arguments(parser, CurateConfig)
    groups[MODELS].add_argument("--bf16", dest="precision", action="store_const", const="bf16",
                                help="the same as --precision bf16")


def config_from_args(args):
    from capfilt.pipeline.curate.options import CurateConfig

    return options.from_args(CurateConfig, args)


def summary_table(result) -> str:
    """The end-of-run table: shards, the accounting identity, reasons, speed."""
    s = result.stats
    run = s.get("this_run") or {}
    lines = [
        f"capfilt curate -> {result.out}",
        f"  {'shards':<22}{s['shards']:>10}   ({len(result.processed)} curated now, {len(result.skipped)} skipped as done)",
        f"  {'input rows':<22}{s['input_rows']:>10}",
        f"  {'kept':<22}{s['kept']:>10}",
        f"  {'dropped':<22}{s['dropped']:>10}",
        f"  {'errors':<22}{s['errors']:>10}",
        f"  {'identity':<22}{'ok':>10}   (input_rows = kept + dropped + errors)",
    ]
    for reason, count in s["drop_reasons"].items():
        lines.append(f"    drop {reason:<34}{count:>8}")
    for kind, count in s["error_types"].items():
        lines.append(f"    error {kind:<33}{count:>8}")
    if result.processed:
        lines.append(f"  {'this run':<22}{run.get('input_rows', 0):>10} rows in {run.get('elapsed_s', 0):.1f} s "
                     f"= {run.get('rows_per_s', 0):.2f} rows/s ({run.get('runner')}, {run.get('workers')} worker(s))")
        if run.get("precision"):
            rescored = run.get("fp32_rescored")
            if run["precision"] != "bf16-checked":
                checked = ""
            elif rescored is None:  # a runner without Metrics
                checked = "; images scored in fp32 by the check: not reported by the runner"
            else:
                checked = (f"; images scored in fp32 by the check: filter {rescored.get('filter', 0)}, "
                           f"rank {rescored.get('rank', 0)}")
            lines.append(f"  {'precision':<22}{run['precision']:>10}{checked}")
    return "\n".join(lines)


def run(args) -> int:
    return curate(config_from_args(args), args.extra, quiet=str(getattr(args, "log_level", "INFO")).upper() != "DEBUG")


def curate(cfg, beam_args: list[str], quiet: bool = True) -> int:
    """Run one curate and print its summary table (what `capfilt curate`, the bootstrap and
    run-job call). `beam_args`: Beam's own options, in Beam's command-line syntax."""
    from capfilt.pipeline.curate.failures import HideJobMessages, job_failure
    from capfilt.pipeline.curate.graph import run_curate

    # Beam logs every bundle and stage at INFO; our progress line replaces that. Beam logs a
    # failing DoFn's traceback at ERROR (PortableRunner: the job's messages, on the root logger)
    # and then raises the failure to us, which becomes one line naming the stage and the
    # worker's error (pipeline.curate.failures; jobs.cli prints it). The levels are put back
    # afterwards: a bootstrap or run-job runs other stages in this process.
    levels = {"apache_beam": logging.WARNING, "apache_beam.runners.common": logging.CRITICAL} if quiet else {}
    before = {name: logging.getLogger(name).level for name in levels}
    hide = HideJobMessages()
    try:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if quiet:
            logging.getLogger().addFilter(hide)
        result = run_curate(cfg, list(beam_args))
    except Exception as err:
        failure = job_failure(err, beam_args)
        if failure is None:
            raise
        raise failure from err
    finally:
        logging.getLogger().removeFilter(hide)
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)
    print(summary_table(result))
    return 0
