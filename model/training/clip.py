"""CLIP training (`--arch clip`) with an open_clip model and `open_clip.loss.ClipLoss`.

The network, its preprocessing, tokenizer and loss are all open_clip's; this module only adapts
them to the loop in `train.py` (collate / forward / export). Under DDP the loss is
`ClipLoss(local_loss=True, gather_with_grad=True)`: each rank's rows against the whole global
batch, which averages to the single-process loss of the same global batch.

The export is the directory layout `capfilt models init --kind clip` writes (model/builders/tiny.py):
``DIR/clip/open_clip_model.safetensors`` + ``open_clip_config.json`` (``model_cfg`` and
``preprocess_cfg``), loadable with ``open_clip.create_model_and_transforms("local-dir:DIR/clip")``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from capfilt.model.specs import CLIP_CONFIG, clip_spec
from capfilt.model.training import losses as L

WEIGHTS_FILE = "open_clip_model.safetensors"


class ClipTrainModel(nn.Module):
    """An open_clip CLIP plus its (eval) preprocessing and tokenizer."""

    def __init__(self, model: nn.Module, preprocess, tokenizer, config: dict):
        super().__init__()
        self.model, self.preprocess, self.tokenizer, self.config = model, preprocess, tokenizer, config

    @classmethod
    def from_dir(cls, model_dir) -> "ClipTrainModel":
        """Load a directory holding open_clip_config.json (or DIR/clip/) through open_clip."""
        import open_clip

        path = Path(model_dir).expanduser()
        if not (path / CLIP_CONFIG).is_file() and (path / "clip" / CLIP_CONFIG).is_file():
            path = path / "clip"
        spec = clip_spec(path)  # a ValueError naming the directory unless it holds a CLIP model
        # the eval transform: no random crops, so a step depends only on the data and the weights
        model, _, preprocess = open_clip.create_model_and_transforms(spec)
        config = json.loads((path / CLIP_CONFIG).read_text())
        return cls(model, preprocess, open_clip.get_tokenizer(spec), config)

    def collate(self, samples) -> dict:
        """pixel_values (B, 3, H, W), text (B, context_length) BPE ids."""
        return {"pixel_values": torch.stack([self.preprocess(s.image) for s in samples]),
                "text": self.tokenizer([s.text for s in samples])}

    def forward(self, batch: dict) -> dict:
        from open_clip.loss import ClipLoss

        with torch.no_grad():  # open_clip's training clamps the scale at ln(100) the same way
            self.model.logit_scale.clamp_(0, math.log(100))
        image = self.model.encode_image(batch["pixel_values"], normalize=True)  # (B, D)
        text = self.model.encode_text(batch["text"], normalize=True)  # (B, D)
        rank, world = L.world()
        loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
        loss = loss_fn(image, text, self.model.logit_scale.exp())
        return {"loss": loss, "clip": loss.detach()}

    def export(self, out_dir) -> list[Path]:
        path = Path(out_dir) / "clip"
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(path / WEIGHTS_FILE))
        (path / CLIP_CONFIG).write_text(json.dumps(self.config, indent=2))
        return [path]

    @torch.no_grad()
    def encode(self, pixel_values, text) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised (B, D) image and (B, D) text features, as the exported model gives them."""
        return (self.model.encode_image(pixel_values, normalize=True),
                self.model.encode_text(text, normalize=True))


def build_clip(work_dir, init=None, seed: int = 0, overrides: dict | None = None) -> ClipTrainModel:
    """From `init` (a CLIP directory or DIR/clip), or a fresh tiny CLIP written to
    ``work_dir/init/clip`` by `model.builders.tiny.init_model`."""
    if init is None:
        from capfilt.model.builders.tiny import init_model

        init = Path(work_dir) / "init" / "clip"
        if not (init / CLIP_CONFIG).is_file():
            init_model("clip", init, seed=seed, overrides=overrides)
    return ClipTrainModel.from_dir(init)
