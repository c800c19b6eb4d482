// The per-round layout's index tables, checked once for every kernel that reads them
// (slice_packed, aggregate_packed, accumulate_packed).
#pragma once

#include "common.h"

namespace cahfp {

// The per-round layout's tables (cahfp_ops/layout.py), checked so that no kernel reads
// or writes out of bounds whatever they hold:
//   meta (N, 5) int64: R, Cin, T, row offset, column offset of tensor n's (R, Cin, T) view;
//   row_inv (K, SR) int32: client k keeps row r of tensor n at compact row
//       row_inv[k, row offset + r] (or -1);
//   col_keep (K, SC) int32: client k's kept columns of tensor n at [column offset, + kept);
//   counts (K, N, 2) int64: kept rows and columns; offsets (K, N) int64: element offset of
//       client k's tensor n in its buffer (slicing: in the one output buffer).
// a * b * c for non-negative factors, or -1 where the product overflows int64.
inline int64_t checked_product(int64_t a, int64_t b, int64_t c) {
  int64_t ab = 0, abc = 0;
  if (a < 0 || b < 0 || c < 0 || __builtin_mul_overflow(a, b, &ab) || __builtin_mul_overflow(ab, c, &abc)) return -1;
  return abc;
}

// Whether [off, off + len) lies inside [0, size), without overflow whatever off and len hold.
inline bool range_inside(int64_t off, int64_t len, int64_t size) {
  return off >= 0 && len >= 0 && len <= size && off <= size - len;
}

struct LayoutTables {
  int64_t N, K, SR, SC;
  const int64_t* meta;
  const int32_t* row_inv;
  const int32_t* col_keep;
  const int64_t* counts;
  const int64_t* offsets;
};

inline LayoutTables check_layout(int64_t N, const Tensor& meta, const Tensor& row_inv, const Tensor& col_keep,
                                 const Tensor& counts, const Tensor& offsets) {
  STD_TORCH_CHECK(meta.is_cpu() && meta.scalar_type() == ScalarType::Long && meta.dim() == 2 && meta.size(0) == N &&
                      meta.size(1) == 5 && meta.is_contiguous(),
                  "layout meta must be a contiguous (N, 5) int64 CPU tensor with N = ", N);
  STD_TORCH_CHECK(row_inv.is_cpu() && row_inv.scalar_type() == ScalarType::Int && row_inv.dim() == 2 &&
                      row_inv.is_contiguous(),
                  "layout row_inv must be a contiguous (K, SR) int32 CPU tensor");
  const int64_t K = row_inv.size(0);
  STD_TORCH_CHECK(col_keep.is_cpu() && col_keep.scalar_type() == ScalarType::Int && col_keep.dim() == 2 &&
                      col_keep.size(0) == K && col_keep.is_contiguous(),
                  "layout col_keep must be a contiguous (K, SC) int32 CPU tensor");
  STD_TORCH_CHECK(counts.is_cpu() && counts.scalar_type() == ScalarType::Long && counts.dim() == 3 &&
                      counts.size(0) == K && counts.size(1) == N && counts.size(2) == 2 && counts.is_contiguous(),
                  "layout counts must be a contiguous (K, N, 2) int64 CPU tensor");
  STD_TORCH_CHECK(offsets.is_cpu() && offsets.scalar_type() == ScalarType::Long && offsets.dim() == 2 &&
                      offsets.size(0) == K && offsets.size(1) == N && offsets.is_contiguous(),
                  "layout offsets must be a contiguous (K, N) int64 CPU tensor");
  LayoutTables lt{N, K, row_inv.size(1), col_keep.size(1), cdata<int64_t>(meta), cdata<int32_t>(row_inv),
                  cdata<int32_t>(col_keep), cdata<int64_t>(counts), cdata<int64_t>(offsets)};
  for (int64_t n = 0; n < N; ++n) {
    const int64_t* m = lt.meta + 5 * n;
    // Every sum and product checked without overflow: a table may hold anything.
    STD_TORCH_CHECK(range_inside(m[3], m[0], lt.SR) && range_inside(m[4], m[1], lt.SC) &&
                        checked_product(m[0], m[1], m[2]) >= 0,
                    "layout meta row ", n, " is out of range");
    for (int64_t k = 0; k < K; ++k) {
      const int64_t rc = lt.counts[2 * (k * N + n)], cc = lt.counts[2 * (k * N + n) + 1];
      STD_TORCH_CHECK(rc >= 0 && rc <= m[0] && cc >= 0 && cc <= m[1] && lt.offsets[k * N + n] >= 0,
                      "layout counts of client ", k, ", tensor ", n, " are out of range");
      // Branch-free over each run (the compiler vectorises it), one check per run: a
      // round's tables hold K x (SR + SC) entries.
      const int32_t* inv = lt.row_inv + k * lt.SR + m[3];
      const int64_t rlim = rc;
      int bad_rows = 0;
      for (int64_t r = 0; r < m[0]; ++r) bad_rows |= (inv[r] < -1) | (inv[r] >= rlim);
      STD_TORCH_CHECK(!bad_rows, "layout row_inv of client ", k, ", tensor ", n, " is out of range");
      const int32_t* ck = lt.col_keep + k * lt.SC + m[4];
      const int64_t clim = m[1];
      int bad_cols = 0;
      for (int64_t j = 0; j < cc; ++j) bad_cols |= (ck[j] < 0) | (ck[j] >= clim);
      STD_TORCH_CHECK(!bad_cols, "layout col_keep of client ", k, ", tensor ", n, " is out of range");
    }
  }
  return lt;
}

}  // namespace cahfp
