"""The CUDA fast path behind the backend contract: gpu/executor.CudaPatchCore on one NVIDIA GPU.

Two modes (registry.CUDA_MODES): ``exact`` (the default) computes anomalib's FP32 results within the parity bar
(IEEE FP32 backbone); ``fast`` runs the backbone in FP16 (|d score| about 1e-3). ``backbone_dtype`` and ``search``
override a mode's choices. It takes uint8 [N, H, W, 3] (4x fewer bytes to upload than float32, converted on the
GPU) and CUDA tensors natively.

Host arrays go up through the executor's ring of pinned slots (copied in once); a producer that fills
``slot(n, h, w)`` (a uint8 array in pinned memory) and predicts on it saves that copy. Results come back as views
of a pinned block each Prediction owns (gpu/staging.py says why), labels and masks computed on the GPU: one
download per output and no host copy of any.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from patchcore_trt.checkpoint import read_checkpoint
from patchcore_trt.gpu.executor import DEFAULT_MAX_BATCH, CudaPatchCore, require_cuda
from patchcore_trt.outputs import Prediction
from patchcore_trt.runtime.base import Backend
from patchcore_trt.runtime.registry import CUDA_MODES
from patchcore_trt.spec import PatchCoreSpec


class CudaBackend(Backend):
    """``predict`` on an NVIDIA GPU (see gpu/fast_model.py for what each setting computes)."""

    name: ClassVar[str] = "cuda"

    def __init__(
        self,
        artifact: Path,
        *,
        device: str = "cuda",
        mode: str = "exact",
        backbone_dtype: str | None = None,
        search: str | None = None,
        trust_pickled_code: bool = False,
        map_at_input_size: bool = False,
        graphs: bool = True,
        anomalib_version: str | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        super().__init__(artifact, device)
        require_cuda()
        spec = read_checkpoint(artifact, trust_pickled_code=trust_pickled_code, anomalib_version=anomalib_version)
        self._load(spec, mode, backbone_dtype, search, graphs, map_at_input_size, max_batch)

    @classmethod
    def from_spec(
        cls,
        spec: PatchCoreSpec,
        *,
        device: str = "cuda",
        mode: str = "exact",
        backbone_dtype: str | None = None,
        search: str | None = None,
        graphs: bool = True,
        map_at_input_size: bool = False,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> CudaBackend:
        """The backend for a model already in memory (a synthetic one for benchmarks), with no checkpoint file."""
        backend = cls.__new__(cls)
        Backend.__init__(backend, Path(spec.source_name or "model"), device)
        require_cuda()
        backend._load(spec, mode, backbone_dtype, search, graphs, map_at_input_size, max_batch)
        return backend

    def _load(
        self,
        spec: PatchCoreSpec,
        mode: str,
        backbone_dtype: str | None,
        search: str | None,
        graphs: bool,
        map_at_input_size: bool,
        max_batch: int,
    ) -> None:
        self.spec = spec
        self.postprocess = spec.postprocess
        self.executor = CudaPatchCore(
            spec,
            backbone_dtype=backbone_dtype or CUDA_MODES[mode]["backbone_dtype"],
            search=search or CUDA_MODES[mode]["search"],
            device=self.device,
            graphs=graphs,
            map_at_input_size=map_at_input_size,
            max_batch=max_batch,
        )

    def slot(self, count: int, height: int, width: int) -> np.ndarray:
        """A slot of the executor's ring, in pinned memory: ``predict`` on it uploads it without a host copy."""
        return self.executor.ring.lend((count, height, width, 3))

    def _infer(self, images: np.ndarray) -> Prediction:
        return self.executor.run_host(images)

    def _infer_uint8(self, images: np.ndarray) -> Prediction:
        return self.executor.run_host(images)

    def _infer_device(self, images: Any) -> Prediction:
        return self.executor.submit_device(images.to(self.executor.device)).result()

    @property
    def captures(self) -> int:
        """CUDA graphs captured so far: one per batch size, whatever the input sizes (a benchmark reads it)."""
        return self.executor.captures

    def profile(self, images: Any, runs: int = 5) -> dict[str, Any]:
        """Where the GPU time goes for uint8 [N, H, W, 3] ``images`` (numpy or on the GPU): kernel time per stage
        and the heaviest kernels of eager runs, beside the graph replay (gpu/profile.py)."""
        import torch

        from patchcore_trt.gpu.profile import stage_profile

        resident = images if hasattr(images, "is_cuda") else torch.from_numpy(images)
        return stage_profile(self.executor, resident.to(self.executor.device), runs)

    def close(self) -> None:
        self.executor.close()
