// Host side of the persistent recurrence (phases.h): argument checks,
// outputs, the layout, and the weight gradients, shared by the CUDA launcher
// (persistent.cu) and the CPU emulator (emulate.cpp). `R` runs the time loop:
//
//   R::max_blocks(device)              blocks that can be co-resident
//   R::smem_bytes(device)              shared memory one block may use
//   R::tensor_cores(device)            whether kTensorCore can run there
//   R::template forward<G, kMode>(args, device)
//   R::template backward<G, kMode>(args, device)
//
// The ops return exactly what lstm_forward/gru_forward (and their backward)
// return, so either path's forward pairs with either path's backward.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <initializer_list>
#include <tuple>
#include <vector>

#include "../recurrence.h"
#include "args.h"
#include "layout.h"

namespace fusedrnn {
namespace persistent {

// mode: kAutoMode (-1) picks: tensor cores for fp16/bf16, and for fp32 when
// TF32 is allowed (allow_tf32: the flag that governs cuBLAS's fp32 matmuls
// too); SIMT for strict fp32 and fp64.
inline int resolve_mode(int64_t mode, at::ScalarType dtype, bool tensor_cores, bool allow_tf32,
                        const char* op) {
  TORCH_CHECK(mode >= kAutoMode && mode <= kTensorCore, op,
              ": mode must be -1 (auto), 0 (SIMT) or 1 (tensor cores), got ", mode);
  if (mode == kAutoMode) {
    const bool tc =
        dtype == at::kHalf || dtype == at::kBFloat16 || (dtype == at::kFloat && allow_tf32);
    return tc && tensor_cores ? kTensorCore : kSimt;
  }
  TORCH_CHECK(mode == kSimt || dtype != at::kDouble, op,
              ": tensor cores do not take float64; use mode 0");
  TORCH_CHECK(mode == kSimt || tensor_cores, op,
              ": tensor-core mode needs compute capability 8.0 or newer");
  return int(mode);
}

// The layout for these sizes on `device`, or an undefined one (blocks == 0)
// when a block's slice of W_hh does not fit in its shared memory.
template <typename R>
Layout fit_layout(int64_t H, int64_t B, int G, bool backward, int mode, at::ScalarType dtype,
                  int64_t max_blocks, const at::Device& device, int64_t max_chunk = 0) {
  const int64_t blocks =
      max_blocks > 0 ? std::min<int64_t>(max_blocks, R::max_blocks(device)) : R::max_blocks(device);
  const int64_t limit = R::smem_bytes(device);
  const Layout L = make_layout(H, B, G, backward, mode, c10::elementSize(dtype),
                               c10::elementSize(acc_dtype(dtype)), blocks, limit, max_chunk);
  return L.bytes <= limit ? L : Layout{};
}

// Packed input: [2, T] int64 on `device`, batch sizes then offsets, copied
// from pinned memory without a stream sync (a pageable copy would make the
// host wait for all queued GPU work at every call). Padded input needs none
// (step_info's null schedule), so nothing is copied and the call stays
// capturable in a CUDA graph.
inline Tensor schedule_tensor(const Schedule& s, bool packed, const at::Device& device) {
  if (!packed) return Tensor();
  std::vector<int64_t> v(s.sizes);
  v.insert(v.end(), s.offsets.begin(), s.offsets.end());
  const Tensor host = at::tensor(v, at::kLong);
  return device.is_cpu() ? host : host.pin_memory().to(device, /*non_blocking=*/true);
}

// Rows of row_elems elements, starting at each of ptrs, can be staged 16
// bytes at a time (ForwardArgs::vec, BackwardArgs::vec).
inline bool vec_ok(int64_t row_elems, int64_t elt, std::initializer_list<const void*> ptrs) {
  if (row_elems * elt % 16 != 0) return false;
  for (const void* p : ptrs) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

// Bytes per asynchronous copy (in_copy) for segments of a block's `units`
// elements of `elt` bytes, starting at any of `bases` plus multiples of H and
// of units elements: the widest of 16, 8 and 4 bytes (one element at least)
// that they all align to, or 0 (element by element).
inline int copy_width(int64_t units, int64_t H, int64_t elt,
                      std::initializer_list<const void*> bases) {
  for (int w : {16, 8, 4}) {
    bool ok = w >= elt && units * elt % w == 0 && H * elt % w == 0;
    for (const void* p : bases) ok = ok && reinterpret_cast<uintptr_t>(p) % w == 0;
    if (ok) return w;
  }
  return 0;
}

// The staging widths of the pointwise phase's inputs (Note [inputs staged
// with the chunk] in phases.h).
template <int G, typename scalar_t, typename acc_t>
void set_input_copies(ForwardArgs<scalar_t, acc_t>& a) {
  const auto* state = running_state<G>(a);
  a.in_copy[kInX] = copy_width(a.L.units, a.H, sizeof(scalar_t), {a.x});
  a.in_copy[kInState] = copy_width(a.L.units, a.H, sizeof(*state), {state});
}

template <int G, typename scalar_t, typename acc_t>
void set_input_copies(BackwardArgs<scalar_t, acc_t>& a) {
  const int64_t u = a.L.units, H = a.H, elt = sizeof(scalar_t);
  a.in_copy[kInGates] = copy_width(u, H, elt, {a.gates});
  a.in_copy[kInGrad] = copy_width(u, H, elt, {a.grad_out});
  if constexpr (G == kLstmGates) {
    a.in_copy[kInPrev] = copy_width(u, H, sizeof(acc_t), {a.cells, a.c0});
    a.in_copy[kInCell] = copy_width(u, H, sizeof(acc_t), {a.cells});
  } else {
    a.in_copy[kInPrev] = copy_width(u, H, elt, {a.out, a.h0});
  }
}

inline const int64_t* sizes_ptr(const Tensor& sched) {
  return sched.defined() ? sched.data_ptr<int64_t>() : nullptr;
}

inline const int64_t* offsets_ptr(const Tensor& sched, const Schedule& s) {
  return sched.defined() ? sched.data_ptr<int64_t>() + s.T : nullptr;
}

template <typename R>
Layout checked_layout(int64_t H, int64_t B, int G, bool backward, int mode, at::ScalarType dtype,
                      int64_t max_blocks, int64_t max_chunk, const at::Device& device,
                      const char* op) {
  const Layout L = fit_layout<R>(H, B, G, backward, mode, dtype, max_blocks, device, max_chunk);
  TORCH_CHECK(L.blocks > 0, op, ": a block's slice of W_hh does not fit in shared memory ",
              "(hidden_size ", H, ", batch ", B, ", ", dtype, "); use the step-wise path");
  return L;
}

// The fields every kernel argument struct shares.
template <typename Args, typename Ptr>
void fill_common(Args& a, const Layout& L, const Schedule& s, int64_t H, bool reverse,
                 const Tensor& sched, Ptr w_hh) {
  a.L = L;
  a.steps = s.T;
  a.B = s.B;
  a.H = H;
  a.reverse = reverse;
  a.sizes = sizes_ptr(sched);
  a.offsets = offsets_ptr(sched, s);
  a.w_hh = w_hh;
}

#define FUSEDRNN_DISPATCH_MODE(mode, ...) \
  if (mode == kTensorCore) {              \
    constexpr int kMode = kTensorCore;    \
    __VA_ARGS__();                        \
  } else {                                \
    constexpr int kMode = kSimt;          \
    __VA_ARGS__();                        \
  }

// Same arguments and results as lstm_forward without w_hr.
template <typename R>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward(
    const Tensor& x_proj, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
    const OptTensor& b_hh, const OptTensor& batch_sizes, bool reverse, bool train,
    int64_t max_blocks, int64_t max_chunk, int64_t mode_arg, bool allow_tf32) {
  constexpr const char* op = "fusedrnn::_persistent_lstm_forward";
  const auto checked =
      lstm_check_forward(x_proj, h0, c0, w_hh, c10::nullopt, b_hh, batch_sizes, reverse);
  const Schedule& s = std::get<0>(checked);
  const int64_t H = std::get<1>(checked);
  const auto dtype = x_proj.scalar_type();
  const auto device = x_proj.device();
  const int mode = resolve_mode(mode_arg, dtype, R::tensor_cores(device), allow_tf32, op);
  const Layout L =
      checked_layout<R>(H, s.B, kLstmGates, false, mode, dtype, max_blocks, max_chunk, device, op);

  const Tensor x = x_proj.contiguous();
  const Tensor w = w_hh.contiguous();
  const Tensor bias = b_hh.has_value() ? b_hh->contiguous() : Tensor();
  const Tensor sched = schedule_tensor(s, batch_sizes.has_value(), device);
  const Tensor h0c = h0.contiguous();
  Tensor h = h0c.clone();
  Tensor c = c0.to(acc_dtype(dtype)).contiguous().clone();
  Tensor out = at::empty({s.N, H}, x.options());
  Tensor gates = at::empty({train ? s.N : 0, kLstmGates * H}, x.options());
  Tensor cells = at::empty({train ? s.N : 0, H}, x.options().dtype(acc_dtype(dtype)));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "persistent_lstm_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ForwardArgs<scalar_t, acc_t> a;
    fill_common(a, L, s, H, reverse, sched, w.data_ptr<scalar_t>());
    a.x = x.data_ptr<scalar_t>();
    a.b_hh = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    a.h0 = h0c.data_ptr<scalar_t>();
    a.out = out.data_ptr<scalar_t>();
    a.h = h.data_ptr<scalar_t>();
    a.c = c.data_ptr<acc_t>();
    a.gates = train ? gates.data_ptr<scalar_t>() : nullptr;
    a.cells = train ? cells.data_ptr<acc_t>() : nullptr;
    a.vec = vec_ok(H, sizeof(scalar_t), {a.out, a.h0});
    set_input_copies<kLstmGates>(a);
    FUSEDRNN_DISPATCH_MODE(mode, [&] { R::template forward<kLstmGates, kMode>(a, device); });
  });
  out = out.view(detail::with_last(x_proj.sizes(), H));
  return {out, h, c.to(dtype), gates, cells};
}

// Same arguments and results as lstm_backward without w_hr.
template <typename R>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& output,
    const Tensor& gates, const Tensor& cells, const Tensor& h0, const Tensor& c0,
    const Tensor& w_hh, const OptTensor& batch_sizes, bool reverse, bool has_bias,
    int64_t max_blocks, int64_t max_chunk, int64_t mode_arg, bool allow_tf32) {
  constexpr const char* op = "fusedrnn::_persistent_lstm_backward";
  const int64_t H = w_hh.size(0) / kLstmGates;
  TORCH_CHECK(w_hh.size(1) == H, op, ": w_hh must be [4H, H] (no projection)");
  const Schedule s = lstm_check_backward(grad_output, grad_h_n, grad_c_n, output, gates, cells,
                                         h0, c0, w_hh, c10::nullopt, batch_sizes, reverse, op);
  const auto dtype = grad_output.scalar_type();
  const auto acc = acc_dtype(dtype);
  const auto device = grad_output.device();
  const int mode = resolve_mode(mode_arg, dtype, R::tensor_cores(device), allow_tf32, op);
  const Layout L =
      checked_layout<R>(H, s.B, kLstmGates, true, mode, dtype, max_blocks, max_chunk, device, op);

  const Tensor g_out = grad_output.contiguous().view({s.N, H});
  const Tensor out = output.contiguous().view({s.N, H});
  const Tensor gts = gates.contiguous();
  const Tensor cls = cells.contiguous();
  const Tensor c0a = c0.to(acc).contiguous();
  const Tensor w = w_hh.contiguous();
  const Tensor sched = schedule_tensor(s, batch_sizes.has_value(), device);
  Tensor dh = grad_h_n.to(acc).contiguous().clone();
  Tensor dc = grad_c_n.to(acc).contiguous().clone();
  Tensor dg = at::empty({s.N, kLstmGates * H}, grad_output.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "persistent_lstm_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BackwardArgs<scalar_t, acc_t> a;
    fill_common(a, L, s, H, reverse, sched, w.data_ptr<scalar_t>());
    a.grad_out = g_out.data_ptr<scalar_t>();
    a.gates = gts.data_ptr<scalar_t>();
    a.cells = cls.data_ptr<acc_t>();
    a.c0 = c0a.data_ptr<acc_t>();
    a.dh = dh.data_ptr<acc_t>();
    a.dc = dc.data_ptr<acc_t>();
    a.dg = dg.data_ptr<scalar_t>();
    a.vec = vec_ok(kLstmGates * H, sizeof(scalar_t), {a.dg});
    set_input_copies<kLstmGates>(a);
    FUSEDRNN_DISPATCH_MODE(mode, [&] { R::template backward<kLstmGates, kMode>(a, device); });
  });

  const auto wg =
      lstm_weight_grads(dg, Tensor(), out, h0, gts, cls, s, batch_sizes.has_value(), has_bias);
  Tensor d_x = dg.view(detail::with_last(grad_output.sizes(), kLstmGates * H));
  return {d_x, dh.to(dtype), dc.to(dtype), std::get<0>(wg), std::get<1>(wg), std::get<2>(wg)};
}

// Same arguments and results as gru_forward with reset_after.
template <typename R>
std::tuple<Tensor, Tensor, Tensor> gru_forward(const Tensor& x_proj, const Tensor& h0,
                                               const Tensor& w_hh, const OptTensor& b_hh,
                                               const OptTensor& batch_sizes, bool reverse,
                                               bool train, int64_t max_blocks, int64_t max_chunk,
                                               int64_t mode_arg, bool allow_tf32) {
  constexpr const char* op = "fusedrnn::_persistent_gru_forward";
  const auto checked = gru_check_forward(x_proj, h0, w_hh, b_hh, batch_sizes, reverse, true);
  const Schedule& s = std::get<0>(checked);
  const int64_t H = std::get<1>(checked);
  const auto dtype = x_proj.scalar_type();
  const auto device = x_proj.device();
  const int mode = resolve_mode(mode_arg, dtype, R::tensor_cores(device), allow_tf32, op);
  const Layout L =
      checked_layout<R>(H, s.B, kGruGates, false, mode, dtype, max_blocks, max_chunk, device, op);

  const Tensor x = x_proj.contiguous();
  const Tensor w = w_hh.contiguous();
  const Tensor bias = b_hh.has_value() ? b_hh->contiguous() : Tensor();
  const Tensor sched = schedule_tensor(s, batch_sizes.has_value(), device);
  const Tensor h0c = h0.contiguous();
  Tensor h = h0c.clone();
  Tensor out = at::empty({s.N, H}, x.options());
  Tensor gates = at::empty({train ? s.N : 0, kGruSaved * H}, x.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "persistent_gru_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ForwardArgs<scalar_t, acc_t> a;
    fill_common(a, L, s, H, reverse, sched, w.data_ptr<scalar_t>());
    a.x = x.data_ptr<scalar_t>();
    a.b_hh = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    a.h0 = h0c.data_ptr<scalar_t>();
    a.out = out.data_ptr<scalar_t>();
    a.h = h.data_ptr<scalar_t>();
    a.gates = train ? gates.data_ptr<scalar_t>() : nullptr;
    a.vec = vec_ok(H, sizeof(scalar_t), {a.out, a.h0});
    set_input_copies<kGruGates>(a);
    FUSEDRNN_DISPATCH_MODE(mode, [&] { R::template forward<kGruGates, kMode>(a, device); });
  });
  out = out.view(detail::with_last(x_proj.sizes(), H));
  return {out, h, gates};
}

// Same arguments and results as gru_backward with reset_after.
template <typename R>
std::tuple<Tensor, Tensor, Tensor, Tensor> gru_backward(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& output, const Tensor& gates,
    const Tensor& h0, const Tensor& w_hh, const OptTensor& batch_sizes, bool reverse, bool has_bias,
    int64_t max_blocks, int64_t max_chunk, int64_t mode_arg, bool allow_tf32) {
  constexpr const char* op = "fusedrnn::_persistent_gru_backward";
  const int64_t H = w_hh.size(1);
  const Schedule s = gru_check_backward(grad_output, grad_h_n, output, gates, h0, w_hh,
                                        batch_sizes, reverse, op);
  const auto dtype = grad_output.scalar_type();
  const auto device = grad_output.device();
  const int mode = resolve_mode(mode_arg, dtype, R::tensor_cores(device), allow_tf32, op);
  const Layout L =
      checked_layout<R>(H, s.B, kGruGates, true, mode, dtype, max_blocks, max_chunk, device, op);

  const Tensor g_out = grad_output.contiguous().view({s.N, H});
  const Tensor out = output.contiguous().view({s.N, H});
  const Tensor gts = gates.contiguous();
  const Tensor h0c = h0.contiguous();
  const Tensor w = w_hh.contiguous();
  const Tensor sched = schedule_tensor(s, batch_sizes.has_value(), device);
  Tensor dh = grad_h_n.to(acc_dtype(dtype)).contiguous().clone();
  Tensor dx = at::empty({s.N, kGruGates * H}, grad_output.options());
  Tensor dhh = at::empty({s.N, kGruGates * H}, grad_output.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "persistent_gru_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BackwardArgs<scalar_t, acc_t> a;
    fill_common(a, L, s, H, reverse, sched, w.data_ptr<scalar_t>());
    a.grad_out = g_out.data_ptr<scalar_t>();
    a.gates = gts.data_ptr<scalar_t>();
    a.out = out.data_ptr<scalar_t>();
    a.h0 = h0c.data_ptr<scalar_t>();
    a.dh = dh.data_ptr<acc_t>();
    a.dx = dx.data_ptr<scalar_t>();
    a.dhh = dhh.data_ptr<scalar_t>();
    a.vec = vec_ok(kGruGates * H, sizeof(scalar_t), {a.dhh});
    set_input_copies<kGruGates>(a);
    FUSEDRNN_DISPATCH_MODE(mode, [&] { R::template backward<kGruGates, kMode>(a, device); });
  });

  const auto wg = gru_weight_grads(dhh, out, h0c, gts, s, batch_sizes.has_value(), true, has_bias);
  Tensor d_x = dx.view(detail::with_last(grad_output.sizes(), kGruGates * H));
  return {d_x, dh.to(dtype), std::get<0>(wg), std::get<1>(wg)};
}

#undef FUSEDRNN_DISPATCH_MODE

}  // namespace persistent
}  // namespace fusedrnn
