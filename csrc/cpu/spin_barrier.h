// A barrier for the threads of one OpenMP parallel region that spins, then
// yields to the OS after a while, so an oversubscribed machine still makes
// progress (Note [one parallel region per sequence] in x86/fused_loop.h).
#pragma once

#include <atomic>
#include <thread>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace fusedrnn {
namespace cpu {

class SpinBarrier {
 public:
  // Spins before a waiting thread yields to the OS; one spin's pause.
  static constexpr int kSpinsBeforeYield = 1 << 14;
  static void pause() {
#if defined(__x86_64__) || defined(_M_X64)
    _mm_pause();
#endif
  }

  explicit SpinBarrier(int n) : n_(n) {}
  void wait() {
    const int gen = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation_.load(std::memory_order_acquire) == gen; ++spins) {
      if (spins < kSpinsBeforeYield) {
        pause();
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  const int n_;
  std::atomic<int> arrived_{0};
  std::atomic<int> generation_{0};
};

}  // namespace cpu
}  // namespace fusedrnn
