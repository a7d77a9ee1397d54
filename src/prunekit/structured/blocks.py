"""Whole-block pruning: drop the residual blocks whose removal hurts least, measured on calibration data.

A residual block computes ``output = input + f(input)`` (possibly followed by a ReLU, as in ResNet's basic block,
which is the identity on the non-negative input it receives). Removing ``f`` leaves the identity, so the block can
be replaced by ``nn.Identity`` without changing any shape. :func:`residual_blocks` finds such blocks by running
them: a module (not a plain layer) whose output has its input's shape and which returns its input when all its
parameters are zero. :func:`drop_blocks` measures the calibration loss with each candidate bypassed, drops the
least harmful one, and repeats; the result is a :class:`~prunekit.structured.Plan` (plain data: the blocks are
replaced by ``torch.nn.Identity``), applied, saved and replayed like any other plan.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> class Block(nn.Module):
    ...     def __init__(self, scale):
    ...         super().__init__()
    ...         self.fc = nn.Linear(8, 8)
    ...         self.scale = scale
    ...     def forward(self, x):
    ...         return x + self.scale * self.fc(x)
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(Block(1.0), Block(0.01), nn.Linear(8, 3))
    >>> x = torch.randn(1, 8)
    >>> residual_blocks(model, x)
    ['0', '1']
    >>> p = drop_blocks(model, x, [torch.randn(16, 8)], n=1)  # block 1 barely changes its input
    >>> [(u.name, u.replace) for u in p.modules]
    [('1', 'torch.nn.Identity')]
    >>> small = p.apply(model)
    >>> type(small[1]).__name__
    'Identity'
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten

from prunekit.flops import _split_inputs, count_macs, count_params
from prunekit.structured.applying import apply_plan, structural_copy
from prunekit.structured.criteria import (
    LOSSES,
    Loss,
    _call,
    _check_loss,
    _prediction,
    _split_batch,
    _to_device,
)
from prunekit.structured.planning import ModuleUpdate, Plan

__all__ = ["drop_blocks", "residual_blocks"]

#: Plain layers that are never blocks (their output cannot be their input when their parameters are zero).
_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
           nn.Embedding, nn.MultiheadAttention)


def _first_tensor(value: Any) -> torch.Tensor | None:
    return next((t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)), None)


@contextlib.contextmanager
def _first_calls(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, tuple[Any, ...]]]:
    """Record ``(args, kwargs, output)`` of the first call of each named module."""
    seen: dict[str, tuple[Any, ...]] = {}
    handles = []

    def make(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if name not in seen:
                seen[name] = (args, dict(kwargs), output)

        return hook

    try:
        modules = dict(model.named_modules())
        for n in names:
            handles.append(modules[n].register_forward_hook(make(n), with_kwargs=True))
        yield seen
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def residual_blocks(model: nn.Module, example_inputs: Any) -> list[str]:
    """Names of the innermost modules of ``model`` that compute ``input + f(input)`` (maybe then a ReLU).

    A module qualifies if it is not a plain layer (Linear, Conv, norm, embedding, attention), holds a weight, gets
    a floating-point first input (not all zero) whose shape its first output keeps, and returns that input when all
    its parameters are set to zero (checked by calling it on the input it got, with zeros in place of its parameters
    via :func:`torch.func.functional_call`; the model is not changed). Modules containing a qualifying module are
    left out.

    Args:
        model: The model (run in eval mode; modes restored).
        example_inputs: A tensor, a tuple of positional arguments or a dict of keyword arguments.

    Returns:
        Module names in execution order.
    """
    args, kwargs = _split_inputs(example_inputs)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        modules = dict(model.named_modules())
        candidates = [n for n, m in modules.items() if n and not isinstance(m, _LAYERS)
                      and any(p.dim() >= 2 for p in m.parameters())]
        with _first_calls(model, candidates) as calls:
            model(*args, **kwargs)
        found = []
        for name, (call_args, call_kwargs, output) in calls.items():
            x, y = _first_tensor(call_args), _first_tensor(output)
            if x is None or y is None or x.shape != y.shape or not x.is_floating_point() or not bool(x.abs().max() > 0):
                continue
            module = modules[name]
            zeros = {k: torch.zeros_like(v) for k, v in module.named_parameters()}
            zeroed = _first_tensor(functional_call(module, zeros, call_args, call_kwargs, strict=False))
            if zeroed is not None and zeroed.shape == x.shape and float((zeroed - x).abs().max()) <= 1e-5 * float(x.abs().max()):
                found.append(name)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return [n for n in found if not any(o != n and o.startswith(n + ".") for o in found)]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


@contextlib.contextmanager
def _bypassed(model: nn.Module, names: Iterable[str]) -> Iterator[None]:
    """Temporarily replace the named modules by ``nn.Identity`` (restored on exit)."""
    undo = []
    try:
        for name in names:
            parent, attr = _parent(model, name)
            undo.append((parent, attr, parent._modules[attr]))
            parent._modules[attr] = nn.Identity()
        yield
    finally:
        for parent, attr, old in reversed(undo):
            parent._modules[attr] = old


@torch.no_grad()
def drop_blocks(model: nn.Module, example_inputs: Any, data: Iterable[Any], n: int = 1, *,
                blocks: Sequence[str] | None = None, loss: Loss | None = None, batches: int | None = None) -> Plan:
    """Plan the removal of the ``n`` residual blocks whose removal increases the calibration loss least.

    Greedy: each round bypasses every remaining candidate in turn (as ``nn.Identity``, on top of the blocks
    already chosen), measures the mean loss over the calibration batches and chooses the lowest.

    Args:
        model: The model (not changed: candidates are bypassed temporarily).
        example_inputs: Inputs to find the blocks and check the plan with.
        data: Calibration batches, ``(inputs, labels)`` pairs (task loss) or bare inputs (distillation: KL divergence
            to the unpruned model's outputs, or MSE for outputs that are not class scores if ``loss="mse"``).
        n: Number of blocks to drop.
        blocks: Candidate module names (default :func:`residual_blocks`).
        loss: ``"task"``, ``"kl"``, ``"mse"``, ``"hard"`` or ``loss(prediction, target) -> scalar``.
        batches: Use at most this many calibration batches.

    Returns:
        A :class:`~prunekit.structured.Plan` replacing the chosen blocks by ``torch.nn.Identity``; its notes give
        the measured loss of the dense model and after each choice.

    Raises:
        ValueError: If there are fewer than ``n`` candidates, or no calibration data.
    """
    _check_loss(loss)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int (blocks to drop), got {n!r}")
    candidates = list(blocks) if blocks is not None else residual_blocks(model, example_inputs)
    if len(candidates) < n:
        raise ValueError(f"{type(model).__name__} has {len(candidates)} residual blocks ({candidates}); cannot drop "
                         f"{n}. Pass blocks=[...] to name candidates yourself")
    names = dict(model.named_modules())
    unknown = [b for b in candidates if b not in names or not b]
    if unknown:
        raise ValueError(f"blocks {unknown} are not modules of {type(model).__name__}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batches_ = [_split_batch(b) for b in (list(data) if batches is None else list(data)[:batches])]
    if not batches_:
        raise ValueError("drop_blocks needs calibration data: an iterable of (inputs, labels) or bare inputs")
    batches_ = [(_to_device(x, device), _to_device(y, device)) for x, y in batches_]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        dense = [_prediction(_call(model, x)).detach() for x, _ in batches_]

        def measure() -> float:
            total = 0.0
            for (x, y), target in zip(batches_, dense):
                prediction = _prediction(_call(model, x))
                if y is not None:
                    fn = loss if callable(loss) else LOSSES[loss or "task"]
                    total += float(fn(prediction, y))
                else:
                    fn = loss if callable(loss) else LOSSES[loss if loss not in (None, "task") else "kl"]
                    total += float(fn(prediction, target))
            return total / len(batches_)

        chosen: list[str] = []
        base = measure()
        notes = [f"drop_blocks: calibration loss {base:.5g} with every block"]
        for _ in range(n):
            trials = []
            for name in candidates:
                if name in chosen or any(name.startswith(c + ".") for c in chosen):
                    continue
                with _bypassed(model, chosen + [name]):
                    trials.append((measure(), name))
            best_loss, best = min(trials)
            chosen.append(best)
            notes.append(f"drop_blocks: without {best}: loss {best_loss:.5g} (candidates: "
                         + ", ".join(f"{b} {v:.4g}" for v, b in sorted(trials)[:6]) + ")")
        args, kwargs = _split_inputs(example_inputs)
        output = model(*args, **kwargs)  # in eval mode: a model in training mode keeps its BatchNorm statistics
        shapes = [tuple(t.shape) for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
    finally:
        for m, mode in modes.items():
            m.training = mode
    result = Plan([], [ModuleUpdate(b, type(names[b]).__name__, {}, "torch.nn.Identity") for b in chosen],
                  criterion="drop_blocks", output_shapes=shapes)
    result.notes = notes
    result.example_inputs = example_inputs
    small = structural_copy(model)
    macs_after = apply_plan(result, small, example_inputs=example_inputs)
    result.macs = (count_macs(model, example_inputs, per_module=False).total, int(macs_after or 0))
    result.params = (count_params(model), count_params(small))
    return result
