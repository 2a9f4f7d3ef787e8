
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && defined(__AVX512VBMI2__)
#include <immintrin.h>
#define OATS_AVX512 1
#endif

static inline float bf16_to_f32(uint16_t h) { uint32_t u = ((uint32_t)h) << 16; float f; std::memcpy(&f, &u, 4); return f; }

// y[r] = sum_j S[r, j] x[j] for R consecutive rows starting at r0; x is zero-padded to words*32 entries.
// vals/vend: the whole values array (offs[out] = nnz marks its end: loads near it are masked).
template <typename V, int R>
static inline void rows_block(const V* vals, const V* vend, const int64_t* offs, const uint32_t* mask, int64_t words,
                              const V* x, float* y, int64_t r0) {
#ifdef OATS_AVX512
  const V* v[R];
  const uint32_t* mw[R];
  for (int i = 0; i < R; ++i) { v[i] = vals + offs[r0 + i]; mw[i] = mask + (r0 + i) * words; }
  if constexpr (sizeof(V) == 4) {
    __m512 acc[R][2];
    for (int i = 0; i < R; ++i) { acc[i][0] = _mm512_setzero_ps(); acc[i][1] = _mm512_setzero_ps(); }
    const float* xf = reinterpret_cast<const float*>(x);
    for (int64_t w = 0; w < words; ++w) {
      __m512 xa = _mm512_loadu_ps(xf + w * 32), xb = _mm512_loadu_ps(xf + w * 32 + 16);
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) {
        uint32_t m = mw[i][w];
        const float* fv = reinterpret_cast<const float*>(v[i]);
        // four 8-lane expands: the 16-lane (zmm) expand is several times slower on Zen 4
        int p0 = __builtin_popcount(m & 0xFF), p1 = __builtin_popcount(m & 0xFFFF), p2 = __builtin_popcount(m & 0xFFFFFF);
        int64_t left = reinterpret_cast<const float*>(vend) - fv;
        __m256 q0, q1, q2, q3;
        if (left >= 40) {
          q0 = _mm256_loadu_ps(fv); q1 = _mm256_loadu_ps(fv + p0); q2 = _mm256_loadu_ps(fv + p1); q3 = _mm256_loadu_ps(fv + p2);
        } else {
          auto lm = [&](int64_t l) { return (__mmask8)(l >= 8 ? 0xFF : (l > 0 ? ((1u << l) - 1) : 0)); };
          q0 = _mm256_maskz_loadu_ps(lm(left), fv); q1 = _mm256_maskz_loadu_ps(lm(left - p0), fv + p0);
          q2 = _mm256_maskz_loadu_ps(lm(left - p1), fv + p1); q3 = _mm256_maskz_loadu_ps(lm(left - p2), fv + p2);
        }
        q0 = _mm256_maskz_expand_ps((__mmask8)(m), q0); q1 = _mm256_maskz_expand_ps((__mmask8)(m >> 8), q1);
        q2 = _mm256_maskz_expand_ps((__mmask8)(m >> 16), q2); q3 = _mm256_maskz_expand_ps((__mmask8)(m >> 24), q3);
        acc[i][0] = _mm512_fmadd_ps(_mm512_insertf32x8(_mm512_castps256_ps512(q0), q1, 1), xa, acc[i][0]);
        acc[i][1] = _mm512_fmadd_ps(_mm512_insertf32x8(_mm512_castps256_ps512(q2), q3, 1), xb, acc[i][1]);
        v[i] += __builtin_popcount(m);
      }
    }
    for (int i = 0; i < R; ++i) y[r0 + i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]));
  } else {
    __m512 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t w = 0; w < words; ++w) {
      __m512i xw = _mm512_loadu_si512(x + w * 32);
#ifndef __AVX512BF16__
      __m512 xlo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(xw)), 16));
      __m512 xhi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(xw, 1)), 16));
#endif
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) {
        uint32_t m = mw[i][w];
        int64_t left = vend - v[i];
        __m512i raw = left >= 32 ? _mm512_loadu_si512(v[i]) : _mm512_maskz_loadu_epi16((__mmask32)((1ull << left) - 1), v[i]);
        __m512i e = _mm512_maskz_expand_epi16((__mmask32)m, raw);
#ifdef __AVX512BF16__
        // pairs (2k, 2k+1) of weights and inputs -> lane k; the lane order does not matter for the sum
        acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)e, (__m512bh)xw);
#else
        __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(e)), 16));
        __m512 w1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(e, 1)), 16));
        acc[i] = _mm512_fmadd_ps(w0, xlo, _mm512_fmadd_ps(w1, xhi, acc[i]));
#endif
        v[i] += __builtin_popcount(m);
      }
    }
    for (int i = 0; i < R; ++i) y[r0 + i] = _mm512_reduce_add_ps(acc[i]);
  }
#else
  for (int i = 0; i < R; ++i) {
    int64_t r = r0 + i;
    const V* v = vals + offs[r];
    const uint32_t* mw = mask + r * words;
    float acc = 0.f;
    for (int64_t w = 0; w < words; ++w) {
      uint32_t m = mw[w];
      while (m) {
        int j = __builtin_ctz(m);
        m &= m - 1;
        if constexpr (sizeof(V) == 4) acc += reinterpret_cast<const float*>(v)[0] * reinterpret_cast<const float*>(x)[w * 32 + j];
        else acc += bf16_to_f32(v[0]) * bf16_to_f32(x[w * 32 + j]);
        ++v;
      }
    }
    y[r] = acc;
  }
#endif
}

template <typename V>
static void run(const V* vals, const int64_t* offs, const uint32_t* mask, int64_t words, const V* x, float* y,
                int64_t out, int64_t batch) {
  const V* vend = vals + offs[out];
  int64_t blocks = (out + 3) / 4;
  int64_t grain = std::max<int64_t>(4, 4096 / std::max<int64_t>(1, words));
  for (int64_t b = 0; b < batch; ++b) {
    const V* xb = x + b * words * 32;
    float* yb = y + b * out;
    at::parallel_for(0, blocks, grain, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        int64_t r0 = k * 4;
        if (r0 + 4 <= out) rows_block<V, 4>(vals, vend, offs, mask, words, xb, yb, r0);
        else for (int64_t r = r0; r < out; ++r) rows_block<V, 1>(vals, vend, offs, mask, words, xb, yb, r);
      }
    });
  }
}

// values [nnz] float32/bfloat16, offsets [out+1] int64, mask [out, words] int32 (bits),
// x [batch, words*32] of the values' dtype (zero-padded past `in`) -> y [batch, out] float32.
torch::Tensor bitmask_matmul(torch::Tensor values, torch::Tensor offsets, torch::Tensor mask, torch::Tensor x, int64_t out) {
  TORCH_CHECK(x.dtype() == values.dtype() && x.is_contiguous() && x.dim() == 2, "x: contiguous [batch, words*32], values' dtype");
  TORCH_CHECK(mask.dtype() == torch::kInt32 && mask.is_contiguous() && mask.dim() == 2, "mask: int32 [out, words]");
  TORCH_CHECK(offsets.dtype() == torch::kInt64 && offsets.numel() == out + 1 && values.is_contiguous(), "offsets int64 [out+1]");
  int64_t batch = x.size(0), words = mask.size(1);
  TORCH_CHECK(x.size(1) == words * 32 && mask.size(0) == out, "x must be padded to words*32 columns");
  auto y = torch::empty({batch, out}, x.options().dtype(torch::kFloat32));
  const uint32_t* mk = reinterpret_cast<const uint32_t*>(mask.data_ptr<int32_t>());
  if (values.dtype() == torch::kFloat32)
    run<float>(values.data_ptr<float>(), offsets.data_ptr<int64_t>(), mk, words, x.data_ptr<float>(), y.data_ptr<float>(), out, batch);
  else if (values.dtype() == torch::kBFloat16)
    run<uint16_t>(reinterpret_cast<const uint16_t*>(values.data_ptr<at::BFloat16>()), offsets.data_ptr<int64_t>(), mk, words,
                  reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), y.data_ptr<float>(), out, batch);
  else TORCH_CHECK(false, "values: float32 or bfloat16");
  return y;
}

// y[b, r] = sum_j W[r, j] x[b, j], W [out, in] dense (float32 or bfloat16), x [batch, in] of W's dtype.
template <typename V>
static void dense_rows(const V* W, const V* x, float* y, int64_t in, int64_t r0, int64_t r1) {
#ifdef OATS_AVX512
  if constexpr (sizeof(V) == 4) {
    const float* Wf = reinterpret_cast<const float*>(W);
    const float* xf = reinterpret_cast<const float*>(x);
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t j = 0; j < in; j += 16) {
        __mmask16 k = in - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (in - j)) - 1);
        __m512 xv = _mm512_maskz_loadu_ps(k, xf + j);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, Wf + r * in + j), xv, a0);
        a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, Wf + (r + 1) * in + j), xv, a1);
        a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, Wf + (r + 2) * in + j), xv, a2);
        a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, Wf + (r + 3) * in + j), xv, a3);
      }
      y[r] = _mm512_reduce_add_ps(a0); y[r + 1] = _mm512_reduce_add_ps(a1);
      y[r + 2] = _mm512_reduce_add_ps(a2); y[r + 3] = _mm512_reduce_add_ps(a3);
    }
    for (; r < r1; ++r) {
      __m512 a0 = _mm512_setzero_ps();
      for (int64_t j = 0; j < in; j += 16) {
        __mmask16 k = in - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (in - j)) - 1);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, Wf + r * in + j), _mm512_maskz_loadu_ps(k, xf + j), a0);
      }
      y[r] = _mm512_reduce_add_ps(a0);
    }
    return;
  } else {
#ifdef __AVX512BF16__
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t j = 0; j < in; j += 32) {
        __mmask32 k = in - j >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1ull << (in - j)) - 1);
        __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(k, x + j);
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(k, W + r * in + j), xv);
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(k, W + (r + 1) * in + j), xv);
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_maskz_loadu_epi16(k, W + (r + 2) * in + j), xv);
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_maskz_loadu_epi16(k, W + (r + 3) * in + j), xv);
      }
      y[r] = _mm512_reduce_add_ps(a0); y[r + 1] = _mm512_reduce_add_ps(a1);
      y[r + 2] = _mm512_reduce_add_ps(a2); y[r + 3] = _mm512_reduce_add_ps(a3);
    }
    for (; r < r1; ++r) {
      __m512 a0 = _mm512_setzero_ps();
      for (int64_t j = 0; j < in; j += 32) {
        __mmask32 k = in - j >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1ull << (in - j)) - 1);
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(k, W + r * in + j), (__m512bh)_mm512_maskz_loadu_epi16(k, x + j));
      }
      y[r] = _mm512_reduce_add_ps(a0);
    }
    return;
#endif
  }
#endif
  for (int64_t r = r0; r < r1; ++r) {
    float acc = 0.f;
    for (int64_t j = 0; j < in; ++j) {
      if constexpr (sizeof(V) == 4) acc += reinterpret_cast<const float*>(W)[r * in + j] * reinterpret_cast<const float*>(x)[j];
      else acc += bf16_to_f32(W[r * in + j]) * bf16_to_f32(x[j]);
    }
    y[r] = acc;
  }
}

torch::Tensor dense_matmul(torch::Tensor W, torch::Tensor x) {
  TORCH_CHECK(W.dim() == 2 && x.dim() == 2 && W.is_contiguous() && x.is_contiguous() && W.dtype() == x.dtype() && x.size(1) == W.size(1),
              "W [out, in] and x [batch, in]: contiguous, same dtype");
  int64_t out = W.size(0), in = W.size(1), batch = x.size(0);
  auto y = torch::empty({batch, out}, x.options().dtype(torch::kFloat32));
  int64_t grain = std::max<int64_t>(4, 8192 / std::max<int64_t>(1, in / 16));
  for (int64_t b = 0; b < batch; ++b) {
    at::parallel_for(0, out, grain, [&](int64_t r0, int64_t r1) {
      if (W.dtype() == torch::kFloat32)
        dense_rows<float>(W.data_ptr<float>(), x.data_ptr<float>() + b * in, y.data_ptr<float>() + b * out, in, r0, r1);
      else if (W.dtype() == torch::kBFloat16)
        dense_rows<uint16_t>(reinterpret_cast<const uint16_t*>(W.data_ptr<at::BFloat16>()),
                             reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) + b * in, y.data_ptr<float>() + b * out, in, r0, r1);
      else TORCH_CHECK(false, "float32 or bfloat16");
    });
  }
  return y;
}

// Dense [out, in] from CSR (values of any 16/32-bit float dtype copied as bits), rows split over threads.
torch::Tensor csr_to_dense(torch::Tensor values, torch::Tensor crow, torch::Tensor col, int64_t out, int64_t in) {
  TORCH_CHECK(crow.dtype() == torch::kInt64 && col.dtype() == torch::kInt32 && values.is_contiguous() && col.is_contiguous(),
              "crow int64, col int32, contiguous");
  auto W = torch::zeros({out, in}, values.options());
  const int64_t* cr = crow.data_ptr<int64_t>();
  const int32_t* cc = col.data_ptr<int32_t>();
  int64_t es = values.element_size();
  at::parallel_for(0, out, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (es == 4) {
        const float* v = reinterpret_cast<const float*>(values.data_ptr()); float* w = reinterpret_cast<float*>(W.data_ptr()) + r * in;
        for (int64_t k = cr[r]; k < cr[r + 1]; ++k) w[cc[k]] = v[k];
      } else {
        const uint16_t* v = reinterpret_cast<const uint16_t*>(values.data_ptr()); uint16_t* w = reinterpret_cast<uint16_t*>(W.data_ptr()) + r * in;
        for (int64_t k = cr[r]; k < cr[r + 1]; ++k) w[cc[k]] = v[k];
      }
    }
  });
  return W;
}

bool simd() {
#ifdef OATS_AVX512
  return true;
#else
  return false;
#endif
}
