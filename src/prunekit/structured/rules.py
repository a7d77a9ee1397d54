"""How each ATen operation moves and couples channel labels (see :mod:`prunekit.structured.labels`).

One rule per operation family. A rule reads the fields of the operation's tensor inputs, records couplings on the
state and sets the fields of the outputs. Families:

* **identity / shape ops** (``view``, ``permute``, ``expand``, ``pixel_shuffle``, ...): labels move with the data.
  Reshapes are computed by running the same operation on the label tensor itself, so index mappings (flatten ->
  Linear, channel shuffle, head splits) are exact.
* **selection** (``select``, ``slice``, ``split``, ``index``, ``embedding``, ``roll``, ``pad``, packing): a constant
  index into a labelled dimension freezes it (its meaning would shift after pruning), except that equal splits
  (``chunk``) and selections along a split dimension couple the pieces so that every piece is pruned alike. A
  ``torch.split(x, size)`` (told from ``chunk`` at the Python level) reads its piece size from the code: the integer
  attributes of the running module that hold it are recorded for the plan to update (CSP, Res2Net, YOLO C2f), and
  if the pruned model still breaks, :func:`~prunekit.structured.plan` keeps those channels instead.
* **elementwise** ops with broadcasting couple the positions that meet (residual additions, SE scales, norms).
* **contractions** (``mm``, ``bmm``, convolution, scaled-dot-product attention) couple the contracted dimensions;
  grouped convolutions prune whole groups; attention keeps whole heads (or, if a handler asks, the same head
  dimensions in every head).
* **normalisation, reduction, pooling**: labels pass along the kept dimensions; dimensions that were reduced or
  normalised over are flagged (soft pruning is not equivalent to physical pruning there).

An operation without a rule raises :class:`~prunekit.structured.tracer.UnsupportedOpError` when one of its inputs
carries labels.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_flatten

from prunekit.structured.labels import Field, expand_field, factor

if TYPE_CHECKING:
    from prunekit.structured.tracer import TraceState

__all__ = ["NAMED_RULES", "RULES", "lookup"]

aten = torch.ops.aten
Rule = Callable[["TraceState", Any, tuple, dict, Any], None]
RULES: dict[Any, Rule] = {}
#: Rules by qualified operator name, for operators of libraries that register them on import (``torchvision::nms``).
NAMED_RULES: dict[str, Rule] = {}


def _register(*ops: Any) -> Callable[[Rule], Rule]:
    def deco(fn: Rule) -> Rule:
        for op in ops:
            if op is not None:
                RULES[op] = fn
        return fn

    return deco


def _op(name: str) -> Any:
    """``aten.<name>`` (an overload packet or ``packet.overload``), or None if this torch build lacks it."""
    packet, _, overload = name.partition(".")
    p = getattr(aten, packet, None)
    if p is None or not overload:
        return p
    return getattr(p, overload, None)


@functools.cache
def op_name(func: Any) -> str:
    """An operator's qualified name without its overload (``"torchvision::nms"``); the trace asks once per operator."""
    return func.name().split(".")[0]


def lookup(func: Any) -> Rule | None:
    """The rule for an operator (by overload, then by packet, then by qualified name, then pointwise by tag)."""
    rule = RULES.get(func) or RULES.get(func.overloadpacket) or NAMED_RULES.get(op_name(func))
    if rule is None and torch.Tag.pointwise in func.tags:
        rule = pointwise
    return rule


# --- helpers --------------------------------------------------------------------------------------------------------


def _bind(func: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    bound: dict[str, Any] = {}
    for i, a in enumerate(func._schema.arguments):
        if i < len(args):
            bound[a.name] = args[i]
        elif a.name in kwargs:
            bound[a.name] = kwargs[a.name]
        elif a.has_default_value():
            bound[a.name] = a.default_value
        else:
            bound[a.name] = None
    return bound


def _tensors(x: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _set_all(st: TraceState, out: Any, fields: list[Field], ndim: int | None = None) -> None:
    for t in _tensors(out):
        if ndim is None or t.dim() == ndim:
            st.set_fields(t, fields)


def _take(st: TraceState, fields: Sequence[Field], dim: int) -> tuple[torch.Tensor | None, list[Field]]:
    """Split off the atoms along ``dim`` (a joint field is first coupled along its other dimensions)."""
    taken, rest = None, []
    for f in fields:
        if dim not in f.dims:
            rest.append(f)
            continue
        g = st.restrict(f, [dim])
        taken = g.atoms if g is not None else None
    return taken, rest


def _meet(st: TraceState, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
    """Couple two atom vectors along a dimension both tensors share (a labelled side facing an unlabelled one is
    frozen)."""
    if a is not None and b is not None:
        st.union(a, b)
    elif a is not None:
        st.freeze(a)
    elif b is not None:
        st.freeze(b)


def _shift(fields: Sequence[Field], mapping: dict[int, int]) -> list[Field]:
    return [f.moved(mapping) for f in fields if all(d in mapping for d in f.dims)]


# --- identity and dimension moves --------------------------------------------------------------------------------


@_register(
    aten.alias, aten.detach, aten.clone, aten.contiguous, aten._to_copy, aten.lift_fresh, aten.lift_fresh_copy,
    aten.fill_, aten.zero_, aten.detach_, aten.zeros_like, aten.ones_like, aten.empty_like, aten.full_like,
    aten.rand_like, aten.randn_like, aten.randint_like, aten.bernoulli_, aten.normal_, aten.uniform_,
    aten.resolve_conj, aten.resolve_neg, aten._conj, aten.positive, _op("_assert_tensor_metadata"),
    aten.dropout, aten.feature_dropout,
)
def identity(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    src = args[0]
    for t in _tensors(out):
        if t is not src and t.shape == src.shape:
            st.set_fields(t, st.fields(src))


@_register(aten.as_strided_, aten.as_strided)
def as_strided(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    src, size = args[0], list(args[1])
    if size == list(src.shape) and (func.overloadpacket is aten.as_strided_ or list(args[2]) == list(src.stride())):
        identity(st, func, args, kwargs, out)
        return
    st.unsupported(func, "as_strided with a new shape on a tensor whose channels would be pruned")


@_register(aten.permute)
def permute(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    src, perm = args[0], [_norm_dim(d, args[0].dim()) for d in args[1]]
    st.set_fields(out, _shift(st.fields(src), {old: new for new, old in enumerate(perm)}))


@_register(aten.transpose)
def transpose(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    src = args[0]
    a, b = _norm_dim(args[1], src.dim()), _norm_dim(args[2], src.dim())
    mapping = {d: d for d in range(src.dim())} | {a: b, b: a}
    st.set_fields(out, _shift(st.fields(src), mapping))


@_register(aten.t)
def t(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    src = args[0]
    mapping = {0: 1, 1: 0} if src.dim() == 2 else {d: d for d in range(src.dim())}
    st.set_fields(out, _shift(st.fields(src), mapping))


@_register(aten.unsqueeze)
def unsqueeze(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    src, dim = args[0], _norm_dim(args[1], args[0].dim() + 1)
    st.set_fields(out, _shift(st.fields(src), {d: d + (d >= dim) for d in range(src.dim())}))


@_register(aten.squeeze, aten.squeeze_)
def squeeze(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    src = args[0]
    if len(args) > 1:
        dims = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
        removed = {_norm_dim(d, src.dim()) for d in dims if src.shape[_norm_dim(d, src.dim())] == 1}
    else:
        removed = {d for d in range(src.dim()) if src.shape[d] == 1}
    kept = [d for d in range(src.dim()) if d not in removed]
    st.set_fields(out, _shift(st.fields(src), {d: i for i, d in enumerate(kept)}))


@_register(aten.expand)
def expand(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    src = args[0]
    off = out.dim() - src.dim()
    st.set_fields(out, _shift(st.fields(src), {d: d + off for d in range(src.dim())}))


@_register(aten.flip)
def flip(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    src = args[0]
    dims = {_norm_dim(d, src.dim()) for d in args[1]}
    fields = []
    for f in st.fields(src):
        axes = [i for i, d in enumerate(f.dims) if d in dims]
        fields.append(Field(f.dims, f.atoms.flip(axes)) if axes else f)
    st.set_fields(out, fields)


_VIEWS = (aten.view, aten._unsafe_view, aten.reshape, aten._reshape_alias, aten.view_as, aten.flatten, aten.unflatten)


@_register(
    aten.view, aten._unsafe_view, aten.reshape, aten._reshape_alias, aten.pixel_shuffle, aten.pixel_unshuffle,
    aten.channel_shuffle, _op("native_channel_shuffle"), aten.unfold, aten.repeat, aten.diagonal, aten.unflatten,
    aten.view_as, aten.flatten, aten.movedim, aten.tile,
)
def remap(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    """Run the operation on the labels themselves, then re-compress (exact for any data-independent reshuffle)."""
    src = args[0]
    outs = _tensors(out)
    view = func.overloadpacket in _VIEWS
    if view:
        _view(st, func, src, outs[0])
        return
    new: list[list[Field]] = [[] for _ in outs]
    for f in st.fields(src):
        full = expand_field(f, src.shape).contiguous()
        res = _tensors(func(full, *args[1:], **kwargs))
        for k, r in enumerate(res):
            g = factor(r)
            if g is None or not _same_positions(full, r):
                # positions lost or repeated (unfold, repeat, diagonal): a constant index pattern, frozen
                st.freeze(f.atoms)
                continue
            if len(g.dims) > len(f.dims):
                st.splits.append((g.atoms, f"{st.where()} {func.overloadpacket.__name__}"))
            new[k].append(g)
    for t, fields in zip(outs, new):
        st.set_fields(t, fields)


def _view_blocks(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pair up runs of source and destination dimensions with equal products (a reshape maps each run onto its
    partner in row-major order). Dimensions of size 1 are left out. None if the shapes do not pair up."""
    si = [d for d, n in enumerate(src) if n != 1]
    di = [d for d, n in enumerate(dst) if n != 1]
    blocks, i, j = [], 0, 0
    while i < len(si) and j < len(di):
        a, b = [si[i]], [di[j]]
        pa, pb = src[si[i]], dst[di[j]]
        while pa != pb:
            if pa < pb:
                i += 1
                if i >= len(si):
                    return None
                a.append(si[i])
                pa *= src[si[i]]
            else:
                j += 1
                if j >= len(di):
                    return None
                b.append(di[j])
                pb *= dst[di[j]]
        blocks.append((a, b))
        i, j = i + 1, j + 1
    return blocks if i == len(si) and j == len(di) else None


def _view(st: TraceState, func: Any, src: torch.Tensor, dst: torch.Tensor) -> None:
    """A reshape: each field is reshaped within the runs of dimensions it touches only (cheap for big tensors)."""
    blocks = _view_blocks(list(src.shape), list(dst.shape))
    new: list[Field] = []
    for f in st.fields(src):
        used = [blk for blk in blocks if set(blk[0]) & set(f.dims)] if blocks is not None else None
        if not used:  # cannot pair the shapes up: reshape the whole tensor
            sub_src, sub_dst = list(range(src.dim())), list(range(dst.dim()))
        else:
            sub_src = [d for blk in used for d in blk[0]]
            sub_dst = [d for blk in used for d in blk[1]]
        local = Field(tuple(sub_src.index(d) for d in f.dims), f.atoms)
        full = expand_field(local, [src.shape[d] for d in sub_src]).reshape([dst.shape[d] for d in sub_dst])
        g = factor(full)
        if g is None:
            st.freeze(f.atoms)
            continue
        g = Field(tuple(sub_dst[d] for d in g.dims), g.atoms)
        if len(g.dims) > len(f.dims):
            st.splits.append((g.atoms, f"{st.where()} {func.overloadpacket.__name__}"))
        new.append(g)
    st.set_fields(dst, st.merge(new))
    _view_size(st, dst)
    if st.tie_input_width and isinstance(st.stack[-1][1], st.tie_input_width):
        _tie_input_width(st, dst)


def _tie_input_width(st: TraceState, dst: torch.Tensor) -> None:
    """A reshape whose labelled dimension has the width of the running module's input (``x.reshape(B, N, C)``
    with ``B, N, C = x.shape``): couple that dimension's channels position by position to the input's, so that
    both shrink alike (the attention width follows the residual stream)."""
    call = st.calls.get(st.stack[-1][0])
    if call is None or not call.inputs:
        return
    shape, fields = call.inputs[0]
    width = next((f.atoms for f in fields if f.dims == (len(shape) - 1,)), None)
    if width is None:
        return
    for f in st.fields(dst):
        if len(f.dims) == 1 and dst.shape[f.dims[0]] == width.numel() and not torch.equal(f.atoms, width):
            st.union(f.atoms, width)


#: Words in the names of attributes that hold sizes (``num_heads``, ``head_dim``, ``attn_dim``, ``hidden_size``).
_SIZE_WORDS = ("head", "dim", "channel", "chs", "width", "size", "features", "hidden", "embed", "group")


def _int_attributes(module: torch.nn.Module) -> dict[str, int]:
    """The public integer attributes of a module (not bools): where its code may keep a size."""
    return {k: v for k, v in vars(module).items() if type(v) is int and not k.startswith("_")}


def _from_torch(module: torch.nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "torch"


def _sequence_attributes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The public tuple/list-of-integers attributes of a module: where its code may keep a shape or split sizes
    (``self.shape = (dim, 1, 1)``, ``self.splits = [8, 8]``)."""
    return {k: tuple(v) for k, v in vars(module).items()
            if isinstance(v, (tuple, list)) and v and all(type(i) is int for i in v) and not k.startswith("_")}


def _size_owners(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The running module and its direct children from outside torch, which it may call other methods of
    (``self.rel_pos.get_bias()`` reshapes by ``rel_pos.bias_shape``), with the prefix their attributes are named by
    (``child.attr``)."""
    return [("", module)] + [(f"{n}.", c) for n, c in module.named_children() if not _from_torch(c)]


def _size_ints(owners: list[tuple[str, torch.nn.Module]]) -> dict[str, int]:
    """Their integer attributes (> 1) whose name says they are a size, by prefixed name."""
    return {p + k: v for p, m in owners for k, v in _int_attributes(m).items()
            if v > 1 and any(w in k.lower() for w in _SIZE_WORDS)}


def _view_size(st: TraceState, dst: torch.Tensor) -> None:
    """Record which attributes of the running module could hold the sizes of a reshape's labelled dimensions."""
    from prunekit.structured.tracer import ViewSize

    fields = st.fields(dst)
    if not fields:
        return
    name, module = st.stack[-1]
    owners = _size_owners(module)
    sizes = _size_ints(owners)
    dims = {d for f in fields for d in f.dims}
    attrs = {d: [k for k, v in sizes.items() if v == dst.shape[d]] for d in sorted(dims)}
    attrs = {d: ks for d, ks in attrs.items() if ks}
    shapes = [p + k for p, m in owners for k, v in _sequence_attributes(m).items()
              if v == tuple(dst.shape) and any(w in k.lower() for w in (*_SIZE_WORDS, "shape"))]
    if attrs or shapes:
        st.view_sizes.append(ViewSize(name, tuple(dst.shape), list(fields), attrs, shapes))


def _same_positions(before: torch.Tensor, after: torch.Tensor) -> bool:
    """True if every atom occupies as many positions after a reshuffle as before (a permutation of positions)."""
    a, b = before[before >= 0], after[after >= 0]
    return a.numel() == b.numel() and torch.equal(a.sort().values, b.sort().values)


# --- selection --------------------------------------------------------------------------------------------------


@_register(aten.select)
def select(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    src = args[0]
    dim, index = _norm_dim(args[1], src.dim()), args[2]
    fields = []
    for f in st.fields(src):
        if dim in f.dims:
            if len(f.dims) == 1:
                st.freeze(f.atoms)  # a constant index into a labelled dimension
                continue
            ax = f.dims.index(dim)
            _uniform_along(st, f, ax)
            atoms = f.atoms.select(ax, index)
            f = Field(tuple(d for d in f.dims if d != dim), atoms)
        fields.append(f.moved({d: d - (d > dim) for d in f.dims}))
    st.set_fields(out, fields)


def _uniform_along(st: TraceState, f: Field, ax: int) -> Field:
    """Couple the positions of a joint field along axis ``ax`` (every slice along it is pruned alike).

    Once per field and axis: code that selects every slice in a loop (SSD's post-processing takes the scores of each
    of 91 classes over 8,732 anchors) would otherwise record the same 794,612 couplings 90 times (4 GB)."""
    key = (id(f.atoms), ax)
    if st.uniform_done.get(key) is f.atoms:
        return f
    st.uniform_done[key] = f.atoms  # (the reference keeps the id from being reused)
    rep = f.atoms.amax(dim=ax, keepdim=True)
    st.union(f.atoms, rep)
    return f


@_register(aten.slice)
def slice_(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    b = _bind(func, args, kwargs)
    src = b["self"]
    dim = _norm_dim(b["dim"], src.dim())
    n = src.shape[dim]
    start, end, step = b["start"], b["end"], b["step"] or 1
    start = 0 if start is None else (start + n if start < 0 else start)
    end = n if end is None else (end + n if end < 0 else end)
    start, end = max(0, min(start, n)), max(0, min(end, n))
    full = start == 0 and end >= n and step == 1
    piece = end - start
    sized = step == 1 and 0 < piece < n and n % piece == 0 and start % piece == 0 and st.sized_slices()
    fields = []
    for f in st.fields(src):
        if dim in f.dims and not full:
            if len(f.dims) == 1 and sized:  # piece start/piece of n/piece equal pieces (bounds follow the size)
                grid = f.atoms.reshape(n // piece, piece)
                for other in grid[1:]:
                    st.union(grid[0], other)
                fields.append(Field(f.dims, grid[start // piece].clone()))
                continue
            if len(f.dims) == 1:
                st.freeze(f.atoms)
                continue
            ax = f.dims.index(dim)
            _uniform_along(st, f, ax)
            index = [slice(None)] * f.atoms.dim()
            index[ax] = slice(start, end, step)
            atoms = f.atoms[tuple(index)]
            if atoms.shape[ax] == 0:
                continue
            if atoms.shape[ax] == 1:  # fields never cover dimensions of size 1
                f = Field(tuple(d for d in f.dims if d != dim), atoms.squeeze(ax))
                if not f.dims:
                    continue
            else:
                f = Field(f.dims, atoms)
        fields.append(f)
    st.set_fields(out, fields)


@_register(aten.split, aten.split_with_sizes, aten.unsafe_split, aten.unsafe_split_with_sizes, aten.unbind)
def split(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    b = _bind(func, args, kwargs)
    src = b["self"]
    dim = _norm_dim(b.get("dim") or 0, src.dim())
    pieces = _tensors(out)
    removed = func.overloadpacket is aten.unbind
    sizes = [1 if removed else p.shape[dim] for p in pieces]
    offsets = [sum(sizes[:k]) for k in range(len(sizes))]
    new: list[list[Field]] = [[] for _ in pieces]
    for f in st.fields(src):
        if dim not in f.dims:
            for k in range(len(pieces)):
                new[k].append(f.moved({d: d - (removed and d > dim) for d in f.dims}))
            continue
        ax = f.dims.index(dim)
        if len(f.dims) == 1:
            if not removed and len(set(sizes)) > 1 and _unequal_split(st, f.atoms, sizes):
                for k in range(len(pieces)):  # each piece its own channels, its size held by an attribute
                    new[k].append(Field(f.dims, f.atoms.narrow(0, offsets[k], sizes[k])))
                continue
            if removed or len(set(sizes)) != 1 or len(pieces) < 2:
                st.freeze(f.atoms)  # unequal pieces whose sizes no attribute holds: constants of the code
                continue
            grid = f.atoms.reshape(len(pieces), sizes[0])
            if st.split_call is not None and st.split_call[0] == "size" and not _size_split(st, grid):
                st.freeze(f.atoms)
                continue
            st.restrict(Field((0, 1), grid), [1], note=f"uniform split ({st.where()} {func.overloadpacket.__name__})")
            for k in range(len(pieces)):
                new[k].append(Field(f.dims, grid[k]))
            continue
        _uniform_along(st, f, ax)
        for k in range(len(pieces)):
            if removed:
                g = Field(tuple(d - (d > dim) for d in f.dims if d != dim), f.atoms.select(ax, k))
            else:
                g = Field(f.dims, f.atoms.narrow(ax, offsets[k], sizes[k]))
            new[k].append(g)
    for p, fields in zip(pieces, new):
        st.set_fields(p, fields)


def _unequal_split(st: TraceState, atoms: torch.Tensor, sizes: list[int]) -> bool:
    """Record ``torch.split(x, [a, b, ...])`` into unequal pieces when the plan can update their sizes: every piece
    but at most one has integer attributes of the running module, or of a direct child not from torch
    (``update_block.hidden_state_size``), whose name says they are a size and whose value is that piece's size. The
    other piece keeps its channels (its size may be a literal, as timm's ``qkv.split([1, dim, dim])``, or computed
    from the total, as RAFT's ``x.shape[1] - hidden``). Each piece is then pruned on its own (pieces
    sized by the same attributes alike) and its attributes follow its kept count (one
    :class:`~prunekit.structured.tracer.SizeSplit` per piece). False (the
    channels are kept) otherwise, or under ``st.freeze_size_splits``; the check run catches a size that was a
    literal after all, and the plan's fallbacks keep those channels."""
    from prunekit.structured.tracer import SizeSplit

    if st.split_call is None or st.split_call[0] != "size" or st.freeze_size_splits is not None:
        return False
    name, module = st.stack[-1]
    sizes_of = _size_ints(_size_owners(module))
    held = [[k for k, v in sizes_of.items() if v == size] for size in sizes]
    if sum(not h for h in held) > 1:
        return False
    start, first = 0, {}
    for size, attrs in zip(sizes, held):
        piece = atoms[start:start + size]
        start += size
        if not attrs:  # a literal, or computed from the total (RAFT's): it keeps its size either way
            st.freeze(piece)
            continue
        key = (size, tuple(attrs))
        if key in first:  # pieces sized by the same attributes (timm's qkv.split([1, dim, dim])) are pruned alike
            st.union(first[key], piece)
            continue
        first[key] = piece
        st.size_splits.append(SizeSplit(name, f"split by {list(sizes)!r}: the piece of {size}", piece.reshape(1, size),
                                        {a: 1 for a in attrs}))
    return True


def _size_split(st: TraceState, grid: torch.Tensor) -> bool:
    """Record a ``torch.split(x, size)`` of a labelled dimension into equal pieces, with the integer attributes of
    the running module that hold the piece size (or the whole width) for the plan to update. False if its channels
    must be kept instead (``st.freeze_size_splits``: ``"all"``, or ``"unmatched"`` where no attribute holds it)."""
    from prunekit.structured.tracer import SizeSplit

    pieces, size = grid.shape
    name, module = st.stack[-1]
    attrs = {k: v // size for k, v in _int_attributes(module).items() if v in (size, size * pieces)}
    lists = [k for k, v in _sequence_attributes(module).items() if v == (size,) * pieces]
    if st.freeze_size_splits == "all" or (st.freeze_size_splits == "unmatched" and not attrs and not lists):
        return False
    st.size_splits.append(SizeSplit(name, f"split by {st.split_call[1]!r} into {pieces} pieces", grid, attrs, lists))
    return True


@_register(aten.index_select, aten.gather, aten.index, aten._unsafe_index)
def index(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    """Indexing with tensors: indexed labelled dimensions are frozen (indices are data); others move with the data."""
    src = args[0]
    if func.overloadpacket in (aten.index, aten._unsafe_index):
        indexed = {d for d, ix in enumerate(args[1]) if ix is not None}
    else:
        indexed = {_norm_dim(args[1], src.dim())}
    for t in _tensors(args[1:]):
        st.freeze_fields(st.fields(t))  # labelled index tensors: frozen
    keep = []
    for f in st.fields(src):
        if set(f.dims) & indexed:
            st.freeze(f.atoms)
        else:
            keep.append(f)
    if not keep:
        return
    new = []
    for f in keep:
        full = expand_field(f, src.shape).contiguous()
        g = factor(func(full, *args[1:], **kwargs))
        if g is not None and int((g.atoms >= 0).sum()) == int((f.atoms >= 0).sum()):
            new.append(g)
        else:
            st.freeze(f.atoms)
    st.set_fields(out, new)


def packed_features(st: TraceState, t: torch.Tensor, rows: int, shift: int) -> list[Field]:
    """Fields of ``t``'s feature dimensions (those after its first ``rows``), moved by ``shift`` dimensions; labels on
    the row dimensions (time, batch, packed steps) are frozen: which row goes where depends on the lengths (data).
    For packing (``(T, B, *F)`` -> ``(N, *F)``: rows 2, shift -1) and padding (rows 1, shift +1)."""
    fields = []
    for f in st.fields(t):
        if min(f.dims) < rows:
            st.freeze(f.atoms)
        else:
            fields.append(f.moved({d: d + shift for d in f.dims}))
    return fields


@_register(_op("_pack_padded_sequence"))
def pack_padded_sequence(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    """``(T, B, *F)`` (or ``(B, T, *F)``) -> packed ``data (N, *F)``: the feature dimensions keep their labels."""
    st.set_fields(out[0], packed_features(st, args[0], rows=2, shift=-1))


@_register(aten.embedding)
def embedding(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    weight, indices = args[0], args[1]
    fields = []
    for f in st.fields(weight):
        if 0 in f.dims:
            st.freeze(f.atoms)  # the vocabulary is indexed by data
        else:
            fields.append(Field((indices.dim(),), f.atoms))
    st.freeze_fields(st.fields(indices))
    st.set_fields(out, fields)


@_register(aten.roll)
def roll(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    src = args[0]
    dims = args[2] if len(args) > 2 else kwargs.get("dims", [])
    rolled = {_norm_dim(d, src.dim()) for d in dims} if dims else set(range(src.dim()))
    fields = []
    for f in st.fields(src):
        if set(f.dims) & rolled:
            st.freeze(f.atoms)  # the shift is a constant of the code
        else:
            fields.append(f)
    st.set_fields(out, fields)


@_register(aten.constant_pad_nd, aten.reflection_pad1d, aten.reflection_pad2d, aten.reflection_pad3d,
           aten.replication_pad1d, aten.replication_pad2d, aten.replication_pad3d, _op("_pad_circular"))
def pad(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    src, amounts = args[0], list(args[1])
    padded = {src.dim() - 1 - i // 2 for i, p in enumerate(amounts) if p != 0}
    fields = []
    for f in st.fields(src):
        if set(f.dims) & padded:
            st.freeze(f.atoms)
        else:
            fields.append(f)
    st.set_fields(out, fields)


@_register(aten.cat)
def cat(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    b = _bind(func, args, kwargs)
    tensors = [t for t in b["tensors"] if not (t.dim() == 1 and t.numel() == 0)]
    dim = _norm_dim(b["dim"] or 0, out.dim())
    if _cat_joint(st, tensors, dim, out):
        return
    pieces, others, labelled = [], [], False
    for t in tensors:
        on, rest = _take(st, st.fields(t), dim)
        labelled |= on is not None
        pieces.append(on if on is not None else torch.full((t.shape[dim],), -1, dtype=torch.int64))
        others.append((list(t.shape[:dim]) + [out.shape[dim]] + list(t.shape[dim + 1 :]), rest))
    fields = st.combine(out.shape, others)
    if labelled:
        fields = sorted(fields + [Field((dim,), torch.cat(pieces))], key=lambda f: f.dims)
    st.set_fields(out, fields)


def _cat_joint(st: TraceState, tensors: Sequence[torch.Tensor], dim: int, out: torch.Tensor) -> bool:
    """Concatenation along a dimension of joint fields with the same dimensions in every labelled input (rotary
    ``rotate_half`` concatenates halves of each head): the output field is the concatenation of the joint fields."""
    covering = [[f for f in st.fields(t) if dim in f.dims] for t in tensors]
    joint = [c[0] for c in covering if c]
    if not joint or any(len(f.dims) < 2 for f in joint) or len({f.dims for f in joint}) != 1:
        return False
    if any(len(st.fields(t)) != len(c) for t, c in zip(tensors, covering)):
        return False  # other fields besides the joint one: use the general rule
    dims = joint[0].dims
    ax = dims.index(dim)
    parts = []
    for t, c in zip(tensors, covering):
        if c:
            parts.append(c[0].atoms)
        else:
            parts.append(torch.full([t.shape[d] for d in dims], -1, dtype=torch.int64))
    st.set_fields(out, [Field(dims, torch.cat(parts, dim=ax))])
    return True


@_register(aten.stack)
def stack(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    b = _bind(func, args, kwargs)
    tensors = b["tensors"]
    dim = _norm_dim(b["dim"] or 0, out.dim())
    fields = st.combine(tensors[0].shape, [(t.shape, st.fields(t)) for t in tensors])
    st.set_fields(out, _shift(fields, {d: d + (d >= dim) for d in range(tensors[0].dim())}))


# --- elementwise --------------------------------------------------------------------------------------------------


def _broadcast_shape(t: torch.Tensor) -> tuple[int, ...]:
    """``t``'s shape with its stride-0 dimensions as 1: an ``expand`` of a size-1 dimension (``expand_as(x)`` in
    ``F.normalize``) is a broadcast, not data of that size. If its size was a literal instead of following ``x``, the
    pruned model's check run breaks on it and the plan traces again with ``freeze_broadcasts``."""
    return tuple(1 if n > 1 and t.stride(d) == 0 else n for d, n in enumerate(t.shape))


@_register(aten._prelu_kernel, aten.hardswish, aten.hardswish_, aten.native_dropout, aten.copy_, aten.copy,
           aten.masked_fill_, aten.where, aten.lerp_, aten.addcmul_, aten.addcdiv_, aten.clamp_,
           aten.masked_fill, _op("max.other"), _op("min.other"))
def pointwise(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    outs = _tensors(out)
    if not outs:
        return
    shape = outs[0].shape
    inputs = _tensors((args, kwargs))
    if func.overloadpacket in (aten.copy_,) and args[0]._is_view() and st.fields(args[1]):
        st.unsupported(func, "an in-place copy of prunable channels into a view of another tensor")
    fields = st.combine(shape, [(t.shape if st.freeze_broadcasts else _broadcast_shape(t), st.fields(t))
                                for t in inputs if t.dim() > 0])
    if not st.freeze_broadcasts:
        for t in inputs:  # an expanded input follows the channels it meets: its recorded size shrinks with them
            spread = {d for d in range(t.dim()) if t.shape[d] > 1 and t.stride(d) == 0}
            if not spread or t.shape != shape or any(t is o for o in outs):
                continue
            own = {d for g in st.fields(t) for d in g.dims}
            extra = [f for f in fields if set(f.dims) & spread and set(f.dims) <= spread | own]
            if extra and not own & spread:
                st.relabel(t, [*st.fields(t), *extra])
                st.broadcasts_followed += 1
    for t in outs:
        if t.shape == shape:
            st.set_fields(t, fields)


@_register(aten.index_put, aten.index_put_, _op("_index_put_impl_"), _op("_unsafe_index_put"))
def index_put(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    """``dest[idx] = values`` with index tensors on the leading dimensions: the dimensions after them keep their
    channels. Values' labels there are coupled with the destination's; an unlabelled destination (a buffer made with
    ``zeros``, as ``MultiScaleRoIAlign`` does) takes the values' labels, and its record is updated: its size is taken
    to follow the values' (if it came from a constant instead, the check run breaks and the plan keeps the module
    whole). Anything indexed, or indices after a full slice, freezes."""
    dest, indices, values = args[0], list(args[1]), args[2]
    if any(ix is None for ix in indices) or not isinstance(values, torch.Tensor):
        return data_dependent(st, func, args, kwargs, out)
    for ix in indices:
        st.freeze_fields(st.fields(ix))
    k = sum(ix.dim() if ix.dtype in (torch.bool, torch.uint8) else 1 for ix in indices)  # leading dims indexed
    fields = []
    for f in st.fields(dest):
        if min(f.dims) < k:
            st.freeze(f.atoms)
        else:
            fields.append(f)
    labelled = bool(fields)
    off = dest.dim() - values.dim()
    for f in st.fields(values):
        if min(f.dims) + off < k or (not labelled and dest._is_view()):  # (a view's base would stay unlabelled)
            st.freeze(f.atoms)
        else:
            fields.append(Field(tuple(d + off for d in f.dims), f.atoms))
    if not labelled and fields:
        st.relabel(dest, fields)  # the buffer was unlabelled: it is labelled from its creation on
    st.set_fields(out, fields)


@_register(aten.scatter, aten.scatter_, aten.scatter_add, aten.scatter_add_,
           aten.scatter_reduce, aten.scatter_reduce_, aten.masked_scatter, aten.slice_scatter, aten.select_scatter,
           aten.index_add, aten.index_add_, aten.index_copy, aten.index_copy_, aten.nonzero, aten.sort, aten.topk,
           aten.argsort, aten.kthvalue, aten.unique_dim, aten._unique2, aten.searchsorted, aten.bucketize)
def data_dependent(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    """Data-dependent placement: every labelled input is frozen; the result keeps the destination's fields."""
    for t in _tensors((args, kwargs)):
        st.freeze_fields(st.fields(t))
    if func.overloadpacket in (aten.index_put, aten.scatter, aten.scatter_add, aten.scatter_reduce,
                               aten.masked_scatter, aten.slice_scatter, aten.select_scatter, aten.index_add,
                               aten.index_copy):
        st.set_fields(out, st.fields(args[0]))


@_register(
    _op("_local_scalar_dense"), aten.is_nonzero, aten.equal, aten.allclose, _op("_assert_async"),
    aten.new_zeros, aten.new_ones, aten.new_empty, aten.new_full, aten.new_empty_strided, _op("sym_size"),
    _op("sym_numel"), _op("sym_stride"), _op("_has_compatible_shallow_copy_type"), _op("is_same_size"),
    _op("_assert_scalar"), _op("set_"),
)
def no_labels(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    """Results that carry no channel structure (scalars, tensors of a literal shape)."""


# --- contractions -------------------------------------------------------------------------------------------------


@_register(aten.mm, aten.addmm, aten.mv, aten.addmv, aten.dot, aten.vdot)
def mm(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    packet = func.overloadpacket
    bias = args[0] if packet in (aten.addmm, aten.addmv) else None
    a, b = (args[1], args[2]) if bias is not None else (args[0], args[1])
    la, rest_a = _take(st, st.fields(a), a.dim() - 1)
    lb, rest_b = _take(st, st.fields(b), 0)
    _meet(st, la, lb)
    fields = []
    if a.dim() == 2:
        fields += [f for f in rest_a if f.dims == (0,)]
    if b.dim() == 2:
        fields += [Field((out.dim() - 1,), f.atoms) for f in rest_b if f.dims == (1,)]
    if bias is not None:
        fields = st.combine(out.shape, [(out.shape, fields), (bias.shape, st.fields(bias))])
    st.set_fields(out, fields)


def _resolve_batch(st: TraceState, fields: Sequence[Field], batch: set[int], rule: str, where: str) -> list[Field]:
    """Joint fields spanning batch and matrix dimensions of an attention contraction: keep whole heads (``heads``)
    or the same head dimensions in every head (``uniform``)."""
    out = []
    for f in fields:
        fb, fo = set(f.dims) & batch, set(f.dims) - batch
        if fb and fo:
            f = st.restrict(f, fb if rule == "heads" else fo, note=f"{rule} ({where})")
            if f is None:
                continue
        out.append(f)
    return out


@_register(aten.bmm, aten.baddbmm)
def bmm(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    bias = args[0] if func.overloadpacket is aten.baddbmm else None
    a, b = (args[1], args[2]) if bias is not None else (args[0], args[1])
    rule, where = st.attention_rule(), st.where()
    fa = _resolve_batch(st, st.fields(a), {0}, rule, where)
    fb = _resolve_batch(st, st.fields(b), {0}, rule, where)
    ba, fa = _take(st, fa, 0)
    bb, fb = _take(st, fb, 0)
    _meet(st, ba, bb)
    la, fa = _take(st, fa, 2)
    lb, fb = _take(st, fb, 1)
    _meet(st, la, lb)
    fields = []
    if ba is not None or bb is not None:
        fields.append(Field((0,), ba if ba is not None else bb))
    fields += [f for f in fa if f.dims == (1,)]
    fields += [Field((2,), f.atoms) for f in fb if f.dims == (2,)]
    if bias is not None:
        fields = st.combine(out.shape, [(out.shape, fields), (bias.shape, st.fields(bias))])
    st.set_fields(out, fields)


@_register(
    aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_cudnn_attention,
    _op("_scaled_dot_product_fused_attention_overrideable"),
)
def sdpa(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    bnd = _bind(func, args, kwargs)
    q, k, v = bnd["query"], bnd["key"], bnd["value"]
    mask = bnd.get("attn_mask", bnd.get("attn_bias"))
    nb = q.dim() - 2
    batch = set(range(nb))
    rule, where = st.attention_rule(), st.where()
    fq, fk, fv = (_resolve_batch(st, st.fields(t), batch, rule, where) for t in (q, k, v))
    if nb and k.shape[nb - 1] != q.shape[nb - 1]:  # grouped-query attention: q heads share a kv head
        rep = q.shape[nb - 1] // k.shape[nb - 1]
        fk = [Field(f.dims, f.atoms.repeat_interleave(rep, dim=f.dims.index(nb - 1))) if nb - 1 in f.dims else f
              for f in fk]
        fv = [Field(f.dims, f.atoms.repeat_interleave(rep, dim=f.dims.index(nb - 1))) if nb - 1 in f.dims else f
              for f in fv]
    # contracted: q's and k's head dimension; k's and v's sequence
    lq, fq = _take(st, fq, nb + 1)
    lk, fk = _take(st, fk, nb + 1)
    _meet(st, lq, lk)
    if bnd.get("scale") is None and (lq is not None or lk is not None):  # the default 1/sqrt(E) reads q's size
        st.flag(lq if lq is not None else lk, "scaled by its size")
    sk, fk = _take(st, fk, nb)
    sv, fv = _take(st, fv, nb)
    _meet(st, sk, sv)
    ev, fv = _take(st, fv, nb + 1)
    # batch dimensions (batch, heads) of q, k, v, an additive mask and the scores all meet
    scores = list(q.shape[:-1]) + [k.shape[-2]]
    operands = [(scores, [f for f in fl if max(f.dims) < nb]) for fl in (fq, fk, fv)]
    sequence = [1] * nb + scores[nb:]  # broadcasts over the batch dimensions
    operands.append((sequence, [f for f in fq if f.dims == (nb,)] + ([Field((nb + 1,), sk)] if sk is not None else [])))
    if mask is not None:
        operands.append((mask.shape, st.fields(mask)))
    fields = [f for f in st.combine(scores, operands) if max(f.dims) <= nb]
    outs = _tensors(out)
    st.set_fields(outs[0], fields + ([Field((nb + 1,), ev)] if ev is not None else []))
    for t in outs[1:]:
        if t.dim() == nb + 1 and list(t.shape) == list(q.shape[:-1]):
            st.set_fields(t, fields)


@_register(aten.convolution, aten._convolution)
def convolution(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    bnd = _bind(func, args, kwargs)
    _conv(st, bnd["input"], bnd["weight"], bnd["bias"], bool(bnd["transposed"]), int(bnd["groups"]), out)


def _conv(st: TraceState, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, transposed: bool, groups: int,
          out: torch.Tensor, frozen_input: bool = False) -> None:
    """Convolution: input channels meet the weight's input dimension, the output carries its output dimension.
    ``frozen_input``: the input channels are not prunable (a deformable convolution's offset groups)."""
    lx, rest = _take(st, st.fields(x), 1)
    if frozen_input and lx is not None:
        st.freeze(lx)
    st.freeze_fields(rest)  # labels on spatial (or batch) positions cannot meet a kernel
    fw = st.fields(w)
    for f in fw:
        if any(d >= 2 for d in f.dims):
            st.freeze(f.atoms)  # kernel positions are not channels
            st.structural.append(f.atoms)
    fw = [f for f in fw if all(d < 2 for d in f.dims)]
    w_in_dim, w_out_dim = (0, 1) if transposed else (1, 0)
    l_in, fw = _take(st, fw, w_in_dim)
    l_out, _ = _take(st, fw, w_out_dim)
    where = st.where()
    if groups == 1:
        _meet(st, lx, l_in)
        out_atoms = l_out
    else:
        if transposed:  # weight (C_in, C_out/g, ...): dim 1 is shared by all groups
            cin = w.shape[0]
            grp_in = st.restrict(Field((0, 1), l_in.reshape(groups, cin // groups)), [0]) if l_in is not None else None
            if l_out is not None:
                st.freeze(l_out)
            _meet(st, lx, l_in)
            out_atoms = None
            if grp_in is not None:
                out_atoms = grp_in.atoms.repeat_interleave(out.shape[1] // groups)
                st.note(l_in, f"conv groups ({where})")
        else:  # weight (C_out, C_in/g, ...): dim 1 is shared by all groups, prune whole groups
            if l_in is not None:
                st.freeze(l_in)
            cin = x.shape[1]
            gx = st.restrict(Field((0, 1), lx.reshape(groups, cin // groups)), [0]) if lx is not None else None
            go = st.restrict(Field((0, 1), l_out.reshape(groups, -1)), [0]) if l_out is not None else None
            _meet(st, gx.atoms if gx else None, go.atoms if go else None)
            if l_out is not None:
                st.note(l_out, f"conv groups ({where})")
            out_atoms = l_out
    if bias is not None:
        lb, _ = _take(st, st.fields(bias), 0)
        _meet(st, out_atoms, lb)
    st.set_fields(out, [Field((1,), out_atoms)] if out_atoms is not None else [])


# --- torchvision's operators (detection) ----------------------------------------------------------------------------


def _roi(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    """``roi_align`` / ``roi_pool``: features ``(N, C, H, W)`` pooled per box into ``(K, C, h, w)``; the channels pass
    through, labels on batch or spatial positions and on the boxes are frozen."""
    lx, rest = _take(st, st.fields(args[0]), 1)
    st.freeze_fields(rest)
    for t in _tensors((args[1:], kwargs)):
        st.freeze_fields(st.fields(t))
    pooled = out[0] if isinstance(out, (tuple, list)) else out  # (roi_pool also returns its argmax indices)
    st.set_fields(pooled, [Field((1,), lx)] if lx is not None else [])


def _deform_conv2d(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    """A convolution whose sampling positions come from ``offset`` (and ``mask``): the offsets' channels are laid out
    per kernel position (kept); with several offset groups the input channels are kept too."""
    b = _bind(func, args, kwargs)
    for key in ("offset", "mask"):
        if isinstance(b[key], torch.Tensor):
            st.freeze_fields(st.fields(b[key]))
    _conv(st, b["input"], b["weight"], b["bias"], False, int(b["groups"]), out,
          frozen_input=int(b["offset_groups"]) > 1)


# ``nms`` (boxes and scores in, indices out) and the position-sensitive ``ps_roi_*`` (output channel c reads input
# channels c * h * w ..., one per bin of the pooled grid) keep every labelled input, as ``data_dependent`` does
NAMED_RULES.update({"torchvision::roi_align": _roi, "torchvision::roi_pool": _roi,
                    "torchvision::ps_roi_align": data_dependent, "torchvision::ps_roi_pool": data_dependent,
                    "torchvision::deform_conv2d": _deform_conv2d, "torchvision::nms": data_dependent})


# --- normalisation ------------------------------------------------------------------------------------------------


def _channel_params(params: Sequence[Any], ndim: int, st: TraceState) -> list[tuple[list[int], list[Field]]]:
    """Operands for per-channel parameters ``(C,)``, shaped ``(C, 1, ...)`` so that they broadcast onto dim 1."""
    return [([p.shape[0]] + [1] * (ndim - 2), st.fields(p)) for p in params
            if isinstance(p, torch.Tensor) and p.dim() == 1]


@_register(aten.native_batch_norm, aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit,
           aten._native_batch_norm_legit_functional, aten.cudnn_batch_norm, aten.miopen_batch_norm,
           _op("_batch_norm_with_update"), _op("_batch_norm_no_update"))
def batch_norm(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    params = [a for a in args[1:5] if isinstance(a, torch.Tensor)]
    fields = st.combine(x.shape, [(x.shape, st.fields(x))] + _channel_params(params, x.dim(), st))
    # with batch statistics every dimension but the channels is normalised over: weight standardisation
    # (timm's StdConv2d / ScaledStdConv2d run batch_norm on the (1, out, in * k * k) weight)
    training = next((a for a in args[1:] if isinstance(a, bool)), False)  # the op's training flag, if it has one
    if training or func.overloadpacket is _op("_batch_norm_with_update"):
        for f in fields:
            if any(d != 1 for d in f.dims):
                st.flag(f.atoms, "normalised")
    outs = _tensors(out)
    st.set_fields(outs[0], fields)
    channel = [Field((0,), f.atoms) for f in fields if f.dims == (1,)]
    for t in outs[1:]:
        if t.dim() == 1 and t.shape[0] == x.shape[1]:
            st.set_fields(t, channel)


@_register(aten.native_layer_norm)
def layer_norm(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    x, normalized, weight, bias = args[0], list(args[1]), args[2], args[3]
    axis = x.dim() - len(normalized)
    operands = [(x.shape, st.fields(x))] + [(p.shape, st.fields(p)) for p in (weight, bias) if p is not None]
    fields = st.combine(x.shape, operands)
    for f in fields:
        if any(d >= axis for d in f.dims):
            st.flag(f.atoms, "normalised")
    outs = _tensors(out)
    st.set_fields(outs[0], fields)
    for t in outs[1:]:
        st.set_fields(t, [f for f in fields if max(f.dims) < axis])


@_register(aten.native_group_norm)
def group_norm(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    x, weight, bias, groups = args[0], args[1], args[2], int(args[6])
    fields = st.combine(x.shape, [(x.shape, st.fields(x))] + _channel_params([weight, bias], x.dim(), st))
    per_group: list[Field] = []
    for f in fields:
        if f.dims == (1,) and groups > 1:
            g = st.restrict(Field((0, 1), f.atoms.reshape(groups, -1)), [0], note=f"norm groups ({st.where()})")
            per_group = [Field((1,), g.atoms)] if g is not None else []
        elif 1 in f.dims:
            st.flag(f.atoms, "normalised")
    outs = _tensors(out)
    st.set_fields(outs[0], fields)
    for t in outs[1:]:  # mean and rstd, (N, groups)
        st.set_fields(t, per_group)


# --- reductions -----------------------------------------------------------------------------------------------------


@_register(
    aten.sum, aten.mean, aten.amax, aten.amin, aten.max, aten.min, aten.var, aten.std, aten.var_mean, aten.std_mean,
    aten.prod, aten.logsumexp, aten.linalg_vector_norm, aten.norm, aten.any, aten.all, aten.argmax, aten.argmin,
    aten.count_nonzero, aten.nansum, aten.nanmean, aten.median, aten.mode,
)
def reduction(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    bnd = _bind(func, args, kwargs)
    x = args[0]
    dims = bnd.get("dim")
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        reduced = set(range(x.dim()))
    else:
        dims = dims if isinstance(dims, (list, tuple)) else [dims]
        reduced = {_norm_dim(d, x.dim()) for d in dims}
    keepdim = bool(bnd.get("keepdim") or False)
    fields = []
    for f in st.fields(x):
        hit = set(f.dims) & reduced
        if hit:
            st.flag(f.atoms, "reduced")
            if not set(f.dims) - reduced:
                continue  # reduced away entirely: nothing to couple
            # in attention that keeps its heads (a handler's "uniform"), a reduction over the head dimension need not
            # force whole heads; elsewhere a joint field keeps whole slices along its other dims
            uniform = st.attention_rule() == "uniform"
            f = _reduced_joint(st, f, reduced) if uniform else st.restrict(f, set(f.dims) - reduced)
        fields.append(f if keepdim else f.moved({d: d - sum(r < d for r in reduced) for d in f.dims}))
    ndim = x.dim() if keepdim else x.dim() - len(reduced)
    _set_all(st, out, fields, ndim)


def _reduced_joint(st: TraceState, f: Field, reduced: set[int]) -> Field:
    """A joint field reduced along some of its dimensions (a norm over the head dimension of ``(heads, d)`` in
    attention whose handler prunes the same head dimensions in every head): the result gets fresh atoms along the
    kept dimensions, coupled to the joint's units at the end of the trace if those are constant along the reduced
    dimensions, else left alone (each head's reduction just runs over fewer positions)."""
    kept = [d for d in f.dims if d not in reduced]
    axes = tuple(f.dims.index(d) for d in kept)
    shape = [f.atoms.shape[a] for a in axes]
    fresh = st.new_atoms(math.prod(shape)).reshape(shape)
    st.pending.append((fresh, f.atoms, axes))
    return Field(tuple(kept), fresh)


@_register(aten._softmax, aten._log_softmax, aten.softmax, aten.log_softmax, _op("_safe_softmax"), aten.cumsum,
           aten.cumprod, aten.logcumsumexp, aten.cummax, aten.cummin)
def along_dim(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
    x, dim = args[0], _norm_dim(args[1], args[0].dim())
    fields = st.fields(x)
    for f in fields:
        if dim in f.dims:
            st.flag(f.atoms, "normalised")
    _set_all(st, out, fields, x.dim())


def _spatial(k: int) -> Rule:
    def rule(st: TraceState, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        x = args[0]
        spatial = set(range(x.dim() - k, x.dim()))
        fields = []
        for f in st.fields(x):
            if set(f.dims) & spatial:
                st.freeze(f.atoms)  # pooling/resampling mixes spatial positions
            else:
                fields.append(f)
        _set_all(st, out, fields, x.dim())

    return rule


for _k, _names in {
    1: ["avg_pool1d", "max_pool1d", "max_pool1d_with_indices", "adaptive_max_pool1d", "upsample_nearest1d",
        "_upsample_nearest_exact1d", "upsample_linear1d"],
    2: ["avg_pool2d", "max_pool2d", "max_pool2d_with_indices", "_adaptive_avg_pool2d", "adaptive_avg_pool2d",
        "adaptive_max_pool2d", "upsample_nearest2d", "_upsample_nearest_exact2d", "upsample_bilinear2d",
        "upsample_bicubic2d", "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa", "mkldnn_adaptive_avg_pool2d",
        "fractional_max_pool2d", "grid_sampler_2d"],
    3: ["avg_pool3d", "max_pool3d", "max_pool3d_with_indices", "_adaptive_avg_pool3d", "adaptive_max_pool3d",
        "upsample_nearest3d", "_upsample_nearest_exact3d", "upsample_trilinear3d", "grid_sampler_3d"],
}.items():
    _register(*[_op(n) for n in _names])(_spatial(_k))
