"""The line end to end: does predict keep the model fed from files? Decode capacity, model throughput, predict.

One run on one folder of generated images (1024x1024 PNGs or 900x900 JPEGs of a textured part, written to disk
first), reporting:
  decode     the decode pool alone (images.decode_image on ``--workers`` threads), img/s
  model      the backend alone on the same images already decoded (uint8 batches), img/s
  predict    predict.run_predict end to end (decode pool, batches, backend, JSON sink), img/s
  ratio      predict's wall time / max(decode alone, model alone): 1.0 is perfect overlap; the target is <= 1.15
  sequential predict with one decoding thread, for comparison
  served     (--served) predict --server: the same run_predict as a gRPC client (--shm for shared memory) of a
             local tritonserver serving the same model as a checkpoint on CPU instances, img/s. Its window is one
             run_predict: every request in it is sent and answered inside it, and Triton's own inference_count,
             read just before and just after, must grow by exactly the images scored (checked every run). The
             bundled tritonserver runs Python models only, so the server runs the checkpoint on torch: compare
             served_ratio_to_predict from a run with --backend torch
Each figure is the median of ``--repeats`` runs. Results: JSON and Markdown under --out, with versions, machine
and commit; the model is a synthetic one (random weights: the time does not depend on them) exported to ONNX.

    .venv/bin/python benchmarks/line_bench.py --out benchmarks/results --name cpu_line [--backend onnxruntime]
        [--served [--shm system] [--concurrency 2]]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from patchcore_trt.images import decode_files, decode_image, default_workers
from patchcore_trt.predict import header, run_predict
from patchcore_trt.report import JsonResults, markdown_table, write_json
from patchcore_trt.runtime import open_backend

FORMATS = {"png": (1024, ".png"), "jpeg": (900, ".jpg")}
SERVED_NAME = "line"


def make_folder(folder: Path, kind: str, count: int) -> list[Path]:
    """``count`` textured part images (smooth shading plus fine noise, as camera frames look), saved once."""
    side, suffix = FORMATS[kind]
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:side, 0:side] / side
    paths = []
    for index in range(count):
        base = 110 + 60 * np.sin(6 * x + index) * np.cos(5 * y) + rng.normal(0, 12, (side, side))
        rgb = np.clip(np.stack([base, base * 0.9 + 10, base * 0.8 + 20], axis=-1), 0, 255).astype(np.uint8)
        path = folder / f"part_{index:04d}{suffix}"
        Image.fromarray(rgb).save(path, quality=92) if kind == "jpeg" else Image.fromarray(rgb).save(path)
        paths.append(path)
    return paths


def timed(function, repeats: int) -> float:
    """Median wall seconds of ``function()`` over ``repeats`` runs."""
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        walls.append(time.perf_counter() - start)
    return statistics.median(walls)


def measure(backend, paths: list[Path], workers: int, batch: int, repeats: int, work: Path) -> dict:
    count = len(paths)

    def decode_all() -> None:
        for _, image, why in decode_files(paths, workers):
            assert image is not None, why

    decoded = [decode_image(path) for path in paths]
    batches = [np.stack(decoded[i : i + batch]) for i in range(0, count, batch)]

    def model_all() -> None:
        for images in batches:
            backend.predict(images)

    def predict_all(threads: int) -> None:
        sink = JsonResults(work / "results.json", header(backend))
        summary = run_predict(backend, paths, sinks=[sink], batch_size=batch, workers=threads)
        assert summary.scored == count, summary.failures[:3]

    model_all()  # warm-up: first-call allocations and kernel choices stay out of the figures
    decode_s, model_s = timed(decode_all, repeats), timed(model_all, repeats)
    predict_s, sequential_s = timed(lambda: predict_all(workers), repeats), timed(lambda: predict_all(1), repeats)
    return {
        "images": count,
        "workers": workers,
        "batch": batch,
        "decode_img_per_s": count / decode_s,
        "model_img_per_s": count / model_s,
        "predict_img_per_s": count / predict_s,
        "sequential_predict_img_per_s": count / sequential_s,
        "ratio_to_bound": predict_s / max(decode_s, model_s),
        "seconds": {"decode": decode_s, "model": model_s, "predict": predict_s, "sequential": sequential_s},
    }


def measure_served(url: str, paths: list[Path], args: argparse.Namespace, work: Path) -> dict:
    """predict --server's figure: run_predict over the triton backend, each run's count checked against Triton's."""
    count = len(paths)
    with open_backend(url, model=SERVED_NAME, concurrency=args.concurrency, shm=args.shm) as backend:

        def settled(expected: int) -> int:
            """Triton's inference_count once it reaches ``expected`` (bounded): Triton counts a request when it
            releases it, which may come just after the client has its answer. (gRPC's JSON leaves out a zero.)"""
            deadline = time.monotonic() + 10
            while (counted := int(backend.statistics().get("inference_count", 0))) < expected:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            return counted

        warm = np.stack([decode_image(path) for path in paths[: args.batch]])
        counted = settled(int(backend.statistics().get("inference_count", 0)))
        backend.predict(warm)  # first-call costs stay out of the windows
        counted = settled(counted + len(warm))
        walls = []
        for _ in range(args.repeats):
            sink = JsonResults(work / "served.json", header(backend))
            start = time.perf_counter()
            summary = run_predict(backend, paths, sinks=[sink], batch_size=args.batch, workers=args.workers)
            walls.append(time.perf_counter() - start)
            # The window's images, as the server counted them (read outside it): no other client uses this server.
            before, counted = counted, settled(counted + count)
            assert summary.scored == count == counted - before, (summary.scored, count, counted - before)
        served_s = statistics.median(walls)
    return {"served_img_per_s": count / served_s, "served_seconds": served_s}


def served_model(spec, work: Path, batch: int):
    """A tritonserver on free 127.0.0.1 ports serving ``spec`` as a checkpoint on one CPU instance."""
    from patchcore_trt.checkpoint import write_checkpoint
    from patchcore_trt.serve.repository import ServeOptions, write_model
    from patchcore_trt.serve.server import TritonServer, free_ports

    checkpoint = write_checkpoint(spec, work / "served.ckpt")
    write_model(checkpoint, work / "repo", ServeOptions(name=SERVED_NAME, kind="cpu", max_batch=batch))
    return TritonServer(work / "repo", free_ports(), log_file=work / "triton.log")


def environment() -> dict:
    import importlib.metadata

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    versions = {}
    for package in ("numpy", "pillow", "onnxruntime", "torch"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
        "python": platform.python_version(),
        "versions": versions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name", default="cpu_line")
    parser.add_argument("--backend", default="onnxruntime", help="onnxruntime (an exported .onnx), torch or cuda")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--formats", default="png,jpeg")
    parser.add_argument("--served", action="store_true", help="Also predict --server against a local tritonserver.")
    parser.add_argument(
        "--shm", default="none", choices=("none", "system"), help="(--served) Tensors through /dev/shm."
    )
    parser.add_argument("--concurrency", type=int, default=1, help="(--served) Requests in flight at once.")
    args = parser.parse_args()
    from patchcore_trt.checkpoint import write_checkpoint
    from patchcore_trt.demo.synthetic_model import synthetic_spec
    from patchcore_trt.export import export_onnx

    rows, results = [], {"environment": environment(), "settings": vars(args) | {"out": str(args.out)}}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        spec = synthetic_spec(4096, (256, 256), backbone=args.backbone)
        if args.backend == "onnxruntime":
            artifact = export_onnx(spec, work / "model.onnx", check=False)[0]
        else:
            artifact = write_checkpoint(spec, work / "model.ckpt")
        server = served_model(spec, work, args.batch) if args.served else contextlib.nullcontext()
        with open_backend(artifact, args.backend) as backend, server:
            if args.served:
                server.start(timeout_s=300)
            for kind in args.formats.split(","):
                folder = work / kind
                folder.mkdir()
                paths = make_folder(folder, kind, args.images)
                side = FORMATS[kind][0]
                row = {"format": f"{side}x{side} {kind}", **measure(backend, paths, args.workers, args.batch,
                                                                     args.repeats, work)}  # fmt: skip
                if args.served:
                    row |= measure_served(server.grpc_url, paths, args, work)
                    row["served_ratio_to_predict"] = row["predict_img_per_s"] / row["served_img_per_s"]
                results[kind] = row
                rows.append({key: (f"{value:.2f}" if isinstance(value, float) else value)
                             for key, value in row.items() if "seconds" not in key})  # fmt: skip
                print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.name}.json", results)
    env = results["environment"]
    text = (
        f"# predict end to end ({args.backend}, {args.backbone}, 256x256 model)\n\n"
        f"`{env['command']}` at {env['commit'][:10]} on {env['machine']}\n\n" + markdown_table(rows)
    )
    (args.out / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
