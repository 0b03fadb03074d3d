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
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import error_line, run_cli


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


def _spellings(tmp_path: Path) -> dict[str, Path]:
    link = tmp_path / "link.out"
    link.symlink_to("same.out")
    fd_link = tmp_path / "mystdout"
    fd_link.symlink_to("/proc/self/fd/1")  # a private stand-in for /dev/stdout
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    same = tmp_path / "same.out"
    return {"same": same, "dotted": tmp_path / "." / "same.out", "link": link, "stdout": Path("/dev/stdout"),
            "fd1": Path("/proc/self/fd/1"), "mystdout": fd_link, "fifo": fifo}  # fmt: skip


@pytest.mark.parametrize(
    ("json_name", "csv_name"),
    [("stdout", "stdout"), ("stdout", "fd1"), ("mystdout", "stdout"), ("same", "dotted"), ("same", "link"),
     ("fifo", "fifo")],
)  # fmt: skip
def test_two_outputs_that_are_one_file_are_refused_before_any_work(json_name, csv_name, dataset, tmp_path):
    spelled = _spellings(tmp_path)
    before = sorted(path.name for path in tmp_path.iterdir())
    # The model does not exist: the refusal must come before the model is opened or any image is read.
    result = run_cli("predict", tmp_path / "missing.onnx", dataset.test_good,
                     "--json", spelled[json_name], "--csv", spelled[csv_name])  # fmt: skip
    assert error_line(result) == (
        f"error: {spelled[csv_name]}: given for two outputs ({spelled[json_name]} and {spelled[csv_name]}); "
        "give each its own file"
    )
    assert result.stdout == ""
    assert sorted(path.name for path in tmp_path.iterdir()) == before


def test_the_null_device_takes_any_number_of_outputs(resnet18_onnx, dataset):
    result = run_cli("predict", resnet18_onnx, dataset.test_good, "--json", "/dev/null", "--csv", "/dev/null")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "3 scored" in result.stdout


@pytest.fixture()
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A private 64 KiB file system, full: writes fail with ENOSPC once a buffer is flushed, as on a full disk
    (a file-size limit fails them with EFBIG instead, which is another message and another code path)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (root only): {made.stderr.decode().strip()}")
    try:
        (mount / "fill").write_bytes(bytes(64 * 1024))
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _files_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if not path.is_dir())


@pytest.mark.parametrize("flag", ["--json", "--csv", "--report"])
def test_a_disk_that_fills_mid_results_is_one_line_naming_the_file_and_leaves_nothing(
    flag, full_disk, resnet18_onnx, dataset
):
    output = full_disk / "results.out"
    result = run_cli("predict", resnet18_onnx, dataset.root, flag, output)
    assert error_line(result) == f"error: {output}: No space left on device"
    assert _files_under(full_disk) == ["fill"]  # no results.out, no hidden .part


def test_export_on_a_full_disk_names_the_output_and_leaves_nothing(full_disk, resnet18_checkpoint):
    result = run_cli("export", resnet18_checkpoint, "-o", full_disk / "out")
    assert error_line(result) == f"error: {full_disk / 'out' / 'model.onnx'}: No space left on device"
    assert _files_under(full_disk) == ["fill"]
