"""SparseGPT: one-shot pruning with optimal reconstruction of the remaining weights (Frantar & Alistarh 2023,
"SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", https://arxiv.org/abs/2301.00774).

For a linear layer with weight ``W`` (out x in) and calibration inputs ``X`` (n x in), SparseGPT minimises the
layer-output error ``‖W Xᵀ − Ŵ Xᵀ‖²`` over sparse ``Ŵ`` with the Optimal Brain Surgeon update, one input column at a
time, using the Hessian ``H = 2/n XᵀX`` (dampened: ``H + λ·mean(diag H)·I``). Pruning weight ``w_q`` of a row costs
``w_q² / [H⁻¹]_qq`` (halved) and the rest of the row absorbs the error through row ``q`` of ``H⁻¹``. The columns are
processed in blocks of ``blocksize``: inside a block updates are applied eagerly, to later blocks lazily in one
matrix product (the "lazy batch" update); the inverse Hessian of the remaining columns is read off the upper
Cholesky factor of ``H⁻¹``. Masks are chosen adaptively per block of columns (lowest ``w² / [U]_qq²``), or per group
of ``m`` columns for an ``n:m`` pattern.

Lifecycle: ``solver = SparseGPT(layer)``; ``solver.add_batch(x)`` for every calibration batch (or through
:func:`prunekit.calibration.record_inputs`); ``mask = solver.solve(sparsity=0.5)`` writes the new weights into the
layer once and returns the keep-mask; ``solver.free()``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from prunekit.calibration import InputStatistics, linear_weight
from prunekit.targets import check_sparsity

__all__ = ["SparseGPT"]


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Run the enclosed ops on one intra-op thread (restored afterwards)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class SparseGPT:
    """Per-layer SparseGPT solver.

    Args:
        layer: An ``nn.Linear`` (or GPT-2 ``Conv1D``) layer; its weight is updated in place by :meth:`solve`.
        blocksize: Columns per lazy-update block (128 in the paper).
        damp: Dampening ``λ``, as a fraction of the mean diagonal of ``H`` (0.01 in the paper).

    Attributes:
        error: After :meth:`solve`, the predicted reconstruction error ``‖(W − Ŵ) Xᵀ‖² / n`` per output row
            (float64 ``(out,)``; its sum is the predicted mean squared output error per calibration row, summed over
            outputs). Exact for ``damp=0`` and a full-rank ``XᵀX``.

    Examples:
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> layer = nn.Linear(16, 4, bias=False)
        >>> x = torch.randn(256, 16)
        >>> solver = SparseGPT(layer, damp=0.0)
        >>> solver.add_batch(x)
        >>> w0 = layer.weight.detach().clone()
        >>> mask = solver.solve(sparsity=0.5)
        >>> measured = ((x @ w0.T - layer(x)) ** 2).sum() / 256
        >>> float(mask.float().mean()), bool(torch.isclose(measured.double(), solver.error.sum(), rtol=1e-3))
        (0.5, True)
        >>> solver.free()
    """

    def __init__(self, layer: nn.Module, *, blocksize: int = 128, damp: float = 0.01) -> None:
        weight, self.transposed = linear_weight(layer)
        self.layer = layer
        self.rows, self.columns = (weight.shape[1], weight.shape[0]) if self.transposed else tuple(weight.shape)
        if blocksize < 1:
            raise ValueError(f"blocksize must be >= 1, got {blocksize}")
        if not (isinstance(damp, (int, float)) and 0.0 <= damp < 1.0):
            raise ValueError(f"damp must be a fraction of the mean Hessian diagonal in [0, 1), got {damp!r}")
        self.blocksize = blocksize
        self.damp = float(damp)
        self.stats: InputStatistics | None = InputStatistics(self.columns, gram=True)
        self.error: torch.Tensor | None = None

    def add_batch(self, x: torch.Tensor) -> None:
        """Accumulate ``XᵀX`` from a batch of layer inputs ``x`` of shape ``(..., in)``."""
        if self.stats is None:
            raise RuntimeError("this solver was freed; create a new one")
        self.stats.add_batch(x)

    @property
    def count(self) -> int:
        """Calibration rows seen so far."""
        return 0 if self.stats is None else self.stats.count

    @torch.no_grad()
    def solve(
        self,
        sparsity: float | None = None,
        *,
        n: int = 0,
        m: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prune and reconstruct the layer's weight in place.

        Exactly one of: ``sparsity`` (unstructured: in each block of ``blocksize`` columns the lowest
        ``round(sparsity · out · block)`` saliencies are pruned), ``n``/``m`` (prune ``n`` of every ``m``
        consecutive input columns in each row), or ``mask`` (a given keep-mask; only the reconstruction is computed).

        Args:
            sparsity: Target fraction of zeros in [0, 1).
            n: Pruned weights per group (N:M).
            m: Group size (N:M); must divide the input dimension.
            mask: Keep-mask with the weight parameter's shape.

        Returns:
            The keep-mask (``bool``, the weight parameter's shape).

        Raises:
            ValueError: Several or no targets given, or an invalid pattern.
            RuntimeError: No calibration data was added.
        """
        given = sum([sparsity is not None, bool(n or m), mask is not None])
        if given != 1:
            raise ValueError("give exactly one of sparsity=..., n=/m= (N:M pattern) or mask=...")
        if sparsity is not None:
            sparsity = check_sparsity(sparsity)
        if n or m:
            if not (isinstance(n, int) and isinstance(m, int) and 1 <= n < m):
                raise ValueError(f"N:M pattern {n}:{m} is invalid: need 1 <= n < m, e.g. 2:4")
            if self.columns % m:
                raise ValueError(
                    f"N:M pattern {n}:{m}: m={m} does not divide the input dimension {self.columns} of this layer; "
                    "choose an m that divides it, or skip the layer"
                )
        if self.stats is None or self.stats.gram is None:
            raise RuntimeError("this solver was freed; create a new one")
        if self.stats.count == 0:
            raise RuntimeError("no calibration data: call add_batch(x) with the layer's inputs before solve()")

        # Hundreds of small ops per layer: on one intra-op thread they run several times faster than with OpenMP
        # hand-offs between threads (measured 4 s vs 15 s for a 576x1536 layer on a busy 2-core machine).
        with _single_thread():
            keep = self._solve(sparsity, n, m, mask)
        return keep

    def _solve(self, sparsity: float | None, n: int, m: int, mask: torch.Tensor | None) -> torch.Tensor:
        assert self.stats is not None and self.stats.gram is not None  # checked by solve()
        param, _ = linear_weight(self.layer)
        # Work on the transposed weight WT (in, out) in float32, so that "column i" of W is a contiguous row of WT.
        WT = (param.detach() if self.transposed else param.detach().T).to(torch.float32).clone(
            memory_format=torch.contiguous_format)  # (in, out)
        prune_given = None
        if mask is not None:
            if mask.shape != param.shape or mask.dtype != torch.bool:
                raise ValueError(
                    f"mask must be bool of shape {tuple(param.shape)}, got {mask.dtype} {tuple(mask.shape)}"
                )
            prune_given = ~(mask if self.transposed else mask.T)  # (in, out), True = pruned
        H = self.stats.gram * (2.0 / self.stats.count)  # (in, in) float64
        dead = torch.diag(H) == 0
        H[dead, dead] = 1.0
        WT[dead, :] = 0.0
        if self.damp:
            H += torch.eye(self.columns, dtype=H.dtype) * (self.damp * torch.diag(H).mean())
        L, info = torch.linalg.cholesky_ex(H)
        if int(info):
            raise RuntimeError(
                "the Hessian XᵀX is not positive definite even after dampening; raise damp (e.g. 0.1) or add more "
                "calibration data"
            )
        Hinv = torch.cholesky_inverse(L)
        # (in, in): row q of the upper Cholesky factor of H⁻¹ = the inverse Hessian of the columns not yet processed
        U = torch.linalg.cholesky(Hinv, upper=True).to(torch.float32)

        cols, rows = WT.shape
        losses = torch.zeros(rows, dtype=torch.float64)
        pruned = torch.zeros(cols, rows, dtype=torch.bool)  # (in, out)
        for i1 in range(0, cols, self.blocksize):
            i2 = min(i1 + self.blocksize, cols)
            W1 = WT[i1:i2].clone()  # (b, out)
            Err1 = torch.zeros_like(W1)  # (b, out)
            U1 = U[i1:i2, i1:i2]  # (b, b)
            d1 = torch.diag(U1)  # (b,)
            if prune_given is not None:
                mask1 = prune_given[i1:i2].clone()  # (b, out)
            elif sparsity is not None:
                saliency = W1.square() / d1.square()[:, None]  # (b, out)
                k = math.floor(sparsity * saliency.numel() + 0.5)
                mask1 = torch.zeros(W1.shape, dtype=torch.bool)
                if k:
                    order = torch.sort(saliency.reshape(-1), stable=True).indices[:k]
                    mask1.view(-1)[order] = True
            else:
                mask1 = torch.zeros(W1.shape, dtype=torch.bool)
            inv_d = 1.0 / d1  # (b,)
            scale = mask1.to(W1.dtype) * inv_d[:, None]  # (b, out): err_i = w_i · [pruned] / U_ii
            for i in range(i2 - i1):
                if m and (i1 + i) % m == 0:  # choose the n pruned weights of this group with the updated weights
                    group = W1[i:i + m].square() / d1[i:i + m].square()[:, None]  # (m, out)
                    mask1.scatter_(0, i + torch.sort(group, dim=0, stable=True).indices[:n], True)
                    scale[i:i + m] = mask1[i:i + m].to(W1.dtype) * inv_d[i:i + m, None]
                err = torch.mul(W1[i], scale[i], out=Err1[i])  # (out,); kept weights have no error
                W1[i:].addr_(U1[i, i:], err, alpha=-1.0)  # OBS update of the rest of the block
            W1[mask1] = 0.0
            losses += Err1.double().square().sum(0) / 2.0
            WT[i1:i2] = W1
            pruned[i1:i2] = mask1
            WT[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1.0)  # lazy batch update of all later columns
        WT[pruned] = 0.0
        param.data.copy_((WT if self.transposed else WT.T).to(param.dtype))
        self.error = losses
        keep = ~pruned
        return (keep if self.transposed else keep.T).contiguous()

    def free(self) -> None:
        """Drop the accumulated statistics (the ``in x in`` Hessian)."""
        if self.stats is not None:
            self.stats.free()
        self.stats = None
