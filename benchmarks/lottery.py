"""Lottery tickets (issue 6 bar): LeNet-300-100 / MNIST, rewinding to init, 3 seeds, ticket vs both controls.

A thin wrapper around :mod:`prunekit.reproduce.lottery_tickets` (also ``prunekit reproduce lottery``), which
documents the protocol: 15 rounds of iterative magnitude pruning at 20% per round (output layer at half rate), each
level trained 8 epochs with Adam 1.2e-3 (batch 60) and reported at its early-stopping step (lowest validation loss),
against the same mask re-initialised at random and a random mask with the original initialisation. Levels are saved
as they finish under ``--work`` (weights and masks, not committed; a rerun resumes), and the summary
(``lottery.json``, ``.md``, ``.png``) is copied to ``benchmarks/results/``.

Bar: at every level from 20% to 3.6% of the weights left, the ticket's mean test accuracy is above the re-initialised
control's (rendered in the README by ``readme_tables.py``).

Seeds resume across machines: the committed ``results/<stem>.json`` seeds a new ``--work`` directory, so its finished
seeds are skipped and ``--seeds N`` runs seeds ``0..N-1`` that are missing (commit after each). A seed that was
interrupted starts over on a new machine (its levels live in ``--work``). Time per seed at 2 threads, 8 rounds x 3
epochs x (ticket + 2 controls): Conv-2 ~1.8 h (87 s an epoch), Conv-6 ~4 h (192 s an epoch).

Usage (from the repository root; ~45 min at one thread)::

    .venv/bin/python benchmarks/lottery.py                       # LeNet-300-100
    .venv/bin/python benchmarks/lottery.py --models conv2 conv4 conv6   # Conv-2/4/6 on Fashion-MNIST (a report)
    .venv/bin/python benchmarks/lottery.py --models conv2 --seeds 1 --threads 2   # one seed of one net per session
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import RESULTS  # noqa: E402

from prunekit.reproduce import lottery_tickets  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=["lenet300"], choices=sorted(lottery_tickets.SETUPS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (LeNet-300-100 is fastest on one)")
    ap.add_argument("--work", default="runs/reproduce/lottery", help="where levels are saved (resumable)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    stem = "lottery" if args.models == ["lenet300"] else "lottery_" + "_".join(args.models)
    committed, store = RESULTS / f"{stem}.json", work / "lottery.json"
    if committed.exists() and not store.exists():  # a new machine: the committed seeds count as done
        work.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(committed, store)
    lottery_tickets.run(work, seeds=args.seeds, models=tuple(args.models))
    for suffix in (".json", ".md", ".png"):
        shutil.copyfile(work / f"lottery{suffix}", RESULTS / f"{stem}{suffix}")
    print((RESULTS / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
