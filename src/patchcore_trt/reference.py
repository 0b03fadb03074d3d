"""anomalib's own PatchCore module, run as anomalib runs it: the reference every backend is compared against.

Two ways to get one: from a checkpoint (``from_checkpoint``: anomalib's own loader, for ``verify``) or from a
PatchCoreSpec (``from_spec``: anomalib's module created with ``pre_trained=False`` and given the spec's backbone
weights, memory bank, blur kernel and statistics, so a synthetic model needs no checkpoint file; the baseline
row of every benchmark).

Two anomalib paths exist and they differ on purpose:
- ``AnomalibModule.forward`` (what anomalib exports and what patchcore-trt reproduces): the pre-processor's
  *exportable* transform, which resizes without antialiasing;
- the Lightning predict path (``Engine.predict``), which resizes with antialiasing.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from patchcore_trt.checkpoint import post_processor_buffers
from patchcore_trt.errors import MissingDependencyError, UserError
from patchcore_trt.model import DeployOutput
from patchcore_trt.spec import PatchCoreSpec


def anomalib_available() -> bool:
    try:
        import anomalib  # noqa: F401
    except ImportError:
        return False
    return True


def _patchcore_class() -> type:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # anomalib and timm warn about their own deprecations on import
            from anomalib.models import Patchcore
    except ImportError as exc:
        raise MissingDependencyError("anomalib", "anomalib") from exc
    return Patchcore


class AnomalibReference:
    """An eval-mode anomalib PatchCore module (on the CPU; move ``module`` to run it elsewhere)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module.eval()

    @classmethod
    def from_checkpoint(cls, checkpoint: Path, *, trust_pickled_code: bool = False) -> AnomalibReference:
        """anomalib's own loader (Lightning's); it unpickles whole objects only when ``trust_pickled_code``."""
        patchcore = _patchcore_class()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = patchcore.load_from_checkpoint(
                str(checkpoint), map_location="cpu", pre_trained=False, weights_only=not trust_pickled_code
            )
        return cls(module)

    @classmethod
    def from_spec(cls, spec: PatchCoreSpec) -> AnomalibReference:
        """anomalib's module computing ``spec``'s model."""
        patchcore = _patchcore_class()
        from anomalib.post_processing import PostProcessor
        from anomalib.pre_processing import PreProcessor
        from torchvision.transforms import InterpolationMode, v2

        pre, post = spec.preprocess, spec.postprocess
        transforms: list[torch.nn.Module] = [
            v2.Resize(list(pre.resize), interpolation=InterpolationMode(pre.interpolation), antialias=pre.antialias)
        ]
        if pre.center_crop is not None:
            transforms.append(v2.CenterCrop(list(pre.center_crop)))
        transforms.append(v2.Normalize(mean=list(pre.mean), std=list(pre.std)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = patchcore(
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
        extractor = model.feature_extractor.feature_extractor
        missing, unexpected = extractor.load_state_dict(spec.backbone_state, strict=False)
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
        return cls(module)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> DeployOutput:
        """``AnomalibModule.forward``: pre-processor (export transform) -> model -> post-processor."""
        return _as_deploy_output(self.module(images), len(images))

    def compiled(self, mode: str = "reduce-overhead") -> Callable[[torch.Tensor], DeployOutput]:
        """``forward`` through ``torch.compile(module, mode=mode)``, one static graph per input shape (compiled on
        the first call of each shape). With ``reduce-overhead`` the outputs live in CUDA-graph memory that the next
        call overwrites: read them before calling again."""
        compiled = torch.compile(self.module, mode=mode, dynamic=False)
        new_step = getattr(torch.compiler, "cudagraph_mark_step_begin", None)

        @torch.no_grad()
        def forward(images: torch.Tensor) -> DeployOutput:
            if new_step is not None and mode == "reduce-overhead":
                new_step()  # each call is a new inference step: its graph may reuse the last call's outputs
            return _as_deploy_output(compiled(images), len(images))

        return forward

    @torch.no_grad()
    def lightning_predict(self, images: torch.Tensor) -> DeployOutput:
        """What ``Engine.predict`` computes: the training transform (antialiased resize), model, post-processor."""
        module = self.module
        transformed = module.pre_processor.transform(images)
        return _as_deploy_output(module.post_processor(module.model(transformed)), len(images))


def _as_deploy_output(out: object, batch: int) -> DeployOutput:
    anomaly_map = out.anomaly_map.reshape(batch, 1, *out.anomaly_map.shape[-2:])
    mask = out.pred_mask.reshape(anomaly_map.shape)
    return DeployOutput(out.pred_score.reshape(-1), out.pred_label.reshape(-1), anomaly_map, mask)
