// Argument checks shared by every device: each failure names the argument and
// is raised before any kernel runs or any output is written.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <vector>

namespace fusedrnn {

// Time steps of one layer and direction. A padded input [T, B, G] is the packed
// case with every batch_sizes[t] == B.
//
//   x_proj rows:  | t=0: sizes[0] rows | t=1: sizes[1] rows | ... |
//                 ^ offsets[0]         ^ offsets[1]
struct Schedule {
  int64_t T = 0;  // time steps
  int64_t B = 0;  // rows of the state (batch_sizes[0])
  int64_t N = 0;  // rows of x_proj in total
  bool reverse = false;
  std::vector<int64_t> sizes, offsets;

  // Time index of the s-th step in processing order.
  int64_t time_at(int64_t s) const { return reverse ? T - 1 - s : s; }
  // The step whose state step t reads: t-1 forward, t+1 reverse. Rows of t
  // beyond prev_rows(t) read the initial state instead.
  int64_t prev_time(int64_t t) const { return reverse ? t + 1 : t - 1; }
  int64_t prev_rows(int64_t t) const {
    const int64_t tp = prev_time(t);
    return (tp >= 0 && tp < T) ? sizes[tp] : 0;
  }
};

// Every op implementation holds one: the ATen calls inside (GEMMs) must run in
// the dtypes we chose, even when the caller (or the backward pass) runs under
// autocast, which would otherwise recast them.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// t has ref's dtype and device; ref_name names ref in the message (x_proj in
// a forward, grad_output in a backward).
inline void check_same(const at::Tensor& ref, const at::Tensor& t, const char* op,
                       const char* name, const char* ref_name = "x_proj") {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device());
}

// A saved tensor that forward keeps in the accumulation dtype (acc_dtype),
// on grad_output's device.
inline void check_saved_acc(const at::Tensor& grad_output, const at::Tensor& t, const char* op,
                            const char* name) {
  const auto acc = acc_dtype(grad_output.scalar_type());
  TORCH_CHECK(t.scalar_type() == acc && t.device() == grad_output.device(), op, ": ", name,
              " must be ", acc, " on ", grad_output.device(), " (as forward saved it), got ",
              t.scalar_type(), " on ", t.device());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* op,
                        const char* name) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected,
              ", got ", t.sizes());
}

// fusedrnn::linear's operands: input [..., K], weight [N, K], bias [N]; one
// dtype (float32, float64, float16, bfloat16) and one device.
inline void check_linear(const at::Tensor& input, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const char* op) {
  TORCH_CHECK(is_supported_dtype(input.scalar_type()), op,
              ": input must be float32, float64, float16 or bfloat16, got ",
              input.scalar_type());
  TORCH_CHECK(input.dim() >= 1 && weight.dim() == 2 && input.size(-1) == weight.size(1), op,
              ": input [..., K] and weight [N, K] expected, got ", input.sizes(), " and ",
              weight.sizes());
  check_same(input, weight, op, "weight", "input");
  if (bias.has_value()) {
    check_same(input, *bias, op, "bias", "input");
    check_shape(*bias, {weight.size(0)}, op, "bias");
  }
}

// fusedrnn::linear_backward's: those of linear, and grad shaped like its output.
inline void check_linear_backward(const at::Tensor& grad, const at::Tensor& input,
                                  const at::Tensor& weight, const char* op) {
  check_linear(input, weight, c10::nullopt, op);
  check_same(input, grad, op, "grad", "input");
  auto out = input.sizes().vec();
  out.back() = weight.size(0);
  check_shape(grad, out, op, "grad");
}

// Validates x_proj [T, B, G*H] (or packed [N, G*H] with batch_sizes) and
// returns the schedule. A backward passes grad_output [.., P] instead: name
// and cols_what say so in the messages.
inline Schedule make_schedule(const at::Tensor& x_proj,
                              const c10::optional<at::Tensor>& batch_sizes,
                              int64_t gate_cols, bool reverse, const char* op,
                              const char* name = "x_proj",
                              const char* cols_what = "gates * hidden_size") {
  TORCH_CHECK(is_supported_dtype(x_proj.scalar_type()), op,
              ": ", name, " must be float32, float64, float16 or bfloat16, got ",
              x_proj.scalar_type());
  Schedule s;
  s.reverse = reverse;
  if (batch_sizes.has_value()) {
    const at::Tensor& bs = *batch_sizes;
    TORCH_CHECK(x_proj.dim() == 2, op,
                ": ", name, " must be 2-D [N, ", gate_cols, "] with batch_sizes, got ", x_proj.dim(), "-D");
    TORCH_CHECK(bs.dim() == 1 && bs.scalar_type() == at::kLong && bs.device().is_cpu(), op,
                ": batch_sizes must be a 1-D int64 CPU tensor, got ", bs.dim(), "-D ",
                bs.scalar_type(), " on ", bs.device());
    TORCH_CHECK(bs.numel() > 0, op, ": batch_sizes must not be empty");
    const at::Tensor bsc = bs.contiguous();
    const int64_t* p = bsc.data_ptr<int64_t>();
    s.T = bsc.numel();
    s.B = p[0];
    int64_t total = 0;
    for (int64_t t = 0; t < s.T; ++t) {
      TORCH_CHECK(p[t] > 0, op, ": batch_sizes must be positive, got ", p[t], " at step ", t);
      TORCH_CHECK(t == 0 || p[t] <= p[t - 1], op,
                  ": batch_sizes must be non-increasing, got ", p[t - (t > 0)], " then ",
                  p[t], " at step ", t);
      s.sizes.push_back(p[t]);
      s.offsets.push_back(total);
      total += p[t];
    }
    TORCH_CHECK(total == x_proj.size(0), op, ": batch_sizes sum to ", total,
                " but ", name, " has ", x_proj.size(0), " rows");
    s.N = total;
  } else {
    TORCH_CHECK(x_proj.dim() == 3, op,
                ": ", name, " must be 3-D [T, B, ", gate_cols, "] without batch_sizes, got ", x_proj.dim(), "-D");
    s.T = x_proj.size(0);
    s.B = x_proj.size(1);
    TORCH_CHECK(s.T > 0 && s.B > 0, op, ": ", name, " must have T > 0 and B > 0, got shape ",
                x_proj.sizes());
    s.N = s.T * s.B;
    s.sizes.assign(s.T, s.B);
    for (int64_t t = 0; t < s.T; ++t) s.offsets.push_back(t * s.B);
  }
  TORCH_CHECK(x_proj.size(-1) == gate_cols, op, ": ", name, ".size(-1) must be ", gate_cols,
              " (", cols_what, "), got ", x_proj.size(-1));
  return s;
}

}  // namespace fusedrnn
