// The slicing family: slice_channels and its whole-model form, and the copy engine the
// packed family's slice_packed runs on the layout's tables.
#pragma once

#include "common.h"

#include <cstdint>
#include <vector>

namespace cahfp {

Tensor slice_channels_cpu(Tensor weight, Tensor rows, Tensor cols, int64_t total);
// weights[n]: N-D, one dtype. rows[n] / cols[n]: (K, m) int64, -1 padded (cols of a
// 1-D weight: (K, 1) zeros). Returns one packed buffer, client-major: client 0's
// compact tensors 0..N-1, then client 1's, ...; `total` is its element count (checked).
Tensor slice_channels_many_cpu(std::vector<Tensor> weights, std::vector<Tensor> rows, std::vector<Tensor> cols,
                               int64_t total);

namespace detail {

// One weight's slicing: client k keeps row r at compact row inv_rows[k * inv_stride + r]
// (or -1) and columns cols[k * col_stride + j], j < cc[k]; its compact tensor starts at
// dst[k * dst_stride] in the output.
struct Part {
  const void* w = nullptr;
  int64_t R = 0, Cin = 0, T = 0;
  const int32_t* inv_rows = nullptr;
  int64_t inv_stride = 0;
  const int32_t* cols = nullptr;
  int64_t col_stride = 0;
  const int64_t* cc = nullptr;
  int64_t cc_stride = 1;
  const int64_t* dst = nullptr;
  int64_t dst_stride = 1;
  int64_t chunk = 1;
};

// Copies every part's kept rows into every client that keeps them, in one parallel loop
// over chunks of rows of all parts (out: the destination buffer the parts' dst index).
void run_parts(std::vector<Part>& parts, int64_t K, Tensor& out);

}  // namespace detail
}  // namespace cahfp
