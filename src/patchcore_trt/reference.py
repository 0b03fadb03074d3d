"""anomalib's own PatchCore module, run as anomalib runs it: the reference every backend is compared against.

Two ways to get one: from a checkpoint (``from_checkpoint``: anomalib's own loader) or from a PatchCoreSpec
(``from_spec``: anomalib's module created with ``pre_trained=False`` and given the spec's transform, backbone
weights, memory bank, blur kernel, statistics and post-processor switches, so a synthetic model needs no checkpoint
file; the baseline row of every benchmark). ``for_checkpoint`` picks the one that reproduces the release that
wrote a checkpoint, and says which in one line.

Why anomalib 2.7's loader is not the reference for older files: it cannot load pickled-component files without
running their code, it rebuilds 2.7's default pre-processor (Resize 256, no crop) for 2.0.x files that relied on
2.0's default (Resize 256 + CenterCrop 224), and it cannot load 1.x files at all. The PatchCore model itself
computes the same in 1.2 to 2.7 (torch_model.py differs only in return type, query chunking and the order of the
distance terms), so anomalib 2.7's module built from the checkpoint as read computes what the release computed;
for 1.x its raw outputs get anomalib 1.2's inference post-processing (``anomalib_1x_post``), which 2.7 no longer has.

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
from patchcore_trt.layouts import layout_of
from patchcore_trt.model import DeployOutput
from patchcore_trt.spec import PatchCoreSpec, Postprocess


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


def anomalib_1x_post(raw_score: torch.Tensor, raw_map: torch.Tensor, post: Postprocess) -> DeployOutput:
    """anomalib 1.2's inference post-processing, batched: labels raw >= threshold
    (deploy/inferencers/torch_inferencer.py:286-292), then min-max normalisation around the threshold
    (utils/normalization/min_max.py:14-30)."""

    def normalize(values: torch.Tensor, threshold: float, low: float, high: float) -> torch.Tensor:
        normalized = ((values - threshold) / (high - low)) + 0.5
        return torch.maximum(torch.minimum(normalized, torch.tensor(1)), torch.tensor(0))

    return DeployOutput(
        pred_score=normalize(raw_score, post.image_threshold, post.image_min, post.image_max),
        pred_label=raw_score >= post.image_threshold,
        anomaly_map=normalize(raw_map, post.pixel_threshold, post.pixel_min, post.pixel_max),
        pred_mask=raw_map >= post.pixel_threshold,
    )


class AnomalibReference:
    """An eval-mode anomalib PatchCore module (on the CPU; move ``module`` to run it elsewhere).

    Args:
        module: anomalib's Patchcore.
        post_1x: The statistics to post-process with anomalib 1.2's rule instead of the module's PostProcessor.
        description: What this reference is, in one line.
    """

    def __init__(self, module: torch.nn.Module, post_1x: Postprocess | None = None, description: str = "") -> None:
        self.module = module.eval()
        self.post_1x = post_1x
        self.description = description or f"anomalib {_anomalib_version()}'s PatchCore"

    @classmethod
    def from_checkpoint(cls, checkpoint: Path, *, trust_pickled_code: bool = False) -> AnomalibReference:
        """anomalib's own loader (Lightning's); it unpickles whole objects only when ``trust_pickled_code``."""
        patchcore = _patchcore_class()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = patchcore.load_from_checkpoint(
                str(checkpoint), map_location="cpu", pre_trained=False, weights_only=not trust_pickled_code
            )
        return cls(module, description=f"anomalib {_anomalib_version()}'s own loader on the checkpoint")

    @classmethod
    def for_checkpoint(
        cls, checkpoint: Path, spec: PatchCoreSpec, *, trust_pickled_code: bool = False
    ) -> AnomalibReference:
        """The reference that reproduces the release that wrote ``checkpoint`` (read as ``spec``).

        A file in anomalib 2.7's own layout, readable without running pickled code, is loaded by anomalib's own
        loader; every other file (older layouts, or pickled objects the user had to trust) is anomalib's module
        built from the checkpoint as read. No Lightning error reaches the user: a loader failure is one line.
        """
        if layout_of(spec.written_by).own_loader and not trust_pickled_code:
            try:
                return cls.from_checkpoint(checkpoint)
            except MissingDependencyError:
                raise
            except Exception as exc:  # Lightning and anomalib raise many types while loading
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise UserError(
                    f"{checkpoint}: anomalib {_anomalib_version()}'s own loader cannot load it "
                    f"({type(exc).__name__}: {first[:200]}); patchcore-trt read it as {spec.written_by}"
                ) from None
        reference = cls.from_spec(spec)
        post = spec.postprocess
        rule = "anomalib 1.2's inference post-processing" if post.threshold_inclusive else "its PostProcessor"
        reference.description = (
            f"anomalib {_anomalib_version()}'s PatchCore built from the checkpoint as read (written by "
            f"{spec.written_by}: {spec.written_by_evidence}), with {rule}"
        )
        return reference

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
                    enable_normalization=post.normalize,
                    image_sensitivity=post.image_sensitivity,
                    pixel_sensitivity=post.pixel_sensitivity,
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
        return cls(module, post_1x=post if post.threshold_inclusive else None)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> DeployOutput:
        """``AnomalibModule.forward``: pre-processor (export transform) -> model -> post-processor."""
        if self.post_1x is not None:
            return self._post_1x(self.module.model(self.module.pre_processor(images)), len(images))
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
        raw = module.model(module.pre_processor.transform(images))
        if self.post_1x is not None:
            return self._post_1x(raw, len(images))
        return _as_deploy_output(module.post_processor(raw), len(images))

    def _post_1x(self, raw: object, batch: int) -> DeployOutput:
        raw_map = raw.anomaly_map.reshape(batch, 1, *raw.anomaly_map.shape[-2:])
        return anomalib_1x_post(raw.pred_score.reshape(-1), raw_map, self.post_1x)


def _anomalib_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("anomalib")
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _as_deploy_output(out: object, batch: int) -> DeployOutput:
    anomaly_map = out.anomaly_map.reshape(batch, 1, *out.anomaly_map.shape[-2:])
    mask = out.pred_mask.reshape(anomaly_map.shape)
    return DeployOutput(out.pred_score.reshape(-1), out.pred_label.reshape(-1), anomaly_map, mask)
