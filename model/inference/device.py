"""Where and how the inference models run.

* ``resolve_device("auto")`` picks cuda when torch sees a GPU, else cpu.
* ``bf16_supported(device)`` says whether the hardware runs bfloat16 natively. On CPU that
  means AVX512-BF16 or AMX; without them torch still accepts bf16 autocast but emulates it,
  which is slower than fp32, so it is switched off instead.
* ``inference_context(device, bf16)`` is ``torch.inference_mode()`` plus bf16 autocast when
  it was asked for and the hardware has it. It is decided once, at load time, by
  ``use_bf16`` (``True``: on where supported, with a warning elsewhere; ``"auto"``: on where
  supported, silently). The adapters default to fp32: bf16 on every model changed more keep
  decisions and selected captions than curation tolerates (docs/benchmarks/capfilt.md). Curate
  chooses per model with ``--precision`` (``pipeline.curate.precision``: by default the filter
  and ranker in bf16 with an fp32 check of close decisions, where bf16 is native).
* ``check_images`` is the input check the three adapters share (PIL images, made RGB).

Models are read from their specs by ``model.loading`` (transformers) and ``model.specs``
(open_clip names); the BLIP attention speed-ups are in ``model.inference.fastpath``.

Written here rather than taken from a library because the policy (which CPU features count as
bf16 hardware) is the project's own.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import torch
from PIL import Image

log = logging.getLogger(__name__)


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
