"""Reproduction: lottery tickets on LeNet-300-100 / MNIST and Conv-2/4/6 / Fashion-MNIST.

Frankle & Carbin 2019, Figures 3-5: iterative magnitude pruning (20% of the remaining weights per round, output layer
at half rate), rewinding to the initial weights, against two controls at the same sparsity — the same mask with a new
random initialisation, and a random mask with the original initialisation. Reported per level: test accuracy at
the early-stopping step (lowest validation loss) and that step, mean and spread over seeds.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prunekit import lottery
from prunekit.models import get_model
from prunekit.reproduce.common import (
    data_splits,
    markdown_table,
    mean_spread,
    new_figure,
    periodic_train_fn,
    save_figure,
)
from prunekit.reproduce.store import ResultStore

__all__ = ["SETUPS", "run"]


@dataclass(frozen=True)
class Setup:
    model: str
    data: str
    lr: float
    rounds: int
    epochs: float
    rate: float = 0.2


#: Full-mode setups (Adam learning rates of the paper; epochs cut to fit a 2-core CPU).
SETUPS = {
    "lenet300": Setup("lenet300", "mnist", lr=1.2e-3, rounds=15, epochs=8),
    "conv2": Setup("conv2", "fashion-mnist", lr=2e-4, rounds=8, epochs=3),
    "conv4": Setup("conv4", "fashion-mnist", lr=3e-4, rounds=8, epochs=3),
    "conv6": Setup("conv6", "fashion-mnist", lr=3e-4, rounds=8, epochs=3),
}


def run(out_dir: str | Path, *, quick: bool = False, seeds: int = 3, models: tuple[str, ...] = ("lenet300",),
        controls: tuple[str, ...] = lottery.CONTROLS, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the lottery-ticket grid and write ``lottery.json``, ``lottery.md`` and ``lottery.png``.

    Args:
        out_dir: Output directory (levels are saved under it as they finish; a rerun resumes).
        quick: Tiny version for tests: 2,000 training images, 2 rounds, a fraction of an epoch, one seed.
        seeds: Number of seeds (full mode).
        models: Keys of :data:`SETUPS`.
        controls: Which controls to train at every level.
        progress: Print a line per finished level.

    Returns:
        The summary written to ``lottery.json``.
    """
    out = Path(out_dir)
    store = ResultStore(out / "lottery.json", "lottery", {"quick": quick, "seeds": seeds, "models": list(models)})
    for name in models:
        if name not in SETUPS:
            raise ValueError(f"unknown model {name!r}; choose from {sorted(SETUPS)}")
        setup = SETUPS[name]
        rounds, epochs, subset = (2, 0.25, 2000) if quick else (setup.rounds, setup.epochs, None)
        train, val, test = data_splits(setup.data, subset)
        for seed in range(1 if quick else seeds):
            key = f"{name}/seed{seed}"
            if store.done(key):
                continue
            torch.manual_seed(seed)
            model = get_model(name)
            train_fn = periodic_train_fn(train, val, test, epochs=epochs, lr=setup.lr, seed=seed)
            ticket = lottery.find(model, train_fn, rounds=rounds, rate=setup.rate, controls=controls,
                                  out_dir=out / "levels" / f"{name}-seed{seed}{'-quick' if quick else ''}", seed=seed)
            store.put(key, ticket.to_dict())
            if progress:
                print(f"lottery {key}: done ({len(ticket.levels)} levels)", flush=True)
    summary = summarize(store.runs)
    store.doc["summary"] = summary
    store.save()
    (out / "lottery.md").write_text(table(summary))
    plot(summary, out / "lottery.png")
    return summary


def summarize(runs: dict[str, Any]) -> dict[str, Any]:
    """Per model and level: density and mean/spread over seeds of the ticket's and the controls' metrics."""
    by_model: dict[str, list[Any]] = {}
    for key, record in runs.items():
        by_model.setdefault(key.split("/")[0], []).append(record["levels"])
    summary: dict[str, Any] = {}
    for name, seeds in by_model.items():
        levels = []
        for i in range(min(len(s) for s in seeds)):
            rows = [s[i] for s in seeds]
            entry: dict[str, Any] = {"level": i, "density": statistics.fmean(r["density"] for r in rows)}
            for variant in ["ticket", *sorted({c for r in rows for c in r["controls"]})]:
                pick = [r["metrics"] if variant == "ticket" else r["controls"].get(variant) for r in rows]
                pick = [p for p in pick if p]
                if pick:
                    entry[variant] = {m: mean_spread([p[m] for p in pick]) for m in ("accuracy", "early_stop_step")}
            levels.append(entry)
        summary[name] = levels
    return summary


def table(summary: dict[str, Any]) -> str:
    """Markdown tables: accuracy (mean ± std over seeds) and early-stopping step per level."""
    parts = []
    for name, levels in summary.items():
        variants = [v for v in ("ticket", "reinit", "random_mask") if any(v in lv for lv in levels)]
        rows = []
        for lv in levels:
            cells: list[Any] = [lv["level"], f"{lv['density']:.1%}"]
            for v in variants:
                a = lv.get(v, {}).get("accuracy")
                s = lv.get(v, {}).get("early_stop_step")
                cells.append(f"{a['mean']:.2%} ± {a['std']:.2%} (n={int(a['n'])})" if a else "")
                cells.append(f"{s['mean']:.0f}" if s else "")
            rows.append(cells)
        header = ["level", "weights left"] + [h for v in variants for h in (f"{v} accuracy", f"{v} early stop")]
        parts.append(f"### {name}\n\n" + markdown_table(header, rows))
    return "\n".join(parts)


def plot(summary: dict[str, Any], path: Path) -> None:
    """Accuracy and early-stopping step against weights remaining (log scale), ticket vs controls."""
    fig, (ax_acc, ax_stop) = new_figure(12, 4.5, ncols=2)
    for name, levels in summary.items():
        for variant, style in (("ticket", "-o"), ("reinit", "--s"), ("random_mask", ":^")):
            pts = [(lv["density"], lv[variant]) for lv in levels if variant in lv]
            if not pts:
                continue
            xs = [p[0] * 100 for p in pts]
            acc = [p[1]["accuracy"] for p in pts]
            ax_acc.errorbar(xs, [a["mean"] for a in acc], yerr=[a["std"] for a in acc], fmt=style, ms=4,
                            label=f"{name} {variant}", capsize=2)
            ax_stop.plot(xs, [p[1]["early_stop_step"]["mean"] for p in pts], style, ms=4, label=f"{name} {variant}")
    for ax, ylabel in ((ax_acc, "test accuracy at early stop"), (ax_stop, "early-stopping step")):
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("weights remaining (%)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Lottery tickets: winning ticket vs random re-init and random mask")
    fig.tight_layout()
    save_figure(fig, path)
