"""One self-contained HTML page per run: model metadata, the parity proof, counts, timings, failures and a contact
sheet of panels sorted by score, most anomalous first.

The page is a single file that reads offline: images are data URIs, the style and the one script are inline, and
a Content-Security-Policy allows nothing else (no fetch can leave the page, even from a browser extension's
point of view). Every user string (file names with ``<``, ``&``, quotes, ``[bold]``, undecodable bytes) is
escaped. The script sets ``body[data-images-loaded]`` to "decoded/total" once every image has been decoded (or
failed to), so a browser test can tell that the images really render.

Memory and page size stay bounded over any number of images: ``ContactSheet`` keeps only the ``limit`` most
anomalous panels, each as a downscaled JPEG thumbnail.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from patchcore_trt.artifact import ArtifactMetadata
from patchcore_trt.files import display_name, write_text_atomic
from patchcore_trt.runtime.base import Prediction
from patchcore_trt.visuals import Panels, downscale_warning, render_panel

THUMBNAIL_WIDTH = 720
# JPEG qualities tried in turn until a thumbnail fits THUMBNAIL_BYTES: a busy photograph needs a lower one than a
# plain part. 300 panels at most this size, base64-encoded (4/3), keep the page under 8 MB.
THUMBNAIL_QUALITIES = (75, 65, 55, 45)
THUMBNAIL_BYTES = 19_000
PANEL_LIMIT = 300
FAILURE_LIMIT = 500

_MIME = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg"}


@dataclass(frozen=True)
class Panel:
    """One image on the contact sheet: its name, normalised score, label and encoded picture (PNG or JPEG)."""

    name: str
    score: float
    label: bool
    image: bytes


@dataclass(frozen=True)
class ReportData:
    """Everything the page shows. Mappings are shown in their order; values may be any JSON-able data.

    Attributes:
        title: the page's heading (e.g. "predict model.onnx").
        model: the model's metadata (file, SHA-256, backend, thresholds, ...).
        counts: e.g. {"scored": 300, "anomalous": 12, "failed": 1}.
        timings: e.g. {"total": "12.3 s", "per image": "41 ms"}.
        threshold: the normalised image threshold, shown with the contact sheet.
        rule: the label rule in words (``Postprocess.rule``), shown with the contact sheet.
        parity_rows: the parity table (``verify.table_rows``), empty when there is no parity proof.
        parity_bar: the bar the rows are held to, and any footnote.
        failures: (file, reason) for every file that could not be scored.
        warnings: one line each (e.g. inputs downscaled more than 4x).
        panels: the contact sheet, in any order (the page sorts them by score, highest first).
        images_total: how many images had a panel before ``ContactSheet``'s limit (default: len(panels)).
    """

    title: str
    model: Mapping[str, object] = field(default_factory=dict)
    counts: Mapping[str, object] = field(default_factory=dict)
    timings: Mapping[str, object] = field(default_factory=dict)
    threshold: float | None = None
    rule: str | None = None
    parity_rows: Sequence[Mapping[str, object]] = ()
    parity_bar: str | None = None
    failures: Sequence[tuple[str, str]] = ()
    warnings: Sequence[str] = ()
    panels: Sequence[Panel] = ()
    images_total: int | None = None


def thumbnail(panel: np.ndarray, width: int = THUMBNAIL_WIDTH, budget: int = THUMBNAIL_BYTES) -> bytes:
    """A uint8 [H, W, 3] panel as JPEG bytes, downscaled to at most ``width`` pixels wide, at the best quality of
    THUMBNAIL_QUALITIES that fits ``budget`` bytes (the lowest one where none does)."""
    picture = Image.fromarray(panel)
    if picture.width > width:
        height = max(1, round(picture.height * width / picture.width))
        picture = picture.resize((width, height), Image.Resampling.LANCZOS)
    for quality in THUMBNAIL_QUALITIES:
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=quality)
        if buffer.tell() <= budget:
            break
    return buffer.getvalue()


class ContactSheet:
    """Collects panels as they come and keeps the ``limit`` most anomalous as thumbnails (memory stays flat)."""

    def __init__(self, limit: int = PANEL_LIMIT, width: int = THUMBNAIL_WIDTH) -> None:
        self.limit = limit
        self.width = width
        self.total = 0
        self._kept: list[tuple[float, int, Panel]] = []  # a min-heap on (score, -arrival): the weakest on top

    def add(self, name: str, score: float, label: bool, panel: np.ndarray) -> None:
        """Add one image's panel (uint8 [H, W, 3], as ``visuals.render_panel`` draws it)."""
        self.total += 1
        key = (_sort_score(score), -self.total)
        if self.limit <= 0 or (len(self._kept) == self.limit and key <= self._kept[0][:2]):
            return  # not among the most anomalous: no thumbnail is made
        entry = (*key, Panel(name, score, label, thumbnail(panel, self.width)))
        if len(self._kept) < self.limit:
            heapq.heappush(self._kept, entry)
        else:
            heapq.heapreplace(self._kept, entry)

    def panels(self) -> list[Panel]:
        """The kept panels, most anomalous first (ties in arrival order)."""
        return [entry[2] for entry in sorted(self._kept, key=lambda entry: entry[:2], reverse=True)]


class ReportSink:
    """A predict sink: the run on one page (model, counts, timings, failures, notes, the most anomalous panels),
    written when the run closes."""

    def __init__(self, path: Path, header: Mapping[str, Any], panels: Panels, title: str) -> None:
        self.path = Path(path)
        self.header = header
        self.panels = panels
        self.title = title
        self.sheet = ContactSheet()

    def add(self, result: Any, row: Mapping[str, object], image: np.ndarray | None) -> None:
        if result.prediction is None or image is None:
            return
        label = row["label"] == "anomalous"
        self.sheet.add(result.name, float(row["score"]), label, self.panels.panel(result, image))

    def notes(self) -> list[str]:
        return []

    def close(self, summary: Any) -> None:
        timings = {"total": f"{summary.seconds:.1f} s"}
        if summary.done:
            timings["per image"] = f"{1000 * summary.seconds / summary.done:.1f} ms"
        if summary.images_per_second:
            timings["images/s"] = f"{summary.images_per_second:.1f}"
        interrupted = ["interrupted: the page holds what was scored before Ctrl-C"] if summary.interrupted else []
        header = self.header
        data = ReportData(
            title=self.title,
            model={**header["model"], **{key: header[key] for key in ("tool", "versions", "started")}},
            counts={key: getattr(summary, key) for key in ("scored", "anomalous", "failed")},
            timings=timings,
            threshold=self.panels.post.normalized_image_threshold,
            rule=self.panels.post.rule,
            failures=summary.failures,
            warnings=[*summary.notes, *interrupted],
            panels=self.sheet.panels(),
            images_total=self.sheet.total,
        )
        write_html_report(self.path, data)


def sheet_of_predictions(
    images: Sequence[np.ndarray],
    prediction: Prediction,
    names: Sequence[str],
    *,
    threshold: float,
    pixel_threshold: float,
    model_size: tuple[int, int],
    limit: int = PANEL_LIMIT,
) -> tuple[ContactSheet, list[str]]:
    """The panels of a batch scored at once (``verify``'s and ``demo``'s reference), and its downscale warnings."""
    sheet, warnings = ContactSheet(limit), []
    for index, (image, name) in enumerate(zip(images, names, strict=True)):
        warning = downscale_warning(image.shape[1:], model_size)
        if warning is not None:
            warnings.append(f"{name}: {warning}")
        score, label = float(prediction.pred_score[index]), bool(prediction.pred_label[index])
        panel = render_panel(
            image,
            prediction.anomaly_map[index, 0],
            prediction.pred_mask[index, 0],
            score=score,
            label=label,
            threshold=threshold,
            pixel_threshold=pixel_threshold,
            title=name,
            warning=warning,
        )
        sheet.add(name, score, label, panel)
    return sheet, warnings


def metadata_rows(metadata: ArtifactMetadata, path: Path) -> dict[str, object]:
    """What the page's model section shows of an exported graph's metadata."""
    source = metadata.source_checkpoint
    return {
        "file": display_name(path),
        "precision": metadata.precision,
        "backbone": f"{metadata.backbone} ({', '.join(metadata.layers)})",
        "model size": "x".join(map(str, metadata.model_size)),
        "memory bank": f"{metadata.bank_size} x {metadata.embedding_dim}, {metadata.num_neighbors} neighbours",
        "image threshold": metadata.image_threshold,
        "pixel threshold": metadata.postprocess.normalized_pixel_threshold,
        "source checkpoint": " ".join(str(source[key]) for key in ("name", "sha256") if key in source),
        "producer": metadata.producer,
        "versions": metadata.versions,
    }


def render_html(data: ReportData) -> str:
    """The page as text (every user string escaped)."""
    script = _SCRIPT
    policy = (
        "default-src 'none'; img-src data:; "
        f"style-src '{_csp_hash(_STYLE)}'; script-src '{_csp_hash(script)}'; base-uri 'none'; form-action 'none'"
    )
    panels = sorted(data.panels, key=lambda panel: _sort_score(panel.score), reverse=True)
    total = len(panels) if data.images_total is None else data.images_total
    body = [
        f"<h1>{_e(data.title)}</h1>",
        _cards(data.counts, data.timings),
        _warnings(data.warnings),
        _section("Model", _key_values(data.model)) if data.model else "",
        _parity(data.parity_rows, data.parity_bar),
        _failures(data.failures),
        _sheet(panels, total, data.threshold, data.rule),
    ]
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{_e(policy)}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_e(data.title)}</title>",
            f"<style>{_STYLE}</style>",
            "</head><body>",
            *[part for part in body if part],
            f"<script>{script}</script>",
            "</body></html>",
            "",
        ]
    )


def write_html_report(path: Path, data: ReportData) -> Path:
    """Write the page to ``path`` as one UTF-8 file, atomically; returns ``path``."""
    path = Path(path)
    write_text_atomic(path, render_html(data))
    return path


def _e(value: object) -> str:
    """Any value as escaped HTML text: undecodable bytes of file names become ``\\xNN``, never invalid UTF-8."""
    if isinstance(value, bytes):
        text = value.decode("utf-8", "backslashreplace")
    elif isinstance(value, float):
        text = _number(value)
    elif isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, default=str, ensure_ascii=False)
    else:
        text = str(value)
    return html.escape(display_name(text), quote=True)


def _number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.6g}"


def _sort_score(score: float) -> float:
    return score if math.isfinite(score) else -math.inf


def _section(title: str, content: str, extra: str = "") -> str:
    return f"<section><h2>{_e(title)}{extra}</h2>{content}</section>"


def _cards(counts: Mapping[str, object], timings: Mapping[str, object]) -> str:
    cards = [
        f'<div class="card {_e(kind)}"><div class="value">{_e(value)}</div><div class="key">{_e(key)}</div></div>'
        for kind, items in (("count", counts), ("time", timings))
        for key, value in items.items()
    ]
    return f'<div class="cards">{"".join(cards)}</div>' if cards else ""


def _warnings(warnings: Sequence[str]) -> str:
    if not warnings:
        return ""
    return '<ul class="warnings">' + "".join(f"<li>warning: {_e(line)}</li>" for line in warnings) + "</ul>"


def _key_values(items: Mapping[str, object]) -> str:
    rows = "".join(f"<tr><th>{_e(key)}</th><td>{_e(value)}</td></tr>" for key, value in items.items())
    return f'<table class="kv">{rows}</table>'


def _table(rows: Sequence[Mapping[str, object]]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    head = "".join(f"<th>{_e(column)}</th>" for column in columns)
    body = "".join(
        "<tr>" + "".join(_cell(row.get(column, "")) for column in columns) + "</tr>" for row in rows
    )  # fmt: skip
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: object) -> str:
    verdict = {"PASS": ' class="pass"', "FAIL": ' class="fail"'}.get(str(value), "")
    return f"<td{verdict}>{_e(value)}</td>"


def _parity(rows: Sequence[Mapping[str, object]], bar: str | None) -> str:
    if not rows:
        return ""
    note = f'<p class="note">{_e(bar)}</p>' if bar else ""
    return _section("Parity with anomalib", _table(rows) + note)


def _failures(failures: Sequence[tuple[str, str]]) -> str:
    if not failures:
        return ""
    shown = failures[:FAILURE_LIMIT]
    rows = _table([{"file": name, "reason": reason} for name, reason in shown])
    more = f'<p class="note">... and {len(failures) - len(shown)} more.</p>' if len(failures) > len(shown) else ""
    return _section("Failed", rows + more, f' <span class="n">{len(failures)}</span>')


def _sheet(panels: Sequence[Panel], total: int, threshold: float | None, rule: str | None) -> str:
    if not panels:
        return ""
    shown = f"the {len(panels)} most anomalous of {total}" if total > len(panels) else f"all {total}"
    rule = f", {_e(rule)}" if rule is not None else ""
    figures = "".join(_figure(rank, panel, threshold) for rank, panel in enumerate(panels, start=1))
    note = f'<p class="note">Sorted by score, most anomalous first: {shown} images{rule}.</p>'
    return _section("Images", note + f'<div class="sheet">{figures}</div>')


def _figure(rank: int, panel: Panel, threshold: float | None) -> str:
    from patchcore_trt.report import format_score

    label = "anomalous" if panel.label else "normal"
    score = format_score(panel.score, threshold) if threshold is not None else _number(panel.score)
    uri = f"data:{_mime(panel.image)};base64,{base64.b64encode(panel.image).decode('ascii')}"
    return (
        f'<figure class="{label}" data-score="{_e(repr(panel.score))}" data-name="{_e(panel.name)}">'
        f'<img src="{uri}" alt="{_e(panel.name)}" decoding="async">'
        f'<figcaption><span class="rank">#{rank}</span> <span class="score">{_e(score)}</span> '
        f'<span class="label">{label}</span> <span class="name">{_e(panel.name)}</span></figcaption></figure>'
    )


def _mime(data: bytes) -> str:
    for magic, mime in _MIME.items():
        if data.startswith(magic):
            return mime
    raise ValueError("a panel's image must be PNG or JPEG bytes (visuals.encode_png or html_report.thumbnail)")


def _csp_hash(source: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode("ascii")


# Counts the images that decode (img.decode() rejects one that does not) once every one has settled.
_SCRIPT = (
    'window.addEventListener("load",function(){var all=[].slice.call(document.images);'
    "Promise.all(all.map(function(img){return img.decode().then(function(){return 1;},function(){return 0;});}))"
    ".then(function(done){var ok=done.reduce(function(a,b){return a+b;},0);"
    'document.body.dataset.imagesLoaded=ok+"/"+all.length;});});'
)

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1f2328;background:#f6f8fa}
h1{font-size:22px;margin:0 0 16px;word-break:break-all}h2{font-size:17px;margin:24px 0 8px}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{background:#fff;border:1px solid #d0d7de;border-radius:6px;
padding:8px 14px;min-width:90px}.card .value{font-size:20px;font-weight:600}.card .key{color:#59636e}
.card.time .value{font-size:16px}table{border-collapse:collapse;background:#fff;margin:4px 0}
th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left;vertical-align:top;word-break:break-all}
thead th{background:#eef1f4}table.kv th{background:#eef1f4;white-space:nowrap}
td.pass{color:#1a7f37;font-weight:600}td.fail{color:#cf222e;font-weight:600}
.note{color:#59636e}.warnings{color:#9a6700;background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;
padding:8px 8px 8px 28px}.n{color:#cf222e}
.sheet{display:grid;grid-template-columns:repeat(auto-fill,minmax(640px,1fr));gap:12px}
figure{margin:0;background:#fff;border:1px solid #d0d7de;border-radius:6px;overflow:hidden}
figure.anomalous{border-color:#cf222e}figure img{display:block;width:100%;height:auto}
figcaption{padding:4px 8px;word-break:break-all}.rank{color:#59636e}.score{font-weight:600}
figure.anomalous .label{color:#cf222e;font-weight:600}figure.normal .label{color:#1a7f37}
"""
