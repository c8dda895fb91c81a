"""capfilt.transforms.text: BLIP's pre_caption rules, plus the web-text repair that runs before them
(bytes, HTML, Unicode, control characters)."""
import pytest

from capfilt.transforms.text import DEFAULT_MAX_WORDS, clean_caption, normalize_text

CASES = [
    # BLIP's pre_caption rules
    ("lowercase", "A Dog ON the Beach", "a dog on the beach"),
    ("blip_punct_to_space", 'a "dog" (brown)* #1: run; now~ go! end.', "a dog brown 1 run now go end"),
    ("kept_punct", "it's a red-car, 2 dogs & 1/2 cat?", "it's a red-car, 2 dogs & 1/2 cat?"),
    ("collapse_spaces", "a   dog    runs", "a dog runs"),
    ("strip_trailing_newline", "a dog runs.\n", "a dog runs"),
    ("strip_edges", "   a dog   ", "a dog"),
    ("ellipsis_only", "...", ""),
    # whitespace controls separate words; other controls vanish
    ("tab_newline_are_breaks", "a\tdog\r\nruns", "a dog runs"),
    ("nul_and_bell_dropped", "a d\x00o\x07g", "a dog"),
    ("zero_width_dropped", "zero\u200bwidth\ufeff join", "zerowidth join"),
    ("bidi_override_dropped", "evil\u202etxt.exe", "eviltxt exe"),
    ("lone_surrogate_dropped", "a \ud800dog", "a dog"),
    ("private_use_dropped", "a \ue000dog", "a dog"),
    ("replacement_char_dropped", "caf\ufffd au lait", "caf au lait"),
    # unicode
    ("accents_kept", "Café Crème à Paris", "café crème à paris"),
    ("non_latin_kept", "Собака на пляже 海滩上的狗", "собака на пляже 海滩上的狗"),
    ("nfkc_fullwidth", "\uff21 \uff24\uff4f\uff47", "a dog"),
    ("nfkc_ligature", "\ufb01sh and \ufb02owers", "fish and flowers"),
    ("nfkc_nbsp_and_ideographic_space", "a\u00a0dog\u3000runs", "a dog runs"),
    ("decomposed_to_composed", "cafe\u0301", "caf\u00e9"),
    ("emoji_kept", "a dog \U0001f436", "a dog \U0001f436"),
    # HTML
    ("entities", "Tom &amp; Jerry &quot;cartoon&quot; &#39;classic&#39; &eacute;t&eacute;",
     "tom & jerry cartoon 'classic' été"),
    ("double_escaped", "salt &amp;amp; pepper", "salt & pepper"),
    ("tags_removed", "<b>Bold</b> dog<br/>on <a href='x'>grass</a>", "bold dog on grass"),
    ("escaped_tags_removed", "&lt;p&gt;a dog&lt;/p&gt;", "a dog"),
    ("script_tag_attrs", '<img src=x onerror="alert(1)">a cat', "a cat"),
    ("comment_removed", "a <!-- hidden --> cat", "a cat"),
    ("unclosed_comment_removed", "a cat <!-- rest of page", "a cat"),
    ("less_than_not_a_tag", "i <3 cats and a < b > c", "i <3 cats and a < b > c"),
    ("tags_only", "<div><span></span></div>", ""),
    # None / empty
    ("none", None, ""),
    ("empty", "", ""),
    ("whitespace_only", " \n\t ", ""),
]


@pytest.mark.parametrize("raw,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_clean_caption(raw, expected):
    assert clean_caption(raw) == expected


@pytest.mark.parametrize(
    "raw,expected",
    [
        (b"a dog on the beach", "a dog on the beach"),
        ("Café".encode("utf-8"), "café"),
        (b"caf\xc3\xa9 \xff\xfe au lait", "café au lait"),  # invalid bytes dropped, not '?'
        (b"a \xe2\x82 dog", "a dog"),  # truncated multi-byte sequence
        (b"\xc0\xaf dog", "dog"),  # overlong encoding of '/' is invalid UTF-8
        (bytearray(b"A Cat."), "a cat"),
        ("a cat".encode("latin-1"), "a cat"),
        (b"", ""),
    ],
)
def test_bytes_are_decoded_as_utf8(raw, expected):
    assert clean_caption(raw) == expected


def test_default_max_words_is_blips():
    assert DEFAULT_MAX_WORDS == 30
    words = [f"w{i}" for i in range(50)]
    assert clean_caption(" ".join(words)).split() == words[:30]


@pytest.mark.parametrize("max_words,expected", [(1, "a"), (3, "a big dog"), (5, "a big dog runs"), (None, "a big dog runs")])
def test_max_words(max_words, expected):
    assert clean_caption("A big... dog  runs!", max_words=max_words) == expected


def test_max_words_counts_words_after_cleaning():
    # "..." and the tag are not words; the punctuation-only tokens must not use up the budget
    assert clean_caption("... <b>one</b> . two ; three four", max_words=3) == "one two three"


@pytest.mark.parametrize("bad", [0, -1, 2.5, "30", True])
def test_bad_max_words(bad):
    with pytest.raises(ValueError, match="max_words"):
        clean_caption("a dog", max_words=bad)


@pytest.mark.parametrize("bad", [12, 3.5, ["a", "dog"]])
def test_non_text_input_is_rejected_with_its_type(bad):
    with pytest.raises(ValueError, match=type(bad).__name__):
        clean_caption(bad)


def test_ten_thousand_character_caption():
    raw = ("A Dog &amp; <i>a</i> Cat. " * 400)[:10_000]
    assert len(raw) == 10_000
    out = clean_caption(raw)
    assert out.split() == ["a", "dog", "&", "a", "cat"] * 6
    unlimited = clean_caption(raw, max_words=None)
    assert unlimited.count("dog") == raw.count("Dog") > 380
    assert "<" not in unlimited and "." not in unlimited


def test_ten_thousand_character_word_is_kept_whole():
    word = "x" * 10_000
    assert clean_caption(word) == word


def test_idempotent():
    raw = "<p>Tom &amp;amp; Jerry\u200b &quot;Ｃａｒｔｏｏｎ&quot;... \x00</p>"
    once = clean_caption(raw)
    assert once == "tom & jerry cartoon"
    assert clean_caption(once) == once


def test_normalize_text_keeps_case_and_punctuation():
    assert normalize_text("<b>Hello</b>, World! &amp;\u200b Ｆine.") == "Hello , World! & Fine."
    assert normalize_text(None) == ""
