"""capfilt.model.builders.out_dirs: model directories written whole or not at all, and the leftovers of killed runs."""
import os
import subprocess

import pytest

from capfilt.model.builders.out_dirs import staged_dir


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_failed_block_leaves_the_output_as_it_was(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "config.json").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_dir(out) as stage:
            (stage / "config.json").write_text("new")
            raise RuntimeError("killed half way")
    assert (out / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    with staged_dir(out) as stage:
        (stage / "config.json").write_text("new")
    assert (out / "config.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_leftovers_of_dead_runs_are_removed_and_a_live_runs_kept(tmp_path):
    """A kill -9 skips the cleanup: `convert` and `models init` left `.m.partial-PID-xxxx`
    (with weights inside) beside the output for good."""
    out = tmp_path / "m"
    dead = _dead_pid()
    for name in (f".m.partial-{dead}-abcd1234", f".m.old-{dead}-abcd1234"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x" * 10)
    live = tmp_path / f".m.partial-{os.getpid()}-feed0000"  # a run at work (this process)
    live.mkdir()
    other = tmp_path / f".mm.partial-{dead}-abcd1234"  # another output's leftover
    other.mkdir()
    with staged_dir(out) as stage:
        (stage / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".m.partial-%d-feed0000" % os.getpid(),
                                                                 other.name, "m"])
