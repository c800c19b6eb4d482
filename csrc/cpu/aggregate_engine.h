// The tile engine behind every CPU aggregation kernel (batch and streaming).
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
typedef float f32x4 __attribute__((vector_size(16)));
typedef double f64x4 __attribute__((vector_size(32)));
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

// s[t] += pk * (src[t] - w[t]) for t < T (kAdd), and, with kStats, q += (src[t] - w[t])^2
// in float64. Which lanes handle which t depends only on T, never on threads.
template <typename acc, typename ct, typename wt, int kTaps, bool kAdd, bool kStats>
inline void delta_pass(acc* __restrict__ s, const ct* __restrict__ src, const wt* __restrict__ w, acc pk,
                       int64_t T_runtime, double& q, bool& bad) {
  const int64_t T = kTaps > 0 ? kTaps : T_runtime;
  int64_t t = 0;
  if constexpr (std::is_same_v<acc, float> && std::is_same_v<ct, float> && std::is_same_v<wt, float>) {
    f64x4 q0 = {0, 0, 0, 0}, q1 = {0, 0, 0, 0};
    for (; t + 8 <= T; t += 8) {
      const f32x8 d = load8(src + t) - load8(w + t);
      if constexpr (kAdd) store8(s + t, load8(s + t) + pk * d);
      if constexpr (kStats) {
        const f32x4 lo = {d[0], d[1], d[2], d[3]}, hi = {d[4], d[5], d[6], d[7]};
        const f64x4 a = __builtin_convertvector(lo, f64x4), b = __builtin_convertvector(hi, f64x4);
        q0 += a * a;
        q1 += b * b;
      }
    }
    if constexpr (kStats) {
      const f64x4 qs = q0 + q1;
      q += (qs[0] + qs[1]) + (qs[2] + qs[3]);
    }
  }
  for (; t < T; ++t) {
    const acc d = static_cast<acc>(src[t]) - static_cast<acc>(w[t]);
    if constexpr (kAdd) s[t] += pk * d;
    if constexpr (kStats) {
      q += static_cast<double>(d) * static_cast<double>(d);
      if constexpr (std::is_same_v<acc, double>) bad |= !std::isfinite(d);
    }
  }
  if constexpr (kStats && kNarrowingCheck<wt, ct>) bad |= narrowing_overflow<wt>(src, T);
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
  const int64_t T = kTaps > 0 ? kTaps : job.T;
  const int64_t Cin = job.Cin, row_elems = Cin * T, nr = r1 - r0;
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
    if (!kStats && pk == acc(0)) continue;
    const ClientView<ct>& cv = job.clients[k];
    const int32_t* pos = job.inv_rows + k * job.inv_stride;
    const int32_t* ck = job.cols + k * job.col_stride;
    double q = 0.0;
    bool b = false;
    for (int64_t r = r0; r < r1; ++r) {
      const int32_t i = pos[r];
      if (i < 0) continue;
      const ct* crow = cv.data + i * cv.stride0;
      const wt* wrow = job.W + r * row_elems;
      acc* const sp = sum.data() + (r - r0) * row_elems;
      if (pk != acc(0)) {
        for (int64_t j = 0; j < cv.cols; ++j) {
          const int64_t c = ck[j];
          if constexpr (kOverlap) {
            add_scaled<acc, ct, kTaps>(sp + c * T, crow + j * cv.stride1, pk, T);
            if constexpr (kStats)
              delta_pass<acc, ct, wt, kTaps, false, true>(nullptr, crow + j * cv.stride1, wrow + c * T, pk, T, q, b);
          } else {
            delta_pass<acc, ct, wt, kTaps, true, kStats>(sp + c * T, crow + j * cv.stride1, wrow + c * T, pk, T, q,
                                                         b);
          }
        }
        // Coverage (and overlap weights) in a separate pass: a byte store inside the
        // loop above would alias every pointer and block vectorisation.
        uint8_t* cov = covered.data() + (r - r0) * Cin;
        for (int64_t j = 0; j < cv.cols; ++j) cov[ck[j]] = 1;
        if constexpr (kOverlap) {
          acc* d = den.data() + (r - r0) * Cin;
          for (int64_t j = 0; j < cv.cols; ++j) d[ck[j]] += pk;
        }
      } else if constexpr (kStats) {
        for (int64_t j = 0; j < cv.cols; ++j)
          delta_pass<acc, ct, wt, kTaps, false, true>(nullptr, crow + j * cv.stride1, wrow + ck[j] * T, pk, T, q, b);
      }
    }
    if constexpr (kStats) {
      ssq[k] = q;
      bad[k] = b ? 1 : 0;
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

// One client folded into running partial sums (streaming): job.clients holds one
// client; sums is (R, Cin, T) and cover (R, Cin) in the accumulation dtype. Rows
// [r0, r1); each element of sums / cover is touched by one work item only. Without
// kAdd only the statistics are taken (the checking pass before an accumulation).
template <typename wt, typename ct, bool kOverlap, bool kAdd>
void accumulate_rows(const Job<wt, ct>& job, acc_t<wt>* sums, acc_t<wt>* cover, acc_t<wt> weight, int64_t r0,
                     int64_t r1, double& q, bool& b) {
  using acc = acc_t<wt>;
  const int64_t T = job.T, Cin = job.Cin, row_elems = Cin * T;
  const ClientView<ct>& cv = job.clients[0];
  const int32_t* ck = job.cols;
  for (int64_t r = r0; r < r1; ++r) {
    const int32_t i = job.inv_rows[r];
    if (i < 0) continue;
    const ct* crow = cv.data + i * cv.stride0;
    const wt* wrow = job.W + r * row_elems;
    acc* sp = sums + r * row_elems;
    for (int64_t j = 0; j < cv.cols; ++j) {
      const int64_t c = ck[j];
      if constexpr (!kAdd)
        delta_pass<acc, ct, wt, 0, false, true>(nullptr, crow + j * cv.stride1, wrow + c * T, weight, T, q, b);
      else if constexpr (kOverlap)
        add_scaled<acc, ct, 0>(sp + c * T, crow + j * cv.stride1, weight, T);
      else
        delta_pass<acc, ct, wt, 0, true, false>(sp + c * T, crow + j * cv.stride1, wrow + c * T, weight, T, q, b);
    }
    if constexpr (kAdd) {
      acc* cov = cover + r * Cin;
      for (int64_t j = 0; j < cv.cols; ++j) cov[ck[j]] += weight;
    }
  }
}

template <typename wt, typename ct>
inline void accumulate_items(const std::vector<Job<wt, ct>>& jobs,
                             const std::vector<std::pair<int32_t, int64_t>>& items,
                             const std::vector<acc_t<wt>*>& sums, const std::vector<acc_t<wt>*>& cover,
                             acc_t<wt> weight, bool overlap, bool add, double* ssq, uint8_t* bad, int64_t i0,
                             int64_t i1) {
  for (int64_t it = i0; it < i1; ++it) {
    const int32_t n = items[it].first;
    const auto& job = jobs[n];
    const int64_t r0 = items[it].second, r1 = std::min(job.R, r0 + job.tile);
    double q = 0.0;
    bool b = false;
    if (!add)
      accumulate_rows<wt, ct, false, false>(job, sums[n], cover[n], weight, r0, r1, q, b);
    else if (overlap)
      accumulate_rows<wt, ct, true, true>(job, sums[n], cover[n], weight, r0, r1, q, b);
    else
      accumulate_rows<wt, ct, false, true>(job, sums[n], cover[n], weight, r0, r1, q, b);
    if (ssq) ssq[it] = q, bad[it] = b ? 1 : 0;
  }
}

}  // namespace engine
}  // namespace cahfp
