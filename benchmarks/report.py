"""Markdown tables for BENCHMARKS.md from benchmarks/results/*.json (no measuring).

Usage: python benchmarks/report.py [structured|sparsity|permutation|l0|gather ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def structured() -> None:
    d = _load("structured")
    if not d:
        return
    print(f"<!-- {d['command']} ({d['date']}) -->")
    print("| config | params | ppl | compile s | ORT 128 ms (ideal, over) | ORT 512 ms (ideal, over) |")
    print("|---|---|---|---|---|---|")
    for name, r in d["rows"].items():
        lat = [f"{r['latency_ms'][s]} ({r['ideal_ms'][s]}, {r['over_ideal_pct'][s]:+.1f}%)"
               for s in ("128", "512")]
        print(f"| {name} | {r['params']:,} | {r['ppl']:,} | {r['compile_s']} | {lat[0]} | {lat[1]} |")


def sparsity() -> None:
    d = _load("sparsity")
    if not d:
        return
    rows = d["rows"]
    dense = rows.get("dense", {})
    ref = dense.get("dense_forward_calib_s")
    print(f"<!-- {d['command']} ({d['date']}) -->")
    print("| method | 50% ppl | 2:4 ppl | prune s (50% / 2:4) | x dense calib forward | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    print(f"| dense | {dense.get('ppl', '-')} | | (dense forward over the calibration set: {ref} s) | | "
          f"{dense.get('peak_rss_mb', '-')} |")
    methods = []
    for name in rows:
        base = name.rsplit(" ", 1)[0]
        if name != "dense" and "permute" not in name and base not in methods:
            methods.append(base)
    for m in methods:
        a, b = rows.get(f"{m} 50%", {}), rows.get(f"{m} 2:4", {})

        def cell(r, key):
            return r.get("error", r.get(key, "-")) if r else "-"
        secs = f"{cell(a, 'prune_s')} / {cell(b, 'prune_s')}"
        ratio = " / ".join(f"{r['prune_s'] / ref:.1f}" if r and "prune_s" in r and ref else "-"
                           for r in (a, b))
        rss = max((r.get("peak_rss_mb", 0) for r in (a, b) if r), default="-")
        print(f"| {m} | {cell(a, 'ppl')} | {cell(b, 'ppl')} | {secs} | {ratio} | {rss} |")


def permutation() -> None:
    d = _load("sparsity")
    if not d:
        return
    rows = d["rows"]
    print("| RIA 2:4 | ppl | prune s | permutation s (total) | per layer s (mean / max) | "
          "importance kept vs no permutation | groups of 4 not 2:4 as stored |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        if name != "ria 2:4" and "permute" not in name:
            continue
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | | | | |")
            continue
        print(f"| {name} | {r.get('ppl')} | {r.get('prune_s')} | {r.get('permutation_s', '-')} | "
              f"{r.get('perm_layer_s_mean', '-')} / {r.get('perm_layer_s_max', '-')} | "
              f"{r.get('importance_kept_gain', '-')} | {r.get('groups_violating_2of4_stored', '-')} |")


def l0() -> None:
    """The main run (l0.json) and the later runs (l0_*.json), one table each."""
    for name in ["l0"] + sorted(p.stem for p in RESULTS.glob("l0_*.json")):
        d = _load(name)
        if not d:
            continue
        print(f"<!-- {d['command']} ({d['date']}) -->")
        print("| model | params | ppl | ppl with prompt | train s | safetensors MB | ONNX MB | "
              "ORT 128 ms | ORT 512 ms |")
        print("|---|---|---|---|---|---|---|---|---|")
        for row, r in d["rows"].items():
            print(f"| {row} | {r['params']:,} | {r['ppl']} | {r.get('ppl_with_prompt', '-')} | "
                  f"{r.get('train_s', '-')} | {r['safetensors_mb']} | {r['onnx_mb']} | "
                  f"{r['latency_ms']['128']} | {r['latency_ms']['512']} |")
        print()


def gather() -> None:
    d = _load("gather_latency")
    if not d:
        return
    print(f"<!-- {d['command']} ({d['date']}) -->")
    print("| model | gathers | ORT 128 ms | ORT 512 ms |")
    print("|---|---|---|---|")
    for name, r in d["rows"].items():
        print(f"| {name} | {r.get('gathers', '-')} | {r['latency_ms']['128']} | {r['latency_ms']['512']} |")
    print(f"\ngather cost: {d['gather_cost_pct']}")


if __name__ == "__main__":
    for part in sys.argv[1:] or ["structured", "sparsity", "permutation", "l0", "gather"]:
        print(f"\n### {part}\n")
        globals()[part]()
