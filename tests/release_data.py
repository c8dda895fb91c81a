"""Curated-shard fixtures for the release, report and run-job tests, built directly with pyarrow
in CURATED_SCHEMA so those tests do not depend on the curate pipeline.

Images are smooth random colour fields (a 4x4 grid of random colours, upsampled), so two
different seeds give unrelated images while a `near_copy` (brightness nudge + different JPEG
quality) gives different bytes with almost the same pixels. `pixel_embedder` is a stand-in for
CLIP: the centred, normalised 12x12 thumbnail.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from capfilt.transforms.schemas import CURATED_SCHEMA, RAW_SCHEMA


def image_bytes(seed: int, size: int = 32, quality: int = 92, shift: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(grid).resize((size, size), Image.BILINEAR)
    if shift:
        arr = np.clip(np.asarray(img, dtype=np.int16) + shift, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def near_copy(seed: int) -> bytes:
    """Same picture as image_bytes(seed), different bytes."""
    return image_bytes(seed, quality=75, shift=3)


def pixel_embedder(images) -> np.ndarray:
    out = []
    for img in images:
        a = np.asarray(img.convert("RGB").resize((12, 12), Image.BILINEAR), dtype=np.float32).ravel()
        a = a - a.mean()
        out.append(a / (np.linalg.norm(a) + 1e-9))
    return np.stack(out)  # (B, 432)


def row(key: str, jpg: bytes | None, *, keep: bool = True, clip: float = 0.3, itm: float = 0.8,
        web_caption: str | None = None, drop_reason: str | None = None) -> dict:
    """One curated row; its selected caption is the first synthetic one with scores (clip, itm)."""
    web_caption = web_caption if web_caption is not None else f"a photo number {key}"
    synthetic = [f"a picture of thing {key}", f"an image of {key} on a table"]
    return {
        "key": key, "url": f"http://example.invalid/{key}.jpg",
        "sha256": hashlib.sha256(jpg).hexdigest() if jpg else None, "jpg": jpg,
        "width": 32, "height": 32, "web_caption": web_caption,
        "web_itm": 0.2, "web_itc": 0.1, "web_clip": 0.1,
        "synthetic_captions": synthetic, "synthetic_itm": [itm, 0.1],
        "synthetic_itc": [0.3, 0.0], "synthetic_clip": [clip, 0.05],
        "captions": [synthetic[0]] if keep else [], "caption_sources": ["synthetic"] if keep else [],
        "keep": keep, "drop_reason": None if keep else (drop_reason or "no_caption_passed"),
        "round": 0, "seed": 7,
    }


def write_curated(root: Path, shards: list[list[dict]], clip: str | None = None) -> Path:
    """A curate output dir: shards/part-XXXXX.parquet, manifest.json (with the shards' names
    and hashes in `outputs`), stats.json."""
    root = Path(root)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    for i, rows in enumerate(shards):
        pq.write_table(pa.Table.from_pylist(rows, schema=CURATED_SCHEMA), root / "shards" / f"part-{i:05d}.parquet")
    n = sum(len(s) for s in shards)
    kept = sum(r["keep"] for s in shards for r in s)
    (root / "stats.json").write_text(json.dumps({"input_rows": n, "kept": kept, "dropped": n - kept, "errors": 0}))
    manifest = {"models": {"clip": clip, "captioner": "tiny-captioner", "filter": "tiny-itm"},
                "thresholds": {"itm": 0.5, "keep_top": 1}, "seeds": {"run": 7}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return record_outputs(root)


def record_outputs(root: Path) -> Path:
    """Record the files now in root/shards in root/manifest.json `outputs` the way curate does
    (pipeline.curate.state: name, path, sha256, rows); the release reads only recorded shards."""
    outputs = []
    for path in sorted((root / "shards").glob("*.parquet")):
        outputs.append({"name": path.name, "path": f"shards/{path.name}",
                        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                        "rows": pq.ParquetFile(path).metadata.num_rows})
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "outputs": outputs}))
    return root


def write_raw(path: Path, items: list[tuple[str, bytes | None]], status: str = "success") -> Path:
    """An img2dataset-style raw shard (used as an eval set)."""
    rows = [{"key": k, "url": None, "caption": "eval", "status": status if j is not None else "failed_to_download",
             "error_message": None, "width": 32, "height": 32, "original_width": 32, "original_height": 32,
             "exif": None, "sha256": hashlib.sha256(j).hexdigest() if j else None, "jpg": j} for k, j in items]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=RAW_SCHEMA), path)
    return path


def scanned_rows(keys: list[str], images: list[str], emb, rank):
    """A pass-1 view (pipeline.release_io.ScannedRows) of kept, readable rows given directly:
    ``images`` stand for the image hashes, ``emb`` (N, D) for their embeddings, ``rank`` (N, 2)
    for (best CLIP, best ITM). Lets the tests drive pipeline.release.build.decide without images."""
    from capfilt.pipeline.release.shards import ScannedRows

    n = len(keys)
    return ScannedRows(keys=np.array(keys, dtype=object), keep=np.ones(n, bool), drop_reason=[None] * n,
                       sha256=np.array(images, dtype=object), unreadable=np.array([None] * n, dtype=object),
                       rank=np.asarray(rank, np.float64).reshape(n, 2), emb_pos=np.arange(n),
                       emb=np.asarray(emb, np.float32))
