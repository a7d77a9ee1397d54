"""Gradual vs one-shot vs iterative pruning at 90/95/98%: LeNet-5 on MNIST and LeNet-300-100 on Fashion-MNIST (a report).

A thin wrapper around :mod:`prunekit.reproduce.gradual_vs_oneshot` (also ``prunekit reproduce gradual-vs-oneshot``),
which documents the protocol: every pruned run trains for twice the dense epochs with the same settings and
learning-rate schedule (:func:`prunekit.recipes.small_classifier`); gradual follows the recipe's Zhu & Gupta ramp,
one-shot trains dense for the first quarter of the budget, prunes once and fine-tunes, iterative prunes in 5 rounds
from there to the end of the ramp. Train on ``train_full`` (60k), report ``test``, with a dense reference.

Usage (from the repository root)::

    .venv/bin/python benchmarks/gradual_vs_oneshot.py           # -> results/gradual_vs_oneshot.{json,md,png}
    .venv/bin/python benchmarks/gradual_vs_oneshot.py --quick   # < 1 min smoke test into /tmp
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import RESULTS

from prunekit.reproduce import gradual_vs_oneshot


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (< 1 min) into /tmp/prunekit-bench-quick")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out or ("/tmp/prunekit-bench-quick" if args.quick else RESULTS))
    t = time.time()
    gradual_vs_oneshot.run(out, quick=args.quick, seeds=args.seeds)
    print((out / "gradual_vs_oneshot.md").read_text())
    print(f"took {time.time() - t:.0f}s; results in {out / 'gradual_vs_oneshot.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
