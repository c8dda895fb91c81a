"""What `capfilt pretrain --overwrite` may delete (jobs/commands/pretrain.py prepare_run_dir):
everything in --out, so only when --out is a training run's output."""
from argparse import Namespace

import pytest

from capfilt.jobs.commands.pretrain import prepare_run_dir


def _args(out, overwrite=False):
    return Namespace(out=str(out), resume=False, overwrite=overwrite)


def test_overwrite_deletes_a_training_run_but_refuses_a_release(tmp_path):
    release = tmp_path / "release"
    (release / "shards").mkdir(parents=True)
    (release / "manifest.json").write_text('{"format": "capfilt-release/1"}')
    for overwrite in (False, True):
        with pytest.raises(ValueError) as err:
            prepare_run_dir(_args(release, overwrite), "pretrain")
        assert str(err.value) == (
            f"--out {release} is a capfilt release (manifest.json format capfilt-release/1), not a training "
            f"run's output; pretrain writes only into an empty directory or a training run's output, "
            f"whatever the flags: choose another --out")
    assert sorted(p.name for p in release.iterdir()) == ["manifest.json", "shards"]
    run = tmp_path / "run"
    (run / "checkpoints" / "pretrain").mkdir(parents=True)
    (run / "pretrain_log.jsonl").write_text("{}\n")
    (run / "captioner").mkdir()
    with pytest.raises(ValueError, match="pass --resume to continue the run there, or --overwrite"):
        prepare_run_dir(_args(run), "pretrain")
    prepare_run_dir(_args(run, overwrite=True), "pretrain")
    assert list(run.iterdir()) == []


def test_a_pretrain_run_writes_weights_and_checkpoints_with_the_umask(tmp_path, synth_world, tiny_tokenizer, umask):
    import json

    from capfilt.jobs.cli import main
    from file_modes import modes_below

    config = tmp_path / "micro.json"
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config.write_text(json.dumps({"vision_config": {**layers, "image_size": 32, "patch_size": 8},
                                  "text_config": layers, "image_text_hidden_size": 32, "projection_dim": 32}))
    out = tmp_path / "P"
    assert main(["pretrain", "--arch", "blip", "--data", str(synth_world / "human"), "--out", str(out),
                 "--steps", "1", "--batch-size", "4", "--no-progress", "--tokenizer", str(tiny_tokenizer),
                 "--model-config", str(config), "--checkpoint-every", "1"]) == 0
    files = {name: mode for name, mode in modes_below(out).items() if (out / name).is_file()}
    weights = sorted(name for name in files if name.endswith(".safetensors"))
    assert "captioner/model.safetensors" in weights and "itm/model.safetensors" in weights
    assert any(name.startswith("checkpoints/") for name in weights)
    assert files == {name: 0o666 & ~umask for name in files}
    # the fresh model the run started from is marked untrained, the models it trained are not
    from capfilt.model.specs import untrained

    assert untrained(out / "init" / "itm") and untrained(out / "init" / "captioner")
    assert not untrained(out / "captioner") and not untrained(out / "itm")
