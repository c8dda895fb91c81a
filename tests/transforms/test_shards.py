"""The one shard reader (transforms/shards.py): listing, parquet and webdataset tars."""
import json

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from capfilt.transforms import shards
from shard_data import write_tar


def meta(key, **extra):
    return json.dumps({"key": key, "url": f"http://h/{key}", "sha256": "ab" * 32, **extra}).encode()


# --- listing -----------------------------------------------------------------------------------

def test_expand_paths_globs_directories_and_curate_outputs(tmp_path):
    (tmp_path / "raw" / "sub").mkdir(parents=True)
    for name in ("raw/b.parquet", "raw/sub/a.parquet", "raw/notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert shards.expand_paths(str(tmp_path / "raw")) == [str(tmp_path / "raw" / "b.parquet"),
                                                           str(tmp_path / "raw" / "sub" / "a.parquet")]
    assert shards.expand_paths([str(tmp_path / "raw" / "*.parquet")]) == [str(tmp_path / "raw" / "b.parquet")]
    out = tmp_path / "out"
    for name in ("_state/settings.json", "shards/part-0.parquet", "errors/part-0.parquet"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"{}")
    assert shards.expand_paths(str(out)) == [str(out / "shards" / "part-0.parquet")]  # not errors/
    with pytest.raises(ValueError, match="no parquet shards match"):
        shards.expand_paths(str(tmp_path / "nothing-*.parquet"))


def test_tar_sidecar_is_found_beside_its_tar_only(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"")
    (tmp_path / "00000.parquet").write_bytes(b"")
    (tmp_path / "00001.parquet").write_bytes(b"")
    assert shards.tar_sidecar(str(tmp_path / "00000.tar")) == str(tmp_path / "00000.parquet")
    assert shards.tar_sidecar(str(tmp_path / "00001.parquet")) is None
    remote = "gs://b/00000.parquet"
    assert shards.tar_sidecar("gs://b/00000.tar", exists=lambda p: p == remote) == remote
    assert shards.is_tar_sidecar(str(tmp_path / "00000.parquet"))
    assert not shards.is_tar_sidecar(str(tmp_path / "00001.parquet"))


# --- parquet -----------------------------------------------------------------------------------

def test_parquet_schema_counts_rows_and_names_an_unreadable_file(tmp_path):
    pq.write_table(pa.table({"key": ["a", "b", "c"]}), tmp_path / "s.parquet", row_group_size=2)
    schema, rows = shards.parquet_schema(str(tmp_path / "s.parquet"))
    assert (schema.names, rows) == (["key"], 3)
    assert shards.row_count([tmp_path / "s.parquet", tmp_path / "s.parquet"]) == 6
    (tmp_path / "bad.parquet").write_bytes(b"<html>no</html>")
    with pytest.raises(ValueError, match=r"bad\.parquet: not a readable parquet file"):
        shards.parquet_schema(str(tmp_path / "bad.parquet"))
    with pytest.raises(ValueError, match=r"missing\.parquet: not a readable parquet file"):
        shards.parquet_schema(str(tmp_path / "missing.parquet"))


def test_raw_rows_are_bytes_and_absent_columns_are_none(tmp_path):
    caption = pa.array([b"ok", b"caf\xe9 \xff"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"key": ["a", "b"], "caption": caption, "jpg": [b"\x01", None]}), tmp_path / "r.parquet")
    rows = list(shards.raw_rows(str(tmp_path / "r.parquet")))
    assert rows == [
        {"key": b"a", "url": None, "caption": b"ok", "status": None, "error_message": None, "sha256": None,
         "jpg": b"\x01"},
        {"key": b"b", "url": None, "caption": b"caf\xe9 \xff", "status": None, "error_message": None,
         "sha256": None, "jpg": None},
    ]
    assert list(rows[0]) == list(shards.RAW_ROW_COLUMNS)


def test_parquet_batches_select_cast_and_filter(tmp_path):
    pq.write_table(pa.table({"key": ["a", "b", "c"], "n": pa.array([1, 2, 3], pa.int16())}), tmp_path / "p.parquet")
    schema = pa.schema([("key", pa.string()), ("n", pa.int64()), ("extra", pa.string())])
    batches = list(shards.parquet_batches(tmp_path / "p.parquet", schema=schema, filter=ds.field("n") >= 2))
    table = pa.Table.from_batches(batches)
    assert table.schema == schema
    assert table.to_pylist() == [{"key": "b", "n": 2, "extra": None}, {"key": "c", "n": 3, "extra": None}]
    only_keys = pa.Table.from_batches(list(shards.parquet_batches(tmp_path / "p.parquet", ["key"], batch_size=2)))
    assert only_keys.column_names == ["key"] and only_keys.column("key").to_pylist() == ["a", "b", "c"]


def test_read_columns_checks_or_fills_missing_columns(tmp_path):
    pq.write_table(pa.table({"key": ["a"], "keep": [True]}), tmp_path / "0.parquet")
    pq.write_table(pa.table({"key": ["b"], "keep": [False]}), tmp_path / "1.parquet")
    files = [tmp_path / "0.parquet", tmp_path / "1.parquet"]
    assert shards.read_columns(files, ["key"]).column("key").to_pylist() == ["a", "b"]
    assert shards.shards_schema(files).names == ["key", "keep"]
    with pytest.raises(ValueError, match=r"shards 'data/\*' lack column\(s\) \['web_itm'\]"):
        shards.read_columns(files, ["key", "web_itm"], where="data/*")
    schema = pa.schema([("key", pa.string()), ("web_itm", pa.float32())])
    filled = shards.read_columns(files, ["key", "web_itm", "not_in_schema"], schema=schema,
                                 filter=ds.field("key") == "b")
    assert filled.to_pylist() == [{"key": "b", "web_itm": None}]
    assert shards.read_columns([], ["key"], schema=schema).schema == pa.schema([("key", pa.string())])


def test_all_null_reads_the_footers(tmp_path):
    pq.write_table(pa.table({"jpg": pa.array([None, None], pa.binary())}), tmp_path / "none.parquet")
    pq.write_table(pa.table({"jpg": pa.array([None, b"x"], pa.binary())}), tmp_path / "some.parquet")
    assert shards.all_null([str(tmp_path / "none.parquet")], "jpg")
    assert not shards.all_null([str(tmp_path / "none.parquet"), str(tmp_path / "some.parquet")], "jpg")


def test_named_read_errors_names_the_file_and_the_rows_read():
    def rows():
        yield 1
        yield 2
        raise OSError("Corrupt snappy compressed data")

    got = []
    with pytest.raises(ValueError, match=r"^s\.parquet: cannot read the shard after 2 rows \(OSError: Corrupt"):
        for row in shards.named_read_errors("s.parquet", rows()):
            got.append(row)
    assert got == [1, 2]


# --- webdataset tars ---------------------------------------------------------------------------

def test_tar_rows_and_sidecar_failures(tmp_path):
    tar = write_tar(tmp_path / "00000.tar", [
        ("00000.jpg", b"img0"), ("00000.txt", b"a caption"), ("00000.json", meta("00000")),
        ("00002.png", b"img2"), ("00002.json", meta("00002", caption="from the json")),
        ("00002.png", b"again"),  # a suffix seen twice: a second sample with the same key
    ])
    pq.write_table(pa.table({"key": ["00000", "00001", "00003"], "status": ["success", "failed_to_download", None],
                             "error_message": [None, "HTTP 404", None]}), tmp_path / "00000.parquet")
    rows = list(shards.tar_rows(str(tar)))
    assert [(r["key"], r["jpg"], r["caption"]) for r in rows] == [
        (b"00000", b"img0", b"a caption"), (b"00002", b"img2", b"from the json"), (b"00002", b"again", b"")]
    assert rows[0]["url"] == b"http://h/00000" and rows[0]["sha256"] == b"ab" * 32 and rows[0]["status"] == b"success"
    assert rows[2]["url"] is None  # no json: key from the member name, no url
    assert list(rows[0]) == list(shards.RAW_ROW_COLUMNS)
    assert sum(1 for _ in shards.tar_samples(str(tar), with_data=False)) == 3
    failures = list(shards.sidecar_failures(shards.tar_sidecar(str(tar))))
    assert [(f["key"], f["status"], f["error_message"]) for f in failures] == [
        (b"00001", b"failed_to_download", b"HTTP 404")]


def test_tar_samples_group_by_key_in_subdirectories(tmp_path):
    tar = write_tar(tmp_path / "t.tar", [("d/a.jpg", b"1"), ("d/a.txt", b"t"), ("e/a.jpg", b"2"),
                                         ("d/.hidden.jpg", b"x"), ("d/noext", b"x")])
    samples = list(shards.tar_samples(str(tar)))
    assert samples == [{"__key__": "d/a", "jpg": b"1", "txt": b"t"}, {"__key__": "e/a", "jpg": b"2"}]


def test_truncated_and_junk_tars_are_errors_naming_the_file(tmp_path):
    whole = write_tar(tmp_path / "whole.tar", [("a.jpg", b"x" * 3000), ("a.txt", b"y" * 3000), ("b.jpg", b"z")])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[:512 + 3072 + 512 + 1000])  # inside a.txt's data
    for with_data in (True, False):
        with pytest.raises(ValueError, match=r"cut\.tar: not a readable tar file \(unexpected end of data\)"):
            list(shards.tar_samples(str(cut), with_data=with_data))
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ValueError, match=r"junk\.tar: not a readable tar file"):
        list(shards.tar_samples(str(tmp_path / "junk.tar")))



def test_dotted_names_links_and_text_only_samples(tmp_path):
    """Names split as webdataset's reader splits them; a sample that cannot be curated is a row
    that says why (``read_error``), not a refused shard."""
    tar = write_tar(tmp_path / "t.tar", [
        ("photo.v2.jpg", b"img"), ("photo.v2.txt", b"cap"), ("photo.json", meta("photo")),
        ("b.txt", b"caption without image"),
        ("c.jpg", ("symlink", "/etc/passwd")),
        ("d.jpg", ("hardlink", "photo.v2.jpg")), ("d.txt", b"hard"),
    ])
    samples = list(shards.tar_samples(str(tar), with_data=False))
    assert [s["__key__"] for s in samples] == ["photo", "b", "c", "d"]
    assert samples[0] == {"__key__": "photo", "v2.jpg": b"", "v2.txt": b"", "json": b""}
    assert samples[2] == {"__key__": "c", "__unread__": [("c.jpg", "symbolic link")]}
    rows = list(shards.tar_rows(str(tar)))
    assert [(r["key"], r["jpg"], r["caption"], r.get("read_error", (None,))[0]) for r in rows] == [
        (b"photo", b"img", b"cap", None), (b"b", None, b"caption without image", "no_image"),
        (b"c", None, b"", "link_member"), (b"d", None, b"hard", "link_member")]
    assert rows[1]["read_error"][1] == f"sample 'b' of {tar} has no image member (jpg/jpeg/png/webp); has ['txt']"
    assert rows[2]["read_error"][1] == f"sample 'c' of {tar}: member c.jpg is a symbolic link; only regular files are read"
    assert rows[3]["read_error"][1].endswith("member d.jpg is a hard link; only regular files are read")
