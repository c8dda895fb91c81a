"""`capfilt models` — build the tiny model directories the tests and the demo start from.

    capfilt models init --kind captioner --out models/captioner [--tokenizer DIR] [--seed 0] [--overwrite]
    capfilt models tokenizer --out models/tokenizer

`init` writes a random-initialised directory that `from_pretrained` (BLIP kinds) or
`open_clip.create_model_and_transforms("local-dir:DIR")` (clip) reads back; see model/tiny.py.
A non-empty --out is refused unless --overwrite is given, which replaces it: writing one model
into another's directory would mix their files (a clip directory holding a BLIP config.json).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from capfilt.jobs.cli import HelpFormatter

DESCRIPTION = (
    "Build the project's own tiny models (no hub download): `init` writes a random-initialised "
    "BLIP captioner, BLIP ITM, BLIP-2 Q-Former ITM or open_clip CLIP directory from the JSON "
    "configs in model/configs/; `tokenizer` trains the WordPiece tokenizer on the synthetic "
    "world's captions."
)
KINDS = ("captioner", "itm", "blip2-itm", "clip")  # = model.tiny.KINDS; kept here so --help stays light

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "examples: `capfilt models tokenizer --out models/tokenizer`; `capfilt models init "
        "--kind captioner --out models/captioner --tokenizer models/tokenizer --seed 0`. "
        "Run `capfilt models init --help` for every option."
    )
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION")
    sub.required = True
    init = sub.add_parser(
        "init",
        help="write a random-initialised tiny model directory",
        description="Write a random-initialised tiny model directory.",
        formatter_class=HelpFormatter,
    )
    init.add_argument("--kind", required=True, choices=KINDS, help="which model to build")
    init.add_argument("--out", required=True, type=Path,
                      help="output model directory; must be empty or absent unless --overwrite")
    init.add_argument("--overwrite", action="store_true",
                      help="replace a non-empty --out (its old contents are deleted once the model is built)")
    init.add_argument(
        "--tokenizer", type=Path, default=None,
        help="tokenizer directory from `capfilt models tokenizer` (BLIP kinds; default: train "
        "one now on the synthetic corpus). Ignored for clip, which uses open_clip's BPE.",
    )
    init.add_argument("--seed", type=int, default=0, help="weight-initialisation seed")
    init.add_argument(
        "--override", default=None, metavar="JSON",
        help='JSON deep-merged into the kind\'s config, e.g. \'{"text_config": {"num_hidden_layers": 2}}\'',
    )
    tok = sub.add_parser(
        "tokenizer",
        help="train the WordPiece tokenizer on the synthetic corpus",
        description="Train the BLIP-layout WordPiece tokenizer ([DEC] bos, [ENC]) on the "
        "synthetic world's captions.",
        formatter_class=HelpFormatter,
    )
    tok.add_argument("--out", required=True, type=Path, help="output tokenizer directory")
    tok.add_argument("--seed", type=int, default=0, help="seed of the synthetic corpus")
    tok.add_argument("--n", type=int, default=4000, help="number of sample scenes in the corpus")


def run(args) -> int:
    from capfilt.model.builders import tiny
    from capfilt.transforms.synth.scenes import corpus

    if args.models_command == "tokenizer":
        out = tiny.train_tokenizer(args.out, texts=corpus(seed=args.seed, n=args.n))
        log.info("tokenizer written to %s (%d tokens)", out, len(tiny.load_tokenizer(out)))
        print(out)
        return 0
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
