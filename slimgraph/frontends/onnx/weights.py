"""Weights stored in an ONNX model, and the IR parameter handles backed by them.

Initializers (and ``Constant`` nodes) that hold weights become IR parameters whose
handle (:class:`OnnxParamHandle`) writes back into the ``onnx_ir`` model, so a backend
can save the pruned model. One parameter may be stored several times, each copy
possibly transposed (a :class:`ParamTarget`); one stored tensor may serve several
parameters (identical initializers merged by the exporter's optimizer), in which case
writing one of them first detaches its uses onto an initializer of its own. Which
stored tensor is which parameter is worked out by
:mod:`slimgraph.frontends.onnx.provenance`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch

from slimgraph.ir.params import ArrayParamHandle


def identity_perm(rank: int) -> tuple[int, ...]:
    """The permutation that keeps all ``rank`` dims in place."""
    return tuple(range(rank))


def inverse_perm(perm: tuple[int, ...]) -> tuple[int, ...]:
    """The permutation that undoes ``perm``."""
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def read_external(tensor: ir.ExternalTensor) -> np.ndarray:
    """A copy of an external tensor's values, read from its file; ``tensor`` is not loaded.

    ``ExternalTensor.numpy()`` maps the file and keeps the map open, and every page read
    through a map stays resident in this process while the map is open: one pass over
    the weights of a 3.3 GB model left all 3.3 GB resident. Read here, the file's bytes
    are copied into a new array (``tofile``: onnx_ir's checks of the path included);
    packed types (4-, 2- and 6-bit) go through a map of their own, closed again."""
    if tensor.dtype.bitwidth % 8:
        reader = ir.ExternalTensor(tensor.location, tensor.offset, tensor.length, tensor.dtype,
                                   shape=tensor.shape, name=tensor.name,
                                   base_dir=tensor.base_dir)
        try:
            return reader.numpy().copy()
        finally:
            reader.release()
    arr = np.empty(tensor.shape.numpy(), dtype=np.dtype(tensor.dtype.numpy()).newbyteorder("<"))
    writer = _BufferWriter(arr.reshape(-1).view(np.uint8))
    tensor.tofile(writer)
    if writer.position != arr.nbytes:
        raise ValueError(f"external data of {tensor.name!r}: {writer.position} bytes read, "
                         f"{arr.nbytes} expected")
    return arr


class _BufferWriter:
    """A file-like ``write`` into a byte array, in order."""

    def __init__(self, buffer: np.ndarray):
        self.buffer = buffer
        self.position = 0

    def write(self, chunk: bytes) -> None:
        end = self.position + len(chunk)
        if end > len(self.buffer):
            raise ValueError("external data longer than its tensor")
        self.buffer[self.position:end] = np.frombuffer(chunk, dtype=np.uint8)
        self.position = end


@dataclass(eq=False)
class StoredTensor:
    """A tensor stored in the file: an initializer, or the value of a Constant node."""

    value: ir.Value  # the initializer / the Constant's output
    node: ir.Node | None  # the Constant node, if any
    fqn: str | None = None  # the module FQN it stores directly (graph signature)
    sig_kind: str | None = None  # PARAMETER | BUFFER | CONSTANT_TENSOR
    folded_from: list[str] = field(default_factory=list)
    source_fqn: str | None = None  # the one parameter it was folded from, if only one

    @property
    def name(self) -> str:
        return self.value.name or ""

    @property
    def tensor(self):
        if self.node is not None:
            return self.node.attributes["value"].value
        return self.value.const_value

    @property
    def dtype(self) -> ir.DataType:
        return self.tensor.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.tensor.shape)

    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    def array(self) -> np.ndarray:
        """The stored values: the model's own array for a tensor held in memory, a fresh
        copy read from the file for external data (see :func:`read_external`)."""
        tensor = self.tensor
        if isinstance(tensor, ir.ExternalTensor):
            return read_external(tensor)
        return tensor.numpy()

    def uses(self) -> list[tuple[ir.Node, int]]:
        return [(u.node, u.idx) for u in self.value.uses()]

    def write(self, arr: np.ndarray) -> None:
        tensor = ir.Tensor(arr, name=self.name)
        if self.node is not None:
            self.node.attributes["value"] = ir.AttrTensor("value", tensor)
        else:
            self.value.const_value = tensor
        self.value.shape = ir.Shape(arr.shape)


@dataclass(eq=False)
class ParamTarget:
    """One stored copy of an IR parameter: ``storage = param.transpose(perm)``."""

    storage: StoredTensor
    perm: tuple[int, ...]
    uses: list[tuple[ir.Node, int]]


class OnnxParamHandle(ArrayParamHandle):
    """An IR parameter backed by one or more ONNX tensors.

    ``shape`` is the parameter's original layout (the torch module's, when known).
    ``targets`` lists where it is stored: each target holds ``param.transpose(perm)``
    (``permuted`` is true when any target is stored transposed, e.g. a linear weight
    pre-transposed to ``[in, out]`` by the exporter). Writing updates every target; a
    target whose tensor is shared with other parameters (a merged initializer) is first
    detached onto a new initializer of its own.
    """

    def __init__(self, name: str, shape, dtype: str, targets: list[ParamTarget], graph: ir.Graph,
                 kind: str, aliases: list[str], provenance: str = ""):
        super().__init__(name, None, shape, dtype, setter=self._write_back, kind=kind)
        self.targets = targets
        self.onnx_graph = graph
        self._aliases = aliases or [name]
        self.provenance = provenance

    @property
    def aliases(self) -> list[str]:
        return list(self._aliases)

    @property
    def permuted(self) -> bool:
        return any(t.perm != identity_perm(len(t.perm)) for t in self.targets)

    @property
    def onnx_names(self) -> list[str]:
        return [t.storage.name for t in self.targets]

    @property
    def has_data(self) -> bool:
        return self._array is not None or bool(self.targets)

    def _load(self) -> np.ndarray:
        """The parameter in its own layout, from its first stored copy. Not kept: a weight
        no pass modified stays in the file it was loaded from, and a modified one is held
        once, by the ONNX model (keeping it here too would hold a second, transposed copy
        of every weight stored transposed)."""
        if not self.targets:  # a parameter stored nowhere in the model keeps its own array
            return self._array
        t = self.targets[0]
        return np.transpose(t.storage.array(), inverse_perm(t.perm))

    def read(self) -> torch.Tensor:
        arr = np.array(self._load(), order="C")  # a copy: the model's array is not handed out
        if arr.dtype.name == "bfloat16":
            return torch.from_numpy(arr.view(np.uint16).copy()).view(torch.bfloat16)
        return torch.from_numpy(arr)

    def write(self, tensor: torch.Tensor) -> None:
        old = self._dtype()
        t = tensor.detach().cpu()
        if old.name == "bfloat16":
            arr = t.to(torch.bfloat16).view(torch.int16).numpy().view(old)
        else:
            arr = t.numpy().astype(old, copy=False)
        if not self.targets:
            self._array = arr
        self.shape = tuple(arr.shape)
        self._write_back(arr)

    def _dtype(self) -> np.dtype:
        if not self.targets:
            return self._array.dtype
        return np.dtype(self.targets[0].storage.dtype.numpy())

    def _write_back(self, arr: np.ndarray) -> None:
        for t in self.targets:
            stored = np.ascontiguousarray(np.transpose(arr, t.perm))
            mine = {(id(n), i) for n, i in t.uses}
            if any((id(n), i) not in mine for n, i in t.storage.uses()):
                t.storage = self._detach(t, stored)
            else:
                t.storage.write(stored)

    def _detach(self, t: ParamTarget, arr: np.ndarray) -> StoredTensor:
        taken = {v.name for v in self.onnx_graph.initializers.values()}
        taken |= {o.name for n in self.onnx_graph for o in n.outputs}
        base = self.name if not t.perm or t.perm == identity_perm(len(t.perm)) else f"{self.name}.T"
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}.{k}"
        value = ir.Value(name=name, shape=ir.Shape(arr.shape),
                         type=ir.TensorType(t.storage.dtype), const_value=ir.Tensor(arr, name=name))
        self.onnx_graph.register_initializer(value)
        for node, i in t.uses:
            node.replace_input_with(i, value)
        return StoredTensor(value, None, fqn=self.name)
