"""Importance criteria: pure functions from a tensor to a score of the same shape (higher = more important).

A criterion is any callable ``criterion(name, weight) -> scores``. It reads, never writes; the selection step
(:mod:`prunekit.select`) turns scores into masks. Built-in criteria are registered by name in :data:`CRITERIA`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from prunekit._fast import absolute, has_nan

__all__ = ["CRITERIA", "Criterion", "RandomScore", "get_criterion", "magnitude", "score_tensors"]

#: ``criterion(tensor_fqn, weight) -> scores`` with ``scores.shape == weight.shape``; higher scores are kept.
Criterion = Callable[[str, torch.Tensor], torch.Tensor]


def magnitude(name: str, weight: torch.Tensor) -> torch.Tensor:
    """Magnitude criterion |w| (Han et al. 2015, "Learning both Weights and Connections").

    Examples:
        >>> magnitude("w", torch.tensor([-3.0, 1.0, 2.0])).tolist()
        [3.0, 1.0, 2.0]
    """
    return absolute(weight.detach())


@dataclass(frozen=True)
class RandomScore:
    """Random scores, reproducible: the same ``seed`` and tensor name always give the same scores.

    A control criterion: pruning by random scores is the baseline every real criterion must beat.

    Args:
        seed: Base seed; each tensor's generator is seeded from ``seed`` and the tensor's name, so the scores do not
            depend on the order in which tensors are scored (and agree on every rank of a distributed job).

    Examples:
        >>> w = torch.zeros(3, 4)
        >>> torch.equal(RandomScore(0)("fc.weight", w), RandomScore(0)("fc.weight", w))
        True
    """

    seed: int = 0

    def __call__(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        digest = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        return torch.rand(weight.shape, generator=gen).to(weight.device)


#: Built-in criteria by name.
CRITERIA: dict[str, Criterion] = {"magnitude": magnitude, "random": RandomScore(0)}


def get_criterion(criterion: str | Criterion) -> Criterion:
    """Resolve a criterion given by name (see :data:`CRITERIA`) or as a callable."""
    if isinstance(criterion, str):
        try:
            return CRITERIA[criterion]
        except KeyError:
            raise ValueError(f"unknown criterion {criterion!r}; choose one of {sorted(CRITERIA)} or pass a callable "
                             "criterion(name, weight) -> scores") from None
    if callable(criterion):
        return criterion
    raise TypeError(f"criterion must be a name {sorted(CRITERIA)} or a callable, got {type(criterion).__name__}")


def score_tensors(criterion: Criterion, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply ``criterion`` to every tensor and validate the result.

    Raises:
        ValueError: If a weight or a score contains NaN, or a score has the wrong shape.
    """
    scores: dict[str, torch.Tensor] = {}
    for name, weight in tensors.items():
        w = weight.detach()
        s = criterion(name, w)
        if not isinstance(s, torch.Tensor) or s.shape != w.shape:
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"criterion returned {got} for {name!r}; expected a tensor of shape {tuple(w.shape)}")
        # one reduction proves the scores NaN-free (a NaN anywhere makes the sum NaN); look closer only if it is
        if has_nan(s):
            if has_nan(w):
                raise ValueError(
                    f"tensor {name!r} contains {int(torch.isnan(w).sum())} NaN values; pruning scores would be "
                    "meaningless. Check the training run that produced these weights (learning rate, loss scaling)."
                )
            raise ValueError(f"criterion returned NaN scores for {name!r}")
        scores[name] = s
    return scores
