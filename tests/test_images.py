"""Image decoding: every common pixel format, and refusals for what must not be decoded."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from patchcore_trt.images import ImageError, collect_images, load_image


def _save(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def test_rgb_png_matches_anomalibs_scaling(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    image = load_image(_save(tmp_path / "rgb.png", array))
    assert image.shape == (3, 40, 50) and image.dtype == np.float32
    np.testing.assert_allclose(image, array.transpose(2, 0, 1) / 255.0, atol=1e-7)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    array = np.random.default_rng(1).integers(0, 256, (40, 40), dtype=np.uint8)
    image = load_image(_save(tmp_path / "gray.png", array))
    assert image.shape == (3, 40, 40)
    np.testing.assert_array_equal(image[0], image[2])


def test_rgba_drops_alpha(tmp_path):
    array = np.zeros((40, 40, 4), dtype=np.uint8)
    array[..., 0] = 200
    array[..., 3] = 10
    image = load_image(_save(tmp_path / "rgba.png", array))
    assert image.shape == (3, 40, 40)
    assert image[0].max() == pytest.approx(200 / 255)


def test_16_bit_keeps_its_range(tmp_path):
    array = np.full((40, 40), 65535, dtype=np.uint16)
    array[0, 0] = 32768
    path = tmp_path / "deep.png"
    Image.fromarray(array).save(path)
    image = load_image(path)
    assert image.max() == pytest.approx(1.0)
    assert image[0, 0, 0] == pytest.approx(32768 / 65535, abs=1e-6)


def test_palette_image(tmp_path):
    path = tmp_path / "palette.png"
    Image.new("P", (40, 40), color=3).save(path)
    assert load_image(path).shape == (3, 40, 40)


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("L", (5000, 5000)).save(path)  # tiny file, 25 MP
    with pytest.raises(ImageError, match="over the limit"):
        load_image(path, max_pixels=1_000_000)


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"not an image at all", "not an image"), (b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, "")],
    ids=["text", "truncated-png"],
)
def test_unreadable_files_say_why(tmp_path, content, reason):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason):
        load_image(path)


def test_truncated_real_png(tmp_path):
    array = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    good = _save(tmp_path / "good.png", array)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(cut)


def test_too_small_image(tmp_path):
    with pytest.raises(ImageError, match="too small"):
        load_image(_save(tmp_path / "tiny.png", np.zeros((8, 8), dtype=np.uint8)))


def test_collect_files_folders_and_globs(tmp_path):
    for name in ("a/1.png", "a/b/2.jpg", "c.png", "notes.txt"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    found, unmatched = collect_images([str(tmp_path / "a"), str(tmp_path / "*.png"), str(tmp_path / "missing")])
    assert [p.name for p in found] == ["1.png", "2.jpg", "c.png"]
    assert unmatched == [str(tmp_path / "missing")]
