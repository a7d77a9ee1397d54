"""Count multiply-accumulates (MACs) and parameters of a PyTorch model.

This is prunekit's one MAC counter: the report, structured-pruning targets and the benchmarks all use it, so their
numbers agree. Counting is done by torch's own ``torch.utils.flop_counter.FlopCounterMode``, which runs the model
once and applies torch's FLOP formulas to every operator it sees; a MAC is half a FLOP. prunekit adds only what
that counter misses on CPU:

* ``F.scaled_dot_product_attention`` runs as ``aten._scaled_dot_product_flash_attention_for_cpu``, which torch's
  counter does not know (it counts 0); prunekit gives it torch's own SDPA formula (QK^T plus AV).
* ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``/``DecoderLayer`` take a fused "fast path" in eval
  mode without grad (one opaque op, counted 0); the fast path is switched off while counting and restored after.
* ``nn.LSTM`` runs as one oneDNN op per layer and direction (``aten.mkldnn_rnn_layer``, counted 0); prunekit counts
  it as the two matmuls it is: every token meets ``weight_ih`` and ``weight_hh`` once.

Counted: matmuls (``mm``, ``addmm``, ``bmm``, ``baddbmm``; so ``nn.Linear``, ``@``, ``einsum``, GRU/RNN cells),
convolutions of any dimension, grouped, depthwise and transposed, and attention (QK^T and AV; causal masks are not
discounted, as in torch). Not counted (0 MACs): bias additions, normalization (BatchNorm, LayerNorm), activations,
softmax, pooling, embedding lookups and other element-wise ops.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 10))
    >>> macs = count_macs(model, torch.randn(1, 784))
    >>> macs.total, macs.by_module["0"], macs.by_param["2.weight"]
    (238200, 235200, 3000)
    >>> count_params(model)
    238510
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, flop_registry

__all__ = ["MacCount", "count_macs", "count_params"]

_aten = torch.ops.aten


@dataclass(frozen=True)
class MacCount:
    """MACs of one forward pass, in total and attributed to modules and to weights.

    Attributes:
        total: MACs of the whole forward pass.
        by_module: Inclusive MACs per module, keyed by the names of ``model.named_modules()`` (``""`` is the root,
            equal to ``total``): the ops run while that module's ``forward`` was active, its children's included.
            A module that runs twice is counted twice. Attribution follows forward calls, so a child whose weight
            its parent uses directly (``nn.MultiheadAttention.out_proj``) shows 0 and its MACs sit in the parent.
        by_param: MACs per parameter, keyed by the names of ``model.named_parameters()`` (tied weights appear once,
            under their first name): the MACs of every counted op that reads that weight (any parameter with two or
            more dimensions). This is what a weight costs, so it is what pruning that weight saves; it follows the
            weight wherever it is used (also ``out_proj`` inside attention, or ``F.linear`` in custom code). An op
            that reads several weights splits its MACs among them in proportion to their sizes. Ops on no weight
            (attention's QK^T and AV) are in ``total`` only. Empty for ``per_module=False`` and for models on the
            ``meta`` device.
    """

    total: int
    by_module: dict[str, int]
    by_param: dict[str, int]


def count_params(model: nn.Module) -> int:
    """Count the parameters of a model, each tensor once.

    Args:
        model: Any module.

    Returns:
        The number of scalar parameters. A parameter registered under several names (tied weights, such as an
        embedding shared with the output layer) is counted once.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.

    Examples:
        >>> from torch import nn
        >>> embed, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
        >>> head.weight = embed.weight  # tied
        >>> count_params(nn.Sequential(embed, head))
        40
    """
    _check_module(model)
    return sum(p.numel() for p in model.parameters())  # parameters() yields each tensor once


def count_macs(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[Any, ...] | Mapping[str, Any],
    *,
    per_module: bool = True,
) -> MacCount:
    """Count the multiply-accumulates of one forward pass.

    The model runs once under ``torch.no_grad()`` in eval mode; each submodule's train/eval mode and the
    ``torch.backends.mha`` fast-path flag are restored afterwards, also on error (that flag is process-wide, so do
    not run attention in another thread meanwhile). MACs scale with the batch and sequence sizes of
    ``example_inputs``.

    Args:
        model: The model to run.
        example_inputs: What to call the model with: a tensor (one positional argument), a tuple of positional
            arguments or a mapping of keyword arguments.
        per_module: Also attribute MACs to modules and weights. If False, ``by_module`` holds only ``""`` and
            ``by_param`` is empty.

    Returns:
        A ``MacCount`` (see its attributes for what the keys mean).

    Raises:
        TypeError: If ``model`` is not an ``nn.Module`` or ``example_inputs`` is of another type.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> count_macs(nn.Conv2d(3, 8, 3, padding=1), torch.randn(1, 3, 10, 10)).total  # 8*3*9 per pixel
        21600
        >>> attention = nn.MultiheadAttention(16, num_heads=4, batch_first=True)
        >>> x = torch.randn(2, 5, 16)  # (B, T, C)
        >>> macs = count_macs(attention, (x, x, x))
        >>> macs.by_param["in_proj_weight"], macs.by_param["out_proj.weight"], macs.total
        (7680, 2560, 11840)
    """
    _check_module(model)
    args, kwargs = _split_inputs(example_inputs)
    formulas = {op: f for op, f in _EXTRA_FORMULAS.items() if op not in flop_registry}
    by_param: dict[str, int] = {}
    if per_module:
        weights = _WeightIndex(model)
        by_param = dict.fromkeys(weights.names, 0)

        def credit(op_args: tuple[Any, ...], op_kwargs: dict[str, Any], flops: int) -> None:
            read = {weights.lookup(t) for t in tree_flatten((op_args, op_kwargs))[0] if isinstance(t, torch.Tensor)}
            _split(by_param, read - {None}, flops // 2, weights.numel)

        formulas = {op: _crediting(f, credit) for op, f in {**flop_registry, **formulas}.items()}
    counter = FlopCounterMode(display=False, custom_mapping={op: _raw(f) for op, f in formulas.items()})
    with _counting_state(model), counter:
        model(*args, **kwargs)
    counts = counter.get_flop_counts()
    total = sum(counts.get("Global", {}).values()) // 2
    by_module = _by_module(model, counts) if per_module else {}
    by_module[""] = total
    return MacCount(total=total, by_module=by_module, by_param=by_param)


def _check_module(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}; pass the model itself.")


def _split_inputs(example_inputs: object) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    if isinstance(example_inputs, Mapping) and all(isinstance(k, str) for k in example_inputs):
        return (), dict(example_inputs)
    raise TypeError(
        f"example_inputs must be a tensor, a tuple of positional arguments or a dict of keyword arguments "
        f"(str keys), got {type(example_inputs).__name__}; wrap a single argument of another type in a tuple: (x,)."
    )


@contextlib.contextmanager
def _counting_state(model: nn.Module) -> Iterator[None]:
    """Eval mode, no grad and no fused attention fast path; everything restored on exit.

    Parameters stop requiring grad for the run too: a view of a parameter made under ``no_grad`` still reports
    ``requires_grad`` without a ``grad_fn`` (CaiT's ``cls_token.expand(...)``), and FlopCounterMode's module tracker
    fails on such a module input ("Expected gradient function to be set")."""
    training = {module: module.training for module in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        model.eval()
        for p in grads:
            p.requires_grad_(False)
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad():
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for module, mode in training.items():
            module.training = mode
        for p, flag in grads.items():
            p.requires_grad_(flag)


def _by_module(model: nn.Module, counts: Mapping[str, Mapping[Any, int]]) -> dict[str, int]:
    """Map FlopCounterMode's module names ("<RootClass>.<fqn>") onto ``named_modules()`` names."""
    first_name: dict[int, str] = {}
    canonical: dict[str, str] = {}  # every alias of a shared module -> its first name
    for name, module in model.named_modules(remove_duplicate=False):
        canonical[name] = first_name.setdefault(id(module), name)
    by_module = dict.fromkeys(first_name.values(), 0)
    root = type(model).__name__
    for key, ops in counts.items():
        if key.startswith(root + "."):
            fqn = canonical.get(key[len(root) + 1 :])
            if fqn:  # modules outside the model's hierarchy have no name; the root is set from the total
                by_module[fqn] += sum(ops.values()) // 2
    return by_module


class _WeightIndex:
    """Finds the parameter (two or more dimensions) a tensor reads, by the memory it points into.

    Views such as ``weight.t()`` or ``in_proj_weight.chunk(3)`` share their parameter's storage, so an op that
    reads a view is credited to the parameter.
    """

    def __init__(self, model: nn.Module) -> None:
        self.names: list[str] = []
        self.numel: dict[str, int] = {}
        self._spans: dict[int, list[tuple[int, int, str]]] = {}  # storage address -> (start, end, name)
        for name, param in model.named_parameters():
            self.names.append(name)
            if param.dim() < 2 or param.numel() == 0 or param.device.type == "meta":
                continue  # biases and norm scales are not what a matmul's cost depends on
            self.numel[name] = param.numel()
            start = param.data_ptr()
            span = (start, start + param.numel() * param.element_size(), name)
            self._spans.setdefault(param.untyped_storage().data_ptr(), []).append(span)

    def lookup(self, tensor: torch.Tensor) -> str | None:
        if tensor.layout != torch.strided or tensor.device.type == "meta":
            return None
        spans = self._spans.get(tensor.untyped_storage().data_ptr(), [])
        if len(spans) == 1:
            return spans[0][2]
        address = tensor.data_ptr()
        return next((name for start, end, name in spans if start <= address < end), None)


def _split(totals: dict[str, int], names: set[str], macs: int, sizes: Mapping[str, int]) -> None:
    """Add ``macs`` to ``totals`` over ``names``, in proportion to their sizes (rounding remainder to the last)."""
    ordered = sorted(names)
    whole = sum(sizes[name] for name in ordered)
    given = 0
    for i, name in enumerate(ordered):
        share = macs - given if i == len(ordered) - 1 else macs * sizes[name] // whole
        totals[name] += share
        given += share


def _raw(formula: Callable[..., int]) -> Callable[..., int]:
    """Mark a formula as taking tensors (FlopCounterMode would otherwise hand it shapes)."""

    def raw(*args: Any, **kwargs: Any) -> int:
        return formula(*args, **kwargs)

    raw._get_raw = True  # type: ignore[attr-defined]
    return raw


def _crediting(
    formula: Callable[..., int], credit: Callable[[tuple[Any, ...], dict[str, Any], int], None]
) -> Callable[..., int]:
    """Wrap a FLOP formula so every count is also credited to the weights the op reads."""

    def counted(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
        flops = formula(*args, out_val=out_val, **kwargs)
        credit(args, kwargs, flops)
        return flops

    return counted


def _mkldnn_rnn_layer_flop(input: torch.Tensor, weight_ih: torch.Tensor, weight_hh: torch.Tensor, *args: Any,
                           **kwargs: Any) -> int:
    """One oneDNN LSTM layer in one direction: each token is multiplied by ``weight_ih`` and ``weight_hh``."""
    tokens = input.numel() // input.shape[-1]  # input: (T, B, C) or (T, C)
    return 2 * tokens * (weight_ih.numel() + weight_hh.numel())


_EXTRA_FORMULAS: dict[Any, Callable[..., int]] = {
    # Same signature start (query, key, value, ...) as the CUDA flash op, so torch's SDPA formula applies as is.
    _aten._scaled_dot_product_flash_attention_for_cpu: flop_registry[_aten._scaled_dot_product_flash_attention],
    _aten.mkldnn_rnn_layer: _mkldnn_rnn_layer_flop,
}
