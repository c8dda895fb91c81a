"""`capfilt run-job`: incremental steps, idempotence (a second run changes no file), exit codes.

Most tests replace the curate command by a small stand-in that honours its contract (curated
shards + stats.json, finished input shards skipped, --overwrite starts again) and give the real
release command a pixel embedder instead of CLIP, so they run in seconds. The end-to-end test
at the bottom runs the real curate on tiny models and the synthetic world.
"""
import argparse
import fcntl
import glob
import hashlib
import json
import re
import shutil
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.jobs.commands import curate as curate_cmd, ingest as ingest_cmd
from capfilt.pipeline.release import build as release_build
from capfilt.jobs.scheduled import run_job
from capfilt.jobs.cli import main
from capfilt.pipeline.release import manifest as release_manifest
from capfilt.pipeline.curate.sources import discover_shards
from release_data import image_bytes, near_copy, pixel_embedder, record_outputs, row, write_raw
from capfilt.transforms.schemas import CURATED_SCHEMA


def snapshot(root: Path) -> dict:
    """{relative path: (mtime_ns, sha256)} of every file under root."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


class FakeCurate:
    """Stands in for `capfilt curate`: one curated shard per raw shard, named by curate's own
    shard ids (pipeline.curate.sources.discover_shards, exit 2 when it refuses the input), a done
    marker per shard written last and holding the input's hash, done shards skipped, a changed
    input refused (exit 2) unless --overwrite, an output whose shard name changed curated again,
    the outputs recorded in manifest.json as curate records them."""

    def __init__(self):
        self.calls = []
        self.fail = False
        self.break_stats = False
        self.curated = []  # every input shard curated, in order, over all calls
        self.kill_after = None  # a callable run after each curated shard (tests kill the run there)

    def __call__(self, args):
        self.calls.append({"inputs": sorted(f for g in args.input for f in glob.glob(g, recursive=True)),
                           "overwrite": args.overwrite})
        if self.fail:
            return 1
        try:
            shards = discover_shards(args.input)
        except ValueError:
            return 2  # what `capfilt curate` returns for an input it refuses
        out = Path(args.out)
        if args.overwrite and out.exists():
            shutil.rmtree(out)
        (out / "shards").mkdir(parents=True, exist_ok=True)
        (out / "_state").mkdir(exist_ok=True)
        current = {shard.shard_id for shard in shards}
        for old in (out / "_state").glob("*.json"):
            if old.stem not in current:  # as curate does with a shard whose name changed
                old.unlink()
        for old in (out / "shards").glob("*.parquet"):
            if old.name.removeprefix("part-").removesuffix(".parquet") not in current:
                old.unlink()
        # Done markers hold the input's hash; like curate (which compares sizes) it refuses to
        # resume over a changed input without --overwrite, before any work.
        digest = {s.shard_id: hashlib.sha256(Path(s.path).read_bytes()).hexdigest() for s in shards}
        for shard in shards:
            marker = out / "_state" / f"{shard.shard_id}.json"
            if marker.exists() and json.loads(marker.read_text())["sha256"] != digest[shard.shard_id]:
                return 2
        for shard in shards:
            target = out / "shards" / f"part-{shard.shard_id}.parquet"
            marker = out / "_state" / f"{shard.shard_id}.json"
            if target.exists() and marker.exists():
                continue  # finished earlier
            rows = [row(r["key"], r["jpg"]) for r in pq.read_table(shard.path).to_pylist()]
            pq.write_table(pa.Table.from_pylist(rows, schema=CURATED_SCHEMA), target)
            marker.write_text(json.dumps({"sha256": digest[shard.shard_id]}))
            self.curated.append(str(shard.path))
            if self.kill_after:
                self.kill_after()
        n = sum(pq.ParquetFile(p).metadata.num_rows for p in (out / "shards").glob("*.parquet"))
        stats = {"input_rows": n, "kept": n, "dropped": 0, "errors": 1 if self.break_stats else 0}
        (out / "stats.json").write_text(json.dumps(stats))
        (out / "manifest.json").write_text(json.dumps({"models": {}}))
        record_outputs(out)
        return 0


@pytest.fixture
def job(tmp_path, monkeypatch):
    """A job over raw/*.parquet (two shards), with an eval set; curate faked, CLIP replaced."""
    fake = FakeCurate()
    monkeypatch.setattr(curate_cmd, "run", fake)
    monkeypatch.setattr(release_manifest, "clip_embedder", lambda spec: pixel_embedder)
    write_raw(tmp_path / "raw" / "a.parquet", [(f"a{i}", image_bytes(i)) for i in range(4)])
    write_raw(tmp_path / "raw" / "b.parquet", [("b0", image_bytes(10)), ("b1", near_copy(1))])
    write_raw(tmp_path / "eval" / "test.parquet", [("e0", image_bytes(2, quality=70))])
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "clip.bin").write_bytes(b"weights")
    path = tmp_path / "job.yaml"
    path.write_text(textwrap.dedent("""\
        name: nightly
        output_root: out
        inputs: {shards: "raw/*.parquet"}
        models: {captioner: models, filter: models, clip: models/clip.bin}
        curate: {num_captions: 3, itm_threshold: 0.4, beam_options: ["--direct_num_workers=1"]}
        release: {dedup_threshold: 0.9, decontaminate: "eval/*.parquet", rows_per_shard: 3, no_report: true}
        """))
    return path, fake


def released_keys(root):
    return sorted(pq.read_table(root / "out" / "release" / "shards").column("key").to_pylist())


def test_first_run_then_nothing_to_do_and_no_file_changes(job, capsys):
    path, fake = job
    root = path.parent
    assert main(["run-job", str(path)]) == 0
    assert "ran: curate (2 new shard(s)), release" in capsys.readouterr().out
    assert len(fake.calls) == 1 and fake.calls[0]["overwrite"] is False
    assert released_keys(root) == ["a0", "a1", "a3", "b0"]  # b1 near-dup of a1, a2 in the eval set
    before = snapshot(root / "out")
    assert main(["run-job", str(path)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert len(fake.calls) == 1
    assert snapshot(root / "out") == before


def test_a_curated_file_no_marker_names_is_not_a_change(job, capsys):
    """run-job compares the shards curate's manifest names (with the sha256 their writers
    recorded), not whatever lies in shards/: a killed run's leftover rebuilds nothing."""
    path, fake = job
    root = path.parent
    assert main(["run-job", str(path)]) == 0
    capsys.readouterr()
    stray = root / "out" / "curated" / "shards" / "part-99999.parquet"
    stray.write_bytes(b"left by a killed run")
    before = snapshot(root / "out" / "release")
    assert main(["run-job", str(path)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert snapshot(root / "out" / "release") == before


def test_new_shard_is_curated_incrementally_and_release_rebuilt(job, capsys):
    path, fake = job
    root = path.parent
    assert main(["run-job", str(path)]) == 0
    old_manifest = json.loads((root / "out/release/manifest.json").read_text())
    write_raw(root / "raw" / "c.parquet", [("c0", image_bytes(20))])
    assert main(["run-job", str(path)]) == 0
    assert fake.calls[-1] == {"inputs": sorted(str(p) for p in (root / "raw").glob("*.parquet")), "overwrite": False}
    assert "c0" in released_keys(root)
    m = json.loads((root / "out/release/manifest.json").read_text())
    assert m["counts"]["input_rows"] == old_manifest["counts"]["input_rows"] + 1
    release_manifest.check_counts(m)


def test_release_settings_change_rebuilds_only_the_release(job, capsys):
    path, fake = job
    root = path.parent
    assert main(["run-job", str(path)]) == 0
    path.write_text(path.read_text().replace("rows_per_shard: 3", "rows_per_shard: 1"))
    assert main(["run-job", str(path), "--dry-run"]) == 0
    assert "would run: release" in capsys.readouterr().out
    assert main(["run-job", str(path)]) == 0
    assert len(fake.calls) == 1
    assert len(list((root / "out/release/shards").glob("*.parquet"))) == 4


def test_curate_settings_or_model_change_recurates_with_overwrite(job):
    path, fake = job
    root = path.parent
    assert main(["run-job", str(path)]) == 0
    path.write_text(path.read_text().replace("num_captions: 3", "num_captions: 5"))
    assert main(["run-job", str(path)]) == 0
    assert fake.calls[-1]["overwrite"] is True
    (root / "models" / "clip.bin").write_bytes(b"new weights!")
    assert main(["run-job", str(path)]) == 0
    assert len(fake.calls) == 3 and fake.calls[-1]["overwrite"] is True


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("output_root: out\n", ""), "output_root is required"),
    (lambda t: t.replace("num_captions: 3", "num_captionz: 3"), "unknown options ['--num-captionz'"),
    (lambda t: t.replace("num_captions: 3", "out: elsewhere"), "curate.out: set by run-job itself"),
    (lambda t: t.replace('raw/*.parquet', 'nothing/*.parquet'), "matches no file"),
    (lambda t: t.replace("rows_per_shard: 3", "rows_per_shard: 3, colour: red"), "release: unknown keys ['colour']"),
    (lambda t: t.replace("dedup_threshold: 0.9", "dedup_threshold: 7"), "--dedup-threshold must be in"),
    (lambda t: t + "extra: 1\n", "unknown keys ['extra']"),
    (lambda t: "[not, a, mapping]\n", "expected a mapping"),
    # values curate's own config refuses, and Beam options no Beam parser knows
    (lambda t: t.replace("itm_threshold: 0.4", "itm_threshold: 1.5"),
     "curate: --itm-threshold must be in [0.0, 1.0], got 1.5"),
    (lambda t: t.replace("--direct_num_workers=1", "--direct_num_wrkers=1"),
     "curate.beam_options: unrecognized arguments: --direct_num_wrkers=1"),
    (lambda t: t.replace('beam_options: ["--direct_num_workers=1"]', 'beam_options: "--direct_num_workers=1"'),
     "curate.beam_options: expected a list"),
    (lambda t: t.replace("num_captions: 3", "runner: DirectRunner"), "Beam options go under curate.beam_options"),
    # img2dataset options are checked with the parser `capfilt ingest` uses
    (lambda t: t + "ingest: {options: {imagesize: 64}}\n", "ingest.options: --imagesize is neither"),
    (lambda t: t + "ingest: {options: {image_size: big}}\n", "--image_size: 'big' is not a valid int"),
    (lambda t: t + "ingest: {options: {output_format: zip}}\n", "ingest: bad option"),
    (lambda t: t + "ingest: {options: {output_folder: x}}\n", "ingest.options.output_folder: set by run-job itself"),
    (lambda t: t + "ingest: {image_size: 64}\n", "ingest: unknown keys ['image_size']"),
    # a model written as a path must exist (relative to the job file)
    (lambda t: t.replace("captioner: models,", "captioner: ./models/captioner,"),
     "models.captioner: model path './models/captioner' does not exist"),
    (lambda t: t.replace("filter: models,", "filter: models/itm,"),
     "models.filter: model path 'models/itm' does not exist"),
    (lambda t: t.replace("clip: models/clip.bin", "clip: /nowhere/clip"), "models.clip: model path '/nowhere/clip'"),
])
def test_config_errors_exit_2(job, capsys, edit, message):
    path, fake = job
    path.write_text(edit(path.read_text()))
    assert main(["run-job", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert fake.calls == []


def test_hub_ids_and_open_clip_specs_are_not_paths(job, capsys):
    path, fake = job
    path.write_text(path.read_text().replace("captioner: models,", "captioner: Salesforce/blip-image-captioning-large,")
                    .replace("clip: models/clip.bin", "clip: ViT-L-14:openai"))
    assert main(["run-job", str(path), "--dry-run"]) == 0
    assert "would run: curate (2 new shard(s)), release" in capsys.readouterr().out


def test_dry_run_lists_only_the_steps_the_job_has(job, capsys):
    path, fake = job
    path.write_text(re.sub(r"release: \{.*\}", "release: false", path.read_text()))
    assert main(["run-job", str(path), "--dry-run"]) == 0
    assert capsys.readouterr().out.strip() == "run-job nightly: would run: curate (2 new shard(s))"
    assert fake.calls == []


def test_img2dataset_layout_with_repeated_shard_names(job, capsys):
    """docs/scheduling.md's `raw/**/*.parquet` over img2dataset downloads, each numbered from
    00000: both are curated, also when the second download arrives after the first was curated.
    run-job resumes curate (no --overwrite); the real curate re-curates the renamed shard
    (test_repeated_shard_names_with_real_curate, and tests/test_curate_guards.py)."""
    path, fake = job
    root = path.parent
    shutil.rmtree(root / "raw")
    write_raw(root / "raw" / "a" / "00000.parquet", [(f"a{i}", image_bytes(i)) for i in range(3)])
    path.write_text(path.read_text().replace('"raw/*.parquet"', '"raw/**/*.parquet"'))
    assert main(["run-job", str(path)]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (root / "out/curated/shards").iterdir()) == ["part-00000.parquet"]
    write_raw(root / "raw" / "b" / "00000.parquet", [("b0", image_bytes(10)), ("b1", image_bytes(11))])
    assert main(["run-job", str(path), "--dry-run"]) == 0
    assert "would run: curate (1 new shard(s)), release" in capsys.readouterr().out
    assert main(["run-job", str(path)]) == 0, capsys.readouterr().err
    assert fake.calls[-1] == {"inputs": sorted(str(p) for p in (root / "raw").glob("*/00000.parquet")),
                              "overwrite": False}
    assert sorted(p.name for p in (root / "out/curated/shards").iterdir()) == ["part-a_00000.parquet",
                                                                               "part-b_00000.parquet"]
    assert json.loads((root / "out/curated/stats.json").read_text())["input_rows"] == 5
    assert released_keys(root) == ["a0", "a1", "b0", "b1"]  # a2 is in the eval set
    assert main(["run-job", str(path)]) == 0 and "nothing to do" in capsys.readouterr().out


def test_a_step_refusing_its_input_is_exit_2_not_3(job, capsys, monkeypatch):
    """Curate's exit 2 (bad option or input) cannot be cured by a retry: run-job exits 2."""
    path, fake = job
    monkeypatch.setattr(curate_cmd, "run", lambda args: 2)
    assert main(["run-job", str(path)]) == 2
    assert re.search(r"curate into \S+curated failed: the step refused its options or input", capsys.readouterr().err)


def test_url_list_without_caption_column_is_exit_2_before_any_download(job, capsys):
    """The real `capfilt ingest` checks a JSON lines list's fields before img2dataset starts."""
    path, fake = job
    root = path.parent
    (root / "urls").mkdir()
    (root / "urls" / "urls_nocap.jsonl").write_text('{"url": "http://127.0.0.1:9/1.jpg"}\n')
    path.write_text(path.read_text().replace('inputs: {shards: "raw/*.parquet"}',
                                             'inputs: {url_lists: "urls/*.jsonl"}'))
    assert main(["run-job", str(path)]) == 2
    err = capsys.readouterr().err
    assert "urls_nocap.jsonl: no column 'caption' (has ['url'])" in err and "ingest of" in err
    assert fake.calls == [] and not any((root / "out" / "raw").glob("*/*.parquet"))


def test_step_failure_exit_3_and_accounting_failure_exit_4(job, capsys):
    path, fake = job
    fake.fail = True
    assert main(["run-job", str(path)]) == 3
    assert re.search(r"curate into \S+curated failed \(exit 3", capsys.readouterr().err)
    fake.fail, fake.break_stats = False, True
    assert main(["run-job", str(path)]) == 4
    assert "input_rows 6 != kept 6 + dropped 0 + errors 1" in capsys.readouterr().err
    assert not (path.parent / "out" / "release").exists()


def test_release_accounting_failure_exit_4(job, capsys, monkeypatch):
    path, _ = job
    real = release_manifest.count_steps

    def broken(*a):
        c = real(*a)
        c["steps"][1]["out"] += 1
        return c

    monkeypatch.setattr(release_manifest, "count_steps", broken)
    assert main(["run-job", str(path)]) == 4
    assert "do not reconcile" in capsys.readouterr().err


def test_locked_job_exit_5(job, capsys):
    path, fake = job
    root = path.parent / "out"
    root.mkdir()
    with open(root / ".run-job.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        assert main(["run-job", str(path)]) == 5
    assert "another run-job holds" in capsys.readouterr().err and fake.calls == []


def test_end_to_end_with_real_curate(tmp_path, tiny_models, capsys):
    """ingest is not needed (raw shards); curate and release are the real commands."""
    from capfilt.model.specs import clip_spec

    assert main(["synth", "--out", str(tmp_path / "world"), "--n", "8", "--human", "2", "--test", "4",
                 "--rows-per-shard", "4", "--seed", "3"]) == 0
    raw = tmp_path / "raw"
    raw.mkdir()
    web = sorted((tmp_path / "world" / "web").glob("*.parquet"))
    assert len(web) == 2
    shutil.copy(web[0], raw / web[0].name)
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({  # JSON is YAML
        "output_root": "out",
        "inputs": {"shards": "raw/*.parquet"},
        "models": {"captioner": str(tiny_models["captioner"]), "filter": str(tiny_models["itm"]),
                   "clip": clip_spec(tiny_models["clip"])},
        "curate": {"num_captions": 2, "batch_size": 4, "max_length": 12, "min_length": 4},
        "release": {"dedup_threshold": 0.999, "decontaminate": "world/test/*.parquet", "rows_per_shard": 2},
    }))
    assert main(["run-job", str(job)]) == 0
    assert "ran: curate (1 new shard(s)), release" in capsys.readouterr().out
    m = json.loads((tmp_path / "out/release/manifest.json").read_text())
    assert m["counts"]["input_rows"] == 4
    release_manifest.check_counts(m)
    before = snapshot(tmp_path / "out")
    assert main(["run-job", str(job)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert snapshot(tmp_path / "out") == before
    shutil.copy(web[1], raw / web[1].name)  # new data arrives
    assert main(["run-job", str(job)]) == 0
    assert "ran: curate (1 new shard(s)), release" in capsys.readouterr().out
    curated_stats = json.loads((tmp_path / "out/curated/stats.json").read_text())
    assert curated_stats["input_rows"] == 8
    # the first shard's curated output was not rewritten
    first = [k for k in before if k.startswith("curated/shards/")]
    after = snapshot(tmp_path / "out")
    assert first and all(after[k] == before[k] for k in first)
    assert json.loads((tmp_path / "out/release/manifest.json").read_text())["counts"]["input_rows"] == 8
    # the report works on the real curate output too
    assert main(["report", str(tmp_path / "out/curated"), "--out", str(tmp_path / "curated.html")]) == 0
    assert "capfilt curate report" in (tmp_path / "curated.html").read_text()


def test_repeated_shard_names_with_real_curate(tmp_path, tiny_models, capsys):
    """Two img2dataset downloads, both numbered 00000, the second arriving after the first was
    curated: the real curate renames the outputs (a_00000, b_00000) and every row is counted once."""
    from capfilt.model.specs import clip_spec

    assert main(["synth", "--out", str(tmp_path / "world"), "--n", "8", "--human", "2", "--test", "4",
                 "--rows-per-shard", "4", "--seed", "3"]) == 0
    web = sorted((tmp_path / "world" / "web").glob("*.parquet"))
    (tmp_path / "raw" / "a").mkdir(parents=True)
    shutil.copy(web[0], tmp_path / "raw" / "a" / "00000.parquet")
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({
        "output_root": "out", "inputs": {"shards": "raw/**/*.parquet"},
        "models": {"captioner": str(tiny_models["captioner"]), "filter": str(tiny_models["itm"]),
                   "clip": clip_spec(tiny_models["clip"])},
        "curate": {"num_captions": 1, "batch_size": 4, "max_length": 12, "min_length": 4},
        "release": False,
    }))
    assert main(["run-job", str(job)]) == 0, capsys.readouterr().err
    curated = tmp_path / "out" / "curated"
    assert sorted(p.name for p in (curated / "shards").iterdir()) == ["part-00000.parquet"]
    (tmp_path / "raw" / "b").mkdir()
    shutil.copy(web[1], tmp_path / "raw" / "b" / "00000.parquet")
    assert main(["run-job", str(job)]) == 0, capsys.readouterr().err
    assert "ran: curate (1 new shard(s))" in capsys.readouterr().out
    assert sorted(p.name for p in (curated / "shards").iterdir()) == ["part-a_00000.parquet", "part-b_00000.parquet"]
    stats = json.loads((curated / "stats.json").read_text())
    assert stats["input_rows"] == 8 == stats["kept"] + stats["dropped"] + stats["errors"]
    assert "duplicate_key" not in stats.get("error_types", {})


def test_url_lists_are_ingested_once_and_again_when_changed(job, monkeypatch, capsys):
    """URL-list mode: `capfilt ingest` (a stand-in here) runs per new or changed list file."""
    path, fake = job
    root = path.parent
    ingested = []

    def fake_ingest(args):
        ingested.append(Path(args.url_list).name)
        urls = Path(args.url_list).read_text().split()
        write_raw(Path(args.out) / "00000.parquet", [(u, image_bytes(100 + int(u[1:]))) for u in urls])
        return 0

    monkeypatch.setattr(ingest_cmd, "run", fake_ingest)
    (root / "urls").mkdir()
    (root / "urls" / "a.txt").write_text("u1 u2\n")
    path.write_text(path.read_text().replace('inputs: {shards: "raw/*.parquet"}', 'inputs: {url_lists: "urls/*.txt"}'))
    assert main(["run-job", str(path)]) == 0
    assert ingested == ["a.txt"] and fake.calls[-1]["inputs"] == [str(root / "out/raw/a/00000.parquet")]
    assert released_keys(root) == ["u1", "u2"]
    assert main(["run-job", str(path)]) == 0 and ingested == ["a.txt"]
    assert "nothing to do" in capsys.readouterr().out
    (root / "urls" / "b.txt").write_text("u3\n")
    (root / "urls" / "a.txt").write_text("u1 u2 u4\n")
    assert main(["run-job", str(path)]) == 0
    assert sorted(ingested) == ["a.txt", "a.txt", "b.txt"]
    # each list is curated into its own dir; a.txt's shard changed, so its curate starts again
    assert [(c["inputs"], c["overwrite"]) for c in fake.calls[1:]] == [
        ([str(root / "out/raw/a/00000.parquet")], True), ([str(root / "out/raw/b/00000.parquet")], False)]
    assert released_keys(root) == ["u1", "u2", "u3", "u4"]


# -- a run killed anywhere (kill -9) ----------------------------------------------------------
class Killed(BaseException):
    """kill -9 of the run, in-process: not an Exception, so no step's error handling takes it."""


@pytest.fixture
def kill(monkeypatch):
    """``kill()`` stops the run where it is, as kill -9 would: it raises Killed, and from then
    on no run-job state is written (a killed process runs no ``finally`` block; the run's lock
    is released, as the kernel releases it). ``kill.revive()`` starts the next process."""
    real = run_job._save_state
    dead = []

    def save(path, state):
        if not dead:
            real(path, state)

    def do():
        dead.append(True)
        raise Killed

    monkeypatch.setattr(run_job, "_save_state", save)
    do.revive = dead.clear
    return do


class FakeIngest:
    """Stands in for `capfilt ingest`: writes a list's rows into 2-row shards 00000, 00001, ...
    in completion order, which differs on every download (like img2dataset's threads), so a
    second download of the same list has other bytes. ``kill_after`` runs after each shard."""

    def __init__(self):
        self.downloads = []
        self.kill_after = None

    def __call__(self, args):
        urls = Path(args.url_list).read_text().split()
        turn = len(self.downloads) % len(urls)
        self.downloads.append(Path(args.url_list).name)
        urls = urls[turn:] + urls[:turn]
        for i in range(0, len(urls), 2):
            write_raw(Path(args.out) / f"{i // 2:05d}.parquet",
                      [(u, image_bytes(100 + int(u[1:]))) for u in urls[i:i + 2]])
            if self.kill_after:
                self.kill_after()
        return 0


@pytest.fixture
def url_job(job, monkeypatch):
    """The job over two URL lists (3 URLs each), and ref.yaml: the same job into ROOT/ref, the
    uninterrupted run a killed one is compared with."""
    path, fake = job
    root = path.parent
    ingest = FakeIngest()
    monkeypatch.setattr(ingest_cmd, "run", ingest)
    (root / "urls").mkdir()
    (root / "urls" / "a.txt").write_text("u1 u2 u3\n")
    (root / "urls" / "b.txt").write_text("u4 u5 u6\n")
    path.write_text(path.read_text().replace('inputs: {shards: "raw/*.parquet"}', 'inputs: {url_lists: "urls/*.txt"}'))
    ref = root / "ref.yaml"
    ref.write_text(path.read_text().replace("output_root: out", "output_root: ref"))
    return path, ref, fake, ingest


def outcome(out: Path) -> dict:
    """What a finished job produced: per list the curate counts and curated keys (asserted
    free of duplicates and equal to the raw download's keys), the release's keys and counts."""
    result = {}
    for curated in sorted((out / "curated").iterdir()):
        keys = sorted(pq.read_table(curated / "shards").column("key").to_pylist())
        raw = sorted(pq.read_table(out / "raw" / curated.name).column("key").to_pylist())
        assert keys == raw and len(set(keys)) == len(keys), curated
        stats = json.loads((curated / "stats.json").read_text())
        assert stats["input_rows"] == stats["kept"] + stats["dropped"] + stats["errors"] == len(raw)
        result[curated.name] = {"stats": stats, "keys": keys}
    manifest = json.loads((out / "release" / "manifest.json").read_text())
    release_manifest.check_counts(manifest)
    keys = pq.read_table(out / "release" / "shards").column("key").to_pylist()
    assert len(set(keys)) == len(keys)
    result["release"] = {"keys": sorted(keys), "counts": manifest["counts"]}
    return result


def test_killed_during_curate_resumes_without_downloading_again(url_job, kill, capsys):
    """The crash audit's case: kill -9 while curate works on the first list. The re-run must not
    download the lists again (a new download has other bytes, and curate refuses to resume over
    a changed input: exit 2 on every later run), but resume curate where it stopped."""
    path, ref, fake, ingest = url_job
    root = path.parent
    assert main(["run-job", str(ref)]) == 0
    expected = outcome(root / "ref")
    assert expected["release"]["keys"] == ["u1", "u2", "u3", "u4", "u5", "u6"]
    ingest.downloads.clear()
    fake.curated.clear()
    fake.kill_after = kill
    with pytest.raises(Killed):
        main(["run-job", str(path)])
    assert ingest.downloads == ["a.txt", "b.txt"] and len(fake.curated) == 1
    kill.revive()
    fake.kill_after = None
    assert main(["run-job", str(path)]) == 0, capsys.readouterr().err
    assert ingest.downloads == ["a.txt", "b.txt"]  # nothing downloaded twice
    assert fake.calls[-2]["overwrite"] is False  # list a: resumed, its finished shard kept
    assert sorted(fake.curated) == sorted(str(p) for p in (root / "out/raw").glob("*/*.parquet"))
    assert outcome(root / "out") == expected
    assert main(["run-job", str(path)]) == 0 and "nothing to do" in capsys.readouterr().out


def test_killed_during_release_rebuilds_only_the_release(url_job, kill, monkeypatch, capsys):
    """kill -9 inside the release, its staging directory written but not yet swapped in."""
    path, ref, fake, ingest = url_job
    root = path.parent
    assert main(["run-job", str(ref)]) == 0
    expected = outcome(root / "ref")
    ingest.downloads.clear()
    real_swap = release_build.swap_into_place
    monkeypatch.setattr(release_build, "swap_into_place", lambda stage, out: kill())
    with pytest.raises(Killed):
        main(["run-job", str(path)])
    assert (root / "out" / ".release.partial").is_dir() and not (root / "out" / "release").exists()
    kill.revive()
    monkeypatch.setattr(release_build, "swap_into_place", real_swap)
    calls = len(fake.calls)
    capsys.readouterr()
    assert main(["run-job", str(path)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip().splitlines()[-1] == "run-job nightly: ran: release"
    assert ingest.downloads == ["a.txt", "b.txt"] and len(fake.calls) == calls
    assert outcome(root / "out") == expected


def test_killed_while_downloading_again_downloads_again(url_job, kill, capsys):
    """A lost download (raw/a deleted) is downloaded again; a run killed half-way through that
    download must not leave the half as list a's download: the re-run downloads it again and
    curates it again from scratch."""
    path, ref, fake, ingest = url_job
    root = path.parent
    assert main(["run-job", str(ref)]) == 0
    expected = outcome(root / "ref")
    assert main(["run-job", str(path)]) == 0
    shutil.rmtree(root / "out" / "raw" / "a")
    ingest.kill_after = kill
    with pytest.raises(Killed):
        main(["run-job", str(path)])
    assert [p.name for p in (root / "out" / "raw" / "a").iterdir()] == ["00000.parquet"]  # the half
    kill.revive()
    ingest.kill_after = None
    ingest.downloads.clear()
    assert main(["run-job", str(path)]) == 0, capsys.readouterr().err
    assert ingest.downloads == ["a.txt"]
    assert fake.calls[-1]["overwrite"] is True  # curated/a holds the earlier download's rows
    assert outcome(root / "out") == expected


def test_killed_while_recurating_a_changed_list_recurates_it_again(url_job, kill, capsys):
    """List a changes; the run downloads it again and is killed while curating it with
    --overwrite (the earlier output deleted, part of the new one written). The re-run must not
    download it a third time, and must curate it again with --overwrite."""
    path, ref, fake, ingest = url_job
    root = path.parent
    assert main(["run-job", str(path)]) == 0
    (root / "urls" / "a.txt").write_text("u1 u2 u3 u7\n")
    assert main(["run-job", str(ref)]) == 0
    expected = outcome(root / "ref")
    assert expected["a"]["keys"] == ["u1", "u2", "u3", "u7"]
    ingest.downloads.clear()
    fake.kill_after = kill
    with pytest.raises(Killed):
        main(["run-job", str(path)])
    assert ingest.downloads == ["a.txt"] and fake.calls[-1]["overwrite"] is True
    kill.revive()
    fake.kill_after = None
    assert main(["run-job", str(path)]) == 0, capsys.readouterr().err
    assert "curate a (its output is from an earlier download)" in capsys.readouterr().out
    assert ingest.downloads == ["a.txt"] and fake.calls[-1]["overwrite"] is True
    assert outcome(root / "out") == expected


def test_state_of_a_run_stuck_by_an_earlier_kill_recovers(url_job, capsys):
    """What the version that saved its state only at the end left after such a kill: the lists
    downloaded again (other bytes) and recorded, no curate record, curate's outputs and markers
    from the first download. Curate refused that (exit 2) on every run; now it starts again."""
    path, ref, fake, ingest = url_job
    root = path.parent
    assert main(["run-job", str(ref)]) == 0
    expected = outcome(root / "ref")
    assert main(["run-job", str(path)]) == 0
    for lst in ("a", "b"):
        raw = root / "out" / "raw" / lst
        shutil.rmtree(raw)
        assert ingest(argparse.Namespace(url_list=str(root / "urls" / f"{lst}.txt"), out=str(raw))) == 0
        (root / "out" / "curated" / lst / "stats.json").unlink()
    state_file = root / "out" / "run-job-state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({k: ({} if k == "curate" else v) for k, v in state.items()
                                      if k != "curated_from"}))
    assert main(["run-job", str(path)]) == 0, capsys.readouterr().err
    assert [c["overwrite"] for c in fake.calls[-2:]] == [True, True]
    assert outcome(root / "out") == expected


def test_a_misspelt_option_names_the_option_it_is_close_to(job, capsys):
    path, fake = job
    path.write_text(path.read_text().replace("num_captions: 3", "num_caption: 3"))
    assert main(["run-job", str(path)]) == 2
    assert "unknown options ['--num-caption'] in the job file (did you mean num_caption -> num_captions?)" in \
        capsys.readouterr().err
    assert fake.calls == []


@pytest.mark.parametrize("beam, what", [
    ('["--environment_type=PROCESS", "--environment_config={\\"command\\": \\"touch PWNED\\"}"]',
     "--environment_type PROCESS"),
    ('["--environment_type=beam:env:harness_subprocess_python:v1", "--environment_config=touch PWNED"]',
     "--environment_type beam:env:harness_subprocess_python:v1"),
    ('["--environment_type=EXTERNAL", "--environment_options=process_command=touch PWNED"]',
     "process_command=touch PWNED"),
])
def test_a_job_file_cannot_make_beam_run_a_command_unless_the_operator_allows_it(job, capsys, beam, what):
    path, fake = job
    path.write_text(path.read_text().replace('beam_options: ["--direct_num_workers=1"]', f"beam_options: {beam}"))
    assert main(["run-job", str(path)]) == 2
    assert (f"curate.beam_options: {what} makes Beam run a command on this machine; a job file may not ask for "
            f"that (pass --allow-process-environment to run-job to allow it)") in capsys.readouterr().err
    assert fake.calls == [] and not (path.parent / "out").exists() and not (path.parent / "PWNED").exists()
    assert main(["run-job", str(path), "--allow-process-environment"]) == 0  # the operator's choice
    assert len(fake.calls) == 1
