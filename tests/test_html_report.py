"""The HTML report on real predictions and a real parity proof, read back as text and in a headless Chromium."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, unavailable
from PIL import Image

from patchcore_trt.artifact import read_onnx_metadata
from patchcore_trt.html_report import (
    ContactSheet,
    Panel,
    ReportData,
    metadata_rows,
    sheet_of_predictions,
    thumbnail,
    write_html_report,
)
from patchcore_trt.runtime import open_backend
from patchcore_trt.verify import FOOTNOTE, backend_parity, table_rows
from patchcore_trt.visuals import encode_png

# File names a report must show as they are, never run: markup, entities, quotes, rich markup, undecodable bytes.
HOSTILE_NAMES = (
    "<img src=x onerror=alert(1)>.png",
    "a&amp;b \"quoted\" 'single'.png",
    "[bold]rich[/bold].png",
    os.fsdecode(b"bad-\xff\xfe.png"),
    "</figure><script>alert(2)</script>.png",
    "plain.png",
)
CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.usefixtures("chromium")


@pytest.fixture()
def chromium() -> str:
    if CHROMIUM is None:
        unavailable("chromium is not installed (apt-get install -y chromium); the browser checks need it")
    return CHROMIUM


class _Page(HTMLParser):
    """Every element (tag, attributes) and the visible text of a page."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self._skip = 0
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {key: value or "" for key, value in attrs}))
        self._skip += tag in ("script", "style")

    def handle_endtag(self, tag: str) -> None:
        self._skip -= tag in ("script", "style")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.text.append(data)

    def all(self, tag: str) -> list[dict[str, str]]:
        return [attrs for name, attrs in self.elements if name == tag]

    @property
    def visible(self) -> str:
        return " ".join(" ".join(self.text).split())


@pytest.fixture(scope="module")
def report(resnet18_checkpoint: Path, resnet18_onnx: Path, test_images, tmp_path_factory) -> tuple[Path, ReportData]:
    """A report as predict writes one: real panels (under hostile names), real parity rows, counts and failures."""
    _, images = test_images
    metadata = read_onnx_metadata(resnet18_onnx)
    with open_backend(resnet18_onnx) as backend:
        prediction = backend.predict(images)
        threshold = backend.image_threshold
    sheet, warnings = sheet_of_predictions(
        images,
        prediction,
        HOSTILE_NAMES,
        threshold=threshold,
        pixel_threshold=metadata.postprocess.normalized_pixel_threshold,
        model_size=metadata.model_size,
    )
    rows, _ = backend_parity(resnet18_checkpoint, resnet18_onnx, images, ["onnxruntime"])
    data = ReportData(
        title=f"predict {resnet18_onnx.name} <onnxruntime>",
        model=metadata_rows(metadata, resnet18_onnx),
        counts={
            "scored": len(images),
            "anomalous": int(prediction.pred_label.sum()),
            "failed": 2,
        },
        timings={"total": "1.5 s"},
        threshold=threshold,
        parity_rows=table_rows(rows),
        parity_bar=FOOTNOTE,
        failures=[(HOSTILE_NAMES[0], "not an image <or an unknown format>"), ("missing/", "no image files found")],
        warnings=[*warnings, "big.png: 5000x5000 input downscaled 19.5x: small defects may vanish"],
        panels=sheet.panels(),
        images_total=sheet.total,
    )
    path = write_html_report(tmp_path_factory.mktemp("report") / "out" / "report.html", data)
    return path, data


def test_one_file_that_needs_nothing_outside_it(report) -> None:
    path, data = report
    assert sorted(item.name for item in path.parent.iterdir()) == ["report.html"]  # no .part left behind
    page = _Page(path.read_bytes().decode("utf-8"))  # strict UTF-8, undecodable names included
    references = [value for _, attrs in page.elements for key, value in attrs.items() if key in ("src", "href")]
    assert len(references) == len(data.panels) and all(value.startswith("data:image/") for value in references)
    assert not page.all("link") and not page.all("iframe") and len(page.all("script")) == 1
    policy = next(attrs["content"] for attrs in page.all("meta") if attrs.get("http-equiv"))
    assert "default-src 'none'" in policy and "img-src data:" in policy


def test_user_strings_are_shown_never_run(report) -> None:
    path, data = report
    page = _Page(path.read_text(encoding="utf-8"))
    # Only the panels are images, and the only script is the page's own: no name became markup.
    assert len(page.all("img")) == len(data.panels) == len(HOSTILE_NAMES)
    assert len(page.all("script")) == 1 and len(page.all("figure")) == len(HOSTILE_NAMES)
    shown = [attrs["data-name"] for attrs in page.all("figure")]
    expected = [name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for name in HOSTILE_NAMES]
    assert sorted(shown) == sorted(expected)
    for name in expected:
        assert name in page.visible
    assert data.title in page.visible and "not an image <or an unknown format>" in page.visible


def test_panels_are_sorted_by_score_most_anomalous_first(report) -> None:
    path, data = report
    page = _Page(path.read_text(encoding="utf-8"))
    scores = [float(attrs["data-score"]) for attrs in page.all("figure")]
    assert scores == sorted((panel.score for panel in data.panels), reverse=True)
    labels = [attrs["class"] for attrs in page.all("figure")]
    assert labels == ["anomalous" if panel.label else "normal" for panel in sorted(data.panels, key=lambda p: -p.score)]


def test_parity_proof_counts_and_timings_are_on_the_page(report) -> None:
    path, data = report
    text = _Page(path.read_text(encoding="utf-8")).visible
    for row in data.parity_rows:
        for value in row.values():
            assert str(value) in text
    assert "PASS" in text and FOOTNOTE in text
    for key, value in {**data.counts, **data.timings}.items():
        assert f"{value} {key}" in text
    assert data.warnings[-1] in text


def test_model_section_shows_the_exported_metadata(report, resnet18_onnx: Path) -> None:
    path, _ = report
    metadata = read_onnx_metadata(resnet18_onnx)
    text = _Page(path.read_text(encoding="utf-8")).visible
    for fact in (metadata.backbone, *metadata.layers, metadata.source_checkpoint["sha256"], str(metadata.bank_size)):
        assert fact in text
    assert "x".join(map(str, metadata.model_size)) in text


def test_contact_sheet_keeps_the_most_anomalous_as_small_thumbnails(report) -> None:
    _, data = report
    panels = {panel.name: Image.open(io.BytesIO(panel.image)).convert("RGB") for panel in data.panels}
    sheet = ContactSheet(limit=4, width=300)
    entries = [(f"{round}-{panel.name}", panel) for round in range(5) for panel in data.panels]
    for name, panel in entries:
        sheet.add(name, panel.score, panel.label, np.asarray(panels[panel.name]))
    kept = sheet.panels()
    assert sheet.total == len(entries) and len(kept) == 4
    ranked = sorted(entries, key=lambda entry: entry[1].score, reverse=True)  # stable: ties in arrival order
    assert [panel.name for panel in kept] == [name for name, _ in ranked[:4]]
    for panel in kept:
        with Image.open(io.BytesIO(panel.image)) as picture:
            assert picture.format == "JPEG" and picture.width == 300
    text = _Page(write_html_report_text(ReportData(title="t", panels=kept, images_total=sheet.total))).visible
    assert f"the 4 most anomalous of {len(entries)}" in text


def write_html_report_text(data: ReportData) -> str:
    with tempfile.TemporaryDirectory() as folder:
        return write_html_report(Path(folder) / "r.html", data).read_text(encoding="utf-8")


def test_thumbnail_of_a_small_panel_keeps_its_size(report) -> None:
    _, data = report
    picture = np.asarray(Image.open(io.BytesIO(data.panels[0].image)).convert("RGB"))
    with Image.open(io.BytesIO(thumbnail(picture, width=picture.shape[1] * 2))) as small:
        assert small.size == (picture.shape[1], picture.shape[0])


def test_a_panel_that_is_not_an_image_is_refused() -> None:
    with pytest.raises(ValueError, match="PNG or JPEG"):
        write_html_report_text(ReportData(title="t", panels=[Panel("x", 0.5, True, b"GIF89a")]))


def _chromium(*arguments: str, url: Path) -> subprocess.CompletedProcess[bytes]:
    # The flags keep a headless Chromium off the (closed) network and out of any profile of the machine.
    with tempfile.TemporaryDirectory() as profile:
        command = [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            *arguments,
            url.resolve().as_uri(),
        ]
        return subprocess.run(command, capture_output=True, timeout=120, check=True)


def _settled_dom(path: Path, attempts: int = 5) -> str:
    """The DOM once the page's script has set its marker. img.decode() settles off Chromium's virtual clock, so on a
    busy machine the dump can come first (a bare <body>); a page whose script never runs fails every attempt."""
    for _ in range(attempts):
        dom = _chromium("--virtual-time-budget=10000", "--dump-dom", url=path).stdout.decode("utf-8")
        if re.search(r"<body[^>]*data-images-loaded=", dom):
            return dom
    raise AssertionError(f"the page's script did not run in {attempts} loads: {dom[:500]}")


def _loaded_marker(dom: str) -> str:
    marker = re.search(r'<body[^>]*data-images-loaded="([^"]*)"', dom)
    assert marker is not None, dom[:500]
    return marker.group(1)


@needs_chromium
def test_browser_decodes_every_panel_and_shows_the_figures(report) -> None:
    path, data = report
    dom = _settled_dom(path)
    assert _loaded_marker(dom) == f"{len(data.panels)}/{len(data.panels)}"
    text = _Page(dom).visible
    assert "PASS" in text and f"{data.counts['scored']} scored" in text
    for panel in data.panels:
        assert panel.name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") in text


@needs_chromium
def test_browser_marker_counts_an_image_that_does_not_decode(report, tmp_path: Path) -> None:
    _, data = report
    good = encode_png(np.asarray(Image.open(io.BytesIO(data.panels[0].image)).convert("RGB")))
    # A PNG whose header checksum is damaged does not decode. (Chromium shows a PNG cut short, or with damaged
    # pixel data, as far as it can and calls that decoded: the marker cannot see those.)
    damaged = good[:29] + bytes(byte ^ 0xFF for byte in good[29:33]) + good[33:]
    broken = Panel("broken.png", 0.9, True, damaged)
    path = write_html_report(tmp_path / "r.html", ReportData(title="t", panels=[broken, data.panels[0]]))
    assert _loaded_marker(_settled_dom(path)) == "1/2"


@needs_chromium
def test_browser_screenshot_is_a_real_picture_of_the_page(report, tmp_path: Path) -> None:
    path, _ = report
    shot = tmp_path / "report.png"
    _chromium("--hide-scrollbars", "--window-size=1280,1800", f"--screenshot={shot}", url=path)
    with Image.open(shot) as picture:
        assert picture.format == "PNG" and picture.size == (1280, 1800)
        pixels = np.asarray(picture.convert("RGB"), dtype=np.float32)
    assert shot.stat().st_size > 50_000
    assert pixels.std() > 20  # not a blank page
    # The panels' heat map colours are on it (saturated reds and blues the page's own style never uses).
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    blue = (pixels[..., 2] > 200) & (pixels[..., 0] < 60) & (pixels[..., 1] < 60)
    assert red.sum() > 100 and blue.sum() > 1000


@pytest.fixture(scope="module")
def command_pages(resnet18_checkpoint: Path, resnet18_onnx: Path, dataset, tmp_path_factory) -> dict[str, Path]:
    """The pages the commands themselves write: ``predict --report`` and ``verify --report``."""
    folder = tmp_path_factory.mktemp("command_pages")
    pages = {"predict": folder / "predict.html", "verify": folder / "verify.html"}
    images = (dataset.test_good, dataset.test_defect)
    predicted = run_cli("predict", resnet18_onnx, *images, "--report", pages["predict"])
    assert predicted.returncode == 0, predicted.stderr
    verified = run_cli(
        "verify", resnet18_checkpoint, *images, "--onnx", resnet18_onnx, "--backends", "onnxruntime",
        "--report", pages["verify"],
    )  # fmt: skip
    assert verified.returncode == 0, verified.stderr
    return pages


def test_verify_report_holds_the_parity_proof_and_a_panel_per_image(command_pages) -> None:
    page = _Page(command_pages["verify"].read_text(encoding="utf-8"))
    text = page.visible
    assert "PASS" in text and "onnxruntime" in text and FOOTNOTE in text
    assert "6 images" in text and "1/1 backends passed" in text
    assert len(page.all("img")) == 6
    assert not any(attrs.get("src", "").startswith(("http:", "https:", "//")) for attrs in page.all("img"))


@needs_chromium
@pytest.mark.parametrize("command", ["predict", "verify"])
def test_browser_decodes_every_panel_of_a_page_a_command_wrote(command, command_pages) -> None:
    dom = _settled_dom(command_pages[command])
    assert _loaded_marker(dom) == "6/6"  # every panel the command drew decodes in a real browser
    assert ("6 scored" if command == "predict" else "PASS") in _Page(dom).visible
