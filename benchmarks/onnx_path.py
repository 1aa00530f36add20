"""The ONNX path on SmolLM2 next to the PyTorch path (issue 7's benchmark).

Input: SmolLM2 exported to ONNX by `slimgraph compile smollm2-135m -p export-onnx`
(dynamic batch and sequence, opset 23). Each pipeline runs twice, once on that ONNX file
(the ONNX path: no PyTorch model) and once on `smollm2-135m` (the PyTorch path, which
re-exports at the end):

- kv1of3+mlp50: `prune-structured{heads=0.33,mlp=0.5},export-onnx` (l2 importance);
- hidden25: `prune-structured{hidden=0.25},export-onnx` (a quarter of the residual
  channels by l2 magnitude, no fine-tuning: the point is that both routes give the same
  model, norm corrections included, not a usable perplexity);
- ria 2:4: `sparsify{score=ria,pattern=2:4},export-onnx` (64 x 512 calibration windows
  of the protocol's calibration split; both paths calibrate block by block, the ONNX
  path through ONNX Runtime with one segment model per layer).

For each: compile wall time and peak RSS (the compile process's own, from wait4),
perplexity of OUT/model.onnx with `slimgraph eval` (ONNX Runtime, 40 x 512 tokens of the
evaluation split), and ONNX Runtime CPU latency (2 threads, prefill 128 and 512, median
of 20 runs after 3 warm-up runs).

Usage: python benchmarks/onnx_path.py [--only NAME ...] [--windows 40] [--runs 20]
Writes benchmarks/results/onnx_path.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import protocol_split, run, run_rss, write_result  # noqa: E402
from structured import interleaved_latency, latency  # noqa: E402

PIPELINES = {
    "kv1of3+mlp50": "prune-structured{heads=0.33,mlp=0.5},export-onnx",
    "ria 2:4": "sparsify{score=ria,pattern=2:4},export-onnx",
    "hidden25": "prune-structured{hidden=0.25},export-onnx",
}


def _outdir(work: Path, name: str) -> Path:
    return work / name.replace(" ", "_").replace(":", "of")


def ort_latency(out: Path, runs: int) -> dict[str, float]:
    return {str(s): round(latency(out / "model.onnx", s, runs), 1) for s in (128, 512)}


def mask_agreement(a: Path, b: Path) -> dict[str, int]:
    """Zero patterns of the 2-D float initializers two files share by name and at least
    one of them has pruned (>= 10% zeros): tensors and entries compared, and entries
    whose zero-ness differs."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    def weights(path: Path) -> dict[str, np.ndarray]:
        model = onnx.load(str(path))
        return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
                if len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT}

    wa, wb = weights(a), weights(b)
    shared = [n for n in wa if n in wb and wa[n].shape == wb[n].shape  # the pruned ones
              and max((wa[n] == 0).mean(), (wb[n] == 0).mean()) >= 0.1]
    return {"tensors": len(shared), "entries": int(sum(wa[n].size for n in shared)),
            "differ": int(sum(((wa[n] == 0) != (wb[n] == 0)).sum() for n in shared))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--only", nargs="*", default=[f"{p} {n}" for n in PIPELINES
                                                   for p in ("onnx", "torch")])
    ap.add_argument("--work", default="benchmarks/out/onnx_path")
    ap.add_argument("--out", default="benchmarks/results/onnx_path.json")
    ap.add_argument("--latency-only", action="store_true",
                    help="re-measure latency of existing OUTDIRs (keeps the other figures)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    eval_txt, calib_txt = protocol_split(work)
    cli = [sys.executable, "-m", "slimgraph.cli"]
    path = Path(args.out)
    rows = json.loads(path.read_text())["rows"] if path.exists() else {}

    dense = work / "dense"
    if not (dense / "model.onnx").exists():
        _, secs, rss = run_rss(cli + ["compile", "--overwrite", "smollm2-135m", "-p", "export-onnx", "-o", str(dense)])
        rows["dense export"] = {"compile_s": round(secs, 1), "peak_rss_mb": rss}
    if args.latency_only:  # every file round-robin, the dense input included
        files = {n: _outdir(work, n) / "model.onnx" for n in args.only}
        lat = interleaved_latency({"dense": dense / "model.onnx", **files}, runs=args.runs)
        rows.setdefault("dense export", {})["latency_ms"] = lat.pop("dense")
        for name, ms in lat.items():
            rows[name]["latency_ms"] = ms
            print(name, ms, flush=True)
    for name in [] if args.latency_only else args.only:
        route, pipe = name.split(" ", 1)
        out = _outdir(work, name)
        model = str(dense / "model.onnx") if route == "onnx" else "smollm2-135m"
        _, secs, rss = run_rss(cli + ["compile", "--overwrite", model, "-p", PIPELINES[pipe], "-o", str(out),
                                      "--calib-file", str(calib_txt)])
        report = json.loads((out / "report.json").read_text())
        ev, _ = run(cli + ["eval", str(out / "model.onnx"), "--ppl", str(eval_txt), "--windows",
                           str(args.windows), "--seqlen", "512", "--json"])
        rows[name] = {"input": model, "pipeline": PIPELINES[pipe], "compile_s": round(secs, 1),
                      "peak_rss_mb": rss, "params": report["parameters"]["after"],
                      "ppl": round(json.loads(ev)["ppl"], 3), "latency_ms": ort_latency(out, args.runs)}
        print(name, json.dumps(rows[name]), flush=True)
    routes = [_outdir(work, f"{r} ria 2:4") / "model.onnx" for r in ("onnx", "torch")]
    if not args.latency_only and all(p.exists() for p in routes):
        rows["ria 2:4 masks, onnx vs torch"] = mask_agreement(*routes)
        print("ria 2:4 masks, onnx vs torch", rows["ria 2:4 masks, onnx vs torch"], flush=True)
    write_result(path, rows)
    print("| route | pipeline | compile s | peak RSS MB | params | ppl | ORT 128 ms | ORT 512 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        if "ppl" not in r or "pipeline" not in r:
            continue
        route, pipe = name.split(" ", 1)
        print(f"| {route} | {pipe} | {r['compile_s']} | {r['peak_rss_mb']} | {r['params']:,} | "
              f"{r['ppl']} | {r['latency_ms']['128']} | {r['latency_ms']['512']} |")


if __name__ == "__main__":
    main()
