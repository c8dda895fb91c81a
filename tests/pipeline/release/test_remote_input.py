"""`capfilt release` from a curate output on object storage (a local S3 server, moto): the
manifest-named shards are copied and checked like local ones, a stray object no manifest names
is never read, and the release names the remote objects in its records."""
import json

import pyarrow.parquet as pq
import pytest

from capfilt.pipeline.release.build import ReleaseConfig, build_release
from release_data import image_bytes, near_copy, pixel_embedder, row, write_curated
from s3_server import upload_dir


@pytest.fixture
def curated(tmp_path):
    imgs = {i: image_bytes(i) for i in range(8)}
    a = [row(f"k{i}", imgs[i], clip=0.3 + 0.01 * i) for i in range(5)] + [row("n2", near_copy(2), clip=0.9)]
    b = [row("k9", None), row("k4", imgs[6], clip=0.1), row("k7", imgs[7])]
    return write_curated(tmp_path / "cur_a", [a]), write_curated(tmp_path / "cur_b", [b])


def build(inputs, out):
    return build_release(ReleaseConfig(inputs=inputs, out=out, dedup_threshold=0.9, rows_per_shard=3,
                                       report=False), embedder=pixel_embedder)


def test_release_reads_a_curate_output_on_s3_like_a_local_one(curated, s3_root, tmp_path):
    cur_a, cur_b = curated
    url = f"{s3_root}/cur_a"
    upload_dir(cur_a, url)
    local = build([cur_a, cur_b], tmp_path / "rel_local")
    remote = build([url, cur_b], tmp_path / "rel_remote")
    assert remote["counts"] == local["counts"]
    kept = [pq.read_table(p).column("key").to_pylist() for p in sorted((tmp_path / "rel_remote" / "shards").glob("*.parquet"))]
    kept_local = [pq.read_table(p).column("key").to_pylist()
                  for p in sorted((tmp_path / "rel_local" / "shards").glob("*.parquet"))]
    assert kept == kept_local and sum(map(len, kept)) > 0
    removed = pq.read_table(tmp_path / "rel_remote" / "removed.parquet").to_pylist()
    removed_local = pq.read_table(tmp_path / "rel_local" / "removed.parquet").to_pylist()
    assert [r["key"] for r in removed] == [r["key"] for r in removed_local]
    sources = {r["source"] for r in removed}
    assert f"{url}/shards/part-00000.parquet" in sources, sources  # named by its URL, not the local copy
    manifest = json.loads((tmp_path / "rel_remote" / "manifest.json").read_text())
    assert url in json.dumps(manifest) and "capfilt-release-inputs-" not in json.dumps(manifest)


def test_a_remote_shard_not_in_the_manifest_is_ignored_and_a_missing_one_refused(curated, s3_root, tmp_path):
    from apache_beam.io.filesystems import FileSystems

    cur_a, cur_b = curated
    url = f"{s3_root}/cur_a"
    upload_dir(cur_a, url)
    with FileSystems.create(f"{url}/shards/part-00099.parquet") as f:  # a killed run's, named by no marker
        f.write(b"not even parquet")
    local = build([cur_a, cur_b], tmp_path / "rel_local")
    assert build([url, cur_b], tmp_path / "rel_remote")["counts"] == local["counts"]
    FileSystems.delete([f"{url}/shards/part-00000.parquet"])
    with pytest.raises(ValueError, match=f"release input {url}: shard shards/part-00000.parquet is recorded in its "
                                         f"manifest.json but missing"):
        build([url, cur_b], tmp_path / "rel_2")
    with pytest.raises(ValueError, match="has no manifest.json"):
        build([f"{s3_root}/nothing", cur_b], tmp_path / "rel_3")
    assert not (tmp_path / "rel_2").exists() and not (tmp_path / "rel_3").exists()
