"""Apply a structured-pruning plan to a model: physically (smaller tensors) or softly (pruned slices zeroed).

Physical application replaces each pruned parameter by a new, smaller ``nn.Parameter`` (``index_select`` of the kept
slices; tied weights stay tied), slices buffers the same way, puts replacement modules in place and sets the module
attributes the plan lists. It then runs the example inputs through the model and checks that it runs, that its
outputs keep their shapes and, for a plan made in this process, that every operation produces the shape the plan
predicts — a module that computes a size from an attribute the plan did not update is caught there, even where the
shapes happen to fit. On failure every change is rolled back and the error names the module.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from prunekit.flops import _split_inputs, count_macs, count_params
from prunekit.structured.modules import REPLACEMENTS

if TYPE_CHECKING:
    from prunekit.structured.planning import Plan

__all__ = ["PlanApplyError", "apply_plan", "structural_copy"]

_MISSING = object()


class PlanApplyError(RuntimeError):
    """A plan does not fit the model, or the pruned model fails its check run (the model is left unchanged).

    Attributes:
        module: Name of the module the pruned model failed in ("" for the model's own forward), None if unknown.
        op: Index (in the trace's operations) of the first operation whose output shapes in the pruned model differ
            from the plan's prediction, None if none did before the failure (or the shapes were not compared).
    """

    def __init__(self, message: str, module: str | None = None, op: int | None = None) -> None:
        super().__init__(message)
        self.module = module
        self.op = op


def _tensor_owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, bool]]]:
    """id(tensor) -> every (module, attribute name, is_parameter) holding it (tied weights have several)."""
    owners: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    seen: set[int] = set()
    for m in model.modules():
        if id(m) in seen:
            continue
        seen.add(id(m))
        for attr, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((m, attr, True))
        for attr, b in m._buffers.items():
            if b is not None:
                owners.setdefault(id(b), []).append((m, attr, False))
    return owners


def _lookup(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    tensor = None
    if module is not None:
        tensor = module._parameters.get(attr, None)
        if tensor is None:
            tensor = module._buffers.get(attr, None)
    if tensor is None:
        raise PlanApplyError(f"the plan prunes tensor {name!r}, which {type(model).__name__} does not have: the plan "
                             "was made for another model definition")
    return tensor


def check_fits(plan: Plan, model: nn.Module) -> None:
    """Raise :class:`PlanApplyError` unless the model has as many parameters as the one the plan was made for and
    every tensor the plan prunes exists with the size it expects."""
    for s in plan.slices:
        t = _lookup(model, s.name)
        if s.dim >= t.dim() or t.shape[s.dim] != s.size:
            got = tuple(t.shape)
            raise PlanApplyError(
                f"tensor {s.name!r} has shape {got}; the plan expects size {s.size} along dim {s.dim}. The plan was "
                "made for another model, or it was already applied to this one (apply it to a fresh instance)."
            )
    if plan.params and plan.slices:  # every pruned tensor fits, yet the model is bigger (resnet18's plan, resnet34)
        have = count_params(model)
        if have != plan.params[0]:
            raise PlanApplyError(
                f"the plan was made for a {plan.params[0]:,}-parameter model and this {type(model).__name__} has "
                f"{have:,}: it is another model (or the plan was already applied to it). Make a plan for this model, "
                "or apply this one to a fresh instance of the model it was made for."
            )


def structural_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules that shares its parameters and buffers (physical pruning never writes into
    tensors, it replaces them, so the original stays intact while the copy is pruned)."""
    memo: dict[int, Any] = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def apply_plan(plan: Plan, model: nn.Module, *, soft: bool = False, example_inputs: Any = None,
               verify: bool = True, config: str = "off") -> int | None:
    """Apply ``plan`` to ``model`` in place (see :meth:`prunekit.structured.Plan.apply`).

    ``config``: what to do with a transformers model's ``config`` after physical pruning: ``"off"`` (leave it; the
    internal trial copies), ``"sync"`` (write the sizes it can describe, :func:`prunekit.structured.hf.sync_config`)
    or ``"warn"`` (also warn about what it cannot describe).

    Returns:
        The pruned model's MACs on the example inputs if the check ran, else None.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_fits(plan, model)
    if soft:
        _soft(plan, model)
        return None
    undo: list[tuple[Any, ...]] = []
    macs = None
    inputs = example_inputs if example_inputs is not None else plan.example_inputs
    own = example_inputs is None or example_inputs is plan.example_inputs
    # Other inputs than the plan's (e.g. another batch size after loading): the plan's recorded output and
    # per-operation shapes do not apply, so the expected output shapes come from the unpruned model on them.
    outputs = None if own or not verify or inputs is None else _output_shapes(model, inputs)
    try:
        _physical(plan, model, undo)
        if verify and inputs is not None:
            macs = _verify(plan, model, inputs, output_shapes=outputs)
    except BaseException:
        for kind, obj, attr, old in reversed(undo):
            if kind == "attr":
                if old is _MISSING:
                    delattr(obj, attr)
                else:
                    setattr(obj, attr, old)
            else:
                getattr(obj, kind)[attr] = old
        raise
    if config != "off":
        _sync_configs(model, warn=config == "warn")
    return macs


def _sync_configs(model: nn.Module, *, warn: bool) -> None:
    """Update the config of every (outermost) transformers model inside ``model``; warn where it cannot."""
    from prunekit.structured.hf import _hf_config, sync_config

    seen: set[int] = set()
    for name, module in model.named_modules():
        config = _hf_config(module)
        if config is None or id(config) in seen:
            continue
        seen.add(id(config))
        notes = sync_config(module)
        if notes and warn:
            where = f" ({name})" if name else ""
            warnings.warn(f"prunekit.structured: {type(module).__name__}{where}: " + "; ".join(notes), stacklevel=4)


@torch.no_grad()
def _soft(plan: Plan, model: nn.Module) -> None:
    for s in plan.slices:
        t = _lookup(model, s.name)
        if not isinstance(t, nn.Parameter):
            continue  # buffers (running statistics) stay: the zeroed scale and shift already silence the channel
        pruned = torch.ones(s.size, dtype=torch.bool)
        pruned[list(s.keep)] = False
        t.index_fill_(s.dim, pruned.nonzero().squeeze(1).to(t.device), 0)


def _physical(plan: Plan, model: nn.Module, undo: list[tuple[Any, ...]]) -> None:
    # 1. replacement modules (they share the old module's tensors, so names keep resolving)
    for u in plan.modules:
        if u.replace is None:
            continue
        if u.replace not in REPLACEMENTS:
            raise PlanApplyError(f"the plan replaces module {u.name!r} by {u.replace!r}, which this prunekit does not "
                                 f"know; known replacements: {sorted(REPLACEMENTS)}")
        old = model.get_submodule(u.name)
        new = REPLACEMENTS[u.replace](old)
        for parent in model.modules():
            for attr, child in list(parent._modules.items()):
                if child is old:
                    undo.append(("_modules", parent, attr, old))
                    parent._modules[attr] = new
    # 2. tensors: index_select the kept slices, one new tensor per pruned tensor, set on every owner
    owners = _tensor_owners(model)
    by_tensor: dict[str, list[Any]] = {}
    for s in plan.slices:
        by_tensor.setdefault(s.name, []).append(s)
    with torch.no_grad():
        for name, slices in by_tensor.items():
            old = _lookup(model, name)
            data = old.detach()
            for s in slices:
                data = data.index_select(s.dim, torch.tensor(s.keep, dtype=torch.long, device=data.device))
            data = data.contiguous()
            new: torch.Tensor = nn.Parameter(data, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) \
                else data
            for module, attr, is_param in owners.get(id(old), []):
                kind = "_parameters" if is_param else "_buffers"
                undo.append((kind, module, attr, old))
                getattr(module, kind)[attr] = new
    # 3. attributes
    for u in plan.modules:
        module = model.get_submodule(u.name)
        for attr, value in u.set.items():
            undo.append(("attr", module, attr, getattr(module, attr, _MISSING)))
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)


class _Recorder(TorchDispatchMode):
    def __init__(self, stack: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.stack = stack
        self.ops: list[tuple[str, str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        shapes = [tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.ops.append((str(func), self.stack[-1][0], shapes))
        return out


def _inside(module: str, prefixes: Sequence[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@torch.no_grad()
def _output_shapes(model: nn.Module, example_inputs: Any) -> list[tuple[int, ...]]:
    """Shapes of the tensors ``model`` returns on ``example_inputs`` (eval mode, restored after)."""
    args, kwargs = _split_inputs(example_inputs)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        output = model(*args, **kwargs)
    finally:
        for m, mode in modes:
            m.training = mode
    return [tuple(t.shape) for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]


def _same_shapes(want: list[tuple[int, ...]], got: list[tuple[int, ...]]) -> bool:
    """``got`` has ``want``'s shapes, where -1 in ``want`` stands for any size (a size that depends on the data)."""
    return len(want) == len(got) and all(
        len(w) == len(g) and all(a in (-1, b) for a, b in zip(w, g)) for w, g in zip(want, got))


def _verify(plan: Plan, model: nn.Module, example_inputs: Any,
            output_shapes: list[tuple[int, ...]] | None = None) -> int:
    """Run the pruned model; check it runs, keeps its output shapes and produces the shapes the plan predicts.
    Returns its MACs (the run is :func:`prunekit.flops.count_macs`'s).

    ``output_shapes``: the unpruned model's output shapes on ``example_inputs`` when these are not the inputs the
    plan was made with; the plan's per-operation shapes are then not compared (they depend on the inputs)."""
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[tuple[str, nn.Module]] = [("", model)]
    result: list[Any] = []

    def pre(module: nn.Module, args: Any) -> None:
        if id(module) in names and module is not model:
            stack.append((names[id(module)], module))

    def post(module: nn.Module, args: Any, output: Any) -> None:
        if module is model:
            result.append(output)
        elif id(module) in names and stack[-1][1] is module:
            stack.pop()

    _split_inputs(example_inputs)
    recorder = _Recorder(stack)
    h1 = module_hooks.register_module_forward_pre_hook(pre)
    h2 = module_hooks.register_module_forward_hook(post)
    try:
        with recorder:
            macs = count_macs(model, example_inputs, per_module=False).total
        output = result[-1]
    except Exception as exc:
        deviation = _first_deviation(plan, model, recorder.ops) if output_shapes is None else None
        if deviation is not None:  # an earlier operation already produced other sizes than predicted: the cause
            raise deviation from exc
        name, module = stack[-1]
        kind = type(module).__name__
        where = f"module {name!r} ({kind})" if name else f"the model's forward ({kind})"
        raise PlanApplyError(
            f"the pruned model fails in {where}: {type(exc).__name__}: {exc}. The module probably keeps a size in an "
            "attribute or constant that the plan does not update: register a handler for it "
            "(prunekit.structured.register_handler) that returns the new attribute values, or keep it whole with "
            "leaves=[...]/ignore=[...]. The model was left unchanged.", module=name
        ) from exc
    finally:
        h1.remove()
        h2.remove()
    got = [tuple(t.shape) for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
    want_shapes = output_shapes if output_shapes is not None else plan.output_shapes
    by_data = plan.output_shapes is not None and any(-1 in s for s in plan.output_shapes)
    if by_data and want_shapes is not None:  # sizes that depend on the data: compare ranks
        want_shapes = [tuple(-1 for _ in s) for s in want_shapes]
    if want_shapes is not None and not _same_shapes([tuple(s) for s in want_shapes], got):
        raise PlanApplyError(f"the pruned model's outputs have shapes {got}, the original's {want_shapes}; the "
                             "model was left unchanged")
    expected = plan.expected_ops if output_shapes is None else None
    if expected is None:
        return macs
    skip = [u.name for u in plan.modules if u.replace is not None]
    want = [e for e in expected if not _inside(e[1], skip)]
    seen = [e for e in recorder.ops if not _inside(e[1], skip)]
    if [e[0] for e in want] != [e[0] for e in seen]:
        if by_data:  # detection post-processing: the plan's note says so
            return macs
        warnings.warn("prunekit.structured: the pruned model ran another sequence of operations than the traced one "
                      "(shape-dependent control flow), so its per-operation shapes were not compared; it runs and its "
                      "outputs have the right shapes", stacklevel=3)
        return macs
    deviation = _first_deviation(plan, model, recorder.ops)
    if deviation is not None:
        raise deviation
    return macs


def _first_deviation(plan: Plan, model: nn.Module, ops: list[tuple[str, str, list[tuple[int, ...]]]]
                     ) -> PlanApplyError | None:
    """The error for the first operation whose shapes in the pruned model's run (``ops``, possibly cut short by a
    failure) differ from the plan's prediction, comparing while both run the same operations; None if none does."""
    skip = [u.name for u in plan.modules if u.replace is not None]
    want = [(i, e) for i, e in enumerate(plan.expected_ops or []) if not _inside(e[1], skip)]
    seen = [e for e in ops if not _inside(e[1], skip)]
    for (index, (op, module, shapes)), (got_op, _, actual) in zip(want, seen):
        if got_op != op:
            return None  # another sequence of operations from here on: nothing to compare
        if shapes is not None and not _same_shapes([tuple(s) for s in shapes], actual):  # None: opaque module
            where = f"module {module!r} ({type(model.get_submodule(module)).__name__})" if module else "the model"
            return PlanApplyError(
                f"in the pruned model, {op} in {where} produces shapes {actual} where the plan expects {shapes}: the "
                "module computes a size from an attribute or constant that the plan does not update, so its channels "
                "would be silently mixed up. Register a handler for it (prunekit.structured.register_handler) that "
                "returns the new attribute values, or keep it whole with leaves=[...]. The model was left unchanged.",
                module=module, op=index,
            )
    return None
