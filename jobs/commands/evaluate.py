"""`capfilt evaluate` — measure a model or a curate run against held-out data and the truth.

    capfilt evaluate --task retrieval --model runs/r1/model --data 'world/test/*.parquet' [--itm-rerank 16]
    capfilt evaluate --task caption   --model runs/r1/model --data 'world/test/*.parquet' --truth world/truth.parquet
    capfilt evaluate --task filter    --model runs/r0/ft_retrieval --data 'world/web/*.parquet' --truth world/truth.parquet
    capfilt evaluate --task filter    --model runs/r0/ft_retrieval --data 'coco_val/*.parquet'   # clean pairs: false alarms
    capfilt evaluate --task curated   --data 'runs/r1/capfilt/curated/shards/*.parquet' --truth world/truth.parquet

The metrics live in `model/evaluation.py`; this module parses options, prints the JSON result
and writes it with `--out`.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

HELP = "Evaluate a model (retrieval, captioning, filtering) or a curate run against the truth"
DESCRIPTION = (
    "Evaluate on held-out shards and print JSON. retrieval: image->text and text->image "
    "R@1/5/10 by ITC, optionally re-ranking each query's top-K with the ITM head as BLIP does. "
    "caption: BLEU-4 and CIDEr (pycocoevalcap; needs java) and, with --truth from `capfilt "
    "synth`, the attribute accuracy of the generated captions. filter: precision/recall/F1 of "
    "'the web caption is noisy' (ITM p < --threshold) against the truth, overall and per noise "
    "type; --data may be raw shards (scored with --model) or curated shards (their web_itm "
    "column). Without --truth, filter takes every pair of raw --data as a true match (a "
    "human-labelled split) and reports the share it would flag: its false-alarm rate. "
    "curated: the fraction of selected captions that are correct before and after CapFilt. "
    "--model takes a model directory or a pretrain/finetune output directory (its captioner/, "
    "itm/ or clip/ subdirectory is used)."
)
TASKS = ("retrieval", "caption", "filter", "curated")

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, choices=TASKS, help="what to measure")
    parser.add_argument("--data", required=True, help="parquet shard glob (raw img2dataset or curated shards)")
    parser.add_argument("--model", type=Path, default=None,
                        help="model directory or pretrain output directory (not needed for --task curated, "
                        "nor for --task filter on curated shards)")
    parser.add_argument("--truth", type=Path, default=None,
                        help="truth.parquet from `capfilt synth` (required for curated; filter without "
                        "it measures false alarms on clean pairs; adds attribute accuracy to caption)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")
    parser.add_argument("--itm-rerank", type=int, default=0, metavar="K",
                        help="retrieval: re-rank each query's ITC top-K with the ITM head (0 = ITC only)")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="filter: a web caption is flagged noisy when its ITM p(match) is below this")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N decodable rows")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call")
    parser.add_argument("--seed", type=int, default=0, help="caption: sampling seed (used when --top-p > 0)")
    parser.add_argument("--top-p", type=float, default=0.0,
                        help="caption: nucleus top-p; 0 decodes greedily, as caption benchmarks do")
    parser.add_argument("--prompt", default="a picture of ",
                        help="caption: decoder prompt, stripped from the output (BLIP's after caption "
                        "finetuning; pass '' for a pretrained model, which learnt without one)")
    parser.add_argument("--device", default="auto", help="torch device: auto, cpu or cuda")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (they go to stderr, and only when it is a terminal)")


def _check(args) -> None:
    if args.task == "curated" and args.truth is None:
        raise SystemExit("capfilt evaluate: --task curated needs --truth FILE")
    if args.task == "filter" and args.truth is None and args.model is None:
        raise SystemExit("capfilt evaluate: --task filter without --truth scores clean raw shards "
                         "for false alarms and needs --model DIR")
    if args.task in ("retrieval", "caption") and args.model is None:
        raise SystemExit(f"capfilt evaluate: --task {args.task} needs --model DIR")
    if args.model is not None and not args.model.exists():
        raise SystemExit(f"capfilt evaluate: model directory {args.model} does not exist")
    if args.truth is not None and not args.truth.is_file():
        raise SystemExit(f"capfilt evaluate: truth file {args.truth} does not exist")
    if args.itm_rerank < 0:
        raise SystemExit(f"capfilt evaluate: --itm-rerank must be >= 0, got {args.itm_rerank}")
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"capfilt evaluate: --limit must be >= 1 (omit it for every row), got {args.limit}")
    if args.batch_size < 1:
        raise SystemExit(f"capfilt evaluate: --batch-size must be >= 1, got {args.batch_size}")
    if not 0.0 <= args.threshold <= 1.0:
        raise SystemExit(f"capfilt evaluate: --threshold must be in [0, 1], got {args.threshold}")


def run(args) -> int:
    _check(args)
    from capfilt.model.evaluation import evaluate as ev

    # None: tqdm shows the bars only when stderr is a terminal (as `capfilt synth` does)
    common = {"limit": args.limit, "progress": False if args.no_progress else None}
    if args.task == "retrieval":
        result = ev.evaluate_retrieval(args.model, args.data, itm_rerank=args.itm_rerank,
                                       batch_size=args.batch_size, device=args.device, **common)
    elif args.task == "caption":
        result = ev.evaluate_captions(args.model, args.data, truth=args.truth, batch_size=args.batch_size,
                                      seed=args.seed, top_p=args.top_p, prompt=args.prompt,
                                      device=args.device, **common)
    elif args.task == "filter" and args.truth is None:
        result = ev.evaluate_filter_clean(args.model, args.data, threshold=args.threshold,
                                          batch_size=args.batch_size, device=args.device, **common)
    elif args.task == "filter":
        result = ev.evaluate_filter(args.model, args.data, truth=args.truth, threshold=args.threshold,
                                    batch_size=args.batch_size, device=args.device, **common)
    else:
        result = ev.evaluate_curated(args.data, truth=args.truth)
    result = {"task": args.task, "data": args.data,
              "model": str(args.model) if args.model else None, **result}
    text = json.dumps(result, indent=2, sort_keys=False)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(text + "\n", encoding="utf-8")
        tmp.replace(args.out)  # atomic: a reader never sees half a result
        log.info("wrote %s", args.out)
    return 0
