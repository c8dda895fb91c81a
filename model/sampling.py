"""Seeded per-row nucleus sampling inside ``transformers`` generation.

``generate(do_sample=True)`` draws every row from torch's one global RNG, so a caption would
depend on which other rows share its batch and in which order. DESIGN.md requires the stream of
caption ``i`` of sample ``key`` to depend only on (run seed, key, i). transformers has no
per-row generator, hence this module.

``SeededNucleusSampler`` is a ``LogitsProcessor`` run in *greedy* mode: it applies
transformers' own ``TopPLogitsWarper`` to the already-processed scores (repetition penalty,
min length), turns them into log-probabilities and adds Gumbel noise drawn from a generator
seeded by (row seed, step). The argmax that greedy decoding takes is then an exact draw from
the truncated softmax (the Gumbel-max trick: ``argmax(log p + G)`` with ``G = -log E``,
``E ~ Exp(1)``, is distributed as ``p``). With ``top_p -> 0`` only the top token survives, so
the result equals greedy decoding.

The step index is the current sequence length, so the processor keeps no state: a row's draw
at step ``t`` is the same whichever rows it is batched with, and also when transformers runs a
step more than needed and undoes it.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor, TopPLogitsWarper

from transforms.seeding import sample_seed

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
    """Top-p truncation, then a per-row seeded Gumbel-max draw; use with greedy decoding.

    ``seeds[r]`` is the seed of row ``r`` of the generation batch (see ``row_seeds``).
    Returns perturbed log-probabilities whose row-wise argmax is the sampled token; tokens
    outside the nucleus are ``-inf`` and never chosen.
    """

    def __init__(self, seeds: Sequence[int], top_p: float = 0.9):
        top_p = float(top_p)
        if not 0.0 <= top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {top_p}")
        if len(seeds) == 0:
            raise ValueError("SeededNucleusSampler needs at least one row seed")
        self.seeds = [int(s) for s in seeds]
        self.top_p = top_p
        self._top_p = TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1) if top_p < 1.0 else None

    def truncated_log_probs(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        """(R, V) log of the truncated, renormalised softmax (``-inf`` outside the nucleus)."""
        scores = scores.float()
        if self._top_p is not None:
            scores = self._top_p(input_ids, scores)
        return torch.log_softmax(scores, dim=-1)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        rows, vocab = scores.shape  # (R, V)
        if rows != len(self.seeds):
            raise ValueError(f"generation batch has {rows} rows but the sampler was given {len(self.seeds)} seeds")
        step = input_ids.shape[1]  # current length: the same for every row of a batch
        log_probs = self.truncated_log_probs(input_ids, scores)
        return log_probs + gumbel_noise(self.seeds, step, vocab, scores.device)
