"""Import an ONNX model (external data included) into the IR.

The same analysis (``slimgraph.ir.dependency.analyze``) then yields the same channel
groups as the torch frontend. Each ONNX op is translated by an entry of ``CONVERTERS``
(keyed by ``(domain, op_type)``) into a normalized ``OpKind`` with normalized
attributes; an op without an entry, or one whose inputs do not fit the entry's
assumptions, becomes ``OpKind.UNKNOWN`` (a barrier), never a guess.

This module is the entry; the parts live in :mod:`slimgraph.frontends.onnx`:

- Loading (:mod:`~slimgraph.frontends.onnx.loading`). A missing, unreadable, truncated or
  checker-rejected file raises :class:`slimgraph.errors.OnnxImportError` with one line
  naming the file.
- Weights (:mod:`~slimgraph.frontends.onnx.weights`). Initializers (and ``Constant``
  nodes) that hold weights become parameters whose handle (:class:`OnnxParamHandle`)
  writes back into the ``onnx_ir`` model, so a backend can save the pruned model.
- Provenance (:mod:`~slimgraph.frontends.onnx.provenance`). The metadata of
  ``torch.onnx.export(..., dynamo=True)`` undoes most of what its optimizer did to the
  weights: module FQNs, original (untransposed) layouts, merged initializers split
  again; what cannot be recovered is a parameter named after the ONNX value, noted in
  ``Graph.meta["onnx_provenance"]``.
- The pass over the graph (:mod:`~slimgraph.frontends.onnx.importer`), and what it
  computes itself (:mod:`~slimgraph.frontends.onnx.folding`): small constants become
  ``SOURCE`` nodes carrying their value in ``Value.const`` and shape arithmetic over
  them is folded; shape tensors computed at run time from dynamic axes keep their
  entries as ints and dim names; dims the file leaves unknown are completed from the
  inputs, with products of symbols (``4*batch``).
- Converters (:mod:`~slimgraph.frontends.onnx.standard_ops`, the table in
  :mod:`~slimgraph.frontends.onnx.converters`), and those for the com.microsoft ops of
  ONNX Runtime's transformer optimizer (:mod:`~slimgraph.frontends.onnx.contrib_ops`):
  fused attention, skip / embed layer norms and biased gelus are emitted as what they
  compute on channels; forms whose channels are not described (KV caches, per-head
  attention biases) are barriers whose output shapes are still recorded.
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from slimgraph.frontends.onnx.converters import CONVERTERS
from slimgraph.frontends.onnx.importer import OnnxImporter
from slimgraph.frontends.onnx.loading import load_onnx
from slimgraph.frontends.onnx.weights import OnnxParamHandle
from slimgraph.ir.graph import Graph

# metadata keys of the dynamo exporter, still read from here (by the tests)
from slimgraph.frontends.onnx.provenance import FOLDED_KEY, FX_NODE_KEY, SIGNATURE_KEY  # noqa: F401

__all__ = ["CONVERTERS", "OnnxParamHandle", "import_onnx", "import_onnx_model"]


def import_onnx(path: str | Path) -> Graph:
    """Load ``path`` with ``onnx_ir`` and translate it to a :class:`Graph`."""
    path = Path(path)
    model = load_onnx(path)
    return OnnxImporter(model, path).run()


def import_onnx_model(model: ir.Model, path: str | Path) -> Graph:
    """Translate an ``onnx_ir`` model already in memory (e.g. one a pass modified; it was
    loaded from ``path``) to a :class:`Graph` whose handles write into ``model``."""
    return OnnxImporter(model, Path(path)).run()
