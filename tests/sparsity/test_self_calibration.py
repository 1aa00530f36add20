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
    orig = model.generate

    def counting_generate(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        assert kwargs.get("use_cache", True) is not False  # the KV cache is on
        return orig(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counting_generate)
    seen = []
    tokens = calibration_tokens(tok, "self", model, seqlen=16, samples=5, seed=3,
                                progress=lambda done, total, **kw: seen.append((done, total, kw)))
    assert calls == [2, 2, 1]
    assert len(tokens) == 5 * 18  # seqlen + 2 tokens after BOS per sequence
    assert all(0 <= t < zoo.VOCAB for t in tokens)
    assert seen[-1][0] == seen[-1][1] == 5 * 18 and seen[-1][2]["unit"] == "tokens"
    assert [d for d, _, _ in seen] == sorted(d for d, _, _ in seen)
    # the same seed gives the same text; windows come from all five sequences
    again = calibration_tokens(tok, "self", model, seqlen=16, samples=5, seed=3)
    assert again == tokens
    windows = sample_windows(tokens, 5, 16, 0)
    assert windows.shape == (5, 16) and windows.dtype == torch.long
