"""Training data for L0 pruning and the collaborative prompt.

Two sources:
- Alpaca-format instructions (JSON/JSONL: instruction, input, output): each example is
  ``prompt + instruction (+ input) + response``, with the loss on the response only;
- plain text: windows of ``seqlen`` tokens, each after the prompt, loss on the window.

The collaborative prompt (ALGORITHMS.md §4) is prepended to every example, in training
and, with ``slimgraph eval --prompt``, in evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from slimgraph.errors import PipelineError
from slimgraph.evaluation import tokenize
from slimgraph.frontends.text_files import read_utf8

COLLABORATIVE_PROMPT = (
    "You are a language model that is being compressed: some of your attention heads and "
    "neurons are being removed so that you run faster and use less memory. Your answers "
    "and your predictions of text must stay as accurate and fluent as before. Cooperate "
    "with the compression: carry what matters in the parts of you that remain, and keep "
    "doing your best on every task.\n\n"
)

IGNORE = -100


def prompt_text(prompt: str, prompt_file: str) -> str:
    """The prompt to prepend: the project's wording, a user file, or none."""
    if prompt_file:
        path = Path(prompt_file)
        if not path.is_file():
            raise PipelineError(f"option 'prompt_file': '{path}' does not exist")
        text = read_utf8(path, "option 'prompt_file': file", PipelineError)
        if not text.strip():
            raise PipelineError(f"option 'prompt_file': '{path}' is empty")
        return text
    if prompt == "none":
        return ""
    if prompt == "default":
        return COLLABORATIVE_PROMPT
    raise PipelineError(f"option 'prompt': {prompt!r} is not 'default' or "
                        "'none' (give your own wording with prompt_file=FILE)")


@dataclass
class Example:
    ids: list[int]
    labels: list[int]


def instruction_examples(tokenizer, path: Path, prompt: str, seqlen: int) -> list[Example]:
    from slimgraph.sparsity.calibration import read_instructions

    p_ids = tokenize(tokenizer, prompt) if prompt else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for rec in read_instructions(path):
        head = f"### Instruction:\n{rec['instruction']}\n\n"
        if rec["input"]:
            head += f"### Input:\n{rec['input']}\n\n"
        head += "### Response:\n"
        context = p_ids + tokenize(tokenizer, head)
        response = tokenize(tokenizer, rec["output"]) + eos
        ids = (context + response)[:seqlen]
        labels = ([IGNORE] * len(context) + response)[:seqlen]
        if any(lab != IGNORE for lab in labels):
            out.append(Example(ids, labels))
    return out


def text_examples(tokenizer, path: Path, prompt: str, seqlen: int) -> list[Example]:
    text = read_utf8(path, "option 'data': file", PipelineError)
    text = text.replace("\r\n", "\n")
    tokens = tokenize(tokenizer, text)
    p_ids = tokenize(tokenizer, prompt) if prompt else []
    body = seqlen - len(p_ids)
    if body < 2:
        raise PipelineError(f"option 'seqlen': {seqlen} leaves no room after the "
                            f"{len(p_ids)}-token prompt")
    out = []
    for i in range(0, len(tokens) - 1, body):
        window = tokens[i : i + body]
        if len(window) < 2:
            break
        out.append(Example(p_ids + window, [IGNORE] * len(p_ids) + window))
    return out


def load_examples(tokenizer, data: str, prompt: str, seqlen: int) -> list[Example]:
    path = Path(data)
    if not path.is_file():
        raise PipelineError(f"option 'data': '{path}' does not exist")
    if path.suffix in (".json", ".jsonl"):
        examples = instruction_examples(tokenizer, path, prompt, seqlen)
    else:
        examples = text_examples(tokenizer, path, prompt, seqlen)
    if not examples:
        raise PipelineError(f"option 'data': '{path}' gives no training examples "
                            f"(empty, or every response falls beyond seqlen={seqlen})")
    return examples


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    n = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def batch_indices(n: int, batch: int, k: int, seed: int) -> list[int]:
    """Example indices of micro-batch ``k``: a stream of per-epoch permutations, so the
    data order depends only on (seed, k) and a resumed run sees the same batches."""
    out = []
    start = k * batch
    for pos in range(start, start + batch):
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(perm[i]))
    return out
