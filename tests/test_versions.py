"""Every anomalib release's PatchCore checkpoint, read without trusting the pickle and without anomalib, reproduces
that release's own outputs (the golden files: what anomalib 1.2, 2.0, 2.2, 2.3 and 2.6 computed on their files).

Settings the golden files leave at their defaults (sensitivities, normalisation, a non-square crop, a tie at the
1.x threshold) are tested on files derived from them: the release's own pickled object tree, one value edited and
written back under the same globals (golden.save_records); the expected outputs follow from the release's outputs
by anomalib's own post-processing rules.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import error_line, run_cli
from golden import (
    FIXTURES,
    RELEASES,
    checkpoint,
    extra_releases,
    golden,
    load_records,
    make_record,
    module_of,
    records,
    run,
    save_records,
    trained_with,
)

from patchcore_trt.checkpoint import read_checkpoint
from patchcore_trt.compare import PARITY_BAR, Parity, compare
from patchcore_trt.errors import UserError
from patchcore_trt.model import PatchCoreDeploy
from patchcore_trt.runtime import Prediction, open_backend


def _admits(written_by: str, version: tuple[int, int]) -> bool:
    """Whether 'anomalib 2.1-2.2' (or '2.0.x', '2.7+') includes the release ``version`` (major, minor)."""
    match = re.fullmatch(r"anomalib (\d+)\.(\d+)(\.x|\+|-(\d+)\.(\d+))", written_by)
    assert match, written_by
    low = (int(match[1]), int(match[2]))
    if match[3] == "+":
        return low <= version
    high = low if match[3] == ".x" else (int(match[4]), int(match[5]))
    return low <= version <= high


def _within_bar(prediction: Prediction, expected: Prediction, threshold: float) -> Parity:
    figures = compare(prediction, expected, threshold=threshold)  # raises on a different map shape
    assert figures.within(PARITY_BAR), figures
    assert np.array_equal(prediction.pred_label, expected.pred_label)
    return figures


def _reproduces_its_release(release: str) -> None:
    spec = read_checkpoint(checkpoint(release))
    assert _admits(spec.written_by, trained_with(release)), spec.written_by
    model = PatchCoreDeploy(spec).eval()
    threshold = spec.postprocess.normalized_image_threshold
    shown = []
    for probes in (False, True):
        reference = golden(release, probes=probes)
        figures = _within_bar(run(model, reference.images), reference.expected, threshold)
        shown.append(f"|d score| {figures.max_score_error:.1e}, |d map| {figures.max_map_error:.1e}")
    test, probe = shown
    print(f"{release}: read as {spec.written_by}, model size {spec.preprocess.model_size}; test {test}, probes {probe}")


@pytest.mark.parametrize("release", RELEASES)
def test_each_release_is_read_without_trust_and_reproduced(release):
    _reproduces_its_release(release)


@pytest.mark.parametrize("release", extra_releases())
def test_each_extra_release_file_is_reproduced(release):
    """Files from PATCHCORE_TRT_EXTRA_FIXTURES (``pytest -s`` prints the figures)."""
    _reproduces_its_release(release)


_NO_ANOMALIB = """
import importlib.abc, sys
BLOCKED = ("anomalib", "lightning", "lightning_fabric", "pytorch_lightning", "torchmetrics")
tried = []
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            tried.append(name)
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
from patchcore_trt.checkpoint import read_checkpoint
for path in sys.argv[1:]:
    print(read_checkpoint(path).written_by)
print("tried", tried, "loaded", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""


def test_reading_imports_neither_anomalib_nor_lightning():
    paths = [str(checkpoint(release)) for release in RELEASES]
    result = subprocess.run(
        [sys.executable, "-c", _NO_ANOMALIB, *paths], capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(paths) + 1 and all(line.startswith("anomalib ") for line in lines[:-1])
    assert lines[-1] == "tried [] loaded []"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """release -> the ONNX ``patchcore-trt export`` wrote for it (no flag), and what it printed."""
    made: dict[str, tuple[Path, str]] = {}

    def get(release: str) -> tuple[Path, str]:
        if release not in made:
            folder = tmp_path_factory.mktemp(f"export-{release}")
            result = run_cli("export", checkpoint(release), "-o", folder)
            assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
            made[release] = folder / "model.onnx", result.stderr
        return made[release]

    return get


@pytest.mark.parametrize("release", RELEASES)
def test_export_without_flags_matches_the_release(release, exported):
    onnx_path, printed = exported(release)
    spec = read_checkpoint(checkpoint(release))
    assert f"written by {spec.written_by}" in printed
    reference = golden(release)
    with open_backend(onnx_path) as backend:
        prediction = run(lambda batch: backend.predict(batch.numpy()), reference.images)
        _within_bar(prediction, reference.expected, backend.image_threshold)


@pytest.mark.parametrize("release", [*RELEASES, *extra_releases()])
def test_verify_reference_reproduces_the_release(release):
    pytest.importorskip("anomalib")
    from patchcore_trt.reference import AnomalibReference

    spec = read_checkpoint(checkpoint(release))
    reference = AnomalibReference.for_checkpoint(checkpoint(release), spec)
    assert f"written by {spec.written_by}" in reference.description or spec.written_by == "anomalib 2.7+"
    assert ("anomalib 1.2's inference post-processing" in reference.description) == release.startswith("1.")
    expected = golden(release)
    threshold = spec.postprocess.normalized_image_threshold
    figures = _within_bar(run(reference.forward, expected.images), expected.expected, threshold)
    errors = f"|d score| {figures.max_score_error:.1e}, |d map| {figures.max_map_error:.1e}"
    print(f"{release}: {reference.description}: {errors}")


def test_verify_says_which_reference_it_compared_against(exported):
    pytest.importorskip("anomalib")
    onnx_path, _ = exported("1.2.0")
    images = FIXTURES / "data" / "test"
    result = run_cli("verify", checkpoint("1.2.0"), images, "--onnx", onnx_path, "--backends", "torch,onnxruntime")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stdout + result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("reference: ")]
    assert "PatchCore built from the checkpoint as read (written by anomalib 1.0-1.2" in line
    assert line.endswith("with anomalib 1.2's inference post-processing")
    assert result.stdout.count("PASS") == 2


# ---- what the golden files leave at their defaults, on files derived from them


def _anomalib_labels(scores: np.ndarray, sensitivity: float) -> np.ndarray:
    """anomalib's own label rule for normalised scores at ``sensitivity`` (PostProcessor._apply_threshold)."""
    pytest.importorskip("anomalib")
    from anomalib.post_processing import PostProcessor

    post = PostProcessor(image_sensitivity=sensitivity)
    return post._apply_threshold(torch.from_numpy(scores), post.normalized_image_threshold).numpy()


def test_pickled_post_processor_sensitivity_with_the_2_0_default_transform(tmp_path):
    # anomalib 2.0.0 with only PostProcessor(0.3, 0.7) configured: the default pre-processor (Resize 256 +
    # CenterCrop 224) is recorded only inside the module the PostProcessor's bound methods drag in.
    raw = load_records("2.0.0")
    module = module_of(raw)
    post = module.get("post_processor")
    post.state.update(image_sensitivity=0.3, pixel_sensitivity=0.7)
    pre = module.get("pre_processor")
    for resize in records(pre, "Resize"):
        resize.state["size"] = [256, 256]
    for crop in [*records(pre, "CenterCrop"), *records(pre, "ExportableCenterCrop")]:
        crop.state["size"] = [224, 224]
    raw["state_dict"] = load_records("2.0.0-default")["state_dict"]  # trained with exactly that default
    raw["hyper_parameters"].update(pre_processor=True, post_processor=post)
    spec = read_checkpoint(save_records(raw, tmp_path / "sens.ckpt"))
    assert spec.written_by == "anomalib 2.0.x" and spec.preprocess.model_size == (224, 224)
    reference = golden("2.0.0-default")
    labels = _anomalib_labels(reference.expected.pred_score, 0.3)
    assert not np.array_equal(labels, reference.expected.pred_label)  # the sensitivity decides some images
    expected = replace(reference.expected, pred_label=labels)
    _within_bar(run(PatchCoreDeploy(spec).eval(), reference.images), expected, 0.7)


@pytest.mark.parametrize("normalization", [True, False], ids=["sensitivity", "normalisation-off"])
def test_post_processor_settings_carried_by_the_module(normalization, tmp_path):
    raw = load_records("2.6.2")
    post = module_of(raw).get("post_processor")
    post.state.update(image_sensitivity=0.3, pixel_sensitivity=0.7, enable_normalization=normalization)
    spec = read_checkpoint(save_records(raw, tmp_path / "edited.ckpt"))
    assert spec.postprocess.normalize is normalization and spec.postprocess.image_sensitivity == 0.3
    reference = golden("2.6.2")
    if normalization:
        scores, maps = reference.expected.pred_score, reference.expected.anomaly_map
    else:  # anomalib returns the raw values and still labels them against 1 - sensitivity
        scores, maps = reference.raw_score, reference.raw_map
    expected = Prediction.from_outputs([scores, _anomalib_labels(scores, 0.3), maps, maps > 0.3])
    figures = compare(run(PatchCoreDeploy(spec).eval(), reference.images), expected, threshold=0.7)
    assert figures.within(PARITY_BAR) and figures.labels_compared == len(scores), figures


def test_a_non_square_crop_is_cropped_as_anomalib_crops_it(tmp_path):
    pytest.importorskip("anomalib")
    from patchcore_trt.reference import AnomalibReference

    raw = load_records("2.2.0")
    pre = raw["hyper_parameters"]["pre_processor"]
    crops = {
        "transform": "torchvision.transforms.v2._geometry.CenterCrop",
        "export_transform": "anomalib.data.transforms.center_crop.ExportableCenterCrop",
    }
    for name, crop in crops.items():
        pre.get(name).get("transforms").insert(1, make_record(crop, {"size": [128, 144]}))
    spec = read_checkpoint(save_records(raw, tmp_path / "crop.ckpt"))
    assert spec.preprocess.model_size == (128, 144)
    images = golden("2.2.0").images
    expected = run(AnomalibReference.from_spec(spec).forward, images)
    assert expected.anomaly_map.shape[-2:] == (128, 144)
    _within_bar(run(PatchCoreDeploy(spec).eval(), images), expected, 0.5)


def test_1x_calls_a_score_at_the_threshold_anomalous(tmp_path):
    from patchcore_trt.reference import anomalib_1x_post

    spec = read_checkpoint(checkpoint("1.2.0"))
    model = PatchCoreDeploy(spec).eval()
    image = torch.from_numpy(golden("1.2.0").images[0][None])
    with torch.inference_mode():
        raw_score, raw_map = model.raw_scores(image)
    raw = load_records("1.2.0")
    raw["state_dict"]["image_threshold.value"] = raw_score.reshape(())  # the image sits exactly on the threshold
    tied = read_checkpoint(save_records(raw, tmp_path / "tie.ckpt"))
    assert anomalib_1x_post(raw_score, raw_map, tied.postprocess).pred_label.item() is True
    with torch.inference_mode():
        assert PatchCoreDeploy(tied).eval()(image).pred_label.item() is True
        strict = replace(tied, postprocess=replace(tied.postprocess, threshold_inclusive=False))
        assert PatchCoreDeploy(strict).eval()(image).pred_label.item() is False  # 2.x's rule would not


# ---- what cannot be known is refused in one line that says why and what to do


def _plain(tmp_path: Path, name: str, edit) -> Path:
    """A copy of 2.0.0-default (a release file that pickles no objects) with ``edit`` applied to its dict."""
    raw = torch.load(checkpoint("2.0.0-default"), map_location="cpu", weights_only=True)
    edit(raw)
    torch.save(raw, tmp_path / name)
    return tmp_path / name


def _error(path: Path, **options) -> str:
    with pytest.raises(UserError) as info:
        read_checkpoint(path, **options)
    assert "\n" not in str(info.value)
    return str(info.value)


def _bank(rows: int, ratio: float):
    def edit(raw):
        raw["state_dict"]["model.memory_bank"] = torch.rand(rows, 384)
        raw["hyper_parameters"]["coreset_sampling_ratio"] = ratio

    return edit


def test_an_undecidable_2_0_to_2_2_file_asks_for_the_release(tmp_path):
    both = _plain(tmp_path, "both.ckpt", _bank(50176, 1.0))  # 64 images of 28 x 28 patches, or 49 of 32 x 32
    message = _error(both)
    assert "fits both" in message and "pass --anomalib-version" in message
    assert read_checkpoint(both, anomalib_version="2.0.0").preprocess.model_size == (224, 224)
    assert read_checkpoint(both, anomalib_version="2.2.0").preprocess.model_size == (256, 256)
    assert "fits neither" in _error(_plain(tmp_path, "neither.ckpt", _bank(1300, 0.1)))
    line = error_line(run_cli("export", both, "-o", tmp_path / "out"))
    assert "pass --anomalib-version with the release that trained it" in line


def test_a_release_that_contradicts_the_file_is_refused():
    assert "fits only anomalib 2.0.x" in _error(checkpoint("2.0.0-default"), anomalib_version="2.1.0")
    message = _error(checkpoint("1.2.0"), anomalib_version="2.6.2")
    assert "contradicts the file, which only anomalib 1.0-1.2 writes" in message
    assert read_checkpoint(checkpoint("2.6.2"), anomalib_version="2.6.2").written_by == "anomalib 2.3-2.6"


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (lambda raw: raw["hyper_parameters"].update(pre_processor=False), ("pre_processor=False", "retrain")),
        (lambda raw: raw["hyper_parameters"].update(post_processor=False), ("post_processor=False", "retrain")),
        (lambda raw: raw["hyper_parameters"].update(precision="float16"), ("precision=float16", "float32")),
    ],
    ids=["no-pre-processor", "no-post-processor", "float16"],
)
def test_settings_patchcore_trt_cannot_reproduce_are_refused(edit, fragments, tmp_path):
    message = _error(_plain(tmp_path, "edited.ckpt", edit))
    assert all(fragment in message for fragment in fragments), message


def test_thresholding_disabled_is_refused(tmp_path):
    raw = load_records("2.6.2")
    module_of(raw).get("post_processor").state["enable_thresholding"] = False
    message = _error(save_records(raw, tmp_path / "nolabels.ckpt"))
    assert "enable_thresholding=False" in message and "retrain" in message


class Custom:
    """An object patchcore-trt does not know, pickled by reference to this test module."""


def test_only_unknown_objects_need_trust_and_the_message_names_them(tmp_path):
    path = _plain(tmp_path, "custom.ckpt", lambda raw: raw.update(extra=Custom()))
    message = _error(path)
    assert f"({__name__}.Custom)" in message and "pass --trust-pickled-code" in message
    assert read_checkpoint(path, trust_pickled_code=True).written_by == "anomalib 2.0.x"
