"""Input-channel permutation search for N:M (ALGORITHMS.md section 3)."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimgraph.sparsity.masks import is_nm, nm_mask
from slimgraph.sparsity.permutation import (
    heuristic_allocation,
    inverse_permutation,
    kept_score,
    lsa_table,
    permuted_nm_mask,
    refine_lsa,
    search_permutation,
)

SHAPES = [(16, 32), (8, 16), (32, 64), (24, 48)]
PATTERNS = [(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (4, 8)]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: thread start-up would dominate; also keeps the shared machine free."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rand_scores(c_out, c_in, seed, heavy=False):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(c_out, c_in, generator=g)
    if heavy:  # uneven channel scales, like activation-weighted scores
        s = s * torch.exp(2 * torch.randn(c_in, generator=g))
    return s


def is_perm(p, c_in):
    return (isinstance(p, torch.Tensor) and p.dtype == torch.int64 and p.shape == (c_in,)
            and torch.equal(torch.sort(p).values, torch.arange(c_in)))


def clustered(c_out=16, c_in=32, seed=0):
    """The important channels sit together (channels 0..c_in/4-1 fill the first groups of 4)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(c_out, c_in, generator=g)
    s[:, : c_in // 4] += 10.0
    return s


# ------------------------------------------------------------------ heuristic allocation


def test_heuristic_zigzag_hand_example():
    # column sums 5 1 7 3 8 2 6 4 (split unevenly over two rows: the column *sum* counts)
    sums = torch.tensor([5.0, 1, 7, 3, 8, 2, 6, 4])
    row0 = torch.tensor([5.0, 0, 1, 3, 0, 2, 6, 0])
    s = torch.stack([row0, sums - row0])
    # ascending: channels 1 5 3 7 0 6 2 4 -> segments [1 5] [3 7] [0 6] [2 4]
    # slot 0: [1 5]; slot 1 reversed: [7 3]; slot 2: [0 6]; slot 3 reversed: [4 2]
    perm = heuristic_allocation(s, 4)
    assert perm.tolist() == [1, 7, 0, 4, 5, 3, 6, 2]
    assert perm.dtype == torch.int64


def test_heuristic_each_group_holds_one_channel_per_quantile():
    s = rand_scores(8, 48, 3, heavy=True)
    m, k = 4, 12
    perm = heuristic_allocation(s, m)
    assert is_perm(perm, 48)
    rank = torch.empty(48, dtype=torch.int64)
    rank[torch.argsort(s.double().sum(0), stable=True)] = torch.arange(48)
    quantile = (rank[perm] // k).view(k, m)
    assert torch.equal(quantile, torch.arange(m).expand(k, m))
    # zig-zag: even slots ascend over the groups, odd slots descend
    r = rank[perm].view(k, m)
    for p in range(m):
        d = r[1:, p] - r[:-1, p]
        assert bool((d > 0).all()) if p % 2 == 0 else bool((d < 0).all())


def test_heuristic_ties_are_deterministic():
    s = torch.ones(4, 16)
    assert heuristic_allocation(s, 4).tolist() == heuristic_allocation(s.clone(), 4).tolist()
    assert heuristic_allocation(s, 4).view(4, 4)[:, 0].tolist() == [0, 1, 2, 3]


# ------------------------------------------------------------------ kept score and table


@pytest.mark.parametrize("n,m", PATTERNS)
def test_kept_score_matches_nm_mask(n, m):
    s = rand_scores(16, 32, 1, heavy=True)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(2))
    sp = s[:, perm]
    expected = float(sp.double()[nm_mask(sp, n, m)].sum())
    assert kept_score(s, perm, n, m) == pytest.approx(expected, rel=1e-12)
    assert kept_score(s, torch.arange(32), n, m) == pytest.approx(float(s.double()[nm_mask(s, n, m)].sum()),
                                                                  rel=1e-12)
    # the mask in original column order is N:M after permuting, and keeps the same total
    keep = permuted_nm_mask(s, perm, n, m)
    assert torch.equal(keep[:, perm], nm_mask(sp, n, m))
    assert is_nm(torch.where(keep, s, 0.0)[:, perm], n, m, axis=1)
    assert float(s.double()[keep].sum()) == pytest.approx(expected, rel=1e-12)


def brute_table(s, perm, n, m, p):
    s = s.double()[:, perm]
    k = s.shape[1] // m
    b = np.zeros((k, k))
    for r, c in itertools.product(range(k), range(k)):
        cols = list(range(r * m, (r + 1) * m))
        cols[p] = c * m + p
        b[r, c] = float(torch.topk(s[:, cols], n, dim=1).values.sum())
    return b


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (1, 2), (3, 8)])
def test_lsa_table_matches_brute_force(n, m):
    s = rand_scores(6, 5 * m, 7, heavy=True)
    s[0, :m] = 0.5  # ties inside a group
    perm = torch.randperm(5 * m, generator=torch.Generator().manual_seed(4))
    for p in range(m):
        np.testing.assert_allclose(lsa_table(s, perm, n, m, p), brute_table(s, perm, n, m, p), rtol=1e-12, atol=1e-12)


def test_lsa_table_diagonal_is_current_kept_score():
    s = rand_scores(8, 32, 5)
    perm = heuristic_allocation(s, 4)
    for p in range(4):
        assert float(np.trace(lsa_table(s, perm, 2, 4, p))) == pytest.approx(kept_score(s, perm, 2, 4), rel=1e-12)


# ------------------------------------------------------------------ search


@settings(max_examples=30, deadline=None)
@given(shape=st.sampled_from(SHAPES), pattern=st.sampled_from(PATTERNS), seed=st.integers(0, 2**16),
       heavy=st.booleans(), rounds=st.integers(1, 3))
def test_search_monotone_on_random_matrices(shape, pattern, seed, heavy, rounds):
    (c_out, c_in), (n, m) = shape, pattern
    if c_in % m:
        return
    s = rand_scores(c_out, c_in, seed, heavy)
    res = search_permutation(s, n, m, mode="exact", rounds=rounds)
    assert is_perm(res.perm, c_in)
    tol = 1e-9 * max(1.0, abs(res.kept_after))
    assert res.kept_after >= res.kept_heuristic - tol
    assert res.kept_after >= res.kept_before - tol
    assert res.kept_after == pytest.approx(kept_score(s, res.perm, n, m), rel=1e-12)
    assert res.kept_before == pytest.approx(kept_score(s, torch.arange(c_in), n, m), rel=1e-12)
    assert res.kept_heuristic == pytest.approx(kept_score(s, heuristic_allocation(s, m), n, m), rel=1e-12)
    assert res.seconds >= 0
    fast = search_permutation(s, n, m, mode="fast", blocks=2 if c_in // m >= 2 else 1, rounds=rounds)
    assert is_perm(fast.perm, c_in)
    assert fast.kept_after >= max(fast.kept_heuristic, fast.kept_before) - tol


@pytest.mark.parametrize("seed", [0, 1])
def test_search_fixes_clustered_channels(seed):
    s = clustered(seed=seed)
    res = search_permutation(s, 2, 4)
    assert res.kept_after > res.kept_before + 50  # the identity loses 2 important channels per group of 4
    assert res.kept_after >= res.kept_heuristic
    # every group of the result holds exactly two of the 8 important channels... or fewer; none loses one
    important = (res.perm < 8).view(8, 4).sum(dim=1)
    assert bool((important <= 2).all())


def test_refinement_strictly_improves_a_bad_start():
    s = clustered(seed=3)
    start = torch.arange(32)
    out = refine_lsa(s, start, 2, 4)
    assert is_perm(out, 32)
    assert kept_score(s, out, 2, 4) > kept_score(s, start, 2, 4)
    assert torch.equal(start, torch.arange(32))  # input not modified


def test_refinement_converged_is_slot_swap_optimal():
    s = rand_scores(8, 24, 11, heavy=True)
    n, m, k = 2, 4, 6
    perm = refine_lsa(s, heuristic_allocation(s, m), n, m, rounds=50)
    best = kept_score(s, perm, n, m)
    for p in range(m):
        # a single LSA step would not improve: no exchange of slot-p channels between two groups does either
        for a, b in itertools.combinations(range(k), 2):
            q = perm.clone()
            q[a * m + p], q[b * m + p] = perm[b * m + p], perm[a * m + p]
            assert kept_score(s, q, n, m) <= best + 1e-9


def test_refine_never_lowers_and_rounds_zero_is_identity():
    s = rand_scores(16, 32, 9)
    for seed in range(4):
        start = torch.randperm(32, generator=torch.Generator().manual_seed(seed))
        out = refine_lsa(s, start, 2, 4, rounds=2)
        assert kept_score(s, out, 2, 4) >= kept_score(s, start, 2, 4)
        assert torch.equal(refine_lsa(s, start, 2, 4, rounds=0), start)
    # a list is a valid perm too
    assert is_perm(refine_lsa(s, list(range(32)), 2, 4), 32)


def test_fast_mode_blocks_and_quality():
    s = rand_scores(64, 128, 21, heavy=True)
    exact = search_permutation(s, 2, 4, mode="exact")
    fast = search_permutation(s, 2, 4, mode="fast", blocks=4)
    assert fast.blocks == 4 and fast.mode == "fast"
    assert is_perm(fast.perm, 128)
    assert fast.kept_after >= fast.kept_heuristic
    assert fast.kept_heuristic == exact.kept_heuristic
    # each block only permutes channels within its own contiguous part of the heuristic order
    heur = heuristic_allocation(s, 4)
    for b in range(4):
        assert set(fast.perm[b * 32:(b + 1) * 32].tolist()) == set(heur[b * 32:(b + 1) * 32].tolist())
    # default block count: at most 256 channels per block
    assert search_permutation(s, 2, 4, mode="fast").blocks == 1
    assert torch.equal(search_permutation(s, 2, 4, mode="fast", blocks=1).perm, exact.perm)
    # uneven split: 32 groups into 3 blocks, all sizes multiples of M
    odd = search_permutation(s, 2, 4, mode="fast", blocks=3)
    assert is_perm(odd.perm, 128) and odd.kept_after >= odd.kept_heuristic


def test_default_fast_blocks_cap_channels():
    s = rand_scores(4, 640, 2)
    res = search_permutation(s, 2, 4, mode="fast")
    assert res.blocks == 3  # 160 groups, 64 groups (256 channels) per block at most
    assert search_permutation(s, 4, 8, mode="fast").blocks == 3


def test_deterministic_and_dtypes():
    s = rand_scores(16, 64, 13, heavy=True)
    a = search_permutation(s, 2, 4)
    b = search_permutation(s.clone(), 2, 4)
    assert torch.equal(a.perm, b.perm) and a.kept_after == b.kept_after
    h = search_permutation(s.half(), 2, 4)
    assert is_perm(h.perm, 64)
    i = search_permutation((s * 100).to(torch.int32), 2, 4)
    assert is_perm(i.perm, 64) and i.kept_after >= i.kept_before


def test_inverse_permutation():
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    inv = inverse_permutation(perm)
    x = torch.arange(24.0).view(2, 12)
    assert torch.equal(x[:, perm][:, inv], x)
    assert torch.equal(inverse_permutation(perm.tolist()), inv)


# ------------------------------------------------------------------ errors


def test_errors():
    s = torch.rand(4, 30)
    with pytest.raises(ValueError, match="multiple of 4"):
        search_permutation(s, 2, 4)
    with pytest.raises(ValueError, match="multiple of 4"):
        heuristic_allocation(s, 4)
    with pytest.raises(ValueError, match="multiple of 4"):
        kept_score(s, torch.arange(30), 2, 4)
    with pytest.raises(ValueError, match="multiple of 4"):
        refine_lsa(s, torch.arange(30), 2, 4)
    s = torch.rand(4, 16)
    with pytest.raises(ValueError, match="N:M"):
        search_permutation(s, 4, 4)
    with pytest.raises(ValueError, match="N:M"):
        kept_score(s, torch.arange(16), 0, 4)
    with pytest.raises(ValueError, match="mode"):
        search_permutation(s, 2, 4, mode="slow")
    with pytest.raises(ValueError, match="blocks"):
        search_permutation(s, 2, 4, mode="fast", blocks=5)
    with pytest.raises(ValueError, match="blocks"):
        search_permutation(s, 2, 4, mode="exact", blocks=2)
    with pytest.raises(ValueError, match="rounds"):
        search_permutation(s, 2, 4, rounds=-1)
    with pytest.raises(ValueError, match="not a permutation"):
        kept_score(s, torch.zeros(16, dtype=torch.long), 2, 4)
    with pytest.raises(ValueError, match="length"):
        refine_lsa(s, torch.arange(8), 2, 4)
    with pytest.raises(ValueError, match="integers"):
        kept_score(s, torch.arange(16.0), 2, 4)
    with pytest.raises(ValueError, match="slot"):
        lsa_table(s, torch.arange(16), 2, 4, 4)
    with pytest.raises(ValueError, match="2-D"):
        search_permutation(torch.rand(16), 2, 4)
    with pytest.raises(ValueError, match="NaN"):
        search_permutation(torch.full((4, 16), float("nan")), 2, 4)
    with pytest.raises(ValueError, match="M"):
        heuristic_allocation(s, 1)
    with pytest.raises(TypeError):
        search_permutation(s.numpy(), 2, 4)
