"""Distillation and language-modelling losses as tensors-in functions.

Every function returns a **sum over the scored token positions** (not a mean), so a
training loop can divide by the number of scored tokens of the whole global batch: with
several processes each one holds part of the batch, and sum / global count gives the
same loss (and gradients) as one process holding all of it.

Position ``t`` of a causal LM predicts token ``t + 1``; it is scored where the label of
``t + 1`` is not ``IGNORE`` (the convention of Hugging Face's shifted loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, L - 1]``: the positions whose next-token prediction is scored."""
    return labels[:, 1:] != IGNORE


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, scored: torch.Tensor,
           temperature: float = 1.0) -> torch.Tensor:
    """``T² · Σ_t KL(p_teacher,t ‖ p_student,t)`` over the scored positions, where the
    distributions are the softmax of the logits divided by ``T``. Logits ``[B, L, V]``
    (position ``L - 1`` is not scored), ``scored`` ``[B, L - 1]`` from
    :func:`scored_positions`. Computed in float32."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ")
    s = student_logits[:, :-1][scored].float() / temperature
    t = teacher_logits[:, :-1][scored].float() / temperature
    log_p_s = F.log_softmax(s, dim=-1)
    log_p_t = F.log_softmax(t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return kl * (temperature * temperature)


def ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``Σ_t −log p(label_{t+1})`` over the scored positions (the LM loss times its
    token count)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE, reduction="sum")


def hidden_mse_sum(student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...],
                   scored: torch.Tensor) -> torch.Tensor:
    """Mean over layers of ``Σ_t mean_d (h_s − h_t)²`` over the scored positions (the
    hidden state at ``t`` is the one that predicts ``t + 1``). The tuples are the
    models' ``hidden_states`` (embeddings, then each layer's output); the embeddings are
    skipped. Hidden sizes and layer counts must match."""
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"student has {len(student_hidden) - 1} layers, teacher "
                         f"{len(teacher_hidden) - 1}")
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    layers = list(zip(student_hidden[1:], teacher_hidden[1:]))
    for hs, ht in layers:
        if hs.shape != ht.shape:
            raise ValueError(f"student hidden states {tuple(hs.shape)} and teacher "
                             f"{tuple(ht.shape)} differ")
        d = (hs[:, :-1][scored].float() - ht[:, :-1][scored].float())
        total = total + d.pow(2).mean(dim=-1).sum()
    return total / max(len(layers), 1)
