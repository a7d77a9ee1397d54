"""Reproduction: per-layer sensitivity of a trained LeNet-300-100 (MNIST), and allocation from the curves.

Prunes one layer at a time across a sweep without retraining (validation accuracy), then compares one-shot pruning
with fine-tuning under the global-magnitude allocation and under the sensitivity-derived allocation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from prunekit.models import get_model
from prunekit.pruner import Pruner
from prunekit.reproduce.common import data_splits, markdown_table
from prunekit.reproduce.store import ResultStore
from prunekit.sensitivity import sensitivity
from prunekit.train import TrainConfig, evaluate, train

__all__ = ["run"]

SWEEP = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


def run(out_dir: str | Path, *, quick: bool = False, target: float = 0.98, progress: bool = True) -> dict[str, Any]:
    """Train, sweep, allocate, fine-tune; write ``sensitivity.json``, ``sensitivity.md`` and ``sensitivity.png``."""
    out = Path(out_dir)
    store = ResultStore(out / "sensitivity.json", "sensitivity", {"quick": quick, "target": target})
    train_data, val, test = data_splits("mnist", 2000 if quick else None)
    dense_cfg = TrainConfig(epochs=1 if quick else 10)
    tune_cfg = TrainConfig(epochs=1 if quick else 5, lr=0.05)
    torch.manual_seed(0)
    model = get_model("lenet300")
    train(model, train_data, dense_cfg, progress=progress)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    curves = sensitivity(model, lambda m: evaluate(m, val).accuracy, SWEEP, progress=progress)
    curves.plot(out / "sensitivity.png", metric="validation accuracy")
    allocation = curves.allocate(target)
    store.put("curves", {**curves.to_dict(), "allocation": allocation,
                         "dense_test_accuracy": evaluate(model, test).accuracy})
    for name, overrides in (("global", None), ("sensitivity", allocation)):
        if store.done(name):
            continue
        model.load_state_dict(dense_state)
        pruner = Pruner(model, target, allocation="global" if overrides is None else "uniform", overrides=overrides)
        pruner.step()
        one_shot = evaluate(model, test).accuracy
        train(model, train_data, tune_cfg, pruner=pruner, progress=progress)
        store.put(name, {"sparsity": pruner.masks.sparsity(), "per_tensor": pruner.masks.sparsities(),
                         "test_accuracy_before_finetune": one_shot, "test_accuracy": evaluate(model, test).accuracy})
    rows = [[n, f"{store.runs[n]['sparsity']:.2%}", f"{store.runs[n]['test_accuracy_before_finetune']:.2%}",
             f"{store.runs[n]['test_accuracy']:.2%}",
             ", ".join(f"{k} {v:.1%}" for k, v in store.runs[n]["per_tensor"].items())]
            for n in ("global", "sensitivity")]
    text = (f"Dense test accuracy {store.runs['curves']['dense_test_accuracy']:.2%}. One-shot to {target:.0%} then "
            f"{tune_cfg.epochs} epochs of fine-tuning:\n\n"
            + markdown_table(["allocation", "sparsity", "one-shot", "after fine-tuning", "per tensor"], rows))
    (out / "sensitivity.md").write_text(text)
    return store.doc
