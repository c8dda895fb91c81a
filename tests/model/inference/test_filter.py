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


def _per_pair_reference(flt, images, captions, first_id=None):
    """HF's plain forward, one call per (image, caption) and head, as a naive user would; with
    ``first_id`` the BLIP ITM call gets its first input id replaced by hand (BLIP's [ENC])."""
    model, out = flt.model, []
    with torch.inference_mode():
        for image, caps in zip(images, captions):
            pixels = flt.pixel_values([image])
            itm, itc = [], []
            for caption in caps:
                ids, mask = flt.tokenize([caption])
                if isinstance(flt, BlipFilter):
                    itm_ids = ids.clone()
                    if first_id is not None:
                        itm_ids[0, 0] = first_id
                    itm.append(model(input_ids=itm_ids, pixel_values=pixels, attention_mask=mask,
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


def _enc_id(flt):
    """[ENC]'s id, read from the filter's tokenizer files (BLIP appends [DEC], then [ENC])."""
    tokenizer = flt.processor.tokenizer
    enc_id = tokenizer.convert_tokens_to_ids("[ENC]")
    assert enc_id == len(tokenizer) - 1 == tokenizer.convert_tokens_to_ids("[DEC]") + 1
    return enc_id


@pytest.mark.parametrize("kind", ["itm", "blip2-itm"])
def test_encode_once_equals_per_pair_forward(filters, kind):
    flt = filters[kind]
    images = _images(3)
    scores = flt.score(images, CAPTIONS)
    # BLIP's ITM reads [ENC] first (the default); BLIP-2's Q-Former reads [CLS]
    reference = _per_pair_reference(flt, images, CAPTIONS, _enc_id(flt) if kind == "itm" else None)
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


# --- the ITM text's first token ([ENC] as BLIP, or [CLS] as transformers) --------------------------

@pytest.fixture(scope="module")
def blip_by_token(tiny_models):
    """{(itm_first_token, fast): BlipFilter} on the tiny ITM model."""
    return {(first, fast): load_filter(tiny_models["itm"], device="cpu", itm_first_token=first, fast=fast)
            for first in ("enc", "cls") for fast in (True, False)}


def test_enc_scores_equal_a_direct_call_with_the_first_id_swapped_and_cls_gives_the_old_scores(blip_by_token):
    images = _images(3)
    enc, cls = blip_by_token["enc", False], blip_by_token["cls", False]
    assert (enc.itm_first_token, cls.itm_first_token) == ("enc", "cls")
    swapped = _per_pair_reference(enc, images, CAPTIONS, first_id=_enc_id(enc))
    plain = _per_pair_reference(cls, images, CAPTIONS)  # transformers' forward as it is: [CLS] first
    gaps = []
    for e, c, (ref_itm, ref_itc), (old_itm, old_itc) in zip(enc.score(images, CAPTIONS), cls.score(images, CAPTIONS),
                                                              swapped, plain):
        np.testing.assert_allclose(e.itm, ref_itm, atol=1e-5, rtol=0)
        np.testing.assert_allclose(c.itm, old_itm, atol=1e-5, rtol=0)
        # the ITC pass reads [CLS] either way, as BLIP's unimodal text encoder does
        np.testing.assert_allclose(e.itc, c.itc, atol=1e-6, rtol=0)
        np.testing.assert_allclose(e.itc, ref_itc, atol=1e-5, rtol=0)
        gaps.extend(np.abs(e.itm - c.itm))
    assert min(gaps) > 1e-3  # the first token does change every ITM score


@pytest.mark.parametrize("first", ["enc", "cls"])
def test_fast_path_equals_the_plain_per_pair_call_with_the_same_first_token(blip_by_token, first):
    images = _images(3)
    fast, plain = blip_by_token[first, True], blip_by_token[first, False]
    reference = _per_pair_reference(plain, images, CAPTIONS, _enc_id(plain) if first == "enc" else None)
    for got, want, (itm, itc) in zip(fast.score(images, CAPTIONS), plain.score(images, CAPTIONS), reference):
        np.testing.assert_allclose(got.itm, want.itm, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.itm, itm, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.itc, itc, atol=1e-5, rtol=0)


def test_a_vocabulary_without_enc_scores_with_cls_and_says_so(tiny_models, tmp_path, caplog):
    """A tokenizer without [ENC] (and not in BLIP's layout either): [CLS], with a warning."""
    from transformers import BlipProcessor, BertTokenizer

    no_enc = tmp_path / "no_enc"
    shutil.copytree(tiny_models["itm"], no_enc)
    processor = BlipProcessor.from_pretrained(no_enc)
    vocab = {t: i for t, i in processor.tokenizer.get_vocab().items() if t not in ("[ENC]", "[DEC]")}
    assert len(vocab) == len(processor.tokenizer) - 2
    processor.tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_enc / name).unlink()
    processor.save_pretrained(no_enc)
    with caplog.at_level("WARNING", logger="capfilt.model.tokens"):
        flt = load_filter(no_enc, device="cpu")
    assert flt.itm_first_token == "cls" and flt.first_token.asked == "enc"
    assert "ITM text starts with [CLS], not [ENC]: the tokenizer has no [ENC] token" in caplog.text
    images = _images(2)
    cls = load_filter(tiny_models["itm"], device="cpu", itm_first_token="cls")
    for a, b in zip(flt.score(images, CAPTIONS[:2]), cls.score(images, CAPTIONS[:2])):
        np.testing.assert_allclose(a.itm, b.itm, atol=1e-6)


def test_blip2_reads_cls_whatever_is_asked_and_bad_choices_are_refused(filters, tiny_models):
    asked_enc = filters["blip2-itm"]
    asked_cls = load_filter(tiny_models["blip2-itm"], device="cpu", itm_first_token="cls")
    assert asked_enc.itm_first_token == asked_cls.itm_first_token == "cls"
    images = _images(2)
    for a, b in zip(asked_enc.score(images, CAPTIONS[:2]), asked_cls.score(images, CAPTIONS[:2])):
        np.testing.assert_array_equal(a.itm, b.itm)
    with pytest.raises(ValueError, match=r"itm_first_token must be one of \('enc', 'cls'\), got 'sep'"):
        load_filter(tiny_models["itm"], device="cpu", itm_first_token="sep")
