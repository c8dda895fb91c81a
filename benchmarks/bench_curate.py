"""Curate throughput: the full Beam pipeline against a plain Python loop over the same model
objects, on the same rows. Not a test: it prints figures (docs/benchmarks/curate.md).

Per size (rows of the synthetic web split, 1000 rows per shard) both ways do the whole job:

* **loop**: read each shard with pyarrow; per batch of ``--batch-size`` rows decode and validate
  (``transforms.image.decode_image``), clean captions, caption, filter, rank (the model objects'
  own calls), apply ``pipeline.curate.curated.curated_record`` (the selection rule) and write one parquet
  file per shard. Its model time (the three model calls) is timed separately.
* **beam**: ``pipeline.curate.run_curate`` into an empty directory: discovery, schema checks,
  input hashing, the graph (read, dedup, decode, three RunInference stages, select, sorted
  WriteToParquet), staging, accounting, done markers, stats and manifest.

The models are loaded once, before either way runs, through the handlers' own loader; the Beam
run reuses those objects (the handlers' per-process cache), so neither way pays for loading.
Both ways must reach the same keep decisions; the script checks that.

    .venv/bin/python benchmarks/bench_curate.py --rows 1000 3000
    .venv/bin/python benchmarks/bench_curate.py --rows 32 --real   # real-size configs
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from capfilt.model.builders import tiny  # noqa: E402
from capfilt.pipeline.curate.graph import run_curate  # noqa: E402
from capfilt.pipeline.curate.inference import CaptionHandler, FilterHandler, RankHandler, candidates  # noqa: E402
from capfilt.pipeline.curate.options import CurateConfig  # noqa: E402
from capfilt.pipeline.curate.curated import curated_record  # noqa: E402
from capfilt.transforms.rows import Sample  # noqa: E402
from capfilt.transforms.image import ImageDecodeError, decode_image  # noqa: E402
from capfilt.transforms.schemas import CURATED_SCHEMA  # noqa: E402
from capfilt.transforms.seeding import sample_seed  # noqa: E402
from capfilt.transforms.synth.world import SynthConfig, write_world  # noqa: E402
from capfilt.transforms.text import clean_caption  # noqa: E402

ROWS_PER_SHARD = 1000


def tiny_models(work: Path) -> dict[str, str]:
    models = work / "tiny_models"
    if not (models / "clip" / "open_clip_config.json").is_file():
        tok = tiny.train_tokenizer(work / "tiny_tokenizer")
        for kind in ("captioner", "itm", "clip"):
            tiny.init_model(kind, models / kind, tokenizer_dir=tok, seed=0)
    return {k: str(models / k) for k in ("captioner", "itm", "clip")}


def real_models(work: Path) -> dict[str, str]:
    """Published configs with random weights, built by bench_models."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_models

    tok = bench_models.full_vocab_tokenizer(work / "tokenizer")
    return {"captioner": str(bench_models.build("blip-image-captioning-large", work, tok)[1]),
            "itm": str(bench_models.build("blip-itm-large-coco", work, tok)[1]),
            "clip": str(bench_models.build("open_clip-ViT-L-14", work, tok)[1])}


def world(work: Path, rows: int) -> Path:
    """The synthetic web split with `rows` rows in shards of ROWS_PER_SHARD."""
    out = work / f"world_{rows}"
    if not (out / "web").is_dir():
        write_world(out, SynthConfig(n=rows, human=4, test=4, noise=0.45, seed=0, rows_per_shard=ROWS_PER_SHARD),
                    overwrite=True)
    return out / "web"


def load_models(cfg: CurateConfig):
    """Through the handlers' loader, which caches per process: the Beam run gets these objects."""
    return (CaptionHandler(cfg.captioner, cfg).load_model(), FilterHandler(cfg.filter, cfg).load_model(),
            RankHandler(cfg.clip, cfg).load_model())


def plain_loop(cfg: CurateConfig, shards: list[Path], models, out: Path) -> dict:
    captioner, flt, ranker = models
    out.mkdir(parents=True, exist_ok=True)
    model_s, kept, rows_done, started = 0.0, {}, 0, time.perf_counter()
    for shard in shards:
        records, table = [], pq.read_table(shard)
        for start in range(0, table.num_rows, cfg.batch_size):
            batch = []
            for i, row in enumerate(table.slice(start, cfg.batch_size).to_pylist()):
                rows_done += 1
                try:
                    image = decode_image(row["jpg"], max_pixels=cfg.max_pixels, min_side=cfg.min_side,
                                         max_aspect=cfg.max_aspect)
                except ImageDecodeError:
                    continue
                batch.append(Sample(key=row["key"], url=row["url"], sha256=row["sha256"], jpg=row["jpg"],
                                    caption=row["caption"], shard=0, row=start + i, image=image,
                                    width=image.width, height=image.height,
                                    web_caption=clean_caption(row["caption"], max_words=cfg.max_words),
                                    seed=sample_seed(cfg.seed, row["key"], 0)))
            if not batch:
                continue
            images, t0 = [s.image for s in batch], time.perf_counter()
            synthetic = captioner.caption(images, [s.key for s in batch], n=cfg.num_captions, seed=cfg.seed,
                                          prompt=cfg.prompt, top_p=cfg.top_p, max_length=cfg.max_length,
                                          min_length=cfg.min_length, repetition_penalty=cfg.repetition_penalty,
                                          top_k=cfg.top_k)
            batch = [dataclasses.replace(s, synthetic=c) for s, c in zip(batch, synthetic)]
            lists = [candidates(s) for s in batch]
            scores, clips = flt.score(images, lists), ranker.score(images, lists)
            model_s += time.perf_counter() - t0
            for s, sc, cl in zip(batch, scores, clips):
                off = 1 if s.web_caption else 0
                s = dataclasses.replace(
                    s, web_itm=float(sc.itm[0]) if off else None, web_itc=float(sc.itc[0]) if off else None,
                    web_clip=float(cl[0]) if off else None, synthetic_itm=list(sc.itm[off:]),
                    synthetic_itc=list(sc.itc[off:]), synthetic_clip=list(cl[off:]))
                record = curated_record(s, cfg)
                kept[s.key] = record["keep"]
                records.append(record)
        pq.write_table(pa.Table.from_pylist(records, schema=CURATED_SCHEMA), out / f"part-{shard.stem}.parquet")
    return {"seconds": time.perf_counter() - started, "model_seconds": model_s, "rows": rows_done, "kept": kept}


def beam_run(cfg: CurateConfig, beam_args: list[str]) -> dict:
    started = time.perf_counter()
    result = run_curate(cfg, beam_args)
    seconds = time.perf_counter() - started
    kept = {}
    for path in sorted(Path(cfg.out, "shards").glob("*.parquet")):
        t = pq.read_table(path, columns=["key", "keep"])
        kept.update(zip(t.column("key").to_pylist(), t.column("keep").to_pylist()))
    return {"seconds": seconds, "rows": result.stats["input_rows"], "kept": kept}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 3000])
    parser.add_argument("--num-captions", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--real", action="store_true", help="real-size configs with random weights")
    parser.add_argument("--real-dir", type=Path, default=Path(tempfile.gettempdir()) / "capfilt-bench-models",
                        help="where bench_models.py builds (or has built) the real-size model directories")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "capfilt-bench-curate")
    parser.add_argument("--json-out", type=Path, default=None)
    args, beam_args = parser.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    models = real_models(args.real_dir) if args.real else tiny_models(args.work_dir)
    report = {"models": "real-size (random weights)" if args.real else "tiny", "threads": args.threads,
              "num_captions": args.num_captions, "max_length": args.max_length, "batch_size": args.batch_size,
              "beam_args": beam_args, "load_average": os.getloadavg(), "sizes": []}
    web = world(args.work_dir, max(args.rows))
    for rows in args.rows:
        shards = sorted(web.glob("*.parquet"))[: -(-rows // ROWS_PER_SHARD)]
        out = args.work_dir / "out"
        shutil.rmtree(out, ignore_errors=True)
        cfg = CurateConfig(inputs=tuple(str(s) for s in shards), out=str(out / "beam"), captioner=models["captioner"],
                           filter=models["itm"], clip=models["clip"], num_captions=args.num_captions,
                           max_length=args.max_length, batch_size=args.batch_size, device="cpu",
                           torch_threads=args.threads, progress_every=30.0,
                           precision="fp32")  # the plain loop calls the models unchecked
        loaded = load_models(cfg)
        loop = plain_loop(cfg, shards, loaded, out / "loop")
        beam = beam_run(cfg, beam_args)
        same = loop["kept"] == beam["kept"]
        entry = {"rows": loop["rows"], "loop_s": round(loop["seconds"], 2), "loop_model_s": round(loop["model_seconds"], 2),
                 "beam_s": round(beam["seconds"], 2),
                 "loop_rows_per_s": round(loop["rows"] / loop["seconds"], 2),
                 "beam_rows_per_s": round(beam["rows"] / beam["seconds"], 2),
                 "beam_over_loop": round(beam["seconds"] / loop["seconds"] - 1, 4),
                 "beam_over_model_time": round(beam["seconds"] / loop["model_seconds"] - 1, 4),
                 "same_keep_decisions": same, "load_average_after": os.getloadavg()}
        report["sizes"].append(entry)
        print(json.dumps(entry), flush=True)
        if not same:
            print("keep decisions differ between the loop and the pipeline", file=sys.stderr)
            return 1
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
