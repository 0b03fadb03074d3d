"""``patchcore-trt predict``: score images with a checkpoint, an ONNX file, an engine or a served model.

The run itself is the library's ``predict.run_predict``; this module turns options into a backend and sinks,
answers mistakes before any work, and prints the summary. Results go to the files as they come, so memory stays
flat over any number of images and Ctrl-C keeps everything scored so far.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from patchcore_trt.cli import app
from patchcore_trt.cli._common import (
    backend_option,
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
from patchcore_trt.runtime.registry import OPTIONS


@app.command("predict")
def predict_command(
    arguments: list[str] = typer.Argument(
        ...,
        metavar="[MODEL] INPUTS...",
        help="MODEL: a .ckpt (torch), .onnx (onnxruntime/openvino) or .engine (tensorrt); none with --server. "
        "INPUTS: image files, folders (searched recursively) or glob patterns.",
    ),
    server: str | None = typer.Option(
        None,
        "--server",
        help="Score on a Triton server instead of a MODEL: HOST:PORT or HOST is gRPC (port 8001 by default); "
        "http://HOST:8000 for HTTP.",
    ),
    model_name: str | None = typer.Option(None, "--model", help="(--server) The served model; default: its only one."),
    product: str | None = typer.Option(
        None, "--product", help="(--server, a line model) The product to score; default: the line's only one."
    ),
    concurrency: int = typer.Option(1, "--concurrency", min=1, max=256, help="(--server) Requests in flight at once."),
    timeout: float = typer.Option(
        60.0, "--timeout", min=1, max=3600, help="(--server) Seconds to wait for an answer before the batch fails."
    ),
    shm: str | None = typer.Option(None, "--shm", help=f"(--server) {OPTIONS['shm'].help_text()}"),
    maps: bool = typer.Option(
        False,
        "--maps",
        help="(--server) Ask the server for maps and masks too, for map_max and mask_fraction in the results "
        "(--save-visuals and --report ask for them anyway; without, only scores and labels cross the wire).",
    ),
    backend: str | None = typer.Option(None, help="Runtime; default by file type: .ckpt torch, .onnx onnxruntime."),
    device: str | None = typer.Option(None, help="cpu, cuda or cuda:N; default: the backend's own (cuda for engines)."),
    batch_size: int = typer.Option(8, min=1, max=1024, help="Images of equal size run together, up to this many."),
    workers: int | None = typer.Option(
        None, min=1, max=64, help="Threads decoding images ahead of the model (default: one per core, up to 8)."
    ),
    json_path: Path | None = typer.Option(None, "--json", help="Write every result, with the run's header, as JSON."),
    csv_path: Path | None = typer.Option(None, "--csv", help="Write every result as CSV."),
    visuals: Path | None = typer.Option(
        None, "--save-visuals", help="Write a panel (image | map | mask | overlay) and heatmap, overlay, mask PNGs."
    ),
    report: Path | None = typer.Option(
        None, "--report", help="Write one self-contained HTML page: model, counts, timings, failures, panels by score."
    ),
    top: int = typer.Option(10, min=0, help="Show this many most anomalous images (all rows are in the files)."),
    map_at_input_size: bool = typer.Option(
        False, "--map-at-input-size", help="(.ckpt) Return maps at the input resolution."
    ),
    mode: str | None = backend_option("mode", "cuda"),
    backbone_dtype: str | None = backend_option("backbone_dtype", "cuda"),
    search: str | None = backend_option("search", "cuda"),
    trust_pickled_code: bool = trust_option(),
    anomalib_version: str | None = version_option(),
) -> None:
    """Predict anomaly scores, labels and maps; exit code 1 if any input failed."""
    from patchcore_trt.images import collect_images, short_names
    from patchcore_trt.runtime import check_request, open_backend
    from patchcore_trt.runtime.registry import BARE_SCHEME

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
        given_server = (model_name, product, shm)
        if any(value is not None for value in given_server) or concurrency != 1 or timeout != 60.0 or maps:
            raise UserError("--model, --product, --concurrency, --timeout, --shm and --maps apply to --server")
    else:
        local = [flag for flag, value in (("--backend", backend), ("--device", device)) if value is not None]
        if local or given:
            flags = ", ".join(local + ["--" + k.replace("_", "-") for k in given])
            raise UserError(f"{flags}: for a local MODEL; the server's model carries its own settings")
        model, inputs = server if "://" in server else BARE_SCHEME + server, arguments
        backend, given = "triton", {"model": model_name, "concurrency": concurrency, "timeout_s": timeout}
        if product is not None:
            given["product"] = product
        if shm is not None:
            given["shm"] = shm
        # Maps only where a sink draws them (or the user asked): scores and labels are all the rest needs.
        given["maps"] = maps or visuals is not None or report is not None
        batch_size = max(batch_size, concurrency)  # a batch is what the requests in flight share
    check_distinct(json_path, csv_path, report)
    check_request(model, backend, device=device, **given)  # a wrong MODEL is answered before inputs are searched
    paths, unmatched = collect_images(inputs)
    local_files = [model] if server is None else []
    for output in (json_path, csv_path, report):
        check_output_file(output, protected=[*local_files, *paths])
    check_output_dir(visuals)
    loaded = open_backend(model, backend, device=device, **given)
    for item in unmatched:
        warn(f"{item}: no image files found")
    if not paths:
        loaded.close()
        raise UserError("no input images found in " + ", ".join(inputs))
    with loaded:
        summary = _run(loaded, paths, short_names(paths, inputs), unmatched, batch_size, workers, top,
                       json_path, csv_path, visuals, report)  # fmt: skip
    _print(summary_console(json_path, csv_path, report), loaded, summary)
    if visuals is not None:
        err.print(f"  panels, heatmaps, overlays and masks in {visuals}")
    for note in summary.notes:
        warn(note)
    for path, name in ((json_path, "JSON"), (csv_path, "CSV"), (report, "report")):
        if path is not None:
            err.print(f"  {name}: {path}")
    if summary.interrupted:
        raise KeyboardInterrupt
    if summary.failed:
        raise typer.Exit(1)


def _run(loaded, paths, names, unmatched, batch_size, workers, top, json_path, csv_path, visuals, report):
    """run_predict with the sinks the options ask for, under a progress bar."""
    from patchcore_trt.html_report import ReportSink
    from patchcore_trt.predict import RECORD_FIELDS, header, run_predict
    from patchcore_trt.report import CsvResults, JsonResults
    from patchcore_trt.visuals import Panels, VisualsSink

    panels = Panels(loaded.postprocess)
    # The header hashes the model file: only when a file that shows it is asked for.
    run_header = header(loaded) if json_path is not None or report is not None else {}
    sinks = []
    if json_path is not None:
        sinks.append(JsonResults(json_path, run_header))
    if csv_path is not None:
        sinks.append(CsvResults(csv_path, RECORD_FIELDS))
    if visuals is not None:
        sinks.append(VisualsSink(visuals, panels))
    if report is not None:
        sinks.append(ReportSink(report, run_header, panels, f"predict {loaded.artifact.name} ({loaded.name})"))
    started = time.perf_counter()
    with progress(rate=True) as bar:
        task = bar.add_task(f"predicting ({loaded.name})", total=len(paths), rate="")

        def advance(done: int) -> None:
            bar.update(task, completed=done, rate=f"{done / max(time.perf_counter() - started, 1e-9):.1f} img/s")

        return run_predict(loaded, paths, sinks=sinks, names=names, batch_size=batch_size, top=top,
                           unmatched=unmatched, on_progress=advance, workers=workers)  # fmt: skip


def _print(out, loaded, summary) -> None:
    """The run's summary on ``out``: stdout, or stderr when a results file is stdout."""
    from patchcore_trt.report import format_score

    threshold, seconds, done = loaded.image_threshold, summary.seconds, summary.done
    rate = f", {summary.scored / seconds:.1f} images/s" if seconds > 0 and summary.scored else ""
    per_image = f" ({1000 * seconds / done:.1f} ms per image)" if done else ""
    out.print(
        f"{loaded.artifact.name} ({loaded.name}): {summary.scored} scored, {summary.anomalous} anomalous, "
        f"{summary.failed} failed in {seconds:.1f} s{per_image}{rate}; threshold {threshold:g}"
    )
    if summary.top:
        out.print(f"most anomalous ({loaded.postprocess.rule}):")
        for score, image, label, _ in summary.top:
            out.print(f"  {format_score(score, threshold)}  {'anomalous' if label else 'normal':<9}  {image}")
    if summary.failures:
        out.print(f"failed ({len(summary.failures)}):")
        for image, why in summary.failures[:20]:
            out.print(f"  {image}: {why}")
        if len(summary.failures) > 20:
            out.print(f"  ... and {len(summary.failures) - 20} more (every failure is in the JSON/CSV)")
