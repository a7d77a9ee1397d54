"""Modules that structured pruning puts in place of torch modules that cannot take the pruned shapes.

``torch.nn.MultiheadAttention`` requires its query/key/value width to equal ``embed_dim`` (its forward splits the
packed projection by the input width), so removing heads, or embedding channels, from it cannot be expressed by
smaller tensors alone. :class:`MultiheadAttention` is a drop-in subclass whose attention width
``num_heads * head_dim`` is independent of ``embed_dim``; parameter names (``in_proj_weight``, ``out_proj.weight``,
...) and therefore ``state_dict`` keys are unchanged. Replacements are registered by name in :data:`REPLACEMENTS`,
so a plan names them as plain data.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["REPLACEMENTS", "MultiheadAttention"]


class MultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose attention width (``num_heads * head_dim``) may differ from ``embed_dim``.

    Built from an existing module with :meth:`from_module` (parameters are shared, not copied). The forward takes
    the same arguments and returns the same values as ``nn.MultiheadAttention.forward``. ``kept_heads`` lists which
    of the original heads remain, so that a per-head 3-D ``attn_mask`` of the original shape
    ``(batch * original_heads, L, S)`` is still accepted.

    Examples:
        >>> attention = nn.MultiheadAttention(16, 4, batch_first=True)
        >>> x = torch.randn(2, 5, 16)
        >>> same = MultiheadAttention.from_module(attention)
        >>> torch.allclose(same(x, x, x)[0], attention(x, x, x)[0], atol=1e-6)
        True
    """

    kept_heads: tuple[int, ...] | None

    @classmethod
    def from_module(cls, module: nn.MultiheadAttention) -> MultiheadAttention:
        """A :class:`MultiheadAttention` sharing ``module``'s parameters, buffers, submodules and settings."""
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"expected an nn.MultiheadAttention, got {type(module).__name__}")
        new = cls.__new__(cls)
        new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()})
        new._packed = module.in_proj_weight is not None
        # False keeps torch's fused fast paths (TransformerEncoderLayer) from reading the pruned weights
        new._qkv_same_embed_dim = False
        new.kept_heads = getattr(module, "kept_heads", None)
        return new

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if is_causal and attn_mask is None:
            raise RuntimeError("need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, length, _ = query.shape
        h, d = self.num_heads, self.head_dim
        inner = h * d
        if self._packed:
            wq, wk, wv = self.in_proj_weight.split(inner)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        bq = bk = bv = None
        if self.in_proj_bias is not None:
            bq, bk, bv = self.in_proj_bias.split(inner)
        q = F.linear(query, wq, bq)  # (N, L, h*d)
        k = F.linear(key, wk, bk)  # (N, S, h*d)
        v = F.linear(value, wv, bv)
        pad_columns = 0
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.reshape(1, 1, inner).expand(n, 1, inner)], dim=1)
            v = torch.cat([v, self.bias_v.reshape(1, 1, inner).expand(n, 1, inner)], dim=1)
            pad_columns += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(n, 1, inner)], dim=1)
            v = torch.cat([v, v.new_zeros(n, 1, inner)], dim=1)
            pad_columns += 1
        q = q.view(n, length, h, d).transpose(1, 2)  # (N, h, L, d)
        k = k.view(n, -1, h, d).transpose(1, 2)  # (N, h, S, d)
        v = v.view(n, -1, h, d).transpose(1, 2)
        mask = self._mask(attn_mask, key_padding_mask, n, length, k.shape[2], pad_columns, q.dtype)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * d**-0.5) @ k.transpose(-2, -1)  # (N, h, L, S)
            if mask is not None:
                scores = scores + mask
            attn = F.dropout(torch.softmax(scores, dim=-1), p=dropout)
            out = attn @ v
            weights = attn.mean(dim=1) if average_attn_weights else attn
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = out.transpose(1, 2).reshape(n, length, inner)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)  # (N, L, E)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _mask(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, n: int, length: int,
              s: int, pad_columns: int, dtype: torch.dtype) -> torch.Tensor | None:
        """One additive float mask broadcastable to (N, h, L, S), or None."""
        mask = None
        if attn_mask is not None:
            m = _additive(attn_mask, dtype)
            if m.dim() == 3:  # (N * original heads, L, S)
                m = m.view(n, -1, m.shape[-2], m.shape[-1])
                if self.kept_heads is not None and m.shape[1] != self.num_heads:
                    m = m[:, list(self.kept_heads)]
            mask = m
        if key_padding_mask is not None:
            kp = _additive(key_padding_mask, dtype).view(n, 1, 1, -1)
            mask = kp if mask is None else mask + kp
        if mask is not None and pad_columns and mask.shape[-1] != s:
            mask = F.pad(mask, (0, pad_columns))
        return mask


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


#: Replacement modules by the name a plan records: ``name -> fn(old_module) -> new_module``.
REPLACEMENTS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "prunekit.MultiheadAttention": MultiheadAttention.from_module,
    # a dropped residual block (prunekit.structured.drop_blocks): its parameters leave the model
    "torch.nn.Identity": lambda module: nn.Identity(),
}
