"""Self-contained HTML pages: the compile report (OUTDIR/report.html) and `inspect --html`.

Functions here take the report dict (what report.json holds) or an analysed graph and
return HTML text: inline CSS, inline SVG, a small inline script for pan / zoom; nothing is
fetched, so a page opens from disk with no network. Every string that comes from the
model or the report is escaped.
"""

from __future__ import annotations

import html
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from slimgraph.errors import SlimgraphError

UNKNOWN_FILL = "#ff8fa3"
PALETTE = ["#2a9d8f", "#e76f51", "#457b9d", "#f4a261", "#8e7dbe", "#6a994e", "#bc4749"]

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;
color:#1d2430;background:#f6f7f9}
header{background:#1d3557;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header .sub{opacity:.8;font-size:13px;word-break:break-all}
main{padding:8px 24px 40px;max-width:1200px}
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;margin:16px 0;padding:12px 18px}
h2{font-size:16px;margin:4px 0 10px}h3{font-size:14px;margin:12px 0 6px}
table{border-collapse:collapse;font-size:13px;margin:4px 0}
th,td{border-bottom:1px solid #e5e8ec;padding:3px 10px;text-align:left;vertical-align:top}
th{background:#f0f2f5}td.n{text-align:right;font-variant-numeric:tabular-nums}
ol.pipeline li{margin:2px 0}code{background:#f0f2f5;padding:0 3px;border-radius:3px;
word-break:break-all}
.cards{display:flex;gap:14px;flex-wrap:wrap}.card{border:1px solid #dde1e6;border-radius:6px;
padding:8px 14px;min-width:180px}.card b{font-size:18px;display:block}
.ok{color:#2b8a3e;font-weight:600}.bad{color:#c92a2a;font-weight:600}
.muted{color:#6b7480}svg text{font-family:system-ui,Helvetica,Arial,sans-serif}
.charts{display:flex;flex-wrap:wrap;gap:18px}
.legend span{display:inline-block;margin-right:14px}.legend i{display:inline-block;width:11px;
height:11px;margin-right:4px;vertical-align:-1px;border-radius:2px}
#graph{border:1px solid #dde1e6;height:640px;width:100%;cursor:grab;background:#fcfcfd}
#graph .n.hl rect{stroke:#d00000;stroke-width:3}#graph .n.dim{opacity:.25}
tr[data-gid]{cursor:pointer}tr[data-gid].sel{background:#fff3bf}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def num(v: Any, digits: int = 4) -> str:
    """A number for humans: thousands separators for whole numbers, else ``digits``
    significant digits; anything else escaped as text."""
    if isinstance(v, bool) or v is None:
        return "-" if v is None else esc(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return esc(v)
        return f"{v:,.0f}" if abs(v) >= 10 ** digits else f"{v:.{digits}g}"
    return esc(v)


def page(title: str, subtitle: str, body: str, script: str = "") -> str:
    js = f"<script>\n{script}\n</script>\n" if script else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f"<title>{esc(title)}</title>\n<style>{CSS}</style></head>\n<body>\n"
            f'<header><h1>{esc(title)}</h1><div class="sub">{esc(subtitle)}</div></header>\n'
            f"<main>\n{body}\n</main>\n{js}</body></html>\n")


def section(sid: str, title: str, content: str) -> str:
    return f'<section id="{esc(sid)}"><h2>{esc(title)}</h2>\n{content}\n</section>'


def table(headers: list[str], rows: list[list[Any]], cls: str = "",
          row_ids: list[Any] | None = None) -> str:
    """Rows of cells: a str is escaped text, a number is right-aligned, a tuple
    ``("html", markup)`` is inserted as is (markup built here, already escaped)."""
    out = [f'<table class="{esc(cls)}"><thead><tr>'
           + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        cells = []
        for c in row:
            if isinstance(c, tuple) and c and c[0] == "html":
                cells.append(f"<td>{c[1]}</td>")
            elif isinstance(c, (int, float)) and not isinstance(c, bool):
                cells.append(f'<td class="n">{num(c)}</td>')
            else:
                cells.append(f"<td>{esc('-' if c is None else c)}</td>")
        attr = f' data-gid="{esc(row_ids[i])}"' if row_ids is not None else ""
        out.append(f"<tr{attr}>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def legend(items: list[tuple[str, str]]) -> str:
    return '<div class="legend">' + "".join(
        f'<span><i style="background:{esc(c)}"></i>{esc(n)}</span>' for n, c in items) + "</div>"


# ---------------------------------------------------------------- charts (inline SVG)

def bar_chart(title: str, labels: list[str], series: list[tuple[str, list[float | None]]],
              *, unit: str = "", totals: list[float | None] | None = None,
              chart_id: str = "") -> str:
    """Horizontal bars: one row per label, one bar per series; ``totals`` (optional)
    drawn as a faint bar behind the first series (e.g. channels before pruning)."""
    values = [v for _, vs in series for v in vs if v is not None] + \
        [t for t in (totals or []) if t is not None]
    top = max(values + [1e-12])
    label_w = min(260, 12 + 7 * max([len(s) for s in labels] + [4]))
    bar_h, gap, plot_w = 14, 8, 360
    row_h = bar_h * len(series) + gap
    height = 34 + row_h * len(labels)
    width = label_w + plot_w + 90
    parts = [f'<svg class="chart" data-chart="{esc(chart_id or title)}" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" role="img">',
             f'<text x="0" y="14" font-size="13" font-weight="600">{esc(title)}</text>']
    for i, lab in enumerate(labels):
        y0 = 26 + i * row_h
        parts.append(f'<text x="{label_w - 6}" y="{y0 + row_h / 2}" font-size="11" '
                     f'text-anchor="end">{esc(lab)}</text>')
        if totals and i < len(totals) and totals[i] is not None:
            w = plot_w * totals[i] / top
            parts.append(f'<rect x="{label_w}" y="{y0}" width="{w:.1f}" height="{bar_h}" '
                         f'fill="#e9ecef"><title>{esc(lab)}: {num(totals[i])} before</title></rect>')
        for j, (name, vs) in enumerate(series):
            v = vs[i] if i < len(vs) else None
            if v is None:
                continue
            w = max(plot_w * v / top, 0.5)
            y = y0 + j * bar_h
            tot = f" of {num(totals[i])}" if totals and totals[i] is not None and j == 0 else ""
            parts.append(f'<rect class="bar" x="{label_w}" y="{y}" width="{w:.1f}" '
                         f'height="{bar_h - 2}" fill="{PALETTE[j % len(PALETTE)]}"><title>'
                         f'{esc(lab)} {esc(name)}: {num(v)}{esc(tot)}{esc(unit)}</title></rect>')
            parts.append(f'<text x="{label_w + w + 4:.1f}" y="{y + bar_h - 4}" font-size="10">'
                         f'{num(v)}{esc(tot)}{esc(unit)}</text>')
    parts.append("</svg>")
    leg = legend([(n, PALETTE[j % len(PALETTE)]) for j, (n, _) in enumerate(series)]) \
        if len(series) > 1 else ""
    return f"<div>{''.join(parts)}{leg}</div>"


def line_chart(title: str, series: list[tuple[str, list[tuple[float, float]]]], *,
               xlabel: str = "step", chart_id: str = "") -> str:
    """Lines over x (e.g. loss per step), with min / max ticks on both axes."""
    pts = [p for _, ps in series for p in ps
           if all(isinstance(c, (int, float)) and math.isfinite(c) for c in p)]
    if not pts:
        return ""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - abs(y0) * 0.1 - 1e-6, y1 + abs(y1) * 0.1 + 1e-6
    w, h, left, top = 420, 180, 60, 24

    def sx(x):
        return left + w * (x - x0) / (x1 - x0)

    def sy(y):
        return top + h * (1 - (y - y0) / (y1 - y0))

    width, height = left + w + 20, top + h + 34
    parts = [f'<svg class="chart curve" data-chart="{esc(chart_id or title)}" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" role="img">',
             f'<text x="0" y="14" font-size="13" font-weight="600">{esc(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#ced4da"/>']
    for y in (y0, (y0 + y1) / 2, y1):
        parts.append(f'<text x="{left - 4}" y="{sy(y) + 4:.1f}" font-size="10" '
                     f'text-anchor="end">{num(y, 3)}</text>')
    for x in (x0, x1):
        parts.append(f'<text x="{sx(x):.1f}" y="{top + h + 14}" font-size="10" '
                     f'text-anchor="middle">{num(x, 6)}</text>')
    parts.append(f'<text x="{left + w / 2}" y="{top + h + 28}" font-size="11" '
                 f'text-anchor="middle">{esc(xlabel)}</text>')
    for j, (name, ps) in enumerate(series):
        ok = [p for p in ps if all(isinstance(c, (int, float)) and math.isfinite(c) for c in p)]
        color = PALETTE[j % len(PALETTE)]
        if len(ok) > 1:
            d = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in ok)
            parts.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y in ok:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}">'
                         f'<title>{esc(name)} at {num(x)}: {num(y)}</title></circle>')
    parts.append("</svg>")
    return f"<div>{''.join(parts)}{legend([(n, PALETTE[j % len(PALETTE)]) for j, (n, _) in enumerate(series)])}</div>"


# ---------------------------------------------------------------- what the passes report

_LAYER_KEY = re.compile(r"^(\w+)\[(\d+)\]$")
_SIZES_NOTE = re.compile(r"^(\w+) sizes differ per layer: \{([^}]*)\}")
_LAYER_IN_NAME = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)\.")


def _layer_dict(text: str) -> dict[int, int]:
    pairs = [item.partition(":")[::2] for item in text.split(",")]
    return {int(k): int(v) for k, v in pairs if k.strip().isdigit() and v.strip().isdigit()}


def units_per_layer(rep: dict[str, Any]) -> dict[str, dict[int, dict[str, int]]]:
    """Per kind and layer: ``kept`` / ``total`` / ``removed`` units where a pass report
    tells them (l0's kept_units, prune-structured's and remove's removed_units with the
    sizes in their notes / config updates / module attributes)."""
    out: dict[str, dict[int, dict[str, int]]] = defaultdict(lambda: defaultdict(dict))
    for key, val in (rep.get("kept_units") or {}).items():  # l0: "62/96"
        m = _LAYER_KEY.match(str(key))
        kept, _, total = str(val).partition("/")
        if m and kept.isdigit() and total.isdigit():
            out[m.group(1)][int(m.group(2))].update(kept=int(kept), total=int(total))
    removed = rep.get("removed_units") or {}
    for key, n in removed.items():
        m = _LAYER_KEY.match(str(key))
        if m and isinstance(n, int):
            out[m.group(1)][int(m.group(2))]["removed"] = n
    if not removed:
        return {k: dict(v) for k, v in out.items()}
    sizes: dict[str, dict[int, int]] = {}
    for note in rep.get("notes") or []:
        m = _SIZES_NOTE.match(str(note))
        if m:
            sizes[{"heads": "query heads", "kv": "KV heads"}.get(m.group(1), m.group(1))] = \
                _layer_dict(m.group(2))
    cfg = rep.get("config_updates") or {}
    layers = sorted({lay for v in out.values() for lay in v})
    for name, key in (("mlp", "intermediate_size"), ("query heads", "num_attention_heads"),
                      ("KV heads", "num_key_value_heads")):
        if name not in sizes and isinstance(cfg.get(key), int):
            sizes[name] = {lay: cfg[key] for lay in layers}
    for module, attrs in (rep.get("module_attrs") or {}).items():
        m = re.search(r"\.(\d+)\.", str(module) + ".")
        if not m or not isinstance(attrs, dict):
            continue
        for name, key in (("query heads", "config.num_attention_heads"),
                          ("KV heads", "config.num_key_value_heads")):
            if isinstance(attrs.get(key), int):
                sizes.setdefault(name, {})[int(m.group(1))] = attrs[key]
    for name, per_layer in sizes.items():
        for lay, kept in per_layer.items():
            entry = out[name][lay]
            entry["kept"] = kept
            if name == "mlp" and "removed" in entry:
                entry["total"] = kept + entry["removed"]
    return {k: dict(v) for k, v in out.items()}


def sparsity_per_layer(rep: dict[str, Any]) -> dict[int, float]:
    """Zero fraction per decoder block from a sparsify report's ``layers``."""
    zeros: dict[int, int] = defaultdict(int)
    numel: dict[int, int] = defaultdict(int)
    for lyr in rep.get("layers") or []:
        if not isinstance(lyr, dict) or lyr.get("skipped"):
            continue
        m = _LAYER_IN_NAME.search(str(lyr.get("name", "")))
        if m and isinstance(lyr.get("zeros"), int) and lyr.get("numel"):
            zeros[int(m.group(1))] += lyr["zeros"]
            numel[int(m.group(1))] += lyr["numel"]
    return {k: zeros[k] / numel[k] for k in sorted(numel)}


def checks(report: dict[str, Any]) -> list[list[Any]]:
    """Rows (pass, check, result, status) for the checks the passes ran."""
    rows: list[list[Any]] = []
    ok = ("html", '<span class="ok">passed</span>')
    bad = ("html", '<span class="bad">failed</span>')
    for p in report.get("passes", []):
        rep, name = p.get("report") or {}, p.get("name", "?")
        for key in ("ort_vs_torch", "ort_check"):
            c = rep.get(key)
            if isinstance(c, dict):
                detail = ", ".join(f"{k} {num(v) if not isinstance(v, (list, dict)) else esc(v)}"
                                   for k, v in c.items())
                rows.append([name, key, ("html", detail), bad if c.get("finite") is False else ok])
        if "reload_rel_error" in rep:
            rows.append([name, "reload_rel_error", ("html", num(rep["reload_rel_error"])), ok])
        if isinstance(rep.get("ok"), bool):
            subs = [r for r in rep.get("reports") or [] if isinstance(r, dict)]
            detail = "; ".join(
                f"{esc(r.get('source', ''))}: {esc(r.get('pattern', ''))} holds on "
                f"{num((r.get('summary') or {}).get('holds'))} of "
                f"{num((r.get('summary') or {}).get('layers'))} layers" for r in subs) \
                or esc(rep.get("pattern", ""))
            rows.append([name, f"{rep.get('pattern', 'pattern')} check", ("html", detail),
                         ok if rep["ok"] else bad])
        if isinstance(rep.get("check"), dict) and isinstance(rep["check"].get("ok"), bool):
            rows.append([name, "N:M check", ("html", esc({k: v for k, v in rep["check"].items()
                                                           if k != "ok"})),
                         ok if rep["check"]["ok"] else bad])
    return rows


def _per_layer_html(report: dict[str, Any]) -> str:
    out = []
    for i, p in enumerate(report.get("passes", [])):
        rep, name = p.get("report") or {}, p.get("name", "?")
        charts = []
        units = units_per_layer(rep)
        for kind in sorted(units):
            per = units[kind]
            layers = sorted(per)
            kept = [per[lay].get("kept") for lay in layers]
            if any(v is not None for v in kept):
                totals = [per[lay].get("total") for lay in layers]
                charts.append(bar_chart(f"{kind}: kept per layer", [f"layer {lay}" for lay in layers],
                                        [("kept", kept)], totals=totals if any(totals) else None,
                                        chart_id=f"kept-{kind}"))
            elif any("removed" in per[lay] for lay in layers):
                charts.append(bar_chart(f"{kind}: units removed per layer",
                                        [f"layer {lay}" for lay in layers],
                                        [("removed", [per[lay].get("removed") for lay in layers])],
                                        chart_id=f"removed-{kind}"))
        sp = sparsity_per_layer(rep)
        sched = rep.get("schedule") if isinstance(rep.get("schedule"), dict) else {}
        if sp:
            series = [("zeros", list(sp.values()))]
            if sched.get("layer_sparsity") and len(sched["layer_sparsity"]) == len(sp):
                series.append(("schedule target", list(sched["layer_sparsity"])))
            charts.append(bar_chart("sparsity per layer", [f"layer {k}" for k in sp], series,
                                    chart_id="sparsity"))
        if charts:
            out.append(f'<h3>pass {i + 1}: <code>{esc(p.get("options", name))}</code></h3>'
                       f'<div class="charts">{"".join(charts)}</div>')
    return "\n".join(out)


def _history(hist: Any) -> list[tuple[str, list[tuple[float, float]]]]:
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for rec in hist if isinstance(hist, list) else []:
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)):
            continue
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                series[k].append((rec["step"], v))
    return list(series.items())


def _curves_html(report: dict[str, Any]) -> str:
    out = []
    for i, p in enumerate(report.get("passes", [])):
        rep, name = p.get("report") or {}, p.get("name", "?")
        charts = []
        for label, hist in (("training", rep.get("history")),
                            ("fine-tune", (rep.get("finetune") or {}).get("history"))):
            series = _history(hist)
            loss = [s for s in series if "loss" in s[0]]
            other = [s for s in series if "loss" not in s[0] and s[0] != "target"]
            if loss:
                charts.append(line_chart(f"{name} {label}: loss per step", loss,
                                         chart_id=f"{name}-{label}-loss"))
            if other:
                charts.append(line_chart(f"{name} {label}: {', '.join(n for n, _ in other)}",
                                         other, chart_id=f"{name}-{label}-other"))
        lin = (rep.get("reconstruct") or {}).get("linears") if isinstance(
            rep.get("reconstruct"), dict) else None
        if lin:
            labels = [str(r.get("linear", "?")) for r in lin]
            charts.append(bar_chart("calibration refit: relative output error per linear", labels,
                                    [("without update", [r.get("rel_error_no_update") for r in lin]),
                                     ("refitted", [r.get("rel_error_refit") for r in lin])],
                                    chart_id="refit"))
        if charts:
            out.append(f'<h3>pass {i + 1}: <code>{esc(p.get("options", name))}</code></h3>'
                       f'<div class="charts">{"".join(charts)}</div>')
    return "\n".join(out)


def render_compile(report: dict[str, Any]) -> str:
    """OUTDIR/report.html from the compile report (the dict written as report.json)."""
    b, a = report.get("before") or {}, report.get("after") or {}
    passes = report.get("passes") or []
    body = []
    items = "".join(f"<li><code>{esc(p.get('options', p.get('name')))}</code> "
                    f'<span class="muted">{num(p.get("seconds"))} s, '
                    f'{"modified the model" if p.get("modified") else "model unchanged"}</span></li>'
                    for p in passes)
    body.append(section("pipeline", "Pipeline", f'<ol class="pipeline">{items}</ol>'))
    pb, pa = b.get("total_params") or 0, a.get("total_params") or 0
    fb, fa = b.get("total_flops_per_token") or 0, a.get("total_flops_per_token") or 0
    cards = "".join(
        f'<div class="card">{esc(t)}<b>{num(x)} &rarr; {num(y)}</b>'
        f'<span class="muted">{100 * y / x:.1f}% kept</span></div>' if x else
        f'<div class="card">{esc(t)}<b>{num(x)} &rarr; {num(y)}</b></div>'
        for t, x, y in (("parameters", pb, pa), ("matmul FLOPs per token", fb, fa)))
    cards += (f'<div class="card">total time<b>{num(report.get("total_seconds"))} s</b>'
              f'<span class="muted">load and trace {num(report.get("load_and_trace_seconds"))} s'
              f"</span></div>")
    body.append(section("summary", "Summary", f'<div class="cards">{cards}</div>'))
    labels = ["load and trace"] + [f"{i + 1}. {p.get('name', '?')}" for i, p in enumerate(passes)]
    secs = [report.get("load_and_trace_seconds")] + [p.get("seconds") for p in passes]
    body.append(section("timing", "Time per pass",
                        bar_chart("seconds", labels, [("seconds", secs)], unit=" s",
                                  chart_id="timing")))
    kinds = sorted(set(b.get("params") or {}) | set(a.get("params") or {}))
    rows = []
    for k in kinds:
        x, y = (b.get("params") or {}).get(k, 0), (a.get("params") or {}).get(k, 0)
        fx, fy = (b.get("flops_per_token") or {}).get(k, 0), (a.get("flops_per_token") or {}).get(k, 0)
        rows.append([k, x, y, f"{100 * y / x:.1f}%" if x else "-", fx, fy,
                     f"{100 * fy / fx:.1f}%" if fx else "-"])
    rows.append([("html", "<b>total</b>"), pb, pa, f"{100 * pa / pb:.1f}%" if pb else "-",
                 fb, fa, f"{100 * fa / fb:.1f}%" if fb else "-"])
    chart = bar_chart("parameters by kind", kinds,
                      [("before", [(b.get("params") or {}).get(k, 0) for k in kinds]),
                       ("after", [(a.get("params") or {}).get(k, 0) for k in kinds])],
                      chart_id="params-by-kind")
    fk = [k for k in kinds if (b.get("flops_per_token") or {}).get(k)]
    chart += bar_chart("matmul FLOPs per token by kind", fk,
                       [("before", [b["flops_per_token"].get(k, 0) for k in fk]),
                        ("after", [(a.get("flops_per_token") or {}).get(k, 0) for k in fk])],
                       chart_id="flops-by-kind") if fk else ""
    body.append(section("kinds", "Parameters and FLOPs by kind",
                        table(["kind", "params before", "params after", "kept",
                               "FLOPs/token before", "after", "kept"], rows)
                        + f'<div class="charts">{chart}</div>'))
    per_layer = _per_layer_html(report)
    body.append(section("per-layer", "Per layer", per_layer or
                        '<p class="muted">no pass reported per-layer sizes or sparsity</p>'))
    curves = _curves_html(report)
    if curves:
        body.append(section("curves", "Calibration and recovery", curves))
    rows = checks(report)
    body.append(section("checks", "Checks", table(["pass", "check", "result", "status"], rows)
                        if rows else '<p class="muted">no pass ran a check</p>'))
    notes = []
    for i, p in enumerate(passes):
        rep = p.get("report") or {}
        for what in ("skipped", "notes"):
            for line in rep.get(what) or []:
                notes.append([f"{i + 1}. {p.get('name', '?')}", what, str(line)])
    if notes:
        body.append(section("notes", "Notes and skipped", table(["pass", "", "text"], notes)))
    files = "".join(f"<li><code>{esc(f)}</code></li>" for f in report.get("files") or [])
    body.append(section("files", "Files", f"<ul>{files}</ul>"))
    return page(f"slimgraph compile: {report.get('model', '?')}",
                " -> ".join(str(s) for s in report.get("pipeline") or []), "\n".join(body))


# ---------------------------------------------------------------- inspect --html

PAN_ZOOM = """
(function(){
var svg=document.getElementById('graph');if(!svg)return;
var vb=svg.getAttribute('viewBox').split(' ').map(Number),full=vb.slice();
function set(){svg.setAttribute('viewBox',vb.join(' '));}
var r0=svg.getBoundingClientRect();if(r0.width>0){vb[3]=Math.min(full[3],full[2]*r0.height/r0.width);set();}
function pt(e){var r=svg.getBoundingClientRect();return[vb[0]+(e.clientX-r.left)/r.width*vb[2],
vb[1]+(e.clientY-r.top)/r.height*vb[3]];}
function zoom(f,c){vb[0]=c[0]-(c[0]-vb[0])*f;vb[1]=c[1]-(c[1]-vb[1])*f;vb[2]*=f;vb[3]*=f;set();}
svg.addEventListener('wheel',function(e){e.preventDefault();zoom(e.deltaY>0?1.2:1/1.2,pt(e));},
{passive:false});
var drag=null;svg.addEventListener('mousedown',function(e){drag=pt(e);});
window.addEventListener('mouseup',function(){drag=null;});
svg.addEventListener('mousemove',function(e){if(!drag)return;var p=pt(e);
vb[0]-=p[0]-drag[0];vb[1]-=p[1]-drag[1];set();});
function mid(){return[vb[0]+vb[2]/2,vb[1]+vb[3]/2];}
function on(id,f){document.getElementById(id).onclick=f;}on('zin',function(){zoom(1/1.5,mid());});
on('zout',function(){zoom(1.5,mid());});on('zfit',function(){vb=full.slice();set();});
var nodes=svg.querySelectorAll('.n');
document.querySelectorAll('tr[data-gid]').forEach(function(tr){tr.addEventListener('click',
function(){var sel=!tr.classList.contains('sel');
document.querySelectorAll('tr.sel').forEach(function(t){t.classList.remove('sel');});
var g=tr.getAttribute('data-gid');if(sel)tr.classList.add('sel');
nodes.forEach(function(n){var on=sel&&(' '+n.getAttribute('data-groups')+' ').indexOf(' '+g+' ')>=0;
n.classList.toggle('hl',on);n.classList.toggle('dim',sel&&!on);});});});
document.body.setAttribute('data-ready','1');
})();
"""


def _layout(graph) -> tuple[dict[str, tuple[float, float]], list[tuple[str, str]], float, float]:
    """Layered layout: rank = longest path from a source; within a rank, nodes ordered
    by the mean position of their producers."""
    rank: dict[str, int] = {}
    edges: list[tuple[str, str]] = []
    for n in graph.nodes:
        preds = [v.producer.name for v in n.inputs
                 if v is not None and v.producer is not None and v.producer.name in rank]
        rank[n.name] = 1 + max((rank[p] for p in preds), default=-1)
        edges += [(p, n.name) for p in dict.fromkeys(preds)]
    preds_of: dict[str, list[str]] = defaultdict(list)
    for a, b in edges:
        preds_of[b].append(a)
    rows: dict[int, list[str]] = defaultdict(list)
    for name, r in rank.items():
        rows[r].append(name)
    col: dict[str, float] = {}
    for r in sorted(rows):
        names = rows[r]
        names.sort(key=lambda nm: sum(col[p] for p in preds_of[nm]) / len(preds_of[nm])
                   if preds_of[nm] else -1)
        for i, nm in enumerate(names):
            col[nm] = i - (len(names) - 1) / 2
    dx, dy = 170, 56
    width = dx * (max((len(v) for v in rows.values()), default=1) + 1)
    pos = {nm: (width / 2 + c * dx, 30 + rank[nm] * dy) for nm, c in col.items()}
    return pos, edges, width, 60 + dy * (max(rows, default=0) + 1)


def render_inspect(graph, result) -> str:
    """`inspect --html`: the summary, the groups table, the graph with linear layers
    coloured by the kind of their group (pan with the mouse, zoom with the wheel)."""
    from slimgraph.inspect_report import KIND_COLORS, summary
    from slimgraph.ir.graph import OpKind

    s = summary(graph, result)
    group_of: dict[tuple[str, int], Any] = {}
    groups_by_param: dict[str, set[int]] = defaultdict(set)
    for g in result.groups:
        for m in g.members:
            group_of.setdefault((m.param, m.dim), g)
            groups_by_param[m.param].add(g.id)
    pos, edges, width, height = _layout(graph)
    parts = [f'<svg id="graph" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width:.0f} '
             f'{height:.0f}" preserveAspectRatio="xMidYMin meet"><g stroke="#adb5bd" '
             'stroke-width="1" fill="none">']
    for a, b in edges:
        (x1, y1), (x2, y2) = pos[a], pos[b]
        parts.append(f'<path d="M{x1:.0f},{y1 + 12:.0f} C{x1:.0f},{y1 + 40:.0f} {x2:.0f},'
                     f'{y2 - 40:.0f} {x2:.0f},{y2 - 12:.0f}"/>')
    parts.append("</g>")
    for n in graph.nodes:
        x, y = pos[n.name]
        fill = UNKNOWN_FILL if n.kind is OpKind.UNKNOWN else "#f8f9fa"
        gids: set[int] = set()
        for v in n.inputs:
            if v is not None and v.name in graph.params:
                gids |= groups_by_param.get(v.name, set())
        kind = ""
        if n.kind is OpKind.LINEAR:
            w = n.inputs[1]
            grp = group_of.get((w.name, n.attrs["w_out"])) or group_of.get((w.name, n.attrs["w_in"]))
            if grp is not None:
                fill, kind = KIND_COLORS.get(grp.kind, "#dddddd"), grp.kind
        label = n.name if len(n.name) <= 22 else n.name[:20] + ".."
        parts.append(f'<g class="n" data-groups="{" ".join(map(str, sorted(gids)))}">'
                     f'<rect x="{x - 75:.0f}" y="{y - 12:.0f}" width="150" height="24" rx="4" '
                     f'fill="{fill}" stroke="#6c757d"/><text x="{x:.0f}" y="{y + 4:.0f}" '
                     f'font-size="10" text-anchor="middle">{esc(label)}</text><title>'
                     f'{esc(n.name)}: {esc(n.op)} ({esc(n.kind.value)})'
                     f'{esc(", group kind " + kind) if kind else ""}</title></g>')
    parts.append("</svg>")
    controls = ('<p><button id="zin">zoom in</button> <button id="zout">zoom out</button> '
                '<button id="zfit">fit</button> <span class="muted">wheel zooms, drag pans; '
                "click a group row to highlight the nodes using its parameters</span></p>")
    kinds_used = sorted({g.kind for g in result.groups})
    leg = legend([(k, KIND_COLORS.get(k, "#dddddd")) for k in kinds_used]
                 + [("op without a channel rule", UNKNOWN_FILL)])
    rows = []
    for g in result.groups:
        unit = g.unit if g.unit != "kv-group" else f"kv-group ({g.queries_per_unit} q heads)"
        members = ", ".join(sorted({f"{m.param}[{m.dim}]" for m in g.members}))
        why = ("html", '<span class="ok">yes</span>' + (
            " (approximately: LayerNorm statistics span these channels)" if g.approximate else "")
        ) if g.prunable else ("html", '<span class="bad">no</span>: ' + esc("; ".join(g.reasons)))
        rows.append((g.id, [g.id, g.kind, "-" if g.layer is None else g.layer,
                            f"{g.units} x {unit}", g.params_per_unit,
                            ("html", f'<span class="muted">{esc(members)}</span>'), why]))
    tbl = table(["id", "kind", "layer", "units", "params/unit", "members", "prunable"],
                [r for _, r in rows], cls="groups", row_ids=[gid for gid, _ in rows])
    pk = ", ".join(f"{esc(k)}: {v}" for k, v in sorted(s["prunable_by_kind"].items()))
    cards = (f'<div class="cards"><div class="card">nodes<b>{num(s["nodes"])}</b></div>'
             f'<div class="card">parameters<b>{num(s["parameters"])}</b>'
             f'<span class="muted">in {num(s["param_tensors"])} tensors</span></div>'
             f'<div class="card">channel groups<b>{num(s["groups"])}</b><span class="muted">'
             f'prunable: {pk or "none"}</span></div><div class="card">barriers'
             f'<b>{num(s["barriers"])}</b></div></div>')
    body = "\n".join([section("summary", "Summary", cards),
                      section("groups", f"Channel groups ({len(rows)})", tbl),
                      section("graph-section", "Graph", controls + leg + "".join(parts))])
    return page(f"slimgraph inspect: {s['model']}", str(s["source"]), body, PAN_ZOOM)


def write_html(path: str | Path, text: str) -> Path:
    """Write ``text`` atomically; an unwritable path is a one-line SlimgraphError."""
    from slimgraph.io import atomic_write_text

    try:
        return atomic_write_text(Path(path).expanduser(), text)
    except OSError as e:
        raise SlimgraphError(f"cannot write the HTML report '{path}': "
                             f"{e.strerror or e}") from None


def check_writable(path: str | Path) -> None:
    """Refuse early (before a model loads) an HTML path that cannot be written."""
    p = Path(path).expanduser()
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if p.is_dir() or not parent.is_dir():
        raise SlimgraphError(f"cannot write the HTML report '{path}': "
                             + ("it is a directory" if p.is_dir() else f"'{parent}' is not a directory"))
