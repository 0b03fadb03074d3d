"""Exact mode at full speed: the FP32 backbone's convolution paths side by side on one GPU, against the exact
targets and the exact bar of the GPU table (h200_table.TARGETS, h200_table.PARITY).

Variants (gpu/fast_model.FastPatchCore, FP32 backbone, certified search, each forward one CUDA graph, uint8
images already on the GPU):

  cudnn-nhwc-plain   cuDNN IEEE FP32 in channels-last, timm's walk (bias, residual add, ReLU as separate passes):
                     the exact mode before NCHW and the fused epilogue
  cudnn-nchw-fused   cuDNN IEEE FP32 in NCHW, bias/residual/ReLU in conv_triton.epilogue: the exact mode now
  triton-tf32x3      conv_triton.conv2d, tl.dot(input_precision="tf32x3"), the epilogue in the kernel
  triton-ieee        conv_triton.conv2d, tl.dot(input_precision="ieee")

Per variant and workload: batch-1 GPU time of the graph replay (no host transfers: the latency floor), img/s
at the workload's throughput batches, and max |d score|, max |d map| and label agreement against the FP32
deploy model (TF32 off) on the same fresh images; each figure beside its target. Results go to --out after
every row (written atomically).

Usage (GPU machine, repository root):
  python3 benchmarks/exact_speed.py --out exact_speed.json [--workloads 256-16k,512-32k]
      [--variants cudnn-nhwc-plain,cudnn-nchw-fused,triton-tf32x3,triton-ieee] [--reps 50]
Without a GPU it stops with one line.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import NoReturn

import torch
from h200_table import PARITY, TARGETS, WORKLOADS, Workload, write_json_atomic  # also puts src/ on sys.path

VARIANTS = {  # name -> (FastPatchCore convolutions, run timm's plain walk in channels-last)
    "cudnn-nhwc-plain": ("cudnn", True),
    "cudnn-nchw-fused": ("cudnn", False),
    "triton-tf32x3": ("tf32x3", False),
    "triton-ieee": ("ieee", False),
}
DEFAULT_WORKLOADS = ("256-16k", "512-32k")


class OneLineParser(argparse.ArgumentParser):
    """A mistake in the arguments is one ``error:`` line and exit status 1 (the project's rule)."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message}\n")
        sys.exit(1)


def _names(known: tuple[str, ...], what: str):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(name.strip() for name in text.split(",") if name.strip())
        unknown = [name for name in names if name not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown or text!r}; choose from {','.join(known)}")
        return names

    return parse


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return int(text)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = OneLineParser(description="The exact mode's convolution paths against its targets (GPU).")
    parser.add_argument("--out", type=Path, required=True, help="the JSON file written")
    workload_names = tuple(workload.key for workload in WORKLOADS)
    parser.add_argument("--workloads", type=_names(workload_names, "workload"), default=DEFAULT_WORKLOADS)
    parser.add_argument("--variants", type=_names(tuple(VARIANTS), "variant"), default=tuple(VARIANTS))
    parser.add_argument("--reps", type=_positive, default=50, help="timed graph replays per figure")
    return parser.parse_args(argv)


def require_gpu() -> None:
    if not torch.cuda.is_available():
        sys.stderr.write("error: exact_speed.py times CUDA graphs and needs a CUDA GPU; torch sees none here\n")
        sys.exit(1)


@torch.no_grad()
def measure(workload: Workload, spec, variant: str, reps: int) -> dict:
    """One variant on one workload: accuracy against the FP32 deploy model, then batch-1 and throughput."""
    from backbone_error import graph_replay

    from patchcore_trt.bench.matrix import input_pool, reference_predictions
    from patchcore_trt.compare import compare
    from patchcore_trt.gpu.fast_model import FastPatchCore
    from patchcore_trt.gpu.fused_resnet import FusedResNetFeatures
    from patchcore_trt.gpu.profile import device_ms
    from patchcore_trt.outputs import Prediction

    convolutions, plain = VARIANTS[variant]
    model = FastPatchCore(spec, backbone_dtype="fp32", convolutions=convolutions, device="cuda").eval()
    if plain:
        model.memory_format = torch.channels_last
        model.backbone = model.backbone.features.to(memory_format=torch.channels_last)
    pool = input_pool(workload.size, max(workload.cuda_batches))
    images = torch.from_numpy(pool).cuda()
    model.check_fused_backbone(images.permute(0, 3, 1, 2).float() / 255)  # as the executor does before capture
    figures = compare(
        Prediction.from_outputs(model.forward_uint8(images)),
        reference_predictions(spec, pool),
        threshold=spec.postprocess.normalized_image_threshold,
    )
    score_bar, map_bar = PARITY["exact"]
    row = {
        "workload": workload.key,
        "variant": variant,
        "fused_walk": isinstance(model.backbone, FusedResNetFeatures),
        "max_score_error": figures.max_score_error,
        "max_map_error": figures.max_map_error,
        "labels": f"{figures.labels_equal}/{figures.labels_compared}",
        "holds_exact_bar": figures.max_score_error <= score_bar
        and figures.max_map_error <= map_bar
        and figures.labels_equal == figures.labels_compared,
    }
    row["batch1_ms"] = device_ms(graph_replay(model.forward_uint8, images[:1].clone()), reps)
    row["batch1_target_ms"] = TARGETS.get((workload.key, "latency_ms"), {}).get("exact")
    for batch in workload.cuda_batches:
        ms = device_ms(graph_replay(model.forward_uint8, images[:batch].clone()), reps)
        row[f"b{batch}_img_per_s"] = batch / ms * 1e3
    row["img_per_s_target"] = TARGETS.get((workload.key, "img_per_s"), {}).get("exact")
    return row


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    require_gpu()
    from patchcore_trt.demo.synthetic_model import synthetic_spec

    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    by_key = {workload.key: workload for workload in WORKLOADS}
    for key in args.workloads:
        spec = synthetic_spec(by_key[key].bank, by_key[key].size, device="cuda")
        for variant in args.variants:
            start = time.perf_counter()
            try:
                row = measure(by_key[key], spec, variant, args.reps)
            except Exception:  # record and go on: one variant failing must not cost the others' figures
                row = {"workload": key, "variant": variant, "error": traceback.format_exc()[-3000:]}
            row["seconds"] = time.perf_counter() - start
            results["rows"].append(row)
            print(row, flush=True)
            write_json_atomic(args.out, results)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1:])
