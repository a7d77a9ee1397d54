"""Lottery tickets: level densities, rewinding, controls, resumable levels, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit import lottery


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 40), nn.ReLU(), nn.Linear(40, 20), nn.ReLU(), nn.Linear(20, 3))


class Recorder:
    """A train_fn that runs a few SGD steps and records the weights it starts from."""

    def __init__(self, steps=5, fail_at_call=None, first_call=0):
        self.starts = []
        self.steps = steps
        self.calls = first_call  # the data of call i is fixed by i, so a resumed run sees the same data
        self.fail_at_call = fail_at_call

    def __call__(self, model, pruner, on_step):
        self.calls += 1
        if self.fail_at_call == self.calls:
            raise KeyboardInterrupt
        self.starts.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        g = torch.Generator().manual_seed(self.calls)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for step in range(1, self.steps + 1):
            x = torch.randn(16, 10, generator=g)
            nn.functional.cross_entropy(model(x), torch.randint(0, 3, (16,), generator=g)).backward()
            opt.step()
            opt.zero_grad()
            pruner.step()
            on_step(step)
        return {"accuracy": float(pruner.masks.density()), "steps": float(self.steps)}


def test_levels_rates_and_output_layer_at_half_rate():
    ticket = lottery.find(net(), Recorder(), rounds=3, rate=0.2)
    sizes = {"0.weight": 400, "2.weight": 800, "4.weight": 60}
    for lv, prev in zip(ticket.levels[1:], ticket.levels):
        assert lv.density < prev.density
    # after 3 rounds: hidden layers together at 0.8^3, the output layer at 0.9^3 (rounded per scope)
    mask = ticket.masks
    hidden_kept = int(mask["0.weight"].sum() + mask["2.weight"].sum())
    assert hidden_kept == 1200 - round((1 - 0.8**3) * 1200)
    assert int(mask["4.weight"].sum()) == 60 - round((1 - 0.9**3) * 60)
    assert ticket.levels[-1].density == pytest.approx(mask.num_kept() / sum(sizes.values()))


def test_rewind_to_init_and_masks_only_shrink():
    model = net()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    rec = Recorder()
    ticket = lottery.find(model, rec, rounds=2, rate=0.3, allocation="uniform")
    # every level after the dense one starts from the initial weights, with pruned entries zeroed
    for start in rec.starts[1:]:
        for name in ("0.weight", "2.weight", "4.weight"):
            kept = start[name] != 0
            assert torch.equal(start[name][kept], init[name][kept])
    level_masks = [start["0.weight"] != 0 for start in rec.starts[1:]]
    assert not (level_masks[1] & ~level_masks[0]).any()
    assert ticket.rewind_state["0.weight"].equal(init["0.weight"])


def test_rewind_to_step_k():
    model = net()
    seen = {}

    def train_fn(m, pruner, on_step):
        result = Recorder(steps=4)(m, pruner, lambda step: (seen.setdefault(step, m[0].weight.detach().clone()),
                                                             on_step(step)))
        return result

    ticket = lottery.find(model, train_fn, rounds=1, rewind=2)
    assert torch.equal(ticket.rewind_state["0.weight"], seen[2])


def test_rewind_beyond_training_is_an_error():
    with pytest.raises(ValueError, match="beyond the dense training run"):
        lottery.find(net(), Recorder(steps=3), rounds=1, rewind=50)


def test_controls_same_sparsity_different_weights_or_positions():
    model = net()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    rec = Recorder()
    ticket = lottery.find(model, rec, rounds=1, rate=0.5, controls=["reinit", "random_mask"])
    assert set(ticket.levels[1].controls) == {"reinit", "random_mask"}
    # calls: dense, ticket level 1, reinit control, random-mask control
    ticket_start, reinit_start, random_start = rec.starts[1], rec.starts[2], rec.starts[3]
    tm, rm = ticket_start["0.weight"] != 0, reinit_start["0.weight"] != 0
    assert torch.equal(tm, rm)  # same mask
    assert not torch.equal(reinit_start["0.weight"][rm], init["0.weight"][rm])  # new weights
    rand = random_start["0.weight"] != 0
    assert int(rand.sum()) == int(tm.sum()) and not torch.equal(rand, tm)  # same sparsity, other positions
    assert torch.equal(random_start["0.weight"][rand], init["0.weight"][rand])  # original init


def test_resume_skips_finished_levels(tmp_path):
    full = lottery.find(net(), Recorder(), rounds=3, out_dir=tmp_path / "a")
    broken = Recorder(fail_at_call=3)
    with pytest.raises(KeyboardInterrupt):
        lottery.find(net(), broken, rounds=3, out_dir=tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").glob("level_*")) == ["level_00.safetensors",
                                                                       "level_01.safetensors"]
    again = Recorder(first_call=2)
    resumed = lottery.find(net(), again, rounds=3, out_dir=tmp_path / "b")
    assert again.calls == 4  # only levels 2 and 3 were trained
    assert resumed.masks.equal(full.masks)
    assert [lv.density for lv in resumed.levels] == [lv.density for lv in full.levels]
    with pytest.raises(ValueError, match="another configuration"):
        lottery.find(net(), Recorder(), rounds=4, out_dir=tmp_path / "b")


@pytest.mark.parametrize("kwargs, match", [
    ({"rate": 0.0}, r"in \(0, 1\)"), ({"rate": 1.2}, r"in \(0, 1\)"), ({"rounds": 0}, ">= 1"),
    ({"rewind": "start"}, "rewind"), ({"controls": ["shuffle"]}, "unknown controls"),
    ({"allocation": "erk"}, "global' or 'uniform"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lottery.find(net(), Recorder(), **kwargs)


def test_train_fn_must_return_numbers():
    with pytest.raises(TypeError, match="dict of numbers"):
        lottery.find(net(), lambda m, p, s: None, rounds=1)
