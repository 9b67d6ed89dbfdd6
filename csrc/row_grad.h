// The dense gradient of one row of an objective's GradForm (kernels/row_grad.py, the same math):
//   dL/dz_v = (p_v (shift + w_r (log p_v - log q_v) + w_m (log p_v - log m_v)) + w_q q_v)
//             * scale * (1 - (z_v / c)^2)       (the last factor only with a soft-cap c)
// and the generalized JSD's mixture sums, the read before it where the form has a mixture term.
// log p = (x - max_s) - logsum_s from the row pass's split lse (fields max_s, logsum_s: an fp32
// lse near |x| = 1e4 is off by ~1e-3), likewise log q. Shared by row_grad.cpp (dense_grad and
// mixture, reads of their own) and row_pass_grad.cpp (right after the row pass, which left the
// student's exps in a RowCache: p = e^(center - lse_s) exp(x - center) is then a product, and
// the mixture pass leaves log m there for the gradient).
#pragma once

#include <algorithm>
#include <utility>
#include <vector>

#include "opd_math.h"
#include "row_read.h"

namespace opd {

// The numbers of a call: its temperature, soft-caps (0: none) and the form's weights.
struct FormArgs {
  float inv_tau, cap_s, cap_t, w_reverse, w_forward, w_mixture, log_beta, log_1m_beta;
};

// One row's numbers: its maxima and log-sums (the row pass's fields), shift and scale.
struct RowArgs {
  float max_s, logsum_s, max_t, logsum_t, shift, scale;
};

// A [kBlock] scratch of each model's soft-capped logits and the gradient, per thread.
struct GradBuffers {
  std::vector<float> zs, zt, g;
  GradBuffers() : zs(kBlock), zt(kBlock), g(kBlock) {}
};

template <typename G>
void zero_row(G* g_row, int64_t vocab, GradBuffers& buf) {
  std::fill(buf.g.begin(), buf.g.end(), 0.0f);
  for (int64_t v0 = 0; v0 < vocab; v0 += kBlock)
    store_block(g_row + v0, buf.g.data(), std::min(kBlock, vocab - v0));
}

// The generalized JSD's mixture sums of one row (kernels/row_mixture.py, the same math):
// (KL(p || m), KL(q || m)), m = beta q + (1 - beta) p. CACHED: p from the row pass's exps,
// and log m left in the cache for the gradient.
template <typename T, bool CACHED>
std::pair<float, float> mixture_row(const T* zs_row, const T* zt_row, int64_t vocab,
                                    const FormArgs& a, const RowArgs& r, const RowCache& cache,
                                    GradBuffers& buf) {
  const float inv_tau = a.inv_tau, log_beta = a.log_beta, log_1m_beta = a.log_1m_beta;
  const float max_s = r.max_s, logsum_s = r.logsum_s, max_t = r.max_t, logsum_t = r.logsum_t;
  float j_p = 0.0f, j_q = 0.0f;
  for (int64_t v0 = 0; v0 < vocab; v0 += kBlock) {
    const int64_t m = std::min(kBlock, vocab - v0);
    const float* z_s = load_block(zs_row + v0, m, a.cap_s, buf.zs.data());
    const float* z_t = load_block(zt_row + v0, m, a.cap_t, buf.zt.data());
    const float to_p = CACHED ? cache.to_p(v0, max_s, logsum_s) : 0.0f;
    vf bp = splat(0.0f), bq = bp;
    const vf zero = bp;
    for (int64_t i = 0; i < m; i += kLanes) {
      const vf log_p = (vload(z_s + i) * inv_tau - max_s) - logsum_s;
      const vf log_q = (vload(z_t + i) * inv_tau - max_t) - logsum_t;
      const vf log_m = log_mixture_v(log_p, log_q, log_beta, log_1m_beta);
      vf p;
      if constexpr (CACHED) {
        p = vload(cache.exps + v0 + i) * to_p;
        vstore(cache.log_m + v0 + i, log_m);
      } else {
        p = exp_v(log_p);
      }
      const vf q = exp_v(log_q);
      bp += select(p > 0.0f, p * (log_p - log_m), zero);
      bq += select(q > 0.0f, q * (log_q - log_m), zero);
    }
    j_p += hsum(bp);
    j_q += hsum(bq);
  }
  return {j_p, j_q};
}

// The row's gradient into g_row, which may be zt_row itself (a block is read before it is
// written). CACHED: p from the row pass's exps, log m from the mixture pass's.
template <typename T, typename G, bool HAS_TEACHER, bool HAS_MIXTURE, bool CACHED>
void grad_row(const T* zs_row, const T* zt_row, G* g_row, int64_t vocab, const FormArgs& a,
              const RowArgs& r, const RowCache& cache, GradBuffers& buf) {
  // locals, not loads through a and r: the stores to the gradient could alias them
  const float inv_tau = a.inv_tau, cap_s = a.cap_s, w_reverse = a.w_reverse;
  const float w_forward = a.w_forward, w_mixture = a.w_mixture;
  const float max_s = r.max_s, logsum_s = r.logsum_s, max_t = r.max_t, logsum_t = r.logsum_t;
  const float shift = r.shift, scale = r.scale;
  float* g = buf.g.data();
  for (int64_t v0 = 0; v0 < vocab; v0 += kBlock) {
    const int64_t m = std::min(kBlock, vocab - v0);
    const float* z_s_block = load_block(zs_row + v0, m, cap_s, buf.zs.data());
    const float* z_t_block = nullptr;
    if constexpr (HAS_TEACHER) z_t_block = load_block(zt_row + v0, m, a.cap_t, buf.zt.data());
    const float to_p = CACHED ? cache.to_p(v0, max_s, logsum_s) : 0.0f;
    const float* exps = CACHED ? cache.exps + v0 : nullptr;
    // fp32 whole vectors go straight to the row (a lane of z_t is read before it is written)
    float* out = g;
    if constexpr (std::is_same_v<G, float>)
      if (m % kLanes == 0) out = g_row + v0;
    const vf zero = splat(0.0f);
    for (int64_t i = 0; i < m; i += kLanes) {
      const vf z_s = vload(z_s_block + i);
      const vf log_p = (z_s * inv_tau - max_s) - logsum_s;
      vf p;
      if constexpr (CACHED)
        p = vload(exps + i) * to_p;
      else
        p = exp_v(log_p);
      vf coef = splat(shift), log_q = zero;
      if constexpr (HAS_TEACHER) {
        log_q = (vload(z_t_block + i) * inv_tau - max_t) - logsum_t;
        if (w_reverse != 0.0f) coef += w_reverse * (log_p - log_q);
        if constexpr (HAS_MIXTURE && CACHED)
          coef += w_mixture * (log_p - vload(cache.log_m + v0 + i));
        else if constexpr (HAS_MIXTURE)
          coef += w_mixture * (log_p - log_mixture_v(log_p, log_q, a.log_beta, a.log_1m_beta));
      }
      vf grad = select(p > 0.0f, p * coef, zero);
      if (HAS_TEACHER && w_forward != 0.0f) grad += w_forward * exp_v(log_q);
      grad *= scale;
      if (cap_s > 0.0f) {
        const vf c = z_s / cap_s;
        grad *= 1.0f - c * c;
      }
      vstore(out + i, grad);
    }
    if (out == g) store_block(g_row + v0, g, m);
  }
}

}  // namespace opd
