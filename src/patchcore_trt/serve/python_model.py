"""The Triton Python backend model: a checkpoint on patchcore-trt's backends, behind Triton's dynamic batcher.

Triton imports this through the model.py that ``patchcore-trt triton`` writes. Each instance loads the checkpoint
once: a GPU instance runs the cuda backend on its own GPU (the memory bank stays resident there), a CPU instance
the torch backend (the FP32 reference). Requests carry uint8 [n, H, W, 3] images; the requests of one call are
grouped by image size, run as one batch per size and answered one by one, a bad request with its own error.

Tensors cross the stub by DLPack only. The Python backend stub of Triton 2.51 is built with pybind11 2.10, which
predates numpy 2: with numpy 2 installed, ``as_numpy()`` returns wrong pixels and ``Tensor(name, ndarray)`` sends
empty outputs, with no error. DLPack does not go through pybind11's numpy layer, and torch tensors are what the
stub converts without complaint (numpy's own DLPack capsules log a ValueError on every call).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend stub

from patchcore_trt.artifact import INPUT_NAME, MIN_SIDE, OUTPUT_NAMES
from patchcore_trt.errors import UserError
from patchcore_trt.outputs import NonFiniteOutputError, Prediction
from patchcore_trt.runtime import open_backend


class RequestError(Exception):
    """What is wrong with one request; it becomes that request's error response."""


class TritonPythonModel:
    """Triton's Python model interface: initialize once per instance, execute per batch of requests."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.name = args["model_name"]
        self.max_pixels = int(params["max_pixels"])
        self.max_request_pixels = int(params.get("max_request_pixels") or self.max_pixels)  # older repositories
        self.buckets = [int(size) for size in params["batch_buckets"].split(",")]
        artifact = Path(args["model_repository"]) / args["model_version"] / params["artifact"]
        trust = params.get("trust_pickled_code") == "true"
        version = {"anomalib_version": params["anomalib_version"]} if params.get("anomalib_version") else {}
        if args["model_instance_kind"] == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
            options = {key: params[key] for key in ("mode", "backbone_dtype", "search") if params.get(key)}
            self.backend = open_backend(artifact, "cuda", device=device, trust_pickled_code=trust, **version, **options)
            where = f"{device} ({torch.cuda.get_device_name(int(args['model_instance_device_id']))})"
            precision = ", ".join(f"{key} {value}" for key, value in options.items())
            # Each batch size is a captured CUDA graph: pad to the next bucket so few sizes are ever captured.
            self.pad_to_buckets = True
        else:
            self.backend = open_backend(artifact, "torch", device="cpu", trust_pickled_code=trust, **version)
            where, precision = "cpu", "fp32"
            self.pad_to_buckets = False
        pb_utils.Logger.log_info(
            f"patchcore-trt: {args['model_instance_name']} loaded {artifact.name} with the {self.backend.name} "
            f"backend on {where} ({precision}; batch buckets {self.buckets})"
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        groups: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = defaultdict(list)
        for index, request in enumerate(requests):
            try:
                images = self._images(request)
            except RequestError as exc:
                responses[index] = _error(str(exc), invalid_request=True)
                continue
            groups[images.shape[1:3]].append((index, images))
        for items in groups.values():
            sizes = [len(images) for _, images in items]
            try:
                prediction, bad = self._run(np.concatenate([images for _, images in items]))
            except UserError as exc:
                for index, _ in items:
                    responses[index] = _error(str(exc))
                continue
            start = 0
            for (index, _), size in zip(items, sizes, strict=True):
                part = range(start, start + size)
                failed = [position - start for position in part if position in bad]
                if failed:
                    responses[index] = _error(f"{self.name}: image(s) {failed} of the request scored NaN or infinity")
                else:
                    responses[index] = self._response(requests[index], prediction[start : start + size])
                start += size
        return responses

    def _images(self, request: Any) -> np.ndarray:
        tensor = pb_utils.get_input_tensor_by_name(request, INPUT_NAME)
        if tensor is None:
            raise RequestError(f"{self.name}: the request has no {INPUT_NAME!r} input (uint8 [N, H, W, 3])")
        images = torch.from_dlpack(tensor.to_dlpack())
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[3] != 3:
            raise RequestError(
                f"{self.name}: {INPUT_NAME!r} must be uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}"
            )
        count, height, width, _ = images.shape
        if count == 0:
            raise RequestError(f"{self.name}: the request holds no image (batch of 0)")
        if min(height, width) < MIN_SIDE:
            raise RequestError(
                f"{self.name}: images of {height}x{width} are too small; both sides must be >= {MIN_SIDE}"
            )
        if height * width > self.max_pixels:
            raise RequestError(
                f"{self.name}: images of {height}x{width} = {height * width:,} pixels are over this model's limit "
                f"of {self.max_pixels:,} (max_pixels); send smaller images"
            )
        if count * height * width > self.max_request_pixels:
            raise RequestError(
                f"{self.name}: a request of {count} images of {height}x{width} = {count * height * width:,} pixels is "
                f"over this model's limit of {self.max_request_pixels:,} per request (max_request_pixels); send "
                "fewer images per request"
            )
        return images.numpy()

    def _run(self, batch: np.ndarray) -> tuple[Prediction, set[int]]:
        """One batch of equal-sized uint8 images -> the prediction and the positions that scored NaN/infinity."""
        count = len(batch)
        size = next((bucket for bucket in self.buckets if bucket >= count), count) if self.pad_to_buckets else count
        padded = np.concatenate([batch, np.repeat(batch[-1:], size - count, axis=0)]) if size > count else batch
        try:
            return self.backend.predict(padded)[:count], set()
        except NonFiniteOutputError as exc:
            return exc.prediction[:count], {index for index in exc.bad if index < count}

    def _response(self, request: Any, prediction: Prediction) -> Any:
        wanted = set(request.requested_output_names()) or set(OUTPUT_NAMES)
        arrays = (prediction.pred_score, prediction.pred_label, prediction.anomaly_map, prediction.pred_mask)
        values = dict(zip(OUTPUT_NAMES, arrays, strict=True))
        tensors = [
            pb_utils.Tensor.from_dlpack(name, torch.from_numpy(np.ascontiguousarray(values[name])))
            for name in OUTPUT_NAMES
            if name in wanted
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def finalize(self) -> None:
        self.backend.close()


def _error(message: str, *, invalid_request: bool = False) -> Any:
    """An error response: INVALID_ARG (HTTP 400) for the client's mistake, INTERNAL (500) for the model's."""
    code = pb_utils.TritonError.INVALID_ARG if invalid_request else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))
