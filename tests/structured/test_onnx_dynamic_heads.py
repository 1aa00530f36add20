"""Heads / GQA KV-groups on dynamic-axis ONNX exports (issue 7).

A tiny random LLaMA with GQA (6 query heads, 3 KV-groups, head_dim 8, 3 layers) exported
as ``export-onnx`` does (dynamo, dynamic batch and sequence) at opset 18 (decomposed
attention; the keys are transposed through a run-time ``Reshape`` to ``[-1, seq, 8]``)
and at opset 23 (fused ``Attention`` and ``RotaryEmbedding`` with ``num_heads``). The
head counts there sit in ``Concat``-built shape tensors (``Concat(batch, [3], [2], seq,
[8])`` of ``repeat_kv``'s Expand, shared by every layer) and in ``num_heads``.

Invariant: the slimmed ONNX model's outputs equal those of the original ONNX model with
the same units zeroed, at two sequence lengths and batch 2, in ONNX Runtime. (ORT 1.32
rejects batch > 1 on torch's own opset-23 files: its RotaryEmbedding wants cos/sin caches
of the input's batch size and the exporter writes ``[1, S, D/2]``; ``export-onnx``
broadcasts the caches to the batch, see ``batch_rotary_caches``.)
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import transformers as tf

from slimgraph.cli import main
from slimgraph.errors import PipelineError
from slimgraph.frontends.onnx_import import import_onnx
from slimgraph.frontends.torch_export import trace
from slimgraph.ir.dependency import analyze
from slimgraph.structured.onnx_removal import remove_units_onnx
from slimgraph.structured.unit_slicing import mask_units
from tests.structured.random_selection import slim_and_masked

ort = pytest.importorskip("onnxruntime")

VOCAB, LAYERS, HEADS, KV, HEAD_DIM = 128, 3, 6, 3, 8
OPSETS = [18, 23]
SEQS = [5, 11]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=KV, head_dim=HEAD_DIM)
    return tf.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from slimgraph.backends.onnx_export import export_onnx

    d = tmp_path_factory.mktemp("onnx_dyn_heads")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for opset in OPSETS:
            out[opset] = export_onnx(_model(), d / f"op{opset}" / "model.onnx", vocab=VOCAB,
                                     opset=opset)
    return out


def _ids(batch, seq, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, seq))


def _run(path, ids, reference=False):
    if reference:
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(onnx.load(str(path))).run(None, {"input_ids": ids})[0]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids})[0]


def _runs(opset):
    """(batch, reference evaluator?) pairs an opset's files are compared with."""
    return [(2, False), (1, False)] if opset == 18 else [(2, False), (1, True)]


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _save(result, path):
    from slimgraph.backends.onnx_export import save_onnx_model

    return save_onnx_model(result.graph.meta["onnx_model"], path)


def _check_strict(path):
    onnx.checker.check_model(str(path))
    onnx.shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True,
                                      data_prop=True)


@pytest.mark.parametrize("opset", OPSETS)
def test_kv_groups_are_found_and_match_the_torch_path(files, opset):
    result = analyze(import_onnx(files[opset]))
    heads = sorted((g for g in result.groups if g.kind == "heads"), key=lambda g: g.layer)
    assert [g.layer for g in heads] == list(range(LAYERS))
    for g in heads:
        assert g.prunable, g.reasons
        assert (g.units, g.unit, g.queries_per_unit) == (KV, "kv-group", HEADS // KV)
        params = {m.param.rsplit(".", 2)[-2] for m in g.members}
        assert params == {"q_proj", "k_proj", "v_proj", "o_proj"}, params
    # the same groups as the PyTorch path (kind, layer, units, parameters per unit)
    ids = torch.from_numpy(_ids(1, 7))
    torch_groups = analyze(trace(_model(), (ids,), {"use_cache": False})).groups
    want = sorted((g.kind, g.layer, g.units, g.params_per_unit) for g in torch_groups
                  if g.prunable and g.kind in ("heads", "mlp"))
    got = sorted((g.kind, g.layer, g.units, g.params_per_unit) for g in result.prunable()
                 if g.kind in ("heads", "mlp"))
    assert got == want


def _kept_kv(result, sel):
    """Layer -> KV-groups kept."""
    by_id = {g.id: g for g in result.groups}
    kept = {layer: KV for layer in range(LAYERS)}
    for gid, units in sel.items():
        if by_id[gid].kind == "heads":
            kept[by_id[gid].layer] -= len(units)
    return kept


def _inferred_shapes(path):
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), data_prop=True)
    return {vi.name: [d.dim_value if d.HasField("dim_value") else d.dim_param
                      for d in vi.type.tensor_type.shape.dim]
            for vi in [*model.graph.value_info, *model.graph.output]}, model


def _head_counts(path, opset):
    """Layer -> the KV-group count the slim file encodes: in the GQA repeat (Expand to
    [B, kv, rep, S, D]) and, at opset 23, in each RotaryEmbedding's num_heads (which
    must agree with its input's inferred head dim)."""
    shapes, model = _inferred_shapes(path)
    expands = [shapes[n.output[0]] for n in model.graph.node if n.op_type == "Expand"
               and len(shapes.get(n.output[0], [])) == 5]
    # every layer expands its keys and its values, in order
    assert len(expands) == 2 * LAYERS
    counts = {}
    for layer in range(LAYERS):
        k, v = expands[2 * layer], expands[2 * layer + 1]
        assert k[1:] == v[1:] and k[2] == HEADS // KV and k[4] == HEAD_DIM
        counts[layer] = k[1]
    if opset == 23:
        ropes = [n for n in model.graph.node if n.op_type == "RotaryEmbedding"]
        assert len(ropes) == 2 * LAYERS  # queries, then keys, per layer
        for layer in range(LAYERS):
            q, k = ropes[2 * layer], ropes[2 * layer + 1]
            nq = next(a.i for a in q.attribute if a.name == "num_heads")
            nk = next(a.i for a in k.attribute if a.name == "num_heads")
            assert nq == shapes[q.input[0]][1] and nk == shapes[k.input[0]][1]
            assert (nq, nk) == (counts[layer] * HEADS // KV, counts[layer])
    return counts


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_slim_equals_masked_on_dynamic_axes(files, tmp_path, opset, seed):
    src = files[opset]
    before = src.read_bytes()
    result, sel, report, masked_path, slim_path = slim_and_masked(src, seed, tmp_path)
    assert report["shape_check"]["checked"] and report["shape_check"]["strict"]
    assert report["params_after"] < report["params_before"]
    _check_strict(slim_path)
    assert src.read_bytes() == before

    # the head counts the slim file encodes, per layer
    kept = _kept_kv(result, sel)
    assert _head_counts(slim_path, opset) == kept
    assert _head_counts(src, opset) == {layer: KV for layer in range(LAYERS)}
    rewritten = {r["op"] for r in report["onnx_rewrites"]}
    assert {"Expand", "Reshape"} <= rewritten
    assert ("RotaryEmbedding" in rewritten) == (opset == 23)

    # dynamic axes survive: two sequence lengths, batch 2
    inp = onnx.load(str(slim_path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in inp] == ["batch", "seq"]
    for seq in SEQS:
        for batch, reference in _runs(opset):
            ids = _ids(batch, seq, seed)
            want = _run(masked_path, ids, reference)
            got = _run(slim_path, ids, reference)
            assert got.shape == want.shape == (batch, seq, VOCAB)
            assert _rel(got, want) <= 1e-5, (seq, batch, reference)

    # the slim file imports again with the smaller groups
    again = analyze(import_onnx(slim_path))
    for layer, n in kept.items():
        found = [g for g in again.groups if g.kind == "heads" and g.layer == layer]
        assert [g.units for g in found] == ([n] if n > 1 else [])


def test_a_layer_left_alone_keeps_the_shared_shape_tensor(files, tmp_path):
    """The repeat_kv shape tensor is one Concat read by every layer: pruning only layer 1
    gives layer 1 its own rewritten copy and leaves the others reading the original."""
    result = analyze(import_onnx(files[18]))
    g = next(g for g in result.prunable() if g.kind == "heads" and g.layer == 1)
    report = remove_units_onnx(result, {g.id: [0, 2]})
    path = _save(result, tmp_path / "model.onnx")
    assert _head_counts(path, 18) == {0: KV, 1: 1, 2: KV}
    concats = {r["concat"] for r in report["onnx_rewrites"] if "concat" in r}
    assert concats  # the Expand / Reshape targets of layer 1 were Concat-built
    ids = _ids(2, 6)
    assert _run(path, ids).shape == (2, 6, VOCAB)


def test_shape_arithmetic_that_removal_cannot_follow_is_refused(files):
    """A head count computed by arithmetic at run time is not rewritten: the pass refuses
    before anything changes, naming the node."""
    model = ir.load(str(files[18]))
    reshape = next(n for n in model.graph if n.op_type == "Reshape"
                   and n.outputs[0].shape is not None and len(n.outputs[0].shape) == 4
                   and n.inputs[0].producer().op_type == "Expand")
    concat = reshape.inputs[1].producer()
    k = next(i for i, v in enumerate(concat.inputs) if v.const_value is not None
             and v.const_value.numpy().tolist() == [HEADS])
    two = ir.Value(name="two", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1]),
                   const_value=ir.tensor(np.array([HEADS // 2], dtype=np.int64), name="two"))
    model.graph.register_initializer(two)
    add = ir.Node("", "Add", [two, two], outputs=[ir.Value(name="six")], name="heads_sum")
    model.graph.insert_before(concat, add)
    concat.replace_input_with(k, add.outputs[0])
    path = files[18].parent.parent / "arith" / "model.onnx"
    path.parent.mkdir(exist_ok=True)
    ir.save(model, str(path))

    result = analyze(import_onnx(path))
    heads = next(g for g in result.prunable() if g.kind == "heads")
    shapes = {n: tuple(p.param.shape) for n, p in result.graph.params.items()}
    with pytest.raises(PipelineError, match=rf"{reshape.name}.*ops removal does not follow"):
        remove_units_onnx(result, {heads.id: [0]})
    assert {n: tuple(p.param.shape) for n, p in result.graph.params.items()} == shapes


@pytest.mark.parametrize("opset", OPSETS)
def test_cli_heads_on_a_dynamic_axis_file(files, tmp_path, opset):
    out = tmp_path / "out"
    assert main(["compile", str(files[opset]), "-p", "prune-structured{heads=0.5,mlp=0.25},"
                 "export-onnx", "-o", str(out)]) == 0
    path = out / "model.onnx"
    _check_strict(path)
    pr = json.loads((out / "report.json").read_text())["passes"][0]["report"]
    assert pr["input"] == "onnx"
    assert {k: v for k, v in pr["removed_units"].items() if k.startswith("heads")} == {
        f"heads[{layer}]": 2 for layer in range(LAYERS)}  # round(3 x 0.5) = 2 of 3
    assert _head_counts(path, opset) == {layer: 1 for layer in range(LAYERS)}
    for seq in SEQS:
        for batch, reference in _runs(opset):
            logits = _run(path, _ids(batch, seq), reference)
            assert logits.shape == (batch, seq, VOCAB) and np.isfinite(logits).all()


def test_attention_head_count_attributes_follow(files, tmp_path):
    """``q_num_heads`` / ``kv_num_heads`` (optional on 4-D ``Attention``; torch leaves them
    out) are rewritten to each layer's new head counts when a file has them."""
    model = ir.load(str(files[23]))
    for node in model.graph:
        if node.op_type == "Attention":  # keys / values arrive repeated to HEADS heads
            node.attributes["q_num_heads"] = ir.AttrInt64("q_num_heads", HEADS)
            node.attributes["kv_num_heads"] = ir.AttrInt64("kv_num_heads", HEADS)
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    ir.save(model, str(src))
    result = analyze(import_onnx(src))
    heads = {g.layer: g for g in result.prunable() if g.kind == "heads"}
    sel = {heads[0].id: [1], heads[2].id: [0, 2]}
    masked = analyze(import_onnx(src))
    mask_units(masked, sel)
    masked_path = _save(masked, tmp_path / "masked" / "model.onnx")
    remove_units_onnx(result, sel)
    slim_path = _save(result, tmp_path / "slim" / "model.onnx")
    _check_strict(slim_path)
    got = [{a.name: a.i for a in n.attribute if a.name.endswith("num_heads")}
           for n in onnx.load(str(slim_path)).graph.node if n.op_type == "Attention"]
    per_layer = [2 * (HEADS // KV), HEADS, 1 * (HEADS // KV)]  # kept KV-groups x 2 queries
    assert got == [{"q_num_heads": n, "kv_num_heads": n} for n in per_layer]
    for seq in SEQS:
        ids = _ids(1, seq)
        assert _rel(_run(slim_path, ids), _run(masked_path, ids)) <= 1e-5
