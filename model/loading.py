"""transformers models from a spec (``model.specs``): a local directory or a hub id.

Both go through ``from_pretrained``, never with remote code. A local directory is checked first
(``specs.check_model_dir``), so a missing or broken one fails with a ValueError that names the
path and what is wrong, not with the hub's "not a valid model identifier"; every loader error
becomes a ValueError naming the spec. open_clip models are loaded by their users with
``open_clip.create_model_and_transforms`` on ``specs.open_clip_args``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from capfilt.model.specs import ModelSpec, check_model_dir


def loader_error(exc: Exception, limit: int | None = None) -> str:
    """`exc` as a short quote: its type and what went wrong, without PyTorch's advice to re-run
    ``torch.load`` with ``weights_only=False`` or to allowlist globals, which capfilt never does
    and never suggests (transformers and open_clip pass that advice on in their own errors)."""
    text = " ".join(str(exc).split())
    detail = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Please use `torch\.serialization|"
                       r"Check the documentation|$)", text)
    if detail:
        text = detail.group(1)
    # any other sentence that recommends weights_only=False goes too
    text = " ".join(s for s in re.split(r"(?<=\.) ", text)
                    if not re.search(r"weights_only`? (set to `?False|=\s*False)", s))
    text = text[:limit] if limit else text
    return f"{type(exc).__name__}: {text or 'no detail'}"


def _target(name_or_dir: str | Path, need_processor: bool) -> str:
    """What ``from_pretrained`` is given: a checked local directory, else the spec as written."""
    spec = ModelSpec.parse(name_or_dir)
    if spec.remote:
        raise ValueError(f"{spec.text}: a model on object storage is read by curate only (it copies it to a "
                         f"local cache first); copy it to a local directory for this command")
    if spec.local:
        return str(check_model_dir(spec.path, need_processor=need_processor))
    return spec.text


def load_hf_config(name_or_dir: str | Path):
    """``AutoConfig`` of a directory or hub id, with a ValueError naming it on failure."""
    from transformers import AutoConfig

    spec = _target(name_or_dir, need_processor=False)
    try:
        return AutoConfig.from_pretrained(spec, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(_failed(f"cannot read the model config of {name_or_dir!r}", name_or_dir, exc)) from exc


def _failed(what: str, name_or_dir, exc: Exception) -> str:
    """A loader's error; for a hub id that is also read as a missing local directory
    (``ModelSpec.shadow``), that reading first."""
    spec = ModelSpec.parse(name_or_dir)
    return spec.both_readings(loader_error(exc)) if spec.shadow else f"{what}: {loader_error(exc)}"


def load_hf_model(model_cls, processor_cls, name_or_dir: str | Path, device: torch.device) -> tuple[Any, Any]:
    """Load ``model_cls`` + ``processor_cls`` from a directory or hub id, in eval mode on ``device``.

    Weights come through transformers (safetensors, or torch.load with weights_only=True);
    missing or shape-mismatched weights make the directory count as corrupt.
    """
    spec = _target(name_or_dir, need_processor=True)
    try:
        model, info = model_cls.from_pretrained(spec, trust_remote_code=False, output_loading_info=True)
        processor = processor_cls.from_pretrained(spec, trust_remote_code=False)
    except Exception as exc:  # safetensors, json, hub and torch each raise their own error types
        raise ValueError(_failed(f"cannot load {model_cls.__name__} from {name_or_dir!r}", name_or_dir, exc)) from exc
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(m) for m in (info.get("mismatched_keys") or []))
    if missing or mismatched:
        problems = []
        if missing:
            problems.append(f"missing weights {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if mismatched:
            problems.append(f"shape-mismatched weights {mismatched[:10]}")
        raise ValueError(
            f"{name_or_dir!r} is not a complete {model_cls.__name__} checkpoint: {'; '.join(problems)}"
        )
    return model.to(device).eval(), processor
