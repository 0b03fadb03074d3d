"""The main job end to end, as the README runs it (with the small backbone to keep CI short)."""

from __future__ import annotations

import json

from conftest import run_cli


def test_demo_runs_every_stage_and_passes_the_bar(tmp_path):
    result = run_cli("demo", "-o", tmp_path, "--backbone", "resnet18")
    assert result.returncode == 0, result.stderr
    for backend in ("torch", "onnxruntime", "openvino"):
        (line,) = [row for row in result.stdout.splitlines() if f" {backend} " in row]
        assert "PASS" in line
    report = json.loads((tmp_path / "demo_report.json").read_text())
    assert len(report["scores"]) == 12
    assert {row["backend"] for row in report["parity_vs_anomalib_forward"]} >= {"torch", "onnxruntime", "openvino"}
    assert len(list((tmp_path / "visuals").glob("*.overlay.png"))) == 12
    assert (tmp_path / "model.onnx").is_file()
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert page.count("<figure ") == 12 and "PASS" in page
