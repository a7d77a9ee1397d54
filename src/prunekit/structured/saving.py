"""Store a structurally pruned model without pickling it: its ``state_dict`` plus the plan, in prunekit's file format.

Loading replays the plan on a fresh instance of the model definition (whose tensors have the original shapes) and
then loads the weights strictly, so the file works with any code that can build the original model.

Examples:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> from prunekit.structured import plan
    >>> make = lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> model, x = make(), torch.randn(1, 8)
    >>> p = plan(model, x, sparsity=0.5)
    >>> small = p.apply(model)
    >>> path = save(small, tempfile.mkdtemp() + "/small.safetensors", p)
    >>> again = load(path, make())
    >>> again[0].weight.shape, torch.equal(again(x), small(x))
    (torch.Size([8, 8]), True)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from prunekit.fileformat import FileFormatError, read, write
from prunekit.structured.planning import Plan

__all__ = ["KIND", "load", "save"]

KIND = "structured-model"


def save(model: nn.Module, path: str | os.PathLike[str], plan: Plan | Sequence[Plan]) -> Path:
    """Write ``model``'s ``state_dict`` (already pruned with ``plan``) and ``plan`` to ``path`` atomically.

    The argument order is :func:`prunekit.save`'s (model, then path).

    ``plan`` may be a list of plans applied one after the other (e.g. :func:`~prunekit.structured.drop_blocks`'
    plan, then a channel plan made on the smaller model); :func:`load` replays them in order.

    Raises:
        TypeError: If ``plan`` is not a :class:`Plan` (or a list of them) or ``model`` not a module.
        ValueError: If ``model`` is not the model the (last) plan pruned (e.g. the unpruned one).
    """
    if isinstance(path, nn.Module) and isinstance(model, (str, os.PathLike)):
        raise TypeError("prunekit.structured.save(model, path, plan): the model comes first, then the path "
                        f"(got the path {str(model)!r} first)")
    plans = [plan] if isinstance(plan, Plan) else list(plan) if isinstance(plan, Sequence) else None
    if not plans or not all(isinstance(p, Plan) for p in plans):
        raise TypeError(f"plan must be a prunekit.structured.Plan or a non-empty list of them, got {plan!r:.80}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    tensors = model.state_dict()
    for s in plans[-1].slices:  # the model must be the pruned one: load() rebuilds exactly these shapes
        t = tensors.get(s.name)
        if t is None or t.dim() <= s.dim or t.shape[s.dim] != len(s.keep):
            got = "no such tensor" if t is None else f"shape {tuple(t.shape)}"
            raise ValueError(f"the model is not the one this plan pruned: its {s.name!r} has {got}, the plan keeps "
                             f"{len(s.keep)} of {s.size} along dim {s.dim}. Save the pruned model: "
                             "small = plan.apply(model); prunekit.structured.save(small, path, plan)")
    meta = {"plan": plans[0].to_dict()} if len(plans) == 1 else {"plans": [p.to_dict() for p in plans]}
    return write(path, tensors, meta, kind=KIND)


def load(path: str | os.PathLike[str], model: nn.Module, *, example_inputs: Any = None) -> nn.Module:
    """Prune a fresh ``model`` (original shapes) with the stored plan and load the stored weights into it.

    Args:
        path: A file written by :func:`save`.
        model: A fresh instance of the model definition the plan was made for.
        example_inputs: If given, the pruned model is run once on them to check it (see :meth:`Plan.apply`).

    Returns:
        ``model``, pruned and loaded.

    Raises:
        FileFormatError: If the file is missing, corrupted or not a stored structured model.
        PlanApplyError: If the plan does not fit ``model``.
    """
    tensors, meta = read(path, kind=KIND)
    if "plan" not in meta and "plans" not in meta:
        raise FileFormatError(f"{path} holds no structured-pruning plan")
    plans = [Plan.from_dict(meta["plan"])] if "plan" in meta else [Plan.from_dict(d) for d in meta["plans"]]
    for i, plan in enumerate(plans):
        last = i == len(plans) - 1
        plan.apply(model, example_inputs=example_inputs if last else None, verify=last and example_inputs is not None,
                   quiet_config=True)
    model.load_state_dict(tensors, strict=True)
    return model
