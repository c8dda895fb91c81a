"""Import original BLIP / LAVIS checkpoints (``.pth``) into transformers' BLIP classes.

The key mapping is the one of transformers' ``convert_blip_original_pytorch_to_hf.py``: the
vision tower is renamed from timm's ViT names (``visual_encoder.blocks.N.attn.qkv``) to HF's
(``vision_model.encoder.layers.N.self_attn.qkv``); the text modules keep their names, because
BLIP's ``med.py`` is BERT and HF's BLIP text model kept BERT's parameter names. transformers
ships that mapping only as a script that downloads checkpoints, so it is written out here as
a two-way table, which also gives the export (HF -> original) the round-trip test uses.

Strictness: every key of the checkpoint must be either mapped into the target model or a known
part the target does not hold (momentum encoders, queues and temperature of pretraining, the
other task's heads, position-id buffers); every weight of the target must be provided, with its
shape. Anything else fails with the list of offending keys. Checkpoints are read with
``torch.load(weights_only=True)`` (or safetensors). A directory or a state dict already in
transformers' layout is refused with a message saying it needs no conversion. A ``processor``
whose tokenizer does not match the text config (vocabulary size, pad/sep/bos/eos ids) is refused
before anything is written (a tokenizer that ends with BLIP's [DEC] but lacks the [ENC] after it
gets [ENC] added first, at the id BLIP's tokenizer gives it: ``model.tokens``), and the output
is written to a sibling directory renamed into place at the end (`model.out_dirs.staged_dir`),
so a failed conversion never leaves a half-written directory.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from capfilt.model.builders.out_dirs import check_output_dir, staged_dir
from capfilt.model.loading import loader_error
from capfilt.model.tokens import ENC_TOKEN, add_enc_token, enc_token_id

log = logging.getLogger(__name__)

TASKS = ("caption", "itm")
_HF_CLASS = {"caption": "BlipForConditionalGeneration", "itm": "BlipForImageTextRetrieval"}
# Top-level modules of the original models, per task (BLIP's blip.py / blip_retrieval.py).
_TASK_PARTS = {
    "caption": ("visual_encoder.", "text_decoder."),
    "itm": ("visual_encoder.", "text_encoder.", "vision_proj.", "text_proj.", "itm_head."),
}
_ALL_PARTS = tuple(sorted({p for parts in _TASK_PARTS.values() for p in parts}))
# In original checkpoints but in no HF inference class: momentum encoders and feature queues
# (pretraining and retrieval finetuning), the ITC temperature, BERT's position-id buffers.
_UNUSED = re.compile(
    r"^(visual_encoder_m|text_encoder_m|text_decoder_m|vision_proj_m|text_proj_m)\."
    r"|^(image_queue|text_queue|idx_queue|ptr_queue|temp)$"
    r"|\.position_ids$"
)
# Vision tower: (original name under visual_encoder., HF name under vision_model.).
_VISION_TABLE = (
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.{p}", "embeddings.patch_embedding.{p}"),
    ("blocks.{i}.norm1.{p}", "encoder.layers.{i}.layer_norm1.{p}"),
    ("blocks.{i}.attn.qkv.{p}", "encoder.layers.{i}.self_attn.qkv.{p}"),
    ("blocks.{i}.attn.proj.{p}", "encoder.layers.{i}.self_attn.projection.{p}"),
    ("blocks.{i}.norm2.{p}", "encoder.layers.{i}.layer_norm2.{p}"),
    ("blocks.{i}.mlp.{fc}.{p}", "encoder.layers.{i}.mlp.{fc}.{p}"),
    ("norm.{p}", "post_layernorm.{p}"),
)
_SLOTS = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)", "fc": r"(?P<fc>fc1|fc2)"}
_ORIGINAL_VISION, _HF_VISION = "visual_encoder.", "vision_model."
# bert-base-uncased (30522) + BLIP's [DEC] and [ENC]; BlipTextConfig's default token ids assume it.
_BLIP_VOCAB = 30524


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for slot, group in _SLOTS.items():
        pattern = pattern.replace(re.escape("{" + slot + "}"), group)
    return re.compile(pattern + "$")


_TO_HF = [(_compile(orig), hf) for orig, hf in _VISION_TABLE]
_TO_ORIGINAL = [(_compile(hf), orig) for orig, hf in _VISION_TABLE]


def _rename(key: str, src_prefix: str, dst_prefix: str, table) -> str | None:
    if not key.startswith(src_prefix):
        return key  # text modules and heads: same names on both sides
    rest = key[len(src_prefix):]
    for pattern, template in table:
        match = pattern.match(rest)
        if match:
            return dst_prefix + template.format(**match.groupdict())
    return None  # a vision key no table row knows


def original_to_hf_key(key: str) -> str | None:
    """HF name of an original BLIP key, or None when the vision table has no such key."""
    return _rename(key, _ORIGINAL_VISION, _HF_VISION, _TO_HF)


def hf_to_original_key(key: str) -> str | None:
    """Original BLIP name of an HF BLIP key (inverse of ``original_to_hf_key``)."""
    return _rename(key, _HF_VISION, _ORIGINAL_VISION, _TO_ORIGINAL)


def to_original_state_dict(model) -> dict[str, torch.Tensor]:
    """An HF BLIP model's weights under the original BLIP/LAVIS names (for export)."""
    out = {}
    for key, value in model.state_dict().items():
        name = hf_to_original_key(key)
        if name is None:
            raise ValueError(f"HF key {key!r} has no original BLIP name")
        out[name] = value
    return out


# Prefixes only transformers' BLIP / BLIP-2 classes use. The text modules keep BERT's names on
# both sides (see the module docstring), so the vision tower is what tells the layouts apart.
_HF_ONLY_PREFIXES = (_HF_VISION, "qformer.", "query_tokens", "language_model.")


def load_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an original checkpoint: ``{"model": sd, ...}``, ``{"state_dict": sd}`` or
    ``sd``, in a ``torch.load(weights_only=True)`` file or a ``.safetensors`` file. A directory,
    or weights already in transformers' layout, are refused with what to do instead."""
    path = Path(path)
    if path.is_dir():
        hint = ("; it holds config.json, so it is already a transformers model directory and needs no "
                "conversion: pass it to --captioner / --filter as it is"
                if (path / "config.json").is_file() else "")
        raise ValueError(f"checkpoint {path} is a directory, not a checkpoint file (.pth){hint}")
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            checkpoint = load_file(str(path), device="cpu")
        except Exception as exc:  # the header parser raises its own error types
            raise ValueError(f"{path} is not a safetensors file ({loader_error(exc, limit=200)})") from exc
    else:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle/zip errors come in many types; all mean "not loadable"
            raise ValueError(f"{path} is not a PyTorch checkpoint torch.load(weights_only=True) can read "
                             f"({loader_error(exc, limit=200)})") from exc
    for wrapper in ("model", "state_dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
            break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"checkpoint {path} holds no state dict of tensors (looked at top level, 'model', 'state_dict')")
    hf_keys = sorted(k for k in checkpoint if str(k).startswith(_HF_ONLY_PREFIXES))
    if hf_keys and not any(str(k).startswith(_ORIGINAL_VISION) for k in checkpoint):
        raise ValueError(
            f"checkpoint {path} is already in the transformers layout ({len(hf_keys)} keys such as "
            f"{hf_keys[0]!r}), not an original BLIP/LAVIS one: it needs no conversion. Use the "
            f"directory it came from (config.json, model.safetensors and the processor) as it is")
    return checkpoint


def _count_layers(state: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for key in state if (m := pattern.match(key))}
    if not found:
        raise ValueError(f"checkpoint has no layers under {prefix!r}")
    return max(found) + 1


def _shape(state: dict, key: str) -> tuple[int, ...]:
    if key not in state:
        raise ValueError(f"checkpoint lacks {key!r}, needed to infer the model size")
    return tuple(state[key].shape)


def infer_config(state: dict, task: str):
    """A ``BlipConfig`` sized from the checkpoint's shapes (head size 64, as in every BLIP release;
    special token ids of BLIP's bert-base-uncased tokenizer). Pass ``config=`` to override."""
    from transformers import BlipConfig

    width, _, patch, _ = _shape(state, "visual_encoder.patch_embed.proj.weight")  # (D, 3, p, p)
    positions = _shape(state, "visual_encoder.pos_embed")[1]  # 1 + (S/p)^2
    grid = round((positions - 1) ** 0.5)
    vision = {  # layer_norm_eps: BLIP's ViT (vit.py) uses 1e-6; BlipVisionConfig's default is 1e-5
        "hidden_size": width, "patch_size": patch, "image_size": grid * patch, "layer_norm_eps": 1e-6,
        "num_hidden_layers": _count_layers(state, "visual_encoder.blocks."),
        "intermediate_size": _shape(state, "visual_encoder.blocks.0.mlp.fc1.weight")[0],
        "num_attention_heads": width // 64,
    }
    text_prefix = "text_decoder.bert." if task == "caption" else "text_encoder."
    vocab, hidden = _shape(state, text_prefix + "embeddings.word_embeddings.weight")
    text = {
        "vocab_size": vocab, "hidden_size": hidden, "num_attention_heads": hidden // 64,
        "max_position_embeddings": _shape(state, text_prefix + "embeddings.position_embeddings.weight")[0],
        "num_hidden_layers": _count_layers(state, text_prefix + "encoder.layer."),
        "intermediate_size": _shape(state, text_prefix + "encoder.layer.0.intermediate.dense.weight")[0],
        "encoder_hidden_size": _shape(state, text_prefix + "encoder.layer.0.crossattention.self.key.weight")[1],
    }
    odd = [f"{name} {value} is not a multiple of BLIP's head size 64"
           for name, value in (("vision width", width), ("text width", hidden)) if value % 64]
    if vocab != _BLIP_VOCAB:
        odd.append(f"the vocabulary has {vocab} tokens, not BLIP's {_BLIP_VOCAB}")
    if odd:
        raise ValueError(f"cannot infer the config of a non-standard BLIP checkpoint ({'; '.join(odd)}): "
                         f"pass its config explicitly (--config DIR)")
    extra = {"image_text_hidden_size": _shape(state, "vision_proj.weight")[0]} if task == "itm" else {}
    return BlipConfig(text_config=text, vision_config=vision, **extra)


def _first(items: list, n: int = 8) -> str:
    """The first `n` of a list for an error message (a wrong checkpoint mismatches hundreds)."""
    return ", ".join(map(str, items[:n])) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def map_state_dict(state: dict, task: str, target_keys: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """Rename ``state`` into the HF layout of ``task``; ValueError listing unknown, missing and
    shape-mismatched keys. ``target_keys`` maps each HF key to its expected shape."""
    mapped, unknown, skipped = {}, [], []
    own_parts = _TASK_PARTS[task]
    for key, value in state.items():
        if _UNUSED.search(key):
            skipped.append(key)
            continue
        if key.startswith(_ALL_PARTS) and not key.startswith(own_parts):
            skipped.append(key)  # another task's module, e.g. the decoder of a pretrain checkpoint
            continue
        name = original_to_hf_key(key)
        if name is None or name not in target_keys:
            unknown.append(key)
            continue
        mapped[name] = value
    missing = sorted(set(target_keys) - set(mapped))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {target_keys[k]}"
        for k, v in mapped.items() if tuple(v.shape) != target_keys[k]
    )
    if unknown or missing or mismatched:
        parts = [f"{label} ({len(keys)}): {_first(sorted(keys))}"
                 for label, keys in (("unknown keys", unknown), ("missing keys", missing),
                                     ("shape mismatches", mismatched)) if keys]
        raise ValueError(f"checkpoint does not fit {_HF_CLASS[task]}: " + "; ".join(parts))
    if skipped:
        log.info("ignored %d checkpoint keys this task does not use (e.g. %s)", len(skipped), skipped[0])
    return mapped


def check_processor_fits(processor, text_config, name="processor") -> None:
    """ValueError unless ``processor``'s tokenizer is the one ``text_config`` was trained with:
    same vocabulary size, and the pad / sep / bos token ids the captioner and filter feed the
    model are the tokenizer's. A mismatched tokenizer loads and runs, but decodes garbage.

    BLIP stops generation at [SEP] (``sep_token_id``); the published configs' ``eos_token_id`` (2)
    is unused, and BLIP's tokenizers define no eos token, so eos is only checked to be an id of
    the tokenizer (and the tokenizer's own eos, if it has one)."""
    tokenizer = processor.tokenizer
    size, vocab = len(tokenizer), text_config.vocab_size
    if size != vocab:
        raise ValueError(f"{name}'s tokenizer has {size} tokens but the checkpoint's text model has "
                         f"{vocab}: it is not this model's tokenizer (pass the processor it was trained with)")
    problems = []
    for kind in ("pad", "sep", "bos", "eos"):
        config_ids = getattr(text_config, f"{kind}_token_id", None)
        if config_ids is None:
            continue
        config_ids = [int(i) for i in (config_ids if isinstance(config_ids, (list, tuple)) else [config_ids])]
        own_id = getattr(tokenizer, f"{kind}_token_id", None)
        outside = [i for i in config_ids if not 0 <= i < size]
        if outside:
            problems.append(f"{kind}_token_id {outside[0]} is outside the tokenizer's {size} ids")
        elif own_id is not None and int(own_id) not in config_ids:
            token = tokenizer.convert_ids_to_tokens(config_ids[0])
            problems.append(f"{kind}_token_id {config_ids[0]} is {token!r} in the tokenizer, whose "
                            f"{kind} token is {getattr(tokenizer, kind + '_token')!r} (id {own_id})")
    if problems:
        raise ValueError(f"{name}'s tokenizer does not match the checkpoint's text config: " + "; ".join(problems))


def convert_blip_checkpoint(src, out_dir, task: str, config=None, processor=None, overwrite: bool = False) -> Path:
    """Convert original checkpoint ``src`` into a ``save_pretrained`` directory ``out_dir``.

    ``config``: a BlipConfig, or a directory / hub id / config.json to read one from (default:
    inferred from the checkpoint's shapes). ``processor``: a directory or hub id whose
    BlipProcessor is saved beside the model, so that ``Captioner``/``load_filter`` can load it;
    its tokenizer must match the text config (`check_processor_fits`).

    Everything is read and checked before anything is written; the output is written to a
    sibling directory renamed to ``out_dir`` at the end, so a failed conversion leaves
    ``out_dir`` as it was. ``overwrite`` replaces a non-empty ``out_dir`` (its old contents are
    deleted, so no stale processor file can sit beside the new weights).
    """
    import transformers
    from transformers import BlipConfig, BlipProcessor

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    out = Path(out_dir)
    check_output_dir(out, overwrite, command="convert")
    log.info("reading %s", src)
    state = load_original_state_dict(src)
    log.info("%d tensors read; building %s", len(state), _HF_CLASS[task])
    if config is None:
        config = infer_config(state, task)
    elif not isinstance(config, BlipConfig):
        try:
            model_type = BlipConfig.get_config_dict(str(config))[0].get("model_type")
            if model_type != "blip":  # e.g. a BLIP-2 directory: every key would mismatch
                raise ValueError(f"its model_type is {model_type!r}, not 'blip'")
            config = BlipConfig.from_pretrained(str(config))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read a BlipConfig from {config!r}: {exc}") from exc
    blip_processor = None
    if processor is not None:
        try:
            blip_processor = BlipProcessor.from_pretrained(str(processor))
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"cannot read a BlipProcessor from {processor!r}: {exc}") from exc
        if add_enc_token(blip_processor.tokenizer, config.text_config.vocab_size):
            log.info("the processor's tokenizer lacked %s: added as token %d, the row BLIP's tokenizer gives it",
                     ENC_TOKEN, blip_processor.tokenizer.convert_tokens_to_ids(ENC_TOKEN))
        check_processor_fits(blip_processor, config.text_config, name=f"--processor {processor}")
        if task == "itm" and enc_token_id(blip_processor.tokenizer, config.text_config.vocab_size)[0] is None:
            log.warning("--processor %s has no %s: the filter will start its ITM text with [CLS], which BLIP "
                        "checkpoints were not trained with", processor, ENC_TOKEN)
    config.architectures = [_HF_CLASS[task]]
    model = getattr(transformers, _HF_CLASS[task])(config)
    target = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(map_state_dict(state, task, target), strict=True)
    model.eval()
    log.info("weights mapped; saving to %s", out)
    with staged_dir(out, replace=True) as stage:
        model.save_pretrained(stage)
        if blip_processor is not None:
            blip_processor.save_pretrained(stage)
    if blip_processor is None:
        log.warning("%s has no processor; add one (BlipProcessor.save_pretrained) before loading it", out)
    return out
