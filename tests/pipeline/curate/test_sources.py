"""Raw shard discovery, up-front schema checks, row reading (parquet and webdataset tars),
duplicate-key resolution and the decode step (pipeline/curate/sources.py, decode.py)."""
import dataclasses
import json
from types import SimpleNamespace

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from capfilt.pipeline.curate.decode import ResolveDuplicateKeys, decode_sample, sample_image
from capfilt.pipeline.curate.errors import StageError, dead_letter_to_error
from capfilt.pipeline.curate.sources import discover_shards, shard_ids, validate_shard
from capfilt.transforms.rows import ErrorRow, Sample
from capfilt.transforms.image import decode_image, encode_jpeg
from capfilt.transforms.schemas import RAW_SCHEMA
from capfilt.transforms.seeding import sample_seed
from shard_data import read_shard, write_tar


def jpeg(colour=(200, 30, 30), size=(32, 24)) -> bytes:
    return encode_jpeg(Image.new("RGB", size, colour))


def raw_row(key, caption="a red square", jpg=None, status="success", **extra):
    row = {name: None for name in RAW_SCHEMA.names}
    row.update(key=key, url=f"http://example.invalid/{key}.jpg", caption=caption, status=status,
               jpg=jpeg() if jpg is None and status == "success" else jpg)
    row.update(extra)
    return row


def write_raw(path, rows, schema=RAW_SCHEMA):
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


# --- discovery and up-front checks -------------------------------------------------------------

def test_discover_sorts_assigns_ordinals_and_skips_stats_json(tmp_path):
    for name in ("00001.parquet", "00000.parquet"):
        write_raw(tmp_path / name, [raw_row("k" + name[:5])])
    (tmp_path / "00000_stats.json").write_text("{}")
    shards = discover_shards([str(tmp_path / "*")])
    assert [s.shard_id for s in shards] == ["00000", "00001"]
    assert [s.ordinal for s in shards] == [0, 1]
    assert all(s.fmt == "parquet" and s.size > 0 for s in shards)


def test_discover_errors_name_the_glob_or_file(tmp_path):
    with pytest.raises(ValueError, match="matches no file"):
        discover_shards([str(tmp_path / "nothing-*.parquet")])
    (tmp_path / "notes.csv").write_text("url,caption\n")
    with pytest.raises(ValueError, match="notes.csv: not a raw shard"):
        discover_shards([str(tmp_path / "*")])


def test_discover_repeated_stems_get_ids_from_the_path_below_the_common_root(tmp_path):
    """img2dataset numbers every download from 00000: raw/a/00000 and raw/b/00000 must both
    be curated (docs/scheduling.md's `raw/**/*.parquet`), into distinct output shards."""
    for sub, name in (("a", "00000"), ("a", "00001"), ("b", "00000"), ("b/c d", "00000")):
        (tmp_path / "raw" / sub).mkdir(parents=True, exist_ok=True)
        write_raw(tmp_path / "raw" / sub / f"{name}.parquet", [raw_row(sub + name)])
        (tmp_path / "raw" / sub / f"{name}_stats.json").write_text("{}")
    shards = discover_shards([str(tmp_path / "raw" / "**" / "*")])
    assert [s.shard_id for s in shards] == ["a_00000", "a_00001", "b_00000", "b_c_d_00000"]
    assert [s.ordinal for s in shards] == [0, 1, 2, 3]
    # unique stems keep the ids they always had, so existing outputs stay valid
    assert [s.shard_id for s in discover_shards([str(tmp_path / "raw" / "a" / "*.parquet")])] == ["00000", "00001"]


def test_shard_ids_are_sanitised_and_a_remaining_clash_is_an_error():
    ids = shard_ids(["gs://b/raw/../x/00000.parquet", "gs://b/raw/.hidden/00000.parquet", "gs://b/raw/y/00000.tar",
                     "gs://b/raw/y/00000.parquet", "gs://b/raw/y/00000_stats.json"])
    # the tar's sidecar parquet and the stats json are not shards; no id holds a '/' or starts with '.'
    assert ids == {"gs://b/raw/../x/00000.parquet": "_x_00000", "gs://b/raw/.hidden/00000.parquet": "hidden_00000",
                   "gs://b/raw/y/00000.tar": "y_00000"}
    clash = r"r/a/b_0\.parquet and r/a_b/0\.parquet would both write output shard 'a_b_0'"
    with pytest.raises(ValueError, match=clash):
        shard_ids(["r/a_b/0.parquet", "r/a/b_0.parquet", "r/c/0.parquet"])


def test_validate_counts_rows_and_names_file_and_column(tmp_path):
    good = write_raw(tmp_path / "good.parquet", [raw_row("a"), raw_row("b")])
    assert validate_shard(discover_shards([str(good)])[0]).num_rows == 2

    missing = tmp_path / "missing.parquet"
    pq.write_table(pa.table({"key": ["a"], "caption": ["c"]}), missing)
    with pytest.raises(ValueError, match=r"missing\.parquet.*'jpg'"):
        validate_shard(discover_shards([str(missing)])[0])

    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"key": ["a"], "caption": [3], "jpg": [b"x"]}), wrong)
    with pytest.raises(ValueError, match=r"wrong\.parquet.*'caption'.*int64"):
        validate_shard(discover_shards([str(wrong)])[0])

    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"<html>not parquet</html>")
    with pytest.raises(ValueError, match=r"garbage\.parquet: not a readable parquet file"):
        validate_shard(discover_shards([str(garbage)])[0])


# --- reading rows --------------------------------------------------------------------------------

def test_parquet_rows_failures_keys_and_invalid_utf8(tmp_path):
    bad_caption = pa.array([b"ok caption", b"caf\xe9 \xff au lait", None, None, b"x"], pa.binary()).view(pa.string())
    rows = [
        raw_row("k0"),
        raw_row("k1"),
        raw_row("k2", status="failed_to_download", error_message="HTTP 404"),
        raw_row(None),
        raw_row(""),
    ]
    table = pa.Table.from_pylist(rows, schema=RAW_SCHEMA).set_column(2, "caption", bad_caption)
    pq.write_table(table, tmp_path / "s.parquet")
    info = validate_shard(discover_shards([str(tmp_path / "s.parquet")])[0])
    samples, errors = read_shard(info)
    assert [(s.key, s.row) for s in samples] == [("k0", 0), ("k1", 1)]
    assert samples[1].caption == b"caf\xe9 \xff au lait"  # bytes reach the caption cleaner
    assert [(e.row, e.stage, e.error_type) for e in errors] == [
        (2, "download", "failed_to_download"), (3, "read", "missing_key"), (4, "read", "missing_key")]
    assert errors[0].error_message == "HTTP 404" and errors[0].key == "k2"
    assert len(samples) + len(errors) == info.num_rows == 5


def test_webdataset_tar_with_sidecar_failures(tmp_path):
    meta = lambda k: json.dumps({"key": k, "url": f"http://h/{k}", "sha256": "ab" * 32}).encode()
    write_tar(tmp_path / "00000.tar", [
        ("000000000.jpg", jpeg()), ("000000000.txt", b"a red square"), ("000000000.json", meta("000000000")),
        ("000000002.jpg", jpeg()), ("000000002.txt", b"bad \xff utf8"),
        ("000000002.jpg", jpeg()),  # a repeated key inside the tar: a second sample, not a lost shard
    ])
    write_raw(tmp_path / "00000.parquet", [  # every row, as img2dataset writes it beside its tar
        {"key": "000000000", "status": "success"}, {"key": "000000001", "status": "failed_to_download",
                                                   "error_message": "connection refused"},
        {"key": "000000002", "status": "success"}, {"key": "000000002", "status": "success"},
    ], schema=pa.schema([("key", pa.string()), ("status", pa.string()), ("error_message", pa.string())]))
    shards = discover_shards([str(tmp_path / "*")])  # the sidecar parquet is not a shard of its own
    assert [(s.shard_id, s.fmt, s.sidecar is not None) for s in shards] == [("00000", "tar", True)]
    info = validate_shard(shards[0])
    assert info.num_rows == 4
    samples, errors = read_shard(info)
    assert [(s.key, s.row) for s in samples] == [("000000000", 0), ("000000002", 1), ("000000002", 2)]
    assert samples[0].caption == b"a red square" and samples[0].url == "http://h/000000000"
    assert samples[1].caption == b"bad \xff utf8"
    assert [(e.key, e.row, e.stage, e.error_type) for e in errors] == [
        ("000000001", 3, "download", "failed_to_download")]


def test_tar_samples_that_cannot_be_curated_are_error_rows(tmp_path):
    """A text-only sample, link members and a dotted name (read as webdataset reads it): one
    error row per bad sample, the rest of the shard curated."""
    write_tar(tmp_path / "t.tar", [
        ("a.jpg", jpeg()), ("b.txt", b"caption without image"), ("c.jpg", ("symlink", "a.jpg")),
        ("d.jpg", ("hardlink", "a.jpg")), ("d.txt", b"d"), ("photo.v2.jpg", jpeg()), ("photo.v2.txt", b"two"),
    ])
    info = validate_shard(discover_shards([str(tmp_path / "t.tar")])[0])
    assert info.num_rows == 5
    samples, errors = read_shard(info)
    assert [(s.key, s.row, s.caption) for s in samples] == [("a", 0, b""), ("photo", 4, b"two")]
    assert [(e.key, e.row, e.stage, e.error_type) for e in errors] == [
        ("b", 1, "read", "no_image"), ("c", 2, "read", "link_member"), ("d", 3, "read", "link_member")]


# --- duplicate keys (TestPipeline) and decode ---------------------------------------------------

def _sample(key, shard, row):
    return Sample(key=key, url=None, sha256=None, jpg=b"", caption="c", shard=shard, row=row)


def test_duplicate_keys_first_by_shard_then_row_wins(tmp_path):
    prior = write_raw(tmp_path / "prior.parquet", [raw_row("old")])
    samples = [_sample("a", 1, 0), _sample("a", 0, 5), _sample("b", 0, 1), _sample("a", 0, 7),
               _sample("old", 0, 2), _sample("c", 1, 1)]
    options = PipelineOptions(["--runner=FnApiRunner"])
    with test_pipeline.TestPipeline(options=options) as p:
        good, dups = p | beam.Create(samples) | ResolveDuplicateKeys(prior_curated=[str(prior)])
        assert_that(good | "K" >> beam.Map(lambda s: (s.key, s.shard, s.row)),
                    equal_to([("a", 0, 5), ("b", 0, 1), ("c", 1, 1)]), label="winners")
        assert_that(dups | "E" >> beam.Map(lambda e: (e.key, e.shard, e.row, e.stage, e.error_type)),
                    equal_to([("a", 1, 0, "read", "duplicate_key"), ("a", 0, 7, "read", "duplicate_key"),
                              ("old", 0, 2, "read", "duplicate_key")]), label="losers")


def test_decode_sample_sets_size_caption_and_seed_and_carries_no_image():
    """The decoded image is not carried to the model stages (a runner may hold each row several
    times between stages); each stage decodes the bytes again, to the same pixels."""
    s = _sample("k", 0, 0)
    s.jpg, s.caption = jpeg(size=(40, 30)), b"A  RED &amp; <b>Square</b>!!"
    out = decode_sample(s, run_seed=7, max_pixels=10_000, min_side=8, max_aspect=20.0, max_words=30)
    assert (out.width, out.height, out.image) == (40, 30, None)
    cfg = SimpleNamespace(max_pixels=10_000, min_side=8, max_aspect=20.0)
    image = sample_image(out, cfg)
    assert image.mode == "RGB" and image.size == (40, 30)
    assert image.tobytes() == decode_image(s.jpg).tobytes()
    assert sample_image(dataclasses.replace(out, image=image), cfg) is image  # a caller's own image
    assert out.web_caption == "a red & square"
    assert out.seed == sample_seed(7, "k", 0)
    with pytest.raises(StageError) as info:
        decode_sample(s, run_seed=7, max_pixels=100, min_side=8, max_aspect=20.0, max_words=30)
    err = dead_letter_to_error((s, (StageError, repr(info.value), [])), "decode")
    assert err == ErrorRow("k", None, "decode", "too_large", info.value.message, 0, 0)
    other = dead_letter_to_error((s, (KeyError, "KeyError('x')", [])), "decode")
    assert (other.stage, other.error_type, other.error_message) == ("decode", "KeyError", "KeyError('x')")


def test_decode_reduces_a_huge_jpeg_but_records_its_stored_size():
    """A JPEG of 631 bytes declaring 6000x6000 took 108 MB per row; the models need far less."""
    import struct

    from capfilt.transforms.image import DRAFT_SIDE

    data = bytearray(jpeg(size=(16, 16)))
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 6000, 6000)
    s = _sample("k", 0, 0)
    s.jpg = bytes(data)
    out = decode_sample(s, run_seed=7, max_pixels=40_000_000, min_side=8, max_aspect=20.0, max_words=30)
    image = sample_image(out, SimpleNamespace(max_pixels=40_000_000, min_side=8, max_aspect=20.0))
    assert DRAFT_SIDE == 1024 and image.size == (1500, 1500)
    assert (out.width, out.height) == (6000, 6000)


def test_a_tar_cut_at_a_member_boundary_is_refused_up_front(tmp_path):
    """tarfile takes a cut at a member boundary for the end: the shard would lose its last samples."""
    whole = write_tar(tmp_path / "whole.tar", [("a.jpg", jpeg()), ("a.txt", b"one"), ("b.jpg", jpeg()),
                                               ("b.txt", b"two")])
    boundary = 512 + -(-len(jpeg()) // 512) * 512 + 512 + 512  # a.jpg and a.txt, header + padded data
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "00000.tar").write_bytes(whole.read_bytes()[:boundary])
    with pytest.raises(ValueError, match=r"00000\.tar: the tar ends without its end-of-archive blocks"):
        validate_shard(discover_shards([str(tmp_path / "cut" / "*.tar")])[0])
    assert validate_shard(discover_shards([str(whole)])[0]).num_rows == 2


@pytest.mark.parametrize("meta, problem", [
    ([1, 2], "its json is list, not an object"),
    (None, "its json is NoneType, not an object"),
    ({"key": 7, "url": "http://h/b"}, "its json key is int 7, not a string"),
    ({"key": "b", "url": ["http://h/b"]}, "its json url is list ['http://h/b'], not a string"),
    ({"key": "b", "sha256": {"x": 1}}, "its json sha256 is dict {'x': 1}, not a string"),
])
def test_a_tar_sample_with_unusable_json_is_one_error_row(tmp_path, meta, problem):
    members = [("a.jpg", jpeg()), ("a.json", json.dumps({"key": "a", "url": "http://h/a"}).encode()),
               ("b.jpg", jpeg()), ("b.json", json.dumps(meta).encode()),
               ("c.jpg", jpeg()), ("c.json", json.dumps({"key": "c", "url": "http://h/c"}).encode())]
    write_tar(tmp_path / "00000.tar", members)
    info = validate_shard(discover_shards([str(tmp_path / "00000.tar")])[0])
    assert info.num_rows == 3
    samples, errors = read_shard(info)
    assert [(s.key, s.row) for s in samples] == [("a", 0), ("c", 2)]
    assert [(e.key, e.row, e.stage, e.error_type) for e in errors] == [("b", 1, "read", "invalid_metadata")]
    assert errors[0].error_message.endswith(problem) and "'b'" in errors[0].error_message


@pytest.mark.parametrize("kind, message", [
    ("dangling", r"matches .*b\.parquet, a symlink to nothing"),
    ("fifo", r"matches .*b\.parquet, which is not a regular file \(a FIFO"),
])
def test_inputs_that_beam_would_skip_or_block_on_are_named_up_front(tmp_path, kind, message):
    import os

    write_raw(tmp_path / "a.parquet", [raw_row("k1", jpg=jpeg())])
    if kind == "dangling":
        os.symlink(tmp_path / "gone.parquet", tmp_path / "b.parquet")
    else:
        os.mkfifo(tmp_path / "b.parquet")
    with pytest.raises(ValueError, match=message):
        discover_shards([str(tmp_path / "*.parquet")])
    with pytest.raises(ValueError, match=message):  # a recursive glob meets it too
        discover_shards([str(tmp_path / "**" / "*.parquet")])


def test_ids_that_name_one_output_file_are_told_apart_or_refused(tmp_path):
    """00000 and part-00000 both write part-00000.parquet: each run overwrote the other's rows."""
    clash = r"input shards r/00000\.parquet and r/part-00000\.parquet would both write output shard " \
            r"'part-00000' \(part-00000\.parquet\)"
    with pytest.raises(ValueError, match=clash):
        shard_ids(["r/00000.parquet", "r/part-00000.parquet"])
    ids = shard_ids(["r/a/00000.parquet", "r/b/part-00000.parquet"])  # told apart by their folders
    assert ids == {"r/a/00000.parquet": "a_00000", "r/b/part-00000.parquet": "b_part-00000"}


def test_an_empty_status_is_an_error_row_with_a_named_type(tmp_path):
    path = write_raw(tmp_path / "00000.parquet", [raw_row("a", jpg=jpeg()), raw_row("b", jpg=jpeg(), status=""),
                                                  raw_row("c", jpg=jpeg(), status="failed_to_download")])
    samples, errors = read_shard(validate_shard(discover_shards([str(path)])[0]))
    assert [s.key for s in samples] == ["a"]
    assert [(e.key, e.stage, e.error_type) for e in errors] == [
        ("b", "download", "invalid_status"), ("c", "download", "failed_to_download")]
    assert errors[0].error_message == "status is empty (img2dataset writes success or a failure)"


def test_castable_arrow_layouts_are_read_and_unread_columns_are_not_checked(tmp_path):
    """A pandas category caption, view layouts, large strings; `width` stored as text and `exif`
    as numbers are columns curate never reads."""
    import pandas as pd

    jpgs = [jpeg(), jpeg((0, 200, 0))]
    table = pa.table({
        "key": pa.array(["a", "b"]).cast(pa.string_view()),
        "caption": pa.array(pd.Categorical(["a red square", "a green square"])),
        "status": pa.array(["success", "success"]).dictionary_encode(),
        "url": pa.array(["http://h/a", None], pa.large_string()),
        "jpg": pa.array(jpgs).cast(pa.binary_view()),
        "width": pa.array(["wide", None]),
        "exif": pa.array([1, 2]),
    })
    path = tmp_path / "00000.parquet"
    pq.write_table(table, path)
    assert pq.read_schema(path).field("caption").type == pa.dictionary(pa.int8(), pa.string())
    samples, errors = read_shard(validate_shard(discover_shards([str(path)])[0]))
    assert errors == []
    assert [(s.key, s.caption, s.url, s.jpg) for s in samples] == [
        ("a", b"a red square", "http://h/a", jpgs[0]), ("b", b"a green square", None, jpgs[1])]
    wrong = tmp_path / "wrong.parquet"  # a column curate reads, of a type that is no text
    pq.write_table(table.set_column(table.schema.get_field_index("url"), "url", pa.array([1, 2])), wrong)
    with pytest.raises(ValueError, match=r"wrong\.parquet: column 'url' has type int64, expected string"):
        validate_shard(discover_shards([str(wrong)])[0])


def test_a_shard_with_two_status_columns_is_refused(tmp_path):
    """pyarrow finds no field by a repeated name: the failed download read as a success."""
    table = pa.table([pa.array(["a"]), pa.array(["c"]), pa.array(["success"]), pa.array(["failed_to_download"]),
                      pa.array([jpeg()])], names=["key", "caption", "status", "status", "jpg"])
    path = tmp_path / "00000.parquet"
    pq.write_table(table, path)
    with pytest.raises(ValueError, match=r"00000\.parquet: column 'status' appears 2 times; which one to read is "
                                         r"ambiguous"):
        validate_shard(discover_shards([str(path)])[0])


@pytest.mark.parametrize("beside", ["sidecar", "stats"])
def test_a_tar_with_fewer_samples_than_img2dataset_recorded_is_refused(tmp_path, beside):
    """A tar cut short and closed again (end-of-archive blocks present) reads as a whole tar:
    only the count img2dataset recorded beside it shows the lost samples."""
    members = [(f"00000000{i}.{ext}", jpeg() if ext == "jpg" else b"c") for i in range(3) for ext in ("jpg", "txt")]
    write_tar(tmp_path / "00000.tar", members[:4])  # samples 0 and 1 of 3
    status = pa.schema([("key", pa.string()), ("status", pa.string())])
    if beside == "sidecar":
        write_raw(tmp_path / "00000.parquet", [{"key": f"00000000{i}", "status": "success"} for i in range(3)]
                  + [{"key": "000000003", "status": "failed_to_download"}], schema=status)
        source = r"its sidecar .*00000\.parquet lists 3 successful downloads"
    else:  # a sidecar of failed downloads only records no count; the stats file does
        write_raw(tmp_path / "00000.parquet", [{"key": "000000003", "status": "failed_to_download"}], schema=status)
        (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 4, "successes": 3, "failed_to_download": 1}))
        source = r".*00000_stats\.json counts 3 successes"
    info = discover_shards([str(tmp_path / "*")])[0]
    with pytest.raises(ValueError, match=rf"00000\.tar: the tar holds 2 samples but {source}; it is cut short"):
        validate_shard(info)
    write_tar(tmp_path / "00000.tar", members)  # the whole tar
    assert validate_shard(info).num_rows == 4
