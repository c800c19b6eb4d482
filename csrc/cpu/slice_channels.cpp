// slice_channels on the CPU: every client's compact tensor in one pass over the
// weight. A thread owns a range of weight rows; each row is read once and
// copied into every client that keeps it, using per-client inverse row maps.
#include "common.h"

#include <ATen/ops/empty.h>

namespace cahfp {

// weight: (R, Cin, T) contiguous. rows / cols: (K, m) int64, -1 padded.
// Returns a packed 1-D buffer: client k's (kept rows, kept cols, T) block, in
// client order. `total` is its element count (checked).
at::Tensor slice_channels_cpu(const at::Tensor& weight, const at::Tensor& rows, const at::Tensor& cols,
                              int64_t total) {
  TORCH_CHECK(weight.device().is_cpu(), "weight must be a CPU tensor");
  TORCH_CHECK(weight.dim() == 3 && weight.is_contiguous(), "weight must be a contiguous (R, Cin, T) tensor");
  const int64_t K = rows.size(0);
  check_keep_tensor(rows, K, "rows");
  check_keep_tensor(cols, K, "cols");
  const int64_t R = weight.size(0), Cin = weight.size(1), T = weight.size(2);
  const std::vector<int64_t> rcount = keep_counts(rows), ccount = keep_counts(cols);
  std::vector<int64_t> offset(K + 1, 0);
  for (int64_t k = 0; k < K; ++k) offset[k + 1] = offset[k] + rcount[k] * ccount[k] * T;
  TORCH_CHECK(offset[K] == total, "total must be ", offset[K], ", got ", total);
  const std::vector<int32_t> inv_rows = inverse_maps(rows, R, "rows");
  (void)inverse_maps(cols, Cin, "cols");
  at::Tensor out = new_output({total}, weight.options());
  if (total == 0) return out;
  const int64_t* C = cols.const_data_ptr<int64_t>();
  const int64_t mc = cols.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "slice_channels", [&] {
    const scalar_t* W = weight.const_data_ptr<scalar_t>();
    scalar_t* O = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, Cin * T * K));
    at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* wrow = W + r * Cin * T;
        for (int64_t k = 0; k < K; ++k) {
          const int32_t i = inv_rows[k * R + r];
          if (i < 0) continue;
          const int64_t cc = ccount[k];
          scalar_t* dst = O + offset[k] + i * cc * T;
          const int64_t* ck = C + k * mc;
          for (int64_t j = 0; j < cc; ++j) {
            const scalar_t* src = wrow + ck[j] * T;
            for (int64_t t = 0; t < T; ++t) dst[j * T + t] = src[t];
          }
        }
      }
    });
  });
  return out;
}

}  // namespace cahfp
