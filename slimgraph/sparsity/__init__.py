"""Post-training sparsity: pure-tensor kernels, independent of any model or graph.

- :mod:`slimgraph.sparsity.scores` -- importance scores (magnitude, Wanda, RI, RIA)
  of a weight ``[C_out, C_in]`` (ALGORITHMS.md section 1).
- :mod:`slimgraph.sparsity.masks` -- keep-masks from scores: unstructured (one threshold
  per layer or per output row) and N:M along the reduction axis; N:M pattern parsing and
  verification of stored weights along any axis.
- :mod:`slimgraph.sparsity.reconstruct` -- calibration statistics (Gram matrix, input
  channel norms) and the SparseGPT-style weight update (ALGORITHMS.md section 2),
  usable with any score and both mask kinds.
- :mod:`slimgraph.sparsity.calibration` -- block-sequential calibration over a model.

Conventions: a linear computes ``y = x Wᵀ``; ``W_ij`` joins input channel ``j`` to
output channel ``i``; masks are boolean *keep*-masks (``True`` = weight stays).
"""
