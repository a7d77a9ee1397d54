"""Sensitivity analysis: prune one tensor at a time across a sparsity sweep, without retraining.

Popularised by Distiller (and Han et al. 2015, Fig. 5): the curves show which layers tolerate pruning, and
:meth:`Sensitivity.allocate` turns them into per-tensor sparsities for a :class:`~prunekit.Pruner` (``overrides=``),
pruning robust layers more and sensitive layers less.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.fileformat import atomic_write
from prunekit.pruner import unwrap
from prunekit.scoring import Criterion, get_criterion, score_tensors
from prunekit.select import uniform
from prunekit.targets import check_sparsity, find_prunable
from prunekit.train import measure

__all__ = ["Sensitivity", "sensitivity"]


@dataclass(frozen=True)
class Sensitivity:
    """Per-tensor curves of a metric against that tensor's sparsity (all other tensors dense).

    Attributes:
        sparsities: The sweep, ascending.
        baseline: The metric of the unpruned model.
        curves: ``{tensor name: [metric at each sparsity]}``.
        numel: ``{tensor name: number of elements}``.
        higher_is_better: Whether a larger metric is better (accuracy) or worse (loss, perplexity).
    """

    sparsities: list[float]
    baseline: float
    curves: dict[str, list[float]]
    numel: dict[str, int]
    higher_is_better: bool = True

    def to_dict(self) -> dict[str, object]:
        """Plain-data form (JSON-serialisable)."""
        return asdict(self)

    def drop(self, name: str) -> list[float]:
        """Metric degradation of ``name`` at each sparsity (positive = worse than baseline)."""
        sign = 1.0 if self.higher_is_better else -1.0
        return [sign * (self.baseline - v) for v in self.curves[name]]

    def max_sparsity(self, name: str, max_drop: float) -> float:
        """Largest sparsity of ``name`` whose drop stays within ``max_drop``, interpolating linearly between sweep
        points (the curve is taken as 0 drop at sparsity 0)."""
        xs = [0.0, *self.sparsities]
        ds = [0.0, *self.drop(name)]
        best = 0.0
        for (x0, d0), (x1, d1) in zip(zip(xs, ds), zip(xs[1:], ds[1:])):
            if d1 <= max_drop:
                best = x1
                continue
            if d0 <= max_drop < d1:  # the curve crosses the budget inside this interval
                best = x0 + (x1 - x0) * (max_drop - d0) / (d1 - d0)
            break
        return best

    def allocate(self, sparsity: float) -> dict[str, float]:
        """Per-tensor sparsities reaching an overall ``sparsity`` with the smallest worst per-tensor drop.

        Bisects on the allowed drop δ: each tensor gets the largest sparsity whose drop is at most δ; the smallest δ
        whose allocation reaches the target wins, and the allocation is then scaled down to hit it exactly. Use it
        as ``Pruner(model, sparsity, overrides=curves.allocate(sparsity), allocation="uniform")``.

        Raises:
            ValueError: If even the largest swept sparsity of every tensor cannot reach ``sparsity``.

        Examples:
            >>> s = Sensitivity([0.5, 0.9], 0.9, {"a": [0.9, 0.9], "b": [0.5, 0.1]}, {"a": 100, "b": 100})
            >>> {k: round(v, 3) for k, v in s.allocate(0.5).items()}
            {'a': 0.9, 'b': 0.1}
        """
        target = check_sparsity(sparsity)
        total = sum(self.numel.values())

        def achieved(delta: float) -> tuple[float, dict[str, float]]:
            alloc = {n: self.max_sparsity(n, delta) for n in self.curves}
            return sum(alloc[n] * self.numel[n] for n in alloc) / total, alloc

        top, alloc = achieved(math.inf)
        if top < target:
            raise ValueError(f"the sweep only reaches {top:.2%} overall (max swept sparsity {max(self.sparsities)}); "
                             f"cannot allocate {target:.2%}. Sweep higher sparsities.")
        drops = [d for n in self.curves for d in self.drop(n)]
        lo, hi = min(0.0, *drops), max(0.0, *drops) + 1e-12
        for _ in range(60):
            mid = (lo + hi) / 2
            if achieved(mid)[0] >= target:
                hi = mid
            else:
                lo = mid
        reached, alloc = achieved(hi)
        scale = target / reached if reached > 0 else 0.0
        return {n: v * scale for n, v in alloc.items()}

    def plot(self, path: str | os.PathLike[str], metric: str = "metric") -> None:
        """Save a PNG with one curve per tensor (metric vs that tensor's sparsity)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8, 5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for name, values in self.curves.items():
            ax.plot([0.0, *self.sparsities], [self.baseline, *values], marker="o", ms=3, label=name)
        ax.set_xlabel("sparsity of this tensor (others dense)")
        ax.set_ylabel(metric)
        ax.set_title("sensitivity: one tensor pruned at a time, no retraining")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png"))


def sensitivity(
    model: nn.Module,
    evaluate_fn: Callable[[nn.Module], float],
    sparsities: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95),
    *,
    criterion: str | Criterion = "magnitude",
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    higher_is_better: bool = True,
    progress: bool = False,
) -> Sensitivity:
    """Prune each tensor alone at every sparsity, evaluate, restore; the model is unchanged afterwards.

    Args:
        model: The (trained) model.
        evaluate_fn: ``evaluate_fn(model) -> float`` (e.g. validation accuracy).
        sparsities: The sweep.
        criterion: Importance criterion (see :mod:`prunekit.scoring`).
        include: Globs of tensors to analyse (default Linear/Conv weights).
        exclude: Globs of tensors to skip.
        higher_is_better: False for losses or perplexity.
        progress: Show a progress bar.

    Returns:
        The :class:`Sensitivity` curves.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> x = torch.randn(64, 4)
        >>> ref = model(x).detach()
        >>> curves = sensitivity(model, lambda m: -float((m(x) - ref).pow(2).mean().detach()), [0.5, 0.75])
        >>> sorted(curves.curves), curves.baseline
        (['0.weight', '2.weight'], -0.0)
    """
    model = unwrap(model)
    sweep = sorted(check_sparsity(s, "sweep sparsity") for s in sparsities)
    if not sweep:
        raise ValueError("sparsities is empty; give the sweep, e.g. [0.5, 0.7, 0.9]")
    params = find_prunable(model, include=include, exclude=exclude)
    crit = get_criterion(criterion)

    baseline = measure(evaluate_fn, model)
    curves: dict[str, list[float]] = {}
    bar = tqdm(total=len(params) * len(sweep), desc="sensitivity", disable=not progress, leave=False)
    with torch.no_grad():
        for name, param in params.items():
            original = param.detach().clone()
            scores = score_tensors(crit, {name: param})
            curves[name] = []
            try:
                for s in sweep:
                    param.mul_(uniform(scores, s)[name])
                    curves[name].append(measure(evaluate_fn, model))
                    param.copy_(original)
                    bar.update(1)
            finally:
                param.copy_(original)
    bar.close()
    return Sensitivity(sweep, baseline, curves, {n: p.numel() for n, p in params.items()}, higher_is_better)
