"""The CapFilt filter: ITM probability and ITC cosine of every caption of an image, over
transformers' ``BlipForImageTextRetrieval`` (BLIP) and ``Blip2ForImageTextRetrieval`` (BLIP-2).

Both HF classes take one (image, text) batch per call and run the vision tower on every row, so
scoring the web caption and N synthetic captions of an image re-encodes it N+1 times (twice
more when ITC is asked for too). ``score`` calls the same sub-modules in the same order as the
classes' ``forward`` but runs the vision tower once per image: it flattens all captions of the
batch into one padded text batch, points each caption at its image's cached embedding, and
gets ITM (cross-attending text encoder + ``itm_head``) and ITC (unimodal text encoder +
projections) from that. The results equal the per-pair ``forward`` (tests/test_filter.py).

Fast path (``fast``, default on; ``model.fastpath.FastPath``), BLIP only: with
``cross_kv_once`` the ITM text encoder gets the (B, P, D) embeddings of the images, not a
(T, P, D) copy per caption, and ``grouped_cross_attention`` projects them to cross-attention
keys/values once per image per layer (BLIP-large: 1.8 GFLOP per layer per caption, about a third
of encode-once scoring's FLOPs, saved for all captions but one per image); ``sdpa`` runs the
vision tower's and that cross-attention's softmax through torch's SDPA. The scores stay equal to
the plain path up to float rounding (tests/test_fastpath.py). BLIP-2's Q-Former is unchanged.

ITM first token (``itm_first_token``, BLIP only): BLIP trained and evaluated its ITM head with
``[ENC]`` in place of the text's ``[CLS]``; transformers' ``forward`` feeds ``[CLS]``. With
``enc`` (the default) the cross-attending pass reads ``[ENC]`` wherever the vocabulary has it
(``model.tokens``), as BLIP scored; ``cls`` gives transformers' scores. The ITC pass keeps
``[CLS]`` either way, as BLIP's unimodal text encoder does.

``load_filter`` picks the class from the checkpoint's config (``model_type`` ``blip`` or
``blip-2``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from capfilt.model.inference.device import check_images, inference_context, resolve_device, use_bf16
from capfilt.model.inference.fastpath import FastPath, enable_blip_fast_path, fast_attention, grouped_cross_attention, resolve_fast
from capfilt.model.loading import load_hf_config, load_hf_model
from capfilt.model.tokens import ItmFirstToken, check_choice, itm_first_token


@dataclass
class CaptionScores:
    """Scores of one image's captions, in the order given.

    itm: float32 (n,) p(match) = softmax(itm_logits)[:, 1].
    itc: float32 (n,) cosine of the projected image and text features (BLIP-2: max over queries).
    """

    itm: np.ndarray
    itc: np.ndarray


def _flatten(images: Sequence, captions_per_image: Sequence[Sequence[str]]):
    """(texts (T,), owner (T,) image index per text, counts (B,)) with input checks."""
    if len(images) != len(captions_per_image):
        raise ValueError(f"got {len(images)} images but {len(captions_per_image)} caption lists")
    texts, owner, counts = [], [], []
    for b, captions in enumerate(captions_per_image):
        if isinstance(captions, str):
            raise ValueError(f"captions_per_image[{b}] is a string; expected a list of captions")
        for j, text in enumerate(captions):
            if not isinstance(text, str):
                raise ValueError(f"captions_per_image[{b}][{j}] is {text!r}, expected a string")
        texts.extend(captions)
        owner.extend([b] * len(captions))
        counts.append(len(captions))
    return texts, owner, counts


def _split(itm: torch.Tensor, itc: torch.Tensor, counts: Sequence[int]) -> list[CaptionScores]:
    itm_np = itm.float().cpu().numpy().astype(np.float32)
    itc_np = itc.float().cpu().numpy().astype(np.float32)
    out, start = [], 0
    for count in counts:
        out.append(CaptionScores(itm=itm_np[start:start + count], itc=itc_np[start:start + count]))
        start += count
    return out


class EncodeOnceFilter(ABC):
    """Shared plumbing: loading, tokenising, batching texts against cached image embeddings.
    Subclasses say how one model family encodes images and scores texts against them."""

    model_class_name = ""  # the transformers class the subclass drives

    @abstractmethod
    def encode_images(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything the text side needs from a (B, 3, H, W) batch: one vision forward."""

    @abstractmethod
    def score_texts(self, image_state: dict, owner: torch.Tensor, ids: torch.Tensor,
                    mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(itm (T,), itc (T,)) of texts ``ids`` (T, L) against images ``owner`` (T,)."""

    def __init__(self, model, processor, device: torch.device, bf16: bool = False,
                 max_text_tokens: int = 35, text_batch_size: int = 256, fast: bool | FastPath = True,
                 itm_first_token: str = "enc"):
        if max_text_tokens < 2 or text_batch_size < 1:
            raise ValueError(f"need max_text_tokens >= 2 and text_batch_size >= 1, got "
                             f"{max_text_tokens}, {text_batch_size}")
        self.model = model
        self.processor = processor
        self.device = device
        self.bf16 = bf16
        self.max_text_tokens = max_text_tokens  # BLIP's ITM/ITC text length (blip_itm.py: 35)
        self.text_batch_size = text_batch_size  # bounds the (T, P, D) copy of image embeddings
        self.fast = resolve_fast(fast)  # may be changed later: the model serves both paths
        self.first_token = self.resolve_first_token(check_choice(itm_first_token))
        enable_blip_fast_path(model)

    @abstractmethod
    def resolve_first_token(self, choice: str) -> ItmFirstToken:
        """Which token the ITM text starts with, for ``choice`` ``enc`` or ``cls``."""

    @property
    def itm_first_token(self) -> str:
        """``enc`` or ``cls``: the token this filter's ITM text starts with."""
        return self.first_token.used

    @classmethod
    def from_pretrained(cls, name_or_dir, device: str = "auto", bf16: bool | str = False, **options):
        import transformers
        from transformers import AutoProcessor

        model_cls = getattr(transformers, cls.model_class_name)
        resolved = resolve_device(device)
        model, processor = load_hf_model(model_cls, AutoProcessor, name_or_dir, resolved)
        return cls(model, processor, resolved, bf16=use_bf16(bf16, resolved), **options)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, L) input ids and attention mask, padded to the longest, truncated to max_text_tokens."""
        tokens = self.processor.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.max_text_tokens,
            return_tensors="pt",
        )
        return tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor.image_processor(images=check_images(images), return_tensors="pt")
        return pixels["pixel_values"].to(self.device)  # (B, 3, H, W)

    def score(self, images: Sequence[Image.Image], captions_per_image: Sequence[Sequence[str]],
              bf16: bool | None = None) -> list[CaptionScores]:
        """ITM p(match) and ITC cosine for every caption of every image; vision once per image.
        ``bf16`` overrides the adapter's precision for this call (``pipeline.precision`` re-scores
        in fp32 with ``bf16=False``)."""
        texts, owner, counts = _flatten(images, captions_per_image)
        if not images:
            return []
        if not texts:
            empty = torch.zeros(0)
            return _split(empty, empty, counts)
        bf16 = self.bf16 if bf16 is None else bf16
        with inference_context(self.device, bf16), fast_attention(self.fast.sdpa):
            image_state = self.encode_images(self.pixel_values(images))
            owner_t = torch.tensor(owner, device=self.device)
            itm_parts, itc_parts = [], []
            for start in range(0, len(texts), self.text_batch_size):
                stop = start + self.text_batch_size
                ids, mask = self.tokenize(texts[start:stop])
                itm, itc = self.score_texts(image_state, owner_t[start:stop], ids, mask)
                itm_parts.append(itm)
                itc_parts.append(itc)
        return _split(torch.cat(itm_parts), torch.cat(itc_parts), counts)


class BlipFilter(EncodeOnceFilter):
    """Encode-once scoring with ``BlipForImageTextRetrieval``."""

    model_class_name = "BlipForImageTextRetrieval"

    def resolve_first_token(self, choice: str) -> ItmFirstToken:
        return itm_first_token(choice, self.processor.tokenizer, self.model.config.text_config.vocab_size,
                               getattr(self.model, "name_or_path", ""))

    def encode_images(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        model = self.model
        embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state  # (B, P, Dv)
        feats = F.normalize(model.vision_proj(embeds[:, 0, :]), dim=-1)  # (B, E)
        return {"embeds": embeds, "feats": feats}

    def _fused(self, image_embeds: torch.Tensor, owner: torch.Tensor, ids: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """(T, L, Dt) ITM text encoding (cross-attending to each caption's image)."""
        encoder = self.model.text_encoder
        if not self.fast.cross_kv_once:
            embeds = image_embeds[owner]  # (T, P, Dv): each caption sees its own image
            image_mask = torch.ones(embeds.shape[:-1], dtype=torch.long, device=embeds.device)  # (T, P)
            return encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=embeds,
                           encoder_attention_mask=image_mask).last_hidden_state
        # Only the images this chunk of captions belongs to; owner is non-decreasing (image-major).
        first, last = int(owner[0]), int(owner[-1])
        embeds = image_embeds[first:last + 1]  # (B', P, Dv)
        local = owner - first  # (T,)
        counts = torch.bincount(local, minlength=embeds.shape[0])
        if bool((counts == counts[0]).all()):
            grouping = grouped_cross_attention(per_image=int(counts[0]), sdpa=self.fast.sdpa)
        else:
            grouping = grouped_cross_attention(owner=local, sdpa=self.fast.sdpa)
        with grouping:  # the image mask is all ones, which transformers' BLIP ignores anyway
            return encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=embeds).last_hidden_state

    def score_texts(self, image_state, owner: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
        model = self.model
        fused = self._fused(image_state["embeds"], owner, self.first_token.apply(ids), mask)  # (T, L, Dt)
        itm = model.itm_head(fused[:, 0, :]).float().softmax(dim=-1)[:, 1]  # (T,)
        text = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (T, L, Dt)
        text_feats = F.normalize(model.text_proj(text[:, 0, :]), dim=-1)  # (T, E)
        itc = (image_state["feats"][owner] * text_feats).sum(dim=-1)  # (T,) cosine
        return itm, itc.float()


class Blip2Filter(EncodeOnceFilter):
    """Encode-once scoring with ``Blip2ForImageTextRetrieval`` (Q-Former ITM and ITC heads)."""

    model_class_name = "Blip2ForImageTextRetrieval"

    def resolve_first_token(self, choice: str) -> ItmFirstToken:
        return ItmFirstToken(choice, None, "BLIP-2's Q-Former reads [CLS] (LAVIS blip2_qformer.py)")

    def encode_images(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        model = self.model
        embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state  # (B, P, Dv)
        image_mask = torch.ones(embeds.shape[:-1], dtype=torch.long, device=embeds.device)
        queries = model.query_tokens.expand(embeds.shape[0], -1, -1)  # (B, Q, H)
        query_out = model.qformer(
            query_embeds=queries, encoder_hidden_states=embeds, encoder_attention_mask=image_mask,
        ).last_hidden_state  # (B, Q, H)
        query_out = query_out.to(dtype=model.vision_projection.weight.dtype)
        feats = F.normalize(model.vision_projection(query_out), dim=-1)  # (B, Q, E)
        return {"embeds": embeds, "feats": feats}

    def score_texts(self, image_state, owner: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
        model = self.model
        num_queries = model.query_tokens.shape[1]
        embeds = image_state["embeds"][owner]  # (T, P, Dv)
        image_mask = torch.ones(embeds.shape[:-1], dtype=torch.long, device=embeds.device)
        queries = model.query_tokens.expand(ids.shape[0], -1, -1)  # (T, Q, H)
        joint = model.embeddings(input_ids=ids, query_embeds=queries)  # (T, Q+L, H)
        joint_mask = torch.cat([torch.ones(queries.shape[:-1], dtype=mask.dtype, device=mask.device), mask], dim=1)
        fused = model.qformer(
            query_embeds=joint, query_length=num_queries, attention_mask=joint_mask,
            encoder_hidden_states=embeds, encoder_attention_mask=image_mask,
        ).last_hidden_state.to(dtype=model.itm_head.weight.dtype)  # (T, Q+L, H)
        # BLIP-2's ITM logit is the mean of the per-query logits.
        itm = model.itm_head(fused[:, :num_queries, :]).mean(dim=1).float().softmax(dim=-1)[:, 1]  # (T,)
        text = model.qformer(
            query_embeds=model.embeddings(input_ids=ids), query_length=0, attention_mask=mask,
        ).last_hidden_state.to(dtype=model.text_projection.weight.dtype)  # (T, L, H)
        text_feats = F.normalize(model.text_projection(text[:, 0, :]), dim=-1)  # (T, E)
        # BLIP-2's ITC similarity is the best match over the image's query outputs.
        sims = torch.einsum("tqe,te->tq", image_state["feats"][owner], text_feats)  # (T, Q)
        return itm, sims.max(dim=1).values.float()


_FILTERS = {"blip": BlipFilter, "blip-2": Blip2Filter}


def load_filter(name_or_dir, device: str = "auto", bf16: bool = False, **options) -> EncodeOnceFilter:
    """A ``BlipFilter`` or ``Blip2Filter``, chosen by the checkpoint's ``model_type``."""
    config = load_hf_config(name_or_dir)
    model_type = getattr(config, "model_type", None)
    if model_type not in _FILTERS:
        raise ValueError(
            f"{name_or_dir!r} has model_type {model_type!r}; a filter needs one of {sorted(_FILTERS)}"
        )
    cls = _FILTERS[model_type]
    architectures = getattr(config, "architectures", None) or []
    if architectures and cls.model_class_name not in architectures:
        raise ValueError(
            f"{name_or_dir!r} holds {architectures}, not an ITM model ({cls.model_class_name})"
        )
    return cls.from_pretrained(name_or_dir, device=device, bf16=bf16, **options)
