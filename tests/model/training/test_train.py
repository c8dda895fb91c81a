"""The training loop, the three architectures and their exports, on micro models.

Micro models (1 layer, width 32, 32 px) are the tiny configs with overrides, so a step takes a
few tens of milliseconds; the 16-row human split of the `synth_world` fixture is the data.
"""
import json
import math
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from capfilt.jobs.cli import main
from capfilt.model.training.data import ImageTextStream, SourceSpec, TrainPair
from capfilt.model.training.blip import BlipTrainConfig
from capfilt.model.training.loop import TrainConfig, Trainer

VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
          "image_size": 32, "patch_size": 8}
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
MICRO = {
    "blip": {"vision_config": VISION, "text_config": TEXT, "image_text_hidden_size": 32, "projection_dim": 32},
    "blip2": {"vision_config": VISION, "qformer_config": dict(TEXT, encoder_hidden_size=32),
              "num_query_tokens": 4, "image_text_hidden_size": 32},
    "clip": {"model_cfg": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32,
                                                            "head_width": 16, "layers": 1},
                           "text_cfg": {"width": 32, "heads": 2, "layers": 1}}},
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(arch, work_dir, tokenizer, **cfg):
    if arch == "blip":
        from capfilt.model.training.blip import BlipTrainConfig, build_blip

        return build_blip(BlipTrainConfig(**cfg), work_dir, tokenizer_dir=tokenizer, overrides=MICRO["blip"])
    if arch == "blip2":
        from capfilt.model.training.blip2 import Blip2TrainConfig, build_blip2

        return build_blip2(Blip2TrainConfig(**cfg), work_dir, tokenizer_dir=tokenizer, overrides=MICRO["blip2"])
    from capfilt.model.training.clip import build_clip

    return build_clip(work_dir, overrides=MICRO["clip"])


def run(model, data, out, **cfg):
    cfg = TrainConfig(out_dir=str(out), progress=False, shuffle_buffer=16, **cfg)
    Trainer(model, [SourceSpec(str(data))], cfg).train()
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


# Overfitting the 16 clean pairs (one batch = the whole set): mean of the last 5 steps vs the
# first 5, per loss. ITM starts at the constant predictor's 0.64 (one positive in three); from a
# random init it does not leave that plateau with BLIP's hard negatives (docs/training.md,
# "Learning from scratch"), so these runs draw ITM negatives uniformly throughout.
OVERFIT = {
    "blip": (dict(tasks=("itc", "itm", "lm"), itm_random_steps=10_000), 200, {"itc": 4.0, "lm": 2.0, "itm": 1.5}),
    "blip2": (dict(tasks=("itc", "itm", "itg"), itm_random_steps=10_000), 400, {"itc": 4.0, "itg": 2.0, "itm": 1.5}),
    "clip": ({}, 100, {"clip": 4.0}),
}


@pytest.mark.parametrize("arch", ["blip", "blip2", "clip"])
def test_overfit_16_samples(arch, tmp_path, synth_world, tiny_tokenizer):
    model_cfg, steps, factors = OVERFIT[arch]
    model = build(arch, tmp_path, tiny_tokenizer, **model_cfg)
    logs = run(model, synth_world / "human", tmp_path, steps=steps, batch_size=16, lr=1e-2, warmup=10,
               log_every=1, weight_decay=0.0)
    ratios = {}
    for name in factors:
        first, last = np.mean([r[name] for r in logs[:5]]), np.mean([r[name] for r in logs[-5:]])
        ratios[name] = (float(first), float(last))
    print(arch, ratios)
    for name, factor in factors.items():
        first, last = ratios[name]
        assert first >= factor * last, f"{arch} {name}: {first} -> {last} (< x{factor})"


def _cli(out, tokenizer, config_file, data, *extra):
    return main(["pretrain", "--arch", "blip", "--data", str(data), "--out", str(out), "--tokenizer", str(tokenizer),
                 "--model-config", str(config_file), "--batch-size", "4", "--lr", "1e-3", "--warmup", "3",
                 "--momentum", "--queue-size", "8", "--no-progress", "--log-every", "1", "--shuffle-buffer", "8",
                 "--steps", "20", *extra])


def test_itm_hard_fraction_reaches_the_negative_draw(tmp_path, synth_world, tiny_tokenizer, monkeypatch):
    """--itm-hard-fraction goes from the command line to every hard-negative draw after the
    uniform steps (two draws per step: a text per image and an image per text)."""
    from capfilt.model.training import losses

    seen = []
    real = losses.sample_hard_negatives

    def spy(sim, positive, generator, hard_fraction=1.0, draw="retrieval"):
        seen.append((bool((sim == 0).all()), hard_fraction))
        return real(sim, positive, generator, hard_fraction, draw)

    monkeypatch.setattr(losses, "sample_hard_negatives", spy)
    cfg_file = tmp_path / "micro.json"
    cfg_file.write_text(json.dumps(MICRO["blip"]))
    assert main(["pretrain", "--arch", "blip", "--data", str(synth_world / "web"), "--out", str(tmp_path / "m"),
                 "--tokenizer", str(tiny_tokenizer), "--model-config", str(cfg_file), "--batch-size", "4",
                 "--steps", "4", "--warmup", "1", "--no-progress", "--tasks", "itc,itm",
                 "--itm-random-steps", "2", "--itm-hard-fraction", "0.25"]) == 0
    # steps 0-1 uniform (all-zero similarities), steps 2-3 by similarity with the fraction
    assert seen == [(True, 0.25)] * 4 + [(False, 0.25)] * 4


@pytest.mark.parametrize("first", ["enc", "cls"])
def test_the_itm_loss_and_scores_read_the_asked_first_token(tmp_path, synth_world, tiny_tokenizer, first):
    """BLIP's ITM input starts with [ENC] (blip_pretrain.py, blip_retrieval.py); with cls, [CLS].
    The unimodal (ITC) pass keeps [CLS] either way."""
    model = build("blip", tmp_path, tiny_tokenizer, tasks=("itc", "itm"), itm_first_token=first)
    tok = model.processor.tokenizer
    want = tok.convert_tokens_to_ids("[ENC]") if first == "enc" else tok.cls_token_id
    seen = []
    hook = model.itm.text_encoder.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((kwargs.get("encoder_hidden_states") is not None,
                                             set(kwargs["input_ids"][:, 0].tolist()))), with_kwargs=True)
    images, texts = _pairs(synth_world / "human", n=4)
    batch = model.collate([TrainPair(str(k), i, t, "human") for k, (i, t) in enumerate(zip(images, texts))])
    try:
        model(batch)
        model.score_pairs(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    finally:
        hook.remove()
    assert model.first_token.used == first
    assert [firsts for fused, firsts in seen if fused] == [{want}, {want}]  # the ITM loss, then score_pairs
    assert all(firsts == {tok.cls_token_id} for fused, firsts in seen if not fused)


def test_resume_is_exact(tmp_path, synth_world, tiny_tokenizer):
    """20 straight steps == 10 steps, stop, resume, 10 steps: identical parameters, queue,
    momentum encoder and losses (BLIP with momentum distillation and a queue)."""
    cfg_file = tmp_path / "micro.json"
    cfg_file.write_text(json.dumps(MICRO["blip"]))
    data = synth_world / "web"
    assert _cli(tmp_path / "a", tiny_tokenizer, cfg_file, data, "--checkpoint-every", "10") == 0
    assert _cli(tmp_path / "b", tiny_tokenizer, cfg_file, data, "--stop-after", "10") == 0
    assert not (tmp_path / "b" / "itm").exists()  # stopped runs do not export
    assert _cli(tmp_path / "b", tiny_tokenizer, cfg_file, data, "--resume") == 0
    a = load_file(str(tmp_path / "a/checkpoints/pretrain/step-00000020/model.safetensors"))
    b = load_file(str(tmp_path / "b/checkpoints/pretrain/step-00000020/model.safetensors"))
    assert a.keys() == b.keys() and any("image_queue" in k for k in a) and any("momentum." in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log_a = (tmp_path / "a/pretrain_log.jsonl").read_text().splitlines()
    log_b = (tmp_path / "b/pretrain_log.jsonl").read_text().splitlines()
    losses = lambda lines: [json.loads(x)["loss"] for x in lines]  # noqa: E731
    assert losses(log_a) == losses(log_b) and len(log_a) == 20
    with pytest.raises(ValueError, match="batch_size=4, this run 2"):
        main(["pretrain", "--arch", "blip", "--data", str(data), "--out", str(tmp_path / "b"), "--resume",
              "--tokenizer", str(tiny_tokenizer), "--model-config", str(cfg_file), "--batch-size", "2",
              "--momentum", "--queue-size", "8", "--steps", "30", "--no-progress"])


def _pairs(data, n=6):
    samples = ImageTextStream([SourceSpec(str(data))], seed=0).next_batch(n)
    return [s.image for s in samples], [s.text for s in samples]


def test_blip_exports_load_and_score_like_the_training_model(tmp_path, synth_world, tiny_tokenizer):
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    from capfilt.model.inference.captioner import Captioner
    from capfilt.model.inference.filter import load_filter

    model = build("blip", tmp_path, tiny_tokenizer)
    run(model, synth_world / "human", tmp_path, steps=3, batch_size=4, lr=1e-3)
    images, texts = _pairs(synth_world / "test")
    batch = model.collate([TrainPair(str(k), i, t, "test") for k, (i, t) in enumerate(zip(images, texts))])
    itm, itc = model.score_pairs(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    scores = load_filter(str(tmp_path / "itm"), device="cpu").score(images, [[t] for t in texts])
    assert np.allclose([s.itm[0] for s in scores], itm.numpy(), atol=1e-5)
    assert np.allclose([s.itc[0] for s in scores], itc.numpy(), atol=1e-5)
    hf = BlipForImageTextRetrieval.from_pretrained(str(tmp_path / "itm")).eval()
    enc_ids = batch["input_ids"].clone()
    enc_ids[:, 0] = model.processor.tokenizer.convert_tokens_to_ids("[ENC]")  # trained with BLIP's [ENC]
    assert model.first_token.used == "enc" and bool((batch["input_ids"][:, 0] != enc_ids[:, 0]).all())
    with torch.no_grad():
        out = hf(input_ids=enc_ids, pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"])
    assert torch.allclose(out.itm_score.softmax(-1)[:, 1], itm, atol=1e-5)
    # the captioner export holds the shared decoder: same logits as the training model
    cap = BlipForConditionalGeneration.from_pretrained(str(tmp_path / "captioner")).eval()
    ids = batch["input_ids"].clone()
    ids[:, 0] = cap.config.text_config.bos_token_id
    with torch.no_grad():
        want = model.captioner(pixel_values=batch["pixel_values"], input_ids=ids,
                               attention_mask=batch["attention_mask"]).logits
        got = cap(pixel_values=batch["pixel_values"], input_ids=ids, attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(want, got, atol=1e-5)
    captions = Captioner.from_pretrained(str(tmp_path / "captioner"), device="cpu").caption(
        images[:2], ["k0", "k1"], n=2, seed=0, max_length=12, min_length=2)
    assert len(captions) == 2 and all(isinstance(c, str) for cs in captions for c in cs)
    # shared parameters: the decoder's cross-attention is the encoder's
    enc, dec = model.itm.text_encoder.encoder.layer[0], model.captioner.text_decoder.bert.encoder.layer[0]
    assert dec.crossattention is enc.crossattention and dec.attention is not enc.attention


def test_blip2_export_loads_in_the_filter(tmp_path, synth_world, tiny_tokenizer):
    from capfilt.model.training.blip2 import Blip2TrainConfig, build_blip2
    from capfilt.model.inference.filter import load_filter

    model = build("blip2", tmp_path, tiny_tokenizer)
    run(model, synth_world / "human", tmp_path, steps=3, batch_size=4, lr=1e-3)
    assert (tmp_path / "itm" / "qformer_lm_head.safetensors").is_file()
    model.eval()
    images, texts = _pairs(synth_world / "test")
    pixel = model.processor.image_processor(images, return_tensors="pt")["pixel_values"]
    tok = model.processor.tokenizer(texts, padding="longest", return_tensors="pt")
    itm, itc = model.score_pairs(pixel, tok.input_ids, tok.attention_mask)
    scores = load_filter(str(tmp_path / "itm"), device="cpu").score(images, [[t] for t in texts])
    assert np.allclose([s.itm[0] for s in scores], itm.numpy(), atol=1e-5)
    assert np.allclose([s.itc[0] for s in scores], itc.numpy(), atol=1e-5)
    # the ITG head comes back with the export (its matrix tied to the word embeddings)
    again = build_blip2(Blip2TrainConfig(), tmp_path / "again", init=tmp_path)
    dense = lambda m: m.lm_head.predictions.transform.dense.weight  # noqa: E731
    assert torch.equal(dense(again), dense(model))
    assert again.lm_head.predictions.decoder.weight is again.model.embeddings.word_embeddings.weight


def test_clip_export_loads_in_the_ranker(tmp_path, synth_world, tiny_tokenizer):
    from capfilt.model.inference.ranker import ClipRanker

    model = build("clip", tmp_path, tiny_tokenizer)
    run(model, synth_world / "human", tmp_path, steps=3, batch_size=4, lr=1e-3, bf16=True)
    model.eval()
    images, texts = _pairs(synth_world / "test", 3)
    batch = model.collate([TrainPair(str(k), i, t, "test") for k, (i, t) in enumerate(zip(images, texts))])
    img, txt = model.encode(batch["pixel_values"], batch["text"])
    ranker = ClipRanker.load(str(tmp_path / "clip"), device="cpu")
    assert np.allclose(ranker.encode_images(images), img.numpy(), atol=1e-5)
    assert np.allclose(ranker.encode_texts(texts), txt.numpy(), atol=1e-5)
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert math.isfinite(summary["last"]["loss"]) and summary["exported"] == [str(tmp_path / "clip")]


def test_timm_vit_maps_into_blip_vision_towers(tmp_path):
    import timm
    from safetensors.torch import save_file
    from transformers import Blip2VisionConfig, Blip2VisionModel, BlipVisionConfig, BlipVisionModel

    from capfilt.model.training.vision_init import init_vision_tower

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                            depth=2, num_heads=2, mlp_ratio=2.0, num_classes=0).eval()
    file = tmp_path / "vit.safetensors"
    save_file(vit.state_dict(), str(file))
    dims = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, image_size=32, patch_size=8,
                layer_norm_eps=1e-6)
    pixels = torch.randn(2, 3, 32, 32)
    blip = BlipVisionModel(BlipVisionConfig(num_hidden_layers=2, **dims)).eval()
    init_vision_tower(f"timm:vit_tiny_patch16_224:{file}", blip)
    with torch.no_grad():
        assert torch.allclose(blip(pixel_values=pixels).last_hidden_state, vit.forward_features(pixels), atol=1e-5)
        # BLIP-2: the penultimate block's tokens feed the Q-Former (a fresh LayerNorm on top)
        blip2 = Blip2VisionModel(Blip2VisionConfig(num_hidden_layers=1, **dims)).eval()
        init_vision_tower(f"timm:vit_tiny_patch16_224:{file}", blip2, penultimate=True)
        got = blip2.encoder(inputs_embeds=blip2.embeddings(pixels)).last_hidden_state
        spatial, prefix = vit.forward_intermediates(pixels, indices=[0], return_prefix_tokens=True,
                                                    output_fmt="NLC", intermediates_only=True)[0]
        assert torch.allclose(got, torch.cat([prefix, spatial], 1), atol=1e-5)
    with pytest.raises(ValueError, match="expected timm:NAME"):
        init_vision_tower("resnet50", blip)


def test_hf_tower_for_blip2_is_the_sources_penultimate_block(tmp_path, tiny_tokenizer):
    """`--vision-init hf:DIR` into a BLIP-2 tower: the tower is the source minus its last block
    (it used to copy every layer, the last one included, while logging "penultimate")."""
    from transformers import Blip2VisionConfig, Blip2VisionModel, BlipForImageTextRetrieval

    from capfilt.model.builders import tiny
    from capfilt.model.training.vision_init import init_vision_tower

    src = tiny.init_model("itm", tmp_path / "src", tokenizer_dir=tiny_tokenizer)  # a 3-layer BLIP tower
    vision = BlipForImageTextRetrieval.from_pretrained(str(src)).vision_model
    dims = {k: getattr(vision.config, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                   "image_size", "patch_size")}
    with pytest.raises(ValueError, match=r"source has 3 layers; .*tower has 2 \(it has 3\).*num_hidden_layers\": 2"):
        init_vision_tower(f"hf:{src}", Blip2VisionModel(Blip2VisionConfig(num_hidden_layers=3, **dims)), penultimate=True)
    tower = Blip2VisionModel(Blip2VisionConfig(num_hidden_layers=2, **dims))
    init_vision_tower(f"hf:{src}", tower, penultimate=True)
    for i in range(2):
        assert torch.equal(tower.encoder.layers[i].mlp.fc1.weight, vision.encoder.layers[i].mlp.fc1.weight)


def test_blip2_with_a_frozen_tower_without_hf_form(tmp_path, synth_world, tiny_tokenizer):
    """A timm tower that is not a plain ViT (EVA-02: rotary embeddings) stays a frozen
    PenultimateTower; the Q-Former trains against it and the run exports DIR/qformer."""
    import timm
    from safetensors.torch import save_file

    from capfilt.model.training.blip2 import Blip2TrainConfig, build_blip2

    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=32, num_classes=0)
    save_file({k: v.contiguous() for k, v in eva.state_dict().items()}, str(tmp_path / "eva.safetensors"))
    model = build_blip2(Blip2TrainConfig(), tmp_path, tokenizer_dir=tiny_tokenizer, overrides=MICRO["blip2"],
                        vision_init=f"timm:eva02_tiny_patch14_224:{tmp_path / 'eva.safetensors'}")
    assert model.tower is not None and not any(p.requires_grad for p in model.tower.parameters())
    run(model, synth_world / "human", tmp_path, steps=2, batch_size=4, lr=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(model.tower.trunk.state_dict().values(), eva.state_dict().values()))
    assert (tmp_path / "qformer" / "qformer.safetensors").is_file() and not (tmp_path / "itm").exists()
    assert model.processor.image_processor.size == {"height": 32, "width": 32}  # the tower's input size


def test_towers_the_qformer_cannot_read_are_named(tmp_path):
    """A convnet has no token sequence (timm's constructor takes no img_size), and a missing
    weights file is named as such, for both the mapped and the frozen tower paths."""
    import timm
    from safetensors.torch import save_file
    from transformers import BlipVisionConfig

    from capfilt.model.specs import ModelSpec as VisionSpec
    from capfilt.model.training.vision_init import PenultimateTower, create_timm

    resnet = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in resnet.state_dict().items()}, str(tmp_path / "r.safetensors"))
    with pytest.raises(ValueError, match="not a transformer tower"):
        PenultimateTower.from_spec(f"timm:resnet10t:{tmp_path / 'r.safetensors'}", 224)
    with pytest.raises(ValueError, match="not a vision transformer"):
        create_timm(VisionSpec.parse(f"timm:resnet10t:{tmp_path / 'r.safetensors'}"), BlipVisionConfig())
    with pytest.raises(ValueError, match="weights file .*nofile.safetensors does not exist"):
        PenultimateTower.from_spec(f"timm:eva02_tiny_patch14_224:{tmp_path / 'nofile.safetensors'}", 224)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    with pytest.raises(ValueError, match=r"do not fit .*own sizes pass --model-config .*\"hidden_size\": 192, "
                                         r"\"num_attention_heads\": 3, \"intermediate_size\": 768"):
        create_timm(VisionSpec.parse(f"timm:vit_tiny_patch16_224:{tmp_path / 'vit.safetensors'}"), BlipVisionConfig())
    with pytest.raises(ValueError, match="weights file .*nofile.safetensors does not exist"):
        create_timm(VisionSpec.parse(f"timm:vit_tiny_patch16_224:{tmp_path / 'nofile.safetensors'}"),
                    BlipVisionConfig(hidden_size=192, num_attention_heads=3, intermediate_size=768,
                                     num_hidden_layers=1, image_size=32, patch_size=16))


def test_finetune_makes_separate_captioner_and_filter(tmp_path, synth_world, tiny_tokenizer):
    """`finetune --task caption` and `--task retrieval` from one pretrained directory into one
    --out: two models that no longer share their text layers, each with its own checkpoints."""
    from safetensors.torch import load_file as load

    cfg_file = tmp_path / "micro.json"
    cfg_file.write_text(json.dumps(MICRO["blip"]))
    common = ["--data", str(synth_world / "human"), "--steps", "2", "--batch-size", "4", "--no-progress"]
    assert main(["pretrain", "--arch", "blip", "--out", str(tmp_path / "pre"), "--tokenizer", str(tiny_tokenizer),
                 "--model-config", str(cfg_file), *common]) == 0
    for task in ("caption", "retrieval"):
        assert main(["finetune", "--task", task, "--init", str(tmp_path / "pre"), "--out", str(tmp_path / "ft"),
                     "--lr", "1e-3", *common]) == 0
    ft = tmp_path / "ft"
    assert (ft / "checkpoints" / "finetune-caption" / "latest").is_file()
    assert (ft / "checkpoints" / "finetune-retrieval" / "latest").is_file()
    key = "text_encoder.encoder.layer.0.crossattention.self.query.weight"
    pre_itm, ft_itm = load(str(tmp_path / "pre/itm/model.safetensors")), load(str(ft / "itm/model.safetensors"))
    ft_cap = load(str(ft / "captioner/model.safetensors"))
    pre_cap = load(str(tmp_path / "pre/captioner/model.safetensors"))
    cap_key = "text_decoder.bert.encoder.layer.0.crossattention.self.query.weight"
    assert torch.equal(pre_itm[key], pre_cap[cap_key])  # shared in the pretrained model
    assert not torch.equal(ft_itm[key], ft_cap[cap_key])  # finetuned apart
    assert not torch.equal(ft_itm[key], pre_itm[key]) and not torch.equal(ft_cap[cap_key], pre_cap[cap_key])


def test_cli_errors(tmp_path):
    with pytest.raises(ValueError, match="--queue-size needs --momentum"):
        main(["pretrain", "--arch", "blip", "--data", "x", "--out", str(tmp_path), "--queue-size", "8"])
    with pytest.raises(ValueError, match="--itm-hard-fraction 0.5 needs --itm-negatives hard"):
        main(["pretrain", "--arch", "blip", "--data", "x", "--out", str(tmp_path), "--itm-negatives", "random",
              "--itm-hard-fraction", "0.5"])
    with pytest.raises(ValueError, match="itm_hard_fraction must be in \\[0, 1\\], got 2.0"):
        BlipTrainConfig(itm_hard_fraction=2.0)
    with pytest.raises(ValueError, match="no parquet shards match"):
        main(["pretrain", "--arch", "clip", "--data", str(tmp_path / "none*.parquet"), "--out", str(tmp_path),
              "--steps", "1", "--no-progress"])
    with pytest.raises(ValueError, match="no model directory found"):
        main(["finetune", "--task", "caption", "--init", str(tmp_path), "--data", "x", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="weight must be > 0"):
        main(["pretrain", "--arch", "clip", "--mix", "x.parquet:0", "--out", str(tmp_path), "--no-progress"])


def test_bf16_training_runs_only_where_the_hardware_has_it(tmp_path, synth_world, tiny_tokenizer,
                                                           monkeypatch, caplog):
    from capfilt.model.inference import device as dev

    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: False)
    model = build("clip", tmp_path, tiny_tokenizer)
    with caplog.at_level("WARNING"):
        run(model, synth_world / "human", tmp_path / "emulated", steps=1, batch_size=4, lr=1e-3, bf16=True)
    assert "no native bf16" in caplog.text
    assert json.loads((tmp_path / "emulated" / "train_summary.json").read_text())["bf16"] is False
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: True)
    run(model, synth_world / "human", tmp_path / "native", steps=1, batch_size=4, lr=1e-3, bf16=True)
    assert json.loads((tmp_path / "native" / "train_summary.json").read_text())["bf16"] is True
    run(model, synth_world / "human", tmp_path / "off", steps=1, batch_size=4, lr=1e-3, bf16=False)
    assert json.loads((tmp_path / "off" / "train_summary.json").read_text())["bf16"] is False


# --- defects found by the audit ----------------------------------------------------------------

def _micro_file(tmp_path, arch="blip", **extra):
    path = tmp_path / f"micro_{arch}.json"
    path.write_text(json.dumps({**MICRO[arch], **extra}))
    return path


def test_a_model_directory_without_tokenizer_is_refused(tmp_path, synth_world, tiny_tokenizer):
    """BlipProcessor.from_pretrained builds a 5-token vocabulary when the tokenizer files are
    gone, and training went on with every caption as [UNK]; now it is evaluate's error."""
    from capfilt.model.training.blip2 import Blip2TrainConfig, build_blip2

    build("blip", tmp_path / "work", tiny_tokenizer).export(tmp_path / "P")
    for f in (tmp_path / "P" / "itm").glob("tokenizer*.json"):
        f.unlink()
    common = ["--data", str(synth_world / "human"), "--steps", "1", "--batch-size", "4", "--no-progress"]
    no_tokenizer = (f"model directory {tmp_path / 'P' / 'itm'} has no tokenizer "
                    "\\(expected tokenizer.json or vocab.txt\\)")
    with pytest.raises(ValueError, match=no_tokenizer):
        main(["finetune", "--task", "retrieval", "--init", str(tmp_path / "P"), "--out", str(tmp_path / "F"), *common])
    with pytest.raises(ValueError, match=no_tokenizer):
        main(["pretrain", "--arch", "blip", "--init", str(tmp_path / "P"), "--out", str(tmp_path / "F2"), *common])
    assert not (tmp_path / "F").exists() and not (tmp_path / "F2").exists()
    # BLIP-2 (pretrain --init and finetune both go through build_blip2)
    build("blip2", tmp_path / "work2", tiny_tokenizer).export(tmp_path / "Q")
    (tmp_path / "Q" / "itm" / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=f"{tmp_path / 'Q' / 'itm'} has no tokenizer"):
        build_blip2(Blip2TrainConfig(), tmp_path / "again", init=tmp_path / "Q")


def test_default_cadence_checkpoints_without_changing_the_weights(tmp_path, synth_world, tiny_tokenizer):
    """With no --checkpoint-every a run checkpoints every max(20, steps // 10) steps; the
    checkpoints draw nothing from the RNG, so with dropout on the final weights are those of a
    run that checkpoints only at the end."""
    from capfilt.model.training.blip import build_blip
    from capfilt.model.training.loop import auto_checkpoint_every

    assert [auto_checkpoint_every(n) for n in (3, 25, 250, 800)] == [20, 20, 25, 80]
    assert TrainConfig(out_dir="x", steps=800).checkpoint_interval == 80
    assert TrainConfig(out_dir="x", checkpoint_every=0).checkpoint_interval == 0
    dropout = {**MICRO["blip"], "text_config": {**TEXT, "hidden_dropout_prob": 0.2}}
    finals = {}
    for name, every in (("end_only", 0), ("default", None)):
        model = build_blip(BlipTrainConfig(), tmp_path / name, tokenizer_dir=tiny_tokenizer, overrides=dropout)
        run(model, synth_world / "human", tmp_path / name, steps=25, batch_size=4, lr=1e-3, log_every=5,
            checkpoint_every=every)
        root = tmp_path / name / "checkpoints" / "train"
        finals[name] = load_file(str(root / "step-00000025" / "model.safetensors"))
        assert sorted(p.name for p in root.glob("step-*")) == (
            ["step-00000020", "step-00000025"] if every is None else ["step-00000025"])
    assert finals["default"].keys() == finals["end_only"].keys()
    for key in finals["default"]:
        assert torch.equal(finals["default"][key], finals["end_only"][key]), key


def test_an_interrupted_run_resumes_with_one_log_line_per_step(tmp_path, synth_world, tiny_tokenizer, monkeypatch):
    """Killed at step 7 before any checkpoint: --resume starts again from step 0 and the log
    holds steps 1..10 once (it used to keep the interrupted run's 1..6 before them). Killed at
    step 24 after the step-20 checkpoint: it resumes at 20 and the log is 1..30 once."""
    real = Trainer._one_step

    def crash_at(step):
        def one_step(self):
            if self.step + 1 == step:
                raise KeyboardInterrupt
            return real(self)
        return one_step

    def attempt(steps, crash, resume):
        monkeypatch.setattr(Trainer, "_one_step", crash_at(crash) if crash else real)
        cfg = TrainConfig(out_dir=str(tmp_path), progress=False, shuffle_buffer=16, steps=steps, batch_size=4,
                          lr=1e-3, log_every=1, resume=resume)
        try:
            Trainer(build("clip", tmp_path, tiny_tokenizer), [SourceSpec(str(synth_world / "human"))], cfg).train()
        except KeyboardInterrupt:
            pass
        return [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]

    assert attempt(10, 7, False) == list(range(1, 7))
    assert not (tmp_path / "checkpoints" / "train" / "latest").exists()
    assert attempt(10, None, True) == list(range(1, 11))
    for f in [tmp_path / "train_log.jsonl", *tmp_path.glob("checkpoints/train/*")]:
        f.unlink() if f.is_file() else shutil.rmtree(f)
    assert attempt(30, 24, False) == list(range(1, 24))
    assert (tmp_path / "checkpoints" / "train" / "latest").read_text() == "step-00000020"
    assert attempt(30, None, True) == list(range(1, 31))


def test_pretrain_refuses_an_out_that_holds_a_run(tmp_path, synth_world, tiny_tokenizer):
    """A fresh pretrain into a used --out used to reuse its init/ model (ignoring --model-config,
    --seed, --tokenizer); now it is refused unless --resume, and --overwrite starts clean."""
    out = tmp_path / "P1"
    common = ["pretrain", "--arch", "blip", "--data", str(synth_world / "human"), "--out", str(out), "--steps", "2",
              "--batch-size", "4", "--no-progress", "--tokenizer", str(tiny_tokenizer)]
    assert main([*common, "--model-config", str(_micro_file(tmp_path))]) == 0
    two_layers = _micro_file(tmp_path / "..", text_config={**TEXT, "num_hidden_layers": 2})
    with pytest.raises(ValueError, match=f"--out {out} is not empty .*--resume .*--overwrite"):
        main([*common, "--model-config", str(two_layers), "--seed", "3"])
    with pytest.raises(ValueError, match="give one of them"):
        main([*common, "--resume", "--overwrite"])
    assert main([*common, "--model-config", str(two_layers), "--seed", "3", "--overwrite"]) == 0
    for part in ("init/itm", "itm", "captioner"):
        assert json.loads((out / part / "config.json").read_text())["text_config"]["num_hidden_layers"] == 2, part
    assert [json.loads(x)["step"] for x in (out / "pretrain_log.jsonl").read_text().splitlines()] == [2]
    # finetunes own only their files: the caption finetune's --overwrite leaves the filter's alone
    ft = ["--init", str(out), "--out", str(tmp_path / "ft"), "--data", str(synth_world / "human"), "--steps", "1",
          "--batch-size", "4", "--no-progress"]
    for task in ("caption", "retrieval"):
        assert main(["finetune", "--task", task, *ft]) == 0
    with pytest.raises(ValueError, match="is not empty \\(it holds finetune-caption, finetune-caption_log.jsonl"):
        main(["finetune", "--task", "caption", *ft])
    itm_before = (tmp_path / "ft" / "itm" / "model.safetensors").read_bytes()
    assert main(["finetune", "--task", "caption", "--overwrite", *ft]) == 0
    assert (tmp_path / "ft" / "itm" / "model.safetensors").read_bytes() == itm_before
    assert (tmp_path / "ft" / "checkpoints" / "finetune-retrieval" / "latest").is_file()


def test_a_pretrain_that_failed_before_its_first_step_can_be_run_again(tmp_path, synth_world, tiny_tokenizer):
    """A run that stopped before training (here: data with no caption column) leaves only the
    init/ it built; the same command with good data is not refused as a used --out."""
    out = tmp_path / "P"
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    common = ["pretrain", "--arch", "blip", "--out", str(out), "--steps", "1", "--batch-size", "4", "--no-progress",
              "--tokenizer", str(tiny_tokenizer), "--model-config", str(_micro_file(tmp_path))]
    with pytest.raises(ValueError, match="neither a curated"):
        main([*common, "--data", str(tmp_path / "other.parquet")])
    assert [p.name for p in out.iterdir()] == ["init"]
    assert main([*common, "--data", str(synth_world / "human")]) == 0
    assert (out / "itm" / "config.json").is_file()


def test_options_that_would_be_ignored_are_errors(tmp_path, synth_world, tiny_tokenizer):
    data = ["--data", str(synth_world / "human"), "--no-progress", "--batch-size", "4", "--steps", "2"]
    cases = [
        (["pretrain", "--arch", "clip", "--momentum"], "--momentum does not apply to --arch clip"),
        (["pretrain", "--arch", "clip", "--itm-negatives", "random"], "--itm-negatives random does not apply"),
        (["pretrain", "--arch", "blip2", "--momentum", "--queue-size", "8"],
         "--momentum, --queue-size do not apply to --arch blip2"),
        (["pretrain", "--arch", "blip", "--init", str(tmp_path), "--model-config", "x.json"],
         "--model-config does not apply with --init"),
        (["pretrain", "--arch", "clip", "--stop-after", "0"], "stop_after must be >= 1 .*got 0"),
        (["pretrain", "--arch", "clip", "--batch-size", "0"], "batch_size must be >= 1, got 0"),
        (["pretrain", "--arch", "clip", "--keep-checkpoints", "0"], "keep_checkpoints must be >= 1, got 0"),
        (["pretrain", "--arch", "clip", "--checkpoint-every", "-1"], "checkpoint_every must be >= 0, got -1"),
        (["pretrain", "--arch", "blip", "--alpha", "0.2"], "--alpha 0.2 needs --momentum"),
        (["pretrain", "--arch", "clip", "--alpha", "0.2"], "--alpha does not apply to --arch clip"),
        (["pretrain", "--arch", "clip", "--itm-first-token", "cls"], "--itm-first-token cls does not apply"),
    ]
    for argv, message in cases:
        with pytest.raises(ValueError, match=message):
            main([argv[0], *data, "--out", str(tmp_path / "o"), *argv[1:]])  # argv's options win
    assert not (tmp_path / "o").exists()
    # finetune: the caption task trains LM only; BLIP-2 has no momentum encoder
    build("blip", tmp_path / "w", tiny_tokenizer).export(tmp_path / "blip")
    build("blip2", tmp_path / "w2", tiny_tokenizer).export(tmp_path / "blip2")
    cases = [
        (["--task", "caption", "--init", str(tmp_path / "blip"), "--tasks", "itc,itm"],
         "--tasks itc,itm does not apply to --task caption"),
        (["--task", "caption", "--init", str(tmp_path / "blip"), "--momentum"], "--momentum does not apply"),
        (["--task", "retrieval", "--init", str(tmp_path / "blip2"), "--momentum"],
         "--momentum does not apply to a BLIP-2 --init"),
        (["--task", "retrieval", "--init", str(tmp_path / "blip"), "--batch-size", "0"], "batch_size must be >= 1"),
        (["--task", "retrieval", "--init", str(tmp_path / "blip"), "--prompt", "a photo of "],
         "--prompt does not apply to --task retrieval"),
    ]
    for argv, message in cases:
        with pytest.raises(ValueError, match=message):
            main(["finetune", *data, "--out", str(tmp_path / "o"), *argv])


def test_resume_on_other_data_is_refused_and_a_finished_run_keeps_its_summary(tmp_path, synth_world):
    cfg_file = _micro_file(tmp_path, "clip")
    out = tmp_path / "c"
    argv = ["pretrain", "--arch", "clip", "--out", str(out), "--model-config", str(cfg_file), "--steps", "2",
            "--batch-size", "4", "--no-progress", "--log-every", "1"]
    assert main([*argv, "--data", str(synth_world / "human")]) == 0
    summary = json.loads((out / "pretrain_summary.json").read_text())
    changed = (f"data source 0 differs: '{synth_world / 'human'}' \\(weight 1, 1 shard\\(s\\)\\) in the checkpoint, "
               f"'{synth_world / 'test'}'")
    with pytest.raises(ValueError, match=changed):
        main([*argv, "--data", str(synth_world / "test"), "--resume"])
    with pytest.raises(ValueError, match="data source 1 differs: no source in the checkpoint"):
        main([*argv, "--data", str(synth_world / "human"), "--mix", f"{synth_world / 'test'}:2", "--resume"])
    # the same data: nothing left to do, and the summary keeps its last losses
    assert main([*argv, "--data", str(synth_world / "human"), "--resume"]) == 0
    again = json.loads((out / "pretrain_summary.json").read_text())
    assert again["last"] == summary["last"] and again["last"]["step"] == 2 and again["finished"]


def test_resume_with_other_model_options_is_refused(tmp_path, synth_world, tiny_tokenizer):
    """--resume reused OUT/init (before the first checkpoint) and the checkpoint's weights
    whatever --model-config / --seed / --tokenizer / --vision-init / loss options it was given;
    now a resume that would build or train another model is refused, naming the option."""
    out = tmp_path / "P"
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    micro, two_layers = _micro_file(tmp_path), _micro_file(tmp_path / "..", text_config={**TEXT, "num_hidden_layers": 2})
    common = ["pretrain", "--arch", "blip", "--out", str(out), "--steps", "2", "--batch-size", "4", "--no-progress",
              "--tokenizer", str(tiny_tokenizer)]
    human = ["--data", str(synth_world / "human")]
    # an attempt that failed before its first step leaves only init/ and the options that built it
    with pytest.raises(ValueError, match="neither a curated"):
        main([*common, "--model-config", str(micro), "--data", str(tmp_path / "other.parquet")])
    assert json.loads((out / "init" / "options.json").read_text())["model_config"] == MICRO["blip"]
    with pytest.raises(ValueError, match=r"init was built with other options \(--model-config was .*--overwrite"):
        main([*common, "--model-config", str(two_layers), *human, "--resume"])
    with pytest.raises(ValueError, match=r"other options \(--seed was 0, this run gives 3\)"):
        main([*common, "--model-config", str(micro), *human, "--resume", "--seed", "3"])
    assert main([*common, "--model-config", str(micro), *human, "--resume", "--stop-after", "1"]) == 0
    # from the step-1 checkpoint: the loss options and the model's shape are compared as well
    with pytest.raises(ValueError, match=r"other options \(--itm-negatives was 'hard', this run gives 'random'\)"):
        main([*common, "--model-config", str(micro), *human, "--resume", "--itm-negatives", "random"])
    with pytest.raises(ValueError, match=r"other options \(--tasks was None, this run gives 'itc,lm'\)"):
        main([*common, "--model-config", str(micro), *human, "--resume", "--tasks", "itc,lm"])
    with pytest.raises(ValueError, match=r"other options \(--itm-first-token was 'enc', this run gives 'cls'\)"):
        main([*common, "--model-config", str(micro), *human, "--resume", "--itm-first-token", "cls"])
    assert main([*common, "--model-config", str(micro), *human, "--resume"]) == 0
    assert [json.loads(x)["step"] for x in (out / "pretrain_log.jsonl").read_text().splitlines()] == [1, 2]


def test_an_open_clip_frozen_tower_needs_its_weights(tmp_path):
    """open_clip:NAME without PRETRAINED built a random frozen tower for BLIP-2 without a word;
    now it is refused, and weights that do not load are named."""
    from capfilt.model.training.vision_init import PenultimateTower

    with pytest.raises(ValueError, match="open_clip:ViT-B-32: give the weights, open_clip:ViT-B-32:PRETRAINED"):
        PenultimateTower.from_spec("open_clip:ViT-B-32", 224)
    with pytest.raises(ValueError, match=f"open_clip:ViT-B-32:{tmp_path / 'none.safetensors'}: cannot load it"):
        PenultimateTower.from_spec(f"open_clip:ViT-B-32:{tmp_path / 'none.safetensors'}", 224)
    with pytest.raises(ValueError, match="wraps a timm or open_clip trunk, got 'hf'"):
        PenultimateTower(torch.nn.Identity(), "hf", "hf:DIR")


def test_blip2_trains_against_a_frozen_open_clip_tower(tmp_path, synth_world, tiny_tokenizer):
    """open_clip:NAME:FILE as BLIP-2's frozen tower (BLIP-2 stage 1 freezes any timm or
    open_clip tower): its penultimate block's tokens feed the Q-Former, and the weights stay."""
    import open_clip
    from safetensors.torch import save_file

    from capfilt.model.training.blip2 import Blip2TrainConfig, build_blip2

    config = tmp_path / "capfilt-test-tiny-oc.json"  # open_clip names a model config by its file
    config.write_text(json.dumps({"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32,
                                                                  "head_width": 16, "layers": 3},
                                  "text_cfg": {"width": 32, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(config)
    clip = open_clip.create_model("capfilt-test-tiny-oc")
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "oc.safetensors"))
    model = build_blip2(Blip2TrainConfig(), tmp_path, tokenizer_dir=tiny_tokenizer, overrides=MICRO["blip2"],
                        vision_init=f"open_clip:capfilt-test-tiny-oc:{tmp_path / 'oc.safetensors'}")
    assert model.tower.lib == "open_clip" and model.tower.index == 1  # 3 blocks: the second feeds the Q-Former
    assert model.tower(torch.zeros(2, 3, 32, 32)).shape == (2, 1 + 16, 32)  # (B, 1 + patches, width)
    run(model, synth_world / "human", tmp_path, steps=2, batch_size=4, lr=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(model.tower.trunk.state_dict().values(),
                                                 clip.visual.state_dict().values()))
    assert (tmp_path / "qformer" / "qformer.safetensors").is_file()


def test_without_the_bar_the_loss_is_logged(tmp_path, synth_world, tiny_tokenizer, caplog):
    """--no-progress (every bootstrap stage) printed nothing for the minutes a stage trains;
    now each --log-every step logs a line with the step, the loss and the speed."""
    import logging

    with caplog.at_level(logging.INFO, logger="capfilt.model.training.loop"):
        run(build("clip", tmp_path, tiny_tokenizer), synth_world / "human", tmp_path, steps=4, batch_size=4,
            lr=1e-3, log_every=2)
    lines = [r.getMessage() for r in caplog.records if r.name == "capfilt.model.training.loop" and ": step " in r.getMessage()]
    logged = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [x.split(", ")[0] for x in lines] == ["train: step 2/4", "train: step 4/4"]
    assert [float(x.split("loss ")[1].split(",")[0]) for x in lines] == [round(r["loss"], 4) for r in logged]


def test_a_pretrain_killed_while_building_init_resumes(tmp_path, synth_world, tiny_tokenizer):
    """Killed after init/itm was written and before init/captioner: every --resume (and so
    every bootstrap re-run) failed with "init/captioner does not exist"; now init/ is rebuilt."""
    from capfilt.model.builders.tiny import init_model

    out = tmp_path / "K"
    micro = _micro_file(tmp_path)
    init_model("itm", out / "init" / "itm", tiny_tokenizer, 0, MICRO["blip"])  # what the kill left
    assert main(["pretrain", "--arch", "blip", "--out", str(out), "--steps", "2", "--batch-size", "4", "--no-progress",
                 "--tokenizer", str(tiny_tokenizer), "--model-config", str(micro),
                 "--data", str(synth_world / "human"), "--resume"]) == 0
    assert (out / "init" / "captioner" / "config.json").is_file() and (out / "captioner" / "config.json").is_file()


def test_an_empty_latest_resumes_from_the_newest_whole_checkpoint(tmp_path, synth_world, tiny_tokenizer):
    """A `latest` cut short by a kill sent --resume to checkpoints/RUN/train_state.pt (every
    re-run failed); now it resumes from the newest step-* directory that is whole."""
    def attempt(**cfg):
        cfg = TrainConfig(out_dir=str(tmp_path), progress=False, shuffle_buffer=16, steps=6, batch_size=4, lr=1e-3,
                          log_every=1, checkpoint_every=2, **cfg)
        Trainer(build("clip", tmp_path, tiny_tokenizer), [SourceSpec(str(synth_world / "human"))], cfg).train()
        return [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]

    assert attempt(stop_after=4) == [1, 2, 3, 4]
    root = tmp_path / "checkpoints" / "train"
    (root / "latest").write_text("")
    (root / "step-00000006.tmp").mkdir()  # a checkpoint the kill cut short is not whole
    assert attempt(resume=True) == [1, 2, 3, 4, 5, 6]
    assert (root / "latest").read_text() == "step-00000006"
