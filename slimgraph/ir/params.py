"""Parameter handles: read, slice, permute and write back a weight in its source.

A handle hides where a weight lives. The torch handle resolves module attribute paths
(every alias of a tied weight is updated together, so ties survive); the ONNX handle
wraps an ``onnx_ir`` initializer. Graphs traced on the meta device have handles whose
``read`` raises a clear error instead of returning garbage.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from slimgraph.errors import SlimgraphError


class ParamHandle:
    """Base class. ``shape``/``dtype`` describe the weight as it is now."""

    kind: str = "parameter"  # "parameter" | "buffer" | "initializer"

    def __init__(self, name: str, shape: Sequence[int], dtype: str, kind: str = "parameter"):
        self.name = name
        self.shape = tuple(int(d) for d in shape)
        self.dtype = dtype
        self.kind = kind

    @property
    def aliases(self) -> list[str]:
        return [self.name]

    @property
    def has_data(self) -> bool:
        return True

    def read(self) -> torch.Tensor:
        raise NotImplementedError(type(self).__name__)

    def write(self, tensor: torch.Tensor) -> None:
        raise NotImplementedError(type(self).__name__)

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    # Derived operations, defined once on top of read/write.
    def slice(self, dim: int, keep: Sequence[int] | torch.Tensor) -> None:
        """Keep only the given indices along ``dim`` (in the given order)."""
        index = torch.as_tensor(keep, dtype=torch.long)
        self.write(self.read().index_select(dim, index).contiguous())

    def permute(self, dim: int, perm: Sequence[int] | torch.Tensor) -> None:
        """Reorder ``dim`` so that new position ``i`` holds old index ``perm[i]``."""
        index = torch.as_tensor(perm, dtype=torch.long)
        if sorted(index.tolist()) != list(range(self.shape[dim])):
            raise ValueError(f"{self.name}: not a permutation of dim {dim}")
        self.write(self.read().index_select(dim, index).contiguous())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, {list(self.shape)}, {self.dtype})"


def _resolve(root: torch.nn.Module, fqn: str) -> tuple[Any, str]:
    owner_path, _, attr = fqn.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    return owner, attr


class TorchParamHandle(ParamHandle):
    """A parameter or buffer of an ``nn.Module``, possibly under several names (ties)."""

    def __init__(self, module: torch.nn.Module, names: Sequence[str], kind: str = "parameter"):
        tensor = _lookup(module, names[0])
        super().__init__(names[0], tensor.shape, str(tensor.dtype).replace("torch.", ""), kind)
        self.module = module
        self._names = list(names)

    @property
    def aliases(self) -> list[str]:
        return list(self._names)

    @property
    def has_data(self) -> bool:
        return not _lookup(self.module, self.name).is_meta

    def read(self) -> torch.Tensor:
        t = _lookup(self.module, self.name)
        if t.is_meta:
            raise SlimgraphError(
                f"parameter {self.name!r} has no data: the model was loaded without weights (--meta)"
            )
        return t.detach()

    def write(self, tensor: torch.Tensor) -> None:
        old = _lookup(self.module, self.name)
        tensor = tensor.to(dtype=old.dtype, device=old.device)
        new: torch.Tensor
        if isinstance(old, torch.nn.Parameter):
            new = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)
        else:
            new = tensor
        for fqn in self._names:  # every alias, so tied weights stay tied
            owner, attr = _resolve(self.module, fqn)
            if isinstance(new, torch.nn.Parameter):
                owner._parameters[attr] = new
            else:
                owner._buffers[attr] = new
        self.shape = tuple(tensor.shape)


def _lookup(module: torch.nn.Module, fqn: str) -> torch.Tensor:
    owner, attr = _resolve(module, fqn)
    return getattr(owner, attr)


class ArrayParamHandle(ParamHandle):
    """A weight held directly (used for ONNX initializers through a setter callback)."""

    def __init__(self, name: str, array: np.ndarray | None, shape, dtype: str, setter=None,
                 kind: str = "initializer"):
        super().__init__(name, shape, dtype, kind)
        self._array = array
        self._setter = setter

    @property
    def has_data(self) -> bool:
        return self._array is not None

    def read(self) -> torch.Tensor:
        if self._array is None:
            raise SlimgraphError(f"initializer {self.name!r} has no data")
        return torch.from_numpy(np.ascontiguousarray(self._array))

    def write(self, tensor: torch.Tensor) -> None:
        arr = tensor.detach().cpu().numpy()
        self._array = arr
        self.shape = tuple(arr.shape)
        if self._setter is not None:
            self._setter(arr)
