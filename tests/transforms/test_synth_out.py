"""`capfilt synth` writes its world whole or not at all (transforms/synth/world.py staging).

A run interrupted in-process (KeyboardInterrupt) or killed with SIGKILL in a child process must
leave --out as it was, and re-running the same command must give the bytes of an uninterrupted
run. The child kills itself at a chosen row, so where the kill lands does not depend on timing.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import capfilt.transforms as transforms
import capfilt.transforms.synth.world as synth_world
from capfilt.jobs.cli import main

ROOT = Path(transforms.__file__).resolve().parents[1]  # the checkout under test, for the child
MARKER = ".capfilt-synth-partial"  # = synth_world.STAGE_MARKER: on disk, so pinned here

# The child runs `capfilt synth` and SIGKILLs itself: at row KEY ("row:KEY"), or when the new
# world is about to be renamed over --out ("swap"), after a previous world was moved aside.
CHILD = r"""
import json, os, pathlib, signal, sys
import capfilt.transforms.synth.world as sw
from capfilt.jobs.cli import main

where, argv = sys.argv[1], json.loads(sys.argv[2])
out_name = pathlib.Path(argv[argv.index("--out") + 1]).name

def die():
    os.kill(os.getpid(), signal.SIGKILL)  # no finally block or atexit runs, as with kill -9

if where.startswith("row:"):
    real_row = sw._raw_row
    def dying_row(row, size):
        if row["key"] == where[4:]:
            die()
        return real_row(row, size)
    sw._raw_row = dying_row
else:
    real_replace = pathlib.Path.replace
    def dying_replace(self, target):
        if pathlib.Path(target).name == out_name:
            die()
        return real_replace(self, target)
    pathlib.Path.replace = dying_replace
main(argv)
"""


def _args(out, *extra):
    # 20 web rows in shards of 8: web/00000..00002; "web_0000016" is the first row of web/00002
    return ["synth", "--out", str(out), "--n", "20", "--human", "4", "--test", "3",
            "--rows-per-shard", "8", "--no-progress", *extra]


def _hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path (every shard, truth, config)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _side_dirs(out: Path) -> list[str]:
    """Entries beside `out` that a synth run of `out` names: staging leftovers."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _kill_child(where: str, argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", CHILD, where, json.dumps(argv)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """{seed: file hashes} of uninterrupted runs of `_args` with seeds 0 and 1."""
    root = tmp_path_factory.mktemp("reference")
    hashes = {}
    for seed in (0, 1):
        assert main(_args(root / f"seed{seed}", "--seed", str(seed))) == 0
        hashes[seed] = _hashes(root / f"seed{seed}")
    assert sorted(hashes[0]) == sorted(hashes[1]) and hashes[0] != hashes[1]
    assert {"truth.parquet", "synth_config.json", "web/00002.parquet", "test/00000.parquet"} <= set(hashes[0])
    return hashes


def test_interrupted_run_leaves_nothing_and_reruns(tmp_path, monkeypatch, reference, capsys):
    out = tmp_path / "world"
    real_row = synth_world._raw_row

    def interrupted(row, size):
        if row["key"] == "web_0000016":  # web/00000 and web/00001 are written by now
            raise KeyboardInterrupt
        return real_row(row, size)

    monkeypatch.setattr(synth_world, "_raw_row", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(_args(out))
    monkeypatch.undo()
    assert main(_args(out)) == 0  # the same command, straight away
    assert _hashes(out) == reference[0]
    assert _side_dirs(out) == []


def test_kill_9_leaves_out_absent_and_the_same_command_reruns(tmp_path, reference, capsys):
    out = tmp_path / "world"
    child = _kill_child("row:web_0000016", _args(out))
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert not out.exists()
    leftovers = _side_dirs(out)
    assert len(leftovers) == 1 and leftovers[0].startswith(".world.partial-"), leftovers
    assert main(_args(out)) == 0
    assert _hashes(out) == reference[0]
    assert _side_dirs(out) == []  # the killed run's staging directory is gone


def test_kill_9_during_overwrite_keeps_the_previous_world(tmp_path, reference, capsys):
    out = tmp_path / "world"
    assert main(_args(out)) == 0
    command = _args(out, "--seed", "1", "--overwrite")
    child = _kill_child("row:web_0000016", command)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert _hashes(out) == reference[0]  # whole: not a shard deleted or replaced
    assert main(command) == 0
    assert _hashes(out) == reference[1]
    assert _side_dirs(out) == []


def test_kill_9_inside_the_swap_restores_the_previous_world(tmp_path, reference, capsys):
    """Killed after the previous world was moved aside and before the new one took its place:
    the next run puts the previous world back before it does anything else."""
    out = tmp_path / "world"
    assert main(_args(out)) == 0
    command = _args(out, "--seed", "1", "--overwrite")
    child = _kill_child("swap", command)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert len(_side_dirs(out)) == 1
    with pytest.raises(ValueError, match="already holds a synthetic world"):
        main(_args(out))  # without --overwrite: the previous world is back, and kept
    assert _hashes(out) == reference[0] and _side_dirs(out) == []
    assert main(command) == 0
    assert _hashes(out) == reference[1] and _side_dirs(out) == []


def _dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    return int(child.stdout)  # exited and reaped


def test_only_synth_leftovers_of_dead_runs_are_deleted(tmp_path, reference, capsys):
    out = tmp_path / "world"
    dead = _dead_pid()

    def side(name, marker=True):
        path = tmp_path / name
        (path / "world" / "web").mkdir(parents=True)
        (path / "world" / "web" / "00000.parquet").write_bytes(b"PAR1 truncated")
        if marker:
            (path / MARKER).write_text("")
        return path

    killed = side(f".world.partial-{dead}-0123abcd")
    running = side(f".world.partial-{os.getpid()}-4567cdef")  # a live process: maybe still writing
    unmarked = side(f".world.partial-{dead}-89abcdef", marker=False)  # not provably synth's
    misnamed = side(".world.partial-mine")
    other_out = side(f".world2.partial-{dead}-0123abcd")  # another --out's leftover
    assert main(_args(out)) == 0
    assert _hashes(out) == reference[0]
    assert not killed.exists()
    assert all(p.is_dir() for p in (running, unmarked, misnamed, other_out))


def test_a_non_empty_out_that_is_not_a_world_is_refused_and_kept(tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        with pytest.raises(ValueError, match="is not empty and is not a synthetic world"):
            main(_args(out, *extra))
    assert _hashes(out) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}
    # a world with a file synth did not write: --overwrite would delete it, so it is refused
    world = tmp_path / "world"
    assert main(_args(world)) == 0
    (world / "web" / "README").write_text("mine")
    before = _hashes(world)
    with pytest.raises(ValueError, match="README is not synth's"):
        main(_args(world, "--overwrite"))
    assert _hashes(world) == before
    # another command's output is named
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["BlipForConditionalGeneration"]}')
    with pytest.raises(ValueError, match=f"--out {model} is a model directory \\(BlipForConditionalGeneration\\), "
                                         f"not a synthetic world; synth writes only"):
        main(_args(model, "--overwrite"))
    assert [p.name for p in model.iterdir()] == ["config.json"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        main(_args(tmp_path / "file"))
    assert _side_dirs(out) == _side_dirs(world) == []


def test_empty_out_and_symlinked_out_are_written(tmp_path, reference, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(_args(empty)) == 0
    assert _hashes(empty) == reference[0]
    link = tmp_path / "link"
    link.symlink_to(empty, target_is_directory=True)
    assert main(_args(link, "--seed", "1", "--overwrite")) == 0
    assert link.is_symlink() and _hashes(empty) == reference[1]
    assert _side_dirs(empty) == _side_dirs(link) == []
