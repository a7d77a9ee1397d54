"""convert(): replace Linear layers by SparseLinear where measuring on this machine shows the sparse kernel is faster.

Each candidate layer is timed as it is, dense (``F.linear``), against every available sparse kernel on a random input
of the layer's real input size (``batch_size`` rows, or the sizes seen when running ``example_inputs``), with the
current :func:`torch.get_num_threads`: a few warm-up calls, then ``repeats`` rounds in rotating order, each round
timing enough calls to last about a millisecond; the median per call is compared. The layer is swapped only if the
fastest sparse kernel beats dense by ``min_speedup`` and gives the same outputs (within float tolerance); otherwise it
stays dense. Every decision, with its timings, is kept in :class:`ConversionLog` on the model (``model.sparse_log``).

The layer is timed on its own, so its weights are hot in the cache; in a whole model they usually come from memory,
which slows dense layers more than sparse ones (the sparse weights are smaller). The measurement is therefore
conservative about switching to sparse.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, overload

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.sparse.linear import KERNELS, SparseLinear, check_kernel, native_available

__all__ = ["ConversionLog", "LayerDecision", "convert", "to_dense"]

_TARGET_SAMPLE_SECONDS = 1e-3  # each timed sample repeats the call until it lasts about this long
_TORCH_CSR_DTYPES = (torch.float32, torch.float64)


@dataclass
class LayerDecision:
    """What :func:`convert` decided for one Linear layer, and why.

    Attributes:
        name: The layer's module name in the model.
        in_features: Input size.
        out_features: Output size (the weight is ``out_features x in_features``).
        sparsity: Fraction of zero weights.
        rows: Number of input rows (batch x tokens) the layer was timed with; 0 if not timed.
        kernel: ``"dense"`` (layer kept) or the SparseLinear kernel chosen.
        times: Median seconds per call by kernel, ``"dense"`` included; empty if the layer was not timed.
        reason: Why the layer was (not) converted.
    """

    name: str
    in_features: int
    out_features: int
    sparsity: float
    rows: int
    kernel: str
    times: dict[str, float] = field(default_factory=dict)
    reason: str = ""

    @property
    def speedup(self) -> float | None:
        """Dense time / time of the chosen kernel (1.0 if dense was kept; None if not timed)."""
        if "dense" not in self.times or self.kernel not in self.times:
            return None
        return self.times["dense"] / self.times[self.kernel]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (times in seconds)."""
        return {**asdict(self), "speedup": self.speedup}


class ConversionLog(Sequence[LayerDecision]):
    """The per-layer decisions of one :func:`convert` call; ``print(log)`` shows them as a table.

    Index it by position or by layer name (``log["fc1"]``).

    Args:
        decisions: One entry per Linear layer considered, in model order.
        settings: The arguments that shaped the decisions (thread count, batch size, thresholds).
    """

    def __init__(self, decisions: Iterable[LayerDecision], settings: Mapping[str, Any]) -> None:
        self.decisions = list(decisions)
        self.settings = dict(settings)

    @overload
    def __getitem__(self, key: int) -> LayerDecision: ...
    @overload
    def __getitem__(self, key: slice) -> Sequence[LayerDecision]: ...
    @overload
    def __getitem__(self, key: str) -> LayerDecision: ...

    def __getitem__(self, key: int | slice | str) -> LayerDecision | Sequence[LayerDecision]:
        if isinstance(key, str):
            for d in self.decisions:
                if d.name == key:
                    return d
            raise KeyError(f"no Linear layer named {key!r} in this log; layers: {[d.name for d in self.decisions]}")
        return self.decisions[key]

    def __len__(self) -> int:
        return len(self.decisions)

    def __iter__(self) -> Iterator[LayerDecision]:
        return iter(self.decisions)

    @property
    def converted(self) -> list[str]:
        """Names of the layers that now run a sparse kernel."""
        return [d.name for d in self.decisions if d.kernel != "dense"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: ``{"settings": {...}, "layers": [...]}``."""
        return {"settings": dict(self.settings), "layers": [d.to_dict() for d in self.decisions]}

    def __repr__(self) -> str:
        return f"ConversionLog({len(self.converted)} of {len(self)} Linear layers sparse)"

    def __str__(self) -> str:
        kernels = [k for k in ("dense", *KERNELS) if any(k in d.times for d in self.decisions)]
        header = ["layer", "out x in", "sparsity", "rows", *[f"{k} us" for k in kernels], "chosen", "speedup",
                  "reason"]
        rows = []
        for d in self.decisions:
            times = [f"{d.times[k] * 1e6:.1f}" if k in d.times else "-" for k in kernels]
            speedup = f"{d.speedup:.2f}x" if d.speedup is not None else "-"
            rows.append([d.name or "(model)", f"{d.out_features}x{d.in_features}", f"{d.sparsity:.1%}",
                         str(d.rows or "-"), *times, d.kernel, speedup, d.reason])
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

        def line(cells: list[str]) -> str:
            return "  ".join(c.ljust(w) if i in (0, len(cells) - 1) else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        settings = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        out = [f"{self!r}; {settings}", line(header), line(["-" * w for w in widths])]
        out += [line(r) for r in rows]
        return "\n".join(out)


def convert(
    model: nn.Module,
    *,
    min_speedup: float = 1.1,
    batch_size: int = 1,
    example_inputs: Any = None,
    kernels: Iterable[str] | None = None,
    min_sparsity: float = 0.5,
    repeats: int = 7,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    inplace: bool = True,
) -> nn.Module:
    """Replace the Linear layers that run faster sparse by :class:`SparseLinear`; the rest stay dense.

    The converted model is for inference (run it under :func:`torch.inference_mode` or :func:`torch.no_grad`):
    SparseLinear holds no parameters and refuses inputs that require grad. Convert after pruning is finished
    (``pruner.remove()``); :func:`to_dense` turns a converted model back into plain Linear layers.

    Args:
        model: A model on the CPU, typically pruned (weights with zeros). An ``nn.Linear`` itself works too.
        min_speedup: A layer is converted only if its fastest sparse kernel is at least this many times faster than
            dense. 0 converts every candidate layer whatever the timing (with the fastest kernel).
        batch_size: Number of input rows to time each layer with when ``example_inputs`` is not given (for
            transformers, batch x sequence length).
        example_inputs: A tensor, or a tuple of positional arguments, to run the model with once; each layer is
            then timed with the input size it really receives. Layers not called are left dense.
        kernels: Sparse kernels to consider, from ``("native_csr", "torch_csr")`` (default: all available;
            ``native_csr`` needs the native kernel and fp32 weights).
        min_sparsity: Layers with a smaller fraction of zeros are left dense without timing.
        repeats: Timed rounds per kernel and layer (the median is used).
        include: Globs of module names to consider (default: every ``nn.Linear``).
        exclude: Globs of module names never to convert.
        inplace: Convert ``model`` itself (default) or a deep copy of it.

    Returns:
        The converted model (``model`` itself when ``inplace``, unless ``model`` is an ``nn.Linear`` that is
        replaced). Its ``sparse_log`` attribute is the :class:`ConversionLog`; ``print(model.sparse_log)`` shows
        every layer's timings and decision.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module`` or an argument has the wrong type.
        ValueError: On out-of-range arguments, unknown kernels or patterns that match no Linear layer.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import prunekit
        >>> model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 4))
        >>> _ = prunekit.prune(model, sparsity=0.9, allocation="uniform").remove()
        >>> x = torch.randn(3, 256)
        >>> expected = model(x)
        >>> fast = convert(model, min_speedup=0, kernels=["torch_csr"])  # min_speedup=0: convert regardless of timing
        >>> [type(m).__name__ for m in fast]
        ['SparseLinear', 'ReLU', 'SparseLinear']
        >>> with torch.inference_mode():
        ...     torch.allclose(fast(x), expected, atol=1e-5)
        True
        >>> fast.sparse_log["0"].kernel, round(fast.sparse_log["0"].sparsity, 2)
        ('torch_csr', 0.9)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() expects a torch.nn.Module, got {type(model).__name__}")
    min_speedup = _check_number(min_speedup, "min_speedup", 0.0, math.inf)
    min_sparsity = _check_number(min_sparsity, "min_sparsity", 0.0, 1.0)
    batch_size = _check_int(batch_size, "batch_size")
    repeats = _check_int(repeats, "repeats")
    wanted = _check_kernels(kernels)
    includes, excludes = _patterns(include, "include"), _patterns(exclude, "exclude")
    if not inplace:
        model = copy.deepcopy(model)

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    names = [n for n, _ in linears]
    for patterns, what in ((includes, "include"), (excludes, "exclude")):
        for p in patterns:
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                raise ValueError(f"{what} pattern {p!r} matches no Linear layer of {type(model).__name__}; "
                                 f"its Linear layers are {names[:8]}{' ...' if len(names) > 8 else ''}")
    parents = _parents(model)
    seen_rows = _input_rows(model, [m for _, m in linears], example_inputs) if example_inputs is not None else None
    native = "native_csr" in wanted and native_available()

    decisions: list[LayerDecision] = []
    replacements: dict[int, SparseLinear] = {}
    for name, module in linears:
        decision, sparse = _decide(
            name, module, parents.get(id(module), []), includes=includes, excludes=excludes,
            rows=(seen_rows.get(id(module), 0) if seen_rows is not None else batch_size),
            kernels=[k for k in wanted if k != "native_csr" or native], min_sparsity=min_sparsity,
            min_speedup=min_speedup, repeats=repeats,
        )
        decisions.append(decision)
        if sparse is not None:
            replacements[id(module)] = sparse

    root = model
    for name, module in linears:
        new = replacements.get(id(module))
        if new is None:
            continue
        if module is model:
            root = new
        for parent, attr in parents.get(id(module), []):
            setattr(parent, attr, new)
    settings = {"threads": torch.get_num_threads(), "batch_size": batch_size if seen_rows is None else "example",
                "min_speedup": min_speedup, "min_sparsity": min_sparsity, "repeats": repeats,
                "kernels": ",".join(k for k in wanted if k != "native_csr" or native)}
    root.sparse_log = ConversionLog(decisions, settings)
    return root


def to_dense(model: nn.Module) -> nn.Module:
    """Replace every SparseLinear in ``model`` (in place) by an equivalent ``nn.Linear``; returns the model.

    Examples:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(8, 4))
        >>> model = convert(model, min_speedup=0, min_sparsity=0, kernels=["torch_csr"])
        >>> type(to_dense(model)[0]).__name__
        'Linear'
    """
    if isinstance(model, SparseLinear):
        return model.to_linear()
    done: dict[int, nn.Linear] = {}
    for parent in list(model.modules()):
        for attr, child in list(parent._modules.items()):
            if isinstance(child, SparseLinear):
                if id(child) not in done:
                    done[id(child)] = child.to_linear()
                setattr(parent, attr, done[id(child)])
    return model


# --------------------------------------------------------------------------------------------------------------------
def _decide(name: str, module: nn.Linear, parents: list[tuple[nn.Module, str]], *, includes: list[str],
            excludes: list[str], rows: int, kernels: list[str], min_sparsity: float, min_speedup: float,
            repeats: int) -> tuple[LayerDecision, SparseLinear | None]:
    weight = module.weight
    numel = weight.numel()
    sparsity = 1.0 - int(torch.count_nonzero(weight)) / numel if numel and weight.device.type != "meta" else 0.0
    decision = LayerDecision(name, module.in_features, module.out_features, sparsity, 0, "dense")

    def keep(reason: str) -> tuple[LayerDecision, None]:
        decision.reason = reason
        return decision, None

    if includes and not any(fnmatch.fnmatchcase(name, p) for p in includes):
        return keep("not included")
    if any(fnmatch.fnmatchcase(name, p) for p in excludes):
        return keep("excluded")
    if any(isinstance(p, nn.MultiheadAttention) for p, _ in parents):
        return keep("its weight is read directly by nn.MultiheadAttention")
    if type(module).forward is not nn.Linear.forward:
        return keep(f"{type(module).__name__} overrides forward")
    if module._forward_hooks or module._forward_pre_hooks:
        return keep("has forward hooks")
    if weight.device.type != "cpu":
        return keep(f"weight on {weight.device}, not the CPU")
    if not weight.is_floating_point():
        return keep(f"weight dtype {weight.dtype}")
    if sparsity < min_sparsity:
        return keep(f"sparsity below min_sparsity={min_sparsity:g}")
    if rows == 0:
        return keep("not called by example_inputs")
    usable = [k for k in kernels if (k == "native_csr" and weight.dtype == torch.float32)
              or (k == "torch_csr" and weight.dtype in _TORCH_CSR_DTYPES)]
    if not usable:
        return keep(f"no sparse kernel for dtype {weight.dtype} among {kernels}")

    decision.rows = rows
    with torch.no_grad():  # not inference_mode: the new module's buffers must stay normal tensors
        candidates = {k: SparseLinear.from_linear(module, kernel=k) for k in usable}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, module.in_features, generator=g, dtype=weight.dtype)
    w, b = weight.detach(), None if module.bias is None else module.bias.detach()
    with torch.inference_mode():
        reference = F.linear(x, w, b)
        tol = 1e-4 * max(1.0, float(reference.abs().max())) if reference.numel() else 0.0
        for k in list(candidates):
            if not torch.allclose(candidates[k](x), reference, rtol=1e-4, atol=tol):
                del candidates[k]  # would change the outputs: never use it
        fns: dict[str, Callable[[], object]] = {"dense": lambda: F.linear(x, w, b)}
        fns.update({k: (lambda m=m: m(x)) for k, m in candidates.items()})
        decision.times = _median_times(fns, repeats)
    if not candidates:
        return keep("sparse outputs differ from dense")
    best = min(candidates, key=lambda k: decision.times[k])
    speedup = decision.times["dense"] / decision.times[best]
    if speedup < min_speedup:
        pace = f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"
        return keep(f"{best} {pace} than dense (< min_speedup={min_speedup:g})")
    decision.kernel = best
    decision.reason = f"{speedup:.2f}x faster than dense"
    return decision, candidates[best]


def _median_times(fns: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved, rotating rounds."""
    once: dict[str, float] = {}
    for name, fn in fns.items():
        fn()  # warm-up: caches, thread pool, lazy initialisation
        t0 = time.perf_counter()
        fn()
        once[name] = time.perf_counter() - t0
    number = {n: max(1, min(10_000, math.ceil(_TARGET_SAMPLE_SECONDS / max(t, 1e-7)))) for n, t in once.items()}
    samples: dict[str, list[float]] = {n: [] for n in fns}
    order = list(fns)
    for r in range(repeats):
        for name in order[r % len(order):] + order[: r % len(order)]:
            fn, k = fns[name], number[name]
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            samples[name].append((time.perf_counter() - t0) / k)
    return {n: statistics.median(s) for n, s in samples.items()}


def _parents(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(module) -> every (parent, attribute) that holds it (a module shared by two parents appears twice)."""
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is not None:
                out.setdefault(id(child), []).append((parent, attr))
    return out


def _input_rows(model: nn.Module, modules: list[nn.Module], example_inputs: Any) -> dict[int, int]:
    """Run ``model`` once on ``example_inputs``; id(module) -> rows of its (first) input, flattened to 2-D."""
    rows: dict[int, int] = {}

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and id(module) not in rows:
            rows[id(module)] = max(1, x.numel() // max(1, x.shape[-1]))

    handles = [m.register_forward_pre_hook(hook) for m in {id(m): m for m in modules}.values()]
    try:
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        with torch.inference_mode():
            model(*args)
    finally:
        for h in handles:
            h.remove()
    return rows


def _check_kernels(kernels: Iterable[str] | None) -> list[str]:
    if kernels is None:
        return list(KERNELS)
    if isinstance(kernels, str):
        kernels = [kernels]
    out = [check_kernel(k) for k in kernels]
    if not out:
        raise ValueError(f"kernels is empty; pass some of {list(KERNELS)} (or None for all)")
    return out


def _patterns(value: str | Iterable[str] | None, what: str) -> list[str]:
    if value is None:
        return []
    patterns = [value] if isinstance(value, str) else list(value)
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{what} patterns must be strings (globs on module names such as 'encoder.*'), got {p!r}")
    return patterns


def _check_number(value: object, what: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= float(value) <= hi:
        raise ValueError(f"{what} must be a number in [{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def _check_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value
