"""Exact expected channel groups for every model of the zoo (torch frontend)."""

from __future__ import annotations

import pytest

from slimgraph.frontends.torch_export import trace
from slimgraph.ir.dependency import analyze
from tests import zoo

H, INTER, V, D = zoo.HIDDEN, zoo.INTER, zoo.VOCAB, zoo.HEAD_DIM


def signature(result):
    """(kind, layer, units, unit, q/unit, prunable, params/unit, members) per group."""
    out = []
    for g in result.groups:
        members = frozenset((m.param, m.dim) for m in g.members)
        out.append((g.kind, g.layer, g.units, g.unit, g.queries_per_unit, g.prunable,
                    g.params_per_unit, members))
    return sorted(out, key=repr)


def analyzed(name):
    model = zoo.build(name)
    args, kwargs = zoo.example(name)
    return analyze(trace(model, args, kwargs))


def _llama_family(prefix: str, bias: bool, tied: bool):
    """Expected groups of the LLaMA / Qwen2 / Mistral family."""
    exp = []
    qkv = ["q_proj", "k_proj", "v_proj"]
    hid = {(f"{prefix}embed_tokens.weight", 1), (f"{prefix}norm.weight", 0)}
    if not tied:
        hid.add(("lm_head.weight", 1))
    rope = {(f"{prefix}rotary_emb.inv_freq", 0)}
    for layer in range(zoo.LAYERS):
        p = f"{prefix}layers.{layer}."
        a = p + "self_attn."
        heads = {(a + f"{n}.weight", 0) for n in qkv} | {(a + "o_proj.weight", 1)}
        vdim = {(a + "v_proj.weight", 0), (a + "o_proj.weight", 1)}
        if bias:
            heads |= {(a + f"{n}.bias", 0) for n in qkv}
            vdim.add((a + "v_proj.bias", 0))
        per_head = D * H * 2 * 2 + D * H * 2 + (4 * D if bias else 0)
        exp.append(("heads", layer, zoo.KV, "kv-group", 2, True, per_head, frozenset(heads)))
        # the j-th query head of every KV-group: q rows (and bias), o_proj columns
        qslot = {(a + "q_proj.weight", 0), (a + "o_proj.weight", 1)}
        if bias:
            qslot.add((a + "q_proj.bias", 0))
        per_slot = zoo.KV * D * H * 2 + (zoo.KV * D if bias else 0)
        exp.append(("qheads", layer, zoo.HEADS // zoo.KV, "q-head", 1, True, per_slot,
                    frozenset(qslot)))
        mlp = {(p + "mlp.gate_proj.weight", 0), (p + "mlp.up_proj.weight", 0),
               (p + "mlp.down_proj.weight", 1)}
        exp.append(("mlp", layer, INTER, "channel", 1, True, 3 * H, frozenset(mlp)))
        vdim_pp = zoo.KV * H + zoo.HEADS * H + (zoo.KV if bias else 0)
        exp.append(("channels", layer, D, "channel", 1, False, vdim_pp, frozenset(vdim)))
        rope |= {(a + "q_proj.weight", 0), (a + "k_proj.weight", 0)}
        if bias:
            rope |= {(a + "q_proj.bias", 0), (a + "k_proj.bias", 0)}
        hid |= {(a + f"{n}.weight", 1) for n in qkv} | {(a + "o_proj.weight", 0)}
        hid |= {(p + "mlp.gate_proj.weight", 1), (p + "mlp.up_proj.weight", 1),
                (p + "mlp.down_proj.weight", 0), (p + "input_layernorm.weight", 0),
                (p + "post_attention_layernorm.weight", 0)}
    rope_pp = zoo.LAYERS * (zoo.HEADS + zoo.KV) * 2 * H + (zoo.LAYERS * (zoo.HEADS + zoo.KV) * 2
                                                           if bias else 0)
    exp.append(("channels", None, D // 2, "channel", 1, False, rope_pp, frozenset(rope)))
    per_layer_h = (zoo.HEADS * D + 2 * zoo.KV * D) + zoo.HEADS * D + 3 * INTER + 2
    exp.append(("hidden", None, H, "channel", 1, True,
                V * (1 if tied else 2) + zoo.LAYERS * per_layer_h + 1, frozenset(hid)))
    emb = {(f"{prefix}embed_tokens.weight", 0)}
    if tied:
        exp.append(("channels", None, V, "channel", 1, False, H, frozenset(emb)))
    else:
        exp.append(("channels", None, V, "channel", 1, False, H, frozenset(emb)))
        exp.append(("channels", None, V, "channel", 1, False, H, frozenset({("lm_head.weight", 0)})))
    return sorted(exp, key=repr)


@pytest.mark.parametrize("name,bias,tied", [("llama", False, True), ("qwen2", True, False),
                                            ("mistral", False, False)])
def test_llama_family_groups_exact(name, bias, tied):
    assert signature(analyzed(name)) == _llama_family("model.", bias, tied)




def test_opt_groups():
    r = analyzed("opt")
    kinds = [(g.kind, g.layer, g.units, g.unit, g.prunable) for g in r.groups]
    for layer in range(zoo.LAYERS):
        assert ("heads", layer, zoo.HEADS, "head", True) in kinds
        assert ("mlp", layer, INTER, "channel", True) in kinds
    (hidden,) = r.by_kind("hidden")
    assert hidden.prunable and hidden.units == H
    names = {m.param for m in hidden.members}
    assert "model.decoder.embed_positions.weight" in names  # learned positions couple too
    assert "model.decoder.final_layer_norm.bias" in names
    assert any("layer norm statistics" in n for n in hidden.notes)
    heads0 = next(g for g in r.groups if g.kind == "heads" and g.layer == 0)
    a = "model.decoder.layers.0.self_attn."
    assert {(m.param, m.dim) for m in heads0.members} == {
        (a + "q_proj.weight", 0), (a + "q_proj.bias", 0), (a + "k_proj.weight", 0),
        (a + "k_proj.bias", 0), (a + "v_proj.weight", 0), (a + "v_proj.bias", 0),
        (a + "out_proj.weight", 1)}
    mlp0 = next(g for g in r.groups if g.kind == "mlp" and g.layer == 0)
    p = "model.decoder.layers.0."
    assert {(m.param, m.dim) for m in mlp0.members} == {
        (p + "fc1.weight", 0), (p + "fc1.bias", 0), (p + "fc2.weight", 1)}
    assert len([g for g in r.groups if g.prunable]) == 2 * zoo.LAYERS + 1


def test_gpt2_fused_qkv_heads():
    r = analyzed("gpt2")
    heads0 = next(g for g in r.groups if g.kind == "heads" and g.layer == 0)
    assert heads0.prunable and heads0.units == zoo.HEADS and heads0.unit == "head"
    c_attn = next(m for m in heads0.members if m.param == "transformer.h.0.attn.c_attn.weight")
    assert c_attn.dim == 1  # Conv1D weight is [in, out]
    for h in range(zoo.HEADS):  # head h owns one slice in each of q, k and v
        expect = [part * H + h * D + i for part in range(3) for i in range(D)]
        assert c_attn.indices(h) == expect
    c_proj = next(m for m in heads0.members if m.param == "transformer.h.0.attn.c_proj.weight")
    assert c_proj.dim == 0 and c_proj.indices(1) == list(range(D, 2 * D))
    mlp0 = next(g for g in r.groups if g.kind == "mlp" and g.layer == 0)
    assert mlp0.units == 4 * H and mlp0.prunable
    (hidden,) = r.by_kind("hidden")
    assert hidden.prunable
    assert {"transformer.wte.weight", "transformer.wpe.weight",
            "transformer.ln_f.weight"} <= {m.param for m in hidden.members}


def test_bert_groups():
    r = analyzed("bert")
    for layer in range(zoo.LAYERS):
        g = next(g for g in r.groups if g.kind == "heads" and g.layer == layer)
        assert g.prunable and g.units == zoo.HEADS
        m = next(g for g in r.groups if g.kind == "mlp" and g.layer == layer)
        assert m.units == INTER and m.prunable
    (hidden,) = r.by_kind("hidden")
    assert hidden.prunable
    names = {m.param for m in hidden.members}
    assert "bert.embeddings.token_type_embeddings.weight" in names
    assert "bert.pooler.dense.weight" in names
    # the pooler -> tanh -> classifier channels form their own group
    pooler = [g for g in r.groups if any(m.param == "bert.pooler.dense.weight" and m.dim == 0
                                         for m in g.members)]
    assert len(pooler) == 1 and pooler[0].kind == "mlp"
    # classifier outputs are the model output: never prunable
    cls = next(g for g in r.groups if any(m.param == "classifier.weight" and m.dim == 0
                                          for m in g.members))
    assert not cls.prunable and "model output" in cls.reasons[0]


def test_kv_group_indices_llama():
    r = analyzed("llama")
    g = next(g for g in r.groups if g.kind == "heads" and g.layer == 1)
    q = next(m for m in g.members if m.param.endswith("q_proj.weight"))
    k = next(m for m in g.members if m.param.endswith("k_proj.weight"))
    o = next(m for m in g.members if m.param.endswith("o_proj.weight"))
    # kv-group 1 owns k head 1 and query heads 2 and 3 (repeat_kv order)
    assert k.indices(1) == list(range(D, 2 * D))
    assert q.indices(1) == list(range(2 * D, 4 * D))
    assert o.dim == 1 and o.indices(1) == list(range(2 * D, 4 * D))


def test_rope_head_dim_pairs_are_noted():
    r = analyzed("llama")
    rope = next(g for g in r.groups if any(m.param.endswith("inv_freq") for m in g.members))
    assert not rope.prunable and rope.units == D // 2
    q = next(m for m in rope.members if m.param == "model.layers.0.self_attn.q_proj.weight")
    # unit i of the rotary space is channel i and i + D/2 in every query head
    assert q.indices(3) == [h * D + off for h in range(zoo.HEADS) for off in (3, 3 + D // 2)]


@pytest.mark.parametrize("name", ["qwen3", "gemma3", "olmo2", "phi3"])
def test_newer_architectures_groups(name):
    """Per layer one prunable heads group (KV-groups of 2 query heads) and one MLP group,
    one prunable hidden group; the members that make these architectures differ."""
    r = analyzed(name)
    by = {}
    for g in r.groups:
        by.setdefault((g.kind, g.layer), []).append(g)
    a = "model.layers.0.self_attn."
    for layer in range(zoo.LAYERS):
        (heads,) = by[("heads", layer)]
        assert heads.prunable and heads.units == zoo.KV and heads.queries_per_unit == 2
        (mlp,) = by[("mlp", layer)]
        assert mlp.prunable and mlp.units == INTER
    (hidden,) = by[("hidden", None)]
    assert hidden.prunable and hidden.units == H
    heads0 = {(m.param, m.dim) for m in by[("heads", 0)][0].members}
    mlp0 = {(m.param, m.dim) for m in by[("mlp", 0)][0].members}
    if name == "phi3":  # fused projections: every head's q, k and v rows in one weight
        assert heads0 == {(a + "qkv_proj.weight", 0), (a + "o_proj.weight", 1)}
        assert mlp0 == {("model.layers.0.mlp.gate_up_proj.weight", 0),
                        ("model.layers.0.mlp.down_proj.weight", 1)}
        unit0 = next(m for m in by[("heads", 0)][0].members if m.param.endswith("qkv_proj.weight"))
        assert len(unit0.indices(0)) == 4 * D  # 2 query heads, 1 key head, 1 value head
    elif name == "olmo2":  # q_norm / k_norm over all heads: their channels go with the heads
        assert {(a + "q_norm.weight", 0), (a + "k_norm.weight", 0)} <= heads0
    else:  # Qwen3 / Gemma 3: q_norm / k_norm over head_dim, shared by all heads
        assert not any("norm" in p for p, _ in heads0)
        assert (a + "q_norm.weight", 0) not in {(m.param, m.dim) for m in hidden.members}
