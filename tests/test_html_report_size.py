"""The page stays as small as the README promises with panels of real photographs, whose JPEG thumbnails are far
busier (and larger) than the generated parts'."""

from __future__ import annotations

import io
import re
from pathlib import Path

from conftest import photographs
from PIL import Image

from patchcore_trt.artifact import read_onnx_metadata
from patchcore_trt.html_report import (
    PANEL_LIMIT,
    THUMBNAIL_BYTES,
    THUMBNAIL_WIDTH,
    ContactSheet,
    ReportData,
    write_html_report,
)
from patchcore_trt.runtime import open_backend
from patchcore_trt.visuals import render_panel

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_limit_bytes() -> int:
    """The page size the README promises for a full contact sheet ("under N MB in all")."""
    (megabytes,) = re.findall(r"The page keeps the (\d+) most anomalous panels \(.*?under (\d+) MB in all\)",
                              README.read_text(), flags=re.S)  # fmt: skip
    assert int(megabytes[0]) == PANEL_LIMIT
    return int(megabytes[1]) * 1000 * 1000


def test_a_full_page_of_photograph_panels_is_under_the_readmes_size(resnet18_onnx, tmp_path) -> None:
    images = photographs(12)
    metadata = read_onnx_metadata(resnet18_onnx)
    with open_backend(resnet18_onnx) as backend:
        prediction = backend.predict(images)
    drawn = [
        render_panel(image, prediction.anomaly_map[i, 0], prediction.pred_mask[i, 0],
                     score=float(prediction.pred_score[i]), label=bool(prediction.pred_label[i]),
                     threshold=metadata.image_threshold,
                     pixel_threshold=metadata.postprocess.normalized_pixel_threshold, title=f"photo {i:03d}.jpg")
        for i, image in enumerate(images)
    ]  # fmt: skip
    sheet = ContactSheet()
    for index in range(PANEL_LIMIT + 20):  # more than the page keeps, as a long run gives it
        sheet.add(f"photo {index:03d}.jpg", index / 1000, False, drawn[index % len(drawn)])
    panels = sheet.panels()
    assert len(panels) == PANEL_LIMIT
    page = write_html_report(tmp_path / "report.html", ReportData(title="photos", panels=panels,
                                                                  images_total=sheet.total))  # fmt: skip
    assert page.stat().st_size < _readme_limit_bytes(), page.stat().st_size
    for panel in panels[:: len(drawn)]:
        assert len(panel.image) <= THUMBNAIL_BYTES
        with Image.open(io.BytesIO(panel.image)) as picture:  # still a readable picture, not a smudge
            assert picture.format == "JPEG" and picture.width == THUMBNAIL_WIDTH
