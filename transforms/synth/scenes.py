"""The synthetic noisy-web world: its vocabulary, scenes, captions and caption noise.

A scene is 1-2 flat objects (shape, colour, size, position) on a simple background. Every clean
caption names the colour, shape and position of every object (size and background are optional),
so a caption can be checked against the scene it describes; `parse_caption` reads those
attributes back, which is how generated captions are scored for attribute accuracy.

The world is deliberately small (5 shapes, 8 well-separated colours, 2 sizes, 5 positions) so
that tiny BLIP/CLIP models learn it in minutes on a CPU. No library generates such a world, so
this module is ours. Rendering is in `transforms.synth.render`, shard writing in
`transforms.synth.world`.

Positions are absolute (left/right/top/bottom/center), so images must never be flipped
horizontally anywhere in the project: a flip would make "on the left" captions wrong.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from capfilt.transforms.text import BLIP_PROMPT as CAPTION_PROMPT

SHAPES = ("circle", "square", "triangle", "star", "cross")
# Saturated, far-apart RGB values: easy to tell apart even after JPEG at 64 px.
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 20),
    "orange": (245, 130, 15),
    "purple": (140, 40, 180),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
# Two objects only in opposite slots, so they never overlap even when both are large.
TWO_OBJECT_LAYOUTS = (("left", "right"), ("top", "bottom"))
# Muted mid-tones: every object colour (white and black included) contrasts with all of them,
# and none of their names is an object colour.
BACKGROUND_COLOURS = {
    "gray": (128, 128, 128),
    "beige": (185, 170, 135),
    "slate": (90, 105, 125),
    "sage": (125, 150, 120),
}
BACKGROUND_KINDS = ("plain", "gradient", "noisy")
ATTRIBUTES = ("colour", "shape", "position")  # the ones attribute noise may corrupt
NOISE_TYPES = ("correct", "other", "attribute", "junk")

# Phrasings. Several per slot so that the words are not one template.
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
POSITION_PHRASES = {
    "left": ("on the left", "on the left side", "at the left"),
    "right": ("on the right", "on the right side", "at the right"),
    "top": ("at the top", "near the top", "on the top"),
    "bottom": ("at the bottom", "near the bottom", "on the bottom"),
    "center": ("in the center", "in the middle", "at the center"),
}
CLAUSES = (  # one object and its position; {obj} is the noun phrase with its article
    "{obj} {pos}",
    "there is {obj} {pos}",
    "{pos} there is {obj}",
    "{obj} sits {pos}",
    "{obj} placed {pos}",
)
PAIRS = ("{a} and {b}", "{a}, {b}", "two shapes: {a} and {b}", "{a} and also {b}")
BACKGROUND_PHRASES = {
    "plain": ("on a plain {c} background", "on a {c} background"),
    "gradient": ("on a {c} gradient", "over a {c} gradient background"),
    "noisy": ("on a grainy {c} background", "on a noisy {c} background"),
}
JUNK_TEMPLATES = (  # alt-text as scraped from the web; "{n}" is a random number
    "IMG_{n}.jpg", "DSC{n}.JPG", "image ({n}).png", "photo_{n}.jpeg", "screenshot {n}.png",
    "click here to enlarge", "stock photo", "image may contain: text", "no description available",
    "thumbnail", "copyright all rights reserved", "untitled", "product image {n}",
    "https://cdn.example.com/img/{n}.jpg", "www.example.org/gallery?id={n}", "",
)

# A row of truth.parquet: one per image of every split. `caption` is the caption the row was
# given (the web caption, or the clean one for human/test). Attribute lists have one entry per
# object, in caption order. `wrong_*` describe attribute noise and are null otherwise.
TRUTH_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("split", pa.string()),
        ("noise_type", pa.string()),
        ("caption", pa.string()),
        ("true_caption", pa.string()),
        ("n_objects", pa.int32()),
        ("shapes", pa.list_(pa.string())),
        ("colours", pa.list_(pa.string())),
        ("sizes", pa.list_(pa.string())),
        ("positions", pa.list_(pa.string())),
        ("background", pa.string()),
        ("background_colour", pa.string()),
        ("wrong_attribute", pa.string()),
        ("wrong_object", pa.int32()),
        ("wrong_value", pa.string()),
        ("source_key", pa.string()),  # for "other" noise: whose caption this is
    ]
)


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str  # one of BACKGROUND_KINDS
    background_colour: str  # a key of BACKGROUND_COLOURS

    def signature(self) -> frozenset:
        """What a correct caption must state: (colour, shape, position) per object."""
        return frozenset((o.colour, o.shape, o.position) for o in self.objects)


def _pick(rng: np.random.Generator, options):
    options = tuple(options)
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator, two_object_prob: float = 0.35) -> Scene:
    """A random scene: one object anywhere, or two in opposite slots."""
    if rng.random() < two_object_prob:
        positions = list(_pick(rng, TWO_OBJECT_LAYOUTS))
        if rng.random() < 0.5:
            positions.reverse()  # either object may be named first
    else:
        positions = [_pick(rng, POSITIONS)]
    objects = tuple(
        Obj(_pick(rng, SHAPES), _pick(rng, COLOURS), _pick(rng, SIZES), pos) for pos in positions
    )
    return Scene(objects, _pick(rng, BACKGROUND_KINDS), _pick(rng, BACKGROUND_COLOURS))


def describe(scene: Scene, rng: np.random.Generator) -> str:
    """A clean caption of `scene` in a randomly chosen phrasing (lowercase, no punctuation
    other than the commas and colon of the pair templates)."""
    clauses = []
    for obj in scene.objects:
        noun = f"{obj.colour} {obj.shape}"
        if rng.random() < 0.5:
            noun = f"{_pick(rng, SIZE_WORDS[obj.size])} {noun}"
        noun = f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"
        clauses.append(
            _pick(rng, CLAUSES).format(obj=noun, pos=_pick(rng, POSITION_PHRASES[obj.position]))
        )
    text = clauses[0] if len(clauses) == 1 else _pick(rng, PAIRS).format(a=clauses[0], b=clauses[1])
    if rng.random() < 0.4:
        bg = _pick(rng, BACKGROUND_PHRASES[scene.background]).format(c=scene.background_colour)
        text = f"{text} {bg}"
    return text


def corrupt(scene: Scene, rng: np.random.Generator) -> tuple[Scene, str, int, str]:
    """The scene with exactly one attribute of one object changed (a hard negative).

    Returns (wrong scene, attribute name, object index, new value). A new position is one that
    no object of the scene occupies, so the wrong caption never names a real object's slot.
    """
    attribute = _pick(rng, ATTRIBUTES)
    index = int(rng.integers(len(scene.objects)))
    obj = scene.objects[index]
    if attribute == "colour":
        value = _pick(rng, [c for c in COLOURS if c != obj.colour])
        new = Obj(obj.shape, value, obj.size, obj.position)
    elif attribute == "shape":
        value = _pick(rng, [s for s in SHAPES if s != obj.shape])
        new = Obj(value, obj.colour, obj.size, obj.position)
    else:
        taken = {o.position for o in scene.objects}
        value = _pick(rng, [p for p in POSITIONS if p not in taken])
        new = Obj(obj.shape, obj.colour, obj.size, value)
    objects = scene.objects[:index] + (new,) + scene.objects[index + 1 :]
    return Scene(objects, scene.background, scene.background_colour), attribute, index, value


def junk_caption(rng: np.random.Generator) -> str:
    """Alt-text that says nothing about the image: file names, boilerplate, URLs or ""."""
    return _pick(rng, JUNK_TEMPLATES).format(n=int(rng.integers(100, 99999)))


# --- reading captions back -------------------------------------------------------------------

_POSITION_WORDS = {"left": "left", "right": "right", "top": "top", "bottom": "bottom",
                   "center": "center", "middle": "center"}
_CLAUSE_SPLIT = re.compile(r",|\band\b|:")
_WORD = re.compile(r"[a-z]+")


def parse_caption(text: str) -> list[Obj]:
    """The objects a caption states, in order: (colour, shape, position) read per clause.

    Clauses are split at commas, colons and "and"; a clause contributes an object when it has a
    colour word directly before a shape word. Size defaults to "" when not stated; position is
    "" when the clause has none. Works on generated captions too (anything after BLIP's prompt).
    """
    objects = []
    for clause in _CLAUSE_SPLIT.split(text.lower()):
        words = _WORD.findall(clause)
        position = next((_POSITION_WORDS[w] for w in words if w in _POSITION_WORDS), "")
        size = ""
        for w in words:
            for canonical, synonyms in SIZE_WORDS.items():
                if w in synonyms:
                    size = canonical
        for first, second in zip(words, words[1:]):
            if first in COLOURS and second in SHAPES:
                objects.append(Obj(second, first, size, position))
    return objects


def caption_matches(text: str, scene: Scene) -> bool:
    """True when the caption states exactly the scene's objects (colour, shape, position)."""
    stated = parse_caption(text)
    return len(stated) == len(scene.objects) and (
        frozenset((o.colour, o.shape, o.position) for o in stated) == scene.signature()
    )


def corpus(seed: int = 0, n: int = 4000) -> list[str]:
    """Sample captions of the world for training the tokenizer: `n` clean captions, their
    attribute-noise variants, junk alt-text, the captioner prompt, and every vocabulary word
    at least once, in a fixed order for a given seed."""
    rng = np.random.default_rng([int(seed), 0x5EED])
    texts = []
    for i in range(int(n)):
        scene = sample_scene(rng)
        text = describe(scene, rng)
        if i % 4 == 0:
            text = CAPTION_PROMPT + text  # its words must be in the tiny tokenizer's vocabulary
        texts.append(text)
        if i % 3 == 0:
            texts.append(describe(corrupt(scene, rng)[0], rng))
        if i % 5 == 0:
            texts.append(junk_caption(rng))
    words = [*SHAPES, *COLOURS, *POSITIONS, *BACKGROUND_COLOURS, "middle"]
    words += [w for synonyms in SIZE_WORDS.values() for w in synonyms]
    texts.append(" ".join(words))
    texts.extend(t.format(n=12345) for t in JUNK_TEMPLATES if t)
    return texts
