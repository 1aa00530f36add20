"""The options the sparsity library reads: :class:`PruneOptions`, a plain record that the
``sparsify`` pass builds from its own options (``Sparsify.prune_options``), so that the
library's functions (``prune_step``, ``block_prune``, ``onnx_path``, ``onnx_permute``,
``deploy``) take it instead of the pass object, and what follows from it (whether the
score or the reconstruction needs calibration statistics or a Gram matrix).
"""

from __future__ import annotations

from dataclasses import dataclass

from slimgraph.sparsity.scores import SCORES_NEED_DATA


def needs_hessian(score: str, reconstruct: bool) -> bool:
    """SparseGPT's weight update (``reconstruct`` or score ``sparsegpt``) needs the Gram
    matrix of each linear's inputs."""
    return reconstruct or score == "sparsegpt"


def needs_stats(score: str, reconstruct: bool) -> bool:
    """The prune observes each block's linear inputs (for the score or the update)."""
    return score in SCORES_NEED_DATA or needs_hessian(score, reconstruct)


@dataclass(frozen=True)
class PruneOptions:
    """One ``sparsify`` run as the library sees it. ``nm``: the N:M pattern (None:
    unstructured at ``sparsity``, compared per ``scope``); ``permute``: none, mask-only,
    fold, space or gather (``search``: fast or exact; ``gather_share``: one permutation
    per activation under gather)."""

    score: str = "ria"
    nm: tuple[int, int] | None = None
    sparsity: float | None = None
    scope: str | None = None
    a: float = 0.5
    reconstruct: bool = False
    permute: str = "none"
    search: str = "fast"
    gather_share: bool = False

    @property
    def ranking_score(self) -> str:
        """The score that ranks weights: SparseGPT's saliency falls back to magnitude."""
        return "magnitude" if self.score == "sparsegpt" else self.score

    def needs_hessian(self) -> bool:
        return needs_hessian(self.score, self.reconstruct)

    def needs_stats(self) -> bool:
        return needs_stats(self.score, self.reconstruct)
