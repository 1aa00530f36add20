from __future__ import annotations

import torch

from slimgraph.frontends.build import graph_of
from slimgraph.frontends.loading import wrap_module
from slimgraph.structured.importance import consumer_input_norms
from tests import zoo


def test_consumer_input_norms_hook_the_linears_reading_each_weight():
    model = zoo.build("llama")  # tied embeddings: lm_head multiplies by embed_tokens.weight
    graph = graph_of(wrap_module(model))
    seen = {}
    final_norm = model.model.norm.register_forward_hook(
        lambda _m, _a, out: seen.__setitem__("x", out.detach().double()))
    ids = torch.randint(0, 100, (2, 9))
    try:
        norms = consumer_input_norms(model, graph, ids, batch=2)
    finally:
        final_norm.remove()
    # the tied lm_head's input (the final norm's output), under the embedding's name; not
    # the embedding lookup's token ids
    tied = norms["model.embed_tokens.weight"]
    assert tied.shape == (zoo.HIDDEN,)
    torch.testing.assert_close(tied, seen["x"].pow(2).sum((0, 1)))
    assert norms["model.layers.0.mlp.down_proj.weight"].shape == (zoo.INTER,)
    # per input channel, whatever the sequence length
    other = consumer_input_norms(model, graph, torch.randint(0, 100, (1, 5)), batch=1)
    assert {k: v.shape for k, v in other.items()} == {k: v.shape for k, v in norms.items()}


def test_hidden_channels_by_activation_importance(tmp_path):
    from slimgraph.cli import main

    d = tmp_path / "m"
    zoo.build("llama").save_pretrained(d)
    zoo.tiny_tokenizer().save_pretrained(d)
    (tmp_path / "calib.txt").write_text(zoo.tiny_text(400))
    rc = main(["compile", str(d), "-p", "prune-structured{hidden=0.25,importance=act,samples=4,"
               "seqlen=16},save-hf", "-o", str(tmp_path / "o"), "--calib-file",
               str(tmp_path / "calib.txt")])
    assert rc == 0
    from slimgraph.frontends.loading import load_model

    m = load_model(str(tmp_path / "o" / "hf")).model
    assert m.model.embed_tokens.weight.shape[1] == zoo.HIDDEN - zoo.HIDDEN // 4
