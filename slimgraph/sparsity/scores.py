"""Importance scores for post-training pruning of a linear weight ``W [C_out, C_in]``.

ALGORITHMS.md section 1 (``‖X_j‖₂`` = L2 norm of input channel ``j`` over all
calibration tokens, see :meth:`slimgraph.sparsity.reconstruct.GramAccumulator.act_norm`):

=========  ==============================================================
magnitude  ``|W_ij|``
wanda      ``|W_ij| · ‖X_j‖₂``
ri         ``|W_ij| / Σ_k |W_kj|  +  |W_ij| / Σ_k |W_ik|``
           (share of its input column + share of its output row)
ria        ``RI_ij · (‖X_j‖₂)^a``, default ``a = 0.5``
=========  ==============================================================

Scores are computed in float32 in the reference implementations' order of operations
(Wanda's and RIA's ``W_metric``), so that the same statistics give the same masks bit for
bit; ``act_norm`` may be ``‖X_j‖₂`` up to a per-layer constant, which no ranking sees. A row
or column whose absolute sum is zero contributes 0 (its entries are all zero anyway;
the reference code would divide 0 by 0).
"""

from __future__ import annotations

import math

import torch

__all__ = ["SCORE_METHODS", "SCORES_NEED_DATA", "score"]

SCORE_METHODS: tuple[str, ...] = ("magnitude", "wanda", "ri", "ria")
"""Every method :func:`score` accepts."""

SCORES_NEED_DATA: frozenset[str] = frozenset({"wanda", "ria"})
"""Methods that need the calibration statistic ``act_norm``."""


def _check_act_norm(act_norm, c_in: int, method: str) -> torch.Tensor:
    if act_norm is None:
        raise ValueError(f"score '{method}' needs act_norm (the L2 norm of every input channel over "
                         f"the calibration tokens, shape [{c_in}]); got None")
    act = torch.as_tensor(act_norm)
    if act.dim() != 1 or act.shape[0] != c_in:
        raise ValueError(f"score '{method}': act_norm must have shape [{c_in}] (one value per input "
                         f"channel), got {list(act.shape)}")
    act = act.to(torch.float32)
    if not bool(torch.isfinite(act).all()):
        raise ValueError(f"score '{method}': act_norm has non-finite values")
    if bool((act < 0).any()):
        raise ValueError(f"score '{method}': act_norm has negative values (it is a norm)")
    return act


def _ri(absw: torch.Tensor) -> torch.Tensor:
    """Relative importance of an absolute-valued float32 matrix (zero-sum guarded)."""
    col = torch.sum(absw, dim=0)  # Σ_k |W_kj|, [C_in]
    row = torch.sum(absw, dim=1).reshape(-1, 1)  # Σ_k |W_ik|, [C_out, 1]
    col_share = torch.where(col > 0, absw / torch.where(col > 0, col, 1.0), 0.0)
    row_share = torch.where(row > 0, absw / torch.where(row > 0, row, 1.0), 0.0)
    return col_share + row_share


def score(weight: torch.Tensor, method: str, act_norm: torch.Tensor | None = None,
          a: float = 0.5) -> torch.Tensor:
    """Importance score of every weight, same shape as ``weight`` (``[C_out, C_in]``), float32.

    ``method``: one of :data:`SCORE_METHODS`. ``act_norm``: ``‖X_j‖₂`` per input channel
    (up to a per-layer constant), shape ``[C_in]`` -- required by the methods in
    :data:`SCORES_NEED_DATA`, ignored by the others. ``a``: RIA's activation exponent
    (``a >= 0``). The input is not modified.
    """
    if method not in SCORE_METHODS:
        raise ValueError(f"unknown score method {method!r}; expected one of {', '.join(SCORE_METHODS)}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [C_out, C_in], got shape {list(weight.shape)}")
    if weight.is_complex():
        raise ValueError("weight must be real")
    c_in = weight.shape[1]
    w = weight.detach()

    absw = torch.abs(w.to(torch.float32))
    if method == "magnitude":
        return absw

    if method == "wanda":
        act = _check_act_norm(act_norm, c_in, method).to(w.device)
        return absw * act.reshape(1, -1)

    ri = _ri(absw)
    if method == "ri":
        return ri

    # ria
    if not (isinstance(a, (int, float)) and math.isfinite(a) and a >= 0):
        raise ValueError(f"score 'ria': exponent a must be a finite number >= 0, got {a!r}")
    act = _check_act_norm(act_norm, c_in, method).to(w.device)
    return ri * act.reshape(1, -1) ** float(a)
