"""Choices behind ``prunekit.llm.prune``'s defaults, made on validation text (never on *Persuasion*, the test novel).

SmolLM2-135M, 50% unstructured, the fixed calibration of ``llm_perplexity.py`` (128 windows of 512 tokens drawn with
seed 0 from the five novels other than *Persuasion*). Validation: 32 non-overlapping 512-token windows from the end of
*Northanger Abbey* that share no token position with any calibration window (checked, and recorded). Each variant
prunes a freshly loaded model and reports validation perplexity and pruning time:

* ``wanda / inputs=pruned``: each block's activation norms from the outputs of the already-pruned blocks before it
  (the sequential scheme of the SparseGPT and Wanda reference code);
* ``wanda / inputs=dense``: the dense model's activations (one forward pass per block instead of two);
* ``sparsegpt / inputs=pruned`` and ``sparsegpt / inputs=dense``: the same question for SparseGPT (``--sparsegpt``).

Results are saved after each variant and a rerun skips finished ones.

    .venv/bin/python benchmarks/llm_validation.py                # Wanda, ~10 min on 2 cores
    .venv/bin/python benchmarks/llm_validation.py --sparsegpt    # adds SparseGPT, ~15 min more
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import llm_perplexity as lp  # noqa: E402

from prunekit.reproduce.store import ResultStore  # noqa: E402

NAME = "llm_validation"
VALIDATION_NOVEL = "northangerabbey"
N_WINDOWS = 32


def _calibration_cover(doc: torch.Tensor, calibration: torch.Tensor) -> torch.Tensor:
    """Bool per token of ``doc``: does a calibration window contain this position? (windows located by their text)"""
    covered = torch.zeros(doc.numel(), dtype=torch.bool)
    length = calibration.shape[1]
    starts = doc.unfold(0, length, 1)  # (N - length + 1, length) view: every possible window
    key = 16
    index: dict[tuple[int, ...], list[int]] = {}
    for pos, gram in enumerate(doc.unfold(0, key, 1).tolist()):
        index.setdefault(tuple(gram), []).append(pos)
    for window in calibration:
        for pos in index.get(tuple(window[:key].tolist()), []):
            if pos < starts.shape[0] and torch.equal(starts[pos], window):
                covered[pos : pos + length] = True
    return covered


def validation_windows(tokens: dict[str, torch.Tensor], calibration: torch.Tensor) -> tuple[list[torch.Tensor],
                                                                                                dict[str, Any]]:
    doc = tokens[VALIDATION_NOVEL]
    covered = _calibration_cover(doc, calibration)
    length = calibration.shape[1]
    windows, starts = [], []
    start = (doc.numel() // length) * length - length  # whole windows, from the end of the novel backwards
    while start >= 0 and len(windows) < N_WINDOWS:
        if not covered[start : start + length].any():
            windows.append(doc[start : start + length].unsqueeze(0))
            starts.append(start)
        start -= length
    if len(windows) < N_WINDOWS:
        raise RuntimeError(f"only {len(windows)} validation windows of {VALIDATION_NOVEL} avoid the calibration text")
    info = {"novel": VALIDATION_NOVEL, "windows": len(windows), "window_tokens": length, "starts": starts,
            "calibration_tokens_in_novel": int(covered.sum()), "novel_tokens": doc.numel(),
            "overlap_with_calibration_tokens": 0}
    return windows, info


def run_variant(method: str, inputs: str | None, calibration: torch.Tensor, windows: list[torch.Tensor]
                ) -> dict[str, Any]:
    import prunekit.llm
    from prunekit.data.llm import smollm2

    import time

    torch.manual_seed(0)
    model, _ = smollm2()
    t0 = time.perf_counter()
    if method != "dense":
        prunekit.llm.prune(model, calibration, method=method, sparsity=0.5, batch_size=lp.BATCH_SIZE,
                           progress=False, inputs=inputs)
    seconds = time.perf_counter() - t0
    return {"method": method, "inputs": inputs, "sparsity": 0.5 if method != "dense" else 0.0,
            "prune_wall_seconds": seconds if method != "dense" else None,
            "validation_perplexity": prunekit.llm.perplexity(model, windows, progress=False)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsegpt", action="store_true", help="also compare SparseGPT's inputs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from prunekit.data.llm import smollm2
    from prunekit.data.text import NOVELS, calibration_windows

    _, tokenizer = smollm2()
    tokens = lp._tokens(tokenizer)
    calibration = calibration_windows([tokens[n] for n in NOVELS if n != "persuasion"], n=128, length=512, seed=0)
    windows, info = validation_windows(tokens, calibration)
    store = ResultStore(lp.RESULTS / f"{NAME}.json", NAME, {"protocol": __doc__.split("\n\n")[1], "validation": info})
    variants = [("dense", None), ("wanda", "pruned"), ("wanda", "dense")]
    if args.sparsegpt:
        variants += [("sparsegpt", "pruned"), ("sparsegpt", "dense")]
    for method, inputs in variants:
        key = method if inputs is None else f"{method}/inputs={inputs}"
        if store.done(key):
            print(f"{key}: done before, skipped")
            continue
        store.put(key, run_variant(method, inputs, calibration, windows))
        print(f"{key}: validation perplexity {store.runs[key]['validation_perplexity']:.2f}", flush=True)
    dense = store.runs.get("dense", {}).get("validation_perplexity")
    store.doc["summary"] = {k: {"validation_perplexity": r["validation_perplexity"],
                                "ratio_to_dense": r["validation_perplexity"] / dense if dense else None,
                                "prune_wall_seconds": r["prune_wall_seconds"]} for k, r in store.runs.items()}
    store.save()
    print(json.dumps(store.doc["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
