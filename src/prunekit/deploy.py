"""Deployment exports of a pruned model: a plain safetensors state dict, a compressed prunekit file, or ONNX.

* ``"safetensors"`` — the model's ``state_dict`` as a plain ``.safetensors`` file, dense with zeros where weights were
  pruned (structurally pruned models simply have the smaller shapes). No prunekit is needed to use it::

      from safetensors.torch import load_file
      model.load_state_dict(load_file("model.safetensors"))

  With ``int8=True`` the Linear/Conv weights are stored as int8 (``<module>.weight_int8``) with one float32 scale per
  output channel (``<module>.weight_scale``); ``weight = weight_int8.float() * weight_scale.view(-1, 1, ...)``
  restores them (:func:`prunekit.quantize.dequantize_int8` does it for you).
* ``"compressed"`` — a prunekit file with every tensor in its smallest lossless layout (:mod:`prunekit.compress`),
  int8 values with ``int8=True``; read it back with :func:`prunekit.load`.
* ``"onnx"`` — ``torch.onnx.export`` (the dynamo exporter, opset 18+) with a dynamic batch dimension where the model
  allows it, then checked against onnxruntime on ``example_inputs``: the export fails unless
  ``max |onnx - torch| <= rtol * max |torch|`` (``rtol`` 1e-4). With ``int8=True`` the weights are int8 initializers.

Exports read the model and never change it. Any wrappers (DDP, ``torch.compile``) are unwrapped; a model still under
a :class:`~prunekit.Pruner` exports its zeros as they are (call ``pruner.remove()`` first if you like; it changes
nothing in the file).
"""

from __future__ import annotations

import copy
import io
import json
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.fileformat import atomic_write
from prunekit.pruner import unwrap

__all__ = ["FORMATS", "ExportResult", "LoadedRun", "OnnxMismatchError", "export", "load_run", "onnx_max_difference",
           "size_versus"]

FORMATS = ("safetensors", "compressed", "onnx")


class OnnxMismatchError(RuntimeError):
    """onnxruntime's outputs differ from PyTorch's by more than the tolerance."""


@dataclass
class ExportResult:
    """What :func:`export` wrote.

    Attributes:
        path: The file.
        format: ``"safetensors"``, ``"compressed"`` or ``"onnx"``.
        bytes: Its size.
        dense_bytes: Size of the model's state as dense float tensors (the reference for ratios).
        int8: Whether weights were quantized to int8.
        max_abs_diff: ONNX only: ``max |onnxruntime - torch|`` on the example inputs.
        max_abs_reference: ONNX only: ``max |torch output|`` on the example inputs.
        seconds: Time taken.
    """

    path: Path
    format: str
    bytes: int
    dense_bytes: int
    int8: bool = False
    max_abs_diff: float | None = None
    max_abs_reference: float | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """``dense_bytes / bytes``: how many times smaller than the dense state."""
        return self.dense_bytes / max(self.bytes, 1)

    def __str__(self) -> str:
        text = (f"{self.path}: {self.format}{' int8' if self.int8 else ''}, {self.bytes:,} bytes "
                f"({size_versus(self.bytes, self.dense_bytes)} vs the dense {self.dense_bytes:,} bytes)")
        if self.max_abs_diff is not None:
            text += (f"; onnxruntime vs torch max |diff| {self.max_abs_diff:.3g} "
                     f"(max |output| {self.max_abs_reference:.3g})")
        return text


def _dense_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


SUFFIXES = {".safetensors": "safetensors", ".pk": "compressed", ".onnx": "onnx"}  # format from the file name


def _format_for(path: Path, fmt: str | None) -> str:
    if fmt is None:
        if path.suffix.lower() not in SUFFIXES:
            known = ", ".join(f"{suffix} ({name})" for suffix, name in SUFFIXES.items())
            raise ValueError(f"cannot tell the export format from the file name {str(path)!r} (extension "
                             f"{path.suffix or 'none'!r}); expected one of {known}. Rename the file, or pass "
                             f"format= one of {FORMATS}.")
        return SUFFIXES[path.suffix.lower()]
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {FORMATS}")
    return fmt


def size_versus(size: int, reference: int) -> str:
    """How ``size`` compares with ``reference``: ``"2.10x smaller"``, ``"2.25x larger"`` or about the same.

    Examples:
        >>> size_versus(500, 1000), size_versus(2250, 1000), size_versus(1001, 1000)
        ('2.00x smaller', '2.25x larger', '1.00x (about the same)')
    """
    size, reference = max(size, 1), max(reference, 1)
    if size <= reference:
        ratio, word = reference / size, "smaller"
    else:
        ratio, word = size / reference, "larger"
    return "1.00x (about the same)" if f"{ratio:.2f}" == "1.00" else f"{ratio:.2f}x {word}"


def export(
    model: nn.Module,
    path: str | os.PathLike[str],
    format: str | None = None,
    *,
    example_inputs: torch.Tensor | Sequence[Any] | None = None,
    int8: bool = False,
    dynamic_batch: bool = True,
    rtol: float = 1e-4,
    opset_version: int | None = None,
) -> ExportResult:
    """Export a (pruned) model for deployment; see the module docstring for the formats.

    Args:
        model: The model (not modified).
        path: Output file.
        format: ``"safetensors"``, ``"compressed"`` or ``"onnx"``; default: from the file name's extension
            (``.safetensors``, ``.pk`` = compressed, ``.onnx``); another extension needs an explicit ``format``.
        example_inputs: ONNX only, required: a tensor or a tuple of positional inputs to trace and verify with.
        int8: Store Linear/Conv weights as int8 with per-channel scales (:mod:`prunekit.quantize`).
        dynamic_batch: ONNX: make dimension 0 of every input dynamic (falls back to static shapes, with a note in
            the result, if the model does not allow it).
        rtol: ONNX: allowed ``max |onnx - torch| / max |torch|``.
        opset_version: ONNX opset (default: the exporter's).

    Returns:
        An :class:`ExportResult` (path, size, ratio to the dense state, ONNX difference).

    Raises:
        ValueError: Unknown format, no ``format`` and an extension that names none, ONNX without
            ``example_inputs``, or a model that does not run on ``example_inputs`` (the message names their shapes
            and what the model's layers expect).
        OnnxMismatchError: onnxruntime disagrees with PyTorch beyond ``rtol``.
        ImportError: ONNX export without ``onnx``/``onnxscript``/``onnxruntime`` (``pip install prunekit[export]``).

    Examples:
        >>> import tempfile
        >>> import prunekit
        >>> from safetensors.torch import load_file
        >>> model = nn.Sequential(nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))
        >>> pruner = prunekit.prune(model, sparsity=0.9)
        >>> result = export(model, tempfile.mkdtemp() + "/model.safetensors")
        >>> fresh = nn.Sequential(nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))
        >>> _ = fresh.load_state_dict(load_file(result.path))  # plain safetensors, no prunekit needed
        >>> torch.equal(fresh[0].weight, model[0].weight)
        True
        >>> export(model, tempfile.mkdtemp() + "/model.pk", format="compressed").ratio > 5
        True
    """
    path = Path(path)
    fmt = _format_for(path, format)
    t0 = time.perf_counter()
    model = unwrap(model)
    dense = _dense_bytes(model)
    if fmt == "onnx":
        if example_inputs is None:
            raise ValueError("ONNX export needs example_inputs=(tensor, ...) to trace and verify the model with")
        result = _export_onnx(model, path, example_inputs, int8=int8, dynamic_batch=dynamic_batch, rtol=rtol,
                              opset_version=opset_version)
    elif fmt == "safetensors":
        _export_safetensors(model, path, int8=int8)
        result = ExportResult(path, fmt, path.stat().st_size, dense, int8=int8)
    else:
        from prunekit.checkpoint import save

        save(model, path, compress="int8" if int8 else True)
        result = ExportResult(path, fmt, path.stat().st_size, dense, int8=int8)
    result.dense_bytes = dense
    result.seconds = time.perf_counter() - t0
    return result


def _export_safetensors(model: nn.Module, path: Path, *, int8: bool) -> None:
    from safetensors.torch import save as st_save

    if int8:
        from prunekit.quantize import quantize_int8

        model = quantize_int8(copy.deepcopy(model))
    state = model.state_dict()
    plain: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, t in state.items():  # safetensors refuses shared, strided or non-CPU tensors: store plain copies
        t = t.detach().cpu()
        if t.is_floating_point():
            t = torch.where(t == 0, torch.zeros_like(t), t)  # -0.0 from pruning by multiplication -> +0.0
        key = t.untyped_storage().data_ptr() if t.numel() else -1
        if key in seen or not t.is_contiguous() or t.storage_offset():
            t = t.clone(memory_format=torch.contiguous_format)
        seen[key] = name
        plain[name] = t
    metadata = {"format": "pt", "producer": "prunekit", "int8": str(bool(int8)).lower()}
    atomic_write(path, lambda f: f.write(st_save(plain, metadata=metadata)))


def _as_tuple(example_inputs: torch.Tensor | Sequence[Any]) -> tuple[Any, ...]:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def _flat_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flat_outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flat_outputs(v)]
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        return _flat_outputs(out.to_tuple())
    return []


def _export_onnx(model: nn.Module, path: Path, example_inputs: torch.Tensor | Sequence[Any], *, int8: bool,
                 dynamic_batch: bool, rtol: float, opset_version: int | None) -> ExportResult:
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"ONNX export needs onnx and onnxscript ({exc}): pip install 'prunekit[export]'") from exc
    args = _as_tuple(example_inputs)
    work = copy.deepcopy(model).eval()
    if int8:
        from prunekit.quantize import quantize_int8

        quantize_int8(work)
    try:
        with torch.no_grad():
            reference = [t.detach().float() for t in _flat_outputs(work(*args))]
    except (RuntimeError, ValueError, IndexError, TypeError, AssertionError) as exc:
        from prunekit.report import input_failure

        raise input_failure(work, example_inputs, exc) from exc
    notes: list[str] = []
    program = None
    options: dict[str, Any] = {"dynamo": True, "external_data": False, "verbose": False, "report": False}
    if opset_version is not None:
        options["opset_version"] = opset_version
    attempts = []
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        attempts.append({"dynamic_shapes": tuple({0: batch} if isinstance(a, torch.Tensor) and a.dim() else None
                                                 for a in args)})
    attempts.append({})
    errors = []
    for extra in attempts:
        try:
            with warnings.catch_warnings(), _quiet():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(work, args, **options, **extra)
            break
        except Exception as exc:  # noqa: BLE001 - the exporter raises many types; fall back to static shapes
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    if program is None:
        raise RuntimeError(f"torch.onnx.export failed for {type(model).__name__}: {' / '.join(errors)}")
    if len(errors) and dynamic_batch:
        notes.append(f"exported with static shapes (a dynamic batch dimension failed: {errors[0][:200]})")
    atomic_write(path, lambda f: f.write(program.model_proto.SerializeToString()))
    diff, ref_max = onnx_max_difference(path, args, reference)
    result = ExportResult(path, "onnx", path.stat().st_size, 0, int8=int8, max_abs_diff=diff,
                          max_abs_reference=ref_max, notes=notes)
    if diff > rtol * max(ref_max, 1e-12):
        raise OnnxMismatchError(
            f"{path}: onnxruntime differs from torch by up to {diff:.3g} (max |output| {ref_max:.3g}, allowed "
            f"{rtol:g} of it). The file was written; inspect it, or pass a larger rtol= if this is expected."
        )
    return result


class _quiet:
    """Silence the exporter's progress prints on stdout."""

    def __enter__(self) -> None:
        import contextlib

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(io.StringIO()))

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def onnx_max_difference(path: str | os.PathLike[str], example_inputs: torch.Tensor | Sequence[Any],
                        reference: Sequence[torch.Tensor]) -> tuple[float, float]:
    """Run an ONNX file with onnxruntime (CPU) and compare with reference outputs.

    Returns:
        ``(max |onnx - reference|, max |reference|)`` over all outputs.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError("checking an ONNX export needs onnxruntime: pip install 'prunekit[export]'") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    tensors = [a for a in _as_tuple(example_inputs) if isinstance(a, torch.Tensor)]
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), tensors)}
    outputs = session.run(None, feeds)
    if len(outputs) != len(reference):
        raise OnnxMismatchError(f"{path}: onnxruntime gives {len(outputs)} outputs, torch {len(reference)}")
    diff = ref_max = 0.0
    for out, ref in zip(outputs, reference):
        got = torch.from_numpy(out).float()
        if got.shape != ref.shape:
            raise OnnxMismatchError(f"{path}: output shape {tuple(got.shape)} vs torch {tuple(ref.shape)}")
        diff = max(diff, float((got - ref).abs().max()) if ref.numel() else 0.0)
        ref_max = max(ref_max, float(ref.abs().max()) if ref.numel() else 0.0)
    return diff, ref_max


# --------------------------------------------------------------------------------------------------------------------
# loading a run directory (``prunekit export`` / ``prunekit report``)

STRUCTURED_FILE = "model.safetensors"  # what ``prunekit prune --structured`` writes: the small model + its plan


@dataclass
class LoadedRun:
    """A model loaded from a ``prunekit prune`` run directory or a file of one; see :func:`load_run`.

    Attributes:
        model: What the run produced, in eval mode: for a finished structured run the physically pruned model
            (smaller shapes), otherwise the checkpoint's model (pruned weights are zeros).
        masks: The checkpoint's pruning masks (None for a structured model or a checkpoint without a pruner).
        source: The file ``model`` was loaded from.
        structured: Whether ``model`` is a physically pruned structured model.
        architecture: The model's name in :data:`prunekit.models.MODELS`, and ``width``.
        width: The width multiplier.
        reference_bytes: Size of the unpruned architecture's state as dense tensors (the reference for ratios).
        reference_numel: Entries of the unpruned architecture's weight matrices/kernels (tensors of 2+ dimensions).
        checkpoint: The run's training checkpoint, if there is one (for a structured run: the full-size model with
            the removed channels zero-filled).
        notes: Things the caller should tell the user.
    """

    model: nn.Module
    masks: Any
    source: Path
    structured: bool
    architecture: str
    width: float
    reference_bytes: int
    reference_numel: int
    checkpoint: Path | None = None
    notes: list[str] = field(default_factory=list)


def _kind(path: Path) -> str | None:
    """The ``prunekit.kind`` of a prunekit file, or None if it is not one (or not readable: loading says why)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("prunekit.kind")
    except Exception:  # noqa: BLE001 - unreadable: the real load below raises the precise error
        return None


def load_run(path: str | os.PathLike[str], *, model: str | None = None, width: float = 1.0,
             example_inputs: Any = None) -> LoadedRun:
    """Load what a ``prunekit prune`` run produced, for export or a report.

    A structured run (``prunekit prune --structured``) ends with ``model.safetensors``: the physically pruned
    model's weights and the plan that removed the channels. That file is loaded (the plan replayed on a fresh model
    of the run's architecture) rather than ``checkpoint.safetensors``, which holds the full-size model with the
    removed channels zero-filled. Otherwise the checkpoint is loaded.

    Args:
        path: A run directory, its ``checkpoint.safetensors``, its ``model.safetensors`` (structured), or another
            prunekit checkpoint file.
        model: Architecture name (default: from the run's ``config.json``).
        width: Width multiplier, with ``model``.
        example_inputs: If given, a structured model is run once on them to check it.

    Returns:
        A :class:`LoadedRun`.

    Raises:
        ValueError: No ``config.json`` and no ``model``, or the stored model does not fit the architecture.
        prunekit.fileformat.FileFormatError: A missing, corrupted or wrong-kind file.
    """
    from prunekit.checkpoint import load as load_checkpoint
    from prunekit.models import MODELS, get_model
    from prunekit.structured.applying import PlanApplyError
    from prunekit.structured.saving import KIND as STRUCTURED_KIND
    from prunekit.structured.saving import load as load_structured

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if model:
        name = model
    elif "model" in config:
        name, width = config["model"], config.get("width", 1.0)
    else:
        raise ValueError(f"no config.json next to {path}: pass --model to name the architecture "
                         f"(one of {sorted(MODELS)})")
    reference = get_model(name, width=width)
    ref_bytes = _dense_bytes(reference)
    ref_numel = sum(p.numel() for p in reference.parameters() if p.dim() >= 2)
    ckpt_file = folder / "checkpoint.safetensors"
    small_file = folder / STRUCTURED_FILE
    notes: list[str] = []
    if path.is_dir():
        source = small_file if small_file.is_file() and _kind(small_file) == STRUCTURED_KIND else ckpt_file
        if source == ckpt_file and "structured" in config:
            notes.append(f"{path} is a structured run that has not finished (no {STRUCTURED_FILE}): its checkpoint "
                         "holds the full-size model with the pruned channels zero-filled. Rerun the same `prunekit "
                         "prune` command to finish it and get the physically smaller model.")
    else:
        source = path
        if (_kind(path) != STRUCTURED_KIND and "structured" in config and small_file.is_file()
                and _kind(small_file) == STRUCTURED_KIND):
            notes.append(f"{path} is the training checkpoint of a structured run: the full-size model with the "
                         f"pruned channels zero-filled. Pass the run directory or {small_file} for the physically "
                         "pruned model.")
    if _kind(source) == STRUCTURED_KIND:
        try:
            loaded = load_structured(source, get_model(name, width=width), example_inputs=example_inputs)
        except PlanApplyError as exc:
            raise ValueError(f"{source}: its structured-pruning plan does not fit {name} (width {width}): {exc}. "
                             "Pass the --model/--width the run was made with (see its config.json).") from exc
        return LoadedRun(loaded.eval(), None, source, True, name, width, ref_bytes, ref_numel,
                         ckpt_file if ckpt_file.is_file() else None, notes)
    loaded_model = get_model(name, width=width)
    ckpt = load_checkpoint(source, loaded_model)
    masks = ckpt.pruner.masks if ckpt.pruner is not None else None
    return LoadedRun(loaded_model.eval(), masks, source, False, name, width, ref_bytes, ref_numel, source, notes)
