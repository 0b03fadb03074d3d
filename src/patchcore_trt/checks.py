"""Every value a PatchCoreSpec takes from a checkpoint, checked: each problem becomes one line of a list, so a
malformed file is reported once and completely (checkpoint.read_checkpoint raises them together), never as a
traceback later in timm, torch or the exporter.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from patchcore_trt.artifact import MAX_SIDE, MIN_SIDE
from patchcore_trt.errors import UserError
from patchcore_trt.layouts import Leaf, Reading, shown
from patchcore_trt.spec import Postprocess, Preprocess

BLUR_KERNEL_KEY = "model.anomaly_map_generator.blur.kernel"
INTERPOLATIONS = ("bilinear", "nearest", "bicubic")


def model_fields(hyper: dict[str, Any], problems: list[str]) -> tuple[str | None, tuple[str, ...] | None, int | None]:
    backbone = hyper.get("backbone")
    if not isinstance(backbone, str) or not backbone:
        problems.append(f"hyper_parameters.backbone is {shown(backbone)}, expected a timm model name")
        backbone = None
    layers = hyper.get("layers", ["layer2", "layer3"])
    if not isinstance(layers, (list, tuple)) or not layers or not all(isinstance(item, str) for item in layers):
        problems.append(f"hyper_parameters.layers is {shown(layers)}, expected a list of layer names")
        layers = None
    k = hyper.get("num_neighbors", 9)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        problems.append(f"hyper_parameters.num_neighbors is {shown(k)}, expected a whole number of at least 1")
        k = None
    return backbone, tuple(layers) if layers is not None else None, k


def meta_backbone(backbone: str, layers: tuple[str, ...], problems: list[str]) -> torch.nn.Module | None:
    """timm's network with shapes only (no memory, no weights): what the weights and the bank must fit."""
    try:
        return _meta_network(backbone, layers)
    except UserError as exc:
        problems.append(str(exc))
        return None


@functools.lru_cache(maxsize=4)
def _meta_network(backbone: str, layers: tuple[str, ...]) -> torch.nn.Module:
    """Built once per (backbone, layers): it holds no values, and only its shapes are read."""
    from patchcore_trt.model import create_backbone

    with torch.device("meta"):
        return create_backbone(backbone, layers)


def check_weights(
    network: torch.nn.Module, name: str, weights: dict[str, Any], bank: torch.Tensor, problems: list[str]
) -> None:
    import timm

    expected = {key: list(value.shape) for key, value in network.state_dict().items()}
    found = {key: list(value.shape) for key, value in weights.items() if isinstance(value, torch.Tensor)}
    details = [f"{key} is not a tensor" for key, value in weights.items() if not isinstance(value, torch.Tensor)]
    shapes = [key for key in expected if found.get(key, expected[key]) != expected[key]]
    details += [f"{key} is {found[key]} here, {expected[key]} in timm" for key in shapes]
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    details += [f"missing {missing[:3]}"] * bool(missing) + [f"unexpected {unexpected[:3]}"] * bool(unexpected)
    broken = [
        key
        for key, value in weights.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all()
    ]
    if broken:
        problems.append(f"the backbone weights hold NaN or infinite values ({', '.join(broken[:3])})")
    if details:
        more = f" and {len(details) - 2} more" if len(details) > 2 else ""
        problems.append(
            f"the backbone weights do not fit timm {timm.__version__}'s {name} ({'; '.join(details[:2])}{more}); "
            "was it trained with another timm version? install that version"
        )
    width = sum(network.feature_info.channels())
    if bank.shape[1] != width:
        problems.append(
            f"the memory bank is {list(bank.shape)}, but {name}'s layers give {width} features per patch, "
            f"expected [rows, {width}]"
        )


def patches_at(network: torch.nn.Module) -> Callable[[tuple[int, int]], int]:
    def patches(size: tuple[int, int]) -> int:
        with torch.device("meta"):
            first = network(torch.zeros(1, 3, *size))[0]
        return int(first.shape[-2] * first.shape[-1])

    return patches


def _size(value: Any, what: str, problems: list[str], *, square_from_int: bool) -> tuple[int, int] | None:
    """(height, width) from [h, w] (or one int / [n] for a square crop); None with a problem otherwise."""
    if square_from_int and (isinstance(value, int) or (isinstance(value, (list, tuple)) and len(value) == 1)):
        value = [value, value] if isinstance(value, int) else [value[0], value[0]]
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(type(side) is int for side in value):
        if min(value) <= 0:
            problems.append(f"the pre-processor's {what} size {list(value)} is not positive")
        elif min(value) < MIN_SIDE or max(value) > MAX_SIDE:
            problems.append(
                f"the pre-processor's {what} size {list(value)} is outside {MIN_SIDE}..{MAX_SIDE}, the sides an "
                "exported model takes"
            )
        else:
            return int(value[0]), int(value[1])
        return None
    problems.append(f"the pre-processor's {what} size is {shown(value)}, expected [height, width]")
    return None


def preprocess(
    path: Path, leaves: list[Leaf], image_size: tuple[int, int] | None, problems: list[str]
) -> Preprocess | None:
    fields: dict[str, Any] = {}
    before = len(problems)
    for name, args in leaves:
        short = name.rsplit(".", 1)[-1]
        if short == "Resize":
            size = args.get("size")
            if isinstance(size, int) or (isinstance(size, (list, tuple)) and len(size) == 1) or args.get("max_size"):
                raise UserError(
                    f"{path}: the pre-processor resizes the shorter side to {size}; only a fixed (height, width) "
                    "resize is supported: retrain with Resize((height, width))"
                )
            fields["resize"] = _size(size, "Resize", problems, square_from_int=False)
            fields["interpolation"] = str(args.get("interpolation") or "bilinear").lower().rsplit(".", 1)[-1]
            fields["antialias"] = bool(args.get("antialias", True))
        elif short in ("CenterCrop", "ExportableCenterCrop"):
            fields["center_crop"] = _size(args.get("size"), "CenterCrop", problems, square_from_int=True)
        elif short == "Normalize":
            mean, std = args.get("mean"), args.get("std")
            numbers = all(
                isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)
                for v in (mean, std)
            )
            if not numbers or not all(math.isfinite(x) for x in (*mean, *std)) or not all(x > 0 for x in std):
                problems.append(f"the pre-processor's Normalize has mean {mean!r}, std {std!r}: expected 3 numbers")
            else:
                fields.update(mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))
        else:
            raise UserError(
                f"{path}: the pre-processor uses {name}, which patchcore-trt does not reproduce (it reproduces "
                "Resize, CenterCrop and Normalize); retrain without it"
            )
    if "resize" not in fields:
        raise UserError(f"{path}: the pre-processor has no Resize; patchcore-trt needs a fixed model resolution")
    if image_size is not None:
        fields["resize"] = image_size
    if fields.get("interpolation", "bilinear") not in INTERPOLATIONS:
        problems.append(f"resize interpolation {fields['interpolation']!r} is not one of {', '.join(INTERPOLATIONS)}")
    if len(problems) > before:
        return None
    crop = fields.get("center_crop")
    if crop is not None and (crop[0] > fields["resize"][0] or crop[1] > fields["resize"][1]):
        raise UserError(f"{path}: the centre crop {crop} is larger than the resize {fields['resize']}; not supported")
    return Preprocess(**fields)


def _stat(state: dict[str, Any], key: str, problems: list[str]) -> float:
    value = state.get(key)
    if value is None:
        return math.nan
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
        seen = f"a tensor of shape {list(value.shape)}" if isinstance(value, torch.Tensor) else shown(value)
        problems.append(f"{key} is {seen}, expected one floating-point number")
        return math.nan
    number = float(value.reshape(-1)[0])
    if math.isinf(number):  # anomalib's statistics are minima, maxima and thresholds of real scores
        problems.append(f"{key} is {number}, expected a finite number")
    return number


def _switch(switches: dict[str, Any], key: str, default: Any, problems: list[str]) -> Any:
    value = switches.get(key, default)
    kind = bool if isinstance(default, bool) else (int, float)
    if not isinstance(value, kind) or (kind is not bool and (isinstance(value, bool) or not math.isfinite(value))):
        expected = "True or False" if kind is bool else "a number"
        problems.append(f"the post-processor's {key} is {shown(value)}, expected {expected}")
        return default
    return value


def postprocess(path: Path, state: dict[str, Any], reading: Reading, problems: list[str]) -> Postprocess:
    """The statistics and switches, resolved exactly as the release's PostProcessor does at inference."""
    before = len(problems)
    layout = reading.layout
    values = {field: _stat(state, key, problems) for field, key in layout.stat_keys.items()}
    stats = {name: values[name] for name in ("image_min", "image_max", "pixel_min", "pixel_max")}
    if layout.min_max_1x:
        if len(problems) == before and not all(math.isfinite(value) for value in values.values()):
            raise UserError(
                f"{path}: the anomalib 1.x checkpoint has no min-max statistics or thresholds (its normalization "
                "method was not min_max, or it was never validated); patchcore-trt reproduces anomalib 1.x's min-max "
                "inference only: validate it with normalization_method min_max and save it again"
            )
        return Postprocess(**values, threshold_inclusive=layout.threshold_inclusive, zero_range=layout.zero_range)
    switches = reading.switches
    normalize = _switch(switches, "enable_normalization", True, problems)
    matching = _switch(switches, "enable_threshold_matching", True, problems)
    if not _switch(switches, "enable_thresholding", True, problems):
        raise UserError(
            f"{path}: the post-processor has thresholding disabled (enable_thresholding=False), so anomalib gives "
            "no labels; patchcore-trt exports labels and masks: retrain with enable_thresholding=True"
        )
    image_threshold, pixel_threshold = values["image_threshold"], values["pixel_threshold"]
    if matching:  # PostProcessor.image_threshold / pixel_threshold: each falls back to the other
        image_threshold, pixel_threshold = (
            pixel_threshold if math.isnan(image_threshold) else image_threshold,
            image_threshold if math.isnan(pixel_threshold) else pixel_threshold,
        )
    unset = [layout.stat_keys[name] for name, value in stats.items() if math.isnan(value)]
    if normalize and len(problems) == before and len(unset) == len(stats):
        raise UserError(
            f"{path}: the checkpoint has no normalisation statistics (it was never validated); "
            "run anomalib's Engine.fit with a validation split, or Engine.validate, and save it again"
        )
    if normalize and len(problems) == before and unset and len(unset) < len(stats):  # validation sets all four together
        problems.append(
            f"{', '.join(unset)} {'is' if len(unset) == 1 else 'are'} NaN while the other statistics are set"
        )
    # PostProcessor._normalize normalises around the midpoint of min and max when no threshold was learned.
    if math.isnan(image_threshold):
        image_threshold = (stats["image_min"] + stats["image_max"]) / 2
    if math.isnan(pixel_threshold):
        pixel_threshold = (stats["pixel_min"] + stats["pixel_max"]) / 2
    return Postprocess(
        image_threshold=image_threshold,
        pixel_threshold=pixel_threshold,
        image_sensitivity=float(_switch(switches, "image_sensitivity", 0.5, problems)),
        pixel_sensitivity=float(_switch(switches, "pixel_sensitivity", 0.5, problems)),
        normalize=normalize,
        threshold_inclusive=layout.threshold_inclusive,
        zero_range=layout.zero_range,
        **stats,
    )


def separable_taps(kernel: Any, problems: list[str]) -> torch.Tensor | None:
    if not isinstance(kernel, torch.Tensor):
        problems.append(f"the checkpoint has no anomaly-map blur kernel ({BLUR_KERNEL_KEY})")
        return None
    side = kernel.shape[-1] if kernel.ndim >= 2 else 0
    if kernel.ndim < 2 or kernel.shape[-2] != side or kernel.numel() != side * side or side % 2 == 0:
        problems.append(f"the anomaly-map blur kernel has shape {list(kernel.shape)}, expected [1, 1, k, k] with k odd")
        return None
    kernel_2d = kernel.reshape(side, side).double()
    taps = kernel_2d.sum(dim=1)
    if not torch.isfinite(kernel_2d).all() or not torch.allclose(torch.outer(taps, taps), kernel_2d, atol=1e-9):
        problems.append("the anomaly-map blur kernel is not a separable Gaussian")
        return None
    return taps.float()
