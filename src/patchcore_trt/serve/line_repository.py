"""A line as a Triton model: REPO/NAME/config.pbtxt and one numbered folder per version of its product set.

``write_line`` writes a new line (version 1); ``change_line`` writes version N+1 from version N with products added,
replaced or removed. A version is written in a hidden staging folder, checked (its manifest read back and every
product loaded, as the served model will), and only then takes its number; the config's ``products`` parameter
(the list clients and operators read) is rewritten atomically just before. Triton serves the newest version it
has loaded: ``serve`` loads a new version while the old one answers (serve/versions.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import patchcore_trt
from patchcore_trt.errors import UserError
from patchcore_trt.line.products import Manifest, read_manifest
from patchcore_trt.serve.repository import (
    MODEL_PY,
    ServeOptions,
    WrittenModel,
    _replace,
    build_config,
    check_model_folder,
    check_output_folder,
    versions,
)
from patchcore_trt.serve.sources import MODEL_FILES, Source

# Versions kept on disk: the newest and the one before it (still serving until the newest is loaded).
KEEP_VERSIONS = 2


@dataclass(frozen=True)
class LineChange:
    """Products to add (name -> checkpoint), replace (name -> checkpoint) and remove (names)."""

    add: dict[str, Path]
    replace: dict[str, Path]
    remove: tuple[str, ...]

    def empty(self) -> bool:
        return not (self.add or self.replace or self.remove)


def is_line(config: Any) -> bool:
    return "line" in config.parameters and config.parameters["line"].string_value == "true"


def _source(manifest: Manifest) -> Source:
    sizes = {group.preprocess.model_size for group in manifest.groups.values()}
    size = next(iter(sizes)) if len(sizes) == 1 else (-1, -1)
    parameters = {
        "patchcore_trt_version": patchcore_trt.__version__,
        "line": "true",
        "products": manifest.summary(),
    }
    return Source("python", size, False, (None, None), None, {}, parameters)


def _check_options(options: ServeOptions) -> None:
    given = [
        flag
        for flag, value in (
            ("--mode", options.mode),
            ("--backbone-dtype", options.backbone_dtype),
            ("--search", options.search),
        )
        if value is not None
    ]
    if given:
        raise UserError(
            f"{', '.join(given)}: for one checkpoint on the cuda backend; a line runs every product in FP32 "
            "(anomalib's arithmetic) on its instances"
        )


def _write_version(
    staged: Path,
    plan: list[tuple[str, Path | None]],
    options: ServeOptions,
    previous: tuple[Path, Manifest] | None,
    on_product: Callable[[str], None] | None,
) -> Manifest:
    """Write and check one version in ``staged``: every product is loaded as the served model loads it."""
    from patchcore_trt.line.model import Line
    from patchcore_trt.line.store import write_version

    staged.mkdir()
    manifest = write_version(
        staged, plan, previous=previous, trust_pickled_code=options.trust_pickled_code,
        anomalib_version=options.anomalib_version, on_product=on_product,
    )  # fmt: skip
    (staged / MODEL_FILES["python"]).write_text(MODEL_PY)
    Line(staged)  # reads back the manifest, the weights and every bank; raises on anything the model cannot load
    return manifest


def _write_config(folder: Path, config: Any, *, name: str) -> None:
    from google.protobuf import text_format

    text = text_format.MessageToString(config, use_short_repeated_primitives=True)
    staged = folder / ".config.pbtxt.part"
    staged.write_text(text)
    os.replace(staged, folder / "config.pbtxt")
    if check_model_folder(folder, name=name) != config:
        raise RuntimeError(f"{folder / 'config.pbtxt'} does not parse back to the config that was written")


def write_line(
    products: dict[str, Path],
    repository: Path,
    options: ServeOptions,
    *,
    force: bool = False,
    on_product: Callable[[str], None] | None = None,
) -> WrittenModel:
    """Write REPO/NAME as a line of ``products`` (name -> checkpoint), version 1; the folder takes its name only
    once every product has been read, split, loaded back and the config checked."""
    options.check()
    _check_options(options)
    repository = Path(repository)
    final = check_output_folder(repository, options.name, force=force)
    repository.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{options.name}.", suffix=".part", dir=repository))
    try:
        manifest = _write_version(staged / "1", list(products.items()), options, None, on_product)
        config = build_config(_source(manifest), options)
        _write_config(staged, config, name=options.name)
        staged.chmod(0o755)
        _replace(staged, final)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return WrittenModel(final, config, "python")


def change_line(
    repository: Path,
    name: str,
    change: LineChange,
    *,
    trust_pickled_code: bool = False,
    anomalib_version: str | None = None,
    on_product: Callable[[str], None] | None = None,
) -> tuple[int, Manifest]:
    """Write the next version of the line REPO/NAME with ``change`` applied; returns its number and manifest."""
    folder = Path(repository) / name
    if not folder.is_dir():
        raise UserError(f"{folder}: no such model; write the line first with 'patchcore-trt triton A.ckpt B.ckpt ...'")
    config = check_model_folder(folder, name=name)
    if not is_line(config):
        raise UserError(f"{folder}: serves one model file, not a line of products; --add/--replace/--remove need one")
    numbers = versions(folder)
    if not numbers:
        raise UserError(f"{folder}: holds no version folder; write the line again")
    current = folder / str(numbers[-1])
    manifest = read_manifest(current)
    plan = _plan(manifest, change, folder)
    options = ServeOptions(name=name, trust_pickled_code=trust_pickled_code, anomalib_version=anomalib_version)
    number = numbers[-1] + 1
    staged = Path(tempfile.mkdtemp(prefix=f".{number}.", suffix=".part", dir=folder))
    try:
        shutil.rmtree(staged)
        new = _write_version(staged, plan, options, (current, manifest), on_product)
        config.parameters["products"].string_value = new.summary()
        _write_config(folder, config, name=name)
        os.rename(staged, folder / str(number))
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    for old in numbers[: -(KEEP_VERSIONS - 1)]:
        shutil.rmtree(folder / str(old), ignore_errors=True)
    return number, new


def _plan(manifest: Manifest, change: LineChange, folder: Path) -> list[tuple[str, Path | None]]:
    served = list(manifest.products)
    unknown = [product for product in [*change.replace, *change.remove] if product not in manifest.products]
    if unknown:
        raise UserError(f"{folder}: has no product(s) {', '.join(unknown)}; it serves {', '.join(served)}")
    twice = [product for product in change.add if product in manifest.products]
    if twice:
        raise UserError(f"{folder}: already serves {', '.join(twice)}; replace it with --replace NAME=PATH")
    both = sorted(set(change.replace) & set(change.remove))
    if both:
        raise UserError(f"product(s) {', '.join(both)} cannot be both replaced and removed")
    plan: list[tuple[str, Path | None]] = [
        (product, change.replace.get(product)) for product in served if product not in change.remove
    ]
    plan += list(change.add.items())
    if not plan:
        raise UserError(f"{folder}: removing {', '.join(change.remove)} would leave the line with no product")
    return plan


def restore_products(folder: Path, number: int) -> None:
    """After version ``number`` of the line at ``folder`` failed to load: hide it (a '.N.failed' folder, which
    Triton does not read) and point the config's product list back at the newest version left."""
    failed = folder / f".{number}.failed"
    shutil.rmtree(failed, ignore_errors=True)
    os.rename(folder / str(number), failed)
    left = versions(folder)
    if left:
        config = check_model_folder(folder)
        config.parameters["products"].string_value = read_manifest(folder / str(left[-1])).summary()
        _write_config(folder, config, name=folder.name)
