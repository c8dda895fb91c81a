"""Evaluation metrics as pure functions: retrieval recall, caption metrics, filter quality and
the correctness of curated captions. `model/evaluation/evaluate.py` runs the models and calls these.

What comes from libraries: BLEU-4 and CIDEr are pycocoevalcap's (with its PTB tokenizer, which
runs Java), and captions are read back with ``transforms.synth.scenes.parse_caption``. What is ours,
because no library ships it for our data: Recall@K from a similarity matrix with BLIP's
ITM re-ranking of the ITC top-k (BLIP's version lives inside a training script), and the
precision/recall of the filter and the correctness of curated captions against the synthetic
world's truth table (a few lines of numpy over our own truth format).

All fractions and recalls are in [0, 1] (a "10 point" gain in R@1 is +0.10); CIDEr is in [0, 10].
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa

from capfilt.transforms.synth.scenes import NOISE_TYPES, Obj, Scene, caption_matches, parse_caption

RECALL_KS = (1, 5, 10)
ATTRIBUTE_NAMES = ("colour", "shape", "position")


# --- retrieval ---------------------------------------------------------------------------------

def _ranks(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Rank (0 = first) of the best positive in each row of `scores` (R, C), `positive` a
    (R, C) bool mask. Ties count against the positive, so a collapsed model that gives every
    pair the same score gets R@1 = 0, not 1."""
    best = np.where(positive, scores, -np.inf).max(axis=1, keepdims=True)  # (R, 1)
    return ((scores >= best) & ~positive).sum(axis=1)  # (R,)


def retrieval_recall(
    sim_i2t: np.ndarray,
    text_image: Sequence[int],
    sim_t2i: np.ndarray | None = None,
    ks: Sequence[int] = RECALL_KS,
    texts: Sequence[str] | None = None,
) -> dict[str, float]:
    """Image→text and text→image Recall@K.

    `sim_i2t` is (N_img, N_txt); `text_image[t]` is the index of text t's image (an image may
    own several texts; i2t counts a hit when any of its texts is in the top K). `sim_t2i`
    defaults to `sim_i2t` (they differ after ITM re-ranking). With `texts`, identical strings
    are interchangeable: retrieving another image's copy of an image's own caption is a hit,
    and so is retrieving any image that owns a text identical to the query. Returns
    ``i2t_r{k}``, ``t2i_r{k}`` for each k and ``r_mean``, the mean of all of them, in [0, 1].
    """
    sim_i2t = np.asarray(sim_i2t, dtype=np.float64)
    sim_t2i = sim_i2t if sim_t2i is None else np.asarray(sim_t2i, dtype=np.float64)
    text_image = np.asarray(text_image, dtype=np.int64)
    n_img, n_txt = sim_i2t.shape
    if sim_t2i.shape != sim_i2t.shape:
        raise ValueError(f"sim_t2i has shape {sim_t2i.shape}, sim_i2t has {sim_i2t.shape}")
    if text_image.shape != (n_txt,):
        raise ValueError(f"text_image has shape {text_image.shape}, expected ({n_txt},)")
    if n_txt and (text_image.min() < 0 or text_image.max() >= n_img):
        raise ValueError(f"text_image holds an image index outside [0, {n_img})")
    owns = text_image[None, :] == np.arange(n_img)[:, None]  # (N_img, N_txt)
    if not owns.any(axis=1).all():
        raise ValueError(f"image {int(np.argmin(owns.any(axis=1)))} has no text")
    if texts is not None:
        if len(texts) != n_txt:
            raise ValueError(f"{len(texts)} texts for {n_txt} similarity columns")
        _, text_id = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
        same = text_id[:, None] == text_id[None, :]  # (N_txt, N_txt) identical strings
        owns = (owns.astype(np.int64) @ same.astype(np.int64)) > 0  # (N_img, N_txt)
    i2t = _ranks(sim_i2t, owns)  # (N_img,)
    t2i = _ranks(sim_t2i.T, owns.T)  # (N_txt,)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t < k).mean())
        out[f"t2i_r{k}"] = float((t2i < k).mean())
    out["r_mean"] = float(np.mean(list(out.values())))
    return out


def itm_rerank(
    sim: np.ndarray, k: int, score_pairs: Callable[[list[int], list[list[int]]], list[np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """BLIP's retrieval protocol: the ITC similarity picks each query's top `k` candidates and
    the ITM head re-scores only those (score = ITM + ITC); everything else is -inf.

    `sim` is the (N_img, N_txt) ITC matrix. `score_pairs(image_indices, text_indices_per_image)`
    returns the ITM probability of every listed pair, one array per image; it is called with
    each image at most once per batch, so a filter that encodes each image once pays one
    vision pass per image for both directions. Returns (i2t scores, t2i scores), both
    (N_img, N_txt).
    """
    sim = np.asarray(sim, dtype=np.float64)
    n_img, n_txt = sim.shape
    if k < 1:
        raise ValueError(f"re-rank k must be >= 1, got {k}")
    top_t = np.argsort(-sim, axis=1, kind="stable")[:, : min(k, n_txt)]  # (N_img, k)
    top_i = np.argsort(-sim, axis=0, kind="stable")[: min(k, n_img), :]  # (k, N_txt)
    wanted: list[set[int]] = [set(row.tolist()) for row in top_t]
    for t in range(n_txt):
        for i in top_i[:, t]:
            wanted[int(i)].add(t)
    images = [i for i in range(n_img) if wanted[i]]
    texts = [sorted(wanted[i]) for i in images]
    itm = np.full_like(sim, np.nan)
    for i, ts, scores in zip(images, texts, score_pairs(images, texts)):
        itm[i, ts] = np.asarray(scores, dtype=np.float64)
    i2t = np.full_like(sim, -np.inf)
    t2i = np.full_like(sim, -np.inf)
    rows = np.arange(n_img)[:, None]
    i2t[rows, top_t] = itm[rows, top_t] + sim[rows, top_t]
    cols = np.arange(n_txt)[None, :]
    t2i[top_i, cols] = itm[top_i, cols] + sim[top_i, cols]
    return i2t, t2i


# --- captioning --------------------------------------------------------------------------------

def caption_scores(references: dict[str, list[str]], candidates: dict[str, str]) -> dict[str, float]:
    """BLEU-4 and CIDEr (pycocoevalcap, PTB-tokenised) of one candidate per key against its
    references. Needs Java on PATH for the tokenizer."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    missing = sorted(set(candidates) - set(references))
    if missing:
        raise ValueError(f"candidates without references, e.g. key {missing[0]!r}")
    if not candidates:
        raise ValueError("no candidate captions to score")
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": r} for r in references[k]] for k in candidates})
    res = tok.tokenize({k: [{"caption": c}] for k, c in candidates.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


def scene_from_truth(row: dict) -> Scene:
    """The scene of one truth.parquet row (attribute lists, one entry per object)."""
    lists = [row.get(name) for name in ("shapes", "colours", "sizes", "positions")]
    if any(v is None for v in lists) or len({len(v) for v in lists}) != 1:
        raise ValueError(f"truth row {row.get('key')!r} has missing or ragged attribute lists")
    objects = tuple(Obj(s, c, z, p) for s, c, z, p in zip(*lists))
    return Scene(objects, row.get("background") or "", row.get("background_colour") or "")


def attribute_accuracy(captions: Sequence[str], scenes: Sequence[Scene]) -> dict[str, float]:
    """How well captions state their scenes' objects.

    Each true object is matched to the stated object that agrees with it on most attributes
    (each stated object used once); an unmatched true object counts as wrong on every
    attribute. Returns per-attribute accuracy over true objects (``colour``, ``shape``,
    ``position``), their mean ``attribute_accuracy``, and ``exact``: the fraction of captions
    that state exactly the scene's objects (``transforms.synth.scenes.caption_matches``).
    """
    if len(captions) != len(scenes):
        raise ValueError(f"{len(captions)} captions for {len(scenes)} scenes")
    hits = {a: 0 for a in ATTRIBUTE_NAMES}
    n_objects = exact = 0
    for text, scene in zip(captions, scenes):
        stated = list(parse_caption(text))
        exact += caption_matches(text, scene)
        for obj in scene.objects:
            n_objects += 1
            if not stated:
                continue
            agree = [[getattr(s, a) == getattr(obj, a) for a in ATTRIBUTE_NAMES] for s in stated]
            best = int(np.argmax([sum(a) for a in agree]))
            for name, ok in zip(ATTRIBUTE_NAMES, agree[best]):
                hits[name] += ok
            stated.pop(best)
    if not n_objects:
        raise ValueError("no objects in the given scenes")
    out = {a: hits[a] / n_objects for a in ATTRIBUTE_NAMES}
    out["attribute_accuracy"] = float(np.mean([out[a] for a in ATTRIBUTE_NAMES]))
    out["exact"] = exact / len(captions)
    return out


# --- filter and curated data -------------------------------------------------------------------

def binary_prf(predicted: Sequence[bool], actual: Sequence[bool]) -> dict[str, float]:
    """Precision, recall and F1 of `predicted` against `actual` (positives are True), with
    the confusion counts. Precision is 0 when nothing is predicted (sklearn's convention)."""
    p = np.asarray(predicted, dtype=bool)
    a = np.asarray(actual, dtype=bool)
    if p.shape != a.shape:
        raise ValueError(f"{p.size} predictions for {a.size} labels")
    tp, fp, fn = int((p & a).sum()), int((p & ~a).sum()), int((~p & a).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1,
            "tp": tp, "fp": fp, "fn": fn, "tn": int(p.size - tp - fp - fn)}


def precision_at_recall(noisy_score: Sequence[float], actual: Sequence[bool], min_recall: float = 0.9) -> dict:
    """The best operating point of a score where higher means "more likely noisy".

    Sweeps every threshold and returns the highest precision among those reaching
    `min_recall` (with that threshold and recall), plus the average precision (area under the
    precision-recall steps, as sklearn's ``average_precision_score`` defines it).
    """
    score = np.asarray(noisy_score, dtype=np.float64)
    actual = np.asarray(actual, dtype=bool)
    if score.shape != actual.shape or not score.size:
        raise ValueError(f"{score.size} scores for {actual.size} labels")
    if np.isnan(score).any():
        raise ValueError(f"score {int(np.argmax(np.isnan(score)))} is NaN")
    order = np.argsort(-score, kind="stable")
    s, a = score[order], actual[order]
    last = np.r_[s[1:] != s[:-1], True]  # the last row of each run of tied scores
    tp = np.cumsum(a)[last]
    flagged = (np.arange(s.size) + 1)[last]
    positives = max(int(a.sum()), 1)
    precision, recall = tp / flagged, tp / positives
    ap = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    ok = recall >= min_recall
    if not ok.any():
        return {"min_recall": min_recall, "precision": 0.0, "recall": 0.0, "threshold": None,
                "average_precision": ap}
    best = int(np.argmax(np.where(ok, precision, -1.0)))
    return {"min_recall": min_recall, "precision": float(precision[best]), "recall": float(recall[best]),
            "threshold": float(s[last][best]), "average_precision": ap}


def filter_metrics(flagged: Sequence[bool], noise_types: Sequence[str],
                   wrong_attributes: Sequence[str | None] | None = None) -> dict:
    """Quality of "the web caption is noisy" predictions against the truth's noise types.

    Overall precision/recall/F1 (noisy = any type but ``correct``), and per noise type: its
    count, the fraction flagged (the recall for a noisy type, the false-alarm rate for
    ``correct``), and precision/recall/F1 on the rows of that type plus the correct rows.
    With the truth's ``wrong_attribute`` per row, ``per_wrong_attribute`` splits the
    one-wrong-attribute rows by the attribute that is wrong (count, fraction flagged): a filter
    that sees colour but not shape shows it there.
    """
    flagged = np.asarray(flagged, dtype=bool)
    types = np.asarray(noise_types, dtype=object)
    unknown = sorted(set(types.tolist()) - set(NOISE_TYPES))
    if unknown:
        raise ValueError(f"unknown noise type {unknown[0]!r}; expected one of {NOISE_TYPES}")
    noisy = types != "correct"
    out = binary_prf(flagged, noisy)
    out["n"] = int(flagged.size)
    per_type = {}
    for name in NOISE_TYPES:
        rows = types == name
        if not rows.any():
            continue
        entry = {"n": int(rows.sum()), "flagged_fraction": float(flagged[rows].mean())}
        if name != "correct":
            subset = rows | ~noisy
            entry.update({k: v for k, v in binary_prf(flagged[subset], noisy[subset]).items()
                          if k in ("precision", "recall", "f1")})
        per_type[name] = entry
    out["per_type"] = per_type
    if wrong_attributes is not None:
        if len(wrong_attributes) != flagged.size:
            raise ValueError(f"{len(wrong_attributes)} wrong_attribute values for {flagged.size} rows")
        wrong = np.asarray(wrong_attributes, dtype=object)
        per_attribute = {}
        for name in sorted({w for w, t in zip(wrong, types) if t == "attribute" and w is not None}):
            rows = (types == "attribute") & (wrong == name)
            per_attribute[str(name)] = {"n": int(rows.sum()), "flagged_fraction": float(flagged[rows].mean())}
        out["per_wrong_attribute"] = per_attribute
    return out


def curated_metrics(curated: pa.Table, truth: pa.Table) -> dict:
    """Correctness of the captions a curate run selected, against the truth.

    A selected caption is correct when it is the web caption of a row labelled ``correct``, or
    a synthetic caption that states exactly the image's objects (``caption_matches``). Before
    CapFilt every web row trains on its web caption, so ``web_correct_fraction`` is the share of
    rows labelled correct; ``selected_correct_fraction`` is the share of selected captions that
    are correct (None when nothing was selected). ``noise_removed`` is the share of noisy web
    captions not selected.
    """
    truth_rows = {r["key"]: r for r in truth.to_pylist()}
    rows = curated.select(["key", "captions", "caption_sources", "keep"]).to_pylist()
    if not rows:
        raise ValueError("the curated data has no rows")
    missing = [r["key"] for r in rows if r["key"] not in truth_rows]
    if missing:
        raise ValueError(f"curated key {missing[0]!r} is not in the truth table")
    web_ok = selected = selected_ok = web_selected = noisy = noisy_removed = 0
    by_source = {"web": [0, 0], "synthetic": [0, 0]}
    for row in rows:
        t = truth_rows[row["key"]]
        label_ok = t["noise_type"] == "correct"
        web_ok += label_ok
        scene = scene_from_truth(t)
        captions = row["captions"] or []
        sources = row["caption_sources"] or []
        if len(captions) != len(sources):
            raise ValueError(f"row {row['key']!r}: {len(captions)} captions, {len(sources)} sources")
        took_web = row["keep"] and "web" in sources
        if not label_ok:
            noisy += 1
            noisy_removed += not took_web
        for caption, source in zip(captions if row["keep"] else [], sources):
            ok = label_ok if source == "web" else caption_matches(caption, scene)
            selected += 1
            selected_ok += ok
            web_selected += source == "web"
            counts = by_source.setdefault(source, [0, 0])
            counts[0] += 1
            counts[1] += ok
    n = len(rows)
    return {
        "rows": n,
        "kept_rows": int(sum(bool(r["keep"]) for r in rows)),
        "selected_captions": selected,
        "web_correct_fraction": web_ok / n,
        "selected_correct_fraction": selected_ok / selected if selected else None,
        "web_selected_fraction": web_selected / selected if selected else None,
        "noise_removed": noisy_removed / noisy if noisy else 0.0,
        "correct_by_source": {k: (v[1] / v[0] if v[0] else None) for k, v in by_source.items()},
    }
