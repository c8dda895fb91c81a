"""`capfilt curate` — run one CapFilt round over raw shards as a Beam pipeline.

    capfilt curate --input 'raw/*.parquet' --out curated \\
        --captioner Salesforce/blip-image-captioning-large --filter Salesforce/blip-itm-large-coco \\
        --clip ViT-L-14:openai [--num-captions 10] [--keep-top 2] [Beam options]

Every option this command does not know is handed to Beam (``--runner``,
``--direct_num_workers``, ``--direct_running_mode``, Dataflow/Flink/Spark options, ...); an
option Beam does not know either is an error. See docs/curate.md.
"""
from __future__ import annotations

import argparse
import logging
import sys

from capfilt.pipeline.curate.precision import DEFAULT_CLIP_MARGIN, DEFAULT_ITM_MARGIN, PRECISIONS

HELP = "Run the CapFilt Beam pipeline over raw shards (caption, filter, CLIP-rank, select)"
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from capfilt.transforms.image import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE

    parser.set_defaults(_accepts_extra=True)  # Beam pipeline options pass through
    io = parser.add_argument_group("input and output")
    io.add_argument("--input", action="append", required=True, metavar="GLOB",
                    help="raw shards: a glob of .parquet or .tar files (repeatable)")
    io.add_argument("--out", required=True, metavar="DIR", help="output directory")
    io.add_argument("--overwrite", action="store_true",
                    help="delete OUT's previous curate output first (default: resume, skipping done shards)")
    io.add_argument("--no-images", action="store_true",
                    help="leave the jpg column null in curated shards (key/url/sha256 reference the input)")
    io.add_argument("--round", type=int, default=0, help="bootstrap round written to every row")

    models = parser.add_argument_group("models (a hub id or a local directory; CLIP also NAME:PRETRAINED)")
    models.add_argument("--captioner", metavar="M", help="BLIP captioning model (not needed with --no-synthetic)")
    models.add_argument("--filter", metavar="M", help="BLIP or BLIP-2 ITM model (not needed with --no-filter)")
    models.add_argument("--clip", metavar="M", help="open_clip ranker")
    models.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    models.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="fp32; bf16 (all models, fastest, decisions may change); bf16-checked (captioner "
                             "fp32, filter and ranker bf16, images whose decision a bf16 error could flip are "
                             "scored again in fp32); auto (default): bf16-checked where the hardware has native "
                             "bf16, else fp32. See docs/benchmarks/capfilt.md")
    models.add_argument("--bf16", dest="precision", action="store_const", const="bf16",
                        help="the same as --precision bf16")
    models.add_argument("--itm-margin", type=float, default=DEFAULT_ITM_MARGIN, metavar="E",
                        help="bf16-checked: ITM scores within E of --itm-threshold are recomputed in fp32")
    models.add_argument("--clip-margin", type=float, default=DEFAULT_CLIP_MARGIN, metavar="E",
                        help="bf16-checked: CLIP rankings with neighbours within 2E are recomputed in fp32")

    capfilt = parser.add_argument_group("CapFilt")
    capfilt.add_argument("--num-captions", type=int, default=10, metavar="N", help="synthetic captions per image")
    capfilt.add_argument("--top-p", type=float, default=0.9, metavar="P", help="nucleus sampling mass")
    capfilt.add_argument("--prompt", default="a picture of ", help="captioner prompt (stripped from the output)")
    capfilt.add_argument("--max-length", type=int, default=30, help="caption tokens, prompt included")
    capfilt.add_argument("--min-length", type=int, default=10, help="caption tokens, prompt included")
    capfilt.add_argument("--repetition-penalty", type=float, default=1.1, metavar="R",
                         help="captioner: transformers' repetition penalty on tokens already in the caption "
                              "(prompt included): 1 is none, > 1 discourages repeats; must be > 0 (BLIP: 1.1)")
    capfilt.add_argument("--itm-threshold", type=float, default=0.5, metavar="T",
                         help="a caption passes the filter when its ITM p(match) >= T")
    capfilt.add_argument("--keep-top", type=int, default=2, metavar="K",
                         help="keep the K passing captions with the highest CLIP cosine")
    capfilt.add_argument("--seed", type=int, default=0, metavar="S",
                         help="run seed; caption i of key k samples with sample_seed(S, k, i)")
    capfilt.add_argument("--no-synthetic", action="store_true", help="ablation: no captioner, web captions only")
    capfilt.add_argument("--no-filter", action="store_true", help="ablation: no ITM filter, rank every candidate")

    checks = parser.add_argument_group("input checks")
    checks.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="larger images are errors")
    checks.add_argument("--min-side", type=int, default=DEFAULT_MIN_SIDE, help="smaller images are errors")
    checks.add_argument("--max-aspect", type=float, default=DEFAULT_MAX_ASPECT, help="longer/shorter side limit")
    checks.add_argument("--max-words", type=int, default=30, help="web captions are cut to this many words")

    run = parser.add_argument_group("execution (plus any Beam pipeline option)")
    run.add_argument("--batch-size", type=int, default=8, metavar="B", help="images per model call")
    run.add_argument("--shards-per-pipeline", type=int, default=8,
                     help="input shards per Beam pipeline (the unit of resume after a crash)")
    run.add_argument("--share-model-across-processes", action="store_true",
                     help="one model copy per machine instead of per worker process")
    run.add_argument("--torch-threads", type=int, default=None,
                     help="torch threads per worker process (default: cores / workers)")
    run.add_argument("--progress-every", type=float, default=5.0, metavar="SECONDS",
                     help="seconds between progress lines")


def config_from_args(args):
    from capfilt.pipeline.curate.options import CurateConfig

    return CurateConfig(
        inputs=tuple(args.input), out=args.out, captioner=args.captioner, filter=args.filter, clip=args.clip,
        num_captions=args.num_captions, prompt=args.prompt, top_p=args.top_p, max_length=args.max_length,
        min_length=args.min_length, repetition_penalty=args.repetition_penalty,
        itm_threshold=args.itm_threshold, keep_top=args.keep_top, seed=args.seed, round=args.round,
        no_synthetic=args.no_synthetic, no_filter=args.no_filter, no_images=args.no_images,
        max_pixels=args.max_pixels, min_side=args.min_side, max_aspect=args.max_aspect,
        max_words=args.max_words, batch_size=args.batch_size, device=args.device,
        precision=args.precision, itm_margin=args.itm_margin, clip_margin=args.clip_margin,
        share_model_across_processes=args.share_model_across_processes, torch_threads=args.torch_threads,
        shards_per_pipeline=args.shards_per_pipeline, overwrite=args.overwrite,
        progress_every=args.progress_every,
    )


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
            rescored = run.get("fp32_rescored") or {}
            checked = (f"; images scored in fp32 by the check: filter {rescored.get('filter', 0)}, "
                       f"rank {rescored.get('rank', 0)}") if run["precision"] == "bf16-checked" else ""
            lines.append(f"  {'precision':<22}{run['precision']:>10}{checked}")
    return "\n".join(lines)


def _one_line(err: BaseException) -> str:
    """The message on one line (hub and Beam messages span several)."""
    return " ".join(str(err).split())


def run(args) -> int:
    from capfilt.pipeline.curate.graph import run_curate

    quiet = {}
    if str(getattr(args, "log_level", "INFO")).upper() != "DEBUG":
        # Beam logs every bundle and stage at INFO; our progress line replaces that. Beam logs a
        # failing DoFn's traceback at ERROR and then re-raises the error to us, which prints it
        # in one line below (an error we do not catch keeps its traceback). The levels are put
        # back afterwards: a bootstrap or run-job runs other stages in this process.
        quiet = {"apache_beam": logging.WARNING, "apache_beam.runners.common": logging.CRITICAL}
    before = {name: logging.getLogger(name).level for name in quiet}
    try:
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)
        cfg = config_from_args(args)
        result = run_curate(cfg, args.extra)
    except ValueError as err:  # bad options, models, inputs or --out: the message says which
        print(f"capfilt curate: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # as jobs.cli.main_entry: a path that cannot be used (2), else a failing disk (1)
        from capfilt.jobs.cli import USAGE_ERRORS

        usage = isinstance(err, USAGE_ERRORS)
        print(f"capfilt curate: {'error' if usage else 'failed'}: {_one_line(err)}", file=sys.stderr)
        return 2 if usage else 1
    except RuntimeError as err:
        print(f"capfilt curate: failed: {err}", file=sys.stderr)
        return 1
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)
    print(summary_table(result))
    return 0
