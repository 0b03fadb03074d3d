"""Session fixtures: real anomalib PatchCore checkpoints trained once per session on generated data.

Training uses pre_trained=False (no weights can be downloaded here). Each (backbone, image size) pair is
trained and exported at most once per session, on first use.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from patchcore_trt.checkpoint import read_checkpoint
from patchcore_trt.demo.training import TrainSettings, train_patchcore
from patchcore_trt.export import export_onnx
from patchcore_trt.images import collect_images, load_image
from patchcore_trt.synthetic_data import SyntheticDataset, make_synthetic_dataset

WRN50 = "wide_resnet50_2"
RESNET18 = "resnet18"


def under_ci() -> bool:
    """CI (.ci/run) sets CI=true: there everything the tests need was installed, so nothing may be missing."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(what: str) -> NoReturn:
    """A test cannot run here because ``what`` (one line: what is missing and where it is expected) is not here:
    under CI the test fails with that line, elsewhere it skips with it."""
    if under_ci():
        pytest.fail(what, pytrace=False)
    pytest.skip(what)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under CI the golden fixtures must be there: one line, before any test runs, says where they are expected."""
    from golden import FIXTURES

    if under_ci() and not FIXTURES.is_dir():
        pytest.exit(
            f"error: the golden fixtures are not at {FIXTURES} (CI=true; set PATCHCORE_TRT_FIXTURES or put "
            "shared/fixtures/anomalib-versions beside the repository)",
            returncode=1,
        )


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDataset:
    return make_synthetic_dataset(tmp_path_factory.mktemp("data"), n_train=6, n_test_good=3, n_test_defect=3)


@pytest.fixture(scope="session")
def test_images(dataset: SyntheticDataset) -> tuple[list[Path], np.ndarray]:
    """The generated test images (300 x 340 raw, larger than the model size) and their decoded batch."""
    paths, _ = collect_images([str(dataset.root / "test")])
    return paths, np.stack([load_image(path) for path in paths])


@pytest.fixture(scope="session")
def trained(dataset: SyntheticDataset, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, int], Path]:
    """trained(backbone, size) -> checkpoint path, cached for the session."""
    cache: dict[tuple[str, int], Path] = {}

    def get(backbone: str, size: int = 256) -> Path:
        key = (backbone, size)
        if key not in cache:
            work = tmp_path_factory.mktemp(f"train_{backbone}_{size}")
            cache[key] = train_patchcore(dataset, work, TrainSettings(backbone=backbone, image_size=(size, size)))
        return cache[key]

    return get


@pytest.fixture(scope="session")
def exported(
    trained: Callable[[str, int], Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str, int], Path]:
    """exported(backbone, size) -> verified ONNX path of that checkpoint, cached for the session."""
    cache: dict[tuple[str, int], Path] = {}

    def get(backbone: str, size: int = 256) -> Path:
        key = (backbone, size)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"onnx_{backbone}_{size}") / "model.onnx"
            cache[key], _ = export_onnx(read_checkpoint(trained(backbone, size)), out)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def resnet18_checkpoint(trained: Callable[[str, int], Path]) -> Path:
    return trained(RESNET18, 256)


@pytest.fixture(scope="session")
def resnet18_onnx(exported: Callable[[str, int], Path]) -> Path:
    return exported(RESNET18, 256)


def photographs(count: int, size: tuple[int, int] = (300, 340)) -> np.ndarray:
    """``count`` different views of a real photograph (matplotlib's sample portrait: skin, cloth, medals, a
    painted background), float32 RGB [count, 3, H, W] in [0, 1]: busier than the generated parts, as a camera's
    images are. Each is a crop at another place and scale, resized to ``size`` (height, width)."""
    from matplotlib import cbook
    from PIL import Image

    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as source:
        photo = source.convert("RGB")
    views = []
    for index in range(count):
        scale = 0.55 + 0.4 * (index % 4) / 3
        width, height = round(photo.width * scale), round(photo.height * scale)
        left = (photo.width - width) * ((index * 7) % 5) // 4
        top = (photo.height - height) * ((index * 3) % 5) // 4
        view = photo.crop((left, top, left + width, top + height)).resize((size[1], size[0]), Image.Resampling.BILINEAR)
        views.append(np.asarray(view, dtype=np.float32).transpose(2, 0, 1) / np.float32(255))
    return np.stack(views)


@pytest.fixture(scope="session")
def photo_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SyntheticDataset]:
    """A PatchCore trained on views of a real photograph (``photographs``), exported: its good images' maps sit
    well above half the pixel threshold over much of the image, as on a camera's pictures, unlike the generated
    parts'. Defects are a flat magenta patch with its mask. -> (ONNX path, the data set)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("photo_data")
    views = np.rint(photographs(14).transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    folders = ["train/good"] * 8 + ["test/good"] * 3 + ["test/defect"] * 3
    for index, (view, folder) in enumerate(zip(views, folders, strict=True)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        if folder == "test/defect":
            view[100:160, 120:200] = (255, 26, 204)
            mask = np.zeros(view.shape[:2], np.uint8)
            mask[100:160, 120:200] = 255
            (root / "ground_truth/defect").mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(root / "ground_truth/defect" / f"{index:03d}_mask.png")
        Image.fromarray(view).save(root / folder / f"{index:03d}.png")
    dataset = SyntheticDataset(root)
    checkpoint = train_patchcore(dataset, root / "work", TrainSettings(backbone=RESNET18, image_size=(256, 256)))
    return export_onnx(read_checkpoint(checkpoint), root / "model.onnx")[0], dataset


def run_cli(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``patchcore-trt ARGS`` as a user would, in a fresh process."""
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "patchcore_trt", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


_PEAK = """
import resource, runpy, sys
sys.argv = ["patchcore-trt", *sys.argv[1:]]
try:
    runpy.run_module("patchcore_trt", run_name="__main__")
finally:
    with open("/proc/self/status") as status:
        rss = [line.split()[1] for line in status if line.startswith("VmRSS:")]
    print("peak-kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, *rss, file=sys.stderr)
"""


def started_cli(*args: object) -> tuple[subprocess.Popen[str], list[str], list[str]]:
    """``patchcore-trt ARGS`` started in the background, and its stdout and stderr lines as they come."""
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "patchcore_trt", *map(str, args)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    errors: list[str] = []
    for stream, sink in ((process.stdout, lines), (process.stderr, errors)):
        threading.Thread(target=lambda s=stream, k=sink: k.extend(line.rstrip("\n") for line in s), daemon=True).start()
    return process, lines, errors


def peak_run(
    *args: object, cwd: Path | None = None, final: bool = False
) -> tuple[subprocess.CompletedProcess[str], int]:
    """``run_cli(*args)`` and the peak resident memory (KiB) of that process; its peak line is not in stderr.

    final: the resident memory when the command returned instead; what it kept to the end, which a transient
    peak at start-up (loading the libraries and the model) cannot hide.
    """
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", _PEAK, *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=600, check=False)
    peak = [line for line in result.stderr.splitlines() if line.startswith("peak-kib")]
    stderr = "\n".join(line for line in result.stderr.splitlines() if not line.startswith("peak-kib"))
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout, stderr), int(
        peak[0].split()[2 if final else 1]
    )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one ``error:`` line a failed command printed (exit code 1, no traceback)."""
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="session")
def baseline_kib(tmp_path_factory: pytest.TempPathFactory) -> int:
    """The peak memory (KiB) of ``export`` refusing a tiny file: what a refusal costs without hostile bytes."""
    tiny = tmp_path_factory.mktemp("tiny") / "tiny.ckpt"
    tiny.write_bytes(b"NOTAZIP")
    result, peak_kib = peak_run("export", tiny, "-o", tiny.parent / "out")
    assert "not a PyTorch checkpoint" in error_line(result)
    return peak_kib
