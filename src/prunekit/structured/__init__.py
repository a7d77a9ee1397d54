"""Structured pruning: remove whole channels, neurons, attention heads and convolution groups, so models really shrink.

The common case::

    plan = prunekit.structured.plan(model, example_inputs, sparsity=0.5)   # inspectable, plain data
    print(plan)                                                             # groups, MACs before -> after
    small = plan.apply(model)                                               # physically smaller, checked

Pieces: :func:`trace` builds the :class:`DependencyGraph` (which tensor slices must go together); criteria
(:mod:`prunekit.structured.criteria`: L1/L2, BatchNorm scale, Molchanov's Taylor, mean activation, APoZ, random)
score its units; :func:`plan` picks what to remove, per group (``sparsity``) or across groups to a budget
(``macs``/``params``/measured ``latency``); :class:`Plan` applies physically or softly, serialises to JSON and
replays; :func:`save`/:func:`load` store a pruned model as its ``state_dict`` plus its plan(s).
:class:`StructuredPruner` prunes gradually or iteratively during training with the core schedules;
:func:`drop_blocks` removes whole residual blocks; :func:`report` compares parameters, MACs and measured latency
before and after. Modules with size attributes or special structure get a :class:`Handler`.

Gradual pruning with fine-tuning::

    pruner = prunekit.structured.StructuredPruner(model, x, macs=0.5, criterion="taylor", data=calibration,
                                                  schedule=prunekit.Gradual(start=0, end=2000, every=200))
    for x, y in loader:
        loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
        pruner.step()                                                       # pruned channels stay zero
    small = pruner.finalize()                                               # physically smaller
    print(prunekit.structured.report(dense_model, small, x))               # MACs, params, measured latency
"""

from prunekit.structured.applying import PlanApplyError
from prunekit.structured.blocks import drop_blocks, residual_blocks
from prunekit.structured.budget import CostModel, LatencyCostModel
from prunekit.structured.criteria import (
    CRITERIA,
    ActivationScore,
    BatchNormScale,
    GroupCriterion,
    RandomGroupScore,
    TaylorScore,
    criterion_names,
    l1_group,
    l2_group,
    normalize,
    per_position,
)
from prunekit.structured.dependency import DependencyGraph, Group, Member, trace
from prunekit.structured.gradual import StructuredPruner
from prunekit.structured.handlers import (
    HANDLERS,
    Handler,
    HandlerRegistry,
    ModuleSizes,
    register_handler,
)
from prunekit.structured.labels import Field
from prunekit.structured.latency import Latency, LatencyTarget, measure_latency
from prunekit.structured.modules import MultiheadAttention
from prunekit.structured.planning import GroupSummary, ModuleUpdate, Plan, Slice, plan
from prunekit.structured.reporting import LayerRow, StructuredReport, report
from prunekit.structured.saving import load, save
from prunekit.structured.tracer import UnsupportedOpError

__all__ = [
    "CRITERIA", "HANDLERS", "ActivationScore", "BatchNormScale", "CostModel", "DependencyGraph", "Field", "Group",
    "GroupCriterion", "GroupSummary", "Handler", "HandlerRegistry", "LayerRow", "Latency", "LatencyCostModel",
    "LatencyTarget", "Member", "ModuleSizes", "ModuleUpdate", "MultiheadAttention", "Plan", "PlanApplyError",
    "RandomGroupScore", "Slice", "StructuredPruner", "StructuredReport", "TaylorScore", "UnsupportedOpError",
    "criterion_names", "drop_blocks", "l1_group", "l2_group", "load", "measure_latency", "normalize", "per_position",
    "plan", "register_handler", "report", "residual_blocks", "save", "trace",
]
