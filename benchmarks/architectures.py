"""Architecture coverage: which group kinds slimgraph can remove, and how exactly, on tiny
random-weight models of each transformers architecture (2 layers, hidden 64, 4 heads, 2
KV heads where the architecture has GQA).

For each architecture and group kind (heads, qheads, mlp, hidden): a third of the units of every
prunable group of that kind (at least one) is removed
- on the PyTorch path (`remove_units`), compared with the masked model (the same units
  zeroed): the relative error of the logits (exact: <= 1e-5);
- on the ONNX path (`export_onnx`, then `remove_units_onnx` on the imported file, run by
  ONNX Runtime), compared with the PyTorch path's slim model.
"not prunable" gives the first reason the analysis reports.

Usage: python benchmarks/architectures.py [--only NAME ...] [--no-onnx]
Writes benchmarks/results/architectures.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers as tf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import write_result  # noqa: E402

V, H, INTER, L, NH, KV, HD = 128, 64, 96, 2, 4, 2, 16
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
LLAMA_LIKE = dict(vocab_size=V, hidden_size=H, intermediate_size=INTER, num_hidden_layers=L,
                  num_attention_heads=NH, num_key_value_heads=KV, head_dim=HD, **IDS)


# LLaMA-like architectures: (config class, model class) built from LLAMA_LIKE
LLAMA_LIKE_CLASSES = {
    "LLaMA": ("LlamaConfig", "LlamaForCausalLM"),
    "Mistral": ("MistralConfig", "MistralForCausalLM"),
    "Qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "Qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "Gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "Gemma 2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "Gemma 3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "Granite": ("GraniteConfig", "GraniteForCausalLM"),
    "OLMo-2": ("Olmo2Config", "Olmo2ForCausalLM"),
    "SmolLM3": ("SmolLM3Config", "SmolLM3ForCausalLM"),
    "Helium": ("HeliumConfig", "HeliumForCausalLM"),
    "GLM": ("GlmConfig", "GlmForCausalLM"),
    "Cohere": ("CohereConfig", "CohereForCausalLM"),
    "StableLM": ("StableLmConfig", "StableLmForCausalLM"),
    "Starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM"),
    "OLMo": ("OlmoConfig", "OlmoForCausalLM"),
    "Phi-2": ("PhiConfig", "PhiForCausalLM"),
}


def _build(name: str) -> torch.nn.Module:
    if name in LLAMA_LIKE_CLASSES:
        config_cls, model_cls = LLAMA_LIKE_CLASSES[name]
        c = lambda: getattr(tf, model_cls)(getattr(tf, config_cls)(**LLAMA_LIKE))  # noqa: E731
    else:
        c = _OTHERS[name]
    torch.manual_seed(0)
    with _quiet():
        return c().eval()


_OTHERS = {
    "Gemma 3, 1 KV head": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
        **{**LLAMA_LIKE, "num_key_value_heads": 1})),
    "Phi-3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**{
        k: v for k, v in LLAMA_LIKE.items() if k != "head_dim"})),
    "GPT-NeoX": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
        vocab_size=V, hidden_size=H, intermediate_size=INTER, num_hidden_layers=L,
        num_attention_heads=NH, **IDS)),
    "GPT-J": lambda: tf.GPTJForCausalLM(tf.GPTJConfig(
        vocab_size=V, n_embd=H, n_layer=L, n_head=NH, rotary_dim=8, n_positions=64, **IDS)),
    "GPT-2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=V, n_embd=H, n_layer=L, n_head=NH, n_positions=64, **IDS)),
    "OPT": lambda: tf.OPTForCausalLM(tf.OPTConfig(
        vocab_size=V, hidden_size=H, ffn_dim=INTER, num_hidden_layers=L, num_attention_heads=NH,
        word_embed_proj_dim=H, max_position_embeddings=64, **IDS)),
    "BLOOM": lambda: tf.BloomForCausalLM(tf.BloomConfig(
        vocab_size=V, hidden_size=H, n_layer=L, n_head=NH, **IDS)),
    "Falcon": lambda: tf.FalconForCausalLM(tf.FalconConfig(
        vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH,
        new_decoder_architecture=True, num_kv_heads=KV, **IDS)),
    "Mixtral (MoE)": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(
        num_local_experts=4, num_experts_per_tok=2, **LLAMA_LIKE)),
}


NAMES = ["LLaMA", "Mistral", "Qwen2", "Qwen3", "Gemma", "Gemma 2", "Gemma 3",
         "Gemma 3, 1 KV head", "Granite",
         "OLMo-2", "SmolLM3", "Helium", "GLM", "Phi-3", "Cohere", "StableLM", "Starcoder2",
         "OLMo", "Phi-2", "GPT-NeoX", "GPT-J", "GPT-2", "OPT", "BLOOM", "Falcon",
         "Mixtral (MoE)"]
KINDS = ("heads", "qheads", "mlp", "hidden")


def _quiet():
    from slimgraph.frontends.loading import quiet_transformers

    return quiet_transformers()


def _selection(result, kind: str) -> dict[int, list[int]]:
    rng = random.Random(0)
    return {g.id: sorted(rng.sample(range(g.units), max(1, g.units // 3)))
            for g in result.prunable() if g.kind == kind}


def _short(e: Exception) -> str:
    """One line naming an exception, without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:120] if text else ''}"


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def torch_path(model, ids, kind: str):
    """(relative error slim vs masked, slim model, selection by (kind, layer)) or a reason."""
    from slimgraph.frontends.torch_export import trace
    from slimgraph.ir.dependency import analyze
    from slimgraph.structured.removal import remove_units
    from slimgraph.structured.unit_slicing import mask_units

    r = analyze(trace(model, (ids,), {"use_cache": False}))
    sel = _selection(r, kind)
    if not sel:
        groups = [g for g in r.groups if g.kind == kind]
        why = groups[0].reasons[0] if groups and groups[0].reasons else "no group of this kind"
        return None, why
    masked = copy.deepcopy(model)
    mask_units(analyze(trace(masked, (ids,), {"use_cache": False})), sel)
    slim = copy.deepcopy(model)
    rs = analyze(trace(slim, (ids,), {"use_cache": False}))
    report = remove_units(slim, rs, sel)
    with torch.no_grad():
        a = masked(ids, use_cache=False).logits.numpy()
        b = slim(ids, use_cache=False).logits.numpy()
    by_id = {g.id: g for g in r.groups}
    return (_rel(b, a), slim, {(by_id[g].kind, by_id[g].layer): u for g, u in sel.items()},
            report["notes"]), None


def export(model, path: Path) -> Path | str:
    """The dense ONNX file (export-onnx's exporter), or why it failed."""
    from slimgraph.backends.onnx_export import export_onnx

    try:
        with _quiet():
            return export_onnx(model, path, vocab=V)
    except Exception as e:
        return f"fails: export: {_short(e)}"


def onnx_path(src: Path, slim, plan, ids, out: Path) -> str:
    """Relative error of the ONNX path's slim model against the PyTorch path's."""
    import onnxruntime as ort

    from slimgraph.backends.onnx_export import save_onnx_model
    from slimgraph.frontends.onnx_import import import_onnx
    from slimgraph.ir.dependency import analyze
    from slimgraph.structured.onnx_removal import remove_units_onnx

    try:
        r = analyze(import_onnx(src))
        key = {(g.kind, g.layer): g for g in r.groups}
        sel = {}
        for (kind, layer), units in plan.items():
            g = key.get((kind, layer))
            if g is None or not g.prunable:
                why = (g.reasons[0] if g is not None and g.reasons else "group not found")
                return f"not prunable: {why}"
            sel[g.id] = units
        remove_units_onnx(r, sel)
        path = save_onnx_model(r.graph.meta["onnx_model"], out)
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, {"input_ids": ids.numpy()})[0]
        with torch.no_grad():
            want = slim(ids, use_cache=False).logits.numpy()
        return f"{_rel(got, want):.1e}"
    except Exception as e:  # reported in the table, not fatal
        return f"fails: {_short(e)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", nargs="*", default=NAMES)
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/architectures.json")
    args = ap.parse_args()
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))
    rows = {}
    print("| architecture | class | " + " | ".join(f"{k} (torch / ONNX)" for k in KINDS) + " |")
    print("|---|---|" + "---|" * len(KINDS))
    for name in args.only:
        model = _build(name)
        row = {"class": type(model).__name__}
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            src = None
            for kind in KINDS:
                try:
                    got, why = torch_path(model, ids, kind)
                except Exception as e:
                    got, why = None, f"fails: {_short(e)}"
                if got is None:
                    row[kind] = {"torch": f"not prunable: {why}"}
                    continue
                err, slim, plan, notes = got
                cell = {"torch": f"{err:.1e}", "approximate": any("approximates" in n for n in notes)}
                if not args.no_onnx:
                    src = src or export(model, Path(tmp) / "model.onnx")
                    cell["onnx"] = (src if isinstance(src, str) else
                                    onnx_path(src, slim, plan, ids, Path(tmp) / f"slim-{kind}.onnx"))
                row[kind] = cell
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows[name] = row
        print(f"| {name} | {row['class']} | " + " | ".join(_cell(row[k]) for k in KINDS) + " |",
              flush=True)
    write_result(Path(args.out), rows, transformers=tf.__version__, torch=torch.__version__)


def _cell(c: dict) -> str:
    t = c["torch"]
    if t.startswith(("not prunable", "fails")):
        return t.split(" at node")[0]
    exact = "approx." if c.get("approximate") or float(t) > 1e-5 else "exact"
    onnx = c.get("onnx")
    if onnx is None:
        return f"{exact} ({t})"
    return f"{exact} ({t} / {onnx if onnx[0].isdigit() else onnx.split(' at node')[0]})"


if __name__ == "__main__":
    main()
