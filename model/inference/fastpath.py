"""Inference speed-ups of the model adapters, chosen per call.

``FastPath`` says which of them the adapters use. ``FastPath()`` is the
default, ``FastPath.off()`` the plain stack that calls transformers' modules unchanged.
The BLIP parts are shared by the captioner and the filter:

- ``grouped_cross_attention``: in transformers 5.23 ``BlipTextSelfAttention`` projects the
  image embeddings to cross-attention keys/values for every *row* of the text batch. The
  decoder's ``generate`` keeps them in its ``EncoderDecoderCache`` after the first step, but
  still one copy per row (n copies per image, each computed and then read at every step),
  and the filter's text encoder has no cache at all. Inside this context the cross-attention
  modules take the *un-repeated* (B, P, D) image embeddings, project them once per image,
  and let all rows of an image attend to them together (the rows of one image become query
  positions of one attention call: softmax is per query, so the result is the same).
- ``sdpa``: transformers 5.23's BLIP attention is eager only (no
  ``attn_implementation="sdpa"``); the ViT's attention inside ``fast_attention(sdpa=True)``
  and the grouped cross-attention call ``torch.nn.functional.scaled_dot_product_attention``
  instead of matmul + softmax + matmul.

Both work by giving those module instances a subclass of their own class
(``enable_blip_fast_path``) whose ``forward`` does exactly what transformers' does unless one
of the contexts above is active in the calling thread (``contextvars``, so concurrent Beam
threads sharing one model do not see each other's settings). Parameters, state-dict keys and
the plain path are untouched, so one loaded model serves both paths.

Written here rather than taken from a library because transformers offers no hook for sharing
cross-attention keys/values between rows, and its BLIP attention has no SDPA option.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FastPath:
    """Which inference speed-ups the model adapters use. Each one keeps the scores equal to the
    plain path up to float rounding (tests/test_fastpath.py, benchmarks/bench_capfilt.py).

    cross_kv_once:  BLIP cross-attention keys/values once per image, not per caption row
                    (captioner decoding, filter ITM); see ``grouped_cross_attention``.
    sdpa:           torch's fused ``scaled_dot_product_attention`` in BLIP's attention modules.
    trim_clip_text: run CLIP's causal text tower on the batch's longest caption (up to its
                    end token) instead of the full 77-token context; the pooled end token never
                    sees the padding after it, so the features are the same.
    nucleus_candidates: the captioner's top-p draw tests this many best Gumbel-perturbed tokens
                    for nucleus membership instead of sorting the vocabulary at every step
                    (``model.sampling.nucleus_argmax``); 0 sorts, as transformers' warper does.

    ``torch.compile`` is not among them: on this CPU it took 34-70 s per process (and per batch
    shape) to compile BLIP's ViT-L and then saved 4-5% of its time (docs/benchmarks/capfilt.md).
    """

    cross_kv_once: bool = True
    sdpa: bool = True
    trim_clip_text: bool = True
    nucleus_candidates: int = 8

    @classmethod
    def off(cls) -> "FastPath":
        """The plain stack: transformers' and open_clip's modules exactly as they are."""
        return cls(cross_kv_once=False, sdpa=False, trim_clip_text=False, nucleus_candidates=0)

    @property
    def any(self) -> bool:
        return any(dataclasses.astuple(self))


def resolve_fast(fast: bool | FastPath) -> FastPath:
    """``True`` -> the default ``FastPath()``, ``False`` -> ``FastPath.off()``."""
    if isinstance(fast, FastPath):
        return fast
    if isinstance(fast, bool):
        return FastPath() if fast else FastPath.off()
    raise ValueError(f"fast must be a bool or a FastPath, got {fast!r}")


@dataclass(frozen=True)
class _ImageGroups:
    """How the R rows of a text batch map to the B images they cross-attend to.

    per_image: every image owns this many consecutive rows (R = B * per_image), or None;
    owner:     (R,) long, image index of each row, used when ``per_image`` is None.
    """

    per_image: int | None
    owner: torch.Tensor | None
    sdpa: bool


_CROSS_GROUPS: contextvars.ContextVar = contextvars.ContextVar("capfilt_cross_groups", default=None)
_SDPA: contextvars.ContextVar = contextvars.ContextVar("capfilt_sdpa", default=False)


@contextlib.contextmanager
def grouped_cross_attention(*, per_image: int | None = None, owner: torch.Tensor | None = None,
                            sdpa: bool = False):
    """Inside: BLIP text cross-attention (of models passed to ``enable_blip_fast_path``) takes
    the (B, P, D) embeddings of the B images, not one row per text row.

    Give ``per_image`` when image b owns rows ``b*per_image .. (b+1)*per_image-1`` (the
    captioner's image-major rows), else ``owner`` (R,) with the image index of every row.
    Generation that reorders or drops rows (beam search) cannot run inside: the cached
    keys/values have one row per image.
    """
    if (per_image is None) == (owner is None):
        raise ValueError("grouped_cross_attention needs exactly one of per_image and owner")
    if per_image is not None and (not isinstance(per_image, int) or per_image < 1):
        raise ValueError(f"per_image must be a positive int, got {per_image!r}")
    token = _CROSS_GROUPS.set(_ImageGroups(per_image, owner, bool(sdpa)))
    try:
        yield
    finally:
        _CROSS_GROUPS.reset(token)


@contextlib.contextmanager
def fast_attention(sdpa: bool):
    """Inside (with ``sdpa``): BLIP vision self-attention runs through torch's SDPA."""
    token = _SDPA.set(bool(sdpa))
    try:
        yield
    finally:
        _SDPA.reset(token)


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, sdpa: bool) -> torch.Tensor:
    """softmax(q k^T * scale) v over (..., Lq, d) x (..., Lk, d); no mask (images have none)."""
    if sdpa:
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scale)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale  # (..., Lq, Lk)
    return torch.matmul(scores.softmax(dim=-1), value)  # (..., Lq, d)


def _grouped_attend(groups: _ImageGroups, query, key, value, scale: float) -> torch.Tensor:
    """(R, H, Lq, d) queries against (B, H, P, d) per-image keys/values -> (R, H, Lq, d)."""
    rows, heads, q_len, head_dim = query.shape
    images = key.shape[0]
    if groups.per_image is not None:
        n = groups.per_image
        if rows != images * n:
            raise ValueError(f"{rows} text rows do not split into {images} images x {n} rows")
        # The n rows of an image become n*Lq query positions of one attention call.
        q = query.view(images, n, heads, q_len, head_dim).transpose(1, 2).reshape(images, heads, n * q_len, head_dim)
        out = _attend(q, key, value, scale, groups.sdpa)  # (B, H, n*Lq, d)
        return out.view(images, heads, n, q_len, head_dim).transpose(1, 2).reshape(rows, heads, q_len, head_dim)
    owner = groups.owner.to(key.device)
    if owner.shape != (rows,):
        raise ValueError(f"owner has shape {tuple(owner.shape)}, expected ({rows},) for {rows} text rows")
    # Uneven rows per image: gather each row's image keys/values (a copy, but no projection).
    return _attend(query, key.index_select(0, owner), value.index_select(0, owner), scale, groups.sdpa)


def _cross_forward(self, hidden_states, encoder_hidden_states, past_key_values, groups: _ImageGroups):
    """``BlipTextSelfAttention.forward`` for cross-attention with per-image keys/values.

    Like transformers' forward, the image attention mask is not applied (it is all ones) and
    keys/values go into the cross-attention half of an ``EncoderDecoderCache`` on the first
    decoding step and are read back on the later ones, here with B rows instead of R.
    """
    from transformers.cache_utils import EncoderDecoderCache

    rows, q_len, _ = hidden_states.shape
    head_dim = self.attention_head_size
    query = self.query(hidden_states).view(rows, q_len, -1, head_dim).transpose(1, 2)  # (R, H, Lq, d)
    cache = None
    if past_key_values is not None:
        if not isinstance(past_key_values, EncoderDecoderCache):
            raise ValueError(f"grouped cross-attention needs an EncoderDecoderCache, "
                             f"got {type(past_key_values).__name__}")
        cache = past_key_values.cross_attention_cache
    if cache is not None and past_key_values.is_updated.get(self.layer_idx):
        key = cache.layers[self.layer_idx].keys  # (B, H, P, d)
        value = cache.layers[self.layer_idx].values
    else:
        images, patches, _ = encoder_hidden_states.shape
        kv_shape = (images, patches, -1, head_dim)
        key = self.key(encoder_hidden_states).view(kv_shape).transpose(1, 2)  # (B, H, P, d): once per image
        value = self.value(encoder_hidden_states).view(kv_shape).transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
            past_key_values.is_updated[self.layer_idx] = True
    context = _grouped_attend(groups, query, key, value, 1.0 / math.sqrt(head_dim))  # (R, H, Lq, d)
    return context.transpose(1, 2).reshape(rows, q_len, self.all_head_size), None


def _fast_blip_classes() -> dict[type, type]:
    """{transformers class: our subclass}; built on first use so that importing this module
    does not import transformers' BLIP code."""
    global _FAST_CLASSES
    if _FAST_CLASSES:
        return _FAST_CLASSES
    from transformers.models.blip.modeling_blip import BlipAttention
    from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention

    class FastBlipTextSelfAttention(BlipTextSelfAttention):
        """transformers' module, plus per-image keys/values inside ``grouped_cross_attention``."""

        def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                    encoder_attention_mask=None, past_key_values=None, **kwargs):
            groups = _CROSS_GROUPS.get()
            if groups is None or encoder_hidden_states is None:
                return super().forward(hidden_states, attention_mask=attention_mask,
                                       encoder_hidden_states=encoder_hidden_states,
                                       encoder_attention_mask=encoder_attention_mask,
                                       past_key_values=past_key_values, **kwargs)
            return _cross_forward(self, hidden_states, encoder_hidden_states, past_key_values, groups)

    class FastBlipAttention(BlipAttention):
        """transformers' ViT attention, through SDPA inside ``fast_attention(sdpa=True)``."""

        def forward(self, hidden_states, **kwargs):
            if not _SDPA.get():
                return super().forward(hidden_states, **kwargs)
            batch, tokens, width = hidden_states.shape
            qkv = self.qkv(hidden_states).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
            query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, N, d)
            context = torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=self.scale)
            return self.projection(context.transpose(1, 2).reshape(batch, tokens, width)), None

    for cls in (FastBlipTextSelfAttention, FastBlipAttention):
        cls.__qualname__ = cls.__name__  # pickled by reference as model.fastpath.<name>, see __getattr__
    _FAST_CLASSES = {BlipTextSelfAttention: FastBlipTextSelfAttention, BlipAttention: FastBlipAttention}
    return _FAST_CLASSES


_FAST_CLASSES: dict[type, type] = {}


def __getattr__(name: str):
    """``model.fastpath.FastBlipAttention`` etc., built on first access (so that a pickled model
    whose modules were switched unpickles in a fresh process)."""
    for fast_cls in _fast_blip_classes().values():
        if fast_cls.__name__ == name:
            return fast_cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def enable_blip_fast_path(model: torch.nn.Module) -> int:
    """Give every BLIP attention module of ``model`` our subclass (idempotent). Returns how many
    modules were switched. Without an active fast context they behave exactly as before."""
    classes = _fast_blip_classes()
    switched = 0
    for module in model.modules():
        fast_cls = classes.get(type(module))
        if fast_cls is not None:
            module.__class__ = fast_cls
            switched += 1
    return switched
