// The row pass and the dense gradient of each row at once, for the gradient in the forward of
// a scalar loss (backends/triton_fused_grad.py) whose GradForm's shift is affine in the row's
// fields (objectives.RowGradForm): shift = c_0 + sum_f c_f field_f. Per row, the pass
// (row_read.h) reads both models' logits and leaves the student's exps in a per-thread cache;
// the row's fields give its shift, and the gradient (row_grad.h) follows while the row is in
// L2: the second read costs no memory traffic and no exp. The gradient may be written over the
// teacher's logits (each block is read before it is written).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "row_grad.h"
#include "row_read.h"

namespace opd {
namespace {

template <typename G, bool WITH_TOPK>
void run_rows(const at::Tensor& student, const at::Tensor& teacher, const int64_t* tokens,
              const bool* mask, const Options& o, const float* shift_coefs, const FormArgs& a,
              const float* scale, at::Tensor& out, float* fields, int64_t* top_ids) {
  const int64_t n_rows = student.size(0), vocab = o.vocab;
  const float* s_ptr = student.const_data_ptr<float>();
  const float* t_ptr = teacher.const_data_ptr<float>();
  G* g_ptr = out.data_ptr<G>();
  at::parallel_for(0, n_rows, 1, [&](int64_t begin, int64_t end) {
    RowReader<float, true, WITH_TOPK, WITH_TOPK> reader(o);
    // kept by each of the pool's threads: a fresh 256 KiB a call would be mmap'd and faulted in
    thread_local std::vector<float> exps, centers;
    exps.resize(std::max<size_t>(exps.size(), padded(vocab)));
    centers.resize(std::max<size_t>(centers.size(), (vocab + kBlock - 1) / kBlock));
    const ExpCache cache{exps.data(), centers.data()};
    GradBuffers buf;
    float f[kNumFields];
    for (int64_t row = begin; row < end; ++row) {
      int64_t* ids = top_ids + row * o.k;
      const float* zs_row = s_ptr + row * student.stride(0);
      const float* zt_row = t_ptr + row * teacher.stride(0);
      G* g_row = g_ptr + row * out.stride(0);
      if (mask != nullptr && !mask[row]) {
        reader.blank(f, ids);
        zero_row(g_row, vocab, buf);
      } else {
        reader.read(zs_row, zt_row, tokens == nullptr ? nullptr : tokens + row, f, ids, &cache);
        float shift = shift_coefs[kNumFields];
        for (int i = 0; i < kNumFields; ++i)
          if (shift_coefs[i] != 0.0f) shift += shift_coefs[i] * f[i];
        const RowArgs r{f[kMaxS], f[kLogsumS], f[kMaxT], f[kLogsumT], shift, scale[row]};
        grad_row<float, G, true, false, true>(zs_row, zt_row, g_row, vocab, a, r, cache, buf);
      }
      for (int i = 0; i < kNumFields; ++i) fields[i * n_rows + row] = f[i];
    }
  });
}

std::tuple<at::Tensor, at::Tensor> row_pass_grad(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& tokens,
    const c10::optional<at::Tensor>& mask, int64_t k, double temperature, double cap_s,
    double cap_t, const at::Tensor& shift_coefs, double w_reverse, double w_forward,
    const at::Tensor& scale, at::Tensor out) {
  check_rows(student, "student");
  check_rows(teacher, "teacher");
  TORCH_CHECK(student.scalar_type() == at::kFloat && teacher.scalar_type() == at::kFloat,
              "student and teacher must be float32 logits, got ", student.scalar_type(), " and ",
              teacher.scalar_type());
  TORCH_CHECK(teacher.sizes() == student.sizes(), "teacher must match the student's shape");
  const int64_t n = student.size(0), vocab = student.size(1);
  check_row_vector(tokens, n, "tokens", at::kLong);
  check_row_vector(mask, n, "mask", at::kBool);
  check_row_vector(scale, n, "scale", at::kFloat);
  check_row_vector(shift_coefs, kNumFields + 1, "shift_coefs", at::kFloat);
  TORCH_CHECK(0 <= k && k <= vocab, "k must lie in [0, ", vocab, "], got ", k);
  TORCH_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
  TORCH_CHECK(out.sizes() == student.sizes() && (out.size(1) <= 1 || out.stride(1) == 1),
              "out must be a [rows, vocab] tensor with a contiguous last axis");
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16,
              "out must be float32 or bfloat16, got ", out.scalar_type());
  auto fields = at::empty({kNumFields, n}, student.options().dtype(at::kFloat));
  auto top_ids = at::empty({n, k}, student.options().dtype(at::kLong));
  if (n == 0) return {fields, top_ids};
  TORCH_CHECK(vocab > 0, "the vocabulary must not be empty");
  const float inv_tau = static_cast<float>(1.0 / temperature);
  const Options o{vocab, k, inv_tau, static_cast<float>(cap_s), static_cast<float>(cap_t)};
  const FormArgs a{inv_tau, o.cap_s, o.cap_t, static_cast<float>(w_reverse),
                   static_cast<float>(w_forward), 0.0f, 0.0f, 0.0f};
  const int64_t* token_ptr = tokens ? tokens->const_data_ptr<int64_t>() : nullptr;
  const bool* mask_ptr = mask ? mask->const_data_ptr<bool>() : nullptr;
  const float* coefs = shift_coefs.const_data_ptr<float>();
  const float* scale_ptr = scale.const_data_ptr<float>();
  float* fields_ptr = fields.data_ptr<float>();
  int64_t* ids_ptr = top_ids.data_ptr<int64_t>();
  const bool bf16_out = out.scalar_type() == at::kBFloat16;
  if (bf16_out && k > 0)
    run_rows<c10::BFloat16, true>(student, teacher, token_ptr, mask_ptr, o, coefs, a, scale_ptr, out, fields_ptr, ids_ptr);
  else if (bf16_out)
    run_rows<c10::BFloat16, false>(student, teacher, token_ptr, mask_ptr, o, coefs, a, scale_ptr, out, fields_ptr, ids_ptr);
  else if (k > 0)
    run_rows<float, true>(student, teacher, token_ptr, mask_ptr, o, coefs, a, scale_ptr, out, fields_ptr, ids_ptr);
  else
    run_rows<float, false>(student, teacher, token_ptr, mask_ptr, o, coefs, a, scale_ptr, out, fields_ptr, ids_ptr);
  return {fields, top_ids};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(opd_kernels, m) {
  m.def("row_pass_grad(Tensor student, Tensor teacher, Tensor? tokens, Tensor? mask, int k, "
        "float temperature, float cap_s, float cap_t, Tensor shift_coefs, float w_reverse, "
        "float w_forward, Tensor scale, Tensor(a!) out) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(opd_kernels, CPU, m) { m.impl("row_pass_grad", &row_pass_grad); }

}  // namespace opd
