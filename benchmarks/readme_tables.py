"""The result tables of README.md and docs/, written from the committed result files, so no figure is hand-typed.

Each table sits in a marked region of a Markdown file:

    <!-- table:NAME -->
    ...generated...
    <!-- /table -->

and NAME is one of TABLES below (each names its source file in benchmarks/results/). Run from the repository root:

    python3 benchmarks/readme_tables.py           # rewrite every marked region
    python3 benchmarks/readme_tables.py --check   # exit 1 if a region differs from what its source gives

tests/test_readme_tables.py runs the check: a README figure that is not its result file's is a failing test.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCUMENTS = (ROOT / "README.md", ROOT / "docs" / "serving.md")
REGION = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def _count(value: float) -> str:
    return f"{value:,.0f}"


def served_loads(results: dict) -> list[dict[str, float]]:
    """Per client count: Triton's own count of the images it ran in the window (its batch histogram) per second,
    the mean batch of that histogram, the clients' latencies, and the in-process figures at that batch."""
    in_process = {row["batch"]: row for row in results["in_process"]}
    gpus = len(results["settings"]["gpus"])
    rows = []
    for load in results["loads"]:
        histogram = {int(size): int(count) for size, count in load["batches"].items()}
        images = sum(size * count for size, count in histogram.items())
        mean_batch = images / sum(histogram.values())
        local = in_process[max(1, round(mean_batch))]["images_per_s"] * gpus
        served = images / load["seconds"]
        rows.append(
            {
                "clients": load["clients"],
                "served": served,
                "p50": load["p50_ms"],
                "p99": load["p99_ms"],
                "mean_batch": mean_batch,
                "in_process": local,
                "ratio": served / local,
                "p99_ratio": load["p99_ms"] / in_process[1]["p50_ms"],
            }
        )
    return rows


def serve_table(source: str = "h200_serve.json") -> str:
    results = json.loads((RESULTS / source).read_text())
    environment = results["environment"]
    parity = results["served_vs_in_process"]
    lines = [
        "| clients | served img/s | p50 ms | p99 ms | mean batch | in-process img/s at that batch "
        "| served / in-process (target 80%) | p99 / in-process batch 1 (target 4x) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in served_loads(results):
        lines.append(
            f"| {row['clients']} | {_count(row['served'])} | {row['p50']:.2f} | {row['p99']:.2f} | "
            f"{row['mean_batch']:.1f} | {_count(row['in_process'])} | {row['ratio']:.0%} | {row['p99_ratio']:.1f}x |"
        )
    one = results["in_process"][0]
    lines += [
        "",
        *textwrap.wrap(
            f"From [benchmarks/results/{source}](benchmarks/results/{source}) ({', '.join(environment['gpus'])}, torch "
            f"{environment['torch']}, CUDA {environment['cuda']}): served img/s is Triton's own count of the images it "
            f"ran in each {results['settings']['seconds']:.0f} s window (its batch histogram), mean batch from the "
            f"same histogram; latencies as the clients measured them. In-process batch {one['batch']}: "
            f"{one['p50_ms']:.3f} ms. Served vs in-process on the same frame: "
            f"max |d score| {parity['max_abs_score']}, "
            f"max |d map| {parity['max_abs_map']}.",
            width=116,
            break_on_hyphens=False,
        ),
    ]
    return "\n".join(lines) + "\n"


def _pair(figures: dict) -> str:
    return f"{figures['max_score_error']:.1e} / {figures['max_map_error']:.1e}"


def cpu_parity_table(source: str = "cpu_parity.json") -> str:
    data = json.loads((RESULTS / source).read_text())
    cases = data["cases"] if isinstance(data, dict) else data  # files before versions were recorded: a bare list
    lines = [
        "| backbone | model size | bank | torch (deploy model) | ONNX Runtime | OpenVINO | labels "
        "| anomalib predict* vs forward |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        rows = {row["name"]: row["figures"] for row in case["rows"]}
        backends = [rows[name] for name in ("torch", "onnxruntime", "openvino")]
        worst = min(backends, key=lambda figures: figures["labels_equal"] - figures["labels_compared"])
        lightning = rows["anomalib predict*"]
        lines.append(
            f"| {case['backbone']} | {case['size']} | {case['bank']} | "
            + " | ".join(_pair(figures) for figures in backends)
            + f" | {worst['labels_equal']}/{worst['labels_compared']} | {_pair(lightning)}, labels "
            f"{lightning['labels_equal']}/{lightning['labels_compared']} |"
        )
    recorded = (
        f"versions {', '.join(f'{name} {version}' for name, version in data['versions'].items())}, commit "
        f"{data['commit']}"
        if isinstance(data, dict)
        else "written before the script recorded versions and commit (anomalib 2.7.0 per cpu_parity.md)"
    )
    lines += ["", f"From [benchmarks/results/{source}](benchmarks/results/{source}): {recorded}."]
    return "\n".join(lines) + "\n"


def line_products_table(source: str = "cpu_line_products.json") -> str:
    """A line against separate models: memory of the server's process group and mixed-traffic throughput."""
    data = json.loads((RESULTS / source).read_text())
    settings, env = data["settings"], data["environment"]
    lines = [
        "| served as | products | memory (PSS) MB | img/s (clients' count) | img/s (Triton's count) | p50 ms | p99 ms "
        "| failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        measured = "img_s" in row
        figures = (
            [f"{row['img_s']:.1f}", f"{row['triton_img_s']:.1f}",
             f"{row['p50_ms']:.0f}", f"{row['p99_ms']:.0f}", str(row["failures"])]
            if measured else ["-"] * 5
        )  # fmt: skip
        lines.append(f"| {row['serving']} | {row['products']} | {row['pss_mb']:,.0f} | " + " | ".join(figures) + " |")
    lines += [
        "",
        f"From [benchmarks/results/{source}](benchmarks/results/{source}) (`{env['command']}` at commit "
        f"{env['commit'][:10]}, {env['machine']}, torch {env['versions'].get('torch')}): resnet18 at 256 x 256, "
        f"M = {settings['bank']:,} rows per product, CPU instances, {settings['clients']} clients each sending one "
        f"frame at a time to a random product, a {settings['seconds']:g} s window after {settings['warmup']:g} s "
        "of warm-up; memory is the proportional set size of tritonserver and all its model processes.",
    ]
    return "\n".join(lines) + "\n"


TABLES: dict[str, Callable[[], str]] = {
    "serve": serve_table,
    "cpu_parity": cpu_parity_table,
    "line_products": line_products_table,
}


def render(text: str, *, relative_to: Path = ROOT) -> str:
    """``text`` with every marked region rewritten from its source; links made relative to the file's folder."""
    prefix = "../" * len(relative_to.relative_to(ROOT).parts)

    def region(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in TABLES:
            raise SystemExit(f"error: unknown table {name!r}; the tables are {', '.join(TABLES)}")
        body = TABLES[name]().replace("](benchmarks/", f"]({prefix}benchmarks/")
        return match[1] + body + match[4]

    return REGION.sub(region, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 where a region differs from its source")
    args = parser.parse_args()
    stale = []
    for document in DOCUMENTS:
        text = document.read_text()
        fresh = render(text, relative_to=document.parent)
        if fresh != text:
            stale.append(document)
            if not args.check:
                document.write_text(fresh)
    if args.check and stale:
        print(f"error: generated tables differ from their sources in {', '.join(map(str, stale))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
