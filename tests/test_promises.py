"""Behaviour the README promises that no other test pinned down: --debug, the 64 MP default, float images in
0..65535, and pred_mask as anomalib computes it."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import error_line, run_cli
from PIL import Image

from patchcore_trt.images import MAX_PIXELS, ImageError, load_image
from patchcore_trt.runtime import open_backend
from patchcore_trt.verify import anomalib_predictions


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` and holds one row of pixel data: only a check of the header
    can answer before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" + bytes(3 * width))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return path


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    missing = tmp_path / "missing.onnx"
    plain = run_cli("predict", missing, tmp_path)
    line = error_line(plain)  # one line, no traceback
    debugged = run_cli("--debug", "predict", missing, tmp_path)
    assert debugged.returncode == 1
    assert "Traceback (most recent call last)" in debugged.stderr and "UserError" in debugged.stderr
    assert line.removeprefix("error: ") in debugged.stderr


def test_the_default_pixel_limit_is_64_megapixels(tmp_path):
    assert MAX_PIXELS == 64 * 2**20
    # One row over the limit is refused from the header, before any pixel is decoded.
    with pytest.raises(ImageError, match=f"8192x8193 pixels is over the limit of {MAX_PIXELS:,}"):
        load_image(png_header(tmp_path / "over.png", 8192, 8193))


def test_float_images_up_to_65535_are_scaled_by_65535(tmp_path):
    values = np.linspace(0, 65535, 48 * 40, dtype=np.float32).reshape(48, 40)
    Image.fromarray(values, mode="F").save(tmp_path / "float16bit.tif")
    image = load_image(tmp_path / "float16bit.tif")
    assert image.shape == (3, 48, 40) and image.dtype == np.float32
    np.testing.assert_array_equal(image, np.repeat((values / np.float32(65535))[None], 3, axis=0))
    # Past 65535 no range holds the values: refused, not clipped.
    Image.fromarray(values * 2, mode="F").save(tmp_path / "over.tif")
    with pytest.raises(ImageError, match=r"float pixel values span 0\.\.131070"):
        load_image(tmp_path / "over.tif")


def test_pred_mask_is_anomalibs_own_mask(resnet18_checkpoint, test_images):
    pytest.importorskip("anomalib")
    _, images = test_images
    reference, _, _ = anomalib_predictions(resnet18_checkpoint, images)
    with open_backend(resnet18_checkpoint, "torch") as backend, torch.no_grad():
        prediction = backend.predict(images)
    assert reference.pred_mask.any() and not reference.pred_mask.all()  # the masks mark some pixels, not all
    np.testing.assert_array_equal(prediction.pred_mask, reference.pred_mask)
