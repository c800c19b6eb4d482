// What bounds the CPU aggregation engine's inner loop: the per-3x3-block work of
// csrc/cpu/packed_engine.h (s += p * (c - w), squared deltas) taken apart, one thread,
// the client data either streamed from memory (512 MB, read once) or in L1.
//
//   g++ -O2 -mavx2 -mfma -ffp-contract=off bench/block_loop_bounds.cpp -o /tmp/block_loop_bounds
//   /tmp/block_loop_bounds
//
// Each line: ns per 9-element block and the client bytes streamed per second. The rows
// add, one at a time, what the engine's loop does per block: read the client's 9 values
// (and square them), subtract the global's 9 values (at the kept column's offset in a
// row of 512 columns, about half kept), update the sums, take the squared deltas; then
// the same with the client stream prefetched 2 KB ahead (what the engine does). The
// global row and the sums stay in L1 throughout, so the difference between "in L1" and
// "streamed" is the cost of the client data alone.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

typedef float f32x8 __attribute__((vector_size(32)));
static inline f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
static inline void store8(float* p, f32x8 v) { std::memcpy(p, &v, sizeof(v)); }

struct Stats {
  f32x8 v = {0, 0, 0, 0, 0, 0, 0, 0};
  float t = 0;
};

// kStep 0: read + square; 1: + subtract the global; 2: + update the sums (no statistics);
// 3: the engine's block (all of it); kAhead: prefetch the client stream 2 KB ahead.
template <int kStep, bool kAhead>
__attribute__((noinline)) void row(float* __restrict__ s, const float* __restrict__ c, const float* __restrict__ w,
                                   const int32_t* __restrict__ offs, int64_t cols, float p, Stats& q) {
  Stats lq = q;
  for (int64_t j = 0; j < cols; ++j, c += 9) {
    if (kAhead) __builtin_prefetch(reinterpret_cast<const char*>(c) + 2048, 0, 0);
    const int64_t o = offs[j];
    if (kStep == 0) {
      const f32x8 d = load8(c);
      lq.v += d * d;
      lq.t += c[8] * c[8];
      continue;
    }
    const f32x8 d = load8(c) - load8(w + o);
    const float d1 = c[8] - w[o + 8];
    if (kStep >= 2) {
      store8(s + o, load8(s + o) + p * d);
      s[o + 8] += p * d1;
    }
    if (kStep != 2) {
      lq.v += d * d;
      lq.t += d1 * d1;
    }
  }
  q = lq;
}

using RowFn = void (*)(float*, const float*, const float*, const int32_t*, int64_t, float, Stats&);

int main() {
  const int64_t Cin = 512;
  std::mt19937 gen(1);
  std::vector<float> W(Cin * 9), S(Cin * 9, 0.0f);
  for (auto& x : W) x = static_cast<float>(gen() % 100) / 7.0f;
  std::vector<int32_t> offs;
  for (int64_t c = 0; c < Cin; ++c)
    if (gen() % 2) offs.push_back(static_cast<int32_t>(c * 9));
  const int64_t cols = static_cast<int64_t>(offs.size()), row_elems = cols * 9;
  const int64_t n = (512LL << 20) / 4;
  std::vector<float> C(n + 1024);
  for (int64_t i = 0; i < n; ++i) C[i] = static_cast<float>(i % 97) / 9.0f;
  const char* names[] = {"read + square", "+ subtract the global", "+ update the sums", "the engine's block"};
  const RowFn plain[] = {row<0, false>, row<1, false>, row<2, false>, row<3, false>};
  const RowFn ahead[] = {row<0, true>, row<1, true>, row<2, true>, row<3, true>};
  float sink = 0;
  for (int prefetch = 0; prefetch < 2; ++prefetch)
    for (int step = 0; step < 4; ++step) {
      const RowFn f = prefetch ? ahead[step] : plain[step];
      double ns[2];
      for (int streamed = 0; streamed < 2; ++streamed) {
        // streamed: every row a new stretch of the 512 MB; in L1: the same row again
        const int64_t rows = n / row_elems - 1;
        Stats q;
        const auto t0 = std::chrono::steady_clock::now();
        for (int64_t r = 0; r < rows; ++r) f(S.data(), C.data() + (streamed ? r * row_elems : 0), W.data(),
                                             offs.data(), cols, 0.01f, q);
        const auto t1 = std::chrono::steady_clock::now();
        ns[streamed] = std::chrono::duration<double, std::nano>(t1 - t0).count() / (static_cast<double>(rows) * cols);
        sink += q.t + q.v[0];
      }
      std::printf("%-24s %-14s in L1 %5.2f ns/block   streamed %5.2f ns/block (%5.1f GB/s)\n", names[step],
                  prefetch ? "2 KB prefetch" : "", ns[0], ns[1], 36.0 / ns[1]);
    }
  std::printf("(checksum %g)\n", static_cast<double>(sink));
  return 0;
}
