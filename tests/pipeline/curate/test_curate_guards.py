"""What `capfilt curate` refuses, and what it leaves behind when it does: option ranges, the
settings fingerprint, --out paths that cannot hold a curate output, unreadable shard data and
done markers whose outputs are gone (pipeline/options.py, pipeline/state.py, pipeline/curate.py,
pipeline/sources.py). End-to-end resume cases with full runs are in tests/test_curate.py."""
import argparse
import hashlib
import json
import math
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.pipeline.curate.errors import StageError
from capfilt.pipeline.curate.options import CurateConfig
from capfilt.transforms.schemas import RAW_SCHEMA
from cli_run import error_line, run_cli


def model_args(tiny_models):
    return ["--captioner", str(tiny_models["captioner"]), "--filter", str(tiny_models["itm"]),
            "--clip", str(tiny_models["clip"]), "--num-captions", "1", "--max-length", "8", "--min-length", "2",
            "--torch-threads", "1", "--precision", "fp32"]


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def two_rows(tmp_path, synth_world):
    """One raw shard holding the first two web rows of the synthetic world."""
    table = pq.read_table(sorted((synth_world / "web").glob("*.parquet"))[0]).slice(0, 2)
    path = tmp_path / "in" / "00000.parquet"
    path.parent.mkdir()
    pq.write_table(table, path)
    return path


# --- option ranges (CurateConfig.__post_init__) ------------------------------------------------

BASE = dict(inputs=("x",), out="y", captioner="c", filter="f", clip="k")


@pytest.mark.parametrize("changes, message", [
    ({"max_pixels": 0}, "--max-pixels must be >= 1, got 0"),
    ({"min_side": 0}, "--min-side must be >= 1, got 0"),
    ({"max_aspect": 0.5}, "--max-aspect must be >= 1, got 0.5"),
    ({"max_length": 0, "min_length": 0}, "--max-length must be >= 1, got 0"),
    ({"min_length": -1}, "--min-length must be >= 0, got -1"),
    ({"min_length": 31}, "--min-length 31 exceeds --max-length 30"),
    ({"repetition_penalty": -1.0}, "--repetition-penalty must be > 0, got -1.0"),
    ({"repetition_penalty": 0.0}, "--repetition-penalty must be > 0, got 0.0"),
    ({"repetition_penalty": math.nan}, "--repetition-penalty must be > 0, got nan"),
    ({"torch_threads": 0}, "--torch-threads must be >= 1, got 0"),
    ({"top_k": -1}, "--top-k must be an integer >= 0 (0: off), got -1"),
    ({"itm_first_token": "sep"}, "--itm-first-token must be one of enc, cls, got 'sep'"),
])
def test_out_of_range_options_are_refused_naming_option_and_value(changes, message):
    with pytest.raises(ValueError) as err:
        CurateConfig(**BASE, **changes)
    assert str(err.value) == message


def test_boundary_values_are_accepted():
    cfg = CurateConfig(**BASE, max_pixels=1, min_side=1, max_aspect=1.0, max_length=1, min_length=1,
                       repetition_penalty=0.5, torch_threads=1)
    assert (cfg.max_pixels, cfg.max_aspect, cfg.torch_threads) == (1, 1.0, 1)
    assert CurateConfig(**BASE).torch_threads is None


@pytest.mark.parametrize("option, value, message", [
    ("--max-pixels", "0", "--max-pixels must be >= 1, got 0"),
    ("--min-side", "0", "--min-side must be >= 1, got 0"),
    ("--max-aspect", "0.5", "--max-aspect must be >= 1, got 0.5"),
    ("--repetition-penalty", "-1", "--repetition-penalty must be > 0, got -1.0"),
    ("--torch-threads", "0", "--torch-threads must be >= 1, got 0"),
    ("--top-k", "-1", "--top-k must be an integer >= 0 (0: off), got -1"),
])
def test_cli_exits_2_on_an_out_of_range_option_and_creates_nothing(tmp_path, option, value, message):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["curate", "--input", str(tmp_path / "*.parquet"), "--out", str(out),
                                    "--captioner", "c", "--filter", "f", "--clip", "k", option, value])
    assert code == 2 and error_line(stderr) == f"capfilt curate: error: {message}" and stdout == ""
    assert not out.exists()


def test_repetition_penalty_has_a_help_text():
    from capfilt.jobs.commands.curate import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    action = next(a for a in parser._actions if "--repetition-penalty" in a.option_strings)
    assert action.help and "repetition penalty" in action.help and "> 0" in action.help


def test_top_k_and_itm_first_token_have_help_defaults_and_choices():
    from capfilt.jobs.commands.curate import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    actions = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
    top_k, first = actions["--top-k"], actions["--itm-first-token"]
    assert top_k.default == 50 and "0 turns it off" in top_k.help and "4.15" in top_k.help
    assert first.default == "enc" and list(first.choices) == ["enc", "cls"] and "[ENC]" in first.help


def test_fingerprint_holds_top_k_and_the_itm_first_token():
    """Both change the curated rows: a resume with other values is refused like any setting."""
    fp = CurateConfig(**BASE, device="cpu", precision="fp32").fingerprint()
    assert (fp["top_k"], fp["itm_first_token"]) == (50, "enc")
    assert fp["decode_draft_side"] == 1024  # decoding at a reduced scale changes large images' rows too
    other = CurateConfig(**BASE, device="cpu", precision="fp32", top_k=0, itm_first_token="cls").fingerprint()
    assert (other["top_k"], other["itm_first_token"]) == (0, "cls")
    assert {k for k in fp if fp[k] != other[k]} == {"top_k", "itm_first_token"}
    no_filter = CurateConfig(**{**BASE, "filter": None}, no_filter=True, device="cpu", precision="fp32")
    no_captioner = CurateConfig(**{**BASE, "captioner": None}, no_synthetic=True, num_captions=0, device="cpu",
                                precision="fp32")
    assert no_filter.fingerprint()["itm_first_token"] is None and no_filter.fingerprint()["top_k"] == 50
    assert no_captioner.fingerprint()["top_k"] is None and no_captioner.fingerprint()["itm_first_token"] == "enc"


# --- the fingerprint records the resolved precision ---------------------------------------------

@pytest.fixture
def bf16_cpu(monkeypatch):
    """Make this CPU report native bf16, so that "auto" resolves the same on every machine."""
    import capfilt.model.inference.device as dev
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: True)


def test_fingerprint_holds_the_resolved_precision_and_the_check_margins(bf16_cpu, monkeypatch):
    fp = {p: CurateConfig(**BASE, device="cpu", precision=p).fingerprint() for p in ("auto", "fp32", "bf16-checked", "bf16")}
    assert fp["auto"]["precision"] == "bf16-checked" and fp["auto"] == fp["bf16-checked"]
    assert (fp["auto"]["itm_margin"], fp["auto"]["clip_margin"]) == (0.02, 0.01)
    assert fp["fp32"]["precision"] == "fp32" and fp["fp32"]["itm_margin"] is fp["fp32"]["clip_margin"] is None
    assert fp["bf16"]["precision"] == "bf16" and fp["bf16"]["clip_margin"] is None
    assert fp["fp32"] != fp["auto"] != fp["bf16"]
    other_margin = CurateConfig(**BASE, device="cpu", precision="bf16-checked", itm_margin=0.05).fingerprint()
    assert other_margin["itm_margin"] == 0.05
    # without native bf16, "auto" is fp32 and must not be resumed by a bf16-checked run elsewhere
    import capfilt.model.inference.device as dev
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: False)
    assert CurateConfig(**BASE, device="cpu").fingerprint()["precision"] == "fp32"


def test_resume_with_another_precision_is_refused(tmp_path, bf16_cpu):
    from capfilt.pipeline.curate.state import OutStore

    store = OutStore(str(tmp_path / "out"))
    first = {"settings": CurateConfig(**BASE, device="cpu").fingerprint(), "models": {}}
    store.save_settings(first)
    resumed = {"settings": CurateConfig(**BASE, device="cpu", precision="fp32").fingerprint(), "models": {}}
    with pytest.raises(ValueError, match=r"settings\.precision: was 'bf16-checked', now 'fp32'"):
        store.check_settings(resumed, done={"00000": {}})
    # an output written before the settings recorded the precision: what it used is unknown
    older = {"settings": {k: v for k, v in first["settings"].items() if k != "precision"}, "models": {}}
    store.save_settings(older)
    with pytest.raises(ValueError, match=r"settings\.precision: not recorded by the run that wrote it, now 'fp32'"):
        store.check_settings(resumed, done={"00000": {}})


def test_a_model_spelt_differently_with_the_same_content_resumes(tmp_path, tiny_models, two_rows, monkeypatch):
    """Identity for resume is a model's content hash, not its spelling: a relative path, the
    same with ./, or a copy elsewhere all resume; other bytes are refused, naming the hash."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_models["captioner"], tmp_path / "trained" / "captioner")
    shutil.copytree(tiny_models["captioner"], tmp_path / "backup" / "cap")
    args = model_args(tiny_models)
    out = tmp_path / "out"

    def curate(captioner):
        argv = ["curate", "--input", str(two_rows), "--out", str(out), *args]
        argv[argv.index("--captioner") + 1] = captioner
        return run_cli(argv)

    assert curate("trained/captioner")[0] == 0
    settings = (out / "_state" / "settings.json").read_bytes()
    for spelling in ("./trained/captioner", "backup/cap", str(tmp_path / "backup" / "cap") + "/"):
        code, stdout, stderr = curate(spelling)
        assert code == 0, stderr
        assert "0 curated now" in stdout and "other settings" not in stderr
    assert (out / "_state" / "settings.json").read_bytes() == settings  # not rewritten
    changed = tmp_path / "changed"
    shutil.copytree(tiny_models["captioner"], changed)
    (changed / "generation_config.json").write_text("{}")
    code, _, stderr = curate(str(changed))
    assert code == 2 and "other settings (models.captioner.sha256: was '" in error_line(stderr)


# --- settings without a done shard ------------------------------------------------------------

def test_stored_settings_without_a_done_shard_do_not_lock_out_a_retry(tmp_path):
    from capfilt.pipeline.curate.state import OutStore, read_json

    store = OutStore(str(tmp_path / "out"))
    old, new = {"settings": {"seed": 1}}, {"settings": {"seed": 2}}
    store.save_settings(old)
    store.check_settings(new, done={})  # nothing curated with the old settings: no refusal
    store.save_settings(new)
    assert read_json(store.settings_path) == new
    with pytest.raises(ValueError, match=r"other settings \(settings\.seed: was 2, now 1\)"):
        store.check_settings(old, done={"00000": {}})


# --- done markers whose outputs are gone ----------------------------------------------------------

def _done_shard(store, shard_id="00000", with_size=True):
    """Files and a marker as OutStore.complete writes them (by hand: no pipeline)."""
    from capfilt.pipeline.curate.state import output_name, write_json

    name = output_name(shard_id)
    marker = {"shard_id": shard_id, "input": {"size": 10}}
    for kind, folder in (("curated", store.shards_dir), ("errors", store.errors_dir)):
        Path(folder).mkdir(parents=True, exist_ok=True)
        data = f"{kind} rows of {shard_id}".encode()
        (Path(folder) / name).write_bytes(data)
        marker[kind] = {"name": name, "sha256": hashlib.sha256(data).hexdigest(), "rows": 1}
        if with_size:
            marker[kind]["size"] = len(data)
    Path(store.state_dir).mkdir(exist_ok=True)
    write_json(str(Path(store.state_dir) / f"{shard_id}.json"), marker)
    return marker


def _shard(shard_id="00000"):
    from capfilt.pipeline.curate.sources import ShardInfo

    return ShardInfo(f"in/{shard_id}.parquet", 0, shard_id, "parquet", 10, num_rows=1)


@pytest.mark.parametrize("damage, with_size, problem", [
    ("delete_curated", True, "shards/part-00000.parquet is missing"),
    ("delete_errors", True, "errors/part-00000.parquet is missing"),
    ("truncate_curated", True, "shards/part-00000.parquet has 3 bytes, its done marker says 21"),
    ("same_size_edit", False, "shards/part-00000.parquet does not match the sha256 in its done marker"),
])
def test_a_done_shard_with_a_missing_or_changed_output_is_not_done(tmp_path, damage, with_size, problem):
    from capfilt.pipeline.curate.state import OutStore

    store = OutStore(str(tmp_path / "out"))
    _done_shard(store, with_size=with_size)
    assert OutStore(store.out).is_done(_shard(), store.markers())  # intact
    curated = tmp_path / "out" / "shards" / "part-00000.parquet"
    if damage == "delete_curated":
        curated.unlink()
    elif damage == "delete_errors":
        (tmp_path / "out" / "errors" / "part-00000.parquet").unlink()
    elif damage == "truncate_curated":
        curated.write_bytes(b"cur")
    else:
        curated.write_bytes(curated.read_bytes().upper())
    fresh = OutStore(store.out)
    markers = fresh.markers()
    assert not fresh.is_done(_shard(), markers)
    assert fresh.output_problem(markers["00000"]).endswith(problem)
    assert fresh.intact(markers) == {}
    # cleaning up with the intact markers removes the broken marker and its remaining output
    fresh.clean_incomplete(fresh.intact(markers))
    assert sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file()) == []


def _curated(key, keep, reason=None):
    from capfilt.transforms.schemas import CURATED_SCHEMA

    row = dict.fromkeys(CURATED_SCHEMA.names)
    row.update(key=key, keep=keep, drop_reason=reason, synthetic_captions=[], captions=[], caption_sources=[])
    return row


def test_workers_write_files_and_receipt_and_the_launcher_commits_markers(tmp_path):
    """A shard's files are written under their final names by the worker, which also records
    their sizes, sha256s and counts (and the input's sha256) in a receipt; the launcher checks
    the receipt against the plan and the listed sizes, and only then writes the marker."""
    from capfilt.pipeline.curate.sinks import WriteShardFn
    from capfilt.pipeline.curate.sources import ShardInfo
    from capfilt.pipeline.curate.state import OutStore
    from capfilt.transforms.rows import ErrorRow

    raw = tmp_path / "in" / "00000.parquet"
    raw.parent.mkdir()
    raw.write_bytes(b"input bytes")
    shard = ShardInfo(str(raw), 0, "00000", "parquet", raw.stat().st_size, num_rows=4)
    store = OutStore(str(tmp_path / "out"))
    target = store.target(store.staging_dir("run1"), shard)
    error = ErrorRow("b", None, "decode", "truncated", "cut short", 0, 1).record()
    rows = [("curated", 3, _curated("d", False, "below_threshold"), (("rank", "cpu/fp32"),)),
            ("error", 1, error, ()), ("shard", -1, None, ()),
            ("curated", 0, _curated("a", True), (("rank", "cpu/fp32"), ("filter", "cpu/bf16-checked"))),
            ("curated", 2, _curated("c", True), (("rank", "cpu/fp32"),))]
    assert list(WriteShardFn({0: target}).process((0, rows))) == ["00000"]
    curated = tmp_path / "out" / "shards" / "part-00000.parquet"
    assert pq.read_table(curated).column("key").to_pylist() == ["a", "c", "d"]  # sorted by input row
    marker = store.commit(target)
    assert marker["counts"] == {"input_rows": 4, "kept": 2, "dropped": 1, "errors": 1,
                                "drop_reasons": {"below_threshold": 1}, "error_types": {"decode/truncated": 1}}
    assert marker["curated"]["size"] == curated.stat().st_size
    assert marker["curated"]["sha256"] == hashlib.sha256(curated.read_bytes()).hexdigest()
    assert marker["input"]["sha256"] == hashlib.sha256(b"input bytes").hexdigest()
    assert marker["ran_on"] == {"filter": ["cpu/bf16-checked"], "rank": ["cpu/fp32"]}
    assert json.loads((tmp_path / "out" / "_state" / "00000.json").read_text()) == marker
    assert store.is_done(shard, store.markers())


def test_a_full_disk_at_a_worker_write_names_the_file(tmp_path, monkeypatch):
    import errno

    from capfilt.pipeline import files
    from capfilt.pipeline.curate.sinks import write_parquet
    from capfilt.transforms.schemas import ERROR_SCHEMA

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files._Counting, "write", full)
    path = str(tmp_path / "errors" / "part-00000.parquet")
    with pytest.raises(OSError) as err:
        write_parquet(path, [], ERROR_SCHEMA)
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, path)
    assert list((tmp_path / "errors").iterdir()) == []  # no temporary file left


def test_commit_refuses_a_receipt_that_does_not_match(tmp_path):
    from capfilt.pipeline.curate.sinks import WriteShardFn
    from capfilt.pipeline.curate.sources import ShardInfo
    from capfilt.pipeline.curate.state import OutStore

    raw = tmp_path / "00000.parquet"
    raw.write_bytes(b"x")
    shard = ShardInfo(str(raw), 0, "00000", "parquet", 1, num_rows=1)
    store = OutStore(str(tmp_path / "out"))
    target = store.target(store.staging_dir("r"), shard)
    with pytest.raises(RuntimeError, match="left no receipt"):
        store.commit(target)
    # a worker that lost a row: the identity fails where the rows are written
    with pytest.raises(RuntimeError, match="accounting mismatch in shard .*input_rows 1 != kept 0"):
        list(WriteShardFn({0: target}).process((0, [("shard", -1, None, ())])))
    list(WriteShardFn({0: target}).process((0, [("curated", 0, _curated("a", True), ())])))
    with open(target.curated, "ab") as f:  # changed after the worker wrote it
        f.write(b"junk")
    with pytest.raises(RuntimeError, match=r"part-00000.parquet: \d+ bytes after the pipeline, its receipt says"):
        store.commit(target)
    assert not (tmp_path / "out" / "_state" / "00000.json").exists()


# --- --out paths --------------------------------------------------------------------------------

def test_a_release_or_foreign_out_is_refused_untouched_even_with_overwrite(tmp_path, tiny_models, two_rows):
    release = tmp_path / "release"
    (release / "shards").mkdir(parents=True)
    (release / "shards" / "part-00000.parquet").write_bytes(b"a release shard")
    (release / "manifest.json").write_text('{"format": "capfilt-release/1"}')
    (release / "card.md").write_text("the dataset card")
    before = snapshot(release)
    argv = ["curate", "--input", str(two_rows), "--out", str(release), *model_args(tiny_models)]
    for flags in ([], ["--overwrite"]):
        code, stdout, stderr = run_cli(argv + flags)
        assert code == 2 and stdout == ""
        assert error_line(stderr) == (
            f"capfilt curate: error: --out {release} is a capfilt release (manifest.json format "
            f"capfilt-release/1), not a curate output; curate writes only into an empty directory or "
            f"a curate output, whatever the flags: choose another --out")
        assert snapshot(release) == before  # nothing deleted or rewritten, no lock file added
    # a directory no capfilt command wrote: named by its entries
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (mine / "manifest.json").write_text('{"kind": "release"}')
    code, _, stderr = run_cli(["curate", "--input", str(two_rows), "--out", str(mine), "--overwrite",
                               *model_args(tiny_models)])
    assert code == 2
    assert error_line(stderr).startswith(f"capfilt curate: error: --out {mine} is not empty (manifest.json, "
                                         f"notes.txt) and no capfilt command wrote it; ")
    assert sorted(p.name for p in mine.iterdir()) == ["manifest.json", "notes.txt"]
    # an earlier curate output is replaced by --overwrite
    out = tmp_path / "cur"
    assert run_cli(["curate", "--input", str(two_rows), "--out", str(out), *model_args(tiny_models)])[0] == 0
    code, stdout, stderr = run_cli(["curate", "--input", str(two_rows), "--out", str(out), "--overwrite",
                                    *model_args(tiny_models)])
    assert code == 0, stderr
    assert "1 curated now" in stdout
    assert json.loads((out / "stats.json").read_text())["input_rows"] == 2


def test_what_is_not_a_curate_output_is_named_on_object_storage(s3_root):
    from apache_beam.io.filesystems import FileSystems

    from capfilt.pipeline.curate.state import OutStore

    def put(url, data):
        with FileSystems.create(url, compression_type="uncompressed") as f:
            f.write(data)

    put(f"{s3_root}/rel/manifest.json", b'{"format": "capfilt-release/1"}')
    put(f"{s3_root}/rel/shards/part-00000.parquet", b"a release shard")
    with pytest.raises(ValueError, match=r"^--out s3://.*/rel is a capfilt release \(manifest.json format "
                                         r"capfilt-release/1\), not a curate output"):
        OutStore(f"{s3_root}/rel").check_is_curate_output()
    put(f"{s3_root}/deep/a/b/c.bin", b"x")  # keys only below a folder: not empty either
    with pytest.raises(ValueError, match=r"^--out s3://.*/deep is not empty \(a\) and no capfilt command wrote it"):
        OutStore(f"{s3_root}/deep").check_is_curate_output()
    put(f"{s3_root}/cur/_state/settings.json", b"{}")
    put(f"{s3_root}/cur/manifest.json", b"{}")
    OutStore(f"{s3_root}/cur").check_is_curate_output()
    OutStore(f"{s3_root}/absent").check_is_curate_output()
    assert FileSystems.exists(f"{s3_root}/rel/shards/part-00000.parquet")


def test_overwrite_keeps_the_settings_that_mark_a_curate_output_until_they_are_replaced(tmp_path):
    """A run killed between --overwrite's deletion and its new settings leaves a directory that
    is still recognised as a curate output (report.html beside it is not curate's)."""
    from capfilt.pipeline.curate.state import OutStore

    store = OutStore(str(tmp_path / "out"))
    _done_shard(store)
    store.save_settings({"settings": {"seed": 1}})
    (tmp_path / "out" / "stats.json").write_text("{}")
    (tmp_path / "out" / "report.html").write_text("<html>")
    store.reset()
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file()) == [
        "_state/settings.json", "report.html"]
    OutStore(store.out).check_is_curate_output()


def test_an_existing_curate_output_and_an_empty_dir_are_accepted(tmp_path):
    from capfilt.pipeline.curate.state import LOCK_NAME, OutStore

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / LOCK_NAME).write_text("")  # left by a run killed before it wrote anything
    OutStore(str(empty)).check_is_curate_output()
    OutStore(str(tmp_path / "not-yet")).check_is_curate_output()
    done = OutStore(str(tmp_path / "done"))
    done.save_settings({"settings": {}})
    (tmp_path / "done" / "stats.json").write_text("{}")
    done.check_is_curate_output()


def test_unusable_out_paths_are_clean_errors(tmp_path, tiny_models, two_rows):
    a_file = tmp_path / "truth.parquet"
    a_file.write_bytes(b"not a directory")
    for out, message in ((a_file / "x", f"--out {a_file / 'x'}: cannot create the output directory ("),
                         (a_file, f"--out {a_file} exists and is not a directory")):
        code, stdout, stderr = run_cli(["curate", "--input", str(two_rows), "--out", str(out),
                                        *model_args(tiny_models)])
        assert code == 2 and stdout == ""
        assert error_line(stderr).startswith(f"capfilt curate: error: {message}")
    assert a_file.read_bytes() == b"not a directory"


def test_a_refused_run_leaves_no_new_out_behind(tmp_path, tiny_models, two_rows):
    """Checks that run after the lock is taken (here: the input glob) must not leave a new
    --out holding only .lock."""
    out = tmp_path / "new"
    code, _, stderr = run_cli(["curate", "--input", str(tmp_path / "none" / "*.parquet"), "--out", str(out),
                               *model_args(tiny_models)])
    assert code == 2 and "matches no file" in error_line(stderr)
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    code, _, _ = run_cli(["curate", "--input", str(tmp_path / "none" / "*.parquet"), "--out", str(existing),
                          *model_args(tiny_models)])
    assert code == 2 and existing.is_dir()  # a directory the user made stays


def test_clean_incomplete_removes_the_run_records_temp_files(tmp_path):
    """A kill while stats.json / manifest.json were being written left their temp files in
    --out for good (only shards/, errors/ and _state/ were swept)."""
    from capfilt.pipeline.curate.state import OutStore

    out = tmp_path / "out"
    store = OutStore(str(out))
    out.mkdir()
    for name in ("stats.json.tmp-18043", "manifest.json.tmp-7", "stats.json"):
        (out / name).write_text("{}")
    store.clean_incomplete({})
    assert sorted(p.name for p in out.iterdir()) == ["stats.json"]


def test_curate_puts_beam_log_levels_back(tmp_path, tiny_models):
    """curate quiets Beam's loggers while it runs; they stayed quiet for the rest of the process,
    hiding Beam's errors from the stages a bootstrap or run-job runs after it."""
    import logging

    names = ("apache_beam", "apache_beam.runners.common")
    before = {name: logging.getLogger(name).level for name in names}
    code, _, _ = run_cli(["curate", "--input", str(tmp_path / "none" / "*.parquet"), "--out", str(tmp_path / "o"),
                          *model_args(tiny_models)])
    assert code == 2
    assert {name: logging.getLogger(name).level for name in names} == before


# --- models and --device are checked before --out is touched ----------------------------------

@pytest.mark.parametrize("option, value, message", [
    ("--captioner", "Salesforce/blip-image-captioning-large",
     "--captioner Salesforce/blip-image-captioning-large: cannot read the model config of"),
    ("--filter", "Salesforce/blip-itm-large-coco", "--filter Salesforce/blip-itm-large-coco: cannot read the model"),
    ("--clip", "ViT-B-32:no-such-tag", "--clip ViT-B-32:no-such-tag: open_clip has no pretrained tag 'no-such-tag'"),
    ("--clip", "No-Such-Arch:openai", "--clip No-Such-Arch:openai: open_clip has no architecture 'No-Such-Arch'"),
    ("--clip", "ViT-B-32:openai", "--clip ViT-B-32:openai: cannot find its files"),
    ("--device", "bogus", "--device bogus: unknown device 'bogus'"),
])
def test_unloadable_models_and_devices_fail_before_out_exists(tmp_path, tiny_models, two_rows, monkeypatch,
                                                              option, value, message):
    """Hub ids are resolved offline (HF_HUB_OFFLINE=1 in conftest) against an empty hub cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    out = tmp_path / "out"
    argv = ["curate", "--input", str(two_rows), "--out", str(out), *model_args(tiny_models), option, value]
    code, stdout, stderr = run_cli(argv)
    assert code == 2 and stdout == ""
    assert error_line(stderr).startswith(f"capfilt curate: error: {message}")
    assert not out.exists()


# --- unreadable shard data --------------------------------------------------------------------

@pytest.fixture
def corrupt_shard(tmp_path, synth_world):
    """A web shard with 2,000 bytes flipped in the middle: its footer reads, a data page does not."""
    src = sorted((synth_world / "web").glob("*.parquet"))[0]
    data = bytearray(src.read_bytes())
    mid = len(data) // 2
    for i in range(mid - 1000, mid + 1000):
        data[i] ^= 0xFF
    path = tmp_path / "corrupt" / "00000.parquet"
    path.parent.mkdir()
    path.write_bytes(bytes(data))
    return path


def test_read_failure_mid_shard_gives_error_rows_for_the_unread_rest(corrupt_shard):
    from capfilt.pipeline.curate.sources import ReadShardFn, discover_shards, to_sample, validate_shard

    info = validate_shard(discover_shards([str(corrupt_shard)])[0])  # the footer is fine
    assert info.num_rows == 32
    rows = list(ReadShardFn().process(info))
    assert [r.row for r in rows] == list(range(32))
    unread = [r for r in rows if "read_error" in r.values]
    assert unread and unread == rows[32 - len(unread):]  # the rest, from the first page that fails
    kind, message = unread[0].values["read_error"]
    assert kind == "unreadable_data"
    assert re.fullmatch(rf"{corrupt_shard}: cannot read the shard after {32 - len(unread)} rows "
                        r"\(OSError: Corrupt snappy compressed data\.?\); the rest of the shard cannot be read", message)
    with pytest.raises(StageError) as err:
        to_sample(unread[0])
    assert (err.value.stage, err.value.error_type) == ("read", "unreadable_data")


def test_a_read_failure_that_does_not_recur_costs_no_row(two_rows, monkeypatch):
    from capfilt.pipeline.curate import sources

    info = sources.validate_shard(sources.discover_shards([str(two_rows)])[0])
    real, calls = sources.reader.raw_rows, []

    def flaky(path, opener):
        calls.append(path)
        rows = real(path, opener)
        yield next(rows)
        if len(calls) == 1:
            raise OSError("connection reset")
        yield from rows

    monkeypatch.setattr(sources.reader, "raw_rows", flaky)
    rows = list(sources.ReadShardFn().process(info))
    assert len(calls) == 2 and [r.row for r in rows] == [0, 1]
    assert [r.key for r in rows] == pq.read_table(two_rows, columns=["key"]).column("key").to_pylist()


def test_a_corrupt_shard_does_not_hold_up_the_others(tmp_path, tiny_models, synth_world, corrupt_shard):
    """One corrupt shard in ten, two shards per pipeline: every shard is committed, the corrupt
    one with error rows for what cannot be read; the shard sharing its pipeline is not redone."""
    web = pq.read_table(sorted((synth_world / "web").glob("*.parquet"))[0])
    (tmp_path / "in").mkdir()
    for i in range(10):
        if i == 3:
            corrupt_shard.rename(tmp_path / "in" / "00003.parquet")
        else:
            pq.write_table(web.slice(i, 1), tmp_path / "in" / f"{i:05d}.parquet")
    out = tmp_path / "out"
    argv = ["curate", "--input", str(tmp_path / "in" / "*.parquet"), "--out", str(out), *model_args(tiny_models),
            "--shards-per-pipeline", "2", "--no-synthetic"]
    code, stdout, stderr = run_cli(argv)
    assert code == 0, stderr
    assert sorted(p.stem for p in (out / "_state").glob("0*.json")) == [f"{i:05d}" for i in range(10)]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["input_rows"] == 9 + 32 == stats["kept"] + stats["dropped"] + stats["errors"]
    errors = pq.read_table(out / "errors" / "part-00003.parquet").to_pylist()
    curated = pq.read_metadata(out / "shards" / "part-00003.parquet").num_rows
    assert errors and all((e["stage"], e["error_type"]) == ("read", "unreadable_data") for e in errors)
    assert [e["input_row"] for e in errors] == list(range(curated, 32))
    before = snapshot(out)
    code, stdout, stderr = run_cli(argv)  # nothing left to do
    assert code == 0 and snapshot(out) == before


def test_an_input_renamed_by_a_new_shard_of_the_same_name_is_not_counted_twice(tmp_path, synth_world, tiny_models):
    """img2dataset numbers every download from 00000: when raw/b/00000 arrives beside raw/a/00000,
    the first becomes shard a_00000; its old output 00000 must not stay beside the new one."""
    web = sorted((synth_world / "web").glob("*.parquet"))[0]
    table = pq.read_table(web)
    (tmp_path / "raw" / "a").mkdir(parents=True)
    pq.write_table(table.slice(0, 3), tmp_path / "raw" / "a" / "00000.parquet")
    out = tmp_path / "out"
    argv = ["curate", "--input", str(tmp_path / "raw" / "**" / "*.parquet"), "--out", str(out), *model_args(tiny_models)]
    code, _, stderr = run_cli(argv)
    assert code == 0, stderr
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["part-00000.parquet"]
    (tmp_path / "raw" / "b").mkdir()
    pq.write_table(table.slice(3, 2), tmp_path / "raw" / "b" / "00000.parquet")
    code, stdout, stderr = run_cli(argv)
    assert code == 0, stderr
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["part-a_00000.parquet", "part-b_00000.parquet"]
    assert sorted(p.name for p in (out / "_state").glob("*_00000.json")) == ["a_00000.json", "b_00000.json"]
    assert not (out / "_state" / "00000.json").exists()
    stats = json.loads((out / "stats.json").read_text())
    assert stats["input_rows"] == 5 == stats["kept"] + stats["dropped"] + stats["errors"]
    rows = sum(pq.read_metadata(p).num_rows for p in (out / "shards").iterdir())
    rows += sum(pq.read_metadata(p).num_rows for p in (out / "errors").iterdir())
    assert rows == 5


def test_a_key_naming_another_image_is_a_key_collision_not_a_duplicate(tmp_path, synth_world, tiny_models):
    """Two img2dataset downloads both number their keys from 000000000: the second download's
    rows name other images under the same keys. They are error rows that say why."""
    table = pq.read_table(sorted((synth_world / "web").glob("*.parquet"))[0])
    first, second = table.slice(0, 2), table.slice(2, 2)
    second = second.set_column(second.schema.get_field_index("key"), "key", first.column("key"))
    for name, part in (("a", first), ("b", second)):
        (tmp_path / "raw" / name).mkdir(parents=True)
        pq.write_table(part, tmp_path / "raw" / name / "00000.parquet")
    out = tmp_path / "out"
    code, _, stderr = run_cli(["curate", "--input", str(tmp_path / "raw" / "*" / "*.parquet"), "--out", str(out),
                               *model_args(tiny_models)])
    assert code == 0, stderr
    errors = pq.read_table(out / "errors" / "part-b_00000.parquet").to_pylist()
    assert [(e["key"], e["error_type"], e["input_row"]) for e in errors] == [
        (k, "key_collision", i) for i, k in enumerate(first.column("key").to_pylist())]
    assert all("img2dataset numbers keys per download" in e["error_message"] for e in errors)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["input_rows"] == 4 and stats["errors"] == 2


def test_bundle_based_direct_runner_with_error_rows(tmp_path, synth_world, tiny_models):
    """BundleBasedDirectRunner's Metrics miss counter updates (one bundle per step): with error
    rows beside good ones the run used to fail its accounting; its counts come from the files."""
    rows = pq.read_table(sorted((synth_world / "web").glob("*.parquet"))[0]).slice(0, 5).to_pylist()
    for row in rows[3:]:
        row["jpg"] = b"not an image"
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=RAW_SCHEMA), tmp_path / "in" / "00000.parquet")
    out = tmp_path / "out"
    code, _, stderr = run_cli(["curate", "--input", str(tmp_path / "in" / "*.parquet"), "--out", str(out),
                               *model_args(tiny_models), "--runner", "BundleBasedDirectRunner"])
    assert code == 0, stderr
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["input_rows"], stats["errors"]) == (5, 2)
    assert stats["kept"] + stats["dropped"] == 3 == pq.read_metadata(out / "shards" / "part-00000.parquet").num_rows


def test_direct_num_workers_zero_means_one_per_core(monkeypatch):
    from capfilt.pipeline.curate.options import make_pipeline_options, num_workers

    monkeypatch.setattr("os.cpu_count", lambda: 6)
    assert num_workers(make_pipeline_options(["--direct_num_workers", "0"])) == 6
    assert num_workers(make_pipeline_options(["--direct_num_workers", "3"])) == 3
    assert num_workers(make_pipeline_options([])) == 1


def test_duplicate_key_rows_do_not_depend_on_shards_per_pipeline(tmp_path, synth_world, tiny_models):
    """The same key in a later shard: its error row names the kept row by url, so the error file
    is the same whether the first shard ran in the same pipeline or an earlier one."""
    rows = pq.read_table(sorted((synth_world / "web").glob("*.parquet"))[0]).slice(0, 3)
    (tmp_path / "in").mkdir()
    pq.write_table(rows.slice(0, 2), tmp_path / "in" / "00000.parquet")
    pq.write_table(rows.slice(1, 2), tmp_path / "in" / "00001.parquet")  # row 1 again, then row 2
    errors = []
    for name, extra in (("together", []), ("apart", ["--shards-per-pipeline", "1"])):
        out = tmp_path / name
        code, _, stderr = run_cli(["curate", "--input", str(tmp_path / "in" / "*.parquet"), "--out", str(out),
                                   *model_args(tiny_models), *extra])
        assert code == 0, stderr
        errors.append(pq.read_table(out / "errors" / "part-00001.parquet").to_pylist())
    assert errors[0] == errors[1]
    key, url = rows.column("key")[1].as_py(), rows.column("url")[1].as_py()
    assert [(e["key"], e["error_type"], e["input_row"]) for e in errors[0]] == [(key, "duplicate_key", 0)]
    assert errors[0][0]["error_message"] == f"key {key!r} already seen (the first row, url {url!r}, is kept)"


def test_a_second_curate_on_a_busy_out_exits_5_and_touches_nothing(tmp_path, tiny_models, two_rows):
    """Another run holding --out's lock is not a failure of this one: its own exit code (5), and
    the holder's files stay as they are."""
    from capfilt.transforms.files import locks

    out = tmp_path / "out"
    out.mkdir()
    holder = locks.acquire(out / ".lock")
    try:
        before = snapshot(out)
        code, stdout, stderr = run_cli(["curate", "--input", str(two_rows), "--out", str(out), *model_args(tiny_models)])
    finally:
        holder.release()
    assert code == 5 and stdout == ""
    assert error_line(stderr) == f"capfilt curate: busy: {out}: another curate run is working in this directory"
    assert snapshot(out) == before
