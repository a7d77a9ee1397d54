"""Module handlers: what structured pruning must know about a module type beyond its ATen operations.

The tracer follows any module through its operations, so most modules need no handler. Integer attributes that
hold a size the module's code reshapes or splits by (``num_heads``, ``head_dim``, ``self.c`` in
``torch.split(x, self.c)``) are found by value and updated by the plan where that size shrinks (see
``planning._size_attributes``). A handler is needed when a module keeps sizes in plain attributes that its forward
reads in other ways (``nn.Linear.out_features`` is only cosmetic, but Hugging Face's ``Conv1D.nf`` shapes its output;
``nn.GroupNorm.num_groups`` feeds its operation), or under names that do not say they are sizes, when pruned
shapes require another module class (``nn.MultiheadAttention``), when its code ties sizes together in ways the
operations do not show (torchvision's Swin attention computes its head size from the input width), or when it
cannot be traced at all (an ``opaque`` handler replaces tracing of the module's inside).

One handler per module type, in a registry (:data:`HANDLERS`, :func:`register_handler`) keyed by the class or by
its qualified name as a string (``"transformers.pytorch_utils.Conv1D"``, so optional libraries need not be
imported). Lookup walks the module's class hierarchy, so a handler for ``nn.LayerNorm`` also serves subclasses.

Examples:
    A custom layer that stores its width in an attribute its forward uses:

    >>> import torch
    >>> from torch import nn
    >>> class Scale(nn.Module):
    ...     def __init__(self, width):
    ...         super().__init__()
    ...         self.width = width
    ...         self.gain = nn.Parameter(torch.ones(width))
    ...     def forward(self, x):
    ...         return x * self.gain.view(1, self.width)
    >>> class ScaleHandler(Handler):
    ...     def attributes(self, module, sizes):
    ...         return {"width": sizes.shape("gain")[0]}
    >>> registry = HandlerRegistry(HANDLERS)
    >>> registry.register(Scale, ScaleHandler())
    >>> type(registry.find(Scale(3))).__name__
    'ScaleHandler'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from prunekit.structured.labels import Field

__all__ = ["HANDLERS", "Handler", "HandlerRegistry", "ModuleSizes", "register_handler"]


class ModuleSizes:
    """What a plan does to the tensors of one module: old and new shapes and kept indices, by local name.

    Local names are relative to the module (``"weight"``, ``"out_proj.weight"``); tied aliases resolve to their
    tensor. Handed to :meth:`Handler.attributes` and :meth:`Handler.replacement`.
    """

    def __init__(self, prefix: str, old: Mapping[str, tuple[int, ...]], new: Mapping[str, tuple[int, ...]],
                 kept: Mapping[tuple[str, int], list[int]], aliases: Mapping[str, str],
                 inputs: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
        self.prefix = prefix
        self._old, self._new, self._kept, self._aliases = old, new, kept, aliases
        self._inputs = inputs

    def _full(self, local: str) -> str:
        name = f"{self.prefix}.{local}" if self.prefix else local
        return self._aliases.get(name, name)

    def has(self, local: str) -> bool:
        return self._full(local) in self._old

    def shape(self, local: str) -> tuple[int, ...]:
        """The shape of tensor ``local`` after pruning."""
        return tuple(self._new[self._full(local)])

    def old_shape(self, local: str) -> tuple[int, ...]:
        """The shape of tensor ``local`` before pruning."""
        return tuple(self._old[self._full(local)])

    def kept(self, local: str, dim: int) -> list[int] | None:
        """Indices kept along ``dim`` of tensor ``local`` (None: all kept)."""
        return self._kept.get((self._full(local), dim))

    def changed(self) -> bool:
        """True if any tensor of this module or its submodules changes shape."""
        start = f"{self.prefix}." if self.prefix else ""
        return any(self._old[n] != self._new[n] for n in self._old if n.startswith(start))

    def input_shape(self, index: int = 0) -> tuple[int, ...] | None:
        """Shape of the module's ``index``-th positional tensor input after pruning (from the traced call)."""
        return self._inputs[index][1] if index < len(self._inputs) else None

    def old_input_shape(self, index: int = 0) -> tuple[int, ...] | None:
        return self._inputs[index][0] if index < len(self._inputs) else None


class Handler:
    """How structured pruning treats one module type. Subclass and override what the module needs.

    Attributes:
        opaque: If True, the module's inside is not traced: :meth:`trace` must set the labels of its outputs and
            couple its parameters (nothing is coupled otherwise, and its inputs are not frozen).
        attention: ``"heads"`` (prune whole heads, the default) or ``"uniform"`` (prune the same head dimensions in
            every head) for attention computed inside this module.
        sized_slices: If True, the module's code computes its slice bounds from the sliced tensor's size (``b[n // 3 :
            2 * n // 3]``), so a slice that is piece i of k equal pieces stays that piece after pruning: the pieces are
            pruned alike instead of the sliced channels being kept.
    """

    opaque: bool = False
    attention: str | None = None
    sized_slices: bool = False

    def trace(self, state: Any, module: nn.Module, name: str, args: tuple, kwargs: dict, output: Any) -> None:
        """Called after the module ran during tracing (its operations already traced unless ``opaque``).

        ``state`` is the :class:`~prunekit.structured.tracer.TraceState`: ``state.fields(tensor)`` gives a tensor's
        labels (parameters included), ``state.union(a, b)`` couples atoms, ``state.freeze(atoms)`` forbids pruning,
        ``state.set_fields(tensor, fields)`` labels an output.
        """

    def attributes(self, module: nn.Module, sizes: ModuleSizes) -> dict[str, Any]:
        """Attribute values the module needs after pruning (JSON-able: ints, floats, strings, lists)."""
        return {}

    def replacement(self, module: nn.Module, sizes: ModuleSizes) -> str | None:
        """Name of a replacement module (:data:`prunekit.structured.modules.REPLACEMENTS`), or None to keep it."""
        return None


class HandlerRegistry:
    """Handlers by module class or qualified class name; an optional parent registry is searched after this one."""

    def __init__(self, parent: HandlerRegistry | None = None) -> None:
        self._handlers: dict[type | str, Handler] = {}
        self._parent = parent

    def register(self, key: type | str, handler: Handler) -> None:
        """Register ``handler`` for module class ``key`` (a type or ``"package.module.ClassName"``).

        Raises:
            TypeError: If ``key`` or ``handler`` has the wrong type.
        """
        if not isinstance(key, (type, str)):
            raise TypeError(f"handler keys are module classes or qualified class names, got {key!r}")
        if not isinstance(handler, Handler):
            raise TypeError(f"handler must be a prunekit.structured.Handler instance, got {type(handler).__name__}")
        self._handlers[key] = handler

    def find(self, module: nn.Module) -> Handler | None:
        """The handler for ``module``'s class or its nearest registered base class (None if there is none)."""
        for c in type(module).__mro__:
            for key in (c, f"{c.__module__}.{c.__qualname__}"):
                if key in self._handlers:
                    return self._handlers[key]
        return self._parent.find(module) if self._parent is not None else None


# --- torch.nn --------------------------------------------------------------------------------------------------------


class LinearHandler(Handler):
    def attributes(self, module: nn.Module, sizes: ModuleSizes) -> dict[str, Any]:
        out_features, in_features = sizes.shape("weight")
        return {"in_features": in_features, "out_features": out_features}


class ConvHandler(Handler):
    """``nn.Conv*d`` / ``nn.ConvTranspose*d``: channels and groups (grouped convolutions lose whole groups)."""

    def attributes(self, module: nn.Module, sizes: ModuleSizes) -> dict[str, Any]:
        new, old = sizes.shape("weight"), sizes.old_shape("weight")
        g = module.groups
        if module.transposed:  # weight (C_in, C_out / g, *k)
            groups = g * new[0] // old[0] if g > 1 else 1
            return {"in_channels": new[0], "out_channels": new[1] * groups, "groups": groups}
        groups = g * new[0] // old[0] if g > 1 else 1  # weight (C_out, C_in / g, *k)
        return {"in_channels": new[1] * groups, "out_channels": new[0], "groups": groups}


class DeformConvHandler(Handler):
    """torchvision's ``DeformConv2d``: a convolution's channel and group attributes (its offsets are inputs)."""

    def attributes(self, module: nn.Module, sizes: ModuleSizes) -> dict[str, Any]:
        new, old = sizes.shape("weight"), sizes.old_shape("weight")
        groups = module.groups * new[0] // old[0] if module.groups > 1 else 1
        return {"in_channels": new[1] * groups, "out_channels": new[0], "groups": groups}


class NormHandler(Handler):
    """BatchNorm / InstanceNorm (``num_features``)."""

    def attributes(self, module: nn.Module, sizes: ModuleSizes) -> dict[str, Any]:
        for name in ("weight", "running_mean"):
            if sizes.has(name):
                return {"num_features": sizes.shape(name)[0]}
        shape = sizes.input_shape()
        return {"num_features": shape[1]} if shape else {}


class LayerNormHandler(Handler):
    """LayerNorm / RMSNorm (``normalized_shape``)."""

    def attributes(self, module: nn.Module, sizes: ModuleSizes) -> dict[str, Any]:
        n = len(module.normalized_shape)
        if sizes.has("weight"):
            return {"normalized_shape": list(sizes.shape("weight"))}
        shape = sizes.input_shape()
        return {"normalized_shape": list(shape[-n:])} if shape else {}


class GroupNormHandler(Handler):
    def attributes(self, module: nn.Module, sizes: ModuleSizes) -> dict[str, Any]:
        if sizes.has("weight"):
            channels = sizes.shape("weight")[0]
        else:
            shape = sizes.input_shape()
            if not shape:
                return {}
            channels = shape[1]
        # channels go in whole groups, except with one group (any channel can go, one group remains)
        groups = 1 if module.num_groups == 1 else module.num_groups * channels // module.num_channels
        return {"num_channels": channels, "num_groups": groups}


class EmbeddingHandler(Handler):
    def attributes(self, module: nn.Module, sizes: ModuleSizes) -> dict[str, Any]:
        num, dim = sizes.shape("weight")
        return {"num_embeddings": num, "embedding_dim": dim}


class PReLUHandler(Handler):
    def attributes(self, module: nn.Module, sizes: ModuleSizes) -> dict[str, Any]:
        return {"num_parameters": int(torch.Size(sizes.shape("weight")).numel())}


class MultiheadAttentionHandler(Handler):
    """``nn.MultiheadAttention``: whole heads; replaced by :class:`prunekit.structured.modules.MultiheadAttention`
    (whose attention width may differ from ``embed_dim``) as soon as any of its tensors shrinks."""

    attention = "heads"
    opaque = True  # replaced when pruned, so its internals (masks expanded to num_heads) do not constrain the plan

    def trace(self, state: Any, module: nn.Module, name: str, args: tuple, kwargs: dict, output: Any) -> None:
        inputs = [args[i] if i < len(args) else kwargs.get(k) for i, k in enumerate(("query", "key", "value"))]
        h, d = module.num_heads, module.head_dim
        if module.in_proj_weight is not None:
            rows, cols = _dim(state, module.in_proj_weight, 0), _dim(state, module.in_proj_weight, 1)
            for x in inputs:
                _meet(state, _dim(state, x, x.dim() - 1), cols)
            heads = _per_head(state, rows, (3, h, d))
        else:
            heads = None
            for x, w in zip(inputs, (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)):
                _meet(state, _dim(state, x, x.dim() - 1), _dim(state, w, 1))
                heads = _join(state, heads, _per_head(state, _dim(state, w, 0), (1, h, d)))
        if module.in_proj_bias is not None:
            heads = _join(state, heads, _per_head(state, _dim(state, module.in_proj_bias, 0), (3, h, d)))
        for extra in (module.bias_k, module.bias_v):
            if extra is not None:
                heads = _join(state, heads, _per_head(state, _dim(state, extra, extra.dim() - 1), (1, h, d)))
        heads = _join(state, heads, _per_head(state, _dim(state, module.out_proj.weight, 1), (1, h, d)))
        if heads is not None:
            state.note(heads, f"heads ({name})")
        out_rows = _dim(state, module.out_proj.weight, 0)
        if module.out_proj.bias is not None:
            _meet(state, out_rows, _dim(state, module.out_proj.bias, 0))
        result = output[0] if isinstance(output, tuple) else output
        if out_rows is not None:
            state.set_fields(result, [Field((result.dim() - 1,), out_rows)])

    def attributes(self, module: nn.Module, sizes: ModuleSizes) -> dict[str, Any]:
        if not sizes.changed():
            return {}
        embed = sizes.shape("out_proj.weight")[0]
        if sizes.has("in_proj_weight"):
            inner = sizes.shape("in_proj_weight")[0] // 3
            kdim = vdim = sizes.shape("in_proj_weight")[1]
        else:
            inner = sizes.shape("q_proj_weight")[0]
            kdim, vdim = sizes.shape("k_proj_weight")[1], sizes.shape("v_proj_weight")[1]
        head_dim = module.head_dim
        kept = sizes.kept("out_proj.weight", 1)
        heads = sorted({i // head_dim for i in kept}) if kept is not None else list(range(module.num_heads))
        return {"embed_dim": embed, "kdim": kdim, "vdim": vdim, "num_heads": inner // head_dim,
                "head_dim": head_dim, "kept_heads": heads}

    def replacement(self, module: nn.Module, sizes: ModuleSizes) -> str | None:
        return "prunekit.MultiheadAttention" if sizes.changed() else None


class RNNHandler(Handler):
    """``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``: hidden units (and an LSTM's projected units).

    One ``hidden_size`` serves every layer and direction (``h_n`` stacks them in one tensor), so hidden unit ``j`` is
    one prunable unit across all of them: rows ``g * H + j`` of every gate ``g`` in ``weight_ih``/``weight_hh`` and
    both biases, column ``j`` of ``weight_hh`` (or of ``weight_hr`` with ``proj_size``), the next layer's input
    columns ``j`` (and ``H + j`` from the reverse direction), the output features and the last dimension of
    ``h_n``/``c_n``. The first layer's input columns follow the input's features. Zeroing a unit's rows and biases
    makes its gates constant and its state stay at zero from a zero initial state, so soft pruning equals
    physical pruning; initial states the caller passes must carry the same units (unlabelled ones freeze them).
    The fused recurrent kernels cannot be followed op by op, hence ``opaque``."""

    opaque = True

    def trace(self, state: Any, module: nn.Module, name: str, args: tuple, kwargs: dict, output: Any) -> None:
        gates = _gates(module)
        hidden, proj = module.hidden_size, getattr(module, "proj_size", 0)
        directions = 2 if module.bidirectional else 1
        unit = state.new_atoms(hidden)  # hidden unit j, shared by every layer and direction
        out_unit = state.new_atoms(proj) if proj else unit
        state.note(unit, f"hidden units ({name})")
        params = dict(module.named_parameters(recurse=False))
        for layer in range(module.num_layers):
            for d in range(directions):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                rows = unit.repeat(gates)
                for key in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    _meet(state, _dim(state, params.get(key + sfx), 0), rows)
                _meet(state, _dim(state, params[f"weight_hh{sfx}"], 1), out_unit)
                if proj:
                    _meet(state, _dim(state, params[f"weight_hr{sfx}"], 0), out_unit)
                    _meet(state, _dim(state, params[f"weight_hr{sfx}"], 1), unit)
                cols = _dim(state, params[f"weight_ih{sfx}"], 1)
                if layer:
                    _meet(state, cols, out_unit.repeat(directions))
                else:
                    x = args[0] if args else kwargs.get("input")
                    x = x.data if isinstance(x, nn.utils.rnn.PackedSequence) else x  # (N, features) when packed
                    _meet(state, cols, _dim(state, x, x.dim() - 1) if isinstance(x, torch.Tensor) else None)
        given = args[1] if len(args) > 1 else kwargs.get("hx")
        result, states = output
        for h0, atoms in zip(given if isinstance(given, tuple) else (given,), (out_unit, unit)):  # (h_0, c_0)
            if isinstance(h0, torch.Tensor):  # (layers * directions, [batch,] width): the same units in every row
                _meet(state, _dim(state, h0, h0.dim() - 1), atoms)
        data = result.data if isinstance(result, nn.utils.rnn.PackedSequence) else result
        state.set_fields(data, [Field((data.dim() - 1,), out_unit.repeat(directions))])
        for t, atoms in zip(states if isinstance(states, tuple) else (states,), (out_unit, unit)):
            state.set_fields(t, [Field((t.dim() - 1,), atoms)])

    def attributes(self, module: nn.Module, sizes: ModuleSizes) -> dict[str, Any]:
        new = {"input_size": sizes.shape("weight_ih_l0")[1],
               "hidden_size": sizes.shape("weight_hh_l0")[0] // _gates(module)}
        if getattr(module, "proj_size", 0):
            new["proj_size"] = sizes.shape("weight_hr_l0")[0]
        return new


def _gates(rnn: nn.Module) -> int:
    """Rows per hidden unit in a recurrent layer's weights: 4 gates (LSTM), 3 (GRU), 1 (RNN)."""
    return {"LSTM": 4, "GRU": 3}.get(rnn.mode, 1)


def _dim(state: Any, t: torch.Tensor | None, dim: int) -> torch.Tensor | None:
    """Atoms along one dimension of a tensor (a joint field is coupled along its other dimensions), or None."""
    if t is None:
        return None
    for f in state.fields(t):
        if dim in f.dims:
            g = state.restrict(f, [dim])
            return g.atoms if g is not None else None
    return None


def _meet(state: Any, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
    if a is not None and b is not None:
        state.union(a, b)
    elif a is not None or b is not None:
        state.freeze(a if a is not None else b)


def _per_head(state: Any, atoms: torch.Tensor | None, shape: tuple[int, int, int]) -> torch.Tensor | None:
    """Couple ``atoms`` laid out as ``(pieces, heads, head_dim)`` into one unit per head; returns one atom per head."""
    if atoms is None:
        return None
    grid = atoms.reshape(shape).permute(1, 0, 2).reshape(shape[1], -1)  # (heads, pieces * head_dim)
    rep = grid.amax(dim=1, keepdim=True)
    state.union(grid, rep)
    return rep.squeeze(1)


def _join(state: Any, a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None or b is None:
        return a if a is not None else b
    state.union(a, b)
    return a


# --- torchvision ----------------------------------------------------------------------------------------------------


class VisionTransformerHandler(Handler):
    """torchvision ``VisionTransformer`` reshapes the patch embedding with its ``hidden_dim`` attribute."""

    def attributes(self, module: nn.Module, sizes: ModuleSizes) -> dict[str, Any]:
        return {"hidden_dim": sizes.shape("conv_proj.weight")[0]}


class ShiftedWindowAttentionHandler(Handler):
    """torchvision Swin attention computes ``head_dim = C // num_heads`` from its input width ``C`` and reshapes the
    output to ``C``: the attention width must equal the input width. So heads stay, the same head dimensions are
    pruned in every head (``uniform``), and attention position ``h * head_dim + j`` is coupled to input channel
    ``h * head_dim + j``."""

    attention = "uniform"
    sized_slices = True  # Swin V2 zeroes the key third of its qkv bias: qkv_bias[n // 3 : 2 * n // 3]

    def trace(self, state: Any, module: nn.Module, name: str, args: tuple, kwargs: dict, output: Any) -> None:
        x = args[0]
        width = x.shape[-1]
        channel = next((f.atoms for f in state.fields(x) if f.dims == (x.dim() - 1,)), None)
        if channel is None:
            channel = torch.full((width,), -1, dtype=torch.int64)
        rows = next((f.atoms for f in state.fields(module.qkv.weight) if f.dims == (0,)), None)
        if rows is not None:
            state.union(rows.view(3, width), channel.view(1, width))
        cols = next((f.atoms for f in state.fields(module.proj.weight) if f.dims == (1,)), None)
        if cols is not None:
            state.union(cols, channel)


# --- Hugging Face transformers ------------------------------------------------------------------------------------


class HFConv1DHandler(Handler):
    """transformers ``Conv1D`` (GPT-2): weight ``(nx, nf)``; its forward shapes the output with ``nf``."""

    def attributes(self, module: nn.Module, sizes: ModuleSizes) -> dict[str, Any]:
        nx, nf = sizes.shape("weight")
        return {"nx": nx, "nf": nf}


class GPT2AttentionHandler(Handler):
    """transformers ``GPT2Attention`` splits the fused projection with ``split_size`` and counts ``num_heads``."""

    attention = "heads"

    def attributes(self, module: nn.Module, sizes: ModuleSizes) -> dict[str, Any]:
        if getattr(module, "is_cross_attention", False):
            split = sizes.shape("q_attn.weight")[1]
        else:
            split = sizes.shape("c_attn.weight")[1] // 3
        return {"split_size": split, "num_heads": split // module.head_dim}


#: The default registry; :func:`register_handler` adds to it.
HANDLERS = HandlerRegistry()
for _key, _handler in [
    (nn.Linear, LinearHandler()),
    (nn.modules.conv._ConvNd, ConvHandler()),
    (nn.modules.batchnorm._NormBase, NormHandler()),
    (nn.LayerNorm, LayerNormHandler()),
    (nn.GroupNorm, GroupNormHandler()),
    (nn.Embedding, EmbeddingHandler()),
    (nn.PReLU, PReLUHandler()),
    (nn.MultiheadAttention, MultiheadAttentionHandler()),
    (nn.RNNBase, RNNHandler()),
    ("torchvision.models.vision_transformer.VisionTransformer", VisionTransformerHandler()),
    ("torchvision.models.swin_transformer.ShiftedWindowAttention", ShiftedWindowAttentionHandler()),
    ("torchvision.ops.deform_conv.DeformConv2d", DeformConvHandler()),
    ("transformers.pytorch_utils.Conv1D", HFConv1DHandler()),
    ("transformers.models.gpt2.modeling_gpt2.GPT2Attention", GPT2AttentionHandler()),
]:
    HANDLERS.register(_key, _handler)
if hasattr(nn, "RMSNorm"):
    HANDLERS.register(nn.RMSNorm, LayerNormHandler())


def register_handler(key: type | str, handler: Handler) -> None:
    """Register ``handler`` for a module class (or ``"package.module.ClassName"``) in the default registry.

    Raises:
        TypeError: If ``key`` is not a class or string, or ``handler`` is not a :class:`Handler`.
    """
    HANDLERS.register(key, handler)
