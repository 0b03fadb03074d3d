"""Where the reduced-precision backbone's error comes from, and what the fused convolutions save.

1. Errors: the deploy model's backbone run in one precision per stage (stem, layer1..3), everything after it
   in IEEE FP32 with the exact FP32 search, against the all-FP32 deploy model (TF32 off) on the same images:
   relative feature error and max |delta score| / |delta map| (normalised).
2. Time: CudaPatchCore's graph replay per precision, activation layout (NCHW / NHWC) and with timm's folded
   backbone or fused_resnet's, per workload.

Usage: python benchmarks/backbone_error.py OUT.json [errors,timing]
"""

from __future__ import annotations

import functools
import json
import sys

import torch
from torch import nn

from patchcore_trt.bench.matrix import device_ms, input_pool, reference_predictions
from patchcore_trt.bench.subjects import as_float_nchw
from patchcore_trt.compare import compare
from patchcore_trt.demo.synthetic_model import synthetic_spec
from patchcore_trt.gpu.executor import CudaPatchCore
from patchcore_trt.gpu.fast_model import fold_batchnorm
from patchcore_trt.gpu.knn import float32_matmul
from patchcore_trt.model import PatchCoreDeploy
from patchcore_trt.runtime.base import Prediction

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
STAGES = ("stem", "layer1", "layer2", "layer3")
VARIANTS = {
    "fp32": (F32, F32, F32, F32),
    "tf32": (F32, F32, F32, F32),
    "bf16": (BF16, BF16, BF16, BF16),
    "fp16": (F16, F16, F16, F16),
    "fp16 unfolded": (F16, F16, F16, F16),
    "fp16, stem fp32": (F32, F16, F16, F16),
    "fp16, layer1 fp32": (F16, F32, F16, F16),
    "fp16, layer2 fp32": (F16, F16, F32, F16),
    "fp16, layer3 fp32": (F16, F16, F16, F32),
}


class MixedBackbone(nn.Module):
    """A timm features network whose stages run in given dtypes; features come out in FP32."""

    def __init__(self, features: nn.Module, dtypes: tuple[torch.dtype, ...]) -> None:
        super().__init__()
        self.features = features
        stage_of = {"conv1": 0, "bn1": 0, "act1": 0, "maxpool": 0, "layer1": 1, "layer2": 2, "layer3": 3}
        for name, child in features.named_children():
            child.to(dtype=dtypes[stage_of[name]], memory_format=torch.channels_last)
            child.register_forward_pre_hook(lambda module, args, d=dtypes[stage_of[name]]: (args[0].to(d),))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [feature.float() for feature in self.features(x.contiguous(memory_format=torch.channels_last))]


def predictions(model: PatchCoreDeploy, images, tf32: bool) -> tuple[Prediction, torch.Tensor]:
    floats = torch.from_numpy(as_float_nchw(images)).cuda()
    with torch.no_grad(), float32_matmul(conv_tf32=tf32):
        embedding = model.embed(model.preprocess(floats))
        out = model(floats)
    return Prediction.from_outputs(out), embedding


def errors(spec, images, reference: Prediction) -> list[dict]:
    base = PatchCoreDeploy(spec).cuda().eval()
    _, ref_embedding = predictions(base, images, tf32=False)
    rows = []
    for name, dtypes in VARIANTS.items():
        model = PatchCoreDeploy(spec).cuda().eval()
        features = model.backbone if name == "fp16 unfolded" else fold_batchnorm(model.backbone)
        model.backbone = MixedBackbone(features, dtypes)
        prediction, embedding = predictions(model, images, tf32=name == "tf32")
        per_patch = (embedding - ref_embedding).norm(dim=1) / ref_embedding.norm(dim=1)
        figures = compare(prediction, reference, threshold=spec.postprocess.normalized_image_threshold)
        rows.append(
            {
                "variant": name,
                "feature_rel_error_median": float(per_patch.median()),
                "feature_rel_error_max": float(per_patch.max()),
                "max_score_error": figures.max_score_error,
                "max_map_error": figures.max_map_error,
                "labels": f"{figures.labels_equal}/{figures.labels_compared}",
            }
        )
        print(rows[-1], flush=True)
    return rows


LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
TIMED = [
    ("fp16", "nhwc", True),
    ("fp16", "nhwc", False),
    ("tf32", "nhwc", True),
    ("tf32", "nchw", True),
    ("fp32", "nchw", True),
    ("fp32", "nchw", False),
    ("fp32", "nhwc", True),
    ("fp32", "nhwc", False),
]


def fusion_times(spec, size: tuple[int, int], batches: tuple[int, ...]) -> list[dict]:
    """Graph replay per (precision, activation layout, fused convolutions), the rest of the model unchanged."""
    rows = []
    for precision, layout, fused in TIMED:
        runner = CudaPatchCore(spec, backbone_dtype=precision)
        model = runner.model
        backbone = model.backbone if fused else getattr(model.backbone, "features", model.backbone)
        model.memory_format = LAYOUTS[layout]
        model.backbone = backbone.to(memory_format=LAYOUTS[layout])
        for batch in batches:
            images = torch.from_numpy(input_pool(size, batch)).cuda()
            ms = device_ms(functools.partial(runner.run, images))
            rows.append(
                {"size": size[0], "batch": batch, "precision": precision, "layout": layout, "fused": fused, "ms": ms}
            )
            print(rows[-1], flush=True)
        del runner, model, backbone
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    out = sys.argv[1]
    parts = sys.argv[2].split(",") if len(sys.argv) > 2 else ["errors", "timing"]
    results = {}
    spec = synthetic_spec(16384, (256, 256), device="cuda")
    if "errors" in parts:
        images = input_pool((256, 256), 32)
        results["errors_256"] = errors(spec, images, reference_predictions(spec, images))
    if "timing" in parts:
        results["fusion_256"] = fusion_times(spec, (256, 256), (1, 16))
        spec = synthetic_spec(32768, (512, 512), device="cuda")
        results["fusion_512"] = fusion_times(spec, (512, 512), (1, 16))
    with open(out, "w") as handle:
        json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
