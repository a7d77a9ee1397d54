"""Tests for ``prunekit llm`` on a tiny Llama with a character-level tokenizer, and on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prunekit.cli import main
from prunekit.fileformat import read


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = " etaoinshrdlcumwfgypbvk.,;'\"-!?\nETAOINSHRDLCUMWFGYPBVKjxqzJXQZ0123456789"
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(dict.fromkeys(chars))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_llm_command_prunes_and_writes_everything(tiny_model_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    text = tmp_path / "calibration.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife.\n" * 20, encoding="utf-8")
    code = main(["llm", "--model", str(tiny_model_dir), "--method", "wanda", "--pattern", "2:4", "--calibration",
                 str(text), "--n-calibration", "4", "--seq-len", "32", "--eval-windows", "2", "--eval-dense",
                 "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "50.00% sparsity" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["achieved_sparsity"] == 0.5 and metrics["eval_windows"] == 2
    assert metrics["perplexity"] > 0 and metrics["dense_perplexity"] > 0
    masks, meta = read(out / "masks.safetensors", kind="masks")
    assert len(masks) == 14 and meta["method"] == "wanda"
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    for name, keep in masks.items():
        assert bool((reloaded.get_parameter(name)[~keep] == 0).all()), name
    assert (out / "report.txt").is_file() and (out / "report.json").is_file()


@pytest.mark.parametrize("inputs", [None, "pruned", "dense"])
def test_llm_command_passes_the_calibration_inputs_choice(tiny_model_dir: Path, tmp_path: Path, inputs: str | None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import prunekit.llm

    seen = []
    original = prunekit.llm.prune

    def spy(*args, **kwargs):
        seen.append(kwargs.get("inputs"))
        return original(*args, **kwargs)

    monkeypatch.setattr(prunekit.llm, "prune", spy)
    text = tmp_path / "calibration.txt"
    text.write_text("Emma Woodhouse, handsome, clever, and rich. " * 10, encoding="utf-8")
    extra = [] if inputs is None else ["--inputs", inputs]
    code = main(["llm", "--model", str(tiny_model_dir), "--method", "wanda", "--sparsity", "0.5", "--n-calibration",
                 "2", "--seq-len", "16", "--eval", "none", "--calibration", str(text), "--out", str(tmp_path / "o"),
                 "--quiet", *extra])
    assert code == 0 and seen == [inputs]  # None: the library's default for the method


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "wanda", "--pattern", "2:x"], "look like '2:4'"),
        (["--method", "wanda", "--sparsity", "0.5", "--model", "/nonexistent"], "not a Hugging Face model folder"),
        (["--method", "wanda", "--sparsity", "1.5"], r"\[0, 1\)"),
        (["--method", "wanda", "--pattern", "2:3"], "does not divide"),
        (["--method", "wanda", "--sparsity", "0.5", "--calibration", "/nonexistent.txt"], "expected 'austen' or"),
        (["--method", "wanda", "--sparsity", "0.5", "--batch-size", "0"], "--batch-size >= 1"),
    ],
)
def test_llm_command_bad_input(tiny_model_dir: Path, tmp_path: Path, args: list[str], message: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "calibration.txt"
    text.write_text("Emma Woodhouse, handsome, clever, and rich. " * 10, encoding="utf-8")
    base = ["llm", "--model", str(tiny_model_dir), "--n-calibration", "2", "--seq-len", "16", "--eval", "none",
            "--calibration", str(text), "--out", str(tmp_path / "o"), "--quiet"]
    code = main(base + args)
    assert code == 2
    err = capsys.readouterr().err
    assert "prunekit llm: error:" in err
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "o").exists()  # rejected before the output folder is made
