"""The CapFilt ranker: CLIP cosine between an image and each of its captions, over open_clip.

The model comes from ``open_clip.create_model_and_transforms`` and the tokenizer from
``open_clip.get_tokenizer``. ``score`` encodes every image once, encodes all captions of the
batch in one text batch, and takes each caption's cosine with its own image (open_clip's
``forward`` would score every image against every text). ``top_k`` is the selection helper.

Accepted specs:

* a directory holding ``open_clip_config.json`` and weights (``capfilt models init --kind clip``,
  or ``open_clip.push_to_hf_hub`` layout) -> loaded as ``local-dir:DIR``;
* ``hf-hub:org/repo`` or ``local-dir:DIR`` -> passed to open_clip as they are;
* ``NAME:PRETRAINED`` -> a built-in architecture plus a pretrained tag or weights file
  (``ViT-L-14:openai``).

Weights must load (``require_pretrained``): a spec without weights is an error, not a silently
random model. open_clip reads them with safetensors or ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.device import check_images, inference_context, is_local_spec, resolve_device, use_bf16

_SCHEMES = ("hf-hub:", "local-dir:")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def _check_clip_dir(path: Path) -> Path:
    if not path.is_dir():
        raise ValueError(f"CLIP model directory {path} does not exist")
    if not (path / "open_clip_config.json").is_file():
        raise ValueError(f"CLIP model directory {path} has no open_clip_config.json")
    if not any(p.suffix in _WEIGHT_SUFFIXES for p in path.iterdir() if p.is_file()):
        raise ValueError(f"CLIP model directory {path} has no weights file ({', '.join(_WEIGHT_SUFFIXES)})")
    return path


def parse_spec(spec: str) -> tuple[str, str | None]:
    """(open_clip model name, pretrained tag/file or None) for a ranker spec."""
    spec = str(spec)
    if spec.startswith("local-dir:"):
        return "local-dir:" + str(_check_clip_dir(Path(spec[len("local-dir:"):]).expanduser())), None
    if spec.startswith("hf-hub:"):
        return spec, None
    if is_local_spec(spec):
        return "local-dir:" + str(_check_clip_dir(Path(spec).expanduser())), None
    name, sep, pretrained = spec.partition(":")
    if not sep or not name or not pretrained:
        raise ValueError(
            f"CLIP spec {spec!r} is not a model directory, 'hf-hub:org/repo' or 'NAME:PRETRAINED' "
            f"(e.g. 'ViT-L-14:openai')"
        )
    return name, pretrained


class ClipRanker:
    """Image-caption cosine scores from an open_clip model; each image encoded once."""

    def __init__(self, model, preprocess, tokenizer, device: torch.device, bf16: bool = False,
                 text_batch_size: int = 256):
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.bf16 = bf16
        self.text_batch_size = text_batch_size

    @classmethod
    def load(cls, spec: str, device: str = "auto", bf16: bool = False, **options) -> "ClipRanker":
        import open_clip

        name, pretrained = parse_spec(spec)
        resolved = resolve_device(device)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=resolved, require_pretrained=True, weights_only=True,
            )
            tokenizer = open_clip.get_tokenizer(name)
        except Exception as exc:  # open_clip, safetensors and the hub raise many error types
            raise ValueError(f"cannot load CLIP model {spec!r}: {exc}") from exc
        return cls(model.eval(), preprocess, tokenizer, resolved, bf16=use_bf16(bf16, resolved), **options)

    def _encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(image) for image in check_images(images)]).to(self.device)
        return self.model.encode_image(pixels, normalize=True).float()  # (B, D)

    def _encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        parts = []
        for start in range(0, len(texts), self.text_batch_size):
            tokens = self.tokenizer(list(texts[start:start + self.text_batch_size])).to(self.device)  # (t, C)
            parts.append(self.model.encode_text(tokens, normalize=True).float())  # (t, D)
        return torch.cat(parts)  # (T, D)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(B, D) float32 L2-normalised image embeddings."""
        if len(images) == 0:
            raise ValueError("encode_images needs at least one image")
        with inference_context(self.device, self.bf16):
            return self._encode_images(images).cpu().numpy()

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(T, D) float32 L2-normalised text embeddings."""
        if isinstance(texts, str) or len(texts) == 0:
            raise ValueError("encode_texts needs a non-empty list of strings")
        with inference_context(self.device, self.bf16):
            return self._encode_texts(texts).cpu().numpy()

    def score(self, images: Sequence[Image.Image], captions_per_image: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """result[b] is float32 (n_b,): cosine of image b with each of its captions."""
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
        with inference_context(self.device, self.bf16):
            image_feats = self._encode_images(images)  # (B, D): one forward per image
            if texts:
                text_feats = self._encode_texts(texts)  # (T, D)
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
