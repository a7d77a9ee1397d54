"""Boolean pruning masks keyed by tensor fully qualified name.

A :class:`Mask` is plain data: ``{tensor_fqn: bool tensor}`` where ``True`` means *kept* and ``False`` means
*pruned*. Each tensor has the shape of the parameter it masks and costs one byte per element. Masks never touch a
model by themselves; :mod:`prunekit.apply` does that.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping

import torch
from torch import nn

from prunekit._fast import count_true

__all__ = ["Mask"]


class Mask(MutableMapping[str, torch.Tensor]):
    """A validated mapping from tensor fully qualified name to a ``bool`` keep-mask.

    Values must be ``torch.bool`` tensors (``True`` = kept). Setting anything else raises, so a mask can never hold
    a float or integer tensor by accident.

    Args:
        masks: Initial entries, e.g. ``{"fc1.weight": torch.ones(300, 784, dtype=torch.bool)}``.

    Examples:
        >>> import torch
        >>> m = Mask({"w": torch.tensor([True, False, False, True])})
        >>> m.sparsity()
        0.5
        >>> (m & Mask({"w": torch.tensor([True, True, False, False])}))["w"].tolist()
        [True, False, False, False]
    """

    def __init__(self, masks: Mapping[str, torch.Tensor] | None = None) -> None:
        self._data: dict[str, torch.Tensor] = {}
        for name, value in (masks or {}).items():
            self[name] = value

    # -- mapping protocol -------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._data[name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        if not isinstance(name, str):
            raise TypeError(f"mask keys must be tensor names (str), got {name!r} of type {type(name).__name__}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"mask for {name!r} must be a torch.Tensor of dtype bool, got {type(value).__name__}")
        if value.dtype != torch.bool:
            raise TypeError(
                f"mask for {name!r} has dtype {value.dtype}; masks must be torch.bool (True = kept). "
                "Convert with `tensor != 0` or `tensor.bool()`."
            )
        self._data[name] = value

    def __delitem__(self, name: str) -> None:
        del self._data[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"Mask({len(self)} tensors, {self.numel()} elements, sparsity={self.sparsity():.4f})"

    # -- statistics -------------------------------------------------------------------------------------------
    def numel(self) -> int:
        """Total number of masked elements."""
        return sum(m.numel() for m in self._data.values())

    def num_pruned(self) -> int:
        """Number of pruned (``False``) elements."""
        return self.numel() - self.num_kept()

    def num_kept(self) -> int:
        """Number of kept (``True``) elements."""
        return sum(count_true(m) for m in self._data.values())

    def sparsity(self) -> float:
        """Fraction of pruned elements over all masked tensors (0.0 for an empty mask)."""
        n = self.numel()
        return self.num_pruned() / n if n else 0.0

    def density(self) -> float:
        """Fraction of kept elements, ``1 - sparsity``."""
        return 1.0 - self.sparsity()

    def sparsities(self) -> dict[str, float]:
        """Per-tensor sparsity."""
        return {k: 1.0 - count_true(m) / m.numel() if m.numel() else 0.0 for k, m in self._data.items()}

    # -- algebra ----------------------------------------------------------------------------------------------
    def _combine(self, other: Mapping[str, torch.Tensor], op: str) -> Mask:
        if set(self) != set(other):
            missing, extra = sorted(set(self) - set(other)), sorted(set(other) - set(self))
            raise ValueError(f"cannot combine masks over different tensors: only left {missing}, only right {extra}")
        out = Mask()
        for k, m in self._data.items():
            o = other[k]
            if o.shape != m.shape:
                raise ValueError(f"mask shapes differ for {k!r}: {tuple(m.shape)} vs {tuple(o.shape)}")
            out[k] = (m & o) if op == "and" else (m | o)
        return out

    def __and__(self, other: Mapping[str, torch.Tensor]) -> Mask:
        return self._combine(other, "and")

    def __or__(self, other: Mapping[str, torch.Tensor]) -> Mask:
        return self._combine(other, "or")

    def clone(self) -> Mask:
        """A deep copy (new tensors)."""
        return Mask({k: m.clone() for k, m in self._data.items()})

    def equal(self, other: Mapping[str, torch.Tensor]) -> bool:
        """True if both masks cover the same tensors with identical values."""
        return set(self) == set(other) and all(torch.equal(m, other[k]) for k, m in self._data.items())

    # -- construction / checks ----------------------------------------------------------------------------------
    @classmethod
    def from_weights(cls, model: nn.Module, names: list[str] | None = None) -> Mask:
        """Build a mask that keeps exactly the non-zero entries of the named parameters.

        Args:
            model: The model whose parameters are read.
            names: Parameter names; default every Linear/Conv weight (see :func:`prunekit.targets.find_prunable`).
        """
        from prunekit.targets import find_prunable

        params = dict(model.named_parameters())
        if names is None:
            names = list(find_prunable(model))
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"no parameters named {missing} in {type(model).__name__}; known: {sorted(params)[:20]}")
        return cls({n: params[n].detach() != 0 for n in names})

    def check(self, model: nn.Module) -> None:
        """Raise ``ValueError`` unless every entry names a parameter of ``model`` with the same shape and device."""
        params = dict(model.named_parameters())
        unknown = [k for k in self._data if k not in params]
        if unknown:
            raise ValueError(
                f"mask names tensors that {type(model).__name__} does not have: {unknown}. "
                f"Was the mask made for another model? Parameters are named like {sorted(params)[:5]}"
            )
        bad = [
            f"{k}: mask {tuple(m.shape)} vs parameter {tuple(params[k].shape)}"
            for k, m in self._data.items()
            if m.shape != params[k].shape
        ]
        if bad:
            raise ValueError("mask shape does not match the parameter: " + "; ".join(bad))
