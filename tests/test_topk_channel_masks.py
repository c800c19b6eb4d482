"""topk_channel_masks against a sort-based oracle: ties to the lower index, NaN lowest."""

import pytest
import torch

import cahfp_ops
from helpers import DTYPES


def oracle(scores_row: torch.Tensor, keep: int) -> torch.Tensor:
    """Kept indices, ascending, by an explicit Python sort key."""
    vals = scores_row.double().tolist()
    order = sorted(range(len(vals)), key=lambda i: (vals[i] != vals[i], -vals[i] if vals[i] == vals[i] else 0, i))
    return torch.tensor(sorted(order[:keep]), dtype=torch.int64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [1, 2, 7, 64, 129])
def test_rows_match_oracle(backend, gen, dtype, C):
    K = 6
    scores = torch.randn(K, C, generator=gen).to(dtype)
    # ties, NaN and infinities
    scores[1] = scores[1].round()
    if C > 2:
        scores[2, 0] = float("nan")
        scores[2, C // 2] = float("inf")
        scores[3, 1] = float("-inf")
        scores[3, 2] = float("nan")
    scores[4] = 0.5
    scores[5] = float("nan")
    keep = torch.randint(1, C + 1, (K,), generator=gen)
    before = scores.clone()
    mask, idx = cahfp_ops.topk_channel_masks(scores, keep)
    assert mask.dtype == torch.bool and mask.shape == (K, C)
    assert idx.dtype == torch.int64 and idx.shape == (K, int(keep.max()))
    for k in range(K):
        exp = oracle(scores[k], int(keep[k]))
        n = int(keep[k])
        assert torch.equal(idx[k, :n], exp), (k, scores[k], idx[k], exp)
        assert (idx[k, n:] == -1).all()
        assert int(mask[k].sum()) == n and mask[k, exp].all()
    assert torch.equal(scores.view(torch.uint8), before.view(torch.uint8))


def test_one_dim_and_int_keep(backend, gen):
    scores = torch.randn(11, generator=gen)
    mask, idx = cahfp_ops.topk_channel_masks(scores, 4)
    assert mask.shape == (11,) and idx.shape == (4,)
    assert torch.equal(idx, oracle(scores, 4))
    mask2, idx2 = cahfp_ops.topk_channel_masks(scores.expand(3, 11), [4, 4, 4])
    assert torch.equal(idx2, idx.expand(3, 4)) and torch.equal(mask2, mask.expand(3, 11))
    _, idx3 = cahfp_ops.topk_channel_masks(scores.expand(2, 11), 11)
    assert torch.equal(idx3[0], torch.arange(11))


def test_ties_prefer_lower_index(backend):
    scores = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0, 3.0]])
    _, idx = cahfp_ops.topk_channel_masks(scores, [2])
    assert idx.tolist() == [[1, 2]]
    _, idx = cahfp_ops.topk_channel_masks(torch.tensor([float("nan"), -float("inf"), float("nan")]), 2)
    assert idx.tolist() == [0, 1]
