"""Benchmark results: a table (console and Markdown), CSV/JSON, and a PNG chart.

Every file records the machine and library versions it was measured with, and is written atomically after
each row, so a run stopped half-way still leaves every finished row on disk.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from patchcore_trt.bench.settings import BenchSettings
from patchcore_trt.files import atomic_path, write_text_atomic
from patchcore_trt.report import markdown_table, write_csv, write_json


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver() -> str | None:
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        return subprocess.run(query, capture_output=True, text=True, timeout=10, check=True).stdout.split("\n")[0]
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    """Hardware, driver and library versions of this run."""
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        **{name: _version(name) for name in ("triton", "timm", "numpy", "anomalib", "onnxruntime", "openvino")},
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=props.name,
            gpu_memory_mib=props.total_memory // (1 << 20),
            multiprocessors=props.multi_processor_count,
            driver=_driver(),
            cuda_runtime=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return env


def _error(value: float) -> str:
    if value != value:  # NaN: an output was NaN (anomalib's module.half() overflows the squared distances)
        return "nan"
    return f"{value:.1e}" if value > 0 else "0"


def significant(value: float) -> str:
    """A figure with its significant digits: 12,345 and 123 whole, 0.15 and 0.0042 to three digits (a fixed number
    of decimals shows 0.15 img/s as 0, and 0.004 ms as 0.00)."""
    if value != value:
        return "nan"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def display_row(row: dict[str, Any]) -> dict[str, str]:
    """One row of the printed table: the figures as short strings."""
    gpu = row["peak_gpu_mib"]
    return {
        "backend": row["backend"],
        "precision": row["precision"],
        "search": row["search"],
        "input": f"{row['height']}x{row['width']}",
        "bank": f"{row['bank']:,}",
        "batch": str(row["batch"]),
        "copies": row["copies"],
        "median ms": f"{row['median_ms']:.3f}",
        "p90 ms": f"{row['p90_ms']:.3f}",
        "p99 ms": f"{row['p99_ms']:.3f}",
        "img/s": significant(row["img_per_s"]),
        "GPU MiB": "-" if gpu != gpu else f"{gpu:,.0f}",
        "host MiB": f"{row['host_rss_mib']:,.0f}",
        "max Δscore": _error(row["max_score_error"]),
        "max Δmap": _error(row["max_map_error"]),
        "labels": f"{row['labels_equal']}/{row['labels_compared']}",
    }


def write_results(
    out_dir: Path,
    settings: BenchSettings,
    env: dict[str, Any],
    rows: Sequence[dict[str, Any]],
    notices: list[str],
    *,
    checkpoint: Path | None = None,
) -> None:
    """bench.json (everything), bench.csv (rows) and bench.md (table with its environment).

    With a checkpoint the synthetic model's settings (bank rows, backbone) mean nothing and are left out; each
    row records the model's real bank, backbone and input size.
    """
    recorded = asdict(settings)
    if checkpoint is not None:
        recorded = {key: value for key, value in recorded.items() if key not in ("banks", "backbone")}
        recorded["checkpoint"] = checkpoint
    write_json(out_dir / "bench.json", {"environment": env, "settings": recorded, "rows": rows, "notices": notices})
    write_csv(out_dir / "bench.csv", list(rows))
    lines = [f"# patchcore-trt bench, {env['date']}", ""]
    lines += [f"- {key}: {value}" for key, value in env.items() if key != "date" and value is not None]
    lines += [
        "",
        "Latency: one batch, host clock, GPU synchronised after each batch; img/s = batch / median.",
        "Errors: against the FP32 deploy model (TF32 off) on the same images, normalised outputs.",
        "",
        markdown_table([display_row(r) for r in rows]),
    ]
    lines += [f"- {text}" for text in notices]
    write_text_atomic(out_dir / "bench.md", "\n".join(lines) + "\n")


def _label(row: dict[str, Any]) -> str:
    search = "" if row["search"] == "-" else f" {row['search']}"
    return f"{row['backend']} {row['precision']}{search} ({row['copies']})"


def write_chart(out_dir: Path, rows: Sequence[dict[str, Any]]) -> Path | None:
    """bench.png: ``chart_figure`` of ``rows`` (None: no rows)."""
    from matplotlib import pyplot as plt

    figure = chart_figure(rows)
    if figure is None:
        return None
    path = out_dir / "bench.png"
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
    return path


def chart_figure(rows: Sequence[dict[str, Any]]) -> Any:
    """Batch-1 latency and largest-batch throughput per input size, one labelled bar per variant (None: no rows)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    sizes = sorted({(r["height"], r["width"], r["bank"]) for r in rows})
    if not sizes:
        return None
    figure, axes = plt.subplots(2, len(sizes), figsize=(6.5 * len(sizes), 9), squeeze=False)
    for column, (height, width, bank) in enumerate(sizes):
        same = [r for r in rows if (r["height"], r["width"], r["bank"]) == (height, width, bank)]
        smallest, largest = min(r["batch"] for r in same), max(r["batch"] for r in same)
        for axis, batch, key, unit in (
            (axes[0][column], smallest, "median_ms", "ms per batch (median)"),
            (axes[1][column], largest, "img_per_s", "images / s"),
        ):
            chosen = [r for r in same if r["batch"] == batch]
            bars = axis.barh([_label(r) for r in chosen], [r[key] for r in chosen], color="tab:blue")
            axis.bar_label(bars, labels=[significant(r[key]) for r in chosen], padding=2, fontsize=8)
            axis.margins(x=0.15)
            axis.set_title(f"{height}x{width}, bank {bank:,}, batch {batch}")
            axis.set_xlabel(unit)
            axis.invert_yaxis()
    figure.tight_layout()
    return figure
