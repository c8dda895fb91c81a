"""Real-size model throughput: encode-once scoring vs the naive per-pair loop, captioner tokens/s,
and how close the vision towers get to this CPU's matmul peak. Not a test: it prints figures.

Models are the published configs in benchmarks/configs/ with random weights, built once into
--work-dir by model.builders.tiny.init_model (the same builder and save_pretrained/from_pretrained path
the tiny models use) with a BERT-layout tokenizer of BLIP's 30524 tokens, so every size (vision
width, image size, vocabulary) is the real one.

Per image the filter and the ranker score 1 web + 10 synthetic captions:
* encode-once: ``BlipFilter.score`` / ``ClipRanker.score`` (vision once per image, texts batched);
* naive: transformers' ``BlipForImageTextRetrieval.forward`` once per (image, caption) and head
  (ITM and ITC are separate calls there), open_clip's ``forward`` once per pair. Every naive pair
  is an independent full forward, so it is timed on the first --naive-pairs pairs and its
  per-image time is the mean pair time x 11 (on a loaded 2-core machine a whole naive image of
  BLIP-large takes minutes).
Both run in the same process on the same images; the naive loop also checks that it gets the
same scores as encode-once.

    .venv/bin/python benchmarks/bench_models.py --images 2 --naive-pairs 11
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
from PIL import Image  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from capfilt.model.builders import tiny  # noqa: E402
from capfilt.model.inference.captioner import Captioner  # noqa: E402
from capfilt.model.inference.device import cpu_has_native_bf16  # noqa: E402
from capfilt.model.inference.filter import BlipFilter, load_filter  # noqa: E402
from capfilt.model.inference.ranker import ClipRanker  # noqa: E402

CONFIGS = REPO / "benchmarks" / "configs"
BERT_SPECIALS = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}
BLIP_VOCAB = 30522  # bert-base-uncased; [DEC] and [ENC] follow


def full_vocab_tokenizer(out_dir: Path) -> Path:
    """A BertTokenizer with bert-base-uncased's layout ([PAD] 0, [CLS] 101, [SEP] 102, 30522
    entries, then [DEC], [ENC]) whose words come from the synthetic corpus; the rest is filler."""
    from transformers import BertTokenizer

    if (out_dir / "tokenizer_config.json").is_file():
        return out_dir
    with tempfile.TemporaryDirectory() as scratch:
        words = [w for w in tiny.load_tokenizer(tiny.train_tokenizer(scratch)).get_vocab() if not w.startswith("[")]
    fill = iter(words + [f"[unused{i}]" for i in range(BLIP_VOCAB)])
    tokens = [BERT_SPECIALS.get(i) or next(fill) for i in range(BLIP_VOCAB)]
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True,
                              bos_token="[DEC]", additional_special_tokens=["[ENC]"], model_max_length=512)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build(name: str, work: Path, tokenizer_dir: Path) -> tuple[str, Path]:
    spec = json.loads((CONFIGS / f"{name}.json").read_text())
    out = work / name
    if not (out / "config.json").is_file() and not (out / "open_clip_config.json").is_file():
        t0 = time.perf_counter()
        tiny.init_model(spec["kind"], out, tokenizer_dir=tokenizer_dir, seed=0, overrides=spec["config"])
        print(f"built {name} in {time.perf_counter() - t0:.0f} s -> {out}", flush=True)
    return spec["kind"], out


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(n)]


def captions(n_images: int) -> list[list[str]]:
    web = "a photo of a red circle next to a small blue square on a white background"
    return [[web] + [f"a picture of shape number {i} and {j} others" for j in range(10)] for i in range(n_images)]


def matmul_peak(dtype: torch.dtype, size: int, budget_s: float = 4.0) -> float:
    """Best GFLOP/s of a size x size matmul in ``dtype`` over a few runs (at most ~budget_s)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    start, best = time.perf_counter(), float("inf")
    for _ in range(6):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return 2 * size ** 3 / best / 1e9


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def vision_utilisation(forward, batch: torch.Tensor, peak: float) -> dict:
    """FLOPs (torch's FlopCounterMode, counted on one image and scaled: the tower is per-image
    work) and achieved GFLOP/s of one vision forward over ``batch``."""
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            forward(batch[:1])
        _, seconds = timed(lambda: forward(batch))
    flops = counter.get_total_flops() * batch.shape[0]
    return {"images": batch.shape[0], "gflop": flops / 1e9, "seconds": seconds,
            "gflops": flops / seconds / 1e9, "fraction_of_fp32_peak": flops / seconds / 1e9 / peak}


def hf_pair_scores(flt, pixels, ids, mask) -> tuple[float, float]:
    """(ITM p, ITC cosine) of one pair from transformers' forward: two calls, one per head."""
    model = flt.model
    if isinstance(flt, BlipFilter):
        itm = model(input_ids=flt.first_token.apply(ids), pixel_values=pixels, attention_mask=mask,
                    use_itm_head=True).itm_score  # the filter's first token ([ENC] by default)
        itc = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False).itm_score
    else:
        if model.config.image_token_index is not None:
            # as Blip2Processor does for such checkpoints: the query placeholders lead the text
            queries = model.config.num_query_tokens
            ids = torch.cat([torch.full((1, queries), model.config.image_token_index), ids], dim=1)
            mask = torch.cat([torch.ones(1, queries, dtype=mask.dtype), mask], dim=1)
        itm = model(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                    use_image_text_matching_head=True).logits_per_image
        itc = model(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                    use_image_text_matching_head=False).logits_per_image
    return itm.softmax(-1)[0, 1].item(), itc[0, 0].item()


def compare(fast_fn, pair_fn, imgs, caps, naive_pairs: int) -> dict:
    """Time encode-once scoring of all images, then the naive loop over the first
    ``naive_pairs`` (image, caption) pairs; each naive pair is a full, independent forward, so
    its per-image time is the mean pair time x captions per image. Also checks both agree."""
    fast_fn(imgs[:1], [caps[0][:2]])  # warm-up
    fast, fast_s = timed(lambda: fast_fn(imgs, caps))
    pairs = [(b, j) for b in range(len(imgs)) for j in range(len(caps[b]))][:naive_pairs]
    worst = 0.0
    with torch.inference_mode():
        pair_fn(0, 0)  # warm-up
        t0 = time.perf_counter()
        for b, j in pairs:
            worst = max(worst, *(abs(n - f) for n, f in zip(pair_fn(b, j), fast(b, j))))
        naive_s_per_image = (time.perf_counter() - t0) / len(pairs) * len(caps[0])
    fast_rate, naive_rate = len(imgs) / fast_s, 1.0 / naive_s_per_image
    return {"images": len(imgs), "captions_per_image": len(caps[0]), "naive_pairs_timed": len(pairs),
            "encode_once_images_per_s": fast_rate, "naive_images_per_s": naive_rate,
            "speedup": fast_rate / naive_rate, "max_abs_diff": float(worst)}


def bench_filter(model_dir: Path, n_images: int, naive_pairs: int, peak: float) -> dict:
    flt = load_filter(model_dir, device="cpu")
    imgs, caps = images(n_images), captions(n_images)
    pixels = [flt.pixel_values([im]) for im in imgs]

    def fast(batch_images, batch_captions):
        scores = flt.score(batch_images, batch_captions)
        return lambda b, j: (scores[b].itm[j], scores[b].itc[j])

    def pair(b, j):
        ids, mask = flt.tokenize([caps[b][j]])
        return hf_pair_scores(flt, pixels[b], ids, mask)

    result = compare(fast, pair, imgs, caps, naive_pairs)
    batch = flt.pixel_values(imgs)
    result["vision_tower"] = vision_utilisation(lambda x: flt.model.vision_model(pixel_values=x), batch, peak)
    return result


def bench_ranker(model_dir: Path, n_images: int, naive_pairs: int, peak: float) -> dict:
    ranker = ClipRanker.load(str(model_dir), device="cpu")
    imgs, caps = images(n_images), captions(n_images)

    def fast(batch_images, batch_captions):
        scores = ranker.score(batch_images, batch_captions)
        return lambda b, j: (scores[b][j],)

    def pair(b, j):  # open_clip's forward normalises both embeddings
        image_f, text_f, _ = ranker.model(ranker.preprocess(imgs[b])[None], ranker.tokenizer([caps[b][j]]))
        return ((image_f @ text_f.T).item(),)

    result = compare(fast, pair, imgs, caps, naive_pairs)
    batch = torch.stack([ranker.preprocess(im) for im in imgs])
    result["vision_tower"] = vision_utilisation(ranker.model.encode_image, batch, peak)
    return result


def bench_captioner(model_dir: Path, n_images: int, n: int) -> dict:
    captioner = Captioner.from_pretrained(model_dir, device="cpu")
    imgs, keys = images(n_images), [f"img-{i}" for i in range(n_images)]
    captioner.caption(imgs[:1], keys[:1], n=1, seed=0, max_length=6, min_length=1)  # warm-up
    rows, vision = [], []  # rows per decoder forward = tokens produced by that step
    hooks = [
        captioner.model.text_decoder.register_forward_hook(
            lambda module, args, kwargs, out: rows.append(out.logits.shape[0]), with_kwargs=True),
        captioner.model.vision_model.register_forward_pre_hook(lambda module, args: vision.append(time.perf_counter())),
        captioner.model.vision_model.register_forward_hook(
            lambda module, args, out: vision.append(time.perf_counter() - vision.pop())),
    ]
    try:
        _, seconds = timed(lambda: captioner.caption(imgs, keys, n=n, seed=0))
    finally:
        for hook in hooks:
            hook.remove()
    tokens = sum(rows)
    return {"images": n_images, "n": n, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "images_per_s": n_images / seconds,
            "vision_seconds": sum(vision), "decode_seconds": seconds - sum(vision)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2, help="images for the encode-once paths and captioner")
    parser.add_argument("--naive-pairs", type=int, default=11,
                        help="(image, caption) pairs the naive loops are timed on (11 = one whole image)")
    parser.add_argument("--num-captions", type=int, default=10, help="captions sampled per image")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "capfilt-bench-models",
                        help="where the random-weight model directories are built (reused across runs)")
    parser.add_argument("--models", nargs="+", default=["filter", "ranker", "captioner"],
                        choices=["filter", "blip2-filter", "ranker", "captioner"])
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    tok = full_vocab_tokenizer(args.work_dir / "tokenizer")
    # Without bf16 instructions torch falls back to a scalar bf16 kernel (< 1 GFLOP/s): a 2048^2
    # product would take a minute per run, so that case is measured on 512^2.
    bf16_size = 2048 if cpu_has_native_bf16() else 512
    peak32, peak16 = matmul_peak(torch.float32, 2048), matmul_peak(torch.bfloat16, bf16_size)
    report = {"threads": args.threads, "torch": torch.__version__, "native_bf16": cpu_has_native_bf16(),
              "matmul_gflops_fp32": peak32, "matmul_gflops_bf16": peak16, "bf16_matmul_size": bf16_size}
    print(json.dumps(report), flush=True)
    plan = {"filter": "blip-itm-large-coco", "blip2-filter": "blip2-itm-vit-g",
            "ranker": "open_clip-ViT-L-14", "captioner": "blip-image-captioning-large"}
    for part in args.models:
        _, path = build(plan[part], args.work_dir, tok)
        if part == "captioner":
            report[part] = bench_captioner(path, args.images, args.num_captions)
        elif part == "ranker":
            report[part] = bench_ranker(path, args.images, args.naive_pairs, peak32)
        else:
            report[part] = bench_filter(path, args.images, args.naive_pairs, peak32)
        print(part, json.dumps(report[part]), flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
