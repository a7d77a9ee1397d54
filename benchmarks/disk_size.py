"""Size on disk of pruned models: prunekit's compressed format vs gzip -9 / xz -9 of the dense-with-zeros file.

Models: LeNet-300-100 trained here on MNIST (10 epochs), EfficientNet-Lite0 and all-MiniLM-L6-v2 (pretrained, from
PyPI through prunekit.data.pretrained). Each is pruned one-shot by global magnitude (``prunekit.prune``) over all its
weight matrices and kernels (parameters with two or more dimensions, embeddings included) to 0/50/80/90/95% sparsity.
For every row:

- ``dense``: the plain safetensors file of the pruned state dict (dense with zeros; ``prunekit.deploy.export``);
- ``gzip -9`` and ``xz -9`` (single-threaded) of that file;
- ``prunekit``: ``prunekit.save(model, path, compress=True)``, lossless (checked bit-exact after loading);
- lossy extras: ``compress="fp16"``, ``"int8"`` (per-row scales), ``"kmeans"`` (5 bits);
- load times (median of repeats, interleaved): ``prunekit.load`` of the compressed file (read, verify, decode, load
  into the model) vs ``gunzip -c dense.gz > /dev/null`` and an in-process ``gzip.decompress``.

Then LeNet-300-100 pruned *gradually to 95% while fine-tuning* (``prunekit.Pruner`` + ``Gradual`` inside
``prunekit.train.train``): test accuracy of the fp32 model and after saving with int8 / fp16 / k-means values and
loading again, with the file sizes (the Deep Compression comparison). ONNX: export + onnxruntime max |diff|.

Usage (from the repository root)::

    .venv/bin/python benchmarks/disk_size.py            # -> benchmarks/results/disk_size.{json,png}
    .venv/bin/python benchmarks/disk_size.py --quick    # LeNet only, short training -> disk_size_quick.*
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import metadata, png_path, setup_torch, table, write_json

import prunekit
from prunekit.checkpoint import load, save
from prunekit.data import load_dataset
from prunekit.deploy import export
from prunekit.fileformat import read
from prunekit.models import get_model
from prunekit.quantize import quantize_int8
from prunekit.schedules import Gradual
from prunekit.train import TrainConfig, evaluate, train

SPARSITIES = (0.0, 0.5, 0.8, 0.9, 0.95)
LOSSY = ("fp16", "int8", "kmeans")
GOAL_VS_XZ = 1.2  # bold bar: >= 1.2x smaller than xz -9 at 90% and 95%
GOAL_INT8_RATIO = 40.0  # bold bar: LeNet-300-100 at 95%, int8 values: >= 40x smaller than dense fp32
GOAL_INT8_ACC = 0.003  # ... with test accuracy within 0.3 pt of the pruned fp32 model


def matrices(model: nn.Module) -> list[str]:
    """Every parameter with two or more dimensions (Linear/Conv weights, embeddings)."""
    return [n for n, p in model.named_parameters() if p.dim() >= 2]


def tool_size(tool: list[str], src: Path, dest: Path) -> int:
    with open(dest, "wb") as out:
        subprocess.run([*tool, "-c", str(src)], stdout=out, check=True)
    return dest.stat().st_size


def median_time(fn: Any, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def timed_loads(compressed: Path, dense_gz: Path, make_model: Any, repeats: int) -> dict[str, Any]:
    """Interleaved repeats of prunekit.load, prunekit's read, gunzip (CLI) and gzip.decompress; medians and raw times.

    The order of the four rotates from one repeat to the next, so no contender always runs first (cold caches after
    the gunzip process) or last."""
    gz_bytes = dense_gz.read_bytes()
    model = make_model()
    contenders = {
        "prunekit_load": lambda: load(compressed, model),
        "prunekit_read": lambda: read(compressed),
        "gunzip_cli": lambda: subprocess.run(["gunzip", "-c", str(dense_gz)], stdout=subprocess.DEVNULL, check=True),
        "gzip_decompress": lambda: gzip.decompress(gz_bytes),
    }
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names[i % len(names):] + names[: i % len(names)]:
            t0 = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median_s": med, "raw_s": times,
            "load_faster_than_gunzip": med["prunekit_load"] < min(med["gunzip_cli"], med["gzip_decompress"])}


def codec_check(path: Path) -> dict[str, Any]:
    """Per-tensor check that no tensor was stored larger than raw (dense tensors never grow)."""
    import struct

    from prunekit.fileformat import _unsqueeze

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])["__metadata__"]
    table_ = json.loads(_unsqueeze(header["prunekit.codecs"]))
    worst = 0.0
    layouts: dict[str, int] = {}
    for entry in [*table_["tensors"].values(), *table_["packs"]]:
        layouts[entry["layout"]] = layouts.get(entry["layout"], 0) + 1
        if "at" in entry:
            numel = 1
            for s in entry["shape"]:
                numel *= s
            itemsize = torch.empty(0, dtype=getattr(torch, entry["dtype"])).element_size()
            if numel:
                worst = max(worst, entry["at"][1] / (numel * itemsize))
    return {"max_stored_over_raw": worst, "layouts": layouts, "header_bytes": n}


def size_rows(name: str, make_model: Any, work: Path, sparsities: tuple[float, ...], repeats: int,
              quality: Any | None = None) -> list[dict[str, Any]]:
    rows = []
    for s in sparsities:
        model = make_model()
        if s > 0:
            prunekit.prune(model, s, include=matrices(model))
        dense = work / f"{name}-{s}.safetensors"
        export(model, dense)  # plain state dict, dense with zeros
        t0 = time.perf_counter()
        gz = tool_size(["gzip", "-9"], dense, work / f"{name}-{s}.safetensors.gz")
        t_gz = time.perf_counter() - t0
        t0 = time.perf_counter()
        xz = tool_size(["xz", "-9", "-T1"], dense, work / f"{name}-{s}.safetensors.xz")
        t_xz = time.perf_counter() - t0
        ours_path = work / f"{name}-{s}.pk"
        t0 = time.perf_counter()
        save(model, ours_path, compress=True)
        t_save = time.perf_counter() - t0
        ours = ours_path.stat().st_size
        reloaded = load(ours_path, make_model()).model
        exact = all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))
        row: dict[str, Any] = {
            "model": name, "sparsity": s, "dense_bytes": dense.stat().st_size, "gzip9_bytes": gz, "xz9_bytes": xz,
            "prunekit_bytes": ours, "lossless_bit_exact": exact,
            "ratio_vs_dense": dense.stat().st_size / ours, "ratio_vs_gzip": gz / ours, "ratio_vs_xz": xz / ours,
            "gzip_ratio_vs_dense": dense.stat().st_size / gz, "xz_ratio_vs_dense": dense.stat().st_size / xz,
            "seconds": {"gzip9": t_gz, "xz9": t_xz, "prunekit_save": t_save},
            "codecs": codec_check(ours_path),
        }
        lossy = {}
        for codec in LOSSY:
            path = work / f"{name}-{s}-{codec}.pk"
            save(model, path, compress=codec)
            entry: dict[str, Any] = {"bytes": path.stat().st_size, "ratio_vs_dense": dense.stat().st_size /
                                     path.stat().st_size}
            if quality is not None:
                entry["quality"] = quality(load(path, make_model()).model, model)
            lossy[codec] = entry
        row["lossy"] = lossy
        row["load"] = timed_loads(ours_path, work / f"{name}-{s}.safetensors.gz", make_model, repeats)
        for p in work.glob(f"{name}-{s}*"):
            p.unlink()
        rows.append(row)
        print(f"{name} {s:.0%}: dense {row['dense_bytes']:,} gzip {gz:,} xz {xz:,} prunekit {ours:,} "
              f"({row['ratio_vs_xz']:.3f}x vs xz, exact={exact}); load {row['load']['median_s']['prunekit_load']:.3f}s "
              f"vs gunzip {row['load']['median_s']['gunzip_cli']:.3f}s", flush=True)
    return rows


# --------------------------------------------------------------------------------------------------------------------
# LeNet-300-100: dense training, one-shot rows, gradual 95% with int8


def lenet_dense(epochs: int, subset: int | None) -> tuple[nn.Module, Any, Any, float]:
    train_data = load_dataset("mnist", "train")
    if subset:
        train_data = torch.utils.data.TensorDataset(*(t[:subset] for t in train_data.tensors))
    test_data = load_dataset("mnist", "test")
    torch.manual_seed(0)
    model = get_model("lenet300")
    t0 = time.perf_counter()
    train(model, train_data, TrainConfig(epochs=epochs, lr=0.1), progress=False)
    print(f"LeNet-300-100 dense: {evaluate(model, test_data).accuracy:.2%} test accuracy "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return model.eval(), train_data, test_data, time.perf_counter() - t0


def lenet_gradual(dense: nn.Module, train_data: Any, test_data: Any, epochs: int, work: Path) -> dict[str, Any]:
    model = copy.deepcopy(dense).train()
    cfg = TrainConfig(epochs=epochs, lr=0.05)
    steps = cfg.steps_per_epoch(len(train_data))
    every = max(1, steps // 4)
    end = every * max(1, round(0.6 * epochs * steps / every))
    pruner = prunekit.Pruner(model, sparsity=0.95, schedule=Gradual(start=0, end=end, every=every))
    t0 = time.perf_counter()
    train(model, train_data, cfg, pruner=pruner, progress=False)
    pruner.remove()
    model.eval()
    fp32 = evaluate(model, test_data).accuracy
    dense_file = work / "lenet-gradual.safetensors"
    export(model, dense_file)
    dense_bytes = dense_file.stat().st_size
    out: dict[str, Any] = {"sparsity": 0.95, "fine_tune_epochs": epochs, "schedule": f"Gradual(0, {end}, {every})",
                           "train_seconds": time.perf_counter() - t0, "fp32_test_accuracy": fp32,
                           "dense_fp32_file_bytes": dense_bytes,
                           "xz9_bytes": tool_size(["xz", "-9", "-T1"], dense_file, work / "g.xz"),
                           "gzip9_bytes": tool_size(["gzip", "-9"], dense_file, work / "g.gz")}
    for codec in ("lossless", *LOSSY):
        path = work / f"lenet-gradual-{codec}.pk"
        save(model, path, compress=True if codec == "lossless" else codec)
        acc = evaluate(load(path, get_model("lenet300")).model.eval(), test_data).accuracy
        out[codec] = {"bytes": path.stat().st_size, "ratio_vs_dense_fp32": dense_bytes / path.stat().st_size,
                      "test_accuracy": acc, "accuracy_change_pt": 100 * (acc - fp32)}
    q = quantize_int8(copy.deepcopy(model))
    out["int8_modules_test_accuracy"] = evaluate(q, test_data).accuracy
    x = test_data.tensors[0][:64]
    onnx = export(model, work / "lenet.onnx", example_inputs=(x,))
    out["onnx"] = {"bytes": onnx.bytes, "max_abs_diff": onnx.max_abs_diff, "max_abs_reference": onnx.max_abs_reference,
                   "relative": onnx.max_abs_diff / onnx.max_abs_reference}
    int8 = out["int8"]
    out["goal_int8_40x"] = int8["ratio_vs_dense_fp32"] >= GOAL_INT8_RATIO
    out["goal_int8_accuracy"] = abs(int8["test_accuracy"] - fp32) <= GOAL_INT8_ACC
    print(f"LeNet gradual 95%: fp32 {fp32:.2%}; int8 file {int8['bytes']:,} bytes = {int8['ratio_vs_dense_fp32']:.1f}x "
          f"smaller than dense fp32, accuracy {int8['test_accuracy']:.2%}; ONNX max diff {onnx.max_abs_diff:.2g}",
          flush=True)
    return out


def minilm_quality(sentences: list[str]) -> Any:
    from prunekit.data.pretrained import minilm, minilm_embed

    _, tokenizer = minilm()

    def quality(lossy: nn.Module, exact: nn.Module) -> dict[str, float]:
        a, b = minilm_embed(lossy, tokenizer, sentences), minilm_embed(exact, tokenizer, sentences)
        return {"min_cosine_vs_lossless": float((a * b).sum(-1).min())}

    return quality


def logits_quality(inputs: torch.Tensor) -> Any:
    def quality(lossy: nn.Module, exact: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            a, b = lossy.eval()(inputs), exact.eval()(inputs)
        return {"top1_agreement_vs_lossless": float((a.argmax(1) == b.argmax(1)).float().mean()),
                "max_abs_logit_diff": float((a - b).abs().max())}

    return quality


SENTENCES = ["A man is playing a guitar on stage.", "The new movie is awesome.", "A cat sleeps on the warm sofa.",
             "Stock markets fell sharply on Monday.", "How do I reset my password?", "The train was late again.",
             "She is cooking pasta for dinner.", "Pruning removes the weights that matter least."]


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == name]
        xs = [100 * r["sparsity"] for r in mine]
        for key, label in (("gzip9_bytes", "gzip -9"), ("xz9_bytes", "xz -9"), ("prunekit_bytes", "prunekit")):
            ax.plot(xs, [r["dense_bytes"] / r[key] for r in mine], marker="o", label=label)
        ax.plot(xs, [r["lossy"]["int8"]["ratio_vs_dense"] for r in mine], marker="x", ls="--", label="prunekit int8")
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("dense size / file size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="LeNet only, short training (smoke test)")
    parser.add_argument("--repeats", type=int, default=7, help="timing repeats (median)")
    parser.add_argument("--models", default="lenet300,efficientnet_lite0,minilm")
    args = parser.parse_args()
    setup_torch(threads=2)
    meta = metadata()
    work = Path(tempfile.mkdtemp(prefix="disk_size_"))
    models = ["lenet300"] if args.quick else args.models.split(",")
    epochs = 2 if args.quick else 10
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {"meta": meta, "setup": {
        "pruning": "one-shot global magnitude (prunekit.prune) over every parameter with >= 2 dims",
        "dense_file": "prunekit.export(model, x.safetensors): plain safetensors, dense with zeros",
        "gzip": "gzip -9 -c", "xz": "xz -9 -T1 -c", "prunekit": "prunekit.save(model, path, compress=True)",
        "load_timing": "median of interleaved repeats (the order rotates each repeat); prunekit_load = "
                       "prunekit.load(path, model) incl. checksum, decoding and loading into the model; "
                       "gunzip_cli = gunzip -c dense.gz > /dev/null; gzip_decompress = gzip.decompress(bytes of "
                       "dense.gz) in this process",
        "repeats": args.repeats}}

    dense_lenet, train_data, test_data, dense_seconds = lenet_dense(epochs, 6000 if args.quick else None)
    result["lenet300_dense"] = {"test_accuracy": evaluate(dense_lenet, test_data).accuracy, "epochs": epochs,
                                "train_seconds": dense_seconds}
    if "lenet300" in models:
        lenet_inputs = test_data.tensors[0][:2000]

        def lenet_quality(lossy: nn.Module, exact: nn.Module) -> dict[str, float]:
            data = torch.utils.data.TensorDataset(*test_data.tensors)
            return {"test_accuracy": evaluate(lossy, data).accuracy, "lossless_test_accuracy":
                    evaluate(exact, data).accuracy, **logits_quality(lenet_inputs)(lossy, exact)}

        rows += size_rows("lenet300", lambda: copy.deepcopy(dense_lenet), work, SPARSITIES, args.repeats,
                          lenet_quality)
    if "efficientnet_lite0" in models:
        from prunekit.data.pretrained import efficientnet_lite0

        base = efficientnet_lite0()
        images = torch.rand(16, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        rows += size_rows("efficientnet_lite0", lambda: copy.deepcopy(base), work, SPARSITIES, args.repeats,
                          logits_quality(images))
    if "minilm" in models:
        from prunekit.data.pretrained import minilm

        base_minilm, _ = minilm()
        rows += size_rows("minilm", lambda: copy.deepcopy(base_minilm), work, SPARSITIES[1:], args.repeats,
                          minilm_quality(SENTENCES))  # no 0% row: xz -9 of 91 MB takes minutes on this machine
    result["rows"] = rows
    result["lenet300_gradual_95"] = lenet_gradual(dense_lenet, train_data, test_data, 2 if args.quick else 10, work)

    goal_rows = [r for r in rows if r["sparsity"] in (0.9, 0.95)]
    result["goals"] = {
        "vs_xz_at_90_95": {f"{r['model']}@{r['sparsity']}": round(r["ratio_vs_xz"], 4) for r in goal_rows},
        "vs_xz_met": all(r["ratio_vs_xz"] >= GOAL_VS_XZ for r in goal_rows),
        # the bar's load half, at the bar's sparsities (90% and 95%); the other sparsities are reported apart
        "load_faster_than_gunzip": {f"{r['model']}@{r['sparsity']}": r["load"]["load_faster_than_gunzip"]
                                    for r in goal_rows},
        "load_faster_than_gunzip_met": all(r["load"]["load_faster_than_gunzip"] for r in goal_rows),
        "load_faster_than_gunzip_other_sparsities": {f"{r['model']}@{r['sparsity']}":
                                                     r["load"]["load_faster_than_gunzip"]
                                                     for r in rows if r not in goal_rows},
        "dense_tensors_never_grow": all(r["codecs"]["max_stored_over_raw"] <= 1.0 for r in rows),
        "all_lossless_bit_exact": all(r["lossless_bit_exact"] for r in rows),
        "int8_lenet_95_ratio": result["lenet300_gradual_95"]["int8"]["ratio_vs_dense_fp32"],
        "int8_lenet_95_ratio_met": result["lenet300_gradual_95"]["goal_int8_40x"],
        "int8_lenet_95_accuracy_met": result["lenet300_gradual_95"]["goal_int8_accuracy"],
    }
    name = "disk_size"
    path = write_json(name, result, args.quick)
    plot(rows, png_path(name, args.quick))
    print(table([[r["model"], f"{r['sparsity']:.0%}", f"{r['dense_bytes']:,}", f"{r['gzip9_bytes']:,}",
                  f"{r['xz9_bytes']:,}", f"{r['prunekit_bytes']:,}", f"{r['ratio_vs_xz']:.3f}",
                  f"{r['lossy']['int8']['bytes']:,}",
                  f"{r['load']['median_s']['prunekit_load']:.3f}", f"{r['load']['median_s']['gunzip_cli']:.3f}"]
                 for r in rows],
                ["model", "sparsity", "dense", "gzip -9", "xz -9", "prunekit", "vs xz", "int8", "load s",
                 "gunzip s"]))
    print(json.dumps(result["goals"], indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
