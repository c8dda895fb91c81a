"""Device choice, bf16 policy, inference context and model-directory checks (model/device.py)."""
import json

import pytest
import torch

from capfilt.model import specs
from capfilt.model.inference import device as dev


def test_auto_picks_cuda_when_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dev.resolve_device("auto") == torch.device("cuda")
    assert dev.resolve_device("cuda:1") == torch.device("cuda", 1)


def test_auto_falls_back_to_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dev.resolve_device("auto") == torch.device("cpu")
    assert dev.resolve_device("cpu") == torch.device("cpu")
    assert dev.resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_cuda_requested_without_gpu_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device"):
        dev.resolve_device("cuda")


@pytest.mark.parametrize("bad", ["", "gpu0", None])
def test_bad_device_names(bad):
    with pytest.raises(ValueError):
        dev.resolve_device(bad)


def test_bf16_on_gpu_follows_cuda_support(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert dev.use_bf16(True, cuda) is True
    assert dev.use_bf16(False, cuda) is False
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert dev.use_bf16(True, cuda) is False


def test_bf16_on_cpu_needs_native_instructions(monkeypatch, caplog):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert dev.cpu_has_native_bf16() is False
    with caplog.at_level("WARNING"):
        assert dev.use_bf16(True, cpu) is False
    assert "no native bf16" in caplog.text
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert dev.use_bf16(True, cpu) is True


def test_inference_context_modes():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    cpu = torch.device("cpu")
    with dev.inference_context(cpu, bf16=False):
        assert torch.is_inference_mode_enabled()
        assert (a @ b).dtype == torch.float32
    with dev.inference_context(cpu, bf16=True):
        assert torch.is_inference_mode_enabled()
        assert (a @ b).dtype == torch.bfloat16  # autocast is on
    assert not torch.is_inference_mode_enabled()


def _model_dir(tmp_path, files):
    path = tmp_path / "m"
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_check_model_dir_names_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        specs.check_model_dir(tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        specs.check_model_dir(tmp_path / "file")
    empty = _model_dir(tmp_path, {})
    with pytest.raises(ValueError, match=f"{empty} has no config.json"):
        specs.check_model_dir(empty)
    (empty / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        specs.check_model_dir(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "blip"}))
    with pytest.raises(ValueError, match="has no weights"):
        specs.check_model_dir(empty)
    (empty / "model.safetensors").write_bytes(b"")
    assert specs.check_model_dir(empty, need_processor=False) == empty
    with pytest.raises(ValueError, match="no image processor"):
        specs.check_model_dir(empty)
    (empty / "preprocessor_config.json").write_text("{}")
    with pytest.raises(ValueError, match="no tokenizer"):
        specs.check_model_dir(empty)
    (empty / "tokenizer.json").write_text("{}")
    assert specs.check_model_dir(empty) == empty


def test_local_spec_detection(tmp_path):
    assert specs.is_local_spec(tmp_path)
    assert specs.is_local_spec("./models/x") and specs.is_local_spec("/abs/x") and specs.is_local_spec("~/x")
    assert not specs.is_local_spec("Salesforce/blip-itm-large-coco")
