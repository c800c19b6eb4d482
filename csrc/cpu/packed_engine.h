// The per-round engine behind aggregate_packed and fold_packed.
//
// The layout's tables (inverse row maps, kept-column lists) are turned, once per call and
// in parallel over clients, into what the inner loop wants: per (client, tensor) the kept
// rows in row order with their compact row, the kept columns as runs of consecutive
// columns, and the kept columns as a bitset. The inner loop then does no inverse-map scan,
// no run detection and no per-column coverage store: coverage of a row is the OR of the
// bitsets of the clients (coefficient != 0) that keep it.
//
// Work items are either a tile of one wide tensor (about kWideTile accumulator elements:
// a client's part of a tile is one contiguous stretch of its buffer, long enough for the
// hardware prefetcher) or a group of consecutive whole small tensors (up to kGroupElems
// elements: their parts are consecutive in a packed buffer). The next clients' parts of an
// item are prefetched (prefetcht2) at the pace the current client's part is consumed.
//
// Within an item a client's kept rows are walked block by block (a block: the T taps of one
// kept column; T == 1: a run of kept columns), run by run or kept column by kept column
// (kFewRuns, kLongRun); wide tensors whose clients keep short runs are accumulated in a
// scratch that interleaves each column's weights and sums (kInterleave).
//
// Arithmetic is that of aggregate_engine.h, element by element: clients are added in order
// 0..K-1 as s += p_k * (c - w) (reconstruct) or s += p_k * c (overlap), then w + s or s / den.
// Which elements a work item holds never changes a result; the reply statistics are summed
// per (item, client) and reduced in item order, and the items depend only on the layout, so
// every result is independent of the thread count.
#pragma once

#include "aggregate_engine.h"
#include "common.h"
#include "isa.h"
#include "layout_tables.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

namespace cahfp {
namespace packed {

using engine::ClientView;
using engine::SsqAcc;

// Accumulator elements per tile of a wide tensor (512 KB of float32 sums; an interleaved
// scratch of weights and sums, 1 MB, stays in a 1 MB L2; measured, K = 100, 2 threads:
// VGG-16 the same as 256 K, 5 % faster than 64 K).
constexpr int64_t kWideTile = 131072;
// Consecutive whole tensors grouped into one item up to this many elements (measured,
// ResNet-56, K = 100: 16 K 5-10 % faster than 64 K and than 8 K).
constexpr int64_t kGroupElems = 16384;
// Work items a call is split into at least, when the model is large enough (a constant:
// the split, and with it the order the statistics are summed in, never depends on threads).
constexpr int64_t kMinItems = 32;
// Smallest tile (elements) the kMinItems split goes down to.
constexpr int64_t kMinTile = 16384;
// Items of at most this many elements prefetch the next client's part as they go.
constexpr int64_t kPacedElems = 65536;
// Folds and overlap mode add a client's cover weights to each of its kept rows as one dense
// row (pk at its kept columns, 0 elsewhere) when it keeps more than one column in
// kDenseCover, else column by column (measured, K = 100, windows of 64: ResNet-56's folds
// 10-15 % faster, VGG-16 the same; dense rows for every client measured as good).
constexpr int64_t kDenseCover = 16;

// Bytes ahead of the current run of a client's stream that the hot loop prefetches, one
// prefetch per run (measured, K = 100: VGG-16 11-12 % faster on 1 and 2 threads, ResNet-56
// 3 %; 1 and 4 KB no better). A prefetch never faults, so one past the buffer's end is harmless.
constexpr int64_t kStreamAhead = 2048;

// A client's kept row is walked run by run (one vector loop per run of consecutive kept
// columns) when it has at most kFewRuns runs (short rows: the branch predictor learns the
// pattern of run lengths, which repeats row after row) or runs of kLongRun columns or more
// on average; otherwise kept column by kept column, a fixed shape per T-tap block (long rows
// of short runs: a loop per run mispredicts each run's length). Measured, K = 100, 2 threads:
// VGG-16 10-15 % faster by columns, ResNet-56 (rows of 16-64 columns) 5-10 % slower.
constexpr int64_t kFewRuns = 8;
constexpr int64_t kLongRun = 4;
// A tensor with T > 1 and rows of at least kInterleave columns whose clients keep runs
// shorter than kLongRun columns on average is accumulated in an interleaved scratch: per
// column its T weights, then its T sums, so a kept block's weights and sums share cache
// lines and the write-out reads the weights from the scratch (measured, K = 100, 2 threads,
// with the walk by columns: VGG-16 in cache 44.6 -> 41.6 ms, from memory 55 -> 51 ms;
// ResNet-56's rows of up to 64 columns 5 % slower). Padding each half to 16 floats so that
// a block is one AVX-512 load and store measured slower (55 vs 51 ms; in cache 50 vs 41).
constexpr int64_t kInterleave = 128;
// Folds of at least this many clients use the interleaved scratch (fewer add in place).
constexpr int64_t kInterleaveFold = 8;

struct Run {
  int64_t co, jo, n;  // element offsets of the run in the full and the compact row, its elements
};

// Client k's part of tensor n in the plan's per-client lists.
struct SegT {
  int64_t rc = 0, cc = 0;  // kept rows / cols
  int64_t row0 = 0;        // its kept rows start at rr[k][row0] / ri[k][row0]
  int64_t nrows = 0;       // kept rows (with a compact row index >= 0)
  int64_t run0 = 0, nruns = 0;
  int64_t bits0 = 0;       // its column bitset starts at bits[k][bits0]
  int64_t col0 = 0;        // its kept columns start at cols[k][col0] (rc > 0 and cc > 0 only)
};

struct Tensor3 {
  int64_t R, Cin, T;
  int64_t words;  // 64-bit words of a row's column bitset
  bool inter = false;  // accumulated in a scratch interleaving weights and sums (kInterleave)
};

// A work item: rows [r0, r1) of tensor n0 (n1 == n0 + 1), or the whole tensors [n0, n1).
struct Item {
  int32_t n0, n1;
  int64_t r0, r1;
  int64_t sum_elems;  // accumulator elements
  int64_t cov_words;  // coverage bitset words
};

// One client's lists, every tensor's part in tensor order (SegT says where each starts).
struct ClientLists {
  std::vector<int32_t> rr, ri;  // kept rows' full / compact index
  std::vector<Run> runs;
  std::vector<uint64_t> bits;
  std::vector<int32_t> cols;  // kept columns
};

// A layout's plan, built once from its checked tables (and kept for the layout's life):
// per client its kept rows (row, compact row), runs and bitsets of every tensor, in tensor
// order; copies of the tables the calls still need (sizes and offsets); the work items.
// Nothing in it refers to the tables it was built from; a window's plan shares its clients'
// lists with the round's.
struct LayoutPlan {
  int64_t N = 0, K = 0;
  std::vector<int64_t> meta, counts, offsets;  // (N, 5), (K, N, 2), (K, N)
  std::vector<Tensor3> t;                      // (N)
  std::vector<SegT> seg;                       // (K, N)
  std::vector<std::shared_ptr<const ClientLists>> lists;  // (K)
  std::vector<Item> items;
  const SegT& at(int64_t k, int64_t n) const { return seg[k * N + n]; }
};

// Client k's lists from the layout's inverse row maps and column lists.
inline void plan_client(LayoutPlan& plan, const LayoutTables& lt, int64_t k) {
  const int64_t N = plan.N;
  auto made = std::make_shared<ClientLists>();
  auto& rr = made->rr;
  auto& ri = made->ri;
  auto& runs = made->runs;
  auto& bits = made->bits;
  auto& cols = made->cols;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t* m = lt.meta + 5 * n;
    const Tensor3& t = plan.t[n];
    SegT& s = plan.seg[k * N + n];
    s.rc = lt.counts[2 * (k * N + n)];
    s.cc = lt.counts[2 * (k * N + n) + 1];
    s.row0 = static_cast<int64_t>(rr.size());
    s.run0 = static_cast<int64_t>(runs.size());
    s.bits0 = static_cast<int64_t>(bits.size());
    s.col0 = static_cast<int64_t>(cols.size());
    if (s.rc > 0 && s.cc > 0) {
      const int32_t* inv = lt.row_inv + k * lt.SR + m[3];
      for (int64_t r = 0; r < t.R; ++r)
        if (inv[r] >= 0) rr.push_back(static_cast<int32_t>(r)), ri.push_back(inv[r]);
      const int32_t* ck = lt.col_keep + k * lt.SC + m[4];
      cols.insert(cols.end(), ck, ck + s.cc);
      bits.resize(bits.size() + t.words, 0);
      uint64_t* b = bits.data() + s.bits0;
      for (int64_t j = 0; j < s.cc;) {
        int64_t L = 1;
        while (j + L < s.cc && ck[j + L] == ck[j] + L) ++L;
        runs.push_back({ck[j] * t.T, j * t.T, L * t.T});
        for (int64_t l = 0; l < L; ++l) b[(ck[j] + l) >> 6] |= uint64_t(1) << ((ck[j] + l) & 63);
        j += L;
      }
    }
    s.nrows = static_cast<int64_t>(rr.size()) - s.row0;
    s.nruns = static_cast<int64_t>(runs.size()) - s.run0;
  }
  plan.lists[k] = std::move(made);
}

// One call: the layout's plan and the clients' compact tensors ((K, N) views; a view's
// columns are dense, stride T).
template <typename ct>
struct Plan {
  const LayoutPlan* lp = nullptr;
  int64_t N = 0, K = 0;
  std::vector<ClientView<ct>> views;  // (K, N)
  const std::vector<Tensor3>& t() const { return lp->t; }
  const ClientView<ct>& view(int64_t k, int64_t n) const { return views[k * N + n]; }
};

inline std::vector<Item> plan_items(const std::vector<Tensor3>& t) {
  const int64_t N = static_cast<int64_t>(t.size());
  int64_t total = 0;
  for (const auto& x : t) total += x.R * x.Cin * x.T;
  const int64_t tile = std::max<int64_t>(kMinTile, std::min<int64_t>(kWideTile, total / kMinItems));
  const int64_t group = std::min<int64_t>(kGroupElems, tile);
  std::vector<Item> items;
  for (int64_t n = 0; n < N;) {
    const int64_t row_elems = t[n].Cin * t[n].T, elems = t[n].R * row_elems;
    if (elems > group) {  // a wide tensor: tiles of rows
      const int64_t rows = std::max<int64_t>(1, tile / std::max<int64_t>(1, row_elems));
      for (int64_t r = 0; r < t[n].R; r += rows) {
        const int64_t r1 = std::min(t[n].R, r + rows);
        items.push_back({static_cast<int32_t>(n), static_cast<int32_t>(n + 1), r, r1, (r1 - r) * row_elems,
                         (r1 - r) * t[n].words});
      }
      ++n;
      continue;
    }
    Item it{static_cast<int32_t>(n), static_cast<int32_t>(n), 0, 0, 0, 0};
    while (n < N && t[n].R * t[n].Cin * t[n].T <= group &&
           (it.n1 == it.n0 || it.sum_elems + t[n].R * t[n].Cin * t[n].T <= group)) {
      it.sum_elems += t[n].R * t[n].Cin * t[n].T;
      it.cov_words += t[n].R * t[n].words;
      ++n;
      it.n1 = static_cast<int32_t>(n);
    }
    it.r1 = it.n1 == it.n0 + 1 ? t[it.n0].R : 0;
    items.push_back(it);
  }
  return items;
}

// Rows of tensor n an item covers.
inline void item_rows(const Item& it, int64_t n, const Tensor3& t, int64_t& r0, int64_t& r1) {
  if (it.n1 == it.n0 + 1 && it.r1 > 0) r0 = it.r0, r1 = it.r1;
  else r0 = 0, r1 = t.R;
}

// Where the call writes: per tensor the weights, and either the output (aggregate) or the
// running partial sums (fold).
template <typename wt>
struct Targets {
  std::vector<const wt*> W;
  std::vector<wt*> out;
  std::vector<const acc_t<wt>*> sums_in, cover_in;
  std::vector<acc_t<wt>*> sums_out, cover_out;
};

// Prefetch of the next clients' parts of an item, paced by what the current client read.
struct Pacer {
  const char* p = nullptr;  // next line to prefetch
  const char* end = nullptr;
  void start(const char* b, const char* e) { p = b, end = e; }
  void advance(int64_t bytes) {
    const char* want = std::min(end, p + bytes);
    const char* q = p;  // a local: the member would be stored back after every prefetch
    for (; q < want; q += 64) __builtin_prefetch(q, 0, 1);
    p = q;
  }
};

// [a, z): the entries of a client's kept rows rr (ascending, nrows of a tensor of R rows)
// that fall in rows [r0, r1) (all of them for the whole tensor: no search).
inline void kept_rows_in(const int32_t* rr, int64_t nrows, int64_t r0, int64_t r1, int64_t R, int64_t& a,
                         int64_t& z) {
  a = 0, z = nrows;
  if (r0 > 0 || r1 < R) {
    a = std::lower_bound(rr, rr + nrows, static_cast<int32_t>(r0)) - rr;
    z = std::lower_bound(rr + a, rr + nrows, static_cast<int32_t>(r1)) - rr;
  }
}

// The contiguous stretch of client k's buffer an item reads (null when its rows are not in
// compact order, which only a hand-made layout makes).
template <typename ct>
inline void item_span(const Plan<ct>& plan, const Item& it, int64_t k, const char*& b, const char*& e) {
  b = e = nullptr;
  const LayoutPlan& lp = *plan.lp;
  for (int64_t n = it.n0; n < it.n1; ++n) {
    const SegT& s = lp.at(k, n);
    if (s.nrows == 0 || s.nruns == 0) continue;
    const ClientView<ct>& v = plan.view(k, n);
    int64_t r0, r1;
    item_rows(it, n, lp.t[n], r0, r1);
    const ClientLists& cl = *lp.lists[k];
    const int32_t* rr = cl.rr.data() + s.row0;
    int64_t a, z;
    kept_rows_in(rr, s.nrows, r0, r1, lp.t[n].R, a, z);
    if (a == z) continue;
    const int32_t* ri = cl.ri.data() + s.row0;
    const char* lo = reinterpret_cast<const char*>(v.data + ri[a] * v.stride0);
    const char* hi = reinterpret_cast<const char*>(v.data + ri[z - 1] * v.stride0 + v.cols * v.stride1);
    if (!b || lo < b) b = lo;
    if (!e || hi > e) e = hi;
  }
}

// One T-tap block of one client (T > 1: a block per kept column, the same shape whichever
// walk reaches it), or one run of consecutive kept elements (T == 1): accumulate and take
// the statistics. s: the block's sums; w: its weights; n: its elements (T, or the run's).
// kMode: 0 reconstruct (s += pk * (c - w)), 1 overlap (s += pk * c), 2 the statistics
// alone, 3 their exact float64 recount. Which statistics lane takes an element depends only
// on its tap (T > 1) or its place in the client's own run (T == 1), never on the walk or the
// plan, so every path gives a client the same statistics bit for bit.
template <typename acc, typename ct, typename wt, int kTaps, int kMode>
inline void block(acc* __restrict__ s, const ct* __restrict__ c, const wt* __restrict__ w, acc pk, int64_t n,
                  SsqAcc& q, bool& bad) {
  using engine::delta_pass;
  if constexpr (kMode == 0) {
    delta_pass<acc, ct, wt, kTaps, true, true>(s, c, w, pk, n, q, bad);
  } else if constexpr (kMode == 1) {
    engine::add_scaled<acc, ct, kTaps>(s, c, pk, n);
    delta_pass<acc, ct, wt, kTaps, false, true>(nullptr, c, w, pk, n, q, bad);
  } else if constexpr (kMode == 2) {
    delta_pass<acc, ct, wt, kTaps, false, true>(nullptr, c, w, pk, n, q, bad);
  } else {
    delta_pass<acc, ct, wt, kTaps, false, true, true>(nullptr, c, w, acc(0), n, q, bad);
  }
}

// One client's kept row (compact row crow; weights wrow and sums sp of the full row, or the
// interleaved scratch row with kInter), block by block: walked run by run (by_runs) or kept
// column by kept column. The statistics live in locals for the row (registers, not memory).
// The client's stream is prefetched kStreamAhead bytes ahead, once per run or column: the
// loop's work per byte leaves the out-of-order window too short to keep enough of its misses
// in flight.
template <typename acc, typename ct, typename wt, int kTaps, int kMode, bool kInter>
inline void client_row(acc* __restrict__ sp, const ct* __restrict__ crow, const wt* __restrict__ wrow,
                       const Run* __restrict__ runs, int64_t nruns, const int32_t* __restrict__ kcols, int64_t cc,
                       int64_t T_rt, bool by_runs, acc pk, SsqAcc& q, bool& bad) {
  const int64_t T = kTaps > 0 ? kTaps : T_rt;
  // interleaved: per column T weights, then T sums
  const int64_t cstride = kInter ? 2 * T : T, soff = kInter ? T : 0;
  // member by member: a copy of the whole struct (a 32-byte vector inside) made the compiler
  // keep the running lanes in a stack slot, a store and a reload per block
  SsqAcc lq;
  lq.v = q.v, lq.t = q.t, lq.s = q.s;
  bool lb = bad;
  if (by_runs) {  // (always for T == 1; never for an interleaved row)
    for (int64_t u = 0; u < nruns; ++u) {
      const Run& run = runs[u];
      __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(crow + run.jo) + kStreamAhead), 0,
                         0);
      if (T == 1)
        block<acc, ct, wt, 0, kMode>(sp + run.co, crow + run.jo, wrow + run.co, pk, run.n, lq, lb);
      else
        for (int64_t e = 0; e < run.n; e += T)
          block<acc, ct, wt, kTaps, kMode>(sp + run.co + e, crow + run.jo + e, wrow + run.co + e, pk, T, lq, lb);
    }
  } else {
    for (int64_t j = 0; j < cc; ++j) {
      const int64_t co = static_cast<int64_t>(kcols[j]) * cstride;
      __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(crow + j * T) + kStreamAhead), 0,
                         0);
      block<acc, ct, wt, kTaps, kMode>(sp + co + soff, crow + j * T, wrow + co, pk, T, lq, lb);
    }
  }
  q.v = lq.v, q.t = lq.t, q.s = lq.s;
  bad = lb;
}

// client_row out of line, once per ISA variant (kIsa: 0 baseline, 1 AVX2): the hot loop in a
// small function of its own, where the compiler keeps its accumulators in registers (flattened
// into the whole item loop it kept a fold's statistics in stack slots, a store and a reload per
// block: VGG-16 folds 30 % slower than the batch call).
#define CAHFP_ROW_PARAMS                                                                                      \
  acc *__restrict__ sp, const ct *__restrict__ crow, const wt *__restrict__ wrow, const Run *__restrict__ runs, \
      int64_t nruns, const int32_t *__restrict__ kcols, int64_t cc, int64_t T_rt, bool by_runs, acc pk, SsqAcc &q, \
      bool &bad
#define CAHFP_ROW_ARGS sp, crow, wrow, runs, nruns, kcols, cc, T_rt, by_runs, pk, q, bad
template <typename acc, typename ct, typename wt, int kTaps, int kMode, bool kInter>
__attribute__((noinline)) CAHFP_ATTR_BASELINE void client_row_baseline(CAHFP_ROW_PARAMS) {
  client_row<acc, ct, wt, kTaps, kMode, kInter>(CAHFP_ROW_ARGS);
}
#if defined(CAHFP_X86_DISPATCH)
template <typename acc, typename ct, typename wt, int kTaps, int kMode, bool kInter>
__attribute__((noinline)) CAHFP_ATTR_AVX2 void client_row_avx2(CAHFP_ROW_PARAMS) {
  client_row<acc, ct, wt, kTaps, kMode, kInter>(CAHFP_ROW_ARGS);
}
#endif
template <int kIsa, typename acc, typename ct, typename wt, int kTaps, int kMode, bool kInter>
inline void client_row_at(CAHFP_ROW_PARAMS) {
#if defined(CAHFP_X86_DISPATCH)
  if constexpr (kIsa >= 1) {
    client_row_avx2<acc, ct, wt, kTaps, kMode, kInter>(CAHFP_ROW_ARGS);
    return;
  }
#endif
  client_row_baseline<acc, ct, wt, kTaps, kMode, kInter>(CAHFP_ROW_ARGS);
}
#undef CAHFP_ROW_PARAMS
#undef CAHFP_ROW_ARGS

// Where one tensor of an item puts its accumulators: sums (the scratch, interleaved or not,
// or a fold's partial sums), cover weights, coverage bits.
template <typename acc>
struct TensorOut {
  acc* sum;
  acc* den;
  uint64_t* cov;
};

// One client's rows of one tensor within an item: accumulate (coefficient != 0) and take
// its statistics. kTaps: the tensor's T when known at compile time (else 0). kExact:
// statistics in float64 only (after the float32 count overflowed). kInter: the scratch
// interleaves weights and sums (Tensor3::inter).
template <typename wt, typename ct, bool kOverlap, int kTaps, bool kFold, bool kExact, bool kInter, int kIsa>
inline void client_tensor(const Plan<ct>& plan, const Targets<wt>& tg, int64_t n, int64_t r0, int64_t r1, int64_t k,
                          acc_t<wt> pk, const TensorOut<acc_t<wt>>& to, std::vector<acc_t<wt>>& cover_row, SsqAcc& q,
                          bool& bad, Pacer* pace) {
  using acc = acc_t<wt>;
  const bool add = !kExact && pk != acc(0);
  const LayoutPlan& lp = *plan.lp;
  const Tensor3& t = lp.t[n];
  const int64_t T = kTaps > 0 ? kTaps : t.T, row_elems = t.Cin * T;
  const SegT& s = lp.at(k, n);
  if (s.nrows == 0 || s.nruns == 0) return;
  const ClientView<ct>& v = plan.view(k, n);
  const ClientLists& cl = *lp.lists[k];
  const int32_t* rr = cl.rr.data() + s.row0;
  const int32_t* ri = cl.ri.data() + s.row0;
  int64_t a, z;
  kept_rows_in(rr, s.nrows, r0, r1, t.R, a, z);
  const Run* runs = cl.runs.data() + s.run0;
  const int64_t nruns = s.nruns, cc = s.cc;
  const uint64_t* colbits = cl.bits.data() + s.bits0;
  const int32_t* kcols = cl.cols.data() + s.col0;
  const int64_t row_bytes = v.cols * v.stride1 * static_cast<int64_t>(sizeof(ct));
  const bool by_runs = T == 1 || (!t.inter && (nruns <= kFewRuns || cc >= kLongRun * nruns));
  const int64_t srow = kInter ? t.Cin * 2 * T : row_elems;  // scratch row
  // Cover weights (folds, overlap): with many kept columns, one dense row of pk / 0 added to
  // every kept row costs fewer stores than one add per kept column. Adding 0 to a weight sum
  // changes no bit (but -0.0 in a caller's cover becomes +0.0: neither is > 0).
  const bool dense_cover = (kFold || kOverlap) && add && a < z && cc * kDenseCover > t.Cin;
  if (dense_cover) {
    if (static_cast<int64_t>(cover_row.size()) < t.Cin) cover_row.resize(t.Cin);
    std::fill(cover_row.begin(), cover_row.begin() + t.Cin, acc(0));
    for (int64_t j = 0; j < cc; ++j) cover_row[kcols[j]] = pk;
  }
  for (int64_t x = a; x < z; ++x) {
    const int64_t r = rr[x];
    const ct* crow = v.data + static_cast<int64_t>(ri[x]) * v.stride0;
    acc* const sp = to.sum + (r - r0) * srow;
    const wt* wrow;
    if constexpr (kInter && std::is_same_v<wt, acc>) wrow = sp;
    else wrow = tg.W[n] + r * row_elems;
    if constexpr (kExact)
      client_row_at<kIsa, acc, ct, wt, kTaps, 3, kInter>(sp, crow, wrow, runs, nruns, kcols, cc, T, by_runs, pk, q, bad);
    else if (!add)
      client_row_at<kIsa, acc, ct, wt, kTaps, 2, kInter>(sp, crow, wrow, runs, nruns, kcols, cc, T, by_runs, pk, q, bad);
    else if constexpr (kOverlap)
      client_row_at<kIsa, acc, ct, wt, kTaps, 1, kInter>(sp, crow, wrow, runs, nruns, kcols, cc, T, by_runs, pk, q, bad);
    else
      client_row_at<kIsa, acc, ct, wt, kTaps, 0, kInter>(sp, crow, wrow, runs, nruns, kcols, cc, T, by_runs, pk, q, bad);
    if (add) {
      if constexpr (kFold || kOverlap) {
        // a dense row, or column by column: a fixed trip count (a loop per run mispredicts its length)
        acc* const dn = to.den + (r - r0) * t.Cin;
        if (dense_cover) engine::add_rows<acc>(dn, cover_row.data(), t.Cin);
        else
          for (int64_t j = 0; j < cc; ++j) dn[kcols[j]] += pk;
      }
      if constexpr (!kFold) {
        uint64_t* const cw = to.cov + (r - r0) * t.words;
        for (int64_t w = 0; w < t.words; ++w) cw[w] |= colbits[w];
      }
    }
    if (pace) pace->advance(row_bytes);
  }
}

// Whether tensor t's sums are accumulated in the interleaved scratch in a call of K clients
// (weights of the accumulation dtype: the scratch holds them unrounded; a fold of fewer than
// kInterleaveFold clients adds in place: filling the scratch from the partial sums and
// copying it back costs a pass over the whole tensor, which a few clients do not repay).
template <typename wt>
inline bool interleaved(const Tensor3& t, bool fold, int64_t K) {
  return std::is_same_v<wt, acc_t<wt>> && t.inter && (!fold || K >= kInterleaveFold);
}

// Scratch elements of `rows` rows of tensor t: interleaved weights and sums; the sums alone
// (aggregate); none (a fold's sums are the caller's partial sums).
template <typename wt>
inline int64_t scratch_elems(const Tensor3& t, int64_t rows, bool fold, int64_t K) {
  return interleaved<wt>(t, fold, K) ? rows * t.Cin * 2 * t.T : (fold ? 0 : rows * t.Cin * t.T);
}

// One client's pass over one item, tensor by tensor (each with its own tap count).
template <typename wt, typename ct, bool kOverlap, bool kFold, bool kExact, int kIsa>
inline void client_item(const Plan<ct>& plan, const Targets<wt>& tg, const Item& it, int64_t k, acc_t<wt> pk,
                        acc_t<wt>* sum, acc_t<wt>* den, uint64_t* cov, std::vector<acc_t<wt>>& cover_row, SsqAcc& q,
                        bool& bad, Pacer* pace) {
  const LayoutPlan& lp = *plan.lp;
  int64_t sum_off = 0, cov_off = 0, den_off = 0;
  for (int64_t n = it.n0; n < it.n1; ++n) {
    const Tensor3& t = lp.t[n];
    int64_t r0, r1;
    item_rows(it, n, t, r0, r1);
    const bool inter = interleaved<wt>(t, kFold, plan.K);
    const TensorOut<acc_t<wt>> to{kFold && !inter ? tg.sums_out[n] + r0 * t.Cin * t.T : sum + sum_off,
                                  kFold ? tg.cover_out[n] + r0 * t.Cin : (kOverlap ? den + den_off : nullptr),
                                  kFold ? nullptr : cov + cov_off};
    sum_off += scratch_elems<wt>(t, r1 - r0, kFold, plan.K);
    cov_off += (r1 - r0) * t.words;
    den_off += (r1 - r0) * t.Cin;
    // the common tap counts unrolled (one dtype; the exact recount is rare); T = 1 is never
    // interleaved
    const auto walk = [&](auto inter_c) {
      constexpr bool kI = decltype(inter_c)::value;
      if constexpr (std::is_same_v<wt, ct> && !kExact) {
        if (t.T == 9)
          return client_tensor<wt, ct, kOverlap, 9, kFold, kExact, kI, kIsa>(plan, tg, n, r0, r1, k, pk, to,
                                                                              cover_row, q, bad, pace);
        if (!kI && t.T == 1)
          return client_tensor<wt, ct, kOverlap, 1, kFold, kExact, kI, kIsa>(plan, tg, n, r0, r1, k, pk, to,
                                                                              cover_row, q, bad, pace);
      }
      client_tensor<wt, ct, kOverlap, 0, kFold, kExact, kI, kIsa>(plan, tg, n, r0, r1, k, pk, to, cover_row, q, bad,
                                                                   pace);
    };
    if constexpr (std::is_same_v<wt, acc_t<wt>>)  // (the scratch holds weights of the accumulation dtype)
      if (inter) {
        walk(std::true_type{});
        continue;
      }
    walk(std::false_type{});
  }
}

// o = w + s (reconstruct) or s / den (overlap) where covered, w elsewhere, for one row.
template <typename wt, bool kOverlap>
inline void write_row(wt* o, const wt* w, const acc_t<wt>* s, const acc_t<wt>* den, const uint64_t* cov, int64_t Cin,
                      int64_t T) {
  using acc = acc_t<wt>;
  for (int64_t c = 0; c < Cin;) {
    const bool on = (cov[c >> 6] >> (c & 63)) & 1;
    int64_t e = c + 1;
    while (e < Cin) {  // the end of the run of equal bits, a word at a time
      const uint64_t word = cov[e >> 6] >> (e & 63);
      const uint64_t diff = on ? ~word : word;
      const int64_t left = 64 - (e & 63);
      if (diff == 0 || (left < 64 && (diff & ((uint64_t(1) << left) - 1)) == 0)) {
        e += left;
        continue;
      }
      e += __builtin_ctzll(diff);
      break;
    }
    e = std::min(e, Cin);
    const int64_t n = (e - c) * T;
    if (!on) {
      std::memcpy(o + c * T, w + c * T, sizeof(wt) * n);
    } else if constexpr (kOverlap) {
      for (int64_t cc = c; cc < e; ++cc)
        for (int64_t t = 0; t < T; ++t) o[cc * T + t] = static_cast<wt>(s[cc * T + t] / den[cc]);
    } else {
      engine::finish_sum(o + c * T, w + c * T, s + c * T, n);
    }
    c = e;
  }
}

// write_row on an interleaved row (per column T weights, then T sums).
template <typename wt, bool kOverlap>
inline void write_row_inter(wt* o, const acc_t<wt>* ws, const acc_t<wt>* den, const uint64_t* cov, int64_t Cin,
                            int64_t T) {
  using acc = acc_t<wt>;
  for (int64_t c = 0; c < Cin; ++c, o += T, ws += 2 * T) {
    const bool on = (cov[c >> 6] >> (c & 63)) & 1;
    if (!on) {
      for (int64_t t = 0; t < T; ++t) o[t] = static_cast<wt>(ws[t]);
    } else if constexpr (kOverlap) {
      for (int64_t t = 0; t < T; ++t) o[t] = static_cast<wt>(ws[T + t] / den[c]);
    } else {
      for (int64_t t = 0; t < T; ++t) o[t] = static_cast<wt>(ws[t] + ws[T + t]);
    }
  }
}

template <typename acc>
struct Scratch {
  std::vector<acc> sum, den, cover_row;
  std::vector<uint64_t> cov;
};

// One item: every client in order (statistics per client), then the write-out.
template <typename wt, typename ct, bool kOverlap, bool kFold, int kIsa>
void run_item(const Plan<ct>& plan, const Targets<wt>& tg, const Item& it, const std::vector<acc_t<wt>>& p,
              Scratch<acc_t<wt>>& scratch, double* ssq, uint8_t* bad) {
  using acc = acc_t<wt>;
  const int64_t K = plan.K;
  acc* sum = nullptr;
  acc* den = nullptr;
  uint64_t* cov = nullptr;
  // the scratch: per tensor its interleaved weights and sums (zero, or a fold's partial sums
  // so far), or (aggregate) its zeroed sums; a fold's other tensors accumulate in place
  int64_t need = 0;
  for (int64_t n = it.n0; n < it.n1; ++n) {
    int64_t r0, r1;
    item_rows(it, n, plan.t()[n], r0, r1);
    need += scratch_elems<wt>(plan.t()[n], r1 - r0, kFold, K);
  }
  if (static_cast<int64_t>(scratch.sum.size()) < need) scratch.sum.resize(need);
  sum = scratch.sum.data();
  acc* d = sum;
  for (int64_t n = it.n0; n < it.n1; ++n) {
    const Tensor3& t = plan.t()[n];
    int64_t r0, r1;
    item_rows(it, n, t, r0, r1);
    const int64_t re = t.Cin * t.T;
    if (interleaved<wt>(t, kFold, K)) {  // per column: its T weights, then its T sums
      const wt* w = tg.W[n] + r0 * re;
      const acc* from = kFold && tg.sums_in[n] ? tg.sums_in[n] + r0 * re : nullptr;
      for (int64_t c = 0; c < (r1 - r0) * t.Cin; ++c, d += 2 * t.T, w += t.T) {
        for (int64_t u = 0; u < t.T; ++u) d[u] = static_cast<acc>(w[u]);
        if (from) std::memcpy(d + t.T, from + c * t.T, sizeof(acc) * t.T);
        else std::fill(d + t.T, d + 2 * t.T, acc(0));
      }
    } else if (!kFold) {
      std::fill(d, d + (r1 - r0) * re, acc(0));
      d += (r1 - r0) * re;
    } else if (!tg.sums_in[n]) {  // from zeros: the item's partial sums zeroed here, in cache
      std::fill(tg.sums_out[n] + r0 * re, tg.sums_out[n] + r1 * re, acc(0));
    } else if (tg.sums_in[n] != tg.sums_out[n]) {
      std::memcpy(tg.sums_out[n] + r0 * re, tg.sums_in[n] + r0 * re, sizeof(acc) * (r1 - r0) * re);
    }
    if constexpr (kFold) {
      if (!tg.cover_in[n])
        std::fill(tg.cover_out[n] + r0 * t.Cin, tg.cover_out[n] + r1 * t.Cin, acc(0));
      else if (tg.cover_in[n] != tg.cover_out[n])
        std::memcpy(tg.cover_out[n] + r0 * t.Cin, tg.cover_in[n] + r0 * t.Cin, sizeof(acc) * (r1 - r0) * t.Cin);
    }
  }
  if constexpr (!kFold) {
    if (static_cast<int64_t>(scratch.cov.size()) < it.cov_words) scratch.cov.resize(it.cov_words);
    std::fill(scratch.cov.begin(), scratch.cov.begin() + it.cov_words, uint64_t(0));
    cov = scratch.cov.data();
    if constexpr (kOverlap) {  // one weight per (row, column)
      int64_t pairs = 0;
      for (int64_t n = it.n0; n < it.n1; ++n) {
        int64_t r0, r1;
        item_rows(it, n, plan.t()[n], r0, r1);
        pairs += (r1 - r0) * plan.t()[n].Cin;
      }
      if (static_cast<int64_t>(scratch.den.size()) < pairs) scratch.den.resize(pairs);
      std::fill(scratch.den.begin(), scratch.den.begin() + pairs, acc(0));
      den = scratch.den.data();
    }
  }
  Pacer pacer;
  for (int64_t k = 0; k < K; ++k) {
    const acc pk = p[k];  // 0: read for the statistics only
    Pacer* pace = nullptr;
    // Short parts (small items) get the next client's part prefetched; long ones are left to
    // the hardware prefetcher (measured: the prefetch loop cost more than it saved there).
    if (k + 1 < K && it.sum_elems <= kPacedElems) {
      const char* b;
      const char* e;
      item_span(plan, it, k + 1, b, e);
      if (b) {
        pacer.start(b, e);
        pace = &pacer;
      }
    }
    SsqAcc q;
    bool b = false;
    client_item<wt, ct, kOverlap, kFold, false, kIsa>(plan, tg, it, k, pk, sum, den, cov, scratch.cover_row, q, b,
                                                        pace);
    if constexpr (engine::kAllFloat<acc, ct, wt>)
      if (!std::isfinite(q.total())) {
        q = SsqAcc();
        client_item<wt, ct, kOverlap, kFold, true, kIsa>(plan, tg, it, k, pk, sum, den, cov, scratch.cover_row, q, b,
                                                      nullptr);
      }
    ssq[k] = q.total();
    bad[k] = b ? 1 : 0;
  }
  if constexpr (kFold) {  // the interleaved sums back to the partial sums
    const acc* from = sum;
    for (int64_t n = it.n0; n < it.n1; ++n) {
      const Tensor3& t = plan.t()[n];
      if (!interleaved<wt>(t, true, K)) continue;
      int64_t r0, r1;
      item_rows(it, n, t, r0, r1);
      acc* to = tg.sums_out[n] + r0 * t.Cin * t.T;
      for (int64_t c = 0; c < (r1 - r0) * t.Cin; ++c, from += 2 * t.T, to += t.T)
        std::memcpy(to, from + t.T, sizeof(acc) * t.T);
    }
    return;
  }
  int64_t sum_off = 0, cov_off = 0, den_off = 0;
  for (int64_t n = it.n0; n < it.n1; ++n) {
    const Tensor3& t = plan.t()[n];
    int64_t r0, r1;
    item_rows(it, n, t, r0, r1);
    const int64_t re = t.Cin * t.T;
    const bool inter = interleaved<wt>(t, false, K);
    for (int64_t r = r0; r < r1; ++r) {
      if (inter)
        write_row_inter<wt, kOverlap>(tg.out[n] + r * re, sum + sum_off + (r - r0) * t.Cin * 2 * t.T,
                                      kOverlap ? den + den_off + (r - r0) * t.Cin : nullptr,
                                      cov + cov_off + (r - r0) * t.words, t.Cin, t.T);
      else
        write_row<wt, kOverlap>(tg.out[n] + r * re, tg.W[n] + r * re, sum + sum_off + (r - r0) * re,
                                kOverlap ? den + den_off + (r - r0) * t.Cin : nullptr,
                                cov + cov_off + (r - r0) * t.words, t.Cin, t.T);
    }
    sum_off += scratch_elems<wt>(t, r1 - r0, false, K);
    cov_off += (r1 - r0) * t.words;
    den_off += (r1 - r0) * t.Cin;
  }
}

// Items [i0, i1); item it writes its statistics at row `it` of ssq / bad ((items, K)). kIsa:
// the ISA variant it is compiled for (0 baseline, 1 AVX2; client_row_at).
template <typename wt, typename ct, bool kOverlap, bool kFold, int kIsa>
void run_items(const Plan<ct>& plan, const Targets<wt>& tg, const std::vector<Item>& items,
               const std::vector<acc_t<wt>>& p, double* ssq, uint8_t* bad, int64_t i0, int64_t i1) {
  Scratch<acc_t<wt>> scratch;
  const int64_t K = plan.K;
  for (int64_t i = i0; i < i1; ++i)
    run_item<wt, ct, kOverlap, kFold, kIsa>(plan, tg, items[i], p, scratch, ssq + i * K, bad + i * K);
}

// finish_partials on the (row, column) pairs [q0, q1) of one tensor with T taps: where the
// cover weight C[q] > 0, reconstruct W + S / wsum, overlap S / C[q] (accumulation dtype,
// then rounded to wt); elsewhere W. Runs of pairs with the same side are found first, so a
// covered stretch is one vectorisable loop (the same division and addition per element).
template <typename wt>
void finish_pairs(const wt* __restrict__ W, const acc_t<wt>* __restrict__ S, const acc_t<wt>* __restrict__ C,
                  wt* __restrict__ O, int64_t T, int64_t q0, int64_t q1, acc_t<wt> wsum, bool overlap) {
  using acc = acc_t<wt>;
  for (int64_t q = q0; q < q1;) {
    const bool on = C[q] > acc(0);
    int64_t e = q + 1;
    while (e < q1 && (C[e] > acc(0)) == on) ++e;
    const int64_t a = q * T, b = e * T;
    if (!on) {
      std::memcpy(O + a, W + a, sizeof(wt) * (b - a));
    } else if (overlap) {
      for (int64_t p = q; p < e; ++p)
        for (int64_t t = 0; t < T; ++t) O[p * T + t] = static_cast<wt>(S[p * T + t] / C[p]);
    } else {
      int64_t i = a;
      if constexpr (std::is_same_v<wt, float>) {
        const engine::f32x8 d = {wsum, wsum, wsum, wsum, wsum, wsum, wsum, wsum};
        for (; i + 8 <= b; i += 8) engine::store8(O + i, engine::load8(S + i) / d + engine::load8(W + i));
      }
      for (; i < b; ++i) O[i] = static_cast<wt>(S[i] / wsum + static_cast<acc>(W[i]));
    }
    q = e;
  }
}

// The plan of checked tables (check_layout): per-client lists built in parallel over clients.
inline LayoutPlan build_plan(const LayoutTables& lt) {
  LayoutPlan plan;
  const int64_t N = lt.N, K = lt.K;
  plan.N = N, plan.K = K;
  plan.meta.assign(lt.meta, lt.meta + 5 * N);
  plan.counts.assign(lt.counts, lt.counts + 2 * K * N);
  plan.offsets.assign(lt.offsets, lt.offsets + K * N);
  plan.t.resize(N);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t* m = lt.meta + 5 * n;
    plan.t[n] = {m[0], m[1], m[2], (m[1] + 63) / 64};
  }
  plan.seg.resize(K * N);
  plan.lists.resize(K);
  torch::stable::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) plan_client(plan, lt, k);
  });
  for (int64_t n = 0; n < N; ++n) {
    Tensor3& t = plan.t[n];
    int64_t cols = 0, runs = 0;
    for (int64_t k = 0; k < K; ++k) {
      const SegT& s = plan.seg[k * N + n];
      if (s.nrows > 0) cols += s.cc, runs += s.nruns;
    }
    t.inter = t.T > 1 && t.Cin >= kInterleave && runs > 0 && cols < kLongRun * runs;
  }
  plan.items = plan_items(plan.t);
  return plan;
}

// The plan of some of a planned layout's clients (client j of the subset is client idx[j]
// of the parent; each idx in [0, parent.K)): their lists shared, their sizes and offsets
// copied, no table read again.
inline LayoutPlan subset_plan(const LayoutPlan& parent, const int64_t* idx, int64_t K) {
  LayoutPlan plan;
  const int64_t N = parent.N;
  plan.N = N, plan.K = K;
  plan.meta = parent.meta;
  plan.t = parent.t;
  plan.items = parent.items;
  plan.counts.resize(2 * K * N), plan.offsets.resize(K * N), plan.seg.resize(K * N);
  plan.lists.resize(K);
  for (int64_t j = 0; j < K; ++j) {
    const int64_t k = idx[j];
    std::copy_n(parent.counts.begin() + 2 * k * N, 2 * N, plan.counts.begin() + 2 * j * N);
    std::copy_n(parent.offsets.begin() + k * N, N, plan.offsets.begin() + j * N);
    std::copy_n(parent.seg.begin() + k * N, N, plan.seg.begin() + j * N);
    plan.lists[j] = parent.lists[k];
  }
  return plan;
}

}  // namespace packed
}  // namespace cahfp
