"""Peak memory of decoding hostile JPEGs at full size against the reduced scale curate decodes
them at, and what the reduction changes for the models. Not a test: it prints figures
(docs/benchmarks/decode_memory.md).

1. **Memory.** A JPEG of a few hundred bytes whose header declares 6000x6000 (libjpeg fills the
   missing scan, so it decodes), and one declaring 28000x1400 (aspect 20, the widest
   ``--max-aspect`` lets through). Each way runs in its own process, which decodes ``--rows`` of
   them and holds the images, as a worker holds a batch: ``transforms.image.decode_image``
   without ``draft_side`` (full size, as curate decoded before) and with curate's
   ``transforms.image.DRAFT_SIDE``. Memory is the process's peak RSS minus its RSS
   before the first decode; the ratio of the two is measured in the same run.
2. **Synthetic world.** Every web image of a world rendered at the largest size ``capfilt
   synth`` allows (1024): decoded both ways, compared pixel for pixel.
3. **Large images.** Those world images upscaled to ``--large`` pixels a side and stored as JPEG
   (quality 90): the model inputs both ways (BLIP's processor at 384, open_clip's eval
   transform at 224 and 512, before normalisation, in 0..255 units), and the tiny models' ITM
   and CLIP scores of the web caption.

    .venv/bin/python benchmarks/bench_decode_memory.py --rows 24
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from capfilt.transforms.image import DRAFT_SIDE, decode_image  # noqa: E402


def declared_jpeg(width: int, height: int) -> bytes:
    """A 16x16 JPEG whose SOF0 header is rewritten to declare width x height."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 50, 200)).save(buf, format="JPEG", quality=10)
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def child(mode: str, rows: int, shape: str) -> dict:
    """Decode `rows` declared-size JPEGs in this process, holding them; memory and time."""
    data = declared_jpeg(*map(int, shape.split("x")))
    draft = DRAFT_SIDE if mode == "reduced" else None
    base = _rss_mb()
    started = time.perf_counter()
    held = [decode_image(data, draft_side=draft) for _ in range(rows)]
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "declared": shape, "rows": rows, "file_bytes": len(data), "decoded": list(held[0].size),
            "baseline_rss_mb": round(base, 1), "peak_rss_mb": round(peak, 1),
            "decode_mb": round(peak - base, 1), "mb_per_row": round((peak - base) / rows, 2),
            "ms_per_row": round(1000 * seconds / rows, 1)}


def memory(rows: int, shape: str) -> dict:
    out = {}
    for mode in ("full", "reduced"):
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--rows", str(rows), "--shape", shape],
                              capture_output=True, text=True, check=True)
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["ratio"] = round(out["full"]["decode_mb"] / max(out["reduced"]["decode_mb"], 0.1), 1)
    return out


def world_images(work: Path, n: int) -> list[tuple[bytes, str]]:
    """(jpg, caption) of the web rows of a world rendered at 1024 px."""
    import pyarrow.parquet as pq

    from capfilt.transforms.synth.world import SynthConfig, write_world

    write_world(work / "world", SynthConfig(n=n, image_size=1024, human=0, test=0, seed=3))
    rows = []
    for shard in sorted((work / "world" / "web").glob("*.parquet")):
        rows += pq.read_table(shard, columns=["jpg", "caption"]).to_pylist()
    return [(r["jpg"], r["caption"] or "") for r in rows]


def enlarge(jpg: bytes, side: int, seed: int) -> bytes:
    """A photo-sized JPEG: the image upscaled, with sensor-like noise so that it has detail."""
    img = Image.open(io.BytesIO(jpg)).convert("RGB").resize((side, side), Image.BICUBIC)
    noise = np.random.default_rng(seed).normal(0, 6, (side, side, 3))
    arr = np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def model_inputs(img: Image.Image) -> dict[str, np.ndarray]:
    """What each processor hands its model, before normalisation, in 0..255 units."""
    import open_clip
    from transformers import BlipImageProcessor

    blip = BlipImageProcessor(size={"height": 384, "width": 384}, do_normalize=False, do_rescale=False)
    out = {"blip_384": blip(img, return_tensors="np")["pixel_values"][0]}
    for size in (224, 512):
        steps = open_clip.image_transform(size, is_train=False).transforms
        x = img
        for step in steps[:-1]:  # without Normalize: ToTensor leaves 0..1
            x = step(x)
        out[f"open_clip_{size}"] = x.numpy() * 255.0
    return out


def tiny_scores(work: Path, images: list[Image.Image], captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from capfilt.model.builders import tiny
    from capfilt.model.inference.filter import load_filter
    from capfilt.model.inference.ranker import ClipRanker

    models = work / "tiny_models"
    if not (models / "clip").is_dir():
        tok = tiny.train_tokenizer(work / "tiny_tokenizer")
        for kind in ("itm", "clip"):
            tiny.init_model(kind, models / kind, tokenizer_dir=tok, seed=0)
    itm = load_filter(str(models / "itm"), device="cpu").score(images, [[c] for c in captions])
    clip = ClipRanker.load(str(models / "clip"), device="cpu").score(images, [[c] for c in captions])
    return np.array([s.itm[0] for s in itm]), np.array([s[0] for s in clip])


def effects(n: int, large: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="capfilt-bench-decode-") as tmp:
        work = Path(tmp)
        rows = world_images(work, n)
        same = sum(np.array_equal(np.asarray(decode_image(j)), np.asarray(decode_image(j, draft_side=DRAFT_SIDE)))
                   for j, _ in rows)
        diffs: dict[str, list[float]] = {}
        full, reduced, captions = [], [], []
        for i, (jpg, caption) in enumerate(rows):
            data = enlarge(jpg, large, seed=i)
            a, b = decode_image(data), decode_image(data, draft_side=DRAFT_SIDE)
            full.append(a)
            reduced.append(b)
            captions.append(caption)
            ia, ib = model_inputs(a), model_inputs(b)
            for name in ia:
                d = np.abs(ia[name].astype(np.float64) - ib[name].astype(np.float64))
                diffs.setdefault(f"{name}_mean", []).append(float(d.mean()))
                diffs.setdefault(f"{name}_max", []).append(float(d.max()))
        decoded = list(reduced[0].size)
        itm_a, clip_a = tiny_scores(work, full, captions)
        itm_b, clip_b = tiny_scores(work, reduced, captions)
    return {
        "world_images": len(rows), "world_identical": int(same),
        "large_side": large, "large_decoded_at": decoded,
        "processor_input_abs_diff": {k: round(max(v) if k.endswith("_max") else float(np.mean(v)), 3)
                                     for k, v in sorted(diffs.items())},
        "tiny_itm_abs_diff_max": float(np.abs(itm_a - itm_b).max()),
        "tiny_clip_abs_diff_max": float(np.abs(clip_a - clip_b).max()),
        "tiny_itm_above_0.5_same": int(((itm_a >= 0.5) == (itm_b >= 0.5)).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--rows", type=int, default=24, help="declared-size JPEGs decoded and held per process")
    parser.add_argument("--shapes", nargs="+", default=["6000x6000", "28000x1400"],
                        help="WIDTHxHEIGHT the hostile JPEGs' headers declare, one memory run each")
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=16, help="web images of the 1024-px synthetic world")
    parser.add_argument("--large", type=int, default=4096, help="side of the upscaled photo-sized JPEGs")
    parser.add_argument("--child", choices=("full", "reduced"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rows, args.shape)))
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = {"draft_side": DRAFT_SIDE, "memory": {shape: memory(args.rows, shape) for shape in args.shapes},
              "effects": effects(args.world, args.large)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
