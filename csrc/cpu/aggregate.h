// The aggregation family (reconstruct_aggregate and its whole-model form) and the engine
// pieces the packed and robust families share with it: (R, Cin, T) views, per-tensor keep
// tables, tiles and the client-major tile loop (aggregate_engine.h) in its ISA variants.
#pragma once

#include "aggregate_engine.h"
#include "common.h"
#include "isa.h"
#include "layout_tables.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace cahfp {

// weights[n]: N-D, one floating dtype. clients[n * K + k]: client k's compact tensor n
// (>= kept rows, >= kept cols, *weights[n].shape[2:]; 1-D: >= kept rows), one floating
// dtype. rows[n] / cols[n]: (K, m) int64, -1 padded (cols of a 1-D weight: (K, 1) zeros).
// coef: (K,) float64, normalised. mode: "reconstruct" or "overlap".
// Returns one packed buffer holding the N results in order.
Tensor reconstruct_aggregate_many_cpu(std::vector<Tensor> weights, std::vector<Tensor> clients,
                                      std::vector<Tensor> rows, std::vector<Tensor> cols, Tensor coef,
                                      std::string mode);
// Single tensor: the N = 1 case. weight N-D; clients[k] as above; returns weight's shape.
Tensor reconstruct_aggregate_cpu(Tensor weight, std::vector<Tensor> clients, Tensor rows, Tensor cols, Tensor coef,
                                 std::string mode);

namespace detail {

using engine::ClientView;
using engine::ItemStats;
using engine::Job;

// Accumulator elements per tile (64 KB of float32): measured neutral between one row
// and 256 KB on VGG-16; results never depend on it.
constexpr int64_t kTileElems = 16384;
// Work items a call is split into at least (enough for 16 threads, 4 each).
constexpr int64_t kMinItems = 64;

// (R, Cin, T) view sizes of an N-D tensor; 1-D tensors become (1, R, 1).
struct View3 {
  int64_t R, Cin, T;
  bool row_vector;
};

inline View3 view3(const Tensor& w) {
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

#define CAHFP_RA_HEAD template <typename wt, typename ct>
#define CAHFP_RA_ARGS <wt, ct>
// AVX2 at most: the AVX-512 build of these short (T = 9) rows measured 5-20 % slower.
CAHFP_ISA_VARIANTS_UPTO_AVX2(CAHFP_RA_HEAD, CAHFP_RA_ARGS, run_items_isa, (engine::run_items<wt, ct>),
                             (const std::vector<Job<wt, ct>>& jobs,
                              const std::vector<std::pair<int32_t, int64_t>>& items, const std::vector<acc_t<wt>>& p,
                              bool overlap, ItemStats stats, int64_t K, int64_t i0, int64_t i1),
                             (jobs, items, p, overlap, stats, K, i0, i1))
// Work items: (job, first row) for every tile of every tensor.
template <typename wt, typename ct>
std::vector<std::pair<int32_t, int64_t>> work_items(const std::vector<Job<wt, ct>>& jobs) {
  std::vector<std::pair<int32_t, int64_t>> items;
  for (size_t n = 0; n < jobs.size(); ++n)
    for (int64_t r = 0; r < jobs[n].R; r += jobs[n].tile) items.emplace_back(static_cast<int32_t>(n), r);
  return items;
}

// Tile sizes: ~kTileElems accumulator elements, split further when a model has few
// tiles (fewer than kMinItems, a constant: the split, and with it the order in which the
// reply statistics are summed, must not depend on the thread count).
template <typename wt, typename ct>
void size_tiles(std::vector<Job<wt, ct>>& jobs) {
  int64_t n_items = 0;
  for (auto& job : jobs) {
    job.tile = std::max<int64_t>(1, std::min<int64_t>(job.R, kTileElems / std::max<int64_t>(1, job.Cin * job.T)));
    n_items += (job.R + job.tile - 1) / job.tile;
  }
  const int64_t want = kMinItems;
  if (n_items < want)
    for (auto& job : jobs) job.tile = std::max<int64_t>(1, job.tile * n_items / want);
}

// The (K, 2) statistics (non-finite flag, squared-delta sum) from per-(item, client) ones
// ((items, K)), summed in item order.
template <typename acc>
void reduce_item_stats(const std::vector<double>& ssq, const std::vector<uint8_t>& bad, int64_t n_items, int64_t K,
                       double* stats) {
  for (int64_t k = 0; k < K; ++k) {
    double q = 0.0;
    bool b = false;
    for (int64_t it = 0; it < n_items; ++it) {
      q += ssq[it * K + k];
      b |= bad[it * K + k] != 0;
    }
    // float32 deltas square without overflow in float64: a non-finite sum means a
    // non-finite delta. float64 deltas were checked one by one.
    if constexpr (std::is_same_v<acc, float>) b |= !std::isfinite(q);
    stats[2 * k] = b ? 1.0 : 0.0;
    stats[2 * k + 1] = q;
  }
}

// Runs every tile; with `stats` ((K, 2) float64: non-finite flag, squared-delta sum)
// the reply statistics are reduced in item order.
template <typename wt, typename ct>
void run_jobs(std::vector<Job<wt, ct>>& jobs, const std::vector<acc_t<wt>>& p, bool overlap, double* stats) {
  const auto items = work_items(jobs);
  const int64_t K = static_cast<int64_t>(p.size()), n_items = static_cast<int64_t>(items.size());
  std::vector<double> ssq(stats ? n_items * K : 0, 0.0);
  std::vector<uint8_t> bad(stats ? n_items * K : 0, 0);
  ItemStats item_stats{stats ? ssq.data() : nullptr, stats ? bad.data() : nullptr};
  const auto run = run_items_isa_pick<wt, ct>();
  torch::stable::parallel_for(0, n_items, 1, [&](int64_t i0, int64_t i1) {
    run(jobs, items, p, overlap, item_stats, K, i0, i1);
  });
  if (stats) reduce_item_stats<acc_t<wt>>(ssq, bad, n_items, K, stats);
}


// Client tensor (n, k) of the separate-tensor form: shape checked against its kept
// counts (at least that large; memory safety with validation off), trailing dims made
// dense. Few stable-ABI calls per tensor: a model can bring tens of thousands.
template <typename ct>
ClientView<ct> separate_view(Tensor& c, ScalarType cdtype, const View3& v, int64_t rc, int64_t cc, int64_t n,
                             int64_t k) {
  STD_TORCH_CHECK(c.is_cpu() && c.scalar_type() == cdtype, "clients[", k, "] of weight ", n,
                  " must be a CPU tensor of dtype ", dtype_name(cdtype));
  const auto sizes = c.sizes();
  const int64_t cdim = static_cast<int64_t>(sizes.size());
  int64_t cnumel = 1;
  for (int64_t d = 0; d < cdim; ++d) cnumel *= sizes[d];
  const bool ok = v.row_vector ? (cdim >= 1 && sizes[0] >= cc)
                               : (cdim >= 2 && sizes[0] >= rc && sizes[1] >= cc &&
                                  cnumel / std::max<int64_t>(1, sizes[0] * sizes[1]) == v.T);
  STD_TORCH_CHECK(ok || (cnumel == 0 && (rc == 0 || cc == 0)), "clients[", k, "] of weight ", n, " has shape ",
                  shape_str(c), ", too small for ", v.row_vector ? 1 : rc, " rows x ", cc, " cols");
  auto strides = c.strides();
  if (!trailing_dense(sizes, strides)) {
    c = torch::stable::contiguous(c);
    strides = c.strides();
  }
  const int64_t s0 = cdim >= 1 ? strides[0] : 1, s1 = cdim >= 2 ? strides[1] : 1;
  const ct* data = cdata<ct>(c);
  // 1-D: one row (kept when the client keeps anything) whose columns are the channels.
  return v.row_vector ? ClientView<ct>{data, 0, s0, rc, cc} : ClientView<ct>{data, s0, s1, rc, cc};
}

// The canonical keep sets of one tensor as engine tables: per-client inverse row maps
// (K, R) and kept-column lists (K, Cin), int32. A 1-D tensor's row keep set lists its
// columns; its single row is kept by clients keeping any channel.
struct KeepTables {
  std::vector<int32_t> inv_rows, cols;
  std::vector<int64_t> rc, cc;  // kept rows / cols in the (R, Cin, T) view
};

inline KeepTables keep_tables(const Tensor& rows, const Tensor& cols, const View3& v, int64_t R0, int64_t C0, int64_t K) {
  check_keep_tensor(rows, K, "rows");
  check_keep_tensor(cols, K, "cols");
  KeepTables kt;
  const Tensor& colset = v.row_vector ? rows : cols;
  std::vector<int32_t> inv_r = inverse_maps(rows, R0, "rows");
  if (!v.row_vector) (void)inverse_maps(cols, C0, "cols");  // bounds check of the column indices
  const std::vector<int64_t> counts = keep_counts(colset);
  const int64_t mc = colset.size(1);
  const int64_t* cp = cdata<int64_t>(colset);
  kt.cols.assign(K * v.Cin, -1);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < counts[k]; ++j) kt.cols[k * v.Cin + j] = static_cast<int32_t>(cp[k * mc + j]);
  kt.cc = counts;
  if (v.row_vector) {
    kt.inv_rows.assign(K, -1);
    kt.rc.assign(K, 0);
    for (int64_t k = 0; k < K; ++k)
      if (counts[k] > 0) kt.inv_rows[k] = 0, kt.rc[k] = 1;
  } else {
    kt.inv_rows = std::move(inv_r);
    kt.rc = keep_counts(rows);
  }
  return kt;
}

}  // namespace detail
}  // namespace cahfp
