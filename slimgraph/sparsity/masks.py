"""Keep-masks from importance scores, and N:M pattern checks of stored weights.

Masks are boolean *keep*-masks of the score matrix's shape (``True`` = the weight stays).

- :func:`unstructured_mask` -- prune exactly ``round(sparsity · n)`` lowest scores per
  comparison group: the whole matrix (scope ``"layer"``, RIA's default) or each output
  row (scope ``"row"``, Wanda's default).
- :func:`nm_mask` -- N:M along the reduction axis (dim 1 of ``[C_out, C_in]``): in every
  output row and every group of M consecutive input channels keep the N largest scores.
- :func:`parse_pattern`, :func:`is_nm`, :func:`nm_violations` -- ``"N:M"`` parsing and
  verification of a stored weight along any axis (a torch ``[C_out, C_in]`` weight along
  1; an ONNX ``MatMul`` ``B [K, N]`` along 0).

Ties are broken deterministically: among equal scores the element with the lower index
(row-major flat index for scope ``"layer"``, column index otherwise) is pruned first by
:func:`unstructured_mask` and kept first by :func:`nm_mask`. NaN scores are rejected.
"""

from __future__ import annotations

import re

import numpy as np
import torch

__all__ = [
    "SCOPES",
    "is_nm",
    "nm_mask",
    "nm_violations",
    "parse_pattern",
    "prune_count",
    "unstructured_mask",
]

SCOPES: tuple[str, ...] = ("layer", "row")
"""Comparison groups of :func:`unstructured_mask`."""


def _check_scores(scores, what: str = "scores") -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"{what} must be 2-D [C_out, C_in], got shape {list(scores.shape)}")
    if scores.is_complex():
        raise ValueError(f"{what} must be real")
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        raise ValueError(f"{what} contain NaN")
    return scores.detach()


def validate_sparsity(sparsity) -> float:
    """``sparsity`` as a float in [0, 1] (ValueError otherwise)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    s = float(sparsity)
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return s


def prune_count(n: int, sparsity: float) -> int:
    """Number of elements pruned from a comparison group of ``n``: ``round(sparsity · n)``."""
    s = validate_sparsity(sparsity)
    return min(n, max(0, round(s * n)))


def prune_lowest(scores: torch.Tensor, k: int, dim: int | None) -> torch.Tensor:
    """Keep-mask pruning the ``k`` lowest scores over everything (dim None) or along ``dim``.

    A stable ascending sort makes ties deterministic: the lower index is pruned first.
    """
    keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return keep
    if dim is None:
        order = torch.argsort(scores.reshape(-1), stable=True)
        flat = keep.view(-1)
        flat[order[:k]] = False
        return keep
    order = torch.argsort(scores, dim=dim, stable=True)
    idx = order.narrow(dim, 0, k)
    keep.scatter_(dim, idx, False)
    return keep


def unstructured_mask(scores: torch.Tensor, sparsity: float, scope: str = "layer") -> torch.Tensor:
    """Keep-mask pruning exactly ``round(sparsity · n)`` lowest scores per comparison group.

    ``scope="layer"``: one group, the whole matrix (``n = C_out · C_in``; RIA's default).
    ``scope="row"``: one group per output row (``n = C_in``; Wanda's default).
    """
    s = _check_scores(scores)
    sp = validate_sparsity(sparsity)
    if scope == "layer":
        return prune_lowest(s, prune_count(s.numel(), sp), None)
    if scope == "row":
        return prune_lowest(s, prune_count(s.shape[1], sp), 1)
    raise ValueError(f"unknown scope {scope!r}; expected one of {', '.join(SCOPES)}")


def check_nm(n, m) -> tuple[int, int]:
    """Validate an N:M pattern given as two integers (0 < N < M)."""
    for name, v in (("N", n), ("M", m)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"N:M pattern: {name} must be an integer, got {v!r}")
    n, m = int(n), int(m)
    if not 0 < n < m:
        raise ValueError(f"invalid N:M pattern {n}:{m}: need 0 < N < M (N kept of every M)")
    return n, m


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M keep-mask along the reduction axis (dim 1, input channels).

    In every output row, in every group of ``m`` consecutive input channels, keep the
    ``n`` largest scores (ties: see :func:`nm_keep_groups`). ``C_in`` must be a multiple of
    ``m``.
    """
    n, m = check_nm(n, m)
    s = _check_scores(scores)
    c_out, c_in = s.shape
    if c_in % m:
        raise ValueError(f"N:M {n}:{m} needs the input size (dim 1) to be a multiple of {m}; "
                         f"got C_in = {c_in} (shape [{c_out}, {c_in}])")
    return nm_keep_groups(s.reshape(c_out, c_in // m, m), n).reshape(c_out, c_in)


def nm_keep_groups(groups: torch.Tensor, n: int) -> torch.Tensor:
    """Keep-mask of the ``n`` largest of every group along the last dim (``[..., m]``).

    The ``m - n`` pruned entries are those ``torch.topk(largest=False)`` returns, which is
    how the reference implementations (Wanda, SparseGPT, RIA) choose N:M masks: on ties
    (frequent in magnitude scores of bf16-trained weights -- 15% of SmolLM2's groups of 4
    tie between their 2nd and 3rd largest |w|) both pick the same entries. A stable
    "lower index kept" rule gave magnitude 2:4 a perplexity of 2508 on SmolLM2 against the
    reference's 1543.
    """
    m = groups.shape[-1]
    keep = torch.ones(groups.shape, dtype=torch.bool, device=groups.device)
    keep.scatter_(-1, torch.topk(groups, m - n, dim=-1, largest=False).indices, False)
    return keep


_PATTERN = re.compile(r"^\s*([+-]?\d+)\s*:\s*([+-]?\d+)\s*$")


def parse_pattern(pattern) -> tuple[int, int]:
    """Parse ``"N:M"`` (N kept of every M, ``0 < N < M``) into ``(N, M)``.

    Also accepts an ``(N, M)`` pair. Raises ValueError on anything else ("4:2", "0:4",
    "4:4", "a:b", "2-4", ...).
    """
    if isinstance(pattern, (tuple, list)):
        if len(pattern) != 2:
            raise ValueError(f"N:M pattern must be a pair (N, M), got {pattern!r}")
        return check_nm(*pattern)
    if not isinstance(pattern, str):
        raise ValueError(f"N:M pattern must be a string like '2:4', got {pattern!r}")
    match = _PATTERN.match(pattern)
    if match is None:
        raise ValueError(f"invalid N:M pattern {pattern!r}: expected 'N:M' with integers "
                         "0 < N < M, e.g. '2:4'")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"invalid N:M pattern {pattern!r}: need 0 < N < M (N kept of every M), "
                         "e.g. '2:4'")
    return n, m


def _nonzero_groups(weight, m: int, axis: int) -> torch.Tensor:
    """Bool nonzero indicator reshaped to ``[..., m]`` groups along ``axis``."""
    if isinstance(weight, torch.Tensor):
        nz = weight.detach() != 0
    else:
        nz = torch.from_numpy(np.ascontiguousarray(np.asarray(weight) != 0))
    if nz.dim() == 0:
        raise ValueError("N:M check needs at least a 1-D weight, got a scalar")
    if not -nz.dim() <= axis < nz.dim():
        raise ValueError(f"axis {axis} is out of range for a weight of shape {list(nz.shape)}")
    length = nz.shape[axis]
    if length % m:
        raise ValueError(f"N:M check: size {length} of axis {axis} (shape {list(nz.shape)}) is "
                         f"not a multiple of M = {m}")
    moved = torch.movedim(nz, axis, -1)
    return moved.reshape(-1, m)


def nm_violations(weight, n: int, m: int, axis: int) -> tuple[int, int]:
    """``(bad_groups, total_groups)``: groups of ``m`` consecutive elements along ``axis``
    with more than ``n`` nonzeros (i.e. fewer than ``m - n`` zeros).

    ``weight``: a torch tensor or anything numpy can convert (e.g. an ONNX initializer
    as a numpy array), of any rank; every group lies along ``axis`` at a fixed position
    of the other axes. The size of ``axis`` must be a multiple of ``m`` (ValueError).
    """
    n, m = check_nm(n, m)
    groups = _nonzero_groups(weight, m, axis)
    bad = int((groups.sum(dim=1) > n).sum())
    return bad, int(groups.shape[0])


def is_nm(weight, n: int, m: int, axis: int) -> bool:
    """Whether every group of ``m`` consecutive elements along ``axis`` has at most ``n``
    nonzeros. See :func:`nm_violations`."""
    return nm_violations(weight, n, m, axis)[0] == 0
