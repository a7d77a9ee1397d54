"""Choose the prune-a-trained-model recipe (:func:`prunekit.recipes.from_trained`) on the MNIST validation split.

LeNet-300-100 trained densely for 10 epochs on ``train`` (55,000 images) is the starting point and the distillation
teacher; each variant prunes it to 99.5% (the hardest bar) in 10 epochs and is scored on ``val`` (5,000 held-out
images), never on the test set. One seed: the differences that decided the recipe are larger than the seed spread
seen in the grid. Results: ``benchmarks/results/lenet300_distill_search.{json,md}``.

Usage (from the repository root)::

    .venv/bin/python benchmarks/lenet300_distill_search.py            # every variant (~1 min each on 2 cores)
    .venv/bin/python benchmarks/lenet300_distill_search.py --quick    # smoke run into /tmp
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import RESULTS, ResultStore, dataset, fmt_pct  # noqa: E402

from prunekit.config import build_schedule  # noqa: E402
from prunekit.models import get_model  # noqa: E402
from prunekit.pruner import Pruner  # noqa: E402
from prunekit.recipes import Recipe, from_trained  # noqa: E402
from prunekit.reproduce.common import markdown_table  # noqa: E402
from prunekit.train import TrainConfig, evaluate, train  # noqa: E402

BASE = from_trained(10)
VARIANTS: dict[str, dict[str, object]] = {
    "chosen": {},
    "chosen, rerun": {},  # the same recipe again: how far the same seed moves between runs and code versions
    "no distillation": {"distill": 0.0},
    "distill weight 1.0": {"distill": 1.0},
    "temperature 2": {"temperature": 2.0},
    "temperature 8": {"temperature": 8.0},
    "lr 0.02": {"lr": 0.02},
    "lr 0.1": {"lr": 0.1},
    "ramp end 0.4": {"end": 0.4},
    "ramp end 0.8": {"end": 0.8},
    "global allocation": {"allocation": "global"},
    "lamp allocation": {"allocation": "lamp"},
    "batch 64": {"batch_size": 64},
    "batch 32": {"batch_size": 32},
    "weight decay 1e-4": {"weight_decay": 1e-4},
    "weight decay 5e-4": {"weight_decay": 5e-4},
    "linear ramp": {"exponent": 1.0},
    "quadratic ramp": {"exponent": 2.0},
    "ramp exponent 5": {"exponent": 5.0},
    "100 updates per epoch": {"updates_per_epoch": 100},
    "random shifts of 1 px": {"shift": 1},
    "random shifts of 2 px": {"shift": 2},
    "label smoothing 0.1": {"label_smoothing": 0.1},
    "lr 0.035": {"lr": 0.035},
    "lr 0.07": {"lr": 0.07},
    "temperature 3": {"temperature": 3.0},
    "temperature 5": {"temperature": 5.0},
    "distill weight 0.8": {"distill": 0.8},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 3,000 images, 1+1 epochs, 2 variants")
    ap.add_argument("--sparsity", type=float, default=0.995)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", default=None, help="run only these variants (names as in the table)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    subset, dense_epochs = (3000, 1) if args.quick else (None, 10)
    variants = dict(list(VARIANTS.items())[:2]) if args.quick else VARIANTS
    if args.only:
        unknown = sorted(set(args.only) - set(VARIANTS))
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
        variants = {k: v for k, v in VARIANTS.items() if k in args.only}
    out = Path("/tmp/prunekit-bench-quick" if args.quick else RESULTS) / "lenet300_distill_search.json"
    store = ResultStore(out, "lenet300_distill_search", {
        "model": "lenet300", "train_split": "train", "eval_split": "val", "sparsity": args.sparsity,
        "dense_epochs": dense_epochs, "base": BASE.to_dict(), "seed": 0})
    train_data, val = dataset("mnist", "train", subset), dataset("mnist", "val")
    torch.manual_seed(0)
    teacher = get_model("lenet300")
    train(teacher, train_data, TrainConfig(epochs=dense_epochs), progress=False)
    store.doc["dense_val_accuracy"] = evaluate(teacher, val).accuracy
    for name, change in variants.items():
        if store.done(name):
            continue
        recipe_fields = {f.name for f in dataclasses.fields(Recipe)}
        recipe_change = {k: v for k, v in change.items() if k in recipe_fields}
        train_change = {k: v for k, v in change.items() if k not in recipe_fields}  # e.g. shift (TrainConfig only)
        recipe: Recipe = dataclasses.replace(BASE, **recipe_change, **({"epochs": 1} if args.quick else {}))
        student = get_model("lenet300")
        student.load_state_dict(teacher.state_dict())
        tcfg = dataclasses.replace(recipe.train_config(seed=0), **train_change)
        spe = tcfg.steps_per_epoch(len(train_data))
        pruner = Pruner(student, args.sparsity, schedule=build_schedule(recipe.prune_config(args.sparsity), spe),
                        allocation=recipe.allocation)
        t = time.time()
        train(student, train_data, tcfg, pruner=pruner, progress=False, teacher=teacher if recipe.distill else None)
        acc = evaluate(student, val).accuracy
        store.put(name, {"change": change, "recipe": recipe.to_dict(), "val_accuracy": acc,
                         "sparsity": pruner.masks.sparsity(), "seconds": round(time.time() - t, 1)})
        print(f"{name}: val {fmt_pct(acc)} ({time.time() - t:.0f}s)", flush=True)
    rows = [[n, str(r["change"] or "—"), fmt_pct(r["val_accuracy"])] for n, r in store.runs.items()]
    text = (f"Dense LeNet-300-100 (val {fmt_pct(store.doc['dense_val_accuracy'])}) pruned to "
            f"{100 * args.sparsity:g}% in {1 if args.quick else BASE.epochs} epochs; validation accuracy (%), seed 0. "
            f"Generated by {', '.join(f'`{c}`' for c in store.doc['commands'])}.\n\n" + markdown_table(["variant", "change to the base", "val"], rows))
    store.save()
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
