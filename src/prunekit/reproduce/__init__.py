"""One-command reproductions of the results prunekit is built on (``prunekit reproduce NAME [--quick]``).

- ``lottery``: lottery tickets (Frankle & Carbin 2019) on LeNet-300-100 / MNIST, winning ticket vs both controls
  (:mod:`~prunekit.reproduce.lottery_tickets`).
- ``sensitivity``: per-layer sensitivity curves of LeNet-300-100 and the allocation they give
  (:mod:`~prunekit.reproduce.sensitivity_analysis`).
- ``gradual-vs-oneshot``: gradual vs one-shot vs iterative pruning at an equal training budget, LeNet-5 / MNIST and
  LeNet-300-100 / Fashion-MNIST at 90/95/98% (:mod:`~prunekit.reproduce.gradual_vs_oneshot`).
- ``large-vs-small``: large-sparse vs small-dense at equal non-zero weights (Zhu & Gupta 2017): LeNet-300-100 on
  MNIST and Fashion-MNIST, then a 2-layer LSTM word-level language model on Jane Austen's novels
  (:mod:`~prunekit.reproduce.large_vs_small`; the LSTM section takes about 30 minutes per model on 2 cores).
- ``large-vs-small-lstm``: the LSTM section of ``large-vs-small`` alone.

Each experiment writes JSON (with the command and environment), a markdown table and a PNG plot into an output
directory, saves every finished configuration as it goes and skips finished ones when rerun. ``quick=True`` runs a
tiny version that checks the pipeline (the test suite uses it); the science needs the full mode.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["EXPERIMENTS", "run"]


def _lottery(out: Path, quick: bool, progress: bool) -> Any:
    from prunekit.reproduce import lottery_tickets

    return lottery_tickets.run(out, quick=quick, progress=progress)


def _sensitivity(out: Path, quick: bool, progress: bool) -> Any:
    from prunekit.reproduce import sensitivity_analysis

    return sensitivity_analysis.run(out, quick=quick, progress=progress)


def _gradual_vs_oneshot(out: Path, quick: bool, progress: bool) -> Any:
    from prunekit.reproduce import gradual_vs_oneshot

    return gradual_vs_oneshot.run(out, quick=quick, progress=progress)


def _large_vs_small(out: Path, quick: bool, progress: bool) -> Any:
    from prunekit.reproduce import large_vs_small

    return large_vs_small.run(out, quick=quick, progress=progress)


def _large_vs_small_lstm(out: Path, quick: bool, progress: bool) -> Any:
    from prunekit.reproduce import large_vs_small

    return large_vs_small.run(out, quick=quick, progress=progress, sections=("lstm",))


#: name -> ``run(out_dir, quick, progress)``.
EXPERIMENTS: dict[str, Callable[[Path, bool, bool], Any]] = {
    "lottery": _lottery,
    "sensitivity": _sensitivity,
    "gradual-vs-oneshot": _gradual_vs_oneshot,
    "large-vs-small": _large_vs_small,
    "large-vs-small-lstm": _large_vs_small_lstm,
}


def run(name: str, out_dir: str | Path, *, quick: bool = False, progress: bool = True) -> Any:
    """Run (or resume) the experiment ``name`` into ``out_dir``.

    Raises:
        ValueError: Unknown experiment name (the message lists the known ones).
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {sorted(EXPERIMENTS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return EXPERIMENTS[name](out, quick, progress)
