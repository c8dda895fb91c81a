"""The open_clip ranker (model/ranker.py): encode-once cosines, top-k, spec parsing."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capfilt.model.builders import tiny
from capfilt.model.inference.ranker import ClipRanker
from capfilt.model.specs import open_clip_args as parse_spec

REPO = Path(__file__).resolve().parents[3]
CAPTIONS = [["a red circle", "a blue square on the right", "junk dsc123 jpg"], ["green star"], []]


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (64, 48 + 16 * i, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def ranker(tiny_models):
    torch.set_num_threads(1)
    return ClipRanker.load(str(tiny_models["clip"]), device="cpu")


def test_scores_equal_open_clip_per_pair_forward(ranker):
    images = _images(3)
    scores = ranker.score(images, CAPTIONS)
    assert [s.shape for s in scores] == [(3,), (1,), (0,)]
    assert all(s.dtype == np.float32 for s in scores)
    with torch.inference_mode():
        for image, caps, got in zip(images, CAPTIONS, scores):
            for j, caption in enumerate(caps):
                image_features, text_features, _ = ranker.model(
                    ranker.preprocess(image)[None], ranker.tokenizer([caption])
                )  # open_clip's forward normalises both
                assert got[j] == pytest.approx((image_features @ text_features.T).item(), abs=1e-5)
    assert len({float(v) for s in scores for v in s}) == 4


def test_embeddings_are_normalised(ranker):
    images = ranker.encode_images(_images(2))
    texts = ranker.encode_texts(["a red circle", "a green star", "x"])
    assert images.shape == (2, 128) and texts.shape == (3, 128)
    assert images.dtype == np.float32 and texts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    score = ranker.score(_images(2)[:1], [["a green star"]])[0][0]
    assert score == pytest.approx(float(images[0] @ texts[1]), abs=1e-5)


def test_encode_texts_names_what_it_got(ranker):
    with pytest.raises(ValueError, match="non-empty list of strings, got str 'a red star'"):
        ranker.encode_texts("a red star")  # one string, not a list of captions
    with pytest.raises(ValueError, match="got list '\\[\\]'"):
        ranker.encode_texts([])


def test_each_image_encoded_once(ranker):
    calls = []
    hook = ranker.model.visual.register_forward_hook(lambda module, args, out: calls.append(out.shape[0]))
    try:
        ranker.score(_images(2), [["web"] + [f"synthetic {i}" for i in range(10)]] * 2)
    finally:
        hook.remove()
    assert calls == [2]


def test_top_k_is_stable_and_puts_nan_last():
    scores = np.array([0.1, 0.5, 0.5, np.nan, 0.2, 0.5], dtype=np.float32)
    assert ClipRanker.top_k(scores, 4).tolist() == [1, 2, 5, 4]
    assert ClipRanker.top_k(scores, 10).tolist() == [1, 2, 5, 4, 0, 3]
    assert ClipRanker.top_k(scores, 0).tolist() == []
    assert ClipRanker.top_k([], 2).tolist() == []
    assert ClipRanker.top_k([0.3, 0.9], 1).dtype == np.int64
    with pytest.raises(ValueError, match="1-D"):
        ClipRanker.top_k(np.zeros((2, 2)), 1)
    with pytest.raises(ValueError, match="non-negative"):
        ClipRanker.top_k(scores, -1)


def test_spec_parsing(tiny_models, tmp_path):
    clip_dir = tiny_models["clip"]
    assert parse_spec(str(clip_dir)) == ("local-dir:" + str(clip_dir), None)
    assert parse_spec("local-dir:" + str(clip_dir)) == ("local-dir:" + str(clip_dir), None)
    assert parse_spec("ViT-L-14:openai") == ("ViT-L-14", "openai")
    assert parse_spec("ViT-B-32:/weights/clip.safetensors") == ("ViT-B-32", "/weights/clip.safetensors")
    assert parse_spec("hf-hub:laion/CLIP-ViT-L-14-laion2B-s32B-b82K") == (
        "hf-hub:laion/CLIP-ViT-L-14-laion2B-s32B-b82K", None)
    with pytest.raises(ValueError, match="NAME:PRETRAINED"):
        parse_spec("ViT-L-14")
    with pytest.raises(ValueError, match="does not exist"):
        parse_spec(str(tmp_path / "absent"))
    no_weights = tmp_path / "no_weights"
    shutil.copytree(clip_dir, no_weights)
    (no_weights / "open_clip_model.safetensors").unlink()
    with pytest.raises(ValueError, match="no weights file"):
        parse_spec(str(no_weights))
    with pytest.raises(ValueError, match="no open_clip_config.json"):
        parse_spec(str(tiny_models["itm"]))


def test_load_errors_name_the_spec(tiny_models, tmp_path):
    broken = tmp_path / "broken_clip"
    shutil.copytree(tiny_models["clip"], broken)
    (broken / "open_clip_model.safetensors").write_bytes(b"\x00" * 32)
    with pytest.raises(ValueError, match="broken_clip"):
        ClipRanker.load(str(broken), device="cpu")
    with pytest.raises(ValueError, match="ViT-L-14:no-such-tag"):
        ClipRanker.load("ViT-L-14:no-such-tag", device="cpu")


def test_input_errors(ranker):
    with pytest.raises(ValueError, match="2 images but 1 caption lists"):
        ranker.score(_images(2), [["a"]])
    with pytest.raises(ValueError, match="list of strings"):
        ranker.score(_images(1), ["a caption"])
    with pytest.raises(ValueError, match="non-empty list"):
        ranker.encode_texts("a caption")
    assert ranker.score([], []) == []


def test_real_size_config_loads_through_the_same_path(tmp_path):
    """open_clip ViT-L-14 widths and image size, 1 layer per tower to stay fast."""
    config = json.loads((REPO / "benchmarks/configs/open_clip-ViT-L-14.json").read_text())["config"]
    config["model_cfg"]["vision_cfg"]["layers"] = 1
    config["model_cfg"]["text_cfg"]["layers"] = 1
    tiny_cfg = tiny.load_config("clip")["model_cfg"]
    for part in ("vision_cfg", "text_cfg"):
        assert set(tiny_cfg[part]) <= set(config["model_cfg"][part]), part
    out = tiny.init_model("clip", tmp_path / "vit_l_14", overrides=config)
    ranker = ClipRanker.load(str(out), device="cpu")
    assert ranker.model.visual.image_size == (224, 224)
    assert ranker.encode_images(_images(1)).shape == (1, 768)
    assert ranker.score(_images(1), [["a", "b"]])[0].shape == (2,)
