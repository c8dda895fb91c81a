"""model/data.py: kept rows only, caption sampling, seeded order, exact resume, raw shards,
mixtures, rank sharding and undecodable images."""
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt.model.training.data import ImageTextStream, SourceSpec
from capfilt.transforms.image import encode_jpeg
from capfilt.transforms.schemas import CURATED_SCHEMA, RAW_SCHEMA
from capfilt.transforms.text import clean_caption


def _jpg(i: int) -> bytes:
    return encode_jpeg(Image.new("RGB", (16, 16), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)))


def _curated(path, keys, keep=None, captions=None, bad=()):
    n = len(keys)
    rows = {name: [None] * n for name in CURATED_SCHEMA.names}
    rows["key"] = list(keys)
    rows["jpg"] = [b"not a jpeg" if k in bad else _jpg(i) for i, k in enumerate(keys)]
    rows["keep"] = list(keep if keep is not None else [True] * n)
    rows["captions"] = captions or [[f"caption {k} a", f"caption {k} b", f"caption {k} c"] for k in keys]
    rows["round"] = [1] * n
    pq.write_table(pa.Table.from_pydict(rows, schema=CURATED_SCHEMA), path)


def _raw(path, keys, captions, status):
    n = len(keys)
    rows = {name: [None] * n for name in RAW_SCHEMA.names}
    rows.update(key=list(keys), caption=list(captions), status=list(status),
                jpg=[_jpg(i) if s == "success" else None for i, s in enumerate(status)])
    pq.write_table(pa.Table.from_pydict(rows, schema=RAW_SCHEMA), path)


@pytest.fixture
def curated(tmp_path):
    d = tmp_path / "cur"
    d.mkdir()
    _curated(d / "part-00000.parquet", [f"a{i}" for i in range(10)],
             keep=[i % 3 != 0 for i in range(10)], bad={"a4"})
    _curated(d / "part-00001.parquet", [f"b{i}" for i in range(6)])
    return d


def _keys(stream, n):
    return [s.key for s in stream.next_batch(n)]


def test_only_kept_rows_and_undecodable_skipped(curated):
    stream = ImageTextStream([SourceSpec(str(curated / "*.parquet"))], seed=0, shuffle_buffer=4)
    keys = _keys(stream, 11)  # one epoch: 6 kept in shard a (one undecodable) + 6 in shard b
    kept = {f"a{i}" for i in range(10) if i % 3 != 0} - {"a4"} | {f"b{i}" for i in range(6)}
    assert set(keys) == kept and len(keys) == len(kept)
    assert stream.stats.skipped == Counter({"not_an_image": 1})
    assert stream.stats.used == 11 and stream.stats.emitted == 12


def test_caption_sampled_per_epoch_deterministically(curated):
    def captions_of(seed):
        stream = ImageTextStream([SourceSpec(str(curated / "*.parquet"))], seed=seed, shuffle_buffer=4)
        seen = {}
        for s in stream.next_batch(11 * 6):  # six epochs
            seen.setdefault(s.key, []).append(s.text)
            assert s.text in {f"caption {s.key} {c}" for c in "abc"}
        return seen

    a, b = captions_of(0), captions_of(0)
    assert a == b
    assert any(len(set(texts)) > 1 for texts in a.values())  # a new draw each epoch


def test_order_depends_on_seed_only(curated):
    src = [SourceSpec(str(curated / "*.parquet"))]
    one = _keys(ImageTextStream(src, seed=1, shuffle_buffer=4), 20)
    assert one == _keys(ImageTextStream(src, seed=1, shuffle_buffer=4), 20)
    assert one != _keys(ImageTextStream(src, seed=2, shuffle_buffer=4), 20)
    assert one[:11] != _keys(ImageTextStream(src, seed=1, shuffle_buffer=4), 22)[11:22]  # epochs reshuffle


def test_exact_resume(curated):
    src = [SourceSpec(str(curated / "*.parquet"))]
    straight = ImageTextStream(src, seed=3, shuffle_buffer=5)
    first = straight.next_batch(13)  # into the second epoch
    state = straight.state_dict()
    rest = [(s.key, s.text) for s in straight.next_batch(15)]
    resumed = ImageTextStream(src, seed=3, shuffle_buffer=5)
    resumed.load_state_dict(state)
    assert [(s.key, s.text) for s in resumed.next_batch(15)] == rest
    assert resumed.stats.used == 28 and len(first) == 13


def test_raw_shards_use_cleaned_web_caption_and_success_rows(tmp_path):
    path = tmp_path / "00000.parquet"
    captions = ["A Red  Circle &amp; a STAR!", "fails", "<br>", "Blue square."]
    _raw(path, ["k0", "k1", "k2", "k3"], captions, ["success", "failed_to_download", "success", "success"])
    stream = ImageTextStream([SourceSpec(str(path))], seed=0)
    got = {s.key: s.text for s in stream.next_batch(4)}
    # k1 failed to download; k2's caption cleans to nothing
    assert got == {"k0": clean_caption(captions[0]), "k3": clean_caption(captions[3])}
    assert stream.describe()["sources"][0]["kind"] == "raw"


def test_mixture_weights(tmp_path):
    for name in ("web", "human"):
        (tmp_path / name).mkdir()
        _curated(tmp_path / name / "p.parquet", [f"{name}{i}" for i in range(8)])
    specs = [SourceSpec.parse(f"{tmp_path}/web/*.parquet:3"), SourceSpec.parse(f"{tmp_path}/human/*.parquet:1")]
    assert specs[0].weight == 3.0
    stream = ImageTextStream(specs, seed=0)
    sources = Counter(s.source for s in stream.next_batch(800))
    assert abs(sources[specs[0].name] / 800 - 0.75) < 0.05
    again = ImageTextStream(specs, seed=0)
    assert _keys(again, 50) == _keys(ImageTextStream(specs, seed=0), 50)


def test_ranks_partition_the_global_batch(tmp_path, curated):
    _curated(tmp_path / "clean.parquet", [f"c{i}" for i in range(10)])
    src = [SourceSpec(str(tmp_path / "clean.parquet"))]
    single = ImageTextStream(src, seed=5, batch_size=4)
    ranks = [ImageTextStream(src, seed=5, batch_size=2, rank=r, world_size=2) for r in range(2)]
    for _ in range(6):  # with every image decodable, rank batches concatenate to the global one
        assert _keys(ranks[0], 2) + _keys(ranks[1], 2) == _keys(single, 4)
    # with an undecodable image a rank moves on to its next emission: full batches, no overlap
    ranks = [ImageTextStream([SourceSpec(str(curated / "*.parquet"))], seed=5, batch_size=2, rank=r,
                             world_size=2) for r in range(2)]
    got = [_keys(r, 5) for r in ranks]
    assert len(got[0]) == len(got[1]) == 5 and not set(got[0]) & set(got[1])


def test_input_errors(tmp_path):
    with pytest.raises(ValueError, match="no parquet shards match"):
        ImageTextStream([SourceSpec(str(tmp_path / "missing*.parquet"))])
    no_images = CURATED_SCHEMA.remove(CURATED_SCHEMA.get_field_index("jpg"))
    pq.write_table(no_images.empty_table(), tmp_path / "refs.parquet")
    with pytest.raises(ValueError, match="refs.parquet.*'jpg'"):
        ImageTextStream([SourceSpec(str(tmp_path / "refs.parquet"))])
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="other.parquet: neither a curated"):
        ImageTextStream([SourceSpec(str(tmp_path / "other.parquet"))])
    _curated(tmp_path / "none.parquet", ["z"], keep=[False])
    with pytest.raises(ValueError, match="no usable rows"):
        ImageTextStream([SourceSpec(str(tmp_path / "none.parquet"))]).next_batch(1)
    with pytest.raises(ValueError, match="weight must be > 0"):
        SourceSpec.parse("x.parquet:0")


def test_a_source_with_no_decodable_image_is_an_error_not_a_hang(tmp_path):
    """All 6 images bad: after one whole epoch the stream raises, naming the source and the
    number skipped (it used to loop over epochs for ever)."""
    keys = [f"x{i}" for i in range(6)]
    _curated(tmp_path / "bad.parquet", keys, bad=set(keys))
    stream = ImageTextStream([SourceSpec(str(tmp_path / "bad.parquet"))], seed=0, batch_size=2)
    whole_epoch = r"bad.parquet'.*no image of a whole epoch decodes \(6 skipped: not_an_image 6\)"
    with pytest.raises(ValueError, match=whole_epoch):
        stream.next_batch()
    assert stream.stats.skipped == Counter({"not_an_image": 6})
    # in a mixture the bad source is named, even though the good one could fill batches
    _curated(tmp_path / "good.parquet", [f"g{i}" for i in range(6)])
    mix = ImageTextStream([SourceSpec(str(tmp_path / "good.parquet")), SourceSpec(str(tmp_path / "bad.parquet"))],
                          seed=0)
    with pytest.raises(ValueError, match="bad.parquet'.*6 skipped"):
        mix.next_batch(100)
    # a rank sees only its share of an epoch: the epoch is replayed before it gives up
    rank = ImageTextStream([SourceSpec(str(tmp_path / "bad.parquet"))], seed=0, batch_size=2, rank=1, world_size=2)
    with pytest.raises(ValueError, match="bad.parquet'.*6 skipped"):
        rank.next_batch()


def test_an_epoch_with_some_decodable_images_is_not_an_error(tmp_path):
    """5 of 6 bad: a rank whose share of an epoch is all bad replays the epoch, finds the good
    image and goes on; so does a stream resumed past the good image."""
    keys = [f"x{i}" for i in range(6)]
    _curated(tmp_path / "mostly_bad.parquet", keys, bad=set(keys[1:]))
    src = [SourceSpec(str(tmp_path / "mostly_bad.parquet"))]
    for rank in range(2):
        stream = ImageTextStream(src, seed=0, batch_size=1, rank=rank, world_size=2)
        assert _keys(stream, 4) == ["x0"] * 4
    single = ImageTextStream(src, seed=0)
    assert _keys(single, 3) == ["x0"] * 3
    state = single.state_dict()
    resumed = ImageTextStream(src, seed=0)
    resumed.load_state_dict(state)
    assert _keys(resumed, 3) == ["x0"] * 3


def test_a_curate_output_directory_reads_its_shards_not_its_errors(tmp_path):
    from capfilt.transforms.shards import expand_paths
    from capfilt.transforms.schemas import ERROR_SCHEMA

    out = tmp_path / "curated"
    (out / "shards").mkdir(parents=True)
    (out / "errors").mkdir()
    (out / "_state").mkdir()
    (out / "_state" / "settings.json").write_text("{}")
    _curated(out / "shards" / "part-00000.parquet", ["a0", "a1"])
    pq.write_table(ERROR_SCHEMA.empty_table(), out / "errors" / "part-00000.parquet")
    assert expand_paths(str(out)) == [str(out / "shards" / "part-00000.parquet")]
    assert sorted(_keys(ImageTextStream([SourceSpec(str(out))]), 2)) == ["a0", "a1"]


def test_a_no_images_curate_output_is_named_not_an_empty_source(tmp_path):
    """--no-images keeps the jpg column, all null: the error says so, from the footers."""
    _curated(tmp_path / "refs.parquet", ["r0", "r1"])
    table = pq.read_table(tmp_path / "refs.parquet")
    table = table.set_column(table.schema.get_field_index("jpg"), "jpg", pa.nulls(2, pa.binary()))
    pq.write_table(table, tmp_path / "refs.parquet")
    with pytest.raises(ValueError, match=r"every 'jpg' is null in 1 shard\(s\) .*--no-images"):
        ImageTextStream([SourceSpec(str(tmp_path / "refs.parquet"))])
