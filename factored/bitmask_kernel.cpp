
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
// The SIMD paths compiled follow the compiler's target (-march=native): AVX2 + FMA when the CPU has it
// (the bitmask product and the dense product), and for the bitmask product on a CPU with AVX-512 (F, BW,
// VL, DQ, VBMI2) the AVX-512 expand path instead. OATS_NO_AVX512 keeps the AVX2 path there;
// OATS_FORCE_PORTABLE compiles the portable C loops only.
#if !defined(OATS_FORCE_PORTABLE) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define OATS_AVX2 1
#if !defined(OATS_NO_AVX512) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && defined(__AVX512VBMI2__)
#define OATS_AVX512 1
#endif
#endif

static inline float bf16_to_f32(uint16_t h) { uint32_t u = ((uint32_t)h) << 16; float f; std::memcpy(&f, &u, 4); return f; }

template <typename V>
static inline float to_f32(V v) {
  if constexpr (sizeof(V) == 4) { float f; std::memcpy(&f, &v, 4); return f; }
  else return bf16_to_f32(v);
}

#ifdef OATS_AVX2
// Per mask byte: the pshufb control that moves the next popcount(byte) packed 16-bit values into the
// lanes of the set bits (0x80 zeroes a lane), and the vpermps indices + lane mask doing the same for 32-bit values.
struct Tables {
  alignas(16) uint8_t shuf16[256][16];
  alignas(32) int32_t perm32[256][8];
  alignas(32) int32_t keep32[256][8];
  Tables() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int j = 0; j < 8; ++j) {
        bool on = (m >> j) & 1;
        shuf16[m][2 * j] = on ? (uint8_t)(2 * k) : 0x80;
        shuf16[m][2 * j + 1] = on ? (uint8_t)(2 * k + 1) : 0x80;
        perm32[m][j] = on ? k : 0;
        keep32[m][j] = on ? -1 : 0;
        k += on;
      }
    }
  }
};
static const Tables T_;

// 2:4 rows (exactly 2 set bits in every mask nibble): per mask byte, the in-nibble positions (0-3) of the
// low nibble's two set bits, then the high nibble's, as vpermilps indices, in both 128-bit halves (so two
// bytes make one index vector by a blend, not a lane-crossing insert). A zero nibble, past a row's end,
// selects position 0 of a zero input.
struct NibTables {
  alignas(32) int32_t sel[256][8];
  NibTables() {
    for (int m = 0; m < 256; ++m)
      for (int h = 0; h < 2; ++h) {
        int k = 0;
        sel[m][2 * h] = sel[m][2 * h + 1] = 0;
        for (int j = 0; j < 4 && k < 2; ++j)
          if ((m >> (4 * h + j)) & 1) sel[m][2 * h + k++] = j;
        sel[m][4 + 2 * h] = sel[m][2 * h];
        sel[m][5 + 2 * h] = sel[m][2 * h + 1];
      }
  }
};
static const NibTables N_;

// bf16 in 16-bit lanes -> two f32 vectors: the even lanes (<< 16) and the odd lanes (& 0xFFFF0000).
// The input is stored split the same way (prep_x), so no lane crossing is needed.
static inline __m256 even_f32(__m256i e) { return _mm256_castsi256_ps(_mm256_slli_epi32(e, 16)); }
static inline __m256 odd_f32(__m256i e) { return _mm256_castsi256_ps(_mm256_and_si256(e, _mm256_set1_epi32((int)0xFFFF0000u))); }

// The sum of a register's 8 floats.
static inline float hsum8(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#endif

// x [batch, in] -> f32 [batch, groups*16], groups = ceil(in/16), zero-padded. For bfloat16 under AVX2 the
// 16 columns of a group are stored as the even-lane then odd-lane order of one 256-bit register of 16 bf16
// values: [0,2,4,6,8,10,12,14, 1,3,5,7,9,11,13,15]. Otherwise in column order.
template <typename V>
static std::vector<float> prep_x(const V* x, int64_t batch, int64_t in, int64_t ld) {
  int64_t groups = (in + 15) / 16;
  std::vector<float> xp(batch * groups * 16 + 16, 0.f);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t j = 0; j < in; ++j) {
      float v = to_f32<V>(x[b * ld + j]);
      int64_t g = j / 16, c = j % 16, pos = c;
#ifdef OATS_AVX2
      if constexpr (sizeof(V) == 2) pos = (c % 2) * 8 + (c % 8) / 2 + (c / 8) * 4;
#endif
      xp[b * groups * 16 + g * 16 + pos] = v;
    }
  return xp;
}

// The input as rows_select reads it: f32 [batch, stride] (stride a multiple of 32, zero-padded), each
// block of 2h nibbles (4 columns each; h = 2 for float32, 4 for bfloat16) stored n0, nh, n1, nh+1, ...
template <typename V>
static std::vector<float> prep_x_select(const V* x, int64_t batch, int64_t in, int64_t stride) {
  std::vector<float> xq(batch * stride + 32, 0.f);
  int64_t h = sizeof(V) == 4 ? 2 : 4;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t j = 0; j < in; ++j) {
      int64_t blk = j / (8 * h), n = (j / 4) % (2 * h), pos = n < h ? 2 * n : 2 * (n - h) + 1;
      xq[b * stride + blk * 8 * h + pos * 4 + j % 4] = to_f32<V>(x[b * in + j]);
    }
  return xq;
}

#ifdef OATS_AVX2
// y[b, r0+i] (i < R, b < B) of the bitmask rows; v[i] each point at its row's packed values and may be
// read 8 elements past the row's end. mask rows are `words` 32-bit words.
template <typename V, int R, int B>
static inline void rows_avx2(const V* const* v0, const uint8_t* const* mk, int64_t words, const float* xp, int64_t xstride,
                             float* acc_out, const char* pf, int64_t pf_lines) {
  __m256 acc[R][B];
  for (int i = 0; i < R; ++i) for (int b = 0; b < B; ++b) acc[i][b] = _mm256_setzero_ps();
  const V* v[R];
  for (int i = 0; i < R; ++i) v[i] = v0[i];
  int64_t groups = words * 2;
  for (int64_t g = 0; g < groups; ++g) {
    const float* xg = xp + g * 16;
    // the next block's values, two lines per group: the value loads here wait on the mask's popcounts,
    // which leaves the out-of-order window too few independent loads to keep memory busy
    if (2 * g < pf_lines) _mm_prefetch(pf + 128 * g, _MM_HINT_T0);
    if (2 * g + 1 < pf_lines) _mm_prefetch(pf + 128 * g + 64, _MM_HINT_T0);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      uint16_t m;
      std::memcpy(&m, mk[i] + 2 * g, 2);
      uint32_t m0 = m & 0xFF, m1 = m >> 8;
      int p0 = __builtin_popcount(m0), p01 = __builtin_popcount(m);
      if constexpr (sizeof(V) == 2) {
        __m256i raw = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)v[i])),
                                              _mm_loadu_si128((const __m128i*)(v[i] + p0)), 1);
        __m256i ctl = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_load_si128((const __m128i*)T_.shuf16[m0])),
                                              _mm_load_si128((const __m128i*)T_.shuf16[m1]), 1);
        __m256i e = _mm256_shuffle_epi8(raw, ctl);
        __m256 we = even_f32(e), wo = odd_f32(e);
#pragma GCC unroll 8
        for (int b = 0; b < B; ++b) {
          const float* xb = xg + b * xstride;
          acc[i][b] = _mm256_fmadd_ps(we, _mm256_loadu_ps(xb), acc[i][b]);
          acc[i][b] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xb + 8), acc[i][b]);
        }
      } else {
        const float* fv = reinterpret_cast<const float*>(v[i]);
        __m256 w0 = _mm256_and_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(fv), _mm256_load_si256((const __m256i*)T_.perm32[m0])),
                                  _mm256_castsi256_ps(_mm256_load_si256((const __m256i*)T_.keep32[m0])));
        __m256 w1 = _mm256_and_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(fv + p0), _mm256_load_si256((const __m256i*)T_.perm32[m1])),
                                  _mm256_castsi256_ps(_mm256_load_si256((const __m256i*)T_.keep32[m1])));
#pragma GCC unroll 8
        for (int b = 0; b < B; ++b) {
          const float* xb = xg + b * xstride;
          acc[i][b] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb), acc[i][b]);
          acc[i][b] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), acc[i][b]);
        }
      }
      v[i] += p01;
    }
  }
  for (int i = 0; i < R; ++i)
    for (int b = 0; b < B; ++b) acc_out[i * B + b] = hsum8(acc[i][b]);
}
#endif

#ifdef OATS_AVX2
// 2:4 rows, inputs selected instead of values expanded: the packed values are read as they are (2 per
// nibble) and each multiplied by the input of its set bit, picked by vpermilps (in-lane, so no lane-crossing
// shuffle) from an input stored with its 4-column nibbles interleaved (prep_x_select): per 16 columns for
// float32, the values' two 128-bit halves are nibbles (0, 1) and (2, 3), matched by the blend of
// vpermilps([n0 | n2]) and vpermilps([n1 | n3]) under one index vector built from the two mask bytes;
// for bfloat16 per 32 columns, the values widened by unpacking with zeros (in-lane) are nibbles
// (0, 1 | 4, 5) and (2, 3 | 6, 7), matched the same way from [n0 | n4], [n1 | n5], [n2 | n6], [n3 | n7].
template <typename V, int R, int B>
static inline void rows_select(const V* const* v0, const uint8_t* const* mk, int64_t in, const float* xq, int64_t xstride,
                               float* acc_out) {
  __m256 acc[R][B];
  for (int i = 0; i < R; ++i) for (int b = 0; b < B; ++b) acc[i][b] = _mm256_setzero_ps();
  auto idx = [](const uint8_t* m, int lo, int hi) {
    return _mm256_blend_epi32(_mm256_load_si256((const __m256i*)N_.sel[m[lo]]), _mm256_load_si256((const __m256i*)N_.sel[m[hi]]), 0xF0);
  };
  if constexpr (sizeof(V) == 4) {
    int64_t groups = (in + 15) / 16;
    for (int64_t g = 0; g < groups; ++g) {
      const float* xg = xq + g * 16;
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        __m256i I = idx(mk[i] + 2 * g, 0, 1);
        __m256 w = _mm256_loadu_ps(reinterpret_cast<const float*>(v0[i]) + 8 * g);
#pragma GCC unroll 8
        for (int b = 0; b < B; ++b) {
          const float* xb = xg + b * xstride;
          __m256 xs = _mm256_blend_ps(_mm256_permutevar_ps(_mm256_loadu_ps(xb), I), _mm256_permutevar_ps(_mm256_loadu_ps(xb + 8), I), 0xCC);
          acc[i][b] = _mm256_fmadd_ps(w, xs, acc[i][b]);
        }
      }
    }
  } else {
    int64_t groups = (in + 31) / 32;
    const __m256i zero = _mm256_setzero_si256();
    for (int64_t g = 0; g < groups; ++g) {
      const float* xg = xq + g * 32;
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        const uint8_t* m = mk[i] + 4 * g;
        __m256i IL = idx(m, 0, 2), IH = idx(m, 1, 3);
        __m256i raw = _mm256_loadu_si256((const __m256i*)(v0[i] + 16 * g));
        __m256 wl = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw)), wh = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw));
#pragma GCC unroll 8
        for (int b = 0; b < B; ++b) {
          const float* xb = xg + b * xstride;
          __m256 xl = _mm256_blend_ps(_mm256_permutevar_ps(_mm256_loadu_ps(xb), IL),
                                      _mm256_permutevar_ps(_mm256_loadu_ps(xb + 8), IL), 0xCC);
          __m256 xh = _mm256_blend_ps(_mm256_permutevar_ps(_mm256_loadu_ps(xb + 16), IH),
                                      _mm256_permutevar_ps(_mm256_loadu_ps(xb + 24), IH), 0xCC);
          acc[i][b] = _mm256_fmadd_ps(wl, xl, acc[i][b]);
          acc[i][b] = _mm256_fmadd_ps(wh, xh, acc[i][b]);
        }
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int b = 0; b < B; ++b) acc_out[i * B + b] = hsum8(acc[i][b]);
}
#endif

#ifdef OATS_AVX512
// The AVX-512 VBMI2 expand path (one input row per call); compiled only where the CPU has VBMI2.
template <typename V, int R>
static inline void rows_avx512(const V* const* v0, const uint32_t* const* mw, const V* vend, int64_t words, const V* x, float* out) {
  const V* v[R];
  for (int i = 0; i < R; ++i) v[i] = v0[i];
  if constexpr (sizeof(V) == 4) {
    __m512 acc[R][2];
    for (int i = 0; i < R; ++i) { acc[i][0] = _mm512_setzero_ps(); acc[i][1] = _mm512_setzero_ps(); }
    const float* xf = reinterpret_cast<const float*>(x);
    for (int64_t w = 0; w < words; ++w) {
      __m512 xa = _mm512_loadu_ps(xf + w * 32), xb = _mm512_loadu_ps(xf + w * 32 + 16);
      for (int i = 0; i < R; ++i) {
        uint32_t m = mw[i][w];
        const float* fv = reinterpret_cast<const float*>(v[i]);
        int p0 = __builtin_popcount(m & 0xFF), p1 = __builtin_popcount(m & 0xFFFF), p2 = __builtin_popcount(m & 0xFFFFFF);
        __m256 q0 = _mm256_loadu_ps(fv), q1 = _mm256_loadu_ps(fv + p0), q2 = _mm256_loadu_ps(fv + p1), q3 = _mm256_loadu_ps(fv + p2);
        q0 = _mm256_maskz_expand_ps((__mmask8)(m), q0); q1 = _mm256_maskz_expand_ps((__mmask8)(m >> 8), q1);
        q2 = _mm256_maskz_expand_ps((__mmask8)(m >> 16), q2); q3 = _mm256_maskz_expand_ps((__mmask8)(m >> 24), q3);
        acc[i][0] = _mm512_fmadd_ps(_mm512_insertf32x8(_mm512_castps256_ps512(q0), q1, 1), xa, acc[i][0]);
        acc[i][1] = _mm512_fmadd_ps(_mm512_insertf32x8(_mm512_castps256_ps512(q2), q3, 1), xb, acc[i][1]);
        v[i] += __builtin_popcount(m);
      }
    }
    for (int i = 0; i < R; ++i) out[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]));
  } else {
    __m512 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t w = 0; w < words; ++w) {
      __m512i xw = _mm512_loadu_si512(x + w * 32);
      __m512 xlo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(xw)), 16));
      __m512 xhi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(xw, 1)), 16));
      for (int i = 0; i < R; ++i) {
        uint32_t m = mw[i][w];
        __m512i e = _mm512_maskz_expand_epi16((__mmask32)m, _mm512_loadu_si512(v[i]));
        __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(e)), 16));
        __m512 w1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(e, 1)), 16));
        acc[i] = _mm512_fmadd_ps(w0, xlo, _mm512_fmadd_ps(w1, xhi, acc[i]));
        v[i] += __builtin_popcount(m);
      }
    }
    for (int i = 0; i < R; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
  }
}
#endif

// Portable: a loop over the set bits of each mask word.
template <typename V>
static inline float row_portable(const V* v, const uint32_t* mw, int64_t words, const float* x) {
  float acc = 0.f;
  for (int64_t w = 0; w < words; ++w) {
    uint32_t m = mw[w];
    while (m) {
      int j = __builtin_ctz(m);
      m &= m - 1;
      acc += to_f32<V>(*v++) * x[w * 32 + j];
    }
  }
  return acc;
}

// sum_k u[k] t[k]: one row of (x V^T) U^T, added to the row's sparse product in the same pass.
template <typename V>
static inline float lowrank_row(const V* u, const float* t, int64_t rank) {
  float s = 0.f;
  int64_t k = 0;
#ifdef OATS_AVX2
  __m256 a = _mm256_setzero_ps();
  for (; k + 8 <= rank; k += 8) {
    __m256 uf;
    if constexpr (sizeof(V) == 2)
      uf = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(u + k))), 16));
    else uf = _mm256_loadu_ps(reinterpret_cast<const float*>(u + k));
    a = _mm256_fmadd_ps(uf, _mm256_loadu_ps(t + k), a);
  }
  s = hsum8(a);
#endif
  for (; k < rank; ++k) s += to_f32<V>(u[k]) * t[k];
  return s;
}

constexpr int64_t OVERREAD = 32;  // elements a SIMD path may read past a row's last value

// The rows the caller flags as 2:4 (`regular`: 2 set bits in every mask nibble) are read by rows_select
// when a pass has at most SELECT_MAX_BATCH input rows and every row of its block is flagged; the other
// rows, and every row past that batch, by rows_avx2 (which reads any mask). At more input rows the
// selection, done per input row, costs more than the expansion, done once per weight row. The AVX-512 and
// portable builds read every mask the one way they have.
constexpr int SELECT_MAX_BATCH = 4;

// The R-row block starting at r0: y[b, r] = sum_j S[r, j] x[b, j] (+ sum_k U[r, k] t[b, k]).
template <typename V, int R, int B>
static void block(const V* vals, int64_t nnz, const int64_t* offs, const uint8_t* mask, int64_t words, int64_t in,
                  const uint8_t* regular, const float* xp, const float* xn, const V* xraw, int64_t batch, float* y, int64_t out,
                  int64_t r0, const V* U, const float* t, int64_t rank) {
  const V* v[R];
  std::vector<V> pad[R];
  for (int i = 0; i < R; ++i) {
    int64_t a = offs[r0 + i], e = offs[r0 + i + 1];
    if (e + OVERREAD <= nnz) v[i] = vals + a;
    else {  // near the end of the values: a zero-padded copy so the SIMD loads stay in bounds
      pad[i].assign(e - a + OVERREAD, V(0));
      if (e > a) std::memcpy(pad[i].data(), vals + a, (e - a) * sizeof(V));
      v[i] = pad[i].data();
    }
  }
  int64_t xstride = words * 32;
  float res[R * B];
#if defined(OATS_AVX512)
  (void)xp; (void)in; (void)regular; (void)xn;
  const uint32_t* mw[R];
  for (int i = 0; i < R; ++i) mw[i] = reinterpret_cast<const uint32_t*>(mask + (r0 + i) * words * 4);
  for (int b = 0; b < B; ++b) {
    float o[R];
    rows_avx512<V, R>(v, mw, vals + nnz, words, xraw + b * xstride, o);
    for (int i = 0; i < R; ++i) res[i * B + b] = o[i];
  }
#elif defined(OATS_AVX2)
  (void)xraw;
  const uint8_t* mk[R];
  for (int i = 0; i < R; ++i) mk[i] = mask + (r0 + i) * words * 4;
  int64_t n0 = offs[std::min(r0 + R, out)], n1 = offs[std::min(r0 + 2 * R, out)];
  const char* pf = reinterpret_cast<const char*>(vals + n0);
  int64_t pf_lines = ((n1 - n0) * (int64_t)sizeof(V) + 63) / 64;
  bool select = B <= SELECT_MAX_BATCH && regular;
  for (int i = 0; i < R && select; ++i) select = regular[r0 + i];
  if (select) rows_select<V, R, B>(v, mk, in, xn, xstride, res);
  else rows_avx2<V, R, B>(v, mk, words, xp, xstride, res, pf, pf_lines);
#else
  (void)xraw; (void)in; (void)regular; (void)xn;
  for (int i = 0; i < R; ++i)
    for (int b = 0; b < B; ++b)
      res[i * B + b] = row_portable<V>(v[i], reinterpret_cast<const uint32_t*>(mask + (r0 + i) * words * 4), words, xp + b * xstride);
#endif
  for (int i = 0; i < R; ++i)
    for (int b = 0; b < B; ++b) y[b * out + r0 + i] = res[i * B + b] + (rank ? lowrank_row<V>(U + (r0 + i) * rank, t + b * rank, rank) : 0.f);
}

template <typename V, int B, int R>
static void run_rows(const V* vals, int64_t nnz, const int64_t* offs, const uint8_t* mask, int64_t words, int64_t in,
                     const uint8_t* regular, const float* xp, const float* xn, const V* xraw, float* y, int64_t out, int64_t b0,
                     const V* U, const float* t, int64_t rank) {
  int64_t xstride = words * 32;
  const float* xb = xp + b0 * xstride;
  const float* xnb = xn ? xn + b0 * xstride : nullptr;
  const V* xr = xraw ? xraw + b0 * xstride : nullptr;
  float* yb = y + b0 * out;
  const float* tb = t + b0 * rank;
  int64_t blocks = (out + R - 1) / R;
  int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, words * R));
  at::parallel_for(0, blocks, grain, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      int64_t r0 = k * R;
      if (r0 + R <= out) block<V, R, B>(vals, nnz, offs, mask, words, in, regular, xb, xnb, xr, B, yb, out, r0, U, tb, rank);
      else
        for (int64_t r = r0; r < out; ++r) block<V, 1, B>(vals, nnz, offs, mask, words, in, regular, xb, xnb, xr, B, yb, out, r, U, tb, rank);
    }
  });
}

// Rows per pass (R * B accumulators): rows_avx2 keeps 4 rows in flight at batch 1; rows_select, which
// holds 4 input vectors and 2 index vectors per row as well, measured faster with 2.
template <typename V, int B>
static void run_b(const V* vals, int64_t nnz, const int64_t* offs, const uint8_t* mask, int64_t words, int64_t in,
                  const uint8_t* regular, const float* xp, const float* xn, const V* xraw, float* y, int64_t out, int64_t b0,
                  const V* U, const float* t, int64_t rank) {
  constexpr int R = B == 1 ? 4 : (B == 2 ? 2 : 1);
  constexpr int RS = B <= 2 ? 2 : 1;
  if (B <= SELECT_MAX_BATCH && regular)
    run_rows<V, B, RS>(vals, nnz, offs, mask, words, in, regular, xp, xn, xraw, y, out, b0, U, t, rank);
  else run_rows<V, B, R>(vals, nnz, offs, mask, words, in, regular, xp, xn, xraw, y, out, b0, U, t, rank);
}

template <typename V>
static void run(const V* vals, int64_t nnz, const int64_t* offs, const uint8_t* mask, int64_t words,
                const uint8_t* regular, const V* x, int64_t in, float* y, int64_t out, int64_t batch, const V* U, const float* t,
                int64_t rank) {
  std::vector<float> xp = prep_x<V>(x, batch, in, in);
  std::vector<V> xraw;
#ifdef OATS_AVX512
  xraw.assign(batch * words * 32, V(0));
  for (int64_t b = 0; b < batch; ++b) std::memcpy(xraw.data() + b * words * 32, x + b * in, in * sizeof(V));
#endif
  const V* xr = xraw.empty() ? nullptr : xraw.data();
  // the padded x is words*32 wide; prep_x wrote ceil(in/16)*16 per row: re-stride it
  int64_t groups = (in + 15) / 16, stride = words * 32;
  std::vector<float> xs(batch * stride + 16, 0.f);
  for (int64_t b = 0; b < batch; ++b) std::memcpy(xs.data() + b * stride, xp.data() + b * groups * 16, groups * 16 * sizeof(float));
  std::vector<float> xn;  // nibbles interleaved, for rows_select
#if defined(OATS_AVX2) && !defined(OATS_AVX512)
  if (regular) xn = prep_x_select<V>(x, batch, in, stride);
#endif
  const float* xnp = xn.empty() ? xs.data() : xn.data();
  for (int64_t b0 = 0; b0 < batch; b0 += 8) {
    switch (std::min<int64_t>(8, batch - b0)) {
      case 1: run_b<V, 1>(vals, nnz, offs, mask, words, in, regular, xs.data(), xnp, xr, y, out, b0, U, t, rank); break;
      case 2: run_b<V, 2>(vals, nnz, offs, mask, words, in, regular, xs.data(), xnp, xr, y, out, b0, U, t, rank); break;
      case 3: run_b<V, 3>(vals, nnz, offs, mask, words, in, regular, xs.data(), xnp, xr, y, out, b0, U, t, rank); break;
      case 4: run_b<V, 4>(vals, nnz, offs, mask, words, in, regular, xs.data(), xnp, xr, y, out, b0, U, t, rank); break;
      case 5: run_b<V, 5>(vals, nnz, offs, mask, words, in, regular, xs.data(), xnp, xr, y, out, b0, U, t, rank); break;
      case 6: run_b<V, 6>(vals, nnz, offs, mask, words, in, regular, xs.data(), xnp, xr, y, out, b0, U, t, rank); break;
      case 7: run_b<V, 7>(vals, nnz, offs, mask, words, in, regular, xs.data(), xnp, xr, y, out, b0, U, t, rank); break;
      default: run_b<V, 8>(vals, nnz, offs, mask, words, in, regular, xs.data(), xnp, xr, y, out, b0, U, t, rank); break;
    }
  }
}

// values [nnz] float32/bfloat16 (row-major nonzeros), offsets [out+1] int64 (row starts), mask uint8
// [out, 4*words] (bit j of byte c = column 8c+j, rows padded to 32-bit words with zero bits), x [batch, in]
// and U [out, rank] of the values' dtype, t = x V^T [batch, rank] float32 (rank may be 0)
// and regular (uint8 [out], or empty: none) flagging the rows that hold 2 set bits in every mask nibble
// (in % 4 == 0; a wrongly flagged row gives a wrong result) -> y [batch, out] float32 = x S^T + t U^T.
torch::Tensor bitmask_matmul(torch::Tensor values, torch::Tensor offsets, torch::Tensor mask, torch::Tensor x,
                             torch::Tensor U, torch::Tensor t, torch::Tensor regular) {
  TORCH_CHECK(x.dtype() == values.dtype() && x.is_contiguous() && x.dim() == 2, "x: contiguous [batch, in], values' dtype");
  TORCH_CHECK(mask.dtype() == torch::kUInt8 && mask.is_contiguous() && mask.dim() == 2 && mask.size(1) % 4 == 0,
              "mask: uint8 [out, 4*words]");
  int64_t out = mask.size(0), words = mask.size(1) / 4, batch = x.size(0), in = x.size(1);
  TORCH_CHECK(in <= words * 32 && in > (words - 1) * 32, "x's columns do not match the mask");
  TORCH_CHECK(regular.numel() == 0 ||
                  (regular.dtype() == torch::kUInt8 && regular.is_contiguous() && regular.numel() == out && in % 4 == 0),
              "regular: uint8 [out] (in % 4 == 0) or empty");
  const uint8_t* reg = regular.numel() ? regular.data_ptr<uint8_t>() : nullptr;
  TORCH_CHECK(offsets.dtype() == torch::kInt64 && offsets.numel() == out + 1 && values.is_contiguous(), "offsets int64 [out+1]");
  TORCH_CHECK(U.dtype() == values.dtype() && t.dtype() == torch::kFloat32 && U.is_contiguous() && t.is_contiguous() &&
              U.dim() == 2 && t.dim() == 2 && U.size(0) == out && t.size(0) == batch && U.size(1) == t.size(1),
              "U [out, r] of the values' dtype, t float32 [batch, r]");
  auto y = torch::empty({batch, out}, x.options().dtype(torch::kFloat32));
  int64_t nnz = values.numel(), rank = U.size(1);
  const uint8_t* mk = mask.data_ptr<uint8_t>();
  if (values.dtype() == torch::kFloat32)
    run<float>(values.data_ptr<float>(), nnz, offsets.data_ptr<int64_t>(), mk, words, reg, x.data_ptr<float>(), in, y.data_ptr<float>(),
               out, batch, U.data_ptr<float>(), t.data_ptr<float>(), rank);
  else if (values.dtype() == torch::kBFloat16)
    run<uint16_t>(reinterpret_cast<const uint16_t*>(values.data_ptr<at::BFloat16>()), nnz, offsets.data_ptr<int64_t>(), mk, words, reg,
                  reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), in, y.data_ptr<float>(), out, batch,
                  reinterpret_cast<const uint16_t*>(U.data_ptr<at::BFloat16>()), t.data_ptr<float>(), rank);
  else TORCH_CHECK(false, "values: float32 or bfloat16");
  return y;
}

// ------------------------------------------------------------------------------------------- dense

// y[b, r] = sum_j W[r, j] x[b, j] for rows r0..r1, W [out, in] dense; xp as prep_x writes it (groups*16 per row).
template <typename V>
static void dense_rows(const V* W, const float* xp, int64_t batch, float* y, int64_t out, int64_t in, int64_t r0, int64_t r1) {
  int64_t groups = (in + 15) / 16, xs = groups * 16;
#if defined(OATS_AVX2)
  int64_t full = in / 16;  // whole groups read as vectors; the tail by scalar code
  int64_t r = r0;
  for (; r < r1; r += 4) {
    int nr = (int)std::min<int64_t>(4, r1 - r);
    for (int64_t b = 0; b < batch; ++b) {
      const float* xb = xp + b * xs;
      __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t g = 0; g < full; ++g) {
        __m256 x0 = _mm256_loadu_ps(xb + g * 16), x1 = _mm256_loadu_ps(xb + g * 16 + 8);
        for (int i = 0; i < 4; ++i) {
          if (i >= nr) break;
          const V* w = W + (r + i) * in + g * 16;
          if constexpr (sizeof(V) == 2) {
            __m256i e = _mm256_loadu_si256((const __m256i*)w);
            a[i] = _mm256_fmadd_ps(even_f32(e), x0, a[i]);
            a[i] = _mm256_fmadd_ps(odd_f32(e), x1, a[i]);
          } else {
            const float* wf = reinterpret_cast<const float*>(w);
            a[i] = _mm256_fmadd_ps(_mm256_loadu_ps(wf), x0, a[i]);
            a[i] = _mm256_fmadd_ps(_mm256_loadu_ps(wf + 8), x1, a[i]);
          }
        }
      }
      for (int i = 0; i < nr; ++i) {
        float acc = hsum8(a[i]);
        for (int64_t j = full * 16; j < in; ++j) {
          int64_t c = j % 16, pos = c;
          if constexpr (sizeof(V) == 2) pos = (c % 2) * 8 + (c % 8) / 2 + (c / 8) * 4;
          acc += to_f32<V>(W[(r + i) * in + j]) * xb[full * 16 + pos];
        }
        y[b * out + r + i] = acc;
      }
    }
  }
#else
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t b = 0; b < batch; ++b) {
      float acc = 0.f;
      for (int64_t j = 0; j < in; ++j) acc += to_f32<V>(W[r * in + j]) * xp[b * xs + j];
      y[b * out + r] = acc;
    }
#endif
}

// W [out, in] dense float32/bfloat16, x [batch, in] of W's dtype -> y [batch, out] float32.
torch::Tensor dense_matmul(torch::Tensor W, torch::Tensor x) {
  TORCH_CHECK(W.dim() == 2 && x.dim() == 2 && W.is_contiguous() && x.is_contiguous() && W.dtype() == x.dtype() && x.size(1) == W.size(1),
              "W [out, in] and x [batch, in]: contiguous, same dtype");
  int64_t out = W.size(0), in = W.size(1), batch = x.size(0);
  auto y = torch::empty({batch, out}, x.options().dtype(torch::kFloat32));
  int64_t grain = std::max<int64_t>(4, 8192 / std::max<int64_t>(1, in / 16));
  float* yp = y.data_ptr<float>();
  if (W.dtype() == torch::kFloat32) {
    auto xp = prep_x<float>(x.data_ptr<float>(), batch, in, in);
    const float* w = W.data_ptr<float>();
    at::parallel_for(0, (out + 3) / 4, grain / 4 + 1, [&](int64_t k0, int64_t k1) {
      dense_rows<float>(w, xp.data(), batch, yp, out, in, k0 * 4, std::min(out, k1 * 4)); });
  } else if (W.dtype() == torch::kBFloat16) {
    auto xp = prep_x<uint16_t>(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), batch, in, in);
    const uint16_t* w = reinterpret_cast<const uint16_t*>(W.data_ptr<at::BFloat16>());
    at::parallel_for(0, (out + 3) / 4, grain / 4 + 1, [&](int64_t k0, int64_t k1) {
      dense_rows<uint16_t>(w, xp.data(), batch, yp, out, in, k0 * 4, std::min(out, k1 * 4)); });
  } else TORCH_CHECK(false, "float32 or bfloat16");
  return y;
}

template <typename T>
static void scatter_rows(const T* src, const int64_t* of, const uint8_t* mk, int64_t wb, T* dst, int64_t in, int64_t r0, int64_t r1,
                         int64_t nnz) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* v = src + of[r];
    T* w = dst + r * in;
    int64_t c = 0;
#ifdef OATS_AVX2
    if (of[r + 1] + OVERREAD <= nnz)  // the expand of the matmul, stored: 16 columns per step, no branch per bit
      for (; (c + 2) * 8 <= in; c += 2) {
        uint32_t m0 = mk[r * wb + c], m1 = mk[r * wb + c + 1];
        int p0 = __builtin_popcount(m0);
        if constexpr (sizeof(T) == 2) {
          __m256i raw = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)v)),
                                                _mm_loadu_si128((const __m128i*)(v + p0)), 1);
          __m256i ctl = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_load_si128((const __m128i*)T_.shuf16[m0])),
                                                _mm_load_si128((const __m128i*)T_.shuf16[m1]), 1);
          _mm256_storeu_si256((__m256i*)(w + c * 8), _mm256_shuffle_epi8(raw, ctl));
        } else {
          const float* fv = reinterpret_cast<const float*>(v);
          float* fw = reinterpret_cast<float*>(w + c * 8);
          _mm256_storeu_ps(fw, _mm256_and_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(fv), _mm256_load_si256((const __m256i*)T_.perm32[m0])),
                                             _mm256_castsi256_ps(_mm256_load_si256((const __m256i*)T_.keep32[m0]))));
          _mm256_storeu_ps(fw + 8, _mm256_and_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(fv + p0), _mm256_load_si256((const __m256i*)T_.perm32[m1])),
                                                 _mm256_castsi256_ps(_mm256_load_si256((const __m256i*)T_.keep32[m1]))));
        }
        v += p0 + __builtin_popcount(m1);
      }
#endif
    for (; c < wb; ++c) {
      uint32_t m = mk[r * wb + c];
      while (m) {
        w[c * 8 + __builtin_ctz(m)] = *v++;
        m &= m - 1;
      }
    }
  }
}

// Dense [out, in] (values' dtype) from the bitmask layout, rows split over threads.
torch::Tensor bitmask_to_dense(torch::Tensor values, torch::Tensor offsets, torch::Tensor mask, int64_t in) {
  TORCH_CHECK(mask.dtype() == torch::kUInt8 && offsets.dtype() == torch::kInt64 && values.is_contiguous() && mask.is_contiguous(),
              "mask uint8, offsets int64, contiguous");
  int64_t out = mask.size(0), wb = mask.size(1);
  auto W = torch::zeros({out, in}, values.options());
  const int64_t* of = offsets.data_ptr<int64_t>();
  const uint8_t* mk = mask.data_ptr<uint8_t>();
  int64_t es = values.element_size();
  TORCH_CHECK(es == 2 || es == 4, "16- or 32-bit values");
  at::parallel_for(0, out, 16, [&](int64_t r0, int64_t r1) {
    if (es == 4) scatter_rows<uint32_t>(reinterpret_cast<const uint32_t*>(values.data_ptr()), of, mk, wb, reinterpret_cast<uint32_t*>(W.data_ptr()), in, r0, r1, values.numel());
    else scatter_rows<uint16_t>(reinterpret_cast<const uint16_t*>(values.data_ptr()), of, mk, wb, reinterpret_cast<uint16_t*>(W.data_ptr()), in, r0, r1, values.numel());
  });
  return W;
}

std::string simd() {
#if defined(OATS_AVX512)
  return "avx512-vbmi2";
#elif defined(OATS_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}
