// The fused float32 path compiled for AVX2 and FMA (Note [ISA translation
// units] in fused_ops.h), for CPUs without AVX-512: 8-float vectors, tiles of
// 12 ymm accumulators (vec8.h, panel_gemm.h).
#pragma GCC target("avx2,fma")

#include "vec8.h"
// The vector header first: fused_ops.h's templates find its exp_/tanh_.
#include "fused_ops.h"

namespace fusedrnn {
namespace cpu {

constexpr FusedF32 kFusedAvx2 = fused_ops<simd::Vec8>();

}  // namespace cpu
}  // namespace fusedrnn
