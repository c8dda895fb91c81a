"""Encode-once ITM/ITC filters (model/filter.py) against transformers' per-pair forward."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capfilt.model.builders import tiny
from capfilt.model.inference.filter import Blip2Filter, BlipFilter, CaptionScores, load_filter

REPO = Path(__file__).resolve().parents[3]
CAPTIONS = [
    ["a red circle on the left", "a small blue square", "green", ""],
    ["a big yellow triangle at the top near a purple star"],
    [" ".join(["an orange cross in the middle of a grey gradient"] * 6),  # > 35 tokens: truncated
     "two shapes", "a photo"],
]


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (64 + 8 * i, 64, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def filters(tiny_models):
    torch.set_num_threads(1)
    return {kind: load_filter(tiny_models[kind], device="cpu") for kind in ("itm", "blip2-itm")}


def _per_pair_reference(flt, images, captions):
    """HF's plain forward, one call per (image, caption) and head, as a naive user would."""
    model, out = flt.model, []
    with torch.inference_mode():
        for image, caps in zip(images, captions):
            pixels = flt.pixel_values([image])
            itm, itc = [], []
            for caption in caps:
                ids, mask = flt.tokenize([caption])
                if isinstance(flt, BlipFilter):
                    itm.append(model(input_ids=ids, pixel_values=pixels, attention_mask=mask,
                                     use_itm_head=True).itm_score.softmax(-1)[0, 1].item())
                    itc.append(model(input_ids=ids, pixel_values=pixels, attention_mask=mask,
                                     use_itm_head=False).itm_score[0, 0].item())
                else:
                    if model.config.image_token_index is not None:  # Blip2Processor's query placeholders
                        queries = model.config.num_query_tokens
                        ids = torch.cat([torch.full((1, queries), model.config.image_token_index), ids], 1)
                        mask = torch.cat([torch.ones(1, queries, dtype=mask.dtype), mask], 1)
                    itm.append(model(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                                     use_image_text_matching_head=True).logits_per_image.softmax(-1)[0, 1].item())
                    itc.append(model(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                                     use_image_text_matching_head=False).logits_per_image[0, 0].item())
            out.append((np.array(itm), np.array(itc)))
    return out


@pytest.mark.parametrize("kind", ["itm", "blip2-itm"])
def test_encode_once_equals_per_pair_forward(filters, kind):
    flt = filters[kind]
    images = _images(3)
    scores = flt.score(images, CAPTIONS)
    reference = _per_pair_reference(flt, images, CAPTIONS)
    assert len(scores) == 3
    for got, (itm, itc), caps in zip(scores, reference, CAPTIONS):
        assert isinstance(got, CaptionScores)
        assert got.itm.dtype == np.float32 and got.itc.dtype == np.float32
        assert got.itm.shape == got.itc.shape == (len(caps),)
        np.testing.assert_allclose(got.itm, itm, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.itc, itc, atol=1e-5, rtol=0)
        assert ((got.itm > 0) & (got.itm < 1)).all() and (np.abs(got.itc) <= 1 + 1e-6).all()
    # the scores do tell captions apart (not a constant)
    assert len({float(v) for s in scores for v in s.itm}) > 3


def test_blip2_with_image_token_placeholders_matches_too(filters):
    """blip2-itm-vit-g's published config sets image_token_index: HF's forward then expects the
    query placeholders in front of the text. The filter's scores are the same either way."""
    flt = filters["blip2-itm"]
    images = _images(2)
    plain = flt.score(images, CAPTIONS[:2])
    flt.model.config.image_token_index = flt.processor.tokenizer.convert_tokens_to_ids("[ENC]")
    try:
        reference = _per_pair_reference(flt, images, CAPTIONS[:2])
    finally:
        flt.model.config.image_token_index = None
    for got, (itm, itc) in zip(plain, reference):
        np.testing.assert_allclose(got.itm, itm, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.itc, itc, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["itm", "blip2-itm"])
def test_vision_tower_runs_once_per_image(filters, kind):
    flt = filters[kind]
    calls = []
    hook = flt.model.vision_model.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(out.last_hidden_state.shape[0]), with_kwargs=True
    )
    try:
        flt.score(_images(2), [["web caption"] + [f"synthetic {i}" for i in range(10)]] * 2)
    finally:
        hook.remove()
    assert calls == [2]


@pytest.mark.parametrize("kind", ["itm", "blip2-itm"])
def test_scores_do_not_depend_on_the_batch(filters, kind):
    flt = filters[kind]
    images = _images(3)
    together = flt.score(images, CAPTIONS)
    small_batches = type(flt)(flt.model, flt.processor, flt.device, text_batch_size=2)
    for b in (2, 0):
        alone = small_batches.score([images[b]], [CAPTIONS[b]])[0]
        np.testing.assert_allclose(alone.itm, together[b].itm, atol=1e-5, rtol=0)
        np.testing.assert_allclose(alone.itc, together[b].itc, atol=1e-5, rtol=0)


def test_empty_inputs(filters):
    flt = filters["itm"]
    assert flt.score([], []) == []
    out = flt.score(_images(2), [[], ["a caption"]])
    assert out[0].itm.shape == (0,) and out[0].itm.dtype == np.float32
    assert out[1].itm.shape == (1,)
    none = flt.score(_images(1), [[]])
    assert none[0].itc.shape == (0,)


def test_input_errors(filters):
    flt = filters["itm"]
    with pytest.raises(ValueError, match="2 images but 1 caption lists"):
        flt.score(_images(2), [["a"]])
    with pytest.raises(ValueError, match=r"captions_per_image\[0\]\[1\]"):
        flt.score(_images(1), [["a", None]])
    with pytest.raises(ValueError, match=r"captions_per_image\[0\] is a string"):
        flt.score(_images(1), ["a caption"])


def test_load_filter_picks_the_class_from_the_config(filters, tiny_models, tmp_path):
    assert type(filters["itm"]) is BlipFilter
    assert type(filters["blip2-itm"]) is Blip2Filter
    with pytest.raises(ValueError, match="not an ITM model"):
        load_filter(tiny_models["captioner"], device="cpu")
    with pytest.raises(ValueError, match="no config.json"):
        load_filter(tiny_models["clip"], device="cpu")
    with pytest.raises(ValueError, match="does not exist"):
        load_filter(tmp_path / "missing", device="cpu")
    odd = tmp_path / "odd"
    shutil.copytree(tiny_models["itm"], odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "model_type": "clip"}))
    with pytest.raises(ValueError, match="model_type 'clip'"):
        load_filter(odd, device="cpu")


def test_corrupt_weights_are_a_clear_error(tiny_models, tmp_path):
    broken = tmp_path / "broken_itm"
    shutil.copytree(tiny_models["itm"], broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="broken_itm"):
        load_filter(broken, device="cpu")


@pytest.mark.parametrize("kind,config_file,depth_key", [
    ("itm", "blip-itm-large-coco.json", "text_config"),
    ("blip2-itm", "blip2-itm-vit-g.json", "qformer_config"),
])
def test_real_size_config_loads_through_the_same_path(tiny_tokenizer, tmp_path, kind, config_file, depth_key):
    """The published configs with their widths and image sizes, 1-2 layers deep to stay fast."""
    config = json.loads((REPO / "benchmarks/configs" / config_file).read_text())["config"]
    config["vision_config"]["num_hidden_layers"] = 1
    config[depth_key]["num_hidden_layers"] = 2 if kind == "blip2-itm" else 1
    tiny_config = tiny.load_config(kind)
    for part in ("vision_config", depth_key):
        assert set(tiny_config[part]) <= set(config[part]), part
    out = tiny.init_model(kind, tmp_path / kind, tokenizer_dir=tiny_tokenizer, overrides=config)
    flt = load_filter(out, device="cpu")
    vision = flt.model.config.vision_config
    assert (vision.hidden_size, vision.image_size) == (config["vision_config"]["hidden_size"],
                                                       config["vision_config"]["image_size"])
    scores = flt.score(_images(1), [["a web caption", "a synthetic caption"]])
    assert scores[0].itm.shape == (2,) and np.isfinite(scores[0].itc).all()
