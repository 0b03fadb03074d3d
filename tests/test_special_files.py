"""Special files as inputs and outputs, as a user meets them: a FIFO or a device given as an image, two outputs
that are one file under different spellings, a disk that fills. One error line or one error row, the right exit
code, no hang, no file left behind.

FIFOs, devices and small file systems are made inside the tests, never the system's own.
"""

from __future__ import annotations

import csv
import io
import os
import stat
from pathlib import Path

import pytest
from conftest import run_cli


def _csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def _null_device(path: Path) -> Path:
    """A private /dev/zero-like character device (1, 5) at ``path``."""
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    except OSError as exc:
        pytest.skip(f"cannot make a device node here: {exc}")
    return path


@pytest.mark.parametrize("kind", ["fifo", "zero-device"])
def test_a_fifo_or_device_given_as_an_image_is_one_error_row_saying_what_it_is(kind, resnet18_onnx, dataset, tmp_path):
    special = tmp_path / "image.png"
    if kind == "fifo":
        os.mkfifo(special)  # nobody ever writes it: opening it to read would block for good
        expected = "not a regular file (a FIFO)"
    else:
        _null_device(special)
        expected = "not a regular file (a character device)"
    result = run_cli("predict", resnet18_onnx, special, dataset.test_good, "--csv", "/dev/stdout")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    rows = _csv_rows(result.stdout)
    assert [(row["file"], row["status"], row["error"]) for row in rows[:1]] == [(str(special), "error", expected)]
    assert [row["status"] for row in rows[1:]] == ["ok"] * 3  # the other images are scored
    assert f"{special}: {expected}" in result.stderr


def test_a_fifo_alone_is_one_failure_and_exit_1(resnet18_onnx, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    result = run_cli("predict", resnet18_onnx, fifo)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "0 scored, 0 anomalous, 1 failed" in result.stdout
    assert f"{fifo}: not a regular file (a FIFO)" in result.stdout
    assert fifo.is_fifo()
