// CPU kernels of the regularised ops (lstm_reg_*, gru_reg_*) and their CPU
// registration. The loops are reg_lstm.h / reg_gru.h; a step's rows are split
// across threads, each row runs on one thread through the row functions of
// reg_lstm_rows.h / reg_gru_rows.h, with CpuRow's loops vectorised.
//
// Note [Vectorised row loops]
// The row loops vectorise only if the compiler may turn the selects of
// gates.h's exp/tanh into vector blends, which -ftrapping-math (GCC's
// default) forbids: hence the pragma, before any include so that every
// function of this file agrees (it changes no result, only which floating
// point exception flags may be raised). Their floor needs SSE4.1, beyond
// x86-64's baseline, so on x86 CPUs each row runs in a copy compiled for the
// CPU path in force (rows_avx512, rows_avx2; cpu_isa.h).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>


#include "../reg_ops.h"
#include "../x86/fused.h"
#include "cpu_isa.h"
#include "step_team.h"
#include "step_buffers.h"

namespace fusedrnn {

namespace {

// Rows per parallel task: a row is a few thousand elements at most, too
// little to pay for a task on its own.
constexpr int64_t kRegRowsPerTask = 4;

// Partial sums a row's sums keep (two AVX2 vectors of float).
constexpr int kSumLanes = 16;

// One row on one thread. The loops carry no dependence between iterations
// (each j reads and writes its own elements), which `omp simd` asserts so
// that the compiler vectorises them. Sums keep kSumLanes partial sums in a
// fixed order, which vectorises too and gives the same result in every copy
// of the code (a serial sum would wait on each add).
struct CpuRow {
  template <typename F>
  void loop(int64_t n, F&& f) const {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) f(j);
  }
  template <typename T, typename F>
  T sum(int64_t n, F&& f) const {
    T part[kSumLanes] = {};
    int64_t j = 0;
    for (; j + kSumLanes <= n; j += kSumLanes) {
      for (int l = 0; l < kSumLanes; ++l) part[l] += f(j + l);
    }
    for (int l = 0; j + l < n; ++l) part[l] += f(j + l);
    T s = T(0);
    for (int l = 0; l < kSumLanes; ++l) s += part[l];
    return s;
  }
  bool leader() const { return true; }
  int64_t slot() const { return tid; }
  int64_t tid = 0;  // the thread's index in the loop's team
};

template <typename Rows>
void rows_generic(const Rows& a, int64_t begin, int64_t end, int tid) {
  for (int64_t b = begin; b < end; ++b) reg::run_row(CpuRow{tid}, a, b);
}

#ifdef FUSEDRNN_X86
// flatten: everything the rows call is inlined here, so compiled for the
// function's instruction set. Which copy runs follows the CPU path in force
// (cpu_isa.h), so FUSEDRNN_CPU_ISA forces each (tests compare them).
template <typename Rows>
__attribute__((target("avx2"), flatten)) void rows_avx2(const Rows& a, int64_t begin,
                                                        int64_t end, int tid) {
  for (int64_t b = begin; b < end; ++b) reg::run_row(CpuRow{tid}, a, b);
}
template <typename Rows>
__attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,prefer-vector-width=512"),
               flatten)) void rows_avx512(const Rows& a, int64_t begin, int64_t end,
                                          int tid) {
  for (int64_t b = begin; b < end; ++b) reg::run_row(CpuRow{tid}, a, b);
}
#endif

// A step's rows [begin, end) on thread tid of the team, in the copy for the
// CPU path in force.
template <typename Rows>
void rows_range(CpuIsa isa, const Rows& a, int64_t begin, int64_t end, int tid) {
#ifdef FUSEDRNN_X86
  if (avx512_path(isa)) return rows_avx512(a, begin, end, tid);
  if (isa == CpuIsa::kAvx2) return rows_avx2(a, begin, end, tid);
#endif
  (void)isa;
  rows_generic(a, begin, end, tid);
}

// A step's rows, shared out over the threads of the loop's team (Note [a
// thread team per regularised loop]), or over up to one thread per
// kRegRowsPerTask rows.
template <typename Rows>
void run_rows(const Rows& a) {
  const CpuIsa isa = cpu_isa();
  cpu::StepTeam::on_team((a.rows + kRegRowsPerTask - 1) / kRegRowsPerTask,
                         [&](cpu::StepTeam& team, int tid) {
                           const int n = team.size();
                           rows_range(isa, a, a.rows * tid / n, a.rows * (tid + 1) / n, tid);
                         });
}

// The step products of the loops (Note [One GEMM call site]): in float32 and
// float64 where a fused path runs, the fused path's GEMM with the weight
// packed once per call (ATen's SGEMM takes 60 us per step at B=16, H=256 on
// the machines we measure, three times the fused path's); else ATen's.
//
// Note [one parallel region per regularised step]
// A step's product and its row pass (the rows read the whole product: the
// layer norm's statistics) run as one task of the loop's thread team (Note
// [a thread team per regularised loop]): each thread runs its share of the
// product's column panels, waits at the team's barrier, then runs its share
// of the rows (backward: rows, barrier, product). Two fork/joins per step
// were a tenth of a layer_norm=True training step at T=100, B=16, H=256.
struct FusedStepGemm {
  reg::AtenStepGemm aten;
  // The fused kernels of b's dtype (one of them), with b packed once.
  const cpu::FusedF32* f32 = nullptr;
  const cpu::FusedF64* f64 = nullptr;
  at::Tensor packed;  // [panels, K, panel width]
  explicit FusedStepGemm(at::Tensor b) : aten(b) {
    if (!b.defined() || b.numel() == 0) return;
    cpu::with_fused_ops(b.scalar_type(), [&](const auto* ops) {
      if constexpr (std::is_same_v<decltype(ops), const cpu::FusedF32*>) {
        f32 = ops;
      } else {
        f64 = ops;
      }
      packed = ops->pack_rhs(b);
      return true;
    });
  }
  bool fused(const at::Tensor& out, const at::Tensor& a) const {
    return packed.defined() && a.size(0) > 0 && a.stride(1) == 1 && out.stride(1) == 1;
  }
  void operator()(at::Tensor out, const at::Tensor& a, bool accumulate = false) const {
    if (!fused(out, a)) return aten(out, a, accumulate);
    if (cpu::StepTeam::current() == nullptr) return product(out, a, accumulate, 0, 1);
    cpu::StepTeam::on_team(1, [&](cpu::StepTeam& team, int tid) {
      product(out, a, accumulate, tid, team.size());
    });
  }
  template <typename K, typename Rows>
  void then_rows(at::Tensor out, const at::Tensor& a, const Rows& rows) const {
    with_rows(out, a, false, rows, /*gemm_first=*/true);
  }
  template <typename K, typename Rows>
  void after_rows(const Rows& rows, at::Tensor out, const at::Tensor& a,
                  bool accumulate = false) const {
    with_rows(out, a, accumulate, rows, /*gemm_first=*/false);
  }

 private:
  // Thread tid of n's share of the product: a range of the column panels,
  // by pointers (no tensor op per step and thread). (Inside a team, the
  // GEMM's own parallel_for runs inline.)
  void product(const at::Tensor& out, const at::Tensor& a, bool accumulate, int tid,
               int n) const {
    const int64_t Q = packed.size(0), K = packed.size(1), W = packed.size(2), N = out.size(1);
    const int64_t q0 = Q * tid / n, q1 = Q * (tid + 1) / n;
    const int64_t c0 = q0 * W, c1 = std::min(N, q1 * W);
    if (c1 <= c0) return;
    const auto run = [&](const auto* ops, auto* type) {
      using T = std::remove_pointer_t<decltype(type)>;
      ops->gemm_packed(a.size(0), c1 - c0, K, a.data_ptr<T>(), a.stride(0),
                       packed.data_ptr<T>() + q0 * K * W, out.data_ptr<T>() + c0, out.stride(0),
                       accumulate);
    };
    if (f32) {
      run(f32, static_cast<float*>(nullptr));
    } else {
      run(f64, static_cast<double*>(nullptr));
    }
  }

  // The product and the rows in one task of the team (Note [one parallel
  // region per regularised step]).
  template <typename Rows>
  void with_rows(at::Tensor out, const at::Tensor& a, bool accumulate, const Rows& rows,
                 bool gemm_first) const {
    if (!fused(out, a)) {
      if (!gemm_first) run_rows(rows);
      (*this)(out, a, accumulate);
      if (gemm_first) run_rows(rows);
      return;
    }
    const CpuIsa isa = cpu_isa();
    cpu::StepTeam::on_team(rows.rows, [&](cpu::StepTeam& team, int tid) {
      const int n = team.size();
      const auto row_pass = [&] {
        rows_range(isa, rows, rows.rows * tid / n, rows.rows * (tid + 1) / n, tid);
      };
      if (!gemm_first) {
        row_pass();
        team.sync();
      }
      product(out, a, accumulate, tid, n);
      if (gemm_first) {
        team.sync();
        row_pass();
      }
    });
  }
};

struct CpuRegKernels {
  using StepGemm = FusedStepGemm;
  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return cpu::empty_for_steps(sizes, options);
  }
  // Note [Gain gradients summed in the loop]: a slot per thread of a
  // loop's team (CpuRow::slot). FUSEDRNN_REG_SUMS_AFTER_LOOP=1, for tests,
  // takes none: the gains' gradients then come from norm_grads' pass over
  // gradient rows of all steps after the loop, the branch the CUDA policy
  // always takes, so that it is tested where no GPU is.
  static int64_t sum_slots() {
    const char* after = std::getenv("FUSEDRNN_REG_SUMS_AFTER_LOOP");
    return after != nullptr && std::string(after) == "1" ? 0 : at::get_num_threads();
  }
  // dY^T X by the fused path's weight-gradient GEMM where it runs (float32,
  // float64); undefined (ATen's) otherwise.
  static at::Tensor weight_grad(const at::Tensor& dy, const at::Tensor& x) {
    if (x.scalar_type() != dy.scalar_type() || dy.size(0) == 0) return at::Tensor();
    const auto dw = cpu::with_fused_ops(dy.scalar_type(), [&](const auto* ops) {
      using T = typename std::remove_pointer_t<decltype(ops)>::Elem;
      const at::Tensor d = dy.contiguous(), xc = x.contiguous();
      return ops->weight_grad({{d.data_ptr<T>(), xc.data_ptr<T>(), d.size(0)}}, d.size(1),
                              xc.size(1), false, d.options()).first;
    });
    return dw ? *dw : at::Tensor();
  }
  // dW_hh by that GEMM, h_{t-1} read in place (scheduled_grad_rows); undefined
  // (masked_prev's copy) where it does not run.
  static at::Tensor recurrent_weight_grad(const at::Tensor& da, const at::Tensor& out,
                                          const at::Tensor& h0, const Schedule& s) {
    const auto dtype = da.scalar_type();
    if (out.scalar_type() != dtype || h0.scalar_type() != dtype || da.size(0) == 0) {
      return at::Tensor();
    }
    const auto dw = cpu::with_fused_ops(dtype, [&](const auto* ops) {
      using T = typename std::remove_pointer_t<decltype(ops)>::Elem;
      const at::Tensor d = da.contiguous(), o = out.contiguous(), h = h0.contiguous();
      const int64_t G = d.size(1), P = o.size(1);
      return ops->weight_grad(cpu::scheduled_grad_rows(d.data_ptr<T>(), o.data_ptr<T>(),
                                                       h.data_ptr<T>(), s, G, P),
                              G, P, false, d.options()).first;
    });
    return dw ? *dw : at::Tensor();
  }
  template <typename Rows>
  static void run(const Rows& a) {
    run_rows(a);
  }
  // Note [The time loop]: one thread team for the loop where its products
  // run on the fused path (else ATen's GEMMs would run on one thread).
  template <typename T, typename Loop>
  static void time_loop(const Loop& loop) {
    const bool fused = cpu::with_fused_ops(c10::CppTypeToScalarType<T>::value,
                                           [](const auto*) { return true; })
                           .has_value();
    if (fused) {
      cpu::StepTeam::run(at::get_num_threads(), loop);
    } else {
      loop();
    }
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fusedrnn, CPU, m) { reg::RegOps<CpuRegKernels>::register_ops(m); }

}  // namespace fusedrnn
