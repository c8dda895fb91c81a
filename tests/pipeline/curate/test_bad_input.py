"""Bad input through the whole curate pipeline: every kind becomes a clear error row or a clear
up-front error, and no row is lost."""
import io
import json
import re

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from capfilt.pipeline.curate.inference import CaptionHandler, InferStage
from capfilt.pipeline.curate.options import CurateConfig
from capfilt.transforms.rows import Sample
from capfilt.transforms.image import encode_jpeg
from capfilt.transforms.schemas import CURATED_SCHEMA, ERROR_SCHEMA, RAW_SCHEMA
from cli_run import run_cli


def png(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


GOOD = encode_jpeg(Image.new("RGB", (48, 40), (30, 70, 220)))
LONG_CAPTION = " ".join(f"word{i}" for i in range(2000))  # 10k+ characters
assert len(LONG_CAPTION) > 10_000

# key -> (image bytes, caption, status); the expected outcome is in the test below
ROWS = {
    "corrupt": (b"\x00\x17garbage bytes that are no image" * 8, "c", "success"),
    "truncated": (GOOD[: len(GOOD) // 2], "c", "success"),
    "empty_bytes": (b"", "c", "success"),
    "html": (b"<!DOCTYPE html><html><body>404 not found</body></html>", "c", "success"),
    "huge": (png(Image.new("1", (8000, 6000))), "c", "success"),
    "strip": (png(Image.new("RGB", (1000, 20), "white")), "c", "success"),
    "null_caption": (GOOD, None, "success"),
    "empty_caption": (GOOD, "", "success"),
    "long_caption": (GOOD, LONG_CAPTION, "success"),
    "bad_utf8": (GOOD, "PLACEHOLDER", "success"),
    "dup": (GOOD, "first copy", "success"),
    "dup ": (GOOD, "a different key (trailing space)", "success"),
    "failed": (None, None, "failed_to_download"),
}
EXPECTED_ERRORS = {
    "corrupt": ("decode", "not_an_image"),
    "truncated": ("decode", "truncated"),
    "empty_bytes": ("decode", "empty"),
    "html": ("decode", "not_an_image"),
    "huge": ("decode", "too_large"),
    "strip": ("decode", "bad_aspect"),
    "failed": ("download", "failed_to_download"),
}


def bad_shard(path):
    rows = []
    for key, (jpg, caption, status) in ROWS.items():
        rows.append({"key": key, "url": f"http://h.invalid/{key.strip()}", "caption": caption, "status": status,
                     "error_message": "HTTP 404" if status != "success" else None, "jpg": jpg})
    rows.append(dict(rows[list(ROWS).index("dup")], caption="second copy: duplicate key"))
    table = pa.Table.from_pylist(rows, schema=RAW_SCHEMA)
    captions = table.column("caption").combine_chunks().cast(pa.binary()).to_pylist()
    captions[list(ROWS).index("bad_utf8")] = b"caf\xe9 \xff\xfe au lait"
    table = table.set_column(2, "caption", pa.array(captions, pa.binary()).view(pa.string()))
    pq.write_table(table, path)
    return len(rows)


def curate(tmp_path, tiny_models, pattern, *extra):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli([
        "curate", "--input", str(pattern), "--out", str(out), "--captioner", str(tiny_models["captioner"]),
        "--filter", str(tiny_models["itm"]), "--clip", str(tiny_models["clip"]), "--num-captions", "1",
        "--max-length", "8", "--min-length", "2", "--batch-size", "4", "--torch-threads", "1", *extra])
    return code, stdout, stderr, out


def test_every_bad_row_is_an_error_row_or_a_reasoned_drop(tmp_path, tiny_models):
    inp = tmp_path / "in"
    inp.mkdir()
    n_bad = bad_shard(inp / "00000.parquet")
    pq.write_table(RAW_SCHEMA.empty_table(), inp / "00001.parquet")  # an empty shard
    pq.write_table(pa.Table.from_pylist([{"key": "dup", "caption": "dup in a later shard", "status": "success",
                                          "jpg": GOOD}], schema=RAW_SCHEMA), inp / "00002.parquet")
    code, stdout, stderr, out = curate(tmp_path, tiny_models, inp / "*.parquet", "--no-synthetic")
    assert code == 0, stderr

    stats = json.loads((out / "stats.json").read_text())
    assert stats["input_rows"] == n_bad + 1 == stats["kept"] + stats["dropped"] + stats["errors"]
    for name in ("part-00000.parquet", "part-00001.parquet", "part-00002.parquet"):
        assert pq.read_schema(out / "shards" / name).equals(CURATED_SCHEMA, check_metadata=False)
        assert pq.read_schema(out / "errors" / name).equals(ERROR_SCHEMA, check_metadata=False)
    assert pq.read_metadata(out / "shards" / "part-00001.parquet").num_rows == 0

    errors = pa.concat_tables(pq.read_table(p) for p in sorted((out / "errors").glob("*.parquet"))).to_pylist()
    curated = pa.concat_tables(pq.read_table(p) for p in sorted((out / "shards").glob("*.parquet"))).to_pylist()
    by_type = {(e["key"], e["error_type"]): e for e in errors}
    for key, (stage, kind) in EXPECTED_ERRORS.items():
        err = by_type[(key, kind)]
        assert err["stage"] == stage and err["error_message"] and err["url"].endswith(key)
    assert by_type[("failed", "failed_to_download")]["error_message"] == "HTTP 404"
    # every error row points back at its input row, also those without a usable key
    for name in ("00000", "00002"):
        source = pq.read_table(inp / f"{name}.parquet", columns=["url"]).to_pylist()
        for e in pq.read_table(out / "errors" / f"part-{name}.parquet").to_pylist():
            assert source[e["input_row"]]["url"] == e["url"], e
    # duplicates: the first by (shard, row) wins; the later copy in the same shard and the one in
    # the later shard are error rows
    dups = [e for e in errors if e["error_type"] == "duplicate_key"]
    assert [(e["key"], e["stage"]) for e in dups] == [("dup", "read"), ("dup", "read")]
    rows = {r["key"]: r for r in curated}
    assert rows["dup"]["web_caption"] == "first copy" and "dup " in rows
    assert len(errors) == len(EXPECTED_ERRORS) + 2

    # captions: null and empty are dropped with a reason, long ones cut, bad UTF-8 repaired
    assert rows["null_caption"]["drop_reason"] == rows["empty_caption"]["drop_reason"] == \
        "empty_web_caption_and_no_synthetic"
    assert rows["null_caption"]["web_itm"] is None and rows["null_caption"]["captions"] == []
    assert rows["long_caption"]["web_caption"].split() == [f"word{i}" for i in range(30)]
    assert rows["bad_utf8"]["web_caption"] == "caf au lait"
    assert all(r["synthetic_captions"] == [] for r in curated)  # --no-synthetic
    assert set(rows) | {e["key"] for e in errors} == set(ROWS)
    assert "errors" in stdout and "decode/truncated" in stdout


def test_zero_row_input(tmp_path, tiny_models):
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(RAW_SCHEMA.empty_table(), inp / "00000.parquet")
    code, stdout, stderr, out = curate(tmp_path, tiny_models, inp / "*.parquet")
    assert code == 0, stderr
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["input_rows"], stats["kept"], stats["dropped"], stats["errors"]) == (0, 0, 0, 0)
    assert pq.read_metadata(out / "shards" / "part-00000.parquet").num_rows == 0


@pytest.mark.parametrize("columns, message", [
    ({"key": pa.array(["a"]), "caption": pa.array(["c"])}, r"broken\.parquet: missing required column 'jpg'"),
    ({"key": pa.array(["a"]), "caption": pa.array(["c"]), "jpg": pa.array([GOOD]),
      "status": pa.array([1])}, r"broken\.parquet: column 'status' has type int64, expected string"),
])
def test_bad_schema_fails_up_front_naming_file_and_column(tmp_path, tiny_models, columns, message):
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(pa.Table.from_pylist([{"key": "ok", "caption": "c", "status": "success", "jpg": GOOD}],
                                        schema=RAW_SCHEMA), inp / "00000.parquet")
    pq.write_table(pa.table(columns), inp / "broken.parquet")
    code, stdout, stderr, out = curate(tmp_path, tiny_models, inp / "*.parquet")
    assert code == 2
    assert re.search(message, stderr), stderr
    assert not (out / "shards").exists() and not (out / "stats.json").exists()  # no work was done


class _PoisonCaptioner:
    """A captioner double that fails on any batch holding the key 'poison'."""

    def caption(self, images, keys, n, seed, **kwargs):
        if "poison" in keys:
            raise RuntimeError("model exploded on this image")
        return [[f"caption of {k}"] * n for k in keys]


class _PoisonHandler(CaptionHandler):
    def load(self):
        return _PoisonCaptioner()


def test_failed_batch_is_retried_element_by_element(tmp_path):
    cfg = CurateConfig(inputs=("x",), out=str(tmp_path), captioner="fake", filter="fake", clip="fake",
                       num_captions=2, batch_size=4)
    keys = ["a", "b", "poison", "c", "d"]
    samples = [Sample(key=k, url=f"u/{k}", sha256=None, jpg=b"", caption="", shard=0, row=i,
                      image=Image.new("RGB", (8, 8))) for i, k in enumerate(keys)]
    with test_pipeline.TestPipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        ok, errors = p | beam.Create(samples) | InferStage(_PoisonHandler("fake", cfg))
        assert_that(ok | "K" >> beam.Map(lambda s: (s.key, tuple(s.synthetic))),
                    equal_to([(k, (f"caption of {k}",) * 2) for k in keys if k != "poison"]), label="ok")
        assert_that(errors | "E" >> beam.Map(lambda e: (e.key, e.stage, e.error_type, e.error_message, e.row)),
                    equal_to([("poison", "caption", "RuntimeError", "model exploded on this image", 2)]),
                    label="errors")


def test_missing_model_directory_fails_up_front(tmp_path, tiny_models):
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(pa.Table.from_pylist([{"key": "ok", "caption": "c", "status": "success", "jpg": GOOD}],
                                        schema=RAW_SCHEMA), inp / "00000.parquet")
    code, _, stderr = run_cli(["curate", "--input", str(inp / "*.parquet"), "--out", str(tmp_path / "out"),
                               "--captioner", str(tmp_path / "no-such-model"), "--filter", str(tiny_models["itm"]),
                               "--clip", str(tiny_models["clip"])])
    assert code == 2 and f"--captioner {tmp_path / 'no-such-model'}" in stderr and "does not exist" in stderr
    assert not (tmp_path / "out" / "shards").exists()
