"""Structured pruning accuracy at 2x fewer MACs: prunekit's criteria vs each other and vs Torch-Pruning 1.6.1.

Tasks (full real data: 55,000 training images, the 5,000-image validation split for choices, the 10,000 test images
for the reported numbers):

* ``resnet20-fashion``: prunekit's ResNet-20 (channels) on Fashion-MNIST;
* ``lenet5-mnist``: LeNet-5 channels and hidden units on MNIST;
* ``lenet300-mnist``: LeNet-300-100 neurons on MNIST.

Protocol, per task:

1. **Dense**: one model per seed (initialised and trained with that seed; SGD Nesterov, one-cycle;
   ``--dense-epochs``), cached. Each seed prunes and fine-tunes its own dense model, so the spread over seeds covers
   *which* units each method removes, not only the fine-tuning noise: with one shared dense model a method that
   happens to keep one worse neuron is worse on every seed.
2. **Pruning to 2x fewer MACs** (counted by ``prunekit.flops.count_macs`` on the physically pruned model): every
   method removes the same fraction of every group's units (*uniform* allocation, bisected so that MACs <= 0.5 x
   dense), so the methods differ only in *which* units go. prunekit criteria: ``taylor`` (Molchanov et al. 2017:
   |activation x gradient| per feature map, on 8 labelled calibration batches of 128), ``l1``/``l2`` (filter norm;
   ``l2`` is Torch-Pruning's default criterion too),
   ``bn_scale`` (|gamma|; ResNet-20 only, LeNets have no BatchNorm), ``apoz``, ``random``. Torch-Pruning ``tp_l2``:
   ``MetaPruner`` with its default ``GroupMagnitudeImportance(p=2)``, the classifier ignored, ``pruning_ratio``
   bisected to the MACs closest to ours from below (equal MACs up to rounding).
   Extra prunekit variants: ``taylor_global`` (the MAC budget ``macs=0.5`` ranked globally, cost-aware),
   ``l2_latency`` (``macs=0.5, allocation="latency"``: the fastest measured allocation on this CPU at batch 128, the
   allocation the latency benchmark uses; does pruning for speed cost accuracy?), ``taylor_gradual``
   (``StructuredPruner`` with a Gradual schedule over the first half of fine-tuning, then physical removal) and
   ``l2_kd`` (the units ``l2`` removes, fine-tuned with the dense model as teacher: ``TrainConfig(distill=0.9,
   temperature=4)``, prunekit's recipe for pruning a trained model; the same epochs and data, plus one forward pass
   of the dense model per batch; the distillation loss is scaled by temperature², so its learning rate is chosen on
   the validation split from the same grid, with ``l2_kd`` itself: at ``l1``'s 0.05 LeNet-5 diverged).
3. **Fine-tuning**: the same recipe and budget for everyone (``--ft-epochs``; learning rate chosen on the validation
   split from ``--lrs`` with ``l1``, seed 0, for all but ``l2_kd``; a diverging grid point is recorded, never chosen;
   weight decay as for dense). Seeds (``--seeds``) change the dense model, the data order, the calibration batches
   and the random criterion. ``dense_ft`` fine-tunes the dense model with the same budget, as a reference.

Reported: test accuracy mean/std over seeds per method (and of the dense models), MACs, parameters, and each prunekit
method's difference to Torch-Pruning paired by seed (mean and standard error: both prune the same dense model, so its
variance cancels). Bars (issue 3): the prunekit method with the best mean validation accuracy is within 0.5 pt of the
dense models' mean and at least Torch-Pruning's test accuracy (mean over the same seeds). And: does
Molchanov's finding (Taylor beats weight norms and activation criteria, random is worst) hold here?

Results go to ``benchmarks/results/structured_accuracy[_quick].json`` after every finished run (a rerun skips them),
with a Markdown table and a PNG next to it. Dense checkpoints are cached under ``~/.cache/prunekit/bench/``.

Run (quiet machine; many hours for ResNet-20 with 3 seeds, the LeNets take well under an hour):
    .venv/bin/python benchmarks/structured_accuracy.py
    .venv/bin/python benchmarks/structured_accuracy.py --tasks lenet300-mnist lenet5-mnist   # the quick ones first
Smoke (~5 min): .venv/bin/python benchmarks/structured_accuracy.py --quick
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import png_path, setup_torch, table  # noqa: E402
from _harness import RESULTS, ResultStore  # noqa: E402

import prunekit  # noqa: E402
from prunekit import Gradual  # noqa: E402
from prunekit.data import load_dataset  # noqa: E402
from prunekit.data.fetch import cache_dir  # noqa: E402
from prunekit.fileformat import write_text  # noqa: E402
from prunekit.flops import count_macs, count_params  # noqa: E402
from prunekit.models import get_model  # noqa: E402
from prunekit.structured import StructuredPruner, plan, trace  # noqa: E402
from prunekit.train import TrainConfig, TrainingDiverged, batches, evaluate, train  # noqa: E402

NAME = "structured_accuracy"
TASKS = {
    "resnet20-fashion": {"model": "resnet20", "data": "fashion-mnist", "dense_epochs": 20, "ft_epochs": 8,
                         "weight_decay": 5e-4, "lr": 0.1},
    "lenet5-mnist": {"model": "lenet5", "data": "mnist", "dense_epochs": 12, "ft_epochs": 6, "weight_decay": 0.0,
                     "lr": 0.05},
    "lenet300-mnist": {"model": "lenet300", "data": "mnist", "dense_epochs": 12, "ft_epochs": 6,
                       "weight_decay": 0.0, "lr": 0.1},
}
OURS = ["taylor", "l1", "l2", "bn_scale", "apoz", "random", "taylor_global", "taylor_gradual", "l2_latency",
        "l2_kd"]
OWN_LR = {"l2_kd": "l2_kd"}  # a method whose loss differs chooses its own fine-tuning lr (same grid, val, seed 0)
X = torch.zeros(1, 1, 28, 28)
TARGET = 0.5  # MACs after / before


def _subset(data: TensorDataset, n: int | None) -> TensorDataset:
    return data if not n else TensorDataset(*(t[:n] for t in data.tensors))


def dense_model(task: str, spec: dict[str, Any], train_data: TensorDataset, epochs: int, tag: str,
                seed: int = 0) -> nn.Module:
    """The dense model of ``task`` for ``seed``, trained once and cached (seed 0 keeps its original file name)."""
    folder = cache_dir() / "bench" / NAME
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{task}-dense-{epochs}ep{tag}{f'-seed{seed}' if seed else ''}.safetensors"
    torch.manual_seed(seed)
    model = get_model(spec["model"])
    if path.exists():
        prunekit.load(path, model)
        if all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            return model
    cfg = TrainConfig(epochs=epochs, lr=spec["lr"], weight_decay=spec["weight_decay"], seed=seed)
    try:
        train(model, train_data, cfg, progress=False)
    except TrainingDiverged as exc:
        raise RuntimeError(f"{task}: dense training diverged (lr {spec['lr']}); lower TASKS[{task!r}]['lr']") from exc
    prunekit.save(model, path)  # safetensors, atomic, no pickle
    return model


class DenseModels:
    """A task's dense model per seed (trained on first use, cached on disk) with its traced graph; each is recorded
    in the store as ``<task>/dense/seed=<seed>``."""

    def __init__(self, task: str, spec: dict[str, Any], data: tuple[TensorDataset, TensorDataset, TensorDataset],
                 epochs: int, tag: str, store: ResultStore) -> None:
        self.task, self.spec, self.data, self.epochs, self.tag, self.store = task, spec, data, epochs, tag, store
        self.models: dict[int, tuple[nn.Module, Any]] = {}

    def __call__(self, seed: int) -> tuple[nn.Module, Any]:
        if seed in self.models:
            return self.models[seed]
        task, store, (train_data, val, test) = self.task, self.store, self.data
        t0 = time.perf_counter()
        dense = dense_model(task, self.spec, train_data, self.epochs, self.tag, seed)
        key = f"{task}/dense/seed={seed}"
        legacy = store.runs.get(f"{task}/dense")  # seed 0's record from before per-seed dense models
        if seed == 0 and legacy is not None and not store.done(key):
            store.runs[key] = {**legacy, "seed": 0}  # the same model (same file): keep its command and time
            store.save()
        if not store.done(key):
            store.put(key, {"kind": "dense", "task": task, "seed": seed, "epochs": self.epochs,
                            "test_accuracy": evaluate(dense, test).accuracy,
                            "val_accuracy": evaluate(dense, val).accuracy, "macs": count_macs(dense, X).total,
                            "params": count_params(dense),
                            "seconds": time.perf_counter() - t0})
        print(f"{task}: seed {seed}'s dense test accuracy {store.runs[key]['test_accuracy']:.4f}", flush=True)
        self.models[seed] = (dense, trace(dense, X))
        return self.models[seed]


def calibration(train_data: TensorDataset, seed: int, n: int = 8, size: int = 128) -> list[tuple[Any, Any]]:
    return [b for _, b in zip(range(n), batches(train_data, size, shuffle=True, seed=1000 + seed))]


def uniform_sparsity(model: nn.Module, graph: Any, target: float) -> float:
    """The largest-MAC uniform per-group sparsity with MACs <= target x dense (predicted, exact for these models)."""
    dense = graph.state.macs
    lo, hi = 0.0, 0.95
    for _ in range(20):
        mid = (lo + hi) / 2
        if plan(model, X, mid, graph=graph, verify=False).macs[1] <= target * dense:
            hi = mid
        else:
            lo = mid
    return hi


def prune_ours(method: str, model: nn.Module, graph: Any, sparsity: float, calib: list[Any], seed: int) -> nn.Module:
    from prunekit.structured import RandomGroupScore

    criterion: Any = {"taylor_global": "taylor", "random": RandomGroupScore(seed), "l2_kd": "l2"}.get(method, method)
    if method == "taylor_global":
        p = plan(model, X, macs=TARGET, criterion="taylor", data=calib, graph=graph)
    elif method == "l2_latency":  # pruned for CPU speed: profiled and timed on a batch of 128 training images
        p = plan(model, calib[0][0], macs=TARGET, allocation="latency", criterion="l2")
    else:
        p = plan(model, X, sparsity, criterion=criterion, data=calib, graph=graph)
    return p.apply(model)


def prune_tp(model: nn.Module, target_macs: int, importance: str = "l2") -> tuple[nn.Module, float]:
    """Torch-Pruning at uniform ``pruning_ratio`` bisected to the MACs closest to ``target_macs`` from below."""
    import torch_pruning as tp

    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]  # the classifier keeps its 10 outputs

    def pruned(ratio: float) -> nn.Module:
        m = copy.deepcopy(model)
        ignored = [dict(m.named_modules())[n] for n, mod in model.named_modules() if mod is head]
        imp = tp.importance.GroupMagnitudeImportance(p=2)
        pruner = tp.pruner.MetaPruner(m, X, importance=imp, pruning_ratio=ratio, ignored_layers=ignored)
        pruner.step()
        return m

    lo, hi, best = 0.0, 0.95, None
    for _ in range(14):
        mid = (lo + hi) / 2
        m = pruned(mid)
        macs = count_macs(m, X).total
        if macs <= target_macs:
            hi = mid
            best = (m, mid)
        else:
            lo = mid
    if best is None:
        best = (pruned(hi), hi)
    return best


def choose_lr(task: str, method: str, lrs: list[float], ctx: dict[str, Any], args: argparse.Namespace,
              store: ResultStore) -> float:
    """The fine-tuning learning rate of ``lrs`` with the best validation accuracy for ``method``, seed 0.

    Each grid point is stored (``<task>/grid/<method>/lr=<lr>``); one whose training diverges is stored as such and
    never chosen.
    """
    grid: dict[float, float] = {}
    for lr in lrs:
        k = f"{task}/grid/{method}/lr={lr}"
        if not store.done(k):
            try:
                record = {**run_one(task, method, 0, lr, ctx, args), "grid": True}
            except TrainingDiverged as exc:
                record = {"task": task, "method": method, "seed": 0, "lr": lr, "grid": True, "diverged": str(exc)}
            store.put(k, record)
        if "diverged" not in store.runs[k]:
            grid[lr] = store.runs[k]["val_accuracy"]
    if not grid:
        raise SystemExit(f"{task}: {method} diverged at every learning rate of {lrs}; pass smaller ones with --lrs")
    lr = max(grid, key=lambda v: grid[v])
    print(f"{task}: {method} fine-tunes at lr {lr} (val accuracy {grid})", flush=True)
    return lr


def run_one(task: str, method: str, seed: int, lr: float, ctx: dict[str, Any], args: argparse.Namespace) -> dict:
    """Prune ``seed``'s dense model with ``method`` and fine-tune it (``ctx["dense"]``: the task's DenseModels)."""
    spec = TASKS[task]
    dense, graph = ctx["dense"](seed)
    model = copy.deepcopy(dense)
    calib = calibration(ctx["train"], seed)
    kd = {"distill": 0.9, "temperature": 4.0} if method == "l2_kd" else {}
    cfg = TrainConfig(epochs=ctx["ft_epochs"], lr=lr, weight_decay=spec["weight_decay"], seed=seed, **kd)
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if method == "dense_ft":
        pass
    elif method.startswith("tp_"):
        model, ratio = prune_tp(model, ctx["ours_macs"])
        extra["pruning_ratio"] = ratio
    elif method == "taylor_gradual":
        steps = cfg.steps_per_epoch(len(ctx["train"]))
        every = max(1, steps // 4)
        end = every * max(1, round(0.5 * cfg.epochs * steps / every))
        pruner = StructuredPruner(model, X, ctx["sparsity"], schedule=Gradual(start=0, end=end, every=every),
                                  criterion="taylor", data=calib)
        torch.manual_seed(seed)
        train(model, ctx["train"], cfg, pruner=pruner, progress=False)
        model = pruner.finalize()
    else:
        torch.manual_seed(seed)
        model = prune_ours(method, model, graph, ctx["sparsity"], calib, seed)
    prune_seconds = time.perf_counter() - t0
    if method != "taylor_gradual":
        torch.manual_seed(seed)
        train(model, ctx["train"], cfg, progress=False, teacher=dense if kd else None)
    return {"task": task, "method": method, "seed": seed, "lr": lr, "ft_epochs": cfg.epochs,
            "val_accuracy": evaluate(model, ctx["val"]).accuracy, "test_accuracy": evaluate(model, ctx["test"]).accuracy,
            "macs": count_macs(model, X).total, "params": count_params(model), "dense_macs": ctx["dense_macs"],
            "seconds": time.perf_counter() - t0, "prune_seconds": prune_seconds, "dense_seed": seed, **extra}


def current(record: dict[str, Any] | None) -> bool:
    """True if ``record`` pruned its own seed's dense model (earlier runs all pruned seed 0's)."""
    return record is not None and record.get("dense_seed", 0) == record.get("seed", 0)


def summarize(store: ResultStore) -> tuple[str, dict[str, Any]]:
    runs = [r for r in store.runs.values() if "method" in r]
    by_seed: dict[str, dict[int, float]] = {}
    for r in sorted(store.runs.values(), key=lambda r: "seed" in r):  # a record without a seed: seed 0's, older
        if r.get("kind") == "dense":
            by_seed.setdefault(r["task"], {})[r.get("seed", 0)] = r["test_accuracy"]
    dense = {task: list(accs.values()) for task, accs in by_seed.items()}
    out: dict[str, Any] = {}
    rows = []
    for task in [t for t in TASKS if t in dense]:
        by: dict[str, list[dict[str, Any]]] = {}
        for r in runs:
            if r["task"] == task and not r.get("grid") and current(r):
                by.setdefault(r["method"], []).append(r)
        d = statistics.fmean(dense[task])
        stats = {}
        for method, rs in by.items():
            accs = [r["test_accuracy"] for r in rs]
            vals = [r["val_accuracy"] for r in rs]
            stats[method] = {"mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                             "val": statistics.fmean(vals), "n": len(accs), "macs": rs[0]["macs"],
                             "mac_reduction": rs[0]["dense_macs"] / rs[0]["macs"], "params": rs[0]["params"]}
            rows.append([task, method, f"{100 * stats[method]['mean']:.2f} ± {100 * stats[method]['std']:.2f}",
                         str(len(accs)), f"{100 * stats[method]['val']:.2f}", f"{stats[method]['mac_reduction']:.2f}x",
                         f"{rs[0]['params']:,}", f"{100 * (stats[method]['mean'] - d):+.2f}"])
        ours = {m: s for m, s in stats.items() if m in OURS}
        bars: dict[str, Any] = {}
        if ours:
            best = max(ours, key=lambda m: ours[m]["val"])
            bars["chosen_on_val"] = best
            bars["within_0.5pt_of_dense"] = ours[best]["mean"] >= d - 0.005
            if "tp_l2" in stats:
                bars["at_least_torch_pruning"] = ours[best]["mean"] >= stats["tp_l2"]["mean"]
                tp = {r["seed"]: r["test_accuracy"] for r in by["tp_l2"]}
                for method in ours:  # paired by seed (same dense model): the dense model's variance cancels
                    diffs = [r["test_accuracy"] - tp[r["seed"]] for r in by[method] if r["seed"] in tp]
                    if len(diffs) > 1:
                        ours[method]["minus_tp_paired"] = {
                            "mean": statistics.fmean(diffs), "n": len(diffs),
                            "se": statistics.stdev(diffs) / len(diffs) ** 0.5}
                bars["minus_tp_paired"] = ours[best].get("minus_tp_paired")
        ranking = sorted((m for m in ("taylor", "l1", "l2", "bn_scale", "apoz", "random") if m in stats),
                         key=lambda m: -stats[m]["mean"])
        out[task] = {"dense_test_accuracy": d, "dense_std": statistics.stdev(dense[task]) if len(dense[task]) > 1
                     else 0.0, "dense_n": len(dense[task]), "methods": stats, "bars": bars, "criteria_ranking": ranking}
    header = ["task", "method", "test acc % (mean ± std)", "seeds", "val acc %", "MACs", "params", "vs dense pt"]
    text = table(rows, header)
    for task, s in out.items():
        text += (f"\n{task}: dense {100 * s['dense_test_accuracy']:.2f}%; bars {s['bars']}; criteria by test accuracy "
                 f"{' > '.join(s['criteria_ranking'])}")
    return text, out


def draw(summary: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(summary)
    fig = Figure(figsize=(5 * max(len(tasks), 1), 4))
    FigureCanvasAgg(fig)
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), i + 1)
        s = summary[task]
        methods = list(s["methods"])
        means = [100 * s["methods"][m]["mean"] for m in methods]
        stds = [100 * s["methods"][m]["std"] for m in methods]
        colors = ["tab:orange" if m.startswith("tp_") else "tab:gray" if m == "dense_ft" else "tab:blue"
                  for m in methods]
        ax.bar(range(len(methods)), means, yerr=stds, color=colors, capsize=3)
        d = 100 * s["dense_test_accuracy"]
        ax.axhline(d, color="black", lw=1, label=f"dense {d:.2f}%")
        ax.axhline(d - 0.5, color="black", lw=0.8, ls="--", label="dense - 0.5 pt")
        lo = min(means + [d]) - 2
        ax.set_ylim(max(lo, 0), min(max(means + [d]) + 1, 100))
        ax.set_xticks(range(len(methods)), methods, rotation=40, ha="right", fontsize=8)
        ax.set_ylabel("test accuracy % (2x fewer MACs, fine-tuned)")
        ax.set_title(task, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke: 3,000 training images, 1 epoch, 1 seed")
    ap.add_argument("--tasks", nargs="*", default=None, choices=list(TASKS))
    ap.add_argument("--methods", nargs="*", default=None, help=f"default: {OURS + ['tp_l2', 'dense_ft']}")
    ap.add_argument("--seeds", nargs="*", type=int, default=None, help="default 0 1 2")
    ap.add_argument("--lrs", nargs="*", type=float, default=None, help="fine-tuning learning rates tried on val")
    ap.add_argument("--dense-epochs", type=int, default=None, help="override the task's dense epochs")
    ap.add_argument("--ft-epochs", type=int, default=None, help="override the task's fine-tuning epochs")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    tasks = args.tasks or list(TASKS)
    methods = args.methods or OURS + ["tp_l2", "dense_ft"]
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    lrs = args.lrs or ([0.05] if args.quick else [0.01, 0.05])
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        print("torch-pruning is not installed: tp_* methods are skipped (pip install torch-pruning==1.6.1 --no-deps)")
        methods = [m for m in methods if not m.startswith("tp_")]
    setup_torch(args.threads)
    store = ResultStore(RESULTS / f"{NAME}{'_quick' if args.quick else ''}.json", NAME,
                        meta={"target_macs": TARGET, "seeds": seeds, "lrs": lrs, "loadavg_start": list(os.getloadavg())})
    for task in tasks:
        spec = TASKS[task]
        n = 3000 if args.quick else None
        train_data = _subset(load_dataset(spec["data"], "train"), n)
        val = _subset(load_dataset(spec["data"], "val"), 1000 if args.quick else None)
        test = load_dataset(spec["data"], "test")
        dense_epochs = args.dense_epochs or (1 if args.quick else spec["dense_epochs"])
        ft_epochs = args.ft_epochs or (1 if args.quick else spec["ft_epochs"])
        dense_of = DenseModels(task, spec, (train_data, val, test), dense_epochs, "-quick" if args.quick else "", store)
        dense, graph = dense_of(0)
        sparsity = uniform_sparsity(dense, graph, TARGET)  # the same for every seed: it depends on shapes only
        ours_macs = plan(dense, X, sparsity, graph=graph).macs[1]
        ctx = {"dense": dense_of, "sparsity": sparsity, "ours_macs": ours_macs, "train": train_data, "val": val,
               "test": test, "ft_epochs": ft_epochs, "dense_macs": graph.state.macs}
        print(f"{task}: uniform sparsity {sparsity:.3f} per group -> {graph.state.macs / ours_macs:.2f}x fewer MACs")
        chosen = {"l1": choose_lr(task, "l1", lrs, ctx, args, store)}  # every method's lr, on val with seed 0
        for method in methods:
            if method == "bn_scale" and spec["model"] != "resnet20":
                continue  # no BatchNorm in the LeNets: bn_scale would be l1
            own = OWN_LR.get(method, "l1")
            if own not in chosen:
                chosen[own] = choose_lr(task, own, lrs, ctx, args, store)
            lr = chosen[own]
            for seed in seeds:
                k = f"{task}/{method}/seed={seed}"
                if store.done(k) and current(store.runs[k]):
                    continue
                dense_of(seed)  # its dense record first, for the log
                if method == own and seed == 0 and f"{task}/grid/{own}/lr={lr}" in store.runs:
                    record = {**store.runs[f"{task}/grid/{own}/lr={lr}"]}
                    record.pop("grid")
                    record["dense_seed"] = 0
                else:
                    record = run_one(task, method, seed, lr, ctx, args)
                store.put(k, record)
                print(f"  {k}: test {record['test_accuracy']:.4f} val {record['val_accuracy']:.4f} "
                      f"MACs {record['dense_macs'] / record['macs']:.2f}x ({record['seconds']:.0f} s)", flush=True)
        text, summary = summarize(store)
        store.doc["summary"] = summary
        store.doc["meta"]["loadavg_end"] = list(os.getloadavg())
        store.save()
        write_text(RESULTS / f"{NAME}{'_quick' if args.quick else ''}.md", text + "\n")
        draw(summary, png_path(NAME, args.quick))
    text, _ = summarize(store)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
