"""The seeded nucleus captioner (model/captioner.py) on the tiny random BLIP captioner."""
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BlipForConditionalGeneration

from capfilt.model.builders import tiny
from capfilt.model.inference.captioner import Captioner

REPO = Path(__file__).resolve().parents[3]
SHORT = dict(max_length=12, min_length=4)  # keep decoding cheap


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(64, 64), (80, 48), (40, 72)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 3], 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def captioner(tiny_models):
    torch.set_num_threads(1)
    return Captioner.from_pretrained(tiny_models["captioner"], device="cpu")


def test_returns_n_captions_per_image_with_prompt_stripped(captioner):
    out = captioner.caption(_images(3), ["a", "b", "c"], n=4, seed=0, **SHORT)
    assert len(out) == 3 and all(len(caps) == 4 for caps in out)
    assert all(isinstance(c, str) and c for caps in out for c in caps)
    assert not any(c.startswith("a picture of") for caps in out for c in caps)
    # four samples of one image are not all the same string
    assert all(len(set(caps)) > 1 for caps in out)


def test_batch_size_and_order_do_not_change_captions(captioner):
    images = _images(8)
    keys = [f"sample-{i:03d}" for i in range(8)]
    reference = dict(zip(keys, captioner.caption(images, keys, n=2, seed=5, **SHORT)))
    order = list(range(8))
    random.Random(0).shuffle(order)
    for batch_size in (1, 3, 8):
        got = {}
        for start in range(0, 8, batch_size):
            idx = order[start:start + batch_size]
            out = captioner.caption([images[i] for i in idx], [keys[i] for i in idx], n=2, seed=5, **SHORT)
            got.update({keys[i]: caps for i, caps in zip(idx, out)})
        assert got == reference, f"batch size {batch_size}"


def test_seed_and_key_select_the_stream(captioner):
    images = _images(3)
    a = captioner.caption(images, ["x", "y", "z"], n=2, seed=1, **SHORT)
    assert captioner.caption(images, ["x", "y", "z"], n=2, seed=1, **SHORT) == a
    assert captioner.caption(images, ["x", "y", "z"], n=2, seed=2, **SHORT) != a
    # the stream belongs to the key: same image under another key samples differently
    assert captioner.caption(images, ["x2", "y2", "z2"], n=2, seed=1, **SHORT) != a
    # caption i of a key does not depend on n
    assert [caps[:2] for caps in captioner.caption(images, ["x", "y", "z"], n=3, seed=1, **SHORT)] == a


def test_top_p_zero_equals_transformers_greedy(captioner):
    images = _images(2)
    settings = dict(max_length=14, min_length=8, repetition_penalty=1.3)
    ours = captioner.caption(images, ["p", "q"], n=2, seed=3, top_p=0.0, **settings)
    # HF's own path: BlipForConditionalGeneration.generate, greedy, one row per image
    proc, model = captioner.processor, captioner.model
    inputs = proc(images=images, text=["a picture of "] * 2, return_tensors="pt")
    with torch.inference_mode():
        seqs = model.generate(**inputs, do_sample=False, num_beams=1, **settings)
    prompt_len = inputs["input_ids"].shape[1] - 1  # generate drops the prompt's [SEP]
    greedy = proc.tokenizer.batch_decode(seqs[:, prompt_len:], skip_special_tokens=True)
    assert ours == [[greedy[0].strip()] * 2, [greedy[1].strip()] * 2]
    full = proc.tokenizer.batch_decode(seqs, skip_special_tokens=True)
    assert all(text.startswith("a picture of") for text in full)


def test_top_k_50_is_the_default_and_cuts_the_random_models_wide_nucleus(captioner):
    """BLIP sampled with transformers 4.15's top_k=50 before top-p; on the random tiny model
    the 0.9 nucleus is far wider than 50 tokens, so the cut changes the captions."""
    images, keys = _images(4), ["k0", "k1", "k2", "k3"]
    default = captioner.caption(images, keys, n=3, seed=2, **SHORT)
    assert captioner.caption(images, keys, n=3, seed=2, top_k=50, **SHORT) == default
    assert captioner.caption(images, keys, n=3, seed=2, top_k=0, **SHORT) != default
    # per sample, whatever shares its batch: the last two keys alone, in the other order
    assert captioner.caption(images[:1:-1], keys[:1:-1], n=3, seed=2, **SHORT) == default[:1:-1]
    # top-k 1 leaves one token for top-p to keep: greedy decoding
    settings = dict(max_length=14, min_length=8, repetition_penalty=1.3)
    assert (captioner.caption(images[:2], keys[:2], n=2, seed=2, top_k=1, **settings)
            == captioner.caption(images[:2], keys[:2], n=2, seed=2, top_p=0.0, top_k=0, **settings))
    with pytest.raises(ValueError, match="top_k must be an int >= 0"):
        captioner.caption(images, keys, n=1, seed=0, top_k=-1)


def test_image_encoded_once_whatever_n(captioner):
    calls = []
    hook = captioner.model.vision_model.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(out.last_hidden_state.shape[0]), with_kwargs=True
    )
    try:
        for n in (1, 5):
            calls.clear()
            captioner.caption(_images(3), ["a", "b", "c"], n=n, seed=0, **SHORT)
            assert calls == [3], f"n={n}: vision forwards {calls}"
    finally:
        hook.remove()


def test_input_errors(captioner):
    images = _images(2)
    with pytest.raises(ValueError, match="2 images but 1 keys"):
        captioner.caption(images, ["a"], n=1, seed=0)
    with pytest.raises(ValueError, match="n \\(captions per image\\)"):
        captioner.caption(images, ["a", "b"], n=0, seed=0)
    with pytest.raises(ValueError, match="top_p"):
        captioner.caption(images, ["a", "b"], n=1, seed=0, top_p=1.5)
    with pytest.raises(ValueError, match="min_length"):
        captioner.caption(images, ["a", "b"], n=1, seed=0, min_length=40, max_length=30)
    with pytest.raises(ValueError, match=r"images\[1\] is a ndarray"):
        captioner.caption([images[0], np.zeros((8, 8, 3))], ["a", "b"], n=1, seed=0)
    with pytest.raises(ValueError, match="leaves no room"):
        captioner.caption(images, ["a", "b"], n=1, seed=0, max_length=4, min_length=0)
    with pytest.raises(ValueError, match="keys must be strings"):
        captioner.caption(images, ["a", 7], n=1, seed=0)
    assert captioner.caption([], [], n=3, seed=0) == []


def test_grayscale_images_are_converted(captioner):
    gray = _images(1)[0].convert("L")
    assert len(captioner.caption([gray], ["g"], n=1, seed=0, **SHORT)[0]) == 1


def test_missing_and_corrupt_directories(tiny_models, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Captioner.from_pretrained(tmp_path / "nowhere", device="cpu")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["captioner"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated download
    with pytest.raises(ValueError, match="broken"):
        Captioner.from_pretrained(broken, device="cpu")
    no_processor = tmp_path / "no_processor"
    shutil.copytree(tiny_models["captioner"], no_processor)
    for name in ("preprocessor_config.json", "processor_config.json"):
        (no_processor / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match="no image processor"):
        Captioner.from_pretrained(no_processor, device="cpu")
    wrong = tmp_path / "wrong"
    shutil.copytree(tiny_models["itm"], wrong)  # an ITM checkpoint has no text decoder
    with pytest.raises(ValueError, match="missing weights"):
        Captioner.from_pretrained(wrong, device="cpu")


def test_real_size_config_loads_through_the_same_path(tiny_tokenizer, tmp_path):
    """blip-image-captioning-large's config, with 1 vision and 1 text layer to stay fast."""
    spec = json.loads((REPO / "benchmarks/configs/blip-image-captioning-large.json").read_text())
    config = spec["config"]
    config["vision_config"]["num_hidden_layers"] = 1
    config["text_config"]["num_hidden_layers"] = 1
    tiny_keys = tiny.load_config("captioner")
    for part in ("vision_config", "text_config"):  # nothing of the tiny config survives the merge
        assert set(tiny_keys[part]) <= set(config[part]), part
    out = tiny.init_model("captioner", tmp_path / "large", tokenizer_dir=tiny_tokenizer, overrides=config)
    large = Captioner.from_pretrained(out, device="cpu")
    loaded = large.model.config
    for part in ("vision_config", "text_config"):
        for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers"):
            assert getattr(getattr(loaded, part), key) == config[part][key], (part, key)
    assert loaded.vision_config.image_size == 384 and loaded.text_config.encoder_hidden_size == 1024
    assert isinstance(large.model, BlipForConditionalGeneration)
    out = large.caption(_images(1), ["k"], n=2, seed=0, max_length=8, min_length=2)
    assert len(out[0]) == 2
