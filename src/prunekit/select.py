"""Selection: scores + a sparsity target -> :class:`~prunekit.masks.Mask`.

Every function here is exact: within each scope (one tensor for ``uniform``/``erk``, all tensors together for
``global``/``lamp``) the number of pruned elements is ``round(sparsity * numel)``. Ties are broken deterministically:
among equal scores the element with the lowest flat index (tensors taken in mapping order) is pruned first.

Masks only lose elements: entries already pruned in ``current`` stay pruned (they are scored ``-inf``), and a target
below the current sparsity keeps the current mask, unless ``regrow=True``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch

from prunekit._fast import count_true
from prunekit.masks import Mask
from prunekit.targets import check_sparsity

__all__ = [
    "ALLOCATIONS", "erk", "erk_sparsities", "global_threshold", "lamp", "lamp_scores", "n_m", "per_row", "select", "uniform",
]


def _count(sparsity: float, numel: int) -> int:
    """Number of elements to prune for ``sparsity`` of ``numel`` (round half up)."""
    return min(numel, int(math.floor(sparsity * numel + 0.5)))


_SAMPLE = 1 << 16  # sample size used to bracket the threshold before the exact count


def _flat_numpy(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """A flat float32 NumPy view (zero-copy for contiguous float32 CPU tensors)."""
    if isinstance(t, np.ndarray):
        return t.reshape(-1)
    return t.detach().reshape(-1).to("cpu", torch.float32).numpy()


def _kth_smallest(scores: list[torch.Tensor] | list[np.ndarray], k: int) -> tuple[float, int]:
    """The ``k``-th smallest value (1-based) over all flat ``scores`` and the count of values strictly below it.

    Exact, without sorting or concatenating everything: a fixed-seed sample brackets the answer, one counting pass
    over all values checks the bracket and collects the values inside it, and a partial sort (``np.partition``) runs
    on that small set only. If the bracket misses (probability far below 1e-6) the whole set is partitioned. The
    passes run in NumPy: single-threaded vectorised comparisons are several times faster here than torch's, and they
    don't stall when another process holds a core. This is what makes a global threshold over tens of millions of
    weights a fraction of a second on a CPU.
    """
    arrays = [_flat_numpy(s) for s in scores]
    total = sum(a.size for a in arrays)

    def exact(values: np.ndarray, kk: int) -> float:
        return float(np.partition(values, kk - 1)[kk - 1])

    if total <= 4 * _SAMPLE:
        flat = np.concatenate(arrays)
        value = exact(flat, k)
        return value, int(np.count_nonzero(flat < value))
    rng = np.random.default_rng(0)
    rate = _SAMPLE / total
    sample = np.sort(np.concatenate([a[rng.integers(0, a.size, max(1, round(a.size * rate)))] for a in arrays]))
    m = sample.size
    q = k / total
    margin = int(6.0 * math.sqrt(m * q * (1.0 - q))) + 32
    lo_rank, hi_rank = int(q * m) - margin, int(q * m) + margin
    lo = float(sample[lo_rank]) if lo_rank >= 0 else -math.inf
    hi = float(sample[hi_rank]) if hi_rank < m else math.inf
    n_lo = 0
    inside = []
    for a in arrays:
        # -inf marks entries pruned earlier (monotone masks): late in a gradual schedule they are most of the values
        # and the bracket's lower end is -inf; counting them apart keeps them out of the partial sort
        below = a < lo if lo > -math.inf else np.isneginf(a)
        n_lo += int(np.count_nonzero(below))
        inside.append(a[(a <= hi) & ~below])
    candidates = np.concatenate(inside)
    if lo == -math.inf and k <= n_lo:  # the k-th smallest is -inf itself
        return -math.inf, 0
    if not n_lo < k <= n_lo + candidates.size:  # bracket missed: exact fallback
        flat = np.concatenate(arrays)
        value = exact(flat, k)
        return value, int(np.count_nonzero(flat < value))
    value = exact(candidates, k - n_lo)
    return value, n_lo + int(np.count_nonzero(candidates < value))


def _select_lowest(scores: list[torch.Tensor], n_prune: int) -> list[torch.Tensor]:
    """Bool keep-masks (flat) that prune exactly the ``n_prune`` lowest of all ``scores`` (flat float32 tensors).

    Ties at the threshold are pruned in order of their position (tensor order, then flat index).
    """
    total = sum(s.numel() for s in scores)
    if n_prune <= 0:
        return [torch.ones(s.numel(), dtype=torch.bool, device=s.device) for s in scores]
    if n_prune >= total:
        return [torch.zeros(s.numel(), dtype=torch.bool, device=s.device) for s in scores]
    arrays = [_flat_numpy(s) for s in scores]
    threshold, n_below = _kth_smallest(arrays, n_prune)
    ties_to_prune = n_prune - n_below  # >= 1: the threshold itself is the n_prune-th smallest
    keeps = []
    for a, s in zip(arrays, scores):
        if ties_to_prune == 0:
            keep = a >= threshold
        else:
            keep = a > threshold
            tie = a == threshold
            n_tied = int(np.count_nonzero(tie))
            if n_tied > ties_to_prune:  # this tensor holds the boundary: keep its ties after the first ties_to_prune
                keep[np.flatnonzero(tie)[ties_to_prune:]] = True
                ties_to_prune = 0
            else:  # every tie here is pruned
                ties_to_prune -= n_tied
        keeps.append(torch.from_numpy(keep).to(s.device))
    return keeps


def _prepare(
    scores: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor] | None, regrow: bool
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Float scores with already-pruned entries at -inf, and the number already pruned per tensor."""
    if not scores:
        raise ValueError("no scores given: there is nothing to select from")
    prepared: dict[str, torch.Tensor] = {}
    already: dict[str, int] = {}
    for name, s in scores.items():
        s = s.detach().float()
        cur = None if current is None else current.get(name)
        if cur is not None:
            if cur.shape != s.shape:
                raise ValueError(f"current mask for {name!r} has shape {tuple(cur.shape)}, scores {tuple(s.shape)}")
            already[name] = cur.numel() - count_true(cur)
            if not regrow and already[name]:
                s = s.masked_fill(~cur, -math.inf)
        else:
            already[name] = 0
        prepared[name] = s
    return prepared, already


def uniform(
    scores: Mapping[str, torch.Tensor],
    sparsity: float | Mapping[str, float],
    *,
    current: Mapping[str, torch.Tensor] | None = None,
    regrow: bool = False,
) -> Mask:
    """Prune each tensor separately to its own sparsity (the same for all, or one per tensor).

    Args:
        scores: ``{name: scores}``; higher scores are kept.
        sparsity: One sparsity for every tensor, or ``{name: sparsity}`` covering every tensor.
        current: The current mask; its pruned entries stay pruned unless ``regrow``.
        regrow: Allow entries pruned in ``current`` to come back.

    Returns:
        The new mask.

    Examples:
        >>> m = uniform({"a": torch.tensor([4.0, 1.0, 3.0, 2.0])}, 0.5)
        >>> m["a"].tolist()
        [True, False, True, False]
    """
    prepared, already = _prepare(scores, current, regrow)
    if isinstance(sparsity, Mapping):
        missing = [n for n in prepared if n not in sparsity]
        if missing:
            raise ValueError(f"per-tensor sparsity is missing for {missing}")
        per = {n: check_sparsity(sparsity[n], f"sparsity of {n!r}") for n in prepared}
    else:
        s = check_sparsity(sparsity)
        per = {n: s for n in prepared}
    out = Mask()
    for name, s in prepared.items():
        n_prune = _count(per[name], s.numel())
        if not regrow:
            n_prune = max(n_prune, already[name])
        out[name] = _select_lowest([s.reshape(-1)], n_prune)[0].view(s.shape)
    return out


def global_threshold(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    *,
    current: Mapping[str, torch.Tensor] | None = None,
    regrow: bool = False,
) -> Mask:
    """Prune the lowest scores across all tensors together (one global threshold, exact count).

    Scores must be comparable across tensors (true for magnitude when layers have similar scales; see :func:`lamp`
    for a scale-free alternative).

    Examples:
        >>> m = global_threshold({"a": torch.tensor([1.0, 5.0]), "b": torch.tensor([2.0, 3.0, 4.0, 6.0])}, 0.5)
        >>> m["a"].tolist(), m["b"].tolist()
        ([False, True], [False, False, True, True])
    """
    s = check_sparsity(sparsity)
    prepared, already = _prepare(scores, current, regrow)
    n_prune = _count(s, sum(t.numel() for t in prepared.values()))
    if not regrow:
        n_prune = max(n_prune, sum(already.values()))
    keeps = _select_lowest([t.reshape(-1) for t in prepared.values()], n_prune)
    return Mask({name: keep.view(t.shape) for (name, t), keep in zip(prepared.items(), keeps)})


def _erk_kept(shapes: Mapping[str, torch.Size | tuple[int, ...]], sparsity: float) -> dict[str, int]:
    """Kept-element count per tensor under ERK (see :func:`erk_sparsities`); sums exactly to the target."""
    s = check_sparsity(sparsity)
    sizes = {n: math.prod(shape) for n, shape in shapes.items()}
    raw = {n: sum(shape) / sizes[n] for n, shape in shapes.items()}
    total = sum(sizes.values())
    kept_target = total - _count(s, total)
    dense: set[str] = set()
    while True:
        free = [n for n in sizes if n not in dense]
        budget = kept_target - sum(sizes[n] for n in dense)
        denom = sum(raw[n] * sizes[n] for n in free)
        eps = budget / denom if denom else 0.0
        over = [n for n in free if eps * raw[n] > 1.0]
        if not over:
            break
        dense.update(over)
    kept_real = {n: float(sizes[n]) if n in dense else eps * raw[n] * sizes[n] for n in sizes}
    kept = {n: min(sizes[n], int(math.floor(k))) for n, k in kept_real.items()}
    short = kept_target - sum(kept.values())
    # hand the remaining kept elements to the largest fractional parts (ties by order), respecting capacity
    position = {n: i for i, n in enumerate(sizes)}
    for n in sorted(sizes, key=lambda n: (-(kept_real[n] - math.floor(kept_real[n])), position[n])):
        if short <= 0:
            break
        if kept[n] < sizes[n]:
            kept[n] += 1
            short -= 1
    return kept


def erk_sparsities(shapes: Mapping[str, torch.Size | tuple[int, ...]], sparsity: float) -> dict[str, float]:
    """Per-tensor sparsities of the Erdős–Rényi-Kernel allocation (Evci et al. 2020, "Rigging the Lottery").

    Each tensor's density is proportional to ``sum(shape) / prod(shape)`` (small or thin layers stay denser); the
    common factor is solved so the total density is ``1 - sparsity``, and tensors whose density would exceed 1 are kept
    dense while the rest are re-solved. Kept counts are apportioned with the largest-remainder rule so that the total
    number of pruned elements is exactly ``round(sparsity * total)``.

    Examples:
        >>> sp = erk_sparsities({"big": (100, 100), "small": (10, 100)}, 0.5)
        >>> round(sp["big"], 3), round(sp["small"], 3)
        (0.55, 0.0)
    """
    kept = _erk_kept(shapes, sparsity)
    return {n: 1.0 - kept[n] / math.prod(shapes[n]) for n in kept}


def erk(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    *,
    current: Mapping[str, torch.Tensor] | None = None,
    regrow: bool = False,
) -> Mask:
    """Erdős–Rényi-Kernel allocation (:func:`erk_sparsities`), then the lowest scores within each tensor."""
    kept = _erk_kept({n: tuple(t.shape) for n, t in scores.items()}, sparsity)
    prepared, already = _prepare(scores, current, regrow)
    out = Mask()
    for name, s in prepared.items():
        n_prune = s.numel() - kept[name]
        if not regrow:
            n_prune = max(n_prune, already[name])
        out[name] = _select_lowest([s.reshape(-1)], n_prune)[0].view(s.shape)
    return out


def lamp_scores(scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Layer-adaptive magnitude scores (Lee et al. 2021, "Layer-adaptive Sparsity for the Magnitude-based Pruning").

    For a tensor with squared scores sorted ascending, ``s_1 <= s_2 <= ... <= s_n``, the LAMP score of entry ``u`` is
    ``s_u / sum_{v >= u} s_v``. The largest entry of every tensor scores 1, so a global threshold on LAMP scores never
    empties a layer. Ties are ordered by index (stable sort), so equal weights get distinct, deterministic scores.

    Examples:
        >>> lamp_scores({"w": torch.tensor([1.0, 2.0, 2.0])})["w"].tolist()
        [0.1111111119389534, 0.5, 1.0]
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in scores.items():
        sq = t.detach().reshape(-1).double() ** 2
        sorted_sq, order = torch.sort(sq, stable=True)
        suffix = torch.flip(torch.cumsum(torch.flip(sorted_sq, [0]), 0), [0])
        ratio = torch.where(suffix > 0, sorted_sq / suffix.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
        lamp = torch.empty_like(ratio)
        lamp[order] = ratio
        out[name] = lamp.float().view(t.shape)
    return out


def lamp(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    *,
    current: Mapping[str, torch.Tensor] | None = None,
    regrow: bool = False,
) -> Mask:
    """LAMP allocation: a global threshold on :func:`lamp_scores` (scale-free across layers)."""
    return global_threshold(lamp_scores(scores), sparsity, current=current, regrow=regrow)


def _prune_lowest_per_slice(s: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask for a 2-D float tensor that prunes the ``k`` lowest entries of every row (ties: lowest index first)."""
    keep = torch.ones_like(s, dtype=torch.bool)  # (R, C)
    if k > 0:
        order = torch.sort(s, dim=1, stable=True).indices[:, :k]  # (R, k): ascending, equal scores by position
        keep.scatter_(1, order, False)
    return keep


def per_row(
    scores: Mapping[str, torch.Tensor],
    sparsity: float | Mapping[str, float],
    *,
    current: Mapping[str, torch.Tensor] | None = None,
    regrow: bool = False,
) -> Mask:
    """Prune the same fraction of every row: the lowest ``round(sparsity * row_length)`` scores of each row.

    A row is everything that feeds one output unit: ``scores[i]`` flattened (for an ``nn.Linear`` weight of shape
    ``(out, in)``, one output neuron's incoming weights). This is how Wanda (Sun et al. 2023, "A Simple and Effective
    Pruning Approach for Large Language Models") compares its scores, and it keeps every output neuron alive.
    1-D tensors are one row. Entries pruned in ``current`` stay pruned unless ``regrow``; a row that already has more
    zeros than the target keeps them.

    Args:
        scores: ``{name: scores}``; higher scores are kept.
        sparsity: One sparsity for every tensor, or ``{name: sparsity}`` covering every tensor.
        current: The current mask.
        regrow: Allow entries pruned in ``current`` to come back.

    Returns:
        The new mask.

    Examples:
        >>> m = per_row({"w": torch.tensor([[4.0, 1.0, 3.0, 2.0], [1.0, 1.0, 1.0, 9.0]])}, 0.5)
        >>> m["w"].int().tolist()
        [[1, 0, 1, 0], [0, 0, 1, 1]]
    """
    prepared, _ = _prepare(scores, current, regrow)
    if isinstance(sparsity, Mapping):
        missing = [n for n in prepared if n not in sparsity]
        if missing:
            raise ValueError(f"per-tensor sparsity is missing for {missing}")
        per = {n: check_sparsity(sparsity[n], f"sparsity of {n!r}") for n in prepared}
    else:
        s = check_sparsity(sparsity)
        per = {n: s for n in prepared}
    out = Mask()
    for name, s in prepared.items():
        rows = s.reshape(s.shape[0], -1) if s.dim() > 1 else s.reshape(1, -1)  # (R, C)
        keep = _prune_lowest_per_slice(rows, _count(per[name], rows.shape[1]))
        if not regrow and current is not None and name in current:
            keep &= current[name].reshape(keep.shape)
        out[name] = keep.view(s.shape)
    return out


def n_m(
    scores: Mapping[str, torch.Tensor],
    n: int,
    m: int,
    *,
    current: Mapping[str, torch.Tensor] | None = None,
    regrow: bool = False,
) -> Mask:
    """N:M semi-structured selection: in every group of ``m`` consecutive entries along the last dimension, prune the
    ``n`` lowest scores (for an ``nn.Linear`` weight ``(out, in)``, groups run along the input dimension).

    ``n:m`` counts pruned entries, as SparseGPT and Wanda do: 2:4 and 4:8 keep half of every group, which is the
    layout sparse tensor cores accelerate (NVIDIA's "2:4" counts non-zeros; for 2:4 and 4:8 the two agree).
    Entries pruned in ``current`` stay pruned unless ``regrow`` (a group may then hold more than ``n`` zeros).

    Args:
        scores: ``{name: scores}``; higher scores are kept.
        n: Entries pruned per group, ``1 <= n < m``.
        m: Group size; must divide the last dimension of every tensor.
        current: The current mask.
        regrow: Allow entries pruned in ``current`` to come back.

    Returns:
        The new mask.

    Raises:
        ValueError: ``n``/``m`` out of range, or ``m`` does not divide a tensor's last dimension.

    Examples:
        >>> m = n_m({"w": torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.1, 0.3, 0.2]])}, 2, 4)
        >>> m["w"].int().tolist()
        [[1, 0, 1, 0, 1, 0, 1, 0]]
    """
    for value, what in ((n, "n"), (m, "m")):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"N:M pattern: {what} must be an int, got {value!r} ({type(value).__name__})")
    if not 1 <= n < m:
        raise ValueError(
            f"N:M pattern {n}:{m} is invalid: need 1 <= n < m (n of every m consecutive weights are pruned), "
            "e.g. 2:4 or 4:8"
        )
    bad = [f"{name} {tuple(s.shape)}" for name, s in scores.items() if s.dim() == 0 or s.shape[-1] % m]
    if bad:
        raise ValueError(
            f"N:M pattern {n}:{m}: m={m} does not divide the last (input) dimension of {', '.join(bad)}. "
            f"Choose an m that divides it (e.g. 2:4 needs a multiple of 4), or leave these tensors out (skip=...)."
        )
    prepared, _ = _prepare(scores, current, regrow)
    out = Mask()
    for name, s in prepared.items():
        groups = s.reshape(-1, m)  # (G, m): consecutive along the last dimension
        keep = _prune_lowest_per_slice(groups, n)
        if not regrow and current is not None and name in current:
            keep &= current[name].reshape(keep.shape)
        out[name] = keep.view(s.shape)
    return out


#: Allocation rules by name: how a sparsity target is spread over the pruned tensors.
ALLOCATIONS: dict[str, Callable[..., Mask]] = {
    "global": global_threshold,
    "uniform": uniform,
    "erk": erk,
    "lamp": lamp,
    "per_row": per_row,
}


def select(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    allocation: str = "global",
    *,
    overrides: Mapping[str, float] | None = None,
    current: Mapping[str, torch.Tensor] | None = None,
    regrow: bool = False,
) -> Mask:
    """Turn scores into a mask with the named allocation rule; ``overrides`` pin some tensors to their own sparsity.

    Args:
        scores: ``{name: scores}``, higher = more important.
        sparsity: Target sparsity for the tensors that have no override.
        allocation: One of :data:`ALLOCATIONS` (``"global"``, ``"uniform"``, ``"erk"``, ``"lamp"``).
        overrides: ``{name: sparsity}`` for tensors pruned on their own (exact names, see
            :func:`prunekit.targets.match_overrides` to resolve globs).
        current: Current mask (entries pruned there stay pruned unless ``regrow``).
        regrow: Allow previously pruned entries to come back.

    Returns:
        A :class:`Mask` over every tensor in ``scores``.

    Examples:
        >>> m = select({"a": torch.arange(10.0), "b": torch.arange(10.0)}, 0.5, "global", overrides={"b": 0.2})
        >>> int((~m["a"]).sum()), int((~m["b"]).sum())
        (5, 2)
    """
    try:
        rule = ALLOCATIONS[allocation]
    except KeyError:
        raise ValueError(f"unknown allocation {allocation!r}; choose one of {sorted(ALLOCATIONS)}") from None
    overrides = dict(overrides or {})
    unknown = [n for n in overrides if n not in scores]
    if unknown:
        raise ValueError(f"overrides name tensors that are not scored: {unknown}")
    rest = {n: s for n, s in scores.items() if n not in overrides}
    pinned = {n: s for n, s in scores.items() if n in overrides}
    out = Mask()
    if rest:
        out.update(rule(rest, sparsity, current=current, regrow=regrow))
    if pinned:
        out.update(uniform(pinned, overrides, current=current, regrow=regrow))
    return Mask({n: out[n] for n in scores})  # keep the caller's order
