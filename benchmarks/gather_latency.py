"""ONNX Runtime latency cost of `permute=gather` (input gathers of permuted linears).

Compiles SmolLM2 with 2:4 masks, without and with `permute=gather`, exports them
to ONNX, and times them next to the dense export, round-robin (ONNX Runtime CPU, 2
threads, batch 1, prefill 128 and 512, median of `--runs` rounds after 3 warm-ups;
`interleaved_latency` from structured.py). The score is magnitude, so no calibration is
needed: the gathers (their number and sizes) are the same for every score. ORT's CPU
kernels are dense, so the masked models cost what the dense one does; the difference
between the two masked models is the cost of the gathers.

Also timed: `gather_share=true` (q/k/v share one permutation and one gather, gate/up
another), and, made from the `gather` export, the same model with its gathers written as
`Gather(x, pi, axis=-1)` (int64 indices: the form slimgraph wrote before) -- same
permutations and weights, what the `GatherElements` form is worth.

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
from structured import interleaved_latency  # noqa: E402

CONFIGS = {
    "2:4 no permutation": "sparsify{score=magnitude,pattern=2:4},export-onnx",
    "2:4 permute=gather": "sparsify{score=magnitude,pattern=2:4,permute=gather},export-onnx",
    "2:4 permute=gather share": "sparsify{score=magnitude,pattern=2:4,permute=gather,"
                                "gather_share=true},export-onnx",
}
UNSHARED = "2:4 permute=gather, as last-axis Gather nodes (the earlier form)"


def unshared_gathers(src: Path, dst: Path) -> int:
    """Rewrite ``src``'s ``GatherElements`` input gathers as one last-axis ``Gather`` (int64
    indices) per reading MatMul, saved to ``dst``; returns how many gathers the file has."""
    import numpy as np
    import onnx_ir as ir

    model = ir.load(str(src))
    graph = model.graph
    made = 0
    for node in list(graph):
        if node.op_type != "GatherElements":
            continue
        x, expand = node.inputs[0], node.inputs[1].producer()
        perm = expand.inputs[0].const_value.numpy().astype(np.int64)
        for k, (reader, i) in enumerate(list(node.outputs[0].uses())):
            name = f"{node.name}_unshared_{k}"
            index = ir.Value(name=name + "_index", shape=ir.Shape(perm.shape),
                             type=ir.TensorType(ir.DataType.INT64),
                             const_value=ir.Tensor(perm, name=name + "_index"))
            graph.register_initializer(index)
            gather = ir.node("Gather", [x, index], {"axis": -1}, name=name)
            graph.insert_before(reader, [gather])
            reader.replace_input_with(i, gather.outputs[0])
            made += 1
    ir.save(model, str(dst))
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--work", default="benchmarks/out/gather")
    ap.add_argument("--dense", default="benchmarks/out/dense/model.onnx",
                    help="dense ONNX export (benchmarks/structured.py --only dense writes it)")
    ap.add_argument("--out", default="benchmarks/results/gather_latency.json")
    ap.add_argument("--latency-only", action="store_true", help="reuse the compiled models")
    args = ap.parse_args()
    import onnx

    work = Path(args.work)
    rows = {}
    for name, pipe in CONFIGS.items():
        out = work / name.split()[-1].replace("=", "-").replace(":", "-")
        if not args.latency_only:
            run([sys.executable, "-m", "slimgraph.cli", "compile", "--overwrite", "smollm2-135m", "-p", pipe,
                 "-o", str(out)])
        report = json.loads((out / "report.json").read_text())
        perm = report["passes"][0]["report"].get("permutation", {})
        realised = [r.get("permutation", {}).get("realised")
                    for r in report["passes"][0]["report"]["layers"]]
        nodes = onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
        rows[name] = {"pipeline": pipe, "onnx": str(out / "model.onnx"),
                      "linears_permuted": perm.get("layers_permuted", 0),
                      "linears_gathered": realised.count("gather"),
                      "linears_folded": realised.count("fold"),
                      "gather_nodes": sum(n.op_type == "GatherElements" for n in nodes)}
    g = rows["2:4 permute=gather"]
    old = work / "unshared" / "model.onnx"
    old.parent.mkdir(parents=True, exist_ok=True)
    rows[UNSHARED] = {"onnx": str(old), "gather_nodes": unshared_gathers(Path(g["onnx"]), old)}
    rows["dense"] = {"onnx": args.dense}
    lat = interleaved_latency({n: Path(r["onnx"]) for n, r in rows.items()}, runs=args.runs)
    for name, row in rows.items():
        row["latency_ms"] = lat[name]
        print(name, row["latency_ms"], flush=True)
    base = rows["2:4 no permutation"]["latency_ms"]

    def cost(row: str) -> dict:
        ms = rows[row]["latency_ms"]
        return {s: round(100 * (ms[s] / base[s] - 1), 1) for s in base}

    costs = {name: cost(name) for name in ("2:4 permute=gather", "2:4 permute=gather share",
                                           UNSHARED)}
    write_result(args.out, rows, gather_cost_pct=costs)
    print("gather cost (% over the same masks without gathers):", costs)


if __name__ == "__main__":
    main()
