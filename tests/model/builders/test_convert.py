"""Original BLIP checkpoints -> transformers (model/convert.py, `capfilt convert`)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipProcessor

from capfilt.jobs.cli import main
from capfilt.model.inference.captioner import Captioner
from capfilt.model.builders.convert import (
    convert_blip_checkpoint,
    hf_to_original_key,
    infer_config,
    original_to_hf_key,
    to_original_state_dict,
)
from capfilt.model.inference.filter import load_filter

REPO = Path(__file__).resolve().parents[3]


def _images(n):
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]


def _export(model_cls, model_dir, path, extra=None):
    """Write a tiny HF model in the original layout, wrapped as BLIP's train scripts save it."""
    state = to_original_state_dict(model_cls.from_pretrained(model_dir))
    state.update(extra or {})
    torch.save({"model": state, "config": {"image_size": 64}, "epoch": 4}, path)
    return state


@pytest.mark.parametrize("original,hf", [
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.weight", "vision_model.embeddings.patch_embedding.weight"),
    ("visual_encoder.blocks.11.attn.qkv.bias", "vision_model.encoder.layers.11.self_attn.qkv.bias"),
    ("visual_encoder.blocks.3.attn.proj.weight", "vision_model.encoder.layers.3.self_attn.projection.weight"),
    ("visual_encoder.blocks.0.norm2.weight", "vision_model.encoder.layers.0.layer_norm2.weight"),
    ("visual_encoder.blocks.23.mlp.fc2.bias", "vision_model.encoder.layers.23.mlp.fc2.bias"),
    ("visual_encoder.norm.bias", "vision_model.post_layernorm.bias"),
    ("text_decoder.bert.encoder.layer.2.crossattention.self.key.weight",
     "text_decoder.bert.encoder.layer.2.crossattention.self.key.weight"),
    ("itm_head.weight", "itm_head.weight"),
])
def test_key_mapping_both_ways(original, hf):
    assert original_to_hf_key(original) == hf
    assert hf_to_original_key(hf) == original


def test_unknown_vision_key_has_no_mapping():
    assert original_to_hf_key("visual_encoder.blocks.0.attn.rel_pos_bias") is None


def test_caption_round_trip_through_the_cli(tiny_models, tmp_path, capsys):
    src = tmp_path / "model_caption.pth"
    _export(BlipForConditionalGeneration, tiny_models["captioner"], src)
    out = tmp_path / "converted"
    code = main(["convert", "--from", "blip", "--task", "caption", str(src), str(out),
                 "--config", str(tiny_models["captioner"]), "--processor", str(tiny_models["captioner"])])
    assert code == 0 and "wrote caption model" in capsys.readouterr().out
    before = Captioner.from_pretrained(tiny_models["captioner"], device="cpu")
    after = Captioner.from_pretrained(out, device="cpu")
    original = before.model.state_dict()
    converted = after.model.state_dict()
    assert set(original) == set(converted)
    assert all(torch.equal(original[k], converted[k]) for k in original)
    images, keys = _images(2), ["a", "b"]
    kwargs = dict(n=3, seed=9, max_length=12, min_length=3)
    assert after.caption(images, keys, **kwargs) == before.caption(images, keys, **kwargs)


def test_itm_round_trip_ignores_training_only_keys(tiny_models, tmp_path):
    src = tmp_path / "model_retrieval.pth"
    # what retrieval checkpoints also carry: momentum encoders, queues, temperature
    extra = {"visual_encoder_m.cls_token": torch.zeros(1, 1, 128), "image_queue": torch.zeros(128, 16),
             "idx_queue": torch.zeros(1, 16), "ptr_queue": torch.zeros(1, dtype=torch.long),
             "temp": torch.tensor(0.07), "text_encoder.embeddings.position_ids": torch.arange(64)[None]}
    _export(BlipForImageTextRetrieval, tiny_models["itm"], src, extra)
    out = convert_blip_checkpoint(src, tmp_path / "itm", "itm", config=tiny_models["itm"],
                                  processor=tiny_models["itm"])
    captions = [["a red circle", "a blue star"], ["green"]]
    before = load_filter(tiny_models["itm"], device="cpu").score(_images(2), captions)
    after = load_filter(out, device="cpu").score(_images(2), captions)
    for b, a in zip(before, after):
        assert np.array_equal(a.itm, b.itm) and np.array_equal(a.itc, b.itc)


def test_other_tasks_parts_of_a_pretrain_checkpoint_are_skipped(tiny_models, tmp_path):
    """A pretraining checkpoint holds encoder and decoder; each task takes its own part."""
    decoder = to_original_state_dict(BlipForConditionalGeneration.from_pretrained(tiny_models["captioner"]))
    src = tmp_path / "model_pretrain.pth"
    _export(BlipForImageTextRetrieval, tiny_models["itm"], src,
            {k: v for k, v in decoder.items() if k.startswith("text_decoder.")})
    out = convert_blip_checkpoint(src, tmp_path / "itm", "itm", config=tiny_models["itm"])
    assert (out / "model.safetensors").is_file()


def test_unknown_and_missing_keys_are_listed(tiny_models, tmp_path):
    src = tmp_path / "bad.pth"
    state = _export(BlipForImageTextRetrieval, tiny_models["itm"], src)
    state["visual_encoder.blocks.0.attn.rel_pos_bias"] = torch.zeros(3)
    state["fusion_head.weight"] = torch.zeros(2)
    del state["itm_head.bias"], state["visual_encoder.blocks.1.mlp.fc1.weight"]
    torch.save({"model": state}, src)
    with pytest.raises(ValueError) as err:
        convert_blip_checkpoint(src, tmp_path / "out", "itm", config=tiny_models["itm"])
    message = str(err.value)
    for key in ("visual_encoder.blocks.0.attn.rel_pos_bias", "fusion_head.weight",
                "itm_head.bias", "vision_model.encoder.layers.1.mlp.fc1.weight"):
        assert key in message
    assert "unknown keys (2)" in message and "missing keys (2)" in message
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_shape_mismatch_is_listed(tiny_models, tmp_path):
    src = tmp_path / "shape.pth"
    state = _export(BlipForImageTextRetrieval, tiny_models["itm"], src)
    state["itm_head.weight"] = torch.zeros(3, state["itm_head.weight"].shape[1])
    torch.save(state, src)  # an unwrapped state dict is accepted too
    with pytest.raises(ValueError, match=r"itm_head.weight: checkpoint \(3, 128\) vs model \(2, 128\)"):
        convert_blip_checkpoint(src, tmp_path / "out", "itm", config=tiny_models["itm"])


class _NotATensor:
    pass


def test_unreadable_checkpoints(tmp_path, tiny_models):
    with pytest.raises(ValueError, match="does not exist"):
        convert_blip_checkpoint(tmp_path / "absent.pth", tmp_path / "o", "caption")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights_only"):
        convert_blip_checkpoint(garbage, tmp_path / "o", "caption")
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": _NotATensor()}, pickled)  # arbitrary objects are refused, not unpickled
    with pytest.raises(ValueError, match="weights_only"):
        convert_blip_checkpoint(pickled, tmp_path / "o", "caption")
    with pytest.raises(ValueError, match="task must be one of"):
        convert_blip_checkpoint(garbage, tmp_path / "o", "vqa")


def test_cli_reports_errors_and_refuses_non_empty_output(tiny_models, tmp_path, capsys):
    src = tmp_path / "m.pth"
    _export(BlipForImageTextRetrieval, tiny_models["itm"], src)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code = main(["convert", "--from", "blip", "--task", "itm", str(src), str(out), "--config", str(tiny_models["itm"])])
    assert code == 2
    assert f"output directory {out} is not empty" in capsys.readouterr().err
    # without --config the tiny vocabulary is not BLIP's: the error says to pass the config
    code = main(["convert", "--from", "blip", "--task", "itm", str(src), str(tmp_path / "new")])
    err = capsys.readouterr().err
    assert code == 2 and "pass its config explicitly" in err
    assert "the vocabulary has 514 tokens, not BLIP's 30524" in err and "multiple of" not in err  # width 128 is fine


def test_a_blip2_config_and_a_non_checkpoint_are_named(tiny_models, tmp_path, capsys):
    src = tmp_path / "m.pth"
    _export(BlipForImageTextRetrieval, tiny_models["itm"], src)
    blip2 = tmp_path / "blip2"
    blip2.mkdir()
    (blip2 / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    code = main(["convert", "--from", "blip", "--task", "itm", str(src), str(tmp_path / "o"), "--config", str(blip2)])
    err = capsys.readouterr().err
    assert code == 2 and "its model_type is 'blip-2', not 'blip'" in err and len(err) < 400
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match=r"notes.txt is not a PyTorch checkpoint torch.load\(weights_only=True\) can read"):
        convert_blip_checkpoint(text, tmp_path / "o2", "caption")


def test_a_wrong_checkpoint_lists_the_first_keys_not_hundreds(tiny_models, tmp_path):
    src = tmp_path / "cap.pth"
    _export(BlipForConditionalGeneration, tiny_models["captioner"], src)
    with pytest.raises(ValueError) as err:  # a captioning checkpoint given as an ITM one
        convert_blip_checkpoint(src, tmp_path / "out", "itm", config=tiny_models["itm"])
    message = str(err.value)
    assert "missing keys (" in message and "more)" in message and len(message) < 3000


def test_config_inferred_from_a_real_size_checkpoint():
    """blip-image-captioning-large's shapes (1 layer each) are read back from the tensors alone."""
    config = json.loads((REPO / "benchmarks/configs/blip-image-captioning-large.json").read_text())["config"]
    config["vision_config"]["num_hidden_layers"] = 1
    config["text_config"]["num_hidden_layers"] = 1
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = BlipForConditionalGeneration(BlipConfig(**config))
    inferred = infer_config(to_original_state_dict(model), "caption")
    for part in ("vision_config", "text_config"):
        for key, value in config[part].items():
            if key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "image_size", "patch_size", "vocab_size", "max_position_embeddings",
                       "encoder_hidden_size"):
                assert getattr(getattr(inferred, part), key) == value, (part, key)


# --- audit: processor checks, no half-written output, clearer source errors ----------------------

def _config_dir(model_dir, path, **text):
    """A copy of `model_dir`'s BlipConfig with `text` set on its text config."""
    config = BlipConfig.from_pretrained(model_dir)
    for key, value in text.items():
        setattr(config.text_config, key, value)
    config.save_pretrained(path)
    return path


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def test_a_processor_with_another_vocabulary_is_refused_before_writing(tiny_models, tmp_path, capsys):
    """A 600-token checkpoint with the 514-token tiny processor would load and caption garbage."""
    config_dir = _config_dir(tiny_models["captioner"], tmp_path / "cfg600", vocab_size=600)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BlipForConditionalGeneration(BlipConfig.from_pretrained(config_dir))
    src = tmp_path / "big.pth"
    torch.save({"model": to_original_state_dict(model)}, src)
    size = len(BlipProcessor.from_pretrained(tiny_models["captioner"]).tokenizer)
    out = tmp_path / "out"
    code = main(["convert", "--from", "blip", "--task", "caption", str(src), str(out),
                 "--config", str(config_dir), "--processor", str(tiny_models["captioner"])])
    err = capsys.readouterr().err
    assert code == 2
    assert f"tokenizer has {size} tokens but the checkpoint's text model has 600" in err
    assert not out.exists() and _leftovers(tmp_path) == []
    # without --processor the same checkpoint converts (the model alone is consistent)
    assert convert_blip_checkpoint(src, out, "caption", config=config_dir) == out
    assert (out / "model.safetensors").is_file() and not (out / "tokenizer_config.json").exists()


def test_special_token_ids_of_the_config_must_be_the_tokenizers(tiny_models, tmp_path):
    src = tmp_path / "cap.pth"
    _export(BlipForConditionalGeneration, tiny_models["captioner"], src)
    tokenizer = BlipProcessor.from_pretrained(tiny_models["captioner"]).tokenizer
    wrong_sep = tokenizer.convert_tokens_to_ids("red")
    config_dir = _config_dir(tiny_models["captioner"], tmp_path / "cfg_sep", sep_token_id=wrong_sep)
    with pytest.raises(ValueError) as err:
        convert_blip_checkpoint(src, tmp_path / "out", "caption", config=config_dir,
                                processor=tiny_models["captioner"])
    assert (f"sep_token_id {wrong_sep} is 'red' in the tokenizer, whose sep token is '[SEP]' "
            f"(id {tokenizer.sep_token_id})") in str(err.value)
    outside = _config_dir(tiny_models["captioner"], tmp_path / "cfg_eos", eos_token_id=len(tokenizer) + 5)
    with pytest.raises(ValueError, match=f"eos_token_id {len(tokenizer) + 5} is outside the tokenizer's "
                                         f"{len(tokenizer)} ids"):
        convert_blip_checkpoint(src, tmp_path / "out", "caption", config=outside, processor=tiny_models["captioner"])
    # BLIP's published configs keep eos_token_id 2 although generation stops at [SEP]: accepted
    unused_eos = _config_dir(tiny_models["captioner"], tmp_path / "cfg_eos2", eos_token_id=2)
    out = convert_blip_checkpoint(src, tmp_path / "ok", "caption", config=unused_eos, processor=tiny_models["captioner"])
    assert (out / "tokenizer_config.json").is_file()
    assert not (tmp_path / "out").exists()


def test_a_failed_convert_leaves_nothing_and_the_retry_works(tiny_models, tmp_path, capsys, monkeypatch):
    src = tmp_path / "cap.pth"
    _export(BlipForConditionalGeneration, tiny_models["captioner"], src)
    out = tmp_path / "out"
    args = ["convert", "--from", "blip", "--task", "caption", str(src), str(out), "--config", str(tiny_models["captioner"])]
    assert main(args + ["--processor", str(tmp_path / "no_such_processor")]) == 2
    assert "cannot read a BlipProcessor" in capsys.readouterr().err
    assert not out.exists() and _leftovers(tmp_path) == []
    # a failure while writing (here: the processor's save) removes the partial copy too
    def broken_save(self, *a, **k):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(BlipProcessor, "save_pretrained", broken_save)
        with pytest.raises(OSError, match="disk full"):
            main(args + ["--processor", str(tiny_models["captioner"])])
    assert not out.exists() and _leftovers(tmp_path) == []
    assert main(args + ["--processor", str(tiny_models["captioner"])]) == 0
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}


def test_overwrite_replaces_the_output_and_a_failure_keeps_the_old_one(tiny_models, tmp_path, capsys):
    src = tmp_path / "cap.pth"
    _export(BlipForConditionalGeneration, tiny_models["captioner"], src)
    out = tmp_path / "out"
    out.mkdir()  # an earlier model directory, with a file the new one does not have
    (out / "config.json").write_text('{"architectures": ["BlipForConditionalGeneration"]}')
    (out / "stale_processor_config.json").write_text("{}")
    args = ["convert", "--from", "blip", "--task", "caption", str(src), str(out), "--config",
            str(tiny_models["captioner"]), "--overwrite"]
    assert main(args + ["--processor", str(tmp_path / "absent")]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "stale_processor_config.json"]  # untouched
    assert main(args) == 0
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and "stale_processor_config.json" not in names
    assert _leftovers(tmp_path) == []
    file_out = tmp_path / "a_file"
    file_out.write_text("x")
    capsys.readouterr()
    assert main(args[:6] + [str(file_out)] + args[7:]) == 2
    assert f"output directory {file_out} is a file, not a directory" in capsys.readouterr().err


def test_a_directory_as_source_is_named(tiny_models, tmp_path):
    with pytest.raises(ValueError) as err:
        convert_blip_checkpoint(tiny_models["captioner"], tmp_path / "o", "caption")
    message = str(err.value)
    assert "is a directory, not a checkpoint file" in message and "needs no conversion" in message
    assert "does not exist" not in message
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError) as err:
        convert_blip_checkpoint(empty, tmp_path / "o", "caption")
    assert f"checkpoint {empty} is a directory, not a checkpoint file (.pth)" == str(err.value)


@pytest.mark.parametrize("kind", ["captioner", "itm"])
def test_weights_already_in_the_transformers_layout_are_named(tiny_models, tmp_path, kind):
    task = "caption" if kind == "captioner" else "itm"
    safetensors_file = tiny_models[kind] / "model.safetensors"
    pth = tmp_path / "hf_state.pth"
    cls = BlipForConditionalGeneration if kind == "captioner" else BlipForImageTextRetrieval
    torch.save(cls.from_pretrained(tiny_models[kind]).state_dict(), pth)
    for src in (safetensors_file, pth):
        for config in (None, tiny_models[kind]):
            with pytest.raises(ValueError) as err:
                convert_blip_checkpoint(src, tmp_path / "o", task, config=config)
            message = str(err.value)
            assert "already in the transformers layout" in message and "'vision_model." in message
            assert "needs no conversion" in message and "lacks" not in message
    assert not (tmp_path / "o").exists()


def test_an_original_layout_safetensors_file_converts(tiny_models, tmp_path):
    from safetensors.torch import save_file

    state = to_original_state_dict(BlipForImageTextRetrieval.from_pretrained(tiny_models["itm"]))
    src = tmp_path / "model_retrieval.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(src))
    out = convert_blip_checkpoint(src, tmp_path / "itm", "itm", config=tiny_models["itm"])
    converted = BlipForImageTextRetrieval.from_pretrained(out).state_dict()
    original = BlipForImageTextRetrieval.from_pretrained(tiny_models["itm"]).state_dict()
    assert all(torch.equal(original[k], converted[k]) for k in original)


def test_unreadable_checkpoint_message_drops_pytorchs_weights_only_false_advice(tmp_path):
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": _NotATensor()}, pickled)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    for path, detail in ((pickled, "UnpicklingError: Unsupported global: GLOBAL"), (garbage, "UnpicklingError: ")):
        with pytest.raises(ValueError) as err:
            convert_blip_checkpoint(path, tmp_path / "o", "caption")
        message = str(err.value)
        assert message.startswith(f"{path} is not a PyTorch checkpoint torch.load(weights_only=True) can read (")
        assert detail in message
        for advice in ("False", "Re-running", "arbitrary code", "add_safe_globals", "trust"):
            assert advice not in message, advice


# --- the converted filter scores as BLIP's own ITM forward, with [ENC] first -----------------------

def _blip_itm(state, pixel_values, input_ids, attention_mask, first_id, heads):
    """p(match) of BLIP's image-grounded text encoder + ITM head, written from BLIP's modules on
    the original state dict (no transformers code): ``vit.py``'s VisionTransformer (pre-norm
    blocks, LayerNorm eps 1e-6, exact GELU) and ``med.py``'s BertModel in multimodal mode
    (word + position embeddings, post-norm self-attention, cross-attention and feed-forward,
    eps 1e-12, padding masked with -10000), the text's first id set to ``first_id`` as
    ``blip_retrieval.py`` / ``train_retrieval.py`` set ``enc_token_id``; ``heads``: (vision, text)."""
    F = torch.nn.functional

    def lin(x, name):
        return F.linear(x, state[name + ".weight"], state[name + ".bias"])

    def norm(x, name, eps):
        return F.layer_norm(x, x.shape[-1:], state[name + ".weight"], state[name + ".bias"], eps)

    def attend(q, k, v, n, mask=None):  # (B, Lq, D), (B, Lk, D) x2 -> (B, Lq, D)
        split = lambda t: t.view(t.shape[0], t.shape[1], n, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # (B, n, Lq, Lk)
        if mask is not None:
            scores = scores + (1.0 - mask[:, None, None, :].float()) * -10000.0
        return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)

    ve, patch = "visual_encoder.", state["visual_encoder.patch_embed.proj.weight"].shape[-1]
    x = F.conv2d(pixel_values, state[ve + "patch_embed.proj.weight"], state[ve + "patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)  # (B, P, D)
    x = torch.cat([state[ve + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + state[ve + "pos_embed"]
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith(ve + "blocks."))
    for i in range(depth):
        b = f"{ve}blocks.{i}."
        q, k, v = lin(norm(x, b + "norm1", 1e-6), b + "attn.qkv").chunk(3, dim=-1)
        x = x + lin(attend(q, k, v, heads[0]), b + "attn.proj")
        x = x + lin(F.gelu(lin(norm(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    image = norm(x, ve + "norm", 1e-6)  # (B, 1+P, D)

    te = "text_encoder."
    ids = input_ids.clone()
    ids[:, 0] = first_id
    h = state[te + "embeddings.word_embeddings.weight"][ids] + \
        state[te + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    h = norm(h, te + "embeddings.LayerNorm", 1e-12)
    depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith(te + "encoder.layer."))
    for i in range(depth):
        lay = f"{te}encoder.layer.{i}."
        for part, keys, mask in (("attention", h, attention_mask), ("crossattention", image, None)):
            ctx = attend(lin(h, f"{lay}{part}.self.query"), lin(keys, f"{lay}{part}.self.key"),
                         lin(keys, f"{lay}{part}.self.value"), heads[1], mask)
            h = norm(lin(ctx, f"{lay}{part}.output.dense") + h, f"{lay}{part}.output.LayerNorm", 1e-12)
        ffn = lin(F.gelu(lin(h, lay + "intermediate.dense")), lay + "output.dense")
        h = norm(ffn + h, lay + "output.LayerNorm", 1e-12)
    return lin(h[:, 0], "itm_head").softmax(dim=-1)[:, 1]


def _dec_only_processor(model_dir, path):
    """The model's processor with a tokenizer that ends with [DEC] and has no [ENC] (one token
    short of the text model's rows, as a processor saved without BLIP's [ENC])."""
    from transformers import BertTokenizer

    processor = BlipProcessor.from_pretrained(model_dir)
    vocab = {t: i for t, i in processor.tokenizer.get_vocab().items() if t not in ("[DEC]", "[ENC]")}
    processor.tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]")
    processor.save_pretrained(path)
    return path


def test_converted_filter_scores_with_enc_as_blips_own_itm_forward(tiny_models, tmp_path):
    """An original-layout ITM checkpoint converted with `capfilt convert` (once with a processor
    that has [ENC], once with one that lacks it and gets it added) scores as BLIP's ITM forward
    computed independently above; with --itm-first-token cls it scores as that forward with [CLS]."""
    src = tmp_path / "model_base_retrieval.pth"
    state = _export(BlipForImageTextRetrieval, tiny_models["itm"], src, {"temp": torch.tensor(0.07)})
    config = BlipConfig.from_pretrained(tiny_models["itm"])
    config.vision_config.layer_norm_eps = 1e-6  # BLIP's ViT (infer_config sets it for real checkpoints)
    config.save_pretrained(tmp_path / "config")
    dec_only = _dec_only_processor(tiny_models["itm"], tmp_path / "dec_only")
    assert len(BlipProcessor.from_pretrained(dec_only).tokenizer) == config.text_config.vocab_size - 1
    heads = (config.vision_config.num_attention_heads, config.text_config.num_attention_heads)
    images = _images(3)
    captions = [["a red circle on the left", "a small blue square"], ["green"],
                ["a big yellow triangle at the top near a purple star", "two shapes", "a photo"]]
    for processor in (tiny_models["itm"], dec_only):
        out = tmp_path / f"converted_{Path(processor).name}"
        assert main(["convert", "--from", "blip", "--task", "itm", str(src), str(out), "--config",
                     str(tmp_path / "config"), "--processor", str(processor)]) == 0
        tokenizer = BlipProcessor.from_pretrained(out).tokenizer
        enc_id = tokenizer.convert_tokens_to_ids("[ENC]")
        assert enc_id == config.text_config.vocab_size - 1 == len(tokenizer) - 1  # BLIP's: after [DEC]
        for first in ("enc", "cls"):
            flt = load_filter(out, device="cpu", itm_first_token=first)
            assert flt.itm_first_token == first
            scores = flt.score(images, captions)
            for image, caps, got in zip(images, captions, scores):
                ids, mask = flt.tokenize(caps)
                pixels = flt.pixel_values([image]).expand(len(caps), -1, -1, -1)
                with torch.no_grad():
                    want = _blip_itm(state, pixels, ids, mask, enc_id if first == "enc" else ids[0, 0], heads)
                np.testing.assert_allclose(got.itm, want.numpy(), atol=2e-5, rtol=0)


def test_inferred_config_uses_blips_vit_layer_norm_eps(tiny_models):
    state = to_original_state_dict(BlipForImageTextRetrieval.from_pretrained(tiny_models["itm"]))
    emb = state["text_encoder.embeddings.word_embeddings.weight"]
    state["text_encoder.embeddings.word_embeddings.weight"] = torch.zeros(30524, emb.shape[1])
    assert infer_config(state, "itm").vision_config.layer_norm_eps == 1e-6
