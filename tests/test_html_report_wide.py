"""A wide image's panel stays readable on the page: in a real (headless) Chromium its picture is as tall as an
ordinary image's, not a strip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from test_html_report import _chromium, chromium, needs_chromium  # noqa: F401 - chromium: the fixture

from patchcore_trt.artifact import read_onnx_metadata
from patchcore_trt.html_report import ReportData, sheet_of_predictions, write_html_report
from patchcore_trt.runtime import open_backend
from patchcore_trt.visuals import panel_layout

WINDOW = (1280, 1400)


def _shown_height(page: Path, shot: Path) -> int:
    """How many screen rows the page's one panel covers: rows mostly of neither the page's nor the figure's own
    background (the panel's picture is dark or coloured across its width)."""
    _chromium("--hide-scrollbars", f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={shot}", url=page)
    with Image.open(shot) as picture:
        pixels = np.asarray(picture.convert("RGB"), dtype=np.int16)
    backgrounds = np.array([(246, 248, 250), (255, 255, 255)])
    plain = (np.abs(pixels[:, :, None, :] - backgrounds).max(axis=3) <= 3).any(axis=2)
    return int(((~plain).mean(axis=1) > 0.5).sum())


@needs_chromium
def test_a_wide_image_panel_is_as_tall_on_the_page_as_an_ordinary_one(resnet18_onnx, test_images, tmp_path) -> None:
    _, images = test_images
    ordinary = images[:1]
    wide = np.concatenate([images[0]] * 9, axis=2)[None]  # 300 x 3060: a line-scan camera's strip
    metadata = read_onnx_metadata(resnet18_onnx)
    heights = []
    for name, batch in (("ordinary", ordinary), ("wide", wide)):
        with open_backend(resnet18_onnx) as backend:
            prediction = backend.predict(batch)
        sheet, _ = sheet_of_predictions(batch, prediction, [f"{name}.png"], threshold=metadata.image_threshold,
                                        pixel_threshold=metadata.postprocess.normalized_pixel_threshold,
                                        model_size=metadata.model_size)  # fmt: skip
        page = write_html_report(tmp_path / f"{name}.html", ReportData(title=name, panels=sheet.panels()))
        heights.append(_shown_height(page, tmp_path / f"{name}.png"))
    ordinary_height, wide_height = heights
    assert ordinary_height > 200  # the measure sees a real panel
    assert wide_height >= ordinary_height, heights
    assert len({box[1] for box in panel_layout(wide.shape[2:]).tiles}) == 4  # its four tiles, one under another
