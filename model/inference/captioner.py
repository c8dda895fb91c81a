"""The CapFilt captioner: BLIP's image-grounded decoder writing N seeded nucleus-sampled
captions per image, over transformers' ``BlipForConditionalGeneration`` and ``BlipProcessor``.

What is ours and why:

* **Encode once.** ``BlipForConditionalGeneration.generate`` runs the vision tower on every row
  it is given, and transformers refuses ``num_return_sequences > 1`` in greedy mode, which our
  sampler needs (see ``model.sampling``). So ``caption`` does what that method does, once per
  image: it runs ``model.vision_model`` on the B images, repeats the (B, P, D) embeddings for
  the n rows of each image, and hands them to ``model.text_decoder.generate`` exactly as
  ``BlipForConditionalGeneration.generate`` would (bos in place of [CLS], prompt without its
  trailing [SEP], stop at [SEP]).
* **Per-sample randomness.** Row ``(key, i)`` samples with the seed
  ``sample_seed(run_seed, key, i)``; its captions do not depend on batch size or order.
* **Fast path** (``fast``, default on; ``model.fastpath.FastPath``). transformers' decoder caches
  the cross-attention keys/values after the first step, but per row: n identical copies per
  image, each projected from the image (about 22 GFLOP per copy for BLIP-large) and read again
  at every step. With ``cross_kv_once`` the decoder gets the un-repeated (B, P, D) embeddings
  and ``grouped_cross_attention`` projects and caches them once per image; the n rows of an
  image attend to them in one call. ``sdpa`` runs the vision tower's attention through torch's
  SDPA. ``nucleus_candidates`` finds each top-p draw without sorting the vocabulary
  (``model.sampling``). All leave the sampled tokens unchanged up to float rounding
  (tests/test_fastpath.py, tests/test_sampling.py).

Lengths follow BLIP and transformers: ``max_length``/``min_length`` count the prompt tokens.
Sampling follows BLIP on transformers 4.15: repetition penalty and minimum length, then top-k
(50, 4.15's default, which BLIP's ``generate`` left on), then top-p (``model.sampling``).
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from capfilt.model.inference.device import check_images, inference_context, resolve_device, use_bf16
from capfilt.model.inference.fastpath import FastPath, enable_blip_fast_path, fast_attention, grouped_cross_attention, resolve_fast
from capfilt.model.inference.sampling import SeededNucleusSampler, row_seeds
from capfilt.model.loading import load_hf_model
from capfilt.transforms.text import BLIP_PROMPT


@dataclass(frozen=True)
class CaptionConfig:
    """BLIP's CapFilt sampling settings (``models/blip.py`` generate, ``sample=True``; ``top_k``
    is transformers 4.15's default, which that call did not override)."""

    prompt: str = BLIP_PROMPT
    top_p: float = 0.9
    max_length: int = 30
    min_length: int = 10
    repetition_penalty: float = 1.1
    top_k: int = 50

    def validate(self) -> None:
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0: off), got {self.top_k!r}")
        if self.min_length < 0 or self.max_length < 1 or self.min_length > self.max_length:
            raise ValueError(
                f"need 0 <= min_length <= max_length and max_length >= 1, got "
                f"min_length={self.min_length}, max_length={self.max_length}"
            )
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


class Captioner:
    """N seeded nucleus-sampled captions per image from a BLIP captioning model."""

    def __init__(self, model, processor, device: torch.device, bf16: bool = False,
                 fast: bool | FastPath = True):
        self.model = model
        self.processor = processor
        self.device = device
        self.bf16 = bf16
        self.fast = resolve_fast(fast)  # may be changed later: the model serves both paths
        enable_blip_fast_path(model)
        text_config = model.config.text_config
        self.bos_token_id = text_config.bos_token_id
        self.sep_token_id = text_config.sep_token_id
        self.pad_token_id = text_config.pad_token_id

    @classmethod
    def from_pretrained(cls, name_or_dir, device: str = "auto", bf16: bool | str = False,
                        fast: bool | FastPath = True) -> "Captioner":
        """Load from a hub id or a ``save_pretrained`` directory (model + BlipProcessor).
        ``bf16``: True, False or "auto" (see ``model.inference.device.use_bf16``)."""
        from transformers import BlipForConditionalGeneration, BlipProcessor

        resolved = resolve_device(device)
        model, processor = load_hf_model(BlipForConditionalGeneration, BlipProcessor, name_or_dir, resolved)
        return cls(model, processor, resolved, bf16=use_bf16(bf16, resolved), fast=fast)

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(B, P, D) last hidden state of the vision tower, one forward for the batch."""
        pixels = self.processor.image_processor(images=check_images(images), return_tensors="pt")
        pixel_values = pixels["pixel_values"].to(self.device)  # (B, 3, H, W)
        with fast_attention(self.fast.sdpa):
            return self.model.vision_model(pixel_values=pixel_values).last_hidden_state

    def _prompt_ids(self, prompt: str, rows: int) -> torch.Tensor:
        """(rows, L) prompt ids as BLIP's generate feeds them: bos first, no trailing [SEP]."""
        ids = self.processor.tokenizer(prompt, return_tensors="pt")["input_ids"][:, :-1]  # (1, L)
        ids[:, 0] = self.bos_token_id
        return ids.expand(rows, -1).contiguous().to(self.device)

    def caption(
        self,
        images: Sequence[Image.Image],
        keys: Sequence[str],
        n: int,
        seed: int,
        prompt: str = CaptionConfig.prompt,
        top_p: float = CaptionConfig.top_p,
        max_length: int = CaptionConfig.max_length,
        min_length: int = CaptionConfig.min_length,
        repetition_penalty: float = CaptionConfig.repetition_penalty,
        top_k: int = CaptionConfig.top_k,
    ) -> list[list[str]]:
        """``n`` captions for each image, the prompt stripped; result[b][i] is caption i of keys[b]."""
        config = CaptionConfig(prompt, top_p, max_length, min_length, repetition_penalty, top_k)
        config.validate()
        if len(images) != len(keys):
            raise ValueError(f"got {len(images)} images but {len(keys)} keys")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n (captions per image) must be a positive int, got {n!r}")
        for key in keys:
            if not isinstance(key, str):
                raise ValueError(f"sample keys must be strings, got {key!r}")
        if not images:
            return []
        prompt_ids = self._prompt_ids(config.prompt, len(images) * n)  # (B*n, L)
        if prompt_ids.shape[1] >= config.max_length:
            raise ValueError(
                f"prompt {config.prompt!r} is {prompt_ids.shape[1]} tokens; max_length "
                f"{config.max_length} leaves no room to generate (it counts the prompt)"
            )
        with inference_context(self.device, self.bf16):
            image_embeds = self.encode_images(images)  # (B, P, D): the only vision forward
            if self.fast.cross_kv_once:
                # the decoder sees each image once; its n rows share the cross-attention K/V
                image_inputs = {"encoder_hidden_states": image_embeds}
                grouping = grouped_cross_attention(per_image=n, sdpa=self.fast.sdpa)
            else:
                image_embeds = image_embeds.repeat_interleave(n, dim=0)  # (B*n, P, D), image-major rows
                image_inputs = {
                    "encoder_hidden_states": image_embeds,
                    "encoder_attention_mask": torch.ones(image_embeds.shape[:-1], dtype=torch.long,
                                                         device=self.device),
                }
                grouping = contextlib.nullcontext()
            sampler = SeededNucleusSampler(row_seeds(seed, keys, n), top_p=config.top_p, top_k=config.top_k,
                                           test_candidates=self.fast.nucleus_candidates)
            with grouping:
                sequences = self.model.text_decoder.generate(
                    input_ids=prompt_ids,
                    attention_mask=torch.ones_like(prompt_ids),
                    **image_inputs,
                    eos_token_id=self.sep_token_id,
                    pad_token_id=self.pad_token_id,
                    do_sample=False,  # greedy over the sampler's perturbed scores = seeded sampling
                    num_beams=1,
                    max_length=config.max_length,
                    min_length=config.min_length,
                    repetition_penalty=config.repetition_penalty,
                    logits_processor=[sampler],
                )  # (B*n, T) prompt + generated tokens
        generated = sequences[:, prompt_ids.shape[1]:]
        texts = self.processor.tokenizer.batch_decode(generated, skip_special_tokens=True)
        texts = [t.strip() for t in texts]
        return [texts[b * n:(b + 1) * n] for b in range(len(keys))]
