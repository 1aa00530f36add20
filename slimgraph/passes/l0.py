"""`l0`: L0 structured pruning trained with LoRA and a collaborative prompt (Compresso).

    l0{target=0.2,steps=200,data=train.jsonl},remove,export-onnx

Hard-concrete gates go on the units of the chosen group kinds (``kinds``: heads, mlp,
hidden), where the dependency analysis says the units' channels are read (heads, MLP) or
written (hidden) — no per-architecture model files. LoRA (peft; ``lora`` names the
linears, default q_proj and v_proj, or a fused qkv_proj / query_key_value where the
model has no q_proj; rank 8) and the gates train on ``data`` (Alpaca
JSON/JSONL, loss on responses only, or plain text) with the collaborative prompt
prepended; the Lagrangian drives the expected sparsity of the attention + MLP weights to
``target`` (and optionally ``heads_target`` / ``mlp_target`` per kind).

At the end the gates become deterministic — ``finalize=target`` (default) zeroes the units
with the lowest log alpha until the target sparsity is reached exactly, ``finalize=expected``
uses the paper's per-group rule (round(n - sum P(kept)) zeros); kept units keep their soft
value sigmoid(log α / β) (``kept_values=soft``, the paper) or 1 (``kept_values=one``) —, an
optional fine-tune (``finetune_steps``)
trains LoRA with the gates frozen, LoRA is merged, the soft gate values are folded into
the weights they scale, and the units whose gate is 0 are selected: the next pass
(``remove``) slices them out, so the slim model equals the trained masked model.

Gates start at the paper's log α (``droprate_init``); ``init=act`` adds to it the normal
quantile of each unit's activation-aware importance rank within its group (times
``init_spread``; ``init_samples`` training examples scored), so short runs start from a
sensible ranking (SmolLM2, 60 CPU steps: perplexity 81 vs 1273 with the uniform start).

``distill=true`` trains on the loss of the `distill` pass instead of the language-modelling
loss: ``T² KL(teacher ‖ student)`` at ``temperature``, the teacher being the pipeline's input
model (or ``teacher=SPEC``), frozen.

Checkpoints go to OUTDIR/l0-checkpoint/ every ``save_every`` steps; the same command run
again resumes from the last one. The prompt used is written to OUTDIR/prompt.txt, for
``slimgraph eval --prompt OUTDIR/prompt.txt``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from slimgraph.errors import PipelineError
from slimgraph.passes.base import CompileState, Pass, PassResult, split_names
from slimgraph.passes.registry import register

if TYPE_CHECKING:  # annotations only: importing the pass does not import PyTorch
    import torch

KINDS = ("heads", "mlp", "hidden")
FINALIZE_ONLY = ("finalize", "kept_values")  # options not in the training checkpoint's identity


@dataclass
class L0(Pass):
    name = "l0"
    summary = "train hard-concrete gates with LoRA to a target sparsity (Compresso); select units"
    file_options = ("data", "prompt_file")
    target: float = 0.2
    heads_target: float | None = None
    mlp_target: float | None = None
    kinds: str = "heads mlp"
    data: str = ""
    steps: int = 200
    lora_steps: int | None = None  # default steps // 8
    ramp_steps: int | None = None  # default steps // 2
    batch: int = 4
    accum: int = 1
    seqlen: int = 256
    lr: float = 1e-4
    mask_lr: float = 0.1
    lambda_lr: float = 0.1
    droprate_init: float = 0.5
    init: str = "uniform"  # uniform | act
    init_spread: float = 1.0
    init_samples: int = 32
    lora: str = "q_proj v_proj"
    lora_rank: int = 8
    lora_alpha: int = 8
    prompt: str = "default"
    prompt_file: str = ""
    finetune_steps: int = 0
    finetune_lr: float = 4e-4
    finalize: str = "target"  # target | expected
    kept_values: str = "soft"  # soft | one
    seed: int = 0
    save_every: int = 50
    checkpoint: str = ""  # default OUTDIR/l0-checkpoint
    distill: bool = False  # loss: KL from the teacher instead of the LM loss
    teacher: str = ""  # distill=true: default the pipeline's input model
    temperature: float = 1.0
    precision: str = "fp32"  # or bf16: bfloat16 autocast (about 2x faster where supported)

    def uses_input_model(self) -> bool:
        return bool(self.distill and not self.teacher)  # the teacher: the model as loaded

    def check_options(self) -> None:
        for opt in ("target", "heads_target", "mlp_target"):
            val = getattr(self, opt)
            if val is not None and not 0.0 < val < 1.0:
                raise self.option_error(opt, f"target sparsity {val} is outside (0, 1)")
        bad = [k for k in split_names(self.kinds) if k not in KINDS]
        if bad or not split_names(self.kinds):
            raise self.option_error("kinds", f"{' '.join(bad) or 'nothing'}: choose from "
                                    f"{', '.join(KINDS)} (e.g. kinds=heads+mlp)")
        for opt, kind in (("heads_target", "heads"), ("mlp_target", "mlp")):
            if getattr(self, opt) is not None and kind not in split_names(self.kinds):
                raise self.option_error(opt, f"{kind} is not gated (kinds={self.kinds})")
        for opt in ("steps", "batch", "accum", "seqlen", "lora_rank", "lora_alpha", "save_every"):
            if getattr(self, opt) < 1:
                raise self.option_error(opt, f"must be >= 1, got {getattr(self, opt)}")
        for opt in ("lora_steps", "ramp_steps", "finetune_steps"):
            val = getattr(self, opt)
            if val is not None and val < 0:
                raise self.option_error(opt, f"must be >= 0, got {val}")
        if (self.lora_steps or 0) >= self.steps:
            raise self.option_error("lora_steps", f"{self.lora_steps} leaves no step for the "
                                    f"gates (steps={self.steps})")
        if not 0.0 < self.droprate_init < 1.0:
            raise self.option_error("droprate_init", f"{self.droprate_init} is outside (0, 1)")
        if self.init not in ("uniform", "act"):
            raise self.option_error("init", f"{self.init!r} is not 'uniform' or 'act'")
        if self.init_spread < 0:
            raise self.option_error("init_spread", f"must be >= 0, got {self.init_spread}")
        if self.init_samples < 1:
            raise self.option_error("init_samples", f"must be >= 1, got {self.init_samples}")
        if self.finalize not in ("target", "expected"):
            raise self.option_error("finalize", f"{self.finalize!r} is not 'target' or 'expected'")
        if self.kept_values not in ("soft", "one"):
            raise self.option_error("kept_values", f"{self.kept_values!r} is not 'soft' or 'one'")
        if not split_names(self.lora):
            raise self.option_error("lora", "name at least one linear, e.g. lora=q_proj+v_proj")
        if not self.temperature > 0:
            raise self.option_error("temperature", f"must be > 0, got {self.temperature}")
        if self.precision not in ("fp32", "bf16"):
            raise self.option_error("precision", f"{self.precision!r} is not fp32 or bf16")
        if not self.distill and (self.teacher or self.temperature != 1.0):
            raise self.option_error("teacher" if self.teacher else "temperature",
                                    "only used with distill=true")
        from slimgraph.l0.data import prompt_text

        prompt_text(self.prompt, self.prompt_file)

    def requires(self, state: CompileState) -> None:
        self.require_torch(state)
        from slimgraph.l0.train import check_precision

        check_precision(self.precision)
        if state.loaded.tokenizer is None:
            raise PipelineError(f"pass '{self.name}' needs the model's tokenizer to read "
                                "its training data")
        data = self.data or state.calib.file or ""
        if not data:
            raise self.option_error("data", "training data is required: data=FILE (Alpaca "
                                    "JSON/JSONL or plain text), or compile --calib-file FILE")
        if not Path(data).is_file():
            raise self.option_error("data", f"'{data}' does not exist")

    # -- the pass ---------------------------------------------------------------------
    def config(self):
        from slimgraph.l0.train import TrainConfig

        targets = {"all": self.target}
        if self.heads_target is not None:
            targets["heads"] = self.heads_target
        if self.mlp_target is not None:
            targets["mlp"] = self.mlp_target
        return TrainConfig(
            steps=self.steps,
            lora_steps=self.steps // 8 if self.lora_steps is None else self.lora_steps,
            ramp_steps=self.steps // 2 if self.ramp_steps is None else self.ramp_steps,
            batch=self.batch, accum=self.accum, lr=self.lr, mask_lr=self.mask_lr,
            lambda_lr=self.lambda_lr, seed=self.seed, targets=targets,
            save_every=self.save_every, temperature=self.temperature, precision=self.precision)

    def start(self, state: CompileState):
        """Examples, gates and the LoRA-wrapped model: a training session, not yet trained."""
        from slimgraph.l0.data import load_examples, prompt_text
        from slimgraph.l0.gates import GateSet, SizeModel, plan_families
        from slimgraph.l0.train import FUSED_QKV, Session, wrap_lora

        prompt = prompt_text(self.prompt, self.prompt_file)
        data = self.data or state.calib.file
        examples = load_examples(state.loaded.tokenizer, data, prompt, self.seqlen)
        result = state.analysis()
        families = plan_families(state.model, result, set(split_names(self.kinds)))
        if self.kept_values == "one":
            for f in families:  # deterministic gates 0 or 1: kept units unscaled
                f.binary = True
        size = SizeModel.build(state.model, result, families)
        cfg = self.config()
        gates = GateSet(families, self.droprate_init, tuple(cfg.targets))
        if self.init == "act":
            from slimgraph.l0.gates import init_from_importance

            init_from_importance(gates, self._importance(state, families, examples),
                                 self.init_spread)
        default = self.lora == type(self).lora  # left at q_proj v_proj: fused qkv too
        peft_model = wrap_lora(state.model, split_names(self.lora), self.lora_rank, self.lora_alpha,
                               self.seed, FUSED_QKV if default else ())
        teacher = None
        if self.distill:
            from slimgraph.passes.distill import check_teacher, teacher_model

            teacher = teacher_model(state, self.teacher)
            check_teacher(teacher, state.model, hidden=False)
        return Session(peft_model, state.model, gates, size, teacher=teacher), examples, prompt, cfg

    def _importance(self, state: CompileState, families, examples) -> list[torch.Tensor]:
        """Activation-aware importance of every gated unit (as prune-structured's
        importance=act) on the first ``init_samples`` training examples."""
        import torch

        from slimgraph.structured.importance import activation_scorer

        batches = (torch.tensor([e.ids], dtype=torch.long) for e in examples[: self.init_samples])
        score = activation_scorer(state.model, state.graph, batches)
        return [score(f.group) for f in families]

    def _checkpoint(self, state: CompileState, suffix: str) -> Path | None:
        if self.checkpoint:
            return Path(self.checkpoint) / f"l0{suffix}.pt"
        keep = state.keep_dir or state.out_dir  # OUTDIR, not the compile's staging folder
        if keep is None:
            return None
        return keep / "l0-checkpoint" / f"l0{suffix}.pt"

    def fingerprint(self, state: CompileState) -> str:
        """Identifies the training a checkpoint belongs to: every option but those read
        only when finalizing, so a finished run can be finalized again differently."""
        import dataclasses

        defaults = {f.name: f.default for f in self.options() if f.name in FINALIZE_ONLY}
        trained = dataclasses.replace(self, **defaults)
        desc = f"{trained.describe()}|{state.graph.num_parameters()}"
        return hashlib.sha256(desc.encode()).hexdigest()[:16]

    def run(self, state: CompileState) -> PassResult:
        from slimgraph.l0.gates import fold_gates
        from slimgraph.l0.train import train

        session, examples, prompt, cfg = self.start(state)
        pad = state.loaded.tokenizer.pad_token_id
        pad = pad if pad is not None else (state.loaded.tokenizer.eos_token_id or 0)
        fp = self.fingerprint(state)
        train(session, examples, cfg, pad_id=pad, checkpoint=self._checkpoint(state, ""),
              fingerprint=fp, progress=state.progress)
        report = {"examples": len(examples), "steps": cfg.steps, "train_seconds":
                  round(session.seconds, 1), "tokens_seen": session.tokens,
                  "tokens_per_second": round(session.tokens / max(session.seconds, 1e-9), 1),
                  "precision": self.precision, "history": session.history,
                  "expected_sparsity": round(session.sparsity(), 4),
                  "lambdas": {k: [round(float(x), 4) for x in v.detach()]
                              for k, v in session.gates.lambdas.items()},
                  "prompt": prompt, "loss": "distill" if self.distill else "lm"}
        if self.finetune_steps:
            ft = self.config()
            ft.steps, ft.lora_steps, ft.lr = self.finetune_steps, 0, self.finetune_lr
            ft_session = type(session)(session.model, session.base, session.gates, session.size,
                                       teacher=session.teacher)
            # the fine-tune trains through the final gate values: kept_values is part of it
            train(ft_session, examples, ft, pad_id=pad, checkpoint=self._checkpoint(state, "-finetune"),
                  fingerprint=f"{fp}|{self.kept_values}", progress=state.progress, finetune=True)
            report["finetune"] = {"steps": ft.steps, "seconds": round(ft_session.seconds, 1),
                                  "history": ft_session.history}
        values = self.finish(session, self.config().targets if self.finalize == "target" else None)
        selection = fold_gates(state.model, session.gates, values)
        kept = {}
        for fam, z in zip(session.gates.families, values):
            kept[fam.name] = f"{int((z > 0).sum())}/{len(z)}"
        report["kept_units"] = kept
        state.selection.update(selection)
        if prompt and state.out_dir is not None:
            from slimgraph.io import atomic_write_text

            path = atomic_write_text(state.out_dir / "prompt.txt", prompt)
            state.files.append(str(path))
        state.notes.append("l0: units selected; add the 'remove' pass to slim the model")
        return PassResult(True, report)

    @staticmethod
    def finish(session, targets: dict[str, float] | None = None) -> list[torch.Tensor]:
        """Deterministic gates (per group round(n - sum P(kept)) zeros, or, given
        ``targets``, the lowest log alpha zeroed until the target sparsity is reached);
        LoRA merged into the base weights; hooks removed. Returns the final gate values
        (to fold with ``fold_gates``)."""
        from slimgraph.l0.gates import values_at_target

        if targets is None:
            values = session.gates.set_deterministic()
        else:
            values = values_at_target(session.gates, session.size, targets)
        session.gates.remove_hooks()
        merged = session.model.merge_and_unload()
        if merged is not session.base:
            raise RuntimeError("peft returned a different model object after merging")
        return [v.detach().cpu() for v in values]


register(L0)
