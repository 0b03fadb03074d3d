"""The first look at a checkpoint: is it a torch.save archive that can be read without unpacking more than it is?

Answered from the zip directory alone, without torch, so a wrong file (a PNG named .ckpt, a truncated copy, a
re-packed archive) is one line before the seconds torch takes to load.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from patchcore_trt.errors import UserError


class ArchiveError(Exception):
    """The file is not a torch.save archive whose entries can be read without unpacking more than it holds."""


def check_archive(path: Path) -> None:
    """Refuse, from the zip directory alone, an archive torch.save did not write or that unpacks to more than it is.

    Raises:
        ArchiveError: not a zip file, a compressed entry, or entries claiming more bytes than the file has.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(4)
    if not head.startswith(b"PK"):
        raise ArchiveError("not a zip archive")
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ArchiveError(f"truncated or corrupt zip archive ({exc})") from None
    compressed = [entry for entry in entries if entry.compress_type != zipfile.ZIP_STORED]
    if compressed:
        first = compressed[0]
        raise ArchiveError(
            f"entry {first.filename} is compressed ({first.compress_size} bytes unpacking to {first.file_size})"
        )
    claimed = sum(entry.file_size for entry in entries)
    if claimed > size or any(entry.header_offset + entry.file_size > size for entry in entries):
        raise ArchiveError(f"its entries claim {claimed} bytes, more than the file's {size}")


def check_checkpoint_file(path: Path) -> None:
    """UserError, worded for the user, unless ``path`` is a file ``check_archive`` accepts."""
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path}: not a file (expected an anomalib .ckpt)")
    try:
        check_archive(path)
    except ArchiveError as exc:
        reason = str(exc)
        if reason == "not a zip archive":
            raise UserError(f"{path}: not a PyTorch checkpoint (expected a Lightning .ckpt from anomalib)") from None
        if reason.startswith("truncated"):
            raise UserError(f"{path}: the checkpoint archive is truncated or corrupt; copy it again") from None
        raise UserError(
            f"{path}: refused before unpacking: {reason}, but torch.save stores every entry uncompressed, so the "
            "archive was re-packed or crafted; use the .ckpt file anomalib saved"
        ) from None
