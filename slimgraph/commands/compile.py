"""`slimgraph compile`: run a pass pipeline on a model and write the results to OUTDIR."""

from __future__ import annotations

import argparse
import sys

from slimgraph.commands.args import positive_int
from slimgraph.passes import registry  # light: pass names; the pass modules load on use

EPILOG = """\
pipeline syntax: comma-separated passes, options in braces: pass{{key=value,...}}
passes: {passes}
(`slimgraph passes NAME` shows a pass's options, defaults and documentation)

examples:
  slimgraph compile smollm2-135m -p 'prune-structured{{mlp=0.5}},export-onnx' -o out/mlp50
  slimgraph compile smollm2-135m -p 'prune-structured{{heads=0.33,mlp=0.5,importance=l2}},save-hf,export-onnx' -o out/c
  slimgraph compile smollm2-135m -p pipeline.yaml -o out/x --time-passes
  slimgraph compile hf-dir --offload -p 'sparsify{{score=wanda,pattern=2:4}},save-hf' -o out/w --calib-file calib.txt

prune-structured options: heads, qheads, mlp, hidden (fraction of units removed per group
of that kind; qheads: query heads within the KV-groups of a GQA layer), ratio (heads and mlp
at once), importance (l1|l2|act|obs), round_to (kept counts rounded to a multiple), protect
(layer indices never pruned, e.g. protect=0 29); all of them: slimgraph passes prune-structured.
"""


def add_parser(sub) -> argparse.ArgumentParser:
    comp = sub.add_parser(
        "compile",
        help="run a pass pipeline on a model and write the results to OUTDIR",
        description="Load MODEL, run the pass pipeline (verifying the IR between passes) and "
        "write what the passes produce into OUTDIR, with OUTDIR/report.json.",
        epilog=EPILOG.format(passes=", ".join(registry.names())),
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
    comp.add_argument("--seq", type=positive_int, default=7,
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
    comp.set_defaults(func=run)
    return comp


def run(args: argparse.Namespace) -> int:
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
