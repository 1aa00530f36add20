"""The training loop of `l0` and `distill`: accelerate, one loop, two objectives.

``train`` (``l0``): LoRA (peft) + hard-concrete gates + Lagrangian. Schedule
(ALGORITHMS.md §4, in optimizer steps): ``lora_steps`` LoRA-only steps, then the gates are
sampled and the target sparsity ramps linearly from 0 to ``target`` over ``ramp_steps``,
then stays. Loss ``L + λ₁(ŝ−S) + λ₂(ŝ−S)²`` per constrained kind, ``L`` the LM loss or,
with a teacher, the distillation loss; the λ are trained by gradient ascent
(``maximize=True``).

``distill_train`` (``distill``): the student's weights (all of them, or LoRA) trained on
``T² KL(teacher ‖ student)`` (+ ``hidden_weight`` × hidden-state MSE), learning rate with
linear warm-up and cosine decay; with ``precision="bf16"`` the forward and backward passes
(teacher's included) run under bfloat16 autocast, about twice as fast on CPUs with AMX or
AVX-512 BF16 and on recent GPUs, while weights, optimizer state and losses stay float32;
weights that were exactly zero before training (sparsity masks) are kept exactly zero:
their gradients are masked and they are re-zeroed after every step.

Everything random depends only on (seed, micro-batch index): a run resumed from a
checkpoint equals an uninterrupted one. Several processes (``accelerate launch
--multi_gpu --num_processes N`` or ``torchrun``; on a machine without GPUs the processes
run on the CPU with gloo) split every global batch of ``batch`` examples into equal
shares; token losses are sums divided by the token count of the global batch, so N
processes compute the gradients one process would. Only the main process writes
checkpoints; it reads them and sends them to the others.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimgraph.errors import PipelineError
from slimgraph.io import atomic_write_bytes
from slimgraph.l0.data import Example, batch_indices, collate
from slimgraph.l0.distill_loss import ce_sum, hidden_mse_sum, kl_sum, scored_positions

GATES_ATTR = "slimgraph_l0_gates"


@dataclass
class TrainConfig:
    steps: int = 200
    lora_steps: int = 25
    ramp_steps: int = 100
    batch: int = 4  # examples per optimizer step and micro-batch, over all processes
    accum: int = 1
    lr: float = 1e-4
    mask_lr: float = 0.1
    lambda_lr: float = 0.1
    seed: int = 0
    targets: dict[str, float] = field(default_factory=lambda: {"all": 0.2})  # all|heads|mlp
    save_every: int = 50
    log_every: int = 10
    # learning rate of the weights: constant, or linear warm-up then cosine decay to 0
    schedule: str = "constant"  # constant | cosine
    warmup: int = 0
    weight_decay: float = 0.0
    # distillation (with a teacher): temperature, weight of the hidden-state MSE
    temperature: float = 1.0
    hidden_weight: float = 0.0
    # arithmetic of the forward/backward passes: fp32, or bf16 autocast (weights, optimizer
    # state and losses stay float32)
    precision: str = "fp32"


def check_precision(precision: str) -> None:
    """Refuse a precision this machine cannot run: bf16 on a CUDA device without it."""
    if precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise PipelineError("option 'precision': this GPU has no bfloat16; "
                            "use precision=fp32")


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` on ``device`` (disabled for fp32)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=precision == "bf16")


def target_at(step: int, final: float, cfg: TrainConfig) -> float:
    if step < cfg.lora_steps:
        return 0.0
    if cfg.ramp_steps <= 0:
        return final
    return final * min(1.0, (step - cfg.lora_steps + 1) / cfg.ramp_steps)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the weights' learning rate at optimizer step ``step`` (0-based)."""
    if cfg.schedule == "constant":
        return 1.0
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    span = max(cfg.steps - cfg.warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (step - cfg.warmup) / span))


@dataclass
class Session:
    """What the loop trains: the model (peft-wrapped for LoRA), the original model object,
    the gates (``l0``), the teacher (distillation) and the progress so far."""

    model: torch.nn.Module  # the model trained (a peft model for LoRA)
    base: torch.nn.Module  # the original model object (modified in place by peft)
    gates: Any = None  # gates.GateSet (l0)
    size: Any = None  # gates.SizeModel (l0)
    history: list[dict[str, float]] = field(default_factory=list)
    step: int = 0
    seconds: float = 0.0
    tokens: int = 0  # tokens seen (all processes)
    teacher: torch.nn.Module | None = None  # frozen; distillation loss when set

    def sparsity(self, kind: str | None = None) -> float:
        with torch.no_grad():
            return float(self.size.expected_sparsity(self.gates.probs(), kind))


# the LoRA targets when the default q_proj / v_proj do not exist: fused attention input
# projections (Phi-3, GPT-NeoX / Falcon, MPT, Baichuan)
FUSED_QKV = ("qkv_proj", "query_key_value", "Wqkv", "W_pack")


def wrap_lora(model: torch.nn.Module, targets: list[str], rank: int, alpha: int, seed: int,
              fallback: tuple[str, ...] = ()):
    """peft LoRA on the linears whose name ends with one of ``targets`` (else, if none
    does, with one of ``fallback``)."""
    from peft import LoraConfig, get_peft_model

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    hit = [n for n in names if n.rsplit(".", 1)[-1] in targets]
    if not hit and fallback:
        targets = [t for t in fallback if any(n.rsplit(".", 1)[-1] == t for n in names)]
        hit = targets
    if not hit:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise PipelineError(f"option 'lora': no linear named "
                            f"{' or '.join(targets)}; this model's linears are: {', '.join(leaves)}")
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                     bias="none")
    return get_peft_model(model, cfg)


def _lagrangian(session: Session, cfg: TrainConfig, step: int
                ) -> tuple[torch.Tensor, dict[str, float]]:
    probs = session.gates.probs()
    total = torch.zeros(())
    info = {}
    for name, final in cfg.targets.items():
        s_hat = session.size.expected_sparsity(probs, None if name == "all" else name)
        gap = s_hat - target_at(step, final, cfg)
        lam = session.gates.lambdas[name]
        total = total + lam[0] * gap + lam[1] * gap * gap
        info[f"sparsity_{name}"] = s_hat.item()
        info[f"lambda1_{name}"] = lam[0].item()
    return total, info


# -- checkpoints --------------------------------------------------------------------------

def _trained(session: Session) -> dict[str, torch.nn.Parameter]:
    """The parameters a checkpoint holds: the model's trainable ones and the λ (which
    are not part of the model)."""
    out = {n: p for n, p in session.model.named_parameters() if p.requires_grad}
    if session.gates is not None:
        out.update({f"{GATES_ATTR}.lambdas.{n}": p for n, p in session.gates.lambdas.named_parameters()
                    if p.requires_grad})
    return out


def _checkpoint_state(session: Session, opts: list[torch.optim.Optimizer], fingerprint: str) -> bytes:
    trainable = {n: p.detach().cpu().clone() for n, p in _trained(session).items()}
    buf = io.BytesIO()
    torch.save({"fingerprint": fingerprint, "step": session.step, "seconds": session.seconds,
                "tokens": session.tokens, "trainable": trainable,
                "optimizers": [o.state_dict() for o in opts], "history": session.history}, buf)
    return buf.getvalue()


def _read_checkpoint(path: Path, fingerprint: str, label: str) -> dict:
    try:
        # data only: a checkpoint in OUTDIR may have been planted by someone else
        ck = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ck, dict):
            raise ValueError("not a checkpoint dictionary")
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign checkpoint: say which file
        why = "it holds more than tensors and plain data, which are never unpickled" \
            if "weights_only" in str(e) else (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PipelineError(f"checkpoint '{path}' cannot be read ({why}); delete "
                            "it to start over") from None
    if ck.get("fingerprint") != fingerprint:
        raise PipelineError(f"checkpoint '{path}' was written by a different "
                            f"{label} run ({ck.get('fingerprint')}); delete it or use another "
                            "output directory")
    return ck


def _restore(acc, session: Session, opts: list[torch.optim.Optimizer], path: Path,
             fingerprint: str, label: str) -> None:
    """The main process reads the checkpoint (if there is one) and sends it to the
    others, which need not see the same file system."""
    payload: Any = None
    if acc.is_main_process and path.is_file():
        try:
            payload = _read_checkpoint(path, fingerprint, label)
        except PipelineError as e:
            payload = str(e)
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [payload]
        broadcast_object_list(box, from_process=0)
        payload = box[0]
    if payload is None:
        return
    if isinstance(payload, str):
        raise PipelineError(payload)
    params = _trained(session)
    with torch.no_grad():
        for name, val in payload["trainable"].items():
            params[name].copy_(val)
    for o, s in zip(opts, payload["optimizers"]):
        o.load_state_dict(s)
    session.step, session.seconds = payload["step"], payload["seconds"]
    session.tokens, session.history = payload.get("tokens", 0), payload["history"]


# -- the loop -----------------------------------------------------------------------------

def accelerator(cfg: TrainConfig, find_unused: bool = False):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused else []
    return Accelerator(gradient_accumulation_steps=cfg.accum, cpu=not torch.cuda.is_available(),
                       kwargs_handlers=handlers)


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


Objective = Callable[[torch.nn.Module, dict[str, torch.Tensor], int, int],
                     tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]]


def _loop(acc, session: Session, opts: list[torch.optim.Optimizer], examples: list[Example],
          cfg: TrainConfig, *, pad_id: int, objective: Objective, label: str,
          before_step: Callable[[], None] | None = None,
          after_step: Callable[[], None] | None = None,
          checkpoint: Path | None = None, fingerprint: str = "",
          progress: Callable[..., None] | None = None,
          shown: Callable[[dict], list[str]] | None = None) -> torch.nn.Module:
    """Run ``cfg.steps`` optimizer steps on ``session``; returns the prepared model.
    ``objective(model, batch, step, k)`` -> (sum of the token losses of the process's
    share of micro-batch ``k``, a loss term not per token (the same on every process) or
    None, values to log)."""
    world, rank = acc.num_processes, acc.process_index
    if cfg.batch % world:
        raise PipelineError(f"option 'batch': {cfg.batch} examples cannot be "
                            f"shared equally by {world} processes")
    per = cfg.batch // world
    base_lr = [g["lr"] for g in opts[0].param_groups]  # before a checkpoint's lr replaces it
    if checkpoint is not None:
        _restore(acc, session, opts, checkpoint, fingerprint, label)
    model, *popts = acc.prepare(session.model, *opts)
    model.train()
    t0 = time.perf_counter() - session.seconds
    t_run, step0, tokens0 = time.perf_counter(), session.step, session.tokens
    tokens_run = 0
    while session.step < cfg.steps:
        step = session.step
        for g, lr in zip(opts[0].param_groups, base_lr):
            g["lr"] = lr * lr_factor(step, cfg)
        for micro in range(cfg.accum):
            k = step * cfg.accum + micro
            chosen = [examples[i] for i in batch_indices(len(examples), cfg.batch, k, cfg.seed)]
            count = max(1, sum(sum(lab != -100 for lab in e.labels[1:]) for e in chosen))
            tokens_run += sum(len(e.ids) for e in chosen)
            batch = collate(chosen[rank * per:(rank + 1) * per], pad_id)
            batch = {n: t.to(acc.device) for n, t in batch.items()}
            with acc.accumulate(model):
                with autocast(acc.device, cfg.precision):
                    tok_sum, extra, info = objective(model, batch, step, k)
                loss = tok_sum * (world / count)
                if extra is not None:
                    loss = loss + extra
                acc.backward(loss)
                if before_step is not None:
                    before_step()
                for o in popts:
                    o.step()
                    o.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        mean = tok_sum.detach().reshape(1)
        if world > 1:
            mean = acc.reduce(mean, reduction="sum")
        mean = float(mean) / count
        session.step += 1
        session.seconds = time.perf_counter() - t0
        session.tokens = tokens0 + tokens_run
        rec = {"step": session.step, "loss": round(mean, 4), **{k: round(v, 4) for k, v in info.items()}}
        done_here = session.step - step0
        elapsed = time.perf_counter() - t_run
        if session.step % cfg.log_every == 0 or session.step == cfg.steps:
            session.history.append(rec)
        if progress:
            tok_s = tokens_run / max(elapsed, 1e-9)
            eta = elapsed / done_here * (cfg.steps - session.step)
            parts = [f"loss {mean:.4f}"] + (shown(rec) if shown else []) + \
                [f"{tok_s:,.0f} tok/s", f"ETA {_duration(eta)}"]
            progress(session.step, cfg.steps, unit="steps", info=", ".join(parts))
        if checkpoint is not None and acc.is_main_process and (
                session.step % cfg.save_every == 0 or session.step == cfg.steps):
            atomic_write_bytes(checkpoint, _checkpoint_state(session, opts, fingerprint))
    return model


def _teacher_outputs(teacher: torch.nn.Module, batch: dict[str, torch.Tensor], hidden: bool):
    with torch.no_grad():
        return teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False, output_hidden_states=hidden)


def token_loss(session: Session, model: torch.nn.Module, batch: dict[str, torch.Tensor],
               cfg: TrainConfig) -> torch.Tensor:
    """Sum over the scored tokens of the training loss: the distillation loss
    (``T² KL`` + ``hidden_weight`` × hidden MSE) when the session has a teacher, else the
    language-modelling loss."""
    hidden = session.teacher is not None and cfg.hidden_weight > 0
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                use_cache=False, output_hidden_states=hidden)
    if session.teacher is None:
        return ce_sum(out.logits, batch["labels"])
    ref = _teacher_outputs(session.teacher, batch, hidden)
    scored = scored_positions(batch["labels"])
    loss = kl_sum(out.logits, ref.logits, scored, cfg.temperature)
    if hidden:
        loss = loss + cfg.hidden_weight * hidden_mse_sum(out.hidden_states, ref.hidden_states, scored)
    return loss


def train(session: Session, examples: list[Example], cfg: TrainConfig, *, pad_id: int,
          checkpoint: Path | None = None, fingerprint: str = "",
          progress: Callable[..., None] | None = None, finetune: bool = False) -> Session:
    """``l0``: train LoRA and (unless ``finetune``: gates frozen at their final values)
    the gates."""
    acc = accelerator(cfg, find_unused=True)  # LoRA-only steps leave the gates unused
    model = session.model
    gates = session.gates
    # log α trains with the model (DDP, FSDP); the λ are not read by the forward pass
    # and stay outside (their gradient is the same on every process)
    model.base_model.model.add_module(GATES_ATTR, gates.log_alpha)
    gates.lambdas.to(acc.device)
    if session.teacher is not None:
        session.teacher.to(acc.device)
    gates.install(session.base)
    lora_params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    opts = [torch.optim.AdamW(lora_params, lr=cfg.lr, weight_decay=0.0)]
    if not finetune:
        for p in gates.parameters():
            p.requires_grad_(True)
        opts.append(torch.optim.AdamW(list(gates.log_alpha.parameters()), lr=cfg.mask_lr,
                                      weight_decay=0.0))
        opts.append(torch.optim.AdamW(list(gates.lambdas.parameters()), lr=cfg.lambda_lr,
                                      weight_decay=0.0, maximize=True))
    else:
        for p in gates.parameters():
            p.requires_grad_(False)

    def objective(m, batch, step, k):
        masks_on = finetune or step >= cfg.lora_steps
        if finetune:
            gates.set_deterministic()
        elif masks_on:
            gates.sample(torch.Generator().manual_seed(cfg.seed * 1_000_003 + k))
        else:
            gates.open()
        tok = token_loss(session, m, batch, cfg)
        if masks_on and not finetune:
            lag, info = _lagrangian(session, cfg, step)
            info["target"] = target_at(step, cfg.targets.get("all", 0.0), cfg)
            return tok, lag.to(tok.device), info
        return tok, None, {"target": target_at(step, cfg.targets.get("all", 0.0), cfg)}

    def shown(rec):
        if "sparsity_all" not in rec:
            return []
        return [f"ŝ {rec['sparsity_all']:.3f}/{rec['target']:.3f}", f"λ1 {rec['lambda1_all']:+.3f}"]

    try:
        prepared = _loop(acc, session, opts, examples, cfg, pad_id=pad_id, objective=objective,
                         label="l0", after_step=gates.clamp_, checkpoint=checkpoint,
                         fingerprint=fingerprint, progress=progress, shown=shown)
    finally:
        delattr(session.model.base_model.model, GATES_ATTR)
    session.model = acc.unwrap_model(prepared)
    return session


def zero_masks(model: torch.nn.Module) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(parameter, where it is exactly zero) for every weight matrix holding exact zeros:
    the sparsity masks training must keep."""
    out = []
    for _, p in model.named_parameters():
        if p.dim() >= 2:
            zero = p.detach() == 0
            if bool(zero.any()):
                out.append((p, zero))
    return out


def apply_masks(masks: list[tuple[torch.nn.Parameter, torch.Tensor]], grads: bool = False) -> None:
    """Zero the masked weights (``grads``: their gradients) again."""
    with torch.no_grad():
        for p, zero in masks:
            t = p.grad if grads else p
            if t is not None:
                t.masked_fill_(zero.to(t.device), 0.0)


def distill_train(session: Session, examples: list[Example], cfg: TrainConfig, *, pad_id: int,
                  masks: list[tuple[torch.nn.Parameter, torch.Tensor]],
                  checkpoint: Path | None = None, fingerprint: str = "",
                  progress: Callable[..., None] | None = None, label: str = "distill") -> Session:
    """``distill``: train the trainable parameters of ``session.model`` (every weight, or
    LoRA's) on the distillation loss from ``session.teacher``; ``masks`` (from
    :func:`zero_masks`, taken before training) stay exactly zero."""
    acc = accelerator(cfg)
    session.teacher.to(acc.device)
    params = [p for p in session.model.parameters() if p.requires_grad]
    opts = [torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)]
    trained = {id(p) for p in params}
    grad_masks = [(p, z) for p, z in masks if id(p) in trained]

    def objective(m, batch, step, k):
        return token_loss(session, m, batch, cfg), None, {}

    prepared = _loop(acc, session, opts, examples, cfg, pad_id=pad_id, objective=objective,
                     label=label, before_step=lambda: apply_masks(grad_masks, grads=True),
                     after_step=lambda: apply_masks(grad_masks), checkpoint=checkpoint,
                     fingerprint=fingerprint, progress=progress)
    session.model = acc.unwrap_model(prepared)
    return session
