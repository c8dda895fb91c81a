"""BLIP's [DEC]/[ENC] ids and the ITM text's first token (model/tokens.py)."""
import logging

import pytest
import torch
from transformers import BertTokenizer

from capfilt.model.builders.tiny import load_tokenizer
from capfilt.model.tokens import ItmFirstToken, add_enc_token, enc_token_id, itm_first_token

BERT_BASE_UNCASED = 30522  # the size of the vocabulary BLIP's init_tokenizer starts from
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _bert_vocab(size: int) -> dict:
    """A BERT vocabulary of ``size`` tokens: the specials, then filler words."""
    return {t: i for i, t in enumerate(SPECIALS + [f"w{i}" for i in range(size - len(SPECIALS))])}


def test_blips_init_tokenizer_puts_dec_then_enc_after_the_base_vocabulary():
    """The calls of BLIP's ``init_tokenizer`` (models/blip.py) on a bert-base-uncased-sized
    vocabulary: [DEC] becomes 30522 and [ENC] 30523, the last of the 30,524 rows of BLIP's text
    models (configs/med_config.json vocab_size)."""
    tokenizer = BertTokenizer(vocab=_bert_vocab(BERT_BASE_UNCASED), do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    assert (tokenizer.bos_token_id, len(tokenizer)) == (30522, 30524)
    assert enc_token_id(tokenizer, 30524) == (30523, "[ENC] is token 30523 of the tokenizer")
    # a processor saved with [DEC] only: [ENC] is the model's one extra row, after [DEC]
    dec_only = BertTokenizer(vocab=_bert_vocab(BERT_BASE_UNCASED), do_lower_case=True, bos_token="[DEC]")
    dec_only.add_special_tokens({"bos_token": "[DEC]"})
    token_id, reason = enc_token_id(dec_only, 30524)
    assert token_id == 30523 and "ends with [DEC] (id 30522)" in reason
    assert add_enc_token(dec_only, 30524) and dec_only.convert_tokens_to_ids("[ENC]") == 30523
    assert len(dec_only) == 30524 and not add_enc_token(dec_only, 30524)  # already there


def test_the_tiny_tokenizer_carries_enc_as_its_last_token(tiny_tokenizer):
    tokenizer = load_tokenizer(tiny_tokenizer)
    size = len(tokenizer)
    assert tokenizer.convert_tokens_to_ids("[DEC]") == size - 2 == tokenizer.bos_token_id
    assert enc_token_id(tokenizer, size) == (size - 1, f"[ENC] is token {size - 1} of the tokenizer")


@pytest.mark.parametrize("vocab_size, reason", [
    (600, "the tokenizer has no [ENC] token"),  # [DEC] last, but the model has 2 rows more, not 1
    (None, "the tokenizer has no [ENC] token"),  # no [DEC] either
])
def test_no_enc_outside_blips_layout(vocab_size, reason):
    base = _bert_vocab(40)
    tokenizer = BertTokenizer(vocab=base, do_lower_case=True)
    if vocab_size is not None:
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    rows = vocab_size or len(tokenizer) + 1
    assert enc_token_id(tokenizer, rows) == (None, reason)
    assert not add_enc_token(tokenizer, rows) and tokenizer.convert_tokens_to_ids("[ENC]") == tokenizer.unk_token_id


def test_an_enc_beyond_the_models_rows_is_not_used():
    tokenizer = BertTokenizer(vocab=_bert_vocab(40), do_lower_case=True, bos_token="[DEC]",
                              additional_special_tokens=["[ENC]"])
    enc = tokenizer.convert_tokens_to_ids("[ENC]")
    assert enc_token_id(tokenizer, enc) == (None, f"the tokenizer's [ENC] (id {enc}) is outside the model's {enc} rows")


def test_itm_first_token_resolves_logs_and_applies(tiny_tokenizer, caplog):
    tokenizer = load_tokenizer(tiny_tokenizer)
    size = len(tokenizer)
    with caplog.at_level(logging.INFO, logger="capfilt.model.tokens"):
        enc = itm_first_token("enc", tokenizer, size, "m")
        cls = itm_first_token("cls", tokenizer, size, "m")
        fallback = itm_first_token("enc", tokenizer, size - 1, "m")  # the model has no row for [ENC]
    assert (enc.used, enc.token_id, cls.used, cls.token_id, fallback.used) == ("enc", size - 1, "cls", None, "cls")
    assert f"m: ITM text starts with [ENC] (id {size - 1})" in caplog.text
    assert "m: ITM text starts with [CLS] (itm_first_token cls)" in caplog.text
    assert any(r.levelname == "WARNING" and "starts with [CLS], not [ENC]" in r.getMessage() for r in caplog.records)
    ids = torch.tensor([[2, 7, 9, 3], [2, 5, 3, 0]])
    assert enc.apply(ids).tolist() == [[size - 1, 7, 9, 3], [size - 1, 5, 3, 0]]
    assert ids[0, 0] == 2  # a copy: the caller's ids (the ITC pass) keep [CLS]
    assert cls.apply(ids) is ids and ItmFirstToken("enc", None, "").used == "cls"
    with pytest.raises(ValueError, match=r"itm_first_token must be one of \('enc', 'cls'\), got 'ENC'"):
        itm_first_token("ENC", tokenizer, size)
