"""Structured-pruning plans: what to remove, as plain data, chosen per group by a criterion.

A :class:`Plan` lists ``(tensor name, dim, kept indices)`` slices and module attribute updates (``out_features``,
``groups``, ``num_heads``, replacement modules), with the MACs and parameters before and after (counted by
:func:`prunekit.flops.count_macs`, the project's one MAC counter). It serialises to JSON and replays on a fresh
instance of the model definition, so a pruned model is stored as its ``state_dict`` plus the plan
(:func:`prunekit.structured.save` / :func:`~prunekit.structured.load`), never as a pickled module.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> x = torch.randn(1, 16)
    >>> p = plan(model, x, sparsity=0.5)
    >>> [(s.name, s.dim, len(s.keep)) for s in p.slices]
    [('0.weight', 0, 16), ('0.bias', 0, 16), ('2.weight', 1, 16)]
    >>> small = p.apply(model)
    >>> small[0].out_features, small[2].weight.shape
    (16, torch.Size([4, 16]))
    >>> Plan.from_json(p.to_json()).slices == p.slices
    True
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from prunekit.flops import count_macs, count_params
from prunekit.masks import Mask
from prunekit.structured.applying import PlanApplyError, apply_plan, structural_copy
from prunekit.structured.budget import Chunk, CostModel, LatencyCostModel, greedy, masks_after, unit_segments
from prunekit.structured.criteria import GroupCriterion, get_criterion, normalize
from prunekit.structured.dependency import DependencyGraph, Group, _registry, trace
from prunekit.structured.rules import _from_torch
from prunekit.structured.handlers import Handler, HandlerRegistry, ModuleSizes
from prunekit.structured.labels import Field
from prunekit.structured.latency import Latency, LatencyTarget, layer_times, measure_latency, parse_seconds
from prunekit.targets import check_sparsity

__all__ = ["GroupSummary", "ModuleUpdate", "Plan", "Slice", "plan"]

FORMAT = "prunekit.structured.plan"
VERSION = 1


@dataclass(frozen=True)
class Slice:
    """Keep only ``keep`` (ascending indices) along ``dim`` of tensor ``name``, whose size there is ``size``."""

    name: str
    dim: int
    size: int
    keep: tuple[int, ...]


@dataclass(frozen=True)
class ModuleUpdate:
    """Set attributes of module ``name`` (of class ``type``), after replacing it by ``replace`` if given."""

    name: str
    type: str
    set: dict[str, Any]
    replace: str | None = None


@dataclass(frozen=True)
class GroupSummary:
    """What the plan does to one group (for reading; replay needs only slices and module updates)."""

    index: int
    modules: tuple[str, ...]
    units: int
    pruned: int
    unit_width: int
    rules: tuple[str, ...]
    soft_exact: bool


class Plan:
    """A structured-pruning plan: plain data, inspectable, serialisable, replayable. Build it with :func:`plan`.

    Attributes:
        slices: Tensor slices to keep, one per pruned tensor dimension.
        modules: Module attribute updates and replacements.
        groups: Per-group summary.
        macs: ``(before, after)`` MACs of one forward pass on the example inputs (None if unknown).
        params: ``(before, after)`` parameter counts.
        output_shapes: Shapes of the model's tensor outputs (checked after applying).
        criterion: Name of the criterion used (None for a callable).
    """

    def __init__(self, slices: Iterable[Slice], modules: Iterable[ModuleUpdate], groups: Iterable[GroupSummary] = (),
                 *, macs: tuple[int, int] | None = None, params: tuple[int, int] | None = None,
                 output_shapes: list[tuple[int, ...]] | None = None, criterion: str | None = None) -> None:
        self.slices = list(slices)
        self.modules = list(modules)
        self.groups = list(groups)
        self.macs = macs
        self.params = params
        self.output_shapes = output_shapes
        self.criterion = criterion
        #: Example inputs the plan was made with (not serialised), used by :meth:`apply` to check the result.
        self.example_inputs: Any = None
        #: Per-operation shapes the pruned model must produce (not serialised), from the trace.
        self.expected_ops: list[tuple[str, str, list[tuple[int, ...]] | None]] | None = None
        #: Remarks on how the plan was made (targets, criterion fallbacks), shown by ``str(plan)``.
        self.notes: list[str] = []
        #: False if the plan was made with ``verify=False`` (MACs and parameters after are then predicted).
        self.verified = True

    # --- applying ------------------------------------------------------------------------------------------------
    def apply(self, model: nn.Module, *, soft: bool = False, example_inputs: Any = None,
              verify: bool = True, quiet_config: bool = False) -> nn.Module:
        """Apply the plan to ``model`` in place and return it.

        Args:
            model: The model the plan was made for, or a fresh instance of its definition with the same
                ``state_dict`` shapes.
            soft: If True, zero the pruned slices of the parameters instead (shapes unchanged; buffers untouched).
                Where ``group.soft_exact`` holds, the soft model computes exactly what the physical one does.
            example_inputs: Inputs for the check run (default: those the plan was made with, if any).
            verify: Run the check after physical pruning: the model runs, its outputs keep their shapes and every
                operation has the shape the plan predicts. Skipped when no example inputs are known.
            quiet_config: For a transformers model, ``model.config`` gets the pruned sizes it can describe
                (uniform FFN width; heads and width where it states ``head_dim``, as Llama does), so
                ``save_pretrained``/``from_pretrained`` work; what it cannot describe (BERT's or GPT-2's removed
                heads, layers that differ) is warned about unless this is True: save those with
                :func:`prunekit.structured.save`.

        Returns:
            ``model``, physically smaller (new ``nn.Parameter`` objects: create optimizers afterwards) or with zeros.

        Raises:
            PlanApplyError: If the plan does not fit the model or the pruned model fails the check (the model is
                then left unchanged).
        """
        apply_plan(self, model, soft=soft, example_inputs=example_inputs, verify=verify,
                   config="off" if soft else "sync" if quiet_config else "warn")
        return model

    def masks(self, model: nn.Module) -> Mask:
        """Boolean keep-masks of the pruned parameters of ``model`` (before applying), e.g. to keep the pruned
        slices at zero while fine-tuning a soft-pruned model."""
        params = dict(model.named_parameters())
        masks: dict[str, torch.Tensor] = {}
        for s in self.slices:
            if s.name not in params:
                continue
            p = params[s.name]
            keep = torch.zeros(s.size, dtype=torch.bool, device=p.device)
            keep[list(s.keep)] = True
            shape = [1] * p.dim()
            shape[s.dim] = s.size
            m = keep.view(shape).expand_as(p)
            masks[s.name] = masks[s.name] & m if s.name in masks else m.clone()
        return Mask(masks)

    # --- reading -------------------------------------------------------------------------------------------------
    @property
    def pruned_units(self) -> tuple[int, int]:
        """``(pruned, total)`` units over all groups."""
        return sum(g.pruned for g in self.groups), sum(g.units for g in self.groups)

    def __repr__(self) -> str:
        pruned, total = self.pruned_units
        return f"Plan({pruned}/{total} units in {len(self.groups)} groups, {len(self.slices)} tensor slices)"

    def __str__(self) -> str:
        pruned, total = self.pruned_units
        lines = [f"Structured pruning plan: {pruned} of {total} units pruned in {len(self.groups)} groups"
                 + (f" (criterion {self.criterion})" if self.criterion else "")]
        if self.macs:
            lines.append(f"MACs {_si(self.macs[0])} -> {_si(self.macs[1])} ({_ratio(*self.macs)})")
        if self.params:
            lines.append(f"parameters {_si(self.params[0])} -> {_si(self.params[1])} ({_ratio(*self.params)})")
        lines.append(f"{'group':>5}  {'units':>6}  {'pruned':>6}  {'width':>5}  {'soft=phys':>9}  rule  modules")
        from prunekit.structured.dependency import _rule_summary

        for g in self.groups:
            mods = ", ".join(g.modules[:4]) + (f", ... (+{len(g.modules) - 4})" if len(g.modules) > 4 else "")
            lines.append(f"{g.index:>5}  {g.units:>6}  {g.pruned:>6}  {g.unit_width:>5}  "
                         f"{'yes' if g.soft_exact else 'no':>9}  {_rule_summary(g.rules)}  {mods}")
        replaced = [u for u in self.modules if u.replace]
        if replaced:
            lines.append("replaced modules: " + ", ".join(f"{u.name} -> {u.replace}" for u in replaced))
        updates = sum(len(u.set) for u in self.modules)
        lines.append(f"module attribute updates: {updates} in {len(self.modules)} modules")
        lines.extend(f"note: {n}" for n in self.notes)
        if not self.verified:
            lines.append("note: not verified (made with verify=False): MACs and parameters after are predicted")
        return "\n".join(lines)

    # --- serialisation -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-able data."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "criterion": self.criterion,
            "macs": list(self.macs) if self.macs else None,
            "params": list(self.params) if self.params else None,
            "output_shapes": [list(s) for s in self.output_shapes] if self.output_shapes is not None else None,
            "slices": [{"name": s.name, "dim": s.dim, "size": s.size, "keep": list(s.keep)} for s in self.slices],
            "modules": [asdict(u) for u in self.modules],
            "groups": [asdict(g) for g in self.groups],
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Rebuild a plan from :meth:`to_dict` data.

        Raises:
            ValueError: If the data is not a prunekit structured plan of a version this prunekit reads.
        """
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise ValueError(f"not a prunekit structured plan (expected format {FORMAT!r})")
        if data.get("version") != VERSION:
            raise ValueError(f"structured plan version {data.get('version')} is not supported by this prunekit "
                             f"(reads version {VERSION}); re-create the plan")
        result = cls(
            [Slice(s["name"], int(s["dim"]), int(s["size"]), tuple(int(i) for i in s["keep"])) for s in data["slices"]],
            [ModuleUpdate(u["name"], u["type"], dict(u["set"]), u.get("replace")) for u in data["modules"]],
            [GroupSummary(g["index"], tuple(g["modules"]), g["units"], g["pruned"], g["unit_width"], tuple(g["rules"]),
                          g["soft_exact"]) for g in data.get("groups", [])],
            macs=tuple(data["macs"]) if data.get("macs") else None,  # type: ignore[arg-type]
            params=tuple(data["params"]) if data.get("params") else None,  # type: ignore[arg-type]
            output_shapes=[tuple(s) for s in data["output_shapes"]] if data.get("output_shapes") is not None else None,
            criterion=data.get("criterion"),
        )
        result.notes = list(data.get("notes", []))
        return result

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))


def _si(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _ratio(before: int, after: int) -> str:
    return f"{before / after:.2f}x fewer" if after else "all removed"


def _count(group: Group, sparsity: float, round_to: int, min_channels: int) -> int:
    """How many of the group's units to prune (rounded: see :func:`plan`'s ``round_to``)."""
    n, width, fixed = group.num_units, group.unit_width, group.fixed
    target = min(n, math.floor(sparsity * n + 0.5))
    min_units = max(1, math.ceil(max(min_channels - fixed, 0) / width))
    most = max(0, n - min_units)
    k = min(target, most)
    return _rounded(n, target, most, fixed, width, round_to, k) if k > 0 else k


def _round_segment(n: int, c: int, width: int, round_to: int) -> int:
    """How many of a segment's ``n`` units to prune, near ``c``, so that the kept width is a multiple of
    ``round_to`` (kept whole when that is nearest), or of a power-of-two fraction of it in a narrower segment."""
    return _rounded(n, c, n - 1, 0, width, round_to, c)


def _rounded(n: int, target: int, most: int, fixed: int, width: int, round_to: int, fallback: int) -> int:
    """The count ``c <= most`` of ``n`` units to prune nearest ``target`` (ties: fewer) with ``fixed + (n - c) *
    width`` a multiple of ``round_to``; where no count fits, of the largest power-of-two fraction of ``round_to``
    that one does (8 of 8 channels rather than 5 with ``round_to=16``); ``fallback`` where none does at all."""
    while round_to > 1:
        fits = [c for c in range(most + 1) if (fixed + (n - c) * width) % round_to == 0]
        if fits:
            return min(fits, key=lambda c: (abs(c - target), c))
        if round_to % 2:  # only exact fractions: 1000 -> 500 -> 250 -> 125, not on to 62, 31, 15
            break
        round_to //= 2
    return fallback


def _even_split(sizes: list[int], k: int) -> list[int]:
    """``k`` split over segments in proportion to their sizes (largest remainder; ties to the earlier segment)."""
    n = sum(sizes)
    exact = [k * s / n for s in sizes]
    out = [math.floor(e) for e in exact]
    for i in sorted(range(len(sizes)), key=lambda i: (-(exact[i] - out[i]), i))[: k - sum(out)]:
        out[i] += 1
    return out


def _select(group: Group, scores: torch.Tensor, k: int, min_channels: int, round_to: int = 1) -> torch.Tensor:
    """Prune the ``k`` lowest-scoring units, skipping any unit whose removal would leave a member tensor dimension
    with fewer than ``min_channels`` positions (a group can span many layers, e.g. a DenseNet block's growth
    channels, and no layer may lose all of its channels).

    Where a group concatenates the outputs of several layers (DenseNet blocks, Inception and Fire modules), each
    layer's segment loses the same fraction, its own lowest-scoring units: ranking scores across layers would empty
    some layers down to one channel and keep others whole, which costs accuracy and runs slowly. With ``round_to``,
    each segment's kept width is rounded to a multiple of it, so every layer reading the concatenation gets a
    rounded width too (``k`` is then met as nearly as that allows).
    """
    counts = torch.stack([torch.bincount(m.unit[m.unit >= 0], minlength=group.num_units) for m in group.members])
    left = torch.tensor([m.unit.numel() for m in group.members])
    floor = torch.clamp(torch.tensor(min_channels), max=left)
    mask = torch.zeros(group.num_units, dtype=torch.bool)
    order = torch.argsort(scores, stable=True)
    segments = unit_segments(group)
    if len(segments) == 1:
        lowest = order[:k]
    else:
        per = _even_split([len(s) for s in segments], k)
        per = [_round_segment(len(seg), c, group.unit_width, round_to) for seg, c in zip(segments, per)]
        lowest = torch.cat([seg[torch.argsort(scores[seg], stable=True)[:c]] for seg, c in zip(segments, per)])
    if bool((left - counts[:, lowest].sum(dim=1) >= floor).all()):  # the common case: no member runs dry
        mask[lowest] = True
        return mask
    taken = 0
    for u in order.tolist():  # a member would run dry: take units one by one, lowest scores first
        if taken == k:
            break
        after = left - counts[:, u]
        if bool((after < floor).any()):
            continue
        left = after
        mask[u] = True
        taken += 1
    return mask


def _budget(value: Any, dense: int, what: str) -> float | None:
    """A MAC or parameter budget: a float in (0, 1] is a fraction of the dense count, an int > 1 an absolute one."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a fraction of the dense count (float in (0, 1]) or an absolute count (int), "
                        f"got {value!r}")
    if isinstance(value, float):
        if not 0 < value <= 1:
            raise ValueError(f"{what}={value!r} as a float is a fraction of the dense model's count and must be in "
                             f"(0, 1]; pass an int for an absolute count")
        return value * dense
    if value < 1:
        raise ValueError(f"{what}={value!r} must be >= 1 as an absolute count")
    return float(value)


def _scores(score: GroupCriterion, group: Group, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    scores = score(group, tensors)
    if not isinstance(scores, torch.Tensor) or scores.shape != (group.num_units,):
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"criterion returned {got} for group {group.index}; expected a tensor of shape "
                         f"({group.num_units},), one score per unit")
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        raise ValueError(f"criterion returned NaN scores for group {group.index} ({group.describe()})")
    return scores.detach().cpu().float()


def plan(
    model: nn.Module,
    example_inputs: Any,
    sparsity: float | Callable[[Group], float] | None = None,
    *,
    macs: float | int | None = None,
    params: float | int | None = None,
    latency: float | str | LatencyTarget | None = None,
    allocation: str | None = None,
    criterion: str | GroupCriterion = "l2",
    data: Iterable[Any] | None = None,
    loss: str | Callable[..., torch.Tensor] | None = None,
    round_to: int = 1,
    min_channels: int = 1,
    max_sparsity: float | None = None,
    ignore: Iterable[str | type] = (),
    leaves: Iterable[str | type] = (),
    handlers: Mapping[type | str, Handler] | HandlerRegistry | None = None,
    graph: DependencyGraph | None = None,
    verify: bool = True,
) -> Plan:
    """Plan structured pruning of ``model``: a fraction of every group's units, or whatever meets a budget.

    Two kinds of target:

    * ``sparsity``: remove that fraction of each group's units (the lowest-scoring ones), group by group.
    * a budget, ``macs=``, ``params=`` or ``latency=``, met in one of three ways (``allocation``):

      - ``"global"`` (default): rank units across all groups by their score per MAC (or parameter) saved, scores
        L2-normalised per group, and remove the lowest until the budget is met
        (:func:`prunekit.structured.budget.greedy`; MACs and parameters predicted analytically, then counted). For
        ``latency`` the same ranking is cut where the pruned model's *measured* latency (median of repeats, see
        :func:`~prunekit.structured.measure_latency`) first meets the target (found by bisection).
      - ``"uniform"``: the same fraction of every group, the smallest that meets the budget (found by bisection on
        the predicted MACs/parameters, or on the measured latency). Every layer keeps the same share of its width,
        which keeps thin, memory-bound layers (depthwise convolutions, squeeze-excitation) from being stripped
        while wide ones stay whole: on CPU that is usually the faster model for the same MACs.
      - ``"latency"``: the fastest model that meets the budget, among measured candidates. The dense model's
        layers are profiled on the example inputs (or the :class:`LatencyTarget`'s inputs and threads), which
        predicts the seconds each unit saves (:class:`~prunekit.structured.budget.LatencyCostModel`). Candidates:
        units ranked by score per second saved (layers slow for their MACs, such as early high-resolution layers,
        pooling and normalisation, shrink first), cut at the budget, with at most half or at most ``max_sparsity``
        of any group; units ranked by seconds saved per MAC saved alone (scores only order units within a group),
        at most half of any group; and the ``"uniform"`` allocation; each with channel counts rounded to
        ``round_to`` and to ``2 * round_to`` (also multiples of ``round_to``; which runs faster depends on the
        kernels; in a concatenation, every producer's part is rounded). Where a
        candidate undershoots the budget, units come back (highest scores first) while the budget holds and the
        work they return is a larger share than the predicted time they add. Each candidate is applied to a copy
        and timed (:func:`~prunekit.structured.measure_latency`; the two fastest timed again), and the fastest is
        kept. The prediction ignores that thin layers run below their MAC rate, hence the measurement. With
        ``latency=`` the ranking is cut where the measured latency meets the target. Profile with the batch size
        you will run.

    Args:
        model: The model (not changed).
        example_inputs: A tensor, a tuple of positional arguments or a dict of keyword arguments (batch size 1 is
            enough), used to trace the model, count MACs and check the pruned model.
        sparsity: Fraction in [0, 1) of each group's units to remove, or ``fn(group) -> fraction`` per group
            (default 0.5 when no budget is given).
        macs: MAC budget: a float in (0, 1] is a fraction of the dense model's MACs, an int an absolute count.
            Where some MACs are carried by no weight (attention's ``QK^T`` and ``AV``, which shrink as heads go),
            the cut is checked by counting the MACs of pruned copies rather than by the prediction alone.
        params: Parameter budget, likewise.
        latency: Latency budget: a fraction of the dense model's measured latency (float in (0, 1]), a time such as
            ``"5ms"``, or a :class:`LatencyTarget` (which also sets the inputs, repeats and threads of the timing).
        allocation: How a budget is spread over the groups: ``"global"`` (default), ``"uniform"`` or
            ``"latency"`` (see above). Only with a budget: ``sparsity=`` is uniform already.
        criterion: ``"l1"``, ``"l2"`` (group weight norms), ``"random"``, ``"bn_scale"``, or, with ``data``,
            ``"taylor"``, ``"activation"``, ``"apoz"``; or a callable ``criterion(group, tensors) -> scores``
            (see :mod:`prunekit.structured.criteria`); lowest scores go.
        data: Calibration batches for data-driven criteria: ``(inputs, labels)`` pairs (task loss) or bare inputs
            (distillation against the model's own outputs).
        loss: Loss of the ``"taylor"`` criterion (see :class:`~prunekit.structured.TaylorScore`).
        round_to: Where possible, keep a multiple of this many channels in each group (e.g. 8 for SIMD kernels);
            with ``sparsity=`` or ``allocation="uniform"``, a group narrower than that keeps a multiple of the
            largest power-of-two fraction of it that fits (8 of 8 channels rather than 5 with ``round_to=16``).
        min_channels: Keep at least this many channels in each group (at least one unit is always kept).
        max_sparsity: With a budget, remove at most this fraction of any group's units (default 0.8, so that the
            cost-aware ranking never strips a cheap-to-remove group to a sliver).
        ignore: Modules (name globs or types) that keep their shapes.
        leaves: Modules (name globs or types) not traced inside; their parameters, inputs and outputs keep their shapes.
        handlers: Extra module handlers ``{class or qualified name: Handler}`` (default: those ``graph`` was traced
            with, else the registered ones).
        graph: A :class:`DependencyGraph` from :func:`trace` of this model, to skip tracing again (``ignore`` and
            ``leaves`` are then those of the trace).
        verify: Apply the plan to a copy and run it (checks the plan, counts MACs exactly). ``False`` skips that
            run, for cheap planning in loops: ``plan.macs``/``plan.params`` are then predicted
            (:class:`~prunekit.structured.budget.CostModel`) and ``plan.verified`` is False.

    Returns:
        The :class:`Plan` (``str(plan)`` shows groups and MACs before -> after).

    Raises:
        TypeError: For arguments of the wrong type.
        ValueError: For an out-of-range sparsity, budget, ``round_to`` or ``min_channels``, both a sparsity and a
            budget, an unknown ``allocation`` (or one without a budget), or scores of the wrong shape.
        UnsupportedOpError: If the model runs an operation prunekit cannot follow (see :func:`trace`).
        PlanApplyError: If the pruned model does not run (the message names the module to give a handler) and
            keeping the channels of ``torch.split``-by-size or the module classes whose code broke whole does not
            mend it. When that does mend it, the plan keeps them and ``plan.notes`` says which and why.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.Conv2d(32, 4, 3))
        >>> p = plan(model, torch.randn(1, 3, 16, 16), macs=0.5, round_to=8)
        >>> p.macs[1] <= 0.5 * p.macs[0], [g.units - g.pruned for g in p.groups]
        (True, [8, 32])
        >>> p = plan(model, torch.randn(1, 3, 16, 16), macs=0.5, allocation="uniform", round_to=8)
        >>> p.macs[1] <= 0.5 * p.macs[0], [g.units - g.pruned for g in p.groups]
        (True, [16, 16])
    """
    sparsity, target_latency = _check_targets(sparsity, macs, params, latency, round_to, min_channels, max_sparsity)
    allocation = _check_allocation(allocation, sparsity)
    score = get_criterion(criterion, data=data, loss=loss)
    registry = graph.handlers if graph is not None and handlers is None else _registry(handlers)
    if graph is None:
        graph = trace(model, example_inputs, ignore=ignore, leaves=leaves, handlers=registry)
    name = criterion if isinstance(criterion, str) else getattr(score, "name", None)

    def make(graph: DependencyGraph) -> Plan:
        pruned, notes, cost = _choose(model, example_inputs, graph, registry, score, sparsity, macs=macs,
                                      params=params, latency=target_latency, round_to=round_to,
                                      min_channels=min_channels, max_sparsity=max_sparsity, allocation=allocation)
        return _finish(model, example_inputs, graph, registry, pruned, notes + list(getattr(score, "notes", [])),
                       name, verify=verify, cost=cost)

    return _with_fallbacks(model, example_inputs, graph, make, verify=verify)[0]


def _with_fallbacks(model: nn.Module, example_inputs: Any, graph: DependencyGraph,
                    make: Callable[[DependencyGraph], Plan], *, verify: bool = True,
                    ) -> tuple[Plan, DependencyGraph]:
    """``make(graph)``; if the pruned model breaks in its check run, ``make`` on graphs that keep more channels:

    0. those that meet an expanded tensor (``expand`` to a size that may be a constant of the code), then the
       fallbacks below on that graph;
    1. those of ``torch.split(x, size)`` whose size no module attribute holds, then of all such splits (the size is
       a constant of the code);
    2. the class whose code broke (the nearest enclosing module not from ``torch``) with its reshapes to its input's
       width tied to the input's channels (an attention block that reshapes its output to ``B, N, C``, ``C`` read
       from its input: its width then shrinks with the residual stream);
    3. the channels of the first operation whose output sizes differ from the prediction (``x.view(B, 16, -1)``
       with a literal 16), then of the next one, up to three;
    4. every module of the class whose code broke kept whole, up to three classes.

    The plan that works gets a note saying what was kept and why. Returns it and the graph it was made on.

    Raises:
        PlanApplyError: The first failure, if no fallback works (or ``verify`` is False).
    """
    try:
        return make(graph), graph
    except PlanApplyError as error:
        first = error
    if not verify:
        raise first
    failure = str(first).split(". ")[0]
    if graph.state.broadcasts_followed and not graph.state.freeze_broadcasts:
        # an expand with a literal size: trace again with every broadcast at its traced size, then the fallbacks below
        conservative = graph.retrace(model, example_inputs, freeze_broadcasts=True)
        done, used = _with_fallbacks(model, example_inputs, conservative, make, verify=verify)
        done.notes.append(f"the pruned model broke ({failure}); keeping the channels that meet an expanded tensor "
                          "(a broadcast whose size may be a constant of the code) mended it")
        return done, used
    fix = ("register a handler for the module whose attributes() returns the sizes its code reads "
           "(prunekit.structured.register_handler)")
    splits = graph.state.size_splits

    def attempt(**retrace: Any) -> tuple[Plan, DependencyGraph] | PlanApplyError:
        fallback = graph.retrace(model, example_inputs, **retrace)
        try:
            return make(fallback), fallback
        except PlanApplyError as error:
            return error

    modes = (["unmatched"] if any(s.attributes or s.lists for s in splits)
             and not all(s.attributes or s.lists for s in splits) else [])
    for mode in modes + (["all"] if splits else []):
        done = attempt(freeze_size_splits=mode)
        if isinstance(done, tuple):
            kept = sorted(_described(splits) - _described(done[1].state.size_splits))
            done[0].notes.append(f"the pruned model broke ({failure}); keeping the channels of torch.split by size "
                                 f"({'; '.join(kept)}) mended it. To prune them too, {fix}")
            return done
    culprit = _culprit(model, first.module)
    done = attempt(tie_input_width=[culprit]) if culprit is not None else first
    if isinstance(done, tuple):
        done[0].notes.append(f"the pruned model broke ({failure}); tying the channels that every {_qualname(culprit)} "
                             "reshapes to its input's width to that input's channels (they shrink together: an "
                             f"attention that reshapes to B, N, C with C read from its input) mended it. To prune them "
                             f"apart, {fix}")
        return done
    last, frozen_ops = first, []
    while last.op is not None and last.op not in frozen_ops and len(frozen_ops) < 3:
        frozen_ops.append(last.op)  # the operation that made other sizes than predicted: keep its channels
        done = attempt(freeze_ops=tuple(frozen_ops))
        if isinstance(done, tuple):
            ops = graph.state.ops
            where = "; ".join(f"{ops[i].op} in {repr(ops[i].module) if ops[i].module else 'the model'}"
                              for i in frozen_ops)
            done[0].notes.append(f"the pruned model broke ({failure}); keeping the channels of {where} (a size "
                                 f"that is a constant of the code, or read from elsewhere) mended it. To prune them "
                                 f"too, {fix}")
            return done
        last = done
    last, ignored = first, []
    while len(ignored) < 3:
        culprit = _culprit(model, last.module)
        if culprit is None or culprit in ignored:
            break
        ignored.append(culprit)
        done = attempt(ignore=ignored)
        if isinstance(done, PlanApplyError):
            last = done
            continue
        done[0].notes.append(f"the pruned model broke ({failure}); keeping every "
                             f"{', '.join(map(_qualname, ignored))} whole mended it. To prune them too, {fix}")
        return done
    raise first


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _described(splits: Iterable[Any]) -> set[str]:
    """``"<module>: split by ..."`` for each recorded ``torch.split(x, size)``."""
    return {f"{s.module or '<model>'}: {s.call}" for s in splits}


def _culprit(model: nn.Module, name: str | None) -> type | None:
    """The class of the nearest module enclosing ``name`` (itself included) whose code is not torch's: where a size
    the plan does not update is read. None for the model itself or an unknown module."""
    parts = name.split(".") if name else []
    while parts:
        try:
            module = model.get_submodule(".".join(parts))
        except AttributeError:
            return None
        if not _from_torch(module):
            return type(module)
        parts.pop()
    return None


def _check_targets(sparsity: Any, macs: Any, params: Any, latency: Any, round_to: Any, min_channels: Any,
                   max_sparsity: Any) -> tuple[Any, LatencyTarget | None]:
    """Validate the targets of :func:`plan`; returns the sparsity (0.5 if nothing is given) and the latency target."""
    budgets = [b for b in (("macs", macs), ("params", params), ("latency", latency)) if b[1] is not None]
    if len(budgets) > 1:
        raise ValueError(f"give one budget, got {[b[0] for b in budgets]}")
    if budgets and sparsity is not None:
        raise ValueError(f"give either sparsity={sparsity!r} (per group) or a budget ({budgets[0][0]}=...), not both; "
                         "with a budget, max_sparsity= caps each group")
    if sparsity is None and not budgets:
        sparsity = 0.5
    if sparsity is not None and not callable(sparsity):
        check_sparsity(sparsity)
    if max_sparsity is not None:
        check_sparsity(max_sparsity, "max_sparsity")
    for value, what in ((round_to, "round_to"), (min_channels, "min_channels")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be a positive int, got {value!r}")
    if latency is None or isinstance(latency, LatencyTarget):
        return sparsity, latency
    if isinstance(latency, str):
        return sparsity, LatencyTarget(seconds=parse_seconds(latency))
    if isinstance(latency, float):
        return sparsity, LatencyTarget(fraction=latency)
    raise TypeError(f"latency must be a fraction of the dense latency (float), a time like '5ms' or a LatencyTarget, "
                    f"got {latency!r}")


ALLOCATIONS = ("global", "uniform", "latency")


def _check_allocation(allocation: Any, sparsity: Any) -> str:
    """Validate ``allocation`` (None -> "global"); it chooses how a budget is spread, so it needs a budget."""
    if allocation is None:
        return "global"
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {list(ALLOCATIONS)}, got {allocation!r}")
    if sparsity is not None:
        raise ValueError(f"allocation={allocation!r} spreads a budget (macs=, params= or latency=) over the groups; "
                         f"sparsity={sparsity!r} already removes that fraction of every group. Give a budget "
                         "instead, or drop allocation=")
    return str(allocation)


def _choose(model: nn.Module, example_inputs: Any, graph: DependencyGraph, registry: HandlerRegistry,
            score: GroupCriterion, sparsity: Any, *, macs: Any, params: Any, latency: LatencyTarget | None,
            round_to: int, min_channels: int, max_sparsity: float | None, allocation: str = "global",
            ) -> tuple[dict[int, torch.Tensor], list[str], CostModel | None]:
    """Which units to prune: ``{group index: bool per unit}``, notes, and the cost model if one was built."""
    prepare = getattr(score, "prepare", None)
    if callable(prepare):
        prepare(model, graph)
    tensors = dict(model.named_parameters())
    pruned: dict[int, torch.Tensor] = {}
    notes: list[str] = []
    if sparsity is not None:
        for g in graph.groups:
            s = check_sparsity(sparsity(g), "sparsity(group)") if callable(sparsity) else float(sparsity)
            k = _count(g, s, round_to, min_channels)
            if k:
                pruned[g.index] = _select(g, _scores(score, g, tensors), k, min_channels, round_to)
        return pruned, notes, None
    cost = CostModel(model, graph)
    if allocation == "latency":
        return _latency_ranked(model, example_inputs, graph, registry, score, tensors, macs=macs, params=params,
                               latency=latency, round_to=round_to, min_channels=min_channels,
                               max_sparsity=0.8 if max_sparsity is None else max_sparsity)
    if allocation == "uniform":
        raw = {g.index: _scores(score, g, tensors) for g in graph.groups}
        pruned, note = _uniform_search(model, example_inputs, graph, registry, cost, raw, macs=macs, params=params,
                                       latency=latency, round_to=round_to, min_channels=min_channels,
                                       max_sparsity=max_sparsity)
        return pruned, [note], cost
    scores = {g.index: normalize(_scores(score, g, tensors)) for g in graph.groups}
    limit = 0.8 if max_sparsity is None else max_sparsity
    if latency is not None:
        _, steps = greedy(graph, cost, scores, which="macs", target=0.0, round_to=round_to, min_channels=min_channels,
                          max_sparsity=limit, exhaust=True)
        pruned, note = _latency_search(model, example_inputs, graph, registry, steps, latency)
        return pruned, [note], cost
    which = "params" if params is not None else "macs"
    dense = cost.total_params if which == "params" else cost.total_macs
    target = float(_budget(params if which == "params" else macs, dense, which))  # type: ignore[arg-type]
    pruned, _ = greedy(graph, cost, scores, which=which, target=target, round_to=round_to,
                       min_channels=min_channels, max_sparsity=limit)
    got = cost.params(pruned) if which == "params" else cost.macs(pruned)
    if which == "macs" and cost.fixed_macs > 0:  # MACs of no weight: count them rather than predict
        pruned, got = _cut_counted(model, example_inputs, graph, registry, cost, scores, pruned, target,
                                   round_to=round_to, min_channels=min_channels, max_sparsity=limit)
    if got > target * (1 + 1e-9):
        notes.append(f"budget {which}={int(target)} cannot be met with min_channels={min_channels}, "
                     f"max_sparsity={limit}: reached {got}")
    notes.append(f"target: {which} <= {int(target)} ({target / dense:.3f} of dense)")
    return pruned, notes, cost


def _finish(model: nn.Module, example_inputs: Any, graph: DependencyGraph, registry: HandlerRegistry,
            pruned: Mapping[int, torch.Tensor], notes: list[str], criterion: str | None, *, verify: bool,
            cost: CostModel | None = None) -> Plan:
    """The :class:`Plan` removing ``pruned`` units, checked on a copy (``verify``) or with predicted counts."""
    pruned = {k: v for k, v in pruned.items() if bool(v.any())}
    summaries = [GroupSummary(g.index, g.modules, g.num_units, int(pruned[g.index].sum()) if g.index in pruned else 0,
                              g.unit_width, g.rules, g.soft_exact) for g in graph.groups]
    result = _make_plan(model, graph, pruned, registry, summaries)
    result.criterion = criterion
    result.notes = list(notes)
    if graph.state.data_dependent:
        result.notes.append(f"the model's sizes depend on the data ({graph.state.data_dependent}): the pruned model "
                            "is checked for its outputs' count and rank and for its channel sizes, not for sizes "
                            "the data decides (detections, masks)")
    if graph.state.unexercised:
        where = ", ".join(repr(m or "<model>") for m in graph.state.unexercised)
        result.notes.append(f"kept the channels that {where} produced on no data (an empty batch, e.g. no "
                            "detections) and that nothing read: what uses them did not run in the trace. Trace with "
                            "inputs that exercise that path (a trained model on a real image) to prune them")
    result.example_inputs = example_inputs
    before = (graph.state.macs, count_params(model))
    if result.slices and verify:  # apply to a copy sharing the tensors: checks the plan and counts what remains
        small = structural_copy(model)
        counted = apply_plan(result, small, example_inputs=example_inputs)
        after = (int(counted), count_params(small))
        del small
    elif result.slices:
        cost = cost or CostModel(model, graph)
        after = (cost.macs(pruned), cost.params(pruned))
        result.verified = False
    else:
        after = before
    result.macs, result.params = (before[0], after[0]), (before[1], after[1])
    return result


def _latency_ranked(model: nn.Module, example_inputs: Any, graph: DependencyGraph, registry: HandlerRegistry,
                    score: GroupCriterion, tensors: Mapping[str, torch.Tensor], *, macs: Any, params: Any,
                    latency: LatencyTarget | None, round_to: int, min_channels: int, max_sparsity: float,
                    ) -> tuple[dict[int, torch.Tensor], list[str], CostModel]:
    """``allocation="latency"``: see :func:`plan`. Returns the chosen units, notes and the cost model."""
    inputs = latency.inputs if latency is not None and latency.inputs is not None else example_inputs
    threads = latency.threads if latency is not None else None
    times = layer_times({"model": model}, inputs, repeats=5, warmup=2, threads=threads)["model"]
    cost = LatencyCostModel(model, graph, times)
    raw = {g.index: _scores(score, g, tensors) for g in graph.groups}  # scored once: ranked and uniform use them
    scores = {g: normalize(v) for g, v in raw.items()}
    profile = (f"profile of the dense model's layers: {cost.total_seconds * 1e3:.3f} ms per call, "
               f"{min(cost.attributed / max(cost.total_seconds, 1e-12), 1.0):.0%} of it in layers that shrink")

    def ranked(cap: float, rounding: int = round_to, by: Mapping[int, torch.Tensor] = scores) -> list[Chunk]:
        return greedy(graph, cost, by, which="seconds", target=0.0, round_to=rounding, min_channels=min_channels,
                      max_sparsity=cap, exhaust=True)[1]

    if latency is not None:
        pruned, note = _latency_search(model, example_inputs, graph, registry, ranked(max_sparsity), latency)
        return pruned, [note, f"allocation 'latency': units ranked by score per second saved ({profile})"], cost
    per_mac = _mac_scores(graph, cost, scores)
    which = "params" if params is not None else "macs"
    dense = cost.total_params if which == "params" else cost.total_macs
    target = float(_budget(params if which == "params" else macs, dense, which))  # type: ignore[arg-type]

    def count(pruned: Mapping[int, torch.Tensor]) -> int:
        return cost.params(pruned) if which == "params" else cost.macs(pruned)

    def cut(steps: Sequence[Chunk]) -> dict[int, torch.Tensor]:
        """The shortest prefix of ``steps`` that meets the budget (all of them if none does)."""
        lo, hi = 0, len(steps)
        if count(masks_after(graph, steps, 0)) <= target:
            return masks_after(graph, steps, 0)
        while hi - lo > 1:  # invariant: the prefix of hi steps meets the budget, that of lo does not (or lo == 0)
            mid = (lo + hi) // 2
            if count(masks_after(graph, steps, mid)) <= target:
                hi = mid
            else:
                lo = mid
        return masks_after(graph, steps, hi)

    # Channel counts that are multiples of 2 * round_to are multiples of round_to too: the coarser rounding is
    # tried as well, since which of the two runs faster depends on the kernels (oneDNN blocks channels by 8 or 16).
    roundings = [round_to, 2 * round_to] if round_to > 1 else [1]
    candidates: dict[str, dict[int, torch.Tensor]] = {}
    for rounding in roundings:
        suffix = f", channels a multiple of {rounding}" if len(roundings) > 1 else ""
        candidates["uniform" + suffix] = _uniform_search(
            model, example_inputs, graph, registry, cost, raw, macs=macs, params=params, latency=None,
            round_to=rounding, min_channels=min_channels, max_sparsity=max_sparsity)[0]
        for cap in sorted({min(0.5, max_sparsity), max_sparsity}):
            candidates[f"ranked, at most {cap:g} of a group" + suffix] = cut(ranked(cap, rounding))
        candidates[f"seconds per MAC, at most {min(0.5, max_sparsity):g} of a group" + suffix] = cut(
            ranked(min(0.5, max_sparsity), rounding, per_mac))
    counting = which == "macs" and cost.fixed_macs > 0  # MACs of no weight (attention): counted below
    if not counting:
        candidates = {k: v for k, v in candidates.items() if count(v) <= target} or candidates
    candidates = {k: _refill(graph, cost, v, raw, which, target, round_to) for k, v in candidates.items()}
    unique: dict[tuple[bytes, ...], str] = {}
    for k, v in candidates.items():  # identical candidates are timed once
        unique.setdefault(tuple(bytes(v[g].numpy()) if g in v else b"" for g in range(len(graph.groups))), k)
    small = {k: apply_plan_copy(_make_plan(model, graph, candidates[k], registry, []), model)
             for k in unique.values()}
    counted: dict[str, int] = {}
    if counting:
        for k in small:
            candidates[k], small[k], counted[k] = _refill_counted(
                model, example_inputs, graph, registry, cost, candidates[k], small[k], raw, target, round_to)
        small = {k: m for k, m in small.items() if counted[k] <= target} or small
    measured = measure_latency(small, inputs, threads=threads, repeats=5, warmup=1)  # a first screen, then
    finalists = sorted(measured, key=lambda k: measured[k].median)[:2]  # the two fastest timed again, longer
    if len(finalists) > 1:  # their samples pooled with the screen's: a burst of noise in one pass weighs less
        again = measure_latency({k: small[k] for k in finalists}, inputs, threads=threads, repeats=10, warmup=1)
        for k, timed in again.items():
            pooled = measured[k].samples + timed.samples
            measured[k] = Latency(statistics.median(pooled), pooled, timed.number)
    best = min(finalists, key=lambda k: measured[k].median)
    notes = [f"target: {which} <= {int(target)} ({target / dense:.3f} of dense)"]
    reached = counted.get(best, count(candidates[best]))
    if reached > target:
        notes.append(f"budget {which}={int(target)} cannot be met with min_channels={min_channels}, "
                     f"max_sparsity={max_sparsity}: reached {reached}")
    notes.append(f"allocation 'latency': the fastest of {len(measured)} candidates measured on the inputs, "
                 + ", ".join(f"{k} {measured[k].median * 1e3:.3f} ms (predicted "
                             f"{cost.seconds(candidates[k]) * 1e3:.3f})" for k in measured)
                 + f"; kept: {best}; {profile}")
    return candidates[best], notes, cost


def _counted(model: nn.Module, example_inputs: Any, graph: DependencyGraph, registry: HandlerRegistry,
             pruned: Mapping[int, torch.Tensor]) -> tuple[nn.Module, int]:
    """The pruned copy for ``pruned`` (the model itself if nothing goes) and its MACs counted on the inputs."""
    small = apply_plan_copy(_make_plan(model, graph, pruned, registry, []), model) if pruned else model
    return small, count_macs(small, example_inputs, per_module=False).total


def _cut_counted(model: nn.Module, example_inputs: Any, graph: DependencyGraph, registry: HandlerRegistry,
                 cost: CostModel, scores: Mapping[int, torch.Tensor], pruned: dict[int, torch.Tensor], target: float,
                 *, round_to: int, min_channels: int, max_sparsity: float, tries: int = 12,
                 ) -> tuple[dict[int, torch.Tensor], int]:
    """The shortest prefix of the global ranking whose *counted* MACs meet ``target`` (``allocation="global"``).

    The ranking is cut where the predicted MACs meet the budget, but MACs of no weight (attention's ``QK^T`` and
    ``AV``) shrink too when heads go, so that cut can land far below the budget (a 0.5 budget gave 0.25 of the
    dense MACs on a small attention model). Shorter prefixes are counted on applied copies (bisection, ``tries``
    counts at most). Returns ``(pruned, counted MACs)``.
    """
    _, counted = _counted(model, example_inputs, graph, registry, pruned)
    if counted >= cost.macs(pruned) or counted > target:
        return pruned, counted  # the prediction was exact, or even the count does not meet the budget
    _, steps = greedy(graph, cost, scores, which="macs", target=0.0, round_to=round_to, min_channels=min_channels,
                      max_sparsity=max_sparsity, exhaust=True)
    hi = next((i + 1 for i, step in enumerate(steps) if step.cost <= target + 1e-6), len(steps))
    lo, best = 0, (pruned, counted)  # invariant: the prefix of hi steps meets the budget, that of lo does not
    for _ in range(tries):
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        trial = masks_after(graph, steps, mid)
        _, n = _counted(model, example_inputs, graph, registry, trial)
        if n <= target:
            hi, best = mid, (trial, n)
        else:
            lo = mid
    return best


def _refill_counted(model: nn.Module, example_inputs: Any, graph: DependencyGraph, registry: HandlerRegistry,
                    cost: LatencyCostModel, pruned: dict[int, torch.Tensor], small: nn.Module,
                    scores: Mapping[int, torch.Tensor], target: float, round_to: int, tries: int = 4,
                    ) -> tuple[dict[int, torch.Tensor], nn.Module, int]:
    """:func:`_refill` against the MACs counted on the pruned copy ``small``, where the prediction overshoots.

    The cost model keeps MACs of no weight as they are (attention's ``QK^T`` and ``AV``), but they shrink with the
    heads or head dimensions removed, so a candidate cut at the predicted budget lands below it (swin_t: 2.08x
    fewer MACs for a 2x budget). The refill is run again with the budget raised by that overshoot, and the result
    counted on its applied copy; where units that come back bring unpredicted MACs too (whole heads) and the count
    exceeds the budget, the raise is halved (bisection, ``tries`` counts at most). Returns ``(pruned, small,
    counted MACs)``: the refilled candidate with the most MACs that meets the budget, or the one given.
    """
    counted = count_macs(small, example_inputs, per_module=False).total
    slack = cost.macs(pruned) - counted
    best = (pruned, small, counted)
    if slack <= 0 or counted >= target:
        return best
    lo, hi, raised = 0.0, float(slack), float(slack)  # a raise of lo meets the budget, one of hi may not
    for _ in range(tries):
        more = _refill(graph, cost, pruned, scores, "macs", target + raised, round_to)
        if sum(int(m.sum()) for m in more.values()) == sum(int(m.sum()) for m in pruned.values()):
            break  # nothing comes back at this raise: none at a smaller one either
        trial, recounted = _counted(model, example_inputs, graph, registry, more)
        if recounted <= target:
            if recounted > best[2]:
                best = (more, trial, recounted)
            lo = raised
        else:
            hi = raised
        if hi - lo < 1.0:
            break
        raised = (lo + hi) / 2
    return best


def _mac_scores(graph: DependencyGraph, cost: CostModel, scores: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Scores that make :func:`greedy` with ``which="seconds"`` go by predicted seconds saved per MAC saved.

    A unit's score is the MACs its removal saves at the dense widths; its importance (``scores``) only orders the
    units within a group. Chunks then go lowest ``MACs / seconds`` first: the layers slowest for their work (GELUs
    and normalisations of wide activations, memory-bound thin layers) shrink first, the fastest way down to a MAC
    budget.
    """
    out: dict[int, torch.Tensor] = {}
    for g in graph.groups:
        saved = torch.zeros(g.num_units, dtype=torch.float64)
        for key, counts in cost.positions[g.index]:
            saved += cost.base[key[0]][0] * counts / cost.sizes[key]
        rank = torch.argsort(torch.argsort(scores[g.index], stable=True), stable=True).double() / max(g.num_units, 1)
        out[g.index] = (saved.clamp(min=1.0) * (1.0 + 1e-3 * rank)).float()
    return out


def _refill(graph: DependencyGraph, cost: LatencyCostModel, pruned: Mapping[int, torch.Tensor],
            scores: Mapping[int, torch.Tensor], which: str, target: float, round_to: int) -> dict[int, torch.Tensor]:
    """Give pruned units back while the budget allows and it does not cost more speed than it gives back work.

    A candidate cut at a budget usually undershoots it (rounding moves groups in steps). Units are restored a step
    at a time (the highest-scoring pruned units of one group, as many as keep its channel count a multiple of
    ``round_to``, else all of them), choosing the step that adds the largest share of ``which`` (``"macs"`` or
    ``"params"``) over the share of predicted seconds it adds, and only while that is positive and the budget holds.
    """
    column = ("macs", "params").index(which)
    count = cost.params if which == "params" else cost.macs
    pruned = {g: m.clone() for g, m in pruned.items() if bool(m.any())}
    stuck: set[int] = set()
    segments = {g.index: unit_segments(g) for g in graph.groups}

    def change(kept: Mapping[tuple[str, int], float], more: Mapping[tuple[str, int], float], i: int) -> float:
        """How much cost ``i`` (0 MACs, 1 parameters, 2 seconds) grows when ``more`` positions come back."""
        total = 0.0
        for name in {key[0] for key in more}:
            before = after = cost.base[name][i]
            for key in cost.tensor_dims[name]:
                before *= kept[key] / cost.sizes[key]
                after *= (kept[key] + more.get(key, 0.0)) / cost.sizes[key]
            total += after - before
        return total

    while True:
        now, seconds = count(pruned), cost.seconds(pruned)
        kept = cost.kept(pruned)
        best: tuple[float, int, torch.Tensor] | None = None
        for g in graph.groups:
            mask = pruned.get(g.index)
            if mask is None or g.index in stuck:
                continue
            for part in segments[g.index]:  # a step stays within one segment, keeping its width rounded
                gone = part[mask[part]]
                if gone.numel() == 0:
                    continue
                left = part.numel() - gone.numel()
                fixed = g.fixed if len(segments[g.index]) == 1 else 0
                k = next((c for c in range(1, gone.numel() + 1)
                          if (fixed + (left + c) * g.unit_width) % round_to == 0), gone.numel())
                back = gone[torch.argsort(scores[g.index][gone].double(), descending=True, stable=True)[:k]]
                more = {key: float(counts[back].sum()) for key, counts in cost.positions[g.index]}
                added = change(kept, more, column)
                if now + added > target:
                    continue
                gain = added / max(now, 1) - change(kept, more, 2) / max(seconds, 1e-12)
                if gain > 0 and (best is None or gain > best[0]):
                    trial = mask.clone()
                    trial[back] = False
                    best = (gain, g.index, trial)
        if best is None:
            return pruned
        previous = pruned[best[1]]
        pruned[best[1]] = best[2]
        if count(pruned) > target:  # the prediction was off by rounding: undo and leave that group as it is
            pruned[best[1]] = previous
            stuck.add(best[1])
        elif not bool(best[2].any()):
            del pruned[best[1]]


def _latency_search(model: nn.Module, example_inputs: Any, graph: DependencyGraph, registry: HandlerRegistry,
                    steps: Sequence[Chunk], target: LatencyTarget) -> tuple[dict[int, torch.Tensor], str]:
    """The shortest prefix of the removal sequence ``steps`` whose measured latency meets ``target``."""
    inputs = target.inputs if target.inputs is not None else example_inputs
    timing = {"repeats": target.repeats, "warmup": target.warmup, "threads": target.threads}
    measured: dict[int, float] = {}

    def seconds(n: int) -> float:
        if n not in measured:
            if n == 0:
                small = model
            else:
                candidate = _make_plan(model, graph, masks_after(graph, steps, n), registry, [])
                small = apply_plan_copy(candidate, model)
            measured[n] = measure_latency(small, inputs, **timing)["model"].median
        return measured[n]

    dense = seconds(0)
    goal = target.seconds if target.seconds is not None else float(target.fraction) * dense
    lo, hi = 0, len(steps)
    if seconds(hi) > goal:  # keep the fastest measured (pruning everything may run no faster: thin layers, noise)
        best = hi if seconds(hi) < dense else 0
        return masks_after(graph, steps, best), (f"latency target {goal * 1e3:.3f} ms not reached: "
                                                 f"{seconds(hi) * 1e3:.3f} ms with everything prunable removed "
                                                 f"(dense {dense * 1e3:.3f} ms); kept "
                                                 + ("that" if best else "the dense model, the faster one"))
    while hi - lo > 1:  # invariant: seconds(hi) <= goal; seconds(lo) > goal (or lo == 0)
        mid = (lo + hi) // 2
        if seconds(mid) <= goal:
            hi = mid
        else:
            lo = mid
    if seconds(0) <= goal:
        hi = 0
    return masks_after(graph, steps, hi), (f"target: latency <= {goal * 1e3:.3f} ms (dense {dense * 1e3:.3f} ms); "
                                           f"measured {seconds(hi) * 1e3:.3f} ms after {hi} of {len(steps)} steps, "
                                           f"{len(measured)} measurements")


def _uniform_search(model: nn.Module, example_inputs: Any, graph: DependencyGraph, registry: HandlerRegistry,
                    cost: CostModel, scores: Mapping[int, torch.Tensor], *, macs: Any, params: Any,
                    latency: LatencyTarget | None, round_to: int, min_channels: int, max_sparsity: float | None,
                    ) -> tuple[dict[int, torch.Tensor], str]:
    """The smallest fraction of every group's units whose removal meets the budget (bisection; ``allocation=
    "uniform"``). The cost only falls as the fraction grows (rounding moves it in steps), so bisection finds it.
    MACs are predicted, or counted on applied copies where some are carried by no weight (attention's matmuls)."""
    cap = 0.95 if max_sparsity is None else max_sparsity

    def masks(s: float) -> dict[int, torch.Tensor]:
        out = {}
        for g in graph.groups:
            k = _count(g, s, round_to, min_channels)
            if k:
                out[g.index] = _select(g, scores[g.index], k, min_channels, round_to)
        return out

    if latency is not None:
        inputs = latency.inputs if latency.inputs is not None else example_inputs
        timing = {"repeats": latency.repeats, "warmup": latency.warmup, "threads": latency.threads}
        measured: dict[float, float] = {}

        def value(s: float) -> float:
            if s not in measured:
                small = model if s == 0 else apply_plan_copy(_make_plan(model, graph, masks(s), registry, []), model)
                measured[s] = measure_latency(small, inputs, **timing)["model"].median
            return measured[s]

        dense = value(0.0)
        goal = latency.seconds if latency.seconds is not None else float(latency.fraction) * dense
        what, unit, scale, steps = "latency", "ms", 1e3, 8
    else:
        which = "params" if params is not None else "macs"
        dense = float(cost.total_params if which == "params" else cost.total_macs)
        goal = float(_budget(params if which == "params" else macs, int(dense), which))  # type: ignore[arg-type]

        counting = which == "macs" and cost.fixed_macs > 0  # MACs of no weight (attention) shrink too: count
        counted: dict[float, float] = {}

        def value(s: float) -> float:
            if not counting:
                return float(cost.params(masks(s)) if which == "params" else cost.macs(masks(s)))
            if s not in counted:
                counted[s] = float(_counted(model, example_inputs, graph, registry, masks(s))[1])
            return counted[s]

        what, unit, scale, steps = which, "", 1.0, 12 if counting else 20
    if value(0.0) <= goal:
        return {}, f"target: {what} <= {goal * scale:.6g}{unit}: met by the dense model"
    if value(cap) > goal:
        return masks(cap), (f"{what} target {goal * scale:.6g}{unit} not reached with allocation='uniform': "
                            f"{value(cap) * scale:.6g}{unit} at the largest fraction per group ({cap}); lower "
                            f"min_channels/round_to or raise max_sparsity")
    lo, hi = 0.0, cap  # invariant: value(lo) > goal >= value(hi)
    for _ in range(steps):
        mid = (lo + hi) / 2
        if value(mid) <= goal:
            hi = mid
        else:
            lo = mid
    return masks(hi), (f"target: {what} <= {goal * scale:.6g}{unit} ({goal / dense:.3f} of dense), allocation "
                       f"'uniform': {hi:.3f} of every group's units, {what} {value(hi) * scale:.6g}{unit}")


def apply_plan_copy(candidate: Plan, model: nn.Module) -> nn.Module:
    """A physically pruned copy of ``model`` that shares its unpruned tensors (no check run)."""
    small = structural_copy(model)
    apply_plan(candidate, small, verify=False)
    return small


def _make_plan(model: nn.Module, graph: DependencyGraph, pruned: Mapping[int, torch.Tensor],
               registry: HandlerRegistry, summaries: list[GroupSummary]) -> Plan:
    slices: list[Slice] = []
    kept: dict[tuple[str, int], list[int]] = {}
    for gi, mask in pruned.items():
        for m in graph.groups[gi].members:
            gone = (m.unit >= 0) & mask[m.unit.clamp(min=0)]
            if bool(gone.any()):
                keep = (~gone).nonzero().squeeze(1).tolist()
                slices.append(Slice(m.name, m.dim, int(m.unit.numel()), tuple(keep)))
                kept[(m.name, m.dim)] = keep
    old: dict[str, tuple[int, ...]] = {}
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        canonical = first.setdefault(id(t), name)
        aliases[name] = canonical
        old[canonical] = tuple(t.shape)
    position = {name: i for i, name in enumerate(old)}
    slices.sort(key=lambda s: (position.get(s.name, len(position)), s.dim))
    new = dict(old)
    for s in slices:
        shape = list(new[s.name])
        shape[s.dim] = len(s.keep)
        new[s.name] = tuple(shape)
    pruned_atom = graph.pruned_atoms(pruned)
    calls = graph.state.calls
    updates = []
    if slices:
        size_attrs = _size_attributes(graph, pruned_atom)
        for name, module in model.named_modules():
            handler = registry.find(module)
            if handler is None and name not in size_attrs:
                continue
            call = calls.get(name)
            inputs = [(shape, graph.shape_after(shape, fields, pruned_atom)) for shape, fields in call.inputs] if call \
                else []
            sizes = ModuleSizes(name, old, new, kept, aliases, inputs)
            if not sizes.changed() and not any(a != b for a, b in inputs) and name not in size_attrs:
                continue
            replace = handler.replacement(module, sizes) if handler else None
            attrs = {**size_attrs.get(name, {}), **(handler.attributes(module, sizes) if handler else {})}
            attrs = {k: v for k, v in attrs.items() if _differs(getattr(module, k, None), v)}
            if attrs or replace:
                updates.append(ModuleUpdate(name, type(module).__name__, _jsonable(attrs), replace))
    outputs = [tuple(t.shape) for t in tree_flatten(graph.state.output)[0] if isinstance(t, torch.Tensor)]
    by_data = graph.state.data_dependent
    if by_data:  # output sizes depend on the data: -1 = any size (the check compares ranks and channel sizes)
        outputs = [tuple(-1 for _ in shape) for shape in outputs]

    def expected(shape: tuple[int, ...], fields: list[Field]) -> tuple[int, ...]:
        after = graph.shape_after(shape, fields, pruned_atom)
        labelled = {d for f in fields for d in f.dims}
        return tuple(n if d in labelled or not by_data else -1 for d, n in enumerate(after))

    result = Plan(slices, updates, summaries, output_shapes=outputs)
    if slices:
        result.expected_ops = [(op.op, op.module, [expected(s, f) for s, f in zip(op.shapes, op.fields)]
                                if op.checked else None) for op in graph.state.ops]
    return result


def _size_attributes(graph: DependencyGraph, pruned_atom: torch.Tensor) -> dict[str, dict[str, Any]]:
    """New values of the module attributes that hold sizes the pruning changes: the piece size of a
    ``torch.split(x, size)`` (see :class:`~prunekit.structured.tracer.SizeSplit`; its kept size times the attribute's
    multiple, or the list of piece sizes) and the sizes of reshapes (:class:`~prunekit.structured.tracer.ViewSize`:
    ``num_heads`` after heads go; a tuple attribute equal to the whole target shape, such as a layer scale's
    ``(dim, 1, 1)``, becomes the new shape). An attribute is updated when the dimensions whose size it equals
    shrink to one new size. Where it also equals a dimension that keeps its size (``num_heads == 3`` beside the
    literal 3 of q, k, v; ``head_dim == 4`` beside 4 heads), its name decides: a head count (``*head*`` without
    ``dim``/``size``) follows the heads, anything else stays. Otherwise it is left alone, and the check run names the
    module if that was wrong."""
    changed: dict[tuple[str, str], set[int]] = {}
    stays: set[tuple[str, str]] = set()
    for split in graph.state.size_splits:
        piece = split.grid[0]
        kept = int(((piece < 0) | ~pruned_atom[piece.clamp(min=0)]).sum())
        if kept == piece.numel():
            continue
        for attr, multiple in split.attributes.items():
            changed.setdefault(_owner(split.module, attr), set()).add(multiple * kept)
        for attr in split.lists:
            changed.setdefault((split.module, attr), set()).add((kept,) * split.grid.shape[0])
    calls = graph.state.calls

    def owner(module: str, attr: str) -> tuple[str, str] | None:
        # a child's attribute counts from its parent's reshapes only if the child's own forward never ran (the
        # parent called another method of it): otherwise its own reshapes speak for it, and a parent's tensor of
        # the same size (a block's residual stream as wide as its attention) says nothing about it
        key = _owner(module, attr)
        return None if "." in attr and key[0] in calls else key

    for view in graph.state.view_sizes:
        try:
            new = graph.shape_after(view.shape, view.fields, pruned_atom)
        except ValueError:
            continue
        for d, attrs in view.attributes.items():
            for key in filter(None, (owner(view.module, attr) for attr in attrs)):
                if new[d] != view.shape[d]:
                    changed.setdefault(key, set()).add(new[d])
                else:
                    stays.add(key)
        if new != view.shape:
            for key in filter(None, (owner(view.module, attr) for attr in view.shapes)):
                changed.setdefault(key, set()).add(tuple(new))
    out: dict[str, dict[str, Any]] = {}
    for (module, attr), values in changed.items():
        name = attr.lower()
        head_count = "head" in name and "dim" not in name and "size" not in name
        if len(values) == 1 and ((module, attr) not in stays or head_count):
            out.setdefault(module, {})[attr] = values.pop()
    return out


def _owner(module: str, attr: str) -> tuple[str, str]:
    """``("blocks.0.attn", "rel_pos.bias_shape")`` -> ``("blocks.0.attn.rel_pos", "bias_shape")``."""
    child, _, attr = attr.rpartition(".")
    return (f"{module}.{child}" if module else child) if child else module, attr


def _differs(current: Any, value: Any) -> bool:
    if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
        return list(current) != list(value)
    return current != value


def _jsonable(attrs: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in attrs.items():
        if isinstance(v, tuple):
            v = list(v)
        json.dumps(v)  # raises TypeError for values a plan cannot store
        out[k] = v
    return out
