"""`distill` on the tiny LLaMA: the loss, what training keeps (removed units, sparsity
masks), checkpoints, refusals, and two processes computing what one does."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from slimgraph.cli import main
from slimgraph.errors import PipelineError
from slimgraph.frontends.build import graph_of
from slimgraph.frontends.loading import load_model
from slimgraph.l0.data import collate
from slimgraph.l0.distill_loss import ce_sum, hidden_mse_sum, kl_sum, scored_positions
from slimgraph.passes.base import CalibrationDefaults, CompileState
from slimgraph.passes.distill import Distill
from slimgraph.passes.pipeline import from_text_or_file
from tests import zoo

WORKER = Path(__file__).with_name("distill_worker.py")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("distill")
    for name, seed in (("m", 0), ("other", 1), ("sharp", 1)):
        model = zoo.build("llama", seed=seed)
        if name == "sharp":  # tied embeddings x 40: confident next-token distributions
            with torch.no_grad():
                model.get_input_embeddings().weight.mul_(40.0)
        model.save_pretrained(d / name)
        zoo.tiny_tokenizer().save_pretrained(d / name)
    (d / "train.txt").write_text(zoo.tiny_text(800, seed=2))
    rng = random.Random(0)
    with open(d / "train.jsonl", "w") as f:
        for _ in range(16):
            f.write(json.dumps({"instruction": " ".join(rng.choices(zoo.WORDS, k=rng.randint(2, 8))),
                                "input": "",
                                "output": " ".join(rng.choices(zoo.WORDS, k=rng.randint(3, 12)))}) + "\n")
    return d


def _state(tiny, out=None, model="m"):
    loaded = load_model(str(tiny / model))
    state = CompileState(loaded=loaded, out_dir=out)
    state.graph = graph_of(loaded)
    return state


def _run(state, text):
    for p in from_text_or_file(text):
        p.requires(state)
        p.run(state)
    return state


def _weights(state):
    return {n: p.detach().clone() for n, p in state.model.named_parameters()}


def _mean_kl(student, teacher, examples):
    batch = collate(examples, 0)
    scored = scored_positions(batch["labels"])
    with torch.no_grad():
        kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        kl = kl_sum(student(**kw).logits, teacher(**kw).logits, scored)
    return float(kl) / int(scored.sum())


def test_loss_is_zero_for_identical_distributions_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 6, 11, generator=g), torch.randn(2, 6, 11, generator=g)
    labels = torch.tensor([[5, 1, 2, 3, 4, 5], [-100, -100, 2, 3, -100, -100]])
    scored = scored_positions(labels)
    assert int(scored.sum()) == 7
    assert abs(float(kl_sum(a, a, scored))) < 1e-6
    assert float(kl_sum(a, a + 3.0, scored)) == pytest.approx(0.0, abs=1e-5)  # softmax shift
    assert float(kl_sum(a, b, scored)) > 0.1
    assert float(kl_sum(a, b, scored, temperature=2.0)) > 0
    # KL(t || s) by hand at one scored position, and the T^2 scale
    p_t, log_p_s = torch.softmax(b[0, 0] / 2, -1), torch.log_softmax(a[0, 0] / 2, -1)
    one = torch.zeros_like(scored)
    one[0, 0] = True
    ref = 4 * float((p_t * (p_t.log() - log_p_s)).sum())
    assert float(kl_sum(a, b, one, temperature=2.0)) == pytest.approx(ref, rel=1e-5)
    # the LM loss sum over the same positions equals HF's mean times the count
    lm = torch.nn.functional.cross_entropy(a[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    assert float(ce_sum(a, labels)) == pytest.approx(float(lm) * 7, rel=1e-5)
    hs = (a, a * 2, a * 3)
    assert float(hidden_mse_sum(hs, hs, scored)) == 0.0
    assert float(hidden_mse_sum(hs, (a, a, a), scored)) > 0


def test_identical_teacher_gives_zero_loss_on_the_model(tiny):
    from slimgraph.l0.train import token_loss

    state = _state(tiny)
    p = Distill(data=str(tiny / "train.txt"), seqlen=24, hidden_weight=1.0)
    session, examples, masks = p.start(state)
    assert session.teacher is not state.model  # a frozen copy, not the student
    assert not any(t.requires_grad for t in session.teacher.parameters())
    loss = token_loss(session, state.model, collate(examples[:3], 0), p.config())
    assert abs(float(loss.detach())) < 1e-4
    assert masks == []  # a dense model has no masks to keep


def test_distill_after_removal_lowers_kl_and_keeps_the_removed_units_removed(tiny, tmp_path):
    state = _run(_state(tiny, tmp_path), "prune-structured{mlp=0.5,heads=0.5}")
    shapes = {n: p.shape for n, p in state.model.named_parameters()}
    params = sum(p.numel() for p in state.model.parameters())
    p = Distill(data=str(tiny / "train.txt"), seqlen=24, batch=4, steps=25, lr=3e-3,
                teacher=str(tiny / "sharp"))
    session, examples, _ = p.start(state)
    teacher = session.teacher
    before = _mean_kl(state.model, teacher, examples)
    seen = []
    state.progress = lambda done, total, **kw: seen.append((done, total, kw.get("info", "")))
    result = p.run(state)
    after = _mean_kl(state.model, teacher, examples)
    assert after < 0.7 * before, (before, after)
    assert {n: t.shape for n, t in state.model.named_parameters()} == shapes
    assert sum(t.numel() for t in state.model.parameters()) == params
    rep = result.report
    assert rep["steps"] == 25 and rep["tokens_seen"] > 25 * 4 * 10 and rep["training"] == "full"
    assert rep["loss_last"] < rep["loss_first"]
    assert seen[-1][:2] == (25, 25) and "tok/s" in seen[-1][2] and "ETA" in seen[-1][2]
    assert (tmp_path / "distill-checkpoint" / "distill.pt").is_file()


@pytest.mark.parametrize("lora", ["", "all"])
def test_sparsity_masks_stay_exactly_zero(tiny, lora):
    state = _run(_state(tiny), "sparsify{score=magnitude,pattern=2:4}")
    zero = {n: p.detach() == 0 for n, p in state.model.named_parameters() if p.dim() >= 2}
    assert sum(int(z.sum()) for z in zero.values()) > 0
    before = _weights(state)
    _run(state, f"distill{{data={tiny / 'train.txt'},seqlen=24,steps=6,lr=1e-2,lora={lora}}}"
         ",check-sparsity{pattern=2:4}")
    after = _weights(state)
    changed = 0
    for n, z in zero.items():
        assert torch.all(after[n][z] == 0), n
        changed += int((after[n] != before[n]).sum())
    assert changed > 0  # trained (the merged LoRA update too)
    if lora:
        assert not any("lora" in n for n in after)


def test_interrupted_run_resumes_to_the_uninterrupted_result(tiny, tmp_path):
    text = (f"prune-structured{{mlp=0.25}},distill{{data={tiny / 'train.jsonl'},seqlen=32,batch=2,"
            "steps=8,lr=1e-3,save_every=3,teacher=" + str(tiny / "other") + "}")
    ref = _weights(_run(_state(tiny, tmp_path / "a"), text))

    state = _state(tiny, tmp_path / "b")

    def interrupt(done, total, **_):
        if done == 5:
            raise KeyboardInterrupt

    state.progress = interrupt
    with pytest.raises(KeyboardInterrupt):
        _run(state, text)
    resumed = _state(tiny, tmp_path / "b")
    seen = []
    resumed.progress = lambda done, total, **_: seen.append(done)
    got = _weights(_run(resumed, text))
    assert seen[0] == 4  # resumed after the checkpoint of step 3
    assert got.keys() == ref.keys()
    for n in ref:
        assert torch.allclose(got[n], ref[n], atol=1e-6), n
    # other options: the checkpoint is refused, not silently reused
    with pytest.raises(PipelineError, match="different distill run"):
        _run(_state(tiny, tmp_path / "b"), text.replace("steps=8", "steps=9"))


def test_onnx_input_offload_and_bad_options_are_refused(tiny, tmp_path, capsys):
    out = tmp_path / "onnx"
    assert main(["compile", str(tiny / "m"), "-p", "export-onnx", "-o", str(out)]) == 0
    capsys.readouterr()
    rc = main(["compile", str(out / "model.onnx"), "-p", f"distill{{data={tiny / 'train.txt'}}}",
               "-o", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert rc == 2 and "distill" in err and "ONNX" in err
    onnx_state = CompileState(loaded=SimpleNamespace(model=None, onnx_path=out / "model.onnx",
                                                     config=None))
    with pytest.raises(PipelineError, match="trains PyTorch modules"):
        Distill(data=str(tiny / "train.txt")).requires(onnx_state)
    with pytest.raises(PipelineError, match="--offload"):
        Distill().check_offload({})
    for text, match in [("distill{teacher=t.onnx}", "option 'teacher': an ONNX model"),
                        ("distill{steps=0}", "option 'steps'"),
                        ("distill{temperature=0}", "option 'temperature'"),
                        ("distill{warmup=10,steps=10}", "option 'warmup'"),
                        ("l0{teacher=x}", "only used with distill=true")]:
        with pytest.raises(PipelineError, match=match):
            from_text_or_file(text)
    with pytest.raises(PipelineError, match="option 'data'"):
        Distill().requires(_state(tiny))
    state = _run(_state(tiny), "prune-structured{mlp=0.25,remove=false}")
    with pytest.raises(PipelineError, match="put 'remove' before"):
        Distill(data=str(tiny / "train.txt")).requires(state)
    state = _run(_state(tiny), "prune-structured{hidden=0.25}")
    with pytest.raises(PipelineError, match="option 'hidden_weight'.*hidden size"):
        Distill(data=str(tiny / "train.txt"), hidden_weight=1.0).start(state)


def test_data_self_and_l0_with_the_distillation_loss(tiny, tmp_path):
    state = _state(tiny, model="other")
    p = Distill(data="self", samples=2, seqlen=16, teacher=str(tiny / "m"))
    _, examples, _ = p.start(state)
    assert len(examples) >= 2 and all(len(e.ids) == 16 and e.labels == e.ids for e in examples[:-1])
    # add_self: the file's examples, then sequences sampled from the teacher
    from_file = Distill(data=str(tiny / "train.txt"), seqlen=16, teacher=str(tiny / "m"))
    mixed = Distill(data=str(tiny / "train.txt"), seqlen=16, teacher=str(tiny / "m"), add_self=3)
    _, file_examples, _ = from_file.start(_state(tiny, model="other"))
    _, mixed_examples, _ = mixed.start(_state(tiny, model="other"))
    n = len(file_examples)
    assert [e.ids for e in mixed_examples[:n]] == [e.ids for e in file_examples]
    assert len(mixed_examples) - n >= 3 and all(len(e.ids) == 16 for e in mixed_examples[n:n + 3])
    # self_prompt: the sampled sequences continue prefixes of the file's text
    prompted = Distill(data=str(tiny / "train.txt"), seqlen=16, teacher=str(tiny / "m"),
                       add_self=3, self_prompt=4)
    state = _state(tiny, model="other")
    prompts = prompted.prompts(state, str(tiny / "train.txt"))
    _, prompted_examples, _ = prompted.start(state)
    assert [e.ids for e in prompted_examples[:n]] == [e.ids for e in file_examples]
    sampled = [t for e in prompted_examples[n:] for t in e.ids]
    file_text = [t for e in file_examples for t in e.ids]
    assert prompts.shape == (3, 4) and sampled[:4] == prompts[0].tolist()
    assert any(file_text[i:i + 4] == prompts[0].tolist() for i in range(len(file_text)))
    assert sampled[:16] != [t for e in mixed_examples[n:] for t in e.ids][:16]
    for text in ("distill{self_prompt=4}", "distill{add_self=2,self_prompt=256}"):
        with pytest.raises(PipelineError, match="option 'self_prompt'"):
            from_text_or_file(text)
    with pytest.raises(PipelineError, match="option 'add_self'"):
        from_text_or_file("distill{data=self,add_self=2}")
    with pytest.raises(PipelineError, match="option 'add_self'"):
        from_text_or_file("distill{add_self=-1}")
    self_calib = _state(tiny)
    self_calib.calib = CalibrationDefaults(file="self")
    with pytest.raises(PipelineError, match="option 'add_self'.*--calib-file self"):
        Distill(add_self=2).requires(self_calib)
    state = _state(tiny, tmp_path)
    _run(state, f"l0{{target=0.3,steps=4,lora_steps=1,ramp_steps=2,data={tiny / 'train.jsonl'},"
                f"seqlen=40,batch=2,prompt=none,distill=true,teacher={tiny / 'other'}}},remove")
    assert sum(p.numel() for p in state.model.parameters()) < \
        sum(p.numel() for p in _state(tiny).model.parameters())


@pytest.mark.slow  # two processes start torch + transformers: about 40 s on 2 shared CPU cores
def test_two_processes_compute_the_weights_of_one(tiny, tmp_path):
    """accelerate launch with two CPU processes (gloo), global batch 4 = 2 x 2, gives the
    weights of one process with batch 4 (examples of different lengths: the loss is
    normalised by the global token count)."""
    opts = f"seqlen=32,batch=4,steps=3,lr=1e-3,teacher={tiny / 'other'}"
    data = tiny / "train.jsonl"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(29500 + os.getpid() % 1000),
           str(WORKER), str(tiny / "m"), str(data), str(tmp_path / "two.pt"), opts]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    state = _run(_state(tiny), f"distill{{data={data},{opts}}}")
    one = state.model.state_dict()
    start = _state(tiny).model.state_dict()
    assert two.keys() == one.keys()
    moved = 0
    for n in one:
        assert torch.allclose(two[n], one[n], atol=2e-5), (n, float((two[n] - one[n]).abs().max()))
        moved += int((one[n] != start[n]).sum())
    assert moved > 0


def test_bf16_runs_the_matmuls_in_bfloat16_keeps_float32_weights_and_masks(tiny):
    """precision=bf16: the student's and the teacher's linears compute in bfloat16 (autocast),
    the weights and the optimizer stay float32, the masks stay exactly zero, and training
    still lowers the KL (about as much as in float32)."""
    results = {}
    for precision in ("fp32", "bf16"):
        state = _run(_state(tiny), "sparsify{score=magnitude,pattern=2:4}")
        zero = {n: p.detach() == 0 for n, p in state.model.named_parameters() if p.dim() >= 2}
        p = Distill(data=str(tiny / "train.txt"), seqlen=24, batch=4, steps=12, lr=3e-3,
                    teacher=str(tiny / "sharp"), precision=precision)
        session, examples, _ = p.start(state)
        teacher = session.teacher
        before = _mean_kl(state.model, teacher, examples)
        seen: dict[str, set] = {"student": set(), "teacher": set()}
        hooks = [m.register_forward_hook(lambda mod, i, o, who=who, seen=seen: seen[who].add(o.dtype))
                 for who, model in (("student", state.model), ("teacher", teacher))
                 for m in model.modules() if isinstance(m, torch.nn.Linear)]
        rep = p.run(state).report
        for h in hooks:
            h.remove()
        want = torch.bfloat16 if precision == "bf16" else torch.float32
        assert seen == {"student": {want}, "teacher": {want}}, seen
        assert rep["precision"] == precision
        assert all(t.dtype == torch.float32 for t in state.model.parameters())
        after_w = dict(state.model.named_parameters())
        for n, z in zero.items():
            assert torch.all(after_w[n].detach()[z] == 0), n
        results[precision] = (before, _mean_kl(state.model, teacher, examples))
    for precision, (before, after) in results.items():
        assert after < 0.8 * before, (precision, before, after)
    gain = {k: b - a for k, (b, a) in results.items()}
    assert gain["bf16"] > 0.5 * gain["fp32"], gain
    with pytest.raises(PipelineError, match="option 'precision'"):
        from_text_or_file("distill{precision=fp16}")
    with pytest.raises(PipelineError, match="option 'precision'"):
        from_text_or_file("l0{precision=half}")
