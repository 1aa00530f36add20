"""Trace time, analysis time and peak RSS of the channel dependency analysis.

Each model runs in a fresh subprocess so that its peak RSS is its own.
Usage: python benchmarks/analysis.py [--out benchmarks/results/analysis.json] [MODEL ...]
Models: smollm2-135m (real weights, cached after the first load),
hf-config:llama-2-7b --meta, hf-config:llama-2-70b --meta.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

DEFAULT = [("smollm2-135m", False), ("hf-config:llama-2-7b", True), ("hf-config:llama-2-70b", True)]


def measure(spec: str, meta: bool) -> dict:
    import torch

    from slimgraph.frontends.build import graph_of
    from slimgraph.frontends.loading import load_model
    from slimgraph.ir.dependency import analyze

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    loaded = load_model(spec, meta=meta)
    t1 = time.perf_counter()
    graph = graph_of(loaded)
    t2 = time.perf_counter()
    result = analyze(graph)
    t3 = time.perf_counter()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "model": spec, "meta": meta, "load_s": round(t1 - t0, 2), "trace_s": round(t2 - t1, 2),
        "analysis_s": round(t3 - t2, 3), "trace_plus_analysis_s": round(t3 - t1, 2),
        "peak_rss_mb": round(rss_mb), "nodes": len(graph.nodes),
        "parameters": graph.num_parameters(),
        "groups": len(result.groups), "prunable_groups": len(result.prunable()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("models", nargs="*", help="specs; append '@meta' for the meta device")
    ap.add_argument("--out", default="benchmarks/results/analysis.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec, _, meta = args.child.partition("@")
        print(json.dumps(measure(spec, meta == "meta")))
        return
    todo = [(m.partition("@")[0], m.endswith("@meta")) for m in args.models] or DEFAULT
    rows = []
    for spec, meta in todo:
        child = f"{spec}@meta" if meta else spec
        proc = subprocess.run([sys.executable, __file__, "--child", child],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{child} failed:\n{proc.stderr[-2000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{row['model']:<24} meta={row['meta']!s:<5} trace {row['trace_s']:>6.2f} s  "
              f"analysis {row['analysis_s']:>6.3f} s  peak RSS {row['peak_rss_mb']:>6} MB  "
              f"nodes {row['nodes']}  groups {row['groups']} ({row['prunable_groups']} prunable)")
    out = {"date": dt.date.today().isoformat(), "machine": platform.machine(),
           "python": platform.python_version(), "command": " ".join(sys.argv), "rows": rows}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    main()
