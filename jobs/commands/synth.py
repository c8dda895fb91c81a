"""`capfilt synth` — generate the synthetic noisy-web world (transforms/synth_world.py).

    capfilt synth --out world --n 2000 --noise 0.45 --seed 0

writes `world/{web,human,test}/*.parquet` (img2dataset parquet format) and `world/truth.parquet`.
The world is built beside `world` and renamed into place when complete, so an interrupted run
(even kill -9) leaves `world` as it was and the same command can be re-run.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

HELP = "Generate the synthetic noisy-web world (img2dataset-format shards + truth)"
DESCRIPTION = (
    "Render a synthetic image-text world with PIL: 1-2 shapes (shape, colour, size, position) "
    "on simple backgrounds, captioned in several phrasings. The web split is noisy (captions of "
    "other images, one wrong attribute, junk alt-text); human and test are clean. Writes "
    "OUT/{web,human,test}/*.parquet in img2dataset's parquet format and OUT/truth.parquet with "
    "the ground truth of every row. The same options give the same bytes. OUT appears whole or "
    "not at all: an interrupted run leaves it as it was."
)
NOISY = ("other", "attribute", "junk")  # = transforms.synth_world.NOISY (keeps --help light)

log = logging.getLogger(__name__)


def parse_noise_mix(text: str) -> dict[str, float]:
    """'other=0.4,attribute=0.3,junk=0.3' -> dict; weights are relative (normalised later)."""
    mix = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in NOISY:
            raise argparse.ArgumentTypeError(
                f"bad --noise-mix entry {part!r}: expected NAME=WEIGHT with NAME in {NOISY}")
        try:
            mix[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad weight in --noise-mix entry {part!r}") from None
    if not mix:
        raise argparse.ArgumentTypeError("--noise-mix is empty")
    return mix


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--n", type=int, default=2000, help="number of web images")
    parser.add_argument("--noise", type=float, default=0.45,
                        help="fraction of web captions that are noisy (exact count: round(noise*n))")
    parser.add_argument("--seed", type=int, default=0, help="world seed")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--human", type=int, default=None,
                        help="clean human-labelled images; n // 4 when not given")
    parser.add_argument("--test", type=int, default=None,
                        help="clean held-out test images; n // 4 when not given")
    parser.add_argument("--rows-per-shard", type=int, default=1000, help="rows per parquet shard")
    parser.add_argument(
        "--noise-mix", type=parse_noise_mix, default=None, metavar="other=W,attribute=W,junk=W",
        help="relative weights of the noise types among noisy web captions; missing types get 0 "
        "(default: other=0.35,attribute=0.35,junk=0.30)",
    )
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the synthetic world already in OUT instead of failing "
                        "(a non-empty OUT that is not one is refused even so)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args) -> int:
    from tqdm import tqdm

    from capfilt.transforms.synth.world import DEFAULT_NOISE_MIX, SynthConfig, write_world

    cfg = SynthConfig(
        n=args.n, noise=args.noise, seed=args.seed, image_size=args.image_size,
        human=args.human, test=args.test, rows_per_shard=args.rows_per_shard,
        noise_mix=dict(args.noise_mix or DEFAULT_NOISE_MIX),
    )
    cfg.validate()  # fail before anything is written
    total = sum(cfg.counts().values())
    with tqdm(total=total, unit="img", desc="synth", disable=args.no_progress or None) as bar:
        summary = write_world(args.out, cfg, overwrite=args.overwrite, progress=bar.update)
    log.info("wrote %s: rows %s, web noise %s", args.out, summary["rows"], summary["web_noise_counts"])
    print(json.dumps({"out": str(args.out), **{k: summary[k] for k in ("rows", "web_noise_counts")}}))
    return 0
