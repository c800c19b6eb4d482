// reconstruct_aggregate on the CPU.
//
// The output is tiled by rows (output channels). A thread owns whole tiles; for
// each tile it keeps a float32 (float64) accumulator in cache, adds every client
// that covers the tile, in client order, reading each client element exactly
// once, then writes the tile. Per-client inverse row maps turn "does client k
// keep row r, and where" into one lookup, so there is a single pass over the
// output and no per-client full-size temporary. The per-element summation order
// is fixed (client 0, 1, ...), so results are bit-identical whatever the thread
// count. Elements no client keeps are copied from the weight.
#include "common.h"

#include <ATen/ops/empty.h>

#include <cstring>
#include <string>
#include <type_traits>

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

// Eight float32 lanes (GCC/Clang vector extension: AVX when the build enables
// it, two SSE registers otherwise). Unaligned loads and stores go through memcpy.
typedef float f32x8 __attribute__((vector_size(32)));
inline f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, f32x8 v) { std::memcpy(p, &v, sizeof(v)); }

// s[t] += pk * (src[t] - w[t]) for t < T. Which lanes handle which t depends only on
// T, never on threads, so the float32 path stays deterministic.
template <typename acc, typename ct, typename wt, int kTaps>
inline void add_scaled_delta(acc* __restrict__ s, const ct* __restrict__ src, const wt* __restrict__ w, acc pk,
                             int64_t T_runtime) {
  const int64_t T = kTaps > 0 ? kTaps : T_runtime;
  int64_t t = 0;
  if constexpr (std::is_same_v<acc, float> && std::is_same_v<ct, float> && std::is_same_v<wt, float>) {
    for (; t + 8 <= T; t += 8) store8(s + t, load8(s + t) + pk * (load8(src + t) - load8(w + t)));
  }
  for (; t < T; ++t) s[t] += pk * (static_cast<acc>(src[t]) - static_cast<acc>(w[t]));
}

// s[t] += pk * src[t] for t < T.
template <typename acc, typename ct, int kTaps>
inline void add_scaled(acc* __restrict__ s, const ct* __restrict__ src, acc pk, int64_t T_runtime) {
  const int64_t T = kTaps > 0 ? kTaps : T_runtime;
  int64_t t = 0;
  if constexpr (std::is_same_v<acc, float> && std::is_same_v<ct, float>) {
    for (; t + 8 <= T; t += 8) store8(s + t, load8(s + t) + pk * load8(src + t));
  }
  for (; t < T; ++t) s[t] += pk * static_cast<acc>(src[t]);
}

// kTaps: the trailing element count T when known at compile time (1 for linear
// layers and biases, 9 for 3x3 convolutions), 0 for a runtime T.
//
// The output is processed in tiles of consecutive rows (~128 KB of float32
// accumulator, so a tile stays in L2). Within a tile the loop is client-major:
// keep sets are ascending, so the tile's rows kept by client k are consecutive
// rows of client k's compact tensor, i.e. one sequential run of its memory.
// Every element still receives its clients in order 0, 1, ..., K-1.
// Accumulator elements per tile (64 KB of float32): measured neutral between one
// row and 256 KB on VGG-16; results never depend on it.
constexpr int64_t kTileElems = 16384;

template <typename wt, typename ct, bool kOverlap, int kTaps>
void aggregate_rows(const wt* W, wt* out, int64_t R, int64_t Cin, int64_t T_runtime,
                    const std::vector<ClientView<ct>>& clients, const std::vector<int32_t>& inv_rows,
                    const int64_t* cols, int64_t mc, const std::vector<acc_t<wt>>& p) {
  using acc = acc_t<wt>;
  const int64_t T = kTaps > 0 ? kTaps : T_runtime;
  const int64_t K = static_cast<int64_t>(clients.size());
  const int64_t row_elems = Cin * T;
  // Tile size does not change any result (each element's client order is fixed);
  // it only balances cache use against having enough tiles for every thread.
  const int64_t balanced = (R + 4 * at::get_num_threads() - 1) / (4 * at::get_num_threads());
  const int64_t tile = std::max<int64_t>(1, std::min<int64_t>(balanced, kTileElems / std::max<int64_t>(1, row_elems)));
  const int64_t n_tiles = (R + tile - 1) / tile;
  at::parallel_for(0, n_tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc> sum(static_cast<size_t>(tile * row_elems));
    std::vector<acc> den(kOverlap ? static_cast<size_t>(tile * Cin) : 0);
    std::vector<uint8_t> covered(static_cast<size_t>(tile * Cin));
    for (int64_t ti = t0; ti < t1; ++ti) {
      const int64_t r0 = ti * tile, r1 = std::min(R, r0 + tile), nr = r1 - r0;
      std::fill(sum.begin(), sum.begin() + nr * row_elems, acc(0));
      std::fill(covered.begin(), covered.begin() + nr * Cin, uint8_t(0));
      if constexpr (kOverlap) std::fill(den.begin(), den.begin() + nr * Cin, acc(0));
      for (int64_t k = 0; k < K; ++k) {
        const acc pk = p[k];
        if (pk == acc(0)) continue;
        const ClientView<ct>& cv = clients[k];
        const int32_t* pos = inv_rows.data() + k * R;
        const int64_t* ck = cols + k * mc;
        const int64_t stride1 = cv.stride1;
        for (int64_t r = r0; r < r1; ++r) {
          const int32_t i = pos[r];
          if (i < 0) continue;
          const ct* crow = cv.data + i * cv.stride0;
          const wt* wrow = W + r * row_elems;
          acc* const sp = sum.data() + (r - r0) * row_elems;
          for (int64_t j = 0; j < cv.cols; ++j) {
            const int64_t c = ck[j];
            if constexpr (kOverlap)
              add_scaled<acc, ct, kTaps>(sp + c * T, crow + j * stride1, pk, T);
            else
              add_scaled_delta<acc, ct, wt, kTaps>(sp + c * T, crow + j * stride1, wrow + c * T, pk, T);
          }
          // Coverage (and overlap weights) in a separate pass: a byte store inside the
          // loop above would alias every pointer and block vectorisation.
          uint8_t* cov = covered.data() + (r - r0) * Cin;
          for (int64_t j = 0; j < cv.cols; ++j) cov[ck[j]] = 1;
          if constexpr (kOverlap) {
            acc* d = den.data() + (r - r0) * Cin;
            for (int64_t j = 0; j < cv.cols; ++j) d[ck[j]] += pk;
          }
        }
      }
      for (int64_t r = r0; r < r1; ++r) {
        const wt* wrow = W + r * row_elems;
        wt* orow = out + r * row_elems;
        const acc* srow = sum.data() + (r - r0) * row_elems;
        const uint8_t* cov = covered.data() + (r - r0) * Cin;
        for (int64_t c = 0; c < Cin; ++c) {
          const wt* w = wrow + c * T;
          wt* o = orow + c * T;
          const acc* s = srow + c * T;
          if (!cov[c]) {
            std::memcpy(o, w, sizeof(wt) * T);
          } else if constexpr (kOverlap) {
            const acc d = den[(r - r0) * Cin + c];
            for (int64_t t = 0; t < T; ++t) o[t] = static_cast<wt>(s[t] / d);
          } else {
            for (int64_t t = 0; t < T; ++t) o[t] = static_cast<wt>(static_cast<acc>(w[t]) + s[t]);
          }
        }
      }
    }
  });
}

template <typename wt, typename ct, bool kOverlap>
void aggregate_dispatch_taps(const wt* W, wt* out, int64_t R, int64_t Cin, int64_t T,
                             const std::vector<ClientView<ct>>& clients, const std::vector<int32_t>& inv_rows,
                             const int64_t* cols, int64_t mc, const std::vector<acc_t<wt>>& p) {
  if constexpr (std::is_same_v<wt, ct>) {  // the common case gets unrolled tap loops
    if (T == 9) return aggregate_rows<wt, ct, kOverlap, 9>(W, out, R, Cin, T, clients, inv_rows, cols, mc, p);
    if (T == 1) return aggregate_rows<wt, ct, kOverlap, 1>(W, out, R, Cin, T, clients, inv_rows, cols, mc, p);
  }
  aggregate_rows<wt, ct, kOverlap, 0>(W, out, R, Cin, T, clients, inv_rows, cols, mc, p);
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
        aggregate_dispatch_taps<wt, ct, true>(W, O, R, Cin, T, views, inv_rows, C, cols.size(1), p);
      else
        aggregate_dispatch_taps<wt, ct, false>(W, O, R, Cin, T, views, inv_rows, C, cols.size(1), p);
    });
  });
  return out;
}

}  // namespace cahfp
