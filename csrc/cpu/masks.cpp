// topk_channel_masks on the CPU: per row, the `keep` highest scores, ties to
// the lower index, NaN below every number. The comparator is a strict total
// order, so the selection is unique and deterministic. (A sort, not a SIMD loop:
// one baseline variant only.)
#include "masks.h"

#include "common.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <tuple>

namespace cahfp {

// scores: (K, C) contiguous floating. keep: (K,) int64, each in [1, C].
// Returns mask (K, C) bool and indices (K, max_keep) int64 (ascending, -1 padded).
std::tuple<Tensor, Tensor> topk_channel_masks_cpu(Tensor scores, Tensor keep, int64_t max_keep) {
  STD_TORCH_CHECK(scores.is_cpu() && scores.dim() == 2 && scores.is_contiguous() && is_floating(scores.scalar_type()),
                  "scores must be a contiguous floating (K, C) CPU tensor");
  const int64_t K = scores.size(0), C = scores.size(1);
  STD_TORCH_CHECK(keep.is_cpu() && keep.dim() == 1 && keep.size(0) == K && keep.scalar_type() == ScalarType::Long &&
                      keep.is_contiguous(),
                  "keep must be a contiguous (K,) int64 CPU tensor");
  const int64_t* kp = cdata<int64_t>(keep);
  int64_t kmax = 0;
  for (int64_t k = 0; k < K; ++k) {
    STD_TORCH_CHECK(kp[k] >= 1 && kp[k] <= C, "keep[", k, "] = ", kp[k], " outside [1, ", C, "]");
    kmax = std::max(kmax, kp[k]);
  }
  STD_TORCH_CHECK(K == 0 || kmax == max_keep, "max_keep must be ", kmax, ", got ", max_keep);
  Tensor mask = new_output({K, C}, ScalarType::Bool);
  Tensor indices = new_output({K, max_keep}, ScalarType::Long);
  bool* M = mdata<bool>(mask);
  int64_t* I = mdata<int64_t>(indices);
  CAHFP_DISPATCH_FLOATING(scores.scalar_type(), "topk_channel_masks", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* S = cdata<scalar_t>(scores);
    torch::stable::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
      std::vector<int64_t> order(static_cast<size_t>(C));
      std::vector<acc> val(static_cast<size_t>(C));
      for (int64_t k = k0; k < k1; ++k) {
        for (int64_t c = 0; c < C; ++c) val[c] = static_cast<acc>(S[k * C + c]);
        std::iota(order.begin(), order.end(), int64_t(0));
        auto better = [&](int64_t a, int64_t b) {
          const acc va = val[a], vb = val[b];
          const bool na = std::isnan(va), nb = std::isnan(vb);
          if (na != nb) return nb;
          if (!na && va != vb) return va > vb;
          return a < b;
        };
        const int64_t n = kp[k];
        if (n < C) std::nth_element(order.begin(), order.begin() + n, order.end(), better);
        std::sort(order.begin(), order.begin() + n);
        bool* mrow = M + k * C;
        std::fill(mrow, mrow + C, false);
        int64_t* irow = I + k * max_keep;
        for (int64_t j = 0; j < n; ++j) {
          mrow[order[j]] = true;
          irow[j] = order[j];
        }
        std::fill(irow + n, irow + max_keep, int64_t(-1));
      }
    });
  });
  return {mask, indices};
}

}  // namespace cahfp
