# ruff: noqa: E501  (a Markdown writer: table rows are long strings)
"""benchmarks/h200_table.py's JSON -> a Markdown page: targets met or missed, parity, memory, every row, and the
per-stage profile of each missed target.

Usage: python3 benchmarks/make_h200_table.py RESULTS.json [OUT.md]   (default OUT: RESULTS with .md)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

WORKLOAD_NAMES = {
    "256-16k": "256², M=16,384",
    "512-32k": "512², M=32,768",
    "512-262k": "512², M=262,144",
    "256-1M": "256², M=1,048,576",
}
METRICS = {"latency_ms": "batch 1, host latency", "img_per_s": "throughput"}
PEERS = (("anomalib", "fp32"), ("anomalib", "tf32"), ("anomalib-compile", "fp32"), ("onnxruntime-cuda", "fp32"))
PEER_NAMES = {
    ("anomalib", "fp32"): "anomalib eager FP32",
    ("anomalib", "tf32"): "anomalib eager, PyTorch defaults (TF32 conv)",
    ("anomalib-compile", "fp32"): "anomalib torch.compile reduce-overhead FP32",
    ("onnxruntime-cuda", "fp32"): "ONNX Runtime CUDA EP FP32 (TF32 off)",
}
PARITY = {"exact": (1e-5, 1e-4), "fast": (1e-3, None)}


def best(rows: list[dict[str, Any]], metric: str, copies: str = "host") -> dict[str, Any] | None:
    """Batch-1 latency, or the best throughput over batches > 1 (as h200_table.best_row judges targets)."""
    if metric == "latency_ms":
        return next((r for r in rows if r["batch"] == 1 and r["copies"] == copies), None)
    chosen = [r for r in rows if r["copies"] == copies and r["batch"] > 1]
    return max(chosen, key=lambda r: r["img_per_s"], default=None)


def value(row: dict[str, Any] | None, metric: str) -> str:
    if row is None:
        return "-"
    if metric == "latency_ms":
        return f"{row['median_ms']:.3f} ms (p99 {row['p99_ms']:.3f})"
    return f"{row['img_per_s']:,.0f} img/s (b{row['batch']})"


def is_met(row: dict[str, Any], metric: str, target: float) -> bool:
    return row["median_ms"] <= target if metric == "latency_ms" else row["img_per_s"] >= target


def error(x: float) -> str:
    if x != x:
        return "nan"
    return f"{x:.1e}" if x > 0 else "0"


def parity_ok(row: dict[str, Any], mode: str) -> bool:
    score_bar, map_bar = PARITY[mode]
    ok = row["max_score_error"] <= score_bar and row["label_flips"] == 0
    return ok and (map_bar is None or row["max_map_error"] <= map_bar)


def render(data: dict[str, Any]) -> str:
    rows = data["rows"]
    calls = data.get("calls", [])
    env = calls[-1]["environment"] if calls else {}
    targets = {tuple(key.split("|")): value for key, value in data.get("targets", {}).items()}
    lines = ["# patchcore-trt on an NVIDIA H200: the cuda backend beside its peers, against the targets", ""]
    keys = ("gpu", "driver", "cuda_runtime", "cudnn", "torch", "triton", "timm", "anomalib", "onnxruntime", "python")

    # A version that differs between calls (onnxruntime-gpu is unpacked only for its own call) lists every value.
    def versions_of(key: str) -> str:
        seen = dict.fromkeys(str(c["environment"].get(key)) for c in calls if c["environment"].get(key) is not None)
        return " / ".join(seen)

    lines.append("- " + ", ".join(f"{k} {versions_of(k)}" for k in keys if env.get(k) is not None))
    lines.append(
        f"- cpu: {env.get('cpu')} ({env.get('cpu_cores')} cores); nvidia-smi at start: {env.get('nvidia_smi')}"
    )
    commits = sorted({c["environment"].get("git_commit") for c in calls if c["environment"].get("git_commit")})
    lines.append(
        f"- git commit: {', '.join(commits) or 'unknown'}; measured {', '.join(c['environment']['date'] for c in calls)}"
    )
    spans = "; ".join(f"phases {c['phases']}, {c.get('finished_s', '?')} s" for c in calls)
    lines += [
        f"- device calls: {len(calls)} ({spans})",
        "",
        "wide_resnet50_2 layers 2+3, synthetic model (random weights, texture bank), num_neighbors 9. Latency: one",
        "batch, uint8 images from host memory in, score and map in host memory out, GPU synchronised after each batch,",
        "host clock, median (p99) of up to 100 batches after warm-up, rotating over distinct inputs. Throughput: batch /",
        "median batch latency, best host-to-host batch. Errors: against anomalib's own FP32 forward (TF32 off) on the",
        "same fresh images (half with a defect).",
        "",
        "## Targets",
        "",
        "| workload | metric | target exact / fast | cuda exact | | cuda fast | | anomalib eager FP32 | anomalib compile | ORT CUDA EP |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (workload, metric), target in targets.items():
        same = [r for r in rows if r["workload"] == workload]
        cells = []
        for mode in ("exact", "fast"):
            row = best([r for r in same if r["subject"] == f"cuda-{mode}"], metric)
            cells += [
                value(row, metric),
                "-" if row is None else ("**met**" if is_met(row, metric, target[mode]) else "**missed**"),
            ]
        peers = [best([r for r in same if r["subject"] == s and r["precision"] == "fp32"], metric) for s in
                 ("anomalib", "anomalib-compile", "onnxruntime-cuda")]  # fmt: skip
        lines.append(
            f"| {WORKLOAD_NAMES.get(workload, workload)} | {METRICS[metric]} | {target['exact']:,} / {target['fast']:,} | "
            + " | ".join(cells)
            + " | "
            + " | ".join(value(p, metric) for p in peers)
            + " |"
        )
    lines += ["", "Device-resident (inputs and outputs on the GPU) for comparison:", ""]
    lines += ["| workload | metric | cuda exact | cuda fast |", "|---|---|---|---|"]
    for (workload, metric), _ in targets.items():
        same = [r for r in rows if r["workload"] == workload]
        cells = [
            value(best([r for r in same if r["subject"] == f"cuda-{m}"], metric, "device"), metric)
            for m in ("exact", "fast")
        ]
        lines.append(f"| {WORKLOAD_NAMES.get(workload, workload)} | {METRICS[metric]} | " + " | ".join(cells) + " |")

    lines += ["", "## Parity against anomalib's FP32 forward", "",
              "Bars: exact |d score| <= 1e-5, |d map| <= 1e-4, no label flips; fast |d score| <= 1e-3, no label flips.",
              "", "| workload | subject | rows | max \\|d score\\| | max \\|d map\\| | label flips (worst row) | bar |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for workload in WORKLOAD_NAMES:
        for subject in ("cuda-exact", "cuda-fast", "anomalib", "anomalib-compile", "onnxruntime-cuda"):
            for precision in ("exact", "fast", "fp32", "tf32"):
                chosen = [
                    r
                    for r in rows
                    if r["workload"] == workload and r["subject"] == subject and r["precision"] == precision
                ]
                if not chosen:
                    continue
                score = max(r["max_score_error"] for r in chosen)
                map_error = max(r["max_map_error"] for r in chosen)
                worst = max(chosen, key=lambda r: r["label_flips"])  # rows share images: the worst row, not a sum
                flips, compared = worst["label_flips"], worst["labels_compared"]
                bar = "-"
                if subject.startswith("cuda-"):
                    bar = "met" if all(parity_ok(r, precision) for r in chosen) else "**missed**"
                name = subject if subject.startswith("cuda") else f"{subject} {precision}"
                lines.append(
                    f"| {WORKLOAD_NAMES[workload]} | {name} | {len(chosen)} | {error(score)} | {error(map_error)} | "
                    f"{flips} of {compared} | {bar} |"
                )

    lines += ["", "## GPU memory at M=1,048,576 (torch.cuda.max_memory_allocated)", ""]
    big = [r for r in rows if r["workload"] == "256-1M"]
    if big:
        fp32 = big[0]["bank_fp32_mib"]
        lines += [f"Bank: FP32 {fp32:,.0f} MiB; one FP32 + one FP16 copy = {1.5 * fp32:,.0f} MiB. A row meets the rule",
                  "when its peak holds no further low-precision copy: peak < FP32 + 2 x FP16 bank.", "",
                  "| subject | batch | copies | peak while timing, MiB | rule while serving | peak while building, MiB | rule while building |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in big:
            build = r.get("build_peak_gpu_mib")
            cuda = r["subject"].startswith("cuda")
            serving = ("met" if r["peak_gpu_mib"] < 2 * fp32 else "**missed**") if cuda else "-"
            building = ("met" if build < 2 * fp32 else "**missed**") if cuda and build is not None else "-"
            name = r["subject"] if cuda else f"{r['subject']} {r['precision']}"
            lines.append(
                f"| {name} | {r['batch']} | {r['copies']} | {r['peak_gpu_mib']:,.0f} | {serving} | "
                f"{'-' if build is None else f'{build:,.0f}'} | {building} |"
            )

    lines += ["", "## Every row", "",
              "| workload | subject | precision | copies | batch | median ms | p99 ms | img/s | d score | d map | flips | peak GPU MiB | notes |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        notes = []
        if "compile_s" in r:
            notes.append(f"compile {r['compile_s']} s")
        if "build_s" in r:
            notes.append(f"build {r['build_s']} s")
        if r["subject"] == "onnxruntime-cuda":
            notes.append("ORT's own allocations are not in torch's peak")
        lines.append(
            f"| {WORKLOAD_NAMES.get(r['workload'], r['workload'])} | {r['subject']} | {r['precision']} | {r['copies']} | "
            f"{r['batch']} | {r['median_ms']:.3f} | {r['p99_ms']:.3f} | {r['img_per_s']:,.0f} | "
            f"{error(r['max_score_error'])} | {error(r['max_map_error'])} | {r['label_flips']} | "
            f"{r['peak_gpu_mib']:,.0f} | {'; '.join(notes)} |"
        )

    profiles = data.get("profiles", [])
    if profiles:
        lines += ["", "## Where the time goes, for each missed target", "",
                  "torch.profiler over eager forwards (GPU kernel time per stage, ms per batch) beside the CUDA-graph",
                  "replay (CUDA events, device-resident) and the host median. 'backbone' and 'embedding' split the",
                  "backbone+embed range by kernel name (convolutions and their epilogues vs pooling, upsampling,",
                  "concatenation, casts).", "",
                  "| target | host median ms | graph replay ms | eager GPU ms | preprocess | backbone | embedding | search | score+map | other |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for p in profiles:
            if "stages_ms" not in p:
                lines.append(f"| {p['id']} | {p['host_median_ms']:.3f} | profile failed: {p.get('error')} |")
                continue
            stages = p["stages_ms"]
            cells = [
                f"{stages.get(s, 0.0):.3f}"
                for s in ("preprocess", "backbone", "embedding", "search", "score+map", "other")
            ]
            target = f"{p['id']} ({METRICS[p['metric']]} {p['target']:,})"
            lines.append(
                f"| {target} | {p['host_median_ms']:.3f} | {p['graph_replay_ms']:.3f} | {p['eager_gpu_ms']:.3f} | "
                + " | ".join(cells)
                + " |"
            )
        for p in profiles:
            if p.get("top_kernels"):
                lines += ["", f"Top kernels, {p['id']}:", ""]
                lines += [f"- {k['ms']:.3f} ms [{k['stage']}] {k['kernel']}" for k in p["top_kernels"][:8]]
    done = {r["id"] for r in rows}
    notices = [text for text in data.get("notices", []) if text.split(":", 1)[0] not in done]  # later calls ran them
    notices = list(dict.fromkeys(text.split(" (budget:")[0] for text in notices))
    if notices or data.get("annotations"):
        lines += ["", "## Notes from the run", ""] + [f"- {text}" for text in data.get("annotations", []) + notices]
    return "\n".join(lines) + "\n"


def main() -> None:
    source = Path(sys.argv[1])
    target = Path(sys.argv[2]) if len(sys.argv) > 2 else source.with_suffix(".md")
    target.write_text(render(json.loads(source.read_text())))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
