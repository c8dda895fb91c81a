"""Which precision each CapFilt model runs in, and the fp32 check behind ``bf16-checked``.

``--precision`` (``CurateConfig.precision``):

* ``fp32``: every model in fp32.
* ``bf16``: every model under bf16 (``model.inference.device.inference_context``). Fastest, but it moves
  decisions: bf16 changes 5-11 % of the sampled captions and the scores by ~3e-3, and with them
  12-25 % of the selections (docs/benchmarks/capfilt.md).
* ``bf16-checked``: the captioner stays fp32, the filter and the ranker's image tower run in
  bf16 (the ranker's text tower stays fp32: ``ClipRanker.bf16_text``), and every image whose
  decision a bf16 rounding error could flip is scored again in fp32:

  - filter: an image is re-scored when one of its ITM scores lies within ``itm_margin`` of
    ``--itm-threshold`` (``pipeline.select.near_itm_threshold``);
  - ranker: an image is re-scored when two neighbours among the first ``keep_top + 1`` ranked
    captions are within ``2 * clip_margin`` of each other (``close_clip_ranking``).

  The margins (0.02 for ITM p(match), 0.01 for CLIP cosine) are 6.5x and 3.6x the largest
  bf16-vs-fp32 differences measured on real-size and trained tiny models (3.1e-3 and 2.8e-3),
  so a decision made from bf16 scores is one fp32 would make too. The captioner is not
  checked this way: a sampled caption depends on every step's logits, and bf16 flips one
  token choice often enough (see ``bf16``) that checking would re-run most images.
  The re-scored images' scores are fp32; the others' are bf16 scores, within the margins of
  fp32. When most images of a model's batches need fp32 anyway (near-ties everywhere, as with
  random weights), the bf16 pass is wasted work: a bf16 pass costs about half an fp32 pass, so
  bf16-first stops paying once more than half of the images are re-scored
  (``BREAK_EVEN``). Then that model scores its batches in fp32 directly, and tries bf16 again
  on every ``PROBE_EVERY``-th batch to see whether the data has changed.
* ``auto`` (the default): ``bf16-checked`` where the hardware runs bf16 natively (a GPU with
  bf16, a CPU with AVX512-BF16 or AMX: ``model.inference.device.bf16_supported``), else ``fp32``.

No library offers a precision guard around a selection rule, so it is written here; the
rule itself lives in ``pipeline.select``.
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from capfilt.pipeline.curate.select import close_clip_ranking, near_itm_threshold

PRECISIONS = ("auto", "fp32", "bf16", "bf16-checked")
DEFAULT_ITM_MARGIN = 0.02
DEFAULT_CLIP_MARGIN = 0.01
BREAK_EVEN = 0.5  # re-scored fraction above which bf16-first costs more than fp32 alone
PROBE_EVERY = 8  # in fp32-first mode, every 8th batch tries bf16 again


def resolve_precision(requested: str, device) -> str:
    """``auto`` -> ``bf16-checked`` where bf16 is native on ``device``, else ``fp32``; an
    explicit bf16 mode on hardware without bf16 falls back to ``fp32`` (with a warning, from
    ``model.inference.device.use_bf16``)."""
    from capfilt.model.inference.device import bf16_supported, resolve_device, use_bf16

    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    device = resolve_device(device)
    if requested == "auto":
        return "bf16-checked" if bf16_supported(device) else "fp32"
    if requested == "fp32":
        return "fp32"
    return requested if use_bf16(True, device) else "fp32"


def model_bf16(precision: str, stage: str) -> bool:
    """Whether ``stage``'s model (caption, filter, rank) runs in bf16 under a resolved precision."""
    if precision not in PRECISIONS[1:]:
        raise ValueError(f"precision must be resolved to one of {PRECISIONS[1:]}, got {precision!r}")
    if stage not in ("caption", "filter", "rank"):
        raise ValueError(f"stage must be caption, filter or rank, got {stage!r}")
    if precision == "bf16":
        return True
    return precision == "bf16-checked" and stage != "caption"


@dataclass(frozen=True)
class CheckedScores:
    """Scores of a batch after the fp32 check.

    scores: one entry per image, as the model's ``score`` returns it.
    rescored: (n,) indices of the images whose scores are fp32 because of the check (re-scored,
              or all of them when the batch went to fp32 directly).
    fp32_first: the batch was scored in fp32 directly (see the module docstring).
    """

    scores: list
    rescored: list[int]
    fp32_first: bool = False


@dataclass
class _History:
    """Per model: the re-scored fraction of its last bf16-first batch, and a batch counter."""

    last_fraction: float = 0.0
    batches: int = 0


_HISTORY: "weakref.WeakKeyDictionary[object, _History]" = weakref.WeakKeyDictionary()


def _bf16_first(model) -> bool:
    history = _HISTORY.setdefault(model, _History())
    history.batches += 1
    return history.last_fraction <= BREAK_EVEN or history.batches % PROBE_EVERY == 0


def _checked(model, images: Sequence, captions: Sequence[Sequence[str]], unsure_of) -> CheckedScores:
    """Score a batch bf16-first and re-score the images ``unsure_of(index, scores)`` names in
    fp32, or score it in fp32 directly when the model's last bf16-first batch did not pay."""
    if not _bf16_first(model):
        return CheckedScores(model.score(images, captions, bf16=False), list(range(len(images))), True)
    scores = list(model.score(images, captions))
    unsure = [i for i, sc in enumerate(scores) if unsure_of(i, sc)]
    if images:
        _HISTORY[model].last_fraction = len(unsure) / len(images)
    if unsure:
        again = model.score([images[i] for i in unsure], [captions[i] for i in unsure], bf16=False)
        for i, value in zip(unsure, again):
            scores[i] = value
    return CheckedScores(scores, unsure)


def checked_filter_scores(model, images: Sequence, captions: Sequence[Sequence[str]], *, check: bool,
                          itm_threshold: float, margin: float = DEFAULT_ITM_MARGIN) -> CheckedScores:
    """``model.score`` (a filter, in its own precision); with ``check`` (the caller's: the model
    runs in bf16 and its decisions are checked), the images with an ITM score within ``margin``
    of the threshold are scored again in fp32. Only the model's methods are called: it may be a
    proxy to a model in another process (``--share-model-across-processes``)."""
    if not check:
        return CheckedScores(model.score(images, captions), [])
    return _checked(model, images, captions, lambda b, sc: near_itm_threshold(sc.itm, itm_threshold, margin))


def checked_rank_scores(model, images: Sequence, captions: Sequence[Sequence[str]],
                        itm: Sequence[Sequence[float]] | None, *, check: bool, itm_threshold: float,
                        keep_top: int, margin: float = DEFAULT_CLIP_MARGIN) -> CheckedScores:
    """``model.score`` (a ranker, in its own precision); with ``check`` (as for the filter), the images
    whose selection could change under an error of ``margin`` per CLIP score are scored again in fp32.

    ``captions[b]`` are image b's candidates in candidate order (the web caption first, when it has
    one) and ``itm[b]`` their ITM scores in the same order (``itm=None``: no filter, every
    candidate passes).
    """
    if not check:
        return CheckedScores(model.score(images, captions), [])
    return _checked(model, images, captions, lambda b, clip: close_clip_ranking(
        captions[b], None if itm is None else itm[b], clip, margin=margin, itm_threshold=itm_threshold,
        keep_top=keep_top))
