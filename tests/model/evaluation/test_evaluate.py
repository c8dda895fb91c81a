"""Evaluation metrics on hand-made inputs, and `capfilt evaluate` on tiny models."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from capfilt.jobs import cli
from capfilt.model.evaluation import evaluate as evaluation
from capfilt.model.evaluation.metrics import (
    attribute_accuracy,
    precision_at_recall,
    binary_prf,
    caption_scores,
    curated_metrics,
    filter_metrics,
    itm_rerank,
    retrieval_recall,
    scene_from_truth,
)
from capfilt.transforms.synth.scenes import Obj, Scene
from capfilt.transforms.text import clean_caption

# CI installs java (.ci/run) and sets CI: there a missing java fails the test instead of skipping it.
needs_java = pytest.mark.skipif(shutil.which("java") is None and not os.environ.get("CI"),
                                reason="pycocoevalcap's tokenizer needs java")


# --- retrieval ---------------------------------------------------------------------------------

def test_recall_perfect_and_hand_computed():
    assert retrieval_recall(np.eye(4), [0, 1, 2, 3], ks=(1,))["i2t_r1"] == 1.0
    # Image 0's text is ranked 2nd, image 1's 1st, image 2's 3rd.
    sim = np.array([[0.5, 0.9, 0.1],
                    [0.1, 0.8, 0.2],
                    [0.7, 0.6, 0.3]])
    r = retrieval_recall(sim, [0, 1, 2], ks=(1, 2, 3))
    assert r["i2t_r1"] == pytest.approx(1 / 3)
    assert r["i2t_r2"] == pytest.approx(2 / 3)
    assert r["i2t_r3"] == 1.0
    # Columns: text 0 -> image 2 first (0.7), image 0 second; text 1 -> image 0 first (0.9),
    # image 1 second; text 2 -> image 2 first.
    assert r["t2i_r1"] == pytest.approx(1 / 3)
    assert r["t2i_r2"] == 1.0
    means = [v for k, v in r.items() if k != "r_mean"]
    assert r["r_mean"] == pytest.approx(np.mean(means))


def test_recall_several_texts_per_image_and_ties():
    # Image 0 owns texts 0 and 1; its best text (1) is first.
    sim = np.array([[0.1, 0.9, 0.5],
                    [0.2, 0.3, 0.8]])
    r = retrieval_recall(sim, [0, 0, 1], ks=(1,))
    assert r["i2t_r1"] == 1.0
    assert r["t2i_r1"] == pytest.approx(2 / 3)  # text 0 prefers image 1
    # A collapsed model (all scores equal) must not score R@1 = 1.
    flat = retrieval_recall(np.zeros((3, 3)), [0, 1, 2], ks=(1, 3))
    assert flat["i2t_r1"] == 0.0 and flat["t2i_r1"] == 0.0
    assert flat["i2t_r3"] == 1.0


def test_recall_counts_identical_captions_as_the_same_text():
    # Images 0 and 1 have the same caption; image 0 ranks image 1's copy first.
    sim = np.array([[0.5, 0.9, 0.1],
                    [0.2, 0.3, 0.1],
                    [0.1, 0.2, 0.8]])
    texts = ["a red circle on the left", "a red circle on the left", "a blue star"]
    plain = retrieval_recall(sim, [0, 1, 2], ks=(1,))
    same = retrieval_recall(sim, [0, 1, 2], ks=(1,), texts=texts)
    assert plain["i2t_r1"] == pytest.approx(2 / 3) and same["i2t_r1"] == 1.0
    # Text 0 ranks image 0 first anyway; text 1 ranks image 0 (an owner of the same string) first.
    assert plain["t2i_r1"] == pytest.approx(2 / 3) and same["t2i_r1"] == 1.0
    with pytest.raises(ValueError, match="2 texts for 3"):
        retrieval_recall(sim, [0, 1, 2], texts=texts[:2])


@pytest.mark.parametrize(
    "sim, text_image, match",
    [
        (np.eye(3), [0, 1], "text_image has shape"),
        (np.eye(3), [0, 1, 3], "outside"),
        (np.eye(3), [0, 0, 1], "image 2 has no text"),
    ],
)
def test_recall_rejects_bad_input(sim, text_image, match):
    with pytest.raises(ValueError, match=match):
        retrieval_recall(sim, text_image)


def test_itm_rerank_rescores_only_the_top_k():
    sim = np.array([[0.9, 0.8, 0.1],
                    [0.85, 0.7, 0.2],
                    [0.1, 0.2, 0.3]])
    itm = np.array([[1.0, 0.0, 1.0],   # text 2 would win for image 0, but ITC keeps it out
                    [0.0, 1.0, 0.0],
                    [0.0, 0.0, 1.0]])
    calls = []

    def score_pairs(images, texts):
        calls.append(list(images))
        return [itm[i, ts] for i, ts in zip(images, texts)]

    i2t, t2i = itm_rerank(sim, 2, score_pairs)
    assert sorted(calls[0]) == calls[0] and len(set(calls[0])) == len(calls[0])  # one pass per image
    # Image 0: top-2 by ITC are texts 0 and 1, re-scored as ITM + ITC; text 2 stays out.
    assert i2t[0, 0] == pytest.approx(1.9) and i2t[0, 1] == pytest.approx(0.8)
    assert i2t[0, 2] == -np.inf
    # Image 1: ITC ranks text 0 first; ITM moves its own text 1 up.
    assert np.argmax(i2t[1]) == 1
    # Text 2: top-2 images by ITC are 2 (0.3) and 1 (0.2); image 0 is never scored for it.
    assert t2i[0, 2] == -np.inf and t2i[2, 2] == pytest.approx(1.3)
    r = retrieval_recall(i2t, [0, 1, 2], t2i, ks=(1,))
    plain = retrieval_recall(sim, [0, 1, 2], ks=(1,))
    assert r["i2t_r1"] == 1.0 and plain["i2t_r1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="k must be"):
        itm_rerank(sim, 0, score_pairs)


# --- captions ----------------------------------------------------------------------------------

@needs_java
def test_caption_scores_on_a_tiny_reference_set():
    refs = {"a": ["a red circle on the left"], "b": ["a blue square at the top"],
            "c": ["a green star in the center"]}
    same = caption_scores(refs, {k: v[0] for k, v in refs.items()})
    assert same["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert same["cider"] > 1.0
    swapped = caption_scores(refs, {"a": "a blue square at the top", "b": "a green star in the center",
                                    "c": "a red circle on the left"})
    assert swapped["cider"] < same["cider"]
    assert swapped["bleu4"] < 0.7  # "a ... on/at the" n-grams still overlap a little
    with pytest.raises(ValueError, match="without references"):
        caption_scores(refs, {"z": "x"})


def _scene(*objects):
    return Scene(tuple(Obj(s, c, "small", p) for s, c, p in objects), "plain", "gray")


def test_attribute_accuracy_counts_each_attribute():
    scenes = [_scene(("circle", "red", "left")),
              _scene(("square", "blue", "top"), ("star", "green", "bottom")),
              _scene(("cross", "white", "center"))]
    captions = ["a red circle on the left",              # all right
                "a blue square at the top",              # second object missing
                "there is a black cross in the middle"]  # colour wrong
    r = attribute_accuracy(captions, scenes)
    # 4 true objects: colour right on 2, shape right on 3, position right on 3.
    assert r["colour"] == pytest.approx(2 / 4)
    assert r["shape"] == pytest.approx(3 / 4)
    assert r["position"] == pytest.approx(3 / 4)
    assert r["attribute_accuracy"] == pytest.approx(np.mean([0.5, 0.75, 0.75]))
    assert r["exact"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="2 captions for 3 scenes"):
        attribute_accuracy(captions[:2], scenes)


def test_scene_from_truth_rejects_ragged_lists():
    row = {"key": "k1", "shapes": ["circle"], "colours": ["red"], "sizes": ["small"], "positions": ["left"]}
    assert scene_from_truth(row).objects == (Obj("circle", "red", "small", "left"),)
    with pytest.raises(ValueError, match="'k2'"):
        scene_from_truth({**row, "key": "k2", "colours": ["red", "blue"]})


# --- filter and curated ------------------------------------------------------------------------

def test_binary_prf_hand_computed():
    r = binary_prf([1, 1, 0, 0, 1], [1, 0, 1, 0, 1])
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (2, 1, 1, 1)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(2 / 3)
    assert binary_prf([0, 0], [1, 0])["precision"] == 0.0
    with pytest.raises(ValueError, match="2 predictions for 3 labels"):
        binary_prf([0, 1], [0, 1, 1])


def test_precision_at_recall_sweeps_thresholds():
    score = [0.9, 0.8, 0.7, 0.6, 0.5, 0.1]
    noisy = [1, 1, 0, 1, 0, 0]
    r = precision_at_recall(score, noisy, 0.9)
    # Recall 1.0 is first reached at threshold 0.6, flagging 4 rows with 3 noisy among them.
    assert r["threshold"] == 0.6 and r["recall"] == 1.0 and r["precision"] == 0.75
    assert r["average_precision"] == pytest.approx((1 + 1 + 0.75) / 3)
    assert precision_at_recall(score, noisy, 0.5)["precision"] == 1.0
    with pytest.raises(ValueError, match="NaN"):
        precision_at_recall([0.1, float("nan")], [1, 0])


def test_filter_metrics_per_noise_type():
    types = ["correct"] * 4 + ["other"] * 2 + ["attribute"] * 2 + ["junk"] * 2
    flagged = [0, 0, 0, 1] + [1, 1] + [1, 0] + [1, 1]
    r = filter_metrics(flagged, types)
    assert r["n"] == 10
    assert r["precision"] == pytest.approx(5 / 6) and r["recall"] == pytest.approx(5 / 6)
    assert r["per_type"]["correct"] == {"n": 4, "flagged_fraction": 0.25}
    att = r["per_type"]["attribute"]
    assert att["recall"] == 0.5 and att["precision"] == pytest.approx(0.5)  # 1 tp, 1 fp
    assert r["per_type"]["junk"]["recall"] == 1.0
    with pytest.raises(ValueError, match="unknown noise type 'spam'"):
        filter_metrics([0], ["spam"])
    assert "per_wrong_attribute" not in r  # only with the truth's wrong_attribute column
    wrong = [None] * 6 + ["shape", "colour"] + [None] * 2
    split = filter_metrics(flagged, types, wrong)["per_wrong_attribute"]
    assert split == {"colour": {"n": 1, "flagged_fraction": 0.0}, "shape": {"n": 1, "flagged_fraction": 1.0}}
    with pytest.raises(ValueError, match="2 wrong_attribute values for 10 rows"):
        filter_metrics(flagged, types, ["shape", None])


def _truth(rows):
    cols = {name: [r[i] for r in rows] for i, name in enumerate(
        ["key", "noise_type", "shapes", "colours", "sizes", "positions"])}
    return pa.table(cols)


def test_curated_metrics_against_truth():
    truth = _truth([
        ("a", "correct", ["circle"], ["red"], ["small"], ["left"]),
        ("b", "other", ["square"], ["blue"], ["large"], ["top"]),
        ("c", "attribute", ["star"], ["green"], ["small"], ["center"]),
        ("d", "junk", ["cross"], ["white"], ["small"], ["right"]),
    ])
    curated = pa.table({
        "key": ["a", "b", "c", "d"],
        "captions": [["a red circle on the left", "a red circle at the left"],
                     ["a blue square at the top"],
                     ["a green star on the left"],          # the (noisy) web caption, kept
                     []],
        "caption_sources": [["web", "synthetic"], ["synthetic"], ["web"], []],
        "keep": [True, True, True, False],
    })
    r = curated_metrics(curated, truth)
    assert r["web_correct_fraction"] == 0.25
    assert r["selected_captions"] == 4 and r["kept_rows"] == 3
    assert r["selected_correct_fraction"] == pytest.approx(3 / 4)
    assert r["noise_removed"] == pytest.approx(2 / 3)  # b and d dropped their web caption, c did not
    assert r["correct_by_source"] == {"web": 0.5, "synthetic": 1.0}
    with pytest.raises(ValueError, match="'zz' is not in the truth"):
        curated_metrics(curated.slice(0, 1).set_column(0, "key", pa.array(["zz"])), truth)
    nothing = curated.set_column(3, "keep", pa.array([False] * 4))
    r = curated_metrics(nothing, truth)
    assert r["selected_captions"] == 0 and r["selected_correct_fraction"] is None
    assert r["noise_removed"] == 1.0


# --- the models and `capfilt evaluate` ---------------------------------------------------------


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _run_evaluate(argv, capsys):
    assert cli.main(["evaluate", *argv]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("kind", ["itm", "blip2-itm"])
def test_itc_matrix_matches_the_filter_scores(kind, tiny_models, synth_world):
    from capfilt.model.inference.filter import load_filter

    evalset = evaluation.load_eval_images(str(synth_world / "test"), limit=6)
    flt = load_filter(str(tiny_models[kind]), device="cpu")
    sim = evaluation.filter_itc_matrix(flt, evalset.images, evalset.captions, batch_size=4)
    assert sim.shape == (6, 6)
    # Row i of the matrix is image i against every caption, as `score` computes it pairwise.
    scores = flt.score(evalset.images, [evalset.captions] * 6)
    np.testing.assert_allclose(sim, np.stack([s.itc for s in scores]), atol=1e-5)


def test_evaluate_retrieval_writes_json(tiny_models, synth_world, tmp_path, capsys):
    out = tmp_path / "r.json"
    result = _run_evaluate(["--task", "retrieval", "--model", str(tiny_models["itm"]),
                            "--data", str(synth_world / "test" / "*.parquet"),
                            "--itm-rerank", "3", "--out", str(out)], capsys)
    assert json.loads(out.read_text()) == result
    assert result["n_images"] == 16 and result["scorer"].startswith("itc:")
    for block in (result, result["itm_rerank"]):
        for key in ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "i2t_r10", "t2i_r10"):
            assert 0.0 <= block[key] <= 1.0
            assert block[key] * 16 == pytest.approx(round(block[key] * 16))  # a count of 16 queries
        assert block["i2t_r1"] <= block["i2t_r5"] <= block["i2t_r10"]
    # Re-ranking reorders the ITC top 3 only, so nothing outside it can become a hit.
    assert result["itm_rerank"]["i2t_r10"] <= result["i2t_r5"]
    assert result["itm_rerank"]["t2i_r10"] <= result["t2i_r5"]
    clip = _run_evaluate(["--task", "retrieval", "--model", str(tiny_models["clip"]),
                          "--data", str(synth_world / "test")], capsys)
    assert clip["scorer"].startswith("clip:") and 0.0 <= clip["t2i_r1"] <= 1.0


@needs_java
def test_evaluate_captions_against_the_truth(tiny_models, synth_world, capsys):
    result = _run_evaluate(["--task", "caption", "--model", str(tiny_models["captioner"]),
                            "--data", str(synth_world / "test"), "--truth", str(synth_world / "truth.parquet"),
                            "--limit", "4"], capsys)
    assert result["n_images"] == 4
    assert 0.0 <= result["bleu4"] <= 1.0 and result["cider"] >= 0.0
    for key in ("colour", "shape", "position", "attribute_accuracy", "exact"):
        assert 0.0 <= result[key] <= 1.0
    truth = {r["key"]: r for r in pq.read_table(synth_world / "truth.parquet").to_pylist()}
    for example in result["examples"]:
        assert example["reference"] == truth[example["key"]]["true_caption"]


def _truth_table(world):
    return pq.read_table(world / "truth.parquet").to_pylist()


def test_evaluate_filter_on_raw_web_shards(tiny_models, synth_world, capsys):
    web_truth = [r for r in _truth_table(synth_world) if r["split"] == "web"]
    result = _run_evaluate(["--task", "filter", "--model", str(tiny_models["itm"]),
                            "--data", str(synth_world / "web"), "--truth", str(synth_world / "truth.parquet")],
                           capsys)
    assert result["n"] == len(web_truth) == 48
    assert result["tp"] + result["fp"] + result["fn"] + result["tn"] == 48
    assert result["tp"] + result["fn"] == sum(r["noise_type"] != "correct" for r in web_truth)
    for name, entry in result["per_type"].items():
        assert entry["n"] == sum(r["noise_type"] == name for r in web_truth)
    attribute_rows = [r for r in web_truth if r["noise_type"] == "attribute"]
    assert attribute_rows and sum(e["n"] for e in result["per_wrong_attribute"].values()) == len(attribute_rows)
    for name, entry in result["per_wrong_attribute"].items():
        assert entry["n"] == sum(r["wrong_attribute"] == name for r in attribute_rows)
        assert 0.0 <= entry["flagged_fraction"] <= 1.0


def test_evaluate_filter_without_truth_counts_false_alarms_on_clean_pairs(tiny_models, synth_world, capsys):
    from capfilt.model.inference.filter import load_filter

    result = _run_evaluate(["--task", "filter", "--model", str(tiny_models["itm"]), "--threshold", "0.5",
                            "--data", str(synth_world / "test")], capsys)
    evalset = evaluation.load_eval_images(str(synth_world / "test"))
    scores = load_filter(str(tiny_models["itm"]), device="cpu").score(
        evalset.images, [[c] for c in evalset.captions])
    itm = np.array([float(s.itm[0]) for s in scores])  # every test caption is its image's own
    assert (result["n"], result["skipped"], result["threshold"]) == (16, 0, 0.5)
    assert result["flagged"] == int((itm < 0.5).sum())
    assert result["flagged_fraction"] == pytest.approx(result["flagged"] / 16)
    assert result["itm_mean"] == pytest.approx(itm.mean(), abs=1e-6)
    assert result["itm_first_token"] == "enc"  # BLIP's [ENC], as the filter's default
    cls = _run_evaluate(["--task", "filter", "--model", str(tiny_models["itm"]), "--itm-first-token", "cls",
                         "--data", str(synth_world / "test")], capsys)
    cls_itm = [float(s.itm[0]) for s in load_filter(str(tiny_models["itm"]), device="cpu", itm_first_token="cls")
               .score(evalset.images, [[c] for c in evalset.captions])]
    assert cls["itm_first_token"] == "cls" and cls["itm_mean"] == pytest.approx(np.mean(cls_itm), abs=1e-6)
    assert abs(cls["itm_mean"] - result["itm_mean"]) > 1e-3
    with pytest.raises(SystemExit, match="without --truth .* needs --model"):
        cli.main(["evaluate", "--task", "filter", "--data", str(synth_world / "test")])


def _write_curated(path, rows):
    table = pa.table({
        "key": [r["key"] for r in rows],
        "web_caption": [r["web_caption"] for r in rows],
        "web_itm": pa.array([r.get("web_itm") for r in rows], pa.float32()),
        "captions": [r["captions"] for r in rows],
        "caption_sources": [r["sources"] for r in rows],
        "keep": [bool(r["captions"]) for r in rows],
    })
    path.mkdir(parents=True)
    pq.write_table(table, path / "part-00000.parquet")


def test_evaluate_filter_and_curated_on_curated_shards(synth_world, tmp_path, capsys):
    web = [r for r in _truth_table(synth_world) if r["split"] == "web"]
    # A perfect filter (ITM 1 on correct rows, 0 on noisy ones) whose selection keeps the web
    # caption of correct rows and the true caption as "synthetic" for every row.
    rows = [{"key": r["key"], "web_caption": clean_caption(r["caption"]),
             "web_itm": 1.0 if r["noise_type"] == "correct" else 0.0,
             "captions": ([r["caption"]] if r["noise_type"] == "correct" else []) + [r["true_caption"]],
             "sources": (["web"] if r["noise_type"] == "correct" else []) + ["synthetic"]} for r in web]
    _write_curated(tmp_path / "curated", rows)
    truth = str(synth_world / "truth.parquet")
    filt = _run_evaluate(["--task", "filter", "--data", str(tmp_path / "curated"), "--truth", truth], capsys)
    assert filt["source"] == "web_itm column"
    assert (filt["precision"], filt["recall"], filt["f1"]) == (1.0, 1.0, 1.0)
    assert filt["at_recall_0.9"]["precision"] == 1.0
    cur = _run_evaluate(["--task", "curated", "--data", str(tmp_path / "curated"), "--truth", truth], capsys)
    n_correct = sum(r["noise_type"] == "correct" for r in web)
    assert cur["rows"] == 48 and cur["web_correct_fraction"] == pytest.approx(n_correct / 48)
    assert cur["selected_correct_fraction"] == 1.0 and cur["noise_removed"] == 1.0
    assert cur["selected_captions"] == 48 + n_correct


def test_evaluate_rejects_bad_input(synth_world, tmp_path, capsys):
    with pytest.raises(SystemExit, match="needs --truth"):
        cli.main(["evaluate", "--task", "curated", "--data", str(synth_world / "web")])
    with pytest.raises(SystemExit, match="does not exist"):
        cli.main(["evaluate", "--task", "retrieval", "--data", "x", "--model", str(tmp_path / "nope")])
    truth = str(synth_world / "truth.parquet")
    with pytest.raises(ValueError, match="lack column"):  # raw shards are not curated shards
        cli.main(["evaluate", "--task", "curated", "--data", str(synth_world / "web"), "--truth", truth])
    _write_curated(tmp_path / "c", [{"key": "nobody", "web_caption": "x", "web_itm": 0.5, "captions": ["x"],
                                     "sources": ["web"]}])
    with pytest.raises(ValueError, match="'nobody' is not in the truth"):
        cli.main(["evaluate", "--task", "filter", "--data", str(tmp_path / "c"), "--truth", truth])
    with pytest.raises(ValueError, match="no parquet shards match"):
        cli.main(["evaluate", "--task", "curated", "--data", str(tmp_path / "none*"), "--truth", truth])


@pytest.fixture(scope="module")
def other_world(tmp_path_factory):
    """A world with the synth_world's sizes and keys but another seed: other captions."""
    from capfilt.transforms.synth.world import SynthConfig, write_world

    out = tmp_path_factory.mktemp("other_world")
    write_world(out, SynthConfig(n=48, human=16, test=16, noise=0.45, seed=1, rows_per_shard=32))
    return out


def test_truth_of_another_world_is_refused(tiny_models, synth_world, other_world, tmp_path):
    """The keys join (web_0000000 ... in every world), the captions do not: each task that reads
    the truth names the first mismatching key and both captions."""
    mine = {r["key"]: r for r in _truth_table(synth_world)}
    theirs = {r["key"]: r for r in _truth_table(other_world)}
    wrong = str(other_world / "truth.parquet")
    first_web = sorted(pq.read_table(synth_world / "web").column("key").to_pylist())[0]
    assert mine[first_web]["caption"] != theirs[first_web]["caption"]

    def refused(argv, key):
        with pytest.raises(ValueError, match="is the truth from another world") as err:
            cli.main(["evaluate", "--no-progress", *argv, "--truth", wrong])
        message = str(err.value)
        assert repr(key) in message and repr(theirs[key]["caption"]) in message
        return message

    # raw web shards (filter), the test split (caption; refused before any caption is generated)
    message = refused(["--task", "filter", "--model", str(tiny_models["itm"]), "--data", str(synth_world / "web")],
                      "web_0000000")
    assert repr(clean_caption(mine["web_0000000"]["caption"])) in message
    refused(["--task", "caption", "--model", str(tiny_models["captioner"]), "--data", str(synth_world / "test")],
            "test_0000000")
    # curated shards: their cleaned web_caption against the truth's caption
    rows = [{"key": k, "web_caption": clean_caption(r["caption"]), "web_itm": 0.5, "captions": [r["true_caption"]],
             "sources": ["synthetic"]} for k, r in mine.items() if r["split"] == "web"]
    _write_curated(tmp_path / "curated", rows)
    for task in ("filter", "curated"):
        refused(["--task", task, "--data", str(tmp_path / "curated")], rows[0]["key"])
    # the right truth still passes, including a web caption cut short by curate's --max-words
    rows[0]["web_caption"] = " ".join(clean_caption(mine[rows[0]["key"]]["caption"]).split()[:1])
    _write_curated(tmp_path / "cut", rows)
    assert evaluation.evaluate_curated(str(tmp_path / "cut"), synth_world / "truth.parquet")["rows"] == 48


def test_evaluate_rejects_sizes_below_one_naming_the_option(synth_world):
    data = str(synth_world / "test")
    with pytest.raises(SystemExit, match="--limit must be >= 1 .*got 0"):
        cli.main(["evaluate", "--task", "retrieval", "--model", str(synth_world), "--data", data, "--limit", "0"])
    with pytest.raises(SystemExit, match="--batch-size must be >= 1, got 0"):
        cli.main(["evaluate", "--task", "retrieval", "--model", str(synth_world), "--data", data,
                  "--batch-size", "0"])
    # the library functions (the bootstrap calls them directly) say the same
    with pytest.raises(ValueError, match="limit must be >= 1 .*got 0"):
        evaluation.load_eval_images(data, limit=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        evaluation.evaluate_filter_clean(synth_world, data, batch_size=0)


def test_evaluate_shows_progress_bars_unless_told_not_to(tiny_models, synth_world, capsys):
    data = str(synth_world / "test")
    evaluation.evaluate_retrieval(tiny_models["itm"], data, batch_size=4, itm_rerank=2, progress=True)
    err = capsys.readouterr().err
    # each bar's first line shows its total: 16 images decoded, in 4 batches of 4 through ITC, the
    # 16 texts in one batch of 16, and ITM re-ranking of the 16 images in 4 batches
    for bar, total in (("decode", 16), ("itc images", 4), ("itc texts", 1), ("itm rerank", 4)):
        assert f"{bar}:   0%" in err and f" 0/{total} " in err.split(f"{bar}:", 1)[1].split("\r")[0], bar
    _run_evaluate(["--task", "retrieval", "--model", str(tiny_models["itm"]), "--data", data, "--no-progress"],
                  capsys)
    assert "decode:" not in capsys.readouterr().err
