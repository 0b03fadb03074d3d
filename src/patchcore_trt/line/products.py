"""A line's products as data, torch-free: which checkpoints, under which names, and the manifest of a version.

A line is one served model for many products. Each version folder holds ``line.json`` (this module's ``Manifest``),
one weights file per backbone group and one memory bank per product (``store.py`` writes them, ``model.py`` loads
them). Products whose checkpoints hold the same backbone (same timm name, layers, pre-processing and, by content,
the same weights) form one group: the backbone runs once per batch for all of them.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from patchcore_trt.artifact import ArtifactMetadata
from patchcore_trt.errors import UserError
from patchcore_trt.outputs import Preprocess

MANIFEST = "line.json"
FORMAT = "patchcore-trt-line/1"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str, what: str = "product name") -> str:
    if not _NAME.match(name):
        raise UserError(f"{what} {name!r} must be 1-64 letters, digits, '_', '.' or '-' (not starting '.' or '-')")
    return name


def parse_products(arguments: list[str]) -> dict[str, Path]:
    """Command-line products -> name -> checkpoint: ``A.ckpt`` (named ``A``), ``NAME=PATH``, or a folder (each
    ``*.ckpt`` in it, named after its file). A name given twice is refused; so is a path that is not a checkpoint."""
    products: dict[str, Path] = {}
    for argument in arguments:
        name, equals, path_text = argument.partition("=")
        if equals:
            found = [(check_name(name), Path(path_text))]
        else:
            path = Path(argument)
            if path.is_dir():
                files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".ckpt" and p.is_file())
                if not files:
                    raise UserError(
                        f"{path}: is a folder holding no .ckpt checkpoint; expected a model file, or a folder of .ckpt "
                        "files (one product each)"
                    )
                found = [(check_name(file.stem, f"product name (from {file.name})"), file) for file in files]
            else:
                found = [(check_name(path.stem, f"product name (from {path.name})"), path)]
        for name, path in found:
            if path.suffix.lower() != ".ckpt":
                raise UserError(f"{path}: a product is a .ckpt checkpoint, not a {path.suffix or 'suffix-less'} file")
            if path.is_dir() or not path.is_file():
                raise UserError(f"{path}: no such file" if not path.exists() else f"{path}: is a folder")
            if name in products:
                raise UserError(
                    f"product {name!r} is named twice ({products[name]} and {path}); name them with NAME=PATH"
                )
            products[name] = path
    return products


@dataclass(frozen=True)
class Group:
    """Products that share one backbone: its timm name, layers, pre-processing and weights file."""

    backbone: str
    layers: tuple[str, ...]
    preprocess: Preprocess
    weights: str  # file in the version folder
    sha256: str  # of the weights' content, with the name, layers and pre-processing

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "layers": list(self.layers), "preprocess": asdict(self.preprocess)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Group:
        pre = dict(raw["preprocess"])
        for key in ("resize", "center_crop", "mean", "std"):
            if pre.get(key) is not None:
                pre[key] = tuple(pre[key])
        return cls(str(raw["backbone"]), tuple(raw["layers"]), Preprocess(**pre), str(raw["weights"]), raw["sha256"])


@dataclass(frozen=True)
class Product:
    """One product of a line: its checkpoint's identity, its group, its bank file and what it computes."""

    name: str
    source_file: str
    sha256: str  # of the checkpoint file
    group: str  # a key of Manifest.groups
    bank: str  # file in the version folder: float32 [M, D]
    blur_kernel: tuple[float, ...]
    metadata: ArtifactMetadata

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source_file": self.source_file,
            "sha256": self.sha256,
            "group": self.group,
            "bank": self.bank,
            "blur_kernel": list(self.blur_kernel),
            "metadata": json.loads(self.metadata.to_json()),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: Path) -> Product:
        return cls(
            str(raw["name"]), str(raw["source_file"]), str(raw["sha256"]), str(raw["group"]), str(raw["bank"]),
            tuple(float(tap) for tap in raw["blur_kernel"]),
            ArtifactMetadata.from_json(json.dumps(raw["metadata"]), where),
        )  # fmt: skip

    def summary(self) -> dict[str, Any]:
        """What an operator and a client read about a product (the model config's ``products`` parameter)."""
        post = self.metadata.postprocess
        return {
            "source_file": self.source_file,
            "sha256": self.sha256,
            "group": self.group,
            "image_threshold": post.normalized_image_threshold,
            "pixel_threshold": post.normalized_pixel_threshold,
            "rule": post.rule,
            "metadata": self.metadata.to_json(),
        }


@dataclass(frozen=True)
class Manifest:
    """One version of a line: its products (in the order given) and their backbone groups."""

    products: dict[str, Product]
    groups: dict[str, Group]

    def to_json(self) -> str:
        document = {
            "format": FORMAT,
            "groups": {key: group.to_dict() for key, group in self.groups.items()},
            "products": [product.to_dict() for product in self.products.values()],
        }
        return json.dumps(document, indent=1)

    def summary(self) -> str:
        """The config parameter clients read: product name -> checkpoint SHA-256, thresholds, rule, metadata."""
        return json.dumps({name: product.summary() for name, product in self.products.items()})


def read_manifest(folder: Path) -> Manifest:
    """The manifest of a line version folder; a UserError names the file for anything damaged or foreign."""
    path = Path(folder) / MANIFEST
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror or exc}); is {folder} a line's version?") from None
    except ValueError:
        raise UserError(f"{path}: not valid JSON; write the line again") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise UserError(f"{path}: not a patchcore-trt line manifest ({FORMAT})")
    try:
        groups = {key: Group.from_dict(value) for key, value in raw["groups"].items()}
        products = {item["name"]: Product.from_dict(item, path) for item in raw["products"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: damaged manifest ({type(exc).__name__}: {exc}); write the line again") from None
    for product in products.values():
        if product.group not in groups:
            raise UserError(f"{path}: product {product.name!r} names group {product.group!r}, which it lacks")
    return Manifest(products, groups)


def product_list(summary: str, where: str) -> dict[str, dict[str, Any]]:
    """A config's ``products`` parameter (``Manifest.summary``) read back, for clients."""
    try:
        products = json.loads(summary)
    except ValueError:
        raise UserError(f"{where}: its 'products' parameter is not valid JSON; write the line again") from None
    if not isinstance(products, dict) or not all(isinstance(value, dict) for value in products.values()):
        raise UserError(f"{where}: its 'products' parameter is not a product list; write the line again")
    return products
