"""Training benchmarks: samples/s of the pretraining loop, and how fast / far tiny models learn
the synthetic world. Not a test: it prints JSON (and writes it with --json-out).

``throughput``: for tiny BLIP / BLIP-2 / CLIP and random-weight BLIP-base (ViT-B/16 + BERT-base,
the published Salesforce/blip-image-captioning-base sizes, vocabulary 30524) at 224 and 384 px:
* loop: `model.train.Trainer` end to end (parquet read, JPEG decode, processor, ITC+ITM+LM
  forward/backward, AdamW), samples/s over the timed steps after --warmup-steps;
* compute (the baseline, same process, same model): forward/backward/step on one pre-collated
  batch reused, i.e. the loop without its data path. loop/compute is the data-path overhead.
* bf16 autocast vs fp32 for BLIP-base.

``curve``: tiny BLIP pretrained on a synthetic world; every --eval-every steps the test split's
ITC retrieval R@1 (image->text and text->image; a retrieved caption counts when its text equals
the query's) and ITM accuracy (positive vs a random other caption, p > 0.5) are measured.

    .venv/bin/python benchmarks/bench_train.py throughput --steps 6
    .venv/bin/python benchmarks/bench_train.py curve --steps 600 --eval-every 100
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from capfilt.model.training.blip import BlipTrainConfig, BlipTrainModel, build_blip  # noqa: E402
from capfilt.model.training.data import ImageTextStream, SourceSpec  # noqa: E402
from capfilt.model.training.loop import TrainConfig, Trainer  # noqa: E402

# Salesforce/blip-image-captioning-base (ViT-B/16, BERT-base text), published values.
BLIP_BASE = {
    "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "patch_size": 16, "image_size": 384, "layer_norm_eps": 1e-5},
    "text_config": {"vocab_size": 30524, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "max_position_embeddings": 512},
    "projection_dim": 512, "image_text_hidden_size": 256,
}


def world(root: Path, n: int, seed: int = 0) -> Path:
    from capfilt.transforms.synth.world import SynthConfig, write_world

    if not (root / "synth_config.json").is_file():
        write_world(root, SynthConfig(n=n, seed=seed), overwrite=True)
    return root


def blip_base(image_size: int, tokenizer_dir: Path) -> BlipTrainModel:
    """Random-weight BLIP-base built in memory (no 2 GB of files), tiny tokenizer ids."""
    from transformers import (BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval,
                              BlipImageProcessor, BlipProcessor)

    from capfilt.model.builders.tiny import BLIP_IMAGE_MEAN, BLIP_IMAGE_STD, load_tokenizer, token_ids

    tok = load_tokenizer(tokenizer_dir)
    ids = {k: v for k, v in token_ids(tok).items() if k != "vocab_size"}
    cfg = json.loads(json.dumps(BLIP_BASE))
    cfg["vision_config"]["image_size"] = image_size
    cfg["text_config"].update(ids)
    config = BlipConfig(**cfg)
    proc = BlipProcessor(image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size},
                                                            image_mean=list(BLIP_IMAGE_MEAN),
                                                            image_std=list(BLIP_IMAGE_STD)), tokenizer=tok)
    torch.manual_seed(0)
    return BlipTrainModel(BlipTrainConfig(), proc, itm=BlipForImageTextRetrieval(config),
                          captioner=BlipForConditionalGeneration(config))


def time_loop(model, data: Path, out: Path, batch: int, steps: int, warmup: int, bf16: bool) -> float:
    """End-to-end samples/s of the Trainer over `steps` after `warmup` steps."""
    cfg = TrainConfig(out_dir=str(out), steps=warmup + steps, batch_size=batch, lr=1e-4, bf16=bf16,
                      log_every=10_000, progress=False, checkpoint_every=10_000, keep_checkpoints=1)
    trainer = Trainer(model, [SourceSpec(str(data))], cfg)
    trainer.module.train()
    for _ in range(warmup):
        trainer._one_step()
    start = time.perf_counter()
    for _ in range(steps):
        trainer._one_step()
    return batch * steps / (time.perf_counter() - start)


def time_compute(model, data: Path, batch: int, steps: int, warmup: int, bf16: bool) -> float:
    """Baseline: the same step on one pre-collated batch (no reading / decoding / processing)."""
    samples = ImageTextStream([SourceSpec(str(data))], seed=0).next_batch(batch)
    b = model.collate(samples)
    b["seed"], b["step"] = 0, 0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        with ctx:
            loss = model(b)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return batch * steps / (time.perf_counter() - start)


def throughput(args) -> dict:
    from capfilt.model.training.blip2 import Blip2TrainConfig, build_blip2
    from capfilt.model.training.clip import build_clip
    from capfilt.model.builders.tiny import train_tokenizer

    work = Path(args.work_dir)
    data = world(work / "world", 400) / "web"
    tok = work / "tokenizer"
    if not (tok / "tokenizer_config.json").is_file():
        train_tokenizer(tok)
    cases = [
        ("tiny blip", lambda: build_blip(BlipTrainConfig(), work / "tiny_blip", tokenizer_dir=tok),
         args.tiny_batch, False, args.steps),
        ("tiny blip2", lambda: build_blip2(Blip2TrainConfig(), work / "tiny_blip2", tokenizer_dir=tok),
         args.tiny_batch, False, args.steps),
        ("tiny clip", lambda: build_clip(work / "tiny_clip"), args.tiny_batch, False, args.steps),
    ]
    for size in args.base_sizes:
        make = lambda s=size: blip_base(s, tok)  # noqa: E731
        cases.append((f"blip-base {size}px fp32", make, args.base_batch, False, args.base_steps))
        if args.bf16:
            cases.append((f"blip-base {size}px bf16", make, args.base_batch, True, args.base_steps))
    results = []
    for name, make, batch, bf16, steps in cases:
        if args.only and not any(o in name for o in args.only):
            continue
        model = make()
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        compute = time_compute(model, data, batch, steps, args.warmup_steps, bf16)
        with tempfile.TemporaryDirectory() as tmp:
            loop = time_loop(model, data, Path(tmp), batch, steps, args.warmup_steps, bf16)
        row = {"model": name, "trainable_params_m": round(params / 1e6, 1), "batch": batch, "steps": steps,
               "loop_samples_per_s": float(f"{loop:.3g}"), "compute_samples_per_s": float(f"{compute:.3g}"),
               "loop_over_compute": round(loop / compute, 3)}
        print(json.dumps(row), flush=True)
        results.append(row)
        del model
    return {"threads": torch.get_num_threads(), "results": results}


@torch.no_grad()
def evaluate(model: BlipTrainModel, test: Path, n: int) -> dict:
    """ITC R@1 both ways and ITM accuracy on the first `n` test pairs."""
    model.eval()
    samples = ImageTextStream([SourceSpec(str(test))], seed=0, shuffle_buffer=1).next_batch(n)
    b = model.collate(samples)
    itm = model.itm
    emb = itm.vision_model(pixel_values=b["pixel_values"]).last_hidden_state
    img = torch.nn.functional.normalize(itm.vision_proj(emb[:, 0]), dim=-1)
    txt = model._text_feat(itm.text_encoder, itm.text_proj, b["input_ids"], b["attention_mask"])
    sim = img @ txt.T  # (n, n)
    texts = np.array([s.text for s in samples])
    i2t = float(np.mean(texts[sim.argmax(1).numpy()] == texts))
    t2i = float(np.mean(texts[sim.argmax(0).numpy()] == texts))
    other = torch.roll(torch.arange(n), 1)  # each image with the next pair's caption
    pos, _ = model.score_pairs(b["pixel_values"], b["input_ids"], b["attention_mask"])
    neg, _ = model.score_pairs(b["pixel_values"], b["input_ids"][other], b["attention_mask"][other])
    differs = torch.tensor(texts[other.numpy()] != texts)
    acc = float(torch.cat([pos > 0.5, (neg <= 0.5)[differs]]).float().mean())
    model.train()
    return {"i2t_r1": round(i2t, 3), "t2i_r1": round(t2i, 3), "itm_acc": round(acc, 3),
            "chance_r1": round(1 / n, 3)}


def curve(args) -> dict:
    work = Path(args.work_dir)
    root = world(work / f"world{args.n}", args.n)
    data = [SourceSpec(str(root / "web"))] if args.split == "web" else [SourceSpec(str(root / args.split))]
    out = work / f"curve_{args.split}_{args.itm_random_steps}"
    model = build_blip(BlipTrainConfig(itm_random_steps=args.itm_random_steps), out, seed=0)
    cfg = TrainConfig(out_dir=str(out), steps=args.steps, batch_size=args.batch,
                      lr=args.lr, warmup=args.warmup, log_every=10_000, progress=False,
                      checkpoint_every=10_000, keep_checkpoints=1)
    trainer = Trainer(model, data, cfg)
    points, sums, start = [], {}, time.perf_counter()
    points.append({"step": 0, **evaluate(model, root / "test", args.eval_n)})
    for step in range(1, args.steps + 1):
        out = trainer._one_step()
        trainer.step = step
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        if step % args.eval_every == 0:
            losses = {k: round(v / args.eval_every, 3) for k, v in sums.items()}
            point = {"step": step, "seconds": round(time.perf_counter() - start, 1), **losses,
                     **evaluate(model, root / "test", args.eval_n)}
            print(json.dumps(point), flush=True)
            points.append(point)
            sums = {}
    return {"n": args.n, "split": args.split, "batch": args.batch, "lr": args.lr, "threads": torch.get_num_threads(),
            "itm_random_steps": args.itm_random_steps, "points": points}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--steps", type=int, default=10, help="timed steps per tiny case")
    t.add_argument("--base-steps", type=int, default=3, help="timed steps per BLIP-base case")
    t.add_argument("--only", nargs="*", help="run only the cases whose name contains one of these")
    t.add_argument("--warmup-steps", type=int, default=2)
    t.add_argument("--tiny-batch", type=int, default=16)
    t.add_argument("--base-batch", type=int, default=4)
    t.add_argument("--base-sizes", type=int, nargs="*", default=[224, 384])
    t.add_argument("--bf16", action="store_true", help="also time BLIP-base under bf16 autocast")
    c = sub.add_parser("curve")
    c.add_argument("--n", type=int, default=2000, help="web images in the synthetic world")
    c.add_argument("--split", default="web", choices=["web", "human"])
    c.add_argument("--steps", type=int, default=600)
    c.add_argument("--batch", type=int, default=16)
    c.add_argument("--lr", type=float, default=1e-3)
    c.add_argument("--warmup", type=int, default=50)
    c.add_argument("--eval-every", type=int, default=100)
    c.add_argument("--eval-n", type=int, default=200, help="test pairs for R@1 / ITM accuracy")
    c.add_argument("--itm-random-steps", type=int, default=0, help="uniform ITM negatives for the first N steps")
    for p in (t, c):
        p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "capfilt-bench-train"))
        p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
        p.add_argument("--json-out")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = throughput(args) if args.what == "throughput" else curve(args)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
