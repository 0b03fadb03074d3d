"""TensorRT engine builds (TensorRT-RTX builds without a GPU), clear errors, and the runtime's pre-GPU checks."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from conftest import error_line, run_cli
from onnx import TensorProto, helper

from patchcore_trt.accuracy import BUDGETS, evaluate, labelled_folder, over_budget
from patchcore_trt.artifact import METADATA_KEY, OUTPUT_NAMES, ArtifactMetadata, read_sidecar
from patchcore_trt.engine import Profile, Shape, build_engine, default_profile, load_tensorrt
from patchcore_trt.errors import MissingDependencyError, UserError
from patchcore_trt.outputs import Postprocess
from patchcore_trt.precision import calibration_images, write_fp16_onnx, write_int8_onnx
from patchcore_trt.runtime import open_backend
from patchcore_trt.runtime.tensorrt_backend import TensorRtBackend, check_engine, invalidity_reasons

try:
    TRT = load_tensorrt()
except MissingDependencyError:
    pytest.skip("neither TensorRT nor TensorRT-RTX is installed", allow_module_level=True)

PROFILE = Profile(Shape(1, 128, 128), Shape(2, 256, 256), Shape(8, 512, 512))
BACKBONE_CONVS = 15  # resnet18 up to layer3


@pytest.fixture(scope="module")
def engines(resnet18_onnx: Path, dataset, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Engines of all three precisions from the real checkpoint's ONNX, with a dynamic profile."""
    folder = tmp_path_factory.mktemp("engines")
    sources = {
        "fp32": resnet18_onnx,
        "fp16": write_fp16_onnx(resnet18_onnx, folder / "model.fp16.onnx"),
        "int8": folder / "model.int8.onnx",
    }
    write_int8_onnx(resnet18_onnx, sources["int8"], calibration_images(dataset.train_good))
    return {p: build_engine(src, folder / f"model.{p}.engine", PROFILE).engine for p, src in sources.items()}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engine_is_a_plain_plan_with_metadata_beside_it(engines, precision):
    engine = engines[precision]
    plan = engine.read_bytes()
    assert len(plan) > 1_000_000 and not plan.startswith(b"{")  # the weights are in it; no JSON header
    metadata = read_sidecar(engine)
    assert metadata["precision"] == precision
    assert metadata["tensorrt"] == {"library": TRT.library, "version": TRT.version}
    assert metadata["profile"] == {"min": [1, 3, 128, 128], "opt": [2, 3, 256, 256], "max": [8, 3, 512, 512]}
    assert metadata["tf32"] is False
    assert metadata["model"]["model_size"] == [256, 256] and metadata["engine"]["bytes"] == len(plan)
    layers = metadata["layers"]
    # The strongly typed network keeps the search in FP32 whatever the backbone runs in.
    assert layers["MATRIX_MULTIPLY:FLOAT"] == 3 and not any(k.startswith("MATRIX_MULTIPLY:H") for k in layers)
    assert layers.get("CONVOLUTION:HALF", 0) == (BACKBONE_CONVS if precision == "fp16" else 0)
    assert layers.get("QUANTIZE:INT8", 0) == (13 if precision == "int8" else 0)


def test_profiles_are_validated_before_anything_is_built(resnet18_onnx, tmp_path):
    bad = {
        "height must satisfy min <= opt <= max": Profile(Shape(1, 256, 256), Shape(1, 128, 128), Shape(1, 512, 512)),
        "batch must lie within 1..1024": Profile(Shape(1, 256, 256), Shape(1, 256, 256), Shape(2048, 256, 256)),
        "width must lie within 32..8192": Profile(Shape(1, 256, 16), Shape(1, 256, 256), Shape(1, 256, 256)),
    }
    for message, profile in bad.items():
        with pytest.raises(UserError, match=message.replace(".", r"\.")):
            build_engine(resnet18_onnx, tmp_path / "x.engine", profile)
    assert not (tmp_path / "x.engine").exists()
    with pytest.raises(UserError, match="not BATCHxHEIGHTxWIDTH"):
        Shape.parse("1x256")
    assert default_profile((512, 512)) == Profile(Shape(1, 256, 256), Shape(1, 512, 512), Shape(32, 1024, 1024))


def _with_patchcore_metadata(model: onnx.ModelProto) -> onnx.ModelProto:
    post = Postprocess(image_threshold=0.0, pixel_threshold=0.0, image_min=0.0, pixel_min=0.0, image_max=1.0,
                       pixel_max=1.0)  # fmt: skip
    metadata = ArtifactMetadata(
        precision="fp32", model_size=(64, 64), map_at_input_size=False, backbone="resnet18", layers=("layer2",),
        bank_size=1, embedding_dim=1, num_neighbors=1, transform={}, postprocess=post, source_checkpoint={},
        producer="test", versions={},
    )  # fmt: skip
    helper.set_model_props(model, {METADATA_KEY: metadata.to_json()})
    return model


def test_a_static_input_dimension_is_checked_against_the_profile(resnet18_onnx, tmp_path):
    model = onnx.load(str(resnet18_onnx))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # batch fixed at 1
    onnx.save(model, str(tmp_path / "fixed.onnx"))
    with pytest.raises(UserError, match=r"batch is fixed at 1 in the graph, but the profile asks \[1, 2, 8\]"):
        build_engine(tmp_path / "fixed.onnx", tmp_path / "fixed.engine", PROFILE)


def test_an_unparsable_graph_names_the_failing_node(tmp_path):
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in OUTPUT_NAMES]
    node = helper.make_node("Mystery", ["image"], list(OUTPUT_NAMES), name="the_bad_node", domain="example.ops")
    graph = helper.make_graph([node], "g", [image], outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("example.ops", 1)])
    onnx.save(_with_patchcore_metadata(model), str(tmp_path / "bad.onnx"))
    with pytest.raises(UserError, match=r"cannot parse the graph: node 0 'the_bad_node' \(Mystery\)"):
        build_engine(tmp_path / "bad.onnx", tmp_path / "bad.engine", PROFILE)


@pytest.mark.skipif(TRT.library != "tensorrt_rtx", reason="TensorRT-RTX has no timing cache")
def test_timing_cache_is_refused_up_front_on_tensorrt_rtx(resnet18_onnx, tmp_path):
    with pytest.raises(UserError, match="TensorRT-RTX has no timing cache"):
        build_engine(resnet18_onnx, tmp_path / "x.engine", PROFILE, timing_cache=tmp_path / "cache")


def test_build_command_gates_fp16_and_writes_engine_and_sidecar(resnet18_onnx, dataset, tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(resnet18_onnx.read_bytes())
    result = run_cli(
        "build",
        model,
        "--precision",
        "fp16",
        "--eval-data",
        dataset.root,
        "--shapes",
        "1x128x128",
        "1x256x256",
        "4x384x384",
    )
    assert result.returncode == 0, result.stderr
    assert "fp16 vs fp32 on 6 images" in result.stderr
    metadata = read_sidecar(tmp_path / "model.fp16.engine")
    assert metadata["accuracy_gate"]["over_budget"] == [] and metadata["profile"]["max"] == [4, 3, 384, 384]
    assert (tmp_path / "model.fp16.onnx").is_file() and model.read_bytes() == resnet18_onnx.read_bytes()


def test_build_command_refuses_int8_over_budget_unless_forced(resnet18_onnx, dataset, tmp_path):
    # On this randomly initialised backbone INT8 breaks its budget (see docs/tensorrt.md), which the gate's own
    # figures show first: the build must refuse, say why, and build only with --force.
    model = tmp_path / "model.onnx"
    model.write_bytes(resnet18_onnx.read_bytes())
    int8 = tmp_path / "gate.int8.onnx"
    write_int8_onnx(resnet18_onnx, int8, calibration_images(dataset.train_good))
    broken = over_budget(evaluate(resnet18_onnx, int8, labelled_folder(dataset.root), "int8"), BUDGETS["int8"])
    assert broken, "INT8 met its budget on this data: the refusal below would not be tested"
    common = ("build", model, "--precision", "int8", "--calibration", dataset.train_good, "--eval-data", dataset.root)
    refused = run_cli(*common)
    line = error_line(refused)
    assert all(reason in line for reason in broken), (broken, line)
    assert "int8 graph is over its accuracy budget" in line and "--force" in line
    assert not (tmp_path / "model.int8.engine").exists()
    forced = run_cli(*common, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "ranges reused from" in forced.stderr  # the calibration cache of the refused run
    assert read_sidecar(tmp_path / "model.int8.engine")["accuracy_gate"]["over_budget"]


def test_build_command_errors_are_one_line(resnet18_onnx, tmp_path):
    assert "needs --calibration" in error_line(run_cli("build", resnet18_onnx, "--precision", "int8"))
    assert "needs --eval-data" in error_line(
        run_cli("build", resnet18_onnx, "--precision", "int8", "--calibration", resnet18_onnx.parent)
    )
    bad = run_cli("build", resnet18_onnx, "--shapes", "1x256x256", "1x128x128", "1x512x512")
    assert "min <= opt <= max" in error_line(bad)


def test_runtime_refuses_an_engine_from_another_tensorrt(engines):
    metadata = read_sidecar(engines["fp16"])
    with pytest.raises(UserError, match="metadata beside it belongs to another build"):
        check_engine(engines["fp16"], engines["fp32"].read_bytes(), metadata, TRT, (8, 9))
    metadata["tensorrt"] = {"library": "tensorrt", "version": "10.0.0"}
    with pytest.raises(
        UserError, match=r"built with tensorrt 10\.0\.0.*patchcore-trt build model\.onnx --precision fp16"
    ):
        check_engine(engines["fp16"], engines["fp16"].read_bytes(), metadata, TRT, (8, 9))


def test_runtime_explains_engine_invalidity():
    flags = TRT.module.EngineInvalidityDiagnostics
    reasons = invalidity_reasons(TRT, int(flags.UNSUPPORTED_CC) | int(flags.OLD_CUDA_DRIVER))
    assert reasons == ["this GPU's compute capability is not one it was built for", "the NVIDIA driver is too old"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_runtime_without_a_gpu_says_so(engines):
    with pytest.raises(UserError, match="backend 'tensorrt' runs on cuda"):
        open_backend(engines["fp32"], device="cpu")
    with pytest.raises(UserError, match="torch sees no CUDA device"):
        TensorRtBackend(engines["fp32"], device="cuda")
    if TRT.library == "tensorrt_rtx":  # getEngineValidity runs without a GPU and says the plan cannot run here
        with pytest.raises(UserError, match="this engine cannot run here"):
            check_engine(engines["fp32"], engines["fp32"].read_bytes(), read_sidecar(engines["fp32"]), TRT, (8, 9))


def test_runtime_rejects_shapes_outside_the_profile(tmp_path):
    backend = TensorRtBackend.__new__(TensorRtBackend)  # the shape check needs no GPU
    backend.artifact = tmp_path / "model.fp16.engine"
    backend.profile = [(1, 3, 128, 128), (2, 3, 256, 256), (8, 3, 512, 512)]
    backend._check_shape((8, 3, 512, 128))
    with pytest.raises(UserError, match=r"\[9, 3, 256, 256\] is outside the engine's profile \(batch 1\.\.8"):
        backend._check_shape((9, 3, 256, 256))
    with pytest.raises(UserError, match="--shapes MIN OPT MAX"):
        backend._check_shape((1, 3, 600, 256))


def test_fp16_without_eval_data_gates_on_generated_images_and_says_so(resnet18_onnx, tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(resnet18_onnx.read_bytes())
    result = run_cli("build", model, "--precision", "fp16", "--shapes", "1x128x128", "1x256x256", "2x256x256")
    assert result.returncode == 0, result.stderr
    assert "16 generated images (no --eval-data" in result.stderr and "AUROC not measured" in result.stderr
    gate = read_sidecar(tmp_path / "model.fp16.engine")["accuracy_gate"]
    assert gate["over_budget"] == [] and gate["figures"]["images"] == 16
    assert gate["figures"]["image_auroc_reference"] is None
    if TRT.library == "tensorrt_rtx":
        assert "building with TensorRT-RTX" in result.stderr and "H100/H200 9.0" in result.stderr


def test_a_damaged_sidecar_is_one_line(engines, tmp_path):
    engine = tmp_path / "model.fp32.engine"
    engine.write_bytes(engines["fp32"].read_bytes())
    (tmp_path / "model.fp32.engine.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="damaged engine metadata \\(not a JSON object\\)"):
        read_sidecar(engine)


def test_a_graph_with_other_outputs_is_not_built(resnet18_onnx, tmp_path):
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    score = helper.make_tensor_value_info("score", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["score"])], "g", [image], [score])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(_with_patchcore_metadata(model), str(tmp_path / "foreign.onnx"))
    with pytest.raises(UserError, match=r"the graph's outputs are \['score'\]"):
        build_engine(tmp_path / "foreign.onnx", tmp_path / "foreign.engine", PROFILE)
    assert not (tmp_path / "foreign.engine").exists()


def test_fp16_gated_on_an_unlabelled_folder_says_auroc_was_not_measured(resnet18_onnx, dataset, tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(resnet18_onnx.read_bytes())
    plain = dataset.train_good  # good images only: no good/ and defect subfolders
    result = run_cli(
        "build", model, "--precision", "fp16", "--eval-data", plain,
        "--shapes", "1x128x128", "1x256x256", "2x256x256",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"on {plain}" in result.stderr
    assert "AUROC not measured (the folder has no good/ and defect labels)" in result.stderr
    gate = read_sidecar(tmp_path / "model.fp16.engine")["accuracy_gate"]
    assert gate["over_budget"] == [] and gate["figures"]["images"] == len(list(plain.glob("*.png")))
    assert gate["figures"]["image_auroc_reference"] is None and gate["figures"]["pixel_auroc"] is None
