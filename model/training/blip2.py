"""BLIP-2 stage 1: the Q-Former learns ITC + ITM + ITG against a frozen image encoder.

The network is transformers' `Blip2ForImageTextRetrieval` (vision tower, learned queries,
`Blip2QFormerModel`, text embeddings, projections, ITM head), so the result exports with its
own `save_pretrained` and loads in `model.filter.load_filter`. The tower is frozen except its
final LayerNorm (BLIP-2's `ln_vision`, applied to the penultimate layer's features), and may
come from timm, open_clip or a saved BLIP model (`model.vision_init`).

**The Q-Former LM head (ITG).** transformers has none, so one is built the way BLIP-2 (LAVIS)
builds it: a BERT prediction head (dense + GELU + LayerNorm, then a vocabulary projection) on
the text positions of the Q-Former output, its projection matrix *tied to the Q-Former's word
embeddings* (`model.embeddings.word_embeddings.weight`) plus its own bias. The head is
transformers' `BlipTextOnlyMLMHead` built from the Q-Former config. It is saved beside the
export as ``DIR/itm/qformer_lm_head.safetensors`` (transform + bias; the matrix is the
embedding already in the HF weights) and loaded back by `build_blip2(init=DIR)`.

**One joint pass for ITC and ITG.** ITG runs queries and text together under the mask of
`losses.itg_allowed` (queries see only queries; text sees all queries and past text). Since no
query attends to text, the query outputs of that pass are exactly the image-only query outputs
ITC needs, so they are reused rather than recomputed.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from capfilt.model.training import losses as L
from capfilt.model.training.blip import BlipTrainModel, collate_blip
from capfilt.model.specs import OPEN_CLIP, TIMM, check_model_dir, parse_vision_init
from capfilt.model.builders.model_dirs import find_model_dirs

log = logging.getLogger(__name__)
TASKS = ("itc", "itm", "itg")
LM_HEAD_FILE = "qformer_lm_head.safetensors"
TIED_HEAD_KEYS = ("predictions.decoder.weight", "predictions.decoder.bias")  # embeddings / predictions.bias


@dataclass
class Blip2TrainConfig:
    tasks: tuple[str, ...] = TASKS
    temp: float = 0.07
    max_text_len: int = 35
    label_smoothing: float = 0.1  # ITG
    itc_label_smoothing: float = 0.1  # both ITC directions, as LAVIS's blip2_qformer.py
    itm_random_steps: int = 0  # uniform ITM negatives for the first N steps (see BlipTrainConfig)
    itm_hard_fraction: float = 1.0  # then the share of rows with a hard negative (see BlipTrainConfig)
    itm_draw: str = "retrieval"  # `losses.DRAWS`; LAVIS's Q-Former draws over the non-matching pairs

    def __post_init__(self):
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"unknown BLIP-2 tasks {bad}; expected a subset of {TASKS}")
        if self.itm_draw not in L.DRAWS:
            raise ValueError(f"unknown ITM negative draw {self.itm_draw!r}; expected one of {L.DRAWS}")
        if self.itm_random_steps < 0:
            raise ValueError(f"itm_random_steps must be >= 0, got {self.itm_random_steps}")
        if not 0.0 <= self.itm_hard_fraction <= 1.0:
            raise ValueError(f"itm_hard_fraction must be in [0, 1], got {self.itm_hard_fraction}")


class Blip2TrainModel(nn.Module):
    """Stage-1 training around a `Blip2ForImageTextRetrieval`; `tower` (a frozen
    `PenultimateTower`) replaces its vision model when the encoder has no HF equivalent."""

    def __init__(self, cfg: Blip2TrainConfig, processor, model, tower: nn.Module | None = None):
        from transformers.models.blip.modeling_blip_text import BlipTextOnlyMLMHead

        super().__init__()
        self.cfg, self.processor, self.model, self.tower = cfg, processor, model, tower
        qcfg = model.config.qformer_config
        self.lm_head = BlipTextOnlyMLMHead(qcfg)
        self._init_lm_head(qcfg.initializer_range)
        self.lm_head.predictions.decoder.weight = model.embeddings.word_embeddings.weight  # tied
        self.lm_head.predictions.decoder.bias = self.lm_head.predictions.bias
        self.temp = nn.Parameter(torch.tensor(float(cfg.temp)))
        self.pad_id = processor.tokenizer.pad_token_id
        self.bos_id = processor.tokenizer.bos_token_id  # [DEC]
        if self.bos_id is None:
            raise ValueError("the Q-Former tokenizer has no bos token ([DEC]) for ITG")
        model.vision_model.requires_grad_(False)
        if tower is None:
            model.vision_model.post_layernorm.requires_grad_(True)  # BLIP-2's ln_vision trains
        else:
            self.ln_vision = nn.LayerNorm(tower.width)

    @torch.no_grad()
    def _init_lm_head(self, std: float) -> None:
        """BERT's init (normal(0, std) matrices, zero biases, unit LayerNorm) from a fixed seed,
        so a fresh head does not depend on whatever used the global RNG before."""
        pred = self.lm_head.predictions
        pred.transform.dense.weight.normal_(0.0, std, generator=torch.Generator().manual_seed(0))
        pred.transform.dense.bias.zero_()
        pred.transform.LayerNorm.reset_parameters()
        pred.bias.zero_()

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.vision_model.eval()  # frozen tower: eval mode even while training
        return self

    # --- batches (same contract as BLIP) -------------------------------------------------------

    def collate(self, samples) -> dict:
        return collate_blip(self.processor, samples, self.cfg.max_text_len)

    _pad_global = BlipTrainModel._pad_global
    _same = staticmethod(BlipTrainModel._same)

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, N, Dv) penultimate-layer features after the trainable LayerNorm."""
        if self.tower is not None:
            return self.ln_vision(self.tower(pixel_values))
        vm = self.model.vision_model
        with torch.no_grad():
            hidden = vm.encoder(inputs_embeds=vm.embeddings(pixel_values)).last_hidden_state
        return vm.post_layernorm(hidden)

    # --- forward -------------------------------------------------------------------------------

    def forward(self, batch: dict) -> dict:
        m, cfg = self.model, self.cfg
        rank, _ = L.world()
        ids, mask = self._pad_global(batch["input_ids"], batch["attention_mask"])
        b = ids.shape[0]
        rows = torch.arange(b) + rank * b
        embeds = self.image_embeds(batch["pixel_values"])  # (B, N, Dv)
        ones = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        q = m.query_tokens.shape[1]
        queries = m.query_tokens.expand(b, -1, -1)  # (B, Q, H)
        out = {}
        if "itg" in cfg.tasks:  # joint pass: ITG text outputs + the (text-blind) query outputs
            dec_ids = ids.clone()
            dec_ids[:, 0] = self.bos_id
            joint = m.embeddings(input_ids=dec_ids, query_embeds=queries)  # (B, Q+T, H)
            att = L.additive_mask(L.itg_allowed(q, mask), joint.dtype)  # (B, 1, Q+T, Q+T)
            hidden = m.qformer(query_embeds=joint, query_length=q, attention_mask=att,
                               encoder_hidden_states=embeds, encoder_attention_mask=ones).last_hidden_state
            query_out = hidden[:, :q]  # (B, Q, H)
            logits = self.lm_head(hidden[:, q:])  # (B, T, V)
            labels = L.lm_labels(dec_ids, mask)
            count = (labels[:, 1:] != L.IGNORE_INDEX).sum()
            normalizer = L.all_reduce_sum(count).clamp(min=1) / L.world()[1]
            out["itg"] = L.lm_loss(logits, labels, cfg.label_smoothing, normalizer)
        else:
            query_out = m.qformer(query_embeds=queries, encoder_hidden_states=embeds,
                                  encoder_attention_mask=ones).last_hidden_state
        if "itc" in cfg.tasks or "itm" in cfg.tasks:
            image_feats = F.normalize(m.vision_projection(query_out), dim=-1)  # (B, Q, D)
            text_hidden = m.qformer(query_embeds=m.embeddings(input_ids=ids), query_length=0,
                                    attention_mask=mask).last_hidden_state
            text_feat = F.normalize(m.text_projection(text_hidden[:, 0]), dim=-1)  # (B, D)
            ident = L.gather_no_grad(batch["ids"])  # (G, 2)
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
            if "itc" in cfg.tasks:
                img_all, txt_all = L.gather_with_grad(image_feats), L.gather_with_grad(text_feat)
                positive = self._same(ident[rows], ident)  # (B, G)
                sim_i2t = L.max_over_queries(image_feats, txt_all) / self.temp  # (B, G)
                sim_t2i = L.max_over_queries_t2i(text_feat, img_all) / self.temp  # (B, G)
                out["itc"] = L.itc_loss(sim_i2t, sim_t2i, positive, positive, smoothing=cfg.itc_label_smoothing)
            if "itm" in cfg.tasks:
                out["itm"] = self._itm(batch, embeds, image_feats, text_feat, ids, mask, ident, rows)
        out["loss"] = sum(out[t] for t in cfg.tasks)
        return out

    def _itm(self, batch, embeds, image_feats, text_feat, ids, mask, ident, rows):
        m = self.model
        with torch.no_grad():  # hard negatives over the global batch, the same draw on every rank
            sim = L.max_over_queries(L.gather_no_grad(image_feats), L.gather_no_grad(text_feat)) / self.temp
            if batch.get("step", 0) < self.cfg.itm_random_steps:
                sim = torch.zeros_like(sim)
            positive = self._same(ident, ident)
            gen = torch.Generator().manual_seed(int(batch.get("seed", 0)))
            draw = self.cfg.itm_hard_fraction, self.cfg.itm_draw
            neg_text = L.sample_hard_negatives(sim, positive, gen, *draw)[rows]
            neg_image = L.sample_hard_negatives(sim.T, positive.T, gen, *draw)[rows]
        embeds_all = L.gather_with_grad(embeds)
        ids_all, mask_all = L.gather_no_grad(ids), L.gather_no_grad(mask)
        ids3 = torch.cat([ids, ids, ids_all[neg_text]])  # (3B, T)
        mask3 = torch.cat([mask, mask, mask_all[neg_text]])
        images3 = torch.cat([embeds, embeds_all[neg_image], embeds])  # (3B, N, Dv)
        queries = m.query_tokens.expand(ids3.shape[0], -1, -1)
        q = queries.shape[1]
        joint_mask = torch.cat([torch.ones(queries.shape[:2], dtype=mask3.dtype, device=mask3.device), mask3], 1)
        hidden = m.qformer(query_embeds=m.embeddings(input_ids=ids3, query_embeds=queries), query_length=q,
                           attention_mask=joint_mask, encoder_hidden_states=images3,
                           encoder_attention_mask=torch.ones(images3.shape[:2], dtype=torch.long)).last_hidden_state
        logits = m.itm_head(hidden[:, :q]).mean(dim=1)  # (3B, 2): mean over queries
        b = ids.shape[0]
        return L.itm_loss(logits[:b], logits[b:])

    @torch.no_grad()
    def score_pairs(self, pixel_values, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pair (ITM p(match) with the query-mean logit, ITC max-over-queries cosine), (B,)."""
        m = self.model
        embeds = self.image_embeds(pixel_values)
        ones = torch.ones(embeds.shape[:2], dtype=torch.long)
        queries = m.query_tokens.expand(len(input_ids), -1, -1)
        q = queries.shape[1]
        joint_mask = torch.cat([torch.ones(queries.shape[:2], dtype=attention_mask.dtype), attention_mask], 1)
        fused = m.qformer(query_embeds=m.embeddings(input_ids=input_ids, query_embeds=queries), query_length=q,
                          attention_mask=joint_mask, encoder_hidden_states=embeds,
                          encoder_attention_mask=ones).last_hidden_state
        itm = F.softmax(m.itm_head(fused[:, :q]).mean(dim=1).float(), dim=-1)[:, 1]
        query_out = m.qformer(query_embeds=queries, encoder_hidden_states=embeds,
                              encoder_attention_mask=ones).last_hidden_state
        image_feats = F.normalize(m.vision_projection(query_out), dim=-1)  # (B, Q, D)
        text = m.qformer(query_embeds=m.embeddings(input_ids=input_ids), query_length=0,
                         attention_mask=attention_mask).last_hidden_state
        text_feat = F.normalize(m.text_projection(text[:, 0]), dim=-1)  # (B, D)
        return itm, torch.einsum("bqd,bd->bq", image_feats, text_feat).max(dim=1).values

    # --- export --------------------------------------------------------------------------------

    def export(self, out_dir) -> list[Path]:
        """DIR/itm: Blip2ForImageTextRetrieval + processor + the ITG head. A tower with no
        Blip2VisionModel form (open_clip, non-ViT timm) cannot be expressed there: the trained
        Q-Former is then saved as DIR/qformer/ (safetensors state + tower spec) instead."""
        if self.tower is not None:
            path = Path(out_dir) / "qformer"
            path.mkdir(parents=True, exist_ok=True)
            skip = ("tower.", "model.vision_model.") + tuple("lm_head." + k for k in TIED_HEAD_KEYS)
            state = {k: v.contiguous() for k, v in self.state_dict().items() if not k.startswith(skip)}
            save_file(state, str(path / "qformer.safetensors"))
            self.model.config.save_pretrained(path)
            (path / "tower.json").write_text(json.dumps({"tower": self.tower.spec}))
            log.warning("tower %s has no Blip2VisionModel form: wrote %s, not an HF itm directory",
                        self.tower.spec, path)
            return [path]
        path = Path(out_dir) / "itm"
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)
        head = {k: v.contiguous() for k, v in self.lm_head.state_dict().items()
                if k not in TIED_HEAD_KEYS}
        save_file(head, str(path / LM_HEAD_FILE))
        return [path]


def build_blip2(cfg: Blip2TrainConfig, work_dir, init=None, seed: int = 0, tokenizer_dir=None,
                overrides: dict | None = None, vision_init: str | None = None) -> Blip2TrainModel:
    """From `init` (a Blip2ForImageTextRetrieval directory, or DIR/itm) or a fresh tiny model in
    ``work_dir/init/blip2``; `vision_init` maps a timm ViT / BLIP tower into the HF vision model
    (penultimate layer), or else wraps the tower as a frozen `PenultimateTower`."""
    from transformers import Blip2ForImageTextRetrieval, BlipProcessor

    from capfilt.model.builders.tiny import init_model
    from capfilt.model.training.vision_init import PenultimateTower, init_vision_tower

    tower = None
    spec = parse_vision_init(vision_init) if vision_init else None
    if spec and (spec.kind == OPEN_CLIP or spec.kind == TIMM and not _timm_maps(spec)):
        image_size = int((overrides or {}).get("vision_config", {}).get("image_size", 224))
        tower = PenultimateTower.from_spec(vision_init, image_size)
        # Blip2Config takes the Q-Former's cross-attention width from its vision config; the HF
        # vision model itself is unused with such a tower, so it is built with no layers
        overrides = _merge(overrides or {}, {"vision_config": {
            "hidden_size": tower.width, "intermediate_size": tower.width, "num_attention_heads": 1,
            "num_hidden_layers": 0,
            "image_size": image_size}})  # the processor resizes to the tower's input size
    if init is None:
        path = Path(work_dir) / "init" / "blip2"
        if not (path / "config.json").is_file():
            init_model("blip2-itm", path, tokenizer_dir, seed, overrides)
    else:
        dirs = find_model_dirs(init)
        if "blip2" not in dirs:
            raise ValueError(f"--init {init}: no Blip2ForImageTextRetrieval directory (found {sorted(dirs)})")
        path = Path(dirs["blip2"])
    check_model_dir(path)  # without a tokenizer file BlipProcessor would train on [UNK] (see BlipTrainModel)
    model = Blip2ForImageTextRetrieval.from_pretrained(str(path))
    if tower is not None and model.config.qformer_config.encoder_hidden_size != tower.width:
        raise ValueError(f"tower {vision_init} has width {tower.width}, the Q-Former cross-attends to "
                         f"{model.config.qformer_config.encoder_hidden_size}")
    train_model = Blip2TrainModel(cfg, BlipProcessor.from_pretrained(str(path)), model, tower)
    if (path / LM_HEAD_FILE).is_file():
        missing, unexpected = train_model.lm_head.load_state_dict(load_file(str(path / LM_HEAD_FILE)), strict=False)
        if unexpected or set(missing) - set(TIED_HEAD_KEYS):
            raise ValueError(f"{path / LM_HEAD_FILE}: missing {missing}, unexpected {unexpected}")
    if spec and tower is None:
        init_vision_tower(vision_init, model.vision_model, penultimate=True)
    return train_model


def _timm_maps(spec) -> bool:
    """True for timm's VisionTransformer family (mapped into Blip2VisionModel); other timm
    transformers (EVA, ...) run as a PenultimateTower, and convnets are refused there. Read from
    the registry: nothing is built."""
    import timm

    return timm.models.model_entrypoint(spec.name.split(".")[0]).__module__ == "timm.models.vision_transformer"


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out
