"""`capfilt evaluate` — measure a model or a curate run against held-out data and the truth.

    capfilt evaluate --task retrieval --model runs/r1/model --data 'world/test/*.parquet' [--itm-rerank 16]
    capfilt evaluate --task caption   --model runs/r1/model --data 'world/test/*.parquet' --truth world/truth.parquet
    capfilt evaluate --task filter    --model runs/r0/ft_retrieval --data 'world/web/*.parquet' --truth world/truth.parquet
    capfilt evaluate --task filter    --model runs/r0/ft_retrieval --data 'coco_val/*.parquet'   # clean pairs: false alarms
    capfilt evaluate --task curated   --data 'runs/r1/capfilt/curated/shards/*.parquet' --truth world/truth.parquet

The metrics live in `model/evaluation/evaluate.py`; this module declares the options, prints the JSON result
and writes it with `--out`.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from capfilt.jobs import options
from capfilt.jobs.cli import UsageError
from capfilt.model.inference.captioner import CaptionConfig
from capfilt.model.tokens import ITM_FIRST_TOKENS

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


@dataclass
class EvaluateOptions:
    """The options of `capfilt evaluate` (the bootstrap evaluates with the same functions)."""

    task: str = field(metadata={"help": "what to measure", "choices": TASKS})
    data: str = field(metadata={"help": "parquet shard glob (raw img2dataset or curated shards)"})
    model: Path | None = field(default=None, metadata={
        "help": "model directory or pretrain output directory (not needed for --task curated, nor for "
                "--task filter on curated shards)", "type": Path})
    truth: Path | None = field(default=None, metadata={
        "help": "truth.parquet from `capfilt synth` (required for curated; filter without it measures false "
                "alarms on clean pairs; adds attribute accuracy to caption)", "type": Path})
    out: Path | None = field(default=None, metadata={
        "help": "also write the JSON result to this file", "type": Path})
    itm_rerank: int = field(default=0, metadata={
        "help": "retrieval: re-rank each query's ITC top-K with the ITM head (0 = ITC only)", "metavar": "K"})
    threshold: float = field(default=0.5, metadata={
        "help": "filter: a web caption is flagged noisy when its ITM p(match) is below this"})
    itm_first_token: str = field(default="enc", metadata={
        "help": "filter, and retrieval with --itm-rerank: the token a BLIP filter's ITM text starts with "
                "(as `capfilt curate --itm-first-token`)", "choices": list(ITM_FIRST_TOKENS)})
    limit: int | None = field(default=None, metadata={"help": "evaluate only the first N decodable rows"})
    batch_size: int = field(default=32, metadata={"help": "images per model call"})
    seed: int = field(default=0, metadata={"help": "caption: sampling seed (used when --top-p > 0)"})
    top_p: float = field(default=0.0, metadata={
        "help": "caption: nucleus top-p; 0 decodes greedily, as caption benchmarks do"})
    prompt: str = field(default=CaptionConfig.prompt, metadata={
        "help": "caption: decoder prompt, stripped from the output (BLIP's after caption finetuning; pass '' "
                "for a pretrained model, which learnt without one)"})
    device: str = field(default="auto", metadata={"help": "torch device: auto, cpu or cuda"})
    no_progress: bool = field(default=False, metadata={
        "help": "no progress bars (they go to stderr, and only when it is a terminal)"})

    def __post_init__(self):
        checks = (
            (self.task == "curated" and self.truth is None, "--task curated needs --truth FILE"),
            (self.task == "filter" and self.truth is None and self.model is None,
             "--task filter without --truth scores clean raw shards for false alarms and needs --model DIR"),
            (self.task in ("retrieval", "caption") and self.model is None, f"--task {self.task} needs --model DIR"),
            (self.model is not None and not self.model.exists(), f"model directory {self.model} does not exist"),
            (self.truth is not None and not self.truth.is_file(), f"truth file {self.truth} does not exist"),
            (self.itm_rerank < 0, f"--itm-rerank must be >= 0, got {self.itm_rerank}"),
            (self.limit is not None and self.limit < 1,
             f"--limit must be >= 1 (omit it for every row), got {self.limit}"),
            (self.batch_size < 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (not 0.0 <= self.threshold <= 1.0, f"--threshold must be in [0, 1], got {self.threshold}"),
        )
        for failed, message in checks:
            if failed:
                raise UsageError("evaluate", message)


def add_arguments(parser) -> None:
    options.add_arguments(parser, EvaluateOptions)


def run(args) -> int:
    return evaluate(options.from_args(EvaluateOptions, args))


def evaluate(opts: EvaluateOptions) -> int:
    """Run the evaluation of `opts`, print its JSON result and write it to ``opts.out``."""
    from capfilt.model.evaluation import evaluate as ev

    # None: tqdm shows the bars only when stderr is a terminal (as `capfilt synth` does)
    common = {"limit": opts.limit, "progress": False if opts.no_progress else None}
    if opts.task == "retrieval":
        result = ev.evaluate_retrieval(opts.model, opts.data, itm_rerank=opts.itm_rerank,
                                       itm_first_token=opts.itm_first_token,
                                       batch_size=opts.batch_size, device=opts.device, **common)
    elif opts.task == "caption":
        result = ev.evaluate_captions(opts.model, opts.data, truth=opts.truth, batch_size=opts.batch_size,
                                      seed=opts.seed, top_p=opts.top_p, prompt=opts.prompt,
                                      device=opts.device, **common)
    elif opts.task == "filter" and opts.truth is None:
        result = ev.evaluate_filter_clean(opts.model, opts.data, threshold=opts.threshold,
                                          itm_first_token=opts.itm_first_token,
                                          batch_size=opts.batch_size, device=opts.device, **common)
    elif opts.task == "filter":
        result = ev.evaluate_filter(opts.model, opts.data, truth=opts.truth, threshold=opts.threshold,
                                    itm_first_token=opts.itm_first_token,
                                    batch_size=opts.batch_size, device=opts.device, **common)
    else:
        result = ev.evaluate_curated(opts.data, truth=opts.truth)
    result = {"task": opts.task, "data": opts.data,
              "model": str(opts.model) if opts.model else None, **result}
    text = json.dumps(result, indent=2, sort_keys=False)
    print(text)
    if opts.out is not None:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = opts.out.with_name(opts.out.name + ".tmp")
        tmp.write_text(text + "\n", encoding="utf-8")
        tmp.replace(opts.out)  # atomic: a reader never sees half a result
        log.info("wrote %s", opts.out)
    return 0
