"""Parity of every CPU backend with anomalib's forward, for both backbones at 256 and 320 (README table).

Trains anomalib PatchCore (pre_trained=False) on the demo's generated data for each (backbone, size),
exports, and runs patchcore_trt.verify on the 12 test images (raw 300 x 340). Writes
benchmarks/results/cpu_parity.md and .json (with the versions and the commit); then
`python3 benchmarks/readme_tables.py` writes the README's table from the JSON.

    .venv/bin/python benchmarks/cpu_parity.py [WORK_DIR]
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

from patchcore_trt.checkpoint import read_checkpoint
from patchcore_trt.demo.training import TrainSettings, train_patchcore
from patchcore_trt.export import export_onnx
from patchcore_trt.files import write_text_atomic
from patchcore_trt.images import collect_images, load_image
from patchcore_trt.report import markdown_table, write_json
from patchcore_trt.synthetic_data import make_synthetic_dataset
from patchcore_trt.verify import FOOTNOTE, backend_parity, table_rows

CASES = (("wide_resnet50_2", 256), ("wide_resnet50_2", 320), ("resnet18", 256), ("resnet18", 320))
RESULTS = Path(__file__).parent / "results"


def main(work_dir: Path) -> None:
    dataset = make_synthetic_dataset(work_dir / "data")
    paths, _ = collect_images([str(dataset.root / "test")])
    images = [load_image(path) for path in paths]
    sections, payload = [], []
    for backbone, size in CASES:
        settings = TrainSettings(backbone=backbone, image_size=(size, size))
        checkpoint = train_patchcore(dataset, work_dir / f"train_{backbone}_{size}", settings)
        spec = read_checkpoint(checkpoint)
        onnx_path, _ = export_onnx(spec, work_dir / f"{backbone}_{size}.onnx")
        rows, reference = backend_parity(checkpoint, onnx_path, images)
        title = f"{backbone}, model size {size}, bank {spec.bank_size} x {spec.embedding_dim}"
        sections.append(f"**{title}**\n\n{markdown_table(table_rows(rows))}")
        spread = float(np.ptp(reference.pred_score))
        payload.append(
            {"backbone": backbone, "size": size, "bank": spec.bank_size, "score_spread": spread, "rows": rows}
        )
        print(title, flush=True)
        print(markdown_table(table_rows(rows)), flush=True)
    header = (
        f"{len(images)} generated test images (raw 300 x 340), anomalib 2.7.0, CPU "
        f"({platform.processor() or 'x86-64'}, Python {platform.python_version()}). "
        "Command: `.venv/bin/python benchmarks/cpu_parity.py`. CPU ms/img are indicative (shared 2-core machine).\n\n"
    )
    write_text_atomic(RESULTS / "cpu_parity.md", header + "\n".join(sections) + "\n" + FOOTNOTE + "\n")
    write_json(RESULTS / "cpu_parity.json", {"versions": versions(), "commit": commit(), "cases": payload})


def versions() -> dict[str, str]:
    import importlib.metadata

    names = ("patchcore-trt", "anomalib", "torch", "onnxruntime", "openvino")
    return {name: importlib.metadata.version(name) for name in names} | {"python": platform.python_version()}


def commit() -> str:
    """The commit the figures were measured at (with '+changes' where the work tree differed from it)."""
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout.strip()
    return (head or "unknown") + ("+changes" if dirty else "")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/cpu_parity"))
