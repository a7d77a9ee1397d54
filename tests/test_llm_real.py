"""Integration tests on the real SmolLM2-135M and Jane Austen's novels (fetched and cached on first use)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol() -> tuple[Any, Any, torch.Tensor]:
    from prunekit.data.llm import smollm2
    from prunekit.data.text import austen

    model, tokenizer = smollm2()
    ids = torch.tensor(tokenizer(austen("persuasion")[:20_000]).input_ids)
    return model, tokenizer, ids


def test_austen_corpus() -> None:
    from prunekit.data.text import NOVELS, austen

    lengths = {n: len(austen(n)) for n in NOVELS}
    assert sum(lengths.values()) > 4_000_000
    assert austen("prideprejudice").lstrip().startswith("PRIDE AND PREJUDICE")


def test_wanda_beats_magnitude_on_smollm2(smol: tuple[Any, Any, torch.Tensor]) -> None:
    import prunekit.llm
    from prunekit.data.text import austen, calibration_windows, eval_windows

    model, tokenizer, ids = smol
    assert type(model).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in model.parameters()) == 134_515_008
    windows = eval_windows(ids, 128)[:2]
    dense = prunekit.llm.perplexity(model, windows, progress=False)
    assert 10 < dense < 100
    calib = calibration_windows(torch.tensor(tokenizer(austen("emma")[:50_000]).input_ids), n=4, length=128)
    blocks = [f"model.layers.{i}" for i in range(8)]  # the first 8 of 30 blocks keep the test short
    saved = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("model.layers.")}
    results = {}
    try:
        for method in ("wanda", "magnitude"):
            masks = prunekit.llm.prune(model, calib, method=method, sparsity=0.5, blocks=blocks, progress=False)
            assert masks.sparsity() == 0.5 and len(masks) == 8 * 7
            results[method] = prunekit.llm.perplexity(model, windows, progress=False)
            model.load_state_dict(saved, strict=False)
    finally:
        model.load_state_dict(saved, strict=False)
    assert dense < results["wanda"] < results["magnitude"]


def test_sparsegpt_two_blocks_of_smollm2(smol: tuple[Any, Any, torch.Tensor]) -> None:
    import prunekit.llm

    model, _, ids = smol
    blocks = ["model.layers.0", "model.layers.1"]
    saved = {k: v.clone() for k, v in model.state_dict().items()
             if k.startswith(("model.layers.0.", "model.layers.1."))}
    try:
        masks = prunekit.llm.prune(model, ids[:256].view(2, 128), method="sparsegpt", pattern="2:4", blocks=blocks,
                                   progress=False)
        assert len(masks) == 14
        for name, keep in masks.items():
            assert bool(((~keep).view(keep.shape[0], -1, 4).sum(-1) == 2).all()), name
        with torch.no_grad():
            assert torch.isfinite(model(ids[None, :64]).logits).all()
    finally:
        model.load_state_dict(saved, strict=False)


def test_cli_on_smollm2(tmp_path: Path) -> None:
    from prunekit.cli import main

    out = tmp_path / "run"
    code = main(["llm", "--model", "smollm2", "--method", "magnitude", "--sparsity", "0.3", "--calibration", "austen",
                 "--n-calibration", "1", "--seq-len", "64", "--eval-windows", "1", "--out", str(out), "--quiet"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["achieved_sparsity"] == pytest.approx(0.3, abs=1e-3)
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "tokenizer.json").is_file()
