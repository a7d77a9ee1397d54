"""Accuracy-constrained search: the highest sparsity whose accuracy drop stays within a budget.

Given a fine-tuning routine (a fixed budget per trial) and a validation metric, :func:`search` bisects on the
fraction of weights *kept* (geometrically: 1 → 0.5 → 0.25 ... tightens fastest where it matters, at high sparsity),
warm-starting each trial from the best model found so far (weights and mask), so every accepted step is one more
round of iterative pruning. Masks only lose entries along the accepted path; a rejected trial is rolled back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from prunekit.masks import Mask
from prunekit.pruner import Pruner, unwrap
from prunekit.schedules import Manual
from prunekit.scoring import Criterion
from prunekit.train import measure

__all__ = ["SearchResult", "Trial", "search"]


@dataclass(frozen=True)
class Trial:
    """One tried sparsity: the metric after fine-tuning and whether it met the constraint."""

    sparsity: float
    metric: float
    passed: bool


@dataclass
class SearchResult:
    """Result of :func:`search`.

    Attributes:
        sparsity: The highest sparsity that met the constraint (0.0 if none did: the dense model is returned).
        metric: Its validation metric.
        baseline: The dense model's metric.
        found: Whether any sparsity > 0 met the constraint.
        trials: Every trial in order (the trajectory).
        masks: The accepted model's masks.
        message: A one-line summary.
    """

    sparsity: float
    metric: float
    baseline: float
    found: bool
    trials: list[Trial] = field(default_factory=list)
    masks: Mask = field(default_factory=Mask)
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (without the masks)."""
        return {"sparsity": self.sparsity, "metric": self.metric, "baseline": self.baseline, "found": self.found,
                "trials": [asdict(t) for t in self.trials], "message": self.message}


def search(
    model: nn.Module,
    train_fn: Callable[[nn.Module, Pruner], object],
    evaluate_fn: Callable[[nn.Module], float],
    *,
    max_drop: float = 0.005,
    high: float = 0.995,
    tolerance: float = 0.005,
    max_trials: int = 20,
    criterion: str | Criterion = "magnitude",
    allocation: str = "global",
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> SearchResult:
    """Find the highest sparsity whose metric after fine-tuning is within ``max_drop`` of the dense model's.

    Args:
        model: The trained dense model; on return it holds the accepted (pruned, fine-tuned) weights.
        train_fn: ``train_fn(model, pruner)`` fine-tunes with a fixed budget, calling ``pruner.step()`` after every
            optimizer step (e.g. ``lambda m, p: prunekit.train.train(m, data, cfg, pruner=p)``).
        evaluate_fn: ``evaluate_fn(model) -> float``, higher is better (validation accuracy).
        max_drop: Allowed drop of the metric (0.005 = half a point of accuracy).
        high: Upper end of the searched sparsities.
        tolerance: Stop when the bracket is narrower than this (in sparsity).
        max_trials: Hard cap on fine-tuning runs.
        criterion: Importance criterion.
        allocation: Allocation rule (see :data:`prunekit.select.ALLOCATIONS`).
        include: Globs of tensors to prune.
        exclude: Globs of tensors never to prune.

    Returns:
        A :class:`SearchResult`; if no tried sparsity meets the constraint it says so and the model is dense.

    Examples:
        >>> from torch import nn
        >>> model = nn.Linear(100, 1)
        >>> density = lambda m: float((m.weight != 0).float().mean())  # "accuracy" = fraction of weights kept
        >>> result = search(model, lambda m, p: None, density, max_drop=0.3, tolerance=0.01)
        >>> 0.29 <= result.sparsity <= 0.30, result.found, len(result.trials) <= 10
        (True, True, True)
    """
    if not 0.0 <= max_drop:
        raise ValueError(f"max_drop must be >= 0 (an allowed metric drop such as 0.005), got {max_drop!r}")
    if not 0.0 < high < 1.0:
        raise ValueError(f"high must be a sparsity in (0, 1), got {high!r}")
    model = unwrap(model)
    pruner = Pruner(model, high, schedule=Manual(), criterion=criterion, allocation=allocation, include=include,
                    exclude=exclude)

    baseline = measure(evaluate_fn, model)
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    best_masks = pruner.masks.clone()
    best_s, best_metric = 0.0, baseline
    lo_density, hi_density = 1.0, 1.0 - high  # lo passes (dense), hi not known to pass
    trials: list[Trial] = []
    while len(trials) < max_trials and (1.0 - hi_density) - (1.0 - lo_density) > tolerance:
        density = math.sqrt(lo_density * hi_density)
        sparsity = 1.0 - density
        pruner.update(sparsity)
        train_fn(model, pruner)
        pruner.apply()
        metric = measure(evaluate_fn, model)
        passed = metric >= baseline - max_drop
        trials.append(Trial(sparsity=pruner.masks.sparsity(), metric=metric, passed=passed))
        if passed:
            lo_density = density
            best_s, best_metric = pruner.masks.sparsity(), metric
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best_masks = pruner.masks.clone()
        else:
            hi_density = density
            model.load_state_dict(best_state)  # roll back to the last accepted model
            pruner.set_masks(best_masks)
    model.load_state_dict(best_state)
    pruner.set_masks(best_masks)
    found = best_s > 0.0
    message = (f"highest sparsity within {max_drop} of {baseline:.4f}: {best_s:.2%} (metric {best_metric:.4f}) "
               f"after {len(trials)} fine-tuning runs" if found else
               f"no tried sparsity met the constraint (drop <= {max_drop} from {baseline:.4f}); "
               "returning the dense model. Allow a larger drop or a longer fine-tuning budget.")
    return SearchResult(sparsity=best_s, metric=best_metric, baseline=baseline, found=found, trials=trials,
                        masks=best_masks, message=message)
