"""slimgraph.memory: the heap's free pages go back to the OS (glibc)."""

from __future__ import annotations

import pytest
import torch

from slimgraph import memory


def _rss_anon_mib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) // 1024
    pytest.skip("no /proc/self/status")


def test_freed_heap_pages_are_returned():
    if memory._glibc() is None:
        pytest.skip("glibc only")
    torch.empty(16 << 20, dtype=torch.uint8).fill_(1)  # glibc now serves <= 16 MiB from the heap
    chunks, keep = [], []
    for i in range(128):
        chunks.append(torch.ones(1 << 20, dtype=torch.uint8))
        if i % 16 == 15:  # small live blocks between the freed ones: the heap cannot shrink
            keep.append(torch.ones(4096, dtype=torch.uint8))
    held = _rss_anon_mib()
    del chunks
    assert memory.release_free_heap()
    assert _rss_anon_mib() <= held - 64
    assert keep


def test_evicting_a_block_releases_the_free_heap(monkeypatch):
    from slimgraph.sparsity import offload

    calls = []
    monkeypatch.setattr(offload, "release_free_heap", lambda: calls.append(1))
    off = offload.Offload.__new__(offload.Offload)
    off.tensors, off.resident = [], {"b"}
    off.evict("b")
    assert calls == [1] and not off.resident


def test_in_memory_block_walk_releases_the_free_heap_after_each_block(monkeypatch):
    """Without --offload, the block-sequential walk trims the heap after every block too
    (permutations rewrite a block's weights; its activations are freed)."""
    from slimgraph.frontends.torch_export import trace
    from slimgraph.ir.dependency import analyze
    from slimgraph.structured import torch_blocks
    from slimgraph.structured.recovery import walk_blocks
    from tests import zoo

    calls, seen = [], []
    monkeypatch.setattr(torch_blocks, "release_free_heap", lambda: calls.append(len(seen)))
    model = zoo.build("llama")
    result = analyze(trace(model, *zoo.example("llama")))
    windows = torch.randint(0, zoo.VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    walk_blocks(torch_blocks.TorchBlocks(model, result, windows, batch=2),
                lambda blk, inputs: seen.append(blk.layer))
    assert seen == list(range(zoo.LAYERS))
    assert calls == list(range(1, zoo.LAYERS + 1))  # once after each block
