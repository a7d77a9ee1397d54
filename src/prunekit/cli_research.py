"""Research subcommands of the ``prunekit`` CLI: ``reproduce`` and ``search`` (registered by :mod:`prunekit.cli`)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from prunekit.checkpoint import load_weights, save
from prunekit.config import check_out_dir
from prunekit.data import DATASETS
from prunekit.fileformat import json_text, write_text
from prunekit.models import MODELS, get_model
from prunekit.reproduce import EXPERIMENTS, run
from prunekit.reproduce.common import data_splits
from prunekit.search import search
from prunekit.train import TrainConfig, evaluate, train

__all__ = ["add_parsers"]


def _reproduce(args: argparse.Namespace) -> int:
    out = check_out_dir(args.out or f"runs/reproduce/{args.experiment}{'-quick' if args.quick else ''}")
    run(args.experiment, out, quick=args.quick, progress=not args.quiet)
    for md in sorted(out.glob("*.md")):
        print(md.read_text())
    print(f"results: {out}/ (JSON, markdown table, PNG)")
    return 0


def check_search_arguments(args: argparse.Namespace) -> None:
    """Validate the flags of ``prunekit search`` before any data is loaded, any model trained or any file written.

    Args:
        args: The parsed ``search`` flags.

    Raises:
        ValueError: Naming the flag, its value and the values it takes.
    """
    checks = [
        (0 <= args.max_drop < 1, f"--max-drop {args.max_drop:g}: expected an allowed accuracy drop in [0, 1) "
                                 "(0.005 = half a point)"),
        (0 < args.high < 1, f"--high {args.high:g}: expected the highest sparsity to try, in (0, 1) (e.g. 0.995)"),
        (0 < args.tolerance < args.high, f"--tolerance {args.tolerance:g}: expected a bracket width > 0 and below "
                                         f"--high {args.high:g} (e.g. 0.005); 0 would try the same sparsity again "
                                         "and again"),
        (args.dense_epochs >= 0, f"--dense-epochs {args.dense_epochs}: expected a number of epochs >= 0"),
        (args.finetune_epochs >= 0, f"--finetune-epochs {args.finetune_epochs}: expected a number of epochs >= 0"),
        (0 < args.lr < float("inf"), f"--lr {args.lr:g}: the peak learning rate must be a positive number "
                                     "(e.g. 0.05)"),
        (args.train_subset is None or args.train_subset >= 1,
         f"--train-subset {args.train_subset}: expected a number of examples >= 1 (omit the flag to use all)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if args.weights and not Path(args.weights).is_file():
        raise FileNotFoundError(f"--weights {args.weights}: no weights file there; give a prunekit checkpoint or a "
                                ".pt/.pth state dict, or drop --weights to train the dense model first")


def _search(args: argparse.Namespace) -> int:
    check_search_arguments(args)
    out = check_out_dir(args.out or f"runs/search/{args.model}-{args.data}-drop{args.max_drop}")
    train_data, val, test = data_splits(args.data, args.train_subset)
    torch.manual_seed(args.seed)
    model = get_model(args.model)
    if args.weights:
        load_weights(model, args.weights)
    else:
        print(f"training the dense {args.model} for {args.dense_epochs} epochs", flush=True)
        train(model, train_data, TrainConfig(epochs=args.dense_epochs, seed=args.seed), progress=not args.quiet)
    tune = TrainConfig(epochs=args.finetune_epochs, lr=args.lr, seed=args.seed)
    result = search(
        model,
        lambda m, p: train(m, train_data, tune, pruner=p, progress=not args.quiet),
        lambda m: evaluate(m, val).accuracy,
        max_drop=args.max_drop, high=args.high, tolerance=args.tolerance, allocation=args.allocation,
    )
    doc = {**result.to_dict(), "test_accuracy": evaluate(model, test).accuracy}
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "search.json", json_text(doc, indent=2))
    save(model, out / "model.safetensors", extra={"search": result.to_dict()})
    for t in result.trials:
        print(f"  sparsity {t.sparsity:.2%}: validation {t.metric:.2%} {'ok' if t.passed else 'too low'}")
    print(result.message)
    print(f"test accuracy {doc['test_accuracy']:.2%}; files: {out}/search.json, {out}/model.safetensors")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``reproduce`` and ``search`` on the CLI's subparsers."""
    rep = sub.add_parser(
        "reproduce", help="re-run a published pruning result: JSON + markdown table + PNG",
        description="Re-run a published pruning result into an output directory (JSON with the command and "
        "environment, a markdown table, a PNG plot). Finished configurations are saved as they finish and skipped "
        "when the same command runs again, so long experiments can be resumed.",
        epilog="experiments: lottery (lottery tickets, LeNet-300-100 / MNIST); sensitivity (per-layer sensitivity "
        "curves and allocation); gradual-vs-oneshot (gradual vs one-shot vs iterative at an equal training budget, "
        "LeNet-5 / MNIST and LeNet-300-100 / Fashion-MNIST); large-vs-small (large-sparse vs small-dense at equal "
        "non-zeros: LeNet-300-100 on MNIST and Fashion-MNIST, then a 2-layer LSTM language model on Jane Austen, "
        "about 30 minutes per LSTM on 2 cores); large-vs-small-lstm (only its LSTM part).")
    rep.add_argument("experiment", choices=sorted(EXPERIMENTS), help="which experiment (see below)")
    rep.add_argument("--quick", action="store_true", help="tiny version that checks the pipeline in ~a minute")
    rep.add_argument("--out", default=None, help="output directory (default: runs/reproduce/<experiment>)")
    rep.add_argument("--quiet", action="store_true", help="no progress output")
    rep.set_defaults(func=_reproduce)

    se = sub.add_parser("search", help="highest sparsity whose validation accuracy drops at most --max-drop",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    se.add_argument("--model", required=True, choices=sorted(MODELS))
    se.add_argument("--data", required=True, choices=sorted(DATASETS))
    se.add_argument("--weights", default=None, help="trained dense weights (else the model is trained first)")
    se.add_argument("--dense-epochs", type=int, default=10, help="epochs of dense training without --weights")
    se.add_argument("--max-drop", type=float, default=0.005, help="allowed validation accuracy drop (0.005 = 0.5 pt)")
    se.add_argument("--finetune-epochs", type=int, default=2, help="fine-tuning budget per tried sparsity")
    se.add_argument("--lr", type=float, default=0.05, help="peak learning rate of each fine-tuning run")
    se.add_argument("--high", type=float, default=0.995, help="highest sparsity considered")
    se.add_argument("--tolerance", type=float, default=0.005, help="stop when the bracket is this narrow")
    se.add_argument("--allocation", default="global", choices=["global", "uniform", "erk", "lamp"])
    se.add_argument("--train-subset", type=int, default=None, help="use only the first N examples of each split")
    se.add_argument("--seed", type=int, default=0)
    se.add_argument("--out", default=None, help="output directory")
    se.add_argument("--quiet", action="store_true", help="no progress output")
    se.set_defaults(func=_search)
