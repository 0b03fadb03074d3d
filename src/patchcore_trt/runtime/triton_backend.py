"""The triton backend: a model on a Triton server, addressed by URL, behind the one backend contract.

``open_backend("host:8001", model="name")`` gives a Backend like any other: a bare HOST:PORT is gRPC (Triton's
port 8001 by default), ``http://host:8000`` is HTTP. It
works with every repository ``patchcore-trt triton`` writes: the Python model takes uint8 [N, H, W, 3] images, the
ONNX and TensorRT models float32 [N, 3, H, W]; the client reads which from the model's metadata, and the model's
metadata (thresholds, label rule, source checkpoint) from its config's ``metadata`` parameter, checked as any
artifact's metadata is. A batch goes out as up to ``concurrency`` requests in flight at once, so the server's
dynamic batcher can merge them with other clients' requests; results come back in input order. With
``shm="system"`` (a server on this machine) the tensors go through /dev/shm instead of the requests (triton_shm.py).
"""

from __future__ import annotations

import contextlib
import queue
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

import numpy as np

from patchcore_trt.artifact import INPUT_NAME, LINE_OUTPUT_NAMES, OUTPUT_NAMES, ArtifactMetadata
from patchcore_trt.errors import UserError
from patchcore_trt.images import uint8_to_float
from patchcore_trt.line.products import product_list
from patchcore_trt.outputs import Prediction
from patchcore_trt.runtime.base import Backend
from patchcore_trt.runtime.registry import BARE_SCHEME
from patchcore_trt.runtime.triton_shm import SharedRegions, layout

DEFAULT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Endpoint:
    protocol: str  # "http" or "grpc"
    address: str  # host:port
    ssl: bool = False

    @property
    def url(self) -> str:
        scheme = {"http": "https" if self.ssl else "http", "grpc": "grpc"}[self.protocol]
        return f"{scheme}://{self.address}"


def parse_url(url: str) -> Endpoint:
    """``HOST[:PORT]`` (gRPC, port 8001 by default), ``grpc://HOST[:8001]``, ``http://HOST[:8000]`` or ``https://``."""
    parsed = urlparse(url if "://" in url else BARE_SCHEME + url)
    protocol = {"http": "http", "https": "http", "grpc": "grpc"}.get(parsed.scheme)
    if protocol is None or not parsed.hostname or parsed.path not in ("", "/"):
        raise UserError(
            f"server {url!r} is not HOST:PORT (gRPC), grpc://HOST:PORT, http://HOST:PORT or https://HOST:PORT"
        )
    try:
        port = parsed.port or (8001 if protocol == "grpc" else 8000)
    except ValueError:
        raise UserError(f"server {url!r} has an invalid port") from None
    return Endpoint(protocol, f"{parsed.hostname}:{port}", parsed.scheme == "https")


def _module(protocol: str) -> Any:
    try:
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
    except ImportError:
        raise UserError("tritonclient is not installed; install it with: pip install 'patchcore-trt[serve]'") from None
    return module


class TritonBackend(Backend):
    """A model on a Triton server, behind the backend contract.

    Args:
        url: The server (see ``parse_url``).
        device: The registry's device kind for a server (``server``); the results name the URL instead.
        model: The model's name; None picks the server's only ready model.
        product: On a line model (many products in one served model), the product to score; None picks the line's
            only product.
        concurrency: Requests in flight at once (each carries a share of the batch).
        timeout_s: Per-request network timeout.
        shm: ``system``: tensors go through system shared memory (a server on this machine; see triton_shm.py).
        maps: Ask for the anomaly maps and masks; False: scores and labels only (Prediction.has_maps is False).
    """

    name: ClassVar[str] = "triton"

    def __init__(
        self,
        url: str,
        *,
        device: str = "server",
        model: str | None = None,
        product: str | None = None,
        concurrency: int = 1,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        shm: str = "none",
        maps: bool = True,
    ) -> None:
        del device  # one kind: where the server runs is the server's business
        if concurrency < 1:
            raise UserError(f"--concurrency {concurrency} must be at least 1")
        self.endpoint = parse_url(url)
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        # The outputs each request asks for: without the maps the server computes them but sends none.
        self.outputs = OUTPUT_NAMES if maps else OUTPUT_NAMES[:2]
        self.module = _module(self.endpoint.protocol)
        self.as_json = {"as_json": True} if self.endpoint.protocol == "grpc" else {}
        self.product = product
        self.sources: set[str] = set()  # the checkpoint SHA-256s a line's answers came from
        self._answered: set[str] = set()  # those of the batch being sent
        self.client = self._connect()
        self.regions: SharedRegions | None = None
        # Slots of the requests in flight: a request takes one (and its shared memory region) until its answer is
        # read, so close can wait for every answer before the regions go.
        self.free: queue.Queue[int] = queue.Queue()
        for slot in range(concurrency):
            self.free.put(slot)
        try:
            self.model = model or self._only_model()
            super().__init__(Path(self.model), self.endpoint.url)
            self._read_model()
            if shm == "system":
                self.regions = SharedRegions(self.client, f"{self.endpoint.url} model {self.model!r}")
                # A caller that never closes still leaves nothing registered or in /dev/shm.
                self._finalizer = weakref.finalize(self, self.regions.release)
        except BaseException:
            self.close()
            raise
        self.quantized = 0  # images that were not exact 8-bit values and were rounded for a uint8 model

    def _connect(self) -> Any:
        kwargs: dict[str, Any] = {"url": self.endpoint.address, "ssl": self.endpoint.ssl}
        if self.endpoint.protocol == "http":
            kwargs.update(
                concurrency=self.concurrency, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
            )
        client = self.module.InferenceServerClient(**kwargs)
        try:
            live = client.is_server_live()
        except Exception as exc:  # refused, DNS, TLS: each library raises its own
            client.close()
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = " (gRPC: Triton's HTTP port needs http://HOST:PORT)" if self.endpoint.protocol == "grpc" else ""
            raise UserError(
                f"cannot reach a Triton server at {self.endpoint.url} ({reason}); is it running?{hint}"
            ) from None
        if not live:
            client.close()
            raise UserError(f"the Triton server at {self.endpoint.url} is not live")
        return client

    def _only_model(self) -> str:
        # The statistics list the loaded models; the repository index would too, but `serve` restricts it (with
        # load and unload, its API category) to itself.
        statistics = self.client.get_inference_statistics(**self.as_json)
        ready = sorted({item["name"] for item in statistics.get("model_stats", [])})
        if len(ready) != 1:
            found = ", ".join(ready) or "none"
            raise UserError(f"{self.endpoint.url} serves {len(ready)} ready models ({found}); name one with --model")
        return ready[0]

    def _call(self, what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except self.module.InferenceServerException as exc:
            raise UserError(f"{self.endpoint.url} model {self.model!r}: {what}: {_message(exc)}") from None
        except Exception as exc:  # a dropped connection or a timeout: each transport raises its own type
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{self.endpoint.url} model {self.model!r}: {what}: {reason} (server gone?)") from None

    def _read_model(self) -> None:
        metadata = self._call("metadata", self.client.get_model_metadata, self.model, **self.as_json)
        config = self._call("config", self.client.get_model_config, self.model, **self.as_json)
        config = config.get("config", config)
        inputs = {item["name"]: item for item in metadata.get("inputs", [])}
        outputs = {item["name"] for item in metadata.get("outputs", [])}
        spec = inputs.get(INPUT_NAME)
        shape = [int(dim) for dim in spec["shape"]] if spec else []
        if spec and spec["datatype"] == "UINT8" and len(shape) == 4 and shape[3] == 3:
            self.layout = "nhwc_uint8"
        elif spec and spec["datatype"] == "FP32" and len(shape) == 4 and shape[1] == 3:
            self.layout = "nchw_float32"
        else:
            raise UserError(
                f"{self.endpoint.url} model {self.model!r} takes {list(inputs.values())}; a patchcore-trt model "
                f"takes {INPUT_NAME!r} uint8 [N, H, W, 3] or float32 [N, 3, H, W] ('patchcore-trt triton' writes one)"
            )
        missing = [name for name in OUTPUT_NAMES if name not in outputs]
        if missing:
            raise UserError(f"{self.endpoint.url} model {self.model!r} has no output(s) {missing}")
        self.max_batch = max(int(config.get("max_batch_size", 1)), 1)
        # The map's [H, W] (None where it follows the input's size), for sizing shared memory outputs.
        dims = next((item.get("dims") for item in config.get("output", []) if item["name"] == OUTPUT_NAMES[2]), None)
        self.map_size = tuple(int(d) for d in dims[-2:]) if dims and min(int(d) for d in dims[-2:]) > 0 else None
        self.parameters = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
        if "metadata" not in self.parameters and "products" not in self.parameters:
            raise UserError(
                f"{self.endpoint.url} model {self.model!r} has no 'metadata' parameter (not written by this "
                "patchcore-trt's 'triton'? write its repository again)"
            )
        where = f"{self.endpoint.url} model {self.model!r}"
        if "products" in self.parameters:
            self._read_product(where)
        elif self.product is not None:
            raise UserError(f"{where} serves one checkpoint, not a line of products; drop --product")
        else:
            self.metadata = ArtifactMetadata.from_json(self.parameters["metadata"], where)  # type: ignore[arg-type]
        self.postprocess = self.metadata.postprocess

    def _read_product(self, where: str) -> None:
        """A line: this backend's product, its checkpoint's SHA-256 and metadata, from the config's product list."""
        products = product_list(self.parameters["products"], where)
        if self.product is None and len(products) == 1:
            self.product = next(iter(products))
        if self.product is None:
            raise UserError(
                f"{where} is a line of {len(products)} products; name one with --product: {', '.join(products)}"
            )
        if self.product not in products:
            raise UserError(f"{where}: unknown product {self.product!r}; it serves: {', '.join(products)}")
        entry = products[self.product]
        self.sha256 = str(entry["sha256"])
        self.parameters.update(source_file=str(entry["source_file"]), source_sha256=self.sha256)
        self.metadata = ArtifactMetadata.from_json(entry["metadata"], f"{where} product {self.product}")  # type: ignore[arg-type]

    def describe(self) -> dict[str, object]:
        """What a results file records about the model: server, name, the served file, thresholds, rule."""
        keys = ("source_file", "source_sha256", "precision", "backbone", "bank_size", "model_size", "runtime")
        return {
            "file": self.model,
            "server": self.endpoint.url,
            "model": self.model,
            **({"product": self.product} if self.product is not None else {}),
            **{key: self.parameters[key] for key in keys if key in self.parameters},
            "backend": self.name,
            "device": self.endpoint.url,
            "image_threshold": self.image_threshold,
            "rule": self.postprocess.rule,
            "postprocess": self.postprocess.to_dict(),
        }

    def notes(self) -> list[str]:
        notes = []
        if self.quantized:
            notes.append(
                f"{self.quantized} image(s) were not 8-bit and were rounded to 8 bits for the server's uint8 model"
            )
        if len(self.sources) > 1:
            notes.append(
                f"product {self.product} was replaced on the server during the run: answers came from checkpoints "
                f"{', '.join(sorted(sha[:12] for sha in self.sources))} (now {self.sha256[:12]})"
            )
        return notes

    def _infer(self, images: np.ndarray) -> Prediction:
        if self.layout == "nchw_float32":
            return self._send(images, "FP32")
        quantized = np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)
        exact = np.array_equal(quantized.astype(np.float32) / 255.0, images)
        if not exact:  # 16-bit or float images: a uint8 model sees them rounded to 8 bits
            self.quantized += len(images)
        return self._send(np.ascontiguousarray(quantized.transpose(0, 2, 3, 1)), "UINT8")

    def _infer_uint8(self, images: np.ndarray) -> Prediction:
        if self.layout == "nchw_float32":
            return self._send(uint8_to_float(images), "FP32")
        return self._send(images, "UINT8")

    def _chunks(self, batch: np.ndarray) -> list[np.ndarray]:
        per_request = min(self.max_batch, max(1, -(-len(batch) // self.concurrency)))
        return [batch[start : start + per_request] for start in range(0, len(batch), per_request)]

    def _output_specs(self, chunk: np.ndarray) -> list[tuple[str, np.dtype, list[int]]]:
        """(name, dtype, shape) of each output a request of ``chunk`` asks for."""
        n = len(chunk)
        map_size = self.map_size or (chunk.shape[1:3] if self.layout == "nhwc_uint8" else chunk.shape[2:])
        shapes = ([n], [n], [n, 1, *map_size], [n, 1, *map_size])
        dtypes = (np.float32, np.bool_, np.float32, np.bool_)
        specs = zip(OUTPUT_NAMES, dtypes, shapes, strict=True)
        wanted = [(name, np.dtype(dtype), list(shape)) for name, dtype, shape in specs if name in self.outputs]
        if self.product is not None:  # a line's answer names its product and checkpoint
            name, sha256 = LINE_OUTPUT_NAMES
            wanted += [
                (name, np.dtype(np.uint8), [n, len(self.product.encode())]),
                (sha256, np.dtype(np.uint8), [n, 32]),
            ]
        return wanted

    def _request(self, chunk: np.ndarray, datatype: str, slot: int) -> tuple[list[Any], list[Any], list[int]]:
        """The request's inputs and outputs, and where each output lies in the slot's region (shared memory)."""
        tensor = self.module.InferInput(INPUT_NAME, list(chunk.shape), datatype)
        specs = self._output_specs(chunk)
        binary = {"binary_data": True} if self.endpoint.protocol == "http" else {}
        outputs = [self.module.InferRequestedOutput(name, **binary) for name, _, _ in specs]
        if self.regions is None:
            tensor.set_data_from_numpy(chunk)
            return [tensor], outputs, []
        sizes = [chunk.nbytes] + [dtype.itemsize * int(np.prod(shape)) for _, dtype, shape in specs]
        offsets, total = layout(sizes)
        region = self.regions.ensure(slot, total)
        self.regions.write(region, chunk)
        tensor.set_shared_memory(region.name, chunk.nbytes)
        for output, offset, size in zip(outputs, offsets[1:], sizes[1:], strict=True):
            output.set_shared_memory(region.name, size, offset)
        return [tensor], outputs, offsets[1:]

    def _answer(self, result: Any, chunk: np.ndarray, slot: int, offsets: list[int]) -> Prediction:
        """The prediction an answer carries: in its body, or in the slot's region (copied out: the slot is reused)."""
        if self.regions is None:
            arrays = {name: result.as_numpy(name) for name, _, _ in self._output_specs(chunk)}
        else:
            region = self.regions.regions[slot]
            arrays = {}
            for (name, dtype, _), offset in zip(self._output_specs(chunk), offsets, strict=True):
                output = result.get_output(name)
                shape = output["shape"] if isinstance(output, dict) else output.shape
                arrays[name] = self.regions.read(region, dtype, [int(d) for d in shape], offset)
        if self.product is not None:
            self._check_source(arrays[LINE_OUTPUT_NAMES[0]], arrays[LINE_OUTPUT_NAMES[1]])
        return Prediction.from_outputs([arrays[name] for name in self.outputs])

    def _check_source(self, names: np.ndarray, shas: np.ndarray) -> None:
        """Every answer of a line names its product and checkpoint: the product must be ours."""
        answered = {bytes(row).decode(errors="replace") for row in names}
        if answered != {self.product}:
            raise UserError(f"{self.endpoint.url} answered for product(s) {sorted(answered)}, not {self.product}")
        self._answered |= {bytes(row).hex() for row in shas}

    def _send(self, batch: np.ndarray, datatype: str) -> Prediction:
        chunks = self._chunks(batch)
        send = self._send_http if self.endpoint.protocol == "http" else self._send_grpc
        self._answered = set()
        try:
            parts = send(chunks, datatype)
        except UserError:
            # A server that restarted has forgotten the regions: registered again, the batch is sent once more.
            if self.regions is None or not self.regions.lost(self.as_json):
                raise
            parts = send(chunks, datatype)
        if self.product is not None:
            self.sources |= self._answered
            if self._answered != {self.sha256}:
                self._read_model()  # the product was replaced on the server: its new checkpoint's metadata
        prediction = Prediction.concat(parts)
        if len(prediction) != len(batch):
            raise RuntimeError(f"{self.endpoint.url} returned {len(prediction)} results for {len(batch)} images")
        return prediction

    def _slot(self) -> int:
        try:
            return self.free.get(timeout=self.timeout_s)
        except queue.Empty:  # every request in flight waits on its answer
            raise UserError(
                f"{self.endpoint.url} model {self.model!r}: no answer within {self.timeout_s:g} s"
            ) from None

    def _send_http(self, chunks: list[np.ndarray], datatype: str) -> list[Prediction]:
        parts: list[Prediction] = []
        # The client's own pool (``concurrency`` connections) carries one wave of requests at a time.
        for start in range(0, len(chunks), self.concurrency):
            wave = []
            try:
                for chunk in chunks[start : start + self.concurrency]:
                    slot = self._slot()
                    wave.append((chunk, slot, None, []))
                    inputs, outputs, offsets = self._request(chunk, datatype, slot)
                    handle = self._call(
                        "inference", self.client.async_infer, self.model, inputs, outputs=outputs, **self._parameters
                    )
                    wave[-1] = (chunk, slot, handle, offsets)
                for chunk, slot, handle, offsets in wave:
                    parts.append(self._answer(self._call("inference", handle.get_result), chunk, slot, offsets))
            finally:
                for _, slot, handle, _ in wave:
                    if handle is not None:
                        with contextlib.suppress(Exception):  # answered, or failed: either way no longer in flight
                            handle.get_result(block=True, timeout=self.timeout_s)
                    self.free.put(slot)
        return parts

    def _send_grpc(self, chunks: list[np.ndarray], datatype: str) -> list[Prediction]:
        done: queue.Queue[tuple[int, Prediction | None, Any]] = queue.Queue()

        def finished(index: int, slot: int, offsets: list[int], result: Any, error: Any) -> None:
            part = None
            try:
                if error is None:
                    part = self._answer(result, chunks[index], slot, offsets)
            except Exception as exc:  # reported by the caller's thread
                error = exc
            finally:
                self.free.put(slot)
                done.put((index, part, error))

        for index, chunk in enumerate(chunks):
            slot = self._slot()
            try:
                inputs, outputs, offsets = self._request(chunk, datatype, slot)
                self._call(
                    "inference", self.client.async_infer, self.model, inputs,
                    callback=lambda result, error, i=index, s=slot, o=offsets: finished(i, s, o, result, error),
                    outputs=outputs, client_timeout=self.timeout_s, **self._parameters,
                )  # fmt: skip
            except BaseException:
                self.free.put(slot)
                raise
        parts: list[Prediction | None] = [None] * len(chunks)
        for _ in chunks:
            try:
                index, part, error = done.get(timeout=self.timeout_s)
            except queue.Empty:
                raise UserError(
                    f"{self.endpoint.url} model {self.model!r}: no answer within {self.timeout_s:g} s"
                ) from None
            if error is not None:
                raise UserError(f"{self.endpoint.url} model {self.model!r}: inference: {_message(error)}")
            parts[index] = part
        return parts  # type: ignore[return-value]

    @property
    def _parameters(self) -> dict[str, Any]:
        """The request parameters: a line's product."""
        return {"parameters": {"product": self.product}} if self.product is not None else {}

    def statistics(self) -> dict[str, Any]:
        """Triton's statistics of this model (counts of inferences, executions and each batch size)."""
        stats = self._call("statistics", self.client.get_inference_statistics, self.model, **self.as_json)
        return stats["model_stats"][0]

    def close(self) -> None:
        """Wait (bounded) for the requests in flight, release the shared memory regions, close the connection."""
        if self.regions is not None:
            taken = []
            with contextlib.suppress(queue.Empty):  # an answer that never comes: the regions go all the same
                for _ in range(self.concurrency):
                    taken.append(self.free.get(timeout=self.timeout_s))
            for slot in taken:
                self.free.put(slot)
            self.regions.release()
        with contextlib.suppress(Exception):
            self.client.close()


def _message(exc: Any) -> str:
    """The server's own words, without tritonclient's status prefix and request id."""
    text = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    return str(text or exc).strip()
