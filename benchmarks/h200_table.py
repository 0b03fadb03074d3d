"""The GPU table in one run (latency, throughput, parity and memory against the targets): the cuda backend
(exact and fast modes) beside anomalib eager, anomalib under torch.compile(mode="reduce-overhead") and ONNX
Runtime's CUDA execution provider.

Workloads (wide_resnet50_2 layers 2+3, the synthetic model of demo/synthetic_model.py, num_neighbors 9):

  256-16k   256x256, M=16,384     batch-1 host latency, throughput
  512-32k   512x512, M=32,768     batch-1 host latency, throughput
  512-262k  512x512, M=262,144    throughput
  256-1M    256x256, M=1,048,576  batch-1 host latency, GPU memory

Subjects: ``cuda-exact`` / ``cuda-fast`` are ``runtime.cuda_backend.CudaBackend(mode=...)`` on a checkpoint of
the synthetic model (``predict`` on uint8 images from host memory, score and map back in host memory; the
``device`` rows give it uint8 tensors already on the GPU); the peers are bench/subjects.py's
``anomalib``, ``anomalib-compile`` and ``onnxruntime-cuda`` (FP32 with TF32 off; ``anomalib tf32`` is PyTorch's
default math, TF32 convolutions).

Every row is checked against anomalib's own FP32 forward (``AnomalibModule.forward``, TF32 off) on the same
fresh images (max |d score|, max |d map|, label flips) and timed by bench.matrix.measure: warm-up, then up to
``--iters`` batches rotating over distinct input batches, the GPU synchronised after each (host clock: what a
caller waits for), median / p90 / p99; peak GPU memory (``torch.cuda.max_memory_allocated``) while timing and,
for the first row of a backend, while building it. Each cuda row that misses its target is profiled: GPU
kernel time per stage (torch.profiler over eager runs) beside the graph replay time (CUDA events).

Results are written after every row to OUT/h200_table.json and to the state folder (``--state``), which also
keeps the models: a later call on the same machine resumes where an earlier one stopped (rows already measured
are not run again). ``--budget-s`` stops starting rows that would not finish in time; they stay for a resume.

Usage (repository root, GPU machine; anomalib and onnxruntime-gpu importable, see docs/benchmarks.md):
  python3 benchmarks/h200_table.py --out $OUT [--phases cuda,anomalib,onnxruntime,compile]
      [--workloads 256-16k,512-32k,512-262k,256-1M] [--budget-s 540] [--state /tmp/h200-state]
then anywhere: python3 benchmarks/make_h200_table.py RESULTS.json OUT.md
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from patchcore_trt.bench.matrix import MIB, batches_of, input_pool, measure  # noqa: E402
from patchcore_trt.bench.report import environment  # noqa: E402
from patchcore_trt.bench.settings import BenchSettings  # noqa: E402
from patchcore_trt.bench.subjects import Case, Subject, cuda_backend_subject, make_subject, peer_unavailable  # noqa: E402
from patchcore_trt.runtime.base import Prediction  # noqa: E402
from patchcore_trt.spec import PatchCoreSpec  # noqa: E402

STARTED = time.monotonic()
PHASES = ("cuda", "anomalib", "onnxruntime", "compile")
MODES = ("exact", "fast")


@dataclass(frozen=True)
class Workload:
    key: str
    side: int
    bank: int
    latency: bool  # a batch-1 host latency target
    cuda_batches: tuple[int, ...]  # throughput batches of the cuda rows
    peer_batch: int | None  # the peers' throughput batch
    images: int  # fresh test images (at least two batches of the largest batch)

    @property
    def size(self) -> tuple[int, int]:
        return (self.side, self.side)


WORKLOADS = (
    Workload("256-16k", 256, 16384, True, (16, 64), 16, 128),
    Workload("512-32k", 512, 32768, True, (16, 32), 16, 64),
    Workload("512-262k", 512, 262144, False, (8, 16), 4, 32),
    Workload("256-1M", 256, 1048576, True, (), None, 16),
)
# (workload, metric) -> target per mode; latency_ms: at most, img_per_s: at least.
TARGETS = {
    ("256-16k", "latency_ms"): {"exact": 0.8, "fast": 0.5},
    ("256-16k", "img_per_s"): {"exact": 3000, "fast": 7000},
    ("512-32k", "latency_ms"): {"exact": 2.0, "fast": 1.2},
    ("512-32k", "img_per_s"): {"exact": 700, "fast": 1300},
    ("256-1M", "latency_ms"): {"exact": 3.0, "fast": 2.0},
    ("512-262k", "img_per_s"): {"exact": 200, "fast": 350},
}
PARITY = {"exact": (1e-5, 1e-4), "fast": (1e-3, None)}  # max |d score|, max |d map| (None: not bound)
# Seconds a row needs at least before it is started (the first row of a backend or export adds its build).
MIN_ROW_S = {"cuda": 15, "anomalib": 15, "onnxruntime": 20, "compile": 60}
BUILD_S = {"cuda": {"256-1M": 150, "512-262k": 30}, "onnxruntime": {"256-1M": 240, "512-262k": 90}}


def log(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:7.1f} s] {message}", flush=True)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


class Results:
    """Every row, profile and notice so far; written to OUT and the state folder after each change."""

    def __init__(self, paths: list[Path], previous: dict[str, Any] | None) -> None:
        self.paths = paths
        self.data: dict[str, Any] = previous or {"rows": [], "profiles": [], "notices": [], "calls": []}

    def done(self, row_id: str) -> bool:
        return any(row["id"] == row_id for row in self.data["rows"])

    def add_row(self, row: dict[str, Any]) -> None:
        self.data["rows"].append(row)
        self.save()

    def notice(self, text: str) -> None:
        log(text)
        self.data["notices"].append(text)
        self.save()

    def save(self) -> None:
        for path in self.paths:
            write_json_atomic(path, self.data)


def git_commit() -> str | None:
    if os.environ.get("H200_COMMIT"):
        return os.environ["H200_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_state() -> str | None:
    query = "name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used"
    try:
        return subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, Any]:
    env = environment()
    env["git_commit"] = git_commit()
    env["nvidia_smi"] = gpu_state()
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__  # the import wins: onnxruntime-gpu has its own dist name
        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        env["onnxruntime"] = None
    try:
        import anomalib

        env["anomalib"] = anomalib.__version__
    except ImportError:
        env["anomalib"] = None
    return env


class Models:
    """Each workload's synthetic model, its checkpoint, the fresh test images and anomalib's FP32 outputs on them
    (kept in the state folder, so a resumed call on the same machine reuses them)."""

    def __init__(self, state: Path, backbone: str = "wide_resnet50_2") -> None:
        self.state = state
        self.backbone = backbone
        self.cache: dict[str, tuple[PatchCoreSpec, Path, np.ndarray, Prediction, str]] = {}

    def get(self, workload: Workload) -> tuple[PatchCoreSpec, Path, np.ndarray, Prediction, str]:
        if workload.key in self.cache:
            return self.cache[workload.key]
        from patchcore_trt.checkpoint import read_checkpoint, write_checkpoint
        from patchcore_trt.demo.synthetic_model import synthetic_spec

        self.cache.clear()  # one workload's model in memory at a time
        gc.collect()
        ckpt = self.state / f"{workload.key}.ckpt"
        ref_file = self.state / f"{workload.key}.reference.npz"
        if ckpt.exists():
            log(f"{workload.key}: reading the model from {ckpt}")
            spec = read_checkpoint(ckpt)
        else:
            log(f"{workload.key}: making the synthetic model (M={workload.bank:,}, {workload.side}x{workload.side})")
            device = "cuda" if torch.cuda.is_available() else "cpu"
            spec = synthetic_spec(workload.bank, workload.size, backbone=self.backbone, device=device)
            write_checkpoint(spec, ckpt.with_suffix(".tmp"))
            os.replace(ckpt.with_suffix(".tmp"), ckpt)
        images = input_pool(workload.size, workload.images)
        if ref_file.exists():
            saved = np.load(ref_file)
            reference = Prediction(*(saved[name] for name in Prediction.__dataclass_fields__))
            kind = str(saved["kind"])
        else:
            reference, kind = anomalib_reference(spec, images)
            np.savez(ref_file.with_suffix(".tmp.npz"), kind=kind, **reference.__dict__)
            os.replace(ref_file.with_suffix(".tmp.npz"), ref_file)
        log(f"{workload.key}: reference = {kind}")
        self.cache[workload.key] = (spec, ckpt, images, reference, kind)
        return self.cache[workload.key]


@torch.no_grad()
def anomalib_reference(spec: PatchCoreSpec, images: np.ndarray) -> tuple[Prediction, str]:
    """anomalib's FP32 forward (IEEE: TF32 off) on ``images``; the deploy model where anomalib is missing."""
    from patchcore_trt.bench.subjects import as_float_nchw, math_mode

    device = "cuda" if torch.cuda.is_available() else "cpu"
    patches = (spec.preprocess.resize[0] // 8) * (spec.preprocess.resize[1] // 8)
    chunk = max(1, min(8, int(8e9 // (patches * spec.bank_size * 4))))  # distance matrices of at most ~8 GB
    floats = as_float_nchw(images)
    if peer_unavailable("anomalib") is None:
        from patchcore_trt.reference import AnomalibReference

        model: Any = AnomalibReference.from_spec(spec)
        model.module.to(device)
        forward, kind = model.forward, "anomalib 2.7 AnomalibModule.forward, FP32 (TF32 off)"
    else:
        from patchcore_trt.model import PatchCoreDeploy

        model = PatchCoreDeploy(spec).eval().to(device)
        forward, kind = model, "patchcore-trt deploy model FP32 (TF32 off): anomalib is not installed"
    with math_mode("fp32"):
        parts = [
            Prediction.from_outputs(forward(torch.from_numpy(floats[i : i + chunk]).to(device)))
            for i in range(0, len(floats), chunk)
        ]
    del model, forward
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return Prediction.concat(parts), kind


class CudaBackends:
    """One CudaBackend per (workload, mode), reused by that pair's rows; built on first use."""

    def __init__(self) -> None:
        self.key: tuple[str, str] | None = None
        self.backend: Any = None
        self.built: dict[str, Any] = {}

    def get(self, workload: Workload, mode: str, ckpt: Path) -> tuple[Any, dict[str, Any]]:
        if self.key != (workload.key, mode):
            self.close()
            from patchcore_trt.runtime.cuda_backend import CudaBackend

            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            self.backend = CudaBackend(ckpt, mode=mode)
            torch.cuda.synchronize()
            self.built = {
                "build_s": round(time.perf_counter() - start, 2),
                "build_peak_gpu_mib": torch.cuda.max_memory_allocated() / MIB,
                "held_gpu_mib": torch.cuda.memory_allocated() / MIB,
            }
            self.key = (workload.key, mode)
            log(f"  CudaBackend(mode={mode!r}) built: {self.built}")
        return self.backend, self.built

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
        self.backend, self.key = None, None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def met(row: dict[str, Any], metric: str, target: float) -> bool:
    value = row["median_ms"] if metric == "latency_ms" else row["img_per_s"]
    return value <= target if metric == "latency_ms" else value >= target


class Table:
    def __init__(self, args: argparse.Namespace, results: Results, models: Models) -> None:
        self.args = args
        self.results = results
        self.models = models
        self.backends = CudaBackends()
        self.settings = BenchSettings(warmup=args.warmup, iters=args.iters, max_seconds=args.max_seconds)
        self.artifacts: dict[str, Path] = {}

    def time_left(self) -> float:
        return self.args.budget_s - (time.monotonic() - STARTED)

    def affordable(self, phase: str, workload: Workload, row_id: str, first: bool) -> bool:
        need = MIN_ROW_S[phase] + (BUILD_S.get(phase, {}).get(workload.key, 20) if first else 0)
        if self.time_left() < need:
            self.results.notice(
                f"{row_id}: not run in this call (budget: {self.time_left():.0f} s left, needs ~{need} s)"
            )
            return False
        return True

    def row(
        self,
        row_id: str,
        workload: Workload,
        subject: str,
        precision: str,
        copies: str,
        batch: int,
        factory: Callable[[list[np.ndarray]], Subject],
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        spec, _, images, reference, kind = self.models.get(workload)
        chunks = batches_of(images, batch)
        used = len(chunks) * batch
        log(f"{row_id}: measuring")
        held_before = torch.cuda.memory_allocated() / MIB if torch.cuda.is_available() else float("nan")
        try:
            figures = measure(
                lambda: factory(chunks),
                images[:used],
                batch,
                reference[:used],
                spec.postprocess.normalized_image_threshold,
                self.settings,
            )
        except Exception as exc:  # one row's failure (a compile error, an ORT error, memory) must not stop the table
            self.results.notice(f"{row_id}: failed ({type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]})")
            traceback.print_exc()
            gc.collect()
            torch.cuda.empty_cache()
            return None
        row = {
            "id": row_id,
            "workload": workload.key,
            "height": workload.side,
            "width": workload.side,
            "bank": workload.bank,
            "subject": subject,
            "precision": precision,
            "copies": copies,
            "batch": batch,
            "reference": kind,
            "label_flips": figures["labels_compared"] - figures["labels_equal"],
            "bank_fp32_mib": spec.memory_bank.numel() * 4 / MIB,
            "gpu_held_before_row_mib": held_before,
            **figures,
            **(extra or {}),
        }
        self.results.add_row(row)
        log(
            f"{row_id}: median {row['median_ms']:.3f} ms, p99 {row['p99_ms']:.3f} ms, {row['img_per_s']:,.0f} img/s, "
            f"d score {row['max_score_error']:.1e}, d map {row['max_map_error']:.1e}, flips {row['label_flips']}, "
            f"peak {row['peak_gpu_mib']:,.0f} MiB"
        )
        return row

    # --- phases -------------------------------------------------------------------------------------------------

    def cuda(self, workload: Workload) -> None:
        try:
            self._cuda(workload)
        finally:  # also when the budget ends the phase early: no backend may stay on the GPU for later rows
            self.backends.close()

    def _cuda(self, workload: Workload) -> None:
        _, ckpt, images, _, _ = self.models.get(workload)
        for mode in MODES:
            plan = [(1, "host"), (1, "device")] if workload.latency else []
            plan += [(b, c) for b in workload.cuda_batches for c in ("host", "device")]
            for batch, copies in plan:
                row_id = f"{workload.key}|cuda-{mode}|{copies}|b{batch}"
                if self.results.done(row_id):
                    continue
                first = self.backends.key != (workload.key, mode)
                if not self.affordable("cuda", workload, row_id, first):
                    return
                try:
                    backend, built = self.backends.get(workload, mode, ckpt)
                except Exception as exc:
                    self.results.notice(f"{row_id}: CudaBackend(mode={mode!r}) failed to build ({exc})")
                    break
                self.row(
                    row_id,
                    workload,
                    f"cuda-{mode}",
                    mode,
                    copies,
                    batch,
                    lambda chunks, b=backend, c=copies: cuda_backend_subject(b, chunks, c),
                    dict(built),
                )
            self.profile_misses(workload, mode, images)

    def profile_misses(self, workload: Workload, mode: str, images: np.ndarray) -> None:
        rows = [
            r for r in self.results.data["rows"] if r["workload"] == workload.key and r["subject"] == f"cuda-{mode}"
        ]
        for (key, metric), targets in TARGETS.items():
            if key != workload.key:
                continue
            chosen = best_row(rows, metric)
            if chosen is None or met(chosen, metric, targets[mode]):
                continue
            profile_id = f"{workload.key}|cuda-{mode}|b{chosen['batch']}"
            if any(p["id"] == profile_id for p in self.results.data["profiles"]) or self.backends.key != (
                workload.key,
                mode,
            ):
                continue
            log(f"{profile_id}: missed {metric} {targets[mode]}: profiling")
            try:
                found = self.backends.backend.profile(images[: chosen["batch"]])
            except Exception as exc:  # a profile is a diagnosis: its failure must not stop the table
                found = {"error": f"{type(exc).__name__}: {exc}"}
            self.results.data["profiles"].append(
                {
                    "id": profile_id,
                    "workload": workload.key,
                    "mode": mode,
                    "batch": chosen["batch"],
                    "metric": metric,
                    "target": targets[mode],
                    "host_median_ms": chosen["median_ms"],
                    **found,
                }
            )
            self.results.save()
            log(f"{profile_id}: {found.get('stages_ms', found)}")

    def peer_batches(self, workload: Workload) -> list[int]:
        return ([1] if workload.latency else []) + ([workload.peer_batch] if workload.peer_batch else [])

    def anomalib(self, workload: Workload) -> None:
        plan = [("fp32", b) for b in self.peer_batches(workload)] + [("tf32", 1)] * workload.latency
        self.peer_rows(workload, "anomalib", "anomalib", plan)

    def compile(self, workload: Workload) -> None:
        left_out = workload.key == "256-1M" and not self.args.compile_1m
        plan = [("fp32", b) for b in self.peer_batches(workload)]
        self.peer_rows(
            workload, "anomalib-compile", "compile", plan,
            skip="compile at M=1M left out: --no-compile-1m" if left_out else None,
        )  # fmt: skip

    def onnxruntime(self, workload: Workload) -> None:
        plan = [("fp32", b) for b in self.peer_batches(workload)]
        self.peer_rows(workload, "onnxruntime-cuda", "onnxruntime", plan, exports=True)

    def peer_rows(
        self,
        workload: Workload,
        peer: str,
        phase: str,
        plan: list[tuple[str, int]],
        *,
        skip: str | None = None,
        exports: bool = False,
    ) -> None:
        """``peer``'s rows for ``plan`` [(precision, batch)]: each one done already is kept, each one that cannot run
        (the peer unavailable, or ``skip``) says why, and the phase stops when the budget cannot afford the next.
        ``exports``: the peer runs the ONNX export, whose first build the budget must include."""
        reason = peer_unavailable(peer) or skip
        for precision, batch in plan:
            row_id = f"{workload.key}|{peer}|{precision}|host|b{batch}"
            if self.results.done(row_id):
                continue
            if reason is not None:
                self.results.notice(f"{row_id}: skipped ({reason})")
                continue
            if not self.affordable(phase, workload, row_id, exports and workload.key not in self.artifacts):
                return
            self.peer_row(row_id, workload, peer, precision, batch)

    def onnx_export(self, workload: Workload) -> Path:
        if workload.key not in self.artifacts:
            from patchcore_trt.export import export_onnx

            spec = self.models.get(workload)[0]
            start = time.perf_counter()
            path = export_onnx(spec, self.models.state / f"{workload.key}.onnx", check=False)[0]
            log(f"  exported {path} in {time.perf_counter() - start:.1f} s")
            self.artifacts = {workload.key: path}
        return self.artifacts[workload.key]

    def peer_row(self, row_id: str, workload: Workload, backend: str, precision: str, batch: int) -> None:
        spec = self.models.get(workload)[0]
        case = Case(backend, precision, "-", "host", batch)

        def factory(chunks: list[np.ndarray]) -> Subject:
            return make_subject(case, spec, chunks, True, lambda name: self.onnx_export(workload))

        self.row(row_id, workload, backend, precision, "host", batch, factory)


def best_row(rows: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The row a target is judged on: batch-1 host latency, or the best host throughput."""
    if metric == "latency_ms":
        return next((r for r in rows if r["batch"] == 1 and r["copies"] == "host"), None)
    candidates = [r for r in rows if r["copies"] == "host" and r["batch"] > 1]
    return max(candidates, key=lambda r: r["img_per_s"], default=None)


def install_onnxruntime(archive: Path, site: Path) -> None:
    """Unpack the onnxruntime-gpu archive (tar, zstd-compressed, sent in parts) into ``site``, first on the path."""
    if not (site / "onnxruntime").is_dir():
        import tarfile

        import zstandard

        log(f"unpacking {archive} ({archive.stat().st_size / 1e6:.0f} MB) into {site}")
        site.mkdir(parents=True, exist_ok=True)
        with (
            archive.open("rb") as raw,
            zstandard.ZstdDecompressor().stream_reader(raw) as stream,
            tarfile.open(fileobj=stream, mode="r|") as tar,
        ):
            tar.extractall(site, filter="data")
    sys.path.insert(0, str(site))
    import onnxruntime

    if hasattr(onnxruntime, "preload_dlls"):
        onnxruntime.preload_dlls()
    log(f"onnxruntime {onnxruntime.__version__} from {onnxruntime.__file__}: {onnxruntime.get_available_providers()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--state", type=Path, default=Path("/tmp/h200-state"))
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--workloads", default=",".join(w.key for w in WORKLOADS))
    parser.add_argument("--budget-s", type=float, default=540.0)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--max-seconds", type=float, default=3.0)
    parser.add_argument("--ort-archive", type=Path, default=None, help="onnxruntime-gpu .tar.zst to unpack first")
    parser.add_argument("--ort-site", type=Path, default=Path("/tmp/ort-site"))
    parser.add_argument("--compile-1m", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--toy", action="store_true", help="one 64x64 resnet18 workload: checks the script on a CPU")
    args = parser.parse_args()
    workloads = (Workload("toy", 64, 64, True, (2,), 2, 4),) if args.toy else WORKLOADS
    torch.backends.cudnn.benchmark = False  # the peers run with PyTorch's defaults; the cuda backend sets its own
    args.out.mkdir(parents=True, exist_ok=True)
    args.state.mkdir(parents=True, exist_ok=True)
    if args.ort_archive is not None:
        try:
            install_onnxruntime(args.ort_archive, args.ort_site)
        except Exception as exc:  # the other rows still run; the ORT rows then say why they were skipped
            log(f"onnxruntime-gpu could not be installed: {exc}")
    elif (args.ort_site / "onnxruntime").is_dir():
        install_onnxruntime(args.ort_site, args.ort_site)
    state_file = args.state / "h200_table.json"
    previous = json.loads(state_file.read_text()) if state_file.exists() else None
    results = Results([args.out / "h200_table.json", state_file], previous)
    results.data["calls"].append(
        {
            "environment": versions(),
            "phases": args.phases,
            "workloads": args.workloads,
            "budget_s": args.budget_s,
            "iters": args.iters,
            "warmup": args.warmup,
            "max_seconds": args.max_seconds,
        }
    )
    results.data["targets"] = {f"{w}|{m}": t for (w, m), t in TARGETS.items()}
    results.save()
    log(f"environment: {results.data['calls'][-1]['environment']}")
    table = Table(args, results, Models(args.state, "resnet18" if args.toy else "wide_resnet50_2"))
    chosen = [w for w in workloads if args.toy or w.key in args.workloads.split(",")]
    for phase in args.phases.split(","):
        if phase not in PHASES:
            raise SystemExit(f"unknown phase {phase}; choose from {PHASES}")
        if phase == "cuda" and not torch.cuda.is_available():
            results.notice("cuda rows: skipped (torch sees no CUDA GPU here)")
            continue
        for workload in chosen:
            with contextlib.suppress(KeyboardInterrupt):
                getattr(table, phase)(workload)
    results.data["calls"][-1]["finished_s"] = round(time.monotonic() - STARTED, 1)
    results.data["calls"][-1]["nvidia_smi_end"] = gpu_state()
    results.save()
    summary = [
        f"{r['id']:48s} {r['median_ms']:9.3f} ms {r['img_per_s']:9,.0f} img/s  d score {r['max_score_error']:.1e}"
        f"  flips {r['label_flips']}  peak {r['peak_gpu_mib']:,.0f} MiB"
        for r in results.data["rows"]
    ]
    print("\n".join(summary), flush=True)
    log("done")


if __name__ == "__main__":
    main()
