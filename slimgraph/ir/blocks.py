"""Decoder blocks and their linears: the one definition every sparsity tool uses.

A *decoder-block linear* is a ``LINEAR`` node of the graph (or a ``MATMUL`` by a 2-D
parameter seen through transposes: Falcon's ``x @ W.T``) whose weight is a parameter
named inside a numbered block -- a name component that is a number and is followed by
more of the name (``model.layers.3.mlp.up_proj.weight``, ``transformer.h.0.attn.c_attn.weight``,
``Attention_0_qkv``) -- and is not an embedding or ``lm_head`` (no component containing
``embed``, ``lm_head``, ``wte`` or ``wpe``). The number is the block's layer
(:func:`layer_number`: also the layer of the analysis' channel groups). Nothing here
depends on the channel analysis: a projection whose heads cannot be pruned (k/v of a
model with one KV head) is a linear of its block all the same.

Users: ``sparsify`` (PyTorch path: :func:`find_blocks`; ONNX path: :func:`block_linears`),
block-sequential calibration (``sparsity/calibration.py``, ``sparsity/onnx_blocks.py``),
``check-sparsity`` (:func:`in_decoder_block` on the names of the file or module it checks).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from slimgraph.errors import SlimgraphError
from slimgraph.ir.graph import OpKind

if TYPE_CHECKING:
    from slimgraph.ir.graph import Graph, Value

# a number component followed by more of the name: "layers.3.", "h_0_", "/0/"; a number
# at the very end ("val_123", "onnx::MatMul_7": names an exporter made up) is no layer
LAYER_RE = re.compile(r"(?:^|[._/])(\d+)[._/]")
NOT_LINEAR = ("embed", "lm_head", "wte", "wpe")


def layer_number(name: str) -> int | None:
    """The block number in a parameter name (the first numbered component), else None."""
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def block_prefix(name: str) -> str | None:
    """The name of the block a parameter lives in: the name up to its block number
    (``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``), else None."""
    m = LAYER_RE.search(name)
    return name[: m.end(1)] if m else None


def is_embedding_name(name: str) -> bool:
    """An embedding table by name (``embed_tokens``, ``wte``, ``wpe``; not ``embed_out``,
    GPT-NeoX's output projection)."""
    return any(x in part.lower() for part in name.split(".") for x in ("embed", "wte", "wpe")) \
        and "embed_out" not in name


def in_decoder_block(name: str) -> bool:
    """True for a parameter name inside a numbered block that is not an embedding or
    ``lm_head`` (``model.layers.3.mlp.up_proj.weight``)."""
    if layer_number(name) is None:
        return False
    return not any(x in part.lower() for part in name.split(".") for x in NOT_LINEAR)


@dataclass(frozen=True)
class BlockLinear:
    """One linear of a decoder block, as the graph has it."""

    weight: str  # the weight parameter's name
    layer: int
    w_in: int  # the weight's input (reduction) dim: 1 for nn.Linear [out, in]

    @property
    def module(self) -> str:
        """The module name (the weight's name without ``.weight``)."""
        return self.weight.removesuffix(".weight")


def weight_param(v: Value | None, through: tuple[OpKind, ...] = (OpKind.TRANSPOSE, OpKind.IDENTITY),
                 depth: int = 4) -> tuple[Value, int] | None:
    """The parameter ``v`` is, seen through up to ``depth`` ops of the kinds ``through``
    (Falcon's ``x @ W.T``), and how many transposes lie between; None if ``v`` is
    computed from anything else."""
    transposes = 0
    while depth and v is not None and v.param is None:
        p = v.producer
        if p is None or p.kind not in through:
            return None
        transposes += p.kind is OpKind.TRANSPOSE
        v, depth = p.inputs[0], depth - 1
    return (v, transposes) if v is not None and v.param is not None else None


def _linear_weight(node) -> tuple[Value, int] | None:
    """(weight parameter, its input dim) of a linear node, or of a matmul whose right
    operand is a 2-D parameter seen through transposes."""
    if len(node.inputs) < 2:
        return None
    if node.kind is OpKind.LINEAR:
        w = node.inputs[1]
        return (w, int(node.attrs.get("w_in", 1))) if w is not None and w.param is not None else None
    if node.kind is OpKind.MATMUL:
        found = weight_param(node.inputs[1])
        if found is not None and found[0].rank == 2:
            return found[0], found[1] % 2  # B = W [in, out], or W.T with W [out, in]
    return None


def block_linears(graph: Graph) -> list[BlockLinear]:
    """Every decoder-block linear of ``graph`` (module docstring), once, in graph order."""
    out: dict[str, BlockLinear] = {}
    for node in graph.nodes:
        found = _linear_weight(node)
        if found is None:
            continue
        w, w_in = found
        if w.name in out or not in_decoder_block(w.name):
            continue
        out[w.name] = BlockLinear(w.name, layer_number(w.name), w_in)
    return list(out.values())


@dataclass
class Block:
    """A decoder block of a PyTorch model: its layer, module and linears."""

    layer: int
    module_name: str
    linears: list[str] = field(default_factory=list)  # module names of its linears
    w_in: dict[str, int] = field(default_factory=dict)  # linear -> input dim of its weight


class BlockError(SlimgraphError):
    """The decoder blocks of a model cannot be told apart."""


def find_blocks(result) -> list[Block]:
    """The decoder blocks of a traced PyTorch model (``result``: its analysis, or the
    graph), in layer order: the linears of each block (:func:`block_linears`) and the
    module they live in."""
    graph = getattr(result, "graph", result)
    blocks: dict[int, Block] = {}
    for lin in block_linears(graph):
        prefix = block_prefix(lin.weight)
        blk = blocks.setdefault(lin.layer, Block(lin.layer, prefix))
        if blk.module_name != prefix:
            raise BlockError(f"layer {lin.layer} has linears in two blocks, '{blk.module_name}' "
                             f"and '{prefix}' ({lin.module})")
        blk.linears.append(lin.module)
        blk.w_in[lin.module] = lin.w_in
    return [blocks[k] for k in sorted(blocks)]
