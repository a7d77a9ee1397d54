"""Plain configuration for command-line runs and benchmarks: frozen dataclasses whose fields become CLI flags.

:class:`PruneConfig` describes *what* to prune and *when*, in epochs (fractions allowed); :func:`build_pruner`
turns it into a :class:`~prunekit.Pruner` once the number of steps per epoch is known. Each field's ``help``
metadata is the flag's help text, so the CLI and the docs never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, TypeVar, get_type_hints

from torch import nn

from prunekit.pruner import Pruner
from prunekit.schedules import (
    SCHEDULES,
    Constant,
    Gradual,
    Iterative,
    OneShot,
    Schedule,
)
from prunekit.scoring import CRITERIA
from prunekit.select import ALLOCATIONS
from prunekit.targets import check_sparsity

__all__ = ["PruneConfig", "add_arguments", "build_pruner", "build_schedule", "config_hash", "from_arguments"]


def _f(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - mirrors argparse
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class PruneConfig:
    """What to prune, how, and when (in epochs of the training run)."""

    sparsity: float = _f(0.9, "final fraction of zeros over the pruned tensors, in [0, 1)")
    criterion: str = _f("magnitude", "importance criterion", choices=sorted(CRITERIA))
    allocation: str = _f("global", "how sparsity is spread over tensors", choices=sorted(ALLOCATIONS))
    schedule: str = _f("gradual", "when to prune", choices=sorted(set(SCHEDULES) - {"manual"}))
    start: float = _f(0.0, "epoch at which pruning starts (gradual/iterative/oneshot)")
    end: float = _f(0.5, "epoch at which the final sparsity is reached (gradual) or the last round starts (iterative)")
    updates_per_epoch: int = _f(4, "mask updates per epoch (gradual, constant)")
    rounds: int = _f(5, "number of prune/fine-tune rounds (iterative)")
    exponent: float = _f(3.0, "exponent of the gradual ramp (3 = Zhu & Gupta cubic)")
    include: tuple[str, ...] = _f((), "globs of parameter names to prune instead of Linear/Conv weights", nargs="*")
    exclude: tuple[str, ...] = _f((), "globs of parameter names never to prune", nargs="*")
    regrow: bool = _f(False, "let mask updates bring pruned weights back")

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        if self.end < self.start:
            raise ValueError(f"pruning end epoch {self.end} is before its start epoch {self.start}; need end >= start")
        if self.start < 0:
            raise ValueError(f"pruning start epoch must be >= 0, got {self.start}")


def build_schedule(cfg: PruneConfig, steps_per_epoch: int) -> Schedule:
    """The step-based schedule for ``cfg`` given the number of optimizer steps per epoch."""
    start = round(cfg.start * steps_per_epoch)
    if cfg.schedule == "oneshot":
        return OneShot(at=start)
    if cfg.schedule == "constant":
        return Constant(every=max(1, steps_per_epoch // max(cfg.updates_per_epoch, 1)))
    if cfg.schedule == "iterative":
        span = round((cfg.end - cfg.start) * steps_per_epoch)
        every = max(1, span // max(cfg.rounds - 1, 1)) if cfg.rounds > 1 else 1
        return Iterative(rounds=cfg.rounds, every=every, start=start)
    if cfg.schedule == "gradual":
        every = max(1, steps_per_epoch // max(cfg.updates_per_epoch, 1))
        n = max(1, round((cfg.end - cfg.start) * steps_per_epoch / every))
        return Gradual(start=start, end=start + n * every, every=every, exponent=cfg.exponent)
    raise ValueError(f"unknown schedule {cfg.schedule!r}; choose one of {sorted(set(SCHEDULES) - {'manual'})}")


def build_pruner(model: nn.Module, cfg: PruneConfig, steps_per_epoch: int) -> Pruner:
    """A :class:`Pruner` for ``model`` as ``cfg`` describes."""
    return Pruner(
        model,
        cfg.sparsity,
        schedule=build_schedule(cfg, steps_per_epoch),
        criterion=cfg.criterion,
        allocation=cfg.allocation,
        include=list(cfg.include) or None,
        exclude=list(cfg.exclude) or None,
        regrow=cfg.regrow,
    )


def config_hash(*configs: Any) -> str:
    """Short stable hash of dataclass configs (used to name run directories)."""
    doc = json.dumps([dataclasses.asdict(c) if dataclasses.is_dataclass(c) else c for c in configs], sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:8]


T = TypeVar("T")


def add_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one ``--flag`` per dataclass field, help and choices taken from the field metadata.

    The defaults are shown by the parser's ``argparse.ArgumentDefaultsHelpFormatter``."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + prefix + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = f.default
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(flag, dest=prefix + f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
            continue
        kwargs: dict[str, Any] = {"dest": prefix + f.name, "default": default, "help": help_text}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if f.metadata.get("nargs"):
            kwargs["nargs"] = f.metadata["nargs"]
            kwargs["type"] = str
        else:
            kwargs["type"] = kind if kind in (int, float, str) else str
        parser.add_argument(flag, **kwargs)


def from_arguments(args: argparse.Namespace, cls: type[T], prefix: str = "") -> T:
    """Build ``cls`` from parsed flags added by :func:`add_arguments`."""
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        v = getattr(args, prefix + f.name)
        values[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**values)
