"""Triton serving on the GPU machine: the Python-backend cuda model under concurrent clients, beside in-process calls.

One self-contained run (from the repository root; every step logged, results written to OUT as they come):
  1. installs the carried wheels (nvidia-pytriton for tritonserver 2.51, tritonclient and its HTTP stack) into
     /tmp/serve-site if they are not importable;
  2. writes a synthetic WRN50 model (256x256, M=16,384 by default) as an anomalib-layout checkpoint;
  3. times the in-process cuda backend (``predict`` on uint8 host arrays) at the batch sizes the served model
     pads to (1, 2, 4, ..., max-batch), and after the loads at the batch sizes Triton formed;
  4. writes the repository with ``patchcore-trt triton`` (``--kind gpu --gpus ...``) and serves it;
  5. for each client count: that many clients, each sending one 256x256 image at a time for ``--seconds``;
     throughput (Triton's own count of the images run in the window, cross-checked against the requests the
     clients sent and got answered inside it), p50/p99 latency of those requests, the batch sizes Triton formed
     and its per-stage times (queue, compute input, infer, output) from its statistics endpoint;
  6. compares served outputs with the in-process ones on the same frames; stops the server.

Usage:
  python3 benchmarks/serve_gpu.py --out $OUT [--wheels .whl/serve] [--gpus 0] [--clients 1,4,16] [--seconds 15]
      [--instances 2] [--max-batch 16] [--queue-delay-us 500] [--bank 16384] [--size 256] [--mode fast|exact]
      [--protocol http|grpc] [--budget-s 540]
Writes OUT/serve_gpu.json, OUT/serve_gpu.md, OUT/serve_gpu.log and OUT/tritonserver.log.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = Path("/tmp/serve-site")
STARTED = time.monotonic()
LOG: list[Path] = []


def log(message: str) -> None:
    line = f"[{time.monotonic() - STARTED:7.1f} s] {message}"
    print(line, flush=True)
    for path in LOG:
        with path.open("a") as handle:
            handle.write(line + "\n")


def prepend_path(folder: Path) -> None:
    sys.path.insert(0, str(folder))
    os.environ["PYTHONPATH"] = f"{folder}:{os.environ.get('PYTHONPATH', '')}".rstrip(":")


def serving_ready() -> str | None:
    """None when a tritonserver and tritonclient are usable here, else what is missing."""
    from patchcore_trt.errors import UserError
    from patchcore_trt.serve.server import find_distribution

    try:
        import tritonclient.grpc
        import tritonclient.http  # noqa: F401

        find_distribution()
        return None
    except (ImportError, UserError) as exc:
        return str(exc)


def install_wheels(wheels: Path | None) -> None:
    missing = serving_ready()
    if missing is None:
        log("tritonserver and tritonclient are here already")
        return
    files = sorted(wheels.glob("*.whl")) if wheels else []
    if not files:
        raise SystemExit(f"{missing}; and no wheels in {wheels}: carry them (see docs/serving.md)")
    log(f"{missing}: installing {len(files)} wheels into {SITE}: {', '.join(f.name for f in files)}")
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, files)]  # fmt: skip
    subprocess.run(command, check=True, timeout=300)
    prepend_path(SITE)
    importlib.invalidate_caches()
    missing = serving_ready()
    if missing is not None:
        raise SystemExit(f"still not usable after installing the wheels: {missing}")


def environment() -> dict[str, object]:
    import torch

    from patchcore_trt.serve.server import _libpython_folder

    try:
        libpython = str(_libpython_folder() or "found by the loader")
    except Exception as exc:  # the reason goes into the results; serving is skipped
        libpython = f"MISSING: {exc}"
    shm = shutil.disk_usage("/dev/shm") if Path("/dev/shm").exists() else None
    return {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpus": os.cpu_count(),
        "dev_shm_free_gib": round(shm.free / 2**30, 1) if shm else None,
        "libpython": libpython,
    }


def synthetic_checkpoint(folder: Path, bank: int, size: int, backbone: str, device: str) -> Path:
    try:  # the synthetic model moved during a refactor; either place works
        from patchcore_trt.demo.synthetic_model import synthetic_spec
    except ImportError:
        from patchcore_trt.bench.synthetic_model import synthetic_spec
    from patchcore_trt.checkpoint import write_checkpoint

    spec = synthetic_spec(bank_size=bank, image_size=(size, size), backbone=backbone, device=device)
    return write_checkpoint(spec, folder / f"synthetic-{backbone}-M{bank}-{size}.ckpt")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))] if ordered else float("nan")


def frames(count: int, size: int, seed: int):
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def time_in_process(checkpoint: Path, batches: list[int], args: argparse.Namespace, results: dict, save) -> dict:
    """Host-to-host latency of ``predict`` on uint8 host arrays at each batch size (median of repeated calls, 8
    rotating inputs).

    Rows go to results["in_process"] as they come; returns the batch-1 outputs on frame 0 (the correctness check).
    """
    import torch

    from patchcore_trt.runtime import open_backend

    if args.kind == "gpu":
        backend = open_backend(checkpoint, "cuda", device=f"cuda:{args.gpus[0]}", mode=args.mode)
    else:  # the CPU model, as the served CPU instance runs it (a smoke test of this script without a GPU)
        backend = open_backend(checkpoint, "torch")
    call = backend.predict
    sets = [frames(args.max_batch, args.size, seed) for seed in range(8)]
    reference = call(sets[0][:1].copy())
    rows = {row["batch"]: row for row in results.get("in_process", [])}
    for batch in batches:
        inputs = [s[:batch].copy() for s in sets]
        for index in range(5):  # capture the graph, then warm
            call(inputs[index % 8])
        times = []
        deadline = time.perf_counter() + 1.5
        while time.perf_counter() < deadline or len(times) < 20:
            start = time.perf_counter()
            call(inputs[len(times) % 8])
            times.append(1000 * (time.perf_counter() - start))
        median = percentile(times, 50)
        rows[batch] = {"batch": batch, "calls": len(times), "p50_ms": median, "p99_ms": percentile(times, 99),
                       "images_per_s": 1000 * batch / median}  # fmt: skip
        log(f"in-process batch {batch}: p50 {median:.3f} ms, p99 {rows[batch]['p99_ms']:.3f} ms, "
            f"{rows[batch]['images_per_s']:.0f} img/s")  # fmt: skip
        results["in_process"] = [rows[key] for key in sorted(rows)]
        save()
    backend.close()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"pred_score": reference.pred_score.tolist(), "map": reference.anomaly_map}


def write_repository(checkpoint: Path, repo: Path, args: argparse.Namespace) -> None:
    options = ["triton", str(checkpoint), "-o", str(repo), "--kind", args.kind, "--instances", str(args.instances),
               "--max-batch", str(args.max_batch), "--queue-delay-us", str(args.queue_delay_us)]  # fmt: skip
    if args.kind == "gpu":
        options += ["--gpus", ",".join(map(str, args.gpus)), "--mode", args.mode]
    # Registered commands run as `python -m patchcore_trt`; the import form also works before registration.
    runner = "import patchcore_trt.cli.triton, patchcore_trt.cli.serve; from patchcore_trt.cli import main; main()"
    done = subprocess.run([sys.executable, "-c", runner, *options], capture_output=True, text=True, timeout=300)
    log(f"patchcore-trt {' '.join(options)}\n{done.stdout}{done.stderr}")
    if done.returncode != 0:
        raise RuntimeError(f"patchcore-trt triton failed with code {done.returncode}")


def client_process(
    protocol: str, url: str, model: str, size: int, seed: int, warm: float, start: float, end: float, queue
) -> None:
    """One client: one image per request, the next sent when the answer is in, from ``warm`` to ``end``; only the
    requests sent and answered inside [start, end] are kept (their latencies), the warm-up's and the last one's
    that ends past the window are not."""
    import numpy as np

    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    client = module.InferenceServerClient(url, **({"network_timeout": 60.0} if protocol == "http" else {}))
    names = ("pred_score", "pred_label", "anomaly_map", "pred_mask")
    kwargs = {"binary_data": True} if protocol == "http" else {}
    outputs = [module.InferRequestedOutput(name, **kwargs) for name in names]
    images = frames(8, size, seed)
    latencies, errors, count = [], 0, 0
    while time.time() < warm:
        time.sleep(0.001)
    while time.time() < end:
        tensor = module.InferInput("image", [1, size, size, 3], "UINT8")
        tensor.set_data_from_numpy(images[count % 8 : count % 8 + 1])
        sent = time.time()
        try:
            result = client.infer(
                model, [tensor], outputs=outputs, **({"client_timeout": 60.0} if protocol == "grpc" else {})
            )
            np.asarray(result.as_numpy("anomaly_map"))
        except Exception:  # counted; the load goes on
            errors += 1
            continue
        count += 1
        answered = time.time()
        if start <= sent and answered <= end:
            latencies.append(1000 * (answered - sent))
    client.close()
    queue.put({"latencies": latencies, "errors": errors})


def batch_counts(stats: dict) -> dict[int, int]:
    return {int(item["batch_size"]): int(item["compute_infer"]["count"]) for item in stats.get("batch_stats", [])}


STAGES = ("success", "queue", "compute_input", "compute_infer", "compute_output")


def stage_means(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Triton's per-request statistics over the window: for each stage, the requests counted and the mean time
    per request (us), from the differences of its cumulative counters."""
    stages = {}
    for stage in STAGES:
        count = int(after["inference_stats"][stage]["count"]) - int(before["inference_stats"][stage]["count"])
        ns = int(after["inference_stats"][stage]["ns"]) - int(before["inference_stats"][stage]["ns"])
        stages[stage] = {"count": count, "mean_us": ns / count / 1000 if count else float("nan")}
    return stages


def run_load(server, clients: int, args: argparse.Namespace, url: str) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    warm = 3.0
    start = time.time() + 5.0 + warm  # every client process is up and connected before the window opens
    end = start + args.seconds
    workers = [
        context.Process(
            target=client_process,
            args=(args.protocol, url, "patchcore", args.size, n, start - warm, start, end, queue),
        )
        for n in range(clients)
    ]
    for worker in workers:
        worker.start()
    time.sleep(max(start - time.time(), 0))
    before = server.statistics("patchcore")
    time.sleep(max(end - time.time(), 0))
    after = server.statistics("patchcore")
    outcomes = []
    for _ in workers:
        try:
            outcomes.append(queue.get(timeout=90))
        except Exception:
            break
    for worker in workers:
        worker.join(timeout=10)
        if worker.is_alive():
            worker.terminate()
    latencies = [value for outcome in outcomes for value in outcome["latencies"]]
    executions = int(after["execution_count"]) - int(before["execution_count"])
    inferences = int(after["inference_count"]) - int(before["inference_count"])
    histogram = {size: count - batch_counts(before).get(size, 0) for size, count in batch_counts(after).items()}
    served = sum(size * count for size, count in histogram.items())
    stages = stage_means(before, after)
    # Two counts of the same window: the clients' (sent and answered inside it) and Triton's own (requests it
    # finished between the two statistics snapshots). They differ by the requests in flight at either edge, at
    # most one per client; a larger gap means one of the two counts is wrong.
    return {
        "clients": clients,
        "seconds": args.seconds,
        "requests": len(latencies),
        "triton_requests": stages["success"]["count"],
        "triton_images": served,
        "counts_agree": abs(len(latencies) - stages["success"]["count"]) <= 2 * clients,
        "errors": sum(outcome["errors"] for outcome in outcomes),
        "clients_reported": len(outcomes),
        # The served rate is Triton's own count of the images it ran in the window (its batch histogram).
        "images_per_s": served / args.seconds,
        "client_images_per_s": len(latencies) / args.seconds,
        "stages_us": {stage: value["mean_us"] for stage, value in stages.items()},
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "mean_batch": inferences / executions if executions else None,
        "batches": {size: count for size, count in sorted(histogram.items()) if count},
    }


def stage_cells(load: dict) -> str:
    stages = load.get("stages_us")
    if not stages:
        return "not recorded"
    return " / ".join(f"{stages[stage]:.0f}" for stage in ("queue", "compute_input", "compute_infer", "compute_output"))


def markdown(results: dict) -> str:
    rows = {row["batch"]: row for row in results.get("in_process", [])}
    one = rows.get(1, {})
    lines = [
        f"# Triton serving on {', '.join(results.get('environment', {}).get('gpus', ['?']))}",
        "",
        "Served: {mode} mode, {backbone}, {size}x{size}, M={bank}, {instances} instance(s) on GPUs {gpus}, max batch "
        "{max_batch}, queue delay {queue_delay_us} us, {protocol}, {seconds:.0f} s per load".format(
            **results["settings"]
        ),
        "Environment: " + ", ".join(f"{key} {value}" for key, value in results.get("environment", {}).items()),
        f"Served vs in-process: {results.get('served_vs_in_process')}",
        f"In-process batch 1 (host in/out): p50 {one.get('p50_ms', float('nan')):.3f} ms, "
        f"p99 {one.get('p99_ms', float('nan')):.3f} ms",
        "",
        "| clients | served img/s | p50 ms | p99 ms | mean batch formed | in-process img/s at that batch "
        "| served / in-process | p99 / in-process batch-1 p50 | errors | client-counted img/s "
        "| Triton us per request: queue / input / infer / output |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for load in results.get("loads", []):
        formed = load["mean_batch"] or 1
        local = rows.get(round(formed), {})
        scale = len(results["settings"]["gpus"])
        local_rate = local.get("images_per_s", float("nan")) * scale
        lines.append(
            f"| {load['clients']} | {load['images_per_s']:.0f} | {load['p50_ms']:.2f} | {load['p99_ms']:.2f} | "
            f"{formed:.1f} | {local_rate:.0f}{f' (x{scale} GPUs)' if scale > 1 else ''} | "
            f"{load['images_per_s'] / local_rate:.0%} | {load['p99_ms'] / one.get('p50_ms', float('nan')):.1f}x | "
            f"{load['errors']} | {load.get('client_images_per_s', float('nan')):.0f} | {stage_cells(load)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/serve")))
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl" / "serve")
    parser.add_argument("--gpus", type=lambda text: [int(part) for part in text.split(",")], default=[0])
    parser.add_argument("--clients", type=lambda text: [int(part) for part in text.split(",")], default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--instances", type=int, default=2, help="model instances per GPU")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--queue-delay-us", type=int, default=500)
    parser.add_argument("--bank", type=int, default=16384)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--mode", choices=("fast", "exact"), default="fast", help="the cuda backend's mode")
    parser.add_argument("--backbone", default="wide_resnet50_2")
    parser.add_argument("--kind", choices=("gpu", "cpu"), default="gpu", help="cpu: a smoke test without a GPU")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--budget-s", type=float, default=540.0, help="skip client counts that would not finish")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    LOG.append(args.out / "serve_gpu.log")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prepend_path(ROOT / "src")
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    results: dict = {"settings": settings}

    def save() -> None:
        (args.out / "serve_gpu.json").write_text(json.dumps(results, indent=2, default=str))
        (args.out / "serve_gpu.md").write_text(markdown(results))

    install_wheels(args.wheels)
    results["environment"] = environment()
    log(f"environment: {results['environment']}")
    save()
    work = Path("/tmp/serve-bench")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    device = "cuda" if args.kind == "gpu" else "cpu"
    checkpoint = synthetic_checkpoint(work, args.bank, args.size, args.backbone, device)
    log(f"wrote {checkpoint} ({checkpoint.stat().st_size / 2**20:.0f} MiB)")
    buckets = sorted({min(1 << i, args.max_batch) for i in range(args.max_batch.bit_length() + 1)})
    reference = time_in_process(checkpoint, buckets, args, results, save)  # the sizes the served model pads to
    if str(results["environment"]["libpython"]).startswith("MISSING"):
        log("no shared libpython for Triton's Python backend stub: serving skipped")
        return
    write_repository(checkpoint, work / "repo", args)

    from patchcore_trt.runtime import open_backend
    from patchcore_trt.serve.server import TritonServer, free_ports

    server = TritonServer(work / "repo", free_ports(), log_file=args.out / "tritonserver.log")
    try:
        started = time.monotonic()
        for state in server.start(timeout_s=300):
            log(state.line())
        results["server_start_s"] = round(time.monotonic() - started, 1)
        with open_backend(f"http://{server.http_url}", model="patchcore") as remote:
            served = remote.predict(frames(args.max_batch, args.size, 0)[:1])
        import numpy as np

        results["served_vs_in_process"] = {
            "max_abs_score": float(np.abs(served.pred_score - np.asarray(reference["pred_score"])).max()),
            "max_abs_map": float(np.abs(served.anomaly_map - reference["map"]).max()),
        }
        log(f"served vs in-process on the same frame: {results['served_vs_in_process']}")
        url = server.http_url if args.protocol == "http" else server.grpc_url
        results["loads"] = []
        for clients in args.clients:
            if time.monotonic() - STARTED + args.seconds + 30 > args.budget_s:
                log(f"skipping {clients} clients: the time budget of {args.budget_s:.0f} s would be exceeded")
                continue
            load = run_load(server, clients, args, url)
            results["loads"].append(load)
            log(f"{clients} clients: {load}")
            save()
    except Exception as exc:  # recorded with what was measured so far, then raised
        results["serving_error"] = f"{type(exc).__name__}: {exc}"
        log(f"serving failed: {results['serving_error']}")
        raise
    finally:
        code = server.stop()
        results["server_exit"] = {"code": code, "processes_left": server.group_alive()}
        log(f"server stopped: {results['server_exit']}")
        save()
    # In-process at the batch sizes Triton formed (rounded means), now that the server has left the GPU.
    timed = {row["batch"] for row in results["in_process"]}
    formed = {max(1, min(args.max_batch, round(load["mean_batch"] or 1))) for load in results.get("loads", [])}
    if formed - timed and time.monotonic() - STARTED + 30 + 3 * len(formed - timed) < args.budget_s:
        time_in_process(checkpoint, sorted(formed - timed), args, results, save)
    save()
    log("done\n" + markdown(results))


if __name__ == "__main__":
    main()
