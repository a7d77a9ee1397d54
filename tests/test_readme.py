"""The README's Python example runs as written and prints what it claims."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], "README.md", "exec"), {"__name__": "readme"})
    text = out.getvalue()
    assert "total (prunable)" in text  # the report printed
    assert "95.00%" in text  # the gradual example reached its target
    assert (tmp_path / "pruned.safetensors").is_file()


def test_readme_structured_and_deployment_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    block = next(b for b in blocks if "prunekit.structured.plan" in b)
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    scope = {"__name__": "readme"}
    with contextlib.redirect_stdout(out):
        exec(compile(block, "README.md", "exec"), scope)
    small, model = scope["small"], scope["model"]
    assert sum(p.numel() for p in small.parameters()) < 0.5 * sum(p.numel() for p in model.parameters())
    for name in ("small.safetensors", "lenet.pk", "lenet.onnx"):
        assert (tmp_path / name).is_file(), name
    assert "latency" in out.getvalue().lower() and "kernel" in out.getvalue().lower()
