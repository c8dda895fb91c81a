"""The synthetic noisy-web world (transforms/synth*.py) and `capfilt synth`."""
import hashlib
import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from capfilt.jobs.cli import main
from capfilt.transforms.synth import scenes as synth
from capfilt.transforms.image import decode_image
from capfilt.transforms.schemas import RAW_SCHEMA
from capfilt.transforms.synth.render import SLOT_CENTRES, render
from capfilt.transforms.synth.world import SynthConfig, noise_labels, write_world


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _raw_rows(root, split):
    return [r for p in sorted((root / split).glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def _truth(root):
    return {r["key"]: r for r in pq.read_table(root / "truth.parquet").to_pylist()}


def _scene(t):
    objects = tuple(synth.Obj(*a) for a in zip(t["shapes"], t["colours"], t["sizes"], t["positions"]))
    return synth.Scene(objects, t["background"], t["background_colour"])


def test_same_seed_same_bytes_and_seed_matters(tmp_path):
    cfg = dict(n=24, human=6, test=6, rows_per_shard=10)
    write_world(tmp_path / "a", SynthConfig(seed=5, **cfg))
    write_world(tmp_path / "b", SynthConfig(seed=5, **cfg))
    write_world(tmp_path / "c", SynthConfig(seed=6, **cfg))
    a, b, c = (_files(tmp_path / d) for d in "abc")
    assert a == b
    assert sorted(a) == sorted(c)
    assert a["web/00000.parquet"] != c["web/00000.parquet"]
    assert sorted(name for name in a if name.startswith("web/")) == [
        "web/00000.parquet", "web/00001.parquet", "web/00002.parquet"]


def test_shards_follow_the_raw_contract(synth_world):
    for split, count in (("web", 48), ("human", 16), ("test", 16)):
        shards = sorted((synth_world / split).glob("*.parquet"))
        assert shards
        for shard in shards:
            assert pq.read_schema(shard).remove_metadata().equals(RAW_SCHEMA)
        rows = _raw_rows(synth_world, split)
        assert len(rows) == count
        for row in rows:
            assert row["status"] == "success" and row["error_message"] is None
            assert row["sha256"] == hashlib.sha256(row["jpg"]).hexdigest()
            assert (row["width"], row["height"], row["original_width"], row["original_height"]) == (64,) * 4
            assert decode_image(row["jpg"]).size == (64, 64)
            assert row["url"].endswith(f"/{split}/{row['key']}.jpg")
    assert pq.read_schema(synth_world / "truth.parquet").remove_metadata().equals(synth.TRUTH_SCHEMA)


def test_truth_joins_every_row_and_keys_are_file_safe(synth_world):
    truth = _truth(synth_world)
    seen = []
    for split in ("web", "human", "test"):
        for row in _raw_rows(synth_world, split):
            seen.append(row["key"])
            t = truth[row["key"]]
            assert t["split"] == split and t["caption"] == row["caption"]
            assert t["n_objects"] == len(t["shapes"]) == len(t["colours"]) == len(t["positions"])
            if split != "web":
                assert t["noise_type"] == "correct" and row["caption"] == t["true_caption"]
    assert len(seen) == len(set(seen)) == len(truth)
    assert all(re.fullmatch(r"[A-Za-z0-9_]+", key) for key in seen)


def test_captions_agree_with_their_noise_label(synth_world):
    truth = _truth(synth_world)
    kinds = {t["noise_type"] for t in truth.values() if t["split"] == "web"}
    assert kinds == set(synth.NOISE_TYPES)  # 48 rows at 45% noise cover every type
    for t in truth.values():
        scene = _scene(t)
        assert synth.caption_matches(t["true_caption"], scene), t["true_caption"]
        if t["noise_type"] == "correct":
            assert t["caption"] == t["true_caption"]
        elif t["noise_type"] == "junk":
            assert synth.parse_caption(t["caption"]) == []
        elif t["noise_type"] == "other":
            source = truth[t["source_key"]]
            assert t["caption"] == source["true_caption"] and source["split"] == "web"
            assert not synth.caption_matches(t["caption"], scene)
        else:
            assert not synth.caption_matches(t["caption"], scene)


def test_attribute_noise_differs_in_exactly_one_attribute(tmp_path):
    write_world(tmp_path, SynthConfig(n=200, human=0, test=0, noise=1.0,
                                      noise_mix={"attribute": 1.0}, seed=3, rows_per_shard=500))
    rows = [t for t in _truth(tmp_path).values() if t["noise_type"] == "attribute"]
    assert len(rows) == 200
    for t in rows:
        stated = synth.parse_caption(t["caption"])
        assert len(stated) == t["n_objects"], t["caption"]
        diffs = []
        for i, obj in enumerate(stated):
            for attr, true_values in (("colour", t["colours"]), ("shape", t["shapes"]),
                                      ("position", t["positions"])):
                if getattr(obj, attr) != true_values[i]:
                    diffs.append((attr, i, getattr(obj, attr)))
        assert diffs == [(t["wrong_attribute"], t["wrong_object"], t["wrong_value"])], t["caption"]
    assert {t["wrong_attribute"] for t in rows} == set(synth.ATTRIBUTES)


@pytest.mark.parametrize("noise,mix", [(0.45, {"other": 0.35, "attribute": 0.35, "junk": 0.30}),
                                       (0.2, {"other": 1.0, "junk": 3.0}), (0.0, {"junk": 1.0})])
def test_noise_ratios_within_tolerance(noise, mix):
    n = 1000
    labels = noise_labels(n, noise, mix, seed=1)
    assert len(labels) == n
    assert abs(sum(label != "correct" for label in labels) / n - noise) <= 1 / n
    n_noisy = max(1, sum(label != "correct" for label in labels))
    for kind in ("other", "attribute", "junk"):
        share = sum(label == kind for label in labels) / n_noisy
        assert abs(share - mix.get(kind, 0.0) / sum(mix.values())) <= 2 / n_noisy
    # shuffled, not blocked: noisy rows spread over the first and second half
    if noise:
        assert 0.3 < sum(label != "correct" for label in labels[: n // 2]) / (noise * n) < 0.7


def test_render_puts_objects_where_the_caption_says():
    rng = np.random.default_rng(0)
    red = np.array(synth.COLOURS["red"])
    for position in synth.POSITIONS:
        scene = synth.Scene((synth.Obj("square", "red", "large", position),), "plain", "gray")
        pixels = np.asarray(render(scene, 64, rng), dtype=np.int32)  # (64, 64, 3)
        fx, fy = SLOT_CENTRES[position]
        assert np.abs(pixels[int(fy * 64), int(fx * 64)] - red).max() <= 30, position
        is_red = np.abs(pixels - red).max(axis=2) <= 40  # (64, 64)
        ys, xs = np.nonzero(is_red)
        assert abs(xs.mean() / 64 - fx) < 0.06 and abs(ys.mean() / 64 - fy) < 0.06, position
    large = synth.Scene((synth.Obj("circle", "blue", "large", "center"),), "plain", "gray")
    small = synth.Scene((synth.Obj("circle", "blue", "small", "center"),), "plain", "gray")
    area = [(np.abs(np.asarray(render(s, 64, rng), dtype=np.int32) - synth.COLOURS["blue"]).max(axis=2) < 40).sum()
            for s in (large, small)]
    assert area[0] > 2.5 * area[1]


def test_bad_settings_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="noise must be in"):
        write_world(tmp_path / "a", SynthConfig(n=4, noise=1.5))
    with pytest.raises(ValueError, match="unknown noise type"):
        write_world(tmp_path / "b", SynthConfig(n=4, noise_mix={"typo": 1.0}))
    with pytest.raises(ValueError, match="'other' noise needs at least two"):
        write_world(tmp_path / "c", SynthConfig(n=1, noise=1.0, noise_mix={"other": 1.0}))
    with pytest.raises(ValueError, match="image_size"):
        write_world(tmp_path / "d", SynthConfig(n=4, image_size=8))


def test_cli_synth(tmp_path, capsys):
    out = tmp_path / "world"
    args = ["synth", "--out", str(out), "--n", "20", "--human", "4", "--test", "3",
            "--rows-per-shard", "8", "--noise", "0.5", "--noise-mix", "junk=1", "--no-progress"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["rows"] == {"web": 20, "human": 4, "test": 3}
    assert printed["web_noise_counts"] == {"correct": 10, "other": 0, "attribute": 0, "junk": 10}
    assert len(list((out / "web").glob("*.parquet"))) == 3
    truth = pq.read_table(out / "truth.parquet").to_pylist()
    assert sorted({t["noise_type"] for t in truth if t["split"] == "web"}) == ["correct", "junk"]
    with pytest.raises(ValueError, match="already holds"):
        main(args)
    # a smaller rerun with --overwrite leaves no stale shard behind
    assert main(args[:4] + ["10", "--overwrite", "--no-progress"]) == 0
    assert len(list((out / "web").glob("*.parquet"))) == 1
    assert len(_raw_rows(out, "web")) == 10
    with pytest.raises(SystemExit):
        main(["synth", "--out", str(out), "--noise-mix", "bogus=1"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["synth", "--help"])
    assert exc.value.code == 0
    assert "--noise-mix" in capsys.readouterr().out
