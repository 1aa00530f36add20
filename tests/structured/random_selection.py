"""A random selection of head and MLP units, and the slim / masked ONNX pair built from
it, shared by the ONNX removal tests."""

from __future__ import annotations

import random


def random_heads_and_mlp(result, seed: int) -> dict[int, list[int]]:
    """Per heads group 0 to units-1 random units (at least one group pruned), and random
    channels of about 70% of the MLP groups."""
    rng = random.Random(seed)
    sel: dict[int, list[int]] = {}
    heads = [g for g in result.prunable() if g.kind == "heads"]
    for g in heads:
        k = rng.randint(0, g.units - 1)
        if k:
            sel[g.id] = sorted(rng.sample(range(g.units), k))
    if not sel:
        sel[heads[seed % len(heads)].id] = [rng.randrange(heads[0].units)]
    for g in result.prunable():
        if g.kind == "mlp" and rng.random() < 0.7:
            sel[g.id] = sorted(rng.sample(range(g.units), rng.randint(1, g.units - 1)))
    return sel


def slim_and_masked(src, seed: int, tmp_path, select=random_heads_and_mlp):
    """Import ``src`` twice; zero a random selection (``select(result, seed)``) in one copy
    and remove it from the other; save both. Returns (result, selection, removal report,
    masked path, slim path)."""
    from slimgraph.backends.onnx_export import save_onnx_model
    from slimgraph.frontends.onnx_import import import_onnx
    from slimgraph.ir.dependency import analyze
    from slimgraph.structured.onnx_removal import remove_units_onnx
    from slimgraph.structured.unit_slicing import mask_units

    result = analyze(import_onnx(src))
    sel = select(result, seed)
    masked = analyze(import_onnx(src))
    mask_units(masked, sel)
    masked_path = save_onnx_model(masked.graph.meta["onnx_model"], tmp_path / "masked" / "model.onnx")
    report = remove_units_onnx(result, sel)
    slim_path = save_onnx_model(result.graph.meta["onnx_model"], tmp_path / "slim" / "model.onnx")
    return result, sel, report, masked_path, slim_path
