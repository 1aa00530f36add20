"""How fast one or more models run, side by side (``slimgraph bench``).

Each model (a ``.onnx`` file, a compile output directory, or any ``load_model`` spec) is
loaded once; then every prefill length is measured **round-robin**: each round runs every
model once on the same random token ids, so slow drift of a shared machine hits all of
them alike (measured one after another, two files of identical shapes differed by up to 8%
on a 2-core machine; round-robin they agree within 0.3%). The first rounds are warm-up.

For each model: parameters, linear multiply-accumulates per token (the weights of MatMul /
Gemm / Linear layers; N:M zeros are counted, they do not shrink dense kernels), resident
memory its loading added, and per prefill length the median, minimum and 90th-percentile
latency and tokens per second. With more than one model, the first is the baseline: every
other gets its speedup and the *ideal* latency, baseline x its linear-MAC fraction (what a
slimmed model would take if time shrank with the linear FLOPs; attention scores, norms and
other fixed costs do not shrink, so small models and short prefills land above it).
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimgraph.errors import SlimgraphError
from slimgraph.memory import release_free_heap


class BenchError(SlimgraphError):
    """A model or option ``slimgraph bench`` cannot use."""


@dataclass
class BenchModel:
    spec: str  # what the user typed
    backend: str  # "onnx" | "torch"
    source: str  # the file or spec actually run
    params: int
    linear_macs: int  # per token
    vocab: int | None
    load_mb: float | None = None
    run: Callable[[np.ndarray], Any] | None = field(default=None, repr=False)
    max_positions: int | None = None  # the longest input, from the config when known


# --------------------------------------------------------------------------- counting


def onnx_counts(path: str | Path) -> tuple[int, int, int | None]:
    """(parameters, linear MACs per token, vocabulary size or None) of an ONNX file, from
    initializer shapes alone (external data is not read). A linear is a MatMul or Gemm
    whose weight is a 2-D initializer, directly or through a Transpose (a tied lm_head)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises its own types
        raise BenchError(f"cannot read ONNX model '{path}': {exc}") from exc
    g = model.graph
    dims = {t.name: tuple(t.dims) for t in g.initializer}
    params = sum(int(np.prod(d)) for d in dims.values())
    producer = {o: n for n in g.node for o in n.output}

    def weight_shape(name: str) -> tuple[int, ...] | None:
        if name in dims:
            return dims[name]
        node = producer.get(name)
        if node is not None and node.op_type == "Transpose" and node.input[0] in dims:
            return tuple(reversed(dims[node.input[0]]))  # 2-D: the only permutation
        return None

    macs = 0
    for node in g.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        shape = weight_shape(node.input[1])
        if shape is None or len(shape) != 2:
            continue
        macs += shape[0] * shape[1]
    ids = {i.name for i in g.input if "input_ids" in i.name} or {g.input[0].name}
    vocab = next((dims[n.input[0]][0] for n in g.node if n.op_type == "Gather"
                  and n.input[1] in ids and n.input[0] in dims), None)
    return params, macs, vocab


def torch_counts(model: Any) -> tuple[int, int]:
    """(parameters, linear MACs per token) of a PyTorch model: ``nn.Linear`` layers and
    transformers' ``Conv1D`` (GPT-2), tied weights counted once as parameters and once per
    layer that multiplies by them."""
    import torch

    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    macs = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D":
            macs += m.weight.numel()
    return params, macs


def _rss_mb() -> float | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


# --------------------------------------------------------------------------- loading


def load(spec: str, *, backend: str = "auto", threads: int | None = None) -> BenchModel:
    """Locate ``spec`` (``auto`` prefers ONNX Runtime where there is a model.onnx), count it,
    and build its runner."""
    from slimgraph.evaluation import (
        locate_model,
        positions_of_config,
        positions_of_config_file,
        onnx_logits_fn,
        torch_logits_fn,
    )

    loc = locate_model(spec, backend, prefer="onnx")
    gc.collect()
    if loc.backend == "onnx":
        params, macs, vocab = onnx_counts(loc.onnx_file)
        gc.collect()
        release_free_heap()  # the parsed file's memory, so the session's is counted anew
        before = _rss_mb()
        run = onnx_logits_fn(loc.onnx_file, threads=threads)
        source = str(loc.onnx_file)
        limit = positions_of_config_file(loc.hf_dir / "config.json") if loc.hf_dir else None
    else:
        from slimgraph.frontends.loading import load_model

        before = _rss_mb()
        loaded = load_model(loc.torch_spec, verbose=False)
        if loaded.model is None:
            raise BenchError(f"'{spec}' has no PyTorch model to run")
        if loaded.meta:
            raise BenchError(f"'{spec}' has no weights (meta device): nothing to time")
        params, macs = torch_counts(loaded.model)
        vocab = getattr(loaded.config, "vocab_size", None)
        run = torch_logits_fn(loaded.model, threads=threads)
        source = loc.torch_spec
        limit = positions_of_config(loaded.config)
    after = _rss_mb()
    load_mb = None if before is None or after is None else round(after - before, 1)
    return BenchModel(spec, loc.backend, source, params, macs, vocab, load_mb, run, limit)


# --------------------------------------------------------------------------- measuring


def token_ids(batch: int, seqlen: int, vocab: int | None, seed: int = 0) -> np.ndarray:
    high = min(vocab or 1000, 1000)
    return np.random.default_rng(seed).integers(0, high, (batch, seqlen), dtype=np.int64)


def measure(models: Sequence[BenchModel], seqlens: Sequence[int], *, batch: int = 1,
            runs: int = 20, warmup: int = 3, progress: Callable[[int], None] | None = None
            ) -> dict[str, dict[str, list[float]]]:
    """Seconds per run, ``{model index: {seqlen: [seconds, ...]}}``, measured round-robin:
    each of ``warmup + runs`` rounds runs every model once (warm-up rounds not kept).
    ``progress(tokens)`` is called after every run."""
    if runs < 1 or warmup < 0 or batch < 1 or not seqlens or min(seqlens) < 1:
        raise BenchError(f"need runs >= 1, warmup >= 0, batch >= 1 and positive prefill "
                         f"lengths; got runs={runs}, warmup={warmup}, batch={batch}, "
                         f"seqlen={list(seqlens)}")
    vocab = min((m.vocab for m in models if m.vocab), default=None)
    times: dict[str, dict[str, list[float]]] = {str(i): {} for i in range(len(models))}
    for seqlen in seqlens:
        ids = token_ids(batch, seqlen, vocab)
        for i in range(len(models)):
            times[str(i)][str(seqlen)] = []
        for r in range(warmup + runs):
            for i, m in enumerate(models):
                t0 = time.perf_counter()
                m.run(ids)
                dt = time.perf_counter() - t0
                if r >= warmup:
                    times[str(i)][str(seqlen)].append(dt)
                if progress is not None:
                    progress(batch * seqlen)
    return times


def _p90(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]


def summarize(models: Sequence[BenchModel], times: dict[str, dict[str, list[float]]], *,
              batch: int, runs: int, warmup: int, threads: int | None) -> dict[str, Any]:
    """The JSON object ``slimgraph bench --json`` prints (latencies in milliseconds)."""
    rows = []
    for i, m in enumerate(models):
        lat = {s: {"median": round(statistics.median(t) * 1e3, 3),
                   "min": round(min(t) * 1e3, 3), "p90": round(_p90(t) * 1e3, 3)}
               for s, t in times[str(i)].items()}
        rows.append({
            "model": m.spec, "backend": m.backend, "source": m.source, "params": m.params,
            "linear_macs_per_token": m.linear_macs, "load_mb": m.load_mb, "latency_ms": lat,
            "tokens_per_s": {s: round(batch * int(s) / (v["median"] / 1e3), 1)
                             for s, v in lat.items()},
        })
    if len(rows) > 1:
        base = rows[0]
        for row in rows[1:]:
            frac = row["linear_macs_per_token"] / base["linear_macs_per_token"] \
                if base["linear_macs_per_token"] else None
            row["speedup"], row["ideal_ms"], row["over_ideal_pct"] = {}, {}, {}
            for s, v in row["latency_ms"].items():
                b = base["latency_ms"][s]["median"]
                row["speedup"][s] = round(b / v["median"], 3)
                if frac is not None:
                    ideal = b * frac
                    row["ideal_ms"][s] = round(ideal, 3)
                    row["over_ideal_pct"][s] = round(100 * (v["median"] / ideal - 1), 1)
            row["linear_macs_fraction"] = None if frac is None else round(frac, 4)
    return {"batch": batch, "runs": runs, "warmup": warmup, "threads": threads,
            "round_robin": True, "models": rows}


def _ms(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def render(result: dict[str, Any]) -> str:
    """A plain-text table of a :func:`summarize` result."""
    lines = [f"batch {result['batch']}, median of {result['runs']} runs after "
             f"{result['warmup']} warm-up rounds, round-robin"
             + (f", {result['threads']} threads" if result["threads"] else "")]
    header = f"{'model':<32} {'backend':<7} {'params':>12} {'MACs/tok':>12} {'load MB':>8}"
    lines.append(header)
    for r in result["models"]:
        load_mb = "-" if r["load_mb"] is None else f"{r['load_mb']:.0f}"
        lines.append(f"{r['model'][-32:]:<32} {r['backend']:<7} {r['params']:>12,} "
                     f"{r['linear_macs_per_token']:>12,} {load_mb:>8}")
    lines.append("")
    lines.append(f"{'model':<32} {'prefill':>7} {'median ms':>10} {'min':>9} {'p90':>9} "
                 f"{'tok/s':>9} {'speedup':>8} {'ideal ms':>9} {'over':>7}")
    for r in result["models"]:
        for s, v in r["latency_ms"].items():
            sp = r.get("speedup", {}).get(s)
            ideal = r.get("ideal_ms", {}).get(s)
            over = r.get("over_ideal_pct", {}).get(s)
            lines.append(
                f"{r['model'][-32:]:<32} {s:>7} {_ms(v['median']):>10} {_ms(v['min']):>9} "
                f"{_ms(v['p90']):>9} {r['tokens_per_s'][s]:>9,.0f} "
                f"{'-' if sp is None else f'{sp:.2f}x':>8} "
                f"{'-' if ideal is None else _ms(ideal):>9} "
                f"{'-' if over is None else f'{over:+.1f}%':>7}")
    return "\n".join(lines)
