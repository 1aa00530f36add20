"""compile --offload: block-sequential sparsity with one block in memory at a time.

A tiny random LLaMA saved with safetensors, as one file and sharded. The offloaded
result must equal the in-memory path's, the input directory must stay untouched, and
while block i runs every other block must be on the meta device.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimgraph.cli import main
from slimgraph.compile import compile_model
from slimgraph.errors import PipelineError, SlimgraphError
from slimgraph.frontends.loading import load_model
from slimgraph.sparsity import offload as offload_mod
from slimgraph.sparsity.masks import is_nm
from tests import zoo


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("offload")
    model = zoo.build("llama")
    model.save_pretrained(d / "single", safe_serialization=True)
    model.save_pretrained(d / "sharded", safe_serialization=True, max_shard_size="20KB")
    for sub in ("single", "sharded"):
        zoo.tiny_tokenizer().save_pretrained(d / sub)
    assert len(list((d / "sharded").glob("*.safetensors"))) > 3
    (d / "calib.txt").write_text(zoo.tiny_text(3000, seed=1))
    return d


def _calib(tiny):
    return {"file": str(tiny / "calib.txt"), "samples": 8, "seqlen": 32}


def _state_dict(hf: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(hf.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _leftovers(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if p.name.startswith(".")] if out.exists() else []


_REFERENCE: dict[str, Path] = {}


def _reference(tiny, pipeline: str) -> Path:
    """The in-memory path's result (computed once per pipeline)."""
    if pipeline not in _REFERENCE:
        out = tiny / f"ref-{len(_REFERENCE)}"
        compile_model(str(tiny / "single"), pipeline, out, calib=_calib(tiny))
        _REFERENCE[pipeline] = out / "hf"
    return _REFERENCE[pipeline]


@pytest.mark.parametrize("source", ["single", "sharded"])
@pytest.mark.parametrize("pipeline", ["sparsify{score=wanda,pattern=2:4},save-hf",
                                      "sparsify{score=ria,sparsity=0.5},save-hf",
                                      "sparsify{score=ria,pattern=2:4,reconstruct=true},save-hf",
                                      "sparsify{score=ria,pattern=2:4,permute=mask-only},save-hf",
                                      # the second pass reads the blocks back from the store
                                      "sparsify{score=magnitude,sparsity=0.3},"
                                      "sparsify{score=wanda,pattern=2:4},save-hf"])
def test_offloaded_equals_in_memory(tiny, tmp_path, pipeline, source):
    ref = _reference(tiny, pipeline)
    before = _tree_hash(tiny / source)
    report = compile_model(str(tiny / source), pipeline, tmp_path / "out", calib=_calib(tiny),
                           offload=True)
    assert _tree_hash(tiny / source) == before  # the input is only read
    got, want = _state_dict(tmp_path / "out" / "hf"), _state_dict(ref)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.allclose(got[k], want[k], rtol=0, atol=1e-6), k
    assert report["passes"][-1]["report"]["offloaded"] is True
    assert _leftovers(tmp_path / "out") == []  # offload store and temp dirs are gone


def test_reloads_normally_as_the_in_memory_result(tiny, tmp_path):
    pipeline = "sparsify{score=wanda,pattern=2:4},save-hf"
    compile_model(str(tiny / "sharded"), pipeline, tmp_path / "out", calib=_calib(tiny),
                  offload=True)
    got = load_model(str(tmp_path / "out" / "hf")).model
    want = load_model(str(_reference(tiny, pipeline))).model
    ids = torch.randint(3, zoo.VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(got(input_ids=ids).logits, want(input_ids=ids).logits)
    for name, mod in got.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            assert is_nm(mod.weight.detach(), 2, 4, axis=1), name
    assert main(["check-sparsity", str(tmp_path / "out" / "hf"), "--pattern", "2:4"]) == 0


def test_at_most_one_block_is_resident(tiny, tmp_path, monkeypatch):
    """A forward pre-hook on every decoder layer: while layer i runs, every other layer's
    parameters are on the meta device; layer i's are not (except while block 0's inputs
    are captured, before it is read); the embedding is materialized throughout."""
    loaded_models = []
    real_load = offload_mod.load_offloaded

    def spy(spec, **kw):
        loaded = real_load(spec, **kw)
        loaded_models.append(loaded.model)
        return loaded

    real_for_state = offload_mod.Offload.for_state.__func__
    active = []  # checks start once the weights outside the blocks are read (after tracing)

    def for_state(cls, *args):
        off = real_for_state(cls, *args)
        active.append(True)
        return off

    monkeypatch.setattr(offload_mod, "load_offloaded", spy)
    monkeypatch.setattr(offload_mod.Offload, "for_state", classmethod(for_state))
    seen: list[tuple[int, bool, list[bool]]] = []

    def hook(module, _args):
        if not active:
            return
        layers = list(loaded_models[0].model.layers)
        if module in layers:
            i = layers.index(module)
            on_meta = [all(p.is_meta for p in layer.parameters()) for layer in layers]
            resident = not any(p.is_meta for p in module.parameters())
            assert not loaded_models[0].model.embed_tokens.weight.is_meta
            seen.append((i, resident, on_meta))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        compile_model(str(tiny / "sharded"), "sparsify{score=sparsegpt,sparsity=0.5},save-hf",
                      tmp_path / "out", calib=_calib(tiny), offload=True)
    finally:
        handle.remove()
    assert seen
    for i, _resident, on_meta in seen:
        assert all(on_meta[j] for j in range(len(on_meta)) if j != i), (i, on_meta)
    for i in range(zoo.LAYERS):
        assert any(r for j, r, _ in seen if j == i), f"layer {i} never ran materialized"
    assert all(p.is_meta for layer in loaded_models[0].model.layers for p in layer.parameters())


def test_input_directory_untouched(tiny, tmp_path):
    before = _tree_hash(tiny / "sharded")
    mtimes = {p: p.stat().st_mtime_ns for p in (tiny / "sharded").iterdir()}
    assert main(["compile", str(tiny / "sharded"), "--offload", "-o", str(tmp_path / "out"),
                 "-p", "sparsify{score=magnitude,pattern=2:4},save-hf"]) == 0
    assert _tree_hash(tiny / "sharded") == before
    assert {p: p.stat().st_mtime_ns for p in (tiny / "sharded").iterdir()} == mtimes
    sd = _state_dict(tmp_path / "out" / "hf")
    assert is_nm(sd["model.layers.1.mlp.down_proj.weight"], 2, 4, axis=1)


@pytest.mark.parametrize("pipeline,named", [
    ("sparsify{score=magnitude,pattern=2:4},export-onnx", "export-onnx"),
    ("prune-structured{mlp=0.5},save-hf", "prune-structured"),
    ("sparsify{score=magnitude,pattern=2:4},check-sparsity", "check-sparsity"),
    ("sparsify{score=ria,pattern=2:4,permute=gather},save-hf", "permute"),
    ("sparsify{score=wanda,pattern=2:4,calib=self},save-hf", "--calib-file"),
])
def test_refused_before_any_work(tiny, tmp_path, capsys, pipeline, named):
    out = tmp_path / "out"
    assert main(["compile", str(tiny / "single"), "--offload", "-p", pipeline,
                 "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert named in err and "--offload" in err
    assert not out.exists()


def test_gguf_and_non_safetensors_inputs_are_refused(tiny, tmp_path):
    with pytest.raises(SlimgraphError, match="HF model directory .* or a GGUF"):
        compile_model(str(tmp_path / "m.gguf"), "save-hf", tmp_path / "o", offload=True)
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "config.json").write_text((tiny / "single" / "config.json").read_text())
    with pytest.raises(SlimgraphError, match="safetensors checkpoints only"):
        compile_model(str(bare), "save-hf", tmp_path / "o", offload=True)


@pytest.mark.parametrize("where", ["calibration", "save-hf"])
def test_interrupted_run_leaves_no_half_written_output(tiny, tmp_path, monkeypatch, where):
    out = tmp_path / "out"
    pipeline = "sparsify{score=magnitude,pattern=2:4},save-hf"
    compile_model(str(tiny / "single"), "save-hf", out, offload=True)  # an older result
    old = _tree_hash(out / "hf")
    calls = []

    def boom(*_args, **_kw):
        calls.append(1)
        if len(calls) == 2:  # mid-way: the second block
            raise RuntimeError("injected failure")
        return real(*_args, **_kw)

    if where == "calibration":
        real = offload_mod.Offload.release
        monkeypatch.setattr(offload_mod.Offload, "release", boom)
    else:
        real = offload_mod._link_or_copy
        monkeypatch.setattr(offload_mod, "_link_or_copy", boom)
    with pytest.raises(RuntimeError, match="injected"):
        compile_model(str(tiny / "single"), pipeline, out, offload=True, overwrite=True)
    assert len(calls) == 2
    assert _tree_hash(out / "hf") == old  # the older checkpoint, whole; nothing half-written
    assert _leftovers(out) == []


def test_offload_refusal_is_a_pipeline_error(tiny, tmp_path):
    with pytest.raises(PipelineError, match="pass 'l0' needs the whole model"):
        compile_model(str(tiny / "single"), "l0{target=0.2},save-hf", tmp_path / "o",
                      offload=True)


@pytest.mark.slow
def test_smollm2_alias_is_offloaded_from_its_gguf_cache(tmp_path):
    """The alias (a GGUF) is offloaded from its de-quantized safetensors cache; the output
    holds 2:4 in every block linear and equals the in-memory path's weights."""
    from slimgraph.sparsity.check import check_model

    pipe = "sparsify{score=magnitude,pattern=2:4},save-hf"
    compile_model("smollm2-135m", pipe, tmp_path / "off", offload=True)
    compile_model("smollm2-135m", pipe, tmp_path / "mem")
    (rep,) = check_model(str(tmp_path / "off" / "hf"), "2:4")
    assert rep.ok and len(rep.layers) == 210

    def tensors(d):
        out = {}
        for f in sorted((d / "hf").glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    off, mem = tensors(tmp_path / "off"), tensors(tmp_path / "mem")
    blocks = [k for k in mem if ".layers." in k and k.endswith("proj.weight")]
    assert len(blocks) == 210
    for k in blocks:
        assert torch.equal(off[k], mem[k]), k
