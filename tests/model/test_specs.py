"""Model specs (model/specs.py): every syntax, local or hub, each role's refusals, identity."""
import hashlib
import os
from pathlib import Path

import pytest

from capfilt.model import specs
from capfilt.model.specs import HUB, LOCAL, OPEN_CLIP, OPEN_CLIP_HUB, TIMM, ModelSpec


def test_each_syntax_parses_to_its_kind_and_parts(tmp_path):
    cases = {
        "Salesforce/blip-itm-large-coco": (HUB, "Salesforce/blip-itm-large-coco", None, ""),
        "bert-base-uncased": (HUB, "bert-base-uncased", None, ""),
        "ViT-L-14:openai": (OPEN_CLIP, "ViT-L-14", "openai", ""),
        "ViT-B-32:/w/clip.safetensors": (OPEN_CLIP, "ViT-B-32", "/w/clip.safetensors", ""),
        "open_clip:ViT-B-32:laion2b_s34b_b79k": (OPEN_CLIP, "ViT-B-32", "laion2b_s34b_b79k", "open_clip"),
        "open_clip:ViT-B-32": (OPEN_CLIP, "ViT-B-32", None, "open_clip"),
        "hf-hub:laion/CLIP-ViT-L-14": (OPEN_CLIP_HUB, "laion/CLIP-ViT-L-14", None, "hf-hub"),
        "timm:vit_tiny_patch16_224": (TIMM, "vit_tiny_patch16_224", None, "timm"),
        "timm:vit_tiny_patch16_224:/w/vit.safetensors": (TIMM, "vit_tiny_patch16_224", "/w/vit.safetensors", "timm"),
        "local-dir:/models/clip": (LOCAL, "/models/clip", None, "local-dir"),
        "hf:/models/itm": (LOCAL, "/models/itm", None, "hf"),
        "/models/itm": (LOCAL, "/models/itm", None, ""),
        str(tmp_path): (LOCAL, str(tmp_path), None, ""),
    }
    for text, (kind, name, weights, scheme) in cases.items():
        spec = ModelSpec.parse(text)
        assert (spec.kind, spec.name, spec.weights, spec.scheme) == (kind, name, weights, scheme), text
        assert spec.text == text
    with pytest.raises(AttributeError):
        ModelSpec.parse("ViT-L-14:openai").kind = HUB  # frozen


def test_local_or_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    local = ["./m", "/abs/m", "~/m", "..\\m", "a/b/c", "here", "/abs/m:x", "local-dir:nowhere", "hf:nowhere"]
    hub = ["Salesforce/blip-itm-large-coco", "org/not-here", "name", "ViT-L-14:openai", "hf-hub:org/repo",
           "timm:vit_tiny_patch16_224"]
    assert [s for s in local if not specs.is_local_spec(s)] == []
    assert [s for s in hub if specs.is_local_spec(s)] == []
    assert ModelSpec.parse("~/m").path == Path.home() / "m"
    assert ModelSpec.parse("./m").path == Path("m") and ModelSpec.parse("org/x").path is None
    # against the working directory a first part that exists proves nothing; beside a job file it
    # makes a misspelt path of what would otherwise be a hub id
    (tmp_path / "models").mkdir()
    assert not specs.is_local_spec("models/captionr")
    beside = ModelSpec.parse("models/captionr", base=tmp_path)
    assert beside.local and beside.path == tmp_path / "models" / "captionr"
    assert not ModelSpec.parse("org/captioner", base=tmp_path).local


def test_relative_paths_resolve_against_base_and_keep_their_scheme(tmp_path):
    (tmp_path / "m").mkdir()
    assert str(ModelSpec.parse("m", base=tmp_path)) == str(tmp_path / "m")
    assert str(ModelSpec.parse("local-dir:m", base=tmp_path)) == "local-dir:" + str(tmp_path / "m")
    assert str(ModelSpec.parse("/abs/m", base=tmp_path)) == "/abs/m"
    assert str(ModelSpec.parse("ViT-B-32:w.pt", base=tmp_path)) == "ViT-B-32:w.pt"  # not a path


def test_clip_role(tiny_models, tmp_path):
    clip_dir = tiny_models["clip"]
    assert specs.open_clip_args("local-dir:" + str(clip_dir)) == ("local-dir:" + str(clip_dir), None)
    assert specs.open_clip_args("hf-hub:org/repo") == ("hf-hub:org/repo", None)
    assert specs.clip_spec(clip_dir) == "local-dir:" + str(clip_dir)
    assert specs.parse_clip(str(clip_dir)).local
    for bad in ("ViT-L-14", "ViT-L-14:", "Salesforce/blip-itm-large-coco", "timm:vit_tiny_patch16_224",
                "open_clip:ViT-B-32"):
        with pytest.raises(ValueError, match=f"CLIP spec '{bad}' is not a model directory, 'hf-hub:org/repo' "
                                             "or 'NAME:PRETRAINED'"):
            specs.open_clip_args(bad)
    with pytest.raises(ValueError, match=f"CLIP model directory {tmp_path / 'absent'} does not exist"):
        specs.open_clip_args(f"local-dir:{tmp_path / 'absent'}")
    with pytest.raises(ValueError, match="not an open_clip model directory \\(no open_clip_config.json\\)"):
        specs.clip_spec(tiny_models["itm"])


def test_vision_init_role():
    spec = specs.parse_vision_init("timm:vit_tiny_patch16_224:/w/vit.safetensors")
    assert (spec.kind, spec.name, spec.weights) == (TIMM, "vit_tiny_patch16_224", "/w/vit.safetensors")
    assert specs.parse_vision_init("hf:/runs/a/itm").path == Path("/runs/a/itm")
    assert specs.parse_vision_init("open_clip:ViT-B-32:openai").kind == OPEN_CLIP
    for bad in ("vit_tiny_patch16_224", "timm:", "hf:", "/runs/a/itm", "local-dir:/runs/a", "ViT-B-32:openai"):
        with pytest.raises(ValueError, match=f"--vision-init '{bad}': expected timm:NAME\\[:FILE\\], "
                                             "open_clip:NAME:PRETRAINED or hf:DIR"):
            specs.parse_vision_init(bad)


def test_identity_of_a_directory_is_its_content(tmp_path, monkeypatch):
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "w.bin").write_bytes(b"weights")
    (model / "a.txt").write_bytes(b"a")
    record = specs.identity(str(model))
    assert record["id"] == str(model) and record["kind"] == "directory"
    # relative path, NUL, hex digest of the bytes; folders in sorted order, names sorted within
    expected = hashlib.sha256()
    for rel, data in (("a.txt", b"a"), ("config.json", b"{}"), (os.path.join("sub", "w.bin"), b"weights")):
        expected.update(rel.encode() + b"\0" + hashlib.sha256(data).hexdigest().encode())
    assert record["sha256"] == expected.hexdigest()
    monkeypatch.chdir(tmp_path)
    spellings = [str(model) + "/", "local-dir:" + str(model), "./model", "model", "local-dir:model"]
    assert {specs.identity(s)["sha256"] for s in spellings} == {record["sha256"]}
    assert [specs.identity(s)["id"] for s in spellings] == spellings  # the spec as written
    (model / "config.json").write_text('{"changed": 1}')
    assert specs.identity(str(model))["sha256"] != record["sha256"]


def test_identity_of_a_weights_file_and_of_hub_models(tmp_path):
    weights = tmp_path / "clip.safetensors"
    weights.write_bytes(b"w")
    digest = hashlib.sha256(b"w").hexdigest()
    assert specs.identity(str(weights)) == {"id": str(weights), "sha256": digest, "kind": "file"}
    assert specs.identity(f"ViT-B-32:{weights}") == {"id": f"ViT-B-32:{weights}", "sha256": digest, "kind": "file"}
    for hub in ("Salesforce/blip-itm-large-coco", "ViT-L-14:openai", "hf-hub:org/repo", str(tmp_path / "gone")):
        assert specs.identity(hub) == {"id": hub, "sha256": None, "kind": "hub"}


def test_a_misspelt_path_says_no_such_directory_and_names_both_readings(tmp_path, tiny_models, monkeypatch):
    """`trained/captionr` where trained/ exists: a hub id by the rule (it does not exist and has no
    ./ / ~ prefix), but ambiguous; when the hub has no such model the error leads with the
    missing directory and the closest entry, then the hub's answer. A path spelling is a path."""
    import shutil

    from capfilt.model.loading import load_hf_config

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_models["captioner"], tmp_path / "trained" / "captioner")
    typo = ModelSpec.parse("trained/captionr")
    assert (typo.kind, typo.shadow) == (HUB, "trained/captionr")
    assert ModelSpec.parse("Salesforce/blip-itm-large-coco").shadow is None
    assert ModelSpec.parse("trained/captioner").local  # it exists
    with pytest.raises(ValueError) as err:
        load_hf_config("trained/captionr")  # offline in the tests: the hub fails at once
    assert str(err.value).startswith("no such directory trained/captionr (did you mean trained/captioner?); "
                                     "read as a hub id, 'trained/captionr' failed too (OSError: ")
    with pytest.raises(ValueError, match=r"^model directory trained/captionr does not exist: no such directory "
                                         r"\(did you mean trained/captioner\?\)$"):
        load_hf_config("./trained/captionr")
    with pytest.raises(ValueError, match=r"^no such directory trained/clp; read as a hub id, 'trained/clp' failed "
                                         r"too \(a CLIP spec is"):
        specs.parse_clip("trained/clp")


def test_curate_names_the_missing_directory_of_a_misspelt_model(tmp_path, tiny_models, monkeypatch):
    import shutil

    from cli_run import error_line, run_cli

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_models["captioner"], tmp_path / "trained" / "captioner")
    code, stdout, stderr = run_cli(["curate", "--input", "in/*.parquet", "--out", "out", "--captioner",
                                    "trained/captionr", "--filter", str(tiny_models["itm"]),
                                    "--clip", str(tiny_models["clip"])])
    assert code == 2 and stdout == "" and not (tmp_path / "out").exists()
    assert error_line(stderr).startswith(
        "capfilt curate: error: --captioner trained/captionr: no such directory trained/captionr (did you mean "
        "trained/captioner?); read as a hub id, 'trained/captionr' failed too (")
