"""Checkpoints: model weights, pruning masks and schedule position, optimizer and LR-scheduler state in one file.

The file is a prunekit safetensors file (:mod:`prunekit.fileformat`; no pickle). The model's tensors are stored under
their own ``state_dict`` keys (prefix ``model/``), so the weights load strictly into a fresh instance of the
architecture; masks are stored as ``bool`` tensors under ``mask/``. A resumed run continues with identical masks.

With ``save(..., compress=True)`` every tensor is stored in whichever compressed layout is smallest for it
(:mod:`prunekit.compress`: entropy-coded positions of the non-zeros and split, entropy-coded values; dense tensors
never grow) and a mask that equals its weight's non-zero pattern takes no room at all. ``compress="fp16"``,
``"int8"`` or ``"kmeans"`` (or a :class:`~prunekit.compress.Compression`) also rounds the values of the model's
weight matrices and convolution kernels (floating-point tensors with two or more dimensions); positions, biases,
normalisation parameters, masks and optimizer state stay exact. :func:`load` reads every variant.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit._fast import copy_into
from prunekit.compress import Compression
from prunekit.fileformat import FileFormatError, pack, read, unpack, write
from prunekit.pruner import Pruner, unwrap
from prunekit.scoring import CRITERIA, Criterion

__all__ = ["Checkpoint", "load", "load_weights", "save"]

KIND = "checkpoint"


@dataclass
class Checkpoint:
    """What :func:`load` restored.

    Attributes:
        model: The model, with the stored weights loaded.
        pruner: The Pruner with its masks and schedule position, or None if the file holds no pruning state.
        extra: The JSON-able ``extra`` document given to :func:`save` (e.g. epoch, metrics).
    """

    model: nn.Module
    pruner: Pruner | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _fingerprint(state: Mapping[str, torch.Tensor]) -> dict[str, list[Any]]:
    return {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in state.items()}


def _check_fit(model: nn.Module, own: Mapping[str, tuple[int, ...]], stored: Mapping[str, tuple[int, ...]],
               what: str) -> None:
    """Raise a ValueError listing every missing, unexpected and shape-mismatched tensor (``own``/``stored``: shapes
    by ``state_dict`` key; ``what`` starts the message, e.g. "file.pth holds weights that")."""
    missing = sorted(set(own) - set(stored))
    unexpected = sorted(set(stored) - set(own))
    mismatched = [f"{k}: file {tuple(stored[k])} vs model {tuple(own[k])}"
                  for k in sorted(set(own) & set(stored)) if tuple(own[k]) != tuple(stored[k])]
    if missing or unexpected or mismatched:
        def cut(items: list[str]) -> str:
            return f"{items[:10]}{' ...' if len(items) > 10 else ''}"

        raise ValueError(
            f"{what} does not fit this {type(model).__name__}: missing {cut(missing)}, unexpected {cut(unexpected)}, "
            f"shape mismatch {cut(mismatched)}. Build the same architecture (and configuration) that was saved."
        )


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


try:  # BatchNorm's loader only fills in a missing num_batches_tracked, which a strict load never lacks
    from torch.nn.modules.batchnorm import _NormBase

    _PLAIN_LOADERS: tuple[Any, ...] = (nn.Module._load_from_state_dict, _NormBase._load_from_state_dict)
except (ImportError, AttributeError):  # pragma: no cover - other torch layouts
    _PLAIN_LOADERS = (nn.Module._load_from_state_dict,)


def _plain(model: nn.Module) -> bool:
    """Whether ``model.load_state_dict`` would only copy each tensor into the one ``model.state_dict()`` returns:
    no module changes how its state is saved or loaded (overrides, extra state, hooks)."""
    base = nn.Module
    for m in model.modules():
        cls = type(m)
        if (cls._load_from_state_dict not in _PLAIN_LOADERS or cls._save_to_state_dict is not base._save_to_state_dict
                or cls.state_dict is not base.state_dict or cls.load_state_dict is not base.load_state_dict
                or cls.get_extra_state is not base.get_extra_state or cls.set_extra_state is not base.set_extra_state
                or m._load_state_dict_pre_hooks
                or m._load_state_dict_post_hooks or m._state_dict_hooks or m._state_dict_pre_hooks):
            return False
    return True


def _apply(model: nn.Module, state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], plain: bool) -> None:
    """Load the checked ``state`` into ``model`` (``own``: its ``state_dict()``; ``plain``: :func:`_plain` of it). For
    a plain model this is the copies ``load_state_dict`` would make, without its per-module bookkeeping (tensors
    decoded straight into the model are already in place); any other model goes through ``load_state_dict``."""
    if not plain:
        model.load_state_dict(state, strict=True)
        return
    with torch.no_grad():
        for k, dst in own.items():
            src = state[k]
            if src is not dst:
                copy_into(dst, src) if src.device == dst.device else dst.copy_(src)


def _load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with an error that lists every missing, unexpected and
    mismatched tensor (``what`` starts the message, e.g. "file.pth holds weights that")."""
    own = model.state_dict()
    _check_fit(model, _shapes(own), _shapes(state), what)
    _apply(model, state, own, _plain(model))


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load weights into ``model`` strictly from a prunekit checkpoint or a third-party ``.pt``/``.pth`` state dict.

    Third-party files are read with ``torch.load(..., weights_only=True)``: tensors and plain containers only, no
    arbitrary objects are unpickled. A ``{"state_dict": {...}}`` wrapper is unwrapped.

    Returns:
        ``model``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for unreadable or unsafe files
            raise FileFormatError(f"cannot read {path} as a weights-only PyTorch file: {exc}") from None
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise FileFormatError(f"{path} does not hold a state dict of tensors (got {type(state).__name__})")
        _load_strict(unwrap(model), state, f"{path} holds weights that")
        return model
    load(path, model)
    return model


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    pruner: Pruner | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    extra: Mapping[str, Any] | None = None,
    compress: bool | str | Compression | None = False,
) -> Path:
    """Save a (pruned) model and, optionally, everything needed to resume training, atomically.

    Args:
        model: The model (wrappers such as DistributedDataParallel are unwrapped).
        path: Destination file (conventionally ``*.safetensors`` or ``*.pk``).
        pruner: The Pruner whose masks and schedule position to store.
        optimizer: Optimizer whose state to store.
        scheduler: LR scheduler (anything with ``state_dict()``) whose state to store.
        extra: A JSON-able document stored alongside (epoch, metrics, command line, ...).
        compress: False: tensors as they are. True or ``"lossless"``: compressed, bit-exact (negative zeros are
            stored as +0.0). ``"fp16"``, ``"int8"``, ``"kmeans"`` or a :class:`~prunekit.compress.Compression`:
            compressed, with lossy values for the weight matrices / kernels (zeros stay zero).

    Returns:
        The path written.

    Examples:
        >>> import tempfile
        >>> from torch import nn
        >>> import prunekit
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> pruner = prunekit.prune(model, sparsity=0.5)
        >>> path = save(model, tempfile.mkdtemp() + "/ckpt.safetensors", pruner=pruner, extra={"epoch": 3})
        >>> ckpt = load(path, nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> ckpt.pruner.masks.equal(pruner.masks), ckpt.extra
        (True, {'epoch': 3})
        >>> packed = save(model, tempfile.mkdtemp() + "/ckpt.pk", pruner=pruner, compress=True)
        >>> again = load(packed, nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> torch.equal(again.model[0].weight, model[0].weight), again.pruner.masks.equal(pruner.masks)
        (True, True)
    """
    comp = Compression.parse(compress)
    model = unwrap(model)
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {f"model/{k}": v for k, v in state.items()}
    meta: dict[str, Any] = {"model": {"class": type(model).__name__, "tensors": _fingerprint(state)},
                            "extra": dict(extra or {})}
    if pruner is not None:
        if pruner.model is not model:
            raise ValueError("the pruner belongs to another model than the one being saved")
        pstate = pruner.state_dict()
        tensors.update({f"mask/{k}": v for k, v in pstate["masks"].items()})
        meta["pruner"] = pstate["config"]
    if optimizer is not None:
        meta["optimizer"] = pack(optimizer.state_dict(), "optimizer", tensors)
        meta["optimizer_class"] = type(optimizer).__name__
        meta["optimizer_shapes"] = [[list(p.shape) for p in g["params"]] for g in optimizer.param_groups]
    if scheduler is not None:
        meta["scheduler"] = pack(scheduler.state_dict(), "scheduler", tensors)
        meta["scheduler_class"] = type(scheduler).__name__
    if comp is None:
        return write(path, tensors, meta, kind=KIND)
    exact = Compression(keep_negative_zero=comp.keep_negative_zero)
    per_tensor = {
        name: comp if name.startswith("model/") and t.is_floating_point() and t.dim() >= 2 else exact
        for name, t in tensors.items()
    }
    patterns = {name: "model/" + name.removeprefix("mask/") for name in tensors if name.startswith("mask/")}
    return write(path, tensors, meta, kind=KIND, compression=per_tensor, patterns=patterns)


def load(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    criterion: str | Criterion | None = None,
    map_location: str | torch.device = "cpu",
) -> Checkpoint:
    """Load a checkpoint written by :func:`save` into ``model`` (strictly) and rebuild the Pruner.

    Args:
        path: The checkpoint file.
        model: A fresh instance of the same architecture; its weights are overwritten.
        optimizer: If given, its state is restored (the file must hold optimizer state).
        scheduler: If given, its state is restored.
        criterion: Needed only if the Pruner was built with a custom criterion function.
        map_location: Device for the loaded tensors.

    Returns:
        A :class:`Checkpoint` with the model, the Pruner (or None) and the ``extra`` document.

    Raises:
        prunekit.fileformat.FileFormatError: If the file is missing, corrupted or not a checkpoint. Files are
            verified (checksum, names and shapes against ``model``) before anything is written into the model; only
            a payload that passes its checksum and still fails to decode (a writer bug) can leave the model's weights
            partly overwritten, and that too is this error.
        ValueError: If the checkpoint was saved from another model (lists missing, unexpected and mismatched tensors),
            if ``optimizer``/``scheduler`` is of another class than the stored state or (optimizer) has other
            parameter groups or shapes, or if the stored Pruner needs ``criterion``. All of this is checked before
            anything is loaded; should the optimizer or scheduler state still fail to load, both are left exactly as
            they were, and the model is written only after they have loaded.
    """
    model = unwrap(model)
    own = model.state_dict()

    def check(stored: dict[str, tuple[tuple[int, ...], str]], meta: dict[str, Any]) -> None:
        _check_fit(model, _shapes(own), {k.removeprefix("model/"): v[0] for k, v in stored.items()
                                         if k.startswith("model/")},
                   f"{path} holds a checkpoint of a {meta.get('model', {}).get('class', '?')} that")
        _check_resume_state(path, meta, stored, optimizer, scheduler, criterion)

    # the model's own tensors are the decoder's destinations (checked first: a file that does not fit writes nothing);
    # with an optimizer or scheduler the file is decoded aside, so their loading can fail before the model is touched
    plain = _plain(model)
    into = {f"model/{k}": v for k, v in own.items()} if plain and optimizer is None and scheduler is None else None
    tensors, meta = read(path, kind=KIND, device=map_location, into=into, check=check)
    _load_resume_state(path, meta, tensors, optimizer, scheduler)
    _apply(model, {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}, own, plain)
    pruner = None
    if "pruner" in meta:
        masks = {k.removeprefix("mask/"): v for k, v in tensors.items() if k.startswith("mask/")}
        pruner = Pruner.from_state_dict(model, {"masks": masks, "config": meta["pruner"]}, criterion=criterion)
    return Checkpoint(model=model, pruner=pruner, extra=meta.get("extra", {}))


# per-parameter state of torch.optim's optimizers that has the parameter's shape
_SHAPED_STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "square_avg", "acc_delta", "grad_avg",
                 "sum", "exp_inf", "ax", "prev", "step_size")


class _TensorNames(dict):  # type: ignore[type-arg]
    """Stands in for the tensors when unpacking a stored state only to look at its structure: each tensor is its
    name."""

    def __missing__(self, key: str) -> str:
        return key


def _describe(obj: Any) -> str:
    """How to refer to an optimizer or scheduler in a message, e.g. ``"torch.optim.SGD"``."""
    cls = type(obj)
    module = cls.__module__
    if module.startswith("torch.optim."):
        module = "torch.optim.lr_scheduler" if module.startswith("torch.optim.lr_scheduler") else "torch.optim"
    return f"{module}.{cls.__qualname__}"


def _check_optimizer(path: str | os.PathLike[str], meta: Mapping[str, Any], optimizer: torch.optim.Optimizer,
                     stored: Mapping[str, tuple[tuple[int, ...], str]]) -> None:
    """Raise a ValueError if the optimizer state in ``meta`` cannot be loaded into ``optimizer``: another optimizer
    class, another number or size of parameter groups, other parameter shapes, or a malformed state (``stored``: shape
    and dtype of each stored tensor by name)."""
    given = type(optimizer).__name__
    recorded = meta.get("optimizer_class")  # files written before it was stored do not have it
    if recorded is not None and recorded != given:
        raise ValueError(
            f"{path} holds optimizer state of class {recorded}, but the optimizer given is {_describe(optimizer)}. "
            f"Build a {recorded} over the model's parameters to resume, or load without optimizer= and start the "
            f"{given} afresh."
        )
    fix = ("Build the optimizer exactly as in the saved run (same parameters, in the same order and groups), or "
           "load without optimizer= to start it afresh.")
    state = unpack(meta["optimizer"], _TensorNames())
    groups = state.get("param_groups") if isinstance(state, dict) else None
    per_param = state.get("state") if isinstance(state, dict) else None
    if (not isinstance(groups, list) or not isinstance(per_param, dict)
            or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        raise FileFormatError(f"{path}: the stored optimizer state is malformed (expected 'state' and "
                              "'param_groups' with 'params' lists); re-create the checkpoint")
    own = optimizer.param_groups
    if len(groups) != len(own):
        raise ValueError(f"{path} holds optimizer state for {len(groups)} parameter group(s), but the given {given} "
                         f"has {len(own)}. {fix}")
    sizes = [len(g["params"]) for g in groups]
    own_sizes = [len(g["params"]) for g in own]
    if sizes != own_sizes:
        raise ValueError(f"{path} holds optimizer state for parameter groups of sizes {sizes}, but the given {given} "
                         f"has groups of sizes {own_sizes}: it was built for another model or parameter list. {fix}")
    ids = {i for g in groups for i in g["params"]}
    stray = [k for k in per_param if k not in ids]
    if stray or not all(isinstance(v, dict) for v in per_param.values()):
        raise FileFormatError(f"{path}: the stored optimizer state refers to parameters {stray[:5]} that are in no "
                              "parameter group, or holds a non-dict entry; re-create the checkpoint")
    params = list(zip((i for g in groups for i in g["params"]), (p for g in own for p in g["params"])))
    shapes = meta.get("optimizer_shapes")  # files written before they were stored do not have them
    if shapes is not None:
        bad = [f"group {i} parameter {j}: file {tuple(a)} vs optimizer {tuple(p.shape)}"
               for i, (saved, g) in enumerate(zip(shapes, own)) for j, (a, p) in enumerate(zip(saved, g["params"]))
               if tuple(a) != tuple(p.shape)]
    elif type(optimizer).__module__.startswith("torch.optim"):  # the per-parameter state of torch's optimizers
        entries = [(i, p, key, per_param[i][key]) for i, p in params if i in per_param for key in _SHAPED_STATE
                   if isinstance(per_param[i].get(key), str) and per_param[i][key] in stored]
        bad = [f"parameter {i} {key}: file {tuple(stored[name][0])} vs optimizer {tuple(p.shape)}"
               for i, p, key, name in entries if tuple(stored[name][0]) != tuple(p.shape)]
    else:
        bad = []
    if bad:
        raise ValueError(f"{path} holds optimizer state for parameters of other shapes than the given {given}'s "
                         f"({bad[:5]}{' ...' if len(bad) > 5 else ''}): it was built for another model. {fix}")


def _check_resume_state(path: str | os.PathLike[str], meta: Mapping[str, Any],
                        stored: Mapping[str, tuple[tuple[int, ...], str]], optimizer: torch.optim.Optimizer | None,
                        scheduler: Any | None, criterion: str | Criterion | None) -> None:
    """Check everything about the optimizer, scheduler and Pruner state in ``meta`` that can be checked before
    anything is loaded (``stored``: shape and dtype of each stored tensor by name).

    Raises:
        FileFormatError: If the file lacks the state asked for, or holds a malformed one.
        ValueError: If the state does not fit the given optimizer or scheduler, or the Pruner needs ``criterion``.
    """
    if optimizer is not None:
        if "optimizer" not in meta:
            raise FileFormatError(f"{path} holds no optimizer state; save it with save(..., optimizer=opt)")
        _check_optimizer(path, meta, optimizer, stored)
    if scheduler is not None:
        if "scheduler" not in meta:
            raise FileFormatError(f"{path} holds no scheduler state; save it with save(..., scheduler=sched)")
        recorded, given = meta.get("scheduler_class"), type(scheduler).__name__
        if recorded is not None and recorded != given:
            raise ValueError(
                f"{path} holds LR-scheduler state of class {recorded}, but the scheduler given is "
                f"{_describe(scheduler)}. Build a {recorded} to resume, or load without scheduler= and start the "
                f"{given} afresh."
            )
    if "pruner" in meta and criterion is None and isinstance(meta["pruner"], dict) \
            and meta["pruner"].get("criterion") is None:
        raise ValueError(
            f"{path}: the stored Pruner used a custom criterion function, which cannot be saved; pass criterion=... "
            f"to restore it (built-in criteria: {sorted(CRITERIA)})"
        )


def _load_state(path: str | os.PathLike[str], obj: Any, packed: Any, tensors: Mapping[str, torch.Tensor],
                what: str) -> None:
    """``obj.load_state_dict`` of the stored ``what`` (``"optimizer"``/``"scheduler"``), torch's errors turned into
    one that says what to do."""
    try:
        obj.load_state_dict(unpack(packed, tensors))
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError) as exc:
        raise ValueError(
            f"{path}: its {what} state does not load into this {type(obj).__name__} ({type(exc).__name__}: {exc}); "
            f"it was probably saved from another class or configuration. Build the {what} the run was saved with, or "
            f"load without {what}= to start it afresh."
        ) from None


def _load_resume_state(path: str | os.PathLike[str], meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                       optimizer: torch.optim.Optimizer | None, scheduler: Any | None) -> None:
    """Load the optimizer and scheduler state, or leave both exactly as they were and raise a ValueError.

    Loading replaces whole attributes (``state``, ``param_groups``, ...) rather than changing tensors in place, so
    keeping the attribute dictionaries from before is enough to undo a failed or unusable load."""
    saved = [(obj, dict(obj.__dict__)) for obj in (optimizer, scheduler) if obj is not None]
    try:
        if optimizer is not None:
            keys = [set(g) for g in optimizer.param_groups]
            _load_state(path, optimizer, meta["optimizer"], tensors, "optimizer")
            missing = sorted({k for g, before in zip(optimizer.param_groups, keys) for k in before - set(g)})
            if missing:
                raise ValueError(
                    f"{path}: its optimizer state lacks the settings {missing} that this {type(optimizer).__name__} "
                    "needs; it was saved from another optimizer class. Build the optimizer the run was saved with, "
                    "or load without optimizer= to start it afresh."
                )
        if scheduler is not None:
            _load_state(path, scheduler, meta["scheduler"], tensors, "scheduler")
    except BaseException:
        for obj, attributes in saved:
            obj.__dict__.clear()
            obj.__dict__.update(attributes)
        raise
