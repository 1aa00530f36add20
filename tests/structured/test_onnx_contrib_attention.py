"""Heads and MLP channels of models fused by ONNX Runtime's transformer optimizer (issue 7).

Fused forms covered, each with its per-layer ``num_heads`` (``kv_num_heads``) rewritten:

- ``bert-attention``: a tiny random BERT exported by the TorchScript exporter (opset 17,
  dynamic batch and sequence) and fused by ``onnxruntime.transformers.optimizer
  .optimize_model(model_type="bert", num_heads=4, hidden_size=64)``: com.microsoft
  ``Attention`` (packed QKV weight ``[64, 192]`` and bias), ``EmbedLayerNormalization``,
  ``SkipLayerNormalization``, ``BiasGelu``;
- ``bert-mha``: the same with ``FusionOptions.use_multi_head_attention = True``:
  ``MultiHeadAttention`` over separate Q / K / V MatMuls with a packed ``[192]`` bias;
- ``gqa-rotary`` / ``gqa-packed`` / ``gqa-rope-node``: ``GroupQueryAttention`` (6 query
  heads, 3 KV heads, head size 16: ORT wants a multiple of 16), which the optimizer writes only for LLaMA / Phi
  pipelines this repository cannot produce offline (ORT's ``replace_mha_with_gqa`` wants
  MultiHeadAttention with a KV cache): built by hand with ``onnx.helper`` to the op's
  contract in the shape ORT's LLaMA models have (``SkipSimplifiedLayerNormalization``
  whose output 3 carries the residual, SwiGLU MLP), with ``do_rotary=1`` and separate
  Q / K / V, with packed QKV plus bias, and with com.microsoft ``RotaryEmbedding`` nodes
  (``num_heads``) in front of the GQA. ORT runs them; that is what makes them valid.

Invariant: the slimmed model's outputs in ONNX Runtime equal those of the fused original
with the same units zeroed (relative error <= 1e-5; batch 2, two sequence lengths).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from slimgraph.cli import main
from slimgraph.frontends.onnx_import import import_onnx
from slimgraph.ir.dependency import analyze
from slimgraph.structured.onnx_removal import remove_units_onnx
from tests.structured.onnx_builders import save_lm
from tests.structured.random_selection import slim_and_masked

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime.transformers.optimizer")

VOCAB, SEQS = 128, [5, 11]
BERT = {"layers": 2, "heads": 4, "hidden": 64, "inter": 96}
GQA = {"layers": 3, "heads": 6, "kv": 3, "head": 16, "hidden": 64, "inter": 96}
FORMS = ["bert-attention", "bert-mha", "gqa-rotary", "gqa-packed", "gqa-rope-node"]
CONTRIB_OP = {"bert-attention": "Attention", "bert-mha": "MultiHeadAttention"}


# -- the fused models ----------------------------------------------------------------------


def _bert(path, mha: bool):
    import torch
    import transformers as tf
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=BERT["hidden"],
                        intermediate_size=BERT["inter"], num_hidden_layers=BERT["layers"],
                        num_attention_heads=BERT["heads"], max_position_embeddings=64,
                        attn_implementation="eager")
    model = tf.BertModel(cfg).eval()
    with torch.no_grad():  # no all-zero biases / all-one gains the exporter would merge
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)

    class Hidden(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.randint(0, VOCAB, (1, 7))
    raw = path.parent / "raw.onnx"
    dyn = {"batch": 0, "seq": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Hidden(model), (ids, torch.ones_like(ids)), str(raw), dynamo=False,
                          opset_version=17, input_names=["input_ids", "attention_mask"],
                          output_names=["hidden"],
                          dynamic_axes={n: {v: k for k, v in dyn.items()}
                                        for n in ("input_ids", "attention_mask", "hidden")})
    opts = FusionOptions("bert")
    opts.use_multi_head_attention = mha
    fused = optimize_model(str(raw), model_type="bert", num_heads=BERT["heads"],
                           hidden_size=BERT["hidden"], optimization_options=opts, opt_level=0)
    fused.save_model_to_file(str(path))
    return path


def _gqa(path, form: str):
    """A LLaMA-shaped decoder as ORT's fusions leave it (see the module docstring)."""
    L, N, KV, D, H, F = (GQA[k] for k in ("layers", "heads", "kv", "head", "hidden", "inter"))
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def w(name, *shape, scale=None):
        scale = scale if scale is not None else shape[0] ** -0.5
        inits.append(helper.make_tensor(name, TensorProto.FLOAT, shape,
                                        (rng.standard_normal(shape) * scale).ravel()))
        return name

    def gain(name, n):
        inits.append(helper.make_tensor(name, TensorProto.FLOAT, [n],
                                        1 + 0.1 * rng.standard_normal(n)))
        return name

    def node(op, ins, outs, domain="", **attrs):
        nodes.append(helper.make_node(op, ins, outs, name=f"{op}_{len(nodes)}", domain=domain,
                                      **attrs))
        return outs[0]

    ms = "com.microsoft"
    pos = np.arange(32)[:, None] * (10000.0 ** (-np.arange(0, D, 2) / D))[None, :]
    inits += [helper.make_tensor("cos", TensorProto.FLOAT, [32, D // 2], np.cos(pos).ravel()),
              helper.make_tensor("sin", TensorProto.FLOAT, [32, D // 2], np.sin(pos).ravel()),
              helper.make_tensor("one", TensorProto.INT64, [1], [1]),
              helper.make_tensor("i0", TensorProto.INT64, [], [0]),
              helper.make_tensor("i1", TensorProto.INT64, [], [1]),
              helper.make_tensor("pos0", TensorProto.INT64, [1], [0])]
    # seqlens_k = S - 1 per row, total_sequence_length = S (a prompt, no cache)
    node("Shape", ["input_ids"], ["ids_shape"])
    node("Gather", ["ids_shape", "i1"], ["seq"], axis=0)
    node("Gather", ["ids_shape", "i0"], ["batch"], axis=0)
    node("Cast", ["seq"], ["total_seq"], to=TensorProto.INT32)
    node("Sub", ["seq", "one"], ["seq_m1"])
    node("Cast", ["seq_m1"], ["seq_m1_i32"], to=TensorProto.INT32)
    node("Unsqueeze", ["batch", "pos0"], ["batch1"])
    node("Expand", ["seq_m1_i32", "batch1"], ["seqlens_k"])
    x = node("Gather", [w("embed", VOCAB, H, scale=1.0), "input_ids"], ["embed_out"])
    # the first RMSNorm decomposed (ORT's fused SimplifiedLayerNormalization lives in the
    # ONNX domain, which onnx.checker rejects)
    inits.append(helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-5]))
    sq = node("Mul", [x, x], ["sq_0"])
    mean = node("ReduceMean", [sq], ["ms_0"], axes=[-1], keepdims=1)
    rms = node("Sqrt", [node("Add", [mean, "eps"], ["ms_eps_0"])], ["rms_0"])
    xn = node("Mul", [node("Div", [x, rms], ["xs_0"]), gain("norm_0", H)], ["xn_0"])
    residual = x
    for i in range(L):
        p = f"layers.{i}."
        gqa_attrs = {"num_heads": N, "kv_num_heads": KV}
        if form == "gqa-packed":
            qkv = node("MatMul", [xn, w(p + "qkv.weight", H, (N + 2 * KV) * D)], [p + "qkv"])
            qkv = node("Add", [qkv, w(p + "qkv.bias", (N + 2 * KV) * D, scale=0.1)],
                       [p + "qkv_b"])
            qkv_in = [qkv, "", ""]
        else:
            q = node("MatMul", [xn, w(p + "q.weight", H, N * D)], [p + "q"])
            k = node("MatMul", [xn, w(p + "k.weight", H, KV * D)], [p + "k"])
            v = node("MatMul", [xn, w(p + "v.weight", H, KV * D)], [p + "v"])
            if form == "gqa-rope-node":
                q = node("RotaryEmbedding", [q, "pos0", "cos", "sin"], [p + "q_rot"], ms,
                         num_heads=N)
                k = node("RotaryEmbedding", [k, "pos0", "cos", "sin"], [p + "k_rot"], ms,
                         num_heads=KV)
            qkv_in = [q, k, v]
        rot = ["cos", "sin"] if form == "gqa-rotary" else []
        if rot:
            gqa_attrs["do_rotary"] = 1
        att = node("GroupQueryAttention", [*qkv_in, "", "", "seqlens_k", "total_seq", *rot],
                   [p + "attn", p + "present_k", p + "present_v"], ms, **gqa_attrs)
        o = node("MatMul", [att, w(p + "o.weight", N * D, H)], [p + "o"])
        xn = node("SkipSimplifiedLayerNormalization", [o, residual, gain(p + "post_norm", H)],
                  [p + "xn2", "", "", p + "res2"], ms, epsilon=1e-5)
        residual = p + "res2"
        gate = node("MatMul", [xn, w(p + "gate.weight", H, F)], [p + "gate"])
        up = node("MatMul", [xn, w(p + "up.weight", H, F)], [p + "up"])
        sig = node("Sigmoid", [gate], [p + "sig"])
        act = node("Mul", [gate, sig], [p + "silu"])
        h = node("Mul", [act, up], [p + "h"])
        down = node("MatMul", [h, w(p + "down.weight", F, H)], [p + "down"])
        last = i == L - 1
        xn = node("SkipSimplifiedLayerNormalization",
                  [down, residual, gain("final_norm" if last else f"layers.{i + 1}.norm", H)],
                  [f"xn_{i + 1}", "", "", f"res_{i + 1}"], ms, epsilon=1e-5)
        residual = f"res_{i + 1}"
    node("MatMul", [xn, w("lm_head", H, VOCAB)], ["logits"])
    return save_lm(nodes, inits, path, vocab=VOCAB, name="tiny_gqa",
                   opsets={"": 17, ms: 1})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("contrib_attention")
    out = {}
    for form in FORMS:
        (d / form).mkdir()
        path = d / form / "model.onnx"
        out[form] = _bert(path, form == "bert-mha") if form.startswith("bert") else \
            _gqa(path, form)
    return out


# -- helpers -------------------------------------------------------------------------------


def _feeds(path, batch, seq, seed=0):
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(0, VOCAB, (batch, seq))}
    if any(i.name == "attention_mask" for i in onnx.load(str(path)).graph.input):
        mask = np.ones((batch, seq), dtype=np.int64)
        mask[-1, -2:] = 0  # right padding in the last row
        feeds["attention_mask"] = mask
    return feeds


def _run(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _save(result, path):
    from slimgraph.backends.onnx_export import save_onnx_model

    return save_onnx_model(result.graph.meta["onnx_model"], path)


def _spec(form):
    if form.startswith("bert"):
        return BERT["layers"], BERT["heads"], BERT["heads"], BERT["inter"]
    return GQA["layers"], GQA["heads"], GQA["kv"], GQA["inter"]


def _attention_nodes(model, form):
    op = CONTRIB_OP.get(form, "GroupQueryAttention")
    return [n for n in model.graph.node if n.op_type == op and n.domain == "com.microsoft"]


def _layer_of(result, group):
    """The layer of a group: the index of the attention / MLP weights it holds."""
    names = " ".join(m.param for m in group.members)
    for i in range(8):
        if f"layers.{i}." in names or f"layer.{i}." in names or f"Attention_{i}_" in names:
            return i
    raise AssertionError(names)


# -- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_fused_ops_are_what_the_optimizer_writes(files, form):
    ops = {(n.domain, n.op_type) for n in onnx.load(str(files[form])).graph.node}
    ms = "com.microsoft"
    if form.startswith("bert"):
        assert {(ms, CONTRIB_OP[form]), (ms, "SkipLayerNormalization"), (ms, "BiasGelu"),
                (ms, "EmbedLayerNormalization")} <= ops
        packed = [n for n in onnx.load(str(files[form])).graph.node
                  if n.op_type == "Attention"]
        assert (len(packed) == BERT["layers"]) == (form == "bert-attention")
    else:
        assert {(ms, "GroupQueryAttention"), (ms, "SkipSimplifiedLayerNormalization")} <= ops
        assert ((ms, "RotaryEmbedding") in ops) == (form == "gqa-rope-node")


@pytest.mark.parametrize("form", FORMS)
def test_heads_and_mlp_groups_are_found(files, form):
    layers, n_q, n_kv, inter = _spec(form)
    result = analyze(import_onnx(files[form]))
    heads = [g for g in result.prunable() if g.kind == "heads"]
    mlp = [g for g in result.prunable() if g.kind == "mlp"]
    assert sorted(_layer_of(result, g) for g in heads) == list(range(layers))
    assert sorted(_layer_of(result, g) for g in mlp) == list(range(layers))
    for g in heads:
        assert g.units == n_kv and g.queries_per_unit == n_q // n_kv
    assert all(g.units == inter for g in mlp)
    if form == "bert-attention":  # the packed weight and bias are members, sliced per section
        names = {m.param for g in heads for m in g.members}
        assert any(n.endswith("qkv_weight") for n in names)
        assert any(n.endswith("qkv_bias") for n in names)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_slim_equals_masked(files, tmp_path, form, seed):
    src = files[form]
    before = src.read_bytes()
    layers, n_q, n_kv, _ = _spec(form)
    result, sel, report, masked_path, slim_path = slim_and_masked(src, seed, tmp_path)
    onnx.checker.check_model(str(slim_path))
    assert src.read_bytes() == before
    assert report["params_after"] < report["params_before"]

    # per layer: the head counts the rewritten nodes carry
    kept = {layer: n_kv for layer in range(layers)}
    by_id = {g.id: g for g in result.groups}
    for gid, units in sel.items():
        if by_id[gid].kind == "heads":
            kept[_layer_of(result, by_id[gid])] -= len(units)
    slim = onnx.load(str(slim_path))
    nodes = _attention_nodes(slim, form)
    assert len(nodes) == layers
    for layer, n in enumerate(nodes):
        attrs = {a.name: a.i for a in n.attribute if a.name.endswith("num_heads")}
        want = {"num_heads": kept[layer] * (n_q // n_kv)}
        if form.startswith("gqa"):
            want["kv_num_heads"] = kept[layer]
        assert attrs == want, (layer, attrs, want)
    if form == "gqa-rope-node":
        ropes = [n for n in slim.graph.node if n.op_type == "RotaryEmbedding"]
        assert [next(a.i for a in r.attribute if a.name == "num_heads") for r in ropes] == [
            x for layer in range(layers) for x in (kept[layer] * n_q // n_kv, kept[layer])]

    for seq in SEQS:
        feeds = _feeds(src, 2, seq, seed)
        original, want, got = _run(src, feeds), _run(masked_path, feeds), _run(slim_path, feeds)
        assert got.shape == want.shape and got.shape[:2] == (2, seq)
        assert _rel(want, original) > 1e-3  # the selection matters
        assert _rel(got, want) <= 1e-5, seq


def test_qkv_hidden_sizes_follow(files, tmp_path):
    """An Attention that spells out ``qkv_hidden_sizes`` gets them per layer too."""
    import onnx_ir as ir

    model = ir.load(str(files["bert-attention"]))
    for n in model.graph:
        if n.op_type == "Attention":
            n.attributes["qkv_hidden_sizes"] = ir.AttrInt64s("qkv_hidden_sizes", [64, 64, 64])
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    ir.save(model, str(src))
    result = analyze(import_onnx(src))
    heads = sorted((g for g in result.prunable() if g.kind == "heads"),
                   key=lambda g: _layer_of(result, g))
    remove_units_onnx(result, {heads[0].id: [1], heads[1].id: [0, 2, 3]})
    slim_path = _save(result, tmp_path / "slim" / "model.onnx")
    got = [[list(a.ints) for a in n.attribute if a.name == "qkv_hidden_sizes"]
           for n in _attention_nodes(onnx.load(str(slim_path)), "bert-attention")]
    assert got == [[[48, 48, 48]], [[16, 16, 16]]]
    feeds = _feeds(src, 2, 6)
    assert _run(slim_path, feeds).shape == (2, 6, BERT["hidden"])


def test_cli_on_a_fused_file(files, tmp_path):
    out = tmp_path / "out"
    assert main(["compile", str(files["bert-attention"]), "-p",
                 "prune-structured{heads=0.5,mlp=0.25},export-onnx", "-o", str(out)]) == 0
    path = out / "model.onnx"
    onnx.checker.check_model(str(path))
    pr = json.loads((out / "report.json").read_text())["passes"][0]["report"]
    assert pr["input"] == "onnx"
    heads = [r for r in pr["onnx_rewrites"] if r.get("attribute") == "num_heads"]
    assert [(r["old"], r["new"]) for r in heads] == [(4, 2)] * BERT["layers"]
    for seq in SEQS:
        hidden = _run(path, _feeds(path, 2, seq))
        assert hidden.shape == (2, seq, BERT["hidden"]) and np.isfinite(hidden).all()


def test_unsupported_contrib_attention_is_refused_naming_the_node(files, tmp_path, capsys):
    """A per-head ``attention_bias`` on a MultiHeadAttention is not described: asking for
    heads names the node before anything changes; MLP channels still work."""
    import onnx_ir as ir

    model = ir.load(str(files["bert-mha"]))
    g = model.graph
    mha = next(n for n in g if n.op_type == "MultiHeadAttention")

    def const(name, arr):
        v = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                     shape=ir.Shape(arr.shape), const_value=ir.tensor(arr, name=name))
        g.register_initializer(v)
        return v

    def op(op_type, inputs, name, **attrs):
        n = ir.node(op_type, inputs, attributes=attrs, name=name)
        g.insert_before(mha, n)
        return n.outputs[0]

    # a [1, heads, S, S] bias: one value per head, broadcast to the sequence at run time
    per_head = const("per_head", np.linspace(-1, 1, BERT["heads"], dtype=np.float32)
                     .reshape(1, BERT["heads"], 1, 1))
    seq = op("Slice", [op("Shape", [g.inputs[0]], "bias_shape"), const("b1", np.array([1])),
                       const("b2", np.array([2]))], "bias_seq")
    target = op("Concat", [const("b_1", np.array([1])), const("b_n", np.array([BERT["heads"]])),
                           seq, seq], "bias_target", axis=0)
    bias = op("Expand", [per_head, target], "head_bias")
    mha.resize_inputs(6)
    mha.replace_input_with(5, bias)
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    ir.save(model, str(src))
    _run(src, _feeds(src, 2, 5))  # ORT accepts it
    before = src.read_bytes()

    args = ["compile", str(src), "-p", "prune-structured{heads=0.5},export-onnx", "-o"]
    assert main([*args, str(tmp_path / "heads")]) == 2
    err = capsys.readouterr().err
    assert f"ONNX node '{mha.name}' (com.microsoft.MultiHeadAttention)" in err
    assert "is per head" in err
    assert not (tmp_path / "heads" / "model.onnx").exists()
    assert src.read_bytes() == before
    out = tmp_path / "mlp"
    assert main(["compile", str(src), "-p", "prune-structured{mlp=0.5},export-onnx", "-o",
                 str(out)]) == 0
