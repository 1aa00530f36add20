"""What the structured refit aims at (``prune-structured{refit_to=...}``) and how much
calibration it gets, on SmolLM2 at half the MLP channels -- a quick comparison.

Each row: ``slimgraph compile smollm2-135m -p "prune-structured{mlp=0.5,importance=act,
samples=S,refit_to=T},save-hf"`` then ``slimgraph eval OUTDIR --ppl <eval part> --windows W
--seqlen 512 --json``. The default W=10 evaluation windows (not the protocol's 40) keep a
row to a few minutes; compare rows of this table with each other.

Usage: python benchmarks/refit_targets.py [--targets pruned residual dense] [--samples 16]
       [--windows 10]
Writes benchmarks/results/refit_targets.json (rows merged with what is there).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHIPPED, run, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "refit_targets.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--targets", nargs="+", default=["pruned", "residual", "dense"])
    ap.add_argument("--samples", nargs="+", type=int, default=[16])
    ap.add_argument("--windows", type=int, default=10)
    ap.add_argument("--work", default="benchmarks/out/refit_targets")
    args = ap.parse_args()
    cli = [sys.executable, "-m", "slimgraph.cli"]
    rows = json.loads(RESULT.read_text())["rows"] if RESULT.is_file() else {}
    for samples in args.samples:
        for target in args.targets:
            name = f"mlp50-{target}-s{samples}-w{args.windows}"
            out = Path(args.work) / name
            pipe = (f"prune-structured{{mlp=0.5,importance=act,samples={samples},"
                    f"refit_to={target}}},save-hf")
            _, secs = run(cli + ["compile", "--overwrite", "smollm2-135m", "-p", pipe, "-o",
                                 str(out)])
            ev, _ = run(cli + ["eval", str(out), "--ppl", str(SHIPPED / "eval.txt"),
                               "--windows", str(args.windows), "--seqlen", "512", "--json",
                               "--no-progress"])
            rows[name] = {"pipeline": pipe, "ppl": round(json.loads(ev)["ppl"], 3),
                          "windows": args.windows, "compile_s": round(secs, 1)}
            print(name, rows[name], flush=True)
            write_result(RESULT, rows)


if __name__ == "__main__":
    main()
