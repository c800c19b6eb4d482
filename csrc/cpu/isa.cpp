// CPU feature detection and the variant cap (see isa.h).
#include "isa.h"

#include <algorithm>
#include <atomic>

namespace cahfp {
namespace {

int64_t detect() {
#if defined(CAHFP_X86_DISPATCH)
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the wider registers (XGETBV).
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return kAvx2;
#endif
  return kBaseline;
}

std::atomic<int64_t>& cap() {
  static std::atomic<int64_t> value{-1};
  return value;
}

}  // namespace

int64_t detected_isa() {
  static const int64_t level = detect();
  return level;
}

int64_t active_isa() {
  const int64_t c = cap().load(std::memory_order_relaxed);
  return c < 0 ? detected_isa() : std::min(c, detected_isa());
}

int64_t set_isa(int64_t level) {
  cap().store(level < 0 ? -1 : level);
  return active_isa();
}

}  // namespace cahfp
