"""Weight-only int8 quantization of a (pruned) model, per output channel and symmetric, so zeros stay exactly zero.

``w ≈ q * s`` with ``q = round(w / s)`` in [-127, 127] and one scale ``s = max|w_row| / 127`` per output channel
(row of a Linear weight, output channel of a convolution kernel). There is no zero point, so every pruned (zero)
weight is stored as ``q = 0`` and comes back as exactly 0. The same rounding is used by the ``"int8"`` value codec of
compressed files (:mod:`prunekit.compress`), so ``prunekit.save(model, path, compress="int8")`` followed by
:func:`prunekit.load` gives the same weights as :func:`quantize_int8` ("dequantize on load").

PyTorch's own eager quantization (``torch.ao.quantization.quantize_dynamic``) still runs in torch 2.14 but is
deprecated and announced for removal (its successor lives in the separate ``torchao`` package), so prunekit does not
build on it. :func:`quantize_int8` swaps ``nn.Linear`` / ``nn.Conv1d/2d/3d`` modules for :class:`Int8Linear` /
:class:`Int8Conv` twins that keep int8 weights (1 byte each) and dequantize in ``forward``; the model then exports to
ONNX with int8 initializers, or to a plain safetensors file that any PyTorch user can read.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> with torch.no_grad():
    ...     model[0].weight[0, :2] = 0.0
    >>> x = torch.randn(5, 4)
    >>> reference = model(x)
    >>> model = quantize_int8(model)
    >>> model[0]
    Int8Linear(in_features=4, out_features=3, bias=True)
    >>> model[0].weight_int8.dtype, model[0].weight_int8[0, :2].tolist()
    (torch.int8, [0, 0])
    >>> bool((model(x) - reference).abs().max() < 0.05)
    True
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Int8Conv",
    "Int8Linear",
    "dequantize_int8",
    "dequantize_per_channel",
    "quantize_int8",
    "quantize_per_channel",
]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization with one scale per output channel (dim 0).

    Args:
        w: A floating-point tensor with at least one dimension.

    Returns:
        ``(q, scale)``: int8 codes of ``w``'s shape and float32 scales of shape ``(w.shape[0],)``; a channel of zeros
        has scale 0.

    Examples:
        >>> q, s = quantize_per_channel(torch.tensor([[1.0, -0.5], [0.0, 4.0]]))
        >>> q.tolist(), s.tolist()
        ([[127, -64], [0, 127]], [0.007874015718698502, 0.031496062874794006])
    """
    if not w.is_floating_point() or w.dim() < 1:
        raise TypeError(f"quantize_per_channel needs a floating-point tensor with a channel dim, got {w.dtype} "
                        f"{tuple(w.shape)}")
    rows = w.detach().reshape(w.shape[0], -1).double()  # (C, K)
    scale = (rows.abs().amax(dim=1) / 127.0).float() if rows.shape[1] else torch.zeros(w.shape[0])
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).double()
    q = torch.round(rows / safe[:, None]).clamp_(-127, 127).to(torch.int8)  # round half to even, like numpy
    return q.reshape(w.shape), scale


def dequantize_per_channel(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale`` with ``scale`` broadcast over all but the first dimension."""
    return q.to(dtype) * scale.to(dtype).reshape(-1, *([1] * (q.dim() - 1)))


class _Int8Weight(nn.Module):
    """Shared part: int8 weight + per-channel scale buffers, dequantized on the fly."""

    weight_int8: torch.Tensor
    weight_scale: torch.Tensor

    def _init_weight(self, module: nn.Module) -> None:
        q, scale = quantize_per_channel(module.weight)
        self.register_buffer("weight_int8", q.to(module.weight.device))
        self.register_buffer("weight_scale", scale.to(module.weight.device))
        self.bias = module.bias
        self.dtype = module.weight.dtype

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (computed on every call)."""
        return dequantize_per_channel(self.weight_int8, self.weight_scale, self.dtype)


class Int8Linear(_Int8Weight):
    """A weight-only int8 ``nn.Linear``: int8 weight, float32 scale per output row, float bias and computation.

    Args:
        linear: The float module to quantize (its bias is shared, not copied).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._init_weight(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def to_float(self) -> nn.Linear:
        """The equivalent float ``nn.Linear`` with the dequantized weight."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.weight_int8.device,
                        dtype=self.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight)
        if self.bias is not None:
            out.bias = self.bias
        return out


class Int8Conv(_Int8Weight):
    """A weight-only int8 ``nn.Conv1d/2d/3d`` (any stride, padding, dilation, groups, padding mode).

    Args:
        conv: The float module to quantize (its bias is shared; its other settings are kept).
    """

    def __init__(self, conv: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> None:
        super().__init__()
        self.conv = copy.copy(conv)  # shallow: keeps the hyper-parameters and the forward of the right dimension
        self.conv._parameters = {"weight": None, "bias": None}  # the tensors live here, not in the copy
        self._init_weight(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv._conv_forward(x, self.weight, self.bias)  # type: ignore[operator]

    def extra_repr(self) -> str:
        return self.conv.extra_repr().replace(", bias=False", "") + f", bias={self.bias is not None}"

    def to_float(self) -> nn.Module:
        """The equivalent float convolution with the dequantized weight."""
        out = copy.copy(self.conv)
        out._parameters = {"weight": nn.Parameter(self.weight.detach().clone()), "bias": self.bias}
        return out


def _matches(name: str, patterns: Iterable[str] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def quantize_int8(model: nn.Module, *, include: str | Iterable[str] | None = None, inplace: bool = True) -> nn.Module:
    """Swap the model's ``nn.Linear`` and ``nn.Conv1d/2d/3d`` modules for weight-only int8 twins.

    Only modules of exactly these types are swapped (a subclass may have its own ``forward``); their zeros stay zero.

    Args:
        model: The (pruned) model.
        include: Globs of module names to quantize (default: every Linear/Conv).
        inplace: Modify ``model`` (default) or a deep copy of it.

    Returns:
        The quantized model.
    """
    patterns = [include] if isinstance(include, str) else (list(include) if include is not None else None)
    model = model if inplace else copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not _matches(full, patterns):
                continue
            if type(child) is nn.Linear:
                setattr(module, child_name, Int8Linear(child))
            elif type(child) in _CONVS:
                setattr(module, child_name, Int8Conv(child))
    return model


def dequantize_int8(model: nn.Module) -> nn.Module:
    """Swap :class:`Int8Linear` / :class:`Int8Conv` modules back to float ones (dequantized weights), in place."""
    for _, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, (Int8Linear, Int8Conv)):
                setattr(module, child_name, child.to_float())
    return model
