"""Sparsity schedules: pure functions of the training step.

A schedule answers two questions for step ``t`` (0-based count of optimizer steps taken so far):

* ``sparsity(t, final)`` — the target sparsity at step ``t`` when the run ends at ``final``;
* ``updates_at(t)`` — whether masks are recomputed at step ``t``.

Schedules hold no state and never touch the model or the optimizer; :class:`prunekit.Pruner` asks them. Every
schedule is a frozen dataclass, so it prints, compares and serialises (``to_dict`` / :func:`schedule_from_dict`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["SCHEDULES", "Constant", "Gradual", "Iterative", "Manual", "OneShot", "Schedule", "schedule_from_dict"]


def _check_int(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class Schedule:
    """Base class: subclasses implement :meth:`sparsity` and :meth:`updates_at`."""

    name: ClassVar[str] = "schedule"

    def sparsity(self, step: int, final: float) -> float:  # pragma: no cover - abstract
        """Target sparsity at ``step`` for a run that ends at sparsity ``final``."""
        raise NotImplementedError(f"{type(self).__name__} must implement sparsity(step, final)")

    def updates_at(self, step: int) -> bool:  # pragma: no cover - abstract
        """Whether masks are recomputed at ``step``."""
        raise NotImplementedError(f"{type(self).__name__} must implement updates_at(step)")

    @property
    def last_update(self) -> int | None:
        """The last step at which the masks are recomputed, or None if the schedule never stops."""
        return 0

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-serialisable), inverse of :func:`schedule_from_dict`."""
        return {"schedule": self.name, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class OneShot(Schedule):
    """Prune once, to the final sparsity, at step ``at`` (default: the first :meth:`Pruner.step`).

    Examples:
        >>> s = OneShot()
        >>> s.sparsity(0, 0.9), s.updates_at(0), s.updates_at(1)
        (0.9, True, False)
    """

    at: int = 0
    name: ClassVar[str] = "oneshot"

    def __post_init__(self) -> None:
        _check_int(self.at, "OneShot.at", 0)

    def sparsity(self, step: int, final: float) -> float:
        return final if step >= self.at else 0.0

    def updates_at(self, step: int) -> bool:
        return step == self.at

    @property
    def last_update(self) -> int:
        return self.at


@dataclass(frozen=True)
class Constant(Schedule):
    """Hold the final sparsity from step 0 and re-select the mask every ``every`` steps.

    With the default monotone masks a re-selection can only add zeros when the target rises; with
    ``Pruner(..., regrow=True)`` it lets the pruned set move (prune-and-regrow by the criterion).

    Examples:
        >>> [Constant(every=2).updates_at(t) for t in range(5)]
        [True, False, True, False, True]
    """

    every: int = 1
    name: ClassVar[str] = "constant"

    def __post_init__(self) -> None:
        _check_int(self.every, "Constant.every", 1)

    def sparsity(self, step: int, final: float) -> float:
        return final

    def updates_at(self, step: int) -> bool:
        return step % self.every == 0

    @property
    def last_update(self) -> int | None:
        return None


@dataclass(frozen=True)
class Gradual(Schedule):
    """Gradual pruning of Zhu & Gupta 2017, "To prune, or not to prune" (https://arxiv.org/abs/1710.01878).

    Sparsity rises from ``initial`` (s_i) to the final sparsity (s_f) between steps ``start`` (t0) and ``end``
    (t0 + n·Δt), with masks updated every ``every`` (Δt) steps::

        s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * Δt)) ** exponent,   t in {t0, t0 + Δt, ..., t0 + n·Δt}

    ``exponent=3`` is the paper's cubic schedule (prune fast while the network is redundant, slowly near the end);
    1 gives a linear ramp. Before ``start`` nothing is pruned; from ``end`` on the sparsity is final. Between updates
    the sparsity of the last update holds.

    Args:
        start: t0, the first pruning step.
        end: t0 + n·Δt, the step at which the final sparsity is reached; ``end - start`` must be a multiple of
            ``every``.
        every: Δt, steps between mask updates.
        initial: s_i, the sparsity applied at ``start``.
        exponent: Curvature of the ramp (3 in the paper).

    Examples:
        >>> g = Gradual(start=0, end=100, every=10)
        >>> [round(g.sparsity(t, 0.9), 4) for t in (0, 10, 50, 99, 100)]
        [0.0, 0.2439, 0.7875, 0.8991, 0.9]
        >>> Gradual.zhu_gupta(s_i=0.0, t0=0, n=10, dt=10) == g
        True
    """

    start: int = 0
    end: int = 1000
    every: int = 100
    initial: float = 0.0
    exponent: float = 3.0
    name: ClassVar[str] = "gradual"

    def __post_init__(self) -> None:
        _check_int(self.start, "Gradual.start", 0)
        _check_int(self.end, "Gradual.end", 0)
        _check_int(self.every, "Gradual.every", 1)
        if self.end <= self.start:
            raise ValueError(
                f"Gradual schedule ends before it starts: start={self.start}, end={self.end}. "
                "end must be greater than start (e.g. start=0, end=2000)."
            )
        if (self.end - self.start) % self.every:
            n = (self.end - self.start) / self.every
            raise ValueError(
                f"Gradual: end - start = {self.end - self.start} is not a multiple of every={self.every} "
                f"(n = {n:g} updates). Choose end = start + n * every, e.g. end={self.start + math.ceil(n) * self.every}."
            )
        if not 0.0 <= self.initial < 1.0:
            raise ValueError(f"Gradual.initial must be a sparsity in [0, 1), got {self.initial!r}")
        if not self.exponent > 0:
            raise ValueError(f"Gradual.exponent must be > 0 (3 = Zhu & Gupta's cubic), got {self.exponent!r}")

    @classmethod
    def zhu_gupta(cls, s_i: float, t0: int, n: int, dt: int, exponent: float = 3.0) -> Gradual:
        """Build the schedule from the paper's parameters (s_i, t0, n, Δt); s_f is the Pruner's sparsity."""
        return cls(start=t0, end=t0 + n * dt, every=dt, initial=s_i, exponent=exponent)

    def sparsity(self, step: int, final: float) -> float:
        if step < self.start:
            return 0.0
        if step >= self.end:
            return final
        last = self.start + (step - self.start) // self.every * self.every  # most recent update step
        progress = (last - self.start) / (self.end - self.start)
        return final + (self.initial - final) * (1.0 - progress) ** self.exponent

    def updates_at(self, step: int) -> bool:
        return self.start <= step <= self.end and (step - self.start) % self.every == 0

    @property
    def last_update(self) -> int:
        return self.end


@dataclass(frozen=True)
class Iterative(Schedule):
    """``rounds`` rounds of prune → fine-tune, one every ``every`` steps from ``start``; rounds compound to the target.

    Each round removes the same fraction ``r`` of the weights that are still left, with ``(1 - r) ** rounds = 1 -
    final``, so after round ``i`` (1-based) the sparsity is ``1 - (1 - final) ** (i / rounds)``. (Han et al. 2015;
    Frankle & Carbin 2019 use r = 0.2 per round.)

    Examples:
        >>> it = Iterative(rounds=2, every=100)
        >>> [round(it.sparsity(t, 0.75), 3) for t in (0, 99, 100, 500)]
        [0.5, 0.5, 0.75, 0.75]
        >>> round(Iterative.rate(0.75, 2), 3)
        0.5
    """

    rounds: int = 5
    every: int = 1000
    start: int = 0
    name: ClassVar[str] = "iterative"

    def __post_init__(self) -> None:
        _check_int(self.rounds, "Iterative.rounds", 1)
        _check_int(self.every, "Iterative.every", 1)
        _check_int(self.start, "Iterative.start", 0)

    @staticmethod
    def rate(final: float, rounds: int) -> float:
        """Per-round pruning rate r with ``(1 - r) ** rounds == 1 - final``."""
        return 1.0 - (1.0 - final) ** (1.0 / rounds)

    def round_at(self, step: int) -> int:
        """Number of rounds done at ``step`` (0 before ``start``)."""
        if step < self.start:
            return 0
        return min(self.rounds, (step - self.start) // self.every + 1)

    def sparsity(self, step: int, final: float) -> float:
        done = self.round_at(step)
        return 1.0 - (1.0 - final) ** (done / self.rounds) if done else 0.0

    def updates_at(self, step: int) -> bool:
        offset = step - self.start
        return offset >= 0 and offset % self.every == 0 and offset // self.every < self.rounds

    @property
    def last_update(self) -> int:
        return self.start + (self.rounds - 1) * self.every


@dataclass(frozen=True)
class Manual(Schedule):
    """Never update on its own: masks change only when you call :meth:`Pruner.update`; :meth:`Pruner.step` just keeps
    pruned weights at zero. For loops that decide themselves when to prune (e.g. :func:`prunekit.prune_iteratively`).

    Examples:
        >>> Manual().updates_at(0)
        False
    """

    name: ClassVar[str] = "manual"

    def sparsity(self, step: int, final: float) -> float:
        return final

    def updates_at(self, step: int) -> bool:
        return False

    @property
    def last_update(self) -> int | None:
        return None


#: Schedules by name (CLI and serialisation).
SCHEDULES: dict[str, type[Schedule]] = {c.name: c for c in (OneShot, Constant, Gradual, Iterative, Manual)}


def schedule_from_dict(data: dict[str, Any]) -> Schedule:
    """Rebuild a schedule from :meth:`Schedule.to_dict` output.

    Examples:
        >>> schedule_from_dict(Gradual(start=0, end=20, every=10).to_dict())
        Gradual(start=0, end=20, every=10, initial=0.0, exponent=3.0)
    """
    fields = dict(data)
    kind = fields.pop("schedule", None)
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; known: {sorted(SCHEDULES)}")
    return SCHEDULES[kind](**fields)
