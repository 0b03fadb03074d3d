"""What each anomalib release's PatchCore checkpoint layout means: which release wrote it, its transform, its
post-processing. Works on plain data and on pickled.py's inert records alike (real objects when trusted).

- 2.7+: plain-data component configs (``anomalib_pre_processor_config`` / ``anomalib_post_processor_config``,
  ``anomalib_components_enabled``).
- 2.0-2.6: ``hyper_parameters.pre_processor`` / ``post_processor`` are True (the release's default) or pickled
  objects. Lightning attaches ``log``/``log_dict`` bound methods of the LightningModule to every callback, so a
  pickled PreProcessor or PostProcessor drags in the whole module, and with it the *other* component as well.
  Only a file with both components left at their defaults records neither; then the release's default transform
  applies, which changed in 2.1 (2.0.x: Resize 256 + CenterCrop 224; 2.1+: Resize 256).
- 1.0-1.2: the training transform pickled at the top level (``transform``); thresholds in
  ``image_threshold.value`` / ``pixel_threshold.value``; min/max in ``normalization_metrics.*``.

No release writes its own version, so the release is read from the layout (``Written``): see ``detect``.
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchcore_trt.errors import UserError
from patchcore_trt.pickled import attr, enum_value, has_attr, is_object, owner_of, qualname

VERSION_OPTION = "--anomalib-version"
PRE_PROCESSOR = "anomalib.pre_processing.pre_processor.PreProcessor"
POST_PROCESSOR = "anomalib.post_processing.post_processor.PostProcessor"
POST_PREFIX = "post_processor."
CONFIG_KEYS = ("anomalib_pre_processor_config", "anomalib_post_processor_config", "anomalib_components_enabled")
LAYOUT_1X, LAYOUT_2X, LAYOUT_27 = "1.x", "2.0-2.6", "2.7+"
DEFAULT_RESIZE = (256, 256)
# int(256 * 224 / 256): the centre crop of anomalib 2.0.x's default pre-processor (2.0.0
# models/image/patchcore/lightning_model.py:187-198) and of 1.0-1.2's Patchcore.configure_transforms (1.2.0 :131-143).
DEFAULT_CROP_2_0 = (224, 224)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# anomalib 1.x's inference post-processing (deploy/inferencers/torch_inferencer.py:286-292, min-max normalisation)
_STATS_1X = {
    "image_min": "normalization_metrics.pred_scores.min",
    "image_max": "normalization_metrics.pred_scores.max",
    "pixel_min": "normalization_metrics.anomaly_maps.min",
    "pixel_max": "normalization_metrics.anomaly_maps.max",
    "image_threshold": "image_threshold.value",
    "pixel_threshold": "pixel_threshold.value",
}
# anomalib 2.x's PostProcessor buffers: Postprocess field -> buffer name (read here, written by checkpoint.py).
POST_BUFFERS = {
    "image_min": "image_min",
    "image_max": "image_max",
    "pixel_min": "pixel_min",
    "pixel_max": "pixel_max",
    "image_threshold": "_image_threshold",
    "pixel_threshold": "_pixel_threshold",
}
_STATS_2X = {field: POST_PREFIX + buffer for field, buffer in POST_BUFFERS.items()}
_SWITCHES = (
    "enable_normalization",
    "enable_thresholding",
    "enable_threshold_matching",
    "image_sensitivity",
    "pixel_sensitivity",
)
Leaf = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class Written:
    """The anomalib releases that write a checkpoint's layout, and the evidence read from the file.

    ``low``/``high`` are (major, minor) bounds; ``high`` None means "and later".
    """

    layout: str
    low: tuple[int, int]
    high: tuple[int, int] | None
    evidence: str

    @property
    def release(self) -> str:
        low = f"{self.low[0]}.{self.low[1]}"
        if self.high is None:
            return f"{low}+"
        return f"{low}.x" if self.high == self.low else f"{low}-{self.high[0]}.{self.high[1]}"

    def admits(self, version: tuple[int, int]) -> bool:
        return self.low <= version and (self.high is None or version <= self.high)


@dataclass(frozen=True)
class Layout:
    """What one checkpoint layout means, everything that differs between layouts in one place.

    Attributes:
        name: The layout, by the releases that write it.
        stat_keys: Postprocess field -> state_dict key of the statistics and thresholds.
        min_max_1x: The statistics are anomalib 1.x's min-max normalisation with the module's own thresholds (no
            PostProcessor and no switches); otherwise anomalib 2.x's PostProcessor with its switches.
        threshold_inclusive: A value at the threshold is anomalous (see Postprocess).
        zero_range: The normalised value at the threshold when max == min (see Postprocess).
        transform_default: What applies when the file records no transform: "release" (that release's default
            pre-processor) or "image size" (none can be known: the user gives the size, ImageNet normalisation).
        own_loader: anomalib's installed loader reproduces this layout's releases (so verify compares with it);
            otherwise anomalib's module is built from the file as read.
    """

    name: str
    stat_keys: dict[str, str]
    min_max_1x: bool
    threshold_inclusive: bool
    zero_range: float
    transform_default: str
    own_loader: bool


LAYOUTS = {
    # anomalib 1.x labels raw >= threshold and divides by max - min, so the threshold is 0/0 when they are equal.
    LAYOUT_1X: Layout(LAYOUT_1X, _STATS_1X, min_max_1x=True, threshold_inclusive=True, zero_range=math.nan,
                      transform_default="release", own_loader=False),
    # Before 2.7 the PostProcessor divides by max - min unguarded: 0/0 at the threshold when they are equal.
    LAYOUT_2X: Layout(LAYOUT_2X, _STATS_2X, min_max_1x=False, threshold_inclusive=False, zero_range=math.nan,
                      transform_default="release", own_loader=False),
    # 2.7's PostProcessor._normalize returns 0.5 at the threshold when max == min.
    LAYOUT_27: Layout(LAYOUT_27, _STATS_2X, min_max_1x=False, threshold_inclusive=False, zero_range=0.5,
                      transform_default="image size", own_loader=True),
}  # fmt: skip


@dataclass(frozen=True)
class Reading:
    """What a layout says about pre- and post-processing, before the values are checked (checkpoint.py)."""

    written: Written
    leaves: list[Leaf] | None  # None: the layout records no transform (settle_transform decides)
    switches: dict[str, Any]  # the PostProcessor's settings

    @property
    def layout(self) -> Layout:
        return LAYOUTS[self.written.layout]


def layout_of(written_by: str) -> Layout:
    """The layout of a spec's ``written_by`` ('anomalib 2.3-2.6', 'anomalib 2.7+', ...), from its first release."""
    release = written_by.removeprefix("anomalib ").split("-")[0].rstrip("+")
    version = parse_version(release.removesuffix(".x"))
    for written in _RANGES:
        if written.admits(version):
            return LAYOUTS[written.layout]
    raise ValueError(f"no anomalib layout is written by {written_by!r}")


_RANGES = (
    Written(LAYOUT_1X, (1, 0), (1, 2), ""),
    Written(LAYOUT_2X, (2, 0), (2, 6), ""),
    Written(LAYOUT_27, (2, 7), None, ""),
)


def parse_version(text: str) -> tuple[int, int]:
    """'2.0.0' or '2.1' -> (2, 0) / (2, 1); UserError for anything else (superscripts are digits to str.isdigit)."""
    match = re.fullmatch(r"(\d+)\.(\d+)(\.\S*)?", text.strip(), re.ASCII)
    if match is None:
        raise UserError(f"{VERSION_OPTION} {text!r} is not a release number like 2.0.0; give the anomalib release")
    return int(match[1]), int(match[2])


def pickled_module(hyper: dict[str, Any]) -> Any:
    """The LightningModule reached through a pickled component's ``log`` bound method, or None."""
    for value in hyper.values():
        if is_object(value):
            module = owner_of(attr(value, "log"))
            if module is not None:
                return module
    return None


def _markers(raw: dict[str, Any], state: dict[str, Any], hyper: dict[str, Any]) -> dict[str, str]:
    """layout -> the marker only that layout's releases write, for each layout whose marker the file carries."""
    found = {}
    if any(key in raw for key in CONFIG_KEYS):
        found[LAYOUT_27] = "plain-data component configs (anomalib_*_config keys, added in 2.7)"
    if any(key.startswith(("image_threshold.", "normalization_metrics.")) for key in state):
        found[LAYOUT_1X] = "image_threshold.value / normalization_metrics.* in the state_dict"
    if any(is_object(hyper.get(key)) for key in ("pre_processor", "post_processor")):  # 2.7 pickles neither
        found[LAYOUT_2X] = "a pickled PreProcessor / PostProcessor in hyper_parameters (2.0-2.6)"
    if LAYOUT_1X in found and any(key.startswith(POST_PREFIX) for key in state):
        found.setdefault(LAYOUT_2X, "PostProcessor buffers (post_processor.*, written by 2.0 and later)")
    return found


def detect(path: Path, raw: dict[str, Any], state: dict[str, Any], hyper: dict[str, Any]) -> Written:
    """The layout and release range, from markers no other release writes (anomalib source, per release)."""
    markers = _markers(raw, state, hyper)
    if len(markers) > 1:
        (first, why_first), (second, why_second) = list(markers.items())[:2]
        raise UserError(
            f"{path}: the file carries markers of two anomalib layouts that no release writes together: {why_first} "
            f"(anomalib {first}) and {why_second} (anomalib {second}); it was edited or assembled from two files: "
            "use the .ckpt file anomalib saved"
        )
    if LAYOUT_27 in markers:
        return Written(LAYOUT_27, (2, 7), None, markers[LAYOUT_27])
    if LAYOUT_1X in markers:
        return Written(LAYOUT_1X, (1, 0), (1, 2), markers[LAYOUT_1X])
    if not any(key.startswith(POST_PREFIX) for key in state) and "pre_processor" not in hyper:
        raise UserError(
            f"{path}: not a checkpoint of anomalib 1.0 to 2.7 (no post-processor statistics and no pre-processor "
            "setting); export it from the anomalib that trained it with Engine.fit, then read the saved .ckpt"
        )
    if "precision" in hyper:
        return Written(LAYOUT_2X, (2, 3), (2, 6), "hyper_parameters.precision (added in 2.3), no 2.7 config keys")
    module = pickled_module(hyper)
    if module is not None:
        if has_attr(module, "embeddings"):
            return Written(LAYOUT_2X, (2, 0), (2, 0), "the pickled Patchcore keeps .embeddings (moved in 2.1)")
        return Written(LAYOUT_2X, (2, 1), (2, 2), "the pickled PatchcoreModel has .embedding_store, no precision")
    return Written(LAYOUT_2X, (2, 0), (2, 2), "no precision hyper-parameter, no pickled component")


def check_version(path: Path, written: Written, version: str | None) -> None:
    """A given --anomalib-version must be one of the releases that write this layout."""
    if version is not None and not written.admits(parse_version(version)):
        raise UserError(
            f"{path}: {VERSION_OPTION} {version} contradicts the file, which only anomalib {written.release} writes "
            f"({written.evidence}); leave the option out or give the release that trained it"
        )


def coreset_fits(bank_rows: int, patches_per_image: int, ratio: float) -> bool:
    """Whether some training-set size N gives anomalib's coreset size int(N * patches * ratio) == bank_rows
    (k_center_greedy.py: ``int(n * sampling_ratio)`` rows, 1.2 through 2.7)."""
    per_image = patches_per_image * ratio
    if not per_image > 0:
        return False
    top = int(bank_rows / per_image) + 2
    return any(int(n * patches_per_image * ratio) == bank_rows for n in range(max(1, top - 4), top + 1))


def resolve_default_release(
    path: Path,
    written: Written,
    bank_rows: int,
    ratio: float,
    patches_at: Callable[[tuple[int, int]], int],
    version: str | None,
) -> Written:
    """Tell 2.0.x (default crop 224) from 2.1-2.2 (no crop) for a file that records neither component.

    The coreset has int(N * patches * ratio) rows, which fits one default resolution only, as a rule.
    """
    if version is not None:
        low, high = ((2, 0), (2, 0)) if parse_version(version) == (2, 0) else ((2, 1), (2, 2))
        given = Written(LAYOUT_2X, low, high, f"{VERSION_OPTION} {version}")
    fits = {
        (2, 0): coreset_fits(bank_rows, patches_at(DEFAULT_CROP_2_0), ratio),
        (2, 1): coreset_fits(bank_rows, patches_at(DEFAULT_RESIZE), ratio),
    }
    matches = [low for low, ok in fits.items() if ok]
    if version is not None:
        if len(matches) == 1 and matches[0] != given.low:
            fitting = "2.0.x" if matches[0] == (2, 0) else "2.1-2.2"
            raise UserError(
                f"{path}: {VERSION_OPTION} {version} contradicts the file: its memory bank of {bank_rows} rows fits "
                f"only anomalib {fitting}'s default resolution; leave the option out or check which release trained it"
            )
        return given
    if len(matches) == 1:
        if matches[0] == (2, 0):
            return Written(LAYOUT_2X, (2, 0), (2, 0), f"memory bank of {bank_rows} rows is a {ratio} coreset only at "
                           "224x224, the 2.0.x default crop")  # fmt: skip
        return Written(LAYOUT_2X, (2, 1), (2, 2), f"memory bank of {bank_rows} rows is a {ratio} coreset only at "
                       "256x256, the 2.1+ default")  # fmt: skip
    fit = "fits both" if matches else "fits neither"
    raise UserError(
        f"{path}: written by anomalib 2.0, 2.1 or 2.2 with the default pre-processor, whose size changed in 2.1 "
        f"(2.0: Resize 256 + CenterCrop 224; 2.1+: Resize 256); the file does not say which and its memory bank "
        f"({bank_rows} rows) {fit}; pass {VERSION_OPTION} with the release that trained it"
    )


def default_leaves(written: Written) -> list[Leaf]:
    """The default transform of the releases in ``written``, when the file records none.

    2.1+ (commit 03dc12694 made the crop optional; 2.2.0 lightning_model.py:193-210, 2.7.0 :211-228): Resize 256.
    2.0.x and 1.x: Resize 256 + CenterCrop 224 (see DEFAULT_CROP_2_0).
    """
    resize = ("Resize", {"size": list(DEFAULT_RESIZE), "interpolation": "bilinear", "antialias": True})
    normalize = ("Normalize", {"mean": IMAGENET_MEAN, "std": IMAGENET_STD})
    if written.high is not None and written.high <= (2, 0):
        return [resize, ("CenterCrop", {"size": list(DEFAULT_CROP_2_0)}), normalize]
    return [resize, normalize]


def leaves_from_objects(transform: Any) -> list[Leaf]:
    """(class name, arguments) of each leaf of a pickled torchvision v2 transform."""
    name = qualname(transform)
    if name.endswith(".Compose"):
        children = attr(transform, "transforms")
        if not isinstance(children, (list, tuple)):
            return [(name, {"transforms": children})]
        return [leaf for child in children for leaf in leaves_from_objects(child)]
    short = name.rsplit(".", 1)[-1]
    if short == "Resize":
        keys = ("size", "interpolation", "antialias", "max_size")
        return [(name, {key: enum_value(attr(transform, key)) for key in keys})]
    if short in ("CenterCrop", "ExportableCenterCrop"):
        return [(name, {"size": attr(transform, "size")})]
    if short == "Normalize":
        return [(name, {"mean": attr(transform, "mean"), "std": attr(transform, "std")})]
    return [(name, {})]


def leaves_from_spec(spec: Any, problems: list[str]) -> list[Leaf]:
    """(class path, init args) of each leaf of anomalib 2.7's plain-data transform spec."""
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str):
        problems.append(f"the pre-processor's transform is {shown(spec)}, expected a class_path/init_args dict")
        return []
    args = spec.get("init_args", {})
    if not isinstance(args, dict):
        problems.append(f"the init_args of {spec['class_path']} are {shown(args)}, expected a dict")
        return []
    if spec["class_path"].endswith(".Compose"):
        children = args.get("transforms")
        if not isinstance(children, list):
            problems.append(f"the Compose transform lists {shown(children)}, expected a list of transforms")
            return []
        return [leaf for child in children for leaf in leaves_from_spec(child, problems)]
    return [(spec["class_path"], args)]


def shown(value: Any) -> str:
    """A value as a message shows it: its type and the start of its repr."""
    text = reprlib.repr(value)  # depth-limited: a crafted file may nest containers a million deep
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _dict_at(raw: dict[str, Any], key: str, problems: list[str]) -> dict[str, Any]:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{key} is {shown(value)}, expected a dict")
        return {}
    return value


def _component(path: Path, hyper: dict[str, Any], name: str, expected: str) -> Any:
    """A 2.0-2.6 component: the pickled object (direct, or the dragged-in module's), or None for the default."""
    value = hyper.get(name, True)
    if value is False:
        effect = {
            "pre_processor": "anomalib feeds it unresized, unnormalised images; patchcore-trt needs the model's "
            "resolution and normalisation",
            "post_processor": "anomalib outputs raw scores and no labels; patchcore-trt exports anomalib's "
            "normalised scores and labels",
        }[name]
        raise UserError(f"{path}: the model was trained with {name}=False ({effect}); retrain with anomalib's {name}")
    if not is_object(value):
        module = pickled_module(hyper)
        value = attr(module, name) if module is not None else None
        if value is None:
            return None
    if qualname(value) != expected:
        raise UserError(
            f"{path}: the {name} is a {qualname(value)}, which patchcore-trt does not reproduce (it reproduces "
            f"{expected.rsplit('.', 1)[-1]}); retrain with anomalib's own {expected.rsplit('.', 1)[-1]}"
        )
    return value


def _with_training_antialias(leaves: list[Leaf], training: Any) -> list[Leaf]:
    resizes = [args for name, args in leaves_from_objects(training) if name.endswith("Resize")] if training else []
    if not resizes:
        return leaves
    return [(name, {**args, "antialias": resizes[0].get("antialias")}) if name.endswith("Resize") else (name, args)
            for name, args in leaves]  # fmt: skip


def _switches_of(post_processor: Any) -> dict[str, Any]:
    switches = {key: attr(post_processor, key) for key in _SWITCHES}
    return {key: value for key, value in switches.items() if value is not None}


def read_layout(
    path: Path, raw: dict[str, Any], state: dict[str, Any], hyper: dict[str, Any], problems: list[str]
) -> Reading:
    """What the file's layout records about its transform and post-processing."""
    written = detect(path, raw, state, hyper)
    if written.layout == LAYOUT_27:
        enabled = _dict_at(raw, "anomalib_components_enabled", problems)
        _component(path, {"pre_processor": enabled.get("pre_processor", True)}, "pre_processor", PRE_PROCESSOR)
        _component(path, {"post_processor": enabled.get("post_processor", True)}, "post_processor", POST_PROCESSOR)
        config = _dict_at(raw, "anomalib_pre_processor_config", problems)
        transform = config.get("transform")
        leaves = leaves_from_spec(transform, problems) if transform is not None else None
        return Reading(written, leaves, _dict_at(raw, "anomalib_post_processor_config", problems))
    if written.layout == LAYOUT_1X:
        transform = raw.get("transform")
        return Reading(written, leaves_from_objects(transform) if transform is not None else None, {})
    pre_processor = _component(path, hyper, "pre_processor", PRE_PROCESSOR)
    leaves = None
    if pre_processor is not None:
        # forward() runs export_transform (antialias off, exportable crop); the training transform says whether
        # anomalib's predict path antialiases.
        training = attr(pre_processor, "transform")
        transform = attr(pre_processor, "export_transform") or training
        if transform is None:
            raise UserError(
                f"{path}: the pickled pre-processor has no transform, so anomalib feeds the model unresized images; "
                "patchcore-trt needs the model's resolution: retrain with a pre-processor that resizes"
            )
        leaves = _with_training_antialias(leaves_from_objects(transform), training)
    post_processor = _component(path, hyper, "post_processor", POST_PROCESSOR)
    return Reading(written, leaves, _switches_of(post_processor) if post_processor is not None else {})


def settle_transform(
    path: Path,
    reading: Reading,
    image_size: tuple[int, int] | None,
    bank_rows: int,
    ratio: Any,
    patches_at: Callable[[tuple[int, int]], int] | None,
    version: str | None,
) -> tuple[list[Leaf], Written]:
    """The transform the model ran with and the releases that wrote the file, once its values are known sound.

    ``ratio``: hyper_parameters.coreset_sampling_ratio; ``patches_at``: patches per image at a model size (None
    when the backbone is unusable). Both only tell 2.0 from 2.1-2.2 when a file records no transform.
    """
    written = reading.written
    check_version(path, written, version)
    if reading.leaves is not None:
        return reading.leaves, written
    if reading.layout.transform_default == "image size":
        if image_size is None:
            raise UserError(
                f"{path}: the checkpoint records no pre-processor transform (anomalib {written.release} saves none "
                "for a transform it cannot store safely, or a custom pre-processor); pass --image-size HxW if the "
                "model used anomalib's default Resize to that size with ImageNet normalisation"
            )
        normalize = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
        return [("Resize", {"size": list(image_size)}), ("Normalize", normalize)], written
    if written.low == (2, 0) and written.high == (2, 2):
        if patches_at is None or isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise UserError(f"{path}: cannot tell anomalib 2.0 from 2.1-2.2 (no usable backbone or coreset ratio)")
        written = resolve_default_release(path, written, bank_rows, float(ratio), patches_at, version)
    return default_leaves(written), written
