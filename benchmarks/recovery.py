"""Recovery after structured removal on SmolLM2: no update / reconstruct / reconstruct +
obs + global allocation, at three sizes (issue 18).

Sizes: 113.0M parameters (27% of the MLP channels: L0's size), half the MLP channels, one
KV-group of three plus half the MLP. Rows:
- ``none``: activation-aware selection, no weight update (today's `importance=act`, 16
  calibration windows, scores from one dense pass);
- ``rec``: `importance=act` with reconstruction (the default with calibration data):
  block-sequential, 64 x 512 calibration tokens, o_proj / down_proj kept columns refitted;
- ``rec-obs``: `importance=obs` (SlimGPT's greedy OBS selection, the same share of units
  in every layer), with reconstruction;
- ``rec-obs-global``: `importance=obs,allocation=global` (SlimGPT's greedy OBS selection,
  units ranked across layers on standardised scores), with reconstruction.

Each row: `slimgraph compile` (timed; the prune-structured pass's own time from the
report), `slimgraph eval` (benchmark protocol, docs/benchmark-protocol.md: 40 x 512 tokens of the WikiText-2 eval
split). Usage: python benchmarks/recovery.py [--windows 40] [--only NAME ...]
Writes benchmarks/results/recovery.json and prints a Markdown table.

``--options K=V,...`` appends prune-structured options to every row run (say
``damp=0.1`` or ``samples=256``); the rows are stored under ``NAME+K=V,...``.

``--in-sample`` calibrates on the evaluation windows' own text (the first ``--windows`` x
512 tokens of the evaluation split) instead of the calibration split, and writes
benchmarks/results/recovery_in_sample.json: the refit then fits the very tokens it is
scored on, so its perplexity bounds from below what the same selection and least-squares
refit can reach with any calibration text of that size (an in-sample fit, not a result
to use).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import protocol_split, run, write_result  # noqa: E402

SIZES = {"mlp27": "mlp=0.27", "mlp50": "mlp=0.5", "kv1of3+mlp50": "heads=0.33,mlp=0.5"}
METHODS = {"none": "importance=act,reconstruct=false", "rec": "importance=act",
           "rec-obs": "importance=obs", "rec-obs-global": "importance=obs,allocation=global"}
CONFIGS = {f"{s}-{m}": f"prune-structured{{{sv},{mv}}},save-hf"
           for s, sv in SIZES.items() for m, mv in METHODS.items()}


def evaluation_windows_text(eval_txt: Path, windows: int, dest: Path) -> Path:
    """The characters of ``eval_txt`` that hold its first ``windows`` x 512 tokens (the
    windows `slimgraph eval` scores), written to ``dest``."""
    from slimgraph.frontends.loading import load_model

    tok = load_model("smollm2-135m").tokenizer
    text = eval_txt.read_text()
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    end = enc["offset_mapping"][windows * 512 - 1][1]
    dest.write_text(text[:end])
    return dest


def order(name: str) -> tuple[int, str]:
    """Rows in the table's order: the standard rows first, variants after their row."""
    names = list(CONFIGS)
    base = max((n for n in names if name == n or name.startswith(n + "+")), key=len, default=None)
    return (names.index(base) if base else len(names)), name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--only", nargs="*", default=list(CONFIGS))
    ap.add_argument("--work", default="benchmarks/out/recovery")
    ap.add_argument("--out", default="")
    ap.add_argument("--options", default="", help="extra prune-structured options, K=V,...")
    ap.add_argument("--in-sample", action="store_true",
                    help="calibrate on the evaluation windows' own text (a lower bound)")
    args = ap.parse_args()
    args.out = args.out or ("benchmarks/results/recovery_in_sample.json" if args.in_sample
                            else "benchmarks/results/recovery.json")
    work = Path(args.work) / ("in-sample" if args.in_sample else "")
    eval_txt, calib_txt = protocol_split(work)
    if args.in_sample:
        calib_txt = evaluation_windows_text(eval_txt, args.windows, work / "eval-windows.txt")
    cli = [sys.executable, "-m", "slimgraph.cli"]
    path = Path(args.out)
    rows = json.loads(path.read_text())["rows"] if path.exists() else {}
    configs = {base: CONFIGS[base] for base in args.only}
    if args.options:  # each row's pipeline with the extra options, under NAME+OPTIONS
        configs = {f"{base}+{args.options}": pipe.replace("},save-hf", f",{args.options}}},save-hf")
                   for base, pipe in configs.items()}
    for name in configs:
        out = work / name
        _, secs = run(cli + ["compile", "--overwrite", "smollm2-135m", "-p", configs[name],
                             "-o", str(out), "--calib-file", str(calib_txt)])
        report = json.loads((out / "report.json").read_text())
        prune = next(p for p in report["passes"] if p["name"] == "prune-structured")
        ev, _ = run(cli + ["eval", str(out), "--ppl", str(eval_txt), "--windows",
                           str(args.windows), "--seqlen", "512", "--json"])
        rec = prune["report"].get("reconstruct", {})
        rows[name] = {
            "pipeline": configs[name], "params": report["parameters"]["after"],
            "ppl": round(json.loads(ev)["ppl"], 3), "compile_s": round(secs, 1),
            "prune_s": round(prune.get("seconds", float("nan")), 1),
            "refitted": len(rec.get("refitted", [])),
            "calib_samples": rec.get("calibration", {}).get("samples", 16),
        }
        print(name, json.dumps(rows[name]), flush=True)
        # re-read first: rows written meanwhile by another run of this script are kept
        rows = {**(json.loads(path.read_text())["rows"] if path.exists() else {}),
                name: rows[name]}
        write_result(path, {n: rows[n] for n in sorted(rows, key=order)})
    rows = {n: rows[n] for n in sorted(rows, key=order)}
    print("| size | method | params | ppl | prune s | linears refitted |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        size = max((s for s in SIZES if name.startswith(s + "-")), key=len)
        print(f"| {size} | {name[len(size) + 1:]} | {r['params']:,} | {r['ppl']} | {r['prune_s']} | "
              f"{r['refitted']} |")


if __name__ == "__main__":
    main()
