"""``prunekit llm``: one-shot pruning of a causal language model from the command line.

    prunekit llm --model smollm2 --method wanda --sparsity 0.5 --calibration austen --out runs/smollm2-wanda50

writes into ``--out``: ``model/`` (a Hugging Face folder: ``config.json``, ``model.safetensors`` with the pruned
weights, the tokenizer), ``masks.safetensors`` (the boolean keep-masks, a prunekit file of kind ``"masks"``),
``report.txt``/``report.json`` (per-tensor sparsity) and ``metrics.json`` (perplexity, timings, the command).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``llm`` subcommand to an ``argparse`` subparsers object."""
    from prunekit.llm.prune import METHODS

    p = sub.add_parser("llm", help="one-shot pruning of a language model (magnitude, Wanda, SparseGPT)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True,
                   help="'smollm2' (SmolLM2-135M, fetched and cached) or a Hugging Face model folder")
    p.add_argument("--method", required=True, choices=sorted(METHODS), help="pruning method")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--sparsity", type=float, help="fraction of zeros in every pruned layer, in [0, 1)")
    target.add_argument("--pattern", help="N:M pattern, e.g. 2:4 (n of every m weights along the input pruned)")
    p.add_argument("--block-sparsity", default=None,
                   help="non-uniform sparsity per block: comma-separated values, one per block, or ramp:LOW:HIGH "
                        "(linear from the first block to the last); replaces --sparsity")
    p.add_argument("--allocation", default=None, choices=["per_row", "uniform"],
                   help="compare magnitude/Wanda scores per output row (default) or over the whole layer")
    p.add_argument("--inputs", default=None, choices=["pruned", "dense"],
                   help="activations the statistics come from: outputs of the already-pruned blocks, or the dense "
                        "model's (default: dense for wanda, pruned for sparsegpt)")
    p.add_argument("--skip", nargs="*", default=[],
                   help="layers never pruned (names, suffixes such as down_proj, globs)")
    p.add_argument("--calibration", default="austen",
                   help="'austen' (five Austen novels, Persuasion held out) or a UTF-8 text file")
    p.add_argument("--n-calibration", type=int, default=128, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration/evaluation sequence")
    p.add_argument("--batch-size", type=int, default=4, help="calibration sequences per forward pass")
    p.add_argument("--seed", type=int, default=0, help="seed that draws the calibration windows")
    p.add_argument("--eval", default="persuasion", choices=["persuasion", "none"],
                   help="text whose perplexity is measured after pruning")
    p.add_argument("--eval-windows", type=int, default=16, help="evaluation windows (0 = the whole text)")
    p.add_argument("--eval-dense", action="store_true", help="also measure the perplexity before pruning")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def _say(msg: str) -> None:
    print(msg, flush=True)


def _block_sparsity(spec: str | None, n_blocks: int) -> list[float] | None:
    if spec is None:
        return None
    if spec.startswith("ramp:"):
        parts = spec.split(":")
        if len(parts) != 3:
            raise ValueError(f"--block-sparsity {spec!r}: expected ramp:LOW:HIGH, e.g. ramp:0.4:0.6")
        lo, hi = float(parts[1]), float(parts[2])
        return [lo + (hi - lo) * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
    try:
        return [float(v) for v in spec.split(",")]
    except ValueError:
        raise ValueError(f"--block-sparsity {spec!r}: expected comma-separated numbers or ramp:LOW:HIGH") from None


def run(args: argparse.Namespace) -> int:
    """Run ``prunekit llm`` with parsed arguments."""
    try:
        return _run(args)
    except ImportError as exc:
        print(f"prunekit llm: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import prunekit
    import prunekit.llm
    from prunekit.calibration import find_blocks
    from prunekit.data.llm import load_causal_lm, smollm2
    from prunekit.data.text import NOVELS, austen, calibration_windows, eval_windows
    from prunekit.fileformat import json_text, write, write_text
    from prunekit.config import check_out_dir
    from prunekit.targets import check_sparsity

    if args.n_calibration < 1 or args.seq_len < 2:
        raise ValueError(f"need --n-calibration >= 1 and --seq-len >= 2, got {args.n_calibration}, {args.seq_len}")
    if args.pattern is not None:  # fail before loading anything
        prunekit.llm.parse_pattern(args.pattern)
    if args.sparsity is not None:
        check_sparsity(args.sparsity, "--sparsity")
    if args.calibration != "austen" and not Path(args.calibration).is_file():
        raise FileNotFoundError(f"--calibration {args.calibration!r}: expected 'austen' or a text file")
    if args.batch_size < 1 or args.eval_windows < 0:
        raise ValueError(f"need --batch-size >= 1 and --eval-windows >= 0, got {args.batch_size}, "
                         f"{args.eval_windows}")
    out = check_out_dir(args.out)  # made only when there is something to write
    progress = not args.quiet
    _say(f"loading {args.model}")
    model, tokenizer = smollm2() if args.model == "smollm2" else load_causal_lm(args.model)

    def encode(text: str) -> torch.Tensor:
        return torch.tensor(tokenizer(text).input_ids, dtype=torch.int64)

    if args.calibration == "austen":
        docs = [encode(austen(n)) for n in NOVELS if n != "persuasion"]
    else:
        path = Path(args.calibration)
        if not path.is_file():
            raise FileNotFoundError(f"--calibration {args.calibration!r}: expected 'austen' or a text file")
        docs = [encode(path.read_text(encoding="utf-8"))]
    calibration = calibration_windows(docs, n=args.n_calibration, length=args.seq_len, seed=args.seed)
    windows: list[torch.Tensor] = []
    if args.eval == "persuasion":
        windows = eval_windows(encode(austen("persuasion")), args.seq_len)
        if args.eval_windows:
            windows = windows[: args.eval_windows]
    metrics: dict[str, Any] = {"command": shlex.join(["prunekit", *sys.argv[1:]]), "model": args.model,
                               "method": args.method, "sparsity": args.sparsity, "pattern": args.pattern,
                               "calibration": {"source": args.calibration, "shape": list(calibration.shape),
                                               "seed": args.seed}}
    if windows and args.eval_dense:
        metrics["dense_perplexity"] = prunekit.llm.perplexity(model, windows, progress=progress)
        _say(f"dense perplexity {metrics['dense_perplexity']:.2f} on {len(windows)} windows")
    blocks = _block_sparsity(args.block_sparsity, len(find_blocks(model)))
    t0 = time.perf_counter()
    masks = prunekit.llm.prune(
        model, calibration, method=args.method, sparsity=args.sparsity if blocks is None else None,
        pattern=args.pattern, block_sparsity=blocks, allocation=args.allocation, skip=args.skip,
        batch_size=args.batch_size, progress=progress, inputs=args.inputs,
    )
    metrics["prune_seconds"] = time.perf_counter() - t0
    metrics["achieved_sparsity"] = masks.sparsity()
    _say(f"pruned {len(masks)} tensors to {masks.sparsity():.2%} sparsity in {metrics['prune_seconds']:.0f} s")
    if windows:
        metrics["perplexity"] = prunekit.llm.perplexity(model, windows, progress=progress)
        metrics["eval_windows"] = len(windows)
        _say(f"perplexity {metrics['perplexity']:.2f} on {len(windows)} windows of Persuasion")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    write(out / "masks.safetensors", dict(masks), {"method": args.method, "sparsity": masks.sparsity()}, kind="masks")
    rep = prunekit.report(model, masks)
    write_text(out / "report.txt", str(rep) + "\n")
    rep.to_json(out / "report.json")
    write_text(out / "metrics.json", json_text(metrics, indent=2, sort_keys=True))
    _say(f"files: {out}/ (model/, masks.safetensors, report.txt, report.json, metrics.json)")
    return 0
