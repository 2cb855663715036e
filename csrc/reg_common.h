// What the regularised ops' time loops (reg_lstm.h, reg_gru.h) share: their
// optional inputs (fusedrnn.regularisers.LayerReg) and checks, the one GEMM
// call site of the recurrence, and small tensor helpers.
#pragma once

#include <ATen/ATen.h>

#include <type_traits>
#include <utility>

#include "checks.h"
#include "recurrence.h"
#include "reg_rows.h"

namespace fusedrnn {
namespace reg {

using at::Tensor;

// The fields of a LayerReg; absent ones are empty optionals.
struct RegInputs {
  OptTensor rec_mask;  // [B, P]
  OptTensor zone_h;    // x_proj's leading shape + [P]
  OptTensor zone_c;    // x_proj's leading shape + [H] (LSTM)
  OptTensor ln_hh;     // [G*H]
  OptTensor ln_c_w;    // [H] (LSTM, with ln_c_b)
  OptTensor ln_c_b;    // [H]
  OptTensor ln_ih;     // [G*H] the input side's gain (x_proj is then x W_ih^T, no bias)
  OptTensor b_ih;      // [G*H] added after that norm (with ln_ih)

  bool ln_c() const { return ln_c_w.has_value(); }

  // Each field contiguous, as 2-D rows where it is per row, in `dtype`.
  RegInputs prepared(at::ScalarType dtype, int64_t N) const {
    auto prep = [&](const OptTensor& t, bool rows) -> OptTensor {
      if (!t.has_value()) return c10::nullopt;
      Tensor v = t->to(dtype).contiguous();
      return rows ? v.view({N, v.size(-1)}) : v;
    };
    return {prep(rec_mask, false), prep(zone_h, true),  prep(zone_c, true),
            prep(ln_hh, false),    prep(ln_c_w, false), prep(ln_c_b, false),
            prep(ln_ih, false),    prep(b_ih, false)};
  }
};

template <typename T>
T* ptr(const OptTensor& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

template <typename T>
T* ptr_or_null(const Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

// The input norm of a forward loop's rows (InputNorm in reg_rows.h): r's gain
// and bias, and xs [B, G*H] for the normalised rows (undefined without ln_ih).
template <typename T>
InputNorm<T> input_norm(const RegInputs& r, const Tensor& xs) {
  return {ptr<T>(r.ln_ih), ptr<T>(r.b_ih), ptr_or_null<T>(xs)};
}

// Checks the LayerReg fields against the layer: G gates of H units, output
// size P, x_proj's leading shape `rows_shape`.
inline void check_reg(const Tensor& x_proj, const RegInputs& r, const Schedule& s, int64_t G,
                      int64_t H, int64_t P, const char* op) {
  auto rows_shape = [&](int64_t last) {
    return detail::with_last(x_proj.sizes(), last);
  };
  auto check = [&](const OptTensor& t, at::IntArrayRef shape, const char* name) {
    if (!t.has_value()) return;
    check_same(x_proj, *t, op, name);
    check_shape(*t, shape, op, name);
  };
  check(r.rec_mask, {s.B, P}, "rec_mask");
  check(r.zone_h, rows_shape(P), "zone_h");
  check(r.zone_c, rows_shape(H), "zone_c");
  check(r.ln_hh, {G * H}, "ln_hh");
  TORCH_CHECK(r.ln_c_w.has_value() == r.ln_c_b.has_value(), op,
              ": ln_c_w and ln_c_b go together (the cell norm's gain and bias)");
  check(r.ln_c_w, {H}, "ln_c_w");
  check(r.ln_c_b, {H}, "ln_c_b");
  TORCH_CHECK(r.ln_ih.has_value() || !r.b_ih.has_value(), op,
              ": b_ih goes with ln_ih (without it, b_ih is part of x_proj)");
  check(r.ln_ih, {G * H}, "ln_ih");
  check(r.b_ih, {G * H}, "b_ih");
}

// Note [One GEMM call site]
// Every recurrent product of the loops (h_{t-1} W^T forward, da W backward)
// multiplies by the same weight at every step: a StepGemm is made once per
// weight before the loop, then called per step, out = a @ b or out += a @ b
// (out a block of rows). The kernel policy K may bring its own (K::StepGemm:
// the CPU's packs the weight once for the fused path's GEMM); else ATen's.
// A step's product and the row pass that reads it (then_rows) or writes its
// input (after_rows) go through one call, so that a StepGemm may run both
// in one parallel region (the CPU's does).
struct AtenStepGemm {
  Tensor b;
  explicit AtenStepGemm(Tensor b_) : b(std::move(b_)) {}
  void operator()(Tensor out, const Tensor& a, bool accumulate = false) const {
    if (accumulate) {
      out.addmm_(a, b);
    } else {
      at::mm_out(out, a, b);
    }
  }
  // out = a @ b, then K::run(rows).
  template <typename K, typename Rows>
  void then_rows(Tensor out, const Tensor& a, const Rows& rows) const {
    (*this)(out, a);
    K::run(rows);
  }
  // K::run(rows), then out (+)= a @ b.
  template <typename K, typename Rows>
  void after_rows(const Rows& rows, Tensor out, const Tensor& a, bool accumulate = false) const {
    K::run(rows);
    (*this)(out, a, accumulate);
  }
};

// dY^T X summed over all rows (dW_hh, dW_hr after the loop): the policy's
// own (K::weight_grad, which may return an undefined tensor to decline) or
// ATen's.
template <typename K, typename = void>
struct HasWeightGrad : std::false_type {};
template <typename K>
struct HasWeightGrad<K, std::void_t<decltype(K::weight_grad(Tensor(), Tensor()))>>
    : std::true_type {};

template <typename K>
Tensor weight_grad(const Tensor& dy, const Tensor& x) {
  if constexpr (HasWeightGrad<K>::value) {
    Tensor w = K::weight_grad(dy, x);
    if (w.defined()) return w;
  }
  return at::mm(dy.t(), x);
}

// Note [Norm gradients in one pass]
// Where a policy does not sum them in the loop (Note [Gain gradients summed
// in the loop] in reg_rows.h), the gradients of a layer norm's gain and of
// the bias after it are column sums over all rows of the same gradient dy
// [N, C], taken after the loop: sum dy * xhat and sum dy. With the input
// side's norm too, xhat of both norms multiplies the same dy (the LSTM's gate
// pre-activations). norm_grads takes them all from one dy:
//   hh  = sum over rows of dy * norm            (norm [N, C], or undefined)
//   ih  = sum over rows of dy * (x - mean) rstd  (x [N, C], mean and rstd [N];
//         the input norm recomputed, Note [Input norm recomputed]; or undefined)
//   sum = sum over rows of dy                    (when with_sum)
// Each result undefined where not asked.
struct NormGrads {
  Tensor hh, ih, sum;
};

inline NormGrads norm_grads(const Tensor& dy, const Tensor& norm, const Tensor& x,
                            const Tensor& mean, const Tensor& rstd, bool with_sum) {
  NormGrads g;
  if (norm.defined()) g.hh = (dy * norm).sum(0);
  if (x.defined()) g.ih = (dy * ((x - mean.unsqueeze(1)) * rstd.unsqueeze(1))).sum(0);
  if (with_sum) g.sum = dy.sum(0);
  return g;
}

// Note [Gain gradients summed in the loop] (reg_rows.h): a policy that sums
// them in the loop says how many slots a loop's rows may use at once
// (K::sum_slots(): the CPU's threads); others get norm_grads' pass instead.
template <typename K, typename = void>
struct SumsInLoop : std::false_type {};
template <typename K>
struct SumsInLoop<K, std::void_t<decltype(K::sum_slots())>> : std::true_type {};

// K's slots, or 0 where it has norm_grads' pass instead.
template <typename K>
int64_t sum_slots() {
  if constexpr (SumsInLoop<K>::value) {
    return K::sum_slots();
  } else {
    return 0;
  }
}

// The slots of one norm's sums (both undefined where not asked): [slots, n]
// of zeros in double, on options' device.
struct LoopSums {
  Tensor gain, bias;
  LoopSums() = default;
  LoopSums(bool want_gain, bool want_bias, int64_t slots, int64_t n,
           const at::TensorOptions& options) {
    const auto o = options.dtype(at::kDouble);
    if (want_gain) gain = at::zeros({slots, n}, o);
    if (want_bias) bias = at::zeros({slots, n}, o);
  }
  template <typename T>
  GainSums<T> rows() const {
    GainSums<T> g;
    const Tensor& any = gain.defined() ? gain : bias;
    g.n = any.defined() ? any.size(1) : 0;
    g.gain = gain.defined() ? gain.data_ptr<double>() : nullptr;
    g.bias = bias.defined() ? bias.data_ptr<double>() : nullptr;
    return g;
  }
  // The sums over all slots, in dtype.
  static Tensor total(const Tensor& slots, at::ScalarType dtype) {
    return slots.sum(0).to(dtype);
  }
};

// A buffer of all steps' rows ([N, ...]): the policy's own (K::empty: the
// CPU's reuses large blocks, Note [reused step buffers] in
// cpu/step_buffers.cpp) or at::empty.
template <typename K, typename = void>
struct HasEmpty : std::false_type {};
template <typename K>
struct HasEmpty<K, std::void_t<decltype(K::empty(at::IntArrayRef(), at::TensorOptions()))>>
    : std::true_type {};

template <typename K>
Tensor step_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if constexpr (HasEmpty<K>::value) {
    return K::empty(sizes, options);
  } else {
    return at::empty(sizes, options);
  }
}

// Note [The time loop]
// Each loop of reg_lstm.h / reg_gru.h runs as time_loop<K, T>(loop): the
// policy's own way (K::time_loop<T>: the CPU's runs the whole loop in one
// thread team, Note [a thread team per regularised loop] in
// cpu/step_team.h), or just loop().
template <typename K, typename = void>
struct HasTimeLoop : std::false_type {};
template <typename K>
struct HasTimeLoop<
    K, std::void_t<decltype(K::template time_loop<float>(std::declval<void (*)()>()))>>
    : std::true_type {};

template <typename K, typename T, typename Loop>
void time_loop(const Loop& loop) {
  if constexpr (HasTimeLoop<K>::value) {
    K::template time_loop<T>(loop);
  } else {
    loop();
  }
}

template <typename K, typename = void>
struct StepGemmOf {
  using type = AtenStepGemm;
};
template <typename K>
struct StepGemmOf<K, std::void_t<typename K::StepGemm>> {
  using type = typename K::StepGemm;
};

// rec_mask's rows as every step used them, [N, P]: step t used its first
// batch_sizes[t]. Undefined without a mask.
inline Tensor mask_rows(const OptTensor& mask, const Schedule& s, bool packed) {
  if (!mask.has_value()) return Tensor();
  if (!packed) return mask->repeat({s.T, 1});
  std::vector<Tensor> parts;
  parts.reserve(s.T);
  for (int64_t t = 0; t < s.T; ++t) parts.push_back(mask->narrow(0, 0, s.sizes[t]));
  return at::cat(parts);
}

// The GEMM input every step read, (rec_mask *) h_{t-1}, for all rows: [N, P].
inline Tensor masked_prev(const Tensor& out, const Tensor& h0, const OptTensor& mask,
                          const Schedule& s, bool packed) {
  Tensor hp = detail::gather_prev(out, h0, s, packed);
  return mask.has_value() ? hp.mul_(mask_rows(mask, s, packed)) : hp;
}

// dW_hh = sum over all rows of dA^T hm, hm = (rec_mask *) h_{t-1} as every
// step read it: the policy's own (K::recurrent_weight_grad, which reads
// h_{t-1} where it lies, in out and h0, without masked_prev's [N, P] copy;
// undefined to decline) where there is no mask, else weight_grad of
// masked_prev's rows.
template <typename K, typename = void>
struct HasRecurrentWeightGrad : std::false_type {};
template <typename K>
struct HasRecurrentWeightGrad<K, std::void_t<decltype(K::recurrent_weight_grad(
                                     Tensor(), Tensor(), Tensor(), std::declval<Schedule>()))>>
    : std::true_type {};

template <typename K>
Tensor recurrent_weight_grad(const Tensor& da, const Tensor& out, const Tensor& h0,
                             const OptTensor& mask, const Schedule& s, bool packed) {
  if constexpr (HasRecurrentWeightGrad<K>::value) {
    if (!mask.has_value()) {
      Tensor w = K::recurrent_weight_grad(da, out, h0, s);
      if (w.defined()) return w;
    }
  }
  return weight_grad<K>(da, masked_prev(out, h0, mask, s, packed));
}

// t's first n rows: t itself when it has n, as every step of a padded
// sequence does (no tensor op per step there).
inline Tensor first_rows(const Tensor& t, int64_t n) {
  return n == t.size(0) ? t : t.narrow(0, 0, n);
}

// Leading shape [rows] of a saved tensor that exists only when `on`.
inline int64_t rows_if(bool on, int64_t N) { return on ? N : 0; }

}  // namespace reg
}  // namespace fusedrnn
