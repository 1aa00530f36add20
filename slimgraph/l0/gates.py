"""Hard-concrete gates on the units of channel groups (L0 structured pruning, ALGORITHMS.md §4).

Where a gate acts is decided from the dependency analysis, not from module names:

- a group inside a block (attention heads / GQA KV-groups, MLP channels) is gated where
  its channels are *read*: the input of every linear whose contraction dim belongs to the
  group (o_proj's columns of a head, down_proj's columns of an MLP channel). Scaling that
  input by z is the same as scaling the weight columns, so soft values fold exactly;
- the hidden group (the residual stream) is gated where its channels are *written*: the
  output of the embedding and of every linear whose output dim belongs to it (o_proj,
  down_proj), so the residual stream itself is zero in a removed channel and RMSNorm's
  statistics see what the slim model (with the norm correction) sees. Hidden gates end
  binary: a soft value could not be folded exactly into a tied embedding / lm_head.

Expected kept size: for every linear weight of an attention or MLP group, the expected
number of kept rows times the expected kept columns (units are independent), each
position kept with the probability of the unit owning it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from slimgraph.errors import PipelineError
from slimgraph.ir.dependency import ChannelGroup, DependencyResult
from slimgraph.structured.importance import unit_of_position

BETA, LIMIT_L, LIMIT_R = 2.0 / 3.0, -0.1, 1.1
LOG_ALPHA_RANGE = (math.log(0.01), math.log(100.0))
EPS = 1e-6


def hard_concrete_sample(log_alpha: torch.Tensor, generator: torch.Generator | None = None
                         ) -> torch.Tensor:
    """z = clamp(sigmoid((log(u/(1-u)) + log α)/β)·(r−l) + l, 0, 1), u ~ U(ε, 1−ε)."""
    u = torch.rand(log_alpha.shape, generator=generator).clamp(EPS, 1 - EPS).to(log_alpha.device)
    s = torch.sigmoid((torch.log(u / (1 - u)) + log_alpha) / BETA)
    return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)


def prob_kept(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z ≠ 0) = 1 − sigmoid(β·log(−l/r) − log α)."""
    return 1 - torch.sigmoid(BETA * math.log(-LIMIT_L / LIMIT_R) - log_alpha)


def deterministic_gate(log_alpha: torch.Tensor, binary: bool = False) -> torch.Tensor:
    """Final gate values: round(n − Σ P(kept)) zeros on the lowest log α (at least one unit
    kept); kept units take the median of their gate (soft, close to 1) or 1 if ``binary``."""
    la = log_alpha.detach().float().cpu()
    n = la.numel()
    zeros = int(round(n - float(prob_kept(la).sum())))
    zeros = min(max(zeros, 0), n - 1)
    # the noise-free gate sigmoid(log α / β): close to 1 for confident units, never 0
    z = torch.ones(n) if binary else torch.sigmoid(la / BETA)
    order = sorted(range(n), key=lambda u: (float(la[u]), u))
    z[order[:zeros]] = 0.0
    return z


@dataclass
class GateTarget:
    module: str  # module path in the model
    where: str  # "input" (pre-hook on the last dim of args[0]) or "output"
    owner: torch.Tensor  # per feature: the unit owning it, or -1


@dataclass
class Family:
    """The gates of one channel group."""

    group: ChannelGroup
    targets: list[GateTarget]
    binary: bool

    @property
    def name(self) -> str:
        return f"{self.group.kind}" + (f"[{self.group.layer}]" if self.group.layer is not None else "")


def _module_roles(model: nn.Module, param: str, dim: int) -> tuple[str, str] | None:
    """(module path, 'in'|'out') when ``param`` is the weight of a linear-like module and
    ``dim`` its input or output features; None otherwise (norms, biases, ...)."""
    path, _, leaf = param.rpartition(".")
    if leaf != "weight":
        return None
    try:
        mod = model.get_submodule(path)
    except AttributeError:
        return None
    if isinstance(mod, nn.Linear):
        return path, ("in" if dim == 1 else "out")
    if isinstance(mod, nn.Embedding):
        return (path, "out") if dim == 1 else None
    if type(mod).__name__ == "Conv1D":  # GPT-2: weight [in, out]
        return path, ("in" if dim == 0 else "out")
    return None


def plan_families(model: nn.Module, result: DependencyResult, kinds: set[str]) -> list[Family]:
    """One gate family per prunable group of the chosen kinds."""
    families = []
    for kind in sorted(kinds):
        groups = [g for g in result.groups if g.kind == kind]
        if not groups:
            raise PipelineError(f"option 'kinds': the model has no {kind} "
                                "groups")
        usable = [g for g in groups if g.prunable]
        if not usable:
            raise PipelineError(f"option 'kinds': every {kind} group is "
                                f"unprunable ({'; '.join(groups[0].reasons) or 'no reason'})")
        for g in usable:
            want = "out" if kind == "hidden" else "in"
            targets = []
            for m in g.members:
                role = _module_roles(model, m.param, m.dim)
                if role is None or role[1] != want:
                    continue
                owner = torch.from_numpy(unit_of_position(m, g.units))
                where = "input" if want == "in" else "output"
                targets.append(GateTarget(role[0], where, owner))
            if not targets:
                raise PipelineError(
                    f"{kind} group {g.id} has no linear or embedding "
                    f"{'reading' if want == 'in' else 'writing'} its channels to place a gate on")
            families.append(Family(g, targets, binary=(kind == "hidden")))
    return families


@dataclass
class SizeModel:
    """Expected kept parameters of the attention and MLP linears under the gates."""

    sizes: dict[str, tuple[int, ...]]  # weight param -> shape
    kind_of: dict[str, str]  # weight param -> heads | mlp
    # (param, dim) -> [(family index, owner)]
    owners: dict[tuple[str, int], list[tuple[int, torch.Tensor]]] = field(default_factory=dict)

    @classmethod
    def build(cls, model: nn.Module, result: DependencyResult, families: list[Family]) -> SizeModel:
        sizes: dict[str, tuple[int, ...]] = {}
        kind_of: dict[str, str] = {}
        for g in result.groups:
            if g.kind not in ("heads", "mlp"):
                continue
            for m in g.members:
                if _module_roles(model, m.param, m.dim) is not None:
                    shape = tuple(result.graph.params[m.param].param.shape)
                    if len(shape) == 2:
                        sizes[m.param] = shape
                        kind_of[m.param] = g.kind
        sm = cls(sizes, kind_of)
        for fi, fam in enumerate(families):
            for m in fam.group.members:
                if m.param in sizes:
                    owner = torch.from_numpy(unit_of_position(m, fam.group.units))
                    sm.owners.setdefault((m.param, m.dim), []).append((fi, owner))
        return sm

    def prunable(self, kind: str | None = None) -> int:
        return sum(a * b for p, (a, b) in self.sizes.items() if kind in (None, self.kind_of[p]))

    def expected_kept(self, probs: list[torch.Tensor], kind: str | None = None) -> torch.Tensor:
        total = torch.zeros((), dtype=probs[0].dtype if probs else torch.float32)
        for p, shape in self.sizes.items():
            if kind is not None and self.kind_of[p] != kind:
                continue
            kept = torch.ones((), dtype=total.dtype)
            for dim, n in enumerate(shape):
                pos = torch.ones(n, dtype=total.dtype)
                for fi, owner in self.owners.get((p, dim), []):
                    padded = torch.cat([probs[fi], torch.ones(1, dtype=total.dtype)])
                    pos = pos * padded[owner]  # owner -1 -> the padding 1
                kept = kept * pos.sum()
            total = total + kept
        return total

    def expected_sparsity(self, probs: list[torch.Tensor], kind: str | None = None) -> torch.Tensor:
        return 1 - self.expected_kept(probs, kind) / self.prunable(kind)


class GateSet(nn.Module):
    """The learnable log α of every family, the Lagrange multipliers, and the hooks."""

    def __init__(self, families: list[Family], droprate_init: float = 0.5,
                 lambda_names: tuple[str, ...] = ("all",)) -> None:
        super().__init__()
        self.families = families
        init = math.log(1 - droprate_init) - math.log(droprate_init)
        self.log_alpha = nn.ParameterList(
            [nn.Parameter(torch.full((f.group.units,), init)) for f in families])
        self.lambdas = nn.ParameterDict(
            {n: nn.Parameter(torch.zeros(2)) for n in lambda_names})
        self.current: list[torch.Tensor] | None = None  # gate values in use; None: all open
        self._hooks: list = []

    # -- gate values ------------------------------------------------------------------
    def sample(self, generator: torch.Generator | None = None) -> None:
        self.current = [hard_concrete_sample(la, generator) for la in self.log_alpha]

    def set_deterministic(self) -> list[torch.Tensor]:
        self.current = [deterministic_gate(la, f.binary).to(la.device)
                        for la, f in zip(self.log_alpha, self.families)]
        return self.current

    def open(self) -> None:
        self.current = None

    def probs(self) -> list[torch.Tensor]:
        return [prob_kept(la) for la in self.log_alpha]

    def clamp_(self) -> None:
        with torch.no_grad():
            for la in self.log_alpha:
                la.clamp_(*LOG_ALPHA_RANGE)

    # -- hooks ------------------------------------------------------------------------
    def install(self, model: nn.Module) -> None:
        self.remove_hooks()
        for fi, fam in enumerate(self.families):
            for t in fam.targets:
                mod = model.get_submodule(t.module)
                if t.where == "input":
                    self._hooks.append(mod.register_forward_pre_hook(self._pre_hook(fi, t.owner)))
                else:
                    self._hooks.append(mod.register_forward_hook(self._post_hook(fi, t.owner)))

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _scale(self, fi: int, owner: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        z = self.current[fi].to(x.dtype)
        full = torch.cat([z, torch.ones(1, dtype=z.dtype, device=z.device)])
        return x * full[owner.to(z.device)]

    def _pre_hook(self, fi: int, owner: torch.Tensor):
        def hook(_mod, args):
            if self.current is None:
                return None
            return (self._scale(fi, owner, args[0]), *args[1:])
        return hook

    def _post_hook(self, fi: int, owner: torch.Tensor):
        def hook(_mod, _args, out):
            if self.current is None:
                return None
            return self._scale(fi, owner, out)
        return hook


def init_from_importance(gates: GateSet, scores: list[torch.Tensor], spread: float) -> None:
    """Start each gate's log α from its unit's importance (``init=act``): log α = the
    droprate_init value + spread x z, z the normal quantile of the unit's importance rank
    among the units of its own group (one layer's heads or MLP channels), clipped to log
    α's range. Ranks are not compared across groups: activation energy grows with depth (a
    global ranking would strip the first layers). Every group of a size starts with the
    same log α values, so ``finalize=target``, before training moves anything, removes the
    same share of each layer, least important first."""
    with torch.no_grad():
        for la, score in zip(gates.log_alpha, scores, strict=True):
            n = score.numel()
            rank = torch.empty(n, dtype=torch.float64)
            rank[torch.argsort(score, stable=True)] = torch.arange(n, dtype=torch.float64)
            z = torch.special.ndtri((rank + 0.5) / n).float()
            la.copy_((la + spread * z).clamp(*LOG_ALPHA_RANGE))


def fold_gates(model: nn.Module, gates: GateSet, values: list[torch.Tensor]) -> dict[int, list[int]]:
    """Fold final gate values into the weights they scale; return the units to remove
    (gate 0) per group id. Input gates scale weight columns (exact); output gates are
    binary, so the kept channels need no folding."""
    selection: dict[int, list[int]] = {}
    for fam, z in zip(gates.families, values):
        z = z.detach().cpu().float()
        zero = [u for u in range(len(z)) if float(z[u]) == 0.0]
        if zero:
            selection[fam.group.id] = zero
        for t in fam.targets:
            if t.where != "input":
                continue
            mod = model.get_submodule(t.module)
            full = torch.cat([z, torch.ones(1)])[t.owner]
            with torch.no_grad():
                w = mod.weight
                axis = 0 if type(mod).__name__ == "Conv1D" else 1
                shape = [1, 1]
                shape[axis] = -1
                w.mul_(full.to(w.dtype).view(shape))
    return selection


def values_at_target(gates: GateSet, size: SizeModel, targets: dict[str, float]) -> list[torch.Tensor]:
    """Final gate values that hit the target sparsity exactly (``finalize=target``).

    Units of the head and MLP families are ranked by log α over all layers (per kind when
    that kind has its own target, else together) and zeroed, lowest first, until the
    parameters they own reach the target share of the attention + MLP weights; every group
    keeps at least one unit. Kept units take sigmoid(log α / β) as in ``deterministic_gate``
    (1 in a binary family); hidden families keep the per-group rule (binary)."""
    values = [deterministic_gate(la, f.binary) for la, f in zip(gates.log_alpha, gates.families)]
    own = [k for k in ("heads", "mlp") if k in targets]
    pools = [([k], targets[k] * size.prunable(k)) for k in own]
    rest = [k for k in ("heads", "mlp") if k not in own]
    if rest and "all" in targets:
        pools.append((rest, max(targets["all"] * size.prunable() - sum(n for _, n in pools), 0.0)))
    for kinds, need in pools:
        fams = [i for i, f in enumerate(gates.families) if f.group.kind in kinds]
        las = {i: gates.log_alpha[i].detach().float().cpu() for i in fams}
        for i in fams:  # start from all kept: soft values as trained, or 1 for binary gates
            values[i] = torch.ones_like(las[i]) if gates.families[i].binary \
                else torch.sigmoid(las[i] / BETA)
        units = sorted((float(las[i][u]), i, u) for i in fams
                       for u in range(gates.families[i].group.units))
        left = {i: gates.families[i].group.units for i in fams}
        removed = 0
        for _, i, u in units:
            if removed >= need:
                break
            if left[i] <= 1:
                continue
            values[i][u] = 0.0
            left[i] -= 1
            removed += gates.families[i].group.params_per_unit
    return values
