"""`distill`: knowledge distillation from the unpruned model into the pruned one.

    prune-structured{mlp=0.27,importance=act},distill{steps=200,lr=1e-4},save-hf
    sparsify{score=sparsegpt,pattern=2:4},distill{steps=100},check-sparsity

The teacher is the pipeline's input model as it was loaded, before any pass changed it
(loaded once more from the same model spec, frozen), or the model named by ``teacher``.
The student is the current model: structured removal has already made it smaller, so
every removed unit stays removed, and every weight that is exactly zero before training
(a sparsity mask) stays exactly zero (its gradient is masked and it is re-zeroed after
every step), so ``check-sparsity`` still passes after it.

Loss: ``T² KL(p_teacher ‖ p_student)`` of the next-token distributions at temperature
``temperature`` (default 1), plus ``hidden_weight`` × the mean squared difference of the
decoder layers' hidden states (needs equal hidden sizes: not after hidden-channel
removal). Full fine-tuning by default; ``lora=q_proj+v_proj`` (or ``lora=all``: every
linear of the decoder blocks) trains peft LoRA adapters instead, merged at the end (on a
sparse model the merged update is masked again: the pattern wins). Data: ``data`` (a text
file, Alpaca JSON/JSONL: KL on the responses, or ``self``: ``samples`` sequences sampled
from the teacher); default the compile's --calib-file. ``add_self=N`` adds N sequences
sampled from the teacher to a file's examples: more distinct text where the file is small
(the teacher writes each sequence from its BOS token, temperature 1; with
``self_prompt=K`` it continues the first K tokens of a window drawn from the file instead,
so the sampled text is of the file's kind). ``steps`` optimizer
steps of ``batch`` examples of at most ``seqlen`` tokens (``accum`` micro-batches each), AdamW at ``lr`` with
``warmup`` linear warm-up steps (default steps/10) and cosine decay to 0. ``precision=bf16``
runs the forward and backward passes under bfloat16 autocast (weights, optimizer state and
losses stay float32): about twice the tokens/s on CPUs with AMX / AVX-512 BF16 and on
recent GPUs; the default fp32 is exact and reproducible to the bit.

Runs on the training loop of ``l0`` (``slimgraph/l0/train.py``: accelerate; several
processes with ``accelerate launch --multi_gpu --num_processes N`` or ``torchrun``, each
taking an equal share of every batch). Checkpoints (data only) go to
OUTDIR/distill-checkpoint/ every ``save_every`` steps; the same command run again resumes
from the last one. ONNX input is refused (the pass trains PyTorch modules), and so is
--offload.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from slimgraph.errors import PipelineError
from slimgraph.passes.base import CalibrationDefaults, CompileState, Pass, PassResult, split_names
from slimgraph.passes.registry import register

if TYPE_CHECKING:  # annotations only: importing the pass does not import PyTorch
    import torch

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# the teacher of the compile being run: (weak reference to the state's loaded model,
# teacher spec, teacher module); one entry, so a pipeline with l0 and distill loads it once
_TEACHER: list = []


def teacher_model(state: CompileState, spec: str) -> torch.nn.Module:
    """The frozen teacher: the model ``spec`` names, or (``spec`` empty) the pipeline's
    input model as loaded, before any pass changed it. Loaded once per compile."""
    from slimgraph.frontends.loading import load_model

    snapshot = getattr(state, "input_model", None)  # kept by the driver, where it does
    if not spec and snapshot is not None:
        return snapshot
    source = spec or state.loaded.spec
    if not spec and state.loaded.kind == "module":
        raise PipelineError("option 'teacher': the input model was given "
                            "in memory and cannot be loaded again as the teacher; name it "
                            "with teacher=SPEC")
    if _TEACHER and _TEACHER[0][0]() is state.loaded and _TEACHER[0][1] == source:
        return _TEACHER[0][2]
    _TEACHER.clear()
    loaded = load_model(source)
    if loaded.model is None:
        raise PipelineError(f"option 'teacher': '{source}' is not a PyTorch "
                            "model (ONNX cannot be a teacher: its logits are not differentiable "
                            "here)")
    if loaded.meta:
        raise PipelineError(f"option 'teacher': '{source}' has no weights")
    teacher = loaded.model.eval()
    teacher.requires_grad_(False)
    _TEACHER.append((weakref.ref(state.loaded), source, teacher))
    return teacher


def check_teacher(teacher: torch.nn.Module, student: torch.nn.Module,
                  hidden: bool) -> None:
    """Refuse a teacher whose vocabulary (or, for the hidden-state loss, hidden size)
    differs from the student's."""
    t_out, s_out = teacher.get_output_embeddings(), student.get_output_embeddings()
    if t_out is not None and s_out is not None and t_out.weight.shape[0] != s_out.weight.shape[0]:
        raise PipelineError(f"option 'teacher': its vocabulary has "
                            f"{t_out.weight.shape[0]} tokens, the student's {s_out.weight.shape[0]}")
    if hidden:
        t_d = teacher.get_input_embeddings().weight.shape[1]
        s_d = student.get_input_embeddings().weight.shape[1]
        if t_d != s_d:
            raise PipelineError(f"option 'hidden_weight': the student's "
                                f"hidden size is {s_d}, the teacher's {t_d} (hidden channels "
                                "were removed); the hidden-state loss needs equal sizes")


def self_examples(tokenizer, teacher, seqlen: int, samples: int, seed: int, progress=None,
                  prompts=None):
    """Data-free training text: sequences sampled from the teacher (from BOS, or
    continuing the rows of ``prompts``), cut into windows."""
    from slimgraph.l0.data import Example
    from slimgraph.sparsity.calibration import self_generated

    tokens = self_generated(teacher, tokenizer, seqlen, samples, seed, progress, prompts)
    windows = [tokens[i:i + seqlen] for i in range(0, len(tokens) - 1, seqlen)]
    return [Example(list(w), list(w)) for w in windows if len(w) >= 2]


@dataclass
class Distill(Pass):
    name = "distill"
    summary = "knowledge distillation from the input model (KL, optional hidden MSE); masks kept"
    file_options = ("data",)
    teacher: str = ""  # default: the pipeline's input model
    data: str = ""  # default: compile --calib-file; or self
    samples: int = 8  # data=self: sequences sampled from the teacher
    add_self: int = 0  # data=FILE: also train on this many sequences sampled from the teacher
    self_prompt: int = 0  # add_self: continue K-token prefixes of the file's text, not BOS
    steps: int = 100
    batch: int = 4
    accum: int = 1
    seqlen: int = 256
    lr: float = 5e-5
    warmup: int | None = None  # default steps // 10
    weight_decay: float = 0.0
    temperature: float = 1.0
    hidden_weight: float = 0.0
    lora: str = ""  # empty: full fine-tuning; q_proj+v_proj, or all
    lora_rank: int = 8
    lora_alpha: int = 16
    precision: str = "fp32"  # or bf16: bfloat16 autocast (about 2x faster where supported)
    seed: int = 0
    save_every: int = 50
    checkpoint: str = ""  # default OUTDIR/distill-checkpoint

    def uses_input_model(self) -> bool:
        return bool(not self.teacher)  # the teacher: the model as loaded

    def check_options(self) -> None:
        for opt in ("steps", "batch", "accum", "seqlen", "samples", "save_every", "lora_rank",
                    "lora_alpha"):
            if getattr(self, opt) < 1:
                raise self.option_error(opt, f"must be >= 1, got {getattr(self, opt)}")
        if self.seqlen < 2:
            raise self.option_error("seqlen", f"must be >= 2, got {self.seqlen}")
        if not self.lr > 0:
            raise self.option_error("lr", f"must be > 0, got {self.lr}")
        if self.warmup is not None and not 0 <= self.warmup < self.steps:
            raise self.option_error("warmup", f"{self.warmup} is outside [0, steps={self.steps})")
        if not self.temperature > 0:
            raise self.option_error("temperature", f"must be > 0, got {self.temperature}")
        if self.add_self < 0:
            raise self.option_error("add_self", f"must be >= 0, got {self.add_self}")
        if self.self_prompt < 0 or self.self_prompt >= self.seqlen:
            raise self.option_error("self_prompt", f"must be a prompt length in [0, seqlen="
                                    f"{self.seqlen}), got {self.self_prompt}")
        if self.self_prompt and not self.add_self:
            raise self.option_error("self_prompt", "prompts the add_self sequences; give "
                                    "add_self=N as well")
        if self.add_self and self.data == "self":
            raise self.option_error("add_self", "data=self already samples every example from "
                                    "the teacher; give their number with samples=N")
        for opt in ("hidden_weight", "weight_decay"):
            if getattr(self, opt) < 0:
                raise self.option_error(opt, f"must be >= 0, got {getattr(self, opt)}")
        if self.precision not in ("fp32", "bf16"):
            raise self.option_error("precision", f"{self.precision!r} is not fp32 or bf16")
        if self.teacher.lower().endswith(".onnx"):
            raise self.option_error("teacher", "an ONNX model cannot be the teacher (distill "
                                    "trains PyTorch modules); give a PyTorch / HF model")

    def check_offload(self, calib: CalibrationDefaults) -> None:
        raise PipelineError(f"pass '{self.name}' trains the whole model in memory and cannot run "
                            "with --offload; distill the saved OUTDIR/hf in a second compile")

    def requires(self, state: CompileState) -> None:
        if not state.kind.trains:
            raise PipelineError(f"pass '{self.name}' trains PyTorch modules and cannot run on "
                                f"{state.kind.label} input; distill the PyTorch model, then "
                                "export-onnx")
        self.require_torch(state)
        from slimgraph.l0.train import check_precision

        check_precision(self.precision)
        if state.loaded.tokenizer is None:
            raise PipelineError(f"pass '{self.name}' needs the model's tokenizer to read its "
                                "training data")
        if state.selection:
            raise PipelineError(f"pass '{self.name}': units are selected but not removed; put "
                                "'remove' before 'distill' (training would bring them back)")
        data = self._data(state)
        if not data:
            raise self.option_error("data", "training data is required: data=FILE (text, Alpaca "
                                    "JSON/JSONL) or data=self, or compile --calib-file FILE")
        if data == "self" and self.add_self:  # data=self from the compile's --calib-file
            raise self.option_error("add_self", "the training data is already sampled from "
                                    "the teacher (--calib-file self); give a data file")
        if data != "self" and not Path(data).is_file():
            raise self.option_error("data", f"'{data}' does not exist")

    # -- the pass ---------------------------------------------------------------------
    def _data(self, state: CompileState) -> str:
        return self.data or state.calib.file or ""

    def config(self):
        from slimgraph.l0.train import TrainConfig

        return TrainConfig(steps=self.steps, lora_steps=0, batch=self.batch, accum=self.accum,
                           lr=self.lr, seed=self.seed, save_every=self.save_every,
                           schedule="cosine",
                           warmup=self.steps // 10 if self.warmup is None else self.warmup,
                           weight_decay=self.weight_decay, temperature=self.temperature,
                           hidden_weight=self.hidden_weight, precision=self.precision)

    def examples(self, state: CompileState, teacher):
        from slimgraph.l0.data import load_examples

        data = self._data(state)
        if data == "self":
            return self_examples(state.loaded.tokenizer, teacher, self.seqlen, self.samples,
                                 self.seed, state.progress)
        examples = load_examples(state.loaded.tokenizer, data, "", self.seqlen)
        if self.add_self:
            examples += self_examples(state.loaded.tokenizer, teacher, self.seqlen,
                                      self.add_self, self.seed, state.progress,
                                      self.prompts(state, data))
        return examples

    def prompts(self, state: CompileState, data: str):
        """``add_self`` rows of the first ``self_prompt`` tokens of windows drawn from the
        data file (a different seed from the calibration windows'), or None."""
        if not self.self_prompt:
            return None
        from slimgraph.sparsity.calibration import calibration_tokens, sample_windows

        tokens = calibration_tokens(state.loaded.tokenizer, data)
        return sample_windows(tokens, self.add_self, self.self_prompt, self.seed + 1)

    def lora_targets(self, model: torch.nn.Module) -> list[str]:
        import torch

        names = split_names(self.lora)
        if names == ["all"]:
            leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear)}
            names = [n for n in BLOCK_LINEARS if n in leaves] or sorted(leaves - {"lm_head"})
        return names

    def fingerprint(self, state: CompileState, n_examples: int) -> str:
        desc = (f"{self.describe()}|{self._data(state)}|{n_examples}|"
                f"{sum(p.numel() for p in state.model.parameters())}")
        return hashlib.sha256(desc.encode()).hexdigest()[:16]

    def _checkpoint(self, state: CompileState) -> Path | None:
        if self.checkpoint:
            return Path(self.checkpoint) / "distill.pt"
        keep = getattr(state, "keep_dir", None) or state.out_dir  # OUTDIR, not staging
        return None if keep is None else keep / "distill-checkpoint" / "distill.pt"

    def start(self, state: CompileState):
        """The teacher, the examples, the masks and the session: not yet trained."""
        from slimgraph.l0.train import Session, wrap_lora, zero_masks

        teacher = teacher_model(state, self.teacher)
        check_teacher(teacher, state.model, self.hidden_weight > 0)
        examples = self.examples(state, teacher)
        masks = zero_masks(state.model)
        if self.lora:
            state.model.requires_grad_(False)
            model = wrap_lora(state.model, self.lora_targets(state.model), self.lora_rank,
                              self.lora_alpha, self.seed)
        else:
            state.model.requires_grad_(True)
            model = state.model
        return Session(model, state.model, teacher=teacher), examples, masks

    def run(self, state: CompileState) -> PassResult:
        from slimgraph.l0.train import apply_masks, distill_train

        device = next(state.model.parameters()).device
        params_before = sum(p.numel() for p in state.model.parameters())
        session, examples, masks = self.start(state)
        pad = state.loaded.tokenizer.pad_token_id
        pad = pad if pad is not None else (state.loaded.tokenizer.eos_token_id or 0)
        cfg = self.config()
        distill_train(session, examples, cfg, pad_id=pad, masks=masks,
                      checkpoint=self._checkpoint(state),
                      fingerprint=self.fingerprint(state, len(examples)),
                      progress=state.progress, label=self.name)
        if self.lora:
            merged = session.model.merge_and_unload()
            if merged is not session.base:
                raise RuntimeError("peft returned a different model object after merging")
            apply_masks(masks)  # the merged update is dense: the sparsity pattern wins
        state.model.requires_grad_(False)
        state.model.to(device).eval()
        leaked = sum(int(p.detach()[zero.to(p.device)].ne(0).sum()) for p, zero in masks)
        if leaked:
            raise RuntimeError(f"distill: {leaked} masked weights are no longer zero")
        params_after = sum(p.numel() for p in state.model.parameters())
        if params_after != params_before:
            raise RuntimeError(f"distill changed the parameter count {params_before} -> {params_after}")
        hist = session.history
        report = {"teacher": self.teacher or state.loaded.spec, "data": self._data(state),
                  "examples": len(examples), "sequences_sampled_from_teacher":
                  self.samples if self._data(state) == "self" else self.add_self,
                  "self_prompt_tokens": self.self_prompt,
                  "steps": cfg.steps, "batch": cfg.batch * cfg.accum,
                  "tokens_seen": session.tokens, "train_seconds": round(session.seconds, 1),
                  "tokens_per_second": round(session.tokens / max(session.seconds, 1e-9), 1),
                  "loss_first": hist[0]["loss"] if hist else None,
                  "loss_last": hist[-1]["loss"] if hist else None, "history": hist,
                  "masked_weights": sum(int(z.sum()) for _, z in masks),
                  "precision": self.precision,
                  "training": f"lora {'+'.join(self.lora_targets(state.model))}" if self.lora
                  else "full"}
        return PassResult(True, report)


register(Distill)
