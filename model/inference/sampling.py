"""Seeded per-row nucleus sampling inside ``transformers`` generation.

``generate(do_sample=True)`` draws every row from torch's one global RNG, so a caption would
depend on which other rows share its batch and in which order. docs/architecture.md requires the stream of
caption ``i`` of sample ``key`` to depend only on (run seed, key, i). transformers has no
per-row generator, hence this module.

``SeededNucleusSampler`` is a ``LogitsProcessor`` run in *greedy* mode: it applies
transformers' own ``TopKLogitsWarper`` and ``TopPLogitsWarper`` to the already-processed scores
(repetition penalty, min length), turns them into log-probabilities and adds Gumbel noise drawn
from a generator seeded by (row seed, step). That is the order of transformers 4.15, on which
BLIP sampled: ``_get_logits_processor`` (repetition penalty, then min length) ran before
``_get_logits_warper`` (top-k, then top-p, so the nucleus is taken of the top-k tokens'
renormalised distribution). BLIP's ``generate(sample=True, top_p=0.9)`` passed no ``top_k``, so
4.15's config default of 50 applied; ``top_k=0`` turns it off. The argmax that greedy
decoding takes is then an exact draw from the truncated softmax (the Gumbel-max trick:
``argmax(log p + G)`` with ``G = -log E``, ``E ~ Exp(1)``, is distributed as ``p``). With
``top_p -> 0`` (or ``top_k=1``) only the top token survives, so the result equals greedy
decoding.

The step index is the current sequence length, so the processor keeps no state: a row's draw
at step ``t`` is the same whichever rows it is batched with, and also when transformers runs a
step more than needed and undoes it.

**Nucleus by candidates** (``test_candidates``, the captioner's fast path). ``TopPLogitsWarper``
sorts the whole vocabulary of every row at every step to find the nucleus; on BLIP-large that
sort was 22 % of the decoding time (docs/benchmarks/capfilt.md). The Gumbel-max draw only needs
the nucleus member with the best perturbed score, so ``nucleus_argmax`` takes the few tokens
(of the top-k ones, when ``top_k`` is set)
with the best perturbed scores and tests each for membership directly: token ``j`` is in the
nucleus when the tokens more probable than ``j`` hold less than ``top_p`` of the mass (the
warper's rule; the most probable token is always kept). The first candidate that passes is the
token the warper's path draws, up to float rounding of the mass sums. Rows where no candidate
passes (rare: it needs the best few perturbed scores all outside the nucleus) fall back to the
warper. Written here because transformers' warper has no such mode.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

from capfilt.transforms.seeding import sample_seed

_MASK_63 = (1 << 63) - 1
# Odd 64-bit constant (2^64 / golden ratio): spreads consecutive steps over the seed space.
_STEP_STRIDE = 0x9E3779B97F4A7C15


def row_seeds(run_seed: int, keys: Sequence[str], n: int) -> list[int]:
    """Seeds of rows ``key0/0 .. key0/n-1, key1/0, ...`` (image-major, as generate expands)."""
    return [sample_seed(run_seed, key, i) for key in keys for i in range(n)]


def step_seed(row_seed: int, step: int) -> int:
    """The generator seed of one row at one decoding step."""
    return (int(row_seed) + int(step) * _STEP_STRIDE) & _MASK_63


def gumbel_noise(seeds: Sequence[int], step: int, vocab_size: int, device: torch.device) -> torch.Tensor:
    """(R, V) float32 standard Gumbel noise, row r drawn from its own generator."""
    noise = torch.empty(len(seeds), vocab_size, dtype=torch.float32, device=device)
    generator = torch.Generator(device=device)
    for r, seed in enumerate(seeds):
        generator.manual_seed(step_seed(seed, step))
        noise[r].exponential_(generator=generator)  # E ~ Exp(1)
    return noise.log_().neg_()  # G = -log E


class SeededNucleusSampler(LogitsProcessor):
    """Top-k then top-p truncation, then a per-row seeded Gumbel-max draw; use with greedy decoding.

    ``seeds[r]`` is the seed of row ``r`` of the generation batch (see ``row_seeds``).
    Returns perturbed log-probabilities whose row-wise argmax is the sampled token; tokens
    outside the nucleus are ``-inf`` and never chosen. ``top_k`` 0 keeps every token before the
    top-p step. With ``test_candidates`` > 0 the token is found without sorting (module
    docstring) and only it keeps its score, the rest are ``-inf``.
    """

    def __init__(self, seeds: Sequence[int], top_p: float = 0.9, test_candidates: int = 0, top_k: int = 0):
        top_p = float(top_p)
        if not 0.0 <= top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {top_p}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0: off), got {top_k!r}")
        if len(seeds) == 0:
            raise ValueError("SeededNucleusSampler needs at least one row seed")
        self.seeds = [int(s) for s in seeds]
        self.top_p, self.top_k = top_p, top_k
        if not isinstance(test_candidates, int) or test_candidates < 0:
            raise ValueError(f"test_candidates must be an int >= 0, got {test_candidates!r}")
        self._top_k = TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1) if top_k > 0 else None
        self._top_p = TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1) if top_p < 1.0 else None
        # > 0: find the drawn token by testing this many candidates (module docstring), not by sorting
        self.test_candidates = test_candidates

    def _top_k_scores(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        """(R, V) float scores, ``-inf`` outside each row's top k (all kept with ``top_k`` 0)."""
        scores = scores.float()
        return scores if self._top_k is None else self._top_k(input_ids, scores)

    def truncated_log_probs(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        """(R, V) log of the truncated, renormalised softmax (``-inf`` outside the nucleus)."""
        scores = self._top_k_scores(input_ids, scores)
        if self._top_p is not None:
            scores = self._top_p(input_ids, scores)
        return torch.log_softmax(scores, dim=-1)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        rows, vocab = scores.shape  # (R, V)
        if rows != len(self.seeds):
            raise ValueError(f"generation batch has {rows} rows but the sampler was given {len(self.seeds)} seeds")
        step = input_ids.shape[1]  # current length: the same for every row of a batch
        noise = gumbel_noise(self.seeds, step, vocab, scores.device)  # (R, V)
        if self.test_candidates and self._top_p is not None:
            log_probs = torch.log_softmax(self._top_k_scores(input_ids, scores), dim=-1)  # (R, V), before top-p
            perturbed = log_probs + noise  # (R, V)
            drawn = nucleus_argmax(log_probs, perturbed, self.top_p, self.test_candidates)  # (R,)
            rows = (drawn < 0).nonzero().squeeze(1)
            if rows.numel():  # no candidate in the nucleus: these rows go the warper's way
                drawn[rows] = (self.truncated_log_probs(input_ids[rows], scores[rows]) + noise[rows]).argmax(dim=-1)
            return _only(drawn, perturbed)
        log_probs = self.truncated_log_probs(input_ids, scores)
        return log_probs + noise


def nucleus_argmax(log_probs: torch.Tensor, perturbed: torch.Tensor, top_p: float, candidates: int) -> torch.Tensor:
    """(R,) the nucleus token with the best perturbed score, or -1 where none of the
    ``candidates`` best-scoring tokens of the row is in the nucleus.

    log_probs: (R, V) log-softmax before the top-p step (``-inf`` outside the top k, if any);
    perturbed: (R, V) ``log_probs`` + Gumbel noise.
    """
    order = perturbed.topk(min(candidates, perturbed.shape[1]), dim=-1).indices  # (R, k), best first
    probs = log_probs.exp()  # (R, V)
    top = probs.max(dim=-1).values  # (R,)
    drawn = torch.full((probs.shape[0],), -1, dtype=torch.long, device=probs.device)
    open_rows = torch.arange(probs.shape[0], device=probs.device)  # rows still without a token
    for c in range(order.shape[1]):
        token = order[open_rows, c]  # (r,)
        p_row = probs[open_rows]  # (r, V)
        p_token = p_row.gather(1, token[:, None])  # (r, 1)
        mass_above = torch.where(p_row > p_token, p_row, 0.0).sum(dim=-1)  # (r,) mass of likelier tokens
        inside = (mass_above < top_p) | (p_token[:, 0] >= top[open_rows])
        drawn[open_rows[inside]] = token[inside]
        open_rows = open_rows[~inside]
        if open_rows.numel() == 0:
            break
    return drawn


def _only(drawn: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """(R, V) scores whose row-wise argmax is ``drawn``: its perturbed score, -inf elsewhere."""
    out = torch.full_like(perturbed, float("-inf"))
    rows = torch.arange(perturbed.shape[0], device=perturbed.device)
    out[rows, drawn] = perturbed[rows, drawn]
    return out
