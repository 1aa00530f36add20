"""Calibration statistics and the SparseGPT-style weight update (ALGORITHMS.md section 2).

- :class:`GramAccumulator` -- accumulates, batch by batch, ``H = (2/N) Σ x xᵀ`` over the
  calibration tokens of one linear layer and the per-channel statistic of Wanda and RIA
  (``‖X_j‖₂`` up to a per-layer constant, in the reference implementations' arithmetic).
- :func:`sparsegpt_prune` -- prune a weight ``[C_out, C_in]`` to an unstructured sparsity
  or an N:M pattern and update the remaining weights to compensate (OBS-style), with
  SparseGPT's own saliency ``w² / [H⁻¹]_jj²`` or with any external score (e.g. RIA:
  "ria+reconstruct"), or with a fixed mask (reconstruction only).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch

from slimgraph.sparsity.masks import (nm_keep_groups, parse_pattern, prune_count, prune_lowest,
                                      validate_sparsity)

__all__ = ["GramAccumulator", "sparsegpt_prune"]

log = logging.getLogger(__name__)


class GramAccumulator:
    """Running calibration statistics of the inputs of one linear layer.

    ``add(x)`` takes a batch of inputs ``[..., C_in]`` (every leading index is a token; for
    3-D and larger inputs the first index is the calibration sample, a 2-D input is one
    sample). ``hessian()`` returns ``H = (2/N) Σ x xᵀ`` ``[C_in, C_in]``, N being the number
    of tokens seen so far; the Gram sum is kept in ``dtype`` (float32 by default; float64
    for extra accuracy). ``hessian=False`` skips the ``C_in²`` Gram matrix (scores such as
    Wanda/RIA need only the channel statistic).

    ``act_norm()`` is the channel statistic of Wanda and RIA computed exactly as their
    reference implementations do (``scaler_row`` of their ``WrappedGPT``): a float32 running
    mean over calibration samples of each sample's ``Σ_tokens x_j²`` (the norm taken in
    float32 per sample), square-rooted -- ``‖X_j‖₂ / sqrt(samples)``; the constant does not
    change any ranking. Bit-for-bit arithmetic matters more than precision here: SmolLM2's
    2:4 perplexity is chaotic in the last bits of the scores (float64 sums gave RIA 206.3,
    plain float32 sums 210.1, this arithmetic 205.53 = the reference's 205.5; Wanda 204.45
    / 204.30 = 204.3).
    """

    def __init__(self, in_features: int, *, hessian: bool = True, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive integer, got {in_features!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.in_features = in_features
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self.track_hessian = bool(hessian)
        self.n_tokens = 0
        self.n_samples = 0
        self._gram: torch.Tensor | None = None
        self._scaler: torch.Tensor | None = None  # running mean of per-sample Σ x², float32

    def _init(self, device: torch.device) -> None:
        if self.device is None:
            self.device = device
        self._scaler = torch.zeros(self.in_features, dtype=torch.float32, device=self.device)
        if self.track_hessian:
            self._gram = torch.zeros(self.in_features, self.in_features, dtype=self.dtype,
                                     device=self.device)

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch of inputs ``[..., C_in]``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"inputs must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"inputs must have shape [..., {self.in_features}], got {list(x.shape)}")
        if self._scaler is None:
            self._init(x.device)
        x = x.detach().to(device=self.device)
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return
        samples = x.reshape(x.shape[0], -1, self.in_features) if x.dim() >= 3 else x2.unsqueeze(0)
        for sample in samples:
            # the reference's order of operations: decay the mean, then add norm² / n
            self._scaler *= self.n_samples / (self.n_samples + 1)
            self.n_samples += 1
            self._scaler += torch.norm(sample.t().to(torch.float32), p=2, dim=1) ** 2 / self.n_samples
        if self._gram is not None:
            xd = x2.to(self.dtype)
            self._gram.addmm_(xd.T, xd)
        self.n_tokens += x2.shape[0]

    __call__ = add

    @torch.no_grad()
    def merge(self, other: GramAccumulator) -> None:
        """Add the statistics of ``other`` (same input size; a Gram matrix only if both
        keep one): as if every batch it saw had been added here."""
        if other.in_features != self.in_features:
            raise ValueError(f"cannot merge statistics of {other.in_features} channels into "
                             f"{self.in_features}")
        if self.track_hessian and not other.track_hessian:
            raise ValueError("cannot merge channel norms into an accumulator with a Gram matrix")
        if other.n_tokens == 0:
            return
        if self._scaler is None:
            self._init(other.device)
        n = self.n_samples + other.n_samples
        self._scaler = (self._scaler * self.n_samples + other._scaler.to(self.device) * other.n_samples) / n
        self.n_samples = n
        if self._gram is not None:
            self._gram += other._gram.to(device=self.device, dtype=self.dtype)
        self.n_tokens += other.n_tokens

    def _need_tokens(self) -> None:
        if self.n_tokens == 0:
            raise ValueError("GramAccumulator has seen no calibration tokens yet")

    def act_norm(self) -> torch.Tensor:
        """``sqrt(mean over samples of Σ_tokens x_j²) = ‖X_j‖₂ / sqrt(samples)`` per input
        channel, float32 ``[C_in]`` (the reference implementations' ``sqrt(scaler_row)``)."""
        self._need_tokens()
        return torch.sqrt(self._scaler)

    def hessian(self) -> torch.Tensor:
        """``H = (2/N) Σ x xᵀ``, ``[C_in, C_in]`` in the accumulator's dtype (a new tensor)."""
        if not self.track_hessian:
            raise ValueError("this GramAccumulator was created with hessian=False")
        self._need_tokens()
        return self._gram * (2.0 / self.n_tokens)


def _inverse_cholesky(H: torch.Tensor, damp: float, info: dict) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp·I)⁻¹`` in float64, raising ``damp`` on failure."""
    n = H.shape[0]
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    mean_diag = float(H.diagonal().mean())
    tries = 0
    while True:
        Hd = H + damp * eye
        L, err = torch.linalg.cholesky_ex(Hd)
        if int(err) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, err = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(err) == 0 and bool(torch.isfinite(U).all()):
                info["damp"] = damp
                info["damp_retries"] = tries
                return U
        tries += 1
        if tries > 8:
            raise ValueError(f"SparseGPT: H is not positive definite even with damping {damp:.3g} "
                             f"(mean diagonal {mean_diag:.3g}); check the calibration statistics")
        new = damp * 10.0 if damp > 0 else 0.01 * mean_diag
        msg = (f"SparseGPT: Cholesky failed with damping {damp:.3g} (mean diag H {mean_diag:.3g}); "
               f"retrying with {new:.3g}")
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        log.warning(msg)
        damp = new


def _block_counts(c_out: int, c_in: int, blocksize: int, sparsity: float) -> list[int]:
    """Pruned count per column block so that the total is exactly round(sparsity · numel):
    cumulative rounding, so each block gets its share ±1."""
    counts = []
    prev = 0
    for i1 in range(0, c_in, blocksize):
        i2 = min(i1 + blocksize, c_in)
        cum = prune_count(c_out * i2, sparsity)
        counts.append(cum - prev)
        prev = cum
    return counts


def sparsegpt_prune(
    weight: torch.Tensor,
    H: torch.Tensor,
    *,
    sparsity: float | None = None,
    pattern: str | tuple[int, int] | None = None,
    score_fn: Callable[[torch.Tensor, slice], torch.Tensor] | None = None,
    scores: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    scope: str | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    dtype: torch.dtype = torch.float32,
    info: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT-style pruning with weight reconstruction. Returns ``(new_weight, keep_mask)``.

    ``weight`` ``[C_out, C_in]``; ``H`` ``[C_in, C_in]`` = ``(2/N) Σ x xᵀ``
    (:meth:`GramAccumulator.hessian`). Neither is modified.

    What to prune -- exactly one of:

    - ``sparsity`` (unstructured): exactly ``round(sparsity · C_out · C_in)`` weights in total.
      ``scope="block"`` (default, SparseGPT): the mask of each column block is chosen when
      the block is reached, from the *updated* weights, with one threshold over the block
      (block counts use cumulative rounding, so each block prunes its share ±1).
      ``scope="layer"`` / ``"row"``: the mask is chosen up front from the scores of the
      initial weight with :func:`~slimgraph.sparsity.masks.unstructured_mask`.
    - ``pattern`` (``"2:4"`` or ``(2, 4)``, N kept of every M): in each row, each group of
      M input channels keeps N, chosen when the group's first column is reached (updated
      weights). ``C_in`` and ``blocksize`` must be multiples of M.
    - ``mask``: a fixed keep-mask ``[C_out, C_in]``; only the reconstruction is done.

    Scores used to choose the mask (unless ``mask`` is given): SparseGPT's saliency
    ``w² / [H⁻¹]_jj²`` by default; or ``scores`` (a precomputed ``[C_out, C_in]`` matrix,
    sliced to the columns at hand); or ``score_fn(W_current, cols)`` called with the current
    (updated) weights of the columns ``cols`` (a ``slice`` of input channels) returning scores
    of the same shape (for scope ``"layer"``/``"row"`` it is called once with all columns).

    Procedure (ALGORITHMS.md section 2): dead inputs (``diag H == 0``) get ``H_jj = 1`` and a
    zero weight column; ``H += percdamp · mean(diag H) · I`` (retried with 10x the damping,
    with a RuntimeWarning, if the Cholesky factorisation fails); ``U`` = upper Cholesky factor
    of ``H⁻¹`` (float64); columns processed left to right in blocks of ``blocksize``; for each
    column ``j``: ``err = (w_j − masked w_j) / U_jj``, ``err ⊗ U[j, j+1:]`` subtracted from the
    rest of the block; after the block the accumulated update is applied to later columns.

    The updates run in ``dtype`` (float32 default, like the reference; float64 available).
    The result has ``weight``'s dtype and device; pruned entries are exactly 0 (dead input
    columns are zero too, whatever the mask says). ``info``, if a dict, receives ``damp``,
    ``damp_retries``, ``dead_inputs`` and ``loss`` (Σ over rows of ``½ Σ_j err_j²``).
    """
    # ---- validate ----------------------------------------------------------------------
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [C_out, C_in], got "
                         f"{list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    c_out, c_in = weight.shape
    if not isinstance(H, torch.Tensor) or tuple(H.shape) != (c_in, c_in):
        raise ValueError(f"H must be a [{c_in}, {c_in}] tensor for a weight of shape [{c_out}, {c_in}], "
                         f"got {list(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__}")
    given = [k for k, v in (("sparsity", sparsity), ("pattern", pattern), ("mask", mask)) if v is not None]
    if len(given) != 1:
        raise ValueError("sparsegpt_prune needs exactly one of sparsity, pattern, mask; got "
                         f"{', '.join(given) if given else 'none'}")
    if score_fn is not None and scores is not None:
        raise ValueError("give score_fn or scores, not both")
    if mask is not None and (score_fn is not None or scores is not None):
        raise ValueError("a fixed mask needs no scores: drop score_fn/scores or the mask")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}")
    if not (isinstance(percdamp, (int, float)) and percdamp >= 0):
        raise ValueError(f"percdamp must be >= 0, got {percdamp!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if scope is None:
        scope = "block"
    if scope not in ("block", "layer", "row"):
        raise ValueError(f"unknown scope {scope!r}; expected one of block, layer, row")
    if scope != "block" and sparsity is None:
        raise ValueError(f"scope {scope!r} applies to unstructured sparsity only")
    nm = None
    if pattern is not None:
        nm = parse_pattern(pattern)
        m = nm[1]
        if c_in % m:
            raise ValueError(f"N:M {nm[0]}:{m} needs the input size to be a multiple of {m}; got "
                             f"C_in = {c_in} (weight [{c_out}, {c_in}])")
        if blocksize % m:
            raise ValueError(f"blocksize {blocksize} must be a multiple of M = {m} for N:M {nm[0]}:{m}")
    if sparsity is not None:
        sparsity = validate_sparsity(sparsity)
    if scores is not None:
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (c_out, c_in):
            raise ValueError(f"scores must be a [{c_out}, {c_in}] tensor like the weight")
        if bool(torch.isnan(scores).any()):
            raise ValueError("scores contain NaN")
        scores = scores.detach().to(device=weight.device)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (c_out, c_in):
            raise ValueError(f"mask must be a [{c_out}, {c_in}] keep-mask like the weight")
        mask = mask.detach().to(device=weight.device, dtype=torch.bool).clone()

    dev = weight.device
    W = weight.detach().to(dtype=dtype).clone()
    if not bool(torch.isfinite(W).all()):
        raise ValueError("weight has non-finite values")
    H64 = H.detach().to(device=dev, dtype=torch.float64).clone()
    if not bool(torch.isfinite(H64).all()):
        raise ValueError("H has non-finite values")
    diag = H64.diagonal()
    if bool((diag < 0).any()):
        raise ValueError("H has negative diagonal entries; it must be a Gram matrix (2/N) Σ x xᵀ")

    # ---- dead inputs, damping, inverse Cholesky -----------------------------------------
    dead = diag == 0
    n_dead = int(dead.sum())
    if n_dead:
        diag[dead] = 1.0
        W[:, dead] = 0
    info_d: dict = {} if info is None else info
    damp = percdamp * float(diag.mean())
    U64 = _inverse_cholesky(H64, damp, info_d)
    U = U64.to(dtype)
    info_d["dead_inputs"] = n_dead

    def current_scores(block: torch.Tensor, cols: slice, hdiag: torch.Tensor) -> torch.Tensor:
        if scores is not None:
            return scores[:, cols]
        if score_fn is not None:
            out = score_fn(block.clone(), cols)
            width = cols.stop - cols.start
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (c_out, width):
                raise ValueError(f"score_fn must return a [{c_out}, {width}] tensor for columns "
                                 f"{cols.start}:{cols.stop}")
            if bool(torch.isnan(out).any()):
                raise ValueError("score_fn returned NaN scores")
            return out.detach().to(dev)
        return block.pow(2) / hdiag.pow(2).unsqueeze(0)

    # up-front masks: fixed, or unstructured with layer/row scope
    keep = mask
    if keep is None and sparsity is not None and scope != "block":
        full = current_scores(W, slice(0, c_in), U.diagonal())
        keep = prune_lowest(full, prune_count(full.numel() if scope == "layer" else c_in, sparsity),
                             None if scope == "layer" else 1)
    fixed = keep is not None
    if not fixed:
        keep = torch.ones((c_out, c_in), dtype=torch.bool, device=dev)
        if sparsity is not None:
            counts = _block_counts(c_out, c_in, blocksize, sparsity)

    # ---- column blocks -----------------------------------------------------------------
    loss = torch.zeros(c_out, dtype=torch.float64, device=dev)
    for b, i1 in enumerate(range(0, c_in, blocksize)):
        i2 = min(i1 + blocksize, c_in)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d1 = U1.diagonal()
        Err1 = torch.zeros_like(W1)
        keep1 = keep[:, i1:i2]  # a view: selections below write into `keep`
        if not fixed and nm is None:
            s1 = current_scores(W1, slice(i1, i2), d1)
            keep1.copy_(prune_lowest(s1, counts[b], None))
        for i in range(count):
            if nm is not None and not fixed and i % nm[1] == 0:
                n_keep, m = nm
                sg = current_scores(W1[:, i:i + m], slice(i1 + i, i1 + i + m), d1[i:i + m])
                keep1[:, i:i + m] = nm_keep_groups(sg, n_keep)
            w = W1[:, i]
            q = torch.where(keep1[:, i], w, torch.zeros((), dtype=w.dtype, device=dev))
            err = (w - q) / d1[i]
            loss += err.to(torch.float64).pow(2) / 2
            # rank-1 update of the rest of the block (column i itself becomes q)
            W1[:, i + 1:] -= err.unsqueeze(1) * U1[i, i + 1:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        if i2 < c_in:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    W[~keep] = 0
    if n_dead:
        W[:, dead] = 0
    info_d["loss"] = float(loss.sum())
    return W.to(weight.dtype), keep
