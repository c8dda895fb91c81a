"""`capfilt synth` — generate the synthetic noisy-web world (transforms/synth/world.py).

    capfilt synth --out world --n 2000 --noise 0.45 --seed 0

writes `world/{web,human,test}/*.parquet` (img2dataset parquet format) and `world/truth.parquet`.
The world is built beside `world` and renamed into place when complete, so an interrupted run
(even kill -9) leaves `world` as it was and the same command can be re-run. The world's
options are ``SynthConfig``'s fields; this module adds where it goes.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from capfilt.jobs import options

DESCRIPTION = (
    "Render a synthetic image-text world with PIL: 1-2 shapes (shape, colour, size, position) "
    "on simple backgrounds, captioned in several phrasings. The web split is noisy (captions of "
    "other images, one wrong attribute, junk alt-text); human and test are clean. Writes "
    "OUT/{web,human,test}/*.parquet in img2dataset's parquet format and OUT/truth.parquet with "
    "the ground truth of every row. The same options give the same bytes. OUT appears whole or "
    "not at all: an interrupted run leaves it as it was."
)

log = logging.getLogger(__name__)


@dataclass
class SynthOutput:
    """Where `capfilt synth` writes the world."""

    out: Path = field(metadata={"help": "output directory"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace the synthetic world already in OUT instead of failing "
                "(a non-empty OUT that is not one is refused even so)"})
    no_progress: bool = field(default=False, metadata={"help": "hide the progress bar"})


def add_arguments(parser) -> None:
    from capfilt.transforms.synth.world import SynthConfig

    options.add_arguments(parser, SynthOutput)
    options.add_arguments(parser, SynthConfig)


def run(args) -> int:
    from capfilt.transforms.synth.world import SynthConfig

    return synth(options.from_args(SynthConfig, args), options.from_args(SynthOutput, args))


def synth(cfg, output: SynthOutput) -> int:
    """Write the world of `cfg` to ``output.out`` (what `capfilt synth` and the bootstrap run)."""
    from tqdm import tqdm

    from capfilt.transforms.synth.world import write_world

    cfg.validate()  # fail before anything is written
    total = sum(cfg.counts().values())
    with tqdm(total=total, unit="img", desc="synth", disable=output.no_progress or None) as bar:
        summary = write_world(output.out, cfg, overwrite=output.overwrite, progress=bar.update)
    log.info("wrote %s: rows %s, web noise %s", output.out, summary["rows"], summary["web_noise_counts"])
    print(json.dumps({"out": str(output.out), **{k: summary[k] for k in ("rows", "web_noise_counts")}}))
    return 0
