"""Tiny models and the WordPiece tokenizer the project builds for itself (no hub downloads).

* `train_tokenizer` trains a lowercase WordPiece vocabulary on the synthetic world's captions
  with the `tokenizers` library and saves it in the layout of BLIP's hub checkpoints: a
  `BertTokenizer` whose bos token is `[DEC]` (the decoder's start token) with `[ENC]` as an
  extra special token, both appended after the trained vocabulary as BLIP does.
* `init_model` writes a random-initialised model directory for one of four kinds, from the
  JSON configs in `model/configs/` (data, not code):

  ============  =====================================  ==========================================
  kind          class                                  loaded back with
  ============  =====================================  ==========================================
  captioner     BlipForConditionalGeneration           `from_pretrained(dir)` + BlipProcessor
  itm           BlipForImageTextRetrieval              `from_pretrained(dir)` + BlipProcessor
  blip2-itm     Blip2ForImageTextRetrieval             `from_pretrained(dir)` + BlipProcessor
  clip          open_clip CLIP (custom config)         `open_clip.create_model_and_transforms(
                                                       "local-dir:" + dir)`
  ============  =====================================  ==========================================

  The token ids in the BLIP configs (vocab size, pad/bos/sep/eos) are taken from the tokenizer,
  so config and tokenizer cannot disagree. CLIP keeps open_clip's bundled BPE tokenizer.

Everything is written with safetensors; same seed, same weights.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import json
import tempfile
from importlib import resources
from pathlib import Path

import torch

from capfilt.model.specs import CLIP_CONFIG, MODEL_RECORD, clip_spec
from capfilt.model.tokens import DEC_TOKEN, ENC_TOKEN

KINDS = ("captioner", "itm", "blip2-itm", "clip")
CONFIG_FILES = {
    "captioner": "tiny_captioner.json",
    "itm": "tiny_itm.json",
    "blip2-itm": "tiny_blip2_itm.json",
    "clip": "tiny_clip.json",
}
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4, BERT's order
BLIP_EXTRA_TOKENS = (DEC_TOKEN, ENC_TOKEN)  # appended after the vocabulary, as in BLIP (model.tokens)
# BLIP's image normalisation (the OpenAI CLIP statistics), kept for the tiny processors too.
BLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
BLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def load_config(kind: str, overrides: dict | None = None) -> dict:
    """The kind's JSON config from `model/configs/`, with `overrides` deep-merged into it."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")
    text = resources.files("capfilt.model").joinpath("configs", CONFIG_FILES[kind]).read_text("utf-8")
    _check_override_keys(kind, overrides or {})
    return _deep_merge(json.loads(text), overrides or {})


# Keys the project reads itself, beside the library config's own (see _build_blip).
PROJECT_KEYS = {kind: {"vision_position_std"} for kind in ("captioner", "itm", "blip2-itm")}  # blip2: refused later, by name


def _check_override_keys(kind: str, overrides: dict) -> None:
    """Raise naming a key of `overrides` that the model's config does not have.

    transformers' configs keep unknown keyword arguments as plain attributes, so a misspelt
    ``vision_confg`` would otherwise build the default model without a word."""
    for path, known in _known_keys(kind, overrides):
        if not isinstance(path[1], dict):
            raise ValueError(f"model config override {'.'.join(path[0]) or '(top)'} must be a mapping, "
                             f"got {path[1]!r}")
        for key in sorted(set(path[1]) - known):
            where = ".".join(path[0]) or "the top level"
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {sorted(known)}"
            raise ValueError(f"unknown model config key {key!r} at {where} of a {kind} model{hint}")


def _known_keys(kind: str, overrides: dict):
    """(path, mapping) pairs of `overrides` to check, each with the keys allowed there."""
    if kind == "clip":
        import dataclasses
        import inspect

        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        yield ((), overrides), {"model_cfg", "preprocess_cfg"}
        model_cfg = overrides.get("model_cfg", {})
        yield (("model_cfg",), model_cfg), set(inspect.signature(CLIP.__init__).parameters) - {"self"}
        for key, cfg_cls in (("vision_cfg", CLIPVisionCfg), ("text_cfg", CLIPTextCfg)):
            if isinstance(model_cfg, dict) and key in model_cfg:
                yield (("model_cfg", key), model_cfg[key]), {f.name for f in dataclasses.fields(cfg_cls)}
        return
    from transformers import Blip2Config, BlipConfig

    config = (Blip2Config if kind == "blip2-itm" else BlipConfig)().to_dict()
    yield ((), overrides), set(config) | PROJECT_KEYS.get(kind, set())
    for key, value in overrides.items():
        if isinstance(config.get(key), dict) and isinstance(value, dict):
            yield ((key,), value), set(config[key])


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# --- tokenizer -------------------------------------------------------------------------------

def train_tokenizer(out_dir, texts=None, vocab_size: int = 512, model_max_length: int = 64) -> Path:
    """Train a lowercase WordPiece tokenizer on `texts` (default: the synthetic corpus) and save
    it in BLIP's layout to `out_dir`. Deterministic for the same texts.

    Every word of the world fits in a 256-token vocabulary; the default leaves room for the
    junk alt-text. `model_max_length` should not exceed the text models' position table (the
    model directories override it with their own). Returns `out_dir`.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizer

    if texts is None:
        from capfilt.transforms.synth.scenes import corpus

        texts = corpus()
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_tokenizer: no non-empty texts to train on")
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    # The trainer numbers the "##x" continuation characters in hash-map order, and merge ties
    # are broken by those numbers, so two runs could differ. Reserving every "##x" up front
    # (sorted) fixes their ids and makes training deterministic. Only the token -> id map is
    # kept below, so being "special" inside the trainer does not carry over.
    alphabet = sorted({c for t in texts for c in wordpiece.normalizer.normalize_str(t) if not c.isspace()})
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False,
        special_tokens=[*SPECIAL_TOKENS, *(f"##{c}" for c in alphabet)],
    )
    wordpiece.train_from_iterator(texts, trainer=trainer)
    vocab = dict(sorted(wordpiece.get_vocab().items(), key=lambda kv: kv[1]))
    # transformers 5 ignores `vocab_file=`; the trained vocabulary is passed as a dict.
    tokenizer = BertTokenizer(
        vocab=vocab,
        do_lower_case=True,
        bos_token=BLIP_EXTRA_TOKENS[0],
        additional_special_tokens=[BLIP_EXTRA_TOKENS[1]],
        model_max_length=model_max_length,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    # BLIP's checkpoints also carry vocab.txt (one token per line, id = line number), which
    # slow BERT tokenizers of older transformers read; [DEC]/[ENC] live in tokenizer.json.
    (out / "vocab.txt").write_text("".join(f"{token}\n" for token in vocab), encoding="utf-8")
    return out


def load_tokenizer(tokenizer_dir):
    """The BLIP-layout tokenizer saved by `train_tokenizer` (AutoTokenizer, offline)."""
    from transformers import AutoTokenizer

    path = Path(tokenizer_dir)
    if not (path / "tokenizer_config.json").is_file():
        raise ValueError(f"{path}: not a tokenizer directory (no tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(str(path))


def token_ids(tokenizer) -> dict:
    """The ids BLIP's text configs need, read from the tokenizer."""
    dec_id = tokenizer.convert_tokens_to_ids(BLIP_EXTRA_TOKENS[0])
    if dec_id is None or dec_id == tokenizer.unk_token_id:
        raise ValueError("tokenizer has no [DEC] token; build it with model.builders.tiny.train_tokenizer")
    return {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": dec_id,
        "sep_token_id": tokenizer.sep_token_id,
        # generation stops at [SEP]; BLIP's generate passes sep_token_id as eos
        "eos_token_id": tokenizer.sep_token_id,
    }


# --- models ----------------------------------------------------------------------------------

def init_model(kind: str, out_dir, tokenizer_dir=None, seed: int = 0, overrides: dict | None = None,
               *, exist_ok: bool = True, overwrite: bool = False) -> Path:
    """Write a random-initialised `kind` model directory to `out_dir` and return it.

    BLIP kinds need a tokenizer: `tokenizer_dir`, or (when None) one trained now on the
    synthetic corpus. `overrides` is deep-merged into the kind's JSON config, e.g.
    ``{"vision_config": {"num_hidden_layers": 2}}`` (for clip: ``{"model_cfg": {...}}``).

    An existing non-empty `out_dir`: with `overwrite` it is replaced (its old contents are
    deleted); otherwise with `exist_ok` (the default, which the training code relies on) the
    model's files are written into it, replacing same-named ones; otherwise it is refused.
    `capfilt models init` passes ``exist_ok=False``. The files are written to a sibling
    directory first (`model.out_dirs.staged_dir`), so a failed init leaves `out_dir` as it was.
    """
    from capfilt.model.builders.out_dirs import check_output_dir, staged_dir

    config = load_config(kind, overrides)
    out = Path(out_dir)
    check_output_dir(out, overwrite=overwrite, what="model directory", merge=exist_ok, command="models init")
    if kind == "clip":
        with staged_dir(out, replace=overwrite) as stage:
            _init_clip(config, stage, seed)
            _mark_untrained(stage, kind, seed)
        return out
    if tokenizer_dir is None:
        # The processor saves the tokenizer beside the model, so a scratch copy is enough.
        with tempfile.TemporaryDirectory() as scratch:
            tokenizer = load_tokenizer(train_tokenizer(scratch))
    else:
        tokenizer = load_tokenizer(tokenizer_dir)
    ids = token_ids(tokenizer)
    with _seeded(seed):
        if kind == "blip2-itm":
            model, image_size = _build_blip2(config, ids, seed)
            max_text = model.config.qformer_config.max_position_embeddings
        else:
            model, image_size = _build_blip(kind, config, ids, seed)
            max_text = model.config.text_config.max_position_embeddings
    model.eval()
    with staged_dir(out, replace=overwrite) as stage:
        model.save_pretrained(stage)
        _processor(tokenizer, image_size, max_text).save_pretrained(stage)
        _mark_untrained(stage, kind, seed)
    return out


def _mark_untrained(stage: Path, kind: str, seed: int) -> None:
    """Write ``capfilt_model.json`` saying these weights are random (``model.specs.untrained``):
    curate, release and the report warn about a model no training has touched."""
    record = {"trained": False, "built_by": "capfilt models init", "kind": kind, "seed": int(seed),
              "note": "random-initialised weights; no training has touched this model"}
    (stage / MODEL_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed the weight init without disturbing the caller's global torch RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def _build_blip(kind: str, config: dict, ids: dict, seed: int = 0):
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

    config = _deep_merge(config, {"text_config": ids})
    # Not a BlipConfig field: the std of the vision position embedding at init. transformers
    # draws it with the tower's initializer_range (0.02), while the patch embedding of a
    # normalised image comes out ~1 per channel after a few steps, so the position signal is a
    # few percent of every token and a tiny tower trained from scratch for minutes never learns
    # where things are (the decoder's cross-attention has no other position information).
    position_std = config.pop("vision_position_std", None)
    blip_config = BlipConfig(**config)
    cls = BlipForConditionalGeneration if kind == "captioner" else BlipForImageTextRetrieval
    model = cls(blip_config)
    if position_std is not None:
        if not float(position_std) > 0:
            raise ValueError(f"vision_position_std must be > 0, got {position_std!r}")
        embeddings = model.vision_model.embeddings
        # own generator: the captioner and the itm model must get the same tower (BLIP shares it)
        gen = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            embeddings.position_embedding.copy_(
                torch.randn(embeddings.position_embedding.shape, generator=gen) * float(position_std))
    return model, blip_config.vision_config.image_size


def _build_blip2(config: dict, ids: dict, seed: int = 0):
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    if "vision_position_std" in config:
        raise ValueError("vision_position_std is supported for the BLIP kinds (captioner, itm), not blip2-itm")
    qformer = {"vocab_size": ids["vocab_size"], "pad_token_id": ids["pad_token_id"]}
    config = _deep_merge(config, {"qformer_config": qformer})
    if not config["qformer_config"].get("use_qformer_text_input"):
        raise ValueError("blip2-itm config needs qformer_config.use_qformer_text_input=true")
    blip2_config = Blip2Config(**config)
    model = Blip2ForImageTextRetrieval(blip2_config)
    init_query_tokens(model, seed)
    return model, blip2_config.vision_config.image_size


def init_query_tokens(model, seed: int = 0) -> None:
    """Draw a fresh BLIP-2 model's query tokens from N(0, the Q-Former's initializer_range), as
    BLIP-2 does (LAVIS blip2.py, `init_Qformer`). transformers zero-fills them, so all queries
    start (and with no dropout long stay) identical. Drawn from a generator seeded by `seed`:
    the same seed gives the same queries, whatever used the global RNG before."""
    gen = torch.Generator().manual_seed(int(seed))
    std = model.config.qformer_config.initializer_range
    with torch.no_grad():
        model.query_tokens.copy_(torch.randn(model.query_tokens.shape, generator=gen) * std)


def _processor(tokenizer, image_size: int, max_text_length: int):
    """A BlipProcessor sized for the synthetic images (also used for BLIP-2 retrieval, whose
    Q-Former takes BERT input ids, not the LLM's image tokens)."""
    from transformers import BlipImageProcessor, BlipProcessor

    tokenizer.model_max_length = int(max_text_length)  # longer text would overflow positions
    image_processor = BlipImageProcessor(
        size={"height": int(image_size), "width": int(image_size)},
        image_mean=list(BLIP_IMAGE_MEAN),
        image_std=list(BLIP_IMAGE_STD),
    )
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _init_clip(config: dict, out: Path, seed: int) -> Path:
    import open_clip
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file

    if "model_cfg" not in config:
        raise ValueError("clip config needs a 'model_cfg' entry (open_clip model config)")
    with _seeded(seed):
        model = open_clip.CLIP(**config["model_cfg"])
    # open_clip keeps its preprocessing statistics on the visual tower; set ours before saving.
    pre = config.get("preprocess_cfg", {})
    model.visual.image_mean = tuple(pre.get("mean", BLIP_IMAGE_MEAN))
    model.visual.image_std = tuple(pre.get("std", BLIP_IMAGE_STD))
    model.visual.preprocess_cfg = {k: v for k, v in pre.items() if k not in ("mean", "std")}
    model.eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    save_config_for_hf(model, out / CLIP_CONFIG, model_config=config["model_cfg"])
    return out


def load_clip(model_dir):
    """(model, preprocess, tokenizer) of a tiny CLIP directory, through open_clip's loaders."""
    import open_clip

    spec = clip_spec(model_dir)
    model, _, preprocess = open_clip.create_model_and_transforms(spec)
    return model.eval(), preprocess, open_clip.get_tokenizer(spec)
