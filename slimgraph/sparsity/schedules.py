"""Per-layer sparsity schedules for unstructured ``sparsify`` (issue 4).

A schedule gives every decoder block ``l`` its own sparsity ``s_l``; every linear of the
block is pruned at ``s_l`` (per comparison group, as with a uniform sparsity). Except for
explicit values, the schedule is shifted so that the *parameter-weighted* mean over the
pruned linears, ``Σ_l n_l s_l / Σ_l n_l`` (``n_l`` = weights of block ``l``'s pruned
linears), equals the requested sparsity ``s`` (see :func:`match_mean`).

- ``uniform`` -- ``s_l = s`` (the default).
- ``explicit`` -- ``layer_sparsity=0.4 0.45 ...``: one value per block, used as given; the
  overall sparsity is their parameter-weighted mean.
- ``linear`` -- ``s_l`` rises linearly from ``s - spread`` (first block) to
  ``s + spread`` (last block).
- ``owl`` -- Outlier-Weighted Layerwise sparsity (Yin et al. 2023, "Outlier Weighed
  Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity"):
  per block the outlier ratio ``D_l`` = share of the Wanda scores ``|W_ij| · ‖X_j‖₂`` of
  all the block's linears (pooled) that exceed ``M`` times their mean (``owl_m``, default
  5); ``D`` is min-max normalised to [0, 1] and mapped linearly onto densities in
  ``[1 - s - λ, 1 - s + λ]`` (``owl_lambda``, default 0.08), so blocks with more outliers
  keep more weights; ``s_l = 1 - density_l``, then shifted to the mean ``s``. This follows
  the reference implementation (github.com/luuyin/OWL, ``lib/prune_all.py``:
  ``check_outlier_mean`` for ``D_l``; ``prune_wanda_outlier``'s "after adjustment":
  ``(D - min D) / (max D - min D) · 2λ``, minus its mean, plus ``1 - s``), except that the
  mean is parameter-weighted (the reference's plain mean over blocks is the same when all
  blocks have the same size) and that equal outlier ratios (``max D = min D``, where the
  reference divides by zero) give the uniform schedule. The statistics ``‖X_j‖₂`` come
  from a dense block-sequential pass over the calibration windows
  (:func:`owl_outlier_ratios`), as in the reference: OWL needs every block's ratio before
  block 0 is pruned, and the pruning pass sees the activations of the already-pruned
  model, so its statistics cannot be reused; the extra pass is one dense forward of
  every block (Wanda's channel norms only, no Gram matrices).

When a shifted schedule leaves ``[LOW, HIGH]`` the offending values are clamped and the
others shifted further, keeping the mean (:func:`match_mean`); if no shift can reach the
mean, a :class:`ScheduleError` says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from slimgraph.errors import SlimgraphError

__all__ = ["HIGH", "LOW", "SCHEDULES", "ScheduleError", "linear_schedule", "match_mean",
           "outlier_ratio", "owl_outlier_ratios", "owl_schedule", "parse_layer_sparsity"]

SCHEDULES: tuple[str, ...] = ("uniform", "explicit", "linear", "owl")
LOW, HIGH = 0.01, 0.99
"""Bounds a shifted schedule is clamped to (per-layer sparsity strictly inside (0, 1))."""


class ScheduleError(SlimgraphError):
    """A per-layer schedule cannot be built (values outside (0, 1), a mean out of reach)."""


def parse_layer_sparsity(text: str) -> list[float]:
    """``"0.4 0.45 0.5"`` (space-separated like other list options; ``;``, ``,`` and
    surrounding brackets are accepted too) -> floats, each strictly inside (0, 1)."""
    values = []
    for tok in str(text).strip().strip("[]").replace(";", " ").replace(",", " ").split():
        try:
            v = float(tok)
        except ValueError:
            raise ValueError(f"{tok!r} is not a number (write e.g. layer_sparsity=0.4 0.5 0.6)"
                             ) from None
        if not 0.0 < v < 1.0:
            raise ValueError(f"{tok} is outside (0, 1)")
        values.append(v)
    if not values:
        raise ValueError("no values (write one sparsity per decoder block, e.g. "
                         "layer_sparsity=0.4 0.5 0.6)")
    return values


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    total = float(sum(weights))
    return sum(v * w for v, w in zip(values, weights)) / total


def match_mean(values: Sequence[float], weights: Sequence[float], target: float, *,
               low: float = LOW, high: float = HIGH) -> list[float]:
    """``clip(values + c, low, high)`` with the constant ``c`` chosen so that the
    ``weights``-weighted mean is ``target`` (exact up to float rounding).

    Without clamping ``c = target - mean``; when some values leave ``[low, high]`` they are
    clamped and ``c`` is found by bisection (the clamped mean is monotone in ``c``).
    """
    if len(values) != len(weights) or not values:
        raise ValueError("match_mean: values and weights must be non-empty and equally long")
    if not low <= target <= high:
        raise ScheduleError(f"a mean sparsity of {target:g} cannot be reached with every "
                            f"layer's sparsity in [{low:g}, {high:g}]")
    c = target - weighted_mean(values, weights)
    shifted = [v + c for v in values]
    if all(low <= v <= high for v in shifted):
        return shifted

    def mean_at(cc: float) -> float:
        return weighted_mean([min(high, max(low, v + cc)) for v in values], weights)

    lo_c, hi_c = low - max(values), high - min(values)  # all at low .. all at high
    for _ in range(200):
        mid = (lo_c + hi_c) / 2
        if mean_at(mid) < target:
            lo_c = mid
        else:
            hi_c = mid
    c = (lo_c + hi_c) / 2
    out = [min(high, max(low, v + c)) for v in values]
    if abs(weighted_mean(out, weights) - target) > 1e-9:
        raise ScheduleError(f"no shift of the schedule reaches a mean sparsity of {target:g} "
                            f"with every layer's sparsity in [{low:g}, {high:g}]")
    return out


def linear_schedule(sparsity: float, spread: float, n: int) -> list[float]:
    """``s - spread`` (first block) to ``s + spread`` (last block), evenly spaced (before
    :func:`match_mean`, which only moves it when the blocks differ in size)."""
    if n == 1:
        return [sparsity]
    return [sparsity - spread + 2.0 * spread * i / (n - 1) for i in range(n)]


def owl_schedule(ratios: Sequence[float], sparsity: float, lam: float) -> list[float]:
    """OWL's per-block sparsity from the outlier ratios ``D_l`` (before :func:`match_mean`):
    ``s_l = 1 - density_l``, ``density_l = 1 - s - λ + 2λ · (D_l - min D) / (max D - min D)``;
    all-equal ratios give ``s`` everywhere."""
    lo, hi = min(ratios), max(ratios)
    if hi - lo <= 0:
        return [sparsity] * len(ratios)
    return [1.0 - (1.0 - sparsity - lam + 2.0 * lam * (d - lo) / (hi - lo)) for d in ratios]


def outlier_ratio(scores: Callable[[], list[torch.Tensor]] | list[torch.Tensor], m: float) -> float:
    """OWL's ``D_l``: share of the pooled scores (of all a block's linears) greater than
    ``m`` times their mean (the reference's ``check_outlier_mean``, as a fraction, not %)."""
    mats = scores() if callable(scores) else scores
    total = sum(s.numel() for s in mats)
    mean = sum(float(s.sum(dtype=torch.float64)) for s in mats) / total
    return sum(int((s > m * mean).sum()) for s in mats) / total


def owl_outlier_ratios(observer, opts, m: float, *,
                       progress: Callable[..., None] | None = None) -> list[float]:
    """Outlier ratio ``D_l`` of every block from one dense pass on ``observer`` (a
    :class:`~slimgraph.structured.observer.BlockObserver` of the dense model: each block
    run once with its linears' input norms observed (Wanda's ``‖X_j‖₂``), its outputs
    feeding the next block; no weight is changed). ``opts``: the pass's options (which
    block linears are pruned)."""
    from slimgraph.sparsity.scores import score

    blocks = observer.blocks
    inputs = observer.first_inputs()
    ratios = []
    for i, blk in enumerate(blocks):
        observer.enter(blk)
        try:
            sites = [s for s in observer.sites(blk, opts).values() if not isinstance(s, dict)]
            stats, inputs = observer.statistics(blk, inputs, [s.param for s in sites],
                                                hessian=False, advance=i + 1 < len(blocks))
            mats = [score(s.read(), "wanda", act_norm=stats[s.param].act_norm()) for s in sites]
            ratios.append(outlier_ratio(mats, m))
            del mats, stats
        finally:
            observer.finished(blk, changed=False)
        if progress:
            note = observer.progress_note
            progress(i + 1, len(blocks), "blocks",
                     "OWL outlier ratios: dense pass" + (f", {note}" if note else ""))
    return ratios
