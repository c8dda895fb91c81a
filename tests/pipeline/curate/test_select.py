"""The CapFilt selection rule (pipeline/select.py) as a pure function."""
import math

import pytest

from capfilt.pipeline.curate.select import (
    EMPTY_WEB_EMPTY_SYNTHETIC,
    EMPTY_WEB_NO_SYNTHETIC,
    NONE_PASSED_FILTER,
    select_captions,
)


def sel(web="a red circle", syn=("s0", "s1", "s2"), web_itm=0.9, syn_itm=(0.8, 0.2, 0.6),
        web_clip=0.10, syn_clip=(0.30, 0.90, 0.20), **kw):
    return select_captions(web, list(syn), web_itm, None if syn_itm is None else list(syn_itm),
                           web_clip, None if syn_clip is None else list(syn_clip), **kw)


def test_filter_then_rank_by_clip_keeps_top_k():
    # passing: web (0.9), s0 (0.8), s2 (0.6); s1 fails (0.2) despite the best CLIP score.
    out = sel(itm_threshold=0.5, keep_top=2)
    assert out.captions == ["s0", "s2"]  # CLIP 0.30, 0.20 beat web's 0.10
    assert out.sources == ["synthetic", "synthetic"]
    assert out.keep and out.drop_reason is None


def test_threshold_is_inclusive_and_keep_top_bounds():
    out = sel(syn_itm=(0.5, 0.49999, 0.2), itm_threshold=0.5, keep_top=5)
    assert out.captions == ["s0", "a red circle"]
    assert out.sources == ["synthetic", "web"]


def test_web_caption_can_win():
    out = sel(web_clip=0.95, keep_top=1)
    assert out.captions == ["a red circle"] and out.sources == ["web"]


def test_none_passed_filter():
    out = sel(web_itm=0.1, syn_itm=(0.2, 0.3, 0.4), itm_threshold=0.5)
    assert not out.keep and out.captions == [] and out.sources == []
    assert out.drop_reason == NONE_PASSED_FILTER


def test_no_filter_ablation_ranks_every_candidate():
    out = sel(web_itm=None, syn_itm=None, use_filter=False, keep_top=2)
    assert out.captions == ["s1", "s0"]  # CLIP 0.90, 0.30


def test_no_synthetic_ablation():
    out = sel(syn=(), syn_itm=(), syn_clip=(), keep_top=2)
    assert out.captions == ["a red circle"] and out.sources == ["web"]
    dropped = sel(syn=(), syn_itm=(), syn_clip=(), web_itm=0.1)
    assert dropped.drop_reason == NONE_PASSED_FILTER


def test_empty_web_caption_reasons():
    no_syn = sel(web="", syn=(), syn_itm=(), syn_clip=(), web_itm=None, web_clip=None)
    assert not no_syn.keep and no_syn.drop_reason == EMPTY_WEB_NO_SYNTHETIC
    none_web = sel(web=None, syn=(), syn_itm=(), syn_clip=(), web_itm=None, web_clip=None)
    assert none_web.drop_reason == EMPTY_WEB_NO_SYNTHETIC
    empty_syn = sel(web="", syn=("", ""), syn_itm=(0.9, 0.9), syn_clip=(0.1, 0.2), web_itm=None, web_clip=None)
    assert empty_syn.drop_reason == EMPTY_WEB_EMPTY_SYNTHETIC
    # An empty web caption with a good synthetic one is kept on the synthetic caption.
    syn_only = sel(web="", web_itm=None, web_clip=None, keep_top=1)
    assert syn_only.captions == ["s0"] and syn_only.sources == ["synthetic"]


def test_identical_texts_selected_once_and_ties_keep_candidate_order():
    out = sel(syn=("a red circle", "x", "x"), syn_itm=(0.9, 0.9, 0.9), syn_clip=(0.10, 0.5, 0.5), keep_top=3)
    assert out.captions == ["x", "a red circle"]
    assert out.sources == ["synthetic", "web"]  # the web copy comes first in candidate order
    tie = sel(syn=("p", "q", "r"), syn_itm=(0.9, 0.9, 0.9), syn_clip=(0.5, 0.5, 0.5), web_clip=0.5, keep_top=2)
    assert tie.captions == ["a red circle", "p"]


def test_nan_scores_never_pass_and_rank_last():
    out = sel(syn_itm=(math.nan, 0.9, 0.9), syn_clip=(0.99, math.nan, 0.2), web_itm=0.1, keep_top=2)
    assert out.captions == ["s2", "s1"]


@pytest.mark.parametrize("bad", [dict(keep_top=0), dict(syn_itm=(0.1,)), dict(syn_clip=(0.1, 0.2)),
                                 dict(syn_itm=None), dict(syn_clip=None)])
def test_inconsistent_input_raises(bad):
    with pytest.raises(ValueError):
        sel(**bad)
