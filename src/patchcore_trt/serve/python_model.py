"""The Triton Python backend model: a checkpoint, or a line of many products, behind Triton's dynamic batcher.

Triton imports this through the model.py that ``patchcore-trt triton`` writes. Each instance loads its model once:
- one checkpoint: a GPU instance runs the cuda backend on its own GPU (the memory bank stays resident there), a
  CPU instance the torch backend (the FP32 reference);
- a line (``line: true``): line.model.Line on the instance's device; each request names its product in the
  request parameter ``product``, and each response carries the product's name and checkpoint SHA-256 as the
  outputs ``product`` and ``product_sha256`` (UTF-8 and raw bytes: Triton 2.51's Python backend has no response
  parameters, and BYTES tensors would need numpy<2 in the stub).
Requests carry uint8 [n, H, W, 3] images; the requests of one call are grouped by image size, run in batches of at
most ``max_request_pixels`` and answered one by one, a bad request (or a bad product) with its own error.

Tensors cross the stub by DLPack only. The Python backend stub of Triton 2.51 is built with pybind11 2.10, which
predates numpy 2: with numpy 2 installed, ``as_numpy()`` returns wrong pixels and ``Tensor(name, ndarray)`` sends
empty outputs, with no error. DLPack does not go through pybind11's numpy layer, and torch tensors are what the
stub converts without complaint (numpy's own DLPack capsules log a ValueError on every call).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend stub

from patchcore_trt.artifact import INPUT_NAME, LINE_OUTPUT_NAMES, MIN_SIDE, OUTPUT_NAMES
from patchcore_trt.errors import UserError
from patchcore_trt.line.model import Line
from patchcore_trt.outputs import NonFiniteOutputError, Prediction
from patchcore_trt.runtime import Backend, open_backend
from patchcore_trt.serve.batching import runs_within


class RequestError(Exception):
    """What is wrong with one request; it becomes that request's error response."""


class OneModel:
    """One checkpoint's backend with a line's ``run`` signature: one batch for every request of one image size."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def run(self, items: Sequence[tuple[str | None, np.ndarray]]) -> list[Prediction | UserError]:
        # Concatenated straight into the backend's staging memory (the cuda backend's pinned slots: no second copy).
        height, width = items[0][1].shape[1:3]
        batch = self.backend.slot(sum(len(images) for _, images in items), height, width)
        np.concatenate([images for _, images in items], out=batch)
        try:
            prediction, bad = self.backend.predict(batch), []
        except NonFiniteOutputError as exc:
            prediction, bad = exc.prediction, exc.bad
        except UserError as exc:
            return [exc] * len(items)
        results: list[Prediction | UserError] = []
        start = 0
        for _, images in items:
            part = prediction[start : start + len(images)]
            failed = [index - start for index in bad if start <= index < start + len(images)]
            results.append(NonFiniteOutputError(self.backend.name, part, failed) if failed else part)
            start += len(images)
        return results

    def close(self) -> None:
        self.backend.close()


class TritonPythonModel:
    """Triton's Python model interface: initialize once per instance, execute per batch of requests."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.name = args["model_name"]
        self.max_pixels = int(params["max_pixels"])
        self.max_request_pixels = int(params.get("max_request_pixels") or self.max_pixels)  # older repositories
        version = Path(args["model_repository"]) / args["model_version"]
        gpu = args["model_instance_kind"] == "GPU"
        device = f"cuda:{args['model_instance_device_id']}" if gpu else "cpu"
        where = f"{device} ({torch.cuda.get_device_name(int(args['model_instance_device_id']))})" if gpu else "cpu"
        self.line: Line | None = None
        if params.get("line") == "true":
            self.line = Line(version, device)
            self.model: OneModel | Line = self.line
            loaded = (
                f"version {args['model_version']}: {len(self.line.products)} products ({', '.join(self.line.products)})"
            )
            what = f"line model on {where} (fp32)"
        else:
            artifact = version / params["artifact"]
            trust = params.get("trust_pickled_code") == "true"
            anomalib = {"anomalib_version": params["anomalib_version"]} if params.get("anomalib_version") else {}
            if gpu:
                options = {key: params[key] for key in ("mode", "backbone_dtype", "search") if params.get(key)}
                max_batch = int(config["max_batch_size"])
                backend = open_backend(
                    artifact, "cuda", device=device, trust_pickled_code=trust, max_batch=max_batch, **anomalib,
                    **options,
                )  # fmt: skip
                # One CUDA graph per batch size the batcher can form, captured now rather than on a client's request:
                # batches run unpadded.
                backend.executor.capture(range(1, max_batch + 1))
                precision = ", ".join(f"{key} {value}" for key, value in options.items())
            else:
                backend = open_backend(artifact, "torch", device="cpu", trust_pickled_code=trust, **anomalib)
                precision = "fp32"
            self.model = OneModel(backend)
            loaded, what = artifact.name, f"{backend.name} backend on {where} ({precision})"
        pb_utils.Logger.log_info(f"patchcore-trt: {args['model_instance_name']} loaded {loaded} with the {what}")

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        by_size: dict[tuple[int, int], list[tuple[int, str | None, np.ndarray]]] = defaultdict(list)
        for index, request in enumerate(requests):
            try:
                product = self._product(request)
                images = self._images(request)
            except RequestError as exc:
                responses[index] = _error(str(exc), invalid_request=True)
                continue
            by_size[images.shape[1:3]].append((index, product, images))
        for items in by_size.values():
            # The batcher merged up to max_batch requests: no run may hold more pixels than one request may.
            for chunk in runs_within(items, self.max_request_pixels, lambda item: item[2][..., 0].size):
                results = self._run([(product, images) for _, product, images in chunk])
                for (index, product, _), result in zip(chunk, results, strict=True):
                    responses[index] = self._answer(requests[index], product, result)
        return responses

    def _run(self, pairs: list[tuple[str | None, np.ndarray]]) -> list[Prediction | Exception]:
        """The merged run; should it fail as a whole, each request alone, so that only the one at fault fails."""
        try:
            return list(self.model.run(pairs))
        except Exception as exc:  # whatever broke the merged batch is answered per request below
            if len(pairs) == 1:
                return [exc]
        results: list[Prediction | Exception] = []
        for pair in pairs:
            try:
                results.extend(self.model.run([pair]))
            except Exception as exc:  # this request's own failure, answered to it alone
                results.append(exc)
        return results

    def _product(self, request: Any) -> str | None:
        try:
            parameters = json.loads(request.parameters() or "{}")
        except ValueError:
            parameters = {}
        product = parameters.get("product")
        if self.line is None:
            if product is not None:
                raise RequestError(f"{self.name}: serves one checkpoint, not a line of products; send no 'product'")
            return None
        if not isinstance(product, str) or not product:
            raise RequestError(
                f"{self.name}: a line model needs the request parameter 'product' "
                f"(one of: {', '.join(self.line.products)})"
            )
        unknown = self.line.unknown(product)
        if unknown is not None:
            raise RequestError(f"{self.name}: {unknown}")
        return product

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

    def _answer(self, request: Any, product: str | None, result: Prediction | Exception) -> Any:
        if isinstance(result, Exception):
            who = f"{self.name} product {product}" if product else self.name
            if isinstance(result, NonFiniteOutputError):
                message = f"{who}: image(s) {result.bad} of the request scored NaN or infinity"
            elif isinstance(result, UserError):
                message = f"{who}: {result}"
            else:
                message = f"{who}: {type(result).__name__}: {result}"
            pb_utils.Logger.log_warn(f"patchcore-trt: {message}")  # the server log names the product at fault
            return _error(message)
        wanted = set(request.requested_output_names()) or {*OUTPUT_NAMES, *LINE_OUTPUT_NAMES}
        arrays = (result.pred_score, result.pred_label, result.anomaly_map, result.pred_mask)
        values = dict(zip(OUTPUT_NAMES, arrays, strict=True))
        if self.line is not None and product is not None:
            count = len(result)
            name = np.frombuffer(product.encode(), dtype=np.uint8)
            sha = np.frombuffer(bytes.fromhex(self.line.manifest.products[product].sha256), dtype=np.uint8)
            values.update(zip(LINE_OUTPUT_NAMES, (np.tile(name, (count, 1)), np.tile(sha, (count, 1))), strict=True))
        tensors = [
            pb_utils.Tensor.from_dlpack(name, torch.from_numpy(np.ascontiguousarray(value)))
            for name, value in values.items()
            if name in wanted
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def finalize(self) -> None:
        if isinstance(self.model, OneModel):
            self.model.close()


def _error(message: str, *, invalid_request: bool = False) -> Any:
    """An error response: INVALID_ARG (HTTP 400) for the client's mistake, INTERNAL (500) for the model's."""
    code = pb_utils.TritonError.INVALID_ARG if invalid_request else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))
