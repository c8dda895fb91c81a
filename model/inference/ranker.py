"""The CapFilt ranker: CLIP cosine between an image and each of its captions, over open_clip.

The model comes from ``open_clip.create_model_and_transforms`` and the tokenizer from
``open_clip.get_tokenizer``. ``score`` encodes every image once, encodes all captions of the
batch in one text batch, and takes each caption's cosine with its own image (open_clip's
``forward`` would score every image against every text). ``top_k`` is the selection helper.

A spec is a CLIP directory (``capfilt models init --kind clip``, or ``open_clip.push_to_hf_hub``
layout), ``hf-hub:org/repo``, or ``NAME:PRETRAINED`` (``ViT-L-14:openai``, or a weights file
for PRETRAINED): ``model.specs.open_clip_args`` reads it into open_clip's arguments.

Weights must load (``require_pretrained``): a spec without weights is an error, not a silently
random model. open_clip reads them with safetensors or ``torch.load(weights_only=True)``.

Fast path (``fast``, default on; ``model.fastpath.FastPath.trim_clip_text``): open_clip pads every
caption to the full context (77 tokens) and runs the text tower over all of it, though a
CLIP text tower is causal and pools the end token, which never attends to the padding after it.
``_encode_token_batch`` runs the same sub-modules on the batch's tokens up to its longest
caption's end token (captions of 10-20 tokens: about 4x fewer text FLOPs); the features equal
open_clip's ``encode_text`` up to float rounding. Text towers that are not causal or pool
elsewhere (``CustomTextCLIP``, ``pool_type`` other than argmax/eos) keep ``encode_text``.
open_clip's attention is ``nn.MultiheadAttention``, which already uses torch's SDPA.

bf16 (when on, see ``model.inference.device.use_bf16``; ``score(..., bf16=False)`` turns it off for one
call) covers both towers. On CPU it runs from bf16 *copies* of the image tower and of the text
transformer, made on first use (0.6 + 0.25 GB for ViT-L-14), not through autocast: under CPU
autocast ``nn.MultiheadAttention`` leaves its fused path, and its packed in-projection of the
(L, N, D)-transposed batch becomes a broadcast ``bmm`` that copies the in-projection weight
once per position (ViT-L-14 took 60 s per image in a batch of 2 instead of 2 s in fp32,
docs/benchmarks/capfilt.md). With bf16 weights and no autocast the fused path applies: the
ViT-L-14 text transformer ran 11 x 77 tokens in 0.84 s against 1.68 s in fp32. Embeddings,
the final norm and the projections stay fp32. Untrimmed text (``encode_text``) stays fp32.
``bf16_text=False`` keeps the whole text tower in fp32 (``--precision bf16-checked``): on the
trained tiny CLIP a bf16 text tower moved cosines by up to 0.0126, more than the check's margin,
against 2.8e-3 for a bf16 image tower alone (docs/benchmarks/capfilt.md).
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from capfilt.model.inference.device import check_images, inference_context, resolve_device, use_bf16
from capfilt.model.inference.fastpath import FastPath, resolve_fast
from capfilt.model.specs import open_clip_args
from capfilt.model.loading import loader_error



class ClipRanker:
    """Image-caption cosine scores from an open_clip model; each image encoded once."""

    def __init__(self, model, preprocess, tokenizer, device: torch.device, bf16: bool = False,
                 text_batch_size: int = 256, fast: bool | FastPath = True, bf16_text: bool = True):
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.bf16 = bf16
        # With bf16 on: the text tower too (True), or the image tower only (False: pipeline.precision's
        # bf16-checked, whose CLIP margin is sized for the image tower's error; module docstring).
        self.bf16_text = bf16_text
        self.text_batch_size = text_batch_size
        self.fast = resolve_fast(fast)  # may be changed later: the model serves both paths
        self._bf16_copies: dict[str, torch.nn.Module] = {}  # CPU bf16 towers (module docstring)

    @classmethod
    def load(cls, spec: str, device: str = "auto", bf16: bool | str = False, **options) -> "ClipRanker":
        import open_clip

        name, pretrained = open_clip_args(spec)
        resolved = resolve_device(device)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=resolved, require_pretrained=True, weights_only=True,
            )
            tokenizer = open_clip.get_tokenizer(name)
        except Exception as exc:  # open_clip, safetensors and the hub raise many error types
            raise ValueError(f"cannot load CLIP model {spec!r}: {loader_error(exc)}") from exc
        return cls(model.eval(), preprocess, tokenizer, resolved, bf16=use_bf16(bf16, resolved), **options)

    def _cpu_bf16(self, bf16: bool | None) -> bool:
        """Whether this call runs the towers from their bf16 copies (bf16 on a CPU)."""
        return (self.bf16 if bf16 is None else bf16) and self.device.type == "cpu"

    def _bf16_copy(self, name: str) -> torch.nn.Module:
        if name not in self._bf16_copies:
            # Made outside inference mode, with parameters that keep requires_grad as loaded:
            # a copy made inside (inference tensors) or with requires_grad off ran the
            # ViT-L-14 text transformer 3x slower in bf16 on CPU (5.2 s against 1.7 s for
            # 22 x 77 tokens, torch 2.14.1). Calls run under inference mode, so no graph is kept.
            with torch.inference_mode(False):
                self._bf16_copies[name] = copy.deepcopy(getattr(self.model, name)).to(torch.bfloat16).eval()
        return self._bf16_copies[name]

    @property
    def vision_tower(self) -> torch.nn.Module:
        """The module that encodes images under the adapter's settings."""
        return self._bf16_copy("visual") if self._cpu_bf16(None) else self.model.visual

    def _encode_images(self, images: Sequence[Image.Image], bf16: bool | None = None) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(image) for image in check_images(images)]).to(self.device)
        if self._cpu_bf16(bf16):
            with torch.autocast("cpu", enabled=False):
                features = self._bf16_copy("visual")(pixels.to(torch.bfloat16))  # (B, D) bf16
            return torch.nn.functional.normalize(features.float(), dim=-1)
        return self.model.encode_image(pixels, normalize=True).float()  # (B, D)

    def _encode_texts(self, texts: Sequence[str], bf16: bool | None = None) -> torch.Tensor:
        parts = []
        bf16 = self.bf16 if bf16 is None else bf16
        cpu_bf16 = bf16 and self.bf16_text and self.device.type == "cpu"
        # No autocast for the text on CPU (it makes open_clip's text attention slower, module
        # docstring: the bf16 copy runs instead), nor where the text is to stay fp32.
        no_autocast = bf16 and (self.device.type == "cpu" or not self.bf16_text)
        with torch.autocast(self.device.type, enabled=False) if no_autocast else contextlib.nullcontext():
            for start in range(0, len(texts), self.text_batch_size):
                tokens = self.tokenizer(list(texts[start:start + self.text_batch_size])).to(self.device)  # (t, C)
                parts.append(self._encode_token_batch(tokens, cpu_bf16).float())  # (t, D)
        return torch.cat(parts)  # (T, D)

    def _pool_index(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """(t,) position the text tower pools for each row, or None when trimming is not exact."""
        import open_clip

        model = self.model
        if not (self.fast.trim_clip_text and isinstance(model, open_clip.CLIP)
                and getattr(model, "attn_mask", None) is not None):  # causal text tower only
            return None
        pool_type = getattr(model, "text_pool_type", "argmax")
        if pool_type == "argmax":
            return tokens.argmax(dim=-1)  # the end token has the highest id
        if pool_type == "eos" and getattr(model, "text_eos_id", None) is not None:
            return (tokens == model.text_eos_id).int().argmax(dim=-1)
        return None

    def _encode_token_batch(self, tokens: torch.Tensor, cpu_bf16: bool = False) -> torch.Tensor:
        """(t, D) normalised features of (t, C) tokens; open_clip's ``encode_text``, or the
        same sub-modules on the tokens up to the longest caption's pooled position."""
        from open_clip.transformer import text_global_pool

        pooled_at = self._pool_index(tokens)
        if pooled_at is None:
            return self.model.encode_text(tokens, normalize=True)
        model = self.model
        length = int(pooled_at.max()) + 1  # positions after it cannot change what is pooled
        tokens = tokens[:, :length]  # (t, L)
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast_dtype)  # (t, L, W)
        x = x + model.positional_embedding[:length].to(cast_dtype)
        mask = model.attn_mask[:length, :length]  # (L, L) causal
        if cpu_bf16:
            transformer = self._bf16_copy("transformer")
            x = transformer(x.to(torch.bfloat16), attn_mask=mask.to(torch.bfloat16)).float()
        else:
            x = model.transformer(x, attn_mask=mask)
        x = model.ln_final(x)  # (t, L, W)
        x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
        projection = model.text_projection
        if projection is not None:
            x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
        return torch.nn.functional.normalize(x, dim=-1)  # (t, D)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(B, D) float32 L2-normalised image embeddings."""
        if len(images) == 0:
            raise ValueError("encode_images needs at least one image")
        with inference_context(self.device, self.bf16):
            return self._encode_images(images).cpu().numpy()

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(T, D) float32 L2-normalised text embeddings."""
        if isinstance(texts, str) or len(texts) == 0:
            raise ValueError(f"encode_texts needs a non-empty list of strings, got {type(texts).__name__} "
                             f"{str(texts)[:60]!r}")
        with inference_context(self.device, self.bf16):
            return self._encode_texts(texts).cpu().numpy()

    def score(self, images: Sequence[Image.Image], captions_per_image: Sequence[Sequence[str]],
              bf16: bool | None = None) -> list[np.ndarray]:
        """result[b] is float32 (n_b,): cosine of image b with each of its captions. ``bf16``
        overrides the adapter's precision for this call."""
        if len(images) != len(captions_per_image):
            raise ValueError(f"got {len(images)} images but {len(captions_per_image)} caption lists")
        texts, owner = [], []
        for b, captions in enumerate(captions_per_image):
            if isinstance(captions, str) or any(not isinstance(c, str) for c in captions):
                raise ValueError(f"captions_per_image[{b}] must be a list of strings, got {captions!r}")
            texts.extend(captions)
            owner.extend([b] * len(captions))
        if not images:
            return []
        bf16 = self.bf16 if bf16 is None else bf16
        with inference_context(self.device, bf16):
            image_feats = self._encode_images(images, bf16)  # (B, D): one forward per image
            if texts:
                text_feats = self._encode_texts(texts, bf16)  # (T, D)
                cosines = (image_feats[torch.tensor(owner, device=self.device)] * text_feats).sum(dim=-1)  # (T,)
            else:
                cosines = torch.zeros(0)
        flat = cosines.cpu().numpy().astype(np.float32)
        bounds = np.cumsum([0] + [len(c) for c in captions_per_image])
        return [flat[bounds[b]:bounds[b + 1]] for b in range(len(images))]

    @staticmethod
    def top_k(scores, k: int) -> np.ndarray:
        """Indices of the ``k`` highest scores, best first; ties keep index order; NaN last."""
        values = np.asarray(scores, dtype=np.float64)
        if values.ndim != 1:
            raise ValueError(f"top_k expects a 1-D score array, got shape {values.shape}")
        if not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"k must be a non-negative int, got {k!r}")
        keyed = np.where(np.isnan(values), np.inf, -values)  # ascending sort of -score; NaN sorts last
        return np.argsort(keyed, kind="stable")[:k].astype(np.int64)
