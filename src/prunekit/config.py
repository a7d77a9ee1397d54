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
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
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

__all__ = ["PruneConfig", "add_arguments", "build_pruner", "build_schedule", "check_out_dir", "check_schedule",
           "config_hash", "from_arguments"]


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
        if self.start < 0:
            raise ValueError(f"--start {self.start:g}: the epoch at which pruning starts must be >= 0")
        if self.schedule in ("gradual", "iterative") and self.end < self.start:  # oneshot/constant have no end
            raise ValueError(f"--end {self.end:g} is before its start (--start {self.start:g}); use --end >= "
                             f"{self.start:g}")
        if isinstance(self.updates_per_epoch, bool) or not isinstance(self.updates_per_epoch, int) \
                or self.updates_per_epoch < 1:
            raise ValueError(f"--updates-per-epoch {self.updates_per_epoch}: the masks must be updated at least once "
                             "per epoch; use --updates-per-epoch >= 1 (e.g. 4)")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"--rounds {self.rounds}: the iterative schedule needs at least one round; use --rounds "
                             ">= 1 (e.g. 5)")
        if not self.exponent > 0:
            raise ValueError(f"--exponent {self.exponent}: the gradual ramp's exponent must be > 0 (3 = Zhu & Gupta's "
                             "cubic)")


def check_schedule(cfg: PruneConfig, epochs: int, steps_per_epoch: int | None = None, *,
                   prunes: bool | None = None) -> None:
    """Check that ``cfg``'s schedule reaches its final sparsity within ``epochs`` epochs of training.

    Without ``steps_per_epoch`` only the epoch-level rules are checked (pruning needs at least one epoch; ``start``
    and ``end`` lie within the run); with it, also that the schedule's last mask update falls on one of the
    ``epochs * steps_per_epoch`` optimizer steps (rounding to whole update intervals can push it past the end).
    The messages name the command-line flags, which are the field names.

    Args:
        cfg: The pruning configuration.
        epochs: Epochs of training the pruner is stepped in.
        steps_per_epoch: Optimizer steps per epoch, if known.
        prunes: Whether anything is to be pruned (default: ``cfg.sparsity > 0``); if not, only ``epochs`` is checked.

    Raises:
        ValueError: If the final sparsity would not be reached, saying which flags to change.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"--epochs {epochs}: expected a whole number of epochs >= 0")
    if not (cfg.sparsity > 0 if prunes is None else prunes):
        return
    if epochs < 1:
        raise ValueError(f"--epochs {epochs} trains no step, so nothing would be pruned (--sparsity "
                         f"{cfg.sparsity:g}): use --epochs >= 1")
    when = "the last round starts" if cfg.schedule == "iterative" else "the final sparsity is reached"
    if cfg.schedule in ("gradual", "iterative") and cfg.end > epochs:
        raise ValueError(f"--end {cfg.end:g} (where {when}) is after the last epoch (--epochs {epochs}): use --end < "
                         f"{epochs} or --epochs >= {math.floor(cfg.end) + 1}")
    if cfg.schedule in ("gradual", "iterative", "oneshot") and cfg.start >= epochs:
        raise ValueError(f"--start {cfg.start:g} (the first pruning step) is not within the {epochs} training "
                         f"epoch(s) (--epochs {epochs}): use --start < {epochs} or "
                         f"--epochs >= {math.floor(cfg.start) + 1}")
    if steps_per_epoch is None:
        return
    steps = epochs * steps_per_epoch
    last = build_schedule(cfg, steps_per_epoch).last_update
    if last is None or last < steps:
        return
    name = "start" if cfg.schedule == "oneshot" else "end"
    flag, value = f"--{name}", getattr(cfg, name)
    fix = "fewer --rounds, an earlier --start or more --epochs" if cfg.schedule == "iterative" \
        else "an earlier --start or more --epochs"
    for k in range(steps - 1, -1, -1):  # the latest value (3 decimals) whose last update falls within the run
        candidate = math.floor(k / steps_per_epoch * 1000) / 1000
        if name == "end" and candidate < cfg.start:
            break
        if build_schedule(dataclasses.replace(cfg, **{name: candidate}), steps_per_epoch).last_update < steps:
            fix = f"{flag} <= {candidate:g} or more --epochs"
            break
    raise ValueError(f"{flag} {value:g} with --schedule {cfg.schedule} puts the last mask update at step {last}, but "
                     f"training has only {steps} steps (--epochs {epochs} x {steps_per_epoch} steps per epoch), so "
                     f"--sparsity {cfg.sparsity:g} would never be reached: use {fix}")


def build_schedule(cfg: PruneConfig, steps_per_epoch: int, epochs: int | None = None) -> Schedule:
    """The step-based schedule for ``cfg`` given the number of optimizer steps per epoch.

    Args:
        cfg: The pruning configuration.
        steps_per_epoch: Optimizer steps per epoch.
        epochs: Length of the training run in epochs; if given, :func:`check_schedule` first checks that the
            schedule reaches the final sparsity within it.

    Raises:
        ValueError: If ``epochs`` is given and the final sparsity would not be reached in time.
    """
    if epochs is not None:
        check_schedule(cfg, epochs, steps_per_epoch)
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


def build_pruner(model: nn.Module, cfg: PruneConfig, steps_per_epoch: int, epochs: int | None = None) -> Pruner:
    """A :class:`Pruner` for ``model`` as ``cfg`` describes.

    Args:
        model: The model to prune.
        cfg: The pruning configuration.
        steps_per_epoch: Optimizer steps per epoch.
        epochs: Length of the training run in epochs; if given, the schedule is checked to reach the final
            sparsity within it (see :func:`check_schedule`).
    """
    return Pruner(
        model,
        cfg.sparsity,
        schedule=build_schedule(cfg, steps_per_epoch, epochs),
        criterion=cfg.criterion,
        allocation=cfg.allocation,
        include=list(cfg.include) or None,
        exclude=list(cfg.exclude) or None,
        regrow=cfg.regrow,
    )


def check_out_dir(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """Check that ``path`` can be (or already is) an output directory: neither it nor a parent is a file.

    Args:
        path: The output directory (need not exist).
        flag: The command-line flag that named it, for the message.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: If ``path`` or one of its parents exists and is not a directory.
    """
    out = Path(path)
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            what = "is" if p == out else f"is inside {p}, which is"
            raise ValueError(f"{flag} {out} {what} a file, not a directory: choose another {flag} (a directory "
                             "that does not exist yet, or a run directory)")
    return out


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
