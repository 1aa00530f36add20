"""ONNX Runtime sessions: CPU by default, CUDA when onnxruntime-gpu and a GPU are present."""

from __future__ import annotations

from pathlib import Path


def providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if ort.get_device() == "GPU" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers())


_INT_TYPES = {"tensor(int64)": "int64", "tensor(int32)": "int32"}


def token_feeds(sess, ids) -> dict:
    """Feeds for a causal LM session from token ids ``[batch, seq]``: the input whose name
    contains ``input_ids`` (else the first) gets the ids, ``attention_mask`` ones and
    ``position_ids`` ``0..L-1``; any other input is an error (SlimgraphError)."""
    import numpy as np

    from slimgraph.errors import SlimgraphError

    inputs = sess.get_inputs()
    ids_in = next((i for i in inputs if "input_ids" in i.name), inputs[0])
    ids = np.asarray(ids)
    feeds = {}
    for inp in inputs:
        dtype = _INT_TYPES.get(inp.type)
        if inp is ids_in:
            if dtype is None:
                raise SlimgraphError(f"ONNX input '{inp.name}' is {inp.type}, not token ids")
            feeds[inp.name] = ids.astype(dtype)
        elif "attention_mask" in inp.name:
            feeds[inp.name] = np.ones(ids.shape, dtype=dtype or "int64")
        elif "position_ids" in inp.name:
            pos = np.arange(ids.shape[1], dtype=dtype or "int64")[None, :]
            feeds[inp.name] = np.ascontiguousarray(np.broadcast_to(pos, ids.shape))
        else:
            raise SlimgraphError(f"ONNX input '{inp.name}' cannot be fed (only input_ids, "
                                 "attention_mask and position_ids are)")
    return feeds
