// CPU pointwise steps and the CPU registration of the ops. Rows are split
// across threads; each thread runs the per-unit glue of steps.h over its rows.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "../recurrence.h"
#include "../x86/fused.h"

namespace fusedrnn {
namespace {

// Rows per parallel task: one row is 4H elements of gate math, too little to
// pay for a task on its own.
constexpr int64_t kRowsPerTask = 4;

// Every (row, hidden unit) of a step through step_unit (steps.h).
struct CpuKernels {
  template <typename Step>
  static void step(const Step& a) {
    at::parallel_for(0, a.rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t j = 0; j < a.H; ++j) step_unit(a, b, j);
      }
    });
  }
};

// Note [x86-only fused path]
// The fused path (csrc/x86/) is x86-64 code: setup.py compiles it, and
// defines FUSEDRNN_X86, only where the compiler targets x86-64. Elsewhere
// (aarch64, ...) every call below runs the generic loop of recurrence.h, and
// the calls into the fused path are compiled out, since their definitions
// are not linked.
#ifdef FUSEDRNN_X86
bool has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
  return ok;
}

bool has_avx512_bf16() {
  static const bool ok = has_avx512() && __builtin_cpu_supports("avx512bf16");
  return ok;
}

// FUSEDRNN_CPU_PATH=generic forces the generic loop (tests compare the two).
bool generic_forced() {
  const char* knob = std::getenv("FUSEDRNN_CPU_PATH");
  return knob != nullptr && std::string(knob) == "generic";
}

}  // namespace

namespace cpu {
bool fused_path_ok(const at::Tensor& x_proj, bool packed, bool proj) {
  return x_proj.scalar_type() == at::kFloat && !packed && !proj && has_avx512() &&
         !generic_forced();
}
}  // namespace cpu

namespace {

// The bfloat16 forward: padded, no projection, an even hidden size (k-pairs).
bool fused_bf16_ok(const at::Tensor& x_proj, bool packed, bool proj, int64_t H) {
  return x_proj.scalar_type() == at::kBFloat16 && !packed && !proj && H % 2 == 0 &&
         has_avx512_bf16() && !generic_forced();
}

// Note [half types on the fused float32 path]
// Where no fused kernel reads a half type directly (the backward of both,
// float16's forward), padded input without projection still takes the fused
// float32 path: operands converted once, results rounded once. More accurate
// than the generic loop, which rounds every step's matmul to the half type, and
// several times faster.
bool fused_via_f32_ok(const at::Tensor& x, bool packed, bool proj) {
  const auto dt = x.scalar_type();
  return (dt == at::kHalf || dt == at::kBFloat16) && !packed && !proj && has_avx512() &&
         !generic_forced();
}

at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat); }
#endif

// Padded input without projection takes a fused path (x86/fused.h) where the
// CPU has it: float32 on AVX-512, and the bfloat16 forward on AVX512-BF16;
// everything else the generic loop.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward_cpu(
    const at::Tensor& x_proj, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
    const OptTensor& w_hr, const OptTensor& b_hh, const OptTensor& batch_sizes, bool reverse,
    bool train) {
  const NoAutocast no_autocast;
  const auto checked = lstm_check_forward(x_proj, h0, c0, w_hh, w_hr, b_hh, batch_sizes, reverse);
#ifdef FUSEDRNN_X86
  if (cpu::fused_path_ok(x_proj, batch_sizes.has_value(), w_hr.has_value())) {
    const int64_t G = kLstmGates * std::get<1>(checked);
    return cpu::lstm_forward_fused(x_proj, h0, c0, w_hh, detail::defined_or_zeros(b_hh, G, x_proj),
                                   reverse, train);
  }
  if (fused_bf16_ok(x_proj, batch_sizes.has_value(), w_hr.has_value(), std::get<1>(checked))) {
    const int64_t G = kLstmGates * std::get<1>(checked);
    return cpu::lstm_forward_fused_bf16(x_proj, h0, c0, w_hh,
                                        detail::defined_or_zeros(b_hh, G, x_proj), reverse, train);
  }
  if (fused_via_f32_ok(x_proj, batch_sizes.has_value(), w_hr.has_value())) {
    const int64_t G = kLstmGates * std::get<1>(checked);
    const auto dt = x_proj.scalar_type();
    auto [out, h_n, c_n, gates, cells] = cpu::lstm_forward_fused(
        f32(x_proj), f32(h0), f32(c0), f32(w_hh), f32(detail::defined_or_zeros(b_hh, G, x_proj)),
        reverse, train);
    return {out.to(dt), h_n.to(dt), c_n.to(dt), gates.to(dt), cells};
  }
#endif
  return lstm_forward_impl<CpuKernels>(x_proj, h0, c0, w_hh, w_hr, b_hh, batch_sizes, reverse,
                                       train);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_backward_cpu(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                  const at::Tensor& grad_c_n, const at::Tensor& output, const at::Tensor& gates,
                  const at::Tensor& cells, const at::Tensor& h0, const at::Tensor& c0,
                  const at::Tensor& w_hh, const OptTensor& w_hr, const OptTensor& batch_sizes,
                  bool reverse, bool has_bias) {
  const NoAutocast no_autocast;
#ifdef FUSEDRNN_X86
  if (cpu::fused_path_ok(grad_output, batch_sizes.has_value(), w_hr.has_value()) &&
      grad_output.dim() == 3) {
    return cpu::lstm_backward_fused(grad_output, grad_h_n, grad_c_n, output, gates, cells, h0, c0,
                                    w_hh, reverse, has_bias);
  }
  if (fused_via_f32_ok(grad_output, batch_sizes.has_value(), w_hr.has_value()) &&
      grad_output.dim() == 3) {
    const auto dt = grad_output.scalar_type();
    auto [dx, dh0, dc0, dw, dw_hr, db] = cpu::lstm_backward_fused(
        f32(grad_output), f32(grad_h_n), f32(grad_c_n), f32(output), f32(gates), cells, f32(h0),
        f32(c0), f32(w_hh), reverse, has_bias);
    return {dx.to(dt), dh0.to(dt), dc0.to(dt), dw.to(dt), dw_hr.to(dt), db.to(dt)};
  }
#endif
  return lstm_backward_impl<CpuKernels>(grad_output, grad_h_n, grad_c_n, output, gates, cells, h0,
                                        c0, w_hh, w_hr, batch_sizes, reverse, has_bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_forward_cpu(
    const at::Tensor& x_proj, const at::Tensor& h0, const at::Tensor& w_hh, const OptTensor& b_hh,
    const OptTensor& batch_sizes, bool reverse, bool reset_after, bool train) {
  const NoAutocast no_autocast;
  const auto checked =
      gru_check_forward(x_proj, h0, w_hh, b_hh, batch_sizes, reverse, reset_after);
#ifdef FUSEDRNN_X86
  if (reset_after && cpu::fused_path_ok(x_proj, batch_sizes.has_value(), false)) {
    const int64_t G = kGruGates * std::get<1>(checked);
    return cpu::gru_forward_fused(x_proj, h0, w_hh, detail::defined_or_zeros(b_hh, G, x_proj),
                                  reverse, train);
  }
  if (reset_after && fused_bf16_ok(x_proj, batch_sizes.has_value(), false, std::get<1>(checked))) {
    const int64_t G = kGruGates * std::get<1>(checked);
    return cpu::gru_forward_fused_bf16(x_proj, h0, w_hh,
                                       detail::defined_or_zeros(b_hh, G, x_proj), reverse, train);
  }
  if (reset_after && fused_via_f32_ok(x_proj, batch_sizes.has_value(), false)) {
    const int64_t G = kGruGates * std::get<1>(checked);
    const auto dt = x_proj.scalar_type();
    auto [out, h_n, gates] =
        cpu::gru_forward_fused(f32(x_proj), f32(h0), f32(w_hh),
                               f32(detail::defined_or_zeros(b_hh, G, x_proj)), reverse, train);
    return {out.to(dt), h_n.to(dt), gates.to(dt)};
  }
#endif
  return gru_forward_impl<CpuKernels>(x_proj, h0, w_hh, b_hh, batch_sizes, reverse, reset_after,
                                      train);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& output,
    const at::Tensor& gates, const at::Tensor& h0, const at::Tensor& w_hh,
    const OptTensor& batch_sizes, bool reverse, bool reset_after, bool has_bias) {
  const NoAutocast no_autocast;
#ifdef FUSEDRNN_X86
  if (reset_after && cpu::fused_path_ok(grad_output, batch_sizes.has_value(), false) &&
      grad_output.dim() == 3) {
    return cpu::gru_backward_fused(grad_output, grad_h_n, output, gates, h0, w_hh, reverse,
                                   has_bias);
  }
  if (reset_after && fused_via_f32_ok(grad_output, batch_sizes.has_value(), false) &&
      grad_output.dim() == 3) {
    const auto dt = grad_output.scalar_type();
    auto [dx, dh0, dw, db] = cpu::gru_backward_fused(f32(grad_output), f32(grad_h_n), f32(output),
                                                     f32(gates), f32(h0), f32(w_hh), reverse,
                                                     has_bias);
    return {dx.to(dt), dh0.to(dt), dw.to(dt), db.to(dt)};
  }
#endif
  return gru_backward_impl<CpuKernels>(grad_output, grad_h_n, output, gates, h0, w_hh,
                                       batch_sizes, reverse, reset_after, has_bias);
}

#ifdef FUSEDRNN_X86
bool linear_fused_ok(const at::Tensor& a, const at::Tensor& w) {
  return a.device().is_cpu() && a.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat &&
         has_avx512() && a.numel() > 0;
}
#endif

// The input projection: our GEMM for float32 on AVX-512 CPUs, else ATen's.
// Any device (registered as CompositeExplicitAutograd).
at::Tensor linear_any(const at::Tensor& input, const at::Tensor& weight,
                      const OptTensor& bias) {
  const NoAutocast no_autocast;
  TORCH_CHECK(input.dim() >= 1 && weight.dim() == 2 && input.size(-1) == weight.size(1),
              "fusedrnn::linear: input [..., ", weight.dim() == 2 ? weight.size(1) : -1,
              "] and weight [N, K] expected, got ", input.sizes(), " and ", weight.sizes());
#ifdef FUSEDRNN_X86
  if (linear_fused_ok(input, weight) &&
      !(bias.has_value() && bias->scalar_type() != at::kFloat)) {
    auto out_shape = input.sizes().vec();
    out_shape.back() = weight.size(0);
    const at::Tensor x2 = input.reshape({-1, input.size(-1)}).contiguous();
    return cpu::linear_fused(x2, weight.contiguous(), bias).view(out_shape);
  }
#endif
  return at::linear(input, weight, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward_any(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight, bool input_grad,
    bool weight_grad, bool bias_grad) {
  const NoAutocast no_autocast;
  const at::Tensor g2 = grad.reshape({-1, grad.size(-1)}).contiguous();
  const at::Tensor x2 = input.reshape({-1, input.size(-1)});
  const at::Tensor none = at::empty({0}, grad.options());
  at::Tensor dx = none, dw = none, db = none;
  if (input_grad) {
#ifdef FUSEDRNN_X86
    dx = (linear_fused_ok(g2, weight) ? cpu::linear_input_grad_fused(g2, weight.contiguous())
                                      : at::mm(g2, weight))
             .view(input.sizes());
#else
    dx = at::mm(g2, weight).view(input.sizes());
#endif
  }
  // MKL's SGEMM takes g2^T as it is (see recurrent_weight_grad in x86/fused_avx512.cpp).
  if (weight_grad) dw = at::mm(g2.t(), x2);
  if (bias_grad) db = g2.sum(0);
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedrnn, CompositeExplicitAutograd, m) {
  m.impl("linear", &linear_any);
  m.impl("linear_backward", &linear_backward_any);
}

TORCH_LIBRARY_IMPL(fusedrnn, CPU, m) {
  m.impl("lstm_forward", &lstm_forward_cpu);
  m.impl("lstm_backward", &lstm_backward_cpu);
  m.impl("gru_forward", &gru_forward_cpu);
  m.impl("gru_backward", &gru_backward_cpu);
}

}  // namespace fusedrnn
