"""Shared helpers for the benchmark scripts (never imported by the package).

Every script records the exact command line, library versions, thread count, date, machine load and all raw timings
in one JSON file under ``benchmarks/results/``; quick smoke runs write ``*_quick.json`` so they never overwrite a full
run.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from prunekit.fileformat import json_text

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
REPO = HERE.parent


def setup_torch(threads: int = 2, seed: int = 0) -> None:
    """Fix the intra-op thread count explicitly and seed every RNG the benchmarks use."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    random.seed(seed)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def metadata() -> dict[str, Any]:
    """Environment of this run: command line, versions, threads, date, machine, load, git revision."""
    try:
        import torchvision

        tv = torchvision.__version__
    except ImportError:  # pragma: no cover - torchvision is in the benchmark environment
        tv = None
    import prunekit

    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "command": shlex.join([sys.executable, *sys.argv]),
        "cwd": os.getcwd(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": tv,
        "prunekit": prunekit.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_model(),
        "platform": platform.platform(),
        "loadavg_start": list(os.getloadavg()),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
    }


def summarize(values: list[float]) -> dict[str, float]:
    """Median, mean, spread (IQR, p10/p90, min/max) of a list of timings in seconds."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        return {"n": 0}

    def q(p: float) -> float:  # linear-interpolated quantile
        pos = p * (n - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {
        "n": n,
        "median": statistics.median(xs),
        "mean": statistics.fmean(xs),
        "stdev": statistics.stdev(xs) if n > 1 else 0.0,
        "min": xs[0],
        "p10": q(0.10),
        "p25": q(0.25),
        "p75": q(0.75),
        "p90": q(0.90),
        "max": xs[-1],
    }


def bootstrap_ratio_ci(num: list[float], den: list[float], stat: str = "median", n_boot: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of stat(num) / stat(den) (samples resampled independently, fixed seed)."""
    rng = random.Random(seed)
    f = statistics.median if stat == "median" else statistics.fmean
    ratios = []
    for _ in range(n_boot):
        a = [num[rng.randrange(len(num))] for _ in num]
        b = [den[rng.randrange(len(den))] for _ in den]
        ratios.append(f(a) / f(b))
    ratios.sort()
    return ratios[int(0.025 * n_boot)], ratios[int(0.975 * n_boot) - 1]


def write_json(name: str, data: dict[str, Any], quick: bool) -> Path:
    """Write ``data`` (with ``loadavg_end`` added to its meta) to ``benchmarks/results/<name>[_quick].json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    if "meta" in data:
        data["meta"]["loadavg_end"] = list(os.getloadavg())
    path = RESULTS / f"{name}{'_quick' if quick else ''}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json_text(data, indent=1, default=str))
    tmp.replace(path)
    return path


def png_path(name: str, quick: bool) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"{name}{'_quick' if quick else ''}.png"


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain-text table with right-aligned columns (first column left-aligned)."""
    cols = list(zip(header, *rows))
    widths = [max(len(str(c)) for c in col) for col in cols]
    def fmt(r: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)
