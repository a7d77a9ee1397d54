"""One-shot pruning of transformers and small LLMs with calibration data (no retraining).

The common case::

    from transformers import AutoModelForCausalLM
    import prunekit.llm

    model = AutoModelForCausalLM.from_pretrained(path)
    masks = prunekit.llm.prune(model, calibration=token_ids, method="wanda", sparsity=0.5)   # or pattern="2:4"
    print(prunekit.llm.perplexity(model, eval_token_ids))

Methods: ``"magnitude"`` (|W|), ``"wanda"`` (|W| · ‖X_j‖₂ per output row) and ``"sparsegpt"`` (optimal
reconstruction, :class:`SparseGPT`), unstructured or N:M. Blocks are processed sequentially
(:mod:`prunekit.calibration`), so each block is calibrated on the outputs of the pruned blocks before it.
"""

from prunekit.llm.criteria import wanda
from prunekit.llm.prune import (
    METHODS,
    calibration_batches,
    parse_pattern,
    perplexity,
    prune,
    to_pruner,
)
from prunekit.llm.sparsegpt import SparseGPT

__all__ = [
    "METHODS",
    "SparseGPT",
    "calibration_batches",
    "parse_pattern",
    "perplexity",
    "prune",
    "to_pruner",
    "wanda",
]
