// Shared helpers for the cahfp CPU kernels.
//
// Written against PyTorch's LibTorch stable ABI only (torch/csrc/stable and
// torch/headeronly): no ATen or c10 symbol is referenced, so one compiled library
// loads into every torch release from the targeted one on (TORCH_TARGET_VERSION,
// set by the build to 2.10). Errors are STD_TORCH_CHECK (std::runtime_error, which
// torch turns into a Python RuntimeError).
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/Dispatch.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include <atomic>
#include <cstdint>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace cahfp {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// Dispatch over the floating dtypes the ops accept: the body (a lambda, given as the
// variadic tail so that its commas need no wrapping) sees `scalar_t`. The header-only
// THO_DISPATCH_SWITCH / THO_DISPATCH_CASE, i.e. what THO_DISPATCH_V2 expands to.
#define CAHFP_DISPATCH_FLOATING(TYPE, NAME, ...)                                  \
  THO_DISPATCH_SWITCH(TYPE, NAME,                                                 \
                      THO_DISPATCH_CASE(torch::headeronly::ScalarType::Double, __VA_ARGS__) \
                      THO_DISPATCH_CASE(torch::headeronly::ScalarType::Float, __VA_ARGS__)  \
                      THO_DISPATCH_CASE(torch::headeronly::ScalarType::Half, __VA_ARGS__)   \
                      THO_DISPATCH_CASE(torch::headeronly::ScalarType::BFloat16, __VA_ARGS__))

// Typed data pointers through the untyped stable accessors (every dtype, no template
// instantiation needed in libtorch).
template <typename T>
inline const T* cdata(const Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}
template <typename T>
inline T* mdata(const Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}

inline std::string shape_str(const Tensor& t) {
  std::ostringstream s;
  s << "[";
  for (int64_t d = 0; d < t.dim(); ++d) s << (d ? ", " : "") << t.size(d);
  s << "]";
  return s.str();
}

inline const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "float32";
    case ScalarType::Double: return "float64";
    case ScalarType::Half: return "float16";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Long: return "int64";
    case ScalarType::Bool: return "bool";
    default: return "another dtype";
  }
}

inline bool is_floating(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::Half || t == ScalarType::BFloat16;
}

// Debug switch (tests): fill every new output with garbage before the kernel
// writes it, so an element the kernel forgets to write shows up.
inline std::atomic<bool>& poison_outputs() {
  static std::atomic<bool> flag{false};
  return flag;
}

// Allocate a CPU kernel output (poisoned when the debug switch is on).
inline Tensor new_output(std::vector<int64_t> sizes, ScalarType dtype) {
  Tensor t = torch::stable::empty(sizes, dtype, std::nullopt,
                                  torch::stable::Device(torch::headeronly::DeviceType::CPU));
  if (poison_outputs().load(std::memory_order_relaxed) && t.numel() > 0) {
    if (is_floating(dtype))
      torch::stable::fill_(t, std::numeric_limits<double>::quiet_NaN());
    else if (dtype == ScalarType::Bool)
      torch::stable::fill_(t, 1.0);
    else
      torch::stable::fill_(t, -7777.0);
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
inline std::vector<int64_t> keep_counts(const Tensor& keep) {
  const int64_t K = keep.size(0), m = keep.size(1);
  const int64_t* p = cdata<int64_t>(keep);
  std::vector<int64_t> counts(K);
  for (int64_t k = 0; k < K; ++k) counts[k] = keep_count(p + k * m, m);
  return counts;
}

// Inverse index map of a padded (K, m) keep set over `size` channels:
// inv[k * size + c] = position of channel c in client k's keep set, or -1.
// Checks every index against [0, size) so that kernels stay memory-safe even
// when Python-side validation is switched off.
inline std::vector<int32_t> inverse_maps(const Tensor& keep, int64_t size, const char* name) {
  const int64_t K = keep.size(0), m = keep.size(1);
  const int64_t* p = cdata<int64_t>(keep);
  std::vector<int32_t> inv(static_cast<size_t>(K * size), -1);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t n = keep_count(p + k * m, m);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t c = p[k * m + i];
      STD_TORCH_CHECK(c < size, name, "[", k, "] holds index ", c, " outside [0, ", size, ")");
      inv[k * size + c] = static_cast<int32_t>(i);
    }
  }
  return inv;
}

inline void check_keep_tensor(const Tensor& keep, int64_t K, const char* name) {
  STD_TORCH_CHECK(keep.dim() == 2 && keep.size(0) == K, name, " must be a (K, m) tensor with K = ", K);
  STD_TORCH_CHECK(keep.scalar_type() == ScalarType::Long, name, " must be int64");
  STD_TORCH_CHECK(keep.is_contiguous(), name, " must be contiguous");
  STD_TORCH_CHECK(keep.is_cpu(), name, " must be on the CPU");
}

}  // namespace cahfp
