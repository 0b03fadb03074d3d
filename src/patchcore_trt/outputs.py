"""The ground floor, torch-free: what a model computes and how its outputs are labelled.

Every layer above shares these values: the checkpoint reader fills ``Preprocess``/``Postprocess``, the artifact
metadata stores them, every backend returns a ``Prediction``, and the summary, the result rows, the panels and the
report label through ``Postprocess.is_anomalous`` and ``Postprocess.relation``. The label rule lives here once:
anomalib 1.x calls a score equal to the threshold anomalous, 2.x does not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from patchcore_trt.errors import UserError


def over_threshold(values: Any, threshold: Any, inclusive: bool) -> Any:
    """The label rule on outputs (numpy arrays or torch tensors): above ``threshold``, or at it when ``inclusive``."""
    return values >= threshold if inclusive else values > threshold


def relation(score: float, threshold: float, label: bool) -> str:
    """The comparison shown between a score and the threshold, following the label the model gave: '>' or '>='
    when anomalous (a score at the threshold is anomalous under 1.x's rule), '<' or '<=' when normal (2.x)."""
    if label:
        return ">" if score > threshold else ">="
    return "<" if score < threshold else "<="


@dataclass(frozen=True)
class Preprocess:
    """anomalib's pre-processor: resize (then optional centre crop) and ImageNet-style normalisation."""

    resize: tuple[int, int]
    interpolation: str = "bilinear"
    antialias: bool = True
    center_crop: tuple[int, int] | None = None
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @property
    def model_size(self) -> tuple[int, int]:
        """(height, width) the backbone sees, and the resolution of anomalib's anomaly map."""
        return self.center_crop or self.resize


STATISTICS = ("image_threshold", "pixel_threshold", "image_min", "image_max", "pixel_min", "pixel_max")


@dataclass(frozen=True)
class Postprocess:
    """anomalib's post-processing: statistics (NaN fallbacks already resolved) and the rules of the release.

    Attributes:
        normalize: anomalib's ``enable_normalization``; False: scores and maps stay raw and are still labelled
            against ``1 - sensitivity``, as anomalib does.
        threshold_inclusive: A value equal to the label threshold is anomalous. anomalib 1.x labels raw >=
            threshold; its min-max normalisation puts the threshold at exactly 0.5 and is monotonic, so on the
            outputs that is normalised >= 0.5. anomalib 2.x labels normalised > 1 - sensitivity.
        zero_range: The normalised value at the threshold when max == min: 0.5 in anomalib 2.7 (an explicit
            guard), NaN in 1.x-2.6 (0 / 0).
    """

    image_threshold: float
    pixel_threshold: float
    image_min: float
    image_max: float
    pixel_min: float
    pixel_max: float
    image_sensitivity: float = 0.5
    pixel_sensitivity: float = 0.5
    normalize: bool = True
    threshold_inclusive: bool = False
    zero_range: float = 0.5

    @property
    def normalized_image_threshold(self) -> float:
        """The normalised score at which the label changes."""
        return 1.0 - self.image_sensitivity

    @property
    def normalized_pixel_threshold(self) -> float:
        """The normalised map value at which the mask changes."""
        return 1.0 - self.pixel_sensitivity

    # Outputs are float32, and so is every comparison with a threshold: 1 - 0.3 is not a float32 number, and in
    # float64 a float32 score equal to float32(0.7) would fall on the other side of an inclusive threshold.
    def label(self, scores: Any) -> Any:
        """Labels of normalised float32 scores (numpy arrays or torch tensors)."""
        return over_threshold(scores, np.float32(self.normalized_image_threshold), self.threshold_inclusive)

    def mask(self, maps: Any) -> Any:
        """Masks of normalised float32 maps (numpy arrays or torch tensors)."""
        return over_threshold(maps, np.float32(self.normalized_pixel_threshold), self.threshold_inclusive)

    def is_anomalous(self, score: float) -> bool:
        """One image's label from its normalised score: what every summary, row, panel and page shows."""
        return bool(self.label(np.float32(score)))

    def relation(self, score: float) -> str:
        """How ``score`` compares with the threshold, in words that agree with its label (see ``relation``)."""
        return relation(score, self.normalized_image_threshold, self.is_anomalous(score))

    @property
    def rule(self) -> str:
        """The label rule in words: 'score > 0.5 is anomalous' (2.x) or 'score >= 0.5 is anomalous' (1.x)."""
        return f"score {'>=' if self.threshold_inclusive else '>'} {self.normalized_image_threshold:g} is anomalous"

    def raw_score(self, score: float) -> float | None:
        """anomalib's un-normalised score behind a normalised one; None where min-max clipped it (or none applied)."""
        if not self.normalize:
            return score
        if not 0.0 < score < 1.0:
            return None
        return (score - 0.5) * (self.image_max - self.image_min) + self.image_threshold

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> Postprocess:
        """Read back ``to_dict``'s form (JSON null meaning NaN); a ValueError says what is wrong."""
        if not isinstance(value, Mapping):
            raise ValueError("postprocess is not an object")
        normalize = _flag(value.get("normalize", True), "normalize")
        post = cls(
            **{key: _number_or_nan(value.get(key), key) for key in STATISTICS},
            image_sensitivity=_number_or_nan(value.get("image_sensitivity"), "image_sensitivity"),
            pixel_sensitivity=_number_or_nan(value.get("pixel_sensitivity"), "pixel_sensitivity"),
            normalize=normalize,
            threshold_inclusive=_flag(value.get("threshold_inclusive", False), "threshold_inclusive"),
            zero_range=_number_or_nan(value.get("zero_range", 0.5), "zero_range"),
        )
        needed = ("image_sensitivity", "pixel_sensitivity") + (STATISTICS if normalize else ())
        unset = [key for key in needed if math.isnan(getattr(post, key))]
        if unset:
            raise ValueError(f"postprocess {unset[0]} is not set")
        return post


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"postprocess {name} {value!r} is not true or false")
    return value


def _number_or_nan(value: Any, name: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"postprocess {name} {value!r} is not a finite number")
    return float(value)


OUTPUT_FIELDS = ("pred_score", "pred_label", "anomaly_map", "pred_mask")


@dataclass(frozen=True)
class Prediction:
    """Host (numpy) results for a batch of N images.

    Attributes:
        pred_score: [N] float32, anomalib's normalised score in [0, 1].
        pred_label: [N] bool, True = anomalous.
        anomaly_map: [N, 1, h, w] float32, normalised; None when the maps were not asked for (a served model
            asked for scores and labels only: ``has_maps``).
        pred_mask: [N, 1, h, w] bool; None with anomaly_map.
        raw_score: [N] float32, anomalib's un-normalised score, from the backends that compute it beside the
            outputs (the PyTorch deploy model); None from the others, whose graphs return the four outputs only.
    """

    pred_score: np.ndarray
    pred_label: np.ndarray
    anomaly_map: np.ndarray | None
    pred_mask: np.ndarray | None
    raw_score: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.pred_score.shape[0])

    @property
    def has_maps(self) -> bool:
        return self.anomaly_map is not None

    def __getitem__(self, index: int | slice) -> Prediction:
        """The predictions of some images, still a batch (``prediction[i]`` is a batch of one)."""
        part = slice(index, index + 1) if isinstance(index, int) else index
        raw = None if self.raw_score is None else self.raw_score[part]
        if not self.has_maps:
            return Prediction(self.pred_score[part], self.pred_label[part], None, None, raw)
        return Prediction(
            self.pred_score[part], self.pred_label[part], self.anomaly_map[part], self.pred_mask[part], raw
        )

    @classmethod
    def from_outputs(cls, outputs: Sequence[Any]) -> Prediction:
        """From (score, label, map, mask) in the graph's output order, or (score, label) alone (no maps): numpy
        arrays or torch tensors on any device."""
        score, label, *maps = (_to_numpy(value) for value in outputs)
        batch = len(maps[0] if maps else score)
        scores = score.astype(np.float32, copy=False).reshape(batch)
        labels = label.astype(bool, copy=False).reshape(batch)
        if not maps:
            return cls(scores, labels, None, None)
        anomaly_map, mask = maps
        anomaly_map = anomaly_map.astype(np.float32, copy=False).reshape(batch, 1, *anomaly_map.shape[-2:])
        return cls(scores, labels, anomaly_map, mask.astype(bool, copy=False).reshape(anomaly_map.shape))

    @classmethod
    def from_scores(cls, pred_score: np.ndarray, anomaly_map: np.ndarray, post: Postprocess) -> Prediction:
        """From normalised scores and maps alone: labels and masks by the model's rule."""
        return cls(pred_score, post.label(pred_score), anomaly_map, post.mask(anomaly_map))

    @staticmethod
    def concat(parts: Sequence[Prediction]) -> Prediction:
        fields = [f for f in Prediction.__dataclass_fields__ if all(getattr(p, f) is not None for p in parts)]
        joined = {f: np.concatenate([getattr(p, f) for p in parts]) for f in fields}
        return Prediction(**{"anomaly_map": None, "pred_mask": None, "raw_score": None, **joined})

    def raw_score_of(self, index: int, post: Postprocess) -> float | None:
        """Image ``index``'s un-normalised score: the backend's own where it has one, else recovered from the
        normalised score (None where min-max clipped it)."""
        if self.raw_score is not None:
            return float(self.raw_score[index])
        return post.raw_score(float(self.pred_score[index]))

    def non_finite(self) -> list[int]:
        """Indices of images whose score or map holds NaN or infinity."""
        finite = np.isfinite(self.pred_score)
        if self.has_maps:
            finite &= np.isfinite(self.anomaly_map.reshape(len(self), -1)).all(axis=1)
        return np.flatnonzero(~finite).tolist()


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor: no torch import needed to recognise one
        value = value.detach().cpu()
        if str(value.dtype) in ("torch.float16", "torch.bfloat16"):
            value = value.float()
        return value.numpy()
    return np.asarray(value)


class NonFiniteOutputError(UserError):
    """Some images of a batch scored NaN or infinity; ``prediction`` still holds the whole batch."""

    def __init__(self, backend: str, prediction: Prediction, bad: list[int]) -> None:
        super().__init__(
            f"{backend}: the model returned NaN or infinite outputs for image(s) {bad} of the batch "
            "(an input of extreme values, or a model whose numbers overflow)"
        )
        self.prediction = prediction
        self.bad = bad
