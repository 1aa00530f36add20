"""`save-hf`: write OUTDIR/hf, a reloadable Hugging Face checkpoint, and check it.

The checkpoint itself (safetensors, config with the ``slimgraph`` section where plain
``transformers`` cannot rebuild the model, tokenizer) is written by
:func:`slimgraph.backends.hf_checkpoint.save_hf`, or streamed from the offload store under
``--offload``; with ``check=true`` the folder is reloaded and its outputs compared with
the model's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from slimgraph.errors import PipelineError, SlimgraphError
from slimgraph.passes.base import CompileState, Pass, PassResult
from slimgraph.passes.registry import register


@dataclass
class SaveHF(Pass):
    name = "save-hf"
    summary = "write OUTDIR/hf: safetensors, config, tokenizer (reload-checked)"
    writes_files = True
    offload_ok = True
    subdir: str = "hf"
    check: bool = True
    tolerance: float = 1e-5

    def check_options(self) -> None:
        if not self.subdir or "/" in self.subdir or self.subdir in (".", ".."):
            raise self.option_error("subdir", f"{self.subdir!r} must be a plain directory name")
        if self.subdir == "report.json" or self.subdir.startswith(".") or any(
                c == "\\" or ord(c) < 32 for c in self.subdir):
            raise self.option_error("subdir", f"{self.subdir!r} is a name slimgraph keeps for "
                                    "itself in OUTDIR (report.json, .slimgraph-*) or not a "
                                    "plain directory name")

    def requires(self, state: CompileState) -> None:
        self.require_torch(state, out_dir=True)
        if not hasattr(state.model, "save_pretrained"):
            raise PipelineError(f"pass '{self.name}' needs a transformers model")

    def run(self, state: CompileState) -> PassResult:
        out = state.out_dir / self.subdir
        if state.offload is not None:  # streamed from the offload store; see sparsity/offload.py
            from slimgraph.sparsity.offload import save_hf_offloaded

            report = save_hf_offloaded(state.offload, state.loaded.tokenizer, out,
                                       state.module_attrs, gathers=state.gathers,
                                       progress=state.progress)
            state.files.append(str(out))
            return PassResult(False, report)
        from slimgraph.backends.hf_checkpoint import load_pruned, max_rel_error, save_hf

        report = save_hf(state.model, state.loaded.tokenizer, out, state.module_attrs,
                         state.original_config, state.gathers)
        if self.check:
            vocab = int(getattr(state.model.config, "vocab_size", 2) or 2)
            try:
                err = max_rel_error(state.model, load_pruned(out), vocab)
            except SlimgraphError:
                raise
            except Exception as exc:  # the reloaded model does not run
                raise SlimgraphError(
                    f"the checkpoint written to {out} does not run after reloading "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                    f"'{type(state.model).__name__}' is not yet reloadable after this pruning "
                    "(save-hf{check=false} skips this check)") from exc
            report["reload_rel_error"] = err
            if not math.isfinite(err):
                raise SlimgraphError(f"the model's output (or the reloaded checkpoint's in {out}) "
                                     "has non-finite values (NaN or infinity)")
            if not err <= self.tolerance:
                raise SlimgraphError(f"reloaded checkpoint differs from the model (relative "
                                     f"error {err:.2e})")
        state.files.append(str(out))
        return PassResult(False, report)


register(SaveHF)
