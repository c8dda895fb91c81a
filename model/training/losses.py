"""The pretraining losses of BLIP and BLIP-2 stage 1, and the cross-rank gathers they need.

transformers ships the BLIP/BLIP-2 networks but none of their pretraining objectives, so they
are written here, as plain functions over logits and features (the models in
`training/blip.py` / `training/blip2.py` call them):

* ITC: cross-entropy of similarity logits against one-hot targets, optionally mixed with the
  momentum model's softmax (soft targets, `alpha`, ramped up from 0 by `ramped_alpha`), as in
  BLIP / ALBEF, or label-smoothed, as in BLIP-2;
* hard negatives for ITM: one column per row drawn by similarity, by one of the two rules of
  the reference code (`DRAWS`): BLIP pretraining's softmax over the batch plus a floor, or
  retrieval finetuning's (and BLIP-2's) softmax over the columns that are not a true match;
* ITM: two-way classification, positives labelled 1 and negatives 0;
* LM / ITG: next-token cross-entropy with label smoothing (0.1 in BLIP and BLIP-2);
* BLIP-2: the query-to-text similarity is the max over queries, and the ITG attention mask lets
  queries see only queries while text sees every query and only past text.

Gathers: `gather_with_grad` is autograd-aware (each rank's features receive the gradient every
rank's loss puts on them), `gather_no_grad` is for targets and queues. Both are the identity
when torch.distributed is not initialised, so single-process code is the same code.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) per rank -> (world * B, ...) in rank order, differentiable."""
    if world()[1] == 1:
        return x
    from torch.distributed._functional_collectives import all_gather_single_autograd

    out = all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD)
    return out.wait() if hasattr(out, "wait") else out


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) per rank -> (world * B, ...) in rank order, detached."""
    if world()[1] == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world()[1])]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a (detached) tensor over ranks."""
    x = x.detach().clone()
    if world()[1] > 1:
        dist.all_reduce(x)
    return x


# --- ITC ---------------------------------------------------------------------------------------

def itc_targets(positive: torch.Tensor, teacher: torch.Tensor | None = None, alpha: float = 0.0,
                smoothing: float = 0.0) -> torch.Tensor:
    """(B, N) targets: uniform over each row's positives (one column, or several when the
    batch holds the same image or caption twice, as BLIP's retrieval finetuning treats equal
    image ids), mixed as ``alpha * softmax(teacher) + (1 - alpha) * hard`` when momentum-model
    logits `teacher` (B, N) are given, then ``(1 - smoothing) * t + smoothing / N``: with one
    positive per row this is `F.cross_entropy`'s ``label_smoothing``, which BLIP-2 uses."""
    targets = positive.float()
    targets = targets / targets.sum(dim=1, keepdim=True).clamp(min=1.0)
    if teacher is not None and alpha != 0.0:
        targets = alpha * F.softmax(teacher.float(), dim=1) + (1.0 - alpha) * targets
    if smoothing:
        targets = (1.0 - smoothing) * targets + smoothing / targets.shape[1]
    return targets


def ramped_alpha(alpha: float, step: int, ramp_steps: int) -> float:
    """The soft-target weight at optimizer step `step` (from 0): ``alpha * min(1, step / ramp_steps)``,
    BLIP's linear ramp from 0 (`alpha` throughout when `ramp_steps` is 0)."""
    return alpha * min(1.0, step / ramp_steps) if ramp_steps else alpha


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum_j targets_ij * log_softmax(logits)_ij``."""
    return -(F.log_softmax(logits.float(), dim=1) * targets).sum(dim=1).mean()


def itc_loss(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, pos_i2t: torch.Tensor, pos_t2i: torch.Tensor,
             teacher_i2t: torch.Tensor | None = None, teacher_t2i: torch.Tensor | None = None,
             alpha: float = 0.0, smoothing: float = 0.0) -> torch.Tensor:
    """Image-text contrastive loss, the mean of both directions.

    sim_i2t: (B, N) image rows against text columns, already divided by the temperature;
    sim_t2i: (B, N) text rows against image columns; pos_*: (B, N) bool, each row's positive
    column(s) (offset by the rank under DDP). Columns may include a queue. `teacher_*` are the
    momentum model's logits over the same columns (soft targets, weight `alpha`); `smoothing`
    is the label smoothing of both directions (`itc_targets`).
    """
    t_i2t = itc_targets(pos_i2t, teacher_i2t, alpha, smoothing)
    t_t2i = itc_targets(pos_t2i, teacher_t2i, alpha, smoothing)
    return (soft_cross_entropy(sim_i2t, t_i2t) + soft_cross_entropy(sim_t2i, t_t2i)) / 2


# --- ITM ---------------------------------------------------------------------------------------

# How the reference code draws an ITM negative by similarity (`BlipTrainConfig.itm_draw`):
# "pretrain", BLIP's blip_pretrain.py: softmax over every in-batch column, plus PRETRAIN_FLOOR,
#   then the positive zeroed, from online rows against momentum columns when there are some
#   (`draw_similarities`); the floor keeps the draw near uniform once the model is confident;
# "retrieval", BLIP's blip_retrieval.py and LAVIS (BLIP and BLIP-2): softmax over the columns
#   that are not a true match, online features.
DRAWS = ("pretrain", "retrieval")
PRETRAIN_FLOOR = 1e-4


@torch.no_grad()
def draw_similarities(image_feat: torch.Tensor, text_feat: torch.Tensor, temp, image_feat_m=None,
                      text_feat_m=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(i2t, t2i), each (G, G), the similarities the ITM draw reads: rows are the online image
    (i2t) or text (t2i) features; columns the other modality's momentum features when given
    (BLIP pretraining draws from its ITC logits, whose columns are momentum features), else
    its online ones (then t2i is i2t transposed)."""
    i2t = image_feat @ (text_feat if text_feat_m is None else text_feat_m).T / temp
    if image_feat_m is None:
        return i2t, i2t.T
    return i2t, text_feat @ image_feat_m.T / temp


@torch.no_grad()
def negative_weights(sim: torch.Tensor, positive: torch.Tensor, draw: str = "retrieval") -> torch.Tensor:
    """(B, N) sampling weights (unnormalised) for hard negatives, never on a positive (the row's
    own pair, or another true match such as the same image or an identical caption):

    * ``draw="retrieval"``: the softmax of `sim` over the columns that are not positives, i.e.
      the positives are excluded before normalising (BLIP-2 fills them with a large negative
      value, BLIP's retrieval finetuning zeroes them after a softmax: the same draw);
    * ``draw="pretrain"``: ``softmax(sim) + PRETRAIN_FLOOR`` over all columns, positives then
      set to 0 (BLIP pretraining).

    Rows with no negative column get uniform weights."""
    if draw == "retrieval":
        w = F.softmax(sim.float().masked_fill(positive, float("-inf")), dim=1)
    elif draw == "pretrain":
        w = (F.softmax(sim.float(), dim=1) + PRETRAIN_FLOOR).masked_fill(positive, 0.0)
    else:
        raise ValueError(f"unknown ITM negative draw {draw!r}; expected one of {DRAWS}")
    empty = positive.all(dim=1)  # every column matches the row: no negative exists, draw any
    w[empty] = 1.0
    return w


@torch.no_grad()
def sample_hard_negatives(sim: torch.Tensor, positive: torch.Tensor, generator: torch.Generator,
                          hard_fraction: float = 1.0, draw: str = "retrieval") -> torch.Tensor:
    """(B,) one negative column per row, drawn from `negative_weights` under rule `draw`; never a
    positive, unless every column of the row is one (a batch of a single image or caption). With
    `hard_fraction` < 1 each row is drawn by similarity with that probability and uniformly among
    its negatives otherwise (1.0, BLIP, makes no extra random draw)."""
    if not 0.0 <= hard_fraction <= 1.0:
        raise ValueError(f"hard_fraction must be in [0, 1], got {hard_fraction}")
    if hard_fraction < 1.0:
        uniform = torch.rand(sim.shape[0], generator=generator) >= hard_fraction  # (B,)
        sim = sim.masked_fill(uniform[:, None].to(sim.device), 0.0)
    w = negative_weights(sim, positive, draw)
    return torch.multinomial(w.cpu(), 1, generator=generator).squeeze(1).to(sim.device)


def itm_loss(logits_pos: torch.Tensor, logits_neg: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (P, 2) positive-pair and (M, 2) negative-pair ITM logits; label 1 is
    "match", as in `softmax(itm_logits)[:, 1]`. Mean over all P + M pairs."""
    logits = torch.cat([logits_pos, logits_neg], dim=0).float()
    labels = torch.cat([torch.ones(len(logits_pos)), torch.zeros(len(logits_neg))]).long()
    return F.cross_entropy(logits, labels.to(logits.device))


# --- LM / ITG ----------------------------------------------------------------------------------

def lm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix_len: int = 0) -> torch.Tensor:
    """Targets for a decoder: the input ids with padding (and a prompt of `prefix_len` tokens,
    counted with the bos token) set to IGNORE_INDEX."""
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    if prefix_len:
        labels[:, :prefix_len] = IGNORE_INDEX
    return labels


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1,
            normalizer: torch.Tensor | float | None = None) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, T, V) at position t predict labels (B, T) at t+1.

    Mean over the non-ignored target tokens, or ``sum / normalizer`` when given (the DDP loop
    passes the global token count over world size, so the averaged gradient is the gradient of
    the global mean whatever the per-rank token counts).
    """
    shifted = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
    targets = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX,
                            label_smoothing=label_smoothing, reduction="sum")
    if normalizer is None:
        normalizer = (targets != IGNORE_INDEX).sum().clamp(min=1)
    return total / normalizer


# --- BLIP-2 ------------------------------------------------------------------------------------

def max_over_queries(query_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """query_feats (B, Q, D), text_feats (N, D) -> (B, N): for each image, the best query."""
    return torch.einsum("bqd,nd->bnq", query_feats, text_feats).max(dim=-1).values


def max_over_queries_t2i(text_feats: torch.Tensor, query_feats: torch.Tensor) -> torch.Tensor:
    """text_feats (B, D), query_feats (N, Q, D) -> (B, N)."""
    return torch.einsum("bd,nqd->bnq", text_feats, query_feats).max(dim=-1).values


def itg_allowed(num_query: int, text_mask: torch.Tensor) -> torch.Tensor:
    """(B, Q+T, Q+T) bool, True where row token may attend to column token, for ITG:
    queries attend to all queries and to no text; text attends to every query and to
    non-padding text at its own or an earlier position."""
    b, t = text_mask.shape
    n = num_query + t
    allowed = torch.zeros(b, n, n, dtype=torch.bool, device=text_mask.device)
    allowed[:, :num_query, :num_query] = True
    allowed[:, num_query:, :num_query] = True
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool, device=text_mask.device))
    allowed[:, num_query:, num_query:] = causal.unsqueeze(0) & text_mask.bool().unsqueeze(1)
    return allowed


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L, S) bool -> (B, 1, L, S) additive float mask (0 allowed, dtype-min blocked), the
    prepared 4D form transformers' attention layers accept as-is."""
    blocked = torch.finfo(dtype).min
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, blocked).unsqueeze(1)
