"""One classifier run inside a fixed epoch budget: train from scratch (or from given weights) while a pruning method's
schedule runs, then count zeros and evaluate. The reproductions (:mod:`~prunekit.reproduce.gradual_vs_oneshot`,
:mod:`~prunekit.reproduce.large_vs_small`) and the accuracy benchmarks in ``benchmarks/`` share it.

Methods are schedules placed in the epoch budget (:func:`build_schedule`): ``dense`` (no pruning), ``oneshot`` (one
prune, then fine-tuning), ``iterative`` (rounds of prune -> fine-tune that compound to the target) and ``gradual``
(Zhu & Gupta's cubic ramp).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from prunekit.data import load_dataset
from prunekit.models import get_model
from prunekit.pruner import Pruner
from prunekit.schedules import Gradual, Iterative, OneShot, Schedule
from prunekit.train import TrainConfig, evaluate, make_optimizer, train

__all__ = ["METHODS", "build_schedule", "count_zeros", "dataset", "method_schedule", "train_and_prune",
           "weight_tensors"]

#: Pruning methods :func:`build_schedule` knows.
METHODS = ("dense", "oneshot", "iterative", "gradual")

_DATA: dict[tuple[str, str], TensorDataset] = {}


def dataset(name: str, split: str, subset: int | None = None) -> TensorDataset:
    """A registered data set split, loaded once per process; ``subset`` keeps its first N examples."""
    if (name, split) not in _DATA:
        _DATA[name, split] = load_dataset(name, split)
    data = _DATA[name, split]
    if subset:
        data = TensorDataset(*(t[:subset] for t in data.tensors))
    return data


def weight_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The weights of every Linear/Conv2d module (detached)."""
    return [m.weight.detach() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def count_zeros(tensors: Sequence[torch.Tensor]) -> tuple[int, int]:
    """``(zero elements, all elements)`` of ``tensors``, counted on the tensors themselves (not on masks)."""
    return sum(int((w == 0).sum()) for w in tensors), sum(w.numel() for w in tensors)


def build_schedule(method: str, steps_per_epoch: int, *, start: float, end: float, updates_per_epoch: int = 4,
                   exponent: float = 3.0, rounds: int = 5, at: float | None = None) -> Schedule | None:
    """A step-based schedule from positions given in epochs.

    Args:
        method: ``"dense"`` (returns None), ``"oneshot"`` (one prune at epoch ``at``, default ``start``),
            ``"iterative"`` (``rounds`` evenly spaced rounds, the first at ``start`` and the last at ``end``) or
            ``"gradual"`` (cubic ramp from ``start`` to ``end`` with ``updates_per_epoch`` mask updates per epoch).
        steps_per_epoch: Optimizer steps per epoch.
        start, end: Epochs where pruning starts and where it reaches the final sparsity.
        updates_per_epoch, exponent: Gradual ramp settings.
        rounds: Iterative rounds.
        at: One-shot epoch.

    Raises:
        ValueError: Unknown method.

    Examples:
        >>> build_schedule("gradual", 100, start=0, end=2, updates_per_epoch=4)
        Gradual(start=0, end=200, every=25, initial=0.0, exponent=3.0)
        >>> build_schedule("iterative", 100, start=1, end=3, rounds=3)
        Iterative(rounds=3, every=100, start=100)
    """
    if method == "dense":
        return None
    if method == "oneshot":
        return OneShot(at=round((start if at is None else at) * steps_per_epoch))
    if method == "iterative":
        first = round(start * steps_per_epoch)
        every = max(1, round((end - start) * steps_per_epoch / max(rounds - 1, 1)))
        return Iterative(rounds=rounds, every=every, start=first)
    if method == "gradual":
        every = max(1, steps_per_epoch // updates_per_epoch)
        first = round(start * steps_per_epoch)
        n = max(1, round((end - start) * steps_per_epoch / every))
        return Gradual(start=first, end=first + n * every, every=every, exponent=exponent)
    raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")


def method_schedule(method: str, recipe: Any, *, oneshot_at: float = 0.25, rounds: int = 5,
                    iterative_start: float | None = None) -> Callable[[int], Schedule | None]:
    """``steps_per_epoch -> schedule`` for ``method`` inside a :class:`prunekit.recipes.Recipe`'s budget.

    gradual: the recipe's ramp; oneshot: one prune at ``oneshot_at`` (fraction of the epochs); iterative: ``rounds``
    rounds from ``iterative_start`` (fraction of the epochs; default the ramp's start) to the ramp's end; dense: no
    pruning.
    """
    e = recipe.epochs
    first = recipe.start if iterative_start is None else iterative_start
    return lambda spe: build_schedule(
        method, spe, start=(first if method == "iterative" else recipe.start) * e, end=recipe.end * e,
        updates_per_epoch=recipe.updates_per_epoch, exponent=recipe.exponent, rounds=rounds, at=oneshot_at * e)


def train_and_prune(
    *,
    model_name: str,
    data_name: str,
    tool: str,
    sparsity: float,
    seed: int,
    tcfg: TrainConfig,
    schedule_fn: Callable[[int], Schedule | None],
    allocation: str = "global",
    width: float = 1.0,
    train_split: str = "train",
    eval_splits: Sequence[str] = ("test",),
    subset: int | None = None,
    pruner_options: dict[str, Any] | None = None,
    init_state: dict[str, torch.Tensor] | None = None,
    make_pruner: Callable[[nn.Module, float, Schedule], Any] | None = None,
    weights_fn: Callable[[nn.Module], list[torch.Tensor]] = weight_tensors,
) -> dict[str, Any]:
    """Train ``model_name`` from scratch (seed ``seed``) for ``tcfg.epochs`` with a pruning schedule; evaluate.

    The same optimizer, learning-rate schedule, data order and loop (:func:`prunekit.train.train`) serve every tool.

    Args:
        model_name, data_name: Registered model and data set.
        tool: ``"prunekit"`` (a :class:`~prunekit.Pruner`), ``"dense"`` (no pruning) or, with ``make_pruner``, the
            name of another pruning tool.
        sparsity: Target sparsity over the pruned Linear/Conv weights.
        seed: Seed of the initialisation and the data order.
        tcfg: Training settings (epochs, batch size, learning rate, ...).
        schedule_fn: ``steps_per_epoch -> schedule`` (None: no pruning), e.g. from :func:`method_schedule`.
        allocation: Allocation rule of the Pruner.
        width: Width multiplier of the model.
        train_split, eval_splits: Splits to train on and to evaluate (accuracy and loss of each are recorded).
        subset: Train on the first N examples only (quick runs).
        pruner_options: More keyword arguments of the Pruner.
        init_state: A trained state dict to start from instead of a fresh initialisation; if ``tcfg.distill`` is set
            that model is also the distillation teacher.
        make_pruner: ``(model, sparsity, schedule) -> pruner`` for ``tool`` other than prunekit/dense; the object
            needs ``step()`` and ``masks.sparsity()``.
        weights_fn: The weights whose zeros are counted (default: Linear/Conv2d weights).

    Returns:
        A JSON-able record: settings, accuracy/loss per evaluated split, counted weights/non-zeros/sparsity.

    Raises:
        ValueError: Unknown tool.
    """
    if make_pruner is not None and tool in ("prunekit", "dense"):
        raise ValueError(f"make_pruner is for other tools; tool {tool!r} is built in")
    if make_pruner is None and tool not in ("prunekit", "dense"):
        raise ValueError(f"unknown tool {tool!r}; use 'prunekit', 'dense', or pass make_pruner for another tool")
    torch.manual_seed(seed)
    model = get_model(model_name, width=width)
    teacher = None
    if init_state is not None:
        model.load_state_dict(init_state)
        if tcfg.distill:
            teacher = get_model(model_name, width=width)
            teacher.load_state_dict(init_state)
    train_data = dataset(data_name, train_split, subset)
    spe = tcfg.steps_per_epoch(len(train_data))
    schedule = schedule_fn(spe)
    pruner: Any = None
    if schedule is not None and make_pruner is not None:
        pruner = make_pruner(model, sparsity, schedule)
    elif schedule is not None and tool == "prunekit":
        pruner = Pruner(model, sparsity, schedule=schedule, allocation=allocation, **(pruner_options or {}))
    opt, sched = make_optimizer(model, tcfg, spe * tcfg.epochs)
    t0 = time.perf_counter()
    history = train(model, train_data, tcfg, pruner=pruner, progress=False, optimizer=opt, scheduler=sched,
                    teacher=teacher)
    seconds = time.perf_counter() - t0
    zeros, numel = count_zeros(weights_fn(model))
    record: dict[str, Any] = {
        "model": model_name, "width": width, "data": data_name, "tool": tool, "sparsity": sparsity, "seed": seed,
        "train_split": train_split, "epochs": tcfg.epochs, "train_seconds": round(seconds, 1),
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "weights": numel, "nonzero_weights": numel - zeros, "achieved_sparsity": zeros / numel,
        "params_nonzero": sum(int((p != 0).sum()) for p in model.parameters()) if make_pruner is None else None,
        "schedule": schedule.to_dict() if schedule is not None else None,
    }
    for split in eval_splits:
        m = evaluate(model, dataset(data_name, split))
        record[f"{split}_accuracy"] = m.accuracy
        record[f"{split}_loss"] = m.loss
    return record
