"""Mask selection and magnitude pruning: exact counts, checked against brute force."""
import pytest
import torch

from baselines import magnitude
from baselines.masks import layer_mask, nm_mask, row_mask
from oats.interface import Budget


def test_row_mask_matches_bruteforce():
    torch.manual_seed(0)
    s = torch.randn(7, 20)
    m = row_mask(s, 0.35)  # prunes floor(20*0.35)=7 per row
    for i in range(7):
        keep = set(sorted(range(20), key=lambda j: -s[i, j].item())[:13])
        assert set(torch.nonzero(m[i]).flatten().tolist()) == keep


def test_layer_mask_exact_count_and_threshold():
    torch.manual_seed(1)
    s = torch.randn(9, 11)
    m = layer_mask(s, 0.5)
    assert int(m.sum()) == 99 - int(99 * 0.5)
    assert s[m].min() > s[~m].max()


@pytest.mark.parametrize("n,mm", [(2, 4), (1, 4), (4, 8), (2, 8)])
def test_nm_mask_exact_per_group(n, mm):
    torch.manual_seed(2)
    s = torch.randn(5, 32)
    m = nm_mask(s, n, mm)
    groups = m.view(5, 32 // mm, mm)
    assert (groups.sum(-1) == n).all()
    sg = s.view(5, 32 // mm, mm)
    kept_min = torch.where(groups, sg, torch.inf).min(-1).values
    dropped_max = torch.where(~groups, sg, -torch.inf).max(-1).values
    assert (kept_min > dropped_max).all()


def test_nm_needs_divisible_inputs():
    with pytest.raises(ValueError, match="multiple of M=4"):
        nm_mask(torch.randn(2, 6), 2, 4)


def test_magnitude_layer_and_row_scope():
    torch.manual_seed(3)
    w = torch.randn(16, 64)
    out = magnitude.compress_weight(w, None, Budget(0.5)).dense
    assert int((out == 0).sum()) == 512
    thr = w.abs()[out != 0].min()
    assert (w.abs()[out == 0] <= thr).all()
    out_row = magnitude.compress_weight(w, None, Budget(0.5, scope="row")).dense
    assert ((out_row == 0).sum(1) == 32).all()
    assert torch.equal(out[out != 0], w[out != 0])
