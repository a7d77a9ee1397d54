"""Gradual/iterative structured pruning (StructuredPruner), whole-block removal, the before/after report and the
``prunekit prune --structured`` command line."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit import Gradual, Iterative
from prunekit.flops import count_macs
from prunekit.models import get_model
from prunekit.structured import (
    StructuredPruner,
    drop_blocks,
    load,
    plan,
    report,
    residual_blocks,
    save,
)
from prunekit.train import TrainConfig, train


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.c1(x)))
        x = F.relu(self.bn2(self.c2(x)) + x)
        return self.fc2(F.relu(self.fc1(x.mean((2, 3)))))


def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 4, (8,), generator=gen)) for _ in range(n)]


def _zero_units(pruner: StructuredPruner) -> dict[int, set[int]]:
    """Units whose every parameter slice is zero, per group."""
    params = dict(pruner.model.named_parameters())
    out = {}
    for g in pruner.graph.groups:
        zero = set(range(g.num_units))
        for m in g.members:
            if m.name not in params:
                continue
            t = params[m.name].detach()
            per = t.abs().movedim(m.dim, 0).reshape(t.shape[m.dim], -1).sum(1)
            for pos, u in enumerate(m.unit.tolist()):
                if u >= 0 and per[pos] != 0:
                    zero.discard(u)
        out[g.index] = zero
    return out


@pytest.mark.parametrize("criterion", ["l1", "taylor"])
def test_gradual_structured_pruning_keeps_pruned_channels_zero_and_ends_smaller_with_equal_outputs(criterion):
    torch.manual_seed(0)
    model = ConvNet()
    x = torch.randn(1, 3, 8, 8)
    data = _batches(2, seed=1)
    schedule = Gradual(start=0, end=6, every=2)
    pruner = StructuredPruner(model, x, 0.5, schedule=schedule, criterion=criterion, data=data)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)  # would revive zeros
    previous: dict[int, set[int]] = {g.index: set() for g in pruner.graph.groups}
    counts = []
    for step, (xb, yb) in enumerate(_batches(10, seed=2)):
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
        zero = _zero_units(pruner)
        for g, units in previous.items():
            assert units <= zero[g], f"step {step}: a pruned unit of group {g} came back"
        pruned = {g: set(m.nonzero().squeeze(1).tolist()) for g, m in pruner.pruned.items()}
        assert all(pruned[g] <= zero[g] for g in pruned)
        previous = pruned
        counts.append(sum(len(v) for v in pruned.values()))
    assert counts == sorted(counts) and 0 < counts[2] < counts[-1] == 8 + 16  # half of 16 (c1 + c2, residual) and 32
    model.eval()
    with torch.no_grad():
        soft = model(x)
        before = count_macs(model, x).total
        small = pruner.finalize()
        assert small is model and small.c1.out_channels == 8 and small.fc1.out_features == 16
        assert torch.allclose(small(x), soft, atol=1e-5)
        assert count_macs(small, x).total < before / 2
    with pytest.raises(RuntimeError, match="finalized"):
        pruner.step()


def test_iterative_budget_pruning_through_the_train_loop_and_resuming():
    torch.manual_seed(0)
    model = ConvNet()
    x = torch.randn(1, 3, 8, 8)
    data = torch.utils.data.TensorDataset(torch.randn(64, 3, 8, 8), torch.randint(0, 4, (64,)))
    pruner = StructuredPruner(model, x, macs=0.5, schedule=Iterative(rounds=2, every=4), criterion="l2")
    train(model, data, TrainConfig(epochs=2, batch_size=16, lr=0.05), pruner=pruner, progress=False)
    assert [h["step"] for h in pruner.history] == [0, 4]
    macs = [h["macs"] for h in pruner.history]
    dense = pruner.graph.state.macs
    assert dense > macs[0] > macs[1] and macs[1] <= 0.5 * dense and macs[0] <= 0.5**0.5 * dense
    state = json.loads(json.dumps({k: v for k, v in pruner.state_dict().items() if k != "pruner"}))
    state["pruner"] = pruner.pruner.state_dict()
    again = StructuredPruner(copy.deepcopy(model), x, macs=0.5, schedule=Iterative(rounds=2, every=4))
    again.load_state_dict(state)
    assert again.step_count == 8 and again.plan.slices == pruner.plan.slices
    small = pruner.finalize()
    assert count_macs(small, x).total <= 0.5 * dense


def test_drop_blocks_leaves_a_training_model_as_it_was():
    torch.manual_seed(0)
    model = get_model("resnet20").train()
    before = copy.deepcopy(model.state_dict())
    drop_blocks(model, torch.randn(1, 1, 28, 28), [torch.randn(8, 1, 28, 28)], n=1)
    after = model.state_dict()
    assert model.training and all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics too


def test_residual_blocks_are_found_and_the_least_harmful_is_dropped(tmp_path):
    torch.manual_seed(0)
    model = get_model("resnet20").eval()
    x = torch.randn(1, 1, 28, 28)
    assert residual_blocks(model, x) == ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1",
                                         "layer3.2"]  # blocks with a projection shortcut are not identity-like
    with torch.no_grad():
        model.layer2[2].bn2.weight.mul_(1e-4)
        model.layer2[2].bn2.bias.zero_()  # that block's branch now adds almost nothing
    data = [torch.randn(8, 1, 28, 28)]
    p = drop_blocks(model, x, data, n=1)
    assert [(u.name, u.replace) for u in p.modules] == [("layer2.2", "torch.nn.Identity")]
    small = p.apply(copy.deepcopy(model))
    with torch.no_grad():
        dense, out = model(x), small(x)
    assert out.shape == dense.shape and torch.allclose(out, dense, atol=1e-2 * float(dense.abs().max()))
    assert p.macs[1] < p.macs[0] and p.params[1] < p.params[0]
    # then channels, on the smaller model; both plans are stored and replayed on a fresh model
    channels = plan(small, x, 0.5)
    channels.apply(small)
    path = save(small, tmp_path / "small.safetensors", [p, channels])
    fresh = get_model("resnet20")
    loaded = load(path, fresh, example_inputs=x).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))


def test_report_compares_parameters_macs_and_measured_latency(tmp_path):
    torch.manual_seed(0)
    dense = get_model("lenet5")
    x = torch.zeros(1, 1, 28, 28)
    small = plan(dense, x, 0.5).apply(copy.deepcopy(dense))
    r = report(dense, small, x, repeats=3, warmup=1)
    names = [row.name for row in r.rows]
    assert names == ["conv1", "conv2", "pool", "fc1", "fc2", "other"]  # named_modules() order
    conv2 = r.rows[1]
    assert conv2.macs == (count_macs(dense, x).by_module["conv2"], count_macs(small, x).by_module["conv2"])
    assert conv2.params == (25050, 25 * 10 * 25 + 25) and conv2.latency[0] > 0
    assert r.macs == (count_macs(dense, x).total, count_macs(small, x).total) and r.speedup > 0
    text = str(r)
    assert "latency" in text and "MACs" in text and "fewer" in text
    doc = json.loads(r.to_json(tmp_path / "r.json"))
    assert doc["totals"]["macs"] == list(r.macs) and len(doc["totals"]["latency"][0]["samples"]) == 3
    r.plot(tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_cli_prune_structured_runs_and_resumes(tmp_path, capsys):
    from prunekit.cli import main

    out = tmp_path / "run"
    args = ["prune", "--structured", "--model", "lenet5", "--data", "mnist", "--train-subset", "2048", "--epochs",
            "1", "--criterion", "taylor", "--macs", "0.5", "--schedule", "gradual", "--end", "0.5",
            "--calibration-batches", "2", "--round-to", "2", "--allocation", "uniform", "--quiet", "--out", str(out)]
    assert main(args) == 0
    assert json.loads((out / "config.json").read_text())["structured"]["allocation"] == "uniform"
    for name in ("config.json", "checkpoint.safetensors", "model.safetensors", "report.txt", "report.json",
                 "report.png", "metrics.json", "history.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["macs"][1] <= 0.5 * metrics["macs"][0]
    assert metrics["test_accuracy"] == pytest.approx(metrics["soft_test_accuracy"], abs=1e-9)
    assert metrics["test_accuracy"] > 0.5
    small = load(out / "model.safetensors", get_model("lenet5"), example_inputs=torch.zeros(1, 1, 28, 28))
    assert count_macs(small, torch.zeros(1, 1, 28, 28)).total == metrics["macs"][1]
    capsys.readouterr()
    assert main(args) == 0
    assert "already complete" in capsys.readouterr().out
    assert main(["prune", "--structured", "--model", "lenet5", "--data", "mnist", "--criterion", "magnitude",
                 "--out", str(tmp_path / "bad")]) == 2
    assert main(["prune", "--structured", "--model", "lenet5", "--data", "mnist", "--criterion", "l2", "--macs",
                 "0.5", "--allocation", "lamp", "--epochs", "1", "--out", str(tmp_path / "bad2")]) == 2
    assert "--allocation lamp is not for structured pruning" in capsys.readouterr().err


def test_uniform_budget_pruning_removes_the_same_share_of_every_group_at_each_update():
    torch.manual_seed(0)
    model = ConvNet()
    x = torch.randn(1, 3, 8, 8)
    pruner = StructuredPruner(model, x, macs=0.5, allocation="uniform", schedule=Iterative(rounds=2, every=4))
    first = pruner.update(1 - 0.5**0.5)
    kept_first = {s.index: s.pruned for s in first.groups}
    second = pruner.update()
    dense = pruner.graph.state.macs
    assert second.macs[1] <= 0.5 * dense < first.macs[1]
    for plan_ in (first, second):
        shares = [s.pruned / s.units for s in plan_.groups]
        assert max(shares) - min(shares) <= max(1 / s.units for s in plan_.groups) + 1e-9
    assert all(s.pruned >= kept_first[s.index] for s in second.groups)  # units stay pruned
    with pytest.raises(ValueError, match="spreads a budget"):
        StructuredPruner(ConvNet(), x, 0.5, allocation="uniform")
    with pytest.raises(ValueError, match="once"):
        StructuredPruner(ConvNet(), x, macs=0.5, allocation="latency")
