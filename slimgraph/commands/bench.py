"""`slimgraph bench`: latency of one or more models side by side, round-robin
(:mod:`slimgraph.bench` does the work)."""

from __future__ import annotations

import argparse
import contextlib
import json

from slimgraph.commands.args import positive_int, positive_ints
from slimgraph.protocol import BACKENDS

# the help text: slimgraph.bench's documentation without its title line and markup
# (tests/test_cli_startup.py checks that the two agree)
DESCRIPTION = """\
Each model (a .onnx file, a compile output directory, or any load_model spec) is
loaded once; then every prefill length is measured round-robin: each round runs every
model once on the same random token ids, so slow drift of a shared machine hits all of
them alike (measured one after another, two files of identical shapes differed by up to 8%
on a 2-core machine; round-robin they agree within 0.3%). The first rounds are warm-up.

For each model: parameters, linear multiply-accumulates per token (the weights of MatMul /
Gemm / Linear layers; N:M zeros are counted, they do not shrink dense kernels), resident
memory its loading added, and per prefill length the median, minimum and 90th-percentile
latency and tokens per second. With more than one model, the first is the baseline: every
other gets its speedup and the *ideal* latency, baseline x its linear-MAC fraction (what a
slimmed model would take if time shrank with the linear FLOPs; attention scores, norms and
other fixed costs do not shrink, so small models and short prefills land above it)."""

EPILOG = """\
examples:
  slimgraph bench out/dense out/mlp50                 ONNX Runtime, dense as the baseline
  slimgraph bench out/dense out/mlp25 out/mlp50 --seqlen 128,512 --runs 30 --threads 2
  slimgraph bench smollm2-135m out/mlp50/hf --backend torch     PyTorch instead
  slimgraph bench a.onnx b.onnx --json > latency.json

MODEL is a .onnx file, a compile output directory (its model.onnx; hf/ with --backend
torch or when there is no model.onnx), or any model spec compile takes (the alias
smollm2-135m, an HF directory, a .gguf file). Make an ONNX baseline of the dense model with
`slimgraph compile MODEL -p export-onnx -o out/dense`.

Timing on a busy machine is noisy: close other work, keep --threads at or below the free
cores, and compare only models measured in the same run (they share every round).
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="measure latency of one or more models side by side (round-robin)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="models to time; the first is the baseline of the others")
    p.add_argument("--seqlen", type=positive_ints, default=[128, 512], metavar="N[,N...]",
                   help="prefill lengths in tokens, comma-separated (default 128,512)")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size (default 1)")
    p.add_argument("--runs", type=positive_int, default=20,
                   help="timed rounds per prefill length (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up rounds, not timed (default 3)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for ONNX Runtime / PyTorch (default: theirs)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto (default): ONNX Runtime where there is a model.onnx, else PyTorch")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from slimgraph.bench import BenchError, load, measure, render, summarize
    from slimgraph.evaluation import progress_bar

    if args.warmup < 0:
        raise BenchError(f"--warmup must be 0 or more, got {args.warmup}")
    show = not args.no_progress
    err = Console(stderr=True)
    models = []
    for spec in args.models:
        with err.status(f"loading {spec} ...") if show else contextlib.nullcontext():
            models.append(load(spec, backend=args.backend, threads=args.threads))
        limit = models[-1].max_positions
        if limit is not None and max(args.seqlen) > limit:
            raise BenchError(f"--seqlen {max(args.seqlen)} exceeds the {limit} positions of "
                             f"'{spec}' (use a smaller --seqlen)")
    total = len(args.seqlen) * (args.warmup + args.runs) * len(models)
    with progress_bar(total, enabled=show, label="bench", unit="runs") as advance:
        times = measure(models, args.seqlen, batch=args.batch, runs=args.runs,
                        warmup=args.warmup, progress=advance)
    result = summarize(models, times, batch=args.batch, runs=args.runs, warmup=args.warmup,
                       threads=args.threads)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0
