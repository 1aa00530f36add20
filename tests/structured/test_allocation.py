"""allocation=global: units ranked across layers on standardised scores, within bounds."""

from __future__ import annotations

import pytest
import torch

from slimgraph.errors import PipelineError
from slimgraph.ir.dependency import ChannelGroup
from slimgraph.structured.selection import global_counts


def _group(gid, layer, units=10, kind="mlp"):
    return ChannelGroup(id=gid, kind=kind, layer=layer, units=units, unit="channel", members=[],
                        params_per_unit=3, prunable=True)


def test_same_total_moved_to_the_layer_with_the_most_low_outliers():
    groups = [_group(0, 0), _group(1, 1), _group(2, 2, kind="heads", units=4)]
    flat = torch.arange(10.0)  # evenly spread scores
    skewed = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 10, 10, 10, 10])  # many alike low
    scores = {0: flat, 1: skewed, 2: torch.tensor([1.0, 2, 3, 4])}
    out = global_counts(groups, {0: 5, 1: 5, 2: 1}, scores, 0.2, 0.8)
    assert out[0] + out[1] == 10 and out[2] == 1  # per kind, the uniform total
    assert out[1] > out[0] and 2 <= out[0] and out[1] <= 8  # within floor / ceiling
    # a uniform spread of the same scores everywhere: the uniform plan
    same = global_counts(groups[:2], {0: 5, 1: 5}, {0: flat, 1: flat}, 0.0, 0.9)
    assert same == {0: 5, 1: 5}
    with pytest.raises(PipelineError, match="layer_floor/layer_ceiling"):
        global_counts(groups[:2], {0: 5, 1: 5}, scores, 0.6, 0.9)
