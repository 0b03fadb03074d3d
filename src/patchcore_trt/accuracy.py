"""The accuracy gate: a reduced-precision ONNX against the FP32 export, on a labelled folder.

Both graphs run in ONNX Runtime on the CPU, image by image (any sizes). The figures: score drift, anomaly-map
error, label agreement (compare.py's tie rule, one band for every precision), and, on a labelled folder, image
and pixel AUROC of each. The pixel AUROC is measured on the raw anomaly maps (before normalisation clips them
to [0, 1], which ties every clipped pixel), read from an evaluation copy of each graph that also outputs them,
against masks resized as anomalib resizes them, so the reference figure is the one anomalib's evaluator gives.
What the CPU actually computes:
- FP16: ONNX Runtime's CPU provider has no x86 FP16 Conv kernel; it runs each FP16 node on its FP32 kernel
  between Casts (its InsertCastTransformer). Weights and every backbone activation are still rounded to FP16,
  which is what TensorRT's FP16 kernels store; they accumulate in FP32 as those usually do.
- INT8: Q/DQ fusion is switched off (the backend's ``qdq_fusion=False``), so each QuantizeLinear/DequantizeLinear
  pair rounds and clips exactly as the graph says, instead of ONNX Runtime's own x86 INT8 kernels, whose
  saturation differs from TensorRT's.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from PIL import Image

from patchcore_trt.artifact import INPUT_NAME, OUTPUT_NAMES, ort_session, read_onnx_metadata, write_onnx
from patchcore_trt.compare import off_threshold
from patchcore_trt.errors import UserError
from patchcore_trt.images import ImageError, collect_images, load_image
from patchcore_trt.runtime.base import Prediction

_EXACT_QDQ = {"session.disable_quant_qdq": "1"}

GOOD = "good"
MASKS = "ground_truth"
# The tie band of every precision's gate: FP16's score budget, within which a label may flip (compare.py).
THRESHOLD_BAND = 1e-3


@dataclass(frozen=True)
class LabelledSet:
    """Images with labels (True = defective) and optional masks; labels are None for a plain folder."""

    images: list[Path]
    labels: np.ndarray | None
    masks: list[Path | None]


def _mask_for(image: Path, image_root: Path, mask_root: Path) -> Path | None:
    relative = image.relative_to(image_root)
    for name in (f"{image.stem}_mask.png", f"{image.stem}.png"):
        candidate = mask_root / relative.parent / name
        if candidate.is_file():
            return candidate
    return None


def labelled_folder(root: Path) -> LabelledSet:
    """Read an MVTec-style folder: ``good/`` and defect subfolders (under ``test/`` or not), masks optional.

    Masks live in ``ground_truth/<defect>/<name>_mask.png`` beside ``test/`` (or beside the folder given). A
    folder without a ``good/`` subfolder is taken as unlabelled images.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: the evaluation folder does not exist")
    image_root = root / "test" if (root / "test" / GOOD).is_dir() else root
    mask_root = image_root.parent / MASKS if (image_root.parent / MASKS).is_dir() else image_root / MASKS
    images = [path for path in collect_images([str(image_root)])[0] if MASKS not in path.relative_to(image_root).parts]
    if not images:
        raise UserError(f"{root}: no images found for the accuracy gate")
    if not (image_root / GOOD).is_dir():
        return LabelledSet(images, None, [None] * len(images))
    labels = np.array([path.relative_to(image_root).parts[0] != GOOD for path in images])
    masks = [
        _mask_for(path, image_root, mask_root) if label else None for path, label in zip(images, labels, strict=True)
    ]
    return LabelledSet(images, labels, masks)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve as the Mann-Whitney U statistic, ties counted half.

    A rank formula in numpy rather than scikit-learn (not a dependency) or torchmetrics (pulled in only by
    anomalib): it is exact, and one sort handles the millions of pixels of a pixel AUROC.
    """
    labels = np.asarray(labels, dtype=bool).reshape(-1)
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        return None
    _, inverse, counts = np.unique(np.asarray(scores).reshape(-1), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts, dtype=np.float64)
    average_rank = ends - (counts - 1) / 2.0
    rank_sum = float(average_rank[inverse][labels].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


@dataclass(frozen=True)
class GateFigures:
    """Candidate vs reference on one image set. AUROCs are in [0, 1]; None where labels or masks are missing."""

    precision: str
    images: int
    max_score_delta: float
    mean_score_delta: float
    max_map_delta: float
    mean_map_delta: float
    label_agreement: float
    flips_off_threshold: int
    image_auroc_reference: float | None
    image_auroc: float | None
    pixel_auroc_reference: float | None
    pixel_auroc: float | None

    @property
    def image_auroc_drop_points(self) -> float | None:
        if self.image_auroc is None or self.image_auroc_reference is None:
            return None
        return 100.0 * (self.image_auroc_reference - self.image_auroc)

    def summary(self) -> str:
        def points(value: float | None) -> str:
            return "n/a" if value is None else f"{100 * value:.2f}"

        drift = (
            f"{self.precision} vs fp32 on {self.images} images: max |delta score| {self.max_score_delta:.2e}, "
            f"max |delta map| {self.max_map_delta:.2e}, labels agree {100 * self.label_agreement:.2f}% "
            f"({self.flips_off_threshold} flips farther than {THRESHOLD_BAND:g} from the threshold), "
        )
        if self.image_auroc_reference is None:
            return drift + "AUROC not measured (the folder has no good/ and defect labels)"
        return (
            drift + f"image AUROC {points(self.image_auroc_reference)} -> {points(self.image_auroc)}, "
            f"pixel AUROC {points(self.pixel_auroc_reference)} -> {points(self.pixel_auroc)}"
        )


@dataclass(frozen=True)
class Budget:
    """What a precision may cost: FP16 = identical labels and |delta score| <= 1e-3; INT8 = labels agree on 99%
    and the image AUROC drops by at most 0.5 points.

    FP16's identical labels are required of every image farther than THRESHOLD_BAND from the threshold: within
    it, a drift the score budget allows can flip a label, and the two lines would contradict each other.
    """

    max_score_delta: float | None = None
    identical_labels_off_threshold: bool = False
    min_label_agreement: float = 0.0
    max_image_auroc_drop_points: float | None = None


BUDGETS = {
    "fp16": Budget(max_score_delta=1e-3, identical_labels_off_threshold=True),
    "int8": Budget(min_label_agreement=0.99, max_image_auroc_drop_points=0.5),
}


def over_budget(figures: GateFigures, budget: Budget) -> list[str]:
    """The budget lines the figures break (empty when within budget)."""
    broken = []
    if budget.max_score_delta is not None and not figures.max_score_delta <= budget.max_score_delta:
        broken.append(f"max |delta score| {figures.max_score_delta:.2e} > {budget.max_score_delta:g}")
    if budget.identical_labels_off_threshold and figures.flips_off_threshold:
        broken.append(f"{figures.flips_off_threshold} labels differ away from the threshold")
    if figures.label_agreement < budget.min_label_agreement:
        broken.append(f"label agreement {100 * figures.label_agreement:.2f}% < {100 * budget.min_label_agreement:g}%")
    if budget.max_image_auroc_drop_points is not None:
        drop = figures.image_auroc_drop_points
        if drop is not None and drop > budget.max_image_auroc_drop_points:
            broken.append(f"image AUROC drop {drop:.2f} points > {budget.max_image_auroc_drop_points:g}")
    return broken


def _nearest_rows(source: int, target: int) -> np.ndarray:
    """PyTorch's "nearest" source index of each target index: floor(i * source / target) in float32."""
    scale = np.float32(source) / np.float32(target)
    return np.minimum(np.floor(np.arange(target, dtype=np.float32) * scale).astype(np.int64), source - 1)


def _mask_pixels(path: Path | None, shape: tuple[int, int]) -> np.ndarray:
    """The mask at the map's size, resized as anomalib's pre-processor resizes its ``gt_mask``.

    That is torchvision's Resize of a Mask, PyTorch's "nearest" (the top-left source pixel), not PIL's NEAREST
    (the centre one): on the golden 2.6.2 set the two differ by 0.06 points of pixel AUROC.
    """
    if path is None:
        return np.zeros(shape, dtype=bool)
    with Image.open(path) as mask:
        pixels = np.asarray(mask.convert("L")) > 127
    rows, cols = _nearest_rows(pixels.shape[0], shape[0]), _nearest_rows(pixels.shape[1], shape[1])
    return pixels[rows[:, None], cols[None, :]]


RAW_MAP = "raw_anomaly_map"
# The post-processing ops between the blurred map and the ``anomaly_map`` output (normalise, clip).
_NORMALISATION_OPS = {"Clip", "Add", "Sub", "Div", "Mul", "Min", "Max"}


def with_raw_map(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with one more output, RAW_MAP: the anomaly map before its min-max normalisation and clipping."""
    producers = {output: node for node in model.graph.node for output in node.output}
    name = "anomaly_map"
    while name in producers and producers[name].op_type in _NORMALISATION_OPS:
        name = producers[name].input[0]
    model.graph.node.append(onnx.helper.make_node("Identity", [name], [RAW_MAP], name=RAW_MAP))
    model.graph.output.append(onnx.helper.make_tensor_value_info(RAW_MAP, onnx.TensorProto.FLOAT, None))
    return model


class _Evaluated:
    """One graph's evaluation copy in ONNX Runtime: the four outputs as a Prediction, and the raw map."""

    def __init__(self, source: Path, scratch: Path, config: dict[str, str]) -> None:
        copy = scratch / f"{len(list(scratch.iterdir()))}-{source.name}"
        write_onnx(with_raw_map(onnx.load(str(source))), copy)
        self.session = ort_session(copy, config=config)

    def run(self, image: np.ndarray) -> tuple[Prediction, np.ndarray]:
        *outputs, raw_map = self.session.run([*OUTPUT_NAMES, RAW_MAP], {INPUT_NAME: image})
        return Prediction.from_outputs(outputs), raw_map


def evaluate(reference: Path, candidate: Path, data: LabelledSet, precision: str) -> GateFigures:
    """Run both ONNX graphs on every image of ``data`` and compare (see the module docstring for what runs)."""
    scores = np.zeros((2, len(data.images)), dtype=np.float64)
    labels = np.zeros((2, len(data.images)), dtype=bool)
    map_deltas: list[np.ndarray] = []
    pixel_maps: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    pixel_truth: list[np.ndarray] = []
    threshold = read_onnx_metadata(reference).image_threshold
    with tempfile.TemporaryDirectory(prefix="patchcore-trt-gate-") as scratch:
        # INT8 runs with ORT's Q/DQ fusion off, so quantisation happens exactly as the graph writes it.
        graphs = [_Evaluated(reference, Path(scratch), {}), _Evaluated(candidate, Path(scratch), _EXACT_QDQ)]
        for index, path in enumerate(data.images):
            try:
                image = load_image(path)[None]
            except ImageError as exc:
                raise UserError(f"{path}: {exc}") from None
            results = [graph.run(image) for graph in graphs]
            for which, (result, _) in enumerate(results):
                scores[which, index] = float(result.pred_score[0])
                labels[which, index] = bool(result.pred_label[0])
            map_deltas.append(np.abs(results[0][0].anomaly_map - results[1][0].anomaly_map).reshape(-1))
            # Pixel AUROC over good images (all-normal pixels) and defective images that have a mask.
            if data.labels is not None and (not data.labels[index] or data.masks[index] is not None):
                pixel_truth.append(_mask_pixels(data.masks[index], results[0][1].shape[-2:]).reshape(-1))
                for which in (0, 1):
                    pixel_maps[which].append(results[which][1].reshape(-1))
    deltas = np.abs(scores[0] - scores[1])
    decided = off_threshold(scores[0], threshold, THRESHOLD_BAND)
    flips = (labels[0] != labels[1]) & decided
    all_map_deltas = np.concatenate(map_deltas)
    pixels = np.concatenate(pixel_truth) if pixel_truth else None
    return GateFigures(
        precision=precision,
        images=len(data.images),
        max_score_delta=float(deltas.max()),
        mean_score_delta=float(deltas.mean()),
        max_map_delta=float(all_map_deltas.max()),
        mean_map_delta=float(all_map_deltas.mean()),
        label_agreement=float(1.0 - flips.sum() / max(1, decided.sum())),
        flips_off_threshold=int(flips.sum()),
        image_auroc_reference=None if data.labels is None else auroc(scores[0], data.labels),
        image_auroc=None if data.labels is None else auroc(scores[1], data.labels),
        pixel_auroc_reference=None if pixels is None else auroc(np.concatenate(pixel_maps[0]), pixels),
        pixel_auroc=None if pixels is None else auroc(np.concatenate(pixel_maps[1]), pixels),
    )
