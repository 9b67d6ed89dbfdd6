// The second reads of logits rows on the CPU, after the row pass: the generalized JSD's mixture
// sums (kernels/row_mixture.py, the same math) and the dense gradient of an objective's GradForm
// (row_grad.h). log p = (x - max_s) - logsum_s from the row pass's split lse, likewise log q.
// Rows with mask False are not read: their sums are 0 and their gradient row zeros.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "row_grad.h"

namespace opd {
namespace {

// The rows of the row pass's fields these passes read.
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
                  const bool* mask, const FormArgs& a, float* out) {
  const int64_t n = student.size(0), vocab = student.size(1);
  const T* s_ptr = student.const_data_ptr<T>();
  const T* t_ptr = teacher.const_data_ptr<T>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    GradBuffers buf;
    for (int64_t row = begin; row < end; ++row) {
      std::pair<float, float> sums{0.0f, 0.0f};
      if (mask == nullptr || mask[row]) {
        const RowArgs r{norms.max_s(row), norms.logsum_s(row), norms.max_t(row),
                        norms.logsum_t(row), 0.0f, 0.0f};
        sums = mixture_row<T, false>(s_ptr + row * student.stride(0),
                                     t_ptr + row * teacher.stride(0), vocab, a, r,
                                     RowCache{nullptr, nullptr, nullptr}, buf);
      }
      out[row] = sums.first;
      out[n + row] = sums.second;
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
  const FormArgs a{static_cast<float>(1.0 / temperature), static_cast<float>(cap_s),
                   static_cast<float>(cap_t), 0.0f, 0.0f, 0.0f,
                   static_cast<float>(std::log(beta)), static_cast<float>(std::log1p(-beta))};
  if (student.scalar_type() == at::kBFloat16)
    mixture_rows<c10::BFloat16>(student, teacher, norms, mask_ptr, a, out.data_ptr<float>());
  else
    mixture_rows<float>(student, teacher, norms, mask_ptr, a, out.data_ptr<float>());
  return out;
}

// The per-row inputs of dense_grad.
struct GradInputs {
  RowNorms norms;
  const float *shift, *scale;
  const bool* mask;
};

// dL/dz of every row (row_grad.h); rows with mask False get zeros.
template <typename T, typename G, bool HAS_TEACHER, bool HAS_MIXTURE>
void grad_rows(const at::Tensor& student, const c10::optional<at::Tensor>& teacher,
               const GradInputs& in, const FormArgs& a, at::Tensor& out) {
  const int64_t n = student.size(0), vocab = student.size(1);
  const T* s_ptr = student.const_data_ptr<T>();
  const T* t_ptr = HAS_TEACHER ? teacher->const_data_ptr<T>() : nullptr;
  G* g_ptr = out.data_ptr<G>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    GradBuffers buf;
    for (int64_t row = begin; row < end; ++row) {
      G* g_row = g_ptr + row * out.stride(0);
      if (in.mask != nullptr && !in.mask[row]) {
        zero_row(g_row, vocab, buf);
        continue;
      }
      const RowNorms& norms = in.norms;
      const RowArgs r{norms.max_s(row), norms.logsum_s(row), HAS_TEACHER ? norms.max_t(row) : 0.0f,
                      HAS_TEACHER ? norms.logsum_t(row) : 0.0f, in.shift[row], in.scale[row]};
      grad_row<T, G, HAS_TEACHER, HAS_MIXTURE, false>(
          s_ptr + row * student.stride(0), HAS_TEACHER ? t_ptr + row * teacher->stride(0) : nullptr,
          g_row, vocab, a, r, RowCache{nullptr, nullptr, nullptr}, buf);
    }
  });
}

template <typename T, typename G>
void grad_dispatch(const at::Tensor& student, const c10::optional<at::Tensor>& teacher,
                   const GradInputs& in, const FormArgs& a, at::Tensor& out) {
  if (!teacher)
    grad_rows<T, G, false, false>(student, teacher, in, a, out);
  else if (a.w_mixture != 0.0f)
    grad_rows<T, G, true, true>(student, teacher, in, a, out);
  else
    grad_rows<T, G, true, false>(student, teacher, in, a, out);
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
  const FormArgs a{static_cast<float>(1.0 / temperature), static_cast<float>(cap_s),
                   static_cast<float>(cap_t), static_cast<float>(w_reverse),
                   static_cast<float>(w_forward), static_cast<float>(w_mixture),
                   mixture ? static_cast<float>(std::log(beta)) : 0.0f,
                   mixture ? static_cast<float>(std::log1p(-beta)) : 0.0f};
  const GradInputs in{RowNorms{fields.const_data_ptr<float>(), n}, shift.const_data_ptr<float>(),
                      scale.const_data_ptr<float>(), mask ? mask->const_data_ptr<bool>() : nullptr};
  const bool bf16_in = student.scalar_type() == at::kBFloat16;
  const bool bf16_out = out.scalar_type() == at::kBFloat16;
  if (bf16_in && bf16_out)
    grad_dispatch<c10::BFloat16, c10::BFloat16>(student, teacher, in, a, out);
  else if (bf16_in)
    grad_dispatch<c10::BFloat16, float>(student, teacher, in, a, out);
  else if (bf16_out)
    grad_dispatch<float, c10::BFloat16>(student, teacher, in, a, out);
  else
    grad_dispatch<float, float>(student, teacher, in, a, out);
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
