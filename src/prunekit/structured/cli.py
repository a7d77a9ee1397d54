"""``prunekit prune --structured``: structured pruning with fine-tuning from the command line.

Adds its flags to the ``prune`` subcommand (:func:`add_arguments`) and runs (:func:`run`) when ``--structured`` is
given: the model trains (from ``--weights`` or from scratch) while a :class:`~prunekit.structured.StructuredPruner`
zeroes channels on the ``--schedule`` (the same flags as unstructured pruning: ``--start``, ``--end``,
``--updates-per-epoch``, ``--rounds``), to ``--sparsity`` of each group or to a ``--macs``/``--params`` budget (spread
by ``--allocation global|uniform``), ranked by ``--criterion`` (``taylor``, ``activation`` and ``apoz`` calibrate on
the first ``--calibration-batches`` training batches). Optionally ``--drop-blocks N`` first removes the N residual
blocks that hurt least. At the end the channels are removed physically and the run directory gets
``model.safetensors`` (the small model's weights plus its plan, loadable with :func:`prunekit.structured.load` into a
fresh model), ``report.txt``/``report.json``/``report.png`` (parameters, MACs and measured CPU latency before and
after, per layer), ``history.json`` and ``metrics.json``. A rerun of the same configuration resumes from the last
epoch's ``checkpoint.safetensors``, or only prints the result if the run is complete.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from prunekit.checkpoint import load as load_checkpoint
from prunekit.checkpoint import load_weights
from prunekit.checkpoint import save as save_checkpoint
from prunekit.config import PruneConfig, build_schedule, check_out_dir, check_schedule, config_hash, from_arguments
from prunekit.data.vision import load_dataset
from prunekit.fileformat import json_text, write_text
from prunekit.models import get_model
from prunekit.structured.blocks import drop_blocks, residual_blocks
from prunekit.structured.criteria import criterion_names
from prunekit.structured.gradual import StructuredPruner
from prunekit.structured.planning import Plan
from prunekit.structured.reporting import report
from prunekit.structured.saving import save
from prunekit.train import TrainConfig, batches, evaluate, make_optimizer, train

__all__ = ["DEFAULT_CRITERION", "add_arguments", "check_arguments", "run"]

INPUT_SHAPE = (1, 1, 28, 28)

#: The criterion of ``prunekit prune --structured`` without ``--criterion`` (the unstructured default, magnitude,
#: scores single weights).
DEFAULT_CRITERION = "l2"

#: Allocations that spread a --macs/--params budget during training (``latency`` is for one-shot plans).
STRUCTURED_ALLOCATIONS = ("global", "uniform")

#: Structured-only flags and their defaults: giving one of them without ``--structured`` is an error.
_STRUCTURED_ONLY = {"macs": None, "params": None, "round_to": 1, "min_channels": 1, "max_sparsity": None,
                    "calibration_batches": 8, "drop_blocks": 0}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _example_inputs() -> torch.Tensor:
    """A fixed random example input: all-zero inputs hide structure (e.g. residual blocks pass zeros through)."""
    return torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(0))


def _budget(flag: str, value: float) -> float | int:
    """Validate a ``--macs``/``--params`` budget: a fraction in (0, 1) or a whole absolute count (> 1)."""
    if 0.0 < value < 1.0:
        return value
    if value > 1.0 and math.isfinite(value) and value.is_integer():
        return int(value)
    raise ValueError(f"{flag} {value:g}: expected the fraction of the dense model to keep, in (0, 1) (e.g. {flag} "
                     f"0.5 halves it), or a whole absolute count greater than 1 (e.g. {flag} 2000000)")


def check_arguments(args: argparse.Namespace) -> None:
    """Validate the structured flags of ``prunekit prune`` before anything is loaded, trained or written.

    Without ``--structured`` its options must not be given (they would be ignored); with it, ``--criterion`` must
    be a structured criterion, ``--allocation`` global or uniform (uniform only with a budget), the budget and
    channel options in range, and the unstructured-only ``--include``/``--exclude``/``--regrow`` absent. Budgets
    are normalised in place (a fraction stays a float, an absolute count becomes an int).

    Args:
        args: The parsed ``prune`` flags.

    Raises:
        ValueError: Naming the flag, its value and what to use instead.
    """
    if not args.structured:
        for dest, default in _STRUCTURED_ONLY.items():
            if getattr(args, dest) != default:
                raise ValueError(f"{_flag(dest)} {getattr(args, dest)} is an option of structured pruning: add "
                                 f"--structured, or drop {_flag(dest)}")
        return
    if args.criterion not in criterion_names():
        raise ValueError(f"--criterion {args.criterion} is not a structured criterion; choose one of "
                         f"{criterion_names()} (default {DEFAULT_CRITERION})")
    for dest in ("include", "exclude"):
        if getattr(args, dest):
            raise ValueError(f"{_flag(dest)} selects single weights and is not supported with --structured (it "
                             f"removes whole channels of every prunable layer): drop {_flag(dest)}")
    if args.regrow:
        raise ValueError("--regrow is not supported with --structured (pruned channels stay pruned): drop --regrow")
    if args.macs is not None and args.params is not None:
        raise ValueError(f"--macs {args.macs:g} and --params {args.params:g}: give one budget, not both")
    for dest in ("macs", "params"):
        if getattr(args, dest) is not None:
            setattr(args, dest, _budget(_flag(dest), float(getattr(args, dest))))
    budget = args.macs is not None or args.params is not None
    if args.allocation not in STRUCTURED_ALLOCATIONS:
        raise ValueError(f"--allocation {args.allocation} is not for structured pruning with fine-tuning; with "
                         f"--structured it is one of {list(STRUCTURED_ALLOCATIONS)} (default global)")
    if args.allocation != "global" and not budget:
        raise ValueError(f"--allocation {args.allocation} spreads a --macs or --params budget over the layers; "
                         f"--sparsity already removes that fraction of every group: add --macs/--params or drop "
                         "--allocation")
    if args.max_sparsity is not None and not 0.0 <= args.max_sparsity < 1.0:
        raise ValueError(f"--max-sparsity {args.max_sparsity:g}: expected a fraction of a group in [0, 1), e.g. 0.8")
    for dest, minimum in (("round_to", 1), ("min_channels", 1), ("calibration_batches", 1), ("drop_blocks", 0)):
        if getattr(args, dest) < minimum:
            raise ValueError(f"{_flag(dest)} {getattr(args, dest)}: expected a whole number >= {minimum}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--structured`` and its options to the ``prune`` parser; ``--criterion`` also accepts structured names."""
    group = parser.add_argument_group("structured pruning (with --structured)")
    group.add_argument("--structured", action="store_true",
                       help="remove whole channels/neurons (physically smaller model) instead of single weights; "
                            f"--criterion then is one of {criterion_names()}; --sparsity is per group")
    group.add_argument("--macs", type=float, default=None,
                       help="MAC budget instead of --sparsity: fraction of dense in (0, 1) or absolute count; "
                            "--allocation global (rank units across groups) or uniform (the same fraction of every "
                            "group, usually faster on CPU for the same MACs) spreads it")
    group.add_argument("--params", type=float, default=None,
                       help="parameter budget instead of --sparsity: fraction of dense in (0, 1) or absolute count")
    group.add_argument("--round-to", type=int, default=1, help="keep channel counts a multiple of this")
    group.add_argument("--min-channels", type=int, default=1, help="keep at least this many channels per group")
    group.add_argument("--max-sparsity", type=float, default=None,
                       help="with a budget: remove at most this fraction of any group (default 0.8)")
    group.add_argument("--calibration-batches", type=int, default=8,
                       help="training batches used by the taylor/activation/apoz criteria")
    group.add_argument("--drop-blocks", type=int, default=0,
                       help="first remove this many residual blocks (least calibration-loss increase)")
    for action in parser._actions:  # the unstructured --criterion lists only its own names
        if action.dest == "criterion" and action.choices is not None:
            action.choices = sorted(set(action.choices) | set(criterion_names()))
            action.help = (f"{action.help} (default: {action.default}; {DEFAULT_CRITERION} with --structured)")
            action.default = None  # resolved by the CLI: magnitude, or DEFAULT_CRITERION with --structured


def _say(msg: str) -> None:
    print(msg, flush=True)


def _write_json(path: Path, doc: Any) -> None:
    write_text(path, json_text(doc, indent=2, sort_keys=True))


def run(args: argparse.Namespace) -> int:
    """Run ``prunekit prune --structured`` (see the module docstring).

    Args:
        args: The parsed ``prune`` flags (``--criterion`` None means :data:`DEFAULT_CRITERION`).

    Returns:
        The exit status, 0.

    Raises:
        ValueError: On bad flags, before anything is trained or written.
    """
    if args.criterion is None:
        args.criterion = DEFAULT_CRITERION
    check_arguments(args)
    tcfg = from_arguments(args, TrainConfig)
    pcfg = from_arguments(args, PruneConfig)
    budget = {"macs": args.macs} if args.macs is not None else {"params": args.params} if args.params is not None \
        else {}
    # Something is always pruned with a budget; with zero epochs the schedule never fires and _run prunes at the end.
    if tcfg.epochs != 0:
        check_schedule(pcfg, tcfg.epochs, prunes=bool(budget) or pcfg.sparsity > 0)
    allocation = args.allocation if budget and args.allocation != "global" else None
    structured = {"criterion": args.criterion, "sparsity": None if budget else pcfg.sparsity, **budget,
                  **({"allocation": allocation} if allocation else {}),  # old run directories still match
                  "round_to": args.round_to, "min_channels": args.min_channels, "max_sparsity": args.max_sparsity,
                  "calibration_batches": args.calibration_batches, "drop_blocks": args.drop_blocks}
    doc = {"model": args.model, "width": args.width, "data": args.data, "train_subset": args.train_subset,
           "weights": str(args.weights) if args.weights else None, "train": dataclasses.asdict(tcfg),
           "prune": {k: v for k, v in dataclasses.asdict(pcfg).items()
                     if k in ("schedule", "start", "end", "updates_per_epoch", "rounds", "exponent")},
           "structured": structured}
    out = Path(args.out) if args.out else Path("runs") / f"{args.model}-{args.data}-structured-{config_hash(doc)}"
    _run(doc, tcfg, pcfg, out, data_dir=args.data_dir, progress=not args.quiet)
    return 0


def _run(doc: dict[str, Any], tcfg: TrainConfig, pcfg: PruneConfig, out: Path, *, data_dir: str | None,
         progress: bool) -> dict[str, Any]:
    """Train and prune as ``doc`` says into ``out``; everything that can fail on bad input runs before ``out`` is
    created or ``config.json`` written."""
    config_file, ckpt_file, metrics_file = out / "config.json", out / "checkpoint.safetensors", out / "metrics.json"
    check_out_dir(out)
    if config_file.exists() and json.loads(config_file.read_text()) != doc:
        raise ValueError(f"{out} holds a run with another configuration ({config_file}); choose another --out or "
                         "delete it")
    if metrics_file.exists():
        metrics = json.loads(metrics_file.read_text())
        _say((out / "report.txt").read_text().rstrip() if (out / "report.txt").exists() else "")
        _say(f"already complete: test accuracy {metrics['test_accuracy']:.2%}; run directory: {out}")
        return metrics
    s = doc["structured"]
    train_data = load_dataset(doc["data"], "train", data_dir)
    if doc.get("train_subset"):
        train_data = torch.utils.data.TensorDataset(*(t[: doc["train_subset"]] for t in train_data.tensors))
    val_data, test_data = load_dataset(doc["data"], "val", data_dir), load_dataset(doc["data"], "test", data_dir)
    torch.manual_seed(tcfg.seed)
    model = get_model(doc["model"], width=doc["width"])
    if doc["weights"]:
        load_weights(model, doc["weights"])
    example = _example_inputs()
    calibration = [(x, y) for _, (x, y) in zip(range(s["calibration_batches"]),
                                                batches(train_data, tcfg.batch_size, shuffle=True, seed=tcfg.seed))]
    before = evaluate(model, test_data).to_dict() if doc["weights"] else None
    teacher = None
    if getattr(tcfg, "distill", 0.0):
        if not doc["weights"]:
            raise ValueError("--distill needs --weights: the trained dense model is the teacher of its pruned self")
        teacher = copy.deepcopy(model)
    plans: list[Plan] = []
    if s["drop_blocks"]:
        found = residual_blocks(model, example)
        if len(found) < s["drop_blocks"]:
            fix = f"use --drop-blocks <= {len(found)}" if found else "drop --drop-blocks"
            raise ValueError(f"--drop-blocks {s['drop_blocks']}: {doc['model']} has {len(found)} residual blocks "
                             f"({', '.join(found) or 'none'}); {fix}")
        blocks = drop_blocks(model, example, calibration, n=s["drop_blocks"], blocks=found)
        blocks.apply(model)
        plans.append(blocks)
        _say("\n".join(blocks.notes))
    steps_per_epoch = tcfg.steps_per_epoch(len(train_data))
    target = {k: s[k] for k in ("macs", "params") if s.get(k) is not None}
    if tcfg.epochs != 0:  # the schedule's last update must fall within the run (rounding can push it past the end)
        check_schedule(pcfg, tcfg.epochs, steps_per_epoch, prunes=bool(target) or bool(s["sparsity"]))
    pruner = StructuredPruner(model, example, s["sparsity"], **target, allocation=s.get("allocation"),
                              schedule=build_schedule(pcfg, steps_per_epoch),
                              criterion=s["criterion"], data=calibration, round_to=s["round_to"],
                              min_channels=s["min_channels"], max_sparsity=s["max_sparsity"])
    opt, sched = make_optimizer(model, tcfg, steps_per_epoch * tcfg.epochs)
    out.mkdir(parents=True, exist_ok=True)  # every check passed: the run directory starts here
    _write_json(config_file, doc)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if ckpt_file.exists():
        ckpt = load_checkpoint(ckpt_file, model, optimizer=opt, scheduler=sched)
        state = ckpt.extra["structured"]
        state["pruner"] = ckpt.pruner.state_dict() if ckpt.pruner is not None else pruner.pruner.state_dict()
        pruner.load_state_dict(state)
        start_epoch, history, before = int(ckpt.extra["epoch"]), list(ckpt.extra["history"]), ckpt.extra["before"]
        _say(f"resuming {out} at epoch {start_epoch}/{tcfg.epochs}")

    def on_epoch(epoch: int, record: dict[str, Any]) -> None:
        history.append(record)
        state = pruner.state_dict()
        state.pop("pruner")  # the masks go in the checkpoint's own pruner slot
        save_checkpoint(model, ckpt_file, pruner=pruner.pruner, optimizer=opt, scheduler=sched,
                        extra={"epoch": epoch + 1, "history": history, "before": before, "structured": state})
        if progress:
            _say(f"epoch {epoch + 1}/{tcfg.epochs}: train loss {record['train_loss']:.4f}, "
                 f"val accuracy {record['eval_accuracy']:.2%}, weights zeroed {record.get('sparsity', 0):.2%}")

    t0 = time.perf_counter()
    train(model, train_data, tcfg, pruner=pruner, eval_data=val_data, progress=progress, on_epoch=on_epoch,
          optimizer=opt, scheduler=sched, start_epoch=start_epoch, **({"teacher": teacher} if teacher else {}))
    if pruner.plan is None:
        pruner.update()  # a schedule that never fired (e.g. zero epochs): prune to the final target now
    soft = evaluate(model, test_data)
    final_plan = pruner.plan
    small = pruner.finalize()
    plans.append(final_plan)
    test = evaluate(small, test_data)
    dense = get_model(doc["model"], width=doc["width"])
    rep = report(dense, small, example)
    write_text(out / "report.txt", str(rep) + "\n")
    rep.to_json(out / "report.json")
    rep.plot(out / "report.png")
    save(small, out / "model.safetensors", plans)
    metrics = {"test_accuracy": test.accuracy, "test_loss": test.loss, "soft_test_accuracy": soft.accuracy,
               "val_accuracy": history[-1]["eval_accuracy"] if history else None, "before": before,
               "macs": list(rep.macs), "params": list(rep.params), "speedup": rep.speedup,
               "train_seconds_this_session": time.perf_counter() - t0}
    _write_json(out / "history.json", history)
    _write_json(out / "metrics.json", metrics)
    _say(str(final_plan))
    _say(str(rep))
    _say(f"test accuracy {test.accuracy:.2%} (soft-pruned {soft.accuracy:.2%}); run directory: {out}")
    return metrics
