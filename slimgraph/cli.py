"""The `slimgraph` command line.

Every user error (bad path, corrupt file, impossible option) is printed as one line
`slimgraph: error: ...` and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from slimgraph.errors import SlimgraphError

EPILOG_INSPECT = """\
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


def _parser() -> argparse.ArgumentParser:
    from slimgraph import bench, evaluation

    p = argparse.ArgumentParser(
        prog="slimgraph",
        description="slimgraph: a pruning compiler for neural networks, LLMs first.",
    )
    from slimgraph import __version__

    p.add_argument("--version", action="version", version=f"slimgraph {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ins = sub.add_parser(
        "inspect",
        help="trace a model and show its coupled channel groups",
        description="Trace MODEL, run the channel dependency analysis and show the groups of "
        "channels that must be removed together (attention heads / GQA KV-groups, MLP "
        "channels, the hidden dimension), with why any group cannot be pruned.",
        epilog=EPILOG_INSPECT,
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
    ins.add_argument("--seq", type=evaluation.positive_int, default=7,
                     help="tokens in the example input used to trace the model (default 7)")
    ins.set_defaults(func=cmd_inspect)

    from slimgraph.passes import registry

    comp = sub.add_parser(
        "compile",
        help="run a pass pipeline on a model and write the results to OUTDIR",
        description="Load MODEL, run the pass pipeline (verifying the IR between passes) and "
        "write what the passes produce into OUTDIR, with OUTDIR/report.json.",
        epilog=EPILOG_COMPILE.format(passes=", ".join(registry.names())),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    comp.add_argument("model", help="model to compile (same forms as `slimgraph inspect`)")
    comp.add_argument("--pipeline", "-p", required=True,
                      help="passes, e.g. 'prune-structured{mlp=0.5},export-onnx', or a "
                      ".yaml/.toml file")
    comp.add_argument("-o", "--output", required=True, metavar="OUTDIR",
                      help="output directory (created if needed). Outputs are staged inside it and "
                      "committed only when every pass and check succeeded; an OUTDIR holding an "
                      "earlier compile is refused without --overwrite, and files slimgraph did "
                      "not write are never replaced")
    comp.add_argument("--no-verify", action="store_true", help="skip the IR verifier between passes")
    comp.add_argument("--overwrite", action="store_true",
                      help="replace an earlier compile in OUTDIR (without it, an OUTDIR holding "
                      "a report.json is refused); the earlier outputs are replaced only when "
                      "this compile succeeds")
    comp.add_argument("--print-after", action="append", default=[], metavar="PASS",
                      help="print the IR after PASS (repeatable)")
    comp.add_argument("--time-passes", action="store_true", help="print a timing table")
    comp.add_argument("--seq", type=evaluation.positive_int, default=7,
                      help="tokens in the example input used to trace the model (default 7)")
    comp.add_argument("--calib-file", metavar="PATH",
                      help="calibration data for passes that need it: a text file, Alpaca "
                      "JSON/JSONL, 'wikitext2-calib' (the default: the WikiText-2 calibration "
                      "text shipped with slimgraph), or 'self' (text sampled from the model)")
    comp.add_argument("--calib-samples", type=int, default=64, metavar="N",
                      help="calibration windows (default 64)")
    comp.add_argument("--calib-seqlen", type=int, default=512, metavar="L",
                      help="tokens per calibration window (default 512)")
    comp.add_argument("--offload", action="store_true",
                      help="keep the weights on disk but for the decoder block being pruned "
                           "(an HF safetensors directory; sparsify and save-hf only)")
    comp.set_defaults(func=cmd_compile)

    from slimgraph.passes import help as pass_help

    pass_help.add_parser(sub)
    evaluation.add_parser(sub)
    bench.add_parser(sub)
    from slimgraph.sparsity import check as sparsity_check

    sparsity_check.add_parser(sub)
    return p


EPILOG_COMPILE = """\
pipeline syntax: comma-separated passes, options in braces: pass{{key=value,...}}
passes: {passes}
(`slimgraph passes NAME` shows a pass's options, defaults and documentation)

examples:
  slimgraph compile smollm2-135m -p 'prune-structured{{mlp=0.5}},export-onnx' -o out/mlp50
  slimgraph compile smollm2-135m -p 'prune-structured{{heads=0.33,mlp=0.5,importance=l2}},save-hf,export-onnx' -o out/c
  slimgraph compile smollm2-135m -p pipeline.yaml -o out/x --time-passes
  slimgraph compile hf-dir --offload -p 'sparsify{{score=wanda,pattern=2:4}},save-hf' -o out/w --calib-file calib.txt

prune-structured options: heads, mlp, hidden (fraction of units removed per group of that
kind), ratio (heads and mlp at once), importance (l1|l2|act), round_to (kept counts rounded to
a multiple), protect (layer indices never pruned, e.g. protect=0 29).
"""


def cmd_compile(args: argparse.Namespace) -> int:
    from rich.console import Console

    from slimgraph.compile import compile_model

    err = Console(stderr=True)
    out = Console(width=None if sys.stdout.isatty() else 200)
    report = compile_model(args.model, args.pipeline, args.output, verify=not args.no_verify,
                           print_after=set(args.print_after), seq=args.seq, console=err,
                           printer=print, calib={"file": args.calib_file,
                                                 "samples": args.calib_samples,
                                                 "seqlen": args.calib_seqlen},
                           offload=args.offload, overwrite=args.overwrite)
    from slimgraph.compile import render_summary
    from slimgraph.outdir import helper_process

    if helper_process():  # a multi-process launch: the main process reports
        return 0
    render_summary(report, out)
    if args.time_passes:
        from slimgraph.passes.pipeline import timing_table

        out.print(timing_table(report["_records"]))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from rich.console import Console

    from slimgraph.frontends.build import graph_of
    from slimgraph.frontends.loading import load_model
    from slimgraph.inspect_report import render_tables, to_json, write_dot
    from slimgraph.ir.dependency import analyze
    from slimgraph.ir.printer import print_graph
    from slimgraph.ir.verifier import verify

    err = Console(stderr=True)
    if args.diff:
        return _inspect_diff(args, err)
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


def _inspect_diff(args: argparse.Namespace, err) -> int:
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


def main(argv: list[str] | None = None) -> int:
    from slimgraph.outdir import interrupted_exit_code, termination_as_interrupt

    args = _parser().parse_args(argv)
    try:
        with termination_as_interrupt():  # SIGTERM / SIGHUP clean up like Ctrl-C
            return args.func(args)
    except SlimgraphError as e:
        print("slimgraph: error: " + " ".join(str(e).split("\n")), file=sys.stderr)  # one line
        return 2
    except KeyboardInterrupt as e:
        print(f"slimgraph: interrupted{f' ({e})' if str(e) else ''}",
              file=sys.stderr)
        return interrupted_exit_code(e)


if __name__ == "__main__":
    sys.exit(main())
