"""The Pruner: keeps boolean masks for a model's tensors and applies them in place, following a schedule.

Masks are applied by multiplying the weights in place (``torch._foreach_mul_``): there are no weight copies, no
forward hooks and no parametrizations, so parameters keep their identity (the user's optimizer keeps working) and
``copy.deepcopy``, ``state_dict``/``load_state_dict(strict=True)`` and ``torch.compile`` behave exactly as without
pruning. The model's ``state_dict`` keeps its original keys; the masks live in the Pruner (1 byte per element) and in
prunekit checkpoints (:mod:`prunekit.checkpoint`).
"""

from __future__ import annotations

import ctypes
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.graph import increment_version

from prunekit._fast import copy_into, count_true, ones_bool
from prunekit.masks import Mask
from prunekit.schedules import OneShot, Schedule, schedule_from_dict
from prunekit.scoring import CRITERIA, Criterion, get_criterion, score_tensors
from prunekit.select import ALLOCATIONS, select
from prunekit.targets import check_sparsity, find_prunable, match_overrides

__all__ = ["Pruner", "prune", "unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel``/``DataParallel``/``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile'd module
            model = model._orig_mod
        else:
            return model


class Pruner:
    """Prune a model in place: masks chosen by a criterion and an allocation rule, updated on a schedule.

    Call :meth:`step` once after every ``optimizer.step()``: it re-zeroes pruned weights and, when the schedule says
    so, recomputes the masks. Masks only gain zeros (unless ``regrow=True``).

    Args:
        model: The model (a ``DistributedDataParallel``/compiled wrapper is unwrapped).
        sparsity: Final target sparsity in [0, 1) over the pruned tensors that have no override.
        schedule: When and how far to prune (default :class:`~prunekit.OneShot`: everything at the first step).
        criterion: ``"magnitude"``, ``"random"`` or a callable ``criterion(name, weight) -> scores``.
        allocation: How the sparsity is spread over tensors: ``"global"`` (one threshold), ``"uniform"`` (same
            sparsity per tensor), ``"erk"`` or ``"lamp"``.
        include: Globs of parameter names to prune instead of the default Linear/Conv weights.
        exclude: Globs of parameter names never to prune.
        types: Module types whose weights are pruned by default.
        overrides: ``{glob: sparsity}``: matching tensors are pruned on their own to that final sparsity (following
            the same schedule) and take no part in the allocation.
        regrow: Let mask updates bring pruned weights back (they restart at zero).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from prunekit import Gradual
        >>> model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 2))
        >>> pruner = Pruner(model, sparsity=0.75, schedule=Gradual(start=0, end=10, every=5))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> for _ in range(11):
        ...     model(torch.randn(4, 20)).sum().backward(); opt.step(); opt.zero_grad()
        ...     _ = pruner.step()
        >>> round(pruner.masks.sparsity(), 4), pruner.step_count
        (0.75, 11)
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: float,
        *,
        schedule: Schedule | None = None,
        criterion: str | Criterion = "magnitude",
        allocation: str = "global",
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        types: Iterable[type[nn.Module]] | None = None,
        overrides: Mapping[str, float] | None = None,
        regrow: bool = False,
    ) -> None:
        self.model = unwrap(model)
        self.sparsity = check_sparsity(sparsity)
        self.schedule = schedule if schedule is not None else OneShot()
        if not isinstance(self.schedule, Schedule):
            raise TypeError(f"schedule must be a prunekit schedule (OneShot, Gradual, ...), got {schedule!r}")
        self.criterion = get_criterion(criterion)
        self.criterion_name = criterion if isinstance(criterion, str) else None
        if allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {allocation!r}; choose one of {sorted(ALLOCATIONS)}")
        self.allocation = allocation
        self.regrow = bool(regrow)
        self.params: dict[str, nn.Parameter] = find_prunable(self.model, include=include, exclude=exclude, types=types)
        self.overrides = match_overrides(self.params, overrides)
        self.masks = Mask({n: ones_bool(p) for n, p in self.params.items()})
        self.step_count = 0
        self._active = False  # True once a mask has pruned something: only then is there anything to re-zero
        self._param_list = list(self.params.values())
        self._mask_list = list(self.masks.values())
        self._batch: _NativeBatch | None = None  # re-zeroing call prepared for the current tensors (built on demand)

    # ---------------------------------------------------------------------------------------------------------------
    @property
    def target(self) -> float:
        """The schedule's target sparsity at the current step."""
        return self.schedule.sparsity(max(self.step_count - 1, 0), self.sparsity)

    def __repr__(self) -> str:
        return (
            f"Pruner({len(self.params)} tensors, sparsity={self.sparsity}, schedule={self.schedule}, "
            f"criterion={self.criterion_name or self.criterion!r}, allocation={self.allocation!r}, "
            f"step={self.step_count}, achieved={self.masks.sparsity():.4f})"
        )

    def step(self) -> bool:
        """Advance one training step: re-zero pruned weights, and update the masks if the schedule says so.

        Call it after ``optimizer.step()``.

        Returns:
            True if the masks were recomputed at this step.
        """
        t = self.step_count
        updated = self.schedule.updates_at(t)
        if updated:
            self.update(self.schedule.sparsity(t, self.sparsity), _step=t)
        else:
            self.apply()
        self.step_count = t + 1
        return updated

    def apply(self) -> None:
        """Zero the pruned weights in place (one multiply per masked tensor, no allocation)."""
        # No ``torch.no_grad()`` here: entering it costs more than re-zeroing a small model's weights with the native
        # kernel, which autograd never sees; the torch fallback in ``_mask_in_place`` enters it itself.
        if not self._active:
            return
        if self._batch is None or not self._batch.matches(self._param_list, self._mask_list):
            self._batch = _NativeBatch.build(self._param_list, self._mask_list)  # first call, or storage changed
        if self._batch is None:  # not float32 CPU, or no native library
            _mask_in_place(self._param_list, self._mask_list)
            return
        self._batch.run()
        increment_version(self._param_list)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradients of pruned weights (call between ``backward()`` and ``optimizer.step()`` if wanted).

        Not needed for correctness (:meth:`step` re-zeroes the weights), but it keeps momentum and Adam statistics of
        pruned weights at zero.
        """
        if self._active:
            grads = [p.grad for p in self._param_list]
            if any(g is None for g in grads):
                pairs = [(g, m) for g, m in zip(grads, self._mask_list) if g is not None]
                grads, masks = [g for g, _ in pairs], [m for _, m in pairs]
            else:
                masks = self._mask_list
            if grads:
                _mask_in_place(grads, masks)

    @torch.no_grad()
    def update(self, sparsity: float | None = None, *, _step: int | None = None) -> Mask:
        """Recompute the masks now for ``sparsity`` (default: the final target) and apply them.

        Overridden tensors get ``schedule.sparsity(step, override)`` at the same step. In a distributed job the masks
        are computed on every rank and then broadcast from rank 0, so all ranks hold identical masks.

        Returns:
            The new masks (also available as :attr:`masks`).
        """
        target = self.sparsity if sparsity is None else check_sparsity(sparsity)
        if _step is not None:  # scheduled update: overridden tensors follow the same schedule to their own target
            overrides = {n: self.schedule.sparsity(_step, s) for n, s in self.overrides.items()}
        else:  # manual update: overridden tensors scale with the requested fraction of the final target
            scale = min(1.0, target / self.sparsity) if self.sparsity else 1.0
            overrides = {n: s * scale for n, s in self.overrides.items()}
        scores = score_tensors(self.criterion, {n: p for n, p in self.params.items()})
        new = select(scores, target, self.allocation, overrides=overrides, current=self.masks, regrow=self.regrow)
        _broadcast(new)
        self._set_masks(new)
        emptied = [n for n, m in self.masks.items() if m.numel() > 1 and count_true(m) == 0]
        if emptied:
            others = [a for a in ("lamp", "erk") if a != self.allocation]
            warnings.warn(
                f"{emptied} are now 100% pruned (layer collapse: nothing passes through them). Use "
                f"allocation={' or '.join(repr(a) for a in others)}, or pin them with "
                "overrides={name: sparsity}.", stacklevel=2)
        return self.masks

    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Replace the masks (e.g. computed elsewhere, or a lottery ticket's) and apply them now.

        Raises:
            ValueError: If ``masks`` does not cover exactly the pruned tensors with matching shapes.
        """
        new = Mask(masks)
        missing, unexpected = sorted(set(self.params) - set(new)), sorted(set(new) - set(self.params))
        if missing or unexpected:
            raise ValueError(f"masks must cover exactly the pruned tensors: missing {missing}, unexpected {unexpected}")
        new.check(self.model)
        self._set_masks(new)

    def _set_masks(self, new: Mapping[str, torch.Tensor]) -> None:
        for name, m in new.items():
            copy_into(self.masks[name], m)  # in place: the mask tensors keep their identity and device
        self._active = self.masks.num_pruned() > 0
        self.apply()

    def remove(self) -> nn.Module:
        """Make pruning permanent: zero the weights a last time and drop the masks. Returns the model.

        The model is a plain ``nn.Module`` with zeros where weights were pruned; nothing of prunekit stays attached.
        """
        self.apply()
        self.masks = Mask()
        self.params = {}
        self._param_list, self._mask_list = [], []
        self._batch = None
        self._active = False
        return self.model

    # --- state -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain state: ``{"masks": {name: bool tensor}, "config": {...JSON-able...}}``."""
        return {
            "masks": {n: m.clone() for n, m in self.masks.items()},
            "config": {
                "step": self.step_count,
                "sparsity": self.sparsity,
                "schedule": self.schedule.to_dict(),
                "criterion": self.criterion_name,
                "allocation": self.allocation,
                "regrow": self.regrow,
                "overrides": dict(self.overrides),
                "tensors": list(self.params),
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore masks and schedule position from :meth:`state_dict` (strict about names and shapes).

        Raises:
            ValueError: If the stored masks name other tensors or shapes than this Pruner prunes.
        """
        masks = Mask(state["masks"])
        config = state.get("config", {})
        missing = sorted(set(self.params) - set(masks))
        unexpected = sorted(set(masks) - set(self.params))
        if missing or unexpected:
            raise ValueError(
                f"stored masks do not match the pruned tensors: missing {missing}, unexpected {unexpected}. "
                "Was the state saved from another model, or with other include/exclude patterns?"
            )
        self.set_masks(masks)
        if "step" in config:
            self.step_count = int(config["step"])
        if "schedule" in config:
            self.schedule = schedule_from_dict(config["schedule"])
        if "sparsity" in config:
            self.sparsity = check_sparsity(config["sparsity"])

    @classmethod
    def from_state_dict(cls, model: nn.Module, state: Mapping[str, Any],
                        criterion: str | Criterion | None = None) -> Pruner:
        """Rebuild a Pruner for ``model`` from :meth:`state_dict` (a custom criterion must be passed again)."""
        config = state["config"]
        crit = criterion if criterion is not None else config.get("criterion")
        if crit is None:
            raise ValueError(
                "the stored Pruner used a custom criterion function, which cannot be saved; pass criterion=... "
                f"to restore it (built-in criteria: {sorted(CRITERIA)})"
            )
        pruner = cls(
            model,
            config["sparsity"],
            schedule=schedule_from_dict(config["schedule"]),
            criterion=crit,
            allocation=config["allocation"],
            include=[glob_escape(n) for n in config["tensors"]],
            regrow=config["regrow"],
            overrides=dict(config.get("overrides") or {}),
        )
        pruner.load_state_dict(state)
        return pruner


_NUMPY_DTYPES = (torch.float32, torch.float64)


_NATIVE: Any = None  # prunekit.sparse._native's library (False: unavailable), loaded at the first re-zeroing


def _native_library() -> Any:
    global _NATIVE
    if _NATIVE is None:
        from prunekit.sparse import _native

        _NATIVE = _native.library(warn=False) or False
    return _NATIVE


class _NativeBatch:
    """Pointers of the masked tensors, ready for one ``mask_many_f32`` call per training step.

    Valid while every weight and mask keeps its storage (``Pruner.apply`` compares the data pointers on every call and
    rebuilds it otherwise, e.g. after ``param.data = ...`` or ``model.to(...)``). Only built when every tensor is a
    contiguous float32 CPU tensor with a bool mask of its size and the native library is available.
    """

    __slots__ = ("_args", "_fn", "mask_ptrs", "ptrs")

    def __init__(self, fn: Any, ptrs: list[int], mask_ptrs: list[int], numels: list[int]) -> None:
        n = len(ptrs)
        self._fn = fn
        self.ptrs, self.mask_ptrs = ptrs, mask_ptrs
        self._args = ((ctypes.c_void_p * n)(*ptrs), (ctypes.c_void_p * n)(*mask_ptrs), (ctypes.c_int64 * n)(*numels), n)

    @classmethod
    def build(cls, tensors: list[torch.Tensor], masks: list[torch.Tensor]) -> _NativeBatch | None:
        lib = _native_library()
        if not lib or not tensors:
            return None
        for t, m in zip(tensors, masks):
            if not (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() and m.is_contiguous()
                    and m.dtype == torch.bool and m.device.type == "cpu" and m.numel() == t.numel()):
                return None
        return cls(lib.mask_many_f32, [t.data_ptr() for t in tensors], [m.data_ptr() for m in masks],
                   [t.numel() for t in tensors])

    def matches(self, tensors: list[torch.Tensor], masks: list[torch.Tensor]) -> bool:
        return [t.data_ptr() for t in tensors] == self.ptrs and [m.data_ptr() for m in masks] == self.mask_ptrs

    def run(self) -> None:
        self._fn(*self._args, torch.get_num_threads())  # torch's split of the optimizer step: data stays core-local

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None  # a copy's tensors live elsewhere: the copied Pruner rebuilds its batch on first use


def _mask_in_place(tensors: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    """``t *= m`` for every pair, without allocating.

    Contiguous float32/float64 CPU tensors with bool masks go through prunekit's compiled loop (``w = m ? w : 0``,
    the library of :mod:`prunekit.sparse._native`, built once per machine), else through NumPy views
    (``np.multiply(w, m, out=w)``). Both are single-threaded passes, several times faster than torch's mixed
    float x bool kernel, which converts the mask element by element and opens a parallel region per tensor (on small
    layers that overhead dominates a training step); the compiled loop is about 2.5x faster again than NumPy's
    bool-to-float casting multiply. Autograd is told about the in-place write (version counters), exactly as
    ``mul_`` would. Everything else (GPU, half precision, strided tensors) uses ``torch._foreach_mul_``.
    """
    rest_t, rest_m = [], []
    fast = []
    lib = _native_library()
    for t, m in zip(tensors, masks):
        if t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES and t.is_contiguous() and m.is_contiguous():
            if lib and m.dtype == torch.bool and m.numel() == t.numel():
                kernel = lib.mask_f32 if t.dtype == torch.float32 else lib.mask_f64
                kernel(t.data_ptr(), m.data_ptr(), t.numel())
            else:
                w = t.detach().numpy()
                np.multiply(w, m.numpy(), out=w)
            fast.append(t)
        else:
            rest_t.append(t)
            rest_m.append(m)
    if fast:
        increment_version(fast)
    if rest_t:
        with torch.no_grad():
            torch._foreach_mul_(rest_t, rest_m)


def glob_escape(name: str) -> str:
    """Escape glob metacharacters so ``name`` matches only itself in include/exclude patterns."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def _broadcast(masks: Mask) -> None:
    """Make masks identical on every rank of an initialised process group (rank 0 wins)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    flat = torch.cat([m.reshape(-1) for m in masks.values()]).to(torch.uint8)
    if dist.get_backend() == "nccl":  # pragma: no cover - no GPU here
        flat = flat.cuda()
    dist.broadcast(flat, src=0)
    flat = flat.cpu().bool()
    offset = 0
    for name, m in list(masks.items()):
        masks[name] = flat[offset : offset + m.numel()].view(m.shape).to(m.device)
        offset += m.numel()


def prune(
    model: nn.Module,
    sparsity: float,
    *,
    criterion: str | Criterion = "magnitude",
    allocation: str = "global",
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    overrides: Mapping[str, float] | None = None,
) -> Pruner:
    """One-shot pruning in place: zero the lowest-scoring weights now.

    Returns the :class:`Pruner` holding the masks; keep calling its :meth:`~Pruner.step` after each optimizer step
    while fine-tuning so pruned weights stay zero, or call :meth:`~Pruner.remove` to keep just the zeros.

    Examples:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))
        >>> pruner = prune(model, sparsity=0.9)
        >>> round(pruner.masks.sparsity(), 3), int((model[0].weight != 0).sum() + (model[2].weight != 0).sum())
        (0.9, 1100)
    """
    pruner = Pruner(
        model, sparsity, schedule=OneShot(), criterion=criterion, allocation=allocation,
        include=include, exclude=exclude, overrides=overrides,
    )
    pruner.step()
    return pruner
