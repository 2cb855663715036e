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
#include <type_traits>
#include <vector>


#include "../reg_ops.h"
#include "../x86/fused.h"
#include "cpu_isa.h"
#include "step_team.h"
#include "step_buffers.h"

namespace fusedrnn {
namespace reg {
// Partial column sums of norm_grads (Note [Norm gradients in one pass] in
// reg_common.h) for contiguous [N, C]: "row" k is the block of rows
// [k * kRows, (k + 1) * kRows), summed in double into part_*[k] [C], so that
// the block runs in the copy of the row functions for the CPU path in force
// (Note [Vectorised row loops]). CPU only.
template <typename T>
struct NormGradBlocks {
  static constexpr int64_t kRows = 64;
  int64_t rows = 0, N = 0, C = 0;  // rows: blocks
  const T* dy = nullptr;
  const T* norm = nullptr;                   // [N, C] or null
  const T *x = nullptr, *mean = nullptr, *rstd = nullptr;  // [N, C], [N], [N] or null
  double *part_hh = nullptr, *part_ih = nullptr, *part_sum = nullptr;  // [rows, C] or null
};

template <typename T, typename Row>
void run_row(const Row& row, const NormGradBlocks<T>& d, int64_t k) {
  const int64_t C = d.C, r1 = std::min(d.N, (k + 1) * d.kRows);
  double* hh = d.norm ? d.part_hh + k * C : nullptr;
  double* ih = d.x ? d.part_ih + k * C : nullptr;
  double* sum = d.part_sum ? d.part_sum + k * C : nullptr;
  for (double* acc : {hh, ih, sum}) {
    if (acc) row.loop(C, [&](int64_t j) { acc[j] = 0.0; });
  }
  // Note [Branch-free row loops]
  with_flag(hh != nullptr, [&](auto on_hh) {
    with_flag(ih != nullptr, [&](auto on_ih) {
      with_flag(sum != nullptr, [&](auto on_sum) {
        for (int64_t r = k * d.kRows; r < r1; ++r) {
          const T* g = d.dy + r * C;
          const T* n = d.norm ? d.norm + r * C : nullptr;
          const T* x = d.x ? d.x + r * C : nullptr;
          const double m = d.x ? double(d.mean[r]) : 0.0, s = d.x ? double(d.rstd[r]) : 0.0;
          row.loop(C, [&](int64_t j) {
            const double gj = g[j];
            if constexpr (decltype(on_hh)::value) hh[j] += gj * double(n[j]);
            if constexpr (decltype(on_ih)::value) ih[j] += gj * ((double(x[j]) - m) * s);
            if constexpr (decltype(on_sum)::value) sum[j] += gj;
          });
        }
      });
    });
  });
}
}  // namespace reg

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
};

template <typename Rows>
void rows_generic(const Rows& a, int64_t begin, int64_t end) {
  for (int64_t b = begin; b < end; ++b) reg::run_row(CpuRow{}, a, b);
}

#ifdef FUSEDRNN_X86
// flatten: everything the rows call is inlined here, so compiled for the
// function's instruction set. Which copy runs follows the CPU path in force
// (cpu_isa.h), so FUSEDRNN_CPU_ISA forces each (tests compare them).
template <typename Rows>
__attribute__((target("avx2"), flatten)) void rows_avx2(const Rows& a, int64_t begin,
                                                        int64_t end) {
  for (int64_t b = begin; b < end; ++b) reg::run_row(CpuRow{}, a, b);
}
template <typename Rows>
__attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,prefer-vector-width=512"),
               flatten)) void rows_avx512(const Rows& a, int64_t begin, int64_t end) {
  for (int64_t b = begin; b < end; ++b) reg::run_row(CpuRow{}, a, b);
}
#endif

// A step's rows [begin, end) in the copy for the CPU path in force.
template <typename Rows>
void rows_range(CpuIsa isa, const Rows& a, int64_t begin, int64_t end) {
#ifdef FUSEDRNN_X86
  if (isa == CpuIsa::kAvx512) return rows_avx512(a, begin, end);
  if (isa == CpuIsa::kAvx2) return rows_avx2(a, begin, end);
#endif
  (void)isa;
  rows_generic(a, begin, end);
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
                           rows_range(isa, a, a.rows * tid / n, a.rows * (tid + 1) / n);
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
        rows_range(isa, rows, rows.rows * tid / n, rows.rows * (tid + 1) / n);
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

// norm_grads for contiguous tensors of one floating type, in double: blocks
// of rows in parallel (NormGradBlocks), then their partial sums in block
// order, so the results do not depend on the thread count.
template <typename T>
reg::NormGrads norm_grad_rows(const at::Tensor& dy, const at::Tensor& norm, const at::Tensor& x,
                              const at::Tensor& mean, const at::Tensor& rstd, bool with_sum) {
  reg::NormGradBlocks<T> d;
  d.N = dy.size(0);
  d.C = dy.size(1);
  d.rows = (d.N + d.kRows - 1) / d.kRows;
  d.dy = dy.data_ptr<T>();
  const size_t part_size = static_cast<size_t>(d.rows * d.C);
  std::vector<double> hh(norm.defined() ? part_size : 0), ih(x.defined() ? part_size : 0),
      sum(with_sum ? part_size : 0);
  if (norm.defined()) {
    d.norm = norm.data_ptr<T>();
    d.part_hh = hh.data();
  }
  if (x.defined()) {
    d.x = x.data_ptr<T>();
    d.mean = mean.data_ptr<T>();
    d.rstd = rstd.data_ptr<T>();
    d.part_ih = ih.data();
  }
  if (with_sum) d.part_sum = sum.data();
  run_rows(d);
  const auto total = [&](const std::vector<double>& part) {
    at::Tensor out = at::empty({d.C}, dy.options());
    T* po = out.data_ptr<T>();
    for (int64_t j = 0; j < d.C; ++j) {
      double s = 0.0;
      for (int64_t k = 0; k < d.rows; ++k) s += part[k * d.C + j];
      po[j] = static_cast<T>(s);
    }
    return out;
  };
  reg::NormGrads g;
  if (norm.defined()) g.hh = total(hh);
  if (x.defined()) g.ih = total(ih);
  if (with_sum) g.sum = total(sum);
  return g;
}

struct CpuRegKernels {
  using StepGemm = FusedStepGemm;
  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return cpu::empty_for_steps(sizes, options);
  }
  // Note [Norm gradients in one pass]: nullopt (ATen's) for what it does not take.
  static c10::optional<reg::NormGrads> norm_grads(const at::Tensor& dy, const at::Tensor& norm,
                                                  const at::Tensor& x, const at::Tensor& mean,
                                                  const at::Tensor& rstd, bool with_sum) {
    const auto dtype = dy.scalar_type();
    for (const at::Tensor* t : {&dy, &norm, &x}) {
      if (t->defined() && (!t->is_contiguous() || t->scalar_type() != dtype)) return c10::nullopt;
    }
    const at::Tensor m = mean.defined() ? mean.contiguous() : mean;
    const at::Tensor s = rstd.defined() ? rstd.contiguous() : rstd;
    if (dtype == at::kFloat) return norm_grad_rows<float>(dy, norm, x, m, s, with_sum);
    if (dtype == at::kDouble) return norm_grad_rows<double>(dy, norm, x, m, s, with_sum);
    return c10::nullopt;
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
