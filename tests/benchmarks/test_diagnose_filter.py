"""benchmarks/diagnose_filter.py: the probe and the negative census behind docs/results.md's
account of the filter (run on the tiny world and a random-weight tiny ITM model)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("diagnose_filter", REPO / "benchmarks" / "diagnose_filter.py")
diag = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(diag)

KINDS = {"count", "none", "colour", "shape", "position", "colour+shape", "colour+position",
         "shape+position", "colour+shape+position"}


def _obj(colours, shapes, positions):
    return {"n_objects": len(colours), "colours": colours, "shapes": shapes, "positions": positions}


def test_difference_classes_by_attribute_multisets():
    image = _obj(["red", "blue"], ["circle", "square"], ["left", "right"])
    assert diag.difference(image, _obj(["red"], ["circle"], ["left"])) == "count"
    assert diag.difference(image, _obj(["blue", "red"], ["square", "circle"], ["right", "left"])) == "none"
    assert diag.difference(image, _obj(["red", "blue"], ["circle", "star"], ["left", "right"])) == "shape"
    assert diag.difference(image, _obj(["red", "green"], ["circle", "square"], ["top", "right"])) == "colour+position"


def test_linear_probe_separates_a_separable_problem():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 20, generator=g) * 4  # three well-separated classes
    y = torch.arange(3).repeat(40)  # (120,)
    x = centres[y] + torch.randn(120, 20, generator=g)
    predicted = diag.linear_probe(x[:90], y[:90], x[90:], n_classes=3)
    assert predicted.shape == (30,)
    assert torch.equal(predicted, y[90:])


def test_probe_reads_the_single_object_images(tiny_models, synth_world):
    out = diag.probe(str(tiny_models["itm"]), Path(synth_world))
    truth = pq.read_table(Path(synth_world) / "truth.parquet").to_pylist()
    single = [r for r in truth if r["n_objects"] == 1]
    assert out["n_fit"] == sum(r["split"] in ("web", "human") for r in single)
    assert out["n_test"] == sum(r["split"] == "test" for r in single)
    vision = json.loads((Path(tiny_models["itm"]) / "config.json").read_text())["vision_config"]
    tokens = 1 + (vision["image_size"] // vision["patch_size"]) ** 2  # [CLS] + patches
    assert out["features"] == tokens * vision["hidden_size"]
    assert set(out["accuracy"]) == {"colour", "shape", "position"}
    for name, column in diag.PROBED.items():
        assert 0.0 <= out["accuracy"][name] <= 1.0
        assert out["chance"][name] == round(1 / len({r[column][0] for r in single}), 4)


def test_negative_census_counts_every_draw(tiny_models, synth_world, tmp_path, capsys):
    out = diag.main(["negatives", "--model", str(tiny_models["itm"]), "--world", str(synth_world),
                     "--batch-size", "8", "--batches", "5", "--json-out", str(tmp_path / "n.json")])
    assert out["draws"] == 40  # 5 batches x 8 images: the tiny world's human captions are distinct
    assert set(out["hard_percent"]) <= KINDS and set(out["uniform_percent"]) == set(out["hard_percent"])
    assert sum(out["hard_percent"].values()) == pytest.approx(100, abs=0.5)
    assert sum(out["uniform_percent"].values()) == pytest.approx(100, abs=0.5)
    assert json.loads((tmp_path / "n.json").read_text()) == out
    assert json.loads(capsys.readouterr().out) == out


def test_negative_census_rejects_a_batch_larger_than_the_split(tiny_models, synth_world):
    with pytest.raises(ValueError, match="fewer than --batch-size 64"):
        diag.negatives(str(tiny_models["itm"]), Path(synth_world), batch_size=64)


def test_cli_names_a_world_without_truth(tmp_path, capsys):
    with pytest.raises(SystemExit):
        diag.main(["probe", "--model", "M", "--world", str(tmp_path)])
    assert f"--world {tmp_path}: no truth.parquet" in capsys.readouterr().err


def _truth_row(key, noise, wrong=None, source=None, n=1, position="left"):
    return {"key": key, "split": "web", "caption": "c", "true_caption": "c", "noise_type": noise,
            "wrong_attribute": wrong, "source_key": source, "n_objects": n, "colours": ["red"] * n,
            "shapes": ["star"] * n, "sizes": ["large"] * n, "positions": [position] * n}


def test_blind_bounds_count_what_a_blind_filter_cannot_see(tmp_path):
    """6 correct and 6 noisy captions: junk, two wrong shapes, a wrong colour, another image's
    caption that differs in position only, and one of another object count. Worked by hand."""
    import pyarrow as pa

    rows = [_truth_row(f"c{i}", "correct") for i in range(6)]
    rows[0]["positions"] = ["top"]  # o0 was written for c0: it differs from its image in position only
    rows += [_truth_row("j0", "junk"), _truth_row("a0", "attribute", "shape"), _truth_row("a1", "attribute", "shape"),
             _truth_row("a2", "attribute", "colour"), _truth_row("o0", "other", source="c0"),
             _truth_row("o1", "other", source="c1", n=2)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "truth.parquet")
    out = diag.main(["blind", "--world", str(tmp_path), "--recall", "0.8"])  # 0.8 x 6 noisy: catch 5
    assert (out["noisy"], out["correct"]) == (6, 6)
    blind = out["blind"]
    assert blind["nothing"] == {"hidden_noisy": 0, "visible_noisy": 6, "correct_flagged": 0.0,
                                "best_precision": 1.0, "kept_correct": 1.0}
    # shape-blind: a0, a1 hidden; one of them must be caught, so half the correct ones are flagged
    assert blind["shape"] == {"hidden_noisy": 2, "visible_noisy": 4, "correct_flagged": 0.5,
                              "best_precision": round(5 / 8, 4), "kept_correct": 0.75}
    # position-blind: only o0 hidden, and the 5 visible ones reach the recall alone
    assert blind["position"] == {"hidden_noisy": 1, "visible_noisy": 5, "correct_flagged": 0.0,
                                 "best_precision": 1.0, "kept_correct": round(6 / 7, 4)}
    assert blind["shape+position"]["hidden_noisy"] == 3
    assert blind["shape+position"]["best_precision"] == round(5 / 9, 4)
    # at recall 1 a shape-blind filter flags every caption it cannot tell apart
    assert diag.blind_bounds(tmp_path, 1.0)["blind"]["shape"]["kept_correct"] is None
    with pytest.raises(ValueError, match="--recall must be in \\(0, 1\\], got 0"):
        diag.blind_bounds(tmp_path, 0)
