"""Small CPU fast paths used on the hot paths of mask updates (internal).

On CPU, single-threaded NumPy passes over large float32/bool buffers run several times faster than the matching
torch ops (which open a parallel region per call and stall whenever another process holds a core), so the pruning
machinery routes its elementwise bookkeeping through zero-copy NumPy views when it can, and falls back to torch for
other devices and dtypes. Results are identical.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_NUMPY = (torch.float32, torch.float64, torch.bool, torch.uint8, torch.int32, torch.int64)


def _view(t: torch.Tensor) -> np.ndarray | None:
    if t.device.type == "cpu" and t.dtype in _NUMPY and t.is_contiguous() and not t.is_conj():
        return t.detach().numpy()
    return None


def count_true(mask: torch.Tensor) -> int:
    """Number of True (non-zero) entries."""
    v = _view(mask)
    return int(np.count_nonzero(v)) if v is not None else int(mask.count_nonzero())


def has_nan(t: torch.Tensor) -> bool:
    """Whether a floating tensor holds a NaN (one reduction; +inf and -inf together are checked elementwise)."""
    if not t.is_floating_point() or t.numel() == 0:
        return False
    v = _view(t)
    total = float(v.sum(dtype=np.float64)) if v is not None else float(t.sum(dtype=torch.float64))
    if not math.isnan(total):
        return False
    return bool(np.isnan(v).any()) if v is not None else bool(torch.isnan(t).any())


def absolute(t: torch.Tensor) -> torch.Tensor:
    """``|t|`` as a new tensor."""
    v = _view(t)
    return torch.from_numpy(np.abs(v)) if v is not None and t.is_floating_point() else t.abs()


def ones_bool(like: torch.Tensor) -> torch.Tensor:
    """An all-True bool tensor with the shape and device of ``like``."""
    if like.device.type == "cpu":
        return torch.from_numpy(np.ones(tuple(like.shape), dtype=np.bool_))
    return torch.ones_like(like, dtype=torch.bool)


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for same-shape tensors."""
    a, b = _view(dst), _view(src)
    if a is not None and b is not None and a.dtype == b.dtype:
        np.copyto(a, b.reshape(a.shape))
    else:
        dst.copy_(src)
