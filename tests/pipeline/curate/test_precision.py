"""Precision policy and the fp32 check of bf16 decisions (pipeline/curate/precision.py, pipeline/select.py):
which model runs in bf16, when an image is re-scored in fp32, and that checked bf16 scoring makes
the decisions fp32 makes, on tiny models with bf16 forced on (native or emulated)."""
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from capfilt.model.inference import device as dev
from capfilt.pipeline.curate import precision as pr
from capfilt.pipeline.curate.select import close_clip_ranking, near_itm_threshold, select_captions

CPU = torch.device("cpu")


def test_auto_is_checked_bf16_only_where_the_hardware_has_it(monkeypatch, caplog):
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: True)
    assert pr.resolve_precision("auto", "cpu") == "bf16-checked"
    assert pr.resolve_precision("bf16", "cpu") == "bf16"
    assert pr.resolve_precision("fp32", "cpu") == "fp32"
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: False)
    assert pr.resolve_precision("auto", "cpu") == "fp32"
    with caplog.at_level("WARNING"):
        assert pr.resolve_precision("bf16-checked", "cpu") == "fp32"
    assert "no native bf16" in caplog.text
    with pytest.raises(ValueError, match="'fp16'"):
        pr.resolve_precision("fp16", "cpu")


def test_the_captioner_stays_fp32_when_checked():
    assert [pr.model_bf16("bf16-checked", s) for s in ("caption", "filter", "rank")] == [False, True, True]
    assert [pr.model_bf16("bf16", s) for s in ("caption", "filter", "rank")] == [True, True, True]
    assert [pr.model_bf16("fp32", s) for s in ("caption", "filter", "rank")] == [False, False, False]
    with pytest.raises(ValueError, match="'auto'"):
        pr.model_bf16("auto", "filter")  # must be resolved on the worker first
    with pytest.raises(ValueError, match="'select'"):
        pr.model_bf16("bf16", "select")


def test_near_itm_threshold_is_inclusive_and_ignores_missing_scores():
    assert near_itm_threshold([0.1, 0.515], 0.5, 0.02)
    assert near_itm_threshold([0.485], 0.5, 0.02)
    assert near_itm_threshold([0.75], 0.5, 0.25) and near_itm_threshold([0.25], 0.5, 0.25)  # exact in binary
    assert not near_itm_threshold([0.1, 0.53, 0.47], 0.5, 0.02)
    assert not near_itm_threshold([None, math.nan], 0.5, 0.02)
    with pytest.raises(ValueError, match="-0.1"):
        near_itm_threshold([0.5], 0.5, -0.1)


def close(syn_clip, syn_itm=(0.9, 0.9, 0.9, 0.9), web_clip=0.0, web_itm=0.9, keep_top=2, margin=0.01, syn=None):
    syn = syn or [f"s{i}" for i in range(len(syn_clip))]
    return close_clip_ranking(["web"] + syn, [web_itm] + list(syn_itm)[:len(syn)], [web_clip] + list(syn_clip),
                              margin=margin, itm_threshold=0.5, keep_top=keep_top)


def test_close_clip_ranking_looks_at_the_selected_and_the_first_left_out():
    assert not close([0.50, 0.40, 0.30, 0.29])  # ranks 1-3 are 0.1 apart; rank 3 vs 4 does not matter
    assert close([0.50, 0.40, 0.385, 0.1])  # rank 2 vs 3 within 2 * 0.01: the selected set could change
    assert close([0.50, 0.49, 0.30, 0.1])  # ranks 1 and 2 could swap: the selected order could change
    assert not close([0.50, 0.40, 0.385, 0.1], keep_top=1)
    # a caption that fails the ITM threshold is not in the ranking, however close its CLIP score
    assert not close([0.50, 0.40, 0.395, 0.1], syn_itm=(0.9, 0.9, 0.1, 0.9))
    # the same text twice ranks once (rule 3): its copy is no neighbour
    assert not close([0.50, 0.50, 0.30, 0.1], syn=["a", "a", "b", "c"])
    # a single passing caption cannot be reordered
    assert not close([0.50], syn_itm=(0.9,), web_itm=0.1)


@dataclass
class FakeScores:
    itm: np.ndarray
    itc: np.ndarray


class FakeFilter:
    """bf16 scores = fp32 scores + 0.005; records which images each call scored."""

    def __init__(self, fp32_itm):
        self.fp32_itm = fp32_itm
        self.bf16 = True
        self.calls = []

    def score(self, images, captions, bf16=None):
        use = self.bf16 if bf16 is None else bf16
        self.calls.append((list(images), use))
        shift = 0.005 if use else 0.0
        return [FakeScores(np.asarray(self.fp32_itm[i]) + shift, np.zeros(len(c))) for i, c in zip(images, captions)]


def test_checked_filter_rescores_only_the_images_near_the_threshold():
    fp32 = {0: [0.9, 0.1], 1: [0.51, 0.2], 2: [0.3, 0.485]}
    model = FakeFilter(fp32)
    caps = [["a", "b"]] * 3
    out = pr.checked_filter_scores(model, [0, 1, 2], caps, check=True, itm_threshold=0.5, margin=0.02)
    assert out.rescored == [1, 2]
    assert model.calls == [([0, 1, 2], True), ([1, 2], False)]
    np.testing.assert_allclose(out.scores[0].itm, [0.905, 0.105])  # far from 0.5: the bf16 scores stay
    np.testing.assert_allclose(out.scores[1].itm, fp32[1])
    np.testing.assert_allclose(out.scores[2].itm, fp32[2])
    model.calls.clear()
    unchecked = pr.checked_filter_scores(model, [0, 1, 2], caps, check=False, itm_threshold=0.5)
    assert unchecked.rescored == [] and model.calls == [([0, 1, 2], True)]


def test_the_check_runs_on_a_model_shared_across_processes(tmp_path):
    """--share-model-across-processes hands the handlers a proxy (Beam's MultiProcessShared),
    which has the model's methods but not its attributes: the check uses methods only."""
    import uuid

    from apache_beam.utils.multi_process_shared import MultiProcessShared

    fp32 = {0: [0.9, 0.1], 1: [0.51, 0.2], 2: [0.3, 0.485]}
    model = FakeFilter(fp32)
    proxy = MultiProcessShared(lambda: model, tag=f"capfilt-test-{uuid.uuid4().hex}", path=str(tmp_path),
                               always_proxy=True).acquire()
    with pytest.raises(AttributeError):
        proxy.bf16  # noqa: B018 - what a proxy does with an attribute
    out = pr.checked_filter_scores(proxy, [0, 1, 2], [["a", "b"]] * 3, check=True, itm_threshold=0.5, margin=0.02)
    assert out.rescored == [1, 2] and model.calls == [([0, 1, 2], True), ([1, 2], False)]
    np.testing.assert_allclose(out.scores[1].itm, fp32[1])


def test_a_model_goes_fp32_first_when_bf16_does_not_pay_and_probes_again():
    model = FakeFilter({0: [0.5], 1: [0.5], 2: [0.9]})  # two of three images near the threshold
    caps = [["a"]] * 3
    first = pr.checked_filter_scores(model, [0, 1, 2], caps, check=True, itm_threshold=0.5)
    assert first.rescored == [0, 1] and not first.fp32_first  # 2/3 > BREAK_EVEN
    model.calls.clear()
    for batch in range(2, 2 * pr.PROBE_EVERY + 1):
        out = pr.checked_filter_scores(model, [0, 1, 2], caps, check=True, itm_threshold=0.5)
        probe = batch % pr.PROBE_EVERY == 0
        assert out.fp32_first is not probe
        assert out.rescored == ([0, 1] if probe else [0, 1, 2])
        np.testing.assert_allclose(out.scores[2].itm, [0.905] if probe else [0.9])
    assert [use for _, use in model.calls].count(True) == 2  # the two probes
    # once a probe finds bf16 paying again, bf16 comes first again
    model.fp32_itm = {0: [0.9], 1: [0.9], 2: [0.9]}
    while pr.checked_filter_scores(model, [0, 1, 2], caps, check=True, itm_threshold=0.5).fp32_first:
        pass
    again = pr.checked_filter_scores(model, [0, 1, 2], caps, check=True, itm_threshold=0.5)
    assert again.rescored == [] and not again.fp32_first


class FakeRanker:
    def __init__(self, fp32_clip):
        self.fp32_clip, self.bf16, self.calls = fp32_clip, True, []

    def score(self, images, captions, bf16=None):
        use = self.bf16 if bf16 is None else bf16
        self.calls.append((list(images), use))
        return [np.asarray(self.fp32_clip[i]) - (0.004 if use else 0.0) for i in images]


def test_checked_rank_uses_the_itm_scores_and_candidate_order():
    clip = {0: [0.30, 0.20, 0.10], 1: [0.30, 0.295, 0.10], 2: [0.20, 0.10, 0.095]}
    model = FakeRanker(clip)
    caps = [["w", "s0", "s1"], ["w", "s0", "s1"], ["s0", "s1", "s2"]]
    itm = [[0.9, 0.9, 0.9], [0.9, 0.1, 0.9], [0.9, 0.9, 0.9]]
    out = pr.checked_rank_scores(model, [0, 1, 2], caps, itm, check=True,
                                 itm_threshold=0.5, keep_top=2, margin=0.01)
    # image 1: s0 (0.295) is close to w but fails the filter; image 2: ranks 2 and 3 are 0.005 apart
    assert out.rescored == [2]
    np.testing.assert_allclose(out.scores[2], clip[2])
    np.testing.assert_allclose(out.scores[1], np.asarray(clip[1]) - 0.004)
    no_filter = pr.checked_rank_scores(FakeRanker(clip), [0, 1, 2], caps, None, check=True,
                                       itm_threshold=0.5, keep_top=2, margin=0.01)
    assert no_filter.rescored == [1, 2]  # without a filter, s0 of image 1 competes


def test_handlers_load_checked_bf16_as_documented(monkeypatch, tiny_models):
    """Under bf16-checked (here: auto on a machine that reports native bf16) the captioner loads
    in fp32, the filter in bf16, the ranker with a bf16 image tower and an fp32 text tower."""
    from capfilt.pipeline.curate import inference as handlers
    from capfilt.pipeline.curate.options import CurateConfig

    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(handlers, "_LOADED", {})  # no model cached by other tests
    cfg = CurateConfig(inputs=("x",), out="y", captioner=str(tiny_models["captioner"]), filter=str(tiny_models["itm"]),
                       clip=str(tiny_models["clip"]), device="cpu")
    assert cfg.precision == "auto"
    captioner = handlers.CaptionHandler(cfg.captioner, cfg).load_model()
    flt = handlers.FilterHandler(cfg.filter, cfg).load_model()
    ranker = handlers.RankHandler(cfg.clip, cfg).load_model()
    assert (captioner.bf16, flt.bf16, ranker.bf16, ranker.bf16_text) == (False, True, True, False)
    fp32 = cfg.replace(precision="fp32")
    assert handlers.RankHandler(fp32.clip, fp32).load_model().bf16 is False
    # resolved once per handler, and again by a worker that unpickles it
    import pickle

    handler = handlers.FilterHandler(cfg.filter, cfg)
    assert handler.precision() == "bf16-checked"
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: False)
    assert handler.precision() == "bf16-checked"
    assert pickle.loads(pickle.dumps(handler)).precision() == "fp32"


# -- on tiny models with bf16 forced on ------------------------------------------------------------

@pytest.fixture(scope="module")
def scored(tiny_models, synth_world):
    """fp32 and bf16 scores of the web split's images with their web caption and 3 captions of
    other images (so both matching and non-matching pairs are scored)."""
    from capfilt.model.inference.filter import load_filter
    from capfilt.model.inference.ranker import ClipRanker
    from capfilt.transforms.image import ImageDecodeError, decode_image
    from capfilt.transforms.text import clean_caption

    torch.set_num_threads(1)
    table = pa.concat_tables(pq.read_table(p) for p in sorted((synth_world / "web").glob("*.parquet")))
    images, web = [], []
    for row in table.to_pylist():
        try:
            images.append(decode_image(row["jpg"]))
        except ImageDecodeError:
            continue
        web.append(clean_caption(row["caption"]) or "an image")
    caps = [[web[i]] + [web[(i + k) % len(web)] for k in (1, 2, 3)] for i in range(len(images))]
    flt = load_filter(tiny_models["itm"], device="cpu")
    ranker = ClipRanker.load(str(tiny_models["clip"]), device="cpu")
    flt.bf16 = ranker.bf16 = True  # forced: emulated where the CPU has no bf16
    ranker.bf16_text = False  # as bf16-checked loads it (RankHandler)
    itm32 = [s.itm for s in flt.score(images, caps, bf16=False)]
    clip32 = ranker.score(images, caps, bf16=False)
    itm16 = [s.itm for s in flt.score(images, caps)]
    clip16 = ranker.score(images, caps)
    return {"images": images, "caps": caps, "flt": flt, "ranker": ranker,
            "itm32": itm32, "clip32": clip32, "itm16": itm16, "clip16": clip16}


def test_bf16_scores_differ_from_fp32_by_less_than_the_margins(scored):
    itm_diff = max(float(np.abs(a - b).max()) for a, b in zip(scored["itm32"], scored["itm16"]))
    clip_diff = max(float(np.abs(a - b).max()) for a, b in zip(scored["clip32"], scored["clip16"]))
    assert 0 < itm_diff < pr.DEFAULT_ITM_MARGIN
    assert 0 < clip_diff < pr.DEFAULT_CLIP_MARGIN


def _decisions(caps, itm, clip, threshold):
    return [(s.captions, s.keep) for s in (
        select_captions(c[0], c[1:], float(i[0]), list(i[1:]), float(k[0]), list(k[1:]), itm_threshold=threshold)
        for c, i, k in zip(caps, itm, clip))]


def test_checked_bf16_makes_the_fp32_decisions_at_a_threshold_that_splits(scored):
    caps, images = scored["caps"], scored["images"]
    values = np.sort(np.concatenate(scored["itm32"]))
    threshold = float(values[len(values) // 2])  # the median: many scores near it
    # The random tiny filter's scores all lie within 0.015 of each other, so the default margin
    # would send every image to fp32; a margin of 0.002 (> 2x the bf16 error here) leaves work
    # to both paths.
    itm_error = max(float(np.abs(a - b).max()) for a, b in zip(scored["itm32"], scored["itm16"]))
    assert itm_error < 0.001
    flt = pr.checked_filter_scores(scored["flt"], images, caps, check=True, itm_threshold=threshold, margin=0.002)
    itm = [s.itm for s in flt.scores]
    rank = pr.checked_rank_scores(scored["ranker"], images, caps, itm, check=True,
                                  itm_threshold=threshold, keep_top=2)
    expected = _decisions(caps, scored["itm32"], scored["clip32"], threshold)
    assert _decisions(caps, itm, rank.scores, threshold) == expected
    assert 0 < len(flt.rescored) < len(images)  # the check did work, and not on every image
    for b in flt.rescored:  # re-scored images carry fp32 scores
        np.testing.assert_allclose(itm[b], scored["itm32"][b], atol=1e-5)
    for b in rank.rescored:
        np.testing.assert_allclose(rank.scores[b], scored["clip32"][b], atol=1e-5)
