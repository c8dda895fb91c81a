"""s3:// paths through Beam's FileSystems, on the local moto S3 (tests/s3_server.py): the file
operations curate relies on, capfilt's Beam adapter (atomic JSON writes, hashes), the
folder copy helpers, and a Beam pipeline that reaches the server through its options."""
import hashlib
import json

import apache_beam as beam
import pytest
from apache_beam.io.filesystems import CompressionTypes, FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to
from s3_server import download_dir, upload_dir

from capfilt.pipeline import files
from capfilt.pipeline.files import BEAM
from capfilt.transforms.files import atomic, hashing

RAW = CompressionTypes.UNCOMPRESSED


def _keys(s3_server, prefix: str) -> list[str]:
    """Object keys under ``prefix`` as the server lists them (around Beam)."""
    listing = s3_server.boto3_client().list_objects_v2(Bucket=s3_server.bucket, Prefix=prefix)
    return sorted(obj["Key"] for obj in listing.get("Contents", []))


def _key(s3_server, url: str) -> str:
    return url[len(s3_server.url()):]


def _write(url: str, data: bytes) -> None:
    with FileSystems.create(url, compression_type=RAW) as f:
        f.write(data)


def _read(url: str) -> bytes:
    with FileSystems.open(url, compression_type=RAW) as f:
        return f.read()


def test_the_server_has_the_bucket_and_beam_args_name_it(s3_server):
    assert s3_server.endpoint_url.startswith("http://127.0.0.1:")
    buckets = [b["Name"] for b in s3_server.boto3_client().list_buckets()["Buckets"]]
    assert buckets == [s3_server.bucket]
    opts = PipelineOptions(s3_server.args).get_all_options()
    assert opts["s3_endpoint_url"] == s3_server.endpoint_url
    assert opts["s3_region_name"] == "us-east-1"
    assert opts["s3_access_key_id"] == opts["s3_secret_access_key"] == "testing"


def test_create_open_exists_match(s3_server, s3_root):
    a, b = f"{s3_root}/dir/a.bin", f"{s3_root}/dir/b.txt"
    assert not FileSystems.exists(a)
    _write(a, b"\x00\x01payload")
    _write(b, b"text")
    assert FileSystems.exists(a) and FileSystems.exists(b)
    assert _read(a) == b"\x00\x01payload"
    (result,) = FileSystems.match([f"{s3_root}/dir/*"])
    assert sorted((m.path, m.size_in_bytes) for m in result.metadata_list) == [(a, 9), (b, 4)]
    (only_txt,) = FileSystems.match([f"{s3_root}/dir/*.txt"])
    assert [m.path for m in only_txt.metadata_list] == [b]
    assert _keys(s3_server, _key(s3_server, s3_root)) == [_key(s3_server, a), _key(s3_server, b)]


def test_rename_and_delete(s3_server, s3_root):
    src, dst = f"{s3_root}/old.json", f"{s3_root}/new/place.json"
    _write(src, b'{"n": 1}')
    FileSystems.rename([src], [dst])
    assert not FileSystems.exists(src)
    assert _read(dst) == b'{"n": 1}'
    FileSystems.delete([dst])
    assert not FileSystems.exists(dst)
    assert _keys(s3_server, _key(s3_server, s3_root)) == []


def test_opening_a_missing_object_is_file_not_found(s3_root):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        BEAM.open(f"{s3_root}/missing.json")


def test_atomic_json_through_the_beam_adapter(s3_server, s3_root):
    url = f"{s3_root}/state/marker.json"
    assert atomic.read_json(url, BEAM, default={"none": True}) == {"none": True}
    assert atomic.write_json(url, {"stage": "done", "rows": 48}, BEAM, sort_keys=True) is True
    assert atomic.read_json(url, BEAM) == {"stage": "done", "rows": 48}
    assert _read(url) == b'{"rows": 48, "stage": "done"}'
    assert atomic.write_json(url, {"stage": "done", "rows": 48}, BEAM, sort_keys=True,
                             only_if_changed=True) is False
    assert atomic.write_json(url, {"stage": "done", "rows": 49}, BEAM, sort_keys=True,
                             only_if_changed=True) is True
    assert atomic.read_json(url, BEAM)["rows"] == 49
    # the temporary object was renamed away: only the target is left
    assert _keys(s3_server, _key(s3_server, f"{s3_root}/state/")) == [_key(s3_server, url)]


def test_read_json_of_a_broken_object_gives_the_default(s3_root):
    url = f"{s3_root}/broken.json"
    _write(url, b"{not json")
    assert atomic.read_json(url, BEAM, default=None) is None
    with pytest.raises(json.JSONDecodeError):
        atomic.read_json(url, BEAM)


def test_file_sha256_on_s3_reads_every_block(s3_root):
    data = bytes(range(256)) * (10 * 1024 + 7)  # 2.5 MiB + 1.75 KiB: three 1 MiB blocks
    url = f"{s3_root}/big.bin"
    _write(url, data)
    expected = hashlib.sha256(data).hexdigest()
    assert hashing.file_sha256(url, BEAM) == expected
    assert files.file_sha256(url) == expected


def test_upload_and_download_a_folder(s3_root, tmp_path):
    src = tmp_path / "src"
    (src / "shards" / "nested").mkdir(parents=True)
    (src / "manifest.json").write_text('{"shards": 2}')
    (src / "shards" / "00000.parquet").write_bytes(b"PAR1" + bytes(5000) + b"PAR1")
    (src / "shards" / "nested" / "x.txt").write_text("x")
    prefix = f"{s3_root}/tree"
    assert upload_dir(src, prefix) == [f"{prefix}/manifest.json", f"{prefix}/shards/00000.parquet",
                                       f"{prefix}/shards/nested/x.txt"]
    back = tmp_path / "back"
    got = download_dir(prefix, back)
    assert [p.relative_to(back).as_posix() for p in got] == ["manifest.json", "shards/00000.parquet",
                                                             "shards/nested/x.txt"]
    for path in got:
        assert path.read_bytes() == (src / path.relative_to(back)).read_bytes()


def test_a_beam_pipeline_reaches_the_server_through_its_options(s3_server, s3_root):
    out = f"{s3_root}/pipeline/lines"
    with beam.Pipeline(options=PipelineOptions(["--runner=DirectRunner", *s3_server.args])) as p:
        _ = p | beam.Create(["b", "a", "c"]) | beam.io.WriteToText(out, shard_name_template="", file_name_suffix=".txt")
    assert sorted(_read(out + ".txt").decode().split()) == ["a", "b", "c"]
    with beam.Pipeline(options=PipelineOptions(["--runner=DirectRunner", *s3_server.args])) as p:
        assert_that(p | beam.io.ReadFromText(out + ".txt"), equal_to(["a", "b", "c"]))
