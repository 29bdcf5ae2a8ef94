"""Decode attention read straight from the block cache on a CPU: no gathered copy of every row's keys.

A decode step's stock attention gathers each row's blocks into a dense [rows, kv_heads, W * block_size, D]
copy (`KVCache.gather`), padded to the step's context bucket, and hands that to SDPA: every key is read,
written and read again, and the padding is read too. At 16 rows and a 150-token context, bf16 Qwen2.5-0.5B,
the 24 layers' gathers and SDPA calls took 11.5 ms of a ~80 ms step on 2 cores; their real keys and values
are 29 MB (docs/benchmarks.md). This kernel reads each row's own keys and values once, through its block
table, up to its own position (vLLM's CPU build runs a paged attention kernel of its own for the same reason).

Per (row, KV head) task: the G query heads that share the KV head score every key, a softmax per query head
in fp32, then the weighted sum of the values in fp32, written back in the cache's dtype (as SDPA's CPU
kernels accumulate). The C++ source below is compiled once per machine with the system's C++ compiler
(inductor needs the same compiler for the compiled step) into a small shared library that uses torch's own
OpenMP runtime (the loaded `libgomp.so.1`), and called through ctypes; `torch.compile` sees it as an opaque
custom operator. Where no compiler works, `paged_attention` says False and the slice keeps gather + SDPA.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

from .native import build

log = logging.getLogger(__name__)

SOURCE = r"""
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#ifdef __AVX512F__
#include <immintrin.h>
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const uint16_t* p) {  // 16 bf16 -> 16 fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline __m512 exp_nonpositive16(__m512 x) {  // exp_nonpositive below, 16 lanes at once
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 i = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, i);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(i), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}
#endif

static inline float widen(float x) { return x; }
static inline float widen(uint16_t x) {  // bf16 -> fp32: the high half of the fp32 bits
  uint32_t u = (uint32_t)x << 16; float f; std::memcpy(&f, &u, 4); return f;
}
// exp(x) for x <= 0 (a score minus its row's maximum), vectorizable: 2^(x log2 e) as 2^i times Cephes' exp2f
// polynomial on [-0.5, 0.5] (about 2 ulp); below -87 it returns exp(-87), which no softmax sum can tell from 0.
static inline float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x;
  const float t = x * 1.44269504088896341f;
  const float i = std::nearbyint(t), f = t - i;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.f;
  const uint32_t bits = (uint32_t)((int32_t)i + 127) << 23;
  float scale; std::memcpy(&scale, &bits, 4);
  return p * scale;
}
static inline void narrow(float f, float* out) { *out = f; }
static inline void narrow(float f, uint16_t* out) {  // fp32 -> bf16, rounding to nearest even (torch's rule)
  uint32_t u; std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) { *out = 0x7fc0; return; }  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  *out = (uint16_t)(u >> 16);
}

// One (row, KV head) task: the `groups` query heads qr [groups, dim] that share KV head h attend to the row's
// positions 0 .. n - 1, position p at offset p % block_size of block table[p / block_size]; o [groups, dim].
// G and D are the group size and head size when known at compile time (0: read them from groups and dim), so
// the common layouts keep their queries and accumulators in registers.
template <typename T, int G, int D>
static void attend_task(const T* qr, const T* k, const T* v, const int64_t* table, int64_t n, int64_t h,
                        int64_t kv_heads, int64_t block_size, int64_t groups_, int64_t dim_, float scale,
                        float* scores, float* query, float* acc, float* inverse, T* o) {
  const int64_t groups = G ? G : groups_, dim = D ? D : dim_;
  for (int64_t i = 0; i < groups * dim; i++) query[i] = widen(qr[i]) * scale;
  for (int64_t t = 0; t < n; t++) {
    const T* key = k + ((table[t / block_size] * block_size + t % block_size) * kv_heads + h) * dim;
    for (int64_t g0 = 0; g0 < groups; g0 += 8) {  // up to 8 query heads at once, each its own lanes
      const int64_t gn = (G && G <= 8) ? G : (groups - g0 < 8 ? groups - g0 : 8);
#ifdef __AVX512F__
      __m512 part[8];
      for (int64_t g = 0; g < gn; g++) part[g] = _mm512_setzero_ps();
      for (int64_t c = 0; c < dim; c += 16) {
        const __m512 w = load16(key + c);
        for (int64_t g = 0; g < gn; g++)
          part[g] = _mm512_fmadd_ps(_mm512_loadu_ps(query + (g0 + g) * dim + c), w, part[g]);
      }
      for (int64_t g = 0; g < gn; g++) scores[(g0 + g) * n + t] = _mm512_reduce_add_ps(part[g]);
#else
      for (int64_t g = 0; g < gn; g++) {
        const float* qg = query + (g0 + g) * dim;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < dim; d++) s += qg[d] * widen(key[d]);
        scores[(g0 + g) * n + t] = s;
      }
#endif
    }
  }
  for (int64_t g = 0; g < groups; g++) {  // softmax numerators in place; 1 / their sum in `inverse`
    float* sg = scores + g * n;
    float top = -INFINITY, total = 0.f;
#ifdef __AVX512F__
    __m512 tops = _mm512_set1_ps(-INFINITY), totals = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; t += 16) {
      const __mmask16 m = n - t >= 16 ? 0xffff : (__mmask16)((1u << (n - t)) - 1);
      tops = _mm512_max_ps(tops, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), m, sg + t));
    }
    top = _mm512_reduce_max_ps(tops);
    for (int64_t t = 0; t < n; t += 16) {
      const __mmask16 m = n - t >= 16 ? 0xffff : (__mmask16)((1u << (n - t)) - 1);
      const __m512 e = _mm512_maskz_mov_ps(m, exp_nonpositive16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sg + t),
                                                                                _mm512_set1_ps(top))));
      _mm512_mask_storeu_ps(sg + t, m, e);
      totals = _mm512_add_ps(totals, e);
    }
    total = _mm512_reduce_add_ps(totals);
#else
    for (int64_t t = 0; t < n; t++) top = sg[t] > top ? sg[t] : top;
    for (int64_t t = 0; t < n; t++) { sg[t] = exp_nonpositive(sg[t] - top); total += sg[t]; }
#endif
    inverse[g] = 1.f / total;
  }
  for (int64_t i = 0; i < groups * dim; i++) acc[i] = 0.f;
  for (int64_t t = 0; t < n; t++) {
    const T* value = v + ((table[t / block_size] * block_size + t % block_size) * kv_heads + h) * dim;
#ifdef __AVX512F__
    for (int64_t c = 0; c < dim; c += 16) {
      const __m512 w = load16(value + c);
      for (int64_t g = 0; g < groups; g++) {
        float* a = acc + g * dim + c;
        _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(scores[g * n + t]), w, _mm512_loadu_ps(a)));
      }
    }
#else
    for (int64_t g = 0; g < groups; g++) {
      const float p = scores[g * n + t];
      float* ag = acc + g * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; d++) ag[d] += p * widen(value[d]);
    }
#endif
  }
  for (int64_t i = 0; i < groups * dim; i++) narrow(acc[i] * inverse[i / dim], o + i);
}

// q, out [rows, heads, dim]; k, v [blocks, block_size, kv_heads, dim]; tables [rows, width]; lengths [rows].
template <typename T>
static void attend(const T* q, const T* k, const T* v, const int64_t* tables, const int64_t* lengths, T* out,
                   int64_t rows, int64_t heads, int64_t kv_heads, int64_t dim, int64_t block_size, int64_t width,
                   float scale) {
  const int64_t groups = heads / kv_heads;
  int64_t longest = 1;
  for (int64_t r = 0; r < rows; r++) longest = lengths[r] > longest ? lengths[r] : longest;
  auto task = &attend_task<T, 0, 0>;
#define LAYOUT(g, d) if (groups == g && dim == d) task = &attend_task<T, g, d>;
  LAYOUT(1, 64) LAYOUT(2, 64) LAYOUT(4, 64) LAYOUT(6, 64) LAYOUT(7, 64) LAYOUT(8, 64)
  LAYOUT(1, 128) LAYOUT(2, 128) LAYOUT(4, 128) LAYOUT(6, 128) LAYOUT(7, 128) LAYOUT(8, 128)
#undef LAYOUT
  if (dim % 16 != 0) return;  // the caller checks: partial sums run in lanes of 16
#pragma omp parallel
  {
    float* scores = (float*)std::malloc(sizeof(float) * groups * longest);
    float* query = (float*)std::malloc(sizeof(float) * groups * dim);
    float* acc = (float*)std::malloc(sizeof(float) * groups * dim);
    float* inverse = (float*)std::malloc(sizeof(float) * groups);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows * kv_heads; i++) {
      const int64_t r = i / kv_heads, h = i % kv_heads, first = (r * heads + h * groups) * dim;
      task(q + first, k, v, tables + r * width, lengths[r], h, kv_heads, block_size, groups, dim, scale, scores,
           query, acc, inverse, out + first);
    }
    std::free(scores); std::free(query); std::free(acc); std::free(inverse);
  }
}

#define ENTRY(NAME, T)                                                                                          \
  extern "C" void NAME(const void* q, const void* k, const void* v, const int64_t* tables,                      \
                       const int64_t* lengths, void* out, int64_t rows, int64_t heads, int64_t kv_heads,         \
                       int64_t dim, int64_t block_size, int64_t width, float scale) {                          \
    attend((const T*)q, (const T*)k, (const T*)v, tables, lengths, (T*)out, rows, heads, kv_heads, dim,         \
           block_size, width, scale);                                                                           \
  }
ENTRY(paged_attention_f32, float)
ENTRY(paged_attention_bf16, uint16_t)
"""

FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC",
         "-std=c++17")
ENTRIES = {torch.float32: "paged_attention_f32", torch.bfloat16: "paged_attention_bf16"}


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernel (shards/native.py), its entry points typed; None, logged once, where it cannot be
    built or loaded."""
    path = build("paged_attention", SOURCE, FLAGS)
    try:
        library = ctypes.CDLL(str(path)) if path is not None else None
    except OSError as e:
        log.warning("paged decode attention could not be loaded (%s); decode attention gathers keys for SDPA", e)
        return None
    if library is None:
        log.info("paged decode attention not built: decode attention gathers keys for SDPA")
        return None
    for name in ENTRIES.values():
        entry = getattr(library, name)
        entry.restype = None
        entry.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 6 + [ctypes.c_float]
    return library


@torch.library.custom_op("qwen_relay::paged_decode_attention", mutates_args=())
def paged_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, tables: torch.Tensor,
                           lengths: torch.Tensor) -> torch.Tensor:
    """q [R, H, 1, D]; k, v the whole cache [layers, blocks, block_size, kv_heads, D]; tables [R, W] and lengths
    [R], int64: row r's query sees its keys at positions 0 .. lengths[r] - 1 (its own position + 1). Both are
    the same for every layer of a step: built once by the caller. -> [R, H, 1, D]."""
    library = _library()
    assert library is not None, "paged_decode_attention called where the kernel was not built"
    q = q.contiguous()
    k_layer, v_layer = k[layer], v[layer]
    if not (k_layer.is_contiguous() and v_layer.is_contiguous()) or q.shape[-1] % 16:
        raise ValueError("paged_decode_attention needs a contiguous cache and a head size in lanes of 16")
    if not (tables.dtype == lengths.dtype == torch.int64 and tables.is_contiguous() and lengths.is_contiguous()):
        raise ValueError("paged_decode_attention needs contiguous int64 tables and lengths")
    if not (tables.dim() == 2 and tables.shape[0] == lengths.numel() == q.shape[0]):
        raise ValueError("paged_decode_attention needs a block table and a length for every query row")
    out = torch.empty_like(q)
    rows, heads, _, dim = q.shape
    getattr(library, ENTRIES[q.dtype])(
        q.data_ptr(), k_layer.data_ptr(), v_layer.data_ptr(), tables.data_ptr(), lengths.data_ptr(), out.data_ptr(),
        rows, heads, k.shape[-2], dim, k.shape[2], tables.shape[1], dim ** -0.5)
    return out


@paged_decode_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, tables: torch.Tensor,
      lengths: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape)  # contiguous, as the kernel writes it


def paged_attention(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether one-token queries on this device and dtype read the cache through the kernel: a CPU, fp32 or bf16,
    a head size the kernel's lanes divide, and the kernel built."""
    return device.type == "cpu" and dtype in ENTRIES and head_dim % 16 == 0 and _library() is not None
