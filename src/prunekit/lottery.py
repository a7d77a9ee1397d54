"""Lottery tickets: iterative magnitude pruning with rewinding, and the two controls.

Frankle & Carbin 2019, "The Lottery Ticket Hypothesis" (https://arxiv.org/abs/1803.03635): train, prune a fraction
``rate`` of the remaining weights by magnitude, *rewind* the surviving weights to their values at initialisation, and
train again; repeat. The sparse subnetworks found this way ("winning tickets") train to the dense accuracy, while the
same masks with a new random initialisation do not. Frankle et al. 2020 ("Linear Mode Connectivity and the Lottery
Ticket Hypothesis") rewind to an early training step ``k`` instead of step 0, which makes it work on larger nets.

:func:`find` runs the levels and, optionally, the controls for each level:

* ``"reinit"`` — the same mask, weights re-initialised at random;
* ``"random_mask"`` — a random mask with the same per-tensor sparsity, weights rewound like the ticket.

Each level is saved as it finishes (weights, mask, metrics; prunekit's file format, no pickle) into ``out_dir``, and a
rerun with the same configuration skips finished levels; an interrupted level is restarted from its beginning.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.fileformat import json_text, read, write, write_text
from prunekit.masks import Mask
from prunekit.pruner import Pruner, unwrap
from prunekit.schedules import Manual
from prunekit.scoring import RandomScore, magnitude, score_tensors
from prunekit.select import select, uniform
from prunekit.targets import find_prunable

__all__ = ["CONTROLS", "LevelResult", "Ticket", "TrainFn", "find", "level_density"]

#: ``train_fn(model, pruner, on_step) -> metrics``: train ``model`` from its current weights, calling
#: ``pruner.step()`` and then ``on_step(step)`` (step counted from 1) after every optimizer step; return a dict of
#: numbers (e.g. ``{"accuracy": 0.98, "early_stop_step": 3000}``). :func:`prunekit.train.train` does this with
#: ``train(model, data, cfg, pruner=pruner, on_step=on_step)``.
TrainFn = Callable[[nn.Module, Pruner, Callable[[int], None]], Mapping[str, float]]

CONTROLS = ("reinit", "random_mask")


@dataclass(frozen=True)
class LevelResult:
    """One pruning level: the ticket's metrics and, if run, the controls' metrics at the same sparsity."""

    level: int
    density: float
    metrics: dict[str, float]
    controls: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class Ticket:
    """The result of :func:`find`: every level, the final mask, and the rewind point.

    Attributes:
        levels: One :class:`LevelResult` per level; level 0 is the dense network.
        masks: The mask of the last level (the sparsest ticket).
        rewind_state: The weights the ticket is rewound to (``{name: tensor}``, a ``state_dict``).
    """

    levels: list[LevelResult]
    masks: Mask
    rewind_state: dict[str, torch.Tensor]

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-serialisable) of the levels."""
        return {"levels": [asdict(lv) for lv in self.levels]}

    def table(self, metric: str = "accuracy") -> str:
        """A markdown table: weights remaining, ticket metric and the controls' metric per level."""
        names = sorted({c for lv in self.levels for c in lv.controls})
        head = "| level | weights remaining | ticket | " + " | ".join(names) + " |" if names else \
            "| level | weights remaining | ticket |"
        lines = [head, "|" + "---|" * (3 + len(names))]
        for lv in self.levels:
            cells = [str(lv.level), f"{lv.density:.2%}", _fmt(lv.metrics.get(metric))]
            cells += [_fmt(lv.controls.get(c, {}).get(metric)) for c in names]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def level_density(level: int, rate: float) -> float:
    """Fraction of weights left after ``level`` rounds that each prune ``rate`` of the remaining weights.

    Examples:
        >>> round(level_density(2, 0.2), 4)
        0.64
    """
    return (1.0 - rate) ** level


def _check(rounds: int, rate: float, rewind: str | int, controls: Iterable[str], allocation: str) -> list[str]:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < rate < 1.0:
        raise ValueError(
            f"rate must be the fraction of remaining weights pruned per round, in (0, 1), got {rate!r}; "
            "the paper uses 0.2 (20% per round; 10 rounds leave 10.7% of the weights)"
        )
    if not (rewind == "init" or (isinstance(rewind, int) and not isinstance(rewind, bool) and rewind >= 0)):
        raise ValueError(f"rewind must be 'init' or a training step (int >= 0), got {rewind!r}")
    if allocation not in ("global", "uniform"):
        raise ValueError(f"allocation must be 'global' or 'uniform' (per layer), got {allocation!r}")
    controls = list(controls)
    unknown = [c for c in controls if c not in CONTROLS]
    if unknown:
        raise ValueError(f"unknown controls {unknown}; choose from {list(CONTROLS)}")
    return controls


def _metrics(value: object, what: str) -> dict[str, float]:
    if not isinstance(value, Mapping) or not value:
        raise TypeError(f"train_fn must return a non-empty dict of numbers ({what}), got {value!r}")
    out = {}
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)):
            raise TypeError(f"train_fn returned {k}={v!r} ({what}); every metric must be a number")
        out[str(k)] = float(v)
    return out


def find(
    model: nn.Module,
    train_fn: TrainFn,
    *,
    rounds: int = 10,
    rate: float = 0.2,
    rewind: str | int = "init",
    allocation: str = "global",
    output_rate: float | None = None,
    controls: Iterable[str] = (),
    out_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    reinit: Callable[[nn.Module], None] | None = None,
) -> Ticket:
    """Find a winning ticket by iterative magnitude pruning with rewinding.

    Args:
        model: The network at initialisation (its current weights are the rewind point for ``rewind="init"``).
        train_fn: Trains the model; see :data:`TrainFn`.
        rounds: Number of pruning levels after the dense run.
        rate: Fraction of the *remaining* weights pruned per round (paper: 0.2).
        rewind: ``"init"`` (rewind to the initial weights) or a step ``k`` of the dense run to rewind to.
        allocation: ``"global"`` (one magnitude threshold) or ``"uniform"`` (each layer at the same rate).
        output_rate: Per-round rate of the output layer (the last pruned tensor); default ``rate / 2`` as in the
            paper's fully connected experiments.
        controls: Any of ``"reinit"`` and ``"random_mask"`` to train the controls at every level.
        out_dir: Directory to save every level (and resume from); None keeps everything in memory.
        seed: Seed of the controls' random initialisation and random masks.
        include: Globs of tensors to prune (default Linear/Conv weights).
        exclude: Globs of tensors never to prune.
        reinit: ``reinit(model)`` re-initialises a model in place for the ``"reinit"`` control (default: every
            module's ``reset_parameters()``).

    Returns:
        The :class:`Ticket`.

    Raises:
        ValueError: Bad rounds/rate/rewind/controls, a rewind step the dense run never reaches, or an ``out_dir``
            holding a run with another configuration.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> def train_fn(model, pruner, on_step):
        ...     opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ...     for step in range(1, 4):
        ...         model(torch.ones(2, 8)).sum().backward(); opt.step(); opt.zero_grad()
        ...         pruner.step(); on_step(step)
        ...     return {"accuracy": 1.0}
        >>> _ = torch.manual_seed(0)
        >>> ticket = find(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), train_fn, rounds=2)
        >>> [round(lv.density, 3) for lv in ticket.levels]
        [1.0, 0.812, 0.675]
    """
    controls_ = _check(rounds, rate, rewind, controls, allocation)
    model = unwrap(model)
    params = find_prunable(model, include=include, exclude=exclude)
    names = list(params)
    out_name = names[-1] if len(names) > 1 else None
    out_rate = rate / 2 if output_rate is None else float(output_rate)
    if out_name is not None and not 0.0 <= out_rate < 1.0:
        raise ValueError(f"output_rate must be in [0, 1), got {output_rate!r}")
    config = {"rounds": rounds, "rate": rate, "rewind": rewind, "allocation": allocation, "output_rate": out_rate,
              "controls": controls_, "seed": seed, "tensors": names}
    store = _Store(out_dir, config)

    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rewind_state: dict[str, torch.Tensor] | None = init_state if rewind == "init" else store.load_rewind()
    levels: list[LevelResult] = []
    mask = Mask({n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()})

    for level in range(rounds + 1):
        done = store.load_level(level)
        if done is not None:
            result, trained_state, mask = done
            levels.append(result)
            model.load_state_dict(trained_state)
            continue
        if level > 0:
            if rewind_state is None:  # pragma: no cover - guarded by the dense run below
                raise RuntimeError("no rewind point")
            mask = _next_mask(model, params, mask, level, rate, allocation, out_name, out_rate)
            model.load_state_dict(rewind_state)
        snapshot: dict[str, dict[str, torch.Tensor]] = {}

        def on_step(step: int, _level: int = level) -> None:
            if _level == 0 and rewind != "init" and step == rewind:
                snapshot["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}

        if level == 0 and rewind == 0:
            snapshot["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        metrics = _metrics(train_fn(model, _pruner(model, names, mask), on_step), f"level {level}")
        if level == 0 and rewind != "init":
            if "state" not in snapshot:
                raise ValueError(f"rewind={rewind} is beyond the dense training run (it never reached step {rewind}); "
                                 "choose a step inside the first training run")
            rewind_state = snapshot["state"]
            store.save_rewind(rewind_state)
        trained_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        control_metrics: dict[str, dict[str, float]] = {}
        if level > 0:
            for control in controls_:
                control_metrics[control] = _run_control(control, model, names, mask, rewind_state, train_fn, seed,
                                                        level, reinit)
            model.load_state_dict(trained_state)
        result = LevelResult(level=level, density=1.0 - mask.sparsity(), metrics=metrics, controls=control_metrics)
        store.save_level(level, result, trained_state, mask)
        levels.append(result)
    assert rewind_state is not None
    return Ticket(levels=levels, masks=mask, rewind_state=rewind_state)


def _pruner(model: nn.Module, names: list[str], mask: Mask) -> Pruner:
    """A Pruner that only keeps ``mask`` applied (masks change between levels, never during training)."""
    pruner = Pruner(model, 0.0, schedule=Manual(), include=[_escape(n) for n in names])
    pruner.set_masks(mask)
    return pruner


def _escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def _next_mask(model: nn.Module, params: Mapping[str, torch.Tensor], mask: Mask, level: int, rate: float,
               allocation: str, out_name: str | None, out_rate: float) -> Mask:
    scores = score_tensors(magnitude, dict(params))
    overrides = {out_name: 1.0 - level_density(level, out_rate)} if out_name is not None else {}
    return select(scores, 1.0 - level_density(level, rate), allocation, overrides=overrides, current=mask)


def _run_control(control: str, model: nn.Module, names: list[str], mask: Mask,
                 rewind_state: Mapping[str, torch.Tensor], train_fn: TrainFn, seed: int, level: int,
                 reinit: Callable[[nn.Module], None] | None) -> dict[str, float]:
    twin = copy.deepcopy(model)
    if control == "reinit":
        with torch.random.fork_rng():
            torch.manual_seed(seed * 7919 + level)
            if reinit is not None:
                reinit(twin)
            else:
                for module in twin.modules():
                    if hasattr(module, "reset_parameters"):
                        module.reset_parameters()  # type: ignore[operator]
        control_mask = mask
    else:  # random_mask: same per-tensor sparsity, original (rewound) weights
        twin.load_state_dict(rewind_state)
        params = dict(twin.named_parameters())
        scores = score_tensors(RandomScore(seed * 7919 + level), {n: params[n] for n in names})
        control_mask = uniform(scores, mask.sparsities())
    return _metrics(train_fn(twin, _pruner(twin, names, control_mask), lambda step: None),
                    f"{control} control, level {level}")


class _Store:
    """Saves and reloads levels in ``out_dir`` (or does nothing without one)."""

    def __init__(self, out_dir: str | os.PathLike[str] | None, config: dict[str, Any]) -> None:
        self.dir = Path(out_dir) if out_dir is not None else None
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg_file = self.dir / "config.json"
        if cfg_file.exists():
            existing = json.loads(cfg_file.read_text())
            if existing != json.loads(json.dumps(config)):
                raise ValueError(f"{self.dir} holds a lottery run with another configuration ({existing}); "
                                 "use another out_dir or delete it")
        else:
            write_text(cfg_file, json.dumps(config, indent=2, sort_keys=True) + "\n")

    def _level_file(self, level: int) -> Path:
        assert self.dir is not None
        return self.dir / f"level_{level:02d}.safetensors"

    def load_level(self, level: int) -> tuple[LevelResult, dict[str, torch.Tensor], Mask] | None:
        if self.dir is None or not self._level_file(level).exists():
            return None
        tensors, meta = read(self._level_file(level), kind="lottery-level")
        state = {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}
        mask = Mask({k.removeprefix("mask/"): v for k, v in tensors.items() if k.startswith("mask/")})
        return LevelResult(**meta["result"]), state, mask

    def save_level(self, level: int, result: LevelResult, state: Mapping[str, torch.Tensor], mask: Mask) -> None:
        if self.dir is None:
            return
        tensors = {f"model/{k}": v for k, v in state.items()} | {f"mask/{k}": v for k, v in mask.items()}
        write(self._level_file(level), tensors, {"result": asdict(result)}, kind="lottery-level")
        summary = self.dir / "levels.json"  # human-readable copy of every finished level's metrics
        levels = json.loads(summary.read_text()) if summary.exists() else []
        levels = [lv for lv in levels if lv["level"] < level] + [asdict(result)]
        write_text(summary, json_text(levels, indent=2, sort_keys=True))

    def load_rewind(self) -> dict[str, torch.Tensor] | None:
        if self.dir is None or not (self.dir / "rewind.safetensors").exists():
            return None
        tensors, _ = read(self.dir / "rewind.safetensors", kind="lottery-rewind")
        return tensors

    def save_rewind(self, state: Mapping[str, torch.Tensor]) -> None:
        if self.dir is not None:
            write(self.dir / "rewind.safetensors", dict(state), {}, kind="lottery-rewind")

