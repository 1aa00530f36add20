"""Data-free calibration (``--calib-file self``): sequences sampled from the model, in
batches with a KV cache, with progress."""

from __future__ import annotations

import torch

from slimgraph.sparsity import calibration
from slimgraph.sparsity.calibration import calibration_tokens, sample_windows
from tests import zoo


def test_self_generates_every_sample_in_batches_and_reports_progress(monkeypatch):
    model, tok = zoo.build("llama", seed=0).eval(), zoo.tiny_tokenizer()
    monkeypatch.setattr(calibration, "SELF_BATCH", 2)  # 5 sequences: batches of 2, 2, 1
    calls = []
    orig = model.forward

    def counting_forward(*args, **kwargs):
        ids = kwargs["input_ids"]
        calls.append(ids.shape)
        assert kwargs.get("use_cache") is True  # the KV cache is on
        return orig(*args, **kwargs)

    monkeypatch.setattr(calibration, "generation_copy", lambda m: m)
    monkeypatch.setattr(model, "forward", counting_forward)
    seen = []
    tokens = calibration_tokens(tok, "self", model, seqlen=16, samples=5, seed=3,
                                progress=lambda done, total, **kw: seen.append((done, total, kw)))
    # one token per sequence and step: the KV cache holds the earlier ones
    assert calls == [(2, 1)] * 18 + [(2, 1)] * 18 + [(1, 1)] * 18
    assert len(tokens) == 5 * 18  # seqlen + 2 tokens after BOS per sequence
    assert all(0 <= t < zoo.VOCAB for t in tokens)
    assert seen[-1][0] == seen[-1][1] == 5 * 18 and seen[-1][2]["unit"] == "tokens"
    assert [d for d, _, _ in seen] == sorted(d for d, _, _ in seen)
    # the same seed gives the same text; windows come from all five sequences
    again = calibration_tokens(tok, "self", model, seqlen=16, samples=5, seed=3)
    assert again == tokens
    windows = sample_windows(tokens, 5, 16, 0)
    assert windows.shape == (5, 16) and windows.dtype == torch.long


def test_inverse_cdf_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.0, 0.0, 1.0]]).clamp_min(1e-30))
    rng = torch.Generator().manual_seed(0)
    draws = torch.cat([calibration.sample_next(logits, rng) for _ in range(4000)], dim=1)
    assert draws.shape == (2, 4000) and draws.dtype == torch.long
    freq = torch.bincount(draws[0], minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.1, 0.6, 0.3]), atol=0.03)
    assert (draws[1] == 2).all()  # an impossible token is never drawn


def test_generation_copy_is_bfloat16_only_for_a_float32_cpu_model(monkeypatch):
    model = zoo.build("llama", seed=0).eval()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    copied = calibration.generation_copy(model)
    assert copied is not model and next(copied.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32  # the input model is untouched
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert calibration.generation_copy(model) is model
    half = zoo.build("llama", seed=0).to(torch.float16)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert calibration.generation_copy(half) is half


def test_the_preallocated_cache_gives_the_dynamic_caches_logits(monkeypatch):
    """Generation writes the KV cache into buffers sized for the whole run instead of
    concatenating every step: the logits are those of transformers' own cache, and the
    buffers are written in place."""
    import inspect

    model = zoo.build("llama", seed=0).eval()
    name = "cache" if "cache" in inspect.signature(type(model).forward).parameters \
        else "past_key_values"
    ids = torch.randint(0, zoo.VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    cache = calibration.preallocated_cache(model, ids.shape[1])
    assert cache is not None
    dynamic = None
    with torch.no_grad():
        for t in range(ids.shape[1]):
            got = model(input_ids=ids[:, t:t + 1], use_cache=True, **{name: cache})
            want = model(input_ids=ids[:, t:t + 1], use_cache=True, **{name: dynamic})
            dynamic = want.get(name)
            assert torch.allclose(got.logits, want.logits, atol=1e-5, rtol=1e-5), t
            if t == 0:
                buffer = cache.layers[0].key_buffer.data_ptr()
    assert cache.layers[0].key_buffer.data_ptr() == buffer
    assert cache.get_seq_length() == dynamic.get_seq_length() == ids.shape[1]
    # the whole generation: the same text as with the dynamic cache
    tok = zoo.tiny_tokenizer()
    tokens = calibration_tokens(tok, "self", model, seqlen=10, samples=3, seed=2)
    monkeypatch.setattr(calibration, "preallocated_cache", lambda m, n: None)
    assert calibration_tokens(tok, "self", model, seqlen=10, samples=3, seed=2) == tokens


def test_prompted_generation_continues_each_prompt_as_sampling_without_a_cache(monkeypatch):
    """``prompts``: every sequence starts with its row (fed whole through the KV cache) and
    goes on with the tokens that step-by-step sampling from full forward passes draws."""
    model, tok = zoo.build("llama", seed=0).eval(), zoo.tiny_tokenizer()
    monkeypatch.setattr(calibration, "generation_copy", lambda m: m)
    monkeypatch.setattr(calibration, "SELF_BATCH", 2)  # 3 prompts: batches of 2 and 1
    prompts = torch.randint(0, zoo.VOCAB, (3, 5), generator=torch.Generator().manual_seed(4))
    seen = []
    tokens = calibration.self_generated(model, tok, 10, 3, seed=7, prompts=prompts,
                                        progress=lambda done, total, **kw: seen.append(done))
    rows = torch.tensor(tokens).reshape(3, 12)  # seqlen + 2 tokens, the prompt's 5 included
    assert torch.equal(rows[:, :5], prompts)
    assert seen[-1] == 3 * 12
    rng = torch.Generator().manual_seed(7)
    want = []
    for first in (0, 2):
        ids = prompts[first:first + 2]
        with torch.no_grad():
            for _ in range(7):
                nxt = calibration.sample_next(model(input_ids=ids).logits[:, -1], rng)
                ids = torch.cat([ids, nxt], dim=1)
        want.append(ids)
    assert torch.equal(rows, torch.cat(want))
    for bad in (prompts[:2], prompts[:, :0], torch.zeros(3, 12, dtype=torch.long)):
        try:
            calibration.self_generated(model, tok, 10, 3, prompts=bad)
        except calibration.CalibrationError as err:
            assert "prompts must be 3 rows of 1 to 11 tokens" in str(err)
        else:
            raise AssertionError(f"prompts of shape {tuple(bad.shape)} were accepted")
