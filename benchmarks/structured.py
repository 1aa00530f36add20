"""Structured removal on SmolLM2: parameters, perplexity, ONNX Runtime latency.

For each configuration: `slimgraph compile` (timed) with save-hf and export-onnx,
`slimgraph eval` (benchmark protocol, docs/benchmark-protocol.md: 40 x 512 tokens of the WikiText-2 eval split),
and ONNX Runtime CPU latency (2 threads, batch 1, prefill 128 and 512 tokens, median of
20 runs after 3 warm-up runs) next to the ideal: dense latency x remaining linear-FLOPs
fraction.

Usage: python benchmarks/structured.py [--windows 40] [--runs 20] [--only NAME ...]
Writes benchmarks/results/structured.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import protocol_split, run, write_result  # noqa: E402

# one-shot removal without a weight update (section 2 of BENCHMARKS.md; the refit is
# measured by benchmarks/recovery.py)
CONFIGS = {
    "dense": "export-onnx",
    "mlp25": "prune-structured{mlp=0.25,reconstruct=false},save-hf,export-onnx",
    "mlp50": "prune-structured{mlp=0.5,reconstruct=false},save-hf,export-onnx",
    "kv1of3+mlp50": "prune-structured{heads=0.33,mlp=0.5,reconstruct=false},save-hf,export-onnx",
    "mlp25-act": "prune-structured{mlp=0.25,importance=act,reconstruct=false},save-hf,export-onnx",
    "mlp50-act": "prune-structured{mlp=0.5,importance=act,reconstruct=false},save-hf,export-onnx",
    "kv1of3+mlp50-act": "prune-structured{heads=0.33,mlp=0.5,importance=act,reconstruct=false},save-hf,export-onnx",
    "q1of3-act": "prune-structured{qheads=0.34,importance=act,reconstruct=false},save-hf,export-onnx",
    "q1of3+mlp50-act": "prune-structured{qheads=0.34,mlp=0.5,importance=act,reconstruct=false},save-hf,export-onnx",
}


def interleaved_latency(paths: dict[str, Path], seqlens=(128, 512), runs: int = 20,
                        threads: int = 2) -> dict[str, dict[str, float]]:
    """Median latency (ms) of several ONNX files measured round-robin with
    `slimgraph.bench` (what `slimgraph bench` runs): every round runs each file once, so
    slow drift of a shared machine hits all of them alike. 3 warm-up rounds."""
    from slimgraph.bench import load, measure

    names = list(paths)
    models = [load(str(paths[n]), backend="onnx", threads=threads) for n in names]
    times = measure(models, list(seqlens), runs=runs, warmup=3)
    return {n: {s: round(statistics.median(t) * 1000, 1) for s, t in times[str(i)].items()}
            for i, n in enumerate(names)}


def latency(path: Path, seqlen: int, runs: int, threads: int = 2) -> float:
    """Median latency (ms) of one ONNX file at one prefill length."""
    return interleaved_latency({"m": path}, (seqlen,), runs, threads)["m"][str(seqlen)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--only", nargs="*", default=list(CONFIGS))
    ap.add_argument("--calib-file", default=None, help="calibration text for importance=act "
                    "(default: the protocol's calibration split, written to WORK/calib.txt)")
    ap.add_argument("--work", default="benchmarks/out")
    ap.add_argument("--out", default="benchmarks/results/structured.json")
    ap.add_argument("--keep-ppl", action="store_true",
                    help="compile and measure latency, but keep the ppl of the existing results "
                         "(for a change that cannot alter the weights, e.g. the export opset)")
    ap.add_argument("--latency-only", action="store_true",
                    help="re-measure latency of existing OUTDIRs, all of them round-robin "
                         "(keeps compile/ppl figures)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    eval_txt, calib_txt = protocol_split(work)
    if args.calib_file:
        calib_txt = Path(args.calib_file)
    cli = [sys.executable, "-m", "slimgraph.cli"]
    path = Path(args.out)
    rows = json.loads(path.read_text())["rows"] if path.exists() else {}
    if args.latency_only:  # all files round-robin (see interleaved_latency)
        lat = interleaved_latency({n: work / n / "model.onnx" for n in args.only}, runs=args.runs)
        for name, ms in lat.items():
            rows[name]["latency_ms"] = ms
            print(name, ms, flush=True)
    for name in [] if args.latency_only else args.only:
        out = work / name
        _, secs = run(cli + ["compile", "--overwrite", "smollm2-135m", "-p", CONFIGS[name], "-o", str(out),
                             "--calib-file", str(calib_txt)])
        report = json.loads((out / "report.json").read_text())
        target = str(out) if (out / "hf").exists() else "smollm2-135m"
        if args.keep_ppl and name in rows:
            ppl = rows[name]["ppl"]
        else:
            ev, _ = run(cli + ["eval", target, "--ppl", str(eval_txt), "--windows",
                               str(args.windows), "--seqlen", "512", "--json"])
            ppl = json.loads(ev)["ppl"]
        row = {
            "pipeline": CONFIGS[name], "compile_s": round(secs, 1),
            "params": report["parameters"]["after"],
            "linear_flops_per_token": report["after"]["total_flops_per_token"],
            "ppl": round(ppl, 3),
            "latency_ms": {str(s): round(latency(out / "model.onnx", s, args.runs), 1)
                           for s in (128, 512)},
        }
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    order = [n for n in CONFIGS if n in rows]
    rows = {n: rows[n] for n in order}
    if "dense" in rows:
        dense = rows["dense"]
        for row in rows.values():
            frac = row["linear_flops_per_token"] / dense["linear_flops_per_token"]
            row["flops_fraction"] = round(frac, 4)
            row["ideal_ms"] = {s: round(dense["latency_ms"][s] * frac, 1) for s in ("128", "512")}
            row["over_ideal_pct"] = {s: round(100 * (row["latency_ms"][s] / row["ideal_ms"][s] - 1), 1)
                                     for s in ("128", "512")}
    write_result(path, rows)
    print("| config | params | ppl | compile s | ORT 128 ms (ideal) | ORT 512 ms (ideal) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        ideal = r.get("ideal_ms", {"128": "-", "512": "-"})
        print(f"| {name} | {r['params']:,} | {r['ppl']} | {r['compile_s']} | "
              f"{r['latency_ms']['128']} ({ideal['128']}) | {r['latency_ms']['512']} ({ideal['512']}) |")


if __name__ == "__main__":
    main()
