"""`capfilt finetune` — finetune the captioner (LM) or the filter (ITC+ITM) on a clean split.

As in BLIP, the two are separate models finetuned from the same pretrained directory (sharing
them during finetuning cut the noise BLIP's filter removed from 25% to 8%). One --out can hold
both: `--task caption` writes OUT/captioner, `--task retrieval` writes OUT/itm, each with its
own checkpoints (OUT/checkpoints/finetune-<task>) and log.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from capfilt.jobs.commands.pretrain import (
    FINETUNE_RAMP_EPOCHS, add_training_arguments, build_on_rank0_first, itm_negative_options, itm_options, loop_config,
    momentum_kwargs, momentum_options, prepare_run_dir, refuse_options, report, sources, train,
)
from capfilt.model.inference.captioner import CaptionConfig

CAPTION_PROMPT = CaptionConfig.prompt  # BLIP's caption finetuning prompt is its captioning prompt

DESCRIPTION = (
    "Finetune from a pretrained directory (--init: DIR/captioner + DIR/itm, or a single BLIP / "
    "BLIP-2 directory). --task caption trains the image-grounded decoder (LM with BLIP's prompt "
    f"{CAPTION_PROMPT!r}, label smoothing 0.1) and writes OUT/captioner; --task retrieval trains "
    "ITC + ITM (BLIP or BLIP-2) and writes OUT/itm."
)


@dataclass(kw_only=True)
class FinetuneModel:
    """What `capfilt finetune` trains, from which model."""

    task: str = field(metadata={
        "help": "caption: LM on the decoder (writes OUT/captioner); retrieval: ITC+ITM (OUT/itm)",
        "choices": ["caption", "retrieval"]})
    init: str = field(metadata={"help": "pretrained model directory"})
    prompt: str | None = field(default=None, metadata={
        "help": f"--task caption: the prompt masked out of the LM targets (unset: BLIP's {CAPTION_PROMPT!r})"})
    tasks: str | None = field(default=None, metadata={
        "help": "override the losses (retrieval: itc,itm; BLIP-2 may add itg)"})


# BLIP finetunes at 1e-5
LOOP_DEFAULTS = {"lr": 1e-5, "steps": 500}


def add_arguments(parser) -> None:
    add_training_arguments(parser, FinetuneModel, LOOP_DEFAULTS)


def check_options(args, dirs: dict) -> None:
    """Options this task (or a BLIP-2 --init) would ignore are errors."""
    if args.task == "retrieval":
        refuse_options({"--prompt": args.prompt is not None}, "to --task retrieval: it trains no decoder")
    if args.task == "caption":
        refuse_options({"--tasks " + str(args.tasks): args.tasks not in (None, "lm"), **momentum_options(args),
                        **itm_negative_options(args)},
                       "to --task caption: it trains the decoder's LM loss only (ITC and ITM are --task retrieval)")
    elif not {"itm", "captioner"} & set(dirs):
        refuse_options(momentum_options(args), "to a BLIP-2 --init: BLIP-2 has in-batch ITC (no momentum encoder)")


def exports(args) -> tuple[str, ...]:
    """The model directories this finetune writes into --out."""
    if args.task == "caption":
        return ("captioner",)
    return ("itm", "captioner") if args.tasks and "lm" in args.tasks.split(",") else ("itm",)


def run(args) -> int:
    from capfilt.model.builders.model_dirs import find_model_dirs

    dirs = find_model_dirs(args.init)  # fail on a bad --init before anything else
    check_options(args, dirs)
    run_name = f"finetune-{args.task}"
    cfg, data = loop_config(args, run_name), sources(args)
    model = build_on_rank0_first(lambda: build_model(args), lambda: prepare_run_dir(args, run_name, exports(args)))
    return report(train(model, data, cfg))


def build_model(args):
    from capfilt.model.training.blip import BlipTrainConfig, BlipTrainModel
    from capfilt.model.builders.model_dirs import find_model_dirs

    dirs = find_model_dirs(args.init)
    if args.task == "caption":
        if not {"captioner", "itm"} & set(dirs):
            raise ValueError(f"--init {args.init}: captioning needs a BLIP captioner (or itm) directory, "
                             f"found {sorted(dirs)}")
        cfg = BlipTrainConfig(tasks=("lm",), prompt=CAPTION_PROMPT if args.prompt is None else args.prompt,
                              max_text_len=args.max_text_len)
        itm_dir = None if "captioner" in dirs else dirs["itm"]
        return BlipTrainModel.from_dirs(cfg, itm_dir=itm_dir, captioner_dir=dirs.get("captioner"))
    tasks = tuple(args.tasks.split(",")) if args.tasks else ("itc", "itm")
    if "itm" in dirs or "captioner" in dirs:
        cfg = BlipTrainConfig(tasks=tasks, **momentum_kwargs(args, FINETUNE_RAMP_EPOCHS),
                              max_text_len=args.max_text_len, itm_first_token=args.itm_first_token,
                              **itm_options(args, "retrieval"))
        captioner_dir = None if "itm" in dirs else dirs["captioner"]
        return BlipTrainModel.from_dirs(cfg, itm_dir=dirs.get("itm"), captioner_dir=captioner_dir)
    if "blip2" in dirs:
        from capfilt.model.training.blip2 import Blip2TrainConfig, build_blip2

        cfg = Blip2TrainConfig(tasks=tasks, max_text_len=args.max_text_len,
                               **itm_options(args, "retrieval"))
        return build_blip2(cfg, args.out, init=dirs["blip2"])
    raise ValueError(f"--init {args.init}: retrieval needs a BLIP or BLIP-2 itm directory, found {sorted(dirs)}")
