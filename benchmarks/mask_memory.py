"""Memory held by pruning state: prunekit vs torch.nn.utils.prune, in bytes per element of the masked tensors.

For each model, prune every Conv/Linear weight to 90% with a global magnitude threshold using each tool, then count
the storage actually held, de-duplicated by storage pointer:

* before: every tensor the dense model holds (parameters, buffers, tensor attributes of its modules);
* after: every tensor the pruned model holds plus, for prunekit, every tensor reachable from the returned ``Pruner``
  (its masks and anything else it keeps); for torch.nn.utils.prune the ``weight_orig`` parameter, the ``weight_mask``
  buffer and the recomputed ``weight`` attribute all live on the modules.

extra bytes = bytes of storages held after that were not held before (a storage freed by pruning counts as negative);
reported per element of the masked tensors (goal: prunekit <= 1 byte). Also reported: growth of the model's
``state_dict`` (tensor bytes, keys, and ``torch.save`` size), the size of prunekit's own checkpoint with and without
masks, and the peak resident memory added while pruning (measured in a fresh child process per tool).

Run:  .venv/bin/python benchmarks/mask_memory.py            (full: LeNet-300-100, ResNet-18, ResNet-50, Transformer)
      .venv/bin/python benchmarks/mask_memory.py --quick    (LeNet-300-100 and ResNet-18, no peak-RSS children)
"""

from __future__ import annotations

import argparse
import copy
import gc
import io
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import metadata, png_path, setup_torch, table, write_json

import prunekit
from prunekit.models import get_model

NAME = "mask_memory"
SPARSITY = 0.9
GOAL = 1.0
TOOLS = ("prunekit", "torch.nn.utils.prune")


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "lenet300":
        return get_model("lenet300")
    if name in ("resnet18", "resnet50"):
        import torchvision

        return getattr(torchvision.models, name)(weights=None)
    if name == "transformer":
        layer = nn.TransformerEncoderLayer(384, 6, 1536, dropout=0.0, batch_first=True)
        return nn.TransformerEncoder(layer, num_layers=6, enable_nested_tensor=False)
    raise ValueError(f"unknown model {name!r}")


# --- counting storage -------------------------------------------------------------------------------------------------
def _tensors_in(obj: Any, seen: set[int], depth: int = 0) -> Iterable[torch.Tensor]:
    """Every tensor reachable from ``obj`` through attributes, mappings and sequences (not through nn.Modules)."""
    if id(obj) in seen or depth > 6:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, nn.Module):
        return  # the model is counted separately
    elif isinstance(obj, dict) or hasattr(obj, "items") and callable(obj.items):
        for v in list(obj.values()):
            yield from _tensors_in(v, seen, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from _tensors_in(v, seen, depth + 1)
    elif hasattr(obj, "__dict__"):
        for v in vars(obj).values():
            yield from _tensors_in(v, seen, depth + 1)


def model_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Parameters, buffers and plain tensor attributes (e.g. torch prune's recomputed ``weight``) of all modules."""
    out = []
    for m in model.modules():
        out += [p for p in m._parameters.values() if p is not None]
        out += [b for b in m._buffers.values() if b is not None]
        out += [v for k, v in vars(m).items() if isinstance(v, torch.Tensor) and not k.startswith("_")]
    return out


def storages(tensors: Iterable[torch.Tensor]) -> dict[int, int]:
    """{storage data pointer: storage bytes}, each storage once."""
    out: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        out[st.data_ptr()] = st.nbytes()
    return out


def state_dict_stats(model: nn.Module) -> dict[str, int]:
    sd = model.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    return {"keys": len(sd), "tensor_bytes": sum(storages(sd.values()).values()), "torch_save_bytes": buf.tell()}


def prune_with(tool: str, model: nn.Module) -> Any:
    names = list(prunekit.find_prunable(model))
    if tool == "prunekit":
        return prunekit.prune(model, SPARSITY)
    modules = dict(model.named_modules())
    params = [(modules[n.rsplit(".", 1)[0]], n.rsplit(".", 1)[1]) for n in names]
    torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=SPARSITY)
    return None


def measure(name: str) -> dict[str, Any]:
    base = build(name)
    names = list(prunekit.find_prunable(base))
    masked = sum(dict(base.named_parameters())[n].numel() for n in names)
    out: dict[str, Any] = {"masked_tensors": len(names), "masked_elements": masked,
                           "parameters": sum(p.numel() for p in base.parameters()), "tools": {}}
    dense_sd = state_dict_stats(base)
    out["dense_state_dict"] = dense_sd
    for tool in TOOLS:
        model = copy.deepcopy(base)
        before = storages(model_tensors(model))
        state = prune_with(tool, model)
        held = model_tensors(model) + list(_tensors_in(state, set()))
        after = storages(held)
        new = {p: b for p, b in after.items() if p not in before}
        freed = {p: b for p, b in before.items() if p not in after}
        extra = sum(new.values()) - sum(freed.values())
        sd = state_dict_stats(model)
        info = {
            "bytes_before": sum(before.values()),
            "bytes_after": sum(after.values()),
            "new_storages": len(new),
            "new_bytes": sum(new.values()),
            "freed_bytes": sum(freed.values()),
            "extra_bytes": extra,
            "extra_bytes_per_masked_element": extra / masked,
            "state_dict": sd,
            "state_dict_growth_bytes": sd["tensor_bytes"] - dense_sd["tensor_bytes"],
            "state_dict_growth_per_masked_element": (sd["tensor_bytes"] - dense_sd["tensor_bytes"]) / masked,
            "torch_save_growth_bytes": sd["torch_save_bytes"] - dense_sd["torch_save_bytes"],
            "state_dict_new_keys": sorted(set(model.state_dict()) - set(base.state_dict()))[:6],
            "state_dict_strict_load_into_fresh_model": _strict_loads(name, model),
        }
        if tool == "prunekit":
            info["mask_dtypes"] = sorted({str(m.dtype) for m in state.masks.values()})
            info["pruner_state_bytes"] = sum(storages(state.state_dict()["masks"].values()).values())
            with tempfile.TemporaryDirectory() as d:
                p0 = prunekit.save(model, Path(d) / "plain.pk")
                p1 = prunekit.save(model, Path(d) / "with_masks.pk", pruner=state)
                info["checkpoint_bytes_without_masks"] = p0.stat().st_size
                info["checkpoint_bytes_with_masks"] = p1.stat().st_size
                info["checkpoint_mask_bytes_per_masked_element"] = (p1.stat().st_size - p0.stat().st_size) / masked
        else:
            info["mask_dtypes"] = sorted({str(m.weight_mask.dtype) for m in model.modules()
                                          if hasattr(m, "weight_mask")})
        out["tools"][tool] = info
        del model, state
        gc.collect()
    return out


def _strict_loads(name: str, model: nn.Module) -> str:
    fresh = build(name)
    try:
        fresh.load_state_dict(model.state_dict(), strict=True)
    except RuntimeError as exc:
        return "fails: " + str(exc).splitlines()[0][:120]
    return "ok"


# --- peak RSS in a child process ------------------------------------------------------------------------------------
def peak_child(name: str, tool: str, threads: int) -> dict[str, Any]:
    """Run one pruning in a fresh interpreter: resident memory before, peak during (VmHWM after resetting it through
    /proc/self/clear_refs) and after."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, tool, "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child(name: str, tool: str) -> None:
    model = build(name)
    masked = sum(p.numel() for p in prunekit.find_prunable(model).values())
    gc.collect()
    rss_before = _status("VmRSS")
    reset = _reset_peak()  # VmHWM := current RSS, so building the model does not hide pruning's own peak
    state = prune_with(tool, model)
    peak = _status("VmHWM")
    rss_after = _status("VmRSS")
    del state
    print(json.dumps({"rss_before": rss_before, "peak_during": peak, "rss_after": rss_after, "peak_reset": reset,
                      "peak_added_bytes": peak - rss_before, "rss_added_bytes": rss_after - rss_before,
                      "masked_elements": masked}))


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _status(key: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return -1


# --- output -----------------------------------------------------------------------------------------------------------
def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    has_peak = all("peak_rss" in results[m] for m in models)
    fig, axes = plt.subplots(1, 2 if has_peak else 1, figsize=(11 if has_peak else 6.4, 3.6), squeeze=False)
    width = 0.38

    def bars(ax, values: dict[str, list[float]], ylabel: str, title: str, goal: float | None) -> None:
        for j, tool in enumerate(TOOLS):
            vals = values[tool]
            bs = ax.bar([i + (j - 0.5) * width for i in range(len(models))], vals, width, label=tool,
                        color="tab:green" if tool == "prunekit" else "tab:gray")
            for b, v in zip(bs, vals):
                ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        if goal is not None:
            ax.axhline(goal, color="tab:red", ls="--", lw=0.8, label="goal: <= 1 byte")
        ax.set_xticks(range(len(models)), models)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)

    bars(axes[0][0], {t: [results[m]["tools"][t]["extra_bytes_per_masked_element"] for m in models] for t in TOOLS},
         "extra bytes held per masked element", "Pruning state held at 90% sparsity (storage de-duplicated)", GOAL)
    if has_peak:
        peak = {t: [results[m]["peak_rss"][t].get("peak_added_bytes", float("nan")) / results[m]["masked_elements"]
                    for m in models] for t in TOOLS}
        bars(axes[0][1], peak, "peak RSS added, B per masked element",
             "Transient memory of one global prune (child process)", None)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: two small models, no peak-RSS children")
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--peak", action=argparse.BooleanOptionalAction, default=None,
                    help="measure peak RSS added while pruning, in child processes (default: on unless --quick)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "TOOL"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    setup_torch(args.threads)
    if args.child:
        child(*args.child)
        return 0
    models = args.models or (["lenet300", "resnet18"] if args.quick else
                             ["lenet300", "resnet18", "resnet50", "transformer"])
    do_peak = (not args.quick) if args.peak is None else args.peak
    meta = metadata()
    results = {}
    for m in models:
        print(f"{m} ...", flush=True)
        results[m] = measure(m)
        if do_peak:
            results[m]["peak_rss"] = {tool: peak_child(m, tool, args.threads) for tool in TOOLS}
    data = {"meta": meta,
            "config": {"sparsity": SPARSITY, "tensors": "every Linear/Conv weight (prunekit.find_prunable), global "
                       "magnitude", "quick": args.quick, "peak_rss": do_peak},
            "results": results}
    path = write_json(NAME, data, args.quick)
    png = png_path(NAME, args.quick)
    plot(results, png)

    rows = []
    for m, r in results.items():
        for tool in TOOLS:
            i = r["tools"][tool]
            peak = r.get("peak_rss", {}).get(tool, {})
            rows.append([
                m, tool, f"{r['masked_elements']:,}", f"{i['extra_bytes_per_masked_element']:.3f}",
                ",".join(d.removeprefix("torch.") for d in i["mask_dtypes"]),
                f"{i['state_dict_growth_per_masked_element']:.3f}", f"{i['torch_save_growth_bytes'] / 1e6:+.2f}",
                i["state_dict_strict_load_into_fresh_model"][:24],
                f"{peak['peak_added_bytes'] / r['masked_elements']:.2f}" if "peak_added_bytes" in peak else "-",
            ])
    print()
    print(table(rows, ["model", "tool", "masked elems", "extra B/elem", "mask dtype", "state_dict B/elem",
                       "torch.save MB", "strict load", "peak RSS B/elem"]))
    for m, r in results.items():
        pk = r["tools"]["prunekit"]
        print(f"  {m}: prunekit checkpoint masks {pk['checkpoint_mask_bytes_per_masked_element']:.3f} B/elem on disk; "
              f"goal <= 1 B/elem held: {'MET' if pk['extra_bytes_per_masked_element'] <= GOAL else 'NOT MET'}")
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
