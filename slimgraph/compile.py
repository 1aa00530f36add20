"""`slimgraph compile`: load, trace, run a pass pipeline, write OUTDIR/report.json."""

from __future__ import annotations

import copy
import os
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

from slimgraph.data import DEFAULT_CALIB, resolve_text
from slimgraph.errors import SlimgraphError
from slimgraph.ir.dependency import DependencyResult
from slimgraph.ir.graph import OpKind
from slimgraph.outdir import (REPORT, HelperProcessOutputs, OutdirError, Transaction,
                              check_not_input, helper_process, raise_if_interrupted, relocate,
                              top_level_names)
from slimgraph.passes.base import CalibrationDefaults, CompileState
from slimgraph.progress import Progress
from slimgraph.passes.pipeline import PassManager, from_text_or_file


def linear_kinds(result: DependencyResult) -> dict[tuple[str, int], str]:
    """(param, dim) -> "attention" | "mlp", from the groups of the unpruned model."""
    kind_of: dict[tuple[str, int], str] = {}
    for g in result.groups:
        if g.kind in ("heads", "qheads", "mlp"):
            for m in g.members:
                kind_of[(m.param, m.dim)] = "mlp" if g.kind == "mlp" else "attention"
    return kind_of


def linear_stats(result: DependencyResult, kind_of: dict[tuple[str, int], str]
                 ) -> dict[str, dict[str, int]]:
    """Parameters and matmul FLOPs per token of the linear layers, by kind."""
    graph = result.graph
    params: dict[str, int] = defaultdict(int)
    flops: dict[str, int] = defaultdict(int)
    seen: set[str] = set()
    for n in graph.nodes:
        if n.kind is not OpKind.LINEAR:
            continue
        w = n.inputs[1]
        numel = w.param.numel()
        kind = kind_of.get((w.name, n.attrs["w_out"])) or kind_of.get((w.name, n.attrs["w_in"])) \
            or ("lm_head" if w.name in _embedding_tables(graph) else "other")
        flops[kind] += 2 * numel
        if w.name not in seen:
            params[kind] += numel
            seen.add(w.name)
    total_params = graph.num_parameters()
    params["embedding/norms/other"] = total_params - sum(params.values())
    return {"params": dict(params), "flops_per_token": dict(flops),
            "total_params": total_params, "total_flops_per_token": sum(flops.values())}


def _embedding_tables(graph) -> set[str]:
    return {n.inputs[0].name for n in graph.nodes if n.kind is OpKind.EMBEDDING}


def input_paths(spec: str) -> list[Path]:
    """The files or folder a model spec reads (an OUTDIR must stay clear of them)."""
    ref = spec.strip()
    if ref.startswith("hf-config:"):
        ref = ref[len("hf-config:"):]
    path = Path(ref).expanduser()
    if not ref or not path.exists():
        return []
    if path.is_file() and path.suffix.lower() == ".onnx":
        return [path, path.with_name(path.name + ".data")]
    return [path]


def check_input_files(passes: list, calib: CalibrationDefaults) -> None:
    """Every file a compile will read exists and is readable, checked before any work."""
    wanted = [("--calib-file", calib.file)]
    for p in passes:
        wanted += [(f"pass '{p.name}', option '{opt}'", value) for opt, value in p.input_files()]
    for what, value in wanted:
        if value in (None, "", "self"):
            continue
        path = Path(str(value)).expanduser()
        if not path.exists():
            raise SlimgraphError(f"{what}: '{value}' does not exist")
        if path.is_file() and not os.access(path, os.R_OK):
            raise SlimgraphError(f"{what}: '{value}' is not readable")


def compile_model(spec: str, pipeline: str, out_dir: Path, *, verify: bool = True,
                  print_after: set[str] | None = None, seq: int = 7, console=None,
                  printer: Callable[[str], None] = print,
                  calib: Mapping[str, Any] | None = None, offload: bool = False,
                  overwrite: bool = False) -> dict[str, Any]:
    """Load ``spec``, run ``pipeline``, write its outputs and ``report.json`` to ``out_dir``.

    The compile is a transaction (:mod:`slimgraph.outdir`): outputs are staged and
    checked inside OUTDIR, then committed with ``report.json`` last; a failure or an
    interrupt (Ctrl-C, SIGTERM) leaves OUTDIR as it was. ``offload``: weights stay on disk
    but for the block being pruned (an HF safetensors directory; sparsify and save-hf
    only; see :mod:`slimgraph.sparsity.offload`). ``overwrite``: replace an earlier
    compile in ``out_dir`` (refused otherwise). ``calib``: the compile's calibration
    defaults, keys ``file``, ``samples``, ``seqlen`` (see :class:`CalibrationDefaults`).
    """
    if not str(out_dir).strip():
        raise OutdirError("the output directory (-o) is empty: name a directory")
    out_dir = Path(out_dir)
    passes = from_text_or_file(pipeline)  # errors before any work starts
    given = {k: v for k, v in (calib or {}).items() if v is not None}
    unknown = sorted(set(given) - {"file", "samples", "seqlen"})
    if unknown:
        raise SlimgraphError(f"calibration settings: unknown {', '.join(unknown)} "
                             "(file, samples, seqlen)")
    for key in ("samples", "seqlen"):
        if key in given and (not isinstance(given[key], int) or given[key] < 1):
            raise SlimgraphError(f"--calib-{key} must be a positive whole number, "
                                 f"got {given[key]!r}")
    # shipped texts by name; without --calib-file, WikiText-2's calibration part
    given["file"] = resolve_text(given.get("file") or DEFAULT_CALIB)
    calib = CalibrationDefaults(**given)
    for p in passes:
        for opt, value in p.input_files():
            setattr(p, opt, resolve_text(value))
    if offload:
        for p in passes:
            p.check_offload(calib)
    check_input_files(passes, calib)
    check_not_input(out_dir, input_paths(spec))
    tx = HelperProcessOutputs(out_dir) if helper_process() else \
        Transaction(out_dir, overwrite=overwrite)
    staging = tx.begin()
    try:
        report = _compile(spec, passes, tx, staging, verify=verify, print_after=print_after,
                          seq=seq, console=console, printer=printer, calib=calib,
                          offload=offload)
        records = report.pop("_records")
        report = relocate(report, str(staging), str(out_dir))
        if isinstance(tx, Transaction):  # report.html beside report.json, committed with it
            from slimgraph.report_html import render_compile, write_html

            report["outputs"].insert(report["outputs"].index(REPORT), "report.html")
            report["files"].append(str(out_dir / "report.html"))
            write_html(staging / "report.html", render_compile(report))
        raise_if_interrupted()  # an interrupt some library swallowed still stops the commit
        tx.commit(report)
    except SlimgraphError as e:
        tx.abort()
        # name paths as the user knows them: the staging folder is gone
        e.args = (str(e).replace(str(staging), str(out_dir)),)
        raise
    except BaseException:
        tx.abort()
        raise
    report["files"].append(str(out_dir / REPORT))
    report["_records"] = records
    return report


def _compile(spec: str, passes: list, tx, staging: Path, *, verify: bool,
             print_after: set[str] | None, seq: int, console, printer: Callable[[str], None],
             calib: CalibrationDefaults, offload: bool) -> dict[str, Any]:
    from slimgraph.frontends.build import graph_of
    from slimgraph.frontends.loading import load_model
    from slimgraph.ir.verifier import verify as verify_graph

    if isinstance(tx, HelperProcessOutputs):  # the main process alone writes the outputs
        passes = [p for p in passes if not p.writes_files]
        print_after = {n for n in (print_after or set()) if n in {p.name for p in passes}}
    manager = PassManager(passes, verify=verify, print_after=print_after, printer=printer)
    t0 = time.perf_counter()
    what = " (offloaded: config and non-block weights)" if offload else ""
    shown = Progress(console) if console is not None else None
    if shown:
        shown.step(f"loading {spec}{what}")
    state = None
    try:
        if offload:
            from slimgraph.sparsity.offload import load_offloaded

            loaded = load_offloaded(spec)
        else:
            loaded = load_model(spec, verbose=shown is None)  # shown says it already
        if shown:
            shown.step("tracing")
        state = CompileState(loaded=loaded, out_dir=staging, keep_dir=tx.keep_dir, seq=seq,
                             calib=calib)
        if loaded.model is not None and any(p.uses_input_model() for p in passes):
            # the model before any pass changed it (a distillation teacher), frozen
            state.input_model = copy.deepcopy(loaded.model).eval().requires_grad_(False)
        state.graph = graph_of(loaded, seq=seq)
        if verify:
            verify_graph(state.graph)
        kinds = linear_kinds(state.analysis())
        before = linear_stats(state.analysis(), kinds)
        t_load = time.perf_counter() - t0

        def on_start(p, i, n):
            if shown:
                shown.step(f"pass {i + 1}/{n}: {p.describe()}")
                state.progress = shown.update  # (done, total, unit, info), with an ETA

        manager.on_start = on_start
        if offload:
            from slimgraph.sparsity.offload import Offload

            if shown:
                shown.step("reading the weights outside the decoder blocks")
            state.offload = Offload.for_state(loaded, state.analysis(), state.out_dir)
        records = manager.run(state)
        after = linear_stats(state.analysis(), kinds)
    finally:
        if state is not None and state.offload is not None:
            state.offload.close()
        if shown:
            shown.stop()
    files = list(state.files)
    report: dict[str, Any] = {
        "model": spec,
        "pipeline": [p.describe() for p in passes],
        "load_and_trace_seconds": round(t_load, 3),
        "total_seconds": round(time.perf_counter() - t0, 3),
        "passes": [{"name": r.name, "options": r.options, "seconds": round(r.seconds, 3),
                    "modified": r.modified, "report": r.report} for r in records],
        "parameters": {"before": before["total_params"], "after": after["total_params"]},
        "before": before,
        "after": after,
        "files": files,
        "outputs": top_level_names(staging, state.files) + [REPORT],
    }
    report["_records"] = records
    return report


def render_summary(report: dict[str, Any], console) -> None:
    from rich.table import Table

    b, a = report["before"], report["after"]
    t = Table(title=f"{report['model']}: {' -> '.join(report['pipeline'])}")
    for col in ("", "params before", "params after", "MFLOP/token before", "after", "kept"):
        t.add_column(col, justify="right" if col else "left")
    kinds = sorted(set(b["params"]) | set(a["params"]))
    for k in kinds:
        pb, pa = b["params"].get(k, 0), a["params"].get(k, 0)
        fb, fa = b["flops_per_token"].get(k, 0), a["flops_per_token"].get(k, 0)
        t.add_row(k, f"{pb:,}", f"{pa:,}", f"{fb / 1e6:.2f}", f"{fa / 1e6:.2f}",
                  f"{100 * pa / pb:.1f}%" if pb else "-")
    t.add_row("total", f"{b['total_params']:,}", f"{a['total_params']:,}",
              f"{b['total_flops_per_token'] / 1e6:.2f}", f"{a['total_flops_per_token'] / 1e6:.2f}",
              f"{100 * a['total_params'] / max(b['total_params'], 1):.1f}%")
    console.print(t)
    for p in report["passes"]:
        console.print(f"  {p['options']}: {p['seconds']:.2f} s, "
                      f"{'modified' if p['modified'] else 'unchanged'}")
        skipped = p["report"].get("skipped", [])
        if skipped:
            console.print(f"    {len(skipped)} skipped" + (" (the first 5; all in report.json)"
                                                        if len(skipped) > 5 else ""))
        for why in skipped[:5]:
            console.print(f"    skipped {why}")
        sched = p["report"].get("schedule")
        if isinstance(sched, dict) and sched.get("name") != "uniform":
            console.print(f"    schedule {sched['name']}: per-layer sparsity "
                          + " ".join(f"{v:.3f}" for v in sched["layer_sparsity_pruned"])
                          + f" (mean {p['report']['sparsity']:.4f})")
        for note in p["report"].get("notes", [])[:5]:
            console.print(f"    note: {note}")
    console.print("files: " + ", ".join(report["files"]))
