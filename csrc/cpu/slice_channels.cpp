// slice_channels on the CPU, for one tensor or a whole model in one call: every
// client's compact tensors in one pass over each weight. Work items are chunks of
// weight rows (of all tensors, one parallel loop); each row is read once and
// copied into every client that keeps it, using per-client inverse row maps.
// The copy loop comes in baseline / AVX2 / AVX-512 variants (isa.h).
#include "common.h"
#include "isa.h"

#include <algorithm>
#include <utility>

namespace cahfp {
namespace {

struct Part {
  Tensor w;
  int64_t R, Cin, T;
  std::vector<int64_t> rc, cc;
  std::vector<int32_t> inv_rows;
  const int64_t* cols;
  int64_t mc;
  int64_t chunk;
};

// Work items [i0, i1): chunks of rows of one weight, copied into every client keeping them.
template <typename scalar_t>
inline void copy_items(const std::vector<Part>& parts, const std::vector<std::pair<int32_t, int64_t>>& items,
                       const std::vector<int64_t>& seg_off, int64_t K, int64_t N, scalar_t* O, int64_t i0,
                       int64_t i1) {
  for (int64_t it = i0; it < i1; ++it) {
    const int64_t n = items[it].first;
    const Part& part = parts[n];
    const scalar_t* W = cdata<scalar_t>(part.w);
    const int64_t T = part.T, Cin = part.Cin;
    const int64_t r1 = std::min(part.R, items[it].second + part.chunk);
    for (int64_t r = items[it].second; r < r1; ++r) {
      const scalar_t* wrow = W + r * Cin * T;
      for (int64_t k = 0; k < K; ++k) {
        const int32_t i = part.inv_rows[k * part.R + r];
        if (i < 0) continue;
        const int64_t cc = part.cc[k];
        scalar_t* dst = O + seg_off[k * N + n] + i * cc * T;
        const int64_t* ck = part.cols + k * part.mc;
        for (int64_t j = 0; j < cc; ++j) {
          const scalar_t* src = wrow + ck[j] * T;
          for (int64_t t = 0; t < T; ++t) dst[j * T + t] = src[t];
        }
      }
    }
  }
}

#define CAHFP_SC_HEAD template <typename scalar_t>
#define CAHFP_SC_ARGS <scalar_t>
CAHFP_ISA_VARIANTS(CAHFP_SC_HEAD, CAHFP_SC_ARGS, copy_items_isa, copy_items<scalar_t>,
                   (const std::vector<Part>& parts, const std::vector<std::pair<int32_t, int64_t>>& items,
                    const std::vector<int64_t>& seg_off, int64_t K, int64_t N, scalar_t* O, int64_t i0, int64_t i1),
                   (parts, items, seg_off, K, N, O, i0, i1))

}  // namespace

// weights[n]: N-D, one dtype. rows[n] / cols[n]: (K, m) int64, -1 padded (cols of a
// 1-D weight: (K, 1) zeros). Returns one packed buffer, client-major: client 0's
// compact tensors 0..N-1, then client 1's, ...; `total` is its element count (checked).
Tensor slice_channels_many_cpu(std::vector<Tensor> weights, std::vector<Tensor> rows, std::vector<Tensor> cols,
                               int64_t total) {
  const int64_t N = static_cast<int64_t>(weights.size());
  STD_TORCH_CHECK(N > 0, "weights must not be empty");
  STD_TORCH_CHECK(static_cast<int64_t>(rows.size()) == N && static_cast<int64_t>(cols.size()) == N,
                  "rows and cols need one entry per weight");
  STD_TORCH_CHECK(rows[0].dim() == 2, "rows must hold (K, m) tensors");
  const int64_t K = rows[0].size(0);
  const auto dtype = weights[0].scalar_type();
  STD_TORCH_CHECK(is_floating(dtype), "weights must be floating");
  std::vector<Part> parts(N);
  std::vector<int64_t> seg_size(K * N);
  for (int64_t n = 0; n < N; ++n) {
    STD_TORCH_CHECK(weights[n].is_cpu() && weights[n].scalar_type() == dtype && weights[n].dim() >= 1, "weights[",
                    n, "] must be a CPU tensor of dtype ", dtype_name(dtype));
    check_keep_tensor(rows[n], K, "rows");
    check_keep_tensor(cols[n], K, "cols");
    Part& part = parts[n];
    part.w = torch::stable::contiguous(weights[n]);
    part.R = part.w.size(0);
    part.Cin = part.w.dim() >= 2 ? part.w.size(1) : 1;
    part.T = part.w.numel() / std::max<int64_t>(1, part.R * part.Cin);
    part.rc = keep_counts(rows[n]);
    part.cc = keep_counts(cols[n]);
    part.inv_rows = inverse_maps(rows[n], part.R, "rows");
    (void)inverse_maps(cols[n], part.Cin, "cols");
    part.cols = cdata<int64_t>(cols[n]);
    part.mc = cols[n].size(1);
    part.chunk = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, part.Cin * part.T * K));
    for (int64_t k = 0; k < K; ++k) seg_size[k * N + n] = part.rc[k] * part.cc[k] * part.T;
  }
  std::vector<int64_t> seg_off(K * N + 1, 0);
  for (int64_t s = 0; s < K * N; ++s) seg_off[s + 1] = seg_off[s] + seg_size[s];
  STD_TORCH_CHECK(seg_off[K * N] == total, "total must be ", seg_off[K * N], ", got ", total);
  Tensor out = new_output({total}, dtype);
  if (total == 0) return out;
  std::vector<std::pair<int32_t, int64_t>> items;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t r = 0; r < parts[n].R; r += parts[n].chunk) items.emplace_back(static_cast<int32_t>(n), r);
  CAHFP_DISPATCH_FLOATING(dtype, "slice_channels", [&] {
    scalar_t* O = mdata<scalar_t>(out);
    const auto run = copy_items_isa_pick<scalar_t>();
    torch::stable::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
      run(parts, items, seg_off, K, N, O, i0, i1);
    });
  });
  return out;
}

// Single tensor: the N = 1 case (packed in client order).
Tensor slice_channels_cpu(Tensor weight, Tensor rows, Tensor cols, int64_t total) {
  return slice_channels_many_cpu({weight}, {rows}, {cols}, total);
}

}  // namespace cahfp
