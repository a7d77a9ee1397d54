"""Which tensors of a model are pruned: defaults, include/exclude patterns and per-tensor overrides."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence

from torch import nn

__all__ = ["DEFAULT_TYPES", "find_prunable", "match_overrides"]

#: Module types whose ``weight`` is prunable by default.
DEFAULT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.MultiheadAttention,
)


def _as_patterns(value: str | Iterable[str] | None, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    patterns = list(value)
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{what} patterns must be strings (fnmatch globs such as 'fc*.weight'), got {p!r}")
    return patterns


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def find_prunable(
    model: nn.Module,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    types: Iterable[type[nn.Module]] | None = None,
) -> dict[str, nn.Parameter]:
    """Find the parameters to prune, keyed by fully qualified name.

    By default these are the ``weight`` of every module whose type is in ``types`` (Linear and Conv layers) and the
    query/key/value projections of ``nn.MultiheadAttention`` (``in_proj_weight``, or ``q/k/v_proj_weight``; its
    ``out_proj`` is a Linear); for recurrent modules (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``, which have no ``weight``)
    named in ``types``, their weight matrices ``weight_ih_l{k}``, ``weight_hh_l{k}`` (and ``weight_hr_l{k}``,
    ``*_reverse``), not the biases. Patterns
    are shell-style globs (:func:`fnmatch.fnmatchcase`) matched against the parameter's fully qualified name, e.g.
    ``"features.*.weight"``. A parameter shared by several modules (tied weights) appears once, under its first name.

    Args:
        model: The model to search.
        include: If given, only parameters matching one of these patterns are pruned; the patterns may name any
            parameter (also biases, embeddings or parameters that are not in a module), not only default types.
        exclude: Parameters matching one of these patterns are never pruned.
        types: Module types whose ``weight`` is prunable when ``include`` is not given (default :data:`DEFAULT_TYPES`).

    Returns:
        An ordered ``{name: parameter}`` dict in ``model.named_parameters()`` order.

    Raises:
        ValueError: If an include or exclude pattern matches no parameter, or nothing is left to prune.

    Examples:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> list(find_prunable(model))
        ['0.weight', '2.weight']
        >>> list(find_prunable(model, exclude="2.*"))
        ['0.weight']
        >>> list(find_prunable(nn.LSTM(4, 8, num_layers=2), types=[nn.LSTM]))
        ['weight_ih_l0', 'weight_hh_l0', 'weight_ih_l1', 'weight_hh_l1']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    includes = _as_patterns(include, "include")
    excludes = _as_patterns(exclude, "exclude")
    type_tuple = tuple(types) if types is not None else DEFAULT_TYPES
    for t in type_tuple:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(f"types must be nn.Module subclasses, got {t!r}")

    all_params = dict(model.named_parameters())  # de-duplicated: a tied parameter appears once
    for patterns, what in ((includes, "include"), (excludes, "exclude")):
        for p in patterns:
            if not any(fnmatch.fnmatchcase(n, p) for n in all_params):
                raise ValueError(
                    f"{what} pattern {p!r} matches no parameter of {type(model).__name__}. "
                    f"Patterns are globs on parameter names such as {sorted(all_params)[:4]}"
                )

    if includes:
        chosen = [n for n in all_params if _matches(n, includes)]
    else:
        default_names = set()
        for mod_name, module in model.named_modules():
            if not isinstance(module, type_tuple):
                continue
            prefix = f"{mod_name}." if mod_name else ""
            if isinstance(module, nn.RNNBase):  # RNN/LSTM/GRU have no `.weight`: weight_ih_l0, weight_hh_l0, ...
                default_names.update(prefix + n for n, _ in module.named_parameters(recurse=False)
                                     if n.startswith("weight_"))
            elif isinstance(module, nn.MultiheadAttention):  # its q/k/v projections (out_proj is a Linear)
                default_names.update(prefix + n for n, _ in module.named_parameters(recurse=False)
                                     if n in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"))
            elif isinstance(getattr(module, "weight", None), nn.Parameter):
                default_names.add(prefix + "weight")
        chosen = [n for n in all_params if n in default_names]
    chosen = [n for n in chosen if not _matches(n, excludes)]
    if not chosen:
        raise ValueError(
            f"no prunable tensors in {type(model).__name__} (types={[t.__name__ for t in type_tuple]}, "
            f"include={includes or None}, exclude={excludes or None}). Pass include=['<glob>'] to name the tensors "
            "to prune explicitly."
        )
    return {n: all_params[n] for n in chosen}


def match_overrides(names: Iterable[str], overrides: Mapping[str, float] | None) -> dict[str, float]:
    """Resolve per-tensor sparsity overrides given as ``{glob: sparsity}``; the first matching pattern wins.

    Raises:
        ValueError: If a pattern matches none of ``names`` or a value is not a sparsity in [0, 1).
    """
    if not overrides:
        return {}
    names = list(names)
    out: dict[str, float] = {}
    for pattern, value in overrides.items():
        check_sparsity(value, f"override for {pattern!r}")
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"override pattern {pattern!r} matches none of the pruned tensors {names[:8]}")
        for n in hits:
            out.setdefault(n, float(value))
    return out


def check_sparsity(value: object, what: str = "sparsity") -> float:
    """Validate a sparsity: a real number in [0, 1). Returns it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a float in [0, 1), got {value!r} ({type(value).__name__})")
    v = float(value)
    if not 0.0 <= v < 1.0:
        raise ValueError(
            f"{what} must be in [0, 1) (the fraction of weights set to zero), got {value!r}. "
            "For 90% zeros pass 0.9; 1.0 would remove every weight."
        )
    return v
