"""Deployment: save/load round trips (plain and compressed) of every built-in model, plain safetensors export,
ONNX export checked against onnxruntime, int8 weights that keep zeros, and ``prunekit export`` on a run directory."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import prunekit
from prunekit.checkpoint import load, save
from prunekit.deploy import export
from prunekit.models import MODELS, get_model
from prunekit.quantize import Int8Conv, Int8Linear, dequantize_int8, quantize_int8

X = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def pruned(name: str, sparsity: float = 0.9, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = get_model(name, **kwargs)
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):  # give BN non-trivial statistics
        model.train()
        with torch.no_grad():
            model(torch.randn(8, 1, 28, 28))
    pruner = prunekit.prune(model, sparsity)
    return model.eval(), pruner


ROUND_TRIPS = [(name, compress) for name in sorted(MODELS) for compress in (False, True)] + [
    (name, "int8") for name in ("lenet300", "lenet5", "resnet20")]


@pytest.mark.parametrize(("name", "compress"), ROUND_TRIPS)
def test_save_load_round_trip_gives_identical_outputs_and_masks(tmp_path, name, compress):
    model, pruner = pruned(name)
    path = save(model, tmp_path / "m.pk", pruner=pruner, compress=compress)
    fresh = get_model(name).eval()
    ckpt = load(path, fresh)
    assert ckpt.pruner.masks.equal(pruner.masks)
    state = model.state_dict()
    if compress == "int8":  # weights rounded per channel; everything else exact; zeros stay zero
        for k, v in fresh.state_dict().items():
            if v.is_floating_point() and v.dim() >= 2:
                assert (v[state[k] == 0] == 0).all(), k
                assert (v - state[k]).abs().max() <= state[k].abs().max() / 254 + 1e-7, k
            else:
                assert torch.equal(v, state[k]), k
        return
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():
        assert torch.equal(fresh(X), model(X))
    if compress:
        assert path.stat().st_size < sum(v.numel() * v.element_size() for v in state.values()) / 4


def test_compressed_dense_model_is_not_larger_than_plain(tmp_path):
    torch.manual_seed(0)
    model = get_model("lenet300")
    plain = save(model, tmp_path / "plain.safetensors")
    packed = save(model, tmp_path / "packed.pk", compress=True)
    assert packed.stat().st_size <= plain.stat().st_size
    assert torch.equal(load(packed, get_model("lenet300")).model.fc1.weight, model.fc1.weight)


def test_compressed_checkpoint_resumes_with_optimizer_and_wrong_model_is_named(tmp_path):
    model, pruner = pruned("lenet300")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(X).sum().backward()
    opt.step()
    pruner.step()
    path = save(model, tmp_path / "m.pk", pruner=pruner, optimizer=opt, compress=True, extra={"epoch": 2})
    fresh = get_model("lenet300")
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    ckpt = load(path, fresh, optimizer=opt2)
    assert ckpt.extra == {"epoch": 2}
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    with pytest.raises(ValueError, match=r"fc1.weight: file \(300, 784\) vs model \(150, 784\)"):
        load(path, get_model("lenet300", width=0.5))


def test_truncated_or_corrupted_compressed_checkpoint_is_an_error(tmp_path):
    from prunekit.fileformat import FileFormatError

    model, pruner = pruned("lenet300")
    data = save(model, tmp_path / "m.pk", pruner=pruner, compress=True).read_bytes()
    for i, broken in enumerate([data[: len(data) // 2], data[:-1], data[:100]]):
        (tmp_path / f"b{i}.pk").write_bytes(broken)
        with pytest.raises(FileFormatError):
            load(tmp_path / f"b{i}.pk", get_model("lenet300"))
    flipped = bytearray(data)
    flipped[-1000] ^= 0x01
    (tmp_path / "f.pk").write_bytes(bytes(flipped))
    with pytest.raises(FileFormatError, match="checksum"):
        load(tmp_path / "f.pk", get_model("lenet300"))


def test_safetensors_export_loads_with_plain_torch(tmp_path):
    model, _ = pruned("resnet20")
    result = export(model, tmp_path / "m.safetensors")
    state = load_file(result.path)  # safetensors only: no prunekit involved
    fresh = copy.deepcopy(model)
    for p in fresh.parameters():
        p.data.fill_(1.0)
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(X), model(X))
    assert result.format == "safetensors" and result.bytes == result.path.stat().st_size
    assert not any(torch.signbit(v[v == 0]).any() for v in state.values() if v.is_floating_point())


def test_safetensors_int8_export_holds_int8_weights_with_zeros(tmp_path):
    model, _ = pruned("lenet5")
    result = export(model, tmp_path / "m8.safetensors", int8=True)
    state = load_file(result.path)
    assert state["fc1.weight_int8"].dtype == torch.int8
    assert (state["fc1.weight_int8"][model.fc1.weight == 0] == 0).all()
    w = state["conv1.weight_int8"].float() * state["conv1.weight_scale"].view(-1, 1, 1, 1)  # the documented recipe
    assert (w - model.conv1.weight).abs().max() <= model.conv1.weight.abs().max() / 254 + 1e-7
    assert result.ratio > 3.5


def test_quantize_int8_swaps_modules_keeps_zeros_and_round_trips():
    model, _ = pruned("lenet5")
    with torch.no_grad():
        reference = model(X)
    q = quantize_int8(model, inplace=False)
    assert isinstance(q.fc1, Int8Linear) and isinstance(q.conv1, Int8Conv)
    assert isinstance(model.fc1, nn.Linear)  # inplace=False leaves the original alone
    for name in ("conv1", "conv2", "fc1", "fc2"):
        assert (getattr(q, name).weight_int8[getattr(model, name).weight == 0] == 0).all(), name
    with torch.no_grad():
        out = q(X)
    assert (out - reference).abs().max() < 0.02 * reference.abs().max()
    back = dequantize_int8(q)
    assert type(back.conv1) is nn.Conv2d and type(back.fc1) is nn.Linear
    with torch.no_grad():
        assert torch.allclose(back(X), out, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["masked", "smaller-shapes", "int8"])
def test_onnx_export_matches_onnxruntime(tmp_path, case):
    if case == "masked":  # convolutions, BatchNorm, residual connections
        model, _ = pruned("resnet20", 0.9)
    elif case == "smaller-shapes":  # what structural pruning produces: the same architecture, narrower
        model, _ = pruned("lenet300", 0.5, width=0.37)
    else:
        model, _ = pruned("lenet5", 0.8)
    result = export(model, tmp_path / "m.onnx", example_inputs=(X,), int8=case == "int8")
    assert result.max_abs_diff <= 1e-4 * result.max_abs_reference
    assert not result.notes  # the batch dimension is dynamic
    import onnxruntime as ort

    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    x7 = torch.randn(7, 1, 28, 28)
    (out,) = session.run(None, {session.get_inputs()[0].name: x7.numpy()})
    ref_model = quantize_int8(model, inplace=False) if case == "int8" else model
    with torch.no_grad():
        ref = ref_model(x7)
    assert out.shape == (7, 10)
    assert (torch.from_numpy(out) - ref).abs().max() <= 1e-4 * ref.abs().max()
    if case == "int8":
        assert result.bytes < result.dense_bytes / 2


def test_export_argument_errors(tmp_path):
    model, _ = pruned("lenet300")
    with pytest.raises(ValueError, match="example_inputs"):
        export(model, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="choose one of"):
        export(model, tmp_path / "m.bin", format="tflite")


@pytest.mark.slow
def test_cli_export_of_a_run_directory(tmp_path, capsys):
    from prunekit.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "lenet300", "width": 1.0}))
    model, pruner = pruned("lenet300", 0.95)
    save(model, run / "checkpoint.safetensors", pruner=pruner)
    sizes = {}
    for fmt, int8 in [("compressed", False), ("compressed", True), ("safetensors", False), ("onnx", False)]:
        assert main(["export", str(run), "--format", fmt, *(["--int8"] if int8 else [])]) == 0
        out = capsys.readouterr().out
        assert "dense fp32 state" in out and ("x smaller" in out or "x larger" in out)
        suffix = {"compressed": ".pk", "safetensors": ".safetensors", "onnx": ".onnx"}[fmt]
        path = run / f"model{'-int8' if int8 else ''}{suffix}"
        assert path.is_file()
        sizes[fmt, int8] = path.stat().st_size
        if fmt == "onnx":
            assert "onnxruntime vs torch" in out
    dense = 266_610 * 4
    assert sizes["compressed", False] < dense / 12  # lossless at 95% sparsity
    assert sizes["compressed", True] < dense / 25
    reloaded = load(run / "model.pk", get_model("lenet300"))
    assert torch.equal(reloaded.model.fc1.weight, model.fc1.weight)
    assert main(["export", str(tmp_path / "nowhere"), "--format", "compressed"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def structured_run(tmp_path, name: str = "lenet300"):
    """A finished ``prunekit prune --structured`` run directory: config.json, model.safetensors (the physically
    pruned model + its plan) and checkpoint.safetensors (the full-size model, removed channels zero-filled)."""
    torch.manual_seed(0)
    model = get_model(name).eval()
    plan = prunekit.structured.plan(model, torch.zeros(1, 1, 28, 28), sparsity=0.5)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": name, "width": 1.0, "structured": {"sparsity": 0.5}}))
    full = plan.apply(copy.deepcopy(model), soft=True)
    opt = torch.optim.SGD(full.parameters(), lr=0.0, momentum=0.9)  # a run's checkpoint holds optimizer state
    full(X).sum().backward()
    opt.step()
    save(full, run / "checkpoint.safetensors", optimizer=opt)
    small = plan.apply(copy.deepcopy(model))
    prunekit.structured.save(small, run / "model.safetensors", plan)
    return run, small.eval()


@pytest.mark.slow
def test_cli_export_of_a_structured_run_ships_the_physically_pruned_model(tmp_path, capsys):
    import onnx
    import onnxruntime as ort

    from prunekit.cli import main

    run, small = structured_run(tmp_path)
    assert small.fc1.weight.shape == (150, 784)
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = small(x)
    # default output name: not the run's own model.safetensors, which stays as it was
    before = (run / "model.safetensors").read_bytes()
    assert main(["export", str(run), "--format", "safetensors"]) == 0
    out = capsys.readouterr().out
    assert "physically pruned" in out and "-> " + str(run / "model-export.safetensors") in out
    assert (run / "model.safetensors").read_bytes() == before
    assert load_file(run / "model-export.safetensors")["fc1.weight"].shape == (150, 784)
    assert main(["export", str(run), "--format", "safetensors", "--out", str(run / "model.safetensors")]) == 2
    assert "own model file" in capsys.readouterr().err
    assert (run / "model.safetensors").read_bytes() == before
    # safetensors: the small shapes, and a fresh pruned-shape model loaded from it computes the same outputs
    out_file = tmp_path / "export.safetensors"
    assert main(["export", str(run), "--format", "safetensors", "--out", str(out_file)]) == 0
    capsys.readouterr()
    state = load_file(out_file)
    assert state["fc1.weight"].shape == (150, 784) and state["fc2.weight"].shape == (50, 150)
    assert out_file.stat().st_size < 266_610 * 4 * 0.55
    fresh = copy.deepcopy(small)
    for p in fresh.parameters():
        p.data.fill_(1.0)
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    # onnx: the initializers have the small shapes; onnxruntime reproduces the pruned model's outputs
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    assert "onnxruntime vs torch" in capsys.readouterr().out
    shapes = {i.name: tuple(i.dims) for i in onnx.load(str(tmp_path / "m.onnx")).graph.initializer}
    assert (150, 784) in shapes.values() and (300, 784) not in shapes.values()
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert (torch.from_numpy(got) - expected).abs().max() <= 1e-4 * expected.abs().max()
    # compressed: loads into the pruned-shape model, same outputs
    assert main(["export", str(run), "--format", "compressed", "--out", str(tmp_path / "m.pk")]) == 0
    capsys.readouterr()
    loaded = load(tmp_path / "m.pk", fresh).model
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_cli_export_summary_says_larger_when_a_file_is_larger(tmp_path, capsys):
    from prunekit.cli import main
    from prunekit.deploy import size_versus

    assert size_versus(1_000, 2_250) == "2.25x smaller"
    assert size_versus(2_403_192, 1_066_440) == "2.25x larger"
    assert size_versus(1_066_968, 1_066_440) == "1.00x (about the same)"
    run, _ = structured_run(tmp_path)
    assert main(["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "m.safetensors")]) == 0
    lines = {line.split(":")[0]: line for line in capsys.readouterr().out.splitlines()}
    ckpt_bytes, reference = (run / "checkpoint.safetensors").stat().st_size, 266_610 * 4
    assert ckpt_bytes > reference
    assert f"{ckpt_bytes / reference:.2f}x larger" in lines["run checkpoint"]
    assert f"{reference / (tmp_path / 'm.safetensors').stat().st_size:.2f}x smaller" in lines["safetensors"]
    assert "smaller" not in lines["run checkpoint"]


def test_export_with_an_unknown_extension_and_no_format_is_an_error(tmp_path):
    model, _ = pruned("lenet300")
    with pytest.raises(ValueError, match=r"'\.foo'.*\.safetensors.*\.pk.*\.onnx.*format="):
        export(model, tmp_path / "x.foo")
    with pytest.raises(ValueError, match="extension 'none'"):
        export(model, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert export(model, tmp_path / "x.foo", format="safetensors").format == "safetensors"  # explicit: fine
    result = export(model, tmp_path / "m.pk")  # the CLI's suffix for compressed files
    assert result.format == "compressed"
    assert torch.equal(load(result.path, get_model("lenet300")).model.fc1.weight, model.fc1.weight)


def test_onnx_export_with_a_wrong_shaped_example_input_names_shape_and_layer(tmp_path):
    model, _ = pruned("lenet300")
    with pytest.raises(ValueError, match=r"shape \(2, 100\).*'fc1' \(Linear\).*784 features.*Pass example_inputs"):
        export(model, tmp_path / "m.onnx", example_inputs=torch.zeros(2, 100))
    model5, _ = pruned("lenet5")
    with pytest.raises(ValueError, match=r"\(2, 3, 28, 28\).*'conv1' \(Conv2d\).*1 channel in dimension 1"):
        export(model5, tmp_path / "m.onnx", example_inputs=(torch.zeros(2, 3, 28, 28),))
    assert not (tmp_path / "m.onnx").exists()
