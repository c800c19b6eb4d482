// curvature_scores on the CPU: |g * w| + 0.5 * max(h, 0) * w^2, summed over
// every dim but `dim`, per client.
//
// One work item is one (client, channel) pair; it sums its elements in a fixed
// order (8 interleaved lanes, flushed into a running total every ~4096
// elements, lanes combined pairwise), so results do not depend on the thread
// count and the float32 error stays small for large channels.
#include "common.h"

#include <ATen/ops/empty.h>

#include <optional>

namespace cahfp {
namespace {

constexpr int64_t kLanes = 8;
constexpr int64_t kFlush = 4096;

template <typename T, bool kGrad, bool kHess>
void scores_kernel(const T* w, const T* g, const T* h, int64_t wk, int64_t gk, int64_t hk, acc_t<T>* out,
                   int64_t K, int64_t pre, int64_t C, int64_t post) {
  using acc = acc_t<T>;
  at::parallel_for(0, K * C, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t k = q / C, c = q % C;
      const T* wp = w + k * wk;
      const T* gp = kGrad ? g + k * gk : nullptr;
      const T* hp = kHess ? h + k * hk : nullptr;
      acc lanes[kLanes] = {};
      acc total = 0;
      int64_t pending = 0;
      auto term = [&](int64_t e) -> acc {
        const acc x = static_cast<acc>(wp[e]);
        acc v = 0;
        if constexpr (kGrad) v += std::abs(static_cast<acc>(gp[e]) * x);
        if constexpr (kHess) {
          const acc hv = static_cast<acc>(hp[e]);
          v += acc(0.5) * (hv > acc(0) ? hv : acc(0)) * x * x;
        }
        return v;
      };
      auto flush = [&] {
        total += ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
        for (auto& l : lanes) l = 0;
        pending = 0;
      };
      for (int64_t p = 0; p < pre; ++p) {
        const int64_t base = (p * C + c) * post;
        int64_t t = 0;
        for (; t + kLanes <= post; t += kLanes)
          for (int64_t l = 0; l < kLanes; ++l) lanes[l] += term(base + t + l);
        for (int64_t l = 0; t < post; ++t, ++l) lanes[l] += term(base + t);
        pending += post;
        if (pending >= kFlush) flush();
      }
      flush();
      out[q] = total;
    }
  });
}

}  // namespace

// weight / grad / hess: contiguous (K_i, *S) tensors of one dtype with K_i in
// {1, K} (K_i = 1 broadcasts); `dim` indexes S. Returns (K, S[dim]) float32
// (float64 for float64 inputs).
at::Tensor curvature_scores_cpu(const at::Tensor& weight, const std::optional<at::Tensor>& grad,
                                const std::optional<at::Tensor>& hess, int64_t dim) {
  TORCH_CHECK(grad.has_value() || hess.has_value(), "grad and hess cannot both be None");
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() >= 2, "weight must be a (K, *S) CPU tensor");
  const int64_t nd = weight.dim() - 1;
  TORCH_CHECK(dim >= 0 && dim < nd, "dim out of range");
  int64_t K = weight.size(0);
  for (const auto* t : {grad ? &*grad : nullptr, hess ? &*hess : nullptr}) {
    if (!t) continue;
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == weight.scalar_type() && t->dim() == weight.dim(),
                "grad / hess must match weight's device, dtype and rank");
    TORCH_CHECK(t->sizes().slice(1).equals(weight.sizes().slice(1)), "grad / hess shape must match weight");
    K = std::max(K, t->size(0));
  }
  int64_t pre = 1, post = 1;
  for (int64_t d = 0; d < dim; ++d) pre *= weight.size(d + 1);
  for (int64_t d = dim + 1; d < nd; ++d) post *= weight.size(d + 1);
  const int64_t C = weight.size(dim + 1);
  const int64_t numel = pre * C * post;
  auto out_dtype = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = new_output({K, C}, weight.options().dtype(out_dtype));
  const at::Tensor w = weight.contiguous();
  const at::Tensor g = grad ? grad->contiguous() : at::Tensor();
  const at::Tensor h = hess ? hess->contiguous() : at::Tensor();
  auto kstride = [&](const at::Tensor& t) -> int64_t {
    if (!t.defined()) return 0;
    TORCH_CHECK(t.size(0) == 1 || t.size(0) == K, "client dims disagree");
    return t.size(0) == 1 ? 0 : numel;
  };
  const int64_t wk = kstride(w), gk = kstride(g), hk = kstride(h);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "curvature_scores", [&] {
    using T = scalar_t;
    const T* wp = w.const_data_ptr<T>();
    const T* gp = g.defined() ? g.const_data_ptr<T>() : nullptr;
    const T* hp = h.defined() ? h.const_data_ptr<T>() : nullptr;
    auto* op = out.mutable_data_ptr<acc_t<T>>();
    if (gp && hp)
      scores_kernel<T, true, true>(wp, gp, hp, wk, gk, hk, op, K, pre, C, post);
    else if (gp)
      scores_kernel<T, true, false>(wp, gp, hp, wk, gk, hk, op, K, pre, C, post);
    else
      scores_kernel<T, false, true>(wp, gp, hp, wk, gk, hk, op, K, pre, C, post);
  });
  return out;
}

}  // namespace cahfp
