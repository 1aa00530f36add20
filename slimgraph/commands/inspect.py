"""`slimgraph inspect`: trace a model and show its coupled channel groups."""

from __future__ import annotations

import argparse
import json
import sys
import time

from slimgraph.commands.args import positive_int
from slimgraph.errors import SlimgraphError

EPILOG = """\
examples:
  slimgraph inspect smollm2-135m                      groups of the real model
  slimgraph inspect hf-config:llama-2-70b --meta      analyse a 70B architecture without weights
  slimgraph inspect model.onnx --json > groups.json   machine-readable groups
  slimgraph inspect smollm2-135m --ops --all          op kinds, barriers, unprunable groups
  slimgraph inspect smollm2-135m --dot graph.dot      graph with groups coloured (+ SVG if Graphviz)
  slimgraph inspect smollm2-135m --html graph.html    groups and zoomable graph, one page (no network)
  slimgraph inspect --diff smollm2-135m out/c/hf       what a compile changed

MODEL is one of: an HF model directory, a .gguf file, a .onnx file, the alias
smollm2-135m, or hf-config:PATH.json (random weights; with --meta no weights at all;
hf-config:llama-2-7b and hf-config:llama-2-70b are built in).
"""


def add_parser(sub) -> argparse.ArgumentParser:
    ins = sub.add_parser(
        "inspect",
        help="trace a model and show its coupled channel groups",
        description="Trace MODEL, run the channel dependency analysis and show the groups of "
        "channels that must be removed together (attention heads / GQA KV-groups, MLP "
        "channels, the hidden dimension), with why any group cannot be pruned.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ins.add_argument("model", nargs="?", help="model to inspect (see below)")
    ins.add_argument("--diff", nargs=2, metavar=("A", "B"),
                     help="show what changed between two models (groups, shapes, parameters)")
    ins.add_argument("--meta", action="store_true",
                     help="build the model on the meta device: no weights, no memory")
    ins.add_argument("--json", action="store_true", help="print a JSON object instead of tables")
    ins.add_argument("--dot", metavar="FILE", help="write the graph as Graphviz DOT (and SVG)")
    ins.add_argument("--html", metavar="FILE", help="write a self-contained HTML page: groups "
                     "table and the graph with groups coloured (zoomable)")
    ins.add_argument("--ops", action="store_true",
                     help="show the op-kind histogram and ops without a channel rule")
    ins.add_argument("--all", action="store_true", help="also list unprunable groups")
    ins.add_argument("--print-ir", action="store_true", help="print the IR as text")
    ins.add_argument("--seq", type=positive_int, default=7,
                     help="tokens in the example input used to trace the model (default 7)")
    ins.set_defaults(func=run)
    return ins


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from slimgraph.frontends.build import graph_of
    from slimgraph.frontends.loading import load_model
    from slimgraph.inspect_report import render_tables, to_json, write_dot
    from slimgraph.ir.dependency import analyze
    from slimgraph.ir.printer import print_graph
    from slimgraph.ir.verifier import verify

    err = Console(stderr=True)
    if args.diff:
        return _diff(args, err)
    if not args.model:
        raise SlimgraphError("inspect needs a MODEL (or --diff A B)")
    if args.html:
        from slimgraph.report_html import check_writable
        check_writable(args.html)  # before the model loads
    t0 = time.perf_counter()
    with err.status(f"loading {args.model} ..."):
        loaded = load_model(args.model, meta=args.meta)
    t1 = time.perf_counter()
    with err.status("tracing ..."):
        graph = graph_of(loaded, seq=args.seq)
        verify(graph)
    t2 = time.perf_counter()
    with err.status("analysing channel dependencies ..."):
        result = analyze(graph)
    t3 = time.perf_counter()
    timing = {"load_s": round(t1 - t0, 3), "trace_s": round(t2 - t1, 3),
              "analysis_s": round(t3 - t2, 3)}
    if args.html:
        from slimgraph.report_html import render_inspect, write_html
        err.print(f"wrote {write_html(args.html, render_inspect(graph, result))}")
    if args.dot:
        written = write_dot(graph, result, args.dot)
        err.print("wrote " + ", ".join(str(p) for p in written))
    if args.print_ir:
        print(print_graph(graph))
    if args.json:
        obj = to_json(graph, result)
        obj["timing"] = timing
        json.dump(obj, sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
    else:
        out = Console(width=None if sys.stdout.isatty() else 200)
        render_tables(graph, result, out, show_ops=args.ops, all_groups=args.all)
        out.print(f"load {timing['load_s']} s, trace {timing['trace_s']} s, "
                  f"analysis {timing['analysis_s']} s")
    return 0


def _diff(args: argparse.Namespace, err) -> int:
    from rich.console import Console

    from slimgraph.frontends.build import load_graph
    from slimgraph.inspect_report import diff, render_diff
    from slimgraph.ir.dependency import analyze

    results = []
    for spec in args.diff:
        with err.status(f"loading and tracing {spec} ..."):
            _, graph = load_graph(spec, meta=args.meta, seq=args.seq)
            results.append(analyze(graph))
    d = diff(*results)
    if args.json:
        json.dump({"a": args.diff[0], "b": args.diff[1], **d}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        render_diff(d, Console(width=None if sys.stdout.isatty() else 200), *args.diff)
    return 0
