"""Writing the synthetic noisy-web world: img2dataset-format shards plus the ground truth.

    <out>/web/00000.parquet ...    noisy web split    (transforms.schemas.RAW_SCHEMA)
    <out>/human/00000.parquet ...  clean, COCO-like   (finetuning the captioner and filter)
    <out>/test/00000.parquet ...   clean, held out    (evaluation)
    <out>/truth.parquet            one row per image   (transforms.synth.scenes.TRUTH_SCHEMA)
    <out>/synth_config.json        the settings and the realised counts

Everything random about row `key` comes from `sample_seed(seed, key)`, and which web rows are
noisy comes from one permutation seeded by `seed`; JPEG settings are fixed and nothing
time-dependent is written, so the same settings give the same bytes.

The world appears whole or not at all: it is written into `.NAME.partial-PID-XXXXXXXX` beside
`out` (a marker file inside says whose it is) and renamed into place at the end, so a failed,
interrupted or kill -9'd run leaves `out` as it was and the same command can simply be re-run;
the next run deletes a staging leftover whose process is gone, and puts back a previous world
that a kill inside the swap left parked (`transforms.files.staging`).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.transforms.files import outputs
from capfilt.transforms.files.hashing import bytes_sha256
from capfilt.transforms.files.staging import Staging
from capfilt.transforms.image import encode_jpeg
from capfilt.transforms.schemas import RAW_SCHEMA
from capfilt.transforms.seeding import sample_seed
from capfilt.transforms.synth.scenes import (
    NOISE_TYPES, TRUTH_SCHEMA, Scene, corrupt, describe, junk_caption, sample_scene,
)
from capfilt.transforms.synth.render import render

SPLITS = ("web", "human", "test")
NOISY = ("other", "attribute", "junk")
DEFAULT_NOISE_MIX = {"other": 0.35, "attribute": 0.35, "junk": 0.30}
URL_PREFIX = "https://synthetic.capfilt.invalid"  # .invalid: reserved, never resolves
JPEG_QUALITY = 95
WORLD_FILES = ("truth.parquet", "synth_config.json")
# Written into the staging directory: a later run deletes a leftover `.NAME.partial-PID-X`
# only when it carries this marker and process PID is gone (a kill -9 runs no cleanup).
STAGE_MARKER = ".capfilt-synth-partial"


def parse_noise_mix(text: str) -> dict[str, float]:
    """'other=0.4,attribute=0.3,junk=0.3' -> dict; weights are relative (normalised later)."""
    mix = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in NOISY:
            raise ValueError(f"bad --noise-mix entry {part!r}: expected NAME=WEIGHT with NAME in {NOISY}")
        try:
            mix[name] = float(value)
        except ValueError:
            raise ValueError(f"bad weight in --noise-mix entry {part!r}") from None
    if not mix:
        raise ValueError("--noise-mix is empty")
    return mix


@dataclass
class SynthConfig:
    """The world's options (`capfilt synth`; the ``help`` metadata makes a field a CLI option)."""

    n: int = field(default=2000, metadata={"help": "number of web images"})
    noise: float = field(default=0.45, metadata={
        "help": "fraction of web captions that are noisy (exact count: round(noise*n))"})
    seed: int = field(default=0, metadata={"help": "world seed"})
    image_size: int = field(default=64, metadata={"help": "image side in pixels"})
    human: int | None = field(default=None, metadata={
        "help": "clean human-labelled images; n // 4 when not given"})
    test: int | None = field(default=None, metadata={"help": "clean held-out test images; n // 4 when not given"})
    rows_per_shard: int = field(default=1000, metadata={"help": "rows per parquet shard"})
    noise_mix: dict = field(default_factory=lambda: dict(DEFAULT_NOISE_MIX), metadata={  # among noisy rows
        "help": "relative weights of the noise types among noisy web captions; missing types get 0 "
                f"(default: {','.join(f'{k}={v:.2f}' for k, v in DEFAULT_NOISE_MIX.items())})",
        "type": parse_noise_mix, "metavar": "other=W,attribute=W,junk=W"})
    two_object_prob: float = 0.35

    def counts(self) -> dict[str, int]:
        quarter = self.n // 4
        return {"web": self.n, "human": quarter if self.human is None else self.human,
                "test": quarter if self.test is None else self.test}

    def validate(self) -> None:
        for name, value in (("n", self.n), *self.counts().items()):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {self.noise}")
        if self.rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {self.rows_per_shard}")
        if not 16 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be in 16..1024, got {self.image_size}")
        unknown = set(self.noise_mix) - set(NOISY)
        if unknown:
            raise ValueError(f"unknown noise type(s) {sorted(unknown)}; expected {NOISY}")
        if any(v < 0 for v in self.noise_mix.values()) or sum(self.noise_mix.values()) <= 0:
            raise ValueError(f"noise mix weights must be >= 0 with a positive sum: {self.noise_mix}")


def noise_labels(n: int, noise: float, mix: dict, seed: int) -> list[str]:
    """Exactly round(noise * n) noisy labels split by `mix` (largest remainder), the rest
    "correct", in a seeded random order."""
    total = sum(mix.values())
    n_noisy = int(round(noise * n))
    share = {k: n_noisy * mix.get(k, 0.0) / total for k in NOISY}
    counts = {k: int(np.floor(v)) for k, v in share.items()}
    by_remainder = sorted(NOISY, key=lambda k: (counts[k] - share[k], NOISY.index(k)))
    for k in by_remainder[: n_noisy - sum(counts.values())]:
        counts[k] += 1
    labels = ["correct"] * (n - n_noisy) + [k for k in NOISY for _ in range(counts[k])]
    order = np.random.default_rng([int(seed), 0xA015E]).permutation(n)
    return [labels[i] for i in order]


def _plan_split(split: str, count: int, cfg: SynthConfig) -> list[dict]:
    """Scenes and clean captions of one split, one dict per row (images come later)."""
    rows = []
    for i in range(count):
        key = f"{split}_{i:07d}"  # unique across splits; letters, digits, "_" only
        rng = np.random.default_rng(sample_seed(cfg.seed, key))
        scene = sample_scene(rng, cfg.two_object_prob)
        rows.append({"key": key, "split": split, "scene": scene, "rng": rng,
                     "true_caption": describe(scene, rng), "noise_type": "correct",
                     "wrong": (None, None, None), "source_key": None})
    return rows


def _apply_noise(rows: list[dict], cfg: SynthConfig) -> None:
    """Give every web row its caption according to its noise label."""
    labels = noise_labels(len(rows), cfg.noise, cfg.noise_mix, cfg.seed)
    if "other" in labels and len({r["scene"].signature() for r in rows}) < 2:
        raise ValueError("'other' noise needs at least two web images with different scenes; "
                         f"got {len(rows)} web image(s)")
    for row, label in zip(rows, labels):
        rng, scene = row["rng"], row["scene"]
        row["noise_type"] = label
        if label == "correct":
            row["caption"] = row["true_caption"]
        elif label == "junk":
            row["caption"] = junk_caption(rng)
        elif label == "attribute":
            wrong_scene, attribute, index, value = corrupt(scene, rng)
            row["caption"] = describe(wrong_scene, rng)
            row["wrong"] = (attribute, index, value)
        else:  # "other": the clean caption of a different-looking web image
            while True:
                other = rows[int(rng.integers(len(rows)))]
                if other["scene"].signature() != scene.signature():
                    break
            row["caption"] = other["true_caption"]
            row["source_key"] = other["key"]


def _truth_row(row: dict) -> dict:
    scene: Scene = row["scene"]
    attribute, index, value = row["wrong"]
    return {
        "key": row["key"], "split": row["split"], "noise_type": row["noise_type"],
        "caption": row["caption"], "true_caption": row["true_caption"],
        "n_objects": len(scene.objects),
        "shapes": [o.shape for o in scene.objects], "colours": [o.colour for o in scene.objects],
        "sizes": [o.size for o in scene.objects], "positions": [o.position for o in scene.objects],
        "background": scene.background, "background_colour": scene.background_colour,
        "wrong_attribute": attribute, "wrong_object": index, "wrong_value": value,
        "source_key": row["source_key"],
    }


def _raw_row(row: dict, size: int) -> dict:
    jpg = encode_jpeg(render(row["scene"], size, row["rng"]), quality=JPEG_QUALITY)
    return {
        "key": row["key"], "url": f"{URL_PREFIX}/{row['split']}/{row['key']}.jpg",
        "caption": row["caption"], "status": "success", "error_message": None,
        "width": size, "height": size, "original_width": size, "original_height": size,
        "exif": "{}", "sha256": bytes_sha256(jpg), "jpg": jpg,
    }


def _foreign_entry(out: Path) -> Path | None:
    """The first entry of directory `out` that a synthetic world does not hold, else None: a
    world is web/, human/, test/ with only *.parquet files, truth.parquet and synth_config.json."""
    for entry in sorted(out.iterdir()):
        if entry.name in SPLITS and entry.is_dir() and not entry.is_symlink():
            for shard in sorted(entry.iterdir()):
                if shard.suffix != ".parquet" or shard.is_symlink() or not shard.is_file():
                    return shard
        elif not (entry.name in WORLD_FILES and entry.is_file() and not entry.is_symlink()):
            return entry
    return None


def check_world_out(out: Path, overwrite: bool) -> None:
    """Refuse an `out` this run must not replace. The world replaces `out` as a whole, so a
    non-empty `out` must be a synthetic world (then `overwrite` is needed): anything else in it
    would be deleted, and is refused even with `overwrite`."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    if os.path.ismount(out):  # its staging sibling would be on another filesystem: no rename
        raise ValueError(f"--out {out} is a mount point; synth renames a finished world into place, "
                         "so give a directory inside it")
    if not any(out.iterdir()):
        return
    outputs.check_own(out, outputs.SYNTH, "synth", unmarked_ok=True)  # another command's: named
    foreign = _foreign_entry(out)
    if foreign is not None:
        raise ValueError(f"--out {out} is not empty and is not a synthetic world ({foreign} is not "
                         "synth's); synth replaces --out as a whole, even with --overwrite: choose "
                         "another --out or empty it yourself")
    if not overwrite:
        shards = sum(len(list((out / split).glob("*.parquet"))) for split in SPLITS)
        raise ValueError(f"{out} already holds a synthetic world ({shards} parquet shard(s)); pass "
                         "overwrite (--overwrite) to replace it")


def _staging(out: Path) -> Staging:
    """The staged write of world `out`: `.NAME.partial-PID-XXXXXXXX/world`, the previous world
    parked in the same marked directory during the swap. Its leftovers are deleted only when
    they hold STAGE_MARKER and PID is gone; a parked previous world goes back to `out` first."""
    return Staging(out, marker=STAGE_MARKER, note="staging directory of `capfilt synth`; safe to delete\n",
                   inner="world")


def _write_shards(out: Path, plans: dict, cfg: SynthConfig, progress) -> dict:
    """Write every split's shards, truth.parquet and synth_config.json into new directory `out`."""
    truth = []
    shards = {}
    for split in SPLITS:
        rows = plans[split]
        shards[split] = 0
        (out / split).mkdir(parents=True)
        for shard, start in enumerate(range(0, len(rows), cfg.rows_per_shard)):
            chunk = rows[start : start + cfg.rows_per_shard]
            table = pa.Table.from_pylist([_raw_row(r, cfg.image_size) for r in chunk], schema=RAW_SCHEMA)
            pq.write_table(table, out / split / f"{shard:05d}.parquet")
            shards[split] += 1
            if progress is not None:
                progress(len(chunk))
        truth.extend(_truth_row(r) for r in rows)
    pq.write_table(pa.Table.from_pylist(truth, schema=TRUTH_SCHEMA), out / "truth.parquet")
    noise_counts = {k: 0 for k in NOISE_TYPES}
    for row in plans["web"]:
        noise_counts[row["noise_type"]] += 1
    summary = {"config": asdict(cfg), "rows": cfg.counts(), "shards": shards,
               "web_noise_counts": noise_counts}
    (out / "synth_config.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def write_world(out_dir, cfg: SynthConfig, overwrite: bool = False, progress=None) -> dict:
    """Generate the world into `out_dir`; return the realised counts (also in
    synth_config.json). `progress(n_rows)` is called after each written shard.

    `out_dir` must be absent, empty, or (with `overwrite`) a synthetic world, which is replaced
    as a whole; the new world is built beside it and renamed into place when complete."""
    cfg.validate()
    # absolute: `.` and `..` have no name to put beside them; a symlink's target is replaced
    # and the link stays valid
    out = Path(out_dir).resolve() if Path(out_dir).is_symlink() else Path(os.path.abspath(out_dir))
    staging = _staging(out)
    staging.clean_leftovers()
    check_world_out(out, overwrite)  # fail before anything is rendered
    counts = cfg.counts()
    plans = {split: _plan_split(split, counts[split], cfg) for split in SPLITS}
    _apply_noise(plans["web"], cfg)
    for split in ("human", "test"):
        for row in plans[split]:
            row["caption"] = row["true_caption"]
    stage = staging.create(f"cannot write the world to --out {out}")
    try:
        summary = _write_shards(stage, plans, cfg, progress)
        check_world_out(out, overwrite)  # again: another run may have written `out` meanwhile
        staging.swap()
    finally:
        staging.discard()
    return summary
