"""Compressed storage of (sparse) tensors: entropy-coded positions + split, entropy-coded values.

Every tensor is encoded on its own, with whichever of these layouts is smallest for it:

* ``raw`` — the tensor's bytes as they are. A tensor never takes more room than this, so dense tensors never grow.
* ``values`` — all elements, their bytes split into planes that are entropy-coded separately (see below).
* ``sparse`` — the positions of the non-zero elements, then the non-zero values, split and coded the same way.

Positions are coded either as the gaps between consecutive non-zeros (one byte per gap, longer gaps escaped into a
``uint32``/``uint64`` side stream) or as a packed bitmask, whichever is smaller. Values are split so that the parts
with structure are coded apart from the random-looking mantissa bits: for ``float32`` the 8 exponent bits, then the
sign with the 7 top mantissa bits (coded *separately for each exponent value*, so their skew within an octave is
captured), then the two low mantissa bytes; ``bfloat16`` likewise; other dtypes by byte plane. Where it is smaller,
the signs of ``float32``/``bfloat16`` values are coded apart as *flips* against the previous kept value's sign, split
by whether that value is its direct neighbour (``"signs": "flip"`` in the header): trained weights change sign rarely
between neighbouring inputs (an MLP's first layer over image pixels), which saves most of a bit per such sign.

Each byte stream is stored raw or with the smallest of Huffman coding (zlib, Huffman only), deflate and LZMA (raw
LZMA2, only for streams up to :data:`LZMA_MAX_BYTES`, and only if it saves at least :data:`LZMA_MIN_GAIN`, because it
decodes about ten times slower). All of it is Python's standard library (``zlib``, ``lzma``) plus numpy, vectorised;
where prunekit's native library builds (:mod:`prunekit.sparse._native`), exact ``float32`` values are reassembled
and scattered to their positions by one compiled pass instead (same checks, same result; the tests compare the two),
and :func:`decode_tensors` can decode straight into destination tensors such as a model's own parameters.

Lossless means bit-exact for every element, with one documented exception: negative zeros (``-0.0``, which pruning
by multiplication leaves where negative weights were zeroed; ``-0.0 == 0.0``) come back as ``+0.0`` unless
``Compression(keep_negative_zero=True)``. Optional lossy value codecs (positions stay exact, so zeros stay zero):

* ``"fp16"`` — values rounded to float16 (tensors with values outside float16's range stay exact);
* ``"int8"`` — symmetric int8 with one scale per row (output channel): ``w ≈ q * max|w_row| / 127``;
* ``"kmeans"`` — weight sharing (Han et al. 2016, Deep Compression, https://arxiv.org/abs/1510.00149): the non-zero
  values of a tensor are replaced by the nearest of ``2**bits`` centroids found by 1-D k-means (linear
  initialisation, as in the paper), and only the centroid indices are stored.

Examples:
    >>> import torch
    >>> w = torch.randn(64, 64)
    >>> w[w.abs() < 1.5] = 0  # about 87% zeros
    >>> header, payload = encode(w)
    >>> header["layout"], len(payload) < w.numel() * 4 / 5
    ('sparse', True)
    >>> torch.equal(decode(header, payload), w)
    True
"""

from __future__ import annotations

import ctypes
import lzma
import math
import sys
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from prunekit._fast import copy_into

__all__ = [
    "LZMA_MAX_BYTES",
    "LZMA_MIN_GAIN",
    "PACK_NUMEL",
    "VALUE_CODECS",
    "Compression",
    "CompressionError",
    "decode",
    "decode_tensors",
    "encode",
    "encode_tensors",
    "kmeans_1d",
    "positions_of",
    "quantize_rows",
]

VALUE_CODECS = ("exact", "fp16", "int8", "kmeans")
LZMA_MAX_BYTES = 1 << 19  # LZMA decodes ~10x slower than Huffman: only short streams may use it
LZMA_MIN_GAIN = 0.05  # ... and only if it is at least this much smaller than the best other method
_ESCAPE = 255  # gap bytes: 255 means "the real gap is in the side stream"
_MIN_CONTEXT = 512  # exponent values seen fewer times than this share one sign/mantissa stream

_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool)
}
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class CompressionError(ValueError):
    """An encoded tensor cannot be decoded: its header or payload is inconsistent (corrupted file or a bug)."""


@dataclass(frozen=True)
class Compression:
    """How to store tensors compressed.

    Args:
        values: ``"exact"`` (lossless), or a lossy value codec for floating-point tensors: ``"fp16"``, ``"int8"``
            (per-row scales) or ``"kmeans"`` (``2**bits`` shared values per tensor).
        bits: Index bits of the ``"kmeans"`` codec (1 to 8).
        keep_negative_zero: Keep the sign of zeros too (``-0.0``); costs room where pruning left negative zeros.

    Examples:
        >>> Compression("int8")
        Compression(values='int8', bits=5, keep_negative_zero=False)
        >>> Compression("int4")
        Traceback (most recent call last):
        ...
        ValueError: unknown value codec 'int4'; choose one of ('exact', 'fp16', 'int8', 'kmeans')
    """

    values: str = "exact"
    bits: int = 5
    keep_negative_zero: bool = False

    def __post_init__(self) -> None:
        if self.values not in VALUE_CODECS:
            raise ValueError(f"unknown value codec {self.values!r}; choose one of {VALUE_CODECS}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"bits={self.bits!r} must be an int from 1 to 8 (k-means uses 2**bits shared values)")

    @property
    def lossless(self) -> bool:
        return self.values == "exact"

    @classmethod
    def parse(cls, spec: bool | str | Compression | None) -> Compression | None:
        """``None``/``False`` -> None (no compression); ``True``/``"lossless"`` -> lossless; ``"fp16"``, ``"int8"``,
        ``"kmeans"`` -> that lossy value codec; a :class:`Compression` is returned as it is.

        Examples:
            >>> Compression.parse(True), Compression.parse("kmeans").values, Compression.parse(None)
            (Compression(values='exact', bits=5, keep_negative_zero=False), 'kmeans', None)
        """
        if spec is None or spec is False:
            return None
        if spec is True or spec == "lossless":
            return cls()
        if isinstance(spec, Compression):
            return spec
        if isinstance(spec, str) and spec in VALUE_CODECS:
            return cls(values=spec)
        raise ValueError(
            f"compress={spec!r} is not understood; use False, True/'lossless', one of {VALUE_CODECS[1:]} "
            "or a prunekit.compress.Compression(...)"
        )


# --------------------------------------------------------------------------------------------------------------------
# byte streams


def _huffman(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)
    return c.compress(data) + c.flush()


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15, 9)
    return c.compress(data) + c.flush()


def _lzma(data: bytes) -> bytes:
    # literal coding with no context (lc=lp=pb=0) suits streams of independent symbols; a dictionary no larger than
    # the stream keeps the encoder's set-up cheap
    dict_size = max(1 << 16, 1 << max(len(data) - 1, 1).bit_length())
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": dict_size, "lc": 0, "lp": 0, "pb": 0}]
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=filters)


def _pack(data: bytes) -> tuple[str, bytes]:
    """The smallest of raw / Huffman / deflate (/ LZMA for short streams) for one byte stream."""
    best_method, best = "raw", data
    if len(data) < 16:
        return best_method, best
    out = _huffman(data)
    if len(out) < len(best):
        best_method, best = "huffman", out
    huffman_ratio = len(out) / len(data)
    if huffman_ratio > 0.97 and len(data) > 4096:
        return best_method, best  # random-looking bytes (low mantissa bits): nothing else will do better
    out = _deflate(data)
    if len(out) < len(best):
        best_method, best = "deflate", out
    # LZMA's arithmetic coder beats Huffman's whole bits on skewed streams (exponents, gaps); elsewhere it only costs
    if len(data) <= LZMA_MAX_BYTES and (huffman_ratio < 0.6 or len(data) <= 4096):
        out = _lzma(data)
        if len(out) < (1.0 - LZMA_MIN_GAIN) * len(best):
            best_method, best = "lzma", out
    return best_method, best


def _unpack(method: str, blob: memoryview | bytes, size: int) -> bytes:
    try:
        if method == "raw":
            out = bytes(blob)
        elif method in ("huffman", "deflate"):
            out = zlib.decompress(blob, -15)
        elif method == "lzma":
            out = lzma.decompress(blob, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
        else:
            raise CompressionError(f"unknown stream method {method!r}")
    except (zlib.error, lzma.LZMAError) as exc:
        raise CompressionError(f"a {method} stream does not decode: {exc}") from None
    if len(out) != size:
        raise CompressionError(f"a {method} stream decoded to {len(out)} bytes, expected {size}")
    return out


class _Writer:
    """Collects the coded streams of one tensor: ``header["streams"]`` is ``[[method, stored, decoded], ...]``."""

    def __init__(self) -> None:
        self.streams: list[list[Any]] = []
        self.parts: list[bytes] = []

    def add(self, array: np.ndarray) -> None:
        raw = np.ascontiguousarray(array).tobytes()
        method, blob = _pack(raw)
        self.streams.append([method, len(blob), len(raw)])
        self.parts.append(blob)

    @property
    def nbytes(self) -> int:
        return sum(len(p) for p in self.parts)


class _Reader:
    def __init__(self, streams: list[list[Any]], payload: memoryview) -> None:
        self.streams, self.payload, self.i, self.offset = streams, payload, 0, 0

    def next(self, dtype: type[np.generic] = np.uint8) -> np.ndarray:
        i, offset = self.i, self.offset
        if i >= len(self.streams):
            raise CompressionError("the header lists fewer streams than the codec needs")
        method, stored, size = self.streams[i]
        end = offset + stored
        if end > len(self.payload):
            raise CompressionError(f"the payload ends inside stream {i} (truncated)")
        self.i, self.offset = i + 1, end
        return np.frombuffer(_unpack(method, self.payload[offset:end], size), dtype=dtype)

    def done(self) -> None:
        if self.i != len(self.streams) or self.offset != len(self.payload):
            raise CompressionError(
                f"the payload has {len(self.payload) - self.offset} unread bytes / {len(self.streams) - self.i} "
                "unread streams"
            )


# --------------------------------------------------------------------------------------------------------------------
# positions


def _put_flat_positions(w: _Writer, keep: np.ndarray) -> str:
    """Code the boolean vector ``keep`` as gaps or as a bitmask, whichever is smaller; returns the method name."""
    n = keep.size
    idx = np.flatnonzero(keep)
    gaps = np.diff(idx, prepend=-1) - 1  # zeros before each kept element
    wide = np.uint32 if n < 2**32 else np.uint64
    gap_writer = _Writer()
    gap_writer.add(np.minimum(gaps, _ESCAPE).astype(np.uint8))
    gap_writer.add(gaps[gaps >= _ESCAPE].astype(wide))
    bit_writer = _Writer()
    bit_writer.add(np.packbits(keep))
    chosen, method = (gap_writer, "gaps") if gap_writer.nbytes <= bit_writer.nbytes else (bit_writer, "bitmask")
    w.streams += chosen.streams
    w.parts += chosen.parts
    return method


def _get_flat_positions(r: _Reader, method: str, n: int, count: int, as_mask: bool = False) -> np.ndarray:
    """Indices (int64, ascending) of the ``count`` kept elements among ``n`` — or, for a bitmask and ``as_mask``, the
    boolean mask itself (cheaper to scatter with)."""
    if method == "gaps":
        small = r.next(np.uint8)
        wide = r.next(np.uint32 if n < 2**32 else np.uint64)
        if small.size != count:
            raise CompressionError(f"{small.size} gaps for {count} non-zeros")
        gaps = small.astype(np.int64)
        escaped = small == _ESCAPE
        if int(escaped.sum()) != wide.size:
            raise CompressionError("escaped gaps and the side stream disagree")
        gaps[escaped] = wide
        idx = np.cumsum(gaps + 1) - 1
    elif method == "bitmask":
        bits = r.next(np.uint8)
        if bits.size != (n + 7) // 8:
            raise CompressionError(f"bitmask of {bits.size} bytes for {n} elements")
        mask = np.unpackbits(bits, count=n).view(bool)
        if as_mask:
            if int(np.count_nonzero(mask)) != count:
                raise CompressionError(f"bitmask holds {int(np.count_nonzero(mask))} positions, expected {count}")
            return mask
        idx = np.flatnonzero(mask)
    else:
        raise CompressionError(f"unknown positions method {method!r}")
    if idx.size != count or (count and (idx[0] < 0 or idx[-1] >= n)):
        raise CompressionError(f"positions decode to {idx.size} indices in [0, {n}), expected {count}")
    return idx


def _put_positions(w: _Writer, keep: np.ndarray, shape: tuple[int, ...]) -> str:
    """Code the kept positions; for tensors with 2+ dims, empty rows (output channels) and columns (inputs) are first
    taken out with two bitmaps when that is smaller — they cost nothing more after that. Returns the method name."""
    flat = _Writer()
    method = _put_flat_positions(flat, keep)
    if len(shape) >= 2 and keep.size:
        grid = keep.reshape(shape[0], -1)  # (rows, cols)
        live_rows, live_cols = grid.any(axis=1), grid.any(axis=0)
        if not (live_rows.all() and live_cols.all()):
            sub = _Writer()
            sub.add(np.packbits(live_rows))
            sub.add(np.packbits(live_cols))
            sub_method = _put_flat_positions(sub, grid[live_rows][:, live_cols].reshape(-1))
            if sub.nbytes < flat.nbytes:
                flat, method = sub, "live-" + sub_method
    w.streams += flat.streams
    w.parts += flat.parts
    return method


def _get_positions(r: _Reader, method: str, shape: tuple[int, ...], count: int, as_mask: bool = False) -> np.ndarray:
    n = math.prod(shape)
    if not method.startswith("live-"):
        return _get_flat_positions(r, method, n, count, as_mask)
    if len(shape) < 2:
        raise CompressionError(f"live-row/column positions for a tensor of shape {shape}")
    rows, cols = shape[0], n // shape[0]
    live_rows = np.flatnonzero(np.unpackbits(r.next(), count=rows))
    live_cols = np.flatnonzero(np.unpackbits(r.next(), count=cols))
    sub = _get_flat_positions(r, method.removeprefix("live-"), live_rows.size * live_cols.size, count)
    return live_rows[sub // live_cols.size] * cols + live_cols[sub % live_cols.size]


# --------------------------------------------------------------------------------------------------------------------
# exact values


def _context_groups(context: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How a stream is split by its context byte: one part per frequent context value (in value order), then one
    part for all rare ones. Returns ``(lut, sizes)``: ``lut`` (uint16, 256 entries) maps a context value to its part,
    ``sizes`` the length of each part (a single part when at most one value is frequent and no value is rare)."""
    counts = np.bincount(context, minlength=256)
    frequent = counts >= _MIN_CONTEXT
    if int(frequent.sum()) <= 1 and counts[frequent].sum() == context.size:
        return np.zeros(256, dtype=np.uint16), np.array([context.size])
    lut = np.cumsum(frequent) - 1  # frequent value -> its part
    lut[~frequent] = int(frequent.sum())  # rare values -> the last part
    sizes = np.append(counts[frequent], counts[~frequent].sum())  # the parts in lut order
    return lut.astype(np.uint16), sizes


def _context_split(context: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """The split of :func:`_context_groups` as ``(order, sizes)``: ``data[order]`` is the concatenation of the parts
    (``order`` is None when there is only one part); the decoder recomputes the same split from the decoded
    contexts."""
    lut, sizes = _context_groups(context)
    if sizes.size == 1:
        return None, sizes
    return np.argsort(lut[context], kind="stable"), sizes


def _put_split(w: _Writer, context: np.ndarray, data: np.ndarray) -> None:
    order, sizes = _context_split(context)
    ordered = data if order is None else data[order]
    for part in np.split(ordered, np.cumsum(sizes)[:-1]):
        w.add(part)


def _get_split(r: _Reader, context: np.ndarray) -> np.ndarray:
    order, sizes = _context_split(context)
    parts = [r.next(np.uint8) for _ in sizes]
    if [p.size for p in parts] != sizes.tolist():
        raise CompressionError("a context stream has the wrong length")
    joined = np.concatenate(parts) if len(parts) > 1 else parts[0]
    if order is None:
        return joined
    out = np.empty(context.size, dtype=np.uint8)
    out[order] = joined
    return out


def _value_layout(dtype: torch.dtype) -> str:
    return {torch.float32: "f32", torch.bfloat16: "bf16"}.get(dtype, "planes")


def _adjacent(idx: np.ndarray | None, n: int, count: int) -> np.ndarray:
    """For each kept element (in order), whether the element just before it in the flattened tensor is kept too.

    ``idx`` is the kept elements' int64 indices, their bool mask over all ``n`` elements, or None (all kept)."""
    if idx is None:
        adj = np.ones(count, dtype=bool)
    elif idx.dtype == bool:
        before = np.zeros(n, dtype=bool)
        before[1:] = idx[:-1]
        return before[idx]
    else:
        adj = np.empty(count, dtype=bool)
        adj[1:] = np.diff(idx) == 1
    if count:
        adj[0] = False
    return adj


def _put_flips(w: _Writer, sign: np.ndarray, adjacent: np.ndarray) -> None:
    """Code sign bits as flips (sign XOR the previous kept value's sign), split by whether the two are neighbours.

    Trained weights are locally smooth along the input dimension (an MLP's first layer over image pixels, a conv
    kernel's taps), so a neighbour's sign predicts the next one; where nothing predicts it, the split costs nothing
    more than the bits themselves (the encoder keeps the classic layout then)."""
    flips = sign.copy()
    flips[1:] ^= sign[:-1]
    for part in (flips[~adjacent], flips[adjacent]):
        w.add(np.packbits(part))


def _get_flips(r: _Reader, adjacent: np.ndarray) -> np.ndarray:
    flips = np.empty(adjacent.size, dtype=np.uint8)
    for where in (~adjacent, adjacent):
        k = int(where.sum())
        packed = r.next()
        if packed.size != (k + 7) // 8:
            raise CompressionError(f"sign stream of {packed.size} bytes for {k} signs")
        flips[where] = np.unpackbits(packed, count=k)
    return np.bitwise_xor.accumulate(flips) if flips.size else flips


FLIP_MIN_GAIN = 48  # bytes the flip-coded signs must save to be chosen (two more streams in the header)


def _put_values(w: _Writer, bits: np.ndarray, layout: str, adjacent: np.ndarray | None = None) -> str | None:
    """Code unsigned-integer views of values (``bits``) split into planes.

    With ``adjacent`` (see :func:`_adjacent`), float32/bfloat16 signs are also tried as flips against the previous
    kept value's sign (:func:`_put_flips`); returns ``"flip"`` if that was smaller and used, else None."""
    if layout in ("f32", "bf16"):  # sign | exponent (8) | mantissa (23 or 7)
        shift = 23 if layout == "f32" else 7
        exponent = ((bits >> shift) & 0xFF).astype(np.uint8)
        sign = (bits >> (31 if layout == "f32" else 15)).astype(np.uint8)
        mantissa7 = ((bits >> 16) & 0x7F if layout == "f32" else bits & 0x7F).astype(np.uint8)  # top 7 mantissa bits
        w.add(exponent)
        classic = _Writer()
        _put_split(classic, exponent, (mantissa7 << 1) | sign)
        chosen, mode = classic, None
        if adjacent is not None:
            flip = _Writer()
            _put_split(flip, exponent, mantissa7)
            _put_flips(flip, sign, adjacent)
            if flip.nbytes + FLIP_MIN_GAIN < classic.nbytes:
                chosen, mode = flip, "flip"
        w.streams += chosen.streams
        w.parts += chosen.parts
        if layout == "f32":
            w.add(((bits >> 8) & 0xFF).astype(np.uint8))
            w.add((bits & 0xFF).astype(np.uint8))
        return mode
    # byte planes, most significant first; the second plane is coded per value of the first
    size = bits.dtype.itemsize
    planes = [((bits >> (8 * (size - 1 - k))) & 0xFF).astype(np.uint8) for k in range(size)]
    w.add(planes[0])
    if size > 1:
        _put_split(w, planes[0], planes[1])
    for plane in planes[2:]:
        w.add(plane)
    return None


def _get_values(r: _Reader, layout: str, itemsize: int, count: int, adjacent: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`_put_values`; ``adjacent`` is given exactly when the signs were coded as flips."""
    utype = _UINT[itemsize]
    if layout in ("f32", "bf16"):
        exponent = r.next()
        if adjacent is None:
            top = _get_split(r, exponent)
        else:
            if adjacent.size != count or exponent.size != count:
                raise CompressionError(f"{exponent.size} exponents and {adjacent.size} sign contexts for {count} "
                                       "values")
            top = (_get_split(r, exponent) << 1) | _get_flips(r, adjacent)
        if layout == "bf16":
            if exponent.size != count or top.size != count:
                raise CompressionError("value planes of different lengths")
            top16 = top.astype(np.uint16)
            return ((top16 & 1) << 15) | (exponent.astype(np.uint16) << 7) | (top16 >> 1)
        mid, low = r.next(), r.next()
        if not exponent.size == top.size == mid.size == low.size == count:
            raise CompressionError("value planes of different lengths")
        if sys.byteorder != "little":  # pragma: no cover - all supported platforms are little-endian
            return ((top.astype(np.uint32) & 1) << 31) | (exponent.astype(np.uint32) << 23) | \
                ((top.astype(np.uint32) >> 1) << 16) | (mid.astype(np.uint32) << 8) | low.astype(np.uint32)
        # assemble the little-endian bytes of each float32 column by column: cheaper than 32-bit shifts
        out = np.empty((count, 4), dtype=np.uint8)
        out[:, 0] = low
        out[:, 1] = mid
        out[:, 2] = ((exponent & 1) << 7) | (top >> 1)
        out[:, 3] = ((top & 1) << 7) | (exponent >> 1)
        return out.view(np.uint32).reshape(count)
    if layout != "planes":
        raise CompressionError(f"unknown value layout {layout!r}")
    planes = [r.next()]
    if itemsize > 1:
        planes.append(_get_split(r, planes[0]))
    planes += [r.next() for _ in range(itemsize - 2)]
    if any(p.size != count for p in planes):
        raise CompressionError("value planes of different lengths")
    out = np.zeros(count, dtype=utype)
    for k, plane in enumerate(planes):
        out |= plane.astype(utype) << utype(8 * (itemsize - 1 - k))
    return out


# --------------------------------------------------------------------------------------------------------------------
# lossy values


def quantize_rows(values: np.ndarray, rows: np.ndarray, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization with one scale per row: ``q = round(v / s_row)``, ``s_row = max|v_row| / 127``.

    Args:
        values: float values (any float dtype).
        rows: Row index of each value.
        num_rows: Number of rows.

    Returns:
        ``(q, scales)``: int8 codes in [-127, 127] and float32 scales (0 for rows without values). A zero stays zero.

    Examples:
        >>> q, s = quantize_rows(np.array([1.0, -0.5, 4.0]), np.array([0, 0, 1]), 2)
        >>> q.tolist(), s.tolist()
        ([127, -64, 127], [0.007874015718698502, 0.031496062874794006])
    """
    absmax = np.zeros(num_rows, dtype=np.float64)
    np.maximum.at(absmax, rows, np.abs(values.astype(np.float64)))
    scales = (absmax / 127.0).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float64)
    q = np.clip(np.rint(values.astype(np.float64) / safe[rows]), -127, 127).astype(np.int8)
    return q, scales


def kmeans_1d(values: np.ndarray, k: int, iterations: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """1-D k-means (Lloyd) with centroids initialised linearly between min and max (Han et al. 2016).

    Args:
        values: The values to cluster.
        k: Number of centroids.
        iterations: Lloyd iterations (stops early once the assignment no longer changes).

    Returns:
        ``(centroids float32 (k,), index uint8 per value)``.

    Examples:
        >>> c, i = kmeans_1d(np.array([0.1, 0.11, 0.9, 1.0]), 2)
        >>> [round(float(x), 3) for x in c], i.tolist()
        ([0.105, 0.95], [0, 0, 1, 1])
    """
    x = values.astype(np.float64)
    if x.size == 0:
        return np.zeros(k, dtype=np.float32), np.zeros(0, dtype=np.uint8)
    centroids = np.linspace(x.min(), x.max(), k)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    csum = np.concatenate([[0.0], np.cumsum(xs)])
    assign = None
    for _ in range(iterations):
        # on sorted values each cluster is a contiguous range; boundaries are the midpoints between centroids
        bounds = np.searchsorted(xs, (centroids[1:] + centroids[:-1]) / 2)
        edges = np.concatenate([[0], bounds, [xs.size]])
        counts = np.diff(edges)
        sums = csum[edges[1:]] - csum[edges[:-1]]
        new = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        if assign is not None and np.array_equal(edges, assign):
            break
        assign, centroids = edges, np.sort(new)
    centroids32 = centroids.astype(np.float32)
    # final assignment to the nearest float32 centroid, in the original order
    mids = (centroids32[1:].astype(np.float64) + centroids32[:-1].astype(np.float64)) / 2
    index = np.searchsorted(mids, x).astype(np.uint8)
    return centroids32, index


# --------------------------------------------------------------------------------------------------------------------
# tensors


def _as_bits(t: torch.Tensor) -> np.ndarray:
    """The tensor's elements as unsigned integers of the same width (a copy-free view where possible)."""
    if t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous():  # the common case, fast
        return t.detach().numpy().reshape(-1).view(np.uint32)
    flat = t.detach().cpu().contiguous().reshape(-1)
    if t.dtype == torch.bool:
        return flat.view(torch.uint8).numpy()
    return flat.view(_INT_VIEW[t.element_size()]).numpy().view(_UINT[t.element_size()])


def _row_length(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) if len(shape) >= 2 else max(math.prod(shape), 1)


def encode(t: torch.Tensor, compression: Compression | None = None) -> tuple[dict[str, Any], bytes]:
    """Encode one tensor; returns a JSON-able header and the payload bytes. See the module docstring.

    Args:
        t: Any CPU or GPU tensor of a supported dtype (float64/32/16, bfloat16, int64/32/16/8, uint8, bool).
        compression: How (default: lossless). Lossy value codecs apply to floating-point tensors only; other
            dtypes are always stored exactly.

    Returns:
        ``(header, payload)``; :func:`decode` inverts it. ``header["layout"]`` is ``"raw"``, ``"values"`` or
        ``"sparse"``; ``header["values"]`` names the value codec actually used.

    Raises:
        TypeError: Unsupported dtype.
    """
    comp = compression or Compression()
    dtype_name = str(t.dtype).removeprefix("torch.")
    if dtype_name not in _DTYPES:
        raise TypeError(f"cannot compress a tensor of dtype {t.dtype}; supported: {sorted(_DTYPES)}")
    shape = tuple(t.shape)
    n = t.numel()
    bits = _as_bits(t)
    raw = bits.tobytes()
    header: dict[str, Any] = {"layout": "raw", "dtype": dtype_name, "shape": list(shape), "values": "exact"}
    if n == 0:
        return header, raw
    floating = t.is_floating_point()
    if floating and not comp.keep_negative_zero:
        keep = (t.detach().cpu().reshape(-1) != 0).numpy()  # -0.0 counts as zero (restored as +0.0)
    else:
        keep = bits != 0
    candidates: list[tuple[int, dict[str, Any], list[bytes]]] = [(len(raw), header, [raw])]
    count = int(keep.sum())
    values_codec = comp.values if floating else "exact"
    for layout in ("sparse", "values"):
        if layout == "values" and count < n // 2:
            continue  # mostly zeros: coding every element cannot win
        if layout == "sparse" and count == n:
            continue
        w = _Writer()
        h: dict[str, Any] = {"layout": layout, "dtype": dtype_name, "shape": list(shape)}
        if layout == "sparse":
            h["count"] = count
            h["positions"] = _put_positions(w, keep, shape)
            idx = np.flatnonzero(keep)
        else:
            idx = None
        if t.dtype == torch.bool:
            if layout == "values":
                w.add(bits)
            h["values"] = "exact"
        else:
            h["values"] = _put_coded_values(w, h, t, bits, idx, values_codec, comp)
        h["streams"] = w.streams
        candidates.append((w.nbytes, h, w.parts))
    _, header, parts = min(candidates, key=lambda c: c[0])
    if header["layout"] == "raw" and values_codec != "exact":
        # lossy requested but raw won (tiny tensor): still exact, and said so
        header = dict(header, values="exact")
    return header, b"".join(parts)


def _put_coded_values(w: _Writer, h: dict[str, Any], t: torch.Tensor, bits: np.ndarray, idx: np.ndarray | None,
                      codec: str, comp: Compression) -> str:
    """Code the values at ``idx`` (all if None) with ``codec``; returns the codec actually used."""
    chosen = bits if idx is None else bits[idx]
    if codec == "fp16":
        values = t.detach().cpu().reshape(-1)
        values = values if idx is None else values[torch.from_numpy(idx)]
        finite = values[torch.isfinite(values)]
        if finite.numel() and float(finite.abs().max()) > float(torch.finfo(torch.float16).max):
            codec = "exact"  # out of float16's range: keep the tensor exact
        else:
            half = values.to(torch.float16).contiguous()
            _put_values(w, half.view(torch.int16).numpy().view(np.uint16), "planes")
            return "fp16"
    if codec in ("int8", "kmeans"):
        values = t.detach().cpu().reshape(-1).double().numpy()
        values = values if idx is None else values[idx]
        if not np.isfinite(values).all():
            codec = "exact"  # NaN/inf cannot be quantized: keep the tensor exact
        elif codec == "int8":
            shape = tuple(t.shape)
            row_len = _row_length(shape)
            positions = np.arange(t.numel()) if idx is None else idx
            num_rows = shape[0] if len(shape) >= 2 else 1
            q, scales = quantize_rows(values, positions // row_len, num_rows)
            w.add(scales.view(np.uint8))
            w.add(q.view(np.uint8))
            return "int8"
        else:
            k = 2**comp.bits
            centroids, index = kmeans_1d(values, k)
            h["bits"] = comp.bits
            w.add(centroids.view(np.uint8))
            w.add(index)
            return "kmeans"
    if _put_values(w, chosen, _value_layout(t.dtype), _adjacent(idx, t.numel(), chosen.size)) == "flip":
        h["signs"] = "flip"
    return "exact"


def decode(header: Mapping[str, Any], payload: bytes | memoryview | torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode`.

    Args:
        header: The header :func:`encode` returned.
        payload: Its payload (bytes, or a ``uint8`` tensor holding them).

    Returns:
        A new CPU tensor with the original dtype and shape.

    Raises:
        CompressionError: The header or payload is inconsistent.
    """
    return _decode(header, payload)[0]


_NATIVE: list[Any] = []  # [library or None], filled at the first decode


def _native() -> Any:
    """The compiled decoder (prunekit's native library), or None: then the NumPy decoder does the same work."""
    if not _NATIVE:
        from prunekit.sparse import _native

        _NATIVE.append(_native.library(warn=False))
    return _NATIVE[0]


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None or a.size == 0 else a.__array_interface__["data"][0]


def _decode_f32_native(lib: Any, r: _Reader, header: Mapping[str, Any], shape: tuple[int, ...], n: int,
                       count: int, want_keep: bool,
                       into: torch.Tensor | None = None) -> tuple[torch.Tensor, np.ndarray | None]:
    """Exact float32 values (``sparse`` or ``values`` layout) decoded by the compiled kernel: the same checks and
    result as the NumPy path, in one pass instead of ~25 array operations per tensor. With ``into`` (a contiguous
    CPU float32 tensor of the right shape) the values are written straight into it, which is returned."""
    from prunekit.sparse._native import PositionStreams, TopStreams  # noqa: PLC0415 - cheap after the first call

    pos = PositionStreams(0, n)
    keepalive: list[np.ndarray] = []  # arrays the structs point into
    if header["layout"] == "sparse":
        method = header["positions"]
        if method.startswith("live-") and len(shape) >= 2:
            rows, cols = shape[0], n // shape[0]
            live_rows = np.flatnonzero(np.unpackbits(r.next(), count=rows))
            live_cols = np.flatnonzero(np.unpackbits(r.next(), count=cols))
            keepalive += [live_rows, live_cols]
            pos.live_rows, pos.live_cols = _ptr(live_rows), _ptr(live_cols)
            pos.n_live_cols, pos.cols, pos.n_sub = live_cols.size, cols, live_rows.size * live_cols.size
            if pos.n_sub == 0 and count:
                raise CompressionError(f"positions decode to no live rows/columns for {count} non-zeros")
            method = method.removeprefix("live-")
        if method == "bitmask":
            bits = r.next()
            if bits.size != (pos.n_sub + 7) // 8:
                raise CompressionError(f"bitmask of {bits.size} bytes for {pos.n_sub} elements")
            keepalive.append(bits)
            pos.mode, pos.bits = 1, _ptr(bits)
        elif method == "gaps" and n < 2**32:
            gaps, wide = r.next(), r.next(np.uint32)
            if gaps.size != count:
                raise CompressionError(f"{gaps.size} gaps for {count} non-zeros")
            keepalive += [gaps, wide]
            pos.mode, pos.gaps, pos.wide, pos.wide_len = 2, _ptr(gaps), _ptr(wide), wide.size
        elif pos.live_rows is None:
            idx = _get_positions(r, method, shape, count)
            keepalive.append(idx)
            pos.mode, pos.idx = 3, _ptr(idx)
        else:
            raise CompressionError(f"unknown positions method {header['positions']!r}")
    exponent = r.next()
    if exponent.size != count:
        raise CompressionError(f"{exponent.size} exponents for {count} values")
    flip = header.get("signs") == "flip"
    # the context parts are the streams left before the flips and the two low planes; the kernel checks their sizes
    parts_n = len(r.streams) - r.i - (4 if flip else 2)
    if not 1 <= parts_n <= 257:
        raise CompressionError(f"{parts_n} context streams")
    part_sizes = np.array([stream[2] for stream in r.streams[r.i : r.i + parts_n]], dtype=np.int64)
    parts = [r.next() for _ in range(parts_n)]
    top = np.concatenate(parts) if parts_n > 1 else parts[0]
    far, near = (r.next(), r.next()) if flip else (None, None)
    mid, low = r.next(), r.next()
    r.done()
    if not top.size == mid.size == low.size == count:
        raise CompressionError("value planes of different lengths")
    streams = TopStreams(_ptr(exponent), _ptr(top), _ptr(part_sizes), parts_n, _MIN_CONTEXT, _ptr(mid), _ptr(low),
                         int(flip), _ptr(far), 0 if far is None else far.size, _ptr(near),
                         0 if near is None else near.size)
    out = np.empty(n, dtype=np.uint32) if into is None else into.detach().numpy().reshape(-1).view(np.uint32)
    keep = np.empty(n, dtype=np.uint8) if want_keep and pos.mode != 0 else None
    used = np.zeros(3, dtype=np.int64)
    status = lib.decode_f32(ctypes.addressof(streams), ctypes.addressof(pos), n, count, _ptr(out), _ptr(keep),
                            _ptr(used))
    if status != 0:
        raise CompressionError({-2: "the positions disagree with the number of values",
                                -3: "escaped gaps and the side stream disagree",
                                -4: "the context streams disagree with the exponents",
                                -5: "the sign streams are too short"}.get(status, f"decoder status {status}"))
    if flip and ((used[0] + 7) // 8 != far.size or (used[1] + 7) // 8 != near.size):  # type: ignore[union-attr]
        raise CompressionError(f"sign streams of {far.size}/{near.size} bytes for {used[0]}/{used[1]} signs")
    if pos.mode == 2 and used[2] != pos.wide_len:
        raise CompressionError("escaped gaps and the side stream disagree")
    tensor = torch.from_numpy(out).view(torch.float32).reshape(shape) if into is None else into
    if want_keep:
        keep_mask = np.ones(n, dtype=bool) if keep is None else keep.view(bool)
        return tensor, keep_mask
    return tensor, None


def _fits(t: torch.Tensor | None, dtype: torch.dtype, shape: tuple[int, ...]) -> bool:
    """Whether the decoder may write a tensor of ``dtype``/``shape`` straight into ``t``."""
    return t is not None and t.dtype == dtype and tuple(t.shape) == shape and t.device.type == "cpu" and \
        t.is_contiguous() and not t.is_conj() and not t.is_neg()


def _decode(header: Mapping[str, Any], payload: bytes | memoryview | torch.Tensor, want_keep: bool = False,
            into: torch.Tensor | None = None) -> tuple[torch.Tensor, np.ndarray | None]:
    """:func:`decode`, and with ``want_keep`` also the stored non-zero pattern (flat bool array, see :func:`_pattern`)
    when the layout stores positions (else None). With ``into``, the result is written into that tensor (which is
    returned) if it has the same dtype and shape: directly by the compiled decoder, else by a copy."""
    try:
        dtype = _DTYPES[header["dtype"]]
        shape = tuple(int(s) for s in header["shape"])
        layout = header["layout"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CompressionError(f"bad tensor header {dict(header)!r:.200}: {exc}") from None
    if isinstance(payload, torch.Tensor):
        payload = payload.contiguous().numpy().data if payload.numel() else b""
    view = memoryview(payload).cast("B")
    n = math.prod(shape)
    itemsize = dtype.itemsize
    if layout == "raw":
        if len(view) != n * itemsize:
            raise CompressionError(f"raw tensor of shape {shape} needs {n * itemsize} bytes, got {len(view)}")
        stored = np.frombuffer(view, dtype=_UINT[itemsize])
        if _fits(into, dtype, shape):
            np.copyto(_as_bits(into), stored)  # type: ignore[arg-type]
            return into, None  # type: ignore[return-value]
        return _from_bits(stored.copy(), dtype, shape), None
    if layout not in ("sparse", "values"):
        raise CompressionError(f"unknown layout {layout!r}")
    r = _Reader(header["streams"], view)
    codec = header.get("values", "exact")
    fits = _fits(into, dtype, shape)
    if dtype == torch.float32 and codec == "exact" and header.get("signs") in (None, "flip"):
        lib = _native()
        if lib is not None:
            count = int(header["count"]) if layout == "sparse" else n
            tensor, keep = _decode_f32_native(lib, r, header, shape, n, count, want_keep, into if fits else None)
            return tensor, keep if layout == "sparse" else None
    tensor, idx = _decode_numpy(r, header, layout, dtype, shape, n, itemsize)
    if fits:
        copy_into(into, tensor)  # type: ignore[arg-type]
        tensor = into  # type: ignore[assignment]
    if not want_keep or idx is None:
        return tensor, None
    if idx.dtype == bool:
        return tensor, idx
    keep = np.zeros(n, dtype=bool)
    keep[idx] = True
    return tensor, keep


def _decode_numpy(r: _Reader, header: Mapping[str, Any], layout: str, dtype: torch.dtype, shape: tuple[int, ...],
                  n: int, itemsize: int) -> tuple[torch.Tensor, np.ndarray | None]:
    """The NumPy decoder of the ``sparse`` / ``values`` layouts; also returns the kept positions (bool mask or int64
    indices; None for ``values``)."""
    if layout == "sparse":
        count = int(header["count"])
        # kept positions: int64 indices, or a bool mask where that is cheaper (both index numpy arrays alike)
        idx: np.ndarray | None = _get_positions(r, header["positions"], shape, count, as_mask=True)
    else:
        count, idx = n, None
    codec = header.get("values", "exact")
    if dtype == torch.bool:
        if idx is None:
            out_bits = r.next().copy()
        else:
            out_bits = np.zeros(n, dtype=np.uint8)
            out_bits[idx] = 1
        r.done()
        return _from_bits(out_bits, dtype, shape), idx
    if codec == "exact":
        signs = header.get("signs")
        if signs not in (None, "flip"):
            raise CompressionError(f"unknown sign coding {signs!r}")
        adjacent = _adjacent(idx, n, count) if signs == "flip" else None
        values = _get_values(r, _value_layout(dtype), itemsize, count, adjacent)
        r.done()
        if idx is None:
            return _from_bits(values.copy(), dtype, shape), idx
        out_bits = np.zeros(n, dtype=_UINT[itemsize])
        out_bits[idx] = values
        return _from_bits(out_bits, dtype, shape), idx
    if codec == "fp16":
        half = _get_values(r, "planes", 2, count)
        values_t = torch.from_numpy(half.view(np.int16).copy()).view(torch.float16).to(dtype)
    elif codec == "int8":
        scales = r.next().view(np.float32)
        q = r.next().view(np.int8)
        num_rows = shape[0] if len(shape) >= 2 else 1
        if scales.size != num_rows or q.size != count:
            raise CompressionError(f"int8 codec: {scales.size} scales for {num_rows} rows, {q.size} codes for {count}")
        positions = np.arange(n) if idx is None else (np.flatnonzero(idx) if idx.dtype == bool else idx)
        rows = positions // _row_length(shape)
        values_t = torch.from_numpy(q.astype(np.float32) * scales[rows]).to(dtype)
    elif codec == "kmeans":
        centroids = r.next().view(np.float32)
        index = r.next()
        if centroids.size != 2 ** int(header["bits"]) or index.size != count or (
                index.size and int(index.max()) >= centroids.size):
            raise CompressionError("kmeans codec: centroids and indices do not match")
        values_t = torch.from_numpy(centroids[index]).to(dtype)
    else:
        raise CompressionError(f"unknown value codec {codec!r}")
    r.done()
    if idx is None:
        return values_t.reshape(shape), idx
    out = torch.zeros(n, dtype=dtype)
    out[torch.from_numpy(idx)] = values_t  # bool mask or int64 indices
    return out.reshape(shape), idx


def _from_bits(bits: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    t = torch.from_numpy(bits)
    if dtype == torch.bool:
        return t.view(torch.bool).reshape(shape)
    if dtype == torch.uint8:
        return t.reshape(shape)
    return t.view(_INT_VIEW[t.element_size()]).view(dtype).reshape(shape)


def positions_of(header: Mapping[str, Any], payload: bytes | memoryview | torch.Tensor) -> np.ndarray | None:
    """Kept-element indices stored in a ``sparse`` header (None for other layouts) — the exact non-zero pattern of
    the original tensor, even where a lossy value codec rounded a kept value to zero."""
    if header.get("layout") != "sparse":
        return None
    if isinstance(payload, torch.Tensor):
        payload = payload.contiguous().numpy().data if payload.numel() else b""
    r = _Reader(header["streams"], memoryview(payload).cast("B"))
    return _get_positions(r, header["positions"], tuple(int(s) for s in header["shape"]), int(header["count"]))


# --------------------------------------------------------------------------------------------------------------------
# many tensors (what a file holds)


def _pattern(header: Mapping[str, Any], payload: bytes | memoryview | torch.Tensor,
             decoded: torch.Tensor | None) -> np.ndarray:
    """The stored non-zero pattern (bool, flat) of an encoded tensor."""
    n = math.prod(int(s) for s in header["shape"])
    idx = positions_of(header, payload)
    if idx is not None:
        keep = np.zeros(n, dtype=bool)
        keep[idx] = True
        return keep
    if decoded is None:
        decoded = decode(header, payload)
    return (decoded.reshape(-1) != 0).numpy()


PACK_NUMEL = 4096  # exactly-stored tensors smaller than this are coded together (biases, norms, small kernels)


def encode_tensors(
    tensors: Mapping[str, torch.Tensor],
    compression: Compression | Mapping[str, Compression] | None = None,
    patterns: Mapping[str, str] | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """Encode named tensors into one payload and a JSON-able table that says where each tensor is and how it is coded.

    Each tensor gets its own smallest layout (:func:`encode`), except that small exactly-stored tensors (fewer than
    :data:`PACK_NUMEL` elements) of one dtype are concatenated and coded together (one set of streams instead of
    hundreds of tiny ones: smaller and faster to decode).

    Args:
        tensors: Named tensors.
        compression: One :class:`Compression` for all tensors, or one per name (names not listed: lossless).
        patterns: ``{bool tensor name: other tensor name}``: a boolean tensor that equals the other tensor's stored
            non-zero pattern (a pruning mask and its weight) is stored as a reference to it, in no bytes at all.

    Returns:
        ``(payload, table)``; :func:`decode_tensors` inverts it.

    Examples:
        >>> w = torch.tensor([[0.0, 1.5], [0.0, -2.0]])
        >>> payload, table = encode_tensors({"w": w, "m": w != 0, "b": torch.ones(3)}, patterns={"m": "w"})
        >>> table["tensors"]["m"]["layout"], table["tensors"]["b"]["layout"]
        ('like', 'packed')
        >>> out = decode_tensors(payload, table)
        >>> torch.equal(out["w"], w), torch.equal(out["m"], w != 0), out["b"].tolist()
        (True, True, [1.0, 1.0, 1.0])
    """
    parts: list[bytes] = []
    offset = 0

    def put(header: dict[str, Any], payload: bytes) -> dict[str, Any]:
        nonlocal offset
        header["at"] = [offset, len(payload)]
        parts.append(payload)
        offset += len(payload)
        return header

    entries: dict[str, dict[str, Any]] = {}
    payloads: dict[str, bytes] = {}
    groups: dict[tuple[str, bool], list[str]] = {}
    comps: dict[str, Compression] = {}
    linked = set(patterns or {}) | set((patterns or {}).values())  # masks and their weights are coded on their own
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"value for {name!r} is a {type(t).__name__}, not a tensor")
        comp = (compression.get(name) if isinstance(compression, Mapping) else compression) or Compression()
        comps[name] = comp
        if (comp.lossless or not t.is_floating_point()) and 0 < t.numel() < PACK_NUMEL and name not in linked:
            groups.setdefault((str(t.dtype), comp.keep_negative_zero), []).append(name)
            continue
        header, payload = encode(t, comp)
        payloads[name] = payload
        entries[name] = put(header, payload)
    packs: list[dict[str, Any]] = []
    for (_, keep_negative_zero), names in groups.items():
        flat = torch.cat([tensors[n].detach().cpu().reshape(-1) for n in names])
        header, payload = encode(flat, Compression(keep_negative_zero=keep_negative_zero))
        packs.append(put(header, payload))
        start = 0
        for n in names:
            t = tensors[n]
            entries[n] = {"layout": "packed", "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                          "pack": len(packs) - 1, "start": start}
            start += t.numel()
    for name, ref in (patterns or {}).items():
        t = tensors.get(name)
        if t is None or ref not in entries or "at" not in entries[ref] or t.dtype != torch.bool or \
                t.shape != tensors[ref].shape:
            continue
        header = entries[ref]
        pattern = _pattern(header, payloads[ref],
                           tensors[ref].detach().cpu() if header.get("values") == "exact" else None)
        if np.array_equal(pattern, t.detach().cpu().reshape(-1).numpy()):
            entries[name] = {"layout": "like", "dtype": "bool", "shape": list(t.shape), "ref": ref}
    table = {"tensors": {name: entries[name] for name in tensors}, "packs": packs}
    return b"".join(parts), table


def decode_tensors(payload: bytes | memoryview | torch.Tensor, table: Mapping[str, Any],
                   into: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode_tensors`.

    Args:
        payload: The payload :func:`encode_tensors` returned.
        table: Its table.
        into: Optional destination tensors by name (e.g. a model's own ``state_dict()``): a tensor whose destination
            has the same dtype and shape and is a contiguous CPU tensor is decoded straight into it (no allocation,
            no later copy), and the destination itself is returned under that name.

    Raises:
        CompressionError: The table is inconsistent with itself or with the payload.
    """
    if isinstance(payload, torch.Tensor):
        payload = payload.contiguous().numpy().data if payload.numel() else b""
    view = memoryview(payload).cast("B")
    entries: Mapping[str, Mapping[str, Any]] = table["tensors"]
    end = 0

    def chunk(header: Mapping[str, Any]) -> memoryview:
        nonlocal end
        start, length = (int(v) for v in header["at"])
        if start < 0 or length < 0 or start + length > len(view):
            raise CompressionError(f"a tensor lies at bytes [{start}, {start + length}) of a {len(view)}-byte payload")
        end = max(end, start + length)
        return view[start : start + length]

    packs = [decode(h, chunk(h)) for h in table.get("packs", [])]
    pack_bits: list[np.ndarray | None] = [None] * len(packs)
    out: dict[str, torch.Tensor] = {}
    # tensors whose stored pattern a mask refers to: their decoder hands the pattern over (no second pass)
    referenced = {h.get("ref") for h in entries.values() if h.get("layout") == "like"}
    patterns: dict[str, np.ndarray] = {}
    for name, header in entries.items():
        layout = header.get("layout")
        if layout == "like":
            continue
        if layout == "packed":
            index, start = int(header["pack"]), int(header["start"])
            shape = tuple(int(s) for s in header["shape"])
            numel = math.prod(shape)
            if not 0 <= index < len(packs) or start < 0 or start + numel > packs[index].numel():
                raise CompressionError(f"{name}: bad pack reference {index}/{start}")
            pack = packs[index]
            if str(pack.dtype).removeprefix("torch.") != header["dtype"]:
                raise CompressionError(f"{name}: pack holds {pack.dtype}, header says {header['dtype']}")
            dest = into.get(name) if into is not None else None
            if _fits(dest, pack.dtype, shape):
                if pack_bits[index] is None:
                    pack_bits[index] = _as_bits(pack)
                np.copyto(_as_bits(dest), pack_bits[index][start : start + numel])  # type: ignore[arg-type,index]
                out[name] = dest  # type: ignore[assignment]
            else:
                out[name] = pack[start : start + numel].reshape(shape).clone()
        else:
            out[name], keep = _decode(header, chunk(header), want_keep=name in referenced,
                                      into=into.get(name) if into is not None else None)
            if keep is not None:
                patterns[name] = keep
    if end != len(view):
        raise CompressionError(f"the payload has {len(view) - end} bytes that no tensor uses")
    for name, header in entries.items():
        if header.get("layout") != "like":
            continue
        ref = header.get("ref")
        if ref not in out or "at" not in entries[ref]:
            raise CompressionError(f"{name} refers to the pattern of {ref!r}, which the file does not hold")
        shape = tuple(int(s) for s in header["shape"])
        if tuple(out[ref].shape) != shape:
            raise CompressionError(f"{name} has shape {shape} but its pattern source {ref} has {tuple(out[ref].shape)}")
        keep = patterns.pop(ref, None)  # handed over once; a second mask of the same weight decodes its own copy
        if keep is None:
            keep = _pattern(entries[ref], chunk(entries[ref]), out[ref])
        out[name] = torch.from_numpy(keep).reshape(shape)
    return {name: out[name] for name in entries}
