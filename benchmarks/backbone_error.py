"""Where the reduced-precision backbone's error comes from, and what the fused convolutions save.

1. Errors: the deploy model's backbone run in one precision per stage (stem, layer1..3), everything after it
   in IEEE FP32 with the exact FP32 search, against the all-FP32 deploy model (TF32 off) on the same images:
   relative feature error and max |delta score| / |delta map| (normalised).
2. Time: CudaPatchCore's graph replay per precision, activation layout (NCHW / NHWC) and with timm's folded
   backbone or fused_resnet's, per workload.
3. Exact (``exact``): the cuda backend's modes (exact = IEEE FP32 backbone, fast = FP16) against an FP64 deploy
   model computed on the GPU and against the FP32 one: model-size and raw other-size inputs at 256^2 (M=16384)
   and 512^2 (M=32768), batch-1 latency (host arrays in and out) and device throughput, a per-stage profile of
   the exact mode, and the search at M=1,048,576 (distances and bank rows against FP64, with more re-ranked
   candidates).

A split TF32 backbone (three TF32 products per convolution in one cuDNN call) was studied here as well: the
split convolution alone against FP64, a split GEMM with the tensor cores' sum cut into parts, and the split
backbone with its per-shape check skipped. It is not in the package (docs/benchmarks.md says why). The split
TF32 study ran at commit b483c3b (``git checkout b483c3b`` to re-run it: parts ``exact,split_study``); its
results are benchmarks/results/h200_exact_split_study.json and h200_exact_run1.json (where ``exact`` was the
split backbone, falling back to IEEE FP32, and ``fp32 backbone`` the exact mode of today).

4. Layers (``layers``): each convolution of the backbone by the Triton implicit GEMMs (gpu/conv_triton.py) in
   each ``tl.dot`` precision and by cuDNN's IEEE FP32, against FP64 on the activations it sees (conv_layers.py).
   Runs on the CPU in Triton's interpreter on a tiny input (there every precision is plain FP32):
   ``TRITON_INTERPRET=1 python benchmarks/backbone_error.py OUT.json layers --size 32 --batch 1 --only conv1``.

Usage: python benchmarks/backbone_error.py OUT.json [errors,timing,exact,layers] [--size --batch --only]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
import traceback
import warnings
from typing import Any

import numpy as np
import torch
from conv_layers import layer_errors
from torch import nn

from patchcore_trt.bench.matrix import input_pool, percentile, reference_predictions
from patchcore_trt.bench.subjects import as_float_nchw
from patchcore_trt.compare import compare
from patchcore_trt.demo.synthetic_model import synthetic_spec
from patchcore_trt.gpu.fast_model import FastPatchCore, fold_batchnorm
from patchcore_trt.gpu.knn import BankIndex, candidates, float32_matmul, nearest
from patchcore_trt.gpu.profile import device_ms
from patchcore_trt.model import MemoryBankSearch, PatchCoreDeploy, squared_distances
from patchcore_trt.runtime.base import Prediction
from patchcore_trt.runtime.cuda_backend import CudaBackend
from patchcore_trt.runtime.registry import CUDA_MODES

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


def graph_replay(function: Any, images: torch.Tensor) -> Any:
    """``function(images)`` captured as one CUDA graph (after warm-up on a side stream); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            function(images)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        function(images)
    return graph.replay


@torch.no_grad()
def fusion_times(spec, size: tuple[int, int], batches: tuple[int, ...]) -> list[dict]:
    """Graph replay per (precision, activation layout, fused convolutions), the rest of the model unchanged."""
    rows = []
    for precision, layout, fused in TIMED:
        model = FastPatchCore(spec, backbone_dtype=precision, device="cuda").eval()
        backbone = model.backbone if fused else getattr(model.backbone, "features", model.backbone)
        model.memory_format = LAYOUTS[layout]
        model.backbone = backbone.to(memory_format=LAYOUTS[layout])
        for batch in batches:
            images = torch.from_numpy(input_pool(size, batch)).cuda()
            ms = device_ms(graph_replay(model.forward_uint8, images))
            rows.append(
                {"size": size[0], "batch": batch, "precision": precision, "layout": layout, "fused": fused, "ms": ms}
            )
            print(rows[-1], flush=True)
        del model, backbone
        torch.cuda.empty_cache()
    return rows


@torch.no_grad()
def deploy_outputs(spec, floats: np.ndarray, dtype: torch.dtype, chunk: int = 4) -> tuple[np.ndarray, ...]:
    """(score, label, map, mask) of the deploy model run in ``dtype`` on the GPU (IEEE: TF32 off), numpy."""
    model = PatchCoreDeploy(spec).eval().cuda().to(dtype)
    parts = []
    with float32_matmul():
        for i in range(0, len(floats), chunk):
            parts.append([v.cpu().numpy() for v in model(torch.from_numpy(floats[i : i + chunk]).cuda().to(dtype))])
    del model
    return tuple(np.concatenate(values) for values in zip(*parts, strict=True))


def _against(prediction: Prediction, score64: np.ndarray, map64: np.ndarray, reference: Prediction, threshold) -> dict:
    fp32 = compare(prediction, reference, threshold=threshold)
    return {
        "max_score_error_vs_fp64": float(np.abs(prediction.pred_score.astype(np.float64) - score64).max()),
        "max_map_error_vs_fp64": float(np.abs(prediction.anomaly_map.astype(np.float64) - map64).max()),
        "labels_vs_fp64": f"{int((prediction.pred_label == (score64 > threshold)).sum())}/{len(score64)}",
        "max_score_error_vs_fp32": fp32.max_score_error,
        "max_map_error_vs_fp32": fp32.max_map_error,
        "labels_vs_fp32": f"{fp32.labels_equal}/{fp32.labels_compared}",
    }


def mode_parity(spec, inputs: dict[str, np.ndarray]) -> list[dict]:
    """Each mode on each input set (uint8 NHWC or float32 NCHW of any size), host arrays in and out."""
    rows = []
    threshold = spec.postprocess.normalized_image_threshold
    for label, images in inputs.items():
        floats = images if images.dtype == np.float32 else as_float_nchw(images)
        score64, _, map64, _ = deploy_outputs(spec, floats, torch.float64)
        reference = Prediction.from_outputs(deploy_outputs(spec, floats, torch.float32))
        for mode in CUDA_MODES:
            backend = CudaBackend.from_spec(spec, mode=mode)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                parts = [backend.predict(images[i : i + 1]) for i in range(min(8, len(images)))]
                parts.append(backend.predict(images))
            one_by_one, batched = Prediction.concat(parts[:-1]), parts[-1]
            row = {"inputs": label, "mode": mode, **_against(batched, score64, map64, reference, threshold)}
            n = len(one_by_one)
            row["batch1"] = _against(one_by_one, score64[:n], map64[:n], _first(reference, n), threshold)
            row["warnings"] = [str(w.message) for w in caught]
            rows.append(row)
            print(row, flush=True)
            backend.close()
            torch.cuda.empty_cache()
    return rows


def _first(prediction: Prediction, n: int) -> Prediction:
    return Prediction(*(getattr(prediction, f)[:n] for f in Prediction.__dataclass_fields__))


def mode_times(spec, size: tuple[int, int], throughput_batches: tuple[int, ...]) -> list[dict]:
    """Batch 1 with host arrays (wall clock) and with inputs on the GPU, and throughput with inputs on the GPU."""
    rows = []
    for mode in CUDA_MODES:
        backend = CudaBackend.from_spec(spec, mode=mode)
        one = input_pool(size, 1)
        backend.predict(one)
        walls = []
        for _ in range(100):
            start = time.perf_counter()
            backend.predict(one)
            walls.append((time.perf_counter() - start) * 1e3)
        row = {"size": size[0], "mode": mode, "batch1_host_ms": percentile(walls, 50)}
        row["batch1_device_ms"] = device_ms(functools.partial(backend.predict, torch.from_numpy(one).cuda()))
        for batch in throughput_batches:
            images = torch.from_numpy(input_pool(size, batch)).cuda()
            row[f"b{batch}_img_per_s"] = batch / device_ms(functools.partial(backend.predict, images), reps=20) * 1e3
        rows.append(row)
        print(row, flush=True)
        backend.close()
        torch.cuda.empty_cache()
    return rows


def exact_profile(spec, size: tuple[int, int], batch: int) -> list[str]:
    """The exact mode's GPU time per stage and per kernel of its eager forward (CudaBackend.profile)."""
    backend = CudaBackend.from_spec(spec, mode="exact")
    found = backend.profile(input_pool(size, batch))
    backend.close()
    lines = [f"== exact {size[0]}^2 batch {batch}: GPU kernel time {found['eager_gpu_ms']:.3f} ms per eager run"]
    lines += [f"   stage {name:15s} {ms:8.3f} ms" for name, ms in found["stages_ms"].items()]
    lines += [f"   {k['ms']:8.3f} ms  {k['stage']:10s} {k['kernel'][:110]}" for k in found["top_kernels"]]
    print("\n".join(lines), flush=True)
    return lines


@torch.no_grad()
def large_bank_search(bank_size: int, images: int = 4) -> dict:
    """The exact search at a large bank: per patch, distance and row against FP64, with C re-ranked candidates."""
    # One neighbour: no support table to build (an M x M search); the patch distances are what is measured.
    spec = dataclasses.replace(synthetic_spec(bank_size, (256, 256), device="cuda"), num_neighbors=1)
    model = FastPatchCore(spec, backbone_dtype=CUDA_MODES["exact"]["backbone_dtype"], device="cuda").eval()
    floats = torch.from_numpy(as_float_nchw(input_pool((256, 256), images))).cuda()
    with float32_matmul(conv_tf32=model.backbone_dtype == "tf32"):
        embedding = model.embed(model.preprocess(floats))
    queries = embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1]).contiguous()
    bank = spec.memory_bank.cuda().float()
    bank64 = bank.double()
    nearest64 = [torch.cdist(queries[i : i + 256].double(), bank64).min(dim=1) for i in range(0, len(queries), 256)]
    exact64 = torch.cat([best.values for best in nearest64])
    rows64 = torch.cat([best.indices for best in nearest64])
    with float32_matmul():
        fp32_distances, fp32_rows = MemoryBankSearch(bank).nearest(queries)
    index: BankIndex = model.index
    values, rows, _ = candidates(queries, index, 2)
    post = spec.postprocess
    # A distance error divided by these is the normalised score / map error it makes.
    result = {"bank_size": bank_size, "patches": len(queries), "score_range": post.image_max - post.image_min}
    result["map_range"] = post.pixel_max - post.pixel_min
    result["kernels_exact"] = _search_errors(*nearest(queries, index, "certified"), exact64, fp32_rows)
    result["fp32_reference"] = _search_errors(fp32_distances, fp32_rows, exact64, fp32_rows)
    result["fp32_reference_rows_differing_from_fp64"] = int((fp32_rows != rows64).sum())
    for count in (2, 4, 8, 16, 64):
        picked = rows.gather(1, values.topk(count, dim=1, largest=False).indices).long()
        with float32_matmul():
            squared = squared_distances(queries[:, None, :], index.bank[picked], index.bank_sq[picked][:, None, :])
        best, column = squared.squeeze(1).min(dim=1)
        result[f"candidates_{count}"] = _search_errors(
            best.sqrt(), picked.gather(1, column[:, None])[:, 0], exact64, fp32_rows
        )
        print(count, result[f"candidates_{count}"], flush=True)
    return result


def _search_errors(distances, rows, exact64, fp32_rows) -> dict:
    error = (distances.double() - exact64).abs()
    return {
        "max_abs_distance_error_vs_fp64": float(error.max()),
        "max_rel_distance_error_vs_fp64": float((error / exact64.clamp_min(1e-12)).max()),
        "rows_differing_from_fp32_reference": int((rows != fp32_rows).sum()),
    }


def _stepper(results: dict, out: str):
    def step(name, run):
        start = time.perf_counter()
        try:
            results[name] = run()
        except Exception:  # record and go on: one failure must not cost the other figures
            results[name] = {"error": traceback.format_exc()[-3000:]}
            print(results[name]["error"], flush=True)
        results.setdefault("seconds", {})[name] = time.perf_counter() - start
        with open(out, "w") as handle:
            json.dump(results, handle, indent=2)

    return step


def exact(results: dict, out: str) -> None:
    """Part 3, each step saved as it ends (a run stopped at its limit keeps what it measured)."""
    step = _stepper(results, out)
    results["device"] = torch.cuda.get_device_name()
    results["versions"] = {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version()}
    workloads = [
        ((256, 256), 16384, 32, (333, 250), (16, 64), (1, 64)),
        ((512, 512), 32768, 16, (600, 480), (16,), (1,)),
    ]
    for size, bank, count, odd_size, batches, profiled in workloads:
        spec = synthetic_spec(bank, size, device="cuda")
        inputs = {
            f"{size[0]}x{size[1]} uint8": input_pool(size, count),
            # Textures, not noise: noise saturates every normalised score and map at 1, hiding any error.
            f"{odd_size[0]}x{odd_size[1]} float": as_float_nchw(input_pool(odd_size, count // 4)),
        }
        step(f"parity_{size[0]}", functools.partial(mode_parity, spec, inputs))
        step(f"times_{size[0]}", functools.partial(mode_times, spec, size, batches))
        for batch in profiled:
            step(f"profile_{size[0]}_b{batch}", functools.partial(exact_profile, spec, size, batch))
        del spec
        torch.cuda.empty_cache()
    step("search_1M", functools.partial(large_bank_search, 1 << 20))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Backbone precision: errors, timing, the exact mode, layers.")
    parser.add_argument("out", help="the JSON file written")
    parser.add_argument("parts", nargs="?", default="errors,timing", help="comma-separated parts")
    parser.add_argument("--backbone", default="wide_resnet50_2", help="layers: the network")
    parser.add_argument("--size", type=int, default=256, help="layers: input height and width")
    parser.add_argument("--batch", type=int, default=4, help="layers: images")
    parser.add_argument("--only", default="", help="layers: comma-separated convolution names (default all)")
    args = parser.parse_args(argv)
    args.parts = args.parts.split(",")
    return args


def main() -> None:
    args = parse_args(sys.argv[1:])
    out, parts = args.out, args.parts
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"}
    if "layers" in parts:
        only = tuple(name for name in args.only.split(",") if name)
        results["layers"] = layer_errors(args.backbone, args.size, args.batch, only, device)
        with open(out, "w") as handle:
            json.dump(results, handle, indent=2)
    if "exact" in parts:
        exact(results, out)
    if not {"errors", "timing"} & set(parts):
        return
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
