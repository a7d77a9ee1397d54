"""Structured-pruning criteria: hand-computed oracles (Taylor, BatchNorm scale, APoZ, mean activation), identities,
the distillation loss without labels, and one contract every built-in criterion passes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.calibration import record_input_gradients
from prunekit.structured import (
    ActivationScore,
    BatchNormScale,
    TaylorScore,
    criterion_names,
    normalize,
    plan,
    trace,
)


def _keep(p, name, dim):
    return list(next(s.keep for s in p.slices if s.name == name and s.dim == dim))


def _mlp() -> nn.Sequential:
    """h = relu(W1 x) with W1 = [[1, 0], [0, 1], [1, 1]]; out = W2 h with W2 = [1, -1, 0.5]; no biases."""
    model = nn.Sequential(nn.Linear(2, 3, bias=False), nn.ReLU(), nn.Linear(3, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        model[2].weight.copy_(torch.tensor([[1.0, -1.0, 0.5]]))
    return model


def test_taylor_matches_the_hand_computed_first_order_change():
    # x = [1, 2]: h = [1, 2, 3], out = 1 - 2 + 1.5 = 0.5. Loss (out - y)^2.
    # y = 2.5: dL/dout = -4, dL/dh = -4 * W2 = [-4, 4, -2], h * dL/dh = [-4, 8, -6]  -> |.| = [4, 8, 6]
    # y = -1.5: dL/dout = +4, h * dL/dh = [4, -8, 6]                                  -> |.| = [4, 8, 6]
    model, x = _mlp(), torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    graph = trace(model, x[:1])
    data = [(x, torch.tensor([[2.5], [-1.5]]))]  # float labels: MSE, the mean over the two examples
    paper = TaylorScore(data, normalize=False)  # |.| per example, then the mean over examples (Molchanov et al.)
    paper.prepare(model, graph)
    assert paper(graph.groups[0], {}).tolist() == pytest.approx([4.0, 8.0, 6.0])
    batch = TaylorScore(data, normalize=False, per_example=False)  # |mean over the batch|: the two cancel
    batch.prepare(model, graph)
    assert batch(graph.groups[0], {}).tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-12)
    normalised = TaylorScore(data)
    normalised.prepare(model, graph)
    assert normalised(graph.groups[0], {}).tolist() == pytest.approx([4 / math.sqrt(116), 8 / math.sqrt(116),
                                                                      6 / math.sqrt(116)])
    # the lowest score goes first: unit 0
    p = plan(model, x[:1], 1 / 3, criterion=TaylorScore(data))
    assert _keep(p, "0.weight", 0) == [1, 2]
    # by name, with the data passed to plan
    assert _keep(plan(model, x[:1], 1 / 3, criterion="taylor", data=data), "0.weight", 0) == [1, 2]


class TwoReaders(nn.Module):
    """Hidden units read by two consumers (as a residual stream is): their Taylor score sums both uses. The
    consumers' outputs are read again by ``d``: the gradient at ``c1``/``c2`` must flow through ``d``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.c1 = nn.Linear(6, 4)
        self.c2 = nn.Linear(6, 4)
        self.d = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.d(torch.relu(self.c1(h) + self.c2(h)))


def test_taylor_at_consumer_inputs_equals_weight_times_gradient_of_the_consumers():
    """Identity: sum_batch x_j * dL/dx_j at a linear consumer's input = sum_i W_ij * dL/dW_ij (column j)."""
    torch.manual_seed(0)
    model = TwoReaders()
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    graph = trace(model, x[:1])
    hidden, mixed = graph.groups
    assert [c.name for c in hidden.consumers] == ["c1", "c2"] and [c.name for c in mixed.consumers] == ["d"]
    score = TaylorScore([(x, y)], normalize=False, per_example=False)
    score.prepare(model, graph)
    F.cross_entropy(model(x), y).backward()
    expected = ((model.c1.weight * model.c1.weight.grad).sum(0) + (model.c2.weight * model.c2.weight.grad).sum(0))
    expected = expected.detach().abs()
    assert score(hidden, {}).tolist() == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-9)
    assert float(expected.min()) > 0
    expected = (model.d.weight * model.d.weight.grad).sum(0).detach().abs()
    assert score(mixed, {}).tolist() == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-9)


def test_record_input_gradients_writes_no_grad_and_removes_its_hooks():
    model = _mlp()
    seen = []

    class Acc:
        def add_batch(self, x, grad):
            seen.append((x.shape, grad.shape))

    with record_input_gradients({"out": model[2]}, {"out": Acc()}) as tape:
        tape.backward(model(torch.ones(4, 2)).sum())
    assert seen == [((4, 3), (4, 3))]
    assert all(p.grad is None for p in model.parameters())
    assert not model[2]._forward_pre_hooks


def test_bn_scale_removes_the_channels_with_the_smallest_abs_gamma():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 3)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.9, -0.05, 2.0, 0.01, -3.0, 0.2]))
    p = plan(model, torch.randn(1, 3, 8, 8), 0.5, criterion="bn_scale")
    assert _keep(p, "0.weight", 0) == [0, 2, 4]  # |gamma| 0.05, 0.01 and 0.2 go; the sign does not matter


def test_bn_scale_falls_back_to_l1_where_a_group_has_no_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 8),
                          nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.randn(1, 3, 6, 6)
    p = plan(model, x, 0.5, criterion="bn_scale")
    assert any("no BatchNorm" in n and "[1]" in n for n in p.notes)
    assert _keep(p, "4.weight", 0) == _keep(plan(model, x, 0.5, criterion="l1"), "4.weight", 0)
    with pytest.raises(RuntimeError, match="prepare"):
        BatchNormScale()(trace(model, x).groups[0], dict(model.named_parameters()))


def test_apoz_and_mean_activation_prune_dead_and_quiet_units_first():
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, -1.0], [0.01, 0.01], [0.0, 1.0]]))
        model[0].bias.copy_(torch.tensor([0.0, -5.0, 0.0, 0.0]))  # unit 1 never fires; unit 2 fires weakly
    data = [torch.rand(32, 2) + 0.1]  # positive inputs: units 0, 2, 3 always fire
    apoz = plan(model, data[0][:1], 0.25, criterion="apoz", data=data)
    assert _keep(apoz, "0.weight", 0) == [0, 2, 3]
    mean = plan(model, data[0][:1], 0.5, criterion="activation", data=data)
    assert _keep(mean, "0.weight", 0) == [0, 3]
    score = ActivationScore(data, statistic="apoz", normalize=False)
    score.prepare(model, trace(model, data[0][:1]))
    assert score.scores[0].tolist() == pytest.approx([1.0, 0.0, 1.0, 1.0])  # 1 - APoZ


def test_taylor_without_labels_distils_from_the_model_itself():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    data = [torch.randn(16, 4) for _ in range(2)]  # bare inputs: no labels
    graph = trace(model, data[0][:1])
    auto = TaylorScore(data, normalize=False)
    auto.prepare(model, graph)  # the model is its own teacher: KL has zero gradient, hard labels are used
    assert float(auto.scores[0].sum()) > 0
    with pytest.raises(ValueError, match="zero"):
        TaylorScore(data, loss="kl")
    teacher = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    kl = TaylorScore(data, loss="kl", teacher=teacher, normalize=False)
    kl.prepare(model, graph)
    assert float(kl.scores[0].sum()) > 0
    stored = TaylorScore(data, loss="mse", teacher=[teacher(b).detach() for b in data], normalize=False)
    stored.prepare(model, graph)
    assert float(stored.scores[0].sum()) > 0
    with pytest.raises(ValueError, match="needs calibration data"):
        plan(model, data[0][:1], 0.5, criterion="taylor")
    with pytest.raises(ValueError, match="unknown loss"):
        TaylorScore(data, loss="hinge")


def test_taylor_scores_attention_heads_through_their_parameters():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, nhead=4, dim_feedforward=32, batch_first=True, dropout=0.0)
    model = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
    data = [torch.randn(2, 5, 16)]
    graph = trace(model, data[0][:1])
    heads = [g.index for g in graph.groups if any(r.startswith("heads") for r in g.rules)]
    assert heads and all(not graph.groups[i].consumers for i in heads)  # out_proj is never called as a module
    score = TaylorScore(data)
    p = plan(model, data[0][:1], 0.5, criterion=score, graph=graph)
    assert score.fallback_groups == heads and any("parameters" in n for n in p.notes)
    assert all(bool(torch.isfinite(score.scores[i]).all()) and float(score.scores[i].sum()) > 0 for i in heads)
    assert [g.pruned for g in p.groups if g.index in heads] == [2]


def test_every_built_in_criterion_scores_every_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,)))]
    graph = trace(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name in criterion_names():
        p = plan(model, x, 0.5, criterion=name, data=data, graph=graph)
        assert p.criterion == name
        assert [g.pruned for g in p.groups] == [4, 3], name
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), f"{name} changed the model"
        assert all(p_.grad is None for p_ in model.parameters()), f"{name} wrote .grad"


def test_normalize_keeps_minus_infinity_and_zeros():
    assert normalize(torch.tensor([0.0, 0.0])).tolist() == [0.0, 0.0]
    out = normalize(torch.tensor([-math.inf, 3.0, 4.0]))
    assert out[0] == -math.inf and out[1:].tolist() == pytest.approx([0.6, 0.8])
