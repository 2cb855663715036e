// The fused bfloat16 CPU path (AVX512-BF16): the forward and backward time
// loops of fused_loop.h and fused_ops.h with bfloat16 activations, weights and
// gate gradients. The tile product runs vdpbf16ps, which
// adds two bfloat16 products into each float32 lane, on panels that hold
// k in pairs:
//
//   packed[p][k / 2][g * 16 + j][k % 2] = w[g * H + 16 p + j][k]    (K = H, even)
//
// while h_{t-1} is broadcast two values at a time. Accumulation, the gate math
// (gates.h, through the epilogues of fused_loop.h) and the cell state are
// float32; h, the saved gates and the gate gradients are rounded to bfloat16
// once, as torch.nn stores them. Where the CPU has AMX, the step products run
// on AMX tiles from the same panels instead (amx_tiles.h). Entered only after
// has_avx512_bf16() (rnn_cpu.cpp); compiled like fused_avx512.cpp (Note [ISA
// translation units] in fused_ops.h).
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx512bf16,avx2,fma")

#include <algorithm>
#include <cstring>
#include <vector>

#include "vec16.h"
#include "fused_ops.h"
#include "amx_tiles.h"

namespace fusedrnn {
namespace cpu {
namespace {

using Bf16 = at::BFloat16;
using simd::Vec16;
constexpr int kLanes = Vec16::kLanes;

// tile[MR][NV * 16] (+)= A[MR rows, K] * panel (k-pair layout above); the
// pair (r, k), (r, k + 1) of A (k even) is at a[r * sam + k * sak]; K even.
// noinline: Note [activations inlined] in gates.h.
template <int MR, int NV>
__attribute__((noinline)) void mma_tile_bf16(const Bf16* a, int64_t sam, int64_t sak,
                                             const Bf16* panel, int64_t K, float* tile,
                                             bool accumulate, Ahead ahead = {}) {
  __m512 acc[MR][NV];
  load_acc<Vec16, MR, NV>(acc, tile, accumulate);
  for (int64_t k = 0; k < K; k += 2) {
    if (k / 2 < ahead.lines) _mm_prefetch(ahead.at + k * 32, _MM_HINT_T1);
    __m512bh w[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      w[v] = (__m512bh)_mm512_loadu_si512(panel + (k * NV + 2 * v) * kLanes);
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * sam + k * sak, sizeof(pair));
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, w[v]);
    }
  }
  store_acc<Vec16, MR, NV>(acc, tile);
}

// The bfloat16 tile product for run_panels (panel_gemm.h) and
// weight_grad_fused (weight_grad.h): pairs of A as mma_tile_bf16 reads them.
struct MmaBf16 {
  using A = Bf16;
  using Packed = Bf16;
  static constexpr int kStepsPerLine = 2;  // a k pair a line ahead
  template <int MR, int NV>
  static void rows(int mr, const Bf16* a, int64_t sam, int64_t sak, const Bf16* panel,
                   int64_t K, float* tile, bool accumulate, int64_t = 0, Ahead ahead = {}) {
    if constexpr (MR > 1) {
      if (mr < MR) return rows<MR - 1, NV>(mr, a, sam, sak, panel, K, tile, accumulate, 0, ahead);
    }
    mma_tile_bf16<MR, NV>(a, sam, sak, panel, K, tile, accumulate, ahead);
  }
};

using Bf16Gemm = PanelGemm<Vec16, Bf16, MmaBf16, 2>;


// The forward drivers' Gemm (fused_loop.h) on AMX: Bf16Gemm's panels.
struct AmxGemm {
  using V = Vec16;
  using S = Bf16;
  using Packed = Bf16;
  static Tensor pack_gates(const Tensor& w, int64_t G) {
    return amx::pack_deep(w, 1, [G](const Tensor& wd) { return Bf16Gemm::pack_gates(wd, G); });
  }
  template <int NV, typename Epi>
  static void run(int64_t p0, int64_t p1, int64_t M, int64_t K, const Bf16* a, int64_t lda,
                  const Bf16* packed, const Epi& epi) {
    amx::run_panels<NV>(p0, p1, M, K, a, lda, packed, epi);
  }
  // A single step packs W_hh whole, as Bf16Gemm's (the driver's single_step).
  template <int NV, typename Epi>
  static bool single_step(int64_t, int64_t, int64_t, const Bf16*, const Bf16*, const Epi&) {
    return false;
  }
};

// The input projection's panels: 64 columns (4 vectors) of B = w^T, w [N, K],
// k in pairs: packed[q][k / 2][c][k % 2] = w[64 q + c][k] (0 beyond N). A k
// pair is one 32-bit unit, so each 16 columns are a 16 x 16 transpose of units.
constexpr int kLinearNV = 4;
constexpr int64_t kLinearPanel = kLinearNV * kLanes;

Tensor pack_pair_panels(const Tensor& w) {
  const int64_t N = w.size(0), K = w.size(1), Q = ceil_div(N, kLinearPanel);
  Tensor packed = empty_for_steps({Q, K, kLinearPanel}, w.options());
  pack_units_transposed<kLinearPanel, kLanes>(reinterpret_cast<const float*>(w.data_ptr<Bf16>()),
                                              N, K / 2,
                                              reinterpret_cast<float*>(packed.data_ptr<Bf16>()));
  return packed;
}

// y[m][64 q + c] = bfloat16(tile + bias), rows N apart: the projection's
// output, rounded once.
struct StoreBf16Epi {
  static constexpr bool kStoresRows = true;  // Note [a panel's stores after its products]
  int64_t N;
  const Bf16* bias;  // [N] or null
  Bf16* y;           // [M, N]
  void prefetch(int64_t, int, int64_t) const {}
  void operator()(const float* tile, int64_t ldt, int64_t m0, int mr, int64_t q) const {
    const int64_t n0 = q * kLinearPanel;
    for (int r = 0; r < mr; ++r) {
      Bf16* row = y + (m0 + r) * N + n0;
      for (int64_t j = 0; j < kLinearPanel && n0 + j < N; j += kLanes) {
        const auto m = Vec16::mask(N - n0 - j);
        Vec16 v = Vec16::load(tile + r * ldt + j, m);
        if (bias) v = v + load_v<Vec16>(bias + n0 + j, m);
        store_v<Vec16>(row + j, v, m);
      }
    }
  }
};

// The backward's product dh_{t-1} = dG_t W_hh in bfloat16: W_hh [K = G, N = H]
// in column panels of 64 with k in pairs,
//   packed[q][k / 2][c][k % 2] = w[k][64 q + c]     (0 beyond N; K even),
// each 32-bit unit the pair of rows k, k + 1 at one column.
struct Bf16ColumnPanels {
  using Mma = MmaBf16;
  template <typename Epi>
  static void run(int64_t p0, int64_t p1, int64_t M, int64_t K, const Bf16* a, int64_t lda,
                  const Bf16* packed, const Epi& epi) {
    run_panels<Vec16, Vec16::kColumnNV, Mma>(p0, p1, M, K, a, lda, 1, packed, epi);
  }
  static Tensor pack(const Tensor& w) {
    const int64_t K = w.size(0), N = w.size(1), Q = ceil_div(N, kLinearPanel);
    Tensor packed = empty_for_steps({Q, K, kLinearPanel}, w.options());
    const uint16_t* src = reinterpret_cast<const uint16_t*>(w.data_ptr<Bf16>());
    uint32_t* dst = reinterpret_cast<uint32_t*>(packed.data_ptr<Bf16>());
    at::parallel_for(0, Q, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        for (int64_t k = 0; k < K; k += 2) {
          uint32_t* out = dst + (q * K + k) / 2 * kLinearPanel;
          for (int64_t c = 0; c < kLinearPanel; c += kLanes) {
            const int64_t n0 = q * kLinearPanel + c;
            const __mmask16 m = n0 < N ? Vec16::mask(N - n0) : __mmask16(0);
            const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, src + k * N + n0));
            const __m512i hi =
                _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, src + (k + 1) * N + n0));
            _mm512_storeu_si512(out + c, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
          }
        }
      }
    });
    return packed;
  }
};

// The backward's product on AMX tiles (Note [AMX tiles for the step
// product]): the same column panels, four groups of 16 columns each.
struct AmxColumnPanels {
  using Mma = MmaBf16;
  template <typename Epi>
  static void run(int64_t p0, int64_t p1, int64_t M, int64_t K, const Bf16* a, int64_t lda,
                  const Bf16* packed, const Epi& epi) {
    amx::run_panels<Vec16::kColumnNV>(p0, p1, M, K, a, lda, packed, epi);
  }
  static Tensor pack(const Tensor& w) { return amx::pack_deep(w, 0, Bf16ColumnPanels::pack); }
};

// Rows per block: a block of x stays in L2 while each thread runs its panels
// over it (as gemm_rows in fused_ops.h).
constexpr int64_t kLinearRowBlock = 192;

}  // namespace

std::pair<Tensor, Tensor> weight_grad_bf16(const std::vector<GradRowsOf<Bf16>>& segs, int64_t M,
                                           int64_t N, bool want_db,
                                           const at::TensorOptions& options) {
  return weight_grad_fused<Vec16, Bf16, MmaBf16, 2>(segs, M, N, want_db, options);
}

Tensor linear_fused_bf16(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const int64_t Q = ceil_div(N, kLinearPanel);
  Tensor y = empty_for_steps({M, N}, x.options());
  const Tensor packed = pack_pair_panels(w);
  const Tensor bias = b.has_value() ? b->contiguous() : Tensor();
  const Bf16* xp = x.data_ptr<Bf16>();
  const Bf16* bp = bias.defined() ? bias.data_ptr<Bf16>() : nullptr;
  const Bf16* wp = packed.data_ptr<Bf16>();
  Bf16* yp = y.data_ptr<Bf16>();
  at::parallel_for(0, Q, ceil_div(Q, at::get_num_threads()), [&](int64_t q0, int64_t q1) {
    for (int64_t mc = 0; mc < M; mc += kLinearRowBlock) {
      const StoreBf16Epi epi{N, bp, yp + mc * N};
      run_panels<Vec16, kLinearNV, MmaBf16>(q0, q1, std::min(kLinearRowBlock, M - mc), K,
                                            xp + mc * K, K, 1, wp, epi);
    }
  });
  return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward_fused_bf16(
    const Tensor& x_proj, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
    const Tensor& b_hh, bool reverse, bool train, c10::IntArrayRef batch_sizes, bool amx) {
  if (amx) {
    return lstm_forward_steps<AmxGemm>(x_proj, h0, c0, w_hh, b_hh, reverse, train, batch_sizes);
  }
  return lstm_forward_steps<Bf16Gemm>(x_proj, h0, c0, w_hh, b_hh, reverse, train, batch_sizes);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward_fused_bf16(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n,
    const Tensor& gates, const Tensor& cells, const Tensor& c0, const Tensor& w_hh,
    bool reverse, bool amx) {
  const auto run = [&](auto cols) {
    return lstm_backward_steps<Vec16, Bf16, decltype(cols)>(
        grad_output, grad_h_n, grad_c_n, Tensor(), gates, cells, Tensor(), c0, w_hh, reverse,
        false, false);
  };
  return amx ? run(AmxColumnPanels()) : run(Bf16ColumnPanels());
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gru_backward_fused_bf16(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& output, const Tensor& gates,
    const Tensor& h0, const Tensor& w_hh, bool reverse, bool amx) {
  const auto run = [&](auto cols) {
    return gru_backward_steps<Vec16, Bf16, decltype(cols)>(grad_output, grad_h_n, output, gates,
                                                          h0, w_hh, reverse, false, false);
  };
  return amx ? run(AmxColumnPanels()) : run(Bf16ColumnPanels());
}

std::tuple<Tensor, Tensor, Tensor> gru_forward_fused_bf16(const Tensor& x_proj,
                                                          const Tensor& h0, const Tensor& w_hh,
                                                          const Tensor& b_hh, bool reverse,
                                                          bool train,
                                                          c10::IntArrayRef batch_sizes, bool amx) {
  if (amx) return gru_forward_steps<AmxGemm>(x_proj, h0, w_hh, b_hh, reverse, train, batch_sizes);
  return gru_forward_steps<Bf16Gemm>(x_proj, h0, w_hh, b_hh, reverse, train, batch_sizes);
}

}  // namespace cpu
}  // namespace fusedrnn
