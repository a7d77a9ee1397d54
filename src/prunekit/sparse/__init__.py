"""Sparse CPU inference: run pruned Linear layers with sparse kernels where that is measurably faster.

::

    import prunekit, prunekit.sparse
    prunekit.prune(model, sparsity=0.9).remove()
    fast = prunekit.sparse.convert(model)          # times every Linear layer: sparse where faster, dense elsewhere
    print(fast.sparse_log)                         # per layer: dense time, sparse times, chosen kernel, speedup
    with torch.inference_mode():
        y = fast(x)

- :func:`convert` / :func:`to_dense`: swap layers in a model (decisions in :class:`ConversionLog`).
- :class:`SparseLinear`: the inference-only layer; kernels ``"native_csr"`` (prunekit's compiled C++ kernel, built
  with the system compiler at first use and cached; see :func:`build_info`) and ``"torch_csr"`` (torch's CSR
  tensors, the pure-torch fallback used when no compiler is available).

Conv layers stay dense: see ``benchmarks/sparse_linear.py`` for the measurement behind that choice.
"""

from prunekit.sparse._native import BuildInfo, build_info
from prunekit.sparse.convert import ConversionLog, LayerDecision, convert, to_dense
from prunekit.sparse.linear import KERNELS, SparseLinear, native_available

__all__ = [
    "KERNELS",
    "BuildInfo",
    "ConversionLog",
    "LayerDecision",
    "SparseLinear",
    "build_info",
    "convert",
    "native_available",
    "to_dense",
]
