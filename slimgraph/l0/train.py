"""The L0 training loop: LoRA (peft) + hard-concrete gates + Lagrangian, on accelerate.

Schedule (ALGORITHMS.md §4, in optimizer steps): ``lora_steps`` LoRA-only steps, then the
gates are sampled and the target sparsity ramps linearly from 0 to ``target`` over
``ramp_steps``, then stays. Loss ``L_LM + λ₁(ŝ−S) + λ₂(ŝ−S)²`` per constrained kind; the
λ are trained by gradient ascent (``maximize=True``). Everything random depends only on
(seed, micro-batch index): a run resumed from a checkpoint equals an uninterrupted one.

Runs unchanged under ``accelerate launch`` (several GPUs, FSDP/DeepSpeed): the gates are a
submodule of the prepared model while training.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimgraph.errors import PipelineError
from slimgraph.io import atomic_write_bytes
from slimgraph.l0.data import Example, batch_indices, collate
from slimgraph.l0.gates import GateSet

GATES_ATTR = "slimgraph_l0_gates"


@dataclass
class TrainConfig:
    steps: int = 200
    lora_steps: int = 25
    ramp_steps: int = 100
    batch: int = 4
    accum: int = 1
    lr: float = 1e-4
    mask_lr: float = 0.1
    lambda_lr: float = 0.1
    seed: int = 0
    targets: dict[str, float] = field(default_factory=lambda: {"all": 0.2})  # all|heads|mlp
    save_every: int = 50
    log_every: int = 10


def target_at(step: int, final: float, cfg: TrainConfig) -> float:
    if step < cfg.lora_steps:
        return 0.0
    if cfg.ramp_steps <= 0:
        return final
    return final * min(1.0, (step - cfg.lora_steps + 1) / cfg.ramp_steps)


@dataclass
class Session:
    """A model wrapped with LoRA, with gates installed; what ``train`` works on."""

    model: torch.nn.Module  # the peft model
    base: torch.nn.Module  # the original model object (modified in place by peft)
    gates: GateSet
    size: Any  # gates.SizeModel
    history: list[dict[str, float]] = field(default_factory=list)
    step: int = 0
    seconds: float = 0.0

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
        raise PipelineError(f"pass 'l0', option 'lora': no linear named {' or '.join(targets)}; "
                            f"this model's linears are: {', '.join(leaves)}")
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


def _checkpoint_state(session: Session, opts: list[torch.optim.Optimizer], fingerprint: str) -> bytes:
    trainable = {n: p.detach().cpu().clone() for n, p in session.model.named_parameters()
                 if p.requires_grad}
    buf = io.BytesIO()
    torch.save({"fingerprint": fingerprint, "step": session.step, "seconds": session.seconds,
                "trainable": trainable, "optimizers": [o.state_dict() for o in opts],
                "history": session.history}, buf)
    return buf.getvalue()


def _restore(session: Session, opts: list[torch.optim.Optimizer], path: Path, fingerprint: str) -> None:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a corrupt checkpoint: say which file
        raise PipelineError(f"pass 'l0': checkpoint '{path}' cannot be read ({e}); delete it "
                            "to start over") from None
    if ck.get("fingerprint") != fingerprint:
        raise PipelineError(f"pass 'l0': checkpoint '{path}' was written by a different l0 run "
                            f"({ck.get('fingerprint')}); delete it or use another output directory")
    params = dict(session.model.named_parameters())
    with torch.no_grad():
        for name, val in ck["trainable"].items():
            params[name].copy_(val)
    for o, s in zip(opts, ck["optimizers"]):
        o.load_state_dict(s)
    session.step, session.seconds, session.history = ck["step"], ck["seconds"], ck["history"]


def train(session: Session, examples: list[Example], cfg: TrainConfig, *, pad_id: int,
          checkpoint: Path | None = None, fingerprint: str = "",
          progress: Callable[..., None] | None = None, finetune: bool = False) -> Session:
    """Train LoRA and (unless ``finetune``: gates frozen at their final values) the gates."""
    from accelerate import Accelerator

    acc = Accelerator(gradient_accumulation_steps=cfg.accum, cpu=not torch.cuda.is_available())
    model = session.model
    gates = session.gates
    model.base_model.model.add_module(GATES_ATTR, gates)  # trained with the model (DDP, FSDP)
    gates.install(session.base)
    lora_params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    opt_lora = torch.optim.AdamW(lora_params, lr=cfg.lr, weight_decay=0.0)
    opts = [opt_lora]
    if not finetune:
        for p in gates.parameters():
            p.requires_grad_(True)
        opt_gate = torch.optim.AdamW(list(gates.log_alpha.parameters()), lr=cfg.mask_lr,
                                     weight_decay=0.0)
        opt_lambda = torch.optim.AdamW(list(gates.lambdas.parameters()), lr=cfg.lambda_lr,
                                       weight_decay=0.0, maximize=True)
        opts += [opt_gate, opt_lambda]
    else:
        for p in gates.parameters():
            p.requires_grad_(False)
    if checkpoint is not None and checkpoint.is_file():
        _restore(session, opts, checkpoint, fingerprint)
    model, *opts = acc.prepare(model, *opts)
    model.train()
    t0 = time.perf_counter() - session.seconds
    try:
        while session.step < cfg.steps:
            step = session.step
            masks_on = finetune or step >= cfg.lora_steps
            for micro in range(cfg.accum):
                k = step * cfg.accum + micro
                batch = collate([examples[i] for i in batch_indices(len(examples), cfg.batch, k,
                                                                      cfg.seed)], pad_id)
                batch = {n: t.to(acc.device) for n, t in batch.items()}
                with acc.accumulate(model):
                    if finetune:
                        gates.set_deterministic()
                    elif masks_on:
                        gates.sample(torch.Generator().manual_seed(cfg.seed * 1_000_003 + k))
                    else:
                        gates.open()
                    lm = model(**batch, use_cache=False).loss
                    loss = lm
                    info: dict[str, float] = {}
                    if masks_on and not finetune:
                        lag, info = _lagrangian(session, cfg, step)
                        loss = lm + lag
                    acc.backward(loss)
                    for o in opts:
                        o.step()
                        o.zero_grad(set_to_none=True)
            gates.clamp_()
            session.step += 1
            session.seconds = time.perf_counter() - t0
            rec = {"step": session.step, "loss": round(lm.item(), 4),
                   "target": round(target_at(step, cfg.targets.get("all", 0.0), cfg), 4),
                   **{k: round(v, 4) for k, v in info.items()}}
            if session.step % cfg.log_every == 0 or session.step == cfg.steps:
                session.history.append(rec)
            if progress:
                shown = [f"loss {rec['loss']:.3f}"]
                if "sparsity_all" in rec:
                    shown.append(f"ŝ {rec['sparsity_all']:.3f}/{rec['target']:.3f}")
                    shown.append(f"λ1 {rec['lambda1_all']:+.3f}")
                progress(session.step, cfg.steps, unit="steps", info=", ".join(shown))
            if checkpoint is not None and (session.step % cfg.save_every == 0 or
                                           session.step == cfg.steps):
                atomic_write_bytes(checkpoint, _checkpoint_state(session, opts, fingerprint))
    finally:
        delattr(acc.unwrap_model(model).base_model.model, GATES_ATTR)
    session.model = acc.unwrap_model(model)
    return session
