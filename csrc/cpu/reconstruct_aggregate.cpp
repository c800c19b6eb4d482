// reconstruct_aggregate on the CPU, for one tensor or a whole model in one call.
//
// Each tensor is viewed as (R, Cin, T): output channels, input channels, and the
// dense trailing elements (1-D tensors: (1, R, 1), one row whose columns are the
// channels, so a bias is one work item, not R tiny ones). The output is split into
// tiles of consecutive rows (~64 KB of float32 accumulator, in cache); tiles of
// all tensors form one parallel loop. For a tile, the loop is client-major: keep
// sets are ascending, so the tile's rows kept by client k are consecutive rows of
// k's compact tensor. Every client element is read once; every output element is
// written once by one thread, receiving its clients in the fixed order 0..K-1, so
// results are bit-identical whatever the thread count. Per-client inverse row maps
// answer "does client k keep row r, and where" in one lookup; there is no
// per-client full-size temporary. Elements no client keeps are copied bit for bit.
// The tile loop comes in baseline / AVX2 variants (isa.h), bit-identical.
#include "common.h"
#include "isa.h"

#include <cstring>
#include <string>
#include <type_traits>

namespace cahfp {
namespace {

// Accumulator elements per tile (64 KB of float32): measured neutral between one row
// and 256 KB on VGG-16; results never depend on it.
constexpr int64_t kTileElems = 16384;

template <typename ct>
struct ClientView {
  const ct* data;
  int64_t stride0;  // elements between kept rows
  int64_t stride1;  // elements between kept columns
  int64_t rows;     // kept rows
  int64_t cols;     // kept columns
};

// One tensor's aggregation, viewed as (R, Cin, T).
template <typename wt, typename ct>
struct Job {
  const wt* W;
  wt* out;
  int64_t R, Cin, T;
  std::vector<ClientView<ct>> clients;
  std::vector<int32_t> inv_rows;  // (K, R)
  const int64_t* cols;            // (K, mc) kept columns, -1 padded
  int64_t mc;
  int64_t tile;                   // rows per tile
};

// Eight float32 lanes (GCC/Clang vector extension: AVX when the build enables it,
// two SSE registers otherwise). Unaligned loads and stores go through memcpy.
typedef float f32x8 __attribute__((vector_size(32)));
inline f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, f32x8 v) { std::memcpy(p, &v, sizeof(v)); }

// s[t] += pk * (src[t] - w[t]) for t < T. Which lanes handle which t depends only
// on T, never on threads, so the float32 path stays deterministic.
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

// Thread-local scratch for one tile.
template <typename acc>
struct Scratch {
  std::vector<acc> sum, den;
  std::vector<uint8_t> covered;
};

// Rows [r0, r1) of one job. kTaps: T when known at compile time (1 or 9), else 0.
template <typename wt, typename ct, bool kOverlap, int kTaps>
void aggregate_tile(const Job<wt, ct>& job, int64_t r0, int64_t r1, const std::vector<acc_t<wt>>& p,
                    Scratch<acc_t<wt>>& scratch) {
  using acc = acc_t<wt>;
  const int64_t T = kTaps > 0 ? kTaps : job.T;
  const int64_t Cin = job.Cin, R = job.R, row_elems = Cin * T, nr = r1 - r0;
  const int64_t K = static_cast<int64_t>(job.clients.size());
  auto& sum = scratch.sum;
  auto& den = scratch.den;
  auto& covered = scratch.covered;
  if (static_cast<int64_t>(sum.size()) < nr * row_elems) sum.resize(nr * row_elems);
  if (static_cast<int64_t>(covered.size()) < nr * Cin) covered.resize(nr * Cin);
  if (kOverlap && static_cast<int64_t>(den.size()) < nr * Cin) den.resize(nr * Cin);
  std::fill(sum.begin(), sum.begin() + nr * row_elems, acc(0));
  std::fill(covered.begin(), covered.begin() + nr * Cin, uint8_t(0));
  if constexpr (kOverlap) std::fill(den.begin(), den.begin() + nr * Cin, acc(0));
  for (int64_t k = 0; k < K; ++k) {
    const acc pk = p[k];
    if (pk == acc(0)) continue;
    const ClientView<ct>& cv = job.clients[k];
    const int32_t* pos = job.inv_rows.data() + k * R;
    const int64_t* ck = job.cols + k * job.mc;
    for (int64_t r = r0; r < r1; ++r) {
      const int32_t i = pos[r];
      if (i < 0) continue;
      const ct* crow = cv.data + i * cv.stride0;
      const wt* wrow = job.W + r * row_elems;
      acc* const sp = sum.data() + (r - r0) * row_elems;
      for (int64_t j = 0; j < cv.cols; ++j) {
        const int64_t c = ck[j];
        if constexpr (kOverlap)
          add_scaled<acc, ct, kTaps>(sp + c * T, crow + j * cv.stride1, pk, T);
        else
          add_scaled_delta<acc, ct, wt, kTaps>(sp + c * T, crow + j * cv.stride1, wrow + c * T, pk, T);
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
    const wt* wrow = job.W + r * row_elems;
    wt* orow = job.out + r * row_elems;
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

template <typename wt, typename ct, bool kOverlap>
void run_tile(const Job<wt, ct>& job, int64_t r0, int64_t r1, const std::vector<acc_t<wt>>& p,
              Scratch<acc_t<wt>>& scratch) {
  if constexpr (std::is_same_v<wt, ct>) {  // the common case gets unrolled tap loops
    if (job.T == 9) return aggregate_tile<wt, ct, kOverlap, 9>(job, r0, r1, p, scratch);
    if (job.T == 1) return aggregate_tile<wt, ct, kOverlap, 1>(job, r0, r1, p, scratch);
  }
  aggregate_tile<wt, ct, kOverlap, 0>(job, r0, r1, p, scratch);
}

// (R, Cin, T) view sizes of an N-D tensor; 1-D tensors become (1, R, 1).
struct View3 {
  int64_t R, Cin, T;
  bool row_vector;
};

View3 view3(const Tensor& w) {
  if (w.dim() == 1) return {1, w.size(0), 1, true};
  const int64_t R = w.size(0), Cin = w.size(1);
  int64_t T = 1;
  for (int64_t d = 2; d < w.dim(); ++d) T *= w.size(d);
  return {R, Cin, T, false};
}

// Trailing dims (from dim 2 on) packed densely, so a (row, col) block is contiguous.
// sizes / strides: the tensor's (one stable-ABI call each, not one per dim).
template <typename Array>
bool trailing_dense(const Array& sizes, const Array& strides) {
  int64_t expected = 1;
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 2; --d) {
    if (sizes[d] != 1 && strides[d] != expected) return false;
    expected *= sizes[d];
  }
  return true;
}

// Work items [i0, i1): (job, first row) pairs, each one tile.
template <typename wt, typename ct>
inline void run_items(const std::vector<Job<wt, ct>>& jobs, const std::vector<std::pair<int32_t, int64_t>>& items,
                      const std::vector<acc_t<wt>>& p, bool overlap, int64_t i0, int64_t i1) {
  Scratch<acc_t<wt>> scratch;
  for (int64_t it = i0; it < i1; ++it) {
    const auto& job = jobs[items[it].first];
    const int64_t r0 = items[it].second, r1 = std::min(job.R, r0 + job.tile);
    if (overlap)
      run_tile<wt, ct, true>(job, r0, r1, p, scratch);
    else
      run_tile<wt, ct, false>(job, r0, r1, p, scratch);
  }
}

#define CAHFP_RA_HEAD template <typename wt, typename ct>
#define CAHFP_RA_ARGS <wt, ct>
// AVX2 at most: the AVX-512 build of these short (T = 9) rows measured 5-20 % slower.
CAHFP_ISA_VARIANTS_UPTO_AVX2(CAHFP_RA_HEAD, CAHFP_RA_ARGS, run_items_isa, (run_items<wt, ct>),
                   (const std::vector<Job<wt, ct>>& jobs, const std::vector<std::pair<int32_t, int64_t>>& items,
                    const std::vector<acc_t<wt>>& p, bool overlap, int64_t i0, int64_t i1),
                   (jobs, items, p, overlap, i0, i1))

template <typename wt, typename ct>
void run_jobs(std::vector<Job<wt, ct>>& jobs, const std::vector<acc_t<wt>>& p, bool overlap) {
  // Work items: (job, first row) for every tile of every tensor.
  std::vector<std::pair<int32_t, int64_t>> items;
  for (size_t n = 0; n < jobs.size(); ++n)
    for (int64_t r = 0; r < jobs[n].R; r += jobs[n].tile) items.emplace_back(static_cast<int32_t>(n), r);
  const auto run = run_items_isa_pick<wt, ct>();
  torch::stable::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    run(jobs, items, p, overlap, i0, i1);
  });
}

}  // namespace

// weights[n]: N-D, one floating dtype. clients[n * K + k]: client k's compact tensor n
// (>= kept rows, >= kept cols, *weights[n].shape[2:]; 1-D: >= kept rows), one floating
// dtype. rows[n] / cols[n]: (K, m) int64, -1 padded (cols of a 1-D weight: (K, 1) zeros).
// coef: (K,) float64, normalised. mode: "reconstruct" or "overlap".
// Returns one packed buffer holding the N results in order.
Tensor reconstruct_aggregate_many_cpu(std::vector<Tensor> weights, std::vector<Tensor> clients,
                                      std::vector<Tensor> rows, std::vector<Tensor> cols, Tensor coef,
                                      std::string mode) {
  const int64_t N = static_cast<int64_t>(weights.size());
  STD_TORCH_CHECK(N > 0, "weights must not be empty");
  STD_TORCH_CHECK(static_cast<int64_t>(rows.size()) == N && static_cast<int64_t>(cols.size()) == N,
              "rows and cols need one entry per weight");
  STD_TORCH_CHECK(!clients.empty() && static_cast<int64_t>(clients.size()) % N == 0,
              "clients must hold K tensors per weight");
  const int64_t K = static_cast<int64_t>(clients.size()) / N;
  STD_TORCH_CHECK(coef.dim() == 1 && coef.size(0) == K && coef.scalar_type() == ScalarType::Double && coef.is_cpu(),
              "coef must be a (K,) float64 CPU tensor");
  const bool overlap = mode == "overlap";
  STD_TORCH_CHECK(overlap || mode == "reconstruct", "mode must be 'reconstruct' or 'overlap'");
  const auto wdtype = weights[0].scalar_type();
  const auto cdtype = clients[0].scalar_type();
  int64_t total = 0;
  std::vector<Tensor> ws(N), cs(clients.size());
  for (int64_t n = 0; n < N; ++n) {
    STD_TORCH_CHECK(weights[n].is_cpu() && weights[n].scalar_type() == wdtype && weights[n].dim() >= 1,
                    "weights[", n, "] must be a CPU tensor of dtype ", dtype_name(wdtype));
    ws[n] = torch::stable::contiguous(weights[n]);
    total += ws[n].numel();
  }
  STD_TORCH_CHECK(is_floating(wdtype) && is_floating(cdtype), "weights and clients must be floating");
  Tensor out = new_output({total}, wdtype);
  const double* cp = cdata<double>(coef);

  CAHFP_DISPATCH_FLOATING(wdtype, "reconstruct_aggregate", [&] {
    using wt = scalar_t;
    std::vector<acc_t<wt>> p(K);
    for (int64_t k = 0; k < K; ++k) p[k] = static_cast<acc_t<wt>>(cp[k]);
    CAHFP_DISPATCH_FLOATING(cdtype, "reconstruct_aggregate_client", [&] {
      using ct = scalar_t;
      std::vector<Job<wt, ct>> jobs(N);
      int64_t offset = 0;
      for (int64_t n = 0; n < N; ++n) {
        const View3 v = view3(ws[n]);
        const int64_t R0 = ws[n].size(0), C0 = ws[n].dim() >= 2 ? ws[n].size(1) : 1;
        check_keep_tensor(rows[n], K, "rows");
        check_keep_tensor(cols[n], K, "cols");
        const std::vector<int64_t> rc = keep_counts(rows[n]), cc = keep_counts(cols[n]);
        std::vector<int32_t> inv_r = inverse_maps(rows[n], R0, "rows");
        (void)inverse_maps(cols[n], C0, "cols");  // bounds check of the column indices
        Job<wt, ct>& job = jobs[n];
        job.W = cdata<wt>(ws[n]);
        job.out = mdata<wt>(out) + offset;
        job.R = v.R;
        job.Cin = v.Cin;
        job.T = v.T;
        job.clients.resize(K);
        for (int64_t k = 0; k < K; ++k) {
          // Few stable-ABI calls per client tensor (a model can bring tens of thousands).
          Tensor c = clients[n * K + k];
          STD_TORCH_CHECK(c.is_cpu() && c.scalar_type() == cdtype, "clients[", k, "] of weight ", n,
                          " must be a CPU tensor of dtype ", dtype_name(cdtype));
          const auto sizes = c.sizes();
          const int64_t cdim = static_cast<int64_t>(sizes.size());
          int64_t cnumel = 1;
          for (int64_t d = 0; d < cdim; ++d) cnumel *= sizes[d];
          const bool ok = ws[n].dim() == 1
                              ? (cdim >= 1 && sizes[0] >= rc[k])
                              : (cdim >= 2 && sizes[0] >= rc[k] && sizes[1] >= cc[k] &&
                                 cnumel / std::max<int64_t>(1, sizes[0] * sizes[1]) == v.T);
          STD_TORCH_CHECK(ok || (cnumel == 0 && (rc[k] == 0 || cc[k] == 0)), "clients[", k, "] of weight ", n,
                          " has shape ", shape_str(c), ", too small for ", rc[k], " rows x ", cc[k], " cols");
          auto strides = c.strides();
          if (!trailing_dense(sizes, strides)) {
            c = torch::stable::contiguous(c);
            strides = c.strides();
          }
          cs[n * K + k] = c;
          const int64_t s0 = cdim >= 1 ? strides[0] : 1, s1 = cdim >= 2 ? strides[1] : 1;
          // 1-D: one row (always kept when the client keeps anything) whose columns are the channels.
          const ct* data = cdata<ct>(c);
          job.clients[k] = v.row_vector ? ClientView<ct>{data, 0, s0, rc[k] > 0 ? 1 : 0, rc[k]}
                                        : ClientView<ct>{data, s0, s1, rc[k], cc[k]};
        }
        if (v.row_vector) {
          job.inv_rows.assign(K, -1);
          for (int64_t k = 0; k < K; ++k)
            if (rc[k] > 0) job.inv_rows[k] = 0;
          job.cols = cdata<int64_t>(rows[n]);
          job.mc = rows[n].size(1);
        } else {
          job.inv_rows = std::move(inv_r);
          job.cols = cdata<int64_t>(cols[n]);
          job.mc = cols[n].size(1);
        }
        job.tile = std::max<int64_t>(1, std::min<int64_t>(job.R, kTileElems / std::max<int64_t>(1, job.Cin * job.T)));
        offset += ws[n].numel();
      }
      // Enough tiles for every thread: split further where a model has few, large tensors.
      int64_t n_items = 0;
      for (const auto& job : jobs) n_items += (job.R + job.tile - 1) / job.tile;
      const int64_t want = 4 * static_cast<int64_t>(torch::stable::get_num_threads());
      if (n_items < want)
        for (auto& job : jobs) job.tile = std::max<int64_t>(1, job.tile * n_items / want);
      run_jobs<wt, ct>(jobs, p, overlap);
    });
  });
  return out;
}

// Single tensor: the N = 1 case. weight N-D; clients[k] as above; returns weight's shape.
Tensor reconstruct_aggregate_cpu(Tensor weight, std::vector<Tensor> clients, Tensor rows, Tensor cols, Tensor coef,
                                 std::string mode) {
  STD_TORCH_CHECK(!clients.empty(), "clients must not be empty");
  std::vector<int64_t> shape(weight.sizes().begin(), weight.sizes().end());
  Tensor out = reconstruct_aggregate_many_cpu({weight}, std::move(clients), {rows}, {cols}, coef, std::move(mode));
  return torch::stable::view(out, shape);
}

}  // namespace cahfp
