"""The RunInference handlers' model sharing (pipeline/curate/inference.py): what they tell Beam
for --share-model-across-processes, --model-copies and --large-model, what RunInference then
does with the models, the refused combinations, and a curate run with shared models against
one without."""
import dataclasses
import json
import pickle
import uuid
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.ml.inference.base import KeyedModelHandler
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.utils import multi_process_shared

from capfilt.pipeline.curate.inference import CaptionHandler, InferStage, _SampleHandler, model_tag
from capfilt.pipeline.curate.options import CurateConfig, make_pipeline_options
from capfilt.transforms.rows import Sample
from capfilt.transforms.schemas import CURATED_SCHEMA
from cli_run import error_line, run_cli

BASE = dict(inputs=("x",), out="y", captioner="c", filter="f", clip="k", device="cpu", precision="fp32")
FLOAT_COLUMNS = ("web_itm", "web_itc", "web_clip", "synthetic_itm", "synthetic_itc", "synthetic_clip")


def handler(**changes):
    return CaptionHandler("c", CurateConfig(**BASE, **changes))


# --- what the handler tells Beam ------------------------------------------------------------------

@pytest.mark.parametrize("changes, shared, copies", [
    ({}, False, 1),
    ({"share_model_across_processes": True}, True, 1),
    ({"share_model_across_processes": True, "model_copies": 2}, True, 2),
    ({"model_copies": 3}, True, 3),  # Beam: model_copies implies sharing
    ({"large_model": True}, True, 1),
    ({"large_model": True, "model_copies": 1}, True, 1),
])
def test_the_handler_reports_the_sharing_options_to_beam(changes, shared, copies):
    cfg = CurateConfig(**BASE, **changes)
    assert cfg.shares_models is shared
    assert cfg.model_sharing() == ({"per": "machine", "copies": copies} if shared else {"per": "process"})
    h = CaptionHandler("c", cfg)
    # as RunInference sees it: keyed, on a worker (pickled), and the retry of a failed batch's rows
    for seen in (h, KeyedModelHandler(h), pickle.loads(pickle.dumps(h)), h.alone()):
        assert (seen.share_model_across_processes(), seen.model_copies()) == (shared, copies)
        # Beam drops a timed-out shared model rather than keeping it for the next call
        assert seen.should_garbage_collect_on_timeout() is shared


@pytest.mark.parametrize("changes, message", [
    ({"model_copies": 0}, "--model-copies must be in [1, 1000], got 0"),
    ({"model_copies": 2, "large_model": True},
     "--model-copies 2 with --large-model: a large model is loaded once per machine; drop one of the two"),
])
def test_impossible_sharing_options_are_refused(changes, message):
    with pytest.raises(ValueError) as err:
        CurateConfig(**BASE, **changes)
    assert str(err.value) == message


@pytest.mark.parametrize("args, message", [
    (["--model-copies", "0"], "--model-copies must be in [1, 1000], got 0"),
    (["--large-model", "--model-copies", "4"],
     "--model-copies 4 with --large-model: a large model is loaded once per machine; drop one of the two"),
])
def test_the_cli_refuses_them_in_one_line_and_creates_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["curate", "--input", str(tmp_path / "*.parquet"), "--out", str(out),
                                    "--captioner", "c", "--filter", "f", "--clip", "k", *args])
    assert code == 2 and error_line(stderr) == f"capfilt curate: error: {message}" and stdout == ""
    assert not out.exists()


def test_sharing_is_not_a_row_setting_and_each_option_has_help():
    import argparse

    from capfilt.jobs.commands.curate import add_arguments

    plain = CurateConfig(**BASE).fingerprint()
    for changes in ({"share_model_across_processes": True}, {"model_copies": 2}, {"large_model": True}):
        assert CurateConfig(**BASE, **changes).fingerprint() == plain  # a resume may change them
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    helps = {a.option_strings[0]: a.help for a in parser._actions if a.option_strings}
    for flag in ("--share-model-across-processes", "--model-copies", "--large-model"):
        assert "per machine" in helps[flag], flag
    args = parser.parse_args(["--input", "x", "--out", "y", "--model-copies", "2", "--large-model"])
    assert (args.model_copies, args.large_model, args.share_model_across_processes) == (2, True, False)


# --- what RunInference does with them (in-process FnApiRunner) ------------------------------------

class Echo:
    """A "model" that names itself; every load is counted."""

    loads: list = []

    def __init__(self):
        Echo.loads.append(self)
        self.name = f"copy{len(Echo.loads)}"

    def who(self, keys):
        return [self.name] * len(keys)


class EchoHandler(_SampleHandler):
    stage = "caption"

    def load(self):
        return Echo()

    def infer(self, batch, model):
        # a shared model is a proxy: its methods run in the process that loaded it
        names = model.who([s.key for s in batch])
        return [dataclasses.replace(s, synthetic=[n, type(model).__name__]) for s, n in zip(batch, names)]


def samples(n):
    return [Sample(key=f"k{i}", url=None, sha256=None, jpg=b"", caption="", shard=0, row=i) for i in range(n)]


@pytest.fixture
def beam_tmp(tmp_path, monkeypatch):
    """Beam's MultiProcessShared lock and address files under tmp_path instead of /tmp."""
    monkeypatch.setitem(multi_process_shared.MultiProcessShared.__init__.__kwdefaults__, "path", str(tmp_path))
    Echo.loads = []
    return tmp_path


def echo_rows(model_type, names):
    """A matcher of the outputs: every sample once, each answered by a model of `model_type`,
    the answers from exactly the copies in `names`."""
    def check(rows):
        assert sorted(key for key, _, _ in rows) == [f"k{i}" for i in range(6)]
        assert {kind for _, kind, _ in rows} == {model_type}
        assert {name for _, _, name in rows} == names

    return check


@pytest.mark.parametrize("changes, model_type, names", [
    ({}, "Echo", {"copy1"}),  # per process: the model object itself
    ({"share_model_across_processes": True}, "_AutoProxyWrapper", {"copy1"}),
    ({"model_copies": 2}, "_AutoProxyWrapper", {"copy1", "copy2"}),  # batches go to the copies in turn
])
def test_run_inference_loads_shared_copies_once_and_uses_them_in_turn(beam_tmp, changes, model_type, names):
    cfg = CurateConfig(**BASE, batch_size=1, **changes)
    echo = EchoHandler(f"echo-{uuid.uuid4().hex}", cfg)  # a model tag no earlier test has used
    with test_pipeline.TestPipeline(options=make_pipeline_options([])) as p:
        ok, errors = p | beam.Create(samples(6)) | InferStage(echo)
        assert_that(errors | beam.combiners.Count.Globally(), equal_to([0]), label="NoErrors")
        assert_that(ok | beam.Map(lambda s: (s.key, s.synthetic[1], s.synthetic[0])), echo_rows(model_type, names))
    # the batch transform and the retry-alone transform share the copies (one model tag)
    assert len(Echo.loads) == len(names)
    if changes:  # Beam's files for the shared copies, named by the stage's model tag
        assert {f"{model_tag(echo)}{i}.address" for i in range(len(names))} <= {p.name for p in beam_tmp.iterdir()}


def test_the_model_tag_is_stable_within_a_run_and_names_the_model():
    a, b = EchoHandler("m1", CurateConfig(**BASE)), EchoHandler("m1", CurateConfig(**BASE, batch_size=3))
    assert model_tag(a) == model_tag(b) == model_tag(a.alone())  # the next pipeline reuses the copies
    assert model_tag(a).startswith("capfilt-caption-")
    assert model_tag(EchoHandler("m2", CurateConfig(**BASE))) != model_tag(a)
    assert model_tag(EchoHandler("m1", CurateConfig(**{**BASE, "precision": "bf16"}))) != model_tag(a)


# --- a curate run with shared models gives the rows of one without ---------------------------------

@pytest.fixture(scope="module")
def small_inputs(tmp_path_factory, synth_world):
    """Two raw shards of 4 web rows each."""
    table = pq.read_table(sorted((synth_world / "web").glob("*.parquet"))[0])
    root = tmp_path_factory.mktemp("share_in")
    for i in range(2):
        pq.write_table(table.slice(4 * i, 4), root / f"{i:05d}.parquet")
    return root


def curate(inputs, out, tiny_models, *extra):
    code, stdout, stderr = run_cli([
        "curate", "--input", str(inputs / "*.parquet"), "--out", str(out), "--captioner", str(tiny_models["captioner"]),
        "--filter", str(tiny_models["itm"]), "--clip", str(tiny_models["clip"]), "--num-captions", "2",
        "--max-length", "10", "--min-length", "4", "--seed", "5", "--torch-threads", "1", "--precision", "fp32",
        "--batch-size", "2", *extra])
    assert code == 0, stderr
    table = pa.concat_tables(pq.read_table(p) for p in sorted((out / "shards").glob("*.parquet")))
    rows = table.to_pylist()
    assert len({r["key"] for r in rows}) == len(rows)  # no duplicates
    return {r["key"]: r for r in rows}, json.loads((out / "stats.json").read_text())


def test_a_curate_run_with_shared_models_gives_the_same_rows(small_inputs, tiny_models, tmp_path, beam_tmp):
    plain, plain_stats = curate(small_inputs, tmp_path / "plain", tiny_models)
    shared, stats = curate(small_inputs, tmp_path / "shared", tiny_models, "--share-model-across-processes",
                           "--model-copies", "2")
    assert sorted(shared) == sorted(plain) and len(plain) == 8
    for key, row in shared.items():
        for col in CURATED_SCHEMA.names:
            if col in FLOAT_COLUMNS and row[col] is not None:
                np.testing.assert_allclose(row[col], plain[key][col], atol=1e-6, err_msg=f"{key} {col}")
            else:
                assert row[col] == plain[key][col], (key, col)
    assert stats["input_rows"] == 8 == stats["kept"] + stats["dropped"] + stats["errors"]
    assert (stats["kept"], stats["dropped"], stats["errors"]) == (
        plain_stats["kept"], plain_stats["dropped"], plain_stats["errors"])
    assert (plain_stats["this_run"]["model_sharing"], stats["this_run"]["model_sharing"]) == (
        {"per": "process"}, {"per": "machine", "copies": 2})
    manifests = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("plain", "shared")]
    assert manifests[0]["settings"] == manifests[1]["settings"]  # not a row setting
    # every stage's two copies were served by Beam's MultiProcessShared
    assert {p.name.split("-")[1] for p in beam_tmp.glob("capfilt-*1.address")} == {"caption", "filter", "rank"}
