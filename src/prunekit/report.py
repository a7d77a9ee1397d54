"""What pruning did to a model: per-tensor sparsity, parameters, MACs and size, as text, JSON or a chart.

The report only reads the model and the masks; it never changes them.

Prunable tensors are the weights of the module types the pruner prunes by default
(``prunekit.targets.DEFAULT_TYPES``: ``nn.Linear``, ``nn.Conv*``, ``nn.ConvTranspose*``, and the query/key/value
projections of ``nn.MultiheadAttention``) plus every tensor named in
``masks``. Sparsity is the fraction of entries pruned, in [0, 1]: an entry is kept where its mask is True, or, for a
tensor without a mask, where it is non-zero. Sparsity over no entries (a model without prunable tensors) is 0.0:
nothing was pruned, so every number stays finite and the report works on any model.

MACs come from ``prunekit.flops.count_macs``: a tensor's dense MACs are those of the ops that read it, its
effective MACs are dense MACs × density (kept / total entries) — what a sparse kernel would execute. MACs of ops on
no prunable weight (attention's QK^T and AV, unpruned layers) count in full in both totals.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(4, 4, bias=False)
    >>> with torch.no_grad():
    ...     model.weight.view(-1)[:6] = 0
    >>> r = report(model, example_inputs=torch.randn(1, 4))
    >>> r.sparsity, r.nonzeros, r.dense_macs, r.effective_macs
    (0.375, 10, 16, 10)
    >>> r.rows[0].name, r.rows[0].shape
    ('weight', (4, 4))
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from prunekit.fileformat import atomic_write
from prunekit.flops import count_macs
from prunekit.pruner import unwrap
from prunekit.targets import DEFAULT_TYPES

__all__ = ["Report", "RunReport", "TensorRow", "report", "report_run"]


@dataclass(frozen=True)
class TensorRow:
    """One prunable tensor.

    Attributes:
        name: Parameter name as in ``model.named_parameters()``.
        kind: Class of the module that owns it, e.g. ``"Linear"``.
        shape: Tensor shape.
        params: Number of entries.
        nonzeros: Entries kept (mask True, or non-zero without a mask).
        sparsity: ``1 - nonzeros / params`` (0.0 for an empty tensor).
        dense_macs: MACs of the ops that read this tensor, or None without ``example_inputs``.
        effective_macs: ``dense_macs × nonzeros / params`` rounded to an integer, or None.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    params: int
    nonzeros: int
    sparsity: float
    dense_macs: int | None
    effective_macs: int | None


@dataclass(frozen=True)
class Report:
    """Sparsity, parameters, MACs and size of a model; build it with ``report()``.

    Attributes:
        rows: One row per prunable tensor, in ``named_parameters()`` order.
        params: All parameters, tied weights counted once.
        prunable_params: Entries of the prunable tensors.
        nonzeros: Kept entries of the prunable tensors.
        sparsity: Fraction of the prunable entries pruned.
        overall_sparsity: Pruned entries over all parameters (unprunable ones count as kept).
        dense_macs: MACs of the unpruned forward pass, or None without ``example_inputs``.
        effective_macs: MACs left when every prunable tensor skips its pruned entries, or None.
        mac_ratio: ``effective_macs / dense_macs`` (1.0 when ``dense_macs`` is 0), or None.
        dense_bytes: Parameter bytes stored densely in their own dtypes.
        sparse_bytes: Estimated bytes stored sparsely: kept values of the prunable tensors plus a 1-bit mask per
            entry, other parameters dense. Above ``dense_bytes`` at low sparsity, as a mask costs 1 bit an entry.
    """

    rows: tuple[TensorRow, ...]
    params: int
    prunable_params: int
    nonzeros: int
    sparsity: float
    overall_sparsity: float
    dense_macs: int | None
    effective_macs: int | None
    mac_ratio: float | None
    dense_bytes: int
    sparse_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """Return ``{"totals": {...}, "rows": [{...}, ...]}`` holding only JSON types (shapes as lists)."""
        totals = {key: value for key, value in asdict(self).items() if key != "rows"}
        rows = [{**asdict(row), "shape": list(row.shape)} for row in self.rows]
        return {"totals": totals, "rows": rows}

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """Return the report as JSON text, and write it to ``path`` if given (atomically: temp file + rename).

        Examples:
            >>> import json
            >>> from torch import nn
            >>> json.loads(report(nn.Linear(2, 3)).to_json())["totals"]["params"]
            9
        """
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        if path is not None:
            atomic_write(path, lambda file: file.write(text.encode()))
        return text

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Save a PNG bar chart of per-tensor sparsity, each bar labelled with its tensor's parameter count.

        Drawn with matplotlib's Agg canvas (no display, no change to pyplot's global state) and written
        atomically. A report without prunable tensors gives a chart that says so.

        Examples:
            >>> import pathlib, tempfile
            >>> from torch import nn
            >>> with tempfile.TemporaryDirectory() as folder:
            ...     png = pathlib.Path(folder, "sparsity.png")
            ...     report(nn.Linear(2, 3)).plot(png)
            ...     png.read_bytes()[:4]
            b'\\x89PNG'
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8, 1.6 + 0.3 * max(len(self.rows), 1)))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.set_xlim(0, 1.12)
        ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.set_xlabel("sparsity (fraction of entries pruned)")
        ax.set_title(f"{self.sparsity:.1%} of {self.prunable_params:,} prunable parameters pruned")
        if not self.rows:
            ax.text(0.5, 0.5, "no prunable tensors", ha="center", va="center", transform=ax.transAxes)
            ax.set_yticks([])
        else:
            positions = range(len(self.rows))
            ax.barh(positions, [row.sparsity for row in self.rows], color="tab:blue")
            ax.set_yticks(positions, labels=[f"{row.name} ({_short(row.params)} params)" for row in self.rows])
            ax.invert_yaxis()  # first layer on top
            for y, row in zip(positions, self.rows):
                ax.text(row.sparsity + 0.01, y, f"{row.sparsity:.1%}", va="center", fontsize=8)
        fig.tight_layout()
        atomic_write(path, lambda file: fig.savefig(file, format="png"))

    def __str__(self) -> str:
        """Aligned table of the prunable tensors, a totals row, then whole-model lines.

        Examples:
            >>> from torch import nn
            >>> import torch
            >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
            >>> keep_half = torch.arange(64).reshape(8, 8) % 2 == 0
            >>> print(report(model, {"0.weight": keep_half}, torch.randn(1, 8)))  # doctest: +NORMALIZE_WHITESPACE
            name              kind    shape  params  nonzeros  sparsity  MACs dense  MACs effective
            0.weight          Linear  8x8        64        32    50.00%          64              32
            2.weight          Linear  2x8        16        16     0.00%          16              16
            total (prunable)                     80        48    40.00%          80              48
            parameters: 90 (80 prunable), 35.56% of all parameters pruned
            MACs: 80 dense, 48 effective (0.600 of dense)
            size: 360 B dense, 242 B sparse estimate (kept values + 1-bit mask)
        """
        with_macs = self.dense_macs is not None

        def cells(name: str, kind: str, shape: str, params: int, nonzeros: int, sparsity: float,
                  dense_macs: int | None, effective_macs: int | None) -> list[str]:
            numbers = [f"{params:,}", f"{nonzeros:,}", f"{sparsity:.2%}"]
            return [name, kind, shape, *numbers] + ([f"{dense_macs:,}", f"{effective_macs:,}"] if with_macs else [])

        header = ["name", "kind", "shape", "params", "nonzeros", "sparsity", "MACs dense", "MACs effective"]
        table = [header[: 8 if with_macs else 6]]
        table += [cells(row.name, row.kind, "x".join(map(str, row.shape)), row.params, row.nonzeros, row.sparsity,
                        row.dense_macs, row.effective_macs) for row in self.rows]
        table.append(cells("total (prunable)", "", "", self.prunable_params, self.nonzeros, self.sparsity,
                           sum(row.dense_macs or 0 for row in self.rows),
                           sum(row.effective_macs or 0 for row in self.rows)))
        widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
        text = ["  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
                for line in table]
        text.append(f"parameters: {self.params:,} ({self.prunable_params:,} prunable), "
                    f"{self.overall_sparsity:.2%} of all parameters pruned")
        if with_macs:
            text.append(f"MACs: {self.dense_macs:,} dense, {self.effective_macs:,} effective "
                        f"({self.mac_ratio:.3f} of dense)")
        text.append(f"size: {_bytes(self.dense_bytes)} dense, {_bytes(self.sparse_bytes)} sparse estimate "
                    f"(kept values + 1-bit mask)")
        return "\n".join(line.rstrip() for line in text)


def report(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None = None,
    example_inputs: torch.Tensor | tuple[Any, ...] | Mapping[str, Any] | None = None,
) -> Report:
    """Report the sparsity, parameters, MACs and size of a model.

    Args:
        model: The model; only read. ``DistributedDataParallel``/``torch.compile`` wrappers are looked through, as
            the pruner does, so names match its masks.
        masks: Optional bool masks (True = kept) keyed by parameter name, as the pruner produces. A tied weight may
            be named by any of its names. Without masks, the weights' own zeros are counted.
        example_inputs: Optional inputs for one forward pass (a tensor, a tuple of positional arguments or a dict
            of keyword arguments) to count MACs; without them the MAC fields are None.

    Returns:
        A ``Report``.

    Raises:
        TypeError: If ``model`` is not a module, ``masks`` not a mapping of bool tensors, or ``example_inputs`` of
            another type.
        ValueError: If a mask names no parameter of the model, a tensor is masked twice or a shape differs, or the
            model fails to run on ``example_inputs`` (the message names their shapes and what the failing layer and
            the model's first layer expect).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> keep_half = torch.arange(64).reshape(8, 8) % 2 == 0
        >>> r = report(model, masks={"0.weight": keep_half}, example_inputs=torch.randn(1, 8))
        >>> [(row.name, row.sparsity, row.dense_macs, row.effective_macs) for row in r.rows]
        [('0.weight', 0.5, 64, 32), ('2.weight', 0.0, 16, 16)]
        >>> r.dense_macs, r.effective_macs, r.mac_ratio
        (80, 48, 0.6)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}; pass the model itself.")
    model = unwrap(model)
    params = dict(model.named_parameters())  # tied weights once, under their first name
    canonical = {id(p): name for name, p in params.items()}
    masks = _check_masks(masks, model, canonical)
    kinds = {canonical[id(w)]: type(m).__name__ for m in model.modules()
             if isinstance(m, DEFAULT_TYPES) and isinstance(w := getattr(m, "weight", None), nn.Parameter)}
    for m in model.modules():  # nn.MultiheadAttention's q/k/v projections, which the pruner prunes by default
        if isinstance(m, nn.MultiheadAttention):
            for n, p in m.named_parameters(recurse=False):
                if n.endswith("proj_weight") and id(p) in canonical:
                    kinds.setdefault(canonical[id(p)], type(m).__name__)
    for name in masks:
        kinds.setdefault(name, type(model.get_submodule(name.rpartition(".")[0])).__name__)
    macs = _count_macs(model, example_inputs) if example_inputs is not None else None

    rows = []
    for name, param in params.items():
        if name not in kinds:
            continue
        with torch.no_grad():
            kept = int(masks[name].sum()) if name in masks else int(torch.count_nonzero(param))
        numel = param.numel()
        dense = macs.by_param.get(name, 0) if macs is not None else None
        effective = _scale(dense, kept, numel) if dense is not None else None
        rows.append(TensorRow(name, kinds[name], tuple(param.shape), numel, kept, _fraction(numel - kept, numel),
                              dense, effective))

    total = sum(p.numel() for p in params.values())
    prunable = sum(row.params for row in rows)
    kept = sum(row.nonzeros for row in rows)
    dense_bytes = sum(p.numel() * p.element_size() for p in params.values())
    pruned_bytes = sum((row.params - row.nonzeros) * params[row.name].element_size() for row in rows)
    mask_bytes = sum(math.ceil(row.params / 8) for row in rows)
    dense_macs = effective_macs = mac_ratio = None
    if macs is not None:
        dense_macs = macs.total
        effective_macs = macs.total - sum(row.dense_macs - row.effective_macs for row in rows)
        mac_ratio = effective_macs / dense_macs if dense_macs else 1.0
    return Report(
        rows=tuple(rows),
        params=total,
        prunable_params=prunable,
        nonzeros=kept,
        sparsity=_fraction(prunable - kept, prunable),
        overall_sparsity=_fraction(prunable - kept, total),
        dense_macs=dense_macs,
        effective_macs=effective_macs,
        mac_ratio=mac_ratio,
        dense_bytes=dense_bytes,
        sparse_bytes=dense_bytes - pruned_bytes + mask_bytes,
    )


def _count_macs(model: nn.Module, example_inputs: Any) -> Any:
    """``count_macs``, with a clear error (input shapes, what the failing and the first layer expect) if the model
    does not run on ``example_inputs``."""
    if not isinstance(example_inputs, (torch.Tensor, tuple, Mapping)) or (
            isinstance(example_inputs, Mapping) and not all(isinstance(k, str) for k in example_inputs)):
        return count_macs(model, example_inputs)  # its TypeError names the accepted types
    try:
        return count_macs(model, example_inputs)
    except (RuntimeError, ValueError, IndexError, TypeError, AssertionError) as exc:
        raise input_failure(model, example_inputs, exc) from exc


@dataclass(frozen=True)
class RunReport:
    """The report of a ``prunekit prune`` run directory; build it with :func:`report_run`.

    For a structured run, ``model`` reports the physically pruned model (its real shapes, parameters and MACs) and
    ``full_size`` the training checkpoint's view (the original shapes, the removed channels counted as zeros).
    Otherwise ``model`` reports the checkpoint's model and masks and ``full_size`` is None.

    Attributes:
        model: Report of the model the run produced.
        full_size: Structured runs: report of the full-size, zero-filled training checkpoint (or None).
        structured: Whether ``model`` is physically pruned.
        source: The file ``model`` was loaded from.
        reference_params: Parameters of the unpruned architecture.
        reference_macs: MACs of the unpruned architecture on the example input.
        notes: Remarks on what was loaded (e.g. an unfinished structured run).
    """

    model: Report
    full_size: Report | None
    structured: bool
    source: str
    reference_params: int
    reference_macs: int | None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The model's report as :meth:`Report.to_dict` (``totals`` and ``rows``); a structured run adds
        ``structured`` = ``{"source", "params_before", "macs_before", "full_size": {totals, rows} or None}``."""
        doc = self.model.to_dict()
        if self.structured:
            doc["structured"] = {"source": self.source, "params_before": self.reference_params,
                                 "macs_before": self.reference_macs,
                                 "full_size": self.full_size.to_dict() if self.full_size is not None else None}
        return doc

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """Return :meth:`to_dict` as JSON text, and write it to ``path`` if given (atomically)."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        if path is not None:
            atomic_write(path, lambda file: file.write(text.encode()))
        return text

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Per-tensor sparsity chart (PNG); for a structured run that of the full-size view (the fraction of each
        tensor removed), as the physically pruned model has no pruned entries left."""
        (self.full_size if self.structured and self.full_size is not None else self.model).plot(path)

    def __str__(self) -> str:
        """The model's table; for a structured run labelled, with the before/after totals and the full-size view."""
        if not self.structured:
            return "\n".join([str(self.model), *(f"note: {n}" for n in self.notes)])
        after = self.model
        text = [f"physically pruned model (structured pruning, {self.source}): real shapes, parameters and MACs",
                str(after),
                f"parameters: {self.reference_params:,} before pruning -> {after.params:,} "
                f"({self.reference_params / max(after.params, 1):.2f}x fewer)"]
        if self.reference_macs is not None and after.dense_macs is not None:
            text.append(f"MACs: {self.reference_macs:,} before pruning -> {after.dense_macs:,} "
                        f"({self.reference_macs / max(after.dense_macs, 1):.2f}x fewer)")
        if self.full_size is not None:
            text += ["", "full-size view (training checkpoint: original shapes, removed channels counted as zeros)",
                     str(self.full_size)]
        text += [f"note: {n}" for n in self.notes]
        return "\n".join(text)


def report_run(
    path: str | os.PathLike[str],
    *,
    model: str | None = None,
    width: float = 1.0,
    example_inputs: torch.Tensor | tuple[Any, ...] | Mapping[str, Any] | None = None,
) -> RunReport:
    """Report a ``prunekit prune`` run directory (or a model/checkpoint file of one), as ``prunekit report`` does.

    A finished structured run is reported as its physically pruned model (``model.safetensors``: real shapes,
    parameters and MACs), with the full-size, zero-filled training checkpoint as a second, labelled view.

    Args:
        path: A run directory or a file in one (see :func:`prunekit.deploy.load_run`).
        model: Architecture name (default: from the run's ``config.json``).
        width: Width multiplier, with ``model``.
        example_inputs: For the MAC counts (default: one 1x28x28 image, the built-in models' input).

    Returns:
        A :class:`RunReport`; ``str()`` of it is the text ``prunekit report`` prints.

    Raises:
        ValueError: No ``config.json`` and no ``model``, or the stored model does not fit the architecture.
        prunekit.fileformat.FileFormatError: A missing, corrupted or wrong-kind file.
    """
    from prunekit.checkpoint import load as load_checkpoint
    from prunekit.deploy import load_run
    from prunekit.models import get_model

    example = torch.zeros(1, 1, 28, 28) if example_inputs is None else example_inputs
    loaded = load_run(path, model=model, width=width)
    main = report(loaded.model, loaded.masks, example_inputs=example)
    if not loaded.structured:
        return RunReport(main, None, False, str(loaded.source), main.params, main.dense_macs, tuple(loaded.notes))
    unpruned = get_model(loaded.architecture, width=loaded.width)
    before = report(unpruned, example_inputs=example)
    full = None
    if loaded.checkpoint is not None:
        ckpt = load_checkpoint(loaded.checkpoint, unpruned)
        full = report(unpruned, ckpt.pruner.masks if ckpt.pruner is not None else None, example_inputs=example)
    return RunReport(main, full, True, str(loaded.source), before.params, before.dense_macs, tuple(loaded.notes))


def _check_masks(masks: object, model: nn.Module, canonical: Mapping[int, str]) -> dict[str, torch.Tensor]:
    """Validate masks against the model; return them keyed by each tensor's first name."""
    if masks is None:
        return {}
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a mapping of parameter name -> bool tensor, got {type(masks).__name__}.")
    aliases = {name: canonical[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}
    params = dict(model.named_parameters())
    checked: dict[str, torch.Tensor] = {}
    for key, mask in masks.items():
        if key not in aliases:
            close = difflib.get_close_matches(str(key), aliases, n=3)
            hint = f"did you mean {', '.join(map(repr, close))}?" if close else "see model.named_parameters()."
            raise ValueError(f"masks has key {key!r}, which names no parameter of the model; expected a parameter "
                             f"name: {hint}")
        name = aliases[key]
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = f"dtype {mask.dtype}" if isinstance(mask, torch.Tensor) else f"a {type(mask).__name__}"
            raise TypeError(f"masks[{key!r}] is {got}; expected a torch.bool tensor (True = kept), e.g. mask.bool().")
        if mask.shape != params[name].shape:
            raise ValueError(f"masks[{key!r}] has shape {tuple(mask.shape)}, but the parameter has shape "
                             f"{tuple(params[name].shape)}; build the mask from that parameter.")
        if name in checked:
            raise ValueError(f"masks names the tied parameter {name!r} twice (as {key!r} too); keep one of the keys.")
        checked[name] = mask
    return checked


def _fraction(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _scale(macs: int, kept: int, numel: int) -> int:
    """``macs × kept / numel`` rounded half up, in exact integer arithmetic."""
    return (2 * macs * kept + numel) // (2 * numel) if numel else 0


def _short(count: int) -> str:
    for size, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if count >= size:
            return f"{count / size:.1f}{suffix}"
    return str(count)


def _bytes(count: int) -> str:
    for size, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


# ----------------------------------------------------------------------------------------------------------------
# running a model on example inputs: failures explained

_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                nn.ConvTranspose3d, nn.Embedding, nn.EmbeddingBag)


def _shapes_of(inputs: object) -> str:
    """Shapes of example inputs as text: ``(4, 100)``, ``((4, 100), 3)`` or ``{'x': (4, 100)}``."""
    if isinstance(inputs, torch.Tensor):
        return str(tuple(inputs.shape))
    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{k!r}: {_shapes_of(v)}" for k, v in inputs.items()) + "}"
    if isinstance(inputs, (tuple, list)):
        inner = ", ".join(_shapes_of(v) for v in inputs)
        return f"({inner},)" if len(inputs) == 1 else f"({inner})"
    return type(inputs).__name__


def _expects(module: nn.Module) -> str | None:
    """What a layer expects of its input, where its type tells (in_features, in_channels, vocabulary size)."""
    inner = getattr(module, "conv", module)  # prunekit.quantize.Int8Conv wraps its convolution
    if hasattr(module, "in_features"):
        return f"inputs with {module.in_features} features in the last dimension"
    if isinstance(inner, nn.modules.conv._ConvNd):
        spatial = {1: "L", 2: "H, W", 3: "D, H, W"}.get(len(inner.kernel_size), "...")
        channels = f"{inner.in_channels} channel{'s' if inner.in_channels != 1 else ''}"
        return f"inputs of shape (N, {inner.in_channels}, {spatial}): {channels} in dimension 1"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        c = module.num_features
        shape = {nn.BatchNorm1d: f"(N, {c}) or (N, {c}, L)", nn.BatchNorm2d: f"(N, {c}, H, W)",
                 nn.BatchNorm3d: f"(N, {c}, D, H, W)"}.get(type(module))
        return f"inputs of shape {shape}" if shape else f"{c} channels in dimension 1"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return f"integer token ids in [0, {module.num_embeddings})"
    return None


def _failing_layer(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[str, nn.Module,
                                                                                                 str] | None:
    """Run ``model`` again with hooks to find the innermost module whose forward raised, and its input shapes.

    Eval mode and no grad, each module's mode restored after; the hooks are removed again.
    """
    names = {module: name for name, module in model.named_modules()}
    stack: list[tuple[nn.Module, str]] = []
    failed: list[tuple[nn.Module, str]] = []

    def pre(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        stack.append((module, _shapes_of(inputs[0]) if len(inputs) == 1 else _shapes_of(inputs)))

    def post(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if stack:
            stack.pop()

    training = {module: module.training for module in model.modules()}
    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        model.eval()
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception:  # noqa: BLE001 - the failure itself is reported by the caller
        failed = stack[-1:]
    finally:
        for h in handles:
            h.remove()
        for module, mode in training.items():
            module.training = mode
    if not failed or (failed[0][0] is model and _expects(model) is None):
        return None  # failed in the model's own code, not in a layer
    module, shapes = failed[0]
    return names.get(module, "?") or "model", module, shapes


def input_failure(model: nn.Module, example_inputs: object, exc: BaseException) -> ValueError:
    """A clear error for a model that fails to run on ``example_inputs``: their shapes, the layer that failed and
    what it expects, what the model's first layer expects, and how to fix it.

    Args:
        model: The model that failed (it is run once more, in eval mode and without grad, to find the layer).
        example_inputs: A tensor, a tuple/list of positional inputs or a mapping of keyword inputs.
        exc: The exception raised by running the model.

    Returns:
        A ``ValueError`` to raise ``from exc``.

    Examples:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(8, 4))
        >>> x = torch.zeros(2, 5)
        >>> try:
        ...     model(x)
        ... except RuntimeError as exc:
        ...     print(input_failure(model, x, exc))  # doctest: +ELLIPSIS
        running the model on example_inputs of shape (2, 5) failed in layer '0' (Linear), which expects inputs with \
8 features in the last dimension and got (2, 5)...
    """
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        args, kwargs = (example_inputs,), {}
    where = _failing_layer(model, args, kwargs)
    text = f"running the model on example_inputs of shape {_shapes_of(example_inputs)} failed"
    if where is not None:
        name, module, shapes = where
        expects = _expects(module)
        text += f" in layer {name!r} ({type(module).__name__})"
        text += f", which expects {expects} and got {shapes}" if expects else f" on input {shapes}"
    first = next(((n, m) for n, m in model.named_modules() if isinstance(m, _LAYER_TYPES) or hasattr(m, "in_features")),
                 None)
    if first is not None and (where is None or first[1] is not where[1]) and _expects(first[1]):
        text += (f"; the model's first layer {first[0] or 'model'!r} ({type(first[1]).__name__}) expects "
                 f"{_expects(first[1])}")
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text += (f" ({type(exc).__name__}: {detail}). Pass example_inputs shaped like one batch of what the model is "
             "called with (e.g. torch.zeros(1, *sample_shape)), as a tensor, a tuple of positional inputs or a dict "
             "of keyword inputs.")
    return ValueError(text)
