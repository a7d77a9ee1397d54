"""What the coverage benchmarks (``timm_coverage.py``, ``task_coverage.py``) share: each tool runs on each model in a
child process of its own, records ``ok`` or the stage that failed, and the grid resumes and re-runs one tool while
keeping the other's records."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from _harness import RESULTS, ResultStore

from prunekit.fileformat import write_text

TOOLS = ("ours", "tp")


def run_stages(stages: Iterator[str], rec: dict[str, Any]) -> dict[str, Any]:
    """Run a tool's stages (a generator yielding each stage's name as it starts); ``rec`` gets ``status`` ``ok``, or
    ``fail`` with the stage, the error and where it was raised."""
    stage = "start"
    try:
        for stage in stages:
            pass
        rec["status"] = "ok"
    except Exception as exc:
        rec.update(status="fail", stage=stage, error=f"{type(exc).__name__}: {exc}"[:600],
                   where=traceback.format_exc().strip().splitlines()[-3][:300])
    return rec


def in_child(script: str, prefix: str, tool: str, name: str, size: int, memory_gb: float,
             timeout: float) -> dict[str, Any]:
    """Run one tool on one model in a fresh process (``script --child TOOL NAME SIZE OUT``) with a memory cap and a
    time limit; the child writes its record as JSON to OUT."""
    limit = int(memory_gb * 2**30)

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    out = RESULTS / f".{prefix}-{tool}-{os.getpid()}.json"
    cmd = [sys.executable, script, "--child", tool, name, str(size), str(out)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=cap)
    except subprocess.TimeoutExpired:
        return {"status": "fail", "stage": "timeout", "error": f"no result after {timeout:.0f} s"}
    try:
        if proc.returncode != 0 or not out.exists():
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            what = lines[-1] if lines else f"exit status {proc.returncode}"
            if proc.returncode < 0 or "MemoryError" in proc.stderr:
                what += f" (memory capped at {memory_gb:g} GB)"
            return {"status": "fail", "stage": "crash", "error": what[-600:]}
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def marks(notes: list[str]) -> list[str]:
    """``*``: the plan kept modules or split channels whole; ``+``: it tied a reshape to its input's width."""
    return [m for m, words in (("*", ("whole mended", "keeping the channels")), ("+", ("tying the channels",)))
            if any(w in n for n in notes for w in words)]


def tally(runs: dict[str, Any], lead: Callable[[str, dict[str, Any]], list[str]]
          ) -> tuple[list[list[str]], dict[str, int]]:
    """One table row per model (``lead(name, record)`` cells, then each tool's "ok 2.31x" or failed stage) and the
    counts: models, ok and >= 2x per tool, prunekit plans that kept something whole (``*``) or tied a width (``+``)."""
    rows, counts = [], {"models": 0, "ours_ok": 0, "tp_ok": 0, "ours_2x": 0, "tp_2x": 0, "ours_kept_whole": 0,
                        "ours_tied_width": 0}
    for name, r in runs.items():
        counts["models"] += 1
        cells = lead(name, r)
        for tool in TOOLS:
            t = r[tool]
            ok = t["status"] == "ok"
            red = r["dense_macs"] / t["macs"] if ok and t.get("macs") else None
            counts[f"{tool}_ok"] += ok
            counts[f"{tool}_2x"] += bool(red and red >= 2)
            if ok:
                cells.append(f"ok {red:.2f}x" + "".join(f" {m}" for m in marks(t.get("notes") or [])))
            else:
                cells.append(f"{t['stage']}: {t['error'].split(':')[0]}")
        found = marks(r["ours"].get("notes") or [])
        counts["ours_kept_whole"] += "*" in found
        counts["ours_tied_width"] += "+" in found
        rows.append(cells)
    return rows, counts


def _provenance(old: dict[str, Any], tool: str) -> str:
    """Where a kept record of ``tool`` was measured: the command of the run that measured it."""
    earlier = old.get("tools", {}).get(tool, "")
    return earlier if earlier.startswith("kept from") else f"kept from {old.get('command', '?')}"


def add_arguments(ap: argparse.ArgumentParser, what: str, timeout: float) -> None:
    ap.add_argument("--models", nargs="*", default=None, help=f"{what} names (default: the list in this script)")
    ap.add_argument("--memory-gb", type=float, default=8.0)
    ap.add_argument("--timeout", type=float, default=timeout)
    ap.add_argument("--shard", default="0/1", help="K/N: this process takes every N-th model from the K-th (run N "
                    "processes with K = 0..N-1 to use N cores; they share the results file)")
    ap.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS),
                    help="tools to run (default both); with one, finished models are run again for that tool and "
                    "keep the other's record (the record's 'command' then names the rerun, 'tools' what it ran)")
    ap.add_argument("--child", nargs=4, metavar=("TOOL", "NAME", "SIZE", "OUT"), help=argparse.SUPPRESS)


def run(args: argparse.Namespace, *, name: str, script: str, models: Iterable[str], meta: dict[str, Any],
        dense: Callable[[str], dict[str, Any]], size: Callable[[str], int],
        summarize: Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]) -> None:
    """The grid: each of ``args.models`` (default ``models``; this shard's share) gets ``dense(model)`` (its dense
    MACs and the like) and a record per tool, measured in a child (input size ``size(model)``) or kept from the file
    when ``--tools`` names the other one. Writes ``results/<name>.json`` as it goes, then the summary and the
    ``.md`` table."""
    known = list(models)
    names = args.models or known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"not in this benchmark's list: {unknown}; add them to its MODELS")
    try:
        k, n = (int(v) for v in args.shard.split("/"))
        assert 0 <= k < n
    except (ValueError, AssertionError):
        raise SystemExit(f"--shard {args.shard!r}: expected K/N with 0 <= K < N, e.g. 0/2") from None
    store = ResultStore(RESULTS / f"{name}.json", name, meta={**meta, "torch": torch.__version__})
    both = set(args.tools) == set(TOOLS)
    for model in names[k::n]:
        if store.done(model) and both:
            continue
        old = store.runs.get(model, {})
        if not both and not all(t in old for t in TOOLS):
            raise SystemExit(f"{model}: no earlier record to keep the other tool's result from; run both tools")
        record = dense(model)
        for tool in TOOLS:
            record[tool] = in_child(script, name, tool, model, size(model), args.memory_gb, args.timeout) \
                if tool in args.tools else old[tool]
        if not both:
            record["tools"] = {t: "rerun" if t in args.tools else _provenance(old, t) for t in TOOLS}
        store.put(model, record)
        print(f"{model}: ours {record['ours']['status']}, Torch-Pruning {record['tp']['status']}", flush=True)
    text, counts = summarize(store.runs)
    store.doc["summary"] = counts
    store.save()
    made = "`, `".join(store.doc["commands"])
    write_text(RESULTS / f"{name}.md", f"Generated by `{made}`.\n\n```\n{text}\n```\n")
    print(text)


def child(args: argparse.Namespace, run_tool: Callable[[str, str, int], dict[str, Any]]) -> bool:
    """In a child process (``--child``): run the tool and write its record; True if this was one."""
    if not args.child:
        return False
    tool, model, size, out = args.child
    write_text(Path(out), json.dumps(run_tool(tool, model, int(size))))
    return True
