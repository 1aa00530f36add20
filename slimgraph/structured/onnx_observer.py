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
from slimgraph.structured.observer import BlockObserver, ObserverError, PairSums

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

    pairs = True

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

    def fork(self, inputs: list[dict]) -> list[dict]:
        return [dict(keep) for keep in inputs]

    def observe_pair(self, block: Block, dense_inputs: list[dict], inputs: list[dict],
                     params: set[str], residual: str | None) -> dict[str, dict]:
        """The segment run on both streams, batch by batch (dense first, with the block's
        weights not yet changed); ``dense_inputs`` is then moved past the block. The
        residual writer's target needs its MatMul's output ``y`` to be read by exactly one
        Add ``z = rest + y``: then ``e = z_dense - z_pruned + y``."""
        segment = self.segments[block.layer]
        keys = {p: tuple(self.targets[p].inputs) for p in params}
        names = list(dict.fromkeys(n for key in keys.values() for n in key))
        y, z = self.residual_values(residual) if residual is not None else (None, None)
        sums = PairSums()
        dense = self.walk.activations(segment, names + ([z] if z else []), dense_inputs)
        pruned = self.walk.activations(segment, names + ([y, z] if z else []), inputs)
        for ad, ap in zip(dense, pruned, strict=True):
            for key in dict.fromkeys(keys.values()):
                for name in key:
                    sums.add(key, torch.from_numpy(ad[name]), torch.from_numpy(ap[name]))
            first = ap[names[0]]
            sums.tokens += first.size // first.shape[-1]
            if z is not None:
                sums.add_residual(keys[residual], torch.from_numpy(ad[z] - ap[z] + ap[y]),
                                  torch.from_numpy(ap[keys[residual][0]]))
        self.walk.propagate(segment, dense_inputs)
        by_key = sums.result(keys.get(residual), z is not None)
        return {p: dict(by_key[key]) for p, key in keys.items()}

    def residual_values(self, param: str) -> tuple[str | None, str | None]:
        """``(y, z)``: the output of the linear ``param`` and the Add that is its only
        reader, or ``(None, None)`` when the graph is not shaped so."""
        from slimgraph.ir.graph import OpKind

        node = next((n for n in self.result.graph.nodes if n.kind is OpKind.LINEAR
                     and n.inputs[1] is not None and n.inputs[1].name == param), None)
        if node is None or len(self.targets[param].inputs) != 1:
            return None, None
        y = node.outputs[0].name
        value = next((o for n in self.walk.runner.model.graph for o in n.outputs
                      if o.name == y), None)
        readers = list(value.consumers()) if value is not None else []
        if len(readers) != 1 or readers[0].op_type != "Add" or len(readers[0].outputs) != 1:
            return None, None
        return y, readers[0].outputs[0].name

    def close(self) -> None:
        self.walk.close()
