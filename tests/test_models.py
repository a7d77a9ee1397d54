"""Tests for prunekit.models: parameter counts computed by hand, shapes, width multiplier, registry, determinism."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.models import MODELS, Conv2, Conv4, Conv6, LeNet5, LeNet300, ResNet, get_model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def n_weights(model: nn.Module) -> int:
    """Parameters of conv/linear weights only (what Han et al. count as 'weights')."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


# Expected counts, computed by hand (weights + biases):
#   LeNet-300-100: 784*300 + 300*100 + 100*10 = 235,200 + 30,000 + 1,000 = 266,200 weights; + 300 + 100 + 10 = 266,610.
#   LeNet-5 (Caffe): 28 -conv5-> 24 -pool-> 12 -conv5-> 8 -pool-> 4, fc1 input 50*4*4 = 800;
#     1*20*25 + 20*50*25 + 800*500 + 500*10 = 500 + 25,000 + 400,000 + 5,000 = 430,500 weights;
#     + 20 + 50 + 500 + 10 = 580 biases = 431,080.
#   Conv-2: (1*64*9+64) + (64*64*9+64) + (64*14*14*256+256) + (256*256+256) + (256*10+10)
#     = 640 + 36,928 + 3,211,520 + 65,792 + 2,570 = 3,317,450.
#   Conv-4: 640 + 36,928 + 73,856 + 147,584 + (128*7*7*256+256 = 1,605,888) + 65,792 + 2,570 = 1,933,258.
#   Conv-6: 259,008 (Conv-4's convs) + 295,168 + 590,080 + (256*3*3*256+256 = 590,080) + 65,792 + 2,570 = 1,802,698.
#   ResNet-20 (option-B shortcuts, BN weight+bias, no conv biases):
#     stem 1*16*9 + 32 = 176; stage 1: 3 * (2*16*16*9 + 2*32) = 14,016;
#     stage 2: (16*32*9 + 32*32*9 + 2*64 + 16*32 + 64) + 2 * (2*32*32*9 + 2*64) = 14,528 + 37,120 = 51,648;
#     stage 3: (32*64*9 + 64*64*9 + 2*128 + 32*64 + 128) + 2 * (2*64*64*9 + 2*128) = 57,728 + 147,968 = 205,696;
#     fc 64*10 + 10 = 650; total 176 + 14,016 + 51,648 + 205,696 + 650 = 272,186.
EXPECTED_PARAMS = {
    "lenet300": 266_610,
    "lenet5": 431_080,
    "conv2": 3_317_450,
    "conv4": 1_933_258,
    "conv6": 1_802_698,
    "resnet20": 272_186,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_count(name: str) -> None:
    assert n_params(get_model(name)) == EXPECTED_PARAMS[name]


def test_weight_counts_match_han_et_al() -> None:
    assert n_weights(LeNet300()) == 266_200
    assert n_weights(LeNet5()) == 430_500


def test_registry_is_complete() -> None:
    assert set(MODELS) == set(EXPECTED_PARAMS)


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
@pytest.mark.parametrize("width", [1.0, 0.5])
def test_forward_backward_shapes(name: str, width: float) -> None:
    torch.manual_seed(0)
    model = get_model(name, width=width)
    x = torch.randn(3, 1, 28, 28)
    out = model(x)
    assert out.shape == (3, 10)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_num_classes(name: str) -> None:
    assert get_model(name, num_classes=7)(torch.zeros(2, 1, 28, 28)).shape == (2, 7)


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_deterministic_given_seed(name: str) -> None:
    torch.manual_seed(123)
    a = get_model(name).state_dict()
    torch.manual_seed(123)
    b = get_model(name).state_dict()
    torch.manual_seed(124)
    c = get_model(name).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith("weight"))


def test_lenet300_width_scales_hidden_sizes() -> None:
    model = LeNet300(width=0.5)
    assert (model.fc1.out_features, model.fc2.out_features) == (150, 50)
    # 784*150+150 + 150*50+50 + 50*10+10 = 117,750 + 7,550 + 510
    assert n_params(model) == 125_810
    wide = LeNet300(width=2)
    assert (wide.fc1.out_features, wide.fc2.out_features) == (600, 200)


def test_lenet5_width_scales_all_layers() -> None:
    model = LeNet5(width=0.5)
    assert (model.conv1.out_channels, model.conv2.out_channels, model.fc1.out_features) == (10, 25, 250)
    # (1*10*25+10) + (10*25*25+25) + (25*16*250+250) + (250*10+10) = 260 + 6,275 + 100,250 + 2,510
    assert n_params(model) == 109_295


def test_tiny_width_keeps_at_least_one_unit() -> None:
    model = LeNet300(width=0.001)
    assert (model.fc1.out_features, model.fc2.out_features) == (1, 1)
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_conv_widths() -> None:
    convs = [m.out_channels for m in Conv6(width=0.25).modules() if isinstance(m, nn.Conv2d)]
    assert convs == [16, 16, 32, 32, 64, 64]
    assert [m.out_features for m in Conv2(width=0.25).classifier if isinstance(m, nn.Linear)] == [64, 64, 10]
    assert sum(isinstance(m, nn.MaxPool2d) for m in Conv4().modules()) == 2


def test_resnet_depth_and_width() -> None:
    model = ResNet(depth=32, width=2.0)
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3)] == [5, 5, 5]
    assert model.fc.in_features == 128
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    model.eval()  # BatchNorm in eval mode works on a single sample
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


@pytest.mark.parametrize("depth", [0, 7, 21, 2, 20.0, True])
def test_resnet_rejects_bad_depth(depth: object) -> None:
    with pytest.raises(ValueError, match=r"depth=.* must be 6n \+ 2"):
        ResNet(depth=depth)  # type: ignore[arg-type]


@pytest.mark.parametrize("width", [0, -1.0, float("nan"), "1", None, True])
def test_bad_width_is_rejected(width: object) -> None:
    with pytest.raises(ValueError, match=r"width=.* must be a positive number"):
        LeNet300(width=width)  # type: ignore[arg-type]


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ValueError) as info:
        get_model("vgg16")
    message = str(info.value)
    assert "'vgg16'" in message
    for name in MODELS:
        assert name in message


def test_lenet5_has_no_relu_after_convs() -> None:
    # Caffe's LeNet: conv -> pool -> conv -> pool -> fc -> ReLU -> fc. A negative-only conv response survives pooling.
    model = LeNet5()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.conv1.bias.fill_(-1.0)
        model.conv2.weight.fill_(1.0)  # conv2 output = -25 * 20 = -500 everywhere
        model.fc1.weight.fill_(-1.0)  # fc1 output = 800 * 500 = 400,000 > 0: the negatives came through
        model.fc2.weight.fill_(1.0)
    out = model(torch.zeros(1, 1, 28, 28))
    assert torch.allclose(out, torch.full((1, 10), 500 * 400_000.0))
