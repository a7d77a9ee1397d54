"""Oracles for prunekit.structured: tiny hand-built models whose pruned result is worked out by hand.

Each test builds a model, plans 50% structured pruning and checks the physically pruned model against an explicit
computation with the kept slices (or against the soft-pruned model, where zeroing is provably the same thing).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.fileformat import FileFormatError
from prunekit.flops import count_macs
from prunekit.structured import (
    Handler,
    Plan,
    PlanApplyError,
    StructuredPruner,
    UnsupportedOpError,
    load,
    plan,
    save,
    trace,
)


def _members(group):
    return {(m.name, m.dim) for m in group.members}


def _group_with(graph, name, dim):
    return next(g for g in graph.groups if (name, dim) in _members(g))


def _keep(p: Plan, name: str, dim: int) -> list[int]:
    return list(next(s.keep for s in p.slices if s.name == name and s.dim == dim))


def _soft_equals_physical(model, x, p, atol=1e-5):
    phys = p.apply(copy.deepcopy(model))
    soft = p.apply(copy.deepcopy(model), soft=True)
    with torch.no_grad():
        a, b, dense = phys(x), soft(x), model(x)
    assert torch.allclose(a, b, atol=atol), (a - b).abs().max()
    assert not torch.allclose(a, dense, atol=1e-3)  # the pruning did change something: the check is not vacuous
    return phys


# --- neurons, channels and the coupling rules ---------------------------------------------------------------------


def test_linear_relu_linear_neurons_equal_the_masked_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(5, 6)
    p = plan(model, x, 0.5, criterion="l1")
    keep = _keep(p, "0.weight", 0)
    assert len(keep) == 4 and _keep(p, "0.bias", 0) == keep and _keep(p, "2.weight", 1) == keep
    w1, b1, w2, b2 = (t.detach().clone() for t in (model[0].weight, model[0].bias, model[2].weight, model[2].bias))
    # l1 keeps the 4 neurons with the largest |incoming| + |outgoing| weights
    score = w1.abs().sum(1) + b1.abs() + w2.abs().sum(0)
    assert sorted(keep) == sorted(score.argsort(descending=True)[:4].tolist())
    expected = F.relu(x @ w1[keep].T + b1[keep]) @ w2[:, keep].T + b2
    small = p.apply(model)
    assert small[0].out_features == 4 and small[2].in_features == 4
    assert torch.allclose(small(x), expected, atol=1e-6)


def test_conv_bn_conv_equals_sliced_functional_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 5, 3)).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.normal_()
    x = torch.randn(2, 3, 9, 9)
    p = plan(model, x, 0.5)
    keep = _keep(p, "0.weight", 0)
    for name in ("0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        assert _keep(p, name, 0) == keep
    assert _keep(p, "3.weight", 1) == keep
    c1, bn, c2 = model[0], model[1], model[3]
    h = F.conv2d(x, c1.weight[keep], c1.bias[keep])
    h = F.batch_norm(h, bn.running_mean[keep], bn.running_var[keep], bn.weight[keep], bn.bias[keep], eps=bn.eps)
    expected = F.conv2d(F.relu(h), c2.weight[:, keep], c2.bias)
    small = p.apply(copy.deepcopy(model))
    assert (small[0].out_channels, small[1].num_features, small[3].in_channels) == (4, 4, 4)
    with torch.no_grad():
        assert torch.allclose(small(x), expected, atol=1e-5)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.out(torch.relu(self.a(x) + self.b(x)))


def test_residual_addition_couples_both_branches():
    torch.manual_seed(0)
    model, x = Residual(), torch.randn(1, 3, 5, 5)
    graph = trace(model, x)
    group = _group_with(graph, "a.weight", 0)
    assert {("a.weight", 0), ("a.bias", 0), ("b.weight", 0), ("b.bias", 0), ("out.weight", 1)} <= _members(group)
    unit = {m.name: m.unit for m in group.members}
    assert torch.equal(unit["a.weight"], unit["b.weight"]) and torch.equal(unit["a.weight"], unit["out.weight"])
    p = plan(model, x, 0.5, graph=graph)
    assert _keep(p, "a.weight", 0) == _keep(p, "b.weight", 0) == _keep(p, "out.weight", 1)
    _soft_equals_physical(model, x, p)


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), torch.relu(self.b(x))], dim=1))


def test_concatenation_keeps_offsets():
    torch.manual_seed(0)
    model, x = Concat(), torch.randn(1, 3, 4, 4)
    p = plan(model, x, 0.5, criterion="random")
    ka, kb = _keep(p, "a.weight", 0), _keep(p, "b.weight", 0)
    assert len(ka) + len(kb) == 5 and ka and kb  # one group: both branches share c's input dimension
    assert _keep(p, "c.weight", 1) == ka + [4 + i for i in kb]
    _soft_equals_physical(model, x, p)


def test_flatten_linear_removes_channel_times_spatial_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 5))
    x = torch.randn(1, 3, 4, 4)
    p = plan(model, x, 0.5)
    kept = _keep(p, "0.weight", 0)
    assert _keep(p, "3.weight", 1) == [4 * c + s for c in kept for s in range(4)]
    small = _soft_equals_physical(model, x, p)
    assert small[3].in_features == 8


def test_depthwise_convolution_prunes_channels_and_shrinks_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 4, 1))
    x = torch.randn(1, 3, 6, 6)
    graph = trace(model, x)
    group = _group_with(graph, "2.weight", 0)
    assert {("0.weight", 0), ("2.weight", 0), ("4.weight", 1)} <= _members(group) and group.num_units == 8
    p = plan(model, x, 0.5, graph=graph)
    small = _soft_equals_physical(model, x, p)
    assert (small[2].in_channels, small[2].out_channels, small[2].groups) == (4, 4, 4)


def test_grouped_convolution_prunes_whole_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=4, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 2, 1))
    x = torch.randn(1, 3, 6, 6)
    graph = trace(model, x)
    group = _group_with(graph, "2.weight", 0)
    assert (group.num_units, group.unit_width) == (4, 4)  # a unit is one conv group of 4 channels
    p = plan(model, x, 0.5, graph=graph)
    keep = _keep(p, "2.weight", 0)
    assert len(keep) == 8 and all(keep[i] // 4 == keep[i + 1] // 4 for i in (0, 2, 4, 6))
    small = _soft_equals_physical(model, x, p)
    assert (small[2].in_channels, small[2].out_channels, small[2].groups) == (8, 8, 2)


class Shuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # channel shuffle, 2 groups
        return self.b(torch.relu(y))


def test_channel_shuffle_prunes_the_same_index_in_every_group():
    torch.manual_seed(0)
    model, x = Shuffle(), torch.randn(1, 3, 4, 4)
    graph = trace(model, x)
    group = _group_with(graph, "a.weight", 0)
    assert group.num_units == 4 and any(r.startswith("uniform split") for r in group.rules)
    p = plan(model, x, 0.5, graph=graph)
    keep = _keep(p, "a.weight", 0)
    inner = [k for k in keep if k < 4]
    assert keep == inner + [4 + k for k in inner]  # symmetric: channel j and 4 + j go together
    _soft_equals_physical(model, x, p)


class SplitBySize(nn.Module):
    """A CSP / YOLO C2f style block: ``torch.split`` by a piece size its code keeps in an attribute (or a literal)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how, self.c = how, 4
        self.cv1 = nn.Conv2d(3, 8, 1)
        self.m = nn.Conv2d(4, 4, 3, padding=1)
        self.cv2 = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        y = torch.relu(self.cv1(x))
        if self.how == "attribute":
            a, b = y.split(self.c, 1)
        elif self.how == "sizes":
            a, b = torch.split(y, [self.c, self.c], dim=1)
        else:
            a, b = y.split(4, 1)  # a literal: no attribute to update
        return self.cv2(torch.cat([a, b, torch.relu(self.m(b))], 1))


@pytest.mark.parametrize("how", ["attribute", "sizes"])
def test_split_by_a_size_attribute_prunes_and_updates_it(how):
    torch.manual_seed(0)
    model, x = SplitBySize(how), torch.randn(1, 3, 6, 6)
    graph = trace(model, x)
    assert [(s.module, s.attributes) for s in graph.state.size_splits] == [("", {"c": 1})]
    p = plan(model, x, 0.5, graph=graph)
    keep = _keep(p, "cv1.weight", 0)
    inner = [k for k in keep if k < 4]
    assert len(inner) == 2 and keep == inner + [4 + k for k in inner]  # both pieces pruned alike
    assert {"c": 2} in [u.set for u in p.modules if u.name == ""]
    small = _soft_equals_physical(model, x, p)
    assert small.c == 2 and not p.notes
    fresh = SplitBySize(how)  # the plan is data: replayed on a fresh instance, the attribute is set again
    fresh.load_state_dict(model.state_dict())
    assert p.apply(fresh).c == 2


def test_split_by_a_literal_size_keeps_those_channels_and_says_so():
    torch.manual_seed(0)
    model, x = SplitBySize("literal"), torch.randn(1, 3, 6, 6)
    p = plan(model, x, 0.5)
    assert "cv1.weight" not in {s.name for s in p.slices} and len(_keep(p, "m.weight", 0)) == 2
    assert len(p.notes) == 1 and "keeping the channels of torch.split by size (<model>: split by 4" in p.notes[0]
    _soft_equals_physical(model, x, p)
    pruner = StructuredPruner(model, x, 0.5)  # gradual pruning finds out when it starts, not at finalize
    assert pruner.notes == p.notes
    pruner.step()
    with torch.no_grad():
        assert pruner.finalize()(x).shape == (1, 2, 6, 6)


class FreeScale(nn.Module):
    """A learnable per-channel scale that is a bare parameter, not inside any layer module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1)
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, 6))
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)) * self.scale.view(1, -1, 1, 1))


def test_parameter_outside_any_layer_is_pruned_with_its_channels():
    torch.manual_seed(0)
    model, x = FreeScale(), torch.randn(1, 3, 4, 4)
    p = plan(model, x, 0.5)
    assert _keep(p, "scale", 0) == _keep(p, "conv.weight", 0)
    small = _soft_equals_physical(model, x, p)
    assert small.scale.shape == (3,)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight  # tied input/output embedding

    def forward(self, ids):
        return self.head(torch.relu(self.mix(self.embed(ids))))


def test_tied_weights_are_pruned_once_and_stay_tied():
    torch.manual_seed(0)
    model, ids = Tied(), torch.tensor([[1, 4, 7]])
    p = plan(model, ids, 0.5)
    assert [s.name for s in p.slices if s.name in ("embed.weight", "head.weight")] == ["embed.weight"]
    assert _keep(p, "embed.weight", 1) == _keep(p, "mix.weight", 1) == _keep(p, "mix.weight", 0)
    small = _soft_equals_physical(model, ids, p)
    assert small.head.weight is small.embed.weight and small.embed.weight.shape == (10, 4)
    assert small.embed.embedding_dim == 4


class Correlation(nn.Module):
    """RAFT's correlation volume: two images' features contracted over the channels, then scaled."""

    def __init__(self, scale: str) -> None:
        super().__init__()
        self.features, self.head, self.scale = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(16, 2, 1), scale

    def forward(self, a, b):
        f1, f2 = self.features(a), self.features(b)
        n, c, h, w = f1.shape
        corr = torch.matmul(f1.view(n, c, h * w).transpose(1, 2), f2.view(n, c, h * w)).view(n, h * w, h, w)
        if self.scale == "tensor":  # torchvision's RAFT: the channel count read from the shape, as a tensor
            corr = corr / torch.sqrt(torch.tensor(c))
        elif self.scale == "python":  # attention code's q.size(-1) ** -0.5
            corr = corr * c**-0.5
        else:  # a constant of the module (the dense channel count): pruning leaves it as it is
            corr = corr * 8**-0.5
        return self.head(corr)


@pytest.mark.parametrize("scale", ["tensor", "python", "constant"])
def test_contraction_scaled_by_its_size_is_not_soft_exact(scale):
    torch.manual_seed(0)
    model = Correlation(scale)
    x = (torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4))
    graph = trace(model, x)
    (features,) = [g for g in graph.groups if any(m.name == "features.weight" for m in g.members)]
    p = plan(model, x, 0.5, graph=graph)
    phys, soft = p.apply(copy.deepcopy(model)), p.apply(copy.deepcopy(model), soft=True)
    with torch.no_grad():
        same = torch.allclose(phys(*x), soft(*x), atol=1e-5)
    # a factor read from the shape changes with physical pruning, a constant does not; in the trace both are the same
    # number, so a constant equal to the channel count is flagged too (soft_exact errs on the safe side)
    assert not features.soft_exact and same == (scale == "constant")


class LiteralView(nn.Module):
    """A reshape to a literal channel count: after pruning it runs, but with other sizes, and breaks further on."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1), nn.Linear(16, 10)

    def forward(self, x):
        y = self.c2(torch.relu(self.c1(x)))
        return self.fc(y.view(y.size(0), 16, -1).mean(-1))


def test_a_literal_reshape_keeps_its_channels_and_the_rest_is_pruned():
    torch.manual_seed(0)
    model, x = LiteralView().eval(), torch.randn(2, 1, 8, 8)
    p = plan(model, x, 0.5)
    assert _keep(p, "c1.weight", 0) is not None and len(_keep(p, "c1.weight", 0)) == 4
    assert not any(s.name.startswith("c2.weight") and s.dim == 0 for s in p.slices)
    assert any("aten.view" in n and "mended" in n for n in p.notes)
    small = p.apply(copy.deepcopy(model))
    assert small.c2.out_channels == 16 and small.c1.out_channels == 4
    with torch.no_grad():
        assert small(x).shape == (2, 10)


class EmptyBatchHead(nn.Module):
    """A head that runs on no data in the trace (a detector with no detections) and whose output channels size a
    buffer through ``.shape`` only: torchvision's keypoint decoding."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(inplace=True), nn.Conv2d(8, 4, 1))

    def forward(self, x):
        f = torch.relu(self.stem(x))
        found = self.head(f[:0])  # nothing detected
        return torch.cat([f.mean((2, 3)), torch.zeros(x.shape[0], found.shape[1])], dim=1)


def test_channels_that_ran_on_no_data_and_size_the_output_are_kept():
    torch.manual_seed(0)
    model, x = EmptyBatchHead().eval(), torch.randn(1, 3, 6, 6)
    p = plan(model, x, 0.5)
    pruned = {(s.name, s.dim) for s in p.slices}
    assert ("head.2.weight", 0) not in pruned  # its 4 channels size the output through found.shape[1]
    assert ("head.0.weight", 0) in pruned  # the head's hidden channels are not: the in-place ReLU reads them
    assert any("produced on no data" in n and "'head.2'" in n for n in p.notes)
    with torch.no_grad():
        assert p.apply(copy.deepcopy(model))(x).shape == model(x).shape


class GRUStep(nn.Module):
    """An update block that keeps its hidden width in an attribute, as RAFT's does."""

    def __init__(self, hidden: int, context: int) -> None:
        super().__init__()
        self.hidden_state_size = hidden
        self.conv = nn.Conv2d(hidden + context, hidden, 3, padding=1)

    def forward(self, h, ctx):
        return torch.tanh(self.conv(torch.cat([h, ctx], dim=1))) + h


class UnequalSplit(nn.Module):
    """RAFT's context split: ``[update.hidden_state_size, the rest]`` (or, ``literal``, ``[8, the rest]``)."""

    def __init__(self, literal: bool = False) -> None:
        super().__init__()
        self.literal = literal
        self.encoder, self.update, self.head = nn.Conv2d(3, 12, 1), GRUStep(8, 4), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        e = self.encoder(x)
        first = 8 if self.literal else self.update.hidden_state_size
        h, ctx = torch.split(e, [first, e.shape[1] - first], dim=1)
        return self.head(self.update(torch.tanh(h), torch.relu(ctx)))


def test_unequal_split_whose_sizes_an_attribute_holds_prunes_each_piece():
    torch.manual_seed(0)
    model, x = UnequalSplit(), torch.randn(1, 3, 5, 5)
    p = plan(model, x, 0.5)
    # 4 of the 8 hidden channels go; the context piece, whose size no attribute holds, keeps its 4
    assert _keep(p, "encoder.weight", 0)[-4:] == [8, 9, 10, 11] and len(_keep(p, "encoder.weight", 0)) == 8
    assert {"hidden_state_size": 4} in [u.set for u in p.modules if u.name == "update"] and not p.notes
    small = _soft_equals_physical(model, x, p)
    assert small.update.hidden_state_size == 4 and small.update.conv.weight.shape[:2] == (4, 8)


class QKVSplit(nn.Module):
    """timm's MobileViTv2 attention split: ``qkv.split([1, embed_dim, embed_dim])`` (a literal 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_dim = 8
        self.qkv, self.out = nn.Conv2d(4, 17, 1), nn.Conv2d(16, 3, 1)

    def forward(self, x):
        q, k, v = self.qkv(x).split([1, self.embed_dim, self.embed_dim], dim=1)
        return self.out(torch.cat([k * torch.sigmoid(q), v], dim=1))


def test_unequal_pieces_sized_by_one_attribute_are_pruned_alike():
    torch.manual_seed(0)
    model, x = QKVSplit(), torch.randn(1, 4, 3, 3)
    p = plan(model, x, 0.5)
    keep = _keep(p, "qkv.weight", 0)
    assert keep[0] == 0 and len(keep) == 9 and not p.notes  # the query's literal 1 kept; k and v halved alike
    assert [k - 1 for k in keep[1:5]] == [k - 9 for k in keep[5:]]
    assert {"embed_dim": 4} in [u.set for u in p.modules if u.name == ""]
    _soft_equals_physical(model, x, p)


def test_unequal_split_by_a_literal_keeps_its_channels():
    torch.manual_seed(0)
    model, x = UnequalSplit(literal=True), torch.randn(1, 3, 5, 5)
    p = plan(model, x, 0.5)  # the attribute equals the literal 8: the check run finds out, the fallback keeps them
    assert not any(s.name == "encoder.weight" and s.dim == 0 for s in p.slices)
    assert any("torch.split" in n and "mended" in n for n in p.notes)
    with torch.no_grad():
        assert p.apply(copy.deepcopy(model))(x).shape == (1, 2, 5, 5)


def test_a_bare_handled_module_as_the_model_says_to_wrap_it():
    with pytest.raises(UnsupportedOpError, match=r"follows a LSTM inside a model, not as the model itself.*wrap it"):
        plan(nn.LSTM(4, 8, num_layers=2, batch_first=True), torch.randn(2, 3, 4), 0.5)
    wrapped = nn.Sequential(nn.LSTM(4, 8, num_layers=2, batch_first=True))
    plan(wrapped, torch.randn(2, 3, 4), 0.5)  # runs (all of its outputs, h_n of both layers too, keep their size)


def test_tracing_leaves_no_global_hook_behind():
    from torch.nn.modules import module as module_hooks

    before = dict(module_hooks._global_forward_hooks_with_kwargs)
    trace(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(1, 3))
    assert dict(module_hooks._global_forward_hooks_with_kwargs) == before  # (torch.compile warns otherwise)
    assert not module_hooks._global_forward_hooks and not module_hooks._global_forward_pre_hooks


def test_layernorm_group_matches_its_own_smaller_definition():
    """Soft pruning cannot match here (LayerNorm normalises over the pruned channels): compare the physically
    pruned model with the same architecture built at the smaller width."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.LayerNorm(12), nn.GELU(), nn.Linear(12, 3))
    x = torch.randn(4, 5)
    graph = trace(model, x)
    assert [g.soft_exact for g in graph.groups] == [False]
    p = plan(model, x, 0.5, graph=graph)
    keep = _keep(p, "0.weight", 0)
    small = p.apply(copy.deepcopy(model))
    ref = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 3))
    with torch.no_grad():
        ref[0].weight.copy_(model[0].weight[keep])
        ref[0].bias.copy_(model[0].bias[keep])
        ref[1].weight.copy_(model[1].weight[keep])
        ref[1].bias.copy_(model[1].bias[keep])
        ref[3].weight.copy_(model[3].weight[:, keep])
        ref[3].bias.copy_(model[3].bias)
        assert small[1].normalized_shape == (6,)
        assert torch.allclose(small(x), ref(x), atol=1e-6)


def test_group_norm_prunes_whole_norm_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(4, 8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    with torch.no_grad():
        model[1].weight.normal_()
    x = torch.randn(1, 3, 5, 5)
    graph = trace(model, x)
    assert (graph.groups[0].num_units, graph.groups[0].unit_width) == (4, 2)
    p = plan(model, x, 0.5, graph=graph)
    small = _soft_equals_physical(model, x, p)  # whole groups go, so the other groups' statistics are unchanged
    assert (small[1].num_groups, small[1].num_channels) == (2, 4)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_loses_whole_heads(batch_first, need_weights):
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)

        def forward(self, x, pad):
            return self.attn(x, x, x, key_padding_mask=pad, need_weights=need_weights)[0]

    model = Block().eval()
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    graph = trace(model, (x, pad))
    heads = _group_with(graph, "attn.out_proj.weight", 1)
    assert (heads.num_units, heads.unit_width) == (4, 4) and any(r.startswith("heads") for r in heads.rules)
    p = plan(model, (x, pad), 0.5, graph=graph)
    assert [(u.name, u.replace) for u in p.modules if u.replace] == [("attn", "prunekit.MultiheadAttention")]
    phys = p.apply(copy.deepcopy(model))
    soft = p.apply(copy.deepcopy(model), soft=True)
    assert (phys.attn.num_heads, phys.attn.embed_dim, phys.attn.in_proj_weight.shape) == (2, 16, (24, 16))
    with torch.no_grad():
        assert torch.allclose(phys(x, pad), soft(x, pad), atol=1e-6)


class RotaryAttention(nn.Module):
    """Llama-style attention: rotary position embedding (a float buffer shared by all heads, ``rotate_half`` by
    slicing and concatenating each head) and grouped-query attention (2 query heads per key/value head)."""

    def __init__(self, width: int = 16, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.head_dim = width // heads
        self.q = nn.Linear(width, heads * self.head_dim, bias=False)
        self.k = nn.Linear(width, kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(width, kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(heads * self.head_dim, width, bias=False)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, self.head_dim, 2) / self.head_dim))

    @staticmethod
    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        freqs = torch.arange(t, dtype=torch.float32)[:, None] * self.inv_freq[None, :]  # (T, hs/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        q, k = (z * cos + self.rotate_half(z) * sin for z in (q, k))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (B, nh, T, hs)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


def test_rotary_grouped_query_attention_keeps_whole_kv_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), RotaryAttention())
    x = torch.randn(1, 6, 8)
    graph = trace(model, x)
    heads = _group_with(graph, "1.o.weight", 1)
    # a unit is one key/value head with its 2 query heads: 8 query rows, 4 key rows, 4 value rows, 8 output columns
    assert (heads.num_units, heads.unit_width) == (2, 4) and any(r.startswith("heads") for r in heads.rules)
    assert ("1.inv_freq", 0) not in {(m.name, m.dim) for g in graph.groups for m in g.members}  # along head dims
    p = plan(model, x, lambda g: 0.5 if g is heads else 0.0, graph=graph)
    small = _soft_equals_physical(model, x, p)
    assert (small[1].q.out_features, small[1].k.out_features) == (8, 4)


def test_round_to_and_min_channels():
    model = nn.Sequential(nn.Linear(4, 30), nn.ReLU(), nn.Linear(30, 2))
    x = torch.randn(1, 4)
    assert len(_keep(plan(model, x, 0.5, round_to=8), "0.weight", 0)) == 16  # 15 rounded to a multiple of 8
    assert len(_keep(plan(model, x, 0.9, min_channels=6), "0.weight", 0)) == 6


class TwoBranchNorm(nn.Module):
    """A group spanning two layers (as a DenseNet block): one BatchNorm over the concatenation of both."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 2, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(8)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))


def test_no_layer_loses_all_of_its_channels():
    torch.manual_seed(0)
    model, x = TwoBranchNorm().eval(), torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        model.a.weight.mul_(1e-3)  # branch a's two channels score lowest
    graph = trace(model, x)
    assert len(graph.groups) == 1
    p = plan(model, x, 0.5, graph=graph)
    assert len(_keep(p, "a.weight", 0)) == 1 and len(_keep(p, "b.weight", 0)) == 3
    p.apply(model)


# --- zero pruning, serialisation, replay ------------------------------------------------------------------------


def test_zero_sparsity_is_output_identical():
    torch.manual_seed(0)
    model, x = Residual(), torch.randn(1, 3, 5, 5)
    before = model(x)
    p = plan(model, x, 0.0)
    assert p.slices == [] and p.modules == [] and p.macs[0] == p.macs[1]
    assert torch.equal(p.apply(model)(x), before)


def test_plan_json_round_trip_and_replay_on_a_fresh_instance(tmp_path):
    def make():
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=4),
                             nn.ReLU(), nn.Flatten(), nn.Linear(8 * 2 * 2, 4)).eval()

    model, x = make(), torch.randn(2, 3, 6, 6)
    p = plan(model, x, 0.5)
    text = p.to_json()
    again = Plan.from_json(text)
    assert again.slices == p.slices and again.modules == p.modules and again.groups == p.groups
    assert again.macs == p.macs and again.to_json() == text
    small = p.apply(copy.deepcopy(model))
    fresh = make()
    fresh.load_state_dict(model.state_dict())
    replayed = again.apply(fresh, example_inputs=x)
    with torch.no_grad():
        assert torch.equal(replayed(x), small(x))
    # stored without pickle: weights + plan in prunekit's file format, loaded into a fresh instance
    with pytest.raises(ValueError, match="not the one this plan pruned"):  # the unpruned model: a clear error
        save(model, tmp_path / "dense.safetensors", p)
    assert not (tmp_path / "dense.safetensors").exists()
    path = save(small, tmp_path / "small.safetensors", p)
    loaded = load(path, make(), example_inputs=x)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    assert count_macs(loaded, x).total == p.macs[1]
    # checked on other inputs than the plan's (another batch size): the output shapes expected are the unpruned
    # model's on those inputs, not the plan's recorded ones
    x5 = torch.randn(5, 3, 6, 6)
    loaded = load(path, make(), example_inputs=x5)
    with torch.no_grad():
        assert loaded(x5).shape == (5, 4) and torch.equal(loaded(x5), small(x5))


def test_check_on_other_inputs_still_catches_a_wrong_output_shape():
    class Squeeze(nn.Module):  # returns the channels as the output: its shape changes when they are pruned
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).mean((2, 3))

    p = plan(Squeeze(), torch.randn(1, 3, 4, 4), 0.5)  # nothing to prune: the output keeps all channels
    assert p.pruned_units[0] == 0
    data = p.to_dict()
    data["slices"] = [{"name": "conv.weight", "dim": 0, "size": 8, "keep": [0, 1, 2, 3]},
                      {"name": "conv.bias", "dim": 0, "size": 8, "keep": [0, 1, 2, 3]}]
    forged = Plan.from_dict(data)
    model = Squeeze()
    with pytest.raises(PlanApplyError, match=r"outputs have shapes \[\(3, 4\)\], the original's \[\(3, 8\)\]"):
        forged.apply(model, example_inputs=torch.randn(3, 3, 4, 4))
    assert model.conv.weight.shape == (8, 3, 1, 1)  # left unchanged


def test_applying_twice_or_to_another_model_is_refused(tmp_path):
    model, x = Residual(), torch.randn(1, 3, 5, 5)
    p = plan(model, x, 0.5)
    p.apply(model)
    with pytest.raises(PlanApplyError, match="already applied"):
        p.apply(model)
    with pytest.raises(PlanApplyError, match="does not have"):
        p.apply(nn.Linear(2, 2))
    small = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))  # the same first layers as a bigger model
    bigger = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2), nn.ReLU(), nn.Linear(2, 2))
    with pytest.raises(PlanApplyError, match="made for a 58-parameter model and this Sequential has 64"):
        plan(small, torch.randn(2, 4), 0.5).apply(bigger)
    with pytest.raises(ValueError, match="not a prunekit structured plan"):
        Plan.from_dict({"format": "other"})
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(FileFormatError):
        load(tmp_path / "junk.safetensors", Residual())


def test_masks_match_soft_pruning():
    torch.manual_seed(0)
    model, x = Residual(), torch.randn(1, 3, 5, 5)
    p = plan(model, x, 0.5)
    masks = p.masks(model)
    soft = p.apply(copy.deepcopy(model), soft=True)
    for name, param in soft.named_parameters():
        if name in masks:
            assert torch.equal(param != 0, masks[name] & (dict(model.named_parameters())[name] != 0))


# --- errors, leaves, handlers ------------------------------------------------------------------------------------


class Spectral(nn.Module):
    def forward(self, x):
        return torch.fft.rfft(x, dim=1).abs()[:, : x.shape[1]]


class WithSpectral(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.spectral = Spectral()
        self.head = nn.Conv2d(5, 2, 1)
        self.side = nn.Linear(4, 6)
        self.side_out = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.spectral(self.conv(x))), self.side_out(self.side(x.mean((1, 2))))


def test_an_operation_it_cannot_follow_is_a_clear_error_and_leaves_fix_it():
    model, x = WithSpectral(), torch.randn(1, 3, 4, 4)
    with pytest.raises(UnsupportedOpError) as info:
        trace(model, x)
    message = str(info.value)
    for part in ("aten._fft_r2c", "'spectral'", "(Spectral)", "conv.weight dim 0", "leaves=['spectral']",
                 "register_handler(Spectral"):
        assert part in message, (part, message)
    graph = trace(model, x, leaves=["spectral"])
    assert [sorted(_members(g)) for g in graph.groups] == [[("side.bias", 0), ("side.weight", 0),
                                                            ("side_out.weight", 1)]]
    assert len(trace(model, x, leaves=[Spectral]).groups) == 1
    assert ("conv.weight", 0) in graph.frozen


def test_ignore_freezes_a_module_and_its_coupled_channels():
    model, x = Residual(), torch.randn(1, 3, 5, 5)
    assert trace(model, x, ignore=["b"]).groups == []
    with pytest.raises(ValueError, match="matches no module"):
        trace(model, x, ignore=["nope"])
    with pytest.raises(TypeError, match="module names"):
        trace(model, x, leaves=[3])


class Gain(nn.Module):
    """Keeps its width in an attribute that its forward uses (``named`` says so; ``n`` does not)."""

    def __init__(self, width: int, named: bool = True) -> None:
        super().__init__()
        self.named = named
        self.width = self.n = width
        self.gain = nn.Parameter(torch.linspace(0.1, 1.0, width))

    def forward(self, x):
        return x * self.gain.view(1, self.width if self.named else self.n)


class GainHandler(Handler):
    def attributes(self, module, sizes):
        return {"n": sizes.shape("gain")[0]}


def test_a_size_attribute_named_as_one_follows_the_channels():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(3, 6), Gain(6), nn.Linear(6, 2)), torch.randn(2, 3)
    p = plan(model, x, 0.5)
    assert p.modules[1].set == {"width": 3} and not p.notes
    assert _soft_equals_physical(model, x, p)[1].width == 3


def test_a_module_with_an_unrecognised_size_attribute_is_kept_whole_or_given_a_handler():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(3, 6), Gain(6, named=False), nn.Linear(6, 2)), torch.randn(2, 3)
    p = plan(model, x, 0.5)  # the check run fails in Gain: its channels are kept, and the plan says why
    assert p.slices == [] and len(p.notes) == 1
    assert "module '1' (Gain)" in p.notes[0] and "Gain whole" in p.notes[0] and "register a handler" in p.notes[0]
    assert model[1].gain.shape == (6,)  # the failed attempt left the model unchanged
    p = plan(model, x, 0.5, handlers={Gain: GainHandler()})
    assert p.modules[1].set["n"] == 3 and not p.notes  # (and "width", which also held the size)
    small = _soft_equals_physical(model, x, p)
    assert small[1].n == 3


class HeadsByAttribute(nn.Module):
    """Reshapes into heads with an attribute (or, ``literal``, a constant of the code): after head pruning the
    shapes still fit, but unless the head count follows, the heads are scrambled."""

    def __init__(self, literal: bool = False) -> None:
        super().__init__()
        self.num_heads, self.literal = 4, literal
        self.qkv = nn.Linear(8, 3 * 16)
        self.out = nn.Linear(16, 8)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        heads = 4 if self.literal else self.num_heads
        q, k, v = (z.view(b, t, heads, -1).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, t, -1))


def test_a_head_count_attribute_follows_the_pruned_heads():
    torch.manual_seed(0)
    model, x = HeadsByAttribute(), torch.randn(1, 5, 8)
    p = plan(model, x, 0.5)
    assert {"num_heads": 2} in [u.set for u in p.modules if u.name == ""] and not p.notes
    assert _soft_equals_physical(model, x, p).num_heads == 2


def test_silently_wrong_shapes_are_caught_and_their_channels_kept():
    model, x = HeadsByAttribute(literal=True), torch.randn(1, 5, 8)
    graph = trace(model, x)
    assert any(any(r.startswith("heads") for r in g.rules) for g in graph.groups)
    p = plan(model, x, 0.5, graph=graph)  # the heads would be scrambled: the check run catches it, the fallback
    assert any("silently mixed up" in n and "aten.view" in n and "mended" in n for n in p.notes)  # keeps them
    assert not any(s.name == "qkv.weight" for s in p.slices)
    small = p.apply(copy.deepcopy(model))
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-6)  # nothing else here to prune: the same function


class LayerScale(nn.Module):
    """timm's metaformer ``Scale``: a per-channel parameter viewed by a shape the module keeps as a tuple."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.shape = (dim, 1, 1)
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, dim))

    def forward(self, x):
        return x * self.scale.view(self.shape)


class MixedConv(nn.Module):
    """timm's ``MixedConv2d``: the input split by a list of piece sizes, one convolution per piece."""

    def __init__(self) -> None:
        super().__init__()
        self.splits = [4, 4]
        self.convs = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 4, 5, padding=2, groups=4)])

    def forward(self, x):
        return torch.cat([c(p) for c, p in zip(self.convs, torch.split(x, self.splits, 1))], 1)


def test_tuple_and_list_size_attributes_follow_the_pruned_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), LayerScale(8), nn.ReLU(), MixedConv(), nn.ReLU(), nn.Conv2d(8, 2, 1))
    x = torch.randn(1, 3, 6, 6)
    p = plan(model, x, 0.5)
    sets = {u.name: u.set for u in p.modules}
    assert sets["1"] == {"shape": [4, 1, 1]} and sets["3"] == {"splits": [2, 2]} and not p.notes
    keep = _keep(p, "0.weight", 0)
    assert len(keep) == 4 and sum(k < 4 for k in keep) == 2  # both pieces of the split pruned alike
    small = _soft_equals_physical(model, x, p)
    assert small[1].shape == (4, 1, 1) and tuple(small[3].splits) == (2, 2)


class RelPosBias(nn.Module):
    """A relative-position bias table (one column per head) that its attention reads through ``get_bias()``, a
    method, not ``forward``: the reshape runs inside the attention, by the sizes this child keeps."""

    def __init__(self, tokens: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.bias_shape = heads, (tokens, tokens, heads)
        self.table = nn.Parameter(torch.randn(2 * tokens - 1, heads))
        index = torch.arange(tokens)[:, None] - torch.arange(tokens)[None, :] + tokens - 1
        self.register_buffer("index", index.reshape(-1))

    def get_bias(self):
        return self.table[self.index].view(self.bias_shape).permute(2, 0, 1)


class BiasedAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.head_dim = 4, 4
        self.qkv = nn.Linear(8, 3 * 16)
        self.rel_pos = RelPosBias(5, 4)
        self.out = nn.Linear(16, 8)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.rel_pos.get_bias())
        return self.out(y.transpose(1, 2).reshape(b, t, -1))


def test_sizes_of_a_child_module_read_through_a_method_follow_the_pruned_heads():
    torch.manual_seed(0)
    model, x = BiasedAttention(), torch.randn(1, 5, 8)
    p = plan(model, x, 0.5)
    sets = {u.name: u.set for u in p.modules}
    assert sets[""] == {"num_heads": 2} and sets["rel_pos"] == {"num_heads": 2, "bias_shape": [5, 5, 2]} and not p.notes
    assert len(_keep(p, "rel_pos.table", 1)) == 2
    small = _soft_equals_physical(model, x, p)
    assert small.rel_pos.bias_shape == (5, 5, 2) and small.rel_pos.table.shape == (9, 2)


class Recurrent(nn.Module):
    """Embedding -> recurrent layers -> per-step classifier; ``h0`` passes an initial state made from nothing the
    model computes."""

    def __init__(self, kind: str = "LSTM", bidirectional: bool = True, layers: int = 2, proj: int = 0,
                 h0: bool = False) -> None:
        super().__init__()
        self.h0 = h0
        self.embed = nn.Embedding(20, 6)
        extra = {"proj_size": proj} if proj else {}
        self.rnn = getattr(nn, kind)(6, 8, num_layers=layers, batch_first=True, bidirectional=bidirectional, **extra)
        self.head = nn.Linear((proj or 8) * (2 if bidirectional else 1), 3)

    def forward(self, ids):
        x = self.embed(ids)
        if self.h0:
            y, _ = self.rnn(x, torch.zeros(self.rnn.num_layers, ids.shape[0], self.rnn.hidden_size))
        else:
            y, _ = self.rnn(x)
        return self.head(y)


@pytest.mark.parametrize("kind,bidirectional,layers,proj", [
    ("LSTM", True, 2, 0), ("GRU", False, 1, 0), ("RNN", True, 3, 0), ("LSTM", True, 2, 4)])
def test_recurrent_hidden_units_are_pruned_in_every_layer_and_direction(kind, bidirectional, layers, proj):
    torch.manual_seed(0)
    model, ids = Recurrent(kind, bidirectional, layers, proj).eval(), torch.randint(0, 20, (2, 7))
    graph = trace(model, ids)
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[kind]
    hidden = _group_with(graph, "rnn.weight_hh_l0", 0)
    members = {("rnn.weight_ih_l0", 0), ("rnn.bias_hh_l0", 0), ("rnn.weight_hr_l0" if proj else "rnn.weight_hh_l0", 1)}
    assert members <= _members(hidden) and hidden.num_units == 8 and hidden.soft_exact
    assert ("embed.weight", 1) in _members(_group_with(graph, "rnn.weight_ih_l0", 1))  # the input follows the embedding
    p = plan(model, ids, 0.5, graph=graph)
    kept = _keep(p, "rnn.weight_hh_l0", 0)
    assert len(kept) == 4 * gates and all(kept[g * 4 + i] - kept[i] == g * 8 for g in range(gates) for i in range(4))
    small = _soft_equals_physical(model, ids, p)  # zeroed rows: constant gates, a state that stays zero
    assert (small.rnn.input_size, small.rnn.hidden_size, small.rnn.proj_size) == (3, 4, proj // 2)
    assert count_macs(small, ids).total < count_macs(model, ids).total / 2


def test_an_initial_state_from_outside_keeps_the_hidden_units():
    torch.manual_seed(0)
    model, ids = Recurrent("GRU", layers=1, bidirectional=False, h0=True).eval(), torch.randint(0, 20, (2, 7))
    p = plan(model, ids, 0.5)
    small = p.apply(copy.deepcopy(model))
    assert small.rnn.hidden_size == 8 and small.rnn.input_size == 3  # the state's width comes from its attribute
    with torch.no_grad():
        assert small(ids).shape == (2, 7, 3)


class PackedClassifier(nn.Module):
    """A padded batch of sequences of different lengths, packed for the recurrent layer; read out from the padded
    outputs (mean over each sequence's own steps) or from the last layer's final state."""

    def __init__(self, kind: str = "LSTM", readout: str = "padded", sort: bool = False) -> None:
        super().__init__()
        self.readout, self.sort = readout, sort
        self.embed = nn.Embedding(20, 6)
        self.rnn = getattr(nn, kind)(6, 8, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(16, 3)

    def forward(self, ids, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(ids), lengths, batch_first=True,
                                                   enforce_sorted=self.sort)
        y, state = self.rnn(packed)
        if self.readout == "state":
            h = state[0] if isinstance(state, tuple) else state
            return self.head(torch.cat([h[-2], h[-1]], dim=-1))
        y, lens = nn.utils.rnn.pad_packed_sequence(y, batch_first=True)
        return self.head(y.sum(1) / lens[:, None].to(y.dtype))


@pytest.mark.parametrize("kind,readout,sort", [("LSTM", "padded", False), ("GRU", "state", False),
                                               ("LSTM", "state", True)])
def test_packed_sequences_keep_their_features_through_packing_and_padding(kind, readout, sort):
    torch.manual_seed(0)
    model = PackedClassifier(kind, readout, sort).eval()
    ids, lengths = torch.randint(0, 20, (4, 7)), torch.tensor([7, 6, 4, 2])
    x = (ids, lengths if sort else lengths[[2, 0, 3, 1]])
    graph = trace(model, x)
    assert ("embed.weight", 1) in _members(_group_with(graph, "rnn.weight_ih_l0", 1))  # packing keeps the features
    assert ("head.weight", 1) in _members(_group_with(graph, "rnn.weight_hh_l1", 0))  # so does padding / the state
    p = plan(model, x, 0.5, graph=graph)
    phys = p.apply(copy.deepcopy(model))
    soft = p.apply(copy.deepcopy(model), soft=True)
    with torch.no_grad():
        a, b, dense = phys(*x), soft(*x), model(*x)
        unpruned = plan(model, x, 0.0, graph=graph).apply(copy.deepcopy(model))(*x)
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, dense, atol=1e-3)
    assert torch.equal(unpruned, dense)
    assert (phys.rnn.input_size, phys.rnn.hidden_size, phys.head.in_features) == (3, 4, 8)
    assert count_macs(phys, x).total < count_macs(model, x).total / 2


class TinyDetector(nn.Module):
    """Features -> roi_align per box, written into a zero buffer as torchvision's MultiScaleRoIAlign does -> MLP
    head; with ``scores``, also the locations whose score is positive (a count the data decides)."""

    def __init__(self, scores: bool = True) -> None:
        super().__init__()
        self.scores = scores
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.fc, self.cls, self.score = nn.Linear(8 * 2 * 2, 16), nn.Linear(16, 3), nn.Conv2d(8, 1, 1)

    def forward(self, x, boxes):
        from torchvision.ops import roi_align

        f = self.conv2(torch.relu(self.conv1(x)))
        pooled = torch.zeros(boxes.shape[0], f.shape[1], 2, 2)
        pooled[torch.arange(boxes.shape[0])] = roi_align(f, [boxes], output_size=2, spatial_scale=0.5)
        logits = self.cls(torch.relu(self.fc(pooled.flatten(1))))
        if not self.scores:
            return logits
        s = self.score(f).flatten()
        return logits, s[s > 0]


@pytest.mark.parametrize("scores", [False, True])
def test_roi_features_written_into_a_buffer_keep_their_channels(scores):
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = TinyDetector(scores).eval()
    x = (torch.randn(1, 3, 16, 16), torch.tensor([[0.0, 0.0, 8.0, 8.0], [4.0, 2.0, 15.0, 12.0], [1.0, 1.0, 3.0, 9.0]]))
    graph = trace(model, x)
    assert ("fc.weight", 1) in _members(_group_with(graph, "conv2.weight", 0))  # channel x 2 x 2 columns of fc
    p = plan(model, x, 0.5, graph=graph)
    assert len(_keep(p, "conv2.weight", 0)) == 4 and len(_keep(p, "fc.weight", 1)) == 16
    assert any("depend on the data" in n for n in p.notes) == scores  # the zero buffer alone is not data-sized
    if scores:  # any number of detections (-1), also after a JSON round trip
        assert all(-1 in shape for shape in p.output_shapes)
        assert Plan.from_json(p.to_json()).output_shapes == p.output_shapes
    phys, soft = p.apply(copy.deepcopy(model)), p.apply(copy.deepcopy(model), soft=True)
    replayed = Plan.from_json(p.to_json()).apply(copy.deepcopy(model), example_inputs=x)
    with torch.no_grad():
        a, b, dense = phys(*x), soft(*x), model(*x)
        assert all(torch.equal(u, v) for u, v in zip(*(t if scores else (t,) for t in (a, replayed(*x)))))
    for u, v in zip(*(t if scores else (t,) for t in (a, b))):
        assert u.shape == v.shape and torch.allclose(u, v, atol=1e-5)
    assert not torch.allclose(a[0] if scores else a, dense[0] if scores else dense, atol=1e-3)


class Deformable(nn.Module):
    def __init__(self, offset_groups: int = 1) -> None:
        from torchvision.ops import DeformConv2d

        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.offset = nn.Conv2d(8, 2 * offset_groups * 9, 3, padding=1)
        self.dconv = DeformConv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        f = torch.relu(self.conv1(x))
        return self.head(torch.relu(self.dconv(f, self.offset(f))))


@pytest.mark.parametrize("offset_groups", [1, 2])
def test_deformable_convolution_prunes_channels_and_keeps_its_offsets(offset_groups):
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model, x = Deformable(offset_groups).eval(), torch.randn(1, 3, 10, 10)
    p = plan(model, x, 0.5)
    rows = {s.name for s in p.slices if s.dim == 0}
    assert "offset.weight" not in rows and len(_keep(p, "dconv.weight", 0)) == 4  # one offset pair per kernel place
    assert ("conv1.weight" in rows) == (offset_groups == 1)  # offset groups split the input channels: kept
    small = _soft_equals_physical(model, x, p)
    assert (small.dconv.in_channels, small.dconv.out_channels) == (4 if offset_groups == 1 else 8, 4)


class CosineHead(nn.Module):
    """Features L2-normalised over their channels (``F.normalize``: ``x / norm.expand_as(x)``) before a linear head;
    ``literal`` also multiplies them by a scale expanded to a literal width."""

    def __init__(self, literal: bool = False) -> None:
        super().__init__()
        self.literal = literal
        self.conv, self.fc, self.scale = nn.Conv2d(3, 8, 3), nn.Linear(8, 4), nn.Parameter(torch.full((1,), 2.0))

    def forward(self, x):
        f = F.normalize(self.conv(x).mean((2, 3)), dim=1)
        return self.fc(f * self.scale.expand(8) if self.literal else f)


@pytest.mark.parametrize("literal", [False, True])
def test_a_broadcast_follows_the_channels_it_meets_unless_its_size_is_a_constant(literal):
    torch.manual_seed(0)
    model, x = CosineHead(literal).eval(), torch.randn(2, 3, 8, 8)
    p = plan(model, x, 0.5)
    if literal:  # expand(8) cannot shrink: the plan traces again with broadcasts kept, and says so
        assert p.slices == [] and any("expanded tensor" in n for n in p.notes)
        return
    assert len(_keep(p, "conv.weight", 0)) == 4 and len(_keep(p, "fc.weight", 1)) == 4 and not p.notes
    _soft_equals_physical(model, x, p)  # zeroed channels add nothing to the norm


class LogitsOnly(nn.Module):
    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, tokens):
        return self.lm(tokens)[0]


@pytest.mark.parametrize("tied", [False, True])
def test_the_lstm_language_model_loses_hidden_units_and_keeps_running_statefully(tied):
    from prunekit.models import LSTMLanguageModel

    torch.manual_seed(0)
    model = LSTMLanguageModel(vocab_size=50, hidden=16, layers=2, tie_weights=tied).eval()
    tokens = torch.randint(0, 50, (6, 2))
    # the model returns its (h, c) state, and outputs keep their shapes: the hidden units stay
    assert "lstm.weight_hh_l0" not in {s.name for s in plan(model, tokens, 0.5).slices}
    p = plan(LogitsOnly(model), tokens, 0.5)  # judged by its logits alone, it loses half of them
    small = p.apply(LogitsOnly(copy.deepcopy(model))).lm
    assert small.lstm.hidden_size == 8 and small.decoder.in_features == 8 and not p.notes
    assert (small.decoder.weight is small.embedding.weight) == tied
    with torch.no_grad():  # soft == physical, over two chunks that carry the state across
        soft = p.apply(LogitsOnly(copy.deepcopy(model)), soft=True).lm
        state_p, state_s = small.init_state(2), soft.init_state(2)
        for chunk in tokens.split(3):
            (a, state_p), (b, state_s) = small(chunk, state_p), soft(chunk, state_s)
            assert torch.allclose(a, b, atol=1e-5)
    assert state_p[0].shape == (2, 2, 8)
    assert count_macs(small, tokens).total < count_macs(model, tokens).total / 2


class TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.Sequential(HeadsByAttribute(literal=True), nn.GELU(), HeadsByAttribute(literal=True))
        self.mlp = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))

    def forward(self, x):
        return self.mlp(self.blocks(self.embed(x)))


def test_the_reshapes_that_scramble_heads_keep_their_channels_and_the_rest_is_pruned():
    torch.manual_seed(0)
    model, x = TwoBlocks(), torch.randn(1, 5, 4)
    p = plan(model, x, 0.5)
    pruned = {(s.name, s.dim) for s in p.slices}
    assert ("blocks.0.qkv.weight", 0) not in pruned and ("blocks.2.qkv.weight", 0) not in pruned  # heads kept
    assert {("embed.weight", 0), ("blocks.0.qkv.weight", 1), ("mlp.0.weight", 0)} <= pruned  # stream and MLP not
    assert len(p.notes) == 1 and "'blocks.0'" in p.notes[0] and "'blocks.2'" in p.notes[0] and "mended" in p.notes[0]
    _soft_equals_physical(model, x, p)


class CheckedWidth(nn.Module):
    """Checks its input's width against a size it keeps (as many modules do): fails before any shape differs."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim, self.proj = dim, nn.Linear(dim, dim)

    def forward(self, x):
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected width {self.dim}, got {x.shape[-1]}")
        return self.proj(x)


def test_a_module_class_whose_code_breaks_is_kept_whole_and_the_plan_says_so():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), CheckedWidth(8), nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    x = torch.randn(2, 4)
    p = plan(model, x, 0.5)
    pruned = {s.name for s in p.slices}
    assert not any(n.startswith(("0.", "2.")) for n in pruned) and "3.weight" in pruned  # its width kept, MLP pruned
    assert len(p.notes) == 1 and "CheckedWidth whole mended it" in p.notes[0]
    _soft_equals_physical(model, x, p)


def test_the_class_kept_whole_is_the_nearest_one_whose_code_is_not_torchs():
    from prunekit.structured.planning import _culprit

    model = nn.Sequential(TwoBlocks(), nn.ReLU())
    assert _culprit(model, "0.blocks.0.qkv") is HeadsByAttribute  # a Linear fails: the block feeding it is to blame
    assert _culprit(model, "0.blocks") is TwoBlocks  # nn.Sequential is torch's
    assert _culprit(model, "1") is None and _culprit(model, "") is None and _culprit(model, "nope") is None


class InputWidthAttention(nn.Module):
    """timm's EVA / PVT attention: the output is reshaped to ``(B, N, C)`` with ``C`` read from the input, so the
    attention width must shrink with the input's (no attribute can say so)."""

    def __init__(self, width: int = 12, heads: int = 3) -> None:
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class InputWidthBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 12)
        self.attn = nn.ModuleList([InputWidthAttention(), InputWidthAttention()])
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        x = self.embed(x)
        for a in self.attn:
            x = x + a(x)
        return self.head(x)


def test_an_attention_reshaped_to_its_input_width_shrinks_with_the_residual_stream():
    torch.manual_seed(0)
    model, x = InputWidthBlocks(), torch.randn(1, 5, 4)
    p = plan(model, x, 0.5)
    assert len(p.notes) == 1 and "tying the channels that every" in p.notes[0] and "InputWidthAttention" in p.notes[0]
    # 6 of 12 stream channels and 1 or 2 of 3 heads would not fit B, N, C: the stream goes in whole heads instead
    stream, heads = _keep(p, "embed.weight", 0), _keep(p, "attn.0.proj.weight", 1)
    assert stream == heads == _keep(p, "attn.1.proj.weight", 1) and len(stream) in (4, 8)
    assert all(stream[i] % 4 == 0 and stream[i + 3] == stream[i] + 3 for i in range(0, len(stream), 4))
    assert [u.set for u in p.modules if u.name in ("attn.0", "attn.1")] == [{"num_heads": len(stream) // 4}] * 2
    small = _soft_equals_physical(model, x, p)  # no norm over the stream: zeroed channels stay zero
    assert small.head.in_features == len(stream)


class OutDimAttention(InputWidthAttention):
    """As timm's TinyViT attention: the output is reshaped by ``self.out_dim`` (heads x head size)."""

    def __init__(self) -> None:
        super().__init__()
        self.out_dim = 12

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, self.out_dim)
        return self.proj(y)


class WindowBlock(nn.Module):
    """A block that reshapes its residual stream (as wide as its attention's ``out_dim``) before calling it."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = OutDimAttention()

    def forward(self, x):
        b, n, c = x.shape
        x = x.reshape(b * n // 5, 5, c)
        return (x + self.attn(x)).reshape(b, n, c)


def test_a_childs_size_is_judged_by_its_own_reshapes_when_its_forward_ran():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 12), WindowBlock(), nn.Linear(12, 3))
    x = torch.randn(1, 10, 4)
    p = plan(model, x, 0.5)  # the stream keeps 6 of 12 channels, the attention 1 or 2 of 3 heads
    heads = len(_keep(p, "1.attn.proj.weight", 1)) // 4
    assert len(_keep(p, "0.weight", 0)) == 6 and heads in (1, 2) and not p.notes
    assert {u.name: u.set for u in p.modules}["1.attn"] == {"num_heads": heads, "out_dim": 4 * heads}
    _soft_equals_physical(model, x, p)


class StdConv(nn.Conv2d):
    """Weight standardisation as timm's StdConv2d: batch_norm with batch statistics over each filter's inputs."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, eps=1e-6)
        return F.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride, self.padding)


def test_weight_standardisation_normalises_over_the_input_channels():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), StdConv(8, 4, 3, padding=1)).eval(), torch.randn(1, 3, 6, 6)
    graph = trace(model, x)
    assert [g.soft_exact for g in graph.groups] == [False]  # zeroed inputs would still count in the statistics
    p = plan(model, x, 0.5, graph=graph)
    with torch.no_grad():
        assert p.apply(copy.deepcopy(model))(x).shape == (1, 4, 6, 6)


def test_group_norm_with_one_group_keeps_one_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(1, 8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    x = torch.randn(1, 3, 5, 5)
    small = plan(model, x, 0.5).apply(copy.deepcopy(model))
    assert (small[1].num_groups, small[1].num_channels) == (1, 4) and small(x).shape == (1, 2, 5, 5)


class WidthBranch(nn.Module):
    """Shape-dependent control flow: the pruned model runs other operations than the traced one."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        if y.shape[1] > 4:
            y = torch.relu(y)
        return self.b(y)


def test_shape_dependent_control_flow_is_checked_by_output_shapes_only():
    model, x = WidthBranch(), torch.randn(1, 3, 4, 4)
    with pytest.warns(UserWarning, match="another sequence of operations"):
        p = plan(model, x, 0.5)
    assert p.verified and p.macs[1] < p.macs[0]


def test_bad_arguments_are_rejected():
    model, x = Residual(), torch.randn(1, 3, 5, 5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        plan(model, x, 1.0)
    with pytest.raises(ValueError, match="unknown structured criterion 'tailor'"):
        plan(model, x, 0.5, criterion="tailor")
    with pytest.raises(ValueError, match="one score per unit"):
        plan(model, x, 0.5, criterion=lambda group, tensors: torch.zeros(1))
    with pytest.raises(ValueError, match="round_to"):
        plan(model, x, 0.5, round_to=0)
    with pytest.raises(TypeError, match="Module"):
        trace("model", x)


def test_a_callable_criterion_decides():
    model, x = Residual(), torch.randn(1, 3, 5, 5)
    p = plan(model, x, 0.5, criterion=lambda group, tensors: torch.arange(group.num_units, dtype=torch.float32))
    assert _keep(p, "a.weight", 0) == [3, 4, 5]  # lowest scores (first units) go


def test_summary_is_readable():
    model, x = Concat(), torch.randn(1, 3, 4, 4)
    graph = trace(model, x)
    text = str(graph)
    assert "1 group," in text and "a, b, c" in text
    p = plan(model, x, 0.5, graph=graph)
    text = str(p)
    assert "MACs" in text and "x fewer" in text and "5 of 10 units" in text


def test_concatenated_layers_each_lose_the_same_fraction():
    """A group that concatenates two layers' channels prunes half of each, even when one layer's scores are all
    lower (ranking across layers would empty one of them)."""

    class Cat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
            self.c = nn.Conv2d(16, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.cat([self.a(x), self.b(x)], dim=1))

    torch.manual_seed(0)
    model = Cat()
    with torch.no_grad():
        model.a.weight.mul_(0.01)  # every channel of a scores below every channel of b
    x = torch.randn(2, 3, 8, 8)
    small = plan(model, x, sparsity=0.5, criterion="l2").apply(copy.deepcopy(model))
    assert small.a.out_channels == 4 and small.b.out_channels == 4 and small.c.in_channels == 8
