"""Run `distill` on a model directory and save the weights (main process only): the
worker of the two-process test, started by ``accelerate launch``.

    python distill_worker.py MODEL_DIR DATA OUT.pt OPTIONS
"""

from __future__ import annotations

import sys

import torch


def main(model_dir: str, data: str, out: str, options: str) -> None:
    from accelerate import PartialState

    from slimgraph.frontends.build import graph_of
    from slimgraph.frontends.loading import load_model
    from slimgraph.passes.base import CompileState
    from slimgraph.passes.pipeline import from_text_or_file

    (p,) = from_text_or_file(f"distill{{data={data},{options}}}")
    loaded = load_model(model_dir)
    state = CompileState(loaded=loaded)
    state.graph = graph_of(loaded)
    p.requires(state)
    p.run(state)
    if PartialState().is_main_process:
        torch.save({n: t.detach().cpu() for n, t in state.model.state_dict().items()}, out)


if __name__ == "__main__":
    main(*sys.argv[1:5])
