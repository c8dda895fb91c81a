"""BLIP's two added tokens, and which token starts the ITM text.

BLIP's ``init_tokenizer`` (``models/blip.py``) takes bert-base-uncased's 30,522 tokens and adds
``[DEC]`` as the bos token (id 30522), then ``[ENC]`` as its one additional special token (id
30523): 30,524 rows in every BLIP text model. The decoder's input starts with ``[DEC]``; every
image-grounded *encoder* input starts with ``[ENC]`` in place of the tokenizer's ``[CLS]``, in
pretraining, retrieval finetuning and retrieval evaluation (``blip_retrieval.py``,
``train_retrieval.py``, LAVIS ``blip_image_text_matching.py``). transformers'
``BlipForImageTextRetrieval`` feeds ``[CLS]``, so a BLIP checkpoint scored through it is read
with an input it was never trained on.

``itm_first_token`` resolves the choice (``enc`` or ``cls``) against a tokenizer and the text
model's vocabulary size. The ``[ENC]`` id is found in this order:

1. the tokenizer knows ``[ENC]`` (BLIP's layout as capfilt's tiny models and converted
   checkpoints save it): its id, if the text model has a row for it;
2. the tokenizer lacks ``[ENC]`` but ends with ``[DEC]`` as its bos token, and the text model
   has exactly one row more: that row is ``[ENC]``, the one ``init_tokenizer`` appends after
   ``[DEC]`` (a processor saved with ``[DEC]`` only);
3. otherwise there is no ``[ENC]``: the text keeps ``[CLS]``, and the log says so.

The unimodal text encoder (ITC) keeps ``[CLS]`` in BLIP too; only the cross-attending pass
changes. BLIP-2's Q-Former reads ``[CLS]`` in LAVIS, so the choice applies to BLIP only.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

DEC_TOKEN, ENC_TOKEN = "[DEC]", "[ENC]"  # appended in this order after the base vocabulary
ITM_FIRST_TOKENS = ("enc", "cls")


def _known_id(tokenizer, token: str) -> int | None:
    """The id of ``token``, or None when the tokenizer maps it to [UNK] (it does not know it)."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        return None
    return int(token_id)


def enc_token_id(tokenizer, vocab_size: int) -> tuple[int | None, str]:
    """(``[ENC]``'s id or None, how it was found) for a text model of ``vocab_size`` rows."""
    token_id = _known_id(tokenizer, ENC_TOKEN)
    if token_id is not None:
        if token_id < vocab_size:
            return token_id, f"{ENC_TOKEN} is token {token_id} of the tokenizer"
        return None, f"the tokenizer's {ENC_TOKEN} (id {token_id}) is outside the model's {vocab_size} rows"
    size, dec_id = len(tokenizer), _known_id(tokenizer, DEC_TOKEN)
    if dec_id == size - 1 and tokenizer.bos_token == DEC_TOKEN and vocab_size == size + 1:
        return size, (f"the tokenizer ends with {DEC_TOKEN} (id {dec_id}) and the model has one row more, "
                      f"where BLIP's tokenizer puts {ENC_TOKEN}")
    return None, f"the tokenizer has no {ENC_TOKEN} token"


def add_enc_token(tokenizer, vocab_size: int) -> bool:
    """Give a tokenizer that lacks ``[ENC]`` the token, at the id rule 2 of the module docstring
    finds (so that a saved processor names it). True when it was added."""
    if _known_id(tokenizer, ENC_TOKEN) is not None:
        return False
    token_id, _ = enc_token_id(tokenizer, vocab_size)
    if token_id is None:
        return False
    tokenizer.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
    if _known_id(tokenizer, ENC_TOKEN) != token_id:
        raise ValueError(f"adding {ENC_TOKEN} gave id {_known_id(tokenizer, ENC_TOKEN)}, expected {token_id}")
    return True


@dataclass(frozen=True)
class ItmFirstToken:
    """The first token of the ITM text: ``token_id`` replaces ``input_ids[:, 0]``; None keeps the
    tokenizer's ``[CLS]``. ``used`` is ``enc`` or ``cls``."""

    asked: str
    token_id: int | None
    reason: str

    @property
    def used(self) -> str:
        return "cls" if self.token_id is None else "enc"

    def apply(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(T, L) ids with the first column set to ``token_id`` (a copy), or ``input_ids``."""
        if self.token_id is None:
            return input_ids
        ids = input_ids.clone()
        ids[:, 0] = self.token_id
        return ids


def check_choice(choice: str) -> str:
    if choice not in ITM_FIRST_TOKENS:
        raise ValueError(f"itm_first_token must be one of {ITM_FIRST_TOKENS}, got {choice!r}")
    return choice


def itm_first_token(choice: str, tokenizer, vocab_size: int, model_name: str = "") -> ItmFirstToken:
    """Resolve ``enc``/``cls`` for one BLIP model, logging which token its ITM text starts with."""
    check_choice(choice)
    name = f"{model_name}: " if model_name else ""
    if choice == "cls":
        log.info("%sITM text starts with [CLS] (itm_first_token cls); BLIP trained its ITM with %s",
                 name, ENC_TOKEN)
        return ItmFirstToken(choice, None, "asked for [CLS]")
    token_id, reason = enc_token_id(tokenizer, int(vocab_size))
    if token_id is None:
        log.warning("%sITM text starts with [CLS], not %s: %s", name, ENC_TOKEN, reason)
    else:
        log.info("%sITM text starts with %s (id %d): %s", name, ENC_TOKEN, token_id, reason)
    return ItmFirstToken(choice, token_id, reason)
