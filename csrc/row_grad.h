// The dense gradient of an objective's GradForm on one block of a row (kernels/row_grad.py's
// math), shared by the logits backward (row_grad.cpp) and the fused-linear one
// (linear_pass.cpp). log p = (x - max_s) - logsum_s from the row pass's split lse (fields max_s,
// logsum_s: an fp32 lse near |x| = 1e4 is off by ~1e-3), likewise log q.
#pragma once

#include <cmath>
#include <type_traits>

#include "opd_math.h"
#include "row_state.h"

namespace opd {

struct RowNorms {
  const float* fields;
  int64_t n;
  float max_s(int64_t r) const { return fields[kMaxS * n + r]; }
  float logsum_s(int64_t r) const { return fields[kLogsumS * n + r]; }
  float max_t(int64_t r) const { return fields[kMaxT * n + r]; }
  float logsum_t(int64_t r) const { return fields[kLogsumT * n + r]; }
};

inline void check_fields(const at::Tensor& fields, int64_t rows) {
  TORCH_CHECK(fields.dim() == 2 && fields.size(1) == rows && fields.size(0) > kLogsumT &&
                  fields.is_contiguous() && fields.scalar_type() == at::kFloat,
              "fields must be the row pass's contiguous float32 [fields, rows] output");
}

inline void check_pair(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& fields) {
  check_rows(student, "student");
  check_rows(teacher, "teacher");
  TORCH_CHECK(teacher.sizes() == student.sizes() && teacher.scalar_type() == student.scalar_type(),
              "teacher must match the student's shape and dtype");
  check_fields(fields, student.size(0));
}

// One dense-gradient call's per-row and per-call numbers.
struct GradArgs {
  RowNorms norms;
  const float* shift;
  const float* scale;
  const bool* mask;
  float inv_tau, cap_s, cap_t, w_reverse, w_forward, w_mixture, log_beta, log_1m_beta;

  bool counted(int64_t row) const { return mask == nullptr || mask[row]; }
};

// The GradArgs of the ops' arguments, checked (the shapes of the row vectors, beta).
inline GradArgs grad_args(const at::Tensor& fields, int64_t n, const at::Tensor& shift,
                          const at::Tensor& scale, const c10::optional<at::Tensor>& mask,
                          double temperature, double cap_s, double cap_t, double w_reverse,
                          double w_forward, double w_mixture, double beta) {
  check_row_vector(shift, n, "shift", at::kFloat);
  check_row_vector(scale, n, "scale", at::kFloat);
  check_row_vector(mask, n, "mask", at::kBool);
  TORCH_CHECK(w_mixture == 0 || (0 < beta && beta < 1),
              "beta must lie strictly inside (0, 1), got ", beta);
  const bool mixture = w_mixture != 0;
  return GradArgs{RowNorms{fields.const_data_ptr<float>(), n}, shift.const_data_ptr<float>(),
                  scale.const_data_ptr<float>(), mask ? mask->const_data_ptr<bool>() : nullptr,
                  static_cast<float>(1.0 / temperature), static_cast<float>(cap_s),
                  static_cast<float>(cap_t), static_cast<float>(w_reverse),
                  static_cast<float>(w_forward), static_cast<float>(w_mixture),
                  mixture ? static_cast<float>(std::log(beta)) : 0.0f,
                  mixture ? static_cast<float>(std::log1p(-beta)) : 0.0f};
}

// dL/dz of one block of row ``row`` (kernels/row_grad.py): p (shift + w_r (log p - log q)
// + w_m (log p - log m)) + w_q q, times the row's scale and the soft-cap's derivative, into g.
// z_s, z_t: the block as load_block gives it (fp32, capped, whole vectors).
template <bool HAS_TEACHER, bool HAS_MIXTURE>
OPD_INLINE void grad_block(const float* z_s_block, const float* z_t_block, int64_t n, int64_t row,
                           const GradArgs& a, float* g) {
  const float max_s = a.norms.max_s(row), logsum_s = a.norms.logsum_s(row);
  const float max_t = HAS_TEACHER ? a.norms.max_t(row) : 0.0f;
  const float logsum_t = HAS_TEACHER ? a.norms.logsum_t(row) : 0.0f;
  const float row_shift = a.shift[row], row_scale = a.scale[row], inv_tau = a.inv_tau;
  const vf zero = splat(0.0f);
  for (int64_t i = 0; i < n; i += kLanes) {
    const vf z_s = vload(z_s_block + i);
    const vf log_p = (z_s * inv_tau - max_s) - logsum_s;
    const vf p = exp_v(log_p);
    vf coef = splat(row_shift), extra = zero;
    if constexpr (HAS_TEACHER) {
      const vf log_q = (vload(z_t_block + i) * inv_tau - max_t) - logsum_t;
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
    vstore(g + i, grad);
  }
}

// Calls fn(has_teacher, has_mixture) with std::bool_constant arguments for the call's form, so
// a generic lambda instantiates grad_block<decltype(has_teacher)::value, ...> for it.
template <typename Fn>
void dispatch_form(bool has_teacher, const GradArgs& a, Fn&& fn) {
  if (!has_teacher)
    fn(std::false_type{}, std::false_type{});
  else if (a.w_mixture != 0.0f)
    fn(std::true_type{}, std::true_type{});
  else
    fn(std::true_type{}, std::false_type{});
}

}  // namespace opd
