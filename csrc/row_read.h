// The one forward read of a logits row on the CPU: the per-row quantities of
// kernels/row_stats.py (the same fields, in the order of kernels/row_fields.py), by the same
// online algorithm. A row is read in blocks of kBlock elements; per block the max is found
// first (the block is then in L1) and the running state (m, s, c of each model, a, b) moves to
// the new max once, by ``moved`` of kernels/online_softmax.py; then one exp an element and model
// accumulates it. The running top-k keeps the k largest soft-capped logits (a tie goes to the
// lower id, as the reference's stable sort); a vector of a block whose lanes do not beat the
// k-th value costs one comparison. Shared by row_pass.cpp (the pass alone) and
// row_pass_grad.cpp (the pass, then the gradient of the same row while it is in cache).
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "opd_math.h"

namespace opd {

enum Field : int {
  kLseS, kLseT, kMaxS, kMaxT, kLogsumS, kLogsumT, kKl, kForwardKl, kLogprobS, kLogprobT,
  kEntropyS, kEntropyT, kOverlap, kMassS, kMassT, kAdvantage, kNumFields
};

// The max of n values padded to whole vectors with -inf (load_block).
OPD_INLINE float block_max(const float* z, int64_t n) {
  vf top = splat(-kInf);
  for (int64_t i = 0; i < n; i += kLanes) top = vmax(top, vload(z + i));
  return hmax(top);
}

// The k largest (value, id) of a stream seen in ascending id order, sorted descending.
struct TopK {
  int64_t k = 0, count = 0;
  std::vector<float> values;
  std::vector<int64_t> ids;

  explicit TopK(int64_t k_) : k(k_), values(k_), ids(k_) {}
  void reset() { count = 0; }
  bool full() const { return count == k; }
  float threshold() const { return values[k - 1]; }

  void insert(float value, int64_t id) {
    if (full() && !(value > values[k - 1])) return;  // equal values keep the lower id
    int64_t at = full() ? k - 1 : count++;
    while (at > 0 && values[at - 1] < value) {
      values[at] = values[at - 1];
      ids[at] = ids[at - 1];
      --at;
    }
    values[at] = value;
    ids[at] = id;
  }

  // A block of values whose ids start at ``first`` (padded to whole vectors with -inf, which
  // never enters a full list): once the list is full, a vector whose lanes are all at or below
  // the k-th value costs one comparison.
  void scan(const float* z, int64_t n, int64_t first) {
    int64_t i = 0;
    for (; i < n && (!full() || i % kLanes != 0); ++i) insert(z[i], first + i);
    for (; i < n; i += kLanes) {
      if (!any_lane(vload(z + i) > threshold())) continue;
      for (int64_t j = i; j < std::min(n, i + kLanes); ++j) insert(z[j], first + j);
    }
  }
};

struct State {
  float m = -kInf, s = 0.0f, c = 0.0f;
};

OPD_INLINE float moved(float acc, float alpha, float s_old, float shift) {
  const float moved_acc = acc + (s_old > 0.0f ? s_old * shift : 0.0f);
  return alpha > 0.0f ? alpha * moved_acc : 0.0f;
}

struct Options {
  int64_t vocab, k;
  float inv_tau, cap_s, cap_t;
};

// What the passes over a row leave for the later ones (row_pass_grad.cpp), per thread: the
// row pass's exp(x_s - center) of every element (the row's length, padded to whole vectors)
// and the center of each block, so that p = e^(center - lse_s) exp(x_s - center) costs a
// product; the mixture pass's log m of every element (nullptr: no mixture).
struct RowCache {
  float* exps;
  float* centers;
  float* log_m;

  // e^(center - lse_s) of the block at v0: p there is that times the cached exp.
  float to_p(int64_t v0, float max_s, float logsum_s) const {
    return exp_v(splat((centers[v0 / kBlock] - max_s) - logsum_s))[0];
  }
};

// The fields of one row (the masked row's stand-ins, then the read and its fields) and the
// student's top-k ids. WITH_TOPK: the student's top-k and entropy; WITH_STATS: the teacher's
// too, and the overlap statistics.
template <typename T, bool HAS_TEACHER, bool WITH_TOPK, bool WITH_STATS>
class RowReader {
 public:
  explicit RowReader(const Options& o)
      : o_(o), zs_(kBlock), zt_(HAS_TEACHER ? kBlock : 0), top_s_(WITH_TOPK ? o.k : 0),
        top_t_(WITH_STATS ? o.k : 0) {}

  // A row that is not read: loss fields 0, statistics NaN, ids 0.
  void blank(float* f, int64_t* ids) const {
    for (int i = 0; i < kNumFields; ++i) f[i] = i < kEntropyS ? 0.0f : kNaN;
    std::fill(ids, ids + o_.k, 0);
  }

  // One row into f[kNumFields] and ids[k]; ``token`` (nullptr: none) the row's sampled id,
  // ``cache`` (nullptr: none) where the student's exps go.
  void read(const T* zs_row, const T* zt_row, const int64_t* token, float* f, int64_t* ids,
            const RowCache* cache) {
    State ms, mt;
    float a = 0.0f, b = 0.0f;
    top_s_.reset();
    top_t_.reset();
    if (cache != nullptr)
      blocks<true>(zs_row, zt_row, ms, mt, a, b, *cache);
    else
      blocks<false>(zs_row, zt_row, ms, mt, a, b, RowCache{nullptr, nullptr, nullptr});
    std::fill(f, f + kNumFields, 0.0f);  // a field this pass does not compute holds 0
    const float log_s_s = std::log(ms.s);
    f[kLseS] = ms.m + log_s_s;
    f[kMaxS] = ms.m;
    f[kLogsumS] = log_s_s;
    if (token != nullptr) {
      TORCH_CHECK(0 <= *token && *token < o_.vocab, "tokens must lie in [0, ", o_.vocab, "), got ",
                  *token);
      f[kLogprobS] = (capped_one(load_one(zs_row + *token), o_.cap_s) * o_.inv_tau - ms.m) - log_s_s;
    }
    if constexpr (HAS_TEACHER) {
      const float log_s_t = std::log(mt.s);
      f[kLseT] = mt.m + log_s_t;
      f[kMaxT] = mt.m;
      f[kLogsumT] = log_s_t;
      f[kKl] = a / ms.s - log_s_s + log_s_t;
      f[kForwardKl] = b / mt.s - log_s_t + log_s_s;
      if (token != nullptr)
        f[kLogprobT] = (capped_one(load_one(zt_row + *token), o_.cap_t) * o_.inv_tau - mt.m) - log_s_t;
      if constexpr (WITH_STATS) {
        f[kEntropyT] = log_s_t - mt.c / mt.s;
        overlap_stats(ms.m, log_s_s, mt.m, log_s_t, f);
      }
    }
    if constexpr (WITH_TOPK) {
      f[kEntropyS] = log_s_s - ms.c / ms.s;
      std::copy(top_s_.ids.begin(), top_s_.ids.end(), ids);
    }
  }

 private:
  template <bool CACHE>
  void blocks(const T* zs_row, const T* zt_row, State& ms, State& mt, float& a, float& b,
              const RowCache& cache) {
    for (int64_t v0 = 0; v0 < o_.vocab; v0 += kBlock) {
      const int64_t n = std::min(kBlock, o_.vocab - v0);
      if (v0 + kBlock < o_.vocab) {  // the next block, while this one is computed
        const int64_t next = std::min(kBlock, o_.vocab - v0 - kBlock);
        prefetch_block(zs_row + v0 + kBlock, next);
        if constexpr (HAS_TEACHER) prefetch_block(zt_row + v0 + kBlock, next);
      }
      const float* zs = load_block(zs_row + v0, n, o_.cap_s, zs_.data());
      const float* zt = nullptr;
      // rounding is monotone: the max of z / tau is the max of z, over tau
      const float new_ms = max_f(ms.m, block_max(zs, n) * o_.inv_tau);
      const float shift_s = ms.m == new_ms ? 0.0f : ms.m - new_ms;
      const float center_s = new_ms == -kInf ? 0.0f : new_ms;
      const float alpha_s = exp_v(splat(ms.m - center_s))[0];
      float new_mt = -kInf, shift_t = 0.0f, center_t = 0.0f, alpha_t = 0.0f;
      if constexpr (HAS_TEACHER) {
        zt = load_block(zt_row + v0, n, o_.cap_t, zt_.data());
        new_mt = max_f(mt.m, block_max(zt, n) * o_.inv_tau);
        shift_t = mt.m == new_mt ? 0.0f : mt.m - new_mt;
        center_t = new_mt == -kInf ? 0.0f : new_mt;
        alpha_t = exp_v(splat(mt.m - center_t))[0];
        a = moved(a, alpha_s, ms.s, shift_s - shift_t);
        b = moved(b, alpha_t, mt.s, shift_t - shift_s);
        if constexpr (WITH_STATS) mt.c = moved(mt.c, alpha_t, mt.s, shift_t);
        mt.s *= alpha_t;
        mt.m = new_mt;
      }
      if constexpr (WITH_TOPK) ms.c = moved(ms.c, alpha_s, ms.s, shift_s);
      ms.s *= alpha_s;
      ms.m = new_ms;
      if constexpr (CACHE) cache.centers[v0 / kBlock] = center_s;

      vf s_s = splat(0.0f), c_s = s_s, s_t = s_s, c_t = s_s, a_b = s_s, b_b = s_s;
      const vf zero = s_s;
      for (int64_t i = 0; i < n; i += kLanes) {
        const vf d_s = vload(zs + i) * o_.inv_tau - center_s;
        const vf e_s = exp_v(d_s);
        if constexpr (CACHE) vstore(cache.exps + v0 + i, e_s);
        s_s += e_s;
        if constexpr (WITH_TOPK) c_s += select(e_s > 0.0f, e_s * d_s, zero);
        if constexpr (HAS_TEACHER) {
          const vf d_t = vload(zt + i) * o_.inv_tau - center_t;
          const vf e_t = exp_v(d_t);
          const vf d_st = d_s - d_t;  // d_t - d_s is -d_st exactly
          s_t += e_t;
          a_b += select(e_s > 0.0f, e_s * d_st, zero);
          b_b -= select(e_t > 0.0f, e_t * d_st, zero);
          if constexpr (WITH_STATS) c_t += select(e_t > 0.0f, e_t * d_t, zero);
        }
      }
      ms.s += hsum(s_s);
      if constexpr (WITH_TOPK) ms.c += hsum(c_s);
      if constexpr (HAS_TEACHER) {
        mt.s += hsum(s_t);
        if constexpr (WITH_STATS) mt.c += hsum(c_t);
        a += hsum(a_b);
        b += hsum(b_b);
      }
      if constexpr (WITH_TOPK) top_s_.scan(zs, n, v0);
      if constexpr (WITH_STATS) top_t_.scan(zt, n, v0);
    }
  }

  // overlap, m_p, m_q, A of one row from both top-k lists (see kernels/row_stats.py).
  void overlap_stats(float m_s, float log_s_s, float m_t, float log_s_t, float* f) const {
    const int64_t k = o_.k;
    const TopK &ts = top_s_, &tt = top_t_;
    float mass_p = 0.0f, mass_q = 0.0f;
    int64_t shared = 0;
    std::vector<float> log_p(k), log_q(k);
    std::vector<bool> in_both(k, false);
    for (int64_t i = 0; i < k; ++i) {
      for (int64_t j = 0; j < k; ++j) {
        if (ts.ids[i] == tt.ids[j]) {
          in_both[i] = true;
          log_p[i] = (ts.values[i] * o_.inv_tau - m_s) - log_s_s;
          log_q[i] = (tt.values[j] * o_.inv_tau - m_t) - log_s_t;
          mass_p += std::exp(log_p[i]);
          mass_q += std::exp(log_q[i]);
          ++shared;
          break;
        }
      }
    }
    float terms = 0.0f;
    const float log_mass_p = std::log(mass_p), log_mass_q = std::log(mass_q);
    for (int64_t i = 0; i < k; ++i) {
      if (!in_both[i]) continue;
      const float p = std::exp(log_p[i]);
      if (p > 0.0f) terms += (p / mass_p) * ((log_q[i] - log_mass_q) - (log_p[i] - log_mass_p));
    }
    f[kOverlap] = static_cast<float>(shared) / static_cast<float>(k);
    f[kMassS] = mass_p;
    f[kMassT] = mass_q;
    f[kAdvantage] = shared > 0 ? terms / static_cast<float>(shared) : kNaN;
  }

  const Options& o_;
  std::vector<float> zs_, zt_;  // kBlock: whole vectors
  TopK top_s_, top_t_;
};

}  // namespace opd
