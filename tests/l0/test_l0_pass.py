"""`l0` on the tiny LLaMA: training moves the gates, the slim model equals the masked
model, an interrupted run resumes to the same result, bad input fails early."""

from __future__ import annotations

import json
import random

import pytest
import torch

from slimgraph.cli import main
from slimgraph.errors import PipelineError
from slimgraph.frontends.build import graph_of
from slimgraph.frontends.loading import load_model
from slimgraph.l0.gates import fold_gates
from slimgraph.l0.train import train
from slimgraph.passes.base import CompileState
from slimgraph.passes.l0 import L0
from slimgraph.passes.pipeline import from_text_or_file
from slimgraph.structured.removal import remove_units
from tests import zoo


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("l0")
    zoo.build("llama").save_pretrained(d / "m")
    zoo.tiny_tokenizer().save_pretrained(d / "m")
    rng = random.Random(0)
    with open(d / "train.jsonl", "w") as f:
        for _ in range(24):
            f.write(json.dumps({"instruction": " ".join(rng.choices(zoo.WORDS, k=6)),
                                "input": " ".join(rng.choices(zoo.WORDS, k=3)),
                                "output": " ".join(rng.choices(zoo.WORDS, k=10))}) + "\n")
    (d / "train.txt").write_text(zoo.tiny_text(600, seed=2))
    return d


def _state(tiny, out=None):
    loaded = load_model(str(tiny / "m"))
    state = CompileState(loaded=loaded, out_dir=out)
    state.graph = graph_of(loaded)
    return state


def _pass(tiny, **kw):
    opts = dict(target=0.5, steps=16, data=str(tiny / "train.jsonl"), seqlen=40, batch=2,
                lr=1e-3, prompt="none")
    opts.update(kw)
    return L0(**opts)


def test_training_moves_sparsity_toward_target_and_lambda_from_zero(tiny):
    state = _state(tiny)
    p = _pass(tiny, steps=30, lora_steps=2, ramp_steps=6)
    session, examples, _, cfg = p.start(state)
    before = session.sparsity()
    train(session, examples, cfg, pad_id=0)
    after = session.sparsity()
    assert after > before + 0.05, (before, after)
    lam = session.gates.lambdas["all"].detach()
    assert lam[0] < -0.1 and lam[1] > 0.1  # ascent: λ1 pushes ŝ up, λ2 grows
    hist = session.history
    assert hist[-1]["step"] == 30 and hist[-1]["target"] == 0.5
    lora = [n for n, p in session.model.named_parameters() if "lora_B" in n]
    params = dict(session.model.named_parameters())
    assert lora and all(float(params[n].detach().abs().sum()) > 0 for n in lora)


@pytest.mark.parametrize("kinds, finalize", [("heads mlp", "expected"), ("heads mlp hidden", "expected"),
                                             ("heads mlp", "target"), ("heads mlp hidden", "target")])
def test_slim_model_equals_trained_masked_model(tiny, kinds, finalize):
    from slimgraph.l0.gates import values_at_target

    state = _state(tiny)
    p = _pass(tiny, kinds=kinds, steps=10, lora_steps=1, ramp_steps=4, lora="q_proj v_proj o_proj",
              target=0.3)
    session, examples, _, cfg = p.start(state)
    train(session, examples, cfg, pad_id=0)
    ids = torch.randint(0, zoo.VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    session.model.eval()
    targets = cfg.targets if finalize == "target" else None
    if targets:
        session.gates.current = values_at_target(session.gates, session.size, targets)
    else:
        session.gates.set_deterministic()
    values = session.gates.current
    assert any(0 < float(v) < 1 for z in values for v in z)  # soft values to fold
    with torch.no_grad():
        masked = session.model(input_ids=ids, use_cache=False).logits
    values = L0.finish(session, targets)
    selection = fold_gates(state.model, session.gates, values)
    assert selection, "training removed nothing"
    size = session.size
    before = sum(p.numel() for p in state.model.parameters())
    remove_units(state.model, state.analysis(), selection)
    after = sum(p.numel() for p in state.model.parameters())
    assert after < before
    if targets and "hidden" not in kinds:  # the target share of attention + MLP weights is gone
        per_unit = max(f.group.params_per_unit for f in session.gates.families)
        assert 0.3 * size.prunable() <= before - after < 0.3 * size.prunable() + per_unit
    assert not any("lora" in n for n, _ in state.model.named_parameters())
    with torch.no_grad():
        slim = state.model(input_ids=ids, use_cache=False).logits
    rel = float((slim - masked).norm() / masked.norm())
    assert rel <= 1e-5, rel


def test_kept_values_one_and_refinalizing_a_finished_run(tiny, tmp_path):
    """kept_values=one: gates end 0 or 1 (the slim model equals that binary-masked model);
    a finished run finalizes again from its checkpoint with other finalize options."""
    opts = dict(kinds="heads mlp", steps=8, lora_steps=1, ramp_steps=4, target=0.3)
    soft = _state(tiny, tmp_path)
    _pass(tiny, **opts).run(soft)
    one = _state(tiny, tmp_path)  # same OUTDIR: its checkpoint is at the last step
    steps_seen = []
    one.progress = lambda done, total, **_: steps_seen.append(done)
    _pass(tiny, kept_values="one", **opts).run(one)
    assert steps_seen == []  # nothing trained again
    assert one.selection == soft.selection  # same ranking
    # every kept column as it was (gate 1), where the soft run scaled them
    w_one = one.model.model.layers[0].mlp.down_proj.weight
    w_soft = soft.model.model.layers[0].mlp.down_proj.weight
    ref = _state(tiny).model.model.layers[0].mlp.down_proj.weight
    removed = set(one.selection.get(next(g.id for g in one.analysis().groups
                                         if g.kind == "mlp" and g.layer == 0), []))
    kept = [c for c in range(ref.shape[1]) if c not in removed]
    assert torch.equal(w_one[:, kept], ref[:, kept])
    assert not torch.equal(w_soft[:, kept], ref[:, kept])


def _final(state):
    return {n: p.detach().clone() for n, p in state.model.named_parameters()}


def test_interrupted_run_resumes_to_the_uninterrupted_result(tiny, tmp_path):
    p = _pass(tiny, steps=8, lora_steps=1, ramp_steps=4, save_every=3)
    full = _state(tiny, tmp_path / "a")
    p.run(full)
    ref, ref_sel = _final(full), dict(full.selection)

    state = _state(tiny, tmp_path / "b")

    def interrupt(done, total, **_):
        if done == 5:
            raise KeyboardInterrupt

    state.progress = interrupt
    with pytest.raises(KeyboardInterrupt):
        p.run(state)
    assert (tmp_path / "b" / "l0-checkpoint" / "l0.pt").is_file()
    resumed = _state(tiny, tmp_path / "b")
    steps_seen = []
    resumed.progress = lambda done, total, **_: steps_seen.append(done)
    p.run(resumed)
    assert steps_seen[0] == 4  # resumed after the checkpoint of step 3
    assert resumed.selection == ref_sel
    got = _final(resumed)
    assert got.keys() == ref.keys()
    for n in ref:
        assert torch.allclose(got[n], ref[n], atol=1e-6), n


def test_changed_options_refuse_a_foreign_checkpoint(tiny, tmp_path):
    state = _state(tiny, tmp_path)
    _pass(tiny, steps=2, lora_steps=1, ramp_steps=1).run(state)
    with pytest.raises(PipelineError, match="different l0 run"):
        _pass(tiny, steps=3, lora_steps=1, ramp_steps=1).run(_state(tiny, tmp_path))


def test_plain_text_data_and_prompt_file(tiny, tmp_path):
    (tmp_path / "p.txt").write_text("w5 w6 w7 ")
    state = _state(tiny, tmp_path)
    p = _pass(tiny, steps=3, lora_steps=1, ramp_steps=1, data=str(tiny / "train.txt"),
              prompt="default", prompt_file=str(tmp_path / "p.txt"))
    session, examples, prompt, _ = p.start(state)
    assert prompt == "w5 w6 w7 "
    assert all(e.ids[:3] == [5, 6, 7] and e.labels[:3] == [-100] * 3 for e in examples)
    session.model.unload()


def test_cli_pipeline_l0_remove_export_onnx(tiny, tmp_path):
    out = tmp_path / "out"
    pipe = (f"l0{{target=0.3,steps=6,data={tiny / 'train.jsonl'},seqlen=160,batch=2,"
            "lora_steps=1,ramp_steps=2,finetune_steps=2},remove,save-hf,export-onnx")
    assert main(["compile", str(tiny / "m"), "-p", pipe, "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    l0 = report["passes"][0]["report"]
    assert l0["finetune"]["steps"] == 2 and l0["prompt"]
    assert (out / "prompt.txt").read_text() == l0["prompt"]
    assert report["parameters"]["after"] < report["parameters"]["before"]
    assert (out / "model.onnx").is_file()
    assert main(["eval", str(out), "--ppl", str(tiny / "train.txt"), "--seqlen", "16",
                 "--windows", "2", "--prompt", str(out / "prompt.txt"), "--json"]) == 0


def test_init_act_starts_the_gates_in_importance_order(tiny):
    import math

    state = _state(tiny)
    p = _pass(tiny, init="act", droprate_init=0.05, kinds="heads mlp", init_spread=0.5)
    session, examples, _, _ = p.start(state)
    fams = session.gates.families
    scores = p._importance(state, fams, examples)
    values = p.finish(session, {"heads": 0.25, "mlp": 0.25})  # untrained
    base = math.log(0.95 / 0.05)
    for fam, la, score, v in zip(fams, session.gates.log_alpha, scores, values, strict=True):
        la = la.detach()
        # per group: log alpha rises with importance, centred on droprate_init's log alpha
        assert torch.all(la[torch.argsort(score, stable=True)].diff() >= 0), fam.name
        assert la.std() > 0.1 and abs(float(la.mean()) - base) < 1e-5
        # finalize=target removes the least important units of a group first
        if (v == 0).any() and (v != 0).any():
            assert score[v == 0].max() <= score[v != 0].min()
    mlp_removed = [int((v == 0).sum()) for f, v in zip(fams, values) if f.group.kind == "mlp"]
    assert max(mlp_removed) == min(mlp_removed) > 0  # the same share of every layer
    # the default keeps the paper's uniform start
    session, *_ = _pass(tiny).start(_state(tiny))
    assert all(torch.all(la == 0) for la in session.gates.log_alpha)


@pytest.mark.parametrize("text, match", [
    ("l0{target=1.5,data=X}", "target sparsity 1.5 is outside"),
    ("l0{target=0,data=X}", "outside"),
    ("l0{kinds=heads+foo,data=X}", "foo: choose from"),
    ("l0{mlp_target=0.3,kinds=heads,data=X}", "mlp is not gated"),
    ("l0{prompt=maybe,data=X}", "not 'default' or 'none'"),
    ("l0{steps=4,lora_steps=4,data=X}", "leaves no step"),
    ("l0{finalize=best,data=X}", "not 'target' or 'expected'"),
    ("l0{init=magnitude,data=X}", "not 'uniform' or 'act'"),
    ("l0{kept_values=half,data=X}", "not 'soft' or 'one'"),
    ("l0{init=act,init_spread=-1,data=X}", "option 'init_spread': must be >= 0"),
    ("l0{init=act,init_samples=0,data=X}", "option 'init_samples': must be >= 1"),
])
def test_bad_options_fail_before_any_work(text, match):
    with pytest.raises(PipelineError, match=match):
        from_text_or_file(text)


@pytest.mark.parametrize("content, match", [
    ('{"instruction": "a", "output": "b"}\nnot json\n', r"train.jsonl:2: not valid JSON"),
    ('{"input": "a", "output": "b"}\n', "line 1 has no 'instruction'"),
])
def test_malformed_training_data_is_named(tiny, tmp_path, content, match):
    (tmp_path / "train.jsonl").write_text(content)
    with pytest.raises(Exception, match=match):
        _pass(tiny, data=str(tmp_path / "train.jsonl")).start(_state(tiny))


def test_missing_data_is_an_error_before_training(tiny, tmp_path):
    rc = main(["compile", str(tiny / "m"), "-p", "l0{steps=2},remove", "-o", str(tmp_path / "o"),
               "--calib-file", str(tmp_path / "nope.txt")])  # the default data is --calib-file
    assert rc != 0
    rc = main(["compile", str(tiny / "m"), "-p", f"l0{{steps=2,data={tmp_path}/nope.jsonl}}",
               "-o", str(tmp_path / "o")])
    assert rc != 0
    assert not (tmp_path / "o" / "l0-checkpoint").exists()


def test_default_lora_falls_back_to_a_fused_qkv(tmp_path):
    """Phi-3 has no q_proj / v_proj: the default LoRA goes on its qkv_proj; a lora= the
    user names is never replaced."""
    from slimgraph.l0.train import FUSED_QKV, wrap_lora

    model = zoo.build("phi3")
    peft_model = wrap_lora(model, ["q_proj", "v_proj"], 4, 4, 0, FUSED_QKV)
    wrapped = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters()
               if "lora_A" in n}
    assert wrapped == {"qkv_proj"}
    with pytest.raises(PipelineError, match="no linear named q_proj or v_proj.*qkv_proj"):
        wrap_lora(zoo.build("phi3"), ["q_proj", "v_proj"], 4, 4, 0)
