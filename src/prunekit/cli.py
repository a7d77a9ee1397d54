"""The ``prunekit`` command line: ``demo``, ``prune``, ``report`` and ``export`` (:mod:`prunekit.cli_export`).

Every run writes into one directory (by default ``runs/<model>-<data>-<config hash>``): ``config.json``,
``checkpoint.safetensors`` (after every epoch; a rerun with the same configuration resumes from it, or only prints
the result if the run is complete), ``history.json``, ``metrics.json``, ``report.txt``/``report.json`` and
``sparsity.png``. Bad input ends with a one-line error and exit status 2, never a traceback (set
``PRUNEKIT_DEBUG=1`` to see one).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.checkpoint import load, load_weights, save
from prunekit.config import (
    PruneConfig,
    add_arguments,
    build_pruner,
    check_out_dir,
    check_schedule,
    config_hash,
    from_arguments,
)
from prunekit.data.fetch import FetchError
from prunekit.data.vision import DATASETS, load_dataset
from prunekit.fileformat import FileFormatError, json_text, write_text
from prunekit.models import MODELS, get_model
from prunekit.pruner import Pruner
from prunekit.report import report, report_run
from prunekit.schedules import Gradual
from prunekit.targets import check_sparsity
from prunekit.train import TrainConfig, TrainingDiverged, evaluate, make_optimizer, train

__all__ = ["main"]

INPUT_SHAPE = (1, 1, 28, 28)  # every built-in model takes one 28x28 grayscale image


def _say(msg: str) -> None:
    print(msg, flush=True)


def _write_json(path: Path, doc: Any) -> None:
    write_text(path, json_text(doc, indent=2, sort_keys=True))


def _write_report(model: nn.Module, pruner: Pruner | None, out: Path) -> str:
    rep = report(model, pruner.masks if pruner is not None else None, example_inputs=torch.zeros(INPUT_SHAPE))
    text = str(rep)
    write_text(out / "report.txt", text + "\n")
    rep.to_json(out / "report.json")
    rep.plot(out / "sparsity.png")
    return text


# ------------------------------------------------------------------------------------------------------------------
# prunekit prune


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none (or the help text already states it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


#: Default peak learning rates where TrainConfig's (0.1) is too high: LeNet-5 diverges at 0.1 with this recipe.
MODEL_LR = {"lenet5": 0.05}


def _check(ok: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok`` (NaN comparisons are False, so NaN flags fail their checks)."""
    if not ok:
        raise ValueError(message)


def _check_output_file(path: str | None, flag: str, example: str) -> None:
    """Check that an output file flag names neither a directory nor a file inside a file."""
    if path is None:
        return
    target = Path(path)
    _check(not target.is_dir(), f"{flag} {path} is a directory: give a file name, e.g. {flag} {target / example}")
    for parent in target.parents:
        _check(not parent.exists() or parent.is_dir(),
               f"{flag} {path}: {parent} is a file, not a directory; choose another {flag}")


def check_train_arguments(args: argparse.Namespace) -> None:
    """Validate the data and training flags of ``prunekit prune`` before anything is loaded, trained or written.

    Args:
        args: The parsed ``prune`` flags (``--lr`` already resolved).

    Raises:
        ValueError: Naming the flag, its value and the values it takes.
    """
    _check(args.width > 0, f"--width {args.width:g}: the width multiplier must be > 0 (1 = the standard model)")
    _check(args.train_subset is None or args.train_subset >= 1,
           f"--train-subset {args.train_subset}: expected a number of training examples >= 1 (omit the flag to "
           "train on all of them)")
    _check(args.epochs >= 0, f"--epochs {args.epochs}: expected a number of epochs >= 0")
    _check(args.batch_size >= 1, f"--batch-size {args.batch_size}: expected at least 1 example per step (e.g. 128)")
    _check(args.lr > 0 and args.lr != float("inf"), f"--lr {args.lr:g}: the peak learning rate must be a positive "
           f"number (e.g. {MODEL_LR.get(args.model, TrainConfig.lr)})")
    _check(0 <= args.momentum < 1, f"--momentum {args.momentum:g}: expected a value in [0, 1) (0.9 is usual, 0 = "
           "plain SGD)")
    _check(0 <= args.weight_decay < float("inf"), f"--weight-decay {args.weight_decay:g}: expected a value >= 0 "
           "(e.g. 5e-4; 0 = none)")
    _check(0 <= args.label_smoothing < 1, f"--label-smoothing {args.label_smoothing:g}: expected a value in [0, 1) "
           "(e.g. 0.1; 0 = none)")
    _check(0 <= args.distill <= 1, f"--distill {args.distill:g}: expected a loss weight in [0, 1] (0 = none)")
    _check(not args.distill or bool(args.weights),
           "--distill needs --weights: the trained dense model is the teacher of its pruned self")
    _check(0 < args.temperature < float("inf"), f"--temperature {args.temperature:g}: the distillation temperature "
           "must be > 0 (e.g. 4)")
    _check(args.shift >= 0, f"--shift {args.shift}: expected a number of pixels >= 0 (0 = no shift)")


def _prune(args: argparse.Namespace) -> int:
    from prunekit.structured.cli import DEFAULT_CRITERION
    from prunekit.structured.cli import check_arguments as check_structured_arguments

    if getattr(args, "lr", 0.0) is None:
        args.lr = MODEL_LR.get(args.model, TrainConfig.lr)
    if args.criterion is None:
        args.criterion = DEFAULT_CRITERION if args.structured else PruneConfig.criterion
    check_train_arguments(args)
    check_structured_arguments(args)  # its flags need --structured
    if args.structured:  # prunekit prune --structured: prunekit.structured.cli
        from prunekit.structured.cli import run as run_structured

        return run_structured(args)
    tcfg = from_arguments(args, TrainConfig)
    pcfg = from_arguments(args, PruneConfig)
    check_schedule(pcfg, tcfg.epochs)  # the flags alone; _run checks again with the number of steps per epoch
    doc = {
        "model": args.model,
        "width": args.width,
        "data": args.data,
        "train_subset": args.train_subset,
        "weights": str(args.weights) if args.weights else None,
        "train": dataclasses.asdict(tcfg),
        "prune": dataclasses.asdict(pcfg),
    }
    doc["prune"]["include"], doc["prune"]["exclude"] = list(pcfg.include), list(pcfg.exclude)
    out = Path(args.out) if args.out else Path("runs") / f"{args.model}-{args.data}-{config_hash(doc)}"
    _run(doc, tcfg, pcfg, out, data_dir=args.data_dir, progress=not args.quiet)
    return 0


#: Python-argument advice in library errors and its command-line wording.
_FLAG_WORDING = (
    ("Pass include=['<glob>'] to name the tensors to prune explicitly.",
     "Use --include GLOB [GLOB ...] to name the tensors to prune explicitly."),
    ("include pattern ", "--include pattern "),
    ("exclude pattern ", "--exclude pattern "),
    ("include=", "--include "),
    ("exclude=", "--exclude "),
)


def _flag_wording(message: str) -> str:
    """``message`` with the Python-argument advice of a library error reworded as command-line flags."""
    for python, flag in _FLAG_WORDING:
        message = message.replace(python, flag)
    return message


def _run(doc: dict[str, Any], tcfg: TrainConfig, pcfg: PruneConfig, out: Path, *, data_dir: str | None,
         progress: bool) -> dict[str, Any]:
    """Train/prune as ``doc`` says into ``out``, resuming from ``out/checkpoint.safetensors`` if present.

    Everything that can fail on bad input (data, model, weights, pruner, schedule) runs before ``out`` is created
    or ``config.json`` written, so a rejected run leaves nothing behind.
    """
    config_file, ckpt_file = out / "config.json", out / "checkpoint.safetensors"
    check_out_dir(out)
    if config_file.exists():
        existing = json.loads(config_file.read_text())
        if existing != doc:
            raise ValueError(
                f"{out} holds a run with another configuration ({config_file}); choose another --out or delete it"
            )

    train_data = load_dataset(doc["data"], "train", data_dir)
    if doc.get("train_subset"):
        n = doc["train_subset"]
        train_data = torch.utils.data.TensorDataset(*(t[:n] for t in train_data.tensors))
    val_data = load_dataset(doc["data"], "val", data_dir)
    test_data = load_dataset(doc["data"], "test", data_dir)
    torch.manual_seed(tcfg.seed)
    model = get_model(doc["model"], width=doc["width"])
    if doc["weights"]:
        load_weights(model, doc["weights"])
    teacher = None
    if tcfg.distill:
        if not doc["weights"]:
            raise ValueError("--distill needs --weights: the trained dense model is the teacher of its pruned self")
        teacher = copy.deepcopy(model)
    steps_per_epoch = tcfg.steps_per_epoch(len(train_data))
    try:
        pruner = build_pruner(model, pcfg, steps_per_epoch, tcfg.epochs if pcfg.sparsity > 0 else None)
    except ValueError as exc:
        raise ValueError(_flag_wording(str(exc))) from None
    opt, sched = make_optimizer(model, tcfg, steps_per_epoch * tcfg.epochs)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    before = evaluate(model, test_data) if doc["weights"] else None
    if ckpt_file.exists():
        ckpt = load(ckpt_file, model, optimizer=opt, scheduler=sched)
        pruner = ckpt.pruner or pruner
        start_epoch = int(ckpt.extra["epoch"])
        history = list(ckpt.extra["history"])
        before = ckpt.extra.get("before")
        _say(f"resuming {out} at epoch {start_epoch}/{tcfg.epochs}")
    else:
        before = before.to_dict() if before is not None else None
    out.mkdir(parents=True, exist_ok=True)  # every check passed: the run directory starts here
    _write_json(config_file, doc)

    def on_epoch(epoch: int, record: dict[str, Any]) -> None:
        history.append(record)
        save(model, ckpt_file, pruner=pruner, optimizer=opt, scheduler=sched,
             extra={"epoch": epoch + 1, "history": history, "before": before})
        if progress:
            _say(f"epoch {epoch + 1}/{tcfg.epochs}: train loss {record['train_loss']:.4f}, "
                 f"val accuracy {record['eval_accuracy']:.2%}, sparsity {record.get('sparsity', 0):.2%}")

    t0 = time.perf_counter()
    train(model, train_data, tcfg, pruner=pruner, eval_data=val_data, progress=progress, on_epoch=on_epoch,
          optimizer=opt, scheduler=sched, start_epoch=start_epoch, teacher=teacher)
    test = evaluate(model, test_data)
    metrics = {"test_accuracy": test.accuracy, "test_loss": test.loss, "sparsity": pruner.masks.sparsity(),
               "val_accuracy": history[-1]["eval_accuracy"] if history else None,
               "before": before, "train_seconds_this_session": time.perf_counter() - t0}
    _write_json(out / "history.json", history)
    _write_json(out / "metrics.json", metrics)
    text = _write_report(model, pruner, out)
    _say(text)
    _say(f"test accuracy {test.accuracy:.2%} at sparsity {pruner.masks.sparsity():.2%}; run directory: {out}")
    return metrics


# ------------------------------------------------------------------------------------------------------------------
# prunekit report


def _report(args: argparse.Namespace) -> int:
    path = Path(args.path)
    config_file = (path if path.is_dir() else path.parent) / "config.json"
    if args.width is not None and not args.model:
        raise ValueError(f"--width {args.width:g} sets the width of --model's architecture; without --model the "
                         f"architecture and its width come from {config_file}: add --model or drop --width")
    _check(args.width is None or args.width > 0, f"--width {args.width}: the width multiplier must be > 0 "
           "(1 = the standard model)")
    _check_output_file(args.json, "--json", "report.json")
    _check_output_file(args.plot, "--plot", "sparsity.png")
    if not path.exists():
        raise ValueError(f"no such file or run directory: {path}")
    if not args.model and not config_file.exists():
        raise ValueError(f"no config.json next to {path}: pass --model to name the architecture "
                         f"(one of {sorted(MODELS)})")
    # report_run finds the run's files; a structured run is reported as its physically pruned model
    rep = report_run(args.path, model=args.model or None, width=1.0 if args.width is None else args.width,
                     example_inputs=torch.zeros(INPUT_SHAPE))
    if args.json:
        rep.to_json(args.json)
    if args.plot:
        rep.plot(args.plot)
    _say(str(rep))
    return 0


# ------------------------------------------------------------------------------------------------------------------
# prunekit demo


def _demo(args: argparse.Namespace) -> int:
    """Train LeNet-300-100 on MNIST, prune it gradually to the target sparsity while fine-tuning, report."""
    check_sparsity(args.sparsity, "--sparsity")
    _check(args.dense_epochs >= 0, f"--dense-epochs {args.dense_epochs}: expected a number of epochs >= 0")
    _check(args.prune_epochs >= 1, f"--prune-epochs {args.prune_epochs}: pruning happens while fine-tuning, so it "
           "needs at least 1 epoch (e.g. 8)")
    out = check_out_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _say("prunekit demo: LeNet-300-100 on MNIST, gradual magnitude pruning (Zhu & Gupta cubic schedule)")
    _say("1/4 fetching MNIST (cached after the first run)")
    train_data = load_dataset("mnist", "train_full", args.data_dir)
    test_data = load_dataset("mnist", "test", args.data_dir)
    torch.manual_seed(0)
    model = get_model("lenet300")
    dense_cfg = TrainConfig(epochs=args.dense_epochs, lr=0.1)
    _say(f"2/4 training the dense model for {dense_cfg.epochs} epochs")
    t0 = time.perf_counter()
    train(model, train_data, dense_cfg, progress=not args.quiet)
    dense = evaluate(model, test_data)
    _say(f"    dense test accuracy {dense.accuracy:.2%} ({time.perf_counter() - t0:.0f} s)")

    steps_per_epoch = dense_cfg.steps_per_epoch(len(train_data))
    prune_cfg = TrainConfig(epochs=args.prune_epochs, lr=0.05)
    every = steps_per_epoch // 4
    end = every * max(1, round(0.6 * args.prune_epochs * steps_per_epoch / every))
    pruner = Pruner(model, sparsity=args.sparsity, schedule=Gradual(start=0, end=end, every=every))
    _say(f"3/4 pruning gradually to {args.sparsity:.0%} over {end} steps while fine-tuning for "
         f"{prune_cfg.epochs} epochs")
    t0 = time.perf_counter()
    train(model, train_data, prune_cfg, pruner=pruner, progress=not args.quiet)
    pruned = evaluate(model, test_data)
    _say(f"    pruned test accuracy {pruned.accuracy:.2%} ({time.perf_counter() - t0:.0f} s)")
    save(model, out / "lenet300-pruned.safetensors", pruner=pruner,
         extra={"dense_accuracy": dense.accuracy, "pruned_accuracy": pruned.accuracy})
    _say("4/4 report")
    _say(_write_report(model, pruner, out))
    _say(f"\nbefore: {dense.accuracy:.2%} test accuracy with {pruner.masks.numel():,} weights")
    _say(f"after:  {pruned.accuracy:.2%} test accuracy with {pruner.masks.num_kept():,} non-zero weights "
         f"({pruner.masks.sparsity():.2%} sparse, {pruner.masks.numel() / max(pruner.masks.num_kept(), 1):.1f}x fewer)")
    _say(f"files: {out}/ (checkpoint, report.txt, report.json, sparsity.png)")
    return 0


# ------------------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunekit", description="Neural-network pruning for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="train LeNet-300-100 on MNIST, prune it gradually, print the report")
    demo.add_argument("--sparsity", type=float, default=0.95, help="final sparsity (default: 0.95)")
    demo.add_argument("--dense-epochs", type=int, default=8, help="epochs of dense training (default: 8)")
    demo.add_argument("--prune-epochs", type=int, default=8, help="epochs of pruning + fine-tuning (default: 8)")
    demo.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    demo.add_argument("--data-dir", default=None, help="directory holding the MNIST files (default: cache)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)

    prune = sub.add_parser("prune", help="train and prune a model on a data set; resumable run directory",
                           formatter_class=_HelpFormatter)
    prune.add_argument("--model", required=True, choices=sorted(MODELS), help="architecture")
    prune.add_argument("--width", type=float, default=1.0, help="width multiplier of the architecture")
    prune.add_argument("--data", required=True, choices=sorted(DATASETS), help="data set")
    prune.add_argument("--data-dir", default=None, help="directory holding the data files (default: cache)")
    prune.add_argument("--train-subset", type=int, default=None,
                       help="train on only the first N training examples (quick trials)")
    prune.add_argument("--weights", default=None,
                       help="start from these weights: a prunekit checkpoint or a .pt/.pth state dict")
    prune.add_argument("--out", default=None, help="run directory (default: runs/<model>-<data>-<config hash>)")
    prune.add_argument("--quiet", action="store_true", help="no progress output")
    add_arguments(prune, PruneConfig)
    add_arguments(prune, TrainConfig)
    lr_flag = next(a for a in prune._actions if a.dest == "lr")
    lr_flag.default = None  # resolved per model in _prune (MODEL_LR)
    lr_flag.help = (f"peak learning rate of the one-cycle schedule (default: {TrainConfig.lr}; "
                    + ", ".join(f"{v} for {k}" for k, v in MODEL_LR.items()) + ")")
    from prunekit.structured.cli import add_arguments as add_structured_arguments

    add_structured_arguments(prune)  # --structured and its options
    prune.set_defaults(func=_prune)

    rep = sub.add_parser("report", help="per-layer sparsity, parameters, MACs and size of a saved model")
    rep.add_argument("path", help="a run directory or a checkpoint file")
    rep.add_argument("--model", default=None, choices=sorted(MODELS), help="architecture (default: from config.json)")
    rep.add_argument("--width", type=float, default=None,
                     help="width multiplier of --model's architecture (default: 1; only with --model)")
    rep.add_argument("--json", default=None, help="also write the report as JSON here")
    rep.add_argument("--plot", default=None, help="also write the per-layer sparsity plot (PNG) here")
    rep.set_defaults(func=_report)

    from prunekit.cli_research import add_parsers

    add_parsers(sub)
    _add_llm(sub)
    from prunekit.cli_export import add_parser as add_export

    add_export(sub)
    return parser


def _add_llm(sub: Any) -> None:
    """The ``llm`` subcommand (one-shot LLM pruning) lives in prunekit.llm.cli; transformers is imported lazily."""
    from prunekit.llm.cli import add_parser

    add_parser(sub)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``prunekit`` command."""
    args = _parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    if os.environ.get("PRUNEKIT_DEBUG"):
        return func(args)
    try:
        return func(args)
    except (ValueError, TypeError, FetchError, FileFormatError, FileNotFoundError, FileExistsError, IsADirectoryError,
            NotADirectoryError, PermissionError, TrainingDiverged) as exc:
        print(f"prunekit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prunekit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
