// The studio's decoding kernels for the CPU. Decoding a token multiplies one row (or a few: one per sample) by every
// weight, so its speed is how fast the weights stream from memory, plus whatever runs between the products.
//
// linear_small: y = x W^T (+ b) for a few rows of x, with W in fp32, f16, bf16, int8 (one scale per output row) or
// 4-bit blocks (Q4_0's layout: 32 weights share one scale, code - 8 times the scale). BLAS's matrix-vector product
// streamed an fp32 GPT-2 at 12-19 GB/s on a 2-core machine that sums an array at 30-47 GB/s; these loops read each
// weight once, widen it to fp32 in registers and keep a few rows' dot products in flight, on every core
// (at::parallel_for over the output rows). decode_step: a whole GPT-2 token in one call (embeddings, LayerNorms,
// these products, one-token attention with its cache writes, GELU, residuals), where ~100 tensor operations and
// Python calls per token had cost as much as a 4-bit model's weights take to stream. Built at run time with the
// machine's own vector instructions (-march=native) by core/cpu_kernels.py; registered as torch.ops.studio.*.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define STUDIO_AVX512 1
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define STUDIO_AVX2 1
#endif

namespace {

enum Kind : int64_t { F32 = 0, F16 = 1, BF16 = 2, INT8 = 3, Q4 = 4 };
constexpr int64_t MAX_ROWS = 8;
constexpr int64_t Q4_GROUP = 32;

inline float half_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }
inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// One weight of a row, widened to fp32 (the scalar tails and the portable path).
template <int K>
inline float weight_at(const void* w, int64_t i) {
  if constexpr (K == F32) return static_cast<const float*>(w)[i];
  else if constexpr (K == F16) return half_to_float(static_cast<const uint16_t*>(w)[i]);
  else if constexpr (K == BF16) return bf16_to_float(static_cast<const uint16_t*>(w)[i]);
  else return static_cast<float>(static_cast<const int8_t*>(w)[i]);
}

#if defined(STUDIO_AVX512) || defined(STUDIO_AVX2)
// The sum of a 256-bit register's 8 floats.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

#ifdef STUDIO_AVX512
// The vector operations the float loops below are written in: 16 floats per register.
struct Lanes {
  using Vec = __m512;
  static constexpr int64_t width = 16;
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec set1(float v) { return _mm512_set1_ps(v); }
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  static Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static float sum(Vec v) { return _mm512_reduce_add_ps(v); }

  // `width` weights from position i of a row (fp32/f16/bf16/int8), widened to fp32.
  template <int K>
  static Vec widen(const void* row, int64_t i) {
    if constexpr (K == F32) {
      return _mm512_loadu_ps(static_cast<const float*>(row) + i);
    } else if constexpr (K == F16) {
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(row) + i)));
    } else if constexpr (K == BF16) {
      __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(row) + i));
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {  // INT8
      __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(row) + i));
      return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
    }
  }

  // The 32 weights of a 4-bit block (16 bytes: byte j holds weight j in its low nibble and weight j + 16 in its
  // high one) as code - 8, in weight order.
  static void widen_q4(const uint8_t* block, Vec out[32 / width]) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block)), low_mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(bytes, low_mask), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_mask);
    const Vec eight = set1(8.0f);
    out[0] = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), eight);  // weights 0..15
    out[1] = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), eight);  // weights 16..31
  }
};
#elif defined(STUDIO_AVX2)
// The vector operations the float loops below are written in: 8 floats per register.
struct Lanes {
  using Vec = __m256;
  static constexpr int64_t width = 8;
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec set1(float v) { return _mm256_set1_ps(v); }
  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  static Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  static float sum(Vec v) { return hsum(v); }

  // `width` weights from position i of a row (fp32/f16/bf16/int8), widened to fp32.
  template <int K>
  static Vec widen(const void* row, int64_t i) {
    if constexpr (K == F32) {
      return _mm256_loadu_ps(static_cast<const float*>(row) + i);
    } else if constexpr (K == F16) {
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(row) + i)));
    } else if constexpr (K == BF16) {
      __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(row) + i));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {  // INT8
      __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(row) + i));
      return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
    }
  }

  // The 32 weights of a 4-bit block (see the AVX-512 Lanes) as code - 8, in weight order.
  static void widen_q4(const uint8_t* block, Vec out[32 / width]) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block)), low_mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(bytes, low_mask), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_mask);
    const Vec eight = set1(8.0f);
    out[0] = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), eight);
    out[1] = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), eight);
    out[2] = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), eight);
    out[3] = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), eight);
  }
};
#endif

#if defined(STUDIO_AVX512) || defined(STUDIO_AVX2)
// Dot products of one weight row (fp32/f16/bf16/int8) with N rows of x: two accumulators per row keep two fused
// multiply-adds in flight.
template <int K, int N>
inline void row_dots(const void* w, const float* x, int64_t in, float* out) {
  constexpr int64_t W = Lanes::width;
  typename Lanes::Vec acc[N][2];
  for (int r = 0; r < N; ++r) acc[r][0] = acc[r][1] = Lanes::zero();
  int64_t i = 0;
  for (; i + 2 * W <= in; i += 2 * W) {
    const auto w0 = Lanes::template widen<K>(w, i), w1 = Lanes::template widen<K>(w, i + W);
    for (int r = 0; r < N; ++r) {
      acc[r][0] = Lanes::fmadd(w0, Lanes::load(x + r * in + i), acc[r][0]);
      acc[r][1] = Lanes::fmadd(w1, Lanes::load(x + r * in + i + W), acc[r][1]);
    }
  }
  for (int r = 0; r < N; ++r) out[r] = Lanes::sum(Lanes::add(acc[r][0], acc[r][1]));
  for (; i < in; ++i) {  // a tail shorter than two registers (never for GPT-2 shapes)
    const float wi = weight_at<K>(w, i);
    for (int r = 0; r < N; ++r) out[r] += wi * x[r * in + i];
  }
}

// Dot products of one 4-bit row (in/2 bytes, blocks of 32 weights in 16 bytes) with N rows of x; scales: one per
// block.
template <int N>
inline void q4_row_dots(const uint8_t* w, const float* scales, const float* x, int64_t in, float* out) {
  constexpr int64_t W = Lanes::width, parts = Q4_GROUP / W;
  typename Lanes::Vec total[N], weights[parts];
  for (int r = 0; r < N; ++r) total[r] = Lanes::zero();
  for (int64_t g = 0; g < in / Q4_GROUP; ++g) {
    Lanes::widen_q4(w + g * 16, weights);
    const auto d = Lanes::set1(scales[g]);
    for (int r = 0; r < N; ++r) {
      const float* xg = x + r * in + g * Q4_GROUP;
      auto s = Lanes::mul(weights[0], Lanes::load(xg));
      for (int64_t k = 1; k < parts; ++k) s = Lanes::fmadd(weights[k], Lanes::load(xg + k * W), s);
      total[r] = Lanes::fmadd(d, s, total[r]);
    }
  }
  for (int r = 0; r < N; ++r) out[r] = Lanes::sum(total[r]);
}
#else
template <int K, int N>
inline void row_dots(const void* w, const float* x, int64_t in, float* out) {
  float acc[N] = {};
  for (int64_t i = 0; i < in; ++i) {
    float wi = weight_at<K>(w, i);
    for (int r = 0; r < N; ++r) acc[r] += wi * x[r * in + i];
  }
  for (int r = 0; r < N; ++r) out[r] = acc[r];
}

template <int N>
inline void q4_row_dots(const uint8_t* w, const float* scales, const float* x, int64_t in, float* out) {
  float total[N] = {};
  for (int64_t g = 0; g < in / Q4_GROUP; ++g) {
    float acc[N] = {};
    for (int64_t j = 0; j < 16; ++j) {
      float lo = static_cast<float>(w[g * 16 + j] & 0x0F) - 8.0f, hi = static_cast<float>(w[g * 16 + j] >> 4) - 8.0f;
      for (int r = 0; r < N; ++r) acc[r] += lo * x[r * in + g * Q4_GROUP + j] + hi * x[r * in + g * Q4_GROUP + j + 16];
    }
    for (int r = 0; r < N; ++r) total[r] += scales[g] * acc[r];
  }
  for (int r = 0; r < N; ++r) out[r] = total[r];
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define STUDIO_VNNI 1
inline __m256i dot_u8_s8(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(acc, u, s); }
#elif defined(__AVXVNNI__)
#define STUDIO_VNNI 1
inline __m256i dot_u8_s8(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
#endif

#ifdef STUDIO_VNNI
// The rows of x quantized like llama.cpp's Q8_0 activations, for integer dot products with int8 and 4-bit weights: per
// block of 32 values, int8 codes, one scale (the block's largest magnitude maps to 127) and the codes' sum.
struct Q8Rows {
  std::vector<int8_t> codes;  // (n, in)
  std::vector<float> scales;  // (n, in / 32)
  std::vector<int32_t> sums;  // (n, in / 32)
  std::vector<float> scaled_sums;  // (n, in / 32): scale * sum, what 4-bit codes' offset of 8 multiplies
  std::vector<int8_t> paired;  // (n, in): per two blocks a, b: a[0:16], b[0:16], a[16:32], b[16:32] (4-bit, AVX-512)
};

inline Q8Rows quantize_rows(const float* x, int64_t n, int64_t in) {
  const int64_t groups = in / Q4_GROUP;
  Q8Rows q{std::vector<int8_t>(n * in), std::vector<float>(n * groups), std::vector<int32_t>(n * groups)};
  for (int64_t b = 0; b < n * groups; ++b) {
    const float* block = x + b * Q4_GROUP;
    float top = 0.0f;
    for (int64_t j = 0; j < Q4_GROUP; ++j) top = std::max(top, std::fabs(block[j]));
    const float scale = top / 127.0f, inverse = top > 0.0f ? 127.0f / top : 0.0f;
    int32_t sum = 0;
    for (int64_t j = 0; j < Q4_GROUP; ++j) {
      const int8_t c = static_cast<int8_t>(std::nearbyint(block[j] * inverse));
      q.codes[b * Q4_GROUP + j] = c;
      sum += c;
    }
    q.scales[b] = scale;
    q.sums[b] = sum;
  }
  q.scaled_sums.resize(n * groups);
  for (int64_t b = 0; b < n * groups; ++b) q.scaled_sums[b] = q.scales[b] * static_cast<float>(q.sums[b]);
  return q;
}

// The order q4_row_dots_vnni512 reads activation codes in: for each pair of blocks a, b, the 16-byte quarters
// a[0:16], b[0:16], a[16:32], b[16:32], matching how two blocks' packed weights widen into one 512-bit register.
inline void pair_codes(Q8Rows& q, int64_t n, int64_t in) {
  q.paired.resize(n * in);
  for (int64_t pair = 0; pair < n * in / 64; ++pair) {
    const int8_t* a = q.codes.data() + pair * 64;
    int8_t* out = q.paired.data() + pair * 64;
    std::memcpy(out, a, 16);
    std::memcpy(out + 16, a + 32, 16);
    std::memcpy(out + 32, a + 16, 16);
    std::memcpy(out + 48, a + 48, 16);
  }
}

// sum over the row of (code - 8) * d_w * x, as sum_blocks d_w * d_x * (sum(code * x_code) - 8 * sum(x_code)):
// one integer multiply-add instruction per 32 weights and row, where the float path widens every weight.
template <int N>
inline void q4_row_dots_vnni(const uint8_t* w, const float* w_scales, const Q8Rows& xq, int64_t in, float* out) {
  const int64_t groups = in / Q4_GROUP;
  __m256 acc[N];
  float correction[N];
  for (int r = 0; r < N; ++r) acc[r] = _mm256_setzero_ps(), correction[r] = 0.0f;
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  for (int64_t g = 0; g < groups; ++g) {
    __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + g * 16));
    // weights 0..15 (low nibbles) then 16..31 (high nibbles): the order of the block's 32 activations
    __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), low_mask), _mm_and_si128(bytes, low_mask));
    for (int r = 0; r < N; ++r) {
      const int64_t block = r * groups + g;
      __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq.codes.data() + block * Q4_GROUP));
      __m256i dot = dot_u8_s8(_mm256_setzero_si256(), codes, x);  // 8 sums of 4 products
      const float d = w_scales[g] * xq.scales[block];
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d), acc[r]);
      correction[r] += d * static_cast<float>(xq.sums[block]);
    }
  }
  for (int r = 0; r < N; ++r) out[r] = hsum(acc[r]) - 8.0f * correction[r];
}

#if defined(STUDIO_AVX512) && defined(__AVX512VNNI__)
#define STUDIO_VNNI512 1
// q4_row_dots_vnni over two blocks per instruction (rows of a multiple of 64 weights): the 32 packed bytes of blocks
// a, b widen to the codes a[0:16], b[0:16], a[16:32], b[16:32] in one register, against activations stored in that
// order (pair_codes); the offset of 8 is subtracted once per row, as a dot product of the row's scales with the
// activations' scaled sums. About half the instructions per weight of the 256-bit loop, which bounds 4-bit decoding.
template <int N>
inline void q4_row_dots_vnni512(const uint8_t* w, const float* w_scales, const Q8Rows& xq, int64_t in, float* out) {
  const int64_t groups = in / Q4_GROUP;
  __m512 acc[N];
  for (int r = 0; r < N; ++r) acc[r] = _mm512_setzero_ps();
  const __m256i low_mask = _mm256_set1_epi8(0x0F);
  // lanes 0-3 and 8-11 hold block a's sums, 4-7 and 12-15 block b's
  const __m512i pattern = _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
  for (int64_t g = 0; g < groups; g += 2) {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 16));
    const __m256i lo = _mm256_and_si256(bytes, low_mask), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_mask);
    const __m512i codes = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    const __m128 ws = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(w_scales + g)));  // a's, b's
    for (int r = 0; r < N; ++r) {
      const int64_t block = r * groups + g;
      const __m512i x = _mm512_loadu_si512(xq.paired.data() + block * Q4_GROUP);
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, x);
      const __m128 xs = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(xq.scales.data() + block)));
      const __m512 d = _mm512_permutexvar_ps(pattern, _mm512_castps128_ps512(_mm_mul_ps(ws, xs)));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), d, acc[r]);
    }
  }
  for (int r = 0; r < N; ++r) {
    const float* sums = xq.scaled_sums.data() + r * groups;
    __m512 correction = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 16 <= groups; g += 16) {
      correction = _mm512_fmadd_ps(_mm512_loadu_ps(w_scales + g), _mm512_loadu_ps(sums + g), correction);
    }
    float tail = 0.0f;
    for (; g < groups; ++g) tail += w_scales[g] * sums[g];
    out[r] = _mm512_reduce_add_ps(acc[r]) - 8.0f * (_mm512_reduce_add_ps(correction) + tail);
  }
}
#endif

// sum over the row of w_code * x, times the row's scale, as sum_blocks d_x * sum(w_code * x_code): the signed
// weights' magnitudes (unsigned) against the activations carrying the weights' signs, in integer multiply-adds.
template <int N>
inline void int8_row_dots_vnni(const int8_t* w, const Q8Rows& xq, int64_t in, float* out) {
  const int64_t groups = in / Q4_GROUP;
  __m256 acc[N];
  for (int r = 0; r < N; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i weights = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * Q4_GROUP));
    __m256i magnitudes = _mm256_sign_epi8(weights, weights);
    for (int r = 0; r < N; ++r) {
      const int64_t block = r * groups + g;
      __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq.codes.data() + block * Q4_GROUP));
      __m256i dot = dot_u8_s8(_mm256_setzero_si256(), magnitudes, _mm256_sign_epi8(x, weights));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(xq.scales[block]), acc[r]);
    }
  }
  for (int r = 0; r < N; ++r) out[r] = hsum(acc[r]);
}
#endif

// One linear layer as the kernels read it: `out` rows of `row_bytes` bytes each (the weight's layout is `kind`),
// `in` inputs per row; scales and bias may be null (scales: one per row for INT8, one per 32 weights for Q4).
struct LinearArgs {
  const void* w;
  int64_t row_bytes;
  const float* scales;
  const float* bias;
  int64_t in, out, kind;
};

// y (N, out) = x (N, in) W^T + b; with `accumulate`, added to what y holds (a residual connection, in the same pass).
template <int K, int N>
void run_rows(const float* x, const LinearArgs& l, float* y, bool accumulate) {
  const int64_t in = l.in, out = l.out;
#ifdef STUDIO_VNNI
  // Integer dot products where the rows split into blocks of 32 (every GPT-2 width); floats otherwise.
  const bool integer = (K == Q4 || K == INT8) && in % Q4_GROUP == 0;
  Q8Rows xq;
  if (integer) xq = quantize_rows(x, N, in);
#ifdef STUDIO_VNNI512
  const bool paired = K == Q4 && in % (2 * Q4_GROUP) == 0;
  if (paired) pair_codes(xq, N, in);
#endif
#endif
  at::parallel_for(0, out, 64, [&](int64_t begin, int64_t end) {
    float dots[N];
    for (int64_t o = begin; o < end; ++o) {
      const void* row = static_cast<const uint8_t*>(l.w) + o * l.row_bytes;
      if constexpr (K == Q4) {
#if defined(STUDIO_VNNI512)
        if (paired) {
          q4_row_dots_vnni512<N>(static_cast<const uint8_t*>(row), l.scales + o * (in / Q4_GROUP), xq, in, dots);
        } else {
          q4_row_dots_vnni<N>(static_cast<const uint8_t*>(row), l.scales + o * (in / Q4_GROUP), xq, in, dots);
        }
#elif defined(STUDIO_VNNI)
        q4_row_dots_vnni<N>(static_cast<const uint8_t*>(row), l.scales + o * (in / Q4_GROUP), xq, in, dots);
#else
        q4_row_dots<N>(static_cast<const uint8_t*>(row), l.scales + o * (in / Q4_GROUP), x, in, dots);
#endif
      } else {
#ifdef STUDIO_VNNI
        if (K == INT8 && integer) {
          int8_row_dots_vnni<N>(static_cast<const int8_t*>(row), xq, in, dots);
        } else {
          row_dots<K, N>(row, x, in, dots);
        }
#else
        row_dots<K, N>(row, x, in, dots);
#endif
        if constexpr (K == INT8) {
          for (int r = 0; r < N; ++r) dots[r] *= l.scales[o];
        }
      }
      const float b = l.bias ? l.bias[o] : 0.0f;
      for (int r = 0; r < N; ++r) y[r * out + o] = dots[r] + b + (accumulate ? y[r * out + o] : 0.0f);
    }
  });
}

template <int K>
void dispatch_rows(int64_t n, const float* x, const LinearArgs& l, float* y, bool accumulate) {
  switch (n) {
    case 1: return run_rows<K, 1>(x, l, y, accumulate);
    case 2: return run_rows<K, 2>(x, l, y, accumulate);
    case 3: return run_rows<K, 3>(x, l, y, accumulate);
    case 4: return run_rows<K, 4>(x, l, y, accumulate);
    case 5: return run_rows<K, 5>(x, l, y, accumulate);
    case 6: return run_rows<K, 6>(x, l, y, accumulate);
    case 7: return run_rows<K, 7>(x, l, y, accumulate);
    default: return run_rows<K, 8>(x, l, y, accumulate);
  }
}

// y (n, out) = x (n, in) W^T + b (added to y with `accumulate`), any n: up to MAX_ROWS rows share one pass over the
// weight, more take a pass per MAX_ROWS.
void linear_rows(const LinearArgs& l, int64_t n, const float* x, float* y, bool accumulate) {
  for (int64_t first = 0; first < n; first += MAX_ROWS) {
    const int64_t rows = std::min(MAX_ROWS, n - first);
    const float* xs = x + first * l.in;
    float* ys = y + first * l.out;
    switch (l.kind) {
      case F32: dispatch_rows<F32>(rows, xs, l, ys, accumulate); break;
      case F16: dispatch_rows<F16>(rows, xs, l, ys, accumulate); break;
      case BF16: dispatch_rows<BF16>(rows, xs, l, ys, accumulate); break;
      case INT8: dispatch_rows<INT8>(rows, xs, l, ys, accumulate); break;
      default: dispatch_rows<Q4>(rows, xs, l, ys, accumulate); break;
    }
  }
}

// A weight (its kind's layout, see linear_small), checked, as the kernels read it. `out` rows are used (at most the
// weight's: the LM head skips the vocabulary's padding rows).
LinearArgs linear_args(const at::Tensor& weight, const c10::optional<at::Tensor>& scales,
                       const c10::optional<at::Tensor>& bias, int64_t kind, int64_t in, int64_t out) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be a contiguous 2-D tensor");
  TORCH_CHECK(out >= 1 && out <= weight.size(0), "a layer cannot use more rows than its weight has");
  const float* scale_ptr = nullptr;
  if (kind == INT8 || kind == Q4) {
    TORCH_CHECK(scales.has_value() && scales->scalar_type() == at::kFloat && scales->is_contiguous(),
                "int8 and 4-bit weights need fp32 scales");
    TORCH_CHECK(scales->size(0) == weight.size(0), "one row of scales per weight row");
    scale_ptr = scales->data_ptr<float>();
  }
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == weight.size(0), "bias must be fp32 (out,)");
    bias_ptr = bias->data_ptr<float>();
  }
  int64_t row_bytes = 0;
  switch (kind) {
    case F32:
      TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.size(1) == in, "fp32 weight must be (out, in)");
      row_bytes = in * 4;
      break;
    case F16:
      TORCH_CHECK(weight.scalar_type() == at::kHalf && weight.size(1) == in, "f16 weight must be (out, in)");
      row_bytes = in * 2;
      break;
    case BF16:
      TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.size(1) == in, "bf16 weight must be (out, in)");
      row_bytes = in * 2;
      break;
    case INT8:
      TORCH_CHECK(weight.scalar_type() == at::kChar && weight.size(1) == in, "int8 weight must be (out, in)");
      row_bytes = in;
      break;
    case Q4:
      TORCH_CHECK(weight.scalar_type() == at::kByte && weight.size(1) * 2 == in && in % Q4_GROUP == 0,
                  "4-bit weight must be (out, in / 2) uint8 with in a multiple of 32");
      TORCH_CHECK(scales->dim() == 2 && scales->size(1) == in / Q4_GROUP, "4-bit scales must be (out, in / 32)");
      row_bytes = in / 2;
      break;
    default:
      TORCH_CHECK(false, "unknown weight kind ", kind);
  }
  return LinearArgs{weight.data_ptr(), row_bytes, scale_ptr, bias_ptr, in, out, kind};
}

// x: (n, in) fp32, n in 1..8; weight: (out, in) of the kind's dtype, or (out, in / 2) uint8 for Q4;
// scales: (out,) fp32 for INT8, (out, in / 32) fp32 for Q4, else None; bias: (out,) fp32 or None. Returns (n, out).
at::Tensor linear_small(const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& scales,
                        const c10::optional<at::Tensor>& bias, int64_t kind) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(0) >= 1 && x_in.size(0) <= MAX_ROWS, "x must be (1..8, in)");
  at::Tensor x = x_in.to(at::kFloat).contiguous();
  const LinearArgs l = linear_args(weight, scales, bias, kind, x.size(1), weight.size(0));
  at::Tensor y = at::empty({x.size(0), l.out}, x.options());
  linear_rows(l, x.size(0), x.data_ptr<float>(), y.data_ptr<float>(), false);
  return y;
}

// One decoding step of causal self-attention for B samples and every head at once: the new token's key and value go
// into one layer's cache at `pos`, and its query attends to positions 0..pos. qkv: (B, 3C), the c_attn output of the
// new token (q, k, v of all heads); k_cache, v_cache: (B, n_head, max_len, head_dim). out: (B, C), each head's
// weighted sum of values, heads side by side (what the output projection reads).
void attend_rows(const float* qkv, float* k_cache, float* v_cache, int64_t B, int64_t C, int64_t n_head,
                 int64_t max_len, int64_t pos, float* out) {
  const int64_t hd = C / n_head, length = pos + 1;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  at::parallel_for(0, B * n_head, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(length);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_head, h = task % n_head;
      const float* q = qkv + b * 3 * C + h * hd;
      float* keys = k_cache + (b * n_head + h) * max_len * hd;
      float* values = v_cache + (b * n_head + h) * max_len * hd;
      std::memcpy(keys + pos * hd, qkv + b * 3 * C + C + h * hd, hd * sizeof(float));
      std::memcpy(values + pos * hd, qkv + b * 3 * C + 2 * C + h * hd, hd * sizeof(float));
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < length; ++t) {
        const float* k = keys + t * hd;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < hd; ++d) dot += q[d] * k[d];
        scores[t] = dot * scale;
        top = std::max(top, scores[t]);
      }
      float total = 0.0f;
      for (int64_t t = 0; t < length; ++t) {
        scores[t] = std::exp(scores[t] - top);
        total += scores[t];
      }
      float* o = out + b * C + h * hd;
      for (int64_t d = 0; d < hd; ++d) o[d] = 0.0f;
      for (int64_t t = 0; t < length; ++t) {
        const float p = scores[t] / total;
        const float* v = values + t * hd;
        for (int64_t d = 0; d < hd; ++d) o[d] += p * v[d];
      }
    }
  });
}

// e^x within a few units in the last place: 2^n times a degree-6 polynomial of the remainder, in plain arithmetic
// that the compiler vectorizes (std::exp is a call per element: 37 thousand per gpt2 token, half a millisecond).
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  constexpr float round_magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const float n = (x * 1.44269504088896341f + round_magic) - round_magic;
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;  // ln 2 in two parts
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float power;
  std::memcpy(&power, &bits, sizeof power);
  return p * power;
}

// GPT-2's GELU (the tanh form), in place: 0.5 x (1 + tanh(u)) written as x / (1 + e^(-2u)).
void gelu_in_place(float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
    x[i] = v / (1.0f + exp_approx(-2.0f * u));
  }
}

// LayerNorm of n rows of C: (x - mean) / sqrt(variance + eps) * weight + bias (bias may be null).
void layer_norm_rows(const float* x, int64_t n, int64_t C, const float* weight, const float* bias, float eps,
                     float* y) {
  for (int64_t r = 0; r < n; ++r) {
    const float* row = x + r * C;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < C; ++i) sum += row[i];
    const float mean = sum / static_cast<float>(C);
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < C; ++i) squares += (row[i] - mean) * (row[i] - mean);
    const float inverse = 1.0f / std::sqrt(squares / static_cast<float>(C) + eps);
    float* out = y + r * C;
    for (int64_t i = 0; i < C; ++i) out[i] = (row[i] - mean) * inverse * weight[i] + (bias ? bias[i] : 0.0f);
  }
}

struct Norm {
  const float* weight;
  const float* bias;
};

Norm norm_args(const c10::List<c10::optional<at::Tensor>>& norms, int64_t index, int64_t C) {
  const c10::optional<at::Tensor> weight = norms.get(index), bias = norms.get(index + 1);
  TORCH_CHECK(weight.has_value() && weight->scalar_type() == at::kFloat && weight->numel() == C &&
                  weight->is_contiguous(),
              "a LayerNorm weight must be fp32 (C,)");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->numel() == C && bias->is_contiguous()),
              "a LayerNorm bias must be fp32 (C,) or None");
  return Norm{weight->data_ptr<float>(), bias.has_value() ? bias->data_ptr<float>() : nullptr};
}

// One whole decoding step of GPT-2 in one call: the logits (B, vocab) of the token after `tokens` (B,) int64, the
// tokens at position `pos`, whose keys and values go into the caches. Per block b, norms holds ln_1's weight and
// bias at 4b, ln_2's at 4b + 2, and ln_f's at the end (a bias may be None); weights, scales, biases and kinds
// hold c_attn, the attention's c_proj, c_fc and the MLP's c_proj at 4b..4b + 3, and the LM head last (each in its
// kind's layout, as linear_small takes it). k_cache, v_cache: (n_layer, B, n_head, max_len, head_dim) fp32.
//
// The same arithmetic as the model's forward on one position (the residual additions fused into the projections
// that feed them), without the ~100 tensor operations and Python calls per token whose dispatch, on a small
// model or a 4-bit one, cost as much as streaming the weights.
at::Tensor decode_step(const at::Tensor& tokens, int64_t pos, const at::Tensor& wte, const at::Tensor& wpe,
                       const c10::List<c10::optional<at::Tensor>>& norms, at::TensorList weights,
                       const c10::List<c10::optional<at::Tensor>>& scales,
                       const c10::List<c10::optional<at::Tensor>>& biases, at::IntArrayRef kinds, at::Tensor k_cache,
                       at::Tensor v_cache, int64_t n_head, double eps, int64_t vocab) {
  const int64_t linears = static_cast<int64_t>(weights.size()), L = (linears - 1) / 4;
  TORCH_CHECK(L >= 1 && linears == 4 * L + 1, "weights must hold 4 per block and the LM head");
  TORCH_CHECK(static_cast<int64_t>(scales.size()) == linears && static_cast<int64_t>(biases.size()) == linears &&
                  static_cast<int64_t>(kinds.size()) == linears,
              "weights, scales, biases and kinds must be as long as each other");
  TORCH_CHECK(static_cast<int64_t>(norms.size()) == 4 * L + 2, "norms must hold 4 per block and ln_f's 2");
  TORCH_CHECK(tokens.dim() == 1 && tokens.scalar_type() == at::kLong, "tokens must be (B,) int64");
  TORCH_CHECK(wte.dim() == 2 && wte.scalar_type() == at::kFloat && wte.is_contiguous(), "wte must be fp32 (V, C)");
  const int64_t B = tokens.size(0), C = wte.size(1);
  TORCH_CHECK(wpe.dim() == 2 && wpe.scalar_type() == at::kFloat && wpe.is_contiguous() && wpe.size(1) == C,
              "wpe must be fp32 (block_size, C)");
  TORCH_CHECK(n_head >= 1 && C % n_head == 0, "n_head must divide the embedding width");
  TORCH_CHECK(k_cache.dim() == 5 && k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat, "caches must be fp32");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "the key and value caches must have one shape");
  TORCH_CHECK(k_cache.size(0) == L && k_cache.size(1) == B && k_cache.size(2) == n_head &&
                  k_cache.size(4) == C / n_head,
              "caches must be (n_layer, B, n_head, max_len, head_dim)");
  const int64_t max_len = k_cache.size(3);
  TORCH_CHECK(pos >= 0 && pos < max_len && pos < wpe.size(0), "position outside the cache");
  const at::Tensor token_ids = tokens.contiguous();
  const int64_t* ids = token_ids.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(ids[b] >= 0 && ids[b] < wte.size(0), "token id out of range");

  std::vector<LinearArgs> layers;
  std::vector<Norm> norm_list;
  for (int64_t i = 0; i < linears; ++i) {
    const int64_t role = i == linears - 1 ? 4 : i % 4;  // 0 c_attn, 1 attention c_proj, 2 c_fc, 3 MLP c_proj, 4 head
    const int64_t hidden = role == 3 ? weights[i - 1].size(0) : 0;  // the MLP's width: c_fc's rows
    const int64_t in = role == 3 ? hidden : C;
    const int64_t out = role == 0 ? 3 * C : role == 2 ? weights[i].size(0) : role == 4 ? vocab : C;
    TORCH_CHECK(role == 4 || weights[i].size(0) == out, "a block's weight has the wrong number of rows");
    layers.push_back(linear_args(weights[i], scales.get(i), biases.get(i), kinds[i], in, out));
  }
  for (int64_t i = 0; i < 2 * L + 1; ++i) norm_list.push_back(norm_args(norms, 2 * i, C));
  const int64_t hidden = layers[2].out;

  const auto options = wte.options();
  at::Tensor x = at::empty({B, C}, options), h = at::empty({B, C}, options), qkv = at::empty({B, 3 * C}, options);
  at::Tensor attended = at::empty({B, C}, options), mlp = at::empty({B, hidden}, options);
  at::Tensor logits = at::empty({B, vocab}, options);
  float *xp = x.data_ptr<float>(), *hp = h.data_ptr<float>(), *qkvp = qkv.data_ptr<float>();
  float *ap = attended.data_ptr<float>(), *mp = mlp.data_ptr<float>();
  const float* wte_p = wte.data_ptr<float>();
  const float* wpe_p = wpe.data_ptr<float>() + pos * C;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < C; ++i) xp[b * C + i] = wte_p[ids[b] * C + i] + wpe_p[i];
  }
  const float epsilon = static_cast<float>(eps);
  const int64_t layer_cache = B * n_head * max_len * (C / n_head);
  float* k_p = k_cache.data_ptr<float>();
  float* v_p = v_cache.data_ptr<float>();
  for (int64_t l = 0; l < L; ++l) {
    layer_norm_rows(xp, B, C, norm_list[2 * l].weight, norm_list[2 * l].bias, epsilon, hp);
    linear_rows(layers[4 * l], B, hp, qkvp, false);
    attend_rows(qkvp, k_p + l * layer_cache, v_p + l * layer_cache, B, C, n_head, max_len, pos, ap);
    linear_rows(layers[4 * l + 1], B, ap, xp, true);  // x += attention
    layer_norm_rows(xp, B, C, norm_list[2 * l + 1].weight, norm_list[2 * l + 1].bias, epsilon, hp);
    linear_rows(layers[4 * l + 2], B, hp, mp, false);
    gelu_in_place(mp, B * hidden);
    linear_rows(layers[4 * l + 3], B, mp, xp, true);  // x += MLP
  }
  layer_norm_rows(xp, B, C, norm_list[2 * L].weight, norm_list[2 * L].bias, epsilon, hp);
  linear_rows(layers[4 * L], B, hp, logits.data_ptr<float>(), false);
  return logits;
}

// The k largest values of each row of logits (R, V) fp32 and their indices, best first (ties: the lower index
// first): what torch.topk returns, in one pass with a k-entry min-heap per row instead of a partial sort of the row.
std::tuple<at::Tensor, at::Tensor> top_k(const at::Tensor& logits_in, int64_t k) {
  TORCH_CHECK(logits_in.dim() == 2 && logits_in.scalar_type() == at::kFloat, "logits must be (R, V) fp32");
  at::Tensor logits = logits_in.contiguous();
  const int64_t rows = logits.size(0), V = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= V, "k must be in 1..V");
  at::Tensor values = at::empty({rows, k}, logits.options());
  at::Tensor indices = at::empty({rows, k}, logits.options().dtype(at::kLong));
  const float* lp = logits.data_ptr<float>();
  float* vp = values.data_ptr<float>();
  int64_t* ip = indices.data_ptr<int64_t>();
  // "better": a larger value, or the same value at a lower index
  auto better = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<float, int64_t>> heap;
    for (int64_t r = begin; r < end; ++r) {
      const float* row = lp + r * V;
      heap.clear();
      for (int64_t i = 0; i < k; ++i) heap.emplace_back(row[i], i);
      std::make_heap(heap.begin(), heap.end(), better);  // the worst kept entry on top
      for (int64_t i = k; i < V; ++i) {
        if (row[i] > heap.front().first) {  // NaN and equal values never enter: the lower index stays
          std::pop_heap(heap.begin(), heap.end(), better);
          heap.back() = {row[i], i};
          std::push_heap(heap.begin(), heap.end(), better);
        }
      }
      std::sort(heap.begin(), heap.end(), better);
      for (int64_t i = 0; i < k; ++i) {
        vp[r * k + i] = heap[i].first;
        ip[r * k + i] = heap[i].second;
      }
    }
  });
  return {values, indices};
}

// Whether int8 and 4-bit products round the activations to int8 blocks of 32 first (the integer dot-product path
// was built).
int64_t rounds_activations() {
#ifdef STUDIO_VNNI
  return 1;
#else
  return 0;
#endif
}

}  // namespace

TORCH_LIBRARY(studio, m) {
  m.def("linear_small(Tensor x, Tensor weight, Tensor? scales, Tensor? bias, int kind) -> Tensor");
  m.def("rounds_activations() -> int");
  m.def("top_k(Tensor logits, int k) -> (Tensor, Tensor)");
  m.def(
      "decode_step(Tensor tokens, int pos, Tensor wte, Tensor wpe, Tensor?[] norms, Tensor[] weights, "
      "Tensor?[] scales, Tensor?[] biases, int[] kinds, Tensor(a!) k_cache, Tensor(b!) v_cache, int n_head, "
      "float eps, int vocab) -> Tensor");
}

TORCH_LIBRARY_IMPL(studio, CPU, m) {
  m.impl("linear_small", &linear_small);
  m.impl("top_k", &top_k);
  m.impl("decode_step", &decode_step);
}

TORCH_LIBRARY_IMPL(studio, CompositeExplicitAutograd, m) { m.impl("rounds_activations", &rounds_activations); }
