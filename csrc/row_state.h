// One row's running state of the forward read (kernels/row_stats.py's online algorithm), shared
// by the logits row pass (row_pass.cpp) and the fused-linear one (linear_pass.cpp): the blocks of
// a row are added in ascending vocabulary order, or read in parts whose states are merged.
// Per block the max is found first (the block is then in L1) and the state (m, s, c of each
// model, a, b) moves to the new max once, by ``moved`` of kernels/online_softmax.py; then one
// exp an element and model accumulates it. The running top-k keeps the k largest soft-capped
// logits (a tie goes to the lower id, as the reference's stable sort); a vector of a block whose
// lanes do not beat the k-th value costs one comparison.
#pragma once

#include <algorithm>
#include <type_traits>
#include <vector>

#include "opd_math.h"

namespace opd {

// The rows of the row pass's output, in the order of kernels/row_fields.py.
enum Field : int {
  kLseS, kLseT, kMaxS, kMaxT, kLogsumS, kLogsumT, kKl, kForwardKl, kLogprobS, kLogprobT,
  kEntropyS, kEntropyT, kOverlap, kMassS, kMassT, kAdvantage, kNumFields
};

struct Options {
  int64_t vocab, k;
  float inv_tau, cap_s, cap_t;
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

  // The list of a later part of the stream (every id above this list's): its entries in their
  // order, so equal values still keep the lower id.
  void merge(const TopK& later) {
    for (int64_t i = 0; i < later.count; ++i) insert(later.values[i], later.ids[i]);
  }
};

struct State {
  float m = -kInf, s = 0.0f, c = 0.0f;
};

OPD_INLINE float moved(float acc, float alpha, float s_old, float shift) {
  const float moved_acc = acc + (s_old > 0.0f ? s_old * shift : 0.0f);
  return alpha > 0.0f ? alpha * moved_acc : 0.0f;
}

// A model's move to a new running max: the old max's shift and the factor e^{m - new m} (0 from
// an empty state), with the center the new max (0 while it is -inf: no block has a finite value).
struct Move {
  float shift, center, alpha;

  static OPD_INLINE Move of(float m, float new_m) {
    const float center = new_m == -kInf ? 0.0f : new_m;
    return {m == new_m ? 0.0f : m - new_m, center, exp_v(splat(m - center))[0]};
  }
};

// The running state of one row: WITH_TOPK keeps the student's top-k and entropy accumulator,
// WITH_STATS the teacher's (for the statistics).
template <bool HAS_TEACHER, bool WITH_TOPK, bool WITH_STATS>
struct RowState {
  State ms, mt;
  float a = 0.0f, b = 0.0f;  // sum e^{d_s} (d_s - d_t), sum e^{d_t} (d_t - d_s)
  TopK top_s, top_t;

  explicit RowState(int64_t k) : top_s(WITH_TOPK ? k : 0), top_t(WITH_STATS ? k : 0) {}

  void reset() {
    ms = mt = State{};
    a = b = 0.0f;
    top_s.reset();
    top_t.reset();
  }

  // Moves every accumulator to the new maxima (the teacher's ignored without one).
  OPD_INLINE void move_to(float new_ms, float new_mt, Move& s, Move& t) {
    s = Move::of(ms.m, new_ms);
    t = HAS_TEACHER ? Move::of(mt.m, new_mt) : Move{0.0f, 0.0f, 0.0f};
    if constexpr (HAS_TEACHER) {
      a = moved(a, s.alpha, ms.s, s.shift - t.shift);
      b = moved(b, t.alpha, mt.s, t.shift - s.shift);
      if constexpr (WITH_STATS) mt.c = moved(mt.c, t.alpha, mt.s, t.shift);
      mt.s *= t.alpha;
      mt.m = new_mt;
    }
    if constexpr (WITH_TOPK) ms.c = moved(ms.c, s.alpha, ms.s, s.shift);
    ms.s *= s.alpha;
    ms.m = new_ms;
  }

  // One block of each model (fp32, padded to whole vectors with -inf by load_block) whose ids
  // start at ``first``.
  void add_block(const float* zs, const float* zt, int64_t n, int64_t first, const Options& o) {
    // rounding is monotone: the max of z / tau is the max of z, over tau
    const float new_ms = max_f(ms.m, block_max(zs, n) * o.inv_tau);
    const float new_mt = HAS_TEACHER ? max_f(mt.m, block_max(zt, n) * o.inv_tau) : -kInf;
    Move s, t;
    move_to(new_ms, new_mt, s, t);
    vf s_s = splat(0.0f), c_s = s_s, s_t = s_s, c_t = s_s, a_b = s_s, b_b = s_s;
    const vf zero = s_s;
    for (int64_t i = 0; i < n; i += kLanes) {
      const vf d_s = vload(zs + i) * o.inv_tau - s.center;
      const vf e_s = exp_v(d_s);
      s_s += e_s;
      if constexpr (WITH_TOPK) c_s += select(e_s > 0.0f, e_s * d_s, zero);
      if constexpr (HAS_TEACHER) {
        const vf d_t = vload(zt + i) * o.inv_tau - t.center;
        const vf e_t = exp_v(d_t);
        s_t += e_t;
        a_b += select(e_s > 0.0f, e_s * (d_s - d_t), zero);
        b_b += select(e_t > 0.0f, e_t * (d_t - d_s), zero);
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
    if constexpr (WITH_TOPK) top_s.scan(zs, n, first);
    if constexpr (WITH_STATS) top_t.scan(zt, n, first);
  }

  // The state of a later part of the row (every id above this one's): both move to the common
  // maxima, then add.
  void merge(RowState& later) {
    const float new_ms = max_f(ms.m, later.ms.m), new_mt = max_f(mt.m, later.mt.m);
    Move s, t;
    move_to(new_ms, new_mt, s, t);
    later.move_to(new_ms, new_mt, s, t);
    ms.s += later.ms.s;
    ms.c += later.ms.c;
    mt.s += later.mt.s;
    mt.c += later.mt.c;
    a += later.a;
    b += later.b;
    if constexpr (WITH_TOPK) top_s.merge(later.top_s);
    if constexpr (WITH_STATS) top_t.merge(later.top_t);
  }
};

// overlap, m_p, m_q, A of one row from both top-k lists (see kernels/row_stats.py).
inline void overlap_stats(const TopK& ts, const TopK& tt, const Options& o, float m_s,
                          float log_s_s, float m_t, float log_s_t, float* f) {
  const int64_t k = o.k;
  float mass_p = 0.0f, mass_q = 0.0f;
  int64_t shared = 0;
  std::vector<float> log_p(k), log_q(k);
  std::vector<bool> in_both(k, false);
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      if (ts.ids[i] == tt.ids[j]) {
        in_both[i] = true;
        log_p[i] = (ts.values[i] * o.inv_tau - m_s) - log_s_s;
        log_q[i] = (tt.values[j] * o.inv_tau - m_t) - log_s_t;
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

// A row's fields from its finished state, written to column ``row`` of ``fields`` [kNumFields,
// n_rows], and the student's top-k ids to ``ids``; ``zs_row``, ``zt_row``: the row's logits, for
// the token's (``token`` < 0: none). A row not counted (``counted`` false) is not read: loss
// fields 0, statistics NaN, ids 0.
template <typename T, bool HAS_TEACHER, bool WITH_TOPK, bool WITH_STATS>
void finish_row(const RowState<HAS_TEACHER, WITH_TOPK, WITH_STATS>& st, bool counted,
                const T* zs_row, const T* zt_row, int64_t token, const Options& o, float* fields,
                int64_t row, int64_t n_rows, int64_t* ids) {
  float f[kNumFields];
  if (!counted) {
    for (int i = 0; i < kNumFields; ++i) fields[i * n_rows + row] = i < kEntropyS ? 0.0f : kNaN;
    std::fill(ids, ids + o.k, 0);
    return;
  }
  std::fill(f, f + kNumFields, 0.0f);  // a field this pass does not compute holds 0
  const State& ms = st.ms;
  const State& mt = st.mt;
  const float log_s_s = std::log(ms.s);
  f[kLseS] = ms.m + log_s_s;
  f[kMaxS] = ms.m;
  f[kLogsumS] = log_s_s;
  if (token >= 0)
    f[kLogprobS] = (capped_one(load_one(zs_row + token), o.cap_s) * o.inv_tau - ms.m) - log_s_s;
  if constexpr (HAS_TEACHER) {
    const float log_s_t = std::log(mt.s);
    f[kLseT] = mt.m + log_s_t;
    f[kMaxT] = mt.m;
    f[kLogsumT] = log_s_t;
    f[kKl] = st.a / ms.s - log_s_s + log_s_t;
    f[kForwardKl] = st.b / mt.s - log_s_t + log_s_s;
    if (token >= 0)
      f[kLogprobT] = (capped_one(load_one(zt_row + token), o.cap_t) * o.inv_tau - mt.m) - log_s_t;
    if constexpr (WITH_STATS) {
      f[kEntropyT] = log_s_t - mt.c / mt.s;
      overlap_stats(st.top_s, st.top_t, o, ms.m, log_s_s, mt.m, log_s_t, f);
    }
  }
  if constexpr (WITH_TOPK) {
    f[kEntropyS] = log_s_s - ms.c / ms.s;
    std::copy(st.top_s.ids.begin(), st.top_s.ids.end(), ids);
  }
  for (int i = 0; i < kNumFields; ++i) fields[i * n_rows + row] = f[i];
}

// The row's token, checked (-1 without tokens).
inline int64_t row_token(const int64_t* tokens, int64_t row, int64_t vocab) {
  if (tokens == nullptr) return -1;
  const int64_t token = tokens[row];
  TORCH_CHECK(0 <= token && token < vocab, "tokens must lie in [0, ", vocab, "), got ", token);
  return token;
}

// The checked Options of a row pass over [rows, vocab] logits.
inline Options pass_options(int64_t rows, int64_t vocab, const c10::optional<at::Tensor>& tokens,
                            const c10::optional<at::Tensor>& mask, int64_t k, double temperature,
                            double cap_s, double cap_t) {
  check_row_vector(tokens, rows, "tokens", at::kLong);
  check_row_vector(mask, rows, "mask", at::kBool);
  TORCH_CHECK(0 <= k && k <= vocab, "k must lie in [0, ", vocab, "], got ", k);
  TORCH_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
  return Options{vocab, k, static_cast<float>(1.0 / temperature), static_cast<float>(cap_s),
                 static_cast<float>(cap_t)};
}

// Calls fn(has_teacher, with_topk, with_stats) with std::bool_constant arguments: the statistics
// come with a teacher and a top-k.
template <typename Fn>
void dispatch_pass(bool has_teacher, bool with_topk, Fn&& fn) {
  if (has_teacher && with_topk)
    fn(std::true_type{}, std::true_type{}, std::true_type{});
  else if (has_teacher)
    fn(std::true_type{}, std::false_type{}, std::false_type{});
  else if (with_topk)
    fn(std::false_type{}, std::true_type{}, std::false_type{});
  else
    fn(std::false_type{}, std::false_type{}, std::false_type{});
}

}  // namespace opd
