"""Drawing the synthetic world's scenes with PIL (see `transforms.synth.scenes` for the vocabulary).

Shapes are drawn at 4x the output size and box-filtered down, so edges are anti-aliased the
same way on every platform. Small random jitter (object centre, radius, colour, background
brightness) keeps the images from being pixel-identical without making attributes ambiguous:
a jittered "left" object still sits in the left third of the image and colours stay far
apart. Pixel noise is added at the output resolution so the 4x downsampling does not smooth it.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from capfilt.transforms.synth.scenes import BACKGROUND_COLOURS, COLOURS, Obj, Scene

SUPERSAMPLE = 4
# Slot centres as fractions of the image side (x, y).
SLOT_CENTRES = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
# Radius as a fraction of the side: two large objects in opposite slots still do not touch.
RADIUS = {"small": 0.10, "large": 0.20}
CENTRE_JITTER = 0.03  # fraction of the side
RADIUS_JITTER = 0.10  # relative
COLOUR_JITTER = 12  # per channel, out of 255
NOISE_SIGMA = 10.0  # grey levels, "noisy" backgrounds


def _jitter_colour(rgb, rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    shifted = np.asarray(rgb) + rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(shifted, 0, 255))


def _background(scene: Scene, side: int, rng: np.random.Generator) -> np.ndarray:
    """(side, side, 3) float32 background at the supersampled size, before pixel noise."""
    base = np.asarray(_jitter_colour(BACKGROUND_COLOURS[scene.background_colour], rng, 10),
                      dtype=np.float32)
    canvas = np.broadcast_to(base, (side, side, 3)).copy()
    if scene.background == "gradient":
        angle = rng.uniform(0.0, 2.0 * math.pi)
        ys, xs = np.mgrid[0:side, 0:side].astype(np.float32) / max(side - 1, 1) - 0.5
        ramp = xs * math.cos(angle) + ys * math.sin(angle)  # (side, side), about -0.7..0.7
        canvas *= (1.0 + 0.5 * ramp)[..., None]  # darker on one side, lighter on the other
    return canvas


def _polygon(obj: Obj, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of the shape; None for the circle (drawn as an ellipse)."""
    if obj.shape == "square":
        h = 0.8 * r  # equal-area-ish with the circle so size reads the same for every shape
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if obj.shape == "triangle":  # pointing up, centroid at the slot centre
        return [(cx + 1.1 * r * math.cos(a), cy + 1.1 * r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if obj.shape == "star":  # five points, inner radius 0.45 of the outer
        points = []
        for k in range(10):
            radius = 1.1 * r if k % 2 == 0 else 0.5 * r
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if obj.shape == "cross":  # a plus sign with arms a third of the radius wide
        a, w = r, 0.33 * r
        offsets = [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w),
                   (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)]
        return [(cx + dx, cy + dy) for dx, dy in offsets]
    if obj.shape == "circle":
        return None
    raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """An RGB image of `scene`, `size` x `size` pixels."""
    if size < 16:
        raise ValueError(f"image size {size} is too small to draw shapes (minimum 16)")
    side = size * SUPERSAMPLE
    canvas = Image.fromarray(np.clip(_background(scene, side, rng), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        fx, fy = SLOT_CENTRES[obj.position]
        cx = (fx + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER)) * side
        cy = (fy + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER)) * side
        r = RADIUS[obj.size] * side * (1.0 + rng.uniform(-RADIUS_JITTER, RADIUS_JITTER))
        fill = _jitter_colour(COLOURS[obj.colour], rng, COLOUR_JITTER)
        points = _polygon(obj, cx, cy, r)
        if points is None:
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(points, fill=fill)
    image = canvas.resize((size, size), Image.Resampling.BOX)
    if scene.background == "noisy":
        pixels = np.asarray(image, dtype=np.float32)
        pixels += rng.normal(0.0, NOISE_SIGMA, size=pixels.shape).astype(np.float32)
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    return image
