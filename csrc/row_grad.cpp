// The second reads of logits rows on the CPU, after the row pass: the generalized JSD's mixture
// sums (kernels/row_mixture.py) and the dense gradient of an objective's GradForm
// (kernels/row_grad.py), with the same math. log p = (x - max_s) - logsum_s from the row pass's
// split lse (fields max_s, logsum_s: an fp32 lse near |x| = 1e4 is off by ~1e-3), likewise
// log q. Rows with mask False are not read: their sums are 0 and their gradient row zeros.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "opd_math.h"

namespace opd {
namespace {

// Rows of the row pass's fields (kernels/row_fields.py) that these passes read.
constexpr int64_t kMaxS = 2, kMaxT = 3, kLogsumS = 4, kLogsumT = 5;

struct RowNorms {
  const float* fields;
  int64_t n;
  float max_s(int64_t r) const { return fields[kMaxS * n + r]; }
  float logsum_s(int64_t r) const { return fields[kLogsumS * n + r]; }
  float max_t(int64_t r) const { return fields[kMaxT * n + r]; }
  float logsum_t(int64_t r) const { return fields[kLogsumT * n + r]; }
};

void check_pair(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& fields) {
  check_rows(student, "student");
  check_rows(teacher, "teacher");
  TORCH_CHECK(teacher.sizes() == student.sizes() && teacher.scalar_type() == student.scalar_type(),
              "teacher must match the student's shape and dtype");
  TORCH_CHECK(fields.dim() == 2 && fields.size(1) == student.size(0) && fields.size(0) > kLogsumT &&
                  fields.is_contiguous() && fields.scalar_type() == at::kFloat,
              "fields must be the row pass's contiguous float32 [fields, rows] output");
}

template <typename T>
void mixture_rows(const at::Tensor& student, const at::Tensor& teacher, const RowNorms& norms,
                  const bool* mask, float inv_tau, float cap_s, float cap_t, float log_beta,
                  float log_1m_beta, float* out) {
  const int64_t n = student.size(0), vocab = student.size(1);
  const T* s_ptr = student.const_data_ptr<T>();
  const T* t_ptr = teacher.const_data_ptr<T>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> zs(kBlock), zt(kBlock);
    for (int64_t row = begin; row < end; ++row) {
      float j_p = 0.0f, j_q = 0.0f;
      if (mask == nullptr || mask[row]) {
        const float max_s = norms.max_s(row), logsum_s = norms.logsum_s(row);
        const float max_t = norms.max_t(row), logsum_t = norms.logsum_t(row);
        for (int64_t v0 = 0; v0 < vocab; v0 += kBlock) {
          const int64_t m = std::min(kBlock, vocab - v0);
          const float* z_s = load_block(s_ptr + row * student.stride(0) + v0, m, cap_s, zs.data());
          const float* z_t = load_block(t_ptr + row * teacher.stride(0) + v0, m, cap_t, zt.data());
          vf bp = splat(0.0f), bq = bp;
          const vf zero = bp;
          for (int64_t i = 0; i < m; i += kLanes) {
            const vf log_p = (vload(z_s + i) * inv_tau - max_s) - logsum_s;
            const vf log_q = (vload(z_t + i) * inv_tau - max_t) - logsum_t;
            const vf log_m = log_mixture_v(log_p, log_q, log_beta, log_1m_beta);
            const vf p = exp_v(log_p), q = exp_v(log_q);
            bp += select(p > 0.0f, p * (log_p - log_m), zero);
            bq += select(q > 0.0f, q * (log_q - log_m), zero);
          }
          j_p += hsum(bp);
          j_q += hsum(bq);
        }
      }
      out[row] = j_p;
      out[n + row] = j_q;
    }
  });
}

at::Tensor mixture(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& fields,
                   const c10::optional<at::Tensor>& mask, double temperature, double cap_s,
                   double cap_t, double beta) {
  check_pair(student, teacher, fields);
  check_row_vector(mask, student.size(0), "mask", at::kBool);
  TORCH_CHECK(0 < beta && beta < 1, "beta must lie strictly inside (0, 1), got ", beta);
  auto out = at::empty({2, student.size(0)}, student.options().dtype(at::kFloat));
  const RowNorms norms{fields.const_data_ptr<float>(), student.size(0)};
  const bool* mask_ptr = mask ? mask->const_data_ptr<bool>() : nullptr;
  const float inv_tau = static_cast<float>(1.0 / temperature);
  const float log_beta = static_cast<float>(std::log(beta)), log_1m = static_cast<float>(std::log1p(-beta));
  if (student.scalar_type() == at::kBFloat16)
    mixture_rows<c10::BFloat16>(student, teacher, norms, mask_ptr, inv_tau, cap_s, cap_t, log_beta,
                                log_1m, out.data_ptr<float>());
  else
    mixture_rows<float>(student, teacher, norms, mask_ptr, inv_tau, cap_s, cap_t, log_beta, log_1m,
                        out.data_ptr<float>());
  return out;
}

// One dense_grad call's per-row and per-call numbers.
struct GradArgs {
  RowNorms norms;
  const float* shift;
  const float* scale;
  const bool* mask;
  float inv_tau, cap_s, cap_t, w_reverse, w_forward, w_mixture, log_beta, log_1m_beta;
};

// dL/dz of every element (kernels/row_grad.py): p (shift + w_r (log p - log q)
// + w_m (log p - log m)) + w_q q, times the row's scale and the soft-cap's derivative.
template <typename T, typename G, bool HAS_TEACHER, bool HAS_MIXTURE>
void grad_rows(const at::Tensor& student, const c10::optional<at::Tensor>& teacher,
               const GradArgs& a, at::Tensor& out) {
  const int64_t n = student.size(0), vocab = student.size(1);
  const T* s_ptr = student.const_data_ptr<T>();
  const T* t_ptr = HAS_TEACHER ? teacher->const_data_ptr<T>() : nullptr;
  G* g_ptr = out.data_ptr<G>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> zs(kBlock), zt(HAS_TEACHER ? kBlock : 0), g(kBlock);
    for (int64_t row = begin; row < end; ++row) {
      G* g_row = g_ptr + row * out.stride(0);
      if (a.mask != nullptr && !a.mask[row]) {
        std::fill(g.begin(), g.end(), 0.0f);
        for (int64_t v0 = 0; v0 < vocab; v0 += kBlock)
          store_block(g_row + v0, g.data(), std::min(kBlock, vocab - v0));
        continue;
      }
      const float max_s = a.norms.max_s(row), logsum_s = a.norms.logsum_s(row);
      const float max_t = HAS_TEACHER ? a.norms.max_t(row) : 0.0f;
      const float logsum_t = HAS_TEACHER ? a.norms.logsum_t(row) : 0.0f;
      const float row_shift = a.shift[row], row_scale = a.scale[row], inv_tau = a.inv_tau;
      for (int64_t v0 = 0; v0 < vocab; v0 += kBlock) {
        const int64_t m = std::min(kBlock, vocab - v0);
        const float* z_s_row = load_block(s_ptr + row * student.stride(0) + v0, m, a.cap_s, zs.data());
        const float* z_t_row = nullptr;
        if constexpr (HAS_TEACHER)
          z_t_row = load_block(t_ptr + row * teacher->stride(0) + v0, m, a.cap_t, zt.data());
        const vf zero = splat(0.0f);
        for (int64_t i = 0; i < m; i += kLanes) {
          const vf z_s = vload(z_s_row + i);
          const vf log_p = (z_s * inv_tau - max_s) - logsum_s;
          const vf p = exp_v(log_p);
          vf coef = splat(row_shift), extra = zero;
          if constexpr (HAS_TEACHER) {
            const vf log_q = (vload(z_t_row + i) * inv_tau - max_t) - logsum_t;
            if (a.w_reverse != 0.0f) coef += a.w_reverse * (log_p - log_q);
            if constexpr (HAS_MIXTURE)
              coef += a.w_mixture * (log_p - log_mixture_v(log_p, log_q, a.log_beta, a.log_1m_beta));
            if (a.w_forward != 0.0f) extra = a.w_forward * exp_v(log_q);
          }
          vf grad = (select(p > 0.0f, p * coef, zero) + extra) * row_scale;
          if (a.cap_s > 0.0f) {
            const vf r = z_s / a.cap_s;
            grad *= 1.0f - r * r;
          }
          vstore(g.data() + i, grad);
        }
        store_block(g_row + v0, g.data(), m);
      }
    }
  });
}

template <typename T, typename G>
void grad_dispatch(const at::Tensor& student, const c10::optional<at::Tensor>& teacher,
                   const GradArgs& a, at::Tensor& out) {
  if (!teacher)
    grad_rows<T, G, false, false>(student, teacher, a, out);
  else if (a.w_mixture != 0.0f)
    grad_rows<T, G, true, true>(student, teacher, a, out);
  else
    grad_rows<T, G, true, false>(student, teacher, a, out);
}

void dense_grad(const at::Tensor& student, const c10::optional<at::Tensor>& teacher,
                const at::Tensor& fields, const at::Tensor& shift, const at::Tensor& scale,
                const c10::optional<at::Tensor>& mask, double temperature, double cap_s,
                double cap_t, double w_reverse, double w_forward, double w_mixture, double beta,
                at::Tensor out) {
  check_rows(student, "student");
  check_pair(student, teacher ? *teacher : student, fields);
  const int64_t n = student.size(0);
  check_row_vector(shift, n, "shift", at::kFloat);
  check_row_vector(scale, n, "scale", at::kFloat);
  check_row_vector(mask, n, "mask", at::kBool);
  TORCH_CHECK(out.sizes() == student.sizes() && (out.size(1) <= 1 || out.stride(1) == 1),
              "out must be a [rows, vocab] tensor with a contiguous last axis");
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16,
              "out must be float32 or bfloat16, got ", out.scalar_type());
  TORCH_CHECK(w_mixture == 0 || (0 < beta && beta < 1),
              "beta must lie strictly inside (0, 1), got ", beta);
  if (n == 0) return;
  const bool mixture = w_mixture != 0;
  const GradArgs a{RowNorms{fields.const_data_ptr<float>(), n}, shift.const_data_ptr<float>(),
                   scale.const_data_ptr<float>(), mask ? mask->const_data_ptr<bool>() : nullptr,
                   static_cast<float>(1.0 / temperature), static_cast<float>(cap_s),
                   static_cast<float>(cap_t), static_cast<float>(w_reverse),
                   static_cast<float>(w_forward), static_cast<float>(w_mixture),
                   mixture ? static_cast<float>(std::log(beta)) : 0.0f,
                   mixture ? static_cast<float>(std::log1p(-beta)) : 0.0f};
  const bool bf16_in = student.scalar_type() == at::kBFloat16;
  const bool bf16_out = out.scalar_type() == at::kBFloat16;
  if (bf16_in && bf16_out)
    grad_dispatch<c10::BFloat16, c10::BFloat16>(student, teacher, a, out);
  else if (bf16_in)
    grad_dispatch<c10::BFloat16, float>(student, teacher, a, out);
  else if (bf16_out)
    grad_dispatch<float, c10::BFloat16>(student, teacher, a, out);
  else
    grad_dispatch<float, float>(student, teacher, a, out);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(opd_kernels, m) {
  m.def("mixture(Tensor student, Tensor teacher, Tensor fields, Tensor? mask, float temperature, "
        "float cap_s, float cap_t, float beta) -> Tensor");
  m.def("dense_grad(Tensor student, Tensor? teacher, Tensor fields, Tensor shift, Tensor scale, "
        "Tensor? mask, float temperature, float cap_s, float cap_t, float w_reverse, "
        "float w_forward, float w_mixture, float beta, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(opd_kernels, CPU, m) {
  m.impl("mixture", &mixture);
  m.impl("dense_grad", &dense_grad);
}

}  // namespace opd
