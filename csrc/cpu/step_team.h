// Note [a thread team per regularised loop]
// The regularised ops' time loops (reg_lstm.h, reg_gru.h) are written once
// for every device, as a sequence of step products and row passes. On the
// CPU each of those was a parallel region of its own, and their fork/joins
// cost a tenth of a small layer's time. StepTeam::run(loop) runs the whole
// loop inside one OpenMP region instead: thread 0 runs loop() as it is, and
// the products and row passes it reaches (reg_cpu.cpp) hand each thread its
// share through on_team(), the other threads spinning between them.
#pragma once

#include <ATen/Parallel.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <exception>
#include <thread>

#include "spin_barrier.h"

namespace fusedrnn {
namespace cpu {

class StepTeam {
 public:
  // The team whose thread 0 is the calling thread, or null.
  static StepTeam*& current() {
    static thread_local StepTeam* team = nullptr;
    return team;
  }

  // loop() on thread 0 of a team of up to `threads` threads (of one thread
  // inside another parallel region); within a team's loop, just loop().
  // Exceptions of loop() pass on.
  template <typename Loop>
  static void run(int64_t threads, const Loop& loop) {
    if (current() != nullptr) return loop();
#ifdef _OPENMP
    const int n = at::in_parallel_region()
                      ? 1
                      : static_cast<int>(std::clamp<int64_t>(threads, 1, at::get_num_threads()));
#else
    const int n = 1;
#endif
    StepTeam team(n);
    std::exception_ptr error;
    const auto lead = [&] {
      current() = &team;
      try {
        loop();
      } catch (...) {
        error = std::current_exception();
      }
      current() = nullptr;
      team.stop();
    };
    if (n == 1) {
      lead();
    } else {
#ifdef _OPENMP
      // No num_threads clause (as run_steps in x86/fused_loop.h); threads
      // beyond n leave at once.
#pragma omp parallel
      {
        const int tid = omp_get_thread_num();
        if (tid == 0) {
          lead();
        } else if (tid < n) {
          team.serve(tid);
        }
      }
#endif
    }
    if (error) std::rethrow_exception(error);
  }

  // task(team, tid) on every thread of the current team, or of a team of up
  // to `threads` threads for this call alone; returns when all have
  // finished. task must not throw.
  template <typename Task>
  static void on_team(int64_t threads, const Task& task) {
    if (current() == nullptr) return run(threads, [&] { current()->each(task); });
    current()->each(task);
  }

  int size() const { return n_; }
  // Waits for every thread of the team (inside a task).
  void sync() {
    if (n_ > 1) barrier_.wait();
  }

 private:
  explicit StepTeam(int n) : n_(n), barrier_(n) {}

  template <typename Task>
  void each(const Task& task) {
    if (n_ == 1) return task(*this, 0);
    fn_ = [](StepTeam& team, const void* t, int tid) { (*static_cast<const Task*>(t))(team, tid); };
    arg_ = &task;
    done_.store(0, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    task(*this, 0);
    wait_until([&] { return done_.load(std::memory_order_acquire) == n_ - 1; });
  }

  void serve(int tid) {
    int seen = 0;
    for (;;) {
      wait_until([&] { return generation_.load(std::memory_order_acquire) != seen; });
      seen = generation_.load(std::memory_order_acquire);
      if (stopped_.load(std::memory_order_acquire)) return;
      fn_(*this, arg_, tid);
      done_.fetch_add(1, std::memory_order_acq_rel);
    }
  }

  void stop() {
    stopped_.store(true, std::memory_order_release);
    generation_.fetch_add(1, std::memory_order_release);
  }

  template <typename Ready>
  static void wait_until(const Ready& ready) {
    for (int spins = 0; !ready(); ++spins) {
      if (spins < SpinBarrier::kSpinsBeforeYield) {
        SpinBarrier::pause();
      } else {
        std::this_thread::yield();
      }
    }
  }

  const int n_;
  SpinBarrier barrier_;
  void (*fn_)(StepTeam&, const void*, int) = nullptr;
  const void* arg_ = nullptr;
  std::atomic<int> generation_{0};
  std::atomic<int> done_{0};
  std::atomic<bool> stopped_{false};
};

}  // namespace cpu
}  // namespace fusedrnn
