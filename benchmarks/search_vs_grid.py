"""Accuracy-constrained search vs an exhaustive grid: LeNet-300-100 / MNIST, at most 0.5 pt validation drop.

Issue 6 bar: ``prunekit.search`` finds a sparsity within 1 percentage point of the best one an exhaustive grid
(0.5-point steps) finds under the same constraint and fine-tuning budget, using at most a third of the grid's compute.

Protocol (one seed):

* **Dense**: LeNet-300-100 trained on MNIST ``train`` (55,000 images) with the default recipe (SGD Nesterov,
  one-cycle LR 0.1, batch 128, ``--dense-epochs`` epochs). The constraint is on the ``val`` split (5,000 images held
  out of training): validation accuracy >= dense validation accuracy - ``--max-drop``. Test accuracy is reported, never
  used.
* **A trial** (both methods, identical): prune to sparsity ``s`` with global magnitude (``Pruner(..., Manual())``,
  ``pruner.update(s)``), fine-tune ``--finetune-epochs`` epochs (same recipe, LR ``--lr``, masks re-applied after
  every step), evaluate on ``val``.
* **Grid**: every sparsity 0.5%, 1.0%, ..., 99.5% (199 trials), each from the dense model; its answer is the highest
  sparsity that meets the constraint.
* **Search**: :func:`prunekit.search` from the dense model (geometric bisection on density, warm-started from the
  last accepted model, ``high=0.995``, ``tolerance=0.005``).
* **Compute**: fine-tuning epochs (trials x budget) and wall-clock seconds of the trials.

Results: ``benchmarks/results/search_vs_grid[_quick].json`` (each grid point saved as it finishes; a rerun skips
them), ``.md`` and ``.png`` (validation accuracy vs sparsity: the grid's curve and the search's trajectory).

Run (~25 min on 2 cores):  .venv/bin/python benchmarks/search_vs_grid.py
Smoke (~1 min):            .venv/bin/python benchmarks/search_vs_grid.py --quick
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import png_path, setup_torch, table  # noqa: E402
from _harness import RESULTS, ResultStore  # noqa: E402

from prunekit.fileformat import write_text  # noqa: E402
from prunekit.models import get_model  # noqa: E402
from prunekit.pruner import Pruner  # noqa: E402
from prunekit.reproduce.common import data_splits, new_figure, save_figure  # noqa: E402
from prunekit.schedules import Manual  # noqa: E402
from prunekit.search import search  # noqa: E402
from prunekit.train import TrainConfig, evaluate, train  # noqa: E402

NAME = "search_vs_grid"


def grid_points(quick: bool) -> list[float]:
    """0.5%, 1.0%, ..., 99.5% (quick: 50%, 60%, ..., 90%)."""
    return [round(0.1 * i, 3) for i in range(5, 10)] if quick else [round(0.005 * i, 3) for i in range(1, 200)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke: 5,000 training images, 5 grid points, 1 epoch")
    ap.add_argument("--max-drop", type=float, default=0.005)
    ap.add_argument("--dense-epochs", type=int, default=10)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.quick:
        args.dense_epochs, args.finetune_epochs = 1, 1
    setup_torch(args.threads, args.seed)
    stem = f"{NAME}{'_quick' if args.quick else ''}"
    meta = {"quick": args.quick, "max_drop": args.max_drop, "dense_epochs": args.dense_epochs,
            "finetune_epochs": args.finetune_epochs, "lr": args.lr, "seed": args.seed, "model": "lenet300",
            "data": "mnist"}
    store = ResultStore(RESULTS / f"{stem}.json", NAME, meta)
    train_data, val, test = data_splits("mnist", 5000 if args.quick else None)

    torch.manual_seed(args.seed)
    dense = get_model("lenet300")
    t0 = time.perf_counter()
    train(dense, train_data, TrainConfig(epochs=args.dense_epochs, seed=args.seed), progress=False)
    base_val, base_test = evaluate(dense, val).accuracy, evaluate(dense, test).accuracy
    store.doc["dense"] = {"val_accuracy": base_val, "test_accuracy": base_test,
                          "seconds": time.perf_counter() - t0}
    print(f"dense: val {base_val:.2%}, test {base_test:.2%}", flush=True)
    tune = TrainConfig(epochs=args.finetune_epochs, lr=args.lr, seed=args.seed)

    def finetune(model: nn.Module, pruner: Pruner) -> None:
        train(model, train_data, tune, pruner=pruner, progress=False)

    # --- grid: every point from the dense model
    for s in grid_points(args.quick):
        key = f"grid/{s:.3f}"
        if store.done(key):
            continue
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        pruner = Pruner(model, s, schedule=Manual())
        pruner.update(s)
        finetune(model, pruner)
        pruner.apply()
        record = {"sparsity": pruner.masks.sparsity(), "target": s, "val_accuracy": evaluate(model, val).accuracy,
                  "test_accuracy": evaluate(model, test).accuracy, "seconds": time.perf_counter() - t}
        record["passed"] = record["val_accuracy"] >= base_val - args.max_drop
        store.put(key, record)
        print(f"grid {s:.1%}: val {record['val_accuracy']:.2%} {'ok' if record['passed'] else 'too low'} "
              f"({record['seconds']:.0f} s)", flush=True)

    # --- search
    if not store.done("search"):
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        result = search(model, finetune, lambda m: evaluate(m, val).accuracy, max_drop=args.max_drop)
        record = {**result.to_dict(), "test_accuracy": evaluate(model, test).accuracy,
                  "seconds": time.perf_counter() - t}
        store.put("search", record)
        print(result.message, flush=True)

    grid = sorted((r for k, r in store.runs.items() if k.startswith("grid/")), key=lambda r: r["target"])
    found = store.runs["search"]
    passing = [r for r in grid if r["passed"]]
    best = max(passing, key=lambda r: r["sparsity"]) if passing else None
    grid_epochs = len(grid) * args.finetune_epochs
    search_epochs = len(found["trials"]) * args.finetune_epochs
    grid_seconds = sum(r["seconds"] for r in grid)
    summary: dict[str, Any] = {
        "grid_best_sparsity": best and best["sparsity"], "grid_best_val": best and best["val_accuracy"],
        "grid_best_test": best and best["test_accuracy"],
        "search_sparsity": found["sparsity"], "search_val": found["metric"], "search_test": found["test_accuracy"],
        "gap_points": None if best is None else 100 * (best["sparsity"] - found["sparsity"]),
        "grid_trials": len(grid), "search_trials": len(found["trials"]),
        "grid_finetune_epochs": grid_epochs, "search_finetune_epochs": search_epochs,
        "compute_fraction_epochs": search_epochs / grid_epochs,
        "grid_seconds": grid_seconds, "search_seconds": found["seconds"],
        "compute_fraction_seconds": found["seconds"] / grid_seconds,
    }
    summary["meets_bar"] = bool(best is not None and summary["gap_points"] <= 1.0
                                and summary["compute_fraction_epochs"] <= 1 / 3)
    store.doc["summary"] = summary
    store.save()
    rows = [["grid (0.5-pt steps)", f"{summary['grid_best_sparsity']:.2%}" if best else "none",
             f"{summary['grid_best_val']:.2%}" if best else "-", f"{summary['grid_best_test']:.2%}" if best else "-",
             str(len(grid)), str(grid_epochs), f"{grid_seconds:.0f}"],
            ["prunekit.search", f"{found['sparsity']:.2%}", f"{found['metric']:.2%}", f"{found['test_accuracy']:.2%}",
             str(len(found["trials"])), str(search_epochs), f"{found['seconds']:.0f}"]]
    text = table(rows, ["method", "highest sparsity within drop", "val acc", "test acc", "trials",
                        "fine-tune epochs", "seconds"])
    text += (f"\ndense: val {base_val:.2%}, test {base_test:.2%}; constraint: val >= {base_val - args.max_drop:.2%}\n"
             f"grid best - search: {summary['gap_points']:+.2f} points (bar: <= 1; negative = search went further); search used {summary['compute_fraction_epochs']:.1%} of the grid's "
             f"fine-tuning epochs ({summary['compute_fraction_seconds']:.1%} of its seconds); "
             f"bar met: {summary['meets_bar']}\n")
    write_text(RESULTS / f"{stem}.md", text)
    plot(grid, found, base_val - args.max_drop, png_path(NAME, args.quick))
    print(text)
    return 0


def plot(grid: list[dict[str, Any]], found: dict[str, Any], floor: float, path: Path) -> None:
    fig, ax = new_figure(8, 4.5)
    ax.plot([100 * r["sparsity"] for r in grid], [100 * r["val_accuracy"] for r in grid], ".-", color="0.6",
            label="grid: each sparsity from the dense model")
    xs = [100 * t["sparsity"] for t in found["trials"]]
    ys = [100 * t["metric"] for t in found["trials"]]
    ax.plot(xs, ys, "o--", color="C0", label="search trajectory (warm-started)")
    for i, (x, y) in enumerate(zip(xs, ys), 1):
        ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8, color="C0")
    ax.axhline(100 * floor, color="C3", ls=":", label="constraint (dense val - max drop)")
    ax.set_xlabel("sparsity %")
    ax.set_ylabel("validation accuracy %")
    ax.set_ylim(max(0.0, 100 * floor - 5), None)
    ax.legend(loc="lower left")
    ax.set_title("LeNet-300-100 / MNIST: highest sparsity within 0.5 pt")
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
