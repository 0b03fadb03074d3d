"""``patchcore-trt predict``: score images with a checkpoint, an ONNX file or an engine."""

from __future__ import annotations

from pathlib import Path

import typer

from patchcore_trt.cli import app
from patchcore_trt.cli._common import check_output_dir, check_output_file, err, out, progress
from patchcore_trt.errors import UserError


@app.command("predict")
def predict_command(
    model: Path = typer.Argument(..., help="A .ckpt (torch), .onnx (onnxruntime/openvino) or .engine (tensorrt)."),
    inputs: list[str] = typer.Argument(..., help="Image files, folders (searched recursively) or glob patterns."),
    backend: str | None = typer.Option(None, help="Runtime; default by file type: .ckpt torch, .onnx onnxruntime."),
    device: str | None = typer.Option(None, help="cpu, cuda or cuda:N; default: the backend's own (cuda for engines)."),
    batch_size: int = typer.Option(8, min=1, help="Images of equal size run together, up to this many."),
    json_path: Path | None = typer.Option(None, "--json", help="Write all results as JSON."),
    csv_path: Path | None = typer.Option(None, "--csv", help="Write all results as CSV."),
    visuals: Path | None = typer.Option(None, "--save-visuals", help="Write heatmap, overlay and mask PNGs here."),
    map_at_input_size: bool = typer.Option(
        False, "--map-at-input-size", help="(.ckpt) Return maps at the input resolution."
    ),
    backbone_dtype: str | None = typer.Option(
        None, help="(--backend cuda) Backbone arithmetic: fp16 (default), fp32, tf32, bf16."
    ),
    search: str | None = typer.Option(None, help="(--backend cuda) Nearest-neighbour search: exact or fast."),
    trust_pickled_code: bool = typer.Option(
        False, "--trust-pickled-code", help="DANGER: unpickle arbitrary objects. Only for checkpoints you trust."
    ),
) -> None:
    """Predict anomaly scores, labels and maps; exit code 1 if any input failed."""
    import numpy as np

    from patchcore_trt.images import collect_images
    from patchcore_trt.predict import ImageResult, predict_files
    from patchcore_trt.report import rich_table, save_visuals, write_csv, write_json
    from patchcore_trt.runtime import open_backend

    for output in (json_path, csv_path):
        check_output_file(output)
    check_output_dir(visuals)
    # Only what the user set goes to the backend; the registry refuses an option the backend does not take.
    given = {
        "map_at_input_size": map_at_input_size or None,
        "trust_pickled_code": trust_pickled_code or None,
        "backbone_dtype": backbone_dtype,
        "search": search,
    }
    loaded = open_backend(model, backend, device=device, **{k: v for k, v in given.items() if v is not None})

    paths, unmatched = collect_images(inputs)
    for item in unmatched:
        err.print(f"[yellow]warning:[/] {item}: no image files found", highlight=False)
    if not paths:
        raise UserError("no input images found in " + ", ".join(inputs))

    order = {path: index for index, path in enumerate(paths)}

    def finished(result: ImageResult, image: np.ndarray | None) -> None:
        bar.advance(task)
        if visuals is not None and image is not None and result.prediction is not None:
            # Folders often reuse file names (good/000.png, defect/000.png): keep the parent and the order.
            stem = visuals / f"{order[result.path]:04d}_{result.path.parent.name}_{result.path.stem}"
            save_visuals(image, result.prediction.anomaly_map[0, 0], result.prediction.pred_mask[0, 0], stem)

    with progress() as bar:
        task = bar.add_task(f"predicting ({loaded.name})", total=len(paths))
        results = predict_files(loaded, paths, batch_size=batch_size, on_result=finished)
    records = [result.record() for result in results]
    records += [ImageResult(path=Path(item), error="no image files found").record() for item in unmatched]
    shown = [{k: r[k] for k in ("file", "status", "score", "label", "error") if k in r} for r in records]
    out.print(rich_table(shown, title=f"{model.name} ({loaded.name})"))
    if visuals is not None:
        err.print(f"  heatmaps, overlays and masks in {visuals}", highlight=False)
    if json_path is not None:
        write_json(json_path, {"model": str(model), "backend": loaded.name, "results": records})
    if csv_path is not None:
        write_csv(csv_path, records)
    failed = sum(1 for record in records if record["status"] != "ok")
    anomalous = sum(1 for record in records if record.get("label") == "anomalous")
    err.print(f"{len(records) - failed} scored ({anomalous} anomalous), {failed} failed", highlight=False)
    if failed:
        raise typer.Exit(1)
