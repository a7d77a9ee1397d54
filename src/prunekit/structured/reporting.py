"""Before/after report of structured pruning: parameters, MACs and *measured* CPU latency, per layer and in total.

MACs come from :func:`prunekit.flops.count_macs` (the project's one counter, also behind :func:`prunekit.report`),
parameters from the modules themselves, total latency from :func:`~prunekit.structured.measure_latency` (dense and
pruned model interleaved, median of repeats, ``torch.inference_mode``, fixed threads). Per-layer latency is the
median over repeats of the time between each layer's forward pre- and post-hook, measured in separate runs (the
hooks cost a few microseconds per layer, so the per-layer column is for finding where the time goes; the total is
timed without hooks). Layers are the leaf modules that run (modules with no submodule running inside them);
time spent outside any of them (functional code in ``forward``) is the ``other`` row.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> from prunekit.structured import plan
    >>> make = lambda: nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3))
    >>> dense, x = make(), torch.randn(1, 3, 16, 16)
    >>> small = plan(dense, x, 0.5).apply(make().requires_grad_(False))
    >>> r = report(dense, small, x, repeats=3, warmup=1)
    >>> [(row.name, row.params, row.macs) for row in r.rows]  # doctest: +NORMALIZE_WHITESPACE
    [('0', (448, 224), (84672, 42336)), ('1', (0, 0), (0, 0)), ('2', (1160, 584), (165888, 82944)),
     ('other', (0, 0), (0, 0))]
    >>> r.macs, r.latency is not None
    ((250560, 125280), True)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunekit.fileformat import atomic_write, json_text
from prunekit.flops import _split_inputs, count_macs, count_params
from prunekit.structured.latency import Latency, layer_times, measure_latency

__all__ = ["LayerRow", "StructuredReport", "report"]


@dataclass(frozen=True)
class LayerRow:
    """One layer: ``(before, after)`` pairs; ``after`` is 0 for a layer the pruned model no longer runs."""

    name: str
    kind: str
    params: tuple[int, int]
    macs: tuple[int, int]
    latency: tuple[float, float] | None  # seconds per forward pass, median


@dataclass(frozen=True)
class StructuredReport:
    """What structured pruning did; build it with :func:`report`.

    Attributes:
        rows: One row per layer of the dense model (``named_modules()`` order), plus ``other`` with latency.
        params: ``(before, after)`` parameter counts.
        macs: ``(before, after)`` MACs of one forward pass on the example inputs.
        latency: ``(before, after)`` :class:`~prunekit.structured.Latency` of the whole model, or None.
        settings: How latency was measured (batch shape, threads, repeats, warm-up).
    """

    rows: tuple[LayerRow, ...]
    params: tuple[int, int]
    macs: tuple[int, int]
    latency: tuple[Latency, Latency] | None
    settings: dict[str, Any]

    @property
    def speedup(self) -> float | None:
        """Measured latency before / after (None without latency)."""
        if self.latency is None:
            return None
        return self.latency[0].median / self.latency[1].median

    def to_dict(self) -> dict[str, Any]:
        """JSON-able ``{"totals": {...}, "rows": [...], "settings": {...}}``."""
        totals: dict[str, Any] = {"params": list(self.params), "macs": list(self.macs),
                                  "mac_reduction": _ratio(*self.macs), "param_reduction": _ratio(*self.params)}
        if self.latency is not None:
            totals["latency"] = [self.latency[0].to_dict(), self.latency[1].to_dict()]
            totals["speedup"] = self.speedup
        rows = [{"name": r.name, "kind": r.kind, "params": list(r.params), "macs": list(r.macs),
                 "latency": list(r.latency) if r.latency is not None else None} for r in self.rows]
        return {"totals": totals, "rows": rows, "settings": dict(self.settings)}

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """The report as JSON text, also written to ``path`` (atomically) if given."""
        text = json_text(self.to_dict(), indent=2)
        if path is not None:
            atomic_write(path, lambda f: f.write(text.encode()))
        return text

    def __str__(self) -> str:
        with_latency = self.latency is not None
        header = ["layer", "kind", "params", "MACs"] + (["latency ms"] if with_latency else [])
        table = [header]
        for r in self.rows:
            cells = [r.name, r.kind, _pair(*r.params), _pair(*r.macs)]
            if with_latency:
                cells.append(_pair(*(1e3 * v for v in r.latency), fmt="{:.3f}") if r.latency else "")
            table.append(cells)
        widths = [max(len(line[i]) for line in table) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()
                 for line in table]
        lines.append(f"parameters: {_pair(*self.params)} ({_ratio(*self.params):.2f}x fewer)")
        lines.append(f"MACs: {_pair(*self.macs)} ({_ratio(*self.macs):.2f}x fewer)")
        if self.latency is not None:
            s = self.settings
            lines.append(f"latency: {1e3 * self.latency[0].median:.3f} ms -> {1e3 * self.latency[1].median:.3f} ms "
                         f"({self.speedup:.2f}x faster; median of {s['repeats']} interleaved repeats, "
                         f"{s['threads']} threads, input {s['inputs']})")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike[str]) -> None:
        """PNG: per-layer MACs (and latency) before and after, as horizontal bars."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        rows = [r for r in self.rows if r.macs[0] or (r.latency and r.latency[0])]
        panels = 2 if self.latency is not None else 1
        fig = Figure(figsize=(6 * panels, 1.5 + 0.22 * max(len(rows), 1)))
        FigureCanvasAgg(fig)
        y = list(range(len(rows)))
        labels = [r.name for r in rows]
        for k in range(panels):
            ax = fig.add_subplot(1, panels, k + 1)
            if k == 0:
                before, after = [r.macs[0] / 1e6 for r in rows], [r.macs[1] / 1e6 for r in rows]
                ax.set_xlabel("MMACs")
                ax.set_title(f"MACs {_ratio(*self.macs):.2f}x fewer")
            else:
                before = [1e3 * r.latency[0] if r.latency else 0 for r in rows]
                after = [1e3 * r.latency[1] if r.latency else 0 for r in rows]
                ax.set_xlabel("ms (per-layer, hooked runs)")
                ax.set_title(f"measured latency {self.speedup:.2f}x faster")
            ax.barh([v - 0.2 for v in y], before, height=0.4, label="dense", color="tab:gray")
            ax.barh([v + 0.2 for v in y], after, height=0.4, label="pruned", color="tab:blue")
            ax.set_yticks(y, labels=labels if k == 0 else [""] * len(y), fontsize=6)
            ax.invert_yaxis()
            ax.legend(fontsize=7)
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


def _pair(a: float, b: float, fmt: str = "{:,}") -> str:
    return f"{fmt.format(a)} -> {fmt.format(b)}"


def _ratio(before: float, after: float) -> float:
    return before / after if after else float("inf")


def _params_by_module(model: nn.Module) -> dict[str, int]:
    seen: set[int] = set()
    out = {}
    for name, module in model.named_modules():
        total = 0
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        out[name] = total
    return out


def report(dense: nn.Module, pruned: nn.Module, example_inputs: Any, *, latency: bool = True,
           per_layer_latency: bool = True, repeats: int = 10, warmup: int = 3, threads: int = 2) -> StructuredReport:
    """Compare a dense model with its structurally pruned version: parameters, MACs, measured latency.

    Args:
        dense: The model before pruning (any instance of the definition: only shapes matter for MACs and time).
        pruned: The pruned model (module names as in ``dense``; dropped blocks count as 0).
        example_inputs: Inputs to count and time with (their batch size is the one timed).
        latency: Measure the total latency (interleaved, median of ``repeats``).
        per_layer_latency: Also measure each layer's latency (hooked runs).
        repeats: Timed repeats per model.
        warmup: Untimed calls per model first.
        threads: Intra-op threads while timing.

    Returns:
        A :class:`StructuredReport` (``str()`` for a table, ``to_json``, ``plot``).
    """
    for m, what in ((dense, "dense"), (pruned, "pruned")):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{what} must be a torch.nn.Module, got {type(m).__name__}")
    macs_before, macs_after = count_macs(dense, example_inputs), count_macs(pruned, example_inputs)
    params_before, params_after = _params_by_module(dense), _params_by_module(pruned)
    timed = None
    per_layer: dict[str, dict[str, float]] = {}
    if latency:
        timed = measure_latency({"dense": dense, "pruned": pruned}, example_inputs, repeats=repeats, warmup=warmup,
                                threads=threads)
        if per_layer_latency:
            per_layer = layer_times({"dense": dense, "pruned": pruned}, example_inputs, repeats, warmup, threads)
    after_modules = dict(pruned.named_modules())
    leaves = [n for n, m in dense.named_modules() if n and not any(True for _ in m.children())]
    if per_layer:
        ran = set(per_layer["dense"]) | set(per_layer["pruned"])
        leaves = [n for n in leaves if n in ran] + [n for n in per_layer["dense"] if n and n not in leaves]
    rows = []
    for name in dict.fromkeys(leaves):
        module = dict(dense.named_modules())[name]
        kept = after_modules.get(name)
        replaced = kept is not None and type(kept) is not type(module) and isinstance(kept, nn.Identity)
        lat = None
        if per_layer:
            lat = (per_layer["dense"].get(name, 0.0), per_layer["pruned"].get(name, 0.0))
        rows.append(LayerRow(
            name, type(module).__name__,
            (params_before.get(name, 0), 0 if kept is None or replaced else params_after.get(name, 0)),
            (macs_before.by_module.get(name, 0), 0 if kept is None or replaced else macs_after.by_module.get(name, 0)),
            lat))
    if per_layer:
        rest = tuple(max(per_layer[k][""] - sum(t for n, t in per_layer[k].items() if n), 0.0)
                     for k in ("dense", "pruned"))
        rows.append(LayerRow("other", "(outside layers)", (0, 0), (0, 0), rest))  # type: ignore[arg-type]
    settings = {"inputs": [list(t.shape) for t in _split_inputs(example_inputs)[0] if isinstance(t, torch.Tensor)],
                "threads": threads, "repeats": repeats, "warmup": warmup, "inference_mode": True}
    return StructuredReport(
        rows=tuple(rows),
        params=(count_params(dense), count_params(pruned)),
        macs=(macs_before.total, macs_after.total),
        latency=(timed["dense"], timed["pruned"]) if timed else None,
        settings=settings,
    )
