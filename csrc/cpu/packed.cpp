// The per-round layout family on the CPU: slice_packed (the slicing engine of slice.h on
// the layout's tables), aggregate_packed, fold_packed, accumulate_packed and
// finish_partials (the per-round engine of packed_engine.h on the layout's tables).
#include "packed.h"

#include "aggregate.h"
#include "packed_engine.h"
#include "slice.h"

#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>

namespace cahfp {

using namespace detail;

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

// Whether `sizes` is exactly the compact shape of a client's tensor of the weight shaped `w`:
// (cc) for a 1-D weight, else (rc, cc, *w[2:]). (The layout functions hand a tensor whose
// columns are a later dim to the kernels as its (R, Cin, T) view, so the columns are dim 1.)
template <typename Sizes>
bool compact_shape_ok(const Sizes& sizes, const std::vector<int64_t>& w, int64_t rc, int64_t cc) {
  const size_t dim = w.size();
  if (sizes.size() != dim) return false;
  if (dim == 1) return sizes[0] == cc;
  bool ok = sizes[0] == rc && sizes[1] == cc;
  for (size_t d = 2; d < dim && ok; ++d) ok = sizes[d] == w[d];
  return ok;
}

// Client k's tensor n sent on its own: checked (a CPU tensor of the clients' dtype, exactly
// its compact shape: a caller may leave the shape checks to the kernel, as
// reconstruct_aggregate_many does) and viewed as (rc, cc, T); made contiguous (into c) where
// its runs of columns are not dense.
template <typename ct>
ClientView<ct> separate_compact_view(Tensor& c, ScalarType cdtype, const std::vector<int64_t>& w, const int64_t* m,
                                     int64_t rc, int64_t cc, int64_t n, int64_t k) {
  STD_TORCH_CHECK(c.is_cpu() && c.scalar_type() == cdtype, "clients[", k, "] tensor ", n,
                  " must be a CPU tensor of dtype ", dtype_name(cdtype));
  STD_TORCH_CHECK(compact_shape_ok(c.sizes(), w, rc, cc), "clients[", k, "] tensor ", n, " has shape ",
                  shape_str(c), ", not its compact shape (", rc, " rows, ", cc, " cols)");
  const View3 v{m[0], m[1], m[2], w.size() == 1};
  ClientView<ct> cv = separate_view<ct>(c, cdtype, v, rc, cc, n, k);
  if (cv.stride1 != m[2] && cv.cols > 1) {  // the engine reads runs of columns: make them dense
    c = torch::stable::contiguous(c);
    cv = separate_view<ct>(c, cdtype, v, rc, cc, n, k);
  }
  return cv;
}

// A packed buffer must be a 1-D contiguous CPU tensor of the clients' dtype.
void check_buffer(const Tensor& b, ScalarType cdtype, int64_t k) {
  STD_TORCH_CHECK(b.is_cpu() && b.scalar_type() == cdtype && b.dim() == 1 && b.is_contiguous(), "the buffer of client ",
                  k, " must be a 1-D contiguous CPU tensor of dtype ", dtype_name(cdtype));
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

// The tables a layout plan keeps (sizes and offsets; no index lists).
LayoutTables plan_tables(const packed::LayoutPlan& lp) {
  return {lp.N, lp.K, 0, 0, lp.meta.data(), nullptr, nullptr, lp.counts.data(), lp.offsets.data()};
}

// one_client: the op folds one client (accumulate_packed), its name for the message.
// kept: the layout's plan, whose tables were checked when it was made (the call's tables are
// then not read); null: the call's tables are checked.
PackedCall packed_call(const std::vector<Tensor>& weights, const std::vector<Tensor>& clients,
                       const std::vector<int64_t>& parts, const Tensor& meta, const Tensor& row_inv,
                       const Tensor& col_keep, const Tensor& counts, const Tensor& offsets, const std::string& mode,
                       const char* one_client = nullptr, const packed::LayoutPlan* kept = nullptr) {
  const int64_t N = static_cast<int64_t>(weights.size());
  STD_TORCH_CHECK(N > 0, "weights must not be empty");
  if (kept) STD_TORCH_CHECK(kept->N == N, "the layout plan is for ", kept->N, " tensors, not ", N);
  PackedCall pc{kept ? plan_tables(*kept) : check_layout(N, meta, row_inv, col_keep, counts, offsets), {}, parts,
                mode == "overlap", weights[0].scalar_type(), ScalarType::Float, ScalarType::Float, {}};
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

namespace {

#define CAHFP_FP_HEAD template <typename wt>
#define CAHFP_FP_ARGS <wt>
CAHFP_ISA_VARIANTS_UPTO_AVX2(CAHFP_FP_HEAD, CAHFP_FP_ARGS, finish_pairs_isa, (packed::finish_pairs<wt>),
                             (const wt* W, const acc_t<wt>* S, const acc_t<wt>* C, wt* O, int64_t T, int64_t q0,
                              int64_t q1, acc_t<wt> wsum, bool overlap),
                             (W, S, C, O, T, q0, q1, wsum, overlap))
#undef CAHFP_FP_HEAD
#undef CAHFP_FP_ARGS

// The engine's ISA variants by hand (the row loop inside is compiled out of line per variant:
// packed::client_row_at takes the variant as a template argument).
#define CAHFP_PK_PARAMS                                                                                     \
  (const packed::Plan<ct>& plan, const packed::Targets<wt>& tg, const std::vector<packed::Item>& items, \
   const std::vector<acc_t<wt>>& p, double* ssq, uint8_t* bad, int64_t i0, int64_t i1)
template <typename wt, typename ct, bool kOverlap, bool kFold>
CAHFP_ATTR_BASELINE void packed_items_baseline CAHFP_PK_PARAMS {
  packed::run_items<wt, ct, kOverlap, kFold, 0>(plan, tg, items, p, ssq, bad, i0, i1);
}
#if defined(CAHFP_X86_DISPATCH)
template <typename wt, typename ct, bool kOverlap, bool kFold>
CAHFP_ATTR_AVX2 void packed_items_avx2 CAHFP_PK_PARAMS {
  packed::run_items<wt, ct, kOverlap, kFold, 1>(plan, tg, items, p, ssq, bad, i0, i1);
}
#endif
#undef CAHFP_PK_PARAMS
template <typename wt, typename ct, bool kOverlap, bool kFold>
auto packed_items_isa_pick() {
#if defined(CAHFP_X86_DISPATCH)
  if (active_isa() >= kAvx2) return &packed_items_avx2<wt, ct, kOverlap, kFold>;
#endif
  return &packed_items_baseline<wt, ct, kOverlap, kFold>;
}

// Layout plans kept for the layouts that asked for one (plan_layout), by id.
std::mutex plans_mutex;
std::unordered_map<int64_t, std::shared_ptr<const packed::LayoutPlan>> plans;
int64_t next_plan = 1;

std::shared_ptr<const packed::LayoutPlan> find_plan(int64_t id) {
  std::lock_guard<std::mutex> lock(plans_mutex);
  auto hit = plans.find(id);
  STD_TORCH_CHECK(hit != plans.end(), "no layout plan ", id, " (released, or never made)");
  return hit->second;
}

// The call's layout plan: the one kept under `id` (>= 0), else one built from the call's
// tables (checked in packed_call).
std::shared_ptr<const packed::LayoutPlan> call_plan(const PackedCall& pc,
                                                    std::shared_ptr<const packed::LayoutPlan> kept) {
  return kept ? kept : std::make_shared<const packed::LayoutPlan>(packed::build_plan(pc.lt));
}

// aggregate_packed / fold_packed on the per-round engine (packed_engine.h): the clients'
// views on the layout plan, then every work item; the (K, 2) statistics are reduced in
// item order.
template <typename wt, typename ct>
void run_packed(const PackedCall& pc, std::vector<Tensor>& clients, const std::vector<acc_t<wt>>& p,
                const packed::Targets<wt>& tg, bool fold, double* stats, const packed::LayoutPlan& lp) {
  const int64_t N = lp.N, K = lp.K;
  const LayoutTables lt = plan_tables(lp);
  packed::Plan<ct> plan;
  plan.lp = &lp;
  plan.N = N, plan.K = K;
  plan.views.resize(K * N);
  for (int64_t n = 0; n < N; ++n)
    STD_TORCH_CHECK(pc.ws[n].numel() == checked_product(lp.meta[5 * n], lp.meta[5 * n + 1], lp.meta[5 * n + 2]),
                    "weights[", n, "] has ", pc.ws[n].numel(), " elements but the layout says ", lp.meta[5 * n],
                    " x ", lp.meta[5 * n + 1], " x ", lp.meta[5 * n + 2]);
  std::vector<std::vector<int64_t>> wshape(N);  // the weights' shapes, for the exact client shapes
  for (int64_t n = 0; n < N; ++n) {
    const auto s = pc.ws[n].sizes();
    wshape[n].assign(s.begin(), s.end());
  }
  // The clients' views, built in parallel: each separate tensor's metadata costs a few cache
  // misses (a ResNet-56 round sends 27,700 tensors). The first error in client order is raised.
  std::vector<std::string> errors(K);
  torch::stable::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) try {
        for (int64_t n = 0; n < N; ++n) {
          const int64_t* m = lt.meta + 5 * n;
          const int64_t rc = lt.counts[2 * (k * N + n)], cc = lt.counts[2 * (k * N + n) + 1];
          if (pc.parts[k] == 0) {
            plan.views[k * N + n] = packed_view<ct>(clients[pc.start[k]], lt, m, n, k);
            continue;
          }
          plan.views[k * N + n] =
              separate_compact_view<ct>(clients[pc.start[k] + n], pc.cdtype, wshape[n], m, rc, cc, n, k);
        }
      } catch (const std::exception& e) {
        errors[k] = e.what();
      }
  });
  for (const std::string& e : errors)
    if (!e.empty()) throw std::runtime_error(e);
  const std::vector<packed::Item>& items = lp.items;
  const int64_t n_items = static_cast<int64_t>(items.size());
  std::vector<double> ssq(n_items * K, 0.0);
  std::vector<uint8_t> bad(n_items * K, 0);
  const auto run = pc.overlap ? (fold ? packed_items_isa_pick<wt, ct, true, true>()
                                      : packed_items_isa_pick<wt, ct, true, false>())
                              : (fold ? packed_items_isa_pick<wt, ct, false, true>()
                                      : packed_items_isa_pick<wt, ct, false, false>());
  torch::stable::parallel_for(0, n_items, 1, [&](int64_t i0, int64_t i1) {
    run(plan, tg, items, p, ssq.data(), bad.data(), i0, i1);
  });
  reduce_item_stats<acc_t<wt>>(ssq, bad, n_items, K, stats);
}

}  // namespace

// Whole-model aggregation on the per-round layout. clients: per client k, one packed
// buffer (parts[k] == 0: 1-D, its tensors at offsets[k]) or its N tensors (parts[k] == N).
// Writes the N results, packed in order, into `out` (1-D, weights' dtype) and the reply
// statistics into `stats` ((K, 2) float64: non-finite flag, sum of squared deltas over
// the client's kept elements), computed in the same pass.
void aggregate_packed_cpu(std::vector<Tensor> weights, std::vector<Tensor> clients, std::vector<int64_t> parts,
                          Tensor meta, Tensor row_inv, Tensor col_keep, Tensor counts, Tensor offsets, Tensor coef,
                          std::string mode, Tensor out, Tensor stats, int64_t plan) {
  const auto kept = plan >= 0 ? find_plan(plan) : nullptr;
  const PackedCall pc =
      packed_call(weights, clients, parts, meta, row_inv, col_keep, counts, offsets, mode, nullptr, kept.get());
  const auto lp = call_plan(pc, kept);
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
      packed::Targets<wt> tg;
      int64_t offset = 0;
      for (int64_t n = 0; n < N; ++n) {
        tg.W.push_back(cdata<wt>(pc.ws[n]));
        tg.out.push_back(mdata<wt>(out) + offset);
        offset += pc.ws[n].numel();
      }
      run_packed<wt, ct>(pc, clients, p, tg, false, mdata<double>(stats), *lp);
    });
  });
}

// Streaming, several clients per call: folds the K clients of the layout, in order 0..K-1,
// into running partial sums read from sums_in / cover_in and written to sums_out / cover_out
// (in place when they are the same tensors; from zeros when sums_in and cover_in are both
// empty, which neither zeroes a buffer nor reads one back), with the reply statistics of every client
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
                     Tensor stats, int64_t plan) {
  const auto kept = plan >= 0 ? find_plan(plan) : nullptr;
  const PackedCall pc =
      packed_call(weights, clients, parts, meta, row_inv, col_keep, counts, offsets, mode, nullptr, kept.get());
  const auto lp = call_plan(pc, kept);
  check_coef_stats(coef, stats, pc.lt.K);
  const bool from_zero = sums_in.numel() == 0 && cover_in.numel() == 0 && pc.total + pc.total_cover > 0;
  if (!from_zero) {
    check_flat(sums_in, "sums_in", pc.adtype, pc.total);
    check_flat(cover_in, "cover_in", pc.adtype, pc.total_cover);
  }
  check_flat(sums_out, "sums_out", pc.adtype, pc.total);
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
      packed::Targets<wt> tg;
      int64_t off = 0, coff = 0;
      for (int64_t n = 0; n < N; ++n) {
        tg.W.push_back(cdata<wt>(pc.ws[n]));
        tg.sums_in.push_back(from_zero ? nullptr : cdata<acc>(sums_in) + off);
        tg.sums_out.push_back(mdata<acc>(sums_out) + off);
        tg.cover_in.push_back(from_zero ? nullptr : cdata<acc>(cover_in) + coff);
        tg.cover_out.push_back(mdata<acc>(cover_out) + coff);
        off += pc.ws[n].numel();
        coff += pc.lt.meta[5 * n] * pc.lt.meta[5 * n + 1];
      }
      run_packed<wt, ct>(pc, clients, p, tg, true, mdata<double>(stats), *lp);
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
    const auto finish = finish_pairs_isa_pick<wt>();
    torch::stable::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
      for (int64_t it = i0; it < i1; ++it) {
        const int64_t n = items[it].first, r0 = items[it].second;
        const View3& v = views[n];
        const int64_t r1 = std::min(v.R, r0 + rows_per[n]);
        const wt* W = cdata<wt>(ws[n]);
        const acc* S = cdata<acc>(sums) + off[n];
        const acc* C = cdata<acc>(cover) + coff[n];
        wt* O = mdata<wt>(out) + off[n];
        finish(W, S, C, O, v.T, r0 * v.Cin, r1 * v.Cin, wsum, overlap);
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
  const auto lp = call_plan(pc, nullptr);
  CAHFP_DISPATCH_FLOATING(pc.wdtype, "accumulate_packed", [&] {
    using wt = scalar_t;
    using acc = acc_t<wt>;
    CAHFP_DISPATCH_FLOATING(pc.cdtype, "accumulate_packed_client", [&] {
      using ct = scalar_t;
      // fold_packed's engine on the one client, so that its statistics and sums are those of
      // the same client folded in a window, bit for bit: first with coefficient 0 (the
      // statistics alone), then, when accepted, with its weight.
      packed::Targets<wt> tg;
      int64_t off = 0, coff = 0;
      for (int64_t n = 0; n < N; ++n) {
        tg.W.push_back(cdata<wt>(pc.ws[n]));
        tg.sums_in.push_back(mdata<acc>(sums) + off);
        tg.sums_out.push_back(mdata<acc>(sums) + off);
        tg.cover_in.push_back(mdata<acc>(cover) + coff);
        tg.cover_out.push_back(mdata<acc>(cover) + coff);
        off += pc.ws[n].numel();
        coff += pc.lt.meta[5 * n] * pc.lt.meta[5 * n + 1];
      }
      double st[2] = {0.0, 0.0};
      run_packed<wt, ct>(pc, client, {acc(0)}, tg, true, st, *lp);
      const bool bad = st[0] != 0.0, accept = !bad && st[1] <= max_ssq;
      if (accept && weight > 0) {
        double ignored[2];
        run_packed<wt, ct>(pc, client, {static_cast<acc>(weight)}, tg, true, ignored, *lp);
      }
      mdata<double>(stats)[0] = bad ? 1.0 : 0.0;
      mdata<double>(stats)[1] = st[1];
      mdata<double>(stats)[2] = accept ? 1.0 : 0.0;
    });
  });
}

// Keep a plan under a new id (until release_layout_plan); returns the id.
int64_t keep_plan(packed::LayoutPlan&& plan) {
  auto kept = std::make_shared<const packed::LayoutPlan>(std::move(plan));
  std::lock_guard<std::mutex> lock(plans_mutex);
  const int64_t id = next_plan++;
  plans.emplace(id, std::move(kept));
  return id;
}

// A layout's plan for aggregate_packed / fold_packed, made once from its (checked) tables
// and kept until release_layout_plan; returns its id.
int64_t plan_layout_cpu(Tensor meta, Tensor row_inv, Tensor col_keep, Tensor counts, Tensor offsets) {
  STD_TORCH_CHECK(meta.dim() == 2, "layout meta must be a (N, 5) int64 tensor");
  const LayoutTables lt = check_layout(meta.size(0), meta, row_inv, col_keep, counts, offsets);
  return keep_plan(packed::build_plan(lt));
}

// The plan of clients `clients` (1-D int64, each in [0, K)) of the plan kept under `id`,
// kept under a new id (a window of a planned round shares its clients' lists).
int64_t plan_subset_cpu(Tensor /*device*/, int64_t id, Tensor clients) {
  STD_TORCH_CHECK(clients.dim() == 1 && clients.scalar_type() == ScalarType::Long && clients.is_cpu(),
                  "clients must be a 1-D int64 CPU tensor");
  const Tensor idx = torch::stable::contiguous(clients);
  auto parent = find_plan(id);
  const int64_t K = idx.numel();
  const int64_t* k = mdata<int64_t>(idx);
  for (int64_t j = 0; j < K; ++j)
    STD_TORCH_CHECK(k[j] >= 0 && k[j] < parent->K, "clients[", j, "] = ", k[j], " is not a client of plan ", id,
                    " (", parent->K, " clients)");
  return keep_plan(packed::subset_plan(*parent, k, K));
}

// Forget a layout plan (calls still running on it keep it alive until they end).
void release_layout_plan_cpu(Tensor /*device*/, int64_t id) {
  std::lock_guard<std::mutex> lock(plans_mutex);
  plans.erase(id);
}

// Whole-model slicing on the per-round layout (tables as in layout_tables.h, `starts` in
// the place of offsets):
// client k's tensor n goes to out[starts[k, n] : + kept rows * kept cols * T]
// (starts: (K, N) int64, absolute offsets into the 1-D out). Every range is checked
// against out's size, so a hand-made layout cannot write out of bounds.
void slice_packed_cpu(std::vector<Tensor> weights, Tensor meta, Tensor row_inv, Tensor col_keep, Tensor counts,
                      Tensor starts, Tensor out) {
  const int64_t N = static_cast<int64_t>(weights.size());
  STD_TORCH_CHECK(N > 0, "weights must not be empty");
  const LayoutTables lt = check_layout(N, meta, row_inv, col_keep, counts, starts);
  const int64_t K = lt.K;
  const auto dtype = weights[0].scalar_type();
  STD_TORCH_CHECK(is_floating(dtype), "weights must be floating");
  STD_TORCH_CHECK(out.is_cpu() && out.scalar_type() == dtype && out.dim() == 1 && out.is_contiguous(),
                  "out must be a contiguous 1-D CPU tensor of dtype ", dtype_name(dtype));
  std::vector<Tensor> ws(N);
  std::vector<Part> parts(N);
  for (int64_t n = 0; n < N; ++n) {
    STD_TORCH_CHECK(weights[n].is_cpu() && weights[n].scalar_type() == dtype && weights[n].dim() >= 1, "weights[",
                    n, "] must be a CPU tensor of dtype ", dtype_name(dtype));
    const int64_t* mn = lt.meta + 5 * n;
    ws[n] = torch::stable::contiguous(weights[n]);
    STD_TORCH_CHECK(ws[n].numel() == checked_product(mn[0], mn[1], mn[2]), "weights[", n, "] has ", ws[n].numel(),
                    " elements but the layout says ", mn[0], " x ", mn[1], " x ", mn[2]);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t* c = lt.counts + 2 * (k * N + n);  // c[0] <= mn[0], c[1] <= mn[1]: no overflow
      STD_TORCH_CHECK(range_inside(lt.offsets[k * N + n], c[0] * c[1] * mn[2], out.numel()),
                      "layout starts of client ", k, ", tensor ", n, " are out of range");
    }
    Part& part = parts[n];
    part.w = ws[n].const_data_ptr();
    part.R = mn[0];
    part.Cin = mn[1];
    part.T = mn[2];
    part.inv_rows = lt.row_inv + mn[3];
    part.inv_stride = lt.SR;
    part.cols = lt.col_keep + mn[4];
    part.col_stride = lt.SC;
    part.cc = lt.counts + 2 * n + 1;
    part.cc_stride = 2 * N;
    part.dst = lt.offsets + n;
    part.dst_stride = N;
  }
  if (out.numel() > 0) run_parts(parts, K, out);
}

}  // namespace cahfp
