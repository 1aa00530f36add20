"""Calibration data, and the PyTorch pieces of block-sequential calibration.

Blocks are :func:`slimgraph.ir.blocks.find_blocks`'s: the decoder-block linears of the
graph by their block number (not by their channel groups: a projection with no prunable
heads is in its block too), the block's module holding them; the order of the layers is
the order of the residual stream. The walk (capture the inputs of block 0, then for each
block run it with observers on the inputs of its linears, prune them, re-run the pruned
block to produce the next block's inputs) is written once, on a block observer; for a
PyTorch model (:class:`~slimgraph.structured.torch_blocks.TorchBlocks`) this module gives
its pieces: :func:`capture_block_inputs`, :func:`observe_block`, :func:`run_block`.
Memory: one block plus the calibration activations.

Calibration sources: a text file, Alpaca-format JSON/JSONL (instruction, input, output),
or ``self`` (text sampled from the model itself: data-free).
"""

from __future__ import annotations

import copy
import inspect
import json
import random
from pathlib import Path

import torch

from slimgraph.errors import SlimgraphError
from slimgraph.frontends.text_files import read_utf8


class CalibrationError(SlimgraphError):
    """Calibration data is missing, malformed or too short."""


# -- data -------------------------------------------------------------------------------

def read_instructions(path: Path) -> list[dict[str, str]]:
    """Alpaca-format records ``{instruction, input, output}`` from JSON or JSONL (the
    self-instruct seed format with ``instances`` is accepted too). Errors name the file
    and the line or record at fault."""
    raw = read_utf8(path, "calibration file", CalibrationError)
    records = []
    if path.suffix == ".jsonl":
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"line {i}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise CalibrationError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    else:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        records = [(f"record {i}", r) for i, r in enumerate(data if isinstance(data, list) else [data], 1)]
    out = []
    for where, rec in records:
        if not isinstance(rec, dict) or not isinstance(rec.get("instruction"), str):
            raise CalibrationError(f"{path}: {where} has no 'instruction'")
        inp, output = rec.get("input", ""), rec.get("output")
        if output is None and isinstance(rec.get("instances"), list):  # self-instruct seed format
            inst = rec["instances"][0] if rec["instances"] else {}
            inp, output = inst.get("input", ""), inst.get("output", "")
        out.append({"instruction": rec["instruction"], "input": inp or "", "output": output or ""})
    if not out:
        raise CalibrationError(f"{path}: no records")
    return out


def _alpaca_texts(path: Path) -> list[str]:
    return ["\n".join(p for p in (r["instruction"], r["input"], r["output"]) if p)
            for r in read_instructions(path)]


def calibration_tokens(tokenizer, source: str | Path, model=None, *, seqlen: int = 512,
                       samples: int = 64, seed: int = 0, progress=None) -> list[int]:
    """All calibration tokens of a source, tokenized without special tokens. ``self``:
    ``samples`` sequences of ``seqlen`` tokens sampled from ``model`` (``progress(done,
    total, unit="tokens")`` is told how far the generation is)."""
    if str(source) == "self":
        if model is None:
            raise CalibrationError("calibration source 'self' needs the model")
        return self_generated(model, tokenizer, seqlen, samples, seed, progress)
    path = Path(source)
    if not path.is_file():
        raise CalibrationError(f"calibration file '{path}' does not exist")
    if path.suffix in (".json", ".jsonl"):
        text = "\n\n".join(_alpaca_texts(path))
    else:
        text = read_utf8(path, "calibration file", CalibrationError).replace("\r\n", "\n")
    return tokenizer(text, add_special_tokens=False)["input_ids"]


SELF_BATCH = 64  # sequences generated at a time (one KV cache each)


def self_generated(model, tokenizer, seqlen: int, samples: int, seed: int = 0,
                   progress=None, prompts: torch.Tensor | None = None) -> list[int]:
    """Data-free calibration: ``samples`` sequences of ``seqlen + 2`` tokens sampled from
    the model itself (from its BOS token, temperature 1, no top-k / top-p), generated
    ``SELF_BATCH`` at a time with a KV cache; their tokens after BOS, concatenated.
    ``prompts`` (``samples`` rows of K < seqlen + 2 tokens): each sequence continues its
    row instead of starting from BOS, and its ``seqlen + 2`` tokens are the row's K and
    the ``seqlen + 2 - K`` sampled after them.

    A float32 model on a CPU with native bfloat16 matrix units generates from a bfloat16
    copy (about 1.3x faster here); tokens are drawn by inverse-CDF sampling (one uniform
    number per sequence and step: ``torch.multinomial`` over a 49k vocabulary took ten
    times as long as the rest of the sampling)."""
    generator = generation_copy(model)
    rng = torch.Generator().manual_seed(seed)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0
    if prompts is not None and (prompts.dim() != 2 or prompts.shape[0] != samples
                                or not 0 < prompts.shape[1] < seqlen + 2):
        raise CalibrationError(f"prompts must be {samples} rows of 1 to {seqlen + 1} tokens, "
                               f"got shape {tuple(prompts.shape)}")
    total, done = samples * (seqlen + 2), 0
    # transformers 5.25 renamed the cache argument and output field `past_key_values` to `cache`
    cache_name = "cache" if "cache" in inspect.signature(type(generator).forward).parameters \
        else "past_key_values"
    out = []
    for first in range(0, samples, SELF_BATCH):
        n_seq = min(SELF_BATCH, samples - first)
        if prompts is None:
            ids, steps = [torch.full((n_seq, 1), start, dtype=torch.long)], seqlen + 2
        else:  # the prompt is fed whole, its last position gives the first sampled token
            ids = [prompts[first:first + n_seq].long()]
            steps = seqlen + 2 - ids[0].shape[1]
            done += ids[0].numel()
        cache = preallocated_cache(generator, ids[0].shape[1] + steps)
        with torch.no_grad():
            for _ in range(steps):
                res = generator(input_ids=ids[-1], use_cache=True, **{cache_name: cache})
                cache = res.get(cache_name)
                ids.append(sample_next(res.logits[:, -1], rng))
                done += n_seq
                if progress is not None:
                    progress(done, total, unit="tokens", info="generating calibration text")
        out.append(torch.cat(ids if prompts is not None else ids[1:], dim=1))
    return torch.cat(out).reshape(-1).tolist()


def preallocated_cache(model, length: int):
    """A KV cache for ``length`` generated tokens whose layers write each step into
    buffers of that length and hand attention the filled part: transformers' dynamic
    cache concatenates, copying the whole cache every step. None (the model's own dynamic
    cache) when
    the model's config or this transformers version does not allow it."""
    try:
        from transformers.cache_utils import Cache, DynamicLayer
        layers = int(model.config.num_hidden_layers)
    except (ImportError, AttributeError, TypeError, ValueError):
        return None

    class PreallocatedLayer(DynamicLayer):
        def lazy_initialization(self, key_states, value_states) -> None:
            super().lazy_initialization(key_states, value_states)
            self.key_buffer = key_states.new_empty(
                (*key_states.shape[:-2], length, key_states.shape[-1]))
            self.value_buffer = value_states.new_empty(
                (*value_states.shape[:-2], length, value_states.shape[-1]))
            self.filled = 0

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.filled + key_states.shape[-2]
            self.key_buffer[..., self.filled:end, :] = key_states
            self.value_buffer[..., self.filled:end, :] = value_states
            self.filled = end
            self.keys = self.key_buffer[..., :end, :]
            self.values = self.value_buffer[..., :end, :]
            return self.keys, self.values

    try:
        return Cache(layers=[PreallocatedLayer() for _ in range(layers)])
    except TypeError:
        return None


def sample_next(logits: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """One token per row of ``logits`` (rows, vocab), drawn from softmax(logits): the
    first index whose cumulative probability exceeds a uniform draw."""
    cdf = torch.cumsum(torch.softmax(logits.float(), dim=-1), dim=-1)
    u = torch.rand(cdf.shape[0], 1, generator=rng) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).clamp_(max=cdf.shape[-1] - 1)


def generation_copy(model):
    """``model`` itself, or a bfloat16 copy where that is faster: every parameter a float32
    tensor in CPU memory and the CPU computes bfloat16 natively (oneDNN says so)."""
    params = list(model.parameters())
    bf16_native = torch.backends.mkldnn.is_available() and \
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if not bf16_native or not params or \
            any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
        return model
    return copy.deepcopy(model).to(torch.bfloat16).eval()


def sample_windows(tokens: list[int], samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``samples`` windows of ``seqlen`` tokens; starts drawn as BENCHMARK.md says."""
    if samples < 1:
        raise CalibrationError(f"calibration needs at least 1 sample (--calib-samples or the "
                               f"pass's samples option), got {samples}")
    if seqlen < 2:
        raise CalibrationError(f"calibration windows need at least 2 tokens (--calib-seqlen or "
                               f"the pass's seqlen option), got {seqlen}")
    if len(tokens) < seqlen + 2:
        raise CalibrationError(f"calibration text has {len(tokens)} tokens, shorter than one "
                               f"sample of {seqlen}")
    rng = random.Random(seed)
    rows = []
    for _ in range(samples):
        i = rng.randint(0, len(tokens) - seqlen - 1)
        rows.append(tokens[i : i + seqlen])
    return torch.tensor(rows, dtype=torch.long)


# -- blocks: slimgraph/ir/blocks.py (Block, find_blocks) ------------------------------


class _Stop(Exception):
    pass


def _share_equal(value, previous):
    """``value`` with every tensor equal to its counterpart in ``previous`` (same place in
    the same nested tuples/lists/dicts, same dtype and shape) replaced by that counterpart."""
    if isinstance(value, torch.Tensor):
        if (isinstance(previous, torch.Tensor) and previous.dtype == value.dtype
                and previous.shape == value.shape and torch.equal(previous, value)):
            return previous
        return value
    if type(value) in (tuple, list) and type(previous) is type(value) \
            and len(previous) == len(value):
        return type(value)(_share_equal(v, p) for v, p in zip(value, previous))
    if isinstance(value, dict) and isinstance(previous, dict):
        return {k: _share_equal(v, previous.get(k)) for k, v in value.items()}
    return value


def capture_block_inputs(model, block0: torch.nn.Module, windows: torch.Tensor, batch: int
                         ) -> list[tuple[tuple, dict]]:
    """Run the model up to block 0 for every batch of windows; keep block 0's inputs.

    Keyword inputs equal to the previous batch's (rotary cos/sin, position ids: the same
    for every batch of the same size) are kept once and shared by the batches."""
    captured: list[tuple[tuple, dict]] = []

    def hook(_module, args, kwargs):
        if captured:
            kwargs = _share_equal(kwargs, captured[-1][1])
        captured.append((args, kwargs))
        raise _Stop

    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in range(0, len(windows), batch):
                try:
                    model(input_ids=windows[i : i + batch], use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    if len(captured) != (len(windows) + batch - 1) // batch:
        raise SlimgraphError("could not capture the inputs of the first decoder block")
    return captured


def next_inputs(y, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    y = y[0] if isinstance(y, (tuple, list)) else y
    return (y,) + tuple(args[1:]), kwargs


def run_block(block: torch.nn.Module, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """The block's outputs, as inputs for the next block (same kwargs), written over
    ``inputs`` batch by batch (one copy of the activations); returns ``inputs``."""
    with torch.no_grad():
        for j, (args, kwargs) in enumerate(inputs):
            inputs[j] = next_inputs(block(*args, **kwargs), args, kwargs)
    return inputs


def observe_block(module: torch.nn.Module, linears: dict[str, torch.nn.Module], inputs: list, *,
                  hessian: bool, outputs: bool = False) -> tuple[dict, list | None]:
    """Run a block over the calibration inputs, accumulating each linear's input statistics
    (:class:`~slimgraph.sparsity.reconstruct.GramAccumulator`; ``hessian=False``: channel
    norms only). Linears that read the same tensor in a forward (q/k/v, gate/up) share one
    accumulator, so a Gram matrix is built once per distinct input. Returns the
    accumulators by linear name and, with ``outputs=True``, the block's outputs as the
    next block's inputs (the same forward: no second run of the block), written over
    ``inputs`` batch by batch as :func:`run_block` does."""
    from slimgraph.sparsity.reconstruct import GramAccumulator

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
            for j, (args, kwargs) in enumerate(inputs):
                batch_seen.clear()
                y = module(*args, **kwargs)
                if outputs:
                    inputs[j] = next_inputs(y, args, kwargs)
    finally:
        for h in hooks:
            h.remove()
    return accs, inputs if outputs else None
