"""One label rule everywhere a label is shown: the result row, the terminal summary, the panel and the page.

anomalib 1.x labels raw >= threshold, so an image whose score sits exactly on the threshold (its adaptive
threshold is one validation image's own score) is anomalous; 2.x calls the same score normal. The golden 1.2.0
checkpoint is edited so one of its own test images scores exactly at the threshold.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import run_cli
from golden import FIXTURES, checkpoint, load_records, save_records
from PIL import Image

from patchcore_trt.checkpoint import read_checkpoint
from patchcore_trt.images import load_image
from patchcore_trt.model import PatchCoreDeploy
from patchcore_trt.outputs import Postprocess
from patchcore_trt.visuals import panel_layout

ANOMALOUS_BADGE = (215, 48, 39)


@pytest.fixture(scope="module")
def tie(tmp_path_factory: pytest.TempPathFactory):
    """(a 1.2.0 checkpoint whose image threshold is one test image's raw score, a folder holding that image)."""
    work = tmp_path_factory.mktemp("tie")
    name = str(np.load(checkpoint("1.2.0").parent / "forward.npz")["files"][0])
    folder = work / "images"
    folder.mkdir()
    image_path = shutil.copy(FIXTURES / name, folder / "tied.png")
    with torch.inference_mode():
        raw_score, _ = (
            PatchCoreDeploy(read_checkpoint(checkpoint("1.2.0")))
            .eval()
            .raw_scores(torch.from_numpy(load_image(image_path)[None]))
        )
    raw = load_records("1.2.0")
    raw["state_dict"]["image_threshold.value"] = raw_score.reshape(())
    return save_records(raw, work / "tie.ckpt"), folder


def test_a_1x_score_at_the_threshold_is_anomalous_in_the_row_the_summary_the_panel_and_the_page(tie, tmp_path):
    model, folder = tie
    outputs = {"--json": tmp_path / "r.json", "--save-visuals": tmp_path / "vis", "--report": tmp_path / "r.html"}
    result = run_cli("predict", model, folder, *[str(item) for pair in outputs.items() for item in pair])
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(outputs["--json"].read_text())["results"]
    assert row["score"] == 0.5 and row["threshold"] == 0.5 and row["label"] == "anomalous"
    assert "most anomalous (score >= 0.5 is anomalous):" in result.stdout
    assert "  0.5  anomalous  tied.png" in result.stdout
    (panel_path,) = outputs["--save-visuals"].glob("*.panel.png")
    panel = np.asarray(Image.open(panel_path).convert("RGB"))
    header = panel[: panel_layout((340, 300)).header[3]]
    badge = np.all(header[:, header.shape[1] // 2 :] == ANOMALOUS_BADGE, axis=-1)
    assert badge.sum() > 100, "the panel's badge is not the anomalous colour"
    page = outputs["--report"].read_text()
    assert 'figure class="anomalous"' in page and "score &gt;= 0.5 is anomalous" in page


@pytest.mark.parametrize(
    ("inclusive", "score", "label", "relation"),
    [(True, 0.5, True, ">="), (False, 0.5, False, "<="), (True, 0.6, True, ">"), (False, 0.4, False, "<")],
)
def test_one_rule_labels_and_words_a_score(inclusive, score, label, relation):
    post = Postprocess(0.0, 0.0, 0.0, 1.0, 0.0, 1.0, threshold_inclusive=inclusive)
    assert post.is_anomalous(score) is label and post.relation(score) == relation
    assert bool(post.label(np.float32([score]))[0]) is label
    assert post.rule == f"score {'>=' if inclusive else '>'} 0.5 is anomalous"


def test_the_rule_compares_in_float32_as_the_outputs_are():
    # 1 - 0.3 is not a float32 number: a float32 score equal to float32(0.7) sits on an inclusive threshold.
    post = Postprocess(0.0, 0.0, 0.0, 1.0, 0.0, 1.0, image_sensitivity=0.3, threshold_inclusive=True)
    assert post.is_anomalous(float(np.float32(0.7))) is True
    assert bool(post.label(np.float32([0.7]))[0]) is True
