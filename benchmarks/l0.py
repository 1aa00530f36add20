"""L0 structured pruning (Compresso) on SmolLM2, CPU-sized, against one-shot removal.

1. `slimgraph compile smollm2-135m -p "l0{target=T,steps=S,data=seed_tasks.jsonl,...},remove,
   save-hf,export-onnx"`: LoRA + gates trained on the 175 self-instruct seed tasks with the
   collaborative prompt, then physically slimmed. Training time from the pass report.
2. Perplexity (benchmark protocol, docs/benchmark-protocol.md, 40 x 512 of the WikiText-2 evaluation split) with
   and without the collaborative prompt; size on disk (safetensors, ONNX); ONNX Runtime
   CPU latency (2 threads, batch 1, 128 / 512 tokens, median of 20).
3. One-shot structured removal to the same parameter count: prune-structured removing that
   many parameters as MLP channels (KV-groups, a third of a layer's attention each, are too
   coarse to match L0's per-layer choice), with magnitude (l2) importance and, for
   reference, activation-aware (act) importance; the same measurements.

Usage: python benchmarks/l0.py [--steps 120] [--batch 4] [--target 0.2] [--windows 40]
Writes benchmarks/results/l0.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import protocol_split, run, write_result  # noqa: E402
from structured import latency  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEED_TASKS = ROOT.parent / "shared" / "data" / "instructions" / "seed_tasks.jsonl"


def disk_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 2**20, 1)


def measure(out: Path, eval_txt: Path, windows: int, runs: int, prompt: Path | None) -> dict:
    cli = [sys.executable, "-m", "slimgraph.cli", "eval", str(out), "--ppl", str(eval_txt),
           "--windows", str(windows), "--seqlen", "512", "--json", "--no-progress", "--threads", "2"]
    row = {"ppl": round(json.loads(run(cli)[0])["ppl"], 3)}
    if prompt is not None:
        row["ppl_with_prompt"] = round(json.loads(run(cli + ["--prompt", str(prompt)])[0])["ppl"], 3)
    row["safetensors_mb"] = disk_mb(out / "hf" / "model.safetensors")
    onnx = [p for p in out.iterdir() if p.name.startswith("model.onnx")]
    row["onnx_mb"] = round(sum(disk_mb(p) for p in onnx), 1)
    row["latency_ms"] = {str(s): round(latency(out / "model.onnx", s, runs), 1) for s in (128, 512)}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--target", type=float, default=0.2)
    ap.add_argument("--opts", default="", help="more l0 options, e.g. droprate_init=0.05,mask_lr=0.2")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--work", default="benchmarks/out/l0")
    ap.add_argument("--out", default="benchmarks/results/l0.json")
    ap.add_argument("--skip-train", action="store_true", help="reuse WORK/l0 from an earlier run")
    ap.add_argument("--no-oneshot", action="store_true", help="only the l0 row")
    ap.add_argument("--no-l0", action="store_true",
                    help="only the one-shot rows (sized from WORK/l0, which must exist)")
    ap.add_argument("--oneshot", nargs="+", default=["l2", "act"], choices=["l1", "l2", "act"],
                    help="importances of the one-shot rows (default l2 act)")
    ap.add_argument("--oneshot-calib", default=None,
                    help="calibration file of the one-shot act row (default: the WikiText "
                         "calibration split, WORK/calib.txt)")
    ap.add_argument("--latency-only", action="store_true",
                    help="re-measure ORT latency of the existing outputs (on a quiet machine)")
    args = ap.parse_args()
    if args.latency_only:
        result = json.loads(Path(args.out).read_text())
        for name, row in result["rows"].items():
            out = Path(args.work) / ("l0" if name == "l0" else f"oneshot-{name.split()[-1]}")
            row["latency_ms"] = {str(s): round(latency(out / "model.onnx", s, args.runs), 1)
                                 for s in (128, 512)}
            print(name, row["latency_ms"], flush=True)
        rows = result.pop("rows")
        result.pop("date"), result.pop("command")
        write_result(args.out, rows, **result)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    eval_txt, _ = protocol_split(work)
    cli = [sys.executable, "-m", "slimgraph.cli", "compile", "--overwrite", "smollm2-135m"]
    rows: dict[str, dict] = {}

    l0_out = work / "l0"
    pipe = (f"l0{{target={args.target},steps={args.steps},data={SEED_TASKS},batch={args.batch},"
            f"seqlen={args.seqlen}{',' + args.opts if args.opts else ''}}},remove,save-hf,export-onnx")
    secs = 0.0
    if not (args.skip_train or args.no_l0):
        _, secs = run(cli + ["-p", pipe, "-o", str(l0_out)])
    report = json.loads((l0_out / "report.json").read_text())
    l0 = report["passes"][0]["report"]
    removed = report["passes"][1]["report"]["removed_units"]
    # one-shot removal to the same size: MLP channels only (heads come in KV-groups of a
    # third of a layer's attention, too coarse to match per layer), as many as L0 removed
    removed_params = report["parameters"]["before"] - report["parameters"]["after"]
    mlp_ratio = round(removed_params / report["before"]["params"]["mlp"], 4)
    if not args.no_l0:
        rows["l0"] = {"pipeline": pipe, "compile_s": round(secs, 1), "train_s": l0["train_seconds"],
                      "steps": l0["steps"], "examples": l0["examples"],
                      "expected_sparsity": l0["expected_sparsity"], "removed_units": removed,
                      "params": report["parameters"]["after"],
                      **measure(l0_out, eval_txt, args.windows, args.runs, l0_out / "prompt.txt")}
        print("l0", json.dumps(rows["l0"]), flush=True)
    calib = args.oneshot_calib or str(work / "calib.txt")
    for imp in () if args.no_oneshot else args.oneshot:
        name = f"one-shot {imp}" + (f" (calib {Path(calib).name})" if imp == "act" and
                                    args.oneshot_calib else "")
        out = work / f"oneshot-{imp}"
        pipe = f"prune-structured{{mlp={mlp_ratio},importance={imp}}},save-hf,export-onnx"
        _, secs = run(cli + ["-p", pipe, "-o", str(out), "--calib-file", calib]
                      if imp == "act" else cli + ["-p", pipe, "-o", str(out)])
        rep = json.loads((out / "report.json").read_text())
        rows[name] = {"pipeline": pipe, "compile_s": round(secs, 1),
                      "params": rep["parameters"]["after"],
                      **measure(out, eval_txt, args.windows, args.runs, None)}
        print(name, json.dumps(rows[name]), flush=True)
    write_result(args.out, rows, dense_params=report["parameters"]["before"])
    print("| model | params | ppl | ppl with prompt | safetensors MB | ORT 128 ms | ORT 512 ms |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['params']:,} | {r['ppl']} | {r.get('ppl_with_prompt', '-')} | "
              f"{r['safetensors_mb']} | {r['latency_ms']['128']} | {r['latency_ms']['512']} |")


if __name__ == "__main__":
    main()
