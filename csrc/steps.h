// Arguments of one pointwise time step, and the per-unit glue every kernel
// shares: step_unit(a, b, j) indexes the gates of hidden unit j of batch row b
// in the step's buffers (gate g of unit j at g*H + j of a [rows, G*H] row),
// converts to `acc_t`, calls gates.h and stores. The CPU loop
// (cpu/rnn_cpu.cpp), the CUDA step kernel (cuda/rnn_cuda.cu) and the
// persistent kernel (persistent/phases.h) all call it; only the fused
// x86 paths (x86/fused_ops.h) have their own, a vector of units at a time.
//
// All pointers are row-major and contiguous; `rows` is the number of batch rows
// active at this step (PackedSequence batch_sizes[t]) and H the hidden size.
// `acc_t` is the accumulation type: float for half/bfloat16, else scalar_t.
#pragma once

#include <cstdint>

#include "gates.h"

namespace fusedrnn {

template <typename scalar_t, typename acc_t>
struct LstmForwardStep {
  int64_t rows = 0, H = 0;
  const scalar_t* x = nullptr;     // [rows, 4H] input projection (+ b_ih)
  const scalar_t* hh = nullptr;    // [rows, 4H] h_{t-1} @ W_hh^T
  const scalar_t* b_hh = nullptr;  // [4H] or null
  acc_t* c = nullptr;              // [rows, H] running cell state, in/out
  scalar_t* h = nullptr;           // [rows, H] new hidden state (before projection)
  scalar_t* out = nullptr;         // [rows, H] output rows, or null
  scalar_t* gates = nullptr;       // [rows, 4H] saved i, f, g, o, or null
  acc_t* cells = nullptr;          // [rows, H] saved c_t, or null
};

template <typename scalar_t, typename acc_t>
struct LstmBackwardStep {
  int64_t rows = 0, H = 0;
  const scalar_t* gates = nullptr;   // [rows, 4H] i, f, g, o
  const acc_t* cells = nullptr;      // [rows, H] c_t
  const acc_t* c_prev = nullptr;     // [prev_rows, H] c of the step before, or null
  int64_t prev_rows = 0;             // rows >= prev_rows start from c0
  const acc_t* c0 = nullptr;         // [B, H]
  const scalar_t* grad_h = nullptr;  // [rows, H] gradient reaching h_t from outside
  const acc_t* dh_rec = nullptr;     // [rows, H] gradient from step t+1, or null
  acc_t* dc = nullptr;               // [rows, H] dL/dc_t in, dL/dc_{t-1} out
  scalar_t* dgates = nullptr;        // [rows, 4H] pre-activation gradients
};

template <typename scalar_t, typename acc_t>
struct GruForwardStep {
  int64_t rows = 0, H = 0;
  const scalar_t* x = nullptr;     // [rows, 3H] input projection (+ b_ih)
  const scalar_t* hh = nullptr;    // [rows, 3H] h_{t-1} @ W_hh^T
  const scalar_t* b_hh = nullptr;  // [3H] or null
  scalar_t* h = nullptr;           // [rows, H] h_{t-1} in, h_t out
  scalar_t* out = nullptr;         // [rows, H] output rows
  scalar_t* gates = nullptr;       // [rows, 4H] saved r, z, n, hn, or null
  bool reset_after = true;         // false: hh's n part already is W_hn (r*h)
};

// Classic GRU, before the W_hn matmul.
template <typename scalar_t, typename acc_t>
struct GruResetStep {
  int64_t rows = 0, H = 0;
  const scalar_t* x = nullptr;     // [rows, 3H] input projection (+ b_ih)
  const scalar_t* hh = nullptr;    // [rows, 3H] h_{t-1} @ W_hh^T (r, z parts)
  const scalar_t* b_hh = nullptr;  // [3H]
  const scalar_t* h = nullptr;     // [rows, H] h_{t-1}
  scalar_t* rh = nullptr;          // [rows, H] r * h_{t-1}
};

// Classic GRU backward through r * h_{t-1}.
template <typename scalar_t, typename acc_t>
struct GruResetBackwardStep {
  int64_t rows = 0, H = 0;
  const scalar_t* gates = nullptr;   // [rows, 4H] r, z, n, hn
  const scalar_t* h_prev = nullptr;  // [prev_rows, H] or null
  int64_t prev_rows = 0;
  const scalar_t* h0 = nullptr;      // [B, H]
  const scalar_t* drh = nullptr;     // [rows, H] d(r h) = dhn W_hn
  acc_t* dh = nullptr;               // [rows, H] += drh * r
  scalar_t* dx = nullptr;            // [rows, 3H] r part written
  scalar_t* dhh = nullptr;           // [rows, 3H] r part written
};

template <typename scalar_t, typename acc_t>
struct GruBackwardStep {
  int64_t rows = 0, H = 0;
  const scalar_t* gates = nullptr;   // [rows, 4H] r, z, n, hn
  const scalar_t* h_prev = nullptr;  // [prev_rows, H] output of the step before, or null
  int64_t prev_rows = 0;             // rows >= prev_rows start from h0
  const scalar_t* h0 = nullptr;      // [B, H]
  const scalar_t* grad_h = nullptr;  // [rows, H] gradient reaching h_t from outside
  acc_t* dh = nullptr;               // [rows, H] from step t+1 in, dh * z out
  scalar_t* dx = nullptr;            // [rows, 3H] d x_proj: dr_pre, dz_pre, dn_pre
  scalar_t* dhh = nullptr;           // [rows, 3H] d(h W_hh^T + b_hh): dr_pre, dz_pre, dn_pre*r
  bool reset_after = true;           // false: r part left for GruResetBackwardStep
};

// ------------------------------------------------------------------ per-unit glue
// What a forward step reads besides its own results, for unit j of row b: the
// input projection, the recurrent term h_{t-1} W_hh^T + b_hh, and the state
// entering the step (LSTM: c_{t-1}; GRU: h_{t-1}). Here from the step's x,
// hh [rows, G*H], b_hh [G*H] and state [rows, H]; the persistent kernel reads
// them from shared memory where it staged them (persistent/phases.h,
// StepFromSmem). Both give
//   input(b, j, g)   x_proj of gate g
//   term(b, j, g)    the recurrent term (the GRU keeps it apart from x_proj's)
//   pre(b, j, g)     the LSTM pre-activation input + term, summed as each path
//                    always has: here (x + hh) + b_hh, so results stay bitwise
//   state(b, j)      the state entering the step, in acc_t.
// Stores v... as gates 0, 1, ... of one unit, p pointing at gate 0: p[g * H].
template <typename scalar_t, typename... acc_t>
FUSEDRNN_HOST_DEVICE void store_gates(scalar_t* p, int64_t H, acc_t... v) {
  int64_t g = 0;
  ((p[g++ * H] = scalar_t(v)), ...);
}

template <int G, typename scalar_t, typename acc_t, typename state_t>
struct StepFromHh {
  const scalar_t* x;
  const scalar_t* hh;
  const scalar_t* b_hh;
  const state_t* st;
  int64_t H;
  FUSEDRNN_HOST_DEVICE acc_t input(int64_t b, int64_t j, int g) const {
    return acc_t(x[b * G * H + g * H + j]);
  }
  FUSEDRNN_HOST_DEVICE acc_t term(int64_t b, int64_t j, int g) const {
    const int64_t k = g * H + j;
    return acc_t(hh[b * G * H + k]) + acc_t(b_hh[k]);
  }
  FUSEDRNN_HOST_DEVICE acc_t pre(int64_t b, int64_t j, int g) const {
    const int64_t k = g * H + j;
    return acc_t(x[b * G * H + k]) + acc_t(hh[b * G * H + k]) + acc_t(b_hh[k]);
  }
  FUSEDRNN_HOST_DEVICE acc_t state(int64_t b, int64_t j) const { return acc_t(st[b * H + j]); }
};

template <typename scalar_t, typename acc_t, typename Src>
FUSEDRNN_HOST_DEVICE void step_unit(const LstmForwardStep<scalar_t, acc_t>& a, int64_t b,
                                    int64_t j, const Src& src) {
  const int64_t H = a.H, k = b * H + j;
  acc_t i, f, g, o, c, h;
  lstm_forward_point<acc_t>(src.pre(b, j, 0), src.pre(b, j, 1), src.pre(b, j, 2),
                            src.pre(b, j, 3), src.state(b, j), i, f, g, o, c, h);
  a.c[k] = c;
  a.h[k] = scalar_t(h);
  if (a.out) a.out[k] = scalar_t(h);
  if (a.gates) {
    store_gates(a.gates + b * kLstmGates * H + j, H, i, f, g, o);
    a.cells[k] = c;
  }
}

template <typename scalar_t, typename acc_t>
FUSEDRNN_HOST_DEVICE void step_unit(const LstmForwardStep<scalar_t, acc_t>& a, int64_t b,
                                    int64_t j) {
  step_unit(a, b, j, StepFromHh<kLstmGates, scalar_t, acc_t, acc_t>{a.x, a.hh, a.b_hh, a.c, a.H});
}

// What a backward step reads per unit besides the gradients it carries (dh,
// dc): the saved gates, the LSTM's c_t, the state entering the step (LSTM
// c_{t-1}, GRU h_{t-1}: from the step before where row b was active there,
// else c0 / h0) and the gradient reaching h_t from outside. Here from the
// step's buffers; the persistent kernel reads them from shared memory where
// it staged them (persistent/phases.h, BackwardFromSmem). Both give, in acc_t,
//   gate(b, j, g)   saved gate g
//   cell(b, j)      c_t (LSTM)
//   prev(b, j)      the state entering the step
//   grad_h(b, j)    dL/dh_t from outside.
template <typename scalar_t, typename acc_t>
struct LstmBackwardFromStep {
  const LstmBackwardStep<scalar_t, acc_t>& a;
  FUSEDRNN_HOST_DEVICE acc_t gate(int64_t b, int64_t j, int g) const {
    return acc_t(a.gates[b * kLstmGates * a.H + g * a.H + j]);
  }
  FUSEDRNN_HOST_DEVICE acc_t cell(int64_t b, int64_t j) const { return a.cells[b * a.H + j]; }
  FUSEDRNN_HOST_DEVICE acc_t prev(int64_t b, int64_t j) const {
    const int64_t k = b * a.H + j;
    return b < a.prev_rows ? a.c_prev[k] : a.c0[k];
  }
  FUSEDRNN_HOST_DEVICE acc_t grad_h(int64_t b, int64_t j) const {
    return acc_t(a.grad_h[b * a.H + j]);
  }
};

template <typename scalar_t, typename acc_t, typename Src>
FUSEDRNN_HOST_DEVICE void step_unit(const LstmBackwardStep<scalar_t, acc_t>& a, int64_t b,
                                    int64_t j, const Src& src) {
  const int64_t H = a.H, k = b * H + j;
  const acc_t dh = src.grad_h(b, j) + (a.dh_rec ? a.dh_rec[k] : acc_t(0));
  acc_t di, df, dg, d_o, dc_prev;
  lstm_backward_point<acc_t>(src.gate(b, j, 0), src.gate(b, j, 1), src.gate(b, j, 2),
                             src.gate(b, j, 3), src.cell(b, j), src.prev(b, j), dh, a.dc[k], di,
                             df, dg, d_o, dc_prev);
  store_gates(a.dgates + b * kLstmGates * H + j, H, di, df, dg, d_o);
  a.dc[k] = dc_prev;
}

template <typename scalar_t, typename acc_t>
FUSEDRNN_HOST_DEVICE void step_unit(const LstmBackwardStep<scalar_t, acc_t>& a, int64_t b,
                                    int64_t j) {
  step_unit(a, b, j, LstmBackwardFromStep<scalar_t, acc_t>{a});
}

template <typename scalar_t, typename acc_t, typename Src>
FUSEDRNN_HOST_DEVICE void step_unit(const GruForwardStep<scalar_t, acc_t>& a, int64_t b,
                                    int64_t j, const Src& src) {
  const int64_t H = a.H, k = b * H + j;
  const acc_t hn = src.term(b, j, 2);
  acc_t r, z, n, h;
  gru_forward_point<acc_t>(src.input(b, j, 0), src.input(b, j, 1), src.input(b, j, 2),
                           src.term(b, j, 0), src.term(b, j, 1), hn, src.state(b, j), r, z, n, h,
                           a.reset_after);
  a.h[k] = scalar_t(h);
  a.out[k] = scalar_t(h);
  if (a.gates) store_gates(a.gates + b * kGruSaved * H + j, H, r, z, n, hn);
}

template <typename scalar_t, typename acc_t>
FUSEDRNN_HOST_DEVICE void step_unit(const GruForwardStep<scalar_t, acc_t>& a, int64_t b,
                                    int64_t j) {
  step_unit(a, b, j,
            StepFromHh<kGruGates, scalar_t, acc_t, scalar_t>{a.x, a.hh, a.b_hh, a.h, a.H});
}

template <typename scalar_t, typename acc_t>
FUSEDRNN_HOST_DEVICE void step_unit(const GruResetStep<scalar_t, acc_t>& a, int64_t b,
                                    int64_t j) {
  const StepFromHh<kGruGates, scalar_t, acc_t, scalar_t> src{a.x, a.hh, a.b_hh, a.h, a.H};
  a.rh[b * a.H + j] =
      scalar_t(gru_reset_point<acc_t>(src.input(b, j, 0), src.term(b, j, 0), src.state(b, j)));
}

template <typename scalar_t, typename acc_t>
FUSEDRNN_HOST_DEVICE void step_unit(const GruResetBackwardStep<scalar_t, acc_t>& a, int64_t b,
                                    int64_t j) {
  const int64_t H = a.H, k = b * H + j, r = b * kGruGates * H + j;
  const acc_t h_prev = acc_t(b < a.prev_rows ? a.h_prev[k] : a.h0[k]);
  acc_t dr, dh_prev;
  gru_reset_backward_point<acc_t>(acc_t(a.gates[b * kGruSaved * H + j]), h_prev, acc_t(a.drh[k]),
                                  dr, dh_prev);
  a.dx[r] = a.dhh[r] = scalar_t(dr);
  a.dh[k] += dh_prev;
}

template <typename scalar_t, typename acc_t>
struct GruBackwardFromStep {
  const GruBackwardStep<scalar_t, acc_t>& a;
  FUSEDRNN_HOST_DEVICE acc_t gate(int64_t b, int64_t j, int g) const {
    return acc_t(a.gates[b * kGruSaved * a.H + g * a.H + j]);
  }
  FUSEDRNN_HOST_DEVICE acc_t prev(int64_t b, int64_t j) const {
    const int64_t k = b * a.H + j;
    return acc_t(b < a.prev_rows ? a.h_prev[k] : a.h0[k]);
  }
  FUSEDRNN_HOST_DEVICE acc_t grad_h(int64_t b, int64_t j) const {
    return acc_t(a.grad_h[b * a.H + j]);
  }
};

template <typename scalar_t, typename acc_t, typename Src>
FUSEDRNN_HOST_DEVICE void step_unit(const GruBackwardStep<scalar_t, acc_t>& a, int64_t b,
                                    int64_t j, const Src& src) {
  const int64_t H = a.H, k = b * H + j;
  const acc_t r = a.reset_after ? src.gate(b, j, 0) : acc_t(1);
  acc_t dr, dz, dn, dhn, dh_direct;
  gru_backward_point<acc_t>(r, src.gate(b, j, 1), src.gate(b, j, 2), src.gate(b, j, 3),
                            src.prev(b, j), src.grad_h(b, j) + a.dh[k], dr, dz, dn, dhn,
                            dh_direct);
  // d x_proj and d(h W_hh^T + b_hh) differ only in n: dn vs dhn = dn * r.
  store_gates(a.dx + b * kGruGates * H + j, H, dr, dz, dn);
  store_gates(a.dhh + b * kGruGates * H + j, H, dr, dz, dhn);
  a.dh[k] = dh_direct;
}

template <typename scalar_t, typename acc_t>
FUSEDRNN_HOST_DEVICE void step_unit(const GruBackwardStep<scalar_t, acc_t>& a, int64_t b,
                                    int64_t j) {
  step_unit(a, b, j, GruBackwardFromStep<scalar_t, acc_t>{a});
}

}  // namespace fusedrnn
