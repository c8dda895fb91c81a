"""`capfilt models` — build the tiny model directories the tests and the demo start from.

    capfilt models init --kind captioner --out models/captioner [--tokenizer DIR] [--seed 0] [--overwrite]
    capfilt models tokenizer --out models/tokenizer

`init` writes a random-initialised directory that `from_pretrained` (BLIP kinds) or
`open_clip.create_model_and_transforms("local-dir:DIR")` (clip) reads back; see model/builders/tiny.py.
A non-empty --out is refused unless --overwrite is given, which replaces it: writing one model
into another's directory would mix their files (a clip directory holding a BLIP config.json).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from capfilt.jobs import options
from capfilt.jobs.cli import HelpFormatter
from capfilt.model.builders.tiny import KINDS

DESCRIPTION = (
    "Build the project's own tiny models (no hub download): `init` writes a random-initialised "
    "BLIP captioner, BLIP ITM, BLIP-2 Q-Former ITM or open_clip CLIP directory from the JSON "
    "configs in model/configs/; `tokenizer` trains the WordPiece tokenizer on the synthetic "
    "world's captions."
)
log = logging.getLogger(__name__)


@dataclass
class ModelInit:
    """`capfilt models init`."""

    kind: str = field(metadata={"help": "which model to build", "choices": KINDS})
    out: Path = field(metadata={"help": "output model directory; must be empty or absent unless --overwrite",
                                "type": Path})
    overwrite: bool = field(default=False, metadata={
        "help": "replace a model directory in --out (its old contents are deleted once the model is built); "
                "a directory another command wrote is refused even so"})
    tokenizer: Path | None = field(default=None, metadata={
        "help": "tokenizer directory from `capfilt models tokenizer` (BLIP kinds; default: train one now on the "
                "synthetic corpus). Ignored for clip, which uses open_clip's BPE.", "type": Path})
    seed: int = field(default=0, metadata={"help": "weight-initialisation seed"})
    override: str | None = field(default=None, metadata={
        "help": 'JSON deep-merged into the kind\'s config, e.g. \'{"text_config": {"num_hidden_layers": 2}}\'',
        "metavar": "JSON"})


@dataclass
class TokenizerBuild:
    """`capfilt models tokenizer`."""

    out: Path = field(metadata={"help": "output tokenizer directory", "type": Path})
    seed: int = field(default=0, metadata={"help": "seed of the synthetic corpus"})
    n: int = field(default=4000, metadata={"help": "number of sample scenes in the corpus"})


def add_arguments(parser) -> None:
    parser.epilog = (
        "examples: `capfilt models tokenizer --out models/tokenizer`; `capfilt models init "
        "--kind captioner --out models/captioner --tokenizer models/tokenizer --seed 0`. "
        "Run `capfilt models init --help` for every option."
    )
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION")
    sub.required = True
    init = sub.add_parser("init", help="write a random-initialised tiny model directory", allow_abbrev=False,
                          description="Write a random-initialised tiny model directory.", formatter_class=HelpFormatter)
    options.add_arguments(init, ModelInit)
    tok = sub.add_parser(
        "tokenizer",
        allow_abbrev=False,
        help="train the WordPiece tokenizer on the synthetic corpus",
        description="Train the BLIP-layout WordPiece tokenizer ([DEC] bos, [ENC]) on the "
        "synthetic world's captions.",
        formatter_class=HelpFormatter,
    )
    options.add_arguments(tok, TokenizerBuild)


def run(args) -> int:
    from capfilt.model.builders import tiny
    from capfilt.transforms.synth.scenes import corpus

    if args.models_command == "tokenizer":
        args = options.from_args(TokenizerBuild, args)
        out = tiny.train_tokenizer(args.out, texts=corpus(seed=args.seed, n=args.n))
        log.info("tokenizer written to %s (%d tokens)", out, len(tiny.load_tokenizer(out)))
        print(out)
        return 0
    args = options.from_args(ModelInit, args)
    overrides = None
    if args.override:
        try:
            overrides = json.loads(args.override)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--override is not valid JSON ({exc}): {args.override!r}") from exc
        if not isinstance(overrides, dict):
            raise ValueError(f"--override must be a JSON object, got {args.override!r}")
    if args.tokenizer is not None and not args.tokenizer.is_dir():
        raise ValueError(f"--tokenizer {args.tokenizer}: no such directory")
    log.info("building tiny %s model (seed %d) in %s", args.kind, args.seed, args.out)
    out = tiny.init_model(args.kind, args.out, tokenizer_dir=args.tokenizer, seed=args.seed,
                          overrides=overrides, exist_ok=False, overwrite=args.overwrite)
    print(out)
    return 0
