// The second reads of logits rows on the CPU, after the row pass: the generalized JSD's mixture
// sums (kernels/row_mixture.py) and the dense gradient of an objective's GradForm (row_grad.h),
// with the same math. Rows with mask False are not read: their sums are 0 and their gradient
// row zeros.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "row_grad.h"

namespace opd {
namespace {

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

template <typename T, typename G>
void grad_rows(const at::Tensor& student, const c10::optional<at::Tensor>& teacher,
               const GradArgs& a, at::Tensor& out) {
  const int64_t n = student.size(0), vocab = student.size(1);
  const T* s_ptr = student.const_data_ptr<T>();
  const T* t_ptr = teacher ? teacher->const_data_ptr<T>() : nullptr;
  G* g_ptr = out.data_ptr<G>();
  dispatch_form(teacher.has_value(), a, [&](auto has_teacher, auto has_mixture) {
    constexpr bool HAS_TEACHER = decltype(has_teacher)::value;
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> zs(kBlock), zt(HAS_TEACHER ? kBlock : 0), g(kBlock);
      for (int64_t row = begin; row < end; ++row) {
        G* g_row = g_ptr + row * out.stride(0);
        const bool counted = a.counted(row);
        if (!counted) std::fill(g.begin(), g.end(), 0.0f);
        for (int64_t v0 = 0; v0 < vocab; v0 += kBlock) {
          const int64_t m = std::min(kBlock, vocab - v0);
          if (counted) {
            const float* z_s = load_block(s_ptr + row * student.stride(0) + v0, m, a.cap_s, zs.data());
            const float* z_t = HAS_TEACHER
                ? load_block(t_ptr + row * teacher->stride(0) + v0, m, a.cap_t, zt.data()) : nullptr;
            grad_block<HAS_TEACHER, decltype(has_mixture)::value>(z_s, z_t, m, row, a, g.data());
          }
          store_block(g_row + v0, g.data(), m);
        }
      }
    });
  });
}

void dense_grad(const at::Tensor& student, const c10::optional<at::Tensor>& teacher,
                const at::Tensor& fields, const at::Tensor& shift, const at::Tensor& scale,
                const c10::optional<at::Tensor>& mask, double temperature, double cap_s,
                double cap_t, double w_reverse, double w_forward, double w_mixture, double beta,
                at::Tensor out) {
  check_rows(student, "student");
  check_pair(student, teacher ? *teacher : student, fields);
  const int64_t n = student.size(0);
  const GradArgs a = grad_args(fields, n, shift, scale, mask, temperature, cap_s, cap_t, w_reverse,
                               w_forward, w_mixture, beta);
  TORCH_CHECK(out.sizes() == student.sizes() && (out.size(1) <= 1 || out.stride(1) == 1),
              "out must be a [rows, vocab] tensor with a contiguous last axis");
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16,
              "out must be float32 or bfloat16, got ", out.scalar_type());
  if (n == 0) return;
  const bool bf16_in = student.scalar_type() == at::kBFloat16;
  const bool bf16_out = out.scalar_type() == at::kBFloat16;
  if (bf16_in && bf16_out)
    grad_rows<c10::BFloat16, c10::BFloat16>(student, teacher, a, out);
  else if (bf16_in)
    grad_rows<c10::BFloat16, float>(student, teacher, a, out);
  else if (bf16_out)
    grad_rows<float, c10::BFloat16>(student, teacher, a, out);
  else
    grad_rows<float, float>(student, teacher, a, out);
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
