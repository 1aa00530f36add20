"""ONNX Runtime CPU attention kernels at SmolLM2's shape: which one is cheapest?

One attention layer (9 query heads, 3 KV heads, head_dim 64, batch 1, prefill S tokens)
as a one-node model, three ways: opset-23 ``Attention`` with ``is_causal=1`` (what
``export-onnx`` writes, up to the mask form), opset-23 ``Attention`` with an additive
causal mask input, and ``com.microsoft.GroupQueryAttention`` (ONNX Runtime's contrib op).
Outputs are compared (causal vs GQA) before timing; median of ``--runs`` runs after 3
warm-ups, 2 intra-op threads; the sessions take turns in blocks (3 rounds, each running
every session ``runs / 3`` times after its own warm-up), not run by run: a session run
right after another one finds that one's thread pool still spin-waiting on the cores,
which doubled these few-millisecond times.

Usage: python benchmarks/attention_kernels.py [--seq 512] [--runs 30]
Writes benchmarks/results/attention_kernels.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def _session(model) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _models(seq: int) -> dict:
    f = TensorProto.FLOAT
    qkv = [helper.make_tensor_value_info("q", f, [1, seq, HEADS * HEAD_DIM]),
           helper.make_tensor_value_info("k", f, [1, seq, KV_HEADS * HEAD_DIM]),
           helper.make_tensor_value_info("v", f, [1, seq, KV_HEADS * HEAD_DIM])]
    y = [helper.make_tensor_value_info("y", f, None)]
    heads = {"q_num_heads": HEADS, "kv_num_heads": KV_HEADS}

    def onnx23(node, extra_inputs=()):
        graph = helper.make_graph([node], "attention", qkv + list(extra_inputs), y)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])

    causal = onnx23(helper.make_node("Attention", ["q", "k", "v"], ["y"], is_causal=1, **heads))
    masked = onnx23(helper.make_node("Attention", ["q", "k", "v", "mask"], ["y"], **heads),
                    [helper.make_tensor_value_info("mask", f, [seq, seq])])
    gqa_node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "", "", "seqlens_k", "total_len"],
                                ["y", "present_k", "present_v"], domain="com.microsoft",
                                num_heads=HEADS, kv_num_heads=KV_HEADS)
    gqa_graph = helper.make_graph(
        [gqa_node], "gqa",
        qkv + [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
               helper.make_tensor_value_info("total_len", TensorProto.INT32, [])],
        y + [helper.make_tensor_value_info(n, f, None) for n in ("present_k", "present_v")])
    gqa = helper.make_model(gqa_graph, opset_imports=[helper.make_opsetid("", 21),
                                                      helper.make_opsetid("com.microsoft", 1)])
    return {"Attention is_causal (opset 23)": causal, "Attention + mask (opset 23)": masked,
            "GroupQueryAttention (com.microsoft)": gqa}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", default="benchmarks/results/attention_kernels.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    s = args.seq
    base = {"q": rng.standard_normal((1, s, HEADS * HEAD_DIM), dtype=np.float32),
            "k": rng.standard_normal((1, s, KV_HEADS * HEAD_DIM), dtype=np.float32),
            "v": rng.standard_normal((1, s, KV_HEADS * HEAD_DIM), dtype=np.float32)}
    feeds = [base, {**base, "mask": np.triu(np.full((s, s), -np.inf, dtype=np.float32), 1)},
             {**base, "seqlens_k": np.array([s - 1], np.int32), "total_len": np.array(s, np.int32)}]
    names, sessions = zip(*((n, _session(m)) for n, m in _models(s).items()), strict=True)
    outs = [sess.run(None, fd)[0] for sess, fd in zip(sessions, feeds, strict=True)]
    diff = max(float(np.abs(o - outs[0]).max()) for o in outs[1:])
    if diff > 1e-4:
        raise SystemExit(f"kernels disagree: max |diff| {diff}")
    times: list[list[float]] = [[] for _ in names]
    for _ in range(3):  # rounds: drift hits every kernel alike
        for i, (sess, fd) in enumerate(zip(sessions, feeds, strict=True)):
            for _ in range(3):
                sess.run(None, fd)
            for _ in range(max(1, args.runs // 3)):
                t = time.perf_counter()
                sess.run(None, fd)
                times[i].append(time.perf_counter() - t)
    rows = {n: {"median_ms": round(float(np.median(t)) * 1000, 3)} for n, t in zip(names, times, strict=True)}
    write_result(args.out, rows, seq=s, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                 onnxruntime=ort.__version__, max_abs_diff=diff)
    for n, r in rows.items():
        print(f"{n:40s} {r['median_ms']:8.3f} ms")


if __name__ == "__main__":
    main()
