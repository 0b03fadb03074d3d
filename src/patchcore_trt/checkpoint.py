"""anomalib's PatchCore checkpoints of every release read into a PatchCoreSpec without running pickled code; and
written, in the 2.7 layout, for tests and synthetic models.

Reading goes: the archive is checked from its zip directory (archive.check_archive), its globals from the pickle's
opcodes (pickled.allowed_globals), every declared tensor against the bytes its record holds (storages.check_storages);
then it is unpickled with inert stand-ins (pickled.safe_load), its layout interpreted (layouts.read_layout), and
every value the spec needs is checked once, completely: a malformed file is one UserError listing each problem,
never a traceback later.
``trust_pickled_code=True`` is the opt-in for files that pickle objects patchcore-trt does not know; it runs them.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from patchcore_trt import checks
from patchcore_trt.archive import check_checkpoint_file
from patchcore_trt.checks import BLUR_KERNEL_KEY
from patchcore_trt.errors import UserError
from patchcore_trt.files import atomic_path, sha256_of
from patchcore_trt.layouts import (
    LAYOUT_27,
    LAYOUTS,
    POST_BUFFERS,
    POST_PREFIX,
    read_layout,
    settle_transform,
    shown,
)
from patchcore_trt.pickled import (
    UnknownGlobalsError,
    allowed_globals,
    enum_value,
    safe_load,
    trusted_load,
)
from patchcore_trt.spec import PatchCoreSpec, Postprocess
from patchcore_trt.storages import StorageError, check_storages

BACKBONE_PREFIX = "model.feature_extractor.feature_extractor."
MEMORY_BANK_KEY = "model.memory_bank"
TRUST_OPTION = "--trust-pickled-code"
_MALFORMED_FIX = "the file was changed after anomalib saved it or comes from another tool; use the file anomalib saved"


def _load_raw(path: Path, trust_pickled_code: bool) -> Any:
    check_checkpoint_file(path)
    try:
        trusted_names = ""
        try:
            allowed = allowed_globals(path)
        except UnknownGlobalsError as exc:
            trusted_names = ", ".join(exc.names[:5]) + (", ..." if len(exc.names) > 5 else "")
            if not trust_pickled_code:
                raise UserError(
                    f"{path}: the checkpoint pickles objects patchcore-trt does not know ({trusted_names}) that could "
                    f"run code when loaded; if you trust where it came from, pass {TRUST_OPTION}"
                ) from None
        try:
            check_storages(path)
        except StorageError as exc:
            raise UserError(
                f"{path}: refused before reading its tensors: {exc}; torch.save does not write that, so the file was "
                "damaged or crafted: use the .ckpt file anomalib saved"
            ) from None
        return _trusted(path, trusted_names) if trusted_names else safe_load(path, allowed)
    except pickle.UnpicklingError as exc:
        detail = str(exc).split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        raise UserError(
            f"{path}: the checkpoint's pickle has a structure patchcore-trt does not read "
            f"({detail[0] if detail else 'unreadable'}); use the .ckpt file anomalib saved"
        ) from None
    except UserError:
        raise
    except Exception as exc:  # torch's loader raises many types on a damaged file; each means the same to the user
        first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: the checkpoint is truncated or corrupt ({first_line}); copy it again") from None


def _trusted(path: Path, names: str) -> Any:
    try:
        return trusted_load(path)
    except Exception as exc:  # the user's pickled code may raise anything; it is reported, not re-raised
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(
            f"{path}: unpickling its objects ({names}) failed even with {TRUST_OPTION} ({type(exc).__name__}: "
            f"{first_line}); install the packages that define them, or use the .ckpt file anomalib saved"
        ) from None


def _state(path: Path, raw: Any) -> dict[str, Any]:
    state = raw.get("state_dict") if isinstance(raw, dict) else None
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a Lightning checkpoint (it has no state_dict)")
    bank = state.get(MEMORY_BANK_KEY)
    if not isinstance(bank, torch.Tensor) or not any(key.startswith(BACKBONE_PREFIX) for key in state):
        hyper = raw.get("hyper_parameters")
        hint = hyper.get("backbone") if isinstance(hyper, dict) else None
        kind = "an anomalib model" if any(str(key).startswith("model.") for key in state) else "a Lightning model"
        raise UserError(f"{path}: not a PatchCore checkpoint (it is {kind} without a memory bank; backbone={hint})")
    if bank.numel() == 0:  # anomalib registers torch.empty(0) and fills it at the end of Engine.fit
        raise UserError(f"{path}: the PatchCore memory bank is empty: the model was never fitted (run Engine.fit)")
    if bank.ndim != 2:
        raise UserError(
            f"{path}: the PatchCore memory bank has shape {list(bank.shape)}, expected [rows, features]; "
            + _MALFORMED_FIX
        )
    if not bank.is_floating_point() or not torch.isfinite(bank).all():
        raise UserError(f"{path}: the PatchCore memory bank holds NaN, infinite or non-float values; " + _MALFORMED_FIX)
    return state


def _precision(path: Path, hyper: dict[str, Any]) -> None:
    value = hyper.get("precision")
    name = str(enum_value(value)).lower().rsplit(".", 1)[-1]
    if value is not None and name not in ("float32", "fp32", "32"):
        raise UserError(
            f"{path}: the model was trained with precision={name} (anomalib runs it in half precision); "
            "patchcore-trt reproduces float32 PatchCore only: retrain with precision float32"
        )


def _raise_problems(path: Path, problems: list[str]) -> None:
    if problems:
        count = f"{len(problems)} problems" if len(problems) > 1 else "a problem"
        raise UserError(f"{path}: the checkpoint has {count}: {'; '.join(problems)}; {_MALFORMED_FIX}")


def read_checkpoint(
    path: Path | str,
    *,
    trust_pickled_code: bool = False,
    image_size: tuple[int, int] | None = None,
    anomalib_version: str | None = None,
) -> PatchCoreSpec:
    """Read a PatchCore ``.ckpt`` of anomalib 1.0-1.2 or 2.0-2.7 into a PatchCoreSpec, without running pickled code.

    Args:
        path: The Lightning checkpoint anomalib's Engine saved.
        trust_pickled_code: Unpickle objects patchcore-trt does not know (this runs their code).
        image_size: Override the model resolution.
        anomalib_version: The release that trained the file; needed only for 2.0-2.2 files saved with the default
            pre-processor when the file cannot tell; checked against the file otherwise.

    Raises:
        UserError: with a one-line reason for anything that is not a usable PatchCore checkpoint.
    """
    path = Path(path)
    raw = _load_raw(path, trust_pickled_code)
    try:
        return _interpret(path, raw, image_size, anomalib_version)
    except RecursionError:  # only a crafted file nests transforms or values this deep
        raise UserError(f"{path}: the checkpoint nests its objects too deeply to be one anomalib saved") from None


def _interpret(path: Path, raw: Any, image_size: tuple[int, int] | None, anomalib_version: str | None) -> PatchCoreSpec:
    state = _state(path, raw)
    problems: list[str] = []
    hyper = raw.get("hyper_parameters", {})
    backbone, layers, num_neighbors = None, None, None
    if isinstance(hyper, dict):
        _precision(path, hyper)
        backbone, layers, num_neighbors = checks.model_fields(hyper, problems)
    else:
        problems.append(f"hyper_parameters is {shown(hyper)}, expected a dict of the model's settings")
        hyper = {}
    reading = read_layout(path, raw, state, hyper, problems)
    bank = state[MEMORY_BANK_KEY]
    network = checks.meta_backbone(backbone, layers, problems) if backbone and layers else None
    weights = {key[len(BACKBONE_PREFIX) :]: value for key, value in state.items() if key.startswith(BACKBONE_PREFIX)}
    if network is not None:
        checks.check_weights(network, str(backbone), weights, bank, problems)
    postprocess = checks.postprocess(path, state, reading, problems)
    taps = checks.separable_taps(state.get(BLUR_KERNEL_KEY), problems)
    if reading.leaves is None:  # the release's default transform is settled from values that must be sound
        _raise_problems(path, problems)
    patches_at = checks.patches_at(network) if network is not None else None
    ratio = hyper.get("coreset_sampling_ratio", 0.1)
    leaves, written = settle_transform(
        path, reading, image_size, int(bank.shape[0]), ratio, patches_at, anomalib_version
    )
    preprocess = checks.preprocess(path, leaves, image_size, problems)
    _raise_problems(path, problems)
    if not (backbone and layers and num_neighbors and preprocess) or taps is None:  # each None came with a problem
        raise RuntimeError("a checkpoint value was refused without a problem line")
    return PatchCoreSpec(
        backbone=backbone,
        layers=layers,
        # Copies: the loaded tensors map the file, which may be replaced while the spec is in use.
        backbone_state={key: value.float().clone() for key, value in weights.items()},
        memory_bank=bank.float().clone().contiguous(),
        num_neighbors=num_neighbors,
        blur_kernel=taps,
        preprocess=preprocess,
        postprocess=postprocess,
        source_sha256=sha256_of(path),
        source_name=path.name,
        written_by=f"anomalib {written.release}",
        written_by_evidence=written.evidence,
    )


def post_processor_buffers(post: Postprocess) -> dict[str, float]:
    """The statistics as anomalib's PostProcessor keeps them: buffer name -> value."""
    return {buffer: getattr(post, field) for field, buffer in POST_BUFFERS.items()}


def write_checkpoint(spec: PatchCoreSpec, path: Path | str) -> Path:
    """Save ``spec`` as an anomalib 2.7-layout Lightning checkpoint that ``read_checkpoint`` reads back.

    Raises:
        ValueError: ``spec`` follows post-processing rules the 2.7 layout cannot record (1.x labels, a NaN zero
            range).
    """
    post = spec.postprocess
    rules = LAYOUTS[LAYOUT_27]
    if post.threshold_inclusive != rules.threshold_inclusive or post.zero_range != rules.zero_range:
        raise ValueError("the anomalib 2.7 layout records 2.7's post-processing rules only")
    taps = spec.blur_kernel.float()
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
            "enable_normalization": post.normalize,
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
