"""One-shot pruning of transformers and LLMs with calibration data: magnitude, Wanda and SparseGPT, block by block.

:func:`prune` walks the model's blocks with :func:`prunekit.calibration.sequential_blocks`: for each block it
gathers the statistics its method needs from the calibration batches (which have already passed through the pruned
blocks before it, or, with ``inputs="dense"``, the Wanda default, through the dense ones), prunes every linear layer
inside the block, and moves on. Only linear layers inside the blocks are
pruned (not embeddings, not the LM head), which is also what the returned mask's sparsity counts.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from prunekit.calibration import (
    InputStatistics,
    SafetensorsStream,
    block_linears,
    find_blocks,
    linear_weight,
    record_inputs,
    sequential_blocks,
)
from prunekit.llm.criteria import wanda
from prunekit.llm.sparsegpt import SparseGPT
from prunekit.masks import Mask
from prunekit.pruner import Pruner, glob_escape
from prunekit.schedules import OneShot
from prunekit.select import n_m, per_row, uniform
from prunekit.targets import check_sparsity

__all__ = ["METHODS", "calibration_batches", "parse_pattern", "perplexity", "prune", "to_pruner"]

#: Pruning methods by name; the value says whether the method needs calibration data.
METHODS: dict[str, bool] = {"magnitude": False, "wanda": True, "sparsegpt": True}

#: How magnitude and Wanda scores are compared: within each output row, or over the whole layer.
_ALLOCATIONS: dict[str, Callable[..., Mask]] = {"per_row": per_row, "uniform": uniform}

BlockSparsity = Sequence[float] | Mapping[int | str, float] | Callable[[int, int], float]


def parse_pattern(pattern: str | tuple[int, int]) -> tuple[int, int]:
    """Parse an N:M pattern such as ``"2:4"`` into ``(n, m)`` (``n`` of every ``m`` weights are pruned).

    Examples:
        >>> parse_pattern("2:4"), parse_pattern((4, 8))
        ((2, 4), (4, 8))
    """
    if isinstance(pattern, tuple) and len(pattern) == 2 and all(isinstance(v, int) for v in pattern):
        n, m = pattern
    elif isinstance(pattern, str) and re.fullmatch(r"\s*\d+\s*:\s*\d+\s*", pattern):
        n, m = (int(v) for v in pattern.split(":"))
    else:
        raise ValueError(f"pattern must look like '2:4' (n pruned of every m weights), got {pattern!r}")
    if not 1 <= n < m:
        raise ValueError(f"pattern {n}:{m} is invalid: need 1 <= n < m, e.g. '2:4' or '4:8'")
    return n, m


def _check_batch(batch: Any, i: int, vocab: int | None, what: str, tokens: bool = True) -> Any:
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
    if not tokens:  # a plain nn.Module: any tensor input with a batch dimension
        if not isinstance(ids, torch.Tensor) or ids.dim() < 1 or ids.shape[0] < 1:
            got = f"shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"{what} batch {i} must be a tensor with a batch dimension, got {got}")
        return batch
    if isinstance(batch, Mapping) and ids is None:
        if "inputs_embeds" in batch or "hidden_states" in batch:
            return batch
        raise ValueError(f"{what} batch {i} is a mapping without 'input_ids' (keys: {sorted(batch)})")
    if not isinstance(ids, torch.Tensor):
        raise TypeError(
            f"{what} batch {i} is a {type(ids).__name__}; expected a tensor of token ids of shape (batch, sequence) "
            "or a dict with 'input_ids'"
        )
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(
            f"{what} batch {i} has dtype {ids.dtype}; token ids must be an integer tensor (torch.int64). Tokenize "
            "the text first, e.g. tokenizer(text, return_tensors='pt').input_ids"
        )
    if ids.dim() != 2 or ids.shape[1] < 1:
        fix = "add a batch dimension with ids[None]" if ids.dim() == 1 else "reshape it to (batch, sequence)"
        raise ValueError(
            f"{what} batch {i} has shape {tuple(ids.shape)}; expected token ids of shape (batch, sequence): {fix}"
        )
    if vocab is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(
            f"{what} batch {i} holds token ids in [{int(ids.min())}, {int(ids.max())}], but the model's vocabulary "
            f"is [0, {vocab}); was it tokenized with this model's tokenizer?"
        )
    return batch


def calibration_batches(
    data: torch.Tensor | Iterable[Any], model: nn.Module | None = None, *, batch_size: int = 4,
    what: str = "calibration",
) -> list[Any]:
    """Validate calibration (or evaluation) data and split it into batches.

    Args:
        data: A tensor of token ids ``(N, T)`` (split into batches of ``batch_size`` sequences), or an iterable of
            batches: tensors ``(B, T)`` or mappings of model inputs with ``"input_ids"``. For a plain ``nn.Module``
            (no ``config``), any tensors with a batch dimension (its forward takes them positionally).
        model: If given and it has ``config.vocab_size``, token ids are checked against it.
        batch_size: Sequences per batch when ``data`` is one tensor.
        what: Name used in error messages.

    Returns:
        The list of batches.

    Raises:
        TypeError, ValueError: Wrong dtype, shape, token range, or no data; the message says how to fix it.

    Examples:
        >>> [tuple(b.shape) for b in calibration_batches(torch.zeros(5, 3, dtype=torch.long), batch_size=2)]
        [(2, 3), (2, 3), (1, 3)]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    tokens = model is None or hasattr(model, "config")  # Hugging Face models take token ids; plain modules anything
    if isinstance(data, torch.Tensor):
        _check_batch(data, 0, vocab, what, tokens)
        batches: list[Any] = list(data.split(batch_size))
    elif isinstance(data, Mapping):
        batches = [_check_batch(data, 0, vocab, what, tokens)]
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        batches = [_check_batch(b, i, vocab, what, tokens) for i, b in enumerate(data)]
    else:
        raise TypeError(
            f"{what} data must be a tensor of token ids (N, T) or an iterable of batches, got {type(data).__name__}"
        )
    if not batches:
        raise ValueError(f"{what} data is empty; give at least one batch of token ids")
    for i, b in enumerate(batches):
        ids = b.get("input_ids") if isinstance(b, Mapping) else b
        if isinstance(ids, torch.Tensor) and ids.numel() == 0:
            raise ValueError(f"{what} data is empty: batch {i} has shape {tuple(ids.shape)}; give at least one "
                             "sequence of at least one token")
    return batches


def _block_targets(
    n_blocks: int, names: list[str], sparsity: float, block_sparsity: BlockSparsity | None
) -> list[float]:
    if block_sparsity is None:
        return [sparsity] * n_blocks
    if callable(block_sparsity):
        values = [block_sparsity(i, n_blocks) for i in range(n_blocks)]
    elif isinstance(block_sparsity, Mapping):
        values = []
        for i, name in enumerate(names):
            value = block_sparsity.get(i, block_sparsity.get(name, sparsity))
            values.append(value)
        unknown = [k for k in block_sparsity if k not in names and not (isinstance(k, int) and 0 <= k < n_blocks)]
        if unknown:
            raise ValueError(f"block_sparsity names blocks {unknown} that do not exist; blocks are 0..{n_blocks - 1} "
                             f"or names like {names[0]!r}")
    else:
        values = list(block_sparsity)
        if len(values) != n_blocks:
            raise ValueError(
                f"block_sparsity has {len(values)} values but the model has {n_blocks} blocks; give one per block"
            )
    return [check_sparsity(v, f"block_sparsity of block {i}") for i, v in enumerate(values)]


def _check_skip(model: nn.Module, skip: Iterable[str]) -> list[str]:
    patterns = [skip] if isinstance(skip, str) else list(skip)
    names = [n for n, _ in model.named_modules() if n]
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"skip patterns must be strings (module names or globs), got {p!r}")
        if not any(fnmatch.fnmatchcase(n, p) or n == p or n.endswith("." + p) for n in names):
            raise ValueError(
                f"skip pattern {p!r} matches no module of {type(model).__name__}; patterns are module names, dotted "
                f"suffixes ('down_proj') or globs ('*.self_attn.*'), e.g. {names[-3:]}"
            )
    return patterns


#: Which activations each calibrated method's statistics come from when ``prune(inputs=None)`` (see ``inputs``).
DEFAULT_INPUTS = {"wanda": "dense", "sparsegpt": "pruned"}


def prune(
    model: nn.Module,
    calibration: torch.Tensor | Iterable[Any] | None = None,
    *,
    method: str = "wanda",
    sparsity: float | None = None,
    pattern: str | tuple[int, int] | None = None,
    skip: str | Iterable[str] = (),
    block_sparsity: BlockSparsity | None = None,
    allocation: str | None = None,
    blocks: str | Sequence[str] | None = None,
    batch_size: int = 4,
    damp: float = 0.01,
    blocksize: int = 128,
    checkpoint: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
    inputs: str | None = None,
) -> Mask:
    """Prune the linear layers inside a transformer's blocks in one shot, block by block, in place.

    Args:
        model: A Hugging Face model (decoder or encoder) or any ``nn.Module`` with repeated blocks.
        calibration: Token ids ``(N, T)`` or an iterable of batches (see :func:`calibration_batches`); needed by
            ``"wanda"`` and ``"sparsegpt"``, ignored by ``"magnitude"``.
        method: ``"magnitude"`` (|W|), ``"wanda"`` (|W|·‖X_j‖₂, :func:`prunekit.llm.criteria.wanda`) or
            ``"sparsegpt"`` (OBS reconstruction, :class:`prunekit.llm.SparseGPT`).
        sparsity: Fraction of zeros in [0, 1) in each layer (unstructured). Give this or ``pattern``.
        pattern: N:M pattern such as ``"2:4"`` or ``"4:8"``: ``n`` of every ``m`` consecutive weights along the
            input dimension are pruned.
        skip: Layers never pruned: module names, dotted suffixes (``"down_proj"``) or globs (``"*.self_attn.*"``).
        block_sparsity: Non-uniform sparsity per block, instead of ``sparsity`` everywhere: one value per block, a
            ``{block index or name: sparsity}`` mapping (others get ``sparsity``), or ``f(index, n_blocks)``.
        allocation: How magnitude/Wanda scores are compared: ``"per_row"`` (default; the same fraction in every
            output row) or ``"uniform"`` (over the whole layer). SparseGPT chooses its own masks (not allowed).
        blocks: Which modules are the blocks (see :func:`prunekit.calibration.find_blocks`); detected by default.
        batch_size: Sequences per forward pass when ``calibration`` is a single tensor. Larger batches run a
            little faster but hold more activations at once (attention scores grow with batch x heads x T²); 4
            keeps SmolLM2's extra memory under its model size with 128 x 512 calibration tokens.
        damp: SparseGPT dampening, a fraction of the mean Hessian diagonal.
        blocksize: SparseGPT columns per lazy-update block.
        checkpoint: Stream the blocks from this safetensors checkpoint (file or folder) instead of memory; the
            model may be a skeleton without weights (``accelerate.init_empty_weights()``). Needs ``out``.
        out: With ``checkpoint``: folder the pruned model is written to (one shard per block, loadable with
            ``from_pretrained`` when the checkpoint folder has a ``config.json``). The blocks of ``model`` are left
            on the ``meta`` device.
        progress: Show a progress bar per block.
        inputs: Which activations a block's statistics come from: ``"pruned"`` (the outputs of the already-pruned
            blocks before it, as in the SparseGPT and Wanda papers' code) or ``"dense"`` (the dense model's: one
            forward pass per block instead of two). Default: ``"dense"`` for Wanda, ``"pruned"`` for SparseGPT
            (which reconstructs each layer's output from its actual inputs). Chosen on validation text for
            SmolLM2-135M at 50%: Wanda on dense activations gave perplexity 75.1 vs 76.6 on 32 *Northanger Abbey*
            windows kept apart from the calibration text, in half the time (``benchmarks/results/
            llm_validation.json``).

    Returns:
        The keep-masks (``True`` = kept) of every pruned weight, by parameter name; the weights are already zeroed
        (and, for SparseGPT, updated). Pass them to :func:`prunekit.report`, or to :func:`to_pruner` for
        :func:`prunekit.save`.

    Raises:
        ValueError, TypeError: Unknown method, sparsity out of range, bad pattern (``m`` must divide each layer's
            input dimension), blocks not found, calibration data of the wrong shape or dtype.

    Examples:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
        >>> data = torch.randint(0, 64, (4, 12))
        >>> masks = prune(model, data, method="wanda", sparsity=0.5, progress=False)
        >>> round(masks.sparsity(), 3), len(masks)
        (0.5, 14)
        >>> masks = prune(model, data, method="sparsegpt", pattern="2:4", progress=False)
        >>> bool((~masks["model.layers.0.mlp.down_proj.weight"]).view(16, -1, 4).sum(-1).eq(2).all())
        True
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    if (sparsity is None) == (pattern is None) and block_sparsity is None:
        raise ValueError("give exactly one of sparsity=0.5 (unstructured) or pattern='2:4' (N:M)")
    if pattern is not None and (sparsity is not None or block_sparsity is not None):
        raise ValueError("pattern= fixes the sparsity at n/m; do not also give sparsity= or block_sparsity=")
    nm = parse_pattern(pattern) if pattern is not None else None
    base = check_sparsity(sparsity) if sparsity is not None else 0.0
    if allocation is not None:
        if method == "sparsegpt":
            raise ValueError("allocation= applies to magnitude and Wanda; SparseGPT selects its masks itself")
        if allocation not in _ALLOCATIONS:
            raise ValueError(f"unknown allocation {allocation!r}; choose one of {sorted(_ALLOCATIONS)}")
    select_rule = _ALLOCATIONS[allocation or "per_row"]
    if inputs is None:
        inputs = DEFAULT_INPUTS.get(method, "pruned")  # magnitude uses no calibration data
    if inputs not in ("pruned", "dense"):
        raise ValueError(f"inputs={inputs!r}: choose 'pruned' (outputs of the already-pruned blocks) or 'dense'")
    if (checkpoint is None) != (out is None):
        raise ValueError("streaming needs both checkpoint= (where the weights are read) and out= (where they go)")
    skip = _check_skip(model, skip)
    found = find_blocks(model, blocks)
    names = [b.name for b in found]
    targets = _block_targets(len(found), names, base, block_sparsity)
    needs_data = METHODS[method]
    batches = None
    if needs_data:
        if calibration is None:
            raise ValueError(f"method {method!r} needs calibration data: pass calibration=token_ids (N, T)")
        batches = calibration_batches(calibration, model, batch_size=batch_size)
    if nm is not None:
        _check_pattern_fits(found, skip, nm)
    stream = SafetensorsStream(checkpoint, out) if checkpoint is not None else None

    masks = Mask()
    was_training = model.training
    model.eval()
    desc = f"{method} {pattern if nm else f'{base:.0%}' if block_sparsity is None else 'per-block'}"
    try:
        with torch.no_grad():
            for block in sequential_blocks(model, batches, blocks=names, stream=stream,
                                           progress=desc if progress else False, inputs=inputs):
                layers = block_linears(block.module, skip, prefix=block.name)
                if not layers:
                    continue
                target = targets[block.index]
                if method == "sparsegpt":
                    solvers = {k: SparseGPT(layer, blocksize=blocksize, damp=damp) for k, layer in layers.items()}
                    with record_inputs(layers, solvers):
                        block.run()
                    for k, solver in solvers.items():
                        keep = solver.solve(n=nm[0], m=nm[1]) if nm else solver.solve(sparsity=target)
                        solver.free()
                        masks[_weight_name(block.name, k)] = keep
                    continue
                stats: dict[str, InputStatistics] = {}
                if method == "wanda":
                    stats = {k: InputStatistics(_in_features(layer)) for k, layer in layers.items()}
                    with record_inputs(layers, stats):
                        block.run()
                for k, layer in layers.items():
                    param, transposed = linear_weight(layer)
                    w = param.detach().T if transposed else param.detach()  # (out, in)
                    scores = wanda(w, stats[k].norms()) if method == "wanda" else w.abs()
                    stats.pop(k, None)
                    chosen = n_m({k: scores}, *nm) if nm else select_rule({k: scores}, target)
                    keep = chosen[k].T.contiguous() if transposed else chosen[k]
                    param.mul_(keep)
                    masks[_weight_name(block.name, k)] = keep
    finally:
        model.train(was_training)
    return masks


def _weight_name(block: str, layer: str) -> str:
    return f"{block}.{layer}.weight" if layer else f"{block}.weight"


def _in_features(layer: nn.Module) -> int:
    param, transposed = linear_weight(layer)
    return param.shape[0] if transposed else param.shape[1]


def _check_pattern_fits(found: list[Any], skip: list[str], nm: tuple[int, int]) -> None:
    bad = []
    for block in found:
        for k, layer in block_linears(block.module, skip, prefix=block.name).items():
            if _in_features(layer) % nm[1]:
                bad.append(f"{block.name}.{k} (input dimension {_in_features(layer)})")
    if bad:
        raise ValueError(
            f"pattern {nm[0]}:{nm[1]}: m={nm[1]} does not divide the input dimension of {len(bad)} layer(s): "
            f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}. Choose an m that divides them, or leave those "
            "layers out with skip=[...]"
        )


@torch.no_grad()
def perplexity(model: nn.Module, eval_batches: torch.Tensor | Iterable[Any], *, progress: bool = True) -> float:
    """Perplexity of a causal language model: ``exp(total negative log-likelihood / predicted tokens)``.

    Every window predicts its tokens 2..T from the ones before (the first token of a window has no context); padded
    positions (``attention_mask == 0`` in a mapping batch) are not counted.

    Args:
        model: A causal LM whose output has ``.logits`` ``(B, T, V)`` (or returns the logits tensor).
        eval_batches: Token ids ``(N, T)`` (evaluated one sequence at a time) or an iterable of batches.
        progress: Show a progress bar.

    Returns:
        The perplexity.

    Examples:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
        >>> 40 < perplexity(model, torch.randint(0, 64, (2, 10)), progress=False) < 90  # about 64 when untrained
        True
    """
    from tqdm.auto import tqdm

    batches = calibration_batches(eval_batches, model, batch_size=1, what="evaluation")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress, leave=False):
            inputs = dict(batch) if isinstance(batch, Mapping) else {"input_ids": batch}
            if getattr(getattr(model, "config", None), "use_cache", None) is not None:
                inputs.setdefault("use_cache", False)
            out = model(**inputs)
            logits = out if isinstance(out, torch.Tensor) else out.logits  # (B, T, V)
            ids = inputs["input_ids"]  # (B, T)
            labels = ids[:, 1:]
            if "attention_mask" in inputs and inputs["attention_mask"] is not None:
                labels = labels.masked_fill(inputs["attention_mask"][:, 1:] == 0, -100)
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="sum",
                ignore_index=-100,
            )
            total += float(nll)
            count += int((labels != -100).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluation data has no token to predict (every window needs at least 2 tokens)")
    return math.exp(total / count)


def to_pruner(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> Pruner:
    """Wrap the masks of :func:`prune` in a :class:`~prunekit.Pruner`, for :func:`prunekit.save` and fine-tuning.

    The Pruner holds exactly these masks and will not recompute them (its one-shot step counts as done): calling
    ``pruner.step()`` after each optimizer step keeps the pruned weights at zero while fine-tuning.

    Examples:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 4))
        >>> pruner = to_pruner(net, {"0.weight": torch.rand(4, 4) > 0.5})
        >>> pruner.step(), sorted(pruner.masks)
        (False, ['0.weight'])
    """
    masks = Mask(masks)
    if not masks:
        raise ValueError("no masks given")
    sparsity = min(masks.sparsity(), 0.999999)
    pruner = Pruner(model, sparsity, schedule=OneShot(at=0), include=[glob_escape(n) for n in masks])
    pruner.load_state_dict({"masks": masks, "config": {"step": 1}})
    return pruner
