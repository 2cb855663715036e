// The fused float32 path compiled for AVX-512 (Note [ISA translation units]
// in fused_f32.h): 16-float vectors, tiles of up to 24 zmm accumulators.
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")

#include "vec16.h"
// The vector header first: fused_f32.h's templates find its exp_/tanh_.
#include "fused_f32.h"

namespace fusedrnn {
namespace cpu {

constexpr FusedF32 kFusedAvx512 = fused_f32_ops<simd::Vec16>();

}  // namespace cpu
}  // namespace fusedrnn
