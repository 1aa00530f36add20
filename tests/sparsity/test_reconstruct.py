"""GramAccumulator and the SparseGPT-style reconstruction."""

import pytest
import torch

from slimgraph.sparsity.masks import is_nm, nm_mask, unstructured_mask
from slimgraph.sparsity.reconstruct import GramAccumulator, sparsegpt_prune
from slimgraph.sparsity.scores import score

C_OUT, C_IN, TOKENS = 48, 256, 1536


@pytest.fixture(autouse=True)
def one_thread():
    """The column loop is many tiny ops: thread start-up dominates on small test matrices."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def correlated_inputs(tokens=TOKENS, c_in=C_IN, seed=0, rank=32, noise=0.3):
    """Low-rank plus noise (strongly correlated channels) with uneven channel scales, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, rank, generator=g) @ torch.randn(rank, c_in, generator=g) / rank ** 0.5
    z = z + noise * torch.randn(tokens, c_in, generator=g)
    return z * torch.exp(torch.randn(c_in, generator=g))


def setup(seed=0, dead=()):
    g = torch.Generator().manual_seed(seed + 1)
    x = correlated_inputs(seed=seed)
    x[:, list(dead)] = 0
    w = torch.randn(C_OUT, C_IN, generator=g)
    acc = GramAccumulator(C_IN, dtype=torch.float64)
    for chunk in x.reshape(6, -1, 4, C_IN):  # batches of [b, t, C_in]
        acc.add(chunk)
    return x, w, acc


def out_err(x, w, w_hat):
    return float(torch.linalg.norm(x.double() @ (w.double() - w_hat.double()).T))


def test_gram_accumulator_matches_direct():
    x, _, acc = setup()
    x64 = x.double()
    assert acc.n_tokens == TOKENS
    torch.testing.assert_close(acc.hessian(), 2 / TOKENS * x64.T @ x64)
    assert acc.n_samples == TOKENS // 4  # chunks [t, 4, C_in]: t samples of 4 tokens each
    torch.testing.assert_close(acc.act_norm(), x.norm(dim=0) / acc.n_samples ** 0.5, rtol=1e-5, atol=1e-5)
    assert acc.act_norm().shape == (C_IN,) and acc.act_norm().dtype == torch.float32
    acc32 = GramAccumulator(C_IN)
    acc32.add(x[:100])
    acc32.add(x[100:])
    torch.testing.assert_close(acc32.hessian(), acc.hessian().float(), rtol=1e-4, atol=1e-3)

    only_norms = GramAccumulator(C_IN, hessian=False)
    only_norms.add(x)  # a 2-D input is one sample
    assert only_norms.n_samples == 1
    torch.testing.assert_close(only_norms.act_norm(), x.norm(dim=0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="hessian=False"):
        only_norms.hessian()
    with pytest.raises(ValueError, match="no calibration tokens"):
        GramAccumulator(4).act_norm()
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        GramAccumulator(4).add(torch.ones(3, 5))


def test_unstructured_beats_magnitude_and_exact_density():
    x, w, acc = setup()
    H = acc.hessian()
    w0, H0 = w.clone(), H.clone()
    info = {}
    new, keep = sparsegpt_prune(w, H, sparsity=0.5, info=info)
    assert torch.equal(w, w0) and torch.equal(H, H0)  # inputs untouched
    assert int((~keep).sum()) == w.numel() // 2
    assert torch.equal(new == 0, ~keep)  # random dense weights: zeros exactly where pruned
    assert new.dtype == w.dtype and torch.isfinite(new).all()
    assert info["dead_inputs"] == 0 and info["damp_retries"] == 0 and info["loss"] > 0
    mag = w * unstructured_mask(score(w, "magnitude"), 0.5, "layer")
    assert out_err(x, w, new) < 0.5 * out_err(x, w, mag)


def test_2_4_beats_magnitude():
    x, w, acc = setup(seed=3)
    new, keep = sparsegpt_prune(w, acc.hessian(), pattern="2:4")
    assert is_nm(new, 2, 4, axis=1) and is_nm(keep, 2, 4, axis=1)
    assert int(keep.sum()) == w.numel() // 2
    mag = w * nm_mask(score(w, "magnitude"), 2, 4)
    assert out_err(x, w, new) < 0.5 * out_err(x, w, mag)


@pytest.mark.parametrize("pattern", [(1, 2), (4, 8)])
def test_other_patterns(pattern):
    _, w, acc = setup(seed=5)
    new, keep = sparsegpt_prune(w, acc.hessian(), pattern=pattern)
    assert is_nm(new, *pattern, axis=1)
    assert int(keep.sum()) == w.numel() * pattern[0] // pattern[1]


def test_scores_path_unstructured_block_mask_equals_masks():
    x, w, acc = setup(seed=7)
    s = score(w, "ria", act_norm=acc.act_norm())
    new, keep = sparsegpt_prune(w, acc.hessian(), sparsity=0.5, scores=s)
    for i1 in range(0, C_IN, 128):  # 48 * 128 * 0.5 is integral: each block prunes exactly half
        assert torch.equal(keep[:, i1:i1 + 128], unstructured_mask(s[:, i1:i1 + 128], 0.5, "layer"))
    assert torch.equal(new == 0, ~keep)
    # reconstruction improves on plain masking with the same mask
    assert out_err(x, w, new) < 0.8 * out_err(x, w, w * keep)


def test_scores_path_layer_scope_and_nm():
    x, w, acc = setup(seed=8)
    s = score(w, "wanda", act_norm=acc.act_norm())
    new, keep = sparsegpt_prune(w, acc.hessian(), sparsity=0.3, scores=s, scope="layer")
    assert torch.equal(keep, unstructured_mask(s, 0.3, "layer"))
    new, keep = sparsegpt_prune(w, acc.hessian(), sparsity=0.3, scores=s, scope="row")
    assert torch.equal(keep, unstructured_mask(s, 0.3, "row"))
    new, keep = sparsegpt_prune(w, acc.hessian(), pattern="2:4", scores=s)
    assert torch.equal(keep, nm_mask(s, 2, 4))
    assert is_nm(new, 2, 4, axis=1)
    assert out_err(x, w, new) < 0.8 * out_err(x, w, w * keep)


def test_score_fn_sees_updated_block():
    _, w, acc = setup(seed=9)
    calls = []

    def fn(block, cols):
        calls.append((cols.start, cols.stop, block.shape))
        return block.abs()

    _, keep = sparsegpt_prune(w, acc.hessian(), sparsity=0.5, score_fn=fn)
    assert calls == [(0, 128, (C_OUT, 128)), (128, 256, (C_OUT, 128))]
    assert int((~keep).sum()) == w.numel() // 2
    calls.clear()
    _, keep = sparsegpt_prune(w, acc.hessian(), pattern="2:4", score_fn=fn)
    assert len(calls) == C_IN // 4 and is_nm(keep, 2, 4, axis=1)


def test_fixed_mask_is_blocksize_invariant():
    _, w, acc = setup(seed=10)
    keep = unstructured_mask(score(w, "magnitude"), 0.6, "row")
    a, ka = sparsegpt_prune(w, acc.hessian(), mask=keep, blocksize=C_IN, dtype=torch.float64)
    b, kb = sparsegpt_prune(w, acc.hessian(), mask=keep, blocksize=16, dtype=torch.float64)
    assert torch.equal(ka, keep) and torch.equal(kb, keep)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_exact_density_with_fractional_blocks():
    _, w, acc = setup(seed=11)
    w = w[:7]
    for s in (0.1, 0.37, 0.5, 0.93):
        _, keep = sparsegpt_prune(w, acc.hessian(), sparsity=s, blocksize=48)
        assert int((~keep).sum()) == round(s * w.numel())


def test_dead_inputs():
    dead = (3, 100, 200)
    x, w, acc = setup(seed=12, dead=dead)
    info = {}
    for kwargs in ({"sparsity": 0.5}, {"pattern": "2:4"}):
        new, keep = sparsegpt_prune(w, acc.hessian(), info=info, **kwargs)
        assert info["dead_inputs"] == 3
        assert torch.isfinite(new).all()
        assert (new[:, list(dead)] == 0).all()
        assert int(keep.sum()) == w.numel() // 2
        assert is_nm(new, 2, 4, axis=1) if "pattern" in kwargs else True
        # zeroing a dead input column costs nothing
        mag = w * unstructured_mask(score(w, "magnitude"), 0.5, "layer")
        assert out_err(x, w, new) < out_err(x, w, mag)


def test_cholesky_retry_warns():
    w = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    H = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # indefinite
    info = {}
    with pytest.warns(RuntimeWarning, match="Cholesky"):
        new, keep = sparsegpt_prune(w, H, sparsity=0.5, info=info)
    assert info["damp_retries"] > 0 and torch.isfinite(new).all()
    assert int((~keep).sum()) == 2


def test_argument_errors():
    _, w, acc = setup()
    H = acc.hessian()
    with pytest.raises(ValueError, match="exactly one"):
        sparsegpt_prune(w, H)
    with pytest.raises(ValueError, match="exactly one"):
        sparsegpt_prune(w, H, sparsity=0.5, pattern="2:4")
    with pytest.raises(ValueError, match="multiple of M"):
        sparsegpt_prune(w, H, pattern="2:4", blocksize=126)
    with pytest.raises(ValueError, match="multiple of 8"):
        sparsegpt_prune(w[:, :252], H[:252, :252], pattern="4:8")
    with pytest.raises(ValueError, match="H must be"):
        sparsegpt_prune(w, H[:10, :10], sparsity=0.5)
    with pytest.raises(ValueError, match="not both"):
        sparsegpt_prune(w, H, sparsity=0.5, scores=w.abs(), score_fn=lambda b, c: b)
    with pytest.raises(ValueError, match="unstructured"):
        sparsegpt_prune(w, H, pattern="2:4", scope="layer")
