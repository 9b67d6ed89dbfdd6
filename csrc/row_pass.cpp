// The one forward read of logits rows on the CPU: the per-row quantities of
// kernels/row_stats.py (the same fields, in the order of kernels/row_fields.py), by the same
// online algorithm. A row is read in blocks of kBlock elements; per block the max is found
// first (the block is then in L1) and the running state (m, s, c of each model, a, b) moves to
// the new max once, by ``moved`` of kernels/online_softmax.py; then one exp an element and model
// accumulates it. Rows run in parallel (at::parallel_for); nothing of size [N, V] is written.
// The running top-k keeps the k largest soft-capped logits (a tie goes to the lower id, as the
// reference's stable sort); a vector of a block whose lanes do not beat the k-th value costs
// one comparison.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "opd_math.h"

namespace opd {
namespace {

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

// One row's running state over its blocks; WITH_C: the entropy accumulators (the student's with
// a top-k, the teacher's for the statistics).
template <typename T, bool HAS_TEACHER, bool WITH_TOPK, bool WITH_STATS>
void read_row(const T* zs_row, const T* zt_row, const Options& o, State& ms, State& mt, float& a,
              float& b, TopK& top_s, TopK& top_t, float* buffer_s, float* buffer_t) {
  for (int64_t v0 = 0; v0 < o.vocab; v0 += kBlock) {
    const int64_t n = std::min(kBlock, o.vocab - v0);
    const float* zs = load_block(zs_row + v0, n, o.cap_s, buffer_s);
    const float* zt = nullptr;
    // rounding is monotone: the max of z / tau is the max of z, over tau
    const float new_ms = max_f(ms.m, block_max(zs, n) * o.inv_tau);
    const float shift_s = ms.m == new_ms ? 0.0f : ms.m - new_ms;
    const float center_s = new_ms == -kInf ? 0.0f : new_ms;
    const float alpha_s = exp_v(splat(ms.m - center_s))[0];
    float new_mt = -kInf, shift_t = 0.0f, center_t = 0.0f, alpha_t = 0.0f;
    if constexpr (HAS_TEACHER) {
      zt = load_block(zt_row + v0, n, o.cap_t, buffer_t);
      new_mt = max_f(mt.m, block_max(zt, n) * o.inv_tau);
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

    vf s_s = splat(0.0f), c_s = s_s, s_t = s_s, c_t = s_s, a_b = s_s, b_b = s_s;
    const vf zero = s_s;
    for (int64_t i = 0; i < n; i += kLanes) {
      const vf d_s = vload(zs + i) * o.inv_tau - center_s;
      const vf e_s = exp_v(d_s);
      s_s += e_s;
      if constexpr (WITH_TOPK) c_s += select(e_s > 0.0f, e_s * d_s, zero);
      if constexpr (HAS_TEACHER) {
        const vf d_t = vload(zt + i) * o.inv_tau - center_t;
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
    if constexpr (WITH_TOPK) top_s.scan(zs, n, v0);
    if constexpr (WITH_STATS) top_t.scan(zt, n, v0);
  }
}

// overlap, m_p, m_q, A of one row from both top-k lists (see kernels/row_stats.py).
void overlap_stats(const TopK& ts, const TopK& tt, const Options& o, float m_s, float log_s_s,
                   float m_t, float log_s_t, float* f) {
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

template <typename T, bool HAS_TEACHER, bool WITH_TOPK, bool WITH_STATS>
void run_rows(const at::Tensor& student, const c10::optional<at::Tensor>& teacher,
              const int64_t* tokens, const bool* mask, const Options& o, float* fields,
              int64_t* top_ids) {
  const int64_t n_rows = student.size(0);
  const T* s_ptr = student.const_data_ptr<T>();
  const T* t_ptr = HAS_TEACHER ? teacher->const_data_ptr<T>() : nullptr;
  const int64_t stride_s = student.stride(0), stride_t = HAS_TEACHER ? teacher->stride(0) : 0;
  at::parallel_for(0, n_rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> zs(kBlock), zt(HAS_TEACHER ? kBlock : 0);  // kBlock: whole vectors
    TopK top_s(WITH_TOPK ? o.k : 0), top_t(WITH_STATS ? o.k : 0);
    float f[kNumFields];
    for (int64_t row = begin; row < end; ++row) {
      int64_t* ids = top_ids + row * o.k;
      if (mask != nullptr && !mask[row]) {  // not read: loss fields 0, statistics NaN, ids 0
        for (int i = 0; i < kNumFields; ++i) fields[i * n_rows + row] = i < kEntropyS ? 0.0f : kNaN;
        std::fill(ids, ids + o.k, 0);
        continue;
      }
      State ms, mt;
      float a = 0.0f, b = 0.0f;
      top_s.reset();
      top_t.reset();
      const T* zs_row = s_ptr + row * stride_s;
      const T* zt_row = HAS_TEACHER ? t_ptr + row * stride_t : nullptr;
      read_row<T, HAS_TEACHER, WITH_TOPK, WITH_STATS>(zs_row, zt_row, o, ms, mt, a, b, top_s,
                                                      top_t, zs.data(), zt.data());
      std::fill(f, f + kNumFields, 0.0f);  // a field this pass does not compute holds 0
      const float log_s_s = std::log(ms.s);
      f[kLseS] = ms.m + log_s_s;
      f[kMaxS] = ms.m;
      f[kLogsumS] = log_s_s;
      int64_t token = 0;
      if (tokens != nullptr) {
        token = tokens[row];
        TORCH_CHECK(0 <= token && token < o.vocab, "tokens must lie in [0, ", o.vocab, "), got ",
                    token);
        f[kLogprobS] = (capped_one(load_one(zs_row + token), o.cap_s) * o.inv_tau - ms.m) - log_s_s;
      }
      if constexpr (HAS_TEACHER) {
        const float log_s_t = std::log(mt.s);
        f[kLseT] = mt.m + log_s_t;
        f[kMaxT] = mt.m;
        f[kLogsumT] = log_s_t;
        f[kKl] = a / ms.s - log_s_s + log_s_t;
        f[kForwardKl] = b / mt.s - log_s_t + log_s_s;
        if (tokens != nullptr)
          f[kLogprobT] = (capped_one(load_one(zt_row + token), o.cap_t) * o.inv_tau - mt.m) - log_s_t;
        if constexpr (WITH_STATS) {
          f[kEntropyT] = log_s_t - mt.c / mt.s;
          overlap_stats(top_s, top_t, o, ms.m, log_s_s, mt.m, log_s_t, f);
        }
      }
      if constexpr (WITH_TOPK) {
        f[kEntropyS] = log_s_s - ms.c / ms.s;
        std::copy(top_s.ids.begin(), top_s.ids.end(), ids);
      }
      for (int i = 0; i < kNumFields; ++i) fields[i * n_rows + row] = f[i];
    }
  });
}

template <typename T>
void dispatch(const at::Tensor& student, const c10::optional<at::Tensor>& teacher,
              const int64_t* tokens, const bool* mask, const Options& o, float* fields,
              int64_t* top_ids) {
  const bool has_teacher = teacher.has_value(), with_topk = o.k > 0;
  if (has_teacher && with_topk)
    run_rows<T, true, true, true>(student, teacher, tokens, mask, o, fields, top_ids);
  else if (has_teacher)
    run_rows<T, true, false, false>(student, teacher, tokens, mask, o, fields, top_ids);
  else if (with_topk)
    run_rows<T, false, true, false>(student, teacher, tokens, mask, o, fields, top_ids);
  else
    run_rows<T, false, false, false>(student, teacher, tokens, mask, o, fields, top_ids);
}

std::tuple<at::Tensor, at::Tensor> row_pass(const at::Tensor& student,
                                            const c10::optional<at::Tensor>& teacher,
                                            const c10::optional<at::Tensor>& tokens,
                                            const c10::optional<at::Tensor>& mask, int64_t k,
                                            double temperature, double cap_s, double cap_t) {
  check_rows(student, "student");
  const int64_t n = student.size(0), vocab = student.size(1);
  if (teacher) {
    check_rows(*teacher, "teacher");
    TORCH_CHECK(teacher->sizes() == student.sizes() && teacher->scalar_type() == student.scalar_type(),
                "teacher must match the student's shape and dtype");
  }
  check_row_vector(tokens, n, "tokens", at::kLong);
  check_row_vector(mask, n, "mask", at::kBool);
  TORCH_CHECK(0 <= k && k <= vocab, "k must lie in [0, ", vocab, "], got ", k);
  TORCH_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
  auto fields = at::empty({kNumFields, n}, student.options().dtype(at::kFloat));
  auto top_ids = at::empty({n, k}, student.options().dtype(at::kLong));
  if (n == 0) return {fields, top_ids};
  TORCH_CHECK(vocab > 0, "the vocabulary must not be empty");
  const Options o{vocab, k, static_cast<float>(1.0 / temperature), static_cast<float>(cap_s),
                  static_cast<float>(cap_t)};
  const int64_t* token_ptr = tokens ? tokens->const_data_ptr<int64_t>() : nullptr;
  const bool* mask_ptr = mask ? mask->const_data_ptr<bool>() : nullptr;
  if (student.scalar_type() == at::kBFloat16)
    dispatch<c10::BFloat16>(student, teacher, token_ptr, mask_ptr, o, fields.data_ptr<float>(),
                            top_ids.data_ptr<int64_t>());
  else
    dispatch<float>(student, teacher, token_ptr, mask_ptr, o, fields.data_ptr<float>(),
                    top_ids.data_ptr<int64_t>());
  return {fields, top_ids};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(opd_kernels, m) {
  m.def("row_pass(Tensor student, Tensor? teacher, Tensor? tokens, Tensor? mask, int k, "
        "float temperature, float cap_s, float cap_t) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(opd_kernels, CPU, m) { m.impl("row_pass", &row_pass); }

}  // namespace opd
