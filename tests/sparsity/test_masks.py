"""Unstructured / N:M masks, pattern parsing and N:M verification."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimgraph.sparsity.masks import (
    is_nm,
    nm_mask,
    nm_violations,
    parse_pattern,
    prune_count,
    unstructured_mask,
)

PATTERNS = [(1, 2), (2, 4), (4, 8)]


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 40), sparsity=st.floats(0, 1), seed=st.integers(0, 2**16),
       ties=st.booleans())
def test_unstructured_exact_counts(rows, cols, sparsity, seed, ties):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(rows, cols, generator=g)
    if ties:
        s = (s * 3).round()
    keep = unstructured_mask(s, sparsity, "layer")
    assert int((~keep).sum()) == round(sparsity * rows * cols)
    # everything pruned scores <= everything kept
    if keep.any() and (~keep).any():
        assert s[~keep].max() <= s[keep].min()
    keep = unstructured_mask(s, sparsity, "row")
    assert ((~keep).sum(dim=1) == round(sparsity * cols)).all()
    for r in range(rows):
        if keep[r].any() and (~keep[r]).any():
            assert s[r][~keep[r]].max() <= s[r][keep[r]].min()


def test_unstructured_ties_deterministic_and_layer_vs_row():
    s = torch.tensor([[1.0, 1.0, 5.0, 6.0],
                      [7.0, 8.0, 9.0, 1.0]])
    keep = unstructured_mask(s, 0.25, "layer")  # 2 lowest overall: (0,0), (0,1) before (1,3)
    assert (~keep).nonzero().tolist() == [[0, 0], [0, 1]]
    keep = unstructured_mask(s, 0.25, "row")
    assert (~keep).nonzero().tolist() == [[0, 0], [1, 3]]
    assert torch.equal(unstructured_mask(s, 0.25, "layer"), unstructured_mask(s.clone(), 0.25, "layer"))


def test_unstructured_errors():
    s = torch.rand(2, 4)
    with pytest.raises(ValueError, match="scope"):
        unstructured_mask(s, 0.5, "block")
    with pytest.raises(ValueError, match="sparsity"):
        unstructured_mask(s, 1.5)
    with pytest.raises(ValueError, match="NaN"):
        unstructured_mask(torch.tensor([[float("nan"), 1.0]]), 0.5)
    assert prune_count(10, 0.5) == 5 and prune_count(7, 0.0) == 0 and prune_count(7, 1.0) == 7


def brute_nm(s, n, m):
    keep = torch.zeros_like(s, dtype=torch.bool)
    for r in range(s.shape[0]):
        for g0 in range(0, s.shape[1], m):
            best = max(itertools.combinations(range(m), n),
                       key=lambda c: sum(float(s[r, g0 + j]) for j in c))
            for j in best:
                keep[r, g0 + j] = True
    return keep


@settings(max_examples=40, deadline=None)
@given(pat=st.sampled_from(PATTERNS), rows=st.integers(1, 6), groups=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_nm_mask_random(pat, rows, groups, seed):
    n, m = pat
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, groups * m, generator=g)
    keep = nm_mask(s, n, m)
    assert keep.dtype == torch.bool and keep.shape == s.shape
    w = torch.randn(rows, groups * m, generator=g) * keep
    assert is_nm(w, n, m, axis=1)
    assert nm_violations(w, n, m, axis=1) == (0, rows * groups)
    # exactly N kept per group, and they are the top-N (distinct random scores)
    assert (keep.reshape(rows, groups, m).sum(-1) == n).all()
    assert torch.equal(keep, brute_nm(s, n, m))


def _reference_nm(scores, n, m):
    """The reference implementations' N:M loop (Wanda's prune_wanda / SparseGPT): per
    group of m columns, prune the m - n that torch.topk(largest=False) returns."""
    mask = torch.zeros_like(scores, dtype=torch.bool)  # True = pruned
    for ii in range(scores.shape[1]):
        if ii % m == 0:
            tmp = scores[:, ii:(ii + m)].float()
            mask.scatter_(1, ii + torch.topk(tmp, m - n, dim=1, largest=False)[1], True)
    return ~mask


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_mask_breaks_ties_as_the_reference_does(n, m):
    """Scores with many exact ties (magnitudes of a few levels, like bf16 weights): the
    mask is the reference loop's, entry for entry."""
    g = torch.Generator().manual_seed(n * 10 + m)
    s = torch.randint(0, 4, (64, 16 * m), generator=g).float().abs()
    keep = nm_mask(s, n, m)
    assert torch.equal(keep, _reference_nm(s, n, m))
    assert (keep.reshape(64, 16, m).sum(-1) == n).all()
    groups = s.reshape(64, 16, m)
    kept_min = torch.where(keep.reshape(64, 16, m), groups, torch.inf).amin(-1)
    pruned_max = torch.where(keep.reshape(64, 16, m), -torch.inf, groups).amax(-1)
    assert (kept_min >= pruned_max).all()  # a valid top-n whatever the tie-break


def test_nm_mask_ties_and_errors():
    s = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 3.0, 3.0, 2.0]])
    keep = nm_mask(s, 2, 4)
    assert keep[0, 4:].tolist() == [False, True, True, False]
    assert int(keep[0, :4].sum()) == 2 and torch.equal(keep, _reference_nm(s, 2, 4))
    with pytest.raises(ValueError, match="6.*multiple of 4|multiple of 4.*6"):
        nm_mask(torch.rand(2, 6), 2, 4)
    with pytest.raises(ValueError):
        nm_mask(torch.rand(2, 8), 4, 4)


@pytest.mark.parametrize("text,expect", [("2:4", (2, 4)), ("1:2", (1, 2)), (" 4 : 8 ", (4, 8)), ((2, 4), (2, 4))])
def test_parse_pattern_ok(text, expect):
    assert parse_pattern(text) == expect


@pytest.mark.parametrize("bad", ["4:2", "0:4", "4:4", "a:b", "2-4", "2:4:8", "", "-1:4", "2.0:4", None, 24, (1,)])
def test_parse_pattern_errors(bad):
    with pytest.raises(ValueError):
        parse_pattern(bad)


def test_is_nm_both_axes():
    torch_w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 3.0, 4.0],
                            [0.0, 5.0, 0.0, 6.0, 7.0, 0.0, 0.0, 0.0]])  # [C_out=2, C_in=8], 2:4 on axis 1
    assert is_nm(torch_w, 2, 4, axis=1)
    assert nm_violations(torch_w, 2, 4, axis=1) == (0, 4)
    assert nm_violations(torch_w, 1, 4, axis=1) == (3, 4)
    # ONNX MatMul B [K, N] = W.T: groups along axis 0, numpy input
    b = torch_w.T.numpy().copy()
    assert is_nm(b, 2, 4, axis=0)
    assert nm_violations(b, 2, 4, axis=0) == (0, 4)
    assert is_nm(b, 2, 4, axis=-2)
    b[1, 0] = 9.0  # group rows 0..3 of column 0 now has 3 nonzeros
    assert not is_nm(b, 2, 4, axis=0)
    assert nm_violations(b, 2, 4, axis=0) == (1, 4)
    with pytest.raises(ValueError, match="multiple"):
        is_nm(b, 2, 4, axis=1)  # size 2 along axis 1
    with pytest.raises(ValueError, match="out of range"):
        is_nm(b, 2, 4, axis=2)


def test_is_nm_conv_and_dtypes():
    # Conv W[K, C, R, S]: groups along C separately per (k, r, s)
    w = np.zeros((3, 8, 2, 2), dtype=np.float16)
    w[:, 0] = 1
    w[:, 5] = 1
    assert is_nm(w, 2, 4, axis=1)
    w[0, 1, 1, 1] = 1
    w[0, 2, 1, 1] = 1
    assert nm_violations(w, 2, 4, axis=1) == (1, 3 * 2 * 2 * 2)
    assert is_nm(torch.zeros(4, 8, dtype=torch.bfloat16), 2, 4, axis=1)
