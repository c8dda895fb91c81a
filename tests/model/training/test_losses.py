"""model/losses.py: each loss against a value computed by hand on a tiny case, hard-negative
sampling, and the ITG attention mask (structurally and through a real Q-Former)."""
import math

import pytest
import torch

from capfilt.model.training import losses as L


def _ce(logits_row, target):
    """-log softmax(logits_row)[target], by hand."""
    return -(logits_row[target] - math.log(sum(math.exp(v) for v in logits_row)))


def test_itc_loss_hand_computed():
    sim_i2t = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    sim_t2i = torch.tensor([[0.0, 1.0], [3.0, 0.0]])
    pos = torch.eye(2, dtype=torch.bool)  # one positive per row, on the diagonal
    # i2t rows: -log(e^2 / (e^2 + 1)) and -log(1/2); t2i rows: -log(1 / (1 + e)) and -log(1 / (e^3 + 1))
    i2t = (math.log(1 + math.exp(-2)) + math.log(2)) / 2
    t2i = (math.log(1 + math.e) + math.log(math.exp(3) + 1)) / 2
    got = L.itc_loss(sim_i2t, sim_t2i, pos, pos)
    assert got.item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)


def test_itc_soft_targets_and_multiple_positives():
    sim = torch.tensor([[1.0, 0.0, -1.0]])
    teacher = torch.tensor([[0.0, 0.0, math.log(2.0)]])  # softmax = (1/4, 1/4, 1/2)
    pos = torch.tensor([[True, True, False]])  # two true matches share the hard target
    alpha = 0.4
    target = [alpha / 4 + 0.6 / 2, alpha / 4 + 0.6 / 2, alpha / 2]
    log_z = math.log(math.e + 1 + math.exp(-1))
    expected = -sum(t * (s - log_z) for t, s in zip(target, [1.0, 0.0, -1.0]))
    got = L.itc_loss(sim, sim, pos, pos, teacher, teacher, alpha)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    assert L.itc_targets(pos, teacher, alpha).sum().item() == pytest.approx(1.0)


def test_itm_loss_hand_computed():
    pos = torch.tensor([[0.0, 2.0]])  # label 1 (match)
    neg = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # label 0
    expected = (_ce([0.0, 2.0], 1) + _ce([1.0, 0.0], 0) + _ce([0.0, 0.0], 0)) / 3
    assert L.itm_loss(pos, neg).item() == pytest.approx(expected, abs=1e-6)


def test_lm_loss_with_label_smoothing_hand_computed():
    # one sequence of 3 positions over a vocabulary of 3; position t predicts token t+1
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]]])
    labels = torch.tensor([[-100, 1, 2]])  # bos is never a target; targets 1 then 2
    eps = 0.1

    def smoothed(row, target):  # (1 - eps) * CE(target) + eps * mean over the vocabulary of CE(v)
        return (1 - eps) * _ce(row, target) + eps * sum(_ce(row, v) for v in range(3)) / 3

    expected = (smoothed([2.0, 0.0, 0.0], 1) + smoothed([0.0, 1.0, 0.0], 2)) / 2
    assert L.lm_loss(logits, labels, eps).item() == pytest.approx(expected, abs=1e-6)
    # padding / prompt targets are ignored, and a normaliser replaces the local token count
    labels_pad = torch.tensor([[-100, 1, -100]])
    assert L.lm_loss(logits, labels_pad, 0.0).item() == pytest.approx(_ce([2.0, 0.0, 0.0], 1), abs=1e-6)
    assert L.lm_loss(logits, labels, eps, normalizer=4.0).item() == pytest.approx(expected / 2, abs=1e-6)


def test_lm_labels_mask_padding_and_prompt():
    ids = torch.tensor([[5, 6, 7, 8, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    assert L.lm_labels(ids, mask, prefix_len=2).tolist() == [[-100, -100, 7, 8, -100]]


def test_hard_negatives_never_the_positive():
    torch.manual_seed(0)
    n = 6
    sim = torch.randn(n, n) * 3 + torch.eye(n) * 20  # the positive is by far the most similar
    positive = torch.eye(n, dtype=torch.bool)
    positive[0, 3] = positive[3, 0] = True  # rows 0 and 3 share a caption: a true match too
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([L.sample_hard_negatives(sim, positive, gen) for _ in range(200)])  # (200, n)
    for row in range(n):
        assert not positive[row, draws[:, row]].any()
    # the draw follows the softmax of the similarities over the negatives only
    w = L.negative_weights(sim, positive)
    neg = ~positive[1]
    expected = torch.zeros(n)
    expected[neg] = torch.softmax(sim[1, neg], dim=0)
    assert torch.allclose(w[1], expected, atol=1e-6)
    many = torch.multinomial(w[1], 2000, replacement=True, generator=gen)
    freq = torch.bincount(many, minlength=n).float() / len(many)
    assert torch.allclose(freq, expected, atol=0.045)  # 4 standard errors at 2000 draws


def test_hard_fraction_mixes_hard_and_uniform_rows():
    n, draws = 5, 4000
    sim = torch.zeros(n, n)
    sim[:, 1] = 30.0  # column 1 is every other row's hardest negative, by far
    positive = torch.eye(n, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    hard = torch.stack([L.sample_hard_negatives(sim, positive, gen) for _ in range(200)])
    assert (hard[:, [0, 2, 3, 4]] == 1).all()  # BLIP (fraction 1): always the hardest
    mixed = torch.stack([L.sample_hard_negatives(sim, positive, gen, hard_fraction=0.5) for _ in range(draws)])
    rows = mixed[:, 0]  # row 0: hard half the time (column 1), else uniform over columns 1-4
    assert (rows != 0).all()
    # P(column 1) = 0.5 + 0.5 / 4; each other negative 0.5 / 4 (4 standard errors at 4000 draws)
    freq = torch.bincount(rows, minlength=n).float() / draws
    assert torch.allclose(freq, torch.tensor([0.0, 0.625, 0.125, 0.125, 0.125]), atol=0.03)
    uniform = torch.stack([L.sample_hard_negatives(sim, positive, gen, hard_fraction=0.0) for _ in range(draws)])
    freq = torch.bincount(uniform[:, 0], minlength=n).float() / draws
    assert torch.allclose(freq, torch.tensor([0.0, 0.25, 0.25, 0.25, 0.25]), atol=0.03)
    with pytest.raises(ValueError, match="hard_fraction must be in \\[0, 1\\], got 1.5"):
        L.sample_hard_negatives(sim, positive, gen, hard_fraction=1.5)


def test_hard_negative_fallback_when_everything_matches():
    sim = torch.zeros(2, 2)
    w = L.negative_weights(sim, torch.ones(2, 2, dtype=torch.bool))
    assert (w > 0).all()


def test_max_over_queries_hand_computed():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one image, two queries
    t = torch.tensor([[0.6, 0.8], [-1.0, 0.0]])
    assert torch.allclose(L.max_over_queries(q, t), torch.tensor([[0.8, 0.0]]))
    assert torch.allclose(L.max_over_queries_t2i(t, q), torch.tensor([[0.8], [0.0]]))


def test_itg_mask_structure():
    text_mask = torch.tensor([[1, 1, 1, 0]])
    q = 3
    allowed = L.itg_allowed(q, text_mask)[0]  # (7, 7)
    assert allowed[:q, :q].all()
    assert not allowed[:q, q:].any(), "a query sees text"
    assert allowed[q:, :q].all(), "text must see every query"
    text_part = allowed[q:, q:]
    assert not torch.triu(text_part, diagonal=1).any(), "text sees a future token"
    assert not text_part[:, 3].any(), "padding is attended"
    add = L.additive_mask(L.itg_allowed(q, text_mask), torch.float32)
    assert add.shape == (1, 1, 7, 7) and add[0, 0, 0, q].item() == torch.finfo(torch.float32).min


def test_itg_mask_in_a_real_qformer():
    """Through transformers' Q-Former: changing text never moves query outputs, and changing a
    later token never moves earlier text outputs."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    torch.manual_seed(0)
    cfg = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             encoder_hidden_size=16, use_qformer_text_input=True, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0, cross_attention_frequency=1)
    qformer = Blip2QFormerModel(cfg).eval()
    q, t = 4, 5
    image = torch.randn(1, 7, 16)
    queries = torch.randn(1, q, 32)
    text_a = torch.randn(1, t, 32)
    text_b = text_a.clone()
    text_b[:, 3:] = torch.randn(1, 2, 32)  # differ from position 3 on
    mask = L.additive_mask(L.itg_allowed(q, torch.ones(1, t)), torch.float32)

    def run(text):
        return qformer(query_embeds=torch.cat([queries, text], 1), query_length=q, attention_mask=mask,
                       encoder_hidden_states=image).last_hidden_state

    a, b = run(text_a), run(text_b)
    assert torch.allclose(a[:, :q], b[:, :q], atol=1e-6)  # queries never see text
    assert torch.allclose(a[:, q:q + 3], b[:, q:q + 3], atol=1e-6)  # no text sees the future
    assert not torch.allclose(a[:, q + 3:], b[:, q + 3:], atol=1e-3)
    alone = qformer(query_embeds=queries, query_length=q, encoder_hidden_states=image).last_hidden_state
    assert torch.allclose(a[:, :q], alone, atol=1e-5)  # = the image-only pass ITC uses
