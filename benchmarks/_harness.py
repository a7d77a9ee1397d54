"""Shared helpers of the accuracy benchmarks (never imported by the package).

- :class:`ResultStore` (from :mod:`prunekit.reproduce.store`): a JSON results file written atomically after every
  finished configuration; finished keys are skipped on a rerun, so a long grid can span several sessions.
- :class:`TorchPruneDriver`: drives ``torch.nn.utils.prune.global_unstructured`` (L1Unstructured, masks applied by its
  forward pre-hooks) at exactly the steps and targets a prunekit schedule gives, so both tools see the same schedule.
- :func:`train_and_prune`: one run (model, data, schedule, tool) -> record with test/val accuracy and counted zeros;
  the package's :func:`prunekit.reproduce.runs.train_and_prune`, plus ``tool="torch"`` (the driver above).
- ``dataset``, ``build_schedule``, ``method_schedule`` come from :mod:`prunekit.reproduce.runs` (re-exported).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from prunekit.reproduce import runs
from prunekit.reproduce.runs import build_schedule, dataset, method_schedule  # noqa: F401 (re-exported)
from prunekit.reproduce.store import ResultStore, command_line, environment  # noqa: F401 (re-exported)
from prunekit.schedules import Schedule

RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------------------------------------------------
class _SparsityView:
    def __init__(self, driver: TorchPruneDriver) -> None:
        self.driver = driver

    def sparsity(self) -> float:
        return self.driver.num_pruned() / self.driver.numel


class TorchPruneDriver:
    """torch.nn.utils.prune driven by a prunekit schedule: ``global_unstructured`` (L1Unstructured) at the same steps.

    Duck-types the part of :class:`prunekit.Pruner` that :func:`prunekit.train.train` uses (``step()`` and
    ``masks.sparsity()``). Each update prunes the exact number of additional weights needed to reach the schedule's
    target (an int ``amount``: torch's container applies it to the weights still unpruned).
    """

    def __init__(self, model: nn.Module, sparsity: float, schedule: Schedule) -> None:
        self.model = model
        self.sparsity = sparsity
        self.schedule = schedule
        self.targets = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        self.numel = sum(m.weight.numel() for m, _ in self.targets)
        self.step_count = 0
        self.masks = _SparsityView(self)

    def num_pruned(self) -> int:
        return sum(int((m.weight_mask == 0).sum()) if hasattr(m, "weight_mask") else 0 for m, _ in self.targets)

    def step(self) -> bool:
        t = self.step_count
        self.step_count += 1
        if not self.schedule.updates_at(t):
            return False
        target = round(self.schedule.sparsity(t, self.sparsity) * self.numel)
        amount = target - self.num_pruned()
        if amount > 0:
            torch_prune.global_unstructured(self.targets, pruning_method=torch_prune.L1Unstructured, amount=amount)
        return True


# --------------------------------------------------------------------------------------------------------------------
def weight_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The effective (masked) weights of every Linear/Conv, for torch-pruned models too."""
    out = []
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            w = m.weight_orig * m.weight_mask if hasattr(m, "weight_mask") else m.weight
            out.append(w.detach())
    return out


def count_zeros(model: nn.Module) -> tuple[int, int]:
    """(zero weights, all weights) over Linear/Conv weights, counted on the model itself."""
    ws = weight_tensors(model)
    return sum(int((w == 0).sum()) for w in ws), sum(w.numel() for w in ws)


def train_and_prune(*, tool: str, **kwargs: Any) -> dict[str, Any]:
    """:func:`prunekit.reproduce.runs.train_and_prune` with one more ``tool``: ``"torch"`` (torch.nn.utils.prune).

    Zeros are counted on the effective weights (``weight_orig * weight_mask`` for torch-pruned layers).
    """
    if tool == "torch":
        return runs.train_and_prune(tool="torch", make_pruner=TorchPruneDriver, weights_fn=weight_tensors, **kwargs)
    return runs.train_and_prune(tool=tool, weights_fn=weight_tensors, **kwargs)


def spread(values: Iterable[float]) -> dict[str, float]:
    v = list(values)
    return {
        "n": len(v), "mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
        "min": min(v), "max": max(v),
    }


def fmt_pct(x: float | None, digits: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"
