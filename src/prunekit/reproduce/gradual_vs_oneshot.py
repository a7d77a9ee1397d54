"""Reproduction: gradual vs one-shot vs iterative pruning at an equal training budget (a report).

LeNet-5 on MNIST and LeNet-300-100 on Fashion-MNIST, pruned to 90/95/98% while training from scratch. Every pruned
run trains for twice the dense epochs with the same settings and learning-rate schedule
(:func:`prunekit.recipes.small_classifier` scaled to the budget; peak learning rate 0.05 for LeNet-5, see
:data:`CASES`); only the pruning schedule differs:

- **gradual**: the recipe's Zhu & Gupta cubic ramp over the first half of the budget (20 mask updates per epoch);
- **one-shot**: dense training for the first quarter of the budget (:data:`ONESHOT_AT`, chosen on the MNIST
  validation split by ``benchmarks/lenet300_accuracy.py --search``, stage "one-shot placement", over 0.5), one prune
  to the target, fine-tuning for the rest;
- **iterative**: :data:`ITERATIVE_ROUNDS` prune -> fine-tune rounds that compound to the target, evenly spaced from
  the one-shot point to the end of the gradual ramp (not tuned), fine-tuning for the rest.

All three then fine-tune while the one-cycle learning rate anneals. A dense model (the plain recipe, dense epochs)
is the reference. Train on ``train_full`` (60k), report ``test``; one seed by default (LeNet-5 epochs are slow).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunekit.fileformat import write_text
from prunekit.recipes import small_classifier
from prunekit.reproduce.common import markdown_table, mean_spread, new_figure, open_store, save_figure, torch_threads
from prunekit.reproduce.runs import method_schedule, train_and_prune
from prunekit.schedules import Schedule
from prunekit.targets import check_sparsity
from prunekit.train import TrainConfig

__all__ = ["CASES", "ITERATIVE_ROUNDS", "METHODS", "ONESHOT_AT", "SPARSITIES", "Case", "run", "schedule_for", "summarize",
           "table"]


@dataclass(frozen=True)
class Case:
    """A model/data pair, its dense training epochs (pruned runs get twice as many) and peak learning rate."""

    model: str
    data: str
    dense_epochs: int
    lr: float = 0.1


#: LeNet-5 is ~10x slower per epoch than LeNet-300-100 on 2 CPU cores, so its dense budget is 4 epochs. At the
#: recipe's peak learning rate 0.1 the Caffe LeNet-5 (no nonlinearity after its convolutions) diverges (NaN loss
#: after one epoch on 12k images); 0.05 trains (validation 96.3% after that epoch; 0.02: 94.4%), so its runs, dense
#: and pruned, use 0.05.
CASES = (Case("lenet5", "mnist", 4, lr=0.05), Case("lenet300", "fashion-mnist", 10))
SPARSITIES = (0.9, 0.95, 0.98)
METHODS = ("oneshot", "iterative", "gradual")
ONESHOT_AT = 0.25  # fraction of the budget trained dense before the single prune
ITERATIVE_ROUNDS = 5


def schedule_for(method: str, epochs: int) -> Callable[[int], Schedule | None]:
    """``steps_per_epoch -> schedule`` of ``method`` (``dense`` or one of :data:`METHODS`) in an ``epochs`` budget.

    Examples:
        >>> schedule_for("iterative", 8)(100)  # rounds at 25%, 31.25%, ... 50% of 800 steps
        Iterative(rounds=5, every=50, start=200)
        >>> schedule_for("oneshot", 8)(100)
        OneShot(at=200)
    """
    if method not in ("dense", *METHODS):
        raise ValueError(f"unknown method {method!r}; choose from {['dense', *METHODS]}")
    return method_schedule(method, small_classifier(epochs), oneshot_at=ONESHOT_AT, rounds=ITERATIVE_ROUNDS,
                           iterative_start=ONESHOT_AT)


def run(out_dir: str | Path, *, quick: bool = False, seeds: Sequence[int] = (0,), progress: bool = True,
        stem: str = "gradual_vs_oneshot") -> dict[str, Any]:
    """Run (or resume) the grid; write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``out_dir``.

    Args:
        out_dir: Output directory; finished configurations in ``<stem>.json`` are skipped.
        quick: Tiny pipeline check: 2,000 training images, 1 dense / 2 pruned epochs, 90% only.
        seeds: Seeds to run.
        progress: Print a line per finished configuration.
        stem: File name stem (the benchmark script keeps its historical name).

    Returns:
        The results document (``runs`` and ``summary``).

    Raises:
        ValueError: No seeds, or ``out_dir`` holds results of another configuration.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must name at least one seed, e.g. seeds=(0,)")
    with torch_threads(1 if quick else None):
        return _run(Path(out_dir), quick, seeds, progress, stem)


def _run(out_dir: Path, quick: bool, seeds: list[int], progress: bool, stem: str) -> dict[str, Any]:
    cases = [dataclasses.replace(c, dense_epochs=1) for c in CASES] if quick else list(CASES)
    sparsities = [0.9] if quick else list(SPARSITIES)
    for s in sparsities:
        check_sparsity(s)
    subset = 2000 if quick else None
    config = {"quick": quick, "train_split": "train_full", "eval_split": "test", "subset": subset,
              "oneshot_at": ONESHOT_AT, "iterative_rounds": ITERATIVE_ROUNDS, "sparsities": sparsities,
              "cases": [{"model": c.model, "data": c.data, "dense_epochs": c.dense_epochs,
                         "pruned_epochs": 2 * c.dense_epochs} for c in cases]}
    store = open_store(out_dir / f"{stem}.json", stem, config)
    for case in cases:
        for seed in seeds:
            jobs = [("dense", 0.0)] + [(m, s) for s in sparsities for m in METHODS]
            for method, s in jobs:
                key = f"{case.model}/{case.data}/{method}/{s}/seed{seed}"
                if store.done(key):
                    continue
                t = time.time()
                epochs = case.dense_epochs if method == "dense" else 2 * case.dense_epochs
                recipe = dataclasses.replace(small_classifier(epochs), lr=case.lr)
                tcfg = (TrainConfig(epochs=epochs, seed=seed, lr=case.lr) if method == "dense"
                        else recipe.train_config(seed))
                rec = train_and_prune(model_name=case.model, data_name=case.data,
                                      tool="dense" if method == "dense" else "prunekit", sparsity=s, seed=seed,
                                      tcfg=tcfg, schedule_fn=schedule_for(method, epochs),
                                      allocation=recipe.allocation, train_split="train_full", eval_splits=("test",),
                                      subset=subset)
                rec.update(method=method, recipe=recipe.to_dict() if method != "dense" else None)
                store.put(key, rec)
                if progress:
                    print(f"{key}: test {rec['test_accuracy']:.2%} sparsity {rec['achieved_sparsity']:.4f} "
                          f"({time.time() - t:.0f}s)", flush=True)
    rows = summarize(store.runs, cases, sparsities)
    store.doc["summary"] = rows
    store.save()
    write_text(out_dir / f"{stem}.md", table(rows, cases, sparsities))
    plot(rows, cases, sparsities, out_dir / f"{stem}.png")
    return store.doc


def summarize(runs: dict[str, Any], cases: Sequence[Case], sparsities: Sequence[float]) -> list[dict[str, Any]]:
    """Per case, method and sparsity: mean and spread of test accuracy over the finished seeds."""
    rows = []
    for c in cases:
        for method in ("dense", *METHODS):
            for s in [0.0] if method == "dense" else sparsities:
                recs = [r for r in runs.values() if r["model"] == c.model and r["data"] == c.data
                        and r["method"] == method and r["sparsity"] == s]
                if recs:
                    rows.append({"model": c.model, "data": c.data, "method": method, "sparsity": s,
                                 "achieved_sparsity": recs[0]["achieved_sparsity"],
                                 **mean_spread([r["test_accuracy"] for r in recs])})
    return rows


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "—"
    return f"{row['mean']:.2%}" + (f" ± {row['std']:.2%}" if row["n"] > 1 else "")


def table(rows: list[dict[str, Any]], cases: Sequence[Case], sparsities: Sequence[float]) -> str:
    """Markdown: one row per case and sparsity, test accuracy per method, dense reference."""
    def find(c: Case, method: str, s: float) -> dict[str, Any] | None:
        return next((r for r in rows if r["model"] == c.model and r["data"] == c.data and r["method"] == method
                     and r["sparsity"] == s), None)

    body = [[c.model, c.data, f"{s:.0%}", *(_cell(find(c, m, s)) for m in METHODS), _cell(find(c, "dense", 0.0))]
            for c in cases for s in sparsities]
    budget = ", ".join(f"{c.model} {c.dense_epochs} dense / {2 * c.dense_epochs} pruned at peak lr {c.lr:g}" for c in cases)
    return (f"Test accuracy at an equal training budget (epochs: {budget}); one-shot prunes at {ONESHOT_AT:.0%} of "
            f"the budget, iterative runs {ITERATIVE_ROUNDS} rounds from there to the end of the gradual ramp.\n\n"
            + markdown_table(["model", "data", "sparsity", "one-shot", "iterative", "gradual", "dense"], body))


def plot(rows: list[dict[str, Any]], cases: Sequence[Case], sparsities: Sequence[float], path: Path) -> None:
    """Test accuracy vs sparsity per case, one line per method, dense as a horizontal line."""
    fig, axes = new_figure(5 * len(cases), 4, ncols=len(cases))
    axes = list(axes) if len(cases) > 1 else [axes]
    for ax, c in zip(axes, cases):
        for method, color in (("oneshot", "tab:blue"), ("iterative", "tab:orange"), ("gradual", "tab:green")):
            pts = [(i, r) for i, s in enumerate(sparsities) for r in rows
                   if r["model"] == c.model and r["data"] == c.data and r["method"] == method and r["sparsity"] == s]
            if pts:
                ax.errorbar([i for i, _ in pts], [100 * r["mean"] for _, r in pts],
                            yerr=[100 * r["std"] for _, r in pts], fmt="o-", color=color, capsize=3,
                            label=f"{method} ({2 * c.dense_epochs} epochs)")
        dense = next((r for r in rows if r["model"] == c.model and r["data"] == c.data and r["method"] == "dense"),
                     None)
        if dense:
            ax.axhline(100 * dense["mean"], color="k", lw=1, label=f"dense ({c.dense_epochs} epochs)")
        ax.set_xticks(range(len(sparsities)), [f"{100 * s:g}%" for s in sparsities])
        ax.set_title(f"{c.model} on {c.data}")
        ax.set_xlabel("sparsity")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Gradual vs one-shot vs iterative pruning at an equal training budget")
    fig.tight_layout()
    save_figure(fig, path)
