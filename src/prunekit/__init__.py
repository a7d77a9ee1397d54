"""prunekit: neural-network pruning for PyTorch that really makes models smaller and faster.

The common case::

    import prunekit
    pruner = prunekit.prune(model, sparsity=0.9)            # one-shot global magnitude pruning, in place
    print(prunekit.report(model))

Gradual pruning inside your own training loop::

    pruner = prunekit.Pruner(model, sparsity=0.95, schedule=prunekit.Gradual(start=0, end=2000, every=100))
    for x, y in loader:
        loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
        pruner.step()
"""

from prunekit import calibration, llm, lottery, structured
from prunekit.checkpoint import Checkpoint, load, save
from prunekit.compress import Compression
from prunekit.deploy import export
from prunekit.flops import MacCount, count_macs, count_params
from prunekit.masks import Mask
from prunekit.pruner import Pruner, prune
from prunekit.quantize import quantize_int8
from prunekit.report import Report, report
from prunekit.schedules import Constant, Gradual, Iterative, Manual, OneShot, Schedule
from prunekit.scoring import RandomScore, magnitude
from prunekit.search import SearchResult, search
from prunekit.sensitivity import Sensitivity, sensitivity
from prunekit.targets import find_prunable
from prunekit.train import prune_iteratively

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "Compression",
    "Constant",
    "Gradual",
    "Iterative",
    "MacCount",
    "Manual",
    "Mask",
    "OneShot",
    "Pruner",
    "RandomScore",
    "Report",
    "Schedule",
    "SearchResult",
    "Sensitivity",
    "calibration",
    "count_macs",
    "count_params",
    "export",
    "find_prunable",
    "llm",
    "load",
    "lottery",
    "magnitude",
    "prune",
    "prune_iteratively",
    "quantize_int8",
    "report",
    "save",
    "search",
    "sensitivity",
    "structured",
]
