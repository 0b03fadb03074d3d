"""``patchcore-trt verify``: prove, on your own images, that every backend computes what anomalib computes."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from patchcore_trt.cli import app
from patchcore_trt.cli._common import (
    check_distinct,
    check_output_file,
    print_table,
    progress,
    step,
    summary_console,
    trust_option,
    version_option,
    warn,
)
from patchcore_trt.errors import UserError

if TYPE_CHECKING:
    from patchcore_trt.spec import PatchCoreSpec


@app.command("verify")
def verify_command(
    checkpoint: Path = typer.Argument(..., help="anomalib PatchCore checkpoint (.ckpt); anomalib must be installed."),
    inputs: list[str] = typer.Argument(..., help="Image files, folders or glob patterns."),
    onnx_path: Path | None = typer.Option(None, "--onnx", help="Exported ONNX to check (default: export one now)."),
    backends: str = typer.Option("torch,onnxruntime,openvino", help="Comma-separated backends to compare."),
    limit: int = typer.Option(50, min=1, help="Use at most this many images."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the figures as JSON."),
    report: Path | None = typer.Option(
        None, "--report", help="Write one self-contained HTML page: the parity table, the model, a panel per image."
    ),
    trust_pickled_code: bool = trust_option(),
    anomalib_version: str | None = version_option(),
) -> None:
    """Compare each backend with anomalib's AnomalibModule.forward; exit 1 if any misses the parity bar."""
    if checkpoint.suffix.lower() != ".ckpt":
        hint = f"; give the exported graph with --onnx {checkpoint}" if checkpoint.suffix.lower() == ".onnx" else ""
        raise UserError(f"{checkpoint}: verify needs the anomalib checkpoint (.ckpt) that anomalib ran{hint}")
    from patchcore_trt.runtime import backend_info, backend_names, check_device, check_gpu_present

    names = [name.strip() for name in backends.split(",") if name.strip()]
    unknown = [name for name in names if name not in backend_names()]
    if unknown or not names:
        raise UserError(f"--backends {backends!r}: choose from {', '.join(backend_names())}")
    for name in names:  # a GPU backend on a machine without one is refused before anomalib is loaded
        info = backend_info(name)
        check_gpu_present(info, check_device(info, None))
    check_output_file(json_path)
    check_output_file(report)
    check_distinct(json_path, report)
    from patchcore_trt.archive import check_checkpoint_file

    check_checkpoint_file(checkpoint)  # before torch and anomalib load
    from patchcore_trt.checkpoint import read_checkpoint
    from patchcore_trt.export import export_onnx
    from patchcore_trt.files import display_name
    from patchcore_trt.images import ImageError, collect_images, load_image, short_names
    from patchcore_trt.reference import AnomalibReference
    from patchcore_trt.report import write_json
    from patchcore_trt.verify import FOOTNOTE, backend_parity, json_rows, table_rows

    # Read safely first: a checkpoint that pickles code is refused here, before anomalib sees it.
    spec = read_checkpoint(checkpoint, trust_pickled_code=trust_pickled_code, anomalib_version=anomalib_version)
    if onnx_path is not None:
        _check_same_source(onnx_path, checkpoint, spec)
    paths, _ = collect_images(inputs)
    images, used, skipped = [], [], []
    for path in paths[:limit]:
        try:
            images.append(load_image(path))
            used.append(path)
        except ImageError as exc:
            warn(f"skipped {path}: {exc}")
            skipped.append((display_name(path), str(exc)))
    if not images:
        raise UserError("no readable input images found in " + ", ".join(inputs))
    with tempfile.TemporaryDirectory() as scratch:
        if onnx_path is None:
            with step("exporting a fresh ONNX to check"):
                onnx_path, _ = export_onnx(spec, Path(scratch) / "model.onnx")
        started = time.perf_counter()
        with step("building anomalib's reference"):
            anomalib = AnomalibReference.for_checkpoint(checkpoint, spec, trust_pickled_code=trust_pickled_code)
        with progress() as bar:
            bar.add_task(f"running anomalib and {len(names)} backends on {len(images)} images", total=None)
            rows, reference = backend_parity(
                checkpoint,
                onnx_path,
                images,
                names,
                trust_pickled_code=trust_pickled_code,
                anomalib_version=anomalib_version,
                reference=anomalib,
            )
        if report is not None:
            with step(f"writing the report {report}"):
                _write_report(report, checkpoint, onnx_path, rows, reference, images, used, skipped, started)
    summary = summary_console(json_path, report)
    shown = short_names(used, inputs)  # as predict names them: relative to the folder they were found in
    image_names = [shown[path] for path in used]
    print_table(table_rows(rows, image_names), f"parity vs anomalib's forward ({len(images)} images)", summary)
    summary.print(FOOTNOTE)
    summary.print(f"reference: {anomalib.description}")
    if json_path is not None:
        write_json(json_path, {"checkpoint": checkpoint, "images": used, "rows": json_rows(rows, image_names)})
    if not all(row.passed for row in rows if row.checked):
        raise typer.Exit(1)


def _check_same_source(onnx_path: Path, checkpoint: Path, spec: PatchCoreSpec) -> None:
    """The graph records the SHA-256 of the checkpoint it was exported from; from another file it must still
    compute this checkpoint's model (a copy saved again with the same model verifies), or it is refused."""
    from patchcore_trt.artifact import read_onnx_metadata
    from patchcore_trt.export import build_metadata
    from patchcore_trt.report import to_json

    metadata = read_onnx_metadata(onnx_path)
    recorded = metadata.source_checkpoint.get("sha256", "")
    if not recorded or recorded == spec.source_sha256:
        return
    expected = build_metadata(spec, map_at_input_size=metadata.map_at_input_size)
    fields = ("backbone", "layers", "bank_size", "embedding_dim", "num_neighbors", "model_size", "transform")
    differ = [
        name
        for name in (*fields, "postprocess")
        if to_json(getattr(metadata, name), indent=None) != to_json(getattr(expected, name), indent=None)
    ]
    if differ:
        raise UserError(
            f"{onnx_path} was exported from another checkpoint (SHA-256 {recorded}) than {checkpoint} (SHA-256 "
            f"{spec.source_sha256}) and computes another model ({', '.join(differ)} differ); give the ONNX exported "
            "from this checkpoint, or leave --onnx out to export one now"
        )


def _write_report(path, checkpoint, onnx_path, rows, reference, images, used, skipped, started) -> None:
    """The parity proof as one page, with anomalib's own maps drawn for every image checked."""
    from patchcore_trt.artifact import read_onnx_metadata
    from patchcore_trt.files import display_name, sha256_of
    from patchcore_trt.html_report import ReportData, metadata_rows, sheet_of_predictions, write_html_report
    from patchcore_trt.verify import FOOTNOTE, table_rows

    metadata = read_onnx_metadata(onnx_path)
    names = [display_name(item) for item in used]
    sheet, warnings = sheet_of_predictions(
        images,
        reference,
        names,
        threshold=metadata.image_threshold,
        pixel_threshold=metadata.postprocess.normalized_pixel_threshold,
        model_size=metadata.model_size,
    )
    checked = [row for row in rows if row.checked]
    data = ReportData(
        title=f"verify {checkpoint.name}: {'PASS' if all(row.passed for row in checked) else 'FAIL'}",
        model={
            "checkpoint": display_name(checkpoint),
            "checkpoint sha256": sha256_of(checkpoint),
            **metadata_rows(metadata, onnx_path),
        },
        counts={
            "images": len(images),
            "anomalous": int(reference.pred_label.sum()),
            "skipped": len(skipped),
            "backends passed": f"{sum(row.passed for row in checked)}/{len(checked)}",
        },
        timings={"verify": f"{time.perf_counter() - started:.1f} s"},
        threshold=metadata.image_threshold,
        parity_rows=table_rows(rows, names),
        parity_bar=FOOTNOTE + " Panels: anomalib's own forward.",
        failures=skipped,
        warnings=warnings,
        panels=sheet.panels(),
        images_total=sheet.total,
    )
    write_html_report(path, data)
