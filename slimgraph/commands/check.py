"""`slimgraph check-sparsity`: verify an N:M sparsity pattern in a model or ONNX file
(:mod:`slimgraph.sparsity.check` does the work)."""

from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = """\
Check that the targeted weights of MODEL hold an N:M sparsity pattern along their
reduction axis (PyTorch Linear [C_out, C_in]: axis 1; ONNX MatMul B [K, N]: axis 0, Gemm:
axis 1 if transB else 0, Conv W[K, C, R, S]: axis 1), and whether TensorRT could use its
sparse kernels for each (2:4, a constant it can see, K and N multiples of 64 and >= 256).
Without --pattern only zero fractions are reported."""

EPILOG = """\
exit status: 0 every targeted layer holds the pattern (without --pattern: there are
targeted layers), 1 some do not (or an ONNX weight is hidden from TensorRT behind
Reshape/Concat/Slice/Gather, or no layer is targeted), 2 bad arguments or unreadable model.

examples:
  slimgraph check-sparsity out/sparse --pattern 2:4        compile OUTDIR: hf/ and *.onnx
  slimgraph check-sparsity out/sparse/model.onnx --pattern 2:4 --json
  slimgraph check-sparsity smollm2-135m                     zero fractions only

MODEL: an HF model directory, a .gguf file, a .onnx file, the alias smollm2-135m,
hf-config:PATH.json, or a compile output directory.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``check-sparsity`` subcommand; returns its parser."""
    p = subparsers.add_parser(
        "check-sparsity",
        help="verify an N:M sparsity pattern (e.g. 2:4) in a model or ONNX file",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model to check (see below)")
    p.add_argument("--pattern", metavar="N:M",
                   help="pattern to verify, N kept of every M (e.g. 2:4); default: report zeros only")
    p.add_argument("--all-linear", action="store_true",
                   help="check every linear weight (lm_head included), not only decoder blocks")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=run)
    return p


def _render(report, console) -> None:
    from rich.table import Table

    from slimgraph.sparsity.check_report import format_pattern

    pat = format_pattern(report.pattern)
    t = Table(title=f"{report.source}: {report.model}", title_justify="left")
    for col in ("layer", "op", "shape", "axis", "zeros", f"{pat} bad/groups" if pat else "N:M",
                "status", "TensorRT sparse"):
        t.add_column(col, justify="right" if col in ("axis", "zeros") else "left")
    for lyr in report.layers:
        groups = (f"{lyr.groups_violating}/{lyr.groups_total}" if lyr.groups_total is not None
                  else "-")
        status = lyr.status if lyr.reason is None else f"{lyr.status}: {lyr.reason}"
        t.add_row(lyr.name, lyr.op, "x".join(map(str, lyr.shape)),
                  "-" if lyr.axis is None else str(lyr.axis), f"{100 * lyr.zero_fraction:.1f}%",
                  groups, status, "yes" if lyr.trt_sparse else f"no: {lyr.trt_reason}")
    console.print(t)
    for note in report.notes:
        console.print(f"note: {note}")
    console.print(report.headline())
    fails = report.failures()
    if fails:
        shown = ", ".join(f"{f.name} ({f.groups_violating} of {f.groups_total} groups)"
                          if f.status == "violates" else f"{f.name} (not TensorRT-visible)"
                          for f in fails[:8])
        more = f" and {len(fails) - 8} more" if len(fails) > 8 else ""
        console.print(f"FAIL: {pat} does not hold on {len(fails)} layer(s): {shown}{more}")


def run(args: argparse.Namespace) -> int:
    """Handler of ``slimgraph check-sparsity``: 0 ok, 1 pattern not held (SlimgraphError: 2)."""
    from slimgraph.sparsity.check import check_model, format_pattern, parse_pattern

    pattern = parse_pattern(args.pattern)
    targets = "all-linear" if getattr(args, "all_linear", False) else "blocks"
    reports = check_model(args.model, pattern, targets=targets)
    ok = bool(reports) and all(r.ok for r in reports)
    if args.json:
        obj = {"model": args.model, "pattern": format_pattern(pattern), "targets": targets,
               "ok": ok, "reports": [r.to_dict() for r in reports]}
        json.dump(obj, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        from rich.console import Console

        out = Console(width=None if sys.stdout.isatty() else 200)
        for r in reports:
            _render(r, out)
        out.print("OK" if ok else "NOT OK")
    return 0 if ok else 1
