"""Writing the synthetic noisy-web world: img2dataset-format shards plus the ground truth.

    <out>/web/00000.parquet ...    noisy web split    (transforms.schemas.RAW_SCHEMA)
    <out>/human/00000.parquet ...  clean, COCO-like   (finetuning the captioner and filter)
    <out>/test/00000.parquet ...   clean, held out    (evaluation)
    <out>/truth.parquet            one row per image   (transforms.synth.TRUTH_SCHEMA)
    <out>/synth_config.json        the settings and the realised counts

Everything random about row `key` comes from `sample_seed(seed, key)`, and which web rows are
noisy comes from one permutation seeded by `seed`; JPEG settings are fixed and nothing
time-dependent is written, so the same settings give the same bytes.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from transforms.image import encode_jpeg, image_sha256
from transforms.schemas import RAW_SCHEMA
from transforms.seeding import sample_seed
from transforms.synth import (
    NOISE_TYPES, TRUTH_SCHEMA, Scene, corrupt, describe, junk_caption, sample_scene,
)
from transforms.synth_render import render

SPLITS = ("web", "human", "test")
NOISY = ("other", "attribute", "junk")
DEFAULT_NOISE_MIX = {"other": 0.35, "attribute": 0.35, "junk": 0.30}
URL_PREFIX = "https://synthetic.capfilt.invalid"  # .invalid: reserved, never resolves
JPEG_QUALITY = 95


@dataclass
class SynthConfig:
    n: int = 2000  # web images
    noise: float = 0.45  # fraction of web captions that are noisy
    seed: int = 0
    image_size: int = 64
    human: int | None = None  # default n // 4
    test: int | None = None  # default n // 4
    rows_per_shard: int = 1000
    noise_mix: dict = field(default_factory=lambda: dict(DEFAULT_NOISE_MIX))  # among noisy rows
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
        "exif": "{}", "sha256": image_sha256(jpg), "jpg": jpg,
    }


def _prepare_dir(path: Path, overwrite: bool) -> None:
    old = sorted(path.glob("*.parquet"))
    if old and not overwrite:
        raise ValueError(f"{path} already holds {len(old)} parquet shard(s); pass overwrite "
                         "(--overwrite) to replace them")
    for stale in old:  # a smaller rerun must not leave shards of the previous run behind
        stale.unlink()
    path.mkdir(parents=True, exist_ok=True)


def write_world(out_dir, cfg: SynthConfig, overwrite: bool = False, progress=None) -> dict:
    """Generate the world into `out_dir`; return the realised counts (also in
    synth_config.json). `progress(n_rows)` is called after each written shard."""
    cfg.validate()
    out = Path(out_dir)
    counts = cfg.counts()
    plans = {split: _plan_split(split, counts[split], cfg) for split in SPLITS}
    _apply_noise(plans["web"], cfg)
    for split in ("human", "test"):
        for row in plans[split]:
            row["caption"] = row["true_caption"]
    for split in SPLITS:
        _prepare_dir(out / split, overwrite)
    truth = []
    shards = {}
    for split in SPLITS:
        rows = plans[split]
        shards[split] = 0
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
    summary = {"config": asdict(cfg), "rows": counts, "shards": shards,
               "web_noise_counts": noise_counts}
    (out / "synth_config.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary
