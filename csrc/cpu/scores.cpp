// curvature_scores on the CPU: |g * w| + 0.5 * clamp(h, min=0) * w^2 (NaN stays NaN), summed over
// every dim but `dim`, per client.
//
// One work item is one (client, channel) pair; it sums its elements in a fixed
// order (8 interleaved lanes, flushed into a running total every ~4096
// elements, lanes combined pairwise), so results do not depend on the thread
// count and the float32 error stays small for large channels. The loop comes in
// baseline / AVX2 / AVX-512 variants (isa.h), bit-identical.
#include "scores.h"

#include "common.h"
#include "isa.h"

#include <cmath>

namespace cahfp {
namespace {

constexpr int64_t kLanes = 8;
constexpr int64_t kFlush = 4096;

template <typename T>
struct ScoreArgs {
  const T* w;
  const T* g;
  const T* h;
  int64_t wk, gk, hk;
  acc_t<T>* out;
  int64_t pre, C, post;
};

// Work items [q0, q1): (client, channel) pairs q = k * C + c.
template <typename T, bool kGrad, bool kHess>
inline void score_items(const ScoreArgs<T>& a, int64_t q0, int64_t q1) {
  using acc = acc_t<T>;
  const int64_t C = a.C, pre = a.pre, post = a.post;
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t k = q / C, c = q % C;
    const T* wp = a.w + k * a.wk;
    const T* gp = kGrad ? a.g + k * a.gk : nullptr;
    const T* hp = kHess ? a.h + k * a.hk : nullptr;
    acc lanes[kLanes] = {};
    acc total = 0;
    int64_t pending = 0;
    auto term = [&](int64_t e) -> acc {
      const acc x = static_cast<acc>(wp[e]);
      acc v = 0;
      if constexpr (kGrad) v += std::abs(static_cast<acc>(gp[e]) * x);
      if constexpr (kHess) {
        const acc hv = static_cast<acc>(hp[e]);
        v += acc(0.5) * (hv < acc(0) ? acc(0) : hv) * x * x;  // clamp: NaN passes
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
    a.out[q] = total;
  }
}

#define CAHFP_CS_HEAD template <typename T, bool kGrad, bool kHess>
#define CAHFP_CS_ARGS <T, kGrad, kHess>
CAHFP_ISA_VARIANTS(CAHFP_CS_HEAD, CAHFP_CS_ARGS, score_items_isa, (score_items<T, kGrad, kHess>),
                   (const ScoreArgs<T>& a, int64_t q0, int64_t q1), (a, q0, q1))

template <typename T, bool kGrad, bool kHess>
void scores_kernel(const ScoreArgs<T>& a, int64_t K) {
  const auto run = score_items_isa_pick<T, kGrad, kHess>();
  torch::stable::parallel_for(0, K * a.C, 1, [&](int64_t q0, int64_t q1) { run(a, q0, q1); });
}

}  // namespace

// weight / grad / hess: contiguous (K_i, *S) tensors of one dtype with K_i in
// {1, K} (K_i = 1 broadcasts); `dim` indexes S. Returns (K, S[dim]) float32
// (float64 for float64 inputs).
Tensor curvature_scores_cpu(Tensor weight, std::optional<Tensor> grad, std::optional<Tensor> hess, int64_t dim) {
  STD_TORCH_CHECK(grad.has_value() || hess.has_value(), "grad and hess cannot both be None");
  STD_TORCH_CHECK(weight.is_cpu() && weight.dim() >= 2 && is_floating(weight.scalar_type()),
                  "weight must be a floating (K, *S) CPU tensor");
  const int64_t nd = weight.dim() - 1;
  STD_TORCH_CHECK(dim >= 0 && dim < nd, "dim out of range");
  int64_t K = weight.size(0);
  for (const auto* t : {grad ? &*grad : nullptr, hess ? &*hess : nullptr}) {
    if (!t) continue;
    STD_TORCH_CHECK(t->is_cpu() && t->scalar_type() == weight.scalar_type() && t->dim() == weight.dim(),
                    "grad / hess must match weight's device, dtype and rank");
    for (int64_t d = 1; d < weight.dim(); ++d)
      STD_TORCH_CHECK(t->size(d) == weight.size(d), "grad / hess shape must match weight");
    K = std::max(K, t->size(0));
  }
  int64_t pre = 1, post = 1;
  for (int64_t d = 0; d < dim; ++d) pre *= weight.size(d + 1);
  for (int64_t d = dim + 1; d < nd; ++d) post *= weight.size(d + 1);
  const int64_t C = weight.size(dim + 1);
  const int64_t numel = pre * C * post;
  const ScalarType out_dtype = weight.scalar_type() == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  Tensor out = new_output({K, C}, out_dtype);
  const Tensor w = torch::stable::contiguous(weight);
  const std::optional<Tensor> g = grad ? std::optional<Tensor>(torch::stable::contiguous(*grad)) : std::nullopt;
  const std::optional<Tensor> h = hess ? std::optional<Tensor>(torch::stable::contiguous(*hess)) : std::nullopt;
  auto kstride = [&](const Tensor& t) -> int64_t {
    STD_TORCH_CHECK(t.size(0) == 1 || t.size(0) == K, "client dims disagree");
    return t.size(0) == 1 ? 0 : numel;
  };
  const int64_t wk = kstride(w), gk = g ? kstride(*g) : 0, hk = h ? kstride(*h) : 0;
  CAHFP_DISPATCH_FLOATING(weight.scalar_type(), "curvature_scores", [&] {
    using T = scalar_t;
    const ScoreArgs<T> a{cdata<T>(w), g ? cdata<T>(*g) : nullptr, h ? cdata<T>(*h) : nullptr, wk, gk, hk,
                         mdata<acc_t<T>>(out), pre, C, post};
    if (a.g && a.h)
      scores_kernel<T, true, true>(a, K);
    else if (a.g)
      scores_kernel<T, true, false>(a, K);
    else
      scores_kernel<T, false, true>(a, K);
  });
  return out;
}

}  // namespace cahfp
