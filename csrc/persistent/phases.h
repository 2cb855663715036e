// The persistent recurrence: one cooperative launch runs the whole time loop of
// one layer and direction, with each block's slice of W_hh resident in shared
// memory for all T steps. Written once for the GPU (persistent.cu) and for the
// CPU emulator that tests it where no GPU is visible (emulate.cpp). This file
// is the kernel's body: one step as a list of phases, forward and backward;
// layout.h plans the shared memory, staging.h fills it, simt.h and
// tensor_core.h form the products.
//
// Note [Persistent kernel]
// Block `blk` owns hidden units [j0, j0 + units). Forward, per step:
//   1. stage h_{t-1} (all units, all active rows) into shared memory, in
//      one piece where it fits, else in K-chunks of L.kc columns (with two
//      buffers, the next chunk's copies in flight meanwhile), and accumulate
//        acc[b][g*units + jl] = sum_k h_{t-1}[b][k] W_hh[g*H + j0 + jl][k]
//      against the resident slice (its G*units rows of W_hh);
//   2. apply the gate math of gates.h to the block's own units and write
//      h_t's slice to `out` (plus the state and what backward saves), through
//      the per-unit glue of steps.h that the step-wise kernels share;
//   3. meet every other block at one grid barrier.
// Backward runs the same pattern in reverse order: the block holds the
// columns j0..j0+units of W_hh (as rows, [units][G*H]), forms its slice of
// dh_{t} = dgates_{t+1} W_hh from the pre-activation gradients every block
// wrote at the step before, then the pointwise backward of its units.
//
// h_{t-1} is read from `out` (rows still active at the step before) or h0,
// never from the running state, which its owner overwrites during the step.
// Values written by other blocks inside the launch are read through L2 only
// (load_coherent, copy16_async): the read-only and L1 paths may hold stale
// lines.
//
// Each step is a fixed list of phases (stage and gemm per K-chunk, reduce,
// pointwise; backward also carry), none of which reads what another thread
// writes in the same phase. On the GPU all threads run a phase and meet at
// __syncthreads(); the emulator runs every thread of a phase in turn, block
// by block, and the end of a step is the grid barrier. Both call the same
// phase functions below.
//
// Note [inputs staged with the chunk]
// What step 2 reads besides the product, the block's slice of the step's
// x_proj and of the state entering it (c_{t-1}, or the GRU's h_{t-1}), is
// known before the product is: its copies are issued right after the first
// chunk's, as their own commit group, and land with it. The slice of b_hh is
// staged once, with W_hh's. Read in step 2, each would be one more round trip
// (from HBM for x_proj) on the chain of steps. The state is the block's own
// units, written by the block itself, so 4- and 8-byte copies through L1 see
// it. Backward the same for the saved gates, c_t, the state entering the
// step and grad_h of the step whose pointwise phase follows the product (not
// the first step handled, which has no product before it). Where the layout
// has no room left for them (Layout::in_bytes 0), the pointwise phase reads
// them from global memory.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../gates.h"
#include "../steps.h"
#include "args.h"
#include "layout.h"
#include "simt.h"
#include "staging.h"
#include "tensor_core.h"

namespace fusedrnn {
namespace persistent {

// ------------------------------------------------------------------ product
// After the last chunk: acc = the sum of the split partial sums, in order.
template <typename scalar_t, typename acc_t>
FUSEDRNN_HOST_DEVICE void reduce_split(const Layout& L, unsigned char* smem, int64_t rows, int tid,
                                       int nt) {
  if (L.mode == kSimt) {
    reduce_split_simt<acc_t>(L, smem, rows, tid, nt);
  } else {
    reduce_split_tensor_core<scalar_t, acc_t>(L, smem, rows, tid, nt);
  }
}

template <int kMode, typename scalar_t, typename acc_t>
FUSEDRNN_HOST_DEVICE void gemm(const Layout& L, unsigned char* smem, int64_t rows, int64_t k0,
                               int tid, int nt) {
  // (The host never pairs float64 with tensor cores; this keeps it from compiling.)
  if constexpr (kMode == kTensorCore && !std::is_same<scalar_t, double>::value) {
    gemm_tensor_core<scalar_t>(L, smem, rows, k0, tid, nt);
  } else {
    gemm_simt<scalar_t, acc_t>(L, smem, rows, k0, tid, nt);
  }
}

// ------------------------------------------------------------------ pointwise
// The pointwise phases run the per-unit glue of steps.h (step_unit) over the
// block's own units, on views of the kernel's buffers as step structs.

// What the forward pointwise phase reads besides its own results (the
// interface of StepFromHh in steps.h): the recurrent term h_{t-1} W_hh^T +
// b_hh of gate g of unit j in row b from the block's accumulator
// acc[b][g*units + j - j0], and, where the layout has room (L.in_bytes), x,
// the state and b_hh from where issue_inputs and load_forward_bias staged
// them, else from global memory. pre() sums x + (acc + b_hh), as this kernel
// always has. A null b_hh (no bias) adds zero, so no zero-filled tensor is
// made per call.
template <int G, typename scalar_t, typename acc_t, typename state_t>
struct StepFromSmem {
  const acc_t* acc;
  const scalar_t* b_hh;
  const scalar_t* x;    // the step's rows of x_proj
  const state_t* st;    // [B, H] running state
  const scalar_t* xs;   // staged: [G][rows][units], or null
  const state_t* sts;   // staged: [rows][units], or null
  const scalar_t* bs;   // staged: [G][units], or null
  int64_t ldacc, units, j0, H, rows;
  FUSEDRNN_HOST_DEVICE acc_t input(int64_t b, int64_t j, int g) const {
    return acc_t(xs ? xs[(g * rows + b) * units + (j - j0)] : x[b * G * H + g * H + j]);
  }
  FUSEDRNN_HOST_DEVICE acc_t term(int64_t b, int64_t j, int g) const {
    const acc_t bias = bs           ? acc_t(bs[g * units + (j - j0)])
                       : b_hh != nullptr ? acc_t(b_hh[g * H + j])
                                         : acc_t(0);
    return acc[b * ldacc + g * units + (j - j0)] + bias;
  }
  FUSEDRNN_HOST_DEVICE acc_t pre(int64_t b, int64_t j, int g) const {
    return input(b, j, g) + term(b, j, g);
  }
  FUSEDRNN_HOST_DEVICE acc_t state(int64_t b, int64_t j) const {
    return acc_t(sts ? sts[b * units + (j - j0)] : st[b * H + j]);
  }
};

// Step st as the forward step struct of steps.h: rows of x, out and the
// saved tensors from the step's first, the state [B, H] from row 0. hh and
// b_hh stay null: the recurrent term comes from StepFromSmem.
template <int G, typename scalar_t, typename acc_t>
FUSEDRNN_HOST_DEVICE auto forward_step(const ForwardArgs<scalar_t, acc_t>& a, const StepInfo& st) {
  const int64_t H = a.H;
  if constexpr (G == kLstmGates) {
    LstmForwardStep<scalar_t, acc_t> s;
    s.rows = st.rows;
    s.H = H;
    s.x = a.x + st.off * G * H;
    s.c = a.c;
    s.h = a.h;
    s.out = a.out + st.off * H;
    s.gates = a.gates ? a.gates + st.off * G * H : nullptr;
    s.cells = a.cells ? a.cells + st.off * H : nullptr;
    return s;
  } else {
    // a.h holds h_{t-1} of every active row (see gru_forward in host.h).
    GruForwardStep<scalar_t, acc_t> s;
    s.rows = st.rows;
    s.H = H;
    s.x = a.x + st.off * G * H;
    s.h = a.h;
    s.out = a.out + st.off * H;
    s.gates = a.gates ? a.gates + st.off * kGruSaved * H : nullptr;
    return s;
  }
}

// Step st as the backward step struct of steps.h. dh holds the product that
// carry_backward formed (GRU: added to dh * z of the step after).
template <int G, typename scalar_t, typename acc_t>
FUSEDRNN_HOST_DEVICE auto backward_step(const BackwardArgs<scalar_t, acc_t>& a,
                                        const StepInfo& st) {
  const int64_t H = a.H;
  if constexpr (G == kLstmGates) {
    LstmBackwardStep<scalar_t, acc_t> s;
    s.rows = st.rows;
    s.H = H;
    s.gates = a.gates + st.off * G * H;
    s.cells = a.cells + st.off * H;
    s.c_prev = a.cells + st.prev_off * H;
    s.prev_rows = st.prev_rows;
    s.c0 = a.c0;
    s.grad_h = a.grad_out + st.off * H;
    s.dh_rec = a.dh;
    s.dc = a.dc;
    s.dgates = a.dg + st.off * G * H;
    return s;
  } else {
    GruBackwardStep<scalar_t, acc_t> s;
    s.rows = st.rows;
    s.H = H;
    s.gates = a.gates + st.off * kGruSaved * H;
    s.h_prev = a.out + st.prev_off * H;
    s.prev_rows = st.prev_rows;
    s.h0 = a.h0;
    s.grad_h = a.grad_out + st.off * H;
    s.dh = a.dh;
    s.dx = a.dx + st.off * G * H;
    s.dhh = a.dhh + st.off * G * H;
    return s;
  }
}

// ------------------------------------------------------------------ forward
template <int G, typename scalar_t, typename acc_t>
FUSEDRNN_HOST_DEVICE void pointwise_forward(const ForwardArgs<scalar_t, acc_t>& a, int64_t blk,
                                            unsigned char* smem, const StepInfo& st, int tid,
                                            int nt) {
  const Layout& L = a.L;
  const int64_t H = a.H, j0 = blk * L.units, u = min_(L.units, H - j0);
  const int u32 = int(u);  // 32-bit: see gemm_simt
  const auto step = forward_step<G>(a, st);
  const auto* state = running_state<G>(a);
  using state_t = std::remove_const_t<std::remove_pointer_t<decltype(state)>>;
  const bool staged = L.in_bytes > 0;
  const StepFromSmem<G, scalar_t, acc_t, state_t> src{
      smem_at<acc_t>(smem, L.acc_off),
      a.b_hh,
      step.x,
      state,
      staged ? smem_at<scalar_t>(smem, L.in_off[kInX]) : nullptr,
      staged ? smem_at<state_t>(smem, L.in_off[kInState]) : nullptr,
      staged ? smem_at<scalar_t>(smem, L.in_off[kInBias]) : nullptr,
      L.ldacc,
      L.units,
      j0,
      H,
      st.rows};
  for (int i = tid; i < int(st.rows * u); i += nt) step_unit(step, i / u32, j0 + i % u32, src);
}

// Row b of h_{t-1}: the output of the step before where b was active there,
// else h0.
template <typename scalar_t, typename acc_t>
struct PrevState {
  const ForwardArgs<scalar_t, acc_t>* a;
  StepInfo st;
  FUSEDRNN_HOST_DEVICE const scalar_t* row(int64_t b) const {
    return b < st.prev_rows ? a->out + (st.prev_off + b) * a->H : a->h0 + b * a->H;
  }
};

// Phases of one forward step: (stage, gemm) per chunk, reduce, pointwise.
FUSEDRNN_HOST_DEVICE int64_t forward_phases(const Layout& L) { return 2 * num_chunks(L) + 2; }

template <int G, int kMode, typename scalar_t, typename acc_t>
FUSEDRNN_HOST_DEVICE void forward_phase(const ForwardArgs<scalar_t, acc_t>& a, int64_t blk,
                                        unsigned char* smem, int64_t s, int64_t phase, int tid,
                                        int nt) {
  const StepInfo st = step_info(a.sizes, a.offsets, a.steps, a.B, a.reverse, s);
  if (phase < 2 * num_chunks(a.L)) {
    const int64_t k0 = phase / 2 * a.L.kc;
    if (phase % 2 == 0) {
      const auto issue_more = [&] {
        if (a.L.in_bytes > 0) issue_inputs<G>(a, blk, smem, st, tid, nt);
      };
      stage_chunk<scalar_t, acc_t>(a.L, smem, st.rows, phase / 2,
                                   PrevState<scalar_t, acc_t>{&a, st}, a.vec, tid, nt, issue_more);
    } else {
      gemm<kMode, scalar_t, acc_t>(a.L, smem, st.rows, k0, tid, nt);
    }
  } else if (phase == 2 * num_chunks(a.L)) {
    reduce_split<scalar_t, acc_t>(a.L, smem, st.rows, tid, nt);
  } else {
    pointwise_forward<G>(a, blk, smem, st, tid, nt);
  }
}

// ------------------------------------------------------------------ backward
// Iteration i in [0, T] (T = a.steps) handles processing step T-1-i (when
// i < T) after forming, from the gradients of step T-i (when i > 0), the
// block's slice of their product with W_hh.
template <int G, typename scalar_t, typename acc_t>
struct StepGrad {  // A = the pre-activation gradients of the step handled before
  const BackwardArgs<scalar_t, acc_t>* a;
  StepInfo st;
  FUSEDRNN_HOST_DEVICE const scalar_t* row(int64_t b) const {
    return (G == kLstmGates ? a->dg : a->dhh) + (st.off + b) * G * a->H;
  }
};

// dh for the rows of the step handled before: the product (LSTM), or the
// product added to dh * z, kept there by that step (GRU).
template <int G, typename scalar_t, typename acc_t>
FUSEDRNN_HOST_DEVICE void carry_backward(const BackwardArgs<scalar_t, acc_t>& a, int64_t blk,
                                         unsigned char* smem, const StepInfo& st, int tid, int nt) {
  const Layout& L = a.L;
  const acc_t* acc = smem_at<acc_t>(smem, L.acc_off);
  const int64_t H = a.H, j0 = blk * L.units, u = min_(L.units, H - j0);
  const int u32 = int(u);
  for (int i = tid; i < int(st.rows * u); i += nt) {
    const int64_t b = i / u32, jl = i % u32;
    const acc_t m = acc[b * L.ldacc + jl];
    acc_t& dh = a.dh[b * H + j0 + jl];
    dh = G == kLstmGates ? m : dh + m;
  }
}

// What the backward pointwise phase reads besides the gradients it carries
// (the interface of LstmBackwardFromStep / GruBackwardFromStep in steps.h):
// from where issue_inputs staged it, or (gs null) from global memory through
// `global`, the step's own reader.
template <typename scalar_t, typename acc_t, typename prev_t, typename FromStep>
struct BackwardFromSmem {
  FromStep global;
  const scalar_t* gs;     // saved gates [4][rows][units], or null
  const prev_t* ps;       // the state entering the step [rows][units]
  const scalar_t* grads;  // grad_h [rows][units]
  const acc_t* cs;        // LSTM c_t [rows][units]
  int64_t units, j0, rows;
  FUSEDRNN_HOST_DEVICE acc_t gate(int64_t b, int64_t j, int g) const {
    return gs ? acc_t(gs[(g * rows + b) * units + (j - j0)]) : global.gate(b, j, g);
  }
  FUSEDRNN_HOST_DEVICE acc_t cell(int64_t b, int64_t j) const {
    return gs ? cs[b * units + (j - j0)] : global.cell(b, j);
  }
  FUSEDRNN_HOST_DEVICE acc_t prev(int64_t b, int64_t j) const {
    return gs ? acc_t(ps[b * units + (j - j0)]) : global.prev(b, j);
  }
  FUSEDRNN_HOST_DEVICE acc_t grad_h(int64_t b, int64_t j) const {
    return gs ? acc_t(grads[b * units + (j - j0)]) : global.grad_h(b, j);
  }
};

// staged: issue_inputs ran for this step (with the first chunk of the
// product before it; the first step handled has none).
template <int G, typename scalar_t, typename acc_t>
FUSEDRNN_HOST_DEVICE void pointwise_backward(const BackwardArgs<scalar_t, acc_t>& a, int64_t blk,
                                             unsigned char* smem, const StepInfo& st, bool staged,
                                             int tid, int nt) {
  const Layout& L = a.L;
  const int64_t H = a.H, j0 = blk * L.units, u = min_(L.units, H - j0);
  const int u32 = int(u);
  const auto step = backward_step<G>(a, st);
  using prev_t = std::conditional_t<G == kLstmGates, acc_t, scalar_t>;
  using FromStep = std::conditional_t<G == kLstmGates, LstmBackwardFromStep<scalar_t, acc_t>,
                                      GruBackwardFromStep<scalar_t, acc_t>>;
  const BackwardFromSmem<scalar_t, acc_t, prev_t, FromStep> src{
      FromStep{step},
      staged ? smem_at<scalar_t>(smem, L.in_off[kInGates]) : nullptr,
      smem_at<prev_t>(smem, L.in_off[kInPrev]),
      smem_at<scalar_t>(smem, L.in_off[kInGrad]),
      smem_at<acc_t>(smem, L.in_off[kInCell]),
      L.units,
      j0,
      st.rows};
  for (int i = tid; i < int(st.rows * u); i += nt) step_unit(step, i / u32, j0 + i % u32, src);
}

FUSEDRNN_HOST_DEVICE int64_t backward_phases(const Layout& L, int64_t i, int64_t steps) {
  return (i > 0 ? 2 * num_chunks(L) + 2 : 0) + (i < steps ? 1 : 0);
}

template <int G, int kMode, typename scalar_t, typename acc_t>
FUSEDRNN_HOST_DEVICE void backward_phase(const BackwardArgs<scalar_t, acc_t>& a, int64_t blk,
                                         unsigned char* smem, int64_t i, int64_t phase, int tid,
                                         int nt) {
  const int64_t nc = num_chunks(a.L);
  // The step this iteration handles (i < T), read only where it is used: its
  // inputs are staged with the first chunk of the product before it (Note
  // [inputs staged with the chunk]), where there is a product.
  const bool staged = a.L.in_bytes > 0 && i > 0 && i < a.steps;
  const auto handled = [&] {
    return step_info(a.sizes, a.offsets, a.steps, a.B, a.reverse, a.steps - 1 - i);
  };
  if (i > 0 && phase <= 2 * nc + 1) {
    const StepInfo before = step_info(a.sizes, a.offsets, a.steps, a.B, a.reverse, a.steps - i);
    if (phase == 2 * nc + 1) {
      carry_backward<G>(a, blk, smem, before, tid, nt);
    } else if (phase == 2 * nc) {
      reduce_split<scalar_t, acc_t>(a.L, smem, before.rows, tid, nt);
    } else if (phase % 2 == 0) {
      const auto issue_more = [&] {
        if (staged) issue_inputs<G>(a, blk, smem, handled(), tid, nt);
      };
      stage_chunk<scalar_t, acc_t>(a.L, smem, before.rows, phase / 2,
                                   StepGrad<G, scalar_t, acc_t>{&a, before}, a.vec, tid, nt,
                                   issue_more);
    } else {
      gemm<kMode, scalar_t, acc_t>(a.L, smem, before.rows, phase / 2 * a.L.kc, tid, nt);
    }
    return;
  }
  pointwise_backward<G>(a, blk, smem, handled(), staged, tid, nt);
}

}  // namespace persistent
}  // namespace fusedrnn
