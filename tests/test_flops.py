"""Oracles for prunekit.flops: MACs worked out by hand for each layer kind, and parameter counting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prunekit.flops import MacCount, count_macs, count_params


def test_linear_784_300_batch_1():
    macs = count_macs(nn.Linear(784, 300), torch.randn(1, 784))
    assert macs == MacCount(total=235_200, by_module={"": 235_200}, by_param={"weight": 235_200, "bias": 0})


def test_linear_on_3d_input_counts_every_token():
    assert count_macs(nn.Linear(4, 5), torch.randn(2, 3, 4)).total == 2 * 3 * 4 * 5


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 4), n_in=st.integers(1, 16), n_out=st.integers(1, 16))
def test_linear_macs_are_batch_times_in_times_out(batch, n_in, n_out):
    assert count_macs(nn.Linear(n_in, n_out), torch.randn(batch, n_in)).total == batch * n_in * n_out


@pytest.mark.parametrize(
    ("layer", "shape", "expected"),
    [
        (nn.Conv2d(3, 8, 3, padding=1), (1, 3, 10, 10), 8 * 3 * 9 * 100),
        (nn.Conv2d(8, 8, 3, padding=1, groups=8), (1, 8, 10, 10), 8 * 1 * 9 * 100),  # depthwise
        (nn.Conv2d(8, 16, 3, groups=4), (1, 8, 10, 10), 16 * 2 * 9 * 64),  # grouped, 8x8 output
        (nn.Conv2d(3, 4, 3, stride=2), (2, 3, 9, 9), 2 * 4 * 3 * 9 * 16),  # strided, 4x4 output
        (nn.Conv1d(4, 6, 5), (2, 4, 20), 2 * 6 * 4 * 5 * 16),
        (nn.Conv3d(2, 4, 3), (1, 2, 5, 5, 5), 4 * 2 * 27 * 27),
        (nn.ConvTranspose2d(3, 8, 3), (1, 3, 10, 10), 100 * 3 * 8 * 9),  # each input pixel meets the whole kernel
    ],
)
def test_convolutions(layer, shape, expected):
    macs = count_macs(layer, torch.randn(shape))
    assert (macs.total, macs.by_param["weight"]) == (expected, expected)


def test_sequential_per_module_and_per_param():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    macs = count_macs(model, torch.randn(4, 10))
    assert macs.by_module == {"": 1200, "0": 800, "1": 0, "2": 400}
    assert macs.by_param == {"0.weight": 800, "0.bias": 0, "2.weight": 400, "2.bias": 0}


def test_by_module_is_inclusive():
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), nn.Linear(4, 2))
    assert count_macs(model, torch.randn(1, 4)).by_module == {"": 40, "0": 32, "0.0": 16, "0.1": 16, "1": 8}


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.fc(x))


def test_module_run_twice_counts_twice():
    macs = count_macs(Twice(), torch.randn(1, 8))
    assert (macs.total, macs.by_module["fc"], macs.by_param["fc.weight"]) == (128, 128, 128)


def test_module_registered_under_two_names_counts_under_its_first_name():
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 8)), nn.Sequential())
    model[1].append(model[0][0])  # same Linear, second name "1.0"
    model.append(model[0][0])  # third name "2"
    macs = count_macs(model, torch.randn(1, 8))
    assert macs.total == 3 * 64
    assert macs.by_module["0.0"] == 3 * 64
    assert "1.0" not in macs.by_module and "2" not in macs.by_module
    assert macs.by_param == {"0.0.weight": 3 * 64, "0.0.bias": 0}


class HandAttention(nn.Module):
    """Single-head attention with explicit matmuls: x (B, T, C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, T, C) each
        scores = q @ k.transpose(-2, -1)  # (B, T, T)
        return scores.softmax(-1) @ v  # (B, T, C)


def test_hand_written_attention_counts_qk_and_av():
    batch, tokens, dim = 2, 5, 8
    macs = count_macs(HandAttention(dim), torch.randn(batch, tokens, dim))
    projection = batch * tokens * dim * 3 * dim
    qk = av = batch * tokens * tokens * dim
    assert (macs.total, macs.by_param["qkv.weight"]) == (projection + qk + av, projection)


class Sdpa(nn.Module):
    def __init__(self, **options) -> None:
        super().__init__()
        self.options = options

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, **self.options)


@pytest.mark.parametrize("options", [{}, {"is_causal": True}], ids=["full", "causal"])
def test_sdpa_on_cpu_counts_qk_and_av(options):
    # q (B, H, L, E), k (B, H, S, E), v (B, H, S, Ev); causal masks are not discounted (as in torch)
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 6)
    assert count_macs(Sdpa(**options), (q, k, v)).total == 1 * 2 * 3 * 7 * 8 + 1 * 2 * 3 * 7 * 6


def test_sdpa_grouped_query_attention():
    q, kv = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)  # 4 query heads share 2 key/value heads
    assert count_macs(Sdpa(enable_gqa=True), (q, kv, kv)).total == 2 * (2 * 4 * 5 * 5 * 8)


class SelfAttention(nn.Module):
    def __init__(self, need_weights: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.need_weights = need_weights

    def forward(self, x):
        return self.attn(x, x, x, need_weights=self.need_weights)[0]


# x (B=2, T=5, C=16), 4 heads of 4: projections 10 tokens x 16 x (48 + 16); QK^T and AV 2 x 4 x 5 x 5 x 4 each
MHA_IN, MHA_OUT, MHA_ATTENTION = 10 * 16 * 48, 10 * 16 * 16, 2 * (2 * 4 * 5 * 5 * 4)


@pytest.mark.parametrize("need_weights", [True, False], ids=["bmm", "sdpa"])
def test_multihead_attention_credits_projection_weights(need_weights):
    macs = count_macs(SelfAttention(need_weights), torch.randn(2, 5, 16))
    assert macs.total == MHA_IN + MHA_OUT + MHA_ATTENTION
    assert (macs.by_param["attn.in_proj_weight"], macs.by_param["attn.out_proj.weight"]) == (MHA_IN, MHA_OUT)
    assert macs.by_module["attn"] == macs.total
    assert macs.by_module["attn.out_proj"] == 0  # its weight is used by the parent, never via its forward


def test_transformer_encoder_layer_fast_path_is_counted_and_restored():
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)
    before = torch.backends.mha.get_fastpath_enabled()
    macs = count_macs(layer, torch.randn(2, 5, 16))
    assert macs.total == MHA_IN + MHA_OUT + MHA_ATTENTION + 10 * 16 * 32 * 2
    assert macs.by_param["linear1.weight"] == macs.by_param["linear2.weight"] == 10 * 16 * 32
    assert torch.backends.mha.get_fastpath_enabled() == before


@pytest.mark.parametrize(("rnn", "gates"), [(nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1)])
def test_recurrent_layers_meet_each_weight_once_per_token(rnn, gates):
    tokens = 3 * 2  # input (T=3, B=2, C=4), hidden 8
    macs = count_macs(rnn(4, 8), torch.randn(3, 2, 4))
    assert macs.by_param["weight_ih_l0"] == tokens * gates * 8 * 4
    assert macs.by_param["weight_hh_l0"] == tokens * gates * 8 * 8
    assert macs.total == tokens * gates * 8 * 12


class Products(nn.Module):
    def forward(self, a, b, *, scale=1.0):
        return torch.bmm(a, b) * scale


def test_bmm_and_keyword_inputs():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    assert count_macs(Products(), {"a": a, "b": b, "scale": 2.0}).total == 2 * 3 * 4 * 5


def test_per_module_false_keeps_only_the_total():
    assert count_macs(nn.Linear(3, 2), torch.randn(1, 3), per_module=False) == MacCount(6, {"": 6}, {})


class Probe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x):
        self.seen.append((self.training, torch.is_grad_enabled()))
        return self.fc(x)


def test_runs_in_eval_without_grad_and_restores_each_mode():
    model = nn.Sequential(Probe(), nn.Dropout())
    model.train()
    model[1].eval()
    count_macs(model, torch.randn(1, 2))
    assert model[0].seen == [(False, False)]
    assert [m.training for m in model.modules()] == [True, True, True, False]


class ClassToken(nn.Module):
    """CaiT-style: a parameter expanded under no_grad is a module input (requires_grad, no grad_fn)."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.ones(1, 1, 4))
        self.frozen = nn.Parameter(torch.ones(4), requires_grad=False)
        self.block = nn.Linear(4, 4)

    def forward(self, x):
        return self.block(self.token.expand(x.shape[0], -1, -1)) + x * self.frozen


def test_a_parameter_view_as_module_input_is_counted_and_grad_flags_restored():
    model = ClassToken()
    assert count_macs(model, torch.randn(1, 1, 4)).total == 16
    assert [p.requires_grad for p in model.parameters()] == [True, False, True, True]


def test_modes_restored_when_forward_fails():
    model = nn.Linear(3, 2).train()
    with pytest.raises(RuntimeError):
        count_macs(model, torch.randn(1, 4))  # wrong width
    assert model.training


def test_rejects_bad_arguments_naming_them():
    with pytest.raises(TypeError, match="list"):
        count_macs(nn.Linear(2, 2), [torch.randn(1, 2)])
    with pytest.raises(TypeError, match="got type"):
        count_macs(nn.Linear, torch.randn(1, 2))
    with pytest.raises(TypeError, match="str"):
        count_params("model")


def test_count_params_counts_tied_weights_once():
    embed, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = embed.weight
    model = nn.Sequential(embed, head)
    assert count_params(model) == 40
    macs = count_macs(model, torch.tensor([[1, 2, 3]]))
    assert macs.by_param == {"0.weight": 3 * 4 * 10}  # the head's MACs, under the tied tensor's first name


def test_count_params_with_shared_module():
    shared = nn.Linear(4, 4)
    assert count_params(nn.Sequential(shared, nn.ReLU(), shared)) == 20
