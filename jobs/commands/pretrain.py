"""`capfilt pretrain` — pretrain BLIP (ITC+ITM+LM), BLIP-2 stage 1 (ITC+ITM+ITG) or CLIP.

Single process, or under `torchrun --nproc_per_node N -m jobs.cli pretrain ...` (DDP; gloo on
CPU, nccl on GPU). Writes loadable model directories to --out (BLIP: captioner/ and itm/,
BLIP-2: itm/, CLIP: clip/) with checkpoints, logs and a summary beside them; docs/training.md
has the details.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from capfilt.jobs import options
from capfilt.model.training.blip import BlipTrainConfig
from capfilt.model.training.loop import TrainConfig
from capfilt.model.tokens import ITM_FIRST_TOKENS
from capfilt.transforms.files import outputs

DESCRIPTION = (
    "Pretrain a model on curated (kept rows, one of the selected captions per step) or raw "
    "img2dataset shards (web caption). Without --init a tiny random model is built from "
    "model/configs (with --model-config overrides). Resumable: --resume continues from the "
    "newest checkpoint in --out, exactly where it stopped. An --out that already holds a run is "
    "refused unless --resume or --overwrite (which clears it first)."
)
log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class TrainingData:
    """What a pretrain or finetune reads, and what it does with an --out that holds a run."""

    data: str | None = field(default=None, metadata={
        "help": "shards: a glob, directory or file (weight 1 in the mixture)"})
    mix: list[str] = field(default_factory=list, metadata={
        "help": "more sources with mixture weights, e.g. 'web/*.parquet:3 human/*.parquet:1'", "nargs": "+",
        "metavar": "GLOB:WEIGHT"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace a run already in --out (its files are deleted first) instead of refusing; a "
                "directory that is not a training run's output is refused even so"})


@dataclass(kw_only=True)
class Objectives:
    """The loss options of pretrain and finetune (defaults: BlipTrainConfig's, i.e. BLIP's)."""

    momentum: bool = field(default=BlipTrainConfig.momentum, metadata={
        "help": "BLIP ITC with a momentum encoder and soft targets (m=0.995, alpha=0.4)"})
    queue_size: int = field(default=BlipTrainConfig.queue_size, metadata={
        "help": "ITC feature queue (BLIP: 57600; needs --momentum)"})
    alpha: float | None = field(default=None, metadata={
        "help": "soft-target weight with --momentum (unset: BLIP's 0.4)"})
    alpha_warmup_steps: int | None = field(default=None, metadata={
        "help": "with --momentum: steps over which the soft-target weight ramps up from 0 (0: none; unset: BLIP's "
                "ramp, two epochs of the data when pretraining and one when finetuning)", "metavar": "N"})
    max_text_len: int = field(default=BlipTrainConfig.max_text_len, metadata={"help": "caption tokens"})
    itm_negatives: str = field(default="hard", metadata={
        "help": "ITM negatives: 'hard' (drawn by similarity, as BLIP) or 'random' (uniform among the "
                "non-matching pairs throughout)", "choices": ["hard", "random"]})
    itm_random_steps: int = field(default=BlipTrainConfig.itm_random_steps, metadata={
        "help": "with 'hard': draw uniformly for the first N steps, then by similarity; lets a randomly "
                "initialised ITM leave its 0.64 plateau, where it stays for long with hard negatives "
                "from the first step", "metavar": "N"})
    itm_hard_fraction: float = field(default=BlipTrainConfig.itm_hard_fraction, metadata={
        "help": "with 'hard', after the uniform steps: the share of rows whose negative is drawn by "
                "similarity, the rest uniformly (1.0: BLIP)", "metavar": "F"})
    itm_draw: str | None = field(default=None, metadata={
        "help": "with 'hard', how negatives are drawn by similarity: 'pretrain' as BLIP pretrains (softmax over the batch + 1e-4, "
                "against the momentum features with --momentum), 'retrieval' as BLIP finetunes for retrieval and "
                "BLIP-2 trains (softmax over the non-matching pairs); unset: 'pretrain' for pretrain --arch blip, "
                "'retrieval' otherwise", "choices": ["pretrain", "retrieval"]})
    itm_first_token: str = field(default=BlipTrainConfig.itm_first_token, metadata={
        "help": "BLIP ITM: the token the image-grounded text starts with; enc: [ENC], as BLIP (and curate's "
                "default; [CLS] with a warning when the vocabulary lacks it), cls: [CLS]. Curate with the same "
                "--itm-first-token", "choices": list(ITM_FIRST_TOKENS)})


@dataclass(kw_only=True)
class PretrainModel:
    """What `capfilt pretrain` trains."""

    arch: str = field(metadata={
        "help": "blip: ITC+ITM+LM; blip2: Q-Former stage 1 (ITC+ITM+ITG); clip: open_clip ClipLoss",
        "choices": ["blip", "blip2", "clip"]})
    init: str | None = field(default=None, metadata={
        "help": "start from this model directory (DIR/captioner + DIR/itm, a single HF BLIP/BLIP-2 directory, "
                "or a CLIP directory) instead of a tiny random model"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "tokenizer directory for a fresh BLIP model (when absent, one is trained on the synthetic "
                "corpus by model.builders.tiny)"})
    model_config: str | None = field(default=None, metadata={
        "help": 'JSON file deep-merged into the fresh model\'s config, e.g. {"vision_config": '
                '{"num_hidden_layers": 12}}'})
    vision_init: str | None = field(default=None, metadata={
        "help": "vision tower weights: timm:NAME[:FILE], hf:DIR, or (blip2 frozen tower) "
                "open_clip:NAME:PRETRAINED", "metavar": "SPEC"})
    tasks: str | None = field(default=None, metadata={
        "help": "comma list of losses (blip: itc,itm,lm; blip2: itc,itm,itg)"})
    prompt: str = field(default=BlipTrainConfig.prompt, metadata={
        "help": "LM prompt masked out of the targets (blip)"})


def add_training_arguments(parser, model_options, loop_defaults: dict | None = None) -> None:
    """The options of pretrain (`model_options` PretrainModel) or finetune."""
    options.add_arguments(parser, model_options)
    options.add_arguments(parser, TrainingData)
    options.add_arguments(parser, TrainConfig, defaults=loop_defaults)
    options.add_arguments(parser, Objectives)


def itm_options(args, draw: str) -> dict:
    """The train config's ITM negative options; --itm-negatives random is uniform for every step.
    `draw`: the task's reference rule, used when --itm-draw is unset."""
    steps = 1 << 62 if args.itm_negatives == "random" else args.itm_random_steps
    return {"itm_random_steps": steps, "itm_hard_fraction": args.itm_hard_fraction,
            "itm_draw": args.itm_draw or draw}


def sources(args):
    """The --data / --mix sources, checked before any model is built."""
    from capfilt.model.training.data import SourceSpec, expand_paths

    specs = [SourceSpec(args.data, 1.0, args.data)] if args.data else []
    specs += [SourceSpec.parse(m) for m in args.mix]
    if not specs:
        raise ValueError("give --data GLOB and/or --mix GLOB:WEIGHT ...")
    for spec in specs:
        expand_paths(spec.paths)  # raises naming the glob that matches nothing
    return specs


def refuse_options(given: dict[str, bool], why: str) -> None:
    """ValueError naming every option in `given` that is set: it would be silently ignored."""
    names = [name for name, is_set in given.items() if is_set]
    if names:
        raise ValueError(f"{', '.join(names)} {'does' if len(names) == 1 else 'do'} not apply {why}")


def momentum_options(args) -> dict[str, bool]:
    return {"--momentum": args.momentum, "--queue-size": bool(args.queue_size), "--alpha": args.alpha is not None,
            "--alpha-warmup-steps": args.alpha_warmup_steps is not None}


# BLIP ramps alpha up from 0 over the first two epochs when pretraining (pretrain.py, lines 57-58)
# and over the first epoch when finetuning for retrieval (train_retrieval.py, lines 46-49).
PRETRAIN_RAMP_EPOCHS, FINETUNE_RAMP_EPOCHS = 2, 1


def momentum_kwargs(args, ramp_epochs: int) -> dict:
    """BlipTrainConfig's momentum options; an unset --alpha keeps the config's default (BLIP's),
    an unset --alpha-warmup-steps ramps over `ramp_epochs` epochs (`alpha_ramp_steps`)."""
    return {"momentum": args.momentum, "queue_size": args.queue_size,
            "alpha_warmup_steps": alpha_ramp_steps(args, ramp_epochs),
            **({"alpha": args.alpha} if args.alpha is not None else {})}


def alpha_ramp_steps(args, epochs: int) -> int:
    """--alpha-warmup-steps or, unset with --momentum, BLIP's ramp: `epochs` epochs of the --data /
    --mix rows (`data.epoch_rows`) at the global batch (batch size x accum x world size)."""
    if args.alpha_warmup_steps is not None or not args.momentum:
        return args.alpha_warmup_steps or 0
    from capfilt.model.training.data import epoch_rows

    rows = epoch_rows(sources(args))
    global_batch = args.batch_size * args.accum * int(os.environ.get("WORLD_SIZE", "1"))
    steps = epochs * max(1, rows // global_batch)  # an epoch is a whole number of steps, at least one
    log.info("alpha ramps up over %d steps: %d epoch(s) of %d rows at a global batch of %d",
             steps, epochs, rows, global_batch)
    return steps


def itm_negative_options(args) -> dict[str, bool]:
    return {"--itm-negatives random": args.itm_negatives != "hard", "--itm-random-steps": args.itm_random_steps != 0,
            "--itm-hard-fraction": args.itm_hard_fraction != 1.0, "--itm-draw": args.itm_draw is not None,
            "--itm-first-token cls": args.itm_first_token != "enc"}


def check_arch_options(args) -> None:
    """Options the chosen architecture (or --init) would ignore are errors."""
    if args.init:
        refuse_options({"--tokenizer": args.tokenizer is not None, "--model-config": args.model_config is not None},
                       "with --init: they shape a fresh model, --init loads one")
    if args.arch == "clip":
        refuse_options({"--vision-init": bool(args.vision_init), "--tasks": bool(args.tasks),
                        "--prompt": bool(args.prompt), "--tokenizer": args.tokenizer is not None,
                        **momentum_options(args), **itm_negative_options(args)},
                       "to --arch clip: it trains open_clip's model and tokenizer with ClipLoss (in-batch)")
    elif args.arch == "blip2":
        refuse_options({**momentum_options(args), "--prompt": bool(args.prompt)},
                       "to --arch blip2: BLIP-2 stage 1 has in-batch ITC (no momentum encoder or queue) "
                       "and ITG without a prompt")


def prepare_run_dir(args, run_name: str, exports: tuple[str, ...] | None = None) -> None:
    """Refuse an --out that already holds this run unless --resume (continue it) or --overwrite
    (delete it first): a fresh run there would mix the old model, checkpoints and log with the
    new ones. `exports` None: everything in --out is the run's (pretrain; its init/ is the
    fresh model a resume reuses). Otherwise the run owns only its checkpoints, log, summary
    and these export directories (the two finetunes may share one --out)."""
    out = Path(args.out)
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite deletes it: give one of them")
    if args.resume or not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} is a file, expected a directory")
    if exports is None:
        owned = sorted(out.iterdir())
        if [p.name for p in owned] == ["init"]:
            # A run that stopped before its first step (bad data, a bad --vision-init) leaves only
            # the fresh model it built; rebuild it from this command's options, without asking.
            shutil.rmtree(out / "init")
            log.info("--out %s held only an untrained init/ from an earlier attempt: rebuilt", out)
            return
    else:
        owned = [p for p in (out / "checkpoints" / run_name, out / f"{run_name}_log.jsonl",
                             out / f"{run_name}_summary.json", *(out / e for e in exports)) if p.exists()]
    if not owned:
        return
    if exports is None:  # everything in --out would be deleted: it must be a training run's
        outputs.check_own(out, outputs.TRAINING, "pretrain")
    if not args.overwrite:
        names = ", ".join(p.name for p in owned[:4]) + (", ..." if len(owned) > 4 else "")
        raise ValueError(f"--out {out} is not empty (it holds {names}): pass --resume to continue the run "
                         "there, or --overwrite to delete it and start again")
    for path in owned:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    log.warning("--overwrite: deleted %d entr%s of %s", len(owned), "y" if len(owned) == 1 else "ies", out)


# The options that shape the model or its losses: a resumed run must give the same ones.
MODEL_OPTIONS = ("arch", "task", "init", "model_config", "tokenizer", "vision_init", "tasks", "prompt",
                 "max_text_len", "momentum", "queue_size", "alpha", "alpha_warmup_steps", "itm_negatives",
                 "itm_random_steps", "itm_hard_fraction", "itm_draw", "itm_first_token")


def model_options(args) -> dict:
    """This command's MODEL_OPTIONS as a resume compares them: directories resolved (the same
    one however it was spelt) and --model-config by its contents (the file may be edited)."""
    options = {}
    for name in MODEL_OPTIONS:
        if not hasattr(args, name):
            continue
        value = getattr(args, name)
        if name in ("init", "tokenizer") and value:
            value = str(Path(value).resolve())
        elif name == "model_config" and value:
            value = json.loads(Path(value).read_text())
        options[name] = value
    return options


INIT_RECORD = "options.json"  # in OUT/init: the options the fresh model was built from


def init_record(args) -> dict:
    """What shaped pretrain's fresh OUT/init model (--vision-init is applied on top, every run):
    --arch, --model-config and --tokenizer as model_options has them, and --seed."""
    return {**{k: v for k, v in model_options(args).items() if k in ("arch", "model_config", "tokenizer")},
            "seed": args.seed}


def check_init_record(args) -> None:
    """--resume reuses OUT/init, the fresh model an earlier attempt built: refuse it when this
    command would build another one (other --model-config, --seed, --tokenizer or --arch)."""
    from capfilt.model.training.loop import differing_option

    if not args.resume or args.init:
        return
    path = Path(args.out) / "init" / INIT_RECORD
    if path.is_file():
        problem = differing_option(json.loads(path.read_text()), init_record(args))
        if problem:
            raise ValueError(f"--resume: {path.parent} was built with other options ({problem}); resume with "
                             "the same options, or start again with --overwrite")
    elif (Path(args.out) / "init").is_dir():
        log.warning("--resume: %s has no %s (the run stopped before it was written): its model "
                    "options cannot be checked", Path(args.out) / "init", INIT_RECORD)


def write_init_record(args) -> None:
    if args.init is None and int(os.environ.get("RANK", "0")) == 0:
        (Path(args.out) / "init" / INIT_RECORD).write_text(json.dumps(init_record(args), indent=1) + "\n")


def loop_config(args, run_name: str):
    if args.queue_size and not args.momentum:
        raise ValueError("--queue-size needs --momentum (the queue holds momentum features)")
    if args.alpha is not None and not args.momentum:
        raise ValueError(f"--alpha {args.alpha} needs --momentum (it weighs the momentum encoder's soft targets)")
    if args.alpha_warmup_steps is not None and not args.momentum:
        raise ValueError(f"--alpha-warmup-steps {args.alpha_warmup_steps} needs --momentum (it ramps the soft targets)")
    if args.alpha_warmup_steps is not None and args.alpha_warmup_steps < 0:
        raise ValueError(f"--alpha-warmup-steps must be >= 0, got {args.alpha_warmup_steps}")
    if args.itm_negatives == "random" and args.itm_hard_fraction != 1.0:
        raise ValueError(f"--itm-hard-fraction {args.itm_hard_fraction} needs --itm-negatives hard "
                         "(random draws every negative uniformly)")
    if args.itm_negatives == "random" and args.itm_draw is not None:
        raise ValueError(f"--itm-draw {args.itm_draw} needs --itm-negatives hard (random draws every negative uniformly)")
    return options.from_args(TrainConfig, args, run_name=run_name, model_options=model_options(args))


def build_on_rank0_first(build, prepare=None):
    """Rank 0 runs `prepare` (checks and clears --out) and builds first (it may write the
    initial model files), then the other ranks build. Only rank 0 looks at --out: another rank
    could see rank 0's fresh files and take them for an old run."""
    import torch.distributed as dist

    from capfilt.model.training.loop import setup_distributed

    rank, world, _ = setup_distributed()
    if rank == 0 and prepare is not None:
        prepare()
    model = build() if rank == 0 else None
    if world > 1:
        dist.barrier()
    return model if rank == 0 else build()


def add_arguments(parser) -> None:
    add_training_arguments(parser, PretrainModel)


def run(args) -> int:
    check_arch_options(args)
    overrides = json.loads(Path(args.model_config).read_text()) if args.model_config else None
    cfg, data = loop_config(args, "pretrain"), sources(args)

    def prepare():
        prepare_run_dir(args, "pretrain")
        check_init_record(args)

    def build():
        model = build_model(args, overrides)
        write_init_record(args)
        return model

    return report(train(build_on_rank0_first(build, prepare), data, cfg))


def build_model(args, overrides):
    if args.arch == "blip":
        from capfilt.model.training.blip import TASKS, BlipTrainConfig, build_blip

        tasks = tuple(args.tasks.split(",")) if args.tasks else TASKS
        cfg = BlipTrainConfig(tasks=tasks, **momentum_kwargs(args, PRETRAIN_RAMP_EPOCHS),
                              max_text_len=args.max_text_len, prompt=args.prompt,
                              itm_first_token=args.itm_first_token, **itm_options(args, "pretrain"))
        return build_blip(cfg, args.out, init=args.init, seed=args.seed, tokenizer_dir=args.tokenizer,
                          overrides=overrides, vision_init=args.vision_init)
    if args.arch == "blip2":
        from capfilt.model.training.blip2 import TASKS, Blip2TrainConfig, build_blip2

        tasks = tuple(args.tasks.split(",")) if args.tasks else TASKS
        cfg = Blip2TrainConfig(tasks=tasks, max_text_len=args.max_text_len,
                               **itm_options(args, "retrieval"))
        return build_blip2(cfg, args.out, init=args.init, seed=args.seed, tokenizer_dir=args.tokenizer,
                           overrides=overrides, vision_init=args.vision_init)
    from capfilt.model.training.clip import build_clip

    return build_clip(args.out, init=args.init, seed=args.seed, overrides=overrides)


def train(model, data, cfg) -> dict:
    from capfilt.model.training.loop import Trainer

    return Trainer(model, data, cfg).train()


def report(summary: dict) -> int:
    """One JSON line: what the run exported, or where it stopped (``--stop-after``). Under
    torchrun only rank 0 exports, so the other ranks print nothing."""
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if summary["finished"]:
        print(json.dumps({"exported": summary["exported"], "steps": summary["steps"], "last": summary["last"]}))
    else:
        print(json.dumps({"stopped_at": summary["steps"], "resume_with": "--resume"}))
    return 0
