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
