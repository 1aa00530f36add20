"""The report of a sparsity check (``slimgraph/sparsity/check.py``): the pattern and
targets it takes, one :class:`LayerCheck` per weight, the :class:`SparsityReport` and its
verdict, and :func:`evaluate` (zero fraction, N:M status, TensorRT eligibility of one
weight) -- shared by the PyTorch check (``check.py``) and the ONNX one (``check_onnx.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from slimgraph.errors import SlimgraphError
from slimgraph.ir.blocks import in_decoder_block

TRT_PATTERN = (2, 4)
TRT_MIN_DIM = 256
TRT_DIM_MULTIPLE = 64
TARGETS = ("blocks", "all-linear")


class SparsityCheckError(SlimgraphError):
    """A sparsity check cannot run: bad pattern, bad targets, no weights..."""


# --------------------------------------------------------------------------- pattern, targets


def parse_pattern(pattern: Any) -> tuple[int, int] | None:
    """``"N:M"`` or ``(N, M)`` -> ``(N, M)`` with ``0 < N < M``; ``None``/``"none"`` -> None.

    Same rules as :func:`slimgraph.sparsity.masks.parse_pattern` (which it calls); raises
    :class:`SparsityCheckError` instead of ValueError.
    """
    from slimgraph.sparsity.masks import parse_pattern as _parse

    if pattern is None or (isinstance(pattern, str) and pattern.strip().lower() in ("", "none")):
        return None
    try:
        return _parse(pattern)
    except ValueError as e:
        raise SparsityCheckError(str(e)) from None


def format_pattern(pattern: tuple[int, int] | None) -> str | None:
    return None if pattern is None else f"{pattern[0]}:{pattern[1]}"


def target_fn(targets: str | Callable[[str], bool]) -> Callable[[str], bool] | None:
    """None means "all-linear"."""
    if callable(targets):
        return targets
    if targets == "blocks":
        return in_decoder_block
    if targets == "all-linear":
        return None
    raise SparsityCheckError(f"unknown targets {targets!r} (choose from {', '.join(TARGETS)}, "
                             "or give a callable name -> bool)")


# --------------------------------------------------------------------------- report


@dataclass
class LayerCheck:
    """One targeted weight and what was found."""

    name: str  # readable name (PyTorch parameter name, or recovered from ONNX provenance)
    op: str  # Linear | Conv1D | MatMul | Gemm | Conv | state-dict
    shape: list[int]  # stored shape
    dtype: str
    axis: int | None  # reduction axis in the stored layout (None: not determined)
    reduction_size: int | None  # K (Conv: C)
    output_size: int | None  # N (Conv: K)
    zero_fraction: float
    status: str  # holds | violates | skipped | not-visible | unchecked (no pattern)
    groups_total: int | None = None
    groups_violating: int | None = None
    trt_sparse: bool = False
    trt_reason: str | None = None  # why TensorRT would not use sparse kernels
    reason: str | None = None  # why skipped / not visible
    initializer: str | None = None  # ONNX: the stored tensor's name
    nodes: list[str] = field(default_factory=list)  # ONNX: consumer node(s)
    through: list[str] = field(default_factory=list)  # ONNX: ops traced through, consumer first

    @property
    def holds(self) -> bool | None:
        return {"holds": True, "violates": False}.get(self.status)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["holds"] = self.holds
        return d


@dataclass
class SparsityReport:
    source: str  # "torch" | "onnx"
    model: str  # what was checked (a path or a label)
    pattern: tuple[int, int] | None
    targets: str
    layers: list[LayerCheck]
    notes: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for lyr in self.layers if lyr.status == status)

    @property
    def ok(self) -> bool:
        if not self.layers:
            return False
        if self.pattern is None:
            return True
        return (self.count("holds") > 0 and self.count("violates") == 0
                and self.count("not-visible") == 0)

    def failures(self) -> list[LayerCheck]:
        if self.pattern is None:
            return []
        return [lyr for lyr in self.layers if lyr.status in ("violates", "not-visible")]

    def summary(self) -> dict[str, Any]:
        numel = sum(int(np.prod(lyr.shape)) for lyr in self.layers)
        zeros = sum(lyr.zero_fraction * int(np.prod(lyr.shape)) for lyr in self.layers)
        return {
            "layers": len(self.layers),
            "holds": self.count("holds"),
            "violates": self.count("violates"),
            "skipped": self.count("skipped"),
            "not_visible": self.count("not-visible"),
            "trt_sparse": sum(1 for lyr in self.layers if lyr.trt_sparse),
            "zero_fraction": zeros / numel if numel else 0.0,
        }

    def headline(self) -> str:
        """One line: what holds where."""
        s = self.summary()
        what = f"{self.source} {self.model}"
        if not self.layers:
            return f"{what}: no targeted layers ({self.targets})"
        zeros = f"zeros {100 * s['zero_fraction']:.1f}%"
        if self.pattern is None:
            return f"{what}: {s['layers']} layers, {zeros}"
        pat = format_pattern(self.pattern)
        extra = "".join(f", {s[k]} {label}" for k, label in
                        (("skipped", "skipped"), ("not_visible", "not TensorRT-visible"))
                        if s[k])
        return (f"{what}: {pat} holds on {s['holds']} of {s['layers']} layers{extra}; "
                f"{zeros}; TensorRT sparse kernels: {s['trt_sparse']}")

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "model": self.model,
                "pattern": format_pattern(self.pattern), "targets": self.targets,
                "ok": self.ok, "summary": self.summary(), "notes": list(self.notes),
                "layers": [lyr.to_dict() for lyr in self.layers]}


# --------------------------------------------------------------------------- evaluation


def _nonzeros(weight) -> int:
    if isinstance(weight, torch.Tensor):
        return int(torch.count_nonzero(weight.detach()))
    return int(np.count_nonzero(np.asarray(weight) != 0))


def _violations(weight, n: int, m: int, axis: int) -> tuple[int, int]:
    from slimgraph.sparsity.masks import nm_violations

    return nm_violations(weight, n, m, axis)


def evaluate(layer: LayerCheck, weight, pattern: tuple[int, int] | None, *,
              trt_dtype_ok: bool) -> LayerCheck:
    """Fill zero fraction, N:M status and the TensorRT verdict of a visible weight."""
    numel = int(np.prod(layer.shape)) if layer.shape else 1
    layer.zero_fraction = 1.0 - _nonzeros(weight) / numel if numel else 0.0
    k, axis = layer.reduction_size, layer.axis
    assert k is not None and axis is not None
    results: dict[tuple[int, int], tuple[int, int]] = {}
    if pattern is not None:
        n, m = pattern
        if k % m:
            layer.status = "skipped"
            layer.reason = f"reduction size {k} (axis {axis}) is not a multiple of M = {m}"
        else:
            bad, total = results[pattern] = _violations(weight, n, m, axis)
            layer.groups_violating, layer.groups_total = bad, total
            layer.status = "violates" if bad else "holds"
    else:
        layer.status = "unchecked"
    why = []
    if not trt_dtype_ok:
        why.append(f"dtype {layer.dtype} (needs FP32/FP16/BF16, or INT8/FP8 through Q/DQ)")
    if k % 4:
        why.append(f"K = {k} is not a multiple of 4")
    else:
        bad, total = results.get(TRT_PATTERN) or _violations(weight, *TRT_PATTERN, axis)
        if bad:
            why.append(f"not 2:4 ({bad} of {total} groups)")
    small = [f"{label} = {v}" for label, v in (("K", k), ("N", layer.output_size))
             if v is not None and (v < TRT_MIN_DIM or v % TRT_DIM_MULTIPLE)]
    if small:
        why.append(", ".join(small) + f" (needs multiples of {TRT_DIM_MULTIPLE}, >= {TRT_MIN_DIM})")
    layer.trt_sparse = not why
    layer.trt_reason = "; ".join(why) or None
    return layer
