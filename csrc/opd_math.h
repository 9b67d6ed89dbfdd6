// Shared by the CPU kernels: fp32 math on 16-lane vectors (one AVX-512 register, two AVX2 ones;
// GCC/Clang vector extensions, so the code is vector code whatever the optimizer decides, and
// -march=native picks the instructions),
// and the loading of one block of a row (fp32 or bf16) into an fp32 buffer, soft-capped and
// padded with -inf to whole vectors (a -inf lane adds nothing to any sum below).
// No -ffast-math: infinities and NaN keep their IEEE meaning (log p = -inf where p = 0).
#pragma once

#include <ATen/ATen.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace opd {

// Forced: a call left in a loop keeps it slow (and, under -fPIC, goes through the PLT).
#define OPD_INLINE inline __attribute__((always_inline))

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr int64_t kLanes = 16;
// Elements of a row processed as one block: 4 KiB of fp32 a model, so a block's second look
// (after its max) reads L1.
constexpr int64_t kBlock = 1024;

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

OPD_INLINE vf splat(float x) { return vf{} + x; }
OPD_INLINE vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
OPD_INLINE void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
OPD_INLINE vf select(vi mask, vf a, vf b) { return mask ? a : b; }
OPD_INLINE float hsum(vf v) {  // lanes added in a fixed order (deterministic)
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}
OPD_INLINE float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
OPD_INLINE vf vmax(vf a, vf b) { return select(a > b, a, b); }
// a b + c rounded once (the compiler would reuse a rounded a b it has computed before).
OPD_INLINE vf fma_v(vf a, vf b, vf c) {
#if defined(__AVX512F__)
  return reinterpret_cast<vf>(_mm512_fmadd_ps(reinterpret_cast<__m512>(a),
                                              reinterpret_cast<__m512>(b),
                                              reinterpret_cast<__m512>(c)));
#else
  vf out;
  for (int i = 0; i < kLanes; ++i) out[i] = std::fma(a[i], b[i], c[i]);
  return out;
#endif
}
OPD_INLINE float max_f(float a, float b) { return a > b ? a : b; }
OPD_INLINE bool any_lane(vi mask) {
  uint64_t words[sizeof(vi) / 8];
  std::memcpy(words, &mask, sizeof words);
  uint64_t any = 0;
  for (uint64_t w : words) any |= w;
  return any != 0;
}

// e^x for x <= 88 (the kernels take it of x <= 0 only), as 2^n 2^r: n = round(x log2 e) goes to
// the exponent bits, r = x log2 e - n (one rounding, by two FMAs with log2 e split in two) in
// [-0.5, 0.5], 2^r a degree-6 polynomial (Cephes' exp2f): ~2 ulp. 0 below -87.3 (-inf included),
// NaN for NaN. Fewer instructions than a Cody-Waite reduction with clamps at both ends.
OPD_INLINE vf exp_v(vf x) {
  constexpr float kLog2e = 1.44269502f, kLog2eTail = 1.9259630e-08f;  // their sum: log2 e
  const vf t = x * kLog2e;
  const vi underflow = t < -126.0f;  // below 2^-126: 0 (no subnormal, no bits out of range)
  const vf magic = splat(12582912.0f + 127.0f);  // 1.5 * 2^23 + 127: adding it rounds to integer
  const vf biased = select(underflow, splat(-126.0f), t) + magic;  // round(t) + 127 in its low bits
  const vf n = biased - magic;
  const vf r = fma_v(x, splat(kLog2eTail), fma_v(x, splat(kLog2e), -n));  // x log2 e - n
  vf p = splat(1.5353362e-4f);
  p = p * r + 1.3398875e-3f;
  p = p * r + 9.6184369e-3f;
  p = p * r + 5.5503324e-2f;
  p = p * r + 2.4022648e-1f;
  p = p * r + 6.9314718e-1f;
  p = p * r + 1.0f;
  const vi bits = reinterpret_cast<const vi&>(biased) << 23;  // (n + 127) << 23: 2^n
  return select(underflow, splat(0.0f), p * reinterpret_cast<const vf&>(bits));
}

// log(x) for x > 0 (Cephes' logf polynomial), -inf at 0 (subnormals included: they only
// arise here as a probability that is 0 to fp32 precision), +inf at +inf, NaN below 0.
OPD_INLINE vf log_v(vf x) {
  const vi u = reinterpret_cast<const vi&>(x);
  vi e = ((u >> 23) & 0xff) - 126;
  const vi mant = (u & 0x007fffff) | 0x3f000000;
  vf m = reinterpret_cast<const vf&>(mant);  // in [0.5, 1)
  const vi low = m < 0.707106781186547524f;
  e = e + low;  // low is -1 where true
  m = select(low, m + m - 1.0f, m - 1.0f);
  const vf z = m * m;
  vf y = splat(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const vf fe = __builtin_convertvector(e, vf);
  y = y + fe * -2.12194440e-4f;
  y = y - 0.5f * z;
  vf out = m + y + fe * 0.693359375f;
  out = select(x < std::numeric_limits<float>::min(), splat(-kInf), out);
  out = select(x == kInf, splat(kInf), out);
  return select((x != x) | (x < 0.0f), splat(kNaN), out);
}

// c tanh(z / c) as the Triton kernels compute it (kernels/online_softmax.py): tanh from one exp,
// its odd series below |u| = 1/8 where 1 - e^{-2|u|} would cancel.
OPD_INLINE vf softcapped_v(vf z, float cap) {
  const vf u = z / cap;
  const vf abs_u = select(u < 0.0f, -u, u);
  const vf t = exp_v(-2.0f * abs_u);
  const vf u2 = u * u;
  const vf series = u * (1.0f + u2 * (-1.0f / 3.0f + u2 * (2.0f / 15.0f - u2 * (17.0f / 315.0f))));
  const vf th = (1.0f - t) / (1.0f + t);
  return cap * select(abs_u < 0.125f, series, select(u < 0.0f, -th, th));
}

OPD_INLINE float capped_one(float z, float cap) {
  return cap > 0.0f ? softcapped_v(splat(z), cap)[0] : z;
}

// log(beta q + (1 - beta) p) from log p, log q, stable for either at -inf.
OPD_INLINE vf log_mixture_v(vf log_p, vf log_q, float log_beta, float log_1m_beta) {
  const vf a = log_q + log_beta;
  const vf b = log_p + log_1m_beta;
  const vf top = vmax(a, b);
  const vf center = select(top == -kInf, splat(0.0f), top);
  return center + log_v(exp_v(a - center) + exp_v(b - center));
}

OPD_INLINE int64_t padded(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// n elements of a row (fp32 or bf16) as fp32, soft-capped at ``cap`` (0: none) and padded with
// -inf to whole vectors: the row itself where it is already that (fp32, no cap, whole
// vectors), else a copy in ``buffer``.
template <typename T>
OPD_INLINE const float* load_block(const T* src, int64_t n, float cap, float* buffer) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint16_t* raw = reinterpret_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t bits = static_cast<uint32_t>(raw[i]) << 16;
      std::memcpy(buffer + i, &bits, sizeof bits);
    }
  } else {
    if (cap == 0.0f && n % kLanes == 0) return src;
    std::memcpy(buffer, src, n * sizeof(float));
  }
  const int64_t end = padded(n);
  if (cap > 0.0f)
    for (int64_t i = 0; i < end; i += kLanes) vstore(buffer + i, softcapped_v(vload(buffer + i), cap));
  for (int64_t i = n; i < end; ++i) buffer[i] = -kInf;
  return buffer;
}

// Asks for the n elements at src ahead of their read, a cache line at a time.
template <typename T>
OPD_INLINE void prefetch_block(const T* src, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(src);
  const int64_t size = n * static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < size; b += 64) __builtin_prefetch(bytes + b);
}

OPD_INLINE float load_one(const float* p) { return *p; }
OPD_INLINE float load_one(const c10::BFloat16* p) { return static_cast<float>(*p); }

// Round to nearest even, as c10::BFloat16 does; NaN stays NaN.
OPD_INLINE void store_block(float* out, const float* g, int64_t n) {
  std::memcpy(out, g, n * sizeof(float));
}
OPD_INLINE void store_block(c10::BFloat16* out, const float* g, int64_t n) {
  uint16_t* raw = reinterpret_cast<uint16_t*>(out);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, g + i, sizeof u);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    raw[i] = g[i] != g[i] ? static_cast<uint16_t>(0x7fc0u) : static_cast<uint16_t>(rounded);
  }
}

// A tensor argument of the ops: 2-D, rows of contiguous elements (any row stride).
inline void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D [rows, vocab], got ", t.dim(), " dims");
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name, " must have a contiguous last axis");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16, got ", t.scalar_type());
}

inline void check_row_vector(const c10::optional<at::Tensor>& t, int64_t n, const char* name,
                             at::ScalarType dtype) {
  if (!t) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n && t->is_contiguous(), name,
              " must be a contiguous [", n, "] tensor");
  TORCH_CHECK(t->scalar_type() == dtype, name, " must be ", dtype, ", got ", t->scalar_type());
}

}  // namespace opd
