// Shared helpers for the cahfp CPU kernels.
//
// Lean headers only (no torch/extension.h): the extension registers operators
// through torch/library.h and is loaded with torch.ops.load_library, so it needs
// neither pybind11 nor the full ATen operator set.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/fill.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdint>
#include <limits>
#include <vector>

namespace cahfp {

// Debug switch (tests): fill every new output with garbage before the kernel
// writes it, so an element the kernel forgets to write shows up.
inline std::atomic<bool>& poison_outputs() {
  static std::atomic<bool> flag{false};
  return flag;
}

// Allocate a kernel output (poisoned when the debug switch is on).
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (poison_outputs().load(std::memory_order_relaxed)) {
    if (at::isFloatingType(t.scalar_type()))
      t.fill_(std::numeric_limits<double>::quiet_NaN());
    else if (t.scalar_type() == at::kBool)
      t.fill_(true);
    else
      t.fill_(-7777);
  }
  return t;
}

// Accumulation type: float32 for every storage dtype except float64.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

// Number of leading entries of a -1-padded keep-set row (entries end at the first -1).
inline int64_t keep_count(const int64_t* row, int64_t width) {
  int64_t n = 0;
  while (n < width && row[n] >= 0) ++n;
  return n;
}

// Per-client kept counts of a padded (K, m) int64 keep-set tensor.
inline std::vector<int64_t> keep_counts(const at::Tensor& keep) {
  const int64_t K = keep.size(0), m = keep.size(1);
  const int64_t* p = keep.const_data_ptr<int64_t>();
  std::vector<int64_t> counts(K);
  for (int64_t k = 0; k < K; ++k) counts[k] = keep_count(p + k * m, m);
  return counts;
}

// Inverse index map of a padded (K, m) keep set over `size` channels:
// inv[k * size + c] = position of channel c in client k's keep set, or -1.
// Checks every index against [0, size) so that kernels stay memory-safe even
// when Python-side validation is switched off.
inline std::vector<int32_t> inverse_maps(const at::Tensor& keep, int64_t size, const char* name) {
  const int64_t K = keep.size(0), m = keep.size(1);
  const int64_t* p = keep.const_data_ptr<int64_t>();
  std::vector<int32_t> inv(static_cast<size_t>(K * size), -1);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t n = keep_count(p + k * m, m);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t c = p[k * m + i];
      TORCH_CHECK(c < size, name, "[", k, "] holds index ", c, " outside [0, ", size, ")");
      inv[k * size + c] = static_cast<int32_t>(i);
    }
  }
  return inv;
}

inline void check_keep_tensor(const at::Tensor& keep, int64_t K, const char* name) {
  TORCH_CHECK(keep.dim() == 2 && keep.size(0) == K, name, " must be a (K, m) tensor with K = ", K);
  TORCH_CHECK(keep.scalar_type() == at::kLong, name, " must be int64");
  TORCH_CHECK(keep.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(keep.device().is_cpu(), name, " must be on the CPU");
}

}  // namespace cahfp
