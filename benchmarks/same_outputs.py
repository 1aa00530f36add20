"""Bit-identity check for refactors of ``sparsify``: compile the tests' tiny LLaMA (a
PyTorch folder and its ONNX export) with RIA 2:4 and SparseGPT 2:4 under every permute
mode, and record the sha256 of every resulting weight (plus the report with timings
and the work folder's path removed). Run before and after a change and compare the two JSON files.

Usage: python benchmarks/same_outputs.py --out /tmp/before.json [--work DIR] [--jobs 2]
       python benchmarks/same_outputs.py --compare /tmp/before.json /tmp/after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
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
    report = json.loads((out / "report.json").read_text())["passes"][0]["report"]
    weights = weight_hashes(out, kind)
    return f"{kind}-{name}", {
        "weights": weights,
        "weights_sha256": _sha(json.dumps(weights, sort_keys=True).encode()),
        "report_sha256": _sha(json.dumps(_untimed(report), sort_keys=True)
                              .replace(str(work), "<work>").encode())}


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
    args = ap.parse_args()
    if args.compare:
        return compare(*args.compare)
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
