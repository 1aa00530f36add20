"""Data-free calibration text (``--calib-file self``) on SmolLM2-135M: how long generating
``--samples`` sequences of ``--seqlen`` tokens takes (batches of 64 with a KV cache,
bfloat16 where the CPU has it), next to a reference measured in the same run: the dense
forward pass over the same number of tokens (the protocol's 512-token windows).

Usage: python benchmarks/self_calibration.py [--samples 64] [--seqlen 512] [--threads 2]
Writes benchmarks/results/self_calibration.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from slimgraph.frontends.loading import load_model
    from slimgraph.sparsity.calibration import SELF_BATCH, calibration_tokens

    torch.set_num_threads(args.threads)
    loaded = load_model("smollm2-135m")
    model, tok = loaded.model.eval(), loaded.tokenizer
    t0 = time.perf_counter()
    tokens = calibration_tokens(tok, "self", model, seqlen=args.seqlen, samples=args.samples, seed=0)
    gen_s = time.perf_counter() - t0
    ids = torch.tensor(tokens[: args.samples * args.seqlen]).reshape(args.samples, args.seqlen)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, args.samples, 8):
            model(input_ids=ids[i:i + 8], use_cache=False)
    fwd_s = time.perf_counter() - t0
    row = {"samples": args.samples, "seqlen": args.seqlen, "batch": SELF_BATCH,
           "tokens": len(tokens), "generate_seconds": round(gen_s, 1),
           "tokens_per_second": round(len(tokens) / gen_s, 1),
           "dense_forward_seconds_same_tokens": round(fwd_s, 1), "threads": args.threads}
    print(row, flush=True)
    write_result(ROOT / "benchmarks" / "results" / "self_calibration.json", {"smollm2-135m": row})


if __name__ == "__main__":
    main()
