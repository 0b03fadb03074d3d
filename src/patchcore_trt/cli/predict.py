"""``patchcore-trt predict``: score images with a checkpoint, an ONNX file or an engine.

Results go to the files as they come (JSON, CSV, heatmaps), so memory stays flat over any number of images and
Ctrl-C keeps everything scored so far; the terminal gets a summary, the files every row.
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import typer

from patchcore_trt.cli import app
from patchcore_trt.cli._common import (
    check_distinct,
    check_output_dir,
    check_output_file,
    err,
    progress,
    summary_console,
    trust_option,
    version_option,
    warn,
)
from patchcore_trt.errors import UserError


@app.command("predict")
def predict_command(
    arguments: list[str] = typer.Argument(
        ...,
        metavar="[MODEL] INPUTS...",
        help="MODEL: a .ckpt (torch), .onnx (onnxruntime/openvino) or .engine (tensorrt); none with --server. "
        "INPUTS: image files, folders (searched recursively) or glob patterns.",
    ),
    server: str | None = typer.Option(
        None, "--server", help="Score on a Triton server (http://HOST:8000 or grpc://HOST:8001) instead of a MODEL."
    ),
    model_name: str | None = typer.Option(None, "--model", help="(--server) The served model; default: its only one."),
    concurrency: int = typer.Option(1, "--concurrency", min=1, max=256, help="(--server) Requests in flight at once."),
    backend: str | None = typer.Option(None, help="Runtime; default by file type: .ckpt torch, .onnx onnxruntime."),
    device: str | None = typer.Option(None, help="cpu, cuda or cuda:N; default: the backend's own (cuda for engines)."),
    batch_size: int = typer.Option(8, min=1, max=1024, help="Images of equal size run together, up to this many."),
    json_path: Path | None = typer.Option(None, "--json", help="Write every result, with the run's header, as JSON."),
    csv_path: Path | None = typer.Option(None, "--csv", help="Write every result as CSV."),
    visuals: Path | None = typer.Option(
        None,
        "--save-visuals",
        help="Write a panel (image | map | mask | overlay) and heatmap, overlay, mask PNGs here.",
    ),
    report: Path | None = typer.Option(
        None, "--report", help="Write one self-contained HTML page: model, counts, timings, failures, panels by score."
    ),
    top: int = typer.Option(10, min=0, help="Show this many most anomalous images (all rows are in the files)."),
    map_at_input_size: bool = typer.Option(
        False, "--map-at-input-size", help="(.ckpt) Return maps at the input resolution."
    ),
    mode: str | None = typer.Option(
        None, help="(--backend cuda) exact (default: anomalib's FP32 results) or fast (FP16 backbone)."
    ),
    backbone_dtype: str | None = typer.Option(
        None, help="(--backend cuda) Override the mode's backbone arithmetic: fp32, tf32, fp16, bf16."
    ),
    search: str | None = typer.Option(None, help="(--backend cuda) Nearest-neighbour search: exact or fast."),
    trust_pickled_code: bool = trust_option(),
    anomalib_version: str | None = version_option(),
) -> None:
    """Predict anomaly scores, labels and maps; exit code 1 if any input failed."""
    from patchcore_trt.images import collect_images, short_names
    from patchcore_trt.runtime import check_request, open_backend

    # Only what the user set goes to the backend; the registry refuses an option the backend does not take.
    given = {
        "map_at_input_size": map_at_input_size or None,
        "trust_pickled_code": trust_pickled_code or None,
        "anomalib_version": anomalib_version,
        "mode": mode,
        "backbone_dtype": backbone_dtype,
        "search": search,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if server is None:
        if len(arguments) < 2:
            raise UserError("predict needs a MODEL and at least one input (or --server URL and inputs)")
        model, inputs = Path(arguments[0]), arguments[1:]
        if model_name is not None or concurrency != 1:
            raise UserError("--model and --concurrency apply to --server")
        check_request(model, backend, device=device, **given)  # a wrong MODEL is answered before inputs are searched
    else:
        model, inputs = None, arguments
        local = [flag for flag, value in (("--backend", backend), ("--device", device)) if value is not None]
        if local or given:
            flags = ", ".join(local + ["--" + k.replace("_", "-") for k in given])
            raise UserError(f"{flags}: for a local MODEL; the server's model carries its own settings")
    paths, unmatched = collect_images(inputs)
    for output in (json_path, csv_path, report):
        check_output_file(output, protected=[p for p in (model, *paths) if p is not None])
    check_distinct(json_path, csv_path, report)
    check_output_dir(visuals)
    if server is None:
        loaded = open_backend(model, backend, device=device, **given)
    else:
        from patchcore_trt.serve.client import TritonBackend

        loaded = TritonBackend(server, model=model_name, concurrency=concurrency)
        model = Path(loaded.model)
        batch_size = max(batch_size, concurrency)  # a batch is what the requests in flight share
    for item in unmatched:
        warn(f"{item}: no image files found")
    if not paths:
        raise UserError("no input images found in " + ", ".join(inputs))
    with loaded:
        names = short_names(paths, inputs)
        _run(loaded, model, paths, names, unmatched, batch_size, json_path, csv_path, visuals, report, top)
        if getattr(loaded, "quantized", 0):
            warn(f"{loaded.quantized} image(s) were not 8-bit and were rounded to 8 bits for the server's uint8 model")


def _header(loaded: object, model: Path, device: str) -> dict[str, object]:
    import importlib.metadata
    import platform

    import patchcore_trt
    from patchcore_trt.files import sha256_of

    versions = {}
    for package in ("numpy", "onnxruntime", "openvino", "torch", "tensorrt", "tensorrt_rtx"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    if hasattr(loaded, "describe"):  # a model on a Triton server: its file is there, described by the server
        described = {"file": model, **loaded.describe(), "backend": loaded.name, "device": device}
    else:
        described = {
            "file": model,
            "sha256": sha256_of(model),
            "backend": loaded.name,
            "device": device,
            "image_threshold": loaded.image_threshold,
            "postprocess": loaded.postprocess,
        }
    return {
        "tool": {"name": "patchcore-trt", "version": patchcore_trt.__version__, "python": platform.python_version()},
        "versions": versions,
        "model": described,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _run(loaded, model, paths, names, unmatched, batch_size, json_path, csv_path, visuals, report, top) -> None:
    from patchcore_trt.html_report import ContactSheet
    from patchcore_trt.predict import RECORD_FIELDS, ImageResult, predict_files
    from patchcore_trt.report import CsvResults, JsonResults
    from patchcore_trt.visuals import DOWNSCALE_LIMIT, downscale_warning, pixel_threshold, render_panel

    threshold = loaded.image_threshold
    map_threshold = pixel_threshold(loaded.postprocess)
    # The header hashes the model file: only when a file that shows it is asked for.
    header = _header(loaded, model, loaded.device) if json_path is not None or report is not None else {}
    sheet = ContactSheet() if report is not None else None
    sinks = []
    if json_path is not None:
        sinks.append(JsonResults(json_path, header))
    if csv_path is not None:
        sinks.append(CsvResults(csv_path, RECORD_FIELDS))
    counts = {"scored": 0, "anomalous": 0, "failed": 0, "downscaled": 0}
    ranked: list[tuple[float, str]] = []
    failures: list[tuple[str, str]] = []
    visuals_error: str | None = None
    started = time.perf_counter()
    interrupted = False
    try:
        with progress() as bar:
            task = bar.add_task(f"predicting ({loaded.name})", total=len(paths))
            for index, (result, image) in enumerate(predict_files(loaded, paths, names=names, batch_size=batch_size)):
                record = result.record(threshold, loaded.postprocess)
                for sink in sinks:
                    sink.add(record)
                bar.advance(task)
                if result.prediction is None:
                    counts["failed"] += 1
                    failures.append((result.name, result.error or "failed"))
                    continue
                counts["scored"] += 1
                counts["anomalous"] += record["label"] == "anomalous"
                # Highest score first; equal scores in the inputs' natural order (img_2 before img_10).
                ranked = sorted([*ranked, (float(record["score"]), result.name)], key=_rank)[: max(top, 0)]
                warning = downscale_warning(result.size, result.prediction.anomaly_map.shape[-2:])
                counts["downscaled"] += warning is not None
                drawing = (visuals is not None and visuals_error is None) or sheet is not None
                if drawing and image is not None:
                    label = record["label"] == "anomalous"
                    panel = render_panel(
                        image,
                        result.prediction.anomaly_map[0, 0],
                        result.prediction.pred_mask[0, 0],
                        score=record["score"],
                        label=label,
                        threshold=threshold,
                        pixel_threshold=map_threshold,
                        title=result.name,
                        warning=warning,
                    )
                    if sheet is not None:
                        sheet.add(result.name, record["score"], label, panel)
                    if visuals is not None and visuals_error is None:
                        visuals_error = _save_visuals(visuals, index, result, image, panel, map_threshold)
        for item in unmatched:
            record = ImageResult(Path(item), item, error="no image files found").record(threshold)
            for sink in sinks:
                sink.add(record)
            counts["failed"] += 1
            failures.append((item, "no image files found"))
    except KeyboardInterrupt:
        interrupted = True
    seconds = time.perf_counter() - started
    done = counts["scored"] + counts["failed"]
    footer = {
        "summary": {
            **counts,
            "images": len(paths) + len(unmatched),
            "seconds": seconds,
            "images_per_second": counts["scored"] / seconds if seconds > 0 else None,
            "interrupted": interrupted,
        }
    }
    for sink in sinks:
        sink.close(footer)
    summary = summary_console(json_path, csv_path, report)
    _print_summary(summary, loaded.name, model, counts, done, seconds, ranked, failures, threshold)
    if visuals is not None:
        err.print(f"  panels, heatmaps, overlays and masks in {visuals}")
    notes = []
    if visuals_error is not None:
        notes.append(f"stopped writing visuals ({visuals_error}); every result is still in the other outputs")
    if counts["downscaled"]:
        notes.append(
            f"{counts['downscaled']} image(s) are over {DOWNSCALE_LIMIT:g}x the model's resolution and were "
            "downscaled to it: small defects may vanish (crop or tile the images, or train at a larger size)"
        )
    for note in notes:
        warn(note)
    if sheet is not None:
        _write_report(report, header, counts, footer["summary"], failures, notes, sheet, threshold)
    for path, name in ((json_path, "JSON"), (csv_path, "CSV"), (report, "report")):
        if path is not None:
            err.print(f"  {name}: {path}")
    if interrupted:
        raise KeyboardInterrupt
    if counts["failed"]:
        raise typer.Exit(1)


def _write_report(path, header, counts, summary, failures, notes, sheet, threshold) -> None:
    from patchcore_trt.html_report import ReportData, write_html_report

    seconds, done = summary["seconds"], counts["scored"] + counts["failed"]
    timings = {"total": f"{seconds:.1f} s"}
    if done:
        timings["per image"] = f"{1000 * seconds / done:.1f} ms"
    if summary["images_per_second"]:
        timings["images/s"] = f"{summary['images_per_second']:.1f}"
    model = header["model"]
    data = ReportData(
        title=f"predict {model['file'].name} ({model['backend']})",
        model={**model, "tool": header["tool"], "versions": header["versions"], "started": header["started"]},
        counts={key: counts[key] for key in ("scored", "anomalous", "failed")},
        timings=timings,
        threshold=threshold,
        failures=failures,
        warnings=notes
        + (["interrupted: the page holds what was scored before Ctrl-C"] if summary["interrupted"] else []),
        panels=sheet.panels(),
        images_total=sheet.total,
    )
    write_html_report(path, data)


def _save_visuals(folder: Path, index: int, result, image, panel, pixel_threshold: float) -> str | None:
    """Write one image's visuals; the first OS error stops them (a full disk must not stop the scoring)."""
    from patchcore_trt.report import save_visuals

    # Folders often reuse file names (good/000.png, defect/000.png): keep the order and the parent's name.
    stem = folder / f"{index:04d}_{result.path.parent.name}_{result.path.stem}"
    prediction = result.prediction
    try:
        save_visuals(
            image,
            prediction.anomaly_map[0, 0],
            prediction.pred_mask[0, 0],
            stem,
            pixel_threshold=pixel_threshold,
            panel=panel,
        )
    except OSError as exc:
        return f"{exc.filename or folder}: {exc.strerror or exc}"
    return None


def _rank(item: tuple[float, str]) -> tuple[float, list[object]]:
    from patchcore_trt.images import natural_key

    return -item[0], natural_key(Path(item[1]))


def _print_summary(out, backend, model, counts, done, seconds, ranked, failures, threshold) -> None:
    """The run's summary on ``out``: stdout, or stderr when a results file is stdout."""
    from patchcore_trt.report import format_score

    rate = f", {counts['scored'] / seconds:.1f} images/s" if seconds > 0 and counts["scored"] else ""
    per_image = f" ({1000 * seconds / done:.1f} ms per image)" if done else ""
    out.print(
        f"{model.name} ({backend}): {counts['scored']} scored, {counts['anomalous']} anomalous, "
        f"{counts['failed']} failed in {seconds:.1f} s{per_image}{rate}; threshold {threshold:g}"
    )
    if ranked:
        out.print(f"most anomalous (score > {threshold:g} is anomalous):")
        for score, name in ranked:
            label = "anomalous" if score > threshold else "normal"
            out.print(f"  {format_score(score, threshold)}  {label:<9}  {name}")
    if failures:
        out.print(f"failed ({len(failures)}):")
        for name, why in failures[:20]:
            out.print(f"  {name}: {why}")
        if len(failures) > 20:
            out.print(f"  ... and {len(failures) - 20} more (every failure is in the JSON/CSV)")
