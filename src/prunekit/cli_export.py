"""``prunekit export RUN_DIR --format {compressed,safetensors,onnx} [--int8] [--out FILE]``: write a pruned run for
deployment and print the sizes and ratios (see :mod:`prunekit.deploy`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from prunekit.checkpoint import load
from prunekit.models import MODELS, get_model

__all__ = ["add_parser"]

INPUT_SHAPE = (1, 28, 28)  # the built-in models take one 28x28 grayscale image
SUFFIX = {"compressed": ".pk", "safetensors": ".safetensors", "onnx": ".onnx"}


def _say(msg: str) -> None:
    print(msg, flush=True)


def run(args: argparse.Namespace) -> int:
    """Rebuild the run's model (config.json + checkpoint), export it, print sizes and ratios."""
    from prunekit.deploy import OnnxMismatchError, export

    path = Path(args.path)
    config_file = (path if path.is_dir() else path.parent) / "config.json"
    ckpt_file = path / "checkpoint.safetensors" if path.is_dir() else path
    if args.model:
        model = get_model(args.model, width=args.width)
    elif config_file.exists():
        doc = json.loads(config_file.read_text())
        model = get_model(doc["model"], width=doc.get("width", 1.0))
    else:
        raise ValueError(f"no config.json next to {path}: pass --model to name the architecture "
                         f"(one of {sorted(MODELS)})")
    load(ckpt_file, model)
    model.eval()
    out = Path(args.out) if args.out else ckpt_file.parent / f"model{'-int8' if args.int8 else ''}{SUFFIX[args.format]}"
    example = torch.randn(4, *INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
    try:
        result = export(model, out, args.format, example_inputs=example if args.format == "onnx" else None,
                        int8=args.int8)
    except (ImportError, OnnxMismatchError) as exc:  # shown as a one-line error by prunekit.cli.main
        raise ValueError(str(exc)) from exc
    weights = [p for p in model.parameters() if p.dim() >= 2]
    total = sum(p.numel() for p in weights)
    nonzero = sum(int(p.count_nonzero()) for p in weights)
    ckpt_bytes = ckpt_file.stat().st_size
    _say(f"model: {type(model).__name__}, {total:,} weights in matrices/kernels, {nonzero:,} non-zero "
         f"({1 - nonzero / max(total, 1):.2%} sparse)")
    _say(f"dense fp32 state:   {result.dense_bytes:>12,} bytes   1.00x")
    _say(f"run checkpoint:     {ckpt_bytes:>12,} bytes  {result.dense_bytes / ckpt_bytes:6.2f}x smaller "
         "(weights, masks, optimizer state)")
    label = f"{args.format}{' int8' if args.int8 else ''}:"
    versus = f"{result.ratio:6.2f}x smaller" if result.ratio >= 1 else f"{1 / result.ratio:6.2f}x larger"
    _say(f"{label:<19} {result.bytes:>12,} bytes  {versus} -> {result.path}")
    if result.max_abs_diff is not None:
        _say(f"onnxruntime vs torch: max |diff| {result.max_abs_diff:.3g}, max |output| {result.max_abs_reference:.3g}")
    for note in result.notes:
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
                                                 "model[-int8].{pk,safetensors,onnx})")
    exp.add_argument("--model", default=None, choices=sorted(MODELS), help="architecture (default: from config.json)")
    exp.add_argument("--width", type=float, default=1.0, help="width multiplier (with --model)")
    exp.set_defaults(func=run)
