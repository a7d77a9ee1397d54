"""prunekit.sparse: SparseLinear kernels equal dense Linear; convert() swaps only layers that are faster sparse."""

from __future__ import annotations

import copy
import pickle
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit
from prunekit.models import get_model
from prunekit.sparse import KERNELS, SparseLinear, _native, build_info, convert, native_available, to_dense



def available_kernels() -> list[str]:
    return [k for k in KERNELS if k != "native_csr" or native_available()]


@pytest.fixture(params=KERNELS)
def kernel(request: pytest.FixtureRequest) -> str:
    if request.param == "native_csr" and not native_available():
        pytest.fail(f"the native kernel did not build here: {build_info().error}")
    return request.param


def sparse_weight(out_features: int, in_features: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g)
    return w * (torch.rand(out_features, in_features, generator=g) >= sparsity)


def assert_close(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.shape == ref.shape
    tol = 1e-5 * max(1.0, float(ref.abs().max())) if ref.numel() else 0.0
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=tol)


# --- SparseLinear equals F.linear ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (33, 64), (300, 784), (64, 3072)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("batch", [1, 3, 16, 17, 40])
def test_outputs_equal_dense(kernel: str, shape: tuple[int, int], sparsity: float, batch: int) -> None:
    w = sparse_weight(*shape, sparsity)
    b = torch.randn(shape[0])
    x = torch.randn(batch, shape[1])
    layer = SparseLinear(w, b, kernel=kernel)
    with torch.inference_mode():
        assert_close(layer(x), F.linear(x, w, b))


@pytest.mark.parametrize("bias", [True, False])
def test_3d_input_bias_and_zero_rows(kernel: str, bias: bool) -> None:
    w = sparse_weight(48, 96, 0.9)
    w[::3] = 0  # every third output row is all zeros
    w[:, :5] = 0
    b = torch.randn(48) if bias else None
    x = torch.randn(2, 7, 96)  # (B, T, C) as in transformers
    layer = SparseLinear(w, b, kernel=kernel)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (2, 7, 48)
    assert_close(y, F.linear(x, w, b))
    if b is not None:
        assert_close(y[..., ::3], b[::3].expand(2, 7, -1))


def test_all_zero_weight_empty_batch_and_noncontiguous_input(kernel: str) -> None:
    layer = SparseLinear(torch.zeros(10, 20), torch.arange(10.0), kernel=kernel)
    assert layer.nnz == 0 and layer.sparsity == 1.0
    with torch.inference_mode():
        assert_close(layer(torch.randn(4, 20)), torch.arange(10.0).expand(4, -1))
        assert layer(torch.randn(0, 20)).shape == (0, 10)
    w = sparse_weight(16, 20, 0.8)
    x = torch.randn(20, 6).t()  # (6, 20), not contiguous
    with torch.inference_mode():
        assert_close(SparseLinear(w, kernel=kernel)(x), F.linear(x, w))


def test_wide_input_uses_32_bit_indices(kernel: str) -> None:
    w = sparse_weight(3, 70_000, 0.99)  # more than 65,536 columns
    x = torch.randn(2, 70_000)
    layer = SparseLinear(w, kernel=kernel)
    if kernel == "native_csr":
        assert layer.col_indices.dtype == torch.int32
    with torch.inference_mode():
        assert_close(layer(x), F.linear(x, w))


@settings(max_examples=25, deadline=None)
@given(out_features=st.integers(1, 40), in_features=st.integers(1, 300), batch=st.integers(1, 35),
       sparsity=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_random_shapes_property(out_features: int, in_features: int, batch: int, sparsity: float, seed: int) -> None:
    w = sparse_weight(out_features, in_features, sparsity, seed)
    b = torch.randn(out_features)
    x = torch.randn(batch, in_features)
    ref = F.linear(x, w, b)
    for k in available_kernels():
        with torch.inference_mode():
            assert_close(SparseLinear(w, b, kernel=k)(x), ref)


# --- inference only ------------------------------------------------------------------------------------------------
def test_inference_mode_no_grad_and_training_error(kernel: str) -> None:
    w = sparse_weight(8, 16, 0.7)
    layer = SparseLinear(w, torch.zeros(8), kernel=kernel)
    x = torch.randn(3, 16, requires_grad=True)
    with torch.inference_mode():
        assert_close(layer(x), F.linear(x.detach(), w))
    with torch.no_grad():
        assert_close(layer(x), F.linear(x.detach(), w))
    assert_close(layer(x.detach()), F.linear(x.detach(), w))  # grad mode on, but nothing needs a gradient
    with pytest.raises(RuntimeError, match="inference"):
        layer(x)
    assert list(layer.parameters()) == []


def test_dense_views_state_dict_deepcopy_pickle(kernel: str) -> None:
    linear = nn.Linear(30, 20)
    with torch.no_grad():
        linear.weight.mul_(torch.rand(20, 30) > 0.8)
    layer = SparseLinear.from_linear(linear, kernel=kernel)
    assert torch.equal(layer.weight, linear.weight.detach())
    sd = layer.state_dict()
    assert list(sd) == ["weight", "bias"] and torch.equal(sd["weight"], linear.weight.detach())
    x = torch.randn(4, 30)
    ref = linear(x).detach()
    for other in (copy.deepcopy(layer), _pickled(layer)):
        with torch.inference_mode():
            assert_close(other(x), ref)
    fresh = SparseLinear(torch.zeros(20, 30), torch.zeros(20), kernel=kernel)
    fresh.load_state_dict(linear.state_dict())  # re-encodes the dense weight
    with torch.inference_mode():
        assert_close(fresh(x), ref)
    back = layer.to_linear()
    assert isinstance(back, nn.Linear) and torch.equal(back.weight, linear.weight)
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict({"weight": torch.zeros(3, 3), "bias": torch.zeros(20)})


def _pickled(module: nn.Module) -> nn.Module:
    """An in-memory pickle round trip of our own module (what multiprocessing does); no torch.load of a file."""
    return pickle.loads(pickle.dumps(module))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown sparse kernel 'mkl'.*native_csr"):
        SparseLinear(torch.zeros(2, 2), kernel="mkl")
    with pytest.raises(ValueError, match="2-D"):
        SparseLinear(torch.zeros(2))
    if native_available():
        with pytest.raises(TypeError, match="float32"):
            SparseLinear(torch.zeros(2, 2, dtype=torch.float64), kernel="native_csr")
    layer = SparseLinear(torch.zeros(2, 3), kernel="torch_csr")
    with pytest.raises(ValueError, match="in_features=3"):
        layer(torch.zeros(1, 4))
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="min_speedup"):
        convert(model, min_speedup=-1)
    with pytest.raises(ValueError, match="matches no Linear"):
        convert(model, include="encoder.*")
    with pytest.raises(TypeError, match="nn.Module"):
        convert(torch.zeros(3))  # type: ignore[arg-type]


# --- convert --------------------------------------------------------------------------------------------------------
@pytest.fixture
def one_thread():
    """Time with one thread: on a shared 2-core machine, two-thread timings wait for a busy core (noise, not speed)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_convert_keeps_dense_when_sparse_is_slower() -> None:
    model = nn.Sequential(nn.Linear(768, 768), nn.ReLU(), nn.Linear(768, 768))
    with torch.no_grad():
        model[0].weight.mul_(torch.rand(768, 768) >= 0.1)  # 10% zeros: dense is about 5x faster
        model[2].weight.mul_(torch.rand(768, 768) >= 0.1)
    converted = convert(model, min_sparsity=0.0, repeats=9)
    log = converted.sparse_log
    assert [type(m) for m in converted] == [nn.Linear, nn.ReLU, nn.Linear]
    assert len(log) == 2 and log.converted == []
    for d in log:
        assert d.kernel == "dense" and set(d.times) == {"dense", *available_kernels()}
        assert all(d.times["dense"] < d.times[k] for k in available_kernels()), d
        assert "min_speedup" in d.reason


@pytest.mark.usefixtures("one_thread")
def test_convert_uses_sparse_when_faster_and_logs() -> None:
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 16))
    with torch.no_grad():
        model[0].weight.mul_(torch.rand(1024, 1024) >= 0.97)
    x = torch.randn(1, 1024)
    ref = model(x).detach()
    converted = convert(model, repeats=5, inplace=False)
    assert isinstance(model[0], nn.Linear)  # inplace=False left the original alone
    log = converted.sparse_log
    assert log["0"].kernel != "dense" and isinstance(converted[0], SparseLinear), str(log)
    assert log["0"].speedup is not None and log["0"].speedup >= 1.1
    assert log["2"].kernel == "dense" and "min_sparsity" in log["2"].reason
    text = str(log)
    assert "0" in text and "1024x1024" in text and "dense us" in text
    json.dumps(log.to_dict())
    with torch.inference_mode():
        assert_close(converted(x), ref)


def test_forced_pure_torch_path() -> None:
    model = get_model("lenet300")
    prunekit.prune(model, 0.9).remove()
    x = torch.randn(5, 1, 28, 28)
    ref = model(x).detach()
    converted = convert(model, kernels=["torch_csr"], min_speedup=0, min_sparsity=0)
    assert [d.kernel for d in converted.sparse_log] == ["torch_csr"] * 3
    with torch.inference_mode():
        assert_close(converted(x), ref)
    back = to_dense(converted)
    assert all(type(m) is nn.Linear for m in (back.fc1, back.fc2, back.fc3))
    assert_close(back(x).detach(), ref)


def test_lenet300_pruned_same_predictions() -> None:
    torch.manual_seed(0)
    model = get_model("lenet300").eval()
    prunekit.prune(model, sparsity=0.9).remove()
    x = torch.randn(64, 1, 28, 28)
    ref = model(x).detach()
    for kernels in ([k] for k in available_kernels()):
        converted = convert(model, kernels=kernels, min_speedup=0, batch_size=8, inplace=False)
        assert converted.sparse_log.converted == ["fc1", "fc2"]  # fc3 is < 50% sparse under global pruning
        with torch.inference_mode():
            y = converted(x)
        assert_close(y, ref)
        assert torch.equal(y.argmax(1), ref.argmax(1))
        sd = converted.state_dict()  # the converted model saves like the dense one
        assert sd.keys() == model.state_dict().keys()
        assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_convert_example_inputs_shared_and_attention_layers() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True).eval()
    shared = nn.Linear(32, 32)
    model = nn.ModuleDict({"enc": layer, "a": shared, "b": shared})
    for m in model.modules():
        if isinstance(m, nn.Linear):
            with torch.no_grad():
                m.weight.mul_(torch.rand_like(m.weight) >= 0.9)

    def run(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m["b"](m["a"](m["enc"](x)))

    class Wrapper(nn.Module):
        def __init__(self, inner: nn.ModuleDict) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return run(self.inner, x)

    wrapped = Wrapper(model)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        ref = wrapped(x)
    converted = convert(wrapped, example_inputs=(x,), min_speedup=0, kernels=["torch_csr"])
    log = converted.sparse_log
    assert "read directly by nn.MultiheadAttention" in log["inner.enc.self_attn.out_proj"].reason
    assert log["inner.enc.linear1"].rows == 10 and log["inner.enc.linear1"].kernel == "torch_csr"
    assert isinstance(model["a"], SparseLinear) and model["a"] is model["b"]  # shared module replaced everywhere
    assert "inner.b" not in [d.name for d in log]  # listed once, under its first name
    with torch.inference_mode():
        assert_close(converted(x), ref)


def test_convert_a_bare_linear_and_include_exclude() -> None:
    linear = nn.Linear(16, 8)
    out = convert(linear, min_speedup=0, min_sparsity=0, kernels="torch_csr")
    assert isinstance(out, SparseLinear) and out.sparse_log[0].name == ""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    out = convert(model, min_speedup=0, min_sparsity=0, kernels="torch_csr", include="[01]", exclude="1")
    assert [type(m).__name__ for m in out] == ["SparseLinear", "Linear", "Linear"]
    assert [d.reason for d in out.sparse_log][1:] == ["excluded", "not included"]


# --- native build ---------------------------------------------------------------------------------------------------
def test_native_build_is_cached_and_failure_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    try:
        # a fresh cache: compiled once, then loaded from the cache by the next "process"
        _native._reset()
        first = build_info()
        if not first.available:
            pytest.fail(f"native kernel failed to build: {first.error}")
        assert first.compiled and first.seconds > 0 and str(first.path).startswith(str(tmp_path))
        _native._reset()
        second = build_info()
        assert second.available and not second.compiled and second.path == first.path

        # no working compiler: one warning, then the pure-torch kernels do the work
        _native._reset()
        monkeypatch.setattr(_native, "_compilers", lambda: ["/bin/false"])
        monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "other"))
        with pytest.warns(RuntimeWarning, match="could not build the native sparse kernel"):
            assert not native_available()
        with pytest.raises(RuntimeError, match="not available"):
            SparseLinear(torch.zeros(2, 2), kernel="native_csr")
        model = nn.Sequential(nn.Linear(64, 64))
        with torch.no_grad():
            model[0].weight.mul_(torch.rand(64, 64) > 0.95)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # warned once per process, not again
            out = convert(model, min_speedup=0)
        assert out.sparse_log[0].kernel == "torch_csr" and set(out.sparse_log[0].times) == {"dense", "torch_csr"}

        _native._reset()
        monkeypatch.setenv("PRUNEKIT_SPARSE_NATIVE", "0")
        assert not native_available() and "PRUNEKIT_SPARSE_NATIVE" in (build_info().error or "")
    finally:
        monkeypatch.undo()
        _native._reset()
