"""Run the models on held-out shards and measure them (the engine of `capfilt evaluate`).

* retrieval: the ITC similarity of every test image with every test caption, from the BLIP or
  BLIP-2 filter (``load_filter``) or a CLIP ranker (``ClipRanker``), then Recall@K, optionally
  after BLIP's ITM re-ranking of each query's top-k (``metrics.itm_rerank``);
* caption: one greedy caption per image from ``Captioner`` (top_p 0), BLEU-4/CIDEr against the
  reference and, with the synthetic truth, attribute accuracy;
* filter: ITM p(match) of each web caption, flagged noisy below the threshold, against the
  truth labels; or the ``web_itm`` column of curated shards, which curate already computed;
* curated: ``metrics.curated_metrics`` over curated shards.

The metric arithmetic is in ``model/evaluation/metrics.py``. The filter classes expose the image side of
ITC (``encode_images``); the text side of the full N x N similarity matrix is computed here from
the same sub-modules, because ``score`` pairs each text with one image only.

Truth rows are joined on the key and checked against the caption: synthetic worlds of
different seeds share their keys (``web_0000000`` ...), and a truth file from another world
would otherwise be scored silently. Progress bars (tqdm, on stderr) cover decoding and every
batched model pass: ``progress=True`` shows them, ``None`` only on a terminal (what `capfilt
evaluate` passes), ``False`` (the default, for callers such as the bootstrap) hides them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from capfilt.model.evaluation import metrics
from capfilt.model.inference.captioner import CaptionConfig
from capfilt.model.inference.device import inference_context
from capfilt.model.builders.model_dirs import find_model_dirs
from capfilt.model.specs import ModelSpec
from capfilt.transforms import shards as reader
from capfilt.transforms.image import ImageDecodeError, decode_image
from capfilt.transforms.text import clean_caption

log = logging.getLogger(__name__)

# Caption benchmarks decode deterministically; lengths count the prompt tokens (BLIP's generate).
CAPTION_MIN_LENGTH = 5
CAPTION_MAX_LENGTH = 40
TRUTH_COLUMNS = ("key", "caption", "noise_type", "true_caption", "shapes", "colours", "sizes", "positions")


@dataclass
class EvalImages:
    """Decoded rows of raw shards: keys (N,), images (N,) RGB PIL, captions (N,) cleaned web
    or reference captions, and the rows skipped before decoding or by it (key, reason)."""

    keys: list[str] = field(default_factory=list)
    images: list = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


def read_table(data: str, columns: list[str]) -> pa.Table:
    """The given columns of every parquet shard matching `data` (glob, directory or file)."""
    return reader.read_columns(reader.expand_paths(data), columns, where=data)


def check_sizes(batch_size: int = 1, limit: int | None = None) -> None:
    """ValueError naming a batch size or row limit below 1 (range() and the decoder would
    otherwise fail with messages that do not say which option was wrong)."""
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and int(limit) < 1:
        raise ValueError(f"limit must be >= 1 (or None for every row), got {limit}")


def _bar(iterable, desc: str, total: int | None, progress: bool | None, unit: str = "batch"):
    """A tqdm bar on stderr; `progress` None: only on a terminal (tqdm's own rule)."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=None if progress is None else not progress,
                leave=False)


def load_eval_images(data: str, limit: int | None = None, progress: bool | None = False) -> EvalImages:
    """Decode raw img2dataset shards (rows with status != success are skipped with a reason)."""
    check_sizes(limit=limit)
    table = read_table(data, ["key", "caption", "status", "jpg"])
    out = EvalImages()
    total = table.num_rows if limit is None else min(limit, table.num_rows)
    for row in _bar(table.to_pylist(), "decode", total, progress, unit="img"):
        if limit is not None and len(out.keys) >= limit:
            break
        if row["status"] not in (None, "success"):
            out.skipped.append({"key": row["key"], "reason": f"status={row['status']}"})
            continue
        try:
            image = decode_image(row["jpg"] or b"")
        except ImageDecodeError as exc:
            out.skipped.append({"key": row["key"], "reason": exc.reason})
            continue
        out.keys.append(row["key"])
        out.images.append(image)
        out.captions.append(clean_caption(row["caption"]))
    if not out.keys:
        raise ValueError(f"no decodable rows in {data!r} ({len(out.skipped)} skipped)")
    return out


def read_truth(path) -> pa.Table:
    """truth.parquet from `capfilt synth`, checked for the columns the metrics read."""
    table = pq.read_table(path)
    missing = [c for c in TRUTH_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"truth file {path} lacks column(s) {missing}")
    return table


def _same_caption(truth_caption, shard_caption) -> bool:
    """The shard's caption is the truth's web caption as written (raw shards) or cleaned
    (curated ``web_caption``; curate's --max-words may have cut it short)."""
    want = clean_caption(truth_caption, max_words=None).split()
    got = clean_caption(shard_caption, max_words=None).split()
    return got == want or 0 < len(got) < len(want) and want[:len(got)] == got


def _truth_rows(truth: pa.Table, keys, captions, where: str) -> list[dict]:
    """The truth rows of `keys`, in order. ValueError naming the first key the truth lacks,
    or the first whose caption differs from the shard's (`captions`, parallel to `keys`): a
    truth file of another synthetic world has the same keys."""
    by_key = {r["key"]: r for r in truth.to_pylist()}
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise ValueError(f"{where}: key {missing[0]!r} is not in the truth file")
    for key, caption in zip(keys, captions):
        if not _same_caption(by_key[key]["caption"], caption):
            raise ValueError(f"{where}: key {key!r} has the caption {caption!r} in the shards but "
                             f"{by_key[key]['caption']!r} in the truth file; is the truth from another world?")
    return [by_key[k] for k in keys]


def _model_path(model_dir, kinds: tuple[str, ...], what: str) -> tuple[str | None, str]:
    """(kind, path) of the first of `kinds` (``model.model_dirs`` names) in a local model
    directory or pretrain/finetune output, read from the configs; (None, `model_dir`) for a
    hub id or an open_clip spec, which the library loader resolves. ValueError naming what the
    directory holds when it has none of `kinds` (a BLIP-2 output has no captioner, a
    Q-Former-only export nothing loadable)."""
    spec = ModelSpec.parse(model_dir)
    if not (spec.local and spec.path.is_dir()):
        return None, str(model_dir)
    found = find_model_dirs(model_dir)
    kind = next((k for k in kinds if k in found), None)
    if kind is None:
        raise ValueError(f"{model_dir}: no {what} (found {sorted(found)})")
    return kind, found[kind]


def _batches(items, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


# --- retrieval ---------------------------------------------------------------------------------

def _filter_text_features(flt, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(T, E) normalised ITC text features, through the same modules ``flt.score`` uses."""
    model = flt.model
    if hasattr(model, "text_encoder"):  # BLIP: unimodal text encoder, [CLS] projected
        hidden = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (T, L, D)
        return F.normalize(model.text_proj(hidden[:, 0, :]), dim=-1)
    hidden = model.qformer(  # BLIP-2: the Q-Former run on text alone
        query_embeds=model.embeddings(input_ids=ids), query_length=0, attention_mask=mask,
    ).last_hidden_state.to(dtype=model.text_projection.weight.dtype)  # (T, L, H)
    return F.normalize(model.text_projection(hidden[:, 0, :]), dim=-1)


def _n_batches(n: int, size: int) -> int:
    return -(-n // size)


def filter_itc_matrix(flt, images, texts, batch_size: int = 32, progress: bool | None = False) -> np.ndarray:
    """(N_img, N_txt) ITC cosine of every image with every text (BLIP-2: max over queries)."""
    check_sizes(batch_size)
    with inference_context(flt.device, flt.bf16):
        image_feats = torch.cat([flt.encode_images(flt.pixel_values(b))["feats"]
                                 for b in _bar(_batches(images, batch_size), "itc images",
                                               _n_batches(len(images), batch_size), progress)])  # (N, E) or (N, Q, E)
        text_feats = torch.cat([_filter_text_features(flt, *flt.tokenize(b))
                                for b in _bar(_batches(texts, 4 * batch_size), "itc texts",
                                              _n_batches(len(texts), 4 * batch_size), progress)])  # (T, E)
        if image_feats.dim() == 3:
            sim = torch.einsum("nqe,te->ntq", image_feats, text_feats).max(dim=-1).values
        else:
            sim = image_feats @ text_feats.T  # (N, T)
    return sim.float().cpu().numpy()


def evaluate_retrieval(model_dir, data: str, itm_rerank: int = 0, batch_size: int = 32,
                       device: str = "auto", limit: int | None = None, progress: bool | None = False,
                       itm_first_token: str = "enc") -> dict:
    """R@1/5/10 both ways on `data` (one caption per image). A directory holding ``itm/`` (or
    an ITM model itself) is scored with its ITC head; one holding ``clip/`` with CLIP. The ITM
    re-ranking starts its texts with ``itm_first_token`` (``model.tokens``)."""
    from capfilt.model.inference.filter import load_filter

    check_sizes(batch_size, limit)
    evalset = load_eval_images(data, limit, progress)
    kind, path = _model_path(model_dir, ("itm", "blip2", "clip"), "ITM or CLIP model for retrieval")
    if kind in ("itm", "blip2"):
        flt = load_filter(path, device=device, itm_first_token=itm_first_token)
        sim = filter_itc_matrix(flt, evalset.images, evalset.captions, batch_size, progress)
        scorer = f"itc:{path}"
    else:
        from capfilt.model.inference.ranker import ClipRanker

        ranker = ClipRanker.load(path, device=device)
        batches = _bar(_batches(evalset.images, batch_size), "clip images",
                       _n_batches(len(evalset.images), batch_size), progress)
        image_feats = np.concatenate([ranker.encode_images(b) for b in batches])
        sim = image_feats @ ranker.encode_texts(evalset.captions).T  # (N, N) cosine
        flt, scorer = None, f"clip:{path}"
    text_image = np.arange(len(evalset.keys))
    texts = evalset.captions  # identical captions of different images are the same text
    result = {"n_images": len(evalset.keys), "skipped": len(evalset.skipped), "scorer": scorer,
              "duplicate_captions": len(texts) - len(set(texts)),
              **metrics.retrieval_recall(sim, text_image, texts=texts)}
    if itm_rerank:
        if flt is None:
            raise ValueError(f"--itm-rerank needs an ITM model; {model_dir} holds only CLIP")

        def score_pairs(image_idx, text_idx):
            out = []
            chunks = range(0, len(image_idx), batch_size)
            for chunk in _bar(chunks, "itm rerank", len(chunks), progress):
                imgs = [evalset.images[i] for i in image_idx[chunk:chunk + batch_size]]
                caps = [[evalset.captions[t] for t in ts] for ts in text_idx[chunk:chunk + batch_size]]
                out.extend(s.itm for s in flt.score(imgs, caps))
            return out

        i2t, t2i = metrics.itm_rerank(sim, itm_rerank, score_pairs)
        result["itm_rerank"] = {"k": itm_rerank, "itm_first_token": flt.itm_first_token,
                                **metrics.retrieval_recall(i2t, text_image, t2i, texts=texts)}
    return result


# --- captioning --------------------------------------------------------------------------------

def evaluate_captions(model_dir, data: str, truth=None, batch_size: int = 32, seed: int = 0,
                      top_p: float = 0.0, device: str = "auto", limit: int | None = None,
                      prompt: str = CaptionConfig.prompt, examples: int = 5, progress: bool | None = False) -> dict:
    """BLEU-4 and CIDEr of one caption per image against the reference (the truth's
    ``true_caption`` when `truth` is given, else the shard's caption), plus attribute accuracy
    against the truth's objects. ``top_p=0`` is greedy decoding. `prompt` is the one the
    decoder was trained with (BLIP: "a picture of " after caption finetuning, none in
    pretraining)."""
    from capfilt.model.inference.captioner import Captioner

    check_sizes(batch_size, limit)
    evalset = load_eval_images(data, limit, progress)
    truth_rows = _truth_rows(read_truth(truth), evalset.keys, evalset.captions, str(data)) if truth else None
    _, path = _model_path(model_dir, ("captioner",), "captioner (BlipForConditionalGeneration) to evaluate")
    captioner = Captioner.from_pretrained(path, device=device)
    generated: list[str] = []
    starts = range(0, len(evalset.keys), batch_size)
    for start in _bar(starts, "caption", len(starts), progress):
        stop = start + batch_size
        out = captioner.caption(evalset.images[start:stop], evalset.keys[start:stop], n=1, seed=seed,
                                top_p=top_p, prompt=prompt, min_length=CAPTION_MIN_LENGTH,
                                max_length=CAPTION_MAX_LENGTH)
        generated.extend(c[0] for c in out)
    refs = [r["true_caption"] for r in truth_rows] if truth_rows else evalset.captions
    references = {k: [clean_caption(r)] for k, r in zip(evalset.keys, refs)}
    candidates = dict(zip(evalset.keys, generated))
    result = {"n_images": len(evalset.keys), "skipped": len(evalset.skipped), "prompt": prompt,
              **metrics.caption_scores(references, candidates)}
    if truth_rows:
        scenes = [metrics.scene_from_truth(r) for r in truth_rows]
        result.update(metrics.attribute_accuracy(generated, scenes))
    result["examples"] = [{"key": k, "generated": g, "reference": references[k][0]}
                          for k, g in list(zip(evalset.keys, generated))[:examples]]
    return result


# --- filter and curated ------------------------------------------------------------------------

def _filter_result(web_itm: np.ndarray, rows: list[dict], threshold: float, n_skipped: int) -> dict:
    """Flag at the threshold, plus the best precision reachable at recall >= 0.9."""
    noise_types = [r["noise_type"] for r in rows]
    wrong = [r["wrong_attribute"] for r in rows] if rows and "wrong_attribute" in rows[0] else None
    noisy = np.array([t != "correct" for t in noise_types])
    flagged = ~(web_itm >= threshold)  # NaN (no score: empty caption) counts as flagged
    result = {"n": int(len(noise_types)), "skipped": n_skipped, "threshold": threshold,
              **metrics.filter_metrics(flagged, noise_types, wrong)}
    noisy_score = 1.0 - np.nan_to_num(web_itm, nan=0.0)
    best = metrics.precision_at_recall(noisy_score, noisy, 0.9)
    if best["threshold"] is not None:  # flagged when 1 - itm >= t, i.e. itm <= 1 - t
        best["itm_threshold"] = 1.0 - best.pop("threshold")
    result["at_recall_0.9"] = best
    return result


def _score_raw_captions(model_dir, evalset: EvalImages, batch_size: int, device: str,
                        progress: bool | None = False, itm_first_token: str = "enc") -> tuple[np.ndarray, str, str]:
    """((N,) ITM p(match) of each decoded row's own caption, filter directory, the ITM text's first
    token used). An empty caption is never a candidate in curate, so it gets NaN (counted as flagged)."""
    from capfilt.model.inference.filter import load_filter

    check_sizes(batch_size)
    _, source = _model_path(model_dir, ("itm", "blip2"), "ITM filter")
    flt = load_filter(source, device=device, itm_first_token=itm_first_token)
    web_itm = np.full(len(evalset.keys), np.nan)
    starts = range(0, len(evalset.keys), batch_size)
    for start in _bar(starts, "itm", len(starts), progress):
        idx = [i for i in range(start, min(start + batch_size, len(evalset.keys))) if evalset.captions[i]]
        if idx:
            scores = flt.score([evalset.images[i] for i in idx], [[evalset.captions[i]] for i in idx])
            web_itm[idx] = [float(s.itm[0]) for s in scores]
    return web_itm, source, flt.itm_first_token


def evaluate_filter(model_dir, data: str, truth, threshold: float = 0.5, batch_size: int = 32,
                    device: str = "auto", limit: int | None = None, progress: bool | None = False,
                    itm_first_token: str = "enc") -> dict:
    """Quality of "the web caption is noisy" (ITM p < threshold) against the truth labels.

    Curated shards (with ``web_itm``) are read as they are; raw shards are scored with the
    filter in `model_dir`. An empty web caption is never a candidate in curate, so it counts
    as flagged without being scored."""
    check_sizes(batch_size, limit)
    truth_table = read_truth(truth)
    names = reader.shards_schema(reader.expand_paths(data)).names
    if "web_itm" in names:
        table = read_table(data, ["key", "web_itm", "web_caption"])
        if limit is not None:
            table = table.slice(0, limit)
        keys = table.column("key").to_pylist()
        web_itm = np.array([np.nan if v is None else v for v in table.column("web_itm").to_pylist()],
                           dtype=np.float64)
        rows = _truth_rows(truth_table, keys, table.column("web_caption").to_pylist(), str(data))
        return {"source": "web_itm column", **_filter_result(web_itm, rows, threshold, 0)}
    if model_dir is None:
        raise ValueError(f"{data!r} has no web_itm column: pass --model to score it with a filter")
    evalset = load_eval_images(data, limit, progress)
    rows = _truth_rows(truth_table, evalset.keys, evalset.captions, str(data))  # checked before scoring
    web_itm, source, first = _score_raw_captions(model_dir, evalset, batch_size, device, progress, itm_first_token)
    return {"source": source, "itm_first_token": first,
            **_filter_result(web_itm, rows, threshold, len(evalset.skipped))}


def evaluate_filter_clean(model_dir, data: str, threshold: float = 0.5, batch_size: int = 32,
                          device: str = "auto", limit: int | None = None, progress: bool | None = False,
                          itm_first_token: str = "enc") -> dict:
    """False alarms of the filter on pairs known to match (a human-labelled split such as COCO,
    no truth file needed): the share of captions it would flag (ITM p < threshold).

    On the filter's own finetuning pairs and on held-out clean pairs, the two rates show whether
    it learnt its training pairs rather than what makes a caption wrong (docs/results.md)."""
    if model_dir is None:
        raise ValueError(f"scoring {data!r} for false alarms needs a filter model directory")
    check_sizes(batch_size, limit)
    evalset = load_eval_images(data, limit, progress)
    itm, source, first = _score_raw_captions(model_dir, evalset, batch_size, device, progress, itm_first_token)
    flagged = ~(itm >= threshold)  # NaN (empty caption) counts as flagged
    scored = itm[np.isfinite(itm)]
    return {"source": source, "itm_first_token": first, "n": len(evalset.keys), "skipped": len(evalset.skipped),
            "threshold": threshold, "flagged": int(flagged.sum()), "flagged_fraction": float(flagged.mean()),
            "itm_mean": float(scored.mean()) if scored.size else None}


def evaluate_curated(data: str, truth) -> dict:
    """Correct-caption fractions of curated shards before and after CapFilt (see
    ``metrics.curated_metrics``)."""
    table = read_table(data, ["key", "captions", "caption_sources", "keep", "web_caption"])
    truth_table = read_truth(truth)
    _truth_rows(truth_table, table.column("key").to_pylist(), table.column("web_caption").to_pylist(), str(data))
    return metrics.curated_metrics(table, truth_table)
