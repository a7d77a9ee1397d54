"""SparseLinear: a Linear layer whose weight is stored in CSR form and multiplied by a sparse kernel (inference).

Two kernels compute ``y = x @ W.T + b`` (``W`` is ``out_features x in_features``, PyTorch's Linear layout):

- ``"native_csr"``: prunekit's compiled kernel (:mod:`prunekit.sparse._native`): fp32 values, 16-bit column indices
  (32-bit past 65,536 inputs), rows padded to multiples of 8; at batch 1 eight inputs are loaded per step and
  multiplied with one AVX FMA; above batch 1 the input is transposed into tiles of 8 or 16 rows so that each weight
  is read once per tile; OpenMP over rows (split by non-zero count) with torch's thread count. fp32 only.
- ``"torch_csr"``: torch's own CSR tensor and ``torch.addmm``; pure torch, any floating dtype torch supports.

The module is for inference only: its tensors are buffers, not parameters, and calling it on an input that requires
grad with grad mode on raises (convert back with :meth:`SparseLinear.to_linear` to train). Its ``state_dict`` holds
the plain dense ``weight`` and ``bias``, exactly like the ``nn.Linear`` it replaced, so a converted model saves and
loads like the original (loading re-encodes the weight).
"""

from __future__ import annotations

import contextlib
import ctypes
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from prunekit.sparse import _native

__all__ = ["KERNELS", "SparseLinear", "native_available"]

#: Sparse kernels SparseLinear can use, fastest first where they apply.
KERNELS: tuple[str, ...] = ("native_csr", "torch_csr")

#: The native kernel pads every row to a multiple of this many entries (no scalar tail in its inner loop).
NATIVE_ROW_MULTIPLE = 8

#: Multiply-adds below which the native kernel stays on one thread (waking a second one costs more).
MIN_WORK_PER_THREAD = 16384


def native_available() -> bool:
    """True if prunekit's compiled kernel is usable here (compiles it on first call; see ``build_info``).

    Examples:
        >>> isinstance(native_available(), bool)
        True
    """
    return _native.library() is not None


def check_kernel(kernel: object) -> str:
    """Validate a kernel name; returns it."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown sparse kernel {kernel!r}; choose one of {list(KERNELS)}")
    return str(kernel)


def _pad_rows(values: torch.Tensor, cols: torch.Tensor, crow: torch.Tensor,
              multiple: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR arrays with every row padded to a multiple of ``multiple`` entries (value 0, the row's last column)."""
    counts = crow.diff()  # (rows,)
    padded = (counts + multiple - 1) // multiple * multiple
    new_crow = torch.zeros_like(crow)
    torch.cumsum(padded, 0, out=new_crow[1:])
    rows = torch.arange(counts.numel())
    entry_row = torch.repeat_interleave(rows, counts)  # (nnz,)
    position = new_crow[entry_row] + torch.arange(values.numel()) - crow[entry_row]
    last_col = cols[(crow[1:] - 1).clamp(min=0)] if cols.numel() else torch.zeros_like(counts)
    new_cols = torch.repeat_interleave(last_col, padded)
    new_values = torch.zeros(int(new_crow[-1]), dtype=values.dtype)
    new_cols[position] = cols
    new_values[position] = values
    return new_values, new_cols, new_crow


def _encode_cols(cols: torch.Tensor, in_features: int) -> torch.Tensor:
    """Column indices as uint16 (stored in an int16 tensor) when they fit, else int32."""
    if in_features <= 1 << 16:
        return torch.where(cols >= 1 << 15, cols - (1 << 16), cols).to(torch.int16).contiguous()
    return cols.to(torch.int32).contiguous()


def _decode_cols(cols: torch.Tensor) -> torch.Tensor:
    if cols.dtype == torch.int64:
        return cols
    if cols.dtype == torch.int16:
        return cols.to(torch.int64) & 0xFFFF
    return cols.to(torch.int64)


class SparseLinear(nn.Module):
    """Inference-only replacement of ``nn.Linear`` for a weight with many zeros.

    Build it from a Linear with :meth:`from_linear` (or let :func:`prunekit.sparse.convert` choose the layers and
    kernels by measuring). It accepts inputs of any shape ``(*, in_features)``, as ``nn.Linear`` does, and works under
    :func:`torch.inference_mode` and :func:`torch.no_grad`.

    Args:
        weight: Dense weight ``(out_features, in_features)``; its zeros are dropped.
        bias: Optional bias ``(out_features,)``.
        kernel: ``"native_csr"`` (prunekit's compiled kernel, fp32) or ``"torch_csr"`` (torch's CSR tensors).

    Raises:
        ValueError: On an unknown kernel or mismatched shapes.
        TypeError: If ``"native_csr"`` is asked for a non-fp32 weight.
        RuntimeError: If ``"native_csr"`` is asked for but the native kernel could not be built.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> linear = nn.Linear(64, 32)
        >>> with torch.no_grad():
        ...     _ = linear.weight.mul_(torch.rand(32, 64) > 0.9)
        >>> sparse = SparseLinear.from_linear(linear, kernel="torch_csr")
        >>> x = torch.randn(5, 64)
        >>> with torch.inference_mode():
        ...     torch.allclose(sparse(x), linear(x), atol=1e-5)
        True
        >>> sparse.nnz == int((linear.weight != 0).sum())
        True
    """

    in_features: int
    out_features: int

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, kernel: str = "native_csr") -> None:
        super().__init__()
        self.kernel = check_kernel(kernel)
        self._native = self.kernel == "native_csr"
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D tensor (out_features, in_features), got {_describe(weight)}")
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self._encode(weight.detach(), None if bias is None else bias.detach())

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: str = "native_csr") -> SparseLinear:
        """A SparseLinear computing what ``linear`` computes (its zeros dropped)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        return cls(linear.weight, linear.bias, kernel=kernel)

    # --- encoding ------------------------------------------------------------------------------------------------
    def _encode(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight has shape {tuple(weight.shape)}, expected ({self.out_features}, {self.in_features})"
            )
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
        if weight.device.type != "cpu":
            raise ValueError(f"SparseLinear runs on the CPU; the weight is on {weight.device}. Move the model with "
                             "model.cpu() before converting.")
        with _quiet_csr():
            csr = weight.to_sparse_csr()  # drops the zeros
        self.nnz = int(csr.values().numel())
        values, cols, crow = csr.values(), csr.col_indices(), csr.crow_indices()
        if self.kernel == "native_csr":
            if weight.dtype != torch.float32:
                raise TypeError(f"the native_csr kernel needs a float32 weight, got {weight.dtype}; use "
                                "kernel='torch_csr' or convert the model to float32 first")
            if _native.library() is None:
                raise RuntimeError(f"the native sparse kernel is not available ({_native.build_info().error}); "
                                   "use kernel='torch_csr'")
            values, cols, crow = _pad_rows(values, cols, crow, NATIVE_ROW_MULTIPLE)
            cols = _encode_cols(cols, self.in_features)
        else:
            cols = cols.to(torch.int64).contiguous()
        # plain (strided) buffers, so that deepcopy, .to() and pickling work; torch_csr wraps them in a CSR tensor
        self.register_buffer("values", values.contiguous(), persistent=False)
        self.register_buffer("col_indices", cols, persistent=False)
        self.register_buffer("crow_indices", crow.to(torch.int64).contiguous(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.clone().contiguous(), persistent=False)
        self._csr: tuple[torch.Tensor, torch.Tensor] | None = None  # (values it wraps, CSR tensor), built lazily
        self._handle: tuple[Any, ...] | None = None  # native kernel arguments, built lazily

    # --- forward -------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                "SparseLinear is for inference and computes no gradients, but its input requires grad. Run the "
                "model under torch.inference_mode() or torch.no_grad(), or train the dense model (SparseLinear."
                "to_linear(), or prunekit.sparse.to_dense(model)) and convert again afterwards."
            )
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"input of shape {tuple(x.shape)} does not end in in_features={self.in_features}")
        if x.dim() == 2:
            return self._forward_native(x) if self._native else self._forward_torch(x)
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        y = self._forward_native(x2) if self._native else self._forward_torch(x2)  # (N, out)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _forward_native(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, in)
        handle = self._handle
        if handle is None or handle[0] is not self.values or handle[1] is not self.bias:
            handle = self._make_handle()
        if x.dtype != torch.float32 or not x.is_cpu:
            raise TypeError(
                f"the native_csr kernel computes in float32 on the CPU; got input {x.dtype} on {x.device}. "
                "Feed float32 CPU inputs, or convert with kernels=('torch_csr',)"
            )
        if not x.is_contiguous():
            x = x.contiguous()
        n = x.shape[0]
        y = torch.empty(n, self.out_features, dtype=torch.float32)
        if n and handle[2](handle[3], x.data_ptr(), n, y.data_ptr(), torch.get_num_threads(), MIN_WORK_PER_THREAD):
            raise MemoryError(f"native sparse kernel could not allocate its input tile ({n} x {self.in_features})")
        return y

    def _make_handle(self) -> tuple[Any, ...]:
        """(values, bias, C function, address of a struct pointing into the buffers), rebuilt if buffers change."""
        lib = _native.library()
        if lib is None:  # cannot happen after a successful encode in this process, but a pickle may travel
            raise RuntimeError("the native sparse kernel is not available; convert with kernels=('torch_csr',)")
        if self.values.dtype != torch.float32 or self.values.device.type != "cpu":
            raise TypeError(f"the native_csr kernel needs float32 CPU weights, got {self.values.dtype} on "
                            f"{self.values.device}; do not call .half()/.double()/.to(device) on a converted model")
        for t in (self.values, self.col_indices, self.crow_indices, self.bias):
            if t is not None and not t.is_contiguous():
                raise ValueError("SparseLinear buffers must be contiguous")
        struct = _native.CsrWeight(
            self.values.data_ptr(), self.col_indices.data_ptr(), self.crow_indices.data_ptr(),
            None if self.bias is None else self.bias.data_ptr(), self.out_features, self.in_features,
            self.col_indices.element_size(),
        )
        self._handle = (self.values, self.bias, lib.csr_linear, ctypes.addressof(struct), struct)
        return self._handle

    def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, in)
        # torch.addmm, not F.linear: F.linear with a CSR weight fails under inference_mode (torch 2.14)
        xt = x.t()  # (in, N)
        weight = self._torch_csr()
        if self.bias is None:
            return torch.mm(weight, xt).t()
        return torch.addmm(self.bias.unsqueeze(1), weight, xt).t()

    def _torch_csr(self) -> torch.Tensor:
        """The weight as a torch sparse CSR tensor sharing the buffers' memory (rebuilt if they were replaced)."""
        cached = self._csr
        if cached is None or cached[0] is not self.values:
            with _quiet_csr():
                csr = torch.sparse_csr_tensor(self.crow_indices, _decode_cols(self.col_indices), self.values,
                                              (self.out_features, self.in_features), check_invariants=False)
            cached = self._csr = (self.values, csr)
        return cached[1]

    # --- dense views ---------------------------------------------------------------------------------------------
    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense ``(out_features, in_features)`` tensor (a new tensor; zeros where pruned)."""
        with torch.inference_mode():  # the buffers may be inference tensors (module built under inference_mode)
            counts = self.crow_indices.diff()
            rows = torch.repeat_interleave(torch.arange(self.out_features), counts)  # (stored entries,)
            keep = self.values != 0  # drops the native kernel's padding (stored values are otherwise non-zero)
            dense = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype)
            dense[rows[keep], _decode_cols(self.col_indices)[keep]] = self.values[keep]
        return dense.clone()  # a normal tensor outside inference_mode

    @property
    def weight(self) -> torch.Tensor:
        """Dense copy of the weight, rebuilt at each access (for code that inspects ``layer.weight``)."""
        return self.dense_weight()

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the same weights (dense, trainable)."""
        w = self.dense_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    @property
    def sparsity(self) -> float:
        """Fraction of zero weights."""
        numel = self.out_features * self.in_features
        return 1.0 - self.nnz / numel if numel else 0.0

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nnz={self.nnz}, sparsity={self.sparsity:.3f}, kernel={self.kernel!r}")

    # --- state dict: the dense weight and bias, as nn.Linear ----------------------------------------------------------
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.dense_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        weight = state_dict.get(prefix + "weight")
        has_bias = self.bias is not None
        bias = state_dict.get(prefix + "bias") if has_bias else None
        if weight is None:
            missing_keys.append(prefix + "weight")
        if has_bias and bias is None:
            missing_keys.append(prefix + "bias")
        if not has_bias and prefix + "bias" in state_dict and strict:
            unexpected_keys.append(prefix + "bias")
        if weight is None or (has_bias and bias is None):
            return
        if tuple(weight.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {prefix}weight: checkpoint has {tuple(weight.shape)}, this "
                              f"SparseLinear has ({self.out_features}, {self.in_features})")
            return
        dtype = self.values.dtype
        self._encode(weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype))

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_csr"] = None  # torch cannot deepcopy or pickle sparse CSR tensors; rebuilt on first use
        state["_handle"] = None  # ctypes pointers into this instance's buffers
        return state


@contextlib.contextmanager
def _quiet_csr() -> Iterator[None]:
    """Silence torch's one-time "Sparse CSR tensor support is in beta" warning (prunekit tests what it uses)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        yield


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__}"
