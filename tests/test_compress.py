"""Compressed storage: bit-exact round trips, every layout/positions/stream method decodable, dense never grows,
lossy codecs keep zeros, corrupted or truncated data is refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.compress import (
    PACK_NUMEL,
    Compression,
    CompressionError,
    decode,
    decode_tensors,
    encode,
    encode_tensors,
    kmeans_1d,
    quantize_rows,
)
from prunekit.fileformat import FileFormatError, read, write

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, for bit-exact comparison (NaN payloads included)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def sparse_tensor(shape, sparsity, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) >= sparsity
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g, dtype=torch.int64)
    t[torch.rand(shape, generator=g) < sparsity] = 0
    return t.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_round_trip_is_bit_exact_and_never_grows(dtype, sparsity):
    t = sparse_tensor((96, 130), sparsity, dtype)
    header, payload = encode(t)
    assert len(payload) <= t.numel() * t.element_size()  # never larger than the tensor itself
    out = decode(header, payload)
    assert out.dtype == t.dtype and out.shape == t.shape
    assert torch.equal(bits(out), bits(t))


def test_special_float_values_and_odd_shapes():
    t = torch.zeros(50, 70)
    t[0, :6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-45, -3.4e38, 1e-40])
    t[7, 3] = 2.5
    for x in (t, t[:, 5], t.t(), torch.tensor(3.0), torch.zeros(0, 4), torch.zeros(3, 0, 2)):
        header, payload = encode(x)
        assert torch.equal(bits(decode(header, payload)), bits(x.contiguous())), header


def test_negative_zeros_become_positive_unless_kept():
    w = torch.randn(200, 200)
    mask = torch.rand(200, 200) > 0.9
    w.mul_(mask)  # pruning by multiplication leaves -0.0 where negative weights were zeroed
    assert torch.signbit(w[w == 0]).any()
    header, payload = encode(w)
    out = decode(header, payload)
    assert torch.equal(out, w) and not torch.signbit(out[out == 0]).any()
    header_kept, payload_kept = encode(w, Compression(keep_negative_zero=True))
    assert torch.equal(bits(decode(header_kept, payload_kept)), bits(w))
    assert len(payload_kept) > len(payload)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 600),
    sparsity=st.floats(0.0, 1.0),
    dead_rows=st.integers(0, 5),
    dead_cols=st.integers(0, 50),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(rows, cols, sparsity, dead_rows, dead_cols, dtype, seed):
    t = sparse_tensor((rows, cols), sparsity, dtype, seed)
    t[:dead_rows] = 0
    t[:, :dead_cols] = 0
    header, payload = encode(t)
    assert len(payload) <= t.numel() * t.element_size()
    assert torch.equal(bits(decode(header, payload)), bits(t))


def test_every_layout_and_stream_method_is_used_and_decodes():
    g = torch.Generator().manual_seed(1)
    cases = {
        "tiny": torch.tensor([1.5, -2.0]),  # raw
        "dense": torch.randn(300, 300, generator=g),  # values (exponents coded apart)
        "half": sparse_tensor((300, 300), 0.5, torch.float32),  # bitmask
        "sparse": sparse_tensor((300, 784), 0.95, torch.float32),  # gaps
        "long-gaps": sparse_tensor((1, 200_000), 0.999, torch.float32),  # escaped gaps in the side stream
        "dead-inputs": torch.cat([torch.zeros(300, 400), sparse_tensor((300, 384), 0.8, torch.float32)], dim=1),
        "ints": torch.arange(100_000).reshape(1, -1),  # deflate finds the repeats
        "exponents": torch.full((4000,), 1.0).index_fill_(0, torch.arange(0, 4000, 97), 2.0),  # lzma: skewed bytes
    }
    layouts, positions, methods = set(), set(), set()
    for name, t in cases.items():
        header, payload = encode(t)
        layouts.add(header["layout"])
        positions.add(header.get("positions"))
        methods.update(s[0] for s in header.get("streams", []))
        assert torch.equal(bits(decode(header, payload)), bits(t)), name
    assert layouts == {"raw", "values", "sparse"}
    assert {"gaps", "bitmask", "live-gaps"} <= positions
    assert methods == {"raw", "huffman", "deflate", "lzma"}


def test_many_tensors_pack_small_ones_and_share_mask_patterns():
    w = sparse_tensor((64, 100), 0.9, torch.float32)
    tensors = {"w": w, "m": w != 0, "b": torch.randn(64), "n": torch.tensor(7), "big": torch.randn(100, 100),
               "other_mask": torch.rand(64, 100) > 0.5}
    payload, table = encode_tensors(tensors, patterns={"m": "w", "other_mask": "w"})
    entries = table["tensors"]
    assert entries["m"]["layout"] == "like"
    assert entries["other_mask"]["layout"] != "like"  # not w's pattern: stored on its own
    assert entries["b"]["layout"] == entries["n"]["layout"] == "packed"
    assert tensors["b"].numel() < PACK_NUMEL
    out = decode_tensors(payload, table)
    assert list(out) == list(tensors)
    for k, v in tensors.items():
        assert torch.equal(bits(out[k]), bits(v)), k


@pytest.mark.parametrize("codec", ["fp16", "int8", "kmeans"])
def test_lossy_codecs_keep_zeros_and_bound_the_error(codec):
    w = sparse_tensor((128, 256), 0.9, torch.float32)
    header, payload = encode(w, Compression(codec, bits=4))
    out = decode(header, payload)
    assert header["values"] == codec
    assert (out[w == 0] == 0).all()  # zeros stay zero
    _, exact_payload = encode(w)
    assert len(payload) < len(exact_payload)
    err = (out - w).abs()
    if codec == "fp16":
        assert err.max() <= w.abs().max() * 2**-11
    elif codec == "int8":
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        assert (err <= scale / 2 + 1e-6).all()
    else:
        assert torch.unique(out[w != 0]).numel() <= 16


def test_int8_codec_matches_quantize_per_channel():
    from prunekit.quantize import dequantize_per_channel, quantize_per_channel

    w = sparse_tensor((32, 3, 3, 3), 0.7, torch.float32)
    q, scale = quantize_per_channel(w)
    header, payload = encode(w, Compression("int8"))
    assert torch.equal(decode(header, payload), dequantize_per_channel(q, scale))


def test_quantize_rows_and_kmeans_oracles():
    q, s = quantize_rows(np.array([0.0, 1.27, -0.635, 2.0]), np.array([0, 0, 0, 1]), 3)
    assert q.tolist() == [0, 127, -64, 127] and s[2] == 0
    centroids, index = kmeans_1d(np.array([-1.0, -0.9, 0.5, 0.55, 0.6]), 2)
    assert index.tolist() == [0, 0, 1, 1, 1]
    assert np.allclose(centroids, [-0.95, 0.55])


def test_lossy_codecs_leave_integer_tensors_and_nan_exact():
    ints = torch.arange(1000).reshape(10, 100)
    header, payload = encode(ints, Compression("int8"))
    assert header["values"] == "exact" and torch.equal(decode(header, payload), ints)
    w = torch.randn(20, 20)
    w[3, 3] = float("nan")
    header, payload = encode(w, Compression("kmeans"))
    assert header["values"] == "exact" and torch.equal(bits(decode(header, payload)), bits(w))


def test_corrupted_streams_are_refused():
    w = sparse_tensor((100, 300), 0.9, torch.float32)
    header, payload = encode(w)
    with pytest.raises(CompressionError):
        decode(header, payload[:-10])  # truncated
    with pytest.raises(CompressionError):
        decode(header, payload + b"\0")  # extra bytes
    broken = dict(header, count=header["count"] + 1)
    with pytest.raises(CompressionError):
        decode(broken, payload)
    with pytest.raises(CompressionError):
        decode(dict(header, layout="zigzag"), payload)
    garbage = bytearray(payload)
    first = header["streams"][0]
    if first[0] != "raw":
        garbage[: first[1]] = bytes(first[1])  # a compressed stream replaced by zeros
        with pytest.raises(CompressionError):
            decode(header, bytes(garbage))


def test_compressed_files_are_checked_and_truncation_is_an_error(tmp_path):
    tensors = {"w": sparse_tensor((200, 300), 0.9, torch.float32), "b": torch.randn(200)}
    path = write(tmp_path / "c.pk", tensors, {"note": 1}, kind="x", compression=Compression())
    out, meta = read(path, kind="x")
    assert meta == {"note": 1} and all(torch.equal(out[k], v) for k, v in tensors.items())
    data = path.read_bytes()
    assert len(data) < 4 * 200 * 300 / 5
    (tmp_path / "t.pk").write_bytes(data[:-50])
    with pytest.raises(FileFormatError, match="truncated or corrupted"):
        read(tmp_path / "t.pk")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    (tmp_path / "f.pk").write_bytes(bytes(flipped))
    with pytest.raises(FileFormatError, match="checksum"):
        read(tmp_path / "f.pk")


def _file_header(path):
    import json
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])["__metadata__"]


def test_compressed_file_version_is_the_lowest_that_reads_it_and_newer_versions_are_refused(tmp_path):
    from safetensors.torch import save_file

    path = write(tmp_path / "c.pk", {"w": torch.zeros(10)}, {}, kind="x", compression=Compression())
    header = _file_header(path)
    assert header["prunekit.version"] == "2"  # nothing in it needs version 3
    smooth = write(tmp_path / "s.pk", {"w": smooth_signs((64, 256), 0.5)}, {}, kind="x", compression=Compression())
    assert _file_header(smooth)["prunekit.version"] == "3"  # flip-coded signs
    assert torch.equal(read(smooth)[0]["w"], smooth_signs((64, 256), 0.5))
    plain = write(tmp_path / "p.safetensors", {"w": torch.zeros(10)}, {}, kind="x")
    assert _file_header(plain)["prunekit.version"] == "1"  # as before
    save_file({"prunekit.payload": torch.zeros(4, dtype=torch.uint8)}, str(tmp_path / "v4.pk"),
              metadata={**header, "prunekit.version": "4"})
    with pytest.raises(FileFormatError, match="version 4; this prunekit reads versions 1, 2, 3"):
        read(tmp_path / "v4.pk")


def smooth_signs(shape, sparsity, dtype=torch.float32, seed=0, flip_rate=0.03):
    """Weights whose sign changes rarely along a row (as in trained first layers over pixels), some zeroed."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(shape, generator=g) < flip_rate, -1.0, 1.0).cumprod(dim=-1)
    t = sign * (torch.rand(shape, generator=g) + 0.1)
    t[torch.rand(shape, generator=g) < sparsity] = 0
    return t.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.6])
def test_predictable_signs_are_coded_as_flips_bit_exactly_and_smaller(dtype, sparsity):
    t = smooth_signs((128, 512), sparsity, dtype)
    header, payload = encode(t)
    assert header["signs"] == "flip"
    assert torch.equal(bits(decode(header, payload)), bits(t))
    # the same values with shuffled signs: the classic layout, about one byte per 8 signs larger
    shuffled = t.abs() * torch.where(torch.rand(t.shape, generator=torch.Generator().manual_seed(1)) < 0.5, -1, 1)
    shuffled[t == 0] = 0  # no negative zeros (they would come back as +0.0)
    plain_header, plain_payload = encode(shuffled.to(dtype))
    assert "signs" not in plain_header
    assert torch.equal(bits(decode(plain_header, plain_payload)), bits(shuffled.to(dtype)))
    kept = int((t != 0).sum())
    assert len(payload) < len(plain_payload) - kept // 8 // 2


def test_flip_coded_signs_decode_with_bitmask_and_index_positions():
    from prunekit.compress import _adjacent

    mask = np.array([1, 1, 0, 1, 0, 0, 1, 1, 1, 0], dtype=bool)
    expected = np.array([False, True, False, False, True, True])  # first kept element has no kept neighbour before it
    assert _adjacent(mask, mask.size, int(mask.sum())).tolist() == expected.tolist()
    assert _adjacent(np.flatnonzero(mask), mask.size, int(mask.sum())).tolist() == expected.tolist()
    assert _adjacent(None, 4, 4).tolist() == [False, True, True, True]
    half = smooth_signs((200, 300), 0.5)  # about half kept: positions as a bitmask
    sparse = smooth_signs((200, 300), 0.95, flip_rate=0.002)  # gaps
    for t, positions in ((half, "bitmask"), (sparse, "gaps")):
        header, payload = encode(t)
        assert (header["positions"], header["signs"]) == (positions, "flip")
        assert torch.equal(bits(decode(header, payload)), bits(t))
    random_signs = sparse_tensor((200, 300), 0.95, torch.float32)  # nothing to predict: classic layout
    header, payload = encode(random_signs)
    assert "signs" not in header and torch.equal(bits(decode(header, payload)), bits(random_signs))
    header, payload = encode(half)
    broken = dict(header, signs="zigzag")
    with pytest.raises(CompressionError, match="unknown sign coding 'zigzag'"):
        decode(broken, payload)


def test_unknown_compress_argument_lists_choices():
    with pytest.raises(ValueError, match="'lossless'"):
        Compression.parse("zip")
    with pytest.raises(ValueError, match="bits"):
        Compression("kmeans", bits=9)
    assert math.isclose(Compression.parse(True).bits, 5)
