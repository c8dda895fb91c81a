"""`capfilt curate` from ``s3://`` to ``s3://`` with the models on ``s3://``, against a local
S3-compatible server (moto, tests/s3_server.py) through Beam's S3 file system.

* The same rows as a local run; markers, manifest and stats on the object store; the models'
  hashes are those of the local directories they were uploaded from.
* A launcher killed (kill -9) mid-run, then a re-run: identical rows, no file that no marker
  names, nothing left in ``_staging``.
* A model on object storage is copied once per machine into the cache, and a copy whose files
  changed since the run started is refused.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.model.specs import identity
from capfilt.transforms.schemas import CURATED_SCHEMA
from cli_run import run_cli
from s3_server import download_dir, upload_dir

FLOAT_COLUMNS = ("web_itm", "web_itc", "web_clip", "synthetic_itm", "synthetic_itc", "synthetic_clip")


def model_args(captioner, itm, clip):
    return ["--captioner", str(captioner), "--filter", str(itm), "--clip", str(clip), "--num-captions", "2",
            "--max-length", "10", "--min-length", "4", "--seed", "5", "--torch-threads", "1",
            "--precision", "fp32", "--itm-threshold", "0.5"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, synth_world):
    """Three raw shards of 4 web rows each."""
    table = pq.read_table(sorted((synth_world / "web").glob("*.parquet"))[0])
    root = tmp_path_factory.mktemp("s3_in")
    for i in range(3):
        pq.write_table(table.slice(4 * i, 4), root / f"{i:05d}.parquet")
    return root


@pytest.fixture(scope="module")
def reference(inputs, tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("s3_ref") / "out"
    code, _, stderr = run_cli(["curate", "--input", str(inputs / "*.parquet"), "--out", str(out),
                               *model_args(tiny_models["captioner"], tiny_models["itm"], tiny_models["clip"])])
    assert code == 0, stderr
    return out


@pytest.fixture
def remote(s3_root, inputs, tiny_models, tmp_path, monkeypatch):
    """Inputs and models uploaded under this test's prefix; a model cache of this test's own."""
    upload_dir(inputs, f"{s3_root}/raw")
    for kind in ("captioner", "itm", "clip"):
        upload_dir(tiny_models[kind], f"{s3_root}/models/{kind}")
    monkeypatch.setenv("CAPFILT_MODEL_CACHE", str(tmp_path / "cache"))
    return s3_root


def argv(root, s3_server):
    return ["curate", "--input", f"{root}/raw/*.parquet", "--out", f"{root}/out",
            *model_args(f"{root}/models/captioner", f"{root}/models/itm", f"{root}/models/clip"),
            "--runner", "FnApiRunner", *s3_server.args]


def rows_of(folder: Path) -> dict:
    table = pa.concat_tables(pq.read_table(p) for p in sorted(folder.glob("*.parquet")))
    return {r["key"]: r for r in table.to_pylist()}


def assert_same_rows(out: Path, reference: Path):
    rows, ref = rows_of(out / "shards"), rows_of(reference / "shards")
    assert sorted(rows) == sorted(ref) and len(rows) > 0
    for key, row in rows.items():
        for col in CURATED_SCHEMA.names:
            if col in FLOAT_COLUMNS and row[col] is not None:
                np.testing.assert_allclose(row[col], ref[key][col], atol=1e-6, err_msg=f"{key} {col}")
            else:
                assert row[col] == ref[key][col], (key, col)
    errors, ref_errors = rows_of(out / "errors"), rows_of(reference / "errors")
    assert errors == ref_errors


def listing(s3_server, prefix: str) -> list[str]:
    client = s3_server.boto3_client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=s3_server.bucket, Prefix=prefix)
    return sorted(obj["Key"][len(prefix):] for page in pages for obj in page.get("Contents", []))


def test_curate_s3_to_s3_with_models_on_s3(remote, reference, s3_server, tiny_models, inputs, tmp_path):
    code, stdout, stderr = run_cli(argv(remote, s3_server))
    assert code == 0, stderr
    local = tmp_path / "out"
    download_dir(f"{remote}/out", local)
    assert_same_rows(local, reference)
    stats = json.loads((local / "stats.json").read_text())
    assert stats["input_rows"] == 12 == stats["kept"] + stats["dropped"] + stats["errors"]
    assert stats["shards"] == 3
    manifest = json.loads((local / "manifest.json").read_text())
    for role, kind in (("captioner", "captioner"), ("filter", "itm"), ("clip", "clip")):
        assert manifest["models"][role] == {"id": f"{remote}/models/{kind}", "kind": "directory",
                                            "sha256": identity(str(tiny_models[kind]))["sha256"],
                                            "untrained": True}  # models init's mark, read from the copy
    assert manifest["ran_on"] == {"caption": ["cpu/fp32"], "filter": ["cpu/fp32"], "rank": ["cpu/fp32"]}
    prefix = remote.split("/", 3)[3] + "/out/"
    names = listing(s3_server, prefix)
    assert not [n for n in names if n.startswith("_staging/") or ".tmp-" in n], names
    assert sorted(n for n in names if n.startswith(("shards/", "errors/"))) == sorted(
        f"{d}/part-{i:05d}.parquet" for d in ("shards", "errors") for i in range(3))
    # each marker names its files' sizes and sha256s, as computed by the workers that read and wrote them
    for i in range(3):
        marker = json.loads((local / "_state" / f"{i:05d}.json").read_text())
        for kind, folder in (("curated", "shards"), ("errors", "errors")):
            data = (local / folder / f"part-{i:05d}.parquet").read_bytes()
            assert (marker[kind]["size"], marker[kind]["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
        raw = (inputs / f"{i:05d}.parquet").read_bytes()
        assert marker["input"] == {"path": f"{remote}/raw/{i:05d}.parquet", "name": f"{i:05d}.parquet",
                                   "size": len(raw), "sha256": hashlib.sha256(raw).hexdigest(), "rows": 4,
                                   "format": "parquet"}
    # the model cache holds one copy per model, keyed by its hash
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir())
    assert cached == sorted(identity(str(tiny_models[k]))["sha256"] for k in ("captioner", "itm", "clip"))
    # nothing to do on a second run: no object changes
    before = {n: s3_server.boto3_client().head_object(Bucket=s3_server.bucket, Key=prefix + n)["ETag"]
              for n in names}
    code, _, stderr = run_cli(argv(remote, s3_server))
    assert code == 0, stderr
    after = {n: s3_server.boto3_client().head_object(Bucket=s3_server.bucket, Key=prefix + n)["ETag"]
             for n in listing(s3_server, prefix)}
    assert after == before


def test_a_launcher_killed_mid_run_then_rerun_gives_the_same_rows(remote, reference, s3_server, tmp_path):
    """kill -9 of the launcher once the first output object exists (files under their final
    names, with or without their marker), then a re-run: the same rows, no stray object."""
    prefix = remote.split("/", 3)[3] + "/out/"
    cmd = [sys.executable, "-c", "import sys; from capfilt.jobs.cli import main_entry; sys.argv[0] = 'capfilt'; "
           "main_entry()", *argv(remote, s3_server), "--shards-per-pipeline", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if any(n.startswith(("shards/", "errors/")) for n in listing(s3_server, prefix)):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    left = listing(s3_server, prefix)
    assert "stats.json" not in left and any(n.startswith(("shards/", "errors/")) for n in left), left
    code, stdout, stderr = run_cli(argv(remote, s3_server))
    assert code == 0, stderr
    local = tmp_path / "out"
    download_dir(f"{remote}/out", local)
    assert_same_rows(local, reference)
    stats = json.loads((local / "stats.json").read_text())
    assert (stats["input_rows"], stats["shards"]) == (12, 3)
    assert stats["input_rows"] == stats["kept"] + stats["dropped"] + stats["errors"]
    names = listing(s3_server, prefix)
    assert sorted(n for n in names if not n.startswith("_state/")) == sorted(
        ["manifest.json", "stats.json"] + [f"{d}/part-{i:05d}.parquet" for d in ("shards", "errors") for i in range(3)])


def test_a_model_on_object_storage_is_copied_once_and_checked_by_hash(s3_root, tiny_models, tmp_path, monkeypatch):
    from capfilt.pipeline.models import local_copy
    from capfilt.transforms.files.hashing import dir_sha256

    monkeypatch.setenv("CAPFILT_MODEL_CACHE", str(tmp_path / "cache"))
    url = f"{s3_root}/models/clip"
    upload_dir(tiny_models["clip"], url)
    path = local_copy(url)
    expected = dir_sha256(tiny_models["clip"])
    assert path == str(tmp_path / "cache" / expected) and dir_sha256(path) == expected
    assert local_copy(url, expected) == path  # cached: no second copy
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()) == [expected]
    # the model changes on the store after the run started: a worker's fresh copy is refused
    monkeypatch.setenv("CAPFILT_MODEL_CACHE", str(tmp_path / "other_machine"))
    upload_dir(tiny_models["captioner"], url)  # more files under the same prefix
    with pytest.raises(ValueError, match=f"{url}: its files now hash to [0-9a-f]{{64}}, the run started with {expected}"):
        local_copy(url, expected)
    assert [p.name for p in (tmp_path / "other_machine").iterdir() if p.is_dir()] == []  # nothing half-copied
    with pytest.raises(ValueError, match="no model files there"):
        local_copy(f"{s3_root}/models/none")
