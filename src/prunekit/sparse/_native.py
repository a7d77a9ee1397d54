"""prunekit's compiled sparse kernel: C++ with OpenMP, compiled with the system compiler at first use.

Besides the sparse Linear kernel it holds the two other hot loops that have a NumPy/torch twin: the per-step
re-zeroing of pruned weights (:class:`prunekit.Pruner`) and the decoder of :mod:`prunekit.compress`'s exact float32
values (``pk_decode_f32``, used by :func:`prunekit.load`).

The source below is compiled once per machine into the prunekit cache (``<cache_dir()>/kernels/``, see
:func:`prunekit.data.fetch.cache_dir`) and loaded with :mod:`ctypes`. It includes no torch headers, so a build takes
about a second and needs neither ninja nor a build-time torch; the compiler is ``$PRUNEKIT_CXX``, ``$CXX`` or the
first of ``g++``/``c++``/``clang++`` on ``PATH``. The build is keyed by the source, the flags and the CPU's
instruction-set flags (it uses ``-march=native``), so a cache shared between different machines holds one build per
CPU kind. Concurrent processes (pytest-xdist workers) build once, under a file lock, and the library appears
atomically.

If nothing can be compiled, :func:`library` returns ``None`` after one :class:`RuntimeWarning` and
:mod:`prunekit.sparse` uses torch's own CSR kernels. ``PRUNEKIT_SPARSE_NATIVE=0`` disables the native kernel.

Threads: the library uses OpenMP. With PyPI's torch (which ships ``libgomp.so.1``) it binds to the libgomp torch
already loaded, so torch's operators and this kernel share one thread pool; the thread count is torch's
(:func:`torch.get_num_threads`).

Encoding (all arrays contiguous): the weight ``W`` (``out_features x in_features``, PyTorch's Linear layout) in CSR
with every row padded to a multiple of 8 entries: ``values`` fp32, ``cols`` the column of each value (uint16 when
``in_features <= 65536``, stored in an int16 tensor; int32 otherwise), ``row_ptr`` int64 (out_features + 1). Padding
entries have value 0 and repeat a column the row already uses (so an inf/nan input gives what dense gives).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prunekit.data.fetch import cache_dir

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "SOURCE",
    "BuildInfo",
    "CsrWeight",
    "NativeLibrary",
    "PositionStreams",
    "TopStreams",
    "build_info",
    "library",
]

SOURCE = r"""
// prunekit sparse kernels (see prunekit/sparse/_native.py): y = x @ W.T + b with W in CSR, fp32.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <algorithm>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define PK_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define PK_AVX2 1
#endif

namespace {

#if PK_AVX512 || PK_AVX2
// x[c[0..7]] as one vector: eight scalar loads. Faster than vgatherdps on CPUs whose gathers are microcoded (the
// Gather Data Sampling mitigation makes a 16-wide gather cost ~30 cycles); about one cycle per non-zero here.
inline __m256 gather8(const uint16_t* c, const float* x) {
  const __m128 lo = _mm_set_ps(x[c[3]], x[c[2]], x[c[1]], x[c[0]]);
  const __m128 hi = _mm_set_ps(x[c[7]], x[c[6]], x[c[5]], x[c[4]]);
  return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
}
inline __m256 gather8(const int32_t* c, const float* x) {
  const __m128 lo = _mm_set_ps(x[c[3]], x[c[2]], x[c[1]], x[c[0]]);
  const __m128 hi = _mm_set_ps(x[c[7]], x[c[6]], x[c[5]], x[c[4]]);
  return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
}
inline float hsum(__m256 s) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}
#endif

// Batch 1: sum_k v[k] * x[c[k]] over one row's n non-zeros (x stays in L1/L2; v and c stream from memory).
// n is a multiple of 8 (rows are padded with zero values), so the loop has no tail: one simple loop measured
// fastest, as short rows (BERT's 3072x768 at 90%: 77 non-zeros) pay for every extra branch.
template <typename I>
inline float row_dot(const float* __restrict v, const I* __restrict c, int64_t n, const float* __restrict x) {
#if PK_AVX512 || PK_AVX2
  __m256 a = _mm256_setzero_ps();
  for (int64_t k = 0; k < n; k += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(v + k), gather8(c + k, x), a);
  return hsum(a);
#else
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    a0 += v[k] * x[c[k]];
    a1 += v[k + 1] * x[c[k + 1]];
    a2 += v[k + 2] * x[c[k + 2]];
    a3 += v[k + 3] * x[c[k + 3]];
  }
  for (; k < n; ++k) a0 += v[k] * x[c[k]];
  return (a0 + a1) + (a2 + a3);
#endif
}

// Batch > 1: acc[t] = sum_k v[k] * xt[c[k] * T + t] for t < T; xt is one tile of T inputs, transposed (in, T);
// T is 8, 16 or 32 (batch up to 8, up to 16, more).
// Every weight is read once per tile and multiplies T inputs.
template <int T, typename I>
inline void row_tile(const float* __restrict v, const I* __restrict c, int64_t n, const float* __restrict xt,
                     float* __restrict acc) {
  int64_t k = 0;
#if PK_AVX512
  if constexpr (T == 32) {  // two zmm per input row; two non-zeros per step
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
    for (; k + 2 <= n; k += 2) {
      const __m512 w0 = _mm512_set1_ps(v[k]), w1 = _mm512_set1_ps(v[k + 1]);
      const float* x0 = xt + (int64_t)c[k] * T;
      const float* x1 = xt + (int64_t)c[k + 1] * T;
      a0 = _mm512_fmadd_ps(w0, _mm512_load_ps(x0), a0);
      a1 = _mm512_fmadd_ps(w0, _mm512_load_ps(x0 + 16), a1);
      b0 = _mm512_fmadd_ps(w1, _mm512_load_ps(x1), b0);
      b1 = _mm512_fmadd_ps(w1, _mm512_load_ps(x1 + 16), b1);
    }
    if (k < n) {
      const __m512 w0 = _mm512_set1_ps(v[k]);
      const float* x0 = xt + (int64_t)c[k] * T;
      a0 = _mm512_fmadd_ps(w0, _mm512_load_ps(x0), a0);
      a1 = _mm512_fmadd_ps(w0, _mm512_load_ps(x0 + 16), a1);
    }
    _mm512_storeu_ps(acc, _mm512_add_ps(a0, b0));
    _mm512_storeu_ps(acc + 16, _mm512_add_ps(a1, b1));
    return;
  }
  if constexpr (T == 16) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (; k + 4 <= n; k += 4) {
      a0 = _mm512_fmadd_ps(_mm512_set1_ps(v[k]), _mm512_load_ps(xt + (int64_t)c[k] * T), a0);
      a1 = _mm512_fmadd_ps(_mm512_set1_ps(v[k + 1]), _mm512_load_ps(xt + (int64_t)c[k + 1] * T), a1);
      a2 = _mm512_fmadd_ps(_mm512_set1_ps(v[k + 2]), _mm512_load_ps(xt + (int64_t)c[k + 2] * T), a2);
      a3 = _mm512_fmadd_ps(_mm512_set1_ps(v[k + 3]), _mm512_load_ps(xt + (int64_t)c[k + 3] * T), a3);
    }
    for (; k < n; ++k) a0 = _mm512_fmadd_ps(_mm512_set1_ps(v[k]), _mm512_load_ps(xt + (int64_t)c[k] * T), a0);
    _mm512_storeu_ps(acc, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    return;
  }
#endif
#if PK_AVX512 || PK_AVX2
  if constexpr (T == 8) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (; k + 4 <= n; k += 4) {
      a0 = _mm256_fmadd_ps(_mm256_set1_ps(v[k]), _mm256_load_ps(xt + (int64_t)c[k] * T), a0);
      a1 = _mm256_fmadd_ps(_mm256_set1_ps(v[k + 1]), _mm256_load_ps(xt + (int64_t)c[k + 1] * T), a1);
      a2 = _mm256_fmadd_ps(_mm256_set1_ps(v[k + 2]), _mm256_load_ps(xt + (int64_t)c[k + 2] * T), a2);
      a3 = _mm256_fmadd_ps(_mm256_set1_ps(v[k + 3]), _mm256_load_ps(xt + (int64_t)c[k + 3] * T), a3);
    }
    for (; k < n; ++k) a0 = _mm256_fmadd_ps(_mm256_set1_ps(v[k]), _mm256_load_ps(xt + (int64_t)c[k] * T), a0);
    _mm256_storeu_ps(acc, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    return;
  }
#endif
  for (int t = 0; t < T; ++t) acc[t] = 0.f;
  for (; k < n; ++k) {
    const float w = v[k];
    const float* xr = xt + (int64_t)c[k] * T;
    for (int t = 0; t < T; ++t) acc[t] += w * xr[t];
  }
}

// First row of part p of `parts` row ranges holding about equal numbers of non-zeros.
inline int64_t split_row(const int64_t* rp, int64_t rows, int64_t p, int64_t parts) {
  if (p <= 0) return 0;
  if (p >= parts) return rows;
  return std::lower_bound(rp, rp + rows + 1, rp[rows] * p / parts) - rp;
}

template <int T, typename I>
int csr_linear_tiled(const float* __restrict x, int64_t N, int64_t in, const float* __restrict v,
                     const I* __restrict c, const int64_t* __restrict rp, int64_t rows, const float* __restrict bias,
                     float* __restrict y, int64_t threads) {
  const int64_t tiles = (N + T - 1) / T;
  float* xt = (float*)aligned_alloc(64, (size_t)(((tiles * in * T * sizeof(float)) + 63) / 64 * 64));
  if (!xt) return 1;
  for (int64_t n = 0; n < tiles * T; ++n) {  // transpose into tiles; zero columns pad the last tile
    float* dst = xt + (n / T) * in * T + (n % T);
    if (n < N) {
      const float* src = x + n * in;
      for (int64_t i = 0; i < in; ++i) dst[i * T] = src[i];
    } else {
      for (int64_t i = 0; i < in; ++i) dst[i * T] = 0.f;
    }
  }
  // A block of rows (about 256 KiB of values and columns) stays in L2 while every input tile passes over it.
  const int64_t entry_bytes = (int64_t)(sizeof(float) + sizeof(I));
  const int64_t bytes_per_row = std::max<int64_t>(1, rp[rows] * entry_bytes / std::max<int64_t>(rows, 1));
  const int64_t kRowBlock = std::max<int64_t>(8, (256 << 10) / bytes_per_row);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    alignas(64) float acc[T];
    const int64_t p = omp_get_thread_num(), np = omp_get_num_threads();
    const int64_t end = split_row(rp, rows, p + 1, np);
    for (int64_t r0 = split_row(rp, rows, p, np); r0 < end; r0 += kRowBlock) {
      const int64_t r1 = std::min(r0 + kRowBlock, end);
      for (int64_t t = 0; t < tiles; ++t) {
        const float* xtt = xt + t * in * T;
        const int64_t width = std::min<int64_t>(T, N - t * T);
        for (int64_t r = r0; r < r1; ++r) {
          row_tile<T, I>(v + rp[r], c + rp[r], rp[r + 1] - rp[r], xtt, acc);
          const float b = bias ? bias[r] : 0.f;
          float* yr = y + t * T * rows + r;
          for (int64_t j = 0; j < width; ++j) yr[j * rows] = acc[j] + b;
        }
      }
    }
  }
  free(xt);
  return 0;
}

template <typename I>
int csr_linear(const float* __restrict x, int64_t N, int64_t in, const float* __restrict v, const I* __restrict c,
               const int64_t* __restrict rp, int64_t rows, const float* __restrict bias, float* __restrict y,
               int64_t threads, int64_t min_work) {
  // one thread per min_work multiply-adds at most: waking a second thread costs more than a small layer
  const int64_t work = (rp[rows] + rows) * N;
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, work / std::max<int64_t>(min_work, 1)));
  if (N == 1) {
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
      const int64_t p = omp_get_thread_num(), np = omp_get_num_threads();
      const int64_t r1 = split_row(rp, rows, p + 1, np);
      for (int64_t r = split_row(rp, rows, p, np); r < r1; ++r)
        y[r] = row_dot<I>(v + rp[r], c + rp[r], rp[r + 1] - rp[r], x) + (bias ? bias[r] : 0.f);
    }
    return 0;
  }
  if (N <= 8) return csr_linear_tiled<8, I>(x, N, in, v, c, rp, rows, bias, y, threads);
  if (N <= 16) return csr_linear_tiled<16, I>(x, N, in, v, c, rp, rows, bias, y, threads);
  return csr_linear_tiled<32, I>(x, N, in, v, c, rp, rows, bias, y, threads);
}

}  // namespace

extern "C" {

// 2: AVX-512, 1: AVX2 + FMA, 0: portable C++
int pk_isa(void) {
#if PK_AVX512
  return 2;
#elif PK_AVX2
  return 1;
#else
  return 0;
#endif
}

// One encoded weight (built once per layer in Python, passed by pointer so a call converts few arguments).
struct pk_csr {
  const float* values;    // (nnz,)
  const void* cols;       // (nnz,) uint16 if col_bytes == 2, int32 if 4
  const int64_t* row_ptr; // (rows + 1,)
  const float* bias;      // (rows,) or NULL
  int64_t rows;           // out_features
  int64_t in;             // in_features
  int64_t col_bytes;
};

// y (N, rows) = x (N, in) @ W.T + bias; returns 0, 1 if memory ran out, 2 on a bad col_bytes.
int pk_csr_linear(const pk_csr* w, const float* x, int64_t N, float* y, int64_t threads, int64_t min_work) {
  if (w->col_bytes == 2)
    return csr_linear<uint16_t>(x, N, w->in, w->values, (const uint16_t*)w->cols, w->row_ptr, w->rows, w->bias, y,
                                threads, min_work);
  if (w->col_bytes == 4)
    return csr_linear<int32_t>(x, N, w->in, w->values, (const int32_t*)w->cols, w->row_ptr, w->rows, w->bias, y,
                               threads, min_work);
  return 2;
}

// w[i] = m[i] ? w[i] : 0 for n elements (prunekit.Pruner re-zeroing pruned weights); m holds 0/1 bytes (bool).
void pk_mask_f32(float* __restrict w, const uint8_t* __restrict m, int64_t n) {
  for (int64_t i = 0; i < n; ++i) w[i] = m[i] ? w[i] : 0.f;
}
void pk_mask_f64(double* __restrict w, const uint8_t* __restrict m, int64_t n) {
  for (int64_t i = 0; i < n; ++i) w[i] = m[i] ? w[i] : 0.0;
}
// pk_mask_f32 over `count` tensors in one call (one ctypes crossing per training step instead of one per tensor).
// With `threads` > 1, each tensor of at least 32768 elements is cut into `threads` contiguous equal chunks, thread p
// taking chunk p: the split torch's own element-wise kernels use (at::parallel_for, grain 32768), so after an
// optimizer step each thread re-zeroes the part of the weights its core just wrote and still holds in its cache.
// (One thread re-zeroing everything read half of the weights from the other core: 2-3x slower inside a training
// step than in isolation.) Smaller tensors are done by thread 0.
void pk_mask_many_f32(float* const* w, const uint8_t* const* m, const int64_t* n, int64_t count, int64_t threads) {
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const int64_t p = omp_get_thread_num(), np = omp_get_num_threads();
    for (int64_t t = 0; t < count; ++t) {
      const int64_t len = n[t];
      if (np == 1 || len < 32768) {
        if (p == 0) pk_mask_f32(w[t], m[t], len);
        continue;
      }
      const int64_t chunk = (len + np - 1) / np, a = p * chunk, b = a + chunk < len ? a + chunk : len;
      if (a < b) pk_mask_f32(w[t] + a, m[t] + a, b - a);
    }
  }
}

// Decoder of prunekit.compress's exact float32 values (see prunekit/compress.py): one pass that undoes the context
// split of the top byte, the sign flips and the byte planes, and scatters the values to their positions in `out`
// (n floats, fully written: zeros elsewhere). The entropy-coded streams were already inflated by zlib/lzma.
//   exponent, mid, low: one byte per kept value; top: the context parts one after the other (`parts` of them, of
//   part_sizes bytes). The split is prunekit.compress._context_groups: one part per exponent value seen at least
//   min_context times (in value order), then one part for all rarer values (a single part when at most one value is
//   frequent and none is rare); the decoder recomputes it and checks the part sizes against it. top holds
//   (mantissa7 << 1) | sign, or with `flip` just mantissa7 and the signs come as packed (MSB-first) flip bits, split
//   by whether the previous kept element is the direct neighbour (`near`) or not (`far`).
//   Positions (struct pk_pos): mode 0 all n kept (count == n); 1 a packed bitmask of n_sub bits (`bits`); 2 gap
//   bytes (`gaps`, count of them; 255 escapes into `wide`, uint32); 3 ascending int64 indices (`idx`). With
//   live_rows/live_cols (modes 1, 2), the bitmask or gaps address the sub-grid of live rows x live columns of a
//   (rows x cols) tensor: sub-index s is element live_rows[s / n_live_cols] * cols + live_cols[s % n_live_cols].
//   keep (optional, n bytes): set to 1 where a value is kept, 0 elsewhere.
// Returns 0, or a negative code if the streams disagree with each other (never reads or writes out of bounds).
// used[0..1]: flip bits read from far/near; used[2]: escapes read (the caller checks them against the stream sizes).
struct pk_top {
  const uint8_t* exponent; const uint8_t* top; const int64_t* part_sizes; int64_t parts; int64_t min_context;
  const uint8_t* mid; const uint8_t* low; int64_t flip; const uint8_t* far; int64_t far_bytes; const uint8_t* near;
  int64_t near_bytes;
};
struct pk_pos {
  int64_t mode; int64_t n_sub; const uint8_t* bits; const uint8_t* gaps; const uint32_t* wide; int64_t wide_len;
  const int64_t* idx; const int64_t* live_rows; const int64_t* live_cols; int64_t n_live_cols; int64_t cols;
};

int pk_decode_f32(const pk_top* s, const pk_pos* q, int64_t n, int64_t count, uint32_t* out, uint8_t* keep,
                  int64_t* used) {
  // the context split (prunekit.compress._context_groups), checked against the parts as stored
  int64_t counts[256] = {0};
  for (int64_t i = 0; i < count; ++i) ++counts[s->exponent[i]];
  int64_t frequent = 0, rare = 0;
  for (int v = 0; v < 256; ++v) {
    if (counts[v] >= s->min_context) ++frequent; else rare += counts[v];
  }
  uint16_t lut[256];
  int64_t sizes[257], parts;
  if (frequent <= 1 && rare == 0) {
    for (int v = 0; v < 256; ++v) lut[v] = 0;
    sizes[0] = count;
    parts = 1;
  } else {
    int64_t g = 0;
    for (int v = 0; v < 256; ++v) {
      if (counts[v] >= s->min_context) { lut[v] = (uint16_t)g; sizes[g++] = counts[v]; }
      else lut[v] = (uint16_t)frequent;
    }
    sizes[frequent] = rare;
    parts = frequent + 1;
  }
  if (parts != s->parts) return -4;
  int64_t cursor[257], end[257], start = 0;
  for (int64_t g = 0; g < parts; ++g) {
    if (s->part_sizes[g] != sizes[g]) return -4;
    cursor[g] = start;
    start += sizes[g];
    end[g] = start;
  }
  const int64_t mode = q->mode, n_sub = q->n_sub;
  const uint8_t* bits = q->bits;
  const bool live = q->live_rows != nullptr;
  if (live && (q->n_live_cols <= 0 || q->cols <= 0)) return -1;
  if (mode != 0) {
    for (int64_t p = 0; p < n; ++p) out[p] = 0u;
    if (keep) for (int64_t p = 0; p < n; ++p) keep[p] = 0;
  }
  int64_t w = 0, prev = -2, sub = -1, pos = -1;
  int64_t flips_read[2] = {0, 0};  // [far, near]
  const uint8_t* flip_streams[2] = {s->far, s->near};
  const int64_t flip_bytes[2] = {s->far_bytes, s->near_bytes};
  int64_t live_r = 0, live_c = -1;  // sub = live_r * n_live_cols + live_c, kept up to date without dividing
  uint32_t sign = 0;
  for (int64_t i = 0; i < count; ++i) {
    // the position of kept value i: first its index `sub` in the coded (sub-)grid, then in the tensor
    if (mode == 0) {
      sub = i;
    } else if (mode == 1) {
      for (++sub;; ++sub) {
        if ((sub & 7) == 0) while (sub + 8 <= n_sub && bits[sub >> 3] == 0) sub += 8;  // skip empty bytes
        if (sub >= n_sub) return -2;
        if ((bits[sub >> 3] >> (7 - (sub & 7))) & 1) break;
      }
    } else if (mode == 2) {
      uint64_t gap = q->gaps[i];
      if (gap == 255) { if (w >= q->wide_len) return -3; gap = q->wide[w++]; }
      sub = sub + (int64_t)gap + 1;
      if (sub >= n_sub) return -2;
    } else {
      sub = q->idx[i];
      if (sub <= prev || sub >= n) return -2;
    }
    if (live) {
      live_c += sub - (live_r * q->n_live_cols + live_c);  // advance by the distance from the previous sub-index
      if (live_c >= q->n_live_cols) { live_r += live_c / q->n_live_cols; live_c %= q->n_live_cols; }
      pos = q->live_rows[live_r] * q->cols + q->live_cols[live_c];
    } else {
      pos = sub;
    }
    if (pos <= prev || pos >= n) return -2;
    const uint32_t e = s->exponent[i];
    const int64_t g = lut[e];
    if (cursor[g] >= end[g]) return -4;
    const uint32_t t = s->top[cursor[g]++];
    uint32_t mant;
    if (s->flip) {  // branch-free choice of the sign stream (neighbour or not is data, not predictable)
      const int a = pos == prev + 1;  // 1: the previous kept element is the direct neighbour
      const int64_t j = flips_read[a];
      if ((j >> 3) >= flip_bytes[a]) return -5;
      sign ^= (flip_streams[a][j >> 3] >> (7 - (j & 7))) & 1u;
      flips_read[a] = j + 1;
      mant = t;
    } else {
      sign = t & 1u;
      mant = t >> 1;
    }
    out[pos] = (sign << 31) | (e << 23) | ((mant & 0x7Fu) << 16) | ((uint32_t)s->mid[i] << 8) | s->low[i];
    if (keep) keep[pos] = 1;
    prev = pos;
  }
  if (mode == 1) {  // no kept position may follow the last value
    for (int64_t p = sub + 1; p < n_sub; ++p) if ((bits[p >> 3] >> (7 - (p & 7))) & 1) return -2;
  }
  for (int64_t g = 0; g < parts; ++g) if (cursor[g] != end[g]) return -4;
  used[0] = flips_read[0]; used[1] = flips_read[1]; used[2] = w;
  return 0;
}

}  // extern "C"
"""

#: Portable flags first tried with ``-march=native`` (the kernel's SIMD paths), then without (portable C++).
_ARCH_FLAGS: tuple[tuple[str, ...], ...] = (("-march=native",), ())
_FLAGS = ("-O3", "-std=c++17", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno")
_LIB = "libprunekit_sparse.so"
ISA_NAMES = {2: "avx512", 1: "avx2", 0: "portable"}


@dataclass(frozen=True)
class BuildInfo:
    """How the native kernel was obtained in this process.

    Attributes:
        available: True if the library is loaded and usable.
        path: The shared library (None if unavailable).
        isa: Instruction set the kernel was compiled for: ``"avx512"``, ``"avx2"`` or ``"portable"``.
        compiled: True if this process compiled it (False: loaded from the cache).
        seconds: Compile time in seconds (0.0 when loaded from the cache).
        compiler: The compiler command used (or that failed).
        error: Why the library is unavailable (None if available).
    """

    available: bool
    path: Path | None = None
    isa: str | None = None
    compiled: bool = False
    seconds: float = 0.0
    compiler: str | None = None
    error: str | None = None


class CsrWeight(ctypes.Structure):
    """``struct pk_csr``: pointers into a layer's buffers (valid while those tensors live)."""

    _fields_ = [
        ("values", ctypes.c_void_p),
        ("cols", ctypes.c_void_p),
        ("row_ptr", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("rows", ctypes.c_int64),
        ("in_features", ctypes.c_int64),
        ("col_bytes", ctypes.c_int64),
    ]


class TopStreams(ctypes.Structure):
    """``struct pk_top``: the inflated value streams of one float32 tensor (valid while those arrays live)."""

    _fields_ = [
        ("exponent", ctypes.c_void_p),
        ("top", ctypes.c_void_p),
        ("part_sizes", ctypes.c_void_p),
        ("parts", ctypes.c_int64),
        ("min_context", ctypes.c_int64),
        ("mid", ctypes.c_void_p),
        ("low", ctypes.c_void_p),
        ("flip", ctypes.c_int64),
        ("far", ctypes.c_void_p),
        ("far_bytes", ctypes.c_int64),
        ("near", ctypes.c_void_p),
        ("near_bytes", ctypes.c_int64),
    ]


class PositionStreams(ctypes.Structure):
    """``struct pk_pos``: how the kept positions of one tensor are coded (valid while those arrays live)."""

    _fields_ = [
        ("mode", ctypes.c_int64),
        ("n_sub", ctypes.c_int64),
        ("bits", ctypes.c_void_p),
        ("gaps", ctypes.c_void_p),
        ("wide", ctypes.c_void_p),
        ("wide_len", ctypes.c_int64),
        ("idx", ctypes.c_void_p),
        ("live_rows", ctypes.c_void_p),
        ("live_cols", ctypes.c_void_p),
        ("n_live_cols", ctypes.c_int64),
        ("cols", ctypes.c_int64),
    ]


class NativeLibrary:
    """The loaded kernel library: a typed wrapper over its C entry point (pointers and sizes, no checks)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._dll = ctypes.CDLL(str(path))
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        fn = self._dll.pk_csr_linear
        fn.argtypes = [ptr, ptr, i64, ptr, i64, i64]
        fn.restype = ctypes.c_int
        #: ``csr_linear(weight_struct_address, x_ptr, N, y_ptr, threads, min_work) -> status``
        self.csr_linear = fn
        for name in ("pk_mask_f32", "pk_mask_f64"):
            getattr(self._dll, name).argtypes = [ptr, ptr, i64]
            getattr(self._dll, name).restype = None
        #: ``mask_f32(weight_ptr, bool_mask_ptr, numel)``: zero the weights whose mask byte is 0, in place
        self.mask_f32 = self._dll.pk_mask_f32
        #: the same for float64 weights
        self.mask_f64 = self._dll.pk_mask_f64
        fn = self._dll.pk_mask_many_f32
        fn.argtypes = [ptr, ptr, ptr, i64, i64]
        fn.restype = None
        #: ``mask_many_f32(weight_ptrs, mask_ptrs, numels, count, threads)``: :attr:`mask_f32` over ``count`` tensors
        #: (arrays of ``void*``, ``void*`` and ``int64``), large tensors split across ``threads`` as torch splits them
        self.mask_many_f32 = fn
        fn = self._dll.pk_decode_f32
        fn.argtypes = [ptr, ptr, i64, i64, ptr, ptr, ptr]
        fn.restype = ctypes.c_int
        #: ``decode_f32(top_struct, pos_struct, n, count, out, keep, used) -> status``: prunekit.compress's exact
        #: float32 values assembled and scattered in one pass (see the C source)
        self.decode_f32 = fn
        self._dll.pk_isa.restype = ctypes.c_int
        self.isa = ISA_NAMES.get(int(self._dll.pk_isa()), "unknown")


_lock = threading.Lock()
_state: tuple[NativeLibrary | None, BuildInfo] | None = None


def _compilers() -> list[str]:
    named = [os.environ.get("PRUNEKIT_CXX"), os.environ.get("CXX")]
    found = [shutil.which(c) for c in ("g++", "c++", "clang++")]
    out: list[str] = []
    for c in [*named, *found]:
        if c and c not in out:
            out.append(c)
    return out


def _cpu_flags() -> str:
    """The CPU's feature flags (the build uses -march=native, so they are part of the cache key)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _build_dir(compiler: str, flags: tuple[str, ...]) -> Path:
    key = hashlib.sha256(
        "\n".join([SOURCE, compiler, " ".join(flags), platform.machine(), _cpu_flags()]).encode()
    ).hexdigest()[:16]
    return cache_dir() / "kernels" / f"sparse-{key}"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+b") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


def _compile(compiler: str, flags: tuple[str, ...], target: Path) -> float:
    """Compile SOURCE into ``target`` (atomically, under a lock). Returns the seconds spent (0.0 if built already)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / ".lock"):
        if target.exists():  # another process built it while we waited
            return 0.0
        src = target.parent / "kernels.cpp"
        src.write_text(SOURCE)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        t0 = time.perf_counter()
        proc = subprocess.run([compiler, *flags, str(src), "-o", str(tmp)], capture_output=True, text=True,
                              timeout=600, check=False)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"{compiler} failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
        os.replace(tmp, target)
        return seconds


def _load() -> tuple[NativeLibrary | None, BuildInfo]:
    if os.environ.get("PRUNEKIT_SPARSE_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, BuildInfo(False, error="disabled by PRUNEKIT_SPARSE_NATIVE=0")
    compilers = _compilers()
    errors: list[str] = []
    for compiler in compilers or [""]:
        if not compiler:
            errors.append("no C++ compiler found (looked for $PRUNEKIT_CXX, $CXX, g++, c++, clang++)")
            break
        for arch in _ARCH_FLAGS:
            flags = (*arch, *_FLAGS)
            target = _build_dir(compiler, flags) / _LIB
            try:
                seconds = 0.0 if target.exists() else _compile(compiler, flags, target)
                lib = NativeLibrary(target)
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                errors.append(f"{compiler} {' '.join(arch)}: {e}")
                continue
            return lib, BuildInfo(True, target, lib.isa, seconds > 0, seconds, compiler)
    error = "; ".join(errors)
    return None, BuildInfo(False, compiler=compilers[0] if compilers else None, error=error)


_warned = False


def library(warn: bool = True) -> NativeLibrary | None:
    """The native kernel library, compiling it at the first call in a process if no cached build exists.

    Args:
        warn: Issue one RuntimeWarning per process if the library is unavailable (the core's weight re-zeroing asks
            quietly: it has an equally correct NumPy path).

    Returns:
        The loaded library, or ``None`` if it cannot be built or loaded.
    """
    global _state, _warned
    state = _state
    if state is None:
        with _lock:
            if _state is None:
                _state = _load()
            state = _state
    if state[0] is None and warn and not _warned and state[1].error != "disabled by PRUNEKIT_SPARSE_NATIVE=0":
        _warned = True
        warnings.warn(
            f"prunekit.sparse: could not build the native sparse kernel ({state[1].error}). Falling back to torch's "
            "CSR kernels, which are slower. Install a C++ compiler with OpenMP (e.g. `apt-get install g++`) or point "
            "$PRUNEKIT_CXX at one; set PRUNEKIT_SPARSE_NATIVE=0 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
    return state[0]


def build_info() -> BuildInfo:
    """How the native kernel was obtained (builds or loads it first if that has not happened yet).

    Examples:
        >>> info = build_info()
        >>> info.available == (info.path is not None)
        True
    """
    library()
    return _state[1] if _state is not None else BuildInfo(False, error="not loaded")


def _reset() -> None:
    """Forget the loaded library (tests use it to exercise the build and fallback paths again)."""
    global _state, _warned
    with _lock:
        _state, _warned = None, False
