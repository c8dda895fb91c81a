"""Training as the reference code trains (salesforce/BLIP 056a169, salesforce/LAVIS 506965b), each
rule against a value computed independently from the reference formula on a tiny case:

* BLIP-2 ITC with label smoothing 0.1 in both directions (LAVIS blip2_qformer.py, lines 170-173);
* fresh BLIP-2 query tokens drawn from N(0, 0.02) (LAVIS blip2.py, `init_Qformer`);
* the ITM negative draw of BLIP pretraining (blip_pretrain.py, lines 154-158: softmax + 1e-4,
  positive zeroed; online rows against momentum columns, lines 132-133) and of retrieval
  finetuning (blip_retrieval.py, lines 174-184: softmax over the non-matching pairs, online);
* the alpha ramp (pretrain.py, lines 57-58: two epochs; train_retrieval.py, lines 46-49: one).
"""
import json
import math

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from capfilt.jobs.cli import main
from capfilt.model.training import losses as L
from capfilt.model.training.data import ImageTextStream, SourceSpec, TrainPair, epoch_rows

VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
          "image_size": 32, "patch_size": 8}
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
MICRO_BLIP = {"vision_config": VISION, "text_config": TEXT, "image_text_hidden_size": 32, "projection_dim": 32}
MICRO_BLIP2 = {"vision_config": VISION, "qformer_config": dict(TEXT, encoder_hidden_size=32),
               "num_query_tokens": 4, "image_text_hidden_size": 32}
CAPTIONS = ["a red circle", "a blue square on the left", "a small green triangle", "a big yellow star",
            "two purple circles", "an orange square at the top"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(model, data, n=4):
    """A batch of `n` synthetic images with distinct keys and distinct captions (so the only
    positive of a row is its own pair, as in the reference code's pretraining)."""
    images = [s.image for s in ImageTextStream([SourceSpec(str(data))], seed=0).next_batch(n)]
    return model.collate([TrainPair(f"k{i}", image, CAPTIONS[i], "test") for i, image in enumerate(images)])


@torch.no_grad()
def _spread(*modules, std=0.05):
    """Perturb fresh weights (seeded), so that a random model's features differ from image to
    image and, with momentum, from its momentum encoders."""
    gen = torch.Generator().manual_seed(1)
    for module in modules:
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)


def _ce_smoothed(row, target, eps):
    """Cross-entropy of one row with label smoothing, by hand:
    (1 - eps) * -log p[target] + eps * mean over the classes of -log p[j]."""
    log_z = math.log(sum(math.exp(v) for v in row))
    nll = [log_z - v for v in row]
    return (1 - eps) * nll[target] + eps * sum(nll) / len(row)


# --- 1. BLIP-2 ITC label smoothing -----------------------------------------------------------

def test_itc_label_smoothing_is_cross_entropys():
    sim_i2t = torch.tensor([[3.0, 0.5, -1.0], [0.0, 2.0, 1.0], [1.5, -0.5, 0.5]])
    sim_t2i = torch.tensor([[2.5, 1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 4.0]])
    pos = torch.eye(3, dtype=torch.bool)
    by_hand = {eps: sum(_ce_smoothed(m[r].tolist(), r, eps) for m in (sim_i2t, sim_t2i) for r in range(3)) / 6
               for eps in (0.0, 0.1)}
    targets = torch.arange(3)
    for eps in (0.0, 0.1):
        torch_ce = (F.cross_entropy(sim_i2t, targets, label_smoothing=eps)
                    + F.cross_entropy(sim_t2i, targets, label_smoothing=eps)) / 2
        got = L.itc_loss(sim_i2t, sim_t2i, pos, pos, smoothing=eps)
        assert got.item() == pytest.approx(torch_ce.item(), abs=1e-6)
        assert got.item() == pytest.approx(by_hand[eps], abs=1e-6)
    assert by_hand[0.1] - by_hand[0.0] > 0.05  # smoothing moves this loss


def test_blip2_training_itc_is_lavis_smoothed_cross_entropy(tmp_path, synth_world, tiny_tokenizer):
    """The ITC loss of a BLIP-2 training step, against LAVIS's formula on the similarities
    transformers' own `Blip2ForImageTextRetrieval` ITC forward computes."""
    from capfilt.model.training.blip2 import Blip2TrainConfig, build_blip2

    model = build_blip2(Blip2TrainConfig(tasks=("itc",)), tmp_path, tokenizer_dir=tiny_tokenizer,
                        overrides=MICRO_BLIP2).eval()
    assert Blip2TrainConfig().itc_label_smoothing == 0.1
    _spread(model.model.qformer, model.model.text_projection, model.model.vision_projection, std=0.3)
    model.temp.data.fill_(0.01)  # sharpen the similarities of a random model (the clamp keeps >= 0.001)
    batch = _batch(model, synth_world / "test")
    with torch.no_grad():
        got = model(batch)["itc"]
        hf = model.model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"], use_image_text_matching_head=False)
    sim_i2t = hf.logits_per_image / model.temp  # (images, texts): the max over queries
    targets = torch.arange(len(sim_i2t))
    lavis = (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
             + F.cross_entropy(sim_i2t.T, targets, label_smoothing=0.1)) / 2
    unsmoothed = (F.cross_entropy(sim_i2t, targets) + F.cross_entropy(sim_i2t.T, targets)) / 2
    assert got.item() == pytest.approx(lavis.item(), abs=1e-5)
    assert abs(got.item() - unsmoothed.item()) > 1e-3


# --- 2. fresh BLIP-2 query tokens ------------------------------------------------------------

def test_fresh_blip2_queries_are_drawn_from_n_0_002(tmp_path, tiny_tokenizer):
    from capfilt.model.builders.tiny import init_model

    def queries(name, seed):
        init_model("blip2-itm", tmp_path / name, tiny_tokenizer, seed=seed)
        return load_file(str(tmp_path / name / "model.safetensors"))["query_tokens"][0]  # (Q, H)

    q = queries("a", 0)
    assert q.shape == (8, 128)  # the tiny config: 8 queries of width 128, 1024 values
    # the standard error of the std of 1024 normal draws is 0.02 / sqrt(2048) = 0.00044
    assert q.std().item() == pytest.approx(0.02, abs=0.002)
    assert abs(q.mean().item()) < 0.003
    distances = torch.cdist(q, q) + torch.eye(len(q)) * 1e9
    assert distances.min().item() > 0.15  # distinct: E||a - b|| = 0.02 * sqrt(2 * 128) = 0.32
    assert torch.equal(queries("again", 0), q)  # the seed fixes them
    assert not torch.equal(queries("other", 1), q)
    # `capfilt models init --kind blip2-itm` and a fresh `pretrain --arch blip2` build the same way
    assert main(["models", "init", "--kind", "blip2-itm", "--out", str(tmp_path / "cli"),
                 "--tokenizer", str(tiny_tokenizer), "--seed", "0"]) == 0
    assert torch.equal(load_file(str(tmp_path / "cli" / "model.safetensors"))["query_tokens"][0], q)
    from capfilt.model.training.blip2 import Blip2TrainConfig, build_blip2

    fresh = build_blip2(Blip2TrainConfig(), tmp_path / "run", tokenizer_dir=tiny_tokenizer, seed=0).model
    assert torch.equal(fresh.query_tokens.detach()[0], q)


# --- 3. the draw rules -----------------------------------------------------------------------

def _draw_by_hand(row, positives, rule):
    """Normalised draw probabilities of one row, from the reference formulas."""
    exp = [math.exp(v) for v in row]
    if rule == "pretrain":  # softmax over every column, + 1e-4, positives zeroed
        w = [0.0 if j in positives else e / sum(exp) + 1e-4 for j, e in enumerate(exp)]
    else:  # softmax over the non-positive columns
        w = [0.0 if j in positives else e for j, e in enumerate(exp)]
    return [x / sum(w) for x in w]


@pytest.mark.parametrize("rule", ["pretrain", "retrieval"])
def test_draw_probabilities_follow_the_reference(rule):
    sim = torch.tensor([[4.0, 1.0, 0.0, -2.0],
                        [0.5, 3.0, 2.5, 0.0],
                        [1.0, 1.0, 1.0, 1.0],
                        [-1.0, 2.0, 0.0, 3.0]])
    positive = torch.eye(4, dtype=torch.bool)
    positive[1, 2] = True  # an identical caption: a positive too
    w = L.negative_weights(sim, positive, rule)
    for r in range(4):
        got = (w[r] / w[r].sum()).tolist()
        want = _draw_by_hand(sim[r].tolist(), set(positive[r].nonzero().flatten().tolist()), rule)
        assert got == pytest.approx(want, abs=1e-6)
        assert all(got[j] == 0.0 for j in positive[r].nonzero().flatten().tolist())
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([L.sample_hard_negatives(sim, positive, gen, draw=rule) for _ in range(100)])
    assert not positive[torch.arange(4).expand(100, 4), draws].any()


def test_the_pretraining_floor_keeps_a_confident_draw_near_uniform():
    """When the positive dominates the softmax, BLIP pretraining's 1e-4 floor outweighs what is
    left for the negatives, and the draw is near uniform; the retrieval rule still follows the
    similarities."""
    sim = torch.tensor([[30.0, 5.0, 0.0, 0.0]])
    positive = torch.tensor([[True, False, False, False]])
    pre = L.negative_weights(sim, positive, "pretrain")[0]
    ret = L.negative_weights(sim, positive, "retrieval")[0]
    z = math.exp(30) + math.exp(5) + 2
    floor = [0.0, math.exp(5) / z + 1e-4, 1 / z + 1e-4, 1 / z + 1e-4]
    assert (pre / pre.sum()).tolist() == pytest.approx([x / sum(floor) for x in floor], abs=1e-6)
    assert (pre / pre.sum())[1].item() == pytest.approx(1 / 3, abs=1e-4)
    assert ret[1].item() == pytest.approx(math.exp(5) / (math.exp(5) + 2), abs=1e-6)  # 0.987
    with pytest.raises(ValueError, match="unknown ITM negative draw 'blip'"):
        L.negative_weights(sim, positive, "blip")


def _spy_draws(monkeypatch):
    seen = []
    real = L.sample_hard_negatives

    def spy(sim, positive, generator, hard_fraction=1.0, draw="retrieval"):
        seen.append((sim.clone(), draw))
        return real(sim, positive, generator, hard_fraction, draw)

    monkeypatch.setattr(L, "sample_hard_negatives", spy)
    return seen


def test_each_command_draws_by_its_reference(tmp_path, synth_world, tiny_tokenizer, monkeypatch):
    seen = _spy_draws(monkeypatch)
    micro = tmp_path / "micro.json"
    micro.write_text(json.dumps(MICRO_BLIP))
    micro2 = tmp_path / "micro2.json"
    micro2.write_text(json.dumps(MICRO_BLIP2))
    common = ["--data", str(synth_world / "human"), "--steps", "1", "--batch-size", "4", "--no-progress"]
    pre = ["pretrain", "--arch", "blip", "--tokenizer", str(tiny_tokenizer), "--model-config", str(micro), *common]
    runs = [
        ([*pre, "--out", str(tmp_path / "pre")], "pretrain"),
        ([*pre, "--out", str(tmp_path / "pre-r"), "--itm-draw", "retrieval"], "retrieval"),
        (["finetune", "--task", "retrieval", "--init", str(tmp_path / "pre"), "--out", str(tmp_path / "ft"), *common],
         "retrieval"),
        (["finetune", "--task", "retrieval", "--init", str(tmp_path / "pre"), "--out", str(tmp_path / "ft-p"),
          "--itm-draw", "pretrain", *common], "pretrain"),
        (["pretrain", "--arch", "blip2", "--tokenizer", str(tiny_tokenizer), "--model-config", str(micro2),
          "--out", str(tmp_path / "b2"), *common], "retrieval"),
    ]
    for argv, rule in runs:
        seen.clear()
        assert main(argv) == 0
        assert [draw for _, draw in seen] == [rule, rule], argv  # a text per image, an image per text
    with pytest.raises(ValueError, match="--itm-draw pretrain needs --itm-negatives hard"):
        main([*pre, "--out", str(tmp_path / "x"), "--itm-negatives", "random", "--itm-draw", "pretrain"])
    with pytest.raises(ValueError, match="--itm-draw does not apply to --task caption"):
        main(["finetune", "--task", "caption", "--init", str(tmp_path / "pre"), "--out", str(tmp_path / "x"),
              "--itm-draw", "pretrain", *common])


# --- 4. the similarities the draw reads under momentum -----------------------------------------

@pytest.mark.parametrize("rule", ["pretrain", "retrieval"])
def test_momentum_draw_reads_momentum_columns_in_pretraining(rule, tmp_path, synth_world, tiny_tokenizer,
                                                             monkeypatch):
    """BLIP pretraining draws from its ITC logits: online image (text) rows against the momentum
    encoder's text (image) columns; retrieval finetuning from online x online."""
    from capfilt.model.training.blip import BlipTrainConfig, build_blip

    model = build_blip(BlipTrainConfig(tasks=("itc", "itm"), momentum=True, itm_draw=rule), tmp_path,
                       tokenizer_dir=tiny_tokenizer, overrides=MICRO_BLIP).eval()
    _spread(model.itm)  # online encoders away from their momentum copies
    batch = _batch(model, synth_world / "test")
    seen = _spy_draws(monkeypatch)
    with torch.no_grad():
        model(batch)  # updates the momentum encoders once, then draws
        itm, mom, temp = model.itm, model.momentum, model.temp
        ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
        online = itm(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False).itm_score / temp
        image_m = F.normalize(mom["vision_proj"](mom["vision_model"](pixel_values=pixels).last_hidden_state[:, 0]), dim=-1)
        text_m = F.normalize(mom["text_proj"](mom["text_encoder"](input_ids=ids, attention_mask=mask)
                                              .last_hidden_state[:, 0]), dim=-1)
        image = F.normalize(itm.vision_proj(itm.vision_model(pixel_values=pixels).last_hidden_state[:, 0]), dim=-1)
        text = F.normalize(itm.text_proj(itm.text_encoder(input_ids=ids, attention_mask=mask)
                                         .last_hidden_state[:, 0]), dim=-1)
    (i2t, _), (t2i, _) = seen
    if rule == "pretrain":
        want_i2t, want_t2i = image @ text_m.T / temp, text @ image_m.T / temp
        assert not torch.allclose(want_i2t, online, atol=1e-3)  # the momentum columns differ
    else:
        want_i2t, want_t2i = online, online.T
    assert torch.allclose(i2t, want_i2t, atol=1e-5)
    assert torch.allclose(t2i, want_t2i, atol=1e-5)


# --- 7. the alpha ramp -----------------------------------------------------------------------

def test_alpha_ramp_values_per_step():
    alpha, per_epoch = 0.4, 4
    for step in range(12):
        epoch, i = divmod(step, per_epoch)
        pretrain = alpha * min(1, (epoch * per_epoch + i) / (2 * per_epoch))  # pretrain.py, line 58
        finetune = alpha if epoch > 0 else alpha * min(1, i / per_epoch)  # train_retrieval.py, lines 46-49
        assert L.ramped_alpha(alpha, step, 2 * per_epoch) == pytest.approx(pretrain)
        assert L.ramped_alpha(alpha, step, per_epoch) == pytest.approx(finetune)
    assert L.ramped_alpha(alpha, 0, 0) == alpha


def test_an_epoch_is_the_rows_every_source_yields(tmp_path, synth_world):
    """Curated shards count their kept rows, raw ones their successes; a mixture sums them."""
    import pyarrow as pa

    pq.write_table(pa.table({"key": list("abcde"), "captions": [["a red circle"]] * 5,
                             "keep": [True, False, True, True, False], "jpg": [b"x"] * 5}), tmp_path / "cur.parquet")
    assert epoch_rows([SourceSpec(str(tmp_path / "cur.parquet"))]) == 3
    assert epoch_rows([SourceSpec(str(tmp_path / "cur.parquet")), SourceSpec(str(synth_world / "human"), 3.0)]) == 19


def test_alpha_ramps_over_blips_epochs_by_default(tmp_path, synth_world, tiny_tokenizer, monkeypatch):
    human = synth_world / "human"
    status = pq.read_table(next(human.glob("*.parquet")), columns=["status"]).column("status").to_pylist()
    assert epoch_rows([SourceSpec(str(human))]) == status.count("success") == 16  # raw shards: the successes
    alphas = []
    real = L.itc_loss

    def spy(*args, **kwargs):
        alphas.append(args[6] if len(args) > 6 else kwargs.get("alpha", 0.0))
        return real(*args, **kwargs)

    monkeypatch.setattr(L, "itc_loss", spy)
    micro = tmp_path / "micro.json"
    micro.write_text(json.dumps(MICRO_BLIP))
    common = ["--data", str(human), "--batch-size", "4", "--no-progress", "--momentum", "--tasks", "itc",
              "--queue-size", "0"]
    pre = ["pretrain", "--arch", "blip", "--tokenizer", str(tiny_tokenizer), "--model-config", str(micro), *common]
    # 16 rows at a global batch of 4: 4 steps an epoch; pretraining ramps over 2 epochs
    assert main([*pre, "--out", str(tmp_path / "pre"), "--steps", "10"]) == 0
    assert alphas == pytest.approx([0.4 * min(1, s / 8) for s in range(10)])
    alphas.clear()  # with accumulation the global batch is 8: 2 steps an epoch
    assert main([*pre, "--out", str(tmp_path / "acc"), "--steps", "5", "--accum", "2"]) == 0
    assert alphas[::2] == pytest.approx([0.4 * min(1, s / 4) for s in range(5)])
    alphas.clear()  # retrieval finetuning ramps over one epoch
    ft = ["finetune", "--task", "retrieval", "--init", str(tmp_path / "pre"), *common]
    assert main([*ft, "--out", str(tmp_path / "ft"), "--steps", "6"]) == 0
    assert alphas == pytest.approx([0.4 * min(1, s / 4) for s in range(6)])
    alphas.clear()  # the option wins; 0 turns the ramp off
    assert main([*ft, "--out", str(tmp_path / "ft0"), "--steps", "3", "--alpha-warmup-steps", "0"]) == 0
    assert alphas == pytest.approx([0.4] * 3)
    with pytest.raises(ValueError, match="--alpha-warmup-steps 5 needs --momentum"):
        main(["pretrain", "--arch", "blip", "--data", str(human), "--out", str(tmp_path / "x"),
              "--alpha-warmup-steps", "5"])
    with pytest.raises(ValueError, match="--alpha-warmup-steps must be >= 0, got -1"):
        main([*pre, "--out", str(tmp_path / "x"), "--alpha-warmup-steps", "-1"])
    with pytest.raises(ValueError, match="--alpha-warmup-steps does not apply to --arch clip"):
        main(["pretrain", "--arch", "clip", "--data", str(human), "--out", str(tmp_path / "x"),
              "--alpha-warmup-steps", "5"])
