"""``patchcore-trt triton``: write a Triton model repository (REPO/NAME/config.pbtxt + REPO/NAME/1/...)."""

from __future__ import annotations

from pathlib import Path

import typer

from patchcore_trt.cli import app
from patchcore_trt.cli._common import (
    check_output_dir,
    err,
    human_size,
    out,
    program,
    step,
    trust_option,
    version_option,
)
from patchcore_trt.errors import UserError


def parse_gpus(text: str | None) -> tuple[int, ...]:
    """'0,1' -> (0, 1)."""
    if not text:
        return ()
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(f"--gpus {text!r} is not a list of GPU numbers such as 0,1") from None


@app.command("triton")
def triton_command(
    model: Path = typer.Argument(..., help="A .engine (tensorrt_plan), .onnx (onnxruntime_onnx) or .ckpt (python)."),
    output: Path = typer.Option(..., "-o", "--output", help="The model repository folder (created if needed)."),
    name: str = typer.Option("patchcore", "--name", help="The model's name: its folder REPO/NAME."),
    max_batch: int | None = typer.Option(
        None, "--max-batch", help="Largest batch Triton forms; default: an engine's profile maximum, else 16."
    ),
    instances: int = typer.Option(1, "--instances", help="Model instances on each GPU (or on the CPU)."),
    kind: str | None = typer.Option(
        None, "--kind", help="Where instances run: gpu or cpu (default: gpu if torch sees one, else cpu)."
    ),
    gpus: str | None = typer.Option(None, "--gpus", help="GPUs that get instances, e.g. 0,1 (default: all)."),
    queue_delay_us: int = typer.Option(
        0,
        "--queue-delay-us",
        help="How long the dynamic batcher may hold a request to fill a batch (0: a lone request runs at once; "
        "requests that queue while the model is busy are still batched together).",
    ),
    max_pixels: int | None = typer.Option(
        None, "--max-pixels", help="(.ckpt) Largest image a request may carry (default: predict's limit, 64 MP)."
    ),
    max_request_pixels: int | None = typer.Option(
        None,
        "--max-request-pixels",
        help="(.ckpt) Most pixels one request may carry, all its images together (default: 64 MP or --max-pixels).",
    ),
    mode: str | None = typer.Option(
        None, "--mode", help="(.ckpt, gpu) exact (default: anomalib's FP32 results) or fast (FP16 backbone)."
    ),
    backbone_dtype: str | None = typer.Option(
        None, "--backbone-dtype", help="(.ckpt, gpu) Override the mode's backbone arithmetic: fp32, tf32, fp16, bf16."
    ),
    search: str | None = typer.Option(None, "--search", help="(.ckpt, gpu) Nearest-neighbour search: exact or fast."),
    trust_pickled_code: bool = trust_option(),
    anomalib_version: str | None = version_option(),
    force: bool = typer.Option(False, "--force", help="Replace REPO/NAME if it exists."),
) -> None:
    """Write a Triton model repository for MODEL: config.pbtxt (checked with Triton's protobuf) and version 1."""
    from patchcore_trt.serve.repository import (
        ServeOptions,
        check_output_folder,
        machine_kind,
        platform_of,
        write_model,
    )
    from patchcore_trt.serve.sources import check_artifact

    check_artifact(model)  # a folder or a wrong file is named before anything is announced or written

    options = ServeOptions(
        name=name,
        max_batch=max_batch,
        instances=instances,
        # An engine, or GPUs named, can only mean gpu; otherwise what this machine can run.
        kind=kind or ("gpu" if gpus or model.suffix.lower() == ".engine" else machine_kind()),
        gpus=parse_gpus(gpus),
        queue_delay_us=queue_delay_us,
        max_pixels=max_pixels,
        max_request_pixels=max_request_pixels,
        mode=mode,
        backbone_dtype=backbone_dtype,
        search=search,
        trust_pickled_code=trust_pickled_code,
        anomalib_version=anomalib_version,
    )
    options.check()
    check_output_dir(output)
    check_output_folder(output, name, force=force)
    with step(f"writing {output / name}"):
        written = write_model(model, output, options, force=force)
    config = written.config
    group = config.instance_group[0]
    where = "CPU" if options.kind == "cpu" else f"GPU {','.join(map(str, group.gpus))}" if group.gpus else "each GPU"
    batching = config.dynamic_batching
    out.print(f"{written.folder}: {platform_of(config)}, max_batch_size {config.max_batch_size}")
    out.print(
        f"  dynamic batching: max queue delay {batching.max_queue_delay_microseconds} us; "
        f"{group.count} instance(s) on {where}"
    )
    inputs = ", ".join(f"{t.name} {_type(t.data_type)} {list(t.dims)}" for t in config.input)
    outputs = ", ".join(f"{t.name} {_type(t.data_type)} {list(t.dims)}" for t in config.output)
    out.print(f"  inputs: {inputs} (batch first)\n  outputs: {outputs}")
    for path in sorted(written.folder.rglob("*")):
        if path.is_file():
            err.print(f"  {path.relative_to(output)} ({human_size(path)})")
    if written.platform == "python":
        err.print(f"next: {program()} serve {output}")
    else:
        err.print(f"next: {program()} serve {output}  (prints the Triton container command that serves it)")


def _type(data_type: int) -> str:
    from patchcore_trt.serve.repository import model_config_pb2

    return model_config_pb2().DataType.Name(data_type).removeprefix("TYPE_").lower()
