"""Tests for prunekit.calibration: statistics hooks, the block adapter, the sequential runner and streaming."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit.llm
from prunekit.calibration import (
    InputStatistics,
    SafetensorsStream,
    block_linears,
    capture_block_inputs,
    find_blocks,
    linear_roles,
    record_inputs,
    sequential_blocks,
)

_spec = importlib.util.spec_from_file_location("llm_models", Path(__file__).parent / "helpers" / "llm_models.py")
llm_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(llm_models)
tiny, tokens, FAMILIES, BLOCK_PATHS = llm_models.tiny, llm_models.tokens, llm_models.FAMILIES, llm_models.BLOCK_PATHS


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


# ---------------------------------------------------------------------------------------------------------------------
# statistics


def test_input_statistics_match_direct_computation() -> None:
    x = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))  # (B, T, C)
    s = InputStatistics(7, gram=True)
    s.add_batch(x[:2])
    s.add_batch(x[2:])
    rows = x.reshape(-1, 7).double()
    assert s.count == 15
    torch.testing.assert_close(s.norms().double(), rows.norm(dim=0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s.gram, rows.T @ rows, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="features"):
        s.add_batch(torch.zeros(2, 6))
    s.free()
    with pytest.raises(RuntimeError, match="freed"):
        s.add_batch(x)


def test_record_inputs_removes_hooks_even_on_error() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    stats = {"a": InputStatistics(4), "b": InputStatistics(4)}
    with record_inputs({"a": net[0], "b": net[2]}, stats):
        net(torch.ones(3, 4))
    assert stats["a"].count == 3 and stats["b"].count == 3
    assert no_hooks(net)
    with pytest.raises(RuntimeError, match="boom"), record_inputs({"a": net[0]}, {"a": stats["a"]}):
        raise RuntimeError("boom")
    assert no_hooks(net)
    with pytest.raises(ValueError, match="no accumulator"), record_inputs({"a": net[0]}, {}):
        pass


# ---------------------------------------------------------------------------------------------------------------------
# the block adapter


@pytest.mark.parametrize("family", FAMILIES)
def test_find_blocks_in_every_family(family: str) -> None:
    model = tiny(family, layers=3)
    blocks = find_blocks(model)
    assert [b.name for b in blocks] == [f"{BLOCK_PATHS[family]}.{i}" for i in range(3)]
    assert [b.name for b in find_blocks(model, BLOCK_PATHS[family])] == [b.name for b in blocks]
    assert [b.name for b in find_blocks(model, [blocks[2].name, blocks[0].name])] == [blocks[2].name, blocks[0].name]


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("llama", {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                   "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}),
        ("gpt2", {"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"}),
        ("opt", {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
                 "up": "fc1", "down": "fc2"}),
        ("bert", {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                  "o": "attention.output.dense", "up": "intermediate.dense", "down": "output.dense"}),
    ],
)
def test_linear_roles(family: str, expected: dict[str, str]) -> None:
    block = find_blocks(tiny(family))[0].module
    assert linear_roles(block) == expected
    assert set(block_linears(block)) == set(expected.values())


def test_unknown_architecture_needs_a_block_list() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"found no lists of transformer blocks.*blocks="):
        find_blocks(net)
    two = nn.Module()
    two.encoder = nn.Module()
    two.encoder.layers = nn.ModuleList([nn.Linear(2, 2)])
    two.decoder = nn.Module()
    two.decoder.layers = nn.ModuleList([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match=r"found 2 .*encoder.layers, decoder.layers"):
        find_blocks(two)
    with pytest.raises(ValueError, match="does not have"):
        find_blocks(net, ["0", "nope"])
    with pytest.raises(ValueError, match="not a ModuleList"):
        find_blocks(net, "0")


# ---------------------------------------------------------------------------------------------------------------------
# the sequential runner


def test_capture_stops_at_the_first_block() -> None:
    model = tiny("llama")
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append("head"))
    model.model.layers[1].register_forward_hook(lambda *a: calls.append("block1"))
    inputs = capture_block_inputs(model, model.model.layers[0], [tokens(2), tokens(2, seed=3)])
    assert calls == []
    assert len(inputs.hidden) == 2 and inputs.hidden[0].shape == (2, 16, 16)
    # rotary cos/sin are captured once and shared between batches of the same shape
    cos0, cos1 = inputs.kwargs[0]["position_embeddings"][0], inputs.kwargs[1]["position_embeddings"][0]
    assert cos0 is cos1
    assert len(model.model.layers[0]._forward_pre_hooks) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_block_inputs_equal_the_pruned_models_activations(family: str) -> None:
    model = tiny(family, layers=3)
    data = [tokens(2, seed=s) for s in range(3)]
    seen = []
    gen = torch.Generator().manual_seed(0)
    for block in sequential_blocks(model, data, progress=False):
        seen.append([h.clone() for h in block.inputs.hidden])
        block.run()  # running the block must not change what the next block sees
        with torch.no_grad():  # "prune" this block: zero a random half of each linear weight
            for layer in block_linears(block.module).values():
                layer.weight.mul_(torch.rand(layer.weight.shape, generator=gen) > 0.5)
    assert no_hooks(model)
    with torch.no_grad():
        for b, ids in enumerate(data):
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
            for k in range(3):
                torch.testing.assert_close(seen[k][b], hidden[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dense_inputs_equal_the_dense_models_activations(family: str) -> None:
    model = tiny(family, layers=3)
    data = [tokens(2, seed=s) for s in range(2)]
    with torch.no_grad():
        dense = [model(input_ids=ids, output_hidden_states=True).hidden_states for ids in data]
    seen = []
    gen = torch.Generator().manual_seed(0)
    for block in sequential_blocks(model, data, progress=False, inputs="dense"):
        seen.append([h.clone() for h in block.inputs.hidden])
        block.run()  # keeps the outputs of the block as it is now (dense) for the next block
        with pytest.raises(RuntimeError, match="runs once"):
            block.run()
        with torch.no_grad():
            for layer in block_linears(block.module).values():
                layer.weight.mul_(torch.rand(layer.weight.shape, generator=gen) > 0.5)
    for k in range(3):
        for b in range(len(data)):
            torch.testing.assert_close(seen[k][b], dense[b][k], rtol=1e-5, atol=1e-5)
    # the pruned model's own activations differ from what the later blocks were calibrated on
    with torch.no_grad():
        pruned = model(input_ids=data[0], output_hidden_states=True).hidden_states
    assert not torch.allclose(pruned[2], seen[2][0], atol=1e-3)
    with pytest.raises(ValueError, match="inputs='sparse'"):
        next(sequential_blocks(model, data, progress=False, inputs="sparse"))


def test_wanda_defaults_to_dense_inputs_and_matches_a_one_pass_oracle() -> None:
    from prunekit.llm.criteria import wanda

    model = tiny("llama", layers=3)
    data = tokens(4)
    pruned_inputs, oracle_model = copy.deepcopy(model), copy.deepcopy(model)
    masks = prunekit.llm.prune(model, data, method="wanda", sparsity=0.5, progress=False)
    # oracle: Wanda scores from one pass of the dense model (hooks on every linear of every block at once)
    layers = {name: m for name, m in oracle_model.named_modules()
              if isinstance(m, nn.Linear) and ".layers." in name}
    stats = {name: InputStatistics(m.in_features) for name, m in layers.items()}
    with record_inputs(layers, stats), torch.no_grad():
        oracle_model(input_ids=data)
    for name, layer in layers.items():
        scores = wanda(layer.weight.detach(), stats[name].norms())
        keep = scores > scores.kthvalue(scores.shape[1] // 2, dim=1, keepdim=True).values  # top half per row
        assert torch.equal(masks[f"{name}.weight"], keep), name
    other = prunekit.llm.prune(pruned_inputs, data, method="wanda", sparsity=0.5, progress=False, inputs="pruned")
    assert not other.equal(masks)  # the later blocks see other activations, so some choices differ
    with pytest.raises(ValueError, match="inputs='both'"):
        prunekit.llm.prune(copy.deepcopy(oracle_model), data, method="wanda", sparsity=0.5, inputs="both")


def test_freed_memory_is_released_after_every_block(monkeypatch: pytest.MonkeyPatch) -> None:
    import prunekit.calibration as calibration

    calibration.release_freed_memory()  # callable on any platform (a no-op without glibc)
    calls = []
    monkeypatch.setattr(calibration, "release_freed_memory", lambda: calls.append(1))
    model = tiny("llama", layers=3)
    for _ in sequential_blocks(model, [tokens(2)], progress=False):
        pass
    assert len(calls) == 3


def test_runner_on_a_plain_module_with_a_block_list() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(5, 4)
    names = []
    for block in sequential_blocks(net, [x], blocks=["0", "1", "2"], progress=False):
        names.append(block.name)
        if block.name == "2":
            torch.testing.assert_close(block.inputs.hidden[0], net[1](net[0](x)))
    assert names == ["0", "1", "2"]
    # blocks with a module between them cannot be chained: the runner says so instead of feeding wrong inputs
    with pytest.raises(ValueError, match="does not receive the output of block 2"):
        next(sequential_blocks(net, [x], blocks=["2", "4"], progress=False))
    with pytest.raises(ValueError, match="execution order"):
        next(sequential_blocks(net, [x], blocks=["2", "0"], progress=False))


# ---------------------------------------------------------------------------------------------------------------------
# streaming from and to safetensors


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_streaming_equals_in_memory(tmp_path: Path, method: str) -> None:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    model = tiny("llama", layers=3)
    src = tmp_path / "src"
    model.save_pretrained(src)
    streamed = copy.deepcopy(model)
    data = tokens(4)
    in_memory = prunekit.llm.prune(model, data, method=method, sparsity=0.5, progress=False)

    # 1. a fully loaded model, streaming forced: blocks are re-read from disk, written out and freed
    out = tmp_path / "out"
    masks = prunekit.llm.prune(streamed, data, method=method, sparsity=0.5, checkpoint=src, out=out, progress=False)
    assert masks.equal(in_memory)
    assert all(p.is_meta for p in streamed.model.layers.parameters())
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], value, rtol=0, atol=0, msg=name)

    # 2. a skeleton without weights (a model larger than memory would be built like this)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(model.config)
    out2 = tmp_path / "out2"
    masks2 = prunekit.llm.prune(skeleton.eval(), data, method=method, sparsity=0.5, checkpoint=src, out=out2,
                                progress=False)
    assert masks2.equal(in_memory)
    reloaded2 = AutoModelForCausalLM.from_pretrained(out2)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(reloaded2.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_stream_refuses_to_overwrite_its_source(tmp_path: Path) -> None:
    model = tiny("llama")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="own folder"):
        SafetensorsStream(tmp_path, tmp_path)
    with pytest.raises(FileNotFoundError, match="no safetensors"):
        SafetensorsStream(tmp_path / "missing.safetensors", tmp_path / "o")
