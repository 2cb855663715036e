// CPU pointwise steps and the CPU registration of the ops. Rows are split
// across threads; each thread runs the per-unit glue of steps.h over its rows.
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <string>
#include <type_traits>

#include "../plain_ops.h"
#include "../recurrence.h"
#include "../x86/fused.h"
#include "cpu_isa.h"
#include "step_buffers.h"

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
// The fused paths (csrc/x86/) are x86-64 code: setup.py compiles them, and
// defines FUSEDRNN_X86, only where the compiler targets x86-64. Elsewhere
// (aarch64, ...) every call below runs the generic loop of recurrence.h:
// fused_f32() is null, and the bfloat16 kernels' calls are compiled out,
// since their definitions are not linked.


// run(ops) with the fused kernels of x's dtype (float32, float64) where the
// layer can take them (`eligible`: padded input without projection, and the
// op's own conditions); nullopt otherwise. A bad FUSEDRNN_CPU_ISA raises on
// every call, eligible or not.
template <typename F>
auto fused_run(const at::Tensor& x, bool eligible, const F& run) {
  using Result = decltype(run(static_cast<const cpu::FusedF32*>(nullptr)));
  if (!eligible) {
    cpu::fused_f32();  // the knob's check
    return c10::optional<Result>();
  }
  return cpu::with_fused_ops(x.scalar_type(), run);
}

// Whether the bfloat16 kernels of x86/fused.h run: AVX512-BF16, and the
// AVX-512 path in force.
bool bf16_kernels_run() {
#ifdef FUSEDRNN_X86
  return has_avx512_bf16() && avx512_path(cpu_isa());
#else
  return false;
#endif
}

#ifdef FUSEDRNN_X86
// Whether the AMX path is in force (cpu_isa.h): the bfloat16 kernels' step
// products on AMX tiles (Note [AMX tiles for the step product] in
// x86/amx_tiles.h), and the large bfloat16 GEMMs (projection, weight
// gradients) ATen's, which run oneDNN's AMX kernels.
bool amx_runs() { return cpu_isa() == CpuIsa::kAmx; }

// Whether the step products of a bfloat16 layer of `rows` batch rows run on
// the tiles. One row fills a sixteenth of a tile, and each step reads all of
// W_hh, which tile loads bring from L2 more slowly than vector loads: at
// batch 1 the vdpbf16ps kernels are faster (2-core Xeon with AMX, T=100 H=256,
// interleaved: LSTM inference 1.28 -> 0.95 ms, training 6.23 -> 4.48 ms; GRU
// 0.95 -> 0.79 and 3.43 -> 3.00 ms; at H=512 and 1024 within 4%), at batch 2
// the two are even, and from 3 rows the tiles win.
constexpr int64_t kAmxMinRows = 2;
bool amx_steps(int64_t rows) { return amx_runs() && rows >= kAmxMinRows; }

// The bfloat16 kernels: no projection, an even hidden size (k-pairs).
bool fused_bf16_ok(const at::Tensor& x_proj, bool proj, int64_t H) {
  return x_proj.scalar_type() == at::kBFloat16 && !proj && H % 2 == 0 && bf16_kernels_run();
}

// (dW_hh, db_hh) in float32 from bfloat16 dG [T, B, G], output [T, B, H] and
// h0 [B, H]: x86/fused.h's weight_grad_bf16, or with AMX oneDNN's matmul over
// h_{t-1} gathered in dG's row order (the pairing of recurrent_grad_rows).
std::pair<at::Tensor, at::Tensor> recurrent_weight_grads_bf16(const at::Tensor& dg,
                                                             const at::Tensor& output,
                                                             const at::Tensor& h0, bool reverse,
                                                             bool has_bias) {
  const at::Tensor d = dg.contiguous(), out = output.contiguous(), h = h0.contiguous();
  const int64_t T = out.size(0), B = out.size(1), H = out.size(2), G = d.size(2);
  if (amx_runs()) {
    const at::Tensor d2 = d.view({T * B, G});
    const at::Tensor prev = T == 1 ? h
                          : reverse ? at::cat({out.view({T * B, H}).narrow(0, B, (T - 1) * B), h})
                                    : at::cat({h, out.view({T * B, H}).narrow(0, 0, (T - 1) * B)});
    // Sums in float32 inside each op, rounded once, as the results will be:
    // sum's float32 output would convert all of dG first, at ten times the cost.
    const auto f32 = d.options().dtype(at::kFloat);
    return {at::mm(d2.t(), prev).to(at::kFloat),
            has_bias ? d2.sum(0).to(at::kFloat) : at::empty({0}, f32)};
  }
  using Bf16 = at::BFloat16;
  const auto segs = cpu::recurrent_grad_rows(d.data_ptr<Bf16>(), out.data_ptr<Bf16>(),
                                             h.data_ptr<Bf16>(), T, B, H, G, reverse);
  return cpu::weight_grad_bf16(segs, G, H, has_bias, d.options().dtype(at::kFloat));
}
#endif

// Note [the bfloat16 backward]
// With the bfloat16 kernels (AVX512-BF16), the backward's step product
// dG_t W_hh runs on bfloat16 gate gradients, as torch.nn's bfloat16 layers
// round theirs: W_hh in k pairs, vdpbf16ps, float32 accumulation, and the
// pointwise backward, the cell state's gradient and the hidden state's
// carried between steps in float32. The weight gradients come from the same
// bfloat16 gate gradients. Before, the step product ran in float32 on
// converted copies: the backward op at T=100 B=64 H=512 took 53.8 ms (LSTM)
// and 42.7 ms (GRU), now 35.3 and 26.4 ms (benchmarks/NOTES.md, "The bfloat16
// backward").
//
// Note [half types on the fused float32 path]
// Where no fused kernel reads a half type directly (float16, and bfloat16
// without AVX512-BF16), padded input without projection still takes the fused
// float32 path: operands converted once, results rounded once. More accurate
// than the generic loop, which rounds every step's matmul to the half type, and
// several times faster. Returns the float32 kernels, or null.
const cpu::FusedF32* fused_via_f32_for(const at::Tensor& x, bool packed, bool proj) {
  const auto dt = x.scalar_type();
  return (dt == at::kHalf || dt == at::kBFloat16) && !packed && !proj ? cpu::fused_f32() : nullptr;
}

// Copies to and from float32 for that path, large ones in step buffers: the
// conversions of a training step's saved tensors are tens of MB, which
// fresh allocations would page in (zero-fill) on every call.
at::Tensor converted(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype) return t;
  at::Tensor out = cpu::empty_for_steps(t.sizes(), t.options().dtype(dtype));
  out.copy_(t);
  return out;
}
at::Tensor f32(const at::Tensor& t) { return converted(t, at::kFloat); }

// Input without projection takes a fused path (x86/fused.h) where the CPU has
// it: float32 on AVX-512 or AVX2, float64 on AVX-512, and bfloat16 on
// AVX512-BF16; the forward padded or packed, the backward padded; everything
// else the generic loop.

// Packed input's batch_sizes for the fused forwards; empty for padded input.
c10::IntArrayRef fused_batch_sizes(const Schedule& s, bool packed) {
  return packed ? c10::IntArrayRef(s.sizes) : c10::IntArrayRef();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward_cpu(
    const at::Tensor& x_proj, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
    const OptTensor& w_hr, const OptTensor& b_hh, const OptTensor& batch_sizes, bool reverse,
    bool train) {
  const NoAutocast no_autocast;
  const auto checked = lstm_check_forward(x_proj, h0, c0, w_hh, w_hr, b_hh, batch_sizes, reverse);
  const bool packed = batch_sizes.has_value(), proj = w_hr.has_value();
  const c10::IntArrayRef sizes = fused_batch_sizes(std::get<0>(checked), packed);
  const auto run = [&](const auto* ops) {
    const int64_t G = kLstmGates * std::get<1>(checked);
    return ops->lstm_forward(x_proj, h0, c0, w_hh, detail::defined_or_zeros(b_hh, G, x_proj),
                             reverse, train, sizes);
  };
  if (auto r = fused_run(x_proj, !proj, run)) return *r;
#ifdef FUSEDRNN_X86
  if (fused_bf16_ok(x_proj, proj, std::get<1>(checked))) {
    const int64_t G = kLstmGates * std::get<1>(checked);
    return cpu::lstm_forward_fused_bf16(x_proj, h0, c0, w_hh,
                                        detail::defined_or_zeros(b_hh, G, x_proj), reverse, train,
                                        sizes, amx_steps(h0.size(0)));
  }
#endif
  if (const auto* ops = fused_via_f32_for(x_proj, packed, proj)) {
    const int64_t G = kLstmGates * std::get<1>(checked);
    const auto dt = x_proj.scalar_type();
    auto [out, h_n, c_n, gates, cells] = ops->lstm_forward(
        f32(x_proj), f32(h0), f32(c0), f32(w_hh), f32(detail::defined_or_zeros(b_hh, G, x_proj)),
        reverse, train, {});
    return {converted(out, dt), h_n.to(dt), c_n.to(dt), converted(gates, dt), cells};
  }
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
  lstm_check_backward(grad_output, grad_h_n, grad_c_n, output, gates, cells, h0, c0, w_hh, w_hr,
                      batch_sizes, reverse, "fusedrnn::lstm_backward");  // before any path
  const bool packed = batch_sizes.has_value(), proj = w_hr.has_value();
  const auto run = [&](const auto* ops) {
    return ops->lstm_backward(grad_output, grad_h_n, grad_c_n, output, gates, cells, h0, c0, w_hh,
                              reverse, has_bias, true);
  };
  if (auto r = fused_run(grad_output, !packed && !proj && grad_output.dim() == 3, run)) return *r;
#ifdef FUSEDRNN_X86
  if (!packed && grad_output.dim() == 3 && fused_bf16_ok(grad_output, proj, w_hh.size(1))) {
    const auto dt = grad_output.scalar_type();  // Note [the bfloat16 backward]
    auto [dx, dh0, dc0, dw, dw_hr, db] = cpu::lstm_backward_fused_bf16(
        grad_output, f32(grad_h_n), f32(grad_c_n), gates, cells, f32(c0), w_hh, reverse,
        amx_steps(grad_output.size(1)));
    std::tie(dw, db) = recurrent_weight_grads_bf16(dx, output, h0, reverse, has_bias);
    return {dx, dh0.to(dt), dc0.to(dt), dw.to(dt), dw_hr, db.to(dt)};
  }
#endif
  const auto* ops = fused_via_f32_for(grad_output, packed, proj);
  if (ops && grad_output.dim() == 3) {
    const auto dt = grad_output.scalar_type();
    const bool bf16_w = dt == at::kBFloat16 && bf16_kernels_run();
    auto [dx, dh0, dc0, dw, dw_hr, db] = ops->lstm_backward(
        f32(grad_output), f32(grad_h_n), f32(grad_c_n), f32(output), f32(gates), cells, f32(h0),
        f32(c0), f32(w_hh), reverse, has_bias, !bf16_w);
    const at::Tensor d_x = converted(dx, dt);
#ifdef FUSEDRNN_X86
    if (bf16_w) {  // dW_hh from the rounded dG, as the input projection's dW_ih
      std::tie(dw, db) = recurrent_weight_grads_bf16(d_x, output, h0, reverse, has_bias);
    }
#endif
    return {d_x, dh0.to(dt), dc0.to(dt), dw.to(dt), dw_hr.to(dt), db.to(dt)};
  }
  return lstm_backward_impl<CpuKernels>(grad_output, grad_h_n, grad_c_n, output, gates, cells, h0,
                                        c0, w_hh, w_hr, batch_sizes, reverse, has_bias);
}

// Note [one product for both weight gradients]
// An LSTM layer's dW_ih = dG^T x and dW_hh = dG^T h_{t-1} read the same gate
// gradients dG (the projection's output gradient is dG itself). The backward
// of lstm_input_forward (a training step's layer) forms both in one product
// over X = [x | h_{t-1}] (N = I + H, x86/fused.h's layer_grad_rows): dG is
// read and packed once, its column sums (db_ih = db_hh) taken once. The sums
// run over the same rows in the same order and k blocks as the two products'
// (recurrent_grad_rows in dG's row order), so the gradients are theirs bit
// for bit. Where ATen's mm takes the products (up to mm_grad_rows() rows) or
// they are sums of a few outer products (kFewGradRows), or no fused float
// path runs, the two ops run as they are. 2-core Xeon with
// AMX, float32, the backward of a layer (T=100 unless said) as one op and as
// two, in one process, in a random order each round, two runs: I=H=256 B=8
// 0.972 and 0.986 of the time, B=16 0.987 and 0.993; T=25 I=H=512 B=32 0.973
// and 0.959; I=H=512 B=64 0.987 and 0.982. (The GRU's two products read
// different gradients: dW_ih the projection's, dW_hh those through W_hh.)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_input_backward_cpu(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                        const at::Tensor& grad_c_n, const at::Tensor& input,
                        const at::Tensor& output, const at::Tensor& gates,
                        const at::Tensor& cells, const at::Tensor& h0, const at::Tensor& c0,
                        const at::Tensor& w_ih, const at::Tensor& w_hh, bool reverse,
                        bool has_bias, bool input_grad, bool w_ih_grad, bool b_ih_grad) {
  const NoAutocast no_autocast;
  const char* op = "fusedrnn::lstm_input_backward";
  const auto by_ops = [&] {
    return lstm_input_backward_by_ops(grad_output, grad_h_n, grad_c_n, input, output, gates,
                                      cells, h0, c0, w_ih, w_hh, reverse, has_bias, input_grad,
                                      w_ih_grad, b_ih_grad);
  };
  const bool rows_3d = grad_output.dim() == 3 && input.dim() == 3;
  if (!w_ih_grad || !rows_3d || input.numel() == 0 || grad_output.numel() == 0 ||
      grad_output.size(0) * grad_output.size(1) <=
          std::max(cpu::kFewGradRows, cpu::mm_grad_rows())) {
    return by_ops();
  }
  lstm_check_backward(grad_output, grad_h_n, grad_c_n, output, gates, cells, h0, c0, w_hh,
                      c10::nullopt, c10::nullopt, reverse, op);
  check_linear(input, w_ih, c10::nullopt, op);
  check_same(grad_output, input, op, "input", "grad_output");
  const int64_t T = grad_output.size(0), B = grad_output.size(1), I = input.size(2);
  const int64_t H = w_hh.size(1), G = kLstmGates * H;
  check_shape(input, {T, B, I}, op, "input");
  check_shape(w_ih, {G, I}, op, "w_ih");
  const auto run = [&](const auto* ops) {
    using E = typename std::remove_pointer_t<decltype(ops)>::Elem;
    auto [dg, d_h0, d_c0, unused_w, unused_w_hr, unused_b] = ops->lstm_backward(
        grad_output, grad_h_n, grad_c_n, output, gates, cells, h0, c0, w_hh, reverse, has_bias,
        false);
    const at::Tensor none = at::empty({0}, grad_output.options());
    const at::Tensor dg2 = dg.view({T * B, G}), x = input.contiguous();
    const at::Tensor out = output.contiguous(), h = h0.contiguous();
    const at::Tensor d_x =
        input_grad ? ops->linear_input_grad(dg2, w_ih.contiguous()).view(input.sizes()) : none;
    auto [d_w_ih, d_w_hh, db] = ops->weight_grad_blocks(
        cpu::layer_grad_rows(dg2.data_ptr<E>(), x.data_ptr<E>(), out.data_ptr<E>(),
                             h.data_ptr<E>(), T, B, I, H, G, reverse),
        G, I + H, has_bias || b_ih_grad, grad_output.options());
    // Two gradients, two tensors: autograd may keep each as a .grad.
    const at::Tensor d_b_ih = b_ih_grad ? (has_bias ? db.clone() : db) : none;
    return std::make_tuple(d_x, d_h0, d_c0, d_w_ih, d_w_hh, d_b_ih, has_bias ? db : none);
  };
  if (auto r = fused_run(grad_output, true, run)) return *r;
  return by_ops();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_forward_cpu(
    const at::Tensor& x_proj, const at::Tensor& h0, const at::Tensor& w_hh, const OptTensor& b_hh,
    const OptTensor& batch_sizes, bool reverse, bool reset_after, bool train) {
  const NoAutocast no_autocast;
  const auto checked =
      gru_check_forward(x_proj, h0, w_hh, b_hh, batch_sizes, reverse, reset_after);
  const bool packed = batch_sizes.has_value();
  const c10::IntArrayRef sizes = fused_batch_sizes(std::get<0>(checked), packed);
  const auto run = [&](const auto* ops) {
    const int64_t G = kGruGates * std::get<1>(checked);
    return ops->gru_forward(x_proj, h0, w_hh, detail::defined_or_zeros(b_hh, G, x_proj), reverse,
                            train, sizes);
  };
  if (auto r = fused_run(x_proj, reset_after, run)) return *r;
#ifdef FUSEDRNN_X86
  if (reset_after && fused_bf16_ok(x_proj, false, std::get<1>(checked))) {
    const int64_t G = kGruGates * std::get<1>(checked);
    return cpu::gru_forward_fused_bf16(x_proj, h0, w_hh,
                                       detail::defined_or_zeros(b_hh, G, x_proj), reverse, train,
                                       sizes, amx_steps(h0.size(0)));
  }
#endif
  const auto* ops = fused_via_f32_for(x_proj, packed, false);
  if (reset_after && ops) {
    const int64_t G = kGruGates * std::get<1>(checked);
    const auto dt = x_proj.scalar_type();
    auto [out, h_n, gates] =
        ops->gru_forward(f32(x_proj), f32(h0), f32(w_hh),
                         f32(detail::defined_or_zeros(b_hh, G, x_proj)), reverse, train, {});
    return {converted(out, dt), h_n.to(dt), converted(gates, dt)};
  }
  return gru_forward_impl<CpuKernels>(x_proj, h0, w_hh, b_hh, batch_sizes, reverse, reset_after,
                                      train);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& output,
    const at::Tensor& gates, const at::Tensor& h0, const at::Tensor& w_hh,
    const OptTensor& batch_sizes, bool reverse, bool reset_after, bool has_bias) {
  const NoAutocast no_autocast;
  gru_check_backward(grad_output, grad_h_n, output, gates, h0, w_hh, batch_sizes, reverse,
                     "fusedrnn::gru_backward");  // before any path
  const bool packed = batch_sizes.has_value();
  using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  const auto run = [&](const auto* ops) -> Grads {
    auto [dx, dh0, dw, db, dhh] =
        ops->gru_backward(grad_output, grad_h_n, output, gates, h0, w_hh, reverse, has_bias, true);
    return {dx, dh0, dw, db};
  };
  if (auto r = fused_run(grad_output, !packed && reset_after && grad_output.dim() == 3, run)) {
    return *r;
  }
#ifdef FUSEDRNN_X86
  if (!packed && reset_after && grad_output.dim() == 3 &&
      fused_bf16_ok(grad_output, false, w_hh.size(1))) {
    const auto dt = grad_output.scalar_type();  // Note [the bfloat16 backward]
    const int64_t T = grad_output.size(0), B = grad_output.size(1);
    auto [dx, dh0, dw, db, dhh] =
        cpu::gru_backward_fused_bf16(grad_output, f32(grad_h_n), output, gates, h0, w_hh, reverse,
                                     amx_steps(B));
    std::tie(dw, db) =
        recurrent_weight_grads_bf16(dhh.view({T, B, -1}), output, h0, reverse, has_bias);
    return {dx, dh0.to(dt), dw.to(dt), db.to(dt)};
  }
#endif
  const auto* ops = fused_via_f32_for(grad_output, packed, false);
  if (reset_after && ops && grad_output.dim() == 3) {
    const auto dt = grad_output.scalar_type();
    const bool bf16_w = dt == at::kBFloat16 && bf16_kernels_run();
    auto [dx, dh0, dw, db, dhh] =
        ops->gru_backward(f32(grad_output), f32(grad_h_n), f32(output), f32(gates), f32(h0),
                          f32(w_hh), reverse, has_bias, !bf16_w);
#ifdef FUSEDRNN_X86
    if (bf16_w) {  // dW_hh from the rounded gradients, as the LSTM's
      const int64_t T = grad_output.size(0), B = grad_output.size(1);
      std::tie(dw, db) = recurrent_weight_grads_bf16(converted(dhh, dt).view({T, B, -1}), output,
                                                     h0, reverse, has_bias);
    }
#endif
    return {converted(dx, dt), dh0.to(dt), dw.to(dt), db.to(dt)};
  }
  return gru_backward_impl<CpuKernels>(grad_output, grad_h_n, output, gates, h0, w_hh,
                                       batch_sizes, reverse, reset_after, has_bias);
}

// f(ops) with the fused kernels for a [M, K] times w [N, K] (float32 or
// float64, on the CPU, both of one dtype); or nullopt where none runs.
template <typename F>
auto with_linear_ops(const at::Tensor& a, const at::Tensor& w, const F& f) {
  using R = decltype(cpu::with_fused_ops(a.scalar_type(), f));
  if (!a.device().is_cpu()) return R();
  const bool ok = a.numel() > 0 && w.scalar_type() == a.scalar_type();
  return cpu::with_fused_ops(ok ? a.scalar_type() : at::ScalarType::Undefined, f);
}

#ifdef FUSEDRNN_X86
// Whether a [M, K] times w [N, K] (+ bias) is a non-empty bfloat16 product
// on the CPU.
bool bf16_product(const at::Tensor& a, const at::Tensor& w, const OptTensor& bias) {
  const auto bf16 = at::kBFloat16;
  return a.device().is_cpu() && a.scalar_type() == bf16 && w.scalar_type() == bf16 &&
         !(bias.has_value() && bias->scalar_type() != bf16) && a.numel() > 0;
}

// The bfloat16 projection (x86/fused.h): AVX512-BF16 with the AVX-512 path
// in force, an even K (k-pairs). With AMX, oneDNN's matmul (linear_any).
bool linear_bf16_ok(const at::Tensor& a, const at::Tensor& w, const OptTensor& bias) {
  return bf16_product(a, w, bias) && a.size(-1) % 2 == 0 && bf16_kernels_run() && !amx_runs();
}
#endif

// Note [half-type products on the AVX2 path]
// A CPU with AVX2 but no AVX-512 has no instruction for bfloat16 or float16
// products, and ATen's matmul in those types runs at a few GFLOP/s there:
// [800, 1024] x [1024, 256] took 190 ms in bfloat16 and 170 ms in float16
// against 3.8 ms in float32 (2-core AMD EPYC without AVX-512), and a
// bfloat16 training step spent 87% of its time in the projection's
// gradients. So, as the recurrences (Note [half types on the fused float32
// path]), a half-type projection and its gradients run on the float32
// kernels there: operands converted exactly, sums in float32, each result
// rounded once, as ATen's half-type matmuls round theirs. a: an operand of a
// checked product (all of one dtype and device).
bool half_product_via_f32(const at::Tensor& a) {
  const auto dt = a.scalar_type();
  return a.device().is_cpu() && (dt == at::kBFloat16 || dt == at::kHalf) &&
         cpu_isa() == CpuIsa::kAvx2;
}

// The input projection: our GEMM for float32 (float64, bfloat16) on CPUs with
// a fused path, else ATen's. Any device (registered as
// CompositeExplicitAutograd).
at::Tensor linear_any(const at::Tensor& input, const at::Tensor& weight,
                      const OptTensor& bias) {
  const NoAutocast no_autocast;
  check_linear(input, weight, bias, "fusedrnn::linear");
  if (half_product_via_f32(input)) {
    const OptTensor b = bias.has_value() ? OptTensor(f32(*bias)) : c10::nullopt;
    return linear_any(f32(input), f32(weight), b).to(input.scalar_type());
  }
  const auto y = with_linear_ops(input, weight, [&](const auto* ops) {
    auto out_shape = input.sizes().vec();
    out_shape.back() = weight.size(0);
    const at::Tensor x2 = input.reshape({-1, input.size(-1)}).contiguous();
    return ops->linear(x2, weight.contiguous(), bias).view(out_shape);
  });
  if (y) return *y;
#ifdef FUSEDRNN_X86
  if (linear_bf16_ok(input, weight, bias)) {
    auto out_shape = input.sizes().vec();
    out_shape.back() = weight.size(0);
    const at::Tensor x2 = input.reshape({-1, input.size(-1)}).contiguous();
    return cpu::linear_fused_bf16(x2, weight.contiguous(), bias).view(out_shape);
  }
  if (bf16_product(input, weight, bias) && amx_runs()) {
    // oneDNN's matmul (AMX) into a step buffer: at::linear's fresh output of
    // tens of MB page-faulted in on every call, a third of its time.
    auto out_shape = input.sizes().vec();
    out_shape.back() = weight.size(0);
    const at::Tensor x2 = input.reshape({-1, input.size(-1)});
    at::Tensor y = cpu::empty_for_steps({x2.size(0), weight.size(0)}, input.options());
    if (bias.has_value()) {
      y.copy_(bias->expand_as(y));
      y.addmm_(x2, weight.t());
    } else {
      at::mm_out(y, x2, weight.t());
    }
    return y.view(out_shape);
  }
#endif
  return at::linear(input, weight, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward_any(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight, bool input_grad,
    bool weight_grad, bool bias_grad) {
  const NoAutocast no_autocast;
  check_linear_backward(grad, input, weight, "fusedrnn::linear_backward");
  if (half_product_via_f32(grad)) {
    const auto dt = grad.scalar_type();  // Note [half-type products on the AVX2 path]
    // An operand no asked-for gradient reads gives only its shape.
    const auto read_as_f32 = [](const at::Tensor& t, bool read) {
      return read ? f32(t) : at::empty(t.sizes(), t.options().dtype(at::kFloat));
    };
    const auto [dx, dw, db] =
        linear_backward_any(f32(grad), read_as_f32(input, weight_grad),
                            read_as_f32(weight, input_grad), input_grad, weight_grad, bias_grad);
    return {dx.to(dt), dw.to(dt), db.to(dt)};
  }
  // Rows counted, not inferred: reshape cannot infer them where a row is empty.
  const int64_t rows = c10::multiply_integers(input.sizes().slice(0, input.dim() - 1));
  const at::Tensor g2 = grad.reshape({rows, grad.size(-1)}).contiguous();
  const at::Tensor x2 = input.reshape({rows, input.size(-1)});
  const at::Tensor none = at::empty({0}, grad.options());
  if (grad.numel() == 0 || input.numel() == 0 || weight.numel() == 0) {
    // ATen's products: zero (or empty) gradients, and the bias's row sums.
    return {input_grad ? at::mm(g2, weight).view(input.sizes()) : none,
            weight_grad ? at::mm(g2.t(), x2) : none, bias_grad ? g2.sum(0) : none};
  }
  at::Tensor dx = none, dw = none, db = none;
  if (input_grad) {
    const auto d = with_linear_ops(
        g2, weight, [&](const auto* ops) { return ops->linear_input_grad(g2, weight.contiguous()); });
    dx = (d ? *d : at::mm(g2, weight)).view(input.sizes());
  }
  if (weight_grad) {
    // Our weight-gradient GEMM where a fused path runs (Note [weight-gradient
    // GEMM] in x86/weight_grad.h), else MKL's.
    const auto wb = with_linear_ops(g2, weight, [&](const auto* ops) {
      using T = typename std::remove_pointer_t<decltype(ops)>::Elem;
      const at::Tensor xc = x2.contiguous();
      return ops->weight_grad({{g2.data_ptr<T>(), xc.data_ptr<T>(), g2.size(0)}}, g2.size(1),
                              xc.size(1), bias_grad, g2.options());
    });
    if (wb) return {dx, wb->first, bias_grad ? wb->second : none};
#ifdef FUSEDRNN_X86
    const auto bf16 = at::kBFloat16;
    if (g2.device().is_cpu() && g2.scalar_type() == bf16 && input.scalar_type() == bf16 &&
        g2.numel() > 0 && bf16_kernels_run() && !amx_runs()) {
      const at::Tensor xc = x2.contiguous();
      auto [w, b] = cpu::weight_grad_bf16({{g2.data_ptr<at::BFloat16>(),
                                             xc.data_ptr<at::BFloat16>(), g2.size(0)}},
                                          g2.size(1), xc.size(1), bias_grad,
                                          g2.options().dtype(at::kFloat));
      return {dx, w.to(bf16), bias_grad ? b.to(bf16) : none};
    }
#endif
  }
  if (weight_grad) dw = at::mm(g2.t(), x2);
  if (bias_grad) db = g2.sum(0);
  return {dx, dw, db};
}

// The CPU path in force: "avx512", "avx2" or "generic" (Note [choosing the
// CPU path]). For tests and benchmark records.
std::string cpu_path() { return cpu_isa_name(cpu_isa()); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedrnn, m) {
  m.def("_cpu_isa() -> str", &cpu_path);
}

namespace cpu {
const FusedF32* fused_f32() {
  switch (cpu_isa()) {
#ifdef FUSEDRNN_X86
    case CpuIsa::kAmx:
    case CpuIsa::kAvx512:
      return &kFusedAvx512;
    case CpuIsa::kAvx2:
      return &kFusedAvx2;
#endif
    default:
      return nullptr;
  }
}
const FusedF64* fused_f64() {
#ifdef FUSEDRNN_X86
  const CpuIsa isa = cpu_isa();
  if (avx512_path(isa)) return &kFusedAvx512F64;
  if (isa == CpuIsa::kAvx2) return &kFusedAvx2F64;
#else
  (void)cpu_isa();  // a bad knob raises here too
#endif
  return nullptr;
}
}  // namespace cpu

TORCH_LIBRARY_IMPL(fusedrnn, CompositeExplicitAutograd, m) {
  m.impl("linear", &linear_any);
  m.impl("linear_backward", &linear_backward_any);
}

TORCH_LIBRARY_IMPL(fusedrnn, CPU, m) {
  m.impl("lstm_forward", &lstm_forward_cpu);
  m.impl("lstm_backward", &lstm_backward_cpu);
  m.impl("lstm_input_backward", &lstm_input_backward_cpu);
  m.impl("gru_forward", &gru_forward_cpu);
  m.impl("gru_backward", &gru_backward_cpu);
}

}  // namespace fusedrnn
