"""anomalib's PatchCore checkpoint layout: read one into a PatchCoreSpec without running pickled code, and write one.

Checkpoints are pickles. By default they load with ``torch.load(weights_only=True)`` and an allowlist of the
few non-tensor types anomalib writes (its ``PrecisionType`` enum and numpy scalars), so anomalib itself need
not be installed and no code from the file runs. ``trust_pickled_code=True`` is the explicit opt-in for
trusted legacy files that pickled whole objects.

``write_checkpoint`` writes the same layout from a spec (synthetic benchmark models, tests), so reader and
writer of the format sit side by side.
"""

from __future__ import annotations

import enum
import math
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchcore_trt.errors import UserError
from patchcore_trt.files import atomic_path, sha256_of
from patchcore_trt.spec import PatchCoreSpec, Postprocess, Preprocess

BACKBONE_PREFIX = "model.feature_extractor.feature_extractor."
MEMORY_BANK_KEY = "model.memory_bank"
BLUR_KERNEL_KEY = "model.anomaly_map_generator.blur.kernel"
POST_PREFIX = "post_processor."
TRUST_OPTION = "--trust-pickled-code"


class PrecisionType(str, enum.Enum):
    """Stand-in for ``anomalib.PrecisionType``, the one anomalib class a 2.x checkpoint pickles."""

    FLOAT16 = "float16"
    FLOAT32 = "float32"


def _numpy_reduce(value: Any) -> Any:
    return value.__reduce__()[0]


# The same list anomalib allowlists (anomalib.utils.serialization), under the names the pickle refers to.
_SAFE_GLOBALS: list[Any] = [
    (PrecisionType, "anomalib.PrecisionType"),
    (PrecisionType, "anomalib.utils.types.PrecisionType"),
    (_numpy_reduce(np.float64(0)), "numpy.core.multiarray.scalar"),
    (_numpy_reduce(np.float64(0)), "numpy._core.multiarray.scalar"),
    (_numpy_reduce(np.empty(0)), "numpy.core.multiarray._reconstruct"),
    (_numpy_reduce(np.empty(0)), "numpy._core.multiarray._reconstruct"),
    np.dtype,
    np.ndarray,
    np.dtypes.Float64DType,
]


def _load_raw(path: Path, trust_pickled_code: bool) -> dict[str, Any]:
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path}: not a file (expected an anomalib .ckpt)")
    if not zipfile.is_zipfile(path):
        head = path.read_bytes()[:4]
        if head.startswith(b"PK"):
            raise UserError(f"{path}: the checkpoint archive is truncated or corrupt; copy it again")
        raise UserError(f"{path}: not a PyTorch checkpoint (expected a Lightning .ckpt from anomalib)")
    try:
        if trust_pickled_code:
            return torch.load(path, map_location="cpu", weights_only=False)  # nosec B614 - explicit opt-in
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        if "Unsupported global" in message or "weights_only" in message.lower():
            name = message.split("GLOBAL", 1)[-1].split("was not", 1)[0].strip() if "GLOBAL" in message else "?"
            raise UserError(
                f"{path}: the checkpoint pickles Python objects ({name}) that could run code when loaded; "
                f"if you trust where it came from, pass {TRUST_OPTION}"
            ) from None
        raise UserError(f"{path}: the checkpoint is corrupt ({message.splitlines()[0]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, KeyError, ValueError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: the checkpoint is truncated or corrupt ({first_line})") from None


def _scalar(state: dict[str, torch.Tensor], key: str) -> float:
    value = state.get(key)
    return float("nan") if value is None else float(value.reshape(-1)[0])


def _postprocess(path: Path, state: dict[str, torch.Tensor], config: dict[str, Any]) -> Postprocess:
    """Resolve anomalib's PostProcessor exactly as its properties do (threshold matching, NaN fallbacks)."""
    image_threshold = _scalar(state, POST_PREFIX + "_image_threshold")
    pixel_threshold = _scalar(state, POST_PREFIX + "_pixel_threshold")
    matching = bool(config.get("enable_threshold_matching", True))
    if math.isnan(image_threshold) and matching:
        image_threshold = pixel_threshold
    if math.isnan(pixel_threshold) and matching:
        pixel_threshold = image_threshold
    stats = {name: _scalar(state, POST_PREFIX + name) for name in ("image_min", "image_max", "pixel_min", "pixel_max")}
    if not config.get("enable_normalization", True) or not config.get("enable_thresholding", True):
        raise UserError(
            f"{path}: the checkpoint's post-processor has normalisation or thresholding disabled; "
            "patchcore-trt exports anomalib's default post-processing only"
        )
    if any(math.isnan(value) for value in stats.values()):
        raise UserError(
            f"{path}: the checkpoint has no normalisation statistics (it was never validated); "
            "run anomalib's Engine.fit with a validation split, or Engine.validate, and save it again"
        )
    # anomalib normalises with the midpoint of min and max when no threshold was learned.
    if math.isnan(image_threshold):
        image_threshold = (stats["image_min"] + stats["image_max"]) / 2
    if math.isnan(pixel_threshold):
        pixel_threshold = (stats["pixel_min"] + stats["pixel_max"]) / 2
    return Postprocess(
        image_threshold=image_threshold,
        pixel_threshold=pixel_threshold,
        image_sensitivity=float(config.get("image_sensitivity", 0.5)),
        pixel_sensitivity=float(config.get("pixel_sensitivity", 0.5)),
        **stats,
    )


def _transform_spec(raw: dict[str, Any]) -> dict[str, Any] | None:
    config = raw.get("anomalib_pre_processor_config") or {}
    spec = config.get("transform")
    if spec is not None:
        return spec
    # Checkpoints before anomalib 2.7 keep the transform only as a pickled object (trusted loads only).
    pre_processor = raw.get("hyper_parameters", {}).get("pre_processor")
    transform = getattr(pre_processor, "transform", None)
    if transform is not None:
        from anomalib.pre_processing.utils.spec import transform_to_spec

        return transform_to_spec(transform)
    return None


def _flatten_transforms(spec: dict[str, Any]) -> list[dict[str, Any]]:
    if spec["class_path"].endswith(".Compose"):
        return [leaf for child in spec["init_args"]["transforms"] for leaf in _flatten_transforms(child)]
    return [spec]


def _pair(value: Any) -> tuple[int, int] | None:
    """(height, width) of a fixed-size Resize/CenterCrop; None for torchvision's shorter-side form (int or [n])."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return (int(value[0]), int(value[1]))
    return None


def _preprocess(path: Path, raw: dict[str, Any], image_size: tuple[int, int] | None) -> Preprocess:
    spec = _transform_spec(raw)
    if spec is None:
        size = image_size or (256, 256)
        return Preprocess(resize=size)
    fields: dict[str, Any] = {}
    for leaf in _flatten_transforms(spec):
        name = leaf["class_path"].rsplit(".", 1)[-1]
        args = leaf["init_args"]
        if name == "Resize":
            size = _pair(args.get("size"))
            if size is None:
                raise UserError(
                    f"{path}: the pre-processor resizes the shorter side to {args.get('size')}; "
                    "only a fixed (height, width) resize is supported"
                )
            fields.update(resize=size, interpolation=str(args.get("interpolation", "bilinear")).lower())
            fields["antialias"] = bool(args.get("antialias", True))
        elif name in ("CenterCrop", "ExportableCenterCrop"):
            # Unlike Resize, a one-number crop size means a square.
            size = args.get("size")
            side = size if isinstance(size, int) else size[0]
            fields["center_crop"] = _pair(size) or (int(side), int(side))
        elif name == "Normalize":
            fields.update(mean=tuple(float(v) for v in args["mean"]), std=tuple(float(v) for v in args["std"]))
        else:
            raise UserError(f"{path}: the pre-processor uses {name}, which patchcore-trt does not reproduce")
    if "resize" not in fields:
        raise UserError(f"{path}: the pre-processor has no Resize; patchcore-trt needs a fixed model resolution")
    if image_size is not None:
        fields["resize"] = image_size
    crop = fields.get("center_crop")
    if crop is not None and (crop[0] > fields["resize"][0] or crop[1] > fields["resize"][1]):
        raise UserError(f"{path}: the centre crop {crop} is larger than the resize {fields['resize']}; not supported")
    if fields["interpolation"] not in ("bilinear", "nearest", "bicubic"):
        raise UserError(f"{path}: resize interpolation {fields['interpolation']!r} is not supported")
    return Preprocess(**fields)


def _separable_taps(path: Path, kernel: torch.Tensor | None) -> torch.Tensor:
    if kernel is None:
        raise UserError(f"{path}: the checkpoint has no anomaly-map blur kernel ({BLUR_KERNEL_KEY})")
    kernel_2d = kernel.reshape(kernel.shape[-2], kernel.shape[-1]).double()
    taps = kernel_2d.sum(dim=1)
    if not torch.allclose(torch.outer(taps, taps), kernel_2d, atol=1e-9):
        raise UserError(f"{path}: the anomaly-map blur kernel is not a separable Gaussian")
    return taps.float()


def _check_patchcore(path: Path, raw: dict[str, Any]) -> dict[str, torch.Tensor]:
    state = raw.get("state_dict") if isinstance(raw, dict) else None
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a Lightning checkpoint (it has no state_dict)")
    if any(key.startswith(("image_threshold.", "normalization_metrics.")) for key in state):
        raise UserError(
            f"{path}: this is an anomalib 1.x checkpoint; patchcore-trt reads anomalib 2.0 to 2.7 checkpoints "
            "(load it in anomalib 1.x, retrain or re-fit with anomalib 2.x, and save again)"
        )
    if MEMORY_BANK_KEY not in state or not any(key.startswith(BACKBONE_PREFIX) for key in state):
        hint = (
            raw.get("hyper_parameters", {}).get("backbone") if isinstance(raw.get("hyper_parameters"), dict) else None
        )
        kind = "an anomalib model" if any(key.startswith("model.") for key in state) else "a Lightning model"
        raise UserError(f"{path}: not a PatchCore checkpoint (it is {kind} without a memory bank; backbone={hint})")
    bank = state[MEMORY_BANK_KEY]
    if bank.ndim != 2 or bank.shape[0] == 0:
        raise UserError(f"{path}: the PatchCore memory bank is empty: the model was never fitted (run Engine.fit)")
    if not torch.isfinite(bank).all():
        raise UserError(f"{path}: the PatchCore memory bank holds NaN or infinite values")
    return state


def read_checkpoint(
    path: Path | str,
    *,
    trust_pickled_code: bool = False,
    image_size: tuple[int, int] | None = None,
) -> PatchCoreSpec:
    """Read an anomalib 2.x PatchCore ``.ckpt`` into a PatchCoreSpec.

    Args:
        path: The Lightning checkpoint anomalib's Engine saved.
        trust_pickled_code: Allow arbitrary pickled objects (only for files you trust).
        image_size: Override the model resolution (for checkpoints that do not record their transform).

    Raises:
        UserError: with a one-line reason for anything that is not a usable PatchCore checkpoint.
    """
    path = Path(path)
    raw = _load_raw(path, trust_pickled_code)
    state = _check_patchcore(path, raw)
    hyper = raw.get("hyper_parameters") or {}
    backbone = hyper.get("backbone")
    if not isinstance(backbone, str):
        raise UserError(f"{path}: the checkpoint does not name its backbone (hyper_parameters.backbone)")
    layers = tuple(str(layer) for layer in hyper.get("layers", ("layer2", "layer3")))
    backbone_state = {
        key[len(BACKBONE_PREFIX) :]: value.float() for key, value in state.items() if key.startswith(BACKBONE_PREFIX)
    }
    post_config = raw.get("anomalib_post_processor_config") or {}
    return PatchCoreSpec(
        backbone=backbone,
        layers=layers,
        backbone_state=backbone_state,
        memory_bank=state[MEMORY_BANK_KEY].float().contiguous(),
        num_neighbors=int(hyper.get("num_neighbors", 9)),
        blur_kernel=_separable_taps(path, state.get(BLUR_KERNEL_KEY)),
        preprocess=_preprocess(path, raw, image_size),
        postprocess=_postprocess(path, state, post_config),
        source_sha256=sha256_of(path),
        source_name=path.name,
    )


def post_processor_buffers(post: Postprocess) -> dict[str, float]:
    """The statistics as anomalib's PostProcessor keeps them: buffer name -> value."""
    return {
        "_image_threshold": post.image_threshold,
        "_pixel_threshold": post.pixel_threshold,
        "image_min": post.image_min,
        "image_max": post.image_max,
        "pixel_min": post.pixel_min,
        "pixel_max": post.pixel_max,
    }


def write_checkpoint(spec: PatchCoreSpec, path: Path | str) -> Path:
    """Save ``spec`` as an anomalib 2.7-layout Lightning checkpoint that ``read_checkpoint`` reads back."""
    taps = spec.blur_kernel.float()
    post = spec.postprocess
    state = {BACKBONE_PREFIX + key: value for key, value in spec.backbone_state.items()}
    state[MEMORY_BANK_KEY] = spec.memory_bank
    state[BLUR_KERNEL_KEY] = torch.outer(taps, taps)[None, None]
    for name, value in post_processor_buffers(post).items():
        state[POST_PREFIX + name] = torch.tensor(value, dtype=torch.float32)
    pre = spec.preprocess
    transforms = [
        {
            "class_path": "torchvision.transforms.v2.Resize",
            "init_args": {"size": list(pre.resize), "interpolation": pre.interpolation, "antialias": pre.antialias},
        },
        {
            "class_path": "torchvision.transforms.v2.Normalize",
            "init_args": {"mean": list(pre.mean), "std": list(pre.std)},
        },
    ]
    if pre.center_crop is not None:
        crop = {"class_path": "torchvision.transforms.v2.CenterCrop", "init_args": {"size": list(pre.center_crop)}}
        transforms.insert(1, crop)
    raw = {
        "state_dict": state,
        "hyper_parameters": {
            "backbone": spec.backbone,
            "layers": list(spec.layers),
            "pre_trained": False,
            "num_neighbors": spec.num_neighbors,
        },
        "anomalib_pre_processor_config": {
            "transform": {"class_path": "torchvision.transforms.v2.Compose", "init_args": {"transforms": transforms}}
        },
        "anomalib_post_processor_config": {
            "enable_normalization": True,
            "enable_thresholding": True,
            "enable_threshold_matching": True,
            "image_sensitivity": post.image_sensitivity,
            "pixel_sensitivity": post.pixel_sensitivity,
        },
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(raw, tmp)
    return path
