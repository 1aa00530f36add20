"""Loading an ONNX file and checking it before anything is imported.

Errors. A missing, unreadable, truncated or checker-rejected file raises
:class:`slimgraph.errors.OnnxImportError` with one line naming the file; so does an
external data file that is missing or shorter than its initializers need. Where the
file leaves values without shapes, ONNX shape inference (``onnx_ir``'s pass, not strict)
fills in what it can; what it cannot leaves the nodes concerned barriers.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir

from slimgraph.errors import OnnxImportError


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


def load_onnx(path: Path) -> ir.Model:
    if not path.exists():
        raise OnnxImportError(f"{path}: no such file")
    if not path.is_file():
        raise OnnxImportError(f"{path}: not a file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise OnnxImportError(
            f"{path}: not a readable ONNX model (corrupt or truncated?): {_first_line(e)}"
        ) from e
    if not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise OnnxImportError(f"{path}: not an ONNX model (no graph or an empty graph)")
    try:
        onnx.checker.check_model(str(path))  # by path: external data resolved next to it
    except Exception as e:
        raise OnnxImportError(f"{path}: rejected by onnx.checker: {_first_line(e)}") from e
    try:
        # What onnx_ir.load does, without parsing the file a second time.
        model = ir.serde.deserialize_model(proto)
        ir.external_data.set_base_dir(model.graph, str(path.parent))
    except Exception as e:
        raise OnnxImportError(f"{path}: onnx_ir cannot read the model: {_first_line(e)}") from e
    _check_external_data(model, path)
    if any(v.shape is None for n in model.graph for v in n.outputs if v.name):
        try:
            from onnx_ir.passes.common import ShapeInferencePass

            ShapeInferencePass(strict_mode=False)(model)
        except Exception:  # missing shapes turn the affected nodes into barriers
            pass
    return model


def _check_external_data(model: ir.Model, path: Path) -> None:
    for name, v in model.graph.initializers.items():
        t = v.const_value
        if not isinstance(t, ir.ExternalTensor):
            continue
        file = Path(t.base_dir or path.parent) / t.location
        if not file.is_file():
            raise OnnxImportError(
                f"{path}: external data file {t.location!r} of initializer {name!r} is missing"
            )
        need = (t.offset or 0) + (t.length if t.length is not None else t.nbytes)
        if file.stat().st_size < need:
            raise OnnxImportError(
                f"{path}: external data file {t.location!r} is truncated "
                f"(initializer {name!r} needs {need} bytes, file has {file.stat().st_size})"
            )
