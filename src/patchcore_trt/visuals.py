"""One picture per image: image | anomaly map | predicted mask | overlay, with a colour bar, score and label.

The panel follows anomalib's ``ImageVisualizer``: the same fields side by side, a caption on each (white on
translucent black, top left), the map coloured with the jet colour map on the normalised scale (0..1, never
stretched per image, so panels compare), the predicted mask in white on black and its contour in red on the
overlay. Two things differ on purpose:

- anomalib blends the coloured map over the whole picture at half opacity, which tints every part blue. Here
  the overlay keeps the image's own colours wherever the map is at or below the pixel threshold (what the model
  calls normal: on real photographs a good image's map sits well above half the threshold over much of it), and
  colour fades in above it, at full strength halfway from the threshold to 1.
- anomalib's visualizer needs torch and anomalib and builds each field with separate PIL conversions; a panel
  here is numpy and Pillow compositing with matplotlib's colour map (core dependencies), so ``predict`` can draw
  one per image at a few milliseconds each.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from patchcore_trt.files import atomic_path, display_name
from patchcore_trt.images import as_float
from patchcore_trt.outputs import Postprocess, relation
from patchcore_trt.report import format_score

if TYPE_CHECKING:
    from matplotlib.colors import Colormap

TILE_HEIGHT = 256
ROW_ASPECT = 6.0
CAPTIONS = ("Image", "Anomaly map", "Predicted mask", "Overlay")
# Downscaling an input more than this before the backbone sees it can erase small defects.
DOWNSCALE_LIMIT = 4.0
OVERLAY_ALPHA = 0.6
COLORMAP = "jet"

_BACKGROUND = (32, 33, 36)
_TEXT = (240, 240, 240)
_MUTED = (170, 170, 170)
_WARNING = (255, 196, 0)
_ANOMALOUS = (215, 48, 39)
_NORMAL = (26, 152, 80)
_CONTOUR = (255, 0, 0)


@dataclass(frozen=True)
class Layout:
    """Where each part of a panel lies, as (left, top, right, bottom) pixel boxes; ``size`` is (width, height)."""

    size: tuple[int, int]
    gap: int
    line: int
    header: tuple[int, int, int, int]
    tiles: tuple[tuple[int, int, int, int], ...]
    colorbar: tuple[int, int, int, int]


@dataclass(frozen=True)
class Tiles:
    """The four fields at tile size (uint8 HWC), and the map and mask resized to it, as the overlay used them."""

    image: np.ndarray
    heatmap: np.ndarray
    mask: np.ndarray
    overlay: np.ndarray
    anomaly_map: np.ndarray
    mask_bool: np.ndarray


def downscale_warning(image_size: tuple[int, int], model_size: tuple[int, int]) -> str | None:
    """A one-line warning when an input (height, width) is shrunk more than DOWNSCALE_LIMIT on either side."""
    factor = max(image_size[0] / model_size[0], image_size[1] / model_size[1])
    if factor <= DOWNSCALE_LIMIT:
        return None
    return (
        f"{image_size[0]}x{image_size[1]} input downscaled {factor:.1f}x to the model's {model_size[0]}x"
        f"{model_size[1]}: small defects may vanish"
    )


def panel_layout(image_size: tuple[int, int], tile_height: int = TILE_HEIGHT, warning: bool = False) -> Layout:
    """The layout of the panel of an image of ``image_size`` (height, width); tiles keep the image's aspect. A wide
    image's tiles go two to a row, or one, so a row stays within ROW_ASPECT tile heights: side by side, four 10:1
    tiles would shrink to a strip wherever the panel is shown at a page's width."""
    tile_width = max(1, round(tile_height * image_size[1] / image_size[0]))
    columns = next((count for count in (4, 2) if count * tile_width <= ROW_ASPECT * tile_height), 1)
    gap = max(2, tile_height // 64)
    line = _font_size(tile_height) + 2 * gap
    header_height = line * (3 if warning else 2)
    bar_width = _colorbar_width(tile_height)
    tiles = []
    for index, _ in enumerate(CAPTIONS):
        row, column = divmod(index, columns)
        left, top = gap + column * (tile_width + gap), header_height + row * (tile_height + gap)
        tiles.append((left, top, left + tile_width, top + tile_height))
    left = gap + columns * (tile_width + gap)
    colorbar = (left, header_height, left + bar_width, header_height + tile_height)
    width = colorbar[2] + gap
    size = (width, header_height + len(CAPTIONS) // columns * (tile_height + gap))
    return Layout(size, gap, line, (0, 0, width, header_height), tuple(tiles), colorbar)


def heat_colours(anomaly_map: np.ndarray) -> np.ndarray:
    """The normalised map [h, w] as jet colours (uint8 [h, w, 3]); 0..1 is the whole scale, outside is clipped."""
    values = np.clip(np.nan_to_num(anomaly_map, nan=0.0), 0.0, 1.0)
    return _colormap()(values, bytes=True)[..., :3]


def overlay(rgb: np.ndarray, anomaly_map: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """The coloured map over ``rgb`` (uint8 [H, W, 3]) only where ``anomaly_map`` ([H, W], same size) is above
    ``pixel_threshold``: at and below it the pixels are the image's own; above it the colour's opacity rises with
    the map, to OVERLAY_ALPHA halfway from the threshold to 1, and stays there.
    """
    span = max((1.0 - pixel_threshold) / 2, 1e-6)
    alpha = OVERLAY_ALPHA * np.clip((anomaly_map - pixel_threshold) / span, 0.0, 1.0)
    alpha = alpha[..., None].astype(np.float32)
    blended = np.rint(rgb * (1.0 - alpha) + heat_colours(anomaly_map) * alpha).astype(np.uint8)
    return np.where(alpha > 0, blended, rgb)


def make_tiles(
    image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray, *, pixel_threshold: float, tile_height: int
) -> Tiles:
    """The four fields of one image at ``tile_height`` (the map and mask stretched over the whole image, as the
    model's resize stretches the image over the map)."""
    height, width = image.shape[1:]
    size = (max(1, round(tile_height * width / height)), tile_height)
    rgb = np.rint(np.clip(image, 0.0, 1.0).transpose(1, 2, 0) * 255).astype(np.uint8)
    rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0))
    heat_map = np.asarray(Image.fromarray(anomaly_map.astype(np.float32)).resize(size, Image.Resampling.BILINEAR))
    mask_l = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
    mask_bool = np.asarray(mask_l) > 0
    blended = overlay(rgb, heat_map, pixel_threshold)
    # anomalib's pred_mask overlay: a red contour, drawn on the mask's inner edge so it never leaves the mask.
    edge = mask_bool & ~(np.asarray(mask_l.filter(ImageFilter.MinFilter(_contour_size(tile_height)))) > 0)
    blended = np.where(edge[..., None], np.array(_CONTOUR, dtype=np.uint8), blended)
    mask_rgb = np.repeat(np.asarray(mask_l)[..., None], 3, axis=2)
    return Tiles(rgb, heat_colours(heat_map), mask_rgb, blended, heat_map, mask_bool)


def render_panel(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    mask: np.ndarray,
    *,
    score: float,
    label: bool,
    threshold: float,
    title: str,
    pixel_threshold: float | None = None,
    warning: str | None = None,
    tile_height: int = TILE_HEIGHT,
) -> np.ndarray:
    """One image's panel as uint8 [H, W, 3]: a header (title, score against the threshold, label, ``warning``),
    then image | anomaly map | predicted mask | overlay and the colour bar.

    Args:
        image: [3, H, W] float RGB in [0, 1]. anomaly_map: [h, w] normalised. mask: [h, w] bool.
        score: the normalised image score; label: True for anomalous; threshold: the normalised image threshold.
        pixel_threshold: the normalised map threshold the overlay and colour bar mark (default: ``threshold``).
    """
    pixel_threshold = threshold if pixel_threshold is None else pixel_threshold
    layout = panel_layout(image.shape[1:], tile_height, warning is not None)
    tiles = make_tiles(image, anomaly_map, mask, pixel_threshold=pixel_threshold, tile_height=tile_height)
    canvas = Image.new("RGB", layout.size, _BACKGROUND)
    for box, tile in zip(layout.tiles, (tiles.image, tiles.heatmap, tiles.mask, tiles.overlay), strict=True):
        canvas.paste(Image.fromarray(tile), box[:2])
    canvas.paste(_colorbar(tile_height, pixel_threshold), layout.colorbar[:2])
    draw = ImageDraw.Draw(canvas, "RGBA")
    font = _font(_font_size(tile_height))
    for box, caption in zip(layout.tiles, CAPTIONS, strict=True):
        _caption(draw, (box[0] + 4, box[1] + 4), caption, font)
    _header(draw, layout, font, title=title, score=score, label=label, threshold=threshold, warning=warning)
    return np.asarray(canvas)


def encode_png(panel: np.ndarray, compress_level: int = 1) -> bytes:
    """``panel`` as PNG bytes; level 1 is 3-4x faster than Pillow's default for a few percent more bytes."""
    buffer = io.BytesIO()
    Image.fromarray(panel).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def save_panel(panel: np.ndarray, path: Path) -> Path:
    """Write ``panel`` (from ``render_panel``) to ``path`` as PNG, atomically; returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(encode_png(panel))
    return path


def _header(
    draw: ImageDraw.ImageDraw,
    layout: Layout,
    font: ImageFont.FreeTypeFont,
    *,
    title: str,
    score: float,
    label: bool,
    threshold: float,
    warning: str | None,
) -> None:
    gap, line = layout.gap, layout.line
    width = layout.size[0] - 2 * gap
    verdict = "ANOMALOUS" if label else "NORMAL"
    shown, limit = format_score(score, threshold), format_score(threshold, threshold)
    score_text = f"score {shown} {relation(score, threshold, label)} threshold {limit}"
    badge = draw.textbbox((0, 0), verdict, font=font)
    badge_width = badge[2] - badge[0] + 2 * gap
    x = layout.size[0] - gap - badge_width
    draw.rectangle((x, gap // 2, x + badge_width, line - gap // 2), fill=_ANOMALOUS if label else _NORMAL)
    draw.text((x + gap, gap), verdict, font=font, fill=_TEXT)
    draw.text((gap, gap), _fit(_printable(title), font, width - badge_width - gap), font=font, fill=_TEXT)
    draw.text((gap, line + gap), score_text, font=font, fill=_MUTED)
    if warning is not None:
        draw.text((gap, 2 * line + gap), _fit("warning: " + _printable(warning), font, width), font=font, fill=_WARNING)


def _caption(draw: ImageDraw.ImageDraw, origin: tuple[int, int], text: str, font: ImageFont.FreeTypeFont) -> None:
    box = draw.textbbox(origin, text, font=font)
    draw.rectangle((box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3), fill=(0, 0, 0, 128))
    draw.text(origin, text, font=font, fill="white")


@functools.lru_cache(maxsize=8)
def _colorbar(tile_height: int, pixel_threshold: float) -> Image.Image:
    """The colour scale, 1 at the top: a strip of the colour map with ticks at 0, the threshold and 1."""
    width = _colorbar_width(tile_height)
    strip = max(8, tile_height // 16)
    bar = Image.new("RGB", (width, tile_height), _BACKGROUND)
    levels = np.linspace(1.0, 0.0, tile_height, dtype=np.float32)
    bar.paste(Image.fromarray(np.repeat(heat_colours(levels)[:, None], strip, axis=1)), (0, 0))
    draw = ImageDraw.Draw(bar)
    size = _tick_size(tile_height)
    font = _font(size)
    for value, text in ((1.0, "1"), (pixel_threshold, f"{pixel_threshold:.2f}"), (0.0, "0")):
        y = round((1.0 - value) * (tile_height - 1))
        draw.line((strip, y, strip + 3, y), fill=_TEXT)
        top = min(max(0, y - size // 2), tile_height - size - 2)
        draw.text((strip + 5, top), text, font=font, fill=_TEXT)
    return bar


def _colorbar_width(tile_height: int) -> int:
    return max(8, tile_height // 16) + 5 + round(2.6 * _tick_size(tile_height))


def _tick_size(tile_height: int) -> int:
    return max(9, _font_size(tile_height) - 3)


def _font_size(tile_height: int) -> int:
    return max(10, tile_height // 16)


def _contour_size(tile_height: int) -> int:
    return 3 if tile_height < 384 else 5


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's bundled font (FreeType builds, Pillow >= 10.1) needs no font file on the machine.
    return ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=1)
def _colormap() -> Colormap:
    from matplotlib import colormaps

    return colormaps[COLORMAP]


def _printable(text: str) -> str:
    """File names may hold undecodable bytes and control characters; draw them as escapes, never as glyph soup."""
    text = display_name(text)
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in text)


def _fit(text: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    """``text`` shortened in the middle (the start and the file name stay) until it fits ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    keep = len(text)
    while keep > 2 and font.getlength(text[: keep // 2] + "…" + text[len(text) - keep // 2 :]) > width:
        keep -= max(1, keep // 16)
    return text[: keep // 2] + "…" + text[len(text) - keep // 2 :]


def _png(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def save_visuals(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    mask: np.ndarray,
    stem: Path,
    *,
    pixel_threshold: float = 0.5,
    panel: np.ndarray | None = None,
) -> list[Path]:
    """Write ``stem``.heatmap.png, .overlay.png and .mask.png for one image (and .panel.png when ``panel`` is given).

    Args:
        image: [3, H, W] float RGB in [0, 1]. anomaly_map: [h, w] normalised. mask: [h, w] bool.
        pixel_threshold: the normalised map threshold (``visuals.pixel_threshold``); the overlay colours only
            what is above it. panel: ``visuals.render_panel``'s picture of the same image.
    """
    height, width = image.shape[1:]
    rgb = np.rint(np.clip(image.transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8)
    full_map = np.asarray(
        Image.fromarray(anomaly_map.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR)
    )
    mask_png = np.asarray(
        Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)
    )
    paths = [stem.with_name(stem.name + suffix) for suffix in (".heatmap.png", ".overlay.png", ".mask.png")]
    for array, path in zip(
        (heat_colours(full_map), overlay(rgb, full_map, pixel_threshold), mask_png), paths, strict=True
    ):
        _png(array, path)
    if panel is not None:
        paths.append(save_panel(panel, stem.with_name(stem.name + ".panel.png")))
    return paths


class Panels:
    """Draws each scored image's panel once, for every sink that shows it (the visuals folder and the report)."""

    def __init__(self, post: Postprocess) -> None:
        self.post = post
        self._last: tuple[Any, np.ndarray] | None = None

    def panel(self, result: Any, image: np.ndarray) -> np.ndarray:
        """The panel of ``result`` (a scored predict.ImageResult) and its decoded image (images.decode_image)."""
        if self._last is not None and self._last[0] is result:
            return self._last[1]
        prediction = result.prediction
        score = float(prediction.pred_score[0])
        panel = render_panel(
            as_float(image),
            prediction.anomaly_map[0, 0],
            prediction.pred_mask[0, 0],
            score=score,
            label=bool(prediction.pred_label[0]),
            threshold=self.post.normalized_image_threshold,
            pixel_threshold=self.post.normalized_pixel_threshold,
            title=result.name,
            warning=downscale_warning(result.size, prediction.anomaly_map.shape[-2:]),
        )
        self._last = (result, panel)
        return panel


class VisualsSink:
    """A predict sink: a panel, heatmap, overlay and mask PNG per scored image in ``folder``.

    The first OS error (a full disk) stops the visuals, never the scoring; ``notes`` then says so.
    """

    def __init__(self, folder: Path, panels: Panels) -> None:
        self.folder = Path(folder)
        self.panels = panels
        self.index = 0
        self.error: str | None = None

    def add(self, result: Any, row: dict[str, object], image: np.ndarray | None) -> None:
        del row
        index, self.index = self.index, self.index + 1
        if self.error is not None or result.prediction is None or image is None:
            return
        # Folders often reuse file names (good/000.png, defect/000.png): keep the order and the parent's name.
        stem = self.folder / f"{index:04d}_{result.path.parent.name}_{result.path.stem}"
        prediction = result.prediction
        try:
            save_visuals(
                as_float(image),
                prediction.anomaly_map[0, 0],
                prediction.pred_mask[0, 0],
                stem,
                pixel_threshold=self.panels.post.normalized_pixel_threshold,
                panel=self.panels.panel(result, image),
            )
        except OSError as exc:
            self.error = f"{exc.filename or self.folder}: {exc.strerror or exc}"

    def notes(self) -> list[str]:
        if self.error is None:
            return []
        return [f"stopped writing visuals ({self.error}); every result is still in the other outputs"]

    def close(self, summary: Any) -> None:
        del summary  # every file is already whole under its name
