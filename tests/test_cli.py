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
        (["--include", "nothing*"], "--include pattern 'nothing*' matches no parameter"),
        (["--exclude", "*"], "Use --include GLOB"),
        (["--weights", "/nonexistent/w.pth"], "no weights file"),
        # schedules that cannot reach --sparsity within --epochs (BASE: --epochs 2, 47 steps per epoch)
        (["--end", "6"], "--end 6 (where the final sparsity is reached) is after the last epoch (--epochs 2): "
                         "use --end < 2 or --epochs >= 7"),
        (["--schedule", "iterative", "--end", "6"], "--end 6 (where the last round starts) is after the last epoch"),
        (["--start", "3", "--end", "4", "--epochs", "1"], "--end 4 (where the final sparsity is reached) is after "
                                                          "the last epoch (--epochs 1)"),
        (["--schedule", "oneshot", "--start", "2.5"], "--start 2.5 (the first pruning step) is not within the 2"),
        (["--end", "2"], "--end 2 with --schedule gradual puts the last mask update at step 99, but training has only "
                         "94 steps (--epochs 2 x 47 steps per epoch), so --sparsity 0.8 would never be reached: use "
                         "--end <= 1.978 or more --epochs"),
        (["--schedule", "iterative", "--start", "1.99", "--end", "1.99"], "use fewer --rounds"),
        (["--updates-per-epoch", "0"], "--updates-per-epoch 0: the masks must be updated at least once"),
        (["--epochs", "0"], "--epochs 0 trains no step, so nothing would be pruned"),
        (["--structured", "--end", "3"], "--end 3 (where the final sparsity is reached) is after the last epoch"),
        # structured flags without --structured, and flags --structured cannot use
        (["--macs", "0.5"], "--macs 0.5 is an option of structured pruning: add --structured, or drop --macs"),
        (["--drop-blocks", "1"], "--drop-blocks 1 is an option of structured pruning"),
        (["--structured", "--allocation", "erk"], "--allocation erk is not for structured pruning"),
        (["--structured", "--allocation", "uniform"], "spreads a --macs or --params budget"),
        (["--structured", "--macs", "1.5"], "--macs 1.5: expected the fraction of the dense model to keep, in (0, 1)"),
        (["--structured", "--macs", "-1"], "--macs -1: expected the fraction"),
        (["--structured", "--macs", "0.5", "--params", "0.5"], "give one budget, not both"),
        (["--structured", "--include", "fc1.*"], "--include selects single weights"),
        (["--structured", "--drop-blocks", "2"], "--drop-blocks 2: lenet300 has 0 residual blocks (none); drop"),
        (["--structured", "--criterion", "magnitude"], "--criterion magnitude is not a structured criterion"),
        # training flags
        (["--batch-size", "0"], "--batch-size 0: expected at least 1"),
        (["--label-smoothing", "1.5"], "--label-smoothing 1.5: expected a value in [0, 1)"),
        (["--temperature", "0"], "--temperature 0: the distillation temperature must be > 0"),
        (["--distill", "0.5"], "--distill needs --weights"),
        (["--lr", "-0.1"], "--lr -0.1: the peak learning rate must be a positive number"),
        (["--lr", "0"], "--lr 0: the peak learning rate"),
        (["--momentum", "1"], "--momentum 1: expected a value in [0, 1)"),
        (["--epochs", "-1"], "--epochs -1: expected a number of epochs >= 0"),
        (["--shift", "-2"], "--shift -2: expected a number of pixels >= 0"),
        (["--train-subset", "0"], "--train-subset 0: expected a number of training examples >= 1"),
        (["--train-subset", "-5"], "--train-subset -5"),
        (["--width", "0"], "--width 0: the width multiplier must be > 0"),
    ],
)
def test_bad_input_exit_2_with_message(tmp_path, capsys, args, message):
    code = main([*BASE, "--out", str(tmp_path / "x"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "Pass " not in err  # one line, CLI flags (not Python arguments)
    assert not (tmp_path / "x").exists()  # rejected before anything is written


def test_rejected_run_leaves_nothing_so_the_fixed_command_runs(tmp_path, capsys):
    """A rejected command writes no config.json, so the corrected command can use the same --out."""
    out = tmp_path / "run"
    small = ["prune", "--model", "lenet300", "--data", "mnist", "--train-subset", "500", "--epochs", "1", "--quiet",
             "--out", str(out)]
    assert main([*small, "--end", "6"]) == 2
    assert not out.exists()
    assert main([*small, "--end", "0.5"]) == 0
    assert json.loads((out / "metrics.json").read_text())["sparsity"] == pytest.approx(0.9, abs=1e-5)
    assert "another configuration" not in capsys.readouterr().err


def test_out_is_a_file_is_a_clear_error(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for out in (afile, afile / "sub"):
        assert main([*BASE, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}" in err and "a file, not a directory" in err and "Traceback" not in err
    assert afile.read_text() == "keep me"


def test_check_schedule_python_api():
    """config.check_schedule / build_pruner(..., epochs=) carry the same check for Python callers."""
    from torch import nn

    from prunekit.config import PruneConfig, build_pruner, check_schedule

    check_schedule(PruneConfig(end=1.5), epochs=2, steps_per_epoch=4)  # last update at step 6 of 0..7
    check_schedule(PruneConfig(sparsity=0.0, end=9), epochs=0)  # nothing to prune: nothing to reach
    check_schedule(PruneConfig(schedule="constant"), epochs=1, steps_per_epoch=1)
    with pytest.raises(ValueError, match=r"--end 2 with --schedule gradual .* use --end <= 1.75"):
        check_schedule(PruneConfig(end=2), epochs=2, steps_per_epoch=4)
    with pytest.raises(ValueError, match=r"--start 1 \(the first pruning step\) is not within"):
        build_pruner(nn.Linear(4, 4), PruneConfig(schedule="oneshot", start=1), 4, epochs=1)
    with pytest.raises(ValueError, match="--rounds 0"):
        PruneConfig(rounds=0)
    assert PruneConfig(schedule="oneshot", start=1.5).start == 1.5  # --end does not apply to oneshot


def test_criterion_default_depends_on_structured(monkeypatch, tmp_path):
    """Without --criterion, unstructured pruning ranks weights by magnitude and --structured channels by l2."""
    from prunekit.structured import cli as structured_cli

    seen = {}
    monkeypatch.setattr(cli, "_run", lambda doc, *a, **k: seen.update(unstructured=doc["prune"]["criterion"]))
    monkeypatch.setattr(structured_cli, "_run", lambda doc, *a, **k: seen.update(structured=doc["structured"]))
    argv = ["prune", "--model", "lenet300", "--data", "mnist", "--epochs", "1", "--out", str(tmp_path / "r")]
    assert main(argv) == 0
    assert main([*argv, "--structured", "--macs", "2000000"]) == 0
    assert seen["unstructured"] == "magnitude"
    assert seen["structured"]["criterion"] == "l2" and seen["structured"]["macs"] == 2_000_000
    assert main([*argv, "--structured", "--criterion", "taylor"]) == 0
    assert seen["structured"]["criterion"] == "taylor"


def test_structured_drop_blocks_on_resnet20(tmp_path, monkeypatch, capsys):
    """--drop-blocks finds resnet20's residual blocks (a random example input; all zeros hid them)."""
    from prunekit.structured import cli as structured_cli

    real_load = structured_cli.load_dataset

    def small_splits(name, split, data_dir=None):  # keep evaluation quick: 256 validation/test images
        data = real_load(name, split, data_dir)
        return data if split == "train" else type(data)(*(t[:256] for t in data.tensors))

    monkeypatch.setattr(structured_cli, "load_dataset", small_splits)
    out = tmp_path / "r20"
    assert main(["prune", "--structured", "--model", "resnet20", "--width", "0.25", "--data", "mnist",
                 "--train-subset", "128", "--batch-size", "64", "--epochs", "1", "--drop-blocks", "1",
                 "--calibration-batches", "1", "--quiet", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "residual blocks" not in captured.err
    assert "drop_blocks: without layer" in captured.out
    assert (out / "model.safetensors").is_file() and (out / "metrics.json").is_file()
    assert json.loads((out / "config.json").read_text())["structured"]["drop_blocks"] == 1


def _fake_run_dir(path):
    from prunekit.checkpoint import save
    from prunekit.models import get_model

    path.mkdir()
    save(get_model("lenet300"), path / "checkpoint.safetensors")
    (path / "config.json").write_text(json.dumps({"model": "lenet300", "width": 1.0}))
    return path


def test_report_rejects_width_without_model_and_directory_outputs(tmp_path, capsys):
    run = _fake_run_dir(tmp_path / "run")
    assert main(["report", str(run), "--width", "2"]) == 2
    assert "--width 2 sets the width of --model's architecture" in capsys.readouterr().err
    adir = tmp_path / "adir"
    adir.mkdir()
    assert main(["report", str(run), "--json", str(adir)]) == 2
    err = capsys.readouterr().err
    assert f"--json {adir} is a directory" in err and "Traceback" not in err
    # a bad --plot is found before --json is written
    assert main(["report", str(run), "--json", str(tmp_path / "r.json"), "--plot", str(adir)]) == 2
    assert f"--plot {adir} is a directory" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
    assert main(["report", str(run), "--model", "lenet300", "--width", "1"]) == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path / "nope.safetensors")]) == 2
    assert "no such file or run directory" in capsys.readouterr().err


def _no_training(*args, **kwargs):
    raise AssertionError("bad arguments must be rejected before any data is loaded or any model trained")


@pytest.mark.parametrize(("args", "message"), [
    (["--sparsity", "1.0"], "--sparsity must be in [0, 1)"),
    (["--prune-epochs", "0"], "--prune-epochs 0: pruning happens while fine-tuning"),
    (["--dense-epochs", "-1"], "--dense-epochs -1"),
])
def test_demo_validates_before_training(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setattr(cli, "train", _no_training)
    monkeypatch.setattr(cli, "load_dataset", _no_training)
    assert main(["demo", "--out", str(tmp_path / "demo"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--high", "1.5"], "--high 1.5: expected the highest sparsity to try, in (0, 1)"),
    (["--max-drop", "-1"], "--max-drop -1: expected an allowed accuracy drop in [0, 1)"),
    (["--tolerance", "0"], "--tolerance 0: expected a bracket width > 0"),
    (["--lr", "0"], "--lr 0: the peak learning rate"),
    (["--train-subset", "0"], "--train-subset 0"),
    (["--weights", "/nonexistent/w.pth"], "--weights /nonexistent/w.pth: no weights file"),
])
def test_search_validates_before_training(tmp_path, monkeypatch, capsys, args, message):
    from prunekit import cli_research

    monkeypatch.setattr(cli_research, "train", _no_training)
    monkeypatch.setattr(cli_research, "data_splits", _no_training)
    assert main(["search", "--model", "lenet300", "--data", "mnist", "--out", str(tmp_path / "s"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()


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
