"""DistributedDataParallel under torchrun (2 processes, gloo on CPU): masks are identical on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).parent / "helpers" / "ddp_worker.py"


def test_masks_identical_on_two_ranks(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0]["masks"] == results[1]["masks"]
    assert results[0]["weights"] == results[1]["weights"]
    assert all(r["zeros_ok"] for r in results)
    assert abs(results[0]["sparsity"] - 0.8) < 1e-3
