"""Measured CPU latency: several models timed in one process, interleaved, medians of repeats.

Latency on a shared machine drifts with the load, so models are never timed one after the other: every repeat runs
each model once, in an order that rotates from repeat to repeat, and the medians are compared. Each call runs under
``torch.inference_mode`` with a fixed number of intra-op threads (restored afterwards). Calls faster than about a
millisecond are timed in loops of ``number`` calls (chosen during warm-up, the same for every model), so timer
resolution does not dominate.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> wide, narrow = nn.Linear(256, 256), nn.Linear(256, 16)
    >>> times = measure_latency({"wide": wide, "narrow": narrow}, torch.randn(8, 256), repeats=5, warmup=1)
    >>> sorted(times), times["wide"].repeats
    (['narrow', 'wide'], 5)
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

from prunekit.flops import _split_inputs

__all__ = ["Latency", "LatencyTarget", "layer_times", "measure_latency", "parse_seconds"]


@dataclass(frozen=True)
class Latency:
    """Timings of one model: ``median`` seconds per call, and every sample (seconds per call, one per repeat)."""

    median: float
    samples: tuple[float, ...]
    number: int = 1

    @property
    def repeats(self) -> int:
        return len(self.samples)

    def to_dict(self) -> dict[str, Any]:
        return {"median": self.median, "samples": list(self.samples), "number": self.number}


@dataclass(frozen=True)
class LatencyTarget:
    """A latency budget for :func:`~prunekit.structured.plan`: a fraction of the dense model's measured latency, or
    an absolute time, measured as :func:`measure_latency` does.

    Attributes:
        fraction: Target as a fraction of the dense latency, in (0, 1] (0.5 = twice as fast).
        seconds: Absolute target in seconds (instead of ``fraction``).
        inputs: Inputs to time with (default: the plan's example inputs).
        repeats: Repeats per measurement (median taken).
        warmup: Warm-up calls per model.
        threads: Intra-op threads.
    """

    fraction: float | None = None
    seconds: float | None = None
    inputs: Any = field(default=None, compare=False)
    repeats: int = 10
    warmup: int = 3
    threads: int = 2

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.seconds is None):
            raise ValueError("LatencyTarget needs exactly one of fraction= (of the dense latency) or seconds=")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"latency fraction must be in (0, 1] (0.5 = twice as fast), got {self.fraction!r}")
        if self.seconds is not None and not self.seconds > 0:
            raise ValueError(f"latency seconds must be > 0, got {self.seconds!r}")


def parse_seconds(text: str) -> float:
    """Seconds from ``"12ms"``, ``"0.5s"``, ``"300us"``.

    Examples:
        >>> parse_seconds("12ms"), parse_seconds("0.5s"), parse_seconds("250us")
        (0.012, 0.5, 0.00025)
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(s|ms|us)\s*", str(text))
    if not match:
        raise ValueError(f"latency {text!r} is not a time; write it like '12ms', '0.5s' or '300us'")
    value, unit = float(match.group(1)), match.group(2)
    return value * {"s": 1.0, "ms": 1e-3, "us": 1e-6}[unit]


def _call(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return model(*args, **kwargs)


def measure_latency(models: nn.Module | Mapping[str, nn.Module], example_inputs: Any, *, repeats: int = 10,
                    warmup: int = 3, threads: int | None = 2, number: int | None = None) -> dict[str, Latency]:
    """Time each model on ``example_inputs``: interleaved, rotating order, median over ``repeats``.

    Args:
        models: A model or ``{name: model}`` (a single model is returned under the name ``"model"``).
        example_inputs: A tensor, a tuple of positional arguments or a dict of keyword arguments.
        repeats: Timed samples per model (median taken); at least 1.
        warmup: Untimed calls per model first (also to choose ``number``).
        threads: Intra-op threads while timing (``None``: leave torch's setting).
        number: Calls per sample (default: enough for about 2 ms per sample with the fastest model, at least 1).

    Returns:
        ``{name: Latency}`` with seconds per call.

    Raises:
        ValueError: For ``repeats < 1`` or ``warmup < 0``.
    """
    if isinstance(models, nn.Module):
        models = {"model": models}
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    args, kwargs = _split_inputs(example_inputs)
    names = list(models)
    before_threads = torch.get_num_threads()
    modes = {name: [(m, m.training) for m in model.modules()] for name, model in models.items()}
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        for model in models.values():
            model.eval()
        with torch.inference_mode():
            fastest = float("inf")
            for _ in range(max(warmup, 1 if number is None else 0)):
                for name in names:
                    t0 = time.perf_counter()
                    _call(models[name], args, kwargs)
                    fastest = min(fastest, time.perf_counter() - t0)
            if number is None:
                number = max(1, min(1000, int(2e-3 / max(fastest, 1e-9))))
            samples: dict[str, list[float]] = {name: [] for name in names}
            for r in range(repeats):
                k = r % len(names)
                for name in names[k:] + names[:k]:
                    model = models[name]
                    t0 = time.perf_counter()
                    for _ in range(number):
                        _call(model, args, kwargs)
                    samples[name].append((time.perf_counter() - t0) / number)
    finally:
        torch.set_num_threads(before_threads)
        for pairs in modes.values():
            for m, mode in pairs:
                m.training = mode
    return {name: Latency(statistics.median(s), tuple(s), number) for name, s in samples.items()}


def layer_times(models: Mapping[str, nn.Module], example_inputs: Any, repeats: int = 5, warmup: int = 2,
                threads: int | None = 2) -> dict[str, dict[str, float]]:
    """Median seconds per forward pass of every layer, per model (hooked runs, interleaved, ``inference_mode``).

    A layer is a module that runs no submodule (``nn.MultiheadAttention``, whose output projection is not called as a
    module, is one). The time of a layer is that between its forward pre- and post-hook; the hooks cost a few
    microseconds each, so this is for finding where the time goes. ``""`` holds the whole forward pass.

    Returns:
        ``{model key: {layer name: seconds}}``.
    """
    args, kwargs = _split_inputs(example_inputs)
    names_of = {id(m): n for model in models.values() for n, m in model.named_modules()}
    stack: list[list[Any]] = []  # [name, start, had_child]
    current: dict[str, float] = {}

    def pre(module: nn.Module, inputs: Any) -> None:
        name = names_of.get(id(module))
        if name is None:
            return
        if stack:
            stack[-1][2] = True
        stack.append([name, time.perf_counter(), False, module])

    def post(module: nn.Module, inputs: Any, output: Any) -> None:
        if not stack or stack[-1][3] is not module:
            return
        name, start, had_child, _ = stack.pop()
        if not had_child and name:
            current[name] = current.get(name, 0.0) + time.perf_counter() - start

    samples: dict[str, dict[str, list[float]]] = {k: {} for k in models}
    before = torch.get_num_threads()
    h1 = module_hooks.register_module_forward_pre_hook(pre)
    h2 = module_hooks.register_module_forward_hook(post)
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        keys = list(models)
        with torch.inference_mode():
            for r in range(warmup + repeats):
                k0 = r % len(keys)
                for key in keys[k0:] + keys[:k0]:
                    current.clear()
                    stack.clear()
                    t0 = time.perf_counter()
                    models[key](*args, **kwargs)
                    total = time.perf_counter() - t0
                    if r >= warmup:
                        for name, t in current.items():
                            samples[key].setdefault(name, []).append(t)
                        samples[key].setdefault("", []).append(total)
    finally:
        h1.remove()
        h2.remove()
        torch.set_num_threads(before)
    return {key: {name: statistics.median(ts) for name, ts in per.items()} for key, per in samples.items()}
