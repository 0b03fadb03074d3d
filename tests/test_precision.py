"""FP16 and INT8 graph transforms and the accuracy gate, on a real trained checkpoint's ONNX."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from patchcore_trt.accuracy import (
    BUDGETS,
    THRESHOLD_BAND,
    GateFigures,
    auroc,
    evaluate,
    labelled_folder,
    over_budget,
)
from patchcore_trt.artifact import read_onnx_metadata
from patchcore_trt.errors import UserError
from patchcore_trt.images import load_image
from patchcore_trt.precision import (
    backbone_nodes,
    calibration_images,
    write_fp16_onnx,
    write_int8_onnx,
)
from patchcore_trt.runtime import Prediction, open_backend


def _types(model: onnx.ModelProto) -> dict[str, int]:
    graph = onnx.shape_inference.infer_shapes(model).graph
    types = {value.name: value.type.tensor_type.elem_type for value in [*graph.input, *graph.value_info, *graph.output]}
    types.update({init.name: init.data_type for init in graph.initializer})
    return types


@pytest.fixture(scope="module")
def fp16_onnx(resnet18_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fp16_onnx(resnet18_onnx, tmp_path_factory.mktemp("fp16") / "model.fp16.onnx")


@pytest.fixture(scope="module")
def int8_onnx(resnet18_onnx: Path, dataset, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("int8")
    cache = folder / "model.int8.calib.json"
    result = write_int8_onnx(
        resnet18_onnx, folder / "model.int8.onnx", calibration_images(dataset.train_good), cache=cache
    )
    assert not result.from_cache
    return folder / "model.int8.onnx", cache


def test_fp16_runs_the_backbone_in_fp16_and_the_search_in_fp32(resnet18_onnx, fp16_onnx):
    source, model = onnx.load(str(resnet18_onnx)), onnx.load(str(fp16_onnx))
    types = _types(model)
    backbone = {model.graph.node[i].name for i in backbone_nodes(model)}
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    backbone_convs = [node for node in convs if node.name in backbone]
    assert len(backbone_convs) == 15  # resnet18 up to layer3
    assert all(types[node.input[1]] == TensorProto.FLOAT16 for node in backbone_convs)
    assert all(types[node.input[1]] == TensorProto.FLOAT for node in convs if node.name not in backbone)  # map blur
    matmuls = [node for node in model.graph.node if node.op_type == "MatMul"]
    assert matmuls and all(types[name] == TensorProto.FLOAT for node in matmuls for name in node.input)
    assert [(v.name, v.type.tensor_type.elem_type) for v in model.graph.input] == [
        (v.name, v.type.tensor_type.elem_type) for v in source.graph.input
    ]
    assert [(v.name, v.type.tensor_type.elem_type) for v in model.graph.output] == [
        (v.name, v.type.tensor_type.elem_type) for v in source.graph.output
    ]
    metadata = read_onnx_metadata(fp16_onnx)
    assert metadata.precision == "fp16" and metadata.model_size == read_onnx_metadata(resnet18_onnx).model_size


def test_fp16_is_within_its_budget_on_the_labelled_folder(resnet18_onnx, fp16_onnx, dataset):
    figures = evaluate(resnet18_onnx, fp16_onnx, labelled_folder(dataset.root), "fp16")
    assert figures.images == 6
    assert 0 < figures.max_map_delta < 1e-2  # FP16 really changed the numbers, a little
    assert over_budget(figures, BUDGETS["fp16"]) == []
    assert figures.image_auroc_reference is not None and figures.pixel_auroc_reference is not None


def test_int8_puts_symmetric_qdq_on_backbone_convs_only(resnet18_onnx, int8_onnx):
    model = onnx.load(str(int8_onnx[0]))
    producers = {out: node for node in model.graph.node for out in node.output}
    initializers = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    source = onnx.load(str(resnet18_onnx))
    backbone_convs = {
        source.graph.node[i].name for i in backbone_nodes(source) if source.graph.node[i].op_type == "Conv"
    }
    quantized = []
    for node in model.graph.node:
        dequantized = [
            producers[name]
            for name in node.input
            if name in producers and producers[name].op_type == "DequantizeLinear"
        ]
        if node.op_type == "Conv" and dequantized:
            quantized.append(node.name)
            weight_dq = producers[node.input[1]]
            scale = initializers[weight_dq.input[1]]
            assert scale.shape == (initializers[weight_dq.input[0]].shape[0],)  # per output channel
        else:
            assert not dequantized, f"{node.op_type} {node.name} reads a dequantized tensor"
    assert sorted(quantized) == sorted(backbone_convs)
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zero_point = initializers[node.input[2]]
            assert zero_point.dtype == np.int8 and not zero_point.any()  # symmetric
    assert read_onnx_metadata(int8_onnx[0]).precision == "int8"


def test_int8_calibration_cache_is_reused_only_for_the_same_images(resnet18_onnx, int8_onnx, dataset, tmp_path):
    _, cache = int8_onnx
    content = json.loads(cache.read_text())
    assert content["key"]["images"] == 6 and content["ranges"]
    images = calibration_images(dataset.train_good)
    again = write_int8_onnx(resnet18_onnx, tmp_path / "again.onnx", images, cache=cache)
    assert again.from_cache
    fewer = write_int8_onnx(resnet18_onnx, tmp_path / "fewer.onnx", images[:3], cache=cache)
    assert not fewer.from_cache
    assert json.loads(cache.read_text())["key"]["images"] == 3


def test_int8_gate_figures_are_real(resnet18_onnx, int8_onnx, dataset):
    """The gate's figures are the values an independent run gives: both graphs through the onnxruntime backend
    (INT8 with Q/DQ fusion off, as the gate runs it), image by image, and torchmetrics' AUROC."""
    classification = pytest.importorskip("torchmetrics.classification")
    data = labelled_folder(dataset.root)
    figures = evaluate(resnet18_onnx, int8_onnx[0], data, "int8")
    images = np.stack([load_image(path) for path in data.images])
    with open_backend(resnet18_onnx, "onnxruntime") as fp32, open_backend(int8_onnx[0], qdq_fusion=False) as int8:
        reference = Prediction.concat([fp32.predict(image[None]) for image in images])
        candidate = Prediction.concat([int8.predict(image[None]) for image in images])
        threshold = fp32.image_threshold
    deltas = np.abs(reference.pred_score.astype(np.float64) - candidate.pred_score)
    decided = np.abs(reference.pred_score.astype(np.float64) - threshold) > THRESHOLD_BAND
    flips = int(((reference.pred_label != candidate.pred_label) & decided).sum())
    labels = torch.from_numpy(data.labels.astype(np.int64))

    def image_auroc(prediction: Prediction) -> float:
        return float(classification.BinaryAUROC()(torch.from_numpy(prediction.pred_score), labels))

    assert figures.images == len(images) == 6
    assert figures.max_score_delta == pytest.approx(deltas.max(), rel=1e-6, abs=1e-7)
    assert figures.mean_score_delta == pytest.approx(deltas.mean(), rel=1e-6, abs=1e-7)
    assert figures.max_map_delta == pytest.approx(np.abs(reference.anomaly_map - candidate.anomaly_map).max(), rel=1e-6)
    assert figures.flips_off_threshold == flips
    assert figures.label_agreement == pytest.approx(1 - flips / decided.sum())
    assert figures.image_auroc_reference == pytest.approx(image_auroc(reference), abs=1e-7)
    assert figures.image_auroc == pytest.approx(image_auroc(candidate), abs=1e-7)
    # Not a degenerate case: INT8 really moves the scores on this backbone.
    assert figures.max_score_delta > 1e-3


def test_a_graph_without_module_scopes_is_refused():
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones((1, 3, 1, 1), np.float32), "w")],
    )
    with pytest.raises(UserError, match="no backbone module scope"):
        backbone_nodes(helper.make_model(graph))


def test_calibration_images_are_spread_over_the_folder(dataset, tmp_path):
    picked = calibration_images(dataset.train_good, 3)
    everything = calibration_images(dataset.train_good)
    assert len(everything) == 6 and picked == [everything[0], everything[2], everything[5]]
    with pytest.raises(UserError, match="no images"):
        calibration_images(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        calibration_images(tmp_path / "missing")


def test_auroc_matches_pair_counting_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=60).astype(float)  # many ties
    labels = rng.random(60) < 0.4
    positive, negative = scores[labels], scores[~labels]
    pairs = (positive[:, None] > negative[None, :]).mean() + 0.5 * (positive[:, None] == negative[None, :]).mean()
    assert auroc(scores, labels) == pytest.approx(pairs)
    assert auroc(np.array([0.1, 0.2]), np.array([True, True])) is None


def test_labelled_folder_reads_mvtec_layout_and_plain_folders(dataset):
    data = labelled_folder(dataset.root)
    assert len(data.images) == 6 and int(data.labels.sum()) == 3
    assert all((mask is not None) == label for mask, label in zip(data.masks, data.labels, strict=True))
    plain = labelled_folder(dataset.train_good)
    assert plain.labels is None and len(plain.images) == 6


def test_budgets_name_what_they_break():
    figures = GateFigures(
        precision="int8",
        images=10,
        max_score_delta=0.2,
        mean_score_delta=0.1,
        max_map_delta=0.3,
        mean_map_delta=0.1,
        label_agreement=0.9,
        flips_off_threshold=1,
        image_auroc_reference=1.0,
        image_auroc=0.99,
        pixel_auroc_reference=None,
        pixel_auroc=None,
    )
    assert over_budget(figures, BUDGETS["int8"]) == [
        "label agreement 90.00% < 99%",
        "image AUROC drop 1.00 points > 0.5",
    ]
    assert over_budget(figures, BUDGETS["fp16"]) == [
        "max |delta score| 2.00e-01 > 0.001",
        "1 labels differ away from the threshold",
    ]
    # An unlabelled folder measures drift and label agreement only, and says AUROC was not measured.
    unlabelled = GateFigures(
        **{**figures.__dict__, "image_auroc": None, "image_auroc_reference": None, "label_agreement": 1.0}
    )
    assert over_budget(unlabelled, BUDGETS["int8"]) == []
    assert "AUROC not measured" in unlabelled.summary()


def _with_score_shift(source: Path, path: Path, shift: float) -> Path:
    """``source`` with ``shift`` added to its normalised image score before the clip and the threshold: a real
    graph whose score (and so its label) drifts by a known amount."""
    model = onnx.load(str(source))
    nodes = list(model.graph.node)
    clip = next(node for node in nodes if node.output[0] == "pred_score")
    model.graph.initializer.append(numpy_helper.from_array(np.array(shift, dtype=np.float32), "score_shift"))
    shifted = helper.make_node("Add", [clip.input[0], "score_shift"], ["shifted_score"], name="score_shift")
    clip.input[0] = "shifted_score"
    del model.graph.node[:]
    model.graph.node.extend([*nodes[: nodes.index(clip)], shifted, *nodes[nodes.index(clip) :]])
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("distance", [0.4 * THRESHOLD_BAND, 3 * THRESHOLD_BAND], ids=["inside-band", "outside"])
def test_a_flip_at_the_threshold_is_judged_the_same_for_fp16_and_int8(distance, resnet18_onnx, dataset, tmp_path):
    data = labelled_folder(dataset.root)
    threshold = read_onnx_metadata(resnet18_onnx).image_threshold
    with open_backend(resnet18_onnx) as backend:
        scores = [float(backend.predict(load_image(path)[None]).pred_score[0]) for path in data.images]
    target = next(index for index, score in enumerate(scores) if 0.01 < score < 0.99)  # an unclipped score
    # The reference puts that image just above the threshold, the candidate just below: one label flips.
    base = threshold - scores[target]
    reference = _with_score_shift(resnet18_onnx, tmp_path / "reference.onnx", base + distance)
    candidate = _with_score_shift(resnet18_onnx, tmp_path / "candidate.onnx", base - distance)
    labels = []
    for graph in (reference, candidate):
        with open_backend(graph) as backend:
            labels.append(bool(backend.predict(load_image(data.images[target])[None]).pred_label[0]))
    assert labels == [True, False]
    verdicts = {}
    for precision in ("fp16", "int8"):
        figures = evaluate(reference, candidate, data, precision)
        assert figures.max_score_delta == pytest.approx(2 * distance, rel=1e-3)
        verdicts[precision] = over_budget(figures, BUDGETS[precision])
        if distance < THRESHOLD_BAND:  # a tie: forgiven by both gates, the same band
            assert figures.flips_off_threshold == 0 and figures.label_agreement == 1.0
        else:  # a real flip: counted by both
            assert figures.flips_off_threshold == 1
    if distance < THRESHOLD_BAND:
        assert verdicts == {"fp16": [], "int8": []}
    else:
        assert "1 labels differ away from the threshold" in verdicts["fp16"]
        assert verdicts["int8"] == [f"label agreement {100 * (1 - 1 / len(data.images)):.2f}% < 99%"]


def test_the_gates_pixel_auroc_is_anomalibs_on_its_own_raw_maps(tmp_path):
    """The gate's pixel AUROC on a golden release's labelled set equals the figure anomalib's evaluator computes:
    torchmetrics' AUROC over that release's own raw (unnormalised) maps, with the masks resized as anomalib's
    pre-processor resizes them (torchvision's Resize of a Mask)."""
    torchmetrics = pytest.importorskip("torchmetrics.classification")
    import torch
    from golden import FIXTURES, checkpoint
    from PIL import Image
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    from patchcore_trt.checkpoint import read_checkpoint
    from patchcore_trt.export import export_onnx

    reference, _ = export_onnx(read_checkpoint(checkpoint("2.6.2")), tmp_path / "model.onnx")
    candidate = write_fp16_onnx(reference, tmp_path / "model.fp16.onnx")
    data = labelled_folder(FIXTURES / "data")
    figures = evaluate(reference, candidate, data, "fp16")

    golden = np.load(FIXTURES / "2.6.2" / "forward.npz")
    order = [str(path.relative_to(FIXTURES)) for path in data.images]
    assert sorted(order) == sorted(golden["files"])
    raw_maps, truth = [], []
    for path, mask in zip(data.images, data.masks, strict=True):
        index = list(golden["files"]).index(str(path.relative_to(FIXTURES)))
        raw = torch.from_numpy(golden["raw_map"][index])  # [1, h, w], before anomalib's normalisation
        if mask is None:
            pixels = torch.zeros(raw.shape, dtype=torch.bool)
        else:
            full = tv_tensors.Mask(torch.from_numpy(np.asarray(Image.open(mask).convert("L")) > 127)[None])
            pixels = v2.Resize(list(raw.shape[-2:]))(full)
        raw_maps.append(raw.reshape(-1))
        truth.append(pixels.reshape(-1).int())
    anomalib_pixel_auroc = torchmetrics.BinaryAUROC()(torch.cat(raw_maps), torch.cat(truth)).item()
    assert torch.cat(truth).any() and 0.5 < anomalib_pixel_auroc < 1.0
    assert figures.pixel_auroc_reference == pytest.approx(anomalib_pixel_auroc, abs=1e-5)
    # FP16 moves the maps by ~1e-4 at most, far too little to move the AUROC off anomalib's by a tenth of a point
    assert figures.pixel_auroc == pytest.approx(anomalib_pixel_auroc, abs=1e-3)
    assert figures.image_auroc_reference == pytest.approx(
        torchmetrics.BinaryAUROC()(
            torch.from_numpy(golden["raw_score"]), torch.tensor(["defect" in name for name in golden["files"]]).int()
        ).item(),
        abs=1e-6,
    )
