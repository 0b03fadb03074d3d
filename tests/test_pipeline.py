"""predict as a pipeline (decode pool -> batches -> backend -> writer thread -> sinks) returns exactly what scoring
each file on its own returns, in input order, with any number of decoding threads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchcore_trt.images import decode_image, load_image
from patchcore_trt.predict import RECORD_FIELDS, header, run_predict
from patchcore_trt.report import CsvResults, JsonResults
from patchcore_trt.runtime import open_backend

TIMINGS = ("ms",)


@pytest.fixture(scope="module")
def mixed_folder(dataset, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """8-bit RGB, grayscale, 16-bit and palette images of two sizes, with a broken file in the middle."""
    folder = tmp_path_factory.mktemp("mixed")
    sources = sorted(dataset.test_good.glob("*.png")) + sorted(dataset.test_defect.glob("*.png"))
    paths = []
    for number, source in enumerate(sources):
        target = folder / f"img_{number:02d}.png"
        picture = Image.open(source).convert("RGB")
        if number % 3 == 1:
            picture = picture.resize((200, 160))
        if number == 2:
            picture = picture.convert("L")
        if number == 4:
            gray = np.asarray(picture.convert("L"), dtype=np.uint16) * 257
            picture = Image.fromarray(gray)
        if number == 5:
            picture = picture.convert("P")
        picture.save(target)
        paths.append(target)
    broken = folder / "img_03b.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    paths.insert(4, broken)
    return paths


def _rows(path: Path) -> list[dict]:
    rows = json.loads(path.read_text())["results"]
    return [{key: value for key, value in row.items() if key not in TIMINGS} for row in rows]


@pytest.mark.parametrize("workers", [1, 4])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_the_pipeline_returns_what_each_file_alone_returns(resnet18_onnx, mixed_folder, tmp_path, workers, batch_size):
    with open_backend(resnet18_onnx) as backend:
        alone = {}
        for path in mixed_folder:
            try:
                alone[path.name] = backend.predict(load_image(path)[None])
            except Exception as exc:  # the broken file: the pipeline must say so in its row
                alone[path.name] = exc
        json_path, csv_path = tmp_path / "r.json", tmp_path / "r.csv"
        sinks = [JsonResults(json_path, header(backend)), CsvResults(csv_path, RECORD_FIELDS)]
        summary = run_predict(backend, mixed_folder, sinks=sinks, batch_size=batch_size, workers=workers)
    rows = _rows(json_path)
    assert [row["file"] for row in rows] == [str(path) for path in mixed_folder]
    assert summary.scored == len(mixed_folder) - 1 and summary.failed == 1
    for path, row in zip(mixed_folder, rows, strict=True):
        expected = alone[path.name]
        if isinstance(expected, Exception):
            assert row["status"] == "error" and row["error"] == str(expected)
            continue
        assert row["score"] == float(expected.pred_score[0])
        assert row["map_max"] == float(expected.anomaly_map.max())
        assert row["label"] == ("anomalous" if expected.pred_label[0] else "normal")
    assert csv_path.read_text().count("\n") == len(mixed_folder) + 1


def test_one_and_many_workers_write_the_same_rows(resnet18_onnx, mixed_folder, tmp_path):
    written = []
    with open_backend(resnet18_onnx) as backend:
        for workers in (1, 3):
            json_path = tmp_path / f"w{workers}.json"
            run_predict(
                backend, mixed_folder, sinks=[JsonResults(json_path, header(backend))], batch_size=4, workers=workers
            )
            written.append(_rows(json_path))
    assert written[0] == written[1]


def test_8_bit_images_stay_uint8_until_a_backend_needs_floats(mixed_folder):
    decoded = [decode_image(path) for path in mixed_folder if path.name != "img_03b.png"]
    kinds = {image.dtype.name for image in decoded}
    assert kinds == {"uint8", "float32"}  # the 16-bit image stays float: 8 bits would round it
    assert all(image.shape[-1] == 3 for image in decoded if image.dtype == np.uint8)


def test_a_sink_that_fails_stops_the_run_with_its_error(resnet18_onnx, mixed_folder, tmp_path):
    class Full:
        def add(self, result, row, image):
            raise OSError(28, "No space left on device", str(tmp_path / "full"))

        def notes(self):
            return []

        def close(self, summary):
            raise AssertionError("a failed sink is not closed as if complete")

    with open_backend(resnet18_onnx) as backend, pytest.raises(OSError, match="No space left"):
        run_predict(backend, mixed_folder, sinks=[Full()], workers=2)
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_memory_stays_flat_over_hundreds_of_images(resnet18_onnx, tmp_path):
    """predict over 400 images holds, when it ends, what it holds after 40: results go to the files as they come,
    and no map, panel or decoded image is kept for the whole run (400 kept maps of 256 x 256 would add 100 MB)."""
    from conftest import peak_run

    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for number in range(400):
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(folder / f"{number:03d}.png")
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted(folder.iterdir())[:40]:
        shutil.copy(path, few / path.name)
    resident = {}
    for name, images in (("few", few), ("many", folder)):
        result, resident[name] = peak_run(
            "predict", resnet18_onnx, images, "--json", tmp_path / f"{name}.json", final=True
        )
        assert result.returncode == 0, result.stderr
    assert len(json.loads((tmp_path / "many.json").read_text())["results"]) == 400
    assert resident["many"] - resident["few"] < 20 * 1024, resident  # KiB: within 20 MB; kept maps would add 100
