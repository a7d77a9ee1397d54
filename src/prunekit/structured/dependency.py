"""The dependency graph: which parameter slices must be pruned together (units) and which share dimensions (groups).

After the trace (:mod:`prunekit.structured.tracer`) the classes of coupled atoms are the prunable **units**: usually
one channel (a conv filter with its BatchNorm entries and the next layer's input slice), a whole attention head or
convolution group where the model couples them so. A **group** is a set of units living in the same tensor
dimensions (a residual stage's channels, a block's hidden channels): units of one group compete with each other when
a fraction of the group is pruned. Units coupled to a model input or output, to a leaf or ignored module, or to an
operation that fixes their position are frozen and never pruned.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> graph = trace(model, torch.randn(1, 3, 8, 8))
    >>> [f"{m.name}/{m.dim}" for m in graph.groups[0].members]  # doctest: +NORMALIZE_WHITESPACE
    ['0.weight/0', '0.bias/0', '1.weight/0', '1.bias/0', '1.running_mean/0', '1.running_var/0',
     '3.weight/1']
    >>> graph.groups[0].num_units
    8
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunekit.structured.handlers import HANDLERS, Handler, HandlerRegistry
from prunekit.structured.labels import Field, components
from prunekit.structured.tracer import TraceState, resolve_modules, run_trace

__all__ = ["DependencyGraph", "Group", "Member", "trace"]


@dataclass(frozen=True)
class Member:
    """One tensor dimension in a group.

    Attributes:
        name: Tensor fully qualified name (a parameter or buffer), or a module name for activation members.
        dim: The dimension.
        unit: int64 tensor with one entry per position of that dimension: the index of the group's unit the position
            belongs to, or -1 where the position is never pruned (frozen).
    """

    name: str
    dim: int
    unit: torch.Tensor


@dataclass(frozen=True)
class Group:
    """Units that share tensor dimensions.

    Attributes:
        index: Position in :attr:`DependencyGraph.groups`.
        members: Parameter and buffer dimensions whose positions belong to the group's units.
        activations: Module outputs carrying the units (``name`` is the module's name, ``dim`` the output dimension),
            for data-driven criteria that hook activations.
        num_units: Number of prunable units.
        unit_width: Positions per unit along the group's narrowest member (1 for channels, ``head_dim`` for heads, the
            group width for grouped convolutions).
        fixed: Positions of that narrowest member that can never be pruned.
        rules: How positions were coupled into units (``"heads (encoder.layers.0.self_attn)"``, ``"conv groups (...)"``,
            ``"uniform split (...)"``); empty for plain channels.
        soft_exact: True if zeroing the group's pruned slices gives exactly the physically pruned model's outputs;
            False where a normalisation or reduction runs over the group's positions (LayerNorm over channels).
        inputs: Module first inputs carrying the units (``name`` is the module's name, ``dim`` the input dimension).
        consumers: The subset of ``inputs`` where the units are *read*: modules that mix them into other features
            (the next convolution or linear layer, an attention module's input projection), as opposed to modules
            that pass them through (BatchNorm, activations, pooling) or containers. Zeroing the units at every
            consumer input has the effect of removing them, so activation-based criteria measure them there.
            Empty where some unit is never read by a module (e.g. attention heads inside ``nn.MultiheadAttention``,
            whose output projection is not called as a module).
    """

    index: int
    members: tuple[Member, ...]
    activations: tuple[Member, ...]
    num_units: int
    unit_width: int
    fixed: int
    rules: tuple[str, ...]
    soft_exact: bool
    inputs: tuple[Member, ...] = ()
    consumers: tuple[Member, ...] = ()

    @property
    def modules(self) -> tuple[str, ...]:
        """Names of the modules owning the member tensors, in order of appearance."""
        seen: dict[str, None] = {}
        for m in self.members:
            seen.setdefault(m.name.rpartition(".")[0] or "<model>", None)
        return tuple(seen)

    def describe(self, limit: int = 4) -> str:
        mods = self.modules
        text = ", ".join(mods[:limit]) + (f", ... (+{len(mods) - limit})" if len(mods) > limit else "")
        return text


class DependencyGraph:
    """Units and groups of a traced model. Build it with :func:`trace`.

    Attributes:
        groups: The groups with at least one prunable unit, in trace order.
        frozen: ``(tensor name, dim)`` of parameter dimensions of which no position can be pruned (kernel dimensions
            of convolutions, which are not channels, are not listed).
    """

    def __init__(self, model: nn.Module, state: TraceState, roots: torch.Tensor, groups: list[Group],
                 frozen: list[tuple[str, int]], unit_roots: list[torch.Tensor]) -> None:
        self.model_type = type(model).__name__
        self.handlers: HandlerRegistry = state.handlers
        self.state = state
        self.roots = roots
        self.groups = groups
        self.frozen = frozen
        self._unit_roots = unit_roots  # per group: the root atom of each unit

    def __repr__(self) -> str:
        n = len(self.groups)
        return f"DependencyGraph({self.model_type}: {n} group{'s' * (n != 1)}, {self.num_units} prunable units)"

    @property
    def num_units(self) -> int:
        return sum(g.num_units for g in self.groups)

    def __str__(self) -> str:
        header = f"{'group':>5}  {'units':>6}  {'width':>5}  {'fixed':>5}  {'soft=phys':>9}  rule  modules"
        lines = [f"{self!r}", header]
        for g in self.groups:
            lines.append(f"{g.index:>5}  {g.num_units:>6}  {g.unit_width:>5}  {g.fixed:>5}  "
                         f"{'yes' if g.soft_exact else 'no':>9}  {_rule_summary(g.rules)}  {g.describe()}")
        if self.frozen:
            names = sorted({n.rpartition('.')[0] or n for n, _ in self.frozen})
            lines.append(f"frozen (never pruned): {len(self.frozen)} tensor dims in "
                         + ", ".join(names[:6]) + (" ..." if len(names) > 6 else ""))
        return "\n".join(lines)

    def retrace(self, model: nn.Module, example_inputs: Any, *, ignore: Iterable[type] = (),
                freeze_size_splits: str | None = None, tie_input_width: Iterable[type] = (),
                freeze_broadcasts: bool | None = None, freeze_ops: Iterable[int] = ()) -> DependencyGraph:
        """This graph traced again with the same handlers, leaves and ignored modules, plus every module of the
        ``ignore`` types kept whole, the channels of ``torch.split(x, size)`` kept as ``freeze_size_splits``
        says (``"unmatched"``: where no module attribute holds the size; ``"all"``) and, in modules of the
        ``tie_input_width`` types, a reshape to the width of the module's input tied to that input's channels. For
        the fallbacks of :func:`~prunekit.structured.plan` when a pruned model breaks. ``freeze_broadcasts``: keep
        the channels that meet an ``expand`` (default: as this graph did); ``freeze_ops``: keep the channels of
        these traced operations' outputs (indices into ``state.ops``)."""
        types = tuple(ignore)
        ignored = set(self.state.ignored) | {id(m) for m in model.modules() if types and isinstance(m, types)}
        state = run_trace(model, example_inputs, handlers=self.handlers, leaves=self.state.leaves, ignored=ignored,
                          freeze_size_splits=freeze_size_splits, tie_input_width=tuple(tie_input_width),
                          freeze_broadcasts=self.state.freeze_broadcasts if freeze_broadcasts is None
                          else freeze_broadcasts, freeze_ops=tuple(freeze_ops))
        return _build(model, state)

    def pruned_atoms(self, pruned: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """Bool per atom: True if its unit is pruned. ``pruned`` maps group index -> bool per unit."""
        root_pruned = torch.zeros(self.state.n_atoms, dtype=torch.bool)
        for g, mask in pruned.items():
            root_pruned[self._unit_roots[g][mask]] = True
        return root_pruned[self.roots] if self.state.n_atoms else root_pruned

    def shape_after(self, shape: Sequence[int], fields: Sequence[Field], pruned_atom: torch.Tensor) -> tuple[int, ...]:
        """The shape a traced tensor will have once the atoms marked in ``pruned_atom`` are removed.

        Raises:
            ValueError: If the kept positions of a joint field do not form a product (a view could not produce it).
        """
        new = list(shape)
        for f in fields:
            kept = (f.atoms < 0) | ~pruned_atom[f.atoms.clamp(min=0)]
            axes_kept = []
            for ax in range(kept.dim()):
                other = tuple(i for i in range(kept.dim()) if i != ax)
                axes_kept.append(kept.any(dim=other) if other else kept)
            product = axes_kept[0]
            for v in axes_kept[1:]:
                product = product.unsqueeze(-1) & v
            if not torch.equal(product.reshape(kept.shape), kept):
                raise ValueError(f"pruned positions over dims {f.dims} of a {tuple(shape)} tensor do not form whole "
                                 "slices; this is a prunekit bug, please report it with the model")
            for ax, d in enumerate(f.dims):
                new[d] = int(axes_kept[ax].sum())
        return tuple(new)


def _rule_summary(rules: Sequence[str]) -> str:
    if not rules:
        return "-"
    kinds: dict[str, int] = {}
    for r in rules:
        kind = r.split(" (")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    return ", ".join(f"{k} x{n}" if n > 1 else k for k, n in kinds.items())


def _registry(handlers: Mapping[type | str, Handler] | HandlerRegistry | None) -> HandlerRegistry:
    if handlers is None:
        return HANDLERS
    if isinstance(handlers, HandlerRegistry):
        return handlers
    registry = HandlerRegistry(HANDLERS)
    for key, handler in handlers.items():
        registry.register(key, handler)
    return registry


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    ignore: Iterable[str | type] = (),
    leaves: Iterable[str | type] = (),
    handlers: Mapping[type | str, Handler] | HandlerRegistry | None = None,
) -> DependencyGraph:
    """Trace ``model`` on ``example_inputs`` and build its dependency graph.

    Args:
        model: The model (run once in eval mode without grad; modes are restored).
        example_inputs: A tensor, a tuple of positional arguments or a dict of keyword arguments. Batch size 1 is
            enough and fastest; use inputs that take the model's normal code path.
        ignore: Modules (name globs or types) whose tensors keep their shapes; channels coupled to them are frozen.
        leaves: Modules (name globs or types) that are not traced inside: their parameters, inputs and outputs keep
            their shapes. Use for modules prunekit cannot follow.
        handlers: Extra module handlers ``{module class or qualified name: Handler}`` on top of the registered ones.

    Returns:
        The :class:`DependencyGraph`.

    Raises:
        TypeError: If ``model`` is not a module, or ``ignore``/``leaves`` hold other things than names and types.
        ValueError: If an ``ignore``/``leaves`` entry matches no module.
        UnsupportedOpError: If the model runs an operation prunekit cannot follow on prunable channels (the message
            names the operation and the module, and how to fix it).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    registry = _registry(handlers)
    state = run_trace(model, example_inputs, handlers=registry,
                      leaves=resolve_modules(model, list(leaves), "leaves"),
                      ignored=resolve_modules(model, list(ignore), "ignore"))
    return _build(model, state)


def _build(model: nn.Module, state: TraceState) -> DependencyGraph:
    roots = state.finalize()
    n = state.n_atoms
    frozen_root = torch.zeros(n, dtype=torch.bool)
    frozen = state.frozen_atoms()
    if frozen.numel():
        frozen_root[roots[frozen]] = True
    key_roots = []
    for ta in state.tensor_atoms:
        r = roots[ta.base : ta.base + ta.size]
        key_roots.append(torch.where(frozen_root[r], torch.full_like(r, -1), r))
    ea, eb = [], []
    for r in key_roots:
        u = r[r >= 0].unique()
        if u.numel() > 1:
            ea.append(u[:-1])
            eb.append(u[1:])
    group_of = components(n, torch.cat(ea) if ea else torch.zeros(0, dtype=torch.int64),
                          torch.cat(eb) if eb else torch.zeros(0, dtype=torch.int64))
    order: dict[int, list[int]] = {}
    frozen_dims = []
    structural = torch.zeros(n, dtype=torch.bool)
    for atoms in state.structural:
        structural[atoms] = True
    for i, r in enumerate(key_roots):
        live = r[r >= 0]
        if live.numel() == 0:
            ta = state.tensor_atoms[i]
            if not ta.is_buffer and not bool(structural[ta.base : ta.base + ta.size].all()):
                frozen_dims.append((ta.name, ta.dim))
            continue
        order.setdefault(int(group_of[live[0]]), []).append(i)
    # flags and notes per group id
    flagged: set[int] = set()
    for atoms, _ in state.flags:
        r = roots[atoms]
        flagged.update(group_of[r[~frozen_root[r]]].unique().tolist())
    notes: dict[int, dict[str, None]] = {}
    for atoms, text in state.notes:
        r = roots[atoms]
        for g in group_of[r[~frozen_root[r]]].unique().tolist():
            notes.setdefault(g, {})[text] = None
    # lookup tables: root atom -> group index, unit index within the group
    group_index = torch.full((n,), -1, dtype=torch.int64)
    unit_index = torch.full((n,), -1, dtype=torch.int64)
    unit_roots: list[torch.Tensor] = []
    for k, keys in enumerate(order.values()):
        units = torch.cat([key_roots[i][key_roots[i] >= 0] for i in keys]).unique()
        group_index[units] = k
        unit_index[units] = torch.arange(units.numel())
        unit_roots.append(units)
    activations = _module_fields(state, roots, unit_index, group_index, len(unit_roots), "outputs")
    inputs = _module_fields(state, roots, unit_index, group_index, len(unit_roots), "inputs")
    groups: list[Group] = []
    for k, (gid, keys) in enumerate(order.items()):
        members = []
        width, fixed = None, 0
        for i in keys:
            r = key_roots[i]
            idx = torch.where(r >= 0, unit_index[r.clamp(min=0)], torch.full_like(r, -1))
            ta = state.tensor_atoms[i]
            members.append(Member(ta.name, ta.dim, idx))
            counts = torch.bincount(idx[idx >= 0], minlength=unit_roots[k].numel())
            w = int(counts[counts > 0].min())
            if width is None or w < width:
                width, fixed = w, int((idx < 0).sum())
        consumers = _consumers(model, state, members, activations[k], inputs[k], int(unit_roots[k].numel()))
        groups.append(Group(index=k, members=tuple(members), activations=tuple(activations[k]),
                            num_units=int(unit_roots[k].numel()), unit_width=width or 1, fixed=fixed,
                            rules=tuple(notes.get(gid, {})), soft_exact=gid not in flagged,
                            inputs=tuple(inputs[k]), consumers=consumers))
    return DependencyGraph(model, state, roots, groups, frozen_dims, unit_roots)


def _consumers(model: nn.Module, state: TraceState, members: Sequence[Member], activations: Sequence[Member],
               inputs: Sequence[Member], num_units: int) -> tuple[Member, ...]:
    """The module inputs where a group's units are read (see :attr:`Group.consumers`).

    A module whose first input carries the units is a consumer unless another such module runs inside it (then it is
    a container) or it passes the units through: its output carries them too, and it owns no weight (a parameter of
    two or more dimensions) holding them along dimension 1 or later — the input-feature dimension of Linear and Conv
    weights and of attention's input projection (which reads the units even where a residual connection makes its
    output carry them again). Returns () unless every unit is read somewhere.
    """
    names = [m.name for m in inputs]
    produces = {m.name for m in activations}
    shapes = {n: p.dim() for n, p in model.named_parameters()}
    found = []
    for m in inputs:
        if any(other.startswith(m.name + ".") for other in names):
            continue  # a container: its consumers are inside
        reads = any(w.name.startswith(m.name + ".") and w.dim >= 1 and shapes.get(w.name, 0) >= 2 for w in members)
        if m.name not in produces or reads:
            found.append(m)
    if not found:
        return ()
    seen = torch.zeros(num_units, dtype=torch.bool)
    for m in found:
        seen[m.unit[m.unit >= 0]] = True
    return tuple(found) if bool(seen.all()) else ()


def _module_fields(state: TraceState, roots: torch.Tensor, unit_index: torch.Tensor, group_index: torch.Tensor,
                   n_groups: int, side: str) -> list[list[Member]]:
    """Module first outputs (``side="outputs"``) or first inputs (``"inputs"``) whose labelled dimension belongs to
    exactly one group (for activation-based criteria)."""
    found: list[list[Member]] = [[] for _ in range(n_groups)]
    for name, call in state.calls.items():
        tensors = getattr(call, side)
        if not tensors:
            continue
        for f in tensors[0][1]:
            if len(f.dims) != 1:
                continue
            r = torch.where(f.atoms >= 0, roots[f.atoms.clamp(min=0)], torch.full_like(f.atoms, -1))
            g = torch.where(r >= 0, group_index[r.clamp(min=0)], torch.full_like(r, -1))
            live = g[g >= 0]
            if live.numel() == 0 or bool((live != live[0]).any()):
                continue
            idx = torch.where(g >= 0, unit_index[r.clamp(min=0)], torch.full_like(r, -1))
            found[int(live[0])].append(Member(name, f.dims[0], idx))
    return found
