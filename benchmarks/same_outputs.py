"""Bit-identity check for refactors of ``sparsify``: compile the tests' tiny LLaMA (a
PyTorch folder and its ONNX export) with RIA 2:4 and SparseGPT 2:4 under every permute
mode, and record the sha256 of every resulting weight (plus the report with timings
and the work folder's path removed). Run before and after a change and compare the two JSON files.

``--smollm2`` runs the real model instead (one compile at a time, the protocol's
calibration: 64 x 512 tokens of the packaged WikiText-2 calibration text): RIA 2:4 and
SparseGPT 2:4 (sparsify, save-hf) and the structured benchmark models (prune-structured
at 27% and 50% of the MLP channels and one KV-group of three plus half the MLP, act
importance with the default refit; obs + global allocation at 27%). ``--root DIR`` runs
the compiles from another checkout of slimgraph (``git worktree add DIR COMMIT``), so an
older commit's outputs can be recorded with the same script.

Usage: python benchmarks/same_outputs.py --out /tmp/before.json [--work DIR] [--jobs 2]
       python benchmarks/same_outputs.py --smollm2 [--root DIR] --out /tmp/ref.json
       python benchmarks/same_outputs.py --compare /tmp/before.json /tmp/after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = [  # (name, sparsify options)
    ("ria", "score=ria,pattern=2:4"),
    ("ria-space", "score=ria,pattern=2:4,permute=space"),
    ("ria-gather-share", "score=ria,pattern=2:4,permute=gather,gather_share=true"),
    ("sparsegpt", "score=sparsegpt,pattern=2:4"),
    ("sparsegpt-mask-only", "score=sparsegpt,pattern=2:4,permute=mask-only"),
    ("sparsegpt-fold", "score=sparsegpt,pattern=2:4,permute=fold"),
    ("sparsegpt-space", "score=sparsegpt,pattern=2:4,permute=space"),
    ("sparsegpt-gather", "score=sparsegpt,pattern=2:4,permute=gather"),
    ("wanda-owl", "score=wanda,sparsity=0.5,schedule=owl"),
    ("ria-recon-fold", "score=ria,pattern=2:4,reconstruct=true,permute=fold"),
]
SMOLLM2_CASES = [  # (name, pipeline without the save pass)
    ("ria-2:4", "sparsify{score=ria,pattern=2:4}"),
    ("sparsegpt-2:4", "sparsify{score=sparsegpt,pattern=2:4}"),
    ("mlp27-act", "prune-structured{mlp=0.27,importance=act}"),
    ("mlp50-act", "prune-structured{mlp=0.5,importance=act}"),
    ("kv1of3+mlp50-act", "prune-structured{heads=0.33,mlp=0.5,importance=act}"),
    ("mlp27-obs-global", "prune-structured{mlp=0.27,importance=obs,allocation=global}"),
]
TIMING = {"seconds", "dense_pass_seconds"}


def build(work: Path) -> None:
    """hf/ (tiny LLaMA + tokenizer), onnx/model.onnx (+ tokenizer), calib.txt."""
    sys.path.insert(0, str(ROOT))
    from slimgraph.backends.onnx_export import export_onnx
    from tests import zoo

    model = zoo.build("llama")
    model.save_pretrained(work / "hf")
    zoo.tiny_tokenizer().save_pretrained(work / "hf")
    export_onnx(model, work / "onnx" / "model.onnx", vocab=zoo.VOCAB)
    zoo.tiny_tokenizer().save_pretrained(work / "onnx")
    (work / "calib.txt").write_text(zoo.tiny_text(3000, seed=1))


def _untimed(x):
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if k not in TIMING}
    if isinstance(x, list):
        return [_untimed(v) for v in x]
    return x


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def weight_hashes(out: Path, kind: str) -> dict[str, str]:
    if kind == "torch":
        from safetensors.numpy import load_file

        got = {}
        for f in sorted((out / "hf").glob("*.safetensors")):
            for name, arr in load_file(str(f)).items():
                got[name] = _sha(arr.tobytes()) + f" {arr.dtype} {list(arr.shape)}"
        return got
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(out / "model.onnx"))
    got = {t.name: _sha(numpy_helper.to_array(t).tobytes()) for t in model.graph.initializer}
    got["<graph nodes>"] = _sha("\n".join(f"{n.op_type} {list(n.input)} {list(n.output)}"
                                          for n in model.graph.node).encode())
    return got


def output_hashes(out: Path, kind: str, work: Path) -> dict:
    """The hashes of a compile's weights and of its first pass's report (untimed, the work
    folder's path replaced)."""
    report = json.loads((out / "report.json").read_text())["passes"][0]["report"]
    weights = weight_hashes(out, kind)
    return {"weights": weights,
            "weights_sha256": _sha(json.dumps(weights, sort_keys=True).encode()),
            "report_sha256": _sha(json.dumps(_untimed(report), sort_keys=True)
                                  .replace(str(work), "<work>").encode())}


def one(work: Path, kind: str, name: str, options: str) -> tuple[str, dict]:
    out = work / "out" / f"{kind}-{name}"
    src = work / "hf" if kind == "torch" else work / "onnx" / "model.onnx"
    save = "save-hf" if kind == "torch" else "export-onnx"
    cmd = [sys.executable, "-m", "slimgraph.cli", "compile", str(src), "-p",
           f"sparsify{{{options}}},{save}", "-o", str(out), "--overwrite",
           "--calib-file", str(work / "calib.txt"), "--calib-samples", "8",
           "--calib-seqlen", "32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return f"{kind}-{name}", {"error": proc.stderr[-2000:]}
    return f"{kind}-{name}", output_hashes(out, kind, work)


def one_smollm2(work: Path, root: Path, name: str, pipeline: str) -> tuple[str, dict]:
    """One SmolLM2 compile run from the checkout ``root``; the hashes of its weights."""
    out = work / "out" / f"smollm2-{name.replace(':', '')}"
    calib = ROOT / "slimgraph" / "data" / "wikitext2" / "calib.txt"
    cmd = [sys.executable, "-m", "slimgraph.cli", "compile", "smollm2-135m", "-p",
           f"{pipeline},save-hf", "-o", str(out), "--overwrite", "--calib-file", str(calib)]
    env = {**os.environ, "PYTHONPATH": str(root)}  # that checkout's slimgraph, not this one
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)
    if proc.returncode != 0:
        return f"smollm2-{name}", {"error": proc.stderr[-2000:]}
    return f"smollm2-{name}", output_hashes(out, "torch", work)


def compare(a: Path, b: Path) -> int:
    x, y = json.loads(a.read_text()), json.loads(b.read_text())
    bad = 0
    for case in sorted(set(x) | set(y)):
        p, q = x.get(case, {}), y.get(case, {})
        same_w = p.get("weights_sha256") == q.get("weights_sha256") and "error" not in p
        same_r = p.get("report_sha256") == q.get("report_sha256")
        bad += not (same_w and same_r)
        print(f"{case:28s} weights {'same' if same_w else 'DIFFER'}  "
              f"report {'same' if same_r else 'DIFFER'}  {p.get('weights_sha256', '-')[:16]}")
    print("all identical" if not bad else f"{bad} case(s) differ")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/same_outputs"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--compare", nargs=2, type=Path)
    ap.add_argument("--smollm2", action="store_true", help="the real model's cases")
    ap.add_argument("--root", type=Path, default=ROOT, help="the slimgraph checkout to run")
    ap.add_argument("--only", nargs="*", help="--smollm2: these cases only")
    args = ap.parse_args()
    if args.compare:
        return compare(*args.compare)
    if args.smollm2:
        results = {}
        for name, pipeline in SMOLLM2_CASES:
            if args.only and name not in args.only:
                continue
            case, results[case] = one_smollm2(args.work, args.root.resolve(), name, pipeline)
            print(case, results[case].get("weights_sha256", "ERROR " + results[case].get(
                "error", "")[-400:]), flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1, sort_keys=True))
        return 1 if any("error" in r for r in results.values()) else 0
    if not (args.work / "calib.txt").exists():
        args.work.mkdir(parents=True, exist_ok=True)
        build(args.work)
    jobs = [(args.work, kind, name, opts) for kind in ("torch", "onnx") for name, opts in CASES]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(pool.map(lambda j: one(*j), jobs))
    for case, r in results.items():
        print(case, r.get("weights_sha256", "ERROR " + r.get("error", "")[-400:]))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, sort_keys=True))
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
