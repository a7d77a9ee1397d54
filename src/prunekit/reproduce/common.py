"""Pieces the reproductions share: data subsets, a training routine with periodic evaluation, plotting, a results
store that refuses to mix configurations."""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from prunekit.data import load_dataset
from prunekit.fileformat import atomic_write
from prunekit.pruner import Pruner
from prunekit.reproduce.store import ResultStore
from prunekit.train import batches, evaluate

__all__ = ["data_splits", "markdown_table", "mean_spread", "new_figure", "open_store", "periodic_train_fn",
           "save_figure", "torch_threads"]


def data_splits(name: str, subset: int | None = None) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """``(train, val, test)`` of a registered data set; ``subset`` keeps the first N of each (quick runs)."""
    parts = [load_dataset(name, split) for split in ("train", "val", "test")]
    if subset:
        parts = [TensorDataset(*(t[:subset] for t in p.tensors)) for p in parts]
    return parts[0], parts[1], parts[2]


def periodic_train_fn(
    train_data: TensorDataset,
    val_data: TensorDataset,
    test_data: TensorDataset,
    *,
    epochs: float,
    lr: float,
    batch_size: int = 60,
    evals_per_epoch: int = 2,
    seed: int = 0,
) -> Callable[[nn.Module, Pruner, Callable[[int], None]], dict[str, float]]:
    """A lottery-style training routine: Adam at a constant rate, validation every ``1/evals_per_epoch`` epoch.

    Returns ``train_fn(model, pruner, on_step)`` whose metrics are ``accuracy`` (test accuracy at the early-stopping
    step, i.e. the evaluation with the lowest validation loss, as in Frankle & Carbin 2019), ``early_stop_step``,
    ``final_accuracy`` and ``val_loss``.
    """
    per_epoch = math.ceil(len(train_data) / batch_size)
    total = max(1, round(epochs * per_epoch))
    eval_every = max(1, per_epoch // evals_per_epoch)

    def train_fn(model: nn.Module, pruner: Pruner, on_step: Callable[[int], None]) -> dict[str, float]:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        loss_fn = nn.CrossEntropyLoss()
        best = {"val_loss": math.inf, "accuracy": 0.0, "early_stop_step": 0.0}
        step, epoch = 0, 0
        model.train()
        while step < total:
            for x, y in batches(train_data, batch_size, shuffle=True, seed=seed, epoch=epoch):
                loss = loss_fn(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                pruner.step()
                step += 1
                on_step(step)
                if step % eval_every == 0 or step == total:
                    val = evaluate(model, val_data)
                    if val.loss < best["val_loss"]:
                        best = {"val_loss": val.loss, "accuracy": evaluate(model, test_data).accuracy,
                                "early_stop_step": float(step)}
                    model.train()
                if step >= total:
                    break
            epoch += 1
        return {**best, "final_accuracy": evaluate(model, test_data).accuracy}

    return train_fn


def mean_spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, min, max and sample standard deviation (0 for one value)."""
    vals = list(values)
    return {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": float(len(vals))}


def save_figure(fig: Any, path: str | os.PathLike[str]) -> None:
    """Write a matplotlib figure as PNG atomically."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


def new_figure(width: float = 8, height: float = 5, ncols: int = 1) -> tuple[Any, Any]:
    """A figure on the Agg canvas (no display, no pyplot state) and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, axes


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def open_store(path: Path, experiment: str, config: dict[str, Any]) -> ResultStore:
    """A :class:`ResultStore` whose ``meta`` holds ``config``; refuses to resume results of another configuration.

    Raises:
        ValueError: The file's ``meta`` has a different value for a key of ``config`` (e.g. quick vs full mode);
            names the keys that differ.
    """
    config = json.loads(json.dumps(config))  # tuples -> lists, as stored
    store = ResultStore(path, experiment)
    meta = store.doc["meta"]
    differ = sorted(k for k in config if k in meta and meta[k] != config[k])
    if differ:
        raise ValueError(
            f"{path} holds results of another configuration (different {differ}); resuming would mix them. "
            "Use another output directory (e.g. --out) or delete the file to start over."
        )
    meta.update(config)
    return store


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (None: unchanged), restoring the previous count afterwards.

    Quick runs use one thread: their tensors are tiny, and on a busy machine two OpenMP threads that wait for each
    other made a tiny LSTM step 50x slower (400 ms instead of 7 ms).
    """
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
