// The row pass alone (row_read.h): the fields of every row and the student's top-k ids, rows in
// parallel (at::parallel_for); nothing of size [N, V] is written.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "row_read.h"

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
    RowReader<T, HAS_TEACHER, WITH_TOPK, WITH_STATS> reader(o);
    float f[kNumFields];
    for (int64_t row = begin; row < end; ++row) {
      int64_t* ids = top_ids + row * o.k;
      if (mask != nullptr && !mask[row])
        reader.blank(f, ids);
      else
        reader.read(s_ptr + row * stride_s, HAS_TEACHER ? t_ptr + row * stride_t : nullptr,
                    tokens == nullptr ? nullptr : tokens + row, f, ids, nullptr);
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
