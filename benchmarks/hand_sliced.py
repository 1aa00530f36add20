"""The issue's hand-sliced reference, reproduced: SmolLM2 with the first half of every
MLP's channels kept (no slimgraph pass), exported with plain `torch.onnx.export(...,
dynamo=True)` at its default opset and at opset 23, timed round-robin next to the same
dense exports and next to slimgraph's `mlp50` (benchmarks/out/mlp50, from
benchmarks/structured.py).

Usage: python benchmarks/hand_sliced.py [--runs 20] [--seqlen 128,512]
Writes benchmarks/results/hand_sliced.json and prints a table: median ms per model and
prefill length, and for each sliced model the ideal (its dense export x remaining
linear-MAC fraction) and how far over it the sliced model is.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import write_result  # noqa: E402


def hand_slice_mlp(model: torch.nn.Module, keep: int) -> torch.nn.Module:
    """A copy of a LLaMA-style model keeping MLP channels [0, keep) in every layer."""
    model = copy.deepcopy(model)
    for layer in model.model.layers:
        mlp = layer.mlp
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = torch.nn.Linear(old.in_features, keep, bias=False)
            new.weight.data = old.weight.data[:keep].clone()
            setattr(mlp, name, new)
        old = mlp.down_proj
        new = torch.nn.Linear(keep, old.out_features, bias=False)
        new.weight.data = old.weight.data[:, :keep].clone()
        mlp.down_proj = new
    model.config.intermediate_size = keep
    return model


def plain_export(model: torch.nn.Module, path: Path, opset: int | None) -> None:
    """`torch.onnx.export(dynamo=True)` with dynamic batch and sequence, nothing else."""
    from slimgraph.backends.onnx_export import LogitsOnly

    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    dims = {0: torch.export.Dim("batch", max=4096), 1: torch.export.Dim("seq", max=32768)}
    kwargs = {"opset_version": opset} if opset else {}
    prog = torch.onnx.export(LogitsOnly(model).eval(), (ids,), dynamo=True,
                             dynamic_shapes={"input_ids": dims}, input_names=["input_ids"],
                             output_names=["logits"], **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    prog.save(str(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seqlen", default="128,512")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="benchmarks/out/hand_sliced")
    ap.add_argument("--out", default="benchmarks/results/hand_sliced.json")
    args = ap.parse_args()
    from slimgraph.bench import load, measure
    from slimgraph.frontends.loading import load_model

    work = Path(args.work)
    files = {"dense-default": work / "dense-default.onnx", "hand50-default": work / "hand50-default.onnx",
             "dense-23": work / "dense-23.onnx", "hand50-23": work / "hand50-23.onnx"}
    if not all(p.exists() for p in files.values()):
        dense = load_model("smollm2-135m").model.eval()
        sliced = hand_slice_mlp(dense, dense.config.intermediate_size // 2)
        for name, path in files.items():
            print("exporting", name, flush=True)
            plain_export(dense if name.startswith("dense") else sliced, path,
                         None if name.endswith("default") else 23)
    slim = ROOT / "benchmarks/out/mlp50/model.onnx"
    if slim.exists():
        files["slimgraph-mlp50"] = slim
    names = list(files)
    models = [load(str(files[n]), backend="onnx", threads=args.threads) for n in names]
    seqlens = [int(s) for s in args.seqlen.split(",")]
    times = measure(models, seqlens, runs=args.runs, warmup=3)
    med = {n: {s: statistics.median(t) * 1000 for s, t in times[str(i)].items()}
           for i, n in enumerate(names)}
    macs = {n: m.linear_macs for n, m in zip(names, models)}
    base = {"hand50-default": "dense-default", "hand50-23": "dense-23", "slimgraph-mlp50": "dense-23"}
    rows = {}
    print("| model | linear MACs/token | " + " | ".join(f"{s} ms (ideal, over)" for s in seqlens) + " |")
    print("|---|---|" + "---|" * len(seqlens))
    for n in names:
        row = {"latency_ms": {}, "linear_macs": macs[n]}
        cells = []
        for s in map(str, seqlens):
            ms = med[n][s]
            row["latency_ms"][s] = round(ms, 1)
            if n in base:
                ideal = med[base[n]][s] * macs[n] / macs[base[n]]
                over = 100 * (ms / ideal - 1)
                row.setdefault("ideal_ms", {})[s] = round(ideal, 1)
                row.setdefault("over_pct", {})[s] = round(over, 1)
                cells.append(f"{ms:.1f} ({ideal:.1f}, {over:+.1f}%)")
            else:
                cells.append(f"{ms:.1f}")
        rows[n] = row
        print(f"| {n} | {macs[n]:,} | " + " | ".join(cells) + " |", flush=True)
    import onnxruntime

    write_result(Path(args.out), rows, runs=args.runs, threads=args.threads,
                 onnxruntime=onnxruntime.__version__, torch=torch.__version__)


if __name__ == "__main__":
    main()
