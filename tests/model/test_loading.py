"""model/loading.py: a model directory that cannot be loaded is a ValueError naming it, and no
error message ever suggests torch.load(weights_only=False)."""
import shutil

import pytest
import torch

from capfilt.model.loading import load_hf_model, loader_error


class NotAWeight:
    """A pickled global that torch.load(weights_only=True) refuses."""


def test_a_pickled_checkpoint_is_refused_without_weights_only_false_advice(tiny_models, tmp_path):
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    model_dir = shutil.copytree(tiny_models["itm"], tmp_path / "itm")
    (model_dir / "model.safetensors").unlink()
    torch.save({"w": NotAWeight()}, model_dir / "pytorch_model.bin")
    with pytest.raises(ValueError) as exc:
        load_hf_model(BlipForImageTextRetrieval, BlipProcessor, model_dir, torch.device("cpu"))
    message = str(exc.value)
    assert message.startswith(f"cannot load BlipForImageTextRetrieval from {model_dir!r}: UnpicklingError: "
                              "Unsupported global: GLOBAL")
    assert "NotAWeight" in message
    assert "weights_only" not in message and "False" not in message


def test_loader_error_keeps_the_cause_and_drops_only_the_advice():
    advice = ("Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely "
              "succeed, but it can result in arbitrary code execution. The file is 3 bytes long.")
    assert loader_error(OSError(advice)) == "OSError: Weights only load failed. The file is 3 bytes long."
    assert loader_error(ValueError("x" * 500), limit=10) == "ValueError: " + "x" * 10
    assert loader_error(KeyError()) == "KeyError: no detail"
