"""The ONNX path on a model over 2 GB (external data): issue 7, item 2.

No real model of that size can be downloaded here, so this builds one with the real
architecture and random weights: a LLaMA with GQA (vocab 49152 so that SmolLM2's
tokenizer fits, hidden 2048, 14 layers, 16 query heads, 4 KV-groups, MLP 5632), about
770 M parameters = 3.1 GB in fp32. It is exported with `export-onnx`'s exporter
(dynamo, dynamic axes, opset 23) to `model.onnx` + `model.onnx.data`, SmolLM2's
tokenizer is put beside it, and then, each in its own process:

- `compile model.onnx -p "prune-structured{heads=0.25,mlp=0.5,hidden=0.25},export-onnx"`;
- `compile model.onnx -p "sparsify{score=wanda,pattern=2:4},export-onnx"` with 8 x 256
  calibration windows (block-sequential through ONNX Runtime);

For each: wall time, peak RSS, the output's files and sizes, `check-sparsity` for the
2:4 one, and one ONNX Runtime run of the output (finite logits of the right shape). The
input's files are hashed before and after: they must not change.

Usage: python benchmarks/onnx_large.py [--work benchmarks/out/onnx_large] [--only NAME ...]
Writes benchmarks/results/onnx_large.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import protocol_split, run, run_rss, write_result  # noqa: E402

PIPELINES = {
    "structured": "prune-structured{heads=0.25,mlp=0.5,hidden=0.25},export-onnx",
    "wanda 2:4": "sparsify{score=wanda,pattern=2:4},export-onnx",
}


def _digest(directory: Path) -> dict[str, str]:
    out = {}
    for p in sorted(directory.iterdir()):
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
            out[p.name] = h.hexdigest()
    return out


def build(src: Path) -> dict:
    import torch
    import transformers as tf

    from slimgraph.backends.onnx_export import export_onnx
    from slimgraph.frontends.loading import load_model

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=5632,
                         num_hidden_layers=14, num_attention_heads=16, num_key_value_heads=4,
                         tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(cfg).eval()
    params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    export_onnx(model, src / "model.onnx", vocab=cfg.vocab_size)
    secs = time.perf_counter() - t0
    load_model("smollm2-135m").tokenizer.save_pretrained(src)
    return {"params": params, "export_s": round(secs, 1),
            "files": {p.name: p.stat().st_size for p in sorted(src.iterdir()) if p.is_file()}}


def ort_check(path: Path) -> dict:
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input_ids": np.arange(16, dtype=np.int64).reshape(2, 8)})[0]
    return {"shape": list(logits.shape), "finite": bool(np.isfinite(logits).all())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", default="benchmarks/out/onnx_large")
    ap.add_argument("--out", default="benchmarks/results/onnx_large.json")
    ap.add_argument("--only", nargs="*", default=list(PIPELINES), help="pipelines to run "
                    "(the other rows of an existing result file are kept)")
    args = ap.parse_args()
    work = Path(args.work)
    src = work / "dense"
    path = Path(args.out)
    rows: dict = json.loads(path.read_text())["rows"] if path.exists() else {}
    if not (src / "model.onnx.data").exists():
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        rows["dense"] = build(src)
        print("dense", json.dumps(rows["dense"]), flush=True)
    before = _digest(src)
    _, calib_txt = protocol_split(work)
    cli = [sys.executable, "-m", "slimgraph.cli"]
    for name in args.only:
        pipe = PIPELINES[name]
        out = work / name.replace(" ", "_").replace(":", "of")
        shutil.rmtree(out, ignore_errors=True)
        _, secs, rss = run_rss(cli + ["compile", "--overwrite", str(src / "model.onnx"), "-p", pipe, "-o",
                                      str(out), "--calib-file", str(calib_txt),
                                      "--calib-samples", "8", "--calib-seqlen", "256"])
        report = json.loads((out / "report.json").read_text())
        row = {"pipeline": pipe, "compile_s": round(secs, 1), "peak_rss_mb": rss,
               "params": report["parameters"],
               "files": {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()},
               "ort": ort_check(out / "model.onnx")}
        if "sparsify" in pipe:
            check, _ = run(cli + ["check-sparsity", str(out / "model.onnx"), "--pattern", "2:4",
                                  "--json"])
            rep = json.loads(check)
            row["check_sparsity"] = {"ok": rep["ok"], **rep["reports"][0]["summary"]}
            row["calibration"] = report["passes"][0]["report"]["calibration"]
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    rows["input_unchanged"] = _digest(src) == before
    write_result(path, rows)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
