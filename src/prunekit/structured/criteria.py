"""Group-aware importance criteria for structured pruning: pure functions from a group's tensors to unit scores.

A criterion is any callable ``criterion(group, tensors) -> scores`` where ``group`` is a
:class:`~prunekit.structured.dependency.Group`, ``tensors`` maps parameter names to tensors (the model's parameters;
buffers such as BatchNorm running statistics are not passed) and ``scores`` is a float tensor of shape
``(group.num_units,)``; higher scores are kept. Criteria read, never write.

Most criteria score each position of each member tensor and sum over the positions of a unit;
:func:`per_position` builds such a criterion from ``fn(name, tensor, dim) -> (tensor.shape[dim],) scores``.

A criterion object may also have a ``prepare(model, graph)`` method: :func:`~prunekit.structured.plan` calls it once
before scoring. :class:`BatchNormScale` uses it to find the BatchNorm layers; the data-driven criteria
(:class:`TaylorScore`, :class:`ActivationScore`) run their calibration batches there. They measure each unit where
it is read: at the inputs of its consumer modules (``group.consumers``: the next convolution or linear layer),
through the hooks of :mod:`prunekit.calibration`. Zeroing a unit at every consumer input has the same effect as
removing it, so these inputs are exactly the feature maps the unit contributes (after its BatchNorm, ReLU and
pooling).

Built-in criteria by name (:func:`get_criterion`): ``"l1"``, ``"l2"``, ``"random"``, ``"bn_scale"``, and, with
calibration data, ``"taylor"``, ``"activation"``, ``"apoz"``.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> from prunekit.structured import trace
    >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    >>> with torch.no_grad():
    ...     _ = model[0].weight.copy_(torch.tensor([[1.0, 1.0], [0.1, 0.1], [3.0, 0.0]]))
    ...     _ = model[0].bias.zero_(); _ = model[2].weight.fill_(0.0)
    >>> group = trace(model, torch.randn(1, 2)).groups[0]
    >>> l1_group(group, dict(model.named_parameters())).tolist()
    [2.0, 0.20000000298023224, 3.0]
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from prunekit.calibration import record_input_gradients, record_inputs
from prunekit.structured.dependency import DependencyGraph, Group, Member

__all__ = [
    "CRITERIA", "DATA_CRITERIA", "LOSSES", "ActivationScore", "BatchNormScale", "GroupCriterion", "RandomGroupScore",
    "TaylorScore", "get_criterion", "l1_group", "l2_group", "normalize", "per_position",
]

#: ``criterion(group, tensors) -> scores`` with ``scores.shape == (group.num_units,)``; higher scores are kept.
GroupCriterion = Callable[[Group, Mapping[str, torch.Tensor]], torch.Tensor]


def per_position(fn: Callable[[str, torch.Tensor, int], torch.Tensor]) -> GroupCriterion:
    """A group criterion summing ``fn(name, tensor, dim)`` (one score per position of ``dim``) over each unit's
    positions in every member tensor that is in ``tensors``."""

    def criterion(group: Group, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        scores = torch.zeros(group.num_units, dtype=torch.float64)
        for m in group.members:
            t = tensors.get(m.name)
            if t is None:
                continue
            s = fn(m.name, t.detach(), m.dim).to(torch.float64).cpu()
            live = m.unit >= 0
            scores.index_add_(0, m.unit[live], s[live])
        return scores.to(torch.float32)

    criterion.__name__ = getattr(fn, "__name__", "per_position")
    criterion.__doc__ = fn.__doc__
    return criterion


def _lp(p: int) -> Callable[[str, torch.Tensor, int], torch.Tensor]:
    def fn(name: str, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        other = [d for d in range(tensor.dim()) if d != dim]
        t = tensor.float().abs()
        if p == 2:
            t = t * t
        return t.sum(dim=other) if other else t

    return fn


l1_group = per_position(_lp(1))
l1_group.__name__ = "l1_group"
l1_group.__doc__ = """L1 norm of a unit's weights: sum of |w| over every slice of every parameter in the unit.

The filter-norm criterion of Li et al. 2017 ("Pruning Filters for Efficient ConvNets",
https://arxiv.org/abs/1608.08710), extended to the whole group: a conv filter's score also counts its BatchNorm
scale and the next layer's input weights that go with it."""

l2_group = per_position(_lp(2))
l2_group.__name__ = "l2_group"
l2_group.__doc__ = """Squared L2 norm of a unit's weights, sum of w^2 over every slice of every parameter in the unit
(same ranking as the L2 norm; as Torch-Pruning's default group magnitude criterion with p=2)."""


@dataclass(frozen=True)
class RandomGroupScore:
    """Random unit scores, reproducible: the same ``seed`` and group members always give the same scores.

    The control every real criterion must beat.
    """

    seed: int = 0

    def __call__(self, group: Group, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        key = f"{self.seed}:" + ",".join(f"{m.name}/{m.dim}" for m in group.members)
        digest = hashlib.sha256(key.encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        return torch.rand(group.num_units, generator=gen)


def normalize(scores: torch.Tensor) -> torch.Tensor:
    """Scores divided by their L2 norm over the finite entries (Molchanov et al. 2017's per-layer normalisation).

    Makes the scores of different groups comparable for a global ranking; ``-inf`` entries (units that must go) and
    an all-zero vector are left as they are.

    Examples:
        >>> normalize(torch.tensor([3.0, 4.0])).tolist()
        [0.6000000238418579, 0.800000011920929]
    """
    scores = scores.float()
    finite = torch.isfinite(scores)
    norm = scores[finite].norm()
    return torch.where(finite, scores / norm, scores) if float(norm) > 0 else scores


class BatchNormScale:
    """BatchNorm scale: ``|gamma|`` of the BatchNorm layers in the group, summed over them (network slimming).

    Liu et al. 2017, "Learning Efficient Convolutional Networks through Network Slimming",
    https://arxiv.org/abs/1708.06519: a channel whose BatchNorm scale ``gamma_c`` is small contributes
    ``gamma_c * x_hat + beta_c``, almost a constant, to the next layer::

        score(unit) = sum over the group's BatchNorm layers and the unit's channels of |gamma_c|

    A group holding no BatchNorm (a classifier's hidden units) is scored by ``fallback`` instead (default: the L1
    norm of its weights); :attr:`fallback_groups` lists those groups. :func:`~prunekit.structured.plan` calls
    :meth:`prepare` to find the BatchNorm layers.

    Examples:
        >>> from prunekit.structured import trace
        >>> model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 1, 1))
        >>> with torch.no_grad():
        ...     _ = model[1].weight.copy_(torch.tensor([0.5, -2.0, 0.1]))
        >>> graph = trace(model, torch.randn(1, 1, 4, 4))
        >>> score = BatchNormScale()
        >>> score.prepare(model, graph)
        >>> score(graph.groups[0], dict(model.named_parameters())).tolist()
        [0.5, 2.0, 0.10000000149011612]
    """

    def __init__(self, fallback: GroupCriterion | None = None) -> None:
        self.fallback = fallback if fallback is not None else l1_group
        self.names: set[str] | None = None
        self.fallback_groups: list[int] = []

    def prepare(self, model: nn.Module, graph: DependencyGraph | None = None) -> None:
        """Find the BatchNorm scales of ``model``."""
        self.names = {f"{n}.weight" if n else "weight" for n, m in model.named_modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine}
        self.fallback_groups = []

    def __call__(self, group: Group, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.names is None:
            raise RuntimeError("BatchNormScale needs prepare(model, graph) before scoring (plan() calls it)")
        members = [m for m in group.members if m.name in self.names and m.name in tensors]
        if not members:
            self.fallback_groups.append(group.index)
            return self.fallback(group, tensors)
        scores = torch.zeros(group.num_units, dtype=torch.float64)
        for m in members:
            live = m.unit >= 0
            scores.index_add_(0, m.unit[live], tensors[m.name].detach().abs().double().cpu()[live])
        return scores.float()

    @property
    def notes(self) -> list[str]:
        if not self.fallback_groups:
            return []
        return [f"bn_scale: groups {self.fallback_groups} hold no BatchNorm, scored by their weights' L1 norm"]


# --------------------------------------------------------------------------------------------------------------------
# Calibration: batches, losses, and the data-driven criteria


def _split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, labels)`` of a calibration batch: a pair ``(inputs, labels)`` or bare model inputs."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    return batch, None


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _prediction(output: Any) -> torch.Tensor:
    """The tensor a loss is computed on: the output itself, ``.logits``, or the first tensor of a tuple/dict."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    tensors = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not tensors:
        raise TypeError(f"the model returned {type(output).__name__} without a floating-point tensor to compute a loss on")
    return tensors[0]


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1)


def _kl(output: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || model) of the softmax over the last dimension, mean over rows (Hinton et al. 2015)."""
    return F.kl_div(F.log_softmax(_rows(output), -1), F.log_softmax(_rows(teacher), -1), log_target=True,
                    reduction="batchmean")


def _hard(output: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the teacher's top-1 predictions (hard distillation)."""
    return F.cross_entropy(_rows(output), _rows(teacher).argmax(-1))


def _task(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for integer class labels, mean squared error otherwise."""
    if not labels.is_floating_point() and output.dim() >= 2:
        return F.cross_entropy(_rows(output), labels.reshape(-1))
    return F.mse_loss(output, labels.to(output.dtype))


#: Losses by name: ``"task"`` against labels; distillation against the teacher's outputs: ``"kl"`` (soft targets),
#: ``"mse"``, ``"hard"`` (cross-entropy on the teacher's top-1 class).
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "task": _task, "kl": _kl, "mse": F.mse_loss, "hard": _hard,
}

Loss = str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_loss(loss: Loss | None) -> None:
    if loss is None or callable(loss):
        return
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES)} or pass a callable "
                         "loss(prediction, target) -> scalar")


def _to_device(obj: Any, device: torch.device) -> Any:
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, obj)


class _Calibrated:
    """Shared machinery of the data-driven criteria: batches, model modes, stored scores per group."""

    name = "calibrated"

    def __init__(self, data: Iterable[Any], *, batches: int | None = None, normalize: bool = True) -> None:
        if data is None or isinstance(data, (torch.Tensor, str)) or not isinstance(data, Iterable):
            raise TypeError(
                f"{type(self).__name__} needs calibration data: an iterable of batches, each (inputs, labels) or "
                f"bare inputs, e.g. [(x, y), ...] or a DataLoader; got {type(data).__name__}"
            )
        if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int) or batches < 1):
            raise ValueError(f"batches must be a positive int or None, got {batches!r}")
        self.data = data
        self.batches = batches
        self.normalize = normalize
        self.scores: dict[int, torch.Tensor] = {}
        self.fallback_groups: list[int] = []
        self._keys: dict[int, tuple[tuple[str, int], ...]] = {}

    def _iter(self) -> Iterator[tuple[Any, Any]]:
        it = iter(self.data)
        if self.batches is not None:
            it = itertools.islice(it, self.batches)
        count = 0
        for batch in it:
            count += 1
            yield _split_batch(batch)
        if count == 0:
            raise ValueError(f"{type(self).__name__}: the calibration data is empty")

    def _store(self, graph: DependencyGraph, scores: Mapping[int, torch.Tensor]) -> None:
        self.scores = {k: (normalize(v) if self.normalize else v.float()) for k, v in scores.items()}
        self._keys = {g.index: tuple((m.name, m.dim) for m in g.members) for g in graph.groups}

    def __call__(self, group: Group, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        key = tuple((m.name, m.dim) for m in group.members)
        if self._keys.get(group.index) != key:
            raise RuntimeError(f"{type(self).__name__} has no scores for this group: call prepare(model, graph) with "
                               "the graph the group comes from (plan() does this)")
        return self.scores[group.index]

    @property
    def notes(self) -> list[str]:
        return []


def _per_unit(t: torch.Tensor, member: Member, num_units: int, batch: bool) -> torch.Tensor | None:
    """Sum ``t`` over every dim but the member's (and the first, if ``batch``), then over each unit's positions:
    ``(B, num_units)`` if ``batch`` else ``(num_units,)``. None if ``t`` does not have the traced size there."""
    d = member.dim if member.dim >= 0 else t.dim() + member.dim
    positions = member.unit.numel()
    if d >= t.dim() or t.shape[d] != positions:
        return None
    if batch and d > 0:
        per = t.movedim(d, -1).reshape(t.shape[0], -1, positions).sum(1)  # (B, P)
    else:
        per = t.movedim(d, -1).reshape(-1, positions).sum(0, keepdim=True)  # (1, P)
        if not batch:
            per = per[0]
    live = member.unit >= 0
    out = torch.zeros(*per.shape[:-1], num_units, dtype=per.dtype)
    out.index_add_(-1, member.unit[live], per[..., live])
    return out


class _ConsumerTaylor:
    """Accumulator of one consumer module for :class:`TaylorScore`: ``x * grad`` per example and unit."""

    def __init__(self, members: list[tuple[int, int, Member]], buffers: dict[int, torch.Tensor]) -> None:
        self.members = members
        self.buffers = buffers

    def add_batch(self, x: torch.Tensor, grad: torch.Tensor) -> None:
        prod = (x.double() * grad.double()).cpu()  # (B, ..., C, ...)
        for g, n, member in self.members:
            per = _per_unit(prod, member, n, batch=True)
            if per is None:
                continue
            per = per * per.shape[0]  # the loss is a batch mean: undo its 1/B to get each example's own change
            old = self.buffers.get(g)
            if old is None:
                self.buffers[g] = per
            elif old.shape == per.shape:
                self.buffers[g] = old + per
            else:  # calls with other batch layouts: combine at batch level
                self.buffers[g] = old.sum(0, keepdim=True) + per.sum(0, keepdim=True)


class TaylorScore(_Calibrated):
    """First-order Taylor criterion on activations (Molchanov et al. 2017), measured on calibration batches.

    Molchanov, Tyree, Karras, Aila, Kautz, "Pruning Convolutional Neural Networks for Resource Efficient Inference",
    ICLR 2017, https://arxiv.org/abs/1611.06440. Removing feature map ``z`` changes the loss ``C`` by about
    ``|dC/dz * z|`` (first-order Taylor expansion around the current activations), so per unit ``k`` of a layer::

        Theta(z_k) = | (1/M) sum_m  dC/dz_{k,m} * z_{k,m} |          (m over the M spatial positions)
        Theta_hat(z_k) = Theta(z_k) / sqrt(sum_j Theta(z_j)^2)        (L2-normalised per layer)

    computed for each example and averaged over the examples of all calibration batches (``per_example=True``, as
    the paper does), or as ``|mean over batch and space|`` per batch averaged over batches (``per_example=False``).
    A layer here is a group; a unit spanning several positions (an attention head) or read by several consumers
    (a residual stream) sums ``z * dC/dz`` over all of them before the absolute value: that sum is the first-order
    change of the loss when the unit is removed, measured at its consumer inputs (``group.consumers``; zeroing the
    unit there is removing it). Spatial positions are summed, not averaged, so consumers of different resolutions
    add up correctly; one consumer scales every unit alike, so the normalised scores are the paper's.

    Groups that no module reads as an input (attention heads inside ``nn.MultiheadAttention``) fall back to the
    same first-order estimate on the unit's parameters, ``|sum over its weights of w * dC/dw|`` per batch
    (:attr:`fallback_groups`); for a linear consumer this equals the batch-level score above.

    The loss: with labels, ``loss`` (default ``"task"``: cross-entropy for integer labels, MSE otherwise) against
    them; without labels, a distillation loss against the dense model's outputs: ``teacher``'s, or, without a
    teacher, the model's own. By default that is ``"kl"``, except where the model still computes exactly the
    teacher's outputs (one-shot pruning of a dense model, or the first step of gradual pruning): KL and MSE have
    zero gradient there, so the default then uses ``"hard"``, cross-entropy against the teacher's top-1
    predictions. The loss must be a mean over the batch (as all built-in ones are).

    The model runs in eval mode (restored after) with gradients enabled; no parameter's ``.grad`` is written and
    the model is not changed.

    Args:
        data: Calibration batches: ``(inputs, labels)`` pairs or bare model inputs (a tensor, a tuple of positional
            arguments or a dict of keyword arguments).
        loss: ``"task"``, ``"kl"``, ``"mse"``, ``"hard"`` or ``loss(prediction, target) -> scalar`` (target: the
            labels, or the teacher's prediction). Default as described above.
        teacher: The dense model, or a list with its prediction for each batch, for distillation without labels.
        batches: Use at most this many batches of ``data``.
        per_example: Absolute value per example (the paper) or per batch.
        normalize: L2-normalise the scores of each group.

    Examples:
        >>> from prunekit.structured import plan
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(2)]
        >>> p = plan(model, torch.randn(1, 4), 0.5, criterion=TaylorScore(data))
        >>> [len(s.keep) for s in p.slices]
        [4, 4, 4]
    """

    name = "taylor"

    def __init__(self, data: Iterable[Any], *, loss: Loss | None = None,
                 teacher: nn.Module | Sequence[Any] | None = None, batches: int | None = None,
                 per_example: bool = True, normalize: bool = True) -> None:
        super().__init__(data, batches=batches, normalize=normalize)
        _check_loss(loss)
        if loss in ("kl", "mse") and teacher is None:
            raise ValueError(
                f"loss={loss!r} without a teacher compares the model with itself: its gradient is zero, so every "
                "Taylor score would be 0. Pass labels in the data, teacher=<the dense model or its outputs>, or "
                "loss='hard' (cross-entropy on the model's own top-1 predictions)"
            )
        self.loss = loss
        self.teacher = teacher
        self.per_example = per_example

    def _loss(self, prediction: torch.Tensor, labels: Any, teacher: torch.Tensor | None) -> torch.Tensor:
        if labels is not None:
            fn = LOSSES[self.loss or "task"] if not callable(self.loss) else self.loss
            return fn(prediction, labels)
        assert teacher is not None
        if callable(self.loss):
            return self.loss(prediction, teacher)
        if self.loss not in (None, "task"):
            return LOSSES[self.loss](prediction, teacher)
        same = prediction.shape == teacher.shape and torch.equal(prediction.detach(), teacher)
        return LOSSES["hard" if same else "kl"](prediction, teacher)

    def prepare(self, model: nn.Module, graph: DependencyGraph) -> None:
        """Run the calibration batches and store the score of every group of ``graph``."""
        read = [g for g in graph.groups if g.consumers]
        self.fallback_groups = [g.index for g in graph.groups if not g.consumers]
        modules = dict(model.named_modules())
        members: dict[str, list[tuple[int, int, Member]]] = {}
        for g in read:
            for m in g.consumers:
                members.setdefault(m.name, []).append((g.index, g.num_units, m))
        buffers: dict[int, torch.Tensor] = {}
        accumulators = {name: _ConsumerTaylor(ms, buffers) for name, ms in members.items()}
        params = dict(model.named_parameters())
        fallback = [(g, [m for m in g.members if m.name in params and params[m.name].requires_grad])
                    for g in graph.groups if not g.consumers]
        fallback_tensors = list(dict.fromkeys(m.name for _, ms in fallback for m in ms))
        totals = {g.index: torch.zeros(g.num_units, dtype=torch.float64) for g in graph.groups}
        counts = dict.fromkeys(totals, 0)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            with torch.enable_grad(), record_input_gradients({n: modules[n] for n in members}, accumulators) as tape:
                for i, (inputs, labels) in enumerate(self._iter()):
                    inputs, labels = _to_device(inputs, device), _to_device(labels, device)
                    prediction = _prediction(_call(model, inputs))
                    teacher = None
                    if labels is None:
                        teacher = self._teacher_prediction(i, inputs, prediction)
                    loss = self._loss(prediction, labels, teacher)
                    buffers.clear()
                    grads = tape.backward(loss, [params[n] for n in fallback_tensors])
                    for g, buf in buffers.items():
                        if self.per_example:
                            totals[g] += buf.abs().sum(0)
                            counts[g] += buf.shape[0]
                        else:
                            totals[g] += (buf.sum(0) / buf.shape[0]).abs()
                            counts[g] += 1
                    by_name = dict(zip(fallback_tensors, grads))
                    for g, ms in fallback:
                        change = torch.zeros(g.num_units, dtype=torch.float64)
                        for m in ms:
                            grad = by_name.get(m.name)
                            if grad is None:
                                continue
                            product = (params[m.name].detach().double() * grad.double()).cpu()
                            per = _per_unit(product, m, g.num_units, batch=False)
                            if per is not None:
                                change += per
                        totals[g.index] += change.abs()
                        counts[g.index] += 1
        finally:
            for m, mode in modes.items():
                m.training = mode
        self._store(graph, {k: v / max(counts[k], 1) for k, v in totals.items()})

    def _teacher_prediction(self, i: int, inputs: Any, prediction: torch.Tensor) -> torch.Tensor:
        if self.teacher is None:
            return prediction.detach()
        if isinstance(self.teacher, nn.Module):
            with torch.no_grad():
                return _prediction(_call(self.teacher, inputs)).detach()
        try:
            return _prediction(self.teacher[i]).to(prediction.device)
        except IndexError:
            raise ValueError(f"teacher holds {len(self.teacher)} predictions, but batch {i} needs one; give one per "
                             "calibration batch") from None

    @property
    def notes(self) -> list[str]:
        if not self.fallback_groups:
            return []
        return [f"taylor: groups {self.fallback_groups} are read by no module input (e.g. heads inside "
                "nn.MultiheadAttention), scored by the Taylor estimate on their parameters"]


class _ConsumerActivations:
    """Accumulator of one consumer module for :class:`ActivationScore`."""

    def __init__(self, members: list[tuple[int, int, Member]], sums: dict[int, torch.Tensor],
                 zeros: dict[int, torch.Tensor], counts: dict[int, torch.Tensor]) -> None:
        self.members, self.sums, self.zeros, self.counts = members, sums, zeros, counts

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.detach().cpu()
        for g, n, member in self.members:
            magnitude = _per_unit(x.abs().double(), member, n, batch=False)
            if magnitude is None:
                continue
            self.sums[g] += magnitude
            self.zeros[g] += _per_unit((x <= 0).double(), member, n, batch=False)
            live = member.unit >= 0
            per_position = x.numel() // member.unit.numel()  # entries of each position (batch x space)
            self.counts[g] += torch.bincount(member.unit[live], minlength=n).double() * per_position


class ActivationScore(_Calibrated):
    """Activation-based criteria on calibration batches: mean activation or APoZ of each unit's feature maps.

    Measured at the unit's consumer inputs (``group.consumers``), i.e. after its BatchNorm, ReLU and pooling:

    * ``statistic="mean"``: mean activation, ``Theta(z_k) = mean over examples and positions of |z_k|`` (the
      "mean activation" criterion compared by Molchanov et al. 2017, https://arxiv.org/abs/1611.06440; after a ReLU
      ``|z| = z``).
    * ``statistic="apoz"``: Average Percentage of Zeros (Hu et al. 2016, "Network Trimming",
      https://arxiv.org/abs/1607.03250), the fraction of a unit's activations that are zero after its ReLU (counted
      as ``z <= 0``, so a pre-activation counts what a ReLU would zero); the score is ``1 - APoZ``, so units that
      are mostly off go first.

    Groups read by no module input fall back to the L2 norm of their weights (:attr:`fallback_groups`). The model
    runs in eval mode without gradients and is not changed.

    Args:
        data: Calibration batches (labels, if any, are ignored).
        statistic: ``"mean"`` or ``"apoz"``.
        batches: Use at most this many batches.
        normalize: L2-normalise the scores of each group.

    Examples:
        >>> from prunekit.structured import trace
        >>> model = nn.Sequential(nn.Linear(1, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.copy_(torch.tensor([[1.0], [-1.0], [2.0]])); _ = model[0].bias.zero_()
        >>> graph = trace(model, torch.ones(1, 1))
        >>> score = ActivationScore([torch.tensor([[1.0], [-1.0]])], statistic="apoz", normalize=False)
        >>> score.prepare(model, graph)
        >>> score(graph.groups[0], {}).tolist()  # each hidden unit is zero after the ReLU for one of the 2 inputs
        [0.5, 0.5, 0.5]
    """

    name = "activation"

    def __init__(self, data: Iterable[Any], *, statistic: str = "mean", batches: int | None = None,
                 normalize: bool = True) -> None:
        super().__init__(data, batches=batches, normalize=normalize)
        if statistic not in ("mean", "apoz"):
            raise ValueError(f"statistic must be 'mean' or 'apoz', got {statistic!r}")
        self.statistic = statistic
        self.name = "activation" if statistic == "mean" else "apoz"

    def prepare(self, model: nn.Module, graph: DependencyGraph) -> None:
        """Run the calibration batches and store the score of every group of ``graph``."""
        modules = dict(model.named_modules())
        members: dict[str, list[tuple[int, int, Member]]] = {}
        for g in graph.groups:
            for m in g.consumers:
                members.setdefault(m.name, []).append((g.index, g.num_units, m))
        self.fallback_groups = [g.index for g in graph.groups if not g.consumers]
        sums = {g.index: torch.zeros(g.num_units, dtype=torch.float64) for g in graph.groups}
        zeros = {k: torch.zeros_like(v) for k, v in sums.items()}
        counts = {k: torch.zeros_like(v) for k, v in sums.items()}
        accumulators = {n: _ConsumerActivations(ms, sums, zeros, counts) for n, ms in members.items()}
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            with torch.no_grad(), record_inputs({n: modules[n] for n in members}, accumulators):
                for inputs, _ in self._iter():
                    _call(model, _to_device(inputs, device))
        finally:
            for m, mode in modes.items():
                m.training = mode
        params = dict(model.named_parameters())
        scores = {}
        for g in graph.groups:
            if g.consumers:
                n = counts[g.index].clamp(min=1)
                scores[g.index] = sums[g.index] / n if self.statistic == "mean" else 1 - zeros[g.index] / n
            else:
                scores[g.index] = l2_group(g, params).double()
        self._store(graph, scores)

    @property
    def notes(self) -> list[str]:
        if not self.fallback_groups:
            return []
        return [f"{self.name}: groups {self.fallback_groups} are read by no module input, scored by the L2 norm of "
                "their weights"]


#: Built-in criteria that need no data, by name.
CRITERIA: dict[str, GroupCriterion] = {"l1": l1_group, "l2": l2_group, "random": RandomGroupScore(0)}

#: Criteria built per call, by name: ``factory(data, loss)`` (``data`` may be None for those that need none).
DATA_CRITERIA: dict[str, Callable[[Any, Loss | None], GroupCriterion]] = {
    "bn_scale": lambda data, loss: BatchNormScale(),
    "taylor": lambda data, loss: TaylorScore(data, loss=loss),
    "activation": lambda data, loss: ActivationScore(data, statistic="mean"),
    "apoz": lambda data, loss: ActivationScore(data, statistic="apoz"),
}

_NEEDS_DATA = ("taylor", "activation", "apoz")


def criterion_names() -> list[str]:
    """Every built-in criterion name."""
    return sorted(set(CRITERIA) | set(DATA_CRITERIA))


def get_criterion(criterion: str | GroupCriterion, *, data: Iterable[Any] | None = None,
                  loss: Loss | None = None) -> GroupCriterion:
    """Resolve a criterion given by name (see :func:`criterion_names`) or as a callable.

    Args:
        criterion: A name or a callable ``criterion(group, tensors) -> scores`` (optionally with ``prepare``).
        data: Calibration batches, for ``"taylor"``, ``"activation"`` and ``"apoz"``.
        loss: The loss of ``"taylor"`` (see :class:`TaylorScore`).

    Raises:
        ValueError: For an unknown name (the message lists the known ones) or a data-driven criterion without data.
        TypeError: For something that is neither a name nor a callable.

    Examples:
        >>> get_criterion("taylor")
        Traceback (most recent call last):
        ...
        ValueError: criterion 'taylor' needs calibration data: pass data=[(inputs, labels), ...] (or bare inputs, \
for a distillation loss against the model's own outputs)
    """
    if isinstance(criterion, str):
        if criterion in CRITERIA:
            return CRITERIA[criterion]
        if criterion in DATA_CRITERIA:
            if criterion in _NEEDS_DATA and data is None:
                raise ValueError(f"criterion {criterion!r} needs calibration data: pass data=[(inputs, labels), ...] "
                                 "(or bare inputs, for a distillation loss against the model's own outputs)")
            return DATA_CRITERIA[criterion](data, loss)
        raise ValueError(f"unknown structured criterion {criterion!r}; choose one of {criterion_names()} or pass "
                         "a callable criterion(group, tensors) -> scores of shape (group.num_units,)")
    if callable(criterion):
        return criterion
    raise TypeError(f"criterion must be a name {criterion_names()} or a callable, got {type(criterion).__name__}")
