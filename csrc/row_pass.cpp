// The one forward read of logits rows on the CPU: the per-row quantities of
// kernels/row_stats.py (the same fields, in the order of kernels/row_fields.py), by the same
// online algorithm (row_state.h). A row is read in blocks of kBlock elements; rows run in
// parallel (at::parallel_for); nothing of size [N, V] is written.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "row_state.h"

namespace opd {
namespace {

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
    RowState<HAS_TEACHER, WITH_TOPK, WITH_STATS> st(o.k);
    for (int64_t row = begin; row < end; ++row) {
      const bool counted = mask == nullptr || mask[row];
      const T* zs_row = s_ptr + row * stride_s;
      const T* zt_row = HAS_TEACHER ? t_ptr + row * stride_t : nullptr;
      st.reset();
      for (int64_t v0 = 0; counted && v0 < o.vocab; v0 += kBlock) {
        const int64_t n = std::min(kBlock, o.vocab - v0);
        st.add_block(load_block(zs_row + v0, n, o.cap_s, zs.data()),
                     HAS_TEACHER ? load_block(zt_row + v0, n, o.cap_t, zt.data()) : nullptr, n, v0,
                     o);
      }
      finish_row(st, counted, zs_row, zt_row, counted ? row_token(tokens, row, o.vocab) : -1, o,
                 fields, row, n_rows, top_ids + row * o.k);
    }
  });
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
  const Options o = pass_options(n, vocab, tokens, mask, k, temperature, cap_s, cap_t);
  auto fields = at::empty({kNumFields, n}, student.options().dtype(at::kFloat));
  auto top_ids = at::empty({n, k}, student.options().dtype(at::kLong));
  if (n == 0) return {fields, top_ids};
  TORCH_CHECK(vocab > 0, "the vocabulary must not be empty");
  const int64_t* token_ptr = tokens ? tokens->const_data_ptr<int64_t>() : nullptr;
  const bool* mask_ptr = mask ? mask->const_data_ptr<bool>() : nullptr;
  const bool bf16 = student.scalar_type() == at::kBFloat16;
  dispatch_pass(teacher.has_value(), k > 0, [&](auto has_teacher, auto with_topk, auto with_stats) {
    constexpr bool T = decltype(has_teacher)::value, K = decltype(with_topk)::value,
                   S = decltype(with_stats)::value;
    if (bf16)
      run_rows<c10::BFloat16, T, K, S>(student, teacher, token_ptr, mask_ptr, o,
                                       fields.data_ptr<float>(), top_ids.data_ptr<int64_t>());
    else
      run_rows<float, T, K, S>(student, teacher, token_ptr, mask_ptr, o, fields.data_ptr<float>(),
                               top_ids.data_ptr<int64_t>());
  });
  return {fields, top_ids};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(opd_kernels, m) {
  m.def("row_pass(Tensor student, Tensor? teacher, Tensor? tokens, Tensor? mask, int k, "
        "float temperature, float cap_s, float cap_t) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(opd_kernels, CPU, m) { m.impl("row_pass", &row_pass); }

}  // namespace opd
