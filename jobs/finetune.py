"""`capfilt finetune` — finetune the captioner (LM) or the filter (ITC+ITM) on a clean split.

As in BLIP, the two are separate models finetuned from the same pretrained directory (sharing
them during finetuning cut the noise BLIP's filter removed from 25% to 8%). One --out can hold
both: `--task caption` writes OUT/captioner, `--task retrieval` writes OUT/itm, each with its
own checkpoints (OUT/checkpoints/finetune-<task>) and log.
"""
from __future__ import annotations

from jobs.pretrain import (add_loop_arguments, build_on_rank0_first, itm_options, loop_config, report,
                           sources, train)

HELP = "Finetune a captioner or filter on a clean split"
DESCRIPTION = (
    "Finetune from a pretrained directory (--init: DIR/captioner + DIR/itm, or a single BLIP / "
    "BLIP-2 directory). --task caption trains the image-grounded decoder (LM with BLIP's prompt "
    "'a picture of ', label smoothing 0.1) and writes OUT/captioner; --task retrieval trains "
    "ITC + ITM (BLIP or BLIP-2) and writes OUT/itm."
)


def add_arguments(parser) -> None:
    parser.add_argument("--task", required=True, choices=["caption", "retrieval"],
                        help="caption: LM on the decoder (writes OUT/captioner); retrieval: ITC+ITM (OUT/itm)")
    parser.add_argument("--init", required=True, help="pretrained model directory")
    add_loop_arguments(parser)
    parser.set_defaults(lr=1e-5, steps=500)  # BLIP finetunes at 1e-5
    parser.add_argument("--prompt", default="a picture of ",
                        help="caption prompt, masked out of the LM targets (BLIP's default)")
    parser.add_argument("--tasks", help="override the losses (retrieval: itc,itm; BLIP-2 may add itg)")


def run(args) -> int:
    from model.model_dirs import find_model_dirs

    find_model_dirs(args.init)  # fail on a bad --init before anything else
    cfg, data = loop_config(args, f"finetune-{args.task}"), sources(args)
    model = build_on_rank0_first(lambda: build_model(args))
    return report(train(model, data, cfg))


def build_model(args):
    from model.blip_pretrain import BlipTrainConfig, BlipTrainModel
    from model.model_dirs import find_model_dirs

    dirs = find_model_dirs(args.init)
    if args.task == "caption":
        if not {"captioner", "itm"} & set(dirs):
            raise ValueError(f"--init {args.init}: captioning needs a BLIP captioner (or itm) directory, "
                             f"found {sorted(dirs)}")
        cfg = BlipTrainConfig(tasks=("lm",), prompt=args.prompt, max_text_len=args.max_text_len)
        itm_dir = None if "captioner" in dirs else dirs["itm"]
        return BlipTrainModel.from_dirs(cfg, itm_dir=itm_dir, captioner_dir=dirs.get("captioner"))
    tasks = tuple(args.tasks.split(",")) if args.tasks else ("itc", "itm")
    if "itm" in dirs or "captioner" in dirs:
        cfg = BlipTrainConfig(tasks=tasks, momentum=args.momentum, queue_size=args.queue_size,
                              alpha=args.alpha, max_text_len=args.max_text_len,
                              **itm_options(args))
        captioner_dir = None if "itm" in dirs else dirs["captioner"]
        return BlipTrainModel.from_dirs(cfg, itm_dir=dirs.get("itm"), captioner_dir=captioner_dir)
    if "blip2" in dirs:
        from model.blip2_pretrain import Blip2TrainConfig, build_blip2

        cfg = Blip2TrainConfig(tasks=tasks, max_text_len=args.max_text_len,
                               **itm_options(args))
        return build_blip2(cfg, args.out, init=dirs["blip2"])
    raise ValueError(f"--init {args.init}: retrieval needs a BLIP or BLIP-2 itm directory, found {sorted(dirs)}")
