"""``prunekit export RUN_DIR --format {compressed,safetensors,onnx} [--int8] [--out FILE]``: write a pruned run for
deployment and print the sizes and ratios (see :mod:`prunekit.deploy`).

A structured run (``prunekit prune --structured``) exports its physically pruned model (``model.safetensors``, the
small weights and the plan); other runs export their checkpoint's model, pruned weights as zeros. Ratios compare
with the unpruned model's dense fp32 state."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from prunekit.models import MODELS

__all__ = ["add_parser"]

INPUT_SHAPE = (1, 28, 28)  # the built-in models take one 28x28 grayscale image
SUFFIX = {"compressed": ".pk", "safetensors": ".safetensors", "onnx": ".onnx"}


def _say(msg: str) -> None:
    print(msg, flush=True)


def run(args: argparse.Namespace) -> int:
    """Load the run's model (see :func:`prunekit.deploy.load_run`), export it, print sizes and ratios.

    A finished structured run exports its physically pruned model (``model.safetensors``: smaller shapes), not the
    zero-filled full-size training checkpoint.
    """
    from prunekit.deploy import OnnxMismatchError, export, load_run, size_versus

    example = torch.randn(4, *INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
    loaded = load_run(args.path, model=args.model, width=args.width if args.model else 1.0,
                      example_inputs=example[:1])
    model = loaded.model
    folder = loaded.source.parent
    int8 = "-int8" if args.int8 else ""
    out = Path(args.out) if args.out else folder / f"model{int8}{SUFFIX[args.format]}"
    if not args.out and out.resolve() == loaded.source.resolve():  # a structured run's model.safetensors
        out = folder / f"model-export{int8}{SUFFIX[args.format]}"
    if out.resolve() == loaded.source.resolve():
        raise ValueError(f"--out {out} is the run's own model file, which the export would overwrite; pass another "
                         "--out")
    try:
        result = export(model, out, args.format, example_inputs=example if args.format == "onnx" else None,
                        int8=args.int8)
    except (ImportError, OnnxMismatchError) as exc:  # shown as a one-line error by prunekit.cli.main
        raise ValueError(str(exc)) from exc
    weights = [p for p in model.parameters() if p.dim() >= 2]
    total = sum(p.numel() for p in weights)
    nonzero = sum(int(p.count_nonzero()) for p in weights)
    reference = loaded.reference_bytes
    if loaded.structured:
        _say(f"model: {type(model).__name__}, physically pruned by structured pruning ({loaded.source}): "
             f"{total:,} weights in matrices/kernels of {loaded.reference_numel:,} before pruning "
             f"({1 - total / max(loaded.reference_numel, 1):.2%} removed), {nonzero:,} non-zero")
    else:
        _say(f"model: {type(model).__name__}, {total:,} weights in matrices/kernels, {nonzero:,} non-zero "
             f"({1 - nonzero / max(total, 1):.2%} sparse)")
    _say(f"dense fp32 state:   {reference:>12,} bytes   1.00x (the unpruned model, the reference)")
    if loaded.structured:
        size = loaded.source.stat().st_size
        _say(f"run model file:     {size:>12,} bytes  {size_versus(size, reference)} (pruned weights and plan)")
    if loaded.checkpoint is not None:
        size = loaded.checkpoint.stat().st_size
        what = "full-size weights, masks, optimizer state" if loaded.structured else "weights, masks, optimizer state"
        _say(f"run checkpoint:     {size:>12,} bytes  {size_versus(size, reference)} ({what})")
    label = f"{args.format}{' int8' if args.int8 else ''}:"
    _say(f"{label:<19} {result.bytes:>12,} bytes  {size_versus(result.bytes, reference)} -> {result.path}")
    if result.max_abs_diff is not None:
        _say(f"onnxruntime vs torch: max |diff| {result.max_abs_diff:.3g}, max |output| {result.max_abs_reference:.3g}")
    for note in [*loaded.notes, *result.notes]:
        _say(f"note: {note}")
    return 0


def add_parser(sub: Any) -> None:
    """Add the ``export`` subcommand to the subparsers of ``prunekit``."""
    exp = sub.add_parser("export", help="write a pruned run as a compressed file, plain safetensors or ONNX; "
                                        "print sizes and ratios")
    exp.add_argument("path", help="a run directory (from `prunekit prune`) or a checkpoint file")
    exp.add_argument("--format", required=True, choices=sorted(SUFFIX),
                     help="compressed: prunekit file, smallest lossless layout per tensor (read it with "
                          "prunekit.load); safetensors: plain state dict, dense with zeros; onnx: checked against "
                          "onnxruntime")
    exp.add_argument("--int8", action="store_true", help="int8 weights, one scale per output channel (zeros stay 0)")
    exp.add_argument("--out", default=None, help="output file (default: next to the checkpoint, "
                                                 "model[-int8].{pk,safetensors,onnx}; model-export[-int8].safetensors "
                                                 "for a structured run, whose model.safetensors is its pruned model)")
    exp.add_argument("--model", default=None, choices=sorted(MODELS), help="architecture (default: from config.json)")
    exp.add_argument("--width", type=float, default=1.0, help="width multiplier (with --model)")
    exp.set_defaults(func=run)
