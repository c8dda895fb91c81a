"""Caption cleaning: web alt-text in, the text BLIP trains on out.

:func:`clean_caption` ends with the same steps as BLIP's ``pre_caption`` (lowercase; the
characters ``. ! " ( ) * # : ; ~`` become spaces; runs of whitespace collapse; leading and
trailing spaces go; at most ``max_words`` words are kept), so captions cleaned here match what
a BLIP checkpoint saw in training. Commas, apostrophes, hyphens and digits are kept, as BLIP
keeps them. One deliberate difference: BLIP collapses runs of two or more whitespace
characters, leaving a lone tab or newline inside a caption; here every whitespace run becomes
one space, since a word tokenizer treats them alike anyway.

Web text needs more than that first, which BLIP's datasets did not, so it runs before:

1. ``bytes`` are decoded as UTF-8; undecodable bytes are dropped, not turned into ``?``
   (``None`` means "no caption" and gives ``""``);
2. HTML entities are unescaped (repeatedly, since alt-text is often escaped twice:
   ``&amp;amp;``) and HTML tags and comments are removed;
3. Unicode NFKC normalisation folds compatibility forms (full-width letters, ligatures,
   non-breaking spaces) into the plain characters a tokenizer knows;
4. control, format (zero-width, bidi marks), surrogate and private-use characters are dropped;
   whitespace controls (tab, newline, ...) become spaces so the words on either side stay apart.

Everything is a pure function of its input. The standard library (``html``, ``unicodedata``,
``re``) does each step; this module only fixes their order, which no library offers for BLIP.
"""
from __future__ import annotations

import html
import re
import unicodedata

# BLIP's captioning prompt: the decoder starts from it, and caption finetuning masks it out of
# the LM targets. The one place it is written.
BLIP_PROMPT = "a picture of "

DEFAULT_MAX_WORDS = 30  # BLIP's max_words for pre-training captions

# BLIP's pre_caption punctuation set: these become spaces.
_BLIP_PUNCT = re.compile(r'[.!"()*#:;~]')
# A tag starts with a letter (or "/" + letter), so "a < b" and "i <3 cats" survive.
_HTML_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
_HTML_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.DOTALL)
_WHITESPACE = re.compile(r"\s+")
# Unicode categories removed: control, format, surrogate, private use.
_DROP_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co"})
_REPLACEMENT_CHAR = "\ufffd"
_MAX_UNESCAPE_ROUNDS = 3


def _to_text(text: str | bytes | bytearray | None) -> str:
    if text is None:
        return ""
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("utf-8", errors="replace")
    if not isinstance(text, str):
        raise ValueError(f"caption must be str, bytes or None, got {type(text).__name__}: {text!r:.80}")
    return text.replace(_REPLACEMENT_CHAR, "")


def _unescape(text: str) -> str:
    for _ in range(_MAX_UNESCAPE_ROUNDS):
        unescaped = html.unescape(text)
        if unescaped == text:
            break
        text = unescaped
    return text


def _drop_invisible(text: str) -> str:
    """Whitespace controls become spaces; other control/format characters go."""
    return "".join(
        " " if ch.isspace() else ch
        for ch in text
        if ch.isspace() or unicodedata.category(ch) not in _DROP_CATEGORIES
    )


def normalize_text(text: str | bytes | None) -> str:
    """Steps 1-4 of the module docstring: readable Unicode text with case and punctuation
    untouched (for display, e.g. the web caption in a release card)."""
    text = _unescape(_to_text(text))
    text = _HTML_COMMENT.sub(" ", text)
    text = _HTML_TAG.sub(" ", text)
    text = unicodedata.normalize("NFKC", text)
    # NFKC can re-create a replacement character from compatibility forms; drop it again.
    text = _drop_invisible(text).replace(_REPLACEMENT_CHAR, "")
    return _WHITESPACE.sub(" ", text).strip()


def clean_caption(text: str | bytes | None, max_words: int | None = DEFAULT_MAX_WORDS) -> str:
    """The caption BLIP trains on: :func:`normalize_text`, then BLIP's ``pre_caption`` steps.

    ``max_words=None`` keeps every word. Returns ``""`` when nothing readable is left.
    """
    if max_words is not None and (isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 1):
        raise ValueError(f"max_words must be a positive int or None, got {max_words!r}")
    text = normalize_text(text).lower()
    text = _BLIP_PUNCT.sub(" ", text)
    words = _WHITESPACE.sub(" ", text).strip().split(" ") if text.strip() else []
    if max_words is not None:
        words = words[:max_words]
    return " ".join(words)
