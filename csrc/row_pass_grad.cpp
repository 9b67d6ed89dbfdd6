// The row pass and the dense gradient of each row at once, for the gradient in the forward of
// a scalar loss (backends/triton_fused_grad.py) whose GradForm's shift is affine in the row's
// fields and mixture sums (objectives.RowGradForm): shift = c_0 + sum_f c_f field_f. Per row,
// the pass (row_read.h) reads both models' logits and leaves the student's exps in a per-thread
// cache; with a mixture term the JSD's mixture sums follow (row_grad.h), leaving log m there
// too; the row's fields give its shift, and the gradient (row_grad.h) follows while the row is
// in L2: the later reads cost no memory traffic, p no exp, and log m nothing. The gradient may
// be written over the teacher's logits (each block is read before it is written).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <utility>
#include <vector>

#include "row_grad.h"
#include "row_read.h"

namespace opd {
namespace {

// shift_coefs: one coefficient per field, then KL(p || m), KL(q || m), then the constant.
constexpr int kMixS = kNumFields, kMixT = kNumFields + 1, kConstant = kNumFields + 2;

// One call's inputs and outputs, as the rows' loop reads and writes them.
struct Rows {
  const at::Tensor &student, &teacher;
  at::Tensor& out;
  const int64_t* tokens;
  const bool* mask;
  const float *shift_coefs, *scale;
  float* fields;    // [kNumFields, n]
  int64_t* top_ids; // [n, k]
  float* mixture;   // [2, n]
};

template <typename G, bool WITH_TOPK, bool HAS_MIXTURE>
void run_rows(const Rows& io, const Options& o, const FormArgs& a) {
  const int64_t n_rows = io.student.size(0), vocab = o.vocab;
  const float* s_ptr = io.student.const_data_ptr<float>();
  const float* t_ptr = io.teacher.const_data_ptr<float>();
  G* g_ptr = io.out.data_ptr<G>();
  const float* coefs = io.shift_coefs;
  at::parallel_for(0, n_rows, 1, [&](int64_t begin, int64_t end) {
    RowReader<float, true, WITH_TOPK, WITH_TOPK> reader(o);
    // kept by each of the pool's threads: a fresh 256 KiB a call would be mmap'd and faulted in
    thread_local std::vector<float> exps, centers, log_m;
    const auto grow = [](std::vector<float>& v, size_t n) { v.resize(std::max(v.size(), n)); };
    grow(exps, padded(vocab));
    grow(centers, (vocab + kBlock - 1) / kBlock);
    if constexpr (HAS_MIXTURE) grow(log_m, padded(vocab));
    const RowCache cache{exps.data(), centers.data(), HAS_MIXTURE ? log_m.data() : nullptr};
    GradBuffers buf;
    float f[kNumFields];
    for (int64_t row = begin; row < end; ++row) {
      int64_t* ids = io.top_ids + row * o.k;
      const float* zs_row = s_ptr + row * io.student.stride(0);
      const float* zt_row = t_ptr + row * io.teacher.stride(0);
      G* g_row = g_ptr + row * io.out.stride(0);
      std::pair<float, float> sums{0.0f, 0.0f};
      if (io.mask != nullptr && !io.mask[row]) {
        reader.blank(f, ids);
        zero_row(g_row, vocab, buf);
      } else {
        reader.read(zs_row, zt_row, io.tokens == nullptr ? nullptr : io.tokens + row, f, ids, &cache);
        RowArgs r{f[kMaxS], f[kLogsumS], f[kMaxT], f[kLogsumT], coefs[kConstant], io.scale[row]};
        if constexpr (HAS_MIXTURE)
          sums = mixture_row<float, true>(zs_row, zt_row, vocab, a, r, cache, buf);
        for (int i = 0; i < kNumFields; ++i)  // 0 * NaN (a statistic) must not reach the shift
          if (coefs[i] != 0.0f) r.shift += coefs[i] * f[i];
        r.shift += coefs[kMixS] * sums.first + coefs[kMixT] * sums.second;
        grad_row<float, G, true, HAS_MIXTURE, true>(zs_row, zt_row, g_row, vocab, a, r, cache, buf);
      }
      for (int i = 0; i < kNumFields; ++i) io.fields[i * n_rows + row] = f[i];
      io.mixture[row] = sums.first;
      io.mixture[n_rows + row] = sums.second;
    }
  });
}

template <typename G>
void dispatch(const Rows& io, const Options& o, const FormArgs& a) {
  const bool topk = o.k > 0, mixture = a.w_mixture != 0.0f;
  if (topk && mixture)
    run_rows<G, true, true>(io, o, a);
  else if (topk)
    run_rows<G, true, false>(io, o, a);
  else if (mixture)
    run_rows<G, false, true>(io, o, a);
  else
    run_rows<G, false, false>(io, o, a);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> row_pass_grad(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& tokens,
    const c10::optional<at::Tensor>& mask, int64_t k, double temperature, double cap_s,
    double cap_t, const at::Tensor& shift_coefs, double w_reverse, double w_forward,
    double w_mixture, double beta, const at::Tensor& scale, at::Tensor out) {
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
  check_row_vector(shift_coefs, kConstant + 1, "shift_coefs", at::kFloat);
  TORCH_CHECK(0 <= k && k <= vocab, "k must lie in [0, ", vocab, "], got ", k);
  TORCH_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
  TORCH_CHECK(out.sizes() == student.sizes() && (out.size(1) <= 1 || out.stride(1) == 1),
              "out must be a [rows, vocab] tensor with a contiguous last axis");
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16,
              "out must be float32 or bfloat16, got ", out.scalar_type());
  const bool with_mixture = w_mixture != 0;
  TORCH_CHECK(!with_mixture || (0 < beta && beta < 1),
              "beta must lie strictly inside (0, 1), got ", beta);
  auto fields = at::empty({kNumFields, n}, student.options().dtype(at::kFloat));
  auto top_ids = at::empty({n, k}, student.options().dtype(at::kLong));
  auto mixture = at::empty({2, n}, student.options().dtype(at::kFloat));
  if (n == 0) return {fields, top_ids, mixture};
  TORCH_CHECK(vocab > 0, "the vocabulary must not be empty");
  const float inv_tau = static_cast<float>(1.0 / temperature);
  const Options o{vocab, k, inv_tau, static_cast<float>(cap_s), static_cast<float>(cap_t)};
  const FormArgs a{inv_tau, o.cap_s, o.cap_t, static_cast<float>(w_reverse),
                   static_cast<float>(w_forward), static_cast<float>(w_mixture),
                   with_mixture ? static_cast<float>(std::log(beta)) : 0.0f,
                   with_mixture ? static_cast<float>(std::log1p(-beta)) : 0.0f};
  const Rows io{student, teacher, out, tokens ? tokens->const_data_ptr<int64_t>() : nullptr,
                mask ? mask->const_data_ptr<bool>() : nullptr, shift_coefs.const_data_ptr<float>(),
                scale.const_data_ptr<float>(), fields.data_ptr<float>(),
                top_ids.data_ptr<int64_t>(), mixture.data_ptr<float>()};
  if (out.scalar_type() == at::kBFloat16)
    dispatch<c10::BFloat16>(io, o, a);
  else
    dispatch<float>(io, o, a);
  return {fields, top_ids, mixture};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(opd_kernels, m) {
  m.def("row_pass_grad(Tensor student, Tensor teacher, Tensor? tokens, Tensor? mask, int k, "
        "float temperature, float cap_s, float cap_t, Tensor shift_coefs, float w_reverse, "
        "float w_forward, float w_mixture, float beta, Tensor scale, Tensor(a!) out) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(opd_kernels, CPU, m) { m.impl("row_pass_grad", &row_pass_grad); }

}  // namespace opd
