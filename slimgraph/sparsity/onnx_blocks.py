"""Block-sequential calibration on an ONNX graph, through ONNX Runtime.

The block walks (``sparsify``'s :func:`~slimgraph.sparsity.block_prune.prune_blocks`,
structured removal's :func:`~slimgraph.structured.recovery.walk_blocks`) observe block
``k`` on the outputs of the already-pruned blocks ``0..k-1``. This module lets them do
that (through :class:`~slimgraph.structured.onnx_observer.OnnxBlocks`) on a model that exists
only as an ONNX file, without module boundaries to hook: the graph is cut into one
segment per decoder layer, and each segment becomes a small ONNX model of its own.

Segments come from the graph, not from node names. Every target weight (a decoder-block
linear, ``slimgraph/ir/blocks.py``) has a layer (its block number). For every node:

* ``depth`` -- the highest layer of a target weight among its ancestors (itself
  included); ``-1`` for *side* nodes that no target feeds (the embedding lookup,
  attention masks, rotary caches, shape arithmetic on the token ids);
* ``next`` -- the lowest layer of a target weight among its descendants: nodes that feed
  no target (the final norm, ``lm_head``) are not needed for calibration.

A needed non-side node starts in segment ``depth`` and then *sinks* (in reverse
topological order) into the segment of its earliest consumer whenever that does not
increase the number of tensors that cross a segment boundary: the pre-norm of block
``k+1`` moves into segment ``k+1``, the residual ``Add`` that ends block ``k`` stays
(moving it would make two tensors cross instead of one). What crosses into segment
``k`` -- in a transformer, the residual stream -- is kept for every calibration batch;
side nodes are not cut at all: each segment model recomputes the ones it needs from the
token inputs (``onnx_ir.convenience.extract`` walks back to them).

Per layer ``k``: the *observe* model (its targets' input activations as outputs) runs
over the calibration batches and the statistics accumulate (Wanda/RIA's per-channel statistic,
and the Gram matrix for SparseGPT's reconstruction); the layer's weights are pruned
(written into the ONNX model); the *propagate* model -- extracted again, so it holds the
pruned weights -- computes what crosses into later segments.
Memory: the crossing tensors for the calibration set (the residual stream: samples x
seqlen x hidden) and one segment model at a time.

:func:`plan_segments` raises :class:`SegmentError` when the graph cannot be cut this
way (a target fed by a later layer's target, a crossing tensor of unknown type, a
control-flow node on the path); ``sparsify`` then falls back to one-shot calibration and
says so in its report.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from slimgraph.errors import PipelineError, SlimgraphError

if TYPE_CHECKING:
    import onnx_ir as ir

    from slimgraph.sparsity.onnx_targets import Target
    from slimgraph.sparsity.reconstruct import GramAccumulator

NOT_NEEDED = 1 << 30


class SegmentError(SlimgraphError):
    """The ONNX graph cannot be cut into per-layer segments (see the module docstring)."""


@dataclass
class Segment:
    """The nodes of one decoder layer's segment, by what a segment model needs."""

    layer: int
    targets: list[Target] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # crossing in (from earlier segments)
    outputs: list[str] = field(default_factory=list)  # crossing out (to later segments)
    observe: list[str] = field(default_factory=list)  # the targets' input activations
    last_use: dict[str, int] = field(default_factory=dict)  # crossing out -> last layer using it


def target_layers(result, targets: list[Target]) -> dict[str, int]:
    """Each target's layer: its block number (:func:`slimgraph.ir.blocks.block_linears`
    of the analysed graph)."""
    from slimgraph.ir.blocks import block_linears

    layers = {lin.weight: lin.layer for lin in block_linears(result.graph)}
    out = {}
    for t in targets:
        if t.name not in layers:
            raise SegmentError(f"{t.name}: not a decoder-block linear (no block number in its "
                               "name)")
        out[t.name] = layers[t.name]
    return out


def plan_segments(graph: ir.Graph, targets: list[Target], layers: dict[str, int]
                  ) -> list[Segment]:
    """Cut ``graph`` into one segment per layer of ``layers`` (see the module docstring)."""
    nodes = list(graph)
    index = {id(n): i for i, n in enumerate(nodes)}
    target_layer: dict[int, int] = {}  # node id -> layer of the target weight it reads
    for t in targets:
        for stored in t.handle.targets:
            for node, _ in stored.uses:
                target_layer[id(node)] = max(target_layer.get(id(node), -1), layers[t.name])

    def producer(v):
        p = v.producer() if v is not None else None
        return p if p is not None and id(p) in index else None

    subgraph = _graph_attr_types()
    depth: dict[int, int] = {}
    for i, n in enumerate(nodes):
        if any(a.type in subgraph for a in n.attributes.values()):
            raise SegmentError(f"node '{n.name}' ({n.op_type}) holds a subgraph")
        d = target_layer.get(id(n), -1)
        for v in n.inputs:
            p = producer(v)
            if p is not None:
                if index[id(p)] >= i:
                    raise SegmentError("the ONNX graph is not topologically sorted "
                                       f"(node '{n.name}')")
                d = max(d, depth[id(p)])
        depth[id(n)] = d
    nxt: dict[int, int] = {}
    for n in reversed(nodes):
        m = target_layer.get(id(n), NOT_NEEDED)
        for o in n.outputs:
            for c in o.consumers():
                m = min(m, nxt.get(id(c), NOT_NEEDED))
        nxt[id(n)] = m
    for n in nodes:
        lay = target_layer.get(id(n))
        if lay is not None and (depth[id(n)] != lay or nxt[id(n)] != lay):
            raise SegmentError(f"node '{n.name}' ({n.op_type}) reads a layer-{lay} weight but "
                               "depends on, or feeds, a linear of another layer out of order")

    seg = {id(n): depth[id(n)] for n in nodes if depth[id(n)] >= 0 and nxt[id(n)] < NOT_NEEDED}

    def consumers_in_seg(v):
        return [c for c in v.consumers() if id(c) in seg]

    def crosses(v) -> bool:
        p = producer(v)
        if p is None or id(p) not in seg:
            return False
        return any(seg[id(c)] > seg[id(p)] for c in consumers_in_seg(v))

    for n in reversed(nodes):
        if id(n) not in seg or id(n) in target_layer:
            continue
        later = [seg[id(c)] for o in n.outputs for c in consumers_in_seg(o)]
        if not later or min(later) <= seg[id(n)]:
            continue
        affected = [o for o in n.outputs] + [v for v in n.inputs if producer(v) is not None]
        before = sum(crosses(v) for v in affected)
        old = seg[id(n)]
        seg[id(n)] = min(later)
        if sum(crosses(v) for v in affected) > before:
            seg[id(n)] = old

    graph_inputs = {v.name for v in graph.inputs}
    for t in targets:
        if graph_inputs.intersection(t.inputs):
            raise SegmentError(f"{t.name} reads a graph input directly")
    order = sorted(set(layers.values()))
    segments = {k: Segment(k) for k in order}
    for t in targets:
        s = segments[layers[t.name]]
        s.targets.append(t)
        s.observe.extend(x for x in t.inputs if x not in s.observe)
    for n in nodes:
        if id(n) not in seg:
            continue
        for o in n.outputs:
            later = sorted({seg[id(c)] for c in consumers_in_seg(o) if seg[id(c)] > seg[id(n)]})
            if not later:
                continue
            if o.dtype is None:
                raise SegmentError(f"the tensor '{o.name}' crosses from layer {seg[id(n)]} to "
                                   f"layer {later[0]} and its type is unknown")
            segments[seg[id(n)]].outputs.append(o.name)
            segments[seg[id(n)]].last_use[o.name] = later[-1]
            for k in later:
                segments[k].inputs.append(o.name)
    return [segments[k] for k in order]


def _graph_attr_types():
    import onnx_ir as ir

    return (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)


def segment_model(model: ir.Model, inputs: list[str], outputs: list[str]) -> ir.Model:
    """A stand-alone model of the nodes that compute ``outputs`` from the graph's token
    inputs and the crossing tensors ``inputs`` (weights as they are now)."""
    import onnx_ir as ir

    graph_inputs = [v.name for v in model.graph.inputs]
    sub = ir.convenience.extract(model.graph, [*graph_inputs, *inputs], outputs)
    for v in [*sub.inputs, *sub.outputs]:
        if v.type is None:
            v.type = ir.TensorType(v.dtype or ir.DataType.FLOAT)
    return ir.Model(sub, ir_version=model.ir_version, producer_name="slimgraph-calibration",
                    functions=list(model.functions.values()))


class SegmentRunner:
    """Saves segment models under one temporary directory and runs them in ORT."""

    def __init__(self, model: ir.Model, tmp_parent: Path | None):
        self.model = model
        self.tmp = Path(tempfile.mkdtemp(prefix=".calib-", dir=tmp_parent))
        self.count = 0

    def session(self, inputs: list[str], outputs: list[str]):
        import onnx_ir as ir

        from slimgraph.backends.ort_session import session

        self.count += 1
        path = self.tmp / f"segment{self.count}.onnx"
        ir.save(segment_model(self.model, inputs, outputs), path,
                external_data=f"segment{self.count}.onnx.data")
        return session(path)

    def close(self):
        shutil.rmtree(self.tmp, ignore_errors=True)


class SegmentWalk:
    """What a block-sequential walk over ``segments`` needs between layers: the
    calibration batches of ``windows`` and, per *stream* (a list with one dict per batch:
    crossing tensor name -> array), the tensors that cross into later segments. A stream
    starts empty (:meth:`new_stream`); :meth:`activations` runs a segment model on it and
    :meth:`propagate` moves it past a segment (with the weights as they are then)."""

    def __init__(self, model: ir.Model, segments: list[Segment], windows: torch.Tensor, *,
                 batch: int = 8, tmp_parent: Path | None = None) -> None:
        self.runner = SegmentRunner(model, tmp_parent)
        try:
            self.chunks = list(batches(GraphInputs(model.graph), windows, batch))
        except BaseException:
            self.runner.close()
            raise
        self.last_use = {n: k for s in segments for n, k in s.last_use.items()}

    def new_stream(self) -> list[dict[str, np.ndarray]]:
        """The crossing tensors before the first segment: none."""
        return [{} for _ in self.chunks]

    def activations(self, s: Segment, names: list[str], stream: list[dict[str, np.ndarray]]):
        """Per calibration batch, ``{name: array}`` for the activations ``names`` of
        segment ``s`` (computed by one segment model from the batch's tokens and the
        crossing tensors in ``stream``; a crossing tensor itself is taken from there)."""
        want = [x for x in names if x not in s.inputs]
        sess = self.runner.session(s.inputs, want) if want else None
        for chunk, keep in zip(self.chunks, stream, strict=True):
            outs = dict(zip(want, sess.run(want, segment_feeds(sess, chunk, keep, s.inputs)),
                            strict=True)) if sess is not None else {}
            yield {name: outs[name] if name in outs else keep[name] for name in names}

    def propagate(self, s: Segment, stream: list[dict[str, np.ndarray]]) -> None:
        """Move ``stream`` past segment ``s``: add what ``s`` computes for later segments,
        drop what no later segment reads."""
        if s.outputs:
            sess = self.runner.session(s.inputs, s.outputs)
            for chunk, keep in zip(self.chunks, stream, strict=True):
                keep.update(zip(s.outputs, sess.run(s.outputs, segment_feeds(sess, chunk, keep,
                                                                              s.inputs)),
                                strict=True))
            del sess
        for keep in stream:
            for name in [n for n in keep if self.last_use[n] <= s.layer]:
                del keep[name]

    def close(self) -> None:
        self.runner.close()


def observe(acc: GramAccumulator, name: str, arr: np.ndarray) -> None:
    """Add the activation ``name`` of one batch to ``acc``; a width that does not match
    the weight reading it is a PipelineError naming the value."""
    if arr.shape[-1] != acc.in_features:
        raise PipelineError(f"calibration: the activation '{name}' has {arr.shape[-1]} "
                            f"channels, the weight reading it expects {acc.in_features}")
    acc.add(torch.from_numpy(arr))


def batches(sess, windows: torch.Tensor, batch: int):
    """Windows in batches the model's token input accepts (fixed axes are respected)."""
    ids_in = next((i for i in sess.get_inputs() if "input_ids" in i.name), sess.get_inputs()[0])
    shape = list(ids_in.shape) if ids_in.shape is not None else []
    n, seqlen = windows.shape
    if len(shape) != 2:
        raise PipelineError(f"calibration: the ONNX input '{ids_in.name}' has shape {shape}, "
                            "not [batch, sequence] token ids")
    if isinstance(shape[1], int) and shape[1] != seqlen:
        raise PipelineError(f"calibration: the ONNX input '{ids_in.name}' has a fixed length of "
                            f"{shape[1]} tokens; set seqlen={shape[1]} (or --calib-seqlen)")
    if isinstance(shape[0], int):
        if n % shape[0]:
            raise PipelineError(f"calibration: the ONNX input '{ids_in.name}' has a fixed batch "
                                f"of {shape[0]}; use a multiple of it as samples ({n} given)")
        batch = shape[0]
    ids = windows.numpy()
    for i in range(0, n, batch):
        yield ids[i : i + batch]


def segment_feeds(sess, chunk: np.ndarray, keep: dict[str, np.ndarray], inputs: list[str]
           ) -> dict[str, np.ndarray]:
    """The token feeds (ids, mask, positions) of the segment model plus its crossing
    inputs for this batch."""
    from slimgraph.backends.ort_session import token_feeds

    feeds = token_feeds(_TokenInputs(sess, inputs), chunk)
    feeds.update((name, keep[name]) for name in inputs)
    return feeds


class GraphInputs:
    """The model's inputs in the shape of ``InferenceSession.get_inputs()`` (name, shape)
    for :func:`batches`, without building a session."""

    def __init__(self, graph):
        self._inputs = [_Arg(v.name, None if v.shape is None else
                             [d if isinstance(d, int) else str(d) for d in v.shape])
                        for v in graph.inputs]

    def get_inputs(self):
        return self._inputs


@dataclass
class _Arg:
    name: str
    shape: list | None


class _TokenInputs:
    """A session seen without its crossing inputs (for ``token_feeds``)."""

    def __init__(self, sess, crossing: list[str]):
        self._inputs = [i for i in sess.get_inputs() if i.name not in crossing]

    def get_inputs(self):
        return self._inputs
