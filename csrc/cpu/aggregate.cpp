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
#include "aggregate.h"

namespace cahfp {

using namespace detail;

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

}  // namespace cahfp
