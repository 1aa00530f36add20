"""`distill` on SmolLM2-135M: training throughput against a plain PyTorch loop, and quality.

1. Throughput (``--part speed``): in one process, round-robin, ``--rounds`` times each:
   the `distill` pass (its accelerate loop: teacher forward, student forward/backward,
   KL at T=1, AdamW, masks, warm-up/cosine lr, progress) for ``--steps`` steps, and a plain
   PyTorch loop doing the same work (teacher forward under no_grad, student forward,
   ``F.kl_div`` of the log-softmaxes, backward, AdamW step) on the same batches. Tokens/s
   of each round; the median is reported. The student is the pruned model
   (prune-structured{mlp=0.27,importance=act}).
2. Quality (``--part quality``): ``slimgraph compile smollm2-135m -p
   "prune-structured{mlp=0.27,importance=act},distill{steps=S,...},save-hf"
   --calib-file slimgraph/data/wikitext2/calib.txt`` (training text: the calibration split), against the same
   pipeline without distill; perplexity with ``slimgraph eval OUTDIR --ppl slimgraph/data/wikitext2/eval.txt
   --windows 40 --json`` (the protocol's 40 x 512 evaluation windows).

3. One row (``--part row --name NAME --prune PIPE``): ``PIPE,distill{...},save-hf`` (or
   ``--student DIR``: distil an earlier compile's HF checkpoint, teacher the dense model),
   perplexity as above; the row goes to the ``rows`` of the result under NAME.

The texts default to the protocol's split shipped with the package
(slimgraph/data/wikitext2/calib.txt and eval.txt).

Usage: python benchmarks/distill.py --part speed|quality|row|all [--steps 3] [--rounds 2]
       [--train-steps 40] [--batch 4] [--seqlen 128] [--lr 1e-4]
       [--name NAME --prune PIPE | --student DIR] [--options K=V,...]
Writes benchmarks/results/distill.json (the parts run, merged with what is there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
PRUNE = "prune-structured{mlp=0.27,importance=act}"
RESULT = ROOT / "benchmarks" / "results" / "distill.json"


def plain_loop(student, teacher, examples, steps: int, batch: int, lr: float, seed: int,
               precision: str = "fp32") -> tuple[int, float]:
    """The reference: the same teacher/student work without the pass (under bfloat16
    autocast with ``precision="bf16"``, as the pass runs then). Returns (tokens, s)."""
    import torch
    import torch.nn.functional as F

    from slimgraph.l0.data import batch_indices, collate

    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.0)
    student.train()
    tokens, t0 = 0, time.perf_counter()
    for k in range(steps):
        b = collate([examples[i] for i in batch_indices(len(examples), batch, k, seed)], 0)
        kw = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            with torch.no_grad():
                t = teacher(**kw).logits[:, :-1]
            s = student(**kw).logits[:, :-1]
        v = s.shape[-1]
        loss = F.kl_div(F.log_softmax(s.float(), -1).reshape(-1, v),
                        F.log_softmax(t.float(), -1).reshape(-1, v), log_target=True,
                        reduction="batchmean")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(b["attention_mask"].sum())
    return tokens, time.perf_counter() - t0


def speed(args) -> dict:
    import torch

    from slimgraph.frontends.build import graph_of
    from slimgraph.frontends.loading import load_model
    from slimgraph.passes.base import CompileState
    from slimgraph.passes.pipeline import from_text_or_file

    torch.set_num_threads(args.threads)
    loaded = load_model(MODEL)
    state = CompileState(loaded=loaded, calib={"file": str(args.calib), "samples": 16, "seqlen": 512})
    state.graph = graph_of(loaded)
    t0 = time.perf_counter()
    for p in from_text_or_file(PRUNE):
        p.requires(state)
        p.run(state)
    prune_s = time.perf_counter() - t0
    params = sum(p.numel() for p in state.model.parameters())
    (d,) = from_text_or_file(f"distill{{steps={args.steps},batch={args.batch},seqlen={args.seqlen},"
                             f"lr={args.lr},warmup=0,precision={args.precision}}}")
    d.requires(state)
    rounds = {"distill_pass": [], "plain_loop": []}
    for r in range(args.rounds):
        res = d.run(state).report
        rounds["distill_pass"].append(round(res["tokens_per_second"], 1))
        session, examples, _ = d.start(state)  # the same teacher (cached) and batches
        tok, secs = plain_loop(state.model, session.teacher, examples, args.steps, args.batch,
                               args.lr, d.seed, args.precision)
        state.model.eval()
        rounds["plain_loop"].append(round(tok / secs, 1))
        print(f"round {r + 1}: pass {rounds['distill_pass'][-1]} tok/s, plain "
              f"{rounds['plain_loop'][-1]} tok/s", flush=True)
    med = {k: statistics.median(v) for k, v in rounds.items()}
    return {"student": f"{MODEL} {PRUNE}", "parameters": params, "prune_seconds": round(prune_s, 1),
            "steps_per_round": args.steps, "batch": args.batch, "seqlen": args.seqlen,
            "threads": args.threads, "precision": args.precision, "rounds": rounds,
            "median_tokens_per_second": med,
            "ratio_pass_over_plain": round(med["distill_pass"] / med["plain_loop"], 3)}


def evaluate(out: Path, eval_txt: Path, windows: int) -> float:
    cli = [sys.executable, "-m", "slimgraph.cli", "eval", str(out), "--ppl", str(eval_txt),
           "--windows", str(windows), "--json", "--no-progress"]
    return round(json.loads(run(cli)[0])["ppl"], 3)


def quality(args) -> dict:
    rows = {}
    work = ROOT / "benchmarks" / "out" / "distill"
    distill = (f"distill{{steps={args.train_steps},batch={args.batch},seqlen={args.seqlen},"
               f"lr={args.lr},save_every=1000}}")
    for name, pipe in (("oneshot", f"{PRUNE},save-hf"), ("distill", f"{PRUNE},{distill},save-hf")):
        out = work / name
        cli = [sys.executable, "-m", "slimgraph.cli", "compile", MODEL, "-p", pipe, "-o", str(out),
               "--calib-file", str(args.calib), "--overwrite"]
        _, secs = run(cli)
        report = json.loads((out / "report.json").read_text())
        row = {"pipeline": pipe, "parameters": report["parameters"]["after"],
               "compile_seconds": round(secs, 1),
               "prune_seconds": round(report["passes"][0]["seconds"], 1)}
        if name == "distill":
            rep = report["passes"][1]["report"]
            row.update({"train_seconds": rep["train_seconds"], "tokens_seen": rep["tokens_seen"],
                        "tokens_per_second": rep["tokens_per_second"],
                        "loss_first": rep["loss_first"], "loss_last": rep["loss_last"]})
        row["ppl"] = evaluate(out, args.eval, args.windows)
        print(name, row, flush=True)
        rows[name] = row
    return rows


def row(args) -> dict:
    """One distillation row: prune (``--prune``) or an earlier compile (``--student``),
    then ``distill`` (``--train-steps 0``: no distill pass; the training figures come from
    an ``l0`` pass in ``--prune``); parameters, perplexity, prune and train time, tokens."""
    out = ROOT / "benchmarks" / "out" / "distill" / args.name
    distill = (f"distill{{steps={args.train_steps},batch={args.batch},seqlen={args.seqlen},"
               f"lr={args.lr},save_every=1000"
               + (f",precision={args.precision}" if args.precision != "fp32" else "")
               + (f",add_self={args.add_self}" if args.add_self else "")
               + (f",{args.options}" if args.options else "")
               + (f",teacher={MODEL}" if args.student else "") + "},")
    model = str(args.student) if args.student else MODEL
    pipe = f"{args.prune}," if args.prune else ""
    pipe += f"{distill if args.train_steps else ''}{args.after}save-hf"
    cli = [sys.executable, "-m", "slimgraph.cli", "compile", model, "-p", pipe, "-o", str(out),
           "--calib-file", str(args.calib), "--overwrite"]
    _, secs = run(cli)
    report = json.loads((out / "report.json").read_text())
    passes = {p["name"]: p for p in report["passes"]}
    trainer = "distill" if args.train_steps else "l0"
    rep = passes[trainer]["report"]
    result = {"model": model, "pipeline": pipe, "parameters": report["parameters"]["after"],
              "compile_seconds": round(secs, 1),
              "train_seconds": rep["train_seconds"], "tokens_seen": rep["tokens_seen"],
              "tokens_per_second": rep["tokens_per_second"]}
    if trainer == "distill":  # the pass's seconds include sampling add_self text
        result.update(loss_first=rep["loss_first"], loss_last=rep["loss_last"],
                      examples=rep["examples"], distill_pass_seconds=round(passes[trainer]["seconds"], 1))
    first = next(iter(passes))
    if first != trainer:
        result["prune_seconds"] = round(passes[first]["seconds"], 1)
    result["ppl"] = evaluate(out, args.eval, args.windows)
    print(args.name, result, flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--part", choices=("speed", "quality", "row", "all"), default="all")
    ap.add_argument("--name", help="row: the row's name")
    ap.add_argument("--prune", default="", help="row: the pruning passes before distill")
    ap.add_argument("--student", type=Path, help="row: an earlier compile's OUTDIR to distil")
    ap.add_argument("--after", default="", help="row: passes after distill, e.g. "
                    "'check-sparsity,' (with the trailing comma)")
    ap.add_argument("--steps", type=int, default=3, help="speed: steps per round and method")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=40, help="quality: distill steps")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="speed, row: distill's precision option")
    ap.add_argument("--add-self", type=int, default=0,
                    help="row: distill's add_self (sequences sampled from the teacher)")
    ap.add_argument("--options", default="",
                    help="row: more distill options, K=V,... (say hidden_weight=0.05)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--calib", type=Path, default=ROOT / "slimgraph/data/wikitext2/calib.txt")
    ap.add_argument("--eval", type=Path, default=ROOT / "slimgraph/data/wikitext2/eval.txt")
    args = ap.parse_args()
    new = {}
    if args.part in ("speed", "all"):
        new["speed" if args.precision == "fp32" else f"speed_{args.precision}"] = speed(args)
    if args.part in ("quality", "all"):
        new["quality"] = quality(args)
    if args.part == "row":
        if not args.name or not (args.prune or args.student):
            raise SystemExit("--part row needs --name and --prune or --student")
        new = {"row": {args.name: row(args)}}
    print(json.dumps(new), flush=True)
    rows = json.loads(RESULT.read_text())["rows"] if RESULT.is_file() else {}  # the other part
    if "row" in new:  # re-read: rows written meanwhile by another run are kept
        new = {"row": {**rows.get("row", {}), **new["row"]}}
    write_result(RESULT, {**rows, **new})


if __name__ == "__main__":
    main()
