"""Channel rules on hand-written modules: barriers, GQA through SDPA, explicit attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimgraph.frontends.torch_export import trace
from slimgraph.ir.dependency import analyze


class MLPWithCumsum(nn.Module):
    """cumsum along the MLP channels has no channel rule: it must become a barrier."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)
        self.up2 = nn.Linear(8, 12)
        self.down2 = nn.Linear(12, 8)

    def forward(self, x):
        h = self.down(torch.cumsum(F.relu(self.up(x)), dim=-1))
        return h + self.down2(F.relu(self.up2(x)))


def test_unknown_op_is_a_barrier_with_reason():
    r = analyze(trace(MLPWithCumsum().eval(), (torch.randn(2, 3, 8),)))
    by_param = {m.param: g for g in r.groups for m in g.members if m.dim == 0}
    barred = by_param["up.weight"]
    assert not barred.prunable
    assert any("cumsum" in why and "no channel rule" in why for why in barred.reasons)
    ok = by_param["up2.weight"]
    assert ok.prunable and ok.kind == "mlp" and ok.units == 12
    assert ("cumsum", "aten.cumsum.default", "no channel rule for this op") in r.barriers


class GQAWithSDPA(nn.Module):
    """Grouped-query attention through SDPA's enable_gqa (no repeat_kv in the graph)."""

    def __init__(self, hidden=32, heads=4, kv=2, hd=8):
        super().__init__()
        self.heads, self.kv, self.hd = heads, kv, hd
        self.q = nn.Linear(hidden, heads * hd, bias=False)
        self.k = nn.Linear(hidden, kv * hd, bias=False)
        self.v = nn.Linear(hidden, kv * hd, bias=False)
        self.o = nn.Linear(heads * hd, hidden, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.hd).transpose(1, 2)
        k = self.k(x).view(b, s, self.kv, self.hd).transpose(1, 2)
        v = self.v(x).view(b, s, self.kv, self.hd).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return x + self.o(a.transpose(1, 2).reshape(b, s, -1))


def test_gqa_through_sdpa_gives_kv_group_units():
    r = analyze(trace(GQAWithSDPA().eval(), (torch.randn(1, 5, 32),)))
    (heads,) = r.by_kind("heads")
    assert heads.units == 2 and heads.unit == "kv-group" and heads.queries_per_unit == 2
    q = next(m for m in heads.members if m.param == "q.weight")
    assert q.indices(1) == list(range(16, 32))
    o = next(m for m in heads.members if m.param == "o.weight")
    assert o.dim == 1 and o.indices(0) == list(range(0, 16))
    # the residual stream is a model output here, so it is not prunable
    hidden = [g for g in r.groups if any(m.param == "o.weight" and m.dim == 0 for m in g.members)]
    assert len(hidden) == 1 and not hidden[0].prunable
    assert any("model output" in why for why in hidden[0].reasons)


class ExplicitAttention(nn.Module):
    """Attention written with matmul + softmax, as older models do."""

    def __init__(self, hidden=24, heads=3):
        super().__init__()
        self.h, self.d = heads, hidden // heads
        self.inp = nn.Linear(10, hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 5)

    def forward(self, x):
        x = self.inp(x)
        b, s, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        q = q.view(b, s, self.h, self.d).transpose(1, 2)
        k = k.view(b, s, self.h, self.d).transpose(1, 2)
        v = v.view(b, s, self.h, self.d).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-2, -1) / self.d ** 0.5, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, s, c)
        return self.head(x + self.proj(y))


def test_explicit_matmul_attention_heads():
    r = analyze(trace(ExplicitAttention().eval(), (torch.randn(1, 6, 10),)))
    (heads,) = r.by_kind("heads")
    assert heads.units == 3 and heads.unit == "head" and heads.prunable
    qkv = next(m for m in heads.members if m.param == "qkv.weight")
    assert qkv.indices(2) == [p * 24 + 16 + i for p in range(3) for i in range(8)]
    resid = next(g for g in r.groups if any(m.param == "head.weight" and m.dim == 1
                                            for m in g.members))
    assert resid.prunable and {m.param for m in resid.members} >= {"inp.weight", "qkv.weight", "proj.weight"}


class Broadcasts(nn.Module):
    """A per-channel scale broadcast against [B, S, C] couples to C; a [B, S, 1] gate does not."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 10)
        self.scale = nn.Parameter(torch.ones(10))
        self.gate = nn.Linear(6, 1)
        self.b = nn.Linear(10, 6)

    def forward(self, x):
        return self.b(self.a(x) * self.scale * torch.sigmoid(self.gate(x)))


def test_broadcasting_couples_only_equal_dims():
    r = analyze(trace(Broadcasts().eval(), (torch.randn(2, 4, 6),)))
    g = next(g for g in r.groups if any(m.param == "a.weight" and m.dim == 0 for m in g.members))
    assert {(m.param, m.dim) for m in g.members} == {
        ("a.weight", 0), ("a.bias", 0), ("scale", 0), ("b.weight", 1)}
    assert g.prunable
