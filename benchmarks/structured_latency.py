"""Structured pruning, measured: MACs and CPU latency of 15 torchvision models, prunekit vs Torch-Pruning 1.6.1.

For each model (random init, ``torch.manual_seed(0)``, eval mode, 224x224):

* ``dense``: the model as built.
* ``ours``: ``prunekit.structured.plan(model, x, sparsity=0.5, criterion="l2", round_to=R)``: half of the units of
  every coupled group (transformers: half the heads, half the MLP hidden units and half the embedding width), no
  ignore list; prune time = trace + plan (with its check run) + apply.
* ``theirs``: Torch-Pruning 1.6.1 as in its own ``examples/torchvision_models/torchvision_pruning.py``:
  ``MetaPruner(model, x, GroupMagnitudeImportance(p=2), pruning_ratio=0.5)``, the 1000-way classifier ignored, ViT
  rounded to its head count (and ``hidden_dim`` updated afterwards). It runs in a child process with a memory cap
  (``--tp-memory-gb``) and a time limit, because it can exhaust memory (swin_t). The pruned model comes back without
  pickle: the child writes its ``state_dict`` and its output on the input to a safetensors file, with the plain
  attributes that pruning changed (``out_channels``, ``num_features``, ``embed_dim``, ViT's ``hidden_dim``, ...) in
  the file's metadata; the parent rebuilds the model, applies the attributes, resizes every parameter and buffer to
  the saved shape, loads the state dict (strict) and checks that it reproduces the child's output and a sample of
  every submodule's output (the logits alone are 0 or ~1e-11 on random-init ViT and MobileNets). Any failure
  (including a mismatch) is recorded as the result.
* ``ours_2x``: prunekit pruned for speed at the issue's MAC floor: ``plan(model, x16, macs=0.5,
  allocation="latency", criterion="l2", round_to=R2)`` with ``x16`` the batch-16 input: the dense model's layers
  are profiled at batch 16, and the fastest of up to eight measured candidates that halve the MACs is kept (units
  ranked by score per second saved, at most half or at most 0.8 of any group; ranked by seconds saved per MAC
  saved, at most half of any group; or the same fraction of every group; each with channel counts multiples of
  ``R2`` and of ``2 * R2`` — every layer of a concatenation too —, refilled towards the budget where that returns
  more work than time). ``R2`` defaults to 8 (``--round-to-2x``): on a CPU with AVX-512 oneDNN blocks channels by
  16, which the ``2 * R2`` candidates keep, but a 16-channel stem (MobileNetV3) can only be halved with 8. Half of
  every group's channels cuts the MACs 3-4x, and thin layers run far below their
  MAC rate on CPU, so the latency per MAC removed is better at 2x. The allocation is chosen for speed on this
  machine, not for accuracy (these are random-init models); its accuracy on real data is in
  ``structured_accuracy.py``.
* ``ours_matched``: prunekit at the MACs Torch-Pruning reached (uniform per-group sparsity found by bisection on the
  predicted MACs, ``verify=False``, then applied and counted), for the "same speed at equal MACs" comparison. With
  ``round_to=R`` first; where R's steps cannot land within 1% of Torch-Pruning's MACs (MnasNet's 16- and 24-channel
  groups, ViT's heads), R/2, R/4, ... down to 1, and the closest is kept (``run_matched``; the JSON records the tries).

MACs are counted for all by ``prunekit.flops.count_macs`` at batch 1. Each model is pruned and measured in a fresh
Python process of its own (``--in-process``: all in this one), so no model's figures depend on the ones measured
before it; within that process all its variants are timed together by ``prunekit.structured.measure_latency``:
``torch.inference_mode``, 2 intra-op threads, ``--warmup`` (>= 3) warm-up calls per model, median of ``--repeats``
(>= 10) samples, the models interleaved in rotating order, at batch 1 and batch 16. Results are written after
every model to ``benchmarks/results/structured_latency[_quick].json`` (a rerun skips finished models; delete the file
to start over) and drawn to the ``.png`` next to it.

``--passes P`` repeats the measurement P times per model, planning ``ours_2x`` again each time (its allocation is
chosen from noisy timings too); every pass is kept in the JSON and the summary and the bars use the median over
passes, so one noisy stretch of a shared machine decides nothing.

Bars (issue 3): every model loses >= 2x MACs (``ours`` and ``ours_2x``); at batch 16, latency speedup / MAC
reduction >= 0.8 (``ours_2x``; ``ours`` at 50% of the channels is reported beside it); at both batch sizes,
``ours_matched``'s speedup >= 0.95 x Torch-Pruning's, judged pairwise: ``vs_tp_b<batch>`` is the median over passes
of Torch-Pruning's median time over ``ours_matched``'s in the same pass (see :func:`median_summary`).
``--resummarize`` recomputes the summaries and bars of a results file from its stored timings, measuring nothing.

Run (quiet machine; ~25 min):  .venv/bin/python benchmarks/structured_latency.py
As committed, medians of 5 passes (~1 h 45 min on 2 cores); the four models whose ``ours_matched`` changed with the
finer rounding (MobileNetV2/V3, MnasNet, ViT; the others' were already within 1%) were measured again with
``--models``, after deleting their records from the JSON:
    .venv/bin/python benchmarks/structured_latency.py --repeats 10 --passes 5
Smoke (~3 min):             .venv/bin/python benchmarks/structured_latency.py --quick
Torch-Pruning is a benchmark-only dependency: ``.venv/bin/pip install torch-pruning==1.6.1 --no-deps``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import png_path, setup_torch, table  # noqa: E402
from _harness import RESULTS, ResultStore  # noqa: E402

from prunekit.fileformat import write_text  # noqa: E402
from prunekit.flops import count_macs, count_params  # noqa: E402
from prunekit.structured import measure_latency, plan, trace  # noqa: E402

NAME = "structured_latency"
MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "densenet121", "efficientnet_b0",
          "regnet_x_400mf", "shufflenet_v2_x1_0", "vgg11_bn", "convnext_tiny", "vit_b_16", "squeezenet1_0",
          "googlenet", "mnasnet0_5", "swin_t"]
QUICK_MODELS = ["resnet18", "mobilenet_v3_small"]
TOLERANCE = 0.95  # "at least Torch-Pruning's speedup at equal MACs (5% tolerance)"
MATCH_TOLERANCE = 0.01  # ours_matched's MACs within 1% of Torch-Pruning's, else a finer round_to is tried


def build(name: str) -> nn.Module:
    import torchvision.models as tv

    torch.manual_seed(0)
    kwargs: dict[str, Any] = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    return getattr(tv, name)(weights=None, **kwargs).eval()


# --------------------------------------------------------------------------------------------------------------------
# Torch-Pruning, in a child process


_REFERENCE = "__reference_"  # prefix of the non-state-dict tensors in the transfer file (no state_dict key has it)
_REFERENCE_INPUT, _REFERENCE_OUTPUT = f"{_REFERENCE}input__", f"{_REFERENCE}output__"
_MODULE_BOOKKEEPING = frozenset(vars(nn.Module()))  # training, _parameters, _forward_hooks, ...


def _plain(value: Any) -> bool:
    """Whether ``value`` survives a JSON round trip (up to tuple -> list)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (tuple, list)) and all(_plain(v) for v in value)


def _plain_attrs(module: nn.Module) -> dict[str, Any]:
    """The module's own plain attributes: ``out_channels``, ``normalized_shape``, ``embed_dim``,
    ``_qkv_same_embed_dim``, ... (underscore attributes included, nn.Module's bookkeeping and ``training`` not)."""
    return {k: v for k, v in vars(module).items() if k not in _MODULE_BOOKKEEPING and _plain(v)}


def changed_attrs(pruned: nn.Module, fresh: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module name: {attribute: value}}`` for the plain attributes of ``pruned`` that differ from ``fresh`` (the
    same architecture as built; ``""`` is the top-level model)."""
    mods, fresh_mods = dict(pruned.named_modules()), dict(fresh.named_modules())
    if list(mods) != list(fresh_mods) or any(type(mods[k]) is not type(fresh_mods[k]) for k in mods):
        raise RuntimeError("pruning changed the module structure; the attribute transfer cannot rebuild it")
    out: dict[str, dict[str, Any]] = {}
    missing = object()
    for name, module in mods.items():
        ref = _plain_attrs(fresh_mods[name])
        diff = {k: v for k, v in _plain_attrs(module).items() if ref.get(k, missing) != v}
        if diff:
            out[name] = diff
    return out


def _run_recorded(model: nn.Module, x: torch.Tensor, samples: int = 256,
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, list[int]]]:
    """``model(x)`` (no grad) and, from forward hooks, the shape of every submodule's floating-point output(s) and
    ``samples`` evenly spaced values of it: a fingerprint of the whole computation. The final output alone proves
    little on these randomly initialised models: ViT's head is zero-initialised (its output is exactly 0 whatever the
    encoder computes), and the MobileNets' logits are ~1e-11."""
    values: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            for i, o in enumerate(output if isinstance(output, (tuple, list)) else (output,)):
                if isinstance(o, torch.Tensor) and o.is_floating_point():
                    flat = o.detach().reshape(-1)
                    index = torch.linspace(0, flat.numel() - 1, min(samples, flat.numel())).long()
                    key = f"{_REFERENCE}activation__{name}#{i}"  # a module called twice: its last call
                    values[key], shapes[key] = flat[index], list(o.shape)  # indexing copies (in-place ops follow)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        for h in handles:
            h.remove()
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"model output is a {type(y).__name__}, not a tensor")
    return y, values, shapes


def save_pruned(model: nn.Module, fresh: nn.Module, x: torch.Tensor, path: str, prune_seconds: float) -> None:
    """Write ``model`` (pruned from ``fresh``'s architecture) to the safetensors file ``path`` without pickle: the
    state dict; the input ``x``, ``model(x)`` and a sample of every submodule's output as reference; the changed
    attributes, the activation shapes and ``prune_seconds`` as metadata."""
    y, values, shapes = _run_recorded(model, x)
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, value in model.state_dict().items():
        value = value.detach().contiguous()
        if value.untyped_storage().data_ptr() in storages and value.numel():  # tied: safetensors refuses shared memory
            value = value.clone()
        storages.add(value.untyped_storage().data_ptr())
        tensors[key] = value
    tensors.update(values)
    tensors[_REFERENCE_INPUT] = x.detach().contiguous()
    tensors[_REFERENCE_OUTPUT] = y.detach().contiguous()
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"attrs": json.dumps(changed_attrs(model, fresh)),
                                       "activation_shapes": json.dumps(shapes), "prune_seconds": repr(prune_seconds)})


def _as_like(value: Any, ref: Any) -> Any:
    """``value`` back from JSON: lists become tuples where the fresh model has a tuple."""
    if isinstance(value, list) and isinstance(ref, (tuple, list)):
        items = [_as_like(v, r) for v, r in zip(value, ref)] + value[len(ref):]
        return tuple(items) if isinstance(ref, tuple) else items
    return value


def load_pruned(fresh: nn.Module, path: str, rtol: float = 1e-4, atol: float = 1e-5,
                ) -> tuple[nn.Module, dict[str, Any]]:
    """Turn ``fresh`` (built like the model the child pruned) into the pruned model saved by :func:`save_pruned`;
    raises unless it reproduces the child's output (``allclose(rtol, atol)``) and every submodule's sampled output
    (``allclose(rtol, atol * max |reference|)``, as their scales differ by orders of magnitude). Returns the model
    (eval mode) and ``{"prune_seconds": s}``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(path)
    reference = {k: tensors.pop(k) for k in list(tensors) if k.startswith(_REFERENCE)}
    x, y_ref = reference.pop(_REFERENCE_INPUT), reference.pop(_REFERENCE_OUTPUT)
    for name, attrs in json.loads(meta["attrs"]).items():
        module = fresh.get_submodule(name)
        for key, value in attrs.items():
            setattr(module, key, _as_like(value, getattr(module, key, None)))
    replaced: dict[int, torch.Tensor] = {}  # old tensor -> its replacement, so that tied tensors stay tied
    current = fresh.state_dict(keep_vars=True)
    for key, value in tensors.items():
        if key not in current:
            continue  # load_state_dict(strict=True) below names it
        owner, _, leaf = key.rpartition(".")
        old = current[key]
        if id(old) not in replaced:
            new = torch.empty(value.shape, dtype=value.dtype)
            if isinstance(old, nn.Parameter):
                new = nn.Parameter(new, requires_grad=old.requires_grad)
            replaced[id(old)] = new
        setattr(fresh.get_submodule(owner), leaf, replaced[id(old)])  # nn.Module.__setattr__: parameter or buffer
    state = fresh.state_dict()  # its ``_metadata`` holds the module versions some loaders need (torchvision MNASNet)
    state.update(tensors)
    fresh.load_state_dict(state, strict=True)
    fresh.eval()
    y, values, shapes = _run_recorded(fresh, x)
    if y.shape != y_ref.shape or not torch.allclose(y, y_ref, rtol=rtol, atol=atol):
        diff = (y - y_ref).abs().max().item() if y.shape == y_ref.shape else f"shape {tuple(y.shape)}"
        raise RuntimeError(f"the rebuilt model does not reproduce the pruned model's output (max |diff| {diff}, "
                           f"reference shape {tuple(y_ref.shape)})")
    ref_shapes = json.loads(meta["activation_shapes"])
    bad = [key.split("__", 2)[-1] for key, ref in reference.items() if key not in values
           or shapes[key] != ref_shapes[key]
           or not torch.allclose(values[key], ref, rtol=rtol, atol=atol * ref.abs().max().item())]
    if bad or len(values) != len(reference):
        raise RuntimeError(f"the rebuilt model's submodule outputs differ from the pruned model's: {len(bad)} of "
                           f"{len(reference)} (first: {bad[:3]}), {len(values)} recorded")
    return fresh, {"prune_seconds": float(meta["prune_seconds"])}


def tp_child(name: str, size: int, out: str) -> None:
    """Prune ``name`` with Torch-Pruning and write it to ``out`` by :func:`save_pruned` (runs in the child process)."""
    import torch_pruning as tp
    from torchvision.models.vision_transformer import VisionTransformer

    torch.set_num_threads(2)
    model = build(name)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    ignored = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 1000]
    round_to = model.encoder.layers[0].num_heads if isinstance(model, VisionTransformer) else None
    t0 = time.perf_counter()
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=0.5, ignored_layers=ignored, round_to=round_to)
    pruner.step()
    if isinstance(model, VisionTransformer):
        model.hidden_dim = model.conv_proj.out_channels  # as Torch-Pruning's example does
    seconds = time.perf_counter() - t0
    del pruner
    save_pruned(model, build(name), x, out, seconds)


def run_theirs(name: str, size: int, memory_gb: float, timeout: float) -> tuple[nn.Module | None, dict[str, Any]]:
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return None, {"error": "torch-pruning not installed (pip install torch-pruning==1.6.1 --no-deps)"}
    import importlib.metadata

    version = importlib.metadata.version("torch-pruning")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "pruned.safetensors")
        limit = int(memory_gb * 2**30)

        def cap() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

        cmd = [sys.executable, __file__, "--tp-child", name, "--size", str(size), "--tp-out", out]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=cap)
        except subprocess.TimeoutExpired:
            return None, {"error": f"timeout after {timeout:.0f} s", "version": version}
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            what = lines[-1] if lines else f"exit status {proc.returncode}"
            if proc.returncode < 0 or "MemoryError" in proc.stderr or "alloc" in proc.stderr.lower():
                what = f"{what} (memory capped at {memory_gb:g} GB; exit status {proc.returncode})"
            return None, {"error": what[-500:], "version": version}
        try:
            model, info = load_pruned(build(name), out)
        except Exception as exc:  # a model we cannot rebuild exactly is a failure, not something to measure
            return None, {"error": f"transfer from the child failed: {type(exc).__name__}: {exc}"[:800],
                          "version": version}
    return model, {**info, "version": version}


# --------------------------------------------------------------------------------------------------------------------
# prunekit


def run_ours(model: nn.Module, x: torch.Tensor, round_to: int) -> tuple[nn.Module, dict[str, Any], Any]:
    t0 = time.perf_counter()
    graph = trace(model, x)
    p = plan(model, x, 0.5, criterion="l2", round_to=round_to, graph=graph)
    small = p.apply(copy.deepcopy(model))
    seconds = time.perf_counter() - t0
    pruned, total = p.pruned_units
    return small, {"prune_seconds": seconds, "units": [pruned, total], "groups": len(p.groups),
                   "round_to": round_to, "ignore": []}, graph


def run_2x(model: nn.Module, x16: torch.Tensor, round_to: int) -> tuple[nn.Module, dict[str, Any]]:
    """prunekit for speed at 2x fewer MACs (``allocation="latency"``, profiled and measured at batch 16)."""
    t0 = time.perf_counter()
    p = plan(model, x16, macs=0.5, allocation="latency", criterion="l2", round_to=round_to)
    small = p.apply(copy.deepcopy(model))
    return small, {"round_to": round_to, "allocation": "latency", "target_macs": 0.5, "notes": list(p.notes),
                   "prune_seconds": time.perf_counter() - t0}


def _bisect_sparsity(model: nn.Module, x: torch.Tensor, graph: Any, target: float, round_to: int) -> float:
    """The uniform sparsity whose predicted MACs come closest to ``target``."""
    lo, hi, best = 0.0, 0.95, None
    for _ in range(14):
        s = (lo + hi) / 2
        macs = plan(model, x, s, round_to=round_to, graph=graph, verify=False).macs[1]
        if best is None or abs(macs - target) < abs(best[1] - target):
            best = (s, macs)
        if macs > target:
            lo = s
        else:
            hi = s
    return best[0]


def run_matched(model: nn.Module, x: torch.Tensor, graph: Any, target: int, round_to: int,
                tolerance: float = MATCH_TOLERANCE) -> tuple[nn.Module, dict[str, Any]]:
    """prunekit with the uniform per-group sparsity whose counted MACs come closest to ``target``.

    The sparsity is found by bisection on the predicted MACs, then applied and counted; the prediction leaves out
    MACs no weight carries (attention's ``QK^T`` and ``AV``), so the predicted target is corrected by the counted
    ratio and the bisection run again (twice at most). ``round_to`` first; where its steps cannot land within
    ``tolerance`` (relative) of ``target``, the halved rounding is tried, down to 1; the first candidate within
    ``tolerance`` wins, else the closest of all.
    """
    tried: list[dict[str, Any]] = []
    r = round_to
    while True:
        aim = float(target)
        for _ in range(3):
            s = _bisect_sparsity(model, x, graph, aim, r)
            macs = count_macs(plan(model, x, s, round_to=r, graph=graph, verify=False).apply(copy.deepcopy(model)),
                              x).total
            tried.append({"round_to": r, "sparsity": s, "gap": macs / target - 1})
            if abs(macs / target - 1) <= tolerance:
                break
            aim *= target / macs
        if abs(tried[-1]["gap"]) <= tolerance or r == 1:
            break
        r //= 2
    pick = tried[-1] if abs(tried[-1]["gap"]) <= tolerance else min(tried, key=lambda t: abs(t["gap"]))
    p = plan(model, x, pick["sparsity"], round_to=pick["round_to"], graph=graph)
    small = p.apply(copy.deepcopy(model))
    return small, {"sparsity": pick["sparsity"], "round_to": pick["round_to"], "target_macs": target, "tried": tried}


# --------------------------------------------------------------------------------------------------------------------


def one_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    dense = build(name)
    record: dict[str, Any] = {"model": name, "input": [1, 3, args.size, args.size],
                              "dense": {"macs": count_macs(dense, x).total, "params": count_params(dense)}}
    models = {"dense": dense}
    try:
        ours, info, graph = run_ours(dense, x, args.round_to)
        models["ours"] = ours
        record["ours"] = {**info, "macs": count_macs(ours, x).total, "params": count_params(ours)}
        x16 = torch.randn(max(args.batches), 3, args.size, args.size, generator=torch.Generator().manual_seed(2))
        fast, finfo = run_2x(dense, x16, args.round_to_2x)
        models["ours_2x"] = fast
        record["ours_2x"] = {**finfo, "macs": count_macs(fast, x).total, "params": count_params(fast)}
    except Exception as exc:  # a failure is a result
        graph = None
        record["ours"] = {"error": f"{type(exc).__name__}: {exc}"[:800], "traceback": traceback.format_exc()[-2000:]}
    if args.torch_pruning:
        theirs, info = run_theirs(name, args.size, args.tp_memory_gb, args.tp_timeout)
        if theirs is not None:
            try:
                info.update(macs=count_macs(theirs, x).total, params=count_params(theirs))
                models["theirs"] = theirs
            except Exception as exc:
                info["error"] = f"pruned model does not run: {type(exc).__name__}: {exc}"[:800]
        record["theirs"] = info
        if "theirs" in models and graph is not None:
            matched, minfo = run_matched(dense, x, graph, record["theirs"]["macs"], args.round_to)
            models["ours_matched"] = matched
            record["ours_matched"] = {**minfo, "macs": count_macs(matched, x).total, "params": count_params(matched)}
    passes = []
    for i in range(args.passes):
        if i > 0 and "ours_2x" in models:  # planned again: the timings that choose its allocation are noisy too
            fast, finfo = run_2x(dense, x16, args.round_to_2x)
            models["ours_2x"] = fast
            record["ours_2x"] = {**finfo, "macs": count_macs(fast, x).total, "params": count_params(fast)}
        latency = {}
        for batch in args.batches:
            xb = torch.randn(batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
            times = measure_latency(models, xb, repeats=args.repeats, warmup=args.warmup, threads=args.threads)
            latency[str(batch)] = {k: v.to_dict() for k, v in times.items()}
        passes.append({"ours_2x": record.get("ours_2x"), "latency": latency,
                       "summary": summarize_model({**record, "latency": latency})})
    record["widths"] = widths(models)  # the models of the last pass, as record["ours_2x"] and record["latency"]
    record["latency"] = passes[-1]["latency"]
    if len(passes) > 1:
        record["passes"] = passes
    record["summary"] = median_summary(record, [p["summary"] for p in passes])
    return record


def widths(models: dict[str, nn.Module]) -> dict[str, Any]:
    """Output width of every conv/linear layer per model (for diagnosing latency per MAC: multiples of 8, groups),
    and how many layers of each model have a width that is not a multiple of 8."""
    table_: dict[str, list[int | None]] = {}
    keys = list(models)
    for k, model in enumerate(models.values()):
        for name, m in model.named_modules():
            width = getattr(m, "out_channels", getattr(m, "out_features", None))
            if isinstance(m, (nn.Conv2d, nn.Linear)) and width is not None:
                table_.setdefault(name, [None] * len(keys))[k] = int(width)
    odd = {key: sum(1 for w in table_.values() if w[k] is not None and w[k] % 8) for k, key in enumerate(keys)}
    return {"models": keys, "layers": table_, "not_multiple_of_8": odd}


def summarize_model(r: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    dense_macs = r["dense"]["macs"]
    for who in ("ours", "ours_2x", "ours_matched", "theirs"):
        if "macs" not in r.get(who, {}):
            continue
        red = dense_macs / r[who]["macs"]
        entry = {"mac_reduction": red}
        for batch, lat in r["latency"].items():
            if who in lat:
                speed = lat["dense"]["median"] / lat[who]["median"]
                entry[f"speedup_b{batch}"] = speed
                entry[f"ratio_b{batch}"] = speed / red
        out[who] = entry
    if "ours_matched" in out and "theirs" in out:  # paired: both timed interleaved in the same pass
        for batch, lat in r["latency"].items():
            if "ours_matched" in lat and "theirs" in lat:
                out["ours_matched"][f"vs_tp_b{batch}"] = lat["theirs"]["median"] / lat["ours_matched"]["median"]
    out["bars"] = bars_of(out, r)
    return out


def median_summary(r: dict[str, Any], summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The median over passes of every speed-up and ratio (MAC reductions too: ``ours_2x`` is planned per pass), the
    bars judged on those medians, and each pass's ratios for the spread. One pass: that pass's summary.

    The Torch-Pruning bar is judged on ``vs_tp_b<batch>``, the median over passes of ``ours_matched``'s speed over
    Torch-Pruning's *within* each pass (the two are timed interleaved, so a pass's noise hits both), not on the
    ratio of the two median speed-ups, which mixes passes: on resnet18, where the two models have the same widths,
    the pass medians were 2.84 vs 2.99 (0.95x) while the paired ratios were 1.02, 0.95 and 0.99."""
    if len(summaries) == 1:
        return summaries[0]
    out: dict[str, Any] = {}
    for who in dict.fromkeys(w for s in summaries for w in s if w != "bars"):
        keys = dict.fromkeys(k for s in summaries for k in s.get(who, {}))
        out[who] = {k: statistics.median(s[who][k] for s in summaries if k in s.get(who, {})) for k in keys}
        out[who]["passes"] = {k: [s[who][k] for s in summaries if k in s.get(who, {})] for k in keys
                              if k.startswith(("ratio_", "vs_tp_"))}
    out["bars"] = bars_of(out, r)
    return out


def resummarize(r: dict[str, Any]) -> None:
    """Recompute a stored record's summaries (each pass's and the median) from its stored timings, in place."""
    if "latency" not in r:
        return  # a failed model
    passes = r.get("passes") or []
    for p in passes:  # each pass with its own ours_2x plan
        p["summary"] = summarize_model({**r, "ours_2x": p.get("ours_2x") or r.get("ours_2x", {}),
                                        "latency": p["latency"]})
    r["summary"] = median_summary(r, [p["summary"] for p in passes]) if passes else summarize_model(r)


def bars_of(out: dict[str, Any], r: dict[str, Any]) -> dict[str, Any]:
    bars: dict[str, Any] = {}
    if "ours" in out:
        bars["macs_2x"] = out["ours"]["mac_reduction"] >= 2.0 and out.get("ours_2x", {}).get("mac_reduction", 0) >= 2
    if "ratio_b16" in out.get("ours_2x", {}):
        bars["ratio_b16_0.8"] = out["ours_2x"]["ratio_b16"] >= 0.8
    if "theirs" in out and "ours_matched" in out:
        for key in [k for k in out["ours_matched"] if k.startswith("vs_tp_b")]:
            bars[key] = out["ours_matched"][key] >= TOLERANCE
    elif "theirs" not in out:
        bars["vs_tp"] = "n/a: Torch-Pruning failed" if "error" in r.get("theirs", {}) else "n/a"
    return bars


def draw(runs: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [n for n in runs if "summary" in runs[n]]
    batches = sorted({b for n in names for b in runs[n]["latency"]}, key=int)
    fig = Figure(figsize=(max(8, 0.8 * len(names) + 3), 4 * len(batches)))
    FigureCanvasAgg(fig)
    for i, batch in enumerate(batches):
        ax = fig.add_subplot(len(batches), 1, i + 1)
        width = 0.2
        for k, (who, color) in enumerate((("ours", "tab:blue"), ("ours_2x", "tab:green"), ("ours_matched", "tab:cyan"),
                                          ("theirs", "tab:orange"))):
            vals = [runs[n]["summary"].get(who, {}).get(f"speedup_b{batch}", 0.0) for n in names]
            macs = [runs[n]["summary"].get(who, {}).get("mac_reduction", 0.0) for n in names]
            xs = [j + (k - 1.5) * width for j in range(len(names))]
            ax.bar(xs, vals, width, color=color, label=f"{who}: measured speedup")
            ax.scatter(xs, macs, marker="_", s=120, color="black", zorder=3,
                       label="MAC reduction" if k == 0 else None)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"x faster than dense (batch {batch})")
        ax.axhline(1.0, color="gray", lw=0.5)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    tmp.replace(path)


def model_in_child(name: str, argv: list[str] | None) -> dict[str, Any]:
    """:func:`one_model` for ``name`` in a fresh Python process (same flags), its record read back from JSON.

    One process per model: measured in the process that had already run the models before it, the small models
    came out up to 25% slower next to their dense model than in a fresh process (regnet_x_400mf, 7th in the list:
    speed-up / MAC reduction 0.76 after the others, 0.96 alone), so each model's figures would depend on the models
    that happened to run first.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "record.json")
        cmd = [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv), "--models", name,
               "--model-out", out]
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0 or not os.path.exists(out):
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            what = lines[-1] if lines else f"exit status {proc.returncode}"
            return {"model": name, "error": f"the measuring process failed: {what}"[:800],
                    "stderr": proc.stderr[-2000:]}
        with open(out) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 models, 64x64, batches 1 and 4, 3 repeats")
    ap.add_argument("--models", nargs="*", default=None, help=f"subset of {MODELS}")
    ap.add_argument("--batches", nargs="*", type=int, default=None, help="batch sizes (default 1 16)")
    ap.add_argument("--size", type=int, default=None, help="image side (default 224)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per model (default 10)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--passes", type=int, default=1,
                    help="measure each model this many times (ours_2x planned again each time); the summary and the "
                         "bars take the median over passes, and each pass is kept in the JSON (default 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--round-to", type=int, default=8, help="prunekit's round_to for ours/matched (default 8)")
    ap.add_argument("--round-to-2x", type=int, default=8, help="prunekit's round_to for ours_2x (default 8)")
    ap.add_argument("--torch-pruning", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--tp-memory-gb", type=float, default=8.0, help="address-space cap of the Torch-Pruning child")
    ap.add_argument("--tp-timeout", type=float, default=1200.0)
    ap.add_argument("--in-process", action="store_true",
                    help="measure every model in this process instead of a fresh child process per model")
    ap.add_argument("--resummarize", action="store_true",
                    help="measure nothing: recompute every stored model's summary and bars from its stored timings "
                         "(after a change to how they are summarised)")
    ap.add_argument("--model-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tp-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tp-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.passes < 1:
        ap.error(f"--passes must be at least 1, got {args.passes}")
    if args.tp_child:
        tp_child(args.tp_child, args.size or 224, args.tp_out)
        return 0
    args.models = args.models or (QUICK_MODELS if args.quick else MODELS)
    args.batches = args.batches or ([1, 4] if args.quick else [1, 16])
    args.size = args.size or (64 if args.quick else 224)
    args.repeats = args.repeats or (3 if args.quick else 10)
    if args.quick:
        args.warmup = min(args.warmup, 1)
    setup_torch(args.threads)
    if args.model_out:  # a child: one model, its record to a JSON file
        write_text(Path(args.model_out), json.dumps(one_model(args.models[0], args)))
        return 0
    if args.resummarize:
        store = ResultStore(RESULTS / f"{NAME}{'_quick' if args.quick else ''}.json", NAME)
        for r in store.runs.values():
            resummarize(r)
        store.save()
        draw(store.runs, png_path(NAME, args.quick))
        print(f"summaries recomputed: {store.path}")
        return 0
    store = ResultStore(RESULTS / f"{NAME}{'_quick' if args.quick else ''}.json", NAME, meta={
        "size": args.size, "batches": args.batches, "repeats": args.repeats, "warmup": args.warmup,
        "threads": args.threads, "passes": args.passes,
        "process": "this one, every model" if args.in_process else "a fresh one per model",
        "round_to": args.round_to, "round_to_2x": args.round_to_2x,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "tp_memory_gb": args.tp_memory_gb,
        "loadavg_start": list(os.getloadavg()), "ignore_lists": {"ours": [], "theirs": "nn.Linear(out=1000)"}})
    for name in args.models:
        if store.done(name):
            print(f"{name}: done (in {store.path.name}), skipped")
            continue
        t0 = time.perf_counter()
        print(f"{name} ...", flush=True)
        record = one_model(name, args) if args.in_process else model_in_child(name, argv)
        record["seconds"] = time.perf_counter() - t0
        record["loadavg"] = list(os.getloadavg())
        store.put(name, record)
        s = record.get("summary", {"error": record.get("error")})
        print(f"  {json.dumps({k: v for k, v in s.items()}, default=str)}", flush=True)
        draw(store.runs, png_path(NAME, args.quick))
    store.doc["meta"]["loadavg_end"] = list(os.getloadavg())
    store.save()
    rows = []
    for name, r in store.runs.items():
        s = r.get("summary", {})
        o, m, t, f2 = s.get("ours", {}), s.get("ours_matched", {}), s.get("theirs", {}), s.get("ours_2x", {})
        err = r.get("theirs", {}).get("error", "")

        def f(d: dict[str, Any], k: str) -> str:
            return f"{d[k]:.2f}" if k in d else "-"

        b = [str(x) for x in store.doc["meta"]["batches"]]
        rows.append([name, f(o, "mac_reduction"), *(f(o, f"speedup_b{x}") for x in b), f(o, f"ratio_b{b[-1]}"),
                     f(f2, "mac_reduction"), *(f(f2, f"speedup_b{x}") for x in b), f(f2, f"ratio_b{b[-1]}"),
                     f(t, "mac_reduction"), *(f(t, f"speedup_b{x}") for x in b), f(m, "mac_reduction"),
                     *(f(m, f"speedup_b{x}") for x in b), ("FAIL: " + err[:40]) if err else "",
                     " ".join(f"{k}={v}" for k, v in s.get("bars", {}).items())])
    b = [str(x) for x in store.doc["meta"]["batches"]]
    header = ["model", "ours MACx", *(f"ours b{x}" for x in b), f"ratio b{b[-1]}", "2x MACx", *(f"2x b{x}" for x in b),
              f"2x ratio b{b[-1]}", "TP MACx",
              *(f"TP b{x}" for x in b), "matched MACx", *(f"matched b{x}" for x in b), "TP error", "bars"]
    print(table(rows, header))
    print(f"results: {store.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
