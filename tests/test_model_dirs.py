"""`find_model_dirs`: the kind of each directory comes from its config, and a directory no
library loader can read is named with the reason."""
import json

import pytest

from model.model_dirs import find_model_dirs


def _config(path, arch):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": [arch]}))


def test_kinds_come_from_the_configs_not_the_names(tmp_path):
    _config(tmp_path / "run" / "captioner", "BlipForConditionalGeneration")
    _config(tmp_path / "run" / "itm", "Blip2ForImageTextRetrieval")  # a BLIP-2 filter in itm/
    (tmp_path / "run" / "clip").mkdir()
    (tmp_path / "run" / "clip" / "open_clip_config.json").write_text("{}")
    found = find_model_dirs(tmp_path / "run")
    assert found == {"captioner": str(tmp_path / "run" / "captioner"), "blip2": str(tmp_path / "run" / "itm"),
                     "clip": str(tmp_path / "run" / "clip")}
    _config(tmp_path / "single", "BlipForImageTextRetrieval")
    assert find_model_dirs(tmp_path / "single") == {"itm": str(tmp_path / "single")}


def test_a_qformer_only_export_is_named_with_its_tower(tmp_path):
    qformer = tmp_path / "run" / "qformer"
    qformer.mkdir(parents=True)
    (qformer / "config.json").write_text(json.dumps({"architectures": ["Blip2ForImageTextRetrieval"]}))
    (qformer / "tower.json").write_text(json.dumps({"tower": "open_clip:ViT-B-32"}))
    with pytest.raises(ValueError, match=r"Q-Former trained against the frozen tower 'open_clip:ViT-B-32'"):
        find_model_dirs(tmp_path / "run")


def test_nothing_found_names_where_it_looked(tmp_path):
    _config(tmp_path / "other", "BertModel")
    with pytest.raises(ValueError, match="no model directory found .* captioner/, itm/, clip/"):
        find_model_dirs(tmp_path / "other")


def test_evaluate_names_a_qformer_only_export_instead_of_asking_for_clip(tmp_path, synth_world):
    from model.evaluation import evaluate_retrieval

    qformer = tmp_path / "run" / "qformer"
    qformer.mkdir(parents=True)
    (qformer / "tower.json").write_text(json.dumps({"tower": "timm:resnet10t"}))
    with pytest.raises(ValueError, match="frozen tower 'timm:resnet10t'"):
        evaluate_retrieval(tmp_path / "run", str(synth_world / "test" / "*.parquet"), limit=4)
    _config(tmp_path / "cap", "BlipForConditionalGeneration")
    with pytest.raises(ValueError, match=r"no ITM or CLIP model for retrieval \(found \['captioner'\]\)"):
        evaluate_retrieval(tmp_path / "cap", str(synth_world / "test" / "*.parquet"), limit=4)
