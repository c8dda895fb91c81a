"""`find_model_dirs`: the kind of each directory comes from its config, and a directory no
library loader can read is named with the reason."""
import json

import pytest

from capfilt.model.builders.model_dirs import find_model_dirs


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
    from capfilt.model.evaluation.evaluate import evaluate_retrieval

    qformer = tmp_path / "run" / "qformer"
    qformer.mkdir(parents=True)
    (qformer / "tower.json").write_text(json.dumps({"tower": "timm:resnet10t"}))
    with pytest.raises(ValueError, match="frozen tower 'timm:resnet10t'"):
        evaluate_retrieval(tmp_path / "run", str(synth_world / "test" / "*.parquet"), limit=4)
    _config(tmp_path / "cap", "BlipForConditionalGeneration")
    with pytest.raises(ValueError, match=r"no ITM or CLIP model for retrieval \(found \['captioner'\]\)"):
        evaluate_retrieval(tmp_path / "cap", str(synth_world / "test" / "*.parquet"), limit=4)


def test_caption_evaluation_of_a_directory_without_captioner_says_so(tmp_path, synth_world):
    from capfilt.model.evaluation.evaluate import evaluate_captions

    _config(tmp_path / "b2" / "itm", "Blip2ForImageTextRetrieval")  # a BLIP-2 pretrain output
    with pytest.raises(ValueError, match=r"no captioner \(BlipForConditionalGeneration\) .*found \['blip2'\]"):
        evaluate_captions(tmp_path / "b2", str(synth_world / "test" / "*.parquet"), limit=2)


def test_only_rank_0_reports_a_finished_run(monkeypatch, capsys):
    from capfilt.jobs.commands.pretrain import report

    summary = {"finished": True, "exported": ["out/itm"], "steps": 3, "last": {"loss": 1.0}}
    monkeypatch.setenv("RANK", "1")
    assert report(summary) == 0 and capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    report(summary)
    assert json.loads(capsys.readouterr().out) == {"exported": ["out/itm"], "steps": 3, "last": {"loss": 1.0}}
    report({**summary, "finished": False, "exported": []})
    assert json.loads(capsys.readouterr().out) == {"stopped_at": 3, "resume_with": "--resume"}
