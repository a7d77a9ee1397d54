"""The command line on real data: prune runs resume, reports, clear errors (exit status 2, no traceback)."""

from __future__ import annotations

import json

import pytest

from prunekit import cli
from prunekit.cli import main

pytestmark = pytest.mark.slow

BASE = ["prune", "--model", "lenet300", "--data", "mnist", "--epochs", "2", "--train-subset", "6000",
        "--sparsity", "0.8", "--schedule", "gradual", "--start", "0", "--end", "1", "--quiet"]


def test_prune_run_writes_everything_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*BASE, "--out", str(out)]) == 0
    for name in ("config.json", "checkpoint.safetensors", "history.json", "metrics.json", "report.txt",
                 "report.json", "sparsity.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sparsity"] == pytest.approx(0.8, abs=1e-5)
    assert metrics["test_accuracy"] > 0.85  # 2 epochs on 6k images at 80% sparsity
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["sparsity"] == pytest.approx(0.8, abs=1e-5)
    capsys.readouterr()

    # the same command again: nothing left to train, same result
    assert main([*BASE, "--out", str(out)]) == 0
    assert "resuming" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["test_accuracy"] == metrics["test_accuracy"]

    # report subcommand reads the run directory
    assert main(["report", str(out), "--json", str(tmp_path / "r.json")]) == 0
    assert "total (prunable)" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["totals"]["nonzeros"] == report["totals"]["nonzeros"]


def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch, capsys):
    import prunekit.cli as cli
    from prunekit.checkpoint import load
    from prunekit.models import get_model

    full, part = tmp_path / "full", tmp_path / "part"
    assert main([*BASE, "--out", str(full)]) == 0

    real_save = cli.save
    calls = []

    def save_then_interrupt(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(1)
        raise KeyboardInterrupt  # the session dies right after the epoch-1 checkpoint is written

    monkeypatch.setattr(cli, "save", save_then_interrupt)
    assert main([*BASE, "--out", str(part)]) == 130
    assert len(calls) == 1 and not (part / "metrics.json").exists()
    monkeypatch.setattr(cli, "save", real_save)
    capsys.readouterr()
    assert main([*BASE, "--out", str(part)]) == 0
    assert "resuming" in capsys.readouterr().out

    a = load(full / "checkpoint.safetensors", get_model("lenet300"))
    b = load(part / "checkpoint.safetensors", get_model("lenet300"))
    assert a.pruner.masks.equal(b.pruner.masks)
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert (x == y).all(), name
    m_full = json.loads((full / "metrics.json").read_text())
    m_part = json.loads((part / "metrics.json").read_text())
    assert m_full["test_accuracy"] == m_part["test_accuracy"]


def test_changed_config_in_same_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*BASE, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main([*BASE[:-1], "--sparsity", "0.9", "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sparsity", "1.5"], "[0, 1)"),
        (["--end", "-1", "--start", "0"], "before its start"),
        (["--include", "nothing*"], "matches no parameter"),
        (["--weights", "/nonexistent/w.pth"], "no weights file"),
    ],
)
def test_bad_input_exit_2_with_message(tmp_path, capsys, args, message):
    code = main([*BASE, "--out", str(tmp_path / "x"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err


def test_unknown_choice_is_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit) as exc:
        main([*BASE, "--criterion", "tailor"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_structured_criterion_without_structured_is_a_clear_error(tmp_path, capsys):
    assert main([*BASE, "--criterion", "taylor", "--out", str(tmp_path / "run")]) == 2
    assert "unknown criterion 'taylor'" in capsys.readouterr().err


def test_report_needs_model_without_config(tmp_path, capsys):
    from torch import nn

    from prunekit.checkpoint import save

    save(nn.Linear(2, 2), tmp_path / "c.safetensors")
    assert main(["report", str(tmp_path / "c.safetensors")]) == 2
    assert "pass --model" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "lr"), [(["--model", "lenet5", "--data", "mnist"], 0.05), (["--model", "lenet300", "--data", "mnist"], 0.1),
                                          (["--model", "lenet5", "--data", "mnist", "--lr", "0.02"], 0.02)])
def test_learning_rate_default_depends_on_the_model(monkeypatch, tmp_path, argv, lr):
    """LeNet-5 diverges at the generic 0.1; an explicit --lr always wins."""
    seen = {}
    monkeypatch.setattr(cli, "_run", lambda doc, tcfg, *a, **k: seen.update(lr=tcfg.lr, doc=doc))
    assert cli.main(["prune", *argv, "--out", str(tmp_path / "r")]) == 0
    assert seen["lr"] == lr and seen["doc"]["train"]["lr"] == lr
