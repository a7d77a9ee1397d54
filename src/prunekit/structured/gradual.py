"""Gradual and iterative structured pruning with the core schedules: soft masks while training, removal at the end.

:class:`StructuredPruner` re-plans at the steps its schedule (:class:`~prunekit.Gradual`, :class:`~prunekit.Iterative`,
:class:`~prunekit.OneShot`, ...) asks for, each time to the schedule's current target, and keeps the pruned channels
at zero in between by feeding the plan's masks (:meth:`~prunekit.structured.Plan.masks`) to a core
:class:`~prunekit.Pruner` with a :class:`~prunekit.Manual` schedule — the same in-place, hook-free masking as
unstructured pruning, so optimizers, ``deepcopy``, ``state_dict`` and checkpoints work as usual. Channels once
pruned stay pruned. :meth:`StructuredPruner.finalize` then removes them physically: a smaller model whose outputs
equal the soft-pruned model's (wherever zeroing is exact, see ``Group.soft_exact``).

Examples:
    >>> import torch
    >>> from torch import nn
    >>> from prunekit import Gradual
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    >>> x = torch.randn(1, 8)
    >>> pruner = StructuredPruner(model, x, 0.5, schedule=Gradual(start=0, end=4, every=2))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> for _ in range(6):
    ...     model(torch.randn(4, 8)).sum().backward(); opt.step(); opt.zero_grad()
    ...     _ = pruner.step()
    >>> int((model[0].weight.abs().sum(1) == 0).sum())  # 16 hidden units zeroed, still in the model
    16
    >>> soft = model(x)
    >>> small = pruner.finalize()  # physically smaller, same outputs
    >>> small[0].out_features, torch.allclose(small(x), soft, atol=1e-6)
    (16, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from prunekit.masks import Mask
from prunekit.pruner import Pruner, glob_escape, unwrap
from prunekit.schedules import Manual, OneShot, Schedule
from prunekit.structured.criteria import (
    GroupCriterion,
    Loss,
    TaylorScore,
    _call,
    _prediction,
    _split_batch,
    _to_device,
    get_criterion,
)
from prunekit.structured.dependency import DependencyGraph, Group, trace
from prunekit.structured.handlers import Handler, HandlerRegistry
from prunekit.structured.planning import (
    Plan,
    _check_allocation,
    _check_targets,
    _choose,
    _finish,
    _registry,
    _with_fallbacks,
)
from prunekit.targets import check_sparsity

__all__ = ["StructuredPruner"]


class _Monotone:
    """A criterion wrapper giving ``-inf`` to units already pruned, so that they stay pruned."""

    def __init__(self, inner: GroupCriterion, pruned: Mapping[int, torch.Tensor]) -> None:
        self.inner = inner
        self.pruned = pruned
        self.name = getattr(inner, "name", None)

    def prepare(self, model: nn.Module, graph: DependencyGraph) -> None:
        prepare = getattr(self.inner, "prepare", None)
        if callable(prepare):
            prepare(model, graph)

    def __call__(self, group: Group, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        scores = self.inner(group, tensors)
        gone = self.pruned.get(group.index)
        if gone is None or not bool(gone.any()) or not isinstance(scores, torch.Tensor):
            return scores
        return torch.where(gone.to(scores.device), torch.full_like(scores.float(), -math.inf), scores.float())

    @property
    def notes(self) -> list[str]:
        return list(getattr(self.inner, "notes", []))


class StructuredPruner:
    """Structured pruning inside training: re-plan on a schedule, keep pruned channels zero, remove them at the end.

    Call :meth:`step` once after every ``optimizer.step()`` (as for :class:`~prunekit.Pruner`; it has the same
    ``step``/``masks``/``apply`` interface, so :func:`prunekit.train.train` drives it). At an update step the
    target is the schedule's: with ``sparsity``, that fraction of each group's units; with a budget
    (``macs``/``params``), the schedule ramps the fraction *removed* from 0 to ``1 - budget`` (so
    :class:`~prunekit.Iterative` removes the same fraction of what is left every round). Then call
    :meth:`finalize` for the physically smaller model (new parameter objects: create a new optimizer to train on).

    Args:
        model: The model, pruned in place (wrappers such as DDP or ``torch.compile`` are looked through).
        example_inputs: Inputs for tracing and checking (batch size 1 is enough).
        sparsity: Final fraction of each group's units to remove (default 0.5 without a budget).
        macs: Final MAC budget (fraction of dense in (0, 1], or an absolute int).
        params: Final parameter budget, likewise.
        allocation: How a budget is spread over the groups at each update: ``"global"`` (default) or ``"uniform"``
            (see :func:`~prunekit.structured.plan`; ``"latency"`` is for one-shot plans).
        schedule: When to re-plan (default :class:`~prunekit.OneShot`: at the first step).
        criterion: As for :func:`~prunekit.structured.plan` (``"taylor"``/``"activation"``/``"apoz"`` need ``data``).
        data: Calibration batches for data-driven criteria; kept and re-used at every update. Without labels the
            distillation target is the dense model's outputs, computed once here.
        loss: Loss of the ``"taylor"`` criterion.
        round_to: Keep channel counts a multiple of this where possible.
        min_channels: Keep at least this many channels per group.
        max_sparsity: With a budget, remove at most this fraction of any group.
        ignore: Modules (globs or types) that keep their shapes.
        leaves: Modules (globs or types) not traced inside.
        handlers: Extra module handlers.

    Attributes:
        plan: The latest :class:`~prunekit.structured.Plan` (None before the first update).
        pruner: The core :class:`~prunekit.Pruner` holding the masks (Manual schedule).
        history: One record per update: step, target, units pruned, predicted MACs and parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        sparsity: float | None = None,
        *,
        macs: float | int | None = None,
        params: float | int | None = None,
        allocation: str | None = None,
        schedule: Schedule | None = None,
        criterion: str | GroupCriterion = "l2",
        data: Iterable[Any] | None = None,
        loss: Loss | None = None,
        round_to: int = 1,
        min_channels: int = 1,
        max_sparsity: float | None = None,
        ignore: Iterable[str | type] = (),
        leaves: Iterable[str | type] = (),
        handlers: Mapping[type | str, Handler] | HandlerRegistry | None = None,
    ) -> None:
        self.model = unwrap(model)
        self.example_inputs = example_inputs
        self.sparsity, _ = _check_targets(sparsity, macs, params, None, round_to, min_channels, max_sparsity)
        self.allocation = _check_allocation(allocation, self.sparsity)
        if self.allocation == "latency":
            raise ValueError("allocation='latency' times candidate models, once; StructuredPruner re-plans at every "
                             "update. Plan once with prunekit.structured.plan(..., allocation='latency'), or use "
                             "allocation='uniform' or 'global' here")
        if callable(self.sparsity):
            raise TypeError("StructuredPruner takes one sparsity for all groups (a float); per-group functions are "
                            "for plan()")
        self.budget = ("macs", macs) if macs is not None else ("params", params) if params is not None else None
        self.schedule = schedule if schedule is not None else OneShot()
        if not isinstance(self.schedule, Schedule):
            raise TypeError(f"schedule must be a prunekit schedule (OneShot, Gradual, ...), got {schedule!r}")
        self.round_to, self.min_channels, self.max_sparsity = round_to, min_channels, max_sparsity
        self.registry = _registry(handlers)
        self.graph = trace(self.model, example_inputs, ignore=ignore, leaves=leaves, handlers=self.registry)
        if not self.graph.groups:
            raise ValueError(f"{type(self.model).__name__} has no prunable channel groups (all are frozen by its "
                             "inputs/outputs or by ignore/leaves)")
        # check now that the pruned model runs, not at finalize after training (and fall back as plan() does)
        probe, self.graph = _with_fallbacks(self.model, example_inputs, self.graph, self._half)
        self.notes: list[str] = probe.notes
        if data is not None and iter(data) is data:  # a one-shot iterator: keep the batches for every update
            data = list(data)
        self.data = data
        self.criterion_name = criterion if isinstance(criterion, str) else getattr(criterion, "name", None)
        if criterion == "taylor":
            criterion = TaylorScore(self._checked(data), loss=loss, teacher=self._teacher(data, loss))
        self.criterion = get_criterion(criterion, data=data, loss=loss)
        names = list(dict.fromkeys(m.name for g in self.graph.groups for m in g.members))
        params_ = dict(self.model.named_parameters())
        self.names = [n for n in names if n in params_]
        self.pruner = Pruner(self.model, 0.0, schedule=Manual(), include=[glob_escape(n) for n in self.names])
        self.pruned: dict[int, torch.Tensor] = {g.index: torch.zeros(g.num_units, dtype=torch.bool)
                                                for g in self.graph.groups}
        self.plan: Plan | None = None
        self.step_count = 0
        self.history: list[dict[str, Any]] = []
        self.finalized = False

    def _half(self, graph: DependencyGraph) -> Plan:
        """A verified plan removing every other unit of every group (a probe that the pruned model runs)."""
        half = {g.index: torch.arange(g.num_units) % 2 == 1 for g in graph.groups}
        return _finish(self.model, self.example_inputs, graph, self.registry, half, [], None, verify=True)

    @staticmethod
    def _checked(data: Any) -> Any:
        if data is None:
            raise ValueError("criterion 'taylor' needs calibration data: pass data=[(inputs, labels), ...]")
        return data

    def _teacher(self, data: Any, loss: Loss | None) -> list[torch.Tensor] | None:
        """The dense model's predictions on unlabeled calibration batches (the distillation targets)."""
        batches = list(data)
        if not batches or any(_split_batch(b)[1] is not None for b in batches):
            return None
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        try:
            with torch.no_grad():
                return [_prediction(_call(self.model, _to_device(_split_batch(b)[0], device))).detach()
                        for b in batches]
        finally:
            for m, mode in modes.items():
                m.training = mode

    # --- the Pruner interface -------------------------------------------------------------------------------------
    @property
    def masks(self) -> Mask:
        """The current keep-masks of the grouped parameters (all True before the first update)."""
        return self.pruner.masks

    def __repr__(self) -> str:
        target = f"{self.budget[0]}={self.budget[1]}" if self.budget else f"sparsity={self.sparsity}"
        pruned = sum(int(v.sum()) for v in self.pruned.values())
        total = sum(v.numel() for v in self.pruned.values())
        return (f"StructuredPruner({target}, schedule={self.schedule}, criterion={self.criterion_name!r}, "
                f"step={self.step_count}, {pruned}/{total} units pruned)")

    def target_at(self, step: int) -> float:
        """Fraction of each group's units (sparsity mode) or of the dense cost (budget mode) removed at ``step``."""
        if self.budget is None:
            return self.schedule.sparsity(step, float(self.sparsity))
        return self.schedule.sparsity(step, self._final_removed())

    def _final_removed(self) -> float:
        which, value = self.budget  # type: ignore[misc]
        if isinstance(value, float):
            return 1.0 - value
        dense = self.graph.state.macs if which == "macs" else sum(p.numel() for p in self.model.parameters())
        return min(max(1.0 - value / dense, 0.0), 0.999)

    def step(self) -> bool:
        """Advance one training step: re-plan if the schedule says so, else re-zero the pruned channels.

        Returns:
            True if the plan was recomputed at this step.
        """
        if self.finalized:
            raise RuntimeError("this StructuredPruner was finalized: the model is physically pruned now")
        t = self.step_count
        updated = self.schedule.updates_at(t)
        if updated:
            self.update(self.target_at(t), _step=t)
        else:
            self.pruner.apply()
        self.step_count = t + 1
        return updated

    def apply(self) -> None:
        """Zero the pruned channels' parameters in place."""
        self.pruner.apply()

    def mask_gradients(self) -> None:
        """Zero the gradients of pruned parameters (optional; see :meth:`prunekit.Pruner.mask_gradients`)."""
        self.pruner.mask_gradients()

    @torch.no_grad()
    def update(self, target: float | None = None, *, _step: int | None = None) -> Plan:
        """Re-plan now to ``target`` (default: the final one), keeping every unit pruned so far, and apply the masks.

        ``target`` is a fraction of each group's units (sparsity mode) or of the dense cost to remove (budget mode).
        """
        if target is None:
            target = self._final_removed() if self.budget is not None else float(self.sparsity)
        check_sparsity(target, "target")
        score = _Monotone(self.criterion, self.pruned)
        kwargs: dict[str, Any] = {"macs": None, "params": None, "latency": None}
        sparsity: float | Callable[[Group], float] | None = None
        if self.budget is None:
            sparsity = target
        else:
            kwargs[self.budget[0]] = 1.0 - target if target > 0 else 1.0
        pruned, notes, cost = _choose(self.model, self.example_inputs, self.graph, self.registry, score, sparsity,
                                      round_to=self.round_to, min_channels=self.min_channels,
                                      max_sparsity=self.max_sparsity, allocation=self.allocation, **kwargs)
        for g, mask in self.pruned.items():  # never bring a pruned unit back (rounding may ask for fewer)
            pruned[g] = mask | pruned[g] if g in pruned else mask.clone()
        self.pruned = {g: m.clone() for g, m in pruned.items()}
        self.plan = _finish(self.model, self.example_inputs, self.graph, self.registry, pruned,
                            self.notes + notes + score.notes, self.criterion_name, verify=False, cost=cost)
        self._set_masks(self.plan)
        self.history.append({"step": _step, "target": target, "pruned": self.plan.pruned_units[0],
                             "macs": self.plan.macs[1] if self.plan.macs else None,
                             "params": self.plan.params[1] if self.plan.params else None})
        return self.plan

    def _set_masks(self, plan: Plan) -> None:
        found = plan.masks(self.model)
        params = dict(self.model.named_parameters())
        masks = {n: found[n] if n in found else torch.ones_like(params[n], dtype=torch.bool) for n in self.names}
        self.pruner.set_masks(masks)

    def finalize(self, *, verify: bool = True) -> nn.Module:
        """Remove the pruned channels physically and return the (same, now smaller) model.

        Parameters are replaced by smaller ones: build a new optimizer to train further. The Pruner is released.
        Without any update yet, the model is returned unchanged.
        """
        if self.finalized:
            return self.model
        if self.plan is not None and self.plan.slices:
            self.pruner.apply()
            self.plan.apply(self.model, example_inputs=self.example_inputs if verify else None, verify=verify)
            self.plan.verified = self.plan.verified or verify
        self.pruner.remove()
        self.finalized = True
        return self.model

    # --- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"pruner": core Pruner state, "step", "pruned": {group: [units]}, "history"}`` (JSON-able but the masks)."""
        return {
            "pruner": self.pruner.state_dict(),
            "step": self.step_count,
            "pruned": {str(g): m.nonzero().squeeze(1).tolist() for g, m in self.pruned.items()},
            "history": list(self.history),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` (the model must be the same soft-pruned architecture)."""
        self.pruner.load_state_dict(state["pruner"])
        self.step_count = int(state["step"])
        self.history = list(state.get("history", []))
        for key, units in state["pruned"].items():
            mask = torch.zeros(self.graph.groups[int(key)].num_units, dtype=torch.bool)
            mask[list(units)] = True
            self.pruned[int(key)] = mask
        if any(bool(m.any()) for m in self.pruned.values()):
            self.plan = _finish(self.model, self.example_inputs, self.graph, self.registry, self.pruned, [],
                                self.criterion_name, verify=False)
