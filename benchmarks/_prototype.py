"""Benchmark-only prototype of two changes to prunekit's core, to measure what they would buy (not used by the package).

``FastPruner`` is a :class:`prunekit.Pruner` with the same results and two implementation changes:

1. ``apply()`` re-zeroes pruned weights with NumPy's in-place ``np.multiply(w, mask, out=w)`` on zero-copy views of
   the CPU tensors (one vectorised single-threaded pass per tensor; bool masks, 1 byte per element), then tells
   autograd about the in-place write with ``torch.autograd.graph.increment_version``. PyTorch's ``mul_`` with a
   ``bool`` operand takes the slow mixed-dtype path and, with 2 intra-op threads, every op also waits for the slower
   thread.
2. ``update()`` selects the global magnitude threshold with NumPy over one flat score buffer: a fixed-seed sample
   brackets the k-th smallest score, one counting pass checks the bracket, ``np.partition`` runs on the values inside
   it, one comparison pass builds the masks, ties go to the lowest (tensor, flat index) first. Already-pruned entries
   score -1 (below every magnitude), so masks only gain zeros, exactly as prunekit's ``select.global_threshold``.

It handles the default case only (magnitude criterion, global allocation, no overrides, no regrow, float32 CPU tensors,
no process group); anything else falls back to the parent class. It subclasses the Pruner and uses its
private attributes (``_param_list``, ``_mask_list``, ``_active``), so it may need touching when the core changes.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch.autograd.graph import increment_version

import prunekit
from prunekit.masks import Mask
from prunekit.scoring import magnitude

_NP_DTYPES = {torch.float32}
_SAMPLE = 1 << 16


class FastPruner(prunekit.Pruner):
    """prunekit.Pruner with NumPy re-zeroing and NumPy global-magnitude selection (benchmark prototype)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._views: list[tuple[np.ndarray, np.ndarray]] | None = None

    def _numpy_ok(self) -> bool:
        return all(p.device.type == "cpu" and p.dtype in _NP_DTYPES and p.is_contiguous()
                   for p in self._param_list) and all(m.is_contiguous() for m in self._mask_list)

    def _np_views(self) -> list[tuple[np.ndarray, np.ndarray]]:
        # zero-copy views; rebuilt if a parameter's storage moved (e.g. ``p.data = ...``)
        if self._views is None or any(w.ctypes.data != p.data_ptr() for (w, _), p in
                                      zip(self._views, self._param_list)):
            self._views = [(p.detach().numpy(), m.numpy()) for p, m in zip(self._param_list, self._mask_list)]
        return self._views

    @torch.no_grad()
    def apply(self) -> None:
        if not self._active:
            return
        if not self._numpy_ok():
            super().apply()
            return
        for w, m in self._np_views():
            np.multiply(w, m, out=w)
        increment_version(self._param_list)

    @torch.no_grad()
    def update(self, sparsity: float | None = None, *, _step: int | None = None) -> Mask:
        default = (self.criterion is magnitude and self.allocation == "global" and not self.overrides
                   and not self.regrow and self._numpy_ok()
                   and not (dist.is_available() and dist.is_initialized()))
        if not default:
            return super().update(sparsity, _step=_step)
        target = self.sparsity if sparsity is None else sparsity
        keeps = fast_global_magnitude(self._np_views(), target)
        if keeps is None:  # NaN/inf weights: let prunekit raise its own error (or handle inf) on the slow path
            return super().update(sparsity, _step=_step)
        self._active = keeps > 0
        self.apply()
        emptied = [n for n, (_, m) in zip(self.masks, self._np_views()) if m.size > 1 and not m.any()]
        if emptied:  # same warning as prunekit's Pruner.update
            warnings.warn(f"{emptied} are now 100% pruned: no signal passes through them (layer collapse).",
                          stacklevel=2)
        return self.masks


def fast_global_magnitude(views: list[tuple[np.ndarray, np.ndarray]], sparsity: float) -> int | None:
    """Update the bool masks (in place, through their NumPy views) to prune ``round(sparsity * N)`` weights globally.

    Returns the number of pruned elements, or None if a score is not finite (caller falls back).
    """
    sizes = [w.size for w, _ in views]
    total = sum(sizes)
    offsets = np.cumsum([0, *sizes])
    scores = np.empty(total, dtype=np.float32)  # (N,) transient, like prunekit's per-tensor |w|
    pruned_now = 0
    for (w, m), a, b in zip(views, offsets[:-1], offsets[1:]):
        seg = scores[a:b]
        np.abs(w.reshape(-1), out=seg, casting="unsafe")
        mf = m.reshape(-1)
        n_kept = int(np.count_nonzero(mf))
        if n_kept < mf.size:  # already pruned: score -1, below every magnitude, so they stay pruned
            pruned_now += mf.size - n_kept
            np.copyto(seg, -1.0, where=~mf)
    if not math.isfinite(float(scores.sum(dtype=np.float64))):
        return None
    k = max(min(total, math.floor(sparsity * total + 0.5)), pruned_now)
    if k == 0:
        return 0
    threshold, n_below = _kth_smallest(scores, k)
    ties_to_prune = k - n_below
    n_tied = None
    if ties_to_prune:
        n_tied = int(np.count_nonzero(scores == threshold))
    for (_, m), a, b in zip(views, offsets[:-1], offsets[1:]):
        mf = m.reshape(-1)
        seg = scores[a:b]
        if ties_to_prune == 0 or ties_to_prune == n_tied:  # no partial tie group: prune everything <= / < threshold
            if ties_to_prune == 0:
                np.greater_equal(seg, threshold, out=mf)
            else:
                np.greater(seg, threshold, out=mf)
            continue
        np.greater(seg, threshold, out=mf)  # partial tie group: the first ``ties_to_prune`` tied entries go
        tied = np.flatnonzero(seg == threshold)
        if tied.size > ties_to_prune:
            mf[tied[ties_to_prune:]] = True
            ties_to_prune = 0
        else:
            ties_to_prune -= tied.size
    return k


def _kth_smallest(scores: np.ndarray, k: int) -> tuple[float, int]:
    """The k-th smallest (1-based) of ``scores`` and the count strictly below it; exact."""
    total = scores.size
    if total <= 4 * _SAMPLE:
        value = float(np.partition(scores, k - 1)[k - 1])
        return value, int(np.count_nonzero(scores < value))
    rng = np.random.default_rng(0)
    sample = np.sort(scores[rng.integers(0, total, _SAMPLE)])
    m = sample.size
    q = k / total
    margin = int(6.0 * math.sqrt(m * q * (1.0 - q))) + 32
    lo_rank, hi_rank = int(q * m) - margin, int(q * m) + margin
    lo = float(sample[lo_rank]) if lo_rank >= 0 else -math.inf
    hi = float(sample[hi_rank]) if hi_rank < m else math.inf
    below = scores < lo
    n_lo = int(np.count_nonzero(below))
    inside = ~below
    inside &= scores <= hi
    candidates = scores[inside]
    if not n_lo < k <= n_lo + candidates.size:  # bracket missed (very unlikely): exact fallback
        value = float(np.partition(scores, k - 1)[k - 1])
        return value, int(np.count_nonzero(scores < value))
    value = float(np.partition(candidates, k - n_lo - 1)[k - n_lo - 1])
    return value, n_lo + int(np.count_nonzero(candidates < value))


def fast_prune(model: torch.nn.Module, sparsity: float) -> FastPruner:
    """Prototype of ``prunekit.prune`` (one-shot global magnitude) on :class:`FastPruner`."""
    pruner = FastPruner(model, sparsity)
    pruner.step()
    return pruner
