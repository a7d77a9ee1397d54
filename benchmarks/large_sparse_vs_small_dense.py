"""Large-sparse vs small-dense at equal non-zero weights (Zhu & Gupta 2017): MLP on MNIST/Fashion-MNIST, LSTM (a report).

A thin wrapper around :mod:`prunekit.reproduce.large_vs_small` (also ``prunekit reproduce large-vs-small``), which
documents the protocol. MLP (default): LeNet-300-100 pruned gradually to 90/95/98/99% vs a dense LeNet-300-100 of
reduced width with as many Linear weights, same 20-epoch recipe, 2 seeds. ``--lstm``: a 2-layer LSTM word-level
language model on Jane Austen's novels (650 units, pruned to 80/90/95%) vs small dense LSTMs with as many non-zero
weights, test perplexity; about 30 minutes per large model on 2 quiet cores (use ``--threads 2``).

Usage (from the repository root)::

    .venv/bin/python benchmarks/large_sparse_vs_small_dense.py           # -> results/large_sparse_vs_small_dense.*
    .venv/bin/python benchmarks/large_sparse_vs_small_dense.py --lstm --threads 2
                                                                   # -> results/large_sparse_vs_small_dense_lstm.*
    .venv/bin/python benchmarks/large_sparse_vs_small_dense.py --quick   # < 1 min smoke test into /tmp
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import RESULTS

from prunekit.reproduce import large_vs_small

STEM = "large_sparse_vs_small_dense"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (< 1 min) into /tmp/prunekit-bench-quick")
    p.add_argument("--lstm", action="store_true", help="run the LSTM language-model section instead of the MLP one")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out or ("/tmp/prunekit-bench-quick" if args.quick else RESULTS))
    t = time.time()
    if args.lstm:
        large_vs_small.run_lstm(out, quick=args.quick, stem=f"{STEM}_lstm")
        md = out / f"{STEM}_lstm.md"
    else:
        large_vs_small.run_mlp(out, quick=args.quick, stem=STEM)
        md = out / f"{STEM}.md"
    print(md.read_text())
    print(f"took {time.time() - t:.0f}s; results in {md.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
