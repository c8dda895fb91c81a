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
