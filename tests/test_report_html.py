"""OUTDIR/report.html and `inspect --html`, opened in a real headless browser (chromium).

Each page is loaded from disk with name resolution disabled (no network), must log no
console message (a JS error shows as "CONSOLE ... Uncaught ..." in chromium's log), must
hold the expected elements, and leaves a screenshot under the test's tmp dir.
Without chromium these tests skip, or fail under scripts/test (SLIMGRAPH_REQUIRE_BROWSER=1).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from slimgraph.cli import main
from slimgraph.report_html import render_compile, sparsity_per_layer, units_per_layer
from tests import zoo

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def browser() -> str:
    for name in BROWSERS:
        exe = shutil.which(name)
        if exe:
            return exe
    msg = ("no headless browser found (looked for " + ", ".join(BROWSERS) + "): install "
           "Debian's chromium (apt-get install chromium; scripts/setup does it as root)")
    if os.environ.get("SLIMGRAPH_REQUIRE_BROWSER") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


def open_in_browser(page: Path, tmp_path: Path, name: str) -> tuple[str, list[str], Path]:
    """(DOM after scripts ran, console lines from chromium's log, screenshot path)."""
    base = [browser(), "--headless=new", "--disable-gpu", "--no-sandbox", "--no-first-run",
            "--disable-extensions", "--hide-scrollbars", "--enable-logging=stderr", "--v=0",
            "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tmp_path / (name + '-profile')}",
            "--window-size=1280,1800"]
    url = page.resolve().as_uri()
    dom = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-3000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    png = tmp_path / f"{name}.png"
    shot = subprocess.run(base + [f"--screenshot={png}", url], capture_output=True, text=True,
                          timeout=180)
    assert shot.returncode == 0, shot.stderr[-3000:]
    console += [line for line in shot.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert png.is_file() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return dom.stdout, console, png


def assert_offline(text: str) -> None:
    """Nothing to fetch: no src/href attributes, no URL but the SVG namespace."""
    assert not re.search(r"\b(src|href)\s*=", text)
    assert set(re.findall(r"https?://[^\s\"'<>]+", text)) <= {"http://www.w3.org/2000/svg"}


def section(dom: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', dom, re.S)
    assert m, f"no section #{sid}"
    return m.group(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("rh")
    zoo.build("llama").save_pretrained(d / "m")
    zoo.tiny_tokenizer().save_pretrained(d / "m")
    (d / "calib.txt").write_text(zoo.tiny_text(3000, seed=1))
    return d


def _compile(tiny, out, pipeline):
    return main(["compile", str(tiny / "m"), "-p", pipeline, "-o", str(out), "--calib-file",
                 str(tiny / "calib.txt"), "--calib-samples", "8", "--calib-seqlen", "32"])


def test_the_harness_sees_javascript_errors(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><p id=x>x</p><script>undefinedFunction();</script></body></html>")
    dom, console, _ = open_in_browser(bad, tmp_path, "bad")
    assert 'id="x"' in dom
    assert any("Uncaught ReferenceError" in line for line in console), console


def test_compile_report_html_structured(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    pipeline = "prune-structured{heads=0.5,mlp=0.5},save-hf,export-onnx"
    assert _compile(tiny, out, pipeline) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["outputs"][-2:] == ["report.html", "report.json"]
    assert str(out / "report.html") in report["files"]
    text = (out / "report.html").read_text()
    assert_offline(text)
    dom, console, _ = open_in_browser(out / "report.html", tmp_path, "compile")
    assert console == []
    pipe = section(dom, "pipeline")
    for p in report["passes"]:
        assert p["options"] in pipe
    assert pipe.count("<li>") == 3
    timing = section(dom, "timing")
    assert timing.count('class="bar"') == 4  # load and trace + three passes
    kinds = section(dom, "kinds")
    assert "attention" in kinds and "mlp" in kinds and "69,952" in kinds and "39,232" in kinds
    per_layer = section(dom, "per-layer")
    mlp = re.search(r'<svg class="chart" data-chart="kept-mlp".*?</svg>', per_layer, re.S)
    assert mlp and mlp.group(0).count('class="bar"') == 2 and "48 of 96" in mlp.group(0)
    assert 'data-chart="kept-query heads"' in per_layer
    assert 'data-chart="refit"' in section(dom, "curves")  # the calibration refit errors
    checks = section(dom, "checks")
    assert "ort_vs_torch" in checks and "reload_rel_error" in checks
    assert checks.count('class="ok"') == 2 and 'class="bad"' not in checks


def test_compile_report_html_sparsity_and_check(tiny, tmp_path):
    out = tmp_path / "out"
    assert _compile(tiny, out, "sparsify{score=wanda,pattern=2:4},check-sparsity") == 0
    dom, console, _ = open_in_browser(out / "report.html", tmp_path, "sparsity")
    assert console == []
    chart = re.search(r'<svg class="chart" data-chart="sparsity".*?</svg>', dom, re.S)
    assert chart and chart.group(0).count('class="bar"') == 2  # two decoder blocks
    assert ">0.5<" in chart.group(0)
    checks = section(dom, "checks")
    assert "2:4 check" in checks and "holds on 14 of 14 layers" in checks
    assert 'class="ok"' in checks


def _training_report(model: str = "tiny") -> dict:
    hist = [{"step": s, "loss": 5.0 - 0.1 * s, "sparsity_all": 0.05 * s, "target": 0.3}
            for s in (2, 4, 6)]
    return {
        "model": model, "pipeline": ["l0{target=0.3}", "remove", "distill"],
        "load_and_trace_seconds": 1.0, "total_seconds": 9.0,
        "passes": [
            {"name": "l0", "options": "l0{target=0.3}", "seconds": 5.0, "modified": True,
             "report": {"history": hist, "finetune": {"history": hist[:2]},
                        "kept_units": {"heads[0]": "2/2", "heads[1]": "1/2",
                                       "mlp[0]": "62/96", "mlp[1]": "66/96"}}},
            {"name": "remove", "options": "remove", "seconds": 0.5, "modified": True,
             "report": {"removed_units": {"heads[1]": 1, "mlp[0]": 34, "mlp[1]": 30},
                        "notes": ["mlp sizes differ per layer: {0: 62, 1: 66}",
                                  "<img src=x onerror=alert(1)>"], "config_updates": {}}},
            {"name": "distill", "options": "distill", "seconds": 2.5, "modified": True,
             "report": {"history": [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]}},
        ],
        "parameters": {"before": 100, "after": 70},
        "before": {"params": {"mlp": 60, "attention": 40}, "flops_per_token": {"mlp": 120},
                   "total_params": 100, "total_flops_per_token": 120},
        "after": {"params": {"mlp": 42, "attention": 28}, "flops_per_token": {"mlp": 84},
                  "total_params": 70, "total_flops_per_token": 84},
        "files": [], "outputs": ["report.html", "report.json"],
    }


def test_training_curves_and_escaping(tmp_path):
    evil = '<script>document.body.setAttribute("data-pwned", "1")</script>'
    page = tmp_path / "report.html"
    page.write_text(render_compile(_training_report(evil)))
    text = page.read_text()
    assert evil not in text and "&lt;script&gt;" in text
    assert "<img src=x" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    dom, console, _ = open_in_browser(page, tmp_path, "curves")
    assert console == [] and not re.search(r"<body[^>]*data-pwned", dom)  # shown, not run
    curves = section(dom, "curves")
    loss = re.search(r'data-chart="l0-training-loss".*?</svg>', curves, re.S).group(0)
    assert loss.count("<circle") == 3 and "<polyline" in loss
    assert 'data-chart="l0-training-other"' in curves  # sparsity_all (target left out)
    assert 'data-chart="l0-fine-tune-loss"' in curves
    assert re.search(r'data-chart="distill-training-loss".*?</svg>', curves, re.S).group(0) \
        .count("<circle") == 3
    assert "62 of 96" in section(dom, "per-layer") and "no pass ran a check" in section(dom, "checks")


def test_units_and_sparsity_per_layer_from_pass_reports():
    rep = _training_report()["passes"]
    assert units_per_layer(rep[0]["report"])["mlp"] == {0: {"kept": 62, "total": 96},
                                                        1: {"kept": 66, "total": 96}}
    assert units_per_layer(rep[1]["report"])["mlp"][1] == {"removed": 30, "kept": 66, "total": 96}
    uniform = {"removed_units": {"mlp[0]": 48, "mlp[1]": 48, "heads[0]": 1},
               "config_updates": {"intermediate_size": 48},
               "module_attrs": {"model.layers.0.self_attn": {"config.num_attention_heads": 2}}}
    got = units_per_layer(uniform)
    assert got["mlp"][0] == {"removed": 48, "kept": 48, "total": 96}
    assert got["query heads"] == {0: {"kept": 2}} and got["heads"] == {0: {"removed": 1}}
    layers = [{"name": f"model.layers.{i}.mlp.up_proj", "numel": 100, "zeros": z}
              for i, z in ((0, 50), (0, 30), (1, 10))] + [
        {"name": "model.layers.1.mlp.down_proj", "skipped": "kept dense"}]
    assert sparsity_per_layer({"layers": layers}) == {0: 0.4, 1: 0.1}


def test_inspect_html(tiny, tmp_path, capsys):
    from slimgraph.frontends.build import load_graph
    from slimgraph.ir.dependency import analyze

    page = tmp_path / "sub" / "inspect.html"
    assert main(["inspect", str(tiny / "m"), "--html", str(page)]) == 0
    assert_offline(page.read_text())
    _, graph = load_graph(str(tiny / "m"), meta=False, seq=7)
    result = analyze(graph)
    dom, console, _ = open_in_browser(page, tmp_path, "inspect")
    assert console == []
    assert re.search(r'<body[^>]*data-ready="1"', dom)  # the pan / zoom script ran to its end
    assert dom.count('<g class="n"') == len(graph.nodes)
    assert dom.count("data-gid=") == len(result.groups)
    svg = re.search(r'<svg id="graph".*?</svg>', dom, re.S).group(0)
    assert 'fill="#2a9d8f"' in svg and 'fill="#f4a261"' in svg  # mlp and heads linears coloured
    # the script opened the view on the top of the (tall) graph at full width
    written = re.search(r'<svg id="graph"[^>]*viewBox="([^"]+)"', page.read_text()).group(1)
    shown = re.search(r'<svg id="graph"[^>]*viewBox="([^"]+)"', dom).group(1)
    (w0, h0), (w1, h1) = (map(float, v.split()[2:]) for v in (written, shown))
    assert w1 == w0 and 0 < h1 < h0
    assert 'id="zin"' in dom and 'id="zfit"' in dom


def test_inspect_html_unwritable_path_is_one_line_error(tiny, tmp_path, capsys):
    (tmp_path / "f.txt").write_text("x")
    assert main(["inspect", str(tiny / "m"), "--html", str(tmp_path / "f.txt" / "g.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slimgraph: error: cannot write the HTML report") and "\n" not in err
    assert "loading" not in err  # refused before the model loads
