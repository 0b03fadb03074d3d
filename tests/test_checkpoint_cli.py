"""The checkpoint options and files as the commands see them: one error line, exit 1, nothing written, and the
cheap checks answered before a checkpoint is read."""

from __future__ import annotations

import pytest
from conftest import error_line, run_cli
from golden import FIXTURES, checkpoint


@pytest.fixture
def not_a_checkpoint(tmp_path):
    """A .ckpt the reader refuses ("not a PyTorch checkpoint"): any other error proves the option came first."""
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"NOTAZIP")
    return path


@pytest.mark.parametrize("version", ["².⁷", "2.x", "two"])
def test_a_malformed_release_is_one_line_before_the_checkpoint_is_read(version, not_a_checkpoint, tmp_path):
    line = error_line(run_cli("export", not_a_checkpoint, "-o", tmp_path / "out", "--anomalib-version", version))
    assert (
        line == f"error: --anomalib-version {version!r} is not a release number like 2.0.0; give the anomalib release"
    )
    assert not (tmp_path / "out").exists()


def test_an_unsupported_opset_is_refused_before_the_checkpoint_is_read(not_a_checkpoint, tmp_path):
    line = error_line(run_cli("export", not_a_checkpoint, "-o", tmp_path / "out", "--opset", "13"))
    assert line.startswith("error: opset 13 is not supported: patchcore-trt exports opset 17 to ")
    assert not (tmp_path / "out").exists()


def test_verify_with_the_onnx_of_another_checkpoint_names_both_hashes(tmp_path):
    from patchcore_trt.checkpoint import read_checkpoint
    from patchcore_trt.export import export_onnx

    exported_from, verified = read_checkpoint(checkpoint("2.0.0-default")), read_checkpoint(checkpoint("2.2.0"))
    onnx_path, _ = export_onnx(exported_from, tmp_path / "model.onnx", check=False)
    report = tmp_path / "report.html"
    result = run_cli("verify", checkpoint("2.2.0"), FIXTURES / "data" / "test", "--onnx", onnx_path, "--report", report)
    assert error_line(result) == (
        f"error: {onnx_path} was exported from another checkpoint (SHA-256 {exported_from.source_sha256}) than "
        f"{checkpoint('2.2.0')} (SHA-256 {verified.source_sha256}) and computes another model (bank_size, "
        "model_size, transform, postprocess differ); give the ONNX exported from this checkpoint, or leave --onnx "
        "out to export one now"
    )
    assert not report.exists()
