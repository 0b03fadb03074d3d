"""Panels drawn from real maps: a real anomalib checkpoint, exported, run by ONNX Runtime on generated images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from patchcore_trt.artifact import read_onnx_metadata
from patchcore_trt.images import load_image
from patchcore_trt.runtime import open_backend
from patchcore_trt.runtime.base import Prediction
from patchcore_trt.visuals import (
    CAPTIONS,
    COLORMAP,
    DOWNSCALE_LIMIT,
    OVERLAY_ALPHA,
    downscale_warning,
    make_tiles,
    overlay,
    panel_layout,
    render_panel,
    save_panel,
)


@pytest.fixture(scope="module")
def scored(resnet18_onnx: Path, test_images: tuple[list[Path], np.ndarray]) -> tuple[np.ndarray, Prediction, float]:
    """The test images, ONNX Runtime's predictions for them and the model's normalised threshold."""
    _, images = test_images
    with open_backend(resnet18_onnx) as backend:
        return images, backend.predict(images), backend.image_threshold


def _panel(images: np.ndarray, prediction: Prediction, threshold: float, index: int, **options: object) -> np.ndarray:
    arguments = {
        "score": float(prediction.pred_score[index]),
        "label": bool(prediction.pred_label[index]),
        "threshold": threshold,
        "title": f"image {index}",
        **options,
    }
    return render_panel(images[index], prediction.anomaly_map[index, 0], prediction.pred_mask[index, 0], **arguments)


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.rint(image.transpose(1, 2, 0) * 255).astype(np.uint8)


def _crop(panel: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    return panel[box[1] : box[3], box[0] : box[2]]


def _below_caption(tile: np.ndarray) -> np.ndarray:
    return tile[tile.shape[0] // 3 :]  # captions sit in the top-left corner of each tile


def _defect_index(prediction: Prediction) -> int:
    """The image with the largest predicted mask (the generated set always holds defects)."""
    return int(prediction.pred_mask.reshape(len(prediction), -1).mean(axis=1).argmax())


def test_panel_holds_image_map_mask_and_overlay_in_anomalibs_order(scored) -> None:
    images, prediction, threshold = scored
    assert CAPTIONS == ("Image", "Anomaly map", "Predicted mask", "Overlay")
    for index in range(len(images)):
        panel = _panel(images, prediction, threshold, index)
        layout = panel_layout(images.shape[2:])
        assert panel.dtype == np.uint8 and panel.shape == (layout.size[1], layout.size[0], 3)
        tiles = make_tiles(
            images[index],
            prediction.anomaly_map[index, 0],
            prediction.pred_mask[index, 0],
            pixel_threshold=threshold,
            tile_height=layout.tiles[0][3] - layout.tiles[0][1],
        )
        fields = (tiles.image, tiles.heatmap, tiles.mask, tiles.overlay)
        for box, field in zip(layout.tiles, fields, strict=True):
            np.testing.assert_array_equal(_below_caption(_crop(panel, box)), _below_caption(field))
        # The tiles keep the image's aspect ratio, and the image tile is the image itself, resized.
        height, width = tiles.image.shape[:2]
        assert abs(width / height - images.shape[3] / images.shape[2]) <= 1 / height
        # Compared at a coarse scale: the generated texture is noise at the pixel scale, where resamplers differ.
        coarse = (width // 8, height // 8)
        reference = np.asarray(Image.fromarray(_rgb(images[index])).resize(coarse, Image.Resampling.BOX), dtype=int)
        shown = np.asarray(Image.fromarray(tiles.image).resize(coarse, Image.Resampling.BOX), dtype=int)
        assert np.abs(shown - reference).mean() < 2


def test_overlay_keeps_the_parts_own_colours_where_the_map_is_low(scored) -> None:
    images, prediction, threshold = scored
    index = _defect_index(prediction)
    rgb = _rgb(images[index])
    size = (rgb.shape[1], rgb.shape[0])
    anomaly_map = np.asarray(Image.fromarray(prediction.anomaly_map[index, 0]).resize(size, Image.Resampling.BILINEAR))
    drawn = overlay(rgb, anomaly_map, threshold)
    low, high = anomaly_map <= threshold, anomaly_map >= threshold + (1 - threshold) / 2
    assert low.any() and high.any()
    np.testing.assert_array_equal(drawn[low], rgb[low])
    # From halfway between the threshold and 1: the colour map's colour at full overlay strength.
    colour = colormaps[COLORMAP](np.clip(anomaly_map, 0, 1), bytes=True)[..., :3]
    expected = rgb * (1 - OVERLAY_ALPHA) + colour * OVERLAY_ALPHA
    assert np.abs(drawn[high] - expected[high]).max() <= 1


def test_a_normal_part_keeps_all_its_colours(scored) -> None:
    images, prediction, threshold = scored
    calm = [i for i in range(len(images)) if prediction.anomaly_map[i, 0].max() < threshold / 2]
    assert calm, "the generated good images score far below the threshold"
    for index in calm:
        panel = _panel(images, prediction, threshold, index)
        layout = panel_layout(images.shape[2:])
        image_tile, overlay_tile = _crop(panel, layout.tiles[0]), _crop(panel, layout.tiles[3])
        np.testing.assert_array_equal(_below_caption(overlay_tile), _below_caption(image_tile))


def test_a_good_photograph_keeps_every_pixel_of_its_overlay(photo_model) -> None:
    onnx_path, dataset = photo_model
    pixel_threshold = read_onnx_metadata(onnx_path).postprocess.normalized_pixel_threshold
    good, defect = (sorted(folder.glob("*.png")) for folder in (dataset.test_good, dataset.test_defect))
    images = np.stack([load_image(path) for path in good + defect])
    with open_backend(onnx_path) as backend:
        prediction, threshold = backend.predict(images), backend.image_threshold
    layout = panel_layout(images.shape[2:])
    for index in range(len(images)):
        panel = _panel(images, prediction, threshold, index, pixel_threshold=pixel_threshold)
        image_tile, overlay_tile = (_below_caption(_crop(panel, layout.tiles[i])) for i in (0, 3))
        if index < len(good):
            assert not prediction.pred_label[index] and not prediction.pred_mask[index].any()
            # A good photograph's map is far from zero over much of it: a fade from half the threshold tinted it.
            assert (prediction.anomaly_map[index, 0] > pixel_threshold / 2).mean() > 0.1
            np.testing.assert_array_equal(overlay_tile, image_tile)
        else:  # the defect is still coloured and outlined
            assert prediction.pred_mask[index].any()
            assert (np.abs(overlay_tile.astype(int) - image_tile).sum(axis=2) > 30).mean() > 0.01


def test_overlay_tile_changes_only_high_pixels_and_outlines_the_mask(scored) -> None:
    images, prediction, threshold = scored
    index = _defect_index(prediction)
    tiles = make_tiles(
        images[index],
        prediction.anomaly_map[index, 0],
        prediction.pred_mask[index, 0],
        pixel_threshold=threshold,
        tile_height=256,
    )
    untouched = (tiles.anomaly_map <= threshold) & ~tiles.mask_bool
    np.testing.assert_array_equal(tiles.overlay[untouched], tiles.image[untouched])
    red = np.all(tiles.overlay == (255, 0, 0), axis=2)
    assert red.any() and not (red & ~tiles.mask_bool).any()


def test_heatmap_is_the_colour_map_on_the_fixed_scale_and_the_mask_is_the_models(scored) -> None:
    images, prediction, threshold = scored
    for index in range(len(images)):
        tiles = make_tiles(
            images[index],
            prediction.anomaly_map[index, 0],
            prediction.pred_mask[index, 0],
            pixel_threshold=threshold,
            tile_height=200,
        )
        expected = colormaps[COLORMAP](np.clip(tiles.anomaly_map, 0, 1), bytes=True)[..., :3]
        np.testing.assert_array_equal(tiles.heatmap, expected)
        assert set(np.unique(tiles.mask)) <= {0, 255}
        assert abs((tiles.mask[..., 0] > 0).mean() - prediction.pred_mask[index].mean()) < 0.01


def test_colour_bar_runs_from_one_at_the_top_to_zero(scored) -> None:
    images, prediction, threshold = scored
    for tile_height in (128, 256, 512):
        panel = _panel(images, prediction, threshold, 0, tile_height=tile_height)
        box = panel_layout(images.shape[2:], tile_height).colorbar
        strip = _crop(panel, box)[:, 0]
        levels = np.linspace(1.0, 0.0, tile_height, dtype=np.float32)
        np.testing.assert_array_equal(strip, colormaps[COLORMAP](levels, bytes=True)[:, :3])
        bar = _crop(panel, box)
        strip_width = int(np.all(bar == bar[:, :1], axis=(0, 2)).argmin())
        assert strip_width > 0
        assert (bar[:, strip_width:].min(axis=2) > 120).sum() > 10  # ticks and their labels in light text


def _header(panel: np.ndarray, images: np.ndarray, **layout: object) -> np.ndarray:
    return _crop(panel, panel_layout(images.shape[2:], **layout).header)


def test_score_label_and_title_are_drawn(scored) -> None:
    images, prediction, threshold = scored
    index = _defect_index(prediction)
    score = float(prediction.pred_score[index])
    base = {"score": score, "title": "defect/000.png"}
    anomalous = _header(_panel(images, prediction, threshold, index, **base, label=True), images)
    normal = _header(_panel(images, prediction, threshold, index, **base, label=False), images)

    def near(header: np.ndarray, colour: tuple[int, int, int]) -> int:
        return int((np.abs(header.astype(int) - colour).max(axis=2) < 8).sum())

    assert near(anomalous, (215, 48, 39)) > 100 and near(anomalous, (26, 152, 80)) == 0
    assert near(normal, (26, 152, 80)) > 100 and near(normal, (215, 48, 39)) == 0
    other_title = _header(_panel(images, prediction, threshold, index, **{**base, "title": "good/001.png"}), images)
    other_score = _header(_panel(images, prediction, threshold, index, **{**base, "score": 1 - score}), images)
    assert not np.array_equal(anomalous, other_title) and not np.array_equal(anomalous, other_score)


def test_hostile_titles_are_drawn_on_one_line(scored) -> None:
    images, prediction, threshold = scored
    plain = _panel(images, prediction, threshold, 0, title="x.png")
    for title in ("[bold]x[/bold] <b>&amp;\"'", os.fsdecode(b"bad\xff\xfe.png"), "two\nlines\t.png", "long/" * 200):
        panel = _panel(images, prediction, threshold, 0, title=title)
        assert panel.shape == plain.shape and not np.array_equal(panel, plain)


def test_downscale_warning_starts_past_four_times() -> None:
    model = (256, 320)
    limit = (int(DOWNSCALE_LIMIT * model[0]), int(DOWNSCALE_LIMIT * model[1]))
    assert downscale_warning(limit, model) is None
    assert downscale_warning(model, model) is None
    for size in ((limit[0] + 1, model[1]), (model[0], limit[1] + 1)):
        text = downscale_warning(size, model)
        assert text is not None and "small defects may vanish" in text and f"{size[0]}x{size[1]}" in text


def test_a_large_input_gets_the_warning_drawn(resnet18_onnx: Path, test_images) -> None:
    _, images = test_images
    model_size = read_onnx_metadata(resnet18_onnx).model_size
    scale = DOWNSCALE_LIMIT + 0.5
    size = (round(images.shape[3] * scale), round(images.shape[2] * scale))
    large = np.asarray(Image.fromarray(_rgb(images[-1])).resize(size, Image.Resampling.BILINEAR)) / np.float32(255)
    large = np.ascontiguousarray(large.transpose(2, 0, 1), dtype=np.float32)
    with open_backend(resnet18_onnx) as backend:
        prediction = backend.predict(large[None])
        threshold = backend.image_threshold
    warning = downscale_warning(large.shape[1:], model_size)
    assert warning is not None
    plain = _panel(large[None], prediction, threshold, 0)
    warned = _panel(large[None], prediction, threshold, 0, warning=warning)
    header = _header(warned, large[None], warning=True)
    assert warned.shape[0] > plain.shape[0] and warned.shape[1] == plain.shape[1]
    assert (np.abs(header.astype(int) - (255, 196, 0)).max(axis=2) < 40).sum() > 50  # the amber warning line


def test_save_panel_writes_the_png_atomically(scored, tmp_path: Path) -> None:
    images, prediction, threshold = scored
    panel = _panel(images, prediction, threshold, 0)
    target = tmp_path / "new" / "panel.png"
    assert save_panel(panel, target) == target
    save_panel(_panel(images, prediction, threshold, 1), target)  # replaced in place
    with Image.open(target) as written:
        assert written.format == "PNG"
        np.testing.assert_array_equal(np.asarray(written), _panel(images, prediction, threshold, 1))
    assert sorted(path.name for path in target.parent.iterdir()) == ["panel.png"]
