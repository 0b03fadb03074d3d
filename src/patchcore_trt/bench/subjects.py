"""The systems under test of the benchmark: the CUDA backend, anomalib's own module, and registry backends.

Each is a Subject: ``run(i)`` processes batch ``i`` of a rotation of input batches the way a caller would
(host arrays in and out, or tensors that stay on the GPU), ``outputs(i)`` returns its results for the
parity check. Whatever a registry backend needs to run (a .ckpt of a synthetic model, an ONNX export) is
made on first use by ``artifact_maker``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchcore_trt.errors import UserError
from patchcore_trt.model import DeployOutput
from patchcore_trt.runtime.base import Prediction
from patchcore_trt.spec import PatchCoreSpec


@dataclass(frozen=True)
class Case:
    """One row of the matrix; ``search`` is '-' and ``copies`` 'host' for backends without those options."""

    backend: str
    precision: str
    search: str
    copies: str
    batch: int


@dataclass
class Subject:
    """A system under test: ``run(i)`` processes rotation batch ``i``; ``outputs(i)`` returns its results."""

    run: Callable[[int], object]
    outputs: Callable[[int], Prediction]
    uses_cuda: bool
    close: Callable[[], None] = field(default=lambda: None)


def host_prediction(out: DeployOutput) -> Prediction:
    """Device outputs -> a numpy Prediction (scores and maps float32, labels and masks bool)."""
    score, label, anomaly_map, mask = (tensor.detach().cpu() for tensor in out)
    return Prediction(
        score.float().numpy(), label.numpy().astype(bool), anomaly_map.float().numpy(), mask.numpy().astype(bool)
    )


def as_float_nchw(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW in [0, 1], the input convention of every backend's ``predict``."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255)


def _cuda_subject(spec: PatchCoreSpec, case: Case, batches: list[np.ndarray], graphs: bool) -> Subject:
    from patchcore_trt.runtime.cuda_backend import CudaPatchCore

    runner = CudaPatchCore(spec, precision=case.precision, search=case.search, graphs=graphs)
    if case.copies == "host":
        return Subject(
            run=lambda i: runner.run_host(batches[i]),
            outputs=lambda i: runner.run_host(batches[i]).prediction(spec.postprocess),
            uses_cuda=True,
            close=runner.close,
        )
    resident = [torch.from_numpy(batch).to(runner.device) for batch in batches]
    return Subject(
        run=lambda i: runner.run(resident[i]),
        outputs=lambda i: host_prediction(runner.run(resident[i])),
        uses_cuda=True,
        close=runner.close,
    )


def _anomalib_subject(spec: PatchCoreSpec, case: Case, batches: list[np.ndarray]) -> Subject:
    from patchcore_trt.bench.anomalib_baseline import anomalib_module, anomalib_outputs

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if case.precision == "fp16" else torch.float32
    module = anomalib_module(spec).to(device=device, dtype=dtype)

    def upload(batch: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).to(dtype) / 255

    if case.copies == "host":

        def run(i: int) -> tuple[np.ndarray, np.ndarray]:
            out = anomalib_outputs(module, upload(batches[i]))
            return out.pred_score.cpu().numpy(), out.anomaly_map.cpu().numpy()

        return Subject(
            run, lambda i: host_prediction(anomalib_outputs(module, upload(batches[i]))), device.type == "cuda"
        )
    resident = [upload(batch) for batch in batches]
    return Subject(
        run=lambda i: anomalib_outputs(module, resident[i]),
        outputs=lambda i: host_prediction(anomalib_outputs(module, resident[i])),
        uses_cuda=device.type == "cuda",
    )


def _generic_subject(backend: Any, batches: list[np.ndarray]) -> Subject:
    floats = [as_float_nchw(batch) for batch in batches]
    return Subject(
        run=lambda i: backend.predict(floats[i]),
        outputs=lambda i: backend.predict(floats[i]),
        uses_cuda="cuda" in backend.capabilities.devices and torch.cuda.is_available(),
        close=backend.close,
    )


def make_subject(
    case: Case, spec: PatchCoreSpec, batches: list[np.ndarray], graphs: bool, artifact: Callable[[str], Path]
) -> Subject:
    """The system under test for ``case``: the CUDA backend, anomalib's module, or a registry backend."""
    if case.backend == "cuda":
        return _cuda_subject(spec, case, batches, graphs)
    if case.backend == "anomalib":
        return _anomalib_subject(spec, case, batches)
    from patchcore_trt.runtime import backend_class, open_backend

    devices = backend_class(case.backend).capabilities.devices
    device = "cuda" if "cuda" in devices and torch.cuda.is_available() else devices[0]
    return _generic_subject(open_backend(artifact(case.backend), case.backend, device=device), batches)


def artifact_maker(spec: PatchCoreSpec, checkpoint: Path | None, out_dir: Path) -> Callable[[str], Path]:
    """backend name -> the file it runs, made on first use (a synthetic .ckpt, an ONNX export)."""
    from patchcore_trt.runtime import backend_class

    made: dict[str, Path] = {}
    stem = out_dir / f"{spec.source_name or 'model'}"

    def artifact(backend: str) -> Path:
        suffixes = backend_class(backend).capabilities.artifact_suffixes
        suffix = next(s for s in (".ckpt", ".onnx", ".engine") if s in suffixes)
        if suffix in made:
            return made[suffix]
        if suffix == ".ckpt":
            from patchcore_trt.bench.synthetic_model import write_checkpoint

            made[suffix] = checkpoint or write_checkpoint(spec, stem.with_suffix(".ckpt"))
        elif suffix == ".onnx":
            from patchcore_trt.export import export_onnx

            made[suffix] = export_onnx(spec, stem.with_suffix(".onnx"), verify=False)[0]
        else:
            beside = checkpoint.with_suffix(suffix) if checkpoint else None
            if beside is None or not beside.is_file():
                raise UserError(f"{backend} runs {suffix} files: build one beside the checkpoint first")
            made[suffix] = beside
        return made[suffix]

    return artifact
