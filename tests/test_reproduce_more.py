"""gradual-vs-oneshot and large-vs-small reproductions (MLP + LSTM language model), word tokenisation, LSTM pruning.

The quick pipelines run on real data (MNIST, Fashion-MNIST, the Austen novels) and check the pipeline, not the
science; the sizing functions are checked against hand-computed counts.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from prunekit.cli import main
from prunekit.data.text import EOS, UNK, Vocabulary, words
from prunekit.models import LSTMLanguageModel
from prunekit.pruner import Pruner
from prunekit.reproduce import gradual_vs_oneshot, large_vs_small, run
from prunekit.reproduce.common import open_store
from prunekit.reproduce.large_vs_small import (
    LM_SETUP,
    LMSetup,
    batchify,
    lm_budgets,
    lm_weight_count,
    make_pruner,
    matching_hidden,
    matching_width,
    perplexity,
    train_lm,
)
from prunekit.reproduce.runs import build_schedule, train_and_prune
from prunekit.targets import find_prunable
from prunekit.train import TrainConfig


def _fail(*args, **kwargs):
    raise AssertionError("a finished configuration was trained again")


# --- quick pipelines (real data) ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_gradual_vs_oneshot_quick_writes_results_and_resumes(tmp_path, monkeypatch):
    doc = run("gradual-vs-oneshot", tmp_path, quick=True, progress=False)
    expected = {f"{m}/{d}/{method}/{s}/seed0" for m, d in (("lenet5", "mnist"), ("lenet300", "fashion-mnist"))
                for method, s in (("dense", 0.0), ("oneshot", 0.9), ("iterative", 0.9), ("gradual", 0.9))}
    assert set(doc["runs"]) == expected
    for key, rec in doc["runs"].items():
        assert rec["achieved_sparsity"] == pytest.approx(0.0 if "/dense/" in key else 0.9, abs=1e-3)
        assert 0.0 <= rec["test_accuracy"] <= 1.0
    on_disk = json.loads((tmp_path / "gradual_vs_oneshot.json").read_text())
    assert on_disk["commands"] and on_disk["environment"]["torch"] == torch.__version__
    assert on_disk["meta"]["quick"] is True and len(on_disk["summary"]) == 8
    assert "| model | data | sparsity | one-shot | iterative | gradual | dense |" in (
        tmp_path / "gradual_vs_oneshot.md").read_text()
    assert (tmp_path / "gradual_vs_oneshot.png").read_bytes()[:4] == b"\x89PNG"
    # rerun: every configuration is finished, nothing trains, same results
    monkeypatch.setattr(gradual_vs_oneshot, "train_and_prune", _fail)
    again = run("gradual-vs-oneshot", tmp_path, quick=True, progress=False)
    assert again["runs"] == doc["runs"]
    # the same directory in full mode would mix configurations: refused before any training
    with pytest.raises(ValueError, match="another configuration"):
        gradual_vs_oneshot.run(tmp_path, quick=False, progress=False)


@pytest.mark.slow
def test_large_vs_small_quick_both_sections_and_resume(tmp_path, monkeypatch):
    out = run("large-vs-small", tmp_path, quick=True, progress=False)
    mlp, lstm = out["mlp"], out["lstm"]
    for stem in ("large_vs_small", "large_vs_small_lstm"):
        assert json.loads((tmp_path / f"{stem}.json").read_text())["commands"]
        assert (tmp_path / f"{stem}.md").read_text().count("|") > 10
        assert (tmp_path / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
    # MLP: the sparse model and the narrow dense one have (nearly) the same number of non-zero weights
    for b in mlp["meta"]["budgets"]:
        sparse, dense = (mlp["runs"][f"mnist/{k}/{b['sparsity']}/seed0"] for k in ("large_sparse", "small_dense"))
        assert sparse["nonzero_weights"] == b["nonzero_weights"]
        assert dense["nonzero_weights"] == b["dense_weights"] and dense["width"] == b["width"]
    # LSTM: large dense + (large sparse, small dense) per budget
    runs = lstm["runs"]
    assert set(runs) == {"large_dense/0.0/seed0"} | {f"{k}/{s}/seed0" for s in (0.8, 0.9, 0.95)
                                                     for k in ("large_sparse", "small_dense")}
    for b in lstm["meta"]["budgets"]:
        sparse, small = runs[f"large_sparse/{b['sparsity']}/seed0"], runs[f"small_dense/{b['sparsity']}/seed0"]
        assert sparse["pruned_but_nonzero"] == 0
        assert sparse["achieved_sparsity"] == pytest.approx(b["sparsity"], abs=1e-3)
        for s in sparse["per_tensor_sparsity"].values():  # uniform: every matrix at the budget
            assert s == pytest.approx(b["sparsity"], abs=0.01)
        assert abs(sparse["nonzero_weights"] - b["nonzero_weights"]) <= 6  # rounding per tensor (6 matrices)
        assert small["hidden"] == b["small_hidden"] and small["nonzero_weights"] == b["small_weights"]
        assert math.isfinite(sparse["test_ppl"]) and math.isfinite(small["test_ppl"])
    assert "| budget | large model |" in (tmp_path / "large_vs_small_lstm.md").read_text()
    # rerun: nothing trains
    monkeypatch.setattr(large_vs_small, "train_and_prune", _fail)
    monkeypatch.setattr(large_vs_small, "lm_run", _fail)
    again = run("large-vs-small", tmp_path, quick=True, progress=False)
    assert again["lstm"]["runs"] == runs and again["mlp"]["runs"] == mlp["runs"]
    with pytest.raises(ValueError, match="another configuration"):
        large_vs_small.run_mlp(tmp_path, quick=False, progress=False)


@pytest.mark.slow
def test_cli_reproduce_lstm_quick(tmp_path, capsys):
    assert main(["reproduce", "large-vs-small-lstm", "--quick", "--quiet", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "test perplexity" in printed and "| 80% |" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # no lock file left behind
        "large_vs_small_lstm.json", "large_vs_small_lstm.md", "large_vs_small_lstm.png"]


# --- LSTM pruning --------------------------------------------------------------------------------------------------

def test_lstm_weights_are_prunable_targets():
    lstm = nn.LSTM(4, 8, num_layers=2)
    assert list(find_prunable(lstm, types=[nn.LSTM])) == ["weight_ih_l0", "weight_hh_l0", "weight_ih_l1",
                                                          "weight_hh_l1"]
    model = LSTMLanguageModel(30, 8)
    names = list(find_prunable(model, types=(nn.Embedding, nn.LSTM, nn.Linear)))
    assert names == ["embedding.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l1",
                     "lstm.weight_hh_l1", "decoder.weight"]
    assert list(find_prunable(model)) == ["decoder.weight"]  # defaults unchanged: Linear/Conv only


def test_lstm_pruned_weights_stay_zero_and_sparsity_is_counted():
    torch.manual_seed(0)
    setup = LMSetup(max_words=50, hidden=16, batch_size=4, bptt=6, epochs=1.0, updates=4, lr=1e-2)
    model = LSTMLanguageModel(51, 16, dropout=0.1)
    steps = 40
    pruner = make_pruner(model, 0.9, steps, setup)
    assert pruner.schedule.start == 2 and pruner.schedule.end == 2 + 4 * 5  # 5% .. 55% of 40 steps, 4 updates
    ids = torch.randint(51, (4 * 6 * 12,))
    history = train_lm(model, ids, setup, pruner=pruner, steps=steps)
    assert history["steps"] == steps and math.isfinite(history["final_train_loss"])
    params = dict(model.named_parameters())
    total_zero = 0
    for name, mask in pruner.masks.items():
        w = params[name]
        assert not w[~mask].any(), f"pruned weights of {name} came back"  # Adam moved them; the mask re-zeroed them
        assert int((w == 0).sum()) == int((~mask).sum())  # every zero is a pruned weight (no accidental zeros)
        assert (~mask).sum().item() == round(0.9 * w.numel())  # uniform: each matrix exactly at its target
        total_zero += int((w == 0).sum())
    weights = lm_weight_count(51, 16)
    assert sum(m.numel() for m in pruner.masks.values()) == weights
    assert total_zero / weights == pytest.approx(pruner.masks.sparsity())
    assert not any("bias" in n for n in pruner.masks)  # biases are not pruned


def test_perplexity_of_uniform_predictions_is_the_vocabulary_size():
    model = LSTMLanguageModel(37, 5)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # logits = decoder bias = 0 -> uniform over 37 words
    assert perplexity(model, torch.arange(200) % 37, batch_size=4, bptt=7) == pytest.approx(37.0, rel=1e-5)


# --- sizing (hand-computed oracles) --------------------------------------------------------------------------------

def test_lm_weight_count_and_matching_hidden_by_hand():
    # embedding 10,001*650 + decoder 650*10,001 = 13,001,300; LSTM 2 layers * (4*650*650 + 4*650*650) = 6,760,000
    assert lm_weight_count(10_001, 650) == 19_761_300
    model = LSTMLanguageModel(101, 12)
    assert sum(p.numel() for n, p in model.named_parameters() if "weight" in n) == lm_weight_count(101, 12)
    # V = 100: count(H) = 200 H + 16 H^2; count(12) = 2,400 + 2,304 = 4,704, count(13) = 2,600 + 2,704 = 5,304
    assert matching_hidden(5000, 100) == 12  # |5000 - 4704| = 296 < |5304 - 5000| = 304
    assert matching_hidden(5010, 100) == 13  # 306 > 294
    assert matching_hidden(5004, 100) == 12  # a tie (300 each) goes to the smaller model
    assert matching_hidden(1, 100) == 1
    # the full-mode budgets: 80/90/95% of 19,761,300 leave 3,952,260 / 1,976,130 / 988,065 non-zeros;
    # count(174) = 2*10,001*174 + 16*174^2 = 3,480,348 + 484,416 = 3,964,764 (count(173) = 3,939,210)
    budgets = lm_budgets(10_001, LM_SETUP, (0.8, 0.9, 0.95))
    assert [b["nonzero_weights"] for b in budgets] == [3_952_260, 1_976_130, 988_065]
    assert [b["small_hidden"] for b in budgets] == [174, 92, 48]
    assert budgets[0]["small_weights"] == 3_964_764 and lm_weight_count(10_001, 173) == 3_939_210


def test_matching_width_by_hand():
    # LeNet-300-100 has 784*300 + 300*100 + 100*10 = 266,200 weights; 90% sparse leaves 26,620.
    # Width 0.1084 gives hidden (33, 11): 784*33 + 33*11 + 11*10 = 25,872 + 363 + 110 = 26,345 (off by 275);
    # the next sizes are (34, 11): 27,140 (off by 520) and (32, 11): 25,550 (off by 1,070). 0.1083 rounds to 32.
    assert matching_width(26_620) == 0.1084
    budget = large_vs_small.mlp_budgets([0.9])[0]
    assert budget["hidden"] == [33, 11] and budget["dense_weights"] == 26_345 and budget["nonzero_weights"] == 26_620


# --- word tokenisation ---------------------------------------------------------------------------------------------

def test_words_rules():
    text = "It is a truth universally acknowledged... Mr. Bennet\u2019s _wife_ said: \"No!\" Don't--sister-in-law? 1811"
    assert words(text) == ["it", "is", "a", "truth", "universally", "acknowledged", EOS, "mr", "bennet's", "wife",
                           "said", "no", EOS, "don't", "sister", "in", "law", EOS, "1811"]
    assert words("") == [] and words("?!. ...") == []
    with pytest.raises(TypeError, match="str"):
        words(None)  # type: ignore[arg-type]


def test_vocabulary_build_encode_roundtrip():
    vocab = Vocabulary.build(["b", "a", "c", "b", "a", "d"], max_words=2)
    assert vocab.words == (UNK, "a", "b")  # a and b twice (alphabetical tie-break), c and d cut
    assert vocab.encode(["a", "d", "b"]).tolist() == [1, 0, 2]
    assert vocab.coverage(["a", "d"]) == 0.5
    assert Vocabulary.from_dict(json.loads(json.dumps(vocab.to_dict()))) == vocab
    with pytest.raises(ValueError, match="outside"):
        vocab.decode([3])
    with pytest.raises(ValueError, match="max_words"):
        Vocabulary.build(["a"], max_words=0)
    with pytest.raises(ValueError, match="no tokens"):
        Vocabulary.build([], max_words=5)
    with pytest.raises(ValueError, match="first word"):
        Vocabulary(("a", UNK))


# --- bad input -----------------------------------------------------------------------------------------------------

def test_bad_input_gives_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="positive integer"):
        matching_hidden(0, 100)
    with pytest.raises(ValueError, match="positive number of weights"):
        matching_width(-5)
    with pytest.raises(ValueError, match="hidden must be a positive integer"):
        LMSetup(hidden=0)
    with pytest.raises(ValueError, match="prune_start < prune_end"):
        LMSetup(prune_start=0.6, prune_end=0.5)
    with pytest.raises(ValueError, match="sections"):
        large_vs_small.run(tmp_path, quick=True, sections=("cnn",))
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        large_vs_small.run_lstm(tmp_path, quick=True, sparsities=(1.0,))
    with pytest.raises(ValueError, match="large dense model"):
        large_vs_small.run_lstm(tmp_path, quick=True, sparsities=(0.0, 0.9))
    with pytest.raises(ValueError, match="streams"):
        batchify(torch.arange(5), 4)
    with pytest.raises(ValueError, match="seed"):
        gradual_vs_oneshot.run(tmp_path, quick=True, seeds=())
    with pytest.raises(ValueError, match="unknown method"):
        gradual_vs_oneshot.schedule_for("twice", 4)
    with pytest.raises(ValueError, match="unknown method"):
        build_schedule("sometimes", 10, start=0, end=1)
    with pytest.raises(ValueError, match="unknown tool"):
        train_and_prune(model_name="lenet300", data_name="mnist", tool="nni", sparsity=0.9, seed=0,
                        tcfg=TrainConfig(epochs=1), schedule_fn=lambda spe: None)
    with pytest.raises(ValueError, match="dropout"):
        LSTMLanguageModel(10, 4, dropout=1.0)
    # a results file of one configuration is not resumed with another
    open_store(tmp_path / "r.json", "demo", {"quick": True}).save()
    open_store(tmp_path / "r.json", "demo", {"quick": True})  # same configuration: fine
    with pytest.raises(ValueError, match=r"different \['quick'\]"):
        open_store(tmp_path / "r.json", "demo", {"quick": False})


def test_lstm_pruner_via_plain_pruner_keeps_zeros_through_state_dict_roundtrip():
    torch.manual_seed(1)
    model = LSTMLanguageModel(20, 6)
    pruner = Pruner(model, 0.5, types=(nn.LSTM,), allocation="uniform")
    pruner.step()
    fresh = LSTMLanguageModel(20, 6)
    fresh.load_state_dict(model.state_dict(), strict=True)  # original keys, nothing added
    assert all((fresh.get_parameter(n) == 0).sum() == (~m).sum() for n, m in pruner.masks.items())
