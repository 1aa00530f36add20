"""Input-channel permutation search for N:M sparsity (ALGORITHMS.md section 3).

Goal: a permutation ``perm`` of the ``C_in`` input channels such that N:M selection on
``scores[:, perm]`` (in every output row, in every group of M consecutive columns, keep
the N largest) keeps the largest total score.

Convention: new position ``i`` holds old channel ``perm[i]``, i.e. the permuted matrix
is ``scores[:, perm]``; :func:`inverse_permutation` maps it back.

- :func:`kept_score` -- total score kept by N:M selection on ``scores[:, perm]``.
- :func:`heuristic_allocation` -- channel score = column sum, sorted ascending, cut into
  M equal segments; slot ``p`` of every M-group takes segment ``p``, odd segments
  reversed (zig-zag), so each group holds one channel of each quantile (section 3.1).
- :func:`lsa_table` / :func:`refine_lsa` -- refinement by linear sum assignment, one
  slot at a time (section 3.2).
- :func:`search_permutation` -- heuristic + refinement, over all channels at once
  (``mode="exact"``) or over independent contiguous blocks (``mode="fast"``).
- :func:`permuted_nm_mask` -- the N:M keep-mask chosen in permuted order, in the
  *original* column order (RIA's "mask only" use; not N:M in stored order, see 3.3).

The LSA table. Fix a slot ``p`` and view the permuted matrix as ``[C_out, K, M]``
(``K = C_in / M`` groups). For group ``r`` let ``F_r`` be its ``M - 1`` channels other
than slot ``p``; ``x_k`` the slot-``p`` column of group ``k``. With ``T[i, r]`` the sum of
the N largest of ``F_r`` in row ``i`` and ``f[i, r]`` the N-th largest (``N <= M - 1``),
the N largest of ``F_r ∪ {x}`` sum to ``T + max(0, x - f)``: either ``x`` enters the top N
and pushes out the N-th, or it does not. Hence::

    B[r, k] = Σ_i T[i, r] + Σ_i max(0, x_k[i] - f[i, r])

which costs ``O(C_out · K²)`` per slot (independent of M), computed in chunks of ``r``.

All sums are in float64. Everything is deterministic for a given input (stable sorts,
strict-improvement acceptance). The returned permutation is a CPU ``int64`` tensor.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from scipy.optimize import linear_sum_assignment

from slimgraph.sparsity.masks import check_nm, nm_keep_groups

__all__ = [
    "MODES",
    "PermutationResult",
    "heuristic_allocation",
    "inverse_permutation",
    "kept_score",
    "lsa_table",
    "permuted_nm_mask",
    "refine_lsa",
    "search_permutation",
]

MODES: tuple[str, ...] = ("exact", "fast")
"""Modes of :func:`search_permutation`."""

FAST_BLOCK_CHANNELS = 256
"""Default upper bound on the channels of one block in ``mode="fast"``."""

_CHUNK_ELEMENTS = 1 << 22
"""Elements of one float64 temporary ``[C_out, chunk, K]`` while building the LSA table (32 MiB)."""


# ----------------------------------------------------------------------------- checks


def _check_m(m) -> int:
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or int(m) < 2:
        raise ValueError(f"M (group size) must be an integer >= 2, got {m!r}")
    return int(m)


def _as_scores(scores, m: int) -> torch.Tensor:
    """Validated float64 copy-free view of a ``[C_out, C_in]`` score matrix."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [C_out, C_in], got shape {list(scores.shape)}")
    if scores.is_complex():
        raise ValueError("scores must be real")
    c_out, c_in = scores.shape
    if c_out == 0 or c_in == 0:
        raise ValueError(f"scores must be non-empty, got shape {list(scores.shape)}")
    if c_in % m:
        raise ValueError(f"channel permutation for groups of M = {m} needs the input size (dim 1) to be a "
                         f"multiple of {m}; got C_in = {c_in} (shape [{c_out}, {c_in}])")
    s = scores.detach().to(torch.float64)
    if not bool(torch.isfinite(s).all()):
        raise ValueError("scores contain NaN or infinite values")
    return s


def _as_perm(perm, c_in: int) -> torch.Tensor:
    """Validated CPU int64 permutation of ``range(c_in)``."""
    if isinstance(perm, torch.Tensor):
        p = perm.detach().cpu()
    else:
        p = torch.as_tensor(np.asarray(perm))
    if p.dim() != 1 or p.numel() != c_in:
        raise ValueError(f"perm must be 1-D of length C_in = {c_in}, got shape {list(p.shape)}")
    if p.is_floating_point() or p.is_complex() or p.dtype == torch.bool:
        raise ValueError(f"perm must hold integers, got dtype {p.dtype}")
    p = p.to(torch.int64)
    if not torch.equal(torch.sort(p).values, torch.arange(c_in)):
        raise ValueError(f"perm is not a permutation of range({c_in})")
    return p.clone()


def _check_rounds(rounds) -> int:
    if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or int(rounds) < 0:
        raise ValueError(f"rounds must be an integer >= 0, got {rounds!r}")
    return int(rounds)


# ----------------------------------------------------------------------------- kernels


def _kept(s: torch.Tensor, perm: torch.Tensor, n: int, m: int) -> float:
    c_out, c_in = s.shape
    g = s[:, perm.to(s.device)].reshape(c_out, c_in // m, m)
    return float(torch.topk(g, n, dim=2, sorted=False).values.sum())


def _table(s: torch.Tensor, perm: torch.Tensor, n: int, m: int, p: int) -> torch.Tensor:
    """LSA table ``B [K, K]`` (float64, on ``s.device``) for slot ``p``; see the module docstring."""
    c_out, c_in = s.shape
    k = c_in // m
    g = s[:, perm.to(s.device)].reshape(c_out, k, m)
    x = g[:, :, p]                                                   # [C_out, K] candidates
    others = [j for j in range(m) if j != p]
    fixed = g[:, :, others]                                          # [C_out, K, M-1]
    top = torch.topk(fixed, n, dim=2, sorted=True).values            # [C_out, K, N], descending
    base = top.sum(dim=2)                                            # T[i, r]
    nth = top[:, :, n - 1]                                           # f[i, r]
    table = torch.empty(k, k, dtype=torch.float64, device=s.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, c_out * k))
    for r0 in range(0, k, chunk):
        r1 = min(k, r0 + chunk)
        # gain[r, k] = Σ_i max(0, x[i, k] - f[i, r])
        gain = torch.clamp_min(x.unsqueeze(1) - nth[:, r0:r1].unsqueeze(2), 0.0).sum(dim=0)
        table[r0:r1] = gain
    table += base.sum(dim=0).unsqueeze(1)
    return table


def _refine(s: torch.Tensor, perm: torch.Tensor, n: int, m: int, rounds: int) -> torch.Tensor:
    """Slot-by-slot LSA refinement; a step is taken only if it strictly raises the kept score."""
    k = s.shape[1] // m
    if k < 2:
        return perm.clone()
    best = perm.clone()
    best_score = _kept(s, best, n, m)
    for _ in range(rounds):
        improved = False
        for p in range(m):
            table = _table(s, best, n, m, p).cpu().numpy()
            _, cols = linear_sum_assignment(table, maximize=True)
            if np.array_equal(cols, np.arange(k)):
                continue
            grid = best.view(k, m).clone()
            grid[:, p] = grid[torch.as_tensor(cols, dtype=torch.int64), p]
            cand = grid.reshape(-1)
            cand_score = _kept(s, cand, n, m)
            if cand_score > best_score:
                best, best_score, improved = cand, cand_score, True
        if not improved:
            break
    return best


def _heuristic(s: torch.Tensor, m: int) -> torch.Tensor:
    c_in = s.shape[1]
    k = c_in // m
    order = torch.argsort(s.sum(dim=0), stable=True).cpu()          # ascending channel score
    grid = torch.empty(k, m, dtype=torch.int64)
    for p in range(m):
        seg = order[p * k:(p + 1) * k]
        grid[:, p] = seg.flip(0) if p % 2 else seg
    return grid.reshape(-1)


# ----------------------------------------------------------------------------- public API


def kept_score(scores: torch.Tensor, perm, n: int, m: int) -> float:
    """Total score kept by N:M selection on ``scores[:, perm]`` (sum over all rows and groups, float64)."""
    n, m = check_nm(n, m)
    s = _as_scores(scores, m)
    return _kept(s, _as_perm(perm, s.shape[1]), n, m)


def heuristic_allocation(scores: torch.Tensor, m: int) -> torch.Tensor:
    """Zig-zag allocation of ALGORITHMS.md 3.1.

    Channel score = column sum; channels sorted ascending (stable: ties by lower index)
    and cut into M equal segments of ``K = C_in / M``; slot ``p`` of group ``g`` takes
    segment ``p``'s element ``g`` for even ``p`` and element ``K - 1 - g`` for odd ``p``.
    Returns ``perm`` (CPU int64): new position ``i`` holds old channel ``perm[i]``.
    """
    m = _check_m(m)
    return _heuristic(_as_scores(scores, m), m)


def lsa_table(scores: torch.Tensor, perm, n: int, m: int, p: int) -> np.ndarray:
    """The ``K × K`` LSA table for slot ``p`` of the permuted matrix ``scores[:, perm]``.

    ``B[r, k]`` = score kept by group ``r`` (N of M per output row, summed over rows) if its
    slot-``p`` channel were replaced by group ``k``'s slot-``p`` channel. float64 numpy.
    """
    n, m = check_nm(n, m)
    s = _as_scores(scores, m)
    if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or not 0 <= int(p) < m:
        raise ValueError(f"slot p must be an integer in [0, {m}), got {p!r}")
    return _table(s, _as_perm(perm, s.shape[1]), n, m, int(p)).cpu().numpy()


def refine_lsa(scores: torch.Tensor, perm, n: int, m: int, rounds: int = 1) -> torch.Tensor:
    """Refine ``perm`` by linear sum assignment, slot by slot (ALGORITHMS.md 3.2).

    Each round visits slots ``p = 0 .. M-1``: build :func:`lsa_table`, solve
    ``linear_sum_assignment(B, maximize=True)`` and move the slot-``p`` channels
    accordingly. A step is kept only if it strictly raises :func:`kept_score`, so the
    result never keeps less than ``perm``; rounds stop early once a round changes nothing.
    """
    n, m = check_nm(n, m)
    s = _as_scores(scores, m)
    return _refine(s, _as_perm(perm, s.shape[1]), n, m, _check_rounds(rounds))


def inverse_permutation(perm) -> torch.Tensor:
    """``inv`` with ``inv[perm[i]] = i``, so ``x[:, perm][:, inv] == x``."""
    size = perm.numel() if isinstance(perm, torch.Tensor) else np.asarray(perm).size
    p = _as_perm(perm, size)
    inv = torch.empty_like(p)
    inv[p] = torch.arange(p.numel())
    return inv


def permuted_nm_mask(scores: torch.Tensor, perm, n: int, m: int) -> torch.Tensor:
    """N:M keep-mask chosen on ``scores[:, perm]``, returned in the **original** column order.

    ``mask[:, perm]`` is N:M; ``mask`` itself generally is not (ALGORITHMS.md 3.3).
    """
    n, m = check_nm(n, m)
    s = _as_scores(scores, m)
    p = _as_perm(perm, s.shape[1]).to(s.device)
    c_out, c_in = s.shape
    keep_perm = nm_keep_groups(s[:, p].reshape(c_out, c_in // m, m), n)
    keep = torch.empty((c_out, c_in), dtype=torch.bool, device=s.device)
    keep[:, p] = keep_perm.reshape(c_out, c_in)
    return keep


@dataclass(frozen=True)
class PermutationResult:
    """Outcome of :func:`search_permutation`.

    ``perm``: CPU int64, new position ``i`` holds old channel ``perm[i]``.
    ``kept_before`` / ``kept_heuristic`` / ``kept_after``: :func:`kept_score` of the
    identity order, of :func:`heuristic_allocation`, and of ``perm``.
    ``seconds``: wall time of the search. ``mode`` and ``blocks`` as used.
    """

    perm: torch.Tensor
    kept_before: float
    kept_heuristic: float
    kept_after: float
    seconds: float
    mode: str = "exact"
    blocks: int = 1

    @property
    def gain(self) -> float:
        """Relative gain in kept score over the identity order (0 when nothing is kept)."""
        return (self.kept_after - self.kept_before) / self.kept_before if self.kept_before else 0.0


def _default_blocks(k: int, m: int) -> int:
    groups_per_block = max(1, FAST_BLOCK_CHANNELS // m)
    return max(1, math.ceil(k / groups_per_block))


def search_permutation(scores: torch.Tensor, n: int, m: int, mode: str = "exact", blocks: int | None = None,
                       rounds: int = 1) -> PermutationResult:
    """Search an input-channel permutation maximising the score kept by N:M selection.

    Starts from :func:`heuristic_allocation` (or from the identity order if that keeps
    strictly more), then refines with :func:`refine_lsa` (``rounds`` rounds):

    - ``mode="exact"``: over all ``C_in`` channels at once (``O(C_out · C_in² / M)`` per round);
    - ``mode="fast"``: the starting order is cut into ``blocks`` contiguous blocks of whole
      M-groups (sizes differ by at most one group, so every size is a multiple of M), each
      refined independently. Default ``blocks``: the fewest with at most 256 channels each
      (for M <= 256). ``blocks=1`` is the same as ``"exact"``.

    Guarantees ``kept_after >= max(kept_before, kept_heuristic)``.
    """
    t0 = time.perf_counter()
    n, m = check_nm(n, m)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    rounds = _check_rounds(rounds)
    s = _as_scores(scores, m)
    c_in = s.shape[1]
    k = c_in // m
    if mode == "exact":
        if blocks not in (None, 1):
            raise ValueError(f"blocks={blocks!r} applies to mode='fast' only")
        n_blocks = 1
    elif blocks is None:
        n_blocks = _default_blocks(k, m)
    else:
        if isinstance(blocks, bool) or not isinstance(blocks, (int, np.integer)) or not 1 <= int(blocks) <= k:
            raise ValueError(f"blocks must be an integer in [1, C_in / M = {k}], got {blocks!r}")
        n_blocks = int(blocks)

    identity = torch.arange(c_in)
    kept_before = _kept(s, identity, n, m)
    heur = _heuristic(s, m)
    kept_heuristic = _kept(s, heur, n, m)
    start = heur if kept_heuristic >= kept_before else identity

    if n_blocks == 1:
        perm = _refine(s, start, n, m, rounds)
    else:
        perm = start.clone()
        bounds = [(i * k // n_blocks) * m for i in range(n_blocks + 1)]
        for b0, b1 in zip(bounds[:-1], bounds[1:]):
            chans = perm[b0:b1]
            local = _refine(s[:, chans.to(s.device)], torch.arange(b1 - b0), n, m, rounds)
            perm[b0:b1] = chans[local]
    kept_after = _kept(s, perm, n, m)
    return PermutationResult(perm=perm, kept_before=kept_before, kept_heuristic=kept_heuristic,
                             kept_after=kept_after, seconds=time.perf_counter() - t0, mode=mode,
                             blocks=n_blocks)
