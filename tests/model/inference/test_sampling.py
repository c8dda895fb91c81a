"""Seeded per-row nucleus sampling (model/sampling.py), tested directly on the logits processor."""
import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from capfilt.model.inference.sampling import SeededNucleusSampler, gumbel_noise, nucleus_argmax, row_seeds, step_seed
from capfilt.transforms.seeding import sample_seed

# Probabilities chosen so the nucleus boundary is unambiguous: with top_p=0.8 the tokens kept
# are 0.4, 0.25, 0.15 (mass before the third is 0.65 < 0.8, before the fourth 0.80 >= 0.8).
PROBS = np.array([0.05, 0.4, 0.02, 0.25, 0.15, 0.08, 0.03, 0.02])


def _draw(probs, top_p, seeds, step=5):
    """Row-wise argmax of the sampler's scores for identical logits in every row."""
    logits = torch.log(torch.tensor(probs, dtype=torch.float32)).expand(len(seeds), -1).clone()
    input_ids = torch.zeros(len(seeds), step, dtype=torch.long)
    sampler = SeededNucleusSampler(seeds, top_p=top_p)
    return sampler(input_ids, logits).argmax(dim=-1).numpy()


def _truncated_softmax(probs, top_p):
    """Reference nucleus distribution: keep a token while the mass ranked above it is < top_p."""
    order = np.argsort(-probs, kind="stable")
    mass_before = np.concatenate([[0.0], np.cumsum(probs[order])[:-1]])
    keep = np.zeros_like(probs, dtype=bool)
    keep[order[mass_before < top_p]] = True
    out = np.where(keep, probs, 0.0)
    return out / out.sum()


@pytest.mark.parametrize("top_p", [0.8, 1.0])
def test_empirical_distribution_matches_truncated_softmax(top_p):
    draws = 20000
    tokens = _draw(PROBS, top_p, seeds=range(draws))
    counts = np.bincount(tokens, minlength=len(PROBS))
    expected = _truncated_softmax(PROBS, top_p)
    # tokens outside the nucleus are never drawn
    assert counts[expected == 0].sum() == 0
    empirical = counts / draws
    tv_distance = 0.5 * np.abs(empirical - expected).sum()
    assert tv_distance < 0.015, (empirical, expected)
    support = expected > 0
    assert chisquare(counts[support], expected[support] * draws).pvalue > 1e-3


def test_nucleus_keeps_exactly_the_reference_tokens():
    tokens = set(_draw(PROBS, 0.8, seeds=range(3000)).tolist())
    assert tokens == {1, 3, 4}


def test_top_p_zero_is_greedy():
    torch.manual_seed(0)
    logits = torch.randn(64, 50)
    sampler = SeededNucleusSampler(list(range(64)), top_p=0.0)
    out = sampler(torch.zeros(64, 3, dtype=torch.long), logits)
    assert torch.equal(out.argmax(dim=-1), logits.argmax(dim=-1))
    # only the top token is finite: the draw cannot be anything else
    assert torch.isfinite(out).sum(dim=-1).eq(1).all()


def test_same_seed_same_draw_and_rows_are_independent_of_their_batch():
    torch.manual_seed(1)
    logits = torch.randn(3, 40)
    ids = torch.zeros(3, 7, dtype=torch.long)
    seeds = [11, 22, 33]
    full = SeededNucleusSampler(seeds, 0.9)(ids, logits)
    again = SeededNucleusSampler(seeds, 0.9)(ids, logits)
    assert torch.equal(full, again)
    # rows 2 and 0 alone, in another order, get exactly their scores from the full batch
    sub = SeededNucleusSampler([33, 11], 0.9)(ids[[2, 0]], logits[[2, 0]])
    assert torch.equal(sub, full[[2, 0]])


def test_seeds_and_steps_change_the_draw():
    probs = np.full(16, 1 / 16)
    by_seed = _draw(probs, 1.0, seeds=range(200), step=4)
    assert len(set(by_seed.tolist())) > 8  # different seeds give different tokens
    step_a = _draw(probs, 1.0, seeds=range(200), step=4)
    step_b = _draw(probs, 1.0, seeds=range(200), step=5)
    assert np.array_equal(by_seed, step_a)
    assert (step_a != step_b).mean() > 0.5  # a new step is a new draw


def test_gumbel_noise_is_standard_gumbel():
    noise = gumbel_noise(list(range(50)), step=3, vocab_size=400, device=torch.device("cpu"))
    assert noise.shape == (50, 400) and noise.dtype == torch.float32
    # Gumbel(0, 1): mean = Euler-Mascheroni constant, variance = pi^2 / 6
    assert abs(noise.mean().item() - 0.5772) < 0.02
    assert abs(noise.var().item() - np.pi ** 2 / 6) < 0.05


def test_row_seeds_are_image_major_sample_seeds():
    seeds = row_seeds(7, ["a", "b"], 3)
    assert seeds == [sample_seed(7, k, i) for k in ("a", "b") for i in range(3)]
    assert len(set(seeds)) == 6
    assert step_seed(seeds[0], 1) != step_seed(seeds[0], 2)
    assert 0 <= step_seed(2**63 - 1, 10**6) < 2**63


def test_input_errors():
    with pytest.raises(ValueError, match="top_p"):
        SeededNucleusSampler([1], top_p=1.5)
    with pytest.raises(ValueError, match="at least one"):
        SeededNucleusSampler([], top_p=0.9)
    sampler = SeededNucleusSampler([1, 2], top_p=0.9)
    with pytest.raises(ValueError, match="3 rows but the sampler was given 2 seeds"):
        sampler(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 10))


@pytest.mark.parametrize("scale", [0.05, 1.0, 4.0])  # flat (random weights) to peaked (trained)
def test_candidate_search_draws_what_the_sorting_warper_draws(scale):
    torch.manual_seed(2)
    rows, vocab = 96, 3000
    logits = torch.randn(rows, vocab) * scale
    logits[:, 5] = float("-inf")  # a banned token (min length bans [SEP])
    seeds = list(range(100, 100 + rows))
    ids = torch.zeros(rows, 9, dtype=torch.long)
    for top_p in (0.3, 0.9):
        sorted_way = SeededNucleusSampler(seeds, top_p)(ids, logits).argmax(dim=-1)
        candidates = SeededNucleusSampler(seeds, top_p, test_candidates=4)(ids, logits)
        assert torch.equal(candidates.argmax(dim=-1), sorted_way)
        assert torch.isfinite(candidates).sum(dim=-1).eq(1).all()  # only the drawn token is finite
        assert not bool((candidates.argmax(dim=-1) == 5).any())


def test_candidate_search_falls_back_to_the_warper_when_no_candidate_is_in_the_nucleus():
    # top_p 0.0 keeps only the most probable token; one candidate rarely is it
    torch.manual_seed(3)
    logits = torch.randn(64, 200) * 2.0
    ids = torch.zeros(64, 4, dtype=torch.long)
    probs = torch.softmax(logits, dim=-1)
    noise = gumbel_noise(list(range(64)), 4, 200, torch.device("cpu"))
    unresolved = nucleus_argmax(torch.log(probs), torch.log(probs) + noise, 0.0, candidates=1) < 0
    assert 0 < int(unresolved.sum()) < 64  # both kinds of row occur
    out = SeededNucleusSampler(list(range(64)), 0.0, test_candidates=1)(ids, logits)
    assert torch.equal(out.argmax(dim=-1), logits.argmax(dim=-1))


def test_test_candidates_is_validated():
    with pytest.raises(ValueError, match="test_candidates"):
        SeededNucleusSampler([1], 0.9, test_candidates=-1)


# --- top-k before top-p, as transformers 4.15 applied them under BLIP's generate ------------------

def _reference_top_k_top_p(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """The filter written out by hand: keep the top_k largest logits, renormalise, keep a token
    while the mass ranked above it is below top_p, renormalise."""
    probs = np.exp(logits - logits.max())
    if top_k:
        probs[np.argsort(-logits, kind="stable")[top_k:]] = 0.0
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    mass_above = np.concatenate([[0.0], np.cumsum(probs[order])[:-1]])
    keep = np.zeros(len(probs), dtype=bool)
    keep[order[(mass_above < top_p) & (probs[order] > 0)]] = True
    out = np.where(keep, probs, 0.0)
    return out / out.sum()


def _flat_logits(vocab=200, seed=4):
    """Nearly flat logits (a random model's): the 0.9 nucleus holds far more than 50 tokens."""
    rng = np.random.default_rng(seed)
    return (rng.permutation(vocab) * 0.004 + rng.normal(0, 1e-3, vocab)).astype(np.float32)


@pytest.mark.parametrize("logits, top_k, support", [
    (_flat_logits(), 50, 45),  # top-k cuts to 50, then the 0.9 nucleus of those 50 keeps 45
    (_flat_logits(), 0, 172),  # top-k off: the 0.9 nucleus of a flat vocabulary is far wider than 50
    (np.log(PROBS.astype(np.float32)), 50, 5),  # a peaked row: top-k keeps all 8, top-p cuts to 5
])
def test_next_token_probabilities_equal_the_hand_computed_top_k_then_top_p_filter(logits, top_k, support):
    sampler = SeededNucleusSampler([1], top_p=0.9, top_k=top_k)
    got = sampler.truncated_log_probs(torch.zeros(1, 4, dtype=torch.long), torch.tensor(logits)[None]).exp()[0]
    want = _reference_top_k_top_p(logits.astype(np.float64), top_k, 0.9)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    assert int((want > 0).sum()) == int((got > 0).sum()) == support


def test_draws_follow_the_top_k_then_top_p_distribution_and_the_candidate_path_agrees():
    logits = _flat_logits(vocab=120, seed=5)
    want = _reference_top_k_top_p(logits.astype(np.float64), 50, 0.9)
    draws = 20000
    seeds = list(range(draws))
    batch = torch.tensor(logits)[None].expand(draws, -1).clone()
    ids = torch.zeros(draws, 6, dtype=torch.long)
    sorted_way = SeededNucleusSampler(seeds, 0.9, top_k=50)(ids, batch).argmax(dim=-1)
    candidates = SeededNucleusSampler(seeds, 0.9, top_k=50, test_candidates=8)(ids, batch).argmax(dim=-1)
    assert torch.equal(candidates, sorted_way)
    counts = np.bincount(sorted_way.numpy(), minlength=len(logits))
    assert counts[want == 0].sum() == 0  # nothing outside the top-50 nucleus is ever drawn
    assert 0.5 * np.abs(counts / draws - want).sum() < 0.05
    assert chisquare(counts[want > 0], want[want > 0] * draws).pvalue > 1e-3


def test_top_k_draws_are_reproducible_per_row_and_top_k_one_is_greedy():
    torch.manual_seed(5)
    logits = torch.randn(4, 300) * 0.1
    ids = torch.zeros(4, 5, dtype=torch.long)
    seeds = [7, 8, 9, 10]
    full = SeededNucleusSampler(seeds, 0.9, top_k=50)(ids, logits)
    assert torch.equal(full, SeededNucleusSampler(seeds, 0.9, top_k=50)(ids, logits))
    alone = SeededNucleusSampler([9], 0.9, top_k=50)(ids[2:3], logits[2:3])
    assert torch.equal(alone, full[2:3])  # a row's draw does not depend on its batch
    greedy = SeededNucleusSampler(seeds, 0.9, top_k=1, test_candidates=4)(ids, logits).argmax(dim=-1)
    assert torch.equal(greedy, logits.argmax(dim=-1))


@pytest.mark.parametrize("top_k", [-1, 2.5, True])
def test_top_k_is_validated(top_k):
    with pytest.raises(ValueError, match="top_k must be an int >= 0"):
        SeededNucleusSampler([1], 0.9, top_k=top_k)
