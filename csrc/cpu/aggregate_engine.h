// The tile engine behind the single-tensor and keep-set CPU aggregation kernels.
//
// A tensor is viewed as (R, Cin, T): output channels, input channels, and the dense
// trailing elements (1-D tensors: (1, R, 1), one row whose columns are the channels).
// A client's compact tensor is addressed through a ClientView (data pointer and the
// strides of its kept rows and columns), so separate uploads and one packed buffer per
// client are read in place alike. Keep sets arrive as per-client inverse row maps
// (int32, -1: not kept) and lists of kept columns (int32), each a pointer with a
// per-client stride: the per-round layout's tables, or tables built for one call.
//
// Reply statistics: with kStats, the same pass that accumulates a client also sums the
// squares of its deltas `c - w` (in float64, over every kept element) and flags
// non-finite values (a delta not finite in the accumulation dtype, or a client value not
// finite once converted to the global dtype). The statistics are written per work item
// and reduced in item order afterwards, so they too are independent of the thread count.
#pragma once

#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace cahfp {
namespace engine {

template <typename ct>
struct ClientView {
  const ct* data;
  int64_t stride0;  // elements between kept rows
  int64_t stride1;  // elements between kept columns
  int64_t rows;     // kept rows
  int64_t cols;     // kept columns
};

// One tensor's aggregation. Client k keeps row r at compact position
// inv_rows[k * inv_stride + r] (or -1) and columns cols[k * col_stride + j], j < clients[k].cols.
template <typename wt, typename ct>
struct Job {
  const wt* W = nullptr;
  wt* out = nullptr;
  int64_t R = 0, Cin = 0, T = 0;
  std::vector<ClientView<ct>> clients;
  const int32_t* inv_rows = nullptr;
  int64_t inv_stride = 0;
  const int32_t* cols = nullptr;
  int64_t col_stride = 0;
  int64_t tile = 1;  // rows per work item
};

// Eight float32 lanes and four float64 lanes (GCC/Clang vector extensions: AVX when the
// variant enables it, SSE pairs otherwise). Unaligned loads and stores go through memcpy.
typedef float f32x8 __attribute__((vector_size(32)));
inline f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, f32x8 v) { std::memcpy(p, &v, sizeof(v)); }

// Client values whose conversion to the global dtype can overflow although the
// accumulation-dtype delta stays finite (a float32 upload into a float16 global).
template <typename wt, typename ct>
constexpr bool kNarrowingCheck = !std::is_same_v<wt, ct> && !std::is_same_v<wt, float> && !std::is_same_v<wt, double>;

template <typename wt, typename ct>
inline bool narrowing_overflow(const ct* src, int64_t T) {
  bool bad = false;
  for (int64_t t = 0; t < T; ++t) bad |= !std::isfinite(static_cast<float>(static_cast<wt>(static_cast<float>(src[t]))));
  return bad;
}

// Running sum of squared deltas. All-float32 data square and add in float32 lanes, over
// the whole of a client's part of a tile (no horizontal sum per block), turned into
// float64 once at the end; a partial that overflows float32 is counted again exactly
// (kExact), so only non-finite deltas make the statistic non-finite. Other dtypes add in
// float64 throughout. Which lane takes which element depends only on block lengths,
// never on threads.
struct SsqAcc {
  f32x8 v = {0, 0, 0, 0, 0, 0, 0, 0};
  float t = 0.0f;
  double s = 0.0;
  double total() const {
    const double lanes = ((static_cast<double>(v[0]) + static_cast<double>(v[1])) +
                          (static_cast<double>(v[2]) + static_cast<double>(v[3]))) +
                         ((static_cast<double>(v[4]) + static_cast<double>(v[5])) +
                          (static_cast<double>(v[6]) + static_cast<double>(v[7])));
    return (lanes + static_cast<double>(t)) + s;
  }
};

template <typename acc, typename ct, typename wt>
constexpr bool kAllFloat = std::is_same_v<acc, float> && std::is_same_v<ct, float> && std::is_same_v<wt, float>;

// s[t] += pk * (src[t] - w[t]) for t < n (kAdd), and, with kStats, q += (src[t] - w[t])^2
// (float32 lanes for all-float32 data unless kExact, else float64). n: kTaps when known
// at compile time, else n_runtime.
template <typename acc, typename ct, typename wt, int kTaps, bool kAdd, bool kStats, bool kExact = false>
inline void delta_pass(acc* __restrict__ s, const ct* __restrict__ src, const wt* __restrict__ w, acc pk,
                       int64_t n_runtime, SsqAcc& q, bool& bad) {
  const int64_t T = kTaps > 0 ? kTaps : n_runtime;
  constexpr bool kFast = kAllFloat<acc, ct, wt> && !kExact;
  int64_t t = 0;
  if constexpr (kFast) {
    for (; t + 8 <= T; t += 8) {
      const f32x8 d = load8(src + t) - load8(w + t);
      if constexpr (kAdd) store8(s + t, load8(s + t) + pk * d);
      if constexpr (kStats) q.v += d * d;
    }
  }
  for (; t < T; ++t) {
    const acc d = static_cast<acc>(src[t]) - static_cast<acc>(w[t]);
    if constexpr (kAdd) s[t] += pk * d;
    if constexpr (kStats && kFast) q.t += d * d;
    if constexpr (kStats && !kFast) {
      q.s += static_cast<double>(d) * static_cast<double>(d);
      if constexpr (std::is_same_v<acc, double>) bad |= !std::isfinite(d);
    }
  }
  if constexpr (kStats && kNarrowingCheck<wt, ct>) bad |= narrowing_overflow<wt>(src, T);
}

// Bytes read ahead of a client's current row.
constexpr int64_t kPrefetchAhead = 1024;  // measured: 2 and 4 KB no better

// Length of the run of consecutive kept columns starting at ck[j] (ck ascending).
inline int64_t run_length(const int32_t* ck, int64_t j, int64_t cols) {
  int64_t L = 1;
  while (j + L < cols && ck[j + L] == ck[j] + L) ++L;
  return L;
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

// d[t] += m[t] for t < n.
template <typename acc>
inline void add_rows(acc* __restrict__ d, const acc* __restrict__ m, int64_t n) {
  int64_t t = 0;
  if constexpr (std::is_same_v<acc, float>)
    for (; t + 8 <= n; t += 8) store8(d + t, load8(d + t) + load8(m + t));
  for (; t < n; ++t) d[t] += m[t];
}

// o[t] = w[t] + s[t] for t < n.
template <typename wt, typename acc>
inline void finish_sum(wt* __restrict__ o, const wt* __restrict__ w, const acc* __restrict__ s, int64_t n) {
  int64_t t = 0;
  if constexpr (std::is_same_v<wt, float> && std::is_same_v<acc, float>)
    for (; t + 8 <= n; t += 8) store8(o + t, load8(w + t) + load8(s + t));
  for (; t < n; ++t) o[t] = static_cast<wt>(static_cast<acc>(w[t]) + s[t]);
}

// Prefetch the start of client k's rows in [r0, r1) (its next stream).
template <typename wt, typename ct>
inline void prefetch_segment(const Job<wt, ct>& job, int64_t k, int64_t r0, int64_t r1) {
  const int32_t* pos = job.inv_rows + k * job.inv_stride;
  for (int64_t r = r0; r < r1; ++r)
    if (pos[r] >= 0) {
      const char* p = reinterpret_cast<const char*>(job.clients[k].data + pos[r] * job.clients[k].stride0);
      for (int64_t b = 0; b < kPrefetchAhead; b += 64) __builtin_prefetch(p + b, 0, 3);
      return;
    }
}

// Client k's squared deltas over rows [r0, r1), counted in float64 (after the float32
// count overflowed).
template <typename wt, typename ct>
SsqAcc exact_stats(const Job<wt, ct>& job, int64_t k, int64_t r0, int64_t r1) {
  using acc = acc_t<wt>;
  const ClientView<ct>& cv = job.clients[k];
  const int32_t* pos = job.inv_rows + k * job.inv_stride;
  const int32_t* ck = job.cols + k * job.col_stride;
  const int64_t T = job.T, row_elems = job.Cin * T;
  SsqAcc q;
  bool b = false;
  for (int64_t r = r0; r < r1; ++r) {
    const int32_t i = pos[r];
    if (i < 0) continue;
    for (int64_t j = 0; j < cv.cols; ++j)
      delta_pass<acc, ct, wt, 0, false, true, true>(nullptr, cv.data + i * cv.stride0 + j * cv.stride1,
                                                    job.W + r * row_elems + ck[j] * T, acc(0), T, q, b);
  }
  return q;
}

// Thread-local scratch for one tile.
template <typename acc>
struct Scratch {
  std::vector<acc> sum, den;
  std::vector<uint8_t> covered;
};

// Per work item and client: squared-delta sum and non-finite flag.
struct ItemStats {
  double* ssq = nullptr;   // (items, K)
  uint8_t* bad = nullptr;  // (items, K)
};

// Rows [r0, r1) of one job. kTaps: T when known at compile time (1 or 9), else 0.
// Clients with pk == 0 add nothing (their statistics are still taken).
template <typename wt, typename ct, bool kOverlap, int kTaps, bool kStats>
void aggregate_tile(const Job<wt, ct>& job, int64_t r0, int64_t r1, const std::vector<acc_t<wt>>& p,
                    Scratch<acc_t<wt>>& scratch, double* ssq, uint8_t* bad) {
  using acc = acc_t<wt>;
  constexpr bool kDen = kOverlap;  // per (row, column) weight sums
  const int64_t T = kTaps > 0 ? kTaps : job.T;
  const int64_t Cin = job.Cin, row_elems = Cin * T, nr = r1 - r0;
  const int64_t K = static_cast<int64_t>(job.clients.size());
  auto& covered = scratch.covered;
  acc* sum_base;
  acc* den_base = nullptr;
  {
    auto& sum = scratch.sum;
    auto& den = scratch.den;
    if (static_cast<int64_t>(sum.size()) < nr * row_elems) sum.resize(nr * row_elems);
    if (static_cast<int64_t>(covered.size()) < nr * Cin) covered.resize(nr * Cin);
    if (kOverlap && static_cast<int64_t>(den.size()) < nr * Cin) den.resize(nr * Cin);
    std::fill(sum.begin(), sum.begin() + nr * row_elems, acc(0));
    std::fill(covered.begin(), covered.begin() + nr * Cin, uint8_t(0));
    if constexpr (kOverlap) std::fill(den.begin(), den.begin() + nr * Cin, acc(0));
    sum_base = sum.data();
    if constexpr (kOverlap) den_base = den.data();
  }
  for (int64_t k = 0; k < K; ++k) {
    const acc pk = p[k];
    if (!kStats && pk == acc(0)) continue;
    const ClientView<ct>& cv = job.clients[k];
    const int32_t* pos = job.inv_rows + k * job.inv_stride;
    const int32_t* ck = job.cols + k * job.col_stride;
    // Kept columns come in runs of consecutive indices; when a client's columns are dense
    // (stride T) a run is one contiguous block in the client, the sums and the weights.
    const bool dense = cv.stride1 == T;
    const int64_t ncols = cv.cols;  // a local: the coverage byte stores may alias cv
    SsqAcc q;
    bool b = false;
    // Software prefetch: this client's rows of the tile are read front to back, one short
    // stream per client; the hardware prefetcher would retrain on every one of them.
    const char* pf = nullptr;
    if (k + 1 < K) prefetch_segment(job, k + 1, r0, r1);
    for (int64_t r = r0; r < r1; ++r) {
      const int32_t i = pos[r];
      if (i < 0) continue;
      const ct* crow = cv.data + i * cv.stride0;
      if (pf < reinterpret_cast<const char*>(crow)) pf = reinterpret_cast<const char*>(crow);
      const wt* wrow = job.W + r * row_elems;
      acc* const sp = sum_base + (r - r0) * row_elems;
      uint8_t* const cov = covered.data() + (r - r0) * Cin;
      acc* const dn = kDen ? den_base + (r - r0) * Cin : nullptr;
      for (int64_t j = 0; j < cv.cols;) {
        const int64_t c = ck[j];
        const int64_t L = dense ? run_length(ck, j, cv.cols) : 1;
        const ct* src = crow + j * cv.stride1;
        if (dense)
          for (const char* want = reinterpret_cast<const char*>(src + L * T) + kPrefetchAhead; pf < want; pf += 64)
            __builtin_prefetch(pf, 0, 3);
        if (pk != acc(0)) {
          if constexpr (kOverlap) {
            if (L == 1) add_scaled<acc, ct, kTaps>(sp + c * T, src, pk, T);
            else add_scaled<acc, ct, 0>(sp + c * T, src, pk, L * T);
          }
          constexpr bool kAdd = !kOverlap;
          if constexpr (kAdd || kStats) {
            if (L == 1) delta_pass<acc, ct, wt, kTaps, kAdd, kStats>(sp + c * T, src, wrow + c * T, pk, T, q, b);
            else delta_pass<acc, ct, wt, 0, kAdd, kStats>(sp + c * T, src, wrow + c * T, pk, L * T, q, b);
          }
          if constexpr (kDen)
            for (int64_t l = 0; l < L; ++l) dn[c + l] += pk;
        } else if constexpr (kStats) {
          if (L == 1) delta_pass<acc, ct, wt, kTaps, false, true>(nullptr, src, wrow + c * T, pk, T, q, b);
          else delta_pass<acc, ct, wt, 0, false, true>(nullptr, src, wrow + c * T, pk, L * T, q, b);
        }
        j += L;
      }
      // Coverage in a pass of its own: a byte store in the loop above aliases every
      // pointer there (and a run of them becomes a memset call that spills q).
      if (pk != acc(0))
        for (int64_t j = 0; j < ncols; ++j) cov[ck[j]] = 1;
    }
    if constexpr (kStats) {
      if constexpr (kAllFloat<acc, ct, wt>)
        if (!std::isfinite(q.total())) q = exact_stats(job, k, r0, r1);
      ssq[k] = q.total();
      bad[k] = b ? 1 : 0;
    }
  }
  // Write out: runs of columns nobody kept are copied bit for bit, covered runs get the
  // weight plus the sum (reconstruct) or the weighted mean (overlap).
  for (int64_t r = r0; r < r1; ++r) {
    const wt* wrow = job.W + r * row_elems;
    wt* orow = job.out + r * row_elems;
    const acc* srow = sum_base + (r - r0) * row_elems;
    const uint8_t* cov = covered.data() + (r - r0) * Cin;
    for (int64_t c = 0; c < Cin;) {
      int64_t e = c + 1;
      while (e < Cin && cov[e] == cov[c]) ++e;
      const wt* w = wrow + c * T;
      wt* o = orow + c * T;
      const acc* sc = srow + c * T;
      const int64_t n = (e - c) * T;
      if (!cov[c]) {
        std::memcpy(o, w, sizeof(wt) * n);
      } else if constexpr (kOverlap) {
        const acc* d = den_base + (r - r0) * Cin;
        for (int64_t cc = c; cc < e; ++cc)
          for (int64_t t = 0; t < T; ++t) orow[cc * T + t] = static_cast<wt>(srow[cc * T + t] / d[cc]);
      } else {
        finish_sum(o, w, sc, n);
      }
      c = e;
    }
  }
}

template <typename wt, typename ct, bool kOverlap, bool kStats>
void run_tile(const Job<wt, ct>& job, int64_t r0, int64_t r1, const std::vector<acc_t<wt>>& p,
              Scratch<acc_t<wt>>& scratch, double* ssq, uint8_t* bad) {
  if constexpr (std::is_same_v<wt, ct>) {  // the common case gets unrolled tap loops
    if (job.T == 9) return aggregate_tile<wt, ct, kOverlap, 9, kStats>(job, r0, r1, p, scratch, ssq, bad);
    if (job.T == 1) return aggregate_tile<wt, ct, kOverlap, 1, kStats>(job, r0, r1, p, scratch, ssq, bad);
  }
  aggregate_tile<wt, ct, kOverlap, 0, kStats>(job, r0, r1, p, scratch, ssq, bad);
}

// Work items [i0, i1): (job, first row) pairs, each one tile; item it writes its
// statistics at row `it` of `stats` (when given).
template <typename wt, typename ct>
inline void run_items(const std::vector<Job<wt, ct>>& jobs, const std::vector<std::pair<int32_t, int64_t>>& items,
                      const std::vector<acc_t<wt>>& p, bool overlap, ItemStats stats, int64_t K, int64_t i0,
                      int64_t i1) {
  Scratch<acc_t<wt>> scratch;
  for (int64_t it = i0; it < i1; ++it) {
    const auto& job = jobs[items[it].first];
    const int64_t r0 = items[it].second, r1 = std::min(job.R, r0 + job.tile);
    double* q = stats.ssq ? stats.ssq + it * K : nullptr;
    uint8_t* b = stats.bad ? stats.bad + it * K : nullptr;
    if (overlap) {
      if (q) run_tile<wt, ct, true, true>(job, r0, r1, p, scratch, q, b);
      else run_tile<wt, ct, true, false>(job, r0, r1, p, scratch, q, b);
    } else {
      if (q) run_tile<wt, ct, false, true>(job, r0, r1, p, scratch, q, b);
      else run_tile<wt, ct, false, false>(job, r0, r1, p, scratch, q, b);
    }
  }
}

}  // namespace engine
}  // namespace cahfp
