"""A random selection of head and MLP units, shared by the ONNX removal tests."""

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
