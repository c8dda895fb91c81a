"""The release build on hand-made curated shards: planted exact and near duplicates, eval-set
contamination, bad rows, resharding, webdataset output read back the way LAVIS reads it,
manifest counts and hashes, and the errors."""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt.jobs.cli import main
from capfilt.pipeline.release import manifest as release_manifest
from capfilt.pipeline.release.build import REASONS, ReleaseConfig, build_release, decide
from capfilt.pipeline.release.shards import DecontaminationSet
from capfilt.pipeline.curate.record import model_record
from release_data import (
    image_bytes, near_copy, pixel_embedder, record_outputs, row, scanned_rows, write_curated, write_raw,
)
from capfilt.transforms.schemas import CURATED_SCHEMA


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def world(tmp_path):
    """Two curate dirs with planted problems, and an eval shard.

    a: k0..k5 distinct (k5 lower CLIP), d0 not kept; x1 = exact copy of k1 with a lower score;
       n2 = near copy of k2 with a higher CLIP score (so n2 is kept, k2 removed);
    b: k9 without image bytes, bad decodes as unreadable; dupkey "k4" with a different image;
       ev11: a near copy of image 11, which is in the eval set (as e2); k8 distinct.
    """
    imgs = {i: image_bytes(i) for i in range(12)}
    a = [row(f"k{i}", imgs[i], clip=0.3 + 0.01 * i) for i in range(6)] + [row("d0", imgs[6], keep=False)]
    a2 = [row("x1", imgs[1], clip=0.2), row("n2", near_copy(2), clip=0.9)]
    b = [row("k9", None), row("bad", b"<html>not an image</html>"), row("k4", imgs[10], clip=0.1),
         row("ev11", near_copy(11)), row("k8", imgs[8])]
    write_curated(tmp_path / "cur_a", [a, a2])
    write_curated(tmp_path / "cur_b", [b])
    # eval: e0 and e2 are images 3 and 11 re-encoded (so k3 and ev11 are contaminated), e1 unrelated
    write_raw(tmp_path / "eval" / "test-00000.parquet",
              [("e0", image_bytes(3, quality=80)), ("e1", image_bytes(100)), ("e2", image_bytes(11, quality=80))])
    return tmp_path


def build(world, out="rel", **kw):
    cfg = dict(inputs=[world / "cur_a", world / "cur_b"], out=world / out, dedup_threshold=0.9,
               decontaminate=str(world / "eval" / "*.parquet"), rows_per_shard=2,
               report=False)  # the report has its own tests (test_report_browser.py)
    cfg.update(kw)
    return build_release(ReleaseConfig(**cfg), embedder=pixel_embedder)


def removed_by_key(out):
    t = pq.read_table(out / "removed.parquet").to_pylist()
    return {r["key"]: r for r in t}


def test_release_removes_planted_rows_for_the_right_reasons(world):
    m = build(world)
    out = world / "rel"
    released = pq.read_table(out / "shards").column("key").to_pylist()
    assert sorted(released) == ["k0", "k1", "k4", "k5", "k8", "n2"]
    rm = removed_by_key(out)
    got = {k: (r["reason"], r["duplicate_of"]) for k, r in rm.items()}
    assert got == {
        "d0": ("not_kept", None),
        "x1": ("exact_duplicate", "k1"),      # same bytes, lower CLIP score
        "k2": ("near_duplicate", "n2"),       # n2 has the better CLIP score
        "k9": ("unreadable", None),
        "bad": ("unreadable", None),
        "k3": ("contaminated", "e0"),
        "ev11": ("contaminated", "e2"),
        "k4": ("duplicate_key", "k4"),        # second "k4" (other image, lower score)
    }
    assert rm["d0"]["detail"] == "no_caption_passed"
    assert rm["k9"]["detail"] == "no_image" and rm["bad"]["detail"].startswith("decode:")
    assert rm["k2"]["similarity"] > 0.9 and rm["x1"]["similarity"] == 1.0
    assert "test-00000.parquet" in rm["k3"]["detail"]
    assert rm["k2"]["source"].endswith("cur_a/shards/part-00000.parquet")
    # the kept "k4" is the one from cur_a (higher CLIP score)
    k4 = pq.read_table(out / "shards").to_pylist()
    assert [r["jpg"] for r in k4 if r["key"] == "k4"] == [image_bytes(4)]
    assert m["counts"]["removed"]["contaminated"] == 2


def test_manifest_counts_reconcile_with_files(world):
    m = build(world)
    out = world / "rel"
    c = m["counts"]
    # keep 14 -> 11, decontaminate (k3, ev11) 11 -> 9, dedup (x1, k2, second k4) 9 -> 6
    assert (c["input_rows"], c["kept"], c["decontaminated"], c["deduped"], c["released"]) == (14, 11, 9, 6, 6)
    assert [s["step"] for s in c["steps"]] == ["keep", "decontaminate", "dedup"]
    shard_rows = [pq.ParquetFile(out / s["name"]).metadata.num_rows for s in m["outputs"]["shards"]]
    assert sum(shard_rows) == c["released"]
    assert pq.ParquetFile(out / "removed.parquet").metadata.num_rows == c["input_rows"] - c["released"]
    for s in m["outputs"]["shards"] + [m["outputs"]["removed"]]:
        assert s["sha256"] == sha(out / s["name"])
    in_hashes = {(i["dir"], s["name"]): s["sha256"] for i in m["inputs"] for s in i["shards"]}
    assert in_hashes[(str(world / "cur_a"), "shards/part-00001.parquet")] == sha(world / "cur_a/shards/part-00001.parquet")
    assert m["inputs"][0]["curate"]["models"]["captioner"] == "tiny-captioner"
    assert m["inputs"][0]["curate"]["thresholds"]["itm"] == 0.5
    assert m["settings"]["dedup_threshold"] == 0.9 and m["eval_set"]["images"] == 3
    assert m["settings"]["batch_size"] == 32  # similarities can differ in the last digits with it
    assert m["eval_set"]["files"][0]["sha256"] == sha(world / "eval/test-00000.parquet")
    assert m["code_version"] and m["index"]["near_dedup"]["kind"] == "flat"
    assert json.loads((out / "manifest.json").read_text()) == m
    card = (out / "README.md").read_text()
    assert "| decontaminate | 11 |" in card and "| dedup | 9 |" in card and "Known limitations" in card
    assert "report.html" not in card and not (out / "report.html").exists()  # built with report=False
    release_manifest.check_counts(m)  # the published manifest passes its own check


def test_long_steps_log_progress(world, monkeypatch, caplog):
    """Hashing the inputs and pass 2 logged nothing until they finished; with the interval at 0
    every shard and batch logs a line (the CLIP pass and the near-dup search already did)."""
    import logging

    from capfilt.pipeline.release import build as release

    monkeypatch.setattr(release, "PROGRESS_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="capfilt.pipeline.release.build"):
        build(world)
    lines = [r.getMessage() for r in caplog.records if r.name == "capfilt.pipeline.release.build"]
    assert [x.split(" (")[0] for x in lines if x.startswith("checking inputs")] == [
        f"checking inputs: {n} shard(s) hashed" for n in (1, 2, 3)]  # cur_a has 2 shards, cur_b 1
    assert [x.split(" (")[0] for x in lines if x.startswith("pass 2")] == [
        f"pass 2: {n}/14 rows written" for n in (7, 9, 14)]  # one batch per shard: 7, 2 and 5 rows


def test_accounting_failure_publishes_nothing(world, monkeypatch):
    real = release_manifest.count_steps

    def off_by_one(*a):
        c = real(*a)
        c["released"] += 1
        return c

    monkeypatch.setattr(release_manifest, "count_steps", off_by_one)
    with pytest.raises(release_manifest.AccountingError, match="released 7, deduped 6"):
        build(world)
    assert not (world / "rel").exists() and not (world / ".rel.partial").exists()


def test_a_full_disk_names_the_file_and_exits_1_so_that_it_is_retried(world, monkeypatch, capsys):
    """ENOSPC while writing report.html: the release is not replaced, the line names the file,
    and the exit code is a failure's (1), not a refused input's (2: run-job's "do not retry")."""
    import errno

    build(world)
    before = sha(world / "rel" / "manifest.json")
    real = Path.write_text

    def full(self, *args, **kwargs):
        if self.name == "report.html":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    monkeypatch.setattr(release_manifest, "clip_embedder", lambda spec: pixel_embedder)
    code = main(["release", "--input", str(world / "cur_a"), "--out", str(world / "rel"), "--overwrite",
                 "--clip", "x"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1
    assert line == (f"capfilt release: failed: cannot write the report to {world}/.rel.partial/report.html "
                    f"(No space left on device)")
    assert sha(world / "rel" / "manifest.json") == before
    assert sorted(p.name for p in world.iterdir() if p.name.startswith(".")) == []


def test_reshard_names_schema_and_reproducibility(world):
    m1 = build(world, "r1")
    m2 = build(world, "r2", inputs=[world / "cur_a", world / "cur_b"])
    names = [s["name"] for s in m1["outputs"]["shards"]]
    assert names == ["shards/part-00000.parquet", "shards/part-00001.parquet", "shards/part-00002.parquet"]
    assert [s["rows"] for s in m1["outputs"]["shards"]] == [2, 2, 2]
    assert pq.read_schema(world / "r1" / names[0]).remove_metadata().equals(CURATED_SCHEMA)
    # same inputs and settings: byte-identical shards and removed list
    assert [s["sha256"] for s in m1["outputs"]["shards"]] == [s["sha256"] for s in m2["outputs"]["shards"]]
    assert m1["outputs"]["removed"]["sha256"] == m2["outputs"]["removed"]["sha256"]


def test_kept_set_does_not_depend_on_input_order(world):
    build(world, "fwd")
    build(world, "rev", inputs=[world / "cur_b", world / "cur_a"])
    keys = lambda d: sorted(pq.read_table(world / d / "shards").column("key").to_pylist())  # noqa: E731
    assert keys("fwd") == keys("rev")


def test_webdataset_reads_like_lavis_laion(world):
    import webdataset as wds

    m = build(world, webdataset=True)
    tars = [str(world / "rel" / t["name"]) for t in m["outputs"]["webdataset"]]
    assert [Path(t).name for t in tars] == ["00000.tar", "00001.tar", "00002.tar"]
    # LAVIS LaionDataset: tarfile_to_samples -> decode("pilrgb") -> to_tuple("jpg", "json"),
    # then sample[1]["caption"] is the text.
    pipe = wds.DataPipeline(wds.SimpleShardList(tars), wds.tarfile_to_samples(), wds.decode("pilrgb"),
                            wds.to_tuple("jpg", "json"))
    samples = list(pipe)
    released = {r["key"]: r for r in pq.read_table(world / "rel" / "shards").to_pylist()}
    assert len(samples) == len(released) == 6
    for image, meta in samples:
        assert isinstance(image, Image.Image) and image.size == (32, 32)
        assert meta["caption"] == released[meta["key"]]["captions"][0]
        assert meta["captions"] == released[meta["key"]]["captions"]


def test_bad_inputs_fail_before_work(world, tmp_path):
    build(world)
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        build(world)
    build(world, overwrite=True)  # replaces the release
    bad = write_curated(tmp_path / "bad", [[row("a", image_bytes(1))]])
    t = pq.read_table(world / "cur_a/shards/part-00000.parquet").drop_columns(["keep"])
    pq.write_table(t, bad / "shards" / "part-00000.parquet")
    record_outputs(bad)  # recorded, so the schema check is what fails
    with pytest.raises(ValueError, match=r"part-00000.parquet: missing required column 'keep'"):
        build(world, "x", inputs=[bad])
    with pytest.raises(ValueError, match="matches no file"):
        build(world, "y", decontaminate=str(tmp_path / "nothing*.parquet"))
    with pytest.raises(ValueError, match="eval has no manifest.json: only a finished `capfilt curate` output"):
        build(world, "z", inputs=[tmp_path / "eval"])
    write_curated(tmp_path / "none", [])
    with pytest.raises(ValueError, match="records no curated shards"):
        build(world, "z", inputs=[tmp_path / "none"])
    with pytest.raises(ValueError, match="--dedup-threshold must be in"):
        build(world, "w", dedup_threshold=1.5)


def test_cli_bad_input_exit_code(tmp_path, capsys):
    code = main(["release", "--input", str(tmp_path / "missing"), "--out", str(tmp_path / "rel"), "--clip", "x"])
    assert code == 2
    assert "is not a directory" in capsys.readouterr().err


def test_cli_release_with_tiny_clip(world, tiny_models):
    """The full command: CLIP embeddings from the curate manifest's model (a tiny open_clip)."""
    from capfilt.model.specs import clip_spec

    spec = clip_spec(tiny_models["clip"])
    write_curated(world / "cur_c", [[row("a", image_bytes(1)), row("b", image_bytes(1), clip=0.1),
                                     row("c", image_bytes(2))]], clip=spec)
    out = world / "rel_cli"
    code = main(["release", "--input", str(world / "cur_c"), "--out", str(out), "--dedup-threshold", "0.9999",
                 "--rows-per-shard", "1", "--webdataset"])
    assert code == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["settings"]["clip"] == spec
    # the same content hash the curate run record gives this model
    assert m["models"]["release_clip"] == model_record(spec) and len(model_record(spec)["sha256"]) == 64
    assert removed_by_key(out)["b"]["reason"] == "exact_duplicate"
    assert m["counts"]["input_rows"] == 3 and m["counts"]["released"] + m["outputs"]["removed"]["rows"] == 3
    assert (out / "report.html").is_file() and len(m["outputs"]["webdataset"]) == m["counts"]["released"]
    assert "`report.html`" in (out / "README.md").read_text()


def test_empty_and_all_dropped_inputs(tmp_path):
    write_curated(tmp_path / "empty", [[]])
    write_curated(tmp_path / "dropped", [[row("a", image_bytes(1), keep=False)]])
    m = build_release(ReleaseConfig([tmp_path / "empty", tmp_path / "dropped"], tmp_path / "rel", report=False),
                      embedder=pixel_embedder)
    assert (m["counts"]["input_rows"], m["counts"]["kept"], m["counts"]["released"]) == (1, 0, 0)
    assert m["outputs"]["shards"] == [] and m["outputs"]["removed"]["rows"] == 1
    assert removed_by_key(tmp_path / "rel")["a"]["reason"] == "not_kept"


def test_default_clip_comes_from_the_curate_manifest():
    curate_record = {"models": {"clip": {"id": "ViT-B-32:laion2b", "sha256": None, "kind": "hub"}}}
    assert release_manifest.default_clip([{"curate": None}, {"curate": curate_record}]) == "ViT-B-32:laion2b"
    with pytest.raises(ValueError, match="pass --clip"):
        release_manifest.default_clip([{"curate": {"models": {"clip": None}}}])


# --- what --overwrite may replace -----------------------------------------------------------

@pytest.mark.parametrize("where, relation", [("same", "is"), ("inside", "is inside"), ("above", "contains")])
def test_out_overlapping_an_input_is_refused(world, where, relation):
    cur = world / "cur_a"
    out = {"same": cur, "inside": cur / "rel", "above": world}[where]
    before = sorted(p.name for p in (cur / "shards").iterdir())
    with pytest.raises(ValueError, match=f"--out {out} {relation} --input {cur}: a release never writes over"):
        build(world, inputs=[cur], out=out.relative_to(world), overwrite=True)
    assert sorted(p.name for p in (cur / "shards").iterdir()) == before
    assert "format" not in json.loads((cur / "manifest.json").read_text())  # still the curate record


def test_cli_out_equal_to_input_exit_2(world, capsys):
    cur = str(world / "cur_a")
    assert main(["release", "--input", cur, "--out", cur + "/", "--overwrite", "--clip", "x"]) == 2
    assert f"--out {cur} is --input {cur}" in capsys.readouterr().err
    assert (world / "cur_a/shards/part-00001.parquet").is_file() and not (world / "cur_a/removed.parquet").exists()


def test_overwrite_refuses_a_directory_that_is_not_a_release(world):
    precious = world / "precious"
    precious.mkdir()
    (precious / "important.txt").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=f"--out {precious} is not empty \\(important.txt\\) and no capfilt "
                                             f"command wrote it; release writes only into an empty directory or a "
                                             f"release, whatever the flags"):
            build(world, "precious", overwrite=overwrite)
    assert (precious / "important.txt").read_text() == "x"
    # a directory whose manifest.json is not a release's (here: a curate output's) is refused and named
    shutil.copytree(world / "cur_b", world / "other")
    (world / "other/_state").mkdir()
    (world / "other/_state/settings.json").write_text("{}")
    with pytest.raises(ValueError, match=f"--out {world / 'other'} is a capfilt curate output "
                                         f"\\(it has _state/settings.json\\), not a release"):
        build(world, "other", overwrite=True)
    assert (world / "other/shards/part-00000.parquet").is_file()
    (world / "afile").write_text("y")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        build(world, "afile", overwrite=True)
    assert (world / "afile").read_text() == "y"


def test_overwrite_replaces_an_empty_dir_or_a_release(world):
    (world / "empty").mkdir()
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        build(world, "empty")
    m = build(world, "empty", overwrite=True)
    assert json.loads((world / "empty/manifest.json").read_text())["format"] == release_manifest.FORMAT
    (world / "empty/shards/part-00099.parquet").write_bytes(b"stale")
    assert build(world, "empty", overwrite=True) == m  # a release is replaced, stale files go
    assert not (world / "empty/shards/part-00099.parquet").exists()
    assert sorted(p.name for p in world.iterdir() if p.name.startswith(".")) == []  # no stage, no .old


def test_overwrite_refuses_foreign_files_in_the_way(world):
    build(world)
    (world / ".rel.old").mkdir()
    (world / ".rel.old/mine.txt").write_text("z")
    with pytest.raises(ValueError, match=r"\.rel\.old is in the way of --out .* not left by a release build"):
        build(world, overwrite=True)
    assert (world / ".rel.old/mine.txt").is_file()
    # an eval file inside --out would be deleted by the swap
    shutil.copy(world / "eval/test-00000.parquet", world / "rel/eval.parquet")
    shutil.rmtree(world / ".rel.old")
    with pytest.raises(ValueError, match=r"--decontaminate file .*rel/eval.parquet is inside --out"):
        build(world, overwrite=True, decontaminate=str(world / "rel" / "*.parquet"))


def test_a_crashed_builds_staging_dir_is_replaced(world, monkeypatch):
    import capfilt.pipeline.release.build as release
    import capfilt.pipeline.release.out_dir as release_out
    def crash(*a, **kw):
        raise KeyboardInterrupt  # the build is killed while writing
    monkeypatch.setattr(release, "write_outputs", crash)
    with pytest.raises(KeyboardInterrupt):
        build(world)
    assert not (world / ".rel.partial").exists()  # cleaned on the way out
    # a staging dir left by a kill -9 carries the marker: the next build may delete it
    (world / ".rel.partial/shards").mkdir(parents=True)
    (world / ".rel.partial" / release_out.STAGE_MARKER).write_text("")
    monkeypatch.undo()
    build(world)
    assert not (world / ".rel.partial").exists() and (world / "rel/manifest.json").is_file()
    assert not (world / "rel" / release_out.STAGE_MARKER).exists()
    # killed between creating the staging directory and marking it: an empty directory is ours too
    (world / ".rel.partial").mkdir()
    build(world, overwrite=True)
    assert not (world / ".rel.partial").exists() and (world / "rel/manifest.json").is_file()


SWAP_STATES = {  # what a kill -9 of `release --overwrite` leaves, and which release survives it
    "stage_being_built": "old",     # .rel.partial marked, half written
    "stage_unmarked": "old",        # .rel.partial created, killed before the marker was written
    "stage_finished": "old",        # the marker removed just before the swap
    "between_the_renames": "old",   # rel parked as .rel.old, the new one not yet renamed into place
    "parked_intact": "new",         # swapped; the parked release not yet deleted
    "parked_half_deleted": "new",   # killed while deleting it: manifest.json gone, shards left
    "parked_emptied": "new",        # its files deleted, the directory not yet
    "stage_half_deleted": "old",    # a failed build killed while deleting its staging directory
}


@pytest.mark.parametrize("state", sorted(SWAP_STATES))
def test_a_killed_overwrite_is_recovered_in_every_state_of_the_swap(world, state):
    from capfilt.pipeline.release import out_dir as release_out
    from capfilt.transforms.files.staging import DELETING

    build(world)
    out, stage, parked = world / "rel", world / ".rel.partial", world / ".rel.old"
    shutil.copytree(out, world / "new")
    (world / "new" / "which.txt").write_text("new")
    (out / "which.txt").write_text("old")
    if state in ("stage_being_built", "stage_half_deleted"):
        (stage / "shards").mkdir(parents=True)
        (stage / "shards" / "part-00000.parquet").write_bytes(b"half")
        (stage / (release_out.STAGE_MARKER if state == "stage_being_built" else DELETING)).write_text("")
    elif state == "stage_unmarked":
        stage.mkdir()
    elif state == "stage_finished":
        (world / "new").rename(stage)
    elif state == "between_the_renames":
        out.rename(parked)
        (world / "new").rename(stage)
    else:
        out.rename(parked)
        (world / "new").rename(out)
        if state == "parked_half_deleted":
            (parked / "manifest.json").unlink()
            (parked / DELETING).write_text("")
        elif state == "parked_emptied":
            shutil.rmtree(parked)
            parked.mkdir()
    release_out.check_release_out(out, True, None)  # nothing is "in the way"
    assert release_out._staging(out).clean_leftovers()
    assert (out / "which.txt").read_text() == SWAP_STATES[state]
    assert not stage.exists() and not parked.exists()
    shutil.rmtree(world / "new", ignore_errors=True)
    build(world, overwrite=True)  # and the next release goes through
    assert not (out / "which.txt").exists() and release_manifest.is_release_dir(out)
    assert sorted(p.name for p in world.iterdir() if p.name.startswith(".")) == []


# --- inputs checked against their curate record ---------------------------------------------

def test_missing_shard_is_refused_not_released_partially(world, capsys):
    (world / "cur_a/shards/part-00001.parquet").unlink()
    missing = "shard shards/part-00001.parquet is recorded in its manifest.json but missing"
    with pytest.raises(ValueError, match=f"cur_a: {missing}"):
        build(world)
    assert not (world / "rel").exists()
    code = main(["release", "--input", str(world / "cur_a"), "--out", str(world / "r2"), "--clip", "x"])
    assert code == 2 and missing in capsys.readouterr().err
    assert not (world / "r2").exists()


def test_changed_or_unrecorded_shard_is_refused(world):
    shard = world / "cur_a/shards/part-00001.parquet"
    t = pq.read_table(shard)
    pq.write_table(t.slice(0, 1), shard)  # same name, one row lost
    with pytest.raises(ValueError, match=r"shard shards/part-00001.parquet changed since curate wrote it \(sha256 "):
        build(world)
    record_outputs(world / "cur_a")
    assert build(world)["counts"]["input_rows"] == 13  # recorded again: released as it now is
    pq.write_table(t, world / "cur_b/shards/part-00007.parquet")  # not written by curate
    with pytest.raises(ValueError, match=r"cur_b: shards/part-00007.parquet is not in its manifest.json"):
        build(world, "r2")


def test_manifest_input_hashes_are_the_recorded_ones(world):
    m = build(world)
    recorded = json.loads((world / "cur_a/manifest.json").read_text())["outputs"]
    assert [s["sha256"] for s in m["inputs"][0]["shards"]] == [o["sha256"] for o in recorded]


# --- inputs given twice, unwritable --out ----------------------------------------------------

def test_input_given_twice_is_refused_up_front(world, capsys, monkeypatch):
    cur = world / "cur_a"
    with pytest.raises(ValueError, match=f"^input {cur} given twice$"):
        ReleaseConfig([cur, world / "cur_b", cur], world / "rel")
    (world / "link").symlink_to(cur)
    with pytest.raises(ValueError, match=f"input {cur} given twice \\(as {cur} and {world / 'link'}\\)"):
        ReleaseConfig([cur, world / "link"], world / "rel")
    monkeypatch.chdir(world)
    code = main(["release", "--input", "cur_a", "./cur_a/", "--out", "RX9", "--clip", "x"])
    assert code == 2 and "input cur_a given twice" in capsys.readouterr().err
    assert not (world / "RX9").exists()


def test_unwritable_out_fails_before_embedding(world, capsys):
    calls = []

    def counting(images):
        calls.append(len(images))
        return pixel_embedder(images)
    (world / "truth.parquet").write_bytes(b"PAR1")
    out = world / "truth.parquet" / "x"
    stage = r"truth\.parquet/\.x\.partial"
    with pytest.raises(ValueError, match=f"cannot write the release to --out {out}: creating .*{stage} failed"):
        build_release(ReleaseConfig([world / "cur_a"], out, report=False), embedder=counting)
    assert calls == []  # no image was embedded
    code = main(["release", "--input", str(world / "cur_a"), "--out", str(out), "--clip", "x"])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot write the release to --out {out}" in err and "Traceback" not in err


def outcome(rows, dec):
    """key/image -> (reason or 'released', duplicate_of) per row, in input order."""
    return [(f"{k}/{h}", "released" if dec.reason[i] == 0 else REASONS[dec.reason[i] - 1], dec.duplicate_of[i])
            for i, (k, h) in enumerate(zip(rows.keys, rows.sha256))]


def assert_duplicate_of_is_released(rows, dec):
    released = set(rows.keys[dec.reason == 0])
    for i in np.flatnonzero(dec.reason != 0):
        if dec.duplicate_of[i] is not None and REASONS[dec.reason[i] - 1] != "contaminated":
            assert dec.duplicate_of[i] in released, (rows.keys[i], dec.duplicate_of[i])


def test_a_row_is_never_removed_for_a_key_it_does_not_have():
    # A (k1, image X), B (k2, X), C (k2, Y): C ranks best, so it has k2; X stays in the
    # release through A (whose key is unique), and B is an exact copy of A.
    rows = scanned_rows(["k1", "k2", "k2"], ["X", "X", "Y"], np.eye(3)[[0, 0, 1]],
                        [[0.1, 0.5], [0.2, 0.5], [0.9, 0.5]])
    dec, _ = decide(rows, ReleaseConfig(inputs=["x"], out="/nonexistent/rel"), None)
    assert outcome(rows, dec) == [("k1/X", "released", None), ("k2/X", "exact_duplicate", "k1"),
                                  ("k2/Y", "released", None)]
    assert dec.similarity[1] == 1.0
    assert_duplicate_of_is_released(rows, dec)


def test_same_key_different_image_keeps_the_better_ranked_row():
    rows = scanned_rows(["k1", "k1", "k2"], ["X", "Y", "Z"], np.eye(3), [[0.2, 0.5], [0.8, 0.5], [0.5, 0.5]])
    dec, _ = decide(rows, ReleaseConfig(inputs=["x"], out="/nonexistent/rel"), None)
    assert outcome(rows, dec) == [("k1/X", "duplicate_key", "k1"), ("k1/Y", "released", None),
                                  ("k2/Z", "released", None)]
    assert "different" in dec.detail[0] and np.isnan(dec.similarity[0])


def test_decontamination_comes_before_dedup():
    # A is a near copy of eval image T (cos 0.9986); B is near A (0.9945) but not T (0.9877);
    # C is near B (0.9998), not T (0.9848). At 0.99 only A is contaminated; B is released
    # (the old order removed B as a near duplicate of the contaminated A) and C is B's copy.
    ang = lambda d: np.array([np.cos(np.deg2rad(d)), np.sin(np.deg2rad(d))], np.float32)
    a, b, c, t = ang(3), ang(9), ang(10), ang(0)
    rows = scanned_rows(["A", "B", "C"], ["ha", "hb", "hc"], np.stack([a, b, c]),
                        [[0.9, 0.9], [0.5, 0.5], [0.4, 0.4]])
    ev = DecontaminationSet(files=["test.parquet"], keys=["T"], embeddings=t[None], file_of=np.array([0]), by_hash={},
                 unreadable=0)
    dec, plans = decide(rows, ReleaseConfig(inputs=["x"], out="/nonexistent/rel", dedup_threshold=0.99), ev)
    assert outcome(rows, dec) == [("A/ha", "contaminated", "T"), ("B/hb", "released", None),
                                  ("C/hc", "near_duplicate", "B")]
    assert dec.similarity[0] == pytest.approx(float(a @ t)) and dec.similarity[2] == pytest.approx(float(b @ c))
    assert set(plans) == {"decontaminate", "near_dedup"}
    assert_duplicate_of_is_released(rows, dec)


def test_two_inputs_with_positional_keys_keep_every_image_a_key_allows(tmp_path):
    """img2dataset names rows by position, so two curate runs over overlapping web rows share
    keys for different images. d1: p0..p5 = images 0..5; d2: p0..p5 = images 3..8 (p3, image
    6, ranked best), q0 = image 9, q1 = image 1 (exact copy of d1's p1, unique key)."""
    imgs = {i: image_bytes(i) for i in range(10)}
    d1 = [row(f"p{i}", imgs[i]) for i in range(6)]
    d2 = [row(f"p{i}", imgs[i + 3], clip=0.9 if i == 3 else 0.3) for i in range(6)]
    d2 += [row("q0", imgs[9]), row("q1", imgs[1])]
    write_curated(tmp_path / "d1", [d1])
    write_curated(tmp_path / "d2", [d2])
    m = build_release(ReleaseConfig(inputs=[tmp_path / "d1", tmp_path / "d2"], out=tmp_path / "rel",
                                    dedup_threshold=0.9, report=False), embedder=pixel_embedder)
    rel = pq.read_table(tmp_path / "rel" / "shards").to_pylist()
    by_image = {next(i for i, b in imgs.items() if b == r["jpg"]): r["key"] for r in rel}
    # keys p0..p5 are the only names 12 of the rows have, so 6 of their 9 images fit, plus q0;
    # p3 goes to d2's image 6 (best rank), so image 3 (d1 p3 and d2 p0) finds no free key.
    assert by_image == {0: "p0", 1: "p1", 2: "p2", 6: "p3", 4: "p4", 5: "p5", 9: "q0"}
    assert len({r["key"] for r in rel}) == len(rel) == m["counts"]["released"] == 7
    removed = {(Path(r["source"]).parts[-3], r["key"]): (r["reason"], r["duplicate_of"])
               for r in pq.read_table(tmp_path / "rel" / "removed.parquet").to_pylist()}
    assert removed == {
        ("d1", "p3"): ("duplicate_key", "p3"),    # image 3: key p3 went to the better image 6
        ("d2", "p0"): ("duplicate_key", "p0"),    # image 3 again: p0 is d1's image 0
        ("d2", "p1"): ("exact_duplicate", "p4"),  # image 4 is released as d1's p4
        ("d2", "p2"): ("exact_duplicate", "p5"),  # image 5 is released as d1's p5
        ("d2", "p4"): ("duplicate_key", "p4"),    # image 7
        ("d2", "p5"): ("duplicate_key", "p5"),    # image 8
        ("d2", "q1"): ("exact_duplicate", "p1"),  # image 1, released under p1
    }
    assert m["counts"]["removed"]["duplicate_key"] == 4 and m["counts"]["removed"]["exact_duplicate"] == 3


def test_an_eval_set_of_webdataset_tars_is_read_like_its_parquet_form(tmp_path):
    """A test split downloaded by img2dataset as webdataset: its tars (sidecar parquet beside
    them) give the same keys, hashes and embeddings as the same images in a parquet shard."""
    import io
    import tarfile

    from capfilt.pipeline.release.shards import load_decontamination_set

    images = {f"00000000{i}": image_bytes(i) for i in range(3)}
    (tmp_path / "tars").mkdir()
    with tarfile.open(tmp_path / "tars" / "00000.tar", "w") as tar:
        for key, data in images.items():
            for ext, payload in (("jpg", data), ("json", json.dumps({"key": key}).encode())):
                member = tarfile.TarInfo(f"{key}.{ext}")
                member.size = len(payload)
                tar.addfile(member, io.BytesIO(payload))
    write_raw(tmp_path / "tars" / "00000.parquet", [("000000009", None)], status="failed_to_download")
    write_raw(tmp_path / "eval.parquet", list(images.items()))
    from_tar = load_decontamination_set(str(tmp_path / "tars" / "*"), pixel_embedder, 2)
    from_parquet = load_decontamination_set(str(tmp_path / "eval.parquet"), pixel_embedder, 2)
    assert from_tar.keys == from_parquet.keys == list(images)
    assert from_tar.files == [str(tmp_path / "tars" / "00000.tar")]  # the sidecar is not a shard
    assert from_tar.by_hash == from_parquet.by_hash and len(from_tar.by_hash) == 3
    assert np.array_equal(from_tar.embeddings, from_parquet.embeddings)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt is neither a parquet shard nor a webdataset tar"):
        load_decontamination_set(str(tmp_path / "notes.txt"), pixel_embedder, 2)


def test_an_eval_tar_with_fewer_samples_than_its_sidecar_lists_is_refused(tmp_path):
    from capfilt.pipeline.release.shards import load_decontamination_set
    from shard_data import write_tar

    write_tar(tmp_path / "00000.tar", [(f"e{i}.jpg", image_bytes(i)) for i in range(2)])
    write_raw(tmp_path / "00000.parquet", [(f"e{i}", b"listed") for i in range(3)])
    with pytest.raises(ValueError, match=r"00000\.tar: the tar holds 2 samples but its sidecar .* lists 3 successful"):
        load_decontamination_set(str(tmp_path / "*.tar"), pixel_embedder, 2)


def test_decontamination_reads_an_eval_tar_whose_sample_json_is_unusable(tmp_path):
    """A sample whose json is a list, or whose key is a number, keeps its image under its tar key."""
    from capfilt.pipeline.release.shards import _eval_rows
    from shard_data import write_tar

    jpg = b"\xff\xd8\xff" + b"x" * 100
    write_tar(tmp_path / "eval.tar", [("a.jpg", jpg), ("a.json", b"[1, 2]"), ("b.jpg", jpg), ("b.json", b'{"key": 5}'),
                                      ("c.jpg", jpg), ("c.json", b'{"key": "c7"}')])
    assert [(key, data == jpg, ok) for key, data, ok in _eval_rows(str(tmp_path / "eval.tar"))] == [
        ("a", True, True), ("b", True, True), ("c7", True, True)]
