"""The CapFilt selection rule, as a pure function of one image's captions and scores.

1. The candidates are the web caption and the N synthetic captions; an empty caption (after
   cleaning) is not a candidate.
2. A candidate passes the filter when its ITM p(match) >= ``itm_threshold`` (a missing or NaN
   score fails). With the filter switched off (``--no-filter``) every candidate passes.
3. Identical passing texts count once (the first in candidate order: web, then synthetic 0..N-1),
   so the same sentence is never selected twice.
4. The passing candidates are ranked by CLIP cosine, highest first (ties: candidate order), and
   the top ``keep_top`` are selected.
5. ``keep`` is true when anything is selected; otherwise ``drop_reason`` says why (one of
   :data:`DROP_REASONS`).

No library implements BLIP's CapFilt rule, so it is written here; the graph calls it per row.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

EMPTY_WEB_NO_SYNTHETIC = "empty_web_caption_and_no_synthetic"
EMPTY_WEB_EMPTY_SYNTHETIC = "empty_web_caption_and_empty_synthetic"
NONE_PASSED_FILTER = "no_caption_passed_filter"
DROP_REASONS = (EMPTY_WEB_NO_SYNTHETIC, EMPTY_WEB_EMPTY_SYNTHETIC, NONE_PASSED_FILTER)


@dataclass(frozen=True)
class Selection:
    """The outcome for one image.

    captions: the selected captions, best CLIP score first (at most keep_top).
    sources: "web" or "synthetic" for each selected caption (same length as captions).
    keep: at least one caption selected. drop_reason: None when kept.
    """

    captions: list[str]
    sources: list[str]
    keep: bool
    drop_reason: str | None


def _score(value) -> float:
    """A score as a float; None and NaN become -inf so they rank last and never pass."""
    if value is None:
        return -math.inf
    value = float(value)
    return -math.inf if math.isnan(value) else value


def _check_lengths(synthetic: Sequence[str], **lists) -> None:
    for name, values in lists.items():
        if values is not None and len(values) != len(synthetic):
            raise ValueError(f"{name} has {len(values)} scores for {len(synthetic)} synthetic captions")


def select_captions(
    web_caption: str | None,
    synthetic: Sequence[str],
    web_itm: float | None,
    synthetic_itm: Sequence[float] | None,
    web_clip: float | None,
    synthetic_clip: Sequence[float] | None,
    *,
    itm_threshold: float = 0.5,
    keep_top: int = 2,
    use_filter: bool = True,
) -> Selection:
    """Apply the rule of the module docstring to one image."""
    if keep_top < 1:
        raise ValueError(f"keep_top must be >= 1, got {keep_top}")
    synthetic = list(synthetic or [])
    _check_lengths(synthetic, synthetic_itm=synthetic_itm, synthetic_clip=synthetic_clip)
    if use_filter and synthetic and synthetic_itm is None:
        raise ValueError("synthetic_itm is missing while the filter is on")
    if synthetic and synthetic_clip is None:
        raise ValueError("synthetic_clip is missing for the synthetic captions")

    candidates = _candidates(web_caption, synthetic, web_itm, synthetic_itm, web_clip, synthetic_clip)
    if not candidates:
        reason = EMPTY_WEB_EMPTY_SYNTHETIC if synthetic else EMPTY_WEB_NO_SYNTHETIC
        return Selection([], [], False, reason)
    ranked = _ranked(candidates, itm_threshold, use_filter)
    if not ranked:
        return Selection([], [], False, NONE_PASSED_FILTER)
    ranked = ranked[:keep_top]
    return Selection([c[1] for c in ranked], [c[2] for c in ranked], True, None)


def _candidates(web_caption, synthetic, web_itm, synthetic_itm, web_clip, synthetic_clip) -> list[tuple]:
    """(candidate order, text, source, itm, clip) of every non-empty caption (rule 1)."""
    candidates = []
    if web_caption:
        candidates.append((0, web_caption, "web", _score(web_itm), _score(web_clip)))
    for i, text in enumerate(synthetic):
        if text:
            itm = _score(synthetic_itm[i]) if synthetic_itm is not None else -math.inf
            clip = _score(synthetic_clip[i]) if synthetic_clip is not None else -math.inf
            candidates.append((i + 1, text, "synthetic", itm, clip))
    return candidates


def _ranked(candidates: list[tuple], itm_threshold: float, use_filter: bool) -> list[tuple]:
    """The passing candidates (rule 2), first of each text (rule 3), best CLIP first (rule 4)."""
    passing = [c for c in candidates if not use_filter or c[3] >= itm_threshold]
    seen, unique = set(), []
    for c in passing:
        if c[1] not in seen:
            seen.add(c[1])
            unique.append(c)
    return sorted(unique, key=lambda c: (-c[4], c[0]))


# -- how close a decision is to flipping (bf16 scores checked in fp32, pipeline/curate/precision.py) ----

def near_itm_threshold(itm_scores: Sequence[float | None], itm_threshold: float, margin: float) -> bool:
    """True when some score lies within ``margin`` of the threshold: an error of up to
    ``margin`` in the scores could then change whether that caption passes (rule 2)."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    return any(abs(_score(v) - itm_threshold) <= margin for v in itm_scores)


def close_clip_ranking(
    texts: Sequence[str],
    itm_scores: Sequence[float] | None,
    clip_scores: Sequence[float],
    *,
    margin: float,
    itm_threshold: float = 0.5,
    keep_top: int = 2,
) -> bool:
    """True when an error of up to ``margin`` in each CLIP score could change the selection:
    which captions are selected or their order (rule 4). That happens when two neighbours among
    the first ``keep_top + 1`` ranked captions are at most ``2 * margin`` apart.

    ``texts`` are one image's candidates in candidate order (web first, when it has one), with
    their ``itm_scores`` (``None``: no filter, every candidate passes) and ``clip_scores`` in the
    same order. The ITM scores are taken as exact (they were checked before, with
    :func:`near_itm_threshold`)."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if len(clip_scores) != len(texts) or (itm_scores is not None and len(itm_scores) != len(texts)):
        raise ValueError(f"{len(texts)} captions but {len(clip_scores)} CLIP and "
                         f"{'no' if itm_scores is None else len(itm_scores)} ITM scores")
    candidates = [(i, text, "", -math.inf if itm_scores is None else _score(itm_scores[i]), _score(clip_scores[i]))
                  for i, text in enumerate(texts) if text]  # rule 1, as _candidates
    ranked = _ranked(candidates, itm_threshold, use_filter=itm_scores is not None)[:keep_top + 1]
    clips = [c[4] for c in ranked]
    return any(a - b <= 2 * margin for a, b in zip(clips, clips[1:]))
