"""The (slimmed) model as an ONNX file for ONNX Runtime (what `export-onnx` writes).

Dynamo export with dynamic batch and sequence axes, input ``input_ids`` and output
``logits``; the ONNX checker runs on the file, and ONNX Runtime's output is compared
with PyTorch's on a random input. The file is written to a temporary name in the
output directory and renamed at the end, so an interrupted export leaves nothing.
Models over 2 GB are saved with external data (``model.onnx.data``).

ONNX input (no PyTorch model): the imported ONNX model, as the passes before left it
(``sparsify`` writes its masked weights into it), is saved instead -- same atomic write,
the checker on the file, and ONNX Runtime runs it on a random input (there is no PyTorch
reference to compare with); the tokenizer next to the input file is copied along.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from slimgraph.io import make_temp_dir
from slimgraph.errors import SlimgraphError

if TYPE_CHECKING:  # annotations only: importing this module does not import PyTorch
    import torch

    from slimgraph.passes.base import CompileState

TWO_GB = 2 * 1024**3
# Opset 23 has fused Attention, RMSNormalization and RotaryEmbedding ops: ONNX Runtime
# (>= 1.23) runs SmolLM2 prefill 512 about 16% faster than the opset-18 decomposition
# (softmax + IsNaN/Where per head), and the fixed per-token cost that does not shrink
# with pruning is far smaller. `export-onnx{opset=18}` is for older runtimes.
DEFAULT_OPSET = 23

# The stages of an export, as torch's exporter announces them on stdout (a line that
# starts with the text), then ours; with the share of the time each takes on a LLaMA-type
# model (SmolLM2 on 2 CPU cores), so that progress and its ETA advance by time, not by
# count. The exporter gives no finer fraction than its stages.
EXPORT_STAGES = (("Obtain model graph", "tracing with torch.export", 25),
                 ("Run decomposition", "decomposing", 35),
                 ("Translate the graph", "translating to ONNX", 10),
                 ("Optimize the ONNX graph", "optimizing", 15),
                 ("", "saving", 5),
                 ("", "checking with ONNX Runtime", 10))


def __getattr__(name: str):
    # LogitsOnly subclasses torch.nn.Module: it lives in slimgraph.backends.logits_only and
    # is imported on first use, so that importing this pass does not import PyTorch
    if name == "LogitsOnly":
        from slimgraph.backends.logits_only import LogitsOnly

        return LogitsOnly
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ExportStages(io.StringIO):
    """Where an export is: fed the exporter's stdout, it calls ``progress(done, 100,
    unit="%", info=STAGE)`` when a stage starts (``done`` = the time share of the stages
    before); :meth:`enter` marks our own stages (saving, checking)."""

    def __init__(self, progress) -> None:
        super().__init__()
        self.progress = progress
        self.current = -1

    def enter(self, index: int) -> None:
        if self.progress is None or index <= self.current:
            return
        self.current = index
        done = sum(w for _, _, w in EXPORT_STAGES[:index])
        self.progress(done, 100, unit="%", info=EXPORT_STAGES[index][1])

    def write(self, text: str) -> int:
        line = text.strip()
        for i, (marker, _, _) in enumerate(EXPORT_STAGES):
            if marker and line.startswith(marker) and not line.endswith("✅"):
                self.enter(i)
        return len(text)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress(100, 100, unit="%", info="done")


def export_onnx(model: torch.nn.Module, path: Path, *, vocab: int, opset: int | None = None,
                report: dict | None = None, stages: ExportStages | None = None) -> Path:
    """Export ``model`` to ``path`` atomically; returns the path. The input gathers of
    ``permute=gather`` linears are written shared and in ONNX Runtime's fast form
    (:func:`~slimgraph.sparsity.onnx_gathers.rewrite_input_gathers`; counts under
    ``report["gathers"]`` when there are any). ``stages`` is told where the export is."""
    import torch

    from slimgraph.backends.logits_only import LogitsOnly
    from slimgraph.sparsity.onnx_gathers import rewrite_input_gathers

    wrapper = LogitsOnly(model).eval()
    ids = torch.randint(0, max(vocab, 2), (2, 9))
    batch = torch.export.Dim("batch", max=4096)
    seq = torch.export.Dim("seq", max=32768)
    kwargs = {"opset_version": opset} if opset else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = make_temp_dir(path.parent, ".export-")
    stages = stages or ExportStages(None)
    try:
        stages.enter(0)
        with _quiet(stages):
            # verbose=None: the exporter announces its stages on stdout (read by ``stages``)
            prog = torch.onnx.export(
                wrapper, (ids,), dynamo=True, dynamic_shapes={"input_ids": {0: batch, 1: seq}},
                input_names=["input_ids"], output_names=["logits"], verbose=None, **kwargs)
        stages.enter(4)
        batch_rotary_caches(prog.model)
        gathers = rewrite_input_gathers(prog.model)
        if report is not None and gathers["gathers"]:
            report["gathers"] = gathers
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        tmp = tmpdir / path.name
        if size > TWO_GB:
            prog.save(str(tmp), external_data=True)
        else:
            prog.save(str(tmp))
        for f in tmpdir.iterdir():  # model.onnx (+ model.onnx.data)
            os.replace(f, path.parent / f.name)
    except SlimgraphError:
        raise
    except Exception as e:
        raise SlimgraphError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def batch_rotary_caches(model) -> int:
    """Give every ``RotaryEmbedding`` (opset 23) cos/sin caches of the input's batch size.

    Without position ids the op wants caches of shape ``[batch, seq, rotary_dim / 2]``;
    torch's exporter writes ``[1, seq, rotary_dim / 2]``, which ONNX Runtime (1.32)
    rejects for batch > 1. Each cache is broadcast with ``Expand`` to ``[batch, 1, 1]``
    (batch read from the first graph input); returns the number of caches expanded."""
    import numpy as np
    import onnx_ir as ir

    graph = model.graph
    nodes = [n for n in graph if n.op_type == "RotaryEmbedding" and n.domain in ("", "ai.onnx")
             and (len(n.inputs) < 4 or n.inputs[3] is None)]
    if not nodes or not graph.inputs:
        return 0
    batch = ir.node("Shape", [graph.inputs[0]], {"start": 0, "end": 1}, name="slimgraph_batch")
    ones = ir.node("Constant", [], {"value": ir.tensor(np.array([1, 1], dtype=np.int64))},
                   name="slimgraph_ones_2")
    target = ir.node("Concat", [batch.outputs[0], ones.outputs[0]], {"axis": 0},
                     name="slimgraph_rotary_cache_shape")
    graph.insert_before(graph.node(0), [batch, ones, target])
    expanded: dict[int, ir.Value] = {}
    for n in nodes:
        for i in (1, 2):
            cache = n.inputs[i]
            if cache is None:
                continue
            if id(cache) not in expanded:
                exp = ir.node("Expand", [cache, target.outputs[0]],
                              name=f"slimgraph_expand_{cache.name or id(cache)}")
                graph.insert_before(n, [exp])
                expanded[id(cache)] = exp.outputs[0]
            n.replace_input_with(i, expanded[id(cache)])
    return len(expanded)


def save_onnx_model(model, path: Path) -> Path:
    """Save an ``onnx_ir`` model to ``path`` atomically: into a temporary directory beside
    it, checked by ``onnx.checker``, then renamed. Over 2 GB of weights go to external data
    (``NAME.data``); below, every tensor is stored in the file (tensors still mapped from
    the input's data file are read in), written and checked one initializer at a time
    (:mod:`slimgraph.backends.onnx_inline`). ``model`` is not modified."""
    import onnx
    import onnx_ir as ir

    from slimgraph.backends.onnx_inline import can_save_inline, save_inline

    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = make_temp_dir(path.parent, ".export-")
    try:
        tmp = tmpdir / path.name
        size = sum(v.const_value.nbytes for g in model.graphs() for v in g.initializers.values()
                   if v.const_value is not None)
        if size <= TWO_GB and can_save_inline(model):
            save_inline(model, tmp)
        else:
            data = tmpdir / (path.name + ".data")
            ir.save(model, tmp, external_data=data.name,
                    size_threshold_bytes=256 if size > TWO_GB else 2**62)
            if data.is_file() and data.stat().st_size == 0:
                data.unlink()
            onnx.checker.check_model(str(tmp))
        for f in tmpdir.iterdir():  # model.onnx (+ model.onnx.data)
            os.replace(f, path.parent / f.name)
    except SlimgraphError:
        raise
    except Exception as e:
        raise SlimgraphError(f"saving the ONNX model failed: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from e
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def ort_smoke_test(path: Path, *, vocab: int, seq: int = 13) -> dict:
    """Run ``path`` with ONNX Runtime on random token ids; the output must be finite."""
    import numpy as np

    from slimgraph.backends.ort_session import session, token_feeds

    g = np.random.default_rng(0)
    sess = session(path)
    inputs = sess.get_inputs()
    ids_in = next((i for i in inputs if "input_ids" in i.name), inputs[0])
    shape = list(ids_in.shape or [])
    batch = 1
    if len(shape) == 2:  # a static-shape export accepts only its own batch and length
        batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else 1
        seq = shape[1] if isinstance(shape[1], int) and shape[1] > 0 else seq
    out = sess.run(None, token_feeds(sess, g.integers(0, max(vocab, 2), (batch, seq))))[0]
    if not np.isfinite(out).all():
        raise SlimgraphError(f"ONNX Runtime output of {path} has non-finite values")
    return {"output_shape": list(out.shape), "finite": True, "providers": sess.get_providers()}


@contextlib.contextmanager
def _quiet(stdout: io.StringIO | None = None):
    """The exporter prints progress and warnings; keep the CLI output readable (its stdout
    goes to ``stdout``, by default nowhere)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(stdout or io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def compare_with_torch(model: torch.nn.Module, path: Path, *, vocab: int, seq: int = 13
                       ) -> dict[str, float]:
    import numpy as np
    import torch

    from slimgraph.backends.logits_only import LogitsOnly
    from slimgraph.backends.ort_session import session

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, max(vocab, 2), (1, seq), generator=g)
    with torch.no_grad():
        ref = LogitsOnly(model).eval()(ids).float().numpy()
    sess = session(path)
    got = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]
    err = float(np.abs(got - ref).max())
    rel = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))
    finite = bool(np.isfinite(ref).all() and np.isfinite(got).all())
    return {"max_abs_diff": err, "rel_error": rel, "finite": finite,
            "providers": sess.get_providers()}


def save_tokenizer(tokenizer, out_dir: Path, state: CompileState | None = None) -> None:
    """Tokenizer files next to the model (written to a temp dir, then moved)."""
    tmpdir = make_temp_dir(out_dir, ".tok-")
    try:
        tokenizer.save_pretrained(str(tmpdir))
        for f in tmpdir.iterdir():
            os.replace(f, out_dir / f.name)
            if state is not None and str(out_dir / f.name) not in state.files:
                state.files.append(str(out_dir / f.name))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def onnx_bytes(path: Path) -> int:
    """The size of an ONNX file with its external data file, if any."""
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return total + (data.stat().st_size if data.exists() else 0)

