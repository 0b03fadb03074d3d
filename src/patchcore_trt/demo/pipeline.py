"""The built-in demo: generated data -> anomalib training -> export -> predict -> parity-and-speed table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from patchcore_trt.artifact import read_onnx_metadata
from patchcore_trt.checkpoint import read_checkpoint
from patchcore_trt.demo.training import TrainSettings, train_patchcore
from patchcore_trt.export import export_onnx
from patchcore_trt.html_report import ReportData, metadata_rows, sheet_of_predictions, write_html_report
from patchcore_trt.images import collect_images, load_image
from patchcore_trt.report import write_json
from patchcore_trt.steps import Step, quiet
from patchcore_trt.synthetic_data import make_synthetic_dataset
from patchcore_trt.verify import FOOTNOTE, BackendParity, backend_parity, table_rows
from patchcore_trt.visuals import save_visuals


@dataclass(frozen=True)
class DemoResult:
    checkpoint: Path
    onnx: Path
    rows: list[BackendParity]
    test_images: list[Path]
    visuals_dir: Path
    report: Path
    html_report: Path

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows if row.checked)


def run_demo(work_dir: Path, settings: TrainSettings, *, step: Step = quiet) -> DemoResult:
    """Run every stage in ``work_dir``; each runs inside ``step(title)`` (the CLI logs start, end and time)."""
    work_dir = Path(work_dir)
    with step(f"generating an inspection data set in {work_dir / 'data'}"):
        dataset = make_synthetic_dataset(work_dir / "data")
    with step(f"training anomalib PatchCore ({settings.backbone}, pre_trained={settings.pre_trained})"):
        checkpoint = train_patchcore(dataset, work_dir / "train", settings)
    with step(f"exporting and self-checking {work_dir / 'model.onnx'}"):
        onnx_path, checks = export_onnx(read_checkpoint(checkpoint), work_dir / "model.onnx")
    test_images, _ = collect_images([str(dataset.root / "test")])
    images = np.stack([load_image(path) for path in test_images])
    with step(f"running anomalib and every CPU backend on {len(images)} test images"):
        rows, reference = backend_parity(checkpoint, onnx_path, images)
    metadata = read_onnx_metadata(onnx_path)
    map_threshold = metadata.postprocess.normalized_pixel_threshold
    names = [f"{path.parent.name}/{path.name}" for path in test_images]
    sheet, warnings = sheet_of_predictions(
        images,
        reference,
        names,
        threshold=metadata.image_threshold,
        pixel_threshold=map_threshold,
        model_size=metadata.model_size,
    )
    visuals_dir = work_dir / "visuals"
    for index, path in enumerate(test_images):
        stem = visuals_dir / f"{path.parent.name}_{path.stem}"
        anomaly_map, mask = reference.anomaly_map[index, 0], reference.pred_mask[index, 0]
        save_visuals(images[index], anomaly_map, mask, stem, pixel_threshold=map_threshold)
    html_report = write_html_report(
        work_dir / "report.html",
        ReportData(
            title=f"patchcore-trt demo: {settings.backbone} at {settings.image_size[0]}x{settings.image_size[1]}",
            model=metadata_rows(metadata, onnx_path),
            counts={"test images": len(images), "anomalous": int(reference.pred_label.sum())},
            timings={row.name: f"{row.ms_per_image:.0f} ms/img" for row in rows if row.ms_per_image is not None},
            threshold=metadata.image_threshold,
            parity_rows=table_rows(rows),
            parity_bar=FOOTNOTE + " Panels: anomalib's own forward.",
            warnings=warnings,
            panels=sheet.panels(),
            images_total=sheet.total,
        ),
    )
    report = work_dir / "demo_report.json"
    write_json(
        report,
        {
            "checkpoint": checkpoint,
            "onnx": onnx_path,
            "settings": settings,
            "export_checks": checks,
            "parity_vs_anomalib_forward": [
                {"backend": row.name, "ms_per_image": row.ms_per_image, **row.figures.__dict__} for row in rows
            ],
            "scores": {str(path): float(score) for path, score in zip(test_images, reference.pred_score, strict=True)},
        },
    )
    return DemoResult(checkpoint, onnx_path, rows, test_images, visuals_dir, report, html_report)
