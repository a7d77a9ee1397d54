"""Importance criteria that use calibration statistics: pure functions ``(weight, statistics) -> scores``."""

from __future__ import annotations

import torch

__all__ = ["wanda"]


def wanda(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """Wanda score ``|W_ij| · ‖X_j‖₂`` (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language
    Models", https://arxiv.org/abs/2306.11695).

    A weight matters as much as the signal it multiplies: ``‖X_j‖₂`` is the L2 norm of input channel ``j`` over all
    calibration tokens. Scores are meant to be compared within each output row (:func:`prunekit.select.per_row`) or
    each N:M group (:func:`prunekit.select.n_m`).

    Args:
        weight: ``(out, in)`` weight.
        input_norms: ``(in,)`` norms of the input channels.

    Returns:
        Scores of the weight's shape (float32).

    Examples:
        >>> wanda(torch.tensor([[1.0, -2.0, 3.0, 4.0]]), torch.tensor([100.0, 10.0, 1.0, 0.1])).tolist()
        [[100.0, 20.0, 3.0, 0.4000000059604645]]
    """
    if weight.dim() != 2 or input_norms.shape != weight.shape[1:]:
        raise ValueError(
            f"wanda needs a 2-D (out, in) weight and (in,) input norms; got weight {tuple(weight.shape)} and norms "
            f"{tuple(input_norms.shape)}"
        )
    return weight.detach().abs().float() * input_norms.float()[None, :]  # (out, in)
