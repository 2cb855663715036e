// CPU pointwise steps and the CPU registration of the ops. Rows are split
// across threads; the inner loop over hidden units vectorises (gates.h).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../recurrence.h"

namespace fusedrnn {
namespace {

// Rows per parallel task: one row is 4H elements of gate math, too little to
// pay for a task on its own.
constexpr int64_t kRowsPerTask = 4;

struct CpuKernels {
  template <typename scalar_t, typename acc_t>
  static void lstm_forward_step(const LstmForwardStep<scalar_t, acc_t>& a) {
    const int64_t H = a.H, G = kLstmGates * H;
    at::parallel_for(0, a.rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* x = a.x + b * G;
        const scalar_t* hh = a.hh + b * G;
        const scalar_t* bias = a.b_hh;
        acc_t* c = a.c + b * H;
        scalar_t* h = a.h + b * H;
        for (int64_t j = 0; j < H; ++j) {
          acc_t i, f, g, o, c_new, h_new;
          lstm_forward_point<acc_t>(
              acc_t(x[j]) + acc_t(hh[j]) + acc_t(bias[j]),
              acc_t(x[H + j]) + acc_t(hh[H + j]) + acc_t(bias[H + j]),
              acc_t(x[2 * H + j]) + acc_t(hh[2 * H + j]) + acc_t(bias[2 * H + j]),
              acc_t(x[3 * H + j]) + acc_t(hh[3 * H + j]) + acc_t(bias[3 * H + j]), c[j], i, f,
              g, o, c_new, h_new);
          c[j] = c_new;
          h[j] = scalar_t(h_new);
          if (a.out) a.out[b * H + j] = scalar_t(h_new);
          if (a.gates) {
            scalar_t* gs = a.gates + b * G;
            gs[j] = scalar_t(i);
            gs[H + j] = scalar_t(f);
            gs[2 * H + j] = scalar_t(g);
            gs[3 * H + j] = scalar_t(o);
            a.cells[b * H + j] = c_new;
          }
        }
      }
    });
  }

  template <typename scalar_t, typename acc_t>
  static void lstm_backward_step(const LstmBackwardStep<scalar_t, acc_t>& a) {
    const int64_t H = a.H, G = kLstmGates * H;
    at::parallel_for(0, a.rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* gs = a.gates + b * G;
        const acc_t* c = a.cells + b * H;
        const acc_t* cp = b < a.prev_rows ? a.c_prev + b * H : a.c0 + b * H;
        const scalar_t* gh = a.grad_h + b * H;
        const acc_t* dhr = a.dh_rec ? a.dh_rec + b * H : nullptr;
        acc_t* dc = a.dc + b * H;
        scalar_t* dg = a.dgates + b * G;
        for (int64_t j = 0; j < H; ++j) {
          const acc_t dh = acc_t(gh[j]) + (dhr ? dhr[j] : acc_t(0));
          acc_t di, df, dgg, dout, dcp;
          lstm_backward_point<acc_t>(acc_t(gs[j]), acc_t(gs[H + j]), acc_t(gs[2 * H + j]),
                                     acc_t(gs[3 * H + j]), c[j], cp[j], dh, dc[j], di, df,
                                     dgg, dout, dcp);
          dg[j] = scalar_t(di);
          dg[H + j] = scalar_t(df);
          dg[2 * H + j] = scalar_t(dgg);
          dg[3 * H + j] = scalar_t(dout);
          dc[j] = dcp;
        }
      }
    });
  }

  template <typename scalar_t, typename acc_t>
  static void gru_forward_step(const GruForwardStep<scalar_t, acc_t>& a) {
    const int64_t H = a.H, G = kGruGates * H;
    at::parallel_for(0, a.rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* x = a.x + b * G;
        const scalar_t* hh = a.hh + b * G;
        const scalar_t* bias = a.b_hh;
        scalar_t* h = a.h + b * H;
        scalar_t* out = a.out + b * H;
        for (int64_t j = 0; j < H; ++j) {
          const acc_t hn = acc_t(hh[2 * H + j]) + acc_t(bias[2 * H + j]);
          acc_t r, z, n, h_new;
          gru_forward_point<acc_t>(acc_t(x[j]), acc_t(x[H + j]), acc_t(x[2 * H + j]),
                                   acc_t(hh[j]) + acc_t(bias[j]),
                                   acc_t(hh[H + j]) + acc_t(bias[H + j]), hn, acc_t(h[j]), r,
                                   z, n, h_new);
          h[j] = scalar_t(h_new);
          out[j] = scalar_t(h_new);
          if (a.gates) {
            scalar_t* gs = a.gates + b * kGruSaved * H;
            gs[j] = scalar_t(r);
            gs[H + j] = scalar_t(z);
            gs[2 * H + j] = scalar_t(n);
            gs[3 * H + j] = scalar_t(hn);
          }
        }
      }
    });
  }

  template <typename scalar_t, typename acc_t>
  static void gru_backward_step(const GruBackwardStep<scalar_t, acc_t>& a) {
    const int64_t H = a.H, G = kGruGates * H;
    at::parallel_for(0, a.rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* gs = a.gates + b * kGruSaved * H;
        const scalar_t* hp = b < a.prev_rows ? a.h_prev + b * H : a.h0 + b * H;
        const scalar_t* gh = a.grad_h + b * H;
        acc_t* dh = a.dh + b * H;
        scalar_t* dx = a.dx + b * G;
        scalar_t* dhh = a.dhh + b * G;
        for (int64_t j = 0; j < H; ++j) {
          acc_t dr, dz, dn, dhn, dh_direct;
          gru_backward_point<acc_t>(acc_t(gs[j]), acc_t(gs[H + j]), acc_t(gs[2 * H + j]),
                                    acc_t(gs[3 * H + j]), acc_t(hp[j]), acc_t(gh[j]) + dh[j],
                                    dr, dz, dn, dhn, dh_direct);
          dx[j] = dhh[j] = scalar_t(dr);
          dx[H + j] = dhh[H + j] = scalar_t(dz);
          dx[2 * H + j] = scalar_t(dn);
          dhh[2 * H + j] = scalar_t(dhn);
          dh[j] = dh_direct;
        }
      }
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fusedrnn, CPU, m) {
  m.impl("lstm_forward", &lstm_forward_impl<CpuKernels>);
  m.impl("lstm_backward", &lstm_backward_impl<CpuKernels>);
  m.impl("gru_forward", &gru_forward_impl<CpuKernels>);
  m.impl("gru_backward", &gru_backward_impl<CpuKernels>);
}

}  // namespace fusedrnn
