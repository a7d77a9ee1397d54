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


# --------------------------------------------------------------------------------------------------------------------
# the compiled float32 decoder against the NumPy one


def _decode_both(header, payload, **kwargs):
    """(NumPy decoder result, compiled decoder result) of prunekit.compress._decode."""
    from prunekit import compress

    saved = list(compress._NATIVE)
    try:
        compress._NATIVE[:] = [None]
        numpy_result = compress._decode(header, payload, **kwargs)
        compress._NATIVE[:] = []
        assert compress._native() is not None, "the native library should build on this machine (g++ is there)"
        native_result = compress._decode(header, payload, **kwargs)
    finally:
        compress._NATIVE[:] = saved
    return numpy_result, native_result


def float32_cases():
    g = torch.Generator().manual_seed(3)
    half = sparse_tensor((300, 300), 0.5, torch.float32)
    negzero = torch.randn(64, 64, generator=g) * (torch.rand(64, 64, generator=g) > 0.7)  # -0.0 where pruned
    return {
        "values": torch.randn(300, 300, generator=g),
        "values-flip": smooth_signs((128, 512), 0.0),
        "bitmask": half,
        "bitmask-flip": smooth_signs((200, 300), 0.5),
        "gaps": sparse_tensor((300, 784), 0.95, torch.float32),
        "gaps-flip": smooth_signs((200, 300), 0.95, flip_rate=0.002),
        "escaped-gaps": sparse_tensor((1, 200_000), 0.999, torch.float32),
        "live-gaps": torch.cat([torch.zeros(300, 400), sparse_tensor((300, 384), 0.8, torch.float32)], dim=1),
        "live-bitmask": torch.cat([torch.zeros(200, 300), sparse_tensor((200, 300), 0.5, torch.float32)], dim=1)
        .index_fill_(0, torch.arange(0, 200, 3), 0.0),  # dead rows and columns
        "empty": torch.zeros(40, 50),
        "one": torch.zeros(1000).index_fill_(0, torch.tensor([999]), -3.5),
        "last-bit": torch.zeros(13).index_fill_(0, torch.tensor([0, 12]), 1.25),
        "special": torch.tensor([0.0, float("nan"), float("inf"), -float("inf"), 1e-45, 0.0, -0.0, 3.0] * 300),
        "negative-zeros": negzero,
    }


@pytest.mark.parametrize("name", list(float32_cases()))
def test_compiled_decoder_equals_numpy_decoder_and_writes_in_place(name):
    t = float32_cases()[name]
    header, payload = encode(t)
    expected = torch.where(t == 0, torch.zeros_like(t), t)  # -0.0 comes back as +0.0
    (a, keep_a), (b, keep_b) = _decode_both(header, payload, want_keep=True)
    assert torch.equal(bits(a), bits(expected)) and torch.equal(bits(b), bits(expected)), name
    if header["layout"] == "sparse":
        assert np.array_equal(keep_a, keep_b) and np.array_equal(keep_a, (t != 0).reshape(-1).numpy())
    else:
        assert keep_a is None and keep_b is None
    for native in (False, True):  # decoding into a destination tensor: the same bits, in the same tensor object
        from prunekit import compress

        saved = list(compress._NATIVE)
        compress._NATIVE[:] = [] if native else [None]
        try:
            dest = torch.full_like(t, 7.0)
            out, _ = compress._decode(header, payload, into=dest)
            assert out is dest and torch.equal(bits(dest), bits(expected))
            wrong = torch.full((t.numel() + 1,), 7.0)  # no fit: a new tensor, the destination untouched
            out, _ = compress._decode(header, payload, into=wrong)
            assert out is not wrong and bool((wrong == 7.0).all())
        finally:
            compress._NATIVE[:] = saved


def test_compiled_decoder_refuses_inconsistent_streams_like_the_numpy_decoder():
    """Corrupted streams (payload bytes changed after the checksum, or a writer bug): every decoder either returns a
    tensor of the right shape or raises CompressionError; the two decoders agree; nothing crashes."""
    rng = np.random.default_rng(0)
    refused = 0
    for name in ("bitmask", "bitmask-flip", "gaps", "gaps-flip", "escaped-gaps", "values-flip", "live-gaps",
                 "live-bitmask"):
        t = float32_cases()[name]
        header, payload = encode(t)
        for trial in range(40):
            data = bytearray(payload)
            for _ in range(1 + trial % 3):
                data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
            outcomes = []
            for result in _decode_or_error(header, bytes(data)):
                outcomes.append(result if isinstance(result, str) else bits(result))
            assert type(outcomes[0]) is type(outcomes[1]), (name, trial, outcomes)
            if isinstance(outcomes[0], str):
                refused += 1
            else:
                assert torch.equal(outcomes[0], outcomes[1]), (name, trial)
        for broken in (dict(header, count=header.get("count", 0) + 1), dict(header, count=header.get("count", 1) - 1)):
            if header["layout"] == "sparse":
                assert all(isinstance(r, str) for r in _decode_or_error(broken, payload)), name
    assert refused > 20  # most corruptions break a stream's consistency


def _decode_or_error(header, payload):
    from prunekit import compress

    saved = list(compress._NATIVE)
    out = []
    try:
        for lib in ([None], []):
            compress._NATIVE[:] = lib
            try:
                out.append(compress._decode(header, payload)[0])
            except CompressionError as exc:
                out.append(str(exc))
    finally:
        compress._NATIVE[:] = saved
    return out
