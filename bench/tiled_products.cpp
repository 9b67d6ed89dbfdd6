// The floor of the native fused backend as it runs its products (csrc/linear_pass.cpp): the four
// lm_head products of every chunk of rows, a vocabulary tile per BLAS call with each thread its
// own tiles, and nothing else (dL/du stands in as the teacher's logits tile). Built by
// bench/cpu_native.py for its measurement only.
#include <ATen/Parallel.h>
#include <torch/extension.h>

void tiled_products(const at::Tensor& hs, const at::Tensor& ws, const at::Tensor& ht,
                    const at::Tensor& wt, int64_t rows, int64_t tile, at::Tensor grad_hidden,
                    at::Tensor grad_weight) {
  const int64_t n = hs.size(0), vocab = ws.size(0), width = hs.size(1);
  const int64_t tiles = (vocab + tile - 1) / tile;
  at::Tensor z_s = at::empty({rows, vocab}, hs.options()), z_t = at::empty_like(z_s);
  at::Tensor parts = at::empty({tiles, rows, width}, hs.options());
  for (int64_t c0 = 0; c0 < n; c0 += rows) {
    const int64_t m = std::min(rows, n - c0);
    const at::Tensor h_s = hs.narrow(0, c0, m), h_t = ht.narrow(0, c0, m);
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t v0 = t * tile, w = std::min(tile, vocab - v0);
        at::Tensor zs_tile = z_s.narrow(0, 0, m).narrow(1, v0, w);
        at::Tensor zt_tile = z_t.narrow(0, 0, m).narrow(1, v0, w);
        at::mm_out(zs_tile, h_s, ws.narrow(0, v0, w).t());
        at::mm_out(zt_tile, h_t, wt.narrow(0, v0, w).t());
        at::Tensor part = parts[t].narrow(0, 0, m);
        at::mm_out(part, zt_tile, ws.narrow(0, v0, w));
        grad_weight.narrow(0, v0, w).addmm_(zt_tile.t(), h_s);
      }
    });
    at::Tensor out = grad_hidden.narrow(0, c0, m);
    at::sum_out(out, parts.narrow(1, 0, m), {0});
  }
}

TORCH_LIBRARY(opd_bench, m) {
  m.def("tiled_products(Tensor hs, Tensor ws, Tensor ht, Tensor wt, int rows, int tile, "
        "Tensor(a!) grad_hidden, Tensor(b!) grad_weight) -> ()");
}

TORCH_LIBRARY_IMPL(opd_bench, CPU, m) { m.impl("tiled_products", &tiled_products); }
