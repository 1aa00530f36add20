"""Weight updates for structured removal: tensors in, tensors out (no passes, no models).

A linear ``y = x Wᵀ`` (``W`` ``[C_out, C_in]``) loses the input columns ``P`` (the
channels of removed units); its kept columns ``S`` are refitted on calibration inputs by
least squares, which is the OBS update of the grouped columns restricted to the kept
ones (SlimGPT, ZipLM)::

    W_S' = W_S + W_P H_PS H_SS⁻¹,    H = Σ x xᵀ  (any positive multiple: same result)

damped with ``damp · mean(diag H) · I`` on ``H_SS``. The removed columns are returned as
zeros, so the refitted weight also serves the masked model (the same function as the
slimmed one once the columns are sliced away).

- :func:`refit_columns` -- the refit, with the calibration output error before and after;
- :func:`refit_columns_to` -- the same refit towards given target outputs ``t``: the
  kept columns see the pruned model's inputs ``x_p`` and are fitted to ``t``, e.g. the
  dense layer's output on the dense model's inputs ``W x_d``: ``W_S' = T_{:,S} H_SS⁻¹``
  with ``T = Σ t x_pᵀ`` and ``H = Σ x_p x_pᵀ``; with ``t = W x_p`` it is
  :func:`refit_columns`;
- :func:`obs_costs` -- per unit, the output error left after the optimal update of the
  other columns when that unit alone goes (``tr(W_P [H⁻¹]_PP⁻¹ W_Pᵀ)``);
- :func:`obs_select` -- SlimGPT's greedy selection: remove the cheapest units in batches,
  updating the weights and ``H⁻¹`` after each batch, so later costs know earlier removals.

A unit's columns are given per reader: a unit may be read by several linears (each with
its own ``W`` and ``H``); its cost is the sum over its readers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Reader", "refit_columns", "refit_columns_to", "obs_costs", "obs_select",
           "damped"]


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp · mean(diag H) · I`` in float64 (a new tensor); dead inputs (zero
    diagonal) get a unit diagonal so the system stays solvable."""
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be square, got {list(H.shape)}")
    Hd = H.detach().to(torch.float64).clone()
    diag = Hd.diagonal()
    lam = damp * float(diag.mean())
    diag[diag == 0] = 1.0
    diag += lam
    return Hd


def _check(weight: torch.Tensor, H: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be [C_out, C_in], got {list(weight.shape)}")
    if tuple(H.shape) != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"H must be [{weight.shape[1]}, {weight.shape[1]}] for a weight "
                         f"{list(weight.shape)}, got {list(H.shape)}")


def _output_error(delta: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(Δ H Δᵀ)``: the squared output change over the calibration inputs."""
    return float(((delta @ H) * delta).sum())


def removed_and_kept(c_in: int, removed: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The sorted removed column indices ``P`` and the kept ones ``S`` of ``c_in`` columns."""
    P = torch.tensor(sorted(set(int(i) for i in removed)), dtype=torch.long)
    if len(P) and (int(P[0]) < 0 or int(P[-1]) >= c_in):
        raise ValueError(f"removed columns must lie in [0, {c_in})")
    keep = torch.ones(c_in, dtype=torch.bool)
    keep[P] = False
    return P, torch.nonzero(keep).flatten()


def refit_columns(weight: torch.Tensor, H: torch.Tensor, removed: Sequence[int], *,
                  damp: float = 0.01) -> tuple[torch.Tensor, dict]:
    """Refit the kept columns of ``weight`` for the removal of the columns ``removed``.

    Returns the new weight (same shape, dtype and device; removed columns exactly 0) and
    ``{"removed", "kept", "error_no_update", "error_refit", "energy"}``: the calibration
    output error ``tr(Δ H Δᵀ)`` of zeroing the columns without and with the update, and
    the output energy ``tr(W H Wᵀ)`` (their scale). ``H`` is not modified."""
    _check(weight, H)
    P, S = removed_and_kept(weight.shape[1], removed)
    W = weight.detach().to(torch.float64)
    H64 = H.detach().to(torch.float64, copy=True)
    out = W.clone()
    out[:, P] = 0
    info = {"removed": len(P), "kept": len(S)}
    if len(P) and len(S) and float(H64.diagonal().mean()) > 0:
        Hd = damped(H64, damp)
        L = torch.linalg.cholesky(Hd[S][:, S])
        X = torch.cholesky_solve(H64[S][:, P], L)  # H_SS⁻¹ H_SP  [|S|, |P|]
        out[:, S] = W[:, S] + W[:, P] @ X.T
    info["error_no_update"] = _output_error(W[:, P], H64[P][:, P]) if len(P) else 0.0
    info["error_refit"] = _output_error(out - W, H64)
    info["energy"] = _output_error(W, H64)
    return out.to(dtype=weight.dtype, device=weight.device), info


def refit_columns_to(weight: torch.Tensor, H: torch.Tensor, target_cross: torch.Tensor,
                     target_energy: float, removed: Sequence[int], *,
                     damp: float = 0.01) -> tuple[torch.Tensor, dict]:
    """Refit the kept columns of ``weight`` towards given target outputs ``t`` (one per
    calibration token) instead of the layer's own outputs: ``min ‖W_S' x_S - t‖²``, so
    ``W_S' = T_{:,S} H_SS⁻¹``. The damping ``Λ`` pulls towards the current kept weights
    (``min ‖W_S' x_S - t‖² + ‖(W_S' - W_S) Λ^½‖²``: ``W_S' = (T_S + W_S Λ)(H_SS + Λ)⁻¹``),
    not towards zero: for ``t = W x`` this is exactly :func:`refit_columns`, damping
    included.

    ``H = Σ x xᵀ`` (the inputs the layer sees: the pruned model's), ``target_cross =
    T = Σ t xᵀ`` (``[C_out, C_in]``) and ``target_energy = Σ ‖t‖²``, all with the same
    scale. The dense layer's outputs on the dense model's inputs are ``t = W x_d``:
    ``T = W Σ x_d xᵀ``, ``Σ ‖t‖² = tr(W H_d Wᵀ)``. Returns the new weight (removed columns exactly 0) and the info
    of :func:`refit_columns`, errors measured against the targets: ``error_no_update`` is
    the weight with the columns zeroed, ``error_refit`` the refitted one, ``energy`` the
    targets' energy."""
    _check(weight, H)
    if tuple(target_cross.shape) != tuple(weight.shape):
        raise ValueError(f"target_cross must be {list(weight.shape)}, got "
                         f"{list(target_cross.shape)}")
    P, S = removed_and_kept(weight.shape[1], removed)
    W = weight.detach().to(torch.float64)
    Hp = H.detach().to(torch.float64)
    T = target_cross.detach().to(torch.float64)

    def error(new: torch.Tensor) -> float:  # Σ ‖new x - t‖²
        return _output_error(new, Hp) - 2 * float((T * new).sum()) + float(target_energy)

    zeroed = W.clone()
    zeroed[:, P] = 0
    out = zeroed.clone()
    if len(S) and float(Hp.diagonal().mean()) > 0:
        Hd = damped(Hp, damp)
        lam = (Hd - Hp).diagonal()[S]  # the damping, per kept column
        L = torch.linalg.cholesky(Hd[S][:, S])
        # ridge towards the current weights, not towards 0: (T_:S + W_S Λ)(H_SS + Λ)⁻¹
        out[:, S] = torch.cholesky_solve((T[:, S] + W[:, S] * lam).T, L).T
    info = {"removed": len(P), "kept": len(S), "error_no_update": error(zeroed),
            "error_refit": error(out), "energy": float(target_energy)}
    return out.to(dtype=weight.dtype, device=weight.device), info


@dataclass
class Reader:
    """One linear that reads the units' channels: its weight ``[C_out, C_in]``, its
    calibration Gram matrix ``H`` ``[C_in, C_in]`` and, per unit, the input columns the
    unit owns there (``columns[u]``)."""

    weight: torch.Tensor
    H: torch.Tensor
    columns: list[Sequence[int]]


class _State:
    """A reader during greedy selection: current weight and ``H⁻¹`` (float64), and the
    columns removed so far."""

    def __init__(self, r: Reader, damp: float) -> None:
        _check(r.weight, r.H)
        self.W = r.weight.detach().to(torch.float64, copy=True)
        self.Hinv = torch.linalg.inv(damped(r.H, damp))
        self.cols = [torch.tensor(sorted(set(int(i) for i in c)), dtype=torch.long)
                     for c in r.columns]
        self.gone = torch.zeros(self.W.shape[1], dtype=torch.bool)

    def alive(self, u: int) -> torch.Tensor:
        c = self.cols[u]
        return c[~self.gone[c]]

    def costs(self, units: list[int]) -> torch.Tensor:
        out = torch.zeros(len(units), dtype=torch.float64)
        by_width: dict[int, list[int]] = {}
        for i, u in enumerate(units):
            by_width.setdefault(len(self.alive(u)), []).append(i)
        for width, idx in by_width.items():
            if width == 0:
                continue
            cols = torch.stack([self.alive(units[i]) for i in idx])  # [n, width]
            M = self.Hinv[cols.unsqueeze(-1), cols.unsqueeze(-2)]  # [n, width, width]
            Wp = self.W[:, cols].permute(1, 0, 2)  # [n, C_out, width]
            sol = torch.linalg.solve(M, Wp.transpose(1, 2))  # [n, width, C_out]
            out[idx] = (Wp.transpose(1, 2) * sol).sum((1, 2))
        return out

    def remove(self, cols: torch.Tensor) -> None:
        """The OBS update for removing ``cols``: the other columns compensate, and ``H⁻¹``
        becomes the inverse of the kept block (rows/columns ``cols`` drop out)."""
        cols = cols[~self.gone[cols]]
        if not len(cols):
            return
        M = self.Hinv[cols][:, cols]
        rows = self.Hinv[cols]  # [p, C_in]
        self.W -= torch.linalg.solve(M, self.W[:, cols].T).T @ rows
        self.Hinv -= rows.T @ torch.linalg.solve(M, rows)
        self.W[:, cols] = 0
        self.Hinv[cols] = 0
        self.Hinv[:, cols] = 0
        self.gone[cols] = True


def _states(readers: Sequence[Reader], damp: float,
            removed_before: Sequence[Sequence[int]] | None) -> list[_State]:
    if not readers:
        raise ValueError("at least one reader is needed")
    units = len(readers[0].columns)
    if any(len(r.columns) != units for r in readers):
        raise ValueError("every reader must list the columns of the same units")
    states = [_State(r, damp) for r in readers]
    for st, before in zip(states, removed_before or [()] * len(states)):
        if len(before):
            st.remove(torch.tensor(sorted(set(int(i) for i in before)), dtype=torch.long))
    return states


def obs_costs(readers: Sequence[Reader], *, damp: float = 0.01,
              removed_before: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Per unit, the calibration output error left after the optimal update of every other
    column when that unit alone is removed (summed over its readers). ``removed_before``
    (per reader): columns already gone (e.g. by another group of the same layer)."""
    states = _states(readers, damp, removed_before)
    units = list(range(len(readers[0].columns)))
    return sum(st.costs(units) for st in states)


def obs_select(readers: Sequence[Reader], n: int, *, steps: int = 8, damp: float = 0.01,
               removed_before: Sequence[Sequence[int]] | None = None) -> list[int]:
    """The ``n`` units to remove, chosen greedily in ``steps`` batches (SlimGPT): each
    batch takes the cheapest remaining units by :func:`obs_costs` on the current (already
    updated) weights and ``H⁻¹``; ties by unit index."""
    states = _states(readers, damp, removed_before)
    units = len(readers[0].columns)
    if not 0 <= n < units:
        raise ValueError(f"cannot remove {n} of {units} units (at least one is kept)")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    alive = list(range(units))
    chosen: list[int] = []
    for step in range(steps):
        k = math.ceil((n - len(chosen)) / (steps - step))
        if k <= 0:
            break
        costs = sum(st.costs(alive) for st in states)
        order = sorted(range(len(alive)), key=lambda i: (float(costs[i]), alive[i]))
        batch = [alive[i] for i in order[:k]]
        for st in states:
            st.remove(torch.cat([st.cols[u] for u in batch]))
        chosen.extend(batch)
        alive = [u for u in alive if u not in set(batch)]
    return sorted(chosen)
