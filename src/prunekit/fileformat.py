"""prunekit's file format: safetensors with a versioned, checksummed header. No pickle anywhere.

A file is an ordinary ``.safetensors`` file (any safetensors reader can open it) whose string metadata carries:

* ``prunekit.format`` = ``"prunekit"`` and ``prunekit.version`` (an integer, :data:`VERSION`);
* ``prunekit.kind`` — what the file holds (``"checkpoint"``, ...), so a file of one kind is never read as another;
* ``prunekit.meta`` — a JSON document (structure, configuration, non-tensor state);
* ``prunekit.sha256`` — SHA-256 over the JSON document and every tensor (name, dtype, shape, bytes), checked on read;
* ``prunekit.codecs`` — only in compressed files (version 2): where each tensor lies in the file's single ``uint8``
  tensor ``prunekit.payload`` and how it is encoded (:mod:`prunekit.compress`); covered by the checksum too. In
  version 2 files this table and ``prunekit.meta`` may be stored deflated (``"z64:" + base64``).

Version 1 files hold tensors as they are; version 2 files (written only with ``compression=...``) hold some tensors
encoded, so a prunekit that reads only version 1 refuses them with a clear message instead of loading payload bytes as
weights. Version 3 is version 2 plus sign bits coded as flips (``"signs": "flip"`` in a tensor's codec entry,
:func:`prunekit.compress.encode`); a compressed file is written as version 3 only when some tensor uses that, so files
that do not need it stay readable by a version-2 prunekit. All three versions are read here.

Writes are atomic: the file is written next to its destination under a temporary name, flushed to disk and renamed,
so a crash leaves either the old file or the new one, never half of one. Nested Python state with tensors inside
(optimizer and LR-scheduler state) is stored with :func:`pack` / :func:`unpack`: tensors become safetensors
entries, everything else JSON.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from prunekit.compress import (
    Compression,
    CompressionError,
    decode_tensors,
    encode_tensors,
)

__all__ = [
    "FORMAT",
    "VERSION",
    "VERSIONS",
    "FileFormatError",
    "OutputIsADirectoryError",
    "OutputParentError",
    "atomic_write",
    "pack",
    "read",
    "unpack",
    "write",
    "write_text",
]

FORMAT = "prunekit"
VERSION = 3  # the newest version this prunekit writes (only compressed files with flip-coded signs need it)
VERSIONS = (1, 2, 3)  # the versions it reads
PAYLOAD = "prunekit.payload"  # the one tensor of a compressed (version 2) file


class FileFormatError(ValueError):
    """A file is missing, truncated, corrupted, of another version, or of another kind."""


class OutputIsADirectoryError(IsADirectoryError, ValueError):
    """The output path given is an existing directory (also a ValueError, so command lines report it cleanly)."""


class OutputParentError(NotADirectoryError, ValueError):
    """The output path lies under an existing file, so its directory cannot be created."""


_UMASK: int | None = None  # the process umask, read once (see _new_file_mode)
_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask, read once: from ``/proc/self/status`` where there is one (no side effect), else with the
    ``os.umask`` set-and-restore trick (under a lock, so concurrent first calls in this module do not race)."""
    global _UMASK
    with _UMASK_LOCK:
        if _UMASK is None:
            try:
                with open("/proc/self/status", encoding="ascii", errors="replace") as f:
                    _UMASK = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
            except (OSError, ValueError, IndexError, StopIteration):
                _UMASK = os.umask(0o022)
                os.umask(_UMASK)
        return _UMASK


def _new_file_mode() -> int:
    """The permission bits a plain ``open(path, "w")`` gives a new file: ``0o666`` minus the umask."""
    return 0o666 & ~_umask()


def _check_output_path(path: Path, example: str) -> None:
    """Refuse, with a clear message, an output ``path`` that is a directory or lies under an existing file."""
    if path.is_dir():
        raise OutputIsADirectoryError(
            f"{path} is a directory, not a file; give a file name inside it, such as {path / example}"
        )
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise OutputParentError(
                    f"cannot write {path}: {parent} is a file, not a directory; choose an output path whose "
                    "folders are directories (or move that file away)"
                )
            break


def atomic_write(path: str | os.PathLike[str], write_fn: Callable[[IO[bytes]], object], *,
                 example: str = "output") -> Path:
    """Write a file atomically: ``write_fn(file)`` fills a temporary file beside ``path``, which is flushed to disk and
    renamed over ``path``. Readers see the old file or the new one, never a partial one; on error nothing is left.

    The file gets the permissions of any newly created file (``0o666`` minus the umask), not the private ``0o600`` of
    the temporary file it starts as.

    Args:
        path: Destination file; its directory is created if needed.
        write_fn: Writes the content into the open binary file it is given.
        example: A file name suggested in the error if ``path`` is a directory.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OutputIsADirectoryError: If ``path`` is an existing directory (an IsADirectoryError and a ValueError).
        OutputParentError: If a parent of ``path`` is an existing file (a NotADirectoryError and a ValueError).

    Examples:
        >>> import tempfile
        >>> p = atomic_write(tempfile.mkdtemp() + "/a.txt", lambda f: f.write(b"hello"))
        >>> p.read_text()
        'hello'
    """
    path = Path(path)
    _check_output_path(path, example)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as file:
            if hasattr(os, "fchmod"):
                os.fchmod(file.fileno(), _new_file_mode())
            else:  # pragma: no cover - platforms without fchmod
                os.chmod(temp, _new_file_mode())
            write_fn(file)
            file.flush()
            os.fsync(file.fileno())
        try:
            os.replace(temp, path)
        except IsADirectoryError:  # became a directory while the file was being written
            _check_output_path(path, example)
            raise
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 text atomically (see :func:`atomic_write`)."""
    example = "output.json" if text.lstrip()[:1] in ("{", "[") else "output.txt"
    return atomic_write(path, lambda f: f.write(text.encode()), example=example)


def strict_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by ``None``, so ``json.dumps(..., allow_nan=False)`` writes
    standard JSON (``NaN``/``Infinity`` are not JSON and many readers reject them). Tuples become lists.

    Examples:
        >>> strict_json({"loss": float("nan"), "acc": [0.9, float("inf")]})
        {'loss': None, 'acc': [0.9, None]}
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def json_text(obj: Any, **kwargs: Any) -> str:
    """Standard JSON text of ``obj`` plus a newline (non-finite floats written as ``null``, see :func:`strict_json`)."""
    return json.dumps(strict_json(obj), allow_nan=False, **kwargs) + "\n"


def _hash_tensor(h: Any, name: str, dtype: torch.dtype, shape: tuple[int, ...], data: Any) -> None:
    """Add one tensor (its name, dtype, shape and raw bytes ``data``) to the file checksum ``h``."""
    h.update(f"\0{name}\0{dtype}\0{shape}\0".encode())
    if len(data):
        h.update(data)


def _checksum(tensors: Mapping[str, torch.Tensor], meta_json: str) -> str:
    h = hashlib.sha256()
    h.update(meta_json.encode())
    for name in sorted(tensors):
        t = tensors[name].detach()
        data = t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data if t.numel() else b""
        _hash_tensor(h, name, t.dtype, tuple(t.shape), data)
    return h.hexdigest()


def _payload_checksum(payload: memoryview, meta_json: str) -> str:
    """:func:`_checksum` of ``{PAYLOAD: payload as a uint8 tensor}``, from the bytes themselves."""
    h = hashlib.sha256()
    h.update(meta_json.encode())
    _hash_tensor(h, PAYLOAD, torch.uint8, (len(payload),), payload)
    return h.hexdigest()


def _read_compressed(path: Path) -> tuple[dict[str, str], memoryview] | None:
    """The metadata and payload bytes of a compressed prunekit file (a safetensors file whose one tensor is the uint8
    payload), read in one go without building tensors. None if the file is anything else or malformed in any way;
    :func:`read` then takes the general safetensors path, which reports what is wrong."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8 or n > 1 << 30:
                return None
            header = json.loads(f.read(n))  # the header alone first: other files are not read any further here
            entry, meta = header.get(PAYLOAD), header.get("__metadata__")
            if set(header) != {PAYLOAD, "__metadata__"} or not isinstance(meta, dict) or not isinstance(entry, dict):
                return None
            start, end = (int(v) for v in entry["data_offsets"])
            if entry.get("dtype") != "U8" or entry.get("shape") != [end - start] or start != 0 or 8 + n + end != size:
                return None
            if "prunekit.codecs" not in meta or not all(isinstance(v, str) for v in meta.values()):
                return None
            payload = f.read()
        if len(payload) != end:
            return None
        return meta, memoryview(payload)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _foreign_format(path: Path) -> str | None:
    """Why ``path`` (which safetensors could not open) is recognisably another format: a ``torch.save`` file (a zip
    archive holding a pickle, or a bare pickle) or another zip archive. None if it is not recognised."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return None
    if head[8:9] == b"{":  # a safetensors file: an 8-byte header length, then the JSON header (whatever the length)
        return None
    pickled = len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5  # a pickle's PROTO opcode
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                pickled = any(name.endswith("data.pkl") for name in z.namelist())
        except (zipfile.BadZipFile, OSError, ValueError):
            pickled = False
        if not pickled:
            return f"{path} is a zip archive, not a safetensors file; give a file written by prunekit.save"
    if not pickled:
        return None
    return (
        f"{path} is a torch.save/pickle file; prunekit does not read pickle files, for safety (unpickling can run "
        f"arbitrary code). Convert it once: model.load_state_dict(torch.load({str(path)!r}, weights_only=True)), "
        "then prunekit.save(model, 'model.safetensors') (prunekit.load_weights(model, path) reads a .pt/.pth state "
        "dict the same way)."
    )


def _unshare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors that share no memory (safetensors refuses shared or strided storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"value for {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().cpu()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.numel() else (id(t), 0)
        if key in seen or not t.is_contiguous() or t.storage_offset() or t.numel() * t.element_size() != key[1]:
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(key)
        out[name] = t
    return out


def _squeeze(text: str) -> str:
    """``text``, or ``"z64:" + base64(deflate(text))`` if that is shorter (codec tables repeat themselves a lot)."""
    packed = "z64:" + base64.b64encode(zlib.compress(text.encode(), 9)).decode("ascii")
    return packed if len(packed) < len(text) else text


def _unsqueeze(text: str) -> str:
    if text.startswith("z64:"):
        return zlib.decompress(base64.b64decode(text[4:], validate=True)).decode()
    return text


def write(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], *,
          kind: str, compression: Compression | Mapping[str, Compression] | None = None,
          patterns: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` and the JSON-able ``meta`` to ``path`` atomically.

    Args:
        path: Destination file; its directory is created if needed.
        tensors: Named tensors (any dtype safetensors supports, including ``bool``).
        meta: JSON-serialisable document stored in the header.
        kind: What the file holds; :func:`read` checks it.
        compression: Store the tensors compressed (:func:`prunekit.compress.encode_tensors`): one
            :class:`~prunekit.compress.Compression` for all, or one per tensor name (others lossless). The file is
            then version 2. None: tensors as they are (version 1).
        patterns: With ``compression``: ``{bool tensor: tensor}`` pairs where the first may equal the second's
            non-zero pattern (a mask and its weight); such a mask costs no bytes.

    Returns:
        The path written.

    Examples:
        >>> import tempfile, torch
        >>> p = write(tempfile.mkdtemp() + "/x.safetensors", {"w": torch.ones(2)}, {"note": "hi"}, kind="example")
        >>> t, m = read(p, kind="example")
        >>> t["w"].tolist(), m
        ([1.0, 1.0], {'note': 'hi'})
    """
    path = Path(path)
    try:
        meta_json = json.dumps(meta, sort_keys=True, allow_nan=True)
    except TypeError as exc:
        raise TypeError(f"metadata for {path} is not JSON-serialisable: {exc}") from None
    header = {"prunekit.format": FORMAT, "prunekit.version": "1", "prunekit.kind": kind, "prunekit.meta": meta_json}
    if compression is None:
        plain = _unshare(tensors)
        header["prunekit.sha256"] = _checksum(plain, meta_json)
    else:
        payload, table = encode_tensors(tensors, compression, patterns)
        plain = {PAYLOAD: torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else
                 torch.empty(0, dtype=torch.uint8)}
        codecs_json = json.dumps(table, sort_keys=True, separators=(",", ":"))
        uses_flips = any(h.get("signs") for h in [*table["tensors"].values(), *table["packs"]])
        header["prunekit.version"] = "3" if uses_flips else "2"
        header["prunekit.meta"] = _squeeze(meta_json)
        header["prunekit.codecs"] = _squeeze(codecs_json)
        header["prunekit.sha256"] = _checksum(plain, meta_json + "\0" + codecs_json)
    example = "model.safetensors" if kind == "checkpoint" else f"{kind}.safetensors"
    return atomic_write(path, lambda f: f.write(save(plain, metadata=header)), example=example)


def read(path: str | os.PathLike[str], *, kind: str | None = None, device: str | torch.device = "cpu",
         into: Mapping[str, torch.Tensor] | None = None,
         check: Callable[[dict[str, tuple[tuple[int, ...], str]], dict[str, Any]], None] | None = None,
         ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a file written by :func:`write`.

    Args:
        path: The file.
        kind: If given, the kind the file must have.
        device: Where to put the tensors.
        into: Optional destination tensors by name, for compressed files read to the CPU: a stored tensor is decoded
            straight into its destination where dtype and shape agree (see
            :func:`prunekit.compress.decode_tensors`), and the destination is returned under its name.
        check: Called once the file is verified and before anything is decoded (or written into ``into``) with
            ``{name: (shape, dtype name)}`` of the stored tensors and the metadata; it raises to refuse the file.

    Returns:
        ``(tensors, meta)``.

    Raises:
        FileFormatError: If the file is missing, not a safetensors file, truncated, fails its checksum, was written by
            another format version, or holds another kind.
    """
    path = Path(path)
    if path.is_dir():
        raise FileFormatError(f"{path} is a directory, not a file; give the path of the file itself")
    if not path.is_file():
        raise FileFormatError(f"no such file: {path}")
    fast = _read_compressed(path)  # compressed files: one read, the payload as bytes
    payload: memoryview | None = None
    if fast is not None:
        header, payload = fast
        tensors: dict[str, torch.Tensor] = {}
    else:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                header = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            foreign = _foreign_format(path)
            if foreign is not None:
                raise FileFormatError(foreign) from None
            raise FileFormatError(
                f"{path} is not a readable safetensors file (truncated or corrupted?): {exc}. "
                "Re-create it from the run that produced it."
            ) from None
    if header.get("prunekit.format") != FORMAT:
        raise FileFormatError(f"{path} is a safetensors file but not a prunekit file (no 'prunekit.format' header)")
    version = header.get("prunekit.version", "?")
    if version not in [str(v) for v in VERSIONS]:
        raise FileFormatError(
            f"{path} uses prunekit file format version {version}; this prunekit reads versions "
            f"{', '.join(map(str, VERSIONS))}. Use the prunekit release that wrote it, or re-save the model."
        )
    if kind is not None and header.get("prunekit.kind") != kind:
        raise FileFormatError(f"{path} holds a {header.get('prunekit.kind')!r}, expected a {kind!r}")
    meta_json = header.get("prunekit.meta", "{}")
    codecs_json = header.get("prunekit.codecs")
    if codecs_json is not None:
        try:
            codecs_json, meta_json = _unsqueeze(codecs_json), _unsqueeze(meta_json)
        except (ValueError, zlib.error) as exc:
            raise FileFormatError(f"{path}: the header is corrupted ({exc}); re-create the file") from None
    if (version in ("2", "3")) != (codecs_json is not None):
        raise FileFormatError(f"{path}: version {version} file {'without' if codecs_json is None else 'with'} "
                              "codec table (corrupted header)")
    signed = meta_json if codecs_json is None else meta_json + "\0" + codecs_json
    digest = _checksum(tensors, signed) if payload is None else _payload_checksum(payload, signed)
    if digest != header.get("prunekit.sha256"):
        raise FileFormatError(f"{path} fails its checksum: the file was modified or corrupted after it was written")
    meta = json.loads(meta_json)
    if codecs_json is not None:
        try:
            if payload is None and set(tensors) != {PAYLOAD}:
                raise CompressionError(f"a compressed file holds one tensor {PAYLOAD!r}, found {sorted(tensors)[:5]}")
            table = json.loads(codecs_json)
            if check is not None:
                stored = {name: (tuple(int(d) for d in h["shape"]), str(h["dtype"]))
                          for name, h in table["tensors"].items()}
        except (CompressionError, KeyError, TypeError, ValueError) as exc:
            raise FileFormatError(f"{path}: a compressed tensor does not decode ({exc}); re-create the file") from None
        if check is not None:
            check(stored, meta)
        try:
            tensors = decode_tensors(tensors[PAYLOAD] if payload is None else payload, table,
                                     into if str(device) == "cpu" else None)
        except (CompressionError, KeyError, TypeError, ValueError) as exc:
            raise FileFormatError(f"{path}: a compressed tensor does not decode ({exc}); re-create the file") from None
    elif check is not None:
        check({name: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in tensors.items()}, meta)
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, meta


# --------------------------------------------------------------------------------------------------------------------
# nested state (optimizer / LR-scheduler state dicts) <-> tensors + JSON skeleton


def pack(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Turn nested state into a JSON-able skeleton, moving tensors into ``tensors`` under ``prefix``.

    Supports dicts (any JSON-scalar keys), lists, tuples, tensors, str/int/float/bool/None.

    Examples:
        >>> store = {}
        >>> skel = pack({"state": {0: {"m": torch.zeros(2)}}, "betas": (0.9, 0.99)}, "opt", store)
        >>> unpack(skel, store)["betas"], list(store)
        ((0.9, 0.99), ['opt.0'])
    """
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}.{len(tensors)}"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, Mapping):
        items = list(obj.items())
        for k, _ in items:
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise TypeError(f"cannot store a dict key of type {type(k).__name__} ({k!r})")
        return {"__dict__": [[k, pack(v, prefix, tensors)] for k, v in items]}
    if isinstance(obj, tuple):
        return {"__tuple__": [pack(v, prefix, tensors) for v in obj]}
    if isinstance(obj, list):
        return [pack(v, prefix, tensors) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(
        f"cannot store a value of type {type(obj).__name__} ({obj!r:.80}) without pickle; "
        "only tensors, numbers, strings, lists, tuples and dicts are supported"
    )


def unpack(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`pack`."""
    if isinstance(skeleton, list):
        return [unpack(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {k: unpack(v, tensors) for k, v in skeleton["__dict__"]}
        if "__tuple__" in skeleton:
            return tuple(unpack(v, tensors) for v in skeleton["__tuple__"])
        if "__float__" in skeleton:
            return float(skeleton["__float__"])
        raise FileFormatError(f"unknown entry in stored state: {sorted(skeleton)}")
    return skeleton
