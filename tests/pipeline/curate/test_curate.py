"""End to end: `capfilt curate` on tiny models and the synthetic world (pipeline/curate.py).

One clean run (module fixture) is shared by the schema, accounting and selection-rule checks;
the other runs (batch 1 on 2 worker processes, kill -9 and resume, a crash before a done
marker, incremental skip, overwrite, a failed overwrite, deleted output shards) are compared
with it. The selection rule is checked
against scores recomputed directly with the model classes (no Beam), and the ITM threshold is
set between those scores so that some captions pass and some fail.
"""
import hashlib
import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from capfilt.transforms.schemas import CURATED_SCHEMA, ERROR_SCHEMA
from cli_run import run_cli

REPO = Path(__file__).resolve().parents[3]
SEED = 3
FLOAT_COLUMNS = ("web_itm", "web_itc", "web_clip", "synthetic_itm", "synthetic_itc", "synthetic_clip")


def web_rows(synth_world):
    return pa.concat_tables(pq.read_table(p) for p in sorted((synth_world / "web").glob("*.parquet")))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, synth_world):
    """Three raw shards of 8 rows each, cut from the synthetic web split."""
    table = web_rows(synth_world)
    root = tmp_path_factory.mktemp("curate_in")
    for i in range(3):
        pq.write_table(table.slice(8 * i, 8), root / f"{i:05d}.parquet")
    return root


@pytest.fixture
def extra_shard(tmp_path, synth_world):
    """A fourth shard (the next 8 web rows) for the incremental run."""
    path = tmp_path / "extra" / "00003.parquet"
    path.parent.mkdir()
    pq.write_table(web_rows(synth_world).slice(24, 8), path)
    return path


def model_args(tiny_models):
    return ["--captioner", str(tiny_models["captioner"]), "--filter", str(tiny_models["itm"]),
            "--clip", str(tiny_models["clip"]), "--num-captions", "2", "--max-length", "12",
            "--min-length", "4", "--seed", str(SEED), "--progress-every", "1", "--torch-threads", "1",
            "--precision", "fp32"]  # the scores are compared with fp32 model calls to 1e-5


@pytest.fixture(scope="module")
def direct(inputs, tiny_models):
    """Captions and scores computed with the model classes directly, plus a threshold that
    splits the ITM scores."""
    import torch

    from capfilt.model.inference.captioner import Captioner
    from capfilt.model.inference.filter import load_filter
    from capfilt.model.inference.ranker import ClipRanker
    from capfilt.transforms.image import decode_image
    from capfilt.transforms.text import clean_caption

    torch.set_num_threads(1)
    rows = pa.concat_tables(pq.read_table(p) for p in sorted(inputs.glob("*.parquet"))).to_pylist()
    images = [decode_image(r["jpg"]) for r in rows]
    keys = [r["key"] for r in rows]
    webs = [clean_caption(r["caption"]) for r in rows]
    synthetic = Captioner.from_pretrained(tiny_models["captioner"], device="cpu").caption(
        images, keys, n=2, seed=SEED, max_length=12, min_length=4)
    cands = [([w] if w else []) + s for w, s in zip(webs, synthetic)]
    itm = [sc.itm for sc in load_filter(tiny_models["itm"], device="cpu").score(images, cands)]
    clip = ClipRanker.load(str(tiny_models["clip"]), device="cpu").score(images, cands)
    values = np.sort(np.concatenate(itm))
    mid = len(values) // 2
    threshold = float((values[mid - 1] + values[mid]) / 2)
    return {"keys": keys, "webs": webs, "synthetic": synthetic, "itm": itm, "clip": clip,
            "threshold": f"{threshold:.9f}"}


def curate_argv(inputs, out, tiny_models, direct, *extra):
    return ["curate", "--input", str(inputs / "*.parquet"), "--out", str(out), *model_args(tiny_models),
            "--itm-threshold", direct["threshold"], *extra]


@pytest.fixture(scope="module")
def clean_run(inputs, tiny_models, direct, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "out"
    code, stdout, stderr = run_cli(curate_argv(inputs, out, tiny_models, direct, "--batch-size", "8"))
    assert code == 0, stderr
    return {"out": out, "stdout": stdout, "stderr": stderr}


def load_rows(out):
    """{key: curated row} over all curated shards, plus the error rows."""
    curated = pa.concat_tables(pq.read_table(p) for p in sorted((Path(out) / "shards").glob("*.parquet")))
    errors = pa.concat_tables(pq.read_table(p) for p in sorted((Path(out) / "errors").glob("*.parquet")))
    rows = curated.to_pylist()
    by_key = {r["key"]: r for r in rows}
    assert len(by_key) == len(rows), "duplicate keys in the curated output"
    return by_key, errors.to_pylist()


def assert_same_rows(a, b):
    rows_a, err_a = load_rows(a)
    rows_b, err_b = load_rows(b)
    assert sorted(rows_a) == sorted(rows_b)
    assert err_a == err_b
    for key, ra in rows_a.items():
        rb = rows_b[key]
        for col in CURATED_SCHEMA.names:
            if col in FLOAT_COLUMNS and ra[col] is not None:
                np.testing.assert_allclose(ra[col], rb[col], atol=1e-5, err_msg=f"{key} {col}")
            else:
                assert ra[col] == rb[col], (key, col)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- the clean run ----------------------------------------------------------------------------

def test_schema_accounting_and_run_record(clean_run, inputs, tiny_models, direct):
    out = clean_run["out"]
    shards = sorted((out / "shards").glob("*.parquet"))
    assert [p.name for p in shards] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    for p in shards:
        assert pq.read_schema(p).equals(CURATED_SCHEMA, check_metadata=False)
        assert pq.read_schema(out / "errors" / p.name).equals(ERROR_SCHEMA, check_metadata=False)
    rows, errors = load_rows(out)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["input_rows"] == 24 == len(rows) + len(errors)
    assert stats["input_rows"] == stats["kept"] + stats["dropped"] + stats["errors"]
    assert stats["kept"] == sum(r["keep"] for r in rows.values())
    assert stats["this_run"]["input_rows"] == 24 and stats["this_run"]["runner"] == "FnApiRunner"
    manifest = json.loads((out / "manifest.json").read_text())
    assert {k: m["id"] for k, m in manifest["models"].items()} == {
        "captioner": str(tiny_models["captioner"]), "filter": str(tiny_models["itm"]), "clip": str(tiny_models["clip"])}
    assert all(len(m["sha256"]) == 64 for m in manifest["models"].values())
    for rec in manifest["inputs"]:
        assert rec["sha256"] == sha256(rec["path"]) and rec["rows"] == 8
    for rec in manifest["outputs"]:
        assert rec["sha256"] == sha256(out / rec["path"])
    assert manifest["thresholds"] == {"itm_threshold": float(direct["threshold"]), "keep_top": 2}
    assert manifest["seeds"]["run_seed"] == SEED and manifest["code_version"]
    # BLIP's sampling (top-k 50 before top-p) and ITM input ([ENC] first) are the defaults, recorded
    assert (manifest["settings"]["top_k"], manifest["settings"]["itm_first_token"]) == (50, "enc")
    # progress lines while running, the summary table at the end
    assert "curate: " in clean_run["stderr"] and "rows/s" in clean_run["stderr"]
    assert "input_rows = kept + dropped + errors" in clean_run["stdout"]
    assert re.search(r"precision +fp32\n", clean_run["stdout"] + "\n")  # --precision fp32: nothing checked
    assert not (out / "_staging").exists()


def test_selection_rule_matches_direct_model_scores(clean_run, direct):
    from capfilt.pipeline.curate.select import select_captions
    from capfilt.transforms.seeding import sample_seed

    rows, _ = load_rows(clean_run["out"])
    threshold = float(direct["threshold"])
    kept = 0
    for i, key in enumerate(direct["keys"]):
        row, web, syn = rows[key], direct["webs"][i], direct["synthetic"][i]
        itm, clip = list(direct["itm"][i]), list(direct["clip"][i])
        # scores come in candidate order: the web caption first when it is not empty
        web_itm, web_clip = (itm.pop(0), clip.pop(0)) if web else (None, None)
        assert row["web_caption"] == web and row["synthetic_captions"] == syn
        assert row["seed"] == sample_seed(SEED, key, 0)
        assert (row["web_itm"] is None) == (web_itm is None)
        if web:
            np.testing.assert_allclose([row["web_itm"], row["web_clip"]], [web_itm, web_clip], atol=1e-5)
        np.testing.assert_allclose(row["synthetic_itm"], itm, atol=1e-5)
        np.testing.assert_allclose(row["synthetic_clip"], clip, atol=1e-5)
        expect = select_captions(web, syn, web_itm, itm, web_clip, clip, itm_threshold=threshold, keep_top=2)
        assert (row["captions"], row["caption_sources"], row["keep"], row["drop_reason"]) == (
            expect.captions, expect.sources, expect.keep, expect.drop_reason)
        # the rule spelled out: selected captions passed, and the best-ranked passing ones were taken
        scored = ([(web, web_itm, web_clip)] if web else []) + list(zip(syn, itm, clip))
        passing = {}
        for text, p, c in scored:
            if text and p >= threshold:
                passing.setdefault(text, c)
        assert set(row["captions"]) <= set(passing)
        assert len(row["captions"]) == min(2, len(passing))
        assert sorted(passing.values(), reverse=True)[:len(row["captions"])] == [passing[c] for c in row["captions"]]
        kept += row["keep"]
    assert 0 < kept < len(direct["keys"]), "threshold should keep some rows and drop others"


def test_checked_bf16_keeps_every_decision_of_fp32(clean_run, inputs, tiny_models, direct, tmp_path):
    """``--precision bf16-checked`` (the default where bf16 is native): the same rows as fp32 but
    for bf16 rounding of scores far from any decision. With margins of 1 every image is
    re-scored in fp32, so the scores equal fp32's too."""
    from capfilt.model.inference.device import cpu_has_native_bf16

    native = cpu_has_native_bf16()
    rows32, _ = load_rows(clean_run["out"])
    for margins, name in ((("--itm-margin", "1", "--clip-margin", "1"), "all"), ((), "default")):
        out = tmp_path / name
        code, stdout, stderr = run_cli(curate_argv(inputs, out, tiny_models, direct, "--batch-size", "8",
                                                   "--precision", "bf16-checked", *margins))
        assert code == 0, stderr
        run = json.loads((out / "stats.json").read_text())["this_run"]
        rows, _ = load_rows(out)
        assert sorted(rows) == sorted(rows32)
        for key, row in rows.items():
            ref = rows32[key]
            assert (row["captions"], row["caption_sources"], row["keep"], row["drop_reason"],
                    row["synthetic_captions"]) == (ref["captions"], ref["caption_sources"], ref["keep"],
                                                   ref["drop_reason"], ref["synthetic_captions"]), key
        if not native:  # no bf16 hardware: checked bf16 falls back to fp32, nothing to re-score
            assert run["precision"] == "fp32" and run["fp32_rescored"] == {"filter": 0, "rank": 0}
            assert re.search(r"precision +fp32\n", stdout + "\n")
            continue
        assert run["precision"] == "bf16-checked"
        if name != "all":
            continue
        threshold = float(direct["threshold"])
        ranked = set()  # rows with two passing texts or more: a CLIP ranking the check can look at
        for key, ref in rows32.items():
            texts = [ref["web_caption"]] if ref["web_caption"] else []
            scores = ([ref["web_itm"]] if ref["web_caption"] else []) + ref["synthetic_itm"]
            if len({t for t, v in zip(texts + ref["synthetic_captions"], scores) if t and v >= threshold}) >= 2:
                ranked.add(key)
        assert 0 < len(ranked) < len(rows)
        assert run["fp32_rescored"]["filter"] == len(rows)
        assert f"bf16-checked; images scored in fp32 by the check: filter {len(rows)}, rank" in stdout
        # at least every ranking; more once a model goes fp32-first (pipeline/curate/precision.py)
        assert len(ranked) <= run["fp32_rescored"]["rank"] <= len(rows)
        for key, row in rows.items():
            ref = rows32[key]
            np.testing.assert_allclose(row["synthetic_itm"], ref["synthetic_itm"], atol=1e-5)
            clip_tol = 1e-5 if key in ranked else 0.01  # the others keep their bf16 CLIP scores
            np.testing.assert_allclose(row["synthetic_clip"], ref["synthetic_clip"], atol=clip_tol)


def test_batch_size_one_on_two_worker_processes_gives_identical_output(clean_run, inputs, tiny_models, direct, tmp_path):
    out = tmp_path / "b1w2"
    code, _, stderr = run_cli(curate_argv(inputs, out, tiny_models, direct, "--batch-size", "1",
                                          "--direct_num_workers", "2", "--direct_running_mode", "multi_processing"))
    assert code == 0, stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["this_run"]["workers"] == 2 and stats["this_run"]["batch_size"] == 1
    assert_same_rows(clean_run["out"], out)
    for p in sorted((clean_run["out"] / "shards").glob("*.parquet")):  # same row order too
        assert pq.read_table(p, columns=["key"]).equals(pq.read_table(out / "shards" / p.name, columns=["key"]))


def test_testpipeline_graph_matches_clean_run(clean_run, inputs, tiny_models, direct):
    from capfilt.jobs.commands.curate import add_arguments, config_from_args
    from capfilt.pipeline.curate.graph import CurateRows
    from capfilt.pipeline.curate.decode import ResolveDuplicateKeys
    from capfilt.pipeline.curate.options import make_pipeline_options
    from capfilt.pipeline.curate.sources import ReadRows, discover_shards, validate_shard

    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(curate_argv(inputs, "unused", tiny_models, direct)[1:])
    cfg = config_from_args(args)
    shards = [validate_shard(s) for s in discover_shards(cfg.inputs)]
    rows, _ = load_rows(clean_run["out"])
    expected = [(k, r["keep"], tuple(r["captions"]), r["drop_reason"]) for k, r in rows.items()]
    with test_pipeline.TestPipeline(options=make_pipeline_options([])) as p:
        samples, read_errors = p | beam.Create(shards) | ReadRows()
        samples, dups = samples | ResolveDuplicateKeys()
        curated, errors = samples | CurateRows(cfg)
        assert_that(curated | beam.Map(lambda t: (t[2]["key"], t[2]["keep"], tuple(t[2]["captions"]),
                                                  t[2]["drop_reason"])), equal_to(expected), label="curated")
        assert_that((errors, dups, read_errors) | beam.Flatten(), equal_to([]), label="errors")


# --- incremental runs -----------------------------------------------------------------------

def test_rerun_skips_done_shards_and_changes_no_file(clean_run, inputs, extra_shard, tiny_models, direct, tmp_path,
                                                     monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(clean_run["out"], out)
    before = {p: (p.stat().st_mtime_ns, sha256(p)) for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    code, stdout, stderr = run_cli(curate_argv(inputs, out, tiny_models, direct))
    assert code == 0, stderr
    assert "0 curated now, 3 skipped as done" in stdout
    after = {p: (p.stat().st_mtime_ns, sha256(p)) for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before
    # newer code with nothing to curate: the rows are still the old code's, the manifest says so
    monkeypatch.setattr("capfilt.pipeline.curate.state.code_version", lambda: "git:a-newer-commit")
    code, stdout, stderr = run_cli(curate_argv(inputs, out, tiny_models, direct))
    assert code == 0 and "0 curated now" in stdout, stderr
    after = {p: (p.stat().st_mtime_ns, sha256(p)) for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before
    monkeypatch.undo()

    # a new input shard: only it is curated; totals grow by its rows
    new_dir = tmp_path / "in"
    shutil.copytree(inputs, new_dir)
    shutil.copy(extra_shard, new_dir / "00003.parquet")
    code, stdout, stderr = run_cli(curate_argv(new_dir, out, tiny_models, direct))
    assert code == 0, stderr
    assert "1 curated now, 3 skipped as done" in stdout
    stats = json.loads((out / "stats.json").read_text())
    assert stats["input_rows"] == 32 and stats["this_run"]["input_rows"] == 8
    for p in before:
        if "shards" in p.parts or "errors" in p.parts:
            assert sha256(p) == before[p][1]  # finished shards were not rewritten

    # other settings into the same --out are refused; --overwrite starts fresh
    code, _, stderr = run_cli(curate_argv(new_dir, out, tiny_models, direct, "--keep-top", "1"))
    assert code == 2 and "other settings" in stderr and "keep_top: was 2, now 1" in stderr
    code, stdout, stderr = run_cli(curate_argv(new_dir, out, tiny_models, direct, "--overwrite", "--no-synthetic"))
    assert code == 0, stderr
    assert "4 curated now, 0 skipped" in stdout
    rows, _ = load_rows(out)
    assert len(rows) == 32 and all(r["synthetic_captions"] == [] for r in rows.values())
    assert all(set(r["caption_sources"]) <= {"web"} for r in rows.values())


def test_crash_before_done_marker_then_resume(clean_run, inputs, tiny_models, direct, tmp_path, monkeypatch):
    from capfilt.pipeline.curate import state

    out = tmp_path / "out"
    real = state.write_json

    def crash_on_second_marker(path, obj):
        if str(path).endswith("00001.json"):
            raise OSError("simulated crash after the shard's files were moved, before its marker")
        real(path, obj)

    monkeypatch.setattr(state, "write_json", crash_on_second_marker)
    code, _, stderr = run_cli(curate_argv(inputs, out, tiny_models, direct, "--shards-per-pipeline", "2"))
    assert code == 1 and "capfilt curate: failed: simulated crash" in stderr  # one line, no traceback
    assert (out / "shards" / "part-00001.parquet").exists() and not (out / "_state" / "00001.json").exists()
    monkeypatch.setattr(state, "write_json", real)
    code, stdout, stderr = run_cli(curate_argv(inputs, out, tiny_models, direct))
    assert code == 0, stderr
    assert "2 curated now, 1 skipped as done" in stdout
    assert_same_rows(clean_run["out"], out)


def test_kill_9_mid_run_then_resume(clean_run, inputs, tiny_models, direct, tmp_path):
    out = tmp_path / "out"
    argv = curate_argv(inputs, out, tiny_models, direct, "--shards-per-pipeline", "1")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "capfilt.jobs.cli", *argv], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not (out / "_state" / "00000.json").exists():
            assert proc.poll() is None, "curate exited before it could be killed"
            assert time.monotonic() < deadline, "no shard finished in time"
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before the kill"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    done = sorted(p.name for p in (out / "_state").glob("0*.json"))
    assert 1 <= len(done) < 3 and not (out / "stats.json").exists()
    code, stdout, stderr = run_cli(curate_argv(inputs, out, tiny_models, direct))
    assert code == 0, stderr
    assert f"{3 - len(done)} curated now, {len(done)} skipped as done" in stdout
    assert_same_rows(clean_run["out"], out)
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["input_rows"], stats["shards"]) == (24, 3)


def files_snapshot(out):
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, sha256(p))
            for p in Path(out).rglob("*") if p.is_file() and p.name != ".lock"}


def test_failed_overwrite_keeps_the_old_output_and_a_run_without_a_done_shard_does_not_lock_out_a_retry(
        clean_run, inputs, tiny_models, direct, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(clean_run["out"], out)
    before = files_snapshot(out)
    # a hub id that does not resolve (offline, not cached) and an unusable device are refused
    # before --overwrite deletes anything
    for option, value in (("--captioner", "Salesforce/blip-image-captioning-large"), ("--device", "bogus")):
        code, _, stderr = run_cli(curate_argv(inputs, out, tiny_models, direct, option, value, "--overwrite"))
        assert code == 2 and f"capfilt curate: error: {option} {value}: " in stderr
        assert files_snapshot(out) == before
    # weights that only fail to load inside the pipeline: --overwrite has cleared the output by
    # then, and no shard was finished with the failed settings, so the retry is not refused
    broken = tmp_path / "broken_captioner"
    shutil.copytree(tiny_models["captioner"], broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 16)
    code, _, stderr = run_cli(curate_argv(inputs, out, tiny_models, direct, "--captioner", str(broken), "--overwrite"))
    assert code == 2 and "cannot load BlipForConditionalGeneration" in stderr
    assert (out / "_state" / "settings.json").exists() and not list((out / "_state").glob("0*.json"))
    code, stdout, stderr = run_cli(curate_argv(inputs, out, tiny_models, direct))
    assert code == 0, stderr
    assert "3 curated now, 0 skipped as done" in stdout
    assert_same_rows(clean_run["out"], out)


def test_deleted_or_changed_output_shard_is_curated_again(clean_run, inputs, tiny_models, direct, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(clean_run["out"], out)
    (out / "shards" / "part-00001.parquet").unlink()
    with open(out / "errors" / "part-00002.parquet", "ab") as f:
        f.write(b"x")  # no longer the size its done marker recorded
    code, stdout, stderr = run_cli(curate_argv(inputs, out, tiny_models, direct))
    assert code == 0, stderr
    assert "2 curated now, 1 skipped as done" in stdout
    assert_same_rows(clean_run["out"], out)
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["input_rows"], stats["shards"], stats["this_run"]["input_rows"]) == (24, 3, 16)

    # a done shard outside this run's input whose output is gone: no longer counted
    (out / "shards" / "part-00002.parquet").unlink()
    two = tmp_path / "two"
    two.mkdir()
    for name in ("00000.parquet", "00001.parquet"):
        shutil.copy(inputs / name, two / name)
    code, stdout, stderr = run_cli(curate_argv(two, out, tiny_models, direct))
    assert code == 0, stderr
    assert "0 curated now, 2 skipped as done" in stdout
    stats = json.loads((out / "stats.json").read_text())
    rows, errors = load_rows(out)
    assert (stats["input_rows"], stats["shards"]) == (16, 2) and len(rows) + len(errors) == 16
    assert not (out / "_state" / "00002.json").exists() and not (out / "errors" / "part-00002.parquet").exists()
