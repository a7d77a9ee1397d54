"""Training-step overhead of active gradual pruning: prunekit vs torch.nn.utils.prune vs the same dense model.

For each model, three copies of one initialisation train side by side on one fixed random batch (SGD, momentum 0.9):

* ``dense``: forward, loss, backward, ``optimizer.step()``;
* ``prunekit``: the same plus ``pruner.step()`` (``Pruner(model, 0.9, schedule=Gradual(start=0, end=E, every=10))``,
  so masks are recomputed every 10 steps *inside* the measured window);
* ``torch.nn.utils.prune``: the same plus ``global_unstructured(..., L1Unstructured, amount=<count>)`` at the same
  steps, to the same cumulative sparsity; its forward pre-hooks recompute ``weight = weight_orig * weight_mask``.

Steps are interleaved (one step of each variant in turn, the order rotating every step) after a warm-up, so load on
the machine hits all variants alike. overhead = median(pruned step) / median(dense step) - 1; the mean (which includes
the mask-update steps), the paired per-step ratios, a bootstrap interval and every raw timing are reported too. After
the run the script checks that every pruned weight is exactly zero. A failure of a tool (e.g. torch.nn.utils.prune on
nn.TransformerEncoder) is recorded with its error message, not raised.

With ``--profile`` (on by default in the full run) the script then measures where prunekit's per-step time goes: the
cost of ``pruner.step()`` on a plain step and on an update step, and alternative ways of re-zeroing the weights
(``_foreach_mul_`` with bool masks as prunekit does, with float masks, ``masked_fill_``, ``torch.where``, ...), each
interleaved with the others on the model's own tensors.

Run:  .venv/bin/python benchmarks/step_overhead.py            (full, a few minutes)
      .venv/bin/python benchmarks/step_overhead.py --quick    (smoke, ~2 min on a quiet machine)
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    bootstrap_ratio_ci,
    metadata,
    png_path,
    setup_torch,
    summarize,
    table,
    write_json,
)
from _prototype import FastPruner

import prunekit
from prunekit.models import get_model

NAME = "step_overhead"
PROTO = "prototype"
SPARSITY = 0.9
EVERY = 10
GOAL = 0.03


# --- models -----------------------------------------------------------------------------------------------------------
@dataclass
class Workload:
    name: str
    description: str
    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    lr: float = 0.01


def build(name: str, dropout: float) -> Workload:
    torch.manual_seed(0)
    if name == "lenet300":
        model = get_model("lenet300")
        x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
        return Workload(name, "prunekit LeNet-300-100, batch 128 x 1x28x28, cross-entropy", model, x, y,
                        nn.functional.cross_entropy)
    if name == "resnet18":
        import torchvision

        model = torchvision.models.resnet18(weights=None)
        x, y = torch.randn(16, 3, 112, 112), torch.randint(0, 1000, (16,))
        return Workload(name, "torchvision ResNet-18 (1000 classes), batch 16 x 3x112x112, cross-entropy, train mode",
                        model, x, y, nn.functional.cross_entropy)
    if name == "transformer":
        layer = nn.TransformerEncoderLayer(d_model=384, nhead=6, dim_feedforward=1536, dropout=dropout,
                                           batch_first=True)
        model = nn.TransformerEncoder(layer, num_layers=6, enable_nested_tensor=False)
        x, y = torch.randn(8, 128, 384), torch.randn(8, 128, 384)
        return Workload(name, f"nn.TransformerEncoder 6 layers, d_model=384, nhead=6, dim_feedforward=1536, "
                              f"dropout={dropout}, batch_first, batch 8 x seq 128, MSE to a random target",
                        model, x, y, nn.functional.mse_loss)
    raise ValueError(f"unknown model {name!r}; choose lenet300, resnet18, transformer")


# --- variants ---------------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    """One training copy; ``step()`` returns (total seconds, seconds spent in the pruning call, mask updated?)."""

    name: str
    model: nn.Module
    work: Workload
    opt: torch.optim.Optimizer = field(init=False)
    t: int = 0
    error: str | None = None
    error_step: int | None = None

    def __post_init__(self) -> None:
        self.opt = torch.optim.SGD(self.model.parameters(), lr=self.work.lr, momentum=0.9)

    def train_step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = self.work.loss_fn(self.model(self.work.inputs), self.work.targets)
        loss.backward()
        self.opt.step()

    def prune_step(self) -> bool:
        return False

    def step(self) -> tuple[float, float, bool, float]:
        """(wall seconds, wall seconds of the pruning call, masks updated?, CPU seconds of the process)."""
        c0 = time.process_time()
        t0 = time.perf_counter()
        self.train_step()
        t1 = time.perf_counter()
        updated = self.prune_step()
        t2 = time.perf_counter()
        c1 = time.process_time()
        self.t += 1
        return t2 - t0, t2 - t1, updated, c1 - c0


class Dense(Variant):
    pass


class PrunekitVariant(Variant):
    def __init__(self, name: str, model: nn.Module, work: Workload, schedule: prunekit.Gradual,
                 pruner_cls: type[prunekit.Pruner] = prunekit.Pruner) -> None:
        super().__init__(name, model, work)
        self.pruner = pruner_cls(model, SPARSITY, schedule=schedule)

    def prune_step(self) -> bool:
        return self.pruner.step()

    def check_zeros(self) -> dict[str, Any]:
        nonzero_pruned = sum(int(p.detach()[~m].count_nonzero()) for p, m in
                             zip(self.pruner.params.values(), self.pruner.masks.values()))
        n = self.pruner.masks.numel()
        return {"pruned": self.pruner.masks.num_pruned(), "elements": n, "nonzero_at_pruned": nonzero_pruned}


class TorchPruneVariant(Variant):
    """torch.nn.utils.prune driven at the same steps to the same cumulative sparsity (``amount`` as a count)."""

    def __init__(self, name: str, model: nn.Module, work: Workload, schedule: prunekit.Gradual,
                 names: list[str]) -> None:
        super().__init__(name, model, work)
        self.schedule = schedule
        modules = dict(model.named_modules())
        self.params = [(modules[n.rsplit(".", 1)[0]], n.rsplit(".", 1)[1]) for n in names]
        self.numel = sum(getattr(m, a).numel() for m, a in self.params)
        self.n_pruned = 0

    def prune_step(self) -> bool:
        if not self.schedule.updates_at(self.t):
            return False
        target = math.floor(self.schedule.sparsity(self.t, SPARSITY) * self.numel + 0.5)
        amount = max(0, target - self.n_pruned)  # an int amount counts among the still-unpruned weights
        torch_prune.global_unstructured(self.params, pruning_method=torch_prune.L1Unstructured, amount=amount)
        self.n_pruned += amount
        return True

    def check_zeros(self) -> dict[str, Any]:
        masks = [getattr(m, a + "_mask", None) for m, a in self.params]
        if any(mk is None for mk in masks):
            return {"pruned": 0, "elements": self.numel, "nonzero_at_pruned": None}
        pruned = sum(int((mk == 0).sum()) for mk in masks)
        nz = sum(int(getattr(m, a).detach()[mk == 0].count_nonzero()) for (m, a), mk in zip(self.params, masks))
        return {"pruned": pruned, "elements": self.numel, "nonzero_at_pruned": nz}


# --- one model --------------------------------------------------------------------------------------------------------
def run_model(name: str, warmup: int, steps: int, dropout: float, prototype: bool,
              log: Callable[[str], None]) -> dict[str, Any]:
    work = build(name, dropout)
    base = work.model
    names = list(prunekit.find_prunable(base))
    end = warmup + steps  # the schedule keeps updating every EVERY steps through the whole measured window
    schedule = prunekit.Gradual(start=0, end=end, every=EVERY)
    variants: list[Variant] = [
        Dense("dense", copy.deepcopy(base), work),
        PrunekitVariant("prunekit", copy.deepcopy(base), work, schedule),
        TorchPruneVariant("torch.nn.utils.prune", copy.deepcopy(base), work, schedule, names),
    ]
    if prototype:
        variants.append(PrunekitVariant(PROTO, copy.deepcopy(base), work, schedule, FastPruner))
    raw: dict[str, dict[str, list]] = {v.name: {"total": [], "prune": [], "updated": [], "step": [], "cpu": []}
                                       for v in variants}
    n_variants = len(variants)
    for i in range(warmup + steps):
        k = i % n_variants
        order = variants[k:] + variants[:k]  # rotate who goes first
        for v in order:
            if v.error is not None:
                continue
            try:
                total, prune_part, updated, cpu = v.step()
            except Exception as exc:  # noqa: BLE001 - a failing tool is a result, not a crash (torch prune on MHA)
                v.error, v.error_step = f"{type(exc).__name__}: {exc}", v.t
                log(f"    {v.name} failed at step {v.t}: {v.error.splitlines()[0][:160]}")
                v.t += 1
                continue
            if i >= warmup:
                r = raw[v.name]
                r["total"].append(total)
                r["prune"].append(prune_part)
                r["updated"].append(updated)
                r["step"].append(v.t - 1)
                r["cpu"].append(cpu)
        if i == warmup - 1:
            gc.collect()

    out: dict[str, Any] = {
        "description": work.description,
        "prunable_tensors": len(names),
        "prunable_elements": sum(dict(base.named_parameters())[n].numel() for n in names),
        "parameters": sum(p.numel() for p in base.parameters()),
        "schedule": schedule.to_dict(),
        "final_sparsity_target": SPARSITY,
        "warmup_steps": warmup,
        "measured_steps": steps,
        "raw": raw,
        "variants": {},
    }
    dense_total = raw["dense"]["total"]
    dense_med, dense_mean = statistics.median(dense_total), statistics.fmean(dense_total)
    for v in variants:
        r = raw[v.name]
        info: dict[str, Any] = {"error": v.error, "error_step": v.error_step, "steps_done": v.t}
        if r["total"]:
            info["total"] = summarize(r["total"])
            typical = [t for t, u in zip(r["total"], r["updated"]) if not u]
            update = [p for p, u in zip(r["prune"], r["updated"]) if u]
            plain_prune = [p for p, u in zip(r["prune"], r["updated"]) if not u]
            info["total_plain_steps"] = summarize(typical)
            info["prune_call_plain_steps"] = summarize(plain_prune)
            info["prune_call_update_steps"] = summarize(update)
            info["n_updates_measured"] = len(update)
            info["cpu"] = summarize(r["cpu"])
        if v.name != "dense" and len(r["total"]) >= max(5, steps // 2) and v.error is None:
            med, mean = statistics.median(r["total"]), statistics.fmean(r["total"])
            lo, hi = bootstrap_ratio_ci(r["total"], dense_total)
            paired = [a / b for a, b in zip(r["total"], dense_total)]
            info["overhead"] = {
                "median": med / dense_med - 1,
                "median_cpu_time": statistics.median(r["cpu"]) / statistics.median(raw["dense"]["cpu"]) - 1,
                "median_bootstrap95": [lo - 1, hi - 1],
                "mean": mean / dense_mean - 1,
                "median_of_paired_ratios": statistics.median(paired) - 1,
                "paired_ratio_iqr": [summarize(paired)["p25"] - 1, summarize(paired)["p75"] - 1],
                "goal": GOAL,
                "goal_met_median": med / dense_med - 1 <= GOAL,
            }
        if isinstance(v, (PrunekitVariant, TorchPruneVariant)) and v.error is None:
            z = v.check_zeros()
            expected = math.floor(schedule.sparsity(v.t - 1, SPARSITY) * z["elements"] + 0.5)
            z["expected_pruned"] = expected
            z["ok"] = z["nonzero_at_pruned"] == 0 and z["pruned"] == expected
            info["zeros_check"] = z
        out["variants"][v.name] = info
    out["dense_median_s"] = dense_med

    if prototype:  # the prototype must make exactly the same masks and weights as prunekit
        pk = next(v for v in variants if v.name == "prunekit")
        pr = next(v for v in variants if v.name == PROTO)
        if pk.error is None and pr.error is None:
            out["prototype_identical_to_prunekit"] = {
                "masks": pk.pruner.masks.equal(pr.pruner.masks),
                "weights": all(torch.equal(a, b) for a, b in zip(pk.model.parameters(), pr.model.parameters())),
            }
    out["_pruner"] = next(v for v in variants if v.name == "prunekit").pruner  # for --profile, not written
    return out


# --- profiling ----------------------------------------------------------------------------------------------------------
def interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for f in fns.values():
        f()  # warm-up
    for r in range(reps):
        k0 = r % len(keys)
        for k in keys[k0:] + keys[:k0]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times


@torch.no_grad()
def profile_apply(pruner: prunekit.Pruner, reps: int) -> dict[str, Any]:
    """Alternatives for re-zeroing pruned weights, each timed on the model's own tensors, interleaved."""
    import numpy as np

    params = [p.detach() for p in pruner.params.values()]
    masks = list(pruner.masks.values())
    fmasks = [m.float() for m in masks]  # 4 bytes per element: breaks the 1-byte memory bar, a speed reference only
    inv = [~m for m in masks]  # a second bool mask: 2 bytes per element in all
    zero = torch.zeros(())
    np_pairs = [(p.numpy(), m.numpy()) for p, m in zip(params, masks)]
    threads = torch.get_num_threads()

    def one_thread() -> None:
        torch.set_num_threads(1)
        torch._foreach_mul_(params, masks)
        torch.set_num_threads(threads)

    def numpy_mul() -> None:
        for w, m in np_pairs:
            np.multiply(w, m, out=w)
        torch.autograd.graph.increment_version(params)

    fns = {
        "pruner.apply() [torch._foreach_mul_, bool masks]": pruner.apply,
        "torch._foreach_mul_, bool masks, 1 thread": one_thread,
        "torch._foreach_mul_, float masks (4 B/elem)": lambda: torch._foreach_mul_(params, fmasks),
        "loop masked_fill_(inverted mask, 0) (+1 B/elem)": lambda: [p.masked_fill_(i, 0) for p, i in
                                                                   zip(params, inv)],
        "loop torch.where(mask, w, 0, out=w)": lambda: [torch.where(m, p, zero, out=p) for p, m in
                                                          zip(params, masks)],
        "NumPy np.multiply(w, mask, out=w) [prototype]": numpy_mul,
    }
    times = interleaved(fns, reps)
    pruner.apply()  # leave the model correctly masked
    return {k: summarize(v) | {"raw": v} for k, v in times.items()}


@torch.no_grad()
def profile_update(pruner: prunekit.Pruner, reps: int) -> dict[str, Any]:
    """Cost of one mask recomputation and its parts (prunekit's own functions, same order as Pruner.update), and of
    the prototype's update on the same tensors and masks. Re-selecting at the current sparsity keeps the masks."""
    from prunekit.scoring import score_tensors
    from prunekit.select import select

    target = pruner.masks.sparsity()
    saved = pruner.masks.clone()
    proto = FastPruner(pruner.model, pruner.sparsity, schedule=pruner.schedule)
    proto.set_masks(saved)
    parts: dict[str, list[float]] = {}
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            scores = score_tensors(pruner.criterion, dict(pruner.params))
            t1 = time.perf_counter()
            new = select(scores, target, pruner.allocation, current=pruner.masks, regrow=pruner.regrow)
            t2 = time.perf_counter()
            pruner._set_masks(new)
            t3 = time.perf_counter()
            del scores, new
            pruner.update(target)
            t4 = time.perf_counter()
            proto.update(target)
            t5 = time.perf_counter()
            for key, dt in (("score_tensors (|w| + NaN checks)", t1 - t0), ("select (global threshold)", t2 - t1),
                            ("_set_masks (copy, count, apply)", t3 - t2), ("update() total", t4 - t3),
                            ("prototype update() total", t5 - t4)):
                parts.setdefault(key, []).append(dt)
    except Exception as exc:  # noqa: BLE001 - internal API moved: report it, do not crash the benchmark
        return {"error": f"{type(exc).__name__}: {exc}"}
    if not (pruner.masks.equal(saved) and proto.masks.equal(saved)):
        raise RuntimeError("re-selecting at the current sparsity changed the masks")
    return {k: summarize(v) for k, v in parts.items()}


def profile_model(res: dict[str, Any], reps: int) -> dict[str, Any]:
    pruner = res["_pruner"]
    dense_med = res["dense_median_s"]
    apply = profile_apply(pruner, reps)
    update = profile_update(pruner, max(3, reps // 5))
    as_overhead = {k: v["median"] / dense_med for k, v in apply.items()}
    return {"apply_variants": apply, "apply_as_fraction_of_dense_step": as_overhead, "update_parts": update,
            "dense_median_s": dense_med}


# --- output -----------------------------------------------------------------------------------------------------------
def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.8), squeeze=False)
    colors = {"dense": "tab:blue", "prunekit": "tab:green", "torch.nn.utils.prune": "tab:gray",
              PROTO: "tab:olive"}
    for ax, m in zip(axes[0], models):
        res = results[m]
        dense_med = res["dense_median_s"]
        data, labels, cols, failed = [], [], [], []
        for vname, info in res["variants"].items():
            xs = res["raw"][vname]["total"]
            label = vname.replace("torch.nn.utils.prune", "torch prune")
            if info.get("error"):
                failed.append((len(labels) + 1, f"{label}\nFAILED\n(step {info['error_step']})"))
                labels.append(label)
                data.append([float("nan")])
                cols.append("white")
                continue
            data.append([x / dense_med for x in xs])
            labels.append(label)
            cols.append(colors.get(vname, "tab:orange"))
        bp = ax.boxplot(data, showfliers=True, whis=(5, 95), patch_artist=True)
        ax.set_xticks(range(1, len(labels) + 1), labels)
        for patch, c in zip(bp["boxes"], cols):
            patch.set_facecolor(c)
            patch.set_alpha(0.5)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(1.0 + GOAL, color="tab:red", lw=0.8, ls="--", label="+3% goal")
        finite = [x for d in data for x in d if not math.isnan(x)]
        ax.set_ylim(max(0.5, min(0.8, min(finite) * 0.97)), min(max(finite) * 1.05, 2.0))
        for pos, text in failed:
            ax.text(pos, 1.0 + GOAL, text, ha="center", va="bottom", fontsize=8, color="tab:red")
        notes = []
        for vname, info in res["variants"].items():
            if "overhead" in info:
                notes.append(f"{vname.split('.')[0]}: {info['overhead']['median'] * 100:+.1f}% med")
            if info.get("error"):
                notes.append(f"{vname.split('.')[0]}: FAILED at step {info['error_step']}")
        ax.set_title(f"{m}\n" + "; ".join(notes), fontsize=8)
        ax.set_ylabel("step time / median dense step")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("Training step with active gradual pruning (every 10 steps), interleaved; whiskers 5-95%",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:+.1f}%"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: few steps, no profiling")
    ap.add_argument("--models", nargs="+", default=["lenet300", "resnet18", "transformer"])
    ap.add_argument("--steps", type=int, nargs="+", default=None,
                    help="measured steps per model (one value, or one per model); default 1000/200/60, quick 60/20/10")
    ap.add_argument("--warmup", type=int, default=None,
                    help="un-timed steps first, a multiple of 10 (default 20, quick 10)")
    ap.add_argument("--prototype", action=argparse.BooleanOptionalAction, default=False,
                    help="also run the NumPy prototype of a faster core (benchmarks/_prototype.py) as a 4th variant; its changes are now in the core, default off")
    ap.add_argument("--dropout", type=float, default=0.0, help="TransformerEncoder dropout (default 0.0)")
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                    help="profile prunekit's per-step costs afterwards (default: on unless --quick)")
    ap.add_argument("--profile-reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    setup_torch(args.threads)
    default_steps = {"lenet300": 1000, "resnet18": 200, "transformer": 60}
    quick_steps = {"lenet300": 60, "resnet18": 20, "transformer": 10}
    if args.steps is None:
        steps = {m: (quick_steps if args.quick else default_steps)[m] for m in args.models}
    elif len(args.steps) == 1:
        steps = {m: args.steps[0] for m in args.models}
    else:
        steps = dict(zip(args.models, args.steps, strict=True))
    for m, s in steps.items():
        if s % EVERY:
            ap.error(f"--steps for {m} must be a multiple of {EVERY}, got {s}")
    warmup = args.warmup if args.warmup is not None else (10 if args.quick else 20)
    if warmup % EVERY:
        ap.error(f"--warmup must be a multiple of {EVERY}, got {warmup}")
    do_profile = (not args.quick) if args.profile is None else args.profile
    reps = args.profile_reps or (30 if not args.quick else 10)
    meta = metadata()

    results: dict[str, Any] = {}
    profiles: dict[str, Any] = {}
    for m in args.models:
        print(f"{m}: {warmup} warm-up + {steps[m]} measured steps per variant", flush=True)
        t0 = time.perf_counter()
        res = run_model(m, warmup, steps[m], args.dropout, args.prototype, print)
        if do_profile:
            profiles[m] = profile_model(res, reps)
        res.pop("_pruner")
        results[m] = res
        print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
        gc.collect()

    data = {
        "meta": meta,
        "config": {"sparsity": SPARSITY, "every": EVERY, "warmup": warmup, "steps": steps,
                   "prototype": "benchmarks/_prototype.py FastPruner: prunekit's Pruner with NumPy re-zeroing and "
                                "selection, not part of the package" if args.prototype else None,
                   "dropout_transformer": args.dropout, "optimizer": "SGD(lr=0.01, momentum=0.9)",
                   "quick": args.quick,
                   "definition": "overhead = median(pruned step) / median(dense step) - 1; a step is zero_grad + "
                                 "forward + loss + backward + optimizer.step (+ pruner.step() / the torch prune call "
                                 "at update steps); the mean includes the mask-update steps"},
        "results": results,
        "profile": profiles,
    }
    path = write_json(NAME, data, args.quick)
    png = png_path(NAME, args.quick)
    plot(results, png)

    rows = []
    for m, res in results.items():
        for vname in [v for v in res["variants"] if v != "dense"]:
            info = res["variants"][vname]
            ov = info.get("overhead", {})
            z = info.get("zeros_check", {})
            err = info.get("error")
            rows.append([
                m, vname, f"{res['dense_median_s'] * 1e3:.2f}",
                f"{info['total']['median'] * 1e3:.2f}" if "total" in info else "-",
                fmt_pct(ov.get("median")),
                (f"{fmt_pct(ov['median_bootstrap95'][0])}..{fmt_pct(ov['median_bootstrap95'][1])}" if ov else "-"),
                fmt_pct(ov.get("mean")), fmt_pct(ov.get("median_of_paired_ratios")),
                fmt_pct(ov.get("median_cpu_time")),
                (f"{info['prune_call_update_steps']['median'] * 1e3:.1f}"
                 if info.get("prune_call_update_steps", {}).get("n") else "-"),
                ("ok" if z.get("ok") else ("FAIL" if z else "-")),
                (f"FAILED at step {info['error_step']}: {err.splitlines()[0][:70]}" if err else ""),
            ])
    print()
    print(table(rows, ["model", "tool", "dense ms", "pruned ms", "overhead", "95% CI", "mean ovh", "paired",
                       "cpu ovh", "update ms", "zeros", "error"]))
    for m, res in results.items():
        if "prototype_identical_to_prunekit" in res:
            print(f"  {m}: prototype identical to prunekit: {res['prototype_identical_to_prunekit']}")
    for m, res in results.items():
        ov = res["variants"]["prunekit"].get("overhead")
        if ov:
            print(f"  goal <= +3% (median) on {m}: {'MET' if ov['goal_met_median'] else 'NOT MET'} "
                  f"({ov['median'] * 100:+.1f}%)")
    if profiles:
        for m, p in profiles.items():
            print(f"\nprofile {m} (dense step median {p['dense_median_s'] * 1e3:.2f} ms): re-zeroing alternatives")
            rows = [[k, f"{v['median'] * 1e3:.3f}", f"{v['min'] * 1e3:.3f}",
                     f"{p['apply_as_fraction_of_dense_step'][k] * 100:.1f}%"]
                    for k, v in p["apply_variants"].items()]
            print(table(rows, ["variant", "median ms", "min ms", "% of dense step"]))
            if "error" in p["update_parts"]:
                print(f"mask update profile failed: {p['update_parts']['error']}")
                continue
            rows = [[k, f"{v['median'] * 1e3:.1f}", f"{v['min'] * 1e3:.1f}"] for k, v in p["update_parts"].items()]
            print(table(rows, ["mask update part", "median ms", "min ms"]))
    print(f"\nload average start {meta['loadavg_start']} end {data['meta']['loadavg_end']}")
    print(f"wrote {path} and {png}")
    ok = all(info.get("zeros_check", {}).get("ok", True) for res in results.values()
             for n, info in res["variants"].items() if n == "prunekit")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
