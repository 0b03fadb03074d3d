"""Another network wearing patchcore-trt's metadata: one error line saying the graph is not what the metadata
describes, on every ONNX runtime, before any image is read; never a runtime's traceback on the first batch."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from conftest import error_line, run_cli
from onnx import TensorProto, helper

from patchcore_trt.artifact import METADATA_KEY

EXPECTED = (
    "are not what its patchcore-trt metadata says (input image (rank 4); outputs pred_score (rank 1), "
    "pred_label (rank 1), anomaly_map (rank 4), pred_mask (rank 4)): another network with copied metadata?"
)


def _foreign(source: Path, path: Path, inputs: dict[str, int], outputs: dict[str, int]) -> Path:
    """A small network of its own (each output the ReduceMean of the input down to its rank), carrying the
    metadata of the patchcore-trt export ``source``."""
    metadata = {prop.key: prop.value for prop in onnx.load(str(source), load_external_data=False).metadata_props}
    (name, rank), = inputs.items()  # fmt: skip
    nodes = []
    for output, output_rank in outputs.items():
        axes = helper.make_tensor(f"{output}_axes", TensorProto.INT64, [rank - output_rank],
                                  list(range(output_rank, rank)))  # fmt: skip
        nodes += [helper.make_node("Constant", [], [f"{output}_axes_value"], value=axes),
                  helper.make_node("ReduceMean", [name, f"{output}_axes_value"], [output], keepdims=0)]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "foreign",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [None] * rank)],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [None] * r) for output, r in outputs.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    helper.set_model_props(model, {METADATA_KEY: metadata[METADATA_KEY]})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    ("inputs", "outputs", "shown"),
    [
        ({"x": 4}, {"y": 2}, "inputs [x (rank 4)] and outputs [y (rank 2)]"),
        ({"image": 4}, {"pred_score": 1, "pred_label": 1, "anomaly_map": 2, "pred_mask": 3},
         "inputs [image (rank 4)] and outputs [pred_score (rank 1), pred_label (rank 1), anomaly_map (rank 2), "
         "pred_mask (rank 3)]"),
        ({"image": 4}, {"pred_score": 1}, "inputs [image (rank 4)] and outputs [pred_score (rank 1)]"),
    ],
    ids=["other-names", "same-names-other-ranks", "outputs-missing"],
)  # fmt: skip
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_foreign_graph_with_copied_metadata_is_one_line(backend, inputs, outputs, shown, resnet18_onnx, tmp_path):
    foreign = _foreign(resnet18_onnx, tmp_path / "foreign.onnx", inputs, outputs)
    missing_images = tmp_path / "none"  # the model is refused before an input that matches nothing is
    result = run_cli("predict", foreign, missing_images, "--backend", backend)
    assert error_line(result) == f"error: {foreign}: the graph's {shown} {EXPECTED}"
