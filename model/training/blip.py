"""BLIP pretraining (ITC + ITM + LM) over transformers' BLIP modules, sharing layers as BLIP does.

The training model *is* a `BlipForImageTextRetrieval` (vision tower, text encoder, projections,
ITM head) and a `BlipForConditionalGeneration` (text decoder) holding the same module objects:

* one vision tower serves both;
* the decoder shares every text-encoder parameter except self-attention (embeddings,
  cross-attention, feed-forward), as BLIP's ``tie_encoder_decoder_weights(..., '/attention')``;
  its LM head stays tied to the word embeddings.

Export is each HF model's own `save_pretrained` (DIR/captioner, DIR/itm), computing exactly what
the training model computed; temperature, momentum encoders and queues are training state only.
The losses (transformers has none) are in `losses.py`.

Under DDP, ITC columns and ITM negatives come from the whole global batch: features are
gathered with gradient, negatives are drawn for the global batch from a generator seeded by
the step (so the draw does not depend on the world size) and each rank keeps its rows.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from capfilt.model.training import losses as L
from capfilt.model.specs import check_model_dir, is_local_spec
from capfilt.model.builders.model_dirs import find_model_dirs
from capfilt.model.tokens import itm_first_token
from capfilt.transforms.seeding import sample_seed

log = logging.getLogger(__name__)
TASKS = ("itc", "itm", "lm")


@dataclass
class BlipTrainConfig:
    """Objective options. BLIP's values: m=0.995, alpha=0.4, queue 57600, temp 0.07."""

    tasks: tuple[str, ...] = TASKS
    momentum: bool = False  # momentum encoder + soft targets (+ queue when queue_size > 0)
    momentum_m: float = 0.995
    alpha: float = 0.4
    alpha_warmup_steps: int = 0  # alpha ramps up from 0 over these steps (`losses.ramped_alpha`; BLIP's by default)
    queue_size: int = 0
    temp: float = 0.07
    max_text_len: int = 35
    itm_first_token: str = "enc"  # "enc" or "cls", as curation scores (model.tokens)
    prompt: str = ""  # LM prompt, masked out of the targets ("a picture of " for captioning)
    label_smoothing: float = 0.1
    tie_text: bool | None = True  # None: tie only when the two loaded models already agree
    # ITM negatives are drawn uniformly among the non-matching pairs for the first N steps, then by similarity
    # (N = 0 is BLIP). From a random init hard negatives keep ITM at its plateau for long (docs/training.md).
    itm_random_steps: int = 0
    # After those steps, the share of rows whose negative is drawn by similarity, the others uniformly (1.0 is
    # BLIP); the mix keeps a from-scratch ITM head off its plateau but made no better filter (docs/results.md).
    itm_hard_fraction: float = 1.0
    itm_draw: str = "pretrain"  # `losses.DRAWS`: as BLIP pretrains, or "retrieval" as it finetunes (finetune)

    def __post_init__(self):
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"unknown BLIP tasks {bad}; expected a subset of {TASKS}")
        if self.itm_draw not in L.DRAWS:
            raise ValueError(f"unknown ITM negative draw {self.itm_draw!r}; expected one of {L.DRAWS}")
        if self.itm_random_steps < 0:
            raise ValueError(f"itm_random_steps must be >= 0, got {self.itm_random_steps}")
        if not 0.0 <= self.itm_hard_fraction <= 1.0:
            raise ValueError(f"itm_hard_fraction must be in [0, 1], got {self.itm_hard_fraction}")


def tie_text_encoder_decoder(encoder: nn.Module, decoder: nn.Module) -> None:
    """Make `decoder` (BlipTextLMHeadModel) use `encoder`'s (BlipTextModel) embeddings,
    cross-attention and feed-forward modules; only self-attention stays the decoder's own."""
    enc_layers, dec_layers = encoder.encoder.layer, decoder.bert.encoder.layer
    if len(enc_layers) != len(dec_layers):
        raise ValueError(f"cannot share text layers: encoder has {len(enc_layers)}, decoder {len(dec_layers)}")
    decoder.bert.embeddings = encoder.embeddings
    for enc, dec in zip(enc_layers, dec_layers):
        dec.crossattention, dec.intermediate, dec.output = enc.crossattention, enc.intermediate, enc.output
    decoder.cls.predictions.decoder.weight = encoder.embeddings.word_embeddings.weight


def _shared_parts_equal(encoder: nn.Module, decoder: nn.Module) -> bool:
    dec = decoder.bert.state_dict()
    return all(k in dec and torch.equal(v, dec[k]) for k, v in encoder.state_dict().items()
               if ".attention." not in k)


class BlipTrainModel(nn.Module):
    """Trainable BLIP; `captioner` and/or `itm` may be None when their tasks are not trained."""

    def __init__(self, cfg: BlipTrainConfig, processor, itm=None, captioner=None):
        super().__init__()
        self.cfg, self.processor = cfg, processor
        need_itm = bool({"itc", "itm"} & set(cfg.tasks))
        if need_itm and itm is None or "lm" in cfg.tasks and captioner is None:
            raise ValueError(f"tasks {cfg.tasks} need {'an ITM' if itm is None else 'a captioner'} model")
        self.itm, self.captioner = itm, captioner
        if itm is not None and captioner is not None:
            if not torch.equal(itm.vision_model.embeddings.patch_embedding.weight,
                               captioner.vision_model.embeddings.patch_embedding.weight):
                log.warning("captioner and itm vision towers differ; training one tower (the itm's)")
            captioner.vision_model = itm.vision_model
            tie = cfg.tie_text
            if tie is None:
                tie = _shared_parts_equal(itm.text_encoder, captioner.text_decoder)
                if not tie:
                    log.warning("captioner and itm text layers differ: training them unshared")
            if tie:
                tie_text_encoder_decoder(itm.text_encoder, captioner.text_decoder)
        tok = processor.tokenizer
        self.pad_id = tok.pad_token_id
        text_cfg = (itm or captioner).config.text_config
        self.bos_id = text_cfg.bos_token_id
        self.first_token = (itm_first_token(cfg.itm_first_token, tok, text_cfg.vocab_size, "BLIP training")
                            if itm is not None else None)
        self.prompt_len = len(tok(cfg.prompt).input_ids) - 1 if cfg.prompt else 0
        if "itc" in cfg.tasks:
            self.temp = nn.Parameter(torch.tensor(float(cfg.temp)))
        if cfg.momentum and "itc" in cfg.tasks:
            self._init_momentum()

    # --- construction / export ---------------------------------------------------------------

    @classmethod
    def from_dirs(cls, cfg: BlipTrainConfig, itm_dir=None, captioner_dir=None) -> "BlipTrainModel":
        """Load the two HF models. When the tasks need a half that is not given, it is built
        from the other half's config and weights, as BLIP initialises its encoder and decoder
        from the same BERT: text encoder <-> decoder body, vision tower copied."""
        from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipProcessor

        if itm_dir is None and captioner_dir is None:
            raise ValueError("need an itm or a captioner directory")
        # BlipProcessor.from_pretrained does not fail without a tokenizer file: it builds a
        # 5-token vocabulary, and every caption would train as [UNK]. Refuse as evaluate does.
        processor_dir = itm_dir or captioner_dir
        for d in (itm_dir, captioner_dir):
            if d is not None and is_local_spec(d):
                check_model_dir(d, need_processor=d == processor_dir)
        need_itm = bool({"itc", "itm"} & set(cfg.tasks))
        itm = BlipForImageTextRetrieval.from_pretrained(str(itm_dir)) if itm_dir else None
        cap = BlipForConditionalGeneration.from_pretrained(str(captioner_dir)) if captioner_dir else None
        if need_itm and itm is None:
            log.info("no itm model given: building one from the captioner %s", captioner_dir)
            itm = BlipForImageTextRetrieval(cap.config)
            itm.vision_model.load_state_dict(cap.vision_model.state_dict())
            itm.text_encoder.load_state_dict(cap.text_decoder.bert.state_dict())
        if "lm" in cfg.tasks and cap is None:
            log.info("no captioner given: building one from the itm model %s", itm_dir)
            cap = BlipForConditionalGeneration(itm.config)
            cap.vision_model.load_state_dict(itm.vision_model.state_dict())
            cap.text_decoder.bert.load_state_dict(itm.text_encoder.state_dict())
        processor = BlipProcessor.from_pretrained(str(processor_dir))
        return cls(cfg, processor, itm=itm if need_itm else None, captioner=cap if "lm" in cfg.tasks else None)

    def export(self, out_dir) -> list[Path]:
        """Save DIR/itm (BlipForImageTextRetrieval) and/or DIR/captioner
        (BlipForConditionalGeneration), each with its processor."""
        written = []
        for name, model in (("itm", self.itm), ("captioner", self.captioner)):
            if model is None:
                continue
            path = Path(out_dir) / name
            model.save_pretrained(path)
            self.processor.save_pretrained(path)
            written.append(path)
        return written

    @property
    def vision_model(self):
        return (self.itm or self.captioner).vision_model

    # --- momentum encoder and queue (BLIP / ALBEF) ----------------------------------------------

    def _online_pairs(self):
        return [(self.itm.vision_model, "vision_model"), (self.itm.vision_proj, "vision_proj"),
                (self.itm.text_encoder, "text_encoder"), (self.itm.text_proj, "text_proj")]

    def _init_momentum(self):
        self.momentum = nn.ModuleDict({name: copy.deepcopy(m) for m, name in self._online_pairs()})
        self.momentum.requires_grad_(False)
        dim = self.itm.config.image_text_hidden_size
        k = int(self.cfg.queue_size)
        gen = torch.Generator().manual_seed(0)  # random unit vectors, as BLIP, but reproducible
        self.register_buffer("image_queue", F.normalize(torch.randn(k, dim, generator=gen), dim=1))  # (K, D)
        self.register_buffer("text_queue", F.normalize(torch.randn(k, dim, generator=gen), dim=1))  # (K, D)
        # identities of the queued samples (key hash, text hash); -1: nothing queued yet
        self.register_buffer("queue_ids", torch.full((k, 2), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def sync_momentum(self):
        """Momentum encoders := online encoders (after the online weights were replaced)."""
        if hasattr(self, "momentum"):
            for online, name in self._online_pairs():
                self.momentum[name].load_state_dict(online.state_dict())

    @torch.no_grad()
    def _momentum_update(self):
        m = self.cfg.momentum_m
        for online, name in self._online_pairs():
            for p_m, p in zip(self.momentum[name].parameters(), online.parameters()):
                p_m.mul_(m).add_(p.detach(), alpha=1.0 - m)

    @torch.no_grad()
    def _enqueue(self, image_feat, text_feat, ids):
        k = self.image_queue.shape[0]
        if k == 0:
            return
        n = image_feat.shape[0]
        if k % n:
            raise ValueError(f"queue size {k} must be a multiple of the global batch {n}")
        ptr = int(self.queue_ptr)
        self.image_queue[ptr:ptr + n] = image_feat
        self.text_queue[ptr:ptr + n] = text_feat
        self.queue_ids[ptr:ptr + n] = ids
        self.queue_ptr.fill_((ptr + n) % k)

    # --- batches -----------------------------------------------------------------------------

    def collate(self, samples) -> dict:
        return collate_blip(self.processor, samples, self.cfg.max_text_len, self.cfg.prompt, self.prompt_len)

    def _pad_global(self, ids, mask):
        """Pad (B, T) to the longest T over ranks, so that text can be gathered."""
        t = torch.tensor(ids.shape[1])
        if L.world()[1] > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        extra = int(t) - ids.shape[1]
        if extra:
            ids = F.pad(ids, (0, extra), value=self.pad_id)
            mask = F.pad(mask, (0, extra), value=0)
        return ids, mask

    # --- forward -----------------------------------------------------------------------------

    def forward(self, batch: dict) -> dict:
        """Losses for one micro-batch: {"loss", "itc", "itm", "lm"} (scalars).
        `batch` also carries "seed" (int: the ITM draw) and "step" (int: alpha warm-up)."""
        tasks = self.cfg.tasks
        image_embeds = self.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state  # (B, N, Dv)
        out = {}
        if "itc" in tasks or "itm" in tasks:
            out.update(self._itc_itm(batch, image_embeds))
        if "lm" in tasks:
            out["lm"] = self._lm(batch, image_embeds)
        out["loss"] = sum(out[t] for t in tasks)
        return out

    def _text_feat(self, encoder, proj, ids, mask):
        hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, Dt)
        return F.normalize(proj(hidden[:, 0]), dim=-1)  # (B, D)

    def _itc_itm(self, batch, image_embeds) -> dict:
        itm, cfg = self.itm, self.cfg
        rank, world = L.world()
        ids, mask = self._pad_global(batch["input_ids"], batch["attention_mask"])
        b = ids.shape[0]
        rows = torch.arange(b) + rank * b  # this rank's rows in the global batch
        image_feat = F.normalize(itm.vision_proj(image_embeds[:, 0]), dim=-1)  # (B, D)
        text_feat = self._text_feat(itm.text_encoder, itm.text_proj, ids, mask)  # (B, D)
        ident = L.gather_no_grad(batch["ids"])  # (G, 2) key / text hashes of the global batch
        out = {}
        if "itc" in cfg.tasks:
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
            teacher_i2t = teacher_t2i = None
            if cfg.momentum:
                with torch.no_grad():
                    self._momentum_update()
                    mom = self.momentum
                    emb_m = mom["vision_model"](pixel_values=batch["pixel_values"]).last_hidden_state
                    img_m = L.gather_no_grad(F.normalize(mom["vision_proj"](emb_m[:, 0]), dim=-1))
                    txt_m = L.gather_no_grad(self._text_feat(mom["text_encoder"], mom["text_proj"], ids, mask))
                    img_cols = torch.cat([img_m, self.image_queue])  # (G + K, D)
                    txt_cols = torch.cat([txt_m, self.text_queue])
                    col_ids = torch.cat([ident, self.queue_ids])
                    teacher_i2t = img_m[rows] @ txt_cols.T / self.temp
                    teacher_t2i = txt_m[rows] @ img_cols.T / self.temp
                alpha = L.ramped_alpha(cfg.alpha, batch.get("step", 0), cfg.alpha_warmup_steps)
            else:  # in-batch: columns are the global batch's online features, with gradient
                img_cols, txt_cols, col_ids = L.gather_with_grad(image_feat), L.gather_with_grad(text_feat), ident
                alpha = 0.0
            positive = self._same(ident[rows], col_ids)  # (B, G[+K])
            sim_i2t = image_feat @ txt_cols.T / self.temp
            sim_t2i = text_feat @ img_cols.T / self.temp
            out["itc"] = L.itc_loss(sim_i2t, sim_t2i, positive, positive, teacher_i2t, teacher_t2i, alpha)
            if cfg.momentum:
                self._enqueue(img_m, txt_m, ident)
        if "itm" in cfg.tasks:
            momentum = (img_m, txt_m) if cfg.momentum and "itc" in cfg.tasks and cfg.itm_draw == "pretrain" else ()
            out["itm"] = self._itm(batch, image_embeds, image_feat, text_feat, ids, mask, ident, rows, *momentum)
        return out

    @staticmethod
    def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(R, 2) x (C, 2) identities -> (R, C) bool: same image key or identical caption."""
        return (a[:, None, 0] == b[None, :, 0]) | (a[:, None, 1] == b[None, :, 1])

    def _itm(self, batch, image_embeds, image_feat, text_feat, ids, mask, ident, rows, img_m=None, txt_m=None):
        itm, cfg = self.itm, self.cfg
        with torch.no_grad():  # hard negatives over the global batch, same draw on every rank
            temp = self.temp if "itc" in cfg.tasks else 1.0
            sim_i2t, sim_t2i = L.draw_similarities(L.gather_no_grad(image_feat), L.gather_no_grad(text_feat),
                                                   temp, img_m, txt_m)  # (G, G) each; img_m/txt_m: momentum
            positive = self._same(ident, ident)
            if batch.get("step", 0) < cfg.itm_random_steps:  # uniform over the non-matching
                sim_i2t, sim_t2i = torch.zeros_like(sim_i2t), torch.zeros_like(sim_t2i)
            gen = torch.Generator().manual_seed(int(batch.get("seed", 0)))
            neg_text = L.sample_hard_negatives(sim_i2t, positive, gen, cfg.itm_hard_fraction, cfg.itm_draw)[rows]
            neg_image = L.sample_hard_negatives(sim_t2i, positive.T, gen, cfg.itm_hard_fraction, cfg.itm_draw)[rows]
        embeds_all = L.gather_with_grad(image_embeds)  # (G, N, Dv)
        ids_all, mask_all = L.gather_no_grad(ids), L.gather_no_grad(mask)
        enc_ids = self.first_token.apply(torch.cat([ids, ids, ids_all[neg_text]]))  # (3B, T)
        enc_mask = torch.cat([mask, mask, mask_all[neg_text]])
        enc_images = torch.cat([image_embeds, embeds_all[neg_image], image_embeds])  # (3B, N, Dv)
        hidden = itm.text_encoder(input_ids=enc_ids, attention_mask=enc_mask, encoder_hidden_states=enc_images,
                                  encoder_attention_mask=torch.ones(enc_images.shape[:2], dtype=torch.long)
                                  ).last_hidden_state
        logits = itm.itm_head(hidden[:, 0])  # (3B, 2)
        b = ids.shape[0]
        return L.itm_loss(logits[:b], logits[b:])

    def _lm(self, batch, image_embeds):
        ids = batch.get("dec_input_ids", batch["input_ids"]).clone()
        mask = batch.get("dec_attention_mask", batch["attention_mask"])
        ids[:, 0] = self.bos_id  # [DEC] replaces [CLS], as BLIP's decoder input
        labels = L.lm_labels(ids, mask, self.prompt_len)
        logits = self.captioner.text_decoder(input_ids=ids, attention_mask=mask,
                                             encoder_hidden_states=image_embeds).logits  # (B, T, V)
        count = (labels[:, 1:] != L.IGNORE_INDEX).sum()
        normalizer = L.all_reduce_sum(count).clamp(min=1) / L.world()[1]
        return L.lm_loss(logits, labels, self.cfg.label_smoothing, normalizer)

    # --- scoring (what the exported filter computes) ------------------------------------------

    @torch.no_grad()
    def score_pairs(self, pixel_values, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pair (ITM p(match), ITC cosine), each (B,), for image i with text i."""
        itm = self.itm
        embeds = itm.vision_model(pixel_values=pixel_values).last_hidden_state
        ones = torch.ones(embeds.shape[:2], dtype=torch.long)
        hidden = itm.text_encoder(input_ids=self.first_token.apply(input_ids), attention_mask=attention_mask,
                                  encoder_hidden_states=embeds, encoder_attention_mask=ones).last_hidden_state
        p = F.softmax(itm.itm_head(hidden[:, 0]).float(), dim=-1)[:, 1]
        img = F.normalize(itm.vision_proj(embeds[:, 0]), dim=-1)
        txt = self._text_feat(itm.text_encoder, itm.text_proj, input_ids, attention_mask)
        return p, (img * txt).sum(-1)


def collate_blip(processor, samples, max_text_len: int, prompt: str = "", prompt_len: int = 0) -> dict:
    """Samples -> tensors: pixel_values (B, 3, H, W), input_ids / attention_mask (B, T), with a
    prompt also dec_input_ids / dec_attention_mask (B, T'), and ids (B, 2): hashes of the image
    key and of the caption, which tell true matches apart from negatives across the batch."""
    texts = [s.text for s in samples]
    batch = dict(processor.image_processor([s.image for s in samples], return_tensors="pt"))
    tok = processor.tokenizer(texts, padding="longest", truncation=True, max_length=max_text_len,
                              return_tensors="pt")
    batch.update(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
    if prompt:  # the decoder's text: the prompt, then the caption
        dec = processor.tokenizer([prompt + t for t in texts], padding="longest", truncation=True,
                                  max_length=max_text_len + prompt_len, return_tensors="pt")
        batch.update(dec_input_ids=dec.input_ids, dec_attention_mask=dec.attention_mask)
    batch["ids"] = torch.tensor([[sample_seed(0, s.key), sample_seed(0, t)] for s, t in zip(samples, texts)])
    return batch


def build_blip(cfg: BlipTrainConfig, work_dir, init=None, seed: int = 0, tokenizer_dir=None,
               overrides: dict | None = None, vision_init: str | None = None) -> BlipTrainModel:
    """The training model: from `init` (see `find_model_dirs`), or fresh tiny models written to
    ``work_dir/init/{itm,captioner}`` by `model.builders.tiny.init_model` (config `overrides` merged in),
    then optionally the vision tower from `vision_init` (`model.vision_init`)."""
    from capfilt.model.builders.tiny import init_model
    from capfilt.model.training.vision_init import init_vision_tower

    if init is None:
        base = Path(work_dir) / "init"
        # Both parts or neither: a run killed after writing init/itm left no init/captioner,
        # and reusing half of it failed every resume. init_model writes each part atomically.
        if not all((base / part / "config.json").is_file() for part in ("itm", "captioner")):
            init_model("itm", base / "itm", tokenizer_dir, seed, overrides)
            init_model("captioner", base / "captioner", base / "itm", seed, overrides)
        model = BlipTrainModel.from_dirs(dataclasses.replace(cfg, tie_text=True), base / "itm", base / "captioner")
    else:
        dirs = find_model_dirs(init)
        if not {"itm", "captioner"} & set(dirs):
            raise ValueError(f"--init {init}: no BLIP captioner or itm directory (found {sorted(dirs)})")
        tie = None if cfg.tie_text else False
        model = BlipTrainModel.from_dirs(dataclasses.replace(cfg, tie_text=tie), dirs.get("itm"), dirs.get("captioner"))
    if vision_init:
        init_vision_tower(vision_init, model.vision_model)
        model.sync_momentum()
    return model
