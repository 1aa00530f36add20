"""The refit kernel and OBS selection (tensors in, tensors out)."""

from __future__ import annotations

import itertools

import pytest
import torch

from slimgraph.structured.refit import Reader, obs_costs, obs_select, refit_columns


def _data(c_out=6, c_in=10, tokens=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(c_in, c_in, generator=g, dtype=torch.float64)
    X = torch.randn(tokens, c_in, generator=g, dtype=torch.float64) @ mix  # correlated inputs
    W = torch.randn(c_out, c_in, generator=g, dtype=torch.float64)
    return W, X, X.T @ X


def test_refit_is_the_least_squares_fit_of_the_kept_columns():
    W, X, H = _data()
    removed = [1, 4, 7]
    new, info = refit_columns(W, H, removed, damp=0.0)
    kept = [j for j in range(W.shape[1]) if j not in removed]
    # argmin_V || X W^T - X_S V^T ||
    V = torch.linalg.lstsq(X[:, kept], X @ W.T).solution.T
    torch.testing.assert_close(new[:, kept], V, rtol=1e-8, atol=1e-8)
    assert bool((new[:, removed] == 0).all())
    # the errors the report gives are the calibration output errors
    assert info["error_refit"] == pytest.approx(float((X @ (new - W).T).pow(2).sum()), rel=1e-9)
    assert info["error_no_update"] == pytest.approx(float((X[:, removed] @ W[:, removed].T)
                                                          .pow(2).sum()), rel=1e-9)
    assert info["error_refit"] < 0.5 * info["error_no_update"]
    assert (info["removed"], info["kept"]) == (3, 7)


def test_refit_keeps_dtype_and_handles_damping_and_dead_inputs():
    W, X, H = _data()
    H[2, :] = H[:, 2] = 0  # a dead input channel
    new, info = refit_columns(W.float(), H.float(), [2, 5], damp=0.01)
    assert new.dtype == torch.float32 and new.shape == W.shape
    assert bool(torch.isfinite(new).all()) and bool((new[:, [2, 5]] == 0).all())
    assert info["error_refit"] <= info["error_no_update"]
    same, _ = refit_columns(W, H, [], damp=0.01)
    torch.testing.assert_close(same, W)


def test_obs_cost_is_the_error_left_after_the_optimal_update():
    W, X, H = _data()
    units = [[0], [1, 2], [3], [4, 5, 6], [7], [8, 9]]
    costs = obs_costs([Reader(W, H, units)], damp=0.0)
    for u, cols in enumerate(units):
        _, info = refit_columns(W, H, cols, damp=0.0)
        assert float(costs[u]) == pytest.approx(info["error_refit"], rel=1e-6)
    # two readers: the costs add up
    W2 = torch.randn(3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    both = obs_costs([Reader(W, H, units), Reader(W2, H, units)], damp=0.0)
    torch.testing.assert_close(both, costs + obs_costs([Reader(W2, H, units)], damp=0.0))


def test_obs_select_one_batch_takes_the_cheapest_and_greedy_steps_are_optimal_here():
    W, X, H = _data(c_in=8)
    units = [[j] for j in range(8)]
    costs = obs_costs([Reader(W, H, units)], damp=0.0)
    one = obs_select([Reader(W, H, units)], 3, steps=1, damp=0.0)
    assert one == sorted(torch.argsort(costs)[:3].tolist())
    # greedy one unit per step never does worse than one batch, and for a single unit it is
    # the exhaustive optimum
    greedy = obs_select([Reader(W, H, units)], 3, steps=3, damp=0.0)
    err = {s: refit_columns(W, H, list(s), damp=0.0)[1]["error_refit"]
           for s in itertools.combinations(range(8), 3)}
    assert err[tuple(greedy)] <= err[tuple(one)] + 1e-9
    best1 = min(range(8), key=lambda j: refit_columns(W, H, [j], damp=0.0)[1]["error_refit"])
    assert obs_select([Reader(W, H, units)], 1, steps=1, damp=0.0) == [best1]
    # columns already removed (by another group of the layer): costs are increments
    after = obs_costs([Reader(W, H, units)], damp=0.0, removed_before=[[1]])
    e1 = refit_columns(W, H, [1], damp=0.0)[1]["error_refit"]
    assert float(after[0]) == pytest.approx(
        refit_columns(W, H, [0, 1], damp=0.0)[1]["error_refit"] - e1, rel=1e-6)
    with pytest.raises(ValueError, match="at least one is kept"):
        obs_select([Reader(W, H, units)], 8)
