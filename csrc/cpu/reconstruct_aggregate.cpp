// reconstruct_aggregate on the CPU.
//
// The output is tiled by rows (output channels). A thread owns whole rows; for
// each row it keeps a float32 (float64) accumulator of Cin * T elements in
// cache, adds every client that keeps the row, in client order, reading each
// client element exactly once, then writes the row. Per-client inverse row maps
// turn "does client k keep row r, and where" into one lookup, so there is a
// single pass over the output and no per-client full-size temporary. The
// per-element summation order is fixed (client 0, 1, ...), so results are
// bit-identical whatever the thread count.
#include "common.h"

#include <ATen/ops/empty.h>

#include <cstring>
#include <string>

namespace cahfp {
namespace {

template <typename ct>
struct ClientView {
  const ct* data;
  int64_t stride0;  // elements between kept rows
  int64_t stride1;  // elements between kept columns
  int64_t rows;     // kept rows
  int64_t cols;     // kept columns
};

template <typename wt, typename ct, bool kOverlap>
void aggregate_rows(const wt* W, wt* out, int64_t R, int64_t Cin, int64_t T,
                    const std::vector<ClientView<ct>>& clients, const std::vector<int32_t>& inv_rows,
                    const int64_t* cols, int64_t mc, const std::vector<acc_t<wt>>& p) {
  using acc = acc_t<wt>;
  const int64_t K = static_cast<int64_t>(clients.size());
  const int64_t row_elems = Cin * T;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_elems));
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    std::vector<acc> sum(static_cast<size_t>(row_elems));
    std::vector<acc> den(kOverlap ? static_cast<size_t>(Cin) : 0);
    std::vector<uint8_t> covered(static_cast<size_t>(Cin));
    for (int64_t r = r0; r < r1; ++r) {
      const wt* wrow = W + r * row_elems;
      wt* orow = out + r * row_elems;
      std::fill(sum.begin(), sum.end(), acc(0));
      std::fill(covered.begin(), covered.end(), uint8_t(0));
      if constexpr (kOverlap) std::fill(den.begin(), den.end(), acc(0));
      bool any = false;
      for (int64_t k = 0; k < K; ++k) {
        const int32_t i = inv_rows[k * R + r];
        const acc pk = p[k];
        if (i < 0 || pk == acc(0)) continue;
        any = true;
        const ClientView<ct>& cv = clients[k];
        const ct* crow = cv.data + i * cv.stride0;
        const int64_t* ck = cols + k * mc;
        for (int64_t j = 0; j < cv.cols; ++j) {
          const int64_t c = ck[j];
          const ct* src = crow + j * cv.stride1;
          acc* s = sum.data() + c * T;
          if constexpr (kOverlap) {
            for (int64_t t = 0; t < T; ++t) s[t] += pk * static_cast<acc>(src[t]);
            den[c] += pk;
          } else {
            const wt* w = wrow + c * T;
            for (int64_t t = 0; t < T; ++t)
              s[t] += pk * (static_cast<acc>(src[t]) - static_cast<acc>(w[t]));
          }
          covered[c] = 1;
        }
      }
      if (!any) {
        std::memcpy(orow, wrow, sizeof(wt) * row_elems);
        continue;
      }
      for (int64_t c = 0; c < Cin; ++c) {
        const wt* w = wrow + c * T;
        wt* o = orow + c * T;
        const acc* s = sum.data() + c * T;
        if (!covered[c]) {
          std::memcpy(o, w, sizeof(wt) * T);
        } else if constexpr (kOverlap) {
          const acc d = den[c];
          for (int64_t t = 0; t < T; ++t) o[t] = static_cast<wt>(s[t] / d);
        } else {
          for (int64_t t = 0; t < T; ++t) o[t] = static_cast<wt>(static_cast<acc>(w[t]) + s[t]);
        }
      }
    }
  });
}

}  // namespace

// weight: (R, Cin, T) contiguous. clients[k]: (>= kept rows, >= kept cols, T),
// last dim contiguous. rows / cols: (K, m) int64, -1 padded. coef: (K,) float64,
// already normalised. mode: "reconstruct" or "overlap".
at::Tensor reconstruct_aggregate_cpu(const at::Tensor& weight, at::TensorList clients,
                                     const at::Tensor& rows, const at::Tensor& cols,
                                     const at::Tensor& coef, c10::string_view mode) {
  TORCH_CHECK(weight.device().is_cpu(), "weight must be a CPU tensor");
  TORCH_CHECK(weight.dim() == 3 && weight.is_contiguous(), "weight must be a contiguous (R, Cin, T) tensor");
  const int64_t K = static_cast<int64_t>(clients.size());
  TORCH_CHECK(K > 0, "clients must not be empty");
  check_keep_tensor(rows, K, "rows");
  check_keep_tensor(cols, K, "cols");
  TORCH_CHECK(coef.dim() == 1 && coef.size(0) == K && coef.scalar_type() == at::kDouble && coef.device().is_cpu(),
              "coef must be a (K,) float64 CPU tensor");
  const bool overlap = mode == "overlap";
  TORCH_CHECK(overlap || mode == "reconstruct", "mode must be 'reconstruct' or 'overlap'");
  const int64_t R = weight.size(0), Cin = weight.size(1), T = weight.size(2);
  const auto cdtype = clients[0].scalar_type();
  const std::vector<int64_t> rcount = keep_counts(rows), ccount = keep_counts(cols);
  for (int64_t k = 0; k < K; ++k) {
    const at::Tensor& c = clients[k];
    TORCH_CHECK(c.device().is_cpu() && c.scalar_type() == cdtype, "clients[", k, "] must be a CPU tensor of dtype ",
                cdtype);
    TORCH_CHECK(c.dim() == 3 && c.size(0) >= rcount[k] && c.size(1) >= ccount[k] && c.size(2) == T,
                "clients[", k, "] has shape ", c.sizes(), ", too small for ", rcount[k], " rows x ", ccount[k],
                " cols x ", T);
    TORCH_CHECK(c.stride(2) == 1 || T == 1, "clients[", k, "] must be contiguous in its last dim");
  }
  const std::vector<int32_t> inv_rows = inverse_maps(rows, R, "rows");
  (void)inverse_maps(cols, Cin, "cols");  // bounds check of the column indices
  at::Tensor out = new_output({R, Cin, T}, weight.options());
  const double* cp = coef.const_data_ptr<double>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "reconstruct_aggregate", [&] {
    using wt = scalar_t;
    std::vector<acc_t<wt>> p(K);
    for (int64_t k = 0; k < K; ++k) p[k] = static_cast<acc_t<wt>>(cp[k]);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cdtype, "reconstruct_aggregate_client", [&] {
      using ct = scalar_t;
      std::vector<ClientView<ct>> views(K);
      for (int64_t k = 0; k < K; ++k) {
        const at::Tensor& c = clients[k];
        views[k] = {c.const_data_ptr<ct>(), c.stride(0), c.stride(1), rcount[k], ccount[k]};
      }
      const wt* W = weight.const_data_ptr<wt>();
      wt* O = out.mutable_data_ptr<wt>();
      const int64_t* C = cols.const_data_ptr<int64_t>();
      if (overlap)
        aggregate_rows<wt, ct, true>(W, O, R, Cin, T, views, inv_rows, C, cols.size(1), p);
      else
        aggregate_rows<wt, ct, false>(W, O, R, Cin, T, views, inv_rows, C, cols.size(1), p);
    });
  });
  return out;
}

}  // namespace cahfp
