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
    models: list[str] = typer.Argument(
        None,
        help="A .engine (tensorrt_plan), .onnx (onnxruntime_onnx) or .ckpt (python); or a line of products: several "
        ".ckpt files, a folder of them, or NAME=PATH pairs (one served model for all; see --add). With --add, "
        "--replace or --remove: the repository.",
        show_default=False,
    ),
    output: Path | None = typer.Option(None, "-o", "--output", help="The model repository folder (created if needed)."),
    name: str = typer.Option("patchcore", "--name", help="The model's name: its folder REPO/NAME."),
    add: list[str] = typer.Option(
        None, "--add", help="(line) Add a product: PATH.ckpt or NAME=PATH; writes the line's next version."
    ),
    replace: list[str] = typer.Option(
        None, "--replace", help="(line) Replace a product's checkpoint: NAME=PATH; writes the next version."
    ),
    remove: list[str] = typer.Option(None, "--remove", help="(line) Remove a product: NAME; writes the next version."),
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
    """Write a Triton model repository for MODEL (config.pbtxt, checked with Triton's protobuf, and version 1), for a
    line of products (one model serving every product's checkpoint), or the next version of a line."""
    from patchcore_trt.line.products import parse_products
    from patchcore_trt.serve.repository import (
        ServeOptions,
        check_output_folder,
        machine_kind,
        platform_of,
        write_model,
    )
    from patchcore_trt.serve.sources import check_artifact

    models = models or []
    if add or replace or remove:
        _change_line(models, output, name, add or [], replace or [], remove or [], trust_pickled_code, anomalib_version)
        return
    if not models:
        raise UserError("triton needs a MODEL (or several .ckpt products for a line) and -o REPO")
    if output is None:
        raise UserError("triton needs -o REPO: the model repository to write")
    products = None
    if len(models) > 1 or "=" in models[0] or Path(models[0]).is_dir():
        products = parse_products(models)  # every path checked before anything is announced or written
        model = next(iter(products.values()))
    else:
        model = check_artifact(Path(models[0]))  # a wrong file is named before anything is announced or written

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
    if products is not None:
        from patchcore_trt.serve.line_repository import write_line

        with step(f"writing the line {output / name} ({len(products)} products)"):
            written = write_line(products, output, options, force=force, on_product=_reading)
        _print_products(written.folder / "1")
    else:
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


def _reading(product: str) -> None:
    err.print(f"  reading product {product}")


def _print_products(version: Path) -> None:
    from patchcore_trt.line.products import read_manifest

    manifest = read_manifest(version)
    out.print(
        f"{version.parent.name} version {version.name}: {len(manifest.products)} products, "
        f"{len(manifest.groups)} backbone group(s)"
    )
    for product in manifest.products.values():
        meta = product.metadata
        out.print(
            f"  {product.name}: {product.source_file} sha256 {product.sha256[:12]}, {meta.backbone} "
            f"group {product.group[:8]}, bank {meta.bank_size} x {meta.embedding_dim}, "
            f"image threshold {meta.postprocess.normalized_image_threshold:g} ({meta.postprocess.rule})"
        )


def _change_line(
    arguments: list[str],
    output: Path | None,
    name: str,
    add: list[str],
    replace: list[str],
    remove: list[str],
    trust_pickled_code: bool,
    anomalib_version: str | None,
) -> None:
    """Write the next version of the line REPO/NAME: the repository is -o REPO or the one argument."""
    from patchcore_trt.line.products import check_name, parse_products
    from patchcore_trt.serve.line_repository import LineChange, change_line

    if output is not None and arguments:
        raise UserError("--add/--replace/--remove change a line: give its repository once (-o REPO or REPO)")
    if output is None and len(arguments) != 1:
        raise UserError("--add/--replace/--remove change a line: give its repository (-o REPO or REPO), no models")
    repository = output or Path(arguments[0])
    if any("=" not in item for item in replace):
        raise UserError(f"--replace takes NAME=PATH, got {', '.join(item for item in replace if '=' not in item)}")
    change = LineChange(parse_products(add), parse_products(replace), tuple(check_name(item) for item in remove))
    with step(f"writing the next version of the line {repository / name}"):
        number, _ = change_line(
            repository, name, change, trust_pickled_code=trust_pickled_code, anomalib_version=anomalib_version,
            on_product=_reading,
        )  # fmt: skip
    _print_products(repository / name / str(number))
    err.print(
        f"a running '{program()} serve {repository}' loads version {number} within a second; the previous "
        "version answers until it is ready"
    )
