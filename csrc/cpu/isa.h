// Runtime CPU dispatch: one library for baseline x86-64 that runs its hot loops
// with AVX2 or AVX-512 where the CPU has them.
//
// Each kernel's hot loop is a function template; CAHFP_ISA_VARIANTS defines three
// entry points around it: a baseline one, one compiled with
// __attribute__((target("avx2,fma,f16c"))) and one for AVX-512. Every variant is
// `flatten`ed, so the loop and all it calls are inlined into the variant and compiled
// for its instruction set, while out-of-line copies of shared helpers stay baseline
// (no AVX instruction can leak into code the baseline path calls). The library is
// built with -ffp-contract=off: no variant fuses a multiply-add the others do not,
// so all variants give bit-identical results, and the choice is a speed matter only.
//
// The variant used is the best the CPU supports (checked once, with the OS's
// support for the wider registers); set_isa() caps it for tests and benchmarks.
#pragma once

#include <cstdint>

namespace cahfp {

enum Isa : int64_t { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// Best variant this CPU (and this build) supports.
int64_t detected_isa();
// Variant in use: detected_isa(), or the cap set by set_isa.
int64_t active_isa();
// Cap the variant (-1: back to the detected one); returns the variant now in use.
int64_t set_isa(int64_t level);

}  // namespace cahfp

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(CAHFP_NO_ISA_DISPATCH)
#define CAHFP_X86_DISPATCH 1
#define CAHFP_ATTR_BASELINE __attribute__((flatten))
#define CAHFP_ATTR_AVX2 __attribute__((target("avx2,fma,f16c,popcnt"), flatten))
#define CAHFP_ATTR_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,popcnt"), flatten))
#else
#define CAHFP_ATTR_BASELINE __attribute__((flatten))
#endif

// CAHFP_ISA_VARIANTS(TEMPLATE_HEAD, TEMPLATE_ARGS, NAME, IMPL, PARAMS, ARGS) defines
// NAME_baseline, NAME_avx2 and NAME_avx512 (the latter two on x86-64 only), each calling
// IMPL ARGS, and NAME_pick() returning the pointer for active_isa(). TEMPLATE_HEAD and
// TEMPLATE_ARGS are macros (their commas would split the arguments), e.g.
// `#define HEAD template <typename T, bool B>` and `#define ARGS <T, B>`.
#if defined(CAHFP_X86_DISPATCH)
#define CAHFP_ISA_VARIANTS(TEMPLATE_HEAD, TEMPLATE_ARGS, NAME, IMPL, PARAMS, ARGS) \
  TEMPLATE_HEAD CAHFP_ATTR_BASELINE void NAME##_baseline PARAMS { IMPL ARGS; }     \
  TEMPLATE_HEAD CAHFP_ATTR_AVX2 void NAME##_avx2 PARAMS { IMPL ARGS; }             \
  TEMPLATE_HEAD CAHFP_ATTR_AVX512 void NAME##_avx512 PARAMS { IMPL ARGS; }         \
  TEMPLATE_HEAD inline auto NAME##_pick() {                                        \
    switch (::cahfp::active_isa()) {                                               \
      case ::cahfp::kAvx512: return &NAME##_avx512 TEMPLATE_ARGS;                  \
      case ::cahfp::kAvx2: return &NAME##_avx2 TEMPLATE_ARGS;                      \
      default: return &NAME##_baseline TEMPLATE_ARGS;                              \
    }                                                                              \
  }
// The same with two variants, baseline and AVX2 (AVX2 also on AVX-512 CPUs): for loops
// whose AVX-512 build measured slower (short, memory-bound rows; bench/RESULTS.md).
#define CAHFP_ISA_VARIANTS_UPTO_AVX2(TEMPLATE_HEAD, TEMPLATE_ARGS, NAME, IMPL, PARAMS, ARGS) \
  TEMPLATE_HEAD CAHFP_ATTR_BASELINE void NAME##_baseline PARAMS { IMPL ARGS; }               \
  TEMPLATE_HEAD CAHFP_ATTR_AVX2 void NAME##_avx2 PARAMS { IMPL ARGS; }                       \
  TEMPLATE_HEAD inline auto NAME##_pick() {                                                  \
    return ::cahfp::active_isa() >= ::cahfp::kAvx2 ? &NAME##_avx2 TEMPLATE_ARGS               \
                                                   : &NAME##_baseline TEMPLATE_ARGS;          \
  }
#else
#define CAHFP_ISA_VARIANTS(TEMPLATE_HEAD, TEMPLATE_ARGS, NAME, IMPL, PARAMS, ARGS) \
  TEMPLATE_HEAD CAHFP_ATTR_BASELINE void NAME##_baseline PARAMS { IMPL ARGS; }     \
  TEMPLATE_HEAD inline auto NAME##_pick() { return &NAME##_baseline TEMPLATE_ARGS; }
#define CAHFP_ISA_VARIANTS_UPTO_AVX2 CAHFP_ISA_VARIANTS
#endif
