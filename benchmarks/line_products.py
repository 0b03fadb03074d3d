"""Many products on one server: a line (one model, the backbone shared) against one served model per product.

For each product count N (``--products``), N checkpoints that share one backbone (a synthetic resnet18 model, its
bank perturbed per product; written as real anomalib 2.7-layout checkpoints) are served on a real tritonserver on
127.0.0.1 (CPU instances), once as a line and once as N separate models (only the counts in ``--separate``: each
separate model is a Python process with its own torch and backbone). Reported per configuration:
  pss_mb      memory of the server's whole process group (tritonserver and every model process), proportional set
              size (pages shared between processes counted once), after the warm-up
  rss_mb      the same as resident set size (shared pages counted in every process)
  img_s       requests completed inside the measuring window / its length (one image per request)
  triton_img_s  the same window counted by Triton's own statistics (successful inferences, all models)
  p50_ms, p99_ms  latency of the requests completed inside the window
With ``--kind gpu`` the instances run on the GPUs and ``gpu_mb`` (nvidia-smi's memory in use) is recorded too.
Traffic: ``--clients`` threads, each sending one 256x256 frame at a time to a product drawn at random (seeded).
For a product count not in ``--separate``, the separate models' memory is computed from the measured ones (the
increment per model, times N) and marked so. Results: JSON and Markdown under --out, with versions, machine, commit.

    .venv/bin/python benchmarks/line_products.py --out benchmarks/results --name cpu_line_products
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from line_bench import environment

from patchcore_trt.report import markdown_table, write_json


def write_products(folder: Path, count: int, bank_size: int) -> dict[str, Path]:
    """``count`` checkpoints with one backbone and their own banks (the shared bank plus per-product noise)."""
    import torch

    from patchcore_trt.checkpoint import write_checkpoint
    from patchcore_trt.demo.synthetic_model import synthetic_spec

    spec = synthetic_spec(bank_size, (256, 256), backbone="resnet18")
    products = {}
    for index in range(count):
        noise = torch.from_numpy(np.random.default_rng(index).normal(0, 0.01, tuple(spec.memory_bank.shape)))
        product = dataclasses.replace(spec, memory_bank=(spec.memory_bank + noise.float()).contiguous())
        products[f"p{index:02d}"] = write_checkpoint(product, folder / f"p{index:02d}.ckpt")
    return products


def group_memory(server_pid: int) -> tuple[float, float]:
    """(PSS, RSS) in MB summed over every process of the server's process group (tritonserver and its stubs)."""
    pss = rss = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != server_pid:  # the process group: serve starts the server as a group leader
                continue
            rollup = (entry / "smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        values = {line.split(":")[0]: int(line.split()[1]) for line in rollup[1:] if line.endswith("kB")}
        pss += values.get("Pss", 0)
        rss += values.get("Rss", 0)
    return pss / 1024, rss / 1024


def gpu_memory_mb() -> float:
    """Memory in use on the GPUs, as nvidia-smi reports it (every process: run on an otherwise idle machine)."""
    import subprocess

    query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
    return float(
        sum(int(line) for line in subprocess.run(query, capture_output=True, text=True, check=True).stdout.split())
    )


def successes(url: str, models: list[str]) -> int:
    import tritonclient.http as httpclient

    with contextlib.closing(httpclient.InferenceServerClient(url)) as client:
        stats = client.get_inference_statistics()["model_stats"]
    return sum(int(item["inference_stats"]["success"]["count"]) for item in stats if item["name"] in models)


def traffic(url: str, route: list[tuple[str, dict]], clients: int, warmup_s: float, window_s: float,
            models: list[str], stats_url: str) -> dict:  # fmt: skip
    """Run the clients; the window starts after ``warmup_s``. Returns img/s (ours and Triton's) and latencies."""
    import tritonclient.grpc as grpcclient

    frame = np.random.default_rng(0).integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    done: list[tuple[float, float]] = []
    failures: list[str] = []
    stop = threading.Event()

    def client(seed: int) -> None:
        rng = np.random.default_rng(1000 + seed)
        connection = grpcclient.InferenceServerClient(url)
        try:
            for _ in range(100_000):  # bounded; the window ends it long before
                if stop.is_set():
                    break
                model, parameters = route[int(rng.integers(len(route)))]
                image = grpcclient.InferInput("image", list(frame.shape), "UINT8")
                image.set_data_from_numpy(frame)
                start = time.perf_counter()
                try:
                    connection.infer(model, [image], parameters=parameters or None, client_timeout=120)
                except grpcclient.InferenceServerException as exc:
                    failures.append(exc.message())
                    continue
                done.append((start, time.perf_counter()))
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(warmup_s)
    begin_count, begin = successes(stats_url, models), time.perf_counter()
    time.sleep(window_s)
    end_count, end = successes(stats_url, models), time.perf_counter()
    stop.set()
    for thread in threads:
        thread.join(timeout=300)
    inside = [(s, e) for s, e in done if begin <= e <= end]
    latencies = sorted((e - s) * 1000 for s, e in inside)
    return {
        "requests_in_window": len(inside),
        "img_s": len(inside) / (end - begin),
        "triton_img_s": (end_count - begin_count) / (end - begin),
        "p50_ms": statistics.median(latencies) if latencies else None,
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None,
        "failures": len(failures),
        "window_s": end - begin,
    }


def serve_and_measure(repository: Path, route: list[tuple[str, dict]], models: list[str], args) -> dict:
    from patchcore_trt.serve.server import TritonServer, free_ports

    with TritonServer(repository, free_ports(), models=models) as server:
        states = server.start(timeout_s=1800)
        bad = [state.line() for state in states if state.state != "READY"]
        if bad:
            raise SystemExit(f"not ready: {bad}")
        result = traffic(server.grpc_url, route, args.clients, args.warmup, args.seconds, models, server.http_url)
        result["pss_mb"], result["rss_mb"] = group_memory(server.process.pid)
        if args.kind == "gpu":
            result["gpu_mb"] = gpu_memory_mb()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name", default="cpu_line_products")
    parser.add_argument("--products", default="1,10,50", help="product counts served as a line")
    parser.add_argument("--separate", default="1,10", help="product counts also served as separate models")
    parser.add_argument("--bank", type=int, default=16384, help="memory-bank rows per product")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--kind", default="cpu", choices=("cpu", "gpu"), help="where the model instances run")
    args = parser.parse_args()
    from patchcore_trt.serve.line_repository import write_line
    from patchcore_trt.serve.repository import ServeOptions, write_model

    counts = [int(value) for value in args.products.split(",")]
    separate = [int(value) for value in args.separate.split(",") if value]
    results = {"environment": environment(), "settings": vars(args) | {"out": str(args.out)}, "rows": []}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        products = write_products(work, max(counts + separate), args.bank)
        for count in counts:
            chosen = dict(list(products.items())[:count])
            repository = work / f"line{count}"
            write_line(chosen, repository, ServeOptions(name="line", kind=args.kind))
            route = [("line", {"product": name}) for name in chosen]
            row = {"serving": "line", "products": count, **serve_and_measure(repository, route, ["line"], args)}
            results["rows"].append(row)
            print(row, flush=True)
        for count in separate:
            chosen = dict(list(products.items())[:count])
            repository = work / f"separate{count}"
            for name, path in chosen.items():
                write_model(path, repository, ServeOptions(name=name, kind=args.kind))
            route = [(name, {}) for name in chosen]
            row = {"serving": "separate", "products": count, **serve_and_measure(repository, route, list(chosen), args)}
            results["rows"].append(row)
            print(row, flush=True)
    measured = {row["products"]: row["pss_mb"] for row in results["rows"] if row["serving"] == "separate"}
    if len(measured) >= 2:
        low, high = min(measured), max(measured)
        per_model = (measured[high] - measured[low]) / (high - low)
        for count in counts:
            if count not in measured:
                pss = measured[low] + per_model * (count - low)
                results["rows"].append({"serving": "separate (computed)", "products": count, "pss_mb": pss})
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.name}.json", results)
    table = [
        {key: (f"{row[key]:.1f}" if isinstance(row.get(key), float) else row.get(key, "")) for key in
         ("serving", "products", "pss_mb", "rss_mb", "img_s", "triton_img_s", "p50_ms", "p99_ms", "failures")}
        for row in results["rows"]
    ]  # fmt: skip
    env = results["environment"]
    text = (
        f"# Many products on one CPU server: a line against separate models (resnet18, 256x256, M={args.bank})\n\n"
        f"`{env['command']}` at {env['commit'][:10]} on {env['machine']}; {args.clients} clients, one image per "
        f"request, {args.seconds:g} s window after {args.warmup:g} s warm-up\n\n" + markdown_table(table)
    )
    (args.out / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
