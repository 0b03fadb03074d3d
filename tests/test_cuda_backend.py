"""The CUDA backend's pieces that run without a GPU: the search (torch path, and the Triton kernels through
Triton's interpreter), BatchNorm folding and fused ResNet blocks, the separable map, and the whole fast
model on the CPU against the FP32 deploy model. Fresh random inputs everywhere; nothing here is timed."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from interpreter import run_kernels
from torch import nn

from patchcore_trt.demo.synthetic_model import gaussian_taps, synthetic_spec, texture_images
from patchcore_trt.errors import UserError
from patchcore_trt.gpu.fast_model import FastPatchCore, SeparableMap, fold_batchnorm
from patchcore_trt.gpu.fused_resnet import FusedResNetFeatures, fuse_resnet
from patchcore_trt.gpu.knn import BankIndex, nearest
from patchcore_trt.model import AnomalyMap, MemoryBankSearch, PatchCoreDeploy, create_backbone
from patchcore_trt.runtime import backend_names


@pytest.fixture(scope="module")
def spec():
    return synthetic_spec(150, (64, 80), backbone="resnet18", seed=3)


def random_bank(seed: int, rows: int = 700, dim: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # A common offset, as post-ReLU features have: the products are large next to the distances.
    return torch.randn(rows, dim, generator=generator) + 2, torch.randn(90, dim, generator=generator) + 2


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_search_is_the_fp32_search(seed):
    bank, queries = random_bank(seed)
    index = BankIndex(bank, 9)
    expected, expected_rows = MemoryBankSearch(bank).nearest(queries)
    distances, rows = nearest(queries, index, "certified")
    torch.testing.assert_close(distances, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(rows, expected_rows)


def test_fast_search_is_within_fp16_rounding():
    bank, queries = random_bank(2)
    expected, _ = MemoryBankSearch(bank).nearest(queries)
    distances, rows = nearest(queries, BankIndex(bank, 9), "fp16")
    assert ((distances - expected).abs() / expected).max() < 1e-3
    assert rows.dtype == torch.int64 and rows.max() < len(bank)


def test_neighbour_table_is_the_k_nearest_search():
    bank, _ = random_bank(3, rows=300)
    index = BankIndex(bank, 9)
    assert torch.equal(index.neighbours, MemoryBankSearch(bank).k_nearest_indices(bank, 9))
    assert torch.equal(index.neighbours[:, 0], torch.arange(300))  # each row is its own nearest
    assert BankIndex(bank, 1).neighbours.shape == (300, 0)


def test_unknown_search_mode_is_refused():
    bank, queries = random_bank(4)
    with pytest.raises(ValueError, match="search mode"):
        nearest(queries, BankIndex(bank, 9), "approximate")


KERNEL_CHECK = """
import sys
import torch
from planted import COPIES, NEAR_TIE_ROWS, planted
from patchcore_trt.gpu import knn_triton
from patchcore_trt.gpu.knn import BankIndex, _centred_half, nearest, neighbour_table, rescore_cpu
from patchcore_trt.gpu.knn_triton import TileConfig, fast_finish, rescore, tile_candidates
from patchcore_trt.gpu.scan_triton import scan
from patchcore_trt.model import nearest_rows, squared_distances
device = sys.argv[1]
# Sizes that fill no block exactly: queries, bank tiles and the feature dimension all have tails.
bank, queries = planted(5, rows=300, dim=40, queries=70)
bank, queries = bank.to(device), queries.to(device)
index = BankIndex(bank, 9)
config = TileConfig(block_p=32, block_m=64, block_k=32, group_p=2, num_warps=4, num_stages=1)
half, factor, centred_sq = _centred_half(queries, index)
full = index.centred_sq - (half.float() @ index.bank_half.float().T) * factor
query_sq = queries.pow(2).sum(-1)
for keep in (1, 2, 5):
    values, rows = tile_candidates(half, index.bank_half, index.centred_sq, keep, factor, config)
    for tile in range(5):
        block = full[:, tile * 64 : (tile + 1) * 64]
        best = block.topk(min(keep, block.shape[1]), dim=1, largest=False).values
        torch.testing.assert_close(values[:, tile * keep : (tile + 1) * keep], best, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(full.gather(1, rows[:, tile * keep : (tile + 1) * keep].long()), best,
                                   rtol=1e-5, atol=1e-3)
    # The fast finish: the best candidate value plus the query's term.
    distances, found = fast_finish(centred_sq, values, rows)
    low, column = values.min(dim=1)
    assert torch.equal(found, rows.gather(1, column[:, None]).squeeze(1).long())
    torch.testing.assert_close(distances, (low + centred_sq).clamp_min(0).sqrt(), rtol=1e-6, atol=1e-6)
    # The exact re-score of picked rows (with exact ties among them: the planted copies).
    picked = torch.cat([rows[:, :keep].long(), torch.tensor([a for a, _ in COPIES], device=device).repeat(70, 1)], 1)
    picked[0, :2] = torch.tensor([COPIES[0][1], COPIES[0][0]])
    got = rescore(queries, query_sq, picked, index.bank, index.bank_sq)
    want = rescore_cpu(queries, query_sq, picked, index)
    assert torch.equal(got[1], want[1]) and got[1][0] == COPIES[0][0]
    # Squares: near-zero distances are square roots of FP32 cancellation noise in any summation order.
    torch.testing.assert_close(got[0].square(), want[0].square(), rtol=1e-5, atol=1e-4)
# The scan: anomalib's search of the whole bank for the flagged queries only.
flagged = torch.arange(70, device=device) % 3 == 0
distances, rows = scan(queries, query_sq, flagged, index.bank, index.bank_sq, block_p=16, block_m=64, groups=2)
expected, expected_rows = nearest_rows(queries, index.bank, index.bank_sq)
assert torch.equal(rows[flagged], expected_rows[flagged])
torch.testing.assert_close(distances[flagged].square(), expected[flagged].square(), rtol=1e-5, atol=1e-4)
# The whole exact search through the kernels: planted exact ties and the five-way near-tie.
distances, rows = nearest(queries, index)
assert torch.equal(rows, expected_rows)
assert rows[: len(COPIES)].tolist() == [a for a, _ in COPIES] and rows[len(COPIES)] == NEAR_TIE_ROWS[-1]
torch.testing.assert_close(distances.square(), expected.square(), rtol=1e-5, atol=1e-4)
# Features FP16 cannot hold (up to ~1e9): scaled exactly by a power of two before the cast.
big = BankIndex(bank * 2.0**28, 9)
distances, rows = nearest(queries * 2.0**28, big)
assert torch.equal(rows, expected_rows)
# The neighbour table from the candidate kernel, certified: the FP32 k-NN search of the bank against itself
# (anomalib's distances, the lower row first among equal ones: the planted copies tie).
everything = squared_distances(bank, bank, index.bank_sq).sqrt().sort(dim=1, stable=True).indices[:, :9]
assert torch.equal(index.neighbours, everything)
assert torch.equal(neighbour_table(index, 9), everything)
print("kernels agree")
"""

OFFSETS_CHECK = """
import torch, triton, triton.language as tl
from patchcore_trt.gpu.knn_triton import _offsets

@triton.jit
def offsets_kernel(rows_ptr, out_ptr, width, N: tl.constexpr):
    rows = tl.load(rows_ptr + tl.arange(0, N))
    tl.store(out_ptr + tl.arange(0, N), _offsets(rows, width))

rows = torch.tensor([0, 1, 2**20 + 3, 2**31 - 1], dtype=torch.int32)
out = torch.empty(4, dtype=torch.int64)
offsets_kernel[(1,)](rows, out, 1536, N=4)
assert out.tolist() == [r * 1536 for r in rows.tolist()], out  # past 2**31 elements: no int32 wrap
print("offsets agree")
"""


def test_triton_kernels_match_their_torch_specification():
    """The real kernels on odd sizes and planted ties: candidates, finish and scan against their torch
    specifications, the whole exact search and the neighbour table against the FP32 search."""
    run_kernels(KERNEL_CHECK, "kernels agree")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter checks the arithmetic; it needs no GPU memory")
def test_kernel_offsets_are_int64_past_two_to_the_31():
    run_kernels(OFFSETS_CHECK, "offsets agree")


def test_a_bank_past_int32_rows_gets_an_honest_message():
    pytest.importorskip("triton")
    from patchcore_trt.gpu.knn_triton import MAX_BANK_ROWS, check_bank_rows

    check_bank_rows(MAX_BANK_ROWS)
    with pytest.raises(UserError, match="32 bits"):
        check_bank_rows(MAX_BANK_ROWS + 1)


def _randomised_backbone(name: str) -> nn.Module:
    torch.manual_seed(0)
    backbone = create_backbone(name, ("layer2", "layer3")).eval()
    for norm in (m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)):
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.uniform_(-0.5, 0.2)
        norm.running_mean.uniform_(-0.2, 0.2)
        norm.running_var.uniform_(0.5, 2.0)
    return backbone


@pytest.mark.parametrize("name", ["resnet18", "wide_resnet50_2"])
def test_folded_and_fused_backbone_computes_timms_features(name):
    backbone = _randomised_backbone(name)
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = backbone(images)
        fused = fuse_resnet(fold_batchnorm(backbone))
        assert isinstance(fused, FusedResNetFeatures)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
        for got, want in zip(fused(images), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert fused.agrees_with_plain(images)


def test_networks_other_than_plain_resnets_are_not_fused():
    efficientnet = create_backbone("efficientnet_b0", ("blocks.2", "blocks.4"))
    assert fuse_resnet(fold_batchnorm(efficientnet)) is efficientnet
    unfolded = create_backbone("resnet18", ("layer2", "layer3"))  # BatchNorms still in place
    assert fuse_resnet(unfolded) is unfolded


def _no_fused_engine(self, x, tolerance):
    raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED")


@pytest.mark.parametrize("check", [lambda self, x, tolerance: False, _no_fused_engine], ids=["disagrees", "no engine"])
def test_a_disagreeing_fused_backbone_falls_back(spec, monkeypatch, check):
    """Fused convolutions that disagree with the plain walk, or that cuDNN cannot run, cost speed only."""
    model = FastPatchCore(spec, backbone_dtype="bf16")
    assert isinstance(model.backbone, FusedResNetFeatures)
    monkeypatch.setattr(FusedResNetFeatures, "agrees_with_plain", check)
    with pytest.warns(UserWarning, match="running unfused"):
        model.check_fused_backbone(torch.rand(1, 3, 64, 80))
    assert not isinstance(model.backbone, FusedResNetFeatures)


@pytest.mark.parametrize(("grid", "size"), [((8, 10), (64, 80)), ((7, 9), (50, 61)), ((32, 32), (256, 256))])
def test_separable_map_is_anomalibs_map(grid, size):
    taps = gaussian_taps()
    scores = torch.rand(3, 1, *grid, generator=torch.Generator().manual_seed(sum(grid))) * 40
    torch.testing.assert_close(SeparableMap(taps, size)(scores), AnomalyMap(taps, size)(scores), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("search", "tolerance"), [("certified", 1e-4), ("fp16", 1e-3)])
def test_fast_model_on_the_cpu_matches_the_deploy_model(spec, search, tolerance):
    images = torch.cat([texture_images(3, (64, 80), seed=11), texture_images(3, (64, 80), seed=12, defects=True)])
    floats = images.permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        expected = PatchCoreDeploy(spec).eval()(floats)
        got = FastPatchCore(spec, backbone_dtype="fp32", search=search).forward_uint8(images)
    assert (got.pred_score - expected.pred_score).abs().max() <= tolerance
    assert (got.anomaly_map - expected.anomaly_map).abs().max() <= tolerance
    assert torch.equal(got.pred_label, expected.pred_label)
    assert got.anomaly_map.shape == expected.anomaly_map.shape == (6, 1, 64, 80)


def test_map_at_input_size(spec):
    images = torch.rand(2, 3, 90, 70)
    with torch.no_grad():
        expected = PatchCoreDeploy(spec, map_at_input_size=True).eval()(images)
        got = FastPatchCore(spec, backbone_dtype="fp32", map_at_input_size=True)(images)
    assert got.anomaly_map.shape == (2, 1, 90, 70)
    assert (got.anomaly_map - expected.anomaly_map).abs().max() <= 1e-4


def test_options_are_checked(spec):
    with pytest.raises(ValueError, match="backbone_dtype"):
        FastPatchCore(spec, backbone_dtype="int4")
    with pytest.raises(ValueError, match="search"):
        FastPatchCore(spec, search="approximate")


def test_the_cuda_backend_is_registered_and_refuses_a_machine_without_gpu(spec, tmp_path):
    assert "cuda" in backend_names()
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from patchcore_trt.gpu.executor import CudaPatchCore

    with pytest.raises(UserError, match="sees no GPU"):
        CudaPatchCore(spec)


def _around(target: np.float32, scale: float, offset: float, ulps: int = 6) -> np.ndarray:
    """float32 raw values whose normalised value lands on, just under and just over ``target``."""
    centre = np.float32(offset + (float(target) - 0.5) * scale)
    values = [centre]
    for direction in (np.float32(-np.inf), np.float32(np.inf)):
        value = centre
        for _ in range(ulps):
            value = np.nextafter(value, direction)
            values.append(value)
    return np.sort(np.array(values, dtype=np.float32))


@pytest.fixture(scope="module")
def cpu_model(spec):
    return FastPatchCore(spec, backbone_dtype="fp32").eval()


@pytest.mark.parametrize("inclusive", [True, False])
@pytest.mark.parametrize("sensitivity", [0.5, 0.3])
def test_the_graphs_labels_and_masks_are_the_postprocess_rule(cpu_model, inclusive, sensitivity):
    """The executor downloads the labels and masks the graph computes (PatchCoreDeploy.outputs, in torch) instead
    of comparing again on the host: on values planted exactly at the float32 threshold they must be
    Postprocess's numpy rule, bit for bit."""
    from patchcore_trt.spec import Postprocess

    post = Postprocess(1.0, 3.0, 0.0, 2.0, 1.0, 5.0, sensitivity, sensitivity, threshold_inclusive=inclusive)
    model = copy.copy(cpu_model)
    model.post = post
    threshold = np.float32(1 - sensitivity)
    raw_scores = _around(threshold, 2.0, 1.0)
    raw_map = _around(threshold, 4.0, 3.0)
    out = model.outputs(
        torch.from_numpy(raw_scores), torch.from_numpy(raw_map).view(1, 1, 1, -1), input_size=spec_size(model)
    )
    score, anomaly_map = out.pred_score.numpy(), out.anomaly_map.numpy()
    for values in (score, anomaly_map.ravel()):
        assert (values == threshold).any() and (values < threshold).any() and (values > threshold).any()
    if sensitivity == 0.3:  # float32(0.7) < 0.7: a comparison in float64 would call the tie normal
        assert not float(threshold) >= 0.7
    np.testing.assert_array_equal(out.pred_label.numpy(), post.label(score))
    np.testing.assert_array_equal(out.pred_mask.numpy(), post.mask(anomaly_map))
    assert out.pred_label.numpy()[score == threshold].tolist() == [inclusive] * int((score == threshold).sum())
    assert out.pred_label.dtype == torch.bool and out.pred_mask.dtype == torch.bool


def spec_size(model: FastPatchCore) -> tuple[int, int]:
    return tuple(model.preprocess.settings.resize)


@pytest.mark.parametrize(("zero_range", "inclusive"), [(0.5, False), (0.5, True), (float("nan"), True)])
def test_a_zero_range_labels_as_the_postprocess_rule(cpu_model, zero_range, inclusive):
    from patchcore_trt.spec import Postprocess

    post = Postprocess(1.0, 1.0, 1.0, 1.0, 1.0, 1.0, zero_range=zero_range, threshold_inclusive=inclusive)
    model = copy.copy(cpu_model)
    model.post = post
    raw = torch.tensor([0.5, 1.0, 1.5])
    out = model.outputs(raw, raw.view(1, 1, 1, 3), input_size=spec_size(model))
    score = out.pred_score.numpy()
    np.testing.assert_array_equal(score, np.float32([0.0, zero_range, 1.0]))
    np.testing.assert_array_equal(out.pred_label.numpy(), post.label(score))
    np.testing.assert_array_equal(out.pred_mask.numpy(), post.mask(out.anomaly_map.numpy()))
    at_threshold = zero_range == 0.5 and inclusive  # NaN is never anomalous; 0.5 only under 1.x's rule
    assert out.pred_label.tolist() == [False, at_threshold, True]
