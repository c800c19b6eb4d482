// slice_channels on the CPU, for one tensor or a whole model in one call: every
// client's compact tensors in one pass over each weight. Work items are chunks of
// weight rows (of all tensors, one parallel loop); each row is read once and
// copied into every client that keeps it, using per-client inverse row maps.
// The copy loop comes in baseline / AVX2 / AVX-512 variants (isa.h).
//
// Two entries share the loop (detail::run_parts): slice_channels_many here (per-tensor
// (K, m) keep sets, a new client-major output) and slice_packed in packed.cpp (the
// per-round layout's tables, written into a caller-given buffer at the layout's offsets:
// one contiguous buffer per client).
#include "slice.h"

#include "isa.h"

#include <algorithm>
#include <cstring>
#include <utility>

namespace cahfp {
namespace {

using detail::Part;

// Work items [i0, i1): chunks of rows of one weight, copied into every client keeping them.
template <typename scalar_t>
inline void copy_items(const std::vector<Part>& parts, const std::vector<std::pair<int32_t, int64_t>>& items,
                       int64_t K, scalar_t* O, int64_t i0, int64_t i1) {
  for (int64_t it = i0; it < i1; ++it) {
    const Part& part = parts[items[it].first];
    const scalar_t* W = static_cast<const scalar_t*>(part.w);
    const int64_t T = part.T, Cin = part.Cin;
    const int64_t r1 = std::min(part.R, items[it].second + part.chunk);
    for (int64_t r = items[it].second; r < r1; ++r) {
      const scalar_t* wrow = W + r * Cin * T;
      for (int64_t k = 0; k < K; ++k) {
        const int32_t i = part.inv_rows[k * part.inv_stride + r];
        if (i < 0) continue;
        const int64_t cc = part.cc[k * part.cc_stride];
        scalar_t* dst = O + part.dst[k * part.dst_stride] + i * cc * T;
        const int32_t* ck = part.cols + k * part.col_stride;
        // a fixed shape for the common tap counts (measured, K = 100, 2 threads, reused
        // output: VGG-16 and ResNet-56 7-13 % faster with 3x3 blocks as 8 + 1 elements,
        // a ViT's linear layers 30 % faster as a plain gather; a copy per run of
        // consecutive columns was 1.8x slower there, the runs being short)
        if (T == 9) {
          for (int64_t j = 0; j < cc; ++j) {
            const scalar_t* src = wrow + static_cast<int64_t>(ck[j]) * 9;
            std::memcpy(dst + j * 9, src, 8 * sizeof(scalar_t));
            dst[j * 9 + 8] = src[8];
          }
        } else if (T == 1) {
          for (int64_t j = 0; j < cc; ++j) dst[j] = wrow[ck[j]];
        } else {
          for (int64_t j = 0; j < cc; ++j) {
            const scalar_t* src = wrow + static_cast<int64_t>(ck[j]) * T;
            for (int64_t t = 0; t < T; ++t) dst[j * T + t] = src[t];
          }
        }
      }
    }
  }
}

#define CAHFP_SC_HEAD template <typename scalar_t>
#define CAHFP_SC_ARGS <scalar_t>
CAHFP_ISA_VARIANTS(CAHFP_SC_HEAD, CAHFP_SC_ARGS, copy_items_isa, copy_items<scalar_t>,
                   (const std::vector<Part>& parts, const std::vector<std::pair<int32_t, int64_t>>& items, int64_t K,
                    scalar_t* O, int64_t i0, int64_t i1),
                   (parts, items, K, O, i0, i1))


}  // namespace

namespace detail {

void run_parts(std::vector<Part>& parts, int64_t K, Tensor& out) {
  std::vector<std::pair<int32_t, int64_t>> items;
  for (size_t n = 0; n < parts.size(); ++n) {
    Part& part = parts[n];
    part.chunk = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, part.Cin * part.T * K));
    for (int64_t r = 0; r < part.R; r += part.chunk) items.emplace_back(static_cast<int32_t>(n), r);
  }
  CAHFP_DISPATCH_FLOATING(out.scalar_type(), "slice_channels", [&] {
    scalar_t* O = mdata<scalar_t>(out);
    const auto run = copy_items_isa_pick<scalar_t>();
    torch::stable::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
      run(parts, items, K, O, i0, i1);
    });
  });
}

}  // namespace detail

using namespace detail;

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
  std::vector<Tensor> ws(N);
  std::vector<std::vector<int32_t>> inv_store(N), col_store(N);
  std::vector<int64_t> cc_store(N * K), seg_size(K * N);
  for (int64_t n = 0; n < N; ++n) {
    STD_TORCH_CHECK(weights[n].is_cpu() && weights[n].scalar_type() == dtype && weights[n].dim() >= 1, "weights[",
                    n, "] must be a CPU tensor of dtype ", dtype_name(dtype));
    check_keep_tensor(rows[n], K, "rows");
    check_keep_tensor(cols[n], K, "cols");
    ws[n] = torch::stable::contiguous(weights[n]);
    Part& part = parts[n];
    part.w = ws[n].const_data_ptr();
    part.R = ws[n].size(0);
    part.Cin = ws[n].dim() >= 2 ? ws[n].size(1) : 1;
    part.T = ws[n].numel() / std::max<int64_t>(1, part.R * part.Cin);
    const std::vector<int64_t> rc = keep_counts(rows[n]), cc = keep_counts(cols[n]);
    inv_store[n] = inverse_maps(rows[n], part.R, "rows");
    (void)inverse_maps(cols[n], part.Cin, "cols");
    const int64_t mc = cols[n].size(1);
    const int64_t* cp = cdata<int64_t>(cols[n]);
    col_store[n].assign(K * std::max<int64_t>(mc, 1), 0);
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t j = 0; j < cc[k]; ++j) col_store[n][k * mc + j] = static_cast<int32_t>(cp[k * mc + j]);
      cc_store[n * K + k] = cc[k];
      seg_size[k * N + n] = rc[k] * cc[k] * part.T;
    }
    part.inv_rows = inv_store[n].data();
    part.inv_stride = part.R;
    part.cols = col_store[n].data();
    part.col_stride = mc;
    part.cc = cc_store.data() + n * K;
  }
  // Segment offsets, client-major; each part reads its column of them.
  std::vector<int64_t> seg_off(K * N + 1, 0);
  for (int64_t s = 0; s < K * N; ++s) seg_off[s + 1] = seg_off[s] + seg_size[s];
  STD_TORCH_CHECK(seg_off[K * N] == total, "total must be ", seg_off[K * N], ", got ", total);
  for (int64_t n = 0; n < N; ++n) {
    parts[n].dst = seg_off.data() + n;
    parts[n].dst_stride = N;
  }
  Tensor out = new_output({total}, dtype);
  if (total > 0) run_parts(parts, K, out);
  return out;
}

// Single tensor: the N = 1 case (packed in client order).
Tensor slice_channels_cpu(Tensor weight, Tensor rows, Tensor cols, int64_t total) {
  return slice_channels_many_cpu({weight}, {rows}, {cols}, total);
}

}  // namespace cahfp
