// The fused CPU paths (x86-64 only, Note [x86-only fused path] in
// cpu/rnn_cpu.cpp): the per-step GEMM and the pointwise update in one pass
// over each tile. Taken for padded (not packed) input without projection on
// CPUs with AVX-512, or AVX2 and FMA; everything else runs the generic loop of
// recurrence.h. rnn_cpu.cpp chooses.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <tuple>
#include <utility>
#include <vector>

#include "../checks.h"

namespace fusedrnn {
namespace cpu {

using at::Tensor;

// `rows` rows of dY [rows, M] and of X [rows, N], of element type T,
// row-major and contiguous: one segment of the rows summed over in a weight
// gradient. Where x2 is set, X's rows are two blocks side by side: the first
// n1 columns from x [rows, n1], the other N - n1 from x2 [rows, N - n1]
// (Note [one product for both weight gradients] in rnn_cpu.cpp).
template <typename T>
struct GradRowsOf {
  const T* dy;
  const T* x;
  int64_t rows;
  const T* x2 = nullptr;
  int64_t n1 = 0;
};
using GradRows = GradRowsOf<float>;

// Up to this many rows a weight gradient (and dY W, W read once) is ATen's mm
// on an Intel CPU (Note [short products by ATen's mm] in weight_grad.h).
constexpr int64_t kMmGradRows = 128;

// Up to this many rows a weight gradient is a sum of outer products (Note
// [weight gradients of a few rows] in weight_grad.h), on every CPU.
constexpr int64_t kFewGradRows = 8;

// The rows up to which ATen's mm takes the short products here: kMmGradRows on
// an Intel CPU, none elsewhere, where MKL does not run its AVX-512 kernels.
inline int64_t mm_grad_rows() {
#ifdef FUSEDRNN_X86
  static const int64_t rows = __builtin_cpu_is("intel") ? kMmGradRows : 0;
  return rows;
#else
  return kMmGradRows;
#endif
}

// The rows of dW_hh = sum over steps of dG_t^T h_{t-1}, read in place: dg
// [T*B, G], out [T, B, H] and h0 [B, H], contiguous. Step t reads out[t-1]
// (reverse: out[t+1]), the first step h0. In dG's row order, as the input
// projection's dW_ih sums, so that one product can form both
// (layer_grad_rows).
template <typename T>
std::vector<GradRowsOf<T>> recurrent_grad_rows(const T* dg, const T* out, const T* h0,
                                               int64_t steps, int64_t B, int64_t H, int64_t G,
                                               bool reverse) {
  const int64_t BT = B * (steps - 1);
  if (!reverse) {
    std::vector<GradRowsOf<T>> segs{{dg, h0, B}};
    if (steps > 1) segs.push_back({dg + B * G, out, BT});
    return segs;
  }
  std::vector<GradRowsOf<T>> segs;
  if (steps > 1) segs.push_back({dg, out + B * H, BT});
  segs.push_back({dg + BT * G, h0, B});
  return segs;
}

// The same rows with X = [x | h_{t-1}]: dW_ih and dW_hh side by side in one
// product, x [T*B, I] contiguous.
template <typename T>
std::vector<GradRowsOf<T>> layer_grad_rows(const T* dg, const T* x, const T* out, const T* h0,
                                           int64_t steps, int64_t B, int64_t I, int64_t H,
                                           int64_t G, bool reverse) {
  std::vector<GradRowsOf<T>> segs = recurrent_grad_rows(dg, out, h0, steps, B, H, G, reverse);
  for (GradRowsOf<T>& s : segs) {
    s.x2 = s.x;
    s.x = x + (s.dy - dg) / G * I;
    s.n1 = I;
  }
  return segs;
}

// The same for any schedule (packed input too): dg [N, G], out [N, P] and h0
// [B, P], contiguous; step t's first prev_rows(t) rows read the rows of out
// its step before wrote, the rest h0's. Runs of rows contiguous in both are
// one segment (padded input: two), in row order, so the sums run as over
// masked_prev's copy (recurrence.h), which the regularised ops read before.
template <typename T>
std::vector<GradRowsOf<T>> scheduled_grad_rows(const T* dg, const T* out, const T* h0,
                                               const Schedule& s, int64_t G, int64_t P) {
  std::vector<GradRowsOf<T>> segs;
  const auto add = [&](const T* dy, const T* x, int64_t rows) {
    if (rows <= 0) return;
    if (!segs.empty()) {
      GradRowsOf<T>& last = segs.back();
      if (last.dy + last.rows * G == dy && last.x + last.rows * P == x) {
        last.rows += rows;
        return;
      }
    }
    segs.push_back({dy, x, rows});
  };
  for (int64_t t = 0; t < s.T; ++t) {
    const int64_t bt = s.sizes[t], off = s.offsets[t];
    const int64_t prow = std::min(s.prev_rows(t), bt);
    if (prow > 0) add(dg + off * G, out + s.offsets[s.prev_time(t)] * P, prow);
    add(dg + (off + prow) * G, h0 + prow * P, bt - prow);
  }
  return segs;
}

// The ops of one instruction set for one element type T (float32, float64):
// fused_ops.h, compiled once per set. Same contracts as lstm_forward_impl /
// lstm_backward_impl etc. in recurrence.h, for x_proj [T, B, G*H]; arguments
// are already checked.
template <typename T>
struct FusedOps {
  using Elem = T;
  // The forwards also take packed x_proj [N, G*H] with its batch_sizes
  // (empty: padded; Note [packed input on the fused forward] in fused_loop.h).
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> (*lstm_forward)(
      const Tensor& x_proj, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
      const Tensor& b_hh, bool reverse, bool train, c10::IntArrayRef batch_sizes);
  // weight_grads=false: d_w_hh and d_b_hh left [0] (the caller forms them).
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> (*lstm_backward)(
      const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n,
      const Tensor& output, const Tensor& gates, const Tensor& cells, const Tensor& h0,
      const Tensor& c0, const Tensor& w_hh, bool reverse, bool has_bias, bool weight_grads);
  std::tuple<Tensor, Tensor, Tensor> (*gru_forward)(const Tensor& x_proj, const Tensor& h0,
                                                    const Tensor& w_hh, const Tensor& b_hh,
                                                    bool reverse, bool train,
                                                    c10::IntArrayRef batch_sizes);
  // Also returns dhh [T*B, 3H], the gradients of the recurrent side's
  // pre-activations (dr, dz, dhn), from which dW_hh and db_hh come.
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> (*gru_backward)(
      const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& output,
      const Tensor& gates, const Tensor& h0, const Tensor& w_hh, bool reverse, bool has_bias,
      bool weight_grads);
  // y [M, N] = x [M, K] w [N, K]^T (+ b [N]); contiguous.
  Tensor (*linear)(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b);
  // dx [M, K] = dy [M, N] w [N, K]; contiguous.
  Tensor (*linear_input_grad)(const Tensor& dy, const Tensor& w);
  // (dW [M, N], db [M] or [0]): dY^T X and the column sums of dY over the
  // rows of all segments (Note [weight-gradient GEMM] in weight_grad.h).
  std::pair<Tensor, Tensor> (*weight_grad)(const std::vector<GradRowsOf<T>>& segs, int64_t M,
                                           int64_t N, bool want_db,
                                           const at::TensorOptions& options);
  // The same over X in two blocks of columns (every segment's x2 set): dW's
  // two blocks [M, n1] and [M, N - n1], each contiguous, then db.
  std::tuple<Tensor, Tensor, Tensor> (*weight_grad_blocks)(
      const std::vector<GradRowsOf<T>>& segs, int64_t M, int64_t N, bool want_db,
      const at::TensorOptions& options);
  // A GEMM whose right operand is packed once for many calls (the regularised
  // ops' step products): pack_rhs(b [K, N]) -> [panels, K, panel width], then
  // gemm_packed(M, N, K, a, lda, panels, out, ldo, accumulate): out [M, N]
  // (+)= a [M, K] @ the N columns of the panels starting at `panels` (packed's
  // data, or a later panel's), rows lda and ldo apart.
  Tensor (*pack_rhs)(const Tensor& b);
  void (*gemm_packed)(int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* panels,
                      T* out, int64_t ldo, bool accumulate);
};
using FusedF32 = FusedOps<float>;
using FusedF64 = FusedOps<double>;

// The float32 (float64) kernels of the CPU path in force (cpu/cpu_isa.h), or
// null where it is the generic loop (rnn_cpu.cpp). Raise for a bad
// FUSEDRNN_CPU_ISA.
const FusedF32* fused_f32();
const FusedF64* fused_f64();

// f(ops) with the kernels of the CPU path in force for dtype (float32 or
// float64): its result, or nullopt where that dtype has none there. A bad
// FUSEDRNN_CPU_ISA raises whatever the dtype.
template <typename F>
auto with_fused_ops(at::ScalarType dtype, const F& f)
    -> c10::optional<decltype(f(static_cast<const FusedF32*>(nullptr)))> {
  const FusedF32* f32 = fused_f32();
  if (dtype == at::kFloat && f32 != nullptr) return f(f32);
  if (dtype == at::kDouble) {
    if (const FusedF64* f64 = fused_f64()) return f(f64);
  }
  return c10::nullopt;
}

extern const FusedF32 kFusedAvx512;     // fused_avx512.cpp: AVX-512 F, VL, DQ, BW
extern const FusedF64 kFusedAvx512F64;  // the same, float64
extern const FusedF32 kFusedAvx2;       // fused_avx2.cpp: AVX2 and FMA
extern const FusedF64 kFusedAvx2F64;    // the same, float64

// The bfloat16 forwards (fused_avx512_bf16.cpp): H even, AVX512-BF16; amx:
// the step products on AMX tiles (Note [AMX tiles for the step product]).
// The same for the backward loops below.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward_fused_bf16(
    const Tensor& x_proj, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
    const Tensor& b_hh, bool reverse, bool train, c10::IntArrayRef batch_sizes, bool amx);

// The bfloat16 backward time loops (fused_avx512_bf16.cpp): the step product
// dG W_hh on the bfloat16 gate gradients, which are also what the caller
// forms the weight gradients from. grad_output, gates, output, h0 and w_hh
// bfloat16 ([T, B, ...], H even); grad_h_n, grad_c_n, cells and c0 float32.
// Returns those of lstm_backward / gru_backward with weight_grads false: the
// gate gradients (GRU: and those through W_hh) bfloat16, the states' float32.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward_fused_bf16(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n,
    const Tensor& gates, const Tensor& cells, const Tensor& c0, const Tensor& w_hh, bool reverse,
    bool amx);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gru_backward_fused_bf16(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& output, const Tensor& gates,
    const Tensor& h0, const Tensor& w_hh, bool reverse, bool amx);

// The weight-gradient GEMM of FusedOps::weight_grad for bfloat16 dY and X,
// k in pairs on vdpbf16ps; dW and db float32 (options' dtype), accumulated
// in float32 (db in double) (fused_avx512_bf16.cpp).
std::pair<Tensor, Tensor> weight_grad_bf16(const std::vector<GradRowsOf<at::BFloat16>>& segs,
                                           int64_t M, int64_t N, bool want_db,
                                           const at::TensorOptions& options);

// y [M, N] = x [M, K] w [N, K]^T (+ b [N]), bfloat16, contiguous, K even;
// float32 accumulation, rounded once (fused_avx512_bf16.cpp).
Tensor linear_fused_bf16(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b);

std::tuple<Tensor, Tensor, Tensor> gru_forward_fused_bf16(const Tensor& x_proj, const Tensor& h0,
                                                          const Tensor& w_hh, const Tensor& b_hh,
                                                          bool reverse, bool train,
                                                          c10::IntArrayRef batch_sizes, bool amx);

}  // namespace cpu
}  // namespace fusedrnn
