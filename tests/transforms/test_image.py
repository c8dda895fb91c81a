"""capfilt.transforms.image: every bad-image kind maps to its typed reason; every supported mode and
EXIF orientation comes out as the right RGB pixels. Images are built in memory, a few pixels
each; the "huge" images are hand-written headers, so nothing big is ever allocated."""
import io
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from capfilt.transforms.image import (
    DEFAULT_MAX_PIXELS,
    REASONS,
    ImageDecodeError,
    decode_image,
    encode_jpeg,
)
from capfilt.transforms.files.hashing import bytes_sha256 as image_sha256


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (8-bit RGB) followed by a 1-byte IDAT: a valid
    header with almost no pixel data, as a decompression bomb's header would look."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00"))
        + _png_chunk(b"IEND", b"")
    )


_JPEG = _encode(_noise(64, 48), "JPEG", quality=90)
_PNG = _encode(_noise(64, 48), "PNG")

BAD_CASES = [
    ("empty_bytes", b"", {}, "empty"),
    ("html_page", b"<!doctype html><html><body>404 Not Found</body></html>", {}, "not_an_image"),
    ("random_bytes", np.random.default_rng(1).bytes(2048), {}, "not_an_image"),
    ("text_caption", "a dog on a beach".encode(), {}, "not_an_image"),
    ("jpeg_cut_in_half", _JPEG[: len(_JPEG) // 2], {}, "truncated"),
    ("jpeg_cut_in_header", _JPEG[:20], {}, "truncated"),
    ("png_cut_in_half", _PNG[: len(_PNG) // 2], {}, "truncated"),
    ("png_missing_idat_end", _PNG[:-40], {}, "truncated"),
    ("png_header_100k_square", _png_header_only(100_000, 100_000), {}, "too_large"),
    # Below Pillow's own bomb limit, above ours: only the header check can catch it.
    ("png_header_over_max_pixels", _png_header_only(8000, 6000), {}, "too_large"),
    ("real_png_over_custom_limit", _PNG, {"max_pixels": 64 * 48 - 1}, "too_large"),
    ("too_small", _encode(_noise(7, 30), "PNG"), {}, "too_small"),
    ("too_small_custom", _PNG, {"min_side": 49}, "too_small"),
    ("extreme_aspect", _encode(_noise(420, 10), "PNG"), {}, "bad_aspect"),
    ("extreme_aspect_tall", _encode(_noise(10, 420), "PNG"), {}, "bad_aspect"),
    ("lab_tiff", _encode(Image.new("LAB", (16, 16)), "TIFF"), {}, "unsupported"),
]


@pytest.mark.parametrize("data,kwargs,reason", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_images_raise_their_reason(data, kwargs, reason):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, **kwargs)
    err = info.value
    assert err.reason == reason
    assert str(err).startswith(reason + ": ")
    assert len(err.message) > 5
    assert isinstance(err, ValueError)


def test_every_reason_is_exercised():
    assert {c[3] for c in BAD_CASES} == set(REASONS)


def test_none_is_empty():
    with pytest.raises(ImageDecodeError) as info:
        decode_image(None)
    assert info.value.reason == "empty"


@pytest.mark.parametrize("flag", [False, True])
@pytest.mark.parametrize("data", [_JPEG[: len(_JPEG) // 2], _PNG[: len(_PNG) // 2]], ids=["jpeg", "png"])
def test_truncation_detected_whatever_the_global_flag(monkeypatch, data, flag):
    # Another library in the process may set LOAD_TRUNCATED_IMAGES; truncation must still show.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", flag)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    assert info.value.reason == "truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is flag


def test_pillow_bomb_error_maps_to_too_large_even_when_our_limit_allows_it():
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageDecodeError) as info:
        decode_image(_png_header_only(100_000, 100_000), max_pixels=10**11)
    assert info.value.reason == "too_large"
    assert "bomb" in str(info.value)
    assert Image.MAX_IMAGE_PIXELS == before


def test_pillow_bomb_warning_as_error_maps_to_too_large():
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageDecodeError) as info:
            decode_image(_png_header_only(10_000, 10_000), max_pixels=10**9)
    assert info.value.reason == "too_large"


def test_geometry_limits_are_inclusive():
    img = decode_image(_encode(_noise(8, 160), "PNG"), min_side=8, max_aspect=20)
    assert img.size == (8, 160)
    assert decode_image(_PNG, max_pixels=64 * 48).size == (64, 48)


@pytest.mark.parametrize("kwargs", [{"max_pixels": 0}, {"min_side": 0}, {"max_aspect": 0.5}])
def test_bad_arguments_are_plain_value_errors(kwargs):
    with pytest.raises(ValueError) as info:
        decode_image(_PNG, **kwargs)
    assert not isinstance(info.value, ImageDecodeError)


def test_non_bytes_input_is_rejected():
    with pytest.raises(ValueError, match="must be bytes"):
        decode_image("not bytes")


# ---------------------------------------------------------------- good images


def _rgb(data: bytes) -> np.ndarray:
    img = decode_image(data)
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)  # (H, W, 3)


def test_rgb_png_round_trips_exactly():
    src = np.asarray(_noise(64, 48))
    assert np.array_equal(_rgb(_PNG), src)


def test_palette_png_with_transparency_goes_white():
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([200, 10, 10] + [10, 200, 10] + [0, 0, 0] * 254)
    pal.paste(1, (0, 0, 8, 16))  # left half green, right half red
    data = _encode(pal, "PNG", transparency=0)  # index 0 (red) is transparent
    out = _rgb(data)
    assert out.shape == (16, 16, 3)
    assert out[0, 0].tolist() == [10, 200, 10]
    assert out[0, 15].tolist() == [255, 255, 255]


def test_palette_png_without_transparency():
    pal = _noise(16, 16).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    out = _rgb(_encode(pal, "PNG"))
    assert np.array_equal(out, np.asarray(pal.convert("RGB")))


def test_rgba_composited_on_white():
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent red
    rgba.paste((0, 0, 255, 255), (0, 0, 8, 16))  # opaque blue left half
    rgba.paste((0, 0, 0, 128), (8, 0, 16, 8))  # half-transparent black top right
    out = _rgb(_encode(rgba, "PNG"))
    assert out[0, 0].tolist() == [0, 0, 255]
    assert out[15, 15].tolist() == [255, 255, 255]
    assert all(abs(v - 127) <= 1 for v in out[0, 15])


def test_la_composited_on_white():
    la = Image.new("LA", (16, 16), (0, 255))
    la.paste((0, 0), (8, 0, 16, 16))  # right half transparent
    out = _rgb(_encode(la, "PNG"))
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, 15].tolist() == [255, 255, 255]


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    data = _encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    r, g, b = _rgb(data)[8, 8]
    assert r > 230 and g < 25 and b < 25


def test_16bit_png_is_scaled_not_clipped():
    values = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    data = _encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out = _rgb(data)
    expected = np.rint(values / 257.0).astype(int)
    assert np.array_equal(out[..., 0], expected)
    assert np.array_equal(out[..., 0], out[..., 2])
    assert out.min() == 0 and out.max() == 255


def test_float_tiff_in_unit_range_is_scaled():
    values = np.linspace(0.0, 1.0, 16 * 16, dtype=np.float32).reshape(16, 16)
    data = _encode(Image.fromarray(values, "F"), "TIFF")
    out = _rgb(data)
    assert np.array_equal(out[..., 1], np.rint(values * 255).astype(int))


def test_grayscale_png_replicates_channels():
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = _rgb(_encode(Image.fromarray(gray, "L"), "PNG"))
    for channel in range(3):
        assert np.array_equal(out[..., channel], gray.astype(int))


def test_bilevel_image():
    img = Image.new("1", (16, 16), 0)
    img.paste(1, (0, 0, 8, 16))
    out = _rgb(_encode(img, "PNG"))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 15].tolist() == [0, 0, 0]


def test_exif_orientation_is_applied():
    # 40x20, red left half and blue right half, stored with orientation 6 ("rotate 90 CW to
    # view"): upright it is 20x40 with red on top.
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(img, "JPEG", quality=95, exif=exif)
    out = decode_image(data)
    assert out.size == (20, 40)
    top, bottom = np.asarray(out)[5, 10].astype(int), np.asarray(out)[35, 10].astype(int)
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_exif_orientation_1_changes_nothing():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 1
    assert decode_image(_encode(img, "JPEG", exif=exif)).size == (40, 20)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("P", (16, 16), i) for i in (1, 2)]
    for f in frames:
        f.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0, 0, 0] * 253)
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert _rgb(buf.getvalue())[0, 0].tolist() == [255, 0, 0]


def test_default_max_pixels_is_a_sane_bound():
    assert 10_000_000 <= DEFAULT_MAX_PIXELS < Image.MAX_IMAGE_PIXELS


# ---------------------------------------------------------------- helpers


def test_encode_jpeg_round_trips_and_converts_modes():
    src = Image.new("RGBA", (32, 24), (10, 120, 230, 255))
    data = encode_jpeg(src, quality=95)
    assert data[:3] == b"\xff\xd8\xff"
    back = decode_image(data)
    assert back.size == (32, 24)
    assert np.abs(np.asarray(back).astype(int) - [10, 120, 230]).max() <= 3
    assert len(encode_jpeg(_noise(64, 48), quality=30)) < len(encode_jpeg(_noise(64, 48), quality=95))


@pytest.mark.parametrize("quality", [0, 101])
def test_encode_jpeg_rejects_bad_quality(quality):
    with pytest.raises(ValueError, match="quality"):
        encode_jpeg(_noise(8, 8), quality=quality)


def test_image_sha256():
    assert image_sha256(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert image_sha256(_PNG) != image_sha256(_JPEG)
    assert len(image_sha256(_PNG)) == 64


def _saved(fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(buf, format=fmt, **params)
    return buf.getvalue()


def test_postscript_is_not_an_image_and_ghostscript_never_runs(tmp_path, monkeypatch):
    """Pillow renders EPS by running Ghostscript: bytes from the web must never start a program."""
    from PIL import EpsImagePlugin

    ran = tmp_path / "gs-ran"
    gs = tmp_path / "bin" / "gs"
    gs.parent.mkdir()
    gs.write_text(f"#!/bin/sh\necho \"$@\" >> {ran}\nexit 1\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{gs.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # Pillow looks for gs again
    eps = _saved("EPS")
    assert eps.startswith(b"%!PS-Adobe")
    with pytest.raises(ImageDecodeError) as exc:
        decode_image(eps)
    assert exc.value.reason == "not_an_image"
    assert not ran.exists()


@pytest.mark.parametrize("fmt", ["PPM", "PCX", "TGA", "SGI", "ICO"])
def test_formats_no_web_page_serves_as_a_photo_are_not_images(fmt):
    with pytest.raises(ImageDecodeError) as exc:
        decode_image(_saved(fmt))
    assert exc.value.reason == "not_an_image"


def test_jpeg2000_is_refused_as_unsupported_by_name():
    with pytest.raises(ImageDecodeError) as exc:
        decode_image(_saved("JPEG2000"))
    assert exc.value.reason == "unsupported" and "JPEG 2000" in exc.value.message


@pytest.mark.parametrize("fmt, params", [("JPEG", {}), ("PNG", {}), ("WEBP", {}), ("GIF", {}), ("BMP", {}),
                                         ("TIFF", {})])
def test_every_web_format_decodes(fmt, params):
    img = decode_image(_saved(fmt, **params))
    assert img.size == (32, 24) and img.mode == "RGB"


# --- decoded size (draft_side) -------------------------------------------------------------------

def declared_jpeg(width: int, height: int) -> bytes:
    """A JPEG of a few hundred bytes whose header declares width x height (libjpeg fills the
    missing scan with grey, so it decodes)."""
    data = bytearray(_encode(Image.new("RGB", (16, 16), (120, 50, 200)), "JPEG", quality=10))
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_a_tiny_jpeg_declaring_6000x6000_is_decoded_at_a_reduced_scale():
    data = declared_jpeg(6000, 6000)
    assert len(data) < 1000
    img = decode_image(data, draft_side=1024)
    assert img.size == (1500, 1500) and img.mode == "RGB"  # 1/4: the strongest keeping >= 1024
    assert img.info["source_size"] == (6000, 6000)
    assert decode_image(declared_jpeg(6000, 3000), draft_side=1024).size == (3000, 1500)  # 1/2: 1500 >= 1024
    assert decode_image(declared_jpeg(6000, 6000), draft_side=700).size == (750, 750)  # 1/8
    with pytest.raises(ImageDecodeError, match="too_large"):  # max_pixels is the declared size's
        decode_image(data, draft_side=1024, max_pixels=6000 * 6000 - 1)


@pytest.mark.parametrize("make", [
    lambda: _encode(_noise(2047, 1200), "JPEG", quality=90),   # shorter side below 2 x 1024
    lambda: _encode(_noise(64, 48), "JPEG", quality=90),       # a synth-world size
    lambda: _encode(_noise(2100, 2100), "PNG"),                # not a JPEG
])
def test_images_that_are_not_reduced_decode_to_the_same_pixels(make):
    data = make()
    plain, drafted = decode_image(data), decode_image(data, draft_side=1024)
    assert np.array_equal(np.asarray(plain), np.asarray(drafted))
    assert drafted.info["source_size"] == plain.size


def test_a_reduced_photo_keeps_its_upright_source_size():
    exif = Image.Exif()
    exif[0x0112] = 6  # a quarter turn
    data = _encode(_noise(4096, 2560), "JPEG", quality=80, exif=exif)
    img = decode_image(data, draft_side=1024)
    assert img.size == (1280, 2048)  # 1/2 (2560 // 1024 = 2), then turned upright
    assert img.info["source_size"] == (2560, 4096)
