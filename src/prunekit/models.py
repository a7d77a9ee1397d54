"""Small reference models for 28x28 grayscale images and 10 classes (MNIST, Fashion-MNIST).

All models are plain ``nn.Module`` s with PyTorch's default initialisation, so they are deterministic given
``torch.manual_seed``. Every model takes a ``width`` multiplier that scales its hidden sizes (channels and hidden
units, rounded to the nearest integer, at least 1), for comparing a large sparse model with a small dense one.

- :class:`LeNet300`: LeNet-300-100 (LeCun et al. 1998; Han et al. 2015), 266,610 parameters.
- :class:`LeNet5`: the Caffe LeNet-5 used by Han et al. 2015, https://arxiv.org/abs/1506.02626, 431,080 parameters.
- :class:`Conv2`, :class:`Conv4`, :class:`Conv6`: the lottery-ticket CNNs of Frankle & Carbin 2019,
  https://arxiv.org/abs/1803.03635, adapted to 28x28x1 input.
- :class:`ResNet`: CIFAR-style ResNet (He et al. 2016, https://arxiv.org/abs/1512.03385) with ``6n + 2`` layers;
  ``"resnet20"`` in :data:`MODELS` is depth 20.

And one language model (not in :data:`MODELS`, which holds the image classifiers):

- :class:`LSTMLanguageModel`: embedding -> stacked LSTM -> decoder, the word-level model of Zaremba et al. 2014
  (https://arxiv.org/abs/1409.2329) that Zhu & Gupta 2017 prune.

Examples:
    >>> import torch
    >>> model = get_model("lenet300")
    >>> model(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["MODELS", "Conv2", "Conv4", "Conv6", "LSTMLanguageModel", "LeNet5", "LeNet300", "ResNet", "get_model"]


def _scaled(size: int, width: float) -> int:
    """``size * width`` rounded to the nearest integer, at least 1."""
    return max(1, round(size * width))


def _check_width(width: float) -> float:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"width={width!r} must be a positive number (1.0 = the published size, 0.5 = half as wide)")
    return float(width)


class LeNet300(nn.Module):
    """LeNet-300-100: a 784-300-100-10 MLP with ReLU.

    At ``width=1``: weights 784*300 + 300*100 + 100*10 = 266,200; biases 300 + 100 + 10 = 410; 266,610 in all.

    Args:
        width: Multiplier of the hidden sizes 300 and 100.
        num_classes: Number of outputs.

    Examples:
        >>> sum(p.numel() for p in LeNet300().parameters())
        266610
        >>> LeNet300(width=0.5).fc1.out_features
        150
    """

    def __init__(self, width: float = 1.0, num_classes: int = 10) -> None:
        super().__init__()
        width = _check_width(width)
        h1, h2 = _scaled(300, width), _scaled(100, width)
        self.fc1 = nn.Linear(28 * 28, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for images ``(B, 1, 28, 28)`` (any shape with 784 values per sample)."""
        x = x.flatten(1)  # (B, 784)
        x = torch.relu(self.fc1(x))  # (B, 300w)
        x = torch.relu(self.fc2(x))  # (B, 100w)
        return self.fc3(x)  # (B, num_classes)


class LeNet5(nn.Module):
    """Caffe's LeNet-5 as pruned by Han et al. 2015 ("Learning both Weights and Connections").

    conv 20@5x5 -> maxpool 2 -> conv 50@5x5 -> maxpool 2 -> fc 500 -> ReLU -> fc 10; no padding, and (as in Caffe's
    ``lenet_train_test.prototxt``) no nonlinearity after the convolutions.

    Shapes: 28 -> conv 24 -> pool 12 -> conv 8 -> pool 4, so fc1 sees 50*4*4 = 800 inputs. At ``width=1``:
    weights 1*20*25 = 500, 20*50*25 = 25,000, 800*500 = 400,000, 500*10 = 5,000 -> 430,500; biases
    20 + 50 + 500 + 10 = 580; 431,080 in all.

    Args:
        width: Multiplier of the sizes 20, 50 and 500.
        num_classes: Number of outputs.

    Examples:
        >>> sum(p.numel() for p in LeNet5().parameters())
        431080
    """

    def __init__(self, width: float = 1.0, num_classes: int = 10) -> None:
        super().__init__()
        width = _check_width(width)
        c1, c2, h = _scaled(20, width), _scaled(50, width), _scaled(500, width)
        self.conv1 = nn.Conv2d(1, c1, kernel_size=5)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(c2 * 4 * 4, h)
        self.fc2 = nn.Linear(h, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for images ``(B, 1, 28, 28)``."""
        x = self.pool(self.conv1(x))  # (B, 20w, 12, 12)
        x = self.pool(self.conv2(x))  # (B, 50w, 4, 4)
        x = torch.relu(self.fc1(x.flatten(1)))  # (B, 500w)
        return self.fc2(x)  # (B, num_classes)


class _ConvNet(nn.Module):
    """Frankle & Carbin's Conv-2/4/6: pairs of 3x3 convs (padding 1, ReLU), max-pool 2 after each pair, then
    FC 256 -> 256 -> num_classes with ReLU.

    On 28x28x1 input the pools give 14, 7, 3 pixels per side (floor), so the first FC sees
    ``channels * side**2`` inputs.
    """

    def __init__(self, channels: Sequence[int], width: float, num_classes: int) -> None:
        super().__init__()
        width = _check_width(width)
        layers: list[nn.Module] = []
        in_ch, side = 1, 28
        for i, ch in enumerate(channels):
            out_ch = _scaled(ch, width)
            layers += [nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1), nn.ReLU()]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
                side //= 2
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        hidden = _scaled(256, width)
        self.classifier = nn.Sequential(
            nn.Linear(in_ch * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for images ``(B, 1, 28, 28)``."""
        x = self.features(x)  # (B, C, side, side)
        return self.classifier(x.flatten(1))  # (B, num_classes)


class Conv2(_ConvNet):
    """Conv-2: convs 64, 64, pool; FC 256-256-10.

    At ``width=1``: convs 1*64*9+64 = 640 and 64*64*9+64 = 36,928; FC 64*14*14*256+256 = 3,211,520,
    256*256+256 = 65,792, 256*10+10 = 2,570; 3,317,450 in all.

    Args:
        width: Multiplier of all channel counts and the FC sizes 256.
        num_classes: Number of outputs.

    Examples:
        >>> sum(p.numel() for p in Conv2().parameters())
        3317450
    """

    def __init__(self, width: float = 1.0, num_classes: int = 10) -> None:
        super().__init__((64, 64), width, num_classes)


class Conv4(_ConvNet):
    """Conv-4: convs 64, 64, pool, 128, 128, pool; FC 256-256-10.

    At ``width=1``: convs 640 + 36,928 + (64*128*9+128 = 73,856) + (128*128*9+128 = 147,584) = 259,008;
    FC 128*7*7*256+256 = 1,605,888, 65,792, 2,570; 1,933,258 in all.

    Args:
        width: Multiplier of all channel counts and the FC sizes 256.
        num_classes: Number of outputs.

    Examples:
        >>> sum(p.numel() for p in Conv4().parameters())
        1933258
    """

    def __init__(self, width: float = 1.0, num_classes: int = 10) -> None:
        super().__init__((64, 64, 128, 128), width, num_classes)


class Conv6(_ConvNet):
    """Conv-6: convs 64, 64, pool, 128, 128, pool, 256, 256, pool; FC 256-256-10.

    At ``width=1``: convs 259,008 + (128*256*9+256 = 295,168) + (256*256*9+256 = 590,080) = 1,144,256;
    FC 256*3*3*256+256 = 590,080, 65,792, 2,570; 1,802,698 in all.

    Args:
        width: Multiplier of all channel counts and the FC sizes 256.
        num_classes: Number of outputs.

    Examples:
        >>> sum(p.numel() for p in Conv6().parameters())
        1802698
    """

    def __init__(self, width: float = 1.0, num_classes: int = 10) -> None:
        super().__init__((64, 64, 128, 128, 256, 256), width, num_classes)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection; a 1x1 conv-BN projection when the shape changes.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first conv (2 halves the resolution).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in, H, W) -> (B, out, H / stride, W / stride)``."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet for 28x28x1 input: a 3x3 conv stem, three stages of BasicBlocks, global average pooling.

    Stages have ``(depth - 2) / 6`` blocks each and widths 16, 32, 64 (times ``width``); stages 2 and 3 start with
    stride 2 (28 -> 14 -> 7). Where the shape changes the shortcut is a 1x1 conv + BatchNorm (He et al.'s option B),
    which structured pruning can shrink like any other conv.

    Args:
        depth: Number of weighted layers on the main path, ``6n + 2`` (20, 32, 44, 56, ...).
        width: Multiplier of the stage widths 16, 32, 64.
        num_classes: Number of outputs.

    Raises:
        ValueError: ``depth`` is not of the form ``6n + 2`` with ``n >= 1``.

    Examples:
        >>> import torch
        >>> ResNet(depth=8)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, depth: int = 20, width: float = 1.0, num_classes: int = 10) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth={depth!r} must be 6n + 2 for an integer n >= 1, e.g. 20, 32, 44 or 56")
        width = _check_width(width)
        blocks_per_stage = (depth - 2) // 6
        widths = [_scaled(w, width) for w in (16, 32, 64)]
        self.conv1 = nn.Conv2d(1, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages: list[nn.Module] = []
        in_ch = widths[0]
        for i, out_ch in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(in_ch, out_ch, stride))
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for images ``(B, 1, 28, 28)``."""
        x = torch.relu(self.bn1(self.conv1(x)))  # (B, 16w, 28, 28)
        x = self.layer1(x)  # (B, 16w, 28, 28)
        x = self.layer2(x)  # (B, 32w, 14, 14)
        x = self.layer3(x)  # (B, 64w, 7, 7)
        x = x.mean(dim=(2, 3))  # (B, 64w)
        return self.fc(x)  # (B, num_classes)


class LSTMLanguageModel(nn.Module):
    """Word-level language model: embedding -> ``layers``-layer LSTM -> linear decoder over the vocabulary.

    The "medium"/"large" models of Zaremba et al. 2014 (https://arxiv.org/abs/1409.2329), which Zhu & Gupta 2017
    (https://arxiv.org/abs/1710.01878) prune on the Penn Treebank: the embedding size equals ``hidden``, dropout is
    applied to the embedding output, between LSTM layers and before the decoder, and weights start uniform in
    ``[-init_range, init_range]`` (Zaremba: 0.05 for 650 units; biases 0). With ``tie_weights`` the decoder reuses the
    embedding matrix (Press & Wolf 2017); the paper's models are untied.

    Weights (the matrices a pruner targets): ``embedding.weight`` (V, E), ``lstm.weight_ih_l{k}`` (4H, E or H),
    ``lstm.weight_hh_l{k}`` (4H, H), ``decoder.weight`` (V, H); with E = H that is ``2*V*H + 8*H*H*layers`` (untied).
    Biases: ``lstm.bias_ih_l{k}``/``bias_hh_l{k}`` (4H each) and ``decoder.bias`` (V).

    Args:
        vocab_size: V, number of token ids.
        hidden: H, LSTM units per layer (and the embedding size).
        layers: Number of stacked LSTM layers.
        dropout: Dropout probability (0 = none).
        tie_weights: Share the embedding and decoder matrices.
        init_range: Half-width of the uniform initialisation.

    Examples:
        >>> model = LSTMLanguageModel(vocab_size=100, hidden=8)
        >>> logits, state = model(torch.zeros(5, 3, dtype=torch.long))  # (T, B) token ids
        >>> logits.shape, state[0].shape
        (torch.Size([5, 3, 100]), torch.Size([2, 3, 8]))
        >>> sum(p.numel() for n, p in model.named_parameters() if "weight" in n) == 2 * 100 * 8 + 8 * 8 * 8 * 2
        True
    """

    def __init__(self, vocab_size: int, hidden: int, layers: int = 2, *, dropout: float = 0.0,
                 tie_weights: bool = False, init_range: float = 0.05) -> None:
        super().__init__()
        for value, what in ((vocab_size, "vocab_size"), (hidden, "hidden"), (layers, "layers")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{what} must be a positive integer, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        self.vocab_size, self.hidden, self.layers = vocab_size, hidden, layers
        self.embedding = nn.Embedding(vocab_size, hidden)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(hidden, hidden, layers, dropout=dropout if layers > 1 else 0.0)
        self.decoder = nn.Linear(hidden, vocab_size)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                else:
                    p.uniform_(-init_range, init_range)
        if tie_weights:
            self.decoder.weight = self.embedding.weight

    def init_state(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero ``(h, c)``, each ``(layers, B, H)``; ``H`` is read from the LSTM, so it follows structured pruning."""
        weight = self.decoder.weight
        zeros = weight.new_zeros(self.lstm.num_layers, batch_size, self.lstm.hidden_size)
        return zeros, zeros.clone()

    def forward(self, tokens: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Logits ``(T, B, V)`` for token ids ``(T, B)`` (time first), and the final ``(h, c)`` state."""
        x = self.drop(self.embedding(tokens))  # (T, B, H)
        out, state = self.lstm(x, state)  # (T, B, H); h, c: (layers, B, H)
        return self.decoder(self.drop(out)), state  # (T, B, V)


def _resnet20(width: float = 1.0, num_classes: int = 10) -> ResNet:
    return ResNet(depth=20, width=width, num_classes=num_classes)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet300": LeNet300,
    "lenet5": LeNet5,
    "conv2": Conv2,
    "conv4": Conv4,
    "conv6": Conv6,
    "resnet20": _resnet20,
}
"""Model name -> constructor; every constructor accepts ``width`` and ``num_classes`` keywords."""


def get_model(name: str, **kwargs: object) -> nn.Module:
    """Build a registered model.

    Args:
        name: A key of :data:`MODELS`.
        **kwargs: Passed to the constructor (``width``, ``num_classes``).

    Returns:
        A freshly initialised model (deterministic given ``torch.manual_seed``).

    Raises:
        ValueError: Unknown name.

    Examples:
        >>> get_model("vgg16")
        Traceback (most recent call last):
        ...
        ValueError: unknown model 'vgg16'; valid names are ['conv2', 'conv4', 'conv6', 'lenet300', 'lenet5', 'resnet20']
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names are {sorted(MODELS)}")
    return MODELS[name](**kwargs)
