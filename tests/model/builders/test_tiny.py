"""Tiny models and tokenizer (model/builders/tiny.py) and `capfilt models`."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from capfilt.jobs.cli import main
from capfilt.model.builders import tiny
from capfilt.transforms.synth import scenes as synth


def _images(n=2, size=64):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


TEXTS = ["a small red circle on the left", "there is a blue star at the top and a big green cross"]


# --- tokenizer -------------------------------------------------------------------------------

def test_tokenizer_has_blip_special_tokens(tiny_tokenizer):
    tok = tiny.load_tokenizer(tiny_tokenizer)
    assert type(tok).__name__ == "BertTokenizer"
    assert tok.bos_token == "[DEC]"
    assert "[ENC]" in tok.all_special_tokens
    # BERT's specials first, BLIP's two appended after the trained vocabulary
    assert [tok.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(tok) - 2, len(tok) - 1]
    assert tok.tokenize("[ENC] a red circle") == ["[ENC]", "a", "red", "circle"]
    # vocab.txt lists the trained vocabulary, line number = id
    lines = (tiny_tokenizer / "vocab.txt").read_text("utf-8").splitlines()
    assert len(lines) == len(tok) - 2
    assert [tok.convert_tokens_to_ids(t) for t in lines[:50]] == list(range(50))


def test_tokenizer_encodes_the_world_without_unk(tiny_tokenizer):
    tok = tiny.load_tokenizer(tiny_tokenizer)
    texts = [t for t in synth.corpus(seed=7, n=300) if t] + [synth.CAPTION_PROMPT + TEXTS[0]]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        assert tok.unk_token_id not in ids, text
    # uppercase junk alt-text is lowercased, as BLIP's uncased BERT tokenizer does
    assert tok.tokenize("DSC123.JPG") == tok.tokenize("dsc123.jpg")
    # and the world's words are whole tokens, so captions stay short
    assert len(tok.tokenize("a large purple triangle in the middle")) == 7


def test_tokenizer_is_deterministic(tmp_path):
    texts = synth.corpus(seed=3, n=200)
    a = tiny.train_tokenizer(tmp_path / "a", texts=texts)
    b = tiny.train_tokenizer(tmp_path / "b", texts=texts)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_tokenizer_rejects_empty_corpus(tmp_path):
    with pytest.raises(ValueError, match="no non-empty texts"):
        tiny.train_tokenizer(tmp_path, texts=["", ""])


# --- models ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["captioner", "itm", "blip2-itm"])
def test_blip_config_ids_match_tokenizer(tiny_models, kind):
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(tiny_models[kind])
    processor = AutoProcessor.from_pretrained(tiny_models[kind])
    tok = processor.tokenizer
    if kind == "blip2-itm":
        assert config.qformer_config.use_qformer_text_input is True
        assert config.qformer_config.vocab_size == len(tok)
        assert config.qformer_config.pad_token_id == tok.pad_token_id
    else:
        text = config.text_config
        assert text.vocab_size == len(tok)
        assert text.bos_token_id == tok.convert_tokens_to_ids("[DEC]")
        assert (text.pad_token_id, text.sep_token_id) == (tok.pad_token_id, tok.sep_token_id)
    pixels = processor(images=_images(1), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 64, 64)  # sized for the synthetic images
    assert tok.model_max_length <= 64  # never longer than the position table


def _blip_outputs(model, processor, kind):
    batch = processor(images=_images(2), text=TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        if kind == "captioner":
            logits = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits  # (B, T, V)
            generated = model.generate(pixel_values=batch["pixel_values"], max_new_tokens=6,
                                       do_sample=False)  # (B, T')
            return [logits, generated]
        itm = model(**batch, use_itm_head=True)
        itc = model(**batch, use_itm_head=False)
        return [itm[0], itc[0]]  # (B, 2) ITM logits, (B, B) cosine


def _blip2_outputs(model, processor):
    batch = processor(images=_images(2), text=TEXTS, padding=True, return_tensors="pt")
    batch.pop("token_type_ids", None)
    with torch.inference_mode():
        itm = model(**batch, use_image_text_matching_head=True).logits_per_image  # (B, 2)
        itc = model(**batch, use_image_text_matching_head=False).logits_per_image  # (B, B)
    return [itm, itc]


@pytest.mark.parametrize("kind", ["captioner", "itm", "blip2-itm"])
def test_blip_round_trip_gives_identical_outputs(tiny_models, kind, tmp_path):
    """A model rebuilt in memory from the same seed equals the saved-and-loaded one, and a
    second save/load changes nothing."""
    from transformers import (AutoConfig, Blip2ForImageTextRetrieval, BlipForConditionalGeneration,
                              BlipForImageTextRetrieval, BlipProcessor)

    torch.set_num_threads(1)
    cls = {"captioner": BlipForConditionalGeneration, "itm": BlipForImageTextRetrieval,
           "blip2-itm": Blip2ForImageTextRetrieval}[kind]
    processor = BlipProcessor.from_pretrained(tiny_models[kind])
    loaded = cls.from_pretrained(tiny_models[kind]).eval()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        fresh = cls(AutoConfig.from_pretrained(tiny_models[kind])).eval()
    if kind == "blip2-itm":  # the builder draws the queries (transformers zero-fills them)
        from capfilt.model.builders.tiny import init_query_tokens

        init_query_tokens(fresh, seed=0)
    loaded.save_pretrained(tmp_path)
    reloaded = cls.from_pretrained(tmp_path).eval()

    def outputs(model):
        return _blip2_outputs(model, processor) if kind == "blip2-itm" else _blip_outputs(model, processor, kind)

    ref = outputs(fresh)
    for model in (loaded, reloaded):
        for a, b in zip(ref, outputs(model)):
            assert torch.equal(a, b)
    assert ref[0].abs().sum() > 0 and torch.isfinite(ref[0].float()).all()


def test_clip_round_trip_through_open_clip_loader(tiny_models):
    import open_clip

    torch.set_num_threads(1)
    model_dir = tiny_models["clip"]
    cfg = json.loads((model_dir / "open_clip_config.json").read_text())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        fresh = open_clip.CLIP(**cfg["model_cfg"]).eval()
    model, preprocess, tokenizer = tiny.load_clip(model_dir)
    # weights on disk are safetensors and equal the loaded parameters
    on_disk = load_file(str(model_dir / "open_clip_model.safetensors"))
    assert set(on_disk) == set(model.state_dict())
    images = torch.stack([preprocess(im) for im in _images(2)])  # (B, 3, 64, 64)
    assert images.shape == (2, 3, 64, 64)
    texts = tokenizer(TEXTS)  # (B, 32)
    assert texts.shape == (2, cfg["model_cfg"]["text_cfg"]["context_length"])
    with torch.inference_mode():
        for a, b in ((fresh.encode_image(images), model.encode_image(images)),
                     (fresh.encode_text(texts), model.encode_text(texts))):
            assert a.shape == (2, cfg["model_cfg"]["embed_dim"])
            assert torch.equal(a, b)


def test_seed_controls_weights_and_overrides_apply(tmp_path, tiny_tokenizer):
    a = tiny.init_model("itm", tmp_path / "a", tokenizer_dir=tiny_tokenizer, seed=1,
                        overrides={"text_config": {"num_hidden_layers": 1}})
    b = tiny.init_model("itm", tmp_path / "b", tokenizer_dir=tiny_tokenizer, seed=1,
                        overrides={"text_config": {"num_hidden_layers": 1}})
    c = tiny.init_model("itm", tmp_path / "c", tokenizer_dir=tiny_tokenizer, seed=2,
                        overrides={"text_config": {"num_hidden_layers": 1}})
    wa, wb, wc = (load_file(str(d / "model.safetensors")) for d in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    config = json.loads((a / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 1
    assert config["vision_config"]["num_hidden_layers"] == tiny.load_config("itm")["vision_config"]["num_hidden_layers"]


def test_vision_position_std_sets_the_position_embedding_scale(tmp_path, tiny_tokenizer):
    """A larger position-embedding init lets a tiny ViT trained from scratch learn where things
    are (docs/results.md); the captioner and the filter get the same tower for a seed."""
    key = "vision_model.embeddings.position_embedding"
    default = load_file(str(tiny.init_model("itm", tmp_path / "d", tokenizer_dir=tiny_tokenizer) / "model.safetensors"))
    wide = {kind: load_file(str(tiny.init_model(kind, tmp_path / kind, tokenizer_dir=tiny_tokenizer, seed=3,
                                                overrides={"vision_position_std": 1.0}) / "model.safetensors"))
            for kind in ("itm", "captioner")}
    assert 0.01 < float(default[key].std()) < 0.03
    assert 0.9 < float(wide["itm"][key].std()) < 1.1
    assert torch.equal(wide["itm"][key], wide["captioner"][key])
    assert "vision_position_std" not in json.loads((tmp_path / "itm" / "config.json").read_text())
    with pytest.raises(ValueError, match="vision_position_std must be > 0"):
        tiny.init_model("itm", tmp_path / "bad", tokenizer_dir=tiny_tokenizer, overrides={"vision_position_std": 0})
    with pytest.raises(ValueError, match="not blip2-itm"):
        tiny.init_model("blip2-itm", tmp_path / "b2", tokenizer_dir=tiny_tokenizer, overrides={"vision_position_std": 1.0})


def test_init_model_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown model kind 'vit'"):
        tiny.init_model("vit", tmp_path)
    with pytest.raises(ValueError, match="not a tokenizer directory"):
        tiny.init_model("itm", tmp_path / "m", tokenizer_dir=tmp_path)
    with pytest.raises(ValueError, match="not an open_clip model directory"):
        tiny.clip_spec(tmp_path)


# --- CLI -------------------------------------------------------------------------------------

def test_cli_models_init_and_tokenizer(tmp_path, tiny_tokenizer, capsys):
    from transformers import BlipForImageTextRetrieval

    out = tmp_path / "itm"
    assert main(["models", "init", "--kind", "itm", "--out", str(out), "--tokenizer",
                 str(tiny_tokenizer), "--seed", "0"]) == 0
    model = BlipForImageTextRetrieval.from_pretrained(out)
    assert model.config.text_config.vocab_size == len(tiny.load_tokenizer(tiny_tokenizer))
    assert main(["models", "init", "--kind", "clip", "--out", str(tmp_path / "clip")]) == 0
    assert tiny.clip_spec(tmp_path / "clip").startswith("local-dir:")
    assert main(["models", "tokenizer", "--out", str(tmp_path / "tok"), "--n", "100"]) == 0
    assert tiny.load_tokenizer(tmp_path / "tok").bos_token == "[DEC]"
    with pytest.raises(ValueError, match="--override must be a JSON object"):
        main(["models", "init", "--kind", "itm", "--out", str(tmp_path / "x"), "--override", "[1]"])
    with pytest.raises(SystemExit):
        main(["models", "init", "--kind", "resnet", "--out", str(tmp_path / "y")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["models", "init", "--help"])
    assert exc.value.code == 0
    assert "--kind" in capsys.readouterr().out


@pytest.mark.parametrize("kind, overrides, bad", [
    ("captioner", {"vision_confg": {"patch_size": 16}}, "'vision_confg' at the top level"),
    ("itm", {"vision_config": {"patch_sise": 16}}, "'patch_sise' at vision_config .*'patch_size'"),
    ("clip", {"model_cfg": {"vision_cfg": {"layerz": 2}}}, "'layerz' at model_cfg.vision_cfg"),
    ("blip2-itm", {"qformer_config": {"num_hiden_layers": 1}}, "'num_hiden_layers' at qformer_config"),
])
def test_misspelt_model_config_key_is_an_error(kind, overrides, bad):
    """transformers keeps unknown config kwargs as attributes, so a typo would build the default
    model silently; the override is checked against the library's config first."""
    with pytest.raises(ValueError, match=bad):
        tiny.load_config(kind, overrides)


def test_known_model_config_keys_are_merged():
    config = tiny.load_config("itm", {"vision_position_std": 1.0, "vision_config": {"patch_size": 16}})
    assert config["vision_position_std"] == 1.0 and config["vision_config"]["patch_size"] == 16
    clip = tiny.load_config("clip", {"model_cfg": {"embed_dim": 32, "text_cfg": {"layers": 1}}})
    assert clip["model_cfg"]["embed_dim"] == 32 and clip["model_cfg"]["text_cfg"]["layers"] == 1
    assert clip["model_cfg"]["text_cfg"]["width"] == 128  # the rest of the base config stays


def test_cli_models_init_refuses_a_non_empty_out_unless_overwrite(tmp_path, tiny_tokenizer):
    out = tmp_path / "models"
    assert main(["models", "init", "--kind", "clip", "--out", str(out)]) == 0
    before = sorted(p.name for p in out.iterdir())
    itm = ["models", "init", "--kind", "itm", "--out", str(out), "--tokenizer", str(tiny_tokenizer)]
    with pytest.raises(ValueError, match=f"model directory {out} is not empty .*--overwrite"):
        main(itm)
    assert sorted(p.name for p in out.iterdir()) == before  # nothing mixed in
    assert main(itm + ["--overwrite"]) == 0
    # replaced, not mixed: the clip files are gone and only the itm model's files are there
    names = {p.name for p in out.iterdir()}
    assert "config.json" in names and "open_clip_config.json" not in names
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BlipForImageTextRetrieval"]
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name] == []
    # an empty directory is fine without --overwrite
    (tmp_path / "empty").mkdir()
    assert main(["models", "init", "--kind", "clip", "--out", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "open_clip_config.json").is_file()


def test_cli_models_init_overwrite_refuses_what_is_not_a_model_directory(tmp_path):
    release = tmp_path / "release"
    (release / "shards").mkdir(parents=True)
    (release / "manifest.json").write_text('{"format": "capfilt-release/1"}')
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("x")
    for out, what in ((release, "is a capfilt release (manifest.json format capfilt-release/1), not a model "
                                "directory; models init writes only into an empty directory or a model directory"),
                      (notes, "is not empty (todo.txt) and no capfilt command wrote it; models init")):
        for flags in ([], ["--overwrite"]):
            with pytest.raises(ValueError) as err:
                main(["models", "init", "--kind", "clip", "--out", str(out), *flags])
            assert str(err.value).startswith(f"model directory {out} {what}")
    assert sorted(p.name for p in release.iterdir()) == ["manifest.json", "shards"]
    assert sorted(p.name for p in notes.iterdir()) == ["todo.txt"]


def test_cli_models_init_names_a_file_given_as_out(tmp_path):
    target = tmp_path / "model.txt"
    target.write_text("x")
    with pytest.raises(ValueError, match=f"model directory {target} is a file, not a directory"):
        main(["models", "init", "--kind", "clip", "--out", str(target)])
    with pytest.raises(ValueError, match=f"model directory {target} is a file, not a directory"):
        tiny.init_model("clip", target)
    with pytest.raises(ValueError, match="cannot create output directory .*a parent is a file"):
        tiny.init_model("clip", target / "sub")
    assert target.read_text() == "x"


def test_init_model_python_default_still_writes_into_an_existing_directory(tmp_path, tiny_tokenizer):
    """The training code and the fixtures call init_model on directories they own: the library
    default keeps writing into them; `overwrite=True` replaces; `exist_ok=False` refuses."""
    out = tmp_path / "itm"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    tiny.init_model("itm", out, tokenizer_dir=tiny_tokenizer)
    assert (out / "notes.txt").read_text() == "kept" and (out / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="is not empty"):
        tiny.init_model("itm", out, tokenizer_dir=tiny_tokenizer, exist_ok=False)
    tiny.init_model("itm", out, tokenizer_dir=tiny_tokenizer, exist_ok=False, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()


def test_a_failed_init_leaves_no_directory_behind(tmp_path):
    out = tmp_path / "m"
    with pytest.raises(ValueError, match="not a tokenizer directory"):
        tiny.init_model("itm", out, tokenizer_dir=tmp_path / "missing")
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["clip", "itm"])
def test_models_init_writes_every_file_with_the_umask(tmp_path, tiny_tokenizer, umask, kind):
    from file_modes import modes_below

    out = tmp_path / "m"
    assert main(["models", "init", "--kind", kind, "--out", str(out), "--tokenizer", str(tiny_tokenizer)]) == 0
    found = modes_below(out)
    assert any(name.endswith(".safetensors") for name in found)
    assert found == {name: 0o666 & ~umask for name in found}
