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
// x86-64's baseline, so on CPUs with AVX2 each row runs in a copy compiled
// for it (rows_avx2), picked at run time.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "../reg_gru.h"
#include "../reg_lstm.h"
#include "../x86/fused.h"

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
};

template <typename Rows>
void rows_generic(const Rows& a, int64_t begin, int64_t end) {
  for (int64_t b = begin; b < end; ++b) reg::run_row(CpuRow{}, a, b);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define FUSEDRNN_REG_AVX2 1
// flatten: everything the rows call is inlined here, so compiled for AVX2.
template <typename Rows>
__attribute__((target("avx2"), flatten)) void rows_avx2(const Rows& a, int64_t begin,
                                                        int64_t end) {
  for (int64_t b = begin; b < end; ++b) reg::run_row(CpuRow{}, a, b);
}

// FUSEDRNN_CPU_PATH=generic takes the baseline copy (tests compare the two).
bool use_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2");
  const char* knob = std::getenv("FUSEDRNN_CPU_PATH");
  return ok && !(knob != nullptr && std::string(knob) == "generic");
}
#endif

// The step products of the loops (Note [One GEMM call site]): in float32
// where a fused path runs, the fused path's GEMM with the weight packed once
// per call (ATen's SGEMM takes 60 us per step at B=16, H=256 on the machines
// we measure, three times the fused path's); else ATen's.
struct FusedStepGemm {
  reg::AtenStepGemm aten;
  const cpu::FusedF32* ops = nullptr;
  at::Tensor packed;
  explicit FusedStepGemm(at::Tensor b) : aten(b) {
    if (!b.defined() || b.scalar_type() != at::kFloat || b.numel() == 0) return;
    ops = cpu::fused_f32();
    if (ops) packed = ops->pack_rhs(b);
  }
  void operator()(at::Tensor out, const at::Tensor& a, bool accumulate = false) const {
    if (ops && a.size(0) > 0 && a.stride(1) == 1 && out.stride(1) == 1) {
      ops->gemm_packed(a, packed, out, accumulate);
    } else {
      aten(out, a, accumulate);
    }
  }
};

// sum over rows of a * b for contiguous [N, C] of one floating type, in
// column blocks per thread, each column summed in row order in double.
template <typename T>
at::Tensor column_dot_rows(const at::Tensor& a, const at::Tensor& b) {
  constexpr int64_t kBlock = 64;
  const int64_t N = a.size(0), C = a.size(1);
  at::Tensor out = at::empty({C}, a.options());
  const T *pa = a.data_ptr<T>(), *pb = b.data_ptr<T>();
  T* po = out.data_ptr<T>();
  at::parallel_for(0, (C + kBlock - 1) / kBlock, 1, [&](int64_t q0, int64_t q1) {
    double acc[kBlock];
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t c0 = q * kBlock, n = std::min(kBlock, C - c0);
      for (int64_t j = 0; j < n; ++j) acc[j] = 0.0;
      for (int64_t r = 0; r < N; ++r) {
        const T *ra = pa + r * C + c0, *rb = pb + r * C + c0;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) acc[j] += double(ra[j]) * double(rb[j]);
      }
      for (int64_t j = 0; j < n; ++j) po[c0 + j] = static_cast<T>(acc[j]);
    }
  });
  return out;
}

struct CpuRegKernels {
  using StepGemm = FusedStepGemm;
  static at::Tensor column_dot(const at::Tensor& a, const at::Tensor& b) {
    if (!a.is_contiguous() || !b.is_contiguous() || a.scalar_type() != b.scalar_type()) {
      return at::Tensor();
    }
    if (a.scalar_type() == at::kFloat) return column_dot_rows<float>(a, b);
    if (a.scalar_type() == at::kDouble) return column_dot_rows<double>(a, b);
    return at::Tensor();
  }
  // dY^T X by the fused path's weight-gradient GEMM where it runs (float32,
  // contiguous rows); undefined (ATen's) otherwise.
  static at::Tensor weight_grad(const at::Tensor& dy, const at::Tensor& x) {
    const cpu::FusedF32* ops = dy.scalar_type() == at::kFloat ? cpu::fused_f32() : nullptr;
    if (!ops || x.scalar_type() != at::kFloat || dy.size(0) == 0) return at::Tensor();
    const at::Tensor d = dy.contiguous(), xc = x.contiguous();
    return ops->weight_grad({{d.data_ptr<float>(), xc.data_ptr<float>(), d.size(0)}}, d.size(1),
                            xc.size(1), false, d.options()).first;
  }
  template <typename Rows>
  static void run(const Rows& a) {
#ifdef FUSEDRNN_REG_AVX2
    const bool avx2 = use_avx2();
#else
    const bool avx2 = false;
#endif
    at::parallel_for(0, a.rows, kRegRowsPerTask, [&](int64_t begin, int64_t end) {
#ifdef FUSEDRNN_REG_AVX2
      if (avx2) return rows_avx2(a, begin, end);
#endif
      rows_generic(a, begin, end);
    });
    (void)avx2;
  }
};

reg::LstmRegForwardOut lstm_reg_forward_cpu(
    const at::Tensor& x_proj, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
    const OptTensor& w_hr, const OptTensor& b_hh, const OptTensor& batch_sizes, bool reverse,
    bool train, const OptTensor& rec_mask, const OptTensor& zone_h, const OptTensor& zone_c,
    const OptTensor& ln_hh, const OptTensor& ln_c_w, const OptTensor& ln_c_b) {
  return reg::lstm_reg_forward_impl<CpuRegKernels>(
      x_proj, h0, c0, w_hh, w_hr, b_hh, batch_sizes, reverse, train,
      {rec_mask, zone_h, zone_c, ln_hh, ln_c_w, ln_c_b});
}

reg::LstmRegBackwardOut lstm_reg_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells,
    const at::Tensor& cell_new, const at::Tensor& norm_hh, const at::Tensor& stats,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh, const OptTensor& w_hr,
    const OptTensor& batch_sizes, bool reverse, bool has_bias, const OptTensor& rec_mask,
    const OptTensor& zone_h, const OptTensor& zone_c, const OptTensor& ln_hh,
    const OptTensor& ln_c_w, const OptTensor& ln_c_b) {
  return reg::lstm_reg_backward_impl<CpuRegKernels>(
      grad_output, grad_h_n, grad_c_n, output, gates, cells, cell_new, norm_hh, stats, h0, c0,
      w_hh, w_hr, batch_sizes, reverse, has_bias, {rec_mask, zone_h, zone_c, ln_hh, ln_c_w, ln_c_b});
}

reg::GruRegForwardOut gru_reg_forward_cpu(const at::Tensor& x_proj, const at::Tensor& h0,
                                          const at::Tensor& w_hh, const OptTensor& b_hh,
                                          const OptTensor& batch_sizes, bool reverse,
                                          bool reset_after, bool train, const OptTensor& rec_mask,
                                          const OptTensor& zone_h, const OptTensor& ln_hh) {
  return reg::gru_reg_forward_impl<CpuRegKernels>(x_proj, h0, w_hh, b_hh, batch_sizes, reverse,
                                                  reset_after, train,
                                                  {rec_mask, zone_h, {}, ln_hh, {}, {}});
}

reg::GruRegBackwardOut gru_reg_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& output,
    const at::Tensor& gates, const at::Tensor& norm_hh, const at::Tensor& stats,
    const at::Tensor& h0, const at::Tensor& w_hh, const OptTensor& batch_sizes, bool reverse,
    bool reset_after, bool has_bias, const OptTensor& rec_mask, const OptTensor& zone_h,
    const OptTensor& ln_hh) {
  return reg::gru_reg_backward_impl<CpuRegKernels>(
      grad_output, grad_h_n, output, gates, norm_hh, stats, h0, w_hh, batch_sizes, reverse,
      reset_after, has_bias, {rec_mask, zone_h, {}, ln_hh, {}, {}});
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedrnn, CPU, m) {
  m.impl("lstm_reg_forward", &lstm_reg_forward_cpu);
  m.impl("lstm_reg_backward", &lstm_reg_backward_cpu);
  m.impl("gru_reg_forward", &gru_reg_forward_cpu);
  m.impl("gru_reg_backward", &gru_reg_backward_cpu);
}

}  // namespace fusedrnn
