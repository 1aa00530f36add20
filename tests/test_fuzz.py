"""Fuzz tier (issue 17): pipeline text, pipeline files and config values from hypothesis.
Every outcome is a clean result or a one-line SlimgraphError, never another exception.

Models are built on the meta device only (nothing allocated), so an example takes
milliseconds to a second; the example counts keep the whole file well under a minute.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimgraph.cli import main
from slimgraph.errors import SlimgraphError
from slimgraph.frontends.build import graph_of
from slimgraph.frontends.loading import load_model
from slimgraph.passes import registry
from slimgraph.passes.pipeline import from_text_or_file
from tests import zoo

FAST = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


def one_line_error(exc: SlimgraphError) -> None:
    text = str(exc)
    assert text.strip(), f"{type(exc).__name__} without a message"
    assert "\n" not in text and "\r" not in text, repr(text)


def clean(call) -> object | None:
    """The result of ``call()``, or None after a one-line SlimgraphError."""
    try:
        return call()
    except SlimgraphError as exc:
        one_line_error(exc)
        return None


# --------------------------------------------------------------------------- pipelines

PASS_NAMES = registry.names()
OPTIONS = sorted({f.name for n in PASS_NAMES for f in registry.get(n).options()})
ODD = ["a\nb", "save-hf\nx", "sub\ndir", "\t", "x\ry", "\x1b[2J", "é", " "]
VALUES = st.one_of(st.sampled_from(ODD),
    st.sampled_from(["0", "1", "-1", "0.5", "2:4", "nan", "inf", "-inf", "1e309", "true",
                     "none", "", "wanda", "ria", "l2", "../x", "/abs", "report.json", "0 1",
                     "[1;2]", "{", "}", "a=b", "\x00", "\n"]),
    st.text(max_size=8),
)


@st.composite
def pipeline_text(draw) -> str:
    passes = []
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.one_of(st.sampled_from(PASS_NAMES), st.sampled_from(ODD),
                              st.text(max_size=6)))
        opts = draw(st.lists(st.tuples(st.one_of(st.sampled_from(OPTIONS), st.sampled_from(ODD),
                                                 st.text(max_size=4)), VALUES), max_size=3))
        body = ",".join(f"{k}={v}" for k, v in opts)
        passes.append(f"{name}{{{body}}}" if opts or draw(st.booleans()) else name)
    return ",".join(passes)


@FAST
@given(st.one_of(pipeline_text(), st.text(alphabet="{}=,:;[]() \nabcsvhp-0123456789.",
                                          max_size=40)))
def test_pipeline_text(text):
    passes = clean(lambda: from_text_or_file(text))
    if passes is not None:
        assert passes and all(p.name in PASS_NAMES for p in passes)


YAML_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**40),
                         st.floats(allow_nan=True), st.text(max_size=6))
YAML_VALUES = st.recursive(YAML_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=8)


@FAST
@given(st.one_of(
    st.text(alphabet="pipeline:-{}[]&*!|>'\" \n\tsave-hfl0=,#%@", max_size=60),
    st.lists(st.one_of(st.sampled_from(PASS_NAMES), st.dictionaries(
        st.one_of(st.just("pass"), st.sampled_from(OPTIONS)),
        st.one_of(st.sampled_from(PASS_NAMES), YAML_VALUES), max_size=3)), max_size=3
    ).map(lambda steps: json.dumps({"pipeline": steps})),  # JSON is YAML
), st.sampled_from([".yaml", ".toml"]))
def test_pipeline_file(text, suffix):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"p{suffix}"
        path.write_text(text, encoding="utf-8")
        clean(lambda: from_text_or_file(str(path)))
        assert path.read_text(encoding="utf-8") == text  # the input is never modified


# --------------------------------------------------------------------------- configs

SIZE_FIELDS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings"]
SIZES = st.one_of(st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128]), st.integers(-2, 300))
ODD_VALUES = st.one_of(
    st.sampled_from([10**7, 10**9, 2**31, 2**63, 10**30]),  # absurd: refused, never tried
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(), st.booleans(), st.text(max_size=4), st.lists(st.integers(0, 4), max_size=2),
)
# mostly plausible sizes (so that models get built and traced), some odd values
CONFIG_VALUES = st.integers(0, 9).flatmap(lambda i: SIZES if i < 7 else ODD_VALUES)


@pytest.fixture(scope="module")
def base_config() -> dict:
    return zoo.build("llama").config.to_dict()


@SLOW
@given(changes=st.dictionaries(st.sampled_from(SIZE_FIELDS + ["rms_norm_eps", "model_type",
                                                              "tie_word_embeddings",
                                                              "architectures"]),
                               CONFIG_VALUES, min_size=1, max_size=3))
def test_config_values_load_and_trace_on_meta(base_config, changes):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.json"
        text = json.dumps({**base_config, **changes})
        path.write_text(text)
        loaded = clean(lambda: load_model(f"hf-config:{path}", meta=True, verbose=False))
        if loaded is not None:
            clean(lambda: graph_of(loaded, seq=3))
        assert path.read_text() == text


@settings(SLOW, max_examples=8,  # capsys is read (and so emptied) after every run
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(SIZE_FIELDS), CONFIG_VALUES, min_size=1,
                               max_size=2),
       pipeline=st.sampled_from(["save-hf{subdir=../x}", "prune-structured{mlp=0.5}",
                                 "export-onnx{tolerance=nan}"]))
def test_cli_inspect_and_compile_in_process(base_config, changes, pipeline, capsys):
    """The CLI in-process: exit 0, or exit 2 with one `slimgraph: error:` line."""
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "config.json"
        cfg.write_text(json.dumps({**base_config, **changes}))
        for argv in (["inspect", "--meta", "--json", f"hf-config:{cfg}"],
                     ["compile", f"hf-config:{cfg}", "-p", pipeline, "-o", str(Path(d) / "o"),
                      "--calib-samples", "2", "--calib-seqlen", "8"]):
            if argv[0] == "compile" and not _small(changes):
                continue  # a compile builds real weights: only sizes that surely fit
            rc = main(argv)
            err = capsys.readouterr().err
            assert rc in (0, 2), err
            assert "Traceback" not in err
            if rc == 2:
                lines = [x for x in err.splitlines() if x.startswith("slimgraph: error: ")]
                assert len(lines) == 1, err


def _small(changes: dict) -> bool:
    return all(not isinstance(v, int) or isinstance(v, bool) or v <= 300
               for v in changes.values())
