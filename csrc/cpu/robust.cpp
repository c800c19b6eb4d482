// The robust reducers on the CPU (weighted median, trimmed mean).
#include "robust.h"

#include "aggregate.h"

#include <vector>

namespace cahfp {

using namespace detail;

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
