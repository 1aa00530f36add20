"""`sparsify`: post-training unstructured or N:M sparsity of the decoder-block linears.

    sparsify{score=ria,pattern=2:4}
    sparsify{score=wanda,sparsity=0.5,scope=row}
    sparsify{score=ria,pattern=2:4,reconstruct=true}

Scores: magnitude, wanda, ri, ria (``a`` = activation exponent, default 0.5), or
sparsegpt (SparseGPT's adaptive saliency w^2/[H^-1]_jj^2; implies reconstruct). Masks:
unstructured at ``sparsity`` (compared per ``scope``: layer or row) or N:M
(``pattern``) along the reduction axis. ``reconstruct`` adds the SparseGPT-style
weight update. Calibration is block-sequential (``sparsity/calibration.py``): samples
x seqlen tokens from ``calib`` (a text file, Alpaca JSON/JSONL, or ``self``); the
compile command's --calib-* options set the defaults.

ONNX input (a model that exists only as an .onnx file) goes through
``sparsity/onnx_path.py``: same scores and masks, weights written back into the ONNX
model (``export-onnx`` saves it), but calibration is one-shot on the dense model with
ONNX Runtime, and reconstruct / sparsegpt / permute / calib=self are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimgraph.errors import PipelineError
from slimgraph.passes.base import CompileState, Pass, PassResult
from slimgraph.passes.registry import register

SCORES = ("magnitude", "wanda", "ri", "ria", "sparsegpt")  # sparsegpt: its own saliency
PERMUTE_MODES = ("none", "mask-only", "fold", "space", "gather")


@dataclass
class Sparsify(Pass):
    name = "sparsify"
    offload_ok = True
    summary = "magnitude / Wanda / RI / RIA sparsity (unstructured or N:M), optional reconstruction"
    score: str = "ria"
    sparsity: float | None = None
    pattern: str | None = None
    scope: str | None = None
    a: float = 0.5
    reconstruct: bool = False
    calib: str | None = None
    samples: int | None = None
    seqlen: int | None = None
    seed: int = 0
    batch: int = 8
    permute: str = "none"
    search: str = "fast"

    def nm(self) -> tuple[int, int] | None:
        from slimgraph.sparsity.masks import parse_pattern

        if self.pattern is None:
            return None
        try:
            return parse_pattern(self.pattern)
        except ValueError as e:
            raise self.option_error("pattern", str(e)) from None

    def check_options(self) -> None:
        if self.score not in SCORES:
            raise self.option_error("score", f"{self.score!r} is not one of {', '.join(SCORES)}")
        if self.pattern is None and self.sparsity is None:
            raise self.option_error("sparsity/pattern", "give a sparsity (e.g. sparsity=0.5) or "
                                    "an N:M pattern (e.g. pattern=2:4)")
        if self.pattern is not None and self.sparsity is not None:
            raise self.option_error("sparsity/pattern", "give either sparsity or pattern, not both")
        if self.sparsity is not None and not 0.0 < self.sparsity < 1.0:
            raise self.option_error("sparsity", f"{self.sparsity} is outside (0, 1)")
        self.nm()
        if self.scope not in (None, "layer", "row"):
            raise self.option_error("scope", f"{self.scope!r} is not one of layer, row")
        if self.pattern is not None and self.scope is not None:
            raise self.option_error("scope", "N:M masks are always per row and group of M")
        if self.permute not in PERMUTE_MODES:
            raise self.option_error("permute", f"{self.permute!r} is not one of "
                                    f"{', '.join(PERMUTE_MODES)}")
        if self.permute != "none" and self.pattern is None:
            raise self.option_error("permute", "channel permutation needs an N:M pattern")
        if self.search not in ("fast", "exact"):
            raise self.option_error("search", f"{self.search!r} is not one of fast, exact")
        if self.a < 0:
            raise self.option_error("a", f"must be >= 0, got {self.a}")
        for opt in ("samples", "seqlen", "batch"):
            val = getattr(self, opt)
            if val is not None and val < 1:
                raise self.option_error(opt, f"must be >= 1, got {val}")

    def check_offload(self, calib: dict) -> None:
        if self.permute in ("fold", "space", "gather"):
            raise self.option_error("permute", f"{self.permute} changes weights outside one "
                                    "block and cannot run with --offload (mask-only can)")
        if self.needs_data() and str(self.calib or calib.get("file") or "self") == "self":
            raise self.option_error("calib", "text sampled from the model itself ('self', the "
                                    "default without --calib-file) needs the whole model in "
                                    "memory; give --calib-file with --offload")

    def needs_data(self) -> bool:
        from slimgraph.sparsity.scores import SCORES_NEED_DATA

        return self.score in SCORES_NEED_DATA or self.reconstruct or self.score == "sparsegpt"

    def requires(self, state: CompileState) -> None:
        from slimgraph.sparsity import onnx_path

        if state.is_onnx:
            onnx_path.check_onnx_input(self, state)
            return
        self.require_torch(state)
        if self.needs_data() and state.loaded.tokenizer is None and (self.calib or state.calib.get(
                "file")) != "self":
            raise PipelineError(f"pass '{self.name}': score '{self.score}' needs calibration data "
                                "and the model has no tokenizer")

    def run(self, state: CompileState) -> PassResult:
        from slimgraph.sparsity import onnx_path
        from slimgraph.sparsity.calibration import block_sequential, calibration_tokens, sample_windows

        if state.is_onnx:
            return onnx_path.sparsify_onnx(self, state)
        result = state.analysis()
        samples = self.samples or state.calib.get("samples", 64)
        seqlen = self.seqlen or state.calib.get("seqlen", 512)
        source = self.calib or state.calib.get("file") or "self"
        if self.needs_data():
            tokens = calibration_tokens(state.loaded.tokenizer, source, state.model,
                                        seqlen=seqlen, samples=samples, seed=self.seed)
            windows = sample_windows(tokens, samples, seqlen, self.seed)
        else:  # magnitude / RI need no activations: one tiny window drives the block walk
            windows = torch.zeros((1, 2), dtype=torch.long)
        space_info = None
        if self.permute == "space":
            space_info = permute_residual_space(self, state, result, windows)
        pruner = _BlockPruner(self, state.model, result)
        reports = block_sequential(state.model, result, windows, pruner, batch=self.batch,
                                   progress=state.progress, lazy=state.offload)
        layers = [r for rep in reports for r in rep["layers"]]
        skipped = [r for r in layers if r.get("skipped")]
        pruned = [r for r in layers if not r.get("skipped")]
        if not pruned:
            raise PipelineError(f"pass '{self.name}': no linear layer could be pruned "
                                f"({skipped[0]['skipped'] if skipped else 'none found'})")
        total = sum(r["numel"] for r in pruned)
        zeros = sum(r["zeros"] for r in pruned)
        report = {"score": self.score, "pattern": self.pattern, "sparsity_target": self.sparsity,
                  "reconstruct": self.reconstruct, "calibration": {
                      "source": str(source) if self.needs_data() else None,
                      "samples": samples if self.needs_data() else 0, "seqlen": seqlen},
                  "layers": layers, "skipped": [f"{r['name']}: {r['skipped']}" for r in skipped],
                  "sparsity": zeros / total}
        if self.permute != "none":
            perms = [r["permutation"] for r in pruned if "permutation" in r]
            report["permutation"] = {
                "mode": self.permute, "search": self.search,
                "seconds": round(sum(p.get("seconds", 0) for p in perms), 2),
                "layers_permuted": sum(1 for p in perms if p["realised"] != "none"),
                "layers_unpermuted": [f"{r['name']}: {r['permutation']['why']}" for r in pruned
                                      if r.get("permutation", {}).get("realised") == "none"]}
            if space_info is not None:
                report["permutation"]["space"] = space_info
        if any(r.get("permutation", {}).get("realised") == "gather" for r in pruned):
            state.gathers.extend(r["name"] for r in pruned
                                 if r.get("permutation", {}).get("realised") == "gather")
            state.retrace()
        return PassResult(True, report)


class _BlockPruner:
    """Observe a block's linear inputs, then prune every linear of the block."""

    def __init__(self, opts: Sparsify, model, result) -> None:
        self.opts = opts
        self.model = model
        self.result = result

    def __call__(self, block, module: torch.nn.Module, inputs: list) -> dict:
        opts = self.opts
        linears = {name: module.get_submodule(name[len(block.module_name) + 1:])
                   for name in block.linears}
        stats: dict = {}
        if opts.needs_data():
            stats = self.observe(module, linears, inputs)
        return {"layer": block.layer,
                "layers": [self.prune_linear(name, linears[name], stats.get(name))
                           for name in linears]}

    def observe(self, module: torch.nn.Module, linears: dict, inputs: list) -> dict:
        """Run the block over the calibration inputs, accumulating each linear's input
        statistics. Linears that read the same tensor in a forward (q/k/v, gate/up) share
        one accumulator, so a Gram matrix is built once per distinct input."""
        from slimgraph.sparsity.reconstruct import GramAccumulator

        hessian = self.opts.reconstruct or self.opts.score == "sparsegpt"
        accs: dict[str, GramAccumulator] = {}
        # id -> (tensor, accumulator); holding the tensor keeps its id from being reused
        batch_seen: dict[int, tuple[torch.Tensor, GramAccumulator]] = {}

        def hook(_m, args, name):
            x = args[0]
            hit = batch_seen.get(id(x))
            if hit is not None and hit[0] is x:
                accs[name] = hit[1]
                return
            acc = accs.get(name)
            if acc is None:
                acc = accs[name] = GramAccumulator(x.shape[-1], hessian=hessian)
            batch_seen[id(x)] = (x, acc)
            acc.add(x.detach())

        hooks = [lin.register_forward_pre_hook(lambda m, a, name=name: hook(m, a, name))
                 for name, lin in linears.items()]
        try:
            with torch.no_grad():
                for args, kwargs in inputs:
                    batch_seen.clear()
                    module(*args, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        return accs

    def prune_linear(self, name: str, lin: torch.nn.Linear, acc) -> dict:
        from slimgraph.sparsity.masks import nm_mask, unstructured_mask
        from slimgraph.sparsity.reconstruct import sparsegpt_prune
        from slimgraph.sparsity.scores import score

        opts = self.opts
        w = lin.weight.detach().float()
        nm = opts.nm()
        if nm is not None and w.shape[1] % nm[1]:
            return {"name": name, "skipped": f"input size {w.shape[1]} is not divisible by "
                    f"{nm[1]}", "numel": w.numel(), "zeros": 0}
        act = acc.act_norm() if acc is not None else None
        hess = acc.hessian() if acc is not None and (opts.reconstruct or opts.score == "sparsegpt") \
            else None
        s = score(w, "magnitude" if opts.score == "sparsegpt" else opts.score, act_norm=act, a=opts.a)
        fixed_mask, perm_info = None, None
        if opts.permute != "none":
            lin, w, s, act, hess, fixed_mask, perm_info = self.permute(name, lin, w, s, act, hess, nm)
        if fixed_mask is not None:  # mask-only: the permuted choice, in the original order
            if hess is not None:
                new, keep = sparsegpt_prune(w, hess, mask=fixed_mask)
            else:
                new, keep = w * fixed_mask, fixed_mask
        elif opts.score == "sparsegpt":
            new, keep = sparsegpt_prune(w, hess, sparsity=opts.sparsity, pattern=nm)
        elif opts.reconstruct:
            new, keep = sparsegpt_prune(w, hess, sparsity=opts.sparsity, pattern=nm, scores=s)
        else:
            if nm is not None:
                keep = nm_mask(s, *nm)
            else:
                scope = opts.scope or ("row" if opts.score == "wanda" else "layer")
                keep = unstructured_mask(s, opts.sparsity, scope)
            new = w * keep
        with torch.no_grad():
            lin.weight.copy_(new.to(lin.weight.dtype))
        zeros = int((lin.weight == 0).sum())
        out = {"name": name, "shape": list(w.shape), "numel": w.numel(), "zeros": zeros,
               "sparsity": round(zeros / w.numel(), 6)}
        if perm_info is not None:
            out["permutation"] = perm_info
        return out

    def permute(self, name, lin, w, s, act, hess, nm):
        """Search a permutation for this linear and realise it as the mode says."""
        from slimgraph.sparsity.deploy import (fold_group, install_gather, permute_group,
                                               stacked_scores, unit_positions)
        from slimgraph.sparsity.permutation import permuted_nm_mask, search_permutation

        opts = self.opts
        n, m = nm
        info = {"realised": "none"}
        if opts.permute == "mask-only":
            res = search_permutation(s, n, m, mode=opts.search)
            info.update(realised="mask-only", kept_before=res.kept_before, kept_after=res.kept_after,
                        seconds=round(res.seconds, 3))
            return lin, w, s, act, hess, permuted_nm_mask(s, res.perm, n, m), info
        if opts.permute in ("fold", "space"):
            group, why = fold_group(self.result, name + ".weight", m)
            if group is None:
                if opts.permute == "space" and "shared by every layer" in why:
                    info.update(realised="space")  # its input space was permuted up front
                else:
                    info["why"] = why
                return lin, w, s, act, hess, None, info
            pos = unit_positions(group, name + ".weight", 1)
            res = search_permutation(stacked_scores(s, pos), n, m, mode=opts.search)
            idx = permute_group(self.result, group, res.perm)[(name + ".weight", 1)]
            info.update(realised="fold", group=group.id, group_kind=group.kind,
                        perm=res.perm.tolist())
        else:  # gather
            res = search_permutation(s, n, m, mode=opts.search)
            idx = res.perm
            lin = install_gather(self.model, name, idx)
            info.update(realised="gather")
        info.update(kept_before=res.kept_before, kept_after=res.kept_after,
                    seconds=round(res.seconds, 3))
        w = lin.weight.detach().float()
        s = s[:, idx]
        act = act[idx] if act is not None else None
        hess = hess[idx][:, idx] if hess is not None else None
        return lin, w, s, act, hess, None, info


def permute_residual_space(opts: Sparsify, state: CompileState, result, windows) -> dict:
    """One permutation of the residual stream, chosen for all its decoder-block readers.

    The readers' scores (with activation norms from one dense pass over the calibration
    windows) are stacked; the permutation that maximises the N:M score they keep is
    applied to the whole hidden group (embedding, norms, readers' columns, writers' rows,
    tied lm_head): an exact reordering, before block 0 is calibrated.
    """
    from slimgraph.ir.dependency import layer_of
    from slimgraph.ir.graph import OpKind
    from slimgraph.sparsity.deploy import permute_group, stacked_scores, unit_positions
    from slimgraph.sparsity.permutation import search_permutation
    from slimgraph.sparsity.scores import score
    from slimgraph.structured.importance import consumer_input_norms

    n, m = opts.nm()
    hidden = [g for g in result.groups if g.kind == "hidden" and g.layer is None]
    if len(hidden) != 1 or hidden[0].units % m:
        return {"realised": "none", "why": "no single hidden space whose size divides by M"}
    group = hidden[0]
    if group.reasons:
        return {"realised": "none", "why": "; ".join(group.reasons)}
    readers = [nd.inputs[1].name for nd in result.graph.nodes if nd.kind is OpKind.LINEAR
               and layer_of([nd.inputs[1].name]) is not None
               and unit_positions(group, nd.inputs[1].name, nd.attrs["w_in"]) is not None
               and nd.attrs["w_in"] == 1]
    readers = list(dict.fromkeys(readers))
    need_data = opts.score in ("wanda", "ria")
    norms = consumer_input_norms(state.model, result.graph, windows[: min(len(windows), 16)]) \
        if need_data else {}
    parts = []
    for name in readers:
        w = result.graph.params[name].param.read().float()
        act = norms[name].sqrt().float() if need_data else None
        parts.append(stacked_scores(score(w, "magnitude" if opts.score == "sparsegpt" else
                                          opts.score, act_norm=act, a=opts.a),
                                    unit_positions(group, name, 1)).float())
    res = search_permutation(torch.cat(parts), n, m, mode=opts.search)
    permute_group(result, group, res.perm)
    return {"realised": "space", "readers": len(readers), "units": group.units,
            "kept_before": res.kept_before, "kept_after": res.kept_after,
            "seconds": round(res.seconds, 2), "perm": res.perm.tolist()}


register(Sparsify)
