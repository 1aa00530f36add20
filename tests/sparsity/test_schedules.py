"""Per-layer sparsity schedules of `sparsify` (issue 4): uniform, explicit, linear, OWL.

A tiny random LLaMA with 4 decoder blocks (the zoo's sizes otherwise). The per-block
zero fractions of the saved model must follow the schedule, the parameter-weighted mean
must equal the requested sparsity with every score, OWL must spare a block into which
outliers were injected, and the offloaded path must give the in-memory result.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from slimgraph.cli import main
from slimgraph.compile import compile_model
from slimgraph.sparsity import offload as offload_mod
from slimgraph.sparsity import schedules
from slimgraph.sparsity.schedules import ScheduleError, match_mean, owl_schedule
from tests import zoo

BLOCKS = 4
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ROW_ROUNDING = 0.5 / zoo.HIDDEN  # per-row counts: round(s * C_in), C_in >= HIDDEN


def _model(seed: int = 0) -> tf.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=zoo.VOCAB, hidden_size=zoo.HIDDEN,
                         intermediate_size=zoo.INTER, num_hidden_layers=BLOCKS,
                         num_attention_heads=zoo.HEADS, num_key_value_heads=zoo.KV,
                         head_dim=zoo.HEAD_DIM, tie_word_embeddings=True)
    return tf.LlamaForCausalLM(cfg).eval()


def _save(model, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    zoo.tiny_tokenizer().save_pretrained(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("sched")
    _save(_model(), d / "m")
    (d / "calib.txt").write_text(zoo.tiny_text(3000, seed=1))
    return d


def _calib(tiny) -> dict:
    return {"file": str(tiny / "calib.txt"), "samples": 8, "seqlen": 32}


def _run(tiny, tmp_path, pipeline, model="m", **kw) -> tuple[dict, dict[str, torch.Tensor]]:
    out = tmp_path / "out"
    report = compile_model(str(tiny / model), f"{pipeline},save-hf", out, calib=_calib(tiny), **kw)
    sd = {}
    for f in sorted((out / "hf").glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return report["passes"][0]["report"], sd


def _block_sparsity(sd: dict[str, torch.Tensor]) -> list[float]:
    out = []
    for i in range(BLOCKS):
        ws = [sd[f"model.layers.{i}.{n}.weight"] for n in LINEARS]
        out.append(sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws))
    return out


def _mean(sd) -> float:
    ws = [sd[f"model.layers.{i}.{n}.weight"] for i in range(BLOCKS) for n in LINEARS]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


# -- the schedule arithmetic ---------------------------------------------------------------

def test_owl_schedule_maps_outliers_onto_lower_sparsity():
    got = owl_schedule([0.01, 0.03, 0.02, 0.05], 0.5, 0.08)
    assert got == pytest.approx([0.58, 0.50, 0.54, 0.42])  # most outliers -> s - lambda
    assert owl_schedule([0.02] * 3, 0.6, 0.08) == [0.6] * 3  # no spread: uniform


def test_match_mean_is_parameter_weighted_and_clamps():
    vals = match_mean([0.4, 0.6], [1, 3], 0.5)
    assert vals == pytest.approx([0.35, 0.55])
    assert schedules.weighted_mean(vals, [1, 3]) == pytest.approx(0.5, abs=1e-12)
    vals = match_mean([0.0, 0.5, 0.98], [1, 1, 1], 0.7)  # would leave [LOW, HIGH]: clamped
    assert max(vals) == schedules.HIGH and min(vals) >= schedules.LOW
    assert sum(vals) / 3 == pytest.approx(0.7, abs=1e-9)
    with pytest.raises(ScheduleError, match="cannot be reached"):
        match_mean([0.5, 0.5], [1, 1], 0.995)


def test_parse_layer_sparsity():
    assert schedules.parse_layer_sparsity("0.4 0.45  0.5") == [0.4, 0.45, 0.5]
    assert schedules.parse_layer_sparsity("[0.4, 0.5]") == [0.4, 0.5]  # YAML lists
    with pytest.raises(ValueError, match="outside"):
        schedules.parse_layer_sparsity("0.4 1.0")
    with pytest.raises(ValueError, match="not a number"):
        schedules.parse_layer_sparsity("0.4 x")


# -- end to end ----------------------------------------------------------------------------

def test_explicit_values_are_used_per_block(tiny, tmp_path):
    rep, sd = _run(tiny, tmp_path, "sparsify{score=magnitude,layer_sparsity=0.3 0.4 0.5 0.6}")
    assert _block_sparsity(sd) == pytest.approx([0.3, 0.4, 0.5, 0.6], abs=1e-4)
    assert rep["schedule"]["name"] == "explicit"
    assert rep["sparsity_target"] == pytest.approx(0.45)  # equal blocks: the plain mean
    assert rep["sparsity"] == pytest.approx(0.45, abs=1e-4)
    assert rep["schedule"]["layer_sparsity_pruned"] == pytest.approx(_block_sparsity(sd), abs=1e-6)


@pytest.mark.parametrize("score", ["magnitude", "ri", "ria", "sparsegpt"])
def test_linear_rises_from_first_to_last_block(tiny, tmp_path, score):
    rep, sd = _run(tiny, tmp_path, f"sparsify{{score={score},sparsity=0.5,schedule=linear,"
                                   "spread=0.1}")
    want = [0.4, 0.4 + 0.2 / 3, 0.6 - 0.2 / 3, 0.6]
    assert rep["schedule"]["layer_sparsity"] == pytest.approx(want, abs=1e-6)
    assert _block_sparsity(sd) == pytest.approx(want, abs=1e-4)
    assert _mean(sd) == pytest.approx(0.5, abs=1e-4)


@pytest.mark.parametrize("pipeline", [
    "sparsify{score=wanda,sparsity=0.5,schedule=owl}",
    "sparsify{score=magnitude,sparsity=0.5,schedule=owl}",
    "sparsify{score=ri,sparsity=0.5,schedule=owl}",
    "sparsify{score=ria,sparsity=0.5,schedule=owl}",
    "sparsify{score=sparsegpt,sparsity=0.5,schedule=owl}",
    "sparsify{score=ria,sparsity=0.5,schedule=owl,reconstruct=true}",
    "sparsify{score=wanda,sparsity=0.6,schedule=linear,spread=0.2}",
    "sparsify{score=ria,sparsity=0.4,schedule=linear,spread=0.1,reconstruct=true}",
])
def test_mean_equals_the_target_with_every_score(tiny, tmp_path, pipeline):
    rep, sd = _run(tiny, tmp_path, pipeline)
    target = float(pipeline.split("sparsity=")[1].split(",")[0])
    tol = ROW_ROUNDING if "wanda" in pipeline else 1e-4  # Wanda compares per row
    assert rep["sparsity"] == pytest.approx(_mean(sd), abs=1e-9)
    assert _mean(sd) == pytest.approx(target, abs=tol)
    blocks = _block_sparsity(sd)
    assert blocks == pytest.approx(rep["schedule"]["layer_sparsity"], abs=tol)
    assert len(set(round(b, 3) for b in blocks)) > 1  # not uniform
    assert all(0 < b < 1 for b in blocks)


def _dense_outlier_ratios(tiny, model, m=5.0) -> list[float]:
    """D_l straight from one dense forward of the whole model (hooks on every linear)."""
    from slimgraph.sparsity.calibration import calibration_tokens, sample_windows

    windows = sample_windows(calibration_tokens(zoo.tiny_tokenizer(), tiny / "calib.txt"),
                             8, 32, 0)
    sumsq: dict[str, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for n in LINEARS:
            def hook(_m, args, key=f"{i}.{n}"):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sumsq[key] = sumsq.get(key, 0) + x.square().sum(0)
            hooks.append(layer.get_submodule(n).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    for h in hooks:
        h.remove()
    ratios = []
    for i, layer in enumerate(model.model.layers):
        scores = [layer.get_submodule(n).weight.double().abs() * sumsq[f"{i}.{n}"].sqrt()
                  for n in LINEARS]
        flat = torch.cat([s.flatten() for s in scores])
        ratios.append(float((flat > m * flat.mean()).double().mean()))
    return ratios


def test_owl_outlier_ratios_equal_a_dense_reference(tiny, tmp_path):
    rep, _ = _run(tiny, tmp_path, "sparsify{score=ri,sparsity=0.5,schedule=owl,owl_m=3}")
    owl = rep["schedule"]["owl"]
    assert owl["m"] == 3 and owl["lambda"] == 0.08
    assert owl["outlier_ratio"] == pytest.approx(_dense_outlier_ratios(tiny, _model(), 3.0),
                                                 abs=2e-5)
    # the reference's mapping (equal blocks: its plain mean is the weighted one)
    d = torch.tensor(owl["outlier_ratio"], dtype=torch.float64)
    density = (d - d.min()) / (d.max() - d.min()) * 2 * 0.08
    density = density - density.mean() + (1 - 0.5)
    want = (1 - density).tolist()
    assert rep["schedule"]["layer_sparsity"] == pytest.approx(want, abs=1e-6)
    assert max(want) - min(want) == pytest.approx(0.16)


@pytest.mark.parametrize("where,layer", [("weights", 2), ("activations", 1)])
def test_owl_spares_the_block_with_injected_outliers(tiny, tmp_path, where, layer):
    model = _model()
    with torch.no_grad():
        blk = model.model.layers[layer]
        if where == "weights":  # a few input columns of every linear of the block, x30
            for n in LINEARS:
                blk.get_submodule(n).weight[:, :4] *= 30
        else:  # outlier channels in the MLP's input (the post-attention norm's gains)
            blk.post_attention_layernorm.weight[:4] *= 30
    name = f"outlier-{where}"
    _save(model, tiny / name)
    rep, sd = _run(tiny, tmp_path, "sparsify{score=wanda,sparsity=0.5,schedule=owl}", model=name)
    ratios = rep["schedule"]["owl"]["outlier_ratio"]
    assert max(range(BLOCKS), key=lambda i: ratios[i]) == layer
    got = _block_sparsity(sd)
    assert min(range(BLOCKS), key=lambda i: got[i]) == layer
    # D normalised to ~[0, 0, 1, 0]: s + lambda - 2 lambda D, shifted down by lambda / 2
    assert got[layer] == pytest.approx(0.5 - 0.08 - 0.04, abs=0.02)
    assert got[layer] < 0.45 and all(g > 0.5 for i, g in enumerate(got) if i != layer)
    assert _mean(sd) == pytest.approx(0.5, abs=ROW_ROUNDING)


# -- offload ---------------------------------------------------------------------------------

@pytest.mark.parametrize("pipeline", ["sparsify{score=wanda,sparsity=0.5,schedule=owl}",
                                      "sparsify{score=sparsegpt,sparsity=0.5,schedule=linear,"
                                      "spread=0.1}",
                                      "sparsify{score=magnitude,sparsity=0.3,schedule=owl},"
                                      "sparsify{score=ria,sparsity=0.6,schedule=owl}"])
def test_offloaded_equals_in_memory(tiny, tmp_path, monkeypatch, pipeline):
    ref_rep, want = _run(tiny, tmp_path / "ref", pipeline)
    resident_at_materialize = []
    real = offload_mod.Offload.materialize

    def materialize(self, block):
        resident_at_materialize.append(len(self.resident))
        return real(self, block)

    monkeypatch.setattr(offload_mod.Offload, "materialize", materialize)
    rep, got = _run(tiny, tmp_path / "off", pipeline, offload=True)
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=0, atol=1e-6), k
    assert rep["schedule"]["layer_sparsity"] == ref_rep["schedule"]["layer_sparsity"]
    owl_passes = pipeline.count("schedule=owl")
    passes = pipeline.count("sparsify")
    # every block read once per pruning pass and once per OWL dense pass, one at a time
    assert len(resident_at_materialize) == BLOCKS * (passes + owl_passes)
    assert set(resident_at_materialize) == {0}


# -- errors before any work ------------------------------------------------------------------

def _cli(tiny, tmp_path, pipeline):
    out = tmp_path / "out"
    return main(["compile", str(tiny / "m"), "-p", f"{pipeline},save-hf", "-o", str(out),
                 "--calib-file", str(tiny / "calib.txt"), "--calib-samples", "8",
                 "--calib-seqlen", "32"]), out


@pytest.mark.parametrize("pipeline,needle", [
    ("sparsify{score=wanda,sparsity=0.5,schedule=cubic}",
     "option 'schedule': 'cubic' is not one of uniform, explicit, linear, owl"),
    ("sparsify{score=wanda,layer_sparsity=0.3 0.4 0.5}",
     "option 'layer_sparsity': 3 values given; the model has 4 decoder blocks"),
    ("sparsify{score=wanda,layer_sparsity=0.3 0.4 1.2 0.5}",
     "option 'layer_sparsity': 1.2 is outside (0, 1)"),
    ("sparsify{score=wanda,layer_sparsity=0.3 0 0.4 0.5}",
     "option 'layer_sparsity': 0 is outside (0, 1)"),
    ("sparsify{score=wanda,pattern=2:4,schedule=owl}",
     "option 'schedule': an N:M pattern (2:4) fixes the sparsity"),
    ("sparsify{score=wanda,pattern=2:4,layer_sparsity=0.3 0.4 0.5 0.6}",
     "are for unstructured sparsity"),
    ("sparsify{score=wanda,sparsity=0.5,schedule=linear,spread=0.6}",
     "option 'spread': spread=0.6 with sparsity=0.5 gives layers from -0.1 to 1.1, outside (0, 1)"),
    ("sparsify{score=wanda,sparsity=0.5,schedule=linear}", "schedule=linear needs spread"),
    ("sparsify{score=wanda,sparsity=0.5,spread=0.1}", "option 'spread': is an option of "
     "schedule=linear"),
    ("sparsify{score=wanda,sparsity=0.95,schedule=owl,owl_lambda=0.1}",
     "option 'owl_lambda'"),
    ("sparsify{score=wanda,sparsity=0.5,layer_sparsity=0.3 0.4 0.5 0.6}",
     "give either sparsity or layer_sparsity"),
    ("sparsify{score=wanda,schedule=owl}", "give a sparsity"),
])
def test_errors_before_any_work(tiny, tmp_path, capsys, monkeypatch, pipeline, needle):
    from slimgraph.sparsity import calibration
    from slimgraph.structured.torch_blocks import TorchBlocks

    def no_work(*_a, **_k):
        raise AssertionError("calibration started")

    monkeypatch.setattr(calibration, "calibration_tokens", no_work)
    monkeypatch.setattr(TorchBlocks, "first_inputs", no_work)
    rc, out = _cli(tiny, tmp_path, pipeline)
    assert rc == 2
    err = capsys.readouterr().err
    assert needle in " ".join(err.split()), err
    assert not (out / "hf").exists()


def test_cli_owl_writes_per_layer_values(tiny, tmp_path, capsys):
    rc, out = _cli(tiny, tmp_path, "sparsify{score=wanda,sparsity=0.5,schedule=owl}")
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())["passes"][0]["report"]
    sched = rep["schedule"]
    assert sched["name"] == "owl" and sched["layers"] == list(range(BLOCKS))
    assert len(sched["layer_sparsity"]) == len(sched["layer_sparsity_pruned"]) == BLOCKS
    assert len(sched["owl"]["outlier_ratio"]) == BLOCKS
    assert sched["layer_params"] == [sched["layer_params"][0]] * BLOCKS
    assert rep["sparsity"] == pytest.approx(0.5, abs=ROW_ROUNDING)
    assert max(sched["layer_sparsity"]) - min(sched["layer_sparsity"]) == pytest.approx(0.16)
    printed = " ".join(capsys.readouterr().out.split())
    assert "schedule owl: per-layer sparsity " + " ".join(
        f"{v:.3f}" for v in sched["layer_sparsity_pruned"]) in printed


def test_layer_sparsity_from_a_yaml_list(tiny, tmp_path):
    pipe = tmp_path / "p.yaml"
    pipe.write_text("pipeline:\n  - pass: sparsify\n    score: magnitude\n"
                    "    layer_sparsity: [0.2, 0.3, 0.4, 0.5]\n  - save-hf\n")
    compile_model(str(tiny / "m"), str(pipe), tmp_path / "out")
    sd = load_file(str(tmp_path / "out" / "hf" / "model.safetensors"))
    assert _block_sparsity(sd) == pytest.approx([0.2, 0.3, 0.4, 0.5], abs=1e-4)
