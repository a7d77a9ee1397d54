"""Trace a model once at the ATen level and propagate channel labels through every operation.

Why ATen-level tracing under a ``TorchDispatchMode`` rather than ``torch.fx`` / ``torch.export``: the model simply
runs on the user's ``example_inputs``, so anything that runs is traced — Python control flow, data-dependent shapes,
Hugging Face modules with their cache and mask plumbing, torchvision's functional attention. Every call reaches us
as one of a few hundred canonical ATen operators with concrete shapes (``nn.Linear`` is ``t`` + ``addmm``, an
``einsum`` is ``permute`` + ``bmm``), so one rule per operator family covers all module types, including custom ones.
``torch.fx`` symbolic tracing fails on control flow and on most Hugging Face models; ``torch.export`` needs
export-clean code and rewrites modules into a graph that no longer maps one-to-one onto the user's modules. The
price of tracing by running: the graph is the one the example inputs take (a branch not taken is not seen), so use
inputs that exercise the model's normal path.

A module-stack tracker (global forward pre/post hooks, removed afterwards) records which module runs each operation,
for error messages, leaf/ignored modules and module handlers (:mod:`prunekit.structured.handlers`).
"""

from __future__ import annotations

import bisect
import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from prunekit.flops import _split_inputs, count_macs
from prunekit.structured.labels import Field, LabelState
from prunekit.structured.rules import lookup, op_name, packed_features

__all__ = ["ModuleCall", "OpRecord", "SizeSplit", "TraceState", "UnsupportedOpError", "ViewSize", "resolve_modules",
           "run_trace"]


class UnsupportedOpError(RuntimeError):
    """The tracer met an operation it cannot follow on a tensor that carries prunable channels."""


@dataclass
class OpRecord:
    """One traced operation: its name, the module that ran it and its tensor outputs (shapes and labels).
    ``checked`` is False inside a module an opaque handler labels (its inside may change shape in ways no label
    shows), so the check run does not compare that operation's shapes."""

    op: str
    module: str
    shapes: list[tuple[int, ...]]
    fields: list[list[Field]]
    checked: bool = True


@dataclass
class ModuleCall:
    """The first call of a module: positional tensor inputs and flattened tensor outputs (shape, labels)."""

    inputs: list[tuple[tuple[int, ...], list[Field]]] = field(default_factory=list)
    outputs: list[tuple[tuple[int, ...], list[Field]]] = field(default_factory=list)


@dataclass
class SizeSplit:
    """A ``torch.split(x, size)`` whose piece size is a constant of the module's code (pieces pruned alike).

    After pruning, the module must split by the new piece size: ``attributes`` are the module's integer attributes
    that hold the size (``{name: multiple}``, value = multiple x piece size), ``lists`` those that hold the list of
    piece sizes (``self.splits = [8, 8]``), which the plan updates.
    """

    module: str
    call: str
    grid: torch.Tensor  # (pieces, size) atoms
    attributes: dict[str, int]
    lists: list[str] = field(default_factory=list)


@dataclass
class ViewSize:
    """A reshape inside a module whose target sizes may come from the module's attributes (``num_heads``,
    ``head_dim``, ``attn_dim``): ``attributes`` maps a dimension of the result to the module's integer attributes
    whose name says they are a size and whose value equals that dimension's size; ``shapes`` are its tuple
    attributes equal to the whole target shape (``self.shape = (dim, 1, 1)``, ``self.bias_shape``). Attributes of a
    direct child module (one not from torch) are named ``child.attr``."""

    module: str
    shape: tuple[int, ...]
    fields: list[Field]
    attributes: dict[int, list[str]]
    shapes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TensorAtoms:
    """The atoms of one dimension of a parameter or buffer: ``base + position``."""

    name: str
    dim: int
    base: int
    size: int
    is_buffer: bool


def resolve_modules(model: nn.Module, specs: Iterable[str | type], what: str) -> set[int]:
    """Ids of the modules matching any spec: a name glob (fnmatch on ``named_modules()`` names) or a module type.

    Raises:
        TypeError: If a spec is neither a string nor a type.
        ValueError: If a spec matches no module.
    """
    found: set[int] = set()
    named = list(model.named_modules(remove_duplicate=False))
    for spec in specs:
        if isinstance(spec, str):
            hits = [m for n, m in named if fnmatch.fnmatchcase(n, spec)]
        elif isinstance(spec, type):
            hits = [m for _, m in named if isinstance(m, spec)]
        else:
            raise TypeError(f"{what} entries must be module names (globs such as 'layer4.*') or module types, "
                            f"got {spec!r}")
        if not hits:
            some = [n for n, _ in named[1:6]]
            raise ValueError(f"{what} entry {spec!r} matches no module of {type(model).__name__}; module names look "
                             f"like {some}")
        found.update(id(m) for m in hits)
    return found


class TraceState(LabelState):
    """Labels of every live tensor plus what was recorded about the run.

    Handlers (:class:`~prunekit.structured.handlers.Handler`) receive this object: :meth:`fields`, :meth:`set_fields`,
    :meth:`union` and :meth:`freeze` are what they need.
    """

    def __init__(self, model: nn.Module, *, handlers: Any, leaves: set[int], ignored: set[int],
                 freeze_size_splits: str | None = None, tie_input_width: tuple[type, ...] = (),
                 freeze_broadcasts: bool = False) -> None:
        super().__init__()
        self.model = model
        self.handlers = handlers
        self.ignored = ignored
        #: Keep the channels of ``torch.split(x, size)``: ``"unmatched"`` (where no attribute of the module holds the
        #: size) or ``"all"`` (the fallbacks when a pruned split size breaks the model), None (prune them).
        self.freeze_size_splits = freeze_size_splits
        #: Module classes whose reshapes to their input's width are tied to it (``x.reshape(B, N, C)`` with ``C``
        #: read from the input: the reshaped channels must shrink as the input's do; a fallback of the plan).
        self.tie_input_width = tie_input_width
        #: An ``expand``ed (stride-0) dimension meeting labelled channels in an elementwise op is a broadcast that
        #: follows them (``expand_as``) unless this is True (a fallback of the plan: it then keeps those channels).
        self.freeze_broadcasts = freeze_broadcasts
        self.broadcasts_followed = 0  # how many expanded tensors were labelled as following their partner
        self.names: dict[int, str] = {}
        self.buffer_names: set[str] = set()
        for name, p in model.named_parameters():
            self.names.setdefault(id(p), name)
        for name, b in model.named_buffers():
            if b.is_floating_point() and id(b) not in self.names:
                self.names[id(b)] = name
                self.buffer_names.add(name)
        self.module_names: dict[int, str] = {}
        for name, m in model.named_modules():
            self.module_names.setdefault(id(m), name)
        self.leaves = leaves
        self.frozen_tensors: set[int] = set()  # ids of parameters/buffers inside ignored or leaf modules
        for m in model.modules():
            if id(m) in leaves or id(m) in ignored:
                for t in list(m.parameters()) + list(m.buffers()):
                    self.frozen_tensors.add(id(t))
        self.labels: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.producer: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> (index in ops, output index)
        self.tensor_atoms: list[TensorAtoms] = []
        self.stack: list[tuple[str, nn.Module]] = [("", model)]
        self.opaque_depth = 0  # inside a leaf or an opaque handler's module: operations are not followed
        self.leaf_depth = 0  # inside a leaf: labelled inputs are frozen
        self.ops: list[OpRecord] = []
        self.calls: dict[str, ModuleCall] = {}
        self.output: Any = None
        self.macs = 0  # MACs of the traced forward pass (prunekit.flops.count_macs)
        self.macs_by_param: dict[str, int] = {}  # MACs per weight of that pass (count_macs's by_param)
        #: The Python-level split running now: ``("size", sizes)`` for ``torch.split(x, size)`` (a constant of the
        #: code), ``("count", n)`` for ``chunk``; ATen sees both as ``split``.
        self.split_call: tuple[str, Any] | None = None
        self.size_splits: list[SizeSplit] = []
        self.view_sizes: list[ViewSize] = []
        #: The first operation whose output size depends on the data (``nonzero``, ``nms``, a boolean mask), with
        #: where it ran: detection post-processing. The pruned model's sizes then differ in ways no label predicts.
        self.data_dependent: str | None = None
        #: Results of activation contractions (``mm``/``bmm``, and views of them) -> (contracted atoms, their count),
        #: to catch a later scaling by that count (see :func:`_scaled_by_size`).
        self.contracted: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.uniform_done: dict[tuple[int, int], torch.Tensor] = {}  # joint fields already made uniform along an axis
        self.consumed: set[tuple[int, int]] = set()  # (op index, output index) of every op output read by an op
        self.made: set[tuple[int, int]] = set()  # ... of every new tensor an op made (not an in-place op's input)
        #: Modules whose labelled outputs held no data and went nowhere (see :meth:`freeze_unexercised`)
        self.unexercised: list[str] = []

    # --- labels ------------------------------------------------------------------------------------------------
    def fields(self, t: torch.Tensor) -> list[Field]:
        """The fields of a tensor (parameters and floating buffers get fresh atoms when first seen)."""
        found = self.labels.get(t)
        if found is not None:
            return found
        name = self.names.get(id(t))
        if name is None or t.dim() == 0:
            return []
        fields = []
        for d, n in enumerate(t.shape):
            if n > 1:
                atoms = self.new_atoms(n)
                self.tensor_atoms.append(TensorAtoms(name, d, int(atoms[0]), n, name in self.buffer_names))
                fields.append(Field((d,), atoms))
        self.labels[t] = fields
        if id(t) in self.frozen_tensors:
            self.freeze_fields(fields)
        return fields

    def set_fields(self, t: Any, fields: Sequence[Field]) -> None:
        """Set the fields of an output tensor (fields on dimensions of size 1 or without atoms are dropped)."""
        if not isinstance(t, torch.Tensor):
            return
        keep = [
            f for f in fields
            if all(d < t.dim() and t.shape[d] == f.size(d) and t.shape[d] > 1 for d in f.dims)
            and bool((f.atoms >= 0).any()) and not self.all_frozen(f.atoms)
        ]
        # a frozen field carries nothing prunable: dropping it keeps its dims unlabelled, which freezes any partner
        # just as coupling to it would; fields sharing dimensions are merged so that every dim has one field
        self.labels[t] = self.merge(keep) if len(keep) > 1 else keep

    def relabel(self, t: torch.Tensor, fields: Sequence[Field]) -> None:
        """Label an unlabelled tensor after the fact (a buffer that an in-place write fills with channels), including
        the record of the operation that made it, whose shapes the check run then expects to shrink."""
        self.set_fields(t, fields)
        made = self.producer.get(t)
        if made is not None:
            record = self.ops[made[0]]
            record.fields[made[1]] = self.labels.get(t) or []

    # --- context -----------------------------------------------------------------------------------------------
    def where(self) -> str:
        """The innermost module running now (its name, or ``<model>`` for the root)."""
        return self.stack[-1][0] or "<model>"

    def attention_rule(self) -> str:
        """``"heads"`` (default: prune whole heads) unless a handler of an enclosing module asks for ``"uniform"``."""
        for _, module in reversed(self.stack):
            handler = self.handlers.find(module)
            if handler is not None and handler.attention:
                return handler.attention
        return "heads"

    def sized_slices(self) -> bool:
        """True if a handler of an enclosing module says its slice bounds follow the sliced tensor's size."""
        return any(getattr(self.handlers.find(module), "sized_slices", False) for _, module in self.stack)

    def origin(self, atoms: torch.Tensor) -> str:
        """Which parameter dimension an atom came from, for messages."""
        atoms = atoms.reshape(-1)
        atoms = atoms[atoms >= 0]
        if not atoms.numel():
            return "?"
        a = int(atoms[0])
        bases = [ta.base for ta in self.tensor_atoms]
        ta = self.tensor_atoms[bisect.bisect_right(bases, a) - 1]
        return f"{ta.name} dim {ta.dim}"

    def unsupported(self, func: Any, detail: str) -> None:
        """Raise :class:`UnsupportedOpError` for ``func`` in the current module, with the fix."""
        name, module = self.stack[-1]
        kind = type(module).__name__
        where = f"module {name!r} ({kind})" if name else f"the model's own forward ({kind})"
        path = " > ".join(f"{n or '<model>'} ({type(m).__name__})" for n, m in self.stack)
        leaf = f"leaves=[{name!r}] (or leaves=[{kind}])" if name else "leaves=[<the submodule that runs it>]"
        if not name and self.handlers.find(module) is not None:
            raise UnsupportedOpError(
                f"prunekit.structured follows a {kind} inside a model, not as the model itself ({func}: {detail}). "
                f"Fix: wrap it, e.g. plan(nn.Sequential(model), ...), or in the module that uses it."
            )
        raise UnsupportedOpError(
            f"prunekit.structured cannot follow {func} in {where}, module path {path}: {detail}. Fix: keep the "
            f"module whole with {leaf}, which freezes its parameters, inputs and outputs, or teach prunekit the "
            f"module with prunekit.structured.register_handler({kind}, handler)."
        )

    # --- callbacks from the dispatch mode and the module hooks ----------------------------------------------------
    def on_op(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        for t in inputs:
            made = self.producer.get(t)
            if made is not None:
                self.consumed.add(made)
        if self.data_dependent is None and _sized_by_data(func, args):
            self.data_dependent = f"{func} in {self.where()}"
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if self.opaque_depth:
            if self.leaf_depth:
                for t in inputs:  # a leaf's inputs and parameters keep their size
                    self.freeze_fields(self.fields(t))
            for t in outputs:  # inside an opaque module: its handler labels the module's outputs
                self.labels[t] = []
        elif any(self.fields(t) for t in inputs):
            rule = lookup(func)
            if rule is None:
                labelled = next(t for t in inputs if self.fields(t))
                self.unsupported(func, "prunekit has no rule for this operation and its input carries the channels "
                                       f"of {self.origin(self.fields(labelled)[0].atoms)}")
            rule(self, func, args, kwargs, out)
        if not self.opaque_depth:
            _scaled_by_size(self, func, args, inputs, outputs)
        checked = not self.opaque_depth or self.leaf_depth > 0
        for i, t in enumerate(outputs):
            if not any(t is x for x in inputs):  # (an in-place op's output is its input: made earlier)
                self.producer[t] = (len(self.ops), i)
                self.made.add((len(self.ops), i))
        self.ops.append(OpRecord(str(func), self.stack[-1][0], [tuple(t.shape) for t in outputs],
                                 [self.labels.get(t) or [] for t in outputs], checked))

    def freeze_unexercised(self) -> None:
        """Freeze channels carried by a tensor that holds no data (a zero-size batch) and that no operation read.

        A detector with no detections runs its per-detection heads on empty batches, and the code after them
        (torchvision's keypoint decoding loops over the detections and sizes its buffers from ``heatmaps.shape``)
        never touches the channels, so nothing in the trace ties them to the outputs they size. Pruning them would
        change the output (17 keypoints -> 8); keeping them is the only safe plan.
        """
        outputs = {self.producer.get(t) for t in tree_flatten(self.output)[0] if isinstance(t, torch.Tensor)}
        for i, rec in enumerate(self.ops):
            for j, (shape, fields) in enumerate(zip(rec.shapes, rec.fields)):
                if fields and 0 in shape and (i, j) in self.made and (i, j) not in self.consumed \
                        and (i, j) not in outputs:
                    self.freeze_fields(fields)
                    if rec.module not in self.unexercised:
                        self.unexercised.append(rec.module)

    def pre_hook(self, module: nn.Module, args: tuple) -> None:
        with _disable_current_modes():  # label bookkeeping must not be traced itself
            self._pre(module, args)

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        with _disable_current_modes():
            self._post(module, args, kwargs, output)

    def _pre(self, module: nn.Module, args: tuple) -> None:
        name = self.module_names.get(id(module))
        if name is None or module is self.model:
            return
        self.stack.append((name, module))
        if not self.opaque_depth and name not in self.calls:
            self.calls[name] = ModuleCall(
                inputs=[(tuple(t.shape), self.fields(t)) for t in args if isinstance(t, torch.Tensor)])
        handler = self.handlers.find(module)
        if id(module) in self.leaves or (handler is not None and handler.opaque):
            self.opaque_depth += 1
            self.leaf_depth += id(module) in self.leaves

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if module is self.model:
            self.output = output
            return
        name = self.module_names.get(id(module))
        if name is None or module is self.model or not self.stack or self.stack[-1][1] is not module:
            return
        handler = self.handlers.find(module)
        if id(module) in self.leaves or (handler is not None and handler.opaque):
            self.opaque_depth -= 1
            self.leaf_depth -= id(module) in self.leaves
        if not self.opaque_depth:
            if handler is not None and id(module) not in self.leaves:
                handler.trace(self, module, name, args, kwargs, output)
            call = self.calls.get(name)
            if call is not None and not call.outputs:
                call.outputs = [(tuple(t.shape), self.fields(t)) for t in tree_flatten(output)[0]
                                if isinstance(t, torch.Tensor)]
        self.stack.pop()


_DATA_SIZED = {"aten::nonzero", "aten::masked_select", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
               "aten::unique_dim_consecutive", "torchvision::nms"}


def _sized_by_data(func: Any, args: tuple) -> bool:
    """True if ``func``'s output size depends on its inputs' values (indexing with a boolean mask included)."""
    name = op_name(func)
    if name in _DATA_SIZED:
        return True
    if name not in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_unsafe_index"):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices)


_aten = torch.ops.aten
_CONTRACTED = {_aten.mm: (1, 0), _aten.bmm: (2, 1)}  # the contracted dimension of each operand
_SCALINGS = {_aten.mul, _aten.div}
_CARRIERS = {_aten.view, _aten._unsafe_view, _aten.reshape, _aten._reshape_alias, _aten.transpose, _aten.permute,
             _aten.t, _aten.expand, _aten.clone, _aten.contiguous, _aten.alias, _aten.squeeze, _aten.unsqueeze}


def _scaled_by_size(state: TraceState, func: Any, args: tuple, inputs: list[torch.Tensor],
                    outputs: list[torch.Tensor]) -> None:
    """Flag channels whose contraction is scaled by their count, read from the shape at run time.

    RAFT divides its correlation volume ``f1^T f2`` by ``sqrt(C)`` with ``C = f1.shape[1]``; attention code often
    multiplies ``q @ k^T`` by ``q.size(-1) ** -0.5``. Pruning those channels physically changes the factor, zeroing
    them does not, so the soft-pruned model is not the physical one there (``Group.soft_exact`` is False). Seen as:
    the result of an ``mm``/``bmm`` over labelled channels (or a view of it) multiplied or divided by a number equal
    to C, sqrt(C), 1/sqrt(C) or 1/C. A constant of the code that equals one of them (``self.scale = 8 ** -0.5``) is
    the same number here and is flagged too: the flag errs on the safe side. (Scaled-dot-product attention's default
    scale is flagged by its rule.)
    """
    packet = getattr(func, "overloadpacket", None)
    if packet in _CONTRACTED and len(outputs) == 1 and len(args) >= 2:
        for t, dim in zip(args[:2], _CONTRACTED[packet]):
            found = next((f.atoms for f in (state.labels.get(t) or []) if f.dims == (dim,)), None)
            if isinstance(t, torch.Tensor) and found is not None:
                state.contracted[outputs[0]] = (found, int(t.shape[dim]))
                return
        return
    source = next((state.contracted[t] for t in inputs if t in state.contracted), None)
    if source is None:
        return
    if packet in _SCALINGS:
        atoms, size = source
        numbers = [float(a) for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
        numbers += [float(t.item()) for t in inputs if t.dim() == 0 and t not in state.contracted]
        if any(abs(v - x) <= 1e-3 * x for v in numbers for x in (size, size**0.5, size**-0.5, 1.0 / size)):
            state.flag(atoms, "scaled by its size")
    elif packet in _CARRIERS and len(outputs) == 1:
        state.contracted[outputs[0]] = source


_SIZE_SPLITS = {torch.split, torch.Tensor.split, torch.functional.split}
_COUNT_SPLITS = {torch.chunk, torch.Tensor.chunk}  # (tensor_split runs as slices, which freeze constant indices)
#: ``pad_packed_sequence``'s kernel: at the ATen level it is a zero buffer filled through views, which labels cannot
#: follow, so it is labelled as one operation.
_PAD_PACKED = getattr(torch._C._VariableFunctions, "_pad_packed_sequence", None)


class _PythonSplits(TorchFunctionMode):
    """Python-level calls the ATen trace cannot tell apart: ``torch.split(x, size)`` (piece size from the code) from
    ``torch.chunk(x, n)`` (piece count); and ``pad_packed_sequence``, labelled as a whole."""

    def __init__(self, state: TraceState) -> None:
        super().__init__()
        self.state = state

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Mapping | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is _PAD_PACKED:
            return self._pad_packed(func, args, kwargs)
        if func not in _SIZE_SPLITS and func not in _COUNT_SPLITS:
            return func(*args, **kwargs)
        arg = args[1] if len(args) > 1 else next((v for k, v in kwargs.items() if k != "dim"), None)
        outer, self.state.split_call = self.state.split_call, ("size" if func in _SIZE_SPLITS else "count", arg)
        try:
            return func(*args, **kwargs)
        finally:
            self.state.split_call = outer

    def _pad_packed(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """Packed ``data (N, *F)`` -> padded ``(B, T, *F)`` or ``(T, B, *F)``: the features keep their labels."""
        state = self.state
        state.opaque_depth += 1  # its ATen operations are not followed (nor compared by the check run)
        try:
            out = func(*args, **kwargs)
        finally:
            state.opaque_depth -= 1
        if state.opaque_depth:
            return out
        data = args[0] if args else kwargs["data"]
        with _disable_current_modes():
            state.set_fields(out[0], packed_features(state, data, rows=1, shift=1))
        return out


class _Mode(TorchDispatchMode):
    def __init__(self, state: TraceState) -> None:
        super().__init__()
        self.state = state

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Mapping | None = None) -> Any:
        kwargs = dict(kwargs or {})
        out = func(*args, **kwargs)
        self.state.on_op(func, args, kwargs, out)
        return out


def run_trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    handlers: Any,
    leaves: set[int] = frozenset(),  # type: ignore[assignment]
    ignored: set[int] = frozenset(),  # type: ignore[assignment]
    freeze_size_splits: str | None = None,
    tie_input_width: tuple[type, ...] = (),
    freeze_broadcasts: bool = False,
    freeze_ops: tuple[int, ...] = (),
) -> TraceState:
    """Run ``model`` once on ``example_inputs`` (eval mode, no grad) and label every tensor it computes.

    The run is :func:`prunekit.flops.count_macs`'s (so the MACs come for free). Model outputs are frozen (their
    channels cannot shrink). The model's train/eval modes are restored.
    """
    _split_inputs(example_inputs)  # validates the type
    state = TraceState(model, handlers=handlers, leaves=set(leaves), ignored=set(ignored),
                       freeze_size_splits=freeze_size_splits, tie_input_width=tie_input_width,
                       freeze_broadcasts=freeze_broadcasts)
    pre = module_hooks.register_module_forward_pre_hook(state.pre_hook)
    post = module_hooks.register_module_forward_hook(state.post_hook, with_kwargs=True)
    try:
        # the MAC counter runs the model once (eval, no grad); the trace follows the same run
        with _PythonSplits(state), _Mode(state):
            counted = count_macs(model, example_inputs)
            state.macs, state.macs_by_param = counted.total, counted.by_param
    finally:
        pre.remove()
        post.remove()
        # torch leaves a global with_kwargs hook's entry behind on remove(), and torch.compile then warns about
        # global hooks on every later module call
        getattr(module_hooks, "_global_forward_hooks_with_kwargs", {}).pop(post.id, None)
    output = state.output
    for t in tree_flatten(output)[0]:
        if isinstance(t, torch.Tensor):
            state.freeze_fields(state.fields(t))
    state.freeze_unexercised()
    for i in freeze_ops:  # the fallbacks' "keep the channels of this operation" (see plan's _with_fallbacks)
        if 0 <= i < len(state.ops):
            for fields in state.ops[i].fields:
                state.freeze_fields(fields)
    return state
