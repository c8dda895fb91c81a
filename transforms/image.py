"""Decode and validate web images: bytes in, an RGB ``PIL.Image`` out, or a typed error.

Every stage that touches pixels goes through :func:`decode_image`, so the rules live here:

* **Decompression bombs.** The pixel count is read from the header (``Image.open`` parses only
  the header) and checked against ``max_pixels`` *before* any pixel is decoded. PIL's own
  ``DecompressionBombError`` (and the warning, when a caller runs with warnings as errors) is
  mapped to the same ``too_large`` reason. The global ``Image.MAX_IMAGE_PIXELS`` is left alone:
  other code in the process may rely on it.
* **Truncation.** PIL only reports a truncated file while ``ImageFile.LOAD_TRUNCATED_IMAGES``
  is false, and any library in the process may flip that global. The bytes are therefore read
  through a stream that records a read past the end while pixels are decoded, so a truncated
  file is reported whatever the global says (it is never changed here).
* **Decoded size.** With ``draft_side``, a JPEG whose shorter side is at least twice that is
  decoded at a reduced scale by libjpeg itself (1/2, 1/4 or 1/8: Pillow's ``Image.draft``), the
  strongest reduction that keeps both sides >= ``draft_side``, so a tiny file that declares 6000x6000 costs
  a 1500x1500 image instead of a 108 MB one. ``max_pixels`` still applies to the size the file
  declares; ``info["source_size"]`` of the result is that size, upright. Other formats, and
  JPEGs below twice ``draft_side``, are decoded at full size, pixel for pixel as without it.
* **Orientation.** EXIF orientation is applied (``ImageOps.exif_transpose``), so a photo
  taken sideways reaches the captioner upright and ``width``/``height`` describe what it sees.
* **Formats.** Only formats a web image comes in are opened (``WEB_FORMATS``, Pillow's
  ``formats=``): Pillow also reads EPS (through Ghostscript, a program it runs), PSD, FITS and
  some thirty more, none of which a crawl should hand to a decoder. Anything else is
  ``not_an_image``; JPEG 2000 is named and ``unsupported``.
* **Modes.** Palette, alpha (composited onto white, as a browser shows it on a white page),
  CMYK, LA, 1-bit, 16-bit (``I;16*``), 32-bit integer ``I`` and float ``F`` images become RGB.

Pillow has no single call for "validate and normalise untrusted bytes with a typed reason",
which is why this module exists; the decoding itself is all Pillow's.
"""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000  # ~ 7700 x 5200; bigger web images are almost never photos
DEFAULT_MIN_SIDE = 8  # smaller than a ViT patch: nothing a captioner can read
DEFAULT_MAX_ASPECT = 20.0  # banners and spacer strips, not scenes
# ``draft_side`` of the stages that feed models (curate, release embeddings, report thumbnails):
# twice the largest input side of the models they load (BLIP 384, BLIP-2 364, open_clip up to
# 512), so every processor still downsamples from more pixels than it keeps
# (docs/benchmarks/decode_memory.md).
DRAFT_SIDE = 1024

REASONS = ("empty", "not_an_image", "truncated", "too_large", "too_small", "bad_aspect", "unsupported")

Image.init()
# MPO is how Pillow opens a JPEG with several pictures (camera files); AVIF where this Pillow has it.
WEB_FORMATS = tuple(f for f in ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF") if f in Image.OPEN)
# JPEG 2000: a file (jP box) or a bare codestream (SOC + SIZ markers).
_JPEG2000_MAGIC = (b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")

# Leading bytes of common formats: a file that starts like an image but that PIL cannot even
# open was cut short (or damaged in its header), which is "truncated", not "not_an_image".
_MAGIC = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
)

# Errors Pillow raises from damaged pixel data (zlib for PNG, struct/EOF for chunk parsing,
# SyntaxError for "broken PNG file").
_DATA_ERRORS = (OSError, SyntaxError, EOFError, ValueError, struct.error, zlib.error, IndexError)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# Modes whose conversion to RGB means what it says. Pillow's LAB/HSV "conversion" copies
# channels rather than converting colour spaces, so those are reported as unsupported.
_CONVERTIBLE_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr") + _ALPHA_MODES


class ImageDecodeError(ValueError):
    """An image that cannot be used. ``reason`` is one of :data:`REASONS` and is meant to be
    stored as data (the ``error_type`` column of an error row); ``str(err)`` starts with it."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown ImageDecodeError reason {reason!r}; expected one of {REASONS}")
        self.reason = reason
        self.message = message
        super().__init__(f"{reason}: {message}")


class _EofTrackingStream(io.BytesIO):
    """A BytesIO that remembers whether a positive-size read came back empty once armed,
    i.e. a decoder asked for bytes past the end of the file."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.armed = False
        self.read_past_end = False

    def read(self, size: int | None = -1) -> bytes:
        out = super().read(size)
        if self.armed and size is not None and size > 0 and not out:
            self.read_past_end = True
        return out


def _check_geometry(width: int, height: int, max_pixels: int, min_side: int, max_aspect: float) -> None:
    pixels = width * height
    if pixels > max_pixels:
        raise ImageDecodeError(
            "too_large", f"{width}x{height} = {pixels} pixels exceeds max_pixels={max_pixels}"
        )
    if min(width, height) < min_side:
        raise ImageDecodeError("too_small", f"{width}x{height} has a side below min_side={min_side}")
    aspect = max(width, height) / min(width, height)
    if aspect > max_aspect:
        raise ImageDecodeError(
            "bad_aspect", f"{width}x{height} has aspect ratio {aspect:.1f} > max_aspect={max_aspect}"
        )


def _open_header(stream: _EofTrackingStream, data: bytes) -> Image.Image:
    """``Image.open`` (header only), with its failures mapped to reasons."""
    if data.startswith(_JPEG2000_MAGIC):
        raise ImageDecodeError("unsupported", "JPEG 2000 is not among the web formats decoded here "
                               f"({', '.join(WEB_FORMATS)})")
    try:
        return Image.open(stream, formats=WEB_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageDecodeError("too_large", f"rejected by Pillow's bomb check: {err}") from err
    except UnidentifiedImageError as err:
        if data.startswith(_MAGIC):
            raise ImageDecodeError("truncated", "header of a known format is cut short or damaged") from err
        head = data[:16]
        raise ImageDecodeError("not_an_image", f"no image format recognises these bytes (start {head!r})") from err
    except _DATA_ERRORS as err:
        raise ImageDecodeError("truncated", f"damaged header: {type(err).__name__}: {err}") from err


def _load_pixels(img: Image.Image, stream: _EofTrackingStream) -> None:
    """Decode the pixels, reporting truncation whatever ``LOAD_TRUNCATED_IMAGES`` says."""
    stream.armed = True
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageDecodeError("too_large", f"rejected by Pillow's bomb check: {err}") from err
    except _DATA_ERRORS as err:
        text = str(err)
        if "decoder" in text and "not available" in text:
            raise ImageDecodeError("unsupported", f"{img.format} {img.mode}: {text}") from err
        raise ImageDecodeError("truncated", f"{img.format} pixel data is cut short or damaged: {text}") from err
    finally:
        stream.armed = False
    if stream.read_past_end:
        raise ImageDecodeError("truncated", f"{img.format} pixel data ends before the image does")


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale to 8-bit ``L``.

    Pillow's own conversion clips these to 0..255 (a 16-bit photo turns white), so scale:
    16-bit by 1/257 (65535 -> 255); ``I`` by its evident range; ``F`` in [0, 1] by 255.
    Anything else is stretched min..max so the picture stays visible.
    """
    arr = np.asarray(img).astype(np.float64)  # (H, W)
    if not np.isfinite(arr).all():
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if img.mode in _SIXTEEN_BIT_MODES or (img.mode == "I" and lo >= 0 and 255 < hi <= 65535):
        arr = arr / 257.0
    elif img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        arr = arr * 255.0
    elif lo < 0 or hi > 255:
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB; transparent pixels become white."""
    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        img = _high_depth_to_l(img)
    if img.mode not in _CONVERTIBLE_MODES:
        raise ImageDecodeError("unsupported", f"{img.format} mode {img.mode} has no faithful RGB conversion")
    has_alpha = img.mode in _ALPHA_MODES or "transparency" in img.info
    try:
        if has_alpha:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB") if img.mode != "RGB" else img
    except (ValueError, OSError) as err:
        raise ImageDecodeError("unsupported", f"cannot convert {img.format} mode {img.mode} to RGB: {err}") from err


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    max_aspect: float = DEFAULT_MAX_ASPECT,
    draft_side: int | None = None,
) -> Image.Image:
    """Decode untrusted image bytes to an upright RGB image.

    The geometry checks (``max_pixels``, ``min_side``, ``max_aspect``) run on the header size,
    before pixels are decoded; they are symmetric in width and height, so EXIF rotation, applied
    afterwards, cannot change their outcome. ``draft_side``: decode a large JPEG at a reduced
    scale (see the module docstring); ``info["source_size"]`` is the upright size the file
    declares. Multi-frame files (GIF, APNG, TIFF) give their first frame. Raises
    :class:`ImageDecodeError` with a ``reason`` from :data:`REASONS`; raises a plain
    ``ValueError`` for a bad argument.
    """
    if max_pixels < 1 or min_side < 1 or max_aspect < 1 or (draft_side is not None and draft_side < 1):
        raise ValueError(
            f"need max_pixels >= 1, min_side >= 1, max_aspect >= 1, draft_side None or >= 1; "
            f"got {max_pixels}, {min_side}, {max_aspect}, {draft_side}"
        )
    if data is None or len(data) == 0:
        raise ImageDecodeError("empty", "no bytes")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"image data must be bytes, got {type(data).__name__}")
    data = bytes(data)

    stream = _EofTrackingStream(data)
    img = _open_header(stream, data)
    width, height = img.size
    _check_geometry(width, height, max_pixels, min_side, max_aspect)
    if draft_side is not None and img.format in ("JPEG", "MPO") and min(width, height) >= 2 * draft_side:
        img.draft(img.mode, (draft_side, draft_side))  # libjpeg's DCT scaling: before any pixel
    _load_pixels(img, stream)
    try:
        upright = ImageOps.exif_transpose(img)
    except _DATA_ERRORS + (KeyError, TypeError):
        # A malformed EXIF block must not cost the image: keep it as stored.
        upright = img
    turned = upright.size != img.size  # a quarter turn
    # The result owns its pixels; the file object behind `img` is only a BytesIO.
    out = _to_rgb(upright)
    out.info["source_size"] = (height, width) if turned else (width, height)
    return out


def encode_jpeg(img: Image.Image, quality: int = 95) -> bytes:
    """JPEG bytes of ``img`` (converted to RGB first); used by synth and the curated shards."""
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    if img.mode != "RGB":
        img = _to_rgb(img)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()
