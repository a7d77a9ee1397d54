"""Recommended recipes: the settings prunekit uses by default to train-and-prune a model within a training budget.

A :class:`Recipe` is plain data: the training hyper-parameters (:class:`~prunekit.train.TrainConfig`) and the
pruning schedule/allocation (:class:`~prunekit.config.PruneConfig`), with the schedule expressed as *fractions of the
epoch budget*, so the same recipe scales to any number of epochs. :func:`small_classifier` is the default for
"train a small classifier from scratch and prune it to a target sparsity in N epochs"; it was chosen on the MNIST
validation split (never the test set) by ``benchmarks/lenet300_accuracy.py --search``, whose log is
``benchmarks/results/lenet300_recipe_search.json``.

Examples:
    >>> r = small_classifier(epochs=20)
    >>> r.train_config(seed=1).epochs
    20
    >>> cfg = r.prune_config(0.98)
    >>> cfg.sparsity, cfg.schedule
    (0.98, 'gradual')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from prunekit.config import PruneConfig, build_schedule
from prunekit.pruner import Pruner
from prunekit.select import ALLOCATIONS
from prunekit.train import TrainConfig

__all__ = ["Recipe", "from_trained", "small_classifier"]


def _f(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Recipe:
    """Training and gradual-pruning settings for one run of ``epochs`` epochs.

    The Zhu & Gupta ramp runs from ``start * epochs`` to ``end * epochs`` (fractions of the budget); the epochs after
    ``end`` fine-tune at the final sparsity while the one-cycle learning rate anneals.
    """

    epochs: int = _f(20, "total epochs: dense phase + pruning ramp + fine-tuning tail")
    lr: float = _f(0.1, "peak learning rate of the one-cycle schedule")
    momentum: float = _f(0.9, "SGD Nesterov momentum")
    weight_decay: float = _f(0.0, "L2 penalty")
    label_smoothing: float = _f(0.0, "cross-entropy label smoothing")
    batch_size: int = _f(128, "examples per optimizer step")
    allocation: str = _f("global", "how sparsity is spread over tensors")
    start: float = _f(0.0, "fraction of the epochs at which the pruning ramp starts")
    end: float = _f(0.5, "fraction of the epochs at which the final sparsity is reached")
    updates_per_epoch: int = _f(4, "mask updates per epoch during the ramp")
    exponent: float = _f(3.0, "exponent of the ramp (3 = Zhu & Gupta cubic)")
    distill: float = _f(0.0, "weight of distillation from the dense model (recipes that start from a trained model)")
    temperature: float = _f(4.0, "distillation temperature")

    def __post_init__(self) -> None:
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}; choose one of {sorted(ALLOCATIONS)}")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(
                f"need 0 <= start < end <= 1 (fractions of the epoch budget), got start={self.start}, end={self.end}"
            )
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")

    def train_config(self, seed: int = 0) -> TrainConfig:
        """The :class:`TrainConfig` of this recipe."""
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum,
                           weight_decay=self.weight_decay, label_smoothing=self.label_smoothing, seed=seed,
                           distill=self.distill, temperature=self.temperature)

    def prune_config(self, sparsity: float, **changes: Any) -> PruneConfig:
        """The :class:`PruneConfig` (gradual schedule, epochs from the fractions) for a target ``sparsity``."""
        cfg = PruneConfig(sparsity=sparsity, allocation=self.allocation, schedule="gradual",
                          start=self.start * self.epochs, end=self.end * self.epochs,
                          updates_per_epoch=self.updates_per_epoch, exponent=self.exponent)
        return dataclasses.replace(cfg, **changes) if changes else cfg

    def pruner(self, model: nn.Module, sparsity: float, steps_per_epoch: int, **options: Any) -> Pruner:
        """A :class:`Pruner` for ``model`` following this recipe (``options`` go to :class:`Pruner`)."""
        cfg = self.prune_config(sparsity)
        return Pruner(model, sparsity, schedule=build_schedule(cfg, steps_per_epoch), allocation=self.allocation,
                      **options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        return cls(**data)


def small_classifier(epochs: int = 20) -> Recipe:
    """The default recipe to train a small classifier from scratch and prune it gradually within ``epochs`` epochs.

    Chosen on the MNIST validation split with LeNet-300-100 (see the module docstring): ERK allocation (small layers,
    here the output layer, stay denser), a cubic ramp over the first half of the budget with 20 mask updates per
    epoch, then fine-tuning while the one-cycle learning rate anneals; label smoothing 0.1.
    """
    return Recipe(epochs=epochs, allocation="erk", start=0.0, end=0.5, updates_per_epoch=20, label_smoothing=0.1)


def from_trained(epochs: int = 10) -> Recipe:
    """The default recipe to prune a *trained* classifier within ``epochs`` epochs of fine-tuning.

    Start from the dense model and let it teach its pruned self (knowledge distillation, weight 0.9, temperature 4):
    a cubic ramp over the first 60% of the epochs with 20 mask updates per epoch, ERK allocation, SGD + Nesterov
    with a one-cycle learning rate peaking at 0.05. With a 10-epoch dense run this is the 2x-dense budget of
    ``benchmarks/lenet300_accuracy.py``. Chosen on the MNIST validation split (LeNet-300-100 pruned to 99.5%) against
    variants without distillation, with other temperatures, weights, learning rates, ramp ends and shapes, mask
    update rates, batch sizes, weight decay and allocations (none scored higher):
    ``benchmarks/lenet300_distill_search.py``, results in ``benchmarks/results/lenet300_distill_search.md``.

    Examples:
        >>> r = from_trained()
        >>> r.train_config().distill, r.prune_config(0.99).end
        (0.9, 6.0)
    """
    return Recipe(epochs=epochs, lr=0.05, allocation="erk", start=0.0, end=0.6, updates_per_epoch=20, distill=0.9,
                  temperature=4.0)
