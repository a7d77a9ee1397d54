"""LeNet-300-100 on MNIST: test accuracy vs sparsity, prunekit vs torch.nn.utils.prune, same training budget.

Grid (default): dense reference (plain recipe, 10 epochs, 3 seeds) and, at 90/95/98/99/99.5% sparsity, one-shot +
fine-tune, iterative and gradual pruning, each with prunekit (the default recipe, :func:`prunekit.recipes.
small_classifier`) and with torch.nn.utils.prune (``global_unstructured`` + ``L1Unstructured``, called at the same
steps with the same targets, same optimizer, learning-rate schedule, data order and epochs), 3 seeds, 20 epochs in all
(2x the dense budget). Recipes are chosen with ``--search``: train on ``train`` (55,000 images), score on ``val`` (the
5,000 held-out images), never on ``test``. The final grid (dense reference included) then trains on ``train_full``
(all 60,000 training images) and reports ``test`` accuracy.

Usage (from the repository root)::

    .venv/bin/python benchmarks/lenet300_accuracy.py --search     # recipe search on the validation split
    .venv/bin/python benchmarks/lenet300_accuracy.py              # the grid -> results/lenet300_accuracy.{json,png}
    .venv/bin/python benchmarks/lenet300_accuracy.py --quick      # < 1 min smoke test into /tmp
    .venv/bin/python benchmarks/lenet300_accuracy.py --shard 0/2 &    # two processes on two cores, one JSON
    .venv/bin/python benchmarks/lenet300_accuracy.py --shard 1/2

Each finished configuration is written at once (atomically); a rerun skips finished ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import RESULTS, ResultStore, dataset, fmt_pct, method_schedule, spread, train_and_prune  # noqa: E402

from prunekit.config import config_hash  # noqa: E402
from prunekit.fileformat import write_text  # noqa: E402
import prunekit  # noqa: E402
from prunekit.data import cache_dir  # noqa: E402
from prunekit.models import get_model  # noqa: E402
from prunekit.recipes import Recipe, from_trained  # noqa: E402
from prunekit.train import TrainConfig, evaluate, train  # noqa: E402

SPARSITIES = (0.9, 0.95, 0.98, 0.99, 0.995)
METHODS = ("oneshot", "iterative", "gradual")
TOOLS = ("prunekit", "torch")
SEEDS = (0, 1, 2)
DENSE_EPOCHS = 10
FINAL_SPLIT = "train_full"  # final runs train on all 60k training images (train + val) once the recipe is chosen
GOALS = {0.98: 0.0015, 0.99: 0.005, 0.995: 0.01}  # bold bars: max accuracy gap to dense (fraction)

# One-shot and iterative run inside the same 20-epoch budget and learning-rate schedule as gradual. Where they prune
# was chosen on the validation split by --search (stage "oneshot_at" / "iterative"); see the search log.
ONESHOT_AT = 0.0  # fraction of the pruning epochs: the trained model is pruned at once, then fine-tuned
ITERATIVE_ROUNDS = 5  # prune -> fine-tune rounds, spread over the recipe's ramp (first at start, last at end)


# --------------------------------------------------------------------------------------------------------------------
# Recipe search (validation split only)

def search_stages(base: Recipe) -> list[tuple[str, list[dict[str, Any]]]]:
    """Coordinate descent: each stage varies a few fields of the best recipe so far."""
    return [
        ("allocation", [dict(allocation="erk"), dict(allocation="lamp")]),
        ("ramp", [dict(start=0.0, end=0.75), dict(start=0.25, end=0.75)]),
        ("regularisation", [dict(label_smoothing=0.1)]),
        ("updates", [dict(updates_per_epoch=20)]),
    ]


def run_search(args: argparse.Namespace) -> None:
    out = Path(args.out) / "lenet300_recipe_search.json"
    sparsities = args.search_sparsities
    base = Recipe(epochs=args.epochs)  # the plain recipe: global cubic ramp, lr 0.1, no regularisation
    store = ResultStore(out, "lenet300_recipe_search", {
        "model": "lenet300", "data": "mnist", "train_split": "train", "select_on": "val",
        "sparsities": list(sparsities), "seed": 0, "score": "mean val accuracy over the sparsities",
        "subset": args.subset,
    })

    def evaluate_recipe(recipe: Recipe, method: str = "gradual", tool: str = "prunekit",
                        pruner_options: dict[str, Any] | None = None, **kw: Any) -> float:
        accs = []
        for s in sparsities:
            key = f"{method}/{config_hash(recipe, kw)}/{s}"
            if tool != "prunekit":
                key = f"{method}/{tool}/{config_hash(recipe, kw, pruner_options or {})}/{s}"
            if not store.done(key):
                t = time.time()
                rec = train_and_prune(
                    model_name="lenet300", data_name="mnist", tool=tool, sparsity=s, seed=0,
                    tcfg=recipe.train_config(seed=0), schedule_fn=method_schedule(method, recipe, **kw),
                    allocation=recipe.allocation, train_split="train", eval_splits=("val",), subset=args.subset,
                    pruner_options=pruner_options)
                rec.update(method=method, recipe=recipe.to_dict(), method_options=kw, pruner_options=pruner_options)
                store.put(key, rec)
                print(f"  {method:9s} {s:.3f} val {fmt_pct(rec['val_accuracy'])} ({time.time() - t:.0f}s) {kw} "
                      f"{_diff(recipe)}", flush=True)
            accs.append(store.runs[key]["val_accuracy"])
        return sum(accs) / len(accs)

    if not store.done("dense"):  # reference: the plain dense recipe (10 epochs) on the same split
        rec = train_and_prune(model_name="lenet300", data_name="mnist", tool="dense", sparsity=0.0, seed=0,
                              tcfg=TrainConfig(epochs=args.dense_epochs, seed=0), schedule_fn=lambda spe: None,
                              train_split="train", eval_splits=("val",), subset=args.subset)
        rec.update(method="dense")
        store.put("dense", rec)
    print(f"dense reference: val {fmt_pct(store.runs['dense']['val_accuracy'])}", flush=True)
    stages_log = []
    best, best_score = base, evaluate_recipe(base)
    stages = search_stages(base) if not args.quick else [("ramp", [dict(start=0.1, end=0.5)])]
    for name, variants in stages:
        tried = [{"change": {}, "recipe": best.to_dict(), "score": best_score}]
        stage_best, stage_score = best, best_score
        for change in variants:
            cand = dataclasses.replace(best, **change)
            score = evaluate_recipe(cand)
            tried.append({"change": change, "recipe": cand.to_dict(), "score": score})
            if score > stage_score:
                stage_best, stage_score = cand, score
        best, best_score = stage_best, stage_score
        stages_log.append({"stage": name, "tried": tried, "chosen": best.to_dict(), "score": best_score})
        print(f"stage {name}: best {_diff(best)} score {fmt_pct(best_score, 3)}", flush=True)
        store.doc["stages"] = stages_log
        store.save()

    # where one-shot prunes and how many iterative rounds, inside the chosen recipe's budget
    extra = []
    for kw in [dict(oneshot_at=0.25), dict(oneshot_at=0.5)] if not args.quick else [dict(oneshot_at=0.25)]:
        extra.append({"method": "oneshot", "options": kw, "score": evaluate_recipe(best, "oneshot", **kw)})
    for kw in [] if not args.quick else [dict(rounds=3)]:  # iterative: 5 rounds over the ramp, not searched (CPU)
        extra.append({"method": "iterative", "options": kw, "score": evaluate_recipe(best, "iterative", **kw)})
    store.doc["methods"] = extra
    store.doc["chosen"] = best.to_dict()
    store.save()
    store.save()
    write_search_markdown(store.doc, out.with_suffix(".md"))
    print(json.dumps(store.doc["chosen"], indent=1))


def _diff(recipe: Recipe) -> str:
    base = Recipe(epochs=recipe.epochs)
    return ", ".join(f"{f.name}={getattr(recipe, f.name)}" for f in dataclasses.fields(recipe)
                     if getattr(recipe, f.name) != getattr(base, f.name)) or "plain"


def write_search_markdown(doc: dict[str, Any], path: Path) -> None:
    lines = ["# LeNet-300-100 recipe search (validation split)", "",
             f"Generated by `{doc['commands'][-1]}` from `{path.with_suffix('.json').name}`.", "",
             f"Train on `train` (55k), score = mean validation accuracy (5k held-out images) over sparsities "
             f"{doc['meta']['sparsities']}, seed 0, coordinate descent from the plain recipe "
             "(global cubic ramp over the first half of 20 epochs, 4 mask updates per epoch, SGD + Nesterov, "
             "one-cycle LR 0.1, batch 128).", ""]
    if "dense" in doc["runs"]:
        lines += [f"Dense reference (plain recipe, 10 epochs, seed 0): val {fmt_pct(doc['runs']['dense']['val_accuracy'])}.",
                  ""]
    for st in doc.get("stages", []):
        lines += [f"## Stage `{st['stage']}`", "", "| change | " + " | ".join(
            f"val @ {s:g}" for s in doc["meta"]["sparsities"]) + " | score |", "|---" * (len(doc["meta"]["sparsities"]) + 2) + "|"]
        for t in st["tried"]:
            r = Recipe(**t["recipe"])
            accs = [doc["runs"].get(f"gradual/{config_hash(r, {})}/{s}", {}).get("val_accuracy")
                    for s in doc["meta"]["sparsities"]]
            lines.append(f"| {t['change'] or '(best so far)'} | " + " | ".join(fmt_pct(a) for a in accs)
                         + f" | {fmt_pct(t['score'], 3)} |")
        lines += ["", f"Chosen: {_diff(Recipe(**st['chosen']))} (score {fmt_pct(st['score'], 3)})", ""]
    if doc.get("methods"):
        lines += ["## One-shot / iterative placement (chosen recipe's LR schedule and budget)", "",
                  "| method | options | score |", "|---|---|---|"]
        lines += [f"| {m['method']} | {m['options']} | {fmt_pct(m['score'], 3)} |" for m in doc["methods"]]
        lines.append("")
    if doc.get("prototypes"):
        lines += ["## Prototype outside the core: dense shadow + error feedback (gradual ramp, masks re-selected)", "",
                  "| recipe | options | " + " | ".join(f"val @ {s:g}" for s in doc["meta"]["sparsities"])
                  + " | score |", "|---|---|" + "---|" * len(doc["meta"]["sparsities"]) + "---|"]
        lines += [f"| {_diff(Recipe(**p['recipe']))} | {p['options']} | "
                  + " | ".join(fmt_pct(p["val"][str(s)]) for s in doc["meta"]["sparsities"])
                  + f" | {fmt_pct(p['score'], 3)} |" for p in doc["prototypes"]]
    write_text(path, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# The grid

def dense_state(seed: int, args: argparse.Namespace, store: ResultStore) -> dict[str, torch.Tensor]:
    """The trained dense reference of ``seed`` (the starting point and teacher of every pruning run of that seed).

    Trained once (plain recipe, ``args.dense_epochs`` epochs) and cached outside the repository; its test accuracy is
    the ``dense/seed<N>`` row. A missing cache (new machine) retrains it, which is deterministic on the CPU.
    """
    path = cache_dir() / "bench" / f"lenet300-dense-seed{seed}-e{args.dense_epochs}-{args.subset or 'full'}.safetensors"
    if path.exists():
        model = get_model("lenet300")
        prunekit.load(path, model)
        return model.state_dict()
    tcfg = TrainConfig(epochs=args.dense_epochs, seed=seed)
    torch.manual_seed(seed)
    model = get_model("lenet300")
    t = time.time()
    train(model, dataset("mnist", FINAL_SPLIT, args.subset), tcfg, progress=False)
    prunekit.save(model, path)
    key = f"dense/seed{seed}"
    if not store.done(key):
        m = evaluate(model, dataset("mnist", "test"))
        store.put(key, {"model": "lenet300", "data": "mnist", "tool": "dense", "method": "dense", "sparsity": 0.0,
                        "seed": seed, "train_split": FINAL_SPLIT, "epochs": args.dense_epochs,
                        "train_seconds": round(time.time() - t, 1), "test_accuracy": m.accuracy, "test_loss": m.loss})
        print(f"{key}: test {fmt_pct(m.accuracy)}", flush=True)
    return model.state_dict()


def run_grid(args: argparse.Namespace) -> None:
    """Dense reference, then every cell pruned from that seed's dense model with :func:`prunekit.recipes.from_trained`.

    Budget per cell: the dense run (``dense_epochs``) + ``recipe.epochs`` of pruning/fine-tuning = 2x dense. Both tools
    start from the same dense weights, train with the same loop, loss (including distillation from the dense model),
    optimizer, learning-rate schedule and data order; prunekit uses the recipe's ERK allocation, torch its global
    L1 threshold.
    """
    recipe = from_trained(args.prune_epochs)
    out = Path(args.out) / "lenet300_accuracy.json"
    store = ResultStore(out, "lenet300_accuracy", {
        "model": "lenet300", "data": "mnist", "train_split": FINAL_SPLIT, "eval_split": "test",
        "dense_epochs": args.dense_epochs, "recipe": recipe.to_dict(), "oneshot_at": ONESHOT_AT,
        "iterative_rounds": ITERATIVE_ROUNDS, "subset": args.subset, "start": "trained dense model of the same seed",
        "torch_pruning": "torch.nn.utils.prune.global_unstructured(L1Unstructured) at the schedule's steps",
    })
    tag = config_hash(recipe, {"oneshot_at": ONESHOT_AT, "rounds": ITERATIVE_ROUNDS, "from": "dense"})
    # the pass/fail cells first (prunekit's default recipe, every seed), then the rest seed by seed
    cells = [(seed, s, m, t) for seed in args.seeds for s in args.sparsities for m in args.methods for t in args.tools]
    cells.sort(key=lambda c: (not (c[2] == "gradual" and c[3] == "prunekit"), c[0]))
    shard, shards = args.shard
    cells = cells[shard::shards]  # --shard i/n: this process runs every n-th cell (processes share the JSON safely)
    t_grid = time.time()
    states: dict[int, dict[str, torch.Tensor]] = {}
    for i, (seed, s, method, tool) in enumerate(cells):
        if seed not in states:
            states[seed] = dense_state(seed, args, store)
        key = f"{method}/{tool}/{s}/seed{seed}/{tag}"
        if store.done(key):
            continue
        t = time.time()
        schedule_fn = method_schedule(method, recipe, oneshot_at=ONESHOT_AT, rounds=ITERATIVE_ROUNDS)
        allocation = recipe.allocation if tool == "prunekit" else "global"
        rec = train_and_prune(model_name="lenet300", data_name="mnist", tool=tool, sparsity=s, seed=seed,
                              tcfg=recipe.train_config(seed=seed), schedule_fn=schedule_fn, allocation=allocation,
                              train_split=FINAL_SPLIT, eval_splits=("test",), subset=args.subset,
                              init_state=states[seed])
        rec.update(method=method, allocation=allocation)
        store.put(key, rec)
        print(f"[{i + 1}/{len(cells)}] {key}: test {fmt_pct(rec['test_accuracy'])} "
              f"sparsity {rec['achieved_sparsity']:.4f} ({time.time() - t:.0f}s)", flush=True)
    summarize(store, args, tag)
    print(f"grid pass took {time.time() - t_grid:.0f}s; results in {out}")


def summarize(store: ResultStore, args: argparse.Namespace, tag: str) -> None:
    runs = store.runs
    dense = [r["test_accuracy"] for k, r in runs.items() if k.startswith("dense/")]
    table: list[dict[str, Any]] = []
    for s in args.sparsities:
        for method in args.methods:
            for tool in args.tools:
                accs = [r["test_accuracy"] for k, r in runs.items()
                        if k.endswith(f"/{tag}") and r["method"] == method and r["tool"] == tool
                        and r["sparsity"] == s]
                if accs:
                    table.append({"sparsity": s, "method": method, "tool": tool, **spread(accs)})
    summary: dict[str, Any] = {"dense": spread(dense) if dense else None, "table": table, "goals": []}
    if dense:
        d = summary["dense"]["mean"]
        for s, gap in GOALS.items():
            cell = next((c for c in table if c["sparsity"] == s and c["method"] == "gradual"
                         and c["tool"] == "prunekit"), None)
            if cell:
                summary["goals"].append({
                    "sparsity": s, "max_gap_pt": 100 * gap, "gradual_prunekit_mean": cell["mean"], "n": cell["n"],
                    "gap_pt": 100 * (d - cell["mean"]), "met": d - cell["mean"] <= gap})
    store.doc["summary"] = summary
    store.save()
    # ---- table
    print()
    if dense:
        ds = summary["dense"]
        print(f"dense reference ({args.dense_epochs} epochs, {ds['n']} seeds): {fmt_pct(ds['mean'])} "
              f"± {fmt_pct(ds['std'])} (min {fmt_pct(ds['min'])}, max {fmt_pct(ds['max'])})")
    cols = [(m, t) for m in args.methods for t in args.tools]
    print("sparsity | " + " | ".join(f"{m} {t}" for m, t in cols))
    for s in args.sparsities:
        cells = []
        for m, t in cols:
            c = next((c for c in table if c["sparsity"] == s and c["method"] == m and c["tool"] == t), None)
            cells.append(f"{fmt_pct(c['mean'])}±{fmt_pct(c['std'])} [{fmt_pct(c['min'])},{fmt_pct(c['max'])}] n={c['n']}"
                         if c else "—")
        print(f"{100 * s:g}% | " + " | ".join(cells))
    for g in summary["goals"]:
        print(f"goal {100 * g['sparsity']:g}%: gap {g['gap_pt']:.2f} pt (max {g['max_gap_pt']:g}) over "
              f"{g['n']} seeds -> {'MET' if g['met'] else 'NOT MET'}")
    plot(summary, args, Path(store.path).with_suffix(".png"))


def plot(summary: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    xs = list(range(len(args.sparsities)))
    styles = {"prunekit": "-", "torch": "--"}
    colors = {"oneshot": "tab:blue", "iterative": "tab:orange", "gradual": "tab:green"}
    for m in args.methods:
        for t in args.tools:
            pts = [(i, c) for i, s in enumerate(args.sparsities) for c in summary["table"]
                   if c["sparsity"] == s and c["method"] == m and c["tool"] == t]
            if not pts:
                continue
            x = [i + (0.06 if t == "torch" else -0.06) for i, _ in pts]
            y = [100 * c["mean"] for _, c in pts]
            lo = [100 * (c["mean"] - c["min"]) for _, c in pts]
            hi = [100 * (c["max"] - c["mean"]) for _, c in pts]
            ax.errorbar(x, y, yerr=[lo, hi], fmt="o" + styles[t], color=colors.get(m), capsize=3, ms=4,
                        label=f"{m} ({'prunekit' if t == 'prunekit' else 'torch.nn.utils.prune'})")
    if summary["dense"]:
        d = 100 * summary["dense"]["mean"]
        ax.axhline(d, color="k", lw=1, label=f"dense {d:.2f}%")
        for s, gap in GOALS.items():
            if s in args.sparsities:
                i = args.sparsities.index(s)
                ax.plot([i - 0.25, i + 0.25], [d - 100 * gap] * 2, color="red", lw=2)
        ax.plot([], [], color="red", lw=2, label="goal (max gap to dense)")
    ax.set_xticks(xs, [f"{100 * s:g}%" for s in args.sparsities])
    ax.set_xlabel("sparsity of the weights")
    ax.set_ylabel("test accuracy (%) — mean, bars min/max over seeds")
    ax.set_title("LeNet-300-100 on MNIST: 10 dense + 10 pruning epochs, from the dense model")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (< 1 min) into /tmp/prunekit-bench-quick")
    p.add_argument("--search", action="store_true", help="recipe search on the validation split")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest when the 2 cores are shared)")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="seeds to run in this pass")
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th cell starting at i (n processes in parallel)")
    args = p.parse_args(argv)
    try:
        args.shard = tuple(int(v) for v in args.shard.split("/"))
        if len(args.shard) != 2 or not 0 <= args.shard[0] < args.shard[1]:
            raise ValueError
    except ValueError:
        p.error(f"--shard {args.shard!r}: expected i/n with 0 <= i < n, e.g. 0/2 and 1/2 for two processes")
    torch.set_num_threads(args.threads)
    args.sparsities = list(SPARSITIES)
    args.methods, args.tools = list(METHODS), list(TOOLS)
    args.epochs, args.dense_epochs, args.subset, args.prune_epochs = 20, DENSE_EPOCHS, None, DENSE_EPOCHS
    args.search_sparsities = [0.98, 0.995]
    if args.quick:
        args.sparsities, args.seeds, args.epochs, args.dense_epochs, args.subset = [0.9, 0.99], [0], 2, 1, 4000
        args.prune_epochs = 1
        args.search_sparsities = [0.99]
        args.out = args.out or "/tmp/prunekit-bench-quick"
    args.out = args.out or str(RESULTS)
    if args.search:
        run_search(args)
    else:
        run_grid(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
