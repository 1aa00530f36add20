"""Post-training sparsity on SmolLM2: the quality table of the benchmark protocol (docs/benchmark-protocol.md).

For each method (magnitude, Wanda, RIA; each with and without SparseGPT-style
reconstruction; SparseGPT's own saliency; RIA 2:4 with each channel-permutation mode) at
50% unstructured and/or 2:4: prune with 64 x 512 calibration windows drawn from the
calibration split (seed 0), then perplexity over 40 x 512 tokens of the evaluation
split. Each configuration runs in a fresh process and reports its own peak RSS; the
"dense" row times one dense forward pass over the calibration set, the reference time
of the same run.

Usage: python benchmarks/sparsity.py [--only NAME ...] [--windows 40] [--samples 64]
Writes benchmarks/results/sparsity.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import protocol_split, write_result  # noqa: E402


CONFIGS = {}
for score in ("magnitude", "wanda", "ria"):
    for rec in (False, True):
        suffix = ",reconstruct=true" if rec else ""
        tag = "+rec" if rec else ""
        scope = ",scope=row" if score == "wanda" else ""
        CONFIGS[f"{score}{tag} 50%"] = f"sparsify{{score={score},sparsity=0.5{scope}{suffix}}}"
        CONFIGS[f"{score}{tag} 2:4"] = f"sparsify{{score={score},pattern=2:4{suffix}}}"
CONFIGS["sparsegpt 50%"] = "sparsify{score=sparsegpt,sparsity=0.5}"
CONFIGS["sparsegpt 2:4"] = "sparsify{score=sparsegpt,pattern=2:4}"
for mode in ("mask-only", "fold", "space", "gather"):  # issue 5: channel permutation
    CONFIGS[f"ria 2:4 permute={mode}"] = f"sparsify{{score=ria,pattern=2:4,permute={mode}}}"
CONFIGS["ria+rec 2:4 permute=fold"] = "sparsify{score=ria,pattern=2:4,reconstruct=true,permute=fold}"
CONFIGS["ria 2:4 permute=gather share"] = \
    "sparsify{score=ria,pattern=2:4,permute=gather,gather_share=true}"
# deployable permutation + reconstruction (issue 5: the best deployable 2:4 model)
CONFIGS["ria+rec 2:4 permute=gather"] = \
    "sparsify{score=ria,pattern=2:4,reconstruct=true,permute=gather}"
CONFIGS["sparsegpt 2:4 permute=gather"] = "sparsify{score=sparsegpt,pattern=2:4,permute=gather}"
CONFIGS["sparsegpt 2:4 permute=gather share"] = \
    "sparsify{score=sparsegpt,pattern=2:4,permute=gather,gather_share=true}"
CONFIGS["sparsegpt 2:4 permute=fold"] = "sparsify{score=sparsegpt,pattern=2:4,permute=fold}"
# per-layer schedule: OWL (outlier-weighted layerwise sparsity, M=5, lambda=0.08)
CONFIGS["wanda 50% owl"] = "sparsify{score=wanda,sparsity=0.5,scope=row,schedule=owl}"
CONFIGS["ria 50% owl"] = "sparsify{score=ria,sparsity=0.5,schedule=owl}"
# compile --offload: one decoder block in memory at a time (the RSS bound of issue 4)
OFFLOADED = {"wanda 2:4 offload": "wanda 2:4", "ria 2:4 offload": "ria 2:4",
             "ria+rec 2:4 offload": "ria+rec 2:4"}
for _name, _base in OFFLOADED.items():
    CONFIGS[_name] = CONFIGS[_base]
# the smallest working set: offloaded, one calibration window per forward
OFFLOADED["ria 2:4 offload batch=1"] = "ria 2:4"
CONFIGS["ria 2:4 offload batch=1"] = "sparsify{score=ria,pattern=2:4,batch=1}"


def split(work: Path) -> tuple[Path, Path]:
    return protocol_split(work)


def dense_forward(work: Path, samples: int) -> dict:
    """One dense forward pass over the calibration windows (batches of 8, 2 threads)."""
    import torch

    from slimgraph.frontends.loading import load_model
    from slimgraph.sparsity.calibration import calibration_tokens, sample_windows

    torch.set_num_threads(2)
    loaded = load_model("smollm2-135m", verbose=False)
    windows = sample_windows(calibration_tokens(loaded.tokenizer, work / "calib.txt"), samples,
                             512, 0)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, samples, 8):
            loaded.model(input_ids=windows[i : i + 8], use_cache=False)
    return {"name": "dense", "dense_forward_calib_s": round(time.perf_counter() - t0, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def permutation_stats(report: dict, out: Path) -> dict:
    """Per-layer permutation time, importance kept by the permuted mask relative to the
    unpermuted one, and the share of groups of 4 (along the reduction axis, in stored
    order) that hold more than 2 non-zeros in the saved checkpoint."""
    from safetensors.torch import load_file

    infos = [r["permutation"] for r in report["layers"] if "seconds" in r.get("permutation", {})]
    secs = [i["seconds"] for i in infos]
    gain = sum(i["kept_after"] for i in infos) / max(sum(i["kept_before"] for i in infos), 1e-30)
    bad = total = 0
    for f in (out / "hf").glob("*.safetensors"):
        for key, w in load_file(str(f)).items():
            if w.dim() == 2 and key.rsplit(".", 2)[-2].endswith("_proj") and w.shape[1] % 4 == 0:
                nz = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
                bad += int((nz > 2).sum())
                total += nz.numel()
    return {"perm_layer_s_mean": round(sum(secs) / max(len(secs), 1), 3),
            "perm_layer_s_max": round(max(secs, default=0.0), 3),
            "importance_kept_gain": round(gain, 4),
            "groups_violating_2of4_stored": round(bad / max(total, 1), 4)}


def child(name: str, work: Path, samples: int) -> dict:
    import torch

    from slimgraph.compile import compile_model

    if name == "dense":
        return dense_forward(work, samples)
    torch.set_num_threads(2)
    calib = work / "calib.txt"
    out = work / name.replace(" ", "_").replace(":", "-").replace("%", "").replace("=", "-")
    report = compile_model("smollm2-135m", f"{CONFIGS[name]},save-hf", out,
                           calib={"file": str(calib), "samples": samples, "seqlen": 512},
                           offload=name in OFFLOADED, overwrite=True)
    p = report["passes"][0]
    perm = p["report"].get("permutation")
    extra = {"permutation_s": perm["seconds"] + perm.get("space", {}).get("seconds", 0),
             "layers_permuted": perm["layers_permuted"], **permutation_stats(p["report"], out)} \
        if perm else {}
    return {"name": name, "pipeline": CONFIGS[name], "prune_s": round(p["seconds"], 1),
            **extra, "sparsity": round(p["report"]["sparsity"], 4),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "out": str(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", nargs="*", default=["dense", *CONFIGS])
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--work", default="benchmarks/out/sparsity")
    ap.add_argument("--out", default="benchmarks/results/sparsity.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    if args.child:
        print(json.dumps(child(args.child, work, args.samples)))
        return
    work.mkdir(parents=True, exist_ok=True)
    ev, _ = split(work)
    path = Path(args.out)
    rows = json.loads(path.read_text())["rows"] if path.exists() else {}
    cli = [sys.executable, "-m", "slimgraph.cli"]
    for name in args.only:
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--work", str(work),
                               "--samples", str(args.samples)], capture_output=True, text=True)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
            rows[name] = {"name": name, "error": tail[0]}
            print(f"{name} failed: {tail[0]}", flush=True)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        target = row.pop("out", "smollm2-135m")
        t0 = time.perf_counter()
        proc = subprocess.run(cli + ["eval", target, "--ppl", str(ev), "--windows", str(args.windows),
                                     "--json", "--no-progress", "--threads", "2"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
            rows[name] = {**row, "error": "eval: " + tail[0]}
            print(f"eval of {name} failed: {tail[0]}", flush=True)
            continue
        row["ppl"] = round(json.loads(proc.stdout)["ppl"], 2)
        row["eval_s"] = round(time.perf_counter() - t0, 1)
        if name != "dense":
            shutil.rmtree(target, ignore_errors=True)
        rows[name] = row
        print(json.dumps(row), flush=True)
        write_result(path, rows)
    print("| method | ppl | prune wall s | peak RSS MB |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | |")
            continue
        print(f"| {name} | {r['ppl']} | {r.get('prune_s', r.get('dense_forward_calib_s'))} "
              f"| {r.get('peak_rss_mb', '-')} |")


if __name__ == "__main__":
    main()
