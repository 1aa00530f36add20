"""Offloaded post-training sparsity (``compile --offload``): prune a model larger than RAM.

The model is built on the meta device from the config of an HF safetensors directory
(``model.safetensors``, or shards listed in ``model.safetensors.index.json``); only the
buffers its constructor computes (rotary tables) are real. The dependency analysis runs
on it as on any meta model. :class:`Offload` then reads the weights outside the decoder
blocks (embedding, final norm, lm_head) and nothing else. The block walk
(:class:`slimgraph.structured.torch_blocks.TorchBlocks`) asks it to *materialize* block
i (only that block's tensors, read with ``safetensors.safe_open``) right before the block
runs, and to *release* it afterwards: the pruned tensors go to an offload store (one
safetensors file per block, written atomically, in a temp dir inside OUTDIR) and the
parameters go back to the meta device (:meth:`Offload.evict` puts an unchanged block back
without writing it: OWL's dense pass, ``sparsity/schedules.py``). Peak memory: the
non-block weights, one block's working set and the calibration activations.

``save-hf`` (:func:`save_hf_offloaded`) streams the checkpoint: one shard per block,
hard-linked (or copied) from the store, one shard of the non-block weights, the index,
config and tokenizer, written into a temp dir that is renamed into place at the end.
The input directory is only read.

A GGUF input (a file or an alias such as ``smollm2-135m``) is offloaded from its
de-quantized safetensors cache (``slimgraph.frontends.loading.gguf_cache_dir``); the GGUF
itself is not read lazily, so making that cache the first time loads the model into
memory once. Not supported: ``pytorch_model.bin`` inputs; passes that need the whole
model in memory (refused by ``Pass.check_offload``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from slimgraph.errors import ModelLoadError, SlimgraphError
from slimgraph.frontends.hf_build import model_class, one_line, quiet_transformers
from slimgraph.frontends.loading import LoadedModel, gguf_cache_dir, read_config, try_tokenizer
from slimgraph.frontends.model_folder import check_folder, check_size, refuse_custom_code_in
from slimgraph.frontends.pruned_checkpoint import SECTION
from slimgraph.io import atomic_write_json, make_temp_dir
from slimgraph.memory import release_free_heap

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
STORE_PREFIX = ".offload-"
_METADATA = {"format": "pt"}


# -- the input checkpoint ---------------------------------------------------------------

def _open(path: Path):
    """``safe_open`` of one weights file; a truncated or corrupt file is refused by name."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...
        raise ModelLoadError(f"weights file '{path}' is not a readable safetensors file "
                             f"(truncated or corrupt?): {one_line(e)}") from None


class SafetensorsSource:
    """Which file of an HF safetensors directory holds each tensor; reads chosen tensors.
    Every file the index names must lie inside the directory; each file's header is read
    (and its tensors checked against the index) before any weight is."""

    def __init__(self, root: Path) -> None:
        self.root = root
        check_folder(root)
        index, single = root / INDEX, root / SINGLE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                self.file_of = {k: root / f for k, f in weight_map.items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise ModelLoadError(f"'{index}' is not a safetensors index: "
                                     f"{one_line(e)}") from None
        elif single.is_file():
            with _open(single) as f:
                self.file_of = {k: single for k in f.keys()}
        else:
            raise ModelLoadError(f"'{root}' has no {SINGLE} or {INDEX}: --offload reads "
                                 "safetensors checkpoints only (convert other formats first: "
                                 f"slimgraph compile {root} -p save-hf -o DIR)")
        missing = sorted({str(f) for f in self.file_of.values() if not f.is_file()})
        if missing:
            raise ModelLoadError(f"'{root}': shard {missing[0]} listed in the index is missing")
        for path in sorted(set(self.file_of.values())):
            with _open(path) as f:
                have = set(f.keys())
            absent = sorted(k for k, p in self.file_of.items() if p == path and k not in have)
            if absent:
                raise ModelLoadError(f"'{path}' has no tensor '{absent[0]}' (the index puts it "
                                     "there)")

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each file opened once; nothing else is read."""
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.file_of[k], []).append(k)
        out = {}
        for path, names in by_file.items():
            with _open(path) as f:
                for k in names:
                    try:
                        out[k] = f.get_tensor(k)
                    except Exception as e:  # noqa: BLE001 - a file cut short after its header
                        raise ModelLoadError(f"weights file '{path}': cannot read tensor '{k}' "
                                             f"(truncated or corrupt?): {one_line(e)}") from None
        return out


def load_offloaded(spec: str, *, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """An HF safetensors directory as a model on the meta device (real buffers), its
    config and tokenizer; weights are read later by :class:`Offload`."""
    from accelerate import init_empty_weights

    cached = gguf_cache_dir(spec)  # a GGUF: its de-quantized safetensors cache
    path = cached if cached is not None else Path(spec).expanduser()
    if not path.is_dir():
        raise ModelLoadError(
            f"--offload needs an HF model directory with safetensors weights or a GGUF file / "
            f"alias; '{spec}' is neither")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model directory '{spec}' has no config.json")
    refuse_custom_code_in(path, spec)
    SafetensorsSource(path)  # fail early: no safetensors, files outside, truncated headers
    config = read_config(path / "config.json")
    raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if raw.get(SECTION, {}).get("loader") == "slimgraph":
        raise ModelLoadError(f"'{spec}' has per-layer sizes (a slimgraph-pruned checkpoint that "
                             "needs slimgraph's loader); --offload cannot rebuild it from its config")
    check_size(config, dtype=dtype, meta=True, label=f"{spec}/config.json")
    cls = model_class(config)
    make = cls.from_config if hasattr(cls, "from_config") else cls._from_config
    with quiet_transformers(), init_empty_weights(include_buffers=False):
        try:
            model = make(config, dtype=dtype)
        except Exception as e:
            raise ModelLoadError(f"cannot build a model from '{spec}/config.json': {e}") from e
    if hasattr(model, "tie_weights"):  # init_empty_weights re-creates tied parameters apart
        model.tie_weights()
    model.eval()
    source = str(path) if cached is not None else spec  # Offload reads the weights from it
    return LoadedModel(source, "hf-dir", model, None, model.config, try_tokenizer(path), True)


# -- the weights' whereabouts -------------------------------------------------------------

class _Tensor:
    """One tensor of the state dict under all its names (tied weights have several)."""

    def __init__(self, names: list[str], is_param: bool, block: str | None) -> None:
        self.names = names
        self.is_param = is_param
        self.block = block  # module name of its decoder block; None outside every block
        self.key = names[0]  # the name it is read and written under


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


class Offload:
    """Weights of a meta-built model: outside the blocks in memory, each block either on
    the meta device (in the input checkpoint or the offload store) or resident."""

    def __init__(self, model: torch.nn.Module, source: SafetensorsSource, blocks: list[str],
                 out_dir: Path, dtype: torch.dtype = torch.float32) -> None:
        if not blocks:
            raise SlimgraphError("--offload: no decoder blocks were found")
        self.model, self.source, self.blocks, self.dtype = model, source, list(blocks), dtype
        self.tensors = self._group(model)
        self.store_dir = make_temp_dir(out_dir, STORE_PREFIX)
        self.stored: dict[str, Path] = {}  # block -> its file in the store
        self.resident: set[str] = set()

    @classmethod
    def for_state(cls, loaded: LoadedModel, result, out_dir: Path) -> Offload:
        """The offload of a model from :func:`load_offloaded`, blocks from the analysis;
        the weights outside the blocks are read now."""
        from slimgraph.ir.blocks import find_blocks

        blocks = [b.module_name for b in find_blocks(result)]
        off = cls(loaded.model, SafetensorsSource(Path(loaded.spec).expanduser()), blocks, out_dir)
        try:
            off._assign(off.of_block(None), off._read_source(off.of_block(None)))
        except BaseException:
            off.close()
            raise
        return off

    def _group(self, model: torch.nn.Module) -> list[_Tensor]:
        params = {id(p) for p in model.parameters()}
        by_id: dict[int, list[str]] = {}
        objs: dict[int, torch.Tensor] = {}
        for name, t in model.state_dict(keep_vars=True).items():
            by_id.setdefault(id(t), []).append(name)
            objs[id(t)] = t
        out = []
        for i, names in by_id.items():
            found = [n for n in names if n in self.source]
            names = found + [n for n in names if n not in found]  # read under a stored name
            block = next((b for b in self.blocks if names[0].startswith(b + ".")), None)
            out.append(_Tensor(names, i in params, block))
        return out

    def of_block(self, block: str | None) -> list[_Tensor]:
        return [t for t in self.tensors if t.block == block]

    # reading and placing
    def _read_source(self, tensors: list[_Tensor]) -> dict[str, torch.Tensor]:
        for t in tensors:
            if t.is_param and t.key not in self.source:
                raise ModelLoadError(f"'{self.source.root}' has no tensor '{t.key}'")
        data = self.source.read([t.key for t in tensors if t.key in self.source])
        data = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in data.items()}
        for t in tensors:  # a buffer the checkpoint lacks keeps the constructor's value
            data.setdefault(t.key, self._current(t))
        return data

    def _assign(self, tensors: list[_Tensor], data: dict[str, torch.Tensor]) -> None:
        for t in tensors:
            value = data[t.key]
            if t.is_param:
                value = torch.nn.Parameter(value, requires_grad=False)
            for name in t.names:
                owner, attr = _owner(self.model, name)
                (owner._parameters if t.is_param else owner._buffers)[attr] = value

    def _current(self, t: _Tensor) -> torch.Tensor:
        owner, attr = _owner(self.model, t.names[0])
        return getattr(owner, attr).detach()

    def materialize(self, block: str) -> None:
        """Bring one block's weights into memory: pruned ones from the store, else the input."""
        tensors = self.of_block(block)
        if block in self.stored:
            from safetensors.torch import load_file

            data = load_file(str(self.stored[block]))
        else:
            data = self._read_source(tensors)
        self._assign(tensors, data)
        self.resident.add(block)

    def release(self, block: str) -> None:
        """Write one block's weights to the store (atomically), then put it back on meta."""
        from safetensors.torch import save_file

        tensors = self.of_block(block)
        path = self.store_dir / f"block-{self.blocks.index(block):05d}.safetensors"
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({t.key: self._current(t).contiguous() for t in tensors}, str(tmp),
                  metadata=_METADATA)
        os.replace(tmp, path)
        self.stored[block] = path
        self.evict(block)

    def evict(self, block: str) -> None:
        """Put an unchanged block back on the meta device without writing it anywhere (it
        is read again, from the store or the input, when next materialized)."""
        for t in self.of_block(block):
            if t.is_param:
                cur = self._current(t)
                empty = torch.nn.Parameter(torch.empty(cur.shape, dtype=cur.dtype, device="meta"),
                                           requires_grad=False)
                for name in t.names:
                    owner, attr = _owner(self.model, name)
                    owner._parameters[attr] = empty
        self.resident.discard(block)
        release_free_heap()  # the block's freed tensors and activations (slimgraph/memory.py)

    def close(self) -> None:
        """Remove the offload store (at the end of the compile, whatever happened)."""
        shutil.rmtree(self.store_dir, ignore_errors=True)
        self.stored.clear()


# -- save-hf ------------------------------------------------------------------------------

def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def save_hf_offloaded(off: Offload, tokenizer, out: Path, module_attrs: dict, *,
                      gathers: list[str] | None = None,
                      progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """Write ``out`` (an HF checkpoint) from the offload store and the resident weights,
    one shard at a time, atomically (a temp dir renamed at the end)."""
    from safetensors.torch import save_file

    from slimgraph.backends.hf_layout import finish_checkpoint
    from slimgraph.backends.hf_layout import param_shapes as _shapes
    from slimgraph.backends.hf_layout import transformers_can_build as _transformers_can_build

    model = off.model
    shapes = _shapes(model)
    loader = ("transformers" if _transformers_can_build(model.config, shapes, module_attrs)
              else "slimgraph")
    n = len(off.blocks) + 1
    shard = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    weight_map: dict[str, str] = {}
    total = 0
    tmp = make_temp_dir(out.parent, f".{out.name}-")
    try:
        outside = {t.key: off._current(t).contiguous() for t in off.of_block(None)}
        save_file(outside, str(tmp / shard[0]), metadata=_METADATA)
        weight_map.update(dict.fromkeys(outside, shard[0]))
        total += sum(v.numel() * v.element_size() for v in outside.values())
        for i, block in enumerate(off.blocks, 1):
            tensors = off.of_block(block)
            if block in off.resident or block not in off.stored:
                # never pruned (or still in memory): written as it is now
                data = ({t.key: off._current(t).contiguous() for t in tensors}
                        if block in off.resident else off._read_source(tensors))
                save_file(data, str(tmp / shard[i]), metadata=_METADATA)
                del data
            else:
                _link_or_copy(off.stored[block], tmp / shard[i])
            for t in tensors:
                weight_map[t.key] = shard[i]
                cur = off._current(t)  # on meta when stored: shape and dtype only
                total += cur.numel() * cur.element_size()
            if progress:
                progress(i, len(off.blocks), "shards")
        atomic_write_json(tmp / INDEX, {"metadata": {"total_size": total},
                                        "weight_map": dict(sorted(weight_map.items()))})
        with quiet_transformers():
            model.config.save_pretrained(str(tmp))
            gen = getattr(model, "generation_config", None)
            if gen is not None and model.can_generate():
                gen.save_pretrained(str(tmp))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        finish_checkpoint(tmp, out, loader, module_attrs, shapes, gathers)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"dir": str(out), "loader": loader, "shards": n, "offloaded": True,
            "check": verify_saved(out, {t.key: shapes[t.names[0]] for t in off.tensors
                                        if t.key in weight_map})}


def verify_saved(out: Path, expected: dict[str, list[int]]) -> str:
    """Every expected tensor is in the written shards with its shape (headers only: the
    outputs cannot be compared without the whole model in memory)."""
    from safetensors import safe_open

    weight_map = json.loads((out / INDEX).read_text(encoding="utf-8"))["weight_map"]
    if set(weight_map) != set(expected):
        raise SlimgraphError(f"{out}: the index does not list the model's tensors")
    for path in sorted({out / f for f in weight_map.values()}):
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                if list(f.get_slice(k).get_shape()) != expected.get(k):
                    raise SlimgraphError(f"{path}: tensor '{k}' has the wrong shape")
    return "tensor names and shapes (outputs not compared: --offload)"
