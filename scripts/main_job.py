#!/usr/bin/env python3
"""The main job: make SmolLM2-135M smaller and faster, keep it good, and say what you got.

Steps (each one a plain `slimgraph` command, printed before it runs):
  1. compile the slim model: PIPELINE (default: remove 27% of every MLP's channels,
     chosen by activation-aware importance, with a least-squares refit of each down_proj
     on calibration text), save it as an HF checkpoint and as ONNX;
  2. export the dense model to ONNX once (kept in out/smollm2-dense for later runs);
  3. perplexity of both on the shipped WikiText-2 evaluation text (--windows windows of
     512 tokens);
  4. ONNX Runtime latency of both, side by side (round-robin), prefill --seqlen tokens;
then a summary: parameters, perplexity, latency, where the files are.

Usage: scripts/main [PIPELINE] [--out DIR] [--windows N] [--calib-samples N] [--seqlen N]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SLIMGRAPH = str(ROOT / ".venv" / "bin" / "slimgraph")
MODEL = "smollm2-135m"
PIPELINE = "prune-structured{mlp=0.27,importance=act},save-hf,export-onnx"


def run(args: list[str], *, capture: bool = False) -> str:
    print("$ " + " ".join(shlex.quote(a) for a in ["slimgraph", *args[1:]]), flush=True)
    proc = subprocess.run(args, stdout=subprocess.PIPE if capture else None, text=True)
    if proc.returncode != 0:
        sys.exit(f"main: step failed (exit {proc.returncode}): {' '.join(args[1:3])} ...")
    return proc.stdout if capture else ""


def finished(out: Path) -> bool:
    return (out / "report.json").is_file() and (out / "model.onnx").is_file()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pipeline", nargs="?", default=PIPELINE)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "smollm2-slim")
    ap.add_argument("--dense", type=Path, default=ROOT / "out" / "smollm2-dense")
    ap.add_argument("--windows", type=int, default=10, help="512-token evaluation windows (10)")
    ap.add_argument("--calib-samples", type=int, default=32,
                    help="512-token calibration windows for the refit (32)")
    ap.add_argument("--seqlen", type=int, default=128, help="prefill length timed (128)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    steps: list[tuple[str, float]] = []

    def step(name: str, fn):
        print(f"\n== {name}", flush=True)
        t = time.perf_counter()
        value = fn()
        steps.append((name, time.perf_counter() - t))
        return value

    step("1/4 compile the slim model", lambda: run(
        [SLIMGRAPH, "compile", MODEL, "-p", args.pipeline, "-o", str(args.out), "--overwrite",
         "--calib-file", "wikitext2-calib", "--calib-samples", str(args.calib_samples)]))
    if not finished(args.dense):
        step("2/4 export the dense model to ONNX (once)", lambda: run(
            [SLIMGRAPH, "compile", MODEL, "-p", "export-onnx", "-o", str(args.dense),
             "--overwrite"]))
    else:
        print(f"\n== 2/4 dense ONNX model: {args.dense} (exported by an earlier run)")

    def ppl(target: Path) -> dict:
        return json.loads(run([SLIMGRAPH, "eval", str(target), "--ppl", "wikitext2", "--windows",
                               str(args.windows), "--backend", "onnx", "--json"], capture=True))

    dense_ppl = step("3/4 perplexity, dense", lambda: ppl(args.dense))
    slim_ppl = step("3/4 perplexity, slim", lambda: ppl(args.out))
    bench = step("4/4 ONNX Runtime latency, side by side", lambda: json.loads(run(
        [SLIMGRAPH, "bench", str(args.dense), str(args.out), "--seqlen", str(args.seqlen),
         "--runs", "10", "--warmup", "2", "--json"], capture=True)))

    report = json.loads((args.out / "report.json").read_text())
    before, after = report["parameters"]["before"], report["parameters"]["after"]
    lat = [m["latency_ms"][str(args.seqlen)]["median"] for m in bench["models"]]
    print("\n== what you got")
    print(f"pipeline     {args.pipeline}")
    print(f"parameters   {before:,} -> {after:,} ({100 * after / before:.1f}%)")
    print(f"perplexity   {dense_ppl['ppl']:.2f} -> {slim_ppl['ppl']:.2f} "
          f"(x{slim_ppl['ppl'] / dense_ppl['ppl']:.2f}; WikiText-2, {args.windows} x 512 tokens)")
    print(f"latency      {lat[0]:.1f} ms -> {lat[1]:.1f} ms (x{lat[0] / lat[1]:.2f} faster; "
          f"ONNX Runtime, prefill {args.seqlen} tokens, median of 10)")
    print(f"files        {args.out}/ (model.onnx, hf/, report.json, report.html)")
    print(f"time         {time.perf_counter() - t0:.0f} s: "
          + ", ".join(f"{n.split(' ', 1)[1]} {s:.0f} s" for n, s in steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
