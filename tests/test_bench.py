"""The synthetic model and the bench command's plumbing, on the CPU at toy sizes: rows, parity columns, the
result files and the user errors. Timings are produced but never asserted (they belong to benchmarks)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import error_line, run_cli, unavailable

from patchcore_trt.bench.matrix import BenchSettings, matrix_cases, percentile, run_matrix, workloads
from patchcore_trt.bench.report import chart_figure, display_row, environment, write_chart, write_results
from patchcore_trt.checkpoint import read_checkpoint, write_checkpoint
from patchcore_trt.demo.synthetic_model import synthetic_spec, texture_images
from patchcore_trt.errors import UserError
from patchcore_trt.model import PatchCoreDeploy
from patchcore_trt.reference import anomalib_available

TOY = {"backbone": "resnet18", "sizes": ((64, 64),), "banks": (64,), "images": 4, "warmup": 1, "iters": 2}


@pytest.fixture(scope="module")
def toy_spec():
    return synthetic_spec(64, (64, 64), backbone="resnet18", seed=1)


def test_synthetic_spec_round_trips_through_a_checkpoint(toy_spec, tmp_path):
    assert toy_spec.memory_bank.shape == (64, 384) and toy_spec.num_neighbors == 9
    post = toy_spec.postprocess
    assert post.image_min < post.image_threshold < post.image_max
    back = read_checkpoint(write_checkpoint(toy_spec, tmp_path / "toy.ckpt"))
    assert torch.equal(back.memory_bank, toy_spec.memory_bank)
    assert back.postprocess == post and back.preprocess == toy_spec.preprocess
    assert back.backbone == "resnet18" and back.layers == ("layer2", "layer3")
    torch.testing.assert_close(back.blur_kernel, toy_spec.blur_kernel)
    assert back.backbone_state.keys() == toy_spec.backbone_state.keys()


def test_synthetic_scores_spread_like_a_fitted_models(toy_spec):
    images = torch.cat([texture_images(4, (64, 64), seed=70), texture_images(4, (64, 64), seed=71, defects=True)])
    with torch.no_grad():
        scores = PatchCoreDeploy(toy_spec).eval()(images.permute(0, 3, 1, 2).float() / 255).pred_score
    assert scores.min() < 0.5 < scores.max() and bool(((scores > 0) & (scores < 1)).any())


def test_synthetic_bank_must_have_rows():
    with pytest.raises(UserError, match="at least 1 row"):
        synthetic_spec(0, (64, 64), backbone="resnet18")


def test_texture_images_are_fresh_per_seed():
    first, again, other = (texture_images(2, (40, 50), seed=s) for s in (5, 5, 6))
    assert first.dtype == torch.uint8 and first.shape == (2, 40, 50, 3)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_matrix_rows_files_and_parity(tmp_path):
    """torch backend rows, anomalib's baseline row when it is installed, and the files written as rows come."""
    settings = BenchSettings(
        backends=("torch",),
        precisions=("fp32", "tf32"),  # torch and anomalib run tf32 nowhere: a notice, not a row
        batches=(2,),
        copies=("host",),
        baseline=anomalib_available(),
        **TOY,
    )
    rows, notices = [], []
    env = environment()

    def on_row(row):
        rows.append(row)
        write_results(tmp_path, settings, env, rows, notices)

    run_matrix(settings, on_row=on_row, on_notice=notices.append)
    torch_rows = [r for r in rows if r["backend"] == "torch"]
    assert [(r["batch"], r["precision"], r["copies"]) for r in torch_rows] == [(2, "fp32", "host")]
    for row in torch_rows:  # the torch backend is the FP32 deploy model itself, run in other batch sizes
        assert row["max_score_error"] < 1e-5 and row["max_map_error"] < 1e-5
        assert row["labels_equal"] == row["labels_compared"] and row["mask_agreement"] == 1
        assert row["iters"] == 2 and row["median_ms"] > 0 and row["img_per_s"] > 0
    baseline_rows = [r for r in rows if r["backend"] == "anomalib" and r["precision"] == "fp32"]
    assert len(baseline_rows) == (1 if settings.baseline else 0), baseline_rows
    for row in baseline_rows:
        assert row["max_score_error"] < 1e-5 and row["max_map_error"] < 1e-4
    assert any("torch tf32: not benchmarked" in text for text in notices)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["environment"]["torch"] == torch.__version__ and len(saved["rows"]) == len(rows)
    assert len(list(csv.DictReader((tmp_path / "bench.csv").open()))) == len(rows)
    table = (tmp_path / "bench.md").read_text()
    assert "| torch | fp32 | - | 64x64 | 64 | 2 | host |" in table and "torch tf32: not benchmarked" in table
    chart = write_chart(tmp_path, rows)
    assert chart is not None and chart.read_bytes()[:4] == b"\x89PNG"


def test_cases_skip_what_a_backend_cannot_run():
    settings = BenchSettings(backends=("cuda", "torch"), precisions=("fp32", "bf16"), baseline=False)
    cases, notices = matrix_cases(settings, batch=4)
    assert all(case.batch == 4 for case in cases)
    assert [case.precision for case in cases if case.backend == "torch"] == ["fp32"]
    assert any(text.startswith("torch bf16") for text in notices)
    if not torch.cuda.is_available():
        assert not any(case.backend == "cuda" for case in cases) and any("cuda" in text for text in notices)
    with pytest.raises(UserError, match="unknown backend"):
        matrix_cases(BenchSettings(backends=("tensorflow",)), batch=1)


def test_banks_pair_with_sizes():
    settings = BenchSettings(sizes=((256, 256), (512, 512)), banks=(16384, 32768))
    assert workloads(settings) == [((256, 256), 16384), ((512, 512), 32768)]
    assert workloads(BenchSettings(sizes=((64, 64), (96, 96)), banks=(10,))) == [((64, 64), 10), ((96, 96), 10)]
    with pytest.raises(UserError, match="one bank size or one per input size"):
        workloads(BenchSettings(sizes=((64, 64),), banks=(1, 2)))


def test_percentiles_and_display():
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 90), percentile(values, 99)) == (50.0, 90.0, 99.0)
    row = {
        "backend": "cuda", "precision": "fp16", "search": "certified", "height": 256, "width": 256, "bank": 16384,
        "batch": 1, "copies": "host", "median_ms": 0.5, "p90_ms": 0.6, "p99_ms": 0.7, "img_per_s": 2000.0,
        "peak_gpu_mib": float("nan"), "host_rss_mib": 900.0, "max_score_error": float("nan"), "max_map_error": 0.0,
        "labels_equal": 3, "labels_compared": 4,
    }  # fmt: skip
    shown = display_row(row)
    assert shown["GPU MiB"] == "-" and shown["max Δscore"] == "nan" and shown["max Δmap"] == "0"
    assert shown["labels"] == "3/4" and shown["img/s"] == "2,000" and shown["bank"] == "16,384"


def test_chart_bars_are_labelled_with_their_significant_digits(tmp_path):
    base = {"search": "-", "copies": "host", "height": 256, "width": 256, "bank": 16384}
    figures = [("torch", 1, 6.6667, 0.15), ("onnxruntime", 1, 0.0042, 0.55), ("openvino", 1, 1234.5, 0.19)]
    rows = [{**base, "backend": name, "precision": "fp32", "batch": batch, "median_ms": ms, "img_per_s": rate}
            for name, batch, ms, rate in figures]  # fmt: skip
    figure = chart_figure(rows)
    latency, throughput = figure.axes  # one input size: latency above, throughput below
    assert [text.get_text() for text in latency.texts] == ["6.67", "0.0042", "1,234"]
    assert [text.get_text() for text in throughput.texts] == ["0.15", "0.55", "0.19"]
    chart = write_chart(tmp_path, rows)
    assert chart is not None and chart.read_bytes()[:4] == b"\x89PNG"


def test_bench_command_on_a_checkpoint_writes_its_files(toy_spec, tmp_path):
    checkpoint = write_checkpoint(toy_spec, tmp_path / "toy.ckpt")
    out = tmp_path / "bench"
    result = run_cli(
        "bench", checkpoint, "--backends", "torch", "--no-baseline", "--sizes", "64", "--batch", "1",
        "--iters", "2", "--warmup", "0", "--images", "2", "-o", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} >= {"bench.json", "bench.csv", "bench.md", "bench.png"}
    assert "| torch | fp32 |" in result.stdout
    np.testing.assert_equal(json.loads((out / "bench.json").read_text())["settings"]["batches"], [1])


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("bench", "-o", "x"), "needs a MODEL checkpoint or --synthetic"),
        (("bench", "m.ckpt", "--synthetic", "-o", "x"), "needs a MODEL checkpoint or --synthetic"),
        (("bench", "--synthetic", "--precision", "fp64", "-o", "x"), "--precision: fp64 not one of"),
        (("bench", "--synthetic", "--batch", "1,x", "-o", "x"), "--batch takes whole numbers"),
        (("bench", "--synthetic", "--batch", "0", "-o", "x"), "at least 1"),
        (("bench", "--synthetic", "--sizes", "16", "-o", "x"), "at least 32"),
        (("bench", "m.ckpt", "--bank", "10", "-o", "x"), "a checkpoint brings its own"),
    ],
)
def test_bad_bench_options_are_one_line(args, fragment, tmp_path):
    (tmp_path / "m.ckpt").write_text("?")
    assert fragment in error_line(run_cli(*args, cwd=tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_bench_of_gpu_backends_without_a_gpu_says_what_runs_here(tmp_path):
    line = error_line(run_cli("bench", "--synthetic", cwd=tmp_path))
    assert "--backends cuda needs an NVIDIA GPU and torch sees none" in line
    assert "bench --synthetic --backbone resnet18 --bank 4096 --backends onnxruntime,openvino,torch" in line
    assert not (tmp_path / "runs").exists()


def test_bench_writes_each_run_to_a_fresh_folder(tmp_path):
    args = ("bench", "--synthetic", "--backends", "onnxruntime", "--backbone", "resnet18", "--sizes", "64")
    fast = ("--bank", "64", "--images", "2", "--iters", "1", "--warmup", "0", "--no-baseline")
    for run in (1, 2):
        result = run_cli(*args, *fast, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        saved = json.loads((tmp_path / "runs" / "bench" / f"exp{run}" / "bench.json").read_text())
        assert [row["backend"] for row in saved["rows"]] == ["onnxruntime"]
        if not torch.cuda.is_available():
            assert {row["copies"] for row in saved["rows"]} == {"host"}  # no host/device split without a GPU
    assert {p.name for p in (tmp_path / "runs" / "bench" / "exp1").iterdir()} == {
        "bench.json", "bench.csv", "bench.md", "bench.png"
    }  # fmt: skip


def test_bench_on_a_checkpoint_records_the_models_settings(toy_spec, tmp_path):
    checkpoint = write_checkpoint(toy_spec, tmp_path / "toy.ckpt")
    result = run_cli(
        "bench", checkpoint, "--backends", "torch", "--no-baseline", "--sizes", "64", "--images", "2",
        "--iters", "1", "--warmup", "0", "-o", tmp_path / "out",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert "banks" not in saved["settings"] and saved["settings"]["checkpoint"] == str(checkpoint)
    assert saved["rows"][0]["bank"] == 64 and saved["rows"][0]["backbone"] == "resnet18"


def test_unknown_backends_are_refused_before_any_work(tmp_path):
    # Run where the default output (runs/bench/expN) would appear, so its absence means nothing was written.
    assert "--backends: tensorflow not one of" in error_line(
        run_cli("bench", "--synthetic", "--backends", "tensorflow", cwd=tmp_path)
    )
    assert list(tmp_path.iterdir()) == []


def test_peer_rows_skip_with_their_reason_where_they_cannot_run(monkeypatch):
    """anomalib-compile needs a GPU (its CUDA graphs) and anomalib; onnxruntime-cuda needs the CUDA EP and a GPU."""
    import onnxruntime

    from patchcore_trt.bench import subjects

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    settings = BenchSettings(backends=("torch", "anomalib-compile", "onnxruntime-cuda"), baseline=False)
    cases, notices = matrix_cases(settings, batch=1)
    assert [case.backend for case in cases] == ["torch"]
    if anomalib_available():
        assert "anomalib-compile: not benchmarked (torch.compile(mode='reduce-overhead') replays CUDA graphs" in (
            "\n".join(notices)
        )
    else:
        assert any(text.startswith("anomalib-compile: not benchmarked (anomalib is not installed") for text in notices)
    assert any(
        text.startswith("onnxruntime-cuda: not benchmarked (onnxruntime")
        and "has no CUDAExecutionProvider (it offers CPUExecutionProvider): pip install onnxruntime-gpu" in text
        for text in notices
    )
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider"])
    assert subjects.peer_unavailable("onnxruntime-cuda") == "torch sees no CUDA GPU here"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert subjects.peer_unavailable("onnxruntime-cuda") is None
    assert subjects.peer_unavailable("anomalib-compile") is None or not anomalib_available()


def test_the_compile_peer_runs_for_real_on_the_cpu(monkeypatch):
    """anomalib under the real torch.compile (Inductor's CPU code) as a row, checked against the FP32 deploy model
    like any row. Only the CUDA-GPU requirement is lifted: reduce-overhead's CUDA graphs do not exist on the CPU, so
    the compiled module runs as Inductor compiled it."""
    if not anomalib_available():
        unavailable("anomalib is not installed (pip install 'patchcore-trt[anomalib]')")
    from patchcore_trt.bench import matrix

    monkeypatch.setattr(matrix, "peer_unavailable", lambda name: None)
    compiled = []
    real_compile = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda module, **options: compiled.append(options) or real_compile(module, **options)
    )
    settings = BenchSettings(
        backends=("anomalib-compile",), precisions=("fp32", "fp16"), batches=(2,), copies=("host",), baseline=False,
        **TOY,
    )  # fmt: skip
    notices = []
    rows = run_matrix(settings, on_notice=notices.append)
    assert [(r["backend"], r["precision"], r["batch"]) for r in rows] == [("anomalib-compile", "fp32", 2)]
    assert compiled == [{"mode": "reduce-overhead", "dynamic": False}]
    (row,) = rows
    assert row["max_score_error"] < 1e-5 and row["max_map_error"] < 1e-4, row
    assert row["labels_equal"] == row["labels_compared"] and row["compile_s"] > 0
    assert any("anomalib-compile fp16: not benchmarked" in text for text in notices)


def test_the_cuda_ep_peer_runs_where_it_can():
    """ONNX Runtime's CUDA execution provider as rows, for real: only on a machine with onnxruntime-gpu and a GPU."""
    from patchcore_trt.bench import subjects

    reason = subjects.peer_unavailable("onnxruntime-cuda")
    if reason is not None:
        pytest.skip(reason)
    settings = BenchSettings(
        backends=("onnxruntime-cuda",), precisions=("fp32", "tf32"), batches=(2,), copies=("host",), baseline=False,
        **TOY,
    )  # fmt: skip
    rows = run_matrix(settings)
    assert [(r["backend"], r["precision"]) for r in rows] == [
        ("onnxruntime-cuda", "fp32"),
        ("onnxruntime-cuda", "tf32"),
    ]
    fp32 = rows[0]
    assert fp32["max_score_error"] < 1e-5 and fp32["max_map_error"] < 1e-4
    assert fp32["labels_equal"] == fp32["labels_compared"]


def test_an_onnxruntime_that_falls_back_to_the_cpu_is_refused(monkeypatch, toy_spec, tmp_path):
    """ONNX Runtime drops to the CPU provider silently when CUDA fails to load: that is no CUDA EP row."""
    from patchcore_trt.bench import subjects
    from patchcore_trt.export import export_onnx

    onnx_path = export_onnx(toy_spec, tmp_path / "toy.onnx", check=False)[0]
    original = subjects.ort_session
    monkeypatch.setattr(subjects, "ort_session", lambda path, **options: original(path, device="cpu"))
    case = subjects.Case("onnxruntime-cuda", "fp32", "-", "host", 1)
    with pytest.raises(UserError, match="ran on CPUExecutionProvider, not the CUDA execution provider"):
        subjects.make_subject(case, toy_spec, [np.zeros((1, 64, 64, 3), np.uint8)], True, lambda name: onnx_path)


def test_verify_and_bench_show_no_library_warnings(resnet18_checkpoint, resnet18_onnx, dataset, tmp_path):
    """anomalib's, timm's and torch's own FutureWarnings and DeprecationWarnings stay out of what
    ``verify`` and ``bench`` print (the user can do nothing about them)."""
    runs = {
        "verify": run_cli(
            "verify", resnet18_checkpoint, dataset.test_good, "--onnx", resnet18_onnx,
            "--backends", "torch,onnxruntime,openvino",
        ),
        "bench": run_cli(
            "bench", resnet18_checkpoint, "--backends", "anomalib,torch,onnxruntime,openvino",
            "--warmup", "1", "--iters", "2", "-o", tmp_path / "bench",
        ),
    }  # fmt: skip
    for command, result in runs.items():
        assert result.returncode == 0, result.stderr
        for text in (result.stderr, result.stdout):
            assert "Warning" not in text and "warnings.warn" not in text, f"{command}:\n{text}"
