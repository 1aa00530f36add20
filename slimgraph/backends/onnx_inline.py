"""Saving an ONNX model with every tensor in the file, one initializer at a time.

``onnx_ir.save`` builds the whole ``ModelProto`` and then serializes it to one ``bytes``:
with the model's own arrays, three copies of the weights at once (a 1.66 GB model:
5 GB); ``onnx.checker`` on the written file reads it and parses it again (3.3 GB).
:func:`save_inline` writes the same bytes and checks the same things holding one
initializer at a time.

How. Protobuf encodes a message as the concatenation of its fields, and a field holding
a message as key, length, bytes. The model is serialized with every initializer
replaced by a stand-in (an external-data reference: a few bytes); in that serialization
the graph's initializer fields are the stand-ins, in order, and each is replaced, when
the file is written, by the encoding of the real tensor, built just then. The checker
runs on the model with stand-ins (everything but the tensor data; saved beside the
output, with an empty file for the stand-ins' data, for the checker resolves external
data) and ``check_tensor`` on each real initializer as it is written.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir
from onnx_ir import serde

from slimgraph.frontends.onnx.weights import read_external

_GRAPH = 7  # ModelProto.graph
_INITIALIZER = 5  # GraphProto.initializer
_LENGTH_DELIMITED = 2  # the wire type of both
_STAND_IN = "slimgraph-stand-in"


def can_save_inline(model: ir.Model) -> bool:
    """Only the main graph holds initializers (subgraphs' are left to ``ir.save``)."""
    return all(not g.initializers for g in model.graphs() if g is not model.graph)


def save_inline(model: ir.Model, path: Path) -> None:
    """Write ``model`` to ``path``, every initializer's data in the file: the bytes of
    ``ir.save(model, path, external_data=..., size_threshold_bytes=2**62)``, which reads
    external tensors in (values, name and type only) and names every tensor after its
    value. Checked as the module docstring says; ``model`` is not modified."""
    values = [v for v in model.graph.initializers.values() if v.const_value is not None]
    stand_in = _serialize_with_stand_ins(model, values)
    _check_stand_in(stand_in, Path(path).parent)
    (_, graph_start, payload, graph_end), = [f for f in _fields(stand_in) if f[0] == _GRAPH]
    graph = stand_in[payload:graph_end]
    slots = [(start, end) for number, start, _, end in _fields(graph) if number == _INITIALIZER]
    if len(slots) != len(values):
        raise ValueError(f"{len(slots)} initializer fields for {len(values)} initializers")
    sizes = [_tensor_proto(v).ByteSize() for v in values]  # each built and dropped
    graph_size = len(graph) - sum(end - start for start, end in slots) + \
        sum(len(_key_and_length(_INITIALIZER, n)) + n for n in sizes)
    total = graph_start + len(_key_and_length(_GRAPH, graph_size)) + graph_size + \
        len(stand_in) - graph_end
    if total > onnx.checker.MAXIMUM_PROTOBUF:
        raise ValueError(f"the model is {total} bytes, over protobuf's 2 GB limit")
    with open(path, "wb") as f:
        f.write(stand_in[:graph_start])
        f.write(_key_and_length(_GRAPH, graph_size))
        done = 0
        for value, (start, end), size in zip(values, slots, sizes, strict=True):
            f.write(graph[done:start])
            proto = _tensor_proto(value)
            onnx.checker.check_tensor(proto)
            data = proto.SerializeToString()
            del proto
            if len(data) != size:
                raise ValueError(f"initializer {value.name!r}: {len(data)} bytes, {size} expected")
            f.write(_key_and_length(_INITIALIZER, size))
            f.write(data)
            del data
            done = end
        f.write(graph[done:])
        f.write(stand_in[graph_end:])


def _serialize_with_stand_ins(model: ir.Model, values: list[ir.Value]) -> bytes:
    originals = [v.const_value for v in values]
    try:
        for v, t in zip(values, originals, strict=True):
            v.const_value = ir.ExternalTensor(_STAND_IN, 0, t.nbytes, t.dtype,
                                              shape=t.shape, name=v.name)
        return serde.serialize_model(model).SerializeToString()
    finally:
        for v, t in zip(values, originals, strict=True):
            v.const_value = t


def _check_stand_in(stand_in: bytes, directory: Path) -> None:
    model_file = directory / f"{_STAND_IN}.onnx"
    data_file = directory / _STAND_IN
    try:
        model_file.write_bytes(stand_in)
        data_file.touch()
        onnx.checker.check_model(str(model_file))
    finally:
        model_file.unlink(missing_ok=True)
        data_file.unlink(missing_ok=True)


def _tensor_proto(value: ir.Value) -> onnx.TensorProto:
    """The initializer as ``ir.save`` writes it inline."""
    tensor = value.const_value
    if isinstance(tensor, ir.ExternalTensor):
        tensor = ir.Tensor(read_external(tensor), name=value.name, dtype=tensor.dtype)
    else:
        tensor.name = value.name  # as onnx_ir's serializer does
    return serde.serialize_tensor(tensor)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key_and_length(number: int, length: int) -> bytes:
    return _varint(number << 3 | _LENGTH_DELIMITED) + _varint(length)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _fields(buf: bytes) -> list[tuple[int, int, int, int]]:
    """The top-level fields of a serialized message: ``(number, start, payload, end)``
    (``payload``: where a length-delimited field's bytes start)."""
    fields = []
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _read_varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == _LENGTH_DELIMITED:
            length, pos = _read_varint(buf, pos)
            fields.append((number, start, pos, pos + length))
            pos += length
            continue
        else:
            raise ValueError(f"protobuf wire type {wire} (groups) is not expected in ONNX")
        fields.append((number, start, pos, pos))
    return fields
