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
from slimgraph.sparsity.onnx_targets import find_targets
from slimgraph.structured.observer import BlockObserver

if TYPE_CHECKING:
    import onnx_ir as ir


class OnnxBlocks(BlockObserver):
    """The decoder blocks of the ``onnx_ir`` ``model`` (``result``: the analysis of its
    imported graph) on the calibration ``windows`` (token ids ``[samples, seqlen]``, run
    ``batch`` at a time); segment models are saved under a temporary folder in
    ``tmp_parent``. Raises :class:`~slimgraph.sparsity.onnx_blocks.SegmentError` when the
    graph cannot be cut into layers. :meth:`close` removes the temporary folder."""

    def __init__(self, model: ir.Model, result, windows: torch.Tensor, *, batch: int = 8,
                 tmp_parent: Path | None = None) -> None:
        super().__init__(result)
        targets, _ = find_targets(result)
        self.targets = {t.name: t for t in targets}
        segments = plan_segments(model.graph, targets, target_layers(result, targets))
        self.segments = {s.layer: s for s in segments}
        self.blocks = [Block(s.layer, block_prefix(s.targets[0].name) or str(s.layer),
                             [t.label for t in s.targets]) for s in segments]
        self.walk = SegmentWalk(model, segments, windows, batch=batch, tmp_parent=tmp_parent)

    def first_inputs(self) -> list[dict]:
        return self.walk.new_stream()

    def grams(self, block: Block, inputs: list[dict], params: set[str], *,
              advance: bool = False) -> tuple[dict[str, torch.Tensor], Any]:
        from slimgraph.sparsity.reconstruct import GramAccumulator

        segment = self.segments[block.layer]
        missing = sorted(p for p in params if p not in self.targets)
        if missing:
            raise PipelineError(f"calibration: the linear reading '{missing[0]}' is not a "
                                "stored 2-D weight of a decoder block")
        accs = {}
        for p in params:
            t = self.targets[p]
            accs.setdefault(tuple(t.inputs), GramAccumulator(t.in_features, hessian=True))
        names = list(dict.fromkeys(n for key in accs for n in key))
        if names:
            for acts in self.walk.activations(segment, names, inputs):
                for key, acc in accs.items():
                    for name in key:
                        observe(acc, name, acts[name])
        grams = {p: accs[tuple(self.targets[p].inputs)].hessian().to(torch.float64)
                 for p in params}
        if advance:
            return grams, self.propagate(block, inputs)
        return grams, None

    def propagate(self, block: Block, inputs: list[dict]) -> list[dict]:
        self.walk.propagate(self.segments[block.layer], inputs)
        return inputs

    def close(self) -> None:
        self.walk.close()

    def label(self, param: str) -> str:
        """The module name the exporter recorded (an export wrapper's prefix removed), as
        the PyTorch model names the linear."""
        t = self.targets.get(param)
        return t.label if t is not None else super().label(param)
