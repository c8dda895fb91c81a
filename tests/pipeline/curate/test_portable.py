"""`capfilt curate` on other runners than the local FnApiRunner, as a new user would run it.

* PortableRunner against Beam's own job service with an external SDK worker pool (the
  protocol of Flink, Spark and Dataflow), both started here on 127.0.0.1 in working
  directories of their own, with relative paths on the command line: the same rows as an
  FnApiRunner run.
* Plug-in runners named by their full class path (curate_stub_runner.py): their own options
  pass, a runner without Metrics completes with counts from the written files, and a runner
  that cannot be created is refused before --out is touched.
* --device cuda with a runner that is not local is left to the workers.
"""
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.pipeline.curate.options import CurateConfig
from capfilt.transforms.schemas import CURATED_SCHEMA
from beam_services import portable_services
from cli_run import error_line, run_cli

FLOAT_COLUMNS = ("web_itm", "web_itc", "web_clip", "synthetic_itm", "synthetic_itc", "synthetic_clip")
STUB = "curate_stub_runner"  # tests/pipeline/curate/curate_stub_runner.py, on sys.path under pytest


def model_args(captioner, itm, clip):
    return ["--captioner", str(captioner), "--filter", str(itm), "--clip", str(clip), "--num-captions", "2",
            "--max-length", "10", "--min-length", "4", "--seed", "5", "--torch-threads", "1",
            "--precision", "fp32", "--itm-threshold", "0.5"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, synth_world):
    """Two raw shards of 4 web rows each."""
    table = pq.read_table(sorted((synth_world / "web").glob("*.parquet"))[0])
    root = tmp_path_factory.mktemp("portable_in")
    for i in range(2):
        pq.write_table(table.slice(4 * i, 4), root / f"{i:05d}.parquet")
    return root


@pytest.fixture(scope="module")
def reference(inputs, tiny_models, tmp_path_factory):
    """The same curate on the local FnApiRunner."""
    out = tmp_path_factory.mktemp("portable_ref") / "out"
    code, _, stderr = run_cli(["curate", "--input", str(inputs / "*.parquet"), "--out", str(out),
                               *model_args(tiny_models["captioner"], tiny_models["itm"], tiny_models["clip"])])
    assert code == 0, stderr
    return out


@pytest.fixture
def workdir(tmp_path, inputs, tiny_models, monkeypatch):
    """A working directory holding the inputs and models under relative names."""
    (tmp_path / "raw").symlink_to(inputs, target_is_directory=True)
    (tmp_path / "models").mkdir()
    for kind in ("captioner", "itm", "clip"):
        (tmp_path / "models" / kind).symlink_to(tiny_models[kind], target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


RELATIVE = ["--input", "raw/*.parquet", "--out", "out", *model_args("models/captioner", "models/itm", "models/clip")]


def load_rows(out):
    table = pa.concat_tables(pq.read_table(p) for p in sorted((Path(out) / "shards").glob("*.parquet")))
    return {r["key"]: r for r in table.to_pylist()}


def assert_same_as_reference(out, reference):
    rows, ref = load_rows(out), load_rows(reference)
    assert sorted(rows) == sorted(ref)
    for key, row in rows.items():
        for col in CURATED_SCHEMA.names:
            if col in FLOAT_COLUMNS and row[col] is not None:
                np.testing.assert_allclose(row[col], ref[key][col], atol=1e-6, err_msg=f"{key} {col}")
            else:
                assert row[col] == ref[key][col], (key, col)
    stats = json.loads((Path(out) / "stats.json").read_text())
    assert stats["input_rows"] == 8 == stats["kept"] + stats["dropped"] + stats["errors"]
    return stats


# --- launcher-side: paths, runner names ---------------------------------------------------------

def test_local_paths_become_absolute_and_urls_stay(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = CurateConfig(inputs=("raw/*.parquet", "gs://b/raw/*.tar"), out="out", captioner="m",
                       filter="Salesforce/blip-itm-large-coco", clip="local-dir:clipdir").absolute()
    assert cfg.inputs == (str(tmp_path / "raw" / "*.parquet"), "gs://b/raw/*.tar")
    assert cfg.out == str(tmp_path / "out")
    assert cfg.captioner == str(tmp_path / "m")
    assert cfg.filter == "Salesforce/blip-itm-large-coco"  # a hub id
    assert cfg.clip == "local-dir:" + str(tmp_path / "clipdir")
    (tmp_path / "w.pt").write_bytes(b"")
    for clip, expected in (("ViT-B-32:openai", "ViT-B-32:openai"),  # a pretrained tag
                           ("ViT-B-32:w.pt", f"ViT-B-32:{tmp_path / 'w.pt'}")):  # a weights file
        cfg = CurateConfig(inputs=("x",), out="s3://b/o", captioner="c", filter="f", clip=clip).absolute()
        assert (cfg.clip, cfg.out) == (expected, "s3://b/o")


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in root.rglob("*") if p.is_file()} if root.exists() else None


@pytest.mark.parametrize("runner, message", [
    ("NoSuchRunner", "--runner NoSuchRunner: cannot create it (ValueError: Unexpected pipeline runner"),
    (f"{STUB}.BrokenRunner", f"--runner {STUB}.BrokenRunner: cannot create it (RuntimeError: no cluster"),
    ("no_such_module.Runner", "--runner no_such_module.Runner: cannot import no_such_module"),
])
def test_a_refused_runner_leaves_out_as_it_was(workdir, reference, runner, message):
    existing = workdir / "out"  # an earlier curate output, which a run would resume
    shutil.copytree(reference, existing)
    for out in (existing, workdir / "absent"):
        before = snapshot(out)
        argv = ["curate", *RELATIVE, "--runner", runner]
        argv[argv.index("out")] = out.name
        code, stdout, stderr = run_cli(argv)
        assert code == 2 and stdout == ""
        assert error_line(stderr).startswith(f"capfilt curate: error: {message}")
        assert snapshot(out) == before  # byte-identical, or still absent


def test_a_plugin_runners_options_pass_and_missing_metrics_are_read_from_files(workdir, reference):
    """A runner named by its full class path: its module is imported before Beam's options are
    checked (--stub_flag is its own), and its result has no Metrics."""
    code, stdout, stderr = run_cli(["curate", *RELATIVE, "--runner", f"{STUB}.NoMetricsRunner",
                                    "--stub_flag", "x"])
    assert code == 0, stderr
    assert sys.modules[STUB].NoMetricsRunner.flags == ["x"]
    stats = assert_same_as_reference(workdir / "out", reference)
    assert stats["this_run"]["runner"] == "NoMetricsRunner" and stats["this_run"]["input_rows"] == 8
    assert "input_rows = kept + dropped + errors" in stdout


# --- PortableRunner with external SDK workers ----------------------------------------------------

@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    """Beam options of a PortableRunner run against a local job service and worker pool."""
    with portable_services(tmp_path_factory.mktemp("portable_services")) as (options, _job, _pool):
        yield options


def test_portable_runner_with_external_workers_and_relative_paths(workdir, reference, portable):
    code, stdout, stderr = run_cli(["curate", *RELATIVE, *portable])
    assert code == 0, stderr
    stats = assert_same_as_reference(workdir / "out", reference)
    assert stats["this_run"]["runner"] == "PortableRunner"
    manifest = json.loads((workdir / "out" / "manifest.json").read_text())
    assert manifest["models"]["captioner"]["id"] == str(workdir / "models" / "captioner")


def test_device_cuda_is_left_to_the_workers_of_a_remote_runner(workdir, portable, monkeypatch):
    """The launcher's CPU-only check is not the workers': a CUDA device is refused only where
    the models run (here: workers without a GPU, one error line)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["curate", *RELATIVE, "--device", "cuda", "--precision", "auto"]
    code, _, stderr = run_cli(argv)  # the local runner: refused at once, as before
    assert code == 2 and error_line(stderr).startswith("capfilt curate: error: --device cuda: device 'cuda' requested")
    code, _, stderr = run_cli([*argv, *portable])
    if code != 0:  # workers with a GPU would curate
        line = error_line(stderr)
        assert not line.startswith("capfilt curate: error: --device") and "sees no CUDA device" in line, line
