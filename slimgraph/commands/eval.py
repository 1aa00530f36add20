"""`slimgraph eval`: a model's perplexity on a text, the benchmark protocol's way
(:mod:`slimgraph.evaluation` does the work)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

from slimgraph.commands.args import positive_int
from slimgraph.protocol import BACKENDS, DEFAULT_SEQLEN, DEFAULT_WINDOWS

DESCRIPTION = """\
Measure the perplexity of MODEL on a text, following the benchmark protocol: the text is
tokenized without special tokens (no BOS), cut into non-overlapping windows of --seqlen
tokens from its start, and the first --windows windows are scored one at a time (mean NLL
of tokens 1..L-1 given their prefix). The result is exp(mean over windows of the window
mean NLL). If the text holds fewer windows, all are used and the count is reported."""

EPILOG = """\
examples:
  slimgraph eval smollm2-135m --ppl eval.txt                 dense model, 40 x 512 tokens
  slimgraph eval out/ --ppl eval.txt --json                  a compile output directory
  slimgraph eval out/ --ppl eval.txt --backend onnx          ... run its model.onnx instead
  slimgraph eval model.onnx --ppl eval.txt --tokenizer smollm2-135m
  slimgraph eval smollm2-135m --ppl eval.txt --windows 2 --threads 2   quick check
  slimgraph eval out/ --tasks hellaswag,arc_easy --limit 200  zero-shot tasks (lm-eval)

MODEL is one of: the alias smollm2-135m, an HF model directory, a .gguf file, a .onnx
file, hf-config:PATH.json, or a compile output directory (with hf/ and/or model.onnx and
the tokenizer files). --backend auto runs hf/ (or any PyTorch model) with PyTorch and
model.onnx with ONNX Runtime (CUDA when onnxruntime-gpu finds a GPU, else CPU).

The protocol's text (docs/benchmark-protocol.md): the first 75% of the characters of
WikiText-2 raw wiki.test.raw with LF line endings, shipped with slimgraph as 'wikitext2'.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to an argparse subparsers object; returns its parser."""
    ev = subparsers.add_parser(
        "eval",
        help="measure a model's perplexity on a text (the benchmark protocol)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ev.add_argument("model", help="model to evaluate (see below)")
    mode = ev.add_mutually_exclusive_group(required=True)
    mode.add_argument("--ppl", metavar="TEXTFILE",
                      help="UTF-8 text file to measure perplexity on (CRLF is read as LF), or "
                      "'wikitext2': the WikiText-2 evaluation text shipped with slimgraph")
    mode.add_argument("--tasks", metavar="NAME[,NAME]",
                      help="instead of --ppl: zero-shot lm-eval tasks (e.g. hellaswag,arc_easy; "
                      "needs pip install lm_eval; see docs/tasks.md)")
    ev.add_argument("--tasks-path", metavar="DIR",
                    help="a folder of task .yaml files in lm-eval's format, for --tasks")
    ev.add_argument("--limit", type=positive_int, default=None,
                    help="--tasks: at most this many documents per task (a quick check)")
    ev.add_argument("--batch-size", type=positive_int, default=None,
                    help="--tasks: requests per forward pass (default 8)")
    ev.add_argument("--seqlen", type=positive_int, default=DEFAULT_SEQLEN,
                    help=f"tokens per window (default {DEFAULT_SEQLEN})")
    ev.add_argument("--windows", type=positive_int, default=DEFAULT_WINDOWS,
                    help=f"number of windows from the start of the text (default "
                    f"{DEFAULT_WINDOWS})")
    ev.add_argument("--backend", choices=BACKENDS, default="auto",
                    help="run with PyTorch or ONNX Runtime (default auto: PyTorch when there "
                    "is a PyTorch model, else ONNX)")
    ev.add_argument("--tokenizer", metavar="SPEC",
                    help="tokenizer to use: a directory with tokenizer files or a model spec "
                    "(e.g. smollm2-135m); default: the model's own, or the files beside it")
    ev.add_argument("--prompt", metavar="TEXT_OR_FILE",
                    help="text (or a file of text) prepended to every window and not scored")
    ev.add_argument("--threads", type=positive_int, default=None,
                    help="CPU threads for PyTorch / ONNX Runtime (default: leave as is; the "
                    "protocol uses 2)")
    ev.add_argument("--json", action="store_true", help="print a JSON object")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    ev.set_defaults(func=run)
    return ev


def _prompt_text(value: str) -> str:
    from slimgraph.evaluation import EvaluationError, read_text

    p = Path(value).expanduser()
    try:
        is_file = p.is_file()
    except OSError:  # e.g. a long literal prompt is not a valid path
        is_file = False
    text = read_text(p) if is_file else value
    if not text.strip():
        raise EvaluationError("--prompt is empty")
    return text


def run(args: argparse.Namespace) -> int:
    """Handler of ``slimgraph eval``: prints a one-line summary, or a JSON object."""
    from rich.console import Console

    from slimgraph.data import resolve_text
    from slimgraph.evaluation import EvaluationError, perplexity, read_text, resolve_model, tokenize

    if getattr(args, "tasks", None) is not None:  # --ppl and --tasks exclude each other
        from slimgraph.tasks import cmd_tasks

        return cmd_tasks(args)
    err = Console(stderr=True)
    progress = not getattr(args, "no_progress", False)
    text = read_text(resolve_text(args.ppl))  # fail fast, before loading a model
    prompt_arg = getattr(args, "prompt", None)
    prompt_text = _prompt_text(prompt_arg) if prompt_arg else None

    t0 = time.perf_counter()
    with err.status(f"loading {args.model} ...") if progress else contextlib.nullcontext():
        em = resolve_model(
            args.model,
            backend=getattr(args, "backend", "auto"),
            tokenizer=getattr(args, "tokenizer", None),
            threads=getattr(args, "threads", None),
        )
    load_s = time.perf_counter() - t0
    tokens = tokenize(em.tokenizer, text)
    prompt_tokens = tokenize(em.tokenizer, prompt_text) if prompt_text else None
    if prompt_text and not prompt_tokens:
        raise EvaluationError("--prompt gives no tokens")
    length = args.seqlen + (len(prompt_tokens) if prompt_tokens else 0)
    if em.max_positions is not None and length > em.max_positions:
        raise EvaluationError(
            f"windows of {length} tokens exceed the model's {em.max_positions} positions "
            "(use a smaller --seqlen or a shorter --prompt)"
        )
    result = perplexity(
        em.logits_fn, tokens, seqlen=args.seqlen, windows=args.windows, progress=progress,
        prompt_tokens=prompt_tokens,
    )  # fmt: skip

    if args.json:
        obj = {"ppl": result["ppl"], "model": args.model, "backend": em.backend,
               "source": em.source, "text": str(args.ppl)}
        obj.update({k: v for k, v in result.items() if k != "ppl"})
        obj["load_seconds"] = load_s
        obj["threads"] = getattr(args, "threads", None)
        json.dump(obj, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        fewer = (f" (text has only {result['windows']} of the {args.windows} asked)"
                 if result["windows"] < args.windows else "")
        prompt_note = f", prompt {result['prompt_tokens']} tokens" if prompt_tokens else ""
        print(f"{args.model} [{em.backend}]: ppl {result['ppl']:.4f} over {result['windows']} "
              f"windows x {result['seqlen']} tokens{fewer}{prompt_note}, "
              f"{result['tokens_per_s']:,.0f} tokens/s, {result['seconds']:.1f} s")
    if not math.isfinite(result["ppl"]):
        print("slimgraph: warning: perplexity is not finite (NaN/inf logits?)", file=sys.stderr)
    return 0
