"""The ONNX frontend, in parts; :mod:`slimgraph.frontends.onnx_import` is its entry.

- :mod:`~slimgraph.frontends.onnx.loading`: reading and checking the file;
- :mod:`~slimgraph.frontends.onnx.nodes`: helpers for ONNX nodes and values;
- :mod:`~slimgraph.frontends.onnx.weights`: stored weights and the parameter handles
  that write back into them (:class:`OnnxParamHandle`);
- :mod:`~slimgraph.frontends.onnx.provenance`: which torch parameter each stored weight
  is, from the dynamo exporter's metadata;
- :mod:`~slimgraph.frontends.onnx.importer`: the pass over the graph;
- :mod:`~slimgraph.frontends.onnx.folding`: small constants folded, shape tensors with
  symbolic entries, shapes the file leaves unknown;
- :mod:`~slimgraph.frontends.onnx.context`, :mod:`~slimgraph.frontends.onnx.standard_ops`,
  :mod:`~slimgraph.frontends.onnx.contrib_ops`, :mod:`~slimgraph.frontends.onnx.converters`:
  the per-op converters (standard ops, ONNX Runtime's com.microsoft ops) and their table.

Nothing is imported here, so each part can be imported alone.
"""
