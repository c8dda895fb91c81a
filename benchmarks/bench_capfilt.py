"""Real-size end-to-end CapFilt stage, several ways on the same images: the naive per-pair loop,
our model stack in fp32, the fast path in fp32, our default (fast path + checked bf16), and
unchecked bf16. Not a test: it prints figures
(docs/benchmarks/capfilt.md).

Models: the published configs in benchmarks/configs/ with random weights (BLIP-large captioner,
BLIP ITM large, open_clip ViT-L/14), built by bench_models.build into --work-dir. Per image the
captioner samples --num-captions (10) captions with BLIP's settings, the filter scores the web
caption + those 10 (ITM p(match) + ITC cosine), the ranker scores the same 11 (CLIP cosine),
and ``pipeline.select.select_captions`` makes the keep decision and picks the top-2 captions.

The ways:

(a) naive: what a user of the libraries writes first, one pair at a time, fp32: for each caption
    ``BlipForConditionalGeneration.generate`` on one image and one sampled row (same seeded
    sampler, so the captions must equal (b)'s), for each (image, caption)
    ``BlipForImageTextRetrieval.forward`` once per head (ITM, ITC), and open_clip's ``forward``
    once per pair. Every call re-encodes the image. Every call is an independent full forward,
    so (a) is timed on a subset -- the first --naive-captions generate calls and the first
    --naive-pairs (image, caption) pairs -- and its time per image is extrapolated:
    mean generate call x num_captions + mean filter pair x (num_captions + 1) + mean CLIP pair
    x (num_captions + 1). The subset's outputs are checked against (b).
(b) our model stack in fp32: ``Captioner.caption``,
    ``BlipFilter.score``, ``ClipRanker.score`` on batches of --batch-size images, with
    ``FastPath.off()`` (transformers' and open_clip's modules as they are) and bf16 off.
(c_fp32) the fast path in fp32: the same calls with ``FastPath()``.
(c) our default: the fast path with ``--precision auto``, which is ``bf16-checked`` where the CPU
    has native bf16 (pipeline/curate/precision.py): captioner fp32, filter and ranker bf16, and the
    images whose decision at curate's threshold a bf16 error could flip scored again in fp32
    (``checked_filter_scores`` / ``checked_rank_scores``, the functions curate's handlers call).
    Without native bf16, ``auto`` is fp32 and (c) is (c_fp32); (c) and (c_bf16) are then not run.
(c_bf16) the fast path with every model in bf16, unchecked (``--precision bf16``).
(b) and the fast ways share the loaded models (the path and precision are chosen per call) and
run batch by batch, taking turns at going first, so a change of load on the shared machine hits
all of them.

Stage times of each way come from forward hooks on the vision towers: "blip vision" (the
captioner's and the filter's ViT), "decoding" (the rest of ``caption``: sampling loop, decoder,
tokenizer), "text scoring" (the rest of ``score``: ITM and ITC text passes, image preprocessing),
"clip" (all of the ranker, its vision tower also shown alone). Beam/decode/parquet overhead is
measured with bench_curate.py's two ways (plain loop vs ``run_curate``) on tiny models
(--beam-rows), because a real-size Beam run would take as long again as (c): the overhead per
row does not depend on model size, so it is set against (c)'s real-size model time per image.

Minimal CapFilt FLOPs per image (what any implementation must compute; multiply-add = 2 FLOPs;
only matmuls counted, as torch.utils.flop_counter does; elementwise ops, norms, softmax and the
small heads are left out, < 0.1 %):

* ViT, image S, patch p, width D, MLP F, layers K, N = (S/p)^2 + 1 tokens:
      2 (N-1) 3p^2 D  +  K [ 2N(4D^2 + 2DF) + 4N^2 D ]
  BLIP ViT-L/16 at 384 (N = 577): 382 GFLOP; once for the captioner, once for the filter (two
  different models). CLIP ViT-L/14 at 224 (N = 257): 162 GFLOP (+ 2 D E projection).
* BLIP text layer (width d, MLP f, image tokens P of width Dv), per text position attending to t
  text keys: self-attention projections 8d^2, feed-forward 4df, scores 4td, cross-attention
  query/output 4d^2, cross scores 4Pd; per *image* per layer the cross keys/values 4 P Dv d.
* Decoding, n captions, prompt of Lp tokens, caption i of g_i generated tokens: the prompt once
  per image (Lp positions), then g_i - 1 fed-back tokens per caption, each through the 12
  decoder layers with t = its position + 1; the LM head (2d^2 + 2dV, V = 30524) at
  1 + sum_i (g_i - 1) positions; cross keys/values once per image.
* Filter, caption of L tokens (its own length, no padding): ITM pass L [12d^2 + 4df + 4Ld + 4Pd]
  per layer + cross keys/values once per image; ITC pass L [8d^2 + 4df + 4Ld] per layer.
* CLIP text, caption of L tokens up to its end token, width W, MLP 4W: L [8W^2 + 4WF + 4LW] per
  layer, + 2 W E projection.

``--flop-check`` runs torch.utils.flop_counter.FlopCounterMode on one image of each part (with
the math SDPA backend and nn.MultiheadAttention's fused path off, whose kernels the counter does
not see) and compares with the same formulas evaluated for what that code executes (padded
lengths, every row's prompt, cross keys/values as computed).

Utilisation: the minimal FLOPs per image / a way's seconds per image, against the fp32 and
bf16 matmul peaks measured in the same run, before and after the ways (2048^2 in fp32; in bf16
512^2 when the CPU has no bf16 instructions, as bench_models does). The decision-drift check
compares each fast way with (b) -- sampled captions, scores, and keep decisions and selected
captions at curate's ITM threshold and at (b)'s median ITM score -- on the real-size run and on
tiny models over the synthetic world. (c) checks at curate's threshold; its filter and ranker
are run once more, untimed, checking at (b)'s median (``c_checked_at_median_b``) (--tiny-rows; trained ones with --tiny-models DIR holding
captioner/, itm/ and clip/). --ablations times each fast-path option on its own.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_capfilt.py --images 16 \\
        --naive-captions 3 --naive-pairs 3 --threads 1 --tiny-models DIR --work-dir /tmp/capfilt-bench
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_capfilt.py --ablations-only \\
        --images 1 --threads 1 --work-dir /tmp/capfilt-bench
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import bench_models as bm  # noqa: E402
from capfilt.model.inference.captioner import CaptionConfig, Captioner  # noqa: E402
from capfilt.model.inference.device import cpu_has_native_bf16, use_bf16  # noqa: E402
from capfilt.model.inference.fastpath import FastPath, fast_attention  # noqa: E402
from capfilt.model.inference.filter import load_filter  # noqa: E402
from capfilt.model.inference.ranker import ClipRanker  # noqa: E402
from capfilt.model.inference.sampling import SeededNucleusSampler, row_seeds  # noqa: E402
from capfilt.pipeline.curate.precision import checked_filter_scores, checked_rank_scores, model_bf16  # noqa: E402
from capfilt.pipeline.curate.select import select_captions  # noqa: E402

CONFIGS = REPO / "benchmarks" / "configs"
PLAN = {"captioner": "blip-image-captioning-large", "itm": "blip-itm-large-coco", "clip": "open_clip-ViT-L-14"}
SEED = 0
ITM_THRESHOLD, KEEP_TOP = 0.5, 2  # curate's defaults (pipeline/options.py)


def dumps(obj, **kw) -> str:
    return json.dumps(obj, default=float, **kw)  # numpy scalars too


# --- analytic FLOPs (the formulas of the module docstring) --------------------------------------

def vit_flops(image_size: int, patch: int, width: int, mlp: int, layers: int) -> float:
    tokens = (image_size // patch) ** 2 + 1
    patch_embed = 2 * (tokens - 1) * 3 * patch * patch * width
    per_layer = 2 * tokens * (4 * width ** 2 + 2 * width * mlp) + 4 * tokens ** 2 * width
    return patch_embed + layers * per_layer


def blip_text_position(d: int, f: int, t: int, image_tokens: int | None) -> float:
    """One text position through one BLIP text layer, t text keys, cross-attention when
    image_tokens is given (its keys/values not included)."""
    flops = 8 * d * d + 4 * d * f + 4 * t * d
    if image_tokens is not None:
        flops += 4 * d * d + 4 * image_tokens * d
    return flops


def cross_kv(image_tokens: int, vision_width: int, d: int, layers: int) -> float:
    return layers * 4 * image_tokens * vision_width * d


class Shapes:
    """The sizes the formulas need, read from benchmarks/configs/ (or tiny configs)."""

    def __init__(self, captioner_cfg: dict, itm_cfg: dict, clip_cfg: dict):
        def vision(cfg):
            v = cfg["vision_config"]
            return dict(image_size=v["image_size"], patch=v["patch_size"], width=v["hidden_size"],
                        mlp=v["intermediate_size"], layers=v["num_hidden_layers"])

        self.cap_vision, self.itm_vision = vision(captioner_cfg), vision(itm_cfg)
        t = captioner_cfg["text_config"]
        self.text = dict(d=t["hidden_size"], f=t["intermediate_size"], layers=t["num_hidden_layers"],
                         vocab=t["vocab_size"])
        v, c = clip_cfg["model_cfg"]["vision_cfg"], clip_cfg["model_cfg"]["text_cfg"]
        self.clip_vision = dict(image_size=v["image_size"], patch=v["patch_size"], width=v["width"],
                                mlp=int(v["width"] * v.get("mlp_ratio", 4.0)), layers=v["layers"])
        self.clip_text = dict(width=c["width"], mlp=int(c["width"] * c.get("mlp_ratio", 4.0)), layers=c["layers"])
        self.embed_dim = clip_cfg["model_cfg"]["embed_dim"]

    @staticmethod
    def tokens(vision: dict) -> int:
        return (vision["image_size"] // vision["patch"]) ** 2 + 1

    def vision_flops(self, which: str) -> float:
        return vit_flops(**{"captioner": self.cap_vision, "itm": self.itm_vision, "clip": self.clip_vision}[which])

    def clip_vision_flops(self) -> float:
        return self.vision_flops("clip") + 2 * self.clip_vision["width"] * self.embed_dim

    def decode_flops(self, prompt_len: int, generated: list[int], *, executed: bool = False) -> float:
        """Minimal: prompt once per image, LM head where a token is drawn. ``executed``: what
        HF generate does with our fast path: every row runs the prompt and all rows run
        max(generated) steps, the LM head at every row's last position per step."""
        d, f, layers, vocab = self.text["d"], self.text["f"], self.text["layers"], self.text["vocab"]
        p = self.tokens(self.cap_vision)
        head = 2 * d * d + 2 * d * vocab
        per_pos = lambda t: layers * blip_text_position(d, f, t, p)  # noqa: E731
        kv = cross_kv(p, self.cap_vision["width"], d, layers)
        if executed:
            steps, rows = max(generated), len(generated)
            prompt = rows * sum(per_pos(t + 1) for t in range(prompt_len))
            fed = rows * sum(per_pos(prompt_len + k + 1) for k in range(steps - 1))
            return kv + prompt + fed + rows * steps * head
        prompt = sum(per_pos(t + 1) for t in range(prompt_len))
        fed = sum(per_pos(prompt_len + k + 1) for g in generated for k in range(g - 1))
        return kv + prompt + fed + head * (1 + sum(g - 1 for g in generated))

    def filter_text_flops(self, lengths: list[int], images: int = 1) -> float:
        d, f, layers = self.text["d"], self.text["f"], self.text["layers"]
        p = self.tokens(self.itm_vision)
        itm = sum(n * layers * blip_text_position(d, f, n, p) for n in lengths)
        itc = sum(n * layers * blip_text_position(d, f, n, None) for n in lengths)
        return images * cross_kv(p, self.itm_vision["width"], d, layers) + itm + itc

    def clip_text_flops(self, lengths: list[int]) -> float:
        w, f, layers = self.clip_text["width"], self.clip_text["mlp"], self.clip_text["layers"]
        return sum(n * layers * (8 * w * w + 4 * w * f + 4 * n * w) + 2 * w * self.embed_dim for n in lengths)


def load_shapes() -> Shapes:
    cfg = {k: json.loads((CONFIGS / f"{name}.json").read_text())["config"] for k, name in PLAN.items()}
    return Shapes(cfg["captioner"], cfg["itm"], cfg["clip"])


# --- the ways -------------------------------------------------------------------------------------

class StageClock:
    """Seconds spent inside the given modules' forwards (hooks), by name."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.seconds = dict.fromkeys(modules, 0.0)
        self._hooks, self._start = [], {}
        for name, module in modules.items():
            self._hooks.append(module.register_forward_pre_hook(
                lambda m, a, name=name: self._start.__setitem__(name, time.perf_counter())))
            self._hooks.append(module.register_forward_hook(
                lambda m, a, o, name=name: self._add(name)))

    def _add(self, name: str) -> None:
        self.seconds[name] += time.perf_counter() - self._start.pop(name)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


WAYS = {  # name: (fast path, precision as pipeline.precision resolves it)
    "b": (FastPath.off(), "fp32"),
    "c_fp32": (FastPath(), "fp32"),
    "c": (FastPath(), "bf16-checked"),
    "c_bf16": (FastPath(), "bf16"),
}


def default_ways() -> list[str]:
    """b, the fp32 fast path, and -- where bf16 is native -- the default (bf16-checked, what
    ``--precision auto`` resolves to there) and unchecked bf16. Without native bf16 the default
    *is* c_fp32, and the bf16 ways would run emulated, far slower than fp32."""
    if use_bf16("auto", torch.device("cpu")):
        return ["b", "c_fp32", "c", "c_bf16"]
    return ["b", "c_fp32"]


def way_settings(names: list[str]) -> dict:
    """(fast path, precision) of each way: b = the plain fp32 stack, c_fp32 = the fast path in
    fp32, c = the default: fast path + ``bf16-checked`` (captioner fp32, filter and ranker bf16,
    decisions near a flip re-scored in fp32), c_bf16 = the fast path with every model in bf16."""
    unknown = [n for n in names if n not in WAYS]
    if unknown or "b" not in names:
        raise ValueError(f"ways must include b and come from {sorted(WAYS)}, got {names}")
    return {n: WAYS[n] for n in names}


def set_way(models, fast: FastPath, precision: str) -> None:
    for m, stage in zip(models, ("caption", "filter", "rank")):
        m.fast, m.bf16 = fast, model_bf16(precision, stage)
    models[2].bf16_text = precision != "bf16-checked"  # as RankHandler loads it


def run_batch(models, images, keys, web, n: int, precision: str = "fp32",
              threshold: float = ITM_THRESHOLD, synthetic: list | None = None) -> tuple[list[dict], dict]:
    """One CapFilt stage on a batch: rows (captions, scores, selection), call seconds and the
    number of images re-scored in fp32 (bf16-checked, checked at ``threshold``). Given
    ``synthetic``, the captioner is skipped and those captions are scored."""
    captioner, flt, ranker = models
    check = precision == "bf16-checked"
    timing = {}
    t0 = time.perf_counter()
    if synthetic is None:
        synthetic = captioner.caption(images, keys, n=n, seed=SEED)
    timing["caption"] = time.perf_counter() - t0
    candidates = [[w] + s for w, s in zip(web, synthetic)]
    t0 = time.perf_counter()
    filtered = checked_filter_scores(flt, images, candidates, check=check, itm_threshold=threshold)
    timing["filter"] = time.perf_counter() - t0
    itm = [sc.itm for sc in filtered.scores]
    t0 = time.perf_counter()
    ranked = checked_rank_scores(ranker, images, candidates, itm, check=check,
                                 itm_threshold=threshold, keep_top=KEEP_TOP)
    timing["clip"] = time.perf_counter() - t0
    rows = [{"web": w, "synthetic": syn, "itm": sc.itm, "itc": sc.itc, "clip": cl}
            for w, syn, sc, cl in zip(web, synthetic, filtered.scores, ranked.scores)]
    return rows, timing, {"filter": len(filtered.rescored), "rank": len(ranked.rescored)}


def decide(rows: list[dict], threshold: float) -> list:
    """(keep, selected captions best first) per image, by curate's rule."""
    out = []
    for r in rows:
        sel = select_captions(r["web"], r["synthetic"], float(r["itm"][0]), r["itm"][1:].tolist(),
                              float(r["clip"][0]), r["clip"][1:].tolist(), itm_threshold=threshold, keep_top=KEEP_TOP)
        out.append((sel.keep, sel.captions))
    return out


def run_ways(models, images, keys, web, n: int, batch_size: int, ways: dict, verbose: bool = True,
             threshold: float = ITM_THRESHOLD) -> dict:
    """Every way batch by batch, taking turns at going first; stage seconds from hooks. The
    checked way (c) checks its decisions at ``threshold``."""
    captioner, flt, ranker = models
    out = {name: {"rows": [], "calls": {"caption": 0.0, "filter": 0.0, "clip": 0.0},
                  "vision": {"captioner": 0.0, "filter": 0.0, "clip": 0.0},
                  "fp32_rescored": {"filter": 0, "rank": 0}} for name in ways}
    for b, start in enumerate(range(0, len(images), batch_size)):
        order = list(ways) if b % 2 == 0 else list(ways)[::-1]
        sl = slice(start, start + batch_size)
        for name in order:
            fast, precision = ways[name]
            set_way(models, fast, precision)
            towers = {"captioner": captioner.model.vision_model, "filter": flt.model.vision_model,
                      "clip": ranker.model.visual}
            if ranker.vision_tower is not ranker.model.visual:  # its bf16 copy; fp32 re-scoring uses the other
                towers["clip_bf16"] = ranker.vision_tower
            clock = StageClock(towers)
            try:
                rows, timing, rescored = run_batch(models, images[sl], keys[sl], web[sl], n, precision, threshold)
            finally:
                clock.remove()
            out[name]["rows"] += rows
            for k, v in timing.items():
                out[name]["calls"][k] += v
            for k, v in clock.seconds.items():
                out[name]["vision"]["clip" if k == "clip_bf16" else k] += v
            for k, v in rescored.items():
                out[name]["fp32_rescored"][k] += v
            if verbose:
                print(f"  batch {b} {name}: {dumps({k: round(v, 2) for k, v in timing.items()})} "
                      f"fp32 re-scored {rescored}", flush=True)
    count = len(images)
    for name, res in out.items():
        calls, vision = res["calls"], res["vision"]
        stages = {"blip_vision": vision["captioner"] + vision["filter"],
                  "decoding": calls["caption"] - vision["captioner"],
                  "text_scoring": calls["filter"] - vision["filter"],
                  "clip": calls["clip"], "clip_vision": vision["clip"]}
        total = calls["caption"] + calls["filter"] + calls["clip"]
        res["s_per_image"] = total / count
        res["stages_s_per_image"] = {k: v / count for k, v in stages.items()}
    return out


def checked_at(models, images, keys, web, rows: list[dict], threshold: float, batch_size: int) -> tuple[list, dict]:
    """The checked way's filter and ranker again, checking at ``threshold``, on the captions it
    sampled (its captioner is fp32, so they do not depend on the threshold). Untimed."""
    set_way(models, *WAYS["c"])
    out, rescored = [], {"filter": 0, "rank": 0}
    for start in range(0, len(images), batch_size):
        sl = slice(start, start + batch_size)
        batch_rows, _, counts = run_batch(models, images[sl], keys[sl], web[sl], 0, "bf16-checked", threshold,
                                          synthetic=[r["synthetic"] for r in rows[sl]])
        out += batch_rows
        for k, v in counts.items():
            rescored[k] += v
    set_way(models, *WAYS["c_fp32"])
    return out, rescored


def naive_caption(captioner: Captioner, image, key: str, index: int, n: int) -> str:
    """Caption ``index`` of ``key`` the naive way: HF's generate on one image, one row."""
    cfg, proc = CaptionConfig(), captioner.processor
    inputs = proc(images=[image], text=[cfg.prompt], return_tensors="pt")
    sampler = SeededNucleusSampler([row_seeds(SEED, [key], n)[index]], top_p=cfg.top_p, top_k=cfg.top_k)
    sequences = captioner.model.generate(
        pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
        do_sample=False, num_beams=1, max_length=cfg.max_length, min_length=cfg.min_length,
        repetition_penalty=cfg.repetition_penalty, logits_processor=[sampler])
    prompt_len = inputs["input_ids"].shape[1] - 1  # generate drops the prompt's [SEP]
    return proc.tokenizer.decode(sequences[0, prompt_len:], skip_special_tokens=True).strip()


def run_naive(models, images, keys, web, reference: list[dict], n: int, naive_captions: int, naive_pairs: int) -> dict:
    """(a) on the first pairs; per-image time extrapolated; outputs checked against (b)."""
    captioner, flt, ranker = models
    set_way(models, FastPath.off(), "fp32")
    cap_pairs = [(b, i) for b in range(len(images)) for i in range(n)][:naive_captions]
    score_pairs = [(b, j) for b in range(len(images)) for j in range(n + 1)][:naive_pairs]
    result = {"caption_calls_timed": len(cap_pairs), "pairs_timed": len(score_pairs)}
    with torch.inference_mode():
        naive_caption(captioner, images[0], "warm-up", 0, 1)
        t0, same = time.perf_counter(), 0
        for b, i in cap_pairs:
            same += naive_caption(captioner, images[b], keys[b], i, n) == reference[b]["synthetic"][i]
        result["caption_call_s"] = (time.perf_counter() - t0) / len(cap_pairs)
        result["captions_equal_to_b"] = f"{same}/{len(cap_pairs)}"
        candidates = [[w] + r["synthetic"] for w, r in zip(web, reference)]
        worst, t0 = 0.0, time.perf_counter()
        for b, j in score_pairs:
            ids, mask = flt.tokenize([candidates[b][j]])
            itm, itc = bm.hf_pair_scores(flt, flt.pixel_values([images[b]]), ids, mask)
            worst = max(worst, abs(itm - reference[b]["itm"][j]), abs(itc - reference[b]["itc"][j]))
        result["filter_pair_s"] = (time.perf_counter() - t0) / len(score_pairs)
        result["filter_max_abs_diff_to_b"] = worst
        worst, t0 = 0.0, time.perf_counter()
        for b, j in score_pairs:
            image_f, text_f, _ = ranker.model(ranker.preprocess(images[b])[None], ranker.tokenizer([candidates[b][j]]))
            worst = max(worst, abs((image_f @ text_f.T).item() - reference[b]["clip"][j]))
        result["clip_pair_s"] = (time.perf_counter() - t0) / len(score_pairs)
        result["clip_max_abs_diff_to_b"] = worst
    per_image = {"captioner": result["caption_call_s"] * n, "filter": result["filter_pair_s"] * (n + 1),
                 "clip": result["clip_pair_s"] * (n + 1)}
    result["s_per_image_by_model"] = per_image
    result["s_per_image"] = sum(per_image.values())
    return result


def drift(plain: list[dict], fast: list[dict]) -> dict:
    """A fast way against (b): identical sampled captions, largest score differences where the
    captions are the same, and identical keep decisions and selected captions (as a set, and in
    CLIP order) at curate's ITM threshold and at (b)'s median ITM score, where half the
    candidates pass -- the threshold at which rounding flips decisions most often."""
    count = len(plain)
    same_caps = [p["synthetic"] == f["synthetic"] for p, f in zip(plain, fast)]
    diffs = {k: max((float(np.max(np.abs(np.asarray(p[k]) - np.asarray(f[k])))) for p, f, s in
                     zip(plain, fast, same_caps) if s), default=0.0) for k in ("itm", "itc", "clip")}
    syn_total = sum(len(p["synthetic"]) for p in plain)
    syn_same = sum(a == b for p, f in zip(plain, fast) for a, b in zip(p["synthetic"], f["synthetic"]))
    out = {"images": count, "synthetic_captions_identical": syn_same / syn_total,
           "max_abs_score_diff_same_captions": diffs}
    median = float(np.median(np.concatenate([p["itm"] for p in plain])))
    for label, threshold in ((f"threshold_{ITM_THRESHOLD}", ITM_THRESHOLD), ("threshold_median_b", median)):
        dp, df = decide(plain, threshold), decide(fast, threshold)
        out[label] = {
            "threshold": threshold,
            "keep_identical": sum(p[0] == f[0] for p, f in zip(dp, df)) / count,
            "selected_identical": sum(set(p[1]) == set(f[1]) for p, f in zip(dp, df)) / count,
            "selected_identical_in_order": sum(p[1] == f[1] for p, f in zip(dp, df)) / count,
            "kept": {"b": sum(p[0] for p in dp), "fast": sum(f[0] for f in df)}}
    return out


# --- FLOP check against torch's counter ------------------------------------------------------

def counted(fn) -> float:
    """FLOPs torch's FlopCounterMode sees in ``fn()``, with the math SDPA backend and the fused
    MultiheadAttention path off (the counter has no formula for their CPU kernels)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return float(counter.get_total_flops())


def flop_check(models, shapes: Shapes, image, key: str, web: str, n: int) -> dict:
    captioner, flt, ranker = models
    set_way(models, FastPath(), "fp32")
    cfg = CaptionConfig()
    out = {}
    px = captioner.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    out["blip_vision"] = (counted(lambda: captioner.model.vision_model(pixel_values=px)),
                          shapes.vision_flops("captioner"))
    clip_px = ranker.preprocess(image)[None]
    out["clip_vision"] = (counted(lambda: ranker.model.encode_image(clip_px)), shapes.clip_vision_flops())
    caps = []
    steps = []
    hook = captioner.model.text_decoder.register_forward_hook(lambda m, a, o: steps.append(1))
    try:
        total = counted(lambda: caps.append(captioner.caption([image], [key], n=n, seed=SEED)[0]))
    finally:
        hook.remove()
    prompt_len = captioner._prompt_ids(cfg.prompt, 1).shape[1]
    out["captioner_executed"] = (total, shapes.vision_flops("captioner") +
                                 shapes.decode_flops(prompt_len, [len(steps)] * n, executed=True))
    candidates = [web] + caps[0]
    ids, _ = flt.tokenize(candidates)  # padded to the longest, as executed
    out["filter_executed"] = (counted(lambda: flt.score([image], [candidates])),
                              shapes.vision_flops("itm") + shapes.filter_text_flops([ids.shape[1]] * len(candidates)))
    tokens = ranker.tokenizer(candidates)
    trimmed = int(tokens.argmax(dim=-1).max()) + 1
    out["clip_executed"] = (counted(lambda: ranker.score([image], [candidates])),
                            shapes.clip_vision_flops() + shapes.clip_text_flops([trimmed] * len(candidates)))
    return {k: {"counted_gflop": c / 1e9, "analytic_gflop": a / 1e9, "analytic_over_counted": a / c}
            for k, (c, a) in out.items()}


def minimal_flops(shapes: Shapes, models, rows: list[dict], web: list[str]) -> dict:
    """Per-image minimal FLOPs (module docstring), from the captions (c) produced."""
    captioner, flt, ranker = models
    cfg = CaptionConfig()
    tok = captioner.processor.tokenizer
    prompt_len = captioner._prompt_ids(cfg.prompt, 1).shape[1]
    room = cfg.max_length - prompt_len
    parts = {"blip_vision": 0.0, "decoding": 0.0, "text_scoring": 0.0, "clip": 0.0}
    for w, r in zip(web, rows):
        # generated tokens: the caption's tokens + [SEP], unless it ran to max_length
        generated = [min(len(tok(c, add_special_tokens=False)["input_ids"]) + 1, room) for c in r["synthetic"]]
        candidates = [w] + r["synthetic"]
        lengths = [len(tok(c, truncation=True, max_length=flt.max_text_tokens)["input_ids"]) for c in candidates]
        clip_lengths = (ranker.tokenizer(candidates).argmax(dim=-1) + 1).tolist()
        parts["blip_vision"] += shapes.vision_flops("captioner") + shapes.vision_flops("itm")
        parts["decoding"] += shapes.decode_flops(prompt_len, generated)
        parts["text_scoring"] += shapes.filter_text_flops(lengths)
        parts["clip"] += shapes.clip_vision_flops() + shapes.clip_text_flops(clip_lengths)
    per_image = {k: v / len(rows) / 1e9 for k, v in parts.items()}
    per_image["total"] = sum(per_image.values())
    return per_image


# --- tiny models: drift on the synthetic world, Beam overhead ------------------------------------

def synth_rows(work: Path, rows: int):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from capfilt.transforms.image import ImageDecodeError, decode_image
    from capfilt.transforms.synth.world import SynthConfig, write_world
    from capfilt.transforms.text import clean_caption

    out = work / f"drift_world_{rows}"
    if not (out / "web").is_dir():
        write_world(out, SynthConfig(n=rows, human=4, test=4, noise=0.45, seed=0), overwrite=True)
    table = pa.concat_tables([pq.read_table(p) for p in sorted((out / "web").glob("*.parquet"))])
    images, keys, web = [], [], []
    for row in table.to_pylist():
        try:
            images.append(decode_image(row["jpg"]))
        except ImageDecodeError:  # curate sends these to the error output; no model sees them
            continue
        keys.append(row["key"])
        web.append(clean_caption(row["caption"]))
    return images, keys, web


def tiny_drift(work: Path, tiny_dir: Path | None, rows: int, n: int, batch_size: int, ways: list[str]) -> dict:
    from capfilt.model.builders import tiny

    if tiny_dir is None:
        tiny_dir = work / "tiny_random"
        if not (tiny_dir / "clip" / "open_clip_config.json").is_file():
            tok = tiny.train_tokenizer(work / "tiny_tokenizer")
            for kind in ("captioner", "itm", "clip"):
                tiny.init_model(kind, tiny_dir / kind, tokenizer_dir=tok, seed=0)
    models = (Captioner.from_pretrained(tiny_dir / "captioner", device="cpu"),
              load_filter(tiny_dir / "itm", device="cpu"), ClipRanker.load(str(tiny_dir / "clip"), device="cpu"))
    images, keys, web = synth_rows(work, rows)
    res = run_ways(models, images, keys, web, n, batch_size, way_settings(ways), verbose=False)
    out = {"models": str(tiny_dir), "rows": len(images),
           "drift_vs_b": {k: drift(res["b"]["rows"], res[k]["rows"]) for k in ways if k != "b"},
           "s_per_image": {k: res[k]["s_per_image"] for k in ways},
           "fp32_rescored": {k: res[k]["fp32_rescored"] for k in ways}}
    if "c" in ways:
        out.update(checked_at_median(models, images, keys, web, res, batch_size))
    return out


def checked_at_median(models, images, keys, web, res: dict, batch_size: int) -> dict:
    """(c) checks its decisions at curate's threshold (0.5). The drift table also reads the
    decisions at (b)'s median ITM score; this runs (c)'s filter and ranker checking there."""
    median = float(np.median(np.concatenate([r["itm"] for r in res["b"]["rows"]])))
    rows, rescored = checked_at(models, images, keys, web, res["c"]["rows"], median, batch_size)
    return {"c_checked_at_median_b": {"threshold": median, "fp32_rescored": rescored,
                                      "drift_vs_b": drift(res["b"]["rows"], rows)}}


def beam_overhead(work: Path, rows: int, threads: int) -> dict:
    """bench_curate.py's loop vs run_curate on tiny models, CapFilt settings (10 captions)."""
    import shutil

    import bench_curate as bc
    from capfilt.pipeline.curate.options import CurateConfig

    models = bc.tiny_models(work)
    web = bc.world(work, rows)
    shards = sorted(web.glob("*.parquet"))[: -(-rows // bc.ROWS_PER_SHARD)]
    out = work / "beam_out"
    shutil.rmtree(out, ignore_errors=True)
    cfg = CurateConfig(inputs=tuple(str(s) for s in shards), out=str(out / "beam"), captioner=models["captioner"],
                       filter=models["itm"], clip=models["clip"], device="cpu", torch_threads=threads,
                       progress_every=30.0, precision="fp32")  # the plain loop calls the models unchecked
    loaded = bc.load_models(cfg)
    loop = bc.plain_loop(cfg, shards, loaded, out / "loop")
    beam = bc.beam_run(cfg, [])
    if loop["kept"] != beam["kept"]:
        raise RuntimeError("keep decisions differ between the loop and the Beam pipeline")
    count = loop["rows"]
    return {"rows": count, "num_captions": cfg.num_captions, "max_length": cfg.max_length,
            "loop_s": loop["seconds"], "loop_model_s": loop["model_seconds"], "beam_s": beam["seconds"],
            "decode_parquet_overhead_s_per_row": (loop["seconds"] - loop["model_seconds"]) / count,
            "beam_overhead_s_per_row": (beam["seconds"] - loop["model_seconds"]) / count,
            "beam_overhead_fraction_of_tiny_model_time": beam["seconds"] / loop["model_seconds"] - 1}


# --- ablations: what each option does on its own ----------------------------------------------

def interleaved(fns: dict, reps: int) -> dict:
    """Mean seconds of each fn, run in turns so that load changes hit all of them."""
    seconds = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - t0)
    return {k: {"mean_s": float(np.mean(v)), "runs_s": [round(x, 3) for x in v]} for k, v in seconds.items()}


def ablations(models, images, keys, web, n: int, reps: int, compile_vision: bool) -> dict:
    captioner, flt, ranker = models
    image = images[:1]
    candidates = [[web[0]] + [f"a picture of shape number {j} and a few others" for j in range(n)]]
    px = captioner.processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
    vision = captioner.model.vision_model
    out = {}

    def vision_run(sdpa):
        with torch.inference_mode(), fast_attention(sdpa):
            vision(pixel_values=px)

    out["blip_vision_sdpa"] = interleaved({"eager": lambda: vision_run(False), "sdpa": lambda: vision_run(True)}, reps)

    def cap_run(fast):
        captioner.fast = fast
        captioner.caption(image, keys[:1], n=n, seed=SEED)

    out["captioner_cross_kv_once"] = interleaved(
        {"off": lambda: cap_run(FastPath(cross_kv_once=False, sdpa=False, nucleus_candidates=0)),
         "on": lambda: cap_run(FastPath(sdpa=False, nucleus_candidates=0)),
         "on+sdpa": lambda: cap_run(FastPath(nucleus_candidates=0))}, max(1, reps - 1))
    # top-p by sorting the vocabulary (transformers' warper) or by testing 8 candidates
    out["captioner_nucleus_candidates"] = interleaved(
        {"sort": lambda: cap_run(FastPath(nucleus_candidates=0)), "candidates": lambda: cap_run(FastPath())},
        max(1, reps - 1))

    def filter_run(fast):
        flt.fast = fast
        flt.score(image, candidates)

    out["filter_cross_kv_once"] = interleaved(
        {"off": lambda: filter_run(FastPath(cross_kv_once=False, sdpa=False)),
         "on": lambda: filter_run(FastPath(sdpa=False)), "on+sdpa": lambda: filter_run(FastPath())}, reps)

    def clip_text(fast):
        ranker.fast = fast
        ranker.encode_texts(candidates[0])

    out["clip_text_trim"] = interleaved(
        {"off": lambda: clip_text(FastPath.off()), "on": lambda: clip_text(FastPath())}, reps)

    threads = torch.get_num_threads()
    def vision_threads(k):
        torch.set_num_threads(k)
        vision_run(True)

    out["blip_vision_threads"] = interleaved({"1": lambda: vision_threads(1), "2": lambda: vision_threads(2)}, reps)
    torch.set_num_threads(threads)
    if compile_vision:
        compiled = torch.compile(vision)
        t0 = time.perf_counter()
        with torch.inference_mode():
            compiled(pixel_values=px)
        compile_s = time.perf_counter() - t0

        def compiled_run():
            with torch.inference_mode():
                compiled(pixel_values=px)

        out["blip_vision_compile"] = interleaved({"eager": lambda: vision_run(False), "compiled": compiled_run}, reps)
        out["blip_vision_compile"]["compile_and_first_call_s"] = compile_s
    set_way(models, FastPath(), "fp32")
    return out


# --- main ------------------------------------------------------------------------------------------

def load_real(work: Path):
    tok = bm.full_vocab_tokenizer(work / "tokenizer")
    paths = {k: bm.build(name, work, tok)[1] for k, name in PLAN.items()}
    return (Captioner.from_pretrained(paths["captioner"], device="cpu"),
            load_filter(paths["itm"], device="cpu"), ClipRanker.load(str(paths["clip"]), device="cpu"))


def peaks() -> dict:
    bf16_size = 2048 if cpu_has_native_bf16() else 512
    return {"fp32_gflops": bm.matmul_peak(torch.float32, 2048),
            "bf16_gflops": bm.matmul_peak(torch.bfloat16, bf16_size),
            "bf16_size": bf16_size}


def summary(report: dict) -> dict:
    ways, a = report["ways"], report["naive"]["s_per_image"]
    peak32 = max(report["peaks_before"]["fp32_gflops"], report["peaks_after"]["fp32_gflops"])
    peak16 = max(report["peaks_before"]["bf16_gflops"], report["peaks_after"]["bf16_gflops"])
    flops = report["minimal_gflop_per_image"]
    out = {"s_per_image": {"a_naive": a, **{k: v["s_per_image"] for k, v in ways.items()}},
           "minimal_gflop_per_image": flops["total"], "fp32_peak_gflops": peak32, "bf16_peak_gflops": peak16}
    for name, way in ways.items():
        sec = way["s_per_image"]
        entry = {"speedup_over_a": a / sec, "achieved_gflops": flops["total"] / sec,
                 "fraction_of_fp32_peak": flops["total"] / sec / peak32,
                 "fraction_of_bf16_peak": flops["total"] / sec / peak16}
        if name != "b":
            entry["speedup_over_b"] = ways["b"]["s_per_image"] / sec
        stages = way["stages_s_per_image"]
        entry["stage_gflops"] = {"blip_vision": flops["blip_vision"] / stages["blip_vision"],
                                 "decoding": flops["decoding"] / stages["decoding"],
                                 "text_scoring": flops["text_scoring"] / stages["text_scoring"],
                                 "clip": flops["clip"] / stages["clip"]}
        if "beam" in report:
            entry["beam_decode_parquet_overhead_vs_model_time"] = report["beam"]["beam_overhead_s_per_row"] / sec
        out[name] = entry
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16, help="images (1-32; the brief's runs use 16-32)")
    parser.add_argument("--num-captions", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8, help="images per model call in (b) and (c)")
    parser.add_argument("--naive-captions", type=int, default=10, help="generate calls (a) is timed on")
    parser.add_argument("--naive-pairs", type=int, default=11, help="(image, caption) pairs (a) is timed on")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "capfilt-bench")
    parser.add_argument("--skip-real", action="store_true", help="only the tiny-model parts")
    parser.add_argument("--flop-check", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--tiny-rows", type=int, default=200,
                        help="synthetic-world rows for the tiny drift check (0: skip)")
    parser.add_argument("--tiny-models", type=Path, default=None,
                        help="directory with captioner/, itm/, clip/ (trained tiny models); default random tiny ones")
    parser.add_argument("--ways", nargs="+", default=default_ways(), choices=sorted(WAYS),
                        help="ways besides (a): b (plain fp32), c_fp32 (fast path, fp32), c (the default: fast "
                             "path + bf16-checked), c_bf16 (fast path, all bf16); default: b c_fp32, plus c "
                             "and c_bf16 where the CPU has native bf16")
    parser.add_argument("--beam-rows", type=int, default=200, help="rows for the Beam overhead run (0: skip)")
    parser.add_argument("--ablations", action="store_true", help="also time each fast-path option on its own")
    parser.add_argument("--ablations-only", action="store_true")
    parser.add_argument("--ablation-reps", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="include torch.compile in the ablations (slow)")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not 1 <= args.images <= 32:
        raise ValueError(f"--images must be in 1..32, got {args.images}")
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    report = {"threads": args.threads, "torch": torch.__version__, "native_bf16": cpu_has_native_bf16(),
              "bf16_auto_on_this_cpu": use_bf16("auto", torch.device("cpu")), "images": args.images,
              "num_captions": args.num_captions, "batch_size": args.batch_size, "load_average_start": os.getloadavg()}
    started = time.perf_counter()
    if not args.skip_real:
        models = load_real(args.work_dir)
        images, keys = bm.images(args.images), [f"img-{i:03d}" for i in range(args.images)]
        web = [caps[0] for caps in bm.captions(args.images)]
        if args.ablations or args.ablations_only:
            report["ablations"] = ablations(models, images, keys, web, args.num_captions, args.ablation_reps,
                                            args.compile)
            print("ablations", dumps(report["ablations"]), flush=True)
        if not args.ablations_only:
            report["peaks_before"] = peaks()
            print("peaks", dumps(report["peaks_before"]), flush=True)
            # Warm-up, untimed, each way on 2 images with all captions: the first calls of a way
            # allocate its buffers, build its kernels (bf16 ones too) and make the bf16 CLIP copy.
            for fast, precision in way_settings(args.ways).values():
                set_way(models, fast, precision)
                run_batch(models, images[:2], keys[:2], web[:2], args.num_captions, precision)
            res = run_ways(models, images, keys, web, args.num_captions, args.batch_size, way_settings(args.ways))
            report["ways"] = {k: {kk: vv for kk, vv in v.items() if kk != "rows"} for k, v in res.items()}
            report["drift_real_vs_b"] = {k: drift(res["b"]["rows"], res[k]["rows"]) for k in args.ways if k != "b"}
            if "c" in args.ways:
                report["drift_real_vs_b"].update(checked_at_median(models, images, keys, web, res, args.batch_size))
            print("ways", dumps(report["ways"]), "\ndrift", dumps(report["drift_real_vs_b"]), flush=True)
            report["naive"] = run_naive(models, images, keys, web, res["b"]["rows"], args.num_captions,
                                        args.naive_captions, args.naive_pairs)
            print("naive", dumps(report["naive"]), flush=True)
            shapes = load_shapes()
            # from (b)'s captions: every way with an fp32 captioner samples the same ones
            report["minimal_gflop_per_image"] = minimal_flops(shapes, models, res["b"]["rows"], web)
            if args.flop_check:
                report["flop_check"] = flop_check(models, shapes, images[0], keys[0], web[0], args.num_captions)
                print("flop_check", dumps(report["flop_check"]), flush=True)
            report["peaks_after"] = peaks()
        del models
    if args.tiny_rows and not args.ablations_only:
        tiny_ways = default_ways()
        report["tiny"] = tiny_drift(args.work_dir, args.tiny_models, args.tiny_rows, args.num_captions,
                                    args.batch_size, tiny_ways)
        print("tiny", dumps(report["tiny"]), flush=True)
    if args.beam_rows and not args.ablations_only:
        report["beam"] = beam_overhead(args.work_dir, args.beam_rows, args.threads)
        print("beam", dumps(report["beam"]), flush=True)
    if "ways" in report:
        report["summary"] = summary(report)
        print("summary", dumps(report["summary"], indent=1), flush=True)
    report["wall_s"] = time.perf_counter() - started
    report["load_average_end"] = os.getloadavg()
    if args.json_out:
        args.json_out.write_text(dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
