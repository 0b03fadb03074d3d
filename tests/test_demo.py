"""The main job end to end, as the README runs it (with the small backbone to keep CI short)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import typer
from conftest import run_cli

from patchcore_trt.cli import _register_commands, app


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

    _the_next_commands_run_on_what_the_demo_wrote(result.stdout, tmp_path)


def _the_next_commands_run_on_what_the_demo_wrote(stdout: str, work: Path) -> None:
    """The demo's closing "next, try:" lines name real commands and options, and the files the demo wrote."""
    lines = stdout.splitlines()
    suggested = [shlex.split(line) for line in lines[lines.index("next, try:") + 1 :] if line.startswith("  ")]
    assert [words[1] for words in suggested] == ["predict", "verify", "build", "bench"]
    _register_commands()
    commands = typer.main.get_command(app).commands
    for tool, name, *arguments in suggested:
        assert Path(tool).name == "patchcore-trt"
        options = {flag: param for param in commands[name].params for flag in param.opts}
        words = iter(arguments)
        for word in words:
            value, wanted = word, Path(word)
            if word.startswith("-"):
                assert word in options, f"{name} has no option {word}"
                if getattr(options[word], "is_flag", False):
                    continue
                value = next(words)
                wanted = Path(value).parent if word == "--json" else Path(value)  # an output: its folder
            if "/" in value:  # a path: one the demo wrote
                assert wanted.exists() and work in [wanted, *wanted.parents], f"{name}: {value} is not the demo's"
    predict = suggested[0]
    ran = subprocess.run(
        [sys.executable, "-m", "patchcore_trt", *predict[1:]], capture_output=True, text=True, timeout=600
    )
    assert ran.returncode == 0, ran.stderr
    results = json.loads(Path(predict[predict.index("--json") + 1]).read_text())
    assert results["summary"]["scored"] == 12
