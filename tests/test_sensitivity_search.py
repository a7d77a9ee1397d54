"""Sensitivity curves and the accuracy-constrained search, on constructed problems with known answers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit import Pruner
from prunekit.search import search
from prunekit.sensitivity import Sensitivity, sensitivity


def two_layer():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_sensitivity_restores_model_and_finds_the_sensitive_layer():
    model = two_layer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(256, 8)
    ref = model(x).detach()
    with torch.no_grad():  # make layer 2 dominate the output: pruning it hurts more
        model[2].weight.mul_(10)
    ref = model(x).detach()

    def score(m):
        with torch.no_grad():
            return -float((m(x) - ref).pow(2).mean())

    curves = sensitivity(model, score, [0.25, 0.5, 0.75])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items() if k != "2.weight")
    assert curves.baseline == 0.0
    for name in curves.curves:
        drops = curves.drop(name)
        assert drops == sorted(drops) and drops[0] >= 0  # more pruning, more damage
    assert curves.drop("2.weight")[-1] > curves.drop("0.weight")[-1]


def test_allocate_hits_target_and_favours_robust_layers():
    s = Sensitivity([0.2, 0.4, 0.6, 0.8], 1.0,
                    {"robust": [1.0, 1.0, 0.99, 0.98], "fragile": [0.9, 0.7, 0.5, 0.2]},
                    {"robust": 1000, "fragile": 1000})
    alloc = s.allocate(0.5)
    assert alloc["robust"] > alloc["fragile"]
    assert (alloc["robust"] + alloc["fragile"]) / 2 == pytest.approx(0.5, abs=1e-6)
    model = nn.Sequential(nn.Linear(10, 100, bias=False), nn.Linear(100, 10, bias=False))
    pruner = Pruner(model, 0.5, overrides={"0.weight": alloc["robust"], "1.weight": alloc["fragile"]})
    pruner.step()
    assert pruner.masks.sparsity() == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ValueError, match="only reaches"):
        Sensitivity([0.2], 1.0, {"a": [1.0]}, {"a": 10}).allocate(0.5)


def test_max_sparsity_interpolates():
    s = Sensitivity([0.5, 1 - 1e-9], 1.0, {"a": [0.9, 0.5]}, {"a": 1})
    # drop is 0 at 0, 0.1 at 0.5: a budget of 0.05 crosses halfway
    assert s.max_sparsity("a", 0.05) == pytest.approx(0.25)


def density_metric(model):
    return float(sum((m.weight != 0).sum() for m in model if isinstance(m, nn.Linear))) / 1200


def test_search_finds_the_threshold_with_few_trials():
    model = nn.Sequential(nn.Linear(20, 40), nn.Linear(40, 10))  # 1200 weights
    calls = []
    result = search(model, lambda m, p: calls.append(p.masks.sparsity()), density_metric, max_drop=0.2,
                    tolerance=0.005)
    assert result.found and 0.195 <= result.sparsity <= 0.2 + 1e-9
    assert len(calls) == len(result.trials) <= 12
    # the accepted path only ever adds zeros; the model holds the accepted masks
    accepted = [t.sparsity for t in result.trials if t.passed]
    assert accepted == sorted(accepted)
    assert density_metric(model) == pytest.approx(1 - result.sparsity, abs=1e-3)


def test_search_when_nothing_meets_the_constraint_returns_dense():
    model = nn.Sequential(nn.Linear(20, 40), nn.Linear(40, 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = search(model, lambda m, p: None, lambda m: 1.0 if density_metric(m) == 1.0 else 0.0, max_drop=0.01)
    assert not result.found and result.sparsity == 0.0
    assert "returning the dense model" in result.message
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_search_bad_input():
    with pytest.raises(TypeError, match="must return a number"):
        search(two_layer(), lambda m, p: None, lambda m: "good")
    with pytest.raises(ValueError, match="max_drop"):
        search(two_layer(), lambda m, p: None, lambda m: 1.0, max_drop=-1)
