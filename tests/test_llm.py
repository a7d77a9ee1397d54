"""Tests for prunekit.llm on tiny random transformers: oracles, N:M properties, SparseGPT numerics, bad input."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit
import prunekit.llm
from prunekit.calibration import block_linears, find_blocks, linear_weight
from prunekit.llm import SparseGPT, perplexity, prune, to_pruner, wanda
from prunekit.select import n_m, per_row

_spec = importlib.util.spec_from_file_location("llm_models", Path(__file__).parent / "helpers" / "llm_models.py")
llm_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(llm_models)
tiny, tokens, FAMILIES, VOCAB = llm_models.tiny, llm_models.tokens, llm_models.FAMILIES, llm_models.VOCAB

METHODS = ("magnitude", "wanda", "sparsegpt")


class OneLayer(nn.Module):
    """A plain module with one block holding one linear layer."""

    def __init__(self, weight: list[list[float]]) -> None:
        super().__init__()
        w = torch.tensor(weight)
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(w.shape[1], w.shape[0], bias=False))])
        with torch.no_grad():
            self.layers[0][0].weight.copy_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0](x)


def in_block_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for block in find_blocks(model):
        for k, layer in block_linears(block.module).items():
            out[f"{block.name}.{k}.weight"] = linear_weight(layer)[0]
    return out


def as_out_in(model: nn.Module, name: str, mask: torch.Tensor) -> torch.Tensor:
    """A mask in (out, in) orientation (GPT-2's Conv1D stores (in, out))."""
    module = model.get_submodule(name.rsplit(".", 1)[0])
    return mask.T if linear_weight(module)[1] else mask


# ---------------------------------------------------------------------------------------------------------------------
# oracles


def test_wanda_activation_scaling_beats_magnitude() -> None:
    # weights [1, 2, 3, 4], input channel norms [100, 10, 1, 0.1]: Wanda keeps [1, 2, 0, 0], magnitude [0, 0, 3, 4]
    x = torch.tensor([[100.0, 10.0, 1.0, 0.1]])
    scores = wanda(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), x[0])
    assert per_row({"w": scores}, 0.5)["w"].tolist() == [[True, True, False, False]]

    results = {}
    for method in ("wanda", "magnitude"):
        model = OneLayer([[1.0, 2.0, 3.0, 4.0]])
        dense = model(x).detach()
        prune(model, [x], method=method, sparsity=0.5, progress=False)
        with torch.no_grad():
            results[method] = (model.layers[0][0].weight.tolist(), float((model(x) - dense).abs()))
    assert results["wanda"][0] == [[1.0, 2.0, 0.0, 0.0]]
    assert results["magnitude"][0] == [[0.0, 0.0, 3.0, 4.0]]
    assert results["wanda"][1] < results["magnitude"][1] / 30  # output error 3.4 vs 120


@pytest.mark.parametrize("pattern", [(2, 4), None])
def test_sparsegpt_predicted_error_matches_measured(pattern: tuple[int, int] | None) -> None:
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(32, 32, generator=gen)
    x = torch.randn(512, 32, generator=gen) @ mix  # correlated inputs: where reconstruction matters
    layer = nn.Linear(32, 24, bias=True)
    w0 = layer.weight.detach().clone()
    solver = SparseGPT(layer, blocksize=8, damp=0.0)
    for chunk in x.split(100):
        solver.add_batch(chunk)
    keep = solver.solve(n=pattern[0], m=pattern[1]) if pattern else solver.solve(sparsity=0.6)
    with torch.no_grad():
        measured = ((x @ w0.T - x @ layer.weight.T) ** 2).sum(1).mean().double()  # (out-summed, row-mean)
    assert torch.isclose(measured, solver.error.sum(), rtol=1e-4)
    assert torch.equal(layer.weight == 0, ~keep)
    # the reconstruction is worth it: less output error than zeroing the same weights without updating the rest
    masked = w0 * keep
    assert measured < 0.75 * ((x @ w0.T - x @ masked.T) ** 2).sum(1).mean()
    solver.free()
    with pytest.raises(RuntimeError, match="freed"):
        solver.solve(sparsity=0.5)


def test_sparsegpt_needs_data_and_one_target() -> None:
    solver = SparseGPT(nn.Linear(8, 4))
    with pytest.raises(RuntimeError, match="add_batch"):
        solver.solve(sparsity=0.5)
    solver.add_batch(torch.randn(16, 8))
    with pytest.raises(ValueError, match="exactly one"):
        solver.solve(sparsity=0.5, n=2, m=4)
    with pytest.raises(ValueError, match="does not divide"):
        solver.solve(n=2, m=3)
    with pytest.raises(ValueError, match="damp"):
        SparseGPT(nn.Linear(8, 4), damp=2.0)


# ---------------------------------------------------------------------------------------------------------------------
# every family, every method: masks cover the block linears, weights are zero where pruned, exact counts


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_unstructured_half_on_every_family(family: str, method: str) -> None:
    model = tiny(family)
    weights = in_block_weights(model)
    masks = prune(model, tokens(4), method=method, sparsity=0.5, progress=False)
    assert set(masks) == set(weights)
    for name, keep in masks.items():
        assert keep.shape == weights[name].shape
        assert bool((weights[name][~keep] == 0).all()), name
        assert int((~keep).sum()) == keep.numel() // 2, name  # exact per tensor
        if method != "sparsegpt":  # magnitude and Wanda compare per output row: every row exactly half
            rows = as_out_in(model, name, keep)
            assert bool(((~rows).sum(1) == rows.shape[1] // 2).all()), name
    assert masks.sparsity() == 0.5
    assert no_nan_output(model)


def no_nan_output(model: nn.Module) -> bool:
    with torch.no_grad():
        out = model(input_ids=tokens(1))
    value = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return bool(torch.isfinite(value).all())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_n_m_exactly_n_zeros_in_every_group(family: str, method: str, pattern: str) -> None:
    n, m = prunekit.llm.parse_pattern(pattern)
    model = tiny(family)
    weights = in_block_weights(model)
    masks = prune(model, tokens(4), method=method, pattern=pattern, progress=False)
    assert set(masks) == set(weights)
    for name, keep in masks.items():
        groups = (~as_out_in(model, name, keep)).reshape(-1, m)  # groups of m along the input dimension
        assert bool((groups.sum(1) == n).all()), name
        assert bool((weights[name][~keep] == 0).all()), name


def test_n_m_selection_keeps_the_largest_in_each_group() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3, 7.0, 6.0, 5.0, 8.0]])
    assert n_m({"w": scores}, 2, 4)["w"].tolist() == [[False, True, True, False, True, False, False, True]]
    assert n_m({"w": scores}, 1, 4)["w"].int().tolist() == [[0, 1, 1, 1, 1, 1, 0, 1]]
    current = {"w": torch.tensor([[True, False, True, True, True, True, True, True]])}  # already pruned stays
    assert not n_m({"w": scores}, 2, 4, current=current)["w"][0, 1]


def test_per_row_versus_uniform_allocation() -> None:
    model = OneLayer([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    masks = prune(model, None, method="magnitude", sparsity=0.5, allocation="uniform", progress=False)
    assert masks["layers.0.0.weight"].tolist() == [[False, False, False, False], [True, True, True, True]]
    model = OneLayer([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    masks = prune(model, None, method="magnitude", sparsity=0.5, progress=False)  # default: per row
    assert masks["layers.0.0.weight"].tolist() == [[False, False, True, True], [False, False, True, True]]


def test_block_sparsity_and_skip() -> None:
    model = tiny("llama", layers=2)
    masks = prune(model, tokens(4), method="wanda", block_sparsity=[0.25, 0.75], skip=["down_proj"], progress=False)
    assert not any(k.endswith("down_proj.weight") for k in masks)
    for name, keep in masks.items():
        expected = 0.25 if ".layers.0." in name else 0.75
        assert abs((1 - keep.float().mean().item()) - expected) < 0.02, name
    model = tiny("llama", layers=4)
    masks = prune(model, None, method="magnitude", sparsity=0.5, block_sparsity=lambda i, n: 0.2 * i,
                  progress=False)
    assert round(1 - masks["model.layers.3.mlp.up_proj.weight"].float().mean().item(), 3) == 0.625  # 10 of 16
    masks = prune(tiny("llama"), None, method="magnitude", sparsity=0.5, block_sparsity={"model.layers.1": 0.8},
                  progress=False)
    assert round(1 - masks["model.layers.0.mlp.up_proj.weight"].float().mean().item(), 2) == 0.5


def test_no_hooks_left_and_training_mode_restored() -> None:
    model = tiny("opt").train()
    prune(model, tokens(4), method="sparsegpt", sparsity=0.5, progress=False)
    assert model.training
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


# ---------------------------------------------------------------------------------------------------------------------
# perplexity, report, save


def test_perplexity_matches_the_models_own_loss() -> None:
    model = tiny("llama")
    ids = tokens(1, 20)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert perplexity(model, ids, progress=False) == pytest.approx(float(torch.exp(loss)), rel=1e-5)
    # a padded position does not count
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0
    ppl = perplexity(model, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    assert ppl != pytest.approx(float(torch.exp(loss)), rel=1e-5)


def test_masks_work_with_report_and_save(tmp_path: Path) -> None:
    model = tiny("llama")
    masks = prune(model, tokens(4), method="wanda", sparsity=0.5, progress=False)
    rep = prunekit.report(model, masks)
    assert {r.name for r in rep.rows} >= set(masks)
    pruner = to_pruner(model, masks)
    path = prunekit.save(model, tmp_path / "pruned.safetensors", pruner=pruner)
    fresh = tiny("llama", seed=5)
    ckpt = prunekit.load(path, fresh)
    assert ckpt.pruner is not None and ckpt.pruner.masks.equal(masks)
    torch.testing.assert_close(fresh.state_dict(), model.state_dict())
    assert not pruner.step()  # the one-shot step counts as done: the masks are not recomputed


# ---------------------------------------------------------------------------------------------------------------------
# bad input: clear errors naming the value, the expectation and the fix


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "obs", "sparsity": 0.5}, ValueError, r"unknown method 'obs'.*magnitude"),
        ({"method": "wanda", "sparsity": 1.0}, ValueError, r"\[0, 1\).*got 1.0"),
        ({"method": "wanda", "sparsity": -0.1}, ValueError, r"\[0, 1\)"),
        ({"method": "wanda", "sparsity": "half"}, TypeError, "float"),
        ({"method": "wanda"}, ValueError, "exactly one of sparsity"),
        ({"method": "wanda", "sparsity": 0.5, "pattern": "2:4"}, ValueError, "exactly one of sparsity"),
        ({"method": "wanda", "pattern": "2:3"}, ValueError, r"m=3 does not divide the input dimension.*skip"),
        ({"method": "wanda", "pattern": "4:2"}, ValueError, r"1 <= n < m"),
        ({"method": "wanda", "pattern": "half"}, ValueError, "look like '2:4'"),
        ({"method": "sparsegpt", "sparsity": 0.5, "allocation": "uniform"}, ValueError, "SparseGPT"),
        ({"method": "wanda", "sparsity": 0.5, "allocation": "global"}, ValueError, "per_row"),
        ({"method": "wanda", "block_sparsity": [0.5]}, ValueError, "2 blocks"),
        ({"method": "wanda", "sparsity": 0.5, "skip": ["nonexistent"]}, ValueError, "matches no module"),
        ({"method": "wanda", "sparsity": 0.5, "out": "x"}, ValueError, "checkpoint="),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        prune(tiny("llama"), tokens(2), progress=False, **kwargs)


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        (torch.rand(2, 8), TypeError, r"dtype torch.float32.*integer.*Tokenize"),
        (torch.randint(0, VOCAB, (8,)), ValueError, r"shape \(8,\).*ids\[None\]"),
        (torch.full((2, 8), VOCAB + 5), ValueError, rf"vocabulary is \[0, {VOCAB}\)"),
        ([], ValueError, "empty"),
        (torch.randint(0, VOCAB, (0, 8)), ValueError, r"empty: batch 0 has shape \(0, 8\)"),
        ([torch.randint(0, VOCAB, (2, 0))], ValueError, r"batch 0 has shape \(2, 0\)"),
        ([{"attention_mask": torch.ones(1, 4)}], ValueError, "without 'input_ids'"),
        ("some text", TypeError, "tensor of token ids"),
        (None, ValueError, "needs calibration data"),
    ],
)
def test_bad_calibration_data(data: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        prune(tiny("llama"), data, method="wanda", sparsity=0.5, progress=False)


def test_unknown_architecture_error() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"blocks="):
        prune(net, None, method="magnitude", sparsity=0.5)
    masks = prune(net, None, method="magnitude", sparsity=0.5, blocks=["0", "2"], progress=False)
    assert sorted(masks) == ["0.weight", "2.weight"]
