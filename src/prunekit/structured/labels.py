"""Channel labels: which prunable *atom* sits at each position of a tensor dimension, and how atoms get coupled.

An **atom** is one position of one dimension of a parameter or floating-point buffer (``conv.weight`` dim 0
position 5 is one atom). Every tensor seen while tracing carries a list of :class:`Field`: a field covers one or
more of the tensor's dimensions and holds, for each position of those dimensions, the atom found there (``-1``: no
atom, e.g. data that came from the model input). A field over one dimension is the common case (the channels of an
activation); a field over several dimensions appears when a view splits a labelled dimension (``(E) -> (H, d)``
attention heads, ``(C) -> (g, C/g)`` channel shuffle) and stays *joint* until an operation decides which of those
dimensions carries the prunable unit.

Operations couple atoms: a residual addition says "channel i of x and channel i of y must be pruned together"
(:meth:`LabelState.union`), a slice with a constant bound says "these channels can never be pruned"
(:meth:`LabelState.freeze`). After the trace the union-find classes of atoms are the prunable units.

Examples:
    >>> import torch
    >>> state = LabelState()
    >>> a, b = state.new_atoms(3), state.new_atoms(3)
    >>> state.union(a, b)
    >>> state.freeze(a[2:])
    >>> roots = state.components()
    >>> bool(roots[a[0]] == roots[b[0]]), bool(roots[a[0]] == roots[a[1]])
    (True, False)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["Field", "LabelState", "components", "expand_field", "factor"]


@dataclass(frozen=True)
class Field:
    """Atoms over some dimensions of a tensor.

    Attributes:
        dims: The tensor dimensions covered, ascending.
        atoms: int64 tensor whose shape is the sizes of those dimensions; ``-1`` where there is no atom.
    """

    dims: tuple[int, ...]
    atoms: torch.Tensor

    def moved(self, mapping: dict[int, int]) -> Field:
        """The same field after the tensor's dimensions were renumbered by ``mapping`` (old -> new)."""
        new = [mapping[d] for d in self.dims]
        order = sorted(range(len(new)), key=new.__getitem__)
        atoms = self.atoms.permute(order) if order != list(range(len(order))) else self.atoms
        return Field(tuple(new[i] for i in order), atoms)

    def size(self, dim: int) -> int:
        return int(self.atoms.shape[self.dims.index(dim)])


def expand_field(field: Field, shape: Sequence[int]) -> torch.Tensor:
    """The field's atoms broadcast to the full tensor ``shape`` (a view, no copy)."""
    view = [1] * len(shape)
    for i, d in enumerate(field.dims):
        view[d] = field.atoms.shape[i]
    return field.atoms.reshape(view).expand(*shape)


def factor(full: torch.Tensor) -> Field | None:
    """Compress a full-shape atom tensor to a field over the dimensions along which it varies.

    Returns None if the tensor holds a single value (no dimension carries labels).
    """
    if full.numel() == 0:
        return None
    dims = []
    for d in range(full.dim()):
        if full.shape[d] > 1 and bool((full != full.narrow(d, 0, 1)).any()):
            dims.append(d)
    if not dims:
        return None
    index = tuple(slice(None) if d in dims else 0 for d in range(full.dim()))
    return Field(tuple(dims), full[index].clone())


def components(n: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Connected components of the graph on ``n`` nodes with edges ``a[i] -- b[i]``: the smallest node id of each
    node's component (vectorised min-label propagation with pointer jumping).

    Examples:
        >>> components(5, torch.tensor([0, 3]), torch.tensor([2, 4])).tolist()
        [0, 1, 0, 3, 3]
    """
    label = torch.arange(n, dtype=torch.int64)
    if a.numel() == 0:
        return label
    while True:
        la, lb = label[a], label[b]
        m = torch.minimum(la, lb)
        new = label.clone()
        for idx in (a, b, la, lb):
            new.scatter_reduce_(0, idx, m, reduce="amin")
        while True:  # pointer jumping: every node points at its (current) root
            jumped = new[new]
            if torch.equal(jumped, new):
                break
            new = jumped
        if torch.equal(new, label):
            return label
        label = new


class LabelState:
    """Atoms and the couplings between them, collected while tracing.

    Couplings are recorded as data (edge lists, frozen atoms, flags, notes); :meth:`components` resolves them.
    """

    def __init__(self) -> None:
        self.n_atoms = 0
        self._frozen_mask = torch.zeros(1024, dtype=torch.bool)  # atoms frozen directly (grows with n_atoms)
        self._edges_a: list[torch.Tensor] = []
        self._edges_b: list[torch.Tensor] = []
        self._frozen: list[torch.Tensor] = []
        #: (atoms, kind): atoms that an operation reduced or normalised over (soft pruning differs from physical).
        self.flags: list[tuple[torch.Tensor, str]] = []
        #: (atoms, text): how atoms were grouped (conv groups, heads, uniform split), for the summary.
        self.notes: list[tuple[torch.Tensor, str]] = []
        #: Joint fields created by splitting views: each must end up pruned in slabs (see ``finalize``).
        self.splits: list[tuple[torch.Tensor, str]] = []
        #: Atoms of dimensions that are not channels at all (convolution kernel positions): frozen, not reported.
        self.structural: list[torch.Tensor] = []
        #: (partner, joint, axes): partner coupled to the joint field over ``axes`` only if the joint's units allow it.
        self.pending: list[tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]] = []

    # --- atoms and couplings -----------------------------------------------------------------------------------
    def new_atoms(self, n: int) -> torch.Tensor:
        atoms = torch.arange(self.n_atoms, self.n_atoms + n, dtype=torch.int64)
        self.n_atoms += n
        if self.n_atoms > self._frozen_mask.numel():
            grown = torch.zeros(max(2 * self._frozen_mask.numel(), self.n_atoms), dtype=torch.bool)
            grown[: self._frozen_mask.numel()] = self._frozen_mask
            self._frozen_mask = grown
        return atoms

    def all_frozen(self, atoms: torch.Tensor) -> bool:
        """True if every atom (ignoring -1) was frozen directly: such a field carries nothing prunable."""
        atoms = atoms[atoms >= 0]
        return bool(self._frozen_mask[atoms].all())

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Couple ``a`` and ``b`` position by position (broadcast); an atom facing an unlabelled position is frozen."""
        a, b = torch.broadcast_tensors(a, b)
        a, b = a.reshape(-1), b.reshape(-1)
        la, lb = a >= 0, b >= 0
        both = la & lb
        if bool(both.any()):
            self._edges_a.append(a[both])
            self._edges_b.append(b[both])
        self.freeze(a[la & ~lb])
        self.freeze(b[lb & ~la])

    def freeze(self, atoms: torch.Tensor) -> None:
        """These atoms (and everything coupled to them) are never pruned."""
        atoms = atoms.reshape(-1)
        atoms = atoms[atoms >= 0]
        if atoms.numel():
            self._frozen.append(atoms)
            self._frozen_mask[atoms] = True

    def freeze_fields(self, fields: Iterable[Field]) -> None:
        for f in fields:
            self.freeze(f.atoms)

    def flag(self, atoms: torch.Tensor, kind: str) -> None:
        atoms = atoms.reshape(-1)
        atoms = atoms[atoms >= 0]
        if atoms.numel():
            self.flags.append((atoms, kind))

    def note(self, atoms: torch.Tensor, text: str) -> None:
        atoms = atoms.reshape(-1)
        atoms = atoms[atoms >= 0]
        if atoms.numel():
            self.notes.append((atoms, text))

    # --- field algebra -----------------------------------------------------------------------------------------
    def restrict(self, field: Field, keep: Iterable[int], note: str | None = None) -> Field | None:
        """Keep only the dimensions ``keep`` of a field: positions along the other dimensions are coupled."""
        keep = tuple(sorted(set(keep) & set(field.dims)))
        drop = tuple(i for i, d in enumerate(field.dims) if d not in keep)
        if not drop:
            return field
        rep = field.atoms.amax(dim=drop, keepdim=True)
        self.union(field.atoms, rep)
        if note:
            self.note(field.atoms, note)
        if not keep:
            return None
        return Field(keep, rep.reshape([field.atoms.shape[field.dims.index(d)] for d in keep]))

    def merge(self, fields: Sequence[Field]) -> list[Field]:
        """Merge fields of one tensor that share dimensions (from operands of a pointwise operation)."""
        result: list[Field] = []
        for f in sorted(fields, key=lambda f: -len(f.dims)):
            for i, r in enumerate(result):
                common = set(f.dims) & set(r.dims)
                if not common:
                    continue
                if set(f.dims) == set(r.dims):
                    self.union(f.atoms, r.atoms)
                elif set(f.dims) < set(r.dims):
                    self.pending.append((f.atoms, r.atoms, tuple(r.dims.index(d) for d in f.dims)))
                else:  # partial overlap (rare): couple over the union of the dimensions
                    dims = tuple(sorted(set(f.dims) | set(r.dims)))
                    sizes = {d: f.size(d) for d in f.dims} | {d: r.size(d) for d in r.dims}
                    shape = [sizes[d] for d in dims]
                    fa = Field(tuple(dims.index(d) for d in f.dims), f.atoms)
                    ra = Field(tuple(dims.index(d) for d in r.dims), r.atoms)
                    ea, er = expand_field(fa, shape), expand_field(ra, shape)
                    self.union(ea, er)
                    result[i] = Field(dims, torch.maximum(ea, er).contiguous())
                break
            else:
                result.append(f)
        return sorted(result, key=lambda f: f.dims)

    def combine(self, out_shape: Sequence[int],
                operands: Sequence[tuple[Sequence[int], Sequence[Field]]]) -> list[Field]:
        """Fields of the result of a broadcasting elementwise operation.

        Positions that meet along a dimension are coupled. A labelled dimension that meets an unlabelled one of the
        same (non-broadcast) size is frozen: the unlabelled tensor could not shrink with it.
        """
        nd = len(out_shape)
        fields: list[Field] = []
        parts: list[tuple[set[int], list[Field]]] = []
        for shape, flds in operands:
            off = nd - len(shape)
            if off < 0:
                continue
            part = {d + off for d in range(len(shape)) if shape[d] == out_shape[d + off] and shape[d] > 1}
            shifted = [Field(tuple(d + off for d in f.dims), f.atoms) for f in flds]
            shifted = [f for f in shifted if set(f.dims) <= part]
            parts.append((part, shifted))
            fields.extend(shifted)
        for e in range(nd):
            cover = [f for f in fields if e in f.dims]
            if cover and any(e in part and not any(e in f.dims for f in fl) for part, fl in parts):
                self.freeze_fields(cover)
        return self.merge(fields)

    # --- resolution --------------------------------------------------------------------------------------------
    def edges(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._edges_a:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
        self._edges_a = [torch.cat(self._edges_a)]
        self._edges_b = [torch.cat(self._edges_b)]
        return self._edges_a[0], self._edges_b[0]

    def frozen_atoms(self) -> torch.Tensor:
        if not self._frozen:
            return torch.zeros(0, dtype=torch.int64)
        self._frozen = [torch.cat(self._frozen).unique()]
        return self._frozen[0]

    def components(self) -> torch.Tensor:
        """Root (smallest atom id) of every atom's class under the couplings recorded so far."""
        a, b = self.edges()
        return components(self.n_atoms, a, b)

    def finalize(self) -> torch.Tensor:
        """Resolve pending couplings and unresolved splits; returns the roots of all atoms.

        * A split view's atoms must be prunable in slabs: units either constant along all but one of the split
          dimensions. If the trace did not decide (no attention consumed it), the default couples the positions
          along all outer dimensions: the same inner index is pruned in every group (channel shuffle, chunk).
        * A pending partner (a tensor over fewer dimensions that met a joint field, e.g. a per-head-dim norm weight
          or rotary table meeting ``(H, d)``) is coupled if the joint's units are constant along its missing
          dimensions, and frozen otherwise (it lies along a dimension that is not pruned).
        """
        applied: set[int] = set()
        while True:
            roots = self.components()
            changed = False
            for i, (partner, joint, axes) in enumerate(self.pending):
                if i in applied:
                    continue
                rest = tuple(k for k in range(joint.dim()) if k not in axes)
                if _constant_along(roots, joint, rest):
                    # partner and joint dimensions are both in ascending tensor order, so the axes line up
                    self.union(partner, joint.amax(dim=rest) if rest else joint)
                    applied.add(i)
                    changed = True
            for grid, text in self.splits:
                axes = range(grid.dim())
                if grid.dim() < 2 or any(_constant_along(roots, grid, tuple(k for k in axes if k != x)) for x in axes):
                    continue
                self.restrict(Field(tuple(range(grid.dim())), grid), [grid.dim() - 1], note=f"uniform split ({text})")
                changed = True
            if not changed:
                break
        for i, (partner, _, _) in enumerate(self.pending):
            if i not in applied:
                self.freeze(partner)
        return self.components()


def _constant_along(roots: torch.Tensor, grid: torch.Tensor, axes: tuple[int, ...]) -> bool:
    """True if the classes of ``grid``'s atoms do not vary along ``axes`` (positions without atoms ignored)."""
    if not axes:
        return True
    r = torch.where(grid >= 0, roots[grid.clamp(min=0)], torch.full_like(grid, -1))
    hi = r.amax(dim=axes, keepdim=True)
    return bool(((r == hi) | (r < 0)).all())
