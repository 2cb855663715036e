// The fused bfloat16 CPU path (AVX512-BF16): the forward of fused_ops.h with
// bfloat16 activations and weights. The tile product runs vdpbf16ps, which
// adds two bfloat16 products into each float32 lane, on panels that hold
// k in pairs:
//
//   packed[p][k / 2][g * 16 + j][k % 2] = w[g * H + 16 p + j][k]    (K = H, even)
//
// while h_{t-1} is broadcast two values at a time. Accumulation, the gate math
// (gates.h, through the epilogues of fused_loop.h) and the cell state are
// float32; h and the saved gates are rounded to bfloat16 once, as torch.nn
// stores them. Entered only after has_avx512_bf16() (rnn_cpu.cpp); compiled
// like fused_avx512.cpp (Note [ISA translation units] in fused_ops.h).
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx512bf16,avx2,fma")

#include <cstring>

#include "vec16.h"
#include "fused.h"
#include "fused_loop.h"

namespace fusedrnn {
namespace cpu {
namespace {

using Bf16 = at::BFloat16;
using simd::Vec16;
constexpr int kLanes = Vec16::kLanes;

// tile[MR][NV * 16] (+)= A[MR rows, K] * panel (k-pair layout above); element
// (r, k) of A is a[r * sam + k]; K even.
template <int MR, int NV>
inline void mma_tile_bf16(const Bf16* a, int64_t sam, const Bf16* panel, int64_t K, float* tile,
                          bool accumulate) {
  __m512 acc[MR][NV];
  load_acc<Vec16, MR, NV>(acc, tile, accumulate);
  for (int64_t k = 0; k < K; k += 2) {
    __m512bh w[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      w[v] = (__m512bh)_mm512_loadu_si512(panel + (k * NV + 2 * v) * kLanes);
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * sam + k, sizeof(pair));
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, w[v]);
    }
  }
  store_acc<Vec16, MR, NV>(acc, tile);
}

// The bfloat16 tile product for run_panels (panel_gemm.h); A's k stride is 1.
struct MmaBf16 {
  using A = Bf16;
  using Packed = Bf16;
  template <int MR, int NV>
  static void rows(int mr, const Bf16* a, int64_t sam, int64_t /*sak*/, const Bf16* panel,
                   int64_t K, float* tile, bool accumulate) {
    if constexpr (MR > 1) {
      if (mr < MR) return rows<MR - 1, NV>(mr, a, sam, 1, panel, K, tile, accumulate);
    }
    mma_tile_bf16<MR, NV>(a, sam, panel, K, tile, accumulate);
  }
};

using Bf16Gemm = PanelGemm<Vec16, Bf16, MmaBf16, 2>;

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward_fused_bf16(
    const Tensor& x_proj, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
    const Tensor& b_hh, bool reverse, bool train) {
  return lstm_forward_steps<Bf16Gemm>(x_proj, h0, c0, w_hh, b_hh, reverse, train);
}

std::tuple<Tensor, Tensor, Tensor> gru_forward_fused_bf16(const Tensor& x_proj,
                                                          const Tensor& h0, const Tensor& w_hh,
                                                          const Tensor& b_hh, bool reverse,
                                                          bool train) {
  return gru_forward_steps<Bf16Gemm>(x_proj, h0, w_hh, b_hh, reverse, train);
}

}  // namespace cpu
}  // namespace fusedrnn
