"""Data-free calibration text (``--calib-file self``) on SmolLM2-135M: how long generating
``--samples`` sequences of ``--seqlen`` tokens takes (batches of 64 with a KV cache,
bfloat16 where the CPU has it), next to a reference measured in the same run: the dense
forward pass over the same number of tokens (the protocol's 512-token windows), and the
same generation with transformers' dynamic KV cache (which concatenates every step)
instead of the preallocated one slimgraph uses. ``--rounds`` rounds, round-robin
(preallocated, dynamic, forward in each); medians reported; the two caches must give the
same tokens.

Usage: python benchmarks/self_calibration.py [--samples 64] [--seqlen 512] [--threads 2]
       [--rounds 2]
Writes benchmarks/results/self_calibration.json.
"""

from __future__ import annotations

import argparse
import statistics
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
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    import torch

    from slimgraph.frontends.loading import load_model
    from slimgraph.sparsity import calibration

    torch.set_num_threads(args.threads)
    loaded = load_model("smollm2-135m")
    model, tok = loaded.model.eval(), loaded.tokenizer
    preallocated = calibration.preallocated_cache

    def generate(cache_factory):
        calibration.preallocated_cache = cache_factory
        t0 = time.perf_counter()
        tokens = calibration.calibration_tokens(tok, "self", model, seqlen=args.seqlen,
                                                samples=args.samples, seed=0)
        return tokens, time.perf_counter() - t0

    times: dict[str, list[float]] = {"preallocated": [], "dynamic": [], "forward": []}
    for r in range(args.rounds):
        tokens, secs = generate(preallocated)
        times["preallocated"].append(secs)
        again, secs = generate(lambda m, n: None)
        times["dynamic"].append(secs)
        if again != tokens:
            raise SystemExit("the dynamic cache gave other tokens than the preallocated one")
        ids = torch.tensor(tokens[: args.samples * args.seqlen]).reshape(args.samples, args.seqlen)
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, args.samples, 8):
                model(input_ids=ids[i:i + 8], use_cache=False)
        times["forward"].append(time.perf_counter() - t0)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()),
              flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"samples": args.samples, "seqlen": args.seqlen, "batch": calibration.SELF_BATCH,
           "tokens": len(tokens), "rounds": args.rounds,
           "generate_seconds": round(med["preallocated"], 1),
           "tokens_per_second": round(len(tokens) / med["preallocated"], 1),
           "generate_seconds_dynamic_cache": round(med["dynamic"], 1),
           "dense_forward_seconds_same_tokens": round(med["forward"], 1),
           "same_tokens_both_caches": True, "threads": args.threads,
           "seconds_per_round": {k: [round(x, 1) for x in v] for k, v in times.items()}}
    print(row, flush=True)
    write_result(ROOT / "benchmarks" / "results" / "self_calibration.json", {"smollm2-135m": row})


if __name__ == "__main__":
    main()
