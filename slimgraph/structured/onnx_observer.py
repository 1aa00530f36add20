"""The ONNX side of calibrated structured removal: :class:`OnnxBlocks`, the block observer
(:mod:`slimgraph.structured.observer`) of a model that exists only as an ONNX file.

It walks the decoder blocks the way ``sparsify`` does on ONNX input
(:mod:`slimgraph.sparsity.onnx_blocks`): the graph is cut into one segment per decoder
layer (the segments of every decoder-block linear, :func:`~slimgraph.sparsity.onnx_targets.
find_targets`), and a segment model -- extracted from the model in memory, so it holds the
weights as the walk left them -- runs in ONNX Runtime on the tokens and the tensors that
cross into it from earlier layers. A linear's inputs are the activations its MatMul/Gemm
reads; its weight is read and written through the imported graph's parameter handles.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from slimgraph.errors import PipelineError
from slimgraph.ir.blocks import Block, block_prefix
from slimgraph.sparsity.onnx_blocks import (SegmentWalk, observe, plan_segments,
                                            target_layers)
from slimgraph.sparsity.onnx_permute import TargetSite
from slimgraph.sparsity.onnx_targets import find_targets
from slimgraph.structured.observer import BlockObserver, ObserverError

if TYPE_CHECKING:
    import onnx_ir as ir


class OnnxLayers(BlockObserver):
    """The decoder blocks of an imported ONNX graph (``result``: its analysis), one per
    layer of its targets, without running anything. ``stats`` (target name ->
    :class:`~slimgraph.sparsity.reconstruct.GramAccumulator`, from one run of the dense
    model) are what :meth:`statistics` returns, whatever the inputs; without them it
    refuses. ``untargeted``: the report entries of block linears that cannot be pruned."""

    def __init__(self, result, stats: dict | None = None) -> None:
        super().__init__(result)
        targets, self.untargeted = find_targets(result)
        self.targets = {t.name: t for t in targets}
        self.stats = stats
        layers = sorted({t.layer for t in targets})
        self.blocks = [self.block(k, [t for t in targets if t.layer == k]) for k in layers]

    @staticmethod
    def block(layer: int, targets: list) -> Block:
        return Block(layer, block_prefix(targets[0].name) or str(layer),
                     [TargetSite(t).label for t in targets])

    def first_inputs(self) -> None:
        return None

    def statistics(self, block: Block, inputs: Any, params: list[str], *, hessian: bool,
                   advance: bool = False) -> tuple[dict, Any]:
        if self.stats is None or hessian:
            raise ObserverError("these ONNX blocks are not run one by one: only the dense "
                                "model's channel norms are known")
        return {p: self.stats[p] for p in params}, inputs if advance else None

    def propagate(self, block: Block, inputs: Any) -> Any:
        return inputs

    def sites(self, block: Block, opts) -> dict[str, Any]:
        sites = [TargetSite(t) for t in self.targets.values() if t.layer == block.layer]
        return {s.label: s for s in sites}

    def label(self, param: str) -> str:
        """The module name the exporter recorded (an export wrapper's prefix removed), as
        the PyTorch model names the linear."""
        t = self.targets.get(param)
        return t.label if t is not None else super().label(param)


class OnnxBlocks(OnnxLayers):
    """The decoder blocks of the ``onnx_ir`` ``model`` (``result``: the analysis of its
    imported graph) on the calibration ``windows`` (token ids ``[samples, seqlen]``, run
    ``batch`` at a time); segment models are saved under a temporary folder in
    ``tmp_parent``. Raises :class:`~slimgraph.sparsity.onnx_blocks.SegmentError` when the
    graph cannot be cut into layers. :meth:`close` removes the temporary folder."""

    def __init__(self, model: ir.Model, result, windows: torch.Tensor, *, batch: int = 8,
                 tmp_parent: Path | None = None) -> None:
        super().__init__(result)
        targets = list(self.targets.values())
        segments = plan_segments(model.graph, targets, target_layers(result, targets))
        self.segments = {s.layer: s for s in segments}
        self.blocks = [self.block(s.layer, s.targets) for s in segments]
        self.walk = SegmentWalk(model, segments, windows, batch=batch, tmp_parent=tmp_parent)

    def first_inputs(self) -> list[dict]:
        return self.walk.new_stream()

    def statistics(self, block: Block, inputs: list[dict], params: list[str], *, hessian: bool,
                   advance: bool = False) -> tuple[dict, Any]:
        from slimgraph.sparsity.reconstruct import GramAccumulator

        segment = self.segments[block.layer]
        missing = sorted(p for p in params if p not in self.targets)
        if missing:
            raise PipelineError(f"calibration: the linear reading '{missing[0]}' is not a "
                                "stored 2-D weight of a decoder block")
        accs = {}
        for p in params:
            t = self.targets[p]
            accs.setdefault(tuple(t.inputs), GramAccumulator(t.in_features, hessian=hessian))
        names = list(dict.fromkeys(n for key in accs for n in key))
        if names:
            for acts in self.walk.activations(segment, names, inputs):
                for key, acc in accs.items():
                    for name in key:
                        observe(acc, name, acts[name])
        out = {p: accs[tuple(self.targets[p].inputs)] for p in params}
        return out, self.propagate(block, inputs) if advance else None

    def propagate(self, block: Block, inputs: list[dict]) -> list[dict]:
        self.walk.propagate(self.segments[block.layer], inputs)
        return inputs

    def close(self) -> None:
        self.walk.close()
