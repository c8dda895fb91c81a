"""Where and how the inference models run, and how they are read from disk.

* ``resolve_device("auto")`` picks cuda when torch sees a GPU, else cpu.
* ``bf16_supported(device)`` says whether the hardware runs bfloat16 natively. On CPU that
  means AVX512-BF16 or AMX; without them torch still accepts bf16 autocast but emulates it,
  which is slower than fp32, so we switch it off instead (issue 8: "off on CPUs without it").
* ``inference_context(device, bf16)`` is ``torch.inference_mode()`` plus bf16 autocast when
  it was asked for and the hardware has it. It is decided once, at load time, by
  ``use_bf16`` (``True``: on where supported, with a warning elsewhere; ``"auto"``: on where
  supported, silently). The adapters default to fp32: bf16 on every model changed more keep
  decisions and selected captions than issue 8 allows (docs/benchmarks/capfilt.md). Curate
  chooses per model with ``--precision`` (``pipeline.precision``: by default the filter and
  ranker in bf16 with an fp32 check of close decisions, where bf16 is native).
* ``check_images`` is the input check the three adapters share (PIL images, made RGB).
* ``load_hf_model`` / ``check_model_dir`` read transformers model directories (or hub ids)
  with ``from_pretrained``, never with remote code, and turn every way a directory can be
  missing or broken into a ``ValueError`` that names the path and what is wrong.
* ``FastPath`` and the BLIP attention speed-ups are in ``model.fastpath``.

Written here rather than taken from a library because the policy (which CPU features count as
bf16 hardware, how loading errors are reported, which speed-ups are on) is the project's own,
and transformers offers no hook for sharing cross-attention keys/values between rows.
"""
from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

log = logging.getLogger(__name__)

# Files a transformers model directory holds its weights in (single file or sharded).
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Files that make a directory loadable by AutoProcessor: an image processor plus a tokenizer.
_IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else is passed to torch."""
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str) or not device:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}: {exc}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but torch sees no CUDA device")
    return resolved


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (AVX512-BF16 or AMX)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast is worth using on ``device``."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def use_bf16(requested: bool | str, device: torch.device) -> bool:
    """The run-time decision: bf16 only when asked for and the hardware has it.

    ``"auto"`` means: use it when the hardware has it, silently stay in fp32 otherwise.
    """
    if requested == "auto":
        return bf16_supported(device)
    if not isinstance(requested, bool):
        raise ValueError(f"bf16 must be True, False or 'auto', got {requested!r}")
    if not requested:
        return False
    if bf16_supported(device):
        return True
    log.warning("bf16 requested but %s has no native bf16 support; running in fp32", device)
    return False


@contextlib.contextmanager
def inference_context(device: torch.device, bf16: bool):
    """``torch.inference_mode()``, plus bf16 autocast on ``device`` when ``bf16`` is true."""
    with torch.inference_mode():
        if bf16:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                yield
        else:
            yield


def check_images(images: Sequence, what: str = "images") -> list[Image.Image]:
    """The images as a list of RGB PIL images; ValueError naming the first bad one."""
    out = []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ValueError(f"{what}[{i}] is a {type(image).__name__}, expected a PIL image")
        out.append(image if image.mode == "RGB" else image.convert("RGB"))
    return out


def is_local_spec(name_or_dir: str | Path) -> bool:
    """A spec is a local path when it exists or is written like one (./x, /x, ~/x, a\\b)."""
    text = str(name_or_dir)
    return Path(text).expanduser().exists() or text.startswith((".", "/", "~")) or "\\" in text


def check_model_dir(path: str | Path, *, need_processor: bool = True) -> Path:
    """Raise ValueError naming ``path`` and the missing/broken part unless it is loadable."""
    root = Path(path).expanduser()
    if not root.exists():
        raise ValueError(f"model directory {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"model path {root} is a file, expected a directory from save_pretrained")
    config = root / "config.json"
    if not config.is_file():
        raise ValueError(f"model directory {root} has no config.json")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"model directory {root}: config.json is not valid JSON ({exc})") from exc
    if not any((root / name).is_file() for name in _WEIGHT_FILES):
        raise ValueError(f"model directory {root} has no weights (expected one of {', '.join(_WEIGHT_FILES)})")
    if need_processor:
        if not any((root / name).is_file() for name in _IMAGE_PROCESSOR_FILES):
            raise ValueError(
                f"model directory {root} has no image processor "
                f"(expected {' or '.join(_IMAGE_PROCESSOR_FILES)}; save the processor with save_pretrained)"
            )
        if not any((root / name).is_file() for name in _TOKENIZER_FILES):
            raise ValueError(f"model directory {root} has no tokenizer (expected {' or '.join(_TOKENIZER_FILES)})")
    return root


def load_config(name_or_dir: str | Path):
    """``AutoConfig`` of a directory or hub id, with a ValueError naming it on failure."""
    from transformers import AutoConfig

    spec = str(name_or_dir)
    if is_local_spec(spec):
        spec = str(check_model_dir(spec, need_processor=False))
    try:
        return AutoConfig.from_pretrained(spec, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot read the model config of {name_or_dir!r}: {exc}") from exc


def load_hf_model(model_cls, processor_cls, name_or_dir: str | Path, device: torch.device) -> tuple[Any, Any]:
    """Load ``model_cls`` + ``processor_cls`` from a directory or hub id, in eval mode on ``device``.

    Weights come through transformers (safetensors, or torch.load with weights_only=True);
    missing or shape-mismatched weights make the directory count as corrupt.
    """
    spec = str(name_or_dir)
    if is_local_spec(spec):
        spec = str(check_model_dir(spec))
    try:
        model, info = model_cls.from_pretrained(spec, trust_remote_code=False, output_loading_info=True)
        processor = processor_cls.from_pretrained(spec, trust_remote_code=False)
    except Exception as exc:  # safetensors, json, hub and torch each raise their own error types
        raise ValueError(f"cannot load {model_cls.__name__} from {name_or_dir!r}: {exc}") from exc
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
