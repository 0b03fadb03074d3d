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


def as_float_nchw(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW in [0, 1], the input convention of every backend's ``predict``."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255)


def _cuda_subject(spec: PatchCoreSpec, case: Case, batches: list[np.ndarray], graphs: bool) -> Subject:
    from patchcore_trt.gpu.executor import CudaPatchCore

    executor = CudaPatchCore(spec, backbone_dtype=case.precision, search=case.search, graphs=graphs)
    if case.copies == "host":
        return Subject(
            run=lambda i: executor.run_host(batches[i]),
            outputs=lambda i: executor.run_host(batches[i]).prediction(spec.postprocess),
            uses_cuda=True,
            close=executor.close,
        )
    resident = [torch.from_numpy(batch).to(executor.device) for batch in batches]
    return Subject(
        run=lambda i: executor.run(resident[i]),
        outputs=lambda i: Prediction.from_outputs(executor.run(resident[i])),
        uses_cuda=True,
        close=executor.close,
    )


def _anomalib_subject(spec: PatchCoreSpec, case: Case, batches: list[np.ndarray]) -> Subject:
    from patchcore_trt.reference import AnomalibReference

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if case.precision == "fp16" else torch.float32
    reference = AnomalibReference.from_spec(spec)
    reference.module.to(device=device, dtype=dtype)

    def upload(batch: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).to(dtype) / 255

    if case.copies == "host":

        def run(i: int) -> tuple[np.ndarray, np.ndarray]:
            out = reference.forward(upload(batches[i]))
            return out.pred_score.cpu().numpy(), out.anomaly_map.cpu().numpy()

        return Subject(
            run, lambda i: Prediction.from_outputs(reference.forward(upload(batches[i]))), device.type == "cuda"
        )
    resident = [upload(batch) for batch in batches]
    return Subject(
        run=lambda i: reference.forward(resident[i]),
        outputs=lambda i: Prediction.from_outputs(reference.forward(resident[i])),
        uses_cuda=device.type == "cuda",
    )


def _generic_subject(backend: Any, batches: list[np.ndarray], uses_cuda: bool) -> Subject:
    floats = [as_float_nchw(batch) for batch in batches]
    return Subject(
        run=lambda i: backend.predict(floats[i]),
        outputs=lambda i: backend.predict(floats[i]),
        uses_cuda=uses_cuda,
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
    from patchcore_trt.runtime import backend_info, open_backend

    devices = backend_info(case.backend).devices
    device = "cuda" if "cuda" in devices and torch.cuda.is_available() else devices[0]
    backend = open_backend(artifact(case.backend), case.backend, device=device)
    return _generic_subject(backend, batches, uses_cuda=device == "cuda")


def artifact_maker(spec: PatchCoreSpec, checkpoint: Path | None, work_dir: Path) -> Callable[[str], Path]:
    """backend name -> the file it runs, made in ``work_dir`` on first use: a .ckpt of a synthetic model, an ONNX
    export, or an FP32 engine built from that export."""
    from patchcore_trt.runtime import backend_info

    made: dict[str, Path] = {}
    stem = work_dir / f"{spec.source_name or 'model'}"

    def artifact(backend: str) -> Path:
        (suffix,) = backend_info(backend).suffixes
        if suffix in made:
            return made[suffix]
        if suffix == ".ckpt":
            from patchcore_trt.checkpoint import write_checkpoint

            made[suffix] = checkpoint or write_checkpoint(spec, stem.with_suffix(".ckpt"))
        elif suffix == ".onnx":
            from patchcore_trt.export import export_onnx

            made[suffix] = export_onnx(spec, stem.with_suffix(".onnx"), check=False)[0]
        else:
            from patchcore_trt.build import build

            made[suffix] = build(artifact("onnxruntime")).engine
        return made[suffix]

    return artifact
