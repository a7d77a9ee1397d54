"""Reproductions in quick mode (the pipeline, not the science) and the research CLI, on real data."""

from __future__ import annotations

import json

import pytest

from prunekit.cli import main
from prunekit.reproduce import run

pytestmark = pytest.mark.slow


def test_lottery_quick_writes_results_and_resumes(tmp_path):
    summary = run("lottery", tmp_path, quick=True, progress=False)
    levels = summary["lenet300"]
    assert [round(lv["density"], 2) for lv in levels] == [1.0, 0.8, 0.64]
    assert {"ticket", "reinit", "random_mask"} <= set(levels[1])
    doc = json.loads((tmp_path / "lottery.json").read_text())
    assert doc["commands"] and "lenet300/seed0" in doc["runs"]
    assert (tmp_path / "lottery.png").read_bytes()[:4] == b"\x89PNG"
    assert "| level | weights left |" in (tmp_path / "lottery.md").read_text()
    # rerun: nothing is recomputed (the level files are reused), same summary
    assert run("lottery", tmp_path, quick=True, progress=False) == summary


def test_sensitivity_quick(tmp_path):
    doc = run("sensitivity", tmp_path, quick=True, progress=False)
    curves = doc["runs"]["curves"]
    assert set(curves["curves"]) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert sum(curves["allocation"][n] * curves["numel"][n] for n in curves["numel"]) / sum(
        curves["numel"].values()) == pytest.approx(0.98, abs=1e-6)
    for name in ("global", "sensitivity"):
        assert doc["runs"][name]["sparsity"] == pytest.approx(0.98, abs=1e-3)
    assert (tmp_path / "sensitivity.png").is_file()


def test_cli_reproduce_and_search(tmp_path, capsys):
    assert main(["reproduce", "sensitivity", "--quick", "--quiet", "--out", str(tmp_path / "s")]) == 0
    assert "allocation" in capsys.readouterr().out
    assert main(["search", "--model", "lenet300", "--data", "mnist", "--train-subset", "2000", "--dense-epochs", "1",
                 "--finetune-epochs", "1", "--max-drop", "0.02", "--tolerance", "0.05", "--quiet",
                 "--out", str(tmp_path / "q")]) == 0
    doc = json.loads((tmp_path / "q" / "search.json").read_text())
    assert doc["trials"] and 0.0 <= doc["sparsity"] < 1.0
    assert (tmp_path / "q" / "model.safetensors").is_file()


def test_unknown_experiment():
    with pytest.raises(ValueError, match="lottery"):
        run("nonsense", "/tmp/unused")
