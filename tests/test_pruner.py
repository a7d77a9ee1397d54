"""Pruner invariants: in-place masks, identity, deepcopy, state_dict, compile, schedules in a real loop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunekit
from prunekit import Gradual, Iterative, Manual, OneShot, Pruner
from prunekit.train import TrainConfig, make_optimizer, prune_iteratively


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def sgd_steps(model, pruner, n, opt=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(n):
        x = torch.randn(8, 16, generator=g)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
    return opt


def test_prune_one_shot_exact_and_in_place():
    model = mlp()
    ids = {n: id(p) for n, p in model.named_parameters()}
    pruner = prunekit.prune(model, sparsity=0.9)
    assert {n: id(p) for n, p in model.named_parameters()} == ids
    weights = [model[0].weight, model[2].weight, model[4].weight]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    assert zeros == round(0.9 * total)
    assert pruner.masks.num_pruned() == zeros
    # biases untouched
    assert all((m.bias != 0).all() for m in (model[0], model[2], model[4]))
    for name, m in pruner.masks.items():
        assert m.dtype == torch.bool


def test_masks_cost_one_byte_per_element_and_no_extra_state():
    model = mlp()
    keys = set(model.state_dict())
    pruner = prunekit.prune(model, sparsity=0.5)
    assert set(model.state_dict()) == keys  # no weight_orig / weight_mask
    for name, p in pruner.params.items():
        assert pruner.masks[name].element_size() * pruner.masks[name].numel() == p.numel()
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_all_ones_mask_leaves_forward_and_backward_unchanged():
    a, b = mlp(), mlp()
    pruner = Pruner(b, sparsity=0.0)
    pruner.step()
    x = torch.randn(5, 16)
    a(x).sum().backward()
    b(x).sum().backward()
    for (_, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb) and torch.equal(pa.grad, pb.grad)


def test_zeros_stay_zero_under_momentum_and_optimizer_keeps_working():
    model = mlp()
    pruner = prunekit.prune(model, sparsity=0.8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sgd_steps(model, pruner, 5)
    for name, m in pruner.masks.items():
        p = dict(model.named_parameters())[name]
        assert (p[~m] == 0).all()
        assert not torch.equal(p[m], before[name][m])  # kept weights trained


def test_mask_gradients():
    model = mlp()
    pruner = prunekit.prune(model, sparsity=0.5)
    model(torch.randn(4, 16)).sum().backward()
    pruner.mask_gradients()
    for name, m in pruner.masks.items():
        assert (dict(model.named_parameters())[name].grad[~m] == 0).all()


def test_gradual_schedule_drives_sparsity_in_a_loop():
    model = mlp()
    sched = Gradual(start=2, end=12, every=2)
    pruner = Pruner(model, sparsity=0.8, schedule=sched)
    seen = []
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for t in range(16):
        model(torch.randn(4, 16, generator=g)).sum().backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
        seen.append(pruner.masks.sparsity())
        expect = sched.sparsity(t, 0.8)
        total = pruner.masks.numel()
        assert abs(pruner.masks.num_pruned() - expect * total) <= 0.5 + 1e-9
    assert seen == sorted(seen)
    assert seen[-1] == pytest.approx(0.8, abs=1 / pruner.masks.numel())


def test_iterative_rounds_compound():
    model = mlp()
    pruner = Pruner(model, sparsity=0.75, schedule=Iterative(rounds=2, every=3))
    sgd_steps(model, pruner, 3)
    assert pruner.masks.sparsity() == pytest.approx(0.5, abs=1e-3)
    sgd_steps(model, pruner, 3)
    assert pruner.masks.sparsity() == pytest.approx(0.75, abs=1e-3)


def test_two_rounds_at_p_reach_one_minus_one_minus_p_squared():
    model = mlp()
    p = 0.3
    _, log = prune_iteratively(model, 1 - (1 - p) ** 2, 2, lambda pr, i: None, lambda m: 0.0)
    assert log[1]["sparsity"] == pytest.approx(p, abs=1e-3)
    assert log[2]["sparsity"] == pytest.approx(1 - (1 - p) ** 2, abs=1e-3)


def test_deepcopy_state_dict_strict_and_fresh_instance():
    model = mlp()
    pruner = prunekit.prune(model, sparsity=0.7)
    clone = copy.deepcopy(model)
    x = torch.randn(3, 16)
    assert torch.equal(clone(x), model(x))
    fresh = mlp(seed=1)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(fresh(x), model(x))
    # the pruner itself deep-copies with its model
    p2 = copy.deepcopy(pruner)
    assert p2.masks.equal(pruner.masks) and p2.model is not pruner.model


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_re_zeroing_splits_large_tensors_across_threads_exactly(threads):
    """The native pass cuts tensors of >= 32768 elements into one chunk per thread (torch's split): every pruned
    entry of every chunk, including an odd-sized tail, must be zeroed, and no kept entry touched."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(301, 257), nn.ReLU(), nn.Linear(257, 7), nn.ReLU(), nn.Linear(7, 40001))
    pruner = prunekit.prune(model, sparsity=0.6, allocation="uniform")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # every pruned weight is now 1, every kept weight w + 1
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pruner.apply()
    finally:
        torch.set_num_threads(old)
    for name, mask in pruner.masks.items():
        w = dict(model.named_parameters())[name]
        assert bool((w[~mask] == 0).all()), name
        assert torch.equal(w[mask], before[name][mask] + 1.0), name


def test_re_zeroing_follows_new_storage_and_copies():
    """apply() caches pointers for its native call: new storage (param.data = ..., a deep copy) must be re-zeroed."""
    model = mlp()
    pruner = prunekit.prune(model, sparsity=0.7)
    weight, mask = model[0].weight, pruner.masks["0.weight"]
    pruner.apply()  # builds the cached call
    weight.data = torch.ones_like(weight)  # new storage behind the same Parameter
    pruner.apply()
    assert torch.equal(weight.detach() != 0, mask)
    p2 = copy.deepcopy(pruner)
    with torch.no_grad():
        for w in p2.params.values():
            w.fill_(1.0)
    p2.apply()
    assert all(torch.equal(w.detach() != 0, p2.masks[n]) for n, w in p2.params.items())
    assert torch.equal(weight.detach() != 0, mask)  # the original is untouched by the copy's re-zeroing
    with torch.no_grad():
        weight.fill_(2.0)
    pruner.apply()  # the original's cached call still targets its own tensors
    assert torch.equal(weight.detach() != 0, mask)


def test_torch_compile_sees_in_place_pruning():
    model = mlp()
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(3, 16)
    compiled(x)
    pruner = Pruner(compiled, sparsity=0.5)  # unwraps the compiled module
    assert pruner.model is model
    pruner.step()
    assert torch.allclose(compiled(x), model(x))
    assert (model[0].weight == 0).float().mean() > 0.3
    # train through the compiled module: zeros stay zero, kept weights move
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    params = dict(model.named_parameters())
    before = {n: params[n].detach().clone() for n in pruner.masks}
    for _ in range(3):
        compiled(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
    for name, mask in pruner.masks.items():
        assert (params[name][~mask] == 0).all()
    assert any(not torch.equal(params[n][m], before[n][m]) for n, m in pruner.masks.items())
    assert torch.allclose(compiled(x), model(x))


def test_transformer_encoder_trains_several_steps():
    # torch.nn.utils.prune fails here at the second step: MultiheadAttention reads out_proj.weight directly
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True, dropout=0.0)
    enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    pruner = Pruner(enc, sparsity=0.5, schedule=Gradual(start=0, end=4, every=1))
    assert "layers.0.self_attn.out_proj.weight" in pruner.params
    opt = torch.optim.Adam(enc.parameters(), lr=1e-3)
    for _ in range(5):
        enc(torch.randn(2, 6, 32)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
    assert pruner.masks.sparsity() == pytest.approx(0.5, abs=1e-4)
    w = enc.layers[1].self_attn.out_proj.weight
    assert (w[~pruner.masks["layers.1.self_attn.out_proj.weight"]] == 0).all()
    # the query/key/value projections, a raw parameter of MultiheadAttention, are pruned by default too
    qkv = enc.layers[1].self_attn.in_proj_weight
    mask = pruner.masks["layers.1.self_attn.in_proj_weight"]
    assert (qkv[~mask] == 0).all() and 0.2 < 1 - mask.float().mean() < 0.8
    with torch.no_grad():  # and the layer computes with them: its output is that of the same weights, masked
        ref = copy.deepcopy(enc)
        ref.layers[1].self_attn.in_proj_weight.mul_(mask)
        x = torch.randn(2, 6, 32)
        assert torch.allclose(enc.eval()(x), ref.eval()(x))


def test_include_exclude_types_and_overrides():
    model = mlp()
    assert list(Pruner(model, 0.5, exclude="4.*").params) == ["0.weight", "2.weight"]
    assert list(Pruner(model, 0.5, include=["*.bias"]).params) == ["0.bias", "2.bias", "4.bias"]
    assert list(Pruner(model, 0.5, types=[nn.Conv2d], include="0.weight").params) == ["0.weight"]
    pruner = prunekit.prune(model, sparsity=0.9, overrides={"4.*": 0.25})
    assert pruner.masks.sparsities()["4.weight"] == pytest.approx(0.25)
    assert (pruner.masks["0.weight"].numel() + pruner.masks["2.weight"].numel()) * 0.9 == pytest.approx(
        pruner.masks.num_pruned() - 32, abs=1)


def test_tied_weights_pruned_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8, bias=False)
            self.b = nn.Linear(8, 8, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    model = Tied()
    pruner = prunekit.prune(model, sparsity=0.5)
    assert list(pruner.masks) == ["a.weight"]
    assert model.b.weight is model.a.weight and int((model.b.weight == 0).sum()) == 32


def test_random_criterion_is_reproducible_and_custom_criterion_works():
    m1, m2 = mlp(), mlp()
    p1 = prunekit.prune(m1, 0.5, criterion="random")
    p2 = prunekit.prune(m2, 0.5, criterion="random")
    assert p1.masks.equal(p2.masks)
    # a custom criterion: keep the *smallest* weights (nonsense, but checks the plumbing)
    m3 = mlp()
    p3 = prunekit.prune(m3, 0.5, criterion=lambda name, w: -w.abs(), allocation="uniform")
    w0 = mlp()[0].weight.detach().abs()
    assert w0[p3.masks["0.weight"]].max() <= w0[~p3.masks["0.weight"]].min()


def test_remove_makes_permanent():
    model = mlp()
    pruner = prunekit.prune(model, 0.6)
    zeros = int((model[0].weight == 0).sum())
    out = pruner.remove()
    assert out is model and len(pruner.masks) == 0
    assert int((model[0].weight == 0).sum()) == zeros
    pruner.step()  # no masks left: harmless


def test_manual_schedule_only_updates_on_request():
    model = mlp()
    pruner = Pruner(model, 0.5, schedule=Manual())
    sgd_steps(model, pruner, 2)
    assert pruner.masks.num_pruned() == 0
    pruner.update(0.3)
    assert pruner.masks.sparsity() == pytest.approx(0.3, abs=1e-3)


def test_state_dict_round_trip_resumes_identically():
    a = mlp()
    pa = Pruner(a, 0.8, schedule=Gradual(start=0, end=6, every=2))
    opt_a = sgd_steps(a, pa, 3)
    state = pa.state_dict()
    b = copy.deepcopy(a)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # load_state_dict shares tensors
    pb = Pruner.from_state_dict(b, state)
    assert pb.step_count == 3 and pb.masks.equal(pa.masks)
    sgd_steps(a, pa, 5, opt=opt_a, seed=7)
    sgd_steps(b, pb, 5, opt=opt_b, seed=7)
    assert pa.masks.equal(pb.masks)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparsity": 1.0}, r"\[0, 1\)"),
        ({"sparsity": -0.5}, r"\[0, 1\)"),
        ({"sparsity": 0.5, "include": "nothing*"}, "matches no parameter"),
        ({"sparsity": 0.5, "exclude": "nope"}, "matches no parameter"),
        ({"sparsity": 0.5, "allocation": "best"}, "choose one of"),
        ({"sparsity": 0.5, "criterion": "taylor"}, "choose one of"),
        ({"sparsity": 0.5, "overrides": {"zz*": 0.1}}, "matches none"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Pruner(mlp(), **kwargs)


def test_no_prunable_tensors():
    with pytest.raises(ValueError, match="no prunable tensors"):
        Pruner(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), 0.5)


def test_schedule_end_before_start():
    with pytest.raises(ValueError, match="ends before it starts"):
        Gradual(start=100, end=50, every=10)


def test_nan_weights_are_reported():
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'2.weight' contains 1 NaN"):
        prunekit.prune(model, 0.5)


def test_mask_shape_mismatch_on_load():
    model = mlp()
    state = Pruner(model, 0.5).state_dict()
    state["masks"]["0.weight"] = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="shape"):
        Pruner(mlp(), 0.5).load_state_dict(state)


def test_oneshot_at_later_step():
    model = mlp()
    pruner = Pruner(model, 0.5, schedule=OneShot(at=3))
    sgd_steps(model, pruner, 3)
    assert pruner.masks.num_pruned() == 0
    sgd_steps(model, pruner, 1)
    assert pruner.masks.sparsity() == pytest.approx(0.5, abs=1e-3)


def test_layer_collapse_warns():
    model = nn.Sequential(nn.Linear(50, 50), nn.Linear(50, 2))
    with torch.no_grad():
        model[0].weight.mul_(1e-3)  # tiny weights: a global threshold removes the whole layer
    with pytest.warns(UserWarning, match=r"layer collapse.*allocation='lamp' or 'erk'"):
        prunekit.prune(copy.deepcopy(model), 0.97)  # 2,522 of 2,600 weights go: more than the tiny layer's 2,500
    with pytest.warns(UserWarning, match=r"allocation='erk', or pin"):  # lamp already in use: not suggested again
        prunekit.prune(copy.deepcopy(model), 0.9999, allocation="lamp")  # (every layer: nothing left to keep)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prunekit.prune(nn.Sequential(nn.Linear(50, 50), nn.Linear(50, 2)), 0.5)  # no warning in the normal case


def test_in_place_masking_is_visible_to_autograd_and_works_for_half_precision():
    model = mlp()
    pruner = prunekit.prune(model, 0.5)
    out = model(torch.randn(2, 16)).sum()
    pruner.apply()  # weights saved for backward were written in place: autograd must notice, as with mul_
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()
    half = mlp().half()
    p = prunekit.prune(half, 0.5)  # float16 goes through torch's own kernel
    assert (half[0].weight[~p.masks["0.weight"]] == 0).all()
    assert half[0].weight.dtype == torch.float16


def _translated(img, dy, dx):
    """Oracle: img (C x H x W) moved by (dy, dx) pixels, the border repeated where nothing comes in."""
    _, h, w = img.shape
    rows = [min(max(r - dy, 0), h - 1) for r in range(h)]
    cols = [min(max(c - dx, 0), w - 1) for c in range(w)]
    return img[:, rows][:, :, cols]


def test_random_shift_translates_each_image_by_at_most_k_pixels_and_covers_every_shift():
    from prunekit.train import random_shift

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, 7, 9, generator=g)
    y = random_shift(x, 2, torch.Generator().manual_seed(1))
    seen = set()
    for img, out in zip(x, y):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if torch.equal(out, _translated(img, dy, dx))]
        assert len(matches) == 1  # random data: exactly one translation explains the output
        seen.add(matches[0])
    assert len(seen) == 25  # every shift in [-2, 2]^2 occurs
    assert torch.equal(random_shift(x, 0), x)
    with pytest.raises(ValueError, match=r"needs image batches of shape \(N, C, H, W\), got inputs of shape \(4, 784"):
        random_shift(torch.zeros(4, 784), 2)


def test_training_with_random_shifts_is_reproducible_and_differs_from_plain_training():
    from torch.utils.data import TensorDataset

    from prunekit.train import TrainConfig, train

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 3, (64,), generator=g))

    def run(shift):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
        train(model, data, TrainConfig(epochs=2, batch_size=16, lr=0.05, shift=shift))
        return model[1].weight.detach().clone()

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(0))


def test_training_that_diverges_stops_with_a_clear_error_and_keeps_the_last_finite_weights():
    from torch.utils.data import TensorDataset

    from prunekit.train import TrainConfig, TrainingDiverged, train

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    x[40] = float("inf")  # its batch (not the first one in seed 0's order) makes the loss NaN
    data = TensorDataset(x, torch.randint(0, 3, (64,), generator=g))
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    seen: list[torch.Tensor] = []
    with pytest.raises(TrainingDiverged, match=r"the loss is nan at epoch 1, step \d \(learning rate .*\); lower "
                                               r"TrainConfig.lr"):
        train(model, data, TrainConfig(epochs=1, batch_size=16, lr=0.05),
              on_step=lambda step: seen.append(model.weight.detach().clone()))
    assert torch.isfinite(model.weight).all() and torch.isfinite(model.bias).all()
    assert seen and torch.equal(model.weight, seen[-1])  # the weights of the last finite step, not a half update

    teacher = nn.Linear(8, 3)
    with pytest.raises(TrainingDiverged, match="distillation loss is scaled by temperature"):
        train(nn.Linear(8, 3), data, TrainConfig(epochs=1, batch_size=16, distill=0.5), teacher=teacher)


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9, 0.99])
def test_momentum_is_the_one_the_config_names(momentum):
    """The one-cycle schedule moves the momentum within 0.05 of TrainConfig.momentum (0.9: torch's 0.85-0.95),
    against the learning rate; 0 is plain SGD throughout."""
    model = nn.Linear(3, 2)
    opt, sched = make_optimizer(model, TrainConfig(momentum=momentum), 50)
    seen, lrs = [], []
    for _ in range(50):
        seen.append(opt.param_groups[0]["momentum"])
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert min(seen) == pytest.approx(max(momentum - 0.05, 0.0))
    assert max(seen) == pytest.approx(min(momentum + 0.05, 0.999) if momentum else 0.0)
    if momentum:
        assert seen[lrs.index(max(lrs))] == min(seen)  # lowest momentum at the learning-rate peak
    with pytest.raises(ValueError, match="momentum must be in"):
        make_optimizer(model, TrainConfig(momentum=1.0), 50)
