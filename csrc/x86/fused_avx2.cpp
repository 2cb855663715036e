// The fused float32 and float64 paths compiled for AVX2 and FMA (Note [ISA
// translation units] in fused_ops.h), for CPUs without AVX-512: 8-float
// (vec8.h) and 4-double (vec4d.h) vectors, tiles of 12 ymm accumulators
// (panel_gemm.h).
#pragma GCC target("avx2,fma")

#include "vec4d.h"
#include "vec8.h"
// The vector headers first: fused_ops.h's templates find their exp_/tanh_.
#include "fused_ops.h"

namespace fusedrnn {
namespace cpu {

constexpr FusedF32 kFusedAvx2 = fused_ops<simd::Vec8>();
constexpr FusedF64 kFusedAvx2F64 = fused_ops<simd::Vec4d>();

}  // namespace cpu
}  // namespace fusedrnn
