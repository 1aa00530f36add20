"""Post-training sparsity: kernels (independent of any model), calibration, checks.

- :mod:`slimgraph.sparsity.scores` -- importance scores (magnitude, Wanda, RI, RIA)
  of a weight ``[C_out, C_in]`` (ALGORITHMS.md section 1).
- :mod:`slimgraph.sparsity.masks` -- keep-masks from scores: unstructured (one threshold
  per layer or per output row) and N:M along the reduction axis; N:M pattern parsing and
  verification of stored weights along any axis.
- :mod:`slimgraph.sparsity.reconstruct` -- calibration statistics (Gram matrix, input
  channel norms) and the SparseGPT-style weight update (ALGORITHMS.md section 2),
  usable with any score and both mask kinds.
- :mod:`slimgraph.sparsity.calibration` -- block-sequential calibration over a model.
- :mod:`slimgraph.sparsity.schedules` -- per-layer sparsity schedules (explicit, linear,
  OWL outlier-weighted) for unstructured masks.
- :mod:`slimgraph.sparsity.permutation` -- channel permutation search for N:M
  (heuristic allocation + linear-sum-assignment refinement; exact and fast modes).
- :mod:`slimgraph.sparsity.check` -- verification of stored sparsity in PyTorch weights
  and ONNX files (TensorRT's axis rules), behind `slimgraph check-sparsity`.
- :mod:`slimgraph.sparsity.options` -- :class:`PruneOptions`, what the library reads of a
  ``sparsify`` run (the pass builds it); :mod:`slimgraph.sparsity.prune_step` -- the
  per-linear step (score, permutation, mask or update, write) both paths share;
  :mod:`slimgraph.sparsity.block_prune` (PyTorch) and :mod:`slimgraph.sparsity.onnx_path`
  (ONNX, with ``onnx_targets``, ``onnx_blocks``, ``onnx_permute``) -- the two paths.

Conventions: a linear computes ``y = x Wᵀ``; ``W_ij`` joins input channel ``j`` to
output channel ``i``; masks are boolean *keep*-masks (``True`` = weight stays).
"""
