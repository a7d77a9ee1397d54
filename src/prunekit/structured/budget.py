"""Budgets for structured pruning: an analytic model of MACs and parameters, and a greedy global ranking.

:class:`CostModel` predicts the MACs and parameter count of the model for any choice of pruned units, without running
it: every weight costs ``MACs(dense) * prod over its pruned dimensions of (kept / size)`` — a convolution between
two groups shrinks with both, a depthwise one with its channels only — where the dense MACs per weight come from the
trace (:func:`prunekit.flops.count_macs`'s ``by_param``). MACs of no weight (attention's ``QK^T`` and ``AV``) are
kept as they are, so the prediction is an upper bound that is exact for convolutional and MLP models.

:func:`greedy` removes units across all groups, one chunk at a time, lowest ``score / cost saved`` first (scores
L2-normalised per group, as Molchanov et al. 2017 do for their global ranking), until the budget is met. Chunks keep
every group's channel count a multiple of ``round_to`` — segment by segment where a group concatenates the outputs of
several layers (:func:`unit_segments`), so each layer's width is a multiple too; ``min_channels`` and
``max_sparsity`` bound each group (each segment).

Examples:
    >>> import torch
    >>> from torch import nn
    >>> from prunekit.structured import trace
    >>> model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 2))
    >>> graph = trace(model, torch.randn(1, 10))
    >>> cost = CostModel(model, graph)
    >>> cost.macs(), cost.macs({0: torch.arange(20) < 10})  # half of the first hidden layer
    (640, 340)
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.structured.dependency import DependencyGraph, Group, Member

__all__ = ["Chunk", "CostModel", "LatencyCostModel", "greedy", "unit_segments"]


class CostModel:
    """MACs and parameters of a traced model as a function of the pruned units (see the module docstring).

    Args:
        model: The model the graph was traced from.
        graph: Its :class:`~prunekit.structured.DependencyGraph` (the MACs per weight are those of the trace).
    """

    def __init__(self, model: nn.Module, graph: DependencyGraph) -> None:
        self.graph = graph
        params = dict(model.named_parameters())
        by_param = getattr(graph.state, "macs_by_param", {}) or {}
        self.total_macs = int(graph.state.macs)
        self.total_params = sum(p.numel() for p in params.values())
        # per tensor: (MACs, parameters) at full size and its dims that belong to groups
        self.base: dict[str, tuple[float, float]] = {}
        self.sizes: dict[tuple[str, int], int] = {}
        # per group: [(tensor dim key, positions of each unit along it)]
        self.positions: list[list[tuple[tuple[str, int], torch.Tensor]]] = []
        self.tensor_dims: dict[str, list[tuple[str, int]]] = {}
        for g in graph.groups:
            entries = []
            for m in g.members:
                if m.name not in params:
                    continue  # buffers cost neither MACs nor parameters
                key = (m.name, m.dim)
                counts = torch.bincount(m.unit[m.unit >= 0], minlength=g.num_units).double()
                entries.append((key, counts))
                self.sizes[key] = int(m.unit.numel())
                self.base.setdefault(m.name, (float(by_param.get(m.name, 0)), float(params[m.name].numel())))
                dims = self.tensor_dims.setdefault(m.name, [])
                if key not in dims:
                    dims.append(key)
            self.positions.append(entries)
        self.fixed_macs = self.total_macs - sum(b[0] for b in self.base.values())
        self.fixed_params = self.total_params - sum(b[1] for b in self.base.values())

    def kept(self, pruned: Mapping[int, torch.Tensor] | None = None) -> dict[tuple[str, int], float]:
        """Positions kept along every grouped tensor dimension, for ``pruned`` (group index -> bool per unit)."""
        kept = {k: float(v) for k, v in self.sizes.items()}
        for g, mask in (pruned or {}).items():
            for key, counts in self.positions[g]:
                kept[key] -= float(counts[mask].sum())
        return kept

    def _cost(self, kept: Mapping[tuple[str, int], float], which: int) -> float:
        total = 0.0
        for name, dims in self.tensor_dims.items():
            factor = 1.0
            for key in dims:
                factor *= kept[key] / self.sizes[key]
            total += self.base[name][which] * factor
        return total

    def macs(self, pruned: Mapping[int, torch.Tensor] | None = None) -> int:
        """Predicted MACs with ``pruned`` units removed (exact for MACs on weights; others kept)."""
        return int(round(self.fixed_macs + self._cost(self.kept(pruned), 0)))

    def params(self, pruned: Mapping[int, torch.Tensor] | None = None) -> int:
        """Predicted parameter count with ``pruned`` units removed."""
        return int(round(self.fixed_params + self._cost(self.kept(pruned), 1)))

    def fixed(self, which: str) -> float:
        """The part of the ``which`` cost (``"macs"``, ``"params"``) that no pruning changes."""
        return float(self.fixed_macs if which == "macs" else self.fixed_params)


class LatencyCostModel(CostModel):
    """A :class:`CostModel` that also predicts seconds, from a profile of the dense model's layers.

    Every layer (a module that runs no submodule) keeps its measured time times the share of its work left:

    * a layer with weights (convolution, linear, attention, normalisation): its time is split over its weights in
      proportion to their MACs (normalisation weights, which have none, take it whole), and each part shrinks as
      that weight's MACs do (a convolution between two groups with both, a depthwise one with its channels);
    * a layer without weights (activation, pooling, dropout) whose output channels belong to one group: in
      proportion to the channels left.

    Time in no such layer (the model's own code between layers: additions, concatenations) is kept as it is. The
    prediction ignores that thin layers run below their MAC rate, so it is for *ranking* removals, not for promising
    a latency: ``plan(..., allocation="latency")`` times its candidates (and, for ``latency=``, the pruned model).

    Args:
        model: The model the graph was traced from.
        graph: Its :class:`~prunekit.structured.DependencyGraph`.
        times: Seconds per layer name, with ``""`` for the whole forward pass (as
            :func:`~prunekit.structured.latency.layer_times` returns them).
    """

    def __init__(self, model: nn.Module, graph: DependencyGraph, times: Mapping[str, float]) -> None:
        super().__init__(model, graph)
        self.total_seconds = float(times.get("", sum(t for n, t in times.items() if n)))
        by_param = getattr(graph.state, "macs_by_param", {}) or {}
        seconds: dict[str, float] = {}
        outputs: dict[str, tuple[int, Member]] = {}
        for g in graph.groups:
            for m in g.activations:
                outputs.setdefault(m.name, (g.index, m))
        modules = dict(model.named_modules())
        for layer, t in times.items():
            module = modules.get(layer) if layer else None
            if module is None:
                continue
            prefix = f"{layer}." if layer else ""
            owned = [prefix + n for n, _ in module.named_parameters()]
            weights = {n: float(by_param.get(n, 0)) for n in owned if n in self.base}
            heavy = {n: w for n, w in weights.items() if w > 0}
            if heavy:
                total = sum(heavy.values())
                for n, w in heavy.items():
                    seconds[n] = seconds.get(n, 0.0) + t * w / total
            elif weights:
                n = next(iter(weights))
                seconds[n] = seconds.get(n, 0.0) + t
            elif layer in outputs and not owned:
                g, member = outputs[layer]
                name = f"<output of {layer}>"
                key = (name, member.dim)
                self.sizes[key] = int(member.unit.numel())
                counts = torch.bincount(member.unit[member.unit >= 0], minlength=graph.groups[g].num_units).double()
                self.positions[g].append((key, counts))
                self.tensor_dims[name] = [key]
                self.base[name] = (0.0, 0.0)
                seconds[name] = t
        self.base = {name: (*b[:2], seconds.get(name, 0.0)) for name, b in self.base.items()}
        self.attributed = sum(b[2] for b in self.base.values())
        self.fixed_seconds = max(self.total_seconds - self.attributed, 0.0)

    def seconds(self, pruned: Mapping[int, torch.Tensor] | None = None) -> float:
        """Predicted seconds per forward pass with ``pruned`` units removed (see the class docstring)."""
        return self.fixed_seconds + self._cost(self.kept(pruned), 2)

    def fixed(self, which: str) -> float:
        return self.fixed_seconds if which == "seconds" else super().fixed(which)


@dataclass(frozen=True)
class Chunk:
    """One step of :func:`greedy`: units of one group removed together, and the cost after that step."""

    group: int
    units: tuple[int, ...]
    cost: float


def greedy(graph: DependencyGraph, cost: CostModel, scores: Mapping[int, torch.Tensor], *, which: str, target: float,
           round_to: int = 1, min_channels: int = 1, max_sparsity: float | None = None,
           exhaust: bool = False) -> tuple[dict[int, torch.Tensor], list[Chunk]]:
    """Remove units across groups until the predicted cost is at most ``target``; lowest score per cost saved first.

    Args:
        graph: The dependency graph.
        cost: Its :class:`CostModel`.
        scores: Per group index, normalised scores per unit (higher = kept; ``-inf`` = must go).
        which: ``"macs"``, ``"params"`` or, with a :class:`LatencyCostModel`, ``"seconds"``.
        target: The budget in that unit.
        round_to: Keep every group's channel count (along its narrowest member) a multiple of this, where possible;
            in a group of several segments (:func:`unit_segments`), every segment's count of at least ``round_to``.
        min_channels: Keep at least this many channels in every group and every member tensor dimension.
        max_sparsity: Remove at most this fraction of any group's units (of every segment's).
        exhaust: Go on past the target until nothing more can be removed (to get the whole removal sequence).

    Returns:
        ``pruned`` (group index -> bool per unit) after the steps that reach the target, and every step taken.
    """
    index = ("macs", "params", "seconds").index(which)
    groups = graph.groups
    kept = cost.kept()
    tensor_cost = {}
    for name, dims in cost.tensor_dims.items():
        tensor_cost[name] = cost.base[name][index]
    total = cost.fixed(which) + sum(tensor_cost.values())
    # A slot is a group's segment (see unit_segments): chunks are taken from one slot at a time and, with round_to,
    # keep the slot's channel count a multiple of it, so every layer of a concatenation stays a multiple too.
    slots: list[tuple[Group, torch.Tensor, bool]] = []  # (group, its units in this slot, the group's only slot)
    slots_of: dict[int, list[int]] = {}
    for g in groups:
        if g.index not in scores:
            continue
        parts = unit_segments(g)
        for part in parts:
            slots_of.setdefault(g.index, []).append(len(slots))
            slots.append((g, part, len(parts) == 1))
    order = [part[torch.argsort(scores[g.index][part], stable=True)].tolist() for g, part, _ in slots]
    removed = {g.index: torch.zeros(g.num_units, dtype=torch.bool) for g in groups}
    taken = [0] * len(slots)
    skipped: dict[int, set[int]] = {g.index: set() for g in groups}
    tensors_of = {g.index: sorted({key[0] for key, _ in cost.positions[g.index]}) for g in groups}
    by_tensor: dict[str, set[int]] = {}
    for g, names in tensors_of.items():
        for n in names:
            by_tensor.setdefault(n, set()).add(g)
    version = [0] * len(slots)

    def tensor_value(name: str, changes: Mapping[tuple[str, int], float]) -> float:
        factor = 1.0
        for key in cost.tensor_dims[name]:
            factor *= (kept[key] - changes.get(key, 0.0)) / cost.sizes[key]
        return cost.base[name][index] * factor

    def next_chunk(i: int) -> tuple[list[int], float, float] | None:
        """(units, summed score, cost saved) of slot i's next step, or None if it cannot shrink further."""
        g, part, whole = slots[i]
        n = int(part.numel())
        left = n - taken[i]
        limit = n if max_sparsity is None else math.floor(max_sparsity * n + 1e-9)
        fixed = g.fixed if whole else 0
        min_units = max(1, math.ceil(max(min_channels - fixed, 0) / g.unit_width)) if whole else 1
        most = min(limit - taken[i], left - min_units)
        if most < 1:
            return None
        k = 1
        if round_to > 1 and (whole or n * g.unit_width >= round_to):
            fits = [c for c in range(1, most + 1) if (fixed + (left - c) * g.unit_width) % round_to == 0]
            if not fits:
                return None
            k = fits[0]
        units: list[int] = []
        changes: dict[tuple[str, int], float] = {}
        for u in order[i]:
            if len(units) == k:
                break
            if removed[g.index][u] or u in skipped[g.index]:
                continue
            trial = {key: changes.get(key, 0.0) + float(counts[u]) for key, counts in cost.positions[g.index]}
            if any(kept[key] - trial[key] < min(min_channels, cost.sizes[key]) for key in trial):
                skipped[g.index].add(u)  # would leave a member tensor dimension below min_channels
                continue
            units.append(u)
            changes = trial
        if len(units) < k:
            return None
        saved = sum(tensor_cost[name] - tensor_value(name, changes) for name in tensors_of[g.index])
        score = float(scores[g.index][units].double().sum())
        return units, score, saved

    heap: list[tuple[float, int, int, int]] = []
    counter = 0

    def push(i: int) -> None:
        nonlocal counter
        found = next_chunk(i)
        if found is None:
            return
        _, score, saved = found
        if saved <= 0 and not math.isinf(score):
            return  # costs nothing: removing it does not help the budget
        priority = score / saved if saved > 0 else score
        counter += 1
        heapq.heappush(heap, (priority, counter, i, version[i]))

    for i in range(len(slots)):
        push(i)
    steps: list[Chunk] = []
    reached: dict[int, torch.Tensor] | None = None
    if total <= target:
        reached = {k: v.clone() for k, v in removed.items()}
        if not exhaust:
            return reached, steps
    while heap:
        _, _, i, ver = heapq.heappop(heap)
        if ver != version[i]:
            continue
        found = next_chunk(i)
        if found is None:
            continue
        gi = slots[i][0].index
        units, _, _ = found
        for u in units:
            removed[gi][u] = True
            for key, counts in cost.positions[gi]:
                kept[key] -= float(counts[u])
        taken[i] += len(units)
        touched = set()
        for name in tensors_of[gi]:
            new = tensor_value(name, {})
            total -= tensor_cost[name] - new
            tensor_cost[name] = new
            touched |= by_tensor[name]
        steps.append(Chunk(gi, tuple(units), total))
        for other in touched | {gi}:
            for j in slots_of.get(other, []):
                version[j] += 1
                push(j)
        if reached is None and total <= target + 1e-6:
            reached = {k: v.clone() for k, v in removed.items()}
            if not exhaust:
                break
    if reached is None:
        reached = {k: v.clone() for k, v in removed.items()}
    return reached, steps


def unit_segments(group: Group) -> list[torch.Tensor]:
    """The group's units split by the set of member dimensions they appear in: one segment per producer of a
    concatenation (each DenseNet layer's growth channels, each Inception branch); a plain group is one segment.

    A member dimension's positions are a union of whole segments, so keeping every segment's count a multiple of
    ``round_to`` keeps every layer's width a multiple of it too (rounding the group's total would not).
    """
    counts = torch.stack([torch.bincount(m.unit[m.unit >= 0], minlength=group.num_units) for m in group.members])
    present = (counts > 0).T  # (units, members)
    if present.shape[0] == 0 or bool((present == present[:1]).all()):
        return [torch.arange(group.num_units)]
    _, inverse = torch.unique(present, dim=0, return_inverse=True)
    return [torch.nonzero(inverse == s).squeeze(1) for s in torch.unique(inverse)]


def masks_after(graph: DependencyGraph, steps: Sequence[Chunk], n: int) -> dict[int, torch.Tensor]:
    """``pruned`` after the first ``n`` of ``steps``."""
    pruned = {g.index: torch.zeros(g.num_units, dtype=torch.bool) for g in graph.groups}
    for step in steps[:n]:
        pruned[step.group][list(step.units)] = True
    return pruned
