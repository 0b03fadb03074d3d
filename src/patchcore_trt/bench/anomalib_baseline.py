"""anomalib's own PatchCore module, built from a PatchCoreSpec: the baseline row of every benchmark.

The module is anomalib's (pre-processor -> PatchcoreModel -> PostProcessor, eager PyTorch), created with
``pre_trained=False`` and then given the spec's backbone weights, memory bank, blur kernel and
post-processing statistics, so a synthetic model needs no checkpoint file and a real one runs exactly as
anomalib would run it.
"""

from __future__ import annotations

import os
import warnings

import torch

from patchcore_trt.errors import MissingDependencyError, UserError
from patchcore_trt.model import DeployOutput
from patchcore_trt.spec import PatchCoreSpec, Postprocess


def anomalib_available() -> bool:
    try:
        import anomalib  # noqa: F401
    except ImportError:
        return False
    return True


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


def anomalib_module(spec: PatchCoreSpec) -> torch.nn.Module:
    """An eval-mode ``anomalib.models.Patchcore`` that computes ``spec``'s model (on the CPU; move it yourself)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from anomalib.models import Patchcore
        from anomalib.post_processing import PostProcessor
        from anomalib.pre_processing import PreProcessor
        from torchvision.transforms import InterpolationMode, v2
    except ImportError as exc:
        raise MissingDependencyError("anomalib", "anomalib") from exc
    pre, post = spec.preprocess, spec.postprocess
    transforms: list[torch.nn.Module] = [
        v2.Resize(list(pre.resize), interpolation=InterpolationMode(pre.interpolation), antialias=pre.antialias)
    ]
    if pre.center_crop is not None:
        transforms.append(v2.CenterCrop(list(pre.center_crop)))
    transforms.append(v2.Normalize(mean=list(pre.mean), std=list(pre.std)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = Patchcore(
            backbone=spec.backbone,
            layers=list(spec.layers),
            pre_trained=False,
            num_neighbors=spec.num_neighbors,
            pre_processor=PreProcessor(transform=v2.Compose(transforms)),
            post_processor=PostProcessor(
                image_sensitivity=post.image_sensitivity, pixel_sensitivity=post.pixel_sensitivity
            ),
            evaluator=False,
            visualizer=False,
        )
    model = module.model
    missing, unexpected = model.feature_extractor.feature_extractor.load_state_dict(spec.backbone_state, strict=False)
    if missing or unexpected:
        raise UserError(f"anomalib's {spec.backbone} does not take these weights (missing {missing[:3]})")
    model.memory_bank = spec.memory_bank.float().clone()
    kernel = model.anomaly_map_generator.blur.kernel
    taps = spec.blur_kernel.float()
    if kernel.shape[-1] != taps.numel():
        raise UserError(f"anomalib blurs with {kernel.shape[-1]} taps, the model with {taps.numel()}")
    kernel.copy_(torch.outer(taps, taps).expand_as(kernel))
    for name, value in post_processor_buffers(post).items():
        getattr(module.post_processor, name).fill_(value)
    return module.eval()


def anomalib_outputs(module: torch.nn.Module, images: torch.Tensor) -> DeployOutput:
    """``AnomalibModule.forward`` (export pre-processing -> model -> post-processing) as a DeployOutput."""
    with torch.no_grad():
        out = module(images)
    anomaly_map = out.anomaly_map.reshape(len(images), 1, *out.anomaly_map.shape[-2:])
    pred_mask = out.pred_mask.reshape(anomaly_map.shape)
    return DeployOutput(out.pred_score.reshape(-1), out.pred_label.reshape(-1), anomaly_map, pred_mask)
