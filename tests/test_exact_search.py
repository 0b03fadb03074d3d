"""The certified exact search (gpu/knn.py, CPU path) against anomalib's own PatchcoreModel functions
(``euclidean_dist`` + ``min(1)``, ``compute_anomaly_score``, ``anomaly_map_generator``) on banks with planted
exact ties and near-ties (tests/planted.py), and the deploy model's search with anomalib's tie rule. The same
checks run on the Triton kernels in tests/test_cuda_backend.py (interpreter here, compiled on a GPU)."""

from __future__ import annotations

import functools
import types

import pytest
import torch
from planted import COPIES, NEAR_TIE_ROWS, planted, planted_images

from patchcore_trt.gpu.knn import BankIndex, candidates, certified_pass, nearest, power_of_two_scale
from patchcore_trt.model import MemoryBankSearch

patchcore = pytest.importorskip("anomalib.models.image.patchcore.torch_model")


def anomalib_model(bank: torch.Tensor, num_neighbors: int = 9) -> types.SimpleNamespace:
    """The parts of anomalib's PatchcoreModel that search and score, bound to ``bank`` (no backbone needed)."""
    model = types.SimpleNamespace(
        memory_bank=bank, num_neighbors=num_neighbors, euclidean_dist=patchcore.PatchcoreModel.euclidean_dist
    )
    model.nearest_neighbors = functools.partial(patchcore.PatchcoreModel.nearest_neighbors, model)
    return model


def anomalib_nearest(bank: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return anomalib_model(bank).nearest_neighbors(queries, n_neighbors=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_ties_give_anomalibs_rows_and_distances(seed):
    bank, queries = planted(seed)
    expected, expected_rows = anomalib_nearest(bank, queries)
    assert expected_rows[: len(COPIES)].tolist() == [original for original, _ in COPIES]  # the lowest index
    assert expected_rows[len(COPIES)] == NEAR_TIE_ROWS[-1]
    for search in (nearest(queries, BankIndex(bank, 9)), MemoryBankSearch(bank).nearest(queries)):
        distances, rows = search
        assert torch.equal(rows, expected_rows)
        # Squares: near-zero distances are square roots of FP32 cancellation noise in any summation order.
        torch.testing.assert_close(distances.square(), expected.square(), rtol=1e-6, atol=1e-4)


def test_the_near_tie_is_not_certified_and_is_rescanned():
    """Positive control: FP16 cannot separate the five near-tied rows, so the certificate must refuse the query
    (the full FP32 scan then answers it); the random queries are certified."""
    bank, queries = planted(0)
    _, _, flagged, _ = certified_pass(queries, BankIndex(bank, 9))
    assert flagged[len(COPIES)]
    assert not flagged[len(COPIES) + 1 :].any()


def test_score_and_map_at_a_tied_argmax_patch_are_anomalibs():
    from patchcore_trt.demo.synthetic_model import synthetic_spec
    from patchcore_trt.gpu.fast_model import FastPatchCore

    bank, queries = planted(0)
    images = planted_images(bank, queries)
    model = anomalib_model(bank)
    flat = images.reshape(-1, bank.shape[1])
    ref_distances, ref_rows = model.nearest_neighbors(flat, n_neighbors=1)
    ref_score = patchcore.PatchcoreModel.compute_anomaly_score(
        model, ref_distances.view(2, -1), ref_rows.view(2, -1), images
    )
    fast = FastPatchCore(synthetic_spec(50, (32, 32), backbone="resnet18", seed=1), backbone_dtype="fp32")
    fast.index = BankIndex(bank, 9)  # a model that searches the planted bank
    fast.num_neighbors = 9
    distances, rows = nearest(flat, fast.index)
    assert torch.equal(rows, ref_rows)
    assert rows.view(2, -1)[0, 5] == NEAR_TIE_ROWS[-1] and rows.view(2, -1)[1, 3] == COPIES[0][0]
    score = fast.image_scores(distances.view(2, -1), rows.view(2, -1), images)
    torch.testing.assert_close(score, ref_score, rtol=2e-5, atol=0)  # FP32 summation orders differ
    # The argmax patch's row is searched again over the whole bank: a wrong row there (the near-tied one FP16
    # cannot tell apart) does not reach the score.
    wrong = rows.clone().view(2, -1)
    wrong[0, 5] = NEAR_TIE_ROWS[-2]
    assert torch.equal(fast.image_scores(distances.view(2, -1), wrong, images), score)
    fast.index = BankIndex(bank, 9)  # the same bank, with the wrong row's support set:
    fast.index.neighbours[NEAR_TIE_ROWS[-1]] = fast.index.neighbours[NEAR_TIE_ROWS[-2]]
    assert (fast.image_scores(distances.view(2, -1), rows.view(2, -1), images)[0] - ref_score[0]).abs() > 1e-4
    generator = patchcore.AnomalyMapGenerator()
    grid = (3, 4)
    ref_map = generator(ref_distances.view(2, 1, *grid), image_size=(32, 32))
    torch.testing.assert_close(
        generator(distances.view(2, 1, *grid), image_size=(32, 32)), ref_map, rtol=1e-6, atol=1e-5
    )


def test_features_beyond_fp16s_range_are_searched_exactly():
    """Values up to 1e8 (FP16 overflows at 65504): the power-of-two scaling keeps the candidates finite."""
    bank, queries = planted(3)
    bank, queries = bank * 2.0**26, queries * 2.0**26
    expected, expected_rows = anomalib_nearest(bank, queries)
    index = BankIndex(bank, 9)
    assert torch.isfinite(index.bank_half).all() and index.bank_half.abs().max() >= 2**13
    values, _, _ = candidates(queries, index, 2)
    assert torch.isfinite(values).all()
    distances, rows = nearest(queries, index)
    assert torch.equal(rows, expected_rows)
    torch.testing.assert_close(distances.square(), expected.square(), rtol=1e-6, atol=1e-4 * 2.0**52)


def test_power_of_two_scale_is_exact_and_in_range():
    for value in (1e-30, 0.3, 1.0, 65504.0, 3e8, 1e30):
        scale = power_of_two_scale(torch.tensor(value))
        mantissa, _ = torch.frexp(scale)
        assert mantissa == 0.5  # a power of two: scaling by it is exact
        assert 2**13 <= value * scale < 2**14


def test_deploy_search_takes_the_lowest_row_among_equal_square_roots():
    """Two squared distances one ulp apart can share a square root: anomalib compares the roots (min over
    sqrt'd distances), so the lower row wins; a minimum over the squares would take the higher one."""
    bank = torch.zeros(4, 1)
    # About half the neighbouring squares near 1e6 share a root (roots are twice as coarse there); take the first
    # pair below 1e6 that does, as this machine's sqrt rounds.
    squared = torch.tensor(1e6)
    for _ in range(64):
        neighbour = torch.nextafter(squared, torch.tensor(0.0))
        if neighbour.sqrt() == squared.sqrt():
            break
        squared = neighbour
    assert neighbour.sqrt() == squared.sqrt() and neighbour != squared
    bank[0, 0], bank[3, 0] = squared.sqrt(), neighbour.sqrt()  # distances from 0 whose squares differ
    bank[1:3, 0] = 5e3
    query = torch.zeros(1, 1)
    expected, expected_rows = anomalib_nearest(bank, query)
    distances, rows = MemoryBankSearch(bank, chunk=2).nearest(query)
    assert rows.tolist() == expected_rows.tolist()
    assert torch.equal(distances, expected)
