"""SmolLM2-135M perplexity after one-shot pruning (magnitude / Wanda / SparseGPT), and what pruning costs.

Fixed protocol (issue 5):

* calibration: 128 sequences of 512 tokens drawn (seed 0) from the five Austen novels other than *Persuasion*;
* evaluation: all of *Persuasion* in non-overlapping 512-token windows (the last, shorter window included);
* sparsity counts the linear layers inside the 30 blocks only (not the embeddings, not the tied LM head);
* cost: wall time and process CPU time of ``prunekit.llm.prune`` alone, and extra peak memory = peak RSS during
  pruning minus RSS after the model is loaded (the peak is reset through ``/proc/self/clear_refs`` right before
  pruning, so the load's own transient peak does not hide it). transformers maps the weights file copy-on-write, so
  the weights are first copied into ordinary memory: RSS after load then holds the whole fp32 model.

Every configuration runs in its own process (clean memory numbers) and its result is saved to
``benchmarks/results/llm_perplexity.json`` as soon as it finishes; a rerun skips finished configurations, so the grid
can span several sessions. The plot ``llm_perplexity.png`` is redrawn after each one.

    ./run bench llm_perplexity.py                 # the whole grid (hours on a busy 2-core machine)
    ./run bench llm_perplexity.py --only dense wanda-50% sparsegpt-50%
    ./run bench llm_perplexity.py --quick         # 8 calibration sequences, 4 evaluation windows: a smoke test
    ./run bench llm_perplexity.py --only wanda-50% --redo     # rerun a finished configuration after a code change
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Self

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"
NAME = "llm_perplexity"

METHODS = ("magnitude", "wanda", "sparsegpt")
BATCH_SIZE = 4  # calibration sequences per forward pass
SWEEP = (0.3, 0.4, 0.5, 0.6, 0.7)
GOALS = {"wanda_ratio_50": 1.8, "sparsegpt_ratio_50": 1.6, "wanda_seconds": 180.0, "sparsegpt_seconds": 600.0,
         "extra_rss_over_fp32": 1.0}


def configurations() -> list[str]:
    """All configuration keys, most important first."""
    keys = ["dense"] + [f"{m}-50%" for m in ("wanda", "sparsegpt", "magnitude")]
    keys += [f"{m}-2:4" for m in ("wanda", "sparsegpt", "magnitude")]
    for s in SWEEP:
        if s != 0.5:
            keys += [f"{m}-{round(s * 100)}%" for m in ("wanda", "sparsegpt", "magnitude")]
    return keys


def parse_key(key: str) -> tuple[str, float | None, str | None]:
    if key == "dense":
        return "dense", None, None
    method, target = key.split("-", 1)
    if target.endswith("%"):
        return method, int(target[:-1]) / 100, None
    return method, None, target


# ---------------------------------------------------------------------------------------------------------------------
# one configuration, in a child process


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _anon_bytes() -> int:
    """Anonymous resident memory (heap, tensors), without file-backed pages such as shared-library code."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class _Sampler:
    """Peak RSS by sampling every 20 ms (a fallback where the kernel's peak cannot be reset)."""

    def __init__(self) -> None:
        self.peak = _rss_bytes()
        self.peak_anon = _anon_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_bytes())
            self.peak_anon = max(self.peak_anon, _anon_bytes())

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _tokens(tokenizer: Any) -> dict[str, torch.Tensor]:
    """Token ids of the six novels, cached next to the converted model (tokenizing takes a while)."""
    from prunekit.data.fetch import cache_dir
    from prunekit.data.text import NOVELS, austen
    from prunekit.fileformat import FileFormatError, read, write

    path = cache_dir() / "bench" / "austen-smollm2-tokens.safetensors"
    try:
        tensors, _ = read(path, kind="token-ids")
        if set(tensors) == set(NOVELS):
            return tensors
    except FileFormatError:
        pass
    tensors = {n: torch.tensor(tokenizer(austen(n)).input_ids, dtype=torch.int64) for n in NOVELS}
    write(path, tensors, {"tokenizer": "SmolLM2-135M-Instruct"}, kind="token-ids")
    return tensors


def run_one(key: str, quick: bool, eval_limit: int | None = None) -> dict[str, Any]:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    import prunekit.llm
    from prunekit.data.llm import smollm2
    from prunekit.data.text import NOVELS, calibration_windows, eval_windows
    from prunekit.llm.prune import DEFAULT_INPUTS

    method, sparsity, pattern = parse_key(key)
    t0 = time.perf_counter()
    model, tokenizer = smollm2()
    # transformers maps the safetensors file (copy-on-write): weights would enter RSS only when pruning touches them.
    # Copy them into ordinary memory now, so "RSS after load" holds the whole fp32 model.
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    load_seconds = time.perf_counter() - t0
    tokens = _tokens(tokenizer)
    calib_docs = [tokens[n] for n in NOVELS if n != "persuasion"]
    n_calib = 8 if quick else 128
    calibration = calibration_windows(calib_docs, n=n_calib, length=512, seed=0)  # (128, 512)
    windows = eval_windows(tokens["persuasion"], 512)
    if quick:
        windows = windows[:4]
    elif eval_limit:
        windows = windows[:eval_limit]
    fp32_bytes = sum(p.numel() for p in model.parameters()) * 4
    record: dict[str, Any] = {"key": key, "method": method, "sparsity": sparsity, "pattern": pattern,
                              "inputs": DEFAULT_INPUTS.get(method),  # prunekit.llm.prune's default for the method
                              "calibration": list(calibration.shape), "eval_windows": len(windows),
                              "eval_tokens": sum(w.numel() for w in windows), "model_load_seconds": load_seconds,
                              "fp32_model_bytes": fp32_bytes}
    if method != "dense":
        import gc

        gc.collect()
        rss_after_load, anon_after_load = _rss_bytes(), _anon_bytes()
        hwm_reset = _reset_hwm()
        load_before = os.getloadavg()[0]
        cpu0, w0 = _cpu_seconds(), time.perf_counter()
        with _Sampler() as sampler:
            kwargs: dict[str, Any] = {"pattern": pattern} if pattern else {"sparsity": sparsity}
            masks = prunekit.llm.prune(model, calibration, method=method, batch_size=BATCH_SIZE, progress=False,
                                       **kwargs)
        wall, cpu = time.perf_counter() - w0, _cpu_seconds() - cpu0
        peak = max(_hwm_bytes() or 0, sampler.peak) if hwm_reset else sampler.peak
        record.update({
            "prune_wall_seconds": wall, "prune_cpu_seconds": cpu,
            "loadavg_1min_before_after": [load_before, os.getloadavg()[0]],
            "rss_after_load_bytes": rss_after_load, "peak_rss_bytes": peak,
            "extra_peak_rss_bytes": peak - rss_after_load,
            "extra_peak_rss_over_fp32": (peak - rss_after_load) / fp32_bytes,
            "peak_method": "VmHWM after clear_refs + 20 ms sampling" if hwm_reset else "20 ms sampling",
            "achieved_sparsity": masks.sparsity(), "pruned_tensors": len(masks),
            "calibration_batch_size": BATCH_SIZE,
            "extra_peak_anon_rss_bytes_sampled": sampler.peak_anon - anon_after_load,
            "zeros_in_block_linears": int(sum((~m).sum() for m in masks.values())),
        })
    t1 = time.perf_counter()
    record["perplexity"] = prunekit.llm.perplexity(model, windows, progress=False)
    record["eval_seconds"] = time.perf_counter() - t1
    return record


# ---------------------------------------------------------------------------------------------------------------------
# the grid, in the parent process


def _git_revision() -> str | None:
    """The commit the numbers come from (with ``+dirty`` when code, not results being written, has changes)."""
    from _common import _git

    rev = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")
    return None if rev is None else rev + ("+dirty" if dirty else "")


def _load(path: Path) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    return {"benchmark": NAME, "protocol": __doc__.split("\n\n")[1], "commands": [], "runs": {}}


def _save(path: Path, doc: dict[str, Any]) -> None:
    from prunekit.fileformat import write_text

    doc["summary"] = summarize(doc["runs"])
    write_text(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    try:
        plot(doc, path.with_suffix(".png"))
    except Exception as exc:  # noqa: BLE001 - a plotting problem must not lose the numbers
        print(f"plot failed: {exc}", file=sys.stderr)


def summarize(runs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    dense = runs.get("dense", {}).get("perplexity")
    out["dense_perplexity"] = dense
    table = {}
    for key, r in runs.items():
        if key == "dense":
            continue
        table[key] = {"perplexity": r["perplexity"], "ratio_to_dense": r["perplexity"] / dense if dense else None,
                      "prune_wall_seconds": r.get("prune_wall_seconds"),
                      "prune_cpu_seconds": r.get("prune_cpu_seconds"),
                      "extra_peak_rss_over_fp32": r.get("extra_peak_rss_over_fp32")}
    out["table"] = table
    goals: dict[str, Any] = {}
    for method, limit in (("wanda", GOALS["wanda_ratio_50"]), ("sparsegpt", GOALS["sparsegpt_ratio_50"])):
        r = table.get(f"{method}-50%")
        if r and r["ratio_to_dense"] is not None:
            goals[f"{method} 50% perplexity <= {limit}x dense"] = {"value": r["ratio_to_dense"],
                                                                  "met": r["ratio_to_dense"] <= limit}
    for method, limit in (("wanda", GOALS["wanda_seconds"]), ("sparsegpt", GOALS["sparsegpt_seconds"])):
        r = runs.get(f"{method}-50%")
        if r:
            goals[f"{method} wall time <= {limit:.0f} s (50%, 128x512 calibration)"] = {
                "value": r["prune_wall_seconds"], "met": r["prune_wall_seconds"] <= limit,
                "cpu_seconds": r["prune_cpu_seconds"], "loadavg": r["loadavg_1min_before_after"]}
    extra = [(k, r["extra_peak_rss_over_fp32"]) for k, r in runs.items() if "extra_peak_rss_over_fp32" in r]
    if extra:
        worst = max(extra, key=lambda kv: kv[1])
        goals["extra peak RSS <= 1x fp32 model size (worst configuration)"] = {
            "value": worst[1], "configuration": worst[0], "met": worst[1] <= GOALS["extra_rss_over_fp32"]}
    out["goals"] = goals
    ordering = {}
    for pat in ("2:4",):
        vals = {m: runs[f"{m}-{pat}"]["perplexity"] for m in METHODS if f"{m}-{pat}" in runs}
        ordering[pat] = sorted(vals, key=vals.get)
    out["ordering_best_first"] = ordering
    return out


def plot(doc: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from prunekit.fileformat import atomic_write

    runs = doc["runs"]
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for method, marker in zip(METHODS, "osD"):
        pts = sorted((r["sparsity"], r["perplexity"]) for r in runs.values() if r["method"] == method and r["sparsity"])
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=method)
        nm = runs.get(f"{method}-2:4")
        if nm:
            ax.scatter([0.5], [nm["perplexity"]], marker="x", s=60, color=ax.lines[-1].get_color() if pts else None,
                       label=f"{method} 2:4")
    if "dense" in runs:
        ax.axhline(runs["dense"]["perplexity"], color="gray", linestyle="--", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of the linear layers inside the blocks")
    ax.set_ylabel("perplexity on Persuasion (log scale)")
    windows = {r.get("eval_windows") for r in runs.values()}
    ax.set_title("SmolLM2-135M, one-shot pruning, 128x512 Austen calibration tokens\n"
                 f"evaluated on {'/'.join(str(w) for w in sorted(windows, key=str))} windows of Persuasion",
                 fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="configuration keys to run (default: all, most important first)")
    parser.add_argument("--quick", action="store_true", help="smoke test; writes llm_perplexity_quick.json")
    parser.add_argument("--eval-windows", type=int, default=None,
                        help="evaluate on the first N windows only (NOT the fixed protocol; writes "
                             "llm_perplexity_first<N>win.json)")
    parser.add_argument("--redo", action="store_true",
                        help="rerun the --only configurations even if they have results (after a change to the code)")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # child mode: one configuration, JSON on stdout
    args = parser.parse_args()
    if args.run:
        print("RESULT " + json.dumps(run_one(args.run, args.quick, args.eval_windows)), flush=True)
        return 0
    suffix = "_quick" if args.quick else f"_first{args.eval_windows}win" if args.eval_windows else ""
    path = RESULTS / f"{NAME}{suffix}.json"
    doc = _load(path)
    if args.eval_windows:
        doc["note"] = (f"evaluation on the first {args.eval_windows} windows of Persuasion only (a subset, to fit a "
                       "busy machine); calibration and cost follow the fixed protocol")
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    if command not in doc["commands"]:
        doc["commands"].append(command)
    doc["environment"] = {"python": platform.python_version(), "torch": torch.__version__,
                          "cpus": os.cpu_count(), "torch_threads": 2, "machine": platform.machine()}
    keys = args.only or configurations()
    unknown = [k for k in keys if k not in configurations()]
    if unknown:
        parser.error(f"unknown configurations {unknown}; choose from {configurations()}")
    for key in keys:
        if key in doc["runs"] and not (args.redo and args.only):
            print(f"{key}: done already (perplexity {doc['runs'][key]['perplexity']:.2f})", flush=True)
            continue
        print(f"{key}: running", flush=True)
        cmd = [sys.executable, __file__, "--run", key] + (["--quick"] if args.quick else [])
        cmd += ["--eval-windows", str(args.eval_windows)] if args.eval_windows else []
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{key}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
            continue
        record = json.loads(lines[-1][len("RESULT "):])
        record["command"] = command
        record["git"] = _git_revision()
        if key in doc["runs"]:  # --redo: the earlier measurement stays in the file, marked as superseded
            doc.setdefault("superseded", []).append({"key": key, "replaced_by_git": record["git"],
                                                     "record": doc["runs"][key]})
        doc["runs"][key] = record
        _save(path, doc)
        print(f"{key}: perplexity {record['perplexity']:.2f}"
              + (f", pruned in {record['prune_wall_seconds']:.0f} s wall / {record['prune_cpu_seconds']:.0f} s CPU, "
                 f"extra peak RSS {record['extra_peak_rss_over_fp32']:.2f}x fp32" if "prune_wall_seconds" in record
                 else ""), flush=True)
    _save(path, doc)
    print(json.dumps(doc["summary"]["goals"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
