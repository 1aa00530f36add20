"""ONNX Runtime latency cost of `permute=gather` (one input gather per permuted linear).

Compiles SmolLM2 twice with 2:4 masks, without and with gathers, exports both to ONNX and
times them next to the dense export (ONNX Runtime CPU, 2 threads, batch 1, prefill 128 and
512, median of 20 runs after 3 warm-ups; `latency` from structured.py). The score is
magnitude, so no calibration is needed: the gathers (their number and sizes) are the same
for every score. ORT's CPU kernels are dense, so the masked models cost what the dense one
does; the difference between the two masked models is the cost of the gathers.

Usage: python benchmarks/gather_latency.py [--runs 20] [--latency-only]
Writes benchmarks/results/gather_latency.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run, write_result  # noqa: E402
from structured import latency  # noqa: E402

CONFIGS = {
    "2:4 no permutation": "sparsify{score=magnitude,pattern=2:4},export-onnx",
    "2:4 permute=gather": "sparsify{score=magnitude,pattern=2:4,permute=gather},export-onnx",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--work", default="benchmarks/out/gather")
    ap.add_argument("--dense", default="benchmarks/out/dense/model.onnx",
                    help="dense ONNX export (benchmarks/structured.py --only dense writes it)")
    ap.add_argument("--out", default="benchmarks/results/gather_latency.json")
    ap.add_argument("--latency-only", action="store_true", help="reuse the compiled models")
    args = ap.parse_args()
    work = Path(args.work)
    rows = {}
    for name, pipe in CONFIGS.items():
        out = work / name.split()[-1].replace("=", "-").replace(":", "-")
        if not args.latency_only:
            run([sys.executable, "-m", "slimgraph.cli", "compile", "smollm2-135m", "-p", pipe,
                 "-o", str(out)])
        report = json.loads((out / "report.json").read_text())
        perm = report["passes"][0]["report"].get("permutation", {})
        rows[name] = {"pipeline": pipe, "onnx": str(out / "model.onnx"),
                      "gathers": perm.get("layers_permuted", 0)}
    rows["dense"] = {"onnx": args.dense}
    for name, row in rows.items():
        row["latency_ms"] = {str(s): round(latency(Path(row["onnx"]), s, args.runs), 1)
                             for s in (128, 512)}
        print(name, row["latency_ms"], flush=True)
    base = rows["2:4 no permutation"]["latency_ms"]
    g = rows["2:4 permute=gather"]["latency_ms"]
    cost = {s: round(100 * (g[s] / base[s] - 1), 1) for s in base}
    write_result(args.out, rows, gather_cost_pct=cost)
    print("gather cost (% over the same masks without gathers):", cost)


if __name__ == "__main__":
    main()
