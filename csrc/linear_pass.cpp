// The fused-linear form's chunk of rows on the CPU, a vocabulary tile at a time, so that what a
// tile's GEMM writes is read again while it is in the thread's cache:
//
//   linear_row_pass    z = h W^T (+ b) of both models into the chunk's [rows, V] buffers, a tile
//                      per BLAS call, and the row pass (row_state.h) over the tile at once; each
//                      tile keeps its own row states, merged in vocabulary order at the end;
//   linear_dense_grad  dL/dz of a GradForm (row_grad.h) over a tile into a [rows, tile] buffer,
//                      then dh += g W[tile], dW[tile] += g^T h, db[tile] += sum_rows g from it:
//                      dL/dz is never written out whole.
//
// Threads take tiles (at::parallel_for); BLAS runs single-threaded inside a thread's tile. A tile
// is sized so that both models' [rows, tile] fp32 take half the L2 cache (or given, for tests).
// The partition into tiles depends on the rows and that size only, not on the number of threads:
// results are the same for any thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>
#if __has_include(<unistd.h>)
#include <unistd.h>
#endif

#include <vector>

#include "row_grad.h"
#include "row_state.h"

namespace opd {
namespace {

// Vocabulary elements of a tile: ``asked`` if > 0, else whole blocks, both models' [rows, tile]
// fp32 in half the L2 (1 MiB where the system does not say).
int64_t tile_width(int64_t asked, int64_t rows, int64_t vocab) {
  TORCH_CHECK(asked >= 0, "tile must be >= 0 (0: sized from the L2 cache), got ", asked);
  if (asked > 0) return std::min(asked, vocab);
#if defined(_SC_LEVEL2_CACHE_SIZE)  // glibc
  const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#else
  const long l2 = 0;
#endif
  const int64_t budget = (l2 > 0 ? l2 : (2 << 20)) / 2;
  const int64_t block_bytes = 2 * 4 * std::max<int64_t>(rows, 1) * kBlock;  // both models
  const int64_t blocks = std::max<int64_t>(1, budget / block_bytes);
  return std::min(blocks * kBlock, padded(vocab));
}

// The lm_head of one model: hidden [rows, H], the weight's first ``vocab`` rows [V' >= vocab, H],
// an optional bias [V' >= vocab]; fp32 with contiguous rows.
void check_head(const at::Tensor& hidden, const at::Tensor& weight,
                const c10::optional<at::Tensor>& bias, int64_t rows, int64_t vocab,
                const char* which) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1), which,
              ": hidden and weight must be [rows, H] and [V, H]");
  TORCH_CHECK(hidden.size(0) == rows, which, ": hidden must have ", rows, " rows, got ",
              hidden.size(0));
  TORCH_CHECK(weight.size(0) >= vocab, which, ": weight must have at least ", vocab, " rows");
  for (const at::Tensor* t : {&hidden, &weight})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu() &&
                    (t->size(1) <= 1 || t->stride(1) == 1),
                which, ": hidden and weight must be float32 CPU tensors with contiguous rows");
  if (bias)
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) >= vocab && bias->scalar_type() == at::kFloat &&
                    bias->is_contiguous(),
                which, ": bias must be a contiguous float32 [V] tensor");
}

void check_logits(const at::Tensor& logits, const char* name) {
  check_rows(logits, name);
  TORCH_CHECK(logits.scalar_type() == at::kFloat, name, " must be float32");
}

// logits[:, v0:v0+n] = hidden weight[v0:v0+n]^T (+ bias[v0:v0+n]).
void tile_logits(at::Tensor& logits, const at::Tensor& hidden, const at::Tensor& weight,
                 const c10::optional<at::Tensor>& bias, int64_t v0, int64_t n) {
  at::Tensor out = logits.narrow(1, v0, n);
  at::mm_out(out, hidden, weight.narrow(0, v0, n).t());
  if (bias) out.add_(bias->narrow(0, v0, n));
}

template <bool HAS_TEACHER, bool WITH_TOPK, bool WITH_STATS>
void linear_rows(const at::Tensor& hidden_s, const at::Tensor& weight_s,
                 const c10::optional<at::Tensor>& bias_s, const at::Tensor* hidden_t,
                 const at::Tensor* weight_t, const c10::optional<at::Tensor>& bias_t,
                 at::Tensor& logits_s, at::Tensor* logits_t, const int64_t* tokens,
                 const bool* mask, const Options& o, int64_t tile, float* fields,
                 int64_t* top_ids) {
  using State = RowState<HAS_TEACHER, WITH_TOPK, WITH_STATS>;
  const int64_t rows = logits_s.size(0);
  const int64_t tiles = (o.vocab + tile - 1) / tile;
  std::vector<std::vector<State>> states(tiles);  // [tile][row]
  float* zs_ptr = logits_s.data_ptr<float>();
  float* zt_ptr = HAS_TEACHER ? logits_t->data_ptr<float>() : nullptr;
  const int64_t stride_s = logits_s.stride(0), stride_t = HAS_TEACHER ? logits_t->stride(0) : 0;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> zs(kBlock), zt(HAS_TEACHER ? kBlock : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t v0 = t * tile, width = std::min(tile, o.vocab - v0);
      tile_logits(logits_s, hidden_s, weight_s, bias_s, v0, width);
      if constexpr (HAS_TEACHER) tile_logits(*logits_t, *hidden_t, *weight_t, bias_t, v0, width);
      states[t].assign(rows, State(o.k));
      for (int64_t row = 0; row < rows; ++row) {
        if (mask != nullptr && !mask[row]) continue;
        State& st = states[t][row];
        for (int64_t b0 = v0; b0 < v0 + width; b0 += kBlock) {
          const int64_t n = std::min(kBlock, v0 + width - b0);
          st.add_block(load_block(zs_ptr + row * stride_s + b0, n, o.cap_s, zs.data()),
                       HAS_TEACHER ? load_block(zt_ptr + row * stride_t + b0, n, o.cap_t, zt.data())
                                   : nullptr,
                       n, b0, o);
        }
      }
    }
  });
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const bool counted = mask == nullptr || mask[row];
      State& st = states[0][row];
      for (int64_t t = 1; counted && t < tiles; ++t) st.merge(states[t][row]);
      const float* zt_row = HAS_TEACHER ? zt_ptr + row * stride_t : nullptr;
      finish_row(st, counted, zs_ptr + row * stride_s, zt_row,
                 counted ? row_token(tokens, row, o.vocab) : -1, o, fields, row, rows,
                 top_ids + row * o.k);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> linear_row_pass(
    const at::Tensor& hidden_s, const at::Tensor& weight_s, const c10::optional<at::Tensor>& bias_s,
    const c10::optional<at::Tensor>& hidden_t, const c10::optional<at::Tensor>& weight_t,
    const c10::optional<at::Tensor>& bias_t, at::Tensor logits_s,
    c10::optional<at::Tensor> logits_t, const c10::optional<at::Tensor>& tokens,
    const c10::optional<at::Tensor>& mask, int64_t k, double temperature, double cap_s,
    double cap_t, int64_t tile) {
  check_logits(logits_s, "logits_s");
  const int64_t rows = logits_s.size(0), vocab = logits_s.size(1);
  check_head(hidden_s, weight_s, bias_s, rows, vocab, "student");
  const bool has_teacher = logits_t.has_value();
  TORCH_CHECK(has_teacher == hidden_t.has_value() && has_teacher == weight_t.has_value(),
              "the teacher needs hidden_t, weight_t and logits_t together");
  if (has_teacher) {
    check_logits(*logits_t, "logits_t");
    TORCH_CHECK(logits_t->sizes() == logits_s.sizes(), "logits_t must match logits_s's shape");
    check_head(*hidden_t, *weight_t, bias_t, rows, vocab, "teacher");
  }
  const Options o = pass_options(rows, vocab, tokens, mask, k, temperature, cap_s, cap_t);
  auto fields = at::empty({kNumFields, rows}, logits_s.options());
  auto top_ids = at::empty({rows, k}, logits_s.options().dtype(at::kLong));
  if (rows == 0) return {fields, top_ids};
  TORCH_CHECK(vocab > 0, "the vocabulary must not be empty");
  const int64_t width = tile_width(tile, rows, vocab);
  const int64_t* token_ptr = tokens ? tokens->const_data_ptr<int64_t>() : nullptr;
  const bool* mask_ptr = mask ? mask->const_data_ptr<bool>() : nullptr;
  dispatch_pass(has_teacher, k > 0, [&](auto with_teacher, auto with_topk, auto with_stats) {
    linear_rows<decltype(with_teacher)::value, decltype(with_topk)::value,
                decltype(with_stats)::value>(
        hidden_s, weight_s, bias_s, has_teacher ? &*hidden_t : nullptr,
        has_teacher ? &*weight_t : nullptr, bias_t, logits_s, has_teacher ? &*logits_t : nullptr,
        token_ptr, mask_ptr, o, width, fields.data_ptr<float>(), top_ids.data_ptr<int64_t>());
  });
  return {fields, top_ids};
}

void linear_dense_grad(const at::Tensor& student, const c10::optional<at::Tensor>& teacher,
                       const at::Tensor& fields, const at::Tensor& shift, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& mask, double temperature, double cap_s,
                       double cap_t, double w_reverse, double w_forward, double w_mixture,
                       double beta, const at::Tensor& hidden, const at::Tensor& weight,
                       c10::optional<at::Tensor> grad_hidden, c10::optional<at::Tensor> grad_weight,
                       c10::optional<at::Tensor> grad_bias, int64_t tile_asked) {
  check_logits(student, "student");
  if (teacher) {
    check_logits(*teacher, "teacher");
    TORCH_CHECK(teacher->sizes() == student.sizes(), "teacher must match the student's shape");
  }
  const int64_t rows = student.size(0), vocab = student.size(1), width = hidden.size(1);
  check_fields(fields, rows);
  check_head(hidden, weight, c10::nullopt, rows, vocab, "student");
  const GradArgs a = grad_args(fields, rows, shift, scale, mask, temperature, cap_s, cap_t,
                               w_reverse, w_forward, w_mixture, beta);
  if (grad_hidden)
    TORCH_CHECK(grad_hidden->sizes() == hidden.sizes() && grad_hidden->scalar_type() == at::kFloat,
                "grad_hidden must be a float32 tensor of hidden's shape");
  if (grad_weight)
    TORCH_CHECK(grad_weight->dim() == 2 && grad_weight->size(0) >= vocab &&
                    grad_weight->size(1) == width && grad_weight->scalar_type() == at::kFloat,
                "grad_weight must be a float32 [V, H] tensor");
  if (grad_bias)
    TORCH_CHECK(grad_bias->dim() == 1 && grad_bias->size(0) >= vocab &&
                    grad_bias->scalar_type() == at::kFloat,
                "grad_bias must be a float32 [V] tensor");
  if (rows == 0) return;
  const int64_t tile = tile_width(tile_asked, rows, vocab), tiles = (vocab + tile - 1) / tile;
  // each tile's g W[tile], summed in tile order after: the same sum for any thread count
  at::Tensor hidden_parts = grad_hidden ? at::empty({tiles, rows, width}, hidden.options())
                                        : at::Tensor();
  const float* zs_ptr = student.const_data_ptr<float>();
  const float* zt_ptr = teacher ? teacher->const_data_ptr<float>() : nullptr;
  const int64_t stride_s = student.stride(0), stride_t = teacher ? teacher->stride(0) : 0;
  dispatch_form(teacher.has_value(), a, [&](auto has_teacher, auto has_mixture) {
    constexpr bool HAS_TEACHER = decltype(has_teacher)::value;
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> zs(kBlock), zt(HAS_TEACHER ? kBlock : 0);
      at::Tensor g = at::empty({rows, tile}, student.options());
      float* g_ptr = g.data_ptr<float>();
      for (int64_t t = begin; t < end; ++t) {
        const int64_t v0 = t * tile, n_tile = std::min(tile, vocab - v0);
        for (int64_t row = 0; row < rows; ++row) {
          float* g_row = g_ptr + row * tile;
          if (!a.counted(row)) {
            std::fill(g_row, g_row + n_tile, 0.0f);
            continue;
          }
          for (int64_t b0 = 0; b0 < n_tile; b0 += kBlock) {
            const int64_t n = std::min(kBlock, n_tile - b0);
            const float* z_s = load_block(zs_ptr + row * stride_s + v0 + b0, n, a.cap_s, zs.data());
            const float* z_t = HAS_TEACHER
                ? load_block(zt_ptr + row * stride_t + v0 + b0, n, a.cap_t, zt.data()) : nullptr;
            constexpr bool HAS_MIXTURE = decltype(has_mixture)::value;
            if (n % kLanes == 0) {
              grad_block<HAS_TEACHER, HAS_MIXTURE>(z_s, z_t, n, row, a, g_row + b0);
            } else {  // the tile's last block: whole vectors into scratch, n of them kept
              float tail[kBlock];
              grad_block<HAS_TEACHER, HAS_MIXTURE>(z_s, z_t, n, row, a, tail);
              std::copy(tail, tail + n, g_row + b0);
            }
          }
        }
        const at::Tensor g_tile = g.narrow(1, 0, n_tile);
        if (grad_hidden) {
          at::Tensor part = hidden_parts[t];
          at::mm_out(part, g_tile, weight.narrow(0, v0, n_tile));
        }
        if (grad_weight) grad_weight->narrow(0, v0, n_tile).addmm_(g_tile.t(), hidden);
        if (grad_bias) grad_bias->narrow(0, v0, n_tile).add_(g_tile.sum(0));
      }
    });
  });
  if (grad_hidden) at::sum_out(*grad_hidden, hidden_parts, {0});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(opd_kernels, m) {
  m.def("tile_width(int tile, int rows, int vocab) -> int");
  m.def("linear_row_pass(Tensor hidden_s, Tensor weight_s, Tensor? bias_s, Tensor? hidden_t, "
        "Tensor? weight_t, Tensor? bias_t, Tensor(a!) logits_s, Tensor(b!)? logits_t, "
        "Tensor? tokens, Tensor? mask, int k, float temperature, float cap_s, float cap_t, "
        "int tile) -> (Tensor, Tensor)");
  m.def("linear_dense_grad(Tensor student, Tensor? teacher, Tensor fields, Tensor shift, "
        "Tensor scale, Tensor? mask, float temperature, float cap_s, float cap_t, "
        "float w_reverse, float w_forward, float w_mixture, float beta, Tensor hidden, "
        "Tensor weight, Tensor(a!)? grad_hidden, Tensor(b!)? grad_weight, "
        "Tensor(c!)? grad_bias, int tile) -> ()");
}

TORCH_LIBRARY_IMPL(opd_kernels, CompositeExplicitAutograd, m) { m.impl("tile_width", &tile_width); }

TORCH_LIBRARY_IMPL(opd_kernels, CPU, m) {
  m.impl("linear_row_pass", &linear_row_pass);
  m.impl("linear_dense_grad", &linear_dense_grad);
}

}  // namespace opd
