"""Image encoders that pretraining starts from: timm / open_clip towers and their mapping into
transformers' BLIP vision models.

BLIP initialised its ViT from ImageNet weights, and BLIP-2 stage 1 freezes a pretrained tower
and feeds its penultimate layer to the Q-Former. transformers' `BlipVisionModel` and
`Blip2VisionModel` are pre-norm ViTs with the same parameter layout as timm's
`VisionTransformer` (class token, learned position embedding, fused qkv with bias, fc1/fc2
MLP, final LayerNorm), so a timm ViT maps into them tensor for tensor. No library ships this
mapping (transformers converts only BLIP's own checkpoints), hence this module.

Specs (`--vision-init`): ``timm:NAME[:FILE]`` (FILE: a local .safetensors/.pth state dict, read
by timm's loader with ``weights_only=True``; without FILE timm fetches NAME's pretrained tag),
``open_clip:NAME:PRETRAINED`` (BLIP-2's frozen tower only), ``hf:DIR`` (the vision tower of a
saved BLIP / BLIP-2 directory), read by ``model.specs.parse_vision_init``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from capfilt.model.specs import LOCAL, OPEN_CLIP, TIMM, ModelSpec, parse_vision_init
from capfilt.model.loading import loader_error

log = logging.getLogger(__name__)


def create_timm(spec: ModelSpec, vision_config, extra_layers: int = 0) -> nn.Module:
    """The timm model NAME built in the shape of `vision_config` (plus `extra_layers` blocks that
    the caller drops, e.g. 1 for BLIP-2's penultimate features), with FILE's or NAME's
    pretrained weights. A shape mismatch fails naming the spec."""
    import timm

    kwargs = dict(
        img_size=vision_config.image_size, patch_size=vision_config.patch_size,
        embed_dim=vision_config.hidden_size, depth=vision_config.num_hidden_layers + extra_layers,
        num_heads=vision_config.num_attention_heads,
        mlp_ratio=vision_config.intermediate_size / vision_config.hidden_size, num_classes=0,
    )
    overlay = {"file": spec.weights} if spec.weights else None
    try:
        return timm.create_model(spec.name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except TypeError as err:  # a convnet's constructor has no img_size / patch_size / depth
        raise ValueError(f"--vision-init timm:{spec.name}: not a vision transformer that can take the "
                         f"model's vision shape ({err}); BLIP's tower is a ViT") from err
    except (RuntimeError, ValueError, OSError) as err:
        missing = spec.weights and not Path(spec.weights).expanduser().is_file()
        first = " ".join(str(err).split())[:300]  # timm lists every mismatched tensor
        raise ValueError(f"--vision-init timm:{spec.name}{':' + spec.weights if spec.weights else ''}: "
                         + (f"weights file {spec.weights} does not exist" if missing else
                            f"its weights do not fit the model's vision shape {kwargs} ({first} ...)"
                            + _shape_hint(spec.name, extra_layers))) from err


def _shape_hint(name: str, extra_layers: int) -> str:
    """The --model-config that gives the BLIP tower timm NAME's own sizes (read from a model
    built on the meta device: no memory, no weights)."""
    import json

    import timm

    try:
        with torch.device("meta"):
            ref = timm.create_model(name, pretrained=False, num_classes=0)
        sizes = {"hidden_size": ref.embed_dim, "num_attention_heads": ref.blocks[0].attn.num_heads,
                 "intermediate_size": ref.blocks[0].mlp.fc1.out_features,
                 "num_hidden_layers": len(ref.blocks) - extra_layers,
                 "patch_size": ref.patch_embed.patch_size[0], "image_size": ref.patch_embed.img_size[0]}
    except Exception:  # noqa: BLE001 - only a hint: a model without these attributes gets none
        return ""
    return f"; for {name}'s own sizes pass --model-config '{json.dumps({'vision_config': sizes})}'"


def timm_unmappable_reason(model: nn.Module) -> str | None:
    """Why a timm model cannot map onto a BLIP vision tower, or None when it can."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        return f"{type(model).__name__} is not a timm VisionTransformer"
    block = model.blocks[0]
    checks = {
        "a class token": model.cls_token is not None and model.num_prefix_tokens == 1,
        "position embedding on the class token": not model.no_embed_class,
        "no pre-norm": isinstance(model.norm_pre, nn.Identity),
        "qkv bias": block.attn.qkv.bias is not None,
        "no layer scale / qk-norm": isinstance(block.attn.q_norm, nn.Identity)
        and all(isinstance(getattr(block, n, nn.Identity()), nn.Identity) for n in ("ls1", "ls2")),
    }
    missing = [k for k, ok in checks.items() if not ok]
    return f"needs {', '.join(missing)}" if missing else None


@torch.no_grad()
def copy_timm_vit(src: nn.Module, dst: nn.Module, copy_final_norm: bool = True) -> None:
    """Copy a timm ViT into a (Blip|Blip2)VisionModel `dst`; `dst` may have fewer layers (its
    first N blocks are used). Without `copy_final_norm` the post-LayerNorm is reset, as BLIP-2
    puts a new LayerNorm on penultimate features."""
    reason = timm_unmappable_reason(src)
    if reason:
        raise ValueError(f"cannot map {type(src).__name__} into BLIP's vision tower: {reason}")
    emb = dst.embeddings
    _copy(emb.class_embedding, src.cls_token, "cls_token")
    _copy(emb.position_embedding, src.pos_embed, "pos_embed")
    _copy(emb.patch_embedding.weight, src.patch_embed.proj.weight, "patch_embed.proj.weight")
    _copy(emb.patch_embedding.bias, src.patch_embed.proj.bias, "patch_embed.proj.bias")
    if len(dst.encoder.layers) > len(src.blocks):
        raise ValueError(f"vision tower has {len(dst.encoder.layers)} layers, timm model {len(src.blocks)}")
    for i, layer in enumerate(dst.encoder.layers):
        block = src.blocks[i]
        pairs = {
            layer.layer_norm1: block.norm1, layer.self_attn.qkv: block.attn.qkv,
            layer.self_attn.projection: block.attn.proj, layer.layer_norm2: block.norm2,
            layer.mlp.fc1: block.mlp.fc1, layer.mlp.fc2: block.mlp.fc2,
        }
        for d, s in pairs.items():
            _copy(d.weight, s.weight, f"blocks.{i}")
            _copy(d.bias, s.bias, f"blocks.{i}")
    if copy_final_norm:
        _copy(dst.post_layernorm.weight, src.norm.weight, "norm.weight")
        _copy(dst.post_layernorm.bias, src.norm.bias, "norm.bias")
    else:
        dst.post_layernorm.reset_parameters()


@torch.no_grad()
def copy_hf_vision(src: nn.Module, dst: nn.Module, copy_final_norm: bool = True) -> None:
    """Copy a BlipVisionModel / Blip2VisionModel into another (first N layers)."""
    state = {k: v for k, v in src.state_dict().items()
             if not k.startswith("encoder.layers.") or int(k.split(".")[2]) < len(dst.encoder.layers)}
    if not copy_final_norm:
        state = {k: v for k, v in state.items() if not k.startswith("post_layernorm.")}
        dst.post_layernorm.reset_parameters()
    missing, unexpected = dst.load_state_dict(state, strict=False)
    missing = [k for k in missing if copy_final_norm or not k.startswith("post_layernorm.")]
    if missing or unexpected:
        raise ValueError(f"vision towers differ: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"timm {name} has shape {tuple(src.shape)}, the BLIP tower expects {tuple(dst.shape)}")
    dst.copy_(src)


def init_vision_tower(spec: str, vision_model: nn.Module, penultimate: bool = False) -> None:
    """Load `spec` into `vision_model` in place (BLIP's trainable tower, or BLIP-2's tower when it
    maps). With `penultimate`, the source's last block is dropped and the final norm reset."""
    vs = parse_vision_init(spec)
    if vs.kind == TIMM:
        src = create_timm(vs, vision_model.config, extra_layers=1 if penultimate else 0)
        copy_timm_vit(src, vision_model, copy_final_norm=not penultimate)
    elif vs.kind == LOCAL:
        src = load_hf_vision(vs.name)
        have, want = len(src.encoder.layers), len(vision_model.encoder.layers) + (1 if penultimate else 0)
        if penultimate and have != want:
            # BLIP-2 reads the tower's penultimate block: the tower must be the source minus its last
            raise ValueError(f"--vision-init {spec}: the source has {have} layers; its penultimate block "
                             f"feeds the Q-Former only if the tower has {have - 1} (it has {want - 1}): set "
                             f'--model-config \'{{"vision_config": {{"num_hidden_layers": {have - 1}}}}}\'')
        copy_hf_vision(src, vision_model, copy_final_norm=not penultimate)
    else:
        raise ValueError(f"--vision-init {spec!r}: open_clip towers cannot map into a BLIP vision "
                         "model; they are supported as BLIP-2's frozen tower (PenultimateTower)")
    log.info("vision tower initialised from %s%s", spec, " (penultimate layer)" if penultimate else "")


def load_hf_vision(path: str) -> nn.Module:
    """The vision tower of a saved BLIP / BLIP-2 directory (any head), read with safetensors."""
    from pathlib import Path

    from safetensors.torch import load_file
    from transformers import AutoConfig, Blip2VisionModel, BlipVisionModel

    cfg = AutoConfig.from_pretrained(path)
    classes = {"blip": BlipVisionModel, "blip-2": Blip2VisionModel}
    if cfg.model_type not in classes:
        raise ValueError(f"{path}: hf vision init needs a BLIP or BLIP-2 directory, got {cfg.model_type!r}")
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no .safetensors weights")
    prefix = "vision_model."
    state = {}
    for f in files:
        state.update({k[len(prefix):]: v for k, v in load_file(str(f)).items() if k.startswith(prefix)})
    tower = classes[cfg.model_type](cfg.vision_config)
    tower.load_state_dict(state)
    return tower


class PenultimateTower(nn.Module):
    """A frozen timm or open_clip tower returning its penultimate block's tokens (B, 1+N, D)
    (class token first), for BLIP-2 towers that have no `Blip2VisionModel` equivalent. Built
    by `from_spec`, which loads the weights; the constructor only wraps a built trunk."""

    def __init__(self, trunk: nn.Module, lib: str, spec: str):
        super().__init__()
        if lib not in ("timm", "open_clip"):
            raise ValueError(f"PenultimateTower wraps a timm or open_clip trunk, got {lib!r}")
        self.trunk, self.lib, self.spec = trunk, lib, spec
        if lib == "open_clip":
            depth, self.width = len(trunk.transformer.resblocks), trunk.transformer.width
        else:
            depth, self.width = len(trunk.blocks), trunk.embed_dim
        self.index = depth - 2
        self.trunk.requires_grad_(False).eval()

    @classmethod
    def from_spec(cls, spec: str, image_size: int) -> "PenultimateTower":
        """Load `spec` (open_clip:NAME:PRETRAINED or timm:NAME[:FILE]) at `image_size`."""
        vs = parse_vision_init(spec)
        if vs.kind == OPEN_CLIP:
            import open_clip

            if not vs.weights:  # open_clip would build random weights: a frozen random tower teaches nothing
                raise ValueError(f"--vision-init {spec}: give the weights, open_clip:{vs.name}:PRETRAINED "
                                 "(a pretrained tag or a local file)")
            try:
                model = open_clip.create_model(vs.name, pretrained=vs.weights, require_pretrained=True,
                                               weights_only=True)
            except Exception as err:  # open_clip, safetensors and the hub raise many error types
                raise ValueError(f"--vision-init {spec}: cannot load it ({loader_error(err, limit=300)})") from err
            return cls(model.visual, "open_clip", spec)
        if vs.kind != TIMM:
            raise ValueError(f"PenultimateTower needs a timm or open_clip spec, got {spec!r}")
        import timm

        overlay = {"file": vs.weights} if vs.weights else None
        if vs.weights and not Path(vs.weights).expanduser().is_file():
            raise ValueError(f"--vision-init {spec}: weights file {vs.weights} does not exist")
        try:
            trunk = timm.create_model(vs.name, pretrained=True, pretrained_cfg_overlay=overlay,
                                      num_classes=0, img_size=image_size)
        except TypeError as err:  # convnets take no img_size: they have no token sequence either
            raise ValueError(f"--vision-init {spec}: not a transformer tower ({err}); the Q-Former "
                             f"cross-attends to a token sequence (timm ViT / EVA, open_clip)") from err
        if not hasattr(trunk, "blocks") or not getattr(trunk, "num_prefix_tokens", 0):
            raise ValueError(f"--vision-init {spec}: {type(trunk).__name__} has no transformer "
                             f"blocks with a class token for the Q-Former to read")
        return cls(trunk, "timm", spec)

    def train(self, mode: bool = True):
        super().train(mode)
        self.trunk.eval()  # frozen: no dropout / stats updates
        return self

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.lib == "open_clip":
            out = self.trunk.forward_intermediates(pixel_values, indices=[self.index], stop_early=True,
                                                   intermediates_only=True, output_fmt="NLC",
                                                   output_extra_tokens=True)
            return torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)
        out = self.trunk.forward_intermediates(pixel_values, indices=[self.index], return_prefix_tokens=True,
                                               output_fmt="NLC", intermediates_only=True)
        spatial, prefix = out[0]
        return torch.cat([prefix, spatial], dim=1)
