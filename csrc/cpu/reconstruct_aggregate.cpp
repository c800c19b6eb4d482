// reconstruct_aggregate on the CPU: one tensor, a whole model, a whole model whose
// clients send one packed buffer each, and streaming accumulation of one client.
//
// The output is split into tiles of consecutive rows (~64 KB of float32 accumulator,
// in cache); tiles of all tensors form one parallel loop (aggregate_engine.h). For a
// tile, the loop is client-major: keep sets are ascending, so the tile's rows kept by
// client k are consecutive rows of k's compact tensor. Every client element is read
// once; every output element is written once by one thread, receiving its clients in
// the fixed order 0..K-1, so results are bit-identical whatever the thread count.
// Per-client inverse row maps answer "does client k keep row r, and where" in one
// lookup; there is no per-client full-size temporary. Elements no client keeps are
// copied bit for bit. The tile loop comes in baseline / AVX2 variants (isa.h),
// bit-identical.
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

namespace cahfp {
namespace {

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

#define CAHFP_RA_HEAD template <typename wt, typename ct>
#define CAHFP_RA_ARGS <wt, ct>
// AVX2 at most: the AVX-512 build of these short (T = 9) rows measured 5-20 % slower.
CAHFP_ISA_VARIANTS_UPTO_AVX2(CAHFP_RA_HEAD, CAHFP_RA_ARGS, run_items_isa, (engine::run_items<wt, ct>),
                             (const std::vector<Job<wt, ct>>& jobs,
                              const std::vector<std::pair<int32_t, int64_t>>& items, const std::vector<acc_t<wt>>& p,
                              bool overlap, bool fold, ItemStats stats, int64_t K, int64_t i0, int64_t i1),
                             (jobs, items, p, overlap, fold, stats, K, i0, i1))
CAHFP_ISA_VARIANTS_UPTO_AVX2(CAHFP_RA_HEAD, CAHFP_RA_ARGS, accumulate_items_isa, (engine::accumulate_items<wt, ct>),
                             (const std::vector<Job<wt, ct>>& jobs,
                              const std::vector<std::pair<int32_t, int64_t>>& items,
                              const std::vector<acc_t<wt>*>& sums, const std::vector<acc_t<wt>*>& cover,
                              acc_t<wt> weight, bool overlap, bool add, double* ssq, uint8_t* bad, int64_t i0,
                              int64_t i1),
                             (jobs, items, sums, cover, weight, overlap, add, ssq, bad, i0, i1))

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

// Runs every tile; with `stats` ((K, 2) float64: non-finite flag, squared-delta sum)
// the reply statistics are reduced in item order. fold: the jobs' partial sums are
// accumulated instead of an output written (stats required).
template <typename wt, typename ct>
void run_jobs(std::vector<Job<wt, ct>>& jobs, const std::vector<acc_t<wt>>& p, bool overlap, double* stats,
              bool fold = false) {
  const auto items = work_items(jobs);
  const int64_t K = static_cast<int64_t>(p.size()), n_items = static_cast<int64_t>(items.size());
  std::vector<double> ssq(stats ? n_items * K : 0, 0.0);
  std::vector<uint8_t> bad(stats ? n_items * K : 0, 0);
  ItemStats item_stats{stats ? ssq.data() : nullptr, stats ? bad.data() : nullptr};
  const auto run = run_items_isa_pick<wt, ct>();
  torch::stable::parallel_for(0, n_items, 1, [&](int64_t i0, int64_t i1) {
    run(jobs, items, p, overlap, fold, item_stats, K, i0, i1);
  });
  if (!stats) return;
  for (int64_t k = 0; k < K; ++k) {
    double q = 0.0;
    bool b = false;
    for (int64_t it = 0; it < n_items; ++it) {
      q += ssq[it * K + k];
      b |= bad[it * K + k] != 0;
    }
    // float32 deltas square without overflow in float64: a non-finite sum means a
    // non-finite delta. float64 deltas were checked one by one.
    if constexpr (std::is_same_v<acc_t<wt>, float>) b |= !std::isfinite(q);
    stats[2 * k] = b ? 1.0 : 0.0;
    stats[2 * k + 1] = q;
  }
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

KeepTables keep_tables(const Tensor& rows, const Tensor& cols, const View3& v, int64_t R0, int64_t C0, int64_t K) {
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
  std::vector<Tensor> ws(N);
  for (int64_t n = 0; n < N; ++n) {
    STD_TORCH_CHECK(weights[n].is_cpu() && weights[n].scalar_type() == wdtype && weights[n].dim() >= 1,
                    "weights[", n, "] must be a CPU tensor of dtype ", dtype_name(wdtype));
    ws[n] = torch::stable::contiguous(weights[n]);
    total += ws[n].numel();
  }
  STD_TORCH_CHECK(is_floating(wdtype) && is_floating(cdtype), "weights and clients must be floating");
  Tensor out = new_output({total}, wdtype);
  const double* cp = cdata<double>(coef);
  std::vector<KeepTables> tables(N);

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
        tables[n] = keep_tables(rows[n], cols[n], v, ws[n].size(0), ws[n].dim() >= 2 ? ws[n].size(1) : 1, K);
        Job<wt, ct>& job = jobs[n];
        job.W = cdata<wt>(ws[n]);
        job.out = mdata<wt>(out) + offset;
        job.R = v.R;
        job.Cin = v.Cin;
        job.T = v.T;
        job.inv_rows = tables[n].inv_rows.data();
        job.inv_stride = v.R;
        job.cols = tables[n].cols.data();
        job.col_stride = v.Cin;
        job.clients.resize(K);
        for (int64_t k = 0; k < K; ++k)
          job.clients[k] = separate_view<ct>(clients[n * K + k], cdtype, v, tables[n].rc[k], tables[n].cc[k], n, k);
        offset += ws[n].numel();
      }
      size_tiles(jobs);
      run_jobs<wt, ct>(jobs, p, overlap, nullptr);
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

namespace {

// Client k's tensors: one packed buffer (parts[k] == 0) or its N separate tensors
// (parts[k] == N), as the caller says: a one-tensor layout (N = 1) cannot tell the two
// apart by their count. Returns where each client's entries start in `clients`.
std::vector<int64_t> client_starts(const std::vector<Tensor>& clients, const std::vector<int64_t>& parts, int64_t K,
                                   int64_t N) {
  STD_TORCH_CHECK(static_cast<int64_t>(parts.size()) == K, "parts must hold one entry per client (", K, "), got ",
                  parts.size());
  std::vector<int64_t> start(K + 1, 0);
  for (int64_t k = 0; k < K; ++k) {
    STD_TORCH_CHECK(parts[k] == 0 || parts[k] == N, "parts[", k, "] must be 0 (one packed buffer) or ", N,
                    " (separate tensors), got ", parts[k]);
    start[k + 1] = start[k] + (parts[k] == 0 ? 1 : N);
  }
  STD_TORCH_CHECK(start[K] == static_cast<int64_t>(clients.size()), "clients holds ", clients.size(),
                  " tensors but parts says ", start[K]);
  return start;
}

template <typename ct>
ClientView<ct> packed_view(const Tensor& buffer, const LayoutTables& lt, const int64_t* m, int64_t n, int64_t k) {
  // rc <= R and cc <= Cin (check_layout), and R * Cin * T does not overflow: neither does this.
  const int64_t rc = lt.counts[2 * (k * lt.N + n)], cc = lt.counts[2 * (k * lt.N + n) + 1], T = m[2];
  const int64_t off = lt.offsets[k * lt.N + n];
  STD_TORCH_CHECK(range_inside(off, rc * cc * T, buffer.numel()), "the buffer of client ", k, " holds ",
                  buffer.numel(), " elements, too few for tensor ", n, " at offset ", off);
  return ClientView<ct>{cdata<ct>(buffer) + off, cc * T, T, rc, cc};
}

// A packed buffer must be a 1-D contiguous CPU tensor of the clients' dtype.
void check_buffer(const Tensor& b, ScalarType cdtype, int64_t k) {
  STD_TORCH_CHECK(b.is_cpu() && b.scalar_type() == cdtype && b.dim() == 1 && b.is_contiguous(), "the buffer of client ",
                  k, " must be a 1-D contiguous CPU tensor of dtype ", dtype_name(cdtype));
}

template <typename wt, typename ct>
void fill_jobs(std::vector<Job<wt, ct>>& jobs, const std::vector<Tensor>& ws, std::vector<Tensor>& clients,
               const std::vector<int64_t>& start, const std::vector<int64_t>& parts, const LayoutTables& lt,
               ScalarType cdtype) {
  const int64_t N = lt.N, K = lt.K;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t* m = lt.meta + 5 * n;
    Job<wt, ct>& job = jobs[n];
    const View3 v{m[0], m[1], m[2], ws[n].dim() == 1};
    STD_TORCH_CHECK(ws[n].numel() == checked_product(m[0], m[1], m[2]), "weights[", n, "] has ", ws[n].numel(),
                    " elements but the layout says ", m[0], " x ", m[1], " x ", m[2]);
    job.W = cdata<wt>(ws[n]);
    job.R = m[0];
    job.Cin = m[1];
    job.T = m[2];
    job.inv_rows = lt.row_inv + m[3];
    job.inv_stride = lt.SR;
    job.cols = lt.col_keep + m[4];
    job.col_stride = lt.SC;
    job.clients.resize(K);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t rc = lt.counts[2 * (k * N + n)], cc = lt.counts[2 * (k * N + n) + 1];
      if (parts[k] == 0)
        job.clients[k] = packed_view<ct>(clients[start[k]], lt, m, n, k);
      else
        job.clients[k] = separate_view<ct>(clients[start[k] + n], cdtype, v, rc, cc, n, k);
    }
  }
}

std::vector<Tensor> contiguous_weights(const std::vector<Tensor>& weights, ScalarType wdtype) {
  std::vector<Tensor> ws(weights.size());
  for (size_t n = 0; n < weights.size(); ++n) {
    STD_TORCH_CHECK(weights[n].is_cpu() && weights[n].scalar_type() == wdtype && weights[n].dim() >= 1,
                    "weights[", n, "] must be a CPU tensor of dtype ", dtype_name(wdtype));
    ws[n] = torch::stable::contiguous(weights[n]);
  }
  return ws;
}

}  // namespace

namespace {

// What aggregate_packed, fold_packed and accumulate_packed check and derive alike.
struct PackedCall {
  LayoutTables lt;
  std::vector<int64_t> start;  // client k's first entry in the clients list
  std::vector<int64_t> parts;  // 0: client k sent one packed buffer; N: its N tensors
  bool overlap;
  ScalarType wdtype, cdtype;
  ScalarType adtype;  // accumulation dtype: float32, float64 for float64 weights
  std::vector<Tensor> ws;
  int64_t total = 0;        // elements of the weights
  int64_t total_cover = 0;  // sum of R * Cin
};

// one_client: the op folds one client (accumulate_packed), its name for the message.
PackedCall packed_call(const std::vector<Tensor>& weights, const std::vector<Tensor>& clients,
                       const std::vector<int64_t>& parts, const Tensor& meta, const Tensor& row_inv,
                       const Tensor& col_keep, const Tensor& counts, const Tensor& offsets, const std::string& mode,
                       const char* one_client = nullptr) {
  const int64_t N = static_cast<int64_t>(weights.size());
  STD_TORCH_CHECK(N > 0, "weights must not be empty");
  PackedCall pc{check_layout(N, meta, row_inv, col_keep, counts, offsets), {}, parts, mode == "overlap",
                weights[0].scalar_type(), ScalarType::Float, ScalarType::Float, {}};
  const int64_t K = pc.lt.K;
  STD_TORCH_CHECK(K > 0, "the layout holds no clients");
  STD_TORCH_CHECK(!clients.empty(), "clients must not be empty");
  if (one_client) STD_TORCH_CHECK(K == 1, one_client, " folds one client: the layout must hold K = 1");
  pc.start = client_starts(clients, parts, K, N);
  STD_TORCH_CHECK(pc.overlap || mode == "reconstruct", "mode must be 'reconstruct' or 'overlap'");
  pc.cdtype = clients[0].scalar_type();
  STD_TORCH_CHECK(is_floating(pc.wdtype) && is_floating(pc.cdtype), "weights and clients must be floating");
  for (int64_t k = 0; k < K; ++k)
    if (pc.parts[k] == 0) check_buffer(clients[pc.start[k]], pc.cdtype, k);
  pc.adtype = pc.wdtype == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  pc.ws = contiguous_weights(weights, pc.wdtype);
  for (int64_t n = 0; n < N; ++n) {
    pc.total += pc.ws[n].numel();
    pc.total_cover += pc.lt.meta[5 * n] * pc.lt.meta[5 * n + 1];
  }
  return pc;
}

// The K clients' coefficients and the (K, 2) statistics of aggregate_packed / fold_packed.
void check_coef_stats(const Tensor& coef, const Tensor& stats, int64_t K) {
  STD_TORCH_CHECK(coef.dim() == 1 && coef.size(0) == K && coef.scalar_type() == ScalarType::Double && coef.is_cpu(),
                  "coef must be a (K,) float64 CPU tensor");
  STD_TORCH_CHECK(stats.is_cpu() && stats.scalar_type() == ScalarType::Double && stats.dim() == 2 &&
                      stats.size(0) == K && stats.size(1) == 2 && stats.is_contiguous(),
                  "stats must be a contiguous (K, 2) float64 CPU tensor");
}

void check_flat(const Tensor& t, const char* name, ScalarType dtype, int64_t numel) {
  STD_TORCH_CHECK(t.is_cpu() && t.scalar_type() == dtype && t.dim() == 1 && t.numel() == numel && t.is_contiguous(),
                  name, " must be a contiguous 1-D CPU tensor of ", numel, " elements of dtype ", dtype_name(dtype));
}

}  // namespace

// Whole-model aggregation on the per-round layout. clients: per client k, one packed
// buffer (parts[k] == 0: 1-D, its tensors at offsets[k]) or its N tensors (parts[k] == N).
// Writes the N results, packed in order, into `out` (1-D, weights' dtype) and the reply
// statistics into `stats` ((K, 2) float64: non-finite flag, sum of squared deltas over
// the client's kept elements), computed in the same pass.
void aggregate_packed_cpu(std::vector<Tensor> weights, std::vector<Tensor> clients, std::vector<int64_t> parts,
                          Tensor meta, Tensor row_inv, Tensor col_keep, Tensor counts, Tensor offsets, Tensor coef,
                          std::string mode, Tensor out, Tensor stats) {
  const PackedCall pc = packed_call(weights, clients, parts, meta, row_inv, col_keep, counts, offsets, mode);
  check_coef_stats(coef, stats, pc.lt.K);
  check_flat(out, "out", pc.wdtype, pc.total);
  const int64_t N = pc.lt.N, K = pc.lt.K;
  const double* cp = cdata<double>(coef);
  CAHFP_DISPATCH_FLOATING(pc.wdtype, "aggregate_packed", [&] {
    using wt = scalar_t;
    std::vector<acc_t<wt>> p(K);
    for (int64_t k = 0; k < K; ++k) p[k] = static_cast<acc_t<wt>>(cp[k]);
    CAHFP_DISPATCH_FLOATING(pc.cdtype, "aggregate_packed_client", [&] {
      using ct = scalar_t;
      std::vector<Job<wt, ct>> jobs(N);
      fill_jobs<wt, ct>(jobs, pc.ws, clients, pc.start, pc.parts, pc.lt, pc.cdtype);
      int64_t offset = 0;
      for (int64_t n = 0; n < N; ++n) {
        jobs[n].out = mdata<wt>(out) + offset;
        offset += pc.ws[n].numel();
      }
      size_tiles(jobs);
      run_jobs<wt, ct>(jobs, p, pc.overlap, mdata<double>(stats));
    });
  });
}

// Streaming, several clients per call: folds the K clients of the layout, in order 0..K-1,
// into running partial sums read from sums_in / cover_in and written to sums_out / cover_out
// (in place when they are the same tensors), with the reply statistics of every client
// ((K, 2) float64, as aggregate_packed) from the same pass. Every element receives its
// clients' terms one by one in client order, the arithmetic of accumulate_packed, so the
// result is bit for bit that of K accumulate_packed calls. Nothing is decided here: a client
// with coefficient 0 adds nothing (its statistics are still taken); the caller reruns from
// the unchanged inputs with a rejected client's coefficient set to 0. sums: 1-D, the weights'
// total size; cover: 1-D, the sum of every tensor's R * Cin; accumulation dtype (float32;
// float64 for float64 weights). reconstruct: sums += coef[k] * (c - w); overlap: sums +=
// coef[k] * c; cover += coef[k] at the kept (row, column) pairs.
void fold_packed_cpu(std::vector<Tensor> weights, std::vector<Tensor> clients, std::vector<int64_t> parts,
                     Tensor meta, Tensor row_inv, Tensor col_keep, Tensor counts, Tensor offsets, Tensor coef,
                     std::string mode, Tensor sums_in, Tensor cover_in, Tensor sums_out, Tensor cover_out,
                     Tensor stats) {
  const PackedCall pc = packed_call(weights, clients, parts, meta, row_inv, col_keep, counts, offsets, mode);
  check_coef_stats(coef, stats, pc.lt.K);
  check_flat(sums_in, "sums_in", pc.adtype, pc.total);
  check_flat(sums_out, "sums_out", pc.adtype, pc.total);
  check_flat(cover_in, "cover_in", pc.adtype, pc.total_cover);
  check_flat(cover_out, "cover_out", pc.adtype, pc.total_cover);
  const int64_t N = pc.lt.N, K = pc.lt.K;
  const double* cp = cdata<double>(coef);
  for (int64_t k = 0; k < K; ++k)
    STD_TORCH_CHECK(std::isfinite(cp[k]) && cp[k] >= 0, "coef must be finite and >= 0, got ", cp[k]);
  CAHFP_DISPATCH_FLOATING(pc.wdtype, "fold_packed", [&] {
    using wt = scalar_t;
    using acc = acc_t<wt>;
    std::vector<acc> p(K);
    for (int64_t k = 0; k < K; ++k) p[k] = static_cast<acc>(cp[k]);
    CAHFP_DISPATCH_FLOATING(pc.cdtype, "fold_packed_client", [&] {
      using ct = scalar_t;
      std::vector<Job<wt, ct>> jobs(N);
      fill_jobs<wt, ct>(jobs, pc.ws, clients, pc.start, pc.parts, pc.lt, pc.cdtype);
      int64_t off = 0, coff = 0;
      for (int64_t n = 0; n < N; ++n) {
        jobs[n].sums_in = cdata<acc>(sums_in) + off;
        jobs[n].sums_out = mdata<acc>(sums_out) + off;
        jobs[n].cover_in = cdata<acc>(cover_in) + coff;
        jobs[n].cover_out = mdata<acc>(cover_out) + coff;
        off += pc.ws[n].numel();
        coff += jobs[n].R * jobs[n].Cin;
      }
      size_tiles(jobs);
      run_jobs<wt, ct>(jobs, p, pc.overlap, mdata<double>(stats), true);
    });
  });
}

// Streaming, the end: the new global model from running partial sums, in one pass. Per
// tensor n viewed as (R, Cin, T), at the elements whose (row, column) cover weight is > 0:
// reconstruct w + sums / weight_sum, overlap sums / cover (in the accumulation dtype, then
// rounded to the weights' dtype); elsewhere w, bit for bit. out: 1-D, the N results packed
// in order, the weights' dtype. Work items are row blocks of one tensor; each element is
// written once, so the result does not depend on the thread count.
void finish_partials_cpu(std::vector<Tensor> weights, Tensor sums, Tensor cover, double weight_sum, std::string mode,
                         Tensor out) {
  const int64_t N = static_cast<int64_t>(weights.size());
  STD_TORCH_CHECK(N > 0, "weights must not be empty");
  const bool overlap = mode == "overlap";
  STD_TORCH_CHECK(overlap || mode == "reconstruct", "mode must be 'reconstruct' or 'overlap'");
  STD_TORCH_CHECK(std::isfinite(weight_sum) && weight_sum >= 0, "weight_sum must be finite and >= 0, got ",
                  weight_sum);
  const auto wdtype = weights[0].scalar_type();
  STD_TORCH_CHECK(is_floating(wdtype), "weights must be floating");
  const std::vector<Tensor> ws = contiguous_weights(weights, wdtype);
  const auto adtype = wdtype == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  std::vector<View3> views(N);
  std::vector<int64_t> off(N + 1, 0), coff(N + 1, 0);
  for (int64_t n = 0; n < N; ++n) {
    views[n] = view3(ws[n]);
    off[n + 1] = off[n] + ws[n].numel();
    coff[n + 1] = coff[n] + views[n].R * views[n].Cin;
  }
  check_flat(sums, "sums", adtype, off[N]);
  check_flat(cover, "cover", adtype, coff[N]);
  check_flat(out, "out", wdtype, off[N]);
  // (tensor, first row) items of about kTileElems elements each
  std::vector<std::pair<int32_t, int64_t>> items;
  std::vector<int64_t> rows_per(N);
  for (int64_t n = 0; n < N; ++n) {
    const View3& v = views[n];
    rows_per[n] = std::max<int64_t>(1, kTileElems / std::max<int64_t>(1, v.Cin * v.T));
    for (int64_t r = 0; r < v.R; r += rows_per[n]) items.emplace_back(static_cast<int32_t>(n), r);
  }
  CAHFP_DISPATCH_FLOATING(wdtype, "finish_partials", [&] {
    using wt = scalar_t;
    using acc = acc_t<wt>;
    const acc wsum = static_cast<acc>(weight_sum);
    torch::stable::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
      for (int64_t it = i0; it < i1; ++it) {
        const int64_t n = items[it].first, r0 = items[it].second;
        const View3& v = views[n];
        const int64_t r1 = std::min(v.R, r0 + rows_per[n]);
        const wt* W = cdata<wt>(ws[n]);
        const acc* S = cdata<acc>(sums) + off[n];
        const acc* C = cdata<acc>(cover) + coff[n];
        wt* O = mdata<wt>(out) + off[n];
        for (int64_t q = r0 * v.Cin; q < r1 * v.Cin; ++q) {  // (row, column) pairs
          const acc cw = C[q];
          const int64_t e = q * v.T;
          if (!(cw > acc(0))) {
            std::memcpy(O + e, W + e, sizeof(wt) * v.T);
          } else if (overlap) {
            for (int64_t t = 0; t < v.T; ++t) O[e + t] = static_cast<wt>(S[e + t] / cw);
          } else {
            for (int64_t t = 0; t < v.T; ++t) O[e + t] = static_cast<wt>(S[e + t] / wsum + static_cast<acc>(W[e + t]));
          }
        }
      }
    });
  });
}

// Streaming: check one client (layout with K = 1), then fold it with weight `weight`
// into running partial sums, in two passes: the first takes its statistics (as in
// aggregate_packed); the second runs only when the client is finite and its squared
// delta sum is at most max_ssq, so a rejected client leaves no trace. sums (1-D, the
// weights' total size) and cover (1-D, sum of R * Cin) are in the accumulation dtype
// (float32; float64 for float64 weights). reconstruct: sums += weight * (c - w) at the
// kept elements; overlap: sums += weight * c; both: cover += weight at the kept (row,
// column) pairs. stats ((3,) float64): non-finite flag, squared delta sum, accepted.
void accumulate_packed_cpu(std::vector<Tensor> weights, std::vector<Tensor> client, std::vector<int64_t> parts,
                           Tensor meta, Tensor row_inv, Tensor col_keep, Tensor counts, Tensor offsets, double weight,
                           double max_ssq, std::string mode, Tensor sums, Tensor cover, Tensor stats) {
  const PackedCall pc = packed_call(weights, client, parts, meta, row_inv, col_keep, counts, offsets, mode,
                                    "accumulate_packed");
  STD_TORCH_CHECK(std::isfinite(weight) && weight >= 0, "weight must be finite and >= 0, got ", weight);
  check_flat(sums, "sums", pc.adtype, pc.total);
  check_flat(cover, "cover", pc.adtype, pc.total_cover);
  STD_TORCH_CHECK(stats.is_cpu() && stats.scalar_type() == ScalarType::Double && stats.numel() == 3 &&
                      stats.is_contiguous(),
                  "stats must be a contiguous (3,) float64 CPU tensor");
  const int64_t N = pc.lt.N;
  CAHFP_DISPATCH_FLOATING(pc.wdtype, "accumulate_packed", [&] {
    using wt = scalar_t;
    using acc = acc_t<wt>;
    CAHFP_DISPATCH_FLOATING(pc.cdtype, "accumulate_packed_client", [&] {
      using ct = scalar_t;
      std::vector<Job<wt, ct>> jobs(N);
      fill_jobs<wt, ct>(jobs, pc.ws, client, pc.start, pc.parts, pc.lt, pc.cdtype);
      std::vector<acc*> sum_ptr(N), cover_ptr(N);
      int64_t off = 0, coff = 0;
      for (int64_t n = 0; n < N; ++n) {
        sum_ptr[n] = mdata<acc>(sums) + off;
        cover_ptr[n] = mdata<acc>(cover) + coff;
        off += pc.ws[n].numel();
        coff += jobs[n].R * jobs[n].Cin;
      }
      size_tiles(jobs);
      const auto items = work_items(jobs);
      const int64_t n_items = static_cast<int64_t>(items.size());
      std::vector<double> ssq(n_items, 0.0);
      std::vector<uint8_t> bad(n_items, 0);
      const auto run = accumulate_items_isa_pick<wt, ct>();
      const acc wk = static_cast<acc>(weight);
      torch::stable::parallel_for(0, n_items, 1, [&](int64_t i0, int64_t i1) {
        run(jobs, items, sum_ptr, cover_ptr, wk, pc.overlap, false, ssq.data(), bad.data(), i0, i1);
      });
      double q = 0.0;
      bool b = false;
      for (int64_t it = 0; it < n_items; ++it) q += ssq[it], b |= bad[it] != 0;
      if constexpr (std::is_same_v<acc, float>) b |= !std::isfinite(q);
      const bool accept = !b && q <= max_ssq;
      if (accept && weight > 0)
        torch::stable::parallel_for(0, n_items, 1, [&](int64_t i0, int64_t i1) {
          run(jobs, items, sum_ptr, cover_ptr, wk, pc.overlap, true, nullptr, nullptr, i0, i1);
        });
      mdata<double>(stats)[0] = b ? 1.0 : 0.0;
      mdata<double>(stats)[1] = q;
      mdata<double>(stats)[2] = accept ? 1.0 : 0.0;
    });
  });
}

// ---------------------------------------------------------------------------------------
// Robust reducers (SPEC, "Robust reducers"): per output element, the weighted median or the
// weighted trimmed mean of the participants' deltas v - w. Participants: clients with
// coef > 0; in reconstruct mode a client that does not keep the element takes part with
// delta 0, in overlap mode only keepers do. Values are ordered ascending with ties by client
// index. Every participant whose delta is 0 (the non-keepers in reconstruct mode, and keepers
// whose value equals w) forms one zero group: all of it has the same value, so only its total
// weight matters and it enters the order as one block. Per (row, column) pair the non-keepers'
// weight and the total W are summed once (client order, float64); per element only the m
// keepers are read and sorted (insertion sort), so an element costs O(m log m), not O(K).
// Coefficients are as given (float64, not normalised); sums are exact for integer sample
// counts, which is where the SPEC's exact-boundary rule applies. Work items are (row, column)
// pairs, each written by one thread: deterministic whatever the thread count. Extra memory:
// O(K) per thread plus the keep-set tables.
namespace {

template <typename wt, typename ct>
void robust_items(const wt* W, wt* out, const View3& v, const KeepTables& kt, const std::vector<int32_t>& inv_cols,
                  const std::vector<ClientView<ct>>& cl, const double* coef, int64_t K, bool overlap, bool median,
                  double trim, int64_t q0, int64_t q1) {
  using acc = acc_t<wt>;
  constexpr int64_t TB = 16;  // trailing elements per block: per-thread memory O(K * TB)
  std::vector<const ct*> kptr(K);
  std::vector<double> kcoef(K), seq_w(K + 1);
  std::vector<acc> dv(K * TB), seq_v(K + 1);
  double negw[TB], zerow[TB], neg_tab[16], zero_tab[16];
  uint32_t negb[TB], zerob[TB], nanb[TB];
  uint8_t nanf[TB];
  // Per row (recomputed when the row changes): the participants that keep it (row_k, with
  // their compact row index) and the weight of those that do not (row_absent).
  std::vector<int64_t> row_k, row_i;
  row_k.reserve(K), row_i.reserve(K);
  double row_absent = 0;
  int64_t row = -1;
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t r = q / v.Cin, c = q % v.Cin;
    const wt* wp = W + q * v.T;
    wt* op = out + q * v.T;
    if (r != row) {
      row = r, row_absent = 0, row_k.clear(), row_i.clear();
      for (int64_t k = 0; k < K; ++k) {
        if (!(coef[k] > 0)) continue;
        const int64_t i = kt.inv_rows[k * (v.row_vector ? 1 : v.R) + (v.row_vector ? 0 : r)];
        if (i >= 0 && i < cl[k].rows) {
          row_k.push_back(k), row_i.push_back(i);
        } else {
          row_absent += coef[k];
        }
      }
    }
    int64_t m_all = 0;                             // keepers of this (row, column), in client order (their slots)
    double absent = overlap ? 0.0 : row_absent;  // the non-keeping participants' weight
    double total = absent;                       // every participant's
    for (size_t x = 0; x < row_k.size(); ++x) {
      const int64_t k = row_k[x];
      const int64_t j = inv_cols[k * v.Cin + c];
      if (j >= 0 && j < cl[k].cols) {
        kptr[m_all] = cl[k].data + row_i[x] * cl[k].stride0 + j * cl[k].stride1;
        kcoef[m_all++] = coef[k];
        total += coef[k];
      } else if (!overlap) {
        absent += coef[k];
        total += coef[k];
      }
    }
    if (m_all == 0) {
      for (int64_t t = 0; t < v.T; ++t) op[t] = wp[t];
      continue;
    }
    const double lo = trim * total, hi = total - lo;
    // Up to 32 keepers: pass 1 records per element which slots are negative and which are
    // zero as bit masks (integer work the compiler vectorises) and pass 2 turns a mask into
    // its weight sum, by table when there are at most 4 keepers. Sums run in slot (client)
    // order from 0 (negative) and from the absent weight (zero), exactly as the general
    // path's running sums, so both paths give identical bits.
    const bool masked = m_all <= 32;
    if (masked && m_all <= 4) {
      neg_tab[0] = 0, zero_tab[0] = absent;
      for (int64_t mask = 1; mask < (int64_t{1} << m_all); ++mask) {
        const int hb = 31 - __builtin_clz(static_cast<uint32_t>(mask));
        neg_tab[mask] = neg_tab[mask ^ (int64_t{1} << hb)] + kcoef[hb];
        zero_tab[mask] = zero_tab[mask ^ (int64_t{1} << hb)] + kcoef[hb];
      }
    }
    for (int64_t t0 = 0; t0 < v.T; t0 += TB) {
      const int64_t nb = std::min(TB, v.T - t0);
      if (masked) {
        for (int64_t e = 0; e < nb; ++e) negb[e] = 0, zerob[e] = 0, nanb[e] = 0;
        for (int64_t s = 0; s < m_all; ++s) {
          const ct* src = kptr[s] + t0;
          acc* d = dv.data() + s * TB;
          const uint32_t bit = uint32_t{1} << s;
          for (int64_t e = 0; e < nb; ++e) {
            const acc x = static_cast<acc>(src[e]) - static_cast<acc>(wp[t0 + e]);
            d[e] = x;
            negb[e] |= bit & (uint32_t{0} - static_cast<uint32_t>(x < acc(0)));
            zerob[e] |= bit & (uint32_t{0} - static_cast<uint32_t>(x == acc(0)));
            nanb[e] |= static_cast<uint32_t>(x != x);
          }
        }
        for (int64_t e = 0; e < nb; ++e) {
          nanf[e] = static_cast<uint8_t>(nanb[e]);
          if (m_all <= 4) {
            negw[e] = neg_tab[negb[e]], zerow[e] = zero_tab[zerob[e]];
          } else {
            double nw = 0, zw = absent;
            for (uint32_t b = negb[e]; b; b &= b - 1) nw += kcoef[__builtin_ctz(b)];
            for (uint32_t b = zerob[e]; b; b &= b - 1) zw += kcoef[__builtin_ctz(b)];
            negw[e] = nw, zerow[e] = zw;
          }
        }
      } else {
        // Pass 1, slot-major and branch-free: every keeper's deltas for nb trailing elements,
        // with per-element NaN flags and the weight of the negative and the zero deltas.
        for (int64_t e = 0; e < nb; ++e) negw[e] = 0, zerow[e] = absent, nanf[e] = 0;
        for (int64_t s = 0; s < m_all; ++s) {
          const ct* src = kptr[s] + t0;
          acc* d = dv.data() + s * TB;
          const double ck = kcoef[s];
          for (int64_t e = 0; e < nb; ++e) {
            const acc x = static_cast<acc>(src[e]) - static_cast<acc>(wp[t0 + e]);
            d[e] = x;
            negw[e] += ck * static_cast<double>(x < acc(0));  // arithmetic masks: no branches
            zerow[e] += ck * static_cast<double>(x == acc(0));
            nanf[e] |= static_cast<uint8_t>(x != x);
          }
        }
      }
      // Pass 2, per element.
      for (int64_t e = 0; e < nb; ++e) {
        const acc w = static_cast<acc>(wp[t0 + e]);
        if (nanf[e]) {
          op[t0 + e] = static_cast<wt>(std::numeric_limits<acc>::quiet_NaN());
          continue;
        }
        const double neg = negw[e], zero = zerow[e];
        // The zero group occupies [neg, neg + zero] of [0, W]. When it holds the median
        // strictly inside (median), or covers the whole untrimmed span [lo, hi] (trimmed
        // mean), the result is w with no sort (most elements of a pruned round, where few
        // clients keep an element).
        const bool only_zero = median ? (2 * neg < total && 2 * (neg + zero) > total)
                                      : (zero > 0 && neg <= lo && neg + zero >= hi);
        if (only_zero) {
          op[t0 + e] = static_cast<wt>(w + acc(0));
          continue;
        }
        // The order: negative keepers, the zero group as one block, positive keepers. The
        // nonzero deltas are gathered in slot (client) order and insertion-sorted stably,
        // so ties keep client order.
        const acc* col = dv.data() + e;
        int64_t n = 0, nneg = 0;
        for (int64_t s = 0; s < m_all; ++s) {
          const acc x = col[s * TB];
          if (x == acc(0)) continue;
          const double ck = kcoef[s];
          int64_t j = n - 1;
          for (; j >= 0 && seq_v[j] > x; --j) seq_v[j + 1] = seq_v[j], seq_w[j + 1] = seq_w[j];
          seq_v[j + 1] = x, seq_w[j + 1] = ck;
          ++n;
          nneg += x < acc(0);
        }
        if (zero > 0) {
          for (int64_t j = n; j > nneg; --j) seq_v[j] = seq_v[j - 1], seq_w[j] = seq_w[j - 1];
          seq_v[nneg] = acc(0), seq_w[nneg] = zero;
          ++n;
        }
        acc result = 0;
        if (median) {
          double cum = seq_w[0];
          int64_t i = 0;
          while (i < n - 1 && 2 * cum < total) cum += seq_w[++i];
          result = (2 * cum == total && i + 1 < n) ? seq_v[i] + (seq_v[i + 1] - seq_v[i]) / acc(2) : seq_v[i];
        } else {
          // One pass: the remaining weights (kept) and the weighted sum, divided once.
          double kept = 0, a = 0, sum = 0;
          for (int64_t i = 0; i < n; ++i) {
            const double b = a + seq_w[i];
            const double part = std::min(b, hi) - std::max(a, lo);
            if (part > 0) {
              kept += part;
              if (seq_v[i] != acc(0)) sum += part * static_cast<double>(seq_v[i]);
            }
            a = b;
          }
          result = static_cast<acc>(sum / kept);
        }
        op[t0 + e] = static_cast<wt>(w + result);
      }
    }
  }
}

}  // namespace

// weight: N-D; clients: K compact tensors (one floating dtype); rows / cols: (K, m) int64, -1
// padded (cols of a 1-D weight: (K, 1) zeros); coef: (K,) float64 as given (>= 0, not
// normalised); reduce: "median" or "trimmed_mean"; trim in [0, 0.5).
Tensor robust_aggregate_cpu(Tensor weight, std::vector<Tensor> clients, Tensor rows, Tensor cols, Tensor coef,
                            std::string mode, std::string reduce, double trim) {
  const int64_t K = static_cast<int64_t>(clients.size());
  STD_TORCH_CHECK(K > 0, "clients must not be empty");
  STD_TORCH_CHECK(coef.dim() == 1 && coef.size(0) == K && coef.scalar_type() == ScalarType::Double && coef.is_cpu(),
                  "coef must be a (K,) float64 CPU tensor");
  const bool overlap = mode == "overlap";
  STD_TORCH_CHECK(overlap || mode == "reconstruct", "mode must be 'reconstruct' or 'overlap'");
  const bool median = reduce == "median";
  STD_TORCH_CHECK(median || reduce == "trimmed_mean", "reduce must be 'median' or 'trimmed_mean'");
  STD_TORCH_CHECK(trim >= 0 && trim < 0.5, "trim must be in [0, 0.5)");
  const auto wdtype = weight.scalar_type(), cdtype = clients[0].scalar_type();
  STD_TORCH_CHECK(weight.is_cpu() && is_floating(wdtype) && is_floating(cdtype) && weight.dim() >= 1,
                  "weight and clients must be floating CPU tensors");
  Tensor w = torch::stable::contiguous(weight);
  std::vector<int64_t> shape(w.sizes().begin(), w.sizes().end());
  Tensor out = new_output(shape, wdtype);
  const View3 v = view3(w);
  const KeepTables kt = keep_tables(rows, cols, v, w.size(0), w.dim() >= 2 ? w.size(1) : 1, K);
  std::vector<int32_t> inv_cols(K * v.Cin, -1);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < kt.cc[k] && j < v.Cin; ++j) {
      const int32_t c = kt.cols[k * v.Cin + j];
      if (c >= 0 && c < v.Cin) inv_cols[k * v.Cin + c] = static_cast<int32_t>(j);
    }
  const double* cp = cdata<double>(coef);
  CAHFP_DISPATCH_FLOATING(wdtype, "robust_aggregate", [&] {
    using wt = scalar_t;
    CAHFP_DISPATCH_FLOATING(cdtype, "robust_aggregate_client", [&] {
      using ct = scalar_t;
      std::vector<ClientView<ct>> cl(K);
      for (int64_t k = 0; k < K; ++k) cl[k] = separate_view<ct>(clients[k], cdtype, v, kt.rc[k], kt.cc[k], 0, k);
      const wt* W = cdata<wt>(w);
      wt* o = mdata<wt>(out);
      // Baseline code only: an AVX2 build of this branchy loop measured no faster (VGG-16, K = 10).
      torch::stable::parallel_for(0, v.R * v.Cin, 1, [&](int64_t q0, int64_t q1) {
        robust_items<wt, ct>(W, o, v, kt, inv_cols, cl, cp, K, overlap, median, trim, q0, q1);
      });
    });
  });
  return out;
}

}  // namespace cahfp
